"""`selector.other_datasets`: an explicit `other` label, so the selector itself sends an instruction
from an unfamiliar source to the mixed adapter (issue 43).

`other_datasets: K` holds back K data sets of every task type that has more than K in the store's
rows (chosen by a seeded shuffle of their names). Their rows train no task adapter (they are left out
of `splits/by_task/`); the mixed adapter still learns from them. The selector learns them labelled
`other`, beside every row of a task type the store does not have (the file's types outside
`data.tasks`, when it is set). The store's rows are what is left after `data.exclude_datasets`, so a
fold store's held-out data sets (`lorachain route folds`) never become `other` rows. A selector
naming `other` has no task adapter to route to, so the store's fallback (the mixed adapter)
answers (`routing.select.decide`).

The selector reads its own splits, `splits/selector/{train,val}.jsonl`: the task rows not held back,
the `other` rows (at most as many as the largest task type has, seeded), and with `selector.augment`
re-templated copies of the training rows (`routing.augment`). Encoder and embedding kinds only.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from lorachain.data import DataError
from lorachain.routing.augment import augment_rows

OTHER = "other"
SELECTOR_SPLITS = ("splits", "selector")  # STORE/splits/selector/{train,val}.jsonl


def selector_splits_dir(root: Path) -> Path:
    """Where the selector of the store at `root` reads its train/val rows: its own splits when
    `route train` wrote them (`other`, `augment`), else the store's splits."""
    own = root.joinpath(*SELECTOR_SPLITS)
    return own if (own / "train.jsonl").is_file() else root / "splits"


def needs_own_splits(sel) -> bool:
    return bool(sel.other_datasets or sel.augment)


def held_back_datasets(rows: list, k: int, seed: int, where: str = "data") -> list[str]:
    """K data sets of each task type that has more than K among `rows` (the store's rows, after
    `data.exclude_datasets`), sorted; a row without a data set is an error."""
    if k <= 0:
        return []
    by_task: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        if not r.dataset:
            raise DataError(
                f"{where}: selector.other_datasets needs a data set on every row (row of line {r.line})"
            )
        by_task[r.task].add(r.dataset)
    held = []
    for task, names in sorted(by_task.items()):
        if len(names) > k:
            order = sorted(names)
            random.Random(f"{seed}:{task}").shuffle(order)
            held += order[:k]
    if not held:
        raise DataError(f"{where}: selector.other_datasets={k}: no task type has more than {k} data sets")
    return sorted(held)


def selector_splits(
    split: dict, held: list[str], sel, seed: int, foreign: list | None = None
) -> tuple[dict, int]:
    """The selector's {"train", "val"} rows and how many copies augmentation added: the store's
    `split` with rows of `held` data sets and `foreign` rows (types the store has no adapter for;
    every fifth to val) relabelled `other` (at most as many, per part, as the largest task type
    has), then `selector.augment` copies of the training rows."""
    out, added = {}, 0
    for i, part in enumerate(("train", "val")):
        own = [r for r in split[part] if r.dataset not in set(held)]
        other = [replace(r, task=OTHER) for r in split[part] if r.dataset in set(held)]
        other += [replace(r, task=OTHER) for j, r in enumerate(foreign or []) if (j % 5 == 4) == (i == 1)]
        counts = defaultdict(int)
        for r in own:
            counts[r.task] += 1
        cap = max(counts.values(), default=0)
        if len(other) > cap:
            other = random.Random(seed).sample(other, cap)
        rows = own + other
        if part == "train" and sel.augment:
            rows = augment_rows(rows, sel.augment, sel.augment_styles, seed)
            added = len(rows) - len(own) - len(other)
        out[part] = rows
    return out, added


def selector_labels(labels: list[str], parts: dict) -> list[str]:
    """The store's task labels, and `other` last when the selector's rows have it."""
    return [*labels, OTHER] if any(r.task == OTHER for r in parts["train"]) else list(labels)


def record(parts: dict, added: int, held: list[str], sel, foreign_tasks: list[str]) -> dict:
    """What the manifest's selector entry records of the selector's own rows."""
    got = {}
    if sel.other_datasets:
        n = sum(r.task == OTHER for r in parts["train"])  # augmented copies of `other` rows included
        got["other"] = {"label": OTHER, "datasets": held, "foreign_tasks": foreign_tasks, "train_rows": n}
    if sel.augment:
        got["augment"] = {"copies": sel.augment, "styles": list(sel.augment_styles), "added_rows": added}
    return got
