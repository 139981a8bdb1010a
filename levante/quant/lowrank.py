"""Low-rank weights: W [out, in] stored as two factors, W ~= B @ A (FORMATS.md "Low-rank Mixtral checkpoints").

`A` [r, in] is the HF tensor `<name>.0.weight` (nn.Sequential's first Linear), `B` [out, r] is
`<name>.1.weight`. The product is never formed at inference: y = (x @ A^T) @ B^T costs r * (in + out)
multiply-adds per token instead of in * out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import QuantWeight


class LowRankWeight(QuantWeight):
    qtype = "LOWRANK"

    def __init__(self, a: Tensor, b: Tensor) -> None:
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"low-rank factors need A [r, in] and B [out, r], got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        super().__init__(b.shape[0], a.shape[1])
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("b", b, persistent=False)

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def n_params(self) -> int:
        return self.a.numel() + self.b.numel()

    def matmul(self, x: Tensor) -> Tensor:
        a, b = self.a, self.b
        if x.dtype != a.dtype:
            return F.linear(F.linear(x.to(a.dtype), a), b).to(x.dtype)
        return F.linear(F.linear(x, a), b)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.b.float() @ self.a.float()).to(dtype)

    def to_dtype(self, dtype: torch.dtype) -> LowRankWeight:
        return LowRankWeight(self.a.to(dtype), self.b.to(dtype))

    def extra_repr(self) -> str:
        return f"{self.qtype}, out={self.out_features}, in={self.in_features}, rank={self.rank}"
