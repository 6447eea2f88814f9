"""1 vs 2 processes: the old hand all-reduce vs `train.parallel: ddp` vs `fsdp` (step time, memory, knot).

One command: `python benchmarks/parallel.py [--steps 6 --repeats 3 --model HUB_ID]` (SmolLM2-135M).
`--size 1b` measures instead a rank's memory at the ~1B Llama shape, the load included, through
lorachain's own `train()` (`parallel_1b.py`), and adds its `*_1b` keys to the same JSON.
Each configuration is a fresh `torchrun --standalone` launch (gloo, CPU, one thread per rank), the
configurations interleaved over repeats, medians reported. A rank trains LoRA r=8 on q/v with
AdamW on its half of a global batch of 8 random 64-token rows (all tokens targets), with the same
pieces as lorachain's step (`summed_loss`, `Dist.wrap`, `shard_base`, clipping): only the gradient
reduction differs. `hand` is the loop lorachain had before (`all_reduce` of each LoRA gradient,
one parameter at a time, after the backward: commit 2981e74); `ddp` is DistributedDataParallel
(bucketed, overlapped with the backward); `fsdp` loads the frozen base sharded per decoder layer
(FSDP2, `training/sharded.py`: built on meta, each rank maps its rows of the safetensors), gathers
through shared memory (`train.fsdp_all_gather: auto`) and keeps the LoRA factors whole under DDP;
`fsdp_gloo` gathers through gloo instead; `single` is one process on the whole batch. After the
timed steps each rank ties a knot (`tie_on_shards` under fsdp) and the bytes every collective of
the knot moves are counted. Peak RSS per rank: during training (reset after set-up) and including
the model load. Writes `benchmarks/results/parallel.json` and prints a table.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from parallel_1b import MODES_1B, keys, run, weight_bytes
from parallel_1b import worker as worker_1b

import lorachain  # noqa: F401  (first: its process defaults, huge pages, reach every rank as in the CLI)

MODES = ("single", "hand", "ddp", "fsdp", "fsdp_gloo")
ROOT = Path(__file__).resolve().parent.parent


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def count_bytes(counter: list[int]):
    """Wrap torch.distributed's collectives so each adds the bytes of its tensors to `counter`."""
    import torch.distributed as dist

    originals = {}

    def wrap(name):
        fn = getattr(dist, name)
        originals[name] = fn

        def counted(tensor, *args, **kwargs):
            tensors = tensor if isinstance(tensor, list | tuple) else [tensor]
            counter[0] += sum(t.numel() * t.element_size() for t in tensors)
            return fn(tensor, *args, **kwargs)

        setattr(dist, name, counted)

    for name in ("all_reduce", "all_gather_into_tensor", "all_gather", "broadcast", "reduce_scatter_tensor"):
        wrap(name)
    return lambda: [setattr(dist, n, f) for n, f in originals.items()]


def worker(mode: str, model_name: str, steps: int, out: str) -> None:
    import torch

    from lorachain.chain.knot import extend, lora_config, tie_knot
    from lorachain.chain.shards import tie_on_shards
    from lorachain.config import ChainConfig, LinkConfig, ModelConfig
    from lorachain.models import load_model, resolve_target_modules
    from lorachain.training.fsdp_gather import schedule
    from lorachain.training.parallel import Dist, init_dist
    from lorachain.training.runfolder import reset_peak_memory
    from lorachain.training.sharded import load_sharded
    from lorachain.training.step import summed_loss, trainable

    torch.set_num_threads(1)
    sharded = mode.startswith("fsdp")
    dist = init_dist("fsdp" if sharded else "auto") if mode != "single" else Dist()
    if mode == "hand":
        dist = Dist(dist.rank, dist.world, "none")
    torch.manual_seed(0)
    if sharded:  # built on meta, sharded, each rank maps its rows (as train.parallel: fsdp loads)
        model = load_sharded(ModelConfig(name_or_path=model_name), dist)
        schedule(model, dist.world, "process_group" if mode == "fsdp_gloo" else "auto")
    else:
        model = load_model(ModelConfig(name_or_path=model_name))
    targets = resolve_target_modules(model, ["q_proj", "v_proj"])
    chain = ChainConfig(links=[LinkConfig(8, 16)], dropout=0.0)
    peft = extend(model, lora_config(chain.links[0], chain, targets, False, "causal_lm"), gaussian=True)
    net = dist.wrap(peft)
    params = trainable(peft)
    opt = torch.optim.AdamW(params, lr=1e-4)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give the freed full weights back, so RSS shows what is held
    rss_setup = rss_mb("VmRSS")
    reset_peak_memory()
    g = torch.Generator().manual_seed(1)
    times = []
    world = max(1, dist.world)
    for step in range(steps + 2):  # 2 warm-up steps
        ids = torch.randint(0, model.config.vocab_size, (8, 64), generator=g)[dist.rank :: world]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        if world > 1:
            torch.distributed.barrier()
        t0 = time.perf_counter()
        loss = summed_loss(net, batch, False) / (8 * 63)
        (loss * (world if mode == "ddp" or sharded else 1)).backward()
        if mode == "hand":  # the old Dist.sum_grads
            for p in params:
                torch.distributed.all_reduce(p.grad, op=torch.distributed.ReduceOp.SUM)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= 2:
            times.append(time.perf_counter() - t0)
    rss_train = rss_mb("VmHWM")
    counter = [0]
    undo = count_bytes(counter) if world > 1 else (lambda: None)
    t0 = time.perf_counter()
    if sharded:
        knot = tie_on_shards(peft, 0, steps, 8, 16, "benchmark")
    else:
        knot = tie_knot(peft, 0, steps, 8, 16, "benchmark")
    knot_s = time.perf_counter() - t0
    undo()
    weight = peft.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    row = {
        "rank": dist.rank,
        "step_s": statistics.median(times),
        "rss_after_setup_mb": rss_setup,
        "train_peak_rss_mb": rss_train,
        "peak_rss_incl_load_mb": _hwm_total(),
        "knot_s": knot_s,
        "knot_comm_bytes": counter[0],
        "knot_layers": len(knot.factors),
        "q_proj_local_shape": list(local.shape),
        "q_proj_full_shape": list(weight.shape),
    }
    Path(out, f"{mode}.rank{dist.rank}.json").write_text(json.dumps(row))
    if world > 1:
        torch.distributed.destroy_process_group()


def _hwm_total() -> float:
    """ru_maxrss: the peak over the whole process (the model load included; never reset)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def launch(mode: str, args, out: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    me = [__file__, "--worker", mode, "--model", args.model, "--steps", str(args.steps), "--out", out]
    if mode == "single":
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *me]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"{mode}: failed\n{proc.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob(f"{mode}.rank*.json"))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    ap.add_argument("--worker")
    ap.add_argument("--out")
    ap.add_argument("--size", choices=("135m", "1b"), default="135m")
    ap.add_argument("--folder", default="/tmp/lorachain-bench-1b", help="--size 1b: where the model is saved")
    ap.add_argument("--modes", default=",".join(MODES_1B), help="--size 1b: modes to run")
    ap.add_argument("--shape", default="1b", help="--size 1b: the shape saved (135m: a quick smoke run)")
    ap.add_argument("--note", default="", help="what else ran on the machine")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "parallel.json"))
    args = ap.parse_args()
    if args.worker:
        if args.size == "1b":
            return worker_1b(args.worker, args.model, args.steps, args.out)
        return worker(args.worker, args.model, args.steps, args.out)
    if args.size == "1b":
        return main_1b(args)
    runs: dict[str, list[list[dict]]] = {m: [] for m in MODES}
    for r in range(args.repeats):
        for mode in MODES:
            with tempfile.TemporaryDirectory() as out:
                runs[mode].append(launch(mode, args, out))
                print(f"repeat {r} {mode}: {[round(x['step_s'], 3) for x in runs[mode][-1]]}", flush=True)
    med = {}
    for mode, reps in runs.items():
        rows = [x for rep in reps for x in rep]
        med[mode] = {
            key: statistics.median(x[key] for x in rows)
            for key in (
                "step_s",
                "rss_after_setup_mb",
                "train_peak_rss_mb",
                "peak_rss_incl_load_mb",
                "knot_s",
            )
        }
        med[mode]["step_s_per_repeat"] = [statistics.median(x["step_s"] for x in rep) for rep in reps]
        med[mode]["knot_comm_bytes"] = max(x["knot_comm_bytes"] for x in rows)
        med[mode]["q_proj_local_shape"] = rows[0]["q_proj_local_shape"]
        med[mode]["tokens_per_s"] = 8 * 64 / med[mode]["step_s"]
    result = {
        "benchmark": "parallel",
        "command": f"python benchmarks/parallel.py --steps {args.steps} --repeats {args.repeats}",
        "model": args.model,
        "global_batch": "8 x 64 tokens",
        "lora": "r=8 on q_proj, v_proj, AdamW",
        "machine": f"{args.note or 'idle'}; {os.cpu_count()} CPU cores, "
        f"{platform.processor() or platform.machine()}, 1 thread per rank, gloo",
        "torch": __import__("torch").__version__,
        "modes": med,
        "ddp_step_time_ratio_vs_hand_allreduce": med["ddp"]["step_s"] / med["hand"]["step_s"],
        "fsdp_step_time_ratio_vs_ddp": med["fsdp"]["step_s"] / med["ddp"]["step_s"],
        "fsdp_gloo_step_time_ratio_vs_ddp": med["fsdp_gloo"]["step_s"] / med["ddp"]["step_s"],
        "fsdp_rank_rss_ratio_world2": med["fsdp"]["train_peak_rss_mb"] / med["single"]["train_peak_rss_mb"],
        "fsdp_rank_rss_after_setup_ratio_world2": med["fsdp"]["rss_after_setup_mb"]
        / med["single"]["rss_after_setup_mb"],
        "knot_gathers_full_weight": False,
        "knot_comm_bytes_fsdp": med["fsdp"]["knot_comm_bytes"],
    }
    path = Path(args.json)
    old = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**old, **result}, indent=2) + "\n")  # (the 1b keys stay)
    head = ("step s", "tok/s", "RSS setup", "RSS train", "knot s", "knot B")
    print(f"{'mode':8} " + " ".join(f"{h:>10}" for h in head))
    for mode, m in med.items():
        print(
            f"{mode:8} {m['step_s']:10.3f} {m['tokens_per_s']:10.0f} {m['rss_after_setup_mb']:10.0f} "
            f"{m['train_peak_rss_mb']:10.0f} {m['knot_s']:10.3f} {m['knot_comm_bytes']:10d}"
        )
    for key in (
        "ddp_step_time_ratio_vs_hand_allreduce",
        "fsdp_step_time_ratio_vs_ddp",
        "fsdp_gloo_step_time_ratio_vs_ddp",
        "fsdp_rank_rss_ratio_world2",
    ):
        print(f"{key}: {result[key]:.3f}")
    print(f"wrote {path}")


def main_1b(args) -> None:
    """The 1b measurement; its keys are added to parallel.json beside the 135M ones."""
    folder = Path(args.folder)
    med = run(folder, args.steps, args.repeats, tuple(args.modes.split(",")), args.shape)
    path = Path(args.json)
    result = json.loads(path.read_text()) if path.is_file() else {}
    result.update(keys(med, weight_bytes(folder), args.steps, args.repeats))
    result["command_1b"] = (
        f"python benchmarks/parallel.py --size 1b --steps {args.steps} --repeats {args.repeats}"
    )
    result["machine_1b"] = (
        f"{os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}; {args.note}"
    )
    path.write_text(json.dumps(result, indent=2) + "\n")
    for k, v in result.items():
        if k.endswith("_1b") and not isinstance(v, dict | str):
            print(f"{k}: {v}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
