"""DPO as an objective of the one loop (`train.objective: dpo`): batches of pairs, the loss, the
reference log-probabilities and the preference metrics. `step.run_steps` calls it; there is no
second loop.

The reference is the model the run starts from (base, or base + `model.adapter`). Its summed
log-probabilities of every pair's two responses are computed once, before the first step and
before a resumed run re-applies its knots (`reference_logps`), and ride along in the batches.
Knots then cannot move it, the chain needs no second model in memory and no reference forward per
step, and a resumed run computes the same numbers again. The loss is TRL's `sigmoid` DPO loss
(log-probs summed over the response tokens, averaged over the pairs), with cDPO label smoothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorachain.config import DPOConfig
from lorachain.data import Example, collate
from lorachain.data.preference import Pair
from lorachain.models import device_of, logits_at

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def pair_batch(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """The chosen rows then the rejected rows, right-padded (2B, T), and the reference
    log-probabilities in the same order (2B,)."""
    rows: list[Example] = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    batch = collate(rows, pad_id, classifier=False)
    batch["ref"] = torch.tensor([p.ref_chosen for p in pairs] + [p.ref_rejected for p in pairs])
    return batch


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each row's log-probability of its labelled (response) tokens, summed: (2B,)."""
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100  # position t predicts token t + 1
    logits = logits_at(model, batch["input_ids"], batch["attention_mask"], keep)  # (N, V)
    token_logps = -F.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]], reduction="none")  # (N,)
    rows = keep.nonzero()[:, 0]  # (N,) the row of each kept position
    return torch.zeros(labels.shape[0], device=token_logps.device).index_add(0, rows, token_logps)


def dpo_losses(
    logps: torch.Tensor, ref: torch.Tensor, beta: float, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses (B,) and the implicit rewards of the chosen and rejected responses (B,)
    from policy and reference log-probs laid out [chosen..., rejected...] (2B,)."""
    chosen, rejected = (logps - ref).chunk(2)  # log-ratios to the reference
    z = beta * (chosen - rejected)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, beta * chosen.detach(), beta * rejected.detach()


class DPO:
    """The DPO objective for `step.run_steps`: a step's units are its pairs; `loss` returns the
    summed per-pair loss of a micro-batch and adds its rewards to the step's running metrics."""

    def __init__(self, cfg: DPOConfig) -> None:
        self.beta, self.smoothing = cfg.beta, cfg.label_smoothing
        self._sums = dict.fromkeys(METRICS, 0.0)
        self._pairs = 0

    def units(self, pairs: list[Pair]) -> int:
        return len(pairs)

    def tokens(self, pairs: list[Pair]) -> int:
        return sum(len(p.input_ids) for p in pairs)

    def collate(self, pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
        return pair_batch(pairs, pad_id)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        losses, chosen, rejected = dpo_losses(
            sequence_logps(model, batch), batch["ref"], self.beta, self.smoothing
        )
        add = {
            "rewards/chosen": chosen.sum(),
            "rewards/rejected": rejected.sum(),
            "rewards/margins": (chosen - rejected).sum(),
            "rewards/accuracies": (chosen > rejected).float().sum(),
        }
        for key, value in add.items():
            self._sums[key] += float(value)
        self._pairs += len(chosen)
        return losses.sum()

    def metrics(self, reduce=lambda x: x) -> dict[str, float]:
        """The step's mean rewards, margin and accuracy (summed over ranks by `reduce`); resets."""
        n = reduce(float(self._pairs))
        out = {k: reduce(v) / n for k, v in self._sums.items()} if n else {}
        self._sums, self._pairs = dict.fromkeys(METRICS, 0.0), 0
        return out


@torch.no_grad()
def reference_logps(model: nn.Module, pairs: list[Pair], pad_id: int, batch_size: int, autocast) -> None:
    """Fill every pair's `ref_chosen`/`ref_rejected` with `model`'s summed response log-probs
    (in eval mode, under the run's `autocast`); every rank computes every pair (a sharded model
    needs all ranks in each forward)."""
    was_training, device = model.training, device_of(model)
    model.eval()
    for k in range(0, len(pairs), batch_size):
        part = pairs[k : k + batch_size]
        batch = {key: v.to(device) for key, v in pair_batch(part, pad_id).items()}
        with autocast():
            logps = sequence_logps(model, batch).float().cpu()
        for p, c, r in zip(part, *logps.chunk(2), strict=True):
            p.ref_chosen, p.ref_rejected = float(c), float(r)
    model.train(was_training)


@torch.no_grad()
def evaluate_pairs(model: nn.Module, pairs: list[Pair], pad_id: int, batch_size: int, cfg: DPOConfig) -> dict:
    """Held-out preference metrics: accuracy (chosen reward above rejected), mean margin, DPO loss,
    and the mean per-token log-ratio to the reference on the chosen responses (TRL's KL proxy)."""
    was_training, device = model.training, device_of(model)
    model.eval()
    correct = margin = loss = ratio = 0.0
    for k in range(0, len(pairs), batch_size):
        part = pairs[k : k + batch_size]
        batch = {key: v.to(device) for key, v in pair_batch(part, pad_id).items()}
        logps = sequence_logps(model, batch)
        losses, chosen, rejected = dpo_losses(logps, batch["ref"], cfg.beta, cfg.label_smoothing)
        correct += float((chosen > rejected).sum())
        margin += float((chosen - rejected).sum())
        loss += float(losses.sum())
        n_tokens = torch.tensor([sum(y != -100 for y in p.chosen.labels) for p in part], device=device)
        ratio += float((chosen / cfg.beta / n_tokens).sum())
    model.train(was_training)
    n = len(pairs)
    return {
        "pref_accuracy": correct / n,
        "margin": margin / n,
        "dpo_loss": loss / n,
        "chosen_logratio": ratio / n,
    }
