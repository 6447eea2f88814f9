"""The paper's sampling protocol (after MeZO): 1000 train / 500 validation / 1000 test per task."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from lorachain.tasks import TaskExample


@dataclass
class Splits:
    train: list[TaskExample]
    val: list[TaskExample]
    test: list[TaskExample]
    counts: dict = field(default_factory=dict)


def sample_splits(
    train_pool: list[TaskExample],
    official_val: list[TaskExample],
    seed: int = 0,
    n_train: int = 1000,
    n_val: int = 500,
    n_test: int = 1000,
) -> Splits:
    """Train and validation from the train split, test from the official validation split, fewer
    when a split is smaller. Where the train split cannot fill train + validation (BoolQ, ReCoRD
    here), the rest comes from official-validation rows not used for test, and `counts` says so;
    if even that is short, train and validation keep their 2:1 ratio."""
    rng = random.Random(seed)
    pool = list(train_pool)
    rng.shuffle(pool)
    held = list(official_val)
    rng.shuffle(held)
    test, spare = held[:n_test], held[n_test:]
    short = max(0, n_train + n_val - len(pool))
    borrowed = spare[:short]
    pool = pool + borrowed
    if len(pool) < n_train + n_val:  # still short: keep the 2:1 ratio of train to validation
        n_train = round(len(pool) * n_train / (n_train + n_val))
    train, val = pool[:n_train], pool[n_train : n_train + n_val]
    counts = {
        "train": len(train),
        "val": len(val),
        "test": len(test),
        "borrowed_from_validation": len(borrowed),
    }
    return Splits(train, val, test, counts)


# Where each built-in task's (train, test) files are under a folder laid out like shared/data;
# test is the official validation split. One file for both: the splits are drawn from it disjointly.
PATHS = {
    "sst2": ("sst2/train.jsonl", "sst2/val.jsonl"),
    **{
        name.lower(): (f"superglue/{name}/train.jsonl", f"superglue/{name}/val.jsonl")
        for name in ("CB", "RTE", "WSC", "COPA", "WiC", "BoolQ", "MultiRC", "ReCoRD")
    },
    "squad": ("squad/xquad.en.json", "squad/xquad.en.json"),
    "drop": ("drop/drop_dataset_train_300_annotations.json", "drop/drop_dataset_train_300_annotations.json"),
    "gsm8k": ("gsm8k/train.jsonl", "gsm8k/test.jsonl"),
}
