"""Numerics: levante's model equals transformers' on the same random checkpoints."""

import pytest
import torch
from fixtures import CONFIGS, hf_model, save_hf

from levante.errors import ContextLengthError
from levante.loader import read_checkpoint
from levante.model import KVCache, build_model


def _load(tmp_path, kind, **kw):
    ref = hf_model(kind, **kw)
    ck = read_checkpoint(save_hf(ref, tmp_path / kind))
    return ref, build_model(ck.config, ck.weights, torch.float32)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_logits_equal_transformers(tmp_path, kind):
    ref, net = _load(tmp_path, kind)
    ids = torch.randint(0, ref.config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
        got = net(ids)
    assert (want - got).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["mixtral_8x2", "mistral_window", "mixtral_window", "llama_tied"])
def test_incremental_decoding_equals_full_forward(tmp_path, kind):
    """Prefill in chunks, then one token at a time, well past the sliding window."""
    ref, net = _load(tmp_path, kind)
    T = 30
    ids = torch.randint(0, ref.config.vocab_size, (2, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = net(ids)
        want = ref(ids).logits
        cache = net.new_cache(2, 64)
        parts = [net(ids[:, :4], cache=cache), net(ids[:, 4:13], cache=cache)]
        parts += [net(ids[:, i : i + 1], cache=cache) for i in range(13, T)]
    inc = torch.cat(parts, dim=1)
    assert (inc - full).abs().max().item() <= 1e-4
    assert (inc - want).abs().max().item() <= 1e-4


def test_rolling_cache_memory_stays_at_window(tmp_path):
    ref, net = _load(tmp_path, "mistral_window")
    cache = net.new_cache(1, 1000)
    w = ref.config.sliding_window
    assert cache.capacity == w and cache.k[0].shape[2] == w
    before = cache.nbytes()
    with torch.no_grad():
        for i in range(3 * w):
            net(torch.tensor([[i % 300]]), cache=cache)
    assert cache.nbytes() == before and cache.step == 3 * w


def test_prefill_chunk_longer_than_window(tmp_path):
    ref, net = _load(tmp_path, "mixtral_window")
    ids = torch.randint(0, 320, (1, 25), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids).logits
        cache = net.new_cache(1, 100)
        chunks = [ids[:, :3], ids[:, 3:20], ids[:, 20:]]
        got = torch.cat([net(c, cache=cache) for c in chunks], 1)
    assert (want - got).abs().max().item() <= 1e-4


def test_left_padded_batch_equals_single(tmp_path):
    _, net = _load(tmp_path, "mixtral_8x2")
    a = torch.randint(3, 320, (9,), generator=torch.Generator().manual_seed(4))
    b = a[:5]
    toks = torch.stack([a, torch.cat([torch.zeros(4, dtype=torch.long), b])])
    pos = torch.tensor([list(range(9)), [-1] * 4 + list(range(5))])
    with torch.no_grad():
        batched = net(toks, pos)
        single_b = net(b[None])
    assert (batched[1, 4:] - single_b[0]).abs().max().item() <= 1e-4
    assert torch.isfinite(batched).all()


def test_context_overflow_is_clear(tmp_path):
    _, net = _load(tmp_path, "mixtral_8x2")
    cache = KVCache(net.cfg, 1, 8)
    with torch.no_grad(), pytest.raises(ContextLengthError, match="n_ctx 8"):
        net(torch.zeros(1, 9, dtype=torch.long), cache=cache)


def test_only_selected_experts_run(tmp_path):
    """Experts that the router does not pick are never called."""
    _, net = _load(tmp_path, "mixtral_8x2")
    moe = net.model.layers[0].ffn
    called = set()
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda m, i, o, e=e: called.add(e))
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        chosen = set(torch.softmax(moe.gate(x.reshape(1, -1)), -1).topk(2).indices[0].tolist())
        moe(x)
    assert called == chosen


def test_bfloat16_close_to_float32(tmp_path):
    ref, _ = _load(tmp_path, "mixtral_8x2")
    ck = read_checkpoint(tmp_path / "mixtral_8x2")
    net16 = build_model(ck.config, ck.weights, torch.bfloat16)
    ids = torch.randint(0, 320, (1, 10))
    with torch.no_grad():
        got, want = net16(ids), ref(ids).logits
    assert got.dtype == torch.float32
    assert (got - want).abs().max().item() < 0.15


@pytest.mark.parametrize("head", ["sequence_classification", "token_classification"])
@pytest.mark.parametrize("kind", ["mixtral_8x2", "llama_tied"])
def test_classification_heads_equal_transformers(tmp_path, kind, head):
    import transformers

    base = hf_model(kind)
    cfg = base.config
    cfg.num_labels = 3
    cfg.pad_token_id = 0
    mt = cfg.model_type.capitalize()
    suffix = "ForSequenceClassification" if head == "sequence_classification" else "ForTokenClassification"
    ref = getattr(transformers, mt + suffix)(cfg).eval()
    ref.model.load_state_dict(base.model.state_dict())
    save_hf(ref, tmp_path / "cls")
    ck = read_checkpoint(tmp_path / "cls")
    net = build_model(ck.config, ck.weights, torch.float32, head=head)
    ids = torch.randint(3, 320, (3, 11), generator=torch.Generator().manual_seed(5))
    ids[1, 7:] = 0  # right padding: the score is taken at the last non-pad token
    with torch.no_grad():
        want = ref(ids).logits
        got = net(ids)
    assert got.shape == want.shape
    assert (want - got).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["mixtral_8x2", "mistral_window"])
def test_rows_of_different_lengths_advance_together(tmp_path, kind):
    """Continuous batching: rows prefilled separately, then decoded in one batch, equal solo runs."""
    ref, net = _load(tmp_path, kind)
    g = torch.Generator().manual_seed(6)
    a = torch.randint(0, 320, (1, 11), generator=g)
    b = torch.randint(0, 320, (1, 4), generator=g)
    steps = torch.randint(0, 320, (2, 9), generator=g)
    with torch.no_grad():
        cache = net.new_cache(2, 64)
        net(a, cache=cache, rows=slice(0, 1))
        net(b, cache=cache, rows=slice(1, 2))
        assert cache.lengths == [11, 4]
        joint = torch.cat([net(steps[:, i : i + 1], cache=cache) for i in range(9)], 1)
        want_a = ref(torch.cat([a, steps[:1]], 1)).logits[:, 11:]
        want_b = ref(torch.cat([b, steps[1:]], 1)).logits[:, 4:]
    assert (joint[0] - want_a[0]).abs().max().item() <= 1e-4
    assert (joint[1] - want_b[0]).abs().max().item() <= 1e-4
    cache.copy_row(0, 1)
    assert cache.lengths == [20, 20] and torch.equal(cache.k[0][0], cache.k[0][1])
