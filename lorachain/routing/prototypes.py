"""Prototypes of the `embedding` selector: what an instruction's embedding is compared with.

`dataset` (the default): one centroid per (task, data set) of the training rows, a task scoring the
cosine of its nearest data set's centroid; `task`: one centroid per task; `row`: every training row
its own prototype (the nearest neighbour). A task mixed from many data sets (T0's multiple-choice QA
has nine) otherwise owns a blurred average that pulls in instructions of every other task; its
nearest data set is a sharper match.

`selector.descriptions` adds one fixed prototype per described task: the embedding of a short
description of it, written by the user and never fitted to rows.

A store keeps the per-prototype sums (P, D), row counts (P,), the task index of every prototype
(`owner`, (P,)) and which are descriptions (`described`, (P,)); `stored_prototypes` fills the last two
in for a store fitted before them (one prototype per task).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PROTOTYPES = ("task", "dataset", "row")


def prototype_index(
    tasks: list[str], datasets: list[str], labels: list[str], by: str = "task"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's prototype (N,) and each prototype's task index (P,). `task`: prototype = task;
    `dataset`: one per (task, data set) pair, in the tasks' order then by data set; `row`: one per row."""
    if by == "task":
        index = torch.tensor([labels.index(t) for t in tasks])
        return index, torch.arange(len(labels))
    if by == "row":  # every row its own prototype: the nearest neighbour's task
        return torch.arange(len(tasks)), torch.tensor([labels.index(t) for t in tasks])
    pairs = sorted(set(zip(tasks, datasets, strict=True)), key=lambda p: (labels.index(p[0]), p[1]))
    slot = {p: i for i, p in enumerate(pairs)}
    rows = torch.tensor([slot[p] for p in zip(tasks, datasets, strict=True)])
    return rows, torch.tensor([labels.index(t) for t, _ in pairs])


def prototype_sums(vecs: torch.Tensor, rows: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the unit embeddings (P, D) and row count (P,) of each of `n` prototypes."""
    sums = torch.zeros(n, vecs.shape[1]).index_add_(0, rows, vecs)
    return sums, torch.bincount(rows, minlength=n).float()


def task_cosines(
    vecs: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor, owner: torch.Tensor, n_labels: int
) -> torch.Tensor:
    """Cosine (N, L) of each embedding to each task's nearest prototype; a task without rows -1."""
    cos = vecs @ F.normalize(sums / counts.clamp(min=1)[:, None], dim=-1).T  # (N, P)
    cos = cos.masked_fill(counts[None] == 0, -1.0)
    out = torch.full((len(vecs), n_labels), -1.0)
    return out.scatter_reduce(1, owner.expand(len(vecs), -1), cos, reduce="amax", include_self=True)


def task_means(sums: torch.Tensor, counts: torch.Tensor, owner: torch.Tensor, n_labels: int) -> torch.Tensor:
    """Each task's mean embedding (L, D) over all its prototypes' rows (for Mahalanobis)."""
    s = torch.zeros(n_labels, sums.shape[1]).index_add_(0, owner, sums)
    c = torch.zeros(n_labels).index_add_(0, owner, counts)
    return s / c.clamp(min=1)[:, None]


def description_prototypes(
    descriptions: dict[str, str] | None, labels: list[str], embed_fn
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`selector.descriptions` (task -> a short description) as fixed prototypes: their unit
    embeddings (K, D) by `embed_fn(texts)` and their tasks (K,); tasks not in `labels` are left out
    (a fold may lack one). None without descriptions."""
    pairs = [(t, d) for t, d in (descriptions or {}).items() if t in labels]
    if not pairs:
        return None
    return embed_fn([d for _, d in pairs]), torch.tensor([labels.index(t) for t, _ in pairs])


def fit_prototypes(
    vecs: torch.Tensor,
    rows: torch.Tensor,
    owner: torch.Tensor,
    fixed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The prototypes of rows `vecs` (N, D) (`rows`, `owner` from `prototype_index`) and after them
    the `fixed` ones (unit vectors and their tasks, one row each): `sums` (P, D), `counts` (P,),
    `owner` (P,) and `described` (P,), 1 for a fixed prototype."""
    sums, counts = prototype_sums(vecs, rows, len(owner))
    described = torch.zeros(len(owner), dtype=torch.uint8)
    if fixed is not None:
        v, own = fixed
        sums, counts, owner = (
            torch.cat([sums, v]),
            torch.cat([counts, torch.ones(len(v))]),
            torch.cat([owner, own]),
        )
        described = torch.cat([described, torch.ones(len(v), dtype=torch.uint8)])
    return {"sums": sums, "counts": counts, "owner": owner, "described": described}


def stored_prototypes(t: dict[str, torch.Tensor], n_labels: int) -> dict[str, torch.Tensor]:
    """A store's centroid tensors with `owner` and `described` filled in for a store fitted before
    prototypes (one per task, none described)."""
    n = len(t["counts"])
    defaults = {"owner": torch.arange(n_labels), "described": torch.zeros(n, dtype=torch.uint8)}
    return defaults | dict(t)
