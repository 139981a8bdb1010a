"""The OpenAI-compatible HTTP server: a FastAPI app over the continuous-batching `Engine`.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both streaming
as server-sent events when ``stream`` is true; structured output and tool calls; levante/server/completions.py),
``POST /v1/embeddings`` (embeddings.py), ``GET /health``, ``GET /metrics``.

Every request becomes one engine request per choice (``n`` choices per prompt, several prompts for
completions); the engine thread batches them with everything else in flight. A client that goes
away -- mid-stream or while waiting for a non-streaming answer -- cancels its engine requests at once.
Every failure is answered in the OpenAI error shape; validation problems are 400s; an internal error is a
500 with a generic message and an id, its traceback in the server log.

The handlers are module-level functions; what they share (the LLM, the engine, the limits) is the
`ServerState` at ``request.app.state.server``.
"""

from __future__ import annotations

import logging
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import Engine
from . import completions, embeddings
from .http import (
    CountingMiddleware,
    ServerState,
    authenticate,
    check_model,
    error_response,
    json_response,
    state_of,
)
from .protocol import APIError

log = logging.getLogger("levante.server")


# ---------------------------------------------------------------------------------------------- error handlers
async def on_api_error(request: Request, e: APIError) -> Response:
    return error_response(e)


async def on_validation_error(request: Request, e: RequestValidationError) -> Response:
    errs = e.errors()
    loc = ".".join(str(p) for p in (errs[0].get("loc", ()) if errs else ()) if p != "body") or None
    msg = errs[0].get("msg", "invalid request") if errs else "invalid request"
    return error_response(APIError(400, f"invalid request: {msg}", param=loc, code="invalid_value"))


async def on_http_error(request: Request, e: StarletteHTTPException) -> Response:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    return error_response(APIError(e.status_code, str(e.detail), code=code))


async def on_internal_error(request: Request, e: Exception) -> Response:
    rid = f"err-{uuid.uuid4().hex[:12]}"
    log.error("internal error %s on %s %s", rid, request.method, request.url.path, exc_info=e)
    return error_response(APIError(500, f"internal server error (id {rid}); the server log has the details",
                                   type="server_error", code="internal_error"))


# ---------------------------------------------------------------------------------------------- routes
async def health(request: Request) -> Response:
    eng = state_of(request).engine
    ok = eng is not None and eng._thread is not None and eng._thread.is_alive()
    body = {"status": "ok" if ok else "unavailable", "model": state_of(request).model_id,
            "active": eng.n_active if eng else 0, "waiting": len(eng.waiting) if eng else 0}
    return json_response(body, 200 if ok else 503)


async def metrics(request: Request) -> Response:
    st = state_of(request)
    eng = st.engine
    text = eng.metrics.prometheus() if eng is not None else ""
    text += "# TYPE levante_active_requests gauge\n"
    text += f"levante_active_requests {eng.n_active if eng else 0}\n"
    text += st.http_metrics.prometheus()
    return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def _model_card(st: ServerState) -> dict[str, Any]:
    return {"id": st.model_id, "object": "model", "created": st.created, "owned_by": "levante"}


async def list_models(request: Request) -> Response:
    st = state_of(request)
    authenticate(st, request)
    return json_response({"object": "list", "data": [_model_card(st)]})


async def get_model(name: str, request: Request) -> Response:
    st = state_of(request)
    authenticate(st, request)
    check_model(st, name)
    return json_response(_model_card(st))


# ---------------------------------------------------------------------------------------------- the app
@asynccontextmanager
async def lifespan(app: FastAPI):
    st: ServerState = app.state.server
    own = st.engine is None
    llm = st.llm
    if own:
        st.engine = Engine(llm.serving_model(), llm.tokenizer, n_ctx=llm.n_ctx, max_batch=st.max_batch,
                           prefill_chunk=llm.n_batch, kv_dtype=llm.kv_dtype, n_threads=llm.n_threads,
                           spec=llm.spec).start()
    # a parallel model that loses a rank: requests get 503 and the server stops (exit status 1, see `serve`)
    st.engine.on_dead.append(lambda err: _fatal(st, err))
    if hasattr(llm.model, "on_lost"):
        llm.model.on_lost.append(st.engine.fail_permanently)
    try:
        yield
    finally:
        if own:
            st.engine.shutdown()


def _fatal(st: ServerState, err: BaseException) -> None:
    log.error("levante serve: stopping: %s", err)
    st.fatal = err
    if st.on_fatal is not None:
        st.on_fatal()


def create_app(
    llm,
    engine=None,
    api_key: str | None = None,
    model_alias: str | None = None,
    max_batch: int = 8,
    max_tokens_cap: int = 4096,
    max_n: int = 8,
    max_body_bytes: int = 1_000_000,
    special_in_prompt: bool = True,
) -> FastAPI:
    """The FastAPI app serving `llm`. Without `engine` one is created (and stopped) by the app's lifespan.

    `special_in_prompt`: special-token strings in a raw completion prompt become control tokens (llama.cpp's
    behaviour); False encodes them as text. Chat messages are always text."""
    model_id = model_alias or llm.model_name
    aliases = {model_id, llm.model_name}
    path = getattr(getattr(llm, "loaded", None), "path", None)
    if path is not None:
        aliases |= {str(path), path.name}
    st = ServerState(llm, model_id, aliases, api_key, max_batch, max_tokens_cap, max_n, max_body_bytes,
                     special_in_prompt=special_in_prompt, engine=engine.start() if engine is not None else None)

    app = FastAPI(title="levante", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = st
    app.add_middleware(CountingMiddleware, metrics=st.http_metrics)
    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_internal_error)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/v1/models/{name:path}", get_model, methods=["GET"])
    app.add_api_route("/v1/completions", completions.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", completions.chat_completions, methods=["POST"])
    app.add_api_route("/v1/embeddings", embeddings.embeddings, methods=["POST"])
    return app
