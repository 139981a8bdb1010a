"""levante.cuda.decoder: generation through the static cache, Triton attention and bucketed decode steps gives the
model's tokens, token for token (on CPU the steps run eagerly under the Triton interpreter; the `gpu` test runs
the captured graphs and checks that a step never syncs with the host)."""

from __future__ import annotations

import pytest
import torch
from fixtures import hf_model, save_hf

from levante.cuda import CudaDecoder, StaticCache, bucket_for, fuse_moe, pack_weights
from levante.generate import generate
from levante.loader import load
from levante.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0)
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23]]


def test_buckets():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 9, 32, 33, 256, 257)] == [1, 2, 4, 8, 16, 32, 64, 256, 512]


def _tokens(model, tok, prompts, **kw):
    with torch.inference_mode():
        return [r.tokens for r in generate(model, tok, prompts, 6, GREEDY, **kw)]


@pytest.mark.parametrize("kind", ["mixtral_8x2", "mixtral_window", "odd_head_dim", "llama_tied"])
@pytest.mark.parametrize("chunk", [3, 512])
def test_generation_equals_the_model(tmp_path, kind, chunk):
    """Left-padded batched prefill in chunks, then bucketed decode (3 rows run as 4); n_ctx=12 ends the longest
    prompt's row first, so the cache is compacted mid-generation; sliding windows shorter than the sequence."""
    lm = load(save_hf(hf_model(kind, vocab_size=32000), tmp_path / "m", tokenizer=True))
    want = _tokens(lm.model, lm.tokenizer, PROMPTS, n_ctx=12, prefill_chunk=chunk)
    dec = CudaDecoder(lm.model)
    assert fuse_moe(lm.model) == (2 if kind.startswith("mixtral") or kind == "odd_head_dim" else 0)
    got = _tokens(dec, lm.tokenizer, PROMPTS, n_ctx=12, prefill_chunk=chunk)
    assert got == want
    assert len(want[0]) == 5 and len(want[1]) == 6  # the rows did finish apart


def test_packed_quantized_model(tmp_path):
    """A Q4_K_M GGUF model as the GPU holds it (packed weights, fused MoE): the same tokens as the model."""
    from levante.tools.quantize import quantize_model

    src = save_hf(hf_model("mixtral_8x2", vocab_size=32000, hidden_size=256, intermediate_size=256), tmp_path / "m",
                  tokenizer=True)
    lm = load(quantize_model(src, tmp_path / "m.Q4_K_M.gguf", "Q4_K_M", progress=False))
    with torch.inference_mode():
        assert pack_weights(lm.model.model.layers) > 0  # the layers (the 32000-row head is slow to interpret)
        want = _tokens(lm.model, lm.tokenizer, PROMPTS)
        fuse_moe(lm.model)
        got = _tokens(CudaDecoder(lm.model), lm.tokenizer, PROMPTS)
    assert got == want


def test_cache_is_reused_while_it_fits(tmp_path):
    lm = load(save_hf(hf_model("mistral_dense"), tmp_path / "m"))
    dec = CudaDecoder(lm.model)
    c = dec.new_cache(3, 20)
    assert isinstance(c, StaticCache) and c.rows == 4 and c.capacity == 20 and c.batch_size == 3
    assert dec.new_cache(2, 10) is c  # smaller: the same buffers (captured graphs stay valid)
    bigger = dec.new_cache(5, 10)
    assert bigger is not c and bigger.rows == 8
    with pytest.raises(ValueError, match="explicit positions"):
        dec(torch.tensor([[1, 2]]), None, bigger)


@pytest.mark.gpu
def test_gpu_graphs_equal_eager_without_host_sync(tmp_path):
    """On CUDA: LLM generation runs the decoder (graphs), equals the CPU model, and a decode step never syncs."""
    from levante import LLM

    path = save_hf(hf_model("mixtral_8x2", vocab_size=32000), tmp_path / "m", tokenizer=True)
    cpu = LLM(str(path))
    gpu = LLM(str(path), device="cuda")
    assert isinstance(gpu._decoder, CudaDecoder) and gpu._decoder.use_graphs
    for p in ("Hello there", "A longer prompt about the sea and the wind"):
        want = cpu(p, max_tokens=12, temperature=0)["choices"][0]["text"]
        assert gpu(p, max_tokens=12, temperature=0)["choices"][0]["text"] == want
    assert gpu._decoder._graphs  # the decode steps were captured
    dec = gpu._decoder
    cache = dec.new_cache(2, 64)
    tok = torch.tensor([[5], [6]], device="cuda")
    pos = torch.tensor([[3], [7]], device="cuda")
    dec(tok, pos, cache)  # captures bucket 2
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dec(tok, pos, cache)
    finally:
        torch.cuda.set_sync_debug_mode("default")
