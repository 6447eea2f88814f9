"""Folds of grouped rows, and one selector kind fitted on a fold's rows.

A row carries its label and its group (a data set, a template); folds hold groups out. `Fitter`
fits a kind by its own code (`routing.selectors`), the LoRA selector by the store's run config
(`adapter_runs`), and keeps what it can reuse between folds. The store's second opinion
(`routing.second_opinion`) calibrates on a fold; the evaluation protocols (`routing.eval`) build
on the same machinery.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from lorachain.io import write_text
from lorachain.routing.augment import augment_rows
from lorachain.routing.balance import balance_rows
from lorachain.routing.config import RouteConfig
from lorachain.routing.encoders import embed, load_encoder
from lorachain.routing.prototypes import description_prototypes, fit_prototypes, prototype_index
from lorachain.routing.selectors import embedding_probs, get_kind, label_ids, ranked, score_labels
from lorachain.store import SELECTOR


@dataclass
class Row:
    text: str
    label: str
    group: str
    dataset: str = ""  # the row's data set, for `selector.prototypes: dataset`


def train_rows(cfg: RouteConfig, rows: list[Row]) -> list[Row]:
    """What a fold's selector learns from: `rows` balanced by `data.balance` as `route train`
    balances a store's rows (the held-out group is the data set)."""
    d = cfg.data
    group = (lambda r: r.group.split("/")[0]) if d.balance != "dataset" else (lambda r: r.group)
    return balance_rows(rows, d.balance, d.max_per_task, d.max_per_dataset, d.seed, lambda r: r.label, group)


def make_folds(rows: list[Row], scheme: str) -> tuple[list[list[str]], list[str]]:
    """Held-out group lists, and the labels that have a single group (not held out)."""
    groups: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        groups[r.label].add(r.group)
    many = {lab: sorted(gs) for lab, gs in sorted(groups.items()) if len(gs) >= 2}
    single = sorted(lab for lab, gs in groups.items() if len(gs) < 2)
    if scheme == "one":
        return [[g] for gs in many.values() for g in gs], single
    rounds = max((len(gs) for gs in many.values()), default=0)
    return [[gs[i] for gs in many.values() if i < len(gs)] for i in range(rounds)], single


def selection_logits(select, texts: list[str], labels: list[str], batch: int = 8) -> torch.Tensor:
    """A fitted kind's ranked probabilities for `texts` as log-probabilities (N, L)."""
    logits = torch.full((len(texts), len(labels)), -1e4)
    for k in range(0, len(texts), batch):
        for i, s in enumerate(select(texts[k : k + batch]), k):
            for lab, p in zip(s.ranked, s.scores, strict=True):
                logits[i, labels.index(lab)] = torch.log(torch.tensor(max(p, 1e-12)))
    return logits


class Fitter:
    """Fits one selector kind on a list of rows and returns `select(texts)`; keeps what it can
    reuse between folds (the encoder and its embeddings, the base model)."""

    def __init__(self, kind: str, cfg: RouteConfig, work: Path) -> None:
        self.kind, self.cfg, self.work, self.cache = get_kind(kind), cfg, work, {}
        self.embed_s_per_row = 0.0

    def fit(self, rows: list[Row], labels: list[str]):
        sel = self.cfg.selector
        if sel.augment:  # re-templated copies of the training rows (routing.augment), as route train
            rows = augment_rows(rows, sel.augment, sel.augment_styles, self.cfg.data.seed, "text")
        if self.kind.name == "embedding":
            return self._embedding(rows, labels)
        work = self.work / self.kind.name
        shutil.rmtree(work, ignore_errors=True)  # a fold always trains afresh
        rng = random.Random(0)
        rows = rows[:]
        rng.shuffle(rows)
        n_val = max(1, len(rows) // 10)
        for part, chunk in (("val", rows[:n_val]), ("train", rows[n_val:])):
            lines = [json.dumps({"instruction": r.text, "output": "-", "task": r.label}) for r in chunk]
            write_text(work / "splits" / f"{part}.jsonl", "".join(x + "\n" for x in lines))
        if self.kind.name == "lora":
            return self._lora(work, labels)
        entry = self.kind.fit(self.cfg, work, labels, progress=False)
        if not entry:
            raise SystemExit(130)  # interrupted: finished folds are kept, a rerun resumes
        return self.kind.load(self._router_view(work, labels), work / entry["path"], entry)

    def _router_view(self, work: Path, labels: list[str]) -> SimpleNamespace:
        """What a kind's `load` reads of a Router, for a fold's store (which has no manifest)."""
        if self.kind.name != "full":
            return SimpleNamespace(root=work, labels=labels)
        from lorachain.routing.runs import adapter_runs

        tok = self._tokenizer()
        _, run = adapter_runs(self.cfg, work, labels)[SELECTOR]
        return SimpleNamespace(
            root=work,
            labels=labels,
            tok=tok,
            select_cfg=run.data,
            label_ids=label_ids(tok, labels),
            manifest=SimpleNamespace(base_model={"dtype": self.cfg.model.dtype}),
        )

    def _tokenizer(self):
        from lorachain.models import load_tokenizer, resolve_path

        if "tok" not in self.cache:
            self.cache["tok"] = load_tokenizer(resolve_path(self.cfg.model))
        return self.cache["tok"]

    def _embedding(self, rows: list[Row], labels: list[str]):
        sel = self.cfg.selector
        if "enc" not in self.cache:
            self.cache["enc"] = load_encoder(sel.encoder)
        enc, tok = self.cache["enc"]
        new = list(dict.fromkeys(r.text for r in rows if r.text not in self.cache))
        t0 = time.perf_counter()
        for text, v in zip(
            new, embed(enc, tok, new, sel.max_length, sel.truncation) if new else [], strict=True
        ):
            self.cache[text] = v
        if new:
            self.embed_s_per_row = (time.perf_counter() - t0) / len(new)
        vecs = torch.stack([self.cache[r.text] for r in rows])  # (N, D)
        proto, owner = prototype_index(
            [r.label for r in rows], [r.dataset for r in rows], labels, sel.prototypes
        )
        embed_fn = lambda texts: embed(enc, tok, texts, sel.max_length, sel.truncation)  # noqa: E731
        fixed = description_prototypes(sel.descriptions, labels, embed_fn)
        t = fit_prototypes(vecs, proto, owner, fixed)

        def select(texts: list[str]):
            q = embed(enc, tok, texts, sel.max_length, sel.truncation)
            return ranked(labels, embedding_probs(q, t, len(labels), sel.temperature))

        return select

    def _lora(self, work: Path, labels: list[str]):
        from lorachain.routing.runs import adapter_runs
        from lorachain.training.loop import train
        from lorachain.training.setup import load_base

        if "model" not in self.cache:
            model = load_base(self.cfg.model)
            self.cache["model"] = model
            self.cache["pristine"] = {n: p.detach().clone() for n, p in model.state_dict().items()}
        model, tok = self.cache["model"], self._tokenizer()
        with torch.no_grad():
            model.load_state_dict(self.cache["pristine"])
        _, run = adapter_runs(self.cfg, work, labels)[SELECTOR]
        if train(run, model, tok, progress=False).summary.get("status") == "interrupted":
            raise SystemExit(130)  # a half-trained selector is not scored; a rerun resumes
        # the finished chain is merged into the base weights: score with the model itself
        ids = label_ids(tok, labels)
        return lambda texts: score_labels(model, tok, run.data, ids, labels, texts)
