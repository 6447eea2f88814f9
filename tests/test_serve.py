"""The OpenAI-compatible server on a tiny model: the official client, batching, limits, errors."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import make_tokenizer, tiny_model

from lorachain.serve.api import create_app
from lorachain.serve.background import BackgroundServer
from lorachain.serve.engine import AUTO, BASE, Engine, GenRequest
from lorachain.serve.router import Router
from lorachain.store import random_store

KEY = "sekret"
TEMPLATES = {"prompt": "{instruction} =>", "task_prompt": "{instruction} task:", "max_length": 32}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve") / "store"
    random_store(
        root,
        tiny_model("llama"),
        ["alpha", "beta", "gamma"],
        TEMPLATES,
        rank=4,
        target_modules=["q_proj", "v_proj"],
        base_name="tiny",
    )
    return root


def make_engine(store, **kw) -> Engine:
    router = Router.from_store(store, model=tiny_model("llama"), tokenizer=make_tokenizer(), cache_size=4)
    return Engine(router, **kw)


LiveServer = BackgroundServer


@pytest.fixture(scope="module")
def live(store):
    engine = make_engine(store, max_batch=8, window_ms=20, max_queue=32)
    srv = LiveServer(create_app(engine, api_key=KEY, max_prompt_tokens=24, max_tokens_limit=16))
    yield srv
    srv.stop()
    engine.close()


def client(live):
    from openai import OpenAI

    return OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0, timeout=60)


def run_alone_and_together(engine: Engine, reqs: list[tuple[str, str]]):
    def run(batch):
        results = [[] for _ in batch]
        done = [threading.Event() for _ in batch]
        for i, (adapter, text) in enumerate(batch):

            def emit(kind, payload, i=i):
                results[i].append((kind, payload.adapter if kind == "route" else payload))
                if kind in ("done", "error"):
                    done[i].set()

            engine.submit(GenRequest(None, adapter, 8, emit, instruction=text))
        assert all(d.wait(30) for d in done)
        return results

    return run(reqs), [run([r])[0] for r in reqs]


def test_mixed_adapter_batch_equals_each_request_alone(store):
    engine = make_engine(store, max_batch=8, window_ms=200)
    reqs = [
        ("alpha", "red sky red"),
        ("beta", "blue sea"),
        (BASE, "green leaf"),
        (AUTO, "green leaf green"),
        ("gamma", "red red"),
        ("alpha", "sea sky"),
    ]
    together, alone = run_alone_and_together(engine, reqs)
    assert together == alone
    assert engine.batch_sizes[len(reqs)] == 1  # the first run was one batch of all six
    texts = {"".join(p for k, p in r if k == "delta") for r in together}
    assert len(texts) > 2  # different adapters really answer differently
    engine.close()


def test_stop_strings_and_max_tokens(store):
    engine = make_engine(store, window_ms=1)
    events: list = []
    done = threading.Event()

    def emit(kind, payload):
        events.append((kind, payload))
        if kind == "done":
            done.set()

    engine.submit(GenRequest(None, BASE, 5, emit, instruction="red sky"))
    assert done.wait(30)
    text = "".join(p for k, p in events if k == "delta")
    words = text.split()
    assert events[-1] == ("done", "length") and engine.stats["tokens"] == 5 and len(words) >= 3
    events.clear()
    done.clear()
    engine.submit(GenRequest(None, BASE, 5, emit, instruction="red sky", stop=[words[2]]))
    assert done.wait(30)
    cut = "".join(p for k, p in events if k == "delta")
    assert events[-1] == ("done", "stop") and words[2] not in cut and cut == text[: text.index(words[2])]
    engine.close()


def test_openai_client_completions_chat_and_streaming(live):
    c = client(live)
    r = c.completions.create(model="alpha", prompt="red sky", max_tokens=6)
    assert r.choices[0].finish_reason in ("stop", "length") and isinstance(r.choices[0].text, str)
    chat = c.chat.completions.create(
        model="auto", messages=[{"role": "user", "content": "blue sea"}], max_tokens=6
    )
    route = chat.model_extra["lorachain_route"]
    assert route["adapter"] in ("alpha", "beta", "gamma", "_mixed") and len(route["top_k"]) == 3
    assert sum(t["score"] for t in route["top_k"]) == pytest.approx(1.0, abs=1e-6)  # 3 labels: all of them
    stream = c.chat.completions.create(
        model=route["adapter"] if route["adapter"] != "_mixed" else "mixed",
        messages=[{"role": "user", "content": "blue sea"}],
        max_tokens=6,
        stream=True,
    )
    streamed = "".join(ch.choices[0].delta.content or "" for ch in stream)
    assert streamed == chat.choices[0].message.content
    raw = httpx.post(
        f"{live.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "auto", "messages": [{"role": "user", "content": "blue sea"}], "max_tokens": 2},
    )
    assert json.loads(raw.headers["x-lorachain-route"]) == raw.json()["lorachain_route"]
    models = {m.id for m in c.models.list()}
    assert models == {"auto", "base", "mixed", "alpha", "beta", "gamma"}


def post(live, path, body, key=KEY, raw=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(f"{live.url}{path}", content=raw, headers=headers, timeout=60)
    return httpx.post(f"{live.url}{path}", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "../../etc/passwd", "prompt": "x"}, 404, "known models"),
        ({"model": "/tmp/adapters/alpha", "prompt": "x"}, 404, "not found"),
        ({"model": "alpha", "prompt": "x", "bogus": 1}, 400, "bogus"),
        ({"model": "alpha", "prompt": 5}, 400, "prompt"),
        ({"model": "alpha"}, 400, "prompt"),
        ({"model": "alpha", "prompt": "x", "max_tokens": 999}, 400, "limit of 16"),
        ({"model": "alpha", "prompt": "red " * 40}, 400, "limit of 24"),
        ({"model": "alpha", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ],
)
def test_bad_requests_get_openai_shaped_4xx(live, body, status, needle):
    r = post(live, "/v1/completions", body)
    assert r.status_code == status
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]


def test_malformed_json_and_auth(live):
    r = post(live, "/v1/completions", None, raw=b"{not json")
    assert r.status_code == 400 and "error" in r.json()
    assert post(live, "/v1/completions", {"model": "alpha", "prompt": "x"}, key=None).status_code == 401
    assert post(live, "/v1/completions", {"model": "alpha", "prompt": "x"}, key="wrong").status_code == 401
    assert httpx.get(f"{live.url}/health").json()["status"] == "ok"


def test_metrics_and_playground(live):
    post(live, "/v1/completions", {"model": "beta", "prompt": "sea", "max_tokens": 2})
    text = httpx.get(f"{live.url}/metrics").text
    assert 'lorachain_requests_total{model="beta"}' in text and "lorachain_queue_depth" in text
    assert 'lorachain_adapter_requests_total{adapter="beta"}' in text
    page = httpx.get(f"{live.url}/").text
    assert "<title>lorachain playground</title>" in page and "/v1/chat/completions" in page


def test_full_queue_answers_429_and_nothing_hangs(store):
    engine = make_engine(store, max_batch=2, window_ms=1, max_queue=2)
    srv = LiveServer(create_app(engine, max_tokens_limit=16))
    try:
        body = {"model": "alpha", "prompt": "red sky", "max_tokens": 16}
        with ThreadPoolExecutor(24) as pool:
            codes = list(
                pool.map(
                    lambda _: httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60).status_code,
                    range(24),
                )
            )
        assert set(codes) <= {200, 429} and codes.count(429) > 0 and codes.count(200) > 0
        r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 200  # the server recovered
    finally:
        srv.stop()
        engine.close()


def test_cli_serve_end_to_end(tmp_path):
    """`lorachain serve STORE --port P` as a user runs it: health, one routed answer, clean stop."""
    import socket
    import subprocess
    import sys

    model_dir = tmp_path / "tiny"
    tiny_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    random_store(
        tmp_path / "store",
        tiny_model("llama"),
        ["alpha", "beta"],
        TEMPLATES,
        rank=4,
        target_modules=["q_proj", "v_proj"],
        base_name=str(model_dir),
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorachain",
            "serve",
            str(tmp_path / "store"),
            "--port",
            str(port),
            "--api-key",
            KEY,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        r = httpx.post(
            f"{url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=60,
            json={"model": "auto", "messages": [{"role": "user", "content": "red sky"}], "max_tokens": 3},
        )
        assert r.status_code == 200 and r.json()["lorachain_route"]["adapter"] in ("alpha", "beta", "_mixed")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_gathered_lora_equals_peft_mixed_batch(store):
    import torch
    from peft import PeftModel

    from lorachain.serve.batched_lora import GatheredLoRA

    r = Router.from_store(store, model=tiny_model("llama"), tokenizer=make_tokenizer(), cache_size=4)
    plain = PeftModel.from_pretrained(
        tiny_model("llama"), str(store / "adapters" / "alpha"), adapter_name="alpha"
    )
    for name in ("beta", "gamma"):
        plain.load_adapter(str(store / "adapters" / name), adapter_name=name)
    plain.eval()
    rows = [r.slot("alpha"), r.slot("beta"), BASE, r.slot("gamma"), r.slot("alpha")]
    x = torch.randint(4, 40, (len(rows), 6))
    with torch.no_grad():
        reference = plain(input_ids=x, adapter_names=rows).logits
        with GatheredLoRA(plain, [None if n == BASE else n for n in rows]):  # PEFT adapters' modules
            from_modules = plain(input_ids=x).logits
        with GatheredLoRA(r.model, [None if n == BASE else n for n in rows], r.slots.factors):
            from_buffers = r.model(input_ids=x).logits  # the router's resident buffers
        after = plain(input_ids=x, adapter_names=rows).logits
    torch.testing.assert_close(from_modules, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(from_buffers, reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(after, reference)  # hooks removed, PEFT's LoRA path back on
    assert not torch.allclose(reference[0], reference[2], atol=1e-3)  # adapters do change the output


def test_ignore_eos_generates_exactly_max_tokens(live):
    body = {"model": "alpha", "prompt": "red sky", "max_tokens": 7, "ignore_eos": True}
    r = post(live, "/v1/completions", body).json()
    assert r["choices"][0]["finish_reason"] == "length"
    before = httpx.get(f"{live.url}/metrics").text
    post(live, "/v1/completions", body)
    after = httpx.get(f"{live.url}/metrics").text

    def generated(text):
        return int(
            next(x for x in text.splitlines() if x.startswith("lorachain_generated_tokens_total")).split()[1]
        )

    assert generated(after) - generated(before) == 7
