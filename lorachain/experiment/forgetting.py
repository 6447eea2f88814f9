"""What a trained cell forgot of what the base could do (issue 24; Biderman et al., *LoRA Learns
Less and Forgets Less*): the reference answers' NLL per token on a fixed held-out general set (rows of
T0 task types the grid does not train on), and the score of one unrelated task. The base model's
figures are measured once per grid (`base_forgetting.json`), so each cell reports its change."""

from __future__ import annotations

import json
import random
from pathlib import Path

from lorachain.data import DataError, read_rows
from lorachain.io import write_json
from lorachain.models import device_of
from lorachain.tasks import TaskExample, get_task
from lorachain.training.evaluate import reference_nll
from lorachain.training.precision import resolve


def general_examples(path: str | Path, task_types: list[str], n: int, seed: int = 0) -> list[TaskExample]:
    """`n` rows of the instruction mixture whose `task` is one of `task_types`, drawn evenly over the
    types with a fixed seed (the same rows for every cell), as prompt + reference answer."""
    by_type: dict[str, list[TaskExample]] = {t: [] for t in task_types}
    for i, row in read_rows(path):
        if row.get("task") in by_type:
            if not isinstance(row.get("instruction"), str) or not isinstance(row.get("output"), str):
                raise DataError(f"{path}: line {i}: expected string fields 'instruction' and 'output'")
            by_type[row["task"]].append(
                TaskExample(row["instruction"].strip() + "\n", answers=[" " + row["output"]])
            )
    empty = [t for t, rows in by_type.items() if not rows]
    if empty:
        raise DataError(
            f"{path}: no rows of task type {empty}; forgetting.general_tasks names types of its `task`"
        )
    rng = random.Random(seed)
    out = []
    for t in task_types:
        rows = by_type[t]
        out += rng.sample(rows, min(len(rows), -(-n // len(task_types))))
    return out[:n]


def measure(runner, model, precision: str) -> dict:
    """The forgetting figures of `model` under the grid's settings (runner: experiment.Runner)."""
    cfg, f = runner.cfg, runner.cfg.forgetting
    out: dict = {}
    if f.get("general"):
        examples = runner.general_examples()
        with resolve(precision, device_of(model)).autocast():
            out["general_nll"] = reference_nll(
                model, runner.base()[1], examples, cfg.eval_batch_size, cfg.max_length
            )
        out["general_rows"] = len(examples)
    if f.get("task"):
        task = get_task(f["task"])
        test = runner.splits(f["task"], 0, 0, 0, int(f.get("n_task", 200))).test
        out["task"] = f["task"]
        out["task_score"] = runner.score(model, task, test, cfg.max_length, precision)["score"]
    return out


def base_figures(runner, precision: str) -> dict:
    """The base model's figures, computed once per grid folder and kept in base_forgetting.json."""
    path = runner.out / "base_forgetting.json"
    if path.is_file():
        return json.loads(path.read_text())
    figures = measure(runner, runner.base()[0], precision)
    write_json(path, figures)
    return figures


def change(after: dict, before: dict) -> dict:
    """after − before of each figure both have (NLL up and score down both mean forgetting)."""
    out = {}
    if "general_nll" in after and "general_nll" in before:
        out["general_nll_increase"] = after["general_nll"] - before["general_nll"]
    if "task_score" in after and "task_score" in before:
        out["task_score_drop"] = before["task_score"] - after["task_score"]
    return out
