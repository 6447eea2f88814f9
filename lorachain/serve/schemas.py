"""The request bodies of the OpenAI API as clients send them, and how a bad one is worded.

Every field of the OpenAI spec for these endpoints is known. Those the server implements are
checked and used; those it does not (tools, audio, structured output) are refused by name, and
fields outside the spec are refused too, all of them named in one reply.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Prompt = str | list[str] | list[int] | list[list[int]]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(default=None, max_length=200)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted; nothing to obfuscate


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(max_length=200)
    max_tokens: int | None = Field(default=None, ge=0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(default=None, max_length=16)  # OpenAI: 4; lm-eval sends more
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=8)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 9)  # int64, room for n
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=300)
    user: str | None = Field(default=None, max_length=256)
    ignore_eos: bool = False  # vLLM's extension: always generate max_tokens
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)  # vLLM's; -1: keep what fits

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(_Common):
    prompt: Prompt
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    best_of: int | None = Field(default=None, ge=1, le=8)


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None


# fields of the OpenAI spec this server does not implement; a value other than these is refused
UNSUPPORTED = {
    "chat": {
        "tools": (None, []),
        "tool_choice": (None, "none"),
        "functions": (None, []),
        "function_call": (None, "none"),
        "audio": (None,),
        "modalities": (None, ["text"]),
        "prediction": (None,),
        "web_search_options": (None,),
        "reasoning_effort": (None,),
        "verbosity": (None,),
        "prompt_cache_key": (None,),
        "safety_identifier": (None,),
    },
    "completion": {"suffix": (None, "")},
}


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


class RequestError(ValueError):
    """A body that is not a valid request; `param` names the first field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def _loc(err: dict) -> str:
    return ".".join(str(x) for x in err.get("loc", ()) if x != "body")


def describe(exc: ValidationError | list[dict]) -> tuple[str, str | None]:
    """One line for all of a body's errors: unknown fields together, then one reason per field
    (a field of several accepted forms, like `prompt`, lists the forms)."""
    errors = exc.errors() if isinstance(exc, ValidationError) else exc
    unknown = [_loc(e) for e in errors if e.get("type") == "extra_forbidden"]
    parts = [f"unknown fields: {', '.join(unknown)}"] if unknown else []
    by_field: dict[str, list[dict]] = {}
    for e in errors:
        if e.get("type") != "extra_forbidden":
            by_field.setdefault(_loc(e).split(".")[0], []).append(e)
    for name, errs in by_field.items():
        forms = list(dict.fromkeys(str(e["loc"][-2 if len(e["loc"]) > 2 else -1]) for e in errs))
        union = len(errs) > 1 and len(forms) > 1 and all("[" in f or f in TYPES for f in forms)
        if union:
            parts.append(f"{name}: expected one of {', '.join(f for f in forms if not f.isdigit())}")
        else:
            loc = _loc(errs[0])
            parts.append(f"{loc}: {errs[0].get('msg', 'invalid')}" if loc else errs[0].get("msg", "invalid"))
    first = unknown[0] if unknown else next(iter(by_field), None)
    return "; ".join(parts) or "invalid request", first or None


TYPES = {"str", "int", "float", "bool", "dict", "list"}


def parse(kind: str, body: object) -> CompletionRequest | ChatRequest:
    """The validated request of endpoint `kind` ("chat" or "completion"), or RequestError."""
    cls = ChatRequest if kind == "chat" else CompletionRequest
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    refused = [
        k
        for k, allowed in UNSUPPORTED[kind].items()
        if k in body and not any(body[k] == a and type(body[k]) is type(a) for a in allowed)
    ]
    try:
        req = cls.model_validate({k: v for k, v in body.items() if k not in UNSUPPORTED[kind]})
    except ValidationError as e:
        msg, param = describe(e)
        if refused:
            msg = f"not supported by this server: {', '.join(refused)}; {msg}"
        raise RequestError(msg, refused[0] if refused else param) from None
    if refused:
        raise RequestError(f"not supported by this server: {', '.join(refused)}", refused[0])
    check(req, kind)
    return req


def check(req: CompletionRequest | ChatRequest, kind: str) -> None:
    """The checks across fields."""
    fmt = getattr(req, "response_format", None)
    if fmt is not None and fmt.type != "text":
        raise RequestError(
            f"response_format: type {fmt.type!r} is not supported (only 'text')", "response_format"
        )
    if kind == "completion" and req.best_of not in (None, req.n or 1):
        raise RequestError("best_of: only best_of equal to n is supported", "best_of")
    if kind == "chat" and req.top_logprobs is not None and not req.logprobs:
        raise RequestError("top_logprobs: needs logprobs set to true", "top_logprobs")
    for key in req.logit_bias or {}:
        if not key.lstrip("-").isdigit():
            raise RequestError(f"logit_bias: keys are token ids, got {key!r}", "logit_bias")
    for value in (req.logit_bias or {}).values():
        if not -100 <= value <= 100:
            raise RequestError(f"logit_bias: values are between -100 and 100, got {value}", "logit_bias")


def lone_surrogate(body) -> str | None:
    """The path of the first string in a parsed body that holds a lone UTF-16 surrogate (JSON lets
    `"\\ud800"` through; no tokenizer can encode it), or None."""
    todo = [("", body)]
    while todo:
        path, value = todo.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return path or "body"
        elif isinstance(value, dict):
            todo += [(f"{path}.{k}" if path else str(k), v) for k, v in value.items()]
        elif isinstance(value, list):
            todo += [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    return None
