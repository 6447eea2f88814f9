"""What keeping DPO's reference across knots costs, inside TRL's DPOTrainer with PEFT and no ref_model.

    OMP_NUM_THREADS=1 python benchmarks/reference_cost.py [--steps 12] [--batch 4] [--rounds 8]

SmolLM2-135M-Instruct, LoRA r=8 on q/k/v/o, a chain of 3 links (knots after steps 2 and 4), the
same synthetic preference pairs. Each option runs in its own process (for its peak RSS):
- `trl`: TRL's DPOTrainer with one LoRA and no chain (the reference: adapters off = the start);
- `merge`: knots written into the weights (the measured bug: the reference moves at each knot);
- `path`: finished links kept as a path the adapter-off model skips (`lorachain.chain.reference`);
- `subtract`: knots in the weights, and Σ knots subtracted again while adapters are off;
- `precompute`: knots in the weights, TRL's `precompute_ref_log_probs=True` (one pass at the start);
- `lorachain`: lorachain's own loop, `train.objective: dpo`, the same chain, pairs and batch (its
  reference log-probs are computed once in the setup, before any knot; no per-step reference pass).
Step time is the median over the steps after the last knot (the longest path); the interleaved time
is one DPO forward/backward with the options taking turns on one model and batch (other load on
the machine falls on all alike; `merge` computes what `trl` does there); `ref error` is the
largest |Δ| of TRL's reference log-probs of one batch at the end against those at the start.
Writes benchmarks/results/reference_cost.json.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

OPTIONS = ("trl", "merge", "path", "subtract", "precompute")  # inside TRL's DPOTrainer
ALL = (*OPTIONS, "lorachain")
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
WORDS = "the a model answer question number two three four five add sum total each more than".split()


def pairs(n: int, words: int = 24) -> list[dict]:
    rng = random.Random(0)

    def text(k: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(k))

    return [
        {"prompt": text(words), "chosen": " " + text(words), "rejected": " " + text(words)} for _ in range(n)
    ]


def subtract_knots(chain):
    """`link_init` for ChainCallback: after each knot (written into the weights), a hook on each
    target layer subtracts that knot again while the layer's adapter is off."""
    from lorachain.chain.knot import lora_layers
    from lorachain.chain.reference import adapter_off
    from lorachain.chain.sidepath import SidePath

    def hook_for(path, owner):
        def hook(module, args, output):
            return path.hook(module, args, output) if adapter_off(owner) else output

        return hook

    def init(link: int, model) -> None:
        knot = chain.knots[-1]
        for name, owner in lora_layers(model).items():
            f, base = knot.factors[name], owner.get_base_layer()
            A, B = f.A.float(), -(f.scale * f.B.float())  # (r, in), (out, r): minus the knot
            if (path := getattr(base, "minus_knots", None)) is not None:
                path.add(A, B, None)
            else:
                base.add_module("minus_knots", SidePath(A, B, None))
                base.register_forward_hook(hook_for(base.minus_knots, owner))

    return init


def run_lorachain(steps: int, batch: int) -> dict:
    """lorachain's own DPO loop on the same model, chain, pairs and batch, in this process (fp32)."""
    import tempfile

    import torch

    from lorachain.config import RunConfig, from_dict
    from lorachain.training import train

    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="reference_cost_"))
    data = tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in pairs(steps * batch)))
    link = {"rank": 8, "alpha": 16}
    raw = {
        "model": {"name_or_path": MODEL},
        "data": {"train": str(data), "max_length": 128},
        "chain": {"links": [{**link, "steps": 2}, {**link, "steps": 2}, link], "target_modules": TARGETS},
        "optim": {"lr": 1e-3, "schedule": "linear", "weight_decay": 0.0},
        "train": {"objective": "dpo", "batch_size": batch, "max_steps": steps, "save_every": 10**6},
        "output_dir": str(tmp / "run"),
    }
    raw["chain"]["dropout"] = 0.0
    t0 = time.perf_counter()
    summary = train(from_dict(RunConfig, raw), progress=False).summary
    links = summary["links"]
    return {
        "option": "lorachain",
        "median_step_s": links[-1]["wall_seconds"] / links[-1]["steps"],  # after the second knot
        "min_step_s": links[-1]["wall_seconds"] / links[-1]["steps"],  # (a mean: per link only)
        "setup_s": time.perf_counter() - t0 - sum(r["wall_seconds"] for r in links),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "ref_error": 0.0,  # computed once before any knot: the start's, by construction (test_dpo)
        "knots": [r["end_step"] for r in links[:-1]],
        "steps_timed": links[-1]["steps"],
    }


def run_one(option: str, steps: int, batch: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from lorachain.config import ModelConfig
    from lorachain.integrations import ChainCallback
    from lorachain.models import load_model, load_tokenizer, resolve_path

    torch.set_num_threads(1)
    cfg = ModelConfig(name_or_path=MODEL)
    tok, model = load_tokenizer(resolve_path(cfg)), load_model(cfg)
    link = {"rank": 8, "alpha": 16}
    links = [link] if option == "trl" else [{**link, "steps": 2}, {**link, "steps": 2}, link]
    chain = ChainCallback(
        {"links": links, "target_modules": TARGETS, "dropout": 0.0}, keep_reference=option == "path"
    )
    if option == "subtract":
        chain.link_init = subtract_knots(chain)

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.times, self.start_ref, self.t0 = [], None, 0.0

        def on_train_begin(self, args, state, control, **kw):
            self.start_ref = reference()

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)  # (ChainCallback's knot comes after)

    clock = Clock()
    args = DPOConfig(
        output_dir=f"/tmp/reference_cost/{option}",
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        bf16=False,
        precompute_ref_log_probs=option == "precompute",
        seed=0,
    )
    t0 = time.perf_counter()
    trainer = DPOTrainer(
        model,
        args=args,
        train_dataset=Dataset.from_list(pairs(steps * batch)),
        processing_class=tok,
        peft_config=chain.lora_config(model),
        callbacks=[chain, clock],
    )
    init_s = time.perf_counter() - t0
    probe = trainer.data_collator([trainer.train_dataset[i] for i in range(batch)])

    def reference():
        if option == "precompute":  # what the loss reads: the column computed at the start
            rows = trainer.train_dataset[:batch]
            return torch.tensor(rows["ref_chosen_logps"] + rows["ref_rejected_logps"])
        return torch.cat(trainer.compute_ref_log_probs(trainer.model, probe))

    trainer.train()
    after = clock.times[4:]  # the steps after the second knot (steps 5..)
    return {
        "option": option,
        "median_step_s": statistics.median(after),
        "min_step_s": min(after),
        "setup_s": init_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "ref_error": float((reference() - clock.start_ref).abs().max()),
        "knots": [k.step for k in chain.knots[:-1]],
        "steps_timed": len(after),
    }


def interleaved(rounds: int, batch: int) -> dict[str, float]:
    """Median time of one DPO forward/backward (TRL's `training_step`) per option, the options taking
    turns on one model and one batch, so that other load on the machine falls on all of them alike.
    Two finished rank-8 links are on a path beside every target layer (random factors of the links'
    shapes); `mode` picks what the forward does with it."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from lorachain.chain.knot import lora_layers
    from lorachain.chain.reference import adapter_off
    from lorachain.chain.sidepath import SidePath
    from lorachain.config import ModelConfig
    from lorachain.integrations import ChainCallback
    from lorachain.models import load_model, load_tokenizer, resolve_path

    torch.set_num_threads(1)
    cfg = ModelConfig(name_or_path=MODEL)
    tok, model = load_tokenizer(resolve_path(cfg)), load_model(cfg)
    chain = ChainCallback({"links": [{"rank": 8, "alpha": 16}], "target_modules": TARGETS, "dropout": 0.0})
    args = DPOConfig(output_dir="/tmp/reference_cost/interleaved", report_to=[], use_cpu=True, bf16=False)
    pairs_ds = Dataset.from_list(pairs(batch))
    trainer = DPOTrainer(
        model, args=args, train_dataset=pairs_ds, processing_class=tok, peft_config=chain.lora_config(model)
    )
    model = trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # (set by train(); training_step reads it)
    mode = {"option": "trl"}

    def hook_for(path, owner):
        def hook(module, args, output):
            off, option = adapter_off(owner), mode["option"]
            if (option == "path" and not off) or (option == "subtract" and off):
                return path.hook(module, args, output)  # (subtract: the same path with B negated)
            return output

        return hook

    g = torch.Generator().manual_seed(0)
    for owner in lora_layers(model).values():
        base = owner.get_base_layer()
        A = torch.randn(16, base.in_features, generator=g) / 8  # (R, in)
        B = torch.randn(base.out_features, 16, generator=g) * 1e-3  # (out, R)
        base.add_module("bench_path", SidePath(A, B, None))
        base.register_forward_hook(hook_for(base.bench_path, owner))
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(batch)])
    chosen, rejected = trainer.compute_ref_log_probs(model, inputs)
    with_ref = {**inputs, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected}
    times: dict[str, list[float]] = {o: [] for o in OPTIONS}
    for r in range(rounds):
        for option in OPTIONS[r % len(OPTIONS) :] + OPTIONS[: r % len(OPTIONS)]:
            mode["option"] = option
            trainer.precompute_ref_logps = option == "precompute"
            t0 = time.perf_counter()
            trainer.training_step(model, with_ref if option == "precompute" else inputs)
            times[option].append(time.perf_counter() - t0)
            model.zero_grad(set_to_none=True)
    return {o: statistics.median(t) for o, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds")
    ap.add_argument("--one", choices=ALL, help="(internal) run one option in this process")
    ap.add_argument("--interleaved", action="store_true", help="(internal) the interleaved timing")
    ap.add_argument("--json", default="benchmarks/results/reference_cost.json")
    args = ap.parse_args()
    if args.one:
        run = run_lorachain if args.one == "lorachain" else partial(run_one, args.one)
        print(json.dumps(run(args.steps, args.batch)))
        return
    if args.interleaved:
        print(json.dumps(interleaved(args.rounds, args.batch)))
        return
    rows = []
    for option in ALL:
        cmd = [sys.executable, __file__, "--one", option, "--steps", str(args.steps)]
        cmd += ["--batch", str(args.batch)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr)
    cmd = [
        sys.executable,
        __file__,
        "--interleaved",
        "--rounds",
        str(args.rounds),
        "--batch",
        str(args.batch),
    ]
    turns = json.loads(
        subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]
    )
    base = rows[0]
    for row in rows:
        if row["option"] in turns:  # (lorachain's loop is not one of TRL's training_step modes)
            row["interleaved_step_s"] = turns[row["option"]]
            row["interleaved_ratio"] = turns[row["option"]] / turns["trl"]
        row["time_ratio"] = row["median_step_s"] / base["median_step_s"]
        row["min_time_ratio"] = row["min_step_s"] / base["min_step_s"]
        row["mem_ratio"] = row["peak_rss_mb"] / base["peak_rss_mb"]
    import torch
    import trl

    result = {
        "model": MODEL.split("/")[-1],
        "steps": args.steps,
        "batch_pairs": args.batch,
        "torch_threads": 1,
        "rounds": args.rounds,
        "trl": trl.__version__,
        "torch": torch.__version__,
        "rows": rows,
    }
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    for r in rows:
        print(
            f"{r['option']}: step {r['median_step_s']:.3f} s (min {r['min_step_s']:.3f}), "
            f"x{r['time_ratio']:.3f}; "
            f"RSS {r['peak_rss_mb']:.0f} MB x{r['mem_ratio']:.3f}; setup {r['setup_s']:.1f} s; "
            f"ref error {r['ref_error']:.2e}"
        )


if __name__ == "__main__":
    main()
