"""levante.cuda.triton_attention: the cache attention kernel (Triton's interpreter on CPU, the GPU where there is
one) equals SDPA with the explicit mask, for decode and prefill chunks, grouped heads, sliding windows and
left-padded rows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from levante.cuda.triton_attention import cache_attention


def _reference(q, kc, vc, start, window):
    B, H, T, D = q.shape
    group = H // kc.shape[1]
    out = torch.zeros_like(q)
    for b in range(B):
        qpos = int(start[b]) + torch.arange(T)
        n = max(int(qpos[-1]) + 1, 1)
        k = kc[b, :, :n].repeat_interleave(group, 0).float()
        v = vc[b, :, :n].repeat_interleave(group, 0).float()
        kpos = torch.arange(n)
        mask = (kpos[None] <= qpos[:, None])
        if window:
            mask &= (qpos[:, None] - kpos[None]) < window
        seen = mask.any(-1)  # queries of left padding (negative positions) see nothing: zeros
        o = F.scaled_dot_product_attention(q[b].float(), k, v, attn_mask=mask | ~seen[:, None])
        out[b] = (o * seen[None, :, None]).to(q.dtype)
    return out


@pytest.mark.parametrize(("B", "H", "Hkv", "T", "D", "window"), [
    (3, 4, 2, 1, 32, None),  # decode, grouped heads
    (2, 4, 1, 37, 64, None),  # a prefill chunk, one kv head
    (2, 2, 2, 70, 16, 20),  # longer than a query block, sliding window
    (4, 8, 2, 1, 128, 7),  # decode with a window shorter than the context
    (2, 4, 2, 19, 24, None),  # a head_dim that is not a power of two
])
def test_equals_masked_sdpa(B, H, Hkv, T, D, window):
    torch.manual_seed(T)
    S = 120
    q = torch.randn(B, H, T, D)
    kc, vc = torch.randn(B + 1, Hkv, S + 1, D), torch.randn(B + 1, Hkv, S + 1, D)  # more rows than the batch
    start = torch.tensor([S - T - 7 * i for i in range(B)], dtype=torch.int32)
    got = cache_attention(q, kc, vc, start, window)
    want = _reference(q, kc, vc, start, window)
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("splits", [1, 3, 7])
@pytest.mark.parametrize(("H", "Hkv", "window"), [(8, 2, None), (4, 4, 30), (6, 2, 50)])
def test_decode_in_key_slices(splits, H, Hkv, window):
    """Flash-decoding: a step's keys cut into slices merged by their partial softmaxes equals the whole softmax,
    for grouped heads (3 per kv head: a group that is not a power of two), windows, a row at position 0 and a
    padding row (position -1: zeros); more slices than a short row has key blocks leave some empty."""
    torch.manual_seed(splits)
    S, D = 200, 64
    q = torch.randn(4, H, 1, D)
    kc, vc = torch.randn(4, Hkv, S + 1, D), torch.randn(4, Hkv, S + 1, D)
    start = torch.tensor([S - 1, 0, 37, -1], dtype=torch.int32)
    got = cache_attention(q, kc, vc, start, window, splits=splits)
    want = _reference(q, kc, vc, start, window)
    assert (got - want).abs().max() <= 1e-5
    assert torch.equal(got[3], torch.zeros_like(got[3]))


@pytest.mark.parametrize("T", [1, 5])
def test_ring_buffer(T):
    """A sliding-window cache kept as a ring of R slots (position p at p % R): the same attention as the whole
    cache, for decode (split over key slices) and a chunk of T <= R - window + 1 queries, rows that wrapped
    around several times and one that has not."""
    torch.manual_seed(T)
    B, H, Hkv, D, W, R, S = 3, 4, 2, 32, 12, 16, 90
    kc, vc = torch.randn(B, Hkv, S + 1, D), torch.randn(B, Hkv, S + 1, D)
    start = torch.tensor([S - T, 40, 2], dtype=torch.int32)
    rk, rv = torch.zeros(B, Hkv, R + 1, D), torch.zeros(B, Hkv, R + 1, D)
    for b in range(B):  # what the ring holds after writing positions 0 .. the row's last query
        for p in range(int(start[b]) + T):
            rk[b, :, p % R], rv[b, :, p % R] = kc[b, :, p], vc[b, :, p]
    q = torch.randn(B, H, T, D)
    want = _reference(q, kc, vc, start, W)
    for splits in (None, 3):
        got = cache_attention(q, rk, rv, start, W, splits=splits, ring=R)
        assert (got - want).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="ring buffer"):
        cache_attention(q, rk, rv, start, None, ring=R)


def test_left_padded_rows_and_half_precision():
    """A row whose chunk starts with padding (negative positions): its real queries are exact, the padding's 0."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 32).half()
    kc, vc = torch.randn(2, 2, 20, 32).half(), torch.randn(2, 2, 20, 32).half()
    start = torch.tensor([3, -5], dtype=torch.int32)  # row 1: 5 padding queries, then positions 0..3
    got = cache_attention(q, kc, vc, start)
    want = _reference(q, kc, vc, start, None)
    assert (got.float() - want.float()).abs().max() <= 2e-3
    assert torch.equal(got[1, :, :5], torch.zeros_like(got[1, :, :5]))
    # 16-bit q.k and p.v on tensor cores (p rounded to half, as flash attention does): decode, in key slices
    q1, start1 = q[:, :, :1], torch.tensor([19, 11], dtype=torch.int32)
    got = cache_attention(q1, kc, vc, start1, splits=2)
    assert (got.float() - _reference(q1, kc, vc, start1, None).float()).abs().max() <= 2e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 3])
def test_float32_store_keeps_the_values(dtype, T):
    """store=float32 (the decoder's input of a packed output projection) holds the 16-bit output's very values,
    decode in key slices (T = 1) and the query-block kernel alike."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, T, 32).to(dtype)
    kc, vc = torch.randn(2, 2, 20, 32).to(dtype), torch.randn(2, 2, 20, 32).to(dtype)
    start = torch.tensor([12, 5], dtype=torch.int32)
    want = cache_attention(q, kc, vc, start, splits=2)
    got = cache_attention(q, kc, vc, start, splits=2, store=torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, want.float())
    assert got.transpose(1, 2).is_contiguous()  # heads side by side, as the output projection reads them


def test_rejects_shapes_it_cannot_run():
    with pytest.raises(ValueError, match="do not fit"):
        cache_attention(torch.randn(1, 3, 1, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32),
                        torch.zeros(1, dtype=torch.int32))
