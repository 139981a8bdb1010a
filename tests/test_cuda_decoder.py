"""levante.cuda.decoder: generation through the static cache, Triton attention and bucketed decode steps gives the
model's tokens, token for token (on CPU the steps run eagerly under the Triton interpreter; the `gpu` test runs
the captured graphs and checks that a step never syncs with the host; on CPU, a dispatch mode checks that a step
runs no op that would read device values back)."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from fixtures import hf_model, save_hf

from levante.cuda import CudaDecoder, StaticCache, bucket_for, fuse_moe, pack_weights
from levante.errors import ContextLengthError, DeviceMemoryError
from levante.generate import _prefill_positions, generate
from levante.loader import load
from levante.sampling import SamplingParams

GREEDY = SamplingParams.greedy()  # no penalties: generation may pipeline
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [20, 21, 22, 23]]


def test_buckets():
    assert [bucket_for(n) for n in (1, 2, 3, 5, 9, 32, 33, 256, 257)] == [1, 2, 4, 8, 16, 32, 64, 256, 512]


def test_memory_refused_with_a_clear_error(tmp_path, monkeypatch):
    """A KV cache larger than the device's free memory, or weights that do not fit: DeviceMemoryError naming what
    and what to lower, before or instead of torch's out-of-memory traceback."""
    from levante.cuda import to_device

    lm = load(save_hf(hf_model("mixtral_8x2"), tmp_path / "m"))
    cfg = lm.model.cfg
    with pytest.raises(DeviceMemoryError, match=r"KV cache \(32 rows x 32768 positions.*--max-batch"):
        StaticCache(cfg, 32, 32768, torch.bfloat16, torch.device("cpu"), free=1 << 20)
    assert StaticCache(cfg, 2, 64, torch.float32, torch.device("cpu"), free=1 << 30).capacity == 64

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.Tensor, "to", oom)  # the copy of the weights to the device runs out
    with pytest.raises(DeviceMemoryError, match="does not fit in cpu's memory.*Tried to allocate"):
        to_device(lm.model, "cpu")


@pytest.mark.parametrize("kind", ["mixtral_8x2", "llama_tied"])
def test_module_hooks_still_run(tmp_path, kind):
    """The forward hooks of a block's attention and feed-forward (a parallel rank's all-reduces) run on the whole
    outputs the decoder computes in their place, fused kernels or not, and what they return is used; fuse_moe's
    replacement keeps them."""
    lm = load(save_hf(hf_model(kind), tmp_path / "m"))
    layer = lm.model.model.layers[1]
    seen = []

    def doubling(name):
        def hook(_module, _inputs, out):
            seen.append((name, tuple(out.shape)))
            return 2 * out

        return hook

    layer.attn.register_forward_hook(doubling("attn"))
    layer.ffn.register_forward_hook(doubling("ffn"))
    fuse_moe(lm.model)
    tokens, positions = torch.tensor([[5, 6, 7]]), torch.arange(3)[None]
    with torch.inference_mode():
        want = lm.model(tokens, positions)
        seen.clear()
        dec = CudaDecoder(lm.model)
        got = dec(tokens, positions, dec.new_cache(1, 8))
    d = lm.model.cfg.hidden_size
    assert seen == [("attn", (1, 3, d)), ("ffn", (1, 3, d))]
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_planless_attention_turns_off_cudnn_sdpa_only_inside():
    """The tensor-parallel ranks' eager attention on a GPU: no cuDNN SDPA (a plan per key length) inside the
    context, the process's setting back after it; the other backends stay on."""
    from levante.cuda import planless_attention
    from levante.loader import eager_attention

    before = torch.backends.cuda.cudnn_sdp_enabled()
    with planless_attention():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with eager_attention(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    with eager_attention(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before


def test_the_module_path_runs_inside_eager_attention(tmp_path, monkeypatch):
    """What runs a model's own modules instead of the decoder (LLM.logits: perplexity; LLM.embed: the embeddings
    endpoint; a transformers-style forward) runs them inside `eager_attention` for the model's device: no cuDNN
    plan per key length on a GPU."""
    import levante.api as api
    import levante.hf as hf
    from levante.api import LLM

    entered: list[torch.device] = []

    @contextmanager
    def recording(device):
        entered.append(device)
        yield
        entered.append(None)

    monkeypatch.setattr(api, "eager_attention", recording)
    monkeypatch.setattr(hf, "eager_attention", recording)
    path = save_hf(hf_model("mistral_dense", vocab_size=32000), tmp_path / "m", tokenizer=True)
    llm = LLM(str(path), n_ctx=64)
    forwards: list[bool] = []
    llm.model.model.register_forward_hook(lambda *_: forwards.append(len(entered) % 2 == 1))
    llm.logits([1, 5, 6])
    llm.embed(["one two", "three"])
    hf.AutoModelForCausalLM.from_pretrained(str(path))(torch.tensor([[1, 5, 6]]))
    assert entered[::2] == [torch.device("cpu")] * 3 and forwards[:2] == [True, True]


def _tokens(model, tok, prompts, n=6, **kw):
    with torch.inference_mode():
        return [r.tokens for r in generate(model, tok, prompts, n, GREEDY, **kw)]


@pytest.mark.parametrize("kind", ["mixtral_8x2", "mixtral_window", "odd_head_dim", "llama_tied"])
@pytest.mark.parametrize("chunk", [3, 512])
def test_generation_equals_the_model(tmp_path, kind, chunk):
    """Left-padded batched prefill in chunks, then bucketed decode (3 rows run as 4); n_ctx=12 ends the longest
    prompt's row first, so the cache is compacted mid-generation; sliding windows shorter than the sequence. One
    layer (interpreting is slow; the ring buffer's and the engine's tests run two)."""
    lm = load(save_hf(hf_model(kind, vocab_size=32000, num_hidden_layers=1), tmp_path / "m", tokenizer=True))
    want = _tokens(lm.model, lm.tokenizer, PROMPTS, n_ctx=12, prefill_chunk=chunk)
    dec = CudaDecoder(lm.model)
    assert fuse_moe(lm.model) == (1 if kind.startswith("mixtral") or kind == "odd_head_dim" else 0)
    got = _tokens(dec, lm.tokenizer, PROMPTS, n_ctx=12, prefill_chunk=chunk)
    assert got == want
    dec.pipelined = True  # the GPU's order: each step launched before the previous one's tokens are read back
    assert _tokens(dec, lm.tokenizer, PROMPTS, n_ctx=12, prefill_chunk=chunk) == want
    assert len(want[0]) == 5 and len(want[1]) == 6  # the rows did finish apart


def test_pipelined_generation_with_grammars_and_penalties(tmp_path, monkeypatch):
    """Generation pipelines on the decoder (each step launched before the last one's tokens are read back) also for
    rows with a grammar or penalties: their masks and windows need the new tokens only at the next sampling. The
    tokens equal the model's, unpipelined: a greedy row with penalties, a seeded sampled row with penalties, a
    greedy row under a regex; and the steps were launched ahead."""
    pytest.importorskip("xgrammar")
    from levante import generate as gen
    from levante.grammar import Grammar, GrammarCompiler

    lm = load(save_hf(hf_model("mixtral_8x2", vocab_size=32000, num_hidden_layers=1), tmp_path / "m",
                      tokenizer=True))
    tok = lm.tokenizer
    params = [SamplingParams.greedy(repeat_penalty=1.5, frequency_penalty=0.5),
              SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.3, seed=4),
              SamplingParams.greedy()]
    compiler = GrammarCompiler(tok, lm.model.cfg.vocab_size)

    def tokens(model) -> list[list[int]]:
        with torch.inference_mode():
            return [r.tokens for r in generate(model, tok, PROMPTS, 8, params, stop_token_ids=set(),
                                               constraints=[None, None, compiler.constraint(Grammar.regex("[a-c]+"))])]

    want = tokens(lm.model)
    dec = CudaDecoder(lm.model)
    fuse_moe(lm.model)
    dec.pipelined = True
    launched: list[int] = []

    def counting(chosen, launch):
        launched.append(chosen.shape[0])
        return gen_launch(chosen, launch)

    gen_launch = gen.launch_then_read
    monkeypatch.setattr(gen, "launch_then_read", counting)
    assert tokens(dec) == want
    assert len(launched) >= 7 and launched[0] == 3
    assert set(tok.decode(want[2])) <= set("abc")


@pytest.mark.parametrize("chunk", [3, 512])
def test_ring_buffer_for_a_sliding_window(tmp_path, monkeypatch, chunk):
    """A sliding-window model whose context outgrows window + RING_CHUNK keeps a ring buffer (6 + 2 slots instead
    of 40): the same tokens as the model over 30 new tokens (rows wrap around several times), prompts longer than
    a forward call may write (cut into chunks of 3), and a take-back deeper than the ring refused."""
    from levante.cuda import decoder

    monkeypatch.setattr(decoder, "RING_CHUNK", 2)
    lm = load(save_hf(hf_model("mixtral_window", vocab_size=32000), tmp_path / "m", tokenizer=True))
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [3, 4]]

    def tokens(model):
        with torch.inference_mode():
            return [r.tokens for r in generate(model, lm.tokenizer, prompts, 30, GREEDY, n_ctx=40,
                                               prefill_chunk=chunk)]

    want = tokens(lm.model)
    dec = CudaDecoder(lm.model)
    fuse_moe(lm.model)
    assert tokens(dec) == want and len(want[0]) == 30
    cache = dec._cache
    assert cache.rolling and cache.capacity == 8 and cache.write_limit == 3 and cache.k[0].shape[2] == 9
    cache.lengths[0] = 20
    cache.truncate(0, 17)
    with pytest.raises(ValueError, match="take back 4 steps"):
        cache.truncate(0, 13)


def test_prompts_of_several_lengths_prefill_packed(tmp_path, monkeypatch):
    """A left-padded prefill of prompts of 7, 2 and 4 tokens runs the feed-forward (the MoE's routing and experts)
    and the projections over the 13 real tokens as one [1, 13] batch, not 3 x 7; each real token's logits are
    those of its prompt alone, the padding's zeros, and the last-token logits are each row's last token's; with
    `pack_prompts` off (the benchmark's comparison) the padded step gives the same real logits. The real tokens
    are found in the positions as given on the host (on a GPU, reading them back from the device is a sync)."""
    from levante.cuda import decoder

    lm = load(save_hf(hf_model("mixtral_8x2", vocab_size=32000, num_hidden_layers=1), tmp_path / "m"))
    fuse_moe(lm.model)
    dec = CudaDecoder(lm.model)
    seen: list[tuple] = []
    ffn = decoder.feed_forward
    monkeypatch.setattr(decoder, "feed_forward", lambda f, h, *a: (seen.append(tuple(h.shape[:-1])), ffn(f, h, *a))[1])
    found_in: list = []
    real = decoder.real_tokens
    monkeypatch.setattr(decoder, "real_tokens", lambda p, host=None: found_in.append(host) or real(p, host))
    tokens, positions = _prefill_positions(PROMPTS, 7)
    with torch.inference_mode():
        logits = dec(tokens, positions, dec.new_cache(3, 16))
        last = dec(tokens, positions, dec.new_cache(3, 16), last_only=True)
        assert seen == [(1, 13)] * 2
        assert len(found_in) == 2 and all(h is positions for h in found_in)
        dec.pack_prompts = False  # the benchmark's comparison: the padding computed too
        padded = dec(tokens, positions, dec.new_cache(3, 16))
        assert seen[-1] == (3, 7)
        for i, p in enumerate(PROMPTS):
            alone = dec(torch.tensor([p]), torch.arange(len(p))[None], dec.new_cache(1, 16))[0]
            torch.testing.assert_close(logits[i, 7 - len(p) :], alone, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(padded[i, 7 - len(p) :], alone, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(last[i, 0], alone[-1], rtol=1e-4, atol=1e-4)
            assert not logits[i, : 7 - len(p)].any()


def test_bf16_logits_close_to_the_model(tmp_path):
    """bfloat16: the decoder's fused kernels round where torch rounds, so its logits (a prefill chunk, then a
    decode step) stay within bf16 noise of the model's."""
    lm = load(save_hf(hf_model("mixtral_8x2"), tmp_path / "m"), dtype="bfloat16")
    ids = torch.randint(3, 300, (1, 30), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(30)[None]
    with torch.inference_mode():
        want = lm.model(ids).float()
        fuse_moe(lm.model)
        dec = CudaDecoder(lm.model)
        cache = dec.new_cache(1, 40)
        got = torch.cat([dec(ids[:, :29], pos[:, :29], cache), dec(ids[:, 29:], pos[:, 29:], cache)], dim=1)
    err = (got - want).abs().amax(-1) / want.abs().amax(-1)
    # 1.5e-2 here; 2.6e-2 when the kernels truncate to bf16 (as the interpreter's own conversion does)
    assert err.max() <= 2e-2 and (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9


def test_packed_quantized_model(tmp_path):
    """A Q4_K_M GGUF model as the GPU holds it (packed weights, fused MoE): the same tokens as the model."""
    from levante.tools.quantize import quantize_model

    src = save_hf(hf_model("mixtral_8x2", vocab_size=32000, hidden_size=256, intermediate_size=256,
                           num_hidden_layers=1), tmp_path / "m", tokenizer=True)  # one layer: interpreting is slow
    lm = load(quantize_model(src, tmp_path / "m.Q4_K_M.gguf", "Q4_K_M", progress=False))
    with torch.inference_mode():
        assert pack_weights(lm.model.model.layers) > 0  # the layers (the 32000-row head is slow to interpret)
        # two rows of different lengths, a prefill and three decode steps (interpreting is slow)
        want = _tokens(lm.model, lm.tokenizer, PROMPTS[:2], n=4)
        fuse_moe(lm.model)
        got = _tokens(CudaDecoder(lm.model), lm.tokenizer, PROMPTS[:2], n=4)
    assert got == want


@pytest.mark.parametrize("kind", ["mixtral_8x2", "mistral_dense"])
def test_float32_gemv_inputs_change_no_value(tmp_path, monkeypatch, kind):
    """A bf16 model of packed weights (Q4_K_M: three formats; Mixtral's router in bf16): steps of up to GEMV_ROWS
    tokens store what only packed weights read as float32 (the same values: the GPU's Triton 3.6 reads float32 x
    with fewer instructions) and give bf16 inputs' logits bit for bit, in a prefill chunk and a decode step."""
    import levante.cuda.decoder as decoder
    from levante.tools.quantize import quantize_model

    src = save_hf(hf_model(kind, vocab_size=256, hidden_size=256, intermediate_size=256, num_hidden_layers=1),
                  tmp_path / "m")
    lm = load(quantize_model(src, tmp_path / "m.gguf", "Q4_K_M", progress=False), dtype="bfloat16")
    seen = []
    packed_matmul = decoder.packed_matmul
    monkeypatch.setattr(decoder, "packed_matmul", lambda x, w, **kw: seen.append(x.dtype) or packed_matmul(x, w, **kw))
    ids = torch.randint(3, 256, (3, 3), generator=torch.Generator().manual_seed(0))
    logits = []
    with torch.inference_mode():
        assert pack_weights(lm.model) > 0
        fuse_moe(lm.model)
        for wide in (False, True):
            dec = CudaDecoder(lm.model, float32_inputs=wide)
            cache = dec.new_cache(3, 8)
            logits.append([dec(ids[:, :2], torch.arange(2).expand(3, 2), cache),
                           dec(ids[:, 2:], torch.full((3, 1), 2), cache)])
    assert torch.float32 in seen  # the float32 steps multiplied float32 inputs
    for a, b in zip(*logits, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b)


def test_cache_is_reused_while_it_fits(tmp_path):
    lm = load(save_hf(hf_model("mistral_dense"), tmp_path / "m"))
    dec = CudaDecoder(lm.model)
    warm = dec.warm_up(3, 20)  # on CUDA it also captures buckets 1, 2 and 4
    c = dec.new_cache(3, 20)
    assert c is warm
    assert isinstance(c, StaticCache) and c.rows == 4 and c.capacity == 20 and c.batch_size == 3
    assert dec.new_cache(2, 10) is c  # smaller: the same buffers (captured graphs stay valid)
    bigger = dec.new_cache(5, 10)
    assert bigger is not c and bigger.rows == 8
    with torch.inference_mode():
        dec(torch.tensor([[1, 2, 3]]), None, bigger, rows=slice(2, 3))  # positions placed after the row's length
        assert bigger.lengths[:3] == [0, 0, 3]
        with pytest.raises(ContextLengthError, match="context overflow"):
            dec(torch.tensor([[1] * 8]), None, bigger, rows=slice(2, 3))
        with pytest.raises(ValueError, match="not in a cache"):
            dec(torch.tensor([[1]]), None, bigger, rows=slice(8, 9))


def test_warm_cache_outlasts_a_bigger_batch(tmp_path, monkeypatch):
    """An LLM's warm one-row cache (and, on a GPU, its captured graph) stays while a list of prompts gets a cache
    of its own: a single prompt after a batch finds it again, a batch after a single prompt its own; a bigger
    batch replaces the batch's cache, not the warm one, unless the device lacks memory for both."""
    import levante.cuda.decoder as decoder

    lm = load(save_hf(hf_model("mistral_dense"), tmp_path / "m"))
    dec = CudaDecoder(lm.model)
    warm = dec.warm_up(1, 40, slack=4)
    batch = dec.new_cache(3, 20)
    assert batch is not warm and batch.rows == 4 and warm.rows == 1
    assert dec.new_cache(1, 30, slack=4) is warm and dec.new_cache(2, 20) is batch
    bigger = dec.new_cache(5, 20)
    assert bigger.rows == 8 and dec.new_cache(1, 40) is warm and dec.new_cache(3, 10) is bigger
    assert dec.warm_up(1, 40, slack=4) is warm  # again: nothing new
    with torch.inference_mode():  # the caches serve their rows as before
        ids = torch.randint(3, 200, (3, 6))
        want = dec(ids, None, dec.new_cache(3, 20))
        dec(ids[:1], None, dec.new_cache(1, 20))
        assert torch.equal(dec(ids, None, dec.new_cache(3, 20)), want)
    # a device with room for a cache twice the latest and no more: a new batch's takes the warm one's place
    held = [2 * bigger.nbytes]
    monkeypatch.setattr(decoder, "free_bytes", lambda device: held[0] - sum(
        c.nbytes for c in {id(c): c for c in (dec._warm, dec._cache) if c is not None}.values()))
    wide = dec.new_cache(9, 20)
    assert wide.rows == 16 and wide.nbytes == held[0] and dec._warm is None and dec._cache is wide
    with pytest.raises(DeviceMemoryError, match="KV cache"):
        dec.new_cache(17, 20)  # more than the device has, even alone


@pytest.mark.gpu
def test_gpu_graphs_equal_eager_without_host_sync(tmp_path):
    """On CUDA: LLM generation runs the decoder (graphs), equals the CPU model, and a decode step never syncs."""
    from levante import LLM

    path = save_hf(hf_model("mixtral_8x2", vocab_size=32000), tmp_path / "m", tokenizer=True)
    cpu = LLM(str(path))
    assert LLM(str(path), device="cuda").model.model.dtype == torch.bfloat16  # 'auto' on a GPU: 16-bit
    gpu = LLM(str(path), device="cuda", dtype="float32")
    assert isinstance(gpu._decoder, CudaDecoder) and gpu._decoder.use_graphs
    for p in ("Hello there", "A longer prompt about the sea and the wind"):
        want = cpu(p, max_tokens=12, temperature=0)["choices"][0]["text"]
        assert gpu(p, max_tokens=12, temperature=0)["choices"][0]["text"] == want
    warm = gpu._decoder._warm
    step = warm.graphs[1]  # the batch-1 decode step was captured (at start-up)
    pair = ["Hello there, how are you", "The sea"]  # two lengths: a packed prefill; a cache of its own
    want = [c["text"] for c in cpu(pair, max_tokens=4, temperature=0)["choices"]]
    assert [c["text"] for c in gpu(pair, max_tokens=4, temperature=0)["choices"]] == want
    gpu("Hello there", max_tokens=4, temperature=0)
    assert gpu._decoder._warm is warm and warm.graphs[1] is step  # a batch in between: nothing recaptured
    sampled = gpu("Hello there", max_tokens=8, temperature=1.0, seed=3)  # seeded draws: CPU generators, GPU logits
    assert sampled["usage"]["completion_tokens"] >= 1
    dec = gpu._decoder
    cache = dec.new_cache(2, 64)
    tok = torch.tensor([[5], [6]], device="cuda")
    pos = torch.tensor([[3], [7]], device="cuda")
    dec(tok, pos, cache)  # captures bucket 2
    # a packed prefill of two left-padded rows, positions given on the host as the engine gives them
    ids, host = _prefill_positions([[5, 6, 7, 8], [9, 10]], 4)
    ids, fresh = ids.cuda(), dec.new_cache(2, 64)
    dec(ids, host, fresh, last_only=True)  # its kernels compiled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dec(tok, pos, cache)
        dec(ids, host, fresh, last_only=True)  # the same tokens at the same positions again
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("pipelined", [False, True])
def test_serving_engine_on_the_decoder(tmp_path, monkeypatch, pipelined):
    """The continuous-batching engine over the decoder's static cache: rows joining and leaving, prefix reuse, and
    bucketed decode steps whose padding row is a free row holding a finished request's prefix (which it must not
    touch: request E reuses it). Every request gets solo generation's tokens; also pipelined (the GPU's order:
    each step launched before the last one's tokens are read back, thrown away and taken back from the cache
    whenever the rows changed), with a seeded sampled request with penalties among them (pipelined too). One layer
    (two-layer decoders: the ring buffer's, the speculative engine's and the parallel tests)."""
    from levante import engine
    from levante.engine import Engine

    lm = load(save_hf(hf_model("mixtral_8x2", vocab_size=32000, num_hidden_layers=1), tmp_path / "m",
                      tokenizer=True))
    tok = lm.tokenizer
    system = tok.encode("You are a helpful assistant. " * 4)
    prompts = [system + tok.encode("Question one", add_bos=False)]  # A: short, finishes first
    prompts += [tok.encode(t) for t in ["The quick brown fox", "Once upon a time there", "Hello"]]  # B, C, D
    prompts.append(system + tok.encode("Question two", add_bos=False))  # E: after the others, reuses A's row
    lens = [3, 12, 9, 10, 6]
    with torch.inference_mode():
        want = [r.tokens for p, n in zip(prompts, lens)
                for r in generate(lm.model, tok, [p], n, GREEDY, stop_token_ids=set())]
    seeded = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.3, seed=5)
    with torch.inference_mode():
        want_sampled = generate(lm.model, tok, [prompts[1]], 8, seeded, stop_token_ids=set())[0].tokens
    dec = CudaDecoder(lm.model)
    dec.pipelined = pipelined
    fuse_moe(lm.model)
    eng = Engine(dec, tok, n_ctx=128, max_batch=4).start()
    try:
        assert isinstance(eng.cache, StaticCache) and eng.cache.rows == 4
        reqs = [eng.submit(p, n, GREEDY, stop_ids=set()) for p, n in zip(prompts[:4], lens[:4])]
        got = [[ev.token for ev in r] for r in reqs]  # after A: 3 rows run as bucket 4, A's row the padding
        last = eng.submit(prompts[4], lens[4], GREEDY, stop_ids=set())
        got.append([ev.token for ev in last])
        read, launched = engine.launch_then_read, []
        monkeypatch.setattr(engine, "launch_then_read", lambda c, f: launched.append(1) or read(c, f))
        sampled = eng.submit(prompts[1], 8, seeded, stop_ids=set())
        got_sampled = [ev.token for ev in sampled]
        assert len(launched) == (7 if pipelined else 0)  # each decode step's sampling launched the next step
        assert last.cached_tokens >= len(system)
    finally:
        eng.shutdown()
    assert got == want
    assert got_sampled == want_sampled


def test_serving_engine_prefills_new_rows_together(tmp_path, monkeypatch):
    """Requests waiting together are prefilled in one packed call: three rows of three lengths, then a pair of which
    one continues the prefix it reuses from a finished row (its positions start there), their positions handed to
    the decoder as laid out on the host (it finds the real tokens there); every request gets solo
    generation's tokens. A group prefill failing in the model call or after it fails its own requests only (none
    is left waiting), and the engine keeps serving; a lost parallel rank (WorkerError) ends both and the engine."""
    import threading

    from levante import engine
    from levante.engine import Engine
    from levante.errors import EngineError, WorkerError

    lm = load(save_hf(hf_model("mixtral_8x2", vocab_size=32000, num_hidden_layers=1), tmp_path / "m",
                      tokenizer=True))
    tok = lm.tokenizer
    system = tok.encode("You are a helpful assistant. " * 4)
    first = [system + tok.encode("Question one", add_bos=False), tok.encode("The quick brown fox"),
             tok.encode("Hello")]
    second = [system + tok.encode("Question two", add_bos=False), tok.encode("Once upon a time there")]
    with torch.inference_mode():
        want = [generate(lm.model, tok, [p], 5, GREEDY, stop_token_ids=set())[0].tokens for p in first + second]
    fuse_moe(lm.model)
    dec = CudaDecoder(lm.model)
    calls: list[tuple] = []
    fail = []

    def spy(_module, args):
        calls.append(tuple(args[0].shape))
        if args[0].shape[0] > 1 and args[0].shape[1] > 1:  # a group prefill: positions as laid out on the host
            assert args[1].device.type == "cpu" and not any(args[1] is u for u in uploaded)
            if fail:
                raise fail[0]

    dec.register_forward_pre_hook(spy)
    eng = Engine(dec, tok, n_ctx=128, max_batch=4)
    uploaded: list[torch.Tensor] = []  # what the engine copies to the device: never a prefill's positions
    upload = engine.to_device
    monkeypatch.setattr(engine, "to_device", lambda t, d: uploaded.append(upload(t, d)) or uploaded[-1])
    try:
        reqs = [eng.submit(p, 5, GREEDY, stop_ids=set()) for p in first]
        eng.start()
        got = [[ev.token for ev in r] for r in reqs]
        with eng._cv:  # both wait before the scheduler takes either
            reqs = [eng.submit(p, 5, GREEDY, stop_ids=set()) for p in second]
        got += [[ev.token for ev in r] for r in reqs]
        assert reqs[0].cached_tokens >= len(system)
        def fails(texts: tuple[str, str], error: type) -> None:  # a pair prefilled together: both end, none hangs
            with eng._cv:
                failing = [eng.submit(tok.encode(t), 5, GREEDY, stop_ids=set()) for t in texts]
            ended: list[BaseException] = []

            def read(r) -> None:
                try:
                    list(r)
                except BaseException as e:  # noqa: BLE001 - the request's own error, checked below
                    ended.append(e)

            readers = [threading.Thread(target=read, args=(r,), daemon=True) for r in failing]
            for t in readers:
                t.start()
            for t in readers:
                t.join(timeout=120)
            assert len(ended) == 2 and all(isinstance(e, error) for e in ended), ended  # a lost request: none

        fail.append(RuntimeError("injected"))  # the model call
        fails(("Lorem ipsum", "Sit amet"), EngineError)
        fail.clear()
        eng.cache.hold = lambda *_: (_ for _ in ()).throw(RuntimeError("injected after the call"))
        fails(("Dolor sit", "Consectetur"), EngineError)
        del eng.cache.hold
        again = eng.submit(second[1], 5, GREEDY, stop_ids=set())
        assert [ev.token for ev in again] == want[-1]
        fail.append(WorkerError("rank 1 died"))  # a parallel rank lost: the group's requests get it, the engine ends
        fails(("Adipiscing elit", "Sed do"), WorkerError)
        assert eng.dead is not None
    finally:
        eng.shutdown()
    assert got == want
    prefills = [c for c in calls if c[1] > 1]
    rests = [len(p) - r.cached_tokens for p, r in zip(second, reqs, strict=True)]
    assert prefills[:2] == [(3, len(first[0])), (2, max(rests))] and min(rests) < max(rests)


def test_low_rank_model(tmp_path):
    """A low-rank Mixtral as `levante compress` writes it (experts as float factors of per-matrix ranks, a few
    matrices kept full) on the fused path: the model's tokens."""
    from levante.quant.base import DenseWeight
    from levante.quant.lowrank import LowRankWeight, svd_factors

    lm = load(save_hf(hf_model("mixtral_8x2", vocab_size=32000), tmp_path / "m", tokenizer=True))
    for li, layer in enumerate(lm.model.model.layers):
        for ei, expert in enumerate(layer.ffn.experts):
            for j, name in enumerate(("w1", "w2", "w3")):
                w = getattr(expert, name)
                assert isinstance(w, DenseWeight)
                if (li + ei + j) % 4 == 0:
                    continue
                a, b = svd_factors(w.weight, 8 + 4 * ((li + ei + j) % 3))
                setattr(expert, name, LowRankWeight(a, b))
    want = _tokens(lm.model, lm.tokenizer, PROMPTS)
    assert fuse_moe(lm.model) == 2
    assert _tokens(CudaDecoder(lm.model), lm.tokenizer, PROMPTS) == want


@pytest.mark.parametrize("kind", ["dense", "Q8_0"])
def test_fused_qkv_is_one_weight_without_a_second_copy(kind):
    from test_cuda_packed import _raw

    from levante.config import ModelConfig
    from levante.cuda import PackedWeight
    from levante.cuda.decoder import fused_qkv
    from levante.model import Attention
    from levante.quant.base import DenseWeight

    cfg = ModelConfig(vocab_size=32, hidden_size=256, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
    shapes = [(256, 256), (128, 256), (128, 256), (256, 256)]
    if kind == "dense":
        ws = [DenseWeight(torch.randn(n, k)) for n, k in shapes]
    else:
        ws = [PackedWeight.from_ggml(_raw("Q8_0", n, k, seed=i), "Q8_0", n, k) for i, (n, k) in enumerate(shapes)]
    attn = Attention(cfg, *ws)
    x = torch.randn(3, 256)
    want = [w(x) for w in ws[:3]]
    qkv = fused_qkv(attn)
    assert qkv is not None and qkv.out_features == 512 and fused_qkv(attn) is qkv  # made once
    got = qkv(x).split([256, 128, 128], dim=-1)
    for g, w in zip(got, want):
        assert (g - w).abs().max() <= 1e-5 * w.abs().max()
    whole = qkv.weight if kind == "dense" else qkv.lo
    part = attn.wk.weight if kind == "dense" else attn.wk.lo
    assert part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()  # a view: no second copy
    assert torch.equal(attn.wk(x), want[1])


def test_speculating_engine_on_the_decoder(tmp_path):
    """Prompt-lookup speculation in the engine over the static cache (multi-token verification, rejected proposals
    taken back by `truncate`), sliding window shorter than the text: solo generation's tokens."""
    from levante.engine import Engine
    from levante.speculative import SpecConfig

    lm = load(save_hf(hf_model("mixtral_window", vocab_size=32000), tmp_path / "m", tokenizer=True))
    prompt = [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7]
    with torch.inference_mode():
        want = generate(lm.model, lm.tokenizer, [prompt], 24, GREEDY, stop_token_ids=set())[0].tokens
    eng = Engine(CudaDecoder(lm.model), lm.tokenizer, n_ctx=64, max_batch=2,
                 spec=SpecConfig("prompt_lookup", 4)).start()
    try:
        got = [ev.token for ev in eng.submit(prompt, 24, GREEDY, stop_ids=set())]
        assert eng.metrics.spec_proposed > 0
    finally:
        eng.shutdown()
    assert got == want


class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """The torch ops run inside it that read a device tensor's values back to the host on a GPU (what
    `torch.cuda.set_sync_debug_mode("error")` refuses there): item / bool() / int(), tolist, nonzero, boolean-mask
    indexing, unique, repeat_interleave without its output size. (An explicit copy to the CPU is invisible on CPU
    tensors: the gpu test covers it.)"""

    SYNCING = {"item", "_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim",
               "unique_consecutive", "equal", "is_nonzero", "allclose"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        seen = self.seen

        def tolist(t):  # reads memory directly on CPU, below the dispatcher
            seen.append("tolist")
            return self._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        indices = args[1] if name.startswith("index") and len(args) > 1 else []  # index_select's: the dim
        masks = [i for i in (indices if isinstance(indices, (list, tuple)) else [])
                 if isinstance(i, torch.Tensor) and i.dtype == torch.bool]
        if name in self.SYNCING or masks or (name == "repeat_interleave" and kwargs.get("output_size") is None):
            self.seen.append(str(func))
        return func(*args, **kwargs)


@pytest.mark.parametrize("kind", ["dense", "gemv", "mixed_low_rank", "expert_parallel"])
def test_a_decode_step_reads_nothing_back(tmp_path, monkeypatch, kind):
    """CI's stand-in for the gpu test's sync check: a decode step (batch 1 and a bucketed 3), and a packed prefill
    of left-padded rows past the search for its real tokens (done in the host's positions), run no op that reads
    device values on the host, whatever the layers hold: float experts (by the tiled kernel, or by the GEMV as
    packed ones are), factored and full ones, an expert-parallel rank's half (the detector itself is checked on
    ops that do read back)."""
    from levante.cuda import decoder
    from levante.model import MoE
    from levante.quant.lowrank import LowRankWeight, svd_factors

    monkeypatch.setenv("LEVANTE_GEMV", "all" if kind == "gemv" else "packed")

    lm = load(save_hf(hf_model("mixtral_8x2", vocab_size=320, num_local_experts=4), tmp_path / "m"))
    for layer in lm.model.model.layers:
        if kind == "mixed_low_rank":
            for ei, expert in enumerate(layer.ffn.experts[1:]):
                a, b = svd_factors(expert.w2.weight, 8 + 4 * ei)
                expert.w2 = LowRankWeight(a, b)
        elif kind == "expert_parallel":
            moe = layer.ffn
            layer.ffn = MoE(moe.gate, [moe.experts[e] for e in (1, 3)], moe.top_k, expert_ids=[1, 3])
    assert fuse_moe(lm.model) == 2
    dec = CudaDecoder(lm.model)
    with torch.inference_mode():
        for rows in (1, 3):
            cache = dec.new_cache(rows, 32)
            dec(torch.randint(3, 300, (rows, 5)), torch.arange(5).expand(rows, 5), cache)
            with _HostReads() as reads:
                dec(torch.randint(3, 300, (rows, 1)), torch.full((rows, 1), 5), cache)
            assert reads.seen == []
        tokens, positions = _prefill_positions(PROMPTS, 7)
        keep = decoder.real_tokens(positions, positions)  # the host's part: the rest must not read back
        monkeypatch.setattr(decoder, "real_tokens", lambda p, host=None: keep)
        cache = dec.new_cache(3, 32)
        with _HostReads() as reads:
            dec(tokens, positions, cache, last_only=True)
        assert reads.seen == []
        with _HostReads() as reads:
            torch.arange(4)[torch.arange(4) > 1].sum().item()
            torch.arange(2).tolist()
        assert len(reads.seen) == 3


def test_speculating_llm_keeps_its_decoders_warm_caches(tmp_path, monkeypatch):
    """An LLM speculating with a draft model on GPU decoders (here on CPU): the target and the draft run their own
    decoders (static cache and graphs on a GPU, not the module's SDPA path), and neither decoder makes a new cache
    (nor, on a GPU, captures a new graph) for a generation: their warm-ups sized them for speculation. The tokens
    are those of generation without it."""
    import levante.api as api
    from levante.api import LLM

    monkeypatch.setattr(api, "gpu_decoder", CudaDecoder)  # what an LLM on a GPU makes
    path = save_hf(hf_model("mixtral_8x2", vocab_size=32000), tmp_path / "m", tokenizer=True)
    prompt = "one two three one two three one two"
    want = LLM(str(path), n_ctx=96)(prompt, max_tokens=10, temperature=0)["choices"][0]["text"]
    llm = LLM(str(path), n_ctx=96, draft_model=str(path), num_speculative_tokens=3)
    draft = llm.spec.draft
    assert isinstance(draft, CudaDecoder)
    caches = llm._decoder._cache, draft._cache
    for _ in range(2):
        assert llm(prompt, max_tokens=10, temperature=0)["choices"][0]["text"] == want
        assert llm.speculative_stats()["accepted"] > 0  # the draft is the model itself: it is right every time
        assert (llm._decoder._cache, draft._cache) == caches
        assert llm._decoder._cache.lengths[0] > 10  # the target verified on its decoder, not the module path


def test_drafts_taking_turns_at_one_decoder(tmp_path):
    """Two requests' drafts on one GPU decoder (one cache between them): each proposes what it would alone; a
    draft whose cache another filled since refills it."""
    from levante.speculative import DraftModel

    lm = load(save_hf(hf_model("mixtral_8x2"), tmp_path / "m"))
    fuse_moe(lm.model)
    shared, alone = CudaDecoder(lm.model), CudaDecoder(lm.model)
    a, b = DraftModel(shared, 64), DraftModel(shared, 64)
    history_a, history_b = [5, 6, 7, 8, 9], [30, 31, 32]
    with torch.inference_mode():
        first = a.propose(history_a, 3, GREEDY, None)[0]
        other = b.propose(history_b, 3, GREEDY, None)[0]
        history_a += first[:2]
        a.sync(history_a)
        again = a.propose(history_a, 3, GREEDY, None)[0]
        assert other == DraftModel(alone, 64).propose(history_b, 3, GREEDY, None)[0]
        assert again == DraftModel(alone, 64).propose(history_a, 3, GREEDY, None)[0]
