"""Paired comparison of COLA against LoRA: the same seeds (same training sample and test set),
each method at its own learning rate picked on validation.

Per task: the mean per-seed difference COLA − LoRA (test score x100), its 95% t-interval and the
sign count (seeds above / tied / below). Overall: every (task, seed) difference pooled into one
mean with its interval — the tasks are treated as exchangeable, so the interval says how far the
average gain over these tasks is from zero, not how it carries to other tasks.
"""

from __future__ import annotations

import math
import statistics

# two-sided 95% quantiles of Student's t, by degrees of freedom
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
_T975 |= {10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000}


def t975(df: int) -> float:
    """Student's t 97.5% quantile (the largest tabulated df not above `df`; 1.96 beyond 120)."""
    if df < 1:
        return math.nan
    if df > 120:
        return 1.960
    return _T975[max(k for k in _T975 if k <= df)]


def summarize(diffs: list[float]) -> dict:
    """Mean, 95% interval and sign count of paired differences."""
    n = len(diffs)
    mean = statistics.fmean(diffs) if diffs else math.nan
    half = t975(n - 1) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else math.nan
    return {
        "n": n,
        "mean": mean,
        "ci": (mean - half, mean + half),
        "above": sum(d > 0 for d in diffs),
        "tied": sum(d == 0 for d in diffs),
        "below": sum(d < 0 for d in diffs),
    }


def direction(s: dict) -> int:
    """+1 / -1 where a paired difference's 95% interval lies above / below zero, else 0. An interval
    of zero width (every pair differs by the same amount, as two seeds on a 100-row task often do)
    names no direction: with no spread across the seeds the t-interval says nothing."""
    lo, hi = s["ci"]
    if s["n"] < 2 or no_spread(s):
        return 0
    return 1 if lo > 0 else -1 if hi < 0 else 0


def no_spread(s: dict) -> bool:
    """Every pair differs by the same amount (up to float rounding), so the interval has no width."""
    lo, hi = s["ci"]
    return s["n"] > 1 and hi - lo <= 1e-9 * max(1.0, abs(s["mean"]))


def mean_std(values: list[float]) -> str:
    """Test scores x100 as mean ± std over seeds."""
    if not values:
        return "–"
    m = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{m:.1f} (1 seed)"
    return f"{m:.1f} ± {100 * statistics.stdev(values):.1f}"


def pair_diffs(chosen: dict, task: str, ref: str, other: str) -> list[float]:
    """Per-seed test differences other − ref (x100) on the seeds both ran."""
    a, b = chosen.get((task, ref)), chosen.get((task, other))
    if not a or not b:
        return []
    return [100 * (b["test"][s] - a["test"][s]) for s in sorted(set(a["test"]) & set(b["test"]))]


def fmt_ci(s: dict, scale: float = 1.0, digits: int = 1, empty: str = "-") -> str:
    """A summary as `mean [lo, hi]` (signed, ×scale): the mean alone for one pair, `empty` for none."""
    if not s["n"]:
        return empty
    m = f"{scale * s['mean']:+.{digits}f}"
    if s["n"] < 2:
        return m
    if no_spread(s):
        return f"{m} [every seed the same: no interval]"
    lo, hi = (scale * x for x in s["ci"])
    return f"{m} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _signs(s: dict) -> str:
    return f"{s['above']} / {s['tied']} / {s['below']}"


def verdict(s: dict) -> str:
    """Plain words for a pooled difference."""
    if s["n"] < 2:
        return "too few pairs to say"
    if no_spread(s):
        return "no difference shown (every pair the same: no interval)"
    return {
        1: "COLA above LoRA (interval above zero)",
        -1: "COLA below LoRA (interval below zero)",
        0: "no difference shown (interval contains zero)",
    }[direction(s)]


def per_task(chosen: dict, tasks: list[str], ref: str, other: str) -> tuple[dict[str, dict], dict]:
    """Summary of other − ref per task that both ran, and of all their differences pooled."""
    rows, pooled = {}, []
    for task in tasks:
        diffs = pair_diffs(chosen, task, ref, other)
        if diffs:
            rows[task] = summarize(diffs)
            pooled += diffs
    return rows, summarize(pooled)


def paired_table(chosen: dict, tasks: list[str], ref: str, other: str) -> tuple[str, dict]:
    """Markdown rows per task (each method's mean ± std at its lr, the paired difference) and
    pooled, and the pooled summary."""
    header = (
        f"| task | `{ref}` (lr) | `{other}` (lr) | COLA − LoRA (x100) [95% CI] | seeds above / tied / below |"
    )
    lines = [header, "|---|---|---|---|---|"]
    rows, total = per_task(chosen, tasks, ref, other)
    for task, s in rows.items():
        a, b = chosen[(task, ref)], chosen[(task, other)]
        cols = [f"{mean_std(list(v['test'].values()))} ({v['lr']:g})" for v in (a, b)]
        lines.append(f"| {task} | {cols[0]} | {cols[1]} | {fmt_ci(s)} | {_signs(s)} |")
    lines.append(f"| **all tasks, pooled** | | | **{fmt_ci(total)}** | {_signs(total)} |")
    return "\n".join(lines) + "\n", total
