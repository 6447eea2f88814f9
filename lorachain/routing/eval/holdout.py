"""`lorachain route eval STORE --holdout-by FIELD`: selector accuracy on groups it never saw.

Leave-one-group-out: each group (a data set, a template) whose label has at least one other group
is held out, the selector is fitted on the other groups and tested on it. With `folds="rounds"`,
one group of every label is held out at once (as many folds as the largest label has groups), so a
kind that trains does so fewer times. A label with one group cannot be held out (nothing else
teaches it) and is listed as such. In distribution: a seeded 80/20 split of every group.
Every kind is fitted and run by its own code (`routing.folds.Fitter`).
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import defaultdict
from pathlib import Path

from lorachain.data import DataError, read_rows
from lorachain.io import write_json, write_text
from lorachain.metrics import top_k_accuracy
from lorachain.routing.config import RouteConfig
from lorachain.routing.folds import Fitter, Row, make_folds, train_rows
from lorachain.routing.selectors import encoder_budget


def read_grouped(cfg: RouteConfig, by: str, label: str, per_group: int, seed: int = 0) -> list[Row]:
    """Up to `per_group` rows (seeded) of every group; rows missing a field are skipped. `by` may
    join fields with `+` (`dataset+template`: a template of one data set)."""
    d, fields = cfg.data, by.split("+")
    groups: dict[str, list[Row]] = defaultdict(list)
    for _, r in read_rows(d.path):
        if any(r.get(f) in (None, "") for f in (d.instruction_field, label, *fields)):  # outputs unused
            continue
        text = str(r[d.instruction_field])
        if d.input_field and r.get(d.input_field):
            text = f"{text}\n{r[d.input_field]}"
        group = "/".join(str(r[f]) for f in fields)
        groups[group].append(Row(text, str(r[label]), group, str(r.get("dataset", ""))))
    if not groups:
        raise DataError(f"{d.path}: no rows with fields {label!r} and {by!r}")
    rng, out = random.Random(seed), []
    for g in sorted(groups):
        rows = groups[g]
        rng.shuffle(rows)
        out += rows[:per_group]
    return out


def evaluate_fold(select, test: list[Row], batch: int = 8) -> tuple[list[list[str]], float]:
    """Ranked labels of every test row, and the selection seconds per instruction."""
    out, t0 = [], time.perf_counter()
    for k in range(0, len(test), batch):
        out += [s.ranked for s in select([r.text for r in test[k : k + batch]])]
    return out, (time.perf_counter() - t0) / max(1, len(test))


def scores(test: list[Row], ranks: list[list[str]], key) -> dict:
    by: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(test):
        by[key(r)].append(i)
    return {
        k: {
            "n": len(idx),
            "top1": top_k_accuracy([ranks[i] for i in idx], [test[i].label for i in idx], 1),
            "top3": top_k_accuracy([ranks[i] for i in idx], [test[i].label for i in idx], 3),
        }
        for k, idx in sorted(by.items())
    }


def run_kind(
    fitter: Fitter,
    rows: list[Row],
    folds: list[list[str]],
    labels: list[str],
    out: Path,
    in_dist: bool = True,
) -> dict:
    """Held-out folds, then the in-distribution split, for one kind; finished folds are kept in
    `out/folds/` and reused by a rerun."""
    held: list[Row] = []
    ranks: list[list[str]] = []
    fit_s, select_s = [], []
    for i, groups in enumerate(folds):
        path = out / "folds" / f"{fitter.kind.name}_{i}.json"
        test = [r for r in rows if r.group in groups]
        if path.is_file():
            done = json.loads(path.read_text())
        else:
            t0 = time.perf_counter()
            select = fitter.fit(train_rows(fitter.cfg, [r for r in rows if r.group not in groups]), labels)
            fitted = time.perf_counter() - t0
            got, per = evaluate_fold(select, test)
            done = {"groups": groups, "ranked": got, "fit_s": fitted, "select_s": per}
            write_json(path, done)
            print(
                f"[holdout] {fitter.kind.name} fold {i + 1}/{len(folds)} {groups}: fit {fitted:.1f} s",
                flush=True,
            )
        held += test
        ranks += done["ranked"]
        fit_s.append(done["fit_s"])
        select_s.append(done["select_s"])
    held_out = {
        "rows": len(held),
        "top1": top_k_accuracy(ranks, [r.label for r in held], 1),
        "top3": top_k_accuracy(ranks, [r.label for r in held], 3),
        "per_label": scores(held, ranks, lambda r: r.label),
        "per_group": scores(held, ranks, lambda r: r.group),
        "fit_s_mean": sum(fit_s) / max(1, len(fit_s)),
        "select_ms": 1e3 * sum(select_s) / max(1, len(select_s)),
    }
    if not in_dist:
        return {"held_out": held_out, "in_distribution": None}
    rng = random.Random(0)
    shuffled = rows[:]
    rng.shuffle(shuffled)
    cut = len(shuffled) // 5
    t0 = time.perf_counter()
    select = fitter.fit(train_rows(fitter.cfg, shuffled[cut:]), labels)
    fit_all = time.perf_counter() - t0
    in_ranks, in_select = evaluate_fold(select, shuffled[:cut])
    if fitter.kind.name == "embedding":  # the folds reuse embeddings: count what a fit from scratch costs
        fit_all = fitter.embed_s_per_row * (len(shuffled) - cut)
    return {
        "held_out": held_out,
        "in_distribution": {
            "rows": cut,
            "top1": top_k_accuracy(in_ranks, [r.label for r in shuffled[:cut]], 1),
            "top3": top_k_accuracy(in_ranks, [r.label for r in shuffled[:cut]], 3),
            "per_label": scores(shuffled[:cut], in_ranks, lambda r: r.label),
            "fit_s": fit_all,
            "select_ms": 1e3 * in_select,
        },
    }


def holdout_eval(
    cfg: RouteConfig,
    by: str,
    out: str | Path,
    kinds: tuple[str, ...] = ("embedding",),
    label: str = "task",
    per_group: int = 60,
    folds: str = "one",
    command: str = "",
    max_folds: int | None = None,
    in_dist: bool = True,
) -> dict:
    """Leave-one-group-out selector accuracy for every kind; writes holdout.json and holdout.md."""
    out = Path(out)
    rows = read_grouped(cfg, by, label, per_group, cfg.data.seed)
    labels = sorted({r.label for r in rows})
    fold_list, single = make_folds(rows, folds)
    fold_list = fold_list[:max_folds] if max_folds else fold_list  # a reduced budget, said in the report
    result = {
        "command": command,
        "data": cfg.data.path,
        "label": label,
        "holdout_by": by,
        "folds": folds,
        "max_folds": max_folds,
        "per_group": per_group,
        "labels": labels,
        "groups": len({r.group for r in rows}),
        "single_group_labels": single,
        "kinds": {},
    }
    for kind in kinds:
        fitter = Fitter(kind, cfg, out / "work")
        result["kinds"][kind] = run_kind(fitter, rows, fold_list, labels, out, in_dist)
        result["kinds"][kind]["settings"] = settings_of(cfg, kind)
        write_json(out / "holdout.json", result)
    write_text(out / "holdout.md", holdout_markdown(result))
    shutil.rmtree(out / "work", ignore_errors=True)
    return result


def settings_of(cfg: RouteConfig, kind: str) -> dict:
    got = _settings(cfg, kind)
    sel = cfg.selector
    return got | ({"augment": sel.augment, "augment_styles": sel.augment_styles} if sel.augment else {})


def _settings(cfg: RouteConfig, kind: str) -> dict:
    sel, budget = cfg.selector, cfg.selector_train or cfg.train
    if kind == "encoder":
        budget = encoder_budget(cfg)
    if kind == "embedding":
        return {"encoder": sel.encoder, "temperature": sel.temperature, "max_length": sel.max_length} | {
            "truncation": sel.truncation
        }
    if kind == "encoder":
        enc = {"encoder": sel.encoder, "lr": sel.lr, "epochs": budget.epochs, "max_length": sel.max_length}
        return enc | {"truncation": sel.truncation}
    return {"model": cfg.model.name_or_path, "epochs": budget.epochs, "max_length": cfg.data.max_length}


def holdout_markdown(result: dict) -> str:
    kinds = list(result["kinds"])
    lines = [
        f"Label `{result['label']}`, held out by `{result['holdout_by']}` ({result['folds']} per fold), "
        f"up to {result['per_group']} rows per group, {result['groups']} groups"
        + (f", first {result['max_folds']} folds only." if result.get("max_folds") else "."),
        "",
    ]
    if result["single_group_labels"]:
        lines += [f"Not held out (one group only): {', '.join(result['single_group_labels'])}.", ""]
    lines += ["| kind | held-out top-1 | held-out top-3 | in-dist. top-1 | fit (s) | select (ms/instr.) |"]
    lines += ["|---|---|---|---|---|---|"]
    for k in kinds:
        h, d = result["kinds"][k]["held_out"], result["kinds"][k]["in_distribution"]
        d = d or {"top1": float("nan"), "fit_s": h["fit_s_mean"]}  # not measured: the fold's fit
        lines.append(
            f"| {k} | {h['top1']:.3f} | {h['top3']:.3f} | {d['top1']:.3f} | {d['fit_s']:.1f} | "
            f"{h['select_ms']:.1f} |"
        )
    labels = sorted({lab for k in kinds for lab in result["kinds"][k]["held_out"]["per_label"]})
    lines += ["", "Held-out top-1 / top-3 per label:", ""]
    lines += ["| label | n | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for lab in labels:
        cells = []
        for k in kinds:
            d = result["kinds"][k]["held_out"]["per_label"].get(lab)
            cells.append(f"{d['top1']:.2f} / {d['top3']:.2f}" if d else "-")
        n = next(
            result["kinds"][k]["held_out"]["per_label"][lab]["n"]
            for k in kinds
            if lab in result["kinds"][k]["held_out"]["per_label"]
        )
        lines.append(f"| {lab} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
