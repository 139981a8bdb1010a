"""Low-rank weights: W [out, in] stored as two factors, W ~= B @ A (FORMATS.md "Low-rank Mixtral checkpoints").

`A` [r, in] is the HF tensor `<name>.0.weight` (nn.Sequential's first Linear), `B` [out, r] is
`<name>.1.weight`. The product is never formed at inference: y = (x @ A^T) @ B^T costs r * (in + out)
multiply-adds per token instead of in * out.

Each factor is either a float tensor (HF / safetensors checkpoints) or itself a `QuantWeight` (a
low-rank GGUF made by `levante quantize`: A and B are separate GGML-quantized tensors, see
levante/quantize.py), in which case both matmuls run on the quantized factors.
"""

from __future__ import annotations

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
