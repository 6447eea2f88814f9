"""Knots that keep the reference: finished links as a path the adapter-off model does not take.

Preference trainers (TRL's DPO, KTO, GRPO with β > 0) given a PEFT model and no `ref_model` compute
the reference as "the model with adapters off" (`model.disable_adapter()`). A knot written into the
base weights moves that reference to the previous link's policy. Here a knot instead stacks the
finished link onto a fixed low-rank path beside each target layer, y = W₀x + B(Ax) (+ bias), which
is taken only while the layer's `default` adapter is active. With adapters off (or another adapter
such as TRL's `ref` active), the layer computes W₀x: the model the run started from, bit for bit, in
any dtype, under autocast, on a quantized base. The chain's meaning is unchanged: W₀ + Σ sᵢBᵢAᵢ.

`fold(model)` merges the paths into the weights in fp32 (a plain chain again, as
`knot.apply_factors` leaves it), e.g. before PEFT's `merge_and_unload`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lorachain.chain.knot import ADAPTER, Factors, KnotError, lora_layers
from lorachain.chain.sidepath import SidePath, merge_quantized

PATH = "chain_links"  # the attribute of a target layer's base layer that holds its finished links


def adapter_off(owner: nn.Module) -> bool:
    """Whether the LoRA wrapper `owner` computes its base layer alone: PEFT's adapters are
    disabled (`disable_adapter()`) or its active adapters do not include `default`."""
    return bool(owner.disable_adapters) or ADAPTER not in owner.active_adapters


def _gated(path: SidePath, owner: nn.Module) -> Callable:
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output if adapter_off(owner) else path.hook(module, args, output)

    return hook


def links_path(module: nn.Module) -> SidePath | None:
    return getattr(module, PATH, None)


def attach_link(owner: nn.Module, f: Factors) -> None:
    """Stack `f` onto the path of the LoRA wrapper `owner`'s base layer (created at the first knot).
    The path computes what the link computed, so GPT-2's Conv1D layers take it as they are."""
    base = owner.get_base_layer()
    device = base.weight.device
    A = f.A.float().to(device)  # (r, in)
    B = (f.scale * f.B.float()).to(device)  # (out, r)
    bias = None if f.bias is None else (f.scale * f.bias.float()).to(device)
    if path := links_path(base):
        path.add(A, B, bias)
        return
    base.add_module(PATH, SidePath(A, B, bias))
    base._lorachain_links_hook = base.register_forward_hook(_gated(getattr(base, PATH), owner))


def keep_links(model: nn.Module) -> Callable[..., dict[str, float]]:
    """A `merge` for `knot.tie_knot` on the PEFT `model`: each layer's factors join its links'
    path instead of its weights. Nothing is rounded, so it reports zero rounding."""
    owners = lora_layers(model)

    def merge(base: nn.Module, factors: dict[str, Factors], masters=None) -> dict[str, float]:
        for name, f in factors.items():
            if not all(torch.isfinite(t).all() for t in (f.A, f.B, f.bias) if t is not None):
                raise KnotError(f"tying a knot on {name} gives non-finite weights; nothing was merged")
        for name, f in factors.items():
            attach_link(owners[name], f)
        return {"max_abs": 0.0, "rel_fro": 0.0}

    return merge


def has_links(model: nn.Module) -> bool:
    return any(links_path(layer.get_base_layer()) is not None for layer in lora_layers(model).values())


def fold(model: nn.Module) -> dict[str, float]:
    """Merge every layer's links path into its base weights (fp32 sum, checked) and remove the
    paths: afterwards the adapter-off model is the chain's base, as after plain knots. Returns the
    rounding `knot.apply_factors` reports (a quantized layer takes its own side path)."""
    factors, bases = {}, {}
    for name, layer in lora_layers(model).items():
        base = layer.get_base_layer()
        if (path := links_path(base)) is not None:
            bias = None if path.bias is None else path.bias.cpu()
            factors[name] = Factors(path.A.cpu(), path.B.cpu(), 1.0, bias, bool(layer.fan_in_fan_out))
            bases[name] = base
    rounding = (
        merge_quantized(model.base_model.model, factors) if factors else {"max_abs": 0.0, "rel_fro": 0.0}
    )
    for base in bases.values():
        base._lorachain_links_hook.remove()
        del base._lorachain_links_hook
        delattr(base, PATH)
    return rounding
