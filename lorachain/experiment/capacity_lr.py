"""The learning-rate choice on a memorisation task (issue 42): each lr's validation figures and the
one with the lowest teacher-forced NLL of the validation values."""

from __future__ import annotations

import statistics

from lorachain.tasks import get_task


def lr_choice(results: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (task, method) with two or more lrs on a memorisation task: each lr's validation figures
    and the chosen lr, the one with the lowest teacher-forced NLL of the validation values
    (`val.ref_nll`; ties go to the higher character accuracy). On a short budget greedy accuracy can
    still be at chance for every lr, while the NLL already orders them."""
    by: dict[tuple[str, str], dict[float, list[dict]]] = {}
    for r in results:
        if get_task(r["task"]).memorise:
            by.setdefault((r["task"], r["method"]), {}).setdefault(r["lr"], []).append(r)
    out = {}
    for key, lrs in by.items():
        if len(lrs) < 2:
            continue
        val = {
            lr: {k: statistics.fmean(r["val"][k] for r in rows) for k in ("ref_nll", "char_acc", "em")}
            for lr, rows in lrs.items()
        }
        best = min(val, key=lambda lr: (val[lr]["ref_nll"], -val[lr]["char_acc"]))
        out[key] = {"lrs": val, "chosen": best, "score_choice": max(val, key=lambda lr: val[lr]["char_acc"])}
    return out


def lr_section(results: list[dict]) -> str:
    """The lr choice table ('' when no method has two lrs)."""
    choice = lr_choice(results)
    if not choice:
        return ""
    lines = [
        "\n## Learning-rate choice (validation keys)\n",
        "| task | method | lr | value NLL | characters right (%) | pairs memorised (%) | chosen |",
        "|" + "---|" * 7,
    ]
    for (task, m), c in sorted(choice.items()):
        for lr, v in sorted(c["lrs"].items()):
            mark = "**yes**" if lr == c["chosen"] else ""
            lines.append(
                f"| {task} | `{m}` | {lr:g} | {v['ref_nll']:.3f} | {100 * v['char_acc']:.1f} | "
                f"{100 * v['em']:.1f} | {mark} |"
            )
    differ = [m for (_, m), c in sorted(choice.items()) if c["chosen"] != c["score_choice"]]
    lines.append(
        "\nChosen: the lowest teacher-forced NLL of the validation values. Greedy character accuracy "
        f"would have chosen otherwise for: {', '.join(differ) or 'none'}.\n"
    )
    return "\n".join(lines)
