"""Evaluation: loss on the targets, and accuracy by scoring every candidate label."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorachain.data import Example, collate
from lorachain.models import device_of


@torch.no_grad()
def sequence_logprobs(
    model: nn.Module, seqs: list[Example], pad_id: int, batch_size: int
) -> list[tuple[float, int]]:
    """(sum of target-token log-probs, number of target tokens) for each example."""
    out = []
    for k in range(0, len(seqs), batch_size):
        chunk = seqs[k : k + batch_size]
        batch = {k: v.to(device_of(model)) for k, v in collate(chunk, pad_id, classifier=False).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
        labels = batch["labels"][:, 1:]  # (B, T-1)
        mask = labels != -100
        tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        out += list(zip(tok.sum(1).tolist(), mask.sum(1).tolist(), strict=True))
    return out


@torch.no_grad()
def continuation_logprobs(model: nn.Module, prompt: list[int], continuations: list[list[int]]) -> list[float]:
    """Sum of log-probs of each continuation after one shared prompt: the prompt runs once, its KV
    cache is repeated for the continuations, which run as one right-padded batch."""
    device = device_of(model)
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    first = F.log_softmax(out.logits[0, -1].float(), dim=-1)  # (V,) predicts each first token
    n, width = len(continuations), max(len(c) for c in continuations)
    if width == 1:
        return [first[c[0]].item() for c in continuations]
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)
    ids = torch.zeros((n, width), dtype=torch.long)
    mask = torch.ones((n, len(prompt) + width), dtype=torch.long)
    for i, c in enumerate(continuations):
        ids[i, : len(c)] = torch.tensor(c)
        mask[i, len(prompt) + len(c) :] = 0
    ids, mask = ids.to(device), mask.to(device)
    logp = F.log_softmax(model(input_ids=ids, attention_mask=mask, past_key_values=cache).logits.float(), -1)
    scores = []
    for i, c in enumerate(continuations):  # position j of the batch predicts token j + 1
        rest = sum(logp[i, j - 1, c[j]].item() for j in range(1, len(c)))
        scores.append(first[c[0]].item() + rest)
    return scores


def with_target(e: Example, target_ids: list[int]) -> Example:
    prompt = e.input_ids[: e.prompt_len]
    return Example(prompt + target_ids, [-100] * len(prompt) + target_ids, e.label, len(prompt))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    examples: list[Example],
    pad_id: int,
    batch_size: int,
    classifier: bool,
    candidate_ids: list[list[int]] | None = None,
) -> dict[str, float]:
    """eval_loss (mean NLL per target token, or cross-entropy per example for classifiers) and,
    with candidates or a classifier, accuracy."""
    was_training = model.training
    model.eval()
    try:
        if classifier:
            return _eval_classifier(model, examples, pad_id, batch_size)
        scored = sequence_logprobs(model, examples, pad_id, batch_size)
        nll, ntok = -sum(s for s, _ in scored), sum(n for _, n in scored)
        result = {"eval_loss": nll / max(ntok, 1), "eval_ppl": math.exp(min(nll / max(ntok, 1), 50))}
        if candidate_ids is not None:
            pairs = [with_target(e, c) for e in examples for c in candidate_ids]
            scores = sequence_logprobs(model, pairs, pad_id, batch_size)
            k = len(candidate_ids)
            preds = [max(range(k), key=lambda j, i=i: scores[i * k + j][0]) for i in range(len(examples))]
            result["accuracy"] = accuracy(preds, [e.label for e in examples])
        return result
    finally:
        model.train(was_training)


def _eval_classifier(
    model: nn.Module, examples: list[Example], pad_id: int, batch_size: int
) -> dict[str, float]:
    losses, preds = [], []
    for k in range(0, len(examples), batch_size):
        batch = {
            k2: v.to(device_of(model))
            for k2, v in collate(examples[k : k + batch_size], pad_id, True).items()
        }
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses += F.cross_entropy(logits.float(), batch["labels"], reduction="none").tolist()
        preds += logits.argmax(-1).tolist()
    return {"eval_loss": sum(losses) / len(losses), "accuracy": accuracy(preds, [e.label for e in examples])}


def accuracy(preds: list[int], labels: list[int | None]) -> float:
    if not preds:
        raise ValueError("accuracy of no predictions")
    return sum(int(p == y) for p, y in zip(preds, labels, strict=True)) / len(preds)


def predict_choices(
    model: nn.Module, tokenizer, prompts: list[str], candidates: list[list[str]]
) -> list[int]:
    """For each prompt, the index of its most likely candidate continuation (sum of token
    log-probs; the prompt runs once and its KV cache serves every candidate)."""
    model.eval()
    preds = []
    for prompt, cands in zip(prompts, candidates, strict=True):
        ids = tokenizer(prompt)["input_ids"]
        cand_ids = [
            tokenizer(c, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id] for c in cands
        ]
        scores = continuation_logprobs(model, ids, cand_ids)
        preds.append(max(range(len(cands)), key=scores.__getitem__))
    return preds
