"""Continuous batching: one scheduler thread serves many concurrent requests.

Each running request owns one row ("slot") of a shared `KVCache`. Active rows are kept contiguous
(rows [0, n_active)), so every decode step is one model call over a slice of the cache, with rows
of different lengths advancing together. Between decode steps the scheduler drops finished or
cancelled requests (their row is swapped behind the active ones and kept) and admits waiting ones
(prefill in chunks: a new row alone, or, on a model that packs prompts of several lengths (the GPU decoder),
the new rows whose prompts fit the chunk together in one call).

Prefix cache: a finished request's row keeps its tokens. A new request whose prompt starts with
the same tokens (a shared system prompt, the earlier turns of a conversation) takes that row,
truncates it to the common prefix and computes only the rest.

Speculative decoding (`spec`, a `levante.speculative.SpecConfig`): while one request runs alone, each step
feeds its pending token and the proposals of its own `Speculator` and emits every accepted token (exact, as in
`speculative_stream`); with several running, rows decode one token per step as usual, and a draft model's cache
catches up when speculation resumes. `/metrics` counts proposed and accepted tokens.

Failures: an exception in a step is logged with its traceback (logger "levante.engine", with the request
ids) and fails only the requests it concerns where that can be known: a request's own prefill, its own
sampling, its own detokenization. A batched decode step that raises fails the requests in that batch. The
requests get an `EngineError` with a generic message and their id; the details stay in the log. A `WorkerError`
(a rank of a parallel model died: `fail_permanently`, or a step raising it) ends the engine: every request gets
that error, `submit` raises it, and the `on_dead` callbacks run (the server exits).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ContextLengthError, EngineError, OverloadedError, WorkerError
from .generate import TokenEvent, _prefill_positions, _Row, launch_then_read
from .grammar import mask_logits
from .sampling import SamplingParams, sample, token_logprobs
from .speculative import MAX_TOKENS, SpecConfig, Speculator, verify
from .transfer import host_tensor, to_device

log = logging.getLogger("levante.engine")
_DONE = object()


@dataclass
class Request:
    """A submitted generation; iterate it (sync or async) for `TokenEvent`s until finish_reason is set."""

    id: int
    prompt: list[int]
    max_tokens: int
    params: SamplingParams
    stop: list[str]
    stop_ids: set[int]
    logprobs: int | None
    fresh_text: bool
    tag: str = ""  # the caller's id for it (the server's response id), in logs and error messages
    constraint: Any = None  # levante.grammar.Constraint: structured output
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    error: BaseException | None = None
    _q: queue.Queue = field(default_factory=queue.Queue, repr=False)
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _loop: asyncio.AbstractEventLoop | None = None
    _aq: asyncio.Queue | None = None

    @property
    def name(self) -> str:
        return self.tag or f"request {self.id}"

    def cancel(self) -> None:
        """Stop generating (e.g. the client went away); the slot is freed at the next step."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _put(self, item) -> None:
        deliver([(self, item)])

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            item = self._q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def events(self) -> AsyncIterator[TokenEvent]:
        assert self._aq is not None, "submit(..., loop=...) to iterate asynchronously"
        while True:
            item = await self._aq.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def deliver(items: list[tuple[Request, Any]]) -> None:
    """Hand each request its items, in order: a thread's through its queue; a coroutine's through its event loop,
    with one wake-up per loop for all of them. `call_soon_threadsafe` writes to the loop's self-pipe; once per
    streamed token it was ~18 us of the engine thread's time per token (a server's step of 32 rows: ~0.6 ms)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Request, Any]]] = {}
    for req, item in items:
        if req._aq is not None and req._loop is not None:
            by_loop.setdefault(req._loop, []).append((req, item))
        else:
            req._q.put(item)
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # event loop closed: nobody is listening any more
            for req, _ in batch:
                req._cancel.set()


def _put_all(batch: list[tuple[Request, Any]]) -> None:  # on the event loop
    for req, item in batch:
        req._aq.put_nowait(item)


@dataclass
class _Slot:
    tokens: list[int] = field(default_factory=list)  # tokens whose k/v the row holds
    req: Request | None = None
    row: _Row | None = None
    pending: int | None = None  # sampled token not yet fed to the model
    spec: Speculator | None = None  # the request's proposer and adaptive K (speculative engines)


class Metrics:
    """Counters for /metrics (Prometheus text format). Written by the scheduler thread and the submitting
    threads, read by the server's: every update and the export hold `lock`, so a scrape sees one state."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.prompt_tokens = 0
        self.cached_prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft_sum = 0.0
        self.ttft_count = 0
        self.ttft_buckets = {b: 0 for b in (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, float("inf"))}
        self.decode_tokens_window: deque[tuple[float, int]] = deque(maxlen=256)
        self.queue_depth = 0
        self.batch_size = 0
        self.failed_requests = 0
        self.spec_proposed = 0
        self.spec_accepted = 0
        self.spec_verifications = 0

    def observe_ttft(self, seconds: float) -> None:  # with `lock` held
        self.ttft_sum += seconds
        self.ttft_count += 1
        for b in self.ttft_buckets:
            if seconds <= b:
                self.ttft_buckets[b] += 1

    def tokens_per_second(self) -> float:  # with `lock` held
        w = self.decode_tokens_window
        if len(w) < 2:
            return 0.0
        dt = w[-1][0] - w[0][0]
        return sum(n for _, n in list(w)[1:]) / dt if dt > 0 else 0.0

    def prometheus(self) -> str:
        with self.lock:
            return self._prometheus()

    def _prometheus(self) -> str:
        lines = [
            "# TYPE levante_requests_total counter", f"levante_requests_total {self.requests}",
            "# TYPE levante_prompt_tokens_total counter", f"levante_prompt_tokens_total {self.prompt_tokens}",
            "# TYPE levante_prompt_tokens_cached_total counter",
            f"levante_prompt_tokens_cached_total {self.cached_prompt_tokens}",
            "# TYPE levante_completion_tokens_total counter",
            f"levante_completion_tokens_total {self.completion_tokens}",
            "# TYPE levante_requests_failed_total counter", f"levante_requests_failed_total {self.failed_requests}",
            "# TYPE levante_spec_proposed_tokens_total counter",
            f"levante_spec_proposed_tokens_total {self.spec_proposed}",
            "# TYPE levante_spec_accepted_tokens_total counter",
            f"levante_spec_accepted_tokens_total {self.spec_accepted}",
            "# TYPE levante_spec_verifications_total counter",
            f"levante_spec_verifications_total {self.spec_verifications}",
            "# TYPE levante_queue_depth gauge", f"levante_queue_depth {self.queue_depth}",
            "# TYPE levante_batch_size gauge", f"levante_batch_size {self.batch_size}",
            "# TYPE levante_decode_tokens_per_second gauge",
            f"levante_decode_tokens_per_second {self.tokens_per_second():.3f}",
            "# TYPE levante_time_to_first_token_seconds histogram",
        ]
        for b, n in self.ttft_buckets.items():
            le = "+Inf" if b == float("inf") else f"{b}"
            lines.append(f'levante_time_to_first_token_seconds_bucket{{le="{le}"}} {n}')
        lines += [f"levante_time_to_first_token_seconds_sum {self.ttft_sum:.6f}",
                  f"levante_time_to_first_token_seconds_count {self.ttft_count}"]
        return "\n".join(lines) + "\n"


class Engine:
    """The scheduler. `submit` is thread-safe; a background thread runs the model."""

    def __init__(self, model, tokenizer, n_ctx: int, max_batch: int = 8, prefill_chunk: int = 512,
                 prefix_cache: bool = True, max_queue: int = 256, kv_dtype: torch.dtype | None = None,
                 n_threads: int | None = None, spec: SpecConfig | None = None) -> None:
        """`kv_dtype`: the KV cache's element type (default: the compute dtype); `n_threads`: torch threads for
        the scheduler thread's work (torch's pool is process-wide; default: leave it); `spec`: speculative
        decoding while one request runs."""
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.n_threads = n_threads
        self.max_queue = max_queue
        self.model, self.tokenizer = model, tokenizer
        self.n_ctx, self.max_batch, self.prefill_chunk = n_ctx, max_batch, prefill_chunk
        self.prefix_cache = prefix_cache
        self.spec, self.kv_dtype = spec, kv_dtype
        # slack: a rolling (sliding-window) cache must be able to take back rejected proposals
        self.cache = model.new_cache(max_batch, n_ctx, kv_dtype, slack=MAX_TOKENS + 1 if spec is not None else 0)
        if hasattr(model, "warm_up"):  # a GPU decoder: capture every batch bucket's step before serving
            model.warm_up(max_batch, self.cache.capacity, kv_dtype)
        self.slots = [_Slot() for _ in range(max_batch)]
        self.n_active = 0
        # new rows prefill together (each at its own position, left-padded, run packed) on a model whose cache puts
        # a token at the slot of its position: the GPU decoder's static cache, also on every rank of a parallel one
        # (the CPU cache shares write slots between rows)
        self.batched_prefill = getattr(model, "batched_prefill", False)
        # the request whose prompt is being prefilled (row, prompt tokens in the cache): it sits in the row after
        # the active ones and joins them when its prompt is in
        self._filling: tuple[int, int] | None = None
        # rows started in this scheduler step (after the active ones), prefilled together at its end (batched_prefill)
        self._group: list[int] = []
        # a pipelining model (the GPU decoder): the next decode step, launched before the last one's tokens were
        # read back: (its logits, the request ids of rows 0.. it was launched for)
        self._ahead: tuple[torch.Tensor, list[int]] | None = None
        self.waiting: deque[Request] = deque()
        self.metrics = Metrics()
        self._ids = itertools.count(1)
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.device = model.model.device
        self.dead: WorkerError | None = None  # the model is gone (a parallel rank died)
        self.on_dead: list[Callable[[WorkerError], None]] = []

    # ------------------------------------------------------------------ public
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="levante-scheduler", daemon=True)
            self._thread.start()
        return self

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def fail_permanently(self, err: WorkerError) -> None:
        """The model is gone (thread-safe): fail every request with `err` and stop."""
        with self._cv:
            if self.dead is None:
                self.dead = err
            self._cv.notify_all()

    def submit(self, prompt: list[int], max_tokens: int, params: SamplingParams, stop: list[str] | None = None,
               stop_ids: set[int] | None = None, logprobs: int | None = None, fresh_text: bool = False,
               loop: asyncio.AbstractEventLoop | None = None, tag: str = "", constraint: Any = None) -> Request:
        """Queue a request. Raises ContextLengthError / ValueError at once for a request that cannot run.

        `tag`: the caller's id for the request (the server's response id), used in logs and error messages.
        `constraint`: a fresh `levante.grammar.Constraint` the output must follow (its own, not shared)."""
        if self.dead is not None:
            raise self.dead
        if not prompt:
            raise ValueError("prompt is empty")
        if len(prompt) >= self.n_ctx:
            raise ContextLengthError(
                f"prompt has {len(prompt)} tokens; the context window is {self.n_ctx} tokens "
                f"(requested {len(prompt)} + {max_tokens} = {len(prompt) + max_tokens})"
            )
        vocab = self.model.cfg.vocab_size
        if any(not 0 <= t < vocab for t in prompt):
            raise ValueError(f"prompt token id out of range 0..{vocab - 1}")
        req = Request(next(self._ids), list(prompt), max(1, min(max_tokens, self.n_ctx - len(prompt))), params,
                      list(stop or []), set(self.tokenizer.eos_ids if stop_ids is None else stop_ids), logprobs,
                      fresh_text, tag, constraint=constraint)
        if loop is not None:
            req._loop, req._aq = loop, asyncio.Queue()
        with self._cv:
            if len(self.waiting) >= self.max_queue:
                raise OverloadedError(f"server overloaded: {len(self.waiting)} requests already waiting")
            self.waiting.append(req)
            with self.metrics.lock:
                self.metrics.requests += 1
                self.metrics.prompt_tokens += len(prompt)
                self.metrics.queue_depth = len(self.waiting)
            self._cv.notify()
        return req

    # ------------------------------------------------------------------ scheduler
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        if self.n_threads is not None:
            torch.set_num_threads(self.n_threads)
        while True:
            with self._cv:
                while (not self._stop and not self.waiting and self.n_active == 0 and self._filling is None
                       and self.dead is None):
                    self._cv.wait()
                if self._stop or self.dead is not None:
                    break
            try:
                with torch.inference_mode():
                    self._drop_finished()
                    self._admit()
                    if self.n_active:
                        self._decode_step()
            except WorkerError as e:
                with self._cv:
                    self.dead = self.dead or e
                break
            except Exception as e:  # a batched step: every active request was in it
                self._fail_all(e)
        self._fail_all(self.dead, include_waiting=True)
        if self.dead is not None:
            for cb in list(self.on_dead):
                try:
                    cb(self.dead)
                except Exception:  # noqa: BLE001
                    log.exception("on_dead callback failed")

    def _fail(self, req: Request, err: BaseException | None) -> None:
        """End `req` with an EngineError (logged with `err`'s traceback; None: the engine is shutting down), or
        with `err` itself when it is a WorkerError (its message is for the client)."""
        if isinstance(err, WorkerError):
            e: BaseException = err
        elif err is not None:
            log.error("%s failed", req.name, exc_info=err)
            e = EngineError(f"internal error while generating ({req.name}); the server log has the details")
        else:
            e = EngineError(f"the engine shut down before {req.name} finished")
        req.error = e
        with self.metrics.lock:
            self.metrics.failed_requests += 1
        req._put(e)

    def _fail_all(self, err: BaseException | None, include_waiting: bool = False) -> None:
        """End every request holding a row (active, being filled, or started for a prefill together) with `err`."""
        self._ahead = None
        rows = [*range(self.n_active), *self._group, *([self._filling[0]] if self._filling is not None else [])]
        self._filling, self._group, self.n_active = None, [], 0
        for i in rows:  # every request ends before any cache call, which may find the model gone
            if self.slots[i].req is not None:
                self._fail(self.slots[i].req, err)
            self.slots[i] = _Slot()
        for i in rows:
            if self.dead is None:  # a lost model's cache is gone with it
                try:
                    self.cache.reset(i)
                except WorkerError as e:
                    self.dead = e
        if include_waiting:
            with self._cv:
                while self.waiting:
                    self._fail(self.waiting.popleft(), err)

    def _release(self, i: int) -> None:
        """Row i's request is done: move it behind the active rows (keeping its tokens for reuse)."""
        last = self.n_active - 1
        slot = self.slots[i]
        slot.req, slot.row, slot.pending, slot.spec = None, None, None, None
        if i != last:
            self._swap(i, last)
        self.n_active -= 1

    def _swap(self, a: int, b: int) -> None:
        self.cache.swap_rows(a, b)
        self.slots[a], self.slots[b] = self.slots[b], self.slots[a]

    def _drop_finished(self) -> None:
        i = 0
        while i < self.n_active:
            s = self.slots[i]
            if s.req is None or s.req.cancelled:
                if s.req is not None:
                    s.req._put(_DONE)
                self._release(i)
            else:
                i += 1

    def _admit(self) -> None:
        """Prefill at most `prefill_chunk` prompt tokens, then return to the decode step: a long prompt is fed a
        chunk per scheduler step (chunked prefill), so the running streams keep going while it is read. Short
        prompts are admitted while the budget lasts: one by one, or (`batched_prefill`) those whose rest fits the
        budget in one call, as vLLM batches the prompts of the requests it schedules together."""
        budget = self.prefill_chunk
        if self._filling is not None:
            budget -= self._fill_guarded(budget)
            if self._filling is not None:
                return
        while self.n_active + len(self._group) < self.max_batch and budget > 0:
            with self._cv:
                if not self.waiting:
                    break
                req = self.waiting.popleft()
                with self.metrics.lock:
                    self.metrics.queue_depth = len(self.waiting)
            if req.cancelled:
                req._put(_DONE)
                continue
            row = self.n_active + len(self._group)
            try:
                self._start(req, row)
            except WorkerError as e:  # the model is gone, not just this request
                self._fail_start(row, req, e)
                raise
            except Exception as e:  # its own set-up: only this request fails
                self._fail_start(row, req, e)
                continue
            rest = len(req.prompt) - self._filling[1]
            if self.batched_prefill and rest <= budget:
                self._filling = None
                self._group.append(row)
                budget -= rest
                continue
            self._prefill_group()  # first: the filling row then follows the active ones
            budget -= self._fill_guarded(budget)
            if self._filling is not None:
                break
        self._prefill_group()

    def _prefill_group(self) -> None:
        """Prefill the rest of the prompts of the requests started in `_group` (rows n_active.., in order) in one
        call, left-padded, each row at its own positions (after its reused prefix); they join the active rows and
        their first tokens are sampled. A failure fails those requests only (WorkerError: the engine too)."""
        rows = self._group
        if not rows:
            return
        slots = [self.slots[r] for r in rows]
        try:
            rests = [s.req.prompt[len(s.tokens) :] for s in slots]
            tokens, positions = _prefill_positions(rests, max(map(len, rests)), [len(s.tokens) for s in slots])
            # positions stay on the host: a GPU decoder finds the real tokens of the padded rows there (no sync)
            logits = self.model(to_device(tokens, self.device), positions, self.cache, last_only=True,
                                rows=slice(rows[0], rows[-1] + 1))
            for r, s in zip(rows, slots, strict=True):
                s.tokens = list(s.req.prompt)
                self.cache.hold(r, len(s.tokens))
        except WorkerError:
            raise  # the engine ends: _fail_all ends the group's requests too
        except Exception as e:  # the group's own prefill: only its requests fail
            for r, s in zip(rows, slots, strict=True):
                self._fail_start(r, s.req, e)  # a WorkerError in its reset: _fail_all ends the rest of the group
            self._group = []
            return
        self._group = []
        self.n_active += len(rows)
        self._emit(rows, logits[:, -1])

    def _fill_guarded(self, budget: int) -> int:
        """`_fill`, with a failure ending only the filling request (a WorkerError ends the engine too)."""
        row, _ = self._filling
        req = self.slots[row].req
        try:
            return self._fill(budget)
        except WorkerError as e:
            self._filling = None
            self._fail_start(row, req, e)
            raise
        except Exception as e:  # its own prefill: only this request fails
            self._filling = None
            self._fail_start(row, req, e)
            return budget

    def _best_free_row(self, prompt: list[int], first: int) -> tuple[int, int]:
        """The free row (`first`..) sharing the longest prefix with `prompt` (at most len(prompt) - 1 tokens)."""
        best, best_n = first, 0
        if not self.prefix_cache:
            return best, 0
        for r in range(first, self.max_batch):
            toks = self.slots[r].tokens
            if self.cache.rolling and self.cache.lengths[r] > self.cache.capacity:
                continue
            n = 0
            limit = min(len(toks), len(prompt) - 1)
            while n < limit and toks[n] == prompt[n]:
                n += 1
            if n > best_n:
                best, best_n = r, n
        return best, best_n

    def _start(self, req: Request, row: int) -> None:
        """Give `req` the free row with the longest common prefix, moved to `row` (the first free one: after the
        active ones and those started before it)."""
        r, common = self._best_free_row(req.prompt, row)
        if r != row:
            self._swap(r, row)
        if common:
            self.cache.truncate(row, common)
        else:
            self.cache.reset(row)
        slot = self.slots[row]
        slot.tokens = slot.tokens[:common]
        req.cached_tokens = common
        with self.metrics.lock:
            self.metrics.cached_prompt_tokens += common
        slot.req = req
        slot.row = _Row(req.id, req.prompt, req.params, req.max_tokens, self.tokenizer, req.stop, req.fresh_text,
                        req.constraint)
        slot.spec = self.spec.speculator(self.n_ctx, self.kv_dtype) if self.spec is not None else None
        self._filling = (row, common)

    def _fill(self, budget: int) -> int:
        """Feed up to `budget` more prompt tokens of the filling request; when its whole prompt is in, it joins the
        active rows and its first token is sampled. Returns the tokens fed."""
        row, done = self._filling
        slot = self.slots[row]
        req = slot.req
        if req.cancelled:
            self._filling = None
            req._put(_DONE)
            slot.req, slot.row, slot.spec, slot.tokens = None, None, None, req.prompt[:done]
            self.cache.truncate(row, done)
            return 0
        n = min(budget, len(req.prompt) - done)
        toks = host_tensor([req.prompt[done : done + n]], self.device, torch.long)
        logits = self.model(toks, cache=self.cache, last_only=True, rows=slice(row, row + 1))
        done += n
        slot.tokens = req.prompt[:done]
        if done < len(req.prompt):
            self._filling = (row, done)
            return n
        self._filling = None
        if row != self.n_active:  # rows released meanwhile: join right after the active ones
            self._swap(row, self.n_active)
            row = self.n_active
        self.n_active += 1
        self._emit([row], logits[:, -1])
        return n

    def _decode_step(self) -> None:
        self._drop_finished()  # requests that finished during admission
        rows = list(range(self.n_active))
        if not rows:
            return
        if len(rows) == 1 and self.slots[0].spec is not None:
            self._spec_step(self.slots[0])
            return
        logits = self._take_ahead(rows)
        if logits is None:
            toks = host_tensor([[self.slots[i].pending] for i in rows], self.device, torch.long)
            logits = self.model(toks, cache=self.cache, last_only=True, rows=slice(0, self.n_active))[:, -1]
        for i in rows:
            self.slots[i].tokens.append(self.slots[i].pending)
            self.slots[i].pending = None
        with self.metrics.lock:
            self.metrics.decode_tokens_window.append((time.perf_counter(), len(rows)))
        self._emit(rows, logits, launch=getattr(self.model, "pipelined", False) and self.spec is None)

    def _take_ahead(self, rows: list[int]) -> torch.Tensor | None:
        """The logits of the step launched ahead, when it was launched for exactly these requests in this order;
        else None, and the cache forgets what that step wrote (each row back to the tokens its slot holds)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        logits, ids = ahead
        if ids == [self.slots[i].req.id if self.slots[i].req is not None else None for i in rows]:
            return logits
        for r, slot in enumerate(self.slots):
            if self.cache.lengths[r] > len(slot.tokens):
                self.cache.truncate(r, len(slot.tokens))
        return None

    def _launch(self, slots: list[_Slot], chosen: torch.Tensor) -> list[int]:
        """Launch the next decode step with `chosen` (rows 0..), then read `chosen` back (`launch_then_read`)."""
        ids, logits = launch_then_read(chosen, lambda: self.model(
            chosen[:, None].to(self.device), cache=self.cache, last_only=True, rows=slice(0, len(slots)))[:, -1])
        self._ahead = (logits, [s.req.id for s in slots])
        return ids

    def _spec_step(self, s: _Slot) -> None:
        """One step of the only running request: its pending token and K proposals in one forward, then every
        token the verification accepts (K = 0: a plain decode step, timed for the choice of K)."""
        req, row, spec = s.req, s.row, s.spec
        history = row.history  # the prompt, the output so far and the pending token
        spec.proposer.sync(history)
        room = min(row.limit - row.n_new, self.n_ctx - len(history))
        k = min(spec.k(), room - 1)
        t0 = time.perf_counter()
        drafts, qs = spec.proposer.propose(history, k, row.params, row.generator) if k > 0 else ([], None)
        drafts = drafts[: max(k, 0)]
        qs = qs[: len(drafts)] if qs is not None else None
        t1 = time.perf_counter()
        logits = self.model(host_tensor([[s.pending, *drafts]], self.device, torch.long), cache=self.cache,
                            rows=slice(0, 1))[0]
        t2 = time.perf_counter()
        try:
            out, masked = verify(logits, drafts, qs, row.params, history, row.generator, row.constraint)
        except Exception as e:  # this request's own sampling
            self._fail(req, e)
            s.req, s.row, s.pending = None, None, None
            self._drop_finished()
            return
        n_acc = len(out) - 1
        self.cache.truncate(0, self.cache.lengths[0] - len(drafts) + n_acc)  # drop the rejected proposals
        s.tokens += [s.pending, *drafts[:n_acc]]
        spec.observe(len(drafts), n_acc, t2 - t1, t1 - t0)
        with self.metrics.lock:
            self.metrics.decode_tokens_window.append((time.perf_counter(), len(out)))
            if drafts:
                self.metrics.spec_proposed += len(drafts)
                self.metrics.spec_accepted += n_acc
                self.metrics.spec_verifications += 1
        for i, tok in enumerate(out):  # the last one becomes the pending token (the others are in the cache)
            self._emit([0], masked[i][None], chosen=[tok])
            if s.req is None:  # finished (or failed)
                break

    def _fail_start(self, row: int, req: Request, err: BaseException) -> None:
        """`req` failed while being admitted into `row` (the row after the active ones, or the last active one
        once counted): end it, and forget the row's possibly half-written cache."""
        self._fail(req, err)
        slot = self.slots[row]
        slot.req, slot.row, slot.pending, slot.tokens = None, None, None, []
        self.cache.reset(row)
        self.n_active = min(self.n_active, row)

    def _sample(self, slots: list[_Slot], logits: torch.Tensor, launch: bool = False) -> list[int | BaseException]:
        """One token per slot; when the batched sampling raises, each row alone, so only its own error fails it.
        `launch`: the next decode step starts before the tokens are read back (`_launch`)."""
        params = [s.row.params for s in slots]
        gens = [s.row.generator for s in slots]
        hist = [s.row.history for s in slots]
        try:
            chosen = sample(logits, params, gens, history=hist)
        except Exception:
            if len(slots) == 1:
                raise
        else:  # a failing launch is the model's failure (the batch's), not a sampling one
            return self._launch(slots, chosen) if launch else chosen.tolist()
        out: list[int | BaseException] = []
        for j in range(len(slots)):
            try:
                out.append(int(sample(logits[j : j + 1], params[j : j + 1], gens[j : j + 1],
                                      history=hist[j : j + 1])[0]))
            except Exception as e:  # noqa: BLE001 - this row's own failure
                out.append(e)
        return out

    def _emit(self, rows: list[int], logits: torch.Tensor, chosen: list[int] | None = None,
              launch: bool = False) -> None:
        """Sample one token for each of `rows` (or take `chosen`, drawn from the already masked `logits`) and send
        the events. `launch` (a decode step of rows 0.. on a pipelining model): start the next step before reading
        the tokens back, unless a row wants logprobs (read from these logits after sampling: the next step's graph
        writes its logits over them). Grammars and penalties pipeline: they need the new tokens on the host only
        for the next sampling."""
        slots = [self.slots[i] for i in rows]
        if chosen is None:
            if any(s.row.constraint is not None for s in slots):  # every constrained row's mask in one op
                logits = mask_logits(logits.contiguous(), [s.row.constraint for s in slots])
            launch = launch and not any(s.req.logprobs is not None for s in slots)
            chosen = self._sample(slots, logits, launch)
        want_lp = [s.req.logprobs for s in slots]
        lps = tops = None
        if any(n is not None for n in want_lp):
            ok = [c if isinstance(c, int) else 0 for c in chosen]
            lps, tops = token_logprobs(logits, torch.tensor(ok), max(n or 0 for n in want_lp))
        now = time.perf_counter()
        out: list[tuple[Request, Any]] = []  # delivered together after the loop
        first: list[float] = []  # times to first token
        for j, s in enumerate(slots):
            req = s.req
            try:
                if isinstance(chosen[j], BaseException):
                    raise chosen[j]
                lp = lps[j] if lps is not None and req.logprobs is not None else None
                top = tops[j][: req.logprobs] if tops is not None and req.logprobs is not None else None
                ev = s.row.accept(chosen[j], req.stop_ids, lp, top)
            except Exception as e:  # this request's own sampling / detokenization
                self._fail(req, e)
                s.req, s.row, s.pending = None, None, None
                continue
            if req.first_token_at is None:
                req.first_token_at = now
                first.append(now - req.submitted)
            out.append((req, ev))
            if ev.finish_reason is not None:
                out.append((req, _DONE))
                s.req = None
            else:
                s.pending = chosen[j]
        deliver(out)
        self._drop_finished()
        with self.metrics.lock:
            for ttft in first:
                self.metrics.observe_ttft(ttft)
            self.metrics.completion_tokens += sum(item is not _DONE for _, item in out)
            self.metrics.batch_size = self.n_active
