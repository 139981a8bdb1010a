"""The OpenAI-compatible HTTP server: a FastAPI app over the continuous-batching `Engine`.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both streaming
as server-sent events when ``stream`` is true), ``GET /health``, ``GET /metrics``.

Every request becomes one engine request per choice (``n`` choices per prompt, several prompts for
completions); the engine thread batches them with everything else in flight. A client that goes
away -- mid-stream or while waiting for a non-streaming answer -- cancels its engine requests at once.
Every failure is answered in the OpenAI error shape; validation problems are 400s.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..api import _chat_logprobs
from ..errors import ContextLengthError, LevanteError, OverloadedError
from ..generate import TokenEvent
from ..sampling import SamplingParams
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_body, validation_error

log = logging.getLogger("levante.server")

MAX_PROMPTS = 64
MAX_CHOICES = 128
_ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


# ---------------------------------------------------------------------------------------------- helpers
def _clean(obj: Any) -> Any:
    """Replace non-finite floats (not representable in JSON) by large finite ones."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return 0.0 if math.isnan(obj) else math.copysign(1e30, obj)
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    return obj


def dumps(obj: Any) -> bytes:
    """Strict JSON (no NaN/Infinity), UTF-8; escapes whatever UTF-8 cannot hold (lone surrogates)."""
    try:
        s = json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError:
        s = json.dumps(_clean(obj), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(json.loads(s), ensure_ascii=True, separators=(",", ":")).encode("ascii")


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)


def error_response(e: APIError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return json_response(e.body(), e.status, headers)


class HTTPMetrics:
    """Per-route request counters (route label limited to known routes) and in-flight gauge."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str, int]] = Counter()
        self.in_flight = 0
        self._lock = threading.Lock()

    def observe(self, method: str, path: str, status: int) -> None:
        path = path if path in _ROUTES else "other"
        with self._lock:
            self.counts[(method if method in ("GET", "POST") else "other", path, status)] += 1

    def prometheus(self) -> str:
        lines = ["# TYPE levante_http_requests_total counter"]
        with self._lock:
            items = sorted(self.counts.items())
        for (m, p, s), n in items:
            lines.append(f'levante_http_requests_total{{method="{m}",path="{p}",status="{s}"}} {n}')
        lines += ["# TYPE levante_http_requests_in_flight gauge", f"levante_http_requests_in_flight {self.in_flight}"]
        return "\n".join(lines) + "\n"


class _CountingMiddleware:
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


def _fold_seed(seed: int | None, i: int) -> int | None:
    return None if seed is None else (seed + i) % 2**63


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---------------------------------------------------------------------------------------------- app
class _Choice:
    __slots__ = ("index", "prompt_index", "ids", "params", "req")

    def __init__(self, index: int, prompt_index: int, ids: list[int], params: SamplingParams) -> None:
        self.index, self.prompt_index, self.ids, self.params = index, prompt_index, ids, params
        self.req = None


def create_app(
    llm,
    engine=None,
    api_key: str | None = None,
    model_alias: str | None = None,
    max_batch: int = 8,
    max_tokens_cap: int = 4096,
    max_n: int = 8,
    max_body_bytes: int = 1_000_000,
) -> FastAPI:
    """The FastAPI app serving `llm`. Without `engine` one is created (and stopped) by the app's lifespan."""
    model_id = model_alias or llm.model_name
    aliases = {model_id, llm.model_name}
    path = getattr(getattr(llm, "loaded", None), "path", None)
    if path is not None:
        aliases |= {str(path), path.name}
    created = int(time.time())
    http_metrics = HTTPMetrics()
    vocab = llm.model.cfg.vocab_size
    fingerprint = "levante"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own = app.state.engine is None
        if own:
            from ..engine import Engine

            app.state.engine = Engine(llm.model, llm.tokenizer, n_ctx=llm.n_ctx, max_batch=max_batch,
                                      prefill_chunk=llm.n_batch).start()
        try:
            yield
        finally:
            if own:
                app.state.engine.shutdown()

    app = FastAPI(title="levante", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine.start() if engine is not None else None
    app.state.http_metrics = http_metrics
    app.add_middleware(_CountingMiddleware, metrics=http_metrics)

    # ------------------------------------------------------------------ error handlers
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError):
        errs = e.errors()
        loc = ".".join(str(p) for p in (errs[0].get("loc", ()) if errs else ()) if p != "body") or None
        msg = errs[0].get("msg", "invalid request") if errs else "invalid request"
        return error_response(APIError(400, f"invalid request: {msg}", param=loc, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return error_response(APIError(e.status_code, str(e.detail), code=code))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal server error: {type(e).__name__}", type="server_error",
                                       code="internal_error"))

    # ------------------------------------------------------------------ request plumbing
    def _auth(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())
        if not ok:
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           type="invalid_request_error", code="invalid_api_key")

    async def _read_json(request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > max_body_bytes
            except ValueError:
                raise APIError(400, "invalid Content-Length header", code="invalid_request") from None
            if too_big:
                raise APIError(413, f"request body is larger than the limit of {max_body_bytes} bytes",
                               code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise APIError(413, f"request body is larger than the limit of {max_body_bytes} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        return parse_body(b"".join(chunks))

    def _check_model(name: str | None) -> None:
        if name is not None and name not in aliases:
            raise APIError(404, f"the model '{name[:200]}' does not exist; this server serves '{model_id}'",
                           param="model", code="model_not_found")

    async def _request_body(request: Request, model_cls):
        """Authenticate, read and validate a POST body as `model_cls`, and check its model name."""
        _auth(request)
        raw = await _read_json(request)
        try:
            body = model_cls.model_validate(raw)
        except ValidationError as e:
            raise validation_error(e) from None
        _check_model(body.model)
        return body

    def _params(body, seed: int | None) -> SamplingParams:
        bias = body.logit_bias
        if bias:
            bad = [k for k in bias if not 0 <= k < vocab]
            if bad:
                raise APIError(400, f"logit_bias token id {bad[0]} is out of range 0..{vocab - 1}",
                               param="logit_bias", code="invalid_value")
        top_k = body.top_k if body.top_k is not None else 0
        try:
            return SamplingParams(
                temperature=1.0 if body.temperature is None else body.temperature,
                top_k=top_k, top_p=1.0 if body.top_p is None else body.top_p,
                min_p=0.0 if body.min_p is None else body.min_p,
                typical_p=1.0 if body.typical_p is None else body.typical_p,
                repeat_penalty=1.0 if body.repeat_penalty is None else body.repeat_penalty,
                frequency_penalty=body.frequency_penalty or 0.0, presence_penalty=body.presence_penalty or 0.0,
                logit_bias=dict(bias) if bias else None, seed=seed,
            )
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_value") from None

    def _n(body) -> int:
        n = 1 if body.n is None else body.n
        if n < 1:
            raise APIError(400, f"n must be >= 1, got {n}", param="n", code="invalid_value")
        if n > max_n:
            raise APIError(400, f"n must be <= {max_n}, got {n}", param="n", code="invalid_value")
        return n

    def _max_tokens(value: int | None, default: int | None, prompt_len: int, param: str) -> int:
        if value is not None:
            if value < 1:
                raise APIError(400, f"{param} must be >= 1, got {value}", param=param, code="invalid_value")
            if value > max_tokens_cap:
                raise APIError(400, f"{param} must be <= {max_tokens_cap}, got {value}", param=param,
                               code="invalid_value")
            return value
        if default is not None:
            return min(default, max_tokens_cap)
        return max(1, min(max_tokens_cap, llm.n_ctx - prompt_len))

    def _check_context(ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, "the prompt is empty", param=param, code="invalid_value")
        if len(ids) >= llm.n_ctx:
            raise APIError(
                400,
                f"This model's maximum context length is {llm.n_ctx} tokens. However, your prompt has {len(ids)} "
                f"tokens, which leaves no room for the completion. Please reduce the length of the prompt.",
                param=param, code="context_length_exceeded",
            )
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is out of range 0..{vocab - 1}", param=param, code="invalid_value")

    def _submit(choices: list[_Choice], max_tokens: list[int], stops: list[str], logprobs: int | None,
                fresh_text: bool) -> None:
        eng = app.state.engine
        if eng is None:
            raise APIError(503, "the engine is not running", type="server_error", code="unavailable")
        loop = asyncio.get_running_loop()
        try:
            for c, mt in zip(choices, max_tokens):
                c.req = eng.submit(c.ids, mt, c.params, stop=stops, logprobs=logprobs, fresh_text=fresh_text,
                                   loop=loop)
        except OverloadedError as e:
            _cancel(choices)
            raise APIError(503, str(e), type="server_error", code="overloaded") from None
        except (ContextLengthError, ValueError) as e:
            _cancel(choices)
            code = "context_length_exceeded" if isinstance(e, ContextLengthError) else "invalid_value"
            raise APIError(400, str(e), code=code) from None

    def _cancel(choices: list[_Choice]) -> None:
        for c in choices:
            if c.req is not None:
                c.req.cancel()

    def _counted(evs: list[TokenEvent]) -> list[TokenEvent]:
        return [e for e in evs if not e.stop_token]

    async def _collect(request: Request, choices: list[_Choice]) -> list[list[TokenEvent]] | None:
        """All events of every choice; None (and the choices cancelled) if the client disconnects meanwhile.

        An engine error becomes the OpenAI-shaped HTTP error (`_engine_error`).
        """

        async def one(c: _Choice) -> list[TokenEvent]:
            return [ev async for ev in c.req.events()]

        task = asyncio.ensure_future(asyncio.gather(*(one(c) for c in choices)))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.1)
                if done:
                    try:
                        return task.result()
                    except (LevanteError, RuntimeError) as e:
                        raise _engine_error(e) from None
                if await request.is_disconnected():
                    return None
        finally:
            if not task.done():
                task.cancel()
            _cancel(choices)

    async def _merged(choices: list[_Choice]) -> AsyncIterator[tuple[_Choice, TokenEvent]]:
        """Events of all choices as they come."""
        if len(choices) == 1:
            c = choices[0]
            async for ev in c.req.events():
                yield c, ev
            return
        q: asyncio.Queue = asyncio.Queue()

        async def pump(c: _Choice) -> None:
            try:
                async for ev in c.req.events():
                    q.put_nowait((c, ev))
            except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
                q.put_nowait((c, e))
                return
            q.put_nowait((c, None))

        tasks = [asyncio.ensure_future(pump(c)) for c in choices]
        try:
            left = len(choices)
            while left:
                c, item = await q.get()
                if item is None:
                    left -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield c, item
        finally:
            for t in tasks:
                t.cancel()

    def _engine_error(e: BaseException) -> APIError:
        return APIError(500, f"generation failed: {e}", type="server_error", code="engine_error")

    def _sse(chunks: AsyncIterator[dict[str, Any]], choices: list[_Choice]) -> StreamingResponse:
        async def body():
            try:
                try:
                    async for chunk in chunks:
                        yield b"data: " + dumps(chunk) + b"\n\n"
                except (APIError, LevanteError, RuntimeError) as e:
                    err = e if isinstance(e, APIError) else _engine_error(e)
                    yield b"data: " + dumps(err.body()) + b"\n\n"
                yield b"data: [DONE]\n\n"
            finally:
                _cancel(choices)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _lp_dict(evs: list[TokenEvent], offset: int) -> dict[str, Any]:
        return _clean(llm._lp_dict(evs, offset))

    # ------------------------------------------------------------------ routes
    @app.get("/health")
    async def health():
        eng = app.state.engine
        ok = eng is not None and eng._thread is not None and eng._thread.is_alive()
        body = {"status": "ok" if ok else "unavailable", "model": model_id,
                "active": eng.n_active if eng else 0, "waiting": len(eng.waiting) if eng else 0}
        return json_response(body, 200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        eng = app.state.engine
        text = (eng.metrics.prometheus() if eng is not None else "")
        text += "# TYPE levante_active_requests gauge\n"
        text += f"levante_active_requests {eng.n_active if eng else 0}\n"
        text += http_metrics.prometheus()
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: Request):
        _auth(request)
        return json_response({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": "levante"}]})

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str, request: Request):
        _auth(request)
        _check_model(name)
        return json_response({"id": model_id, "object": "model", "created": created, "owned_by": "levante"})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _request_body(request, CompletionRequest)
        n = _n(body)
        prompts = body.prompts()
        if len(prompts) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt", code="invalid_value")
        if len(prompts) * n > MAX_CHOICES:
            raise APIError(400, f"prompts x n must be <= {MAX_CHOICES}", param="n", code="invalid_value")
        if body.best_of is not None and body.best_of != n:
            raise APIError(400, "best_of is not supported (it must equal n)", param="best_of",
                           code="invalid_value")
        ids_list, texts = [], []
        for p in prompts:
            try:
                ids = llm.tokenize(p, special=True) if isinstance(p, str) else list(p)
            except (ValueError, TypeError) as e:
                raise APIError(400, f"cannot tokenize the prompt: {e}", param="prompt", code="invalid_value") from None
            _check_context(ids, "prompt")
            ids_list.append(ids)
            texts.append(p if isinstance(p, str) else None)
        choices = []
        for pi, ids in enumerate(ids_list):
            for j in range(n):
                i = len(choices)
                choices.append(_Choice(i, pi, ids, _params(body, _fold_seed(body.seed, j))))
        mts = [_max_tokens(body.max_tokens, 16, len(c.ids), "max_tokens") for c in choices]
        echo = bool(body.echo)
        if echo:
            texts = [t if t is not None else llm.detokenize(ids) for t, ids in zip(texts, ids_list)]
        _submit(choices, mts, body.stops(), body.logprobs, fresh_text=False)
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_id, "system_fingerprint": fingerprint}
        n_prompt = sum(len(i) for i in ids_list)

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def chunks():
                extra = {"usage": None} if include_usage else {}
                if echo:
                    for c in choices:
                        yield {**meta, "choices": [{"text": texts[c.prompt_index], "index": c.index,
                                                    "logprobs": None, "finish_reason": None}], **extra}
                n_out = 0
                async for c, ev in _merged(choices):
                    n_out += not ev.stop_token
                    if not ev.text and ev.finish_reason is None:
                        continue
                    lp = _lp_dict([ev], 0) if body.logprobs is not None and ev.text else None
                    yield {**meta, "choices": [{"text": ev.text, "index": c.index, "logprobs": lp,
                                                "finish_reason": ev.finish_reason}], **extra}
                if include_usage:
                    yield {**meta, "choices": [], "usage": _usage(n_prompt, n_out)}

            return _sse(chunks(), choices)

        results = await _collect(request, choices)
        if results is None:
            return Response(status_code=499)
        out, n_out = [], 0
        for c, evs in zip(choices, results):
            counted = _counted(evs)
            n_out += len(counted)
            prefix = texts[c.prompt_index] if echo else ""
            out.append({"text": prefix + "".join(e.text for e in evs), "index": c.index,
                        "logprobs": _lp_dict(counted, len(prefix)) if body.logprobs is not None else None,
                        "finish_reason": evs[-1].finish_reason if evs else "length"})
        return json_response({**meta, "choices": out, "usage": _usage(n_prompt, n_out)})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _request_body(request, ChatCompletionRequest)
        n = _n(body)
        messages = [({**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m)
                    for m in body.messages]
        try:
            ids = llm.chat_prompt(messages)
        except (ValueError, TypeError, LevanteError) as e:
            raise APIError(400, f"invalid messages: {e}", param="messages", code="invalid_value") from None
        _check_context(ids, "messages")
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        mt = _max_tokens(limit, None, len(ids), param)
        choices = [_Choice(j, 0, ids, _params(body, _fold_seed(body.seed, j))) for j in range(n)]
        n_lp = (body.top_logprobs or 0) if body.logprobs else None
        _submit(choices, [mt] * n, body.stops(), n_lp, fresh_text=True)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id,
                "system_fingerprint": fingerprint}

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            async def chunks():
                base = {**meta, "object": "chat.completion.chunk"}
                extra = {"usage": None} if include_usage else {}
                for c in choices:
                    yield {**base, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}], **extra}
                n_out = 0
                async for c, ev in _merged(choices):
                    n_out += not ev.stop_token
                    if ev.text:
                        lp = _chat_logprobs(_lp_dict([ev], 0)) if n_lp is not None else None
                        yield {**base, "choices": [{"index": c.index, "delta": {"content": ev.text},
                                                    "logprobs": lp, "finish_reason": None}], **extra}
                    if ev.finish_reason:
                        yield {**base, "choices": [{"index": c.index, "delta": {}, "logprobs": None,
                                                    "finish_reason": ev.finish_reason}], **extra}
                if include_usage:
                    yield {**base, "choices": [], "usage": _usage(len(ids), n_out)}

            return _sse(chunks(), choices)

        results = await _collect(request, choices)
        if results is None:
            return Response(status_code=499)
        out, n_out = [], 0
        for c, evs in zip(choices, results):
            counted = _counted(evs)
            n_out += len(counted)
            lp = _chat_logprobs(_lp_dict(counted, 0)) if n_lp is not None else None
            out.append({"index": c.index, "message": {"role": "assistant", "content": "".join(e.text for e in evs)},
                        "logprobs": lp, "finish_reason": evs[-1].finish_reason if evs else "length"})
        return json_response({**meta, "object": "chat.completion", "choices": out,
                              "usage": _usage(len(ids), n_out)})

    return app
