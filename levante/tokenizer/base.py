"""The tokenizer interface (`Tokenizer`, `StreamDecoder`), token types, pre-tokenizer patterns and the BPE merge
loop."""

from __future__ import annotations

import codecs
import heapq
from collections.abc import Callable, Iterable, Sequence

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
    def special_pattern(self) -> regex.Pattern | None:
        """The regex of the special-token strings `encode(special=True)` turns into their ids (None: there are none)."""
        if self._special_re is None:
            texts = {self.pieces[i] for i in self._parseable_ids() if self.pieces[i]}
            texts = sorted(texts, key=len, reverse=True)
            if not texts:
                return None
            self._special_re = regex.compile("|".join(regex.escape(t) for t in texts))
        return self._special_re

    def encode(
        self,
        text: str,
        add_bos: bool | None = None,
        add_eos: bool | None = None,
        special: bool = False,
        plain_spans: Sequence[tuple[int, int]] = (),
    ) -> list[int]:
        """Encode text to ids; ``special=True`` turns special-token strings in the text into their ids, except
        inside ``plain_spans`` ([start, end) character ranges, sorted, e.g. the parts of a rendered chat prompt
        that came from users), whose text is encoded as text whatever it holds."""
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        ids: list[int] = []
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.append(self.bos_id)
        pattern = self.special_pattern() if special else None
        if pattern is None:
            ids.extend(self._encode_fragment(text, True))
        else:
            pos = 0
            for start, end in self._special_matches(pattern, text, plain_spans):
                if start > pos:
                    ids.extend(self._encode_fragment(text[pos:start], pos == 0))
                ids.append(self._vocab[text[start:end]])
                pos = end
            if pos < len(text):
                ids.extend(self._encode_fragment(text[pos:], pos == 0))
        if (self.add_eos if add_eos is None else add_eos) and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    @staticmethod
    def _special_matches(pattern: regex.Pattern, text: str, plain: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """(start, end) of the special-token strings of `text` outside the `plain` spans: each region between
        plain spans is searched on its own, so no match reaches into one."""
        out, pos = [], 0
        for a, b in [*plain, (len(text), len(text))]:
            out += [m.span() for m in pattern.finditer(text, pos, a)]
            pos = max(pos, b)
        return out

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
