"""How each endpoint turns a request into prompt token ids, and the context policy.

Plain functions shared by the local server and the proxy, so both build the same prompt:

- `/v1/completions` uses the prompt exactly as sent: text (tokenised with the tokenizer's own
  special tokens, as vLLM does) or token ids. `auto` selects on that text.
- `/v1/chat/completions` renders a template: the model's chat template for `base` (and for every
  adapter of a chat store, `templates["chat"]`), otherwise the store's prompt template around the
  last user message (what the adapters were trained on, as `lorachain ask`).

Context policy (`fit_context`), never silent: a prompt that does not fit `context - max_tokens` is
refused (OpenAI's wording, both numbers), unless left truncation was asked for, which keeps the
prompt's end and is reported; an omitted `max_tokens` is clamped to what fits (finish "length").
"""

from __future__ import annotations

from dataclasses import dataclass

BASE = "__base__"  # the engine's name for "no adapter"


class PromptError(ValueError):
    """A prompt the server cannot answer; the API turns it into a 400 with `param` and `code`."""

    def __init__(self, message: str, param: str = "prompt", code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


@dataclass
class Fit:
    """The prompt ids to generate from, and what the policy did to them."""

    ids: list[int]
    max_tokens: int
    prompt_tokens_sent: int  # before truncation
    truncated: int = 0  # tokens dropped from the prompt's start
    clamped: bool = False  # max_tokens was omitted and set to what fits

    def info(self) -> dict | None:
        """What the response reports (`lorachain_context`), or None when nothing was changed."""
        if not self.truncated and not self.clamped:
            return None
        return {
            "prompt_tokens_sent": self.prompt_tokens_sent,
            "prompt_tokens_kept": len(self.ids),
            "truncated_tokens": self.truncated,
            "max_tokens": self.max_tokens,
        }


def chat_text(tokenizer, messages: list[dict], template: str | None = None) -> str:
    """The chat template (`template`, else the tokenizer's), or plain "role: content" lines when
    there is none."""
    if template or getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def instruction_of(messages: list[dict]) -> str:
    """The text a chat request is routed on and answered by a task adapter: the last user turn."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return users[-1] if users else messages[-1]["content"]


def render_chat(templates: dict, tokenizer, messages: list[dict], adapter: str) -> tuple[str, bool]:
    """The chat prompt for `adapter` (BASE, a task adapter, `_mixed` or `auto`) and whether the
    tokenizer should add its special tokens (not after a chat template, which has them)."""
    chat = templates.get("chat")  # True: the model's own template; text: the store's override
    if adapter == BASE or chat:
        override = chat if isinstance(chat, str) and adapter != BASE else None
        return chat_text(tokenizer, messages, override), False
    return templates["prompt"].format(instruction=instruction_of(messages)), True


def encode(tokenizer, text: str, special: bool = True, limit: int | None = None, keep_end: bool = False):
    """(ids, exact). A text far longer than `limit` tokens is tokenised only in part, its start
    (or its end with `keep_end`), enough to show it is over the limit: a 10 MB prompt costs
    milliseconds, not seconds. `exact` is False when `ids` are such a part."""
    window = 32 * (limit + 2) if limit is not None else None
    if window is None or len(text) <= window:
        return tokenizer(text, add_special_tokens=special)["input_ids"], True
    part = text[-window:] if keep_end else text[:window]
    ids = tokenizer(part, add_special_tokens=special)["input_ids"]
    if len(ids) > limit + 2:  # over the limit whatever the cut did to the boundary token
        return (ids[1:] if keep_end else ids), False
    return tokenizer(text, add_special_tokens=special)["input_ids"], True


def context_length(model, override: int | None = None) -> int:
    """The model's context window (positions), or `override` when that is smaller."""
    cfg = getattr(model, "config", None)
    n = None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            n = value
            break
    if override is not None:
        return min(override, n) if n else override
    return n or 2048


def too_long(context: int, prompt: int, completion: int | None, where: str, exact: bool = True) -> str:
    """OpenAI's wording of a context-length refusal."""
    p = f"{prompt}" if exact else f"at least {prompt}"
    if completion is None:
        return (
            f"This model's maximum context length is {context} tokens. However, your {where} "
            f"resulted in {p} tokens. Please reduce the length of the {where}."
        )
    total = f"{prompt + completion}" if exact else f"at least {prompt + completion}"
    return (
        f"This model's maximum context length is {context} tokens. However, you requested {total} "
        f"tokens ({p} in the {where}, {completion} in the completion). Please reduce the length of "
        f"the {where} or completion."
    )


def fit_context(
    prompt_ids: list[int],
    context: int,
    max_tokens: int | None,
    default_max_tokens: int,
    truncate: bool | int = False,
    *,
    param: str = "prompt",
    exact: bool = True,
) -> Fit:
    """Apply the context policy to a prompt of `len(prompt_ids)` tokens.

    `truncate`: False refuses what does not fit; True keeps the prompt's last tokens that fit;
    an int k first keeps the last k tokens (vLLM's `truncate_prompt_tokens`), then checks.
    `max_tokens` None means the server default, clamped to what fits. Raises PromptError."""
    where = "messages" if param == "messages" else "prompt"
    sent = len(prompt_ids)
    if sent == 0:
        raise PromptError(f"the {where} is empty: it has no tokens", param, "empty_prompt")
    ids = list(prompt_ids)
    if not isinstance(truncate, bool) and truncate > 0:
        ids = ids[-truncate:]
    room = context - len(ids)
    if max_tokens is None:
        if room >= 1:
            new = min(default_max_tokens, room)
            return Fit(ids, new, sent, sent - len(ids), clamped=new < default_max_tokens)
        if truncate is True and context > 1:
            new = min(default_max_tokens, context - 1)
            kept = ids[-(context - new) :]
            return Fit(kept, new, sent, sent - len(kept))
        raise PromptError(too_long(context, len(ids), None, where, exact), param, "context_length_exceeded")
    if room >= max_tokens:
        return Fit(ids, max_tokens, sent, sent - len(ids))
    if truncate is True and context - max_tokens >= 1:
        kept = ids[-(context - max_tokens) :]
        return Fit(kept, max_tokens, sent, sent - len(kept))
    raise PromptError(too_long(context, len(ids), max_tokens, where, exact), param, "context_length_exceeded")
