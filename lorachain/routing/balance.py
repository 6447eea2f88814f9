"""Which rows of a labelled instruction set a selector learns from (`data.balance`). Pure, seeded.

Balancing by data set alone gives a task type with many data sets most of the rows (T0: multiple-
choice QA has 9 of 29 data sets, so 9/29 of the rows, and unseen instructions drift to it);
`task_then_dataset` gives every task type the same number of rows, spread evenly over its data sets.

- `none`: every row.
- `task`: up to `max_per_task` rows of every task type, drawn at random (unset: every row).
- `dataset`: up to `max_per_dataset` rows of every data set.
- `task_then_dataset`: up to `max_per_task` rows of every task type, shared as evenly as possible
  among its data sets; a data set with too few rows gives what it lacks to the others of its type.

Unset, the cap of `dataset` and `task_then_dataset` is the median group's row count (the upper
median), so that one tiny task or data set does not cut every other to its size.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable

BALANCES = ("none", "task", "dataset", "task_then_dataset")


def even_shares(sizes: list[int], quota: int) -> list[int]:
    """How many of `quota` rows each of the groups of `sizes` gives: equal shares, a group with
    fewer rows gives all it has and the rest is shared among the others (water-filling)."""
    take, left, open_ = [0] * len(sizes), min(quota, sum(sizes)), list(range(len(sizes)))
    while left > 0 and open_:
        share, extra = divmod(left, len(open_))
        for k, i in enumerate(list(open_)):
            got = min(sizes[i] - take[i], share + (1 if k < extra else 0))
            take[i] += got
            left -= got
        open_ = [i for i in open_ if take[i] < sizes[i]]
    return take


def median(sizes: list[int]) -> int:
    return sorted(sizes)[len(sizes) // 2]


def balance_rows(
    rows: list,
    mode: str = "task_then_dataset",
    max_per_task: int | None = None,
    max_per_dataset: int | None = None,
    seed: int = 0,
    task: Callable = lambda r: r.task,
    dataset: Callable = lambda r: r.dataset,
) -> list:
    """The rows `mode` keeps (see the module docstring), grouped by task type, data sets sorted."""
    if mode not in BALANCES:
        raise ValueError(f"balance: expected one of {BALANCES}, got {mode!r}")
    if mode == "none":
        return list(rows)
    nested: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        nested[task(r)][dataset(r)].append(r)
    rng, out = random.Random(seed), []
    groups = {
        t: {d: rng.sample(g, len(g)) for d, g in sorted(ds.items())} for t, ds in sorted(nested.items())
    }
    if mode == "task":
        for ds in groups.values():
            pool = rng.sample([r for g in ds.values() for r in g], sum(map(len, ds.values())))
            out += pool[:max_per_task] if max_per_task else pool
        return out
    if mode == "dataset":
        cap = max_per_dataset or median([len(g) for ds in groups.values() for g in ds.values()])
        return [r for ds in groups.values() for g in ds.values() for r in g[:cap]]
    quota = max_per_task or median([sum(map(len, ds.values())) for ds in groups.values()])
    for ds in groups.values():
        takes = even_shares([len(g) for g in ds.values()], quota)
        out += [r for g, n in zip(ds.values(), takes, strict=True) for r in g[:n]]
    return out
