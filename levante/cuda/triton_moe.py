"""The grouped GEMMs of a fused mixture of experts (vLLM's fused_moe design), in Triton.

The (token, choice) pairs of a batch are sorted by expert and each expert's run padded to a multiple of BM
(`levante.cuda.moe.align_by_expert`, on the device); a program takes one BM-block of pairs, which all go to the
same expert, and one BN-slice of that expert's output features: C[pair] = A[pair // A_DIV] @ W[e]^T, times the
pair's routing weight when MUL_W. Blocks past the padded total stop at once, so a decode step's grid touches only
the chosen experts' weights. W is a stack of float weights [E, N, K], or of packed quantized planes (the formula
of levante.cuda.packed, dequantized in registers by `weight_tile`).

The pairs of a few tokens (decode steps of up to GEMV_ROWS rows; batch 1: top-k pairs, all of different experts)
skip the sort: a GEMV program per (pair, BN-slice) reads the pair's expert directly (levante.cuda.triton_matmul's
`gemv_slice`), the pairs of one slice side by side.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .triton_matmul import dot_acc, gemv_run, gemv_slice, run, use_ieee, weight_tile


@triton.jit
def _moe_kernel(
    a_ptr, c_ptr, sorted_ptr, block_expert_ptr, n_padded_ptr, topw_ptr,
    w_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr,
    e_w, e_lo, e_hi, e_d, e_sc,
    N, K, n_pairs, stride_am, stride_cm,
    A_DIV: tl.constexpr, MUL_W: tl.constexpr,
    DENSE: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr, G: tl.constexpr, SG: tl.constexpr,
    HAS_SC: tl.constexpr, HAS_MIN: tl.constexpr, HAS_MC: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BM >= tl.load(n_padded_ptr):
        return
    pairs = tl.load(sorted_ptr + pid_m * BM + tl.arange(0, BM))
    p_ok = pairs < n_pairs
    e = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    rows = pairs // A_DIV
    rn = pid_n * BN + tl.arange(0, BN)
    n_ok = rn[:, None] < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk[None, :] < K
        x = tl.load(a_ptr + rows[:, None] * stride_am + rk[None, :], mask=p_ok[:, None] & k_ok, other=0.0)
        w = weight_tile(w_ptr + e * e_w, lo_ptr + e * e_lo, hi_ptr + e * e_hi, d_ptr + e * e_d, sc_ptr + e * e_sc,
                        dm_ptr + e * e_d, mc_ptr + e * e_sc, rn, rk, K, n_ok & k_ok,
                        DENSE, BITS, OFF, G, SG, HAS_SC, HAS_MIN, HAS_MC)
        acc = dot_acc(acc, x, w, IEEE)
    if MUL_W:
        acc = acc * tl.load(topw_ptr + pairs, mask=p_ok, other=0.0).to(tl.float32)[:, None]
    c_ok = p_ok[:, None] & (rn[None, :] < N)
    tl.store(c_ptr + pairs[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _moe_gemv_kernel(
    a_ptr, c_ptr, expert_ptr, topw_ptr,
    w_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr,
    e_w, e_lo, e_hi, e_d, e_sc,
    N, K, stride_am, stride_cm,
    A_DIV: tl.constexpr, MUL_W: tl.constexpr,
    DENSE: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr, G: tl.constexpr, SG: tl.constexpr,
    HAS_SC: tl.constexpr, HAS_MIN: tl.constexpr, HAS_MC: tl.constexpr,
    BN: tl.constexpr, BK: tl.constexpr, GT: tl.constexpr,
):
    pair = tl.program_id(0)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = rn < N
    e = tl.load(expert_ptr + pair).to(tl.int64)
    if e < 0:  # another rank's expert
        return
    x_ptr = a_ptr + (pair // A_DIV) * stride_am
    acc = tl.zeros((BN, BK // GT), dtype=tl.float32)
    for k0 in range(0, K, BK):
        acc = gemv_slice(acc, x_ptr, w_ptr + e * e_w, lo_ptr + e * e_lo, hi_ptr + e * e_hi, d_ptr + e * e_d,
                         sc_ptr + e * e_sc, dm_ptr + e * e_d, mc_ptr + e * e_sc, rn, k0, K, n_ok,
                         DENSE, BITS, OFF, G, SG, HAS_SC, HAS_MIN, HAS_MC, BK, GT)
    y = tl.sum(acc, axis=1)
    if MUL_W:
        y = y * tl.load(topw_ptr + pair).to(tl.float32)
    tl.store(c_ptr + pair * stride_cm + rn, y.to(c_ptr.dtype.element_ty), mask=n_ok)


def moe_matmul(a: Tensor, c: Tensor, stack, routing, a_div: int, topk_weights: Tensor | None = None) -> None:
    """c[pair] = a[pair // a_div] @ W[expert of pair]^T (* the pair's routing weight) for every (token, choice)
    pair of `routing` (a levante.cuda.moe.Routing: sorted by expert for the tiled kernel, or in order with each
    pair's expert for the GEMV; its `launch` says which, and the tiles); `stack`: a levante.cuda.moe.ExpertStack
    (neither imported here: that module imports this one)."""
    N, K = stack.out_features, stack.in_features
    if a.shape[1] != K or c.shape[1] != N:
        raise ValueError(f"a [{a.shape[1]}] / c [{c.shape[1]}] do not fit the experts' [{N}, {K}]")
    dense = stack.weight is not None
    anchor = stack.weight if dense else stack.lo

    def plane(name: str) -> tuple[Tensor, int]:
        t = None if dense else getattr(stack, name)
        return (t, t.stride(0)) if t is not None and t.numel() else (anchor, 0)

    (lo, e_lo), (hi, e_hi), (d, e_d), (sc, e_sc), (dm, _), (mc, _) = map(plane, ("lo", "hi", "d", "sc", "dm", "mc"))
    weights = (anchor, lo, hi, d, sc, dm, mc, anchor.stride(0) if dense else 0, e_lo, e_hi, e_d, e_sc)
    fmt = dict(A_DIV=a_div, MUL_W=topk_weights is not None, DENSE=dense, BITS=stack.bits, OFF=stack.off, G=stack.g,
               SG=stack.sg, HAS_SC=not dense and stack.sc.numel() > 0, HAS_MIN=not dense and stack.dm.numel() > 0,
               HAS_MC=not dense and stack.mc.numel() > 0)
    topw = topk_weights if topk_weights is not None else a
    cfg = routing.launch
    if cfg.bm == 1:  # the pairs in order, each with its expert
        run(_moe_gemv_kernel, (routing.n_pairs, triton.cdiv(N, cfg.bn)), cfg,
            a, c, routing.experts, topw, *weights, N, K, a.stride(0), c.stride(0), **fmt,
            BN=cfg.bn, BK=cfg.bk, GT=gemv_run(stack.g if not dense else 32, cfg.bk))
        return
    run(_moe_kernel, (routing.block_expert.numel(), triton.cdiv(N, cfg.bn)), cfg,
        a, c, routing.sorted_ids, routing.block_expert, routing.n_padded, topw, *weights,
        N, K, routing.n_pairs, a.stride(0), c.stride(0), **fmt, IEEE=use_ieee(a.dtype),
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk)

