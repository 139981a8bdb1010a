"""Fast CPU matmul for GGML block-quantized weights, exact w.r.t. the GGML dequantization.

Measured on a 2-core AVX-512 EPYC (see benchmarks/README.md): torch's packed int4 / int8 ops
(`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`) are only fast with bf16 activations and
bf16 scales, which cannot hold GGML's f16 scales (11-bit significand) exactly; their float32 path
is a slow reference loop (20-100x slower than F.linear). So the fast exact path is our own:

* decode / small batches (rows of x <= `gemv_max_rows(qtype)`): a C++ kernel (levante/csrc, built and
  loaded by `levante.quant.extension`) that reads the raw GGML blocks,
  dequantizes them with AVX-512 using the reference arithmetic (bit-identical to
  `gguf.quants.dequantize`) and accumulates float32 FMAs: for one row of x the weights go from
  registers into the accumulators, for 2-8 rows through a 256-float L1 buffer; threads
  (at::parallel_for, torch's thread count) split the output rows. On CPUs with AVX512_BF16 the
  main types (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) use faster integer paths instead, with x rounded
  once per call to int16 (error <= 2^-16 of its block's largest |x|; llama.cpp uses int8):
  Q4_0 / Q4_1 per 32-block: the codes q - 8 are int16 and vpdpwssd sums exact integer products for
  two blocks per register (lanes 0-7 block a, 8-15 block b), so one scale vector and one FMA serve
  both blocks (measured 1.3x / 1.1x faster at one thread than the bf16-split kernel before it).
  Q4_0, Q4_K, Q5_K, Q6_K and Q8_0 weights with a multiple of 16 rows are regrouped once at load
  (`Grouped16Weight`: per 16 rows and column block, the 16 rows' GGML blocks moved so that one int32
  lane holds one row; the same bytes): one instruction then works on 16 rows at once, and a block's
  scales are one vector for the 16 rows (the K types: their sub-block scales applied in f32 per 16
  rows instead of a `vpmullw` per row and 32 codes). Q4_0 / Q4_K codes are bytes read with `vpdpbusd`
  against x's int16 in two bytes; Q5_K / Q6_K / Q8_0 codes are int16 pairs read with `vpdpwssd`.
  1.3-2x the per-row kernels at one thread (benchmarks/grouped16.py); every number of rows of x
  (prefill too: 1, 2 or 4 rows of x per pass over a group, 1.7-4x dequantized tiles + MKL). The GGUF
  reader then releases the mapped pages of the regrouped tensors, so the weights are in memory once.
  The per-row kernels serve the other types and row counts:
  Q4_K / Q5_K / Q6_K per 256-block: each code times its sub-block's integer scale is an int16, so
  vpdpwssd sums a whole superblock exactly in int32 and one FMA applies d * dx. Q8_0 keeps f32
  products with the scale per block.
  At m == 1 Q4_0 / Q4_1 read 4 weight rows per pass; that group is prefetched linearly in
  software 8 KiB ahead (the hardware prefetcher follows 4 interleaved row streams badly: 2.5x slower
  from DRAM without it). Typical output error ~1e-5 of sum |x||w|; a block holding one huge
  channel next to tiny ones loses the tiny ones (adversarial test, 200x channels: worst seen 7e-4 at
  k >= 576, 1.6e-3 at k = 96 where a row has only 3 blocks).
  `fused_matmul` runs several weights that share x (q/k/v, gate/up) in one such call.
* prefill (more rows): dequantize row tiles (C++ or torch) to float32 and run MKL's F.linear per tile,
  so transient memory stays bounded by `TILE_BYTES` — except the 16-row groups, whose integer kernels
  beat that at any number of rows and so run prefill too.

Every weight value used is exactly the GGML float32 dequantization (no second rounding of
weights); only the summation order differs from `x @ W.T` (plus, on the small-batch paths, x's
rounding to ~16 bits and the scales applied per block). When the compiler or the build is not
available everything falls back to the pure-torch dequantizers of `levante.quant.ggml` (slower,
same numbers).

`int4pack_from_ggml` converts Q4_0 / Q4_1 / Q4_K to torch's int4pack layout (w = (q - 8)·s + z,
scales_and_zeros [K/32, N, 2]) for callers that accept bf16 activations; `Int4PackWeight` wraps it.
It is not chosen by `fast_weight` because it is not exact (see benchmarks/README.md).
"""

from __future__ import annotations

import sys
import threading
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .base import QuantWeight, tiled_linear
from .extension import extension

# type name -> (type id in the C++ code, elements per block, bytes per block)
QTYPES: dict[str, tuple[int, int, int]] = {
    "Q4_0": (0, 32, 18),
    "Q4_1": (1, 32, 20),
    "Q5_0": (2, 32, 22),
    "Q5_1": (3, 32, 24),
    "Q8_0": (4, 32, 34),
    "Q2_K": (5, 256, 84),
    "Q3_K": (6, 256, 110),
    "Q4_K": (7, 256, 144),
    "Q5_K": (8, 256, 176),
    "Q6_K": (9, 256, 210),
}

GEMV_MAX_ROWS = 64  # x rows up to which the C++ kernel beats tile-dequant + MKL (measured: 2-8x at 8-32 rows,
# ~1.2-2x at 64, MKL ahead from 128; benchmarks/README.md); same constant as GEMV_MAX in the C++ code
# Types without the bf16 kernel (Q5_0, Q5_1, Q2_K, Q3_K; every type on CPUs without AVX512_BF16) run a
# dequantize-256 + FMA loop per row of x, which tile dequant + MKL overtakes from ~32 rows (Q5_0 4096x4096,
# 2 threads, ms gemv / tile: m=32 12.6 / 13.3, m=64 29.5 / 18.2).
GENERIC_GEMV_MAX_ROWS = 32
BF16_PATH_TYPES = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")  # bf_type() in the C++ code
TILE_BYTES = 32 << 20  # float32 bytes of dequantized weight per prefill tile

def gemv_max_rows(qtype: str, ext) -> int:
    """Rows of x up to which `ext.gemv` is used for weights of `qtype` (else tile dequant + F.linear)."""
    if ext is not None and qtype in BF16_PATH_TYPES and ext.decode_ops():
        return GEMV_MAX_ROWS
    return GENERIC_GEMV_MAX_ROWS


# ------------------------------------------------------------------------------- dequantization


def _as_u8_tensor(raw) -> Tensor:
    if isinstance(raw, np.ndarray):
        with warnings.catch_warnings():  # read-only memory maps are fine: we never write to them
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(np.ascontiguousarray(raw))
    if raw.dtype != torch.uint8:
        raise TypeError(f"raw GGML data must be uint8, got {raw.dtype}")
    return raw


def dequantize_raw(raw: Tensor, qtype: str, in_features: int) -> Tensor:
    """Raw blocks uint8 [rows, bytes_per_row] -> float32 [rows, in_features], bit-exact with gguf."""
    raw = _as_u8_tensor(raw)
    ext = extension()
    if ext is not None and qtype in QTYPES and raw.device.type == "cpu" and raw.shape[0] > 0:
        return ext.dequant(raw.contiguous(), QTYPES[qtype][0], int(in_features))
    from .ggml import dequantize

    return dequantize(raw, qtype).reshape(raw.shape[0], in_features)


def _row_bytes(qtype: str, in_features: int) -> int:
    _, bs, ts = QTYPES[qtype]
    if in_features % bs:
        raise ValueError(f"{qtype}: in_features {in_features} is not a multiple of the block size {bs}")
    return in_features // bs * ts


# --------------------------------------------------------------------------------- weight classes


class GGMLKernelWeight(QuantWeight):
    """GGML blocks kept as-is (uint8 [out, bytes_per_row]); fused C++ matmul, exact dequantization.

    x rows <= `gemv_max_rows(qtype)`: the fused C++ kernel (weights dequantized 256 at a time in L1).
    More rows: float32 row tiles of at most TILE_BYTES, then F.linear (MKL) per tile.
    Any x dtype is accepted; the arithmetic is float32 and the result is cast back to x.dtype.
    """

    def __init__(self, raw: Tensor, qtype: str, out_features: int, in_features: int) -> None:
        super().__init__(out_features, in_features)
        if qtype not in QTYPES:
            raise ValueError(f"unsupported GGML type {qtype}; supported: {', '.join(QTYPES)}")
        raw = _as_u8_tensor(raw)
        rb = _row_bytes(qtype, in_features)
        if tuple(raw.shape) != (out_features, rb):
            raw = raw.reshape(out_features, rb)
        self.qtype = qtype
        self.kernel_id = QTYPES[qtype][0]  # the C++ code's type id
        self.register_buffer("data", raw.contiguous(), persistent=False)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_raw(self.data, self.qtype, self.in_features).to(dtype)

    def rows(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        sel = self.data.index_select(0, ids.reshape(-1).to(torch.long))
        return dequantize_raw(sel, self.qtype, self.in_features).to(dtype).reshape(*ids.shape, self.in_features)

    def _tile_rows(self) -> int:
        return max(1, min(self.out_features, TILE_BYTES // (4 * self.in_features)))

    def _kernel_max_rows(self, ext) -> int:
        """Rows of x up to which the C++ kernel runs (above: dequantized tiles + MKL)."""
        return gemv_max_rows(self.qtype, ext)

    def matmul(self, x: Tensor) -> Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k).to(torch.float32).contiguous()
        ext = extension() if self.data.device.type == "cpu" else None
        if ext is not None and x2.shape[0] <= self._kernel_max_rows(ext):
            y = ext.gemv(self.data, self.kernel_id, self.in_features, x2)
        else:
            rows = self._tile_rows()
            if ext is not None:
                # tiles are dequantized into one reused buffer: a fresh 10-30 MB tensor per call would be
                # fresh pages for the kernel to fault in and zero (~4 % of a MoE prefill, measured)
                buf = _tile_buffer(rows * self.in_features)
                tile = lambda s, e: ext.dequant_into(self.data[s:e], self.kernel_id, self.in_features, buf)  # noqa: E731
            else:
                tile = lambda s, e: dequantize_raw(self.data[s:e], self.qtype, self.in_features)  # noqa: E731
            y = tiled_linear(x2, self.out_features, rows, tile)
        return y.to(x.dtype).reshape(*lead, self.out_features)


# GGML type -> id of its 16-row group layout in the C++ code (`regroup` there)
GROUPED_IDS: dict[str, int] = {"Q4_0": 10, "Q4_K": 11, "Q6_K": 12, "Q5_K": 13, "Q8_0": 14, "Q4_1": 15}


class Grouped16Weight(GGMLKernelWeight):
    """Q4_0 / Q4_1 / Q4_K / Q5_K / Q6_K / Q8_0 in levante's 16-row group layouts (`regroup` in the C++ code): per
    16 rows and column block, the 16 rows' GGML blocks moved so that one int32 lane holds one row, so the
    GEMV works on 16 rows at once (vpdpbusd / vpdpwssd with broadcast x) and a block's scales are one
    vector for the 16 rows: 1.8-2.8x the per-row kernels at one thread (benchmarks/grouped16.py), and
    ahead of tile dequant + MKL at every batch size. The same bytes, moved once at load: data is uint8
    [out / 16, 16 * row bytes]. Values, `dequantize` and `rows` are exactly the GGML type's; moving the
    weight off the CPU turns it back into a GGMLKernelWeight of GGML blocks.
    """

    def __init__(self, raw: Tensor, qtype: str, out_features: int, in_features: int) -> None:
        super().__init__(raw, qtype, out_features, in_features)
        if qtype not in GROUPED_IDS:
            raise ValueError(f"no 16-row group layout for {qtype}; have: {', '.join(GROUPED_IDS)}")
        if out_features % 16:
            raise ValueError(f"{qtype}x16 needs out_features divisible by 16, got {out_features}")
        self.kernel_id = GROUPED_IDS[qtype]
        self.data = extension().regroup_rows(self.data, self.kernel_id, in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return extension().dequant(self.data, self.kernel_id, self.in_features).to(dtype)

    def rows(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        out = extension().grouped_rows(self.data, self.kernel_id, self.in_features, ids)
        return out.to(dtype).reshape(*ids.shape, self.in_features)

    def _kernel_max_rows(self, ext) -> int:
        # the 16-row kernels at any number of rows of x: they beat tile dequant + MKL even at 128-512 rows
        # (2 threads, 3584x1024 and 1024x3584; benchmarks/README.md), so prefill uses them too
        return sys.maxsize

    def ggml_blocks(self) -> Tensor:
        """The weight as GGML blocks of its type, uint8 [out, row bytes]."""
        return extension().ungroup_rows(self.data.cpu(), self.kernel_id, self.in_features)

    def _apply(self, fn, recurse=True):
        if fn(torch.empty(0)).device.type != "cpu":  # off the CPU: back to GGML blocks and the generic class
            self.data = self.ggml_blocks()
            self.kernel_id = QTYPES[self.qtype][0]
            self.__class__ = GGMLKernelWeight
            return GGMLKernelWeight._apply(self, fn, recurse)
        return super()._apply(fn, recurse)


_SCRATCH = threading.local()


def _tile_buffer(numel: int) -> Tensor:
    """This thread's reusable float32 buffer for dequantized weight tiles (at least `numel` elements)."""
    buf = getattr(_SCRATCH, "buf", None)
    if buf is None or buf.numel() < numel:
        buf = torch.empty(max(numel, TILE_BYTES // 4), dtype=torch.float32)
        _SCRATCH.buf = buf
    return buf


def fused_matmul(weights, x: Tensor, cat: bool = False) -> list[Tensor] | Tensor:
    """[w(x) for w in weights] for weights that share x (q/k/v, gate/up), in one C++ call when possible.

    When every weight is a CPU `GGMLKernelWeight` with in_features == x.shape[-1] and x has at most
    `gemv_max_rows` rows, one `gemv_multi` call prepares x once and runs one parallel region over the
    rows of all weights; otherwise each weight's own `matmul` (or `__call__` for other modules) is
    used, so callers can use it unconditionally. Results have x's dtype and shape [..., out_i]
    (with `cat`: one tensor [..., sum out_i]).
    """
    weights = list(weights)
    if not weights:
        return []
    lead, k = x.shape[:-1], x.shape[-1]
    ext = extension()
    if (
        ext is not None
        and x.device.type == "cpu"
        and all(isinstance(w, GGMLKernelWeight) and w.data.device.type == "cpu" and w.in_features == k for w in weights)
    ):
        x2 = x.reshape(-1, k).to(torch.float32).contiguous()
        if 0 < x2.shape[0] <= min(gemv_max_rows(w.qtype, ext) for w in weights):
            y = ext.gemv_multi([w.data for w in weights], [w.kernel_id for w in weights], k, x2)
            if cat:
                return y.to(x.dtype).reshape(*lead, y.shape[1])
            parts = torch.split(y, [w.out_features for w in weights], dim=1)
            return [p.to(x.dtype).reshape(*lead, p.shape[1]) for p in parts]
    ys = [w(x) for w in weights]  # module calls, so forward hooks (e.g. calibration) still see them
    return torch.cat(ys, dim=-1) if cat else ys


def decode_ext():
    """The extension when its fused decode-step ops (rmsnorm, attn_decode, ffn_decode) are built, else None."""
    ext = extension()
    return ext if ext is not None and ext.decode_ops() else None


def ggml_raw(weights) -> tuple[list[Tensor], list[int]] | None:
    """(raw blocks, type ids) of `weights` for the fused decode ops; None unless all are CPU GGML weights."""
    raws, qts = [], []
    for w in weights:
        if not isinstance(w, GGMLKernelWeight) or w.data.device.type != "cpu":
            return None
        raws.append(w.data)
        qts.append(w.kernel_id)
    return raws, qts


def ffn_raw(mlps) -> tuple[list[Tensor], list[int]] | None:
    """`ggml_raw` of [w1, w3, w2] per MLP, the order `ffn_decode` takes."""
    return ggml_raw(w for mlp in mlps for w in (mlp.w1, mlp.w3, mlp.w2))


# ----------------------------------------------------------------------------- int4pack (lossy)

INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def int4_codes_from_ggml(raw: Tensor, qtype: str, in_features: int) -> tuple[Tensor, Tensor, Tensor]:
    """(q uint8 [N, K] in 0..15, scale f32 [N, K/32], zero f32 [N, K/32]) with w = (q - 8)·scale + zero.

    Q4_0: scale = d, zero = 0. Q4_1: scale = d, zero = m + 8d. Q4_K: scale = d·sc, zero = 8·d·sc − dmin·m
    (per 32-element sub-block). In float32 these scales are exact; the zero is exact unless its terms
    differ by more than 2^24 in magnitude (counted by `int4_exactness`).
    """
    raw = _as_u8_tensor(raw).reshape(raw.shape[0], -1)
    n = raw.shape[0]
    if qtype in ("Q4_0", "Q4_1"):
        ts = QTYPES[qtype][2]
        b = raw.reshape(n, -1, ts)
        d = b[..., 0:2].contiguous().view(torch.float16).float()[..., 0]
        qs = b[..., ts - 16 :]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).reshape(n, in_features)
        if qtype == "Q4_0":
            return q, d, torch.zeros_like(d)
        m = b[..., 2:4].contiguous().view(torch.float16).float()[..., 0]
        return q, d, m + 8 * d
    if qtype == "Q4_K":
        b = raw.reshape(n, -1, 144)
        nb = b.shape[1]
        d = b[..., 0:2].contiguous().view(torch.float16).float()
        dmin = b[..., 2:4].contiguous().view(torch.float16).float()
        s = b[..., 4:16]
        lo, mi, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
        sc = torch.cat([lo & 0x3F, (hi & 0x0F) | ((lo >> 2) & 0x30)], dim=-1).float()
        mn = torch.cat([mi & 0x3F, (hi >> 4) | ((mi >> 2) & 0x30)], dim=-1).float()
        dd = d * sc
        dm = dmin * mn
        qs = b[..., 16:].reshape(n, nb, 4, 1, 32)
        q = torch.cat([qs & 0x0F, qs >> 4], dim=3).reshape(n, in_features)
        return q, dd.reshape(n, -1), (8 * dd - dm).reshape(n, -1)
    raise ValueError(f"{qtype} has no int4 form; int4 types: {INT4_TYPES}")


def int4pack_from_ggml(raw: Tensor, qtype: str, in_features: int, dtype: torch.dtype = torch.bfloat16):
    """(packed uint8 [N', K/2], scales_and_zeros [K/32, N', 2] in `dtype`) for _weight_int4pack_mm_for_cpu.

    N' is N rounded up to a multiple of 16 (the op's requirement); the extra rows are zero."""
    q, s, z = int4_codes_from_ggml(raw, qtype, in_features)
    pad = -q.shape[0] % 16  # the op needs N divisible by 16: pad with zero rows (sliced off by the caller)
    if pad:
        q = F.pad(q, (0, 0, 0, pad), value=8)
        s, z = F.pad(s, (0, 0, 0, pad)), F.pad(z, (0, 0, 0, pad))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    sz = torch.stack([s.T, z.T], dim=-1).to(dtype).contiguous()
    return packed, sz


class Int4PackWeight(QuantWeight):
    """Q4_0 / Q4_1 / Q4_K through torch's int4pack op with bf16 activations and bf16 scales.

    Fast for prefill and decode, but NOT exact: bf16 scales keep 8 of the 11 significant bits of
    GGML's f16 d (relative weight error up to 2^-9), and activations are rounded to bf16.
    """

    def __init__(self, raw: Tensor, qtype: str, out_features: int, in_features: int) -> None:
        super().__init__(out_features, in_features)
        if in_features % 32:
            raise ValueError("int4pack needs in_features divisible by 32")
        packed, sz = int4pack_from_ggml(raw, qtype, in_features, torch.bfloat16)
        self.qtype = qtype
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_zeros", sz, persistent=False)

    def matmul(self, x: Tensor) -> Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, k).to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, 32, self.scales_zeros)
        return y[:, : self.out_features].to(x.dtype).reshape(*lead, self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, 32, self.scales_zeros)
        return w[:, : self.out_features].T.contiguous().to(dtype)


def int4_exactness(raw: Tensor, qtype: str, in_features: int, dtype: torch.dtype = torch.float32) -> dict:
    """Compare (q - 8)·s + z with scales/zeros stored in `dtype` against the exact GGML values."""
    q, s, z = int4_codes_from_ggml(raw, qtype, in_features)
    ref = dequantize_raw(raw, qtype, in_features).double()
    s2 = s.to(dtype).double().repeat_interleave(32, dim=1)
    z2 = z.to(dtype).double().repeat_interleave(32, dim=1)
    w = ((q.double() - 8) * s2 + z2).float().double()  # one f32 rounding, as an fma in f32 does
    diff = (w - ref).abs()
    ulp = torch.finfo(torch.float32).eps * ref.abs().clamp_min(torch.finfo(torch.float32).tiny)
    return {
        "exact_fraction": float((diff == 0).double().mean()),
        "max_ulps": float((diff / ulp).max()),
        "max_rel": float((diff / ref.abs().clamp_min(1e-30)).max()),
        "rel_norm": float(diff.norm() / ref.norm().clamp_min(1e-30)),
    }


# -------------------------------------------------------------------------------------- factory


def fast_weight(raw_u8: Tensor, qtype: str, out_features: int, in_features: int) -> QuantWeight:
    """The fastest exact weight for GGML `qtype` (all of QTYPES use the fused kernel / tile path; Q4_0, Q4_K
    and Q6_K are regrouped in 16-row groups where the AVX512_BF16 kernels are built and out_features allows)."""
    if (
        qtype in GROUPED_IDS
        and out_features % 16 == 0
        and out_features > 0
        and in_features >= 64
        and decode_ext()
    ):
        return Grouped16Weight(raw_u8, qtype, out_features, in_features)
    if qtype in QTYPES:
        return GGMLKernelWeight(raw_u8, qtype, out_features, in_features)
    from .ggml import GGMLWeight

    return GGMLWeight(_as_u8_tensor(raw_u8), qtype, (out_features, in_features))
