"""Evaluation: loss on the targets, and accuracy by scoring every candidate label."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorachain.data import Example, collate
from lorachain.models import device_of, logits_at


def _target_logprobs(model: nn.Module, seqs: list[Example], pad_id: int, batch_size: int):
    """Per batch: (target tokens per row, row index of each target token, its log-prob, whether it is
    the argmax)."""
    for k in range(0, len(seqs), batch_size):
        chunk = seqs[k : k + batch_size]
        batch = {k: v.to(device_of(model)) for k, v in collate(chunk, pad_id, classifier=False).items()}
        labels = batch["labels"]
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != -100  # position t predicts token t + 1
        logits = logits_at(model, batch["input_ids"], batch["attention_mask"], keep)  # (N, V)
        logp = F.log_softmax(logits.float(), dim=-1)
        gold = labels[:, 1:][keep[:, :-1]]  # (N,)
        tok = logp.gather(-1, gold.unsqueeze(-1)).squeeze(-1)  # (N,)
        counts = keep.sum(1).cpu()  # (B,)
        rows = torch.repeat_interleave(torch.arange(len(chunk)), counts)  # (N,)
        yield counts, rows, tok.cpu(), (logp.argmax(-1) == gold).cpu()


@torch.no_grad()
def sequence_logprobs(
    model: nn.Module, seqs: list[Example], pad_id: int, batch_size: int
) -> list[tuple[float, int]]:
    """(sum of target-token log-probs, number of target tokens) for each example."""
    out = []
    for counts, rows, tok, _ in _target_logprobs(model, seqs, pad_id, batch_size):
        sums = torch.zeros(len(counts)).index_add_(0, rows, tok)
        out += list(zip(sums.tolist(), counts.tolist(), strict=True))
    return out


@torch.no_grad()
def teacher_forced_accuracy(model: nn.Module, seqs: list[Example], pad_id: int, batch_size: int) -> dict:
    """Share of target tokens that are the argmax given the gold prefix (`token_acc`), and share of
    examples whose every target token is (`seq_acc`): exactly the examples greedy decoding
    reproduces in full, in one forward pass instead of one per token."""
    right = total = whole = 0
    for counts, rows, _, hit in _target_logprobs(model, seqs, pad_id, batch_size):
        right, total = right + int(hit.sum()), total + len(hit)
        misses = torch.zeros(len(counts), dtype=torch.long).index_add_(0, rows, (~hit).long())
        whole += int(((misses == 0) & (counts > 0)).sum())
    return {"token_acc": right / max(total, 1), "seq_acc": whole / max(len(seqs), 1)}


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
    with candidates or a classifier, accuracy; without candidates, teacher-forced token_acc and
    seq_acc."""
    was_training = model.training
    model.eval()
    try:
        if classifier:
            return _eval_classifier(model, examples, pad_id, batch_size)
        scored = sequence_logprobs(model, examples, pad_id, batch_size)
        nll, ntok = -sum(s for s, _ in scored), sum(n for _, n in scored)
        result = {"eval_loss": nll / max(ntok, 1), "eval_ppl": math.exp(min(nll / max(ntok, 1), 50))}
        if candidate_ids is None:
            result |= teacher_forced_accuracy(model, examples, pad_id, batch_size)
        else:
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
    logits = _classifier_logits(model, examples, pad_id, batch_size)  # (N, num_labels)
    labels = torch.tensor([e.labels[0] for e in examples])
    loss = F.cross_entropy(logits.float(), labels).item()
    return {"eval_loss": loss, "accuracy": accuracy(logits.argmax(-1).tolist(), [e.label for e in examples])}


def _classifier_logits(
    model: nn.Module, examples: list[Example], pad_id: int, batch_size: int
) -> torch.Tensor:
    """A sequence classifier's logits for every example, in batches: (N, num_labels) on the CPU."""
    device, out = device_of(model), []
    for k in range(0, len(examples), batch_size):
        batch = collate(examples[k : k + batch_size], pad_id, classifier=True)
        out.append(
            model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits.cpu()
        )
    return torch.cat(out)


def accuracy(preds: list[int], labels: list[int | None]) -> float:
    if not preds:
        raise ValueError("accuracy of no predictions")
    return sum(int(p == y) for p, y in zip(preds, labels, strict=True)) / len(preds)


# -- the paper's tasks: candidate scoring and greedy generation ------------------------------------


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _choice_pairs(
    tokenizer, examples: list, cand_ids: list[list[list[int]]], max_length: int
) -> tuple[list[Example], list[int]]:
    """(prompt + candidate) sequences of every example, and each example's candidate count."""
    pairs, counts = [], []
    for ex, cands in zip(examples, cand_ids, strict=True):
        room = max(1, max_length - max(len(c) for c in cands))
        prompt = tokenizer(ex.prompt)["input_ids"][-room:]
        pairs += [Example(prompt + c, [-100] * len(prompt) + c, None, len(prompt)) for c in cands]
        counts.append(len(cands))
    return pairs, counts


@torch.no_grad()
def choice_scores(
    model: nn.Module,
    tokenizer,
    examples: list,
    batch_size: int = 16,
    max_length: int = 512,
    mean: bool = False,
) -> list[list[float]]:
    """Log-likelihood of every candidate of every example (`mean`: per token, for candidates of
    different lengths). Sequences run in length-sorted batches, so padding stays small."""
    eos = [tokenizer.eos_token_id]  # an empty candidate is scored as the end of the text
    cand_ids = [
        [tokenizer(c, add_special_tokens=False)["input_ids"] or eos for c in e.candidates] for e in examples
    ]
    if all(len(c) == 1 for cands in cand_ids for c in cands):  # one forward per prompt scores them all
        return _next_token_scores(model, tokenizer, examples, cand_ids, batch_size, max_length)
    pairs, counts = _choice_pairs(tokenizer, examples, cand_ids, max_length)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].input_ids))
    scored: list[tuple[float, int]] = [(0.0, 1)] * len(pairs)
    pad = _pad_id(tokenizer)
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        for i, s in zip(idx, sequence_logprobs(model, [pairs[i] for i in idx], pad, len(idx)), strict=True):
            scored[i] = s
    out, pos = [], 0
    for n in counts:
        out.append([s / t if mean else s for s, t in scored[pos : pos + n]])
        pos += n
    return out


def _next_token_scores(
    model, tokenizer, examples, cand_ids, batch_size: int, max_length: int
) -> list[list[float]]:
    """Single-token candidates: log-probs of each candidate token after its prompt."""
    prompts = [tokenizer(e.prompt)["input_ids"][-(max_length - 1) :] for e in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = _pad_id(tokenizer)
    out: list[list[float]] = [[] for _ in examples]
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        chunk = [Example(prompts[i], list(prompts[i]), None, 0) for i in idx]
        batch = collate(chunk, pad, classifier=False)
        keep = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
        for row, i in enumerate(idx):
            keep[row, len(prompts[i]) - 1] = True
        device = device_of(model)
        logits = logits_at(
            model, batch["input_ids"].to(device), batch["attention_mask"].to(device), keep.to(device)
        )
        logp = F.log_softmax(logits.float(), dim=-1)  # (B, V): one row per prompt
        for row, i in enumerate(idx):
            out[i] = [logp[row, c[0]].item() for c in cand_ids[i]]
    return out


def reference_nll(model: nn.Module, tokenizer, examples: list, batch_size: int, max_length: int) -> float:
    """Mean NLL per token of each example's first reference answer after its prompt (GSM8K's
    reference solution): a smooth score of how well the model knows the answers."""
    refs = [[tokenizer(e.answers[0], add_special_tokens=False)["input_ids"]] for e in examples]
    seqs, _ = _choice_pairs(tokenizer, examples, refs, max_length)
    seqs = [Example(s.input_ids[:max_length], s.labels[:max_length], None, s.prompt_len) for s in seqs]
    pairs = sequence_logprobs(model, seqs, _pad_id(tokenizer), batch_size)
    return -sum(s for s, _ in pairs) / max(1, sum(n for _, n in pairs))


@torch.no_grad()
def generate_greedy(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 32,
    batch_size: int = 8,
    max_length: int = 512,
) -> list[str]:
    """Greedy continuations, cut at the first newline (left-padded batches)."""
    device = device_of(model)
    pad = _pad_id(tokenizer)
    encoded = [tokenizer(p)["input_ids"][-(max_length - max_new_tokens) :] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    texts = [""] * len(prompts)
    for k in range(0, len(order), batch_size):
        idx = order[k : k + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):  # left padding, so every row ends where generation starts
            ids[row, width - len(encoded[i]) :] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        for row, i in enumerate(idx):
            texts[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).split("\n")[0]
    return texts


def score_task(
    model: nn.Module,
    tokenizer,
    task,
    examples: list,
    batch_size: int = 16,
    max_length: int = 512,
    max_new_tokens: int = 32,
    classifier: bool = False,
) -> dict[str, float]:
    """The task's metric on `examples` (TaskExample): accuracy by candidate scoring, MultiRC's F1a
    over answer options, ReCoRD's EM/F1 of the best-scored entity, EM/F1 of greedy generation.
    `score` is the headline number (accuracy, F1 or F1 of EM/F1)."""
    from lorachain.metrics import best_over, binary_f1, char_accuracy, exact_match, number_match, token_f1

    was_training = model.training
    model.eval()
    ref: dict[str, float] = {}
    try:
        if task.kind == "generation":
            preds = generate_greedy(
                model,
                tokenizer,
                [e.prompt for e in examples],
                max_new_tokens,
                max(1, batch_size // 2),
                max_length,
            )
            answers = [[a.strip() for a in e.answers] for e in examples]
            ref = {"ref_nll": reference_nll(model, tokenizer, examples, batch_size, max_length)}
        elif classifier:
            scores = classifier_scores(model, tokenizer, examples, batch_size, max_length)
            choice = [max(range(len(s)), key=s.__getitem__) for s in scores]
            preds, answers = [], []
        else:
            scores = choice_scores(
                model, tokenizer, examples, batch_size, max_length, mean=task.kind == "multiple_choice"
            )
            choice = [max(range(len(s)), key=s.__getitem__) for s in scores]
            preds = [e.candidates[c] for e, c in zip(examples, choice, strict=True)]
            answers = [e.answers for e in examples]
        if task.metric == "char_em":  # the capacity task: value characters and whole values right
            values = [a[0] for a in answers]
            char = sum(char_accuracy(p, v) for p, v in zip(preds, values, strict=True)) / len(values)
            em = sum(p.strip() == v for p, v in zip(preds, values, strict=True)) / len(values)
            return {"char_acc": char, "em": em, "score": char, "n": len(examples)} | ref
        if task.metric == "number_em":  # GSM8K: the final number of the solution
            em = sum(number_match(p, a[0]) for p, a in zip(preds, answers, strict=True)) / len(preds)
            return {"em": em, "score": em, "n": len(examples)} | ref
        if task.metric == "em_f1":
            if task.kind != "generation":  # ReCoRD: the entity in the chosen candidate
                preds = [_entity(e, c) for e, c in zip(examples, choice, strict=True)]
            em = sum(best_over(exact_match, p, a) for p, a in zip(preds, answers, strict=True)) / len(preds)
            f1 = sum(best_over(token_f1, p, a) for p, a in zip(preds, answers, strict=True)) / len(preds)
            return {"em": em, "f1": f1, "score": f1, "n": len(examples)} | ref
        golds = [e.gold for e in examples]
        acc = accuracy(choice, golds)
        if task.metric == "f1":
            f1 = binary_f1(choice, golds)
            return {"f1": f1, "accuracy": acc, "score": f1, "n": len(examples)}
        return {"accuracy": acc, "score": acc, "n": len(examples)}
    finally:
        model.train(was_training)


@torch.no_grad()
def classifier_scores(model: nn.Module, tokenizer, examples: list, batch_size: int, max_length: int) -> list:
    """A sequence classifier's logits for every example's prompt."""
    encoded = [
        Example(ids := tokenizer(e.prompt)["input_ids"][:max_length], [0], 0, len(ids)) for e in examples
    ]
    return _classifier_logits(model, encoded, tokenizer.pad_token_id, batch_size).tolist()


def _entity(example, choice: int) -> str:
    """The entity a ReCoRD candidate fills in: the candidate minus the query's suffix."""
    cands = example.candidates
    suffix = cands[0]
    for c in cands[1:]:  # the longest common suffix of the candidates is the query's rest
        while not c.endswith(suffix):
            suffix = suffix[1:]
    text = cands[choice]
    return text[: len(text) - len(suffix)].strip() if suffix else text.strip()
