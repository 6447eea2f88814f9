"""Rows from JSONL, JSON, CSV and Parquet files, and the Example they become.

A bad file or row fails with one line naming the file, the line and the field.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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
