"""A quantized frozen base (QLoRA): bitsandbytes NF4 / FP4 4-bit or LLM.int8() 8-bit Linears.

Two ways in, one result: `load_kwargs` makes `from_pretrained` quantize each Linear as it loads
(a checkpoint never sits in memory in full precision), and `quantize_model` quantizes a model given
in memory (tests, notebooks, models built on the meta device), one layer at a time. Both quantize
every Linear except the output head, as transformers does. `prepare` does what PEFT's
`prepare_model_for_kbit_training` does (the known-good QLoRA path; its checkpointing aside, which
`training.checkpointing` does non-reentrant): freeze the base and hold the parameters it did not
quantize in fp32, except a 4-bit base's input embeddings and (under autocast to the same dtype) its
output head, which stay in the compute dtype (PEFT upcasts them: at the ~1B Llama shape they are
131M parameters, 0.49 GiB in fp32 beside 0.5 GiB of NF4 Linears). Knots on such a base are `chain.sidepath`'s.
`model.quant_backend: torchao` holds the same Linears as torchao NF4Tensors instead (`nf4_torchao`).
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch
from torch import nn

from lorachain.chain.sidepath import is_nf4
from lorachain.config import ConfigError, ModelConfig
from lorachain.training.heap import trim_heap
from lorachain.training.nf4_torchao import quantize_linears

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
KEEP = ("lm_head", "classifier", "score")  # output heads stay in full precision


def require_bnb():
    """The bitsandbytes module, or one ConfigError line saying how to install it."""
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError(
            "model.quantization: needs bitsandbytes, which is not installed; pip install bitsandbytes"
        ) from None
    return bitsandbytes


def load_kwargs(cfg: ModelConfig) -> dict:
    """Extra `from_pretrained` arguments for `cfg.quantization` (none: no arguments; torchao: none
    either, its NF4 is made in memory after the load, one Linear at a time)."""
    if cfg.quantization == "none" or cfg.quant_backend == "torchao":
        return {}
    require_bnb()
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "int8":
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quantization,
        bnb_4bit_compute_dtype=DTYPES[cfg.compute_dtype],
        bnb_4bit_use_double_quant=cfg.double_quant,
    )
    return {"quantization_config": bnb_config}


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of `model` holds quantized weights (bitsandbytes layers, torchao NF4)."""
    if any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in model.modules()):
        return True
    return any(is_nf4(p) for p in model.parameters())


def linear_names(model: nn.Module) -> list[str]:
    """The Linears a quantized base holds quantized: every one but the output heads."""
    return [
        n
        for n, m in model.named_modules()
        if type(m) is nn.Linear and n.split(".")[-1] not in KEEP and n not in KEEP
    ]


def quantized_layer(linear: nn.Linear, cfg: ModelConfig, weight: torch.Tensor | None = None) -> nn.Module:
    """A bitsandbytes layer holding `weight` (default: the Linear's own) quantized per `cfg`."""
    bnb = require_bnb()
    w = (linear.weight if weight is None else weight).detach()
    bias = linear.bias is not None
    with torch.device("meta"):  # the layer's own initial weight would be a full-precision copy
        if cfg.quantization == "int8":
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(
                linear.in_features,
                linear.out_features,
                bias,
                compute_dtype=DTYPES[cfg.compute_dtype],
                compress_statistics=cfg.double_quant,
                quant_type=cfg.quantization,
            )
    if cfg.quantization == "int8":
        layer.weight = bnb.nn.Int8Params(w.float(), requires_grad=False, has_fp16_weights=False)
    else:
        layer.weight = bnb.nn.Params4bit(
            w.float(), requires_grad=False, compress_statistics=cfg.double_quant, quant_type=cfg.quantization
        )
    if bias:
        layer.bias = nn.Parameter(linear.bias.detach().float(), requires_grad=False)
    return layer.to("cpu")  # .to quantizes


def release_memory() -> None:
    """Hand freed memory back to the OS. glibc keeps freed blocks in its heap once it has raised its
    mmap threshold, so quantizing layer after layer would otherwise leave the RSS of many fp32
    weights behind (measured: +0.46 GiB over the 135M shape's 106M quantized weights)."""
    gc.collect()
    trim_heap()


def quantize_model(
    model: nn.Module, cfg: ModelConfig, init: Callable[[nn.Linear], torch.Tensor] | None = None
) -> nn.Module:
    """Replace every Linear of `model` but the heads by its quantized layer, one at a time, so
    that at most one layer is ever held in full precision. `init(linear)` gives the weight of a
    layer built on the meta device (random shapes for benchmarks)."""
    for name in linear_names(model):
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        linear = getattr(owner, leaf)
        weight = init(linear) if init is not None else None
        setattr(owner, leaf, quantized_layer(linear, cfg, weight))
        del linear, weight
        release_memory()
    model.is_loaded_in_4bit = cfg.quantization in ("nf4", "fp4")
    model.is_loaded_in_8bit = cfg.quantization == "int8"
    return model


def compute_dtype_modules(
    model: nn.Module, cfg: ModelConfig, targets=(), autocast: torch.dtype | None = None
) -> list[nn.Module]:
    """The modules a 4-bit base holds in `cfg.compute_dtype`: its input embeddings, and its output
    head when the run autocasts to that dtype (`autocast`; without autocast a head's matmul needs
    its input's dtype, fp32), but not one a LoRA of `targets` (module names) adapts: its knots add
    into it, exact in fp32 only. None for int8 and an fp32 compute dtype."""
    if cfg.quantization not in ("nf4", "fp4") or cfg.compute_dtype == "float32":
        return []
    mods = [model.get_input_embeddings()]
    if autocast == DTYPES[cfg.compute_dtype]:
        mods.append(model.get_output_embeddings())
    adapted = {id(m) for n, m in model.named_modules() if n in targets or n.split(".")[-1] in targets}
    return [m for m in mods if m is not None and id(m) not in adapted]


def dequantize_in_compute_dtype(module: nn.Module) -> None:
    """Make a 4-bit layer's backward dequantize its weight straight to the compute dtype. bitsandbytes
    dequantizes to the dtype the weight was quantized from (fp32 from `quantize_model`) and then casts
    to the gradient's dtype, which is the compute dtype: the same numbers, but a transient fp32 copy
    of every weight at every backward (46 MB for a 5632x2048 one) and ~15% of the step time at the
    ~1B Llama shape on CPU. The exact fp32 weight stays `chain.sidepath.dequantized`'s."""
    qs = getattr(getattr(module, "weight", None), "quant_state", None)
    if type(module).__name__ == "Linear4bit" and qs is not None and module.compute_dtype is not None:
        qs.dtype = module.compute_dtype


def prepare(
    model: nn.Module, cfg: ModelConfig | None = None, targets=(), autocast: torch.dtype | None = None
) -> nn.Module:
    """Freeze the base; hold every parameter it did not quantize in fp32 (as PEFT's
    `prepare_model_for_kbit_training` does), but the `compute_dtype_modules` in the compute dtype;
    turn off bitsandbytes' CPU inference repacking, which rewrites a 4-bit weight in place the first
    time it runs under no_grad, so that evaluation sees the weights training sees; dequantize 4-bit
    weights in the compute dtype (`dequantize_in_compute_dtype`)."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
        dequantize_in_compute_dtype(m)
    mods = compute_dtype_modules(model, cfg, targets, autocast) if cfg is not None else []
    kept = {id(p) for m in mods for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad = False
        if type(p).__name__ == "Params4bit" or not p.is_floating_point() or is_nf4(p):
            continue  # (quantized storage)
        if hasattr(p, "device_mesh"):
            continue  # an fsdp shard (DTensor) stays in model.dtype: FSDP2 owns its storage
        if id(p) in kept:
            want = DTYPES[cfg.compute_dtype]
        elif p.dtype in (torch.float16, torch.bfloat16):
            want = torch.float32
        else:
            continue
        if p.dtype != want:
            p.data = p.data.to(want)  # one parameter at a time
    return model


def quantized_base(
    model: nn.Module, cfg: ModelConfig, targets=(), autocast: torch.dtype | None = None
) -> nn.Module:
    """`model` with its Linears quantized per `cfg` (unless `from_pretrained` or the sharded load
    already did), prepared for LoRA training on `targets` (module names) under `autocast` (the
    mixed-precision dtype). `model.quant_backend: torchao` holds them as torchao NF4Tensors."""
    if not is_quantized(model):
        if cfg.quant_backend == "torchao":
            quantize_linears(model, linear_names(model), DTYPES[cfg.compute_dtype])
        else:
            quantize_model(model, cfg)
    return prepare(model, cfg, targets, autocast)
