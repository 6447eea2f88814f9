"""The OpenAI-compatible HTTP API over an adapter store (FastAPI).

`model` is `auto` (routed by the selector), a task adapter's name, `mixed`, or `base`; names are
looked up in the store's manifest only. Routed responses carry the decision in `lorachain_route`
and the `X-Lorachain-Route` header. Every error has the OpenAI shape and a 4xx code.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorachain.serve.engine import AUTO, BASE, Engine, GenRequest, QueueFull
from lorachain.store import MIXED

PLAYGROUND = Path(__file__).with_name("playground.html")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=200_000)


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=200)
    max_tokens: int | None = Field(default=None, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)  # accepted; decoding is greedy
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=1)
    user: str | None = Field(default=None, max_length=200)
    ignore_eos: bool = False  # vLLM's extension: always generate max_tokens


class CompletionRequest(_Common):
    prompt: str = Field(max_length=200_000)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=256)


def chat_text(tokenizer, messages: list[dict]) -> str:
    """The base model's chat template, or plain "role: content" lines when it has none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


class Server:
    """What the endpoints share: the engine, the public model names, limits and counters."""

    def __init__(
        self,
        engine: Engine | None,
        api_key: str | None,
        max_prompt_tokens: int,
        max_tokens_limit: int,
        default_max_tokens: int,
        router=None,
    ) -> None:
        self.engine, self.router, self.api_key = engine, router or engine.router, api_key
        self.max_prompt_tokens, self.max_tokens_limit = max_prompt_tokens, max_tokens_limit
        self.default_max_tokens = min(default_max_tokens, max_tokens_limit)
        self.names = {
            AUTO: AUTO,
            "base": BASE,
            "mixed": MIXED,
            **{a: a for a in self.router.adapters.values()},
        }
        self.counters: dict[str, int] = {}

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    def resolve(self, model: str) -> str:
        """The adapter behind a public model name; only manifest names exist (no paths)."""
        if model not in self.names:
            raise ApiError(
                404,
                f"model {model!r} not found; known models: {sorted(self.names)}",
                param="model",
                code="model_not_found",
            )
        return self.names[model]

    def submit(self, req: _Common, prompt_ids: list[int] | None, instruction: str) -> asyncio.Queue:
        """Check limits, queue the request, and return the queue its events arrive on."""
        adapter = self.resolve(req.model)
        max_tokens = req.max_tokens or self.default_max_tokens
        if max_tokens > self.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens {max_tokens} is over this server's limit of {self.max_tokens_limit}",
                param="max_tokens",
            )
        if adapter != BASE:
            prompt_ids = None  # adapters answer through the store's prompt template
        n_prompt = (
            len(prompt_ids) if prompt_ids is not None else len(self.router.tok(instruction)["input_ids"])
        )
        if n_prompt > self.max_prompt_tokens:
            raise ApiError(
                400,
                f"prompt has {n_prompt} tokens, over this server's limit of {self.max_prompt_tokens}",
                param="prompt",
                code="context_length_exceeded",
            )
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(kind: str, payload: object) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        try:
            self.engine.submit(
                GenRequest(
                    prompt_ids, adapter, max_tokens, emit, instruction, stop[:4], ignore_eos=req.ignore_eos
                )
            )
        except QueueFull as e:
            raise ApiError(429, str(e), type_="rate_limit_error", code="queue_full") from None
        self.count(f'lorachain_requests_total{{model="{req.model}"}}')
        return events

    def route_info(self, sel) -> dict | None:
        if sel is None:
            return None
        return {
            "task": sel.ranked[0] if sel.ranked else None,
            "adapter": sel.adapter,
            "top_k": sel.top(self.router.top_k),
            "fallback": sel.fallback,
        }

    def metrics_text(self) -> str:
        lines = [f"{k} {v}" for k, v in sorted(self.counters.items())]
        if self.engine is None:
            return "\n".join(lines) + "\n"
        lines.append(f"lorachain_queue_depth {self.engine.depth()}")
        lines.append(f"lorachain_generated_tokens_total {self.engine.stats['tokens']}")
        lines += [
            f'lorachain_batches_total{{size="{k}"}} {n}' for k, n in sorted(self.engine.batch_sizes.items())
        ]
        lines += [
            f'lorachain_adapter_requests_total{{adapter="{k}"}} {n}'
            for k, n in sorted(self.engine.stats.items())
            if k != "tokens"
        ]
        return "\n".join(lines) + "\n"


def _choice(kind: str, text: str | None, finish: str | None, delta: bool) -> dict:
    if kind == "chat":
        body = {"role": "assistant", "content": text} if text is not None else {}
        return {"index": 0, "delta" if delta else "message": body, "finish_reason": finish}
    return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}


async def respond_full(server: Server, kind: str, model: str, events: asyncio.Queue) -> JSONResponse:
    text, route = [], None
    while True:
        event, payload = await events.get()
        if event == "route":
            route = payload
        elif event == "delta":
            text.append(payload)
        elif event == "error":
            raise ApiError(503, str(payload), type_="server_error")
        else:
            break
    answer = "".join(text)
    n = len(server.router.tok(answer)["input_ids"]) if answer else 0
    server.count("lorachain_completion_tokens_total", n)
    info = server.route_info(route)
    body = {
        "id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [_choice(kind, answer, str(payload), False)],
        "lorachain_route": info,
        "usage": {"completion_tokens": n},
    }
    return JSONResponse(body, headers={"X-Lorachain-Route": json.dumps(info)} if info else {})


def respond_stream(server: Server, kind: str, model: str, events: asyncio.Queue) -> StreamingResponse:
    rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    obj, created = "chat.completion.chunk" if kind == "chat" else "text_completion", int(time.time())

    async def stream():
        route = None
        while True:
            event, payload = await events.get()
            if event == "route":
                route = payload
                continue
            if event == "error":
                yield f"data: {json.dumps(error_body(str(payload), 'server_error'))}\n\n"
                break
            text, finish = (payload, None) if event == "delta" else (None, str(payload))
            chunk = {
                "id": rid,
                "object": obj,
                "created": created,
                "model": model,
                "choices": [_choice(kind, text, finish, True)],
                "lorachain_route": server.route_info(route),
            }
            yield f"data: {json.dumps(chunk)}\n\n"
            if event == "done":
                break
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0] if exc.errors() else {}
    loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
    msg = err.get("msg", "invalid request")
    return (f"{loc}: {msg}" if loc else msg), (loc or None)


def _install_handlers(app: FastAPI, server: Server) -> None:
    """OpenAI-shaped errors for every failure, and the optional API key."""
    api_key = server.api_key

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        server.count(f'lorachain_errors_total{{status="{exc.status}"}}')
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        server.count('lorachain_errors_total{status="400"}')
        msg, param = _validation_message(exc)
        return JSONResponse(error_body(msg, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                body = error_body("missing or wrong API key", "authentication_error", code="invalid_api_key")
                return JSONResponse(body, status_code=401)
        return await call_next(request)


def create_app(
    engine: Engine,
    api_key: str | None = None,
    max_prompt_tokens: int = 1024,
    max_tokens_limit: int = 256,
    default_max_tokens: int = 64,
) -> FastAPI:
    """The FastAPI app serving `engine` (whose router holds the store and the base model)."""
    app = FastAPI(title="lorachain", version="1", docs_url=None, redoc_url=None)
    server = Server(engine, api_key, max_prompt_tokens, max_tokens_limit, default_max_tokens)
    app.state.server = server

    _install_handlers(app, server)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        events = server.submit(req, server.router.tok(req.prompt)["input_ids"], req.prompt)
        if req.stream:
            return respond_stream(server, "completion", req.model, events)
        return await respond_full(server, "completion", req.model, events)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        messages = [m.model_dump() for m in req.messages]
        users = [m["content"] for m in messages if m["role"] == "user"]
        instruction = users[-1] if users else messages[-1]["content"]
        ids = None
        if server.resolve(req.model) == BASE:
            ids = server.router.tok(chat_text(server.router.tok, messages), add_special_tokens=False)[
                "input_ids"
            ]
        events = server.submit(req, ids, instruction)
        if req.stream:
            return respond_stream(server, "chat", req.model, events)
        return await respond_full(server, "chat", req.model, events)

    @app.get("/v1/models")
    async def models():
        data = [{"id": n, "object": "model", "owned_by": "lorachain"} for n in sorted(server.names)]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health():
        return {"status": "ok", "queue_depth": engine.depth(), "adapters_loaded": list(server.router.cache)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return server.metrics_text()

    @app.get("/", response_class=HTMLResponse)
    async def playground():
        return PLAYGROUND.read_text()

    return app
