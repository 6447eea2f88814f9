"""Pure metric functions: perplexity, accuracy, top-k, exact match, token F1, ROUGE-L."""

from __future__ import annotations

import math
import re
import string
from collections import Counter


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp of the mean negative log-likelihood per token (natural log)."""
    if n_tokens <= 0:
        raise ValueError("perplexity of no tokens")
    return math.exp(nll_sum / n_tokens)


def top_k_accuracy(ranked: list[list[str]], gold: list[str], k: int) -> float:
    """Share of examples whose gold label is among the first k ranked labels."""
    if not gold:
        raise ValueError("top-k accuracy of no examples")
    return sum(g in r[:k] for r, g in zip(ranked, gold, strict=True)) / len(gold)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def char_accuracy(prediction: str, reference: str) -> float:
    """Share of `reference`'s characters that `prediction` (stripped) has at the same position."""
    return sum(a == b for a, b in zip(prediction.strip(), reference, strict=False)) / max(len(reference), 1)


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> str | None:
    """The answer number of a maths solution: the first number after the last `####`, else the
    last number in the text; commas and a trailing `.0` dropped (GSM8K's convention)."""
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    found = NUMBER.findall(tail)
    if not found:
        return None
    number = (found[0] if "####" in text else found[-1]).replace(",", "")
    return number[:-2] if number.endswith(".0") else number


def number_match(prediction: str, reference: str) -> float:
    """1.0 when both texts end in the same answer number (GSM8K exact match)."""
    gold = final_number(reference)
    return float(gold is not None and final_number(prediction) == gold)


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) over normalised word tokens."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs(pred, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(pred), lcs / len(ref)
    return 2 * p * r / (p + r)


def best_over(metric, prediction: str, references: list[str]) -> float:
    """A metric against several references: the best match counts (SQuAD, ReCoRD)."""
    if not references:
        raise ValueError("no references")
    return max(metric(prediction, r) for r in references)


def binary_f1(preds: list[int], golds: list[int]) -> float:
    """F1 of the positive class (MultiRC's F1a over all answer options)."""
    tp = sum(p == g == 1 for p, g in zip(preds, golds, strict=True))
    fp = sum(p == 1 and g == 0 for p, g in zip(preds, golds, strict=True))
    fn = sum(p == 0 and g == 1 for p, g in zip(preds, golds, strict=True))
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def paired_bootstrap(diffs: list[float], resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean of paired per-row differences and its percentile bootstrap interval (rows resampled
    with replacement, seeded): {"n", "mean", "low", "high"}; low/high None for no rows."""
    import random

    n = len(diffs)
    if not n:
        return {"n": 0, "mean": None, "low": None, "high": None}
    rng = random.Random(seed)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    lo, hi = means[int(tail * (resamples - 1))], means[round((1 - tail) * (resamples - 1))]
    return {"n": n, "mean": sum(diffs) / n, "low": lo, "high": hi}
