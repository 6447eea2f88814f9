"""Labelled instruction data for task routing: read, check by line, split per task.

Imports no model code. Rows with a missing field or an empty label are reported by file and line.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from lorachain.data import DataError, read_rows
from lorachain.routing.balance import balance_rows


@dataclass
class InstructionRow:
    line: int
    instruction: str  # instruction, with the optional input appended (chat: what the selector reads)
    output: str
    task: str
    messages: list[dict] | None = None  # chat rows: the whole conversation
    dataset: str = ""  # the source data set (`data.dataset_field`; empty: not given)


def read_chat_rows(
    path: str | Path,
    task: str = "task",
    messages_field: str | None = None,
    selector_input: str = "system_last_user",
    rejected: list[str] | None = None,
    dataset: str = "dataset",
) -> list[InstructionRow]:
    """Chat rows (OpenAI messages / ShareGPT conversations) with a task label. A bad
    conversation or a missing label is an error, or skipped and listed in `rejected`."""
    from lorachain.data.chat import BadRow, parse_messages, selector_text

    out, problems = [], []
    for line, row in read_rows(path):
        try:
            messages = parse_messages(row, messages_field)
            if row.get(task) in (None, ""):
                raise BadRow(f"missing or empty field {task!r}")
        except BadRow as e:
            problems.append(f"line {line}: {e}")
            continue
        text = selector_text(messages, selector_input)
        label, source = str(row[task]).strip(), str(row.get(dataset) or "")
        out.append(InstructionRow(line, text, messages[-1]["content"], label, messages, source))
    return _checked(Path(path), out, problems, rejected)


def read_instruction_rows(
    path: str | Path,
    instruction: str = "instruction",
    output: str = "output",
    task: str = "task",
    input_field: str | None = None,
    rejected: list[str] | None = None,
    dataset: str = "dataset",
) -> list[InstructionRow]:
    """Rows of a JSONL, JSON, CSV or Parquet file. A row with a missing or empty field is an
    error, or, when a `rejected` list is given, is skipped and described there by line."""
    p = Path(path)
    if p.suffix.lower() == ".parquet":
        rows = _read_parquet(p)
    else:
        rows = read_rows(p)
    out, problems = [], []
    for line, row in rows:
        missing = [f for f in (instruction, output, task) if row.get(f) in (None, "")]
        if missing:
            problems.append(f"line {line}: missing or empty field {missing[0]!r}")
            continue
        text = str(row[instruction])
        if input_field and row.get(input_field):
            text = f"{text}\n{row[input_field]}"
        source = str(row.get(dataset) or "")
        out.append(InstructionRow(line, text, str(row[output]), str(row[task]).strip(), dataset=source))
    return _checked(p, out, problems, rejected)


def _checked(p: Path, out: list, problems: list[str], rejected: list[str] | None) -> list[InstructionRow]:
    if problems and rejected is not None:
        rejected += [f"{p}: {x}" for x in problems]
    elif problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{p}: {problems[0]}{more}")
    if not out:
        raise DataError(f"{p}: no rows")
    return out


def _read_parquet(p: Path) -> list[tuple[int, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{p}: reading Parquet needs pyarrow (pip install pyarrow)") from None
    return [(i + 1, row) for i, row in enumerate(pq.read_table(p).to_pylist())]


def stratified_split(
    rows: list[InstructionRow],
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    max_per_task: int | None = None,
    balance: str = "task",
    max_per_dataset: int | None = None,
) -> dict[str, list[InstructionRow]]:
    """Per-task shuffled split into train/val/test by `fractions` (the paper's 60/20/20) of the
    rows `balance` keeps (`lorachain.routing.balance`: `task` with `max_per_task` subsamples each
    task to that many rows; `task_then_dataset` spreads them evenly over each task's data sets)."""
    if abs(sum(fractions) - 1) > 1e-6:
        raise DataError(f"split fractions {fractions} must add up to 1")
    by_task: dict[str, list[InstructionRow]] = defaultdict(list)
    for r in balance_rows(rows, balance, max_per_task, max_per_dataset, seed):
        by_task[r.task].append(r)
    rng = random.Random(seed)
    split: dict[str, list[InstructionRow]] = {"train": [], "val": [], "test": []}
    for task in sorted(by_task):
        group = list(by_task[task])
        rng.shuffle(group)
        n_train = round(fractions[0] * len(group))
        n_val = round(fractions[1] * len(group))
        split["train"] += group[:n_train]
        split["val"] += group[n_train : n_train + n_val]
        split["test"] += group[n_train + n_val :]
    return split
