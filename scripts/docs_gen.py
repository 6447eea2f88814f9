"""Generated parts of the docs and the README, so that no figure is typed by hand.

- `docs/reference/config.md` from the config dataclasses (every key, type, default, comment);
- `docs/reference/cli.md` from the argparse parser;
- every table between `<!-- table: NAME -->` and `<!-- /table -->` in README.md and docs/**/*.md,
  rendered from the committed JSON named in `TABLES` (benchmarks/results/, results/).

    python scripts/docs_gen.py           # write them (make docs-tables)
    python scripts/docs_gen.py --check   # exit 1 listing every file that differs (the drift test)
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import sys
import typing
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARK = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


def load(rel: str | list[str]) -> dict | list:
    """The JSON at `rel`, or with a `*` in it (or a list of paths), {path: JSON} of every match."""
    if isinstance(rel, list):
        return {r: json.loads((ROOT / r).read_text()) for r in rel}
    if "*" in rel:
        return {str(p.relative_to(ROOT)): json.loads(p.read_text()) for p in sorted(ROOT.glob(rel))}
    return json.loads((ROOT / rel).read_text())


def exists(rel: str | list[str]) -> bool:
    if isinstance(rel, list):
        return all((ROOT / r).is_file() for r in rel)
    return any(ROOT.glob(rel)) if "*" in rel else (ROOT / rel).is_file()


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def f(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def signed(x: float) -> str:
    """+1.2 / −1.2; a value that rounds to zero is +0.0, never −0.0."""
    return f"{round(x, 1) + 0.0:+.1f}".replace("-", "−")


# -- renderers: (json path, command, render(data) -> markdown table) ------------------------------
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
                row.append(_ci(s) if s else "-")
            rows.append(row)
        pooled = ["**pooled**", *[""] * len(methods), *[f"**{_ci(p)}**" for _, p in stats]]
        return table(header, rows + [pooled])

    return render


def _ci(s: dict) -> str:
    lo, hi = s["ci"]
    return f"{signed(s['mean'])} [{signed(lo)}, {signed(hi)}] ({s['above']} / {s['tied']} / {s['below']})"


def precision_speed(d: dict) -> str:
    rows = [
        [k, f(d.get(f"step_time_ratio_{k}") if k != "fp32" else 1.0, 2)]
        for k in ("fp32", "bf16", "bf16_base", "bf16_sdpa")
    ]
    return table(["configuration", "step time / fp32"], rows) + (
        f"\n\nbf16 reaches {d['fraction_of_bf16_peak']:.0%} of the bf16 matmul peak "
        f"({d['matmul_peak_gflops']['bf16']:.0f} GFLOP/s); accuracy fp32 {d['accuracy_fp32']:.3f}, "
        f"bf16 {d['accuracy_bf16']:.3f}; peak RSS bf16 / fp32 {d['rss_ratio_bf16']:.2f}."
    )


def emulated_bf16(d: dict) -> str:
    rows = [
        [
            r["shape"],
            f(r["fp32_gflops"], 1),
            f(r["emulated_gflops"], 1),
            f(r["native_gflops"], 1),
            f(r["emulated_gflops"] / r["native_gflops"], 1),
            *(f"{r['exactness'][k]['equal_share']:.1%}" for k in ("emulated", "native") if "exactness" in r),
        ]
        for r in d["matmuls"]
    ]
    head = ["linear (640 rows), fwd + bwd", "fp32 GFLOP/s", "bf16 emulated", "bf16 native"]
    head.append("emulated / native")
    if "exactness" in d["matmuls"][0]:
        head += ["exactly rounded: emulated", "native"]
    text = table(head, rows)
    if "first_loss" in d:
        fl = d["first_loss"]
        text += (
            f"\n\nFirst batch's loss (SmolLM2 LoRA, bf16 autocast): exact bf16 matmuls {fl['exact']:.4f}, "
            f"emulated {fl['emulated']:.4f}, native {fl['native']:.4f}; fp32 {fl['fp32']:.4f}."
        )
    if "steps" in d:
        s = d["steps"]
        text += (
            f"\n\nA LoRA step of the one loop, CPU seconds: fp32 {s['fp32']['cpu_step_s']:.2f}, "
            f"bf16 emulated {s['emulated']['cpu_step_s']:.2f} ({s['emulated']['vs_fp32']:.2f}x fp32), "
            f"bf16 native {s['native']['cpu_step_s']:.2f} ({s['native']['vs_fp32']:.1f}x fp32)."
        )
    native = "with" if d["native_bf16_cpu"] else "without"
    return text + f"\n\nCPU: {d['cpu']} {native} native bf16, {d['threads']} thread."


def cola_cost(d: dict) -> str:
    rows = [
        [
            r["config"],
            f(r["time_ratio"]),
            f(r["mem_ratio"]),
            f(r["median_step_s"]),
            f(r["median_knot_s"]),
            f(r["knot_over_step"], 2),
            f"{r['flops_saved_vs_lora']:.2%}",
            f"{r['peak_rss_mb']:.0f}",
        ]
        for r in d["rows"]
    ]
    return table(
        [
            "configuration",
            "time ratio",
            "peak-memory ratio",
            "step s",
            "knot s",
            "knot / step",
            "training FLOPs saved",
            "peak RSS MB",
        ],
        rows,
    )


def lm_eval(d: dict) -> str:
    s, g, c = d["sst2"], d["gsm8k"], d["gsm8k_chat"]
    rows = [
        [
            "SST-2 log-likelihood",
            s["samples"],
            f"max |Δ loglik| {s['max_abs_loglik_diff']:.1e}",
            f"{s['acc_server']:.3f} / {s['acc_hf']:.3f}",
        ],
        [
            "GSM8K greedy",
            g["samples"],
            f"{g['generations_equal']} of {g['samples']} generations equal",
            f"{g['exact_match_server']:.2f} / {g['exact_match_hf']:.2f}",
        ],
        [
            "GSM8K chat",
            c["samples"],
            f"{c['generations_equal']} of {c['samples']} generations equal",
            f"{c['exact_match_server']:.2f} / {c['exact_match_hf']:.2f}",
        ],
    ]
    return table(["through `lorachain serve`", "samples", "agreement", "score (server / hf+peft)"], rows)


def serve_big(d: dict) -> str:
    rows = []
    for key in ("under_limit_400", "over_limit_413"):
        r = d[key]
        codes = ", ".join(f"{n} × {c}" for c, n in r["codes"].items())
        rows.append(
            [
                f"{r['limit_mb']} MB",
                codes,
                f"{r['big_p50_s']:.2f} / {r['big_max_s']:.2f} s",
                f"{r['health_p50_ms']:.0f} / {r['health_p99_ms']:.0f} / {r['health_max_ms']:.0f} ms",
                f"{r['rss_mb_peak']:.0f} MB",
            ]
        )
    return table(
        ["body limit", "answers", "big request p50 / max", "`/health` p50 / p99 / max", "RSS peak"], rows
    )


def serve_load(d: dict) -> str:
    rows = []
    for c in d["results"]["mixed"]:
        cell = [d["results"][k][c] for k in ("mixed", "swap", "single")]
        rows.append(
            [
                c,
                *[f"{x['tokens_per_s']:.1f} ({x['p50_s']:.2f} / {x['p99_s']:.2f} s)" for x in cell],
                f(d["ratios"][c]["mixed_over_swap"], 2),
                f(d["ratios"][c]["mixed_over_single"], 2),
            ]
        )
    return table(
        [
            "concurrency",
            "(a) mixed batching",
            "(b) swapped per request",
            "(c) all on one adapter",
            "a / b",
            "a / c",
        ],
        rows,
    )


def parallel(d: dict) -> str:
    rows = []
    for mode, m in d["modes"].items():
        reps = " / ".join(f"{x:.2f}" for x in m["step_s_per_repeat"])
        shape = "×".join(str(x) for x in m["q_proj_local_shape"])
        rss, knot = f"{m['train_peak_rss_mb']:.0f}", f"{m['knot_s']:.3f}"
        rows.append([mode, f"{m['step_s']:.2f}", reps, rss, knot, shape])
    head = ["mode", "median step s", "per-repeat medians", "peak RSS per rank MB", "knot s", "local q_proj"]
    ratios = (
        f"DDP / hand all-reduce step time {d['ddp_step_time_ratio_vs_hand_allreduce']:.3f}; FSDP / DDP "
        f"{d['fsdp_step_time_ratio_vs_ddp']:.2f}; FSDP rank peak RSS / one process "
        f"{d['fsdp_rank_rss_ratio_world2']:.2f}; a knot gathers a full weight: "
        f"{d['knot_gathers_full_weight']}; "
        f"bytes a knot communicates under FSDP: {d['knot_comm_bytes_fsdp']} ({d['machine']})."
    )
    return table(head, rows) + "\n\n" + ratios


def scale(d: dict) -> str:
    """benchmarks/scale.py: each cell in its own process, peak RSS and CPU seconds per step."""
    rows = []
    for c in d["cells"]:
        if c["kind"] not in ("lorachain", "trainer"):
            continue
        what = f"{c['kind']} {c['method']}" + (f" ({c['knot']} knot)" if c.get("knot") else "")
        rows.append(
            [
                c["size"],
                c["base"],
                "yes" if c["ckpt"] else "no",
                f"{c['batch']}×{c['seq']}",
                what,
                f"{c['peak_rss_gib']:.2f}",
                f(c.get("estimate_gib"), 2),
                f(c["cpu_seconds_per_step"], 2),
                f(c.get("knot_seconds"), 2),
                f(c.get("knot_rel_fro"), 3),
            ]
        )
    head = [
        "shape",
        "base",
        "ckpt",
        "batch",
        "run",
        "peak RSS GiB",
        "estimate GiB",
        "CPU s/step",
        "knot s",
        "knot rel. loss",
    ]
    top = [
        [
            "7B-shape NF4 COLA with a knot, checkpointing, 1×128: peak RSS",
            f"{d['peak_rss_gib_7b_nf4_cola']:.2f} GiB",
            "≤ 8 GiB",
        ],
        ["its knot", f"{d['knot_seconds_7b']:.2f} s", ""],
        ["NF4 / bf16 peak RSS at ~1B", f"{d['rss_ratio_nf4_vs_bf16_1b']:.2f}", "≤ 0.45"],
        [
            "checkpointing at 1,024 tokens: peak RSS / step time",
            f"{d['grad_ckpt_rss_ratio_1024']:.2f} / {d['grad_ckpt_step_time_ratio_1024']:.2f}",
            "≤ 0.6 / ≤ 1.35",
        ],
        ["packing tokens/s, GSM8K chat", f"{d['packing_tokens_per_s_ratio']:.2f}×", "≥ 1.5×"],
        [
            "lorachain / Trainer+PEFT step time (135M bf16, 135M NF4, 1B NF4)",
            ", ".join(f"{r['step_time_ratio']:.2f}" for r in d["lorachain_vs_trainer"]),
            "≤ 1.0",
        ],
        [
            "lorachain / Trainer+PEFT peak RSS",
            ", ".join(f"{r['rss_ratio']:.2f}" for r in d["lorachain_vs_trainer"]),
            "≤ 1.0",
        ],
        [
            "knot on NF4: side path / requantize, relative loss of the update",
            f"{d['knot_rel_fro_nf4_side_135m']:.3f} / {d['knot_rel_fro_nf4_requantize_135m']:.3f}",
            "side: 0",
        ],
    ]
    acc = d.get("sst2_accuracy", {})
    if any(v is not None for v in acc.values()):
        top.append(
            [
                "SST-2 accuracy on real SmolLM2 weights, fp32 / bf16 / nf4",
                " / ".join(f(acc.get(k)) for k in ("fp32", "bf16", "nf4")),
                "nf4 within noise of bf16",
            ]
        )
    return (
        table(["figure", "measured", "target"], top)
        + "\n\n"
        + table(head, rows)
        + f"\n\n{d['machine']}; cells from: {'; '.join(f'`{c}`' for c in d.get('commands', []))}"
    )


def routing_cost(d: dict) -> str:
    s, kinds = d["switch"], d.get("ask_by_selector_kind", {})
    mem = {m["adapters"]: m for m in d["memory"]}
    rows = [
        ["cached switch", f"{s['cached_switch_ms']:.2f} ms"],
        [
            "cold load (new buffer / reused buffer)",
            f"{s['cold_load_new_buffer_ms']:.1f} / {s['cold_load_reused_buffer_ms']:.1f} ms",
        ],
        ["first load of an adapter form", f"{s['first_load_new_slot_ms']:.0f} ms"],
        ["PEFT load_adapter + set_adapter (naive)", f"{s['peft_naive_load_set_ms']:.0f} ms"],
        *[
            [f"RSS growth at {n} adapters / on disk", f"{m['growth_mb'] / m['expected_mb']:.2f}×"]
            for n, m in sorted(mem.items())
            if m.get("expected_mb")
        ],
        *[
            [f"routed / direct answer, `{k}` selector", f"{v['routed_total_s'] / v['direct_total_s']:.2f}"]
            for k, v in kinds.items()
        ],
    ]
    return table(["measure", "median"], rows)


def route_eval(d: dict) -> str:
    p, q = d["perplexity"], d.get("quality", {})
    sel = d["selection"].get("score", {}).get("per_task", {})
    cols = [k for k in ("oracle", "mixed", "routed", "base") if k in p]
    rows = []
    for t in sorted(d["per_task_rows"]):
        rouge = [f(q[k][t].get("rougeL")) if k in q else "-" for k in ("routed", "mixed")]
        rows.append(
            [
                t,
                d["per_task_rows"][t],
                *[f(p[k][t], 2) for k in cols],
                f((sel.get(t) or {}).get("top1")),
                *rouge,
            ]
        )
    if "overall" in d:
        o = d["overall"]
        rouge = [f(o["quality"][k].get("rougeL")) if k in o["quality"] else "-" for k in ("routed", "mixed")]
        rows.append(
            [
                "**all, pooled**",
                o["rows"],
                *[f(o["perplexity"][k], 2) for k in cols],
                f(d["selection"].get("score", {}).get("top1")),
                *rouge,
            ]
        )
    header = [
        "task",
        "rows",
        *[f"ppl {k}" for k in cols],
        "selector top-1",
        "ROUGE-L routed",
        "ROUGE-L mixed",
    ]
    return table(header, rows)


def unseen_answers(runs: dict) -> str:
    """`route eval --unseen` (and the same store's test split): answers per task type and pooled,
    ROUGE-L of routed-with-fallback, top-1 without fallback, oracle, mixed and base."""
    kinds = ("routed", "top1", "oracle", "mixed", "base")
    rows = []
    for path, d in runs.items():
        run, q, o = Path(path).parent.name, d["quality"], d["overall"]
        sel = d["selection"]["score"]
        for t in [*sorted(d["per_task_rows"]), "all"]:
            per = o["quality"] if t == "all" else {k: q[k][t] for k in kinds}
            ppl = o["perplexity"] if t == "all" else {k: d["perplexity"][k][t] for k in kinds}
            top1 = sel["top1"] if t == "all" else sel["per_task"][t]["top1"]
            rows.append(
                [
                    f"`{run}`" if t == "all" else "",
                    f"**{t}**" if t == "all" else t,
                    o["rows"] if t == "all" else d["per_task_rows"][t],
                    f(top1, 2),
                    *[f(per[k]["rougeL"]) for k in kinds],
                    signed(100 * (per["routed"]["rougeL"] - per["mixed"]["rougeL"])),
                    f"{ppl['routed']:.2f} / {ppl['mixed']:.2f}",
                ]
            )
        p = sel.get("routed_precision")
        rows[-1][1] = f"**all** (sent to a task adapter: {f(1 - sel['fallbacks'], 2)}, right {f(p, 2)})"
    head = ["run", "task type", "rows", "selector top-1", "ROUGE-L routed (fallback)", "top-1, no fallback"]
    head += ["oracle", "mixed", "base", "routed − mixed (points)", "ppl routed / mixed"]
    return table(head, rows)


def holdout(runs: dict) -> str:
    """Every leave-one-data-set-out run: folder, kind, its settings, held-out and in-distribution top-1."""
    rows = []
    for path, d in runs.items():
        for kind, k in d["kinds"].items():
            h, i = k["held_out"], k.get("in_distribution") or {}
            st = k.get("settings", {})
            how = ", ".join(f"{x}={st[x]}" for x in ("epochs", "truncation", "max_length") if x in st)
            rows.append(
                [
                    f"`{Path(path).parent.name}`",
                    f"`{kind}`",
                    how,
                    d.get("folds", "-"),
                    h.get("rows", "-"),
                    f(h.get("top1")),
                    f(h.get("top3")),
                    f(i.get("top1")),
                ]
            )
    return table(
        [
            "run",
            "kind",
            "settings",
            "folds",
            "held-out rows",
            "held-out top-1",
            "top-3",
            "in-distribution top-1",
        ],
        rows,
    )


def _balance(b) -> str:
    if not isinstance(b, dict):
        return str(b or "-")
    caps = ", ".join(f"{k}={v}" for k, v in b.items() if k != "balance" and v is not None)
    return b["balance"] + (f" ({caps})" if caps else "")


PROTOTYPES = {"task": "", "dataset": "; data-set prototypes", "row": "; every row a prototype (1-NN)"}


def _kind_balance(balance: dict | None, kind: dict) -> dict | None:
    """The run's balance with a kind's own `data.*` settings of its grid laid over it."""
    if balance is None:
        return None
    out = dict(balance)
    for setting in " ".join(kind.get("settings_chosen", {})).split():
        key, _, value = setting.partition("=")
        if key.startswith("data."):
            out[key[5:]] = None if value == "null" else int(value) if value.isdigit() else value
    return out


def nested(runs: dict) -> str:
    """Nested leave-one-data-set-out: settings, temperature and thresholds chosen on inner folds only."""
    rows = []
    for path, d in runs.items():
        for kind, k in d["kinds"].items():
            msp, cos = k["routing"].get("msp", {}), k["routing"].get("cosine", {})
            rows.append(
                [
                    f"`{Path(path).parent.name}`",
                    f"`{kind}`",
                    _balance(_kind_balance(d.get("balance"), k))
                    + PROTOTYPES.get(d.get("prototypes", "task"), "")
                    + ("; task descriptions" if d.get("descriptions") else ""),
                    d.get("outer_folds", "-"),
                    k["rows"],
                    f(k["top1"]),
                    f(k["top3"]),
                    f(k["macro_top1"]),
                    f"{k['ece_raw']:.3f} → {k['ece_calibrated']:.3f}",
                    f"{f(msp.get('coverage'), 2)} / {f(msp.get('precision'), 2)}",
                    f"{f(cos.get('coverage'), 2)} / {f(cos.get('precision'), 2)}",
                ]
            )
    head = [
        "run",
        "kind",
        "balance",
        "outer folds",
        "rows",
        "top-1",
        "top-3",
        "top-1 over types",
        "ECE → after temperature",
        "max-softmax routed / right",
        "cosine routed / right",
    ]
    return table(head, rows)


def agreement(runs: dict) -> str:
    """Two kinds as each other's second opinion, per nested run that scored two kinds."""
    rows = []
    for path, d in runs.items():
        shown: set[frozenset] = set()  # both rules are symmetric: one row per pair, embedding second
        for pair, a in sorted(d.get("agreement", {}).items(), key=lambda x: x[0].startswith("embedding")):
            if frozenset(pair.split(" / ")) in shown:
                continue
            shown.add(frozenset(pair.split(" / ")))
            rows.append(
                [f"`{Path(path).parent.name}`", f"`{pair}`", d.get("outer_folds", "-"), a["rows"]]
                + [f"{f(a[r]['coverage'], 2)} / {f(a[r]['precision'], 2)}" for r in ("agree", "agree_either")]
            )
    head = ["run", "first / second", "outer folds", "rows", "both agree: routed / right"]
    return table(head + ["agree, either above its threshold: routed / right"], rows)


def variants(d: dict) -> str:
    rows = [[r["truncation"], r["scoring"], f(r["top1"])] for r in d["results"]]
    return table(["truncation", "scoring", "held-out top-1"], rows)


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

    results = list(results.values()) if isinstance(results, dict) else results
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
    results = list(results.values()) if isinstance(results, dict) else results
    methods = _gap_methods()
    rows = []
    for r in sorted(results, key=lambda r: (methods.index(r["method"]), r["seed"], -r["lr"])):
        forgot = r.get("forgetting", {})
        emulated = r["spec"].get("matmul") == "emulated"  # bf16 emulated on a CPU without native bf16
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


def gap_precision_check(results) -> str:
    """One grid cell (LoRA r=1, seed 0) as the grid ran it (native bf16) and again on an AVX2-only CPU
    in emulated bf16 and in fp32; the grid's other seed at the same lr shows how far a seed moves it."""
    results = list(results.values()) if isinstance(results, dict) else results
    fp32 = list(load("results/cola_gap_fp32_check/cells/*/*/*/*/result.json").values())
    grid = list(load("results/cola_gap_smollm2/cells/*/*/*/*/result.json").values())
    rows = []
    for r in results:
        key = (r["method"], r["lr"])
        same = [g for g in grid if (g["method"], g["lr"]) == key]
        runs = [("grid, native bf16", g) for g in same if g["seed"] == r["seed"]]
        runs += [("this CPU, emulated bf16", r)]
        twin = [x for x in fp32 if (x["method"], x["lr"]) == key and x["seed"] == r["seed"]]
        runs += [("this CPU, fp32", x) for x in twin]
        runs += [(f"grid, native bf16, seed {g['seed']}", g) for g in same if g["seed"] != r["seed"]]
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


def _gap_methods() -> list[str]:
    import yaml

    path = ROOT / "configs/experiments/cola_gap_smollm2.yaml"
    return list(yaml.safe_load(path.read_text())["methods"])


def gap_report(results) -> str:
    """The gap report's tables (`lorachain report`'s gap section) from the grid's finished cells."""
    from lorachain.experiment import gap

    results = list(results.values()) if isinstance(results, dict) else results
    methods = [m for m in _gap_methods() if any(r["method"] == m for r in results)]
    text = gap.render(results, methods=methods)
    return text.split("\n", 2)[2].strip()  # without the section's own heading


def gap_summary(results) -> str:
    """The README's short gap table: each method's score and forgetting, each chain's gap closed."""
    from lorachain.experiment import gap
    from lorachain.experiment.choose import select

    results = list(results.values()) if isinstance(results, dict) else results
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
    return table(head, rows)


def headline(paths: dict) -> str:
    """The README's one small table: each line's figure from its own JSON."""
    from lorachain.experiment.choose import select
    from lorachain.experiment.paired import per_task

    def pooled(rel: str, ref: str, other: str) -> str:
        chosen = select(paths[rel])
        tasks = list(dict.fromkeys(r["task"] for r in paths[rel]))
        s = per_task(chosen, tasks, ref, other)[1]
        return f"{signed(s['mean'])} points [{signed(s['ci'][0])}, {signed(s['ci'][1])}], {len(tasks)} tasks"

    t1, t6 = "results/cola_smollm2_table1/results.json", "results/cola_smollm2_table6/results.json"
    prec, cost = paths["benchmarks/results/precision.json"], paths["benchmarks/results/cola_cost.json"]
    serve = paths["benchmarks/results/serve_load.json"]
    par = paths["benchmarks/results/parallel.json"]
    big = paths["benchmarks/results/scale.json"]
    demo_total = paths["benchmarks/results/demo.json"]["total"]
    cola_time = next(r["time_ratio"] for r in cost["rows"] if r["config"].startswith("cola 3"))
    nested_run = "results/routing_holdout/nested_agreement_rounds_9/nested.json"
    agree = paths[nested_run]["agreement"]["encoder / embedding"]["agree_either"]
    enc = paths[nested_run]["kinds"]["encoder"]["routing"]["msp"]
    rows = [
        [
            "`lorachain demo`, wall / CPU time (one reading: fresh clone, idle 2-core machine)",
            f"{demo_total['wall_seconds'] / 60:.1f} min / {demo_total['cpu_seconds']:.0f} s",
            "`benchmarks/results/demo.json`",
        ],
        [
            "COLA (8, 8) − LoRA r=8, Table 1 protocol (625 steps, 3 seeds)",
            pooled(t1, "lora", "cola2"),
            f"`{t1}`",
        ],
        [
            "COLA − LoRA, Table 6 protocol (100 examples, 5 seeds)",
            pooled(t6, "lora_n100", "cola_n100"),
            f"`{t6}`",
        ],
        ["COLA (3 links) / LoRA training time", f"{cola_time:.3f}", "`benchmarks/results/cola_cost.json`"],
        [
            "bf16 / fp32 step time",
            f"{prec['step_time_ratio_bf16']:.2f}",
            "`benchmarks/results/precision.json`",
        ],
        [
            "served tokens/s, mixed-adapter batches / one adapter at a time (32 clients)",
            f"{serve['ratios']['32']['mixed_over_swap']:.1f}×",
            "`benchmarks/results/serve_load.json`",
        ],
        [
            "routing on 27 data sets no selector saw (nested): routed / right, encoder with an "
            "embedding second opinion",
            f"{agree['coverage'] * 100:.1f}% / {agree['precision'] * 100:.1f}% (encoder alone: "
            f"{enc['coverage'] * 100:.1f}% / {enc['precision'] * 100:.1f}%)",
            f"`{nested_run}`",
        ],
        [
            "COLA with a knot on a Llama-2-7B-shaped NF4 base, checkpointing, 1×128 tokens: peak RSS",
            f"{big['peak_rss_gib_7b_nf4_cola']:.2f} GiB (fp32 weights alone: ~25 GiB)",
            "`benchmarks/results/scale.json`",
        ],
        [
            "2-process FSDP2 knot: bytes communicated (a full weight is never gathered)",
            f"{par['knot_comm_bytes_fsdp']}",
            "`benchmarks/results/parallel.json`",
        ],
    ]
    return table(["measure", "result", "from"], rows)


TABLES: dict[str, tuple[str | list[str], str, Callable]] = {
    "headline": (
        [
            "results/cola_smollm2_table1/results.json",
            "results/cola_smollm2_table6/results.json",
            "benchmarks/results/precision.json",
            "benchmarks/results/cola_cost.json",
            "benchmarks/results/serve_load.json",
            "benchmarks/results/parallel.json",
            "benchmarks/results/scale.json",
            "benchmarks/results/demo.json",
            "results/routing_holdout/nested_agreement_rounds_9/nested.json",
        ],
        "the commands in docs/measured.md",
        headline,
    ),
    "demo": ("benchmarks/results/demo.json", "lorachain demo", demo),
    "table1": (
        "results/cola_smollm2_table1/results.json",
        "lorachain experiment configs/experiments/cola_smollm2_table1.yaml",
        paired_grid([("lora", "cola2"), ("lora", "cola3")]),
    ),
    "table6": (
        "results/cola_smollm2_table6/results.json",
        "lorachain experiment configs/experiments/cola_smollm2_table6.yaml",
        paired_grid([("lora_n100", "cola_n100"), ("lora_n50", "cola_n50")]),
    ),
    "short-budget": (
        "results/cola_smollm2/results.json",
        "lorachain experiment configs/experiments/cola_smollm2.yaml",
        grid_scores,
    ),
    "gemma3": (
        "results/cola_gemma3/results.json",
        "lorachain experiment configs/experiments/cola_gemma3.yaml",
        grid_scores,
    ),
    "minilm": (
        "results/cola_minilm/results.json",
        "lorachain experiment configs/experiments/cola_minilm.yaml",
        grid_scores,
    ),
    "gap-pilot": (
        "results/cola_gap_pilot/cells/*/*/*/*/result.json",
        "lorachain experiment configs/experiments/cola_gap_pilot_smollm2.yaml",
        gap_pilot,
    ),
    "gap-pilot-gsm8k": (
        "results/cola_gap_pilot_gsm8k/cells/*/*/*/*/result.json",
        "lorachain experiment configs/experiments/cola_gap_pilot_gsm8k_smollm2.yaml",
        gap_pilot,
    ),
    "gap-grid": (
        "results/cola_gap_smollm2/cells/*/*/*/*/result.json",
        "lorachain experiment configs/experiments/cola_gap_smollm2.yaml (make gap-grid)",
        gap_grid,
    ),
    "gap-report": (
        "results/cola_gap_smollm2/cells/*/*/*/*/result.json",
        "lorachain report results/cola_gap_smollm2",
        gap_report,
    ),
    "gap-precision-check": (
        "results/cola_gap_emulated_check/cells/*/*/*/*/result.json",
        "lorachain experiment configs/experiments/cola_gap_{emulated,fp32}_check.yaml",
        gap_precision_check,
    ),
    "gap-summary": (
        "results/cola_gap_smollm2/cells/*/*/*/*/result.json",
        "lorachain report results/cola_gap_smollm2",
        gap_summary,
    ),
    "precision": (
        "benchmarks/results/precision.json",
        "python benchmarks/precision.py --accuracy",
        precision_speed,
    ),
    "emulated-bf16": (
        "benchmarks/results/emulated_bf16.json",
        "python benchmarks/emulated_bf16.py --steps --accuracy",
        emulated_bf16,
    ),
    "cola-cost": ("benchmarks/results/cola_cost.json", "python benchmarks/cola_cost.py", cola_cost),
    "lm-eval": (
        "benchmarks/results/lm_eval_agreement.json",
        "python benchmarks/lm_eval_agreement.py",
        lm_eval,
    ),
    "serve-big": (
        "benchmarks/results/serve_stress_big.json",
        "OMP_NUM_THREADS=1 python benchmarks/serve_stress.py --big 40",
        serve_big,
    ),
    "serve-load": ("benchmarks/results/serve_load.json", "python benchmarks/serve_load.py", serve_load),
    "parallel": (
        "benchmarks/results/parallel.json",
        "python benchmarks/parallel.py --steps 6 --repeats 3",
        parallel,
    ),
    "scale": ("benchmarks/results/scale.json", "python benchmarks/scale.py", scale),
    "routing-cost": (
        "benchmarks/results/routing_cost.json",
        "OMP_NUM_THREADS=1 python benchmarks/routing_cost.py --repeats 3",
        routing_cost,
    ),
    "routing-t0": (
        "results/routing_t0_smollm2/route_eval.json",
        "lorachain route eval (results/README.md)",
        route_eval,
    ),
    "routing-table1": (
        "results/routing_table1_smollm2/route_eval.json",
        "lorachain route eval stores/t0_smollm2_table1 --max-per-task 25 --modes score",
        route_eval,
    ),
    "holdout": (
        "results/routing_holdout/task_by_dataset*/holdout.json",
        "lorachain route eval configs/route/t0_smollm2.yaml --holdout-by dataset (its JSON's command)",
        holdout,
    ),
    "nested": (
        "results/routing_holdout/nested_*/nested.json",
        "lorachain route eval configs/route/t0_smollm2.yaml --holdout-by dataset --nested "
        "(each run's command: results/routing_holdout/README.md)",
        nested,
    ),
    "agreement": (
        "results/routing_holdout/nested_agreement*/nested.json",
        "lorachain route eval configs/route/t0_smollm2.yaml --holdout-by dataset --nested --kinds "
        "encoder,embedding (the command: results/routing_holdout/README.md)",
        agreement,
    ),
    "routing-unseen": (
        "results/routing_unseen/*/route_eval.json",
        "lorachain route eval stores/t0_smollm2_unseen [--unseen] --max-per-task 20 (results/README.md)",
        unseen_answers,
    ),
    "variants": (
        "results/routing_holdout/variants/variants.json",
        "python benchmarks/selector_variants.py --per-dataset 60",
        variants,
    ),
}


def render_table(name: str) -> str:
    path, command, fn = TABLES[name]
    if not exists(path):
        return f"*Not measured yet: `{path}` is written by `{command}`.*\n"
    where = "the files named in it" if isinstance(path, list) else f"`{path}`"
    return f"{fn(load(path))}\n\n*Rendered from {where}, written by `{command}`.*\n"


def fill_tables(text: str, where: str) -> str:
    def sub(m: re.Match) -> str:
        if m.group(2) not in TABLES:
            raise SystemExit(f"{where}: unknown table {m.group(2)!r}; known: {', '.join(TABLES)}")
        return m.group(1) + render_table(m.group(2)) + m.group(4)

    return MARK.sub(sub, text)


# -- the configuration reference ------------------------------------------------------------------
def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment: the trailing `# ...` on its line and any comment lines just above."""
    out, above = {}, []
    for line in inspect.getsource(cls).splitlines():
        s = line.strip()
        if s.startswith("#"):
            above.append(s.lstrip("# "))
            continue
        m = re.match(r"(\w+)\s*:\s*[^=]+?(?:=.*?)?(?:\s+#\s*(.*))?$", s)
        if m and not s.startswith(("def ", "class ", "@", "return")) and ":" in s:
            out[m.group(1)] = " ".join([*above, m.group(2) or ""]).strip()
        above = []
    return out


def type_name(tp) -> str:
    text = tp if isinstance(tp, str) else getattr(tp, "__name__", str(tp))
    return text.replace("typing.", "")


def default_of(fld: dataclasses.Field) -> str:
    if fld.default is not dataclasses.MISSING:
        return f"`{fld.default!r}`"
    if fld.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = fld.default_factory()  # type: ignore[misc]
        return "section" if dataclasses.is_dataclass(value) else f"`{value!r}`"
    return "required"


def config_section(cls: type, title: str) -> list[str]:
    doc = inspect.getdoc(cls) or ""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    rows = [
        [
            f"`{fld.name}`",
            f"`{type_name(fld.type)}`".replace("|", "\\|"),
            default_of(fld).replace("|", "\\|"),
            comments.get(fld.name, "").replace("|", "\\|"),
        ]
        for fld in dataclasses.fields(cls)
    ]
    del hints
    return [f"## {title}", "", doc, "", table(["key", "type", "default", "meaning"], rows), ""]


def config_reference() -> str:
    from lorachain import config as c
    from lorachain.experiment.config import ExperimentConfig
    from lorachain.routing import config as rc

    sections = [
        (c.RunConfig, "A run (`lorachain train`)"),
        (c.ModelConfig, "`model`"),
        (c.DataConfig, "`data`"),
        (c.ChainConfig, "`chain`"),
        (c.LinkConfig, "`chain.links[]`"),
        (c.KnotConfig, "`chain.knot`"),
        (c.OptimConfig, "`optim`"),
        (c.TrainConfig, "`train`"),
        (rc.RouteConfig, "A routing store (`lorachain route train`)"),
        (rc.RouteDataConfig, "`data` of a routing store"),
        (rc.SelectorConfig, "`selector`"),
        (ExperimentConfig, "An experiment grid (`lorachain experiment`)"),
    ]
    lines = [
        "# Configuration reference",
        "",
        "Generated from the config dataclasses by `python scripts/docs_gen.py`; a test fails when this",
        "page differs from the code. Every key can be set in the YAML file or as a dotted override on the",
        "command line (`optim.lr=5e-4 chain.links.1.rank=4`). A bad value fails with one line naming",
        "the key.",
        "",
    ]
    for cls, title in sections:
        lines += config_section(cls, title)
    return "\n".join(lines).rstrip() + "\n"


# -- the CLI reference ----------------------------------------------------------------------------
def parsers(p: argparse.ArgumentParser, name: str = "lorachain"):
    yield name, p
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, child in action.choices.items():
                yield from parsers(child, f"{name} {sub}")


def cli_reference() -> str:
    from lorachain.cli import build_parser

    os.environ["COLUMNS"] = "100"
    lines = ["# CLI reference", "", "Generated from the argparse parser by `python scripts/docs_gen.py`.", ""]
    for name, p in parsers(build_parser()):
        lines += [f"## `{name}`", "", "```text", p.format_help().rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


# -- the whole set --------------------------------------------------------------------------------
# figures the docs show, copied from the run folder that wrote them (mkdocs serves only docs/)
FIGURES = {
    "docs/img/gap.png": "results/cola_gap_smollm2/gap.png",
    "docs/img/links.png": "results/cola_gap_smollm2/links.png",
}


def _same(path: Path, content: str | bytes) -> bool:
    if not path.is_file():
        return False
    return (path.read_bytes() if isinstance(content, bytes) else path.read_text()) == content


def outputs() -> dict[Path, str | bytes]:
    """Every generated file and its content."""
    out: dict[Path, str | bytes] = {
        ROOT / dst: (ROOT / src).read_bytes() for dst, src in FIGURES.items() if (ROOT / src).is_file()
    }
    out |= {
        ROOT / "docs" / "reference" / "config.md": config_reference(),
        ROOT / "docs" / "reference" / "cli.md": cli_reference(),
    }
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        if path in out:
            continue
        text = path.read_text()
        out[path] = fill_tables(text, str(path.relative_to(ROOT)))
    return out


def drift() -> list[str]:
    """The generated files whose committed text differs from what the code and JSON render."""
    return [str(p.relative_to(ROOT)) for p, content in outputs().items() if not _same(p, content)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if a generated file differs")
    args = ap.parse_args(argv)
    if args.check:
        stale = drift()
        for p in stale:
            print(f"{p}: differs from what scripts/docs_gen.py renders; run it", file=sys.stderr)
        return 1 if stale else 0
    for path, content in outputs().items():
        if not _same(path, content):
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
