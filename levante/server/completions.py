"""``POST /v1/completions`` and ``POST /v1/chat/completions``: validation, submission to the engine, and the
answer as one JSON body or as server-sent events."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ..api import chat_logprobs
from ..chat import ChatPlan, chat_plan
from ..errors import ContextLengthError, EngineError, LevanteError, OverloadedError, WorkerError
from ..generate import TokenEvent
from ..grammar import Grammar, GrammarError, grammar_of
from ..sampling import SamplingParams
from ..toolcalls import ChatOutput
from .http import ServerState, clean, dumps, json_response, request_body, state_of
from .protocol import APIError, ChatCompletionRequest, CompletionRequest

log = logging.getLogger("levante.server")

MAX_PROMPTS = 64
MAX_CHOICES = 128


class Choice:
    """One generated answer: its index in the response, its prompt and sampling, and its engine request."""

    __slots__ = ("index", "prompt_index", "ids", "params", "req")

    def __init__(self, index: int, prompt_index: int, ids: list[int], params: SamplingParams) -> None:
        self.index, self.prompt_index, self.ids, self.params = index, prompt_index, ids, params
        self.req = None


def fold_seed(seed: int | None, i: int) -> int | None:
    return None if seed is None else (seed + i) % 2**63


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


# ---------------------------------------------------------------------------------------------- validation
def sampling_params(st: ServerState, body, seed: int | None) -> SamplingParams:
    bias = body.logit_bias
    if bias:
        bad = [k for k in bias if not 0 <= k < st.vocab]
        if bad:
            raise APIError(400, f"logit_bias token id {bad[0]} is out of range 0..{st.vocab - 1}",
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


def n_choices(st: ServerState, body) -> int:
    n = 1 if body.n is None else body.n
    if n < 1:
        raise APIError(400, f"n must be >= 1, got {n}", param="n", code="invalid_value")
    if n > st.max_n:
        raise APIError(400, f"n must be <= {st.max_n}, got {n}", param="n", code="invalid_value")
    return n


def max_tokens(st: ServerState, value: int | None, default: int | None, prompt_len: int, param: str) -> int:
    if value is not None:
        if value < 1:
            raise APIError(400, f"{param} must be >= 1, got {value}", param=param, code="invalid_value")
        if value > st.max_tokens_cap:
            raise APIError(400, f"{param} must be <= {st.max_tokens_cap}, got {value}", param=param,
                           code="invalid_value")
        return value
    if default is not None:
        return min(default, st.max_tokens_cap)
    return max(1, min(st.max_tokens_cap, st.llm.n_ctx - prompt_len))


def check_context(st: ServerState, ids: list[int], param: str) -> None:
    n_ctx = st.llm.n_ctx
    if not ids:
        raise APIError(400, "the prompt is empty", param=param, code="invalid_value")
    if len(ids) >= n_ctx:
        raise APIError(
            400,
            f"This model's maximum context length is {n_ctx} tokens. However, your prompt has {len(ids)} "
            f"tokens, which leaves no room for the completion. Please reduce the length of the prompt.",
            param=param, code="context_length_exceeded",
        )
    bad = next((t for t in ids if not 0 <= t < st.vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is out of range 0..{st.vocab - 1}", param=param, code="invalid_value")


# ---------------------------------------------------------------------------------------------- engine plumbing
async def grammar(st: ServerState, body) -> Grammar | None:
    """The request's structured-output grammar (response_format or GBNF `grammar`), compiled (cached) off the
    event loop; APIError 400 naming the problem when it cannot be."""
    try:
        g = grammar_of(grammar=body.grammar, response_format=body.response_format)
        if g is not None:
            await asyncio.get_running_loop().run_in_executor(None, st.llm.grammar_compiler().compile, g)
        return g
    except GrammarError as e:
        param = "grammar" if body.grammar is not None else "response_format"
        raise APIError(400, str(e), param=param, code="invalid_value") from None


def submit(st: ServerState, choices: list[Choice], limits: list[int], stops: list[str], logprobs: int | None,
           fresh_text: bool, tag: str, g: Grammar | None = None) -> None:
    eng = st.engine
    if eng is None:
        raise APIError(503, "the engine is not running", type="server_error", code="unavailable")
    loop = asyncio.get_running_loop()
    try:
        for c, mt in zip(choices, limits):
            constraint = st.llm.grammar_compiler().constraint(g) if g is not None else None
            c.req = eng.submit(c.ids, mt, c.params, stop=stops, logprobs=logprobs, fresh_text=fresh_text,
                               loop=loop, tag=f"{tag}/{c.index}", constraint=constraint)
    except OverloadedError as e:
        cancel(choices)
        raise APIError(503, str(e), type="server_error", code="overloaded") from None
    except WorkerError as e:
        cancel(choices)
        raise APIError(503, str(e), type="server_error", code="unavailable") from None
    except (ContextLengthError, ValueError) as e:
        cancel(choices)
        code = "context_length_exceeded" if isinstance(e, ContextLengthError) else "invalid_value"
        raise APIError(400, str(e), code=code) from None


def cancel(choices: list[Choice]) -> None:
    for c in choices:
        if c.req is not None:
            c.req.cancel()


def engine_error(e: BaseException, tag: str) -> APIError:
    """The client's view of a failed generation: the engine's generic message (its id), never the exception's;
    a lost parallel rank is 503 with its own message."""
    if isinstance(e, WorkerError):
        return APIError(503, str(e), type="server_error", code="unavailable")
    if not isinstance(e, EngineError):
        log.error("generation %s failed", tag, exc_info=e)
        e = EngineError(f"internal error while generating ({tag}); the server log has the details")
    return APIError(500, str(e), type="server_error", code="engine_error")


async def collect(request: Request, choices: list[Choice], tag: str) -> list[list[TokenEvent]] | None:
    """All events of every choice; None (and the choices cancelled) if the client disconnects meanwhile."""

    async def one(c: Choice) -> list[TokenEvent]:
        return [ev async for ev in c.req.events()]

    task = asyncio.ensure_future(asyncio.gather(*(one(c) for c in choices)))
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.1)
            if done:
                try:
                    return task.result()
                except (LevanteError, RuntimeError) as e:
                    raise engine_error(e, tag) from None
            if await request.is_disconnected():
                return None
    finally:
        if not task.done():
            task.cancel()
        cancel(choices)


async def merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, TokenEvent]]:
    """Events of all choices as they come."""
    if len(choices) == 1:
        c = choices[0]
        async for ev in c.req.events():
            yield c, ev
        return
    q: asyncio.Queue = asyncio.Queue()

    async def pump(c: Choice) -> None:
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


def sse(chunks: AsyncIterator[dict[str, Any]], choices: list[Choice], tag: str) -> StreamingResponse:
    """Server-sent events of `chunks`, then ``[DONE]``; a failure mid-stream is sent as an error event."""

    async def body():
        try:
            try:
                async for chunk in chunks:
                    yield b"data: " + dumps(chunk) + b"\n\n"
            except (APIError, LevanteError, RuntimeError) as e:
                err = e if isinstance(e, APIError) else engine_error(e, tag)
                yield b"data: " + dumps(err.body()) + b"\n\n"
            yield b"data: [DONE]\n\n"
        finally:
            cancel(choices)

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def counted(evs: list[TokenEvent]) -> list[TokenEvent]:
    return [e for e in evs if not e.stop_token]


def lp_dict(st: ServerState, evs: list[TokenEvent], offset: int) -> dict[str, Any]:
    return clean(st.llm._lp_dict(evs, offset))


# ---------------------------------------------------------------------------------------------- routes
async def completions(request: Request) -> Response:
    st = state_of(request)
    body = await request_body(request, CompletionRequest)
    n = n_choices(st, body)
    prompts = body.prompts()
    if len(prompts) > MAX_PROMPTS:
        raise APIError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt", code="invalid_value")
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(400, f"prompts x n must be <= {MAX_CHOICES}", param="n", code="invalid_value")
    if body.best_of is not None and body.best_of != n:
        raise APIError(400, "best_of is not supported (it must equal n)", param="best_of", code="invalid_value")
    ids_list, texts = [], []
    for p in prompts:
        try:
            ids = st.llm.tokenize(p, special=st.special_in_prompt) if isinstance(p, str) else list(p)
        except (ValueError, TypeError) as e:
            raise APIError(400, f"cannot tokenize the prompt: {e}", param="prompt", code="invalid_value") from None
        check_context(st, ids, "prompt")
        ids_list.append(ids)
        texts.append(p if isinstance(p, str) else None)
    choices = []
    for pi, ids in enumerate(ids_list):
        for j in range(n):
            choices.append(Choice(len(choices), pi, ids, sampling_params(st, body, fold_seed(body.seed, j))))
    limits = [max_tokens(st, body.max_tokens, 16, len(c.ids), "max_tokens") for c in choices]
    echo = bool(body.echo)
    if echo:
        texts = [t if t is not None else st.llm.detokenize(ids) for t, ids in zip(texts, ids_list)]
    g = await grammar(st, body)
    rid = f"cmpl-{uuid.uuid4().hex}"
    submit(st, choices, limits, body.stops(), body.logprobs, fresh_text=False, tag=rid, g=g)
    meta = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": st.model_id,
            "system_fingerprint": st.fingerprint}
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
            async for c, ev in merged(choices):
                n_out += not ev.stop_token
                if not ev.text and ev.finish_reason is None:
                    continue
                lp = lp_dict(st, [ev], 0) if body.logprobs is not None and ev.text else None
                yield {**meta, "choices": [{"text": ev.text, "index": c.index, "logprobs": lp,
                                            "finish_reason": ev.finish_reason}], **extra}
            if include_usage:
                yield {**meta, "choices": [], "usage": usage(n_prompt, n_out)}

        return sse(chunks(), choices, rid)

    results = await collect(request, choices, rid)
    if results is None:
        return Response(status_code=499)
    out, n_out = [], 0
    for c, evs in zip(choices, results):
        kept = counted(evs)
        n_out += len(kept)
        prefix = texts[c.prompt_index] if echo else ""
        out.append({"text": prefix + "".join(e.text for e in evs), "index": c.index,
                    "logprobs": lp_dict(st, kept, len(prefix)) if body.logprobs is not None else None,
                    "finish_reason": evs[-1].finish_reason if evs else "length"})
    return json_response({**meta, "choices": out, "usage": usage(n_prompt, n_out)})


async def chat_plan_of(st: ServerState, body) -> ChatPlan:
    """The request's prompt, grammar and tool-call parser; APIError 400 naming the problem."""
    messages = [({**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m)
                for m in body.messages]
    try:
        plan = chat_plan(st.llm.tokenizer, messages, body.tools, body.tool_choice, body.parallel_tool_calls,
                         body.grammar, body.response_format)
        if plan.grammar is not None:
            await asyncio.get_running_loop().run_in_executor(None, st.llm.grammar_compiler().compile, plan.grammar)
        return plan
    except GrammarError as e:
        param = "tools" if body.tools and body.tool_choice != "none" and "tool" in str(e) else (
            "grammar" if body.grammar is not None else "response_format")
        raise APIError(400, str(e), param=param, code="invalid_value") from None
    except (ValueError, TypeError, LevanteError) as e:
        msg = str(e)
        param = "tool_choice" if "tool_choice" in msg else "tools" if msg.startswith("tools") else "messages"
        raise APIError(400, f"invalid {param}: {msg}", param=param, code="invalid_value") from None


async def chat_completions(request: Request) -> Response:
    st = state_of(request)
    body = await request_body(request, ChatCompletionRequest)
    n = n_choices(st, body)
    plan = await chat_plan_of(st, body)
    ids = plan.ids
    check_context(st, ids, "messages")
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    mt = max_tokens(st, limit, None, len(ids), param)
    choices = [Choice(j, 0, ids, sampling_params(st, body, fold_seed(body.seed, j))) for j in range(n)]
    n_lp = (body.top_logprobs or 0) if body.logprobs else None
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    submit(st, choices, [mt] * n, body.stops(), n_lp, fresh_text=True, tag=rid, g=plan.grammar)
    meta = {"id": rid, "created": int(time.time()), "model": st.model_id, "system_fingerprint": st.fingerprint}
    outputs = [ChatOutput(plan.parser()) for _ in choices]

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def chunks():
            base = {**meta, "object": "chat.completion.chunk"}
            extra = {"usage": None} if include_usage else {}

            def chunk(c: Choice, delta: dict, finish: str | None = None, lp: Any = None) -> dict:
                return {**base, "choices": [{"index": c.index, "delta": delta, "logprobs": lp,
                                             "finish_reason": finish}], **extra}

            for c in choices:
                yield chunk(c, {"role": "assistant", "content": ""})
            n_out = 0
            async for c, ev in merged(choices):
                n_out += not ev.stop_token
                out = outputs[c.index]
                for delta in out.push(ev):
                    lp = (chat_logprobs(lp_dict(st, [ev], 0))
                          if n_lp is not None and "content" in delta else None)
                    yield chunk(c, delta, lp=lp)
                if ev.finish_reason:
                    for delta in out.finish():
                        yield chunk(c, delta)
                    yield chunk(c, {}, out.finish_reason(ev.finish_reason))
            if include_usage:
                yield {**base, "choices": [], "usage": usage(len(ids), n_out)}

        return sse(chunks(), choices, rid)

    results = await collect(request, choices, rid)
    if results is None:
        return Response(status_code=499)
    res, n_out = [], 0
    for c, evs in zip(choices, results):
        kept = counted(evs)
        n_out += len(kept)
        out = outputs[c.index]
        for ev in evs:
            out.push(ev)
        out.finish()
        lp = chat_logprobs(lp_dict(st, kept, 0)) if n_lp is not None else None
        res.append({"index": c.index, "message": out.message(), "logprobs": lp,
                    "finish_reason": out.finish_reason(evs[-1].finish_reason if evs else "length")})
    return json_response({**meta, "object": "chat.completion", "choices": res, "usage": usage(len(ids), n_out)})
