"""PNG plots of runs people compare: training loss with knots marked, and a metric per method."""

from __future__ import annotations

import json
from pathlib import Path

from lorachain.io import atomic_write


def _smooth(values: list[float], factor: float = 0.9) -> list[float]:
    out, ema = [], None
    for v in values:
        ema = v if ema is None else factor * ema + (1 - factor) * v
        out.append(ema)
    return out


def plot_runs(runs: dict[str, str | Path], path: str | Path, metric: str = "accuracy") -> Path:
    """Left: smoothed training loss of each run folder, knots as dotted lines. Right: `metric`
    of each run's final evaluation. Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_bar) = plt.subplots(1, 2, figsize=(11, 4))
    names, values = [], []
    for i, (label, run) in enumerate(runs.items()):
        run = Path(run)
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line]
        rows = [r for r in rows if "loss" in r]  # not the evaluations of train.eval_every
        color = f"C{i}"
        name = label.lstrip("_") or label  # matplotlib hides labels that start with "_"
        ax_loss.plot([r["step"] for r in rows], _smooth([r["loss"] for r in rows]), color=color, label=name)
        summary = json.loads((run / "summary.json").read_text())
        for link in summary["links"][:-1]:
            ax_loss.axvline(link["end_step"], color=color, linestyle=":", alpha=0.8)
        names.append(label)
        values.append(summary.get("final_eval", {}).get(metric, float("nan")))
    ax_loss.set(xlabel="optimizer step", ylabel="training loss (EMA 0.9)", title="loss; dotted = knot")
    ax_loss.legend()
    bars = ax_bar.bar(names, values, color=[f"C{i}" for i in range(len(names))])
    ax_bar.bar_label(bars, fmt="%.3f")
    ax_bar.set(ylabel=metric, title=f"eval {metric}")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return Path(path)
