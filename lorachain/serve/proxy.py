"""Proxy mode: only the task-selection adapter runs here; generation runs on an upstream
OpenAI-compatible engine that serves the adapters (vLLM with `--enable-lora`, another `lorachain
serve`, a llama.cpp server), started with the command `lorachain export vllm` prints.

The proxy follows the local server's rule per endpoint (`serve/prompting.py`, via
`Server.prepare`): chat requests are rendered with the store's template here and completions use
the prompt as sent; both go to the engine's `/v1/completions` as token ids, after the same context
policy, so the engine sees exactly the tokens `lorachain serve` would decode from. Decoding is
greedy (`temperature: 0`) unless the client set it. `model: base` chat requests go through to the
engine's chat endpoint unchanged. A down, slow or broken engine gives a 502/504 in the OpenAI
error shape (timeouts, never a hang), counted in `/metrics`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from lorachain.serve.api import ApiError, Server, _install_handlers, model_card, read_body
from lorachain.serve.engine import AUTO, BASE
from lorachain.store import MIXED

# request fields the engine's /v1/completions takes as they are (prompt and max_tokens are ours)
PASSED = (
    "top_p", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "stop", "n",
    "stream", "stream_options", "user", "ignore_eos",
)  # fmt: skip


def upstream_name(adapter: str) -> str:
    """The model name the engine serves an adapter under (`lorachain export vllm` uses these)."""
    return "base" if adapter == BASE else "mixed" if adapter == MIXED else adapter


def upstream_base_url(url: str) -> str:
    """The engine's root URL: `http://h:p` and the OpenAI-style `http://h:p/v1` are both taken."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def completion_body(raw: dict, kind: str, ids: list[int], max_tokens: int, model: str) -> dict:
    """The engine request for one prompt: its token ids, the fitted max_tokens, greedy by default."""
    body = {k: raw[k] for k in PASSED if raw.get(k) is not None}
    body.update(model=model, prompt=ids, max_tokens=max_tokens, temperature=raw.get("temperature") or 0.0)
    if kind == "chat":
        if raw.get("logprobs"):
            body["logprobs"] = int(raw.get("top_logprobs") or 0)
    else:
        for key in ("logprobs", "echo"):
            if raw.get(key) is not None:
                body[key] = raw[key]
    return body


def _chat_logprobs(lp: dict | None) -> dict | None:
    """Completions logprobs (tokens, token_logprobs, top_logprobs) in the chat shape."""
    if not lp:
        return None
    content = []
    tops = lp.get("top_logprobs") or [None] * len(lp.get("tokens", []))
    for token, value, top in zip(lp.get("tokens", []), lp.get("token_logprobs", []), tops, strict=False):
        alts = [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in (top or {}).items()]
        content.append(
            {"token": token, "logprob": value, "bytes": list(token.encode()), "top_logprobs": alts}
        )
    return {"content": content}


def chat_response(data: dict, model: str) -> dict:
    """An engine's text_completion answer as a chat.completion."""
    choices = [
        {
            "index": c.get("index", 0),
            "message": {"role": "assistant", "content": c.get("text", "")},
            "logprobs": _chat_logprobs(c.get("logprobs")),
            "finish_reason": c.get("finish_reason"),
        }
        for c in data["choices"]
    ]
    return {
        "id": "chatcmpl-" + str(data.get("id", uuid.uuid4().hex)).removeprefix("cmpl-"),
        "object": "chat.completion",
        "created": data.get("created", int(time.time())),
        "model": model,
        "choices": choices,
        "usage": data.get("usage"),
    }


def chat_chunk(data: dict, model: str, started: set[int]) -> dict:
    """One streamed text_completion chunk as a chat.completion.chunk (role in each choice's first)."""
    choices = []
    for c in data.get("choices", []):
        i = c.get("index", 0)
        delta = {"content": c.get("text", "")}
        if i not in started:
            started.add(i)
            delta = {"role": "assistant", **delta}
        choices.append(
            {
                "index": i,
                "delta": delta,
                "logprobs": _chat_logprobs(c.get("logprobs")),
                "finish_reason": c.get("finish_reason"),
            }
        )
    out = {
        "id": "chatcmpl-" + str(data.get("id", "")).removeprefix("cmpl-"),
        "object": "chat.completion.chunk",
        "created": data.get("created", int(time.time())),
        "model": model,
        "choices": choices,
    }
    if data.get("usage") is not None:
        out["usage"] = data["usage"]
    return out


class Proxy:
    """Selection and prompt preparation here, generation upstream."""

    def __init__(
        self, server: Server, upstream: str, upstream_key: str | None, timeout: float, connect: float = 5.0
    ) -> None:
        self.server, self.upstream = server, upstream_base_url(upstream)
        self.lock = threading.Lock()  # the selector serves one selection at a time
        self.client = httpx.AsyncClient(
            base_url=self.upstream, timeout=httpx.Timeout(timeout, connect=min(connect, timeout))
        )
        self.headers = {"Authorization": f"Bearer {upstream_key}"} if upstream_key else {}

    def select(self, instruction: str):
        with self.lock:
            return self.server.router.select([instruction])[0]

    def failed(self, reason: str, message: str, status: int = 502) -> ApiError:
        self.server.count(f'lorachain_upstream_errors_total{{reason="{reason}"}}')
        return ApiError(status, f"upstream {self.upstream}: {message}", type_="server_error", code=reason)

    async def handle(self, kind: str, request: Request):
        server = self.server
        raw_bytes = await read_body(request, server.max_request_bytes)
        job = await asyncio.to_thread(server.prepare, kind, raw_bytes)
        if isinstance(job, ApiError):
            raise job
        raw = json.loads(raw_bytes)
        adapter = server.resolve(job.model)
        server.count(f'lorachain_requests_total{{model="{job.model}"}}')
        if adapter == BASE and kind == "chat":  # the engine renders the model's chat template itself
            body = raw | {"model": upstream_name(BASE), "temperature": raw.get("temperature") or 0.0}
            return await self._post("/v1/chat/completions", body, "chat-base", None, job)
        firsts = {}
        for i, (p, _, _) in enumerate(job.choices):
            firsts.setdefault(p, i)
        if job.stream and len(firsts) > 1:
            raise ApiError(400, "proxy mode streams one prompt per request", param="prompt")
        calls = []
        for p, i in firsts.items():
            gen, ids = job.gen[i], job.choices[i][1]
            sel = None
            if adapter == AUTO:
                sel = await asyncio.to_thread(self.select, gen.instruction)
            chosen = sel.adapter if sel else adapter
            server.count(f'lorachain_adapter_requests_total{{adapter="{chosen}"}}')
            body = completion_body(raw, kind, ids, gen.max_tokens, upstream_name(chosen))
            calls.append((p, body, server.route_info(sel)))
        if job.stream:
            _, body, info = calls[0]
            return await self._post("/v1/completions", body, kind, info, job)
        answers = await asyncio.gather(*(self._json("/v1/completions", b) for _, b, _ in calls))
        return self._merge(kind, job, calls, answers)

    def _merge(self, kind: str, job, calls: list, answers: list[dict]) -> JSONResponse:
        """One response from the engine's answers to each prompt (choices re-indexed in order)."""
        n = int(calls[0][1].get("n") or 1)
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        for (p, _, _), data in zip(calls, answers, strict=True):
            for c in data["choices"]:
                choices.append(c | {"index": p * n + c.get("index", 0)})
            for key in usage:
                usage[key] += int((data.get("usage") or {}).get(key, 0))
        data = answers[0] | {"choices": choices, "usage": usage, "model": job.model}
        if kind == "chat":
            data = chat_response(data, job.model)
        infos = [info for _, _, info in calls]
        data["lorachain_route"] = infos[0] if len(infos) == 1 else infos
        if any(job.context):
            data["lorachain_context"] = job.context[0] if len(job.context) == 1 else job.context
        headers = {"X-Lorachain-Route": json.dumps(infos[0])} if infos[0] else {}
        return JSONResponse(data, headers=headers)

    async def _json(self, path: str, body: dict) -> dict:
        try:
            resp = await self.client.post(path, json=body, headers=self.headers)
        except httpx.TimeoutException:
            raise self.failed("timeout", "no answer in time", 504) from None
        except httpx.HTTPError as e:
            raise self.failed("unreachable", f"cannot connect ({type(e).__name__})") from None
        self._check_status(resp.status_code, resp.content)
        try:
            data = resp.json()
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
            raise self.failed("invalid_response", "answered with something that is not a completion")
        return data

    def _check_status(self, status: int, content: bytes) -> None:
        if status == 200:
            return
        try:
            message = json.loads(content)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = content[:200].decode(errors="replace")
        if status == 404:
            raise self.failed(
                "model_not_served",
                f"does not serve this model ({message}); start it with the command "
                "`lorachain export vllm STORE OUT` prints",
            )
        if status >= 500:
            raise self.failed(f"status_{status}", f"answered {status}: {message}")
        raise ApiError(status, f"upstream: {message}", param=None)

    async def _post(self, path: str, body: dict, kind: str, info, job):
        """A streamed request, or the base model's chat passed through."""
        if not body.get("stream"):
            data = await self._json(path, body)
            data = data | {"model": job.model}
            return JSONResponse(data)
        try:
            req = self.client.build_request("POST", path, json=body, headers=self.headers)
            resp = await self.client.send(req, stream=True)
        except httpx.TimeoutException:
            raise self.failed("timeout", "no answer in time", 504) from None
        except httpx.HTTPError as e:
            raise self.failed("unreachable", f"cannot connect ({type(e).__name__})") from None
        if resp.status_code != 200:
            content = await resp.aread()
            await resp.aclose()
            self._check_status(resp.status_code, content)
        extra = {"X-Lorachain-Route": json.dumps(info)} if info else {}
        return StreamingResponse(
            self._relay(resp, kind, job.model), headers=extra, media_type="text/event-stream"
        )

    async def _relay(self, resp: httpx.Response, kind: str, model: str):
        """The engine's events, chunk by chunk (turned into chat chunks for chat requests)."""
        started: set[int] = set()
        try:
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    yield "data: [DONE]\n\n"
                    continue
                data = json.loads(payload)
                if kind == "chat" and "choices" in data:
                    data = chat_chunk(data, model, started)
                else:
                    data["model"] = model
                yield f"data: {json.dumps(data)}\n\n"
        except (httpx.HTTPError, ValueError) as e:
            self.server.count('lorachain_upstream_errors_total{reason="stream"}')
            error = {"message": f"upstream {self.upstream} failed mid-stream: {type(e).__name__}"}
            yield f"data: {json.dumps({'error': error | {'type': 'server_error'}})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await resp.aclose()

    async def health(self) -> dict:
        try:
            resp = await self.client.get("/v1/models", headers=self.headers, timeout=2.0)
            ok, detail = resp.status_code == 200, f"status {resp.status_code}"
        except httpx.HTTPError as e:
            ok, detail = False, type(e).__name__
        return {
            "status": "ok" if ok else "degraded",
            "upstream": self.upstream,
            "upstream_ok": ok,
            "detail": detail,
        }


def create_proxy_app(
    router,
    upstream: str,
    api_key: str | None = None,
    upstream_key: str | None = None,
    max_prompt_tokens: int = 1024,
    max_tokens_limit: int = 256,
    default_max_tokens: int = 64,
    timeout: float = 300.0,
    max_context: int | None = None,
    truncate: bool | None = None,
) -> FastAPI:
    """The proxy's FastAPI app: the same API, routes and errors as `create_app`."""
    app = FastAPI(title="lorachain proxy", version="1", docs_url=None, redoc_url=None)
    server = Server(
        None, api_key, max_prompt_tokens, max_tokens_limit, default_max_tokens,
        router=router, max_context=max_context, truncate=truncate,
    )  # fmt: skip
    _install_handlers(app, server)
    proxy = Proxy(server, upstream, upstream_key, timeout)
    app.state.proxy, app.state.server = proxy, server

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await proxy.handle("completion", request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await proxy.handle("chat", request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(n) for n in sorted(server.names)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        server.resolve(model_id)
        return model_card(model_id)

    @app.get("/health")
    async def health():
        return await proxy.health()

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return server.metrics_text()

    return app
