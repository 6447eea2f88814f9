"""GSM8K: the final-number metric, the task loader (official and chat rows), the embedded chat set
and its demo config, and the generation scoring path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from chatkit import chat_tokenizer
from conftest import make_tokenizer, tiny_model

from lorachain.config import load_config
from lorachain.data import load_examples
from lorachain.metrics import final_number, number_match
from lorachain.tasks import TaskExample, get_task
from lorachain.training.evaluate import score_task

ROOT = Path(__file__).parent.parent
REAL = Path(__file__).parent / "data" / "real" / "gsm8k.jsonl"  # first rows of the official test file


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("so 3 + 4 = 7 #### 7", "7"),
        ("He pays $1,200.\n#### 1,200", "1200"),
        ("#### -3.5 dollars", "-3.5"),
        ("The answer is 18.0", "18"),
        ("first 4 then 9", "9"),
        ("no number", None),
    ],
)
def test_final_number(text, number):
    assert final_number(text) == number


def test_number_match():
    assert number_match(" 16 - 3 - 4 = 9 eggs. #### 18", " ... #### 18") == 1.0
    assert number_match(" The answer is 17", " #### 18") == 0.0
    assert number_match("anything", "no gold number") == 0.0


def test_loader_on_real_rows_and_chat_rows(tmp_path):
    raw = [json.loads(x) for x in REAL.read_text().splitlines()]
    ex = get_task("gsm8k").load(REAL)
    assert [final_number(e.answers[0]) for e in ex] == ["18", "3", "70000"]
    assert all("\n" not in e.answers[0] and "<<" not in e.answers[0] for e in ex)
    assert ex[0].prompt == f"Question: {raw[0]['question']}\nAnswer:" and ex[0].target == ex[0].answers[0]
    chat = get_task("gsm8k").load(ROOT / "lorachain" / "demo_data" / "gsm8k_chat_test.jsonl")
    assert len(chat) == 100 and all(final_number(e.answers[0]) is not None for e in chat)


def test_embedded_chat_set_and_demo_config():
    cfg = load_config(ROOT / "configs" / "chat_gsm8k_smollm2.yaml", ["data.max_length=2048"])  # tiny BPE
    tok = chat_tokenizer("chatml")
    examples = load_examples(str(ROOT / cfg.data.train), cfg.data, tok, classifier=False)
    rows = [json.loads(x) for x in (ROOT / cfg.data.train).read_text().splitlines()]
    assert len(examples) == len(rows) == 320
    for e, row in list(zip(examples, rows, strict=True))[:20]:
        trained = tok.decode([y for y in e.labels if y != -100])
        assert trained == row["messages"][-1]["content"] + "<|im_end|>"
        assert "#### " in trained and row["messages"][1]["content"] not in trained


def test_generation_scored_by_final_number():
    model, tok = tiny_model("llama"), make_tokenizer()
    task = get_task("gsm8k")
    examples = [
        TaskExample("Review : good", answers=[" #### 7"]),
        TaskExample("Review : bad", answers=[" #### 8"]),
    ]
    got = score_task(model, tok, task, examples, batch_size=4, max_new_tokens=3)
    ref_nll = got.pop("ref_nll")
    assert got == {"em": 0.0, "score": 0.0, "n": 2}  # the random model's words hold no number
    # the reference's mean NLL per token, against a direct computation of each example
    sums = [target_nll(model, tok, e.prompt, e.answers[0]) for e in examples]
    assert abs(ref_nll - sum(n for n, _ in sums) / sum(k for _, k in sums)) < 1e-4


def target_nll(model, tok, prompt: str, target: str) -> tuple[float, int]:
    """(summed NLL of `target` after `prompt`, its token count), one unpadded forward."""
    import torch

    p, t = tok(prompt)["input_ids"], tok(target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([p + t])).logits[0].float(), -1)
    return -sum(logp[len(p) + j - 1, x].item() for j, x in enumerate(t)), len(t)
