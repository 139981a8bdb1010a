"""Quantized weights for the GPU: GGUF blocks and AWQ re-laid once at load into bit planes the Triton kernel reads.

Every supported format is one formula over integer codes q (2 to 8 bits):

    W[n, k] = d[n, k // SG] * sc[n, k // G] * (q[n, k] - OFF)  +  dm[n, k // SG] * mc[n, k // G]

d / dm: f16 super-block scales (per SG values), sc / mc: small integer sub-block scales (per G values; 1 when a
format has none), OFF: the codes' zero. GGUF's own arithmetic is exactly this in float32 (Q4_K: d * sc * q -
dmin * m, Q6_K: d * sc * (q - 32), Q4_0: d * (q - 8), Q8_0: d * q, ...), so the planes are bit-exact views of the
file's values, kept at the file's size (Q4_K: 4.625 bits per weight, vs 4.5 in the file).

Codes live in planes the kernel can index without per-format shuffles: `lo` holds the low 4 bits of two
neighbouring values per byte (value k: byte k // 2, bits 4 * (k % 2)), `hi` the 5th bit (8 values per byte) or
5th and 6th bits (4 per byte); 8-bit codes are one byte each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..quant.base import DenseWeight, QuantWeight, tiled_linear
from ..quant.ggml import GGML_TYPES, _bits, _f16, _k_scale_min, _nibbles, _q5_values

# qtype -> (code bits, OFF, G, SG, sub-scales, min)
LAYOUTS: dict[str, tuple[int, int, int, int, bool, bool]] = {
    "Q4_0": (4, 8, 32, 32, False, False),
    "Q4_1": (4, 0, 32, 32, False, True),
    "Q5_0": (5, 16, 32, 32, False, False),
    "Q5_1": (5, 0, 32, 32, False, True),
    "Q8_0": (8, 128, 32, 32, False, False),
    "Q2_K": (4, 0, 16, 256, True, True),  # 2-bit codes, stored in the 4-bit plane
    "Q3_K": (4, 4, 16, 256, True, False),  # 3-bit codes
    "Q4_K": (4, 0, 32, 256, True, True),
    "Q5_K": (5, 0, 32, 256, True, True),
    "Q6_K": (6, 32, 16, 256, True, False),
}
SUPPORTED = tuple(LAYOUTS) + ("AWQ4", "INT8")


@dataclass
class _Parts:
    codes: Tensor  # uint8 [N, K]
    d: Tensor  # float16 [N, K / SG]
    sc: Tensor | None = None  # int8 / uint8 [N, K / G]
    dm: Tensor | None = None  # float16 [N, K / SG]
    mc: Tensor | None = None  # uint8 [N, K / G]


def _ggml_parts(raw: Tensor, qtype: str, n: int, k: int) -> _Parts:
    """Codes and scales of GGML blocks raw uint8 [n, row bytes]."""
    bs, ts, _ = GGML_TYPES[qtype]
    b = raw.reshape(n * (k // bs), ts)

    def per_row(t: Tensor) -> Tensor:
        return t.reshape(n, -1)

    if qtype == "Q4_0":
        return _Parts(per_row(_nibbles(b[:, 2:], 1, 16)), per_row(_f16(b[:, :2]).half()))
    if qtype == "Q4_1":
        return _Parts(per_row(_nibbles(b[:, 4:], 1, 16)), per_row(_f16(b[:, :2]).half()),
                      dm=per_row(_f16(b[:, 2:4]).half()))
    if qtype == "Q5_0":
        return _Parts(per_row(_q5_values(b[:, 2:6], b[:, 6:])), per_row(_f16(b[:, :2]).half()))
    if qtype == "Q5_1":
        return _Parts(per_row(_q5_values(b[:, 4:8], b[:, 8:])), per_row(_f16(b[:, :2]).half()),
                      dm=per_row(_f16(b[:, 2:4]).half()))
    if qtype == "Q8_0":
        q = (b[:, 2:].view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
        return _Parts(per_row(q), per_row(_f16(b[:, :2]).half()))
    if qtype in ("Q4_K", "Q5_K"):
        sc, mn = _k_scale_min(b[:, 4:16])
        if qtype == "Q4_K":
            q = _nibbles(b[:, 16:144], 4, 32)
        else:
            q = _nibbles(b[:, 48:176], 4, 32) | (_bits(b[:, 16:48], 1, 32, 1) << 4)
        return _Parts(per_row(q), per_row(_f16(b[:, 0:2]).half()), per_row(sc), per_row(-_f16(b[:, 2:4]).half()),
                      per_row(mn))
    if qtype == "Q6_K":
        q = _nibbles(b[:, 0:128], 2, 64) | (_bits(b[:, 128:192], 2, 32, 2) << 4)
        return _Parts(per_row(q), per_row(_f16(b[:, 208:210]).half()), per_row(b[:, 192:208].view(torch.int8)))
    if qtype == "Q2_K":
        s = b[:, :16]
        return _Parts(per_row(_bits(b[:, 16:80], 2, 32, 2)), per_row(_f16(b[:, 80:82]).half()), per_row(s & 0xF),
                      per_row(-_f16(b[:, 82:84]).half()), per_row(s >> 4))
    if qtype == "Q3_K":
        sc = b[:, 96:108]
        scales = (_nibbles(sc[:, :8], 1, 8) | (_bits(sc[:, 8:12], 1, 4, 2) << 4)).to(torch.int8) - 32
        ql = _bits(b[:, 32:96], 2, 32, 2)
        qh = _bits(b[:, :32], 1, 32, 1) ^ 1
        q = (ql.to(torch.int16) - (qh.to(torch.int16) << 2) + 4).to(torch.uint8)  # ql - 4 * (1 - hbit) + 4
        return _Parts(per_row(q), per_row(_f16(b[:, 108:110]).half()), per_row(scales))
    raise ValueError(f"no GPU layout for {qtype}; have {', '.join(SUPPORTED)}")


class PackedWeight(QuantWeight):
    """A quantized weight in the GPU layout above; `matmul` runs the Triton kernel (levante.cuda.triton_matmul)
    on CUDA tensors, and the torch reconstruction elsewhere."""

    def __init__(self, parts: _Parts, qtype: str, bits: int, off: int, g: int, sg: int, n: int, k: int) -> None:
        super().__init__(n, k)
        if k % sg or sg % g:
            raise ValueError(f"{qtype}: {k} inputs are not whole {sg}-value blocks")
        self.qtype, self.bits, self.off, self.g, self.sg = qtype, bits, off, g, sg
        q = parts.codes.to(torch.uint8)
        if bits == 8:
            lo, hi = q.contiguous(), torch.empty(0, dtype=torch.uint8)
        else:
            lo = ((q[:, 0::2] & 15) | ((q[:, 1::2] & 15) << 4)).contiguous()
            shifts = torch.arange(8, dtype=torch.int32, device=q.device)
            if bits == 5:
                hi = (((q >> 4) & 1).reshape(n, k // 8, 8).to(torch.int32) << shifts).sum(-1).to(torch.uint8)
            elif bits == 6:
                hi = (((q >> 4) & 3).reshape(n, k // 4, 4).to(torch.int32) << (2 * shifts[:4])).sum(-1).to(torch.uint8)
            else:
                hi = torch.empty(0, dtype=torch.uint8)
        self.register_buffer("lo", lo, persistent=False)
        self.register_buffer("hi", hi.contiguous(), persistent=False)
        self.register_buffer("d", parts.d.contiguous(), persistent=False)  # f16 (files), f32 (int8 rows)
        empty = torch.empty(0, dtype=torch.uint8)
        self.register_buffer("sc", empty if parts.sc is None else parts.sc.contiguous(), persistent=False)
        self.register_buffer("dm", torch.empty(0, dtype=torch.float16) if parts.dm is None else
                             parts.dm.half().contiguous(), persistent=False)
        self.register_buffer("mc", empty if parts.mc is None else parts.mc.contiguous(), persistent=False)

    @classmethod
    def from_ggml(cls, raw: Tensor, qtype: str, out_features: int, in_features: int) -> PackedWeight:
        """From GGML blocks uint8 [out, row bytes] (exact: the same values), on raw's device (a GPU unpacks a
        file's blocks at its own speed; the host's torch ops take minutes for a 26 GB model)."""
        bits, off, g, sg, _, _ = LAYOUTS[qtype]
        parts = _ggml_parts(raw, qtype, out_features, in_features)
        return cls(parts, qtype, bits, off, g, sg, out_features, in_features)

    @classmethod
    def from_awq(cls, codes: Tensor, zeros: Tensor, scales: Tensor, group_size: int) -> PackedWeight:
        """From AWQ's 4-bit codes [out, in], zeros and scales [out, in / G]: W = s * q - s * z."""
        n, k = codes.shape
        s = scales.half()
        parts = _Parts(codes.to(torch.uint8), s, None, -s, zeros.to(torch.uint8))
        w = cls(parts, "AWQ4", 4, 0, group_size, group_size, n, k)
        return w

    @classmethod
    def from_int8(cls, q: Tensor, scale: Tensor) -> PackedWeight:
        """From int8 rows q [out, in] with one float32 scale per row (levante.quant.int8): W = scale * q, one
        scale group spanning the row, codes stored offset by 128."""
        n, k = q.shape
        codes = (q.to(torch.int16) + 128).to(torch.uint8)
        return cls(_Parts(codes, scale.float().reshape(n, 1)), "INT8", 8, 128, k, k, n, k)

    @classmethod
    def concat(cls, weights: list[PackedWeight]) -> PackedWeight:
        """One weight of the rows of `weights` (one format, same inputs), e.g. q, k and v for one matmul; the
        given weights are re-pointed at their rows of it, so no bytes are held twice."""
        first = weights[0]
        if any(w.qtype != first.qtype or w.in_features != first.in_features for w in weights):
            raise TypeError("concatenated weights need one format and one input size")
        out = cls.__new__(cls)
        QuantWeight.__init__(out, sum(w.out_features for w in weights), first.in_features)
        out.qtype, out.bits, out.off, out.g, out.sg = first.qtype, first.bits, first.off, first.g, first.sg
        for name in ("lo", "hi", "d", "sc", "dm", "mc"):
            parts = [getattr(w, name) for w in weights]
            whole = torch.cat(parts) if parts[0].numel() else parts[0]
            out.register_buffer(name, whole, persistent=False)
            if whole.numel():
                start = 0
                for w in weights:
                    n = w.out_features
                    w._buffers[name] = whole[start : start + n]
                    start += n
        return out

    # ------------------------------------------------------------------ the reference (torch) path
    def _codes(self, a: int, b: int) -> Tensor:
        lo = self.lo[a:b]
        if self.bits == 8:
            return lo.to(torch.int32)
        q = torch.stack((lo & 15, lo >> 4), dim=-1).reshape(b - a, self.in_features).to(torch.int32)
        if self.bits == 5:
            h = (self.hi[a:b, :, None].to(torch.int32) >> torch.arange(8, device=lo.device)) & 1
            q = q | (h.reshape(b - a, self.in_features) << 4)
        elif self.bits == 6:
            h = (self.hi[a:b, :, None].to(torch.int32) >> (2 * torch.arange(4, device=lo.device))) & 3
            q = q | (h.reshape(b - a, self.in_features) << 4)
        return q

    def _rows(self, a: int, b: int) -> Tensor:
        """Rows a:b of W, float32 (GGML's float32 arithmetic)."""
        k, g, sg = self.in_features, self.g, self.sg
        s = self.d[a:b].float().repeat_interleave(sg, dim=1)
        if self.sc.numel():
            s = s * self.sc[a:b].float().repeat_interleave(g, dim=1)
        w = s * (self._codes(a, b) - self.off).float()
        if self.dm.numel():
            m = self.dm[a:b].float().repeat_interleave(sg, dim=1)
            if self.mc.numel():
                m = m * self.mc[a:b].float().repeat_interleave(g, dim=1)
            w = w + m
        return w.reshape(b - a, k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return self._rows(0, self.out_features).to(dtype)

    def rows(self, ids: Tensor, dtype: torch.dtype) -> Tensor:
        flat = ids.reshape(-1)
        sub = _Gathered(self, flat)
        return sub.dequantize(dtype).reshape(*ids.shape, self.in_features)

    def matmul(self, x: Tensor) -> Tensor:
        if x.device.type in ("cuda", "meta") or _interpreting():  # meta: a dry run (levante.cuda.precompile)
            from .triton_matmul import packed_matmul

            return packed_matmul(x, self)
        return tiled_linear(x, self.out_features, max(16, (1 << 22) // self.in_features),
                            lambda a, b: self._rows(a, b).to(x.dtype))


class _Gathered(PackedWeight):
    """Rows `ids` of a PackedWeight (embedding lookups), without copying the others."""

    def __init__(self, w: PackedWeight, ids: Tensor) -> None:  # noqa: D107 - a view, no packing
        QuantWeight.__init__(self, ids.numel(), w.in_features)
        self.qtype, self.bits, self.off, self.g, self.sg = w.qtype, w.bits, w.off, w.g, w.sg
        for name in ("lo", "hi", "d", "sc", "dm", "mc"):
            t = getattr(w, name)
            self.register_buffer(name, t[ids] if t.numel() else t, persistent=False)


def random_packed(n: int, k: int, qtype: str, device: torch.device | str) -> PackedWeight:
    """An [n, k] weight of `qtype`'s packed layout (a GGUF type, "AWQ4" or "INT8") with random codes and scales
    (seeded by n and k), made on `device` (meta: shapes only): a kernel's speed does not depend on the values (the
    GPU benchmark's quantized models; the compile check's full-size dry runs)."""
    dev = torch.device(device)
    g = None if dev.type == "meta" else torch.Generator(device=dev).manual_seed(n * 7 + k)

    def ints(lo: int, hi: int, shape, dtype=torch.uint8):
        return torch.randint(lo, hi, shape, generator=g, device=dev, dtype=torch.int16).to(dtype)

    def scales(shape):
        return (torch.rand(shape, generator=g, device=dev) * 1e-3 + 1e-4).half()

    if qtype == "AWQ4":
        return PackedWeight.from_awq(ints(0, 16, (n, k)), ints(0, 16, (n, k // 128)), scales((n, k // 128)), 128)
    if qtype == "INT8":
        return PackedWeight.from_int8(ints(-127, 128, (n, k), torch.int8), scales((n,)).float())
    bits, off, gs, sg, has_sc, has_min = LAYOUTS[qtype]
    code_bits = {"Q2_K": 2, "Q3_K": 3}.get(qtype, bits)  # their codes' planes hold a bit more than the code
    signed = qtype in ("Q3_K", "Q6_K")
    sc = (ints(-32, 32, (n, k // gs), torch.int8) if signed else ints(0, 64, (n, k // gs))) if has_sc else None
    mins = -scales((n, k // sg)) if has_min else None
    min_sc = ints(0, 64, (n, k // gs)) if has_min and has_sc else None
    parts = _Parts(ints(0, 2**code_bits, (n, k)), scales((n, k // sg)), sc, mins, min_sc)
    return PackedWeight(parts, qtype, bits, off, gs, sg, n, k)


def quantize_randomly(net: nn.Module, scheme: dict[str, str], device: torch.device | str) -> None:
    """Every float weight of `net` whose role (its attribute name: wq, w1, lm_head, ...) `scheme` names becomes a
    `random_packed` weight of that format, on `device`."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DenseWeight) and name in scheme:
                setattr(parent, name, random_packed(child.out_features, child.in_features, scheme[name], device))


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"
