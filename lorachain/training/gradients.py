"""The loss gradient with respect to the target weights of a frozen base, for links that start
where the gradient points (`chain.init: gradient`, chain/init.py).

The gradient of a whole weight costs that weight's memory: only the target layers' weights take a
gradient (every other parameter is frozen for the pass, whatever it was), and the run is refused in
one line before it starts when those gradients cannot fit.
"""

from __future__ import annotations

import torch
from torch import nn

from lorachain.config import ConfigError, RunConfig
from lorachain.data import collate, micro_batches
from lorachain.models import device_of
from lorachain.training.heap import return_freed_memory, trim_heap
from lorachain.training.memory import GIB, available_bytes
from lorachain.training.precision import Precision
from lorachain.training.step import loss_units, summed_loss


def target_weights(model: nn.Module, targets: list[str]) -> dict[str, nn.Parameter]:
    """The weights of the target layers by module name (the names LoRA layers get)."""
    return {
        n: m.weight
        for n, m in model.named_modules()
        if n.split(".")[-1] in targets and isinstance(getattr(m, "weight", None), nn.Parameter)
    }


def check_fits(model: nn.Module, targets: list[str], available: float | None = None) -> None:
    """One ConfigError line when the target weights' fp32 gradients cannot fit in memory."""
    need = sum(w.numel() * 4 for w in target_weights(model, targets).values())
    have = available_bytes() if available is None else available
    if need > 0.5 * have:
        raise ConfigError(
            f"chain.init: gradient needs {need / GIB:.1f} GiB for the target weights' gradients and "
            f"{have / GIB:.1f} GiB is available; use fewer target_modules or pissa/gaussian"
        )


def layer_gradients(
    model: nn.Module,
    targets: list[str],
    examples: list,
    cfg: RunConfig,
    step: int,
    prec: Precision,
    pad_id: int,
) -> dict[str, torch.Tensor]:
    """Mean loss gradient (fp32) w.r.t. each target weight over the `chain.init_batches` training
    batches from `step` on: the batches the link will train on first, the same on every rank.

    Only the target weights require a gradient during the pass: the first link's base arrives with
    every parameter trainable (PEFT freezes it when the link wraps it), and a backward then also
    computed, and left behind, the gradients of the embeddings and every other weight (SmolLM2-135M:
    0.28 GiB held through the whole run). Requirements and `.grad` are restored as they were; on CPU
    freed memory goes back to the OS as in `step.run_steps`."""
    t, classifier = cfg.train, cfg.model.task == "classification"
    weights = target_weights(model, targets)
    device = device_of(model)
    params = dict(model.named_parameters(remove_duplicate=False))
    was = {n: (p.requires_grad, p.grad) for n, p in params.items()}
    ids = {id(w) for w in weights.values()}
    cpu = device.type == "cpu"
    if cpu:
        return_freed_memory()
    for p in params.values():
        p.requires_grad_(id(p) in ids)
        p.grad = None
    try:
        batches = [
            chunk
            for k in range(cfg.chain.init_batches)
            for chunk in micro_batches(examples, step + k, t.batch_size, t.grad_accum, t.seed)
        ]
        units = max(1, sum(loss_units(e, classifier) for chunk in batches for e in chunk))
        acc: dict[str, torch.Tensor] = {}  # summed in fp32 whatever the weights' dtype
        for chunk in batches:
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id, classifier).items()}
            with prec.autocast():
                loss = summed_loss(model, batch, classifier) / units
            with prec.matmuls():
                loss.backward()
            for n, w in weights.items():
                if w.grad is not None:
                    g = w.grad.detach().float()
                    acc[n] = acc[n].add_(g) if n in acc else g
                    w.grad = None
        return {n: g.cpu() for n, g in acc.items()}
    finally:
        for n, p in params.items():
            p.requires_grad_(was[n][0])
            p.grad = was[n][1]
        if cpu:
            trim_heap()
