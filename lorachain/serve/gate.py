"""Big request bodies are checked in a helper process first, so that parsing megabytes of JSON
(~20 ms of held GIL per 9 MB) never stalls the server's event loop.

The helper parses the body, validates it (the same `schemas.parse`) and counts the prompt's
tokens with the same bounded `prompting.encode`: a body whose prompt cannot fit the context is
refused there, in OpenAI's words ("at least N tokens"), and never parsed by the server. A body that
may fit, or that asks for truncation, goes on to the server's usual path. Imports no torch.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import signal
import sys
from dataclasses import dataclass

from lorachain.serve.prompting import PromptError, encode, fit_context, render_chat
from lorachain.serve.schemas import RequestError, lone_surrogate, parse


@dataclass
class GateSettings:
    names: dict[str, str]  # public model name -> adapter
    templates: dict  # the store's
    context: int
    max_prompt_tokens: int
    max_tokens_limit: int
    default_max_tokens: int
    truncate: bool


_STATE: dict = {}


def init_gate(settings: GateSettings, tokenizer) -> None:
    """The helper process's start: keep the settings and tokenizer; die with the server."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    _STATE.update(settings=settings, tok=tokenizer)


def prompts(kind: str, req, adapter: str, s: GateSettings, tok) -> list[tuple[str, bool]]:
    """The text prompts a request gives the model, rendered as the server renders them."""
    if kind == "chat":
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages
        ]
        return [render_chat(s.templates, tok, messages, adapter)]
    listed = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    return [(p, True) for p in listed if isinstance(p, str)]


def gate(kind: str, raw: bytes) -> tuple[int, str, str | None, str | None] | None:
    """The refusal (status, message, param, code) of a body, or None: let the server prepare it."""
    s: GateSettings = _STATE["settings"]
    tok = _STATE["tok"]
    try:
        body = json.loads(raw)
        if (where := lone_surrogate(body)) is not None:
            return 400, f"{where}: a lone UTF-16 surrogate is not valid Unicode text", where, None
        req = parse(kind, body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return 400, f"the request body is not valid JSON: {e}", None, None
    except RecursionError:
        return 400, "the request body is not valid JSON: nested too deeply", None, None
    except RequestError as e:
        return 400, e.message, e.param, None
    requested = getattr(req, "max_completion_tokens", None)
    requested = requested if requested is not None else req.max_tokens
    if req.model not in s.names or s.truncate or req.truncate_prompt_tokens is not None:
        return None  # the server words these
    if requested is not None and requested > s.max_tokens_limit:
        return None
    param = "messages" if kind == "chat" else "prompt"
    limit = min(s.context, s.max_prompt_tokens)
    for text, special in prompts(kind, req, s.names[req.model], s, tok):
        ids, exact = encode(tok, text, special, limit)
        if exact:
            continue  # it is short: the server's own path is cheap
        try:
            fit_context(ids, s.context, requested, s.default_max_tokens, False, param=param, exact=False)
        except PromptError as e:
            return 400, e.message, e.param, e.code
        return (
            400,
            f"prompt has at least {len(ids)} tokens, over this server's limit of {s.max_prompt_tokens}",
            param,
            "context_length_exceeded",
        )
    return None
