"""`lorachain route eval`: the routing paper's evaluation on a store's test split.

Per task and over all rows: perplexity of the oracle task adapter, the mixed adapter, the routed
chain (Table I) and the base model with no adapter; selector top-1/top-3 accuracy in both modes
with confusion matrices (Table II); ROUGE-L and exact match of greedy answers (routed vs base vs
mixed); optional judged helpfulness; a human-evaluation sheet.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lorachain.data import encode_row
from lorachain.io import write_json, write_text
from lorachain.metrics import exact_match, perplexity, rouge_l, top_k_accuracy
from lorachain.routing.eval.judge import JudgeError, judge_score, write_human_sheet
from lorachain.routing.eval.plots import plot_answers, plot_confusion
from lorachain.store import MIXED
from lorachain.training.evaluate import sequence_logprobs

# whose greedy answers are scored (and judged): the routed chain (with the store's fallback), the
# selector's top label without any fallback, the true task's adapter, the mixed adapter, no adapter
QUALITY_KINDS = ("routed", "top1", "oracle", "mixed", "base")
BASE = "(base)"  # not an adapter: the base model with every adapter disabled


def load_test_rows(store: Path, max_per_task: int | None) -> list[dict]:
    rows = [json.loads(x) for x in (store / "splits" / "test.jsonl").read_text().split("\n") if x]
    if max_per_task:
        seen: dict[str, int] = defaultdict(int)
        kept = []
        for r in rows:
            if seen[r["task"]] < max_per_task:
                kept.append(r)
                seen[r["task"]] += 1
        rows = kept
    return rows


def batched(items: list, size: int):
    for k in range(0, len(items), size):
        yield items[k : k + size]


@contextmanager
def using(router, name: str) -> Iterator[None]:
    """Run the block with adapter `name` active, or with no adapter at all for BASE."""
    if name != BASE:
        router.activate(name)
        yield
        return
    with router.model.disable_adapter():  # PEFT: LoRA layers pass the base output through
        yield


def task_nll(
    router, rows: list[dict], adapters: list[str], cache: dict | None = None
) -> dict[str, tuple[float, int]]:
    """task -> (summed negative log-likelihood, tokens) of the rows' outputs, each row under the
    adapter chosen for it (BASE: none). `cache` keeps (row, adapter) -> (logprob, tokens) between
    calls, so kinds that pick the same adapter for a row score it once."""
    cache = {} if cache is None else cache
    for name in dict.fromkeys(adapters):
        idx = [i for i, a in enumerate(adapters) if a == name and (i, name) not in cache]
        examples = [encode_row(router.answer_cfg, router.tok, rows[i], "test", classifier=False) for i in idx]
        if not examples:
            continue
        with using(router, name):
            scored = sequence_logprobs(router.model, examples, router.tok.pad_token_id, 8)
        cache.update(((i, name), s) for i, s in zip(idx, scored, strict=True))
    nll: dict[str, float] = defaultdict(float)
    ntok: dict[str, int] = defaultdict(int)
    for i, name in enumerate(adapters):
        lp, n = cache[(i, name)]
        nll[rows[i]["task"]] -= lp
        ntok[rows[i]["task"]] += n
    return {t: (nll[t], ntok[t]) for t in sorted(nll)}


def pooled_ppl(per_task: dict[str, tuple[float, int]]) -> float:
    """Perplexity over every token of every task (from task_nll)."""
    return perplexity(sum(n for n, _ in per_task.values()), sum(k for _, k in per_task.values()))


def per_task_ppl(router, rows: list[dict], adapters: list[str]) -> dict[str, float]:
    """Perplexity of each row's output under the adapter chosen for it, pooled per task."""
    return {t: perplexity(*v) for t, v in task_nll(router, rows, adapters).items()}


def selection_report(router, rows: list[dict], mode: str) -> tuple[dict, list[str], list[list[str]]]:
    ranked, chosen = [], []
    for chunk in batched(rows, 8):
        for sel in router.select([r["instruction"] for r in chunk], mode):
            ranked.append(sel.ranked)
            chosen.append(sel.adapter)
    gold = [r["task"] for r in rows]
    routed = [i for i, a in enumerate(chosen) if a != router.fallback]
    report = {
        "top1": top_k_accuracy(ranked, gold, 1),
        "top3": top_k_accuracy(ranked, gold, 3),
        "fallbacks": 1 - len(routed) / len(rows),
        "routed_precision": sum(chosen[i] == router.adapters.get(gold[i]) for i in routed) / len(routed)
        if routed
        else None,
        "per_task": {},
    }
    for task in sorted(set(gold)):
        idx = [i for i, g in enumerate(gold) if g == task]
        report["per_task"][task] = {
            "n": len(idx),
            "top1": top_k_accuracy([ranked[i] for i in idx], [task] * len(idx), 1),
            "top3": top_k_accuracy([ranked[i] for i in idx], [task] * len(idx), 3),
        }
    return report, chosen, ranked


def answers_for(
    router, rows: list[dict], adapters: list[str], max_new_tokens: int, cache: dict | None = None
) -> list[str]:
    """Greedy answers, each row by the adapter chosen for it (BASE: none); `cache` as in task_nll."""
    cache = {} if cache is None else cache
    for name in dict.fromkeys(adapters):
        idx = [i for i, a in enumerate(adapters) if a == name and (i, name) not in cache]
        for chunk in batched(idx, 8):
            # a chat row is answered from its conversation up to the final assistant turn
            asks = [rows[i].get("messages", [])[:-1] or rows[i]["instruction"] for i in chunk]
            with using(router, name):
                # with the adapters disabled, the one `ask` makes active changes nothing
                got = router.ask(asks, adapter=MIXED if name == BASE else name, max_new_tokens=max_new_tokens)
            cache.update(((i, name), a.answer) for i, a in zip(chunk, got, strict=True))
    return [cache[(i, name)] for i, name in enumerate(adapters)]


def _mean_scores(scores: list[tuple[float, float]]) -> dict[str, float]:
    n = len(scores)
    return {"rougeL": sum(x for x, _ in scores) / n, "exact_match": sum(y for _, y in scores) / n}


def _scores(rows: list[dict], answers: list[str]) -> list[tuple[float, float]]:
    pairs = zip(rows, answers, strict=True)
    return [(rouge_l(a, r["output"]), exact_match(a, r["output"])) for r, a in pairs]


def quality(rows: list[dict], answers: list[str]) -> dict[str, dict]:
    """Mean ROUGE-L and exact match of the answers per task."""
    by: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r, s in zip(rows, _scores(rows, answers), strict=True):
        by[r["task"]].append(s)
    return {t: _mean_scores(v) for t, v in sorted(by.items())}


def overall_quality(rows: list[dict], answers: list[str]) -> dict[str, float]:
    """Mean ROUGE-L and exact match of the answers over all rows."""
    return _mean_scores(_scores(rows, answers))


def route_eval(
    router,
    store: str | Path,
    out: str | Path | None = None,
    max_per_task: int | None = None,
    modes: tuple[str, ...] = ("score", "generate"),
    max_new_tokens: int = 32,
    judge_url: str | None = None,
    judge_model: str = "gpt-3.5-turbo",
    rows: list[dict] | None = None,
    rows_from: str = "the store's test split",
) -> dict:
    """Evaluate a store's routed chain against its task adapters and mixed adapter on its test
    split, or on `rows` (e.g. `routing.eval.unseen.unseen_rows`); write route_eval.json, route_eval.md,
    confusion_<mode>.png, answers.png and human_eval.csv into `out`."""
    store = Path(store)
    out = Path(out or store / "eval")
    rows = load_test_rows(store, max_per_task) if rows is None else rows
    gold = [r["task"] for r in rows]
    result: dict = {
        "rows_from": rows_from,
        "datasets": sorted({r["dataset"] for r in rows if r.get("dataset")}),
        "test_rows": len(rows),
        "per_task_rows": {t: gold.count(t) for t in sorted(set(gold))},
        "selection": {},
        "max_new_tokens": max_new_tokens,
        "calibration": router.manifest.selector.get("calibration"),  # fitted on held-out data sets
        "min_confidence": router.min_confidence,
        "min_in_distribution": router.min_in_distribution,
        "second_opinion": (router.manifest.selector.get("second_opinion") or {}).get("kind"),
        "min_second": router.min_second,
    }
    routed, top1 = None, None
    for mode in modes:
        report, chosen, ranked = selection_report(router, rows, mode)
        result["selection"][mode] = report
        plot_confusion(gold, ranked, router.labels, f"task selection ({mode})", out / f"confusion_{mode}.png")
        if mode == router.mode or routed is None:
            routed = chosen
            top1 = [router.adapters.get(r[0], router.fallback) if r else router.fallback for r in ranked]
    chosen = {
        "oracle": [router.adapters[t] for t in gold],
        "base": [BASE] * len(rows),
        "mixed": [MIXED] * len(rows),
        "routed": routed,
        "top1": top1,
    }
    scored: dict = {}
    nll = {kind: task_nll(router, rows, adapters, scored) for kind, adapters in chosen.items()}
    result["perplexity"] = {kind: {t: perplexity(*v) for t, v in per.items()} for kind, per in nll.items()}
    said: dict = {}
    answers = {kind: answers_for(router, rows, chosen[kind], max_new_tokens, said) for kind in QUALITY_KINDS}
    result["quality"] = {kind: quality(rows, a) for kind, a in answers.items()}
    result["overall"] = {
        "rows": len(rows),
        "perplexity": {kind: pooled_ppl(per) for kind, per in nll.items()},
        "quality": {kind: overall_quality(rows, a) for kind, a in answers.items()},
    }
    plot_answers(result, out / "answers.png")
    result["judge"] = judge_all(rows, answers, judge_url, judge_model)
    sheet = [
        {**r, "adapter": a, "answer": ans} for r, a, ans in zip(rows, routed, answers["routed"], strict=True)
    ]
    write_human_sheet(out / "human_eval.csv", sheet)
    write_json(out / "route_eval.json", result)
    write_text(out / "route_eval.md", report_markdown(result))
    return result


def judge_all(rows: list[dict], answers: dict[str, list[str]], url: str | None, model: str) -> dict:
    """Judged helpfulness per task of each kind's answers (kind -> answers, one per row)."""
    if not url:
        return {"skipped": "no judge endpoint configured (--judge-url); helpfulness not rated"}
    scores: dict = {kind: defaultdict(list) for kind in answers}
    try:
        for i, r in enumerate(rows):
            for kind, got in answers.items():
                score = judge_score(url, model, r["instruction"], r["output"], got[i])
                scores[kind][r["task"]].append(score)
    except JudgeError as e:
        return {"skipped": str(e)}
    return {k: {t: sum(v) / len(v) for t, v in sorted(per.items())} for k, per in scores.items()}


def report_markdown(result: dict) -> str:
    """Tables shaped like the routing paper's Tables I and II, plus answer quality; the base model
    (no adapter) is the last column, the pooled numbers over all tasks the last row."""
    tasks = sorted(result["per_task_rows"])
    ppl, q, overall = result["perplexity"], result["quality"], result["overall"]
    kinds = [k for k in ("oracle", "mixed", "routed", "top1", "base") if k in ppl]
    names = {"oracle": "oracle task adapter", "mixed": "mixed adapter", "routed": "routed chain"}
    names |= {"top1": "top-1, no fallback", "base": "base model (no adapter)"}
    lines = [
        f"Rows: {result['test_rows']} from {result.get('rows_from', 'the test split')}"
        + (f" (data sets: {', '.join(result['datasets'])})" if result.get("datasets") else "")
        + ".",
        "",
        "## Perplexity per task (lower is better)",
        "",
        "| task | n | " + " | ".join(names[k] for k in kinds) + " |",
        "|---|---|" + "---|" * len(kinds),
    ]
    lines += [
        f"| {t} | {result['per_task_rows'][t]} | " + " | ".join(f"{ppl[k][t]:.3f}" for k in kinds) + " |"
        for t in tasks
    ]
    lines.append(
        f"| all | {overall['rows']} | " + " | ".join(f"{overall['perplexity'][k]:.3f}" for k in kinds) + " |"
    )
    lines += ["", "## Task selection accuracy", ""]
    modes = list(result["selection"])
    cal, floor = result.get("calibration"), result.get("min_in_distribution")
    if cal:
        lines += [
            f"Calibration (fitted on {cal['held_out_groups']} held-out data sets of the store's rows): "
            f"temperature {cal['temperature']:.3f}, `{cal['score']}` threshold {cal['threshold']} for "
            f"precision {cal['target_precision']}; applied here: min_in_distribution {floor}.",
            "",
        ]
    if result.get("second_opinion"):
        lines += [
            f"Second opinion: `{result['second_opinion']}` (threshold {result['min_second']}): routed only "
            "when both kinds name the same task and either clears its threshold.",
            "",
        ]
    for m in modes:
        s = result["selection"][m]
        p = s.get("routed_precision")
        lines.append(
            f"- {m}: routed {1 - s['fallbacks']:.3f} of rows, right {'-' if p is None else f'{p:.3f}'}"
        )
    lines.append("")
    lines += [
        "| task | " + " | ".join(f"{m} top-1 | {m} top-3" for m in modes) + " |",
        "|---|" + "---|---|" * len(modes),
    ]
    for t in [*tasks, "all"]:
        cells = []
        for m in modes:
            s = result["selection"][m]
            d = s if t == "all" else s["per_task"][t]
            cells += [f"{d['top1']:.3f}", f"{d['top3']:.3f}"]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    answered = [k for k in QUALITY_KINDS if k in q]
    lines += [
        "",
        "## Answer quality (greedy; ROUGE-L / exact match)",
        "",
        "| task | " + " | ".join(names[k] for k in answered) + " | routed − mixed ROUGE-L |",
        "|---|" + "---|" * (len(answered) + 1),
    ]
    for t, per in [*((t, {k: q[k][t] for k in q}) for t in tasks), ("all", overall["quality"])]:
        cells = [f"{per[k]['rougeL']:.3f} / {per[k]['exact_match']:.3f}" for k in answered]
        if "routed" in per and "mixed" in per:
            cells.append(f"{per['routed']['rougeL'] - per['mixed']['rougeL']:+.3f}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    judge = result["judge"]
    lines += ["", "## Judged helpfulness (1-6)", ""]
    if "skipped" in judge:
        lines.append(f"Skipped: {judge['skipped']}.")
    else:
        lines += ["| task | " + " | ".join(judge) + " |", "|---|" + "---|" * len(judge)]
        lines += [f"| {t} | " + " | ".join(f"{judge[k][t]:.2f}" for k in judge) + " |" for t in tasks]
    return "\n".join(lines) + "\n"
