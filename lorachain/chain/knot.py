"""COLA's two chain operations (paper, section 3.2): tie a knot and extend the chain.

*Tie a knot* merges the current link's scale·B·A (and its LoRA bias) into the frozen base weights in
fp32, refusing non-finite results, and returns a `Knot` recording exactly what was merged. *Extend
the chain* wraps the base with a fresh LoRA (A Gaussian, B zero); the caller builds a new optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from lorachain.config import ChainConfig, ConfigError, LinkConfig

ADAPTER = "default"
PEFT_PREFIX = "base_model.model."


class KnotError(RuntimeError):
    """Merging a link would corrupt the base weights (non-finite values)."""


@dataclass
class Factors:
    """One layer's merged update: delta W = scale · B @ A (transposed for Conv1D), plus scale · bias."""

    A: torch.Tensor  # (r, in) fp32
    B: torch.Tensor  # (out, r) fp32
    scale: float
    bias: torch.Tensor | None = None  # (out,) fp32, LoRA bias before scaling
    fan_in_fan_out: bool = False


@dataclass
class Knot:
    """What one knot merged, and why it was tied."""

    link: int
    step: int
    rank: int
    alpha: float
    reason: str
    factors: dict[str, Factors] = field(default_factory=dict)

    def to_state(self) -> dict:
        """Plain dict of tensors and scalars (safe for `torch.load(weights_only=True)`)."""
        return {
            "link": self.link,
            "step": self.step,
            "rank": self.rank,
            "alpha": self.alpha,
            "reason": self.reason,
            "factors": {n: vars(f) for n, f in self.factors.items()},
        }

    @staticmethod
    def from_state(state: dict) -> Knot:
        factors = {n: Factors(**f) for n, f in state["factors"].items()}
        return Knot(state["link"], state["step"], state["rank"], state["alpha"], state["reason"], factors)


def lora_config(
    link: LinkConfig, chain: ChainConfig, targets: list[str], fan_in_fan_out: bool, task: str
) -> LoraConfig:
    """The PEFT LoraConfig of one link. PEFT refuses a LoRA bias with Gaussian init, so that case is
    built with PEFT's default init and `extend(..., gaussian=True)` re-draws A."""
    gaussian = chain.init == "gaussian" and chain.bias == "none"
    return LoraConfig(
        r=link.rank,
        lora_alpha=link.alpha,
        target_modules=targets,
        lora_dropout=chain.dropout,
        lora_bias=chain.bias == "lora_only",
        init_lora_weights="gaussian" if gaussian else True,
        fan_in_fan_out=fan_in_fan_out,
        task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM",
    )


def check_lora_bias(model: nn.Module, targets: list[str]) -> None:
    """bias=lora_only merges into each target layer's bias, so every target needs one."""
    for name, module in model.named_modules():
        if name.split(".")[-1] in targets and getattr(module, "bias", 0) is None:
            raise ConfigError(
                f"chain.bias: lora_only needs target layers with a bias; {name} in "
                f"{type(model).__name__} has none (use bias: none)"
            )


def extend(base: nn.Module, config: LoraConfig, gaussian: bool = False) -> PeftModel:
    """Extend the chain: wrap `base` with a fresh LoRA (A random, B zero); only it is trainable.

    `gaussian` re-draws A ~ N(0, 1/r²) as PEFT's "gaussian" init does, for configs PEFT builds
    with its default init (see `lora_config`)."""
    model = get_peft_model(base, config)
    if gaussian and config.init_lora_weights is True:
        with torch.no_grad():
            for layer in lora_layers(model).values():
                nn.init.normal_(layer.lora_A[ADAPTER].weight, std=1 / config.r)
    return model


def lora_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """LoRA layers by their name in the unwrapped base model."""
    return {
        n.removeprefix(PEFT_PREFIX): m
        for n, m in model.named_modules()
        if isinstance(m, LoraLayer) and ADAPTER in m.lora_A
    }


def layer_factors(layer: LoraLayer) -> Factors:
    b = layer.lora_B[ADAPTER]
    bias = b.bias.detach().float().cpu().clone() if getattr(b, "bias", None) is not None else None
    return Factors(
        A=layer.lora_A[ADAPTER].weight.detach().float().cpu().clone(),
        B=b.weight.detach().float().cpu().clone(),
        scale=float(layer.scaling[ADAPTER]),
        bias=bias,
        fan_in_fan_out=bool(layer.fan_in_fan_out),
    )


def merged_params(module: nn.Module, f: Factors, name: str) -> dict[str, torch.Tensor]:
    """New weight (and bias) of `module` after adding `f`, computed in fp32 and checked finite."""
    device = module.weight.device
    delta = f.scale * (f.B.to(device) @ f.A.to(device))  # (out, in)
    if f.fan_in_fan_out:
        delta = delta.T  # Conv1D stores (in, out)
    out = {"weight": module.weight.detach().float() + delta}
    if f.bias is not None:
        out["bias"] = module.bias.detach().float() + f.scale * f.bias.to(device)
    for key, value in out.items():
        if not torch.isfinite(value).all():
            raise KnotError(f"tying a knot on {name}.{key} gives non-finite weights; nothing was merged")
    return out


def apply_factors(base: nn.Module, factors: dict[str, Factors]) -> None:
    """Merge recorded factors into `base` (a plain or PEFT-wrapped model); all-or-nothing."""
    updates = {}
    for name, f in factors.items():
        module = base.get_submodule(name)
        module = getattr(module, "base_layer", module)
        updates[name] = (module, merged_params(module, f, name))
    with torch.no_grad():
        for module, params in updates.values():
            for key, value in params.items():
                getattr(module, key).copy_(value.to(getattr(module, key).dtype))


def tie_knot(model: PeftModel, link: int, step: int, rank: int, alpha: float, reason: str) -> Knot:
    """Tie a knot: merge the current link into the base weights and record what was merged."""
    factors = {name: layer_factors(layer) for name, layer in lora_layers(model).items()}
    apply_factors(model.base_model.model, factors)
    return Knot(link, step, rank, alpha, reason, factors)


def unload(model: PeftModel) -> nn.Module:
    """The base model without the (already merged) LoRA; trained heads stay in place."""
    return model.unload()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def total_delta(knots: list[Knot]) -> dict[str, Factors]:
    """All knots' factors stacked per layer: one LoRA of rank Σrᵢ with scale 1 (exact sum)."""
    names = knots[0].factors.keys() if knots else []
    stacked = {}
    for name in names:
        parts = [k.factors[name] for k in knots]
        biases = [f.scale * f.bias for f in parts if f.bias is not None]
        stacked[name] = Factors(
            A=torch.cat([f.A for f in parts], dim=0),  # (R, in)
            B=torch.cat([f.scale * f.B for f in parts], dim=1),  # (out, R)
            scale=1.0,
            bias=torch.stack(biases).sum(0) if biases else None,
            fan_in_fan_out=parts[0].fan_in_fan_out,
        )
    return stacked
