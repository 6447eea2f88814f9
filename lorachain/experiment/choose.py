"""Which run of an experiment stands for each (task, method), and which methods pair up.

The learning rate of each (task, method) is the one with the best mean validation score over
the seeds every one of its rates has finished (never test). A method is described by what it ran
(`spec`): ranks, optimizer, knot policy and training-set size, so tables and figures find their rows
without naming conventions.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable


def select(results: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (task, method): the chosen lr, its test scores by seed, and mean cost."""
    groups: dict[tuple[str, str], dict] = defaultdict(lambda: defaultdict(list))
    for r in results:
        groups[(r["task"], r["method"])][r["lr"]].append(r)
    chosen = {}
    for key, by_lr in groups.items():
        # lrs compete on the seeds they all finished, so a grid in progress compares like with like
        common = set.intersection(*({r["seed"] for r in rows} for rows in by_lr.values()))

        def val_mean(lr, by_lr=by_lr, common=common):
            rows = [r for r in by_lr[lr] if r["seed"] in common] or by_lr[lr]
            return statistics.fmean(r["val"].get("score", float("-inf")) for r in rows)  # never test

        lr = max(by_lr, key=lambda x: (val_mean(x), -(x or 0)))
        rows = sorted(by_lr[lr], key=lambda r: r["seed"])
        chosen[key] = {
            "lr": lr,
            "rows": rows,
            "test": {r["seed"]: r["test"]["score"] for r in rows},
            "spec": rows[0].get("spec", {}),
            "flops": statistics.fmean(r["cost"]["est_train_flops"] for r in rows),
            "peak_rss_mb": max(r["cost"]["peak_rss_mb"] for r in rows),
            "counts": rows[0].get("counts", {}),
        }
    return chosen


def methods_where(chosen: dict, methods: list[str], pred: Callable[[dict], bool]) -> list[str]:
    out = []
    for m in methods:
        specs = [v["spec"] for (t, mm), v in chosen.items() if mm == m]
        if specs and pred(specs[0]):
            out.append(m)
    return out


def one_schedule(spec: dict) -> bool:
    """AdamW, fixed knots and one learning-rate schedule (no per-link restarts): a plain chain."""
    return (
        spec.get("optimizer", "adamw") == "adamw"
        and spec.get("knot_policy", "fixed") == "fixed"
        and not spec.get("restart_per_link")
    )


def trained(spec: dict) -> bool:
    return "ranks" in spec and spec.get("method") != "full"


def reference_method(
    chosen: dict, methods: list[str], n_train: int | None, rank: int | None = None
) -> str | None:
    """Plain LoRA: one link, AdamW, the full training set; of rank `rank` where there is one."""
    found = methods_where(
        chosen,
        methods,
        lambda s: (
            trained(s) and len(s["ranks"]) == 1 and s["optimizer"] == "adamw" and s["n_train"] == n_train
        ),
    )
    same = [m for m in found if chosen_spec(chosen, m)["ranks"] == [rank]]
    return (same or found or [None])[0]


def chosen_spec(chosen: dict, method: str | None) -> dict:
    return next((v["spec"] for (t, m), v in chosen.items() if m == method), {})


def comparisons(chosen: dict, methods: list[str]) -> list[tuple[str, str, int]]:
    """(chain, its plain-LoRA reference, n_train) for every fixed-knot AdamW chain with a
    reference of the same data size, at the chain's first link's rank where there is one."""
    out = []
    chains = methods_where(
        chosen, methods, lambda s: trained(s) and len(s["ranks"]) > 1 and s["knot_policy"] == "fixed"
    )
    for m in chains:
        spec = chosen_spec(chosen, m)
        ref = reference_method(chosen, methods, spec["n_train"], rank=spec["ranks"][0])
        if ref is not None and spec["optimizer"] == "adamw":
            out.append((m, ref, spec["n_train"]))
    return out
