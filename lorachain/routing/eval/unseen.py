"""Rows of data sets a store never saw, for `lorachain route eval STORE --unseen`.

A store trained with `data.exclude_datasets` kept those data sets out of every split: the
adapters, the selector and its calibration never saw them. Their rows, read with the store's own
field names, score how routing does on instructions from data sets it was not built from.
"""

from __future__ import annotations

from pathlib import Path

from lorachain.config import load_config
from lorachain.data import DataError
from lorachain.routing.balance import balance_rows
from lorachain.routing.config import RouteConfig
from lorachain.routing.selectors import read_split
from lorachain.routing.train import read_rows_of, row_dict
from lorachain.store import read_manifest


def store_config(store: Path) -> RouteConfig:
    return load_config(store / "route_config.json", cls=RouteConfig)


def trained_datasets(store: Path) -> set[str]:
    """The data sets of the store's own rows (train, val and test splits)."""
    names = {r.get("dataset", "") for part in ("train", "val", "test") for r in read_split(store, part)}
    return names - {""}


def unseen_rows(
    store: str | Path,
    path: str | None = None,
    datasets: list[str] | None = None,
    max_per_task: int | None = None,
) -> list[dict]:
    """Rows of `datasets` (default: the store's `data.exclude_datasets`) from `path` (default: the
    store's data file), as test rows; at most `max_per_task` per task, spread evenly over its data
    sets (seeded). A data set the store trained on, or one no row has, is an error."""
    store = Path(store)
    cfg = store_config(store)
    names = list(datasets or cfg.data.exclude_datasets)
    if not names:
        raise DataError(
            f"{store}: no unseen data sets: the store has no data.exclude_datasets; name them (--datasets)"
        )
    seen = trained_datasets(store) & set(names)
    if seen:
        name = sorted(seen)[0]
        raise DataError(f"{store}: data set {name!r} is in the store's own rows, so it is not unseen")
    file = path or cfg.data.path
    cfg.data.path = file
    rows = [r for r in read_rows_of(cfg, []) if r.dataset in names]
    missing = sorted(set(names) - {r.dataset for r in rows})
    if missing:
        raise DataError(f"{file}: no row has data set {missing[0]!r} (field {cfg.data.dataset_field!r})")
    known = set(read_manifest(store).labels)
    rows = [r for r in rows if r.task in known]
    if not rows:
        raise DataError(f"{file}: no row of {names} has a task the store knows")
    if max_per_task:
        rows = balance_rows(rows, "task_then_dataset", max_per_task, None, cfg.data.seed)
    return [row_dict(r) for r in rows]
