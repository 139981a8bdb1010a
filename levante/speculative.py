"""Speculative decoding: propose several tokens cheaply, verify them with one forward pass of the model.

Proposers: `PromptLookup` (the tokens that followed the latest earlier occurrence of the last n tokens in the
prompt + output; llama.cpp's lookup, HF's prompt_lookup_num_tokens) and `DraftModel` (a smaller model with
the same vocabulary, its own KV cache kept in step with the accepted tokens).

Verification (`verify`) feeds the last token and the K proposals to the model at once and walks the K + 1
next-token distributions `p` of the sampler chain (`sampling.distribution`: penalties over the history so
far, logit bias, grammar mask, filters, temperature). Greedy rows accept a proposal while it is the argmax,
so the output is token for token the non-speculative one. Sampled rows use the standard rejection scheme:
accept proposal x (drawn from the proposer's q) with probability min(1, p(x) / q(x)), else draw from
norm(max(0, p - q)) and stop; all accepted: one more token from the last p. Every emitted token is then
distributed exactly as the model's own sampling (a prompt-lookup proposal is q = one-hot). The KV cache is
cut back to the accepted tokens (`KVCache.truncate`; rolling sliding-window caches get slack for it).

`Speculator` adapts K to the recent acceptance (an exponential average over proposals): the expected tokens
per verification pass, against its cost, decide K; when proposals stop paying it stops proposing and probes
again now and then, so a stream where nothing matches decodes as fast as without speculation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .grammar import mask_logits
from .sampling import SamplingParams, distribution, greedy_choice, token_logprobs

MAX_TOKENS = 16  # upper bound of K (the cache slack of sliding-window models is sized for it)


def cache_size(n_ctx: int) -> tuple[int, int]:
    """(max_tokens, slack) of a one-row cache that every speculative generation within `n_ctx` tokens fits, the
    target's (`speculative_stream`) and a draft's: a GPU decoder warmed up for it keeps one cache and graph."""
    return n_ctx + MAX_TOKENS + 1, MAX_TOKENS + 1


@dataclass
class SpecStats:
    """Counters of one generation (or a server's lifetime)."""

    proposed: int = 0
    accepted: int = 0
    verifications: int = 0  # forward passes over proposals
    plain_steps: int = 0  # forward passes without proposals

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def add(self, other: SpecStats) -> None:
        for f in ("proposed", "accepted", "verifications", "plain_steps"):
            setattr(self, f, getattr(self, f) + getattr(other, f))


# ---------------------------------------------------------------------------------------------- proposers
class PromptLookup:
    """Proposes the tokens that followed an earlier occurrence of the history's last n tokens (n from `ngram`
    down to `min_ngram`): the occurrence the previous proposal was copied from while the output keeps following
    it (copying a passage stays aligned through its repeated phrases), else the latest one. Keeps an index of
    n-gram positions, extended as the history grows."""

    needs_model = False

    def __init__(self, ngram: int = 3, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= ngram:
            raise ValueError(f"need 1 <= min_ngram <= ngram, got {min_ngram}, {ngram}")
        self.ngram, self.min_ngram = ngram, min_ngram
        self.reset()

    def reset(self) -> None:
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> end position of its latest occurrence
        self._seen = 0  # history positions indexed
        self._src: tuple[int, int] | None = None  # (source position, history length) of the last proposal

    def _extend(self, history: Sequence[int]) -> None:
        # index every n-gram that ends before the last token (an occurrence must be followed by something)
        for end in range(max(self._seen, 1), len(history)):
            for n in range(self.min_ngram, self.ngram + 1):
                if end - n >= 0:
                    self._index[tuple(history[end - n : end])] = end
        self._seen = len(history)

    def _aligned(self, history: Sequence[int]) -> int | None:
        """Where the previous proposal's source continues, if the output still follows it."""
        if self._src is None:
            return None
        src = self._src[0] + len(history) - self._src[1]
        n = min(self.ngram, src)
        if n < self.min_ngram or src >= len(history) - 1 or list(history[src - n : src]) != list(history[-n:]):
            return None
        return src

    def propose(self, history: Sequence[int], k: int, params=None, generator=None) -> tuple[list[int], None]:
        if k <= 0 or len(history) < 2:
            return [], None
        if len(history) < self._seen:
            self.reset()
        self._extend(history)
        src = self._aligned(history)
        if src is None:
            for n in range(min(self.ngram, len(history) - 1), self.min_ngram - 1, -1):
                end = self._index.get(tuple(history[-n:]))
                if end is not None and end < len(history):
                    src = end
                    break
        if src is None:
            self._src = None
            return [], None
        self._src = (src, len(history))
        return list(history[src : src + k]), None

    def sync(self, history: Sequence[int]) -> None:
        pass


class DraftModel:
    """A draft model (same vocabulary) proposing K tokens autoregressively with the request's sampling settings;
    its cache always holds a prefix of the history and catches up (one batched forward) before proposing."""

    needs_model = True

    def __init__(self, model, n_ctx: int, kv_dtype: torch.dtype | None = None) -> None:
        self.model, self.n_ctx, self.kv_dtype = model, n_ctx, kv_dtype
        self.cache = None
        self.cached: list[int] = []  # the history tokens in the cache

    def reset(self) -> None:
        self.cache, self.cached = None, []

    def _holds(self) -> bool:
        """Whether the cache still holds this proposer's tokens: a GPU decoder (`model`) has one cache, which
        another request's draft may have filled since (it is then asked for again, and refilled)."""
        if self.cache is not None and self.cache.owner is not self:
            self.reset()
        return self.cache is not None

    def _feed(self, history: Sequence[int]) -> Tensor:
        """Bring the cache to history[:-1] + feed the last token; the next-token logits [V]."""
        device = self.model.model.device
        if not self._holds():
            max_tokens, slack = cache_size(self.n_ctx)
            self.cache = self.model.new_cache(1, max_tokens, self.kv_dtype, slack=slack)
            self.cache.owner = self
        common = 0
        limit = min(len(self.cached), len(history) - 1)
        while common < limit and self.cached[common] == history[common]:
            common += 1
        if common < len(self.cached):
            self.cache.truncate(0, common)
            self.cached = self.cached[:common]
        new = torch.tensor([list(history[common:])], device=device)
        logits = None
        for s in range(0, new.shape[1], 512):
            logits = self.model(new[:, s : s + 512], cache=self.cache, last_only=True)
        self.cached = list(history)
        return logits[0, -1]

    def propose(self, history: Sequence[int], k: int, params: SamplingParams,
                generator: torch.Generator | None) -> tuple[list[int], list[Tensor] | None]:
        if k <= 0:
            return [], None
        hist = list(history)
        out, qs = [], []
        with torch.inference_mode():
            logits = self._feed(hist)
            for i in range(k):
                q = distribution(logits[None].float(), params, [hist])[0].cpu()  # drawn with a CPU generator
                tok = int(q.argmax()) if params.is_greedy else int(torch.multinomial(q, 1, generator=generator))
                out.append(tok)
                qs.append(q)
                hist.append(tok)
                if i + 1 < k:
                    logits = self._feed(hist)
        return out, None if params.is_greedy else qs

    def sync(self, history: Sequence[int]) -> None:
        """Forget cached tokens the history no longer has (rejected proposals)."""
        common = 0
        while common < min(len(self.cached), len(history)) and self.cached[common] == history[common]:
            common += 1
        if common < len(self.cached) and self._holds():
            self.cache.truncate(0, common)
            self.cached = self.cached[:common]


# ---------------------------------------------------------------------------------------------- verification
def verify(logits: Tensor, drafts: list[int], qs: list[Tensor] | None, params: SamplingParams,
           history: Sequence[int], generator: torch.Generator | None, constraint=None) -> tuple[list[int], Tensor]:
    """The tokens to emit after verifying `drafts` against the model's logits [len(drafts) + 1, V] (row i: the
    distribution after history + drafts[:i]): the accepted drafts, then one token drawn by the rejection scheme
    (or the bonus token after all K). `qs`: the proposer's distributions (None: deterministic proposals).
    `constraint` (a grammar): masked per position along the drafts, rolled back before returning. Also returns the
    (grammar-masked) logits, for log-probabilities."""
    k = len(drafts)
    logits = logits.float()
    hist = list(history)
    histories = [hist + drafts[:i] for i in range(k + 1)]
    advanced = 0
    if constraint is not None:  # the grammar's mask at each position along the drafts
        logits = logits.clone()
        rows = []
        for i in range(k + 1):
            mask_logits(logits[i : i + 1], [constraint])
            rows.append(i)
            if i == k or not constraint.accept(drafts[i]):
                break
            advanced += 1
        if len(rows) < k + 1:  # a draft the grammar refuses: nothing after it counts
            logits[len(rows):] = logits[len(rows) - 1]
        constraint.rollback(advanced)
    if params.is_greedy:  # accept while each draft is the argmax (no distributions needed)
        best = greedy_choice(logits, params, histories)
        out: list[int] = []
        for i, d in enumerate(drafts):
            if best[i] != d:
                return out + [best[i]], logits
            out.append(d)
        return out + [best[k]], logits
    p = distribution(logits, params, histories).cpu()  # the walk draws with the row's CPU generator
    return _walk(p, drafts, qs, params, generator), logits


def _walk(p: Tensor, drafts: list[int], qs: list[Tensor] | None, params: SamplingParams,
          generator: torch.Generator | None) -> list[int]:
    out: list[int] = []
    k = len(drafts)
    for i, d in enumerate(drafts):
        if params.is_greedy:
            best = int(p[i].argmax())
            if best != d:
                return out + [best]
            out.append(d)
            continue
        q_d = float(qs[i][d]) if qs is not None else 1.0
        p_d = float(p[i, d])
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        if q_d > 0 and u < min(1.0, p_d / q_d):
            out.append(d)
            continue
        residual = (p[i] - (qs[i] if qs is not None else _one_hot(d, p.shape[1]))).clamp_min(0)
        total = float(residual.sum())
        if total <= 0:  # p == q: cannot happen after a rejection except by rounding
            residual, total = p[i], float(p[i].sum())
        return out + [int(torch.multinomial(residual / total, 1, generator=generator))]
    last = p[k]
    return out + [int(last.argmax()) if params.is_greedy else int(torch.multinomial(last, 1, generator=generator))]


def _one_hot(i: int, n: int) -> Tensor:
    t = torch.zeros(n, dtype=torch.float64)
    t[i] = 1.0
    return t


# ---------------------------------------------------------------------------------------------- adaptive K
class Speculator:
    """A proposer plus the adaptive choice of K. `k()` before each step, `observe()` after it.

    K maximises the expected emitted tokens per second of a step. Acceptance is tracked per position in a
    proposal, conditional on the earlier ones being accepted (exponential averages c_i): proposals come in runs
    (a copied passage matches for many tokens, then not at all), which one rate per token would miss. k
    proposals emit 1 + sum_j prod_{i <= j} c_i tokens and cost a forward over k + 1 tokens plus k proposals.
    Forward costs are measured per token count as they happen (unmeasured counts: interpolated, or
    extrapolated from the largest measured one; before any: an optimistic guess), so the
    same code picks long runs where verification is cheap (memory-bound GPUs) and short ones, or none, where
    it costs almost as much as the tokens one by one. Without a paying K it proposes nothing and probes with
    one token every 16 steps."""

    def __init__(self, proposer, k_max: int = 8, alpha: float = 0.3) -> None:
        if not 1 <= k_max <= MAX_TOKENS:
            raise ValueError(f"num_speculative_tokens must be in 1..{MAX_TOKENS}, got {k_max}")
        self.proposer, self.k_max, self.alpha = proposer, k_max, alpha
        self.reset()

    def reset(self) -> None:
        self.proposer.reset()
        self.cond = [0.8] * (self.k_max + 1)  # cond[i]: P(proposal i accepted | 1..i-1 were), optimistic start
        self.idle = 0  # steps since proposals were switched off
        self.stats = SpecStats()
        self.step_cost: dict[int, float] = {}  # tokens fed -> EMA seconds of the forward
        self.draft_cost = 0.0  # EMA seconds per proposed token

    def _cost(self, t: int) -> float:
        """Estimated seconds of a forward over t tokens."""
        if t in self.step_cost:
            return self.step_cost[t]
        base = self.step_cost.get(1)
        known = sorted(x for x in self.step_cost if x > 1)
        if base is None:
            base = self.step_cost[known[0]] / (1 + 0.1 * (known[0] - 1)) if known else 1.0
        lower = max([1] + [x for x in known if x < t])
        upper = min([x for x in known if x > t], default=None)
        c_lo = self.step_cost.get(lower, base)
        if upper is not None:
            return c_lo + (self.step_cost[upper] - c_lo) * (t - lower) / (upper - lower)
        slope = (c_lo - base) / (lower - 1) if lower > 1 else 0.1 * base  # optimistic until measured
        return c_lo + slope * (t - lower)

    def k(self) -> int:
        """Proposals for the next step (0: a plain decode step)."""
        best_k, best = 0, 1.0 / self._cost(1)
        emitted, reach = 1.0, 1.0  # expected tokens emitted by k proposals; P(proposal k accepted)
        for k in range(1, self.k_max + 1):
            reach *= self.cond[k]
            emitted += reach
            speed = emitted / (self._cost(k + 1) + k * self.draft_cost)
            if speed > best * 1.03:
                best_k, best = k, speed
        if best_k == 0:
            self.idle += 1
            if self.idle % 16 == 0:
                return 1
        else:
            self.idle = 0
        return best_k

    def observe(self, proposed: int, accepted: int, forward_s: float | None = None, draft_s: float = 0.0) -> None:
        """A step: `proposed` tokens of which `accepted` were; its forward's seconds (over proposed + 1 tokens)
        and the proposer's."""
        if forward_s is not None:
            t = proposed + 1
            old = self.step_cost.get(t)
            self.step_cost[t] = forward_s if old is None else (1 - self.alpha) * old + self.alpha * forward_s
        if proposed:
            for i in range(1, min(accepted + 1, proposed) + 1):  # positions reached: accepted, or the first refused
                hit = 1.0 if i <= accepted else 0.0
                self.cond[i] = (1 - self.alpha) * self.cond[i] + self.alpha * hit
            if accepted == proposed:  # a run that held to its end: the positions after it are as likely
                for i in range(proposed + 1, self.k_max + 1):
                    self.cond[i] = max(self.cond[i], self.cond[proposed])
            per = draft_s / proposed
            self.draft_cost = per if not self.stats.proposed else (1 - self.alpha) * self.draft_cost + self.alpha * per
            self.stats.proposed += proposed
            self.stats.accepted += accepted
            self.stats.verifications += 1
        else:
            self.stats.plain_steps += 1


@dataclass
class SpecConfig:
    """How an `LLM` speculates: prompt lookup or a draft model, K, n-gram size."""

    method: str  # "prompt_lookup" | "draft"
    k: int = 8
    ngram: int = 3
    draft: object | None = None  # the draft's CausalLM, or its GPU decoder (levante.cuda.CudaDecoder)
    last: SpecStats | None = None  # the counters of the latest generation

    def speculator(self, n_ctx: int, kv_dtype: torch.dtype | None = None) -> Speculator:
        """A fresh Speculator (one per generation: its proposer and statistics are per sequence)."""
        if self.method == "prompt_lookup":
            return Speculator(PromptLookup(self.ngram), self.k)
        return Speculator(DraftModel(self.draft, n_ctx, kv_dtype), self.k)


# ---------------------------------------------------------------------------------------------- the loop
def speculative_stream(model, row, prompt: list[int], spec: Speculator, stop_ids: set[int], n_ctx: int,
                       logprobs: int | None = None, prefill_chunk: int = 512,
                       kv_dtype: torch.dtype | None = None, cache=None) -> Iterator:
    """TokenEvents of one row (a `generate._Row`) generated with speculation; the row's own budget, stops and
    grammar apply to every accepted token, and the run ends where the row does. `cache`: a fresh one-row cache
    with slack >= MAX_TOKENS + 1 to use (default: made here).

    Invariant: the cache holds the history but its last token, which the next forward feeds together with the
    proposals; a step without proposals is a plain decode step."""
    device = model.model.device if hasattr(model, "model") else torch.device("cpu")
    if cache is None:
        max_tokens, slack = cache_size(min(n_ctx, len(prompt) + row.limit))
        cache = model.new_cache(1, max_tokens, kv_dtype, slack=slack)
    tokens = torch.tensor([prompt], device=device)
    logits = None
    for s in range(0, len(prompt), prefill_chunk):
        logits = model(tokens[:, s : s + prefill_chunk], cache=cache, last_only=True)
    step_logits, drafts, qs, forward_s, draft_s = logits[0, -1:].float(), [], None, None, 0.0
    while True:
        out, masked = verify(step_logits, drafts, qs, row.params, row.history, row.generator, row.constraint)
        if drafts:
            cache.truncate(0, cache.lengths[0] - len(drafts) + len(out) - 1)  # drop the rejected proposals
        if forward_s is not None:
            spec.observe(len(drafts), len(out) - 1, forward_s, draft_s)
        for i, tok in enumerate(out):
            lp = top = None
            if logprobs is not None:
                lps, tops = token_logprobs(masked[i][None], [tok], logprobs)
                lp, top = lps[0], tops[0]
            ev = row.accept(tok, stop_ids, lp, top)
            yield ev
            if ev.finish_reason is not None:
                return
        spec.proposer.sync(row.history)
        room = min(row.limit - row.n_new, n_ctx - len(row.history))
        k = min(spec.k(), room - 1)
        t0 = time.perf_counter()
        drafts, qs = spec.proposer.propose(row.history, k, row.params, row.generator) if k > 0 else ([], None)
        drafts = drafts[: max(k, 0)]
        qs = qs[: len(drafts)] if qs is not None else None
        t1 = time.perf_counter()
        step_logits = model(torch.tensor([[row.history[-1], *drafts]], device=device), cache=cache)[0].float()
        draft_s, forward_s = t1 - t0, time.perf_counter() - t1
