"""AWQ of a low-rank (`levante compress`) checkpoint: the factors A and B stay factored, each its own AWQ linear."""

from __future__ import annotations

import json

import pytest
import torch

from levante.formats.safetensors import SafetensorsFile
from levante.loader import read_checkpoint
from levante.model import build_model
from levante.quant.awq import AWQWeight
from levante.quant.lowrank import LowRankWeight
from levante.tools import awq as awq_mod
from levante.tools.awq import awq_quantize
from levante.tools.compress import compress_model, dir_size
from tests.fixtures import hf_model, save_hf

G = 32


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed))


def _logits(weights: dict, cfg, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return build_model(cfg, weights).eval()(ids[None])[0].float()


def _quantized_params(ck) -> int:
    """Parameters stored 4-bit (factors count r * (in + out))."""
    n = 0
    for w in ck.weights.values():
        if isinstance(w, LowRankWeight):
            n += w.a.out_features * w.a.in_features + w.b.out_features * w.b.in_features
        elif isinstance(w, AWQWeight):
            n += w.out_features * w.in_features
    return n


@pytest.fixture(scope="module", params=["mixtral_8x2", "llama_tied"])
def models(request, tmp_path_factory):
    """(kind, float source, low-rank dir (ranks multiples of G), low-rank dir (ranks padded), AWQ outputs)."""
    torch.set_num_threads(1)
    kind = request.param
    tmp = tmp_path_factory.mktemp(kind)
    src = save_hf(hf_model(kind, hidden_size=128, intermediate_size=256), tmp / "src")
    lr_even, _ = compress_model(src, tmp / "lr_even", ratio=0.5, rank_multiple=G)
    lr_odd, _ = compress_model(src, tmp / "lr_odd", ratio=0.5)
    calib = _ids(400, 0)
    kw = dict(group_size=G, n_grid=6, seq_len=100)
    return {
        "kind": kind, "src": src, "ranks_even": lr_even.ranks, "ranks_odd": lr_odd.ranks,
        "lr_even": tmp / "lr_even", "lr_odd": tmp / "lr_odd",
        "awq_full": awq_quantize(src, tmp / "awq_full", calib, **kw),
        "awq_even": awq_quantize(tmp / "lr_even", tmp / "awq_even", calib, **kw),
        "awq_odd": awq_quantize(tmp / "lr_odd", tmp / "awq_odd", calib, **kw),
    }


def _payload(path) -> int:
    """Bytes of tensor data in a safetensors file (the file less its JSON header)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - n


def _factored_bases(ranks: dict[str, int]) -> list[str]:
    from levante.formats.hf import hf_base_name

    return [hf_base_name(n) for n in ranks]


@pytest.mark.parametrize("variant", ["even", "odd"])
def test_factors_written_and_loaded(models, variant):
    out, ranks = models[f"awq_{variant}"], models[f"ranks_{variant}"]
    assert ranks and (variant == "odd") == any(r % G for r in ranks.values())
    conf = json.loads((out / "config.json").read_text())
    assert conf["quantization_config"]["quant_method"] == "awq" and conf["quantization_config"]["group_size"] == G
    src_conf = json.loads((models[f"lr_{variant}"] / "config.json").read_text())
    assert conf["ranks"] == src_conf["ranks"]  # the true ranks, padded or not
    st = SafetensorsFile(out / "model.safetensors")
    names = set(st.keys())
    for base in _factored_bases(ranks):
        r = conf["ranks"][base]
        rp = -(-r // G) * G
        assert base + ".qweight" not in names and base + ".weight" not in names
        assert base + ".0.weight" not in names and base + ".1.weight" not in names
        a_in = st.shape(base + ".0.qweight")[0]
        out_f = st.shape(base + ".1.qweight")[1] * 8
        assert st.shape(base + ".0.qweight") == (a_in, rp // 8) and st.shape(base + ".0.scales") == (a_in // G, rp)
        assert st.shape(base + ".1.qweight") == (rp, out_f // 8)
        assert st.shape(base + ".1.qzeros") == (rp // G, out_f // 8)
        assert st.dtype(base + ".1.scales") == "F16"
    if models["kind"] == "llama_tied":
        assert "model.layers.0.mlp.gate_proj.0.qweight" in names
    else:
        assert "model.layers.0.block_sparse_moe.experts.0.w1.0.qweight" in names
    ck = read_checkpoint(out)
    for canon, r in ranks.items():
        w = ck.weights[canon]
        assert isinstance(w, LowRankWeight) and isinstance(w.a, AWQWeight) and isinstance(w.b, AWQWeight)
        assert w.true_rank == r and w.rank == -(-r // G) * G
        a, b = w.factors()
        assert not a[r:].any() and not b[:, r:].any()  # the rank padding dequantizes to exact zeros
    assert isinstance(ck.weights["layers.0.attn.wq"], AWQWeight)


@pytest.mark.parametrize("variant", ["even", "odd"])
def test_logits_match_dequantized_factors(models, variant):
    ck = read_checkpoint(models[f"awq_{variant}"])
    ids = _ids(64, 1)
    got = _logits(ck.weights, ck.config, ids)
    deq = {k: LowRankWeight(*w.factors()) if isinstance(w, LowRankWeight) else w for k, w in ck.weights.items()}
    assert all(isinstance(w.a, torch.Tensor) for w in deq.values() if isinstance(w, LowRankWeight))
    ref = _logits(deq, ck.config, ids)
    assert float((got - ref).abs().max()) <= 1e-4
    # and close to the float low-rank model it quantized (a wrong scale fold would not be): random N(0, 0.08)
    # weights are a worst case for 4 bits, see tests/test_awq.py
    src = read_checkpoint(models[f"lr_{variant}"])
    flt = _logits(src.weights, src.config, ids)
    rel = float((got - flt).norm() / flt.norm())
    assert rel < 0.45, rel


def test_size_keeps_compression_savings(models):
    full, lr = read_checkpoint(models["awq_full"]), read_checkpoint(models["awq_even"])
    n_full, n_lr = _quantized_params(full), _quantized_params(lr)
    removed = n_full - n_lr
    assert removed > 0.3 * n_full  # ratio 0.5 of the MLP / expert parameters, no rank padding
    per_param = 0.5 + 2.5 / G  # 4-bit code + (fp16 scale + 4-bit zero) per group
    s_full, s_lr = (dir_size(models[k] / "model.safetensors") for k in ("awq_full", "awq_even"))
    d_full, d_lr = (_payload(models[k] / "model.safetensors") for k in ("awq_full", "awq_even"))
    assert d_lr == d_full - removed * per_param  # tensor data: exactly the removed parameters' share
    # the file (+ the safetensors header, which names 6 instead of 3 tensors per factored matrix)
    assert abs(s_lr - (s_full - removed * per_param)) < 0.03 * s_full, (s_lr, s_full, removed)
    assert s_lr < s_full - 0.9 * removed * per_param


def test_awq_beats_rtn_on_factors(models, tmp_path):
    """The activation-aware search over the factors (with its folds) does at least as well as plain RTN of them."""
    calib = _ids(400, 0)
    rtn = awq_quantize(models["lr_even"], tmp_path / "rtn", calib, group_size=G, n_grid=1, seq_len=100, clip=False)
    src = read_checkpoint(models["lr_even"])
    ids = _ids(200, 0)  # the calibration tokens (what the search optimises)
    flt = _logits(src.weights, src.config, ids)
    errs = []
    for d in (models["awq_even"], rtn):
        ck = read_checkpoint(d)
        errs.append(float((_logits(ck.weights, ck.config, ids) - flt).norm() / flt.norm()))
    assert errs[0] <= errs[1] * 1.02, errs


@pytest.mark.parametrize("variant", ["even", "odd"])
def test_scale_folds_are_exact(models, variant, monkeypatch):
    """Every scale applied to a factor is folded exactly (norm gain, router columns, rows of A, rows of B):
    with random scales and no clipping, the scaled float layer computes what the original layer did."""
    from levante.model import Rotary, _Plan

    ck = read_checkpoint(models[f"lr_{variant}"])
    cfg = ck.config
    gen = torch.Generator().manual_seed(3)
    monkeypatch.setattr(awq_mod, "search_scale", lambda pairs, x_mean, g, n: torch.exp(
        0.5 * torch.randn(len(x_mean), generator=gen)))
    T = 40
    positions = torch.arange(T)[None]
    cos, sin = Rotary(cfg).cos_sin(positions, torch.float32)
    plan = _Plan(None, positions, cfg.sliding_window, slice(0, 1))
    x = torch.randn(1, T, cfg.hidden_size, generator=gen)
    for li in range(cfg.num_layers):
        p = f"layers.{li}."
        lw = awq_mod._load_layer(ck.weights, p, G)
        assert {k[:-2] for k in lw if k.endswith((".a", ".b"))} == {n for n in models[f"ranks_{variant}"]
                                                                   if n.startswith(p)}
        blk = awq_mod._build_block(cfg, lw, p)
        with torch.no_grad():
            X, ref = awq_mod._capture(blk, lambda b=blk, h=x, i=li: b(h, cos, sin, plan, i))
            before = {k: v.clone() for k, v in lw.items()}
            q = awq_mod._awq_layer(blk, X, cfg.is_moe, cfg.num_experts, G, 4, False, lambda t: t)
            assert sum(not torch.equal(before[k], v) for k, v in lw.items()) > len(lw) // 2  # scaled
            got = blk(x, cos, sin, plan, li)
        assert float((got - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
        assert {k for k in q if k.endswith((".a", ".b"))} == {k[len(p):] for k in lw if k.endswith((".a", ".b"))}
        x = ref


def test_expand_low_rank(models, tmp_path):
    """expand_low_rank=True: the old behaviour, B @ A quantized as a full matrix (no factors, no `ranks`)."""
    out = awq_quantize(models["lr_odd"], tmp_path / "x", _ids(400, 0), group_size=G, n_grid=2, seq_len=100,
                       expand_low_rank=True)
    assert "ranks" not in json.loads((out / "config.json").read_text())
    names = set(SafetensorsFile(out / "model.safetensors").keys())
    for base in _factored_bases(models["ranks_odd"]):
        assert base + ".qweight" in names and base + ".0.qweight" not in names
    ck = read_checkpoint(out)
    assert not any(isinstance(w, LowRankWeight) for w in ck.weights.values())
    assert _payload(out / "model.safetensors") == _payload(models["awq_full"] / "model.safetensors")
