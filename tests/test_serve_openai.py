"""The OpenAI request surface as clients send it: usage, seed, penalties, logprobs, echo, n,
prompt forms, the context policy, size limits and a free event loop (issue 16)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
import torch
from conftest import make_tokenizer, tiny_model
from test_serve import KEY, TEMPLATES, LiveServer, client, make_engine, post

from lorachain.serve.api import create_app
from lorachain.serve.engine import BASE, GenRequest
from lorachain.serve.sampling import Sampling
from lorachain.store import random_store


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai") / "store"
    labels = ["alpha", "beta", "gamma"]
    random_store(root, tiny_model("llama"), labels, TEMPLATES, rank=4, target_modules=["q_proj", "v_proj"])
    return root


@pytest.fixture(scope="module")
def live(store):
    engine = make_engine(store, max_batch=8, window_ms=5, max_queue=32)
    srv = LiveServer(
        create_app(engine, api_key=KEY, max_prompt_tokens=40, max_tokens_limit=16, max_context=48)
    )
    srv.engine = engine
    yield srv
    srv.stop()
    engine.close()


def generated(live) -> int:
    text = httpx.get(f"{live.url}/metrics").text
    return int(
        next(x for x in text.splitlines() if x.startswith("lorachain_generated_tokens_total")).split()[1]
    )


def test_usage_counts_the_token_ids(live):
    tok = make_tokenizer()
    before = generated(live)
    r = post(
        live,
        "/v1/completions",
        {"model": "alpha", "prompt": "red sky sea", "max_tokens": 7, "ignore_eos": True},
    )
    u = r.json()["usage"]
    assert u == {
        "prompt_tokens": len(tok("red sky sea")["input_ids"]),
        "completion_tokens": 7,
        "total_tokens": 10,
    }
    assert generated(live) - before == 7  # the same count as the server's own metrics
    chat = post(
        live, "/v1/chat/completions", {"model": "beta", "messages": [{"role": "user", "content": "sea"}]}
    )
    u = chat.json()["usage"]
    assert u["prompt_tokens"] == len(tok("sea =>")["input_ids"])  # the store's template, tokenised
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]


def test_openai_client_streaming_usage_retrieve_seed_and_penalties(live):
    import openai

    c = client(live)
    full = c.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "red sky"}], max_tokens=9
    )
    chunks = list(
        c.chat.completions.create(
            model="alpha",
            messages=[{"role": "user", "content": "red sky"}],
            max_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert (
        "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        == full.choices[0].message.content
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert c.models.retrieve("alpha").id == "alpha"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("nope")
    kw = dict(model="alpha", prompt="red sky", max_tokens=8, temperature=1.5)
    same = {c.completions.create(**kw, seed=7).choices[0].text for _ in range(2)}
    assert len(same) == 1  # one seed, one answer
    others = {c.completions.create(**kw, seed=s).choices[0].text for s in range(8)}
    assert len(others) > 1  # and it really samples
    greedy = c.completions.create(model="alpha", prompt="red sky", max_tokens=12).choices[0].text
    penalized = (
        c.completions.create(
            model="alpha", prompt="red sky", max_tokens=12, presence_penalty=2, frequency_penalty=2
        )
        .choices[0]
        .text
    )
    assert penalized != greedy


def _run(engine, req: GenRequest) -> list:
    events, done = [], threading.Event()

    def emit(kind, payload):
        events.append((kind, payload))
        if kind in ("done", "error"):
            done.set()

    req.emit = emit
    engine.submit(req)
    assert done.wait(30)
    return events


def test_penalties_and_seeds_in_the_engine(live):
    engine, ids = live.engine, make_tokenizer()("red sky")["input_ids"]

    def tokens(sampling: Sampling) -> list[int]:
        events = _run(engine, GenRequest(ids, BASE, 12, None, ignore_eos=True, sampling=sampling))
        return [e["id"] for k, p in events if k == "logprobs" for e in p]

    greedy = tokens(Sampling(logprobs=0))
    assert len(greedy) > len(set(greedy))  # the tiny model repeats itself
    fresh = tokens(Sampling(presence_penalty=2.0, logprobs=0))
    assert len(fresh) == len(set(fresh)) == 12  # a strong presence penalty never repeats a token
    sampled = [tokens(Sampling(temperature=1.0, seed=3, logprobs=0)) for _ in range(2)]
    assert sampled[0] == sampled[1] != greedy
    biased = tokens(Sampling(logit_bias={9: 100.0}, logprobs=0))
    assert biased == [9] * 12


def test_echo_logprobs_equal_the_adapter_forward(live):
    tok = make_tokenizer()
    body = {"model": "alpha", "prompt": "red sky green leaf", "max_tokens": 0, "echo": True, "logprobs": 1}
    r = post(live, "/v1/completions", body).json()
    lp = r["choices"][0]["logprobs"]
    assert r["choices"][0]["text"] == "red sky green leaf" and r["usage"]["completion_tokens"] == 0
    ids = tok("red sky green leaf")["input_ids"]
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(ids)
    router = live.engine.router
    with torch.no_grad():
        router.activate("alpha")
        ref = torch.log_softmax(router.model(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
    expected = [float(ref[t, ids[t + 1]]) for t in range(len(ids) - 1)]
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-5)
    for value, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True):
        assert max(top.values()) >= value - 1e-6  # lm-eval's is_greedy check reads these
    as_ids = post(live, "/v1/completions", body | {"prompt": ids}).json()  # token ids, as lm-eval sends
    assert as_ids["choices"][0]["logprobs"]["token_logprobs"] == lp["token_logprobs"]


def test_completions_use_the_prompt_as_sent_and_chat_the_template(live):
    tok = make_tokenizer()
    sent = post(live, "/v1/completions", {"model": "alpha", "prompt": "red sky =>", "max_tokens": 6}).json()
    chat = post(
        live,
        "/v1/chat/completions",
        {"model": "alpha", "messages": [{"role": "user", "content": "red sky"}], "max_tokens": 6},
    ).json()
    assert chat["choices"][0]["message"]["content"] == sent["choices"][0]["text"]
    raw = _run(live.engine, GenRequest(tok("red sky")["input_ids"], "alpha", 6, None))
    plain = post(live, "/v1/completions", {"model": "alpha", "prompt": "red sky", "max_tokens": 6}).json()
    assert plain["choices"][0]["text"] == "".join(p for k, p in raw if k == "delta")


def test_prompt_lists_token_ids_and_n(live):
    body = {"model": "auto", "prompt": ["red sky", "blue sea"], "max_tokens": 3, "ignore_eos": True, "n": 2}
    r = post(live, "/v1/completions", body).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert r["choices"][0]["text"] == r["choices"][1]["text"]  # greedy: n copies agree
    assert r["usage"] == {"prompt_tokens": 4, "completion_tokens": 12, "total_tokens": 16}
    assert all(c["lorachain_route"]["adapter"] for c in r["choices"])
    seeded = post(
        live, "/v1/completions", {**body, "prompt": "red sky", "temperature": 1.5, "seed": 1}
    ).json()
    assert len(seeded["choices"]) == 2
    r = post(live, "/v1/completions", {"model": "alpha", "prompt": [[5, 6], [7]], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize(
    ("path", "body", "needles"),
    [
        (
            "/v1/completions",
            {"model": "alpha", "prompt": "x", "bogus": 1, "seed2": 2},
            ["unknown fields: bogus, seed2"],
        ),
        (
            "/v1/chat/completions",
            {
                "model": "alpha",
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function"}],
                "zz": 1,
            },
            ["not supported by this server: tools", "unknown fields: zz"],
        ),
        (
            "/v1/chat/completions",
            {
                "model": "alpha",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_object"},
            },
            ["json_object", "only 'text'"],
        ),
        ("/v1/completions", {"model": "alpha", "prompt": ""}, ["prompt is empty"]),
        ("/v1/completions", {"model": "base", "prompt": "   "}, ["prompt is empty"]),
        ("/v1/completions", {"model": "base", "prompt": []}, ["empty"]),
        ("/v1/completions", {"model": "alpha", "prompt": [1, 99999]}, ["outside the vocabulary"]),
        ("/v1/completions", {"model": "alpha", "prompt": ["x", [1]]}, ["prompt: expected one of"]),
        (
            "/v1/completions",
            {"model": "alpha", "prompt": "red " * 38, "max_tokens": 16},
            [
                "maximum context length is 48 tokens",
                "you requested 54 tokens (38 in the prompt, 16 in the completion)",
            ],
        ),
        (
            "/v1/chat/completions",
            {"model": "base", "messages": [{"role": "user", "content": "red " * 60}]},
            ["maximum context length is 48 tokens", "messages"],
        ),
    ],
)
def test_bad_requests_are_one_clear_400(live, path, body, needles):
    r = post(live, path, body)
    assert r.status_code == 400, r.text
    msg = r.json()["error"]["message"]
    assert all(n in msg for n in needles), msg


def test_standard_fields_are_accepted(live):
    body = {
        "model": "alpha",
        "messages": [{"role": "developer", "content": [{"type": "text", "text": "red sky"}]}],
        "max_completion_tokens": 3,
        "seed": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "logprobs": False,
        "response_format": {"type": "text"},
        "stream_options": {"include_usage": True},
        "user": "me",
        "n": 1,
        "stop": ["zzz", "q1", "q2", "q3", "q4", "q5"],  # more than OpenAI's 4, as lm-eval sends
        "tool_choice": "none",
        "metadata": {"a": "b"},
    }
    r = post(live, "/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 3


def test_truncation_is_opt_in_and_reported_and_max_tokens_clamped(live):
    tok = make_tokenizer()
    prompt = " ".join(["red", "sky"] * 19)  # 38 tokens
    r = post(
        live,
        "/v1/completions",
        {"model": "base", "prompt": prompt, "max_tokens": 16, "truncate_prompt_tokens": -1},
    )
    body = r.json()
    assert body["lorachain_context"] == {
        "prompt_tokens_sent": 38,
        "prompt_tokens_kept": 32,
        "truncated_tokens": 6,
        "max_tokens": 16,
    }
    assert body["usage"]["prompt_tokens"] == 32
    echo = post(
        live,
        "/v1/completions",
        {"model": "base", "prompt": prompt, "max_tokens": 0, "echo": True, "truncate_prompt_tokens": 4},
    )
    assert echo.json()["choices"][0]["text"] == tok.decode(tok(prompt)["input_ids"][-4:])  # the end is kept
    clamp = post(live, "/v1/completions", {"model": "base", "prompt": prompt, "ignore_eos": True}).json()
    assert clamp["usage"]["completion_tokens"] == 10 and clamp["choices"][0]["finish_reason"] == "length"
    assert (
        clamp["lorachain_context"]["max_tokens"] == 10 and clamp["lorachain_context"]["truncated_tokens"] == 0
    )


def test_store_opts_into_left_truncation(store):
    engine = make_engine(store, window_ms=1)
    engine.router.manifest.templates["truncation"] = "left"
    srv = LiveServer(create_app(engine, max_prompt_tokens=40, max_tokens_limit=16, max_context=48))
    try:
        r = post(srv, "/v1/completions", {"model": "base", "prompt": "red " * 60, "max_tokens": 8}, key=None)
        assert r.status_code == 200 and r.json()["lorachain_context"]["prompt_tokens_kept"] == 40
    finally:
        srv.stop()
        engine.close()


def test_big_requests_get_413_or_400_fast_and_health_stays_free(store):
    engine = make_engine(store, window_ms=1)
    srv = LiveServer(
        create_app(engine, max_request_bytes=12 << 20, max_prompt_tokens=40, max_tokens_limit=16)
    )
    small = LiveServer(create_app(engine, max_request_bytes=1000))
    try:
        r = httpx.post(f"{small.url}/v1/completions", json={"model": "alpha", "prompt": "red " * 500})
        assert r.status_code == 413 and "limit of 1000" in r.json()["error"]["message"]
        messages = [{"role": "user", "content": "red sky " * 25_000} for _ in range(48)]  # 9.6 MB
        waits, result = [], {}

        def big():
            t0 = time.perf_counter()
            result["r"] = httpx.post(
                f"{srv.url}/v1/chat/completions", json={"model": "base", "messages": messages}, timeout=120
            )
            result["s"] = time.perf_counter() - t0

        worker = threading.Thread(target=big)
        worker.start()
        while worker.is_alive():
            t0 = time.perf_counter()
            assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200
            waits.append(time.perf_counter() - t0)
            time.sleep(0.01)
        worker.join()
        assert result["r"].status_code == 400 and "at least" in result["r"].json()["error"]["message"]
        assert srv.server.config.app.state.server.gate_pool is not None  # checked in the helper process
        assert result["s"] < 10 and max(waits) < 1.0, (result["s"], max(waits))
    finally:
        small.stop()
        srv.stop()
        engine.close()
