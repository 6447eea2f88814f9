"""`lorachain export`: a run as one PEFT adapter (and a merged model), a store for vLLM, GGUF files."""

from __future__ import annotations

import argparse
import sys


def _export(args: argparse.Namespace) -> int:
    if args.run_dir == "vllm":  # `lorachain export vllm STORE OUT`
        from lorachain.export.vllm import NOTES, export_vllm

        if len(args.rest) != 2:
            raise SystemExit("usage: lorachain export vllm STORE OUT")
        print(NOTES.format(port=8001), file=sys.stderr)
        print(export_vllm(*args.rest))
        return 0
    if args.run_dir == "gguf":  # `lorachain export gguf STORE|RUN OUT`
        from lorachain.export.gguf import export_gguf

        if len(args.rest) != 2:
            raise SystemExit("usage: lorachain export gguf STORE|RUN OUT [--keep-quantized]")
        for path in export_gguf(*args.rest, keep_quantized=args.keep_quantized):
            print(path)
        return 0
    from lorachain.export import export_run

    for path in export_run(args.run_dir, args.out, merged=args.merged):
        print(path)
    return 0


def add_parser(sub) -> None:
    """`lorachain export` under the top-level subparsers `sub`."""
    e = sub.add_parser("export", help="export a finished run as one PEFT adapter (and a merged model)")
    e.add_argument("run_dir", help="a finished run folder, or `vllm STORE OUT`, or `gguf STORE|RUN OUT`")
    e.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    e.add_argument("--out", default=None, help="adapter folder (default RUN_DIR/adapter)")
    e.add_argument("--merged", default=None, help="also write the merged model to this folder")
    e.add_argument(
        "--keep-quantized", action="store_true", help="gguf: copy the base's quantised GGUF, not an F32 one"
    )
    e.set_defaults(func=_export)
