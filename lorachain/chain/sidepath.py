"""Knots on a quantized base: the chain stays W₀ + Σ sᵢBᵢAᵢ with W₀ held in 4 or 8 bits.

A 4-bit weight cannot hold a short link's update (adding it and rounding again loses most of it),
so by default (`side`) a knot freezes the finished links of each quantized layer as a fixed
low-rank side path beside it: y = Q(W₀)x + B(Ax) with the links' factors stacked (A: (Σr, in),
B: (out, Σr), scales folded into B). The quantized weight is never written, so nothing is lost,
for two small matmuls per layer. `requantize` instead dequantizes, adds the update in fp32 and
quantizes again; it reports what that rounding lost of the update (`rel_fro`, as a bf16 base does).
Layers that are not quantized take the plain `apply_factors` merge.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorachain.chain.knot import Factors, KnotError, apply_factors

MODES = ("side", "requantize")
QUANTIZED = ("Linear4bit", "Linear8bitLt")


class SidePath(nn.Module):
    """The finished links of one layer as a fixed low-rank path: out += (x Aᵀ) Bᵀ (+ bias)."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.register_buffer("A", A, persistent=False)  # (R, in)
        self.register_buffer("B", B, persistent=False)  # (out, R)
        self.register_buffer("bias", bias, persistent=False)  # (out,) or None

    def add(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Stack one more link onto the path (rank grows by its r)."""
        self.A = torch.cat([self.A, A], dim=0)
        self.B = torch.cat([self.B, B], dim=1)
        if bias is not None:
            self.bias = bias if self.bias is None else self.bias + bias

    def hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]
        side = (x.to(self.A.dtype) @ self.A.T) @ self.B.T  # (..., in) -> (..., R) -> (..., out)
        if self.bias is not None:
            side = side + self.bias
        return output + side.to(output.dtype)


def is_nf4(t) -> bool:
    """Whether `t` (a weight, or an FSDP2 DTensor shard of one) is a torchao NF4Tensor."""
    return type(getattr(t, "_local_tensor", t)).__name__ == "NF4Tensor"


def is_quantized_layer(module: nn.Module) -> bool:
    """A bitsandbytes layer, or a Linear whose weight is a torchao NF4Tensor."""
    return type(module).__name__ in QUANTIZED or is_nf4(getattr(module, "weight", None))


def side_path(module: nn.Module) -> SidePath | None:
    return getattr(module, "chain_side", None)


def attach(module: nn.Module, f: Factors, name: str) -> None:
    """Add `f` to the side path of the quantized `module` (created, with its forward hook, at the
    first knot); the module's quantized weight stays as it is."""
    A = f.A.float().to(module.weight.device)  # (r, in)
    B = (f.scale * f.B.float()).to(module.weight.device)  # (out, r)
    bias = None if f.bias is None else (f.scale * f.bias.float()).to(module.weight.device)
    if side := side_path(module):
        side.add(A, B, bias)
    else:
        module.add_module("chain_side", SidePath(A, B, bias))
        module.register_forward_hook(module.chain_side.hook)


def dequantized(module: nn.Module) -> torch.Tensor:
    """The fp32 weight (out, in) a bitsandbytes layer, or a Linear on a torchao NF4Tensor, computes
    with."""
    w = module.weight
    if is_nf4(w):
        if hasattr(w, "device_mesh"):
            raise KnotError("dequantized: an NF4 weight sharded by fsdp is not whole here")
        return w.get_original_weight().float()
    import bitsandbytes.functional as bf

    if type(module).__name__ == "Linear8bitLt":
        scb = w.SCB if getattr(w, "SCB", None) is not None else module.state.SCB  # moved there by a forward
        return w.data.float() * (scb.float()[:, None] / 127.0)  # int8 rows times their absmax / 127
    qs = copy.copy(w.quant_state)  # in fp32 whatever dtype the layer's backward dequantizes to
    qs.dtype = torch.float32
    return bf.dequantize_4bit(w.data, qs)


def requantize(module: nn.Module, weight: torch.Tensor) -> None:
    """Quantize the fp32 `weight` into `module` with its own quantization settings."""
    w, device = module.weight, module.weight.device
    if is_nf4(w):  # torchao: its dtype and block sizes
        from torchao.quantization import to_nf4

        q = to_nf4(weight.to(device, w.dtype).contiguous(), w.block_size, w.scaler_block_size)
        module.weight = nn.Parameter(q, requires_grad=False)
        return
    import bitsandbytes as bnb

    if type(module).__name__ == "Linear8bitLt":
        module.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False).to(
            device
        )
        return
    qs = w.quant_state
    module.weight = bnb.nn.Params4bit(
        weight.cpu(),
        requires_grad=False,
        blocksize=qs.blocksize,
        compress_statistics=qs.nested,
        quant_type=qs.quant_type,
        quant_storage=w.data.dtype,
    ).to(device)
    module.weight.quant_state.dtype = qs.dtype  # (quantized from fp32: keep the layer's dequant dtype)
    module.quant_state = module.weight.quant_state


def _check_finite(factors: dict[str, Factors]) -> None:
    for name, f in factors.items():
        for t in (f.A, f.B, f.bias):
            if t is not None and not torch.isfinite(t).all():
                raise KnotError(f"tying a knot on {name} gives non-finite weights; nothing was merged")


def merge_quantized(
    base: nn.Module,
    factors: dict[str, Factors],
    masters: dict[str, torch.Tensor] | None = None,
    mode: str = "side",
) -> dict[str, float]:
    """`apply_factors` for a base whose target layers may be quantized; same return value (what
    storing the merge lost: `max_abs`, `rel_fro`), 0 for the side path."""
    layers = {n: base.get_submodule(n) for n in factors}
    layers = {n: getattr(m, "base_layer", m) for n, m in layers.items()}
    plain = {n: f for n, f in factors.items() if not is_quantized_layer(layers[n])}
    quant = {n: f for n, f in factors.items() if n not in plain}
    out = apply_factors(base, plain, masters) if plain else {"max_abs": 0.0, "rel_fro": 0.0}
    _check_finite(quant)
    if mode == "side":
        for name, f in quant.items():
            attach(layers[name], f, name)
        return out
    lost_sq, delta_sq, max_abs = 0.0, 0.0, out["max_abs"]
    with torch.no_grad():
        for name, f in quant.items():
            if f.fan_in_fan_out or f.bias is not None:
                raise KnotError(f"{name}: requantize takes plain Linear factors without a LoRA bias")
            module = layers[name]
            old = dequantized(module)
            delta = f.scale * (f.B.float() @ f.A.float()).to(old.device)  # (out, in)
            requantize(module, old + delta)
            lost = (old + delta) - dequantized(module)
            lost_sq += float(lost.double().square().sum())
            delta_sq += float(delta.double().square().sum())
            max_abs = max(max_abs, float(lost.abs().max()))
    rel = (lost_sq / delta_sq) ** 0.5 if delta_sq else 0.0
    return {"max_abs": max_abs, "rel_fro": max(out["rel_fro"], rel)}
