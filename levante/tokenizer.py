"""Pure-Python tokenizers: SentencePiece BPE (Llama/Mistral) and GPT-2 style byte-level BPE.

No runtime dependency on sentencepiece / tokenizers: model files (``tokenizer.model`` protobuf,
``tokenizer.json``, GGUF metadata) are parsed here directly.
"""

from __future__ import annotations

import codecs
import heapq
import json
import os
import struct
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import regex

# Token types, shared by SentencePiece's ModelProto and GGUF's tokenizer.ggml.token_type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPACE = "\u2581"  # "▁", SentencePiece's whitespace symbol

# Extra end-of-generation tokens recognised by name when they are special tokens.
EOS_LIKE_TOKENS = (
    "</s>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
)

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# GGUF ``tokenizer.ggml.pre`` name -> successive splitting regexes (each applied to the pieces of the last).
PRE_TOKENIZERS: dict[str, list[str]] = {
    "default": [GPT2_PATTERN],
    "gpt2": [GPT2_PATTERN],
    "llama-bpe": [LLAMA3_PATTERN],
    "llama3": [LLAMA3_PATTERN],
    # llama.cpp LLAMA_VOCAB_PRE_TYPE_SMOLLM / STARCODER: isolate every digit, then the GPT-2 regex.
    "smollm": [r"\p{N}", GPT2_PATTERN],
    "starcoder": [r"\p{N}", GPT2_PATTERN],
}
# Pre-tokenizers whose HF tokenizer.json sets BPE ``ignore_merges`` (llama.cpp does the same).
IGNORE_MERGES_PRE = {"llama-bpe", "llama3"}


def _bytewise_replace(exc: UnicodeError) -> tuple[str, int]:
    # SentencePiece and HF ByteFallback emit one U+FFFD per invalid byte (Python's "replace" merges them).
    if isinstance(exc, UnicodeDecodeError):
        return "\ufffd", exc.start + 1
    raise exc


codecs.register_error("levante.bytewise", _bytewise_replace)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


BYTE_ENCODER = _bytes_to_unicode()
BYTE_DECODER = {c: b for b, c in BYTE_ENCODER.items()}


def bpe_merge(
    symbols: list[str],
    rank_of: Callable[[str, str], float | None],
    merged_log: dict[str, tuple[str, str]] | None = None,
) -> list[str]:
    """Greedy BPE: repeatedly merge the adjacent pair with the lowest rank (ties: leftmost).

    Uses a heap over a linked list of symbols, so the cost is O(n log n). When ``merged_log`` is
    given, every merge result is recorded there as ``merged -> (left, right)``.
    """
    n = len(symbols)
    if n < 2:
        return list(symbols)
    syms: list[str | None] = list(symbols)
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    heap: list[tuple[float, int, str, str]] = []
    for i in range(n - 1):
        r = rank_of(symbols[i], symbols[i + 1])
        if r is not None:
            heap.append((r, i, symbols[i], symbols[i + 1]))
    heapq.heapify(heap)
    while heap:
        _, i, left, right = heapq.heappop(heap)
        j = nxt[i]
        # Stale entries: the left symbol grew or died, or its right neighbour changed.
        if j < 0 or syms[i] != left or syms[j] != right:
            continue
        merged = left + right
        if merged_log is not None:
            merged_log[merged] = (left, right)
        syms[i] = merged
        syms[j] = None
        k = nxt[j]
        nxt[i] = k
        if k >= 0:
            prv[k] = i
            r = rank_of(merged, syms[k])  # type: ignore[arg-type]
            if r is not None:
                heapq.heappush(heap, (r, i, merged, syms[k]))  # type: ignore[arg-type]
        p = prv[i]
        if p >= 0:
            r = rank_of(syms[p], merged)  # type: ignore[arg-type]
            if r is not None:
                heapq.heappush(heap, (r, p, syms[p], merged))  # type: ignore[arg-type]
    return [s for s in syms if s is not None]


class Tokenizer:
    """Common interface and shared logic (special-token parsing, decoding) of all tokenizers."""

    chat_template: str | None = None
    _decode_errors = "replace"
    _cache_limit = 200_000

    def __init__(
        self,
        pieces: Sequence[str],
        token_types: Sequence[int],
        *,
        bos_id: int | None,
        eos_id: int | None,
        unk_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool = False,
        add_eos: bool = False,
        chat_template: str | None = None,
        extra_eos_ids: Iterable[int] = (),
    ) -> None:
        if len(pieces) != len(token_types):
            raise ValueError(f"{len(pieces)} pieces but {len(token_types)} token types")
        self.pieces: list[str] = list(pieces)
        self.token_types: list[int] = [int(t) for t in token_types]
        self.vocab_size = len(self.pieces)
        self._vocab: dict[str, int] = {}
        for i, p in enumerate(self.pieces):
            self._vocab.setdefault(p, i)
        self.special_ids: set[int] = {i for i, t in enumerate(self.token_types) if t == CONTROL}
        self.bos_id = self._check_id(bos_id)
        self.eos_id = self._check_id(eos_id)
        self.unk_id = self._check_id(unk_id)
        self.pad_id = self._check_id(pad_id)
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.chat_template = chat_template
        self._extra_eos_ids = {i for i in extra_eos_ids if self._check_id(i) is not None}
        self.eos_ids: set[int] = set()
        self.refresh_eos_ids()
        self._special_re: regex.Pattern | None = None
        self._cache: dict[str, list[int]] = {}

    def _check_id(self, i: int | None) -> int | None:
        if i is None or i < 0 or i >= self.vocab_size:
            return None
        return int(i)

    # --- metadata -----------------------------------------------------------------------------------
    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.pieces[self.bos_id]

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_id is None else self.pieces[self.eos_id]

    def refresh_eos_ids(self, extra: Iterable[int] = ()) -> None:
        """Recompute ``eos_ids`` from eos_id, known end-of-turn tokens and ``extra`` ids."""
        self._extra_eos_ids |= {i for i in extra if self._check_id(i) is not None}
        ids = set(self._extra_eos_ids)
        if self.eos_id is not None:
            ids.add(self.eos_id)
        for name in EOS_LIKE_TOKENS:
            i = self._vocab.get(name)
            if i is not None and self.token_types[i] in (CONTROL, USER_DEFINED):
                ids.add(i)
        self.eos_ids = ids

    def id_to_piece(self, token_id: int) -> str:
        return self.pieces[token_id]

    def piece_to_id(self, piece: str) -> int | None:
        return self._vocab.get(piece)

    def _parseable_ids(self) -> list[int]:
        """Ids whose text is recognised as the token itself by ``encode(special=True)``."""
        return sorted(self.special_ids)

    # --- encoding -----------------------------------------------------------------------------------
    def _special_pattern(self) -> regex.Pattern | None:
        if self._special_re is None:
            texts = {self.pieces[i] for i in self._parseable_ids() if self.pieces[i]}
            texts = sorted(texts, key=len, reverse=True)
            if not texts:
                return None
            self._special_re = regex.compile("|".join(regex.escape(t) for t in texts))
        return self._special_re

    def encode(
        self, text: str, add_bos: bool | None = None, add_eos: bool | None = None, special: bool = False
    ) -> list[int]:
        """Encode text to ids; ``special=True`` turns special-token strings in the text into their ids."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        ids: list[int] = []
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.append(self.bos_id)
        pattern = self._special_pattern() if special else None
        if pattern is None:
            ids.extend(self._encode_fragment(text, True))
        else:
            pos = 0
            for m in pattern.finditer(text):
                if m.start() > pos:
                    ids.extend(self._encode_fragment(text[pos : m.start()], pos == 0))
                ids.append(self._vocab[m.group()])
                pos = m.end()
            if pos < len(text):
                ids.extend(self._encode_fragment(text[pos:], pos == 0))
        if (self.add_eos if add_eos is None else add_eos) and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _encode_fragment(self, text: str, at_start: bool) -> list[int]:
        """Encode text containing no special tokens; ``at_start``: it begins the input."""
        raise NotImplementedError

    def _cached(self, word: str, fn: Callable[[str], list[int]]) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            if len(self._cache) >= self._cache_limit:
                self._cache.clear()
            ids = self._cache[word] = fn(word)
        return ids

    # --- decoding -----------------------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token contributes to the output stream."""
        raise NotImplementedError

    def _decode_piece(self, token_id: int, skip_special: bool, at_start: bool) -> tuple[bytes, bool]:
        """Bytes of one token while decoding a sequence; returns (bytes, still-at-start)."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size})")
        if token_id in self.special_ids:
            return (b"" if skip_special else self.pieces[token_id].encode()), at_start
        return self.token_bytes(token_id), False

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Decode ids to text."""
        buf = bytearray()
        at_start = True
        for i in ids:
            b, at_start = self._decode_piece(int(i), skip_special, at_start)
            buf += b
        return buf.decode("utf-8", self._decode_errors)


class StreamDecoder:
    """Incremental detokenizer: never emits a partial UTF-8 character.

    ``"".join(push(i) for i in ids) + flush() == tokenizer.decode(ids, skip_special)``.
    With ``at_start=False`` the ids continue earlier text (a completion after its prompt), so a
    SentencePiece leading space is kept instead of being dropped as the dummy prefix.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True, at_start: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._at_start = at_start
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors=tokenizer._decode_errors)

    def push(self, token_id: int) -> str:
        b, self._at_start = self.tokenizer._decode_piece(int(token_id), self.skip_special, self._at_start)
        return self._decoder.decode(b)

    def flush(self) -> str:
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        self._at_start = True
        return text


# ---------------------------------------------------------------------------------------------------
# SentencePiece
# ---------------------------------------------------------------------------------------------------


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _proto_fields(buf: bytes) -> Iterable[tuple[int, int, Any]]:
    """Iterate (field_number, wire_type, value) of a protobuf message (value: int or bytes)."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value = buf[pos : pos + 8]
            pos += 8
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            value = buf[pos : pos + size]
            pos += size
        elif wire == 5:
            value = buf[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def _int32(v: int) -> int:
    # negative int32 values are encoded as 64-bit two's complement varints
    v &= 0xFFFFFFFFFFFFFFFF
    return v - (1 << 64) if v >= 1 << 63 else v


def parse_sentencepiece_model(data: bytes) -> dict[str, Any]:
    """Parse a SentencePiece ModelProto (field numbers from sentencepiece_model.proto)."""
    pieces: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    trainer: dict[str, Any] = {
        "model_type": 1, "byte_fallback": False, "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1,
        "unk_surface": " \u2047 ", "treat_whitespace_as_suffix": False,
    }  # fmt: skip
    normalizer: dict[str, Any] = {
        "name": "", "precompiled_charsmap": b"", "add_dummy_prefix": True,
        "remove_extra_whitespaces": True, "escape_whitespaces": True,
    }  # fmt: skip
    trainer_fields = {
        3: "model_type", 24: "treat_whitespace_as_suffix", 35: "byte_fallback",
        40: "unk_id", 41: "bos_id", 42: "eos_id", 43: "pad_id", 44: "unk_surface",
    }  # fmt: skip
    normalizer_fields = {
        1: "name", 2: "precompiled_charsmap", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces",
        5: "escape_whitespaces",
    }  # fmt: skip
    for field, wire, value in _proto_fields(data):
        if field == 1 and wire == 2:
            piece, score, typ = "", 0.0, NORMAL
            for f, w, v in _proto_fields(value):
                if f == 1 and w == 2:
                    piece = v.decode("utf-8")
                elif f == 2 and w == 5:
                    score = struct.unpack("<f", v)[0]
                elif f == 3 and w == 0:
                    typ = v
            pieces.append(piece)
            scores.append(score)
            types.append(typ)
        elif field in (2, 3) and wire == 2:
            target, names = (trainer, trainer_fields) if field == 2 else (normalizer, normalizer_fields)
            for f, _, v in _proto_fields(value):
                name = names.get(f)
                if name is None:
                    continue
                default = target[name]
                if isinstance(default, bool):
                    target[name] = bool(v)
                elif isinstance(default, int):
                    target[name] = _int32(v)
                elif isinstance(default, bytes):
                    target[name] = bytes(v)
                else:
                    target[name] = v.decode("utf-8")
    return {"pieces": pieces, "scores": scores, "types": types, "trainer": trainer, "normalizer": normalizer}


class SentencePieceTokenizer(Tokenizer):
    """SentencePiece BPE with byte fallback (Llama / Mistral / Mixtral tokenizer)."""

    _decode_errors = "levante.bytewise"

    def __init__(
        self,
        pieces: Sequence[str],
        token_types: Sequence[int],
        *,
        scores: Sequence[float] | None = None,
        merges: Sequence[tuple[str, str]] | None = None,
        bos_id: int | None,
        eos_id: int | None,
        unk_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool = True,
        add_eos: bool = False,
        add_dummy_prefix: bool = True,
        prefix_scheme: str = "always",
        remove_extra_whitespaces: bool = False,
        nfkc: bool = False,
        byte_fallback: bool = True,
        split_on_space: bool = False,
        unk_surface: str = " \u2047 ",
        chat_template: str | None = None,
        extra_eos_ids: Iterable[int] = (),
    ) -> None:
        """Either ``scores`` (SentencePiece: merge the pair with the best score) or ``merges`` (HF)."""
        super().__init__(
            pieces, token_types, bos_id=bos_id, eos_id=eos_id, unk_id=unk_id, pad_id=pad_id,
            add_bos=add_bos, add_eos=add_eos, chat_template=chat_template, extra_eos_ids=extra_eos_ids,
        )  # fmt: skip
        if (scores is None) == (merges is None):
            raise ValueError("give exactly one of scores or merges")
        if prefix_scheme not in ("always", "first", "never"):
            raise ValueError(f"unknown prefix scheme {prefix_scheme!r}")
        self.add_dummy_prefix = add_dummy_prefix and prefix_scheme != "never"
        self.prefix_scheme = prefix_scheme
        self.remove_extra_whitespaces = remove_extra_whitespaces
        self.nfkc = nfkc
        self.unk_surface = unk_surface
        mergeable = (NORMAL, USER_DEFINED, UNUSED)
        if scores is not None:
            if len(scores) != self.vocab_size:
                raise ValueError(f"{self.vocab_size} pieces but {len(scores)} scores")
            self._score = {
                p: -float(scores[i]) for i, p in enumerate(self.pieces) if self.token_types[i] in mergeable
            }
            score = self._score
            self._rank_of: Callable[[str, str], float | None] = lambda a, b: score.get(a + b)
        else:
            ranks: dict[tuple[str, str], int] = {}
            for r, (a, b) in enumerate(merges or ()):
                if a + b in self._vocab:
                    ranks.setdefault((a, b), r)
            self._rank_of = lambda a, b: ranks.get((a, b))
        self._unused = {p for i, p in enumerate(self.pieces) if self.token_types[i] == UNUSED}
        self._byte_ids: list[int] | None = None
        if byte_fallback:
            byte_ids = [self._vocab.get(f"<0x{b:02X}>", -1) for b in range(256)]
            if all(i >= 0 for i in byte_ids):
                self._byte_ids = byte_ids
        byte_like = set(self._byte_ids or ()) | {i for i, t in enumerate(self.token_types) if t == BYTE}
        self._byte_values = {i: int(self.pieces[i][3:5], 16) for i in byte_like}
        user = [p for i, p in enumerate(self.pieces) if self.token_types[i] == USER_DEFINED and p]
        user.sort(key=len)
        self._user_re = regex.compile("|".join(regex.escape(p) for p in reversed(user))) if user else None
        # Whitespace-delimited chunks can be BPE'd (and cached) independently unless some piece could
        # merge across the boundary, i.e. contains "▁" right after another character.
        crossing = regex.compile(f"[^{SPACE}]{SPACE}")
        if split_on_space:
            self._chunk_re: regex.Pattern | None = regex.compile(f"[^{SPACE}]+|{SPACE}[^{SPACE}]*")
        elif any(crossing.search(p) for p in self.pieces):
            self._chunk_re = None
        else:
            self._chunk_re = regex.compile(f"{SPACE}*[^{SPACE}]+|{SPACE}+")

    # --- constructors -------------------------------------------------------------------------------
    @classmethod
    def from_model_file(cls, path: str | os.PathLike, **kwargs: Any) -> SentencePieceTokenizer:
        """Load a SentencePiece ``tokenizer.model`` file (BPE models only)."""
        model = parse_sentencepiece_model(Path(path).read_bytes())
        trainer, norm = model["trainer"], model["normalizer"]
        if trainer["model_type"] != 2:
            kind = trainer["model_type"]
            raise ValueError(f"{path}: only SentencePiece BPE models are supported (model_type {kind})")
        # NFKC approximates a non-identity precompiled charsmap (e.g. "nmt_nfkc").
        nfkc = norm["name"] not in ("", "identity") and bool(norm["precompiled_charsmap"])
        opts: dict[str, Any] = dict(
            scores=model["scores"], bos_id=trainer["bos_id"], eos_id=trainer["eos_id"],
            unk_id=trainer["unk_id"], pad_id=trainer["pad_id"], add_dummy_prefix=norm["add_dummy_prefix"],
            remove_extra_whitespaces=norm["remove_extra_whitespaces"], nfkc=nfkc,
            byte_fallback=trainer["byte_fallback"], unk_surface=trainer["unk_surface"],
        )  # fmt: skip
        opts.update(kwargs)
        return cls(model["pieces"], model["types"], **opts)

    @classmethod
    def from_vocab(
        cls,
        tokens: Sequence[str],
        scores: Sequence[float],
        token_types: Sequence[int],
        bos_id: int | None = None,
        eos_id: int | None = None,
        unk_id: int | None = None,
        pad_id: int | None = None,
        add_bos: bool = True,
        add_eos: bool = False,
        add_dummy_prefix: bool = True,
        **kwargs: Any,
    ) -> SentencePieceTokenizer:
        """Build from parallel token / score / type lists (as stored in GGUF)."""
        return cls(
            tokens, token_types, scores=scores, bos_id=bos_id, eos_id=eos_id, unk_id=unk_id, pad_id=pad_id,
            add_bos=add_bos, add_eos=add_eos, add_dummy_prefix=add_dummy_prefix, **kwargs,
        )  # fmt: skip

    @classmethod
    def from_tokenizer_json(cls, path_or_dict: str | os.PathLike | dict) -> SentencePieceTokenizer:
        """Load an HF tokenizer.json with a byte-fallback BPE model (Llama / Mistral style)."""
        data = _load_json(path_or_dict)
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"tokenizer.json model type {model.get('type')!r} is not BPE")
        pieces, types = _hf_vocab(data)
        merges = _hf_merges(model.get("merges") or [])
        prefix, scheme, split = False, "always", False
        for norm in _flatten(data.get("normalizer"), "normalizers"):
            if norm.get("type") == "Prepend" and norm.get("prepend") == SPACE:
                prefix = True
            elif norm.get("type") in ("Replace", "Prepend", None):
                pass
            else:
                raise ValueError(f"unsupported normalizer {norm.get('type')!r} in tokenizer.json")
        for pre in _flatten(data.get("pre_tokenizer"), "pretokenizers"):
            if pre.get("type") != "Metaspace":
                raise ValueError(f"unsupported pre_tokenizer {pre.get('type')!r} for SentencePiece-style BPE")
            scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
            prefix = scheme != "never"
            split = bool(pre.get("split", False))
        bos_id, eos_id = _post_processor_ids(data, pieces)
        unk = model.get("unk_token")
        unk_id = pieces.index(unk) if unk in pieces else None
        if unk_id is not None and types[unk_id] == CONTROL:
            types[unk_id] = UNKNOWN
        return cls(
            pieces, types, merges=merges, bos_id=bos_id, eos_id=eos_id, unk_id=unk_id,
            add_bos=bos_id is not None, add_eos=eos_id is not None, add_dummy_prefix=prefix,
            prefix_scheme=scheme if prefix else "never", byte_fallback=bool(model.get("byte_fallback")),
            split_on_space=split, unk_surface=unk or " \u2047 ",
        )  # fmt: skip

    # --- encoding -----------------------------------------------------------------------------------
    def _parseable_ids(self) -> list[int]:
        return sorted(i for i, t in enumerate(self.token_types) if t in (CONTROL, UNKNOWN))

    def _encode_fragment(self, text: str, at_start: bool) -> list[int]:
        if self.nfkc:
            text = unicodedata.normalize("NFKC", text)
        if self.remove_extra_whitespaces:
            text = " ".join(t for t in text.split(" ") if t)
        if not text:
            return []
        if self.add_dummy_prefix and (at_start or self.prefix_scheme == "always"):
            text = " " + text
        text = text.replace(" ", SPACE)
        if self._chunk_re is None:
            return self._bpe(text)
        ids: list[int] = []
        for chunk in self._chunk_re.findall(text):
            ids.extend(self._cached(chunk, self._bpe))
        return ids

    def _bpe(self, word: str) -> list[int]:
        symbols = self._initial_symbols(word)
        log: dict[str, tuple[str, str]] | None = {} if self._unused else None
        ids: list[int] = []
        unk_run = False
        for sym in bpe_merge(symbols, self._rank_of, log):
            for piece in self._resegment(sym, log):
                i = self._vocab.get(piece)
                if i is not None and self.token_types[i] in (NORMAL, USER_DEFINED, UNUSED):
                    ids.append(i)
                    unk_run = False
                elif self._byte_ids is not None:
                    ids.extend(self._byte_ids[b] for b in piece.encode("utf-8"))
                    unk_run = False
                elif self.unk_id is not None:
                    if not unk_run:  # SentencePiece merges a run of unknown pieces into one <unk>
                        ids.append(self.unk_id)
                    unk_run = True
        return ids

    def _initial_symbols(self, word: str) -> list[str]:
        if self._user_re is None:
            return list(word)
        symbols: list[str] = []
        pos = 0
        for m in self._user_re.finditer(word):
            symbols.extend(word[pos : m.start()])
            symbols.append(m.group())
            pos = m.end()
        symbols.extend(word[pos:])
        return symbols

    def _resegment(self, piece: str, log: dict[str, tuple[str, str]] | None) -> list[str]:
        # SentencePiece splits merged pieces of type UNUSED back into the pieces they came from.
        if log is None or piece not in self._unused or piece not in log:
            return [piece]
        left, right = log[piece]
        return self._resegment(left, log) + self._resegment(right, log)

    # --- decoding -----------------------------------------------------------------------------------
    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._byte_values:
            return bytes([self._byte_values[token_id]])
        if token_id == self.unk_id:
            return self.unk_surface.encode()
        return self.pieces[token_id].replace(SPACE, " ").encode()

    def _decode_piece(self, token_id: int, skip_special: bool, at_start: bool) -> tuple[bytes, bool]:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size})")
        if token_id in self.special_ids:
            # Control tokens are invisible to SentencePiece and do not end the "start of text" state.
            return (b"" if skip_special else self.pieces[token_id].encode()), at_start
        b = self.token_bytes(token_id)
        if (
            at_start
            and self.add_dummy_prefix
            and token_id not in self._byte_values
            and token_id != self.unk_id
            and b.startswith(b" ")
        ):
            b = b[1:]  # the dummy prefix added by encode()
        return b, False


# ---------------------------------------------------------------------------------------------------
# GPT-2 byte-level BPE
# ---------------------------------------------------------------------------------------------------


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
            tokens, types, _hf_merges(merges), pre_patterns=PRE_TOKENIZERS[pre], bos_id=bos_id, eos_id=eos_id,
            unk_id=unk_id, pad_id=pad_id, add_bos=add_bos, add_eos=add_eos, **kwargs,
        )  # fmt: skip

    @classmethod
    def from_tokenizer_json(cls, path_or_dict: str | os.PathLike | dict) -> GPT2BPETokenizer:
        """Load an HF tokenizer.json with a byte-level BPE model."""
        data = _load_json(path_or_dict)
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"tokenizer.json model type {model.get('type')!r} is not BPE")
        if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
            raise ValueError("BPE continuing_subword_prefix / end_of_word_suffix are not supported")
        pieces, types = _hf_vocab(data)
        normalization = None
        for norm in _flatten(data.get("normalizer"), "normalizers"):
            if norm.get("type") in ("NFC", "NFKC", "NFD", "NFKD"):
                normalization = norm["type"]
            else:
                raise ValueError(f"unsupported normalizer {norm.get('type')!r} in tokenizer.json")
        patterns: list[str] = []
        prefix_space = False
        for pre in _flatten(data.get("pre_tokenizer"), "pretokenizers"):
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
        bos_id, eos_id = _post_processor_ids(data, pieces)
        unk = model.get("unk_token")
        return cls(
            pieces, types, _hf_merges(model.get("merges") or []), pre_patterns=patterns, bos_id=bos_id,
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


# ---------------------------------------------------------------------------------------------------
# tokenizer.json helpers
# ---------------------------------------------------------------------------------------------------


def _load_json(path_or_dict: str | os.PathLike | dict) -> dict:
    if isinstance(path_or_dict, dict):
        return path_or_dict
    with open(path_or_dict, encoding="utf-8") as f:
        return json.load(f)


def _flatten(node: dict | None, key: str) -> list[dict]:
    """Flatten a (possibly nested) HF ``Sequence`` component into a list of components."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [c for child in node.get(key) or [] for c in _flatten(child, key)]
    return [node]


def _hf_vocab(data: dict) -> tuple[list[str], list[int]]:
    """Pieces and token types (added special tokens -> CONTROL, other added -> USER_DEFINED)."""
    vocab: dict[str, int] = data["model"]["vocab"]
    added = data.get("added_tokens") or []
    size = max([*vocab.values(), *(t["id"] for t in added), -1]) + 1
    pieces = [""] * size
    types = [UNUSED] * size
    for piece, i in vocab.items():
        pieces[i] = piece
        types[i] = BYTE if regex.fullmatch(r"<0x[0-9A-F]{2}>", piece) else NORMAL
    for tok in added:
        pieces[tok["id"]] = tok["content"]
        types[tok["id"]] = CONTROL if tok.get("special") else USER_DEFINED
    return pieces, types


def _hf_merges(merges: Iterable[str | Sequence[str]]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for m in merges:
        if isinstance(m, str):
            a, sep, b = m.partition(" ")
            if not sep:
                raise ValueError(f"malformed merge {m!r}")
        else:
            a, b = m
        out.append((a, b))
    return out


def _post_processor_ids(data: dict, pieces: list[str]) -> tuple[int | None, int | None]:
    """BOS / EOS ids added by a TemplateProcessing post-processor (if any)."""
    bos = eos = None
    for proc in _flatten(data.get("post_processor"), "processors"):
        if proc.get("type") != "TemplateProcessing":
            continue
        single = proc.get("single") or []
        specials = proc.get("special_tokens") or {}

        def token_id(item: dict, specials: dict = specials) -> int | None:
            name = item["SpecialToken"]["id"]
            ids = (specials.get(name) or {}).get("ids") or []
            if ids:
                return int(ids[0])
            return pieces.index(name) if name in pieces else None

        if single and "SpecialToken" in single[0]:
            bos = token_id(single[0])
        if len(single) > 1 and "SpecialToken" in single[-1]:
            eos = token_id(single[-1])
    return bos, eos


def tokenizer_from_json(path_or_dict: str | os.PathLike | dict) -> Tokenizer:
    """Load an HF tokenizer.json, choosing SentencePiece-style or byte-level BPE."""
    data = _load_json(path_or_dict)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"unsupported tokenizer.json model type {model.get('type')!r} (only BPE)")
    kinds = {c.get("type") for key, node in (("pretokenizers", data.get("pre_tokenizer")),
                                              ("decoders", data.get("decoder"))) for c in _flatten(node, key)}
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
