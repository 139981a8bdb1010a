"""SentencePiece BPE with byte fallback (Llama / Mistral / Mixtral): the ModelProto parser and the tokenizer."""

from __future__ import annotations

import os
import struct
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import regex

from .base import BYTE, CONTROL, NORMAL, SPACE, UNKNOWN, UNUSED, USER_DEFINED, Tokenizer, bpe_merge
from .hf_json import flatten, hf_merges, hf_vocab, load_json, post_processor_ids


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
        data = load_json(path_or_dict)
        model = data.get("model") or {}
        if model.get("type") != "BPE":
            raise ValueError(f"tokenizer.json model type {model.get('type')!r} is not BPE")
        pieces, types = hf_vocab(data)
        merges = hf_merges(model.get("merges") or [])
        prefix, scheme, split = False, "always", False
        for norm in flatten(data.get("normalizer"), "normalizers"):
            if norm.get("type") == "Prepend" and norm.get("prepend") == SPACE:
                prefix = True
            elif norm.get("type") in ("Replace", "Prepend", None):
                pass
            else:
                raise ValueError(f"unsupported normalizer {norm.get('type')!r} in tokenizer.json")
        for pre in flatten(data.get("pre_tokenizer"), "pretokenizers"):
            if pre.get("type") != "Metaspace":
                raise ValueError(f"unsupported pre_tokenizer {pre.get('type')!r} for SentencePiece-style BPE")
            scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
            prefix = scheme != "never"
            split = bool(pre.get("split", False))
        bos_id, eos_id = post_processor_ids(data, pieces)
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
