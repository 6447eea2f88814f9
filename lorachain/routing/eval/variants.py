"""Selector variants of a trained store, scored beside its own options (issue 43, "do no harm").

`selector.other_datasets` (`routing.other`) and `selector.augment` (`routing.augment`) change only
what the selector learns from, so a fold store (`lorachain route folds`) need not be trained again to
measure them: each variant fits the store's selector kind (encoder or embedding; a store of another
kind gets an encoder) once more with those settings, on the store's own train/val rows, in
`STORE/variants/<name>/`, and its decisions (with the store's fallback for `other`) become one more
option of `compare.compare`. The store's rows already leave out its `data.exclude_datasets` (a fold's
held-out data sets), so neither the held-back `other` data sets nor any augmented row come from them.

One difference from a store trained with the setting: the variant shares the store's adapters, which
learned from the data sets it holds back as `other` (`route train` leaves them out of the task
adapters). On a fold's held-out rows that changes no decision of the selector, only how good the
adapters it routes to are.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

from lorachain.config import ConfigError
from lorachain.io import write_json
from lorachain.routing.data import InstructionRow
from lorachain.routing.eval.unseen import store_config
from lorachain.routing.selectors import get_kind, read_split
from lorachain.routing.train import write_selector_splits
from lorachain.store import StoreError, read_manifest, verify_selector

# name -> selector settings; `lorachain route folds --compare --variants other,augmented`
VARIANTS = {
    "other": {"other_datasets": 1},
    "augmented": {"augment": 2},
    "other_augmented": {"other_datasets": 1, "augment": 2},
}
OWN_KINDS = ("encoder", "embedding")


def variant_names(text: str) -> list[str]:
    """Variant names from a comma list (`none` or empty: no variant); an unknown name is an error."""
    names = [x.strip() for x in text.split(",") if x.strip() and x.strip() != "none"]
    bad = [x for x in names if x not in VARIANTS]
    if bad:
        raise ConfigError(f"--variants: unknown variant {bad[0]!r}; known: {sorted(VARIANTS)} or none")
    return names


def variant_config(store: Path, settings: dict):
    """The store's route config with the variant's selector settings (and no second opinion)."""
    cfg = store_config(store)
    kind = cfg.selector.kind if cfg.selector.kind in OWN_KINDS else "encoder"
    sel = dataclasses.replace(cfg.selector, kind=kind, second_opinion=None, gate="none", **settings)
    return dataclasses.replace(cfg, selector=sel, output_dir=str(store / "variants"))


def _rows(store: Path, part: str) -> list[InstructionRow]:
    return [
        InstructionRow(
            r["line"], r["instruction"], r["output"], r["task"], r.get("messages"), r.get("dataset", "")
        )
        for r in read_split(store, part)
    ]


def fit_variant(store: str | Path, name: str, settings: dict | None = None, progress: bool = False) -> dict:
    """Fit variant `name` of the store (VARIANTS' settings unless given) in STORE/variants/<name>/;
    its record (settings, selector entry, held-back data sets). A finished fit with the same
    settings and intact files is reused."""
    store = Path(store)
    settings = VARIANTS[name] if settings is None else settings
    folder = store / "variants" / name
    done = folder / "variant.json"
    if done.is_file():
        got = json.loads(done.read_text())
        if got.get("settings") == settings:
            try:
                verify_selector(folder, SimpleNamespace(selector=got["entry"]))
                return got
            except StoreError:
                pass  # changed or partial: fit again
    cfg = variant_config(store, settings)
    split = {part: _rows(store, part) for part in ("train", "val", "test")}
    labels = read_manifest(store).labels
    sel_labels, kept, held = write_selector_splits(cfg, folder, split, labels)
    entry = get_kind(cfg.selector.kind).fit(cfg, folder, sel_labels, None, None, progress)
    if not entry:
        raise SystemExit(130)  # interrupted: a rerun fits it again
    got = {"name": name, "settings": settings, "entry": entry | kept, "held_back": held}
    write_json(done, got)
    return got


def variant_choices(router, store: str | Path, name: str, rows: list[dict]) -> list[str]:
    """The adapter each row gets when variant `name`'s selector replaces the store's (no second
    opinion, no gate; `other`, like a label without an adapter, goes to the store's fallback)."""
    from lorachain.routing.eval.compare import select_all

    folder = Path(store) / "variants" / name
    entry = json.loads((folder / "variant.json").read_text())["entry"]
    view = SimpleNamespace(root=folder, labels=router.labels)
    fn = get_kind(entry["kind"]).load(view, verify_selector(folder, SimpleNamespace(selector=entry)), entry)
    keep = (router.selector_fn, router.second_fn, router.min_in_distribution, router.min_second)
    router.selector_fn, router.second_fn, router.min_second = fn, None, None
    router.min_in_distribution = (entry.get("calibration") or {}).get("threshold")
    try:
        return [s.adapter for s in select_all(router, rows)]
    finally:
        router.selector_fn, router.second_fn, router.min_in_distribution, router.min_second = keep
