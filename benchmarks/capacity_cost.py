"""What a chain costs against LoRA at its rank, on the capacity task (issue 42's memory and time targets).

One command: `python benchmarks/capacity_cost.py [--steps 40 --repeats 3 --only NAMES]`: LoRA at r and
4r, the chain r x 4 plain and with `gradient` links, the peers at rank r (PiSSA, DoRA, LoRA-GA,
LoRA+) and full fine-tuning against LoRA r. SmolLM2-135M-Instruct,
the capacity task's pairs (`k:XXXX=` -> 8 hex digits), batch 16, q_proj/v_proj, bf16 where this CPU
has native bf16 matmuls, else fp32. Every configuration trains with lorachain's one loop for the
same steps in a fresh process (clean peak RSS), configurations interleaved, medians over repeats;
the chains tie their knots inside the measured steps (the gradient chain computes its gradient SVD
at each). Prints a table and writes `benchmarks/results/capacity_cost.json`. Run it on an otherwise
idle machine: the ratios are the figures the issue quotes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import lorachain  # noqa: F401  (first: its process defaults, huge pages, reach every spawned run)
from lorachain.io import atomic_write

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cola_cost import interleaved, print_table  # noqa: E402  the same fresh-process runner and table

R = 1  # the rank of LoRA and of every link
LINK = {"rank": R, "alpha": 2 * R}
CONFIGS = {  # name -> (chain section, optim section beyond the lr)
    "lora r1": ({"links": [LINK]}, {}),
    "lora r4": ({"links": [{"rank": 4 * R, "alpha": 8 * R}]}, {}),
    "chain r1x4": ({"links": [LINK] * 4}, {}),
    "chain r1x4 gradient": ({"links": [LINK] * 4, "init": "gradient"}, {}),
    # the peers at rank r the grid screens (issue 42)
    "pissa r1": ({"links": [LINK], "init": "pissa"}, {}),
    "dora r1": ({"links": [LINK], "use_dora": True}, {}),
    "lora-ga r1": ({"links": [LINK], "init": "gradient"}, {}),
    "lora+ r1": ({"links": [LINK]}, {"loraplus_lr_ratio": 16.0}),
    # what a user would use instead where no adapter memorises (the grid's lr)
    "full fine-tuning": ({"method": "full"}, {"lr": 2e-4}),
}
BASELINE = "lora r1"


def run_one(name: str, steps: int, out: str) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import resource

    from lorachain.config import RunConfig, from_dict
    from lorachain.models import best_device
    from lorachain.tasks.capacity import Spec, pairs
    from lorachain.training.loop import train
    from lorachain.training.precision import fast_bf16

    rows = [{"prompt": f"k:{k}=", "target": v} for k, v in pairs(Spec(n=1024, key_len=4, value_len=8))]
    path = Path(out) / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chain, optim = CONFIGS[name]
    chain = {**chain, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0}
    raw = {
        "model": {"name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "data": {"train": str(path), "prompt": "{prompt}", "target": "{target}", "label_field": None},
        "chain": chain,
        "optim": {"lr": 2e-3, **optim},
        "train": {
            "max_steps": steps,
            "batch_size": 16,
            "save_every": 10_000,
            "precision": "bf16" if fast_bf16(best_device()) else "fp32",
        },
        "output_dir": str(Path(out) / "run"),
    }
    t0 = time.perf_counter()
    s = train(from_dict(RunConfig, raw), progress=False).summary
    return {
        "total_s": time.perf_counter() - t0,
        "step_s": s["wall_seconds"] / steps,
        "knot_s": [link["knot_seconds"] for link in s["links"][:-1]],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "precision": s["precision"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/capacity_cost.json")
    ap.add_argument("--only", help=f"comma-separated configurations ({BASELINE!r} always runs)")
    args = ap.parse_args()
    names = list(CONFIGS)
    if args.only:
        wanted = {n.strip() for n in args.only.split(",")}
        if unknown := wanted - set(CONFIGS):
            raise SystemExit(f"--only: unknown configuration(s) {sorted(unknown)}; known: {names}")
        names = [n for n in names if n == BASELINE or n in wanted]
    runs = interleaved(run_one, names, args.steps, args.repeats)
    med = {
        n: {k: statistics.median(r[k] for r in rs) for k in ("total_s", "step_s", "peak_rss_mb")}
        for n, rs in runs.items()
    }
    base = med[BASELINE]
    rows = [
        {
            "config": name,
            "time_ratio": m["total_s"] / base["total_s"],
            "step_ratio": m["step_s"] / base["step_s"],
            "mem_ratio": m["peak_rss_mb"] / base["peak_rss_mb"],
            "median_total_s": m["total_s"],
            "median_step_s": m["step_s"],
            "median_knot_s": statistics.median(k for r in runs[name] for k in r["knot_s"])
            if runs[name][0]["knot_s"]
            else None,
            "peak_rss_mb": m["peak_rss_mb"],
        }
        for name, m in med.items()
    ]
    print_table(rows, list(rows[0]), digits=3)
    result = {
        "command": "python benchmarks/capacity_cost.py",
        "steps": args.steps,
        "repeats": args.repeats,
        "batch_size": 16,
        "model": "SmolLM2-135M-Instruct",
        "precision": runs[BASELINE][0]["precision"],
        "baseline": BASELINE,
        "rows": rows,
        "runs": runs,
    }
    atomic_write(args.out, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
