"""Command line (with `routing.commands`, its `route` subcommands): the only readers of sys.argv and
the environment; no logic of its own."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lorachain import __version__
from lorachain.routing.commands import add_route_parser, router_args, router_from_args

PRECISION_HELP = "training precision (overrides the config; auto = bf16 where the device runs it fast)"


def add_precision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16", "auto"], default=None, help=PRECISION_HELP)


def _train(args: argparse.Namespace) -> int:
    from lorachain.config import load_config
    from lorachain.training.loop import train

    overrides = args.overrides + ([f"train.precision={args.precision}"] if args.precision else [])
    result = train(load_config(args.config, overrides))
    if result.summary.get("status") == "interrupted":
        return 130
    print(f"finished: {Path(load_config(args.config, overrides).output_dir)}/summary.json")
    return 0


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


def _demo(args: argparse.Namespace) -> int:
    from lorachain.demo import run_demo, sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            run_demo(args.out, steps=args.steps, precision=args.precision or "auto")
    except KeyboardInterrupt:
        print("lorachain: demo stopped; its worker processes were stopped too", file=sys.stderr)
        return 130
    return 0


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


def _ask(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    router = router_from_args(args)
    answers = router.ask(args.instruction, adapter=args.adapter)
    out = [asdict(a) for a in answers]
    print(json.dumps(out[0] if len(out) == 1 else out, indent=2, ensure_ascii=False))
    return 0


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from lorachain.serve.api import create_app
    from lorachain.serve.engine import Engine
    from lorachain.serve.router import Router

    router = Router.from_store(args.store, mode=args.mode, top_k=args.top_k, cache_size=args.cache_size)
    key = args.api_key or os.environ.get("LORACHAIN_API_KEY")
    if args.upstream:
        from lorachain.serve.proxy import create_proxy_app

        app = create_proxy_app(
            router,
            args.upstream,
            api_key=key,
            upstream_key=args.upstream_key or os.environ.get("LORACHAIN_UPSTREAM_KEY"),
            max_prompt_tokens=args.max_prompt_tokens,
            max_tokens_limit=args.max_tokens_limit,
            timeout=args.upstream_timeout,
        )
        print(f"lorachain proxy on http://{args.host}:{args.port} -> {args.upstream}", file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        return 0
    engine = Engine(
        router, max_batch=args.max_batch, window_ms=args.batch_window_ms, max_queue=args.max_queue
    )
    app = create_app(
        engine,
        api_key=key,
        max_prompt_tokens=args.max_prompt_tokens,
        max_tokens_limit=args.max_tokens_limit,
        max_context=args.max_context,
        max_request_bytes=int(args.max_request_mb * (1 << 20)),
        truncate={"store": None, "left": True, "none": False}[args.truncation],
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    engine.close()
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lorachain",
        description="Chains of LoRA adapters: train, evaluate, route, serve and export them.",
    )
    p.add_argument("--version", action="version", version=f"lorachain {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a chain of LoRA from a YAML config")
    t.add_argument("config", help="YAML run config (see configs/)")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 chain.links.0.rank=4")
    add_precision(t)
    t.set_defaults(func=_train)
    e = sub.add_parser("export", help="export a finished run as one PEFT adapter (and a merged model)")
    e.add_argument("run_dir", help="a finished run folder, or `vllm STORE OUT`, or `gguf STORE|RUN OUT`")
    e.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    e.add_argument("--out", default=None, help="adapter folder (default RUN_DIR/adapter)")
    e.add_argument("--merged", default=None, help="also write the merged model to this folder")
    e.add_argument(
        "--keep-quantized", action="store_true", help="gguf: copy the base's quantised GGUF, not an F32 one"
    )
    e.set_defaults(func=_export)
    d = sub.add_parser("demo", help="COLA vs plain LoRA on SmolLM2-135M and embedded SST-2 data")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=None, help="training steps per method (default: 1 epoch)")
    add_precision(d)
    d.set_defaults(func=_demo)

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

    add_route_parser(sub, add_precision)

    a = sub.add_parser("ask", help="route an instruction to its task adapter and answer (JSON)")
    router_args(a, 64)
    a.add_argument("instruction", nargs="+", help="one or more instructions (answered as a batch)")
    a.add_argument("--adapter", default=None, help="skip selection and use this adapter")
    a.set_defaults(func=_ask)

    s = sub.add_parser("serve", help="OpenAI-compatible server over an adapter store")
    s.add_argument("store")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--mode", choices=["score", "generate"], default="score")
    s.add_argument("--top-k", type=int, default=3)
    s.add_argument("--cache-size", type=int, default=8, help="task adapters kept loaded (LRU)")
    s.add_argument("--max-batch", type=int, default=16)
    s.add_argument("--batch-window-ms", type=float, default=10.0)
    s.add_argument("--max-queue", type=int, default=64, help="queued requests before 429")
    s.add_argument("--max-prompt-tokens", type=int, default=1024)
    s.add_argument("--max-tokens-limit", type=int, default=256)
    s.add_argument("--max-context", type=int, default=None, help="context window (default: the model's)")
    s.add_argument("--max-request-mb", type=float, default=8.0, help="request bodies over this get 413")
    s.add_argument(
        "--truncation",
        choices=["store", "left", "none"],
        default="store",
        help="prompts over the context: refuse (none), keep their end (left), or as the store says",
    )
    s.add_argument("--api-key", default=None, help="required bearer key (or LORACHAIN_API_KEY)")
    s.add_argument(
        "--upstream",
        default=None,
        help="proxy mode: run only the selector here, forward to this OpenAI-compatible URL "
        "(http://host:port or http://host:port/v1)",
    )
    s.add_argument(
        "--upstream-key", default=None, help="bearer key for the upstream (or LORACHAIN_UPSTREAM_KEY)"
    )
    s.add_argument("--upstream-timeout", type=float, default=300.0, help="seconds before a 504")
    s.set_defaults(func=_serve)
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
        return args.func(args)
    except user_errors as e:
        print(f"lorachain: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
