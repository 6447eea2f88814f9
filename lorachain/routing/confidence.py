"""A store's own routing threshold: how sure its embedding selector is on data sets it never saw.

At fit time, the store's training rows are held out one data set at a time (every data set whose
task has another); each is scored by the centroids of the others. On those held-out scores, a
temperature is fitted (NLL) and the lowest threshold of the chosen confidence score that keeps the
routed rows right `target` of the time. Both go into the manifest's selector entry
(`calibration`); the Router sends rows below the threshold to the fallback (`min_in_distribution`).
"""

from __future__ import annotations

import torch

from lorachain.routing import calibrate as cal
from lorachain.routing.prototypes import fit_prototypes, task_cosines

CONFIDENCES = ("msp", "margin", "energy", "cosine", "mahalanobis")


def centroid_scores(
    vecs: torch.Tensor, cos: torch.Tensor, means: torch.Tensor, precision: torch.Tensor | None, temp: float
) -> dict[str, torch.Tensor]:
    """Logits (N, L) of unit embeddings (N, D) from each task's cosine `cos` (N, L)
    (routing.prototypes) over `temp`; the best cosine and, given a precision matrix, the
    Mahalanobis score to the task means (L, D) (N,)."""
    out = {"logits": cos / temp, "cosine": cos.max(-1).values}
    if precision is not None:
        out["mahalanobis"] = cal.mahalanobis(vecs, means, precision)
    return out


def confidence(name: str, scored: dict[str, torch.Tensor], t: float) -> torch.Tensor:
    """Score `name` of `scored` (from `centroid_scores`) with temperature `t`: (N,)."""
    if name == "msp":
        return cal.msp(scored["logits"], t)
    if name == "margin":
        return cal.margin(scored["logits"], t)
    if name == "energy":
        return cal.energy(scored["logits"], t)
    return scored[name]


def fit_calibration(
    vecs: torch.Tensor,
    index: torch.Tensor,
    groups: list[str],
    n_labels: int,
    temp: float,
    score: str = "msp",
    target: float = 0.9,
    prototypes: tuple[torch.Tensor, torch.Tensor] | None = None,
    fixed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict | None:
    """Leave-one-group-out temperature and threshold (see the module docstring); None when no
    label has two groups (nothing can be held out). `prototypes`: each row's prototype (N,) and
    each prototype's label (P,) (routing.prototypes); default one per label. `fixed`: prototypes
    that are not rows (descriptions), kept in every fold."""
    labels_of: dict[str, set[int]] = {}
    for g, i in zip(groups, index.tolist(), strict=True):
        labels_of.setdefault(g, set()).add(i)
    per_label: dict[int, set[str]] = {}
    for g, ls in labels_of.items():
        for i in ls:
            per_label.setdefault(i, set()).add(g)
    held = sorted(g for g, ls in labels_of.items() if all(len(per_label[i]) >= 2 for i in ls))
    if not held:
        return None
    rows, owner = prototypes if prototypes is not None else (index, torch.arange(n_labels))
    logits, gold, extra = [], [], []
    for g in held:
        test = torch.tensor([x == g for x in groups])
        means, precision = cal.class_gaussian(vecs[~test], index[~test], n_labels)
        t = fit_prototypes(vecs[~test], rows[~test], owner, fixed)
        cos = task_cosines(vecs[test], t["sums"], t["counts"], t["owner"], n_labels)
        got = centroid_scores(vecs[test], cos, means, precision if score == "mahalanobis" else None, temp)
        logits.append(got["logits"])
        gold.append(index[test])
        extra.append(got.get(score, got["cosine"]))
    logits_t, gold_t = torch.cat(logits), torch.cat(gold)
    t = cal.fit_temperature(logits_t, gold_t)
    scored = {"logits": logits_t, score: torch.cat(extra)} if score in ("cosine", "mahalanobis") else {}
    values = confidence(score, scored | {"logits": logits_t}, t).tolist()
    correct = (logits_t.argmax(-1) == gold_t).tolist()
    return calibration_entry(score, t, values, correct, target, len(held), n_labels)


def calibration_entry(
    score: str, t: float, values: list[float], correct: list[bool], target: float, held: int, n_labels: int
) -> dict:
    """A manifest's `calibration`: the lowest threshold of `score` keeping `target` of the held-out
    routes right, with the temperature it was scored at and how the held-out rows fared."""
    threshold = cal.threshold_for_precision(values, correct, target)
    return {
        "score": score,
        "temperature": t,
        "threshold": threshold,
        "target_precision": target,
        "held_out_groups": held,
        "labels": n_labels,
        "held_out": cal.routed(values, correct, threshold) | {"top1": sum(correct) / len(correct)},
    }


def calibrated_msp(sel, calibration: dict | None) -> float | None:
    """A Selection's top probability at its calibration's temperature (its scores over the labels),
    for kinds that score no confidence of their own; None without an msp calibration."""
    if not calibration or not sel.scores or calibration.get("score") != "msp":
        return None
    logp = torch.tensor(sel.scores, dtype=torch.float64).clamp_min(1e-12).log()[None]  # (1, L)
    return float(cal.msp(logp, calibration["temperature"]))
