"""Tables and plots shaped like the COLA paper's, computed from an experiment's results.json.

The learning rate of each (task, method) is the one with the best mean validation score over
seeds; the tables report test scores (x100) at that rate as mean ± std over seeds. A method is
described by what it ran (`spec`): its ranks, optimizer, knot policy and training-set size, so
the ablation tables find their rows without naming conventions.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from lorachain.io import atomic_write, write_text


def select(results: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (task, method): the chosen lr, its test scores by seed, and mean cost."""
    groups: dict[tuple[str, str], dict] = defaultdict(lambda: defaultdict(list))
    for r in results:
        groups[(r["task"], r["method"])][r["lr"]].append(r)
    chosen = {}
    for key, by_lr in groups.items():

        def val_mean(lr, by_lr=by_lr):
            vals = [r["val"].get("score", float("-inf")) for r in by_lr[lr]]  # never test
            return statistics.fmean(vals)

        lr = max(by_lr, key=lambda x: (val_mean(x), -(x or 0)))
        rows = sorted(by_lr[lr], key=lambda r: r["seed"])
        chosen[key] = {
            "lr": lr,
            "rows": rows,
            "test": {r["seed"]: r["test"]["score"] for r in rows},
            "spec": rows[0].get("spec", {}),
            "flops": statistics.fmean(r["cost"]["est_train_flops"] for r in rows),
            "seconds": statistics.fmean(r["cost"]["cell_seconds"] for r in rows),
            "peak_rss_mb": max(r["cost"]["peak_rss_mb"] for r in rows),
            "counts": rows[0].get("counts", {}),
        }
    return chosen


def label(spec: dict) -> str:
    """A method's name in the paper's terms, from what it ran."""
    if spec.get("baseline") == "zero_shot":
        return "Zero-shot"
    if spec.get("baseline") == "icl":
        return f"ICL ({spec.get('icl_k')}-shot)"
    if spec.get("method") == "full":
        text = "Full FT"
    elif len(spec.get("ranks", [])) == 1:
        text = f"LoRA (r={spec['ranks'][0]})"
    else:
        text = "COLA (" + ",".join(str(r) for r in spec.get("ranks", [])) + ")"
    extras = []
    if spec.get("optimizer", "adamw") != "adamw":
        extras.append(spec["optimizer"])
    if spec.get("knot_policy", "fixed") != "fixed":
        extras.append(f"{spec['knot_policy']} knots")
    return text + (f" [{', '.join(extras)}]" if extras else "")


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    m = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{m:.1f} (1 seed)"
    return f"{m:.1f} ± {100 * statistics.stdev(values):.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def score_table(chosen: dict, tasks: list[str], methods: list[str], extra: Callable | None = None) -> str:
    """Methods x tasks, mean ± std of test scores; `extra(method)` adds a last column."""
    header = ["method", *tasks, *(["FLOPs saved vs LoRA"] if extra else [])]
    rows = []
    for m in methods:
        spec = next((chosen[(t, m)]["spec"] for t in tasks if (t, m) in chosen), {})
        row = [f"{label(spec)} `{m}`"]
        row += [mean_std(list(chosen[(t, m)]["test"].values())) if (t, m) in chosen else "–" for t in tasks]
        rows.append(row + ([extra(m)] if extra else []))
    return _table(header, rows)


def gain_table(chosen: dict, tasks: list[str], methods: list[str], reference: str) -> str:
    """Each method against the reference: relative gain of the mean, and seeds where it is above."""
    header = ["method vs " + reference, *tasks]
    rows = []
    for m in methods:
        row = [f"`{m}`"]
        for t in tasks:
            a, b = chosen.get((t, m)), chosen.get((t, reference))
            if not a or not b:
                row.append("–")
                continue
            ma, mb = statistics.fmean(a["test"].values()), statistics.fmean(b["test"].values())
            paired = [s for s in a["test"] if s in b["test"]]
            wins = sum(a["test"][s] > b["test"][s] for s in paired)
            gain = 100 * (ma - mb) / mb if mb else float("nan")
            row.append(f"{gain:+.1f}% ({wins}/{len(paired)} seeds above)")
        rows.append(row)
    return _table(header, rows)


def _methods_where(chosen: dict, methods: list[str], pred: Callable[[dict], bool]) -> list[str]:
    out = []
    for m in methods:
        specs = [v["spec"] for (t, mm), v in chosen.items() if mm == m]
        if specs and pred(specs[0]):
            out.append(m)
    return out


def _trained(spec: dict) -> bool:
    return "ranks" in spec and spec.get("method") != "full"


def reference_method(chosen: dict, methods: list[str], n_train: int | None) -> str | None:
    """Plain LoRA: one link, AdamW, the full training set."""
    found = _methods_where(
        chosen,
        methods,
        lambda s: (
            _trained(s) and len(s["ranks"]) == 1 and s["optimizer"] == "adamw" and s["n_train"] == n_train
        ),
    )
    return found[0] if found else None


def render(results: list[dict], tasks: list[str] | None = None, methods: list[str] | None = None) -> str:
    """The whole report as markdown."""
    chosen = select(results)
    # the given order first, then whatever else the folder holds (another config's cells)
    tasks = [
        t
        for t in dict.fromkeys([*(tasks or []), *sorted({t for t, _ in chosen})])
        if any(tt == t for tt, _ in chosen)
    ]
    methods = [
        m
        for m in dict.fromkeys([*(methods or []), *sorted({m for _, m in chosen})])
        if any(mm == m for _, mm in chosen)
    ]
    n_full = max((v["spec"].get("n_train", 0) for v in chosen.values()), default=0)
    ref = reference_method(chosen, methods, n_full)
    out = ["# Results\n"]
    out.append(_counts(chosen, tasks))
    main = _methods_where(
        chosen,
        methods,
        lambda s: (
            "baseline" in s
            or (
                s.get("optimizer") == "adamw"
                and s.get("n_train") == n_full
                and s.get("knot_policy") == "fixed"
            )
        ),
    )
    out += ["## Main results (Table 1/2)\n", score_table(chosen, tasks, main)]
    if ref:
        others = [m for m in main if m != ref and _trained(chosen_spec(chosen, m))]
        if others:
            out += [
                f"\nRelative gain over `{ref}` (mean over seeds):\n",
                gain_table(chosen, tasks, others, ref),
            ]
    base_rank = chosen_spec(chosen, ref)["ranks"][0] if ref else None

    def adamw_full(s: dict) -> bool:
        return (
            _trained(s)
            and s["optimizer"] == "adamw"
            and s["n_train"] == n_full
            and s["knot_policy"] == "fixed"
        )

    lengths = _methods_where(chosen, methods, lambda s: adamw_full(s) and set(s["ranks"]) == {base_rank})
    if len({len(chosen_spec(chosen, m)["ranks"]) for m in lengths}) > 1:
        lengths.sort(key=lambda m: len(chosen_spec(chosen, m)["ranks"]))
        out += ["\n## Chain length (Table 3)\n", score_table(chosen, tasks, lengths)]
    steps = _methods_where(
        chosen, methods, lambda s: adamw_full(s) and len(s["ranks"]) == 2 and s["ranks"][0] == base_rank
    )
    if ref and any(chosen_spec(chosen, m)["ranks"][1] != base_rank for m in steps):
        steps.sort(key=lambda m: -chosen_spec(chosen, m)["ranks"][1])
        out += [
            "\n## Rank step-down (Table 4)\n",
            score_table(chosen, tasks, [ref, *steps], _saved(chosen, ref)),
        ]
    opts = _methods_where(chosen, methods, lambda s: _trained(s) and s["optimizer"] != "adamw")
    if opts:
        opts.sort(key=lambda m: (chosen_spec(chosen, m)["optimizer"], len(chosen_spec(chosen, m)["ranks"])))
        out += ["\n## Base optimizers (Table 5)\n", score_table(chosen, tasks, opts)]
    low = _methods_where(chosen, methods, lambda s: _trained(s) and s["n_train"] < n_full)
    if low:
        low.sort(key=lambda m: (-chosen_spec(chosen, m)["n_train"], len(chosen_spec(chosen, m)["ranks"])))
        out += [
            "\n## Low-resource training sets (Table 6)\n",
            _n_note(chosen, low),
            score_table(chosen, tasks, low),
        ]
    auto = _methods_where(chosen, methods, lambda s: _trained(s) and s["knot_policy"] != "fixed")
    if auto:
        fixed = [m for m in lengths if len(chosen_spec(chosen, m)["ranks"]) > 1]
        out += [
            "\n## Knot placement: auto (loss plateau) against fixed\n",
            score_table(chosen, tasks, fixed + auto),
        ]
    out += _paired_sections(chosen, tasks, methods)
    out += [
        "\n## Cost per cell (mean over the tasks each method ran, and seeds)\n",
        _cost_table(chosen, methods, ref),
    ]
    return "\n".join(out)


def _paired_sections(chosen: dict, tasks: list[str], methods: list[str]) -> list[str]:
    """COLA − LoRA per seed, for every chain with a plain-LoRA reference of the same data size."""
    from lorachain.experiment.paired import paired_table, verdict

    out = []
    chains = _methods_where(
        chosen, methods, lambda s: _trained(s) and len(s["ranks"]) > 1 and s["knot_policy"] == "fixed"
    )
    for m in chains:
        spec = chosen_spec(chosen, m)
        ref = reference_method(chosen, methods, spec["n_train"])
        if ref is None or spec["optimizer"] != "adamw":
            continue
        table, total = paired_table(chosen, tasks, ref, m)
        out += [
            f"\n## Paired comparison: `{m}` − `{ref}` ({spec['n_train']} training examples)\n",
            table,
            f"\nOverall: {verdict(total)}; {total['above']} of {total['n']} paired runs above.\n",
        ]
    return out


def chosen_spec(chosen: dict, method: str | None) -> dict:
    return next((v["spec"] for (t, m), v in chosen.items() if m == method), {})


def _ratio(chosen: dict, m: str, ref: str | None, key: str) -> float | None:
    """Sum of `key` (flops, seconds) of method m over the tasks it shares with ref, over ref's."""
    pairs = [
        (v[key], chosen[(t, ref)][key]) for (t, mm), v in chosen.items() if mm == m and (t, ref) in chosen
    ]
    return sum(a for a, _ in pairs) / sum(b for _, b in pairs) if pairs and ref else None


def _saved(chosen: dict, ref: str) -> Callable[[str], str]:
    def saved(m: str) -> str:
        ratio = _ratio(chosen, m, ref, "flops")
        return "–" if m == ref or ratio is None else f"{100 * (1 - ratio):.2f}%"

    return saved


def _n_note(chosen: dict, methods: list[str]) -> str:
    sizes = sorted({chosen_spec(chosen, m)["n_train"] for m in methods}, reverse=True)
    return f"Training examples: {', '.join(str(s) for s in sizes)}; same validation and test sets as above.\n"


def _counts(chosen: dict, tasks: list[str]) -> str:
    rows = []
    for t in tasks:
        c = next((v["counts"] for (tt, _), v in chosen.items() if tt == t), {})
        seeds = max(len(v["test"]) for (tt, _), v in chosen.items() if tt == t)
        borrowed = c.get("borrowed_from_validation", 0)
        rows.append(
            [
                t,
                str(c.get("train", "?")),
                str(c.get("val", "?")),
                str(c.get("test", "?")),
                str(borrowed),
                str(seeds),
            ]
        )
    return (
        "Examples per split (train/val from the train split, test from the official validation split):\n\n"
        + _table(["task", "train", "val", "test", "borrowed from validation", "seeds"], rows)
    )


def _cost_table(chosen: dict, methods: list[str], ref: str | None) -> str:
    rows = []
    for m in methods:
        vals = [v for (t, mm), v in chosen.items() if mm == m]
        if not vals:
            continue
        time_ratio = _ratio(chosen, m, ref, "seconds")
        ratio = "–" if time_ratio is None else f"{time_ratio:.2f}"
        rows.append(
            [
                f"{label(vals[0]['spec'])} `{m}`",
                f"{statistics.fmean(v['seconds'] for v in vals):.1f}",
                ratio,
                f"{statistics.fmean(v['flops'] for v in vals):.3g}",
                f"{max(v['peak_rss_mb'] for v in vals):.0f}",
            ]
        )
    header = [
        "method",
        "seconds (train + eval)",
        f"time vs `{ref}`, same tasks",
        "est. train FLOPs",
        "peak RSS MB",
    ]
    return _table(header, rows)


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
    return (
        _trained(spec)
        and spec["optimizer"] == "adamw"
        and spec["knot_policy"] == "fixed"
        and spec["n_train"] == n_full
    )


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


def write_report(
    results: list[dict], out: Path, tasks: list[str] | None = None, methods: list[str] | None = None
) -> Path:
    """report.md and the PNG figures next to results.json."""
    if not results:
        return out
    write_text(out / "report.md", render(results, tasks, methods))
    plot(results, out)
    return out / "report.md"
