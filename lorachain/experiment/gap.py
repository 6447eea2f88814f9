"""How much of the LoRA → full fine-tuning gap a chain closes, and what it forgets (issue 24).

From a grid with a full fine-tuning method and LoRA methods at one or more ranks (a method's
`spec.ranks`: one rank is LoRA, several a chain): per task, each method's mean ± std at its chosen lr,
each chain against LoRA at its rank (paired over seeds, 95% interval), the fraction of the gap closed
mean(chain − LoRA) / mean(full − LoRA) with Fieller's interval over the paired seeds (a ratio of two
noisy means: unbounded when the gap itself is not clearly above zero), and forgetting (the general
set's NLL increase, each chain's paired against LoRA and full; an unrelated task's score drop, each
method's paired against full and each chain's against LoRA).
Its figures are drawn by gap_plot.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

from lorachain.experiment.choose import select
from lorachain.experiment.paired import direction, fmt_ci, pair_diffs, summarize, t975
from lorachain.experiment.records import PEER_KEYS

MIN_GAP = 0.01  # full − LoRA below one point (of a 0–1 score): no gap to close


def roles(chosen: dict, methods: list[str]) -> tuple[str | None, dict[int, str], dict[str, int]]:
    """(the full fine-tuning method, LoRA method by rank, chain method -> its first link's rank)."""
    full, lora, chains = None, {}, {}
    for m in methods:
        spec = next((c["spec"] for (t, mm), c in chosen.items() if mm == m), {})
        ranks = spec.get("ranks") or []
        if spec.get("method") == "full":
            full = full or m
        elif len(ranks) == 1 and not PEER_KEYS & set(spec):  # PiSSA, DoRA, LoRA+ ... are not LoRA
            lora.setdefault(ranks[0], m)
        elif len(ranks) > 1:
            chains[m] = ranks[0]
    return full, lora, chains


def _mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return "–"
    m = scale * statistics.fmean(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {scale * statistics.stdev(values):.{digits}f}"


def fieller(num: list[float], den: list[float]) -> tuple[float, float] | None:
    """95% interval of mean(num) / mean(den) for paired samples (Fieller's theorem, t quantile);
    None when the denominator's mean is not clearly non-zero (the interval is then unbounded)."""
    n = len(num)
    if n < 2:
        return None
    a, b = statistics.fmean(num), statistics.fmean(den)
    vaa = statistics.variance(num) / n
    vbb = statistics.variance(den) / n
    vab = statistics.covariance(num, den) / n
    t2 = t975(n - 1) ** 2
    qa, qb, qc = b * b - t2 * vbb, -2 * (a * b - t2 * vab), a * a - t2 * vaa
    if qa <= 0:
        return None
    root = math.sqrt(max(0.0, qb * qb - 4 * qa * qc))
    return ((-qb - root) / (2 * qa), (-qb + root) / (2 * qa))


def test_by_seed(entry: dict, key: str | None = None) -> dict[int, float]:
    """A chosen entry's test figures by seed: its score, or `key` of each row's test scores."""
    if key is None:
        return entry["test"]
    return {r["seed"]: r["test"][key] for r in entry["rows"] if key in r["test"]}


def closed_fraction(
    chosen: dict,
    task: str,
    full: str,
    lora: str,
    chain: str,
    key: str | None = None,
    values: Callable[[dict], dict[int, float]] | None = None,
) -> dict:
    """The gap closed, mean(chain − LoRA) / mean(full − LoRA) over the seeds all three ran, with
    Fieller's 95% interval (None: unbounded, the gap itself is not clearly above zero), the gap's own
    paired interval, and the per-seed fractions; `has_gap: False` when the mean gap is below MIN_GAP.
    In the test score, in `key` of the test scores (the capacity task's pairs memorised, `em`), or in
    `values(entry) -> {seed: value}` (higher is better)."""
    entries = [chosen.get((task, m)) for m in (full, lora, chain)]
    if not all(entries):
        return {"n": 0}
    f, lo, c = (values(e) if values else test_by_seed(e, key) for e in entries)
    seeds = sorted(set(f) & set(lo) & set(c))
    gaps = [f[s] - lo[s] for s in seeds]
    gains = [c[s] - lo[s] for s in seeds]
    gap = summarize(gaps)
    out = {"n": gap["n"], "gap": gap["mean"], "gap_ci": gap["ci"]}
    out["has_gap"] = bool(gaps) and out["gap"] >= MIN_GAP
    if not out["has_gap"]:
        return out
    out["fractions"] = [x / g for x, g in zip(gains, gaps, strict=True) if abs(g) > 1e-9]
    out["mean"] = statistics.fmean(gains) / out["gap"]
    out["ci"] = fieller(gains, gaps)
    return out


def forgetting_by_seed(chosen: dict, task: str, method: str, key: str) -> dict[int, float]:
    c = chosen.get((task, method))
    rows = (c or {}).get("rows", [])
    return {r["seed"]: r["forgetting"][key] for r in rows if key in r.get("forgetting", {})}


def forgetting_diff(chosen: dict, task: str, ref: str, other: str, key: str) -> dict:
    """Paired forgetting other − ref (mean, 95% interval) on the seeds both scored."""
    a, b = (forgetting_by_seed(chosen, task, m, key) for m in (ref, other))
    return summarize([b[s] - a[s] for s in sorted(set(a) & set(b))])


def forgetting_values(chosen: dict, task: str, method: str, key: str) -> list[float]:
    return list(forgetting_by_seed(chosen, task, method, key).values())


LEARNS = ("scores above", "scores below", "is not shown to score differently from")
FORGETS = ("forgets more than", "forgets less than", "is not shown to forget differently from")


def _sign(s: dict, above: str, below: str, same: str) -> str:
    """Which way a paired difference points, in words, only where its 95% interval says so."""
    return {1: above, -1: below, 0: same}[direction(s)]


def in_words(chain: str, ref: str, score: dict, nll_lora: dict, nll_full: dict) -> str:
    """One sentence per chain: its score against LoRA at its rank, its forgetting against both."""
    if min(score["n"], nll_lora["n"], nll_full["n"]) < 2:
        return f"- `{chain}` against `{ref}`: fewer than two paired seeds, no interval yet."
    learn = _sign(score, *LEARNS)
    forget, forget_full = (_sign(d, *FORGETS) for d in (nll_lora, nll_full))
    return f"- `{chain}` {learn} `{ref}`; it {forget} `{ref}`, and {forget_full} full fine-tuning."


def gap_in_words(chosen: dict, task: str, full: str, ref: str) -> str:
    """One sentence per LoRA rank: was there a gap, full fine-tuning against it, in score and forgetting."""
    score = summarize(pair_diffs(chosen, task, ref, full))
    nll = forgetting_diff(chosen, task, ref, full, "general_nll_increase")
    if min(score["n"], nll["n"]) < 2:
        return f"- full fine-tuning against `{ref}`: fewer than two paired seeds, no interval yet."
    learn = _sign(score, *LEARNS)
    forget = _sign(nll, *FORGETS)
    return (
        f"- full fine-tuning {learn} `{ref}` ({fmt_ci(score)} points) and {forget} it "
        f"({fmt_ci(nll, 1.0, 2)} general NLL)."
    )


def rank_in_words(chosen: dict, task: str, low: str, high: str) -> str:
    """The capacity gap a low-rank chain is meant to close: LoRA at a higher rank against the lowest."""
    score = summarize(pair_diffs(chosen, task, low, high))
    if score["n"] < 2:
        return f"- `{high}` against `{low}`: fewer than two paired seeds, no interval yet."
    learn = _sign(score, *LEARNS)
    return f"- `{high}` {learn} `{low}` ({fmt_ci(score)} points)."


def _names(methods: list[str]) -> str:
    return ", ".join(f"`{m}`" for m in methods)


def _half_widths(stats: list[dict]) -> str:
    hw = sorted((s["ci"][1] - s["ci"][0]) / 2 for s in stats)
    return f"±{hw[0]:.1f}" if hw[0] == hw[-1] else f"±{hw[0]:.1f} to ±{hw[-1]:.1f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n:,}"


def _where(d: dict[str, dict], above: bool) -> list[str]:
    return [m for m, s in d.items() if direction(s) == (1 if above else -1)]


def _either_way(d: dict[str, dict], more: str, less: str, neither: str) -> str:
    """The methods whose interval lies above zero and those below, in words; `neither` if none."""
    said = [f"{_names(ms)} {w}" for ms, w in ((_where(d, True), more), (_where(d, False), less)) if ms]
    return "; ".join(said) + "." if said else neither


def _gap_sentence(gaps: dict[str, dict], ranks: str) -> str:
    up, down = _where(gaps, True), _where(gaps, False)
    if len(up) == len(gaps):
        return f"Full fine-tuning scored above LoRA at every rank tried ({ranks}): there was a gap to close."
    if up:
        return f"Full fine-tuning scored above {_names(up)}, not clearly above the other LoRA ranks."
    below = f"; it scored below {_names(down)}" if down else ""
    return (
        f"Full fine-tuning was not shown to score above LoRA at any rank tried ({ranks}), so on this task "
        f"there was no measurable gap for a chain to close{below}."
    )


def takeaway(chosen: dict, task: str, full: str, lora: dict[int, str], chains: dict[str, int]) -> str:
    """What one task's intervals add up to, in a paragraph: was there a gap, did a chain score or
    forget differently from LoRA at its rank, and what that leaves a user with ('' before every
    comparison has two paired seeds). Directions are named only where a 95% interval excludes zero."""
    refs = {r: ref for r, ref in sorted(lora.items()) if (task, ref) in chosen}
    mine = {c: lora[r] for c, r in chains.items() if (task, c) in chosen and (task, lora.get(r)) in chosen}
    gaps = {ref: summarize(pair_diffs(chosen, task, ref, full)) for ref in refs.values()}
    score = {c: summarize(pair_diffs(chosen, task, ref, c)) for c, ref in mine.items()}
    forget = {c: forgetting_diff(chosen, task, ref, c, "general_nll_increase") for c, ref in mine.items()}
    forget_full = {c: forgetting_diff(chosen, task, full, c, "general_nll_increase") for c in mine}
    stats = [*gaps.values(), *score.values(), *forget.values(), *forget_full.values()]
    if (task, full) not in chosen or not refs or not mine or min(s["n"] for s in stats) < 2:
        return ""
    lo, hi = min(s["n"] for s in stats), max(s["n"] for s in stats)
    seeds = f"{lo}" if lo == hi else f"{lo}–{hi}"
    out = [_gap_sentence(gaps, ", ".join(f"r={r}" for r in refs))]
    same_rank = "LoRA at the same rank"
    no_gain = (
        f"No chain ({len(score)} tried) was shown to score differently from LoRA at its rank; their "
        f"intervals are {_half_widths(list(score.values()))} points, so a gain of that size cannot be "
        f"told from none with {seeds} seeds."
    )
    out.append(_either_way(score, f"scored above {same_rank}", f"scored below {same_rank}", no_gain))
    nll = "(the general set's NLL)"
    no_diff = f"No chain was shown to forget differently from LoRA at its rank {nll}."
    out.append(
        _either_way(forget, f"forgot more than {same_rank} {nll}", f"forgot less than {same_rank}", no_diff)
    )
    if more_full := _where(forget_full, True):
        out.append(f"{len(more_full)} of {len(mine)} chains forgot more than full fine-tuning.")
    drop = {c: forgetting_diff(chosen, task, ref, c, "task_score_drop") for c, ref in mine.items()}
    if any(s["n"] >= 2 for s in drop.values()):
        name = chosen[(task, full)]["rows"][0]["forgetting"].get("task")
        name = f"`{name}`" if name else "the unrelated task"
        lost = f"lost more of the base's score on {name} than {same_rank}"
        none = f"No chain was shown to lose more or less of the base's score on {name} than {same_rank}."
        out.append(_either_way(drop, lost, lost.replace("lost more", "lost less"), none))
    up, more = _where(score, True), _where(forget, True)
    if up:
        cost = ", at a cost in forgetting." if set(up) & set(more) else "."
        out.append("Here a chain bought score over LoRA at its own rank" + cost)
    else:
        cost = ", and some cost more forgetting." if more else "."
        out.append("Here a chain bought nothing measurable over LoRA at its own rank" + cost)
    params = chosen[(task, full)]["rows"][0]["cost"].get("trainable_params")
    n_train = chosen[(task, full)]["counts"].get("train")
    out.append(
        f"This is one task on {f'a {_count(params)}-parameter model' if params else 'one model'}"
        + (f" with {n_train:,} training examples" if n_train else "")
        + f" and {seeds} seeds: measure the gap on your own model and data first (full fine-tuning "
        "beside LoRA at two ranks, as the pilot does), since a chain can only close a gap that exists, "
        "and count forgetting as part of its cost."
    )
    return " ".join(out)


def _closed(g: dict) -> str:
    if not g["has_gap"]:
        return "no gap to close"
    if g["n"] < 2:
        return f"{g['mean']:.2f}"
    if g["ci"] is None:
        return f"{g['mean']:.2f} [unbounded: the gap is not clearly above 0]"
    return f"{g['mean']:.2f} [{g['ci'][0]:.2f}, {g['ci'][1]:.2f}]"


def render(results: list[dict], tasks: list[str] | None = None, methods: list[str] | None = None) -> str:
    """The gap section of report.md (empty without a full fine-tuning method and a LoRA method)."""
    chosen = select(results)
    tasks = tasks or list(dict.fromkeys(r["task"] for r in results))
    methods = methods or list(dict.fromkeys(r["method"] for r in results))
    full, lora, chains = roles(chosen, methods)
    if not full or not lora:
        return ""
    lines = ["## The LoRA → full fine-tuning gap (issue 24)", ""]
    head = ["method", "test score ×100", "general NLL increase", "unrelated task drop ×100"]
    for task in tasks:
        lines += [f"### {task}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in methods:
            c = chosen.get((task, m))
            if not c:
                continue
            nll = _mean_std(forgetting_values(chosen, task, m, "general_nll_increase"), 1.0, 3)
            drop = _mean_std(forgetting_values(chosen, task, m, "task_score_drop"))
            lines.append(
                f"| `{m}` (lr {c['lr']:g}) | {_mean_std(list(c['test'].values()))} | {nll} | {drop} |"
            )
        cols = ["chain", "vs LoRA at its rank ×100 [95% CI]", "gap full − LoRA ×100 [95% CI]"]
        cols += ["gap closed [95% CI]", "general NLL vs LoRA [95% CI]", "general NLL vs full [95% CI]"]
        lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        nll = "general_nll_increase"
        refs = [ref for _, ref in sorted(lora.items()) if (task, ref) in chosen]
        words = [gap_in_words(chosen, task, full, ref) for ref in refs]
        words += [rank_in_words(chosen, task, refs[0], ref) for ref in refs[1:]]
        for chain, rank in chains.items():
            ref = lora.get(rank)
            g = closed_fraction(chosen, task, full, ref, chain) if ref else {"n": 0}
            if not g["n"]:
                continue
            s = summarize(pair_diffs(chosen, task, ref, chain))
            gap_s = {"n": g["n"], "mean": g["gap"], "ci": g["gap_ci"]}
            f_lora = forgetting_diff(chosen, task, ref, chain, nll)
            f_full = forgetting_diff(chosen, task, full, chain, nll)
            row = [f"`{chain}` vs `{ref}`", fmt_ci(s, empty="–"), fmt_ci(gap_s, 100.0, empty="–"), _closed(g)]
            row += [fmt_ci(f, 1.0, 3, empty="–") for f in (f_lora, f_full)]
            lines.append("| " + " | ".join(row) + " |")
            words.append(in_words(chain, ref, s, f_lora, f_full))
        lines += unrelated_table(chosen, task, methods, full, lora, chains)
        rule = (
            "a direction is named only where the 95% interval excludes zero; "
            "a difference the same on every seed has no interval"
        )
        lines += ["", f"In words ({rule}):", ""]
        lines += words + [""]
        summary = takeaway(chosen, task, full, lora, chains)
        lines += [f"**What it adds up to.** {summary}", ""] if summary else []
    return "\n".join(lines) + "\n"


def unrelated_table(
    chosen: dict, task: str, methods: list[str], full: str, lora: dict, chains: dict
) -> list[str]:
    """The unrelated task's score drop paired over seeds: every method against full fine-tuning,
    each chain also against LoRA at its rank (×100; positive: it lost more of the base's score)."""
    key, rows = "task_score_drop", []
    for m in methods:
        if m == full or not forgetting_by_seed(chosen, task, m, key):
            continue
        ref = lora.get(chains[m]) if m in chains else None
        vs_lora = fmt_ci(forgetting_diff(chosen, task, ref, m, key), 100.0, empty="–") if ref else "–"
        vs_full = fmt_ci(forgetting_diff(chosen, task, full, m, key), 100.0, empty="–")
        rows.append(f"| `{m}` | {vs_lora} | {vs_full} |")
    if not rows:
        return []
    head = "| method | unrelated task drop vs LoRA at its rank ×100 [95% CI] | vs full ×100 [95% CI] |"
    return ["", head, "|---|---|---|", *rows]
