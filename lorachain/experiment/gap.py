"""How much of the LoRA → full fine-tuning gap a chain closes, and what it forgets (issue 24).

From a grid with a full fine-tuning method and LoRA methods at one or more ranks (a method's
`spec.ranks`: one rank is LoRA, several a chain): per task, each method's mean ± std at its chosen lr,
each chain against LoRA at its rank (paired over seeds, 95% interval), the fraction of the gap closed
(chain − LoRA) / (full − LoRA) per seed with a t-interval over seeds, and forgetting (the general
set's NLL increase, an unrelated task's score drop). Figures: gap.png (forgetting vs score, one point
per method, seeds as error bars) and links.png (score vs number of links per rank).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from lorachain.experiment.choose import select
from lorachain.experiment.paired import per_task, summarize, t975
from lorachain.io import atomic_write

MIN_GAP = 0.01  # full − LoRA below one point (of a 0–1 score): no gap to close


def roles(chosen: dict, methods: list[str]) -> tuple[str | None, dict[int, str], dict[str, int]]:
    """(the full fine-tuning method, LoRA method by rank, chain method -> its first link's rank)."""
    full, lora, chains = None, {}, {}
    for m in methods:
        spec = next((c["spec"] for (t, mm), c in chosen.items() if mm == m), {})
        ranks = spec.get("ranks") or []
        if spec.get("method") == "full":
            full = full or m
        elif len(ranks) == 1:
            lora.setdefault(ranks[0], m)
        elif len(ranks) > 1:
            chains[m] = ranks[0]
    return full, lora, chains


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "–"
    m = scale * statistics.fmean(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def closed_fraction(chosen: dict, task: str, full: str, lora: str, chain: str) -> dict:
    """Per-seed (chain − LoRA) / (full − LoRA) on the seeds all three ran: mean, 95% t-interval,
    and the mean gap itself; `gap: False` when full is not at least MIN_GAP above LoRA."""
    f, lo, c = (chosen.get((task, m)) for m in (full, lora, chain))
    if not (f and lo and c):
        return {"n": 0}
    seeds = sorted(set(f["test"]) & set(lo["test"]) & set(c["test"]))
    gaps = [f["test"][s] - lo["test"][s] for s in seeds]
    mean_gap = statistics.fmean(gaps) if gaps else math.nan
    out = {"n": len(seeds), "gap": mean_gap, "has_gap": bool(gaps) and mean_gap >= MIN_GAP}
    if not out["has_gap"]:
        return out
    fr = [(c["test"][s] - lo["test"][s]) / g for s, g in zip(seeds, gaps, strict=True) if abs(g) > 1e-9]
    out["fractions"] = fr
    out["mean"] = statistics.fmean(fr) if fr else math.nan
    half = t975(len(fr) - 1) * statistics.stdev(fr) / math.sqrt(len(fr)) if len(fr) > 1 else math.nan
    out["ci"] = (out["mean"] - half, out["mean"] + half)
    return out


def forgetting_values(chosen: dict, task: str, method: str, key: str) -> list[float]:
    c = chosen.get((task, method))
    return [r["forgetting"][key] for r in (c or {}).get("rows", []) if key in r.get("forgetting", {})]


def render(results: list[dict], tasks: list[str] | None = None, methods: list[str] | None = None) -> str:
    """The gap section of report.md (empty without a full fine-tuning method and a LoRA method)."""
    chosen = select(results)
    tasks = tasks or list(dict.fromkeys(r["task"] for r in results))
    methods = methods or list(dict.fromkeys(r["method"] for r in results))
    full, lora, chains = roles(chosen, methods)
    if not full or not lora:
        return ""
    lines = ["## The LoRA → full fine-tuning gap (issue 24)", ""]
    head = ["method", "test score ×100", "general NLL increase", "unrelated task drop ×100"]
    for task in tasks:
        lines += [f"### {task}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in methods:
            c = chosen.get((task, m))
            if not c:
                continue
            nll = _mean_std(forgetting_values(chosen, task, m, "general_nll_increase"), 1.0, 3)
            drop = _mean_std(forgetting_values(chosen, task, m, "task_score_drop"))
            lines.append(
                f"| `{m}` (lr {c['lr']:g}) | {_mean_std(list(c['test'].values()))} | {nll} | {drop} |"
            )
        lines += ["", "| chain | vs LoRA at its rank [95% CI] | gap full − LoRA ×100 | gap closed [95% CI] |"]
        lines.append("|---|---|---|---|")
        for chain, rank in chains.items():
            ref = lora.get(rank)
            if not ref:
                continue
            by_task, _ = per_task(chosen, [task], ref, chain)
            s = by_task.get(task)
            diff = f"{s['mean']:+.1f} [{s['ci'][0]:+.1f}, {s['ci'][1]:+.1f}]" if s and s["n"] > 1 else "–"
            g = closed_fraction(chosen, task, full, ref, chain)
            if not g["n"]:
                continue
            if not g["has_gap"]:
                closed = "no gap to close"
            elif g["n"] > 1:
                closed = f"{g['mean']:.2f} [{g['ci'][0]:.2f}, {g['ci'][1]:.2f}]"
            else:
                closed = f"{g['mean']:.2f}"
            lines.append(f"| `{chain}` vs `{ref}` | {diff} | {100 * g['gap']:+.1f} | {closed} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def pooled_gap(chosen: dict, tasks: list[str], full: str, lora: str) -> dict:
    """full − LoRA paired over every task's seeds (×100), for the pilot's verdict."""
    return per_task(chosen, tasks, lora, full)[1] if tasks else summarize([])


def plot(results: list[dict], out: Path, tasks: list[str] | None = None) -> list[Path]:
    """gap.png and links.png next to the report (nothing without full and LoRA methods)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = select(results)
    tasks = tasks or list(dict.fromkeys(r["task"] for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results))
    full, lora, chains = roles(chosen, methods)
    if not full or not lora:
        return []
    written = []
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for m in methods:
            c = chosen.get((task, m))
            xs = forgetting_values(chosen, task, m, "general_nll_increase")
            if not c or not xs:
                continue
            ys = [100 * v for v in c["test"].values()]
            spread = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in (xs, ys)]
            ax.errorbar(
                statistics.fmean(xs),
                statistics.fmean(ys),
                xerr=spread[0],
                yerr=spread[1],
                fmt="o",
                capsize=3,
                label=m,
            )
        _label(ax, task, "forgetting: general-set NLL increase", "target-task test score ×100")
    written.append(_save(plt, fig, out / "gap.png"))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for rank, ref in sorted(lora.items()):
            pts = [(1, ref)] + sorted(
                (len(chosen[(task, m)]["spec"]["ranks"]), m)
                for m, r in chains.items()
                if r == rank and (task, m) in chosen
            )
            pts = [(n, m) for n, m in pts if (task, m) in chosen]
            if len(pts) < 2:
                continue
            means = [100 * statistics.fmean(chosen[(task, m)]["test"].values()) for _, m in pts]
            ax.plot([n for n, _ in pts], means, marker="o", label=f"r={rank}")
        if (task, full) in chosen:
            ax.axhline(
                100 * statistics.fmean(chosen[(task, full)]["test"].values()), ls="--", c="k", label="full"
            )
        _label(ax, task, "links in the chain", "test score ×100")
    written.append(_save(plt, fig, out / "links.png"))
    return written


def _label(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    written = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return written
