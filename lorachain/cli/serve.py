"""`lorachain ask` and `lorachain serve` over an adapter store, and the store options they share with
`lorachain route eval`."""

from __future__ import annotations

import argparse
import json
import os
import sys


def router_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("store", help="adapter store folder (made by `lorachain route train`)")
    p.add_argument("--mode", choices=["score", "generate"], default="score", help="task selection mode")
    p.add_argument("--top-k", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument(
        "--gate-margin",
        type=float,
        default=None,
        help="the likelihood gate (selector.gate) at this margin, nats/token (default: the store's)",
    )


def router_from_args(args: argparse.Namespace):
    from lorachain.serve.router import Router

    gate = "store" if args.gate_margin is None else args.gate_margin
    return Router.from_store(
        args.store, mode=args.mode, top_k=args.top_k, max_new_tokens=args.max_new_tokens, gate_margin=gate
    )


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


def add_parsers(sub) -> None:
    """`lorachain ask` and `lorachain serve` under the top-level subparsers `sub`."""
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
