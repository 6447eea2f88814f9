"""Tables shaped like the COLA paper's, computed from an experiment's results.json: test scores
(x100) as mean ± std over seeds at each (task, method)'s validation-chosen learning rate
(`choose.py`), the paired COLA − LoRA comparison (`paired.py`), and the figures (`figures.py`).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

from lorachain.experiment import capacity, gap, gap_plot
from lorachain.experiment.choose import (
    chosen_spec,
    comparisons,
    methods_where,
    one_schedule,
    reference_method,
    select,
    trained,
)
from lorachain.experiment.figures import plot, plot_comparisons
from lorachain.experiment.paired import mean_std, paired_table, verdict
from lorachain.io import write_text

KNOTS_HEADING = "## Knot placement: auto (loss plateau) against fixed\n"


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
    if spec.get("restart_per_link"):
        extras.append("lr restarts")
    peers = (spec.get("init"), "DoRA" * bool(spec.get("dora")), "rsLoRA" * bool(spec.get("rslora")))
    extras += [x for x in peers if x]
    if spec.get("loraplus"):
        extras.append(f"LoRA+ x{spec['loraplus']:g}")
    return text + (f" [{', '.join(extras)}]" if extras else "")


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
    main = methods_where(
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
        others = [m for m in main if m != ref and trained(chosen_spec(chosen, m))]
        if others:
            out += [
                f"\nRelative gain over `{ref}` (mean over seeds):\n",
                gain_table(chosen, tasks, others, ref),
            ]
    base_rank = chosen_spec(chosen, ref)["ranks"][0] if ref else None

    def adamw_full(s: dict) -> bool:
        return trained(s) and s["n_train"] == n_full and one_schedule(s)

    lengths = methods_where(chosen, methods, lambda s: adamw_full(s) and set(s["ranks"]) == {base_rank})
    if len({len(chosen_spec(chosen, m)["ranks"]) for m in lengths}) > 1:
        lengths.sort(key=lambda m: len(chosen_spec(chosen, m)["ranks"]))
        out += ["\n## Chain length (Table 3)\n", score_table(chosen, tasks, lengths)]
    steps = methods_where(
        chosen, methods, lambda s: adamw_full(s) and len(s["ranks"]) == 2 and s["ranks"][0] == base_rank
    )
    if ref and any(chosen_spec(chosen, m)["ranks"][1] != base_rank for m in steps):
        steps.sort(key=lambda m: -chosen_spec(chosen, m)["ranks"][1])
        out += [
            "\n## Rank step-down (Table 4)\n",
            score_table(chosen, tasks, [ref, *steps], _saved(chosen, ref)),
        ]
    opts = methods_where(chosen, methods, lambda s: trained(s) and s["optimizer"] != "adamw")
    if opts:
        opts.sort(key=lambda m: (chosen_spec(chosen, m)["optimizer"], len(chosen_spec(chosen, m)["ranks"])))
        out += ["\n## Base optimizers (Table 5)\n", score_table(chosen, tasks, opts)]
    low = methods_where(chosen, methods, lambda s: trained(s) and s["n_train"] < n_full)
    if low:
        low.sort(key=lambda m: (-chosen_spec(chosen, m)["n_train"], len(chosen_spec(chosen, m)["ranks"])))
        out += [
            "\n## Low-resource training sets (Table 6)\n",
            _n_note(chosen, low),
            score_table(chosen, tasks, low),
        ]
    fixed = [m for m in lengths if len(chosen_spec(chosen, m)["ranks"]) > 1]  # plain chains
    auto = methods_where(chosen, methods, lambda s: trained(s) and s["knot_policy"] != "fixed")
    if auto:  # where knots fell, beside the fixed chains of as many links
        links = {len(chosen_spec(chosen, m)["ranks"]) for m in auto}
        same = [m for m in fixed if len(chosen_spec(chosen, m)["ranks"]) in links]
        out += [
            f"\n{KNOTS_HEADING}",
            score_table(chosen, tasks, fixed + auto),
            *(_knot_steps(chosen, m) for m in [*same, *auto]),
        ]
    restarts = methods_where(chosen, methods, lambda s: trained(s) and bool(s.get("restart_per_link")))
    if restarts:
        out += [
            "\n## Learning-rate restarts per link (ReLoRA's schedule) against one schedule\n",
            score_table(chosen, tasks, fixed + restarts),
        ]
    out += _paired_sections(chosen, tasks, methods)
    out += [
        "\n## Cost per cell (mean over the tasks each method ran, and seeds)\n",
        _cost_table(chosen, methods, ref),
    ]
    emulated = sum(map(ran_emulated, results))
    if emulated:
        out.append(
            f"\n{emulated} of {len(results)} cells trained with their low-precision matmuls emulated in fp32 "
            "on a CPU without native ones: the same numbers up to accumulation order, that CPU's seconds.\n"
        )
    out.append(_total_cost(results))
    return "\n".join(out)


def _total_cost(results: list[dict]) -> str:
    """What every cell of the grid cost together, in core-hours of cell time (split by matmul kind
    when some cells were emulated), to set against the estimate in the grid's config."""

    def cells(n: int) -> str:
        return f"{n} cell" if n == 1 else f"{n} cells"

    hours = sum(r["cost"]["cell_seconds"] for r in results) / 3600
    line = f"\n{cells(len(results))} in all: {hours:.1f} core-hours of cell time (training, evaluation"
    line += " and forgetting; a resumed cell counts every sitting)"
    emulated = [r for r in results if ran_emulated(r)]
    if emulated:
        part = sum(r["cost"]["cell_seconds"] for r in emulated) / 3600
        line += f", {part:.1f} of them in the {cells(len(emulated))} with emulated matmuls"
    return line + ".\n"


def _paired_sections(chosen: dict, tasks: list[str], methods: list[str]) -> list[str]:
    """COLA − LoRA per seed, for every chain with a plain-LoRA reference of the same data size."""
    out = []
    for m, ref, n in comparisons(chosen, methods):
        table, total = paired_table(chosen, tasks, ref, m)
        out += [
            f"\n## Paired comparison: `{m}` − `{ref}` ({n} training examples)\n",
            table,
            f"\nOverall: {verdict(total)}; {total['above']} of {total['n']} paired runs above.\n",
        ]
    return out


def _ratio(chosen: dict, m: str, ref: str | None, key: str) -> float | None:
    """Sum of `key` (flops, seconds) of method m over the tasks it shares with ref, over ref's."""
    pairs = [
        (v[key], chosen[(t, ref)][key]) for (t, mm), v in chosen.items() if mm == m and (t, ref) in chosen
    ]
    return sum(a for a, _ in pairs) / sum(b for _, b in pairs) if pairs and ref else None


def _time_ratio(chosen: dict, m: str, ref: str | None) -> float | None:
    """m's cell seconds over ref's, summed over the cells both ran with the same task, seed and
    matmul kind, so a grid whose cells ran on CPUs with and without native bf16 compares like with
    like; None without such a pair."""

    def key(r: dict) -> tuple:
        return r["seed"], r.get("spec", {}).get("matmul")

    pairs = []
    for (t, mm), v in chosen.items():
        if ref and mm == m and (t, ref) in chosen:
            theirs = {key(r): r["cost"]["cell_seconds"] for r in chosen[(t, ref)]["rows"]}
            pairs += [(r["cost"]["cell_seconds"], theirs[key(r)]) for r in v["rows"] if key(r) in theirs]
    return sum(a for a, _ in pairs) / sum(b for _, b in pairs) if pairs else None


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


def _knot_steps(chosen: dict, m: str) -> str:
    """Where a chain tied its knots: the median step of each knot over the chosen cells, and the last
    batch's training loss there when the cells recorded it."""
    rows = [r for (t, mm), v in chosen.items() if mm == m for r in v["rows"]]
    knots = [r.get("knots", []) for r in rows]
    if not any(knots):
        return ""  # cells from before knots were recorded
    ends = [[k["end_step"] for k in ks[:-1]] for ks in knots]  # the last link ends the run
    n = min(len(e) for e in ends)
    if not n:
        return f"\n`{m}` tied no knot: one link ran the whole budget.\n"
    steps = ", ".join(f"{statistics.median(e[i] for e in ends):g}" for i in range(n))
    total = rows[0].get("spec", {}).get("steps", "?")
    tied = sorted({len(e) for e in ends})
    where = f"at steps {steps} of {total} (medians over its {len(rows)} cells)"
    losses = [[k.get("final_loss") for k in ks[: n + 1]] for ks in knots]
    if all(len(x) == n + 1 and None not in x for x in losses):
        med = [statistics.median(x[i] for x in losses) for i in range(n + 1)]
        at = ", ".join(f"{v:.3g}" for v in med[:-1])
        where += f"; the last batch's training loss there {at}, "
        where += f"and {med[-1]:.3g} when the next link ended (medians)"
    return f"\n`{m}` tied {'/'.join(map(str, tied))} knots, {where}.\n"


def ran_emulated(r: dict) -> bool:
    """Whether a cell trained with its low-precision matmuls emulated (a CPU without native bf16)."""
    return r.get("spec", {}).get("matmul") == "emulated"


def _seconds(vals: list[dict], emulated: bool | None) -> str:
    """Mean cell seconds over the rows (only those with `emulated` matmuls, unless None)."""
    secs = [r["cost"]["cell_seconds"] for v in vals for r in v["rows"] if emulated in (None, ran_emulated(r))]
    return f"{statistics.fmean(secs):.1f}" if secs else "–"


def _cost_table(chosen: dict, methods: list[str], ref: str | None) -> str:
    """Seconds are averaged per matmul kind when a grid ran on CPUs with and without native ones."""
    mixed = len({ran_emulated(r) for v in chosen.values() for r in v["rows"]}) == 2
    kinds = [False, True] if mixed else [None]
    rows = []
    for m in methods:
        vals = [v for (t, mm), v in chosen.items() if mm == m]
        if not vals:
            continue
        time_ratio = _time_ratio(chosen, m, ref)
        ratio = "–" if time_ratio is None else f"{time_ratio:.2f}"
        rows.append(
            [
                f"{label(vals[0]['spec'])} `{m}`",
                *(_seconds(vals, k) for k in kinds),
                ratio,
                f"{statistics.fmean(v['flops'] for v in vals):.3g}",
                f"{max(v['peak_rss_mb'] for v in vals):.0f}",
            ]
        )
    seconds = ["seconds, native matmuls", "seconds, emulated matmuls"]
    if not mixed:
        seconds = ["seconds (train + eval)"]
    header = [
        "method",
        *seconds,
        f"time vs `{ref}`, same tasks, seeds and matmuls",
        "est. train FLOPs",
        "peak RSS MB",
    ]
    return _table(header, rows)


def write_report(
    results: list[dict], out: Path, tasks: list[str] | None = None, methods: list[str] | None = None
) -> Path:
    """report.md and the PNG figures next to results.json."""
    if not results:
        return out
    sections = [render(results, tasks, methods), gap.render(results, tasks, methods)]
    sections.append(capacity.render(results, methods))
    write_text(out / "report.md", "\n".join(x.rstrip("\n") + "\n" for x in sections if x))
    plot(results, out)
    gap_plot.plot(results, out, tasks)
    plot_comparisons(results, out / "paired.png", tasks)
    capacity.plot_curves(results, out)
    return out / "report.md"
