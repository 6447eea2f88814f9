"""The per-endpoint prompt rules and the context policy shared by the server and the proxy."""

from __future__ import annotations

import pytest
from conftest import make_tokenizer

from lorachain.serve.prompting import BASE, PromptError, encode, fit_context, render_chat

TEMPLATES = {"prompt": "{instruction} =>", "task_prompt": "{instruction} task:", "max_length": 32}


def test_prompt_that_does_not_fit_is_refused_with_both_numbers():
    with pytest.raises(PromptError) as e:
        fit_context(list(range(30)), 32, 8, 16)
    assert e.value.code == "context_length_exceeded"
    assert "maximum context length is 32 tokens" in e.value.message
    assert "you requested 38 tokens (30 in the prompt, 8 in the completion)" in e.value.message


def test_left_truncation_keeps_the_end_and_says_so():
    fit = fit_context(list(range(30)), 32, 8, 16, truncate=True)
    assert fit.ids == list(range(6, 30)) and fit.max_tokens == 8
    assert fit.info() == {
        "prompt_tokens_sent": 30,
        "prompt_tokens_kept": 24,
        "truncated_tokens": 6,
        "max_tokens": 8,
    }
    fit = fit_context(list(range(30)), 64, 8, 16, truncate=5)  # vLLM's truncate_prompt_tokens
    assert fit.ids == list(range(25, 30)) and fit.truncated == 25


def test_omitted_max_tokens_is_clamped_not_the_prompt():
    fit = fit_context(list(range(28)), 32, None, 16)
    assert fit.ids == list(range(28)) and fit.max_tokens == 4 and fit.clamped
    assert fit_context(list(range(4)), 32, None, 16).info() is None
    with pytest.raises(PromptError, match="your messages resulted in 40 tokens"):
        fit_context(list(range(40)), 32, None, 16, param="messages")


def test_empty_prompt_is_a_clear_error():
    with pytest.raises(PromptError, match="empty") as e:
        fit_context([], 32, 4, 16)
    assert e.value.code == "empty_prompt"


def test_max_tokens_zero_scores_the_prompt_only():
    fit = fit_context(list(range(32)), 32, 0, 16)
    assert len(fit.ids) == 32 and fit.max_tokens == 0


def test_render_chat_per_adapter():
    tok = make_tokenizer()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "red sky"}]
    assert render_chat(TEMPLATES, tok, msgs, "alpha") == ("red sky =>", True)
    text, special = render_chat(TEMPLATES, tok, msgs, BASE)
    assert text == "system: be brief\nuser: red sky\nassistant:" and special is False
    assert render_chat({**TEMPLATES, "chat": True}, tok, msgs, "alpha")[0] == text


def test_encode_long_text_is_bounded_and_marked_inexact():
    tok = make_tokenizer()
    ids, exact = encode(tok, "red sky " * 100_000, limit=24)
    assert not exact and 24 < len(ids) < 2_000
    ids, exact = encode(tok, "red sky " * 5, limit=24)
    assert exact and len(ids) == 10
    tail, exact = encode(tok, "sea " * 50_000 + "red sky", limit=24, keep_end=True)
    assert not exact and tok.decode(tail[-2:]) == "red sky"
