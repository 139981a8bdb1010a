"""Batched text generation: left-padded prefill in chunks, one decode step per token, streaming.

Several prompts run together in one batch sharing one `KVCache`. Prompts are left-padded to the
longest one; padding tokens get position -1 and each row's positions start at 0 at its first real
token, so a row computes exactly what it would compute alone. The prompt is fed in chunks of
`prefill_chunk` tokens, then every unfinished row advances by one token per model call. When rows
finish, the batch (and its cache) is compacted to the rows still running.

Text is streamed through the tokenizer's `StreamDecoder` (never splits a UTF-8 character) and then
through a stop-string filter that holds back any tail that could still become a stop string, so
no part of a stop string is ever emitted, even when it is split across tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .errors import ContextLengthError
from .grammar import GrammarError, mask_logits
from .sampling import SamplingParams, make_generator, sample, token_logprobs
from .speculative import speculative_stream
from .transfer import host_tensor, to_device

DEFAULT_N_CTX = 4096  # the context an LLM (and a GPU decoder's warm-up) takes when none is given

__all__ = ["TokenEvent", "GenerationResult", "generate_stream", "generate"]


@dataclass
class TokenEvent:
    """One sampled token of one row (`row` indexes the `prompts` list)."""

    row: int
    token: int
    text: str  # newly completed text of this row (may be "")
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # None, "stop" or "length"
    stop_token: bool = False  # the token is a stop id: it ends the row and is not part of the output


@dataclass
class GenerationResult:
    """A finished row. `tokens` holds every sampled token except a terminating stop token id."""

    tokens: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    events: list[TokenEvent] = field(default_factory=list, repr=False)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)


def _new_stream_decoder(tokenizer, at_start: bool = False):
    from .tokenizer import StreamDecoder

    return StreamDecoder(tokenizer, skip_special=True, at_start=at_start)


class _StopFilter:
    """Holds back text that could be the beginning of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add text; return what can be emitted. Sets `stopped` when a stop string appears."""
        if self.stopped:
            return ""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            cut = min(hits)
            out, self.pending = self.pending[:cut], ""
            self.stopped = True
            return out
        hold = 0
        n = len(self.pending)
        for s in self.stops:
            for k in range(min(len(s) - 1, n), hold, -1):
                if self.pending.endswith(s[:k]):
                    hold = k
                    break
        out, self.pending = self.pending[: n - hold], self.pending[n - hold :]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class _Row:
    def __init__(self, index: int, prompt: list[int], params: SamplingParams, limit: int, tokenizer,
                 stops: Sequence[str], at_start: bool = False, constraint=None) -> None:
        self.index = index
        self.constraint = constraint  # levante.grammar.Constraint | None
        # a constrained row also stops on its grammar's stop tokens (the grammar allows only those once complete)
        self.grammar_stops: set[int] = set(constraint.compiler.stop_ids) if constraint is not None else set()
        self.prompt = prompt
        self.params = params
        self.limit = limit  # max new tokens for this row
        self.history = list(prompt)
        self.n_new = 0
        self.decoder = _new_stream_decoder(tokenizer, at_start)
        self.stop = _StopFilter(stops)
        self.generator = None if params.is_greedy else make_generator(params.seed)

    def accept(self, tok: int, stop_ids: set[int], logprob: float | None = None,
               top: list[tuple[int, float]] | None = None) -> TokenEvent:
        """Take the sampled token `tok`: update text, stop state and budget; describe it as an event."""
        self.n_new += 1
        self.history.append(tok)
        finish = None
        if self.constraint is not None and not self.constraint.accept(tok):
            raise GrammarError(f"token {tok} does not continue the output's grammar")
        stop_ids = stop_ids | self.grammar_stops if self.grammar_stops else stop_ids
        if tok in stop_ids:
            text = self.stop.push(self.decoder.flush()) + self.stop.flush()
            finish = "stop"
        else:
            text = self.stop.push(self.decoder.push(tok))
            if self.stop.stopped:
                finish = "stop"
            elif self.n_new >= self.limit:
                text += self.stop.push(self.decoder.flush())
                finish = "stop" if self.stop.stopped else "length"
                text += self.stop.flush()
        return TokenEvent(row=self.index, token=tok, text=text, logprob=logprob, top_logprobs=top,
                          finish_reason=finish, stop_token=tok in stop_ids)


def _prefill_positions(prompts: list[list[int]], length: int, starts: list[int] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and positions [B, length] of `prompts` left-padded to `length` (padding: position -1); row i's
    positions start at starts[i] (default 0: after the tokens its cache row already holds)."""
    B = len(prompts)
    tokens = torch.zeros((B, length), dtype=torch.long)
    positions = torch.full((B, length), -1, dtype=torch.long)
    for i, p in enumerate(prompts):
        pad = length - len(p)
        start = starts[i] if starts is not None else 0
        tokens[i, pad:] = torch.tensor(p, dtype=torch.long)
        positions[i, pad:] = torch.arange(start, start + len(p))
    return tokens, positions


def _compact_cache(cache, keep: torch.Tensor) -> None:
    cache.select_rows(keep)


def generate_stream(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_tokens: int,
    params: SamplingParams | list[SamplingParams] | None = None,
    stop: list[str] | None = None,
    stop_token_ids: set[int] | None = None,
    logprobs: int | None = None,
    n_ctx: int | None = None,
    prefill_chunk: int = 512,
    fresh_text: bool = False,
    kv_dtype: torch.dtype | None = None,
    constraints: Sequence | None = None,
    speculator=None,
) -> Iterator[TokenEvent]:
    """Generate for several prompts at once, yielding a `TokenEvent` per sampled token.

    Every row ends with exactly one event whose `finish_reason` is "stop" (stop token id or stop
    string) or "length" (`max_tokens`, or the context window). A stop token's own text is not
    emitted; a stop string and everything after it are not emitted.

    Raises ValueError for an empty prompt / bad arguments and `ContextLengthError` (before any
    computation) for a prompt that leaves no room in `n_ctx` (default
    `model.cfg.max_position_embeddings`); a prompt that fits but leaves fewer than `max_tokens`
    slots has its budget capped and finishes with "length".

    `fresh_text=True` decodes the output as a text of its own (a chat reply: SentencePiece's leading
    dummy-prefix space is dropped); by default it continues the prompt's text and keeps it. `kv_dtype`: the
    KV cache's element type (default: the model's compute dtype). `constraints`: one
    `levante.grammar.Constraint` (or None) per prompt: that row's tokens are sampled among those its grammar
    allows (structured output), and it ends when the grammar is complete. `speculator`: a
    `levante.speculative.Speculator` used when there is one prompt (speculative decoding; exact, see there).
    """
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise ValueError("prompts must be a list of token-id lists")
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("prompts is empty")
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be >= 1, got {prefill_chunk}")
    if logprobs is not None and logprobs < 0:
        raise ValueError(f"logprobs must be >= 0, got {logprobs}")
    if params is None:
        params = SamplingParams()
    plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(plist) != len(prompts):
        raise ValueError(f"got {len(plist)} SamplingParams for {len(prompts)} prompts")
    cfg = model.cfg
    if n_ctx is None:
        n_ctx = cfg.max_position_embeddings
    vocab = cfg.vocab_size
    for i, p in enumerate(prompts):
        if len(p) >= n_ctx:
            raise ContextLengthError(
                f"prompt {i} has {len(p)} tokens, which leaves no room for generation in the "
                f"context window n_ctx={n_ctx} (requested {len(p)} + {max_tokens} = "
                f"{len(p) + max_tokens} tokens)"
            )
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} out of range 0..{vocab - 1}")
    if stop_token_ids is None:
        stop_token_ids = set(getattr(tokenizer, "eos_ids", None) or ())
    stop_ids = {int(t) for t in stop_token_ids}
    stops = [s for s in (stop or []) if s]

    cons = list(constraints) if constraints is not None else [None] * len(prompts)
    if len(cons) != len(prompts):
        raise ValueError(f"got {len(cons)} constraints for {len(prompts)} prompts")
    rows = [
        _Row(i, p, plist[i], min(max_tokens, n_ctx - len(p)), tokenizer, stops, fresh_text, cons[i])
        for i, p in enumerate(prompts)
    ]
    length = max(len(p) for p in prompts)
    total_steps = length + max(r.limit for r in rows)

    if speculator is not None and len(rows) == 1:
        with torch.inference_mode():
            yield from speculative_stream(model, rows[0], prompts[0], speculator, stop_ids, n_ctx, logprobs,
                                          prefill_chunk, kv_dtype)
        return

    with torch.inference_mode():
        device = model.model.device if hasattr(model, "model") else torch.device("cpu")
        cache = model.new_cache(len(rows), total_steps, kv_dtype)
        tokens, positions = _prefill_positions(prompts, length)
        tokens = to_device(tokens, device)  # positions stay on the host (see the engine's `_prefill_group`)
        logits = None
        for s in range(0, length, prefill_chunk):
            e = min(s + prefill_chunk, length)
            logits = model(tokens[:, s:e], positions[:, s:e], cache, last_only=True)
        logits = logits[:, -1]

        active = rows
        # A pipelining model (the GPU decoder) gets the next step launched before this step's tokens are read
        # back, so the GPU computes while the host streams text (and fills the grammars' masks and the penalties'
        # windows for the next sampling, which needs the newest token only then); logprobs turn it off (they read
        # this step's logits back).
        pipelined = getattr(model, "pipelined", False) and logprobs is None
        pos = host_tensor([len(r.history) for r in rows], device, torch.long)[:, None]
        while True:
            if any(r.constraint is not None for r in active):
                logits = mask_logits(logits.contiguous(), [r.constraint for r in active])
            chosen = sample(
                logits,
                [r.params for r in active],
                [r.generator for r in active],
                history=[r.history for r in active],
            )
            if logprobs is not None:
                lps, tops = token_logprobs(logits, chosen, logprobs)
            if pipelined:
                chosen_list, logits = launch_then_read(
                    chosen, lambda c=chosen, p=pos: model(c[:, None], p, cache, last_only=True)[:, -1])
            else:
                chosen_list = chosen.tolist()
            still: list[int] = []
            for j, r in enumerate(active):
                ev = r.accept(chosen_list[j], stop_ids, lps[j] if logprobs is not None else None,
                              tops[j] if logprobs is not None else None)
                if ev.finish_reason is None:
                    still.append(j)
                yield ev
            if not still:
                return
            if len(still) < len(active):
                keep = host_tensor(still, device, torch.long)
                _compact_cache(cache, keep)
                chosen = chosen.index_select(0, keep.to(chosen.device))
                pos = pos.index_select(0, keep)
                if pipelined:
                    logits = logits.index_select(0, keep.to(logits.device))
                active = [active[j] for j in still]
            if not pipelined:
                logits = model(chosen.to(device)[:, None], pos, cache, last_only=True)[:, -1]
            pos = pos + 1


def launch_then_read(chosen: torch.Tensor, launch: Callable[[], torch.Tensor]) -> tuple[list[int], torch.Tensor]:
    """Run `launch()` (the next decode step, fed `chosen`), then read `chosen` back: on CUDA through pinned memory
    and an event recorded before the step, so the host waits for the copy, not for the step. Returns (the ids,
    what `launch` returned: logits still being computed)."""
    if chosen.is_cuda:
        host = torch.empty(chosen.shape, dtype=chosen.dtype, pin_memory=True)
        host.copy_(chosen, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        out = launch()
        copied.synchronize()
        return host.tolist(), out
    ids = chosen.tolist()
    return ids, launch()


def generate(
    model,
    tokenizer,
    prompts: list[list[int]],
    max_tokens: int,
    params: SamplingParams | list[SamplingParams] | None = None,
    stop: list[str] | None = None,
    stop_token_ids: set[int] | None = None,
    logprobs: int | None = None,
    n_ctx: int | None = None,
    prefill_chunk: int = 512,
    fresh_text: bool = False,
    kv_dtype: torch.dtype | None = None,
    constraints: Sequence | None = None,
    speculator=None,
) -> list[GenerationResult]:
    """Non-streaming `generate_stream`: one `GenerationResult` per prompt, in prompt order."""
    results = [
        GenerationResult(tokens=[], text="", finish_reason="", prompt_tokens=len(p),
                         logprobs=[] if logprobs is not None else None,
                         top_logprobs=[] if logprobs is not None else None)
        for p in prompts
    ]
    texts: list[list[str]] = [[] for _ in prompts]
    stop_ids = None if stop_token_ids is None else set(stop_token_ids)
    if stop_ids is None:
        stop_ids = set(getattr(tokenizer, "eos_ids", None) or ())
    for ev in generate_stream(model, tokenizer, prompts, max_tokens, params, stop, stop_ids, logprobs,
                              n_ctx, prefill_chunk, fresh_text, kv_dtype, constraints, speculator):
        res = results[ev.row]
        res.events.append(ev)
        texts[ev.row].append(ev.text)
        if not ev.stop_token:
            res.tokens.append(ev.token)
            if logprobs is not None:
                res.logprobs.append(ev.logprob)
                res.top_logprobs.append(ev.top_logprobs)
        if ev.finish_reason is not None:
            res.finish_reason = ev.finish_reason
    for res, parts in zip(results, texts):
        res.text = "".join(parts)
    return results
