"""Selector kinds: how a store turns instructions into ranked task labels. One register call each.

- `lora` (the paper): a task-selection LoRA on the base, `score` or `generate` mode; trained with
  the task adapters by `route train`, held by the Router as one more adapter.
- `full`: a fully fine-tuned copy of the base (the paper's Table III), scored like `lora`; the
  Router holds it as a second model (as much memory again as the base).
- `encoder`: a small encoder (all-MiniLM-L6-v2 by default, any HF encoder by name) with a
  classification head, fully fine-tuned by the one training loop (`model.task: classification`).
- `embedding`: no training: cosine similarity of a sentence encoder's mean-pooled, L2-normalised
  embedding to each task's centroid, softmax with a temperature. `route add` adds a task.

A kind's `fit(cfg, root, labels, model, tokenizer, progress)` writes STORE/selector/ and returns the
manifest's `selector` entry; its `load(router, folder, entry)` returns `select(instructions)`.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from lorachain.config import ConfigError
from lorachain.routing.calibrate import class_gaussian
from lorachain.routing.confidence import centroid_scores, confidence, fit_calibration
from lorachain.routing.encoders import clip, embed, load_encoder
from lorachain.routing.other import OTHER, selector_splits_dir
from lorachain.routing.prototypes import (
    description_prototypes,
    fit_prototypes,
    prototype_index,
    stored_prototypes,
    task_cosines,
    task_means,
)
from lorachain.routing.select import Selection, rank_scores
from lorachain.store import StoreError, file_hashes, fingerprint

SELECTOR_DIR = "selector"


@dataclass(frozen=True)
class Kind:
    name: str
    fit: Callable | None  # None: trained as the `_selector` adapter with the task adapters
    load: Callable | None  # None: the Router's own `_selector` adapter
    summary: str = ""


KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    if kind.name in KINDS:
        raise ValueError(f"selector kind {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


def kind_names() -> list[str]:
    return sorted(KINDS)


def get_kind(name: str, where: str = "selector.kind") -> Kind:
    """The registered kind `name`; an unknown one fails with one line naming it."""
    if name not in KINDS:
        raise ConfigError(f"{where}: unknown selector kind {name!r}; known: {kind_names()}")
    return KINDS[name]


# -- shared pieces -------------------------------------------------------------------------------
@torch.no_grad()
def batch_logprobs(model, prompts: list[list[int]], conts: list[list[int]]) -> torch.Tensor:
    """Sum of log-probs of every continuation after every prompt, (P, C): the prompts run as one
    left-padded batch (positions count real tokens only), their KV cache is repeated for the
    continuations of two or more tokens, which run right-padded as a second batch without their
    last token (the first token of each is scored by the prompt pass)."""
    device = next(model.parameters()).device
    n, width = len(prompts), max(map(len, prompts))
    ids = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (P, T)
    kw = dict(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    try:  # the LM head on the last position only: ~20% of a prompt pass on SmolLM2
        out = model(**kw, logits_to_keep=1)
    except TypeError:  # a model without logits_to_keep
        out = model(**kw)
    first = F.log_softmax(out.logits[:, -1].float(), dim=-1)  # (P, V) predicts each first token
    heads = torch.tensor([c[0] for c in conts], device=device)
    scores = first[:, heads]  # (P, C)
    multi = [j for j, c in enumerate(conts) if len(c) > 1]  # only these need a second pass
    if not multi:
        return scores
    k, cw = len(multi), max(len(conts[j]) for j in multi) - 1
    out.past_key_values.batch_repeat_interleave(k)
    cids = torch.zeros((k, cw), dtype=torch.long)  # each label but its last token: nothing reads it
    targets = torch.zeros((k, cw), dtype=torch.long)  # what each position predicts
    cmask = torch.zeros((k, cw), dtype=torch.long)
    for i, j in enumerate(multi):
        c = conts[j]
        cids[i, : len(c) - 1], targets[i, : len(c) - 1] = torch.tensor(c[:-1]), torch.tensor(c[1:])
        cmask[i, : len(c) - 1] = 1
    cids, targets, cmask = (t.to(device).repeat(n, 1) for t in (cids, targets, cmask))  # (P*K, W)
    full = torch.cat([mask.repeat_interleave(k, 0), cmask], dim=1)  # (P*K, T + W)
    cpos = pos[:, -1:].repeat_interleave(k, 0) + 1 + torch.arange(cw, device=device)  # (P*K, W)
    cache = out.past_key_values
    logits = model(input_ids=cids, attention_mask=full, position_ids=cpos, past_key_values=cache).logits
    logp = F.log_softmax(logits.float(), dim=-1)  # (P*K, W, V)
    rest = logp.gather(-1, targets[..., None]).squeeze(-1) * cmask  # (P*K, W)
    scores[:, multi] += rest.sum(-1).view(n, k)
    return scores


@torch.no_grad()
def label_ids(tok, labels: list[str]) -> list[list[int]]:
    """Token ids of each label as `score_labels` scores it (after a space)."""
    return [tok(f" {x}", add_special_tokens=False)["input_ids"] for x in labels]


def score_labels(
    model,
    tok,
    select_cfg,
    label_ids: list[list[int]],
    labels: list[str],
    texts: list[str],
    batch_size: int = 8,
):
    """`score` mode: each label's log-likelihood after the task prompt, normalised over labels;
    `batch_size` instructions of similar length per forward pass (1: one at a time)."""
    from lorachain.data import prompt_ids

    reserve = max(map(len, label_ids))
    prompts = [prompt_ids(select_cfg, tok, {"instruction": x}, reserve) for x in texts]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # batches of like lengths
    rows: list[list[float]] = [[] for _ in prompts]
    step = max(batch_size, 1)
    for k in range(0, len(order), step):
        idx = order[k : k + step]
        scores = batch_logprobs(model, [prompts[i] for i in idx], label_ids)  # (B, L)
        for i, row in zip(idx, scores.tolist(), strict=True):
            rows[i] = row
    return [Selection(*rank_scores(labels, row)) for row in rows]


def ranked(labels: list[str], probs: torch.Tensor) -> list[Selection]:
    """One Selection per row of `probs` (N, L): labels best first with their probabilities."""
    out = []
    for row in probs.tolist():
        order = sorted(range(len(labels)), key=lambda i: -row[i])
        out.append(Selection([labels[i] for i in order], [row[i] for i in order]))
    return out


def read_split(root: Path, part: str, folder: Path | None = None) -> list[dict]:
    folder = folder or root / "splits"
    return [json.loads(x) for x in (folder / f"{part}.jsonl").read_text().splitlines() if x]


def entry_for(root: Path, kind: str, **settings) -> dict:
    folder = root / SELECTOR_DIR
    return {"kind": kind, "path": SELECTOR_DIR, "files": file_hashes(folder, root), **settings}


def check_labels(root: Path, found: list[str], labels: list[str]) -> None:
    """Refuse a selector whose label set differs from the store's task adapters (but for `other`,
    which the fallback answers: `selector.other_datasets`)."""
    if sorted(x for x in found if x != OTHER) != sorted(labels):
        extra, missing = sorted(set(found) - set(labels)), sorted(set(labels) - set(found))
        raise StoreError(
            f"{root / 'manifest.json'}: the selector's labels do not match the task adapters "
            f"(selector only: {extra}; adapters only: {missing})"
        )


# -- lora ----------------------------------------------------------------------------------------
register(Kind("lora", None, None, "task-selection LoRA on the base (the paper), score or generate mode"))


# -- embedding -----------------------------------------------------------------------------------
def embedding_probs(vecs: torch.Tensor, t: dict[str, torch.Tensor], n_labels: int, temp: float):
    """Softmax over each task's cosine (routing.prototypes) of the embeddings (N, D): (N, L). `t`
    holds the prototypes' sums, counts and owners (`fit_prototypes`, `stored_prototypes`)."""
    return torch.softmax(task_cosines(vecs, t["sums"], t["counts"], t["owner"], n_labels) / temp, dim=-1)


def fit_embedding(cfg, root: Path, labels: list[str], model=None, tokenizer=None, progress=True) -> dict:
    from safetensors.torch import save_file

    sel = cfg.selector
    t0 = time.perf_counter()
    enc, tok = load_encoder(sel.encoder)
    rows = read_split(root, "train", selector_splits_dir(root))
    vecs = embed(enc, tok, [r["instruction"] for r in rows], sel.max_length, sel.truncation)  # (N, D)
    tasks, groups = [r["task"] for r in rows], [r.get("dataset", "") for r in rows]
    unknown = sorted(set(sel.descriptions or {}) - set(labels))
    if unknown:
        raise ConfigError(f"selector.descriptions: no task {unknown[0]!r} in the data; tasks: {labels}")
    proto, owner = prototype_index(tasks, groups, labels, sel.prototypes)
    fixed = description_prototypes(
        sel.descriptions, labels, lambda texts: embed(enc, tok, texts, sel.max_length, sel.truncation)
    )
    tensors = fit_prototypes(vecs, proto, owner, fixed)
    index = torch.tensor([labels.index(t) for t in tasks])
    confidence_of = (sel.temperature, sel.confidence, sel.target_precision)
    calibration = fit_calibration(vecs, index, groups, len(labels), *confidence_of, (proto, owner), fixed)
    if calibration and sel.confidence == "mahalanobis":
        tensors["precision"] = class_gaussian(vecs, index, len(labels))[1]  # (D, D)
    (root / SELECTOR_DIR).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(root / SELECTOR_DIR / "centroids.safetensors"))
    settings = {"encoder": sel.encoder, "encoder_fingerprint": fingerprint(enc), "labels": labels}
    settings |= {"temperature": sel.temperature, "max_length": sel.max_length, "truncation": sel.truncation}
    settings |= {"prototypes": sel.prototypes, "descriptions": sel.descriptions}
    settings["calibration"] = calibration  # None: no task has two data sets to hold one out
    return entry_for(root, "embedding", **settings, summary={"wall_seconds": time.perf_counter() - t0})


def load_embedding(router, folder: Path, entry: dict) -> Callable:
    from safetensors.torch import load_file

    enc, tok = load_encoder(entry["encoder"])
    if entry.get("encoder_fingerprint") and fingerprint(enc) != entry["encoder_fingerprint"]:
        raise StoreError(f"{folder}: encoder {entry['encoder']!r} has other weights than the one used to fit")
    check_labels(router.root, entry["labels"], router.labels)
    t = stored_prototypes(load_file(str(folder / "centroids.safetensors")), len(entry["labels"]))
    labels, temp, max_length = entry["labels"], entry["temperature"], entry["max_length"]
    truncation = entry.get("truncation", "head")  # stores fitted before the setting read the head
    calib = entry.get("calibration") or {}
    scale = calib.get("temperature", 1.0)  # temperature scaling fitted on held-out data sets

    def select(texts: list[str]) -> list[Selection]:
        vecs = embed(enc, tok, texts, max_length, truncation)  # (N, D)
        out = ranked(labels, embedding_probs(vecs, t, len(labels), temp * scale))
        if calib:
            rows = t["described"] == 0  # fitted to rows
            means = task_means(t["sums"][rows], t["counts"][rows], t["owner"][rows], len(labels))  # (L, D)
            cos = task_cosines(vecs, t["sums"], t["counts"], t["owner"], len(labels))
            scored = centroid_scores(vecs, cos, means, t.get("precision"), temp)
            for sel, v in zip(out, confidence(calib["score"], scored, scale).tolist(), strict=True):
                sel.in_distribution = v
        return out

    select.memory_params = sum(p.numel() for p in enc.parameters())
    return select


register(
    Kind("embedding", fit_embedding, load_embedding, "nearest task (or data set) centroid of embeddings")
)


# -- encoder -------------------------------------------------------------------------------------
ENCODER_BUDGET = {"epochs": 4.0, "batch_size": 16, "max_steps": None}  # measured: README, routing_holdout/


def encoder_budget(cfg):
    """The encoder's training budget: `selector_train` if given, else `train` (precision, seed,
    checkpoints) with ENCODER_BUDGET's epochs and batch: the answer adapters' budget starves a
    22M-parameter classifier (held out 0.779 at 2 epochs, in distribution 0.868)."""
    return cfg.selector_train or replace(cfg.train, **ENCODER_BUDGET)


def clipped_splits(root: Path, sel) -> Path:
    """The store's train/val splits with each instruction clipped as the encoder will read it."""
    from transformers import AutoTokenizer

    from lorachain.config import ModelConfig
    from lorachain.io import write_text
    from lorachain.models import resolve_path

    if sel.truncation == "head":
        return selector_splits_dir(root)
    tok = AutoTokenizer.from_pretrained(resolve_path(ModelConfig(name_or_path=sel.encoder)))
    out = root / "runs" / "_selector_encoder_splits"
    out.mkdir(parents=True, exist_ok=True)
    for part in ("train", "val"):
        rows = read_split(root, part, selector_splits_dir(root))
        texts = clip(tok, [r["instruction"] for r in rows], sel.max_length, sel.truncation)
        body = "".join(json.dumps(r | {"instruction": t}) + "\n" for r, t in zip(rows, texts, strict=True))
        write_text(out / f"{part}.jsonl", body)
    return out


def fit_encoder(cfg, root: Path, labels: list[str], model=None, tokenizer=None, progress=True) -> dict:
    from lorachain.config import ChainConfig, DataConfig, LinkConfig, ModelConfig, RunConfig
    from lorachain.training.loop import train

    sel, splits = cfg.selector, clipped_splits(root, cfg.selector)
    run = RunConfig(
        model=ModelConfig(name_or_path=sel.encoder, task="classification", num_labels=len(labels)),
        data=DataConfig(
            train=str(splits / "train.jsonl"),
            eval=str(splits / "val.jsonl"),
            prompt="{instruction}",
            label_field="task",
            label_words={x: x for x in labels},
            max_length=sel.max_length,
            max_eval_rows=cfg.data.max_eval_rows,
        ),
        chain=ChainConfig(links=[LinkConfig()], method="full"),
        optim=replace(cfg.optim, lr=sel.lr),
        train=encoder_budget(cfg),
        output_dir=str(root / "runs" / "_selector_encoder"),
    )
    result = train(run, progress=progress)  # a finished run returns its summary
    if result.summary.get("status") == "interrupted":
        return {}
    dst = root / SELECTOR_DIR
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(Path(run.output_dir) / "merged", dst)
    s = result.summary
    summary = {k: s.get(k) for k in ("train_examples", "total_steps", "wall_seconds", "final_eval")}
    settings = {"encoder": sel.encoder, "labels": labels, "max_length": sel.max_length}
    settings["truncation"] = sel.truncation
    return entry_for(root, "encoder", **settings, summary=summary)


def load_encoder_head(router, folder: Path, entry: dict) -> Callable:
    model, tok = load_encoder(str(folder), head=True)
    check_labels(router.root, entry["labels"], router.labels)
    if model.config.num_labels != len(entry["labels"]):
        raise StoreError(f"{folder}: {model.config.num_labels} classes, but {len(entry['labels'])} labels")
    labels, max_length, truncation = entry["labels"], entry["max_length"], entry.get("truncation", "head")

    @torch.no_grad()
    def select(texts: list[str]) -> list[Selection]:
        texts = clip(tok, texts, max_length, truncation)
        enc = tok(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return ranked(labels, torch.softmax(model(**enc).logits.float(), dim=-1))  # (N, L)

    select.memory_params = sum(p.numel() for p in model.parameters())
    return select


register(Kind("encoder", fit_encoder, load_encoder_head, "small encoder + classification head, fine-tuned"))


# -- full ----------------------------------------------------------------------------------------
def fit_full(cfg, root: Path, labels: list[str], model=None, tokenizer=None, progress=True) -> dict:
    """The `_selector` run of the store, as full fine-tuning of the base (in place: the caller
    restores the base afterwards), at `selector.lr`; the merged model becomes STORE/selector/."""
    from lorachain.routing.runs import adapter_runs
    from lorachain.store import SELECTOR
    from lorachain.training.loop import train

    _, run = adapter_runs(cfg, root, labels)[SELECTOR]
    chain = replace(run.chain, method="full", links=run.chain.links[:1])
    out = root / "runs" / "_selector_full"
    run = replace(run, chain=chain, optim=replace(cfg.optim, lr=cfg.selector.lr), output_dir=str(out))
    result = train(run, model, tokenizer, progress=progress)
    if result.summary.get("status") == "interrupted":
        return {}
    shutil.rmtree(root / SELECTOR_DIR, ignore_errors=True)
    shutil.copytree(out / "merged", root / SELECTOR_DIR)
    s = result.summary
    summary = {k: s.get(k) for k in ("train_examples", "total_steps", "wall_seconds", "final_eval")}
    return entry_for(root, "full", labels=labels, summary=summary)


def load_full(router, folder: Path, entry: dict) -> Callable:
    from transformers import AutoModelForCausalLM

    from lorachain.models import DTYPES, best_device

    check_labels(router.root, entry["labels"], router.labels)
    try:
        dtype = DTYPES[router.manifest.base_model.get("dtype", "float32")]
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval().to(best_device())
    except (OSError, ValueError) as e:
        raise StoreError(f"{folder}: the fully fine-tuned selector cannot be loaded ({e})") from None

    def select(texts: list[str]) -> list[Selection]:
        return score_labels(model, router.tok, router.select_cfg, router.label_ids, router.labels, texts)

    select.memory_params = sum(p.numel() for p in model.parameters())  # a second copy of the base
    return select


register(Kind("full", fit_full, load_full, "fully fine-tuned copy of the base, score mode (Table III)"))
