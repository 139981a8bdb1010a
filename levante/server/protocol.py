"""OpenAI request bodies: pydantic models, JSON parsing and the OpenAI error shape.

Requests are parsed by hand (`parse_body`) rather than by FastAPI so that every failure -- bytes that
are not JSON, a body that is not an object, a wrong type, an out-of-range number -- becomes the
OpenAI error object ``{"error": {"message", "type", "param", "code"}}`` with status 400, never 422/500.
Models are strict (no "1" -> 1 or true -> 1 coercion) and ignore unknown fields, as OpenAI clients
send some (``user``, ``parallel_tool_calls``, ...).
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "APIError",
    "ChatCompletionRequest",
    "CompletionRequest",
    "EmbeddingRequest",
    "StreamOptions",
    "error_body",
    "parse_body",
    "validation_error",
]

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
MAX_STOP = 16
MAX_LOGPROBS = 20


class APIError(Exception):
    """An error reported to the client in the OpenAI shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object in `raw`; APIError(400) for anything else."""
    if not raw.strip():
        raise APIError(400, "the request body is empty; expected a JSON object", code="invalid_json")
    try:
        text = raw.decode("utf-8")
        obj = json.loads(text, parse_constant=_reject_constant)
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not valid UTF-8: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply", code="invalid_json") from None
    except ValueError as e:  # json.JSONDecodeError is a ValueError
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(obj).__name__}",
                       code="invalid_type")
    return obj


def validation_error(e: ValidationError) -> APIError:
    """The first pydantic error as an OpenAI 400 naming the field."""
    err = e.errors(include_url=False)[0]
    loc = [str(p) for p in err.get("loc", ())]
    # unions add the member type to the location ("prompt.str"): keep the user-visible path only
    param = ".".join(p for p in loc if not _is_type_tag(p)) or None
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        return APIError(400, f"you must provide the '{param}' field", param=param, code="missing_required_parameter")
    inp = err.get("input")
    shown = _short(inp)
    return APIError(400, f"invalid value for '{param}': {msg} (got {shown})", param=param, code="invalid_value")


def _is_type_tag(p: str) -> bool:
    return p in ("str", "int", "float", "bool", "list[int]", "list[str]", "list[list[int]]", "dict[str,any]",
                 "function-after[_check_prompt(), union[str,list[str],list[int],list[list[int]]]]") or (
        p.startswith(("list[", "union[", "function-", "constrained-")))


def _short(v: Any, limit: int = 60) -> str:
    try:
        s = json.dumps(v, ensure_ascii=True)
    except (TypeError, ValueError):
        s = type(v).__name__
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _finite(v: float | None, name: str) -> float | None:
    if v is not None and not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number")
    return v


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Common(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    user: str | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    # llama.cpp-style extras
    top_k: Annotated[int, Field(ge=-1, le=1_000_000)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repeat_penalty: Annotated[float, Field(gt=0.0, le=10.0)] | None = None
    typical_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    # structured output: OpenAI's response_format, or a llama.cpp GBNF grammar
    response_format: dict[str, Any] | None = None
    grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v):
        if isinstance(v, list) and len(v) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_bias(cls, v):
        if v is None:
            return v
        out = {}
        for k in v:
            if not k.strip().lstrip("-").isdigit() or len(k) > 12:
                raise ValueError(f"logit_bias keys must be token ids, got {k!r}")
            out[int(k)] = v[k]
        if len(out) > 1024:
            raise ValueError("at most 1024 logit_bias entries are allowed")
        return out

    @field_validator("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p", "repeat_penalty",
                     "typical_p")
    @classmethod
    def _check_finite(cls, v, info):
        return _finite(v, info.field_name)

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_Common):
    prompt: Prompt
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("prompt must not be an empty list")
            if isinstance(v[0], list) and any(not p for p in v):
                raise ValueError("a token-id prompt must not be empty")
        return v

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [p]
        return list(p)


class ChatCompletionRequest(_Common):
    messages: Annotated[list[dict[str, Any]], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


Role = Literal["system", "developer", "user", "assistant", "tool"]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = None
    user: str | None = None
    pooling: Literal["mean", "last"] | None = None  # levante's extra: how the last hidden state is pooled

    @field_validator("input")
    @classmethod
    def _check_input(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("input must not be an empty list")
            if len(v) > 2048:
                raise ValueError("at most 2048 inputs per request")
            if any(isinstance(x, str | list) and not x for x in v):
                raise ValueError("inputs must not be empty")
        elif not v:
            raise ValueError("input must not be empty")
        return v

    def items(self) -> list[str | list[int]]:
        v = self.input
        if isinstance(v, str) or (v and isinstance(v[0], int)):
            return [v]
        return list(v)
