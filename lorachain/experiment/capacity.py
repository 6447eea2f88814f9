"""The capacity task's report section (issue 42) and its accuracy-against-steps figure.

For each memorisation task (`Task.memorise`): per method, at its validation-chosen lr, the pairs
memorised (greedy exact match over every training key) and the value characters right, each as a
mean with a 95% t-interval over seeds; the fraction of the full − LoRA gap in pairs memorised that
each method closes (Fieller's interval, as `gap.py` does for the score); peak RSS and seconds per
step against LoRA at the base rank; and `curves.png`, the teacher-forced share of whole values right
on the fixed key subset every `train.eval_every` steps (exactly what greedy decoding would get there)
beside the value NLL there. Where every low-rank method is at the floor of exact match, a second
table orders them by the teacher-forced value NLL and token accuracy at the end of the curve, the
share of the LoRA → full NLL gap closed, and the token accuracy at 25% of the budget (how fast a
link init starts).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from lorachain.experiment.capacity_lr import lr_section
from lorachain.experiment.choose import chosen_spec, select
from lorachain.experiment.gap import closed_fraction, test_by_seed
from lorachain.experiment.paired import direction, summarize
from lorachain.experiment.records import PEER_KEYS
from lorachain.tasks import get_task
from lorachain.tasks.capacity import CHANCE


def _interval(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """mean [95% t-interval] ×scale, or the one value."""
    if not values:
        return "–"
    s = summarize(values)
    m, (lo, hi) = scale * s["mean"], s["ci"]
    return (
        f"{m:.{digits}f}"
        if s["n"] < 2
        else f"{m:.{digits}f} [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"
    )


def roles(chosen: dict, task: str, methods: list[str]) -> tuple[str | None, str | None]:
    """(full fine-tuning, LoRA at the lowest rank): the two ends of the gap."""
    mine = [m for m in methods if (task, m) in chosen]
    full = next((m for m in mine if chosen_spec(chosen, m).get("method") == "full"), None)
    singles = [m for m in mine if len(chosen_spec(chosen, m).get("ranks", [])) == 1]
    plain = [m for m in singles if not PEER_KEYS & set(chosen_spec(chosen, m))] or singles
    lora = min(plain, key=lambda m: chosen_spec(chosen, m)["ranks"][0], default=None)
    return full, lora


def closed(
    chosen: dict, task: str, full: str, lora: str, other: str, key: str = "em", values=None, digits: int = 2
) -> str:
    """The share of the full − LoRA gap in `key` (or `values`, `gap.closed_fraction`) that `other`
    closes, with Fieller's 95% interval."""
    g = closed_fraction(chosen, task, full, lora, other, key, values)
    if not g.get("has_gap"):
        return "no gap"
    if g["n"] < 2:
        return f"{g['mean']:.{digits}f} (1 seed)"
    ci = g["ci"]
    if not ci:
        return f"{g['mean']:.{digits}f} (interval unbounded)"
    return f"{g['mean']:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _cost(chosen: dict, task: str, m: str) -> tuple[float, float]:
    """(peak RSS MiB, seconds per training step), means over the chosen rows."""
    rows = chosen[(task, m)]["rows"]
    per_step = [r["cost"]["train_seconds"] / max(1, r["spec"].get("steps", 1)) for r in rows]
    return chosen[(task, m)]["peak_rss_mb"], statistics.fmean(per_step)


def section(chosen: dict, task: str, methods: list[str]) -> str:
    full, lora = roles(chosen, task, methods)
    mine = [m for m in methods if (task, m) in chosen]
    head = "| method | seeds | pairs memorised (%) | value characters right (%) | gap closed (pairs) |"
    head += " peak RSS vs LoRA | s/step vs LoRA |"
    lines = [f"\n## Capacity: {task}\n", head, "|" + "---|" * 7]
    base_rss, base_step = _cost(chosen, task, lora) if lora else (None, None)
    for m in mine:
        em, char = (list(test_by_seed(chosen[(task, m)], k).values()) for k in ("em", "char_acc"))
        gap = closed(chosen, task, full, lora, m) if full and lora and m not in (full, lora) else ""
        rss, step = _cost(chosen, task, m)
        ratio = (f"{rss / base_rss:.2f}", f"{step / base_step:.2f}") if base_rss else ("", "")
        lines.append(
            f"| `{m}` | {len(em)} | {_interval(em)} | {_interval(char)} | {gap} | {ratio[0]} | {ratio[1]} |"
        )
    lines.append(
        f"\nChance: a model that writes values of the right form but knows no pair gets {100 * CHANCE:.2f}% "
        "of the characters and (practically) no pair. Intervals: 95% t over seeds; the gap closed is "
        "mean(method − LoRA) / mean(full − LoRA) in pairs memorised, with Fieller's interval. Costs are "
        "grid cells' (two workers share the cores): the side-by-side benchmark gives the ratios to quote.\n"
    )
    return "\n".join(lines)


def curve_by_seed(entry: dict, key: str, at: float = 1.0) -> dict[int, float]:
    """Each seed's curve value `key` at the last point at or before `at` × its training steps."""
    out = {}
    for r in entry["rows"]:
        limit = at * r["spec"].get("steps", 0) if at < 1.0 else float("inf")
        points = [c for c in r.get("curve") or [] if c["step"] <= limit]
        if points:
            out[r["seed"]] = points[-1][key]
    return out


def em(entry: dict) -> dict[int, float]:
    """Each seed's pairs memorised (greedy exact match over every training key)."""
    return test_by_seed(entry, "em")


def nll(entry: dict) -> dict[int, float]:
    """Each seed's value NLL at the end of its curve."""
    return curve_by_seed(entry, "eval_loss")


def early(entry: dict) -> dict[int, float]:
    """Each seed's token accuracy at 25% of its budget (how fast a link init starts)."""
    return curve_by_seed(entry, "token_acc", at=0.25)


def closed_nll(chosen: dict, task: str, full: str, lora: str, other: str) -> str:
    """The share of the LoRA − full gap in final value NLL that `other` closes (`closed` on −NLL)."""

    def neg_nll(entry: dict) -> dict[int, float]:
        return {s: -v for s, v in nll(entry).items()}

    return closed(chosen, task, full, lora, other, values=neg_nll, digits=3)


def floor_section(chosen: dict, task: str, methods: list[str]) -> str:
    """Teacher-forced figures on the curve's key subset ('' when no cell has a curve)."""
    full, lora = roles(chosen, task, methods)
    mine = [m for m in methods if (task, m) in chosen and nll(chosen[(task, m)])]
    if not mine:
        return ""
    lines = [
        "\n### Below the floor of exact match: teacher-forced values on the curve's keys\n",
        "| method | value NLL at the end (nats/token) | token accuracy at the end (%) | gap closed (NLL) "
        "| token accuracy at 25% of the budget (%) |",
        "|" + "---|" * 5,
    ]
    for m in mine:
        e = chosen[(task, m)]
        end, acc, start = (list(f(e).values()) for f in (nll, lambda e: curve_by_seed(e, "token_acc"), early))
        gap = closed_nll(chosen, task, full, lora, m) if full and lora and m not in (full, lora) else ""
        lines.append(f"| `{m}` | {_interval(end, 1, 3)} | {_interval(acc)} | {gap} | {_interval(start)} |")
    lines.append(
        "\nThe last point of each cell's curve (the fixed key subset, teacher-forced: every value digit "
        "and the end token given the right prefix). A method that writes hex digits but knows no pair "
        "scores about chance on the digits here too; the NLL orders methods that greedy decoding "
        "cannot. Gap closed: mean(LoRA − method) / mean(LoRA − full) in value NLL, Fieller's 95% "
        "interval over seeds.\n"
    )
    return "\n".join(lines)


MOONSHOT_PAIRS, MOONSHOT_GAP = 2.0, 0.5  # issue 42: ≥ 2× LoRA r's pairs, ≥ 50% of the gap closed


def paired(chosen: dict, task: str, ref: str, other: str, values) -> dict:
    """other − ref over the seeds both ran, `values(entry) -> {seed: value}`."""
    a, b = values(chosen[(task, ref)]), values(chosen[(task, other)])
    return summarize([b[s] - a[s] for s in sorted(set(a) & set(b))])


def _diff(s: dict, scale: float, unit: str, more: str, less: str) -> str:
    """A paired difference in words: a direction only where the 95% interval excludes zero."""
    if s["n"] == 0:
        return "no paired seed"
    m = f"{scale * s['mean']:+.{3 if scale == 1 else 1}f}{unit}"
    if s["n"] < 2:
        return f"{m} (1 seed, no interval)"
    lo, hi = (scale * x for x in s["ci"])
    d = direction(s)
    word = more if d > 0 else less if d < 0 else "not shown different"
    return f"{word} ({m} [{lo:+.3f}, {hi:+.3f}])" if scale == 1 else f"{word} ({m} [{lo:+.1f}, {hi:+.1f}])"


def twin(chosen: dict, task: str, m: str) -> str | None:
    """The method whose spec is `m`'s without its link init (the gaussian start it is compared to)."""
    spec = {k: v for k, v in chosen[(task, m)]["spec"].items() if k != "init"}
    return next((o for (t, o), e in chosen.items() if t == task and o != m and e["spec"] == spec), None)


def rank_chains(chosen: dict, task: str, lora: str, methods: list[str]) -> list[str]:
    """The chains among `methods` whose every link has LoRA r's rank."""
    rank = chosen[(task, lora)]["spec"]["ranks"][0]
    return [
        m
        for m in methods
        if len(ranks := chosen[(task, m)]["spec"].get("ranks", [])) > 1 and set(ranks) == {rank}
    ]


def in_words(chosen: dict, task: str, methods: list[str]) -> str:
    """What the tables say, a direction named only where a 95% interval excludes zero: each method
    against LoRA r in pairs memorised and value NLL, the moonshot for each chain of rank-r links, and
    each `gradient` start against its gaussian twin at 25% of the budget."""
    full, lora = roles(chosen, task, methods)
    if not lora:
        return ""
    mine = [m for m in methods if (task, m) in chosen and m not in (full, lora)]
    lines = ["\nIn words (against `" + lora + "`, LoRA at the base rank):\n"]
    for m in mine:
        pairs = _diff(paired(chosen, task, lora, m, em), 100, " points", "more", "fewer")
        value = _diff(paired(chosen, task, lora, m, nll), 1, " nats", "higher", "lower")
        lines.append(f"- `{m}`: pairs memorised: {pairs}; value NLL: {value}.")
    for m in rank_chains(chosen, task, lora, mine):
        base_em, m_em = (statistics.fmean(em(chosen[(task, x)]).values()) for x in (lora, m))
        ratio = (
            "both memorise no pair"
            if base_em == 0 and m_em == 0
            else (f"{m_em / base_em:.2f}× the pairs" if base_em else "pairs where LoRA has none")
        )
        g = closed_fraction(chosen, task, full, lora, m, "em") if full else {}
        frac = g.get("mean")
        met = m_em > 0 and m_em >= MOONSHOT_PAIRS * base_em and frac is not None and frac >= MOONSHOT_GAP
        gap = "no gap" if not g.get("has_gap") else f"{frac:.2f} of the gap in pairs"
        lines.append(
            f"- Moonshot (≥ {MOONSHOT_PAIRS:g}× LoRA r's pairs and ≥ {MOONSHOT_GAP:.0%} of the gap), `{m}`: "
            f"{ratio}, {gap}: **{'met' if met else 'not met'}** (its memory and time ratios come from "
            "`benchmarks/capacity_cost.py`)."
        )
    for m in mine:
        plain = twin(chosen, task, m) if chosen[(task, m)]["spec"].get("init") == "gradient" else None
        if plain:
            s = paired(chosen, task, plain, m, early)
            word = _diff(s, 100, " points", "starts faster than", "starts slower than")
            if s["n"] and s["mean"] >= 0:
                verdict = "met"
            elif s["n"] > 1 and direction(s) == 0:
                verdict = "not shown slower (its interval includes 0)"
            else:
                verdict = "not met"
            lines.append(
                f"- Start (token accuracy at 25% of the budget), `{m}` against `{plain}`: {word}; "
                f"target 'at least as fast': **{verdict}**."
            )
    return "\n".join(lines) + "\n"


def advice(chosen: dict, task: str, methods: list[str]) -> str:
    """The answer to a user, from the paired differences `in_words` prints: whether a chain of
    rank-r links is worth its knots here, which link init to use, and what to use instead."""
    full, lora = roles(chosen, task, methods)
    if not lora:
        return ""
    mine = [m for m in methods if (task, m) in chosen and m not in (full, lora)]

    def vs(ref: str, m: str) -> int:
        """+1 where `m` is shown better than `ref` in pairs or value NLL, -1 where shown worse."""
        return direction(paired(chosen, task, ref, m, em)) or -direction(paired(chosen, task, ref, m, nll))

    chains = rank_chains(chosen, task, lora, mine)
    lines = ["\nSo, for a user on this task:\n"]
    more = [m for m in chains if direction(paired(chosen, task, lora, m, em)) > 0]
    lower = [m for m in chains if m not in more and vs(lora, m) > 0]
    if more:
        lines.append(f"- A chain is worth it here: {_names(more)} memorised more pairs than `{lora}`.")
    for m in lower:
        gap = f", {closed_nll(chosen, task, full, lora, m)} of the LoRA → full NLL gap" if full else ""
        s = paired(chosen, task, lora, m, nll)
        lo, hi = s["ci"]
        lines.append(
            f"- A chain helps only below the floor of exact match: `{m}` ends with a lower value NLL than "
            f"`{lora}` ({s['mean']:+.3f} nats [{lo:+.3f}, {hi:+.3f}]{gap}) "
            "and is not shown to memorise more pairs: for this task's score it is not worth its knots."
        )
    if chains and not more and not lower:
        seeded = [m for m in chains if len(em(chosen[(task, m)])) > 1]
        once = sorted(set(chains) - set(seeded))
        lines.append(
            f"- A chain is not worth its knots here: no chain of rank-r links beat `{lora}` in pairs "
            f"memorised or value NLL ({_names(seeded) or 'none'} with ≥ 2 seeds, so with an interval"
            + (f"; {_names(once)} with one seed)." if once else ").")
        )
    for m in (m for m in mine if chosen[(task, m)]["spec"].get("init") == "gradient"):
        plain = twin(chosen, task, m)
        if not plain:
            continue
        end = paired(chosen, task, plain, m, nll)
        start = paired(chosen, task, plain, m, early)
        d = -direction(end) or direction(start)
        use = (
            "use `gradient`"
            if d > 0
            else "keep the gaussian start (the default, with no gradient pass): `gradient` was "
            + ("shown worse" if d < 0 else "not shown better")
        )
        lines.append(
            f"- Link init: {use}. `{m}` against `{plain}`: value NLL at the end "
            f"{_diff(end, 1, ' nats', 'higher', 'lower')}, token accuracy at 25% of the budget "
            f"{_diff(start, 100, ' points', 'higher', 'lower')}."
        )
    adapters = [m for m in mine if chosen[(task, m)]["spec"].get("method") != "full"] + [lora]
    best = min(adapters, key=lambda m: statistics.fmean(nll(chosen[(task, m)]).values()))
    shown = [m for m in adapters if m != lora and vs(lora, m) > 0]
    if full:
        top = max(max(em(chosen[(task, m)]).values()) for m in adapters)
        low = min(em(chosen[(task, full)]).values())
        rss, step = (a / b for a, b in zip(_cost(chosen, task, full), _cost(chosen, task, lora), strict=True))
        if low > top:
            lines.append(
                f"- Instead: full fine-tuning memorised at least {100 * low:.1f}% of the pairs on every "
                f"seed, where no adapter memorised more than {100 * top:.1f}% on any, at {rss:.2f}× "
                f"`{lora}`'s peak RSS and {step:.2f}× its time per step (grid cells)."
            )
    lines.append(
        f"- Among adapters, {_names(shown) + ' beat' if shown else 'none was shown better than'} `{lora}` "
        "in pairs or value NLL; "
        f"the lowest mean value NLL is `{best}` "
        f"({statistics.fmean(nll(chosen[(task, best)]).values()):.3f} nats)."
    )
    return "\n".join(lines) + "\n"


def _names(methods: list[str]) -> str:
    return ", ".join(f"`{m}`" for m in methods)


def render(results: list[dict], methods: list[str] | None = None) -> str:
    """The capacity sections of every memorisation task in `results` ('' when there is none), and
    the lr choice table when methods ran several lrs."""
    chosen = select(results)
    tasks = sorted({t for t, _ in chosen if get_task(t).memorise})
    order = list(dict.fromkeys([*(methods or []), *sorted({m for _, m in chosen})]))
    parts = [
        section(chosen, t, order)
        + floor_section(chosen, t, order)
        + in_words(chosen, t, order)
        + advice(chosen, t, order)
        for t in tasks
    ]
    return "".join(parts) + lr_section(results)


def plot_curves(results: list[dict], out: Path) -> list[Path]:
    """`curves_<task>.png`: teacher-forced whole values right (left) and value NLL (right, without
    full fine-tuning) on the key subset against steps, one line per method (mean over seeds at its
    chosen lr)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = select(results)
    paths = []
    for task in sorted({t for t, _ in chosen if get_task(t).memorise}):
        mine = sorted((m, e) for (t, m), e in chosen.items() if t == task)
        lines = {m: e for m, e in mine if e["rows"][0].get("curve")}
        if not lines:  # no cell recorded a curve (train.eval_every: 0)
            continue
        full, _ = roles(chosen, task, list(lines))
        fig, (ax, ax_nll) = plt.subplots(1, 2, figsize=(11, 4))
        for k, (m, entry) in enumerate(lines.items()):
            style = {"color": f"C{k % 10}", "linestyle": "-" if k < 10 else "--", "marker": "."}
            curves = [r["curve"] for r in entry["rows"]]
            steps = [c["step"] for c in curves[0]]
            for panel, key, scale in ((ax, "seq_acc", 100), (ax_nll, "eval_loss", 1)):
                if panel is ax_nll and m == full:
                    continue
                mean = [statistics.fmean(c[i][key] for c in curves if len(c) > i) for i in range(len(steps))]
                panel.plot(steps, [scale * v for v in mean], **style, label=f"{m} (lr {entry['lr']:g})")
        ax.set(xlabel="optimizer step", ylabel="whole values right (%)", title=f"{task}: memorisation")
        title = "teacher-forced value NLL" + (f" (without {full}, which reaches ~0)" if full else "")
        ax_nll.set(xlabel="optimizer step", ylabel="value NLL (nats/token)", title=title)
        ax.legend(fontsize=7)
        ax_nll.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"curves_{task}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths
