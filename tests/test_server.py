"""OpenAI-compatible server: real uvicorn on a free port, tiny random Mixtral with the real Mistral tokenizer.

Clients: the official `openai` package (sync and async), LangChain's ChatOpenAI and raw httpx for the
error cases, a load test (32 concurrent streams), a fuzz test (>= 1000 random / mutated bodies, no
5xx allowed) and a disconnect test (the engine request is cancelled when the client goes away).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
from fixtures import hf_model, save_hf

from levante import LLM
from levante.server import create_app

KEY = "sk-test-key"
ALIAS = "tiny-mixtral"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, app) -> None:
        import uvicorn

        self.app = app
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.time() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def engine(self):
        return self.app.state.server.engine

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    d = save_hf(hf_model("mixtral_8x2", vocab_size=32000), tmp_path_factory.mktemp("srv") / "m", tokenizer=True)
    return LLM(str(d), n_ctx=256)


@pytest.fixture(scope="module")
def server(llm):
    s = _Server(create_app(llm, api_key=KEY, model_alias=ALIAS, max_batch=16, max_tokens_cap=256, max_n=4,
                           max_body_bytes=100_000))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def fuzz_server(llm):
    s = _Server(create_app(llm, model_alias=ALIAS, max_batch=8, max_tokens_cap=4, max_n=2))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def _eos(llm) -> int:
    return llm.tokenizer.eos_id


# ---------------------------------------------------------------------------------------------- happy path
def test_models_and_health(client, http):
    ids = [m.id for m in client.models.list().data]
    assert ids == [ALIAS]
    h = http.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"


def test_completion_greedy_equals_llm(client, llm):
    got = client.completions.create(model=ALIAS, prompt="The quick brown fox", max_tokens=8, temperature=0)
    want = llm.create_completion("The quick brown fox", max_tokens=8, temperature=0)
    assert got.choices[0].text == want["choices"][0]["text"]
    assert got.choices[0].finish_reason == want["choices"][0]["finish_reason"]
    assert got.usage.prompt_tokens == want["usage"]["prompt_tokens"]
    assert got.usage.completion_tokens == want["usage"]["completion_tokens"]
    assert got.object == "text_completion" and got.model == ALIAS and got.id.startswith("cmpl-")


def test_completion_stream_equals_non_stream(client):
    full = client.completions.create(model=ALIAS, prompt="Once upon a time", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=ALIAS, prompt="Once upon a time", max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_seed_reproducible_and_n(client):
    kw = dict(model=ALIAS, prompt="Hello", max_tokens=12, temperature=1.0, seed=1234, logit_bias={"2": -100})
    a = client.completions.create(n=2, **kw)
    b = client.completions.create(n=2, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert [c.index for c in a.choices] == [0, 1]
    assert a.choices[0].text != a.choices[1].text  # seed + i per choice
    assert a.usage.completion_tokens == 24


def test_multiple_prompts_and_token_prompt(client, llm):
    ids = llm.tokenize("Hello world")
    r = client.completions.create(model=ALIAS, prompt=["Hello world", "Bye"], max_tokens=3, temperature=0)
    assert len(r.choices) == 2
    r2 = client.completions.create(model=ALIAS, prompt=ids, max_tokens=3, temperature=0)
    assert r2.choices[0].text == r.choices[0].text
    assert r.usage.prompt_tokens == len(ids) + len(llm.tokenize("Bye"))


def test_stop_string(client):
    full = client.completions.create(model=ALIAS, prompt="Stop test", max_tokens=12, temperature=0,
                                     logit_bias={"2": -100}).choices[0].text
    assert len(full) >= 6
    stop = full[len(full) // 2: len(full) // 2 + 2]
    got = client.completions.create(model=ALIAS, prompt="Stop test", max_tokens=12, temperature=0, stop=[stop],
                                    logit_bias={"2": -100}).choices[0]
    assert got.text == full[: full.find(stop)]
    assert got.finish_reason == "stop"


def test_completion_logprobs(client):
    r = client.completions.create(model=ALIAS, prompt="Hi", max_tokens=5, temperature=0, logprobs=2,
                                  logit_bias={"2": -100})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 5 == r.usage.completion_tokens
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
    # greedy: the chosen token is the most likely one
    assert all(abs(lp.token_logprobs[i] - max(lp.top_logprobs[i].values())) < 1e-4 for i in range(5))


def test_chat(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    r = client.chat.completions.create(model=ALIAS, messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3, logit_bias={"2": -100})
    ch = r.choices[0]
    assert ch.message.role == "assistant" and ch.finish_reason == "length"
    assert r.usage.completion_tokens == 6 and r.object == "chat.completion"
    assert len(ch.logprobs.content) == 6 and all(len(t.top_logprobs) == 3 for t in ch.logprobs.content)
    chunks = list(client.chat.completions.create(model=ALIAS, messages=msgs, max_completion_tokens=6, temperature=0,
                                                 stream=True, logit_bias={"2": -100}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ch.message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_n2_stream_usage(client):
    chunks = list(client.chat.completions.create(
        model=ALIAS, messages=[{"role": "user", "content": "Two answers"}], max_tokens=4, n=2, seed=7,
        stream=True, stream_options={"include_usage": True}, logit_bias={"2": -100}))
    texts = {0: "", 1: ""}
    finish = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert finish == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 8


def test_async_client(server):
    async def main():
        c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
        r = await c.chat.completions.create(model=ALIAS, messages=[{"role": "user", "content": "hey"}],
                                            max_tokens=3, temperature=0)
        s = await c.completions.create(model=ALIAS, prompt="hey", max_tokens=3, stream=True, temperature=0)
        text = "".join([ch.choices[0].text async for ch in s])
        await c.close()
        return r, text

    r, text = asyncio.run(main())
    assert r.choices[0].message.content is not None and isinstance(text, str)


def test_langchain(server):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=f"{server.url}/v1", api_key=KEY, model=ALIAS, max_tokens=5, temperature=0,
                      max_retries=0)
    out = chat.invoke("Say hi")
    assert isinstance(out.content, str)
    assert out.usage_metadata["output_tokens"] <= 5


# ---------------------------------------------------------------------------------------------- errors
def _err(r: httpx.Response, status: int, code=None, param=None, msg: str = "", etype: str = "invalid_request_error"):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"}
    assert e["type"] == etype
    if code is not None:
        assert e["code"] == code, e
    if param is not None:
        assert e["param"] == param, e
    assert msg.lower() in e["message"].lower(), e


CHAT = "/v1/chat/completions"
CMPL = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path, body, status, code, param, msg", [
    (CMPL, b"{not json", 400, "invalid_json", None, "not valid JSON"),
    (CMPL, b"", 400, "invalid_json", None, "empty"),
    (CMPL, b"\xff\xfe\x00", 400, "invalid_json", None, "UTF-8"),
    (CMPL, b"[1, 2]", 400, "invalid_type", None, "must be a JSON object"),
    (CHAT, b'"hello"', 400, "invalid_type", None, "must be a JSON object"),
    (CMPL, b'{"prompt": "x", "temperature": NaN}', 400, "invalid_json", None, "NaN"),
    (CMPL, {"model": ALIAS}, 400, "missing_required_parameter", "prompt", "prompt"),
    (CHAT, {"model": ALIAS}, 400, "missing_required_parameter", "messages", "messages"),
    (CMPL, {"model": "gpt-9", "prompt": "x"}, 404, "model_not_found", "model", "gpt-9"),
    (CHAT, {"model": "gpt-9", "messages": USER}, 404, "model_not_found", "model", "does not exist"),
    (CMPL, {"prompt": "x", "temperature": 2.5}, 400, "invalid_value", "temperature", "less than or equal to 2"),
    (CMPL, {"prompt": "x", "temperature": -0.1}, 400, "invalid_value", "temperature", "greater than or equal"),
    (CMPL, {"prompt": "x", "temperature": "hot"}, 400, "invalid_value", "temperature", "number"),
    (CMPL, {"prompt": "x", "top_p": 0}, 400, "invalid_value", "top_p", "greater than 0"),
    (CMPL, {"prompt": "x", "max_tokens": "5"}, 400, "invalid_value", "max_tokens", "integer"),
    (CMPL, {"prompt": "x", "max_tokens": 0}, 400, "invalid_value", "max_tokens", ">= 1"),
    (CMPL, {"prompt": "x", "max_tokens": 100000}, 400, "invalid_value", "max_tokens", "<= 256"),
    (CHAT, {"messages": USER, "max_completion_tokens": 10**30}, 400, "invalid_value", "max_completion_tokens", "<="),
    (CMPL, {"prompt": "x", "n": 0}, 400, "invalid_value", "n", ">= 1"),
    (CMPL, {"prompt": "x", "n": 5}, 400, "invalid_value", "n", "<= 4"),
    (CMPL, {"prompt": "x", "stop": 5}, 400, "invalid_value", "stop", ""),
    (CMPL, {"prompt": "x", "seed": 1.5}, 400, "invalid_value", "seed", "integer"),
    (CMPL, {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "invalid_value", "logit_bias", "token ids"),
    (CMPL, {"prompt": "x", "logit_bias": {"99999999": 1}}, 400, "invalid_value", "logit_bias", "out of range"),
    (CMPL, {"prompt": "x", "logit_bias": {"5": 500}}, 400, "invalid_value", "logit_bias.5", "100"),
    (CMPL, {"prompt": "x", "presence_penalty": 3}, 400, "invalid_value", "presence_penalty", "2"),
    (CMPL, {"prompt": "x", "logprobs": 100}, 400, "invalid_value", "logprobs", "20"),
    (CMPL, {"prompt": []}, 400, "invalid_value", "prompt", "empty"),
    (CMPL, {"prompt": [1, 99999999]}, 400, "invalid_value", "prompt", "out of range"),
    (CMPL, {"prompt": "word " * 400}, 400, "context_length_exceeded", "prompt", "maximum context length is 256"),
    (CHAT, {"messages": [{"role": "user", "content": "word " * 400}]}, 400, "context_length_exceeded",
     "messages", "maximum context length is 256"),
    (CHAT, {"messages": []}, 400, "invalid_value", "messages", "at least 1"),
    (CHAT, {"messages": "hi"}, 400, "invalid_value", "messages", "list"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "invalid_value", "messages", "unknown role"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "invalid_value", "messages", "content"),
    (CHAT, {"messages": USER, "logprobs": "yes"}, 400, "invalid_value", "logprobs", "boolean"),
    (CHAT, {"messages": USER, "stream_options": {"include_usage": 3}}, 400, "invalid_value",
     "stream_options.include_usage", "boolean"),
    (CHAT, {"messages": USER, "top_logprobs": -1}, 400, "invalid_value", "top_logprobs", "greater than"),
])
def test_bad_requests(http, path, body, status, code, param, msg):
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = http.post(path, json=body)
    _err(r, status, code, param, msg)


def test_body_too_large_and_unknown_route(http):
    _err(http.post(CMPL, content=b'{"prompt": "' + b"a" * 200_000 + b'"}'), 413, "request_too_large", None, "limit")
    _err(http.get("/v1/nothing"), 404, "not_found")
    _err(http.get(CMPL), 405, "method_not_allowed")


def test_unknown_fields_ignored(http):
    r = http.post(CMPL, json={"prompt": "x", "max_tokens": 2, "user": "u1", "something_new": {"a": 1}, "echo": True})
    assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith("x")


def test_api_key(server, http):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        with httpx.Client(base_url=server.url, headers=headers) as c:
            for r in (c.get("/v1/models"), c.post(CMPL, json={"prompt": "x", "max_tokens": 1})):
                _err(r, 401, "invalid_api_key", None, "api key")
    assert http.get("/v1/models").status_code == 200
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


# ---------------------------------------------------------------------------------------------- load
def test_32_concurrent_streams(server, llm):
    eos = _eos(llm)

    async def one(c: openai.AsyncOpenAI, i: int):
        s = await c.completions.create(model=ALIAS, prompt=f"Client {i} says", max_tokens=50, temperature=0,
                                       logit_bias={str(eos): -100}, stream=True,
                                       stream_options={"include_usage": True})
        text, usage, finish = "", None, None
        async for ch in s:
            if ch.choices:
                text += ch.choices[0].text
                finish = ch.choices[0].finish_reason or finish
            if ch.usage:
                usage = ch.usage
        return text, usage, finish

    async def main():
        c = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(c, i) for i in range(32)))
        finally:
            await c.close()

    results = asyncio.run(main())  # each client is bounded by its own timeout
    assert len(results) == 32
    for _text, usage, finish in results:
        assert usage.completion_tokens == 50 and finish == "length"


# ---------------------------------------------------------------------------------------------- disconnect
def test_disconnect_cancels_engine_request(server, http):
    eng = server.engine
    before = eng.metrics.completion_tokens
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as c:
        with c.stream("POST", CMPL, json={"prompt": "A long story", "max_tokens": 200, "stream": True,
                                          "logit_bias": {"2": -100}}) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    seen += 1
                    if seen == 2:
                        break
            assert eng.n_active + len(eng.waiting) >= 1 or eng.metrics.completion_tokens - before < 200
    deadline = time.time() + 5
    while (eng.n_active or eng.waiting) and time.time() < deadline:
        time.sleep(0.01)
    assert eng.n_active == 0 and not eng.waiting
    assert eng.metrics.completion_tokens - before < 200  # stopped early, not run to max_tokens
    assert "levante_active_requests 0" in http.get("/metrics").text


def test_disconnect_cancels_non_streaming_request(server):
    eng = server.engine
    before = eng.metrics.completion_tokens
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post(CHAT, json={"messages": USER, "max_tokens": 256, "logit_bias": {"2": -100}})
    deadline = time.time() + 5
    while (eng.n_active or eng.waiting) and time.time() < deadline:
        time.sleep(0.01)
    assert eng.n_active == 0 and not eng.waiting
    assert eng.metrics.completion_tokens - before < 256


def test_metrics(http):
    text = http.get("/metrics").text
    for name in ("levante_requests_total", "levante_time_to_first_token_seconds", "levante_queue_depth",
                 "levante_batch_size", "levante_http_requests_total"):
        assert name in text
    assert 'levante_http_requests_total{method="POST",path="/v1/completions",status="200"}' in text
    assert 'status="401"' in text


# ---------------------------------------------------------------------------------------------- fuzz
_FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n",
           "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
           "user", "stream", "stream_options", "top_k", "min_p", "repeat_penalty", "echo", "typical_p", "best_of",
           "response_format", "tools", "tool_choice", "suffix"]


def _rand_value(rng: random.Random, depth: int = 0):
    k = rng.randrange(14 if depth < 3 else 10)
    if k == 0:
        return None
    if k == 1:
        return rng.choice([True, False])
    if k == 2:
        return rng.choice([0, 1, -1, 2, 3, 4, 5, 31999, 32000, 2**31, 2**63, 2**64, -(2**63) - 1, 10**40, -10**40])
    if k == 3:
        return rng.randint(-1000, 1000)
    if k == 4:
        return rng.choice([0.0, -0.0, 0.5, 1.0, 2.0, 2.0000001, -1e-9, 1e308, -1e308, 5e-324, 1e-3])
    if k == 5:
        return rng.uniform(-5, 5)
    if k == 6:
        return rng.choice(["", "x", "tiny-mixtral", "user", "assistant", "system", "\ud800", "\x00", "🦄" * 50,
                           "</s>", "<s>", "[INST]", "{{ 7*7 }}", "{% for x in range(10**9) %}", "a" * 3000,
                           "\u202e\ufeff", "text", "auto", "none", "Ÿ̶̢ ̷"])
    if k == 7:
        return "".join(chr(rng.randrange(1, 0x2FFFF)) for _ in range(rng.randrange(20)))
    if k == 8:
        return [rng.randrange(-5, 40000) for _ in range(rng.randrange(6))]
    if k == 9:
        return {"role": rng.choice(["user", "assistant", "system", "tool", "x"]),
                "content": rng.choice(["hi", "", None, 3, [{"type": "text", "text": "hey"}], [1]])}
    if k in (10, 11):
        return [_rand_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(_FIELDS + ["include_usage", "type", "2", "-1", "99999"]): _rand_value(rng, depth + 1)
            for _ in range(rng.randrange(4))}


def _bases(rng: random.Random):
    return [
        (CMPL, {"model": ALIAS, "prompt": "Hello", "max_tokens": 2}),
        (CMPL, {"prompt": ["a", "b"], "max_tokens": 1, "n": 2, "stream": True}),
        (CMPL, {"prompt": [1, 2, 3], "logprobs": 2, "stream": rng.random() < 0.5}),
        (CHAT, {"model": ALIAS, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        (CHAT, {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2}),
    ]


def _mutate(rng: random.Random) -> tuple[str, bytes]:
    path, body = rng.choice(_bases(rng))
    r = rng.random()
    if r < 0.05:
        return path, bytes(rng.randrange(256) for _ in range(rng.randrange(64)))
    if r < 0.1:
        return path, json.dumps(_rand_value(rng)).encode()
    for _ in range(rng.randrange(1, 4)):
        op = rng.random()
        if op < 0.6:
            body[rng.choice(_FIELDS)] = _rand_value(rng)
        elif op < 0.8 and body:
            body.pop(rng.choice(list(body)))
        else:
            body[f"unknown_{rng.randrange(100)}"] = _rand_value(rng)
    raw = json.dumps(body, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    if rng.random() < 0.1:
        raw = raw[: rng.randrange(len(raw) + 1)]
    return path, raw


def test_fuzz_no_5xx(fuzz_server):
    rng = random.Random(20240605)
    cases = [_mutate(rng) for _ in range(1200)]
    statuses: dict[int, int] = {}
    failures: list[tuple[int, str, bytes, str]] = []

    async def main():
        sem = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=fuzz_server.url, timeout=60) as c:
            async def one(path, raw):
                async with sem:
                    r = await c.post(path, content=raw, headers={"Content-Type": "application/json"})
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    ok = r.status_code < 500 and (r.status_code != 200 or r.text)
                    if r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"):
                        ok = ok and r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text
                    if r.status_code >= 400:
                        ok = ok and set(r.json()["error"]) == {"message", "type", "param", "code"}
                    if not ok:
                        failures.append((r.status_code, path, raw[:200], r.text[:300]))

            await asyncio.gather(*(one(p, b) for p, b in cases))

    asyncio.run(main())  # each request is bounded by the client's timeout
    assert not failures, failures[:5]
    assert statuses.get(200, 0) > 50 and sum(v for k, v in statuses.items() if 400 <= k < 500) > 300, statuses
    r = httpx.post(f"{fuzz_server.url}{CHAT}", json={"messages": USER, "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert fuzz_server.engine._thread.is_alive()


# ---------------------------------------------------------------------------------------------- engine failures
def test_a_failing_generation_gets_a_generic_500_with_its_id(server, http, monkeypatch, caplog):
    """The client sees the response id and a generic message; the exception's text stays in the server log."""
    eng = server.engine
    real = eng.model

    class Broken(torch.nn.Module):
        cfg, model = real.cfg, real.model

        def forward(self, tokens, *a, **k):
            if bool((tokens == 31999).any()):
                raise RuntimeError("secret detail of the failure")
            return real(tokens, *a, **k)

    monkeypatch.setattr(eng, "model", Broken())
    with caplog.at_level("ERROR", logger="levante.engine"):
        r = http.post(CMPL, json={"prompt": [1, 5, 31999], "max_tokens": 4})
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["type"] == "server_error" and err["code"] == "engine_error"
        assert "secret" not in err["message"] and re.search(r"\(cmpl-[0-9a-f]+/0\)", err["message"])
        rid = re.search(r"\((cmpl-[0-9a-f]+/0)\)", err["message"]).group(1)
        assert any(rid in rec.getMessage() and rec.exc_info for rec in caplog.records)
        with http.stream("POST", CMPL, json={"prompt": [1, 5, 31999], "max_tokens": 4, "stream": True}) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert "secret" not in "".join(events) and '"engine_error"' in events[-2] and events[-1] == "data: [DONE]"
    ok = http.post(CMPL, json={"prompt": [1, 5, 6], "max_tokens": 3})  # the others are served as before
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_speculative_server_same_output(llm):
    spec_llm = LLM(str(llm.loaded.path), n_ctx=256, _loaded=llm.loaded, speculative="prompt_lookup")
    s = _Server(create_app(spec_llm, model_alias=ALIAS, max_batch=4))
    try:
        prompt = "one two three one two three one two three one two"
        want = llm.create_completion(prompt, max_tokens=24, temperature=0)["choices"][0]["text"]
        with httpx.Client(base_url=s.url, timeout=60) as c:
            body = {"model": ALIAS, "prompt": prompt, "max_tokens": 24, "temperature": 0}
            assert c.post("/v1/completions", json=body).json()["choices"][0]["text"] == want
            with c.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
                chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
            assert "".join(ch["choices"][0]["text"] for ch in chunks) == want
            metrics = c.get("/metrics").text
        proposed = next(line for line in metrics.splitlines() if line.startswith("levante_spec_proposed_tokens_total"))
        assert int(proposed.split()[1]) > 0
    finally:
        s.stop()
