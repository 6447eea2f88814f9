"""Mixed-adapter batches by gathered factors: every row its own LoRA in two batched matmuls.

PEFT's mixed batches loop over the distinct adapters of a batch in every LoRA layer. Here, PEFT's
LoRA path is disabled and a forward hook on each LoRA layer adds x·Aᵢᵀ·(sᵢBᵢ)ᵀ, with each row's
factors gathered once per batch into (B, r, in) and (B, out, r) tensors (ranks padded with zeros;
a row with no adapter gets zeros), so a decode step costs the same whatever the adapter mix. The
factors can come from anywhere (`factors`): the router's resident buffers need no PEFT adapter per
adapter of the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

# (A (r, in), B (out, r), scaling, B's bias (out,) or None) of one adapter in one LoRA layer
Factors = tuple[torch.Tensor, torch.Tensor, float, torch.Tensor | None]


def peft_factors(layer: LoraLayer, name: str) -> Factors | None:
    """PEFT adapter `name`'s factors in `layer`, from its modules; None if it does not adapt it."""
    if name not in layer.lora_A:
        return None
    B = layer.lora_B[name]
    return layer.lora_A[name].weight, B.weight, layer.scaling[name], getattr(B, "bias", None)


def _gather(
    rows: list[Factors | None],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """Per-row factors stacked, ranks padded with zeros: A (B, r, in), sB (B, out, r), bias."""
    present = [f for f in rows if f is not None]
    if not present:
        return None
    r_max = max(f[0].shape[0] for f in present)
    a_in, b_out, device = present[0][0].shape[1], present[0][1].shape[0], present[0][0].device
    A = torch.zeros(len(rows), r_max, a_in, device=device)  # (B, r, in)
    B = torch.zeros(len(rows), b_out, r_max, device=device)  # (B, out, r)
    bias = None
    for i, f in enumerate(rows):
        if f is None:
            continue
        a, b, s, b_bias = f
        A[i, : a.shape[0]] = a
        B[i, :, : a.shape[0]] = b * s
        if b_bias is not None:
            bias = torch.zeros(len(rows), b_out, device=device) if bias is None else bias
            bias[i] = b_bias * s
    return A, B, bias


class GatheredLoRA:
    """Context manager: inside it, `model` runs each batch row with its own adapter (`rows[i]`, or
    None for the base model). `factors(layer, name)` finds an adapter's factors: by default a PEFT
    adapter's modules; the router's `AdapterSlots.factors` reads resident adapters' buffers."""

    def __init__(
        self,
        model: PeftModel,
        rows: list[str | None],
        factors: Callable[[LoraLayer, str], Factors | None] = peft_factors,
    ) -> None:
        self.model, self.rows, self.factors = model, rows, factors
        self.stack = ExitStack()

    def __enter__(self) -> GatheredLoRA:
        with torch.no_grad():
            for layer in self.model.modules():
                if isinstance(layer, LoraLayer):
                    found = {a: self.factors(layer, a) for a in set(self.rows) if a is not None}
                    gathered = _gather([None if a is None else found[a] for a in self.rows])
                    if gathered is not None:
                        self.stack.enter_context(_Hook(layer, *gathered))
        self.stack.enter_context(self.model.disable_adapter())
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()


class _Hook:
    def __init__(self, layer: LoraLayer, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.layer, self.A, self.B, self.bias = layer, A, B, bias

    def __enter__(self) -> _Hook:
        self.handle = self.layer.register_forward_hook(self.add_delta)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()

    def add_delta(self, module, inputs, output):
        x = inputs[0]  # (B, T, in)
        delta = torch.bmm(
            torch.bmm(x.to(self.A.dtype), self.A.transpose(1, 2)), self.B.transpose(1, 2)
        )  # (B, T, out)
        if self.bias is not None:
            delta = delta + self.bias[:, None, :]
        return output + delta.to(output.dtype)
