"""Turning a selector's output into ranked task labels. Loads no weights itself.

`generate` mode (the paper): find labels in the generated text with KMP, first occurrence first.
`score` mode: the log-likelihood of every label under the selector, normalised over the labels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def kmp_table(pattern: str) -> list[int]:
    """Failure function: length of the longest proper prefix that is also a suffix, per prefix."""
    table = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = table[k - 1]
        if pattern[i] == pattern[k]:
            k += 1
        table[i] = k
    return table


def kmp_find_all(text: str, pattern: str) -> list[int]:
    """Start positions of every occurrence of `pattern` in `text` (Knuth–Morris–Pratt)."""
    if not pattern:
        return []
    table, hits, k = kmp_table(pattern), [], 0
    for i, ch in enumerate(text):
        while k and ch != pattern[k]:
            k = table[k - 1]
        if ch == pattern[k]:
            k += 1
        if k == len(pattern):
            hits.append(i - k + 1)
            k = table[k - 1]
    return hits


def match_labels(text: str, labels: list[str]) -> list[str]:
    """Labels found in `text` (case-insensitive), ordered by first occurrence; where matches
    overlap, the longer label wins (so "qa" inside "closed_book_qa" does not count)."""
    low = text.lower()
    hits = [(pos, -len(lab), lab) for lab in labels for pos in kmp_find_all(low, lab.lower())]
    taken: list[tuple[int, int]] = []
    ranked: list[str] = []
    for pos, neg_len, lab in sorted(hits):
        span = (pos, pos - neg_len)
        if any(span[0] < end and start < span[1] for start, end in taken):
            continue
        taken.append(span)
        if lab not in ranked:
            ranked.append(lab)
    return ranked


@dataclass
class Selection:
    """A routing decision: ranked labels (best first) with scores, and the adapter chosen."""

    ranked: list[str]
    scores: list[float] = field(default_factory=list)  # probabilities (score) or empty (generate)
    text: str = ""  # what the selector generated (generate mode)
    adapter: str = ""
    fallback: str | None = None  # why the fallback adapter was used, if it was
    in_distribution: float | None = None  # the store's calibrated confidence score, if it has one
    second: Selection | None = None  # the second opinion's selection (`selector.second_opinion`)

    def top(self, k: int) -> list[dict]:
        if self.scores:
            return [{"task": t, "score": s} for t, s in zip(self.ranked[:k], self.scores[:k], strict=True)]
        return [{"task": t, "score": None} for t in self.ranked[:k]]


def rank_scores(labels: list[str], logprobs: list[float]) -> tuple[list[str], list[float]]:
    """Labels sorted by log-likelihood, with probabilities normalised over the label set."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    order = sorted(range(len(labels)), key=lambda i: -logprobs[i])
    return [labels[i] for i in order], [weights[i] / total for i in order]


def decide(
    sel: Selection,
    adapters: set[str],
    fallback: str,
    min_confidence: float,
    min_in_distribution: float | None = None,
    min_second: float | None = None,
) -> Selection:
    """Choose the adapter for `sel`: its top label, or `fallback` when nothing matched, the top
    label has no adapter, its probability is below `min_confidence`, or its calibrated confidence
    score is below `min_in_distribution` (an instruction unlike the selector's training rows).
    With a second opinion (`sel.second`): the fallback unless both name the same task and either
    score clears its own threshold (`min_in_distribution`, `min_second`; none set: agreement)."""
    low = min_in_distribution is not None and sel.in_distribution is not None
    if sel.second is not None and sel.ranked:
        return _decide_two(sel, adapters, fallback, min_confidence, (min_in_distribution, min_second))
    if not sel.ranked:
        sel.adapter, sel.fallback = fallback, "no task label found in the selector's output"
    elif sel.scores and sel.scores[0] < min_confidence:
        sel.adapter = fallback
        sel.fallback = f"top task {sel.ranked[0]!r} has probability {sel.scores[0]:.3f} < {min_confidence}"
    elif low and sel.in_distribution < min_in_distribution:
        sel.adapter = fallback
        sel.fallback = (
            f"top task {sel.ranked[0]!r}: confidence score {sel.in_distribution:.3f} < "
            f"min_in_distribution {min_in_distribution:.3f}"
        )
    elif sel.ranked[0] not in adapters:
        sel.adapter, sel.fallback = fallback, f"no adapter for task {sel.ranked[0]!r}"
    else:
        sel.adapter = sel.ranked[0]
    return sel


def _decide_two(
    sel: Selection, adapters: set[str], fallback: str, min_confidence: float, floors
) -> Selection:
    other = sel.second.ranked[0] if sel.second.ranked else None
    pairs = [
        (v, t) for v, t in zip((sel.in_distribution, sel.second.in_distribution), floors) if t is not None
    ]
    sure = not pairs or any(v is not None and v >= t for v, t in pairs)
    sel.adapter = fallback
    if sel.scores and sel.scores[0] < min_confidence:
        sel.fallback = f"top task {sel.ranked[0]!r} has probability {sel.scores[0]:.3f} < {min_confidence}"
    elif other != sel.ranked[0]:
        sel.fallback = f"the selector names {sel.ranked[0]!r}, its second opinion {other!r}"
    elif not sure:
        sel.fallback = f"both name {other!r}, but neither clears its confidence threshold"
    elif sel.ranked[0] not in adapters:
        sel.fallback = f"no adapter for task {sel.ranked[0]!r}"
    else:
        sel.adapter = sel.ranked[0]
    return sel
