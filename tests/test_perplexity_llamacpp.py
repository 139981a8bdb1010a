"""levante's perplexity equals llama.cpp's (llama-cpp-python) with the same chunking, on SmolLM2 Q4_1."""

from pathlib import Path

import pytest
import torch
from fixtures import smollm2_gguf

from levante import LLM
from levante.tools.quality import perplexity, windows

pytestmark = pytest.mark.oracle
llama_cpp = pytest.importorskip("llama_cpp")

N_CTX, N_CHUNKS = 512, 2


def test_perplexity_matches_llamacpp():
    path = smollm2_gguf()
    text = (Path(__file__).parent.parent / "data" / "kjv_genesis_exodus.txt").read_text()[:12000]
    ours = LLM(str(path), n_ctx=N_CTX, n_threads=2)
    theirs = llama_cpp.Llama(model_path=str(path), n_ctx=N_CTX, n_threads=2, logits_all=True, verbose=False)
    ids = theirs.tokenize(text.encode(), add_bos=True)  # llama.cpp's perplexity: common_tokenize(..., true)
    assert ours.tokenize(text) == ids
    got = perplexity(ours, ids, N_CTX, n_chunks=N_CHUNKS, progress=False)
    # llama.cpp side: the same chunks (BOS replaces the first token when the vocab adds BOS), its logits.
    bos = theirs.token_bos() if ours.tokenizer.add_bos else None
    nll = []
    for w in windows(ids, N_CTX, n_chunks=N_CHUNKS, bos_id=bos):
        theirs.reset()
        theirs.eval(w.tokens)
        logits = torch.tensor(theirs.scores[: len(w.tokens)])[w.first : -1].double()
        nll.append(-torch.log_softmax(logits, -1).gather(1, torch.tensor(w.targets)[:, None])[:, 0])
    want = float(torch.cat(nll).mean().exp())
    print(f"levante {got}  llama.cpp PPL = {want:.4f}  ({100 * (got.ppl / want - 1):+.3f}%)")
    assert got.n_scored == N_CHUNKS * (N_CTX - N_CTX // 2 - 1)
    assert abs(got.ppl / want - 1) <= 0.005
