"""Tables of issue 42's capacity grid (`results/capacity_grid/`) and its cost benchmark."""

from __future__ import annotations

from docgen.common import ROOT, f, table

CAPACITY_CONFIG = ROOT / "configs/experiments/capacity_grid_smollm2.yaml"


def progress(results: list) -> str:
    """Finished cells of those planned, and which methods still lack seeds."""
    from lorachain.config import load_config
    from lorachain.experiment.config import ExperimentConfig
    from lorachain.experiment.runner import Cell, plan

    cfg = load_config(CAPACITY_CONFIG, cls=ExperimentConfig)
    cells = plan(cfg)
    done = {Cell(r["task"], r["method"], r["seed"], r["lr"]).id for r in results}
    missing = [c for c in cells if c.id not in done]
    if not missing:
        return f"All {len(cells)} planned cells are in."
    short = sorted({c.method for c in missing}, key=list(cfg.methods).index)
    return (
        f"**Interim: {len(cells) - len(missing)} of {len(cells)} planned cells are in**; still to land: "
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
    return (
        progress(rows)
        + "\n\n"
        + text.replace("### Below the floor", "**Below the floor").replace(
            "curve's keys\n", "curve's keys**\n", 1
        )
    )


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
