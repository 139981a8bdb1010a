"""Constrained decoding: JSON schemas, JSON, regexes and GBNF grammars, through xgrammar.

A `Grammar` says what the output must match; `GrammarCompiler` (one per tokenizer and vocabulary size)
compiles it against the vocabulary, cached; a `Constraint` follows one sequence: before each sampling step
`mask_logits` sets the logits of every token the grammar does not allow to -inf (all constrained rows of a
batch in one op), after it the sampled token is accepted. Once the grammar is complete only the stop
tokens are allowed, so a constrained row ends with its EOS ("stop").

Why xgrammar (benchmarks/grammar_engines.py, results/grammar_engines.md: the 13 test schemas, 4 sampled
outputs each, on the 32000- and 49152-token vocabularies, against llguidance and outlines-core): masks of
10-17 us per token (median; p99 38-47 us), compiles in 3-4 ms, every output valid (52/52 on both
vocabularies, with the JSON vocabulary below), and it takes llama.cpp's GBNF, regexes and structural tags
(tool calls); its matchers roll back (speculative decoding). llguidance compiles faster (0.3 ms) but its
masks cost 26-106 us and on the SentencePiece vocabulary its first mask admitted a token with a leading
space, so no output was valid through our tokenizer adapter; outlines-core does not enforce numeric bounds
(8 of 52 outputs invalid), its index takes 25-35 ms per schema and its p99 mask ~2-3 ms.

The vocabulary is given to xgrammar as each token's output bytes (`Tokenizer.token_bytes`), control tokens
as b"" (never allowed inside a grammar), so one code path serves SentencePiece and byte-level BPE. JSON
grammars (schemas, json_object) get a vocabulary without the tokens that hold a raw control byte (< 0x20):
compact JSON never contains one, and xgrammar's rule for length-bounded strings let a form feed through
(1 of 4 outputs of the minLength / maxLength schema was invalid JSON before this).
"""

from __future__ import annotations

import json
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import LevanteError
from .tokenizer import CONTROL, UNKNOWN, Tokenizer
from .transfer import host_tensor, to_device

KINDS = ("json_schema", "json_object", "regex", "gbnf", "structural_tag")
CACHE_SIZE = 64  # compiled grammars kept per compiler


class GrammarError(LevanteError, ValueError):
    """A grammar, schema or regex the engine cannot compile; the message names the problem."""


@dataclass(frozen=True)
class Grammar:
    """What a constrained output must match. Build with the class methods; `source` is canonical text."""

    kind: str
    source: str = ""

    @classmethod
    def json_schema(cls, schema: dict | str) -> Grammar:
        """A JSON value valid under `schema` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict | bool):
            raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema))  # key order kept: it is the order properties are generated in

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> Grammar:
        return cls("regex", pattern)

    @classmethod
    def gbnf(cls, grammar: str) -> Grammar:
        """A llama.cpp GBNF grammar (root rule `root`), as llama-cpp-python's `LlamaGrammar`."""
        return cls("gbnf", grammar)

    # llama-cpp-python's LlamaGrammar names
    @classmethod
    def from_string(cls, grammar: str) -> Grammar:
        """A GBNF grammar (llama-cpp-python's `LlamaGrammar.from_string`)."""
        return cls.gbnf(grammar)

    @classmethod
    def from_json_schema(cls, schema: str | dict) -> Grammar:
        """llama-cpp-python's `LlamaGrammar.from_json_schema`."""
        return cls.json_schema(schema)

    @classmethod
    def structural_tag(cls, spec: dict) -> Grammar:
        """xgrammar's structural tag (free text with tagged, schema-constrained sections: tool calls)."""
        return cls("structural_tag", json.dumps(spec))


def response_format_grammar(rf: Any) -> Grammar | None:
    """The grammar of an OpenAI `response_format` ({"type": "text" | "json_object" | "json_schema", ...}; as
    llama.cpp's server, a json_object may carry a "schema"); None for text. GrammarError for anything else."""
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise GrammarError(f"response_format must be an object, got {type(rf).__name__}")
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return Grammar.json_schema(rf["schema"]) if rf.get("schema") is not None else Grammar.json_object()
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict):
            raise GrammarError("response_format json_schema needs a 'json_schema' object {name, schema, strict}")
        name = spec.get("name")
        if name is not None and not (isinstance(name, str) and name and len(name) <= 64):
            raise GrammarError("response_format json_schema.name must be a non-empty string of at most 64 characters")
        schema = spec.get("schema")
        return Grammar.json_object() if schema is None else Grammar.json_schema(schema)
    raise GrammarError(f"unsupported response_format type {kind!r}; expected text, json_object or json_schema")


def grammar_of(grammar: Any = None, json_schema: Any = None, regex: str | None = None,
               response_format: Any = None) -> Grammar | None:
    """The one grammar an API call asks for (GBNF text or a `Grammar`; a JSON schema; a regex; an OpenAI
    response_format), or None. ValueError when more than one is given."""
    given = [x is not None for x in (grammar, json_schema, regex)] + [response_format_grammar(response_format)
                                                                      is not None]
    if sum(given) > 1:
        raise GrammarError("give at most one of grammar, json_schema, regex and response_format")
    if grammar is not None:
        if isinstance(grammar, Grammar):
            return grammar
        if isinstance(grammar, str):
            return Grammar.gbnf(grammar)
        raise GrammarError(f"grammar must be GBNF text or a levante Grammar, got {type(grammar).__name__}")
    if json_schema is not None:
        return Grammar.json_schema(json_schema)
    if regex is not None:
        if not isinstance(regex, str):
            raise GrammarError("regex must be a string")
        return Grammar.regex(regex)
    return response_format_grammar(response_format)


def token_vocab(tok: Tokenizer, vocab_size: int) -> list[bytes]:
    """Each token's output bytes, b"" for control / unknown tokens and for ids past the tokenizer's vocabulary."""
    out = []
    for i in range(vocab_size):
        if i >= tok.vocab_size or tok.token_types[i] in (CONTROL, UNKNOWN):
            out.append(b"")
        else:
            out.append(tok.token_bytes(i))
    return out


class GrammarCompiler:
    """Compiles `Grammar`s for one tokenizer and logits width; thread-safe, with an LRU cache."""

    def __init__(self, tok: Tokenizer, vocab_size: int | None = None, stop_ids: set[int] | None = None) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.vocab_size = vocab_size or tok.vocab_size
        self.tok_pieces = tok.pieces
        stops = sorted(stop_ids if stop_ids is not None else (tok.eos_ids or ({tok.eos_id} - {None})))
        if not stops:
            raise GrammarError("constrained decoding needs a tokenizer with an end-of-sequence token")
        self.stop_ids = stops
        vocab = token_vocab(tok, self.vocab_size)
        json_vocab = [b"" if any(c < 0x20 for c in b) else b for b in vocab]
        # tool-call grammars: Mistral's [TOOL_CALLS] control token must be matchable (xgrammar never accepts a
        # token whose bytes are empty), as bytes no JSON value or other token can hold
        tool_vocab = list(vocab)
        trigger = tok.piece_to_id("[TOOL_CALLS]")
        if trigger is not None and trigger < self.vocab_size and tok.token_types[trigger] == CONTROL:
            tool_vocab[trigger] = b"\x00[TOOL_CALLS]"
        self._text, self._json, self._tools = (
            xgr.GrammarCompiler(xgr.TokenizerInfo(v, xgr.VocabType.RAW, vocab_size=self.vocab_size,
                                                  stop_token_ids=stops), max_threads=1, cache_enabled=False)
            for v in (vocab, json_vocab, tool_vocab)
        )
        self._cache: OrderedDict[Grammar, Any] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, g: Grammar) -> Any:
        """The compiled grammar (cached); GrammarError naming the problem when it cannot be compiled."""
        if g.kind not in KINDS:
            raise GrammarError(f"unknown grammar kind {g.kind!r}; expected one of {', '.join(KINDS)}")
        with self._lock:
            if g in self._cache:
                self._cache.move_to_end(g)
                return self._cache[g]
        try:
            if g.kind == "json_schema":
                compiled = self._json.compile_json_schema(g.source, any_whitespace=False, strict_mode=True)
            elif g.kind == "json_object":
                compiled = self._json.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                          strict_mode=False)
            elif g.kind == "regex":
                compiled = self._text.compile_regex(g.source)
            elif g.kind == "gbnf":
                compiled = self._text.compile_grammar(g.source, root_rule_name="root")
            else:
                compiled = self._tools.compile_structural_tag(g.source)
        except Exception as e:  # xgrammar raises RuntimeError / ValueError / its own errors on bad input
            what = {"json_schema": "JSON schema", "json_object": "JSON", "regex": "regex", "gbnf": "GBNF grammar",
                    "structural_tag": "structural tag"}[g.kind]
            raise GrammarError(f"cannot compile the {what}: {_first_line(e)}") from None
        with self._lock:
            self._cache[g] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def constraint(self, g: Grammar) -> Constraint:
        """A fresh `Constraint` following `g` for one sequence."""
        return Constraint(self, self.compile(g), g)


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]


class Constraint:
    """One sequence's position in a grammar."""

    def __init__(self, compiler: GrammarCompiler, compiled: Any, grammar: Grammar) -> None:
        self.compiler, self.grammar = compiler, grammar
        self._m = compiler._xgr.GrammarMatcher(compiled)

    def accept(self, token: int) -> bool:
        """Advance by the sampled `token`; False if the grammar does not allow it (then nothing changes)."""
        if self._m.is_terminated():
            return token in self.compiler.stop_ids
        return self._m.accept_token(int(token))

    @property
    def finished(self) -> bool:
        """The output is complete (a stop token was accepted at the end of the grammar)."""
        return self._m.is_terminated()

    @property
    def complete(self) -> bool:
        """What was generated so far is a complete match (a stop token is allowed now)."""
        return self._m.is_completed() if hasattr(self._m, "is_completed") else self._m.is_terminated()

    def rollback(self, n: int) -> None:
        """Undo the last `n` accepted tokens (speculative decoding)."""
        if n:
            self._m.rollback(n)

    def fill(self, bitmask: Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)


def mask_logits(logits: Tensor, constraints: list[Constraint | None]) -> Tensor:
    """Set, in place, the logits [B, V] of tokens each row's constraint forbids to -inf (rows without a
    constraint untouched): one bitmask for the batch, filled row by row, applied in one op. Returns logits."""
    rows = [i for i, c in enumerate(constraints) if c is not None]
    if not rows:
        return logits
    xgr = constraints[rows[0]].compiler._xgr
    V = logits.shape[-1]
    bitmask = xgr.allocate_token_bitmask(len(constraints), V)
    for i in rows:
        constraints[i].fill(bitmask, i)
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
    else:  # the packed masks go to the device (a 32nd of the bool mask's bytes) in a copy that does not wait
        idx = host_tensor(rows, logits.device, torch.long)
        allowed = _unpack(to_device(bitmask[rows], logits.device), V)
        logits.index_copy_(0, idx, logits.index_select(0, idx).masked_fill(~allowed, float("-inf")))
    return logits


def _unpack(bitmask: Tensor, V: int) -> Tensor:
    """bool [B, V] from xgrammar's packed int32 bitmask [B, ceil(V / 32)] (on its device)."""
    bits = bitmask.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(32, dtype=torch.int64, device=bitmask.device)
    return ((bits[..., None] >> shifts) & 1).reshape(bitmask.shape[0], -1)[:, :V].bool()


_COMPILERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_COMPILERS_LOCK = threading.Lock()


def compiler_for(tok: Tokenizer, vocab_size: int | None = None) -> GrammarCompiler:
    """The tokenizer's shared `GrammarCompiler` for logits of width `vocab_size` (built once)."""
    with _COMPILERS_LOCK:
        per_tok = _COMPILERS.setdefault(tok, {})
        key = vocab_size or tok.vocab_size
        if key not in per_tok:
            per_tok[key] = GrammarCompiler(tok, key)
        return per_tok[key]
