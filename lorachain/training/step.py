"""One optimizer step of the one training loop, and the pieces it is made of.

`run_steps` is what every method trains with (LoRA, COLA links, full fine-tuning, the selectors):
the loss of a global batch over its target tokens, gradient accumulation and data parallelism,
autocast and fp16 loss scaling, clipping, the learning-rate schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lorachain.config import OptimConfig, RunConfig
from lorachain.data import Example, collate, micro_batches, pack
from lorachain.models import device_of, logits_at
from lorachain.training.heap import return_freed_memory, trim_heap
from lorachain.training.parallel import Dist
from lorachain.training.precision import FP32, Precision


def make_optimizer(
    params: list[nn.Parameter], cfg: OptimConfig, fast: list[nn.Parameter] = ()
) -> torch.optim.Optimizer:
    """A fresh base optimizer (no state): AdamW, SGD or AdaGrad. With `optim.loraplus_lr_ratio`, the
    `fast` parameters (the B factors: LoRA+) get their own group whose lr is that many times the
    schedule's (`lr_ratio`, applied by `run_steps`)."""
    if cfg.loraplus_lr_ratio and fast:
        ids = {id(p) for p in fast}
        params = [
            {"params": [p for p in params if id(p) not in ids], "lr_ratio": 1.0},
            {"params": [p for p in params if id(p) in ids], "lr_ratio": cfg.loraplus_lr_ratio},
        ]
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.Adagrad(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at 0-based `step` of a `total`-step schedule."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def summed_loss(model: nn.Module, batch: dict[str, torch.Tensor], classifier: bool) -> torch.Tensor:
    """Sum of the per-token (causal LM) or per-example (classifier) cross-entropy of a batch."""
    if classifier:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100  # position t predicts token t + 1
    mask, pos = batch.get("attention_mask"), batch.get("position_ids")  # packed: positions, no mask
    logits = logits_at(model, batch["input_ids"], mask, keep, pos)  # (N, V)
    return F.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]], reduction="sum")


def loss_units(e: Example, classifier: bool) -> int:
    """What the loss is averaged over: target tokens (causal LM) or examples (classifier)."""
    return 1 if classifier else sum(1 for y in e.labels[1:] if y != -100)


class LMLoss:
    """The default objective of `run_steps`: the LM (or classifier) cross-entropy over target
    tokens (or examples). Another objective (`training.dpo.DPO`) has the same four methods."""

    def __init__(self, classifier: bool, packing: bool = False, max_length: int = 0) -> None:
        self.classifier, self.packing, self.max_length = classifier, packing, max_length

    def units(self, examples: list[Example]) -> int:
        return sum(loss_units(e, self.classifier) for e in examples)

    def tokens(self, examples: list[Example]) -> int:
        return sum(len(e.input_ids) for e in examples)

    def collate(self, examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
        if self.packing:
            return pack(examples, pad_id, self.max_length)
        return collate(examples, pad_id, self.classifier)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return summed_loss(model, batch, self.classifier)

    def metrics(self, reduce=None) -> dict[str, float]:
        """What the loop logs beside the loss (nothing more for the LM loss)."""
        return {}


def update(
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    max_norm: float,
    scaler: torch.amp.GradScaler | None,
) -> None:
    """The optimizer update of a step: unscale (fp16), clip to `max_norm` (0: no clipping), step,
    zero the gradients."""
    if scaler:
        scaler.unscale_(opt)
    if max_norm:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    if scaler:
        scaler.step(opt)  # skipped when the scaled gradients overflowed
        scaler.update()
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)


def run_steps(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    examples: list[Example],
    cfg: RunConfig,
    start: int,
    end: int,
    lr_at: Callable[[int], float],
    pad_id: int,
    classifier: bool,
    on_step: Callable[[int, float, int], bool],
    dist: Dist = Dist(),  # noqa: B008 (frozen)
    prec: Precision = FP32,
    scaler: torch.amp.GradScaler | None = None,
    objective=None,
) -> int:
    """Optimizer steps `start`..`end`-1; after each, `on_step(step_count, loss, tokens)` may stop
    the loop by returning True. Returns the number of steps done so far (the global count).
    `objective` (default `LMLoss`; `training.dpo.DPO`) gives a step's units, batches and loss.

    The loss of a step is the sum over its global batch divided by the batch's target tokens (or
    examples), so gradient accumulation and data parallelism (`dist`) follow the same gradient.
    Forward and loss run under `prec`'s autocast; with an fp16 `scaler` the loss is scaled.
    On CPU, freed memory goes back to the OS (blocks of 4 MiB and more are mmapped, the heap is trimmed
    after each step); with glibc's defaults the heap kept what a step freed: at the ~1B Llama shape on
    an NF4 base the RSS grew ~0.05 GiB a step and 3-step peaks varied from 1.49 to 1.77 GiB."""
    t = cfg.train
    params = trainable(model)
    device = device_of(model)
    cpu = device.type == "cpu"
    if cpu:  # a step's large temporaries (activations, dequantized weights) go back to the OS
        return_freed_memory()
    model.train()
    objective = objective or LMLoss(classifier, cfg.data.packing, cfg.data.max_length)
    step = start
    while step < end:
        for group in opt.param_groups:
            group["lr"] = lr_at(step) * group.get("lr_ratio", 1.0)
        batches = list(micro_batches(examples, step, t.batch_size, t.grad_accum, t.seed))
        units = objective.units([e for chunk in batches for e in chunk])
        if units == 0:  # nothing to learn from: no update, and reported as such (loss NaN), never 0
            step += 1
            if on_step(step, float("nan"), 0):
                break
            continue
        loss_sum, tokens = 0.0, 0
        scale = dist.loss_scale(model)  # DDP averages over ranks; the loss is a sum
        for i, chunk in enumerate(batches):
            mine = dist.shard(chunk)
            if not mine and dist.mode == "none":
                continue
            part = mine or chunk[:1]  # a rank without examples still joins the collectives (weight 0)
            rows = objective.collate(part, pad_id)
            batch = {k: v.to(device) for k, v in rows.items()}
            weight = scale if mine else 0.0
            with dist.accumulate(model, sync=i == len(batches) - 1):  # reduce on the last micro-batch
                with prec.autocast():
                    loss = objective.loss(model, batch) / units
                with prec.matmuls():
                    (scaler.scale(loss * weight) if scaler else loss * weight).backward()
            if mine:
                loss_sum += loss.item()
                tokens += objective.tokens(mine)
        update(opt, params, cfg.optim.max_grad_norm, scaler)
        if cpu:  # and the heap pages the step freed: the next step starts where this one did
            trim_heap()
        step += 1
        if on_step(step, dist.sum(loss_sum), int(dist.sum(tokens))):
            break
    return step
