"""The README's headline table: each line's figure from its own committed JSON."""

from __future__ import annotations

from docgen.common import signed, table
from docgen.routing import rouge_diff

GAP_CELLS = "results/cola_gap_smollm2/cells/*/*/*/*/result.json"
LOCKBOX = "results/routing_lockbox/half_a/compare.json"


def interval(s: dict) -> str:
    """A paired difference in points: mean [95% CI]."""
    return f"{signed(s['mean'])} points [{signed(s['ci'][0])}, {signed(s['ci'][1])}]"


def headline(paths: dict) -> str:
    """The README's one small table: each line's figure from its own JSON."""
    from lorachain.experiment.choose import select
    from lorachain.experiment.paired import per_task

    def pooled(rel: str, ref: str, other: str) -> str:
        chosen = select(paths[rel])
        tasks = list(dict.fromkeys(r["task"] for r in paths[rel]))
        return f"{interval(per_task(chosen, tasks, ref, other)[1])}, {len(tasks)} tasks"

    def pooled_gap(chosen: dict, ref: str, other: str) -> str:
        s = per_task(chosen, ["wic"], ref, other)[1]
        return f"{interval(s)}, {s['n']} paired seeds"

    t1, t6 = "results/cola_smollm2_table1/results.json", "results/cola_smollm2_table6/results.json"
    prec, cost = paths["benchmarks/results/precision.json"], paths["benchmarks/results/cola_cost.json"]
    serve = paths["benchmarks/results/serve_load.json"]
    par = paths["benchmarks/results/parallel.json"]
    big = paths["benchmarks/results/scale.json"]
    ref = {r["option"]: r for r in paths["benchmarks/results/reference_cost.json"]["rows"]}
    demo_total = paths["benchmarks/results/demo.json"]["total"]
    cola_time = next(r["time_ratio"] for r in cost["rows"] if r["config"].startswith("cola 3"))
    box = paths[LOCKBOX]
    box_opt = box["options"]
    worst = min(box["covered"], key=lambda t: box_opt["routed"][t]["vs_mixed"]["low"])
    gap_cells = list(paths[GAP_CELLS].values())
    gap = select(gap_cells)
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
        [
            "full fine-tuning − LoRA r=8, WiC gap grid (625 steps, each lr chosen on validation)",
            pooled_gap(gap, "lora_r8", "full"),
            f"`{GAP_CELLS}`",
        ],
        [
            "rank-1 chain of 4 links − LoRA r=1, WiC gap grid",
            pooled_gap(gap, "lora_r1", "cola_r1x4"),
            f"`{GAP_CELLS}`",
        ],
        ["COLA (3 links) / LoRA training time", f"{cola_time:.3f}", "`benchmarks/results/cola_cost.json`"],
        [
            "DPO with a 3-link chain, its reference kept, in TRL's DPOTrainer / TRL with one LoRA: "
            "step time, peak RSS",
            f"{ref['path']['time_ratio']:.3f}, {ref['path']['mem_ratio']:.2f}",
            "`benchmarks/results/reference_cost.json`",
        ],
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
            f"routing on the lockbox (half A: {box['rows']} rows of public data sets outside T0), "
            "answer ROUGE-L − the mixed adapter's: the default (likelihood gate at 0.2) / plain routing "
            "(encoder with an embedding second opinion)",
            f"{rouge_diff(box_opt['gated']['all'])} / {rouge_diff(box_opt['routed']['all'])}; plain routing "
            f"sends {box['labels']['routed']['coverage'] * 100:.1f}% to a task adapter, "
            f"{box['labels']['routed']['precision'] * 100:.1f}% of them right; its worst type: "
            f"{worst} {rouge_diff(box_opt['routed'][worst])}",
            f"`{LOCKBOX}`",
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
        [
            "2-process FSDP2 on a ~1B fp32 Llama shape, load included: a rank's peak anonymous / total RSS",
            f"{par['fsdp_rank_anon_rss_gib_world2_1b']:.2f} / "
            f"{par['fsdp_rank_total_rss_gib_world2_1b']:.2f} GiB "
            f"(weights {par['weights_gib_1b']:.2f} GiB; one process "
            f"{par['single_anon_rss_gib_1b']:.2f} / {par['single_total_rss_gib_1b']:.2f})",
            f"`benchmarks/results/parallel.json` (`{par['command_1b']}`)",
        ],
    ]
    return table(["measure", "result", "from"], rows)
