"""y = x @ W^T on a `PackedWeight`, dequantizing W tile by tile in registers (Triton).

One program computes a [BM, BN] tile of y: for each BK slice of the inputs it loads the codes of BN rows from
their bit planes, applies the formula of levante.cuda.packed (d * sc * (q - OFF) + dm * mc) in float32, rounds
to x's dtype and accumulates x_tile @ w_tile^T in float32 with tl.dot. The weight is read once per M tile, so a
decode step (M = 1) reads each quantized byte once: the kernel is bound by the packed size, which is what makes
4-bit weights faster than bf16 on a GPU. Runs on CUDA, and on CPU tensors under TRITON_INTERPRET=1 (the tests).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def weight_tile(
    w_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr, rn, rk, K, w_ok,
    DENSE: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr, G: tl.constexpr, SG: tl.constexpr,
    HAS_SC: tl.constexpr, HAS_MIN: tl.constexpr, HAS_MC: tl.constexpr,
):
    """Rows rn, columns rk of W in float32: a float weight as it is, or a packed one by its formula."""
    if DENSE:
        w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=w_ok, other=0.0).to(tl.float32)
    else:
        if BITS == 8:
            q = tl.load(lo_ptr + rn[:, None] * K + rk[None, :], mask=w_ok, other=0).to(tl.int32)
        else:
            byte = tl.load(lo_ptr + rn[:, None] * (K // 2) + rk[None, :] // 2, mask=w_ok, other=0).to(tl.int32)
            q = (byte >> ((rk[None, :] % 2) * 4)) & 15
            if BITS == 5:
                h = tl.load(hi_ptr + rn[:, None] * (K // 8) + rk[None, :] // 8, mask=w_ok, other=0).to(tl.int32)
                q = q | (((h >> (rk[None, :] % 8)) & 1) << 4)
            if BITS == 6:
                h = tl.load(hi_ptr + rn[:, None] * (K // 4) + rk[None, :] // 4, mask=w_ok, other=0).to(tl.int32)
                q = q | (((h >> ((rk[None, :] % 4) * 2)) & 3) << 4)
        s = tl.load(d_ptr + rn[:, None] * (K // SG) + rk[None, :] // SG, mask=w_ok, other=0.0).to(tl.float32)
        if HAS_SC:
            s = s * tl.load(sc_ptr + rn[:, None] * (K // G) + rk[None, :] // G, mask=w_ok, other=0).to(tl.float32)
        w = s * (q - OFF).to(tl.float32)
        if HAS_MIN:
            m = tl.load(dm_ptr + rn[:, None] * (K // SG) + rk[None, :] // SG, mask=w_ok, other=0.0).to(tl.float32)
            if HAS_MC:
                m = m * tl.load(mc_ptr + rn[:, None] * (K // G) + rk[None, :] // G, mask=w_ok,
                                other=0).to(tl.float32)
            w = w + m
    return w


@triton.jit
def dot_acc(acc, x, w, IEEE: tl.constexpr):
    """acc + x @ w^T with w rounded to x's dtype: on tensor cores, or (IEEE) as exact float32 products."""
    if IEEE:
        acc = acc + tl.dot(x.to(tl.float32), tl.trans(w.to(x.dtype).to(tl.float32)), input_precision="ieee")
    else:
        acc = acc + tl.dot(x, tl.trans(w.to(x.dtype)))
    return acc


def use_ieee(dtype: torch.dtype) -> bool:
    """float32 inputs multiply as float32; so do bfloat16 ones under the interpreter, whose tl.dot misreads
    bfloat16 (the values are the same: bf16 -> f32 is exact)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _packed_matmul_kernel(
    x_ptr, y_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr,
    M, N, K, stride_xm, stride_ym,
    BITS: tl.constexpr, OFF: tl.constexpr, G: tl.constexpr, SG: tl.constexpr,
    HAS_SC: tl.constexpr, HAS_MIN: tl.constexpr, HAS_MC: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_ok = rm[:, None] < M
    n_ok = rn[:, None] < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk[None, :] < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok & k_ok, other=0.0)
        w = weight_tile(lo_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr, rn, rk, K, n_ok & k_ok,
                        False, BITS, OFF, G, SG, HAS_SC, HAS_MIN, HAS_MC)
        acc = dot_acc(acc, x, w, IEEE)
    y_ok = m_ok & (rn[None, :] < N)
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_ok)


def _tiles(m: int) -> tuple[int, int, int]:
    """(BM, BN, BK): a 16-row tile for decode-sized M (tl.dot's minimum), bigger tiles for prefill."""
    if m <= 16:
        return 16, 64, 128
    if m <= 64:
        return 64, 64, 64
    return 128, 64, 64


def packed_matmul(x: Tensor, w) -> Tensor:
    """x [..., K] @ W^T -> [..., N] in x's dtype (float32 x: exact float32 products); `w`: a levante.cuda
    PackedWeight (not imported here: it imports this module when it first multiplies)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    M, K = x2.shape
    N = w.out_features
    if K != w.in_features:
        raise ValueError(f"x has {K} features, the weight {w.in_features}")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    BM, BN, BK = _tiles(M)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    dummy = w.lo
    _packed_matmul_kernel[grid](
        x2, y, w.lo, w.hi if w.hi.numel() else dummy, w.d, w.sc if w.sc.numel() else dummy,
        w.dm if w.dm.numel() else w.d, w.mc if w.mc.numel() else dummy,
        M, N, K, x2.stride(0), y.stride(0),
        BITS=w.bits, OFF=w.off, G=w.g, SG=w.sg, HAS_SC=w.sc.numel() > 0, HAS_MIN=w.dm.numel() > 0,
        HAS_MC=w.mc.numel() > 0, IEEE=use_ieee(x.dtype), BM=BM, BN=BN, BK=BK,
    )
    return y.reshape(*shape[:-1], N)
