"""COLA's two chain operations (paper, section 3.2): tie a knot and extend the chain.

*Tie a knot* merges the current link's scale·B·A (and its LoRA bias) into the frozen base weights in
fp32, refusing non-finite results, and returns a `Knot` recording exactly what was merged. *Extend
the chain* wraps the base with a fresh LoRA (A Gaussian, B zero); the caller builds a new optimizer.
"""

from __future__ import annotations

from collections.abc import Callable
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
    """One layer's merged update: delta W = scale · B @ A (transposed for Conv1D), plus scale · bias;
    with a DoRA `magnitude`, the merged weight is magnitude · (W + delta W) / ‖W + delta W‖ per output
    row, which depends on W: such knots replay in order and have no single-adapter form."""

    A: torch.Tensor  # (r, in) fp32
    B: torch.Tensor  # (out, r) fp32
    scale: float
    bias: torch.Tensor | None = None  # (out,) fp32, LoRA bias before scaling
    fan_in_fan_out: bool = False
    # DoRA: the trained magnitude (out,); the merge rescales each output row of W + delta to it
    magnitude: torch.Tensor | None = None


@dataclass
class Knot:
    """What one knot merged, and why it was tied."""

    link: int
    step: int
    rank: int
    alpha: float
    reason: str
    factors: dict[str, Factors] = field(default_factory=dict)
    rounding: dict[str, float] = field(default_factory=dict)  # what storing the merge lost (low-dtype base)

    def to_state(self) -> dict:
        """Plain dict of tensors and scalars (safe for `torch.load(weights_only=True)`)."""
        return {
            "link": self.link,
            "step": self.step,
            "rank": self.rank,
            "alpha": self.alpha,
            "reason": self.reason,
            "factors": {n: vars(f) for n, f in self.factors.items()},
            "rounding": dict(self.rounding),
        }

    @staticmethod
    def from_state(state: dict) -> Knot:
        factors = {n: Factors(**f) for n, f in state["factors"].items()}
        return Knot(
            state["link"],
            state["step"],
            state["rank"],
            state["alpha"],
            state["reason"],
            factors,
            state.get("rounding", {}),
        )


def lora_config(
    link: LinkConfig, chain: ChainConfig, targets: list[str], fan_in_fan_out: bool, task: str
) -> LoraConfig:
    """The PEFT LoraConfig of one link. PEFT refuses a LoRA bias with Gaussian init, so that case is
    built with PEFT's default init and `extend(..., gaussian=True)` re-draws A. Links that start away
    from zero (`chain/init.py`) are built Gaussian and then set."""
    gaussian = (link.init or chain.init) != "kaiming" and chain.bias == "none"
    return LoraConfig(
        r=link.rank,
        lora_alpha=link.alpha,
        use_rslora=chain.use_rslora,
        target_modules=targets,
        lora_dropout=chain.dropout,
        lora_bias=chain.bias == "lora_only",
        init_lora_weights="gaussian" if gaussian else True,
        use_dora=chain.use_dora,
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
    reshard(base)  # PEFT freezes what is registered: the sharded parameters, not gathered copies
    model = get_peft_model(base, config)
    if gaussian and config.init_lora_weights is True:
        with torch.no_grad():
            for layer in lora_layers(model).values():
                nn.init.normal_(layer.lora_A[ADAPTER].weight, std=1 / config.r)
    return model


def reshard(model: nn.Module) -> None:
    """Put back the sharded parameters of every FSDP2 unit of `model` that a forward without a
    backward left gathered (an evaluation, DPO's reference pass: the root always, every unit with
    `train.fsdp_reshard_after_forward: false`); nothing without FSDP2."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


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
    dora = getattr(layer, "lora_magnitude_vector", {})
    magnitude = dora[ADAPTER].weight.detach().float().cpu().clone() if ADAPTER in dora else None
    return Factors(
        A=layer.lora_A[ADAPTER].weight.detach().float().cpu().clone(),
        B=b.weight.detach().float().cpu().clone(),
        scale=float(layer.scaling[ADAPTER]),
        bias=bias,
        fan_in_fan_out=bool(layer.fan_in_fan_out),
        magnitude=magnitude,
    )


def merged_params(
    module: nn.Module, f: Factors, name: str, master: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """New weight (and bias) of `module` after adding `f`, computed in fp32 (on the fp32 `master`
    of the weight when one is kept) and checked finite."""
    device = module.weight.device
    delta = f.scale * (f.B.to(device) @ f.A.to(device))  # (out, in)
    if f.fan_in_fan_out:
        delta = delta.T  # Conv1D stores (in, out)
    weight = master if master is not None else module.weight.detach().float()
    out = {"weight": weight + delta}
    if f.magnitude is not None:  # DoRA, as PEFT merges it: each output row rescaled to its magnitude
        rows = out["weight"].T if f.fan_in_fan_out else out["weight"]  # (out, in)
        factor = f.magnitude.to(device) / torch.linalg.norm(rows, dim=1)  # (out,)
        out["weight"] = out["weight"] * (factor[None, :] if f.fan_in_fan_out else factor[:, None])
    if f.bias is not None:
        out["bias"] = module.bias.detach().float() + f.scale * f.bias.to(device)
    for key, value in out.items():
        if not torch.isfinite(value).all():
            raise KnotError(f"tying a knot on {name}.{key} gives non-finite weights; nothing was merged")
    return out


def apply_factors(
    base: nn.Module, factors: dict[str, Factors], masters: dict[str, torch.Tensor] | None = None
) -> dict[str, float]:
    """Merge recorded factors into `base` (a plain or PEFT-wrapped model); all-or-nothing.

    The sum is exact in fp32; a weight stored in a lower dtype (with no fp32 master) rounds it.
    Returns what that rounding lost over all layers: `max_abs` and `rel_fro` (Frobenius norm of
    the loss over that of the merged update), both 0 for an fp32 base."""
    masters = masters or {}
    updates = {}
    for name, f in factors.items():
        module = base.get_submodule(name)
        module = getattr(module, "base_layer", module)
        updates[name] = (module, merged_params(module, f, name, masters.get(name)))
    max_abs, lost_sq, delta_sq = 0.0, 0.0, 0.0
    with torch.no_grad():
        for name, (module, params) in updates.items():
            for key, value in params.items():
                target = getattr(module, key)
                kept = key == "weight" and name in masters  # an exact fp32 master is kept
                old = masters[name] if kept else target.float()
                delta_sq += float((value - old).double().square().sum())
                stored = value.to(target.dtype)
                lost = torch.zeros(()) if kept else value - stored.float()
                if kept:
                    masters[name].copy_(value)
                lost_sq += float(lost.double().square().sum())
                max_abs = max(max_abs, float(lost.abs().max()))
                target.copy_(stored)
    return {"max_abs": max_abs, "rel_fro": (lost_sq / delta_sq) ** 0.5 if delta_sq else 0.0}


def tie_knot(
    model: PeftModel,
    link: int,
    step: int,
    rank: int,
    alpha: float,
    reason: str,
    masters: dict[str, torch.Tensor] | None = None,
    merge: Callable[..., dict[str, float]] | None = None,
) -> Knot:
    """Tie a knot: merge the current link into the base weights and record what was merged.

    `merge(base, factors, masters)` does the merge (default `apply_factors`; a quantized base
    takes `chain.sidepath.merge_quantized`)."""
    factors = {name: layer_factors(layer) for name, layer in lora_layers(model).items()}
    rounding = (merge or apply_factors)(model.base_model.model, factors, masters)
    return Knot(link, step, rank, alpha, reason, factors, rounding)


def unload(model: PeftModel) -> nn.Module:
    """The base model without the (already merged) LoRA; trained heads stay in place."""
    return model.unload()


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def total_delta(knots: list[Knot]) -> dict[str, Factors]:
    """All knots' factors stacked per layer: one LoRA of rank Σrᵢ with scale 1 (exact sum)."""
    names = knots[0].factors.keys() if knots else []
    if any(f.magnitude is not None for k in knots for f in k.factors.values()):
        raise ValueError(
            "a DoRA chain has no single-adapter form (its magnitudes rescale W + delta W); export it merged"
        )
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
