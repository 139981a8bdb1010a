"""Files written by `levante quantize` against files quantized by llama.cpp itself (perplexity in llama.cpp)."""

from __future__ import annotations

import ctypes
import math
from pathlib import Path

import numpy as np
import pytest
from fixtures import smollm2_gguf

from levante.tools.quantize import quantize_model

pytestmark = pytest.mark.oracle
llama_cpp = pytest.importorskip("llama_cpp")

FTYPES = {"Q4_0": 2, "Q8_0": 7, "Q4_K_M": 15}
TEXT = Path(__file__).parent / "data" / "oracle_text.txt"


def llama_perplexity(path: Path, n_ctx: int = 256) -> float:
    """llama.cpp-style perplexity (non-overlapping chunks of n_ctx, second half of each scored)."""
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=2, logits_all=True, verbose=False)
    ids = llm.tokenize(TEXT.read_text().encode(), add_bos=False)
    nll, count = 0.0, 0
    for start in range(0, len(ids) - n_ctx + 1, n_ctx):
        chunk = [llm.token_bos()] + ids[start + 1 : start + n_ctx]
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:n_ctx], dtype=np.float64)
        for i in range(n_ctx // 2, n_ctx - 1):
            row = logits[i]
            lse = row.max() + math.log(np.exp(row - row.max()).sum())
            nll += lse - row[chunk[i + 1]]
            count += 1
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def f16(tmp_path_factory) -> Path:
    """SmolLM2 (real, trained) as F16: the common source both quantizers start from."""
    return quantize_model(smollm2_gguf(), tmp_path_factory.mktemp("ppl") / "smollm2-F16.gguf", "F16", progress=False)


@pytest.mark.parametrize("qtype", list(FTYPES))
def test_perplexity_matches_llama_quantize(f16, qtype, tmp_path):
    ours = quantize_model(f16, tmp_path / f"levante-{qtype}.gguf", qtype, progress=False)
    theirs = tmp_path / f"llama-{qtype}.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[qtype]
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(f16).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
    p_ours, p_theirs = llama_perplexity(ours), llama_perplexity(theirs)
    print(f"{qtype}: perplexity levante-quantized {p_ours:.4f}, llama.cpp-quantized {p_theirs:.4f}, "
          f"ratio {p_ours / p_theirs:.5f}; sizes {ours.stat().st_size} / {theirs.stat().st_size} bytes")
    assert abs(p_ours / p_theirs - 1) <= 0.01
