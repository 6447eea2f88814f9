"""Start a new link in place, on a live PEFT model and the optimizer another loop owns.

`lorachain.training.loop` extends the chain with a fresh PeftModel and a new optimizer. Inside
`transformers.Trainer` the model and optimizer belong to the Trainer, so here the LoRA factors are
re-drawn in place (A random, B zero) or, for a rank step-down, replaced by parameters of the new
rank that take the old ones' places in the optimizer's param groups; the optimizer forgets the
state of every LoRA parameter, and a LambdaLR schedule can restart inside the link.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lorachain.chain.knot import ADAPTER, lora_layers
from lorachain.chain.shards import assign
from lorachain.config import ChainConfig, ConfigError


def peft_rank(model: nn.Module) -> tuple[int, float]:
    """(r, alpha) of the model's `default` LoRA adapter; refuses per-layer rank patterns."""
    config = getattr(model, "peft_config", {}).get(ADAPTER)
    if config is None or not lora_layers(model):
        raise ConfigError(
            "ChainCallback: the Trainer's model is not a PEFT model with a LoRA adapter 'default'"
        )
    if getattr(config, "rank_pattern", None) or getattr(config, "alpha_pattern", None):
        raise ConfigError(
            "ChainCallback: LoRA rank_pattern/alpha_pattern are not supported (one rank per link)"
        )
    return int(config.r), float(config.lora_alpha)


def check_kinds(chain: ChainConfig) -> None:
    """Refuse the link kinds a link drawn in place cannot be: links that start away from zero
    (the base would have to move by -s·B₀·A₀) and DoRA (its magnitude would need re-deriving at
    each knot, and its chain has no single-adapter form). rsLoRA is exact: knots record the
    layers' own scale."""
    if moving := chain.moving_inits():
        raise ConfigError(
            f"{moving[0]}: ChainCallback starts links from zero (gaussian or kaiming); a link that starts "
            "away from zero (pissa, olora, gradient) runs in `lorachain train`"
        )
    if chain.use_dora:
        raise ConfigError(
            "chain.use_dora: ChainCallback ties LoRA links; DoRA chains run in `lorachain train`"
        )


def check_peft_kind(model: nn.Module, chain: ChainConfig) -> None:
    """The PEFT model's link 0 is of the kind `chain` describes (built by `ChainCallback.lora_config`)."""
    config = model.peft_config[ADAPTER]
    if getattr(config, "use_dora", False):
        raise ConfigError("ChainCallback: the PEFT model has use_dora=True; ChainCallback ties LoRA links")
    if config.init_lora_weights not in (True, "gaussian"):
        raise ConfigError(
            f"ChainCallback: the PEFT model has init_lora_weights={config.init_lora_weights!r}; a chain's "
            "links start from zero (B = 0: True or 'gaussian')"
        )
    if bool(config.use_rslora) != chain.use_rslora:
        raise ConfigError(
            f"chain.use_rslora: {str(chain.use_rslora).lower()}, but the PEFT model has "
            f"use_rslora={config.use_rslora} (build it with ChainCallback.lora_config)"
        )


def lora_params(model: nn.Module) -> list[nn.Parameter]:
    """Every LoRA factor (and LoRA bias) of the default adapter, in layer-name order."""
    out = []
    for _, layer in sorted(lora_layers(model).items()):
        out += list(layer.lora_A[ADAPTER].parameters()) + list(layer.lora_B[ADAPTER].parameters())
    return out


def _resize(a: nn.Linear, b: nn.Linear, rank: int) -> dict[nn.Parameter, nn.Parameter]:
    """New factor parameters of `rank` (shapes (rank, in) and (out, rank)); returns old -> new."""
    old_a, old_b = a.weight, b.weight
    a.weight = nn.Parameter(old_a.new_zeros(rank, a.in_features), requires_grad=old_a.requires_grad)
    b.weight = nn.Parameter(old_b.new_zeros(b.out_features, rank), requires_grad=old_b.requires_grad)
    a.out_features = b.in_features = rank
    return {old_a: a.weight, old_b: b.weight}


def draw(a: nn.Linear, b: nn.Linear, init: str, generator: torch.Generator) -> None:
    """A ~ N(0, 1/r²) (`gaussian`, as PEFT and the paper) or PEFT's kaiming-uniform, drawn on the
    CPU from `generator` (so every data-parallel rank draws the same); B and its bias zero."""
    rank = a.weight.shape[0]
    fresh = torch.empty(a.weight.shape)
    if init == "gaussian":
        nn.init.normal_(fresh, std=1 / rank, generator=generator)
    else:
        nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
    assign(a.weight, fresh)  # (this rank's rows of it when FSDP shards the factors)
    with torch.no_grad():
        b.weight.zero_()
        if b.bias is not None:
            b.bias.zero_()


def _inner(optimizer):
    """The torch optimizer behind accelerate's AcceleratedOptimizer wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def reset_optimizer(optimizer, params: list[nn.Parameter], swaps: dict[nn.Parameter, nn.Parameter]) -> None:
    """Put the new parameters in the old ones' places and drop the state (moments, step count)
    of every parameter in `params` and of the replaced ones."""
    opt = _inner(optimizer)
    for group in opt.param_groups:
        group["params"] = [swaps.get(p, p) for p in group["params"]]
    for p in [*params, *swaps]:
        opt.state.pop(p, None)
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    missing = [p for p in params if p.requires_grad and id(p) not in held]
    if missing:
        raise ConfigError("ChainCallback: the Trainer's optimizer does not train every LoRA parameter")


def start_link(
    model: nn.Module, optimizer, rank: int, alpha: float, init: str, generator: torch.Generator
) -> None:
    """Make the model's LoRA a fresh link of `rank` and `alpha` (new shapes on a step-down), and
    let `optimizer` start over on it."""
    config = model.peft_config[ADAPTER]
    swaps: dict[nn.Parameter, nn.Parameter] = {}
    for _, layer in sorted(lora_layers(model).items()):
        a, b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
        if a.weight.shape[0] != rank:
            swaps.update(_resize(a, b, rank))
        draw(a, b, init, generator)
        layer.r[ADAPTER], layer.lora_alpha[ADAPTER] = rank, alpha
        layer.scaling[ADAPTER] = alpha / (math.sqrt(rank) if config.use_rslora else rank)
    config.r, config.lora_alpha = rank, alpha  # so the Trainer's checkpoints describe the link
    if optimizer is not None:
        reset_optimizer(optimizer, lora_params(model), swaps)


def restart_schedule(scheduler, start: int, length: int, total: int) -> None:
    """Run the scheduler's own schedule (over `total` steps) again, compressed into the link's
    `length` steps from `start`; the current step's learning rate is set at once."""
    if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
        raise ConfigError(
            f"ChainCallback: restart_schedule needs a LambdaLR schedule, got {type(scheduler).__name__}"
        )
    if not hasattr(scheduler, "_lorachain_lambdas"):
        scheduler._lorachain_lambdas = list(scheduler.lr_lambdas)
    scale = total / max(1, length)
    scheduler.lr_lambdas = [_compressed(f, start, scale) for f in scheduler._lorachain_lambdas]
    step = scheduler.last_epoch
    for group, base, f in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * f(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def _compressed(f: Callable[[int], float], start: int, scale: float) -> Callable[[int], float]:
    def lr_lambda(step: int) -> float:  # a plain function: LambdaLR does not pickle it
        return f((step - start) * scale)

    return lr_lambda
