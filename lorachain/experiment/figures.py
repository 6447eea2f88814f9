"""The report's PNG figures: test score against chain length (Figure 2) and against the second
link's rank (Figure 3), and the paired COLA − LoRA differences per task (paired.png)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from lorachain.experiment.choose import comparisons, one_schedule, select, trained
from lorachain.experiment.paired import per_task
from lorachain.io import atomic_write


def plot(results: list[dict], out: Path) -> list[Path]:
    """Figure 2 (test score against chain length) and Figure 3 (against the second link's rank)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = select(results)
    written = []
    for name, xkey, title, pick in (
        ("chain_length.png", "chain length", "Test score vs chain length (Figure 2)", _by_length),
        (
            "rank_stepdown.png",
            "rank of the second link",
            "COLA with rank step-down (Figure 3)",
            _by_second_rank,
        ),
    ):
        series = pick(chosen)
        if not series or all(len(xs) < 2 for xs in series.values()):
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for task, points in sorted(series.items()):
            xs = sorted(points)
            means = [100 * statistics.fmean(points[x]) for x in xs]
            stds = [100 * statistics.stdev(points[x]) if len(points[x]) > 1 else 0.0 for x in xs]
            ax.plot(xs, means, marker="o", label=task)
            ax.fill_between(
                xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.15
            )
        ax.set_xlabel(xkey)
        ax.set_ylabel("test score (x100)")
        ax.set_title(title)
        ax.set_xticks(sorted({x for p in series.values() for x in p}))
        ax.legend(fontsize=8)
        fig.tight_layout()
        atomic_write(out / name, lambda tmp, fig=fig: fig.savefig(tmp, format="png", dpi=110))
        plt.close(fig)
        written.append(out / name)
    return written


def _fixed_adamw(spec: dict, n_full: int) -> bool:
    return trained(spec) and one_schedule(spec) and spec["n_train"] == n_full


def _by_length(chosen: dict) -> dict[str, dict[int, list[float]]]:
    n_full = max((v["spec"].get("n_train", 0) for v in chosen.values()), default=0)
    series: dict[str, dict[int, list[float]]] = defaultdict(dict)
    for (t, _), v in chosen.items():
        s = v["spec"]
        if _fixed_adamw(s, n_full) and len(set(s["ranks"])) == 1:
            series[t].setdefault(len(s["ranks"]), list(v["test"].values()))
    return series


def _by_second_rank(chosen: dict) -> dict[str, dict[int, list[float]]]:
    n_full = max((v["spec"].get("n_train", 0) for v in chosen.values()), default=0)
    series: dict[str, dict[int, list[float]]] = defaultdict(dict)
    for (t, _), v in chosen.items():
        s = v["spec"]
        if _fixed_adamw(s, n_full) and len(s["ranks"]) == 2:
            series[t][s["ranks"][1]] = list(v["test"].values())
    return series


def plot_comparisons(results: list[dict], path: Path, tasks: list[str] | None = None) -> Path | None:
    """paired.png: the paired COLA − LoRA differences per task, one panel per comparison."""
    chosen = select(results)
    methods = list(dict.fromkeys(m for _, m in chosen))
    tasks = tasks or list(dict.fromkeys(t for t, _ in chosen))
    panels = [
        (f"{m} − {ref} ({n} examples)", *per_task(chosen, tasks, ref, m))
        for m, ref, n in comparisons(chosen, methods)
    ]
    panels = [p for p in panels if p[1]]
    if not panels:
        return None
    plot_paired(panels, path)
    return path


def plot_paired(panels: list[tuple[str, dict[str, dict], dict]], path: Path) -> None:
    """One forest plot: per panel (title, per-task summaries, pooled), each task's mean difference
    with its 95% interval, the pooled one last in black, and the zero line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(4.2 * len(panels), 0.45 * max(len(rows) + 1 for _, rows, _ in panels) + 1.4),
        squeeze=False,
        sharey=False,
    )
    for ax, (title, rows, total) in zip(axes[0], panels):
        items = [*rows.items(), ("pooled", total)]
        for y, (name, s) in enumerate(reversed(items)):
            lo, hi = s["ci"] if s["n"] > 1 else (s["mean"], s["mean"])
            color = "black" if name == "pooled" else "tab:blue"
            ax.errorbar(
                s["mean"], y, xerr=[[s["mean"] - lo], [hi - s["mean"]]], fmt="o", color=color, capsize=3
            )
        ax.set_yticks(range(len(items)), [name for name, _ in reversed(items)])
        ax.axvline(0.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xlabel("COLA − LoRA, test score x100 (95% CI)")
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
