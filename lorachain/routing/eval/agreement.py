"""Two selector kinds as each other's second opinion, on the nested held-out folds.

A route is taken only when both kinds name the same task (`agree`: no parameter, nothing to
choose), or when they agree and the first kind's temperature-scaled top probability clears a
threshold chosen on the inner folds for the target precision (`agree_msp`: the per-row inner
outputs of both kinds, on the same inner folds), or when they agree and either kind's msp clears its
own inner threshold for the target (`agree_either`). The rest go to the fallback. Read from the
outer folds `routing.eval.nested` keeps per kind.
"""

from __future__ import annotations

from lorachain.routing import calibrate as cal


def _agreeing_scores(top_a: list, top_b: list, msp_a: list[float]) -> list[float]:
    """The first kind's msp where the two top labels agree, else -1 (never routed)."""
    return [m if x == y else -1.0 for x, y, m in zip(top_a, top_b, msp_a, strict=True)]


def agreement(folds_a: list[dict], folds_b: list[dict], target: float) -> dict:
    """Coverage and precision of `agree` and `agree_msp` over the outer rows of two kinds' folds
    (the same outer groups, the same rows in the same order), and the bound of `agree_msp` with
    its threshold chosen looking at the outer rows (not a result)."""
    if [f["groups"] for f in folds_a] != [f["groups"] for f in folds_b]:
        raise ValueError("agreement: the two kinds were scored on different outer folds")
    agree, kept, either, all_s, all_c = [], [], [], [], []
    for fa, fb in zip(folds_a, folds_b, strict=True):
        if fa["gold"] != fb["gold"]:
            raise ValueError(f"agreement: outer fold {fa['groups']}: the kinds scored different rows")
        top_a, top_b = [r[0] for r in fa["ranked"]], [r[0] for r in fb["ranked"]]
        correct = [t == g for t, g in zip(top_a, fa["gold"], strict=True)]
        score = _agreeing_scores(top_a, top_b, fa["scores"]["msp"])
        ia, ib = fa.get("inner"), fb.get("inner")
        threshold = None
        if ia and ib and ia["gold"] == ib["gold"]:
            inner = _agreeing_scores(ia["top1"], ib["top1"], ia["msp"])
            right = [t == g for t, g in zip(ia["top1"], ia["gold"], strict=True)]
            threshold = cal.threshold_for_precision(inner, right, target)
        own = [_clears(fa, i) or _clears(fb, i) for i in range(len(correct))]
        for s, c, o in zip(score, correct, own, strict=True):
            if s >= 0:
                agree.append(c)
                if o:
                    either.append(c)
            if threshold is not None and s >= threshold and s >= 0:
                kept.append(c)
        all_s += score
        all_c += correct
    n = len(all_c)
    best = cal.threshold_for_precision(all_s, all_c, target)

    def rate(kept: list[bool]) -> dict:
        return {"coverage": len(kept) / n, "precision": sum(kept) / len(kept) if kept else None}

    return {
        "rows": n,
        "agree": rate(agree),
        "agree_msp": rate(kept),
        "agree_either": rate(either),
        "bound_looking_at_outer": cal.routed(all_s, all_c, best),
    }


def _clears(fold: dict, i: int) -> bool:
    """Whether outer row `i` of a kind's fold has msp at or above the kind's inner threshold."""
    t = fold["thresholds"].get("msp")
    return t is not None and fold["scores"]["msp"][i] >= t


def agreement_markdown(pairs: dict[str, dict], target: float) -> list[str]:
    """Table lines for `nested.md`: one row per pair of kinds."""
    if not pairs:
        return []

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    lines = [
        "",
        "Two kinds as each other's second opinion (route only when both name the same task; "
        f"`agree_msp` also needs the first kind's msp above a threshold chosen inside for {target} on "
        "the agreeing rows, `agree_either` either kind's msp above its own inner threshold):",
        "",
        "| first / second | agree: coverage / precision | agree_msp: coverage / precision | "
        "agree_either: coverage / precision | bound: coverage / precision |",
        "|---|---|---|---|---|",
    ]
    for name, p in pairs.items():
        b = p["bound_looking_at_outer"]
        lines.append(
            f"| {name} | {p['agree']['coverage']:.3f} / {pct(p['agree']['precision'])} | "
            f"{p['agree_msp']['coverage']:.3f} / {pct(p['agree_msp']['precision'])} | "
            f"{p['agree_either']['coverage']:.3f} / {pct(p['agree_either']['precision'])} | "
            f"{b['coverage']:.3f} / {pct(b['precision'])} |"
        )
    return lines
