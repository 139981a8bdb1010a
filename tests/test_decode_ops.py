"""The fused C++ decode-step ops (rmsnorm, attn_decode, ffn_decode) equal the torch path they replace."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("gguf")
pytest.importorskip("transformers")

from fixtures import hf_model  # noqa: E402
from gguf_fixtures import write_gguf_from_hf  # noqa: E402
from test_kernels import make_raw, reference  # noqa: E402

import levante.model as lm  # noqa: E402
from levante.formats.gguf import read_gguf  # noqa: E402
from levante.model import apply_rotary, build_model  # noqa: E402
from levante.quant import kernels as kq  # noqa: E402

EXT = kq.decode_ext()
pytestmark = pytest.mark.skipif(EXT is None, reason="fused decode ops need the AVX512_BF16 C++ build")


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 5e-5) -> bool:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) < tol


def test_rmsnorm():
    x, w = torch.randn(3, 200), torch.rand(200) + 0.5
    assert close(EXT.rmsnorm(x, w, 1e-5), F.rms_norm(x, (200,), w, 1e-5), 1e-6)
    with pytest.raises(RuntimeError, match="rmsnorm"):
        EXT.rmsnorm(x, torch.ones(7), 1e-5)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("nh,nkv,hd,cap", [(4, 2, 24, 11), (8, 8, 64, 11), (6, 1, 16, 11), (8, 2, 64, 700)])
def test_attn_decode(nh, nkv, hd, cap, kv_dtype):
    """cap 700: keys walked in several blocks (256 keys for head_dim 64), the last one partial. A float16
    cache (llama.cpp's KV type): the new keys / values are stored rounded, the math is float32."""
    B, m, row0 = 4, 3, 1
    nk = cap - 2
    kc, vc = torch.randn(B, nkv, cap, hd).to(kv_dtype), torch.randn(B, nkv, cap, hd).to(kv_dtype)
    qkv = torch.randn(m, (nh + 2 * nkv) * hd)
    ang = torch.randn(m, hd // 2)
    cos = torch.cat([ang.cos(), ang.cos()], -1)
    sin = torch.cat([-ang.sin(), ang.sin()], -1)
    slots = torch.tensor([2, 7, 0])
    bias = torch.zeros(m, nk)
    bias[0, 5:] = float("-inf")
    bias[2, ::2] = float("-inf")
    ref_k, ref_v = kc.clone(), vc.clone()
    out = EXT.attn_decode(qkv, cos, sin, kc, vc, row0, 1, slots, bias, nh, nkv)
    q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], -1)
    c, s = cos[:, None], sin[:, None]
    q = apply_rotary(q.view(m, nh, hd), c, s)
    k = apply_rotary(k.view(m, nkv, hd), c, s)
    for i in range(m):
        ref_k[row0 + i, :, slots[i]] = k[i].to(kv_dtype)
        ref_v[row0 + i, :, slots[i]] = v.view(m, nkv, hd)[i].to(kv_dtype)
    assert torch.equal(vc, ref_v)  # only the new slots written
    assert close(kc.float(), ref_k.float(), 1e-6 if kv_dtype == torch.float32 else 1e-3)
    untouched = torch.ones(B, cap, dtype=torch.bool)
    untouched[row0 + torch.arange(m), slots] = False
    assert torch.equal(kc.transpose(1, 2)[untouched], ref_k.transpose(1, 2)[untouched])
    K, V = kc[row0 : row0 + m, :, :nk].float(), vc[row0 : row0 + m, :, :nk].float()
    want = F.scaled_dot_product_attention(q[:, :, None], K, V, attn_mask=bias[:, None, None], enable_gqa=nh != nkv)
    assert close(out, want.reshape(m, nh * hd), 1e-5)
    with pytest.raises(RuntimeError, match="slot out of range"):
        EXT.attn_decode(qkv, cos, sin, kc, vc, row0, 1, torch.tensor([2, cap + 5, 0]), bias, nh, nkv)
    with pytest.raises(RuntimeError, match="rows out of range"):
        EXT.attn_decode(qkv, cos, sin, kc, vc, 2, 1, slots, bias, nh, nkv)
    with pytest.raises(RuntimeError, match="bad cache"):
        EXT.attn_decode(qkv, cos, sin, kc.to(torch.bfloat16), vc.to(torch.bfloat16), row0, 1, slots, bias, nh,
                        nkv)


def _expert(types, h, inter, seed):
    raws = [torch.from_numpy(make_raw(t, n, k, seed=seed + j))
            for j, (t, n, k) in enumerate(zip(types, (inter, inter, h), (h, h, inter)))]
    dense = [reference(r.numpy(), t).double() for r, t in zip(raws, types)]
    return raws, [kq.QTYPES[t][0] for t in types], dense


def _ref_ffn(x, w1, w3, w2):
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize(
    "types", [("Q4_0", "Q4_0", "Q4_0"), ("Q4_K", "Q4_K", "Q6_K"), ("Q5_0", "Q8_0", "Q2_K"), ("Q4_1", "Q5_K", "Q3_K")]
)
def test_ffn_decode_moe(m, types):
    h, inter, E, top_k = 256, 512, 6, 3
    raws, qts, dense = [], [], []
    for e in range(E):
        r, q, d = _expert(types, h, inter, seed=10 * e)
        raws += r
        qts += q
        dense.append(d)
    x, logits = torch.randn(m, h), torch.randn(m, E)
    out = EXT.ffn_decode(x, logits, raws, qts, top_k)
    probs = logits.double().softmax(-1)
    w, chosen = probs.topk(top_k, -1)
    w = w / w.sum(-1, keepdim=True)
    want = torch.zeros(m, h, dtype=torch.float64)
    for i in range(m):
        for j in range(top_k):
            want[i] += w[i, j] * _ref_ffn(x[i].double(), *dense[int(chosen[i, j])])
    int16 = {"Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"} & set(types)  # int16 activations (per 32 or 256)
    assert close(out.double(), want, 2e-4 if int16 else 5e-5)


def test_ffn_decode_dense_and_errors():
    h, inter = 64, 96
    raws, qts, dense = _expert(("Q8_0", "Q4_1", "Q5_1"), h, inter, seed=1)
    x = torch.randn(2, h)
    assert close(EXT.ffn_decode(x, torch.empty(0), raws, qts, 1).double(), _ref_ffn(x.double(), *dense))
    with pytest.raises(RuntimeError, match="router logits"):
        EXT.ffn_decode(x, torch.empty(0), raws * 2, qts * 2, 1)
    with pytest.raises(RuntimeError, match="row bytes"):
        EXT.ffn_decode(x, torch.empty(0), raws, [qts[0]] * 3, 1)


@pytest.mark.parametrize(
    "kind,qtype,extra",
    [
        ("mixtral_6x3", "Q4_K", dict(hidden_size=256, intermediate_size=256)),
        ("mixtral_window", "Q4_0", {}),  # window 6 < sequence: rolling cache
        ("odd_head_dim", "Q5_0", {}),  # head_dim 24; a type without the bf16 path
        ("llama_tied", "Q8_0", {}),  # dense MLP
    ],
)
def test_decode_steps_equal_torch_path(kind, qtype, extra, tmp_path, monkeypatch):
    """Two rows of different lengths decoding together (continuous batching) and a plain batch:
    the fused path's logits equal the torch path's, so greedy tokens are identical."""
    torch.set_num_threads(1)
    path = write_gguf_from_hf(hf_model(kind, **extra), tmp_path / "m.gguf", qtype)
    ckpt = read_gguf(path)
    model = build_model(ckpt.config, ckpt.weights)

    def run(fast: bool) -> torch.Tensor:
        if not fast:
            monkeypatch.setattr(lm, "decode_ext", lambda: None)
        cache = model.new_cache(3, 64)
        outs = []
        with torch.no_grad():
            model(torch.tensor([[5, 6, 7, 8, 9, 10, 11]]), cache=cache, rows=slice(1, 2))
            model(torch.tensor([[12, 13, 14]]), cache=cache, rows=slice(2, 3))
            tok = torch.tensor([[20], [30]])
            for _ in range(12):
                logits = model(tok, cache=cache, rows=slice(1, 3), last_only=True)
                outs.append(logits)
                tok = logits[:, -1].argmax(-1, keepdim=True)
        monkeypatch.undo()
        return torch.cat(outs, 1)

    calls = {"layer_decode": 0, "ffn_decode": 0}

    def counting(name):
        f = getattr(EXT, name)

        def counted(*a):
            calls[name] += 1
            return f(*a)
        return counted

    for name in calls:
        monkeypatch.setattr(EXT, name, counting(name))
    fast = run(True)  # (run undoes the patches)
    n_layers = ckpt.config.num_layers
    # every decode step and the two short prefills (<= GEMV_MAX_ROWS tokens of one row: the tokens as rows of
    # one cache row) are one call per layer; ffn_decode runs inside it
    assert calls["layer_decode"] == (12 + 2) * n_layers
    assert calls["ffn_decode"] == 0
    slow = run(False)
    # both paths round x to int16 for these weights (per 32-block: Q4_0, Q8_0 in 16-row groups; per 256:
    # Q4_K), and float-order differences upstream flip some of those roundings: measured 4e-5 (Q4_0) and
    # 1.1e-4 (Q4_K) of the largest logit on these random models, against ~1e-6 for the other types
    assert close(fast, slow, 3e-4 if qtype in ("Q4_0", "Q4_K", "Q8_0") else 1e-5)
    assert torch.equal(fast.argmax(-1), slow.argmax(-1))


def test_f16_kv_cache(tmp_path, monkeypatch):
    """cache_type f16 (LLM(cache_type="f16"), `-ctk f16`): half the cache bytes; the fused decode step and the
    torch path agree on it (both store the keys/values rounded to f16 and attend in float32), and the logits
    stay within f16 rounding of the float32 cache's."""
    torch.set_num_threads(1)
    path = write_gguf_from_hf(hf_model("mixtral_window"), tmp_path / "m.gguf", "Q8_0")
    ckpt = read_gguf(path)
    # GGUF keeps no sliding window: set it, so the 7-token prompt wraps the 6-slot rolling cache ("concat")
    model = build_model(dataclasses.replace(ckpt.config, sliding_window=6), ckpt.weights)

    def run(kv_dtype, fast: bool) -> torch.Tensor:
        if not fast:
            monkeypatch.setattr(lm, "decode_ext", lambda: None)
        cache = model.new_cache(2, 64, kv_dtype)
        assert cache.k[0].dtype == (kv_dtype or torch.float32) and cache.rolling and cache.capacity == 6
        outs = []
        with torch.no_grad():
            outs.append(model(torch.tensor([[5, 6, 7, 8, 9, 10, 11], [3, 4, 5, 6, 7, 8, 9]]), cache=cache))
            tok = torch.tensor([[20], [30]])
            for _ in range(10):
                logits = model(tok, cache=cache, last_only=True)
                outs.append(logits)
                tok = logits[:, -1].argmax(-1, keepdim=True)
        monkeypatch.undo()
        return torch.cat(outs, 1)

    f16_fast, f16_slow, f32 = run(torch.float16, True), run(torch.float16, False), run(None, True)
    assert close(f16_fast, f16_slow, 3e-4)  # as test_decode_steps_equal_torch_path's int16 types
    assert close(f16_fast, f32, 1e-2) and not torch.equal(f16_fast, f32)


def test_cache_type_option():
    from levante.api import LLM

    with pytest.raises(ValueError, match="cache_type"):
        LLM(cache_type="q8_0")
    from levante.cli import build_parser

    args = build_parser().parse_args(["run", "-p", "hi", "-ctk", "f16"])
    assert args.cache_type == "f16"
