"""Preference rows: a prompt, a chosen and a rejected response, as a Pair of two Examples.

A row is a preference row when it has `chosen` and `rejected` (no data key needed). Text rows are
`{"prompt": ..., "chosen": ..., "rejected": ...}`: the row's `prompt` field is rendered through
`data.prompt` when that template is set, and taken as it is under the template's default
(`{text}`); `data.target` is not used. Chat rows hold messages: `chosen`/`rejected` are the
responses' assistant turns after a `prompt` conversation, or two whole conversations that differ
in their last (assistant) turn. Only the response's tokens are scored. A pair longer than
`data.max_length` loses the start of its prompt (`data.on_too_long: truncate`) or is refused as a
bad row (`skip`); a response is never cut.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from lorachain.config import DataConfig
from lorachain.data.chat import BadRow, chat_template, encode_chat, parse_messages
from lorachain.data.rows import DataError, Example, read_rows
from lorachain.data.text import render

DEFAULT_PROMPT = DataConfig.__dataclass_fields__["prompt"].default  # "{text}"


@dataclass
class Pair:
    """One preference pair; `ref_chosen`/`ref_rejected`: the reference model's summed
    log-probabilities of each response (filled before training)."""

    chosen: Example
    rejected: Example
    ref_chosen: float = 0.0
    ref_rejected: float = 0.0

    @property
    def input_ids(self) -> list[int]:
        """Both sequences end to end: what a pair costs, for token counts and memory estimates."""
        return self.chosen.input_ids + self.rejected.input_ids


def is_preference(row: dict[str, Any]) -> bool:
    return "chosen" in row and "rejected" in row


def _text_pair(cfg: DataConfig, tokenizer: Any, row: dict[str, Any]) -> Pair:
    template = "{prompt}" if cfg.prompt == DEFAULT_PROMPT and "text" not in row else cfg.prompt
    prompt = tokenizer(render(template, row, "row"))["input_ids"]
    responses = []
    for key in ("chosen", "rejected"):
        if not isinstance(row[key], str) or not row[key].strip():
            raise BadRow(f"field {key!r} should be non-empty text")
        ids = tokenizer(row[key], add_special_tokens=False)["input_ids"]
        if cfg.eos and tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        responses.append(ids)
    longest = max(len(r) for r in responses)
    if len(prompt) + longest > cfg.max_length:
        if cfg.on_too_long == "skip" or longest >= cfg.max_length:
            never = " (a response is never cut)" if longest >= cfg.max_length else ""
            raise BadRow(
                f"too long: prompt {len(prompt)} + response {longest} tokens > data.max_length "
                f"{cfg.max_length}{never}"
            )
        prompt = prompt[len(prompt) + longest - cfg.max_length :]  # cut the prompt's start
    chosen, rejected = (Example(prompt + r, [-100] * len(prompt) + r, None, len(prompt)) for r in responses)
    return Pair(chosen, rejected)


def _conversations(row: dict[str, Any]) -> tuple[list[dict], list[dict]]:
    """(chosen, rejected) whole conversations from an explicit `prompt` or a shared prefix."""
    if isinstance(row.get("prompt"), list):
        return row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]
    return row["chosen"], row["rejected"]


def _chat_pair(cfg: DataConfig, tokenizer: Any, row: dict[str, Any], template: str) -> Pair:
    chosen, rejected = (parse_messages({"messages": c}, "messages") for c in _conversations(row))
    if chosen[:-1] != rejected[:-1]:
        raise BadRow("chosen and rejected conversations differ before their last turn")
    pair = [
        encode_chat(tokenizer, conv, template, cfg.max_length, "last", cfg.on_too_long)
        for conv in (chosen, rejected)
    ]
    return Pair(*pair)


def encode_pair(cfg: DataConfig, tokenizer: Any, row: dict[str, Any], template: str | None) -> Pair:
    """One preference row -> a Pair (BadRow naming the reason)."""
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise BadRow(f"a preference row needs 'chosen' and 'rejected'; {key!r} is missing")
    if row["chosen"] == row["rejected"]:
        raise BadRow("chosen equals rejected: the pair prefers nothing")
    if isinstance(row["chosen"], list):
        if template is None:
            raise BadRow("chat preference rows need a chat template (data.chat_template)")
        return _chat_pair(cfg, tokenizer, row, template)
    return _text_pair(cfg, tokenizer, row)


def load_pairs(path: str, cfg: DataConfig, tokenizer: Any, limit: int | None = None) -> list[Pair]:
    """Every row of `path` as a Pair; a bad row fails with its file, line and reason (or, with
    `data.on_bad_rows: skip`, is skipped and listed on stderr)."""
    rows = read_rows(path)[:limit] if limit else read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    chat = any(isinstance(r.get("chosen"), list) for _, r in rows)
    template = chat_template(tokenizer, cfg.chat_template) if chat else None
    out, skipped = [], []
    for i, row in rows:
        try:
            out.append(encode_pair(cfg, tokenizer, row, template))
        except BadRow as e:
            if cfg.on_bad_rows == "error":
                raise DataError(f"{path}: line {i}: {e}") from None
            skipped.append(f"{path}: line {i}: {e}")
        except DataError as e:  # a template field missing from the row
            raise DataError(f"{path}: line {i}: {str(e).removeprefix('row: ')}") from None
    if skipped:
        print("".join(f"[lorachain] skipped {x}\n" for x in skipped), end="", file=sys.stderr)
        print(f"[lorachain] {path}: skipped {len(skipped)} of {len(rows)} rows", file=sys.stderr)
    if not out:
        raise DataError(f"{path}: no usable rows (all {len(rows)} skipped)")
    return out
