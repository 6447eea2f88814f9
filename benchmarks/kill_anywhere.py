"""Kill-anywhere: SIGKILL `lorachain train` at random moments, rerun, compare with an unkilled run.

One command: `python benchmarks/kill_anywhere.py [--kills 20 --seed 0 --quantization nf4 --world 2
--parallel ddp]`.
A tiny random Llama saved to disk (with `--quantization`, loaded quantized: knots on the side path),
a 2-link chain with dropout (so RNG state matters), checkpoints every 3 steps; each trial kills the
run after a random delay (in a step, in a knot, while a checkpoint or an output is being written),
reruns the same command until it finishes, and compares every tensor of chain.safetensors and the
metrics rows with the reference. Prints kills tried and divergent results (goal: 0), writes JSON.
`--world 2`: both runs are `torchrun --nproc-per-node 2 ... train.parallel=fsdp` (`--parallel ddp`:
DDP; a quantized base is not sharded, so with `--quantization` the default is ddp), and each kill is
a SIGKILL to one rank, chosen at random (the launcher then stops the other); the reference is the
unkilled 2-process run (same-world resume is bit-exact).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def setup(tmp: Path, quantization: str = "none", world: int = 1, parallel: str = "fsdp") -> list[str]:
    import yaml
    from conftest import make_tokenizer, run_config, tiny_model, toy_rows, write_jsonl

    model = tmp / "tiny"
    tiny_model("llama").save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    data = (
        str(write_jsonl(tmp / "t.jsonl", toy_rows(96, 1))),
        str(write_jsonl(tmp / "v.jsonl", toy_rows(16, 2))),
    )
    cfgs = []
    for name in ("ref", "killed"):
        cfg = run_config(
            tmp,
            data,
            "llama",
            output_dir=str(tmp / name),
            chain={"links": [{"rank": 4, "alpha": 8}, {"rank": 2, "alpha": 4}], "dropout": 0.1},
            train={"epochs": 3, "batch_size": 8, "save_every": 3, "seed": 0},
        )
        cfg["model"]["name_or_path"] = str(model)
        cfg["model"]["quantization"] = quantization  # nf4 | fp4 | int8: knots on the side path
        if world > 1:
            cfg["train"]["parallel"] = parallel
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        cfgs.append(str(path))
    return cfgs


def run(cfg: str, kill_after: float | None, world: int = 1, rank: int = 0) -> int:
    """Train `cfg` (on `world` processes); SIGKILL it (rank `rank` of it) after `kill_after` s."""
    cmd = [sys.executable, "-m", "lorachain", "train", cfg]
    if world > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world)]
        cmd += ["-m", "lorachain", "train", cfg]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORACHAIN_DIST_TIMEOUT": "60"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    if kill_after is not None:
        try:
            return proc.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            kill_rank(proc, rank) if world > 1 else proc.send_signal(signal.SIGKILL)
    return proc.wait()


def kill_rank(launcher: subprocess.Popen, rank: int) -> None:
    """SIGKILL the worker of `rank` (its RANK variable); if none has started yet, the launcher and
    everything it started (no orphan may write to the run folder the rerun uses)."""
    import psutil

    children = psutil.Process(launcher.pid).children(recursive=True)
    for child in children:
        try:
            if child.environ().get("RANK") == str(rank):
                child.send_signal(signal.SIGKILL)
                return
        except psutil.Error:
            continue
    for p in [*children, psutil.Process(launcher.pid)]:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.Error:
            continue


def compare(a: Path, b: Path) -> list[str]:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a / "chain.safetensors")), load_file(str(b / "chain.safetensors"))
    bad = [k for k in x if k not in y or not torch.equal(x[k], y[k])]
    steps = [json.loads(r)["step"] for r in (b / "metrics.jsonl").read_text().splitlines()]
    if steps != sorted(set(steps)) or steps != list(range(1, len(steps) + 1)):
        bad.append("metrics.jsonl steps")
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quantization", default="none", help="a quantized base: nf4, fp4 or int8")
    ap.add_argument("--world", type=int, default=1, help="2: torchrun, one rank killed each time")
    ap.add_argument("--parallel", default=None, help="with --world 2: fsdp (default) or ddp (quantized)")
    ap.add_argument(
        "--out", default=None, help="default: benchmarks/results/kill_anywhere[_nf4][_world2].json"
    )
    args = ap.parse_args()
    q, world = args.quantization, args.world
    parallel = args.parallel or ("fsdp" if q == "none" else "ddp")  # (fsdp refuses a quantized base)
    tail = ("" if q == "none" else "_" + q) + ("" if world == 1 else f"_world{world}")
    tail += "" if world == 1 or parallel == ("fsdp" if q == "none" else "ddp") else f"_{parallel}"
    args.out = args.out or f"benchmarks/results/kill_anywhere{tail}.json"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rng = random.Random(args.seed)
    trials = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ref_cfg, cfg = setup(tmp, args.quantization, world, parallel)
        t0 = time.perf_counter()
        assert run(ref_cfg, None, world) == 0
        duration = time.perf_counter() - t0
        for i in range(args.kills):
            killed_dir = tmp / "killed"
            delays = []
            while not (killed_dir / "summary.json").is_file():  # kill, rerun, ... until it finishes
                delay = rng.uniform(0.5, duration) if len(delays) < 3 else None
                delays.append(delay)
                run(cfg, delay, world, rng.randrange(world))
            bad = compare(tmp / "ref", killed_dir)
            trials.append(
                {
                    "trial": i,
                    "kills": sum(d is not None for d in delays),
                    "delays_s": delays,
                    "divergent": bad,
                }
            )
            print(f"trial {i}: {trials[-1]['kills']} kills, divergent tensors: {len(bad)}", flush=True)
            import shutil

            shutil.rmtree(killed_dir)
    kills = sum(t["kills"] for t in trials)
    divergent = sum(bool(t["divergent"]) for t in trials)
    print(f"\nkills tried: {kills}   runs finished: {len(trials)}   divergent results: {divergent}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "kills": kills,
                "trials": trials,
                "divergent": divergent,
                "reference_seconds": duration,
                "quantization": args.quantization,
                "world": world,
                "parallel": parallel if world > 1 else "none",
                "command": "python benchmarks/kill_anywhere.py "
                + f"--kills {args.kills} --seed {args.seed}"
                + ("" if q == "none" else f" --quantization {q}")
                + ("" if world == 1 else f" --world {world}")
                + (f" --parallel {args.parallel}" if args.parallel else ""),
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
