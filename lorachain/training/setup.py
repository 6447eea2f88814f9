"""A run's setup as one pipeline: `prepare(cfg)` turns a RunConfig into a ready model and data.

The order is written once, in `prepare`, and each step is a plain function of explicit inputs:
processes → tokenizer → data (bad rows fail before the slow part) → memory estimate → load →
precision → quantization as configured (a 4-bit base keeps its embeddings, and under autocast its
head, in the compute dtype) → checkpointing → placement → model checks (attention, packing,
targets, bias) → frozen compute copies → sharding and how its units gather → (DPO) the
reference's log-probs. A new
step (sharded loading, a reference model, a link initialisation) is a new function and one line in
`prepare`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn

from lorachain.chain.knot import apply_factors, check_lora_bias
from lorachain.chain.sidepath import merge_quantized
from lorachain.config import ConfigError, ModelConfig, RunConfig
from lorachain.data import candidate_ids, check_targets, load_examples, steps_per_epoch
from lorachain.data.preference import load_pairs
from lorachain.models import (
    best_device,
    check_packing,
    load_model,
    load_tokenizer,
    resolve_path,
    resolve_target_modules,
    uses_conv1d,
)
from lorachain.training.checkpointing import check_checkpointing
from lorachain.training.dpo import reference_logps
from lorachain.training.fsdp_gather import schedule
from lorachain.training.memory import check_before_load
from lorachain.training.nf4_torchao import require_torchao
from lorachain.training.parallel import Dist, check_parallel, init_dist, shard_base
from lorachain.training.precision import FP32, Precision, attention, compute_copies, resolve
from lorachain.training.quantization import is_quantized, load_kwargs, quantized_base
from lorachain.training.sharded import is_sharded, load_sharded
from lorachain.training.trackers import check_installed


@dataclass
class Data:
    """The run's examples and the step budget they give."""

    train: list
    eval: list
    cand_ids: list | None  # candidate label token ids (causal LM with label words), else None
    steps_per_epoch: int
    total: int  # optimizer steps in the whole budget


@dataclass
class Setup:
    """Everything the loop needs that `prepare` built, in the order it built it."""

    dist: Dist
    tokenizer: object
    data: Data
    model: nn.Module
    merge: Callable  # how a knot adds a link into the base (exact on a quantized one too)
    prec: Precision
    attn: str | None  # the attention implementation set on the model (None: the model's own)
    targets: list[str]  # LoRA target module names ([] for full fine-tuning)
    fan_in_fan_out: bool  # GPT-2 style Conv1D targets
    masters: dict[str, torch.Tensor]  # fp32 masters of frozen weights held in the autocast dtype
    n_params: int
    notes: list[str] = field(default_factory=list)  # lines for the run's log


def prepare(cfg: RunConfig, model: nn.Module | None = None, tokenizer=None) -> Setup:
    """Build the run `cfg` describes; `model`/`tokenizer` may be given (modified in place)."""
    check_installed(cfg.train.report_to)  # experiment trackers: refused before anything loads
    dist = init_dist(cfg.train.parallel)
    check_parallel(cfg, dist)
    if cfg.model.quant_backend == "torchao":
        require_torchao()  # one line before anything loads
    torch.manual_seed(cfg.train.seed)
    tokenizer = tokenizer or load_tokenizer(resolve_path(cfg.model))
    data = load_data(cfg, tokenizer)
    if model is None:
        if cfg.train.check_memory:
            check_before_load(cfg, max((len(e.input_ids) for e in data.train), default=None), dist.world)
        if dist.sharded:  # built on meta, sharded, each rank reads its own rows (training/sharded.py)
            model = sharded_base(cfg, dist)
        else:
            model = load_base(cfg.model, num_labels(cfg))
    model = merge_adapter(model, cfg.model)
    prec = resolve(cfg.train.precision, best_device())
    model, merge = quantize(model, cfg.model, cfg.chain.target_modules or (), prec)
    if cfg.train.gradient_checkpointing:
        check_checkpointing(model)
    place(model)
    attn = set_attention(model, cfg, prec)
    check_model(model, cfg, tokenizer)
    full = cfg.chain.method == "full"
    targets = [] if full else resolve_target_modules(model, cfg.chain.target_modules)
    fan = uses_conv1d(model, targets)
    if cfg.chain.bias == "lora_only":
        check_lora_bias(model, targets)
    # frozen weights held in the autocast dtype, their fp32 masters kept for knots and the end
    # (fsdp: the fp32 shards are the masters; autocast casts each matmul's copy)
    masters = {} if full or dist.sharded else compute_copies(model, prec)
    n_params = sum(p.numel() for p in model.parameters())
    gather = shard(model, cfg, dist)
    add_reference(cfg, model, data, prec, tokenizer.pad_token_id)
    return Setup(
        dist, tokenizer, data, model, merge, prec, attn, targets, fan, masters, n_params, notes(prec, gather)
    )


def sharded_base(cfg: RunConfig, dist: Dist) -> nn.Module:
    """fsdp: the base built on meta and sharded, each rank reading its own rows (training/sharded.py);
    an NF4 base's embeddings (and head) in the compute dtype, as `quantize` holds them on one process."""
    t, prec = cfg.train, resolve(cfg.train.precision, best_device())
    targets, autocast = cfg.chain.target_modules or (), prec.dtype if prec.mixed else None
    return load_sharded(cfg.model, dist, t.fsdp_offload, t.fsdp_load, targets, autocast)


def shard(model: nn.Module, cfg: RunConfig, dist: Dist) -> str:
    """fsdp: shard the base unless it loaded sharded, and set how its units gather
    (training/fsdp_gather.py); returns a line for the run's log."""
    if not dist.sharded:
        return ""
    t = cfg.train
    if not is_sharded(model):
        shard_base(model, t.fsdp_offload)
    return schedule(model, dist.world, t.fsdp_all_gather, t.fsdp_reshard_after_forward)


def num_labels(cfg: RunConfig) -> int | None:
    return len(cfg.data.label_words) if cfg.data.label_words else None


def load_data(cfg: RunConfig, tokenizer) -> Data:
    """The train and eval examples (one line naming the file and row for a bad one) and the budget."""
    d, t = cfg.data, cfg.train
    if t.objective == "dpo":
        return preference_data(cfg, tokenizer)
    classifier = cfg.model.task == "classification"
    train = load_examples(d.train, d, tokenizer, classifier, d.max_train_rows)
    evals = load_examples(d.eval, d, tokenizer, classifier, d.max_eval_rows) if d.eval else []
    check_targets(train, d, tokenizer, classifier, d.train)
    cand = None if classifier else candidate_ids(d, tokenizer)
    spe = steps_per_epoch(len(train), t.batch_size, t.grad_accum)
    total = t.max_steps or max(1, round((t.epochs or 1) * spe))
    return Data(train, evals, cand, spe, total)


def preference_data(cfg: RunConfig, tokenizer) -> Data:
    """`train.objective: dpo`: the train and eval preference pairs (`data/preference.py`)."""
    d, t = cfg.data, cfg.train
    train = load_pairs(d.train, d, tokenizer, d.max_train_rows)
    evals = load_pairs(d.eval, d, tokenizer, d.max_eval_rows) if d.eval else []
    spe = steps_per_epoch(len(train), t.batch_size, t.grad_accum)
    return Data(train, evals, None, spe, t.max_steps or max(1, round((t.epochs or 1) * spe)))


def merge_adapter(model: nn.Module, mcfg: ModelConfig) -> nn.Module:
    """`model.adapter`: a PEFT adapter folder (an SFT run's `adapter/`) merged into the base as
    it loads, so the run starts from (and DPO's reference is) base + adapter."""
    if not mcfg.adapter:
        return model
    from peft import PeftModel

    if is_sharded(model):
        raise ConfigError(
            "model.adapter: cannot be merged into a sharded base (fsdp); merge it first (export --merged)"
        )
    if not (Path(mcfg.adapter) / "adapter_config.json").is_file():
        raise ConfigError(
            f"model.adapter: {mcfg.adapter} holds no adapter_config.json (a PEFT adapter folder)"
        )
    return PeftModel.from_pretrained(model, mcfg.adapter).merge_and_unload()


def add_reference(cfg: RunConfig, model: nn.Module, data: Data, prec: Precision, pad_id: int) -> None:
    """DPO: every pair's log-probs under the starting model, before any knot (`training/dpo.py`)."""
    if cfg.train.objective == "dpo":
        for pairs in (data.train, data.eval):
            reference_logps(model, pairs, pad_id, cfg.train.eval_batch_size, prec.autocast)


def load_base(mcfg: ModelConfig, labels: int | None = None) -> nn.Module:
    """The base model, quantized layer by layer as it loads when `model.quantization` asks for it."""
    return load_model(mcfg, num_labels=labels, **load_kwargs(mcfg))


def quantize(
    model: nn.Module, mcfg: ModelConfig, targets=(), prec: Precision = FP32
) -> tuple[nn.Module, Callable]:
    """QLoRA: the base quantized and prepared for LoRA on `targets` under `prec`, with knots that
    keep the chain exact (`chain.sidepath`); otherwise the model as it is, with knots added into its
    weights."""
    if mcfg.quantization == "none":
        return model, apply_factors
    base = quantized_base(model, mcfg, targets, prec.dtype if prec.mixed else None)
    return base, partial(merge_quantized, mode=mcfg.quantized_knot)


def place(model: nn.Module) -> None:
    """Move the model to this process's device (bitsandbytes layers and fsdp shards are placed as
    they load)."""
    if not is_quantized(model) and not is_sharded(model):
        model.to(best_device())


def set_attention(model: nn.Module, cfg: RunConfig, prec: Precision) -> str | None:
    """Set the attention kernel the precision policy picks (or the config names) on the model."""
    attn = attention(cfg.model.attn_implementation, prec, cfg.data.max_length)
    if attn and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation(attn)
        except (ValueError, ImportError) as e:
            raise ConfigError(f"model.attn_implementation: {attn!r} cannot be used: {e}") from None
    return attn


def check_model(model: nn.Module, cfg: RunConfig, tokenizer) -> None:
    """Refuse packing where attention would mix packed rows; give a classifier its pad id."""
    if cfg.data.packing:
        check_packing(model)
    if cfg.model.task == "classification" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def notes(prec: Precision, gather: str = "") -> list[str]:
    lines = [gather] if gather else []
    if not prec.emulate:
        return lines
    return lines + [
        f"{prec.name} matmuls emulated in fp32 (same numbers): this CPU has no native {prec.name} matmul"
    ]
