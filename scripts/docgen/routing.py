"""Tables of the task-routing measurements: selectors, held-out data sets, unseen answers."""

from __future__ import annotations

from pathlib import Path

from docgen.common import f, signed, table


def route_eval(d: dict) -> str:
    p, q = d["perplexity"], d.get("quality", {})
    sel = d["selection"].get("score", {}).get("per_task", {})
    cols = [k for k in ("oracle", "mixed", "routed", "base") if k in p]
    rows = []
    for t in sorted(d["per_task_rows"]):
        rouge = [f(q[k][t].get("rougeL")) if k in q else "-" for k in ("routed", "mixed")]
        rows.append(
            [
                t,
                d["per_task_rows"][t],
                *[f(p[k][t], 2) for k in cols],
                f((sel.get(t) or {}).get("top1")),
                *rouge,
            ]
        )
    if "overall" in d:
        o = d["overall"]
        rouge = [f(o["quality"][k].get("rougeL")) if k in o["quality"] else "-" for k in ("routed", "mixed")]
        rows.append(
            [
                "**all, pooled**",
                o["rows"],
                *[f(o["perplexity"][k], 2) for k in cols],
                f(d["selection"].get("score", {}).get("top1")),
                *rouge,
            ]
        )
    header = [
        "task",
        "rows",
        *[f"ppl {k}" for k in cols],
        "selector top-1",
        "ROUGE-L routed",
        "ROUGE-L mixed",
    ]
    return table(header, rows)


def unseen_answers(runs: dict) -> str:
    """`route eval --unseen` (and the same store's test split): answers per task type and pooled,
    ROUGE-L of routed-with-fallback, top-1 without fallback, oracle, mixed and base."""
    kinds = ("routed", "top1", "oracle", "mixed", "base")
    rows = []
    for path, d in runs.items():
        run, q, o = Path(path).parent.name, d["quality"], d["overall"]
        sel = d["selection"]["score"]
        for t in [*sorted(d["per_task_rows"]), "all"]:
            per = o["quality"] if t == "all" else {k: q[k][t] for k in kinds}
            ppl = o["perplexity"] if t == "all" else {k: d["perplexity"][k][t] for k in kinds}
            top1 = sel["top1"] if t == "all" else sel["per_task"][t]["top1"]
            rows.append(
                [
                    f"`{run}`" if t == "all" else "",
                    f"**{t}**" if t == "all" else t,
                    o["rows"] if t == "all" else d["per_task_rows"][t],
                    f(top1, 2),
                    *[f(per[k]["rougeL"]) for k in kinds],
                    signed(100 * (per["routed"]["rougeL"] - per["mixed"]["rougeL"])),
                    f"{ppl['routed']:.2f} / {ppl['mixed']:.2f}",
                ]
            )
        p = sel.get("routed_precision")
        rows[-1][1] = f"**all** (sent to a task adapter: {f(1 - sel['fallbacks'], 2)}, right {f(p, 2)})"
    head = ["run", "task type", "rows", "selector top-1", "ROUGE-L routed (fallback)", "top-1, no fallback"]
    head += ["oracle", "mixed", "base", "routed − mixed (points)", "ppl routed / mixed"]
    return table(head, rows)


def holdout(runs: dict) -> str:
    """Every leave-one-data-set-out run: folder, kind, its settings, held-out and in-distribution top-1."""
    rows = []
    for path, d in runs.items():
        for kind, k in d["kinds"].items():
            h, i = k["held_out"], k.get("in_distribution") or {}
            st = k.get("settings", {})
            how = ", ".join(f"{x}={st[x]}" for x in ("epochs", "truncation", "max_length") if x in st)
            rows.append(
                [
                    f"`{Path(path).parent.name}`",
                    f"`{kind}`",
                    how,
                    d.get("folds", "-"),
                    h.get("rows", "-"),
                    f(h.get("top1")),
                    f(h.get("top3")),
                    f(i.get("top1")),
                ]
            )
    return table(
        [
            "run",
            "kind",
            "settings",
            "folds",
            "held-out rows",
            "held-out top-1",
            "top-3",
            "in-distribution top-1",
        ],
        rows,
    )


def _balance(b) -> str:
    if not isinstance(b, dict):
        return str(b or "-")
    caps = ", ".join(f"{k}={v}" for k, v in b.items() if k != "balance" and v is not None)
    return b["balance"] + (f" ({caps})" if caps else "")


PROTOTYPES = {"task": "", "dataset": "; data-set prototypes", "row": "; every row a prototype (1-NN)"}


def _kind_balance(balance: dict | None, kind: dict) -> dict | None:
    """The run's balance with a kind's own `data.*` settings of its grid laid over it."""
    if balance is None:
        return None
    out = dict(balance)
    for setting in " ".join(kind.get("settings_chosen", {})).split():
        key, _, value = setting.partition("=")
        if key.startswith("data."):
            out[key[5:]] = None if value == "null" else int(value) if value.isdigit() else value
    return out


def nested(runs: dict) -> str:
    """Nested leave-one-data-set-out: settings, temperature and thresholds chosen on inner folds only."""
    rows = []
    for path, d in runs.items():
        for kind, k in d["kinds"].items():
            msp, cos = k["routing"].get("msp", {}), k["routing"].get("cosine", {})
            rows.append(
                [
                    f"`{Path(path).parent.name}`",
                    f"`{kind}`",
                    _balance(_kind_balance(d.get("balance"), k))
                    + PROTOTYPES.get(d.get("prototypes", "task"), "")
                    + ("; task descriptions" if d.get("descriptions") else ""),
                    d.get("outer_folds", "-"),
                    k["rows"],
                    f(k["top1"]),
                    f(k["top3"]),
                    f(k["macro_top1"]),
                    f"{k['ece_raw']:.3f} → {k['ece_calibrated']:.3f}",
                    f"{f(msp.get('coverage'), 2)} / {f(msp.get('precision'), 2)}",
                    f"{f(cos.get('coverage'), 2)} / {f(cos.get('precision'), 2)}",
                ]
            )
    head = [
        "run",
        "kind",
        "balance",
        "outer folds",
        "rows",
        "top-1",
        "top-3",
        "top-1 over types",
        "ECE → after temperature",
        "max-softmax routed / right",
        "cosine routed / right",
    ]
    return table(head, rows)


def agreement(runs: dict) -> str:
    """Two kinds as each other's second opinion, per nested run that scored two kinds."""
    rows = []
    for path, d in runs.items():
        shown: set[frozenset] = set()  # both rules are symmetric: one row per pair, embedding second
        for pair, a in sorted(d.get("agreement", {}).items(), key=lambda x: x[0].startswith("embedding")):
            if frozenset(pair.split(" / ")) in shown:
                continue
            shown.add(frozenset(pair.split(" / ")))
            rows.append(
                [f"`{Path(path).parent.name}`", f"`{pair}`", d.get("outer_folds", "-"), a["rows"]]
                + [f"{f(a[r]['coverage'], 2)} / {f(a[r]['precision'], 2)}" for r in ("agree", "agree_either")]
            )
    head = ["run", "first / second", "outer folds", "rows", "both agree: routed / right"]
    return table(head + ["agree, either above its threshold: routed / right"], rows)


def variants(d: dict) -> str:
    rows = [[r["truncation"], r["scoring"], f(r["top1"])] for r in d["results"]]
    return table(["truncation", "scoring", "held-out top-1"], rows)


ANSWER_OPTIONS = ("evidence", "routed", "gated", "oracle", "mixed", "base")


def rouge_diff(x: dict) -> str:
    """An option's ROUGE-L minus the mixed adapter's: mean [95% paired bootstrap]."""
    v = x["vs_mixed"]
    return f"{v['mean']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]".replace("-", "−")


def _vs_mixed(x: dict) -> str:
    v = x.get("vs_mixed")
    if not v or not v["n"]:
        return f"{x['rougeL']:.3f}"
    return f"{x['rougeL']:.3f} ({rouge_diff(x)})"


def answer_options(d: dict) -> str:
    """A `route eval --held-out/--lockbox` or `route folds --compare` JSON: per task type, each
    option's ROUGE-L and, in brackets, its difference from the mixed adapter with the 95% interval."""
    opts = [o for o in ANSWER_OPTIONS if o in d["options"]]
    rows = [
        [t, d["options"]["mixed"][t]["n"], *(_vs_mixed(d["options"][o][t]) for o in opts)]
        for t in [*d["per_task_rows"], "all"]
    ]
    labels = d.get("labels", {})
    rows.append(["routed to a task adapter / right when routed", "", *(_label(labels.get(o)) for o in opts)])
    return table(["task type", "rows", *opts], rows)


def _label(lab: dict | None) -> str:
    if not lab:
        return ""
    p = "–" if lab["precision"] is None else f"{lab['precision'] * 100:.1f}%"
    return f"{lab['coverage'] * 100:.1f}% / {p}"
