"""The OpenAI-compatible HTTP API over an adapter store (FastAPI).

`model` is `auto` (routed by the selector), a task adapter's name, `mixed`, or `base`; names are
looked up in the store's manifest only. Routed responses carry the decision in `lorachain_route`
and the `X-Lorachain-Route` header. Every error has the OpenAI shape and a 4xx code.

The event loop only moves bytes: a body over `max_request_bytes` is refused with 413 while it is
read, and parsing, template rendering and tokenisation run in worker threads; a body over 1 MB is
first checked in a helper process (`serve/gate.py`), so `/health` answers while 10 MB requests are
being refused. Prompt rules are in `serve/prompting.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import multiprocessing
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lorachain.serve import respond
from lorachain.serve.engine import AUTO, BASE, Engine, QueueFull
from lorachain.serve.prepare import prepare
from lorachain.serve.prompting import context_length
from lorachain.serve.respond import Job
from lorachain.serve.schemas import ApiError, ChatRequest, CompletionRequest, describe, error_body
from lorachain.store import MIXED

PLAYGROUND = Path(__file__).with_name("playground.html")
BIG = 1 << 20  # bodies over this give their memory back to the system when done


def release_memory() -> None:
    """Give freed heap memory back to the system (glibc keeps big freed blocks otherwise)."""
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc
            pass


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
        max_context: int | None = None,
        max_request_bytes: int = 8 << 20,
        truncate: bool | None = None,
    ) -> None:
        self.engine, self.router, self.api_key = engine, router or engine.router, api_key
        self.max_prompt_tokens, self.max_tokens_limit = max_prompt_tokens, max_tokens_limit
        self.default_max_tokens = min(default_max_tokens, max_tokens_limit)
        self.context = context_length(self.router.model, max_context)
        self.max_request_bytes = max_request_bytes
        templates = self.router.manifest.templates
        self.truncate = templates.get("truncation") == "left" if truncate is None else truncate
        self.names = {
            AUTO: AUTO,
            "base": BASE,
            "mixed": MIXED,
            **{a: a for a in self.router.adapters.values()},
        }
        self.counters: dict[str, int] = {}
        self.gate_pool = None  # the helper process that checks big bodies (serve/gate.py)

    async def gate(self, kind: str, raw: bytes) -> ApiError | None:
        """A big body's refusal, found in the helper process (started on first use), or None."""
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        from lorachain.serve.gate import GateSettings, gate, init_gate

        if self.gate_pool is None:
            settings = GateSettings(
                self.names, self.router.manifest.templates, self.context, self.max_prompt_tokens,
                self.max_tokens_limit, self.default_max_tokens, bool(self.truncate),
            )  # fmt: skip
            ctx = multiprocessing.get_context("spawn")
            init = (settings, self.router.tok)
            self.gate_pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=init_gate, initargs=init)
        try:
            refusal = await asyncio.get_running_loop().run_in_executor(self.gate_pool, gate, kind, raw)
        except BrokenProcessPool:  # the helper died: the server's own path still answers
            self.gate_pool = None
            return None
        return (
            None if refusal is None else ApiError(refusal[0], refusal[1], param=refusal[2], code=refusal[3])
        )

    def close(self) -> None:
        if self.gate_pool is not None:
            self.gate_pool.shutdown(wait=False, cancel_futures=True)
            self.gate_pool = None

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

    def prepare(self, kind: str, raw: bytes) -> Job | ApiError:
        """A request body as a Job, or the ApiError to answer (serve/prepare.py)."""
        return prepare(self, kind, raw)

    # -- queueing (event loop) ---------------------------------------------------------------
    def submit(self, job: Job) -> asyncio.Queue:
        """Queue every choice of `job`; its events arrive as (choice index, kind, payload)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        if self.engine.queue.maxsize - self.engine.queue.qsize() < len(job.gen):
            raise ApiError(
                429, "request queue is full; retry later", type_="rate_limit_error", code="queue_full"
            )
        for i, gen in enumerate(job.gen):

            def emit(kind: str, payload: object, i: int = i) -> None:
                loop.call_soon_threadsafe(events.put_nowait, (i, kind, payload))

            gen.emit = emit
            try:
                self.engine.submit(gen)
            except QueueFull as e:
                raise ApiError(429, str(e), type_="rate_limit_error", code="queue_full") from None
        self.count(f'lorachain_requests_total{{model="{job.model}"}}')
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


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to be over `limit` bytes."""
    size = request.headers.get("content-length", "")
    if size.isdigit() and int(size) > limit:
        raise ApiError(
            413,
            f"request body of {int(size)} bytes is over this server's limit of {limit}",
            code="request_too_large",
        )
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(
                413, f"request body is over this server's limit of {limit} bytes", code="request_too_large"
            )
        chunks.append(chunk)
    return b"".join(chunks)


async def handle(server: Server, kind: str, request: Request):
    """Read, prepare (off the loop), queue and answer one chat or completions request."""
    raw = await read_body(request, server.max_request_bytes)
    big = len(raw) > BIG
    refusal = await server.gate(kind, raw) if big else None
    job = refusal or await asyncio.to_thread(server.prepare, kind, raw)
    del raw
    if big:
        await asyncio.to_thread(release_memory)
    if isinstance(job, ApiError):
        raise job
    events = server.submit(job)
    if job.stream:
        return respond.stream(server, job, events)
    try:
        return await respond.full(server, job, events)
    except respond.GenerationFailed as e:
        raise ApiError(503, str(e), type_="server_error") from None


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
        msg, param = describe(list(exc.errors()))
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


def _body(name: str) -> dict:
    ref = {"$ref": f"#/components/schemas/{name}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def _openapi(app: FastAPI) -> None:
    """The request schemas in the OpenAPI document (the endpoints read their bodies themselves)."""

    def schema() -> dict:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
            comps = doc.setdefault("components", {}).setdefault("schemas", {})
            for cls in (CompletionRequest, ChatRequest):
                s = cls.model_json_schema(ref_template="#/components/schemas/{model}")
                comps.update(s.pop("$defs", {}))
                comps[cls.__name__] = s
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = schema


def model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "lorachain"}


def create_app(
    engine: Engine,
    api_key: str | None = None,
    max_prompt_tokens: int = 1024,
    max_tokens_limit: int = 256,
    default_max_tokens: int = 64,
    max_context: int | None = None,
    max_request_bytes: int = 8 << 20,
    truncate: bool | None = None,
) -> FastAPI:
    """The FastAPI app serving `engine` (whose router holds the store and the base model).
    `truncate` None follows the store (`templates.truncation: left`)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.close()

    app = FastAPI(title="lorachain", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    server = Server(
        engine, api_key, max_prompt_tokens, max_tokens_limit, default_max_tokens,
        max_context=max_context, max_request_bytes=max_request_bytes, truncate=truncate,
    )  # fmt: skip
    app.state.server = server
    _install_handlers(app, server)
    _openapi(app)

    @app.post("/v1/completions", openapi_extra=_body("CompletionRequest"))
    async def completions(request: Request):
        return await handle(server, "completion", request)

    @app.post("/v1/chat/completions", openapi_extra=_body("ChatRequest"))
    async def chat(request: Request):
        return await handle(server, "chat", request)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(n) for n in sorted(server.names)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        server.resolve(model_id)
        return model_card(model_id)

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
