"""The grouped GEMM of a fused mixture of experts (vLLM's fused_moe design), in Triton.

The (token, choice) pairs of a batch are sorted by expert and each expert's run padded to a multiple of BM
(`levante.cuda.moe.align_by_expert`, on the device); a program takes one BM-block of pairs, which all go to the
same expert, and one BN-slice of that expert's output features: C[pair] = A[pair // A_DIV] @ W[e]^T, times the
pair's routing weight when MUL_W. Blocks past the padded total stop at once, so a decode step's grid touches only
the chosen experts' weights. W is a stack of float weights [E, N, K], or of packed quantized planes (the formula
of levante.cuda.packed, dequantized in registers by `weight_tile`).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from .triton_matmul import dot_acc, use_ieee, weight_tile


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


def moe_matmul(a: Tensor, c: Tensor, stack, routing, a_div: int, topk_weights: Tensor | None = None) -> None:
    """c[pair] = a[pair // a_div] @ W[expert of pair]^T (* the pair's routing weight) for every (token, choice)
    pair of `routing` (a levante.cuda.moe.Routing); `stack`: a levante.cuda.moe.ExpertStack (neither imported
    here: that module imports this one)."""
    N, K = stack.out_features, stack.in_features
    if a.shape[1] != K or c.shape[1] != N:
        raise ValueError(f"a [{a.shape[1]}] / c [{c.shape[1]}] do not fit the experts' [{N}, {K}]")
    BN, BK = 64, (128 if K % 128 == 0 else 64)
    grid = (routing.block_expert.numel(), triton.cdiv(N, BN))
    dense = stack.weight is not None
    anchor = stack.weight if dense else stack.lo

    def plane(name: str) -> tuple[Tensor, int]:
        t = None if dense else getattr(stack, name)
        return (t, t.stride(0)) if t is not None and t.numel() else (anchor, 0)

    (lo, e_lo), (hi, e_hi), (d, e_d), (sc, e_sc), (dm, _), (mc, _) = map(plane, ("lo", "hi", "d", "sc", "dm", "mc"))
    _moe_kernel[grid](
        a, c, routing.sorted_ids, routing.block_expert, routing.n_padded,
        topk_weights if topk_weights is not None else a,
        anchor, lo, hi, d, sc, dm, mc, anchor.stride(0) if dense else 0, e_lo, e_hi, e_d, e_sc,
        N, K, routing.n_pairs, a.stride(0), c.stride(0),
        A_DIV=a_div, MUL_W=topk_weights is not None,
        DENSE=dense, BITS=stack.bits, OFF=stack.off, G=stack.g, SG=stack.sg,
        HAS_SC=not dense and stack.sc.numel() > 0, HAS_MIN=not dense and stack.dm.numel() > 0,
        HAS_MC=not dense and stack.mc.numel() > 0, IEEE=use_ieee(a.dtype),
        BM=routing.bm, BN=BN, BK=BK,
    )
