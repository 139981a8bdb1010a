"""AWQ (AutoAWQ GEMM layout): packing, AWQWeight.matmul, the calibration writer and the HF reader."""

from __future__ import annotations

import gc
import importlib
import json
import math
import sys
import types
import weakref
from pathlib import Path

import pytest
import torch

from levante.api import LLM
from levante.formats.hf import shard_files
from levante.formats.safetensors import SafetensorsFile
from levante.loader import read_checkpoint
from levante.model import build_model, expected_shapes
from levante.quant import awq as awq_fmt
from levante.quant import kernels as kernels_mod
from levante.quant.awq import AWQWeight, dequantize_awq, pack_awq, quantize_groups, unpack_awq
from levante.quant.base import QuantWeight
from levante.tools import awq as awq_mod
from levante.tools.awq import awq_quantize
from tests.fixtures import hf_model, save_hf

TEXT = (Path(__file__).parent / "data" / "oracle_text.txt").read_text(encoding="utf-8")


def _random_awq(out_f: int, in_f: int, g: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (out_f, in_f), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (out_f, in_f // g), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(out_f, in_f // g, generator=gen) * 0.02 + 1e-3).half()
    return codes, zeros, scales


def test_pack_unpack_roundtrip_exact():
    for out_f, in_f, g in ((24, 96, 32), (64, 256, 128), (8, 64, 64)):
        codes, zeros, scales = _random_awq(out_f, in_f, g)
        qw, qz, sc = pack_awq(codes, zeros, scales, g)
        assert qw.dtype == torch.int32 and tuple(qw.shape) == (in_f, out_f // 8)
        assert qz.dtype == torch.int32 and tuple(qz.shape) == (in_f // g, out_f // 8)
        assert sc.dtype == torch.float16 and tuple(sc.shape) == (in_f // g, out_f)
        c2, z2, s2 = unpack_awq(qw, qz, sc)
        assert torch.equal(c2, codes) and torch.equal(z2, zeros) and torch.equal(s2, scales)


def test_nibble_order():
    # column j of a block of 8 holds code j: nibble i must hold column [0, 2, 4, 6, 1, 3, 5, 7][i]
    codes = torch.arange(8, dtype=torch.uint8).repeat(1, 1).T.expand(8, 32).contiguous()  # W[o, k] = o
    qw, _, _ = pack_awq(codes, torch.zeros(8, 1, dtype=torch.uint8), torch.ones(8, 1), 32)
    assert int(qw[0, 0]) & 0xFFFFFFFF == 0x75316420
    assert bool((qw == qw[0, 0]).all())


def test_dequantize_formula():
    codes, zeros, scales = _random_awq(16, 64, 32)
    w = AWQWeight(*pack_awq(codes, zeros, scales, 32)).dequantize()
    ref = (codes.float() - zeros.float().repeat_interleave(32, 1)) * scales.float().repeat_interleave(32, 1)
    assert torch.equal(w, ref)


@pytest.mark.parametrize("shape", [(24, 96, 32), (40, 384, 128), (8, 64, 64), (200, 160, 32)])
@pytest.mark.parametrize("tiled", [False, True])
def test_matmul_matches_dequantize(shape, tiled, monkeypatch):
    out_f, in_f, g = shape
    if tiled:  # 8 rows per tile (Q5_0-stored weights tile in levante.quant.kernels)
        monkeypatch.setattr(awq_fmt, "TILE_BYTES", 8 * 4 * in_f)
        monkeypatch.setattr(kernels_mod, "TILE_BYTES", 8 * 4 * in_f)
    w = AWQWeight(*pack_awq(*_random_awq(out_f, in_f, g, seed=out_f), g))
    dense = w.dequantize()
    for lead in ((1,), (3,), (2, 5), (37,)):
        x = torch.randn(*lead, in_f)
        y = w.matmul(x)
        ref = x @ dense.T
        assert y.shape == (*lead, out_f)
        assert float((y - ref).abs().max()) <= 1e-3 * float(ref.abs().max()) + 1e-6
    xb = torch.randn(4, in_f).bfloat16()
    assert w(xb).dtype == torch.bfloat16
    ids = torch.tensor([[0, out_f - 1], [3, 3]])
    assert torch.equal(w.rows(ids, torch.float32), dense[ids])


def _autoawq_gemm():
    """AutoAWQ's WQLinear_GEMM without its package __init__ (which needs `datasets` and CUDA kernels)."""
    try:
        spec = importlib.util.find_spec("awq")
        if spec is None:
            return None
        if "awq" not in sys.modules:
            m = types.ModuleType("awq")
            m.__path__ = list(spec.submodule_search_locations)
            sys.modules["awq"] = m
        gemm = importlib.import_module("awq.modules.linear.gemm")
        return gemm.WQLinear_GEMM, gemm.dequantize_gemm
    except Exception:  # noqa: BLE001 - any import problem means "no oracle"
        return None


def test_matches_autoawq_packing():
    oracle = _autoawq_gemm()
    if oracle is None:
        pytest.skip("autoawq not installed")
    wq_linear, dequantize_gemm = oracle
    torch.manual_seed(0)
    out_f, in_f, g = 64, 256, 64  # AutoAWQ's packer needs out % 32 == 0
    q, z, s = quantize_groups(torch.randn(out_f, in_f), g)
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    lin.weight.data = ((q - z) * s).reshape(out_f, in_f).half()
    ref = wq_linear.from_linear(lin, 4, g, scales=s[..., 0].t().contiguous().half(), zeros=z[..., 0].t().contiguous())
    mine = pack_awq(q.reshape(out_f, in_f).to(torch.uint8), z[..., 0].to(torch.uint8), s[..., 0], g)
    for a, b in zip(mine, (ref.qweight, ref.qzeros, ref.scales)):
        assert torch.equal(a, b)
    # a checkpoint packed by AutoAWQ reads back to the same weights (AutoAWQ dequantizes in fp16)
    w = AWQWeight(ref.qweight, ref.qzeros, ref.scales, g)
    assert torch.equal(dequantize_gemm(ref.qweight, ref.qzeros, ref.scales, 4, g).T, w.dequantize().half())


# ------------------------------------------------------------------------------ checkpoints


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids]))[0].float()


@pytest.mark.parametrize("kind", ["mixtral_8x2", "mistral_dense"])
def test_awq_checkpoint_roundtrip(kind, tmp_path):
    src = save_hf(hf_model(kind, vocab_size=32000), tmp_path / "src", tokenizer=True)
    out = awq_quantize(src, tmp_path / "awq", TEXT[:2000], group_size=32, n_grid=8)
    conf = json.loads((out / "config.json").read_text())
    assert conf["quantization_config"] == {**conf["quantization_config"], "quant_method": "awq", "bits": 4,
                                           "group_size": 32, "zero_point": True, "version": "gemm"}
    st = SafetensorsFile(out / "model.safetensors")
    names = set(st.keys())
    p = "model.layers.0."
    lin = p + ("block_sparse_moe.experts.1.w2" if kind.startswith("mixtral") else "mlp.down_proj")
    assert st.dtype(lin + ".qweight") == "I32" and st.shape(lin + ".qweight") == (96, 64 // 8)
    assert st.dtype(lin + ".qzeros") == "I32" and st.shape(lin + ".qzeros") == (96 // 32, 64 // 8)
    assert st.dtype(lin + ".scales") == "F16" and st.shape(lin + ".scales") == (96 // 32, 64)
    assert p + "self_attn.q_proj.qweight" in names and p + "self_attn.q_proj.weight" not in names
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    if kind.startswith("mixtral"):
        assert p + "block_sparse_moe.gate.weight" in names
    assert (out / "tokenizer.model").is_file()

    llm = LLM(str(out), n_threads=2)
    assert isinstance(llm.model.model.layers[0].attn.wq, AWQWeight)
    ids = llm.tokenize(TEXT[2000:2600])[:96]
    got = llm.logits(ids)
    # levante's own forward with every AWQ weight dequantized to float32
    ck = read_checkpoint(out)
    dense = {k: (w.dequantize() if isinstance(w, QuantWeight) else w.float()) for k, w in ck.weights.items()}
    ref = _logits(build_model(ck.config, dense).eval(), ids)
    assert float((got - ref).abs().max()) <= 1e-3 * float(ref.abs().max())
    # and close to the float model: random N(0, 0.08) weights are a worst case for 4 bits (plain
    # round-to-nearest is 0.26 / 0.33 relative error here, AWQ 0.19 / 0.32)
    flt = LLM(str(src), n_threads=2).logits(ids)
    rel = float((got - flt).norm() / flt.norm())
    assert rel < 0.4, rel
    assert float((got.argmax(-1) == flt.argmax(-1)).float().mean()) > 0.4


def test_cli_awq(tmp_path):
    from levante.cli import main

    src = save_hf(hf_model("mistral_dense", vocab_size=32000), tmp_path / "src", tokenizer=True)
    (tmp_path / "calib.txt").write_text(TEXT[:800])
    rc = main(["quantize", "--awq", "-m", str(src), "-o", str(tmp_path / "q"), "--calib", f"@{tmp_path / 'calib.txt'}",
               "--group-size", "32"])
    assert rc == 0
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    assert main(["quantize", "--awq", "-m", str(src), "-o", str(tmp_path / "q2")]) == 1  # no --calib


# ------------------------------------------------------------------------- layer-by-layer streaming


def _whole_model_awq(src: Path, calib, group_size: int, n_grid: int, seq_len: int = 512,
                     max_loss_tokens: int = 4096) -> dict[str, torch.Tensor]:
    """The oracle: awq_quantize as it was before streaming (the whole float model built in memory, every
    layer run through `build_model`'s blocks), returning the output tensors by Hugging Face name."""
    ckpt = read_checkpoint(src)
    cfg = ckpt.config
    weights = {k: (w.dequantize() if isinstance(w, QuantWeight) else w.float()).clone()
               for k, w in ckpt.weights.items()}
    tokens = awq_mod._calib_tokens(calib, ckpt, src, 2048, seq_len)
    body = build_model(cfg, weights, torch.float32).model
    B, T = tokens.shape
    gen = torch.Generator().manual_seed(0)

    def sub(x):
        if x.shape[0] <= max_loss_tokens:
            return x
        return x[torch.randperm(x.shape[0], generator=gen)[:max_loss_tokens].sort().values]

    from levante.model import _Plan

    quantized = {}
    with torch.no_grad():
        positions = torch.arange(T)[None].expand(B, T)
        x = body.embed.rows(tokens, torch.float32)
        cos, sin = body.rotary.cos_sin(positions, torch.float32)
        plan = _Plan(None, positions, cfg.sliding_window, slice(0, B))
        for li, blk in enumerate(body.layers):
            X, x = awq_mod._capture(blk, lambda b=blk, i=li, h=x: b(h, cos, sin, plan, i))
            for n, qw in awq_mod._awq_layer(blk, X, cfg.is_moe, cfg.num_experts, group_size, n_grid, True,
                                            sub).items():
                quantized[f"layers.{li}.{n}"] = qw
    out = {}
    for k, w in weights.items():
        b = awq_mod.hf_base_name(k)
        if k in quantized:
            out[b + ".qweight"], out[b + ".qzeros"], out[b + ".scales"] = quantized[k].packed()
        else:
            out[b + ".weight"] = w.to(torch.float16)
    return out


def _read_all(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in shard_files(directory):
        st = SafetensorsFile(f)
        out.update({k: st.get(k).clone() for k in st.keys()})
    return out


@pytest.mark.parametrize("kind", ["mixtral_8x2", "mistral_dense", "llama_tied"])
def test_streaming_matches_whole_model(kind, tmp_path):
    """Layer-by-layer AWQ writes byte-identical tensors to the whole-model computation (bf16 source with
    fused experts for Mixtral, several calibration rows, subsampled loss rows, several output shards)."""
    model = hf_model(kind, vocab_size=32000, num_hidden_layers=3).to(torch.bfloat16)
    src = save_hf(model, tmp_path / "src", tokenizer=True, max_shard_size="200KB")
    del model
    kw = dict(group_size=32, n_grid=4, seq_len=128, max_loss_tokens=100)
    ref = _whole_model_awq(src, TEXT[:1500], **kw)
    out = awq_quantize(src, tmp_path / "awq", TEXT[:1500], max_shard_bytes=1, **kw)
    assert (out / "model.safetensors.index.json").is_file() and len(shard_files(out)) == 4  # a shard per layer
    got = _read_all(out)
    assert set(got) == set(ref)
    for k, r in ref.items():
        assert got[k].dtype == r.dtype and got[k].shape == r.shape, k
        assert got[k].numpy().tobytes() == r.numpy().tobytes(), k
    # one shard: the plain single-file layout, no index
    one = awq_quantize(src, tmp_path / "one", TEXT[:1500], **kw)
    assert sorted(p.name for p in one.glob("model*")) == ["model.safetensors"]
    assert all(torch.equal(v, got[k]) for k, v in _read_all(one).items())


def test_awq_streams_layer_by_layer(tmp_path, monkeypatch):
    """At most one decoder layer's float weights are ever alive, and each layer's packed tensors are on disk
    before the next layer is loaded. The source is bf16, so any float32 tensor shaped like a linear weight
    is a materialised copy; the check counts them (after gc.collect()) whenever a layer is loaded."""
    n_layers = 4
    model = hf_model("mixtral_8x2", num_hidden_layers=n_layers, intermediate_size=160).to(torch.bfloat16)
    src = save_hf(model, tmp_path / "src")
    del model
    cfg = read_checkpoint(src).config
    weight_shapes = {s for k, s in expected_shapes(cfg).items() if k.startswith("layers.0.") and len(s) == 2}
    assert len(weight_shapes) == 5  # wq/wo, wk/wv, w1/w3, w2, router: distinct from activations' shapes

    def float_weight_copies() -> set[int]:
        gc.collect()
        return {o.untyped_storage().data_ptr() for o in gc.get_objects()
                if type(o) is torch.Tensor and o.dtype == torch.float32 and tuple(o.shape) in weight_shapes}

    out_dir = tmp_path / "awq"
    real = awq_mod._load_layer
    loaded: list[str] = []
    alive: list = []  # weak references to every tensor a loader call returned

    def load_layer(src_weights, prefix):
        assert float_weight_copies() == set(), f"float weights alive when loading {prefix}"
        assert all(r() is None for _, r in alive), f"an earlier layer's float weights are alive at {prefix}"
        assert len(list(out_dir.glob(".awq-part-*"))) == len(loaded), "earlier layers not written yet"
        lw = real(src_weights, prefix)
        assert lw and all(k.startswith(prefix) for k in lw)
        assert float_weight_copies() == {w.untyped_storage().data_ptr() for w in lw.values() if w.ndim == 2}
        loaded.append(prefix)
        alive.extend((k, weakref.ref(w)) for k, w in lw.items())
        return lw

    monkeypatch.setattr(awq_mod, "_load_layer", load_layer)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 320, (300,), generator=gen)
    out = awq_quantize(src, out_dir, ids, group_size=32, n_grid=3, seq_len=100, max_shard_bytes=1)
    assert loaded == [f"layers.{i}." for i in range(n_layers)]
    assert float_weight_copies() == set() and all(r() is None for _, r in alive)
    assert len(shard_files(out)) == n_layers + 1 and not list(out.glob(".awq-part-*"))
    ck = read_checkpoint(out)  # the sharded output reads back (index included)
    assert isinstance(ck.weights["layers.3.ffn.experts.7.w2"], AWQWeight)


# -------------------------------------------------------------------------- AWQ vs round-to-nearest


def _trained_llama_with_outliers(tmp_path: Path, train_ids: list[int], vocab: int) -> Path:
    """A tiny Llama trained a little on the text, then given activation-outlier channels by an exact
    reparametrisation (norm gain x20 on a few channels, the matching weight columns /20): the float
    model is unchanged, but round-to-nearest now loses the small weight columns that matter - the
    situation AWQ was designed for (real LLMs grow such channels in training)."""
    model = hf_model("llama_tied", vocab_size=vocab, hidden_size=64, intermediate_size=128, seed=1)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.tensor(train_ids)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        starts = torch.randint(0, len(data) - 65, (8,), generator=gen)
        batch = torch.stack([data[s : s + 65] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        chans = torch.tensor([3, 17, 40])
        for layer in model.model.layers:
            for norm, lins in ((layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                        layer.self_attn.v_proj]),
                               (layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj])):
                norm.weight[chans] *= 20
                for lin in lins:
                    lin.weight[:, chans] /= 20
    return save_hf(model, tmp_path / "trained")


def _eval(path: Path, ids: list[int]) -> torch.Tensor:
    from levante.loader import load

    return torch.log_softmax(_logits(load(path).model.eval(), ids)[:-1], -1)


def test_awq_beats_rtn(tmp_path):
    """On held-out text, AWQ's perplexity is closer to the float model's than plain round-to-nearest's
    (same bits, same group size), and so is its next-token distribution (KL to float). On a model this
    small the sign of a perplexity change is noise (RTN can land below float), so we compare distances."""
    llm = LLM(str(save_hf(hf_model("mistral_dense", vocab_size=32000), tmp_path / "tok", tokenizer=True)))
    text_ids = llm.tokenize(TEXT)
    vocab = {t: i for i, t in enumerate(sorted(set(text_ids)))}  # a compact vocabulary: fast training
    ids = [vocab[t] for t in text_ids]
    cut = int(len(ids) * 0.8)
    src = _trained_llama_with_outliers(tmp_path, ids[:cut], len(vocab))
    held = ids[cut:]
    awq = awq_quantize(src, tmp_path / "awq", ids[:cut], group_size=64, n_grid=20)
    rtn = awq_quantize(src, tmp_path / "rtn", ids[:cut], group_size=64, n_grid=1, clip=False)  # alpha=0: s=1
    tgt = torch.tensor(held[1:])
    lp = {k: _eval(p, held) for k, p in (("float", src), ("awq", awq), ("rtn", rtn))}
    ppl = {k: math.exp(float(torch.nn.functional.nll_loss(v, tgt))) for k, v in lp.items()}
    kl = {k: float((lp["float"].exp() * (lp["float"] - lp[k])).sum(-1).mean()) for k in ("awq", "rtn")}
    print(f"perplexity {ppl}, KL(float||q) {kl}")
    assert kl["awq"] < kl["rtn"]
    assert abs(ppl["awq"] - ppl["float"]) < abs(ppl["rtn"] - ppl["float"])


@pytest.mark.parametrize("g", [32, 64, 128, 16])
def test_q5_0_storage_is_exact(g):
    """Group sizes that are multiples of 32 are stored as GGML Q5_0 blocks: same weights bit for bit,
    the AutoAWQ tensors come back unchanged, and one row of x goes through the C++ GEMV."""
    out_f, in_f = 40, 256
    qw, qz, sc = pack_awq(*_random_awq(out_f, in_f, g, seed=g), g)
    w = AWQWeight(qw, qz, sc, g)
    assert w._q5 == (g % 32 == 0)
    assert torch.equal(w.dequantize(), dequantize_awq(qw, qz, sc))
    for a, b in zip(w.packed(), (qw, qz, sc)):
        assert torch.equal(a, b)
    x = torch.randn(1, in_f)
    ref = x.double() @ w.dequantize().double().T
    assert float((w.matmul(x) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    ids = torch.tensor([3, 0, 39])
    assert torch.equal(w.rows(ids, torch.float32), w.dequantize()[ids])


def test_bench_weight_summary_counts_nested_weights_once():
    """An AWQWeight holds its Q5_0 blocks as an inner QuantWeight: `levante bench` counts the owner only."""
    from levante.quant.base import DenseWeight
    from levante.tools.bench import weight_summary

    awq = AWQWeight(*pack_awq(*_random_awq(64, 128, 32), 32))
    dense = DenseWeight(torch.randn(8, 128))
    net = torch.nn.ModuleDict({"a": awq, "b": dense, "tied": dense})
    nbytes, quant, params = weight_summary(net)
    assert (nbytes, quant, params) == (awq.nbytes + dense.nbytes, "AWQ4", 64 * 128 + 8 * 128)
