"""Causal attention over a static KV cache, in Triton: one kernel for decode and for prefill chunks.

Each row b of the batch holds its keys and values at slots 0.. of `k_cache[b]` / `v_cache[b]` ([B, Hkv, S, D],
slot = position, or position % ring for a sliding window's ring buffer); the T new queries of row b sit at
positions start[b] .. start[b] + T - 1 and their keys are in the cache already. Query t sees the keys at
positions max(0, p - window + 1) .. p, p = start[b] + t.

Why a kernel of our own: SDPA with an additive mask picks cuDNN on the GPU, and cuDNN builds a plan for each new
key length, i.e. every decode step (86% of a decode step's time, measured). Here the shapes are fixed by the
cache, the lengths are data (`start`), so one compiled kernel serves every step and a CUDA graph can replay it.
A program computes one (row, head, block of BM queries): it walks the key blocks the block can see, with the
online softmax of flash attention, in float32 (16-bit q·k and p·v on tensor cores). Grouped-query heads index
their shared kv head.

A decode step (one query per row) runs flash-decoding instead: a program takes one (row, kv head) with all the
query heads that share it, and one of `splits` slices of the keys, so a batch-1 step at a long context spreads
over hundreds of programs instead of walking 32 heads' keys one block at a time; a second kernel merges the
slices' partial softmaxes (max, sum, weighted values).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .triton_matmul import use_ieee


@triton.jit
def qk(q, k, IEEE: tl.constexpr):
    """q @ k^T in float32: 16-bit inputs on tensor cores (their products are exact in float32, so this is the
    float32 math up to the sums' order), or (IEEE) as float32 products."""
    if IEEE:
        return tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    return tl.dot(q, tl.trans(k.to(q.dtype)))


@triton.jit
def pv(p, v, q, IEEE: tl.constexpr):
    """p @ v: the probabilities rounded to q's 16-bit dtype on tensor cores (flash attention's choice), or (IEEE)
    in float32."""
    if IEEE:
        return tl.dot(p, v.to(tl.float32), input_precision="ieee")
    return tl.dot(p.to(q.dtype), v.to(q.dtype))


@triton.jit
def kv_block(k_base, v_base, rs, s_ok, ring, sk_s, rd, d_ok):
    """Keys and values of positions rs (at slot rs, or rs % ring for a ring buffer), zeros where not s_ok."""
    slot = tl.where(ring > 0, rs % tl.maximum(ring, 1), rs)
    k = tl.load(k_base + slot[:, None] * sk_s + rd[None, :], mask=s_ok[:, None] & d_ok, other=0.0)
    v = tl.load(v_base + slot[:, None] * sk_s + rd[None, :], mask=s_ok[:, None] & d_ok, other=0.0)
    return k, v


@triton.jit
def softmax_step(m_i, l_i, acc, scores, v, q, IEEE: tl.constexpr):
    """One key block of flash attention's online softmax: masked scores (-inf) folded into the running max m_i,
    sum l_i and weighted values acc."""
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + pv(p, v, q, IEEE)
    return m_new, l_i, acc


@triton.jit
def as_output(out, o_ptr, LOW: tl.constexpr):
    """The float32 result in o's dtype; LOW (1: bfloat16, 2: float16): rounded to the queries' 16-bit dtype first,
    for a float32 o that holds their values (`cache_attention`'s `store`)."""
    if LOW == 1:
        return out.to(tl.bfloat16).to(o_ptr.dtype.element_ty)
    if LOW == 2:
        return out.to(tl.float16).to(o_ptr.dtype.element_ty)
    return out.to(o_ptr.dtype.element_ty)


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, start_ptr,
    T, H, S, scale, window, ring,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_s, so_b, so_h, so_t,
    D, GROUP: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
    LOW: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    kvh = h // GROUP
    start = tl.load(start_ptr + b)
    rt = pid_m * BM + tl.arange(0, BM)
    rd = tl.arange(0, BD)
    d_ok = rd[None, :] < D
    t_ok = rt < T
    q = tl.load(q_ptr + b * sq_b + h * sq_h + rt[:, None] * sq_t + rd[None, :], mask=t_ok[:, None] & d_ok, other=0.0)
    qpos = start + rt  # [BM]
    hi = tl.minimum(start + pid_m * BM + BM, start + T)  # keys up to the block's last query
    lo = start * 0  # an int32 scalar in both branches (Triton merges the branches' types)
    if window > 0:
        lo = tl.maximum(start + pid_m * BM - window + 1, 0)
        lo = (lo // BN) * BN
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    k_base = k_ptr + b * sk_b + kvh * sk_h
    v_base = v_ptr + b * sk_b + kvh * sk_h
    for s0 in range(lo, hi, BN):
        rs = s0 + tl.arange(0, BN)
        s_ok = rs < hi
        k, v = kv_block(k_base, v_base, rs, s_ok, ring, sk_s, rd, d_ok)
        seen = (rs[None, :] <= qpos[:, None]) & s_ok[None, :]
        if window > 0:
            seen = seen & (qpos[:, None] - rs[None, :] < window)
        scores = tl.where(seen, qk(q, k, IEEE) * scale, float("-inf"))
        m_i, l_i, acc = softmax_step(m_i, l_i, acc, scores, v, q, IEEE)
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + b * so_b + h * so_h + rt[:, None] * so_t + rd[None, :], as_output(out, o_ptr, LOW),
             mask=t_ok[:, None] & d_ok)


# the slice count is an argument, not a constexpr: every batch bucket's decode step (1 to 32 rows: 32 to 1 slices)
# runs one compiled kernel instead of one per bucket (a division by a variable once per program is all it costs)
@triton.jit(do_not_specialize=["splits"])
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, m_ptr, l_ptr, acc_ptr, start_ptr,
    H, scale, window, ring, sq_b, sq_h, sk_b, sk_h, sk_s, D, splits,
    GROUP: tl.constexpr, BG: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, IEEE: tl.constexpr,
):
    bk = tl.program_id(0)  # row * Hkv + kv head
    split = tl.program_id(1)
    n_kv = H // GROUP
    b = bk // n_kv
    kvh = bk % n_kv
    pos = tl.load(start_ptr + b)  # the row's one query position (-1: a padding row, which sees nothing)
    rg = tl.arange(0, BG)
    g_ok = rg < GROUP
    heads = kvh * GROUP + rg
    rd = tl.arange(0, BD)
    d_ok = rd[None, :] < D
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + rd[None, :], mask=g_ok[:, None] & d_ok, other=0.0)
    hi = pos + 1
    lo = hi * 0
    if window > 0:
        lo = tl.maximum(pos - window + 1, 0)
    chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), splits), BN) * BN
    s_lo = lo + split * chunk
    s_hi = tl.minimum(s_lo + chunk, hi)
    m_i = tl.full((BG,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BG,), dtype=tl.float32)
    acc = tl.zeros((BG, BD), dtype=tl.float32)
    k_base = k_ptr + b * sk_b + kvh * sk_h
    v_base = v_ptr + b * sk_b + kvh * sk_h
    for s0 in range(s_lo, s_hi, BN):
        rs = s0 + tl.arange(0, BN)
        s_ok = rs < s_hi
        k, v = kv_block(k_base, v_base, rs, s_ok, ring, sk_s, rd, d_ok)
        scores = tl.where(s_ok[None, :], qk(q, k, IEEE) * scale, float("-inf"))
        m_i, l_i, acc = softmax_step(m_i, l_i, acc, scores, v, q, IEEE)
    part = (b * H + heads) * splits + split  # [BG]
    tl.store(m_ptr + part, m_i, mask=g_ok)
    tl.store(l_ptr + part, l_i, mask=g_ok)
    tl.store(acc_ptr + part[:, None] * BD + rd[None, :], acc, mask=g_ok[:, None])


@triton.jit(do_not_specialize=["splits"])
def _decode_merge_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, H, so_b, so_h, D, splits,
                         BS: tl.constexpr, BD: tl.constexpr, LOW: tl.constexpr):
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    rs = tl.arange(0, BS)
    s_ok = rs < splits
    rd = tl.arange(0, BD)
    m = tl.load(m_ptr + bh * splits + rs, mask=s_ok, other=float("-inf"))
    l_s = tl.load(l_ptr + bh * splits + rs, mask=s_ok, other=0.0)
    top = tl.max(m, 0)
    w = tl.exp(m - tl.where(top == float("-inf"), 0.0, top))  # a slice that saw nothing: weight 0
    total = tl.sum(l_s * w, 0)
    acc = tl.load(acc_ptr + (bh * splits + rs)[:, None] * BD + rd[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(o_ptr + b * so_b + h * so_h + rd, as_output(out, o_ptr, LOW), mask=rd < D)


MAX_SPLITS = 64


def decode_splits(rows: int, n_kv: int, keys: int, block: int = 32) -> int:
    """Key slices per (row, kv head) for a decode step: enough programs to fill a GPU (~256), no slice shorter
    than one key block, at most MAX_SPLITS."""
    return max(1, min(MAX_SPLITS, -(-256 // (rows * n_kv)), -(-keys // block)))


def cache_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, start: Tensor, window: int | None = None,
                    scale: float | None = None, splits: int | None = None, ring: int = 0,
                    store: torch.dtype | None = None) -> Tensor:
    """q [B, H, T, D] at positions start[b] + t over the cache [B, Hkv, S, D] (keys up to each query's own
    position, within `window`); returns [B, H, T, D] in q's dtype, a view of a [B, T, H, D] buffer (so that the
    heads' outputs are already side by side for the output projection). `start`: int32 [B] on q's device.
    `splits`: the decode path's key slices (default: `decode_splits`; the tests choose). `ring` > 0: the cache is
    a ring buffer of that many slots (position p at slot p % ring; the window must fit in it). `store`: the dtype
    the output is stored in (float32: q's 16-bit values, for the output projection's GEMV), default q's."""
    if ring and not (window and window < ring):
        raise ValueError(f"a ring buffer of {ring} slots needs a sliding window shorter than it, not {window}")
    B, H, T, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] < B or k_cache.shape[3] != D or H % Hkv:
        raise ValueError(f"queries {tuple(q.shape)} do not fit the cache {tuple(k_cache.shape)}")
    if k_cache.stride(3) != 1 or q.stride(3) != 1:
        raise ValueError("the head dimension must be contiguous")
    out = torch.empty(B, T, H, D, dtype=store or q.dtype, device=q.device).transpose(1, 2)
    low = {torch.bfloat16: 1, torch.float16: 2}.get(q.dtype, 0) if out.dtype != q.dtype else 0
    BD = max(16, triton.next_power_of_2(D))  # a head_dim that is not a power of two: masked lanes
    BN = 64 if BD <= 64 else 32
    if T == 1:
        window = window if window and (ring or window < S) else 0
        n = splits or decode_splits(B, Hkv, min(S, window or S), BN)
        m = torch.empty(B * H * n, dtype=torch.float32, device=q.device)
        lsum = torch.empty_like(m)
        acc = torch.empty(B * H * n, BD, dtype=torch.float32, device=q.device)
        _decode_split_kernel[(B * Hkv, n)](
            q, k_cache, v_cache, m, lsum, acc, start, H, scale if scale is not None else D ** -0.5, window, ring,
            q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), D, n,
            GROUP=H // Hkv, BG=max(16, triton.next_power_of_2(H // Hkv)), BD=BD, BN=BN,
            IEEE=use_ieee(q.dtype))
        # the slices' block is the most decode_splits picks, whatever the bucket's count: one kernel for all
        _decode_merge_kernel[(B * H,)](m, lsum, acc, out, H, out.stride(0), out.stride(1), D, n,
                                       BS=max(MAX_SPLITS, triton.next_power_of_2(n)), BD=BD, LOW=low)
        return out
    BM = 16 if T <= 16 else 64
    grid = (triton.cdiv(T, BM), B * H)
    # float32 queries of 64-row blocks over 4 warps spill 15 KB per thread (sm_90, tests/test_cuda_compile.py)
    warps = 8 if BM == 64 and q.dtype == torch.float32 else 4
    _attention_kernel[grid](
        q, k_cache, v_cache, out, start,
        T, H, S, scale if scale is not None else D ** -0.5, window or 0, ring,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        D, GROUP=H // Hkv, BD=BD, BM=BM, BN=BN, IEEE=use_ieee(q.dtype), LOW=low, num_warps=warps,
    )
    return out
