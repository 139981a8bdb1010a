"""Int8 weights with one symmetric scale per output row (the `load_in_8bit=True` format).

w[n, :] ~= q[n, :] * scale[n] with q in -127..127 and scale = max|w[n, :]| / 127. Storage is one
byte per weight plus one float32 per row (about a quarter of float32).

Matmul: for a few activation rows torch's `_weight_int8pack_mm` (float32 activations, exact
float32 accumulation of q * scale); for more rows it is slower than dequantizing, so the weight is
dequantized in float32 row tiles of at most TILE_BYTES and multiplied with F.linear.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import QuantWeight, tiled_linear

TILE_BYTES = 8 << 20
PACK_MAX_ROWS = 4  # activation rows up to which _weight_int8pack_mm beats dequantize + F.linear


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(q int8 [N, K], scale float32 [N]) with w ~= q * scale[:, None] (symmetric, per output row)."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


class Int8Weight(QuantWeight):
    """Per-output-channel symmetric int8 weight."""

    qtype = "INT8"

    def __init__(self, q: Tensor, scale: Tensor) -> None:
        if q.dtype != torch.int8 or q.ndim != 2:
            raise ValueError(f"Int8Weight needs a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
        super().__init__(q.shape[0], q.shape[1])
        self.register_buffer("q", q.contiguous(), persistent=False)
        self.register_buffer("scale", scale.to(torch.float32).reshape(-1).contiguous(), persistent=False)

    @classmethod
    def from_float(cls, w: Tensor) -> Int8Weight:
        return cls(*quantize_int8(w))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return (self.q.float() * self.scale[:, None]).to(dtype)

    def rows(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        flat = ids.reshape(-1).to(torch.long)
        w = self.q.index_select(0, flat).float() * self.scale.index_select(0, flat)[:, None]
        return w.to(dtype).reshape(*ids.shape, self.in_features)

    def _tile_rows(self) -> int:
        return max(1, min(self.out_features, TILE_BYTES // (4 * self.in_features)))

    def matmul(self, x: Tensor) -> Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k).to(torch.float32).contiguous()
        if x2.shape[0] <= PACK_MAX_ROWS and self.q.device.type == "cpu":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.q, self.scale)
        else:
            y = tiled_linear(x2, self.out_features, self._tile_rows(),
                             lambda s, e: self.q[s:e].float() * self.scale[s:e, None])
        return y.to(x.dtype).reshape(*lead, self.out_features)
