"""AWQ 4-bit weights (AutoAWQ "gemm" layout): packing, an exact CPU matmul, round-to-nearest quantization.

Layout (what AutoAWQ's `WQLinear_GEMM.from_linear` writes, what vLLM / transformers read):

* `qweight` int32 [in, out/8], `qzeros` int32 [in/G, out/8], `scales` fp16 [in/G, out];
* eight 4-bit codes per int32, nibble i (bits 4i..4i+3) holds column `AWQ_ORDER[i]` of its block
  of 8 output columns, AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7];
* W[o, k] = (q[k, o] - z[k // G, o]) * s[k // G, o].

`AWQWeight` keeps the weight quantized: at load (group size a multiple of 32, i.e. every AutoAWQ
checkpoint) the codes are re-expressed exactly as GGML Q5_0 blocks (d = s, code q - z + 16: q - z is an
integer in [-15, 15] and s an fp16, so d·(code - 16) = (q - z)·s in float32), 5.5 bits per weight
instead of 4.25, plus the 4-bit zeros so `packed()` returns the AutoAWQ tensors unchanged. The blocks
are a `GGMLKernelWeight`, so small batches use the C++ GEMV of levante.quant.kernels (one row,
4096x4096, one thread: 1.4 ms; the former tile path took 70.8 ms) and bigger ones its exact tile
dequantization + F.linear. Other group sizes keep uint8 codes + float32 scales and the tile path
here (tiles of output rows dequantized to float32, F.linear per tile, transient memory below
`TILE_BYTES`). Only the summation order differs from
`x @ dequantize().T`.

Why not torch's `_weight_int4pack_mm_for_cpu`: its fast path needs bf16 activations and bf16
scales+zeros in the form w = q·s' + z' (z' = -(z - 8)·s after shifting codes by 8); bf16 keeps 8 of
fp16's 11 significant bits of s and z·s needs up to 15 bits, so it is not exact (relative weight
error up to 2^-9, plus bf16 rounding of x); its float32 path is a slow reference loop (see
levante/quant/kernels.py and benchmarks/README.md). Measured with this file's `_bench` helper on
the 2-core dev box, 4096x4096, g128: see `benchmarks/results/awq.md`.

Calibration (activation-aware scale search, `levante quantize --awq`) is the tool in
`levante.tools.awq`; this module is the format and the quantizer both use.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import QuantWeight, tiled_linear
from .kernels import GGMLKernelWeight

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of a packed int32 holds column AWQ_ORDER[i] of its 8
AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # column j sits in nibble AWQ_REVERSE_ORDER[j]
AWQ_SUFFIXES = (".qweight", ".qzeros", ".scales")
TILE_BYTES = 16 << 20  # float32 bytes of dequantized weight per matmul tile

# ------------------------------------------------------------------------------------- packing


def _pack_cols(v: Tensor) -> Tensor:
    """int codes [rows, cols] (cols % 8 == 0) -> int32 [rows, cols/8] in AWQ's nibble order."""
    rows, cols = v.shape
    if cols % 8:
        raise ValueError(f"AWQ packing needs a multiple of 8 columns, got {cols}")
    v = v.to(torch.int32).reshape(rows, cols // 8, 8)
    out = torch.zeros(rows, cols // 8, dtype=torch.int32, device=v.device)
    for i, col in enumerate(AWQ_ORDER):
        out |= (v[:, :, col] & 0xF) << (4 * i)  # int32 shifts wrap like AutoAWQ's (nibble 7 = sign bits)
    return out


def _unpack_cols(p: Tensor) -> Tensor:
    """int32 [rows, cols/8] -> uint8 codes [rows, cols] (inverse of `_pack_cols`)."""
    rows, n = p.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=p.device)
    nib = (p.to(torch.int32)[:, :, None] >> shifts) & 0xF  # [rows, n, 8]: nibble i
    return nib[:, :, AWQ_REVERSE_ORDER].reshape(rows, n * 8).to(torch.uint8)


def pack_awq(codes: Tensor, zeros: Tensor, scales: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(codes uint8 [out, in] in 0..15, zeros [out, in/G] in 0..15, scales [out, in/G]) ->
    (qweight int32 [in, out/8], qzeros int32 [in/G, out/8], scales fp16 [in/G, out]), AutoAWQ GEMM layout."""
    out_f, in_f = codes.shape
    if in_f % group_size or tuple(zeros.shape) != (out_f, in_f // group_size) or zeros.shape != scales.shape:
        raise ValueError(f"AWQ: codes {tuple(codes.shape)}, zeros {tuple(zeros.shape)}, scales "
                         f"{tuple(scales.shape)} do not fit group size {group_size}")
    qweight = _pack_cols(codes.T.contiguous())
    qzeros = _pack_cols(zeros.T.contiguous())
    return qweight, qzeros, scales.T.contiguous().to(torch.float16)


def unpack_awq(qweight: Tensor, qzeros: Tensor, scales: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of `pack_awq`: (codes uint8 [out, in], zeros uint8 [out, in/G], scales fp16 [out, in/G])."""
    return _unpack_cols(qweight).T.contiguous(), _unpack_cols(qzeros).T.contiguous(), scales.T.contiguous()


def dequantize_awq(qweight: Tensor, qzeros: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """W [out, in] = (q - z) * s from the packed tensors (reference; exact in float32)."""
    q, z, s = unpack_awq(qweight, qzeros, scales)
    g = q.shape[1] // z.shape[1]
    w = (q.float().reshape(q.shape[0], -1, g) - z.float()[..., None]) * s.float()[..., None]
    return w.reshape(q.shape).to(dtype)


# ----------------------------------------------------------------------------- the weight class


def q5_0_blocks(codes: Tensor, zeros: Tensor, scales: Tensor) -> Tensor:
    """AWQ (codes [out, in], zeros / fp16 scales [out, in/G], G a multiple of 32) as GGML Q5_0 blocks.

    Exact: w = (q - z) * s with q - z in -15..15, so Q5_0's d = s (fp16) and code q - z + 16 (1..31)
    give the same float32 weights. Returns uint8 [out, in/32 * 22].
    """
    out_f, in_f = codes.shape
    g = in_f // zeros.shape[1]
    nb = in_f // 32
    c = codes.to(torch.int32).reshape(out_f, -1, g) - zeros.to(torch.int32)[..., None] + 16
    c = c.reshape(out_f, nb, 32)
    lo = (c & 0xF).to(torch.uint8)
    qs = lo[..., :16] | (lo[..., 16:] << 4)
    qh = ((c >> 4) & 1).to(torch.int64) << torch.arange(32)
    qh = qh.sum(-1, keepdim=True) >> torch.tensor([0, 8, 16, 24])
    d = scales.to(torch.float16).repeat_interleave(g // 32, dim=1).contiguous().view(torch.uint8)
    blocks = torch.cat([d.reshape(out_f, nb, 2), (qh & 0xFF).to(torch.uint8), qs], dim=-1)
    return blocks.reshape(out_f, nb * 22).contiguous()


class AWQWeight(QuantWeight):
    """An AWQ GEMM-packed linear.

    Stored as GGML Q5_0 blocks (`q5_0_blocks`, exact, 5.5 bits per weight instead of AWQ's 4.25) plus
    the 4-bit zeros (so `packed()` gives the AutoAWQ tensors back): small batches go through the C++
    GEMV kernel of levante.quant.kernels, bigger ones through exact row-tile dequantization + F.linear.
    Measured at one row of x, 4096x4096, one thread: 70.8 ms with the former tiled path, 1.4 ms now.
    Group sizes that are not a multiple of 32 keep the unpacked codes and the tiled path.
    """

    qtype = "AWQ4"

    def __init__(self, qweight: Tensor, qzeros: Tensor, scales: Tensor, group_size: int | None = None) -> None:
        if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or qweight.ndim != 2:
            raise ValueError("AWQ qweight / qzeros must be 2-D int32 tensors")
        in_f, out_f = qweight.shape[0], qweight.shape[1] * 8
        n_groups = scales.shape[0]
        if tuple(scales.shape) != (n_groups, out_f) or tuple(qzeros.shape) != (n_groups, out_f // 8):
            raise ValueError(f"AWQ: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and scales "
                             f"{tuple(scales.shape)} do not match")
        if n_groups == 0 or in_f % n_groups:
            raise ValueError(f"AWQ: {in_f} input features are not {n_groups} whole groups")
        g = in_f // n_groups
        if group_size is not None and group_size > 0 and group_size != g:
            raise ValueError(f"AWQ: tensors imply group size {g}, config says {group_size}")
        if g % 2:
            raise ValueError(f"AWQ: odd group size {g} is not supported")
        super().__init__(out_f, in_f)
        self.group_size = g
        q, z, s = unpack_awq(qweight, qzeros, scales)
        self.register_buffer("zeros", z.contiguous(), persistent=False)
        self.q5: GGMLKernelWeight | None = None
        if g % 32 == 0:
            self.q5 = GGMLKernelWeight(q5_0_blocks(q, z, s), "Q5_0", out_f, in_f)
        else:
            self.register_buffer("codes", (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), persistent=False)
            self.register_buffer("scales", s.float().contiguous(), persistent=False)

    @classmethod
    def from_codes(cls, codes: Tensor, zeros: Tensor, scales: Tensor, group_size: int) -> AWQWeight:
        return cls(*pack_awq(codes, zeros, scales, group_size), group_size)

    @property
    def _q5(self) -> bool:
        return self.q5 is not None

    def _scales(self) -> Tensor:
        """float32 [out, in/G]."""
        if not self._q5:
            return self.scales
        b = self.q5.data.reshape(self.out_features, -1, 22)[:, :: self.group_size // 32, :2]
        return b.contiguous().view(torch.float16)[..., 0].float()

    def packed(self) -> tuple[Tensor, Tensor, Tensor]:
        """(qweight, qzeros, scales) in AutoAWQ's GEMM layout."""
        return pack_awq(self._codes(0, self.out_features), self.zeros, self._scales().half(), self.group_size)

    def _codes(self, a: int, b: int) -> Tensor:
        """The 4-bit codes q of rows a:b, uint8 [b - a, in]."""
        if not self._q5:
            c = self.codes[a:b]
            return torch.stack((c & 0xF, c >> 4), dim=-1).reshape(b - a, self.in_features)
        blk = self.q5.data[a:b].reshape(b - a, -1, 22).to(torch.int32)
        qh = blk[..., 2] | (blk[..., 3] << 8) | (blk[..., 4] << 16) | (blk[..., 5] << 24)
        hi = (qh[..., None] >> torch.arange(32)) & 1
        lo = torch.cat([blk[..., 6:] & 0xF, blk[..., 6:] >> 4], dim=-1)
        c5 = (lo | (hi << 4)).reshape(b - a, -1, self.group_size)  # q - z + 16
        return (c5 - 16 + self.zeros[a:b, :, None].to(torch.int32)).reshape(b - a, self.in_features).to(torch.uint8)

    def _deq(self, a: int, b: int) -> Tensor:
        """Rows a:b of W as float32 (exact), for the storage without Q5_0 blocks."""
        g = self.group_size
        q = self._codes(a, b).reshape(b - a, -1, g).float()
        w = (q - self.zeros[a:b, :, None].float()).mul_(self.scales[a:b, :, None])
        return w.reshape(b - a, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        if self._q5:
            return self.q5.dequantize(dtype)
        return self._deq(0, self.out_features).to(dtype)

    def _tile_rows(self) -> int:
        return max(8, min(self.out_features, TILE_BYTES // (4 * self.in_features)))

    def matmul(self, x: Tensor) -> Tensor:
        if self._q5:
            return self.q5.matmul(x)
        lead, k = x.shape[:-1], x.shape[-1]
        y = tiled_linear(x.reshape(-1, k).to(torch.float32), self.out_features, self._tile_rows(), self._deq)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def rows(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        if self._q5:
            return self.q5.rows(ids, dtype)
        flat = ids.reshape(-1).to(torch.long)
        g = self.group_size
        c = self.codes.index_select(0, flat)
        q = torch.stack((c & 0xF, c >> 4), dim=-1).reshape(len(flat), -1, g).float()
        w = (q - self.zeros.index_select(0, flat)[..., None].float()) * self.scales.index_select(0, flat)[..., None]
        return w.reshape(*ids.shape, self.in_features).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.qtype} g{self.group_size}, out={self.out_features}, in={self.in_features}"


def check_awq_config(qc: dict) -> int:
    """Validate a config.json quantization_config for AWQ; return its group size."""
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    version = str(qc.get("version", "gemm")).lower()
    zp = qc.get("zero_point", True)
    if bits != 4 or version != "gemm" or zp is False:
        raise ValueError(f"unsupported AWQ config (bits={bits}, version={version}, zero_point={zp}); "
                         "only 4-bit zero-point GEMM checkpoints are supported")
    return int(qc.get("group_size", qc.get("q_group_size", 128)))


def awq_weights(parts: dict[str, dict[str, Tensor]], qc: dict) -> dict[str, AWQWeight]:
    """{linear base name: {"qweight", "qzeros", "scales"}} -> {base name: AWQWeight}."""
    from ..errors import WeightsError

    g = check_awq_config(qc)
    out = {}
    for base, p in parts.items():
        missing = [k for k in ("qweight", "qzeros", "scales") if k not in p]
        if missing:
            raise WeightsError(f"AWQ linear {base!r} lacks {', '.join(missing)}")
        try:
            out[base] = AWQWeight(p["qweight"], p["qzeros"], p["scales"], g)
        except ValueError as e:
            raise WeightsError(f"AWQ linear {base!r}: {e}") from None
    return out


# ------------------------------------------------------------------------------- quantization


def quantize_groups(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """AutoAWQ's zero-point 4-bit quantizer per group of `group_size` inputs, fp16 scales.

    Returns (codes [out, in/G, G] float, zeros [out, in/G, 1] float, scales [out, in/G, 1] float32
    holding fp16 values); W ~ (codes - zeros) * scales."""
    out_f, in_f = w.shape
    wg = w.float().reshape(out_f, in_f // group_size, group_size)
    mx, mn = wg.amax(-1, keepdim=True), wg.amin(-1, keepdim=True)
    s = ((mx - mn).clamp(min=1e-5) / 15).half().float()
    z = (-torch.round(mn / s)).clamp(0, 15)
    q = (torch.round(wg / s) + z).clamp(0, 15)
    return q, z, s


def fake_quantize(w: Tensor, group_size: int) -> Tensor:
    """Quantize-dequantize (round-to-nearest, the same arithmetic as the packed result)."""
    q, z, s = quantize_groups(w, group_size)
    return ((q - z) * s).reshape(w.shape)


def rtn_weight(w: Tensor, group_size: int) -> AWQWeight:
    """Plain round-to-nearest AWQ-layout weight (no activation-aware scaling)."""
    q, z, s = quantize_groups(w, group_size)
    return AWQWeight.from_codes(q.reshape(w.shape).to(torch.uint8), z[..., 0].to(torch.uint8), s[..., 0], group_size)
