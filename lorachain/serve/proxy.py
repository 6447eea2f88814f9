"""Proxy mode: only the task-selection adapter runs here; requests go, with `model` set to the
chosen adapter, to an upstream OpenAI-compatible engine that already serves the adapters (vLLM with
`--enable-lora`, LoRAX, or another `lorachain serve`)."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from lorachain.serve.api import ApiError, ChatRequest, CompletionRequest, Server, _install_handlers
from lorachain.serve.engine import AUTO, BASE
from lorachain.store import MIXED


def upstream_name(adapter: str, base_model: str) -> str:
    """The model name the upstream engine knows an adapter by (see `lorachain export vllm`)."""
    return base_model if adapter == BASE else "mixed" if adapter == MIXED else adapter


class Proxy:
    """Selection here, generation upstream."""

    def __init__(
        self, server: Server, upstream: str, upstream_key: str | None, base: str, timeout: float
    ) -> None:
        self.server, self.upstream, self.base = server, upstream, base
        self.lock = threading.Lock()  # the model serves one selection at a time
        self.client = httpx.AsyncClient(base_url=upstream.rstrip("/"), timeout=timeout)
        self.headers = {"Authorization": f"Bearer {upstream_key}"} if upstream_key else {}

    def select(self, instruction: str):
        with self.lock:
            return self.server.router.select([instruction])[0]

    async def forward(self, path: str, req, instruction: str):
        server = self.server
        adapter = server.resolve(req.model)
        if (req.max_tokens or 0) > server.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens {req.max_tokens} is over this server's limit of {server.max_tokens_limit}",
                param="max_tokens",
            )
        sel = None
        if adapter == AUTO:
            sel = await asyncio.to_thread(self.select, instruction)
            adapter = sel.adapter
        body = req.model_dump(exclude_none=True) | {"model": upstream_name(adapter, self.base)}
        info = server.route_info(sel)
        server.count(f'lorachain_requests_total{{model="{req.model}"}}')
        server.count(f'lorachain_adapter_requests_total{{adapter="{adapter}"}}')
        extra = {"X-Lorachain-Route": json.dumps(info)} if info else {}
        try:
            return await self._send(path, body, req.stream, info, extra)
        except httpx.HTTPError as e:
            raise ApiError(
                502, f"upstream {self.upstream} failed: {type(e).__name__}", type_="server_error"
            ) from None

    async def _send(self, path: str, body: dict, stream: bool, info, extra: dict):
        if stream:
            resp = await self.client.send(
                self.client.build_request("POST", path, json=body, headers=self.headers), stream=True
            )
            return StreamingResponse(
                resp.aiter_raw(),
                status_code=resp.status_code,
                headers=extra,
                media_type=resp.headers.get("content-type", "text/event-stream"),
            )
        resp = await self.client.post(path, json=body, headers=self.headers)
        try:
            data = resp.json()
        except ValueError:
            return Response(resp.content, status_code=resp.status_code)
        if isinstance(data, dict) and resp.status_code == 200:
            data["lorachain_route"] = info
        return JSONResponse(data, status_code=resp.status_code, headers=extra)


def create_proxy_app(
    router,
    upstream: str,
    api_key: str | None = None,
    upstream_key: str | None = None,
    base_model: str | None = None,
    max_prompt_tokens: int = 1024,
    max_tokens_limit: int = 256,
    timeout: float = 300.0,
) -> FastAPI:
    """The proxy's FastAPI app: the same API, routes and errors as `create_app`."""
    app = FastAPI(title="lorachain proxy", version="1", docs_url=None, redoc_url=None)
    server = Server(None, api_key, max_prompt_tokens, max_tokens_limit, 64, router=router)
    _install_handlers(app, server)
    proxy = Proxy(
        server, upstream, upstream_key, base_model or router.manifest.base_model["name_or_path"], timeout
    )
    app.state.proxy = proxy

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await proxy.forward("/v1/completions", req, req.prompt)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        users = [m.content for m in req.messages if m.role == "user"]
        return await proxy.forward(
            "/v1/chat/completions", req, users[-1] if users else req.messages[-1].content
        )

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "owned_by": "lorachain"} for n in sorted(server.names)],
        }

    @app.get("/health")
    async def health():
        return {"status": "ok", "upstream": upstream}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return server.metrics_text()

    return app
