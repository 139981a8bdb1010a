"""Low-rank weights: W [out, in] stored as two factors, W ~= B @ A (FORMATS.md "Low-rank Mixtral checkpoints").

`A` [r, in] is the HF tensor `<name>.0.weight` (nn.Sequential's first Linear), `B` [out, r] is
`<name>.1.weight`. The product is never formed at inference: y = (x @ A^T) @ B^T costs r * (in + out)
multiply-adds per token instead of in * out.

Each factor is either a float tensor (HF / safetensors checkpoints) or itself a `QuantWeight` (a
low-rank GGUF made by `levante quantize`: A and B are separate GGML-quantized tensors, see
levante/tools/quantize.py), in which case both matmuls run on the quantized factors.

The truncated-SVD library `levante compress` (levante/tools/compress.py) and the tests build factors with:
`factorize` (plain or activation-whitened SVD), `svd_factors`, and the greedy rank budget `choose_ranks`
(its rule is in the tool's docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import QuantWeight

Factor = Tensor | QuantWeight


def _shape(f: Factor) -> tuple[int, ...]:
    return tuple(int(s) for s in f.shape)


def _mm(w: Factor, x: Tensor) -> Tensor:
    """x @ w^T in x's dtype, for a float tensor or a QuantWeight factor."""
    if isinstance(w, QuantWeight):
        return w.matmul(x)
    if x.dtype != w.dtype:
        return F.linear(x.to(w.dtype), w).to(x.dtype)
    return F.linear(x, w)


def _float(w: Factor) -> Tensor:
    return w.dequantize(torch.float32) if isinstance(w, QuantWeight) else w.float()


class LowRankWeight(QuantWeight):
    qtype = "LOWRANK"

    def __init__(self, a: Factor, b: Factor, true_rank: int | None = None) -> None:
        sa, sb = _shape(a), _shape(b)
        if len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1]:
            raise ValueError(f"low-rank factors need A [r, in] and B [out, r], got {sa} and {sb}")
        super().__init__(sb[0], sa[1])
        # factors zero-padded along the rank (a quantized low-rank GGUF): the rank before padding
        self.true_rank = int(true_rank) if true_rank is not None else sa[0]
        for name, f in (("a", a), ("b", b)):
            if isinstance(f, QuantWeight):
                self.add_module(name, f)
            else:
                self.register_buffer(name, f, persistent=False)

    @property
    def rank(self) -> int:
        return _shape(self.a)[0]

    @property
    def n_params(self) -> int:
        return self.rank * (self.in_features + self.out_features)

    @property
    def quantized(self) -> bool:
        """True when the factors are QuantWeights (a low-rank GGUF), False for float tensors."""
        return isinstance(self.a, QuantWeight)

    def matmul(self, x: Tensor) -> Tensor:
        a, b = self.a, self.b
        if isinstance(a, Tensor) and isinstance(b, Tensor) and x.dtype != a.dtype:
            return F.linear(F.linear(x.to(a.dtype), a), b).to(x.dtype)
        return _mm(b, _mm(a, x))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (_float(self.b) @ _float(self.a)).to(dtype)

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """(A, B) as float tensors (quantized factors dequantized)."""
        return _float(self.a).to(dtype), _float(self.b).to(dtype)

    def to_dtype(self, dtype: torch.dtype) -> LowRankWeight:
        conv = [f if isinstance(f, QuantWeight) else f.to(dtype) for f in (self.a, self.b)]
        return LowRankWeight(*conv, true_rank=self.true_rank)

    def extra_repr(self) -> str:
        kinds = "/".join(f.qtype if isinstance(f, QuantWeight) else str(f.dtype).removeprefix("torch.")
                         for f in (self.a, self.b))
        return f"{self.qtype}, out={self.out_features}, in={self.in_features}, rank={self.rank}, factors={kinds}"


# ------------------------------------------------------------------------------- truncated SVD
@dataclass
class Factorization:
    """SVD of W (or of W L when whitened): W = U diag(s) Vh (L^-1)."""

    u: Tensor
    s: Tensor
    vh: Tensor
    chol: Tensor | None = None  # lower-triangular L (whitening), or None

    def factors(self, r: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        sq = self.s[:r].sqrt()
        a = sq[:, None] * self.vh[:r]
        if self.chol is not None:  # A = X L^-1  <=>  L^T A^T = X^T
            a = torch.linalg.solve_triangular(self.chol.T, a.T, upper=True).T
        b = self.u[:, :r] * sq[None, :]
        return a.to(dtype).contiguous(), b.to(dtype).contiguous()


def factorize(w: Tensor, cov: Tensor | None = None, damp: float = 0.01) -> Factorization:
    """SVD of W [out, in] in float64; with `cov` [in, in] (input covariance), of W whitened by chol(cov)."""
    w = w.double()
    if cov is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return Factorization(u, s, vh)
    c = cov.double()
    c = c + damp * c.diagonal().mean().clamp(min=1e-12) * torch.eye(c.shape[0], dtype=c.dtype)
    chol = torch.linalg.cholesky(c)
    u, s, vh = torch.linalg.svd(w @ chol, full_matrices=False)
    return Factorization(u, s, vh, chol)


def svd_factors(w: Tensor, r: int | None = None, cov: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Factors (A [r, in], B [out, r]) of the rank-r truncated SVD of W (full rank when r is None)."""
    f = factorize(w, cov)
    return f.factors(min(w.shape) if r is None else r, w.dtype if w.is_floating_point() else torch.float32)


def break_even_rank(out: int, inp: int) -> int:
    """Largest rank whose factors are not smaller than W: below it factoring saves parameters."""
    return out * inp // (out + inp)


def saved_params(shape: tuple[int, int], r: int | None) -> int:
    """Parameters removed by storing a [out, in] matrix at rank r (None: dense, nothing removed)."""
    if r is None:
        return 0
    out, inp = shape
    return max(0, out * inp - r * (out + inp))


def choose_ranks(svals: dict[str, Tensor], shapes: dict[str, tuple[int, int]], n_remove: int,
                 multiple: int = 1) -> dict[str, int]:
    """Greedy budget allocation (see module docstring). Returns {name: rank} for the matrices to factor;
    the others stay dense. Removes >= n_remove parameters (less only if even rank 0 everywhere cannot).

    `multiple` > 1: ranks are multiples of it (components are dropped in groups: from the full rank down
    to the largest multiple below it, then `multiple` at a time, cheapest mean energy per parameter
    first), e.g. 32 so that a quantized low-rank GGUF needs no rank padding (levante/tools/quantize.py)."""
    if multiple < 1:
        raise ValueError(f"rank multiple must be >= 1, got {multiple}")
    items = []
    for name, s in svals.items():
        out, inp = shapes[name]
        e = s.double() ** 2
        n = len(e)
        levels = [n, *range((n - 1) // multiple * multiple, -1, -multiple)]
        for hi, lo in zip(levels, levels[1:]):  # dropping components lo..hi-1 leaves rank lo
            items.append((e[lo:hi].sum().item() / ((hi - lo) * (out + inp)), name, -lo))
    items.sort()
    ranks = {name: len(s) for name, s in svals.items()}
    removed = 0
    for _, name, negk in items:
        if removed >= n_remove:
            break
        before = saved_params(shapes[name], ranks[name])
        ranks[name] = -negk  # drop component k: keep the k largest
        removed += saved_params(shapes[name], ranks[name]) - before
    return {n: r for n, r in ranks.items() if saved_params(shapes[n], r) > 0}
