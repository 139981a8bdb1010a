"""Continuous batching engine: concurrent requests equal solo generation; prefix cache; cancellation."""

import asyncio
import threading
import time

import pytest
import torch
from fixtures import hf_model, save_hf

from levante import LLM
from levante.engine import Engine
from levante.errors import ContextLengthError, EngineError
from levante.generate import generate
from levante.sampling import SamplingParams


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    d = save_hf(hf_model("mixtral_8x2", vocab_size=32000), tmp_path_factory.mktemp("eng") / "m", tokenizer=True)
    return LLM(str(d), n_ctx=256)


def _solo(llm, prompt, n, params=None):
    return generate(llm.model, llm.tokenizer, [prompt], n, params or SamplingParams.greedy(), stop_token_ids=set())[0]


def test_concurrent_requests_equal_solo(llm):
    eng = Engine(llm.model, llm.tokenizer, n_ctx=256, max_batch=3).start()
    try:
        prompts = [llm.tokenize(t) for t in ["Hello", "The quick brown fox", "A", "Once upon a time there", "Hi"]]
        lens = [12, 5, 9, 20, 7]
        reqs = [eng.submit(p, n, SamplingParams.greedy(), stop_ids=set()) for p, n in zip(prompts, lens)]
        outs = [[ev.token for ev in r] for r in reqs]  # 5 requests through 3 slots: joins and leaves
        for p, n, got in zip(prompts, lens, outs):
            assert got == _solo(llm, p, n).tokens
    finally:
        eng.shutdown()


def test_a_steps_events_reach_an_event_loop_in_one_wake_up(llm):
    """Requests iterated on an event loop (the server's) get all of a step's events through one
    call_soon_threadsafe (a self-pipe write each), not one per token, and in order: the tokens generated alone."""
    eng = Engine(llm.model, llm.tokenizer, n_ctx=256, max_batch=3)
    loop = asyncio.new_event_loop()
    calls = []
    wake = loop.call_soon_threadsafe

    def counted(cb, *args, **kw):
        calls.append(cb)
        return wake(cb, *args, **kw)

    loop.call_soon_threadsafe = counted
    prompts = [llm.tokenize(t) for t in ["Hello", "The quick brown fox", "Once upon a time there"]]
    n = 10

    async def tokens() -> list[list[int]]:
        reqs = [eng.submit(p, n, SamplingParams.greedy(), stop_ids=set(), loop=loop) for p in prompts]
        eng.start()  # all three queued: admitted together
        return [[ev.token async for ev in r.events()] for r in reqs]

    try:
        got = loop.run_until_complete(tokens())
    finally:
        eng.shutdown()
        loop.close()
    assert got == [_solo(llm, p, n).tokens for p in prompts]
    assert len(calls) <= n + len(prompts)  # 3 x (10 tokens + the end) = 33 wake-ups when each event had its own


def test_sampled_requests_equal_solo_with_seed(llm):
    eng = Engine(llm.model, llm.tokenizer, n_ctx=256, max_batch=4).start()
    try:
        params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=5)
        p = llm.tokenize("Tell me")
        r1 = eng.submit(p, 10, params, stop_ids=set())
        r2 = eng.submit(llm.tokenize("Other prompt"), 6, SamplingParams.greedy(), stop_ids=set())
        got = [ev.token for ev in r1]
        list(r2)
        assert got == _solo(llm, p, 10, params).tokens
    finally:
        eng.shutdown()


def test_prefix_cache_reuses_rows(llm):
    eng = Engine(llm.model, llm.tokenizer, n_ctx=256, max_batch=2).start()
    try:
        system = llm.tokenize("You are a helpful assistant. " * 8)
        a = eng.submit(system + llm.tokenize("Question one", add_bos=False), 4, SamplingParams.greedy())
        list(a)
        q2 = system + llm.tokenize("Question two", add_bos=False)
        b = eng.submit(q2, 6, SamplingParams.greedy(), stop_ids=set())
        got = [ev.token for ev in b]
        assert b.cached_tokens >= len(system)
        assert got == _solo(llm, q2, 6).tokens
        assert eng.metrics.cached_prompt_tokens >= len(system)
    finally:
        eng.shutdown()


def test_cancel_frees_slot(llm):
    eng = Engine(llm.model, llm.tokenizer, n_ctx=256, max_batch=1).start()
    try:
        long = eng.submit(llm.tokenize("Go on"), 200, SamplingParams.greedy(), stop_ids=set())
        it = iter(long)
        next(it)
        long.cancel()
        rest = list(it)
        assert len(rest) < 199
        short = eng.submit(llm.tokenize("Next"), 3, SamplingParams.greedy(), stop_ids=set())
        assert len(list(short)) == 3
        for _ in range(100):
            if eng.n_active == 0:
                break
            time.sleep(0.01)
        assert eng.n_active == 0
    finally:
        eng.shutdown()


def test_bad_requests_raise_at_submit(llm):
    eng = Engine(llm.model, llm.tokenizer, n_ctx=16, max_batch=1)
    with pytest.raises(ContextLengthError, match="context window is 16"):
        eng.submit(list(range(5, 30)), 4, SamplingParams.greedy())
    with pytest.raises(ValueError, match="empty"):
        eng.submit([], 4, SamplingParams.greedy())


def test_many_threads(llm):
    eng = Engine(llm.model, llm.tokenizer, n_ctx=256, max_batch=4).start()
    results = {}
    try:
        def worker(i):
            r = eng.submit(llm.tokenize(f"Request number {i}"), 8, SamplingParams.greedy(), stop_ids=set())
            results[i] = [ev.token for ev in r]

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert len(results) == 10 and all(len(v) == 8 for v in results.values())
        assert results[3] == _solo(llm, llm.tokenize("Request number 3"), 8).tokens
    finally:
        eng.shutdown()
    assert "levante_requests_total 10" in eng.metrics.prometheus()
    assert torch.is_tensor(eng.cache.k[0])


def test_queue_is_bounded(llm):
    from levante.errors import OverloadedError

    eng = Engine(llm.model, llm.tokenizer, n_ctx=256, max_batch=1, max_queue=2)  # not started: nothing drains
    eng.submit(llm.tokenize("a"), 2, SamplingParams.greedy())
    eng.submit(llm.tokenize("b"), 2, SamplingParams.greedy())
    with pytest.raises(OverloadedError, match="overloaded"):
        eng.submit(llm.tokenize("c"), 2, SamplingParams.greedy())


POISON = 31999  # a token id the tests' broken model chokes on


class _Broken(torch.nn.Module):
    """The real model, raising when `when(tokens)` says so: a bug that shows up for one request's input."""

    def __init__(self, model, when) -> None:
        super().__init__()
        self.inner, self.when = model, when
        self.cfg = model.cfg
        self.model = model.model

    def new_cache(self, *a, **k):
        return self.inner.new_cache(*a, **k)

    def forward(self, tokens, *a, **k):
        if self.when(tokens):
            raise RuntimeError("secret detail of the failure")
        return self.inner(tokens, *a, **k)


def test_a_failing_prefill_fails_only_its_request(llm, caplog):
    broken = _Broken(llm.model, lambda t: t.shape[1] > 1 and bool((t == POISON).any()))
    eng = Engine(broken, llm.tokenizer, n_ctx=256, max_batch=3).start()
    try:
        good = [eng.submit(llm.tokenize(t), 6, SamplingParams.greedy(), stop_ids=set()) for t in ("Hello", "Hi there")]
        bad = eng.submit(llm.tokenize("Hello") + [POISON], 6, SamplingParams.greedy(), stop_ids=set(), tag="cmpl-x/0")
        with caplog.at_level("ERROR", logger="levante.engine"):
            with pytest.raises(EngineError) as err:
                list(bad)
        assert "cmpl-x/0" in str(err.value) and "secret" not in str(err.value)
        for r, t in zip(good, ("Hello", "Hi there")):
            assert [ev.token for ev in r] == _solo(llm, llm.tokenize(t), 6).tokens
        assert any("cmpl-x/0 failed" in rec.getMessage() and rec.exc_info for rec in caplog.records)
        after = eng.submit(llm.tokenize("Hello"), 4, SamplingParams.greedy(), stop_ids=set())  # still serving
        assert [ev.token for ev in after] == _solo(llm, llm.tokenize("Hello"), 4).tokens
        assert "levante_requests_failed_total 1" in eng.metrics.prometheus()
    finally:
        eng.shutdown()


def test_a_failing_sample_fails_only_its_row(llm, monkeypatch):
    """The batched sampling raises for one row's parameters: each row alone, only that one fails."""
    import levante.engine as engine_mod

    real = engine_mod.sample
    bad_params = SamplingParams(temperature=0.0)
    armed = threading.Event()

    def sample(logits, params, gens, history=None):
        if armed.is_set() and any(p is bad_params for p in params):
            raise ValueError("bad row")
        return real(logits, params, gens, history=history)

    monkeypatch.setattr(engine_mod, "sample", sample)
    eng = Engine(llm.model, llm.tokenizer, n_ctx=256, max_batch=3).start()
    try:
        ok = eng.submit(llm.tokenize("Hello"), 40, SamplingParams.greedy(), stop_ids=set())
        bad = eng.submit(llm.tokenize("Hi"), 12, bad_params, stop_ids=set())
        it, bad_it = iter(ok), iter(bad)
        got = [next(it).token]
        next(bad_it)  # both admitted and decoding together
        armed.set()
        with pytest.raises(EngineError, match="request"):
            list(bad_it)
        assert got + [ev.token for ev in it] == _solo(llm, llm.tokenize("Hello"), 40).tokens
    finally:
        eng.shutdown()


def test_a_failing_decode_step_fails_its_batch_and_the_engine_goes_on(llm):
    state = {"armed": False}
    broken = _Broken(llm.model, lambda t: state["armed"] and t.shape[1] == 1)
    eng = Engine(broken, llm.tokenizer, n_ctx=256, max_batch=2).start()
    try:
        a = eng.submit(llm.tokenize("Hello"), 50, SamplingParams.greedy(), stop_ids=set())
        it = iter(a)
        next(it)
        state["armed"] = True
        with pytest.raises(EngineError):
            list(it)
        state["armed"] = False
        b = eng.submit(llm.tokenize("Hi"), 3, SamplingParams.greedy(), stop_ids=set())
        assert len(list(b)) == 3
    finally:
        eng.shutdown()


class _Recorder(_Broken):
    """The model (never failing), with every call's (new tokens, cache rows) recorded in order."""

    def __init__(self, inner):
        super().__init__(inner, lambda tokens: False)
        self.calls = []

    def forward(self, tokens, *a, rows=None, **k):
        self.calls.append((tokens.shape[1], rows))
        return super().forward(tokens, *a, rows=rows, **k)


def test_a_long_prompt_is_prefilled_between_decode_steps(llm):
    """Chunked prefill: a 150-token prompt arriving while a stream runs is fed 16 tokens per scheduler step, each
    chunk followed by a decode step of the running stream; both outputs equal solo generation."""
    rec = _Recorder(llm.model)
    eng = Engine(rec, llm.tokenizer, n_ctx=256, max_batch=2, prefill_chunk=16).start()
    try:
        short = llm.tokenize("Hello")
        running = eng.submit(short, 40, SamplingParams.greedy(), stop_ids=set())
        it = iter(running)
        first = [next(it).token for _ in range(3)]
        long_prompt = llm.tokenize("The quick brown fox jumps over the lazy dog. " * 16)[:150]
        assert len(long_prompt) == 150
        late = eng.submit(long_prompt, 5, SamplingParams.greedy(), stop_ids=set())
        got_late = [ev.token for ev in late]
        got_running = first + [ev.token for ev in it]
    finally:
        eng.shutdown()
    chunks = [i for i, (t, rows) in enumerate(rec.calls) if rows == slice(1, 2)]
    assert [rec.calls[i][0] for i in chunks] == [16] * 9 + [6]  # 150 tokens in chunks of 16
    for a, b in zip(chunks, chunks[1:]):  # a decode step of the running stream between every two chunks
        assert any(t == 1 and rows == slice(0, 1) for t, rows in rec.calls[a + 1 : b])
    assert got_late == _solo(llm, long_prompt, 5).tokens
    assert got_running == _solo(llm, short, 40).tokens
