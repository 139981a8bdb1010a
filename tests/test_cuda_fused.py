"""levante.cuda.triton_fused: each fused kernel of the decode step equals the torch ops it replaces (the model's
rounding), in float32 and bfloat16, at odd sizes (run by Triton's interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from levante.cuda.triton_fused import add_rms_norm, rope_and_cache, router, silu_mul, topk_softmax
from levante.model import RMSNorm
from levante.rope import apply_rotary

DTYPES = [torch.float32, torch.bfloat16]


def _close(got: torch.Tensor, want: torch.Tensor, reduced: bool = False) -> None:
    """float32: equal to 1e-6 (exp and sums are not torch's to the last bit); bfloat16: the same values, the
    kernels round where torch rounds (`reduced`: a sum of another order may move a value by one rounding step)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.bfloat16 and not reduced:
        assert torch.equal(got, want)
        return
    if want.dtype == torch.bfloat16:  # one step, and rarely
        assert (got != want).float().mean() <= 0.02
    rtol = 1e-6 if want.dtype == torch.float32 else 8e-3
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 96])
def test_add_rms_norm(dtype, d):
    torch.manual_seed(d)
    x, delta = torch.randn(5, 3, d).to(dtype), torch.randn(5, 3, d).to(dtype)
    norm = RMSNorm((1 + 0.1 * torch.randn(d)).to(dtype), 1e-5)
    new, y = add_rms_norm(x, delta, norm.weight, norm.eps)
    assert torch.equal(new, x + delta)  # the residual stream: exactly torch's add
    _close(y, norm(x + delta), reduced=True)
    parts = torch.randn(5, 3, 2, d).to(dtype)  # a MoE's top-2 outputs: summed (rounded as torch's sum), then added
    new2, y2 = add_rms_norm(x, parts, norm.weight, norm.eps)
    assert torch.equal(new2, x + parts.sum(-2))
    _close(y2, norm(x + parts.sum(-2)), reduced=True)
    with pytest.raises(ValueError, match="does not fit"):
        add_rms_norm(x, torch.randn(5, 2, d).to(dtype), norm.weight, norm.eps)
    same, y0 = add_rms_norm(x, None, norm.weight, norm.eps)
    assert same is x or torch.equal(same, x)
    _close(y0, norm(x), reduced=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("head_dim", "ring"), [(24, 0), (64, 0), (64, 8)])
def test_rope_and_cache(dtype, head_dim, ring):
    """q, k, v as strided views of one qkv output; rows of 3 tokens, one padding token (its slot: the dump); the
    angles made in the kernel equal levante.model.Rotary's; a ring buffer's slots are position % ring."""
    from levante.model import Rotary

    torch.manual_seed(head_dim)
    B, T, H, Hkv, S = 2, 3, 4, 2, 16
    qkv = torch.randn(B, T, (H + 2 * Hkv) * head_dim).to(dtype)
    q, k, v = qkv.split([H * head_dim, Hkv * head_dim, Hkv * head_dim], dim=-1)
    positions = torch.tensor([[-1, 0, 1], [7, 8, 9]])

    class Cfg:
        rope_theta, rope_scaling = 10000.0, None

    cfg = Cfg()
    cfg.head_dim = head_dim
    rotary = Rotary(cfg)
    cos, sin = rotary.cos_sin(positions, dtype)
    slots = positions % ring if ring else positions
    slots = torch.where(positions < 0, S, slots)
    kc, vc = torch.zeros(B, Hkv, S + 1, head_dim, dtype=dtype), torch.zeros(B, Hkv, S + 1, head_dim, dtype=dtype)
    got_q = rope_and_cache(q, k, v, positions, rotary.inv_freq, kc, vc, H, Hkv, S, ring)
    want_q = apply_rotary(q.reshape(B, T, H, head_dim).transpose(1, 2), cos, sin)
    want_k = apply_rotary(k.reshape(B, T, Hkv, head_dim).transpose(1, 2), cos, sin)
    _close(got_q, want_q)
    row = torch.arange(B)[:, None]
    wk, wv = torch.zeros_like(kc), torch.zeros_like(vc)
    wk[row, :, slots] = want_k.transpose(1, 2)
    wv[row, :, slots] = v.reshape(B, T, Hkv, head_dim)
    _close(kc, wk)
    assert torch.equal(vc, wv)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul(dtype):
    h = (torch.randn(7, 2 * 1100) * 3).to(dtype)  # 1100: more than one 1024-wide block, not a multiple
    gate, up = h[:, :1100], h[:, 1100:]
    _close(silu_mul(gate, up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("e", "k"), [(8, 2), (6, 3), (60, 4)])
def test_topk_softmax(dtype, e, k):
    logits = (torch.randn(9, e) * 2).to(dtype)
    probs = torch.softmax(logits.float(), dim=-1)
    want_w, want_ids = probs.topk(k, dim=-1)
    want_w = (want_w / want_w.sum(-1, keepdim=True)).to(dtype)
    w, ids = topk_softmax(logits, k, dtype)
    # bf16 logits tie (equal probabilities): either order of tied experts is the same choice
    order, want_order = ids.argsort(-1), want_ids.argsort(-1)
    assert torch.equal(ids.gather(-1, order), want_ids.gather(-1, want_order))
    _close(w.gather(-1, order), want_w.gather(-1, want_order), reduced=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("e", "k", "d"), [(8, 2, 96), (6, 3, 1500)])
def test_router(dtype, e, k, d):
    """The gate's matmul (a float32 weight, as levante keeps the router) in the top-k kernel: the choice of
    DenseWeight(gate)(x) then topk_softmax, logits rounded to x's dtype."""
    from levante.quant.base import DenseWeight

    torch.manual_seed(d)
    x = torch.randn(9, d).to(dtype)
    gate = torch.randn(e, d) * 0.1
    want_w, want_ids = topk_softmax(DenseWeight(gate)(x), k, dtype)
    w, ids = router(x, gate, k)
    order, want_order = ids.argsort(-1), want_ids.argsort(-1)
    assert torch.equal(ids.gather(-1, order), want_ids.gather(-1, want_order))
    _close(w.gather(-1, order), want_w.gather(-1, want_order), reduced=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_stores_keep_the_values(dtype):
    """`store=float32` (the decoder's inputs of packed weights) stores the very values of the 16-bit result: the
    norms (alone, after a residual, after top-2 parts), the activation; the router reads float32 x holding 16-bit
    values and rounds its logits to `dtype`, as on the 16-bit x."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 200, generator=g).to(dtype), (1 + torch.randn(200, generator=g) / 4).to(dtype)
    for delta in (None, torch.randn(3, 200, generator=g).to(dtype), torch.randn(3, 2, 200, generator=g).to(dtype)):
        new, h = add_rms_norm(x, delta, w, 1e-5)
        new32, h32 = add_rms_norm(x, delta, w, 1e-5, torch.float32)
        assert h32.dtype == torch.float32 and torch.equal(h32, h.float()) and torch.equal(new32, new)
    gate, up = torch.randn(3, 300, generator=g).to(dtype), torch.randn(3, 300, generator=g).to(dtype)
    act = silu_mul(gate, up, torch.float32)
    assert act.dtype == torch.float32 and torch.equal(act, silu_mul(gate, up).float())
    experts = torch.randn(8, 200, generator=g).to(dtype)
    weights, ids = router(x, experts, 2)
    weights32, ids32 = router(x.float(), experts, 2, dtype)
    assert weights32.dtype == dtype and torch.equal(weights32, weights) and torch.equal(ids32, ids)
