"""Chat formatting tests (mistral-common as the oracle for the Mistral instruct v1 format)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from levante.chat import apply_chat, mistral_instruct_ids, normalize_messages, render_chat_template
from levante.tokenizer import GPT2BPETokenizer, SentencePieceTokenizer

_spec = importlib.util.find_spec("mistral_common")
V1_MODEL = Path(_spec.submodule_search_locations[0]) / "data" / "tokenizer.model.v1" if _spec else None

CONVERSATIONS = [
    [("user", "Hello")],
    [("user", "Hi!"), ("assistant", "Hello, how can I help?"), ("user", "Tell me a joke."),
     ("assistant", "Why did the chicken cross the road?"), ("user", "Why?")],
    [("system", "You are terse."), ("user", "Hello"), ("assistant", "Hi there"), ("user", "How are you?")],
    [("system", "S1"), ("system", "S2"), ("user", "u")],
    [("user", "  leading spaces"), ("assistant", " x "), ("user", "é 日本語 😀 Привет\n\nمرحبا")],
    [("user", "u1"), ("assistant", "a"), ("assistant", "b"), ("user", "u2"), ("user", "u3")],
    [("assistant", "I start"), ("user", "ok")],
    [("system", "only system")],
    [("user", "")],
]  # fmt: skip


@pytest.fixture(scope="module")
def tok() -> SentencePieceTokenizer:
    if V1_MODEL is None or not V1_MODEL.is_file():
        pytest.skip("mistral_common not installed")
    return SentencePieceTokenizer.from_model_file(V1_MODEL)


@pytest.fixture(scope="module")
def mistral_v1():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.v1()


def _reference(mistral_v1, conv) -> list[int]:
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    classes = {"user": UserMessage, "assistant": AssistantMessage, "system": SystemMessage}
    request = ChatCompletionRequest(messages=[classes[r](content=c) for r, c in conv])
    return mistral_v1.encode_chat_completion(request).tokens


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_mistral_instruct_matches_mistral_common(tok, mistral_v1, conv):
    messages = [{"role": r, "content": c} for r, c in conv]
    ids = mistral_instruct_ids(tok, messages)
    assert ids == _reference(mistral_v1, conv)
    assert apply_chat(tok, messages) == ids  # no chat template: Mistral format for SentencePiece


def test_mistral_instruct_errors(tok):
    with pytest.raises(ValueError, match="end with a user message"):
        mistral_instruct_ids(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(ValueError, match="system message may not follow an assistant"):
        mistral_instruct_ids(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                   {"role": "system", "content": "s"}, {"role": "user", "content": "c"}])  # fmt: skip
    with pytest.raises(ValueError, match="non-empty"):
        mistral_instruct_ids(tok, [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
                                   {"role": "user", "content": "c"}])  # fmt: skip


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        (["hello"], "must be a dict"),
        ([{"role": "robot", "content": "x"}], "unknown role 'robot'"),
        ([{"role": "user", "content": 3}], "content must be a string"),
        ([{"role": "user"}], "content must be a string"),
        ([{"role": "user", "content": [{"type": "image"}]}], "content parts"),
    ],
)
def test_bad_messages(tok, messages, match):
    with pytest.raises(ValueError, match=match):
        apply_chat(tok, messages)


def test_content_parts_joined():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    msgs = normalize_messages([{"role": "user", "content": parts}])
    assert msgs == [{"role": "user", "content": "ab"}]


CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


def test_render_chatml():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    text = render_chat_template(CHATML, msgs)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert not render_chat_template(CHATML, msgs, add_generation_prompt=False).endswith("assistant\n")


def test_render_mistral_template_and_raise_exception(tok, mistral_v1):
    conv = CONVERSATIONS[1]
    msgs = [{"role": r, "content": c} for r, c in conv]
    text = render_chat_template(MISTRAL_TEMPLATE, msgs, bos_token="<s>", eos_token="</s>")
    assert text == (
        "<s>[INST] Hi! [/INST] Hello, how can I help?</s>[INST] Tell me a joke. [/INST]"
        " Why did the chicken cross the road?</s>[INST] Why? [/INST]"
    )
    tok_t = SentencePieceTokenizer.from_model_file(V1_MODEL, chat_template=MISTRAL_TEMPLATE)
    ids = apply_chat(tok_t, msgs)
    assert ids.count(1) == 1  # no double BOS
    # prefix space after each special token reproduces mistral-common's ids
    assert ids == _reference(mistral_v1, conv)
    with pytest.raises(ValueError, match="chat template error: Conversation roles must alternate"):
        render_chat_template(MISTRAL_TEMPLATE, msgs[:1] + msgs[:1])


def test_template_helpers():
    out = render_chat_template("{{ messages | tojson }}|{{ strftime_now('%Y') | length }}", [{"a": "<é>"}])
    assert out == '[{"a": "<é>"}]|4'
    out = render_chat_template("{{ x | tojson(indent=2) }}", [], x={"k": [1]})
    assert out == '{\n  "k": [\n    1\n  ]\n}'
    with pytest.raises(ValueError, match="chat template error"):
        render_chat_template("{% if %}", [])
    with pytest.raises(ValueError, match="chat template error"):
        render_chat_template("{{ undefined_fn() }}", [])


@pytest.mark.parametrize("template", ["{{ ''.__class__ }}", "{{ ''.__class__.__mro__[1].__subclasses__() }}",
                                      "{{ messages.append(1) }}"])  # fmt: skip
def test_sandbox_blocks_unsafe_access(template):
    with pytest.raises(ValueError, match="chat template error"):
        render_chat_template(template, [{"role": "user", "content": "x"}])


def _toy_bpe(template: str | None = None) -> GPT2BPETokenizer:
    chars = sorted(set("<|im_start|>user\nassistant\nhi system"))
    from levante.tokenizer import BYTE_ENCODER

    pieces = [BYTE_ENCODER[ord(c)] for c in chars]
    specials = ["<|im_start|>", "<|im_end|>"]
    tok = GPT2BPETokenizer.from_vocab(pieces + specials, [], [1] * len(pieces) + [3, 3], pre="gpt2")
    tok.chat_template = template
    return tok


def test_chatml_fallback_and_template_for_bpe():
    msgs = [{"role": "user", "content": "hi"}]
    tok = _toy_bpe()
    ids = apply_chat(tok, msgs)
    start, end = tok.piece_to_id("<|im_start|>"), tok.piece_to_id("<|im_end|>")
    assert ids[0] == start and ids.count(start) == 2 and ids.count(end) == 1
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.eos_ids == {end}
    assert apply_chat(_toy_bpe(CHATML), msgs) == ids
