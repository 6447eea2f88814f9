"""Generated parts of the docs and the README, so that no figure is typed by hand.

- `docs/reference/config.md` from the config dataclasses (every key, type, default, comment);
- `docs/reference/cli.md` from the argparse parser;
- every table between `<!-- table: NAME -->` and `<!-- /table -->` in README.md and docs/**/*.md,
  rendered from the committed JSON named in `TABLES` (benchmarks/results/, results/) by the
  renderers in `scripts/docgen/` (one module per part of the docs).

    python scripts/docs_gen.py           # write them (make docs-tables)
    python scripts/docs_gen.py --check   # exit 1 listing every file that differs (the drift test)
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from pathlib import Path

from docgen.bench import (
    cola_cost,
    emulated_bf16,
    lm_eval,
    parallel,
    precision_speed,
    reference_cost,
    routing_cost,
    scale,
    serve_big,
    serve_load,
)
from docgen.capacity import capacity_cost, capacity_grid
from docgen.cola import (
    demo,
    gap_grid,
    gap_knots,
    gap_pilot,
    gap_precision_check,
    gap_report,
    gap_summary,
    grid_scores,
    paired_grid,
)
from docgen.common import ROOT, exists, load
from docgen.headline import GAP_CELLS, LOCKBOX, headline
from docgen.preference import dpo_gsm8k
from docgen.reference import cli_reference, config_reference
from docgen.routing import (
    agreement,
    answer_options,
    holdout,
    nested,
    route_eval,
    unseen_answers,
    variants,
)

MARK = re.compile(r"(<!-- table: ([\w-]+) -->\n)(.*?)(<!-- /table -->)", re.S)


TABLES: dict[str, tuple[str | list[str], str, Callable]] = {
    "headline": (
        [
            "results/cola_smollm2_table1/results.json",
            "results/cola_smollm2_table6/results.json",
            "benchmarks/results/precision.json",
            "benchmarks/results/cola_cost.json",
            "benchmarks/results/serve_load.json",
            "benchmarks/results/parallel.json",
            "benchmarks/results/scale.json",
            "benchmarks/results/demo.json",
            "benchmarks/results/reference_cost.json",
            LOCKBOX,
            GAP_CELLS,
        ],
        "the commands in docs/measured.md",
        headline,
    ),
    "demo": ("benchmarks/results/demo.json", "lorachain demo", demo),
    "table1": (
        "results/cola_smollm2_table1/results.json",
        "lorachain experiment configs/experiments/cola_smollm2_table1.yaml",
        paired_grid([("lora", "cola2"), ("lora", "cola3")]),
    ),
    "table6": (
        "results/cola_smollm2_table6/results.json",
        "lorachain experiment configs/experiments/cola_smollm2_table6.yaml",
        paired_grid([("lora_n100", "cola_n100"), ("lora_n50", "cola_n50")]),
    ),
    "short-budget": (
        "results/cola_smollm2/results.json",
        "lorachain experiment configs/experiments/cola_smollm2.yaml",
        grid_scores,
    ),
    "gemma3": (
        "results/cola_gemma3/results.json",
        "lorachain experiment configs/experiments/cola_gemma3.yaml",
        grid_scores,
    ),
    "minilm": (
        "results/cola_minilm/results.json",
        "lorachain experiment configs/experiments/cola_minilm.yaml",
        grid_scores,
    ),
    "gap-pilot": (
        "results/cola_gap_pilot/cells/*/*/*/*/result.json",
        "lorachain experiment configs/experiments/cola_gap_pilot_smollm2.yaml",
        gap_pilot,
    ),
    "gap-pilot-gsm8k": (
        "results/cola_gap_pilot_gsm8k/cells/*/*/*/*/result.json",
        "lorachain experiment configs/experiments/cola_gap_pilot_gsm8k_smollm2.yaml",
        gap_pilot,
    ),
    "gap-grid": (
        "results/cola_gap_smollm2/cells/*/*/*/*/result.json",
        "lorachain experiment configs/experiments/cola_gap_smollm2.yaml (make gap-grid)",
        gap_grid,
    ),
    "gap-report": (
        "results/cola_gap_smollm2/cells/*/*/*/*/result.json",
        "lorachain report results/cola_gap_smollm2",
        gap_report,
    ),
    "gap-knots": (
        "results/cola_gap_smollm2/cells/*/*/*/*/result.json",
        "lorachain report results/cola_gap_smollm2",
        gap_knots,
    ),
    "capacity-grid": (
        "results/capacity_grid/cells/*/*/*/*/result.json",
        "lorachain report results/capacity_grid (make capacity-grid)",
        capacity_grid,
    ),
    "capacity-cost": (
        "benchmarks/results/capacity_cost.json",
        "python benchmarks/capacity_cost.py",
        capacity_cost,
    ),
    "gap-precision-check": (
        "results/cola_gap_emulated_check/cells/*/*/*/*/result.json",
        "lorachain experiment configs/experiments/cola_gap_{emulated,fp32}_check.yaml",
        gap_precision_check,
    ),
    "gap-summary": (
        "results/cola_gap_smollm2/cells/*/*/*/*/result.json",
        "lorachain report results/cola_gap_smollm2",
        gap_summary,
    ),
    "precision": (
        "benchmarks/results/precision.json",
        "python benchmarks/precision.py --accuracy",
        precision_speed,
    ),
    "emulated-bf16": (
        "benchmarks/results/emulated_bf16.json",
        "python benchmarks/emulated_bf16.py --steps --accuracy --attention --attention-choice",
        emulated_bf16,
    ),
    "cola-cost": ("benchmarks/results/cola_cost.json", "python benchmarks/cola_cost.py", cola_cost),
    "lm-eval": (
        "benchmarks/results/lm_eval_agreement.json",
        "python benchmarks/lm_eval_agreement.py",
        lm_eval,
    ),
    "serve-big": (
        "benchmarks/results/serve_stress_big.json",
        "OMP_NUM_THREADS=1 python benchmarks/serve_stress.py --big 40",
        serve_big,
    ),
    "serve-load": ("benchmarks/results/serve_load.json", "python benchmarks/serve_load.py", serve_load),
    "parallel": (
        "benchmarks/results/parallel.json",
        "python benchmarks/parallel.py --steps 6 --repeats 3",
        parallel,
    ),
    "scale": ("benchmarks/results/scale.json", "python benchmarks/scale.py", scale),
    "routing-cost": (
        "benchmarks/results/routing_cost.json",
        "OMP_NUM_THREADS=1 python benchmarks/routing_cost.py --repeats 3",
        routing_cost,
    ),
    "routing-t0": (
        "results/routing_t0_smollm2/route_eval.json",
        "lorachain route eval (results/README.md)",
        route_eval,
    ),
    "routing-table1": (
        "results/routing_table1_smollm2/route_eval.json",
        "lorachain route eval stores/t0_smollm2_table1 --max-per-task 25 --modes score",
        route_eval,
    ),
    "holdout": (
        "results/routing_holdout/task_by_dataset*/holdout.json",
        "lorachain route eval configs/route/t0_smollm2.yaml --holdout-by dataset (its JSON's command)",
        holdout,
    ),
    "nested": (
        "results/routing_holdout/nested_*/nested.json",
        "lorachain route eval configs/route/t0_smollm2.yaml --holdout-by dataset --nested "
        "(each run's command: results/routing_holdout/README.md)",
        nested,
    ),
    "agreement": (
        "results/routing_holdout/nested_agreement*/nested.json",
        "lorachain route eval configs/route/t0_smollm2.yaml --holdout-by dataset --nested --kinds "
        "encoder,embedding (the command: results/routing_holdout/README.md)",
        agreement,
    ),
    "routing-unseen": (
        "results/routing_unseen/*/route_eval.json",
        "lorachain route eval stores/t0_smollm2_unseen [--unseen] --max-per-task 20 (results/README.md)",
        unseen_answers,
    ),
    "routing-folds": (
        "results/routing_folds/compare/pooled/compare.json",
        "lorachain route folds configs/route/t0_smollm2_folds.yaml --compare",
        answer_options,
    ),
    "routing-in-distribution": (
        "results/routing_folds/compare_in/pooled/compare.json",
        "lorachain route folds configs/route/t0_smollm2_folds.yaml --in-distribution --max-per-task 8",
        answer_options,
    ),
    "routing-lockbox": (
        "results/routing_lockbox/half_a/compare.json",
        "lorachain route eval stores/full --lockbox data/lockbox --half A --gate-margin 0.2 "
        "(results/routing_lockbox/README.md)",
        answer_options,
    ),
    "reference-cost": (
        "benchmarks/results/reference_cost.json",
        "OMP_NUM_THREADS=1 python benchmarks/reference_cost.py",
        reference_cost,
    ),
    "dpo-gsm8k": (
        "benchmarks/results/dpo_gsm8k_smollm2.json",
        "OMP_NUM_THREADS=1 python benchmarks/dpo_gsm8k.py",
        dpo_gsm8k,
    ),
    "variants": (
        "results/routing_holdout/variants/variants.json",
        "python benchmarks/selector_variants.py --per-dataset 60",
        variants,
    ),
}


def render_table(name: str) -> str:
    path, command, fn = TABLES[name]
    if not exists(path):
        return f"*Not measured yet: `{path}` is written by `{command}`.*\n"
    where = "the files named in it" if isinstance(path, list) else f"`{path}`"
    return f"{fn(load(path))}\n\n*Rendered from {where}, written by `{command}`.*\n"


def fill_tables(text: str, where: str) -> str:
    def sub(m: re.Match) -> str:
        if m.group(2) not in TABLES:
            raise SystemExit(f"{where}: unknown table {m.group(2)!r}; known: {', '.join(TABLES)}")
        return m.group(1) + render_table(m.group(2)) + m.group(4)

    return MARK.sub(sub, text)


# -- the whole set --------------------------------------------------------------------------------
# figures the docs show, copied from the run folder that wrote them (mkdocs serves only docs/)
FIGURES = {
    "docs/img/gap.png": "results/cola_gap_smollm2/gap.png",
    "docs/img/links.png": "results/cola_gap_smollm2/links.png",
    "docs/img/dpo_gsm8k.png": "benchmarks/results/dpo_gsm8k_smollm2.png",
    "docs/img/capacity_curves.png": "results/capacity_grid/curves_capacity.png",
}


def _same(path: Path, content: str | bytes) -> bool:
    if not path.is_file():
        return False
    return (path.read_bytes() if isinstance(content, bytes) else path.read_text()) == content


def outputs() -> dict[Path, str | bytes]:
    """Every generated file and its content."""
    out: dict[Path, str | bytes] = {
        ROOT / dst: (ROOT / src).read_bytes() for dst, src in FIGURES.items() if (ROOT / src).is_file()
    }
    out |= {
        ROOT / "docs" / "reference" / "config.md": config_reference(),
        ROOT / "docs" / "reference" / "cli.md": cli_reference(),
    }
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        if path in out:
            continue
        text = path.read_text()
        out[path] = fill_tables(text, str(path.relative_to(ROOT)))
    return out


def drift() -> list[str]:
    """The generated files whose committed text differs from what the code and JSON render."""
    return [str(p.relative_to(ROOT)) for p, content in outputs().items() if not _same(p, content)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if a generated file differs")
    args = ap.parse_args(argv)
    if args.check:
        stale = drift()
        for p in stale:
            print(f"{p}: differs from what scripts/docs_gen.py renders; run it", file=sys.stderr)
        return 1 if stale else 0
    for path, content in outputs().items():
        if not _same(path, content):
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
