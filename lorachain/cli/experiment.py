"""`lorachain experiment` (the COLA paper's resumable grid) and `lorachain report` (its tables)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lorachain.cli.args import add_precision


def _experiment(args: argparse.Namespace) -> int:
    from lorachain.config import load_config
    from lorachain.experiment.config import ExperimentConfig
    from lorachain.experiment.runner import run_experiment

    overrides = args.overrides + ([f"base.train.precision={args.precision}"] if args.precision else [])
    cfg = load_config(args.config, overrides, cls=ExperimentConfig)
    if args.status:
        from lorachain.experiment.status import render, summary
        from lorachain.models import best_device
        from lorachain.training.precision import resolve

        prec = resolve(cfg.base.get("train", {}).get("precision", "auto"), best_device())
        print(render(summary(cfg, "emulated" if prec.emulate else "native")))
        return 0
    try:
        counts = run_experiment(cfg)
    except KeyboardInterrupt:
        print("stopped; run the same command again to continue", file=sys.stderr)
        return 130
    print(f"{counts['computed']} cells computed, {counts['cached']} already done; {cfg.output_dir}/report.md")
    return 0


def _report(args: argparse.Namespace) -> int:
    from lorachain.experiment.grid import collect
    from lorachain.experiment.report import write_report

    results = collect(args.folder)
    if not results:
        raise SystemExit(f"lorachain: error: {args.folder}: no finished cells (cells/**/result.json)")
    grid = Path(args.folder) / "experiment.json"  # its task and method order, when there is one
    order = json.loads(grid.read_text()) if grid.is_file() else {}
    print(write_report(results, Path(args.folder), order.get("tasks"), list(order.get("methods", {}))))
    return 0


def add_parsers(sub) -> None:
    """`lorachain experiment` and `lorachain report` under the top-level subparsers `sub`."""
    x = sub.add_parser("experiment", help="the COLA paper's grid: tasks x methods x seeds x lrs (resumable)")
    x.add_argument("config", help="YAML experiment config (see configs/experiments/)")
    x.add_argument("overrides", nargs="*", help="dotted overrides, e.g. seeds=[0] tasks=[rte]")
    add_precision(x)
    x.add_argument(
        "--status", action="store_true", help="show done/running/paused cells and the time left; run nothing"
    )
    x.set_defaults(func=_experiment)
    rp = sub.add_parser("report", help="tables and plots of an experiment folder's finished cells")
    rp.add_argument("folder")
    rp.set_defaults(func=_report)
