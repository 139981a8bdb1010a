"""Finding and building a tokenizer: tokenizer.json, tokenizer.model, a model directory, GGUF metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .base import NORMAL, Tokenizer
from .bpe import GPT2BPETokenizer
from .hf_json import flatten, load_json
from .sentencepiece import SentencePieceTokenizer


def tokenizer_from_json(path_or_dict: str | os.PathLike | dict) -> Tokenizer:
    """Load an HF tokenizer.json, choosing SentencePiece-style or byte-level BPE."""
    data = load_json(path_or_dict)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"unsupported tokenizer.json model type {model.get('type')!r} (only BPE)")
    kinds = {c.get("type") for key, node in (("pretokenizers", data.get("pre_tokenizer")),
                                              ("decoders", data.get("decoder"))) for c in flatten(node, key)}
    if "ByteLevel" in kinds:
        return GPT2BPETokenizer.from_tokenizer_json(data)
    return SentencePieceTokenizer.from_tokenizer_json(data)


# ---------------------------------------------------------------------------------------------------
# Loading from a model directory / GGUF metadata
# ---------------------------------------------------------------------------------------------------


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _pick_template(value: Any) -> str | None:
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default")
    return value if isinstance(value, str) else None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer of a model directory (tokenizer.json, else tokenizer.model) plus its configs."""
    root = Path(path)
    if (root / "tokenizer.json").is_file():
        tok = tokenizer_from_json(root / "tokenizer.json")
    elif (root / "tokenizer.model").is_file():
        tok = SentencePieceTokenizer.from_model_file(root / "tokenizer.model")
    else:
        raise FileNotFoundError(f"no tokenizer in {root}: expected tokenizer.json or tokenizer.model")

    def read(name: str) -> dict:
        p = root / name
        if not p.is_file():
            return {}
        with open(p, encoding="utf-8") as f:
            return json.load(f)

    config = read("tokenizer_config.json")
    for source in (read("special_tokens_map.json"), config):
        for attr in ("bos", "eos", "pad", "unk"):
            text = _token_text(source.get(f"{attr}_token"))
            if text is not None and tok.piece_to_id(text) is not None:
                setattr(tok, f"{attr}_id", tok.piece_to_id(text))
    if isinstance(config.get("add_bos_token"), bool):
        tok.add_bos = config["add_bos_token"]
    if isinstance(config.get("add_eos_token"), bool):
        tok.add_eos = config["add_eos_token"]
    template = _pick_template(config.get("chat_template"))
    if template is None and (root / "chat_template.jinja").is_file():
        template = (root / "chat_template.jinja").read_text(encoding="utf-8")
    if template is not None:
        tok.chat_template = template
    gen_eos = read("generation_config.json").get("eos_token_id")
    extra = [gen_eos] if isinstance(gen_eos, int) else [i for i in gen_eos or [] if isinstance(i, int)]
    tok.refresh_eos_ids(extra)
    return tok


def tokenizer_from_gguf_fields(fields: dict[str, Any]) -> Tokenizer:
    """Build a tokenizer from decoded GGUF metadata (``tokenizer.ggml.*`` keys)."""
    kind = fields.get("tokenizer.ggml.model")
    tokens = list(fields.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ValueError("GGUF metadata has no tokenizer.ggml.tokens")
    types = list(fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))

    def opt(key: str) -> int | None:
        v = fields.get(key)
        return int(v) if v is not None else None

    common: dict[str, Any] = dict(
        bos_id=opt("tokenizer.ggml.bos_token_id"), eos_id=opt("tokenizer.ggml.eos_token_id"),
        unk_id=opt("tokenizer.ggml.unknown_token_id"), pad_id=opt("tokenizer.ggml.padding_token_id"),
        add_eos=bool(fields.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=fields.get("tokenizer.chat_template"),
        extra_eos_ids=[i for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
                       if (i := opt(k)) is not None],
    )  # fmt: skip
    if kind == "llama":
        scores = fields.get("tokenizer.ggml.scores")
        if scores is None:
            raise ValueError("GGUF 'llama' tokenizer needs tokenizer.ggml.scores")
        return SentencePieceTokenizer.from_vocab(
            tokens, list(scores), types, add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", True)),
            add_dummy_prefix=bool(fields.get("tokenizer.ggml.add_space_prefix", True)), **common,
        )  # fmt: skip
    if kind == "gpt2":
        return GPT2BPETokenizer.from_vocab(
            tokens, list(fields.get("tokenizer.ggml.merges") or []), types,
            pre=fields.get("tokenizer.ggml.pre") or "default",
            add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)), **common,
        )  # fmt: skip
    raise ValueError(f"unsupported GGUF tokenizer model {kind!r} (supported: 'llama', 'gpt2')")
