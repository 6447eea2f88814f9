"""fp32 vs bf16 training: step time, peak memory, the roofline, and loss/accuracy.

One command: `python benchmarks/precision.py [--steps 10 --repeats 3 --threads 1 --accuracy]`.
SmolLM2-135M-Instruct, the demo's SST-2 rows (batch 8), LoRA r=8 on q/v, trained by lorachain's one
step loop (`train.run_steps`) in three precisions: fp32, bf16 autocast (fp32 base; frozen weights
held in bf16 with fp32 masters), and bf16 with the base itself in bf16 (`model.dtype: bfloat16`);
each with the precision policy's attention kernel, plus bf16 with SDPA attention (what the policy's
eager choice buys).
Every timing run is a fresh process, configurations interleaved, medians over repeats. Step time is
taken as the process's CPU time per step with a fixed thread count (default 1), so runs on a shared,
busy machine still compare fairly (wall time is recorded too). Training FLOPs are counted by
`torch.utils.flop_counter` on each timed batch; the peak is a 2048² matmul in each dtype on the same
threads. `--accuracy` also trains LoRA and COLA (8, 8) for one epoch in each precision and evaluates
(loss, accuracy on 200 rows). Writes `benchmarks/results/precision.json` and prints a table.
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
# name: (train.precision, model.dtype, model.attn_implementation); `auto` attention is the
# precision policy's choice (eager for bf16 on CPU at these lengths), `bf16-sdpa` shows what it buys
PRECISIONS = {
    "fp32": ("fp32", "float32", "auto"),
    "bf16": ("bf16", "float32", "auto"),
    "bf16-base": ("bf16", "bfloat16", "auto"),
    "bf16-sdpa": ("bf16", "float32", "sdpa"),
}
QUALITY = ("fp32", "bf16", "bf16-base")  # trained and evaluated with --accuracy


def matmul_peak(dtype_name: str, n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of an n x n matmul in `dtype_name` per CPU second, median of `repeats`."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        t = time.process_time()
        a @ b
        times.append(time.process_time() - t)
    return 2 * n**3 / statistics.median(times) / 1e9


def config(method: str, precision: str, steps: int | None, out: str, evaluate: bool):
    from lorachain.config import RunConfig, from_dict
    from lorachain.demo import demo_config

    prec, dtype, attn = PRECISIONS[precision]
    raw = demo_config(Path(out), METHODS[method], steps, prec)
    raw["model"]["dtype"] = dtype
    raw["model"]["attn_implementation"] = attn
    raw["train"]["save_every"] = 10_000
    if not evaluate:
        raw["data"]["eval"] = None
    return from_dict(RunConfig, raw)


def time_steps(precision: str, steps: int, threads: int, out: str) -> dict:
    """CPU and wall seconds per optimizer step of the one loop, after two warm-up steps."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lorachain.training.loop import Trainer
    from lorachain.training.runfolder import peak_memory_mb
    from lorachain.training.step import run_steps

    torch.set_num_threads(threads)
    cfg = config("lora", precision, steps + 2, out, evaluate=False)
    tr = Trainer(cfg, None, None, progress=False)
    st = tr.restore()
    lr_at = tr.lr_at(st)
    tokens: list[int] = []

    def on_step(step: int, loss: float, n: int) -> bool:
        tokens.append(n)
        return False

    def steps_from(a: int, b: int) -> None:
        run_steps(
            tr.peft,
            tr.opt,
            tr.data.train,
            cfg,
            a,
            b,
            lr_at,
            tr.s.tokenizer.pad_token_id,
            False,
            on_step,
            tr.dist,
            tr.prec,
            tr.scaler,
        )

    steps_from(0, 2)  # warm-up: lazy initialisation, first-shape kernels
    tokens.clear()
    c0, w0 = time.process_time(), time.perf_counter()
    steps_from(2, 2 + steps)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    with FlopCounterMode(display=False) as counter:  # the same steps again, counted, not timed
        steps_from(2, 2 + steps)
    return {
        "precision": precision,
        "threads": threads,
        "cpu_step_s": cpu / steps,
        "wall_step_s": wall / steps,
        "tokens_per_step": sum(tokens) / steps,
        "train_flops_per_step": counter.get_total_flops() / steps,
        "gflops_per_cpu_s": counter.get_total_flops() / cpu / 1e9,
        "peak_rss_mb": peak_memory_mb(),
    }


def train_eval(method: str, precision: str, out: str) -> dict:
    """One epoch (40 steps) of the demo's SST-2 run and its evaluation, in `precision`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lorachain.training.loop import train

    s = train(config(method, precision, None, out, evaluate=True), progress=False).summary
    return {
        "method": method,
        "precision": precision,
        "final_train_loss": s["links"][-1]["final_loss"],
        "eval_loss": s["final_eval"]["eval_loss"],
        "accuracy": s["final_eval"]["accuracy"],
        "knot_rounding": s["knot_rounding"],
        "train_s": s["wall_seconds"],
    }


def _child(args: tuple) -> dict:
    fn, rest = args[0], args[1:]
    with tempfile.TemporaryDirectory() as out:
        return {"time": time_steps, "train": train_eval}[fn](*rest, out)


def _peak(dtype_name: str, threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    return matmul_peak(dtype_name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--accuracy", action="store_true", help="also train one epoch per method and precision")
    ap.add_argument("--out", default="benchmarks/results/precision.json")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")

    def fresh(*a):
        with ctx.Pool(1) as pool:
            return pool.apply(_child, (a,))

    runs: dict[str, list[dict]] = {p: [] for p in PRECISIONS}
    for rep in range(args.repeats):  # interleaved: every configuration once per round
        for precision in PRECISIONS:
            r = fresh("time", precision, args.steps, args.threads)
            runs[precision].append(r)
            print(
                f"round {rep}: {precision:9s} {r['cpu_step_s']:.3f} CPU s/step ({r['wall_step_s']:.3f} wall)",
                flush=True,
            )
    with ctx.Pool(1) as pool:
        peak = {d: pool.apply(_peak, (d, args.threads)) for d in ("fp32", "bf16")}
    med = lambda rr, k: statistics.median(r[k] for r in rr)  # noqa: E731
    rows = []
    for precision, rs in runs.items():
        dtype = "fp32" if precision == "fp32" else "bf16"
        rows.append(
            {
                "config": f"lora {precision}",
                "cpu_step_s": med(rs, "cpu_step_s"),
                "step_time_ratio": med(rs, "cpu_step_s") / med(runs["fp32"], "cpu_step_s"),
                "wall_step_s": med(rs, "wall_step_s"),
                "peak_rss_mb": med(rs, "peak_rss_mb"),
                "rss_ratio": med(rs, "peak_rss_mb") / med(runs["fp32"], "peak_rss_mb"),
                "gflops_per_cpu_s": med(rs, "gflops_per_cpu_s"),
                "fraction_of_peak": med(rs, "gflops_per_cpu_s") / peak[dtype],
            }
        )
    quality = []
    if args.accuracy:
        for method in METHODS:
            for precision in QUALITY:
                quality.append(fresh("train", method, precision))
                q = quality[-1]
                print(
                    f"{method} {precision}: loss {q['final_train_loss']:.4f} acc {q['accuracy']:.3f}",
                    flush=True,
                )
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [cols] + [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    print("\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in lines))
    by = {r["config"]: r for r in rows}
    acc = {(q["method"], q["precision"]): q for q in quality}
    import torch

    result = {
        "step_time_ratio_bf16": by["lora bf16"]["step_time_ratio"],
        "step_time_ratio_bf16_base": by["lora bf16-base"]["step_time_ratio"],
        "step_time_ratio_bf16_sdpa": by["lora bf16-sdpa"]["step_time_ratio"],
        "rss_ratio_bf16": by["lora bf16"]["rss_ratio"],
        "accuracy_fp32": acc.get(("lora", "fp32"), {}).get("accuracy"),
        "accuracy_bf16": acc.get(("lora", "bf16"), {}).get("accuracy"),
        "fraction_of_bf16_peak": by["lora bf16"]["fraction_of_peak"],
        "attention": {p: a for p, (_, _, a) in PRECISIONS.items()},
        "matmul_peak_gflops": peak,
        "cpu": {
            "model": platform.processor() or _cpu_name(),
            "bf16_flags": sorted(_flags() & {"avx512_bf16", "amx_bf16", "amx_tile"}),
        },
        "torch": torch.__version__,
        "threads": args.threads,
        "steps": args.steps,
        "repeats": args.repeats,
        "batch_size": 8,
        "model": "SmolLM2-135M-Instruct",
        "load_average": os.getloadavg(),
        "rows": rows,
        "quality": quality,
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
    from lorachain.training.precision import cpu_flags

    return cpu_flags()


if __name__ == "__main__":
    main()
