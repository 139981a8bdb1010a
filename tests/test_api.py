"""The LLM Python API on a tiny random Mixtral with the real Mixtral tokenizer."""

import pytest
import torch
from fixtures import hf_model, save_hf

from levante import LLM, ContextLengthError


@pytest.fixture(scope="module")
def ref_and_llm(tmp_path_factory):
    ref = hf_model("mixtral_8x2", vocab_size=32000)
    d = save_hf(ref, tmp_path_factory.mktemp("api") / "tiny-mixtral", tokenizer=True)
    return ref, LLM(str(d), n_ctx=128, n_threads=2)


@pytest.fixture(scope="module")
def llm(ref_and_llm):
    return ref_and_llm[1]


def test_tokenize_detokenize(llm):
    ids = llm.tokenize("Hello world")
    assert ids[0] == 1 and llm.detokenize(ids[1:]) == "Hello world"
    assert llm.tokenize("Hello", add_bos=False)[0] != 1


def test_logits_match_transformers(ref_and_llm):
    ref, llm = ref_and_llm
    ids = llm.tokenize("The quick brown fox jumps")
    got = llm.logits(ids)
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    assert got.shape == (len(ids), 32000)
    assert (got - want).abs().max().item() <= 1e-4


def test_completion_dict(llm):
    out = llm("Hello", max_tokens=6, temperature=0)
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    ch = out["choices"][0]
    assert ch["finish_reason"] in ("length", "stop") and ch["index"] == 0
    assert out["usage"]["prompt_tokens"] == len(llm.tokenize("Hello"))
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]


def test_greedy_matches_transformers_generate(ref_and_llm):
    from levante.generate import generate
    from levante.sampling import SamplingParams

    ref, llm = ref_and_llm
    ids = llm.tokenize("Once upon a time")
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(ids):].tolist()
    got = generate(llm.model, llm.tokenizer, [ids], 12, SamplingParams.greedy(), stop_token_ids=set())[0]
    assert got.tokens == want
    text = llm(ids, max_tokens=12, temperature=0)["choices"][0]["text"]
    assert text == llm.tokenizer.decode(ids + want)[len(llm.tokenizer.decode(ids)):]


def test_seed_reproducible(llm):
    a = llm("Hi", max_tokens=8, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=7)["choices"][0]["text"]
    b = llm("Hi", max_tokens=8, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=7)["choices"][0]["text"]
    c = llm("Hi", max_tokens=8, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=8)["choices"][0]["text"]
    assert a == b and a != c


def test_stream_equals_non_stream(llm):
    full = llm("Paris is", max_tokens=10, temperature=0)["choices"][0]["text"]
    chunks = list(llm("Paris is", max_tokens=10, temperature=0, stream=True))
    assert "".join(c["choices"][0]["text"] for c in chunks) == full
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_stop_string_and_echo(llm):
    full = llm("Paris is", max_tokens=10, temperature=0)["choices"][0]["text"]
    stop = full[3:6]
    out = llm("Paris is", max_tokens=10, temperature=0, stop=[stop], echo=True)["choices"][0]
    assert out["finish_reason"] == "stop"
    assert out["text"] == "Paris is" + full[: full.index(stop)]


def test_logprobs(llm):
    out = llm("Hello", max_tokens=4, temperature=0, logprobs=3)["choices"][0]["logprobs"]
    assert len(out["tokens"]) == 4 and len(out["top_logprobs"][0]) == 3
    # greedy: the chosen token is the most likely one
    assert out["token_logprobs"][0] == pytest.approx(max(out["top_logprobs"][0].values()))


def test_batched_prompts_equal_single(llm):
    prompts = ["Hello", "A much longer prompt that needs padding", "Hi"]
    batch = llm(prompts, max_tokens=6, temperature=0)
    assert [c["index"] for c in batch["choices"]] == [0, 1, 2]
    for p, c in zip(prompts, batch["choices"]):
        assert c["text"] == llm(p, max_tokens=6, temperature=0)["choices"][0]["text"]


def test_chat_completion(llm):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    out = llm.create_chat_completion(msgs, max_tokens=5, temperature=0)
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"]["role"] == "assistant"
    chunks = list(llm.create_chat_completion(msgs, max_tokens=5, temperature=0, stream=True))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == out["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_uses_mistral_instruct_ids(llm):
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    want = MistralTokenizer.v1().encode_chat_completion(
        ChatCompletionRequest(messages=[UserMessage(content="Hello there")])).tokens
    assert llm.chat_prompt([{"role": "user", "content": "Hello there"}]) == want


def test_prompt_too_long(llm):
    with pytest.raises(ContextLengthError, match="n_ctx=128"):
        llm("word " * 200, max_tokens=4)
    with pytest.raises(ContextLengthError):
        llm.logits(list(range(3, 200)))


def test_bad_sampling_value(llm):
    with pytest.raises(ValueError, match="temperature"):
        llm("Hi", temperature=-1)


def test_hub_repo_id_from_offline_cache(tmp_path, monkeypatch, ref_and_llm):
    import shutil

    import huggingface_hub.constants as hc

    src = ref_and_llm[1].loaded.path
    snap = tmp_path / "models--acme--tiny-mixtral" / "snapshots" / "abc123"
    shutil.copytree(src, snap)
    (tmp_path / "models--acme--tiny-mixtral" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-mixtral" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    llm = LLM("acme/tiny-mixtral", n_ctx=64)
    assert llm.loaded.path == snap
    with pytest.raises(FileNotFoundError, match="acme/missing"):
        LLM("acme/missing")


def test_token_ids_are_checked_at_the_entry_points(llm):
    with pytest.raises(ValueError, match="token id 32005 out of range"):
        llm.logits([1, 32005])
    with pytest.raises(ValueError, match="out of range"):
        llm([1, -3], max_tokens=2)


def test_llms_sharing_a_model_keep_their_own_cache_type(llm):
    """cache_type belongs to the LLM: a second LLM over the same loaded model does not change the first's."""
    f16 = LLM(n_ctx=128, n_threads=2, cache_type="f16", _loaded=llm.loaded)
    assert f16.model is llm.model and llm.kv_dtype is None and f16.kv_dtype == torch.float16
    assert not hasattr(llm.model, "kv_dtype")
    ids = llm.tokenize("The quick brown fox")
    a, b = llm.logits(ids), f16.logits(ids)
    assert torch.equal(a, llm.logits(ids)) and not torch.equal(a, b)  # f16 rounds the cached keys/values
    assert (a - b).abs().max() < 1e-2 * a.abs().max()


def test_n_threads_applies_only_while_the_llm_computes(llm, monkeypatch):
    one = LLM(n_ctx=128, n_threads=1, _loaded=llm.loaded)
    seen = []
    real = one.model.forward
    monkeypatch.setattr(one.model, "forward", lambda *a, **k: (seen.append(torch.get_num_threads()), real(*a, **k))[1])
    torch.set_num_threads(2)
    out = one("Hello", max_tokens=3, temperature=0)
    assert out["usage"]["completion_tokens"] == 3
    chunks = list(one("Hello", max_tokens=3, temperature=0, stream=True))
    assert chunks and torch.get_num_threads() == 2
    assert seen and set(seen) == {1}
