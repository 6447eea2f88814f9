"""Proxy mode against engines that are not lorachain: a fake that applies no template (so a
missing template shows), a real lorachain upstream (same answers as local), and engines that are
down, slow or answer garbage (clean 502/504, never a hang)."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from conftest import make_tokenizer, tiny_model
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from lorachain.serve.api import create_app
from lorachain.serve.background import BackgroundServer
from lorachain.serve.engine import Engine
from lorachain.serve.proxy import create_proxy_app, upstream_base_url
from lorachain.serve.router import Router
from lorachain.store import random_store

TEMPLATES = {"prompt": "{instruction} =>", "task_prompt": "{instruction} task:", "max_length": 32}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("proxy") / "store"
    random_store(
        root, tiny_model("llama"), ["alpha", "beta"], TEMPLATES, rank=4, target_modules=["q_proj", "v_proj"]
    )
    return root


def router(store) -> Router:
    return Router.from_store(store, model=tiny_model("llama"), tokenizer=make_tokenizer(), cache_size=4)


def fake_engine(seen: list, mode: str = "ok") -> FastAPI:
    """An OpenAI-style engine that records requests and answers with the prompt's token ids as
    text; it applies no template of its own (as vLLM's /v1/completions with token ids)."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        seen.append(("completions", body))
        if mode == "slow":
            await asyncio.sleep(5)
        if mode == "garbage":
            return PlainTextResponse("<html>oops</html>")
        if mode == "500":
            return JSONResponse({"error": {"message": "engine crashed"}}, status_code=500)
        text = " ".join(map(str, body["prompt"]))
        if body.get("stream"):

            def events():
                for piece in (text[: len(text) // 2], text[len(text) // 2 :]):
                    chunk = {"id": "cmpl-1", "object": "text_completion", "model": body["model"]}
                    yield f"data: {json.dumps(chunk | {'choices': [{'index': 0, 'text': piece}]})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": 2, "total_tokens": 0}
        choice = {"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
        return {"id": "cmpl-1", "object": "text_completion", "model": body["model"], "choices": [choice]} | {
            "usage": usage
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen.append(("chat", body))
        msg = {"role": "assistant", "content": "base says hi"}
        return {
            "id": "c",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "message": msg}],
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "base"}]}

    return app


@pytest.fixture(scope="module")
def fake(store):
    seen: list = []
    engine = BackgroundServer(fake_engine(seen))
    proxy = BackgroundServer(create_proxy_app(router(store), engine.url + "/v1", max_tokens_limit=16))
    yield proxy, seen
    proxy.stop()
    engine.stop()


def test_upstream_url_with_or_without_v1():
    assert upstream_base_url("http://h:8001/v1/") == "http://h:8001"
    assert upstream_base_url("http://h:8001") == "http://h:8001"


def test_chat_reaches_the_engine_as_the_store_template_token_ids(fake):
    proxy, seen = fake
    tok = make_tokenizer()
    msgs = [{"role": "system", "content": "sky"}, {"role": "user", "content": "red leaf"}]
    r = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "alpha", "messages": msgs}, timeout=30)
    assert r.status_code == 200, r.text
    kind, body = seen[-1]
    expected = tok("red leaf =>")["input_ids"]  # the store's template, as the local server renders it
    assert kind == "completions" and body["prompt"] == expected
    assert body["model"] == "alpha" and body["temperature"] == 0.0  # greedy unless the client says
    assert body["max_tokens"] == 16  # the server default, clamped to its limit, as locally
    out = r.json()
    assert out["object"] == "chat.completion" and out["model"] == "alpha"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": " ".join(map(str, expected))}


def test_completions_use_the_prompt_as_sent_and_client_sampling(fake):
    proxy, seen = fake
    tok = make_tokenizer()
    body = {"model": "beta", "prompt": "green leaf", "max_tokens": 3, "temperature": 0.7, "seed": 5}
    r = httpx.post(f"{proxy.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    sent = seen[-1][1]
    assert sent["prompt"] == tok("green leaf")["input_ids"] and sent["max_tokens"] == 3
    assert sent["temperature"] == 0.7 and sent["seed"] == 5 and sent["model"] == "beta"


def test_auto_selects_here_and_names_the_adapter_upstream(fake):
    proxy, seen = fake
    r = httpx.post(
        f"{proxy.url}/v1/completions", json={"model": "auto", "prompt": "sea", "max_tokens": 2}, timeout=30
    )
    assert r.status_code == 200, r.text
    route = r.json()["lorachain_route"]
    assert seen[-1][1]["model"] == ("mixed" if route["adapter"] == "_mixed" else route["adapter"])
    assert json.loads(r.headers["x-lorachain-route"]) == route


def test_base_chat_goes_through_unchanged(fake):
    proxy, seen = fake
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = httpx.post(f"{proxy.url}/v1/chat/completions", json={"model": "base", "messages": msgs}, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "base says hi"
    kind, body = seen[-1]
    assert kind == "chat" and body["messages"] == msgs and body["model"] == "base"


def test_streams_are_relayed_chunk_by_chunk_as_chat_chunks(fake):
    proxy, _ = fake
    body = {"model": "alpha", "messages": [{"role": "user", "content": "sky"}], "stream": True}
    r = httpx.post(f"{proxy.url}/v1/chat/completions", json=body, timeout=30)
    events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 2 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert text == " ".join(map(str, make_tokenizer()("sky =>")["input_ids"]))


def test_request_errors_are_answered_here(fake):
    proxy, seen = fake
    n = len(seen)
    r = httpx.post(f"{proxy.url}/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30)
    assert r.status_code == 404 and "known models" in r.json()["error"]["message"]
    r = httpx.post(f"{proxy.url}/v1/completions", json={"model": "alpha", "prompt": ""}, timeout=30)
    assert r.status_code == 400
    assert len(seen) == n  # nothing bad reached the engine


@pytest.mark.parametrize(
    ("mode", "status", "reason"), [("garbage", 502, "invalid_response"), ("500", 502, "status_500")]
)
def test_a_broken_engine_gives_a_clean_error(store, mode, status, reason):
    engine = BackgroundServer(fake_engine([], mode))
    proxy = BackgroundServer(create_proxy_app(router(store), engine.url))
    try:
        r = httpx.post(f"{proxy.url}/v1/completions", json={"model": "alpha", "prompt": "sky"}, timeout=30)
        assert r.status_code == status and r.json()["error"]["code"] == reason
        assert (
            f'lorachain_upstream_errors_total{{reason="{reason}"}} 1'
            in httpx.get(f"{proxy.url}/metrics").text
        )
    finally:
        proxy.stop()
        engine.stop()


def test_a_slow_or_down_engine_never_hangs(store):
    engine = BackgroundServer(fake_engine([], "slow"))
    slow = BackgroundServer(create_proxy_app(router(store), engine.url, timeout=1.0))
    down = BackgroundServer(create_proxy_app(router(store), "http://127.0.0.1:9"))  # nothing listens
    try:
        t = time.perf_counter()
        r = httpx.post(f"{slow.url}/v1/completions", json={"model": "alpha", "prompt": "sky"}, timeout=30)
        assert r.status_code == 504 and time.perf_counter() - t < 4
        r = httpx.post(
            f"{down.url}/v1/chat/completions",
            json={"model": "alpha", "messages": [{"role": "user", "content": "a"}]},
            timeout=30,
        )
        assert r.status_code == 502 and r.json()["error"]["type"] == "server_error"
        health = httpx.get(f"{down.url}/health", timeout=30).json()
        assert health["upstream_ok"] is False and health["upstream"] == "http://127.0.0.1:9"
        assert httpx.get(f"{slow.url}/health", timeout=30).json()["upstream_ok"] is True
    finally:
        slow.stop()
        down.stop()
        engine.stop()


def test_proxy_answers_equal_the_local_server(store):
    """A lorachain upstream: routed and named, chat and completions, streamed or not, the same text."""
    engine = Engine(router(store), window_ms=1)
    local = BackgroundServer(create_app(engine, max_tokens_limit=16))
    proxy = BackgroundServer(create_proxy_app(router(store), local.url + "/v1", max_tokens_limit=16))
    chat = {"messages": [{"role": "user", "content": "red sky"}], "max_tokens": 4}
    comp = {"prompt": "green leaf =>", "max_tokens": 4}

    def text(srv, path, body):
        r = httpx.post(f"{srv.url}{path}", json=body, timeout=60)
        assert r.status_code == 200, r.text
        if body.get("stream"):
            chunks = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
            c = [ch["choices"][0] for ch in chunks if ch["choices"]]
            return "".join(x.get("text") or x.get("delta", {}).get("content") or "" for x in c)
        c = r.json()["choices"][0]
        return c["message"]["content"] if "message" in c else c["text"]

    try:
        for model in ("auto", "alpha", "mixed", "base"):
            for path, body in (("/v1/chat/completions", chat), ("/v1/completions", comp)):
                for stream in (False, True):
                    req = body | {"model": model, "stream": stream}
                    assert text(proxy, path, req) == text(local, path, req), (model, path, stream)
        assert 'lorachain_adapter_requests_total{adapter="alpha"}' in httpx.get(f"{local.url}/metrics").text
    finally:
        proxy.stop()
        local.stop()
        engine.close()
