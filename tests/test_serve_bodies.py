"""Bodies that once answered 500: a lone surrogate and JSON nested past the parser's depth. Each
gets a 400 with an OpenAI error body, on the server's own path and on the big-body gate's."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model
from fastapi.testclient import TestClient
from test_serve import TEMPLATES, make_engine

from lorachain.cli import build_parser
from lorachain.serve.api import create_app
from lorachain.serve.schemas import lone_surrogate
from lorachain.store import random_store

JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("bodies") / "store"
    model = tiny_model("llama")
    random_store(
        root, model, ["alpha", "beta"], TEMPLATES, rank=4, target_modules=["q_proj"], base_name="tiny"
    )
    engine = make_engine(root, max_batch=2, window_ms=1, max_queue=8)
    yield TestClient(
        create_app(engine, max_prompt_tokens=24, max_tokens_limit=8), raise_server_exceptions=False
    )
    engine.close()


def _error(r) -> dict:
    assert r.status_code == 400, (r.status_code, r.text[:200])
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    return err


def test_a_lone_surrogate_is_a_400_naming_the_field(client):
    r = client.post("/v1/completions", content=b'{"model": "alpha", "prompt": "\\ud800"}', headers=JSON)
    err = _error(r)
    assert err["param"] == "prompt" and "surrogate" in err["message"]
    body = {
        "model": "alpha",
        "messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "x"}],
    }
    raw = json.dumps(body).replace('"x"', '"a\\udfffb"').encode()
    assert (
        _error(client.post("/v1/chat/completions", content=raw, headers=JSON))["param"]
        == "messages[1].content"
    )


def test_deep_nesting_is_a_400_not_a_recursion_error(client):
    raw = b"[" * 100_000 + b"]" * 100_000
    assert (
        "nested too deeply"
        in _error(client.post("/v1/chat/completions", content=raw, headers=JSON))["message"]
    )
    big = b"[" * 600_000 + b"]" * 600_000  # over 1 MB: parsed by the gate process first
    assert "nested too deeply" in _error(client.post("/v1/completions", content=big, headers=JSON))["message"]
    # a well-formed request still answers
    ok = client.post("/v1/completions", json={"model": "alpha", "prompt": "good", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] is not None


def test_lone_surrogate_finds_the_path():
    assert lone_surrogate({"a": ["ok", {"b": "\ud800"}]}) == "a[1].b"
    assert lone_surrogate({"a": "fine \u00e9"}) is None
    assert lone_surrogate("\udc00") == "body"


def test_serve_help_shows_its_defaults():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    text = serve.format_help()
    for default in ("127.0.0.1", "8000", "score", "(default: 8)", "default: 16", "default: 1024"):
        assert default in text, default
