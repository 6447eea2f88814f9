"""`lorachain train`: a chain of LoRA (or any run) from a YAML config and dotted overrides."""

from __future__ import annotations

import argparse
from pathlib import Path

from lorachain.cli.args import add_precision


def _train(args: argparse.Namespace) -> int:
    from lorachain.config import load_config
    from lorachain.training.loop import train

    overrides = args.overrides + ([f"train.precision={args.precision}"] if args.precision else [])
    result = train(load_config(args.config, overrides))
    if result.summary.get("status") == "interrupted":
        return 130
    print(f"finished: {Path(load_config(args.config, overrides).output_dir)}/summary.json")
    return 0


def add_parser(sub) -> None:
    """`lorachain train` under the top-level subparsers `sub`."""
    t = sub.add_parser("train", help="train a chain of LoRA from a YAML config")
    t.add_argument("config", help="YAML run config (see configs/)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 chain.links.0.rank=4")
    add_precision(t)
    t.set_defaults(func=_train)
