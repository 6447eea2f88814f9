"""Mixed-adapter batches by gathered factors: every row its own LoRA in two batched matmuls.

PEFT's mixed batches loop over the distinct adapters of a batch in every LoRA layer. Here, PEFT's
LoRA path is disabled and a forward hook on each LoRA layer adds x·Aᵢᵀ·(sᵢBᵢ)ᵀ, with each row's
factors gathered once per batch into (B, r, in) and (B, out, r) tensors (ranks padded with zeros;
a row with no adapter gets zeros), so a decode step costs the same whatever the adapter mix.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer


def _factors(
    layer: LoraLayer, rows: list[str | None]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    names = {a for a in rows if a is not None}
    r_max = max(layer.r[a] for a in names)
    a_in = layer.lora_A[next(iter(names))].in_features
    b_out = layer.lora_B[next(iter(names))].out_features
    device = layer.lora_A[next(iter(names))].weight.device
    A = torch.zeros(len(rows), r_max, a_in, device=device)  # (B, r, in)
    B = torch.zeros(len(rows), b_out, r_max, device=device)  # (B, out, r)
    bias = None
    for i, name in enumerate(rows):
        if name is None:
            continue
        r, s = layer.r[name], layer.scaling[name]
        A[i, :r] = layer.lora_A[name].weight
        B[i, :, :r] = layer.lora_B[name].weight * s
        if getattr(layer.lora_B[name], "bias", None) is not None:
            bias = torch.zeros(len(rows), b_out, device=device) if bias is None else bias
            bias[i] = layer.lora_B[name].bias * s
    return A, B, bias


class GatheredLoRA:
    """Context manager: inside it, `model` runs each batch row with its own adapter (`rows[i]`, a
    PEFT adapter name, or None for the base model)."""

    def __init__(self, model: PeftModel, rows: list[str | None]) -> None:
        self.model, self.rows = model, rows
        self.stack = ExitStack()

    def __enter__(self) -> GatheredLoRA:
        with torch.no_grad():
            for layer in self.model.modules():
                if isinstance(layer, LoraLayer):
                    A, B, bias = _factors(layer, self.rows)
                    self.stack.enter_context(_Hook(layer, A, B, bias))
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
