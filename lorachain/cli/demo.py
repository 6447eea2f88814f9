"""`lorachain demo`: COLA vs plain LoRA on SmolLM2-135M and embedded SST-2 data."""

from __future__ import annotations

import argparse
import sys

from lorachain.cli.args import add_precision


def _demo(args: argparse.Namespace) -> int:
    from lorachain.demo import run_demo, sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            run_demo(args.out, steps=args.steps, precision=args.precision or "auto")
    except KeyboardInterrupt:
        print("lorachain: demo stopped; its worker processes were stopped too", file=sys.stderr)
        return 130
    return 0


def add_parser(sub) -> None:
    """`lorachain demo` under the top-level subparsers `sub`."""
    d = sub.add_parser("demo", help="COLA vs plain LoRA on SmolLM2-135M and embedded SST-2 data")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=None, help="training steps per method (default: 1 epoch)")
    add_precision(d)
    d.set_defaults(func=_demo)
