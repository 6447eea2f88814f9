"""How sure a selector is: temperature scaling, calibration error, out-of-distribution scores and
the threshold that reaches a target precision. Pure tensor functions; loads no weights.

Every score is "higher = more confident / more familiar", so one rule routes: score >= threshold.
- `msp`: the top label's probability after temperature scaling (max-softmax).
- `margin`: the top label's probability minus the runner-up's (low when two tasks tie).
- `energy`: T * logsumexp(logits / T), the negative free energy (Liu et al. 2020).
- `cosine`: cosine similarity to the nearest task prototype (embedding selectors).
- `mahalanobis`: minus the smallest squared Mahalanobis distance to a task mean, with one shared,
  shrunk covariance of the training embeddings (Lee et al. 2018).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def fit_temperature(logits: torch.Tensor, gold: torch.Tensor, grid: int = 81) -> float:
    """The T in [0.05, 20] (log grid, then golden-section refined) minimising the NLL of
    softmax(logits / T) on held-out rows: logits (N, L), gold (N,) label indices."""

    def nll(log_t: float) -> float:
        return F.cross_entropy(logits / math.exp(log_t), gold).item()

    lo, hi = math.log(0.05), math.log(20.0)
    points = [lo + (hi - lo) * k / (grid - 1) for k in range(grid)]
    best = min(range(grid), key=lambda k: nll(points[k]))
    a, b = points[max(best - 1, 0)], points[min(best + 1, grid - 1)]
    g = (math.sqrt(5) - 1) / 2
    for _ in range(30):
        c, d = b - g * (b - a), a + g * (b - a)
        a, b = (a, d) if nll(c) < nll(d) else (c, b)
    return math.exp((a + b) / 2)


def reliability(conf: list[float], correct: list[bool], bins: int = 10) -> list[dict]:
    """Equal-width confidence bins: rows, mean confidence and accuracy of each non-empty bin."""
    out = []
    for k in range(bins):
        lo, hi = k / bins, (k + 1) / bins
        idx = [i for i, c in enumerate(conf) if lo <= c < hi or (k == bins - 1 and c == 1.0)]
        if idx:
            out.append(
                {
                    "lo": lo,
                    "hi": hi,
                    "n": len(idx),
                    "confidence": sum(conf[i] for i in idx) / len(idx),
                    "accuracy": sum(correct[i] for i in idx) / len(idx),
                }
            )
    return out


def ece(conf: list[float], correct: list[bool], bins: int = 10) -> float:
    """Expected calibration error: bin-weighted |accuracy - confidence| over `bins` equal bins."""
    n = max(1, len(conf))
    return sum(b["n"] / n * abs(b["accuracy"] - b["confidence"]) for b in reliability(conf, correct, bins))


def msp(logits: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    return torch.softmax(logits / t, dim=-1).max(-1).values  # (N,)


def margin(logits: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    """The top label's probability minus the runner-up's (N,): low when two tasks tie."""
    top = torch.softmax(logits / t, dim=-1).topk(2, dim=-1).values  # (N, 2)
    return top[:, 0] - top[:, 1]


def energy(logits: torch.Tensor, t: float = 1.0) -> torch.Tensor:
    return t * torch.logsumexp(logits / t, dim=-1)  # (N,)


def class_gaussian(vecs: torch.Tensor, index: torch.Tensor, n_labels: int, shrink: float = 0.1):
    """Task means (L, D) and the inverse of their shared covariance (D, D), shrunk towards its
    mean variance by `shrink` (a few hundred rows in 384 dimensions are not full rank)."""
    means = torch.zeros(n_labels, vecs.shape[1]).index_add_(0, index, vecs)
    means /= torch.bincount(index, minlength=n_labels).clamp(min=1)[:, None].float()
    centred = vecs - means[index]  # (N, D)
    cov = centred.T @ centred / max(1, len(vecs))  # (D, D)
    eye = torch.eye(cov.shape[0])
    cov = (1 - shrink) * cov + shrink * cov.diagonal().mean() * eye
    return means, torch.linalg.inv(cov).contiguous()


def mahalanobis(vecs: torch.Tensor, means: torch.Tensor, precision: torch.Tensor) -> torch.Tensor:
    """Minus the smallest squared Mahalanobis distance of each row (N, D) to a task mean: (N,)."""
    diff = vecs[:, None, :] - means[None]  # (N, L, D)
    d2 = torch.einsum("nld,de,nle->nl", diff, precision, diff)  # (N, L)
    return -d2.min(-1).values


def threshold_for_precision(
    score: list[float], correct: list[bool], target: float, min_rows: int = 10
) -> float | None:
    """The lowest threshold at which the rows scoring >= it are right at least `target` of the time
    (at least `min_rows` of them): the most coverage at that precision. None: no threshold does."""
    order = sorted(range(len(score)), key=lambda i: -score[i])
    best, right = None, 0
    for k, i in enumerate(order, 1):
        right += correct[i]
        last = k == len(order) or score[order[k]] < score[i]  # ties route together
        if last and k >= min_rows and right / k >= target:
            best = score[i]
    return best


def routed(score: list[float], correct: list[bool], threshold: float | None) -> dict:
    """Coverage (fraction with score >= threshold) and precision of those rows."""
    keep = [c for s, c in zip(score, correct, strict=True) if threshold is not None and s >= threshold]
    n = max(1, len(score))
    return {
        "threshold": threshold,
        "coverage": len(keep) / n,
        "routed": len(keep),
        "precision": sum(keep) / len(keep) if keep else None,
    }
