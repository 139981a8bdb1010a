"""The transformers-compatible front end (levante.hf) against transformers itself."""

import json

import pytest
import torch
from fixtures import hf_model, mistral_tokenizer_model, save_hf, smollm2_gguf

from levante import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)
from levante.chat import mistral_instruct_ids
from levante.hf import BatchEncoding

SNIPPET = """
from levante import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(model_id)
model = AutoModelForCausalLM.from_pretrained(model_id)
messages = [{"role": "user", "content": "What is your favourite condiment?"},
            {"role": "assistant", "content": "Well, I'm quite partial to mayonnaise."},
            {"role": "user", "content": "Do you have mayonnaise recipes?"}]
inputs = tokenizer.apply_chat_template(messages, return_tensors="pt")
outputs = model.generate(inputs, max_new_tokens=20)
print(tokenizer.decode(outputs[0], skip_special_tokens=True))
"""

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """(directory, transformers model) of a random Mixtral with the real Mistral tokenizer.model."""
    ref = hf_model("mixtral_8x2", vocab_size=32000)
    d = save_hf(ref, tmp_path_factory.mktemp("hf") / "mixtral", tokenizer=True)
    return d, ref


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    ref = hf_model("mistral_dense", vocab_size=32000, seed=1)
    d = save_hf(ref, tmp_path_factory.mktemp("hf") / "templated", tokenizer=True)
    (d / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": TEMPLATE, "bos_token": "<s>", "eos_token": "</s>"})
    )
    return d, ref


def _run_snippet(model_id, capsys):
    exec(SNIPPET, {"model_id": str(model_id)})
    return capsys.readouterr().out


def test_model_card_snippet_mixtral_dir(mixtral, capsys):
    out = _run_snippet(mixtral[0], capsys)
    assert isinstance(out, str) and out.endswith("\n")
    tok = AutoTokenizer.from_pretrained(mixtral[0])
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo"},
        {"role": "user", "content": "Go"},
    ]
    ids = tok.apply_chat_template(messages, return_tensors="pt")
    assert isinstance(ids, BatchEncoding)  # transformers 5: return_dict=True by default
    want = mistral_instruct_ids(tok.tok, messages)
    assert want[0] == 1 and 2 in want
    assert ids.input_ids[0].tolist() == want  # Mistral instruct v1 (no chat_template in the directory)
    assert isinstance(tok.apply_chat_template(messages, tokenize=False), str)


def test_model_card_snippet_chat_template_dir(templated, capsys):
    _run_snippet(templated[0], capsys)
    tok = AutoTokenizer.from_pretrained(templated[0])
    msgs = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == "<s>[INST] Hi [/INST]"
    ids = tok.apply_chat_template(msgs, return_dict=False)
    assert ids == [1] + tok.encode("[INST] Hi [/INST]", add_special_tokens=False)  # BOS once, from the template


def test_model_card_snippet_gguf(capsys):
    out = _run_snippet(smollm2_gguf(), capsys)
    assert out.strip()
    tok = AutoTokenizer.from_pretrained(smollm2_gguf())
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.rstrip().endswith("<|im_start|>assistant")


def test_logits_equal_transformers(mixtral):
    d, ref = mixtral
    model = AutoModelForCausalLM.from_pretrained(d)
    ids = torch.randint(3, 32000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(ids).logits
    got = model(ids).logits
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    ids[1, :3] = 0
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
    got = model(ids, attention_mask=mask).logits
    assert (got[0] - want[0]).abs().max().item() <= 1e-4
    assert (got[1, 3:] - want[1, 3:]).abs().max().item() <= 1e-4


def test_generate_greedy_equals_transformers(mixtral):
    d, ref = mixtral
    model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32, device_map="cpu")
    g = torch.Generator().manual_seed(1)
    one = torch.randint(3, 32000, (1, 7), generator=g)
    with torch.no_grad():
        want = ref.generate(one, max_new_tokens=12, do_sample=False)
    got = model.generate(one, max_new_tokens=12, do_sample=False)
    assert got.dtype == torch.long
    assert got.tolist() == want.tolist()
    # transformers 5 defaults: 20 new tokens when max_length is unset; an explicit max_length is a total
    with torch.no_grad(), pytest.warns(UserWarning):
        want = ref.generate(one)
    assert model.generate(one).tolist() == want.tolist()
    with torch.no_grad():
        want = ref.generate(one, max_length=10)
    assert model.generate(one, max_length=10).tolist() == want.tolist()
    assert want.shape[1] <= 10

    ids = torch.randint(3, 32000, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0
    with torch.no_grad():
        want = ref.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, max_new_tokens=10)
    got = model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, max_new_tokens=10)
    assert got.tolist() == want.tolist()
    got = model.generate(**BatchEncoding(input_ids=ids, attention_mask=mask), pad_token_id=0, max_new_tokens=10)
    assert got.tolist() == want.tolist()


def test_generate_includes_eos_and_pads_finished_rows(mixtral):
    d, ref = mixtral
    model = AutoModelForCausalLM.from_pretrained(d)
    ids = torch.randint(3, 32000, (2, 6), generator=torch.Generator().manual_seed(3))
    free = model.generate(ids, max_new_tokens=6)
    stop = int(free[0, 8])  # make row 0's third new token the EOS token
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=6, eos_token_id=stop, pad_token_id=5)
    got = model.generate(ids, max_new_tokens=6, eos_token_id=stop, pad_token_id=5)
    assert got.tolist() == want.tolist()
    k = 6 + free[0, 6:].tolist().index(stop)  # first time row 0 produces `stop`
    assert got[0, k] == stop and (got[0, k + 1 :] == 5).all() and got.shape[1] == 12


def test_repetition_penalty_equals_transformers(mixtral):
    d, ref = mixtral
    model = AutoModelForCausalLM.from_pretrained(d)
    ids = torch.randint(3, 32000, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=8, repetition_penalty=1.8)
    assert model.generate(ids, max_new_tokens=8, repetition_penalty=1.8).tolist() == want.tolist()


def test_sampling_follows_torch_seed(mixtral):
    model = AutoModelForCausalLM.from_pretrained(mixtral[0])
    ids = torch.randint(3, 32000, (1, 5), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(0)
    a = model.generate(ids, max_new_tokens=5, do_sample=True, temperature=1.5)
    torch.manual_seed(0)
    b = model.generate(ids, max_new_tokens=5, do_sample=True, temperature=1.5)
    assert a.tolist() == b.tolist()


def test_tokenizer_matches_sentencepiece(mixtral):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(mistral_tokenizer_model()))
    tok = AutoTokenizer.from_pretrained(mixtral[0])
    texts = ["Hello world!", "  Déjà vu, 123 tokens\nnew line", "mayonnaise recipes?"]
    assert tok.pad_token_id is None  # tokenizer.model has none: padding fails as in transformers
    with pytest.raises(ValueError, match="padding token"):
        tok(texts, padding=True)
    tok.pad_token = "<unk>"
    assert tok.pad_token_id == 0
    enc = tok(texts, padding=True, return_tensors="pt")
    assert set(enc) == {"input_ids", "attention_mask"}
    assert enc["input_ids"] is enc.input_ids
    assert tok.padding_side == "left"
    for i, t in enumerate(texts):
        want = [sp.bos_id()] + sp.encode(t)
        n = int(enc.attention_mask[i].sum())
        assert enc.input_ids[i, -n:].tolist() == want
        assert enc.attention_mask[i, : enc.input_ids.shape[1] - n].sum() == 0
        assert tok(t)["input_ids"] == want
        assert tok(t, add_special_tokens=False).input_ids == sp.encode(t)
        assert tok.decode(want, skip_special_tokens=True) == sp.decode(sp.encode(t))
    assert tok.bos_token_id == 1 and tok.eos_token_id == 2 and tok.eos_token == "</s>"
    assert len(tok) == tok.vocab_size == sp.get_piece_size()
    single = tok("Hello", return_tensors="pt").to("cpu")
    assert single.input_ids.shape == (1, 2)
    assert tok.batch_decode(single.input_ids, skip_special_tokens=True) == ["Hello"]
    with pytest.raises(ValueError):
        tok(["a", "a b c d"], return_tensors="pt")  # different lengths without padding


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("kind", ["mixtral_8x2", "mistral_dense"])
def test_load_in_8bit_and_4bit(tmp_path, kind):
    ref = hf_model(kind, hidden_size=128, intermediate_size=256)
    d = save_hf(ref, tmp_path / "q")
    full = AutoModelForCausalLM.from_pretrained(d)
    q8 = AutoModelForCausalLM.from_pretrained(d, load_in_8bit=True)
    q4 = AutoModelForCausalLM.from_pretrained(d, load_in_4bit=True)
    f32 = full.get_memory_footprint()
    assert q8.get_memory_footprint() <= 0.3 * f32
    assert q4.get_memory_footprint() <= 0.2 * f32
    assert q8.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3).shape == (1, 6)
    assert q4.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3).shape == (1, 6)
    w = full.net.model.layers[0].attn.wq.dequantize()
    assert _rel(q8.net.model.layers[0].attn.wq.dequantize(), w) < 0.01
    assert _rel(q4.net.model.layers[0].attn.wq.dequantize(), w) < 0.12
    if kind == "mistral_dense":  # (a random MoE router flips experts on small errors: logits too noisy)
        ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(2))
        base = full(ids).logits
        assert _rel(q8(ids).logits, base) < 0.05
        assert _rel(q4(ids).logits, base) < 0.5  # ~7% error per Q4_0 weight, compounded over a random net
    else:  # the router (MoE gate) stays float32
        assert q8.net.model.layers[0].ffn.gate.qtype == "F32"
        assert q4.net.model.layers[0].ffn.gate.qtype == "F32"


def test_from_pretrained_loads_straight_onto_its_device(mixtral, monkeypatch):
    """Without load_in_8bit / 4bit the weights go straight to the device map's device (levante.loader.load: on a GPU
    streamed from the mapped files, in a 16-bit dtype by default), not through a host copy first; quantizing on
    load happens on the host."""
    import levante.hf as hf

    seen = []
    real_load = hf.load
    monkeypatch.setattr(hf, "load", lambda *a, **k: seen.append(k["device"]) or real_load(*a, **dict(k, device="cpu")))
    AutoModelForCausalLM.from_pretrained(mixtral[0], device_map="cuda:1")
    AutoModelForCausalLM.from_pretrained(mixtral[0], device_map={"": "cpu"})
    AutoModelForCausalLM.from_pretrained(mixtral[0], device_map="cpu", load_in_8bit=True)
    assert seen == ["cuda:1", "cpu", "cpu"]


@pytest.mark.gpu
def test_generate_on_a_gpu(tmp_path):
    """On CUDA: from_pretrained of a Q4_K_M GGUF keeps its weights packed in a 16-bit model; generate runs the CUDA
    decoder, warmed up once (kernels compiled ahead), with LLM's tokens on the same GPU."""
    from levante import LLM
    from levante.cuda import CudaDecoder, PackedWeight
    from levante.generate import generate
    from levante.sampling import SamplingParams
    from levante.tools.quantize import quantize_model

    src = save_hf(hf_model("mixtral_8x2", vocab_size=32000, hidden_size=256, intermediate_size=256), tmp_path / "m",
                  tokenizer=True)
    path = quantize_model(src, tmp_path / "m.Q4_K_M.gguf", "Q4_K_M", progress=False)
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cuda")
    assert model.dtype == torch.bfloat16 and isinstance(model.net.model.layers[0].attn.wq, PackedWeight)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    decoder = model._generation_net()
    assert isinstance(decoder, CudaDecoder) and decoder.precompiled is not None and decoder._warm.graphs
    llm = LLM(str(path), device="cuda")
    with torch.inference_mode():
        want = generate(llm.generation_model, llm.tokenizer, [ids[0].tolist()], 8, SamplingParams.greedy(),
                        stop_token_ids=set())[0].tokens
    assert out[0, 5:].tolist() == want


def test_int8_weight_matmul_paths():
    from levante.quant.int8 import Int8Weight

    w = torch.randn(300, 96)
    q = Int8Weight.from_float(w)
    deq = q.dequantize()
    assert _rel(deq, w) < 0.01
    for rows in (1, 3, 40):
        x = torch.randn(rows, 96)
        assert torch.allclose(q(x), x @ deq.T, atol=1e-4, rtol=1e-4)
    ids = torch.tensor([[0, 5], [299, 7]])
    assert torch.equal(q.rows(ids, torch.float32), deq[ids])


@pytest.mark.parametrize(
    "auto, suffix",
    [
        (AutoModelForSequenceClassification, "ForSequenceClassification"),
        (AutoModelForTokenClassification, "ForTokenClassification"),
    ],
)
def test_classification_auto_classes(tmp_path, auto, suffix):
    import transformers

    base = hf_model("mixtral_8x2")
    cfg = base.config
    cfg.num_labels = 3
    cfg.pad_token_id = 0
    ref = getattr(transformers, "Mixtral" + suffix)(cfg).eval()
    ref.model.load_state_dict(base.model.state_dict())
    save_hf(ref, tmp_path / "cls")
    model = auto.from_pretrained(tmp_path / "cls")
    ids = torch.randint(3, 320, (3, 11), generator=torch.Generator().manual_seed(5))
    ids[1, 7:] = 0
    with torch.no_grad():
        want = ref(ids).logits
    got = model(ids).logits
    assert got.shape == want.shape
    assert (want - got).abs().max().item() <= 1e-4
    assert model.config.num_labels == 3


def test_errors_and_attributes(mixtral, tmp_path):
    with pytest.raises(FileNotFoundError):
        AutoModelForCausalLM.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        AutoTokenizer.from_pretrained(tmp_path / "nope")
    with pytest.raises(ValueError):
        AutoModelForCausalLM.from_pretrained(mixtral[0], load_in_8bit=True, load_in_4bit=True)
    with pytest.warns(UserWarning, match="ignores"):
        model = AutoModelForCausalLM.from_pretrained(mixtral[0], dtype="auto", revision="main")
    assert model.eval() is model
    assert model.device == torch.device("cpu") and model.dtype == torch.float32
    assert model.config.num_local_experts == 8 and model.config.vocab_size == 32000
    assert model.get_memory_footprint() > 32000 * 64 * 4
