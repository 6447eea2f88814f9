"""DPO on the GSM8K preference pairs: a 3-link chain against one LoRA of the same rank and budget.

    OMP_NUM_THREADS=1 python benchmarks/dpo_gsm8k.py            # both runs, one after the other
    OMP_NUM_THREADS=1 python benchmarks/dpo_gsm8k.py --plot-only # the PNG from the committed JSON

Each run is `lorachain train <config>` in its own process. From each run folder it collects the
held-out evaluations (`metrics.jsonl` rows with `eval`, at `train.eval_every`, the knots and the end):
preference accuracy, mean margin, DPO loss and the mean per-token log-ratio to the reference on the
chosen responses (the KL proxy). It writes them, the commands, settings and wall times to
benchmarks/results/dpo_gsm8k_smollm2.json and plots them to dpo_gsm8k_smollm2.png beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "dpo_gsm8k_smollm2.json"
RUNS = {
    "chain": "configs/dpo_gsm8k_smollm2_chain.yaml",
    "lora": "configs/dpo_gsm8k_smollm2_lora.yaml",
}
METRICS = ("pref_accuracy", "margin", "chosen_logratio", "dpo_loss")


def run(name: str, config: str, out_dir: Path) -> dict:
    """`lorachain train` of one config into a fresh folder (an older one is deleted); its
    evaluations and train-side rewards."""
    cmd = ["lorachain", "train", config, f"output_dir={out_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    shutil.rmtree(out_dir, ignore_errors=True)  # a fresh run, never a resume of an older one
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out_dir / "summary.json").read_text())
    evals, seen = [], set()
    for r in rows:
        if "eval" in r and r["step"] not in seen:  # (a knot's evaluation repeats the step's own)
            seen.add(r["step"])
            evals.append({"step": r["step"], "link": r["link"], **{k: r["eval"][k] for k in METRICS}})
    for link in summary["links"]:  # knots and the end evaluate in the knot (summary.json)
        step = link["end_step"]
        if "eval" in link and step not in seen:
            seen.add(step)
            evals.append({"step": step, "link": link["link"]})
            evals[-1].update({k: link["eval"][k] for k in METRICS})
    evals.sort(key=lambda e: e["step"])
    train = [r for r in rows if "loss" in r]
    last = train[-12:]
    return {
        "config": config,
        "command": "OMP_NUM_THREADS=1 " + " ".join(cmd),
        "wall_seconds": round(wall, 1),
        "train_seconds": round(summary["wall_seconds"], 1),
        "links": [{"rank": k["rank"], "steps": k["steps"]} for k in summary["links"]],
        "trainable_params": summary["links"][0]["trainable_params"],
        "peak_memory_mb": summary["peak_memory_mb"],
        "evals": evals,
        "final": evals[-1],
        "train_last12": {
            key: sum(r[key] for r in last) / len(last)
            for key in ("loss", "rewards/accuracies", "rewards/margins")
            if all(key in r for r in last)
        },
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    panels = (
        ("pref_accuracy", "held-out preference accuracy"),
        ("margin", "held-out reward margin"),
        ("chosen_logratio", "log-ratio to reference / token (chosen)"),
    )
    for ax, (key, title) in zip(axes, panels):
        for name, r in result["runs"].items():
            steps = [0] + [e["step"] for e in r["evals"]]
            values = [0.0] + [e[key] for e in r["evals"]]  # step 0: the policy is the reference
            ranks = " + ".join(f"r{k['rank']}" for k in r["links"])
            label = f"{name} ({ranks})"
            ax.plot(steps, values, marker="o", label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(result["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def environment() -> dict:
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": 1,
        "machine": f"{os.cpu_count()} CPU cores, shared with one other CPU-bound job",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dir", default="runs/dpo_gsm8k")
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    if not args.plot_only:
        pairs = {s: ROOT / f"lorachain/demo_data/gsm8k_pairs_{s}.jsonl" for s in ("train", "eval")}
        result = {
            "title": "DPO on GSM8K pairs, SmolLM2-135M-Instruct: 3-link chain vs one LoRA (same budget)",
            "command": "OMP_NUM_THREADS=1 python benchmarks/dpo_gsm8k.py",
            "data": {
                s: {"file": str(p.relative_to(ROOT)), "pairs": len(p.read_text().splitlines())}
                for s, p in pairs.items()
            },
            "pairs_build": json.loads((ROOT / "benchmarks/results/gsm8k_pairs_build.json").read_text()),
            "environment": environment(),
            "runs": {},
        }
        for name, config in RUNS.items():
            print(f"[dpo_gsm8k] {name}: {config}", file=sys.stderr, flush=True)
            result["runs"][name] = run(name, config, ROOT / args.runs_dir / name)
            OUT.write_text(json.dumps(result, indent=2) + "\n")
    result = json.loads(OUT.read_text())
    plot(result, OUT.with_suffix(".png"))
    print(json.dumps({n: r["final"] for n, r in result["runs"].items()}, indent=2))


if __name__ == "__main__":
    main()
