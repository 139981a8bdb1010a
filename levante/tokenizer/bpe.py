"""GPT-2 style byte-level BPE with ranked merges (GPT-2, Llama-3, SmolLM, ...)."""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

import regex

from .base import (
    BYTE_DECODER,
    BYTE_ENCODER,
    CONTROL,
    GPT2_PATTERN,
    IGNORE_MERGES_PRE,
    NORMAL,
    PRE_TOKENIZERS,
    USER_DEFINED,
    Tokenizer,
    bpe_merge,
)
from .hf_json import flatten, hf_merges, hf_vocab, load_json, post_processor_ids


class GPT2BPETokenizer(Tokenizer):
    """Byte-level BPE with ranked merges (GPT-2, Llama-3, SmolLM, ...)."""

    def __init__(
        self,
        pieces: Sequence[str],
        token_types: Sequence[int],
        merges: Sequence[tuple[str, str]],
        *,
        pre_patterns: Sequence[str],
        bos_id: int | None,
        eos_id: int | None,
        unk_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        ignore_merges: bool = False,
        add_prefix_space: bool = False,
        normalization: str | None = None,
        chat_template: str | None = None,
        extra_eos_ids: Iterable[int] = (),
    ) -> None:
        super().__init__(
            pieces, token_types, bos_id=bos_id, eos_id=eos_id, unk_id=unk_id, pad_id=pad_id,
            add_bos=add_bos, add_eos=add_eos, chat_template=chat_template, extra_eos_ids=extra_eos_ids,
        )  # fmt: skip
        ranks: dict[tuple[str, str], int] = {}
        for r, (a, b) in enumerate(merges):
            if a + b in self._vocab:
                ranks.setdefault((a, b), r)
        self._ranks = ranks
        self._pre = [regex.compile(p) for p in pre_patterns]
        self.ignore_merges = ignore_merges
        self.add_prefix_space = add_prefix_space
        self.normalization = normalization
        self._added = {i for i, t in enumerate(self.token_types) if t in (CONTROL, USER_DEFINED)}

    @classmethod
    def from_vocab(
        cls,
        tokens: Sequence[str],
        merges: Sequence[str | tuple[str, str]],
        token_types: Sequence[int] | None = None,
        pre: str = "default",
        bos_id: int | None = None,
        eos_id: int | None = None,
        unk_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        **kwargs: Any,
    ) -> GPT2BPETokenizer:
        """Build from GGUF-style lists: ``merges`` as "a b" strings, ``pre`` a pre-tokenizer name."""
        if pre not in PRE_TOKENIZERS:
            supported = ", ".join(sorted(PRE_TOKENIZERS))
            raise ValueError(f"unsupported pre-tokenizer {pre!r}; supported: {supported}")
        types = list(token_types) if token_types is not None else [NORMAL] * len(tokens)
        kwargs.setdefault("ignore_merges", pre in IGNORE_MERGES_PRE)
        return cls(
            tokens, types, hf_merges(merges), pre_patterns=PRE_TOKENIZERS[pre], bos_id=bos_id, eos_id=eos_id,
            unk_id=unk_id, pad_id=pad_id, add_bos=add_bos, add_eos=add_eos, **kwargs,
        )  # fmt: skip

    @classmethod
    def from_tokenizer_json(cls, path_or_dict: str | os.PathLike | dict) -> GPT2BPETokenizer:
        """Load an HF tokenizer.json with a byte-level BPE model."""
        data = load_json(path_or_dict)
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"tokenizer.json model type {model.get('type')!r} is not BPE")
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise ValueError("BPE continuing_subword_prefix / end_of_word_suffix are not supported")
        pieces, types = hf_vocab(data)
        normalization = None
        for norm in flatten(data.get("normalizer"), "normalizers"):
            if norm.get("type") in ("NFC", "NFKC", "NFD", "NFKD"):
                normalization = norm["type"]
            else:
                raise ValueError(f"unsupported normalizer {norm.get('type')!r} in tokenizer.json")
        patterns: list[str] = []
        prefix_space = False
        for pre in flatten(data.get("pre_tokenizer"), "pretokenizers"):
            kind = pre.get("type")
            if kind == "ByteLevel":
                prefix_space = bool(pre.get("add_prefix_space", False))
                if pre.get("use_regex", True):
                    patterns.append(GPT2_PATTERN)
            elif kind == "Digits":
                patterns.append(r"\p{N}" if pre.get("individual_digits") else r"\p{N}+")
            elif kind == "Split":
                if pre.get("behavior", "Isolated") != "Isolated" or pre.get("invert"):
                    raise ValueError(f"unsupported Split pre-tokenizer behavior {pre.get('behavior')!r}")
                pat = pre.get("pattern") or {}
                patterns.append(pat["Regex"] if "Regex" in pat else regex.escape(pat.get("String", "")))
            else:
                raise ValueError(f"unsupported pre_tokenizer {kind!r} in tokenizer.json")
        bos_id, eos_id = post_processor_ids(data, pieces)
        unk = model.get("unk_token")
        return cls(
            pieces, types, hf_merges(model.get("merges") or []), pre_patterns=patterns, bos_id=bos_id,
            eos_id=eos_id, unk_id=pieces.index(unk) if unk in pieces else None, add_bos=bos_id is not None,
            add_eos=eos_id is not None, ignore_merges=bool(model.get("ignore_merges")),
            add_prefix_space=prefix_space, normalization=normalization,
        )  # fmt: skip

    def _parseable_ids(self) -> list[int]:
        return sorted(self._added)

    def pre_tokenize(self, text: str) -> list[str]:
        """Split text into the pieces BPE is applied to."""
        parts = [text]
        for rx in self._pre:
            out: list[str] = []
            for part in parts:
                pos = 0
                for m in rx.finditer(part):
                    if m.start() > pos:
                        out.append(part[pos : m.start()])
                    if m.end() > m.start():
                        out.append(m.group())
                    pos = m.end()
                if pos < len(part):
                    out.append(part[pos:])
            parts = out
        return parts

    def _encode_fragment(self, text: str, at_start: bool) -> list[int]:
        if self.normalization:
            text = unicodedata.normalize(self.normalization, text)
        if self.add_prefix_space and text and not text.startswith(" "):
            text = " " + text
        ids: list[int] = []
        for part in self.pre_tokenize(text):
            word = "".join(BYTE_ENCODER[b] for b in part.encode("utf-8"))
            ids.extend(self._cached(word, self._bpe))
        return ids

    def _bpe(self, word: str) -> list[int]:
        if self.ignore_merges and word in self._vocab:
            return [self._vocab[word]]
        ranks = self._ranks
        ids: list[int] = []
        for sym in bpe_merge(list(word), lambda a, b: ranks.get((a, b))):
            i = self._vocab.get(sym)
            if i is not None:
                ids.append(i)
            elif self.unk_id is not None:
                ids.append(self.unk_id)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        piece = self.pieces[token_id]
        if token_id in self._added:
            return piece.encode()
        out = bytearray()
        for ch in piece:
            b = BYTE_DECODER.get(ch)
            if b is None:
                out += ch.encode()
            else:
                out.append(b)
        return bytes(out)
