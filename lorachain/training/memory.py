"""Will it fit? Peak training memory estimated from the model's config, before anything loads.

The model is built on the meta device (no memory) to count its parameters exactly: the Linears a
quantized base stores in 4 or 8 bits, the rest (embeddings, norms, the head) in full precision.
Then: LoRA factors with their gradients and AdamW state (16 bytes a parameter), and the activations
a micro-batch keeps for the backward (every layer's, or with checkpointing only each layer's input
plus one layer's), and the logits. `check_memory` raises one ConfigError line with the estimate
and settings that would fit when it exceeds the memory available.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorachain.config import ConfigError, RunConfig
from lorachain.training.fsdp_gather import SLOTS
from lorachain.training.quantization import compute_dtype_modules

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RUNTIME = 0.6 * GIB  # torch, transformers and Python themselves (measured RSS after import: ~0.5 GiB)
KEEP = ("lm_head", "classifier", "score")


def weight_bytes_per_param(quantization: str, double_quant: bool, in_features: int) -> float:
    """Bytes a quantized Linear stores per weight, its quantization constants included."""
    if quantization == "int8":
        return 1.0 + 4.0 / in_features  # int8 codes and one fp32 absmax a row
    # 4-bit: half a byte, an absmax per 64 weights (fp32, or 8-bit plus fp32 per 256 blocks)
    return 0.5 + (1.0 / 64 + 4.0 / (64 * 256) if double_quant else 4.0 / 64)


@dataclass
class Estimate:
    """Peak memory parts, in bytes."""

    weights: float
    lora: float
    activations: float
    runtime: float = RUNTIME

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.activations + self.runtime

    def describe(self) -> str:
        parts = f"weights {self.weights / GIB:.1f}, LoRA+optimizer {self.lora / GIB:.2f}, "
        return f"{self.total / GIB:.1f} GiB ({parts}activations {self.activations / GIB:.1f})"


def meta_model(config) -> nn.Module:
    """The model of `config` on the meta device: shapes without memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def estimate(
    cfg: RunConfig, config, model: nn.Module | None = None, seq: int | None = None, world: int = 1
) -> Estimate:
    """Peak memory of training `cfg` on a model of transformers `config`, per process of `world`
    (each takes batch_size / world rows; under fsdp it holds 1/world of the weights and gathers
    two units, a layer and the next, at a time, or all of them with `fsdp_reshard_after_forward`
    false; on CPUs its share of the shared-memory all-gather arena), with micro-batches `seq` tokens
    wide (default `data.max_length`; the loop passes its longest row)."""
    model = model if model is not None else meta_model(config)
    m, t = cfg.model, cfg.train
    sharded = t.parallel == "fsdp" and world > 1
    weights = weight_bytes(model, cfg, copies=not sharded)
    if sharded:
        biggest = max(unit_bytes(model, DTYPE_BYTES[m.dtype]), default=0.0)
        gathered = weights if not t.fsdp_reshard_after_forward else 2 * biggest
        shm = t.fsdp_all_gather != "process_group" and not torch.cuda.is_available()
        arena = SLOTS * biggest / world if shm else 0.0  # one arena a host, shared by the ranks
        weights = weights / world + gathered + arena
    rank = max(link.rank for link in cfg.chain.links)
    targets = cfg.chain.target_modules or _default_targets(model)
    lora = sum(
        rank * (mod.in_features + mod.out_features)
        for name, mod in model.named_modules()
        if type(mod) is nn.Linear and name.split(".")[-1] in targets
    )
    return Estimate(weights, 16.0 * lora, activation_bytes(cfg, config, seq) / world)


def weight_bytes(model: nn.Module, cfg: RunConfig, copies: bool = True) -> float:
    """Bytes of the base's weights as the run holds them (4 or 8 bits a quantized Linear; `copies`:
    with the autocast-dtype copies beside fp32 masters)."""
    m, t = cfg.model, cfg.train
    q = m.quantization
    full = DTYPE_BYTES[m.dtype]
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)  # (auto: fp32, more)
    mods = compute_dtype_modules(model, m, cfg.chain.target_modules or (), autocast)
    low = {id(p) for mod in mods for p in mod.parameters()}
    weights, seen = 0.0, set()
    for name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:  # tied embeddings count once
                continue
            seen.add(id(p))
            linear = type(mod) is nn.Linear and pname == "weight" and name.split(".")[-1] not in KEEP
            if q != "none" and linear:
                weights += p.numel() * weight_bytes_per_param(q, m.double_quant, mod.in_features)
            elif id(p) in low:  # a 4-bit base's embeddings and head: the compute dtype
                weights += p.numel() * DTYPE_BYTES[m.compute_dtype]
            elif q != "none":
                weights += p.numel() * 4  # the rest in fp32, as prepare_model_for_kbit_training
            else:
                weights += p.numel() * full
                if copies and linear and t.precision in ("bf16", "fp16", "auto") and full == 4:
                    weights += p.numel() * 2  # the autocast-dtype copies beside the fp32 masters
    return weights


def unit_bytes(model: nn.Module, elem: int) -> list[float]:
    """Bytes of each unit fsdp gathers whole: every decoder layer, the embeddings, the head."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    units = [m for m in model.modules() if type(m).__name__ in names]
    units += [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    return [float(sum(p.numel() for p in u.parameters()) * elem) for u in units]


def _default_targets(model: nn.Module) -> list[str]:
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    return list(defaults.get(getattr(model.config, "model_type", ""), ["q_proj", "v_proj"]))


def activation_bytes(cfg: RunConfig, config, seq: int | None = None) -> float:
    """What one micro-batch keeps for the backward: per layer and token about 10 hidden-size and
    4 intermediate-size tensors (norms, q/k/v, attention output, MLP), attention scores
    (heads x length), and the logits of the target tokens (with their gradient)."""
    t, d = cfg.train, cfg.data
    b, s = t.batch_size, min(seq or d.max_length, d.max_length)
    h = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * h)
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    elem = 4 if t.precision == "fp32" else 2
    per_layer = b * s * (10 * h + 4 * inter) * elem + b * heads * s * s * elem
    kept = layers * b * s * h * elem + per_layer if t.gradient_checkpointing else layers * per_layer
    logits = 3 * b * s * config.vocab_size * 4
    return float(kept + logits)


def available_bytes() -> float:
    """Memory this process can still take: the GPU's free memory, else MemAvailable."""
    if torch.cuda.is_available():
        return float(torch.cuda.mem_get_info()[0])
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    return float("inf")


FIXES = (  # cumulative settings tried, in order, for the "would fit" advice
    ("train.gradient_checkpointing", "train", "gradient_checkpointing", True),
    ("model.quantization", "model", "quantization", "nf4"),
    ("train.batch_size", "train", "batch_size", 1),
)


def check_memory(
    cfg: RunConfig, config, available: float | None = None, seq: int | None = None, world: int = 1
) -> Estimate:
    """The estimate for `cfg` per process of `world`; one ConfigError line if it exceeds the
    `available` memory."""
    available = available_bytes() if available is None else available
    model = meta_model(config)
    est = estimate(cfg, config, model, seq, world)
    if est.total <= available:
        return est
    sharded = cfg.train.parallel == "fsdp" and world > 1
    tried, advice = cfg, "no setting tried fits (use a smaller model or a bigger machine)"
    changes = []
    for label, section, name, value in FIXES:
        if getattr(getattr(tried, section), name) == value or (sharded and name == "quantization"):
            continue  # (fsdp does not shard a quantized base)
        part = dataclasses.replace(getattr(tried, section), **{name: value})
        tried = dataclasses.replace(tried, **{section: part})
        changes.append(f"{label}={str(value).lower()}")
        fit = estimate(tried, config, model, seq, world)
        if fit.total <= available:
            advice = f"would fit with {' '.join(changes)} (about {fit.total / GIB:.1f} GiB)"
            break
    if sharded and advice.startswith("no setting"):
        sizes = (2 * world, 4 * world, 8 * world)
        more = next((w for w in sizes if estimate(tried, config, model, seq, w).total <= available), None)
        if more:
            advice = f"would fit on {more} processes with {' '.join(changes) or 'these settings'}"
    where = f" per process (fsdp: 1/{world} of the weights each)" if sharded else ""
    where = where or (" per process" if world > 1 else "")
    raise ConfigError(
        f"model.name_or_path: training {cfg.model.name_or_path} needs about {est.describe()}{where}, but "
        f"{available / GIB:.1f} GiB is available; {advice} (train.check_memory=false skips this check)"
    )


def check_before_load(cfg: RunConfig, seq: int | None = None, world: int = 1) -> Estimate | None:
    """`check_memory` for the model `cfg` names, from its config file alone, per process of `world`
    (None: no estimate for this architecture)."""
    from transformers import AutoConfig

    from lorachain.models import resolve_path

    try:
        config = AutoConfig.from_pretrained(resolve_path(cfg.model))
        meta_model(config)
    except (OSError, ValueError, KeyError, AttributeError):
        return None  # load_model reports an unloadable model itself
    return check_memory(cfg, config, seq=seq, world=world)
