"""Models that do not fit: fp32 / bf16 / NF4 bases, checkpointing, packing, up to the Llama-2-7B shape.

One command: `python benchmarks/scale.py [--quick] [--only 135m,1b,7b,packing,peer]`.
Llama-architecture models are built from config with random weights (shapes are what matter for
memory and time): the SmolLM2-135M shape, a ~1B shape (TinyLlama-1.1B) and the Llama-2-7B shape
(hidden 4096, 32 layers, vocab 32000). An NF4 base is built on the meta device and each Linear is
quantized as it is built, so no full-precision copy ever exists. Each configuration trains through
lorachain's one loop (`lorachain.training.train`: LoRA r=8 on q/v, or a 2-link COLA with a knot) in a
fresh subprocess, one at a time, on one thread; peak RSS is the child's `getrusage` maximum.
The peer, `transformers.Trainer` + PEFT (QLoRA via `prepare_model_for_kbit_training`), trains the
same model, rows and LoRA in its own subprocess. Packing: SmolLM2-135M-Instruct (real weights) on
the GSM8K chat set, packed vs padded. Step time is wall time per optimizer step (first step included
on both sides). Writes `benchmarks/results/scale.json` and prints a table. The models and rows are in
scale_models.py, the headline figures in scale_summary.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scale_models import GIB, SHAPES, build, llama_config, random_rows, word_tokenizer
from scale_summary import spec_of, summarise


class StepClock:
    """Wall and CPU seconds of each optimizer step, from the loop's own `on_step` callback (wrapped
    here, in the benchmark only): the time from the end of one step's bookkeeping to the next call."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def start(self) -> None:
        self.t = (time.perf_counter(), time.process_time())

    def wrap(self, on_step):
        def timed(*args):
            self.wall.append(time.perf_counter() - self.t[0])
            self.cpu.append(time.process_time() - self.t[1])
            stop = on_step(*args)
            self.start()
            return stop

        return timed

    def medians(self) -> dict:
        import statistics

        return {
            "seconds_per_step": statistics.median(self.wall),
            "cpu_seconds_per_step": statistics.median(self.cpu),
            "step_seconds": self.wall,
        }


def instrument() -> StepClock:
    """Time every step of the one loop: its `run_steps` gets a timed `on_step` (benchmark only)."""
    import inspect

    import lorachain.training.loop as loop

    clock, run_steps = StepClock(), loop.run_steps
    at = list(inspect.signature(run_steps).parameters).index("on_step")

    def timed_run_steps(*args, **kwargs):
        clock.start()
        return run_steps(*args[:at], clock.wrap(args[at]), *args[at + 1 :], **kwargs)

    loop.run_steps = timed_run_steps
    return clock


def peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def run_lorachain(spec: dict, tmp: Path) -> dict:
    import torch

    from lorachain.config import RunConfig, from_dict
    from lorachain.training import train
    from lorachain.training.memory import estimate

    clock = instrument()

    t0 = time.perf_counter()
    model = build(spec["size"], spec["base"])
    build_s = time.perf_counter() - t0
    vocab = SHAPES[spec["size"]][5]
    data = random_rows(tmp / "rows.jsonl", spec["batch"] * spec["steps"], spec["seq"], vocab)
    steps = spec["steps"]
    links = [{"rank": 8, "alpha": 16}]
    if spec["method"] == "cola":
        links = [{"rank": 8, "alpha": 16, "steps": max(1, steps - 1)}, {"rank": 8, "alpha": 16}]
    raw = {
        "model": {
            "name_or_path": f"random-llama-{spec['size']}",
            "dtype": "float32" if spec["base"] == "fp32" else "bfloat16",  # (nf4: the rest as loaded)
            "quantization": "nf4" if spec["base"] == "nf4" else "none",
            "compute_dtype": "bfloat16",
            "quantized_knot": spec.get("knot", "side"),
        },
        "data": {"train": str(data), "prompt": "{text}", "target": None, "label_field": None},
        "chain": {"links": links, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0},
        "optim": {"lr": 1e-4},
        "train": {
            "max_steps": steps,
            "batch_size": spec["batch"],
            "save_every": 10_000,
            "precision": "fp32" if spec["base"] == "fp32" else "bf16",
            "gradient_checkpointing": spec["ckpt"],
            "check_memory": False,
        },
        "output_dir": str(tmp / "run"),
    }
    raw["data"]["max_length"] = spec["seq"]
    cfg = from_dict(RunConfig, raw)
    done = train(cfg, model, word_tokenizer(vocab), progress=False)
    s, train_model = done.summary, done.model
    rows = s["links"]
    est = estimate(cfg, llama_config(spec["size"]))
    return {
        "peak_rss_gib": peak_rss_gib(),
        "estimate_gib": est.total / GIB,
        "build_seconds": build_s,
        **clock.medians(),
        "tokens_per_s": sum(r["tokens"] for r in rows) / sum(clock.cpu),  # per CPU second
        "knot_seconds": rows[0]["knot_seconds"] if spec["method"] == "cola" else None,
        "knot_rel_fro": s["knot_rounding"]["max_rel_fro"],
        "embeddings_dtype": str(train_model.get_input_embeddings().weight.dtype),
        "head_dtype": str(train_model.get_output_embeddings().weight.dtype),
        "final_loss": rows[-1]["final_loss"],
        "threads": torch.get_num_threads(),
    }


def run_trainer(spec: dict, tmp: Path) -> dict:
    """The peer: transformers.Trainer + PEFT on the same model, rows and LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = build(spec["size"], spec["base"])
    kwargs = {"use_reentrant": False}
    if spec["base"] == "nf4":
        for m in model.modules():  # as lorachain does: no in-place CPU repacking
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
        model = prepare_model_for_kbit_training(model, spec["ckpt"], gradient_checkpointing_kwargs=kwargs)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = get_peft_model(model, lora)
    vocab = SHAPES[spec["size"]][5]
    tok = word_tokenizer(vocab)  # the same job: the same rows, read and tokenized the same way
    path = random_rows(tmp / "rows.jsonl", spec["batch"] * spec["steps"], spec["seq"], vocab)
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    rows = [torch.tensor(tok(t)["input_ids"][: spec["seq"]]) for t in texts]
    ds = [{"input_ids": r, "labels": r, "attention_mask": torch.ones_like(r)} for r in rows]
    clock = StepClock()

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            clock.start()

        def on_step_end(self, *a, **k):
            clock.wrap(lambda: None)()

    args = TrainingArguments(
        output_dir=str(tmp / "hf"),
        per_device_train_batch_size=spec["batch"],
        max_steps=spec["steps"],
        learning_rate=1e-4,
        bf16=spec["base"] != "fp32",
        gradient_checkpointing=spec["ckpt"],
        gradient_checkpointing_kwargs=kwargs,
        logging_steps=10_000,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[Clock()]).train()
    return {"peak_rss_gib": peak_rss_gib(), **clock.medians()}


def run_packing(spec: dict, tmp: Path) -> dict:
    """SmolLM2-135M-Instruct on the GSM8K chat set (the shipped config: max_length 256, batch 8),
    packed or padded, bf16."""
    from lorachain.config import load_config
    from lorachain.training import train

    root = Path(__file__).resolve().parent.parent
    clock = instrument()
    over = [
        f"data.train={root / 'lorachain/demo_data/gsm8k_chat_train.jsonl'}",
        "data.eval=null",
        f"data.packing={str(spec['packing']).lower()}",
        "chain.links=[{rank: 8, alpha: 16}]",
        f"train.max_steps={spec['steps']}",
        "train.precision=bf16",
        "train.save_every=10000",
        f"output_dir={tmp / 'run'}",
    ]
    cfg = load_config(root / "configs/chat_gsm8k_smollm2.yaml", over)
    s = train(cfg, progress=False).summary
    row = s["links"][0]
    losses = [json.loads(x)["loss"] for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    return {
        "tokens_per_s": row["tokens"] / sum(clock.cpu),  # per CPU second of the steps
        "wall_tokens_per_s": row["tokens"] / sum(clock.wall),
        **clock.medians(),
        "first_loss": losses[0],
        "losses": losses,
        "peak_rss_gib": peak_rss_gib(),
    }


def run_accuracy(spec: dict, tmp: Path) -> dict:
    """The demo's SST-2 LoRA job on SmolLM2-135M-Instruct (real weights) with an fp32, bf16 or NF4 base."""
    from lorachain.config import load_config
    from lorachain.training import train

    root = Path(__file__).resolve().parent.parent
    base = {
        "fp32": ["train.precision=fp32"],
        "bf16": ["train.precision=bf16", "model.dtype=bfloat16"],
        "nf4": ["train.precision=bf16", "model.quantization=nf4", "model.compute_dtype=bfloat16"],
    }[spec["base"]]
    over = [*base, "train.save_every=10000", f"output_dir={tmp / 'run'}"]
    over += [f"data.train={root / 'lorachain/demo_data/sst2_train.jsonl'}"]
    over += [f"data.eval={root / 'lorachain/demo_data/sst2_eval.jsonl'}"]
    if spec.get("max_steps"):
        over.append(f"train.max_steps={spec['max_steps']}")
    s = train(load_config(root / "configs/lora_sst2_smollm2.yaml", over), progress=False).summary
    return {**s["final_eval"], "peak_rss_gib": peak_rss_gib(), "train_seconds": s["wall_seconds"]}


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        kinds = {
            "lorachain": run_lorachain,
            "trainer": run_trainer,
            "packing": run_packing,
            "accuracy": run_accuracy,
        }
        fn = kinds[spec["kind"]]
        return fn(spec, Path(tmp))


def measure(spec: dict) -> dict:
    """Run one configuration in a fresh process; its result dict (or the error)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    t0 = time.perf_counter()
    p = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        return {**spec, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return {**spec, **json.loads(lines[-1]), "process_seconds": time.perf_counter() - t0}


def cells(quick: bool, only: set[str]) -> list[dict]:
    steps = 2 if quick else 3
    lora = dict(kind="lorachain", method="lora", size="135m", seq=128, batch=4)
    big = dict(kind="lorachain", method="lora", ckpt=True, seq=128, batch=1, steps=3)
    out = []
    if "135m" in only:
        out += [{**lora, "base": b, "ckpt": c} for b in ("fp32", "bf16", "nf4") for c in (False, True)]
        out.append({**lora, "base": "nf4", "ckpt": True, "method": "cola"})
        # checkpointing at 1,024 tokens
        out += [{**lora, "base": "bf16", "ckpt": c, "seq": 1024, "batch": 1} for c in (False, True)]
    if "requant" in only:  # the other knot on a quantized base: dequantize, add, quantize again
        out.append({**lora, "base": "nf4", "ckpt": True, "method": "cola", "knot": "requantize"})
    if "peer" in only:
        for base, ckpt in (("bf16", False), ("nf4", True)):
            out += [{**lora, "kind": k, "base": base, "ckpt": ckpt} for k in ("lorachain", "trainer")]
    if "packing" in only:
        out += [dict(kind="packing", packing=p, steps=3 if quick else 8) for p in (False, True)]
    if "accuracy" in only:  # SST-2 on real weights: 40 steps (one epoch), 200 eval rows
        out += [
            dict(kind="accuracy", base=b, max_steps=10 if quick else None) for b in ("fp32", "bf16", "nf4")
        ]
    if "1b" in only and not quick:
        out += [{**big, "size": "1b", "base": b} for b in ("bf16", "nf4")]
        if "peer" in only:
            out.append({**big, "kind": "trainer", "size": "1b", "base": "nf4"})
    if "7b" in only and not quick:
        out.append({**big, "size": "7b", "base": "nf4", "method": "cola"})
    return [{"steps": steps, **c} for c in out]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="135M cells and packing only, 2-3 steps")
    ap.add_argument("--only", default="135m,requant,peer,packing,accuracy,1b,7b")
    ap.add_argument("--merge", action="store_true", help="keep the other cells of an existing --out file")
    ap.add_argument("--out", default="benchmarks/results/scale.json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    results, commands = [], []
    todo = cells(args.quick, set(args.only.split(",")))
    if args.merge and Path(args.out).is_file():  # keep the cells not measured again
        old = json.loads(Path(args.out).read_text())
        results = [c for c in old["cells"] if spec_of(c) not in [spec_of(t) for t in todo]]
        commands = old.get("commands", [])
    for spec in todo:
        r = measure(spec)
        results.append(r)
        keys = ("peak_rss_gib", "estimate_gib", "cpu_seconds_per_step", "seconds_per_step", "tokens_per_s")
        keys += ("knot_seconds", "knot_rel_fro", "accuracy")
        shown = {k: round(r[k], 3) for k in keys if isinstance(r.get(k), float)}
        label = {k: spec[k] for k in spec if k not in ("kind",)}
        print(f"{spec['kind']:9s} {json.dumps(label)}: {r.get('error') or json.dumps(shown)}", flush=True)
    result = {
        **summarise(results),
        "cells": results,
        "machine": "shared with 2 background lorachain experiments; 2 CPU cores, 24 GiB, no GPU",
        "threads": 1,
        "quick": args.quick,
        "python": platform.python_version(),
        "command": "python benchmarks/scale.py"
        + (" --quick" if args.quick else "")
        + (" --merge" if args.merge else "")
        + (f" --only {args.only}" if args.only != ap.get_default("only") else ""),
    }
    result["commands"] = [*commands, result["command"]]  # every run whose cells are in this file
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps({k: v for k, v in result.items() if k not in ("cells", "lorachain_vs_trainer")}, indent=2)
    )


if __name__ == "__main__":
    main()
