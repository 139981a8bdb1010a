"""Chat prompt construction: Mistral instruct v1 format, jinja chat templates, ChatML fallback."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from levante.tokenizer import SentencePieceTokenizer, Tokenizer

ROLES = ("system", "user", "assistant", "tool")


def normalize_messages(messages: Any) -> list[dict[str, str]]:
    """Validate chat messages and return them as ``{"role", "content"}`` dicts with string content.

    Content may be a string or a list of ``{"type": "text", "text": ...}`` parts (joined).
    """
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"message {i} must be a dict, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = msg.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                is_text = isinstance(part, dict) and part.get("type") == "text"
                if not (is_text and isinstance(part.get("text"), str)):
                    raise ValueError(f"message {i}: content parts must be {{'type': 'text', 'text': str}}")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise ValueError(f"message {i} ({role}) content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def mistral_instruct_ids(tok: Tokenizer, messages: list[dict]) -> list[int]:
    """Mistral instruct v1 prompt ids, identical to mistral-common's ``MistralTokenizer.v1()``.

    ``<s>[INST] {system}\\n\\n{user} [/INST]{assistant}</s>[INST] {user} [/INST]``: system messages
    are joined and prepended to the first user message; consecutive messages of the same role are
    joined with a blank line; the conversation must end with a user message.
    """
    msgs = normalize_messages(messages)
    system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
    turns: list[dict[str, str]] = []
    prev_role: str | None = None
    seen_assistant = False
    for m in msgs:
        role = m["role"]
        if role == "tool":
            raise ValueError("tool messages are not supported by the Mistral instruct v1 format")
        if role == "system":
            if seen_assistant:
                raise ValueError("a system message may not follow an assistant message")
        elif role == prev_role:
            turns[-1]["content"] += "\n\n" + m["content"]
        else:
            if role == "assistant":
                seen_assistant = True
            turns.append(dict(m))
        prev_role = role
    if not turns or turns[0]["role"] != "user":
        turns.insert(0, {"role": "user", "content": ""})
    if turns[-1]["role"] != "user":
        raise ValueError(f"the conversation must end with a user message, not {turns[-1]['role']!r}")
    if tok.bos_id is None or tok.eos_id is None:
        raise ValueError("the Mistral instruct format needs a tokenizer with BOS and EOS tokens")
    ids = [tok.bos_id]
    first_user = True
    for turn in turns:
        content = turn["content"]
        if turn["role"] == "user":
            if first_user and system:
                content = system + "\n\n" + content
            first_user = False
            ids += tok.encode(f"[INST] {content} [/INST]", add_bos=False, add_eos=False)
        else:
            if not content:
                raise ValueError("assistant messages must have non-empty content")
            ids += tok.encode(content, add_bos=False, add_eos=False)
            ids.append(tok.eos_id)
    return ids


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    # Like transformers: no HTML escaping (jinja's default tojson escapes <, >, &, ').
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """Sandbox that fails on unsafe attribute access instead of silently rendering it as empty."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _environment() -> ImmutableSandboxedEnvironment:
    env = _StrictSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def render_chat_template(
    template: str,
    messages: list[dict],
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **extra: Any,
) -> str:
    """Render a (HF-style) jinja chat template in a sandbox."""
    try:
        compiled = _environment().from_string(template)
        return compiled.render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
            eos_token=eos_token, **extra,
        )  # fmt: skip
    except SecurityError as e:
        raise ValueError(f"chat template error: unsafe operation blocked by the sandbox: {e}") from e
    except (TemplateError, jinja2.TemplateSyntaxError) as e:
        raise ValueError(f"chat template error: {e}") from e


def chatml_text(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """ChatML: ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text


def apply_chat(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of a chat prompt: the tokenizer's chat template, else Mistral instruct, else ChatML."""
    msgs = normalize_messages(messages)
    if tok.chat_template:
        text = render_chat_template(
            tok.chat_template, msgs, add_generation_prompt=add_generation_prompt,
            bos_token=tok.bos_token or "", eos_token=tok.eos_token or "",
        )  # fmt: skip
        bos = tok.bos_token
        add_bos = False if bos and text.startswith(bos) else None
        return tok.encode(text, add_bos=add_bos, special=True)
    if isinstance(tok, SentencePieceTokenizer):
        return mistral_instruct_ids(tok, msgs)
    return tok.encode(chatml_text(msgs, add_generation_prompt), special=True)
