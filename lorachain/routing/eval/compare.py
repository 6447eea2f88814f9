"""Answer quality of every way of choosing an adapter, scored by lookup in the answer cache.

For held-out rows labelled by task type (a lockbox half, a fold store's held-out data sets, a user's
own file), each option names one adapter per row: `routed` (the store's selector with its fallback,
no gate), `evidence` (routed, but only to adapters the store's `selector.evidence` lets answer:
`routing.eval.evidence`), `top1` (the selector's top label, no fallback), `arrow` (the training-free
router of `routing.arrow`, always routing), each also `gated` / `top1_gated` / `arrow_gated` (then
the likelihood gate at a margin); `oracle` (the row's own task adapter; the mixed one for a type the
store has no adapter for, e.g. `other`), `mixed` and `base` (adapters off). Per task type: ROUGE-L
and exact match of greedy answers, the reference answer's perplexity, and 95% paired bootstrap
intervals of each option's ROUGE-L minus the mixed adapter's (the target: lower bound >= -0.02).
Margins are chosen on reference perplexity only (`choose_margin`), so no answer is generated to
choose them. Writes compare.json, and compare.md and compare.png rendered from it.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from lorachain.data import DataError
from lorachain.io import write_json, write_text
from lorachain.metrics import exact_match, paired_bootstrap, perplexity, rouge_l
from lorachain.routing.arrow import arrow_scores, prototypes
from lorachain.routing.eval.answers import AnswerCache
from lorachain.routing.eval.evidence import evidence_choices
from lorachain.routing.eval.plots import plot_comparison
from lorachain.routing.eval.store import BASE, batched, using
from lorachain.routing.gate import gain, margin_json, margin_value, routes_of
from lorachain.store import MIXED

OPTIONS = (
    *("routed", "evidence", "gated", "top1", "top1_gated", "arrow", "arrow_gated"),
    *("oracle", "mixed", "base"),
)
GATED = {"gated": "routed", "top1_gated": "top1", "arrow_gated": "arrow"}  # gated option -> what it gates
FLOOR = -0.02  # the target: lower 95% bound of option - mixed ROUGE-L per covered type
MARGINS = (-0.5, -0.2, -0.1, 0.0, 0.05, 0.1, 0.2, 0.5, 1.0, math.inf)  # nats/token; inf: never route
FIXED = ("oracle", "mixed", "base")  # options that name no routing decision (no label report)


def select_all(router, rows: list[dict]) -> list:
    """The selector's decisions with the store's fallback but no gate and no evidence rule (both
    are scored by lookup)."""
    keep, router.gate_margin = router.gate_margin, None
    keep_ev, router.evidence = getattr(router, "evidence", None), None
    try:
        asks = [r["instruction"] for r in rows]
        return [s for chunk in batched(asks, 8) for s in router.select(chunk)]
    finally:
        router.gate_margin, router.evidence = keep, keep_ev


def gated(cache: AnswerCache, rows: list[dict], chosen: list[str], margin: float) -> list[str]:
    """`chosen` with every task adapter that fails the likelihood gate at `margin` sent to mixed."""
    out = []
    for r, a in zip(rows, chosen, strict=True):
        keep = a == MIXED or gain(cache.get("instr", a, r), cache.get("instr", MIXED, r)) > margin
        out.append(a if keep else MIXED)
    return out


def arrow_choices(router, rows: list[dict]) -> list[str]:
    """Each row's task adapter by Arrow (`routing.arrow`: no training, the adapters' own weights)."""
    names = list(router.adapters.values())
    protos = {a: prototypes(router.root / router.manifest.adapters[a]["path"]) for a in names}
    out = []
    with using(router, BASE):
        for chunk in batched(rows, 8):
            prompts = [router.answer_prompt(r.get("messages", [])[:-1] or r["instruction"]) for r in chunk]
            scores = arrow_scores(router.model, prompts, protos, router.tok.pad_token_id)  # (B, K)
            out += [names[k] for k in scores.argmax(-1).tolist()]
    return out


def margins_of(margin: float | dict | None) -> dict[str, float]:
    """{gated option's base ("routed", "top1", "arrow"): margin}: one margin for all, or per base
    (as JSON holds them too: `gate.margin_json`)."""
    if margin is None:
        return {}
    if isinstance(margin, dict):
        return {k: margin_value(v) for k, v in margin.items()}
    return {base: margin_value(margin) for base in GATED.values()}


def extra_options(cache: AnswerCache, rows: list[dict], extra: dict, margins: dict[str, float]) -> dict:
    """Options chosen elsewhere (a selector variant's decisions, `routing.eval.variants`), each also
    gated at the `routed` option's margin (`<name>_gated`) when it has one."""
    got = dict(extra)
    if "routed" in margins:
        for name, names in extra.items():
            cache.fill_pairs([(r, a) for r, a in zip(rows, names, strict=True) if a != MIXED], "instr")
            cache.fill(rows, [MIXED], "instr")
            got[f"{name}_gated"] = gated(cache, rows, names, margins["routed"])
    return got


def options(router, rows: list[dict], sels: list, cache: AnswerCache, margins: dict[str, float]) -> dict:
    """Option -> the adapter each row gets (BASE: none); a gated option for each margin given."""
    n, fallback = len(rows), router.fallback
    got = {
        "routed": [s.adapter for s in sels],
        "top1": [router.adapters.get(s.ranked[0], fallback) if s.ranked else fallback for s in sels],
        "oracle": [router.adapters.get(r["task"], MIXED) for r in rows],
        "mixed": [MIXED] * n,
        "base": [BASE] * n,
        "arrow": arrow_choices(router, rows),
    }
    routes = routes_of(router.manifest.selector)  # the store's evidence (routing.eval.evidence)
    if routes is not None:
        got["evidence"] = evidence_choices(got["routed"], routes)
    for name, base in GATED.items():
        if base in margins:
            cache.fill_pairs([(r, a) for r, a in zip(rows, got[base], strict=True) if a != MIXED], "instr")
            cache.fill(rows, [MIXED], "instr")
            got[name] = gated(cache, rows, got[base], margins[base])
    return {k: got[k] for k in OPTIONS if k in got}


def ref_gains(cache: AnswerCache, rows: list[dict], chosen: list[str]) -> list[float]:
    """Per row: nats per reference token by which the chosen adapter beats the mixed adapter."""
    return [
        gain(cache.get("ref", a, r), cache.get("ref", MIXED, r)) for r, a in zip(rows, chosen, strict=True)
    ]


def margin_sweep(folds: list[tuple[AnswerCache, list[dict], list[str]]], margins=MARGINS) -> list[dict]:
    """For each margin, pooled over `folds` (cache, rows, routed choices): the share routed and, per
    task type, the mean reference-likelihood gain over mixed (nats/token) with its 95% interval."""
    out = []
    for m in margins:
        by: dict[str, list[float]] = defaultdict(list)
        routed = total = 0
        for cache, rows, chosen in folds:
            cache.fill(rows, [MIXED, *{a for a in chosen if a != MIXED}], "instr")
            cache.fill(rows, [MIXED, *{a for a in chosen if a != MIXED}], "ref")
            g = gated(cache, rows, chosen, m)
            routed, total = routed + sum(a != MIXED for a in g), total + len(g)
            for r, d in zip(rows, ref_gains(cache, rows, g), strict=True):
                by[r["task"]].append(d)
        per = {t: paired_bootstrap(v) for t, v in sorted(by.items())}
        out.append({"margin": margin_json(m), "routed": routed / max(total, 1), "per_task": per})
    return out


def choose_margin(sweep: list[dict], tolerance: float = 0.0) -> float:
    """The margin of highest pooled gain among those whose every task type's lower bound of the
    reference-likelihood gain is >= -tolerance (inf, never routing, always qualifies)."""
    ok = [s for s in sweep if all(p["low"] is None or p["low"] >= -tolerance for p in s["per_task"].values())]
    if not ok:
        return math.inf

    def pooled(s: dict) -> float:
        per = [p for p in s["per_task"].values() if p["n"]]
        return sum(p["mean"] * p["n"] for p in per) / max(sum(p["n"] for p in per), 1)

    return margin_value(max(ok, key=lambda s: (round(pooled(s), 12), margin_value(s["margin"])))["margin"])


def label_report(chosen: list[str], right: list[bool]) -> dict:
    """The routed label's coverage and precision, and the share of rows right (a row of a type
    without an adapter, e.g. `other`, is right when it falls back to the mixed adapter)."""
    routed = [i for i, a in enumerate(chosen) if a != MIXED]
    return {
        "coverage": len(routed) / max(len(chosen), 1),
        "precision": sum(right[i] for i in routed) / len(routed) if routed else None,
        "right": sum(right) / max(len(chosen), 1),
    }


def row_scores(
    cache: AnswerCache, rows: list[dict], chosen: dict[str, list[str]], adapters: dict, answers: bool
) -> dict:
    """Per option, per row: the adapter, the reference (log-prob, tokens), whether the choice is the
    right label, and with `answers` the greedy answer's ROUGE-L and exact match. Kept in the JSON, so
    folds pool and tables re-render without the cache."""
    out = {}
    for k, names in chosen.items():
        pairs = list(zip(rows, names, strict=True))
        got = {
            "adapter": names,
            "ref": [list(cache.get("ref", a, r)) for r, a in pairs],
            "right": [a == adapters.get(r["task"], MIXED) for r, a in pairs],
        }
        if answers:
            said = [cache.get("answer", a, r) for r, a in pairs]
            got["rougeL"] = [rouge_l(x, r["output"]) for x, r in zip(said, rows, strict=True)]
            got["exact_match"] = [exact_match(x, r["output"]) for x, r in zip(said, rows, strict=True)]
        out[k] = got
    return out


def summarise(tasks: list[str], per_row: dict) -> dict:
    """Per option and task type (and `all`): n, reference perplexity, mean ROUGE-L and exact match,
    and the paired bootstrap of the option's ROUGE-L minus mixed's (from `row_scores`)."""
    idx = {t: [i for i, x in enumerate(tasks) if t in ("all", x)] for t in [*sorted(set(tasks)), "all"]}
    out: dict = {}
    for k, got in per_row.items():
        out[k] = {}
        for t, ix in idx.items():
            ref = [got["ref"][i] for i in ix]
            d = {"n": len(ix), "ppl": perplexity(-sum(lp for lp, _ in ref), sum(n for _, n in ref))}
            for m in ("rougeL", "exact_match"):
                if m in got:
                    d[m] = sum(got[m][i] for i in ix) / len(ix)
            if "rougeL" in got and k != "mixed" and "mixed" in per_row:
                mixed = per_row["mixed"]["rougeL"]
                d["vs_mixed"] = paired_bootstrap([got["rougeL"][i] - mixed[i] for i in ix])
            out[k][t] = d
    return out


def tabulate(base: dict, tasks: list[str], per_row: dict) -> dict:
    """`base` (rows_from, covered, gate_margin, ...) with the tables of `per_row`: the options, the
    labels of routed/gated/top1, and no_harm."""
    result = base | {
        "rows": len(tasks),
        "per_task_rows": {t: tasks.count(t) for t in sorted(set(tasks))},
        "tasks": tasks,
        "per_row": per_row,
        "options": summarise(tasks, per_row),
        "labels": {
            k: label_report(per_row[k]["adapter"], per_row[k]["right"]) for k in per_row if k not in FIXED
        },
    }
    result["no_harm"] = no_harm(result)
    return result


def pool(results: list[dict], rows_from: str) -> dict:
    """One table over several comparisons (the folds): their rows and per-row scores concatenated."""
    first = results[0]
    keys = [k for k in first["per_row"] if all(k in r["per_row"] for r in results)]
    per_row = {
        k: {f: [x for r in results for x in r["per_row"][k][f]] for f in first["per_row"][k]} for k in keys
    }
    base = {
        "rows_from": rows_from,
        "covered": sorted({t for r in results for t in r["covered"]}),
        "gate_margin": first["gate_margin"],
        "floor": first["floor"],
        "max_new_tokens": first["max_new_tokens"],
    }
    return tabulate(base, [t for r in results for t in r["tasks"]], per_row)


def compare(
    router,
    rows: list[dict],
    cache_dir: str | Path,
    out: str | Path,
    margin: float | dict | None = None,
    answers: bool = True,
    rows_from: str = "held-out rows",
    max_new_tokens: int = 32,
    extra: dict[str, list[str]] | None = None,
) -> dict:
    """Fill the cache for `rows` (every adapter's reference and instruction likelihoods; greedy
    answers of the adapters some option picks), score every option by lookup, write
    `out/compare.json` and render it. `margin`: the gate's, for every gated option or per option it
    gates ({"routed": m, "top1": m, "arrow": m}); default: the store's, if any. `extra`: more
    options, name -> adapter per row (`extra_options`)."""
    bad = [
        i for i, r in enumerate(rows) if not r.get("instruction") or "output" not in r or not r.get("task")
    ]
    if bad:
        raise DataError(f"{rows_from}: row {bad[0] + 1} needs instruction, output and task")
    margins = margins_of(router.gate_margin if margin is None else margin)
    cache = AnswerCache(cache_dir, router, max_new_tokens)
    cache.fill(rows, [*router.adapters.values(), MIXED, BASE], "ref")
    sels = select_all(router, rows)
    chosen = options(router, rows, sels, cache, margins) | extra_options(cache, rows, extra or {}, margins)
    if answers:
        cache.fill_pairs(
            [(r, a) for per in chosen.values() for r, a in zip(rows, per, strict=True)], "answer"
        )
    base = {
        "rows_from": rows_from,
        "covered": sorted({r["task"] for r in rows} & set(router.adapters)),
        "gate_margin": {k: margin_json(v) for k, v in margins.items()},
        "floor": FLOOR,
        "max_new_tokens": max_new_tokens,
        "fallback_reasons": sorted({(s.fallback or "").split(":")[0] for s in sels if s.fallback}),
    }
    result = tabulate(
        base, [r["task"] for r in rows], row_scores(cache, rows, chosen, router.adapters, answers)
    )
    write_json(Path(out) / "compare.json", result)
    render(Path(out) / "compare.json")
    return result


def no_harm(result: dict) -> dict:
    """Option -> whether every covered type's lower bound of option - mixed ROUGE-L is >= FLOOR."""
    got = {}
    for k, per in result["options"].items():
        lows = [per[t]["vs_mixed"]["low"] for t in result["covered"] if "vs_mixed" in per.get(t, {})]
        if lows:
            got[k] = all(x is not None and x >= result["floor"] for x in lows)
    return got


def _margins(m: dict) -> str:
    return ", ".join(f"{GATED_NAME[k]} {v}" for k, v in m.items()) or "none (no gated option)"


GATED_NAME = {base: name for name, base in GATED.items()}


def _cell(d: dict) -> str:
    if "rougeL" not in d:
        return f"- / - / {d['ppl']:.2f}"
    return f"{d['rougeL']:.3f} / {d['exact_match']:.3f} / {d['ppl']:.2f}"


def _ci(s: dict | None) -> str:
    if not s or s["mean"] is None:
        return "-"
    return f"{s['mean']:+.3f} [{s['low']:+.3f}, {s['high']:+.3f}]"


def markdown(result: dict) -> str:
    """The answer-quality table: per task type, each option's ROUGE-L / EM / reference ppl, then
    the routed (and gated) minus mixed ROUGE-L with 95% intervals; the labels' coverage/precision."""
    opts = result["options"]
    kinds = list(opts)
    diffs = [k for k in ("routed", "gated", "top1_gated", "arrow_gated", "oracle") if k in opts]
    diffs += [k for k in opts if k not in OPTIONS]  # selector variants (`extra`)
    tasks = [*result["per_task_rows"], "all"]
    lines = [
        f"Rows: {result['rows']} from {result['rows_from']}; covered task types: "
        f"{', '.join(result['covered']) or 'none'}; gate margins: {_margins(result['gate_margin'])}.",
        "",
        "Cells: ROUGE-L / exact match / reference perplexity. Last columns: option − mixed ROUGE-L, "
        f"mean [95% paired bootstrap]; no harm means every covered type's lower bound ≥ {result['floor']}.",
        "",
        "| task | n | " + " | ".join(kinds) + " | " + " | ".join(f"{k} − mixed" for k in diffs) + " |",
        "|---|---|" + "---|" * (len(kinds) + len(diffs)),
    ]
    for t in tasks:
        n = opts["mixed"][t]["n"]
        cells = [_cell(opts[k][t]) for k in kinds] + [_ci(opts[k][t].get("vs_mixed")) for k in diffs]
        lines.append(f"| {t} | {n} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| option | routed (coverage) | right when routed | right (fallback right for other) |",
        "|---|---|---|---|",
    ]
    for k, lab in result["labels"].items():
        p = "-" if lab["precision"] is None else f"{lab['precision']:.3f}"
        lines.append(f"| {k} | {lab['coverage']:.3f} | {p} | {lab['right']:.3f} |")
    if result.get("no_harm"):
        lines += [
            "",
            "No harm: "
            + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in result["no_harm"].items())
            + ".",
        ]
    return "\n".join(lines) + "\n"


def render(path: str | Path) -> tuple[Path, Path]:
    """compare.md and compare.png beside a compare.json, from the JSON alone."""
    path = Path(path)
    result = json.loads(path.read_text())
    md = write_text(path.with_suffix(".md"), markdown(result))
    return md, plot_comparison(result, path.with_suffix(".png"))
