"""Rows from JSONL/JSON/CSV files turned into tokenized examples and padded batches.

Imports no model code. A bad row fails with one line naming the file, the line and the field.
"""

from __future__ import annotations

import csv
import io
import json
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lorachain.config import DataConfig


class DataError(ValueError):
    """A data file or row is malformed; the message names the file, line and field."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # LM labels (-100 where no loss) or [class index] for classifiers
    label: int | None = None  # index into the candidates, when the data has label_words
    prompt_len: int = 0


def _text(p: Path) -> str:
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{p}: line {line}: not UTF-8 text (byte {e.start})") from None


def read_parquet(p: Path) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a Parquet file (needs pyarrow), numbered from 1."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{p}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    try:
        table = pq.read_table(p)
    except Exception as e:  # pyarrow's errors for a broken file
        raise DataError(f"{p}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    return [(i + 1, row) for i, row in enumerate(table.to_pylist())]


def _jsonl_rows(p: Path, body: str) -> list[tuple[int, Any]]:
    rows = []
    for i, line in enumerate(body.split("\n"), 1):  # not splitlines: U+2028 is text
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: line {i}: not valid JSON ({e.msg})") from None
    return rows


def read_rows(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a JSONL, JSON (list of objects), CSV (UTF-8) or Parquet file, each with its 1-based
    line (row) number."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: data file not found")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        return read_parquet(p)
    body = _text(p)
    if suffix == ".csv":
        try:
            reader = csv.DictReader(io.StringIO(body, newline=""))
            return [(reader.line_num, dict(row)) for row in reader]
        except csv.Error as e:
            raise DataError(f"{p}: not valid CSV ({e})") from None
    if suffix == ".json":
        try:
            data = json.loads(body)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}: line {e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON list of objects")
        rows = list(enumerate(data, 1))
    else:
        rows = _jsonl_rows(p, body)
    for i, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{p}: line {i}: expected an object with fields, got {type(row).__name__}")
    return rows


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


def encode_row(cfg: DataConfig, tokenizer: Any, row: dict[str, Any], where: str, classifier: bool) -> Example:
    """One row -> token ids and labels, truncating the prompt from the left to fit max_length."""
    if cfg.format == "chat":
        from lorachain.chat import encode_row as encode_chat_row

        return encode_chat_row(cfg, tokenizer, row, where)
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


def is_chat(cfg: DataConfig, rows: list[tuple[int, dict[str, Any]]]) -> bool:
    """Whether rows are conversations: `data.format`, or with `auto` the first row's fields."""
    if cfg.format != "auto":
        return cfg.format == "chat"
    from lorachain.chat import messages_field

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
        from lorachain.chat import encode_rows

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
        import sys

        print("".join(f"[lorachain] skipped {x}\n" for x in skipped), end="", file=sys.stderr)
        print(f"[lorachain] {path}: skipped {len(skipped)} of {len(rows)} rows", file=sys.stderr)
        if rejected is not None:
            rejected += skipped
    if not out:
        raise DataError(f"{path}: no usable rows (all {len(rows)} skipped)")
    return out


def collate(examples: list[Example], pad_id: int, classifier: bool) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into tensors: input_ids, attention_mask, labels (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        if not classifier:
            labels[i, :n] = torch.tensor(e.labels)
    batch = {"input_ids": ids, "attention_mask": mask}
    batch["labels"] = torch.tensor([e.labels[0] for e in examples]) if classifier else labels
    return batch


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int) -> int:
    return max(1, -(-n_examples // (batch_size * grad_accum)))


def batch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch; a pure function of (seed, epoch) for resume."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batches(
    examples: list[Example], step: int, batch_size: int, grad_accum: int, seed: int
) -> Iterator[list[Example]]:
    """The micro-batches of optimizer step `step` (0-based), wrapping over epochs."""
    n = len(examples)
    per_step = batch_size * grad_accum
    spe = steps_per_epoch(n, batch_size, grad_accum)
    epoch, pos = divmod(step, spe)
    order = batch_order(n, seed, epoch)
    idx = order[pos * per_step : (pos + 1) * per_step]
    for k in range(0, len(idx), batch_size):
        yield [examples[i] for i in idx[k : k + batch_size]]


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
        import sys

        print(f"[lorachain] {path}: {empty} of {len(examples)} rows have no target token", file=sys.stderr)
    return empty
