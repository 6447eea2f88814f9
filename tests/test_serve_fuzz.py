"""Property tests of the server: schemathesis against its OpenAPI schema (no 5xx, ever), and the
playground page driven in headless Chromium."""

from __future__ import annotations

import shutil

import pytest
from conftest import tiny_model
from test_serve import TEMPLATES, LiveServer, make_engine

from lorachain.serve.api import create_app
from lorachain.store import random_store

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz") / "store"
    random_store(
        root,
        tiny_model("llama"),
        ["alpha", "beta"],
        TEMPLATES,
        rank=4,
        target_modules=["q_proj", "v_proj"],
        base_name="tiny",
    )
    engine = make_engine(root, max_batch=4, window_ms=1, max_queue=16)
    yield create_app(engine, max_prompt_tokens=24, max_tokens_limit=8)
    engine.close()


def test_no_5xx_for_any_request(app):
    """Hypothesis cases generated from the server's OpenAPI schema, every operation: each answer is
    below 500, and every error has the OpenAI shape."""
    from hypothesis import given

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [op.ok() for op in schema.get_all_operations()]
    paths = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/models/{model_id}"}
    assert {op.path for op in operations} >= paths
    components = schema.raw_schema["components"]["schemas"]  # the fields the fuzzer generates
    new = ["seed", "echo", "logprobs", "n", "presence_penalty", "frequency_penalty", "logit_bias", "best_of"]
    new += ["stream_options", "truncate_prompt_tokens"]
    assert set(new) <= set(components["CompletionRequest"]["properties"])
    assert {"top_logprobs", "response_format", "max_completion_tokens", "seed", "logprobs"} <= set(
        components["ChatRequest"]["properties"]
    )
    calls = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call()
            calls.append(response.status_code)
            assert response.status_code < 500, (case.path, response.status_code, response.text[:300])
            if response.status_code >= 400:
                assert "message" in response.json()["error"]

        check()
    assert len(calls) >= 40 and any(c == 200 for c in calls) and any(400 <= c < 500 for c in calls)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (see .ci/run)")
def test_playground_in_headless_chromium(app, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    from PIL import Image

    srv = LiveServer(app)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=[
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--no-first-run",
                ],
            )
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.goto(srv.url + "/")
            page.fill("#instruction", "red sky red")
            page.click("#ask")
            page.wait_for_function(
                "document.getElementById('route').textContent.includes('adapter')", timeout=30_000
            )
            route = page.text_content("#route")
            rows = page.locator("#topk tbody tr").count()
            shot = tmp_path / "playground.png"  # kept by pytest under its basetemp for a look
            page.screenshot(path=str(shot))
            browser.close()
        assert "→ adapter" in route and rows == 2  # two labels in this store, both ranked
        img = Image.open(shot)
        assert img.size == (900, 700) and len(set(img.convert("L").getdata())) > 10  # not blank
    finally:
        srv.stop()
