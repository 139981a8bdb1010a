"""The grouped GEMMs of a fused mixture of experts (vLLM's fused_moe design), in Triton.

The (token, choice) pairs of a batch are sorted by expert and each expert's run padded to a multiple of BM
(`levante.cuda.moe.align_by_expert`, on the device); a program takes one BM-block of pairs, which all go to the
same expert, and one BN-slice of that expert's output features: C[pair] = A[pair // A_DIV] @ W[e]^T, times the
pair's routing weight when MUL_W. Blocks past the padded total stop at once, so a decode step's grid touches only
the chosen experts' weights. W is a stack of float weights [E, N, K], or of packed quantized planes (the formula
of levante.cuda.packed, dequantized in registers by `weight_tile`).

Decode steps of packed experts take the GEMV (levante.cuda.triton_matmul's `gemv`): at
most one pair per expert on average (batch 1: top-k pairs, all of different experts), a program per (pair,
BN-slice) reads the pair's expert directly, no sort; up to GEMV_ROWS per expert, a program per (sorted block of R
pairs, BN-slice) dequantizes its expert's slice once for the R pairs. The programs of one slice run side by side.
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .triton_matmul import (
    Launch,
    dot_acc,
    float_base,
    gemv,
    gemv_launch,
    gemv_run,
    gemv_unit,
    run,
    tile_run,
    use_ieee,
    weight_tile,
)


# n_pairs unspecialized: one kernel for every prompt length (sm_90 code is the same for n_pairs % 16 == 0)
@triton.jit(do_not_specialize=["n_pairs"])
def _moe_kernel(
    a_ptr, c_ptr, sorted_ptr, block_expert_ptr, n_padded_ptr, topw_ptr,
    w_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr, base,
    e_w, e_lo, e_hi, e_d, e_sc,
    N, K, n_pairs, stride_am, stride_cm,
    A_DIV: tl.constexpr, MUL_W: tl.constexpr,
    DENSE: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr, G: tl.constexpr, SG: tl.constexpr,
    HAS_SC: tl.constexpr, HAS_MIN: tl.constexpr, HAS_MC: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GT: tl.constexpr, U: tl.constexpr,
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
                        dm_ptr + e * e_d, mc_ptr + e * e_sc, base, rn, k0, K, n_ok,
                        DENSE, BITS, OFF, G, SG, HAS_SC, HAS_MIN, HAS_MC, BK, GT, U)
        acc = dot_acc(acc, x, w, IEEE)
    if MUL_W:
        acc = acc * tl.load(topw_ptr + pairs, mask=p_ok, other=0.0).to(tl.float32)[:, None]
    c_ok = p_ok[:, None] & (rn[None, :] < N)
    tl.store(c_ptr + pairs[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty), mask=c_ok)


@triton.jit(do_not_specialize=["n_pairs"])
def _moe_gemv_kernel(
    a_ptr, c_ptr, expert_ptr, sorted_ptr, block_expert_ptr, n_padded_ptr, topw_ptr,
    w_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr, base,
    e_w, e_lo, e_hi, e_d, e_sc,
    N, K, n_pairs, stride_am, stride_cm,
    A_DIV: tl.constexpr, MUL_W: tl.constexpr,
    DENSE: tl.constexpr, BITS: tl.constexpr, OFF: tl.constexpr, G: tl.constexpr, SG: tl.constexpr,
    HAS_SC: tl.constexpr, HAS_MIN: tl.constexpr, HAS_MC: tl.constexpr,
    R: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GT: tl.constexpr, U: tl.constexpr, AHEAD: tl.constexpr,
):
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = rn < N
    if R == 1:  # a pair, in order
        pairs = tl.program_id(0) + tl.arange(0, 1)
        e = tl.load(expert_ptr + tl.program_id(0)).to(tl.int64)
        if e < 0:  # another rank's expert
            return
    else:  # a block of R pairs sorted by expert
        if tl.program_id(0) * R >= tl.load(n_padded_ptr):
            return
        pairs = tl.load(sorted_ptr + tl.program_id(0) * R + tl.arange(0, R))
        e = tl.load(block_expert_ptr + tl.program_id(0)).to(tl.int64)
    p_ok = pairs < n_pairs
    w_ptr, lo_ptr, hi_ptr = w_ptr + e * e_w, lo_ptr + e * e_lo, hi_ptr + e * e_hi
    d_ptr, sc_ptr, dm_ptr, mc_ptr = d_ptr + e * e_d, sc_ptr + e * e_sc, dm_ptr + e * e_d, mc_ptr + e * e_sc
    y = gemv(a_ptr, (pairs // A_DIV) * stride_am, p_ok, w_ptr, lo_ptr, hi_ptr, d_ptr, sc_ptr, dm_ptr, mc_ptr, base, rn,
             K, n_ok, DENSE, BITS, OFF, G, SG, HAS_SC, HAS_MIN, HAS_MC, R, BN, BK, GT, U, AHEAD)
    if MUL_W:
        y = y * tl.load(topw_ptr + pairs, mask=p_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(c_ptr + pairs[:, None] * stride_cm + rn[None, :], y.to(c_ptr.dtype.element_ty),
             mask=p_ok[:, None] & n_ok[None, :])


def moe_matmul(a: Tensor, c: Tensor, stack, routing, a_div: int, topk_weights: Tensor | None = None,
               launch: Launch | None = None) -> None:
    """c[pair] = a[pair // a_div] @ W[expert of pair]^T (* the pair's routing weight) for every (token, choice)
    pair of `routing` (a levante.cuda.moe.Routing: sorted by expert for the tiled kernel or the GEMV of several
    rows, or in order with each pair's expert for the GEMV of one; its `launch` says which, and the tiles: a GEMV's
    slices follow the stack's format, `gemv_launch`); `stack`: a levante.cuda.moe.ExpertStack (neither imported
    here: that module imports this one). `launch`: another configuration of the same kind (the benchmark's)."""
    N, K = stack.out_features, stack.in_features
    if a.shape[1] != K or c.shape[1] != N:
        raise ValueError(f"a [{a.shape[1]}] / c [{c.shape[1]}] do not fit the experts' [{N}, {K}]")
    dense = stack.weight is not None
    anchor = stack.weight if dense else stack.lo

    def plane(name: str) -> tuple[Tensor, int]:
        t = None if dense else getattr(stack, name)
        return (t, t.stride(0)) if t is not None and t.numel() else (anchor, 0)

    (lo, e_lo), (hi, e_hi), (d, e_d), (sc, e_sc), (dm, _), (mc, _) = map(plane, ("lo", "hi", "d", "sc", "dm", "mc"))
    weights = (anchor, lo, hi, d, sc, dm, mc, float_base(stack.bits), anchor.stride(0) if dense else 0, e_lo, e_hi,
               e_d, e_sc)
    fmt = dict(A_DIV=a_div, MUL_W=topk_weights is not None, DENSE=dense, BITS=stack.bits, OFF=stack.off, G=stack.g,
               SG=stack.sg, HAS_SC=not dense and stack.sc.numel() > 0, HAS_MIN=not dense and stack.dm.numel() > 0,
               HAS_MC=not dense and stack.mc.numel() > 0)
    topw = topk_weights if topk_weights is not None else a
    g = 32 if dense else stack.g  # the scale group (float weights have none: runs of 32)
    cfg = routing.launch
    if cfg.gemv:
        unit = gemv_unit(stack.bits, K)
        if cfg.bm == 1:  # the pairs in order, each with its expert (the sort's pointers unused)
            grid, pointers = routing.n_pairs, (routing.experts,) * 4
        else:  # blocks of pairs sorted by expert (the experts' pointer unused)
            grid = routing.block_expert.numel()
            pointers = (routing.sorted_ids, routing.sorted_ids, routing.block_expert, routing.n_padded)
        # the slices that suit the stack and the routing's blocks
        cfg = launch or gemv_launch(cfg.bm, unit, N, g, K, blocks=grid if cfg.bm > 1 else 1)
        gt = gemv_run(g, cfg.bk)
        run(_moe_gemv_kernel, (grid, triton.cdiv(N, cfg.bn)), cfg,
            a, c, *pointers, topw, *weights, N, K, routing.n_pairs, a.stride(0), c.stride(0), **fmt,
            R=cfg.bm, BN=cfg.bn, BK=cfg.bk, GT=gt, U=unit, AHEAD=cfg.ahead)
        return
    cfg = launch or cfg
    run(_moe_kernel, (routing.block_expert.numel(), triton.cdiv(N, cfg.bn)), cfg,
        a, c, routing.sorted_ids, routing.block_expert, routing.n_padded, topw, *weights,
        N, K, routing.n_pairs, a.stride(0), c.stride(0), **fmt, IEEE=use_ieee(a.dtype),
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GT=tile_run(g, cfg.bk),
        U=gemv_unit(stack.bits, K))
