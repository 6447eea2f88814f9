"""A request body turned into a Job for the engine, on a worker thread: parse, resolve the
model, render and tokenise each prompt (serve/prompting.py), apply the context policy, and set each
choice's sampling. Errors come back as an ApiError value, never raised across the thread."""

from __future__ import annotations

import json

from lorachain.serve.engine import GenRequest
from lorachain.serve.prompting import PromptError, encode, fit_context, render_chat
from lorachain.serve.respond import Job
from lorachain.serve.sampling import Sampling
from lorachain.serve.schemas import ApiError, RequestError, lone_surrogate, parse


def prepare(server, kind: str, raw: bytes) -> Job | ApiError:
    """Parse, render, tokenise and fit a request body; an error is returned, not raised, so
    that no traceback keeps a big body alive."""
    try:
        return _prepare(server, kind, raw)
    except ApiError as e:
        err = e
    except (RequestError, PromptError) as e:
        err = ApiError(400, e.message, param=e.param, code=getattr(e, "code", None))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        err = ApiError(400, f"the request body is not valid JSON: {e}")
    except RecursionError:
        err = ApiError(400, "the request body is not valid JSON: nested too deeply")
    return ApiError(err.status, err.message, err.type, err.param, err.code)


def _prepare(server, kind: str, raw: bytes) -> Job:
    body = json.loads(raw)
    where = lone_surrogate(body)
    if where is not None:
        raise ApiError(400, f"{where}: a lone UTF-16 surrogate is not valid Unicode text", param=where)
    req = parse(kind, body)
    adapter = server.resolve(req.model)
    requested = getattr(req, "max_completion_tokens", None)
    requested = requested if requested is not None else req.max_tokens
    if requested is not None and requested > server.max_tokens_limit:
        raise ApiError(
            400,
            f"max_tokens {requested} is over this server's limit of {server.max_tokens_limit}",
            param="max_tokens",
        )
    truncate = server.truncate if req.truncate_prompt_tokens is None else req.truncate_prompt_tokens
    truncate = True if truncate == -1 else truncate
    prompts = _prompts(server, kind, req, adapter, truncate)
    job = Job(kind, req.model, [], 0, stream=bool(req.stream))
    job.include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
    if kind == "chat":
        job.logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        job.echo, job.logprobs = bool(req.echo), req.logprobs
    gens = []
    for p, (ids, text, instruction, exact) in enumerate(prompts):
        fit = fit_context(
            ids, server.context, requested, server.default_max_tokens, truncate,
            param="messages" if kind == "chat" else "prompt", exact=exact,
        )  # fmt: skip
        if len(fit.ids) > server.max_prompt_tokens:
            if not truncate:
                raise ApiError(
                    400,
                    f"prompt has {len(fit.ids)} tokens, over this server's limit of "
                    f"{server.max_prompt_tokens}",
                    param="messages" if kind == "chat" else "prompt",
                    code="context_length_exceeded",
                )
            fit.truncated += len(fit.ids) - server.max_prompt_tokens
            fit.ids = fit.ids[-server.max_prompt_tokens :]
        job.prompt_tokens += len(fit.ids)
        job.context.append(fit.info())
        echo_text = server.router.tok.decode(fit.ids) if fit.truncated or text is None else text
        for j in range(req.n or 1):
            job.choices.append((p, fit.ids, echo_text))
            gens.append(
                GenRequest(
                    fit.ids, adapter, fit.max_tokens, None, instruction, req.stops(),
                    ignore_eos=req.ignore_eos, sampling=_sampling(req, j, job),
                )
            )  # fmt: skip
    job.gen = gens
    return job


def _prompts(server, kind: str, req, adapter: str, truncate) -> list[tuple]:
    """Each prompt as (ids, text or None, instruction for the selector, exact)."""
    tok = server.router.tok
    limit = min(server.context, server.max_prompt_tokens)
    if kind == "chat":
        messages = [{"role": _role(m.role), "content": m.text()} for m in req.messages]
        text, special = render_chat(server.router.manifest.templates, tok, messages, adapter)
        ids, exact = encode(tok, text, special, limit, keep_end=bool(truncate))
        return [(ids, text, server.router.selector_text(messages), exact)]
    prompt = req.prompt
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt: the list of prompts is empty", param="prompt", code="empty_prompt")
    out = []
    vocab = len(tok)
    for p in prompt:
        if isinstance(p, str):
            ids, exact = encode(tok, p, True, limit, keep_end=bool(truncate))
            out.append((ids, p, p, exact))
            continue
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ApiError(
                400, f"prompt: token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})", "prompt"
            )
        out.append((list(p), None, tok.decode(p[-4 * limit :]), True))
    return out


def _sampling(req, j: int, job: Job) -> Sampling:
    return Sampling(
        temperature=req.temperature or 0.0,
        top_p=req.top_p or 1.0,
        seed=None if req.seed is None else req.seed + j,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()},
        logprobs=job.logprobs,
        echo=job.echo and job.logprobs is not None,
    )


def _role(role: str) -> str:
    return "system" if role == "developer" else role
