"""The weight interface every storage format implements (vLLM's quantization-layer idea)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class QuantWeight(nn.Module):
    """A 2-D weight [out_features, in_features] in some storage format.

    Subclasses hold their packed data as buffers (so `.to(device)` moves them) and implement
    `matmul` (y = x @ W^T, computed in x's dtype) and `dequantize`. `rows` serves embedding
    lookups; the default dequantizes everything, formats override it to touch only the rows asked for.
    """

    qtype: str = "?"

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.out_features = int(out_features)
        self.in_features = int(in_features)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def matmul(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        raise NotImplementedError

    def rows(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        """Rows `ids` (any shape) of the dequantized weight, shape ids.shape + (in_features,)."""
        return F.embedding(ids, self.dequantize(dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.matmul(x)

    @property
    def n_params(self) -> int:
        """Parameters this weight stores (out * in; factorised formats override)."""
        return self.out_features * self.in_features

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"{self.qtype}, out={self.out_features}, in={self.in_features}"


class DenseWeight(QuantWeight):
    """A plain float tensor (F32 / F16 / BF16), stored in the model's compute dtype."""

    def __init__(self, weight: Tensor) -> None:
        if weight.ndim != 2:
            raise ValueError(f"DenseWeight needs a 2-D tensor, got shape {tuple(weight.shape)}")
        super().__init__(weight.shape[0], weight.shape[1])
        self.register_buffer("weight", weight, persistent=False)
        self.qtype = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}.get(
            weight.dtype, str(weight.dtype)
        )

    def matmul(self, x: Tensor) -> Tensor:
        w = self.weight
        if x.dtype != w.dtype:
            return F.linear(x.to(w.dtype), w).to(x.dtype)
        return F.linear(x, w)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self.weight.to(dtype)

    def rows(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        return F.embedding(ids, self.weight).to(dtype)


def tiled_linear(x: Tensor, out_features: int, tile_rows: int, weight_rows: Callable[[int, int], Tensor]) -> Tensor:
    """x @ W.T, with W materialised `tile_rows` rows at a time by `weight_rows(start, end)`.

    The shared fallback of the packed formats: transient memory stays at one tile, never the whole
    float weight.
    """
    if tile_rows >= out_features:
        return F.linear(x, weight_rows(0, out_features))
    y = x.new_empty(*x.shape[:-1], out_features)
    for s in range(0, out_features, tile_rows):
        e = min(s + tile_rows, out_features)
        y[..., s:e] = F.linear(x, weight_rows(s, e))
    return y


def as_weight(w: Tensor | QuantWeight, dtype: torch.dtype) -> QuantWeight:
    """Wrap a float tensor as a DenseWeight in `dtype`; quantized weights pass through unchanged."""
    if isinstance(w, QuantWeight):
        return w
    return DenseWeight(w.to(dtype))
