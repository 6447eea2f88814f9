"""Serving throughput and latency on loopback: mixed-adapter batching against swapping per request.

One command: `python benchmarks/serve_load.py [--requests-per-slot 3 --max-tokens 32]`. A real
`lorachain serve` app (uvicorn, 127.0.0.1) on SmolLM2-135M with 8 task adapters (random r=8
weights, real store), a bounded load generator at concurrency 1, 8 and 32, three set-ups:
  (a) mixed: batches of up to 32 requests for any of the 8 adapters, 8 adapters kept loaded;
  (b) swap:  one request at a time, its adapter loaded per request (LRU of 1) — the naive way;
  (c) single: batching as (a), but every request for the same adapter — what batching can reach.
Prints a table and writes JSON. Target: (a) >= 3x (b) at concurrency 32 and >= 0.8x (c).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

SETUPS = {
    "mixed": dict(max_batch=32, cache_size=8, spread=True),
    "swap": dict(max_batch=1, cache_size=1, spread=True),
    "single": dict(max_batch=32, cache_size=8, spread=False),
}
PROMPTS = [
    "Is this review positive or negative? The soup was cold.",
    "What is the capital of Peru?",
    "Summarize: the council approved the new park on Monday.",
    "Name a synonym of quick.",
]


def serve(store: Path, max_batch: int, cache_size: int):
    from lorachain.serve.api import create_app
    from lorachain.serve.background import BackgroundServer
    from lorachain.serve.engine import Engine
    from lorachain.serve.router import Router

    router = Router.from_store(store, cache_size=cache_size)
    engine = Engine(router, max_batch=max_batch, window_ms=20, max_queue=256)
    return BackgroundServer(create_app(engine, max_tokens_limit=256)), engine


async def load(url: str, models: list[str], concurrency: int, n: int, max_tokens: int) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    lat, tokens, codes = [], 0, []

    async def one(i: int, client) -> None:
        nonlocal tokens
        async with sem:
            body = {
                "model": models[i % len(models)],
                "prompt": PROMPTS[i % len(PROMPTS)],
                "max_tokens": max_tokens,
                "stop": [],
                "ignore_eos": True,  # every answer max_tokens long: set-ups compare at equal work
            }
            t0 = time.perf_counter()
            r = await client.post(f"{url}/v1/completions", json=body)
            lat.append(time.perf_counter() - t0)
            codes.append(r.status_code)
            if r.status_code == 200:
                tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i, client) for i in range(n)))
        wall = time.perf_counter() - t0
    lat.sort()
    return {
        "requests_per_s": n / wall,
        "requests": n,
        "ok": codes.count(200),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(lat),
        "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests-per-slot", type=int, default=3, help="requests = concurrency x this (min 8)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from routing_cost import make_store

    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        make_store(store, 8)
        from lorachain.store import read_manifest

        tasks = [n for n, a in read_manifest(store).adapters.items() if a["kind"] == "task"]
        for name, s in SETUPS.items():
            server, engine = serve(store, s["max_batch"], s["cache_size"])
            url = server.url
            models = tasks if s["spread"] else tasks[:1]
            asyncio.run(load(url, models, 1, 2, args.max_tokens))  # warm-up
            for c in (1, 8, 32):
                n = max(8, c * args.requests_per_slot)
                results.setdefault(name, {})[c] = asyncio.run(load(url, models, c, n, args.max_tokens))
                r = results[name][c]
                print(
                    f"{name:6s} c={c:2d}: {r['tokens_per_s']:7.1f} tok/s  p50 {r['p50_s']:.2f}s  "
                    f"p99 {r['p99_s']:.2f}s  ok {r['ok']}/{r['requests']}",
                    flush=True,
                )
            server.stop()
            engine.close()
    ratios = {
        c: {
            "mixed_over_swap": results["mixed"][c]["tokens_per_s"] / results["swap"][c]["tokens_per_s"],
            "mixed_over_single": results["mixed"][c]["tokens_per_s"] / results["single"][c]["tokens_per_s"],
        }
        for c in (1, 8, 32)
    }
    print("\nconcurrency  mixed tok/s  swap tok/s  single tok/s  mixed/swap  mixed/single")
    for c in (1, 8, 32):
        print(
            f"{c:11d}  {results['mixed'][c]['tokens_per_s']:11.1f}  "
            f"{results['swap'][c]['tokens_per_s']:10.1f}  "
            f"{results['single'][c]['tokens_per_s']:12.1f}  {ratios[c]['mixed_over_swap']:10.2f}  "
            f"{ratios[c]['mixed_over_single']:12.2f}"
        )
    out = {
        "model": "SmolLM2-135M-Instruct",
        "adapters": 8,
        "max_tokens": args.max_tokens,
        "results": results,
        "ratios": ratios,
        "targets": {"mixed_over_swap_at_32": 3.0, "mixed_over_single_at_32": 0.8},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
