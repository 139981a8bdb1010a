"""What the server's handlers share: strict JSON responses, the HTTP metrics, the `ServerState` (the LLM, its
engine, the limits; at ``request.app.state.server``), authentication and body parsing."""

from __future__ import annotations

import hmac
import json
import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import ValidationError

from .protocol import APIError, parse_body, validation_error

log = logging.getLogger("levante.server")

ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/embeddings", "/health", "/metrics")


# ---------------------------------------------------------------------------------------------- JSON
def clean(obj: Any) -> Any:
    """Replace non-finite floats (not representable in JSON) by large finite ones."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return 0.0 if math.isnan(obj) else math.copysign(1e30, obj)
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    return obj


def dumps(obj: Any) -> bytes:
    """Strict JSON (no NaN/Infinity), UTF-8; escapes whatever UTF-8 cannot hold (lone surrogates)."""
    try:
        s = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:
        s = json.dumps(clean(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(json.loads(s), ensure_ascii=True, separators=(",", ":")).encode("ascii")


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)


def error_response(e: APIError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return json_response(e.body(), e.status, headers)


# ---------------------------------------------------------------------------------------------- metrics
class HTTPMetrics:
    """Per-route request counters (route label limited to known routes) and in-flight gauge."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str, int]] = Counter()
        self.in_flight = 0
        self._lock = threading.Lock()

    def observe(self, method: str, path: str, status: int) -> None:
        path = path if path in ROUTES else "other"
        with self._lock:
            self.counts[(method if method in ("GET", "POST") else "other", path, status)] += 1

    def prometheus(self) -> str:
        lines = ["# TYPE levante_http_requests_total counter"]
        with self._lock:
            items = sorted(self.counts.items())
            in_flight = self.in_flight
        for (m, p, s), n in items:
            lines.append(f'levante_http_requests_total{{method="{m}",path="{p}",status="{s}"}} {n}')
        lines += ["# TYPE levante_http_requests_in_flight gauge", f"levante_http_requests_in_flight {in_flight}"]
        return "\n".join(lines) + "\n"


class CountingMiddleware:
    """Pure ASGI middleware (keeps streaming and disconnect detection intact) counting responses."""

    def __init__(self, app, metrics: HTTPMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight -= 1
            self.metrics.observe(scope.get("method", ""), scope.get("path", ""), status[0])


# ---------------------------------------------------------------------------------------------- state
@dataclass
class ServerState:
    """What the handlers share: the model, its engine (started by the app's lifespan) and the limits."""

    llm: Any
    model_id: str
    aliases: set[str]
    api_key: str | None = None
    max_batch: int = 8
    max_tokens_cap: int = 4096
    max_n: int = 8
    max_body_bytes: int = 1_000_000
    special_in_prompt: bool = True  # raw completion prompts: special-token strings become control tokens
    engine: Any = None
    created: int = field(default_factory=lambda: int(time.time()))
    http_metrics: HTTPMetrics = field(default_factory=HTTPMetrics)
    fingerprint: str = "levante"
    fatal: BaseException | None = None  # the model is gone: the server stops and exits non-zero
    on_fatal: Any = None  # set by `serve`: asks the HTTP server to stop

    @property
    def vocab(self) -> int:
        return self.llm.model.cfg.vocab_size


def state_of(request: Request) -> ServerState:
    return request.app.state.server


# ---------------------------------------------------------------------------------------------- plumbing
def authenticate(st: ServerState, request: Request) -> None:
    if st.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), st.api_key.encode())
    if not ok:
        raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                       type="invalid_request_error", code="invalid_api_key")


async def read_json(st: ServerState, request: Request) -> dict[str, Any]:
    """The body as a JSON object, at most `max_body_bytes` (APIError 400 / 413 otherwise)."""
    limit = st.max_body_bytes
    length = request.headers.get("content-length")
    if length is not None:
        try:
            too_big = int(length) > limit
        except ValueError:
            raise APIError(400, "invalid Content-Length header", code="invalid_request") from None
        if too_big:
            raise APIError(413, f"request body is larger than the limit of {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body is larger than the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return parse_body(b"".join(chunks))


def check_model(st: ServerState, name: str | None) -> None:
    if name is not None and name not in st.aliases:
        raise APIError(404, f"the model '{name[:200]}' does not exist; this server serves '{st.model_id}'",
                       param="model", code="model_not_found")


async def request_body(request: Request, model_cls):
    """Authenticate, read and validate a POST body as `model_cls`, and check its model name."""
    st = state_of(request)
    authenticate(st, request)
    raw = await read_json(st, request)
    try:
        body = model_cls.model_validate(raw)
    except ValidationError as e:
        raise validation_error(e) from None
    check_model(st, body.model)
    return body
