"""Bounded load on loopback: every request answered (200 or 429), none lost, no 5xx, RSS bounded.

One command: `python benchmarks/serve_stress.py [--requests 2000 --concurrency 64]`. The real server
(uvicorn, 127.0.0.1) on a tiny random Llama with a 3-adapter store, a small queue (so 429s happen),
requests mixing `auto`, adapters, `base`, chat, completions and streaming. Prints counts and writes JSON.

`--big N`: instead, N chat requests of ~10 MB each (48 messages of 200,000 characters), two at a
time, once under the body-size limit (refused 400: too long for the context) and once over it
(413), while `/health` is polled every 20 ms: its p50/p99/max latency, the big requests' latency,
and RSS before, at peak and after (benchmarks/results/serve_stress_big.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) for x in f if x.startswith("VmRSS:")) / 1024


async def drive(url: str, n: int, concurrency: int) -> tuple[Counter, int, list[float]]:
    import httpx

    sem, codes, lost, lat = asyncio.Semaphore(concurrency), Counter(), 0, []
    models = ["auto", "alpha", "beta", "gamma", "base", "mixed"]

    async def one(i: int, client) -> None:
        nonlocal lost
        async with sem:
            model = models[i % len(models)]
            stream = i % 5 == 0
            if i % 2:
                path, body = (
                    "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "red sky sea"}]},
                )
            else:
                path, body = "/v1/completions", {"prompt": "green leaf red"}
            body |= {"model": model, "max_tokens": 8, "stream": stream}
            t0 = time.perf_counter()
            try:
                r = await client.post(url + path, json=body)
                if stream and r.status_code == 200 and not r.text.rstrip().endswith("data: [DONE]"):
                    lost += 1
                codes[r.status_code] += 1
            except httpx.HTTPError:
                lost += 1
            lat.append(time.perf_counter() - t0)

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        await asyncio.gather(*(one(i, client) for i in range(n)))
    return codes, lost, lat


def sample_rss(samples: list[float], stop: threading.Event) -> None:
    while not stop.wait(0.1):
        samples.append(rss_mb())


def big_stream(url: str, n: int, body: bytes) -> dict:
    """`n` big requests, two at a time, while /health is polled; latencies and status codes."""
    import httpx

    health, big, codes, stop = [], [], Counter(), threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                t0 = time.perf_counter()
                c.get(url + "/health")
                health.append(time.perf_counter() - t0)
                time.sleep(0.02)

    def send(k: int) -> None:
        with httpx.Client(timeout=120) as c:
            for _ in range(k):
                t0 = time.perf_counter()
                try:
                    r = c.post(
                        url + "/v1/chat/completions",
                        content=body,
                        headers={"Content-Type": "application/json"},
                    )
                    codes[r.status_code] += 1
                except httpx.HTTPError as e:  # a 413 may close the socket before the upload ends
                    codes[type(e).__name__] += 1
                big.append(time.perf_counter() - t0)

    poller = threading.Thread(target=poll)
    poller.start()
    senders = [threading.Thread(target=send, args=(n // 2 + (i < n % 2),)) for i in range(2)]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    stop.set()
    poller.join()
    health.sort()
    big.sort()
    return {
        "requests": n,
        "body_mb": round(len(body) / 2**20, 2),
        "codes": dict(codes),
        "health_polls": len(health),
        "health_p50_ms": round(1000 * health[len(health) // 2], 2),
        "health_p99_ms": round(1000 * health[int(0.99 * (len(health) - 1))], 2),
        "health_max_ms": round(1000 * health[-1], 2),
        "big_p50_s": round(big[len(big) // 2], 3),
        "big_max_s": round(big[-1], 3),
    }


def run_big(store: Path, n: int, out: str) -> None:
    from conftest import make_tokenizer, tiny_model

    from lorachain.serve.api import create_app, release_memory
    from lorachain.serve.background import BackgroundServer
    from lorachain.serve.engine import Engine
    from lorachain.serve.router import Router

    messages = [{"role": "user", "content": ("red sky " * 25_000)[:200_000]} for _ in range(48)]
    body = json.dumps({"model": "base", "messages": messages, "max_tokens": 8}).encode()
    router = Router.from_store(store, model=tiny_model("llama"), tokenizer=make_tokenizer(), cache_size=2)
    engine = Engine(router, max_batch=16, window_ms=5, max_queue=32)
    result = {"rss_mb_start": rss_mb()}
    for name, limit in (("under_limit_400", 16 << 20), ("over_limit_413", 8 << 20)):
        server = BackgroundServer(create_app(engine, max_tokens_limit=16, max_request_bytes=limit))
        samples, stop = [rss_mb()], threading.Event()
        sampler = threading.Thread(target=sample_rss, args=(samples, stop))
        sampler.start()
        result[name] = big_stream(server.url, n, body) | {"limit_mb": limit >> 20}
        stop.set()
        sampler.join()
        server.stop()
        result[name]["rss_mb_peak"] = round(max(samples), 1)
    release_memory()
    result["rss_mb_end"] = rss_mb()
    engine.close()
    print(json.dumps(result, indent=2))
    ok = all(result[k]["health_p99_ms"] < 100 for k in ("under_limit_400", "over_limit_413"))
    print(f"\n/health p99 < 100 ms while {n} big requests arrive: {ok}")
    Path(out).write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--big", type=int, default=0, help="N ~10 MB requests instead (see above)")
    args = ap.parse_args()
    args.out = args.out or f"benchmarks/results/serve_stress{'_big' if args.big else ''}.json"
    from conftest import make_tokenizer, tiny_model

    from lorachain.serve.api import create_app
    from lorachain.serve.background import BackgroundServer
    from lorachain.serve.engine import Engine
    from lorachain.serve.router import Router
    from lorachain.store import random_store

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "store"
        templates = {"prompt": "{instruction} =>", "task_prompt": "{instruction} task:", "max_length": 32}
        random_store(
            store,
            tiny_model("llama"),
            ["alpha", "beta", "gamma"],
            templates,
            rank=4,
            target_modules=["q_proj", "v_proj"],
            base_name="tiny",
        )
        if args.big:
            run_big(store, args.big, args.out)
            return
        router = Router.from_store(store, model=tiny_model("llama"), tokenizer=make_tokenizer(), cache_size=2)
        engine = Engine(router, max_batch=16, window_ms=5, max_queue=32)
        server = BackgroundServer(create_app(engine, max_tokens_limit=16))
        url = server.url
        samples, stop = [rss_mb()], threading.Event()

        def sample() -> None:
            while not stop.wait(0.5):
                samples.append(rss_mb())

        threading.Thread(target=sample, daemon=True).start()
        t0 = time.perf_counter()
        codes, lost, lat = asyncio.run(drive(url, args.requests, args.concurrency))
        wall = time.perf_counter() - t0
        stop.set()
        server.stop()
        engine.close()
    lat.sort()
    fivexx = sum(n for c, n in codes.items() if c >= 500)
    result = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "codes": dict(codes),
        "lost": lost,
        "5xx": fivexx,
        "answered": sum(codes.values()),
        "wall_s": wall,
        "p50_s": lat[len(lat) // 2],
        "p99_s": lat[int(0.99 * (len(lat) - 1))],
        "rss_mb_start": samples[0],
        "rss_mb_max": max(samples),
        "rss_mb_end": samples[-1],
    }
    print(json.dumps(result, indent=2))
    ok = result["answered"] == args.requests and lost == 0 and fivexx == 0 and set(codes) <= {200, 429}
    print(f"\nall answered 200/429, none lost, no 5xx: {ok}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
