"""Where an fsdp step's time goes on CPUs, against ddp: `python benchmarks/fsdp_profile.py`.

Each configuration is a fresh `torchrun --standalone --nproc-per-node 2` launch (gloo, one thread per
rank) that trains LoRA r=8 on q/v of a random Llama (fp32) with lorachain's pieces (`shard_base`,
`fsdp_gather.schedule`, `Dist.wrap`, `summed_loss`): `ddp`, and fsdp gathering through the process
group (`fsdp_gloo`), through shared memory (`fsdp_shm`, the default) and through shared memory kept
gathered from forward to backward (`fsdp_kept`). Per step (medians over the timed steps; 2 warm-up
steps): the wall time, and inside it FSDP2's all-gathers split into the copy-in (each rank's shard
into the all-gather buffer), the transfer (the process group's all-gather, or the arena's barrier)
and the copy-out (the gathered buffer into the unit's parameters), with the bytes the all-gathers
produce. The timing wraps FSDP2's functions (benchmark only). Beside them, microbenchmarks: gloo's
all-gather of one decoder layer against a copy of the same bytes. Shapes: `medium` (hidden 1024,
8 layers, vocab 32000: 0.58 GiB) and `1b` (`scale_models.py`'s, 4.1 GiB). Writes
`benchmarks/results/fsdp_profile.json` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import lorachain  # noqa: F401  (first: its process defaults, huge pages, reach every rank as in the CLI)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from scale_models import SHAPES as SCALE_SHAPES  # noqa: E402  the shapes of scale.py and parallel.py
from scale_models import llama_config  # noqa: E402

MODES = ("ddp", "fsdp_gloo", "fsdp_shm", "fsdp_kept")
SHAPES = {k: SCALE_SHAPES[k] for k in ("medium", "1b")}
GIB = 1024**3


def build(shape: str):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(shape)).eval()


def timers(parts: dict, counts: dict, nbytes: list) -> None:
    """Wrap FSDP2's all-gather pieces so each adds its seconds to `parts` (benchmark only)."""
    import torch.distributed.fsdp._fully_shard._fsdp_param_group as group

    from lorachain.training import fsdp_gather

    def timed(owner, name, key, count_bytes=False):
        fn = getattr(owner, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            parts[key] += time.perf_counter() - t0
            counts[key] += 1
            if count_bytes:  # the all-gather's output: the whole unit
                t = kwargs.get("output_tensor", args[1] if len(args) > 1 else None)
                nbytes[0] += t.numel() * t.element_size()
            return out

        setattr(owner, name, wrapper)

    from torch.distributed.fsdp._fully_shard import _fsdp_collectives as coll

    timed(group, "foreach_all_gather", "all_gather")  # copy-in and transfer
    timed(group, "foreach_all_gather_copy_out", "copy_out")
    timed(coll.DefaultAllGather, "__call__", "transfer", True)
    timed(fsdp_gather.SharedMemoryGather, "__call__", "transfer", True)


def worker(mode: str, shape: str, batch: str, steps: int, out: str) -> None:
    import torch

    from lorachain.chain.knot import extend, lora_config
    from lorachain.config import ChainConfig, LinkConfig
    from lorachain.training.fsdp_gather import schedule
    from lorachain.training.parallel import init_dist, shard_base
    from lorachain.training.step import summed_loss, trainable

    torch.set_num_threads(1)
    dist = init_dist("fsdp" if mode != "ddp" else "ddp")
    model = build(shape)
    parts, counts, nbytes = defaultdict(float), defaultdict(int), [0]
    if mode != "ddp":
        timers(parts, counts, nbytes)
        shard_base(model)
        how = "process_group" if mode == "fsdp_gloo" else "shared_memory"
        schedule(model, dist.world, how, reshard_after_forward=mode != "fsdp_kept")
    chain = ChainConfig(links=[LinkConfig(8, 16)], dropout=0.0)
    peft = extend(model, lora_config(chain.links[0], chain, ["q_proj", "v_proj"], False, "causal_lm"), True)
    net = dist.wrap(peft)
    params = trainable(peft)
    opt = torch.optim.AdamW(params, lr=1e-4)
    rows, length = (int(x) for x in batch.split("x"))
    g = torch.Generator().manual_seed(1)
    times = []
    for step in range(steps + 2):
        ids = torch.randint(0, model.config.vocab_size, (rows, length), generator=g)[dist.rank :: dist.world]
        batch_ = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        torch.distributed.barrier()
        if step == 2:
            parts.clear(), counts.clear()
            nbytes[0] = 0
        t0 = time.perf_counter()
        loss = summed_loss(net, batch_, False) / (rows * (length - 1))
        (loss * dist.loss_scale(net)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - t0)
    import resource

    row = {
        "rank": dist.rank,
        "step_s": statistics.median(times),
        "step_seconds": times,
        "copy_in_s": (parts["all_gather"] - parts["transfer"]) / steps,
        "transfer_s": parts["transfer"] / steps,
        "copy_out_s": parts["copy_out"] / steps,
        "gathers_per_step": counts["transfer"] / steps,
        "gathered_gib_per_step": nbytes[0] / steps / GIB,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "loss": float(loss),
    }
    Path(out, f"{mode}.rank{dist.rank}.json").write_text(json.dumps(row))
    torch.distributed.destroy_process_group()


def bandwidth(shape: str, out: str) -> None:
    """gloo's all-gather of one decoder layer (fp32) against a copy of the same bytes, per rank."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    h, i, _, a, kv, _ = SHAPES[shape]
    layer = 2 * h * h + 2 * h * (h * kv // a) + 3 * h * i  # q, o, k, v, the MLP: fp32 numbers
    shard = torch.randn(layer // 2)
    whole, copy = torch.empty(layer), torch.empty(layer)
    gather, memcpy = [], []
    for _ in range(7):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_gather_into_tensor(whole, shard)
        gather.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        copy.copy_(whole)
        memcpy.append(time.perf_counter() - t0)
    row = {
        "layer_gib": layer * 4 / GIB,
        "gloo_all_gather_s": statistics.median(gather[2:]),
        "gloo_received_gib_per_s": layer * 2 / GIB / statistics.median(gather[2:]),  # the other half
        "copy_gib_per_s": layer * 4 / GIB / statistics.median(memcpy[2:]),
    }
    Path(out, f"bandwidth.rank{dist.get_rank()}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def launch(args, *extra: str, name: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parent)}
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        cmd += [__file__, "--shape", args.shape, "--steps", str(args.steps), "--out", out, *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=7200)
        if proc.returncode:
            raise SystemExit(f"{name}: failed\n{proc.stderr[-3000:]}")
        return [json.loads(p.read_text()) for p in sorted(Path(out).glob(f"{name}.rank*.json"))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=tuple(SHAPES), default="medium")
    ap.add_argument("--batches", default="2x32,8x128", help="global batches, rows x tokens")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--note", default="", help="what else ran on the machine")
    ap.add_argument("--worker")
    ap.add_argument("--batch")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker == "bandwidth":
        return bandwidth(args.shape, args.out)
    if args.worker:
        return worker(args.worker, args.shape, args.batch, args.steps, args.out)
    bw = launch(args, "--worker", "bandwidth", name="bandwidth")
    results: dict = {}
    for batch in args.batches.split(","):
        runs: dict[str, list[dict]] = defaultdict(list)
        for r in range(args.repeats):
            for mode in args.modes.split(","):
                runs[mode] += launch(args, "--worker", mode, "--batch", batch, name=mode)
                print(f"{batch} repeat {r} {mode}: step {runs[mode][-1]['step_s']:.3f} s", flush=True)
        keys = ("step_s", "copy_in_s", "transfer_s", "copy_out_s", "gathers_per_step")
        keys += ("gathered_gib_per_step", "peak_rss_gib")
        med = {m: {k: statistics.median(x[k] for x in rows) for k in keys} for m, rows in runs.items()}
        for m in med:
            med[m]["ratio_vs_ddp"] = med[m]["step_s"] / med["ddp"]["step_s"] if "ddp" in med else None
        results[batch] = med
    result = {
        "benchmark": "fsdp_profile",
        "command": f"python benchmarks/fsdp_profile.py --shape {args.shape} --batches {args.batches} "
        f"--steps {args.steps} --repeats {args.repeats}",
        "shape": dict(zip(("hidden", "intermediate", "layers", "heads", "kv", "vocab"), SHAPES[args.shape])),
        "setup": "LoRA r=8 on q/v, AdamW, fp32, 2 ranks (torchrun, gloo), 1 thread each; medians over the "
        "timed steps of each rank and repeat",
        "machine": f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}; {args.note}",
        "bandwidth": {k: statistics.median(x[k] for x in bw) for k in bw[0]},
        "batches": results,
    }
    name = "fsdp_profile.json" if args.shape == "medium" else f"fsdp_profile_{args.shape}.json"
    path = HERE / "results" / name
    path.write_text(json.dumps(result, indent=2) + "\n")
    b = result["bandwidth"]
    print(f"gloo all-gather of a layer ({b['layer_gib']:.3f} GiB): {b['gloo_received_gib_per_s']:.2f} GiB/s "
          f"received a rank; a copy of it: {b['copy_gib_per_s']:.2f} GiB/s")  # fmt: skip
    head = ("step s", "x ddp", "copy-in", "transfer", "copy-out", "gathers", "GiB/step")
    for batch, med in results.items():
        print(f"global batch {batch}\n{'mode':10} " + " ".join(f"{h:>9}" for h in head))
        for m, x in med.items():
            print(
                f"{m:10} {x['step_s']:9.3f} {x['ratio_vs_ddp'] or 0:9.2f} {x['copy_in_s']:9.3f} "
                f"{x['transfer_s']:9.3f} {x['copy_out_s']:9.3f} {x['gathers_per_step']:9.0f} "
                f"{x['gathered_gib_per_step']:9.2f}"
            )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
