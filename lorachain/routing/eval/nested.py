"""`lorachain route eval CONFIG --holdout-by dataset --nested`: an unbiased held-out number.

Leave-one-group-out twice. For each outer group (a data set), the selector's settings (a small
grid of dotted overrides), its temperature and the routing threshold of every confidence score are
chosen on inner leave-one-group-out folds of the other groups only; then a selector fitted on all
other groups, with those settings, scores the outer group once. Nothing about the outer group is
seen before it is scored. Per kind: top-1, top-3, expected calibration error before and after
temperature scaling, a reliability plot, and for every score of `routing.calibrate` the coverage and
precision of the routes at the threshold chosen inside for `target` precision. Resumable: every
finished outer fold is kept in `out/folds/`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path

import torch

from lorachain.config import from_dict, set_dotted
from lorachain.io import atomic_write, write_json, write_text
from lorachain.routing import calibrate as cal
from lorachain.routing.config import RouteConfig
from lorachain.routing.encoders import embed, load_encoder
from lorachain.routing.eval.agreement import agreement, agreement_markdown
from lorachain.routing.eval.holdout import read_grouped
from lorachain.routing.folds import Fitter, Row, make_folds, selection_logits, train_rows
from lorachain.routing.prototypes import description_prototypes, fit_prototypes, prototype_index, task_cosines

# the default grid per kind: temperature is fitted, not searched (argmax does not depend on it)
GRIDS = {
    "embedding": ["selector.truncation=head,head_tail", "selector.max_length=64,128"],
    "encoder": ["selector.truncation=head,head_tail"],
    "lora": ["selector_train.epochs=1"],
    "full": ["selector_train.epochs=1"],
}


def grid_settings(specs: list[str]) -> list[list[str]]:
    """Every combination of `key=v1,v2` specs, as lists of dotted overrides."""
    axes = [[f"{s.split('=', 1)[0]}={v}" for v in s.split("=", 1)[1].split(",")] for s in specs]
    return [list(c) for c in itertools.product(*axes)] or [[]]


def with_overrides(cfg: RouteConfig, overrides: list[str]) -> RouteConfig:
    data = dataclasses.asdict(cfg)
    for o in overrides:
        set_dotted(data, o)
    return from_dict(RouteConfig, data)


class EmbeddingScorer:
    """The `embedding` kind on cached embeddings: the prototypes (`selector.prototypes`) of the
    training rows; logits are each task's cosine over `selector.temperature`; also the nearest
    prototype's cosine and the Mahalanobis score to the task means."""

    def __init__(self, cfg: RouteConfig, cache: Path | None = None) -> None:
        self.enc, self.path = load_encoder(cfg.selector.encoder), cache
        self.cache: dict[tuple, dict[str, torch.Tensor]] = {}
        if cache is not None and cache.is_file():  # embeddings of an earlier run, by setting and text
            self.cache = torch.load(cache)

    def vectors(self, cfg: RouteConfig, texts: list[str]) -> torch.Tensor:
        sel = cfg.selector
        cache = self.cache.setdefault((sel.max_length, sel.truncation), {})
        new = list(dict.fromkeys(t for t in texts if t not in cache))
        if new:
            cache.update(zip(new, embed(*self.enc, new, sel.max_length, sel.truncation), strict=True))
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(self.path, lambda tmp: torch.save(self.cache, tmp))
        return torch.stack([cache[t] for t in texts])  # (N, D)

    def __call__(self, cfg: RouteConfig, train: list[Row], test: list[Row], labels: list[str]) -> dict:
        x, q = self.vectors(cfg, [r.text for r in train]), self.vectors(cfg, [r.text for r in test])
        index = torch.tensor([labels.index(r.label) for r in train])
        means, precision = cal.class_gaussian(x, index, len(labels))
        by = cfg.selector.prototypes
        rows, owner = prototype_index([r.label for r in train], [r.dataset for r in train], labels, by)
        fixed = description_prototypes(cfg.selector.descriptions, labels, lambda t: self.vectors(cfg, t))
        t = fit_prototypes(x, rows, owner, fixed)
        cos = task_cosines(q, t["sums"], t["counts"], t["owner"], len(labels))  # (N, L)
        return {
            "logits": cos / cfg.selector.temperature,
            "cosine": cos.max(-1).values,
            "mahalanobis": cal.mahalanobis(q, means, precision),
        }


class KindScorer:
    """Any registered kind, fitted by its own code (`holdout.Fitter`); logits are log-probabilities
    (so `energy` carries no information and is left out), no embedding scores."""

    def __init__(self, kind: str, work: Path) -> None:
        self.kind, self.work = kind, work

    def __call__(self, cfg: RouteConfig, train: list[Row], test: list[Row], labels: list[str]) -> dict:
        select = Fitter(self.kind, cfg, self.work).fit(train, labels)
        return {"logits": selection_logits(select, [r.text for r in test], labels)}


def confidence_scores(out: dict, t: float) -> dict[str, list[float]]:
    scores = {"msp": cal.msp(out["logits"], t).tolist(), "margin": cal.margin(out["logits"], t).tolist()}
    if "cosine" in out:  # raw logits: energy is informative
        scores["energy"] = cal.energy(out["logits"], t).tolist()
        scores |= {k: out[k].tolist() for k in ("cosine", "mahalanobis")}
    return scores


def inner_choice(scorer, cfg, rest: list[Row], labels, grid, target, inner_max, scheme="one") -> dict:
    """Settings, temperature and thresholds chosen on leave-one-group-out folds of `rest`."""
    folds, _ = make_folds(rest, scheme)
    if inner_max and len(folds) > inner_max:  # spread the kept folds over the groups
        folds = [folds[round(k * (len(folds) - 1) / (inner_max - 1 or 1))] for k in range(inner_max)]
    tried = []
    for overrides in grid:
        c = with_overrides(cfg, overrides)
        logits, gold = [], []
        parts: dict[str, list] = {}
        for groups in folds:
            test = [r for r in rest if r.group in groups]
            got = scorer(c, train_rows(c, [r for r in rest if r.group not in groups]), test, labels)
            logits.append(got["logits"])
            gold += [labels.index(r.label) for r in test]
            for k in ("cosine", "mahalanobis"):
                if k in got:
                    parts.setdefault(k, []).extend(got[k].tolist())
        logits_t, gold_t = torch.cat(logits), torch.tensor(gold)
        top1 = (logits_t.argmax(-1) == gold_t).float().mean().item()
        tried.append((top1, overrides, logits_t, gold_t, parts))
    top1, overrides, logits_t, gold_t, parts = max(tried, key=lambda x: x[0])  # first best on ties
    t = cal.fit_temperature(logits_t, gold_t)
    out = {"logits": logits_t} | {k: torch.tensor(v) for k, v in parts.items()}
    correct = (logits_t.argmax(-1) == gold_t).tolist()
    scores = confidence_scores(out, t)
    return {
        "inner": {"top1": logits_t.argmax(-1).tolist(), "gold": gold, "msp": scores["msp"]},  # per row
        "settings": overrides,
        "grid": {" ".join(x[1]) or "(config)": x[0] for x in tried},
        "inner_folds": len(folds),
        "inner_rows": len(gold),
        "inner_top1": top1,
        "temperature": t,
        "thresholds": {k: cal.threshold_for_precision(v, correct, target) for k, v in scores.items()},
    }


def outer_fold(scorer, cfg, rows, groups, labels, grid, target, inner_max, scheme="one") -> dict:
    rest = [r for r in rows if r.group not in groups]
    test = [r for r in rows if r.group in groups]
    chosen = inner_choice(scorer, cfg, rest, labels, grid, target, inner_max, scheme)
    c = with_overrides(cfg, chosen["settings"])
    got = scorer(c, train_rows(c, rest), test, labels)
    t = chosen["temperature"]
    probs = torch.softmax(got["logits"], -1)  # (N, L) as the selector would say
    ranked = [[labels[j] for j in row.argsort(descending=True).tolist()] for row in probs]
    return chosen | {
        "groups": groups,
        "gold": [r.label for r in test],
        "ranked": ranked,
        "p_raw": probs.max(-1).values.tolist(),
        "scores": confidence_scores(got, t),
    }


def summarise(folds: list[dict], target: float) -> dict:
    gold = [g for f in folds for g in f["gold"]]
    ranked = [r for f in folds for r in f["ranked"]]
    correct = [r[0] == g for r, g in zip(ranked, gold, strict=True)]
    cal_p = [p for f in folds for p in f["scores"]["msp"]]
    raw_p = [p for f in folds for p in f["p_raw"]]
    routing = {}
    for name in folds[0]["scores"]:
        s = [v for f in folds for v in f["scores"][name]]
        # each outer fold routes by its own inner threshold
        keep = [
            c
            for f in folds
            for v, c in zip(f["scores"][name], (r[0] == g for r, g in zip(f["ranked"], f["gold"])))
            if f["thresholds"][name] is not None and v >= f["thresholds"][name]
        ]
        best = cal.threshold_for_precision(s, correct, target)  # looking at the outer rows: a bound
        routing[name] = {
            "coverage": len(keep) / len(gold),
            "precision": sum(keep) / len(keep) if keep else None,
            "folds_routing_nothing": sum(f["thresholds"][name] is None for f in folds),
            "bound_looking_at_outer": cal.routed(s, correct, best),
        }
    per_label = {}
    for lab in sorted(set(gold)):
        idx = [i for i, g in enumerate(gold) if g == lab]
        per_label[lab] = {
            "n": len(idx),
            "top1": sum(correct[i] for i in idx) / len(idx),
            "top3": sum(gold[i] in ranked[i][:3] for i in idx) / len(idx),
        }
    return {
        "rows": len(gold),
        "top1": sum(correct) / len(gold),
        "top3": sum(g in r[:3] for g, r in zip(gold, ranked, strict=True)) / len(gold),
        "macro_top1": sum(d["top1"] for d in per_label.values()) / len(per_label),  # mean over labels
        "ece_raw": cal.ece(raw_p, correct),
        "ece_calibrated": cal.ece(cal_p, correct),
        "reliability_raw": cal.reliability(raw_p, correct),
        "reliability_calibrated": cal.reliability(cal_p, correct),
        "temperature": [f["temperature"] for f in folds],
        "settings_chosen": {
            " ".join(s) or "(config)": sum(f["settings"] == s for f in folds)
            for s in {tuple(f["settings"]): f["settings"] for f in folds}.values()
        },
        "routing": routing,
        "per_label": per_label,
    }


def nested_eval(
    cfg: RouteConfig,
    by: str,
    out: str | Path,
    kinds: tuple[str, ...] = ("embedding",),
    label: str = "task",
    per_group: int = 60,
    command: str = "",
    grids: dict[str, list[str]] | None = None,
    target: float = 0.9,
    max_folds: int | None = None,
    inner_max: int | None = None,
    embedding_cache: str | Path | None = None,
    folds: str = "one",
) -> dict:
    """Nested leave-one-group-out for every kind; writes nested.json, nested.md, reliability_*.png."""
    out = Path(out)
    rows = read_grouped(cfg, by, label, per_group, cfg.data.seed)
    labels = sorted({r.label for r in rows})
    outer, single = make_folds(rows, folds)  # `rounds`: one group of every label per fold, inside too
    outer = outer[:max_folds] if max_folds else outer
    result = {
        "command": command,
        "data": cfg.data.path,
        "label": label,
        "holdout_by": by,
        "per_group": per_group,
        "balance": {"balance": cfg.data.balance, "max_per_task": cfg.data.max_per_task}
        | {"max_per_dataset": cfg.data.max_per_dataset},
        "prototypes": cfg.selector.prototypes,  # the embedding kind's
        "descriptions": cfg.selector.descriptions,
        "target_precision": target,
        "folds": folds,
        "outer_folds": len(outer),
        "inner_max": inner_max,
        "labels": labels,
        "single_group_labels": single,
        "kinds": {},
    }
    scored: dict[str, list[dict]] = {}
    for kind in kinds:
        grid = grid_settings((grids or {}).get(kind, GRIDS.get(kind, [])))
        if kind == "embedding":
            scorer = EmbeddingScorer(cfg, Path(embedding_cache) if embedding_cache else None)
        else:
            scorer = KindScorer(kind, out / "work")
        folds = []
        for i, groups in enumerate(outer):
            path = out / "folds" / f"nested_{kind}_{i}.json"
            if path.is_file():
                folds.append(json.loads(path.read_text()))
                continue
            done = outer_fold(scorer, cfg, rows, groups, labels, grid, target, inner_max, folds)
            write_json(path, done)
            folds.append(done)
            print(f"[nested] {kind} fold {i + 1}/{len(outer)} {groups}: {done['settings']}", flush=True)
        scored[kind] = folds
        result["kinds"][kind] = summarise(folds, target) | {"grid": [" ".join(g) for g in grid]}
        plot_reliability(result["kinds"][kind], f"{kind}: nested held-out", out / f"reliability_{kind}.png")
        write_json(out / "nested.json", result)
    pairs = {f"{a} / {b}": agreement(scored[a], scored[b], target) for a in kinds for b in kinds if a != b}
    if pairs:
        result["agreement"] = pairs
        write_json(out / "nested.json", result)
    write_text(out / "nested.md", nested_markdown(result))
    shutil.rmtree(out / "work", ignore_errors=True)  # the kinds' fold stores
    return result


def plot_reliability(summary: dict, title: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    for key, name in (("raw", "as fitted"), ("calibrated", "temperature-scaled")):
        bins = summary[f"reliability_{key}"]
        ece = summary[f"ece_{key}"]
        ax.plot(
            [b["confidence"] for b in bins],
            [b["accuracy"] for b in bins],
            "o-",
            label=f"{name} (ECE {ece:.3f})",
        )
    ax.set(
        xlabel="confidence (top label's probability)",
        ylabel="accuracy",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def nested_markdown(result: dict) -> str:
    lines = [
        f"Label `{result['label']}`, nested leave-one-`{result['holdout_by']}`-out: "
        f"{result['outer_folds']} outer folds, settings, temperature and thresholds chosen on inner "
        "folds of the other groups only; up to "
        f"{result['per_group']} rows per group; training rows balanced by `{result['balance']}`.",
        "",
        *(
            [f"Not held out (one group only): {', '.join(result['single_group_labels'])}.", ""]
            if result["single_group_labels"]
            else []
        ),
        "| kind | top-1 | top-3 | top-1 mean over labels | ECE as fitted | ECE temperature-scaled | "
        "settings chosen |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, s in result["kinds"].items():
        chosen = "; ".join(f"{n}: {c}" for n, c in s["settings_chosen"].items())
        lines.append(
            f"| {k} | {s['top1']:.3f} | {s['top3']:.3f} | {s['macro_top1']:.3f} | {s['ece_raw']:.3f} | "
            f"{s['ece_calibrated']:.3f} | {chosen} |"
        )
    target = result["target_precision"]
    lines += [
        "",
        f"Routing at the threshold chosen on the inner folds for precision >= {target} (the rest go to "
        "the fallback); the bound picks the threshold looking at the outer rows themselves (not a result):",
        "",
        "| kind | score | coverage | precision | folds routing nothing | bound: coverage / precision |",
        "|---|---|---|---|---|---|",
    ]
    for k, s in result["kinds"].items():
        for name, r in s["routing"].items():
            b = r["bound_looking_at_outer"]
            lines.append(
                f"| {k} | {name} | {r['coverage']:.3f} | {_pct(r['precision'])} | "
                f"{r['folds_routing_nothing']} | {b['coverage']:.3f} / {_pct(b['precision'])} |"
            )
    kinds = list(result["kinds"])
    lines += ["", "Top-1 / top-3 per label:", "", "| label | n | " + " | ".join(kinds) + " |"]
    lines.append("|---|---|" + "---|" * len(kinds))
    first = result["kinds"][kinds[0]]["per_label"] if kinds else {}
    for lab, d in first.items():
        per = [result["kinds"][k]["per_label"][lab] for k in kinds]
        cells = [f"{x['top1']:.2f} / {x['top3']:.2f}" for x in per]
        lines.append(f"| {lab} | {d['n']} | " + " | ".join(cells) + " |")
    lines += agreement_markdown(result.get("agreement", {}), target)
    return "\n".join(lines) + "\n"
