"""bf16 on a CPU without native bf16 matmuls: PyTorch's own kernel against lorachain's emulation.

One command: `python benchmarks/emulated_bf16.py [--repeats 5 --threads 1 --steps --accuracy
--attention]`. Matmuls: SmolLM2-135M's linear shapes at 640 rows (a batch of 8 x 80 tokens), a
linear layer's three matmuls (forward and backward) on bf16 operands, natively (PyTorch's CPU
kernel) and inside `Fp32Matmuls` (the operands upcast, an fp32 matmul, one rounding), beside the
same matmuls in fp32: GFLOP/s per CPU second, medians of `--repeats`; and how often each bf16 result
equals the exactly rounded one (fp64 accumulation, one rounding). `--accuracy`: the first batch's
loss of the demo's LoRA run in bf16 with exact (fp64 matmuls and attention), emulated and native
kernels, and in fp32. `--steps` also times the one loop's LoRA step (benchmarks/precision.py's
`time_steps`, the demo's SST-2 rows, batch 8) in fp32, bf16 emulated and bf16 native, each in a
fresh process, interleaved, medians (the native kernel once: a step takes about a minute).
`--attention`: SmolLM2's fused attention (SDPA, 9 heads of 64, causal; lorachain uses it past 256
tokens) forward and backward at 512 and 1024 tokens, CPU seconds (medians) in fp32, bf16 emulated
and bf16 native, and the largest relative error of the output and of dQ against the exact result on
the same bf16 inputs. `--attention-choice`: eager against SDPA attention in a whole SmolLM2 forward
and backward (8 rows of 64-512 tokens) with bf16 emulated, what the precision policy's `auto`
attention should pick on such a CPU. On a CPU with AMX or AVX-512 BF16 the native kernel is the
fast one and lorachain does not emulate; there this measures what emulation would cost. Writes
`benchmarks/results/emulated_bf16.json` (the parts not measured keep their last figures) and prints
a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import precision as bench  # noqa: E402  benchmarks/precision.py: its config, step timing, CPU name

SHAPES = {"q/o_proj 576x576": (576, 576), "k/v_proj 576x192": (576, 192), "up/gate 576x1536": (576, 1536)}
SHAPES["down 1536x576"] = (1536, 576)
ROWS = 640
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def time_matmul(kind: str, k: int, n: int, repeats: int) -> float:
    """GFLOP/s per CPU second of a linear layer's three matmuls, forward (x W^T) and backward (dy W,
    dy^T x), at ROWS x k to n; median of `repeats` after a warm-up."""
    import torch

    from lorachain.training.emulated_matmul import Fp32Matmuls

    dtype = torch.float32 if kind == "fp32" else torch.bfloat16
    x, w, dy = torch.randn(ROWS, k).to(dtype), torch.randn(n, k).to(dtype), torch.randn(ROWS, n).to(dtype)
    mode = Fp32Matmuls(torch.bfloat16) if kind == "emulated" else contextlib.nullcontext()
    times = []
    for i in range(repeats + 1):
        t = time.process_time()
        with mode:
            x @ w.T, dy @ w, dy.T @ x
        if i:
            times.append(time.process_time() - t)
    return 3 * 2 * ROWS * k * n / statistics.median(times) / 1e9


def exactness(k: int, n: int) -> dict:
    """Share of a ROWS x k by k x n bf16 matmul's outputs equal to the exactly rounded result (fp64
    accumulation, one rounding), natively and emulated, and each one's largest relative error."""
    import torch

    from lorachain.training.emulated_matmul import Fp32Matmuls

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(ROWS, k, generator=g).bfloat16(), torch.randn(k, n, generator=g).bfloat16()
    exact64 = x.double() @ w.double()
    exact = exact64.bfloat16()
    with Fp32Matmuls(torch.bfloat16):
        emulated = x @ w
    out = {}
    for kind, y in (("native", x @ w), ("emulated", emulated)):
        rel = ((y.double() - exact64).abs() / exact64.abs().clamp_min(1e-3)).max().item()
        out[kind] = {"equal_share": (y == exact).double().mean().item(), "max_rel_err": rel}
    return out


def first_loss(threads: int) -> dict:
    """The loss of the first batch of the demo's LoRA run (SmolLM2, bf16 autocast, eval mode) with
    bf16 matmuls and attention exact (in fp64), emulated (in fp32), native, and all in fp32."""
    import torch

    from lorachain.data.batching import collate
    from lorachain.training.emulated_matmul import Fp32Matmuls
    from lorachain.training.loop import Trainer
    from lorachain.training.step import loss_units, micro_batches, summed_loss

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        cfg = bench.config("lora", "fp32", 1, out, evaluate=False)
        tr = Trainer(cfg, None, None, progress=False)
        tr.restore()
        chunk = next(iter(micro_batches(tr.data.train, 0, cfg.train.batch_size, 1, cfg.train.seed)))
        batch, units = (
            collate(chunk, tr.s.tokenizer.pad_token_id, False),
            sum(loss_units(e, False) for e in chunk),
        )
        tr.peft.eval()
        bf16 = torch.bfloat16
        ways = {"exact": Fp32Matmuls(bf16, up=torch.float64), "emulated": Fp32Matmuls(bf16)}
        ways["native"] = contextlib.nullcontext()
        losses = {}
        with torch.no_grad():
            losses["fp32"] = (summed_loss(tr.peft, batch, False) / units).item()
            for kind, mode in ways.items():
                with torch.autocast("cpu", dtype=bf16), mode:
                    losses[kind] = (summed_loss(tr.peft, batch, False) / units).item()
    return losses


def step(kind: str, steps: int, threads: int) -> dict:
    """One loop's LoRA step in a fresh process: fp32, bf16 (emulated here) or bf16 forced native."""
    import lorachain.training.precision as p

    # the precision policy is told which kernel to use: the CPU's own bf16 one, or the emulation
    p.cpu_flags = {"native": lambda: {"avx512_bf16"}, "emulated": lambda: {"avx2"}}.get(kind, p.cpu_flags)
    with tempfile.TemporaryDirectory() as out:
        r = bench.time_steps("fp32" if kind == "fp32" else "bf16", steps, threads, out)
    return r | {"kind": kind}


def attention(tokens: int, repeats: int) -> dict:
    """SDPA forward + backward at `tokens`: CPU seconds (median) per arithmetic, and the largest
    error of the output and dQ relative to the largest exact value (fp64 on the bf16 inputs)."""
    import torch

    from lorachain.training.emulated_matmul import Fp32Matmuls

    g = torch.Generator().manual_seed(0)
    q, k, v, dy = (torch.randn(1, 9, tokens, 64, generator=g).bfloat16() for _ in range(4))

    def run(kind: str) -> tuple[float, list]:
        dtype = {"fp32": torch.float32, "exact": torch.float64}.get(kind, torch.bfloat16)
        mode = Fp32Matmuls(torch.bfloat16) if kind == "emulated" else contextlib.nullcontext()
        leaves = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        t = time.process_time()
        with mode:
            out = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True)
            out.backward(dy.to(dtype))
        return time.process_time() - t, [out.detach().double(), leaves[0].grad.double()]

    _, exact = run("exact")
    row: dict = {"tokens": tokens}
    for kind in ("fp32", "emulated", "native"):
        times = [run(kind)[0] for _ in range(repeats)]
        got = run(kind)[1]
        row[kind] = {
            "cpu_s": statistics.median(times),
            "rel_err_out": ((got[0] - exact[0]).abs().max() / exact[0].abs().max()).item(),
            "rel_err_dq": ((got[1] - exact[1]).abs().max() / exact[1].abs().max()).item(),
        }
    return row


def attention_choice(lengths: list[int], repeats: int, threads: int) -> list[dict]:
    """Eager against SDPA attention in a whole SmolLM2 forward + backward (8 rows of each length, frozen
    weights held in bf16, gradients to the inputs as in a LoRA step), bf16 emulated: CPU seconds,
    medians, the two kernels interleaved. What `precision.attention("auto")` should pick here."""
    import torch

    from lorachain.config import ModelConfig
    from lorachain.models import load_model
    from lorachain.training.precision import Precision, compute_copies

    torch.set_num_threads(threads)
    prec = Precision("bf16", "cpu", emulate=True)
    models = {}
    for kind in ("eager", "sdpa"):
        m = load_model(ModelConfig(name_or_path=MODEL, attn_implementation=kind))
        m.requires_grad_(False)
        compute_copies(m, prec)
        models[kind] = m
    rows = []
    for n in lengths:
        ids = torch.randint(0, 49152, (8, n), generator=torch.Generator().manual_seed(n))
        times: dict[str, list[float]] = {"eager": [], "sdpa": []}
        for rep in range(repeats + 1):  # the first round warms up
            for kind in ("eager", "sdpa") if rep % 2 else ("sdpa", "eager"):
                m = models[kind]
                x = m.get_input_embeddings()(ids).detach().requires_grad_()
                t = time.process_time()
                with prec.autocast():
                    loss = m(inputs_embeds=x, labels=ids).loss
                with prec.matmuls():
                    loss.backward()
                if rep:
                    times[kind].append(time.process_time() - t)
        row = {"tokens": n, **{k: statistics.median(v) for k, v in times.items()}}
        row["sdpa_vs_eager"] = row["sdpa"] / row["eager"]
        rows.append(row)
        secs = f"eager {row['eager']:.2f} CPU s, sdpa {row['sdpa']:.2f} ({row['sdpa_vs_eager']:.2f}x)"
        print(f"{n:5d} tokens x 8: {secs}", flush=True)
    return rows


def _child(args: tuple) -> dict:
    return step(*args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", action="store_true", help="also time a training step per precision")
    ap.add_argument("--accuracy", action="store_true", help="also the first batch's loss in each arithmetic")
    ap.add_argument("--attention", action="store_true", help="also the fused attention (SDPA) per arithmetic")
    ap.add_argument("--attention-choice", action="store_true", help="also eager vs SDPA in a step, emulated")
    args = ap.parse_args()
    import torch

    from lorachain.training.precision import NATIVE, cpu_flags

    torch.set_num_threads(args.threads)
    native_bf16 = bool(cpu_flags() & NATIVE["bf16"])
    rows = []
    for name, (k, n) in SHAPES.items():
        g = {kind: time_matmul(kind, k, n, args.repeats) for kind in ("fp32", "emulated", "native")}
        exact = exactness(k, n)
        rows.append(
            {"shape": name, "rows": ROWS, **{f"{k_}_gflops": v for k_, v in g.items()}, "exactness": exact}
        )
        gf = "  ".join(f"{kind} {v:6.2f}" for kind, v in g.items())
        print(f"{name:18s} {gf} GFLOP/s")
    result = {"cpu": bench._cpu_name(), "threads": args.threads, "native_bf16_cpu": native_bf16}
    result["matmuls"] = rows
    if args.accuracy:
        result["first_loss"] = first_loss(args.threads)
        print("first-batch loss:", result["first_loss"], flush=True)
    if args.attention:
        result["attention"] = [attention(tokens, args.repeats) for tokens in (512, 1024)]
        for r in result["attention"]:
            secs = {k: round(r[k]["cpu_s"], 3) for k in ("fp32", "emulated", "native")}
            print(f"SDPA {r['tokens']} tokens: CPU s {secs}", flush=True)
    if args.attention_choice:
        result["attention_choice"] = attention_choice([64, 160, 256, 512], args.repeats, args.threads)
    if args.steps:
        ctx = mp.get_context("spawn")
        runs: dict[str, list[dict]] = {"fp32": [], "emulated": [], "native": []}
        for rep in range(3):
            for kind in runs:
                if kind == "native" and rep:
                    continue
                with ctx.Pool(1) as pool:
                    r = pool.map(_child, [(kind, 2 if kind != "native" else 1, args.threads)])[0]
                runs[kind].append(r)
                print(f"round {rep}: {kind:8s} {r['cpu_step_s']:.2f} CPU s/step", flush=True)
        med = {k: statistics.median(r["cpu_step_s"] for r in v) for k, v in runs.items()}
        result["steps"] = {
            k: {"cpu_step_s": med[k], "runs": len(runs[k]), "vs_fp32": med[k] / med["fp32"]} for k in runs
        }
    out = HERE / "results" / "emulated_bf16.json"
    if out.is_file():  # the parts not measured this time keep their last figures
        result = {**json.loads(out.read_text()), **result}
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
