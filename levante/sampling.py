"""Token sampling: penalties, logit bias, truncation filters, temperature, seeded draws.

The sampler chain follows llama.cpp's default order::

    penalties -> logit_bias -> top_k -> typical -> top_p -> min_p -> temperature -> sample

Every filter works on float32 logits ``[B, V]`` and masks removed tokens with ``-inf``, so the
next filter's softmax renormalises over the survivors. Filters always keep at least one token.
With ``temperature == 0`` the chain reduces to ``argmax`` of the penalised/biased logits (the
truncation filters never remove the argmax) and no random numbers are drawn.

Penalties (llama.cpp semantics): all three are computed over the same window, the last
``repeat_last_n`` tokens of the row's history (prompt + generated so far; ``-1`` = whole
history, ``0`` = penalties off). ``repeat_penalty`` divides positive and multiplies negative
logits of every token in the window; then ``logit -= count * frequency_penalty +
(count > 0) * presence_penalty`` with ``count`` = occurrences in the window.

Each row may have its own `SamplingParams` and its own ``torch.Generator``: a row's random number
comes from its own generator, so a seeded row gives the same tokens whatever else is in the batch.
The batch is drawn at once (`draw`: inverse transform sampling at those numbers), and on a GPU
nothing in the chain waits for the device: the settings and random numbers are copied to it
without waiting (levante.transfer), and whether a filter is off is decided from the settings on
the host, not from the logits. Only the chosen ids are read back, by the caller.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .transfer import host_tensor, to_device

__all__ = [
    "SamplingParams",
    "apply_penalties",
    "apply_logit_bias",
    "top_k_filter",
    "top_p_filter",
    "min_p_filter",
    "typical_filter",
    "apply_temperature",
    "sample",
    "distribution",
    "token_logprobs",
    "make_generator",
]

NEG_INF = float("-inf")


@dataclass
class SamplingParams:
    """Sampling settings for one sequence (defaults follow llama.cpp)."""

    temperature: float = 0.8  # 0 -> greedy
    top_k: int = 40  # 0 or -1 -> off
    top_p: float = 0.95  # 1.0 -> off
    min_p: float = 0.05  # 0.0 -> off
    typical_p: float = 1.0  # 1.0 -> off
    repeat_penalty: float = 1.1  # 1.0 -> off
    repeat_last_n: int = 64  # penalty window; -1 = whole history, 0 = off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name} {getattr(self, name)!r} is invalid: {why}")

        for name in ("temperature", "top_p", "min_p", "typical_p", "repeat_penalty",
                     "frequency_penalty", "presence_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) or math.isinf(v):
                raise bad(name, "must be a finite number")
        for name in ("top_k", "repeat_last_n"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise bad(name, "must be an integer")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0 (0 = greedy)")
        if self.top_k < -1:
            raise bad("top_k", "must be >= -1 (0 or -1 = off)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not 0 < self.typical_p <= 1:
            raise bad("typical_p", "must be in (0, 1]")
        if self.repeat_penalty <= 0:
            raise bad("repeat_penalty", "must be > 0 (1 = off)")
        if self.repeat_last_n < -1:
            raise bad("repeat_last_n", "must be >= -1 (-1 = whole history, 0 = off)")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise bad("logit_bias", "must be a dict {token_id: bias}")
            clean: dict[int, float] = {}
            for k, v in self.logit_bias.items():
                try:
                    tid = int(k)
                    b = float(v)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"logit_bias entry {k!r}: {v!r} is invalid: {e}") from None
                if tid < 0 or math.isnan(b):
                    raise ValueError(f"logit_bias entry {k!r}: {v!r} is invalid")
                clean[tid] = b
            self.logit_bias = clean
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise bad("seed", "must be an integer or None")

    @classmethod
    def greedy(cls, **overrides) -> SamplingParams:
        """Deterministic argmax decoding with no penalties (override any field via kwargs)."""
        kw = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, repeat_penalty=1.0,
                  frequency_penalty=0.0, presence_penalty=0.0)
        kw.update(overrides)
        return cls(**kw)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def uses_history(self) -> bool:
        """Whether the penalties read the row's token history (all of them off, or a window of 0: no)."""
        return self.repeat_last_n != 0 and (self.repeat_penalty != 1.0 or self.frequency_penalty != 0.0
                                            or self.presence_penalty != 0.0)


# ----------------------------------------------------------------------------- helpers
def _rows(params: SamplingParams | Sequence[SamplingParams], batch: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * batch
    params = list(params)
    if len(params) != batch:
        raise ValueError(f"got {len(params)} SamplingParams for a batch of {batch}")
    return params


def _per_row(value, batch: int, device, dtype) -> Tensor:
    """A scalar or per-row sequence/tensor -> tensor [B, 1] on `device` (host values copied without waiting for
    the device: levante.transfer)."""
    if isinstance(value, Tensor):
        t = value.to(device=device, dtype=dtype).reshape(-1)
    elif isinstance(value, (int, float)):
        t = torch.full((batch,), value, dtype=dtype, device=device)
    else:
        t = host_tensor(list(value), device, dtype)
    if t.numel() == 1 and batch != 1:
        t = t.expand(batch)
    if t.numel() != batch:
        raise ValueError(f"got {t.numel()} per-row values for a batch of {batch}")
    return t[:, None]


def _host_values(value) -> list | None:
    """A filter's setting as Python numbers, when they are on the host (None: a tensor on a device, whose values
    would have to be read back: the filter then runs without checking whether it is off)."""
    if isinstance(value, Tensor):
        return value.reshape(-1).tolist() if value.device.type == "cpu" else None
    if isinstance(value, (int, float)):
        return [value]
    return list(value)


def _check(logits: Tensor) -> Tensor:
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape [B, V], got {tuple(logits.shape)}")
    return logits.float()


def _mask_sorted(logits: Tensor, order: Tensor, remove_sorted: Tensor) -> Tensor:
    """Set to -inf the tokens whose sorted position (per `order`) is flagged in remove_sorted."""
    remove_sorted[:, 0] = False  # always keep the first one
    remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


# ----------------------------------------------------------------------------- chain stages
def apply_penalties(
    logits: Tensor,
    history: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
) -> Tensor:
    """Repeat / frequency / presence penalties over each row's last `repeat_last_n` history tokens, for the batch at
    once and only where they apply: the windows' distinct tokens are counted on the host, and their logits are
    read, penalised and written back through one list of flat indices (copied without waiting), as llama.cpp
    touches only the window's tokens, instead of computing [B, V] counts and masks."""
    logits = _check(logits)
    B, V = logits.shape
    if len(history) != B:
        raise ValueError(f"got {len(history)} histories for a batch of {B}")
    out = logits.clone()
    flat: list[int] = []
    terms: list[list[float]] = [[], [], [], []]  # per index: count, repeat, frequency, presence
    for i, p in enumerate(_rows(params, B)):
        if not p.uses_history:
            continue
        window = history[i] if p.repeat_last_n == -1 else history[i][-p.repeat_last_n :]
        counts = Counter(t for t in map(int, window) if 0 <= t < V)
        flat += [i * V + t for t in counts]
        n = len(counts)
        for dst, values in zip(terms, (counts.values(), [p.repeat_penalty] * n, [p.frequency_penalty] * n,
                                       [p.presence_penalty] * n)):
            dst += values
    if not flat:
        return out
    idx = host_tensor(flat, logits.device, torch.long)
    count, repeat, freq, pres = host_tensor(terms, logits.device, logits.dtype)
    x = out.view(-1).index_select(0, idx)
    out.view(-1).index_copy_(0, idx, torch.where(x > 0, x / repeat, x * repeat) - count * freq - pres)
    return out


def apply_logit_bias(logits: Tensor, params: SamplingParams | Sequence[SamplingParams]) -> Tensor:
    """Add each row's `logit_bias` ({token id: bias}; -inf bans a token), for the batch in one op."""
    logits = _check(logits).clone()
    B, V = logits.shape
    flat: list[int] = []
    vals: list[float] = []
    for i, p in enumerate(_rows(params, B)):
        if not p.logit_bias:
            continue
        bad = [t for t in p.logit_bias if not 0 <= t < V]
        if bad:
            raise ValueError(f"logit_bias token id {bad[0]} is out of range 0..{V - 1}")
        flat += [i * V + t for t in p.logit_bias]
        vals += list(p.logit_bias.values())
    if not flat:
        return logits
    logits.view(-1).index_add_(0, host_tensor(flat, logits.device, torch.long),
                               host_tensor(vals, logits.device, logits.dtype))
    # only a ban can remove a row's last token (reading the logits back waits for the device: not otherwise)
    if any(v == NEG_INF for v in vals) and not torch.isfinite(logits).any(-1).all():
        raise ValueError("logit_bias removed every token of a row")
    return logits


def top_k_filter(logits: Tensor, k) -> Tensor:
    """Keep exactly the k largest logits per row (k <= 0 or k >= V: keep all). k: int or per row."""
    logits = _check(logits)
    B, V = logits.shape
    ks = _host_values(k)
    if ks is not None and all(v <= 0 or v >= V for v in ks):
        return logits
    kt = _per_row(k, B, logits.device, torch.long)
    kt = torch.where(kt <= 0, torch.full_like(kt, V), kt).clamp(1, V)
    order = logits.argsort(dim=-1, descending=True, stable=True)
    rank = torch.arange(V, device=logits.device)[None]
    return _mask_sorted(logits, order, rank >= kt)


def top_p_filter(logits: Tensor, p) -> Tensor:
    """Nucleus: keep the smallest set of most likely tokens whose probability reaches p (p >= 1: off)."""
    logits = _check(logits)
    B, V = logits.shape
    ps = _host_values(p)
    if ps is not None and all(v >= 1.0 for v in ps):
        return logits
    pt = _per_row(p, B, logits.device, torch.float32)
    off = pt >= 1.0
    probs, order = torch.softmax(logits, -1).sort(dim=-1, descending=True, stable=True)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above
    remove = (before >= pt) & ~off
    return _mask_sorted(logits, order, remove)


def min_p_filter(logits: Tensor, min_p) -> Tensor:
    """Drop tokens with probability < min_p * (probability of the most likely token) (0: off)."""
    logits = _check(logits)
    B, V = logits.shape
    ms = _host_values(min_p)
    if ms is not None and all(v <= 0 for v in ms):
        return logits
    mt = _per_row(min_p, B, logits.device, torch.float32)
    top = logits.max(-1, keepdim=True).values
    thresh = top + torch.log(mt.clamp(min=1e-30))
    remove = (logits < thresh) & (mt > 0)
    return logits.masked_fill(remove, NEG_INF)  # the max always survives (min_p <= 1)


def typical_filter(logits: Tensor, p) -> Tensor:
    """Locally typical sampling (llama.cpp): rank tokens by |-log p - entropy| and keep the
    smallest such prefix whose probability reaches p (p >= 1: off)."""
    logits = _check(logits)
    B, V = logits.shape
    ps = _host_values(p)
    if ps is not None and all(v >= 1.0 for v in ps):
        return logits
    pt = _per_row(p, B, logits.device, torch.float32)
    off = pt >= 1.0
    logp = torch.log_softmax(logits, -1)
    probs = logp.exp()
    plogp = torch.where(probs > 0, probs * logp, torch.zeros_like(probs))
    entropy = -plogp.sum(-1, keepdim=True)
    shift = (-logp - entropy).abs()  # inf for removed tokens -> sorted last
    order = shift.argsort(dim=-1, stable=True)
    sp = probs.gather(1, order)
    before = sp.cumsum(-1) - sp
    remove = (before >= pt) & ~off
    return _mask_sorted(logits, order, remove)


def apply_temperature(logits: Tensor, temperature) -> Tensor:
    """Divide by temperature (rows with temperature 0 are left as they are: they are argmaxed)."""
    logits = _check(logits)
    B, _ = logits.shape
    t = _per_row(temperature, B, logits.device, torch.float32)
    return logits / torch.where(t > 0, t, torch.ones_like(t))


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator seeded with `seed`, or with a fresh seed drawn from torch's global RNG."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return torch.Generator(device=device).manual_seed(seed)


def _biased(logits: Tensor, rows: list[SamplingParams], history: Sequence[Sequence[int]] | None) -> Tensor:
    """The chain's first stages: penalties (with a history) and logit bias, each a new tensor; the logits themselves
    when no row has either (the chain after them only reads them: no copy of [B, V] for a greedy batch's argmax)."""
    if history is not None and any(p.uses_history for p in rows):
        logits = apply_penalties(logits, history, rows)
    if any(p.logit_bias for p in rows):
        logits = apply_logit_bias(logits, rows)
    return logits


# top-k at or under a vocabulary's 1/CANDIDATES tokens narrows the rest of the chain to its survivors
CANDIDATES = 8


def _probabilities(sub: Tensor, rp: list[SamplingParams]) -> tuple[Tensor, Tensor | None]:
    """The truncation filters, temperature and softmax (float64) of sampled rows: (the probabilities [n, V], None),
    or, when every row's top-k keeps at most V / CANDIDATES tokens, (those of its survivors [n, k], their ids [n, k]):
    the filters after top-k then see only those, as llama.cpp's candidate list does (the sorts of top-p and typical
    take k values instead of V: `sample` with llama.cpp's defaults, one row of 32000, 2 cores: 4.7 -> 0.9 ms)."""
    ks = [p.top_k for p in rp]
    ids = None
    if min(ks) > 0 and max(ks) <= sub.shape[1] // CANDIDATES:
        sub, ids = top_k_candidates(sub, ks)
    else:
        sub = top_k_filter(sub, ks)
    sub = typical_filter(sub, [p.typical_p for p in rp])
    sub = top_p_filter(sub, [p.top_p for p in rp])
    sub = min_p_filter(sub, [p.min_p for p in rp])
    return torch.softmax(apply_temperature(sub, [p.temperature for p in rp]).double(), -1), ids


def top_k_candidates(logits: Tensor, k: Sequence[int]) -> tuple[Tensor, Tensor]:
    """What `top_k_filter` keeps of each row (k[r] >= 1 tokens, the lower id first among equal logits), as (their
    logits [B, max k], their ids [B, max k]) in ascending id order, so the filters after it (whose sorts are stable)
    and the draw see them in the order they have in the whole row; a row with fewer than max k: -inf past its k.
    Found without sorting the row: its k-th largest logit (torch.topk), every token above it, and the first of
    the tokens equal to it. On the host, where reading values costs nothing, topk's own ids are taken when no row
    has a tie at its k-th value (the tie rule then has nothing to decide), skipping the rule's passes over the
    rows (32 x 32000, 2 cores: 4.5-7 -> ~1.5 ms)."""
    B, V = logits.shape
    dev, kmax = logits.device, max(k)
    kt = _per_row(list(k), B, dev, torch.long)
    past = torch.arange(kmax, device=dev) >= kt
    if dev.type == "cpu" and kmax < V:
        vals, ids = torch.topk(logits, kmax + 1, dim=-1)
        kth = vals.gather(1, kt - 1)
        if not (kth == vals.gather(1, kt)).any():
            ids = ids[:, :kmax].masked_fill(past, V).sort(-1).values.masked_fill(past, 0)  # ascending, own k first
            return logits.gather(1, ids).masked_fill(past, NEG_INF), ids
    else:
        kth = torch.topk(logits, kmax, dim=-1).values.gather(1, kt - 1)
    above = logits > kth
    tie = logits == kth
    keep = above | (tie & (tie.cumsum(-1) <= kt - above.sum(-1, keepdim=True)))
    # each kept token's place among the row's kept ones; the others all go to a spare column, dropped
    slot = torch.where(keep, keep.cumsum(-1) - 1, kmax)
    ids = torch.zeros(B, kmax + 1, dtype=torch.long, device=dev).scatter_(
        1, slot, torch.arange(V, device=dev).expand(B, V))[:, :kmax]
    return logits.gather(1, ids).masked_fill(past, NEG_INF), ids


ARGMAX_BLOCK = 128


def argmax_rows(logits: Tensor) -> Tensor:
    """logits.argmax(-1) of [B, V], the same ids (the first of equal maxima, the first NaN before any number). On
    the host by blocks: each block's maximum (a vectorised reduction), the first block holding the row's, then
    the first place in it that holds it; torch's own CPU argmax is a scalar loop, ~7x slower over 32 x 32000 (one
    thread: 0.85 -> 0.12 ms). Elsewhere torch's."""
    B, V = logits.shape
    n = V // ARGMAX_BLOCK * ARGMAX_BLOCK
    if logits.device.type != "cpu" or n == 0:
        return logits.argmax(-1)
    maxima = logits[:, :n].reshape(B, -1, ARGMAX_BLOCK).amax(-1)  # a NaN's block: NaN
    if n < V:
        maxima = torch.cat([maxima, logits[:, n:].amax(-1, keepdim=True)], dim=1)
    start = maxima.argmax(-1) * ARGMAX_BLOCK
    # the short last block's columns past V repeat its last one: they come after it, so never first
    cols = (start[:, None] + torch.arange(ARGMAX_BLOCK)).clamp_(max=V - 1)
    return start + logits.gather(1, cols).argmax(-1)


def sample(
    logits: Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | torch.Generator | None = None,
    history: Sequence[Sequence[int]] | None = None,
) -> Tensor:
    """Run the sampler chain on logits [B, V] and return the chosen token ids [B] (long).

    `history` (prompt + generated ids per row) feeds the penalties; without it they are skipped.
    `generators`: one per row (None entries / None = torch's global RNG).
    """
    logits = _check(logits)
    B, V = logits.shape
    rows = _rows(params, B)
    logits = _biased(logits, rows, history)
    if isinstance(generators, torch.Generator) or generators is None:
        gens = [generators] * B
    else:
        gens = list(generators)
        if len(gens) != B:
            raise ValueError(f"got {len(gens)} generators for a batch of {B}")

    rnd = [i for i, p in enumerate(rows) if not p.is_greedy]
    if not rnd:
        return argmax_rows(logits)
    idx = None if len(rnd) == B else host_tensor(rnd, logits.device, torch.long)
    sub = logits if idx is None else logits.index_select(0, idx)
    probs, ids = _probabilities(sub, [rows[i] for i in rnd])
    drawn = draw(probs, uniforms([gens[i] for i in rnd], probs.device))
    if ids is not None:  # a place among the candidates -> its token
        drawn = ids.gather(1, drawn[:, None])[:, 0]
    return drawn if idx is None else argmax_rows(logits).index_copy(0, idx, drawn)  # the greedy rows: argmax


def uniforms(generators: Sequence[torch.Generator | None], device: torch.device) -> Tensor:
    """One uniform number in [0, 1) (float64) per row, drawn from the row's generator (None: torch's global one),
    on `device`. A CPU generator draws on the host, so a seeded row makes the same draws on every device; the
    numbers then go to the device in one copy that does not wait for it (levante.transfer)."""
    if all(g is None or g.device.type == "cpu" for g in generators):
        u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])
        return to_device(u, device)
    return torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=g.device if g else "cpu").to(device)
                      for g in generators])


def draw(probs: Tensor, u: Tensor) -> Tensor:
    """One token per row of `probs` [B, V] (non-negative, not necessarily normalised) by inverse transform
    sampling at the uniforms `u` [B]: the first token whose cumulative probability exceeds u times the row's
    total, so token t has the chance probs[t] / total (a token of probability 0 is never drawn). All rows in a few
    batched ops with nothing read back, where a draw per row (torch.multinomial) launches its kernels row by
    row."""
    cdf = probs.cumsum(-1)
    total = cdf[:, -1:].contiguous()
    idx = torch.searchsorted(cdf, u[:, None] * total, right=True)
    # rounding can put u * total at the total (u just under 1): then the last token of positive probability, the
    # first to reach the total (the clamp: a row of NaN, from a broken model, still gets a token id)
    last = torch.searchsorted(cdf, total)
    return torch.minimum(idx, last)[:, 0].clamp_(0, probs.shape[1] - 1)


def distribution(
    logits: Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    history: Sequence[Sequence[int]] | None = None,
) -> Tensor:
    """The distribution `sample` draws from, float64 [B, V]: the whole chain (penalties, bias, filters,
    temperature, softmax); a greedy row is one-hot at its argmax. (Speculative decoding accepts and resamples
    against it.)"""
    logits = _check(logits)
    B, V = logits.shape
    rows = _rows(params, B)
    logits = _biased(logits, rows, history)
    probs = torch.zeros(B, V, dtype=torch.float64, device=logits.device)
    greedy = [i for i, p in enumerate(rows) if p.is_greedy]
    if greedy:
        g = host_tensor(greedy, logits.device, torch.long)
        probs[g, argmax_rows(logits[g])] = 1.0
    rnd = [i for i, p in enumerate(rows) if not p.is_greedy]
    if rnd:
        idx = host_tensor(rnd, logits.device, torch.long)
        sub, ids = _probabilities(logits[idx], [rows[i] for i in rnd])
        # the candidates' places past a row's own k hold token 0 at probability 0: added, not written over
        probs[idx] = sub if ids is None else torch.zeros_like(probs[idx]).scatter_add_(1, ids, sub)
    return probs


def greedy_choice(
    logits: Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    history: Sequence[Sequence[int]] | None = None,
) -> list[int]:
    """The token a greedy row picks: the argmax after penalties and logit bias (what `distribution` puts its
    one-hot at, without building it)."""
    logits = _check(logits)
    return argmax_rows(_biased(logits, _rows(params, logits.shape[0]), history)).tolist()


def token_logprobs(logits: Tensor, chosen, top_n: int = 0):
    """Log-probabilities from log_softmax of the raw (unfiltered, untempered) logits.

    logits [B, V] and chosen [B] -> (list of B floats, list of B lists of (id, logprob), best first).
    logits [V] and an int -> (float, list of (id, logprob)).
    """
    single = logits.ndim == 1
    lg = logits[None] if single else logits
    lp = torch.log_softmax(lg.float(), -1)
    ch = torch.as_tensor(chosen, device=lp.device, dtype=torch.long).reshape(-1)
    if ch.numel() != lp.shape[0]:
        raise ValueError(f"got {ch.numel()} chosen ids for a batch of {lp.shape[0]}")
    chosen_lp = lp.gather(1, ch[:, None])[:, 0].tolist()
    n = max(0, min(int(top_n or 0), lp.shape[1]))
    if n:
        vals, ids = lp.topk(n, dim=-1)
        tops = [list(zip(r_ids, r_vals)) for r_ids, r_vals in zip(ids.tolist(), vals.tolist())]
    else:
        tops = [[] for _ in range(lp.shape[0])]
    if single:
        return chosen_lp[0], tops[0]
    return chosen_lp, tops
