"""Chat rows: OpenAI `messages` and ShareGPT `conversations`, rendered with a chat template.

A row becomes token ids with labels on the assistant turns only. Each assistant turn's span is
found by rendering the conversation prefix by prefix (the text up to the turn's generation prompt,
then up to the end of the turn) and mapping those character spans onto the tokens of the whole
rendered conversation, so it works for any template that renders earlier turns the same way
whatever follows them (ChatML, Llama 3, Gemma, ...). Imports no model code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lorachain.data.rows import DataError, Example

FIELDS = ("messages", "conversations")  # OpenAI, ShareGPT
ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "tool": "tool",
    "function": "tool",
    "ipython": "tool",
    "observation": "tool",
}


class BadRow(ValueError):
    """A chat row cannot be used; the message is the reason (the caller adds file and line)."""


def messages_field(row: dict[str, Any], field: str | None) -> str | None:
    """The field holding the conversation: `field` if given, else `messages` or `conversations`."""
    if field:
        return field
    return next((f for f in FIELDS if isinstance(row.get(f), list)), None)


def _content(msg: dict, i: int) -> str:
    """A message's text: a string, or OpenAI's list of text parts; tool calls kept as JSON text."""
    raw = msg.get("content", msg.get("value"))
    if isinstance(raw, list):
        parts = []
        for part in raw:
            text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
            if not isinstance(text, str):
                raise BadRow(f"turn {i}: content part {part!r} is not text")
            parts.append(text)
        raw = "".join(parts)
    elif raw is not None and not isinstance(raw, str):
        raise BadRow(f"turn {i}: content should be text, got {type(raw).__name__}")
    text = raw or ""
    if msg.get("tool_calls"):
        text = (text + "\n" if text else "") + json.dumps(msg["tool_calls"], ensure_ascii=False)
    if not text.strip():
        raise BadRow(f"turn {i}: empty content")
    return text


def parse_messages(row: dict[str, Any], field: str | None = None) -> list[dict[str, str]]:
    """The row's conversation as [{"role", "content"}] with roles system/user/assistant/tool,
    checked: known roles, non-empty content, user and assistant alternating, an assistant turn
    at the end. Raises BadRow with the reason."""
    name = messages_field(row, field)
    turns = row.get(name) if name else None
    if not isinstance(turns, list) or not turns:
        want = name or " or ".join(FIELDS)
        raise BadRow(f"field {want!r} should be a non-empty list of messages")
    out = []
    for i, msg in enumerate(turns):
        if not isinstance(msg, dict):
            raise BadRow(f"turn {i}: expected an object, got {type(msg).__name__}")
        raw_role = msg.get("role", msg.get("from"))
        role = ROLES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise BadRow(f"turn {i}: unknown role {raw_role!r}; expected one of {sorted(set(ROLES))}")
        out.append({"role": role, "content": _content(msg, i)})
    check_turns(out)
    return out


def check_turns(messages: list[dict[str, str]]) -> None:
    """Optional system first; then user first, user and assistant alternating (tool turns only
    after an assistant or tool turn); the last turn is the assistant's."""
    prev = None
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "system":
            if i != 0:
                raise BadRow(f"turn {i}: system message after the first turn")
        elif prev in (None, "system") and role != "user":
            raise BadRow(f"turn {i}: conversation starts with {role!r}, expected 'user'")
        elif role == prev and role in ("user", "assistant"):
            raise BadRow(f"turn {i}: two {role!r} turns in a row (alternation broken)")
        elif role == "tool" and prev not in ("assistant", "tool"):
            raise BadRow(f"turn {i}: tool turn after {prev!r}, expected after 'assistant'")
        prev = role
    if "assistant" not in {m["role"] for m in messages}:
        raise BadRow("no assistant turn")
    if prev != "assistant":
        raise BadRow(f"last turn is {prev!r}; a training conversation ends with the assistant")


def chat_template(tokenizer: Any, override: str | None, where: str = "data.chat_template") -> str:
    """The Jinja chat template: `override` (text, or a path to a .jinja file) or the tokenizer's."""
    if override:
        path = Path(override)
        if override.endswith((".jinja", ".j2")) or (len(override) < 300 and path.is_file()):
            if not path.is_file():
                raise DataError(f"{where}: template file {path} not found")
            return path.read_text()
        return override
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    if not template:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"{where}: the tokenizer of {name!r} has no chat template; set {where}")
    return template


def render(tokenizer: Any, messages: list[dict], template: str, generation_prompt: bool = False) -> str:
    """The conversation as text through `template` (BadRow if the template refuses it)."""
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as e:  # jinja's raise_exception and template errors
        raise BadRow(f"chat template refused the conversation ({type(e).__name__}: {e})") from None


def assistant_spans(tokenizer: Any, messages: list[dict], template: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of every assistant turn: from the end
    of its generation prompt to the end of the turn (end-of-turn marker included, trailing
    whitespace not). BadRow if the template renders a prefix differently from the whole."""
    text = render(tokenizer, messages, template)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], template, generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1], template).rstrip()
        if not text.startswith(before) or not text.startswith(upto) or len(upto) <= len(before):
            raise BadRow(
                f"turn {i}: the chat template renders this turn differently when more turns follow, "
                "so its tokens cannot be found; set data.chat_template to a prefix-stable template"
            )
        spans.append((len(before), len(upto)))
    return text, spans


def tokenize_spans(
    tokenizer: Any, text: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[list[int]]]:
    """Token ids of `text` and, per span, the indices of the tokens overlapping it."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("data.format chat: needs a fast tokenizer (for character offsets)")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    per_span = [[t for t, (s, e) in enumerate(offsets) if e > a and s < b and e > s] for a, b in spans]
    for k, idx in enumerate(per_span):
        if not idx:
            raise BadRow(f"assistant turn {k} has no tokens")
    return list(enc["input_ids"]), per_span


def encode_chat(
    tokenizer: Any,
    messages: list[dict],
    template: str,
    max_length: int,
    train_on: str = "all_assistant",
    on_too_long: str = "truncate",
) -> Example:
    """Token ids and labels of a conversation (labels -100 outside the trained assistant turns).

    Longer than `max_length`: tokens after the last trained one are dropped, then the context is
    cut from the left; the final assistant turn is never cut (BadRow when it cannot fit, or when
    `on_too_long` is `skip`)."""
    text, spans = assistant_spans(tokenizer, messages, template)
    ids, per_span = tokenize_spans(tokenizer, text, spans)
    trained = per_span[-1:] if train_on == "last" else per_span
    labels = [-100] * len(ids)
    for idx in trained:
        for t in idx:
            labels[t] = ids[t]
    start = per_span[-1][0]  # first token of the final assistant turn
    if len(ids) > max_length:
        if on_too_long == "skip":
            raise BadRow(f"too long: {len(ids)} tokens > data.max_length {max_length}")
        end = per_span[-1][-1] + 1
        ids, labels = ids[:end], labels[:end]
        cut = max(0, len(ids) - max_length)
        if cut >= start:  # the context before the final turn, and a token of it, must stay
            raise BadRow(f"too long: the final assistant turn alone needs {end - start + 1} tokens")
        ids, labels, start = ids[cut:], labels[cut:], start - cut
    return Example(ids, labels, None, start)


def generation_ids(
    tokenizer: Any, messages: list[dict], template: str, max_length: int, reserve: int = 0
) -> list[int]:
    """Token ids of a conversation plus the assistant's generation prompt (for answering), cut
    from the left to leave `reserve` tokens of room."""
    text = render(tokenizer, messages, template, generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max(1, max_length - reserve) :]


def encode_rows(cfg: Any, tokenizer: Any):
    """A function `(row, where) -> Example` for the chat rows of DataConfig `cfg`; a bad row
    raises DataError naming `where` (file and line) and the reason."""
    template = chat_template(tokenizer, cfg.chat_template)

    def encode(row: dict[str, Any], where: str) -> Example:
        try:
            messages = parse_messages(row, cfg.messages_field)
            return encode_chat(tokenizer, messages, template, cfg.max_length, cfg.train_on, cfg.on_too_long)
        except BadRow as e:
            raise DataError(f"{where}: {e}") from None

    return encode


SELECTOR_INPUTS = ("system_last_user", "last_user", "all_user")


def selector_text(messages: list[dict], how: str = "system_last_user") -> str:
    """What a task selector reads of a conversation: the system prompt and the last user turn
    (`system_last_user`), the last user turn alone, or every user turn, one per line."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    system = [m["content"] for m in messages if m["role"] == "system"]
    parts = users if how == "all_user" else users[-1:]
    if how == "system_last_user":
        parts = system + parts
    return "\n".join(parts) or messages[-1]["content"]
