"""`python benchmarks/parallel.py --size 1b`: memory of a rank at the ~1B Llama shape, load included.

The 1b shape of `scale_models.py` (random weights, fp32) is saved once as safetensors. Each mode is a
fresh launch of lorachain's own `train()` on that folder (the setup pipeline, sharded loading under
fsdp): a 2-link chain (a knot after half the steps), LoRA r=8 on q/v, a global batch of 2 rows of 32
tokens, one thread per rank, gloo. `single` is one process; `ddp` and `fsdp` are 2 ranks
(`torchrun`), fsdp with the defaults (`train.fsdp_load: map`: shards are private maps of the file;
`train.fsdp_all_gather: auto`: units gathered through a shared-memory arena), `fsdp_gloo` gathering
through gloo, `fsdp_kept` keeping each unit gathered from its forward to its backward
(`train.fsdp_reshard_after_forward: false`: faster, the whole model on each rank), `fsdp_read`
(each rank reads its rows into its own memory) and `fsdp_broadcast` (rank 0 reads, scatters the
rows). A thread samples /proc/self/status every 5 ms from start to end: the peak anonymous RSS
(what the rank owns; a run out of memory runs out of this), the peak shared RSS (the all-gather
arena, one a host) and the peak total RSS (VmHWM: with the file-backed pages of an mmap'd
checkpoint, which the ranks share, and the arena). Step time: the loop's own steps, the median of a
run's steps; per mode the median over ranks and repeats, each repeat's beside it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

MODES_1B = ("single", "ddp", "fsdp", "fsdp_gloo", "fsdp_kept", "fsdp_read", "fsdp_broadcast")
LOADS = {"fsdp_read": "read", "fsdp_broadcast": "broadcast"}  # train.fsdp_load (else map)
GATHERS = {  # train.fsdp_all_gather, train.fsdp_reshard_after_forward
    "fsdp_gloo": ("process_group", True),
    "fsdp_kept": ("auto", False),
}
GIB = 1024**3
HERE = Path(__file__).resolve().parent


def status_kib() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(rest.split()[0])
    return out


class Peaks:
    """The largest RssAnon and RssFile seen by a thread sampling every `every` seconds."""

    def __init__(self, every: float = 0.005) -> None:
        self.anon = self.file = self.shmem = 0
        self.every, self.done = every, False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.done:
            s = status_kib()
            self.anon, self.file = max(self.anon, s["RssAnon"]), max(self.file, s["RssFile"])
            self.shmem = max(self.shmem, s.get("RssShmem", 0))
            time.sleep(self.every)

    def stop(self) -> dict:
        self.done = True
        self.thread.join()
        hwm = status_kib()["VmHWM"]
        return {
            "peak_anon_rss_gib": self.anon * 1024 / GIB,
            "peak_file_rss_gib": self.file * 1024 / GIB,
            "peak_shmem_rss_gib": self.shmem * 1024 / GIB,
            "peak_total_rss_gib": hwm * 1024 / GIB,
        }


def save_model(folder: Path, shape: str = "1b") -> None:
    """The random 1b Llama (fp32) and a word tokenizer covering its vocabulary, as a model folder."""
    from scale_models import SHAPES, build, word_tokenizer

    if (folder / "config.json").is_file():
        return
    model = build(shape, "fp32")
    model.save_pretrained(folder)
    word_tokenizer(SHAPES[shape][5]).save_pretrained(folder)


def weight_bytes(folder: Path) -> int:
    from lorachain.training.sharded import safetensors_index

    return sum(e.row_bytes * (e.shape[0] if e.shape else 1) for e in safetensors_index(folder).values())


def worker(mode: str, folder: str, steps: int, out: str) -> None:
    peaks = Peaks()
    import torch
    from scale import instrument
    from scale_models import random_rows

    import lorachain.training.loop as loop
    from lorachain.config import RunConfig, from_dict
    from lorachain.training import train

    torch.set_num_threads(1)
    prepare, load = loop.prepare, []

    def timed_prepare(*args, **kwargs):  # the setup pipeline, the load included (benchmark only)
        t0 = time.perf_counter()
        setup = prepare(*args, **kwargs)
        load.append(time.perf_counter() - t0)
        return setup

    loop.prepare = timed_prepare
    clock = instrument()
    rank = int(os.environ.get("RANK", "0"))
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    rows = random_rows(Path(out) / f"rows{rank}.jsonl", 2 * steps, 31, vocab)
    raw = {
        "model": {"name_or_path": folder, "dtype": "float32"},
        "data": {
            "train": str(rows),
            "prompt": "{text}",
            "target": None,
            "label_field": None,
            "max_length": 32,
        },
        "chain": {
            "links": [{"rank": 8, "alpha": 16, "steps": steps // 2}, {"rank": 8, "alpha": 16}],
            "target_modules": ["q_proj", "v_proj"],
            "dropout": 0.0,
        },
        "optim": {"lr": 1e-4},
        "train": {
            "max_steps": steps,
            "batch_size": 2,
            "save_every": 10_000,
            "precision": "fp32",
            "check_memory": False,
            "parallel": "fsdp" if mode.startswith("fsdp") else "auto",
            "fsdp_load": LOADS.get(mode, "map"),
            "fsdp_all_gather": GATHERS.get(mode, ("auto", True))[0],
            "fsdp_reshard_after_forward": GATHERS.get(mode, ("auto", True))[1],
        },
        "output_dir": str(Path(out) / "run"),
    }
    t0 = time.perf_counter()
    summary = train(from_dict(RunConfig, raw), progress=False).summary
    wall = time.perf_counter() - t0
    row = {
        "rank": rank,
        **peaks.stop(),
        "wall_s": wall,
        "step_s": statistics.median(clock.wall),
        "step_seconds": clock.wall,
        "setup_s": load[0],  # training.setup.prepare: the load and the rest of the set-up
        "outside_steps_s": wall - sum(clock.wall),  # set-up, knots, the base checkpoint at the knot
        "links": len(summary.get("links", [])) or None,
    }
    Path(out, f"{mode}.rank{rank}.json").write_text(json.dumps(row))


def launch(mode: str, folder: Path, steps: int, out: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE)])
    me = [str(HERE / "parallel.py"), "--worker", mode, "--size", "1b", "--model", str(folder)]
    me += ["--steps", str(steps), "--out", out]
    if mode == "single":
        cmd = [sys.executable, *me]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *me]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode:
        raise SystemExit(f"{mode}: failed\n{proc.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob(f"{mode}.rank*.json"))]


def run(folder: Path, steps: int, repeats: int, modes: tuple[str, ...] = MODES_1B, shape: str = "1b") -> dict:
    """Every mode `repeats` times, interleaved; per mode the medians over ranks and repeats."""
    import tempfile

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)])}
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); from parallel_1b import save_model; "
    code += f"save_model(__import__('pathlib').Path({str(folder)!r}), {shape!r})"
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(repeats):
        for mode in modes:
            with tempfile.TemporaryDirectory() as out:
                ranks = launch(mode, folder, steps, out)
            runs[mode] += ranks
            print(f"repeat {r} {mode}: " + ", ".join(_short(x) for x in ranks), flush=True)
    keys = ("peak_anon_rss_gib", "peak_total_rss_gib", "peak_file_rss_gib", "peak_shmem_rss_gib")
    keys += ("step_s", "setup_s", "wall_s", "outside_steps_s")
    med = {m: {k: statistics.median(x[k] for x in rows) for k in keys} for m, rows in runs.items()}
    for m, rows in runs.items():
        ranks = sorted({x["rank"] for x in rows})
        per = len(ranks)  # each repeat's median over its ranks, in order
        med[m]["step_s_per_repeat"] = [
            statistics.median(x["step_s"] for x in rows[i : i + per]) for i in range(0, len(rows), per)
        ]
        for k in ("peak_anon_rss_gib", "peak_total_rss_gib"):  # the worst rank's median over repeats
            med[m][f"max_rank_{k[5:]}"] = max(
                statistics.median(x[k] for x in rows if x["rank"] == r) for r in ranks
            )
        med[m]["runs"] = len(rows)
    return med


def _short(x: dict) -> str:
    return (
        f"anon {x['peak_anon_rss_gib']:.2f} total {x['peak_total_rss_gib']:.2f} GiB step {x['step_s']:.2f} s"
    )


def keys(med: dict, weights: int, steps: int, repeats: int) -> dict:
    """The parallel.json keys of the 1b measurement (the 135M keys stay as they are)."""
    w = weights / GIB
    fsdp, single, ddp = med["fsdp"], med["single"], med["ddp"]
    out = {
        "weights_gib_1b": w,
        "fsdp_rank_anon_rss_gib_world2_1b": fsdp["max_rank_anon_rss_gib"],
        "fsdp_rank_total_rss_gib_world2_1b": fsdp["max_rank_total_rss_gib"],
        "ddp_rank_anon_rss_gib_world2_1b": ddp["max_rank_anon_rss_gib"],
        "ddp_rank_total_rss_gib_world2_1b": ddp["max_rank_total_rss_gib"],
        "single_anon_rss_gib_1b": single["max_rank_anon_rss_gib"],
        "single_total_rss_gib_1b": single["max_rank_total_rss_gib"],
        "fsdp_anon_target_gib_1b": w / 2 + 1,
        "fsdp_anon_within_target_1b": fsdp["max_rank_anon_rss_gib"] <= w / 2 + 1,
        "fsdp_total_rss_not_above_single_1b": fsdp["max_rank_total_rss_gib"]
        <= single["max_rank_total_rss_gib"],
        "fsdp_step_time_ratio_vs_ddp_1b": fsdp["step_s"] / ddp["step_s"],
        "step_s_1b": {m: med[m]["step_s"] for m in med},  # medians over ranks and repeats, side by side
        "step_s_per_repeat_1b": {m: med[m]["step_s_per_repeat"] for m in med},
        "modes_1b": med,
        "setup_1b": "random Llama 1b shape (benchmarks/scale_models.py), fp32 safetensors on disk; "
        f"lorachain train(): 2-link chain, LoRA r=8 on q/v, global batch 2 x 32 tokens, {steps} steps, "
        f"load included; max over ranks of medians over {repeats} repeat(s); 1 thread per rank, gloo",
    }
    for mode, how in {"fsdp": "map", **LOADS}.items():  # the three ways of loading, side by side
        if mode in med:
            out[f"fsdp_{how}_rank_anon_rss_gib_world2_1b"] = med[mode]["max_rank_anon_rss_gib"]
            out[f"fsdp_{how}_rank_total_rss_gib_world2_1b"] = med[mode]["max_rank_total_rss_gib"]
            out[f"fsdp_{how}_setup_s_1b"] = med[mode]["setup_s"]
    for mode in GATHERS:  # the other ways of gathering: time, and what the faster one holds
        if mode in med:
            out[f"{mode}_step_time_ratio_vs_ddp_1b"] = med[mode]["step_s"] / ddp["step_s"]
            out[f"{mode}_rank_anon_rss_gib_world2_1b"] = med[mode]["max_rank_anon_rss_gib"]
            out[f"{mode}_rank_total_rss_gib_world2_1b"] = med[mode]["max_rank_total_rss_gib"]
    return out
