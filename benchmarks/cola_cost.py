"""COLA costs what LoRA costs: plain PEFT LoRA r=8 vs COLA (3 links, r=8) vs COLA (r 8 -> 4).

One command: `python benchmarks/cola_cost.py [--steps 30 --repeats 3]`. Same model (SmolLM2-135M),
data, steps and batch for every configuration; each run in a fresh process (clean peak memory),
configurations interleaved, medians over repeats. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "peft-lora r8": None,  # plain PEFT LoRA trained by the same step loop, no chain machinery
    "cola 3x r8": [{"rank": 8, "alpha": 16}] * 3,
    "cola r8->4": [{"rank": 8, "alpha": 16, "fraction": 0.5}, {"rank": 4, "alpha": 8, "fraction": 0.5}],
}


def run_one(name: str, steps: int, out: str) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import resource

    import torch
    from peft import LoraConfig, get_peft_model

    from lorachain.config import RunConfig, from_dict
    from lorachain.data import load_examples
    from lorachain.demo import demo_config
    from lorachain.models import load_model, load_tokenizer, resolve_path
    from lorachain.training.loop import lr_factor, make_optimizer, run_steps, train, trainable

    links = CONFIGS[name] or [{"rank": 8, "alpha": 16}]
    raw = demo_config(Path(out), links, steps)
    raw["data"]["eval"] = None
    raw["train"]["save_every"] = 10_000
    cfg = from_dict(RunConfig, raw)
    tok = load_tokenizer(resolve_path(cfg.model))
    model = load_model(cfg.model)
    n_params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    if CONFIGS[name] is None:
        torch.manual_seed(cfg.train.seed)
        examples = load_examples(cfg.data.train, cfg.data, tok, classifier=False)
        peft = get_peft_model(
            model,
            LoraConfig(
                r=8,
                lora_alpha=16,
                target_modules=["q_proj", "v_proj"],
                lora_dropout=0.05,
                init_lora_weights="gaussian",
            ),
        )
        opt = make_optimizer(trainable(peft), cfg.optim)
        n_train = sum(p.numel() for p in trainable(peft))
        tokens = 0

        def count(step, loss, toks):
            nonlocal tokens
            tokens += toks
            return False

        t1 = time.perf_counter()
        run_steps(
            peft,
            opt,
            examples,
            cfg,
            0,
            steps,
            lambda s: cfg.optim.lr * lr_factor(s, steps, 0, "linear"),
            tok.pad_token_id,
            False,
            count,
        )
        step_s = (time.perf_counter() - t1) / steps
        peft.save_pretrained(str(Path(out) / "adapter"))
        flops = tokens * (4 * n_params + 6 * n_train)
        knots, trainables = [], [n_train]
    else:
        s = train(cfg, model, tok, progress=False).summary
        step_s = s["wall_seconds"] / steps
        knots = [link["knot_seconds"] for link in s["links"]]
        trainables = [link["trainable_params"] for link in s["links"]]
        flops = s["est_train_flops"]
    total = time.perf_counter() - t0
    return {
        "total_s": total,
        "step_s": step_s,
        "knot_s": knots,
        "trainable_params": trainables,
        "est_train_flops": flops,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def interleaved(run_one, names: list[str], steps: int, repeats: int) -> dict[str, list[dict]]:
    """`run_one(name, steps, tmp_dir)` for every name, each in a fresh spawned process (a clean peak
    RSS), the names interleaved within each repeat so drift hits them alike."""
    ctx = mp.get_context("spawn")
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(repeats):
        for name in names:
            with tempfile.TemporaryDirectory() as tmp, ctx.Pool(1) as pool:
                runs[name].append(pool.apply(run_one, (name, steps, tmp)))
            print(f"repeat {rep + 1}/{repeats} {name}: {runs[name][-1]['total_s']:.1f}s", flush=True)
    return runs


def print_table(rows: list[dict], cols: list[str], digits: int = 4) -> None:
    fmt = lambda v: f"{v:.{digits}f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [cols] + [[fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(cols))]
    print("\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/cola_cost.json")
    args = ap.parse_args()
    runs = interleaved(run_one, list(CONFIGS), args.steps, args.repeats)
    base = runs["peft-lora r8"]
    med = {
        n: {
            k: statistics.median(r[k] for r in rs)
            for k in ("total_s", "step_s", "peak_rss_mb", "est_train_flops")
        }
        for n, rs in runs.items()
    }
    rows = []
    for name, m in med.items():
        knot_s = [k for r in runs[name] for k in r["knot_s"][:-1]]  # knots inside the budget
        rows.append(
            {
                "config": name,
                "time_ratio": m["total_s"] / med["peft-lora r8"]["total_s"],
                "mem_ratio": m["peak_rss_mb"] / med["peft-lora r8"]["peak_rss_mb"],
                "median_total_s": m["total_s"],
                "median_step_s": m["step_s"],
                "median_knot_s": statistics.median(knot_s) if knot_s else None,
                "knot_over_step": statistics.median(knot_s) / m["step_s"] if knot_s else None,
                "trainable_params": runs[name][0]["trainable_params"],
                "flops_saved_vs_lora": 1 - m["est_train_flops"] / med["peft-lora r8"]["est_train_flops"],
                "peak_rss_mb": m["peak_rss_mb"],
            }
        )
    cols = [
        "config",
        "time_ratio",
        "mem_ratio",
        "median_step_s",
        "median_knot_s",
        "knot_over_step",
        "flops_saved_vs_lora",
        "trainable_params",
    ]
    print_table(rows, cols)
    import torch

    result = {
        "steps": args.steps,
        "repeats": args.repeats,
        "batch_size": 8,
        "model": "SmolLM2-135M-Instruct",
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
        "runs": runs,
        "baseline_runs": len(base),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
