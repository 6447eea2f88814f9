"""fp32 vs bf16 training: step time, peak memory, loss, accuracy and the roofline.

One command: `python benchmarks/precision.py [--steps 40 --repeats 3]`. SmolLM2-135M-Instruct, the
demo's SST-2 rows (batch 8), LoRA r=8 and COLA (8 -> 8) on q/v, each trained by `lorachain.train`
in three precisions: fp32, bf16 autocast (fp32 base; frozen weights held in bf16 with fp32 masters),
and bf16 with the base itself in bf16 (`model.dtype: bfloat16`). Every run is a fresh process,
configurations interleaved, medians over repeats. Training FLOPs are counted by
`torch.utils.flop_counter` on a real batch (per token, times the run's tokens); the peak is a 2048²
matmul in each dtype, measured here. Writes `benchmarks/results/precision.json` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

METHODS = {
    "lora": [{"rank": 8, "alpha": 16}],
    "cola": [{"rank": 8, "alpha": 16, "fraction": 0.5}, {"rank": 8, "alpha": 16, "fraction": 0.5}],
}
PRECISIONS = {"fp32": ("fp32", "float32"), "bf16": ("bf16", "float32"), "bf16-base": ("bf16", "bfloat16")}


def matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of an n x n matmul in `dtype_name`, median of `repeats`."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def flops_per_token(cfg, model, tokenizer) -> float:
    """Training FLOPs (forward + backward) per token of one real batch, counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lorachain.data import collate, load_examples
    from lorachain.precision import resolve
    from lorachain.train import summed_loss

    examples = load_examples(cfg.data.train, cfg.data, tokenizer, False, 8)
    batch = collate(examples, tokenizer.pad_token_id, False)
    with FlopCounterMode(display=False) as counter:
        with resolve(cfg.train.precision, torch.device("cpu")).autocast():
            loss = summed_loss(model, batch, False)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / int(batch["attention_mask"].sum())


def run_one(method: str, precision: str, steps: int, evaluate: bool, out: str) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lorachain.chain.knot import extend, lora_config
    from lorachain.config import RunConfig, from_dict
    from lorachain.demo import demo_config
    from lorachain.train import Trainer, peak_memory_mb

    prec, dtype = PRECISIONS[precision]
    raw = demo_config(Path(out), METHODS[method], steps, prec)
    raw["model"]["dtype"] = dtype
    raw["train"]["save_every"] = 10_000
    if not evaluate:
        raw["data"]["eval"] = None
    cfg = from_dict(RunConfig, raw)
    trainer = Trainer(cfg, None, None, progress=False)
    summary = trainer.run().summary
    links = summary["links"]
    tokens = sum(r["tokens"] for r in links)
    step_s = summary["wall_seconds"] / summary["total_steps"]
    # count on the trained base with a fresh link of the same shape (what every step runs)
    lcfg = lora_config(cfg.chain.links[0], cfg.chain, trainer.targets, False, "causal_lm")
    fpt = flops_per_token(cfg, extend(trainer.model, lcfg), trainer.tokenizer)
    return {
        "method": method,
        "precision": precision,
        "step_s": step_s,
        "train_s": summary["wall_seconds"],
        "peak_rss_mb": peak_memory_mb(),
        "tokens": tokens,
        "train_flops": fpt * tokens,
        "gflops_per_s": fpt * tokens / summary["wall_seconds"] / 1e9,
        "final_train_loss": links[-1]["final_loss"],
        "eval": summary.get("final_eval", {}),
        "knot_seconds": [r["knot_seconds"] for r in links[:-1]],
        "knot_rounding": summary["knot_rounding"],
    }


def _child(args: tuple) -> dict:
    with tempfile.TemporaryDirectory() as out:
        return run_one(*args, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/precision.json")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeats):  # interleaved: every configuration once per round
        for method in METHODS:
            for precision in PRECISIONS:
                with ctx.Pool(1) as pool:
                    r = pool.apply(_child, ((method, precision, args.steps, rep == 0),))
                runs.setdefault(f"{method} {precision}", []).append(r)
                print(f"round {rep}: {method} {precision} step {r['step_s']:.3f} s", flush=True)
    with ctx.Pool(1) as pool:
        peak = {d: pool.apply(matmul_peak, (d,)) for d in ("fp32", "bf16")}
    rows = []
    for key, rs in runs.items():
        method, precision = key.split()
        ref = runs[f"{method} fp32"]
        med = lambda rr, k: statistics.median(r[k] for r in rr)  # noqa: E731
        dtype = "fp32" if precision == "fp32" else "bf16"
        rows.append(
            {
                "config": key,
                "step_s": med(rs, "step_s"),
                "step_time_ratio": med(rs, "step_s") / med(ref, "step_s"),
                "peak_rss_mb": med(rs, "peak_rss_mb"),
                "rss_ratio": med(rs, "peak_rss_mb") / med(ref, "peak_rss_mb"),
                "gflops_per_s": med(rs, "gflops_per_s"),
                "fraction_of_peak": med(rs, "gflops_per_s") / peak[dtype],
                "final_train_loss": rs[0]["final_train_loss"],
                "eval_loss": rs[0]["eval"].get("eval_loss"),
                "accuracy": rs[0]["eval"].get("accuracy"),
                "knot_rounding_rel_fro": rs[0]["knot_rounding"]["max_rel_fro"],
            }
        )
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [cols] + [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    print("\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in lines))
    by = {r["config"]: r for r in rows}
    import torch

    result = {
        "step_time_ratio_bf16": by["lora bf16"]["step_time_ratio"],
        "step_time_ratio_bf16_base": by["lora bf16-base"]["step_time_ratio"],
        "rss_ratio_bf16": by["lora bf16"]["rss_ratio"],
        "accuracy_fp32": by["lora fp32"]["accuracy"],
        "accuracy_bf16": by["lora bf16"]["accuracy"],
        "fraction_of_bf16_peak": by["lora bf16"]["fraction_of_peak"],
        "matmul_peak_gflops": peak,
        "cpu": {
            "model": platform.processor() or _cpu_name(),
            "bf16_flags": sorted(_flags() & {"avx512_bf16", "amx_bf16", "amx_tile"}),
        },
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "steps": args.steps,
        "repeats": args.repeats,
        "batch_size": 8,
        "model": "SmolLM2-135M-Instruct",
        "rows": rows,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def _flags() -> set[str]:
    from lorachain.precision import cpu_flags

    return cpu_flags()


if __name__ == "__main__":
    main()
