"""Command line: the only reader of sys.argv and the environment; no logic of its own.

One module per command (`train`, `export`, `demo`, `experiment` with `report`, `route`, `serve` with
`ask`), each adding its parser to the top-level subparsers; `args` holds the options they share.
Nothing outside this package imports it (`python -m lorachain` and the `lorachain` script call `main`).
"""

from __future__ import annotations

import argparse
import os
import sys

from lorachain import __version__
from lorachain.cli import demo, experiment, export, route, serve, train
from lorachain.cli.args import show_defaults


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorachain",
        description="Chains of LoRA adapters: train, evaluate, route, serve and export them.",
    )
    p.add_argument("--version", action="version", version=f"lorachain {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    train.add_parser(sub)
    export.add_parser(sub)
    demo.add_parser(sub)
    experiment.add_parsers(sub)  # experiment, report
    route.add_parser(sub)
    serve.add_parsers(sub)  # ask, serve
    show_defaults(p)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # dependencies' deprecation notices are not the user's business (children inherit this)
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    args = build_parser().parse_args(argv)
    from lorachain.chain.knot import KnotError
    from lorachain.config import ConfigError
    from lorachain.data import DataError
    from lorachain.routing.eval.judge import JudgeError
    from lorachain.store import StoreError

    # the errors that mean bad input from the user: printed as one line
    user_errors = (ConfigError, DataError, KnotError, StoreError, JudgeError, FileNotFoundError)
    try:
        code = args.func(args)
    except user_errors as e:
        print(f"lorachain: error: {e}", file=sys.stderr)
        code = 2
    if "torch.distributed" in sys.modules:  # under torchrun: a clean end on every rank
        from lorachain.training.parallel import end_launch

        code = end_launch(code)
    return code
