"""Padded batches and the deterministic example order of every optimizer step (for resume)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from lorachain.data.rows import Example


def collate(examples: list[Example], pad_id: int, classifier: bool) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples into tensors: input_ids, attention_mask, labels (B, T)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        if not classifier:
            labels[i, :n] = torch.tensor(e.labels)
    batch = {"input_ids": ids, "attention_mask": mask}
    batch["labels"] = torch.tensor([e.labels[0] for e in examples]) if classifier else labels
    return batch


def steps_per_epoch(n_examples: int, batch_size: int, grad_accum: int) -> int:
    return max(1, -(-n_examples // (batch_size * grad_accum)))


def batch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled example order of one epoch; a pure function of (seed, epoch) for resume."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batches(
    examples: list[Example], step: int, batch_size: int, grad_accum: int, seed: int
) -> Iterator[list[Example]]:
    """The micro-batches of optimizer step `step` (0-based), wrapping over epochs."""
    n = len(examples)
    per_step = batch_size * grad_accum
    spe = steps_per_epoch(n, batch_size, grad_accum)
    epoch, pos = divmod(step, spe)
    order = batch_order(n, seed, epoch)
    idx = order[pos * per_step : (pos + 1) * per_step]
    for k in range(0, len(idx), batch_size):
        yield [examples[i] for i in idx[k : k + batch_size]]
