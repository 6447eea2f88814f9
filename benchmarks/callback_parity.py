"""ChainCallback inside transformers.Trainer (or trl.SFTTrainer) against `lorachain train`.

    python benchmarks/callback_parity.py [--steps 12] [--trainer trainer|sft]

Runs one RunConfig twice on SmolLM2-135M-Instruct and the embedded GSM8K chat set: once with
`lorachain train`, once with a Hugging Face trainer and `ChainCallback`, and compares the knots (steps,
ranks) and every merged factor and the final weights. Writes benchmarks/results/callback_parity.json.

What has to be aligned, and how (each is a setting, not a code change):
- data order: the Trainer reads the examples in lorachain's order (`batch_order` per epoch, laid
  end to end) with `train_sampling_strategy="sequential"`, and the same padded batches
  (lorachain's `collate`; TRL's collator pads the same way); epochs must divide into whole steps;
- loss normalisation: both divide the summed token loss of an optimizer step by its number of
  target tokens (transformers' `num_items_in_batch`), so gradient accumulation matches;
- link 0: the PEFT model is built as `lorachain train` builds it (seed, then `chain.knot.extend`);
- later links: lorachain draws them from the global RNG inside its loop, the callback from its own
  generator; for an exact comparison the callback's `link_init` copies lorachain's draw (read from
  the checkpoint `lorachain train` writes at each knot);
- optimizer and schedule: `optim="adamw_torch"` (not the fused default), the same lr, schedule,
  warmup, weight decay and grad-norm clip; fp32 on both sides.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from lorachain.chain.export import load_chain
from lorachain.chain.knot import extend, lora_config
from lorachain.chain.policy import link_steps
from lorachain.config import RunConfig, load_config
from lorachain.data import batch_order, collate, load_examples, steps_per_epoch
from lorachain.integrations import ChainCallback
from lorachain.models import resolve_target_modules, uses_conv1d
from lorachain.training.loop import train


def knot_steps(cfg: RunConfig, n_examples: int) -> list[int]:
    """Steps of the knots before the end, from a full run (auto) or the links' shares (fixed)."""
    t = cfg.train
    spe = steps_per_epoch(n_examples, t.batch_size, t.grad_accum)
    total = t.max_steps or round((t.epochs or 1) * spe)
    sizes = link_steps(cfg.chain.links, total, spe)
    return [sum(sizes[: i + 1]) for i in range(len(sizes) - 1)]


def lorachain_run(cfg: RunConfig, make_model, tok, knots_at: list[int]) -> dict[int, dict]:
    """`lorachain train`, stopped at each knot to read the new link's first weights, then resumed
    (resume is exact). Returns link -> initial trainable state."""
    inits = {}
    for link, step in enumerate(knots_at, 1):
        train(cfg, make_model(), tok, stop_after=step, progress=False)
        ck = torch.load(Path(cfg.output_dir) / "checkpoint.pt", weights_only=True)
        assert ck["step"] == step and ck["link"] == link, (ck["step"], ck["link"])
        inits[link] = ck["trainable"]
    result = train(cfg, make_model(), tok, progress=False)
    assert result.summary["status"] == "finished"
    return inits


def trainer_run(cfg: RunConfig, make_model, tok, inits: dict[int, dict], out: Path, kind: str = "trainer"):
    """The same run through transformers.Trainer (or trl.SFTTrainer) with ChainCallback."""
    from transformers import Trainer, TrainingArguments

    t, o = cfg.train, cfg.optim
    examples = load_examples(cfg.data.train, cfg.data, tok, False, cfg.data.max_train_rows)
    spe = steps_per_epoch(len(examples), t.batch_size, t.grad_accum)
    total = t.max_steps or round((t.epochs or 1) * spe)
    if len(examples) % (t.batch_size * t.grad_accum):
        raise ValueError("parity needs whole steps per epoch (examples divisible by batch_size * grad_accum)")
    order = [i for epoch in range(-(-total // spe)) for i in batch_order(len(examples), t.seed, epoch)]
    model = make_model()
    torch.manual_seed(t.seed)  # link 0 exactly as lorachain's Trainer builds it
    targets = resolve_target_modules(model, cfg.chain.target_modules)
    peft = extend(
        model,
        lora_config(cfg.chain.links[0], cfg.chain, targets, uses_conv1d(model, targets), "causal_lm"),
        gaussian=cfg.chain.init == "gaussian",
    )
    callback = ChainCallback(
        cfg.chain,
        output_dir=str(out / "chain"),
        restart_schedule=o.restart_per_link,
        link_init=lambda link, m: m.load_state_dict(inits[link], strict=False),
    )
    common = dict(
        output_dir=str(out),
        max_steps=total,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=o.lr,
        lr_scheduler_type=o.schedule,
        warmup_steps=o.warmup_steps,
        weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm or 0.0,
        optim="adamw_torch",
        seed=t.seed,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        train_sampling_strategy="sequential",
        use_cpu=True,
        disable_tqdm=True,
    )
    if kind == "sft":
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        rows = [
            {
                "input_ids": examples[i].input_ids,
                "assistant_masks": [int(y != -100) for y in examples[i].labels],
            }
            for i in order
        ]
        # TRL masks the labels by the assistant_masks column; no bf16 autocast, no checkpointing
        args = SFTConfig(
            **common, max_length=None, bf16=False, gradient_checkpointing=False, dataset_num_proc=None
        )
        trainer = SFTTrainer(
            peft, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[callback]
        )
    else:
        args = TrainingArguments(**common, remove_unused_columns=False)
        trainer = Trainer(
            peft,
            args=args,
            train_dataset=[examples[i] for i in order],
            data_collator=lambda batch: collate(batch, tok.pad_token_id, False),
            callbacks=[callback],
        )
    t0 = time.perf_counter()
    trainer.train()
    return callback, time.perf_counter() - t0


def compare(run_dir: Path, chain_dir: Path) -> dict:
    """Knot steps and ranks of both chains and the largest differences of their factors."""
    a, _, _ = load_chain(run_dir / "chain.safetensors")
    b, _, _ = load_chain(chain_dir / "chain.safetensors")
    diff = {"A": 0.0, "B": 0.0, "delta_rel": 0.0}
    for ka, kb in zip(a, b, strict=True):
        for name, fa in ka.factors.items():
            fb = kb.factors[name]
            diff["A"] = max(diff["A"], float((fa.A - fb.A).abs().max()))
            diff["B"] = max(diff["B"], float((fa.B - fb.B).abs().max()))
            da, db = fa.scale * fa.B @ fa.A, fb.scale * fb.B @ fb.A
            diff["delta_rel"] = max(diff["delta_rel"], float((da - db).norm() / da.norm().clamp_min(1e-12)))
    return {
        "lorachain_knots": [(k.step, k.rank) for k in a],
        "callback_knots": [(k.step, k.rank) for k in b],
        "max_abs_diff": diff,
    }


def parity(cfg: RunConfig, make_model, tok, out: Path, kind: str = "trainer") -> dict:
    """Both runs of `cfg` in `out` and their comparison."""
    cfg = replace(cfg, output_dir=str(out / "lorachain"), train=replace(cfg.train, precision="fp32"))
    n = len(load_examples(cfg.data.train, cfg.data, tok, False, cfg.data.max_train_rows))
    if cfg.chain.knot.policy == "fixed":
        steps = knot_steps(cfg, n)
    else:  # a scratch run finds where the auto policy ties
        scratch = train(replace(cfg, output_dir=str(out / "scratch")), make_model(), tok, progress=False)
        steps = [link["end_step"] for link in scratch.summary["links"][:-1]]
    t0 = time.perf_counter()
    inits = lorachain_run(cfg, make_model, tok, steps)
    seconds = time.perf_counter() - t0
    _, hf_seconds = trainer_run(cfg, make_model, tok, inits, out / kind, kind)
    result = compare(Path(cfg.output_dir), out / kind / "chain")
    return result | {"trainer": kind, "lorachain_seconds": seconds, "trainer_seconds": hf_seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description="ChainCallback vs lorachain train on SmolLM2")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rows", type=int, default=48)
    ap.add_argument("--trainer", choices=["trainer", "sft"], default="trainer")
    ap.add_argument("--out", default="runs/callback_parity")
    ap.add_argument("--json", default="benchmarks/results/callback_parity.json")
    args = ap.parse_args()
    from lorachain.models import load_model, load_tokenizer, resolve_path

    cfg = load_config(
        "configs/chat_gsm8k_smollm2.yaml",
        [
            f"train.max_steps={args.steps}",
            "train.batch_size=4",
            "train.grad_accum=2",
            f"data.max_train_rows={args.rows}",
            "data.eval=null",
        ],
    )
    tok = load_tokenizer(resolve_path(cfg.model))
    result = parity(cfg, lambda: load_model(cfg.model), tok, Path(args.out) / args.trainer, args.trainer)
    result["command"] = " ".join(["python", *sys.argv])
    result["config"] = {
        "model": cfg.model.name_or_path,
        "links": [(x.rank, x.alpha) for x in cfg.chain.links],
    }
    print(json.dumps(result, indent=2))
    path = Path(args.json)
    old = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps(old | {args.trainer: result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
