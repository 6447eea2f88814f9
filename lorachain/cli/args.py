"""What several commands share: the --precision flag, and every option's default shown in --help."""

from __future__ import annotations

import argparse

PRECISION_HELP = "training precision (overrides the config; auto = bf16 where the device runs it fast)"


def add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "auto"], default=None, help=PRECISION_HELP)


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option of `parser` and its subcommands states its default in --help."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                show_defaults(child)
            continue
        hidden = action.help == argparse.SUPPRESS or action.default in (None, argparse.SUPPRESS)
        if not action.option_strings or hidden or action.nargs == 0 or "%(default)" in (action.help or ""):
            continue
        action.help = f"{action.help} (default: %(default)s)" if action.help else "default: %(default)s"
