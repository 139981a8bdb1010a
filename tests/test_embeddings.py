"""Embeddings: LLM.embed equals transformers' mean-pooled last hidden state (random Llama, SmolLM2 dequantized),
a batch equals its inputs one by one, and /v1/embeddings answers the openai client (float and base64)."""

from __future__ import annotations

import base64
import struct

import httpx
import pytest
import torch
from fixtures import hf_model, save_hf, smollm2_gguf

from levante import LLM
from levante.loader import LoadedModel, read_checkpoint
from levante.model import build_model
from levante.quant.base import QuantWeight

TEXTS = ["Hello world", "The quick brown fox jumps over the lazy dog.", "A", "Embeddings pool the last hidden state."]


def _transformers_pool(model, ids: list[int], pooling: str) -> torch.Tensor:
    with torch.no_grad():
        h = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0].float()
    return h.mean(0) if pooling == "mean" else h[-1]


def _close(a, b, tol=1e-4) -> bool:
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    return float((a - b).abs().max() / b.abs().max()) <= tol


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    ref = hf_model("llama_tied", vocab_size=32000)
    d = save_hf(ref, tmp_path_factory.mktemp("emb") / "llama", tokenizer=True)
    return ref, LLM(str(d), n_ctx=128, n_threads=2)


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_random_llama_equals_transformers(llama, pooling):
    ref, llm = llama
    vecs = llm.embed(TEXTS, pooling=pooling, normalize=False)
    for text, v in zip(TEXTS, vecs):
        assert _close(v, _transformers_pool(ref, llm.tokenize(text), pooling))


def test_batch_equals_single_and_normalized(llama):
    _, llm = llama
    batch = llm.embed(TEXTS)
    for text, v in zip(TEXTS, batch):
        assert _close(v, llm.embed(text))
        assert abs(float(torch.tensor(v).norm()) - 1) < 1e-5
    assert len(llm.embed([[1, 5, 9]])) == 1 and len(llm.embed([1, 5, 9])) == llm.config.hidden_size


def test_embedding_errors(llama):
    _, llm = llama
    for bad, match in [([""], "empty"), ([], "at least one"), ([[1, 10**9]], "out of range")]:
        with pytest.raises(ValueError, match=match):
            llm.embed(bad)
    with pytest.raises(ValueError, match="pooling"):
        llm.embed("x", pooling="max")
    with pytest.raises(ValueError, match="context window"):
        llm.embed("word " * 400)
    assert len(llm.embed("word " * 400, truncate=True)) == llm.config.hidden_size


def test_smollm2_dequantized_equals_transformers():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    path = smollm2_gguf()
    ckpt = read_checkpoint(path)
    weights = {k: (w.dequantize(torch.float32) if isinstance(w, QuantWeight) else w.float())
               for k, w in ckpt.weights.items()}
    net = build_model(ckpt.config, weights, torch.float32).eval()
    llm = LLM(n_ctx=256, _loaded=LoadedModel(net, ckpt.config, ckpt.tokenizer, path, "gguf", torch.float32))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                            torch_dtype=torch.float32).eval()
    vecs = llm.embed(TEXTS, normalize=False)
    for text, v in zip(TEXTS, vecs):
        assert _close(v, _transformers_pool(ref, llm.tokenize(text), "mean"))


def test_embeddings_endpoint(smollm2_server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=smollm2_server + "/v1", api_key="none", max_retries=0, timeout=120)
    r = client.embeddings.create(model="levante", input=TEXTS, encoding_format="float")
    assert [d.index for d in r.data] == list(range(len(TEXTS))) and r.usage.prompt_tokens > 0
    assert all(len(d.embedding) == 576 for d in r.data)
    one = client.embeddings.create(model="levante", input=TEXTS[1], encoding_format="float").data[0].embedding
    assert _close(one, r.data[1].embedding)
    raw = httpx.post(smollm2_server + "/v1/embeddings", json={"input": TEXTS[1], "encoding_format": "base64"},
                     timeout=60).json()["data"][0]["embedding"]
    decoded = struct.unpack(f"<{576}f", base64.b64decode(raw))
    assert _close(decoded, one, 1e-6)
    default = client.embeddings.create(model="levante", input=[TEXTS[1]])  # the client asks for base64 itself
    assert _close(default.data[0].embedding, one, 1e-6)
    for body, param in [({"input": "x", "dimensions": 64}, "dimensions"), ({"input": []}, "input"),
                        ({"input": [[1, 10**8]]}, "input"), ({"input": "x", "encoding_format": "int8"},
                                                              "encoding_format")]:
        bad = httpx.post(smollm2_server + "/v1/embeddings", json=body, timeout=60)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
