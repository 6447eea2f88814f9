"""`selector.second_opinion`: a second kind fitted beside the store's selector.

An instruction is routed only when both kinds name the same task and either is sure by its own
threshold (`agree_either` of routing.eval.agreement, measured on unseen data sets in
results/routing_holdout/). The second kind is fitted in `second_opinion/` of the store on the same
splits. A kind without a threshold of its own (encoder, full) gets one here: it is fitted once more
without one data set of every task type that has another (the first `rounds` fold of the store's
training rows, as the nested protocol's inner fold); on the held-out rows a temperature (NLL) and the
lowest msp threshold keeping `target_precision` of the routes right are fitted, as
`routing.confidence` does for the embedding kind. That costs one more fit of the kind.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import torch

from lorachain.routing import calibrate as cal
from lorachain.routing.confidence import calibration_entry
from lorachain.routing.config import RouteConfig
from lorachain.routing.folds import Fitter, Row, make_folds, selection_logits
from lorachain.routing.selectors import get_kind, read_split

SECOND_DIR = "second_opinion"


def fit_second_opinion(
    cfg: RouteConfig, root: Path, labels: list[str], entry: dict, model, tok, progress
) -> dict:
    """The store's selector `entry` with its `second_opinion` entry (files under `second_opinion/`),
    each with a calibration; {} if the second fit was interrupted (a rerun resumes)."""
    second = cfg.selector.second_opinion
    sub = root / SECOND_DIR
    (sub / "splits").mkdir(parents=True, exist_ok=True)
    for part in ("train", "val"):
        shutil.copy2(root / "splits" / f"{part}.jsonl", sub / "splits" / f"{part}.jsonl")
    other = dataclasses.replace(
        cfg, selector=dataclasses.replace(cfg.selector, kind=second, second_opinion=None)
    )
    got = get_kind(second).fit(other, sub, labels, model, tok, progress)
    if not got:
        return {}
    if not got.get("calibration"):
        got["calibration"] = refit_calibration(other, sub, second, labels)
    if not entry.get("calibration"):
        entry = entry | {"calibration": refit_calibration(cfg, root, entry["kind"], labels)}
    shutil.rmtree(sub / "splits")
    shutil.rmtree(sub / "runs", ignore_errors=True)
    files = {f"{SECOND_DIR}/{k}": v for k, v in got["files"].items()}
    return entry | {"second_opinion": got | {"path": f"{SECOND_DIR}/{got['path']}", "files": files}}


def refit_calibration(cfg: RouteConfig, root: Path, kind: str, labels: list[str]) -> dict | None:
    """The calibration entry of `kind` fitted on the store at `root` (its train split), or None when
    the rows carry no data sets or no task type has two."""
    split = read_split(root, "train")
    rows = [Row(r["instruction"], r["task"], r.get("dataset") or "", r.get("dataset") or "") for r in split]
    if any(not r.group for r in rows):
        return None
    folds, _ = make_folds(rows, "rounds")
    if not folds:
        return None
    held = set(folds[0])
    work = root / "runs" / "_selector_calibration"
    select = Fitter(kind, cfg, work).fit([r for r in rows if r.group not in held], labels)
    test = [r for r in rows if r.group in held]
    logits = selection_logits(select, [r.text for r in test], labels)  # (N, L)
    gold = torch.tensor([labels.index(r.label) for r in test])
    t = cal.fit_temperature(logits, gold)
    values = cal.msp(logits, t).tolist()
    correct = (logits.argmax(-1) == gold).tolist()
    shutil.rmtree(work, ignore_errors=True)
    target = cfg.selector.target_precision
    return calibration_entry("msp", t, values, correct, target, len(held), len(labels))
