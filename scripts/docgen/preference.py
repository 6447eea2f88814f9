"""The preference-tuning guide's measured table (benchmarks/dpo_gsm8k.py)."""

from __future__ import annotations

from docgen.common import f, table


def dpo_gsm8k(d: dict) -> str:
    """Held-out preference accuracy, margin and the chosen log-ratio to the reference, per evaluation."""
    rows = []
    for name, r in d["runs"].items():
        links = " + ".join(f"r{k['rank']} ({k['steps']} steps)" for k in r["links"])
        for e in r["evals"]:
            final = e is r["evals"][-1]
            rows.append(
                [
                    f"`{name}`" if final else name,
                    links,
                    e["step"],
                    f"**{f(e['pref_accuracy'], 3)}**" if final else f(e["pref_accuracy"], 3),
                    f(e["margin"], 3),
                    f(e["chosen_logratio"], 4),
                    f(e["dpo_loss"], 3),
                ]
            )
    header = ["run", "links", "step", "pref. accuracy", "margin", "log-ratio / token (chosen)", "DPO loss"]
    walls = ", ".join(f"{n} {r['wall_seconds']:.0f} s" for n, r in d["runs"].items())
    env = d["environment"]
    return table(header, rows) + (
        f"\n\nTraining file of {d['data']['train']['pairs']} pairs, "
        f"{d['data']['eval']['pairs']} held-out pairs; "
        f"torch {env['torch']}, {env['threads']} thread; wall time (whole `lorachain train`): {walls}."
    )
