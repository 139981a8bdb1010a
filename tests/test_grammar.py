"""levante.grammar: grammars from the API's arguments, masks on a batch, errors that name the problem."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("xgrammar")

from levante.grammar import (  # noqa: E402
    Grammar,
    GrammarCompiler,
    GrammarError,
    grammar_of,
    mask_logits,
    response_format_grammar,
    token_vocab,
)
from levante.tokenizer import BYTE_ENCODER, GPT2BPETokenizer  # noqa: E402

CHARS = '{}[]":, \n0123456789abcdefghijklmnopqrstuvwxyz-_.\\\x0c'


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE over single characters plus a few merged pieces, an EOS and a control token."""
    pieces = [BYTE_ENCODER[ord(c)] for c in CHARS] + [BYTE_ENCODER[ord('"')] + "a", "ab", "</s>", "<ctl>"]
    types = [1] * (len(pieces) - 2) + [3, 3]
    t = GPT2BPETokenizer.from_vocab(pieces, [], types, pre="gpt2")
    t.eos_id = pieces.index("</s>")
    t.refresh_eos_ids()
    return t


def _walk(compiler, g: Grammar, text: str):
    """Accept `text` character by character; the constraint after it."""
    c = compiler.constraint(g)
    for ch in text:
        tid = CHARS.index(ch)
        assert c.accept(tid), (text, ch)
    return c


def _allowed(compiler, c) -> set[str]:
    logits = torch.zeros(1, compiler.vocab_size)
    mask_logits(logits, [c])
    return {compiler.tok_pieces[i] for i in range(compiler.vocab_size) if math.isfinite(logits[0, i])}


def test_vocab_bytes_and_control_tokens(tok):
    vocab = token_vocab(tok, tok.vocab_size + 3)
    assert vocab[CHARS.index("a")] == b"a" and vocab[len(CHARS)] == b'"a'
    assert vocab[tok.eos_id] == b"" and vocab[-1] == b"" and len(vocab) == tok.vocab_size + 3


def test_json_schema_masks_and_completion(tok):
    compiler = GrammarCompiler(tok)
    g = Grammar.json_schema({"type": "object", "properties": {"k": {"enum": ["ab", "b"]}}, "required": ["k"]})
    c = _walk(compiler, g, '{"k": "')  # compact JSON with OpenAI's separators ", " and ": "
    logits = torch.zeros(2, tok.vocab_size)
    mask_logits(logits, [c, None])  # one constrained row, one free: the free row is untouched
    allowed = {tok.pieces[i] for i in range(tok.vocab_size) if math.isfinite(logits[0, i])}
    assert allowed == {"a", "b", "ab"} and torch.isfinite(logits[1]).all()
    for ch in 'ab"}':
        assert c.accept(CHARS.index(ch))
    assert not c.finished and c.complete
    logits = torch.zeros(1, tok.vocab_size)
    mask_logits(logits, [c])
    assert [i for i in range(tok.vocab_size) if math.isfinite(logits[0, i])] == [tok.eos_id]  # only EOS now
    assert c.accept(tok.eos_id) and c.finished
    assert not compiler.constraint(g).accept(CHARS.index("x"))  # a token the grammar does not allow


def test_masks_of_other_logits_take_the_device_path(tok):
    """Logits that xgrammar's CPU kernel does not take (bf16 here; on a GPU, all) get the same masks: the packed
    masks are unpacked where the logits are, and only the constrained rows change."""
    compiler = GrammarCompiler(tok)
    g = Grammar.json_schema({"type": "object", "properties": {"k": {"enum": ["ab", "b"]}}, "required": ["k"]})
    cs = [_walk(compiler, g, '{"k": "'), None, _walk(compiler, g, "{")]
    ref = torch.randn(3, tok.vocab_size)
    want = mask_logits(ref.clone(), cs)
    got = mask_logits(ref.bfloat16(), cs)
    assert torch.equal(torch.isfinite(got), torch.isfinite(want)) and torch.equal(got[1], ref[1].bfloat16())
    assert (~torch.isfinite(want[0])).sum() > 0 and (~torch.isfinite(want[2])).sum() > 0


def test_json_grammars_never_allow_raw_control_bytes(tok):
    """Compact JSON holds no raw control byte; xgrammar's length-bounded strings would let a form feed in."""
    compiler = GrammarCompiler(tok)
    g = Grammar.json_schema({"type": "object", "properties": {"s": {"type": "string", "minLength": 2,
                                                                     "maxLength": 8}}})
    c = _walk(compiler, g, '{"s": "ab')
    logits = torch.zeros(1, tok.vocab_size)
    mask_logits(logits, [c])
    assert not math.isfinite(logits[0, CHARS.index("\x0c")]) and not math.isfinite(logits[0, CHARS.index("\n")])
    c = _walk(compiler, Grammar.regex("a\nb"), "a")  # text grammars keep them
    logits = torch.zeros(1, tok.vocab_size)
    mask_logits(logits, [c])
    assert math.isfinite(logits[0, CHARS.index("\n")])


def test_gbnf_regex_and_json_object(tok):
    compiler = GrammarCompiler(tok)
    c = _walk(compiler, Grammar.gbnf('root ::= "a" [0-9]+ "z"'), "a12z")
    assert c.complete
    c = _walk(compiler, Grammar.regex(r"[a-c]{2}-\d"), "ab-7")
    assert c.complete
    c = _walk(compiler, Grammar.json_object(), '{"x": [1, 2]}')
    assert c.complete
    assert Grammar.from_string('root ::= "a"') == Grammar.gbnf('root ::= "a"')


@pytest.mark.parametrize("bad, match", [
    (Grammar.gbnf("root ::= undefined_rule"), "cannot compile the GBNF grammar"),
    (Grammar.regex("(unclosed"), "cannot compile the regex"),
    (Grammar("json_schema", '{"type": "no-such-type"}'), "cannot compile the JSON schema"),
    (Grammar("xml"), "unknown grammar kind"),
])
def test_compile_errors_name_the_problem(tok, bad, match):
    with pytest.raises(GrammarError, match=match):
        GrammarCompiler(tok).compile(bad)


def test_response_format_and_api_arguments():
    assert response_format_grammar(None) is None and response_format_grammar({"type": "text"}) is None
    assert response_format_grammar({"type": "json_object"}) == Grammar.json_object()
    schema = {"type": "object", "properties": {"b": {}, "a": {}}}
    g = response_format_grammar({"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
    assert g == Grammar.json_schema(schema) and list(json.loads(g.source)["properties"]) == ["b", "a"]  # order kept
    assert response_format_grammar({"type": "json_object", "schema": schema}) == g  # llama.cpp's extension
    for bad, match in [({"type": "yaml"}, "unsupported response_format type"), ("json", "must be an object"),
                       ({"type": "json_schema"}, "needs a 'json_schema' object"),
                       ({"type": "json_schema", "json_schema": {"name": "", "schema": {}}}, "name"),
                       ({"type": "json_schema", "json_schema": {"schema": "{not json"}}, "not valid JSON"),
                       ({"type": "json_schema", "json_schema": {"schema": [1]}}, "must be an object")]:
        with pytest.raises(GrammarError, match=match):
            response_format_grammar(bad)
    assert grammar_of(grammar='root ::= "a"') == Grammar.gbnf('root ::= "a"')
    assert grammar_of(regex="a+") == Grammar.regex("a+") and grammar_of() is None
    with pytest.raises(GrammarError, match="at most one"):
        grammar_of(regex="a", json_schema={})
