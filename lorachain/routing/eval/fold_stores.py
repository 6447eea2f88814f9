"""`lorachain route folds CONFIG`: a few stores, each blind to some data sets, for answer quality.

The answer-side comparison (issue 43) needs adapters that never saw a fold's held-out data sets,
so each fold is a store of its own: `data.exclude_datasets` gets one data set of every task type
that has two or more (`routing.folds.make_folds`, scheme `rounds`: fold k holds out the k-th data
set of each type), so the task adapters, the mixed adapter and the selector see none of their rows.
`--compare` then scores every store on its held-out rows: every adapter's reference and
instruction likelihoods cached once, the gate's margin chosen on reference perplexity pooled over
the folds (`compare.choose_margin`), and the answers at that margin compared (`compare.pool`).
`--estimate` times a few optimizer steps of one task adapter on the real base to extrapolate the
core-hours of one store. Resumable: `route train` resumes a fold's store, the cache its numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path

import torch

from lorachain.data import DataError, read_rows
from lorachain.io import write_json
from lorachain.routing.config import RouteConfig
from lorachain.routing.eval.compare import (
    GATED,
    MARGINS,
    choose_margin,
    compare,
    margin_sweep,
    options,
    pool,
    render,
    select_all,
)
from lorachain.routing.eval.unseen import unseen_rows
from lorachain.routing.folds import Row, make_folds
from lorachain.routing.gate import margin_json, margin_value
from lorachain.routing.train import load_split, read_rows_of, route_train, write_splits
from lorachain.store import MIXED


def fold_plan(cfg: RouteConfig, n_folds: int) -> list[list[str]]:
    """The data sets each fold holds out (besides the config's own `data.exclude_datasets`)."""
    rows = [r for r in read_rows_of(cfg, []) if r.dataset not in set(cfg.data.exclude_datasets)]
    if cfg.data.tasks:
        rows = [r for r in rows if r.task in set(cfg.data.tasks)]
    if any(not r.dataset for r in rows):
        raise DataError(f"{cfg.data.path}: folds by data set need {cfg.data.dataset_field!r} on every row")
    folds, _ = make_folds([Row("", r.task, r.dataset) for r in rows], "rounds")
    if len(folds) < n_folds:
        raise DataError(f"{cfg.data.path}: only {len(folds)} folds by data set, asked for {n_folds}")
    return folds[:n_folds]


def fold_configs(cfg: RouteConfig, out: str | Path, n_folds: int) -> list[RouteConfig]:
    """One store config per fold: its data sets excluded, its store in `out/fold<k>`."""
    out = Path(out)
    got = []
    for k, held in enumerate(fold_plan(cfg, n_folds)):
        data = dataclasses.replace(cfg.data, exclude_datasets=[*cfg.data.exclude_datasets, *held])
        got.append(dataclasses.replace(cfg, data=data, output_dir=str(out / f"fold{k}")))
    return got


def build_folds(cfg: RouteConfig, out: str | Path, n_folds: int = 3, progress: bool = True) -> dict | None:
    """Train every fold's store (resuming any that stopped); None if interrupted."""
    cfgs = fold_configs(cfg, out, n_folds)
    plan = {"folds": [{"store": c.output_dir, "held_out": c.data.exclude_datasets} for c in cfgs]}
    write_json(Path(out) / "plan.json", plan)
    for c in cfgs:
        if route_train(c, progress=progress) is None:
            return None
    return plan


def compare_folds(
    out: str | Path,
    n_folds: int,
    max_per_task: int | None = 20,
    answers: bool = True,
    margins=MARGINS,
    max_new_tokens: int = 32,
    *,
    make_router,
    variants: list[str] = (),
) -> dict:
    """Score each fold store (opened by `make_router(store)`) on its held-out rows, choose each
    gate's margin (over routed, top1, arrow) on reference perplexity pooled over the folds, compare
    the answers at those margins; writes out/compare/fold<k>/, pooled/ and margins.json. Each of
    `variants` (`routing.eval.variants`: other, augmented) is fitted on every fold store's own
    rows and compared as one more option, ungated and gated at the routed option's margin."""
    from lorachain.routing.eval.answers import AnswerCache
    from lorachain.routing.eval.variants import fit_variant, variant_choices

    out = Path(out)
    stores = [out / f"fold{k}" for k in range(n_folds)]
    parts = []
    for store in stores:
        router = make_router(store)
        rows = unseen_rows(store, max_per_task=max_per_task)
        cache = AnswerCache(store / "answers", router, max_new_tokens)
        chosen = options(router, rows, select_all(router, rows), cache, {})  # ungated: routed, top1, arrow
        extra = {v: variant_choices(router, store, v, rows) for v in variants if fit_variant(store, v)}
        parts.append((router, rows, cache, chosen, extra))
    sweeps = {
        base: margin_sweep([(c, rows, chosen[base]) for _, rows, c, chosen, _ in parts], margins)
        for base in GATED.values()
    }
    picked = {base: choose_margin(sweep) for base, sweep in sweeps.items()}
    chosen_json = {k: margin_json(v) for k, v in picked.items()}  # inf: the string "inf" (gate.NEVER)
    write_json(
        out / "compare" / "margins.json",
        {"sweep": sweeps, "chosen": chosen_json, "rows_per_task": max_per_task, "variants": list(variants)},
    )
    results = [
        compare(
            r,
            rows,
            store / "answers",
            out / "compare" / store.name,
            picked,
            answers,
            f"{store.name}'s held-out data sets",
            max_new_tokens,
            extra,
        )
        for store, (r, rows, _, _, extra) in zip(stores, parts, strict=True)
    ]
    pooled = pool(results, f"the held-out data sets of {n_folds} fold stores")
    write_json(out / "compare" / "pooled" / "compare.json", pooled)
    render(out / "compare" / "pooled" / "compare.json")
    return pooled | {"margin_sweep": sweeps}


def first_per_task(rows: list[dict], n: int | None) -> list[dict]:
    """The first `n` rows of each task type, in file order (all rows when `n` is None)."""
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        seen[r["task"]] = seen.get(r["task"], 0) + 1
        if n is None or seen[r["task"]] <= n:
            out.append(r)
    return out


def compare_in_distribution(
    out: str | Path,
    n_folds: int,
    margin: float | dict,
    max_per_task: int | None = 8,
    answers: bool = True,
    max_new_tokens: int = 32,
    *,
    make_router,
) -> dict:
    """Score each fold store on its own test split (data sets it trained on) with the gate at
    `margin`: does a margin that does no harm on unseen data sets keep routing's gain in
    distribution? Nothing is chosen here. Writes out/compare_in/fold<k>/ and pooled/."""
    out = Path(out)
    results = []
    for k in range(n_folds):
        store = out / f"fold{k}"
        rows = first_per_task([r for _, r in read_rows(store / "splits" / "test.jsonl")], max_per_task)
        dest = out / "compare_in" / store.name
        src = f"{store.name}'s test split"
        results.append(
            compare(make_router(store), rows, store / "answers", dest, margin, answers, src, max_new_tokens)
        )
    pooled = pool(results, f"the test splits of {n_folds} fold stores (data sets they trained on)")
    write_json(out / "compare_in" / "pooled" / "compare.json", pooled)
    render(out / "compare_in" / "pooled" / "compare.json")
    return pooled


def read_margins(out: str | Path) -> dict[str, float]:
    """The margins `compare_folds` chose (out/compare/margins.json), as numbers ("inf": math.inf),
    e.g. for `compare` on a lockbox half."""
    got = json.loads((Path(out) / "compare" / "margins.json").read_text())["chosen"]
    return {k: margin_value(v) for k, v in got.items()}


def budget_steps(cfg: RouteConfig) -> dict[str, int]:
    """Optimizer steps of each LoRA the store trains (task adapters, mixed, a LoRA selector)."""
    split = load_split(cfg, [])
    train = split["train"]
    tasks = sorted({r.task for r in train})

    def steps(n: int, budget) -> int:
        return budget.max_steps or math.ceil(budget.epochs * math.ceil(n / budget.batch_size))

    got = {t: steps(sum(r.task == t for r in train), cfg.train) for t in tasks}
    got[MIXED] = steps(len(train), cfg.mixed_train or cfg.train)
    if cfg.selector.kind == "lora":
        got["_selector"] = steps(len(train), cfg.selector_train or cfg.train)
    return got


def estimate_store(cfg: RouteConfig, work: str | Path, steps: tuple[int, int] = (2, 8)) -> dict:
    """Seconds per optimizer step of the mixed adapter (every task type's rows) on the real base,
    from two short runs (their difference cancels setup and evaluation), times the store's steps,
    plus each adapter's fixed cost: core-hours per store. LoRA training only: an encoder or
    embedding selector's fit (and its second opinion's) is not included."""
    from lorachain.routing.runs import adapter_runs
    from lorachain.training.loop import train
    from lorachain.training.setup import load_base

    work = Path(work)
    split = load_split(cfg, [])
    labels = sorted({r.task for r in split["train"]})
    write_splits(cfg, work, split, labels, [])
    model = load_base(cfg.model)
    pristine = {n: p.detach().clone() for n, p in model.state_dict().items()}
    name, (_, run) = MIXED, adapter_runs(cfg, work, labels)[MIXED]  # every task type, shuffled
    wall, stepped = [], []
    for n in steps:
        budget = dataclasses.replace(run.train, max_steps=n, epochs=None, save_every=10**9)
        one = dataclasses.replace(run, train=budget, output_dir=str(work / "runs" / f"{name}_{n}"))
        shutil.rmtree(one.output_dir, ignore_errors=True)  # timed afresh, never resumed
        t0 = time.perf_counter()
        summary = train(one, model, None, progress=False).summary
        wall.append(time.perf_counter() - t0)
        stepped.append(summary["wall_seconds"])  # the optimizer steps alone
        with torch.no_grad():
            model.load_state_dict(pristine)
    # the longer run's extra steps: the first steps' warm-up cancels (a noisy difference: the mean)
    diff = (stepped[1] - stepped[0]) / (steps[1] - steps[0])
    per_step = diff if diff > 0 else stepped[1] / steps[1]
    plan = budget_steps(cfg)
    threads = torch.get_num_threads()
    total = sum(plan.values())
    fixed = wall[0] - stepped[0]  # per adapter: its run's setup, final evaluation and save
    seconds = per_step * total + fixed * len(plan)
    return {
        "seconds_per_step": per_step,
        "fixed_seconds_per_adapter": fixed,
        "timed_runs": {
            str(n): {"wall_s": w, "steps_s": t} for n, w, t in zip(steps, wall, stepped, strict=True)
        },
        "threads": threads,
        "steps": plan,
        "total_steps": total,
        "hours_per_store": seconds / 3600,
        "core_hours_per_store": seconds * threads / 3600,
    }
