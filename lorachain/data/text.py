"""Text rows: `str.format` prompt and target templates, label words (verbalizers), token ids."""

from __future__ import annotations

import string
from typing import Any

from lorachain.config import DataConfig
from lorachain.data.rows import DataError, Example


def template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def render(template: str, row: dict[str, Any], where: str) -> str:
    for name in template_fields(template):
        if name not in row or row[name] is None:
            raise DataError(f"{where}: missing field {name!r} (used by template {template!r})")
    return template.format(**row)


def candidates(cfg: DataConfig) -> list[str] | None:
    """The target text of every label, in label_words order (None without label_words)."""
    if cfg.label_words is None:
        return None
    return [(cfg.target or "{label}").format(label=w) for w in cfg.label_words.values()]


def candidate_ids(cfg: DataConfig, tokenizer: Any) -> list[list[int]] | None:
    """Token ids of every label's target text (None without label_words)."""
    texts = candidates(cfg)
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts] if texts else None


def row_label(cfg: DataConfig, row: dict[str, Any], where: str) -> int:
    assert cfg.label_words is not None and cfg.label_field is not None
    if cfg.label_field not in row:
        raise DataError(f"{where}: missing field {cfg.label_field!r} (data.label_field)")
    value = row[cfg.label_field]
    key = str(value).lower() if isinstance(value, bool) else str(value)
    keys = list(cfg.label_words)
    if key not in keys:
        raise DataError(f"{where}: field {cfg.label_field!r} is {value!r}; expected one of {keys}")
    return keys.index(key)


def prompt_ids(
    cfg: DataConfig, tokenizer: Any, row: dict[str, Any], reserve: int = 0, where: str = "request"
) -> list[int]:
    """Token ids of the rendered prompt alone, cut from the left to leave `reserve` tokens."""
    ids = tokenizer(render(cfg.prompt, row, where))["input_ids"]
    return ids[-max(1, cfg.max_length - reserve) :]


def encode_text_row(
    cfg: DataConfig, tokenizer: Any, row: dict[str, Any], where: str, classifier: bool
) -> Example:
    """One row -> token ids and labels, truncating the prompt from the left to fit max_length."""
    prompt = render(cfg.prompt, row, where)
    label = row_label(cfg, row, where) if cfg.label_words is not None else None
    prompt_ids = tokenizer(prompt)["input_ids"]
    if classifier:
        if label is None:
            raise DataError(f"{where}: a classifier needs data.label_words")
        ids = prompt_ids[: cfg.max_length]
        return Example(ids, [label], label, len(ids))
    if cfg.target is None:
        ids = prompt_ids[: cfg.max_length]
        return Example(ids, list(ids), label, 0)
    if label is not None:
        target = (candidates(cfg) or [])[label]
    else:
        target = render(cfg.target, row, where)
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if cfg.eos and cfg.label_words is None and tokenizer.eos_token_id is not None:
        target_ids = target_ids + [tokenizer.eos_token_id]
    target_ids = target_ids[: cfg.max_length - 1]
    prompt_ids = prompt_ids[-(cfg.max_length - len(target_ids)) :]
    ids = prompt_ids + target_ids
    return Example(ids, [-100] * len(prompt_ids) + target_ids, label, len(prompt_ids))
