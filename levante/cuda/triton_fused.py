"""The small ops of a decode step, fused into one Triton kernel each (vLLM's custom ops: fused_add_rms_norm,
rotary_embedding + reshape_and_cache, silu_and_mul, topk_softmax; here the router's gate matmul joins the last).

At batch 1 a layer's weights take ~0.2 ms to read on an H200, and each tiny kernel of a CUDA graph costs a few
microseconds whatever it does: the ~40 torch ops around the matmuls of a layer (RMSNorm in five, RoPE in six, the
router in six, ...) would cost a third of the step. Each kernel here keeps the rounding of the torch ops it
replaces (levante.model's order: results rounded to the activations' dtype where torch rounds them), so the GPU
path gives the model's numbers. All run on CPU tensors under TRITON_INTERPRET=1 (the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def rounded(x, dtype: tl.constexpr):
    """float32 x rounded to `dtype` (round to nearest even, as torch rounds). bfloat16 is rounded by hand: the
    Triton interpreter's own conversion truncates, and the tests compare with torch there."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    return x.to(dtype)


@triton.jit
def _add_rms_norm_kernel(x_ptr, delta_ptr, w_ptr, x_out_ptr, y_ptr, D, eps,
                         PARTS: tl.constexpr, LOW: tl.constexpr, ROUND: tl.constexpr, BD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BD)
    ok = cols < D
    x = tl.load(x_ptr + row * D + cols, mask=ok, other=0.0)
    if PARTS > 0:  # delta: the sum of PARTS rows (a MoE's top-k outputs), rounded as torch's sum rounds it
        d = tl.zeros((BD,), dtype=tl.float32)
        for j in tl.static_range(PARTS):
            d += tl.load(delta_ptr + (row * PARTS + j) * D + cols, mask=ok, other=0.0).to(tl.float32)
        if PARTS > 1:
            d = rounded(d, x_out_ptr.dtype.element_ty).to(tl.float32)
        x = rounded(x.to(tl.float32) + d, x_out_ptr.dtype.element_ty)
        tl.store(x_out_ptr + row * D + cols, x, mask=ok)
    xf = x.to(tl.float32)
    h = xf * tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
    if LOW:  # levante.model.RMSNorm on 16-bit activations: normalised in float32, rounded, then scaled
        h = rounded(h, x_out_ptr.dtype.element_ty).to(tl.float32)
    y = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32) * h
    if ROUND:  # a 16-bit output dtype, which is then x's (y may store its values as float32)
        y = rounded(y, x_out_ptr.dtype.element_ty)
    tl.store(y_ptr + row * D + cols, y.to(y_ptr.dtype.element_ty), mask=ok)


def add_rms_norm(x: Tensor, delta: Tensor | None, weight: Tensor, eps: float,
                 store: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """(x + delta, RMSNorm(x + delta)) for x [..., D] and delta [..., D] or [..., k, D] (k parts summed first:
    a MoE's top-k outputs): a residual add and the next norm in one pass (delta None: the norm alone, x returned
    as it is). `store`: the dtype the norm's output is stored in (float32: its values, rounded to their own dtype
    as before, for a GEMV that reads float32 x more cheaply); default its own dtype."""
    shape = x.shape
    D = shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    parts = 0
    if delta is not None:
        if delta.shape == shape:
            parts = 1
        elif delta.ndim == x.ndim + 1 and delta.shape[:-2] + delta.shape[-1:] == shape:
            parts = delta.shape[-2]
        else:
            raise ValueError(f"delta {tuple(delta.shape)} does not fit x {tuple(shape)}")
    new = torch.empty_like(x2) if delta is not None else x2
    own = torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty(x2.shape, dtype=store or own, device=x.device)
    _add_rms_norm_kernel[(x2.shape[0],)](
        x2, delta.contiguous() if delta is not None else x2, weight, new, y, D, eps,
        PARTS=parts, LOW=x.dtype != torch.float32, ROUND=own != torch.float32, BD=triton.next_power_of_2(D),
        num_warps=4 if D <= 4096 else 8)
    return new.view(shape), y.view(shape)


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, freq_ptr, q_out_ptr, kc_ptr, vc_ptr,
                       T, H, D, dump, ring, s_q, s_k, s_v, sqo_b, sqo_h, sqo_t, sc_b, sc_h, sc_s,
                       BD: tl.constexpr):
    bt = tl.program_id(0).to(tl.int64)  # token b * T + t
    head = tl.program_id(1)
    b = bt // T
    t = bt % T
    cols = tl.arange(0, BD)
    ok = cols < D
    half = D // 2
    partner = (cols + half) % D  # rotate-half, with the sign folded into sin (levante.rope.apply_rotary)
    pos = tl.load(pos_ptr + bt)
    if head < H:
        src = q_ptr + bt * s_q + head * D
    else:
        src = k_ptr + bt * s_k + (head - H) * D
    x = tl.load(src + cols, mask=ok, other=0.0)
    xr = tl.load(src + partner, mask=ok, other=0.0).to(tl.float32)
    # levante.model.Rotary.cos_sin, for this position: angles in float32, cos / signed sin rounded to x's dtype
    angle = tl.maximum(pos, 0).to(tl.float32) * tl.load(freq_ptr + cols % half, mask=ok, other=0.0)
    cos = rounded(tl.cos(angle), x.dtype).to(tl.float32)
    sin = tl.sin(angle)
    sin = rounded(tl.where(cols < half, -sin, sin), x.dtype).to(tl.float32)
    a = rounded(x.to(tl.float32) * cos, x.dtype).to(tl.float32)  # x * cos, rounded as torch rounds it
    out = rounded(a + xr * sin, x.dtype)  # addcmul: one rounding
    if head < H:
        tl.store(q_out_ptr + b * sqo_b + head * sqo_h + t * sqo_t + cols, out.to(q_out_ptr.dtype.element_ty),
                 mask=ok)
    else:
        slot = tl.where(ring > 0, pos % tl.maximum(ring, 1), pos)
        slot = tl.where(pos < 0, dump, slot)  # padding: the dump slot
        dst = b * sc_b + (head - H) * sc_h + slot * sc_s + cols
        tl.store(kc_ptr + dst, out.to(kc_ptr.dtype.element_ty), mask=ok)
        v = tl.load(v_ptr + bt * s_v + (head - H) * D + cols, mask=ok, other=0.0)
        tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=ok)


def rope_and_cache(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, inv_freq: Tensor, k_cache: Tensor,
                   v_cache: Tensor, n_heads: int, n_kv: int, dump: int, ring: int = 0) -> Tensor:
    """RoPE on q [B, T, H * D] and k [B, T, Hkv * D] (rows may be strided views of one qkv output) at positions
    [B, T], the angles from `inv_freq` [D / 2] (levante.model.Rotary's); the rotated keys and the values written
    to the caches [B, Hkv, S, D] at slot = position (ring > 0: position % ring; padding, position -1: slot
    `dump`); returns the rotated queries as [B, H, T, D] (a view of a [B, T, H, D] buffer)."""
    B, T, _ = q.shape
    D = q.shape[-1] // n_heads
    for t in (q, k, v):
        if t.stride(-1) != 1 or t.stride(0) != T * t.stride(1):
            raise ValueError("q, k and v need contiguous features and rows")
    if k_cache.stride(3) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("the caches must share a layout with contiguous head_dim")
    if inv_freq.numel() != D // 2:
        raise ValueError(f"{inv_freq.numel()} rotary frequencies for head_dim {D}")
    q_out = torch.empty(B, T, n_heads, D, dtype=q.dtype, device=q.device)
    _rope_cache_kernel[(B * T, n_heads + n_kv)](
        q, k, v, positions.reshape(-1).contiguous(), inv_freq.float().contiguous(), q_out, k_cache, v_cache,
        T, n_heads, D, dump, ring, q.stride(1), k.stride(1), v.stride(1),
        q_out.stride(0), q_out.stride(2), q_out.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BD=max(16, triton.next_power_of_2(D)))
    return q_out.transpose(1, 2)


@triton.jit
def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, F, s_g, s_u, BF: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BF + tl.arange(0, BF)
    ok = cols < F
    g = tl.load(g_ptr + row * s_g + cols, mask=ok, other=0.0)
    u = tl.load(u_ptr + row * s_u + cols, mask=ok, other=0.0).to(tl.float32)
    gf = g.to(tl.float32)
    s = rounded(gf / (1.0 + tl.exp(-gf)), g.dtype).to(tl.float32)  # F.silu, rounded to the dtype
    tl.store(o_ptr + row * F + cols, rounded(s * u, g.dtype).to(o_ptr.dtype.element_ty), mask=ok)


def silu_mul(gate: Tensor, up: Tensor, store: torch.dtype | None = None) -> Tensor:
    """silu(gate) * up for gate, up [..., F] (may be the two halves of one [.., 2F] output: strided rows), in
    gate's dtype; `store`: the dtype its values are stored in (float32 for a GEMV's x), default gate's."""
    shape = gate.shape
    F = shape[-1]
    g2, u2 = gate.reshape(-1, F), up.reshape(-1, F)
    if g2.stride(-1) != 1 or u2.stride(-1) != 1:
        raise ValueError("gate and up need contiguous features")
    out = torch.empty(g2.shape, dtype=store or gate.dtype, device=gate.device)
    BF = min(1024, triton.next_power_of_2(F))
    _silu_mul_kernel[(g2.shape[0], triton.cdiv(F, BF))](g2, u2, out, F, g2.stride(0), u2.stride(0), BF=BF)
    return out.view(shape)


@triton.jit
def _store_topk(logits, cols, E, w_ptr, id_ptr, row, K: tl.constexpr, BK: tl.constexpr):
    """Softmax over logits [BE] (lanes >= E ignored) in float32, the K largest, renormalised; stored for `row`."""
    x = tl.where(cols < E, logits, float("-inf"))
    e = tl.exp(x - tl.max(x, axis=0))
    p = e / tl.sum(e, axis=0)
    slots = tl.arange(0, BK)
    vals = tl.zeros((BK,), dtype=tl.float32)
    ids = tl.zeros((BK,), dtype=tl.int32)
    for j in tl.static_range(K):  # top-k by k argmaxes: k is small (2 for Mixtral)
        best = tl.argmax(p, axis=0)
        vals = tl.where(slots == j, tl.max(p, axis=0), vals)
        ids = tl.where(slots == j, best, ids)
        p = tl.where(cols == best, -1.0, p)
    w = vals / tl.sum(vals, axis=0)
    tl.store(w_ptr + row * K + slots, rounded(w, w_ptr.dtype.element_ty), mask=slots < K)
    tl.store(id_ptr + row * K + slots, ids.to(id_ptr.dtype.element_ty), mask=slots < K)


@triton.jit
def _topk_softmax_kernel(logit_ptr, w_ptr, id_ptr, E, K: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BE)
    x = tl.load(logit_ptr + row * E + cols, mask=cols < E, other=0.0).to(tl.float32)
    _store_topk(x, cols, E, w_ptr, id_ptr, row, K, BK)


@triton.jit
def _router_kernel(x_ptr, g_ptr, w_ptr, id_ptr, E, D, K: tl.constexpr, BE: tl.constexpr, BD: tl.constexpr,
                   BK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BE)
    acc = tl.zeros((BE,), dtype=tl.float32)
    for d0 in range(0, D, BD):
        rd = d0 + tl.arange(0, BD)
        x = tl.load(x_ptr + row * D + rd, mask=rd < D, other=0.0)
        g = tl.load(g_ptr + cols[:, None] * D + rd[None, :], mask=(cols[:, None] < E) & (rd[None, :] < D), other=0.0)
        acc += tl.sum(g.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    logits = rounded(acc, w_ptr.dtype.element_ty).to(tl.float32)  # the gate's output, in the activations' dtype
    _store_topk(logits, cols, E, w_ptr, id_ptr, row, K, BK)


def topk_softmax(logits: Tensor, top_k: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The router's choice from logits [M, E]: softmax in float32, the top_k experts, their weights renormalised
    to sum 1 (levante.model.MoE's arithmetic); returns (weights [M, k] in `dtype`, expert ids [M, k] int64)."""
    M, E = logits.shape
    logits = logits.contiguous()
    w = torch.empty(M, top_k, dtype=dtype, device=logits.device)
    ids = torch.empty(M, top_k, dtype=torch.long, device=logits.device)
    _topk_softmax_kernel[(M,)](logits, w, ids, E, K=top_k, BE=max(2, triton.next_power_of_2(E)),
                               BK=max(2, triton.next_power_of_2(top_k)))
    return w, ids


def router(x: Tensor, gate: Tensor, top_k: int, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """topk_softmax of the gate's logits x [M, D] @ gate [E, D]^T, computed in the same kernel: float32 products,
    the logits rounded to the activations' `dtype` (default x's; x may be float32 holding such values) as the
    gate's matmul returns them (one kernel instead of a cast, a matmul, a cast and the top-k)."""
    M, D = x.shape
    E = gate.shape[0]
    x = x.contiguous()
    w = torch.empty(M, top_k, dtype=dtype or x.dtype, device=x.device)
    ids = torch.empty(M, top_k, dtype=torch.long, device=x.device)
    BE = max(2, triton.next_power_of_2(E))
    # a gate tile [BE, BD] of 16 KB at most (a float32 one of 32 KB spilled on sm_90 with the GPU's Triton 3.6), no
    # wider than D (a float16 gate of 200 columns, rows not 16-byte aligned, spilled at 1024)
    BD = max(16, min(1024, 16384 // (BE * gate.element_size()), triton.next_power_of_2(D)))
    _router_kernel[(M,)](x, gate.contiguous(), w, ids, E, D, K=top_k, BE=BE, BD=BD,
                         BK=max(2, triton.next_power_of_2(top_k)))
    return w, ids
