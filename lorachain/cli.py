"""Command line: the only reader of sys.argv and the environment; no logic of its own."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lorachain import __version__


def _train(args: argparse.Namespace) -> int:
    from lorachain.config import load_config
    from lorachain.train import train

    result = train(load_config(args.config, args.overrides))
    if result.summary.get("status") == "interrupted":
        return 130
    print(f"finished: {Path(load_config(args.config, args.overrides).output_dir)}/summary.json")
    return 0


def _export(args: argparse.Namespace) -> int:
    from lorachain.export import export_run

    for path in export_run(args.run_dir, args.out, merged=args.merged):
        print(path)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from lorachain.demo import run_demo

    run_demo(args.out, steps=args.steps)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lorachain", description=__doc__)
    p.add_argument("--version", action="version", version=f"lorachain {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a chain of LoRA from a YAML config")
    t.add_argument("config", help="YAML run config (see configs/)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 chain.links.0.rank=4")
    t.set_defaults(func=_train)
    e = sub.add_parser("export", help="export a finished run as one PEFT adapter (and a merged model)")
    e.add_argument("run_dir")
    e.add_argument("--out", default=None, help="adapter folder (default RUN_DIR/adapter)")
    e.add_argument("--merged", default=None, help="also write the merged model to this folder")
    e.set_defaults(func=_export)
    d = sub.add_parser("demo", help="COLA vs plain LoRA on SmolLM2-135M and embedded SST-2 data")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=None, help="training steps per method (default: 1 epoch)")
    d.set_defaults(func=_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from lorachain.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"lorachain: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
