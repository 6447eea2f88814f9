"""Tables of the benchmarks in benchmarks/results/: precision, cost, serving, parallelism, scale."""

from __future__ import annotations

from docgen.common import f, table


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
            "\n\nFirst batch's loss (SmolLM2 LoRA, bf16 autocast): exact bf16 matmuls and attention "
            f"{fl['exact']:.4f}, "
            f"emulated {fl['emulated']:.4f}, native {fl['native']:.4f}; fp32 {fl['fp32']:.4f}."
        )
    if "steps" in d:
        s = d["steps"]
        text += (
            f"\n\nA LoRA step of the one loop, CPU seconds: fp32 {s['fp32']['cpu_step_s']:.2f}, "
            f"bf16 emulated {s['emulated']['cpu_step_s']:.2f} ({s['emulated']['vs_fp32']:.2f}x fp32), "
            f"bf16 native {s['native']['cpu_step_s']:.2f} ({s['native']['vs_fp32']:.1f}x fp32)."
        )
    if "attention" in d:
        rows = [
            [
                r["tokens"],
                *(f(r[k]["cpu_s"], 3) for k in ("fp32", "emulated", "native")),
                f(r["native"]["cpu_s"] / r["emulated"]["cpu_s"], 1),
                *(f"{r[k]['rel_err_out']:.1e} / {r[k]['rel_err_dq']:.1e}" for k in ("emulated", "native")),
            ]
            for r in d["attention"]
        ]
        head = ["SDPA fwd + bwd, tokens", "fp32 CPU s", "bf16 emulated", "bf16 native", "native / emulated"]
        head += ["error out / dQ: emulated", "native"]
        text += "\n\n" + table(head, rows)
    if "attention_choice" in d:
        rows = [
            [r["tokens"], f(r["eager"], 2), f(r["sdpa"], 2), f(r["sdpa_vs_eager"])]
            for r in d["attention_choice"]
        ]
        head = ["SmolLM2 fwd + bwd, bf16 emulated: 8 rows of", "eager CPU s", "SDPA CPU s", "SDPA / eager"]
        text += "\n\n" + table(head, rows)
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
    return table(head, rows) + "\n\n" + ratios + parallel_1b(d)


def parallel_1b(d: dict) -> str:
    """The ~1B rows of parallel.json (`--size 1b`): a rank's peak memory, the load included."""
    if "modes_1b" not in d:
        return ""
    names = {
        "single": "one process",
        "ddp": "ddp rank",
        "fsdp": "fsdp rank, fsdp_load: map",
        "fsdp_gloo": "fsdp rank, map, fsdp_all_gather: process_group",
        "fsdp_kept": "fsdp rank, map, fsdp_reshard_after_forward: false",
        "fsdp_read": "fsdp rank, read",
        "fsdp_broadcast": "fsdp rank, broadcast",
    }
    ddp = d["modes_1b"].get("ddp", {}).get("step_s")
    rows = [
        [
            names.get(mode, mode),
            f"{m['max_rank_anon_rss_gib']:.2f}",
            f"{m['max_rank_total_rss_gib']:.2f}",
            f"{m['setup_s']:.1f}",
            f"{m['step_s']:.1f}" + (f" ({m['step_s'] / ddp:.2f}×)" if ddp else ""),
        ]
        for mode, m in d["modes_1b"].items()
    ]
    head = ["~1B fp32, global batch 2×32", "peak anon RSS GiB", "peak total RSS GiB", "set-up s"]
    head += ["step s (× ddp)"]
    note = (
        f"Weights {d['weights_gib_1b']:.2f} GiB; target for an fsdp rank's anonymous RSS: weights/2 + 1 = "
        f"{d['fsdp_anon_target_gib_1b']:.2f} GiB (met: {d['fsdp_anon_within_target_1b']}); fsdp rank total "
        f"RSS not above one process's: {d['fsdp_total_rss_not_above_single_1b']}; FSDP / DDP step time "
        f"{d['fsdp_step_time_ratio_vs_ddp_1b']:.2f} ({d['setup_1b']}; {d['machine_1b']}; "
        f"`{d['command_1b']}`)."
    )
    return "\n\n" + table(head, rows) + "\n\n" + note


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


def reference_cost(d: dict) -> str:
    """benchmarks/reference_cost.py: keeping DPO's reference across knots inside TRL's DPOTrainer."""
    rows = [
        [
            f"`{r['option']}`",
            f(r["interleaved_step_s"], 2) if "interleaved_step_s" in r else "—",
            f(r["interleaved_ratio"], 3) if "interleaved_ratio" in r else "—",
            f(r["median_step_s"], 2),
            f(r["time_ratio"], 3),
            f"{r['peak_rss_mb']:.0f}",
            f(r["mem_ratio"], 3),
            f(r["setup_s"], 1),
            f"{r['ref_error']:.1e}",
        ]
        for r in d["rows"]
    ]
    header = [
        "option",
        "fwd/bwd s (interleaved)",
        "× trl",
        "step s (own run)",
        "× trl",
        "peak RSS MB",
        "× trl",
        "setup s",
        "ref error",
    ]
    return table(header, rows) + (
        f"\n\n{d['model']}, TRL {d['trl']}, torch {d['torch']}, {d['torch_threads']} thread, batches of "
        f"{d['batch_pairs']} pairs; own runs of {d['steps']} steps, {d['rounds']} interleaved rounds."
    )
