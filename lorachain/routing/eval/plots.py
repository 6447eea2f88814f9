"""Plots of `lorachain route eval`: the selector's confusion matrix and the answers of each way
of choosing an adapter, per task."""

from __future__ import annotations

from pathlib import Path

from lorachain.io import atomic_write

NONE = "(none)"
KINDS = ("oracle", "routed", "top1", "mixed", "base")  # bar order in answers.png
NAMES = {
    "oracle": "oracle (true task's adapter)",
    "routed": "routed (with fallback)",
    "top1": "selector's top-1, no fallback",
    "mixed": "mixed adapter",
    "base": "base (no adapter)",
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_confusion(
    gold: list[str], ranked: list[list[str]], labels: list[str], title: str, path: Path
) -> Path:
    plt = _pyplot()
    cols = labels + [NONE]
    counts = [[0] * len(cols) for _ in labels]
    for g, r in zip(gold, ranked, strict=True):
        counts[labels.index(g)][cols.index(r[0] if r else NONE)] += 1
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(cols), 1.0 + 0.6 * len(labels)))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i, row in enumerate(counts):
        for j, v in enumerate(row):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
    ax.set(xlabel="selected (top-1)", ylabel="true task", title=title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def plot_answers(result: dict, path: Path) -> Path:
    """Grouped bars per task (and over all rows): ROUGE-L of the greedy answers and perplexity of
    the reference answers, one bar per kind of route_eval."""
    plt = _pyplot()
    tasks = [*sorted(result["per_task_rows"]), "all"]
    kinds = [k for k in KINDS if k in result["quality"]]
    q, ppl, overall = result["quality"], result["perplexity"], result["overall"]
    fig, axes = plt.subplots(2, 1, figsize=(2.0 + 1.1 * len(tasks), 7.5), sharex=True)
    width = 0.8 / len(kinds)
    for j, kind in enumerate(kinds):
        xs = [i + (j - (len(kinds) - 1) / 2) * width for i in range(len(tasks))]
        rouge = [overall["quality"][kind]["rougeL"] if t == "all" else q[kind][t]["rougeL"] for t in tasks]
        perp = [overall["perplexity"][kind] if t == "all" else ppl[kind][t] for t in tasks]
        axes[0].bar(xs, rouge, width, label=NAMES[kind])
        axes[1].bar(xs, perp, width, label=NAMES[kind])
    axes[0].set(ylabel="ROUGE-L of greedy answers (higher is better)")
    axes[1].set(ylabel="perplexity of the reference (lower is better)", yscale="log")
    axes[1].set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    axes[0].legend(fontsize=8, ncol=2)
    source = result.get("rows_from", "the test split")
    axes[0].set_title(f"{result['test_rows']} rows from {source}", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def plot_comparison(result: dict, path: Path) -> Path:
    """From `routing.eval.compare`'s JSON: ROUGE-L per task type and option (top; reference
    perplexity when no answers were generated), and each option's ROUGE-L minus the mixed adapter's
    with its 95% paired bootstrap interval and the no-harm floor (bottom)."""
    plt = _pyplot()
    opts = result["options"]
    tasks = [*result["per_task_rows"], "all"]
    kinds = list(opts)
    answered = "rougeL" in opts["mixed"]["all"]
    fig, axes = plt.subplots(2, 1, figsize=(2.5 + 1.2 * len(tasks), 7.5), sharex=True)
    width = 0.8 / len(kinds)
    colours = plt.get_cmap("tab20").colors  # one colour per option (up to 20), the same in both panels
    for j, kind in enumerate(kinds):
        xs = [i + (j - (len(kinds) - 1) / 2) * width for i in range(len(tasks))]
        c = colours[j % len(colours)]
        axes[0].bar(
            xs, [opts[kind][t]["rougeL" if answered else "ppl"] for t in tasks], width, label=kind, color=c
        )
        ci = [opts[kind][t].get("vs_mixed") for t in tasks]
        if any(c and c["mean"] is not None for c in ci):
            mean = [c["mean"] if c and c["mean"] is not None else 0.0 for c in ci]
            err = [
                [m - c["low"] if c and c["low"] is not None else 0.0 for m, c in zip(mean, ci, strict=True)],
                [
                    c["high"] - m if c and c["high"] is not None else 0.0
                    for m, c in zip(mean, ci, strict=True)
                ],
            ]
            axes[1].errorbar(xs, mean, yerr=err, fmt="o", capsize=3, label=kind, color=c)
    axes[0].set(ylabel="ROUGE-L (higher is better)" if answered else "reference perplexity (lower is better)")
    axes[0].legend(fontsize=8, ncol=3)
    axes[0].set_title(f"{result['rows']} rows from {result['rows_from']}", fontsize=9)
    axes[1].axhline(0.0, color="grey", lw=0.8)
    axes[1].axhline(result["floor"], color="red", lw=0.8, ls="--", label=f"floor {result['floor']}")
    axes[1].set(ylabel="option − mixed ROUGE-L (95% CI)")
    axes[1].legend(fontsize=8, ncol=3)
    axes[1].set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path
