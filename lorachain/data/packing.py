"""Packed batches: several rows per sequence up to `max_length`, none attending to another.

A packed batch holds `input_ids`, `labels` and `position_ids` (P, T) and no `attention_mask`: each
row's positions restart at 0, and transformers turns positions that restart into a block-diagonal
causal mask for eager and SDPA attention (`masking_utils.find_packed_sequence_indices`; sliding
windows included) and into varlen flash-attention on CUDA. The first token of every row is
no target, so no row learns from the one before it. Rows are packed in the order `micro_batches`
gives them (first fit), so the data order and resume are those of the padded batches, and the loss
is still the sum over the same target tokens.
"""

from __future__ import annotations

import torch

from lorachain.data.rows import Example


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Indices of the rows in each packed sequence: first fit in the given order."""
    bins: list[list[int]] = []
    used: list[int] = []
    for i, n in enumerate(lengths):
        for b, u in enumerate(used):
            if u + n <= max_length:
                bins[b].append(i)
                used[b] += n
                break
        else:
            bins.append([i])
            used.append(n)
    return bins


def pack(examples: list[Example], pad_id: int, max_length: int) -> dict[str, torch.Tensor]:
    """Pack causal-LM examples into input_ids, position_ids, labels (P, T), P <= len(examples).

    The padding after the last row of a sequence is a row of its own (positions from 0, no
    targets), so it is never attended to by a real row."""
    bins = pack_rows([len(e.input_ids) for e in examples], max_length)
    width = max(sum(len(examples[i].input_ids) for i in b) for b in bins)
    ids = torch.full((len(bins), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(bins), width), dtype=torch.long)
    labels = torch.full((len(bins), width), -100, dtype=torch.long)
    for p, b in enumerate(bins):
        off = 0
        for i in b:
            e = examples[i]
            n = len(e.input_ids)
            ids[p, off : off + n] = torch.tensor(e.input_ids)
            pos[p, off : off + n] = torch.arange(n)
            labels[p, off : off + n] = torch.tensor(e.labels)
            labels[p, off] = -100  # the row's first token is not predicted from the previous row
            off += n
        pos[p, off:] = torch.arange(width - off)
    return {"input_ids": ids, "position_ids": pos, "labels": labels}
