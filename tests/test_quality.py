"""Perplexity (llama.cpp chunking and sliding windows) and model comparison (KL, top-1 agreement)."""

import math
from pathlib import Path

import pytest
import torch
from fixtures import hf_model, save_hf

from levante import LLM
from levante.cli import main
from levante.tools.quality import compare, perplexity, windows

TEXT = (Path(__file__).parent.parent / "data" / "kjv_genesis_exodus.txt").read_text()[:6000]


def test_llamacpp_windows():
    ids = list(range(10, 10 + 1030))
    ws = windows(ids, 256, bos_id=1)
    assert len(ws) == 4  # 1030 // 256, the remainder is dropped
    for i, w in enumerate(ws):
        assert w.tokens[0] == 1 and w.tokens[1:] == ids[i * 256 + 1 : (i + 1) * 256]
        assert w.first == 128 and w.targets == ids[i * 256 + 129 : (i + 1) * 256]  # 127 scored per chunk
    assert len(windows(ids, 256, n_chunks=2)) == 2


def test_stride_windows_score_every_token_once():
    ids = list(range(1000))
    ws = windows(ids, 256, stride=100)
    scored = [t for w in ws for t in w.targets]
    assert scored == ids[1:]
    for w in ws:  # the target at logit index j is the token after position j
        assert w.targets == w.tokens[w.first + 1 :]
    assert ws[0].first == 0 and ws[1].first == 255 - 100


class Uniform:
    """A fake model with constant logits: perplexity must equal the vocabulary size."""

    def logits(self, ids):
        return torch.zeros(len(ids), 50)


def test_uniform_model_perplexity_is_vocab_size():
    r = perplexity(Uniform(), list(range(40)) * 20, 64, progress=False)
    assert math.isclose(r.ppl, 50.0, rel_tol=1e-6) and r.err < 1e-6
    assert r.n_scored == (800 // 64) * (64 - 32 - 1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("quality")
    a = save_hf(hf_model("mixtral_8x2", vocab_size=32000, seed=0), d / "a", tokenizer=True)
    m = hf_model("mixtral_8x2", vocab_size=32000, seed=0)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "experts" in name:
                p.add_(0.02 * torch.randn_like(p))
    b = save_hf(m, d / "b", tokenizer=True)
    return a, b


def test_compare_same_model(tiny):
    a, _ = tiny
    llm = LLM(str(a), n_ctx=128, n_threads=2)
    ids = llm.tokenize(TEXT)
    rep = compare(llm, LLM(str(a), n_ctx=128, n_threads=2), ids, 128, n_chunks=3, progress=False)
    assert rep["kl_mean"] < 1e-9 and rep["top1_agreement"] == 1.0
    assert math.isclose(rep["ppl_base"], rep["ppl_other"], rel_tol=1e-9)
    ref = perplexity(llm, ids, 128, n_chunks=3, progress=False)
    assert math.isclose(rep["ppl_base"], ref.ppl, rel_tol=1e-9)
    assert len(rep["chunks"]) == 3


def test_compare_perturbed_model(tiny):
    a, b = tiny
    ids = LLM(str(a), n_ctx=128).tokenize(TEXT)
    rep = compare(LLM(str(a), n_ctx=128), LLM(str(b), n_ctx=128), ids, 128, n_chunks=2, progress=False)
    assert rep["kl_mean"] > 1e-4 and rep["top1_agreement"] < 1.0


def test_cli_perplexity_and_compare(tiny, tmp_path, capsys):
    a, b = tiny
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert main(["perplexity", "-m", str(a), "-f", str(text), "-c", "128", "--chunks", "2"]) == 0
    out = capsys.readouterr().out
    assert "Final estimate: PPL = " in out and "+/-" in out
    assert main(["perplexity", "-m", str(a), "-f", str(text), "-c", "128", "--stride", "64", "--chunks", "3"]) == 0
    report = tmp_path / "r.md"
    assert main(["compare", "-m", str(a), "-m2", str(b), "-f", str(text), "-c", "128", "--chunks", "2",
                 "-o", str(report)]) == 0
    assert "top-1 agreement" in report.read_text()
    assert report.with_suffix(".png").stat().st_size > 1000
