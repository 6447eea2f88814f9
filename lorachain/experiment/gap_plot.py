"""The gap report's figures: gap.png (forgetting against score, one point per method, seeds as
error bars) and links.png (score against the number of links per rank: a line through the plain
chains, the other schedules of a chain as markers beside it, full fine-tuning as a dashed line)."""

from __future__ import annotations

import statistics
from pathlib import Path

from lorachain.experiment.choose import one_schedule, select
from lorachain.experiment.gap import forgetting_values, roles
from lorachain.io import atomic_write

NLL = "general_nll_increase"


def _links(chosen: dict, task: str, method: str) -> int:
    return len(chosen[(task, method)]["spec"]["ranks"])


def _test(chosen: dict, task: str, method: str) -> float:
    return 100 * statistics.fmean(chosen[(task, method)]["test"].values())


def _std(values: list[float]) -> float:
    """The standard deviation over seeds (0 with one seed)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _spread(chosen: dict, task: str, method: str) -> float:
    """The test score's standard deviation over seeds ×100 (0 with one seed)."""
    scores = list(chosen[(task, method)]["test"].values())
    return 100 * _std(scores)


def _seed_bars(ax, chosen: dict, task: str, methods: list[str], xs: list[float], color) -> None:
    """Each point's spread over seeds as a vertical bar, in its line's colour."""
    ys = [_test(chosen, task, m) for m in methods]
    yerr = [_spread(chosen, task, m) for m in methods]
    ax.errorbar(xs, ys, yerr=yerr, fmt="none", ecolor=color, capsize=3, alpha=0.5)


def method_color(i: int) -> tuple:
    """The i-th method's colour: tab20's 10 strong colours (tab10's), then their light shades, so up
    to 20 methods never share one (matplotlib's default cycle repeats after 10)."""
    import matplotlib

    return matplotlib.colormaps["tab20"]((2 * i) % 20 + (i // 10) % 2)


def legend_order(chosen: dict, methods: list[str]) -> list[str]:
    """LoRA by rank, full fine-tuning, then the chains by rank, links and name: the same order (and
    so the same colours) whatever order the results were read in."""
    full, lora, chains = roles(chosen, methods)
    by_chain = sorted(chains, key=lambda m: (chains[m], len(_spec(chosen, m)["ranks"]), m))
    rest = sorted(set(methods) - {full, *lora.values(), *chains})
    return [lora[r] for r in sorted(lora)] + [full] * bool(full) + by_chain + rest


def _spec(chosen: dict, method: str) -> dict:
    return next(c["spec"] for (_, m), c in chosen.items() if m == method)


def plot(results: list[dict], out: Path, tasks: list[str] | None = None) -> list[Path]:
    """gap.png and links.png next to the report (nothing without full and LoRA methods; no gap.png
    without forgetting scores, no links.png without a chain)."""
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
    scored = [t for t in tasks if any(forgetting_values(chosen, t, m, NLL) for m in methods)]
    if scored:  # forgetting against score needs forgetting
        written.append(_forgetting_figure(plt, chosen, scored, methods, full, lora, out / "gap.png"))
    if not chains:  # score against links needs a chain
        return written
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for rank, ref in sorted(lora.items()):
            mine = [m for m, r in chains.items() if r == rank and (task, m) in chosen]
            pts = [(1, ref)] + sorted(
                (_links(chosen, task, m), m) for m in mine if one_schedule(chosen[(task, m)]["spec"])
            )
            pts = [(n, m) for n, m in pts if (task, m) in chosen]
            if len(pts) == 1:  # a LoRA rank no chain runs at: a reference point at one link
                point = ax.plot(1, _test(chosen, task, ref), "s", label=f"r={rank} (LoRA only)")
                _seed_bars(ax, chosen, task, [ref], [1], point[0].get_color())
            if len(pts) < 2:
                continue
            line = ax.plot(
                [n for n, _ in pts], [_test(chosen, task, m) for _, m in pts], marker="o", label=f"r={rank}"
            )
            color = line[0].get_color()
            _seed_bars(ax, chosen, task, [m for _, m in pts], [n for n, _ in pts], color)
            variants = [m for m in mine if not one_schedule(chosen[(task, m)]["spec"])]
            for m, marker in zip(variants, "^vD<>ph", strict=False):  # the same chain, another schedule
                ax.plot(_links(chosen, task, m), _test(chosen, task, m), marker, c=color, label=m)
                _seed_bars(ax, chosen, task, [m], [_links(chosen, task, m)], color)
        if (task, full) in chosen:
            ax.axhline(_test(chosen, task, full), ls="--", c="k", label="full")
        _label(ax, task, "links in the chain", "test score ×100 (bars: std over seeds)")
    written.append(_save(plt, fig, out / "links.png"))
    return written


def _forgetting_figure(plt, chosen, tasks, methods, full, lora, path: Path) -> Path:
    """gap.png: one point per method, forgetting against score, seeds' spread as error bars."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for i, m in enumerate(legend_order(chosen, methods)):
            c = chosen.get((task, m))
            xs = forgetting_values(chosen, task, m, NLL)
            if not c or not xs:
                continue
            ys = [100 * v for v in c["test"].values()]
            spread = [_std(xs), _std(ys)]
            ax.errorbar(
                statistics.fmean(xs),
                statistics.fmean(ys),
                xerr=spread[0],
                yerr=spread[1],
                fmt="*" if m == full else "s" if m in lora.values() else "o",
                markersize=10 if m == full else 6,
                capsize=3,
                color=method_color(i),
                label=m,
            )
        xlabel = "forgetting: general-set NLL increase (left forgets less)"
        _label(ax, task, xlabel, "target-task test score ×100 (up learns more)")
    return _save(plt, fig, path)


def _label(ax, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes, off the points


def _save(plt, fig, path: Path) -> Path:
    written = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight"))
    plt.close(fig)
    return written
