"""Low-rank checkpoints -> GGUF: factors written as separate quantized tensors, read back as LowRankWeights."""

import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from fixtures import hf_model, save_hf

from levante.cli import main
from levante.errors import WeightsError
from levante.loader import read_checkpoint
from levante.model import build_model
from levante.quant.base import QuantWeight
from levante.quant.lowrank import LowRankWeight
from levante.tools.compress import compress_model
from levante.tools.quantize import LOW_RANK_PAD, _gguf_source_kv, quantize_model

IDS = torch.tensor([[1, 17, 250, 3, 99, 140, 7, 301, 45, 12, 200, 5, 88, 160, 33, 2]])


def _logits(weights, cfg) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return build_model(cfg, weights, torch.float32).eval()(IDS)[0]


def _dequantized(weights: dict) -> dict:
    """The same model with every quantized weight dequantized (low-rank factors stay separate)."""
    out = {}
    for n, w in weights.items():
        if isinstance(w, LowRankWeight):
            out[n] = LowRankWeight(*w.factors())
        elif isinstance(w, QuantWeight):
            out[n] = w.dequantize(torch.float32)
        else:
            out[n] = w.float()
    return out


@pytest.fixture(scope="module", params=["mixtral", "llama"])
def lowrank(request, tmp_path_factory):
    """(compressed HF dir, CompressResult, tmp dir) for a per-expert Mixtral and a dense tied Llama."""
    d = tmp_path_factory.mktemp(f"lrgguf-{request.param}")
    if request.param == "mixtral":
        model = hf_model("mixtral_8x2", hidden_size=256, intermediate_size=512, num_local_experts=4)
    else:
        model = hf_model("llama_tied", hidden_size=256, intermediate_size=512)
    src = save_hf(model, d / "src")
    res, _ = compress_model(src, d / "lr", ratio=0.3)
    return d / "lr", res, d


def _gguf(lowrank, qtype: str, expand: bool = False) -> Path:
    lr, _, d = lowrank
    out = d / f"{qtype}{'-expanded' if expand else ''}.gguf"
    if not out.exists():
        quantize_model(lr, out, qtype, progress=False, expand_low_rank=expand)
    return out


def test_factors_are_written_and_read_back_quantized(lowrank):
    lr, res, _ = lowrank
    path = _gguf(lowrank, "Q4_K_M")
    reader = gguf.GGUFReader(path)
    names = {t.name: t for t in reader.tensors}
    lr_a = [n for n in names if n.endswith(".lr_a.weight")]
    assert len(lr_a) == len(res.ranks) == sum(n.endswith(".lr_b.weight") for n in names)
    assert bool(reader.fields["levante.low_rank"].parts[-1][0])
    ck = read_checkpoint(path)
    lows = {n: w for n, w in ck.weights.items() if isinstance(w, LowRankWeight)}
    assert set(lows) == set(res.ranks)
    for n, w in lows.items():
        assert w.quantized and isinstance(w.b, QuantWeight)  # never re-expanded
        assert w.rank == -(-res.ranks[n] // LOW_RANK_PAD) * LOW_RANK_PAD  # zero-padded to 32
        assert w.a.qtype in ("Q4_K", "Q6_K") and w.b.qtype in ("Q4_K", "Q6_K", "Q5_0", "Q8_0")
        if w.rank % 256:  # rank rows not a whole K block: llama.cpp's fallback types
            assert w.b.qtype in ("Q5_0", "Q8_0")
        a, b = w.factors()
        r = res.ranks[n]
        if w.rank > r:  # the padding is exact zeros
            assert a[r:].abs().max().item() == 0 and b[:, r:].abs().max().item() == 0


def test_f32_gguf_logits_equal_hf_dir(lowrank):
    lr, _, _ = lowrank
    hf = read_checkpoint(lr)
    g = read_checkpoint(_gguf(lowrank, "F32"))
    assert any(isinstance(w, LowRankWeight) for w in g.weights.values())
    assert (_logits(g.weights, g.config) - _logits(hf.weights, hf.config)).abs().max() <= 1e-4


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K_M"])
def test_quantized_logits_equal_dequantized_factors(lowrank, qtype):
    g = read_checkpoint(_gguf(lowrank, qtype))
    got = _logits(g.weights, g.config)
    ref = _logits(_dequantized(g.weights), g.config)
    assert (got - ref).abs().max() <= 1e-3


def test_file_is_smaller_by_the_removed_parameters(lowrank):
    lr, res, _ = lowrank
    f32, f32_full = _gguf(lowrank, "F32"), _gguf(lowrank, "F32", expand=True)
    saved = f32_full.stat().st_size - f32.stat().st_size
    slack = 64 * 4 * len(res.ranks) + 8192  # alignment, tensor infos and metadata of the factor tensors
    assert abs(saved - 4 * res.params_removed) <= slack
    q8, q8_full = _gguf(lowrank, "Q8_0"), _gguf(lowrank, "Q8_0", expand=True)
    ck = read_checkpoint(lr)
    padded = sum(o * i - (-(-r // 32) * 32) * (o + i) for n, r in res.ranks.items()
                 for o, i in [ck.weights[n].shape])
    assert abs((q8_full.stat().st_size - q8.stat().st_size) - padded * 34 / 32) <= slack
    assert q8.stat().st_size < q8_full.stat().st_size


def test_requantizing_a_low_rank_gguf_drops_the_padding(lowrank, tmp_path):
    _, res, _ = lowrank
    q8 = _gguf(lowrank, "Q8_0")
    src = read_checkpoint(q8)
    out = quantize_model(q8, tmp_path / "re.gguf", "F32", progress=False)
    g = read_checkpoint(out)
    lows = {n: w for n, w in g.weights.items() if isinstance(w, LowRankWeight)}
    assert {n: w.rank for n, w in lows.items()} == res.ranks  # back to the true ranks, unpadded
    assert all(w.true_rank == res.ranks[n] for n, w in src.weights.items() if isinstance(w, LowRankWeight))
    assert (_logits(g.weights, g.config) - _logits(_dequantized(src.weights), src.config)).abs().max() <= 1e-4


def test_rank_multiple_needs_no_padding(lowrank, tmp_path):
    lr, res, d = lowrank
    src = d / "src"
    res32, _ = compress_model(src, tmp_path / "lr32", ratio=0.3, rank_multiple=32)
    assert res32.ranks and all(r % 32 == 0 for r in res32.ranks.values())
    assert res32.params_removed >= res.params_removed
    q = quantize_model(tmp_path / "lr32", tmp_path / "q.gguf", "Q4_K_M", progress=False)
    full = quantize_model(tmp_path / "lr32", tmp_path / "qx.gguf", "Q4_K_M", progress=False, expand_low_rank=True)
    g = read_checkpoint(q)
    lows = {n: w for n, w in g.weights.items() if isinstance(w, LowRankWeight)}
    assert {n: w.rank for n, w in lows.items()} == res32.ranks  # nothing padded
    assert q.stat().st_size < full.stat().st_size


def test_expanded_file_is_llama_cpp_layout(lowrank):
    lr, _, _ = lowrank
    path = _gguf(lowrank, "F32", expand=True)
    reader = gguf.GGUFReader(path)
    assert not any(".lr_" in t.name for t in reader.tensors) and "levante.low_rank" not in reader.fields
    g = read_checkpoint(path)
    assert not any(isinstance(w, LowRankWeight) for w in g.weights.values())
    hf = read_checkpoint(lr)
    assert (_logits(g.weights, g.config) - _logits(hf.weights, hf.config)).abs().max() <= 1e-4


def _rewrite(src: Path, dst: Path, edit) -> None:
    """Copy an F32 GGUF, passing each (name, array) through `edit` (None drops the tensor)."""
    kv, _ = _gguf_source_kv(src)
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, "llama")
    w.kv_data[0].pop("general.architecture", None)
    for key, value, vtype, sub in kv:
        w.add_key_value(key, value, gguf.GGUFValueType[vtype], sub_type=gguf.GGUFValueType[sub] if sub else None)
    for t in reader.tensors:
        arr = edit(t.name, np.array(t.data))
        if arr is not None:
            w.add_tensor(t.name, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_mismatched_or_missing_factor_is_a_clear_error(lowrank, tmp_path):
    src = _gguf(lowrank, "F32")
    reader = gguf.GGUFReader(src)
    b_name = next(t.name for t in reader.tensors if t.name.endswith(".lr_b.weight"))
    bad = tmp_path / "bad.gguf"
    _rewrite(src, bad, lambda n, a: a[:, :-1] if n == b_name else a)
    with pytest.raises(WeightsError, match=re.escape(b_name)):
        read_checkpoint(bad)
    missing = tmp_path / "missing.gguf"
    _rewrite(src, missing, lambda n, a: None if n == b_name else a)
    with pytest.raises(WeightsError, match=re.escape(f"{b_name} is missing")):
        read_checkpoint(missing)
    a_name = b_name.replace(".lr_b.", ".lr_a.")
    wrong_in = tmp_path / "wrong_in.gguf"
    _rewrite(src, wrong_in, lambda n, a: a[:, :-1] if n == a_name else a)
    with pytest.raises(WeightsError, match=re.escape(a_name)):
        read_checkpoint(wrong_in)


def test_cli_expand_flag(lowrank, tmp_path, capsys):
    lr, _, _ = lowrank
    out = tmp_path / "x.gguf"
    assert main(["quantize", str(lr), str(out), "--type", "F16", "--expand-low-rank"]) == 0
    assert not any(".lr_" in t.name for t in gguf.GGUFReader(out).tensors)
    out2 = tmp_path / "y.gguf"
    assert main(["quantize", str(lr), str(out2), "--type", "F16"]) == 0
    assert "llama.cpp cannot load" in capsys.readouterr().out
    assert out2.stat().st_size < out.stat().st_size
