import codecs
import math

import pytest
import torch
from torch import nn

import levante.generate as gen_mod
from levante.config import ModelConfig
from levante.errors import ContextLengthError
from levante.generate import GenerationResult, TokenEvent, generate, generate_stream
from levante.model import KVCache, build_model, expected_shapes
from levante.sampling import SamplingParams

V = 300
EOS = 299


# --------------------------------------------------------------------------- fakes
class FakeTokenizer:
    """id -> fixed bytes. Ids 0..25 are letters, 26 is a space; `pieces` overrides any id."""

    def __init__(self, pieces: dict[int, bytes] | None = None) -> None:
        self.table = {i: bytes([ord("a") + i % 26]) for i in range(V)}
        self.table[26] = b" "
        self.table.update(pieces or {})
        self.eos_ids = {EOS}
        self.special = {EOS}
        self.table[EOS] = b"</s>"

    def decode(self, ids, skip_special: bool = True) -> str:
        data = b"".join(self.table[i] for i in ids if not (skip_special and i in self.special))
        return data.decode("utf-8", errors="replace")


class FakeStreamDecoder:
    def __init__(self, tok: FakeTokenizer, skip_special: bool = True) -> None:
        self.tok, self.skip = tok, skip_special
        self.dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, tid: int) -> str:
        if self.skip and tid in self.tok.special:
            return ""
        return self.dec.decode(self.tok.table[tid])

    def flush(self) -> str:
        return self.dec.decode(b"", final=True)


@pytest.fixture(autouse=True)
def _fake_decoder(monkeypatch):
    monkeypatch.setattr(gen_mod, "_new_stream_decoder", lambda tok, at_start=False: FakeStreamDecoder(tok))


class ChainModel(nn.Module):
    """Always predicts (last token + 1) % V, so a prompt ending in t generates t+1, t+2, ..."""

    def __init__(self) -> None:
        super().__init__()
        self.cfg = ModelConfig(vocab_size=V, hidden_size=8, intermediate_size=8, num_layers=1,
                               num_heads=1, num_kv_heads=1, max_position_embeddings=64)
        self.calls: list[tuple[int, int]] = []

    def new_cache(self, batch_size: int, max_tokens: int, dtype=None) -> KVCache:
        return KVCache(self.cfg, batch_size, max_tokens, dtype or torch.float32)

    def forward(self, tokens, positions=None, cache=None, last_only=False):
        B, T = tokens.shape
        self.calls.append((B, T))
        assert cache.step + T <= cache.capacity
        cache.lengths = [n + T for n in cache.lengths]
        nxt = (tokens + 1) % V
        logits = torch.nn.functional.one_hot(nxt, V).float() * 10.0
        return logits[:, -1:] if last_only else logits


def random_model(seed=0, **kw):
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                num_kv_heads=2, num_experts=4, num_experts_per_tok=2, max_position_embeddings=128)
    base.update(kw)
    cfg = ModelConfig(**base)
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in expected_shapes(cfg).items():
        if len(shape) == 1:
            weights[name] = torch.ones(shape)
        else:
            weights[name] = torch.randn(shape, generator=g) * 0.02 * (8.0 if name == "lm_head" else 1.0)
    return build_model(cfg, weights, torch.float32).eval()


def chain_tok(start: int, texts: list[bytes]) -> FakeTokenizer:
    """Tokenizer where tokens start+1, start+2, ... spell `texts` (what ChainModel generates)."""
    return FakeTokenizer({start + 1 + i: t for i, t in enumerate(texts)})


def run_stream(*args, **kw) -> tuple[list[TokenEvent], dict[int, str]]:
    events = list(generate_stream(*args, **kw))
    texts: dict[int, str] = {}
    for e in events:
        texts[e.row] = texts.get(e.row, "") + e.text
    return events, texts


PROMPTS = [[5, 17, 42], [1, 2, 3, 4, 5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 100, 200, 250]]


# --------------------------------------------------------------------------- batched == single
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(num_experts=0), dict(num_experts=0, sliding_window=8), dict(sliding_window=8)],
    ids=["moe", "dense", "dense-swa8", "moe-swa8"],
)
def test_batched_greedy_equals_one_by_one(kw):
    model = random_model(**kw)
    tok = FakeTokenizer()
    p = SamplingParams.greedy()
    # n_ctx=22 caps the longest prompt to 10 new tokens: rows finish at different steps
    common = dict(max_tokens=12, params=p, stop_token_ids=set(), n_ctx=22)
    batched = generate(model, tok, PROMPTS, prefill_chunk=5, **common)
    for prompt, res in zip(PROMPTS, batched):
        single = generate(model, tok, [prompt], prefill_chunk=512, **common)[0]
        assert res.tokens == single.tokens
        assert res.text == single.text
        assert res.finish_reason == "length"
        assert res.prompt_tokens == len(prompt)
        assert len(res.tokens) == min(12, 22 - len(prompt))
        if "sliding_window" not in kw:
            # reference without any cache: full forward on the growing sequence
            seq = list(prompt)
            with torch.inference_mode():
                for _ in range(len(res.tokens)):
                    seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
            assert seq[len(prompt):] == res.tokens
    # the greedy outputs are not all trivially the same token
    assert len({t for r in batched for t in r.tokens}) > 3


def test_batched_seeded_sampling_equals_one_by_one():
    model = random_model(num_experts=0)
    tok = FakeTokenizer()
    ps = [SamplingParams(temperature=1.0, seed=11), SamplingParams.greedy(), SamplingParams(seed=12)]
    batched = generate(model, tok, PROMPTS, max_tokens=8, params=ps, stop_token_ids=set())
    for prompt, p, res in zip(PROMPTS, ps, batched):
        single = generate(model, tok, [prompt], max_tokens=8, params=p, stop_token_ids=set())[0]
        assert res.tokens == single.tokens


def test_prefill_chunks_and_compaction_calls():
    model = ChainModel()
    tok = FakeTokenizer()
    prompts = [[1] * 3, [10] * 10]
    list(generate_stream(model, tok, prompts, 4, SamplingParams.greedy(), stop_token_ids={4},
                         prefill_chunk=4))
    # prefill: 10 tokens in chunks of 4; row 0 stops at its 3rd token (1->2->3->4 is stop id)
    assert model.calls[:3] == [(2, 4), (2, 4), (2, 2)]
    assert model.calls[3:] == [(2, 1), (2, 1), (1, 1)]


# --------------------------------------------------------------------------- stop handling
def test_stop_string_split_across_tokens_not_emitted():
    start = 50
    tok = chain_tok(start, [b"Hello", b" wor", b"ld", b" ST", b"OP", b" more", b" text"])
    events, texts = run_stream(ChainModel(), tok, [[start]], 20, SamplingParams.greedy(), stop=["STOP"])
    assert texts[0] == "Hello world "
    assert [e.text for e in events] == ["Hello", " wor", "ld", " ", ""]
    assert events[-1].finish_reason == "stop" and events[-1].token == start + 5
    assert all(e.finish_reason is None for e in events[:-1])
    res = generate(ChainModel(), tok, [[start]], 20, SamplingParams.greedy(), stop=["STOP"])[0]
    assert res.text == "Hello world " and res.finish_reason == "stop"
    assert res.tokens == [start + i for i in range(1, 6)]


def test_stop_string_held_back_then_released():
    start = 60
    tok = chain_tok(start, [b"a S", b"T", b"AR", b"!", b" xSTOPy", b"zz"])
    events, texts = run_stream(ChainModel(), tok, [[start]], 20, SamplingParams.greedy(),
                               stop=["STOP", "never"])
    assert [e.text for e in events] == ["a ", "", "STAR", "!", " x"]
    assert texts[0] == "a STAR! x"
    assert events[-1].finish_reason == "stop"


def test_held_back_text_flushed_at_length():
    start = 70
    tok = chain_tok(start, [b"ab", b"cST"])
    events, texts = run_stream(ChainModel(), tok, [[start]], 2, SamplingParams.greedy(), stop=["STOP"])
    assert [e.text for e in events] == ["ab", "cST"]
    assert events[-1].finish_reason == "length"


def test_stop_token_id_and_multibyte_utf8():
    start = 80
    # tokens 81, 82 spell "é" split across two ids; 83 is a stop id
    tok = chain_tok(start, [b"caf", b"\xc3", b"\xa9", b"!", b"more"])
    events, texts = run_stream(ChainModel(), tok, [[start]], 20, SamplingParams.greedy(),
                               stop_token_ids={start + 4})
    assert [e.text for e in events] == ["caf", "", "é", ""]
    assert texts[0] == "café"
    assert events[-1].finish_reason == "stop" and events[-1].token == start + 4
    res = generate(ChainModel(), tok, [[start]], 20, SamplingParams.greedy(), stop_token_ids={start + 4})[0]
    assert res.tokens == [81, 82, 83] and res.text == "café" and res.finish_reason == "stop"


def test_default_stop_ids_are_tokenizer_eos():
    tok = FakeTokenizer()
    res = generate(ChainModel(), tok, [[EOS - 2]], 10, SamplingParams.greedy())[0]
    assert res.tokens == [EOS - 1] and res.finish_reason == "stop"
    assert res.text == tok.decode([EOS - 1])


def test_max_tokens_length_and_stream_concat_matches_generate():
    model = random_model(num_experts=0)
    tok = FakeTokenizer({i: "é".encode()[i % 2: i % 2 + 1] for i in range(200, 260)})
    p = SamplingParams(temperature=0.9, seed=3)
    events, texts = run_stream(model, tok, PROMPTS, 9, p, stop_token_ids=set())
    res = generate(model, tok, PROMPTS, 9, p, stop_token_ids=set())
    for i, r in enumerate(res):
        assert isinstance(r, GenerationResult)
        assert r.finish_reason == "length" and len(r.tokens) == 9
        assert texts[i] == r.text == tok.decode(r.tokens)
        row_events = [e for e in events if e.row == i]
        assert [e.token for e in row_events] == r.tokens
        assert [e.finish_reason for e in row_events] == [None] * 8 + ["length"]


# --------------------------------------------------------------------------- logprobs
def test_logprobs_match_log_softmax():
    model = random_model(num_experts=0)
    tok = FakeTokenizer()
    prompt = [3, 1, 4, 1, 5]
    p = SamplingParams(temperature=1.0, seed=1, repeat_penalty=1.3)  # logprobs ignore penalties
    res = generate(model, tok, [prompt], 5, p, stop_token_ids=set(), logprobs=3)[0]
    assert len(res.logprobs) == len(res.top_logprobs) == len(res.tokens) == 5
    seq = list(prompt)
    with torch.inference_mode():
        for t, lp, top in zip(res.tokens, res.logprobs, res.top_logprobs):
            ref = torch.log_softmax(model(torch.tensor([seq]))[0, -1], -1)
            assert math.isclose(lp, ref[t].item(), abs_tol=1e-4)
            assert len(top) == 3
            assert [i for i, _ in top] == ref.topk(3).indices.tolist()
            assert all(math.isclose(v, ref[i].item(), abs_tol=1e-4) for i, v in top)
            seq.append(t)
    # not requested -> None
    ev = next(iter(generate_stream(model, tok, [prompt], 1, p)))
    assert ev.logprob is None and ev.top_logprobs is None


# --------------------------------------------------------------------------- errors / limits
def test_context_length_error_and_capping():
    model = ChainModel()
    tok = FakeTokenizer()
    with pytest.raises(ContextLengthError, match=r"12.*n_ctx=10|n_ctx=10.*12"):
        list(generate_stream(model, tok, [[1] * 12], 5, SamplingParams.greedy(), n_ctx=10))
    with pytest.raises(ContextLengthError):
        list(generate_stream(model, tok, [[1] * 3, [1] * 10], 5, SamplingParams.greedy(), n_ctx=10))
    assert model.calls == []  # raised before computing anything
    # default n_ctx = max_position_embeddings (64)
    with pytest.raises(ContextLengthError, match="64"):
        list(generate_stream(model, tok, [[1] * 70], 5, SamplingParams.greedy()))
    # fits, but prompt + max_tokens does not: capped, "length"
    res = generate(model, tok, [[100] * 7], 50, SamplingParams.greedy(), stop_token_ids=set(), n_ctx=10)[0]
    assert len(res.tokens) == 3 and res.finish_reason == "length"


def test_invalid_arguments():
    model = ChainModel()
    tok = FakeTokenizer()
    with pytest.raises(ValueError, match="empty"):
        list(generate_stream(model, tok, [[1, 2], []], 5))
    with pytest.raises(ValueError, match="empty"):
        list(generate_stream(model, tok, [], 5))
    with pytest.raises(ValueError, match="max_tokens"):
        list(generate_stream(model, tok, [[1]], 0))
    with pytest.raises(ValueError, match="SamplingParams"):
        list(generate_stream(model, tok, [[1], [2]], 3, [SamplingParams()]))
    with pytest.raises(ValueError, match="out of range"):
        list(generate_stream(model, tok, [[1, V + 5]], 3))
