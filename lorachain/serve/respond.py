"""Engine events turned into OpenAI responses: one JSON body, or server-sent events.

Each choice's events arrive on one queue as (index, kind, payload). Usage is counted from token
ids: `prompt_tokens` from each prompt's ids, `completion_tokens` from the tokens each row generated.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse, StreamingResponse


class GenerationFailed(RuntimeError):
    """The engine answered a request with an error event (a 503 for a whole response)."""


@dataclass
class ChoiceState:
    text: list[str] = field(default_factory=list)
    prompt_lp: list = field(default_factory=list)
    lp: list = field(default_factory=list)
    tokens: int = 0
    finish: str | None = None
    route: object = None


@dataclass
class Job:
    """A prepared request: what the endpoint answers with, and each choice's prompt."""

    kind: str  # "chat" or "completion"
    model: str
    choices: list  # per choice: (prompt index, prompt ids, prompt text or None)
    prompt_tokens: int
    echo: bool = False
    logprobs: int | None = None  # completions: k; chat: top_logprobs when logprobs is true
    stream: bool = False
    include_usage: bool = False
    context: list = field(default_factory=list)  # per prompt: Fit.info()
    gen: list = field(default_factory=list)  # per choice: the GenRequest (filled by submit)


def _piece(tok, token: int) -> str:
    return tok.decode([token], skip_special_tokens=False)


def completion_logprobs(tok, entries: list, offset: int = 0) -> dict:
    """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    pos = offset
    for e in entries:
        if e is None:  # the prompt's first token: nothing before it
            continue
        piece = _piece(tok, e["id"])
        out["tokens"].append(piece)
        out["token_logprobs"].append(e["logprob"])
        top = {_piece(tok, i): lp for i, lp in e["top"]}
        out["top_logprobs"].append(top or None)
        out["text_offset"].append(pos)
        pos += len(piece)
    return out


def first_token(tok, ids: list[int]) -> dict:
    """The prompt's first token, whose log-probability is null (no context before it)."""
    return {
        "tokens": [_piece(tok, ids[0])],
        "token_logprobs": [None],
        "top_logprobs": [None],
        "text_offset": [0],
    }


def echo_logprobs(tok, prompt_ids: list[int], prompt_lp: list, gen_lp: list) -> dict:
    head = first_token(tok, prompt_ids)
    rest = completion_logprobs(tok, prompt_lp[1:] + gen_lp, len(head["tokens"][0]))
    return {k: head[k] + rest[k] for k in head}


def chat_logprobs(tok, entries: list) -> dict:
    def item(token: int, lp: float) -> dict:
        piece = _piece(tok, token)
        return {"token": piece, "logprob": lp, "bytes": list(piece.encode())}

    content = [
        {**item(e["id"], e["logprob"]), "top_logprobs": [item(i, lp) for i, lp in e["top"]]} for e in entries
    ]
    return {"content": content, "refusal": None}


def usage(job: Job, states: list[ChoiceState]) -> dict:
    completion = sum(s.tokens for s in states)
    return {
        "prompt_tokens": job.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": job.prompt_tokens + completion,
    }


def _ids(job: Job) -> tuple[str, str]:
    rid = f"{'chatcmpl' if job.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    return rid, "chat.completion" if job.kind == "chat" else "text_completion"


def _logprobs(tok, job: Job, i: int, st: ChoiceState, fresh: bool = True):
    if job.logprobs is None:
        return None
    if job.kind == "chat":
        return chat_logprobs(tok, st.lp)
    if job.echo and fresh:
        return echo_logprobs(tok, job.choices[i][1], st.prompt_lp, st.lp)
    return completion_logprobs(tok, st.lp)


def _extras(job: Job, states: list[ChoiceState], route_info) -> dict:
    extra = {"lorachain_route": route_info(states[0].route)}
    ctx = job.context if len(job.context) > 1 else job.context[0] if job.context else None
    if ctx and any(job.context):
        extra["lorachain_context"] = ctx
    return extra


async def full(server, job: Job, events: asyncio.Queue) -> JSONResponse:
    """Wait for every choice, then answer with one JSON body."""
    states = [ChoiceState() for _ in job.choices]
    done = 0
    while done < len(states):
        i, kind, payload = await events.get()
        st = states[i]
        if kind == "error":
            raise GenerationFailed(str(payload))
        if kind == "route":
            st.route = payload
        elif kind == "delta":
            st.text.append(payload)
        elif kind == "logprobs":
            st.lp += payload
        elif kind == "prompt_logprobs":
            st.prompt_lp = payload
        elif kind == "tokens":
            st.tokens = payload
        elif kind == "done":
            st.finish, done = str(payload), done + 1
    tok = server.router.tok
    rid, obj = _ids(job)
    choices = []
    for i, st in enumerate(states):
        text = "".join(st.text)
        if job.kind == "chat":
            body = {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": st.finish}
        else:
            prompt_text = job.choices[i][2] if job.echo else ""
            body = {"index": i, "text": prompt_text + text, "finish_reason": st.finish}
        body["logprobs"] = _logprobs(tok, job, i, st)
        if len(states) > 1:
            body["lorachain_route"] = server.route_info(st.route)
        choices.append(body)
    u = usage(job, states)
    server.count("lorachain_completion_tokens_total", u["completion_tokens"])
    server.count("lorachain_prompt_tokens_total", u["prompt_tokens"])
    out = {"id": rid, "object": obj, "created": int(time.time()), "model": job.model, "choices": choices}
    out |= _extras(job, states, server.route_info) | {"usage": u}
    info = out["lorachain_route"]
    return JSONResponse(out, headers={"X-Lorachain-Route": json.dumps(info)} if info else {})


class _Stream:
    """The chunks of one streamed response, built from engine events."""

    def __init__(self, server, job: Job) -> None:
        self.server, self.job, self.tok = server, job, server.router.tok
        self.rid, obj = _ids(job)
        self.obj = obj + ".chunk" if job.kind == "chat" else obj
        self.created = int(time.time())
        self.states = [ChoiceState() for _ in job.choices]

    def body(self, choices: list) -> dict:
        return {
            "id": self.rid,
            "object": self.obj,
            "created": self.created,
            "model": self.job.model,
            "choices": choices,
        }

    def chunk(self, i: int, text: str | None, finish: str | None, logprobs) -> str:
        if self.job.kind == "chat":
            delta = {"role": "assistant", "content": text} if text is not None else {}
            choice = {"index": i, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        else:
            choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        body = self.body([choice]) | {"lorachain_route": self.server.route_info(self.states[i].route)}
        if self.job.include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body)}\n\n"

    def pending(self, i: int):
        st = self.states[i]
        lp = _logprobs(self.tok, self.job, i, st, fresh=False) if st.lp else None
        st.lp = []
        return lp

    def on_event(self, i: int, kind: str, payload) -> str | None:
        st, job = self.states[i], self.job
        if kind == "route":
            st.route = payload
        elif kind == "prompt_logprobs":
            return self.chunk(
                i, job.choices[i][2], None, echo_logprobs(self.tok, job.choices[i][1], payload, [])
            )
        elif kind == "logprobs":
            st.lp += payload
        elif kind == "delta":
            return self.chunk(i, payload, None, self.pending(i))
        elif kind == "tokens":
            st.tokens = payload
        elif kind == "done":
            st.finish = str(payload)
            return self.chunk(i, None, st.finish, self.pending(i))
        return None

    async def events(self, events: asyncio.Queue):
        if self.job.echo and self.job.logprobs is None:  # the prompt first, as sent
            for i, c in enumerate(self.job.choices):
                yield self.chunk(i, c[2], None, None)
        while any(st.finish is None for st in self.states):
            i, kind, payload = await events.get()
            if kind == "error":
                err = {"message": str(payload), "type": "server_error", "param": None, "code": None}
                yield f"data: {json.dumps({'error': err})}\n\n"
                break
            if (out := self.on_event(i, kind, payload)) is not None:
                yield out
        else:
            u = usage(self.job, self.states)
            self.server.count("lorachain_completion_tokens_total", u["completion_tokens"])
            if self.job.include_usage:
                yield f"data: {json.dumps(self.body([]) | {'usage': u})}\n\n"
        yield "data: [DONE]\n\n"


def stream(server, job: Job, events: asyncio.Queue) -> StreamingResponse:
    """Server-sent events, one chunk per text delta; a last usage chunk with include_usage."""
    return StreamingResponse(_Stream(server, job).events(events), media_type="text/event-stream")
