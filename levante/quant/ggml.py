"""GGML block quantization (the tensor types of GGUF files), dequantized with vectorised torch.

Every dequantizer takes a uint8 tensor of raw blocks, shape [rows, bytes_per_row] (or any shape
whose last dim is a whole number of blocks), and returns float32 [rows, cols]. Each one follows the
arithmetic order of `gguf.quants` (the numpy reference) so results are bit-identical: f16 scales
are converted to f32 first, then the same multiplies / adds in the same order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..errors import UnsupportedQuantError, WeightsError
from .base import QuantWeight, tiled_linear

QK_K = 256

# ------------------------------------------------------------------------------------- helpers


def _f16(b: Tensor) -> Tensor:
    """[n, 2] uint8 (little-endian f16) -> [n, 1] float32."""
    return b.contiguous().view(torch.float16).float()


def _shifts(values: list[int], shape: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=device).view(shape)


def _nibbles(qs: Tensor, groups: int, width: int) -> Tensor:
    """qs [n, groups*width] -> [n, groups*2*width]: per group, low nibbles then high nibbles."""
    n = qs.shape[0]
    q = qs.reshape(n, groups, 1, width) >> _shifts([0, 4], (1, 1, 2, 1), qs.device)
    return (q & 0x0F).reshape(n, groups * 2 * width)


def _bits(b: Tensor, groups: int, width: int, nbits: int) -> Tensor:
    """b [n, groups*width] -> [n, groups*(8/nbits)*width]: fields of `nbits` bits, low first."""
    n = b.shape[0]
    per = 8 // nbits
    sh = _shifts(list(range(0, 8, nbits)), (1, 1, per, 1), b.device)
    q = b.reshape(n, groups, 1, width) >> sh
    return (q & ((1 << nbits) - 1)).reshape(n, groups * per * width)


# ------------------------------------------------------------------------------ per-type kernels
# Each takes blocks [n_blocks, type_size] uint8 and returns [n_blocks, block_size] float32.


def _deq_f32(blocks: Tensor) -> Tensor:
    return blocks.contiguous().view(torch.float32).clone()


def _deq_f16(blocks: Tensor) -> Tensor:
    return blocks.contiguous().view(torch.float16).float()


def _deq_bf16(blocks: Tensor) -> Tensor:
    return (blocks.contiguous().view(torch.int16).to(torch.int32) << 16).view(torch.float32)


def _deq_q4_0(blocks: Tensor) -> Tensor:
    d = _f16(blocks[:, :2])
    q = _nibbles(blocks[:, 2:], 1, 16).to(torch.int8) - 8
    return d * q.float()


def _deq_q4_1(blocks: Tensor) -> Tensor:
    d = _f16(blocks[:, :2])
    m = _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 4:], 1, 16).float()
    return (d * q) + m


def _q5_values(qh: Tensor, qs: Tensor) -> Tensor:
    # qh: 4 bytes = one little-endian u32 whose bit i is the 5th bit of element i.
    n = qh.shape[0]
    # _bits orders the result (bit, byte); element i is bit i%8 of byte i//8, i.e. (byte, bit).
    hi = _bits(qh, 1, 4, 1)
    hi = hi.reshape(n, 8, 4).transpose(1, 2).reshape(n, 32)
    lo = _nibbles(qs, 1, 16)
    return lo | (hi << 4)


def _deq_q5_0(blocks: Tensor) -> Tensor:
    d = _f16(blocks[:, :2])
    q = _q5_values(blocks[:, 2:6], blocks[:, 6:]).to(torch.int8) - 16
    return d * q.float()


def _deq_q5_1(blocks: Tensor) -> Tensor:
    d = _f16(blocks[:, :2])
    m = _f16(blocks[:, 2:4])
    q = _q5_values(blocks[:, 4:8], blocks[:, 8:]).float()
    return (d * q) + m


def _deq_q8_0(blocks: Tensor) -> Tensor:
    d = _f16(blocks[:, :2])
    x = blocks[:, 2:].view(torch.int8).float()
    return x * d


def _deq_q2_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    scales = blocks[:, :16]
    qs = blocks[:, 16:80]
    d = _f16(blocks[:, 80:82])
    dmin = _f16(blocks[:, 82:84])
    dl = (d * (scales & 0xF).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs, 2, 32, 2).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _deq_q3_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    hmask = blocks[:, :32]
    qs = blocks[:, 32:96]
    sc = blocks[:, 96:108]
    d = _f16(blocks[:, 108:110])
    lsc = _nibbles(sc[:, :8], 1, 8)  # [n, 16]: low nibbles of bytes 0-7, then high nibbles
    hsc = _bits(sc[:, 8:12], 1, 4, 2)  # [n, 16]: 2-bit fields, (shift, byte) order
    scales = (lsc | (hsc << 4)).to(torch.int8) - 32
    dl = (d * scales.float()).reshape(n, 16, 1)
    ql = _bits(qs, 2, 32, 2).reshape(n, 16, 16)
    qh = _bits(hmask, 1, 32, 1).reshape(n, 16, 16) ^ 1
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _k_scale_min(s: Tensor) -> tuple[Tensor, Tensor]:
    """The 12-byte packed 6-bit scales and mins of Q4_K / Q5_K -> ([n, 8], [n, 8]) uint8."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_dd_dm(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K / Q5_K: d * scale and dmin * min of the 8 sub-blocks, shape [n, 8, 1] each."""
    n = blocks.shape[0]
    sc, mn = _k_scale_min(blocks[:, 4:16])
    dd = (_f16(blocks[:, 0:2]) * sc.float()).reshape(n, 8, 1)
    dm = (_f16(blocks[:, 2:4]) * mn.float()).reshape(n, 8, 1)
    return dd, dm


def _deq_q4_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    dd, dm = _k_dd_dm(blocks)
    q = _nibbles(blocks[:, 16:144], 4, 32).reshape(n, 8, 32).float()
    return (dd * q - dm).reshape(n, QK_K)


def _deq_q5_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    dd, dm = _k_dd_dm(blocks)
    ql = _nibbles(blocks[:, 48:176], 4, 32)
    qh = _bits(blocks[:, 16:48], 1, 32, 1)
    q = (ql | (qh << 4)).reshape(n, 8, 32).float()
    return (dd * q - dm).reshape(n, QK_K)


def _deq_q6_k(blocks: Tensor) -> Tensor:
    n = blocks.shape[0]
    ql = _nibbles(blocks[:, 0:128], 2, 64)
    qh = _bits(blocks[:, 128:192], 2, 32, 2)
    scales = blocks[:, 192:208].view(torch.int8).float()
    d = _f16(blocks[:, 208:210])
    dd = (d * scales).reshape(n, 16, 1)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (dd * q).reshape(n, QK_K)


# name -> (elements per block, bytes per block, kernel)
GGML_TYPES: dict[str, tuple[int, int, Callable[[Tensor], Tensor]]] = {
    "F32": (1, 4, _deq_f32),
    "F16": (1, 2, _deq_f16),
    "BF16": (1, 2, _deq_bf16),
    "Q4_0": (32, 18, _deq_q4_0),
    "Q4_1": (32, 20, _deq_q4_1),
    "Q5_0": (32, 22, _deq_q5_0),
    "Q5_1": (32, 24, _deq_q5_1),
    "Q8_0": (32, 34, _deq_q8_0),
    "Q2_K": (256, 84, _deq_q2_k),
    "Q3_K": (256, 110, _deq_q3_k),
    "Q4_K": (256, 144, _deq_q4_k),
    "Q5_K": (256, 176, _deq_q5_k),
    "Q6_K": (256, 210, _deq_q6_k),
}
SUPPORTED_TYPES = tuple(GGML_TYPES)
FLOAT_TYPES = ("F32", "F16", "BF16")


def check_qtype(qtype: str, name: str = "?") -> tuple[int, int]:
    """(block_size, type_size) of a supported type; UnsupportedQuantError otherwise."""
    if qtype not in GGML_TYPES:
        raise UnsupportedQuantError(
            f"tensor {name}: unsupported quant type {qtype}, supported: {', '.join(SUPPORTED_TYPES)}"
        )
    bs, ts, _ = GGML_TYPES[qtype]
    return bs, ts


def row_bytes(qtype: str, cols: int, name: str = "?") -> int:
    """Bytes of one row of `cols` elements; WeightsError when cols is not a whole number of blocks."""
    bs, ts = check_qtype(qtype, name)
    if cols % bs:
        raise WeightsError(f"tensor {name}: row length {cols} is not a multiple of the {qtype} block size {bs}")
    return cols // bs * ts


def dequantize(data: Tensor, qtype: str) -> Tensor:
    """Raw blocks uint8 [..., bytes_per_row] -> float32 [..., cols] (bit-exact with gguf.quants)."""
    bs, ts = check_qtype(qtype)
    if data.dtype != torch.uint8:
        raise TypeError(f"dequantize expects uint8 block data, got {data.dtype}")
    nbytes = data.shape[-1]
    if nbytes % ts:
        raise WeightsError(f"{qtype}: {nbytes} bytes per row is not a multiple of the block size {ts}")
    lead = data.shape[:-1]
    blocks = data.reshape(-1, ts)
    if blocks.shape[0] == 0:
        return torch.empty(*lead, nbytes // ts * bs, dtype=torch.float32, device=data.device)
    out = GGML_TYPES[qtype][2](blocks)
    return out.reshape(*lead, nbytes // ts * bs)


# ----------------------------------------------------------------------------------- the weight


class GGMLWeight(QuantWeight):
    """A 2-D weight stored as GGML blocks: `data` is uint8 [out_features, bytes_per_row].

    `data` may be a zero-copy view of a memory-mapped GGUF file. matmul dequantizes a chunk of
    rows at a time (transient memory ~ `chunk_bytes`) and applies F.linear per chunk.
    """

    chunk_bytes = 16 << 20  # float32 bytes of dequantized weight per matmul chunk

    def __init__(self, data: Tensor, qtype: str, shape: tuple[int, int], name: str = "?") -> None:
        out_f, in_f = int(shape[0]), int(shape[1])
        super().__init__(out_f, in_f)
        rb = row_bytes(qtype, in_f, name)
        if data.dtype != torch.uint8 or tuple(data.shape) != (out_f, rb):
            raise WeightsError(
                f"tensor {name}: {qtype} data has shape {tuple(data.shape)} {data.dtype}, "
                f"expected ({out_f}, {rb}) uint8 for a [{out_f}, {in_f}] weight"
            )
        self.qtype = qtype
        self.name = name
        self.register_buffer("data", data, persistent=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.data, self.qtype).to(dtype)

    def rows(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        flat = ids.reshape(-1).to(torch.long)
        sel = self.data.index_select(0, flat)
        return dequantize(sel, self.qtype).to(dtype).reshape(*ids.shape, self.in_features)

    def _chunk_rows(self) -> int:
        return max(1, min(self.out_features, self.chunk_bytes // (4 * max(1, self.in_features))))

    def matmul(self, x: Tensor) -> Tensor:
        return tiled_linear(x, self.out_features, self._chunk_rows(),
                            lambda s, e: dequantize(self.data[s:e], self.qtype).to(x.dtype))
