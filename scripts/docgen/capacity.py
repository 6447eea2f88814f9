"""Tables of issue 42's capacity grid (`results/capacity_grid/`) and its cost benchmark."""

from __future__ import annotations

from docgen.cola import planned_progress
from docgen.common import ROOT, f, table

CAPACITY_CONFIG = ROOT / "configs/experiments/capacity_grid_smollm2.yaml"


def progress(results: list) -> str:
    """Finished cells of those planned, and which methods still lack seeds."""
    planned, done, short, _ = planned_progress(CAPACITY_CONFIG, results)
    if not short:
        return f"All {planned} planned cells are in."
    return (
        f"**Interim: {done} of {planned} planned cells are in**; still to land: "
        f"{', '.join(f'`{m}`' for m in short)}. A method with one seed has no interval yet."
    )


def capacity_grid(results: dict) -> str:
    """The report's capacity section (pairs, characters, gap closed, teacher-forced NLL) for the docs."""
    import yaml

    from lorachain.experiment import capacity

    rows = list(results.values())
    methods = list(yaml.safe_load(CAPACITY_CONFIG.read_text())["methods"])
    text = capacity.render(rows, methods=methods).strip()
    text = text.split("\n", 1)[1].strip()  # without its own "## Capacity: capacity" heading
    return progress(rows) + "\n\n" + text


def capacity_cost(d: dict) -> str:
    """`benchmarks/capacity_cost.py`: each configuration against LoRA r1, medians over fresh processes."""
    rows = [
        [
            r["config"],
            f(r["time_ratio"], 2),
            f(r["step_ratio"], 2),
            f(r["mem_ratio"], 2),
            f(r["median_step_s"]),
            f(r["median_knot_s"]),
            f"{r['peak_rss_mb']:.0f}",
        ]
        for r in d["rows"]
    ]
    head = ["configuration", "time vs LoRA r1", "s/step vs LoRA r1", "peak RSS vs LoRA r1"]
    head += ["step s", "knot s"]
    note = (
        f"{d['model']}, {d['precision']}, batch {d['batch_size']}, {d['steps']} steps, "
        f"{d['repeats']} fresh-process repeats interleaved, medians."
    )
    return table(head + ["peak RSS MB"], rows) + "\n\n" + note
