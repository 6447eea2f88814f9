"""A data file as tokenized Examples: text rows or chat rows, bad rows named or skipped, and the
check that the rows give the loss something to learn."""

from __future__ import annotations

import sys
from typing import Any

from lorachain.config import DataConfig
from lorachain.data.chat import encode_rows, messages_field
from lorachain.data.rows import DataError, Example, read_rows
from lorachain.data.text import candidate_ids, candidates, encode_text_row


def encode_row(cfg: DataConfig, tokenizer: Any, row: dict[str, Any], where: str, classifier: bool) -> Example:
    """One row -> token ids and labels (a chat row through the chat template when data.format is chat)."""
    if cfg.format == "chat":
        return encode_rows(cfg, tokenizer)(row, where)
    return encode_text_row(cfg, tokenizer, row, where, classifier)


def is_chat(cfg: DataConfig, rows: list[tuple[int, dict[str, Any]]]) -> bool:
    """Whether rows are conversations: `data.format`, or with `auto` the first row's fields."""
    if cfg.format != "auto":
        return cfg.format == "chat"
    return bool(rows) and messages_field(rows[0][1], cfg.messages_field) is not None


def load_examples(
    path: str,
    cfg: DataConfig,
    tokenizer: Any,
    classifier: bool,
    limit: int | None = None,
    rejected: list[str] | None = None,
) -> list[Example]:
    """Every row of `path` as an Example (prompt/target rows, or chat rows). A bad row fails with
    its file, line and reason; with `data.on_bad_rows: skip` it is skipped, listed on stderr and
    appended to `rejected`."""
    rows = read_rows(path)[:limit] if limit else read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    if is_chat(cfg, rows):
        if classifier:
            raise DataError("data.format: chat rows need a causal LM (model.task: causal_lm)")
        encode = encode_rows(cfg, tokenizer)
    else:

        def encode(row: dict[str, Any], where: str) -> Example:
            return encode_row(cfg, tokenizer, row, where, classifier)

    out, skipped = [], []
    for i, row in rows:
        where = f"{path}: line {i}"
        try:
            out.append(encode(row, where))
        except DataError as e:
            if cfg.on_bad_rows == "error":
                raise
            skipped.append(str(e))
    if skipped:
        print("".join(f"[lorachain] skipped {x}\n" for x in skipped), end="", file=sys.stderr)
        print(f"[lorachain] {path}: skipped {len(skipped)} of {len(rows)} rows", file=sys.stderr)
        if rejected is not None:
            rejected += skipped
    if not out:
        raise DataError(f"{path}: no usable rows (all {len(rows)} skipped)")
    return out


def check_targets(
    examples: list[Example], cfg: DataConfig, tokenizer: Any, classifier: bool, path: str
) -> int:
    """Refuse, before any training, data whose rows give the LM loss no target token (a label word
    or target that tokenises to nothing); warn about the rows that give none. Returns their count."""
    if classifier:
        return 0
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    for key, ids in zip(cfg.label_words or {}, candidate_ids(cfg, tokenizer) or [], strict=True):
        if not ids:
            text = (candidates(cfg) or [])[list(cfg.label_words or {}).index(key)]
            raise DataError(
                f"data.label_words[{key!r}]: {text!r} tokenises to no tokens with tokenizer {name!r}"
            )
    empty = sum(1 for e in examples if all(y == -100 for y in e.labels[1:]))
    if empty == len(examples):
        raise DataError(
            f"{path}: no row yields a target token to train on with tokenizer {name!r} "
            f"(data.target {cfg.target!r}: empty targets, or prompts filling data.max_length "
            f"{cfg.max_length})"
        )
    if empty:
        print(f"[lorachain] {path}: {empty} of {len(examples)} rows have no target token", file=sys.stderr)
    return empty
