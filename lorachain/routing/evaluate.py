"""`lorachain route eval`: the routing paper's evaluation on a store's test split.

Per task: perplexity of the oracle task adapter, the mixed adapter and the routed chain (Table I);
selector top-1/top-3 accuracy in both modes with confusion matrices (Table II); ROUGE-L and exact
match of greedy answers (routed vs mixed); optional judged helpfulness; a human-evaluation sheet.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from lorachain.data import encode_row
from lorachain.evaluate import sequence_logprobs
from lorachain.io import atomic_write, write_json, write_text
from lorachain.metrics import exact_match, perplexity, rouge_l, top_k_accuracy
from lorachain.routing.judge import JudgeError, judge_score, write_human_sheet
from lorachain.store import MIXED

NONE = "(none)"


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


def per_task_ppl(router, rows: list[dict], adapters: list[str]) -> dict[str, float]:
    """Perplexity of each row's output under the adapter chosen for it, pooled per task."""
    nll: dict[str, float] = defaultdict(float)
    ntok: dict[str, int] = defaultdict(int)
    for name in dict.fromkeys(adapters):
        idx = [i for i, a in enumerate(adapters) if a == name]
        router.activate(name)
        examples = [encode_row(router.answer_cfg, router.tok, rows[i], "test", classifier=False) for i in idx]
        for i, (lp, n) in zip(
            idx, sequence_logprobs(router.model, examples, router.tok.pad_token_id, 8), strict=True
        ):
            nll[rows[i]["task"]] -= lp
            ntok[rows[i]["task"]] += n
    return {t: perplexity(nll[t], ntok[t]) for t in sorted(nll)}


def selection_report(router, rows: list[dict], mode: str) -> tuple[dict, list[str], list[list[str]]]:
    ranked, chosen = [], []
    for chunk in batched(rows, 8):
        for sel in router.select([r["instruction"] for r in chunk], mode):
            ranked.append(sel.ranked)
            chosen.append(sel.adapter)
    gold = [r["task"] for r in rows]
    report = {
        "top1": top_k_accuracy(ranked, gold, 1),
        "top3": top_k_accuracy(ranked, gold, 3),
        "fallbacks": sum(a == router.fallback for a in chosen) / len(rows),
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


def answers_for(router, rows: list[dict], adapters: list[str], max_new_tokens: int) -> list[str]:
    out = [""] * len(rows)
    for name in dict.fromkeys(adapters):
        idx = [i for i, a in enumerate(adapters) if a == name]
        for chunk in batched(idx, 8):
            # a chat row is answered from its conversation up to the final assistant turn
            asks = [rows[i].get("messages", [])[:-1] or rows[i]["instruction"] for i in chunk]
            got = router.ask(asks, adapter=name, max_new_tokens=max_new_tokens)
            for i, a in zip(chunk, got, strict=True):
                out[i] = a.answer
    return out


def quality(rows: list[dict], answers: list[str]) -> dict[str, dict]:
    by: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r, a in zip(rows, answers, strict=True):
        by[r["task"]].append((rouge_l(a, r["output"]), exact_match(a, r["output"])))
    return {
        t: {"rougeL": sum(x for x, _ in v) / len(v), "exact_match": sum(y for _, y in v) / len(v)}
        for t, v in sorted(by.items())
    }


def plot_confusion(
    gold: list[str], ranked: list[list[str]], labels: list[str], title: str, path: Path
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = labels + [NONE]
    counts = [[0] * len(cols) for _ in labels]
    for g, r in zip(gold, ranked, strict=True):
        counts[labels.index(g)][cols.index(r[0] if r else NONE)] += 1
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(cols), 1.0 + 0.6 * len(labels)))
    ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i, row in enumerate(counts):
        for j, v in enumerate(row):
            if v:
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
    ax.set(xlabel="selected (top-1)", ylabel="true task", title=title)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def route_eval(
    router,
    store: str | Path,
    out: str | Path | None = None,
    max_per_task: int | None = None,
    modes: tuple[str, ...] = ("score", "generate"),
    max_new_tokens: int = 32,
    judge_url: str | None = None,
    judge_model: str = "gpt-3.5-turbo",
) -> dict:
    """Evaluate a store's routed chain against its task adapters and mixed adapter; write
    route_eval.json, route_eval.md, confusion_<mode>.png and human_eval.csv into `out`."""
    store = Path(store)
    out = Path(out or store / "eval")
    rows = load_test_rows(store, max_per_task)
    gold = [r["task"] for r in rows]
    result: dict = {
        "test_rows": len(rows),
        "per_task_rows": {t: gold.count(t) for t in sorted(set(gold))},
        "selection": {},
        "max_new_tokens": max_new_tokens,
    }
    routed = None
    for mode in modes:
        report, chosen, ranked = selection_report(router, rows, mode)
        result["selection"][mode] = report
        plot_confusion(gold, ranked, router.labels, f"task selection ({mode})", out / f"confusion_{mode}.png")
        if mode == router.mode or routed is None:
            routed = chosen
    oracle = [router.adapters[t] for t in gold]
    mixed = [MIXED] * len(rows)
    result["perplexity"] = {
        "oracle": per_task_ppl(router, rows, oracle),
        "mixed": per_task_ppl(router, rows, mixed),
        "routed": per_task_ppl(router, rows, routed),
    }
    routed_answers = answers_for(router, rows, routed, max_new_tokens)
    mixed_answers = answers_for(router, rows, mixed, max_new_tokens)
    result["quality"] = {"routed": quality(rows, routed_answers), "mixed": quality(rows, mixed_answers)}
    result["judge"] = judge_all(rows, routed_answers, mixed_answers, judge_url, judge_model)
    sheet = [
        {**r, "adapter": a, "answer": ans} for r, a, ans in zip(rows, routed, routed_answers, strict=True)
    ]
    write_human_sheet(out / "human_eval.csv", sheet)
    write_json(out / "route_eval.json", result)
    write_text(out / "route_eval.md", report_markdown(result))
    return result


def judge_all(rows, routed_answers, mixed_answers, url: str | None, model: str) -> dict:
    if not url:
        return {"skipped": "no judge endpoint configured (--judge-url); helpfulness not rated"}
    scores: dict = {"routed": defaultdict(list), "mixed": defaultdict(list)}
    try:
        for r, a, m in zip(rows, routed_answers, mixed_answers, strict=True):
            scores["routed"][r["task"]].append(judge_score(url, model, r["instruction"], r["output"], a))
            scores["mixed"][r["task"]].append(judge_score(url, model, r["instruction"], r["output"], m))
    except JudgeError as e:
        return {"skipped": str(e)}
    return {k: {t: sum(v) / len(v) for t, v in sorted(per.items())} for k, per in scores.items()}


def report_markdown(result: dict) -> str:
    """Tables shaped like the routing paper's Tables I and II, plus answer quality."""
    tasks = sorted(result["per_task_rows"])
    ppl, q = result["perplexity"], result["quality"]
    lines = [
        "## Perplexity per task (lower is better)",
        "",
        "| task | n | oracle task adapter | mixed adapter | routed chain |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {t} | {result['per_task_rows'][t]} | {ppl['oracle'][t]:.3f} | {ppl['mixed'][t]:.3f} | "
        f"{ppl['routed'][t]:.3f} |"
        for t in tasks
    ]
    lines += ["", "## Task selection accuracy", ""]
    modes = list(result["selection"])
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
    lines += [
        "",
        "## Answer quality (greedy, ROUGE-L / exact match)",
        "",
        "| task | routed ROUGE-L | mixed ROUGE-L | routed EM | mixed EM |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {t} | {q['routed'][t]['rougeL']:.3f} | {q['mixed'][t]['rougeL']:.3f} | "
        f"{q['routed'][t]['exact_match']:.3f} | {q['mixed'][t]['exact_match']:.3f} |"
        for t in tasks
    ]
    judge = result["judge"]
    lines += ["", "## Judged helpfulness (1-6)", ""]
    if "skipped" in judge:
        lines.append(f"Skipped: {judge['skipped']}.")
    else:
        lines += ["| task | routed | mixed |", "|---|---|---|"]
        lines += [f"| {t} | {judge['routed'][t]:.2f} | {judge['mixed'][t]:.2f} |" for t in tasks]
    return "\n".join(lines) + "\n"
