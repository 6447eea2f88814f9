"""Tables of COLA runs: the demo, the paper-protocol grids and the LoRA -> full fine-tuning gap."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from docgen.common import ROOT, f, load, signed, table


def paired_ci(s: dict) -> str:
    """A paired difference: mean [95% CI] (seeds above / tied / below)."""
    lo, hi = s["ci"]
    return f"{signed(s['mean'])} [{signed(lo)}, {signed(hi)}] ({s['above']} / {s['tied']} / {s['below']})"


def _cells(results: dict | list) -> list:
    """Result rows from a {path: result.json} glob or a results.json list."""
    return list(results.values()) if isinstance(results, dict) else results


def demo(d: dict) -> str:
    cola = table(
        ["method", "links", "steps", "train loss (last)", "eval loss", "accuracy", "train s", "peak RSS MB"],
        [
            [
                r[k]
                for k in (
                    "method",
                    "links",
                    "steps",
                    "train_loss",
                    "eval_loss",
                    "accuracy",
                    "train_s",
                    "peak_mem_mb",
                )
            ]
            for r in d["cola"]
        ],
    )
    rows = []
    for task, t in d["routing"]["table"].items():
        ppl, em = t["perplexity"], t["exact_match"]
        rows.append(
            [
                task,
                t["n"],
                f(t["selector_top1"]),
                " / ".join(f(ppl[k], 2) for k in ("routed", "base", "mixed")),
                " / ".join(f(em[k]) for k in ("routed", "base", "mixed")),
            ]
        )
    routing = table(
        ["task", "n", "top-1", "ppl routed / base / mixed", "exact match routed / base / mixed"], rows
    )
    tot = d["total"]
    return (
        f"{cola}\n\n{routing}\n\nWhole demo: {tot['wall_seconds'] / 60:.1f} min of wall time, "
        f"{tot['cpu_seconds']:.0f} s of CPU; one reading"
        + (
            f", load average {tot['load_average_at_end'][2]:.1f} at the end"
            if "load_average_at_end" in tot
            else ""
        )
        + "."
    )


def paired_grid(pairs: list[tuple[str, str]]) -> Callable[[list], str]:
    """Mean ± std per method at its chosen lr and the paired difference against the reference."""

    def render(results: list) -> str:
        from lorachain.experiment.choose import select
        from lorachain.experiment.paired import mean_std, per_task

        chosen = select(results)
        tasks = list(dict.fromkeys(r["task"] for r in results))
        methods = list(dict.fromkeys(m for pair in pairs for m in pair))
        header = ["task", *[f"`{m}`" for m in methods]]
        header += [f"`{o}` − `{ref}` [95% CI] (above / tied / below)" for ref, o in pairs]
        rows, pooled = [], []
        stats = [per_task(chosen, tasks, ref, o) for ref, o in pairs]
        for t in tasks:
            row = [t]
            for m in methods:
                c = chosen.get((t, m))
                row.append(f"{mean_std(list(c['test'].values()))} (lr {c['lr']:g})" if c else "-")
            for by_task, _ in stats:
                s = by_task.get(t)
                row.append(paired_ci(s) if s else "-")
            rows.append(row)
        pooled = ["**pooled**", *[""] * len(methods), *[f"**{paired_ci(p)}**" for _, p in stats]]
        return table(header, rows + [pooled])

    return render


def grid_scores(results: list) -> str:
    from lorachain.experiment.choose import select
    from lorachain.experiment.report import score_table

    chosen = select(results)
    tasks = list(dict.fromkeys(r["task"] for r in results))
    methods = list(dict.fromkeys(r["method"] for r in results))
    return score_table(chosen, tasks, methods).strip()


def gap_pilot(results: list) -> str:
    """One seed: each method's test score (GSM8K: and reference NLL) per lr, and full − LoRA r=8."""
    from lorachain.experiment.choose import select

    results = _cells(results)
    by = {(r["task"], r["method"], r["lr"]): r for r in results}
    tasks = list(dict.fromkeys(r["task"] for r in results))
    full_lrs = sorted({r["lr"] for r in results if r["method"] == "full"}, reverse=True)
    cols = [("full", lr) for lr in full_lrs] + [("lora_r8", 1e-3), ("lora_r1", 1e-3)]
    chosen = select(results)  # the full fine-tuning lr with the best validation score

    def shown(c):
        if not c:
            return "…"
        nll = c["test"].get("ref_nll")
        return f"{c['test']['score'] * 100:.1f}" + (f" (NLL {nll:.3f})" if nll is not None else "")

    rows = []
    for t in tasks:
        cells = [by.get((t, m, lr)) for m, lr in cols]
        best = by.get((t, "full", chosen[(t, "full")]["lr"])) if (t, "full") in chosen else None
        lora = by.get((t, "lora_r8", 1e-3))
        gap = signed((best["test"]["score"] - lora["test"]["score"]) * 100) if best and lora else "…"
        rows.append([t, *map(shown, cells), gap, (best or lora or {}).get("counts", {}).get("test", "…")])
    heads = [f"full lr {lr:g}" if m == "full" else f"LoRA r={m.split('_r')[1]}" for m, lr in cols]
    gap_head = "full (lr chosen on val) − LoRA r=8 (points)"
    return table(["task", *heads, gap_head, "test rows"], rows)


def gap_grid(results) -> str:
    """The gap grid's finished cells so far, one row each, in the grid's order of methods."""
    from lorachain.experiment.report import ran_emulated

    results = _cells(results)
    methods = _gap_methods()
    rows = []
    for r in sorted(results, key=lambda r: (methods.index(r["method"]), r["seed"], -r["lr"])):
        forgot = r.get("forgetting", {})
        emulated = ran_emulated(r)  # bf16 emulated on a CPU without native bf16
        rows.append(
            [
                f"`{r['method']}`" + (" (e)" if emulated else ""),
                r["seed"],
                f"{r['lr']:g}",
                f"{r['val']['score'] * 100:.1f}",
                f"{r['test']['score'] * 100:.1f}",
                f"{forgot['general_nll_increase']:+.2f}" if "general_nll_increase" in forgot else "-",
                signed(-forgot["task_score_drop"] * 100) if "task_score_drop" in forgot else "-",
                f"{r['cost']['cell_seconds']:,.0f}",
            ]
        )
    head = ["method", "seed", "lr", "val", "test", "general NLL change", "COPA change (points)"]
    return table(head + ["cell seconds"], rows)


def _grid_run(cell: dict) -> str:
    """How a grid cell ran: bf16 natively, or emulated on a CPU without native bf16 matmuls."""
    from lorachain.experiment.report import ran_emulated

    return "grid, emulated bf16" if ran_emulated(cell) else "grid, native bf16"


def gap_precision_check(results) -> str:
    """One grid cell (LoRA r=1, seed 0) as the grid ran it (native bf16) and again on an AVX2-only CPU
    in emulated bf16 and in fp32; the grid's other seeds at the same lr (each labelled with how it
    ran) show how far a seed moves it."""
    results = _cells(results)
    fp32 = list(load("results/cola_gap_fp32_check/cells/*/*/*/*/result.json").values())
    grid = list(load("results/cola_gap_smollm2/cells/*/*/*/*/result.json").values())
    rows = []
    for r in results:
        key = (r["method"], r["lr"])
        same = [g for g in grid if (g["method"], g["lr"]) == key]
        runs = [(_grid_run(g), g) for g in same if g["seed"] == r["seed"]]
        runs += [("this CPU, emulated bf16", r)]
        twin = [x for x in fp32 if (x["method"], x["lr"]) == key and x["seed"] == r["seed"]]
        runs += [("this CPU, fp32", x) for x in twin]
        runs += [(f"{_grid_run(g)}, seed {g['seed']}", g) for g in same if g["seed"] != r["seed"]]
        for label, x in runs:
            forgot = x["forgetting"]
            rows.append(
                [
                    f"`{x['method']}` lr {x['lr']:g} seed {x['seed']}",
                    label,
                    f"{x['knots'][-1]['final_loss']:.4f}",
                    f"{x['val']['score'] * 100:.1f}",
                    f"{x['test']['score'] * 100:.1f}",
                    f"{forgot['general_nll_increase']:+.3f}",
                    signed(-forgot["task_score_drop"] * 100),
                    f"{x['cost']['train_seconds'] / x['spec']['steps']:.2f}",
                ]
            )
    head = ["cell", "run", "final train loss", "val", "test", "general NLL change", "COPA change"]
    return table(head + ["train s/step"], rows)


GAP_CONFIG = ROOT / "configs/experiments/cola_gap_smollm2.yaml"


def _gap_methods() -> list[str]:
    import yaml

    return list(yaml.safe_load(GAP_CONFIG.read_text())["methods"])


def planned_progress(config: Path, results: list) -> tuple[int, int, list[str], int]:
    """(planned cells, cells in, the methods still short of cells in plan order, seeds) of the
    experiment at `config`; a finished cell the plan does not list does not count."""
    from lorachain.config import load_config
    from lorachain.experiment.config import ExperimentConfig
    from lorachain.experiment.runner import Cell, plan

    cfg = load_config(config, cls=ExperimentConfig)
    cells = plan(cfg)
    done = {Cell(r["task"], r["method"], r["seed"], r["lr"]).id for r in results}
    missing = [c for c in cells if c.id not in done]
    short = sorted({c.method for c in missing}, key=list(cfg.methods).index)
    return len(cells), len(cells) - len(missing), short, len(cfg.seeds)


def gap_progress(results: list) -> str:
    """How far the grid is: finished cells of those planned, and whether every method has all seeds."""
    planned, done, short, seeds = planned_progress(GAP_CONFIG, results)
    if not short:
        return f"All {planned} planned cells are in: every method has {seeds} seeds."
    return (
        f"**Interim: {done} of {planned} planned cells are in**; still to land for "
        f"{', '.join(f'`{m}`' for m in short)}. Nothing here is a conclusion until every method has "
        f"{seeds} seeds."
    )


def gap_report(results) -> str:
    """The gap report's tables (`lorachain report`'s gap section) from the grid's finished cells."""
    from lorachain.experiment import gap

    results = _cells(results)
    methods = [m for m in _gap_methods() if any(r["method"] == m for r in results)]
    text = gap.render(results, methods=methods)
    return gap_progress(results) + "\n\n" + text.split("\n", 2)[2].strip()  # without its own heading


def gap_knots(results) -> str:
    """The gap report's knot-placement section: auto knots against the fixed chains, and where they fell."""
    from lorachain.experiment import report

    text = report.render(_cells(results))
    if report.KNOTS_HEADING not in text:
        return "No auto-knot cell yet."
    section = text.split(report.KNOTS_HEADING, 1)[1].split("\n## ", 1)[0]
    return re.sub(r"\n{3,}", "\n\n", section.strip())


def gap_summary(results) -> str:
    """The README's short gap table: each method's score and forgetting, each chain's gap closed."""
    from lorachain.experiment import gap
    from lorachain.experiment.choose import select

    results = _cells(results)
    chosen = select(results)
    methods = [m for m in _gap_methods() if ("wic", m) in chosen]
    full, lora, chains = gap.roles(chosen, methods)
    rows = []
    for m in methods:
        c = chosen[("wic", m)]
        nll = gap.forgetting_values(chosen, "wic", m, "general_nll_increase")
        closed = "–"
        if m in chains and lora.get(chains[m]) and full:
            g = gap.closed_fraction(chosen, "wic", full, lora[chains[m]], m)
            closed = gap._closed(g) if g["n"] else "–"
        scores = list(c["test"].values())
        rows.append([f"`{m}`", len(scores), gap._mean_std(scores), gap._mean_std(nll, 1.0, 2), closed])
    head = ["method (WiC)", "seeds", "test ×100", "general NLL increase", "gap closed [95% CI]"]
    report = gap.render(results, methods=methods)  # its sentences, so the README's words match the intervals
    words = report[report.index("In words") :].strip()
    return gap_progress(results) + "\n\n" + table(head, rows) + "\n\n" + words
