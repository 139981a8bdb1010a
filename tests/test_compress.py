"""Low-rank expert compression: SVD factors, budgets, the written HF directory and LowRankWeight."""

import json

import pytest
import torch
from fixtures import hf_model, save_hf

from levante.cli import main
from levante.formats.safetensors import SafetensorsFile
from levante.loader import load, read_checkpoint
from levante.model import build_model
from levante.quant.lowrank import LowRankWeight, choose_ranks, factorize, saved_params, svd_factors
from levante.tools.compress import compress_model, compress_weights, compressible_names


def test_full_rank_factors_reproduce_w():
    torch.manual_seed(0)
    w = torch.randn(48, 80)
    a, b = svd_factors(w)
    assert a.shape == (48, 80) and b.shape == (48, 48)
    assert (b @ a - w).abs().max() <= 1e-4
    cov = torch.randn(200, 80).T @ torch.randn(200, 80) / 200
    cov = cov @ cov.T + torch.eye(80)  # SPD
    a, b = factorize(w, cov).factors(48)  # whitened SVD at full rank is exact too
    assert (b @ a - w).abs().max() <= 1e-4


def test_truncated_factors_are_best_rank_r():
    torch.manual_seed(1)
    w = torch.randn(30, 20)
    a, b = svd_factors(w, 5)
    s = torch.linalg.svdvals(w.double())
    err = torch.linalg.matrix_norm((b @ a - w).double())
    assert torch.isclose(err, s[5:].pow(2).sum().sqrt(), rtol=1e-5)


def test_lowrank_weight_matmul():
    torch.manual_seed(2)
    a, b = torch.randn(4, 16), torch.randn(24, 4)
    lw = LowRankWeight(a, b)
    x = torch.randn(3, 16)
    assert lw.shape == (24, 16) and lw.rank == 4
    assert torch.allclose(lw.matmul(x), x @ (b @ a).T, atol=1e-5)
    assert torch.equal(lw.dequantize(), b @ a)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    d = tmp_path_factory.mktemp("compress")
    return save_hf(hf_model("mixtral_8x2", vocab_size=32000), d / "src", tokenizer=True)


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.75])
def test_budget_removes_counted_parameters(mixtral, ratio):
    ck = read_checkpoint(mixtral)
    res = compress_weights(ck.config, ck.weights, ratio=ratio)
    names = compressible_names(ck.config)
    total = sum(ck.weights[n].numel() for n in names)
    # count what is really stored
    stored = sum(w.n_params if isinstance(w, LowRankWeight) else w.numel() for n, w in res.weights.items()
                 if n in names)
    assert total - stored == res.params_removed
    target = round(ratio * total)
    step = max(sum(ck.weights[n].shape) for n in names)
    assert target <= res.params_removed < target + step  # the greedy stops at the first step past the budget
    assert res.params_total_before - res.params_total_after == res.params_removed
    assert all(isinstance(res.weights[n], LowRankWeight) == (n in res.ranks) for n in names)


def test_choose_ranks_prefers_cheap_energy():
    s_small = torch.linspace(1.0, 0.01, 10)
    s_big = torch.linspace(10.0, 5.0, 10)
    shapes = {"a": (10, 40), "b": (10, 40)}
    ranks = choose_ranks({"a": s_small, "b": s_big}, shapes, 3 * 50)
    assert "b" not in ranks and ranks["a"] < 8
    assert saved_params(shapes["a"], ranks["a"]) >= 150


def test_choose_ranks_in_multiples():
    torch.manual_seed(3)
    shapes = {f"m{i}": (96, 64) for i in range(6)}
    svals = {n: torch.linalg.svdvals(torch.randn(96, 64) * (1 + i)) for i, n in enumerate(shapes)}
    total = 6 * 96 * 64
    one = choose_ranks(svals, shapes, total // 3)
    ranks = choose_ranks(svals, shapes, total // 3, multiple=16)
    assert ranks and all(r % 16 == 0 for r in ranks.values())
    removed = sum(saved_params(shapes[n], r) for n, r in ranks.items())
    assert total // 3 <= removed < total // 3 + 16 * 160
    assert sum(saved_params(shapes[n], r) for n, r in one.items()) >= total // 3
    # multiple=1 is the per-component greedy
    assert choose_ranks(svals, shapes, total // 3, multiple=1) == one


def test_compressed_logits_equal_dense_rebuild(mixtral):
    ck = read_checkpoint(mixtral)
    res = compress_weights(ck.config, ck.weights, ratio=0.3)
    low = build_model(ck.config, res.weights).eval()
    dense_w = {n: (w.dequantize() if isinstance(w, LowRankWeight) else w) for n, w in res.weights.items()}
    dense = build_model(ck.config, dense_w).eval()
    ids = torch.randint(0, 32000, (1, 24))
    with torch.no_grad():
        assert (low(ids) - dense(ids)).abs().max() <= 1e-4


def test_written_directory_loads_as_lowrank(mixtral, tmp_path):
    res, _ = compress_model(mixtral, tmp_path / "out", ratio=0.25)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["ranks"] and all(k.startswith("model.layers.") for k in cfg["ranks"])
    names = SafetensorsFile(tmp_path / "out" / "model.safetensors").keys()
    k = next(iter(cfg["ranks"]))
    assert f"{k}.0.weight" in names and f"{k}.1.weight" in names and f"{k}.weight" not in names
    assert (tmp_path / "out" / "tokenizer.model").is_file()
    ck = read_checkpoint(tmp_path / "out")
    lows = {n: w for n, w in ck.weights.items() if isinstance(w, LowRankWeight)}
    assert len(lows) == len(res.ranks) == len(cfg["ranks"])
    assert all(w.rank == res.ranks[n] for n, w in lows.items())
    loaded = load(tmp_path / "out")
    mods = [m for m in loaded.model.modules() if isinstance(m, LowRankWeight)]
    assert len(mods) == len(res.ranks)


def test_explicit_ranks(mixtral, tmp_path):
    spec = json.dumps({"model.layers.0.block_sparse_moe.experts.3.w1": 8, "layers.1.ffn.experts.0.w2": 4})
    res, _ = compress_model(mixtral, tmp_path / "o", ranks=spec)
    assert res.ranks == {"layers.0.ffn.experts.3.w1": 8, "layers.1.ffn.experts.0.w2": 4}
    assert res.params_removed == 2 * 64 * 96 - 8 * 160 - 4 * 160


def test_dense_model_and_activation_aware(tmp_path):
    src = save_hf(hf_model("mistral_dense", vocab_size=32000), tmp_path / "dense", tokenizer=True)
    ids = torch.randint(3, 32000, (300,)).tolist()
    res, _ = compress_model(src, tmp_path / "dc", ratio=0.3, calib_ids=ids, calib_ctx=128)
    assert res.info["activation_aware"] and res.ranks
    assert all(".ffn.w" in n for n in res.ranks)
    names = SafetensorsFile(tmp_path / "dc" / "model.safetensors").keys()
    assert any(n.endswith("mlp.gate_proj.0.weight") or n.endswith("mlp.down_proj.1.weight") for n in names)
    assert any(isinstance(m, LowRankWeight) for m in load(tmp_path / "dc").model.modules())


def test_cli_round_trip(mixtral, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["compress", "-m", str(mixtral), "-o", str(out), "--ratio", "0.2", "-c", "128", "--chunks", "2"]) == 0
    assert "compressible parameters removed" in capsys.readouterr().out
    rep = (out / "compression_report.md").read_text()
    assert "parameters removed" in rep and "top-1 agreement" in rep
    assert (out / "compression_report.png").is_file()
    assert main(["run", "-m", str(out), "-p", "In the beginning", "-n", "4", "--temp", "0"]) == 0
