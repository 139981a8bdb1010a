"""Chat prompt construction: Mistral instruct v1 format, jinja chat templates, ChatML fallback.

Message contents are text: whatever a user, system, assistant or tool message holds, it never becomes a
control token. A template is rendered with every special-token string inside the messages (and tools)
swapped for a unique marker; the markers are put back and their spans handed to the tokenizer as plain text,
so only the template's own special tokens are parsed (`render_marked`). A conversation whose contents hold
no special-token string renders and tokenizes exactly as before. (transformers, vLLM and llama.cpp parse
special tokens in contents; mistral-common, like this module, does not.)
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .grammar import Grammar, GrammarError, grammar_of
from .tokenizer import SentencePieceTokenizer, Tokenizer
from .toolcalls import (
    Tool,
    ToolCallParser,
    call_format,
    fallback_messages,
    parse_tool_choice,
    parse_tools,
    template_takes_tools,
    tools_grammar,
)

ROLES = ("system", "user", "assistant", "tool")


def _tool_calls(i: int, calls: Any) -> list[dict]:
    """An assistant message's OpenAI tool_calls, arguments parsed to objects when they are JSON (templates, as
    transformers documents, render them as dicts)."""
    if not isinstance(calls, list):
        raise ValueError(f"message {i}: tool_calls must be a list")
    out = []
    for j, c in enumerate(calls):
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise ValueError(f"message {i}: tool_calls[{j}] must be {{'type': 'function', 'function': {{'name', "
                             "'arguments'}}")
        args = f.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                pass  # kept as the text it is
        call_id = c.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise ValueError(f"message {i}: tool_calls[{j}].id must be a string")
        out.append({"id": call_id, "type": "function", "function": {"name": f["name"], "arguments": args}})
    return out


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Validate chat messages and return them as ``{"role", "content"}`` dicts with string content, plus an
    assistant's ``tool_calls`` and a tool message's ``tool_call_id`` / ``name`` when present.

    Content may be a string or a list of ``{"type": "text", "text": ...}`` parts (joined); an assistant
    message with tool calls may have none.
    """
    if not isinstance(messages, list | tuple) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"message {i} must be a dict, got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = msg.get("content")
        calls = msg.get("tool_calls") if role == "assistant" else None
        if content is None and calls:
            content = ""
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
        m: dict[str, Any] = {"role": role, "content": content}
        if calls:
            m["tool_calls"] = _tool_calls(i, calls)
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if msg.get(key) is not None:
                    if not isinstance(msg[key], str):
                        raise ValueError(f"message {i}: {key} must be a string")
                    m[key] = msg[key]
        out.append(m)
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


def _json_value(text: str) -> Any:
    """mistral-common's normalisation of a tool result / arguments: the parsed JSON, else the text ("{}" if empty)."""
    if not text:
        return {}
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def mistral_tools_ids(tok: Tokenizer, messages: list[dict], tools: list | None = None) -> list[int]:
    """Mistral instruct v3 prompt ids (control tokens [INST] / [/INST], tools, tool calls and results), identical
    to mistral-common's v3 tokenizer: consecutive user / assistant messages joined with a blank line, the system
    prompt and the tools ([AVAILABLE_TOOLS] ... [/AVAILABLE_TOOLS]) before the last user message, a call as
    [TOOL_CALLS] + its JSON, a result as [TOOL_RESULTS] {"content", "call_id"} [/TOOL_RESULTS]. Contents are
    encoded as text. `tools`: `levante.toolcalls.Tool`s."""
    msgs = normalize_messages(messages)
    special = {p: tok.piece_to_id(p) for p in ("[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                                                 "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")}
    if None in special.values() or tok.bos_id is None or tok.eos_id is None:
        raise ValueError("the Mistral v3 format needs a tokenizer with [INST], [TOOL_CALLS], ... control tokens")
    system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system" and m["content"])
    turns: list[dict[str, Any]] = []
    for m in msgs:
        if m["role"] == "system":
            continue
        prev = turns[-1] if turns else None
        if prev is not None and m["role"] == prev["role"] == "user":
            prev["content"] += "\n\n" + m["content"]
        elif prev is not None and m["role"] == prev["role"] == "assistant":
            prev["content"] = "\n\n".join(c for c in (prev["content"], m["content"]) if c)
            prev["tool_calls"] = prev.get("tool_calls", []) + m.get("tool_calls", [])
        else:
            turns.append(dict(m))
    last_user = max((i for i, t in enumerate(turns) if t["role"] == "user"), default=-1)

    def enc(text: str) -> list[int]:
        return tok.encode(text, add_bos=False, add_eos=False)

    ids = [tok.bos_id]
    for i, t in enumerate(turns):
        if t["role"] == "user":
            if i == last_user and tools:
                specs = [{"type": "function", "function": {"name": x.name, "description": x.description,
                                                           "parameters": x.parameters}} for x in tools]
                ids += [special["[AVAILABLE_TOOLS]"], *enc(json.dumps(specs, ensure_ascii=False)),
                        special["[/AVAILABLE_TOOLS]"]]
            content = system + "\n\n" + t["content"] if i == last_user and system else t["content"]
            ids += [special["[INST]"], *enc(content), special["[/INST]"]]
        elif t["role"] == "assistant":
            if t.get("tool_calls"):
                if t["content"]:
                    raise ValueError("the Mistral format cannot hold tool calls and content in one assistant message")
                calls = []
                for c in t["tool_calls"]:
                    args = c["function"]["arguments"]
                    call = {"name": c["function"]["name"],
                            "arguments": _json_value(args) if isinstance(args, str) else args}
                    if c.get("id") and c["id"] != "null":
                        call["id"] = c["id"]
                    calls.append(call)
                ids += [special["[TOOL_CALLS]"], *enc(json.dumps(calls, ensure_ascii=False))]
            else:
                if not t["content"]:
                    raise ValueError("assistant messages must have content or tool calls")
                ids += enc(t["content"].rstrip(" "))
            ids.append(tok.eos_id)
        else:  # tool
            if not t.get("tool_call_id"):
                raise ValueError("the Mistral v3 format needs tool_call_id on tool messages")
            result = {"content": _json_value(t["content"]), "call_id": t["tool_call_id"]}
            ids += [special["[TOOL_RESULTS]"], *enc(json.dumps(result, ensure_ascii=False)), special["[/TOOL_RESULTS]"]]
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


def _map_strings(obj: Any, fn) -> Any:
    """`obj` with `fn` applied to every string in it (dict keys too), recursively through dicts and lists."""
    if isinstance(obj, str):
        return fn(obj)
    if isinstance(obj, dict):
        return {_map_strings(k, fn): _map_strings(v, fn) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_map_strings(v, fn) for v in obj]
    return obj


def render_marked(tok: Tokenizer, render, messages: list[dict], tools: list | None = None) -> tuple[str, list]:
    """(text, plain spans) of `render(messages, tools)` where the special-token strings that came from the
    messages / tools are spans of plain text (see the module docstring). Raises ValueError when the template
    cut a marker apart (it transformed contents in a way whose special strings cannot be followed)."""
    pattern = tok.special_pattern()
    if pattern is None:
        return render(messages, tools), []
    nonce = secrets.token_hex(8)
    found: list[str] = []
    own = [0, 0]  # the marker characters the users' strings hold themselves

    def mark(s: str) -> str:
        own[0] += s.count("\ue002")
        own[1] += s.count("\ue003")

        def sub(m) -> str:
            found.append(m.group())
            return f"\ue002{nonce}{len(found) - 1}\ue003"

        return pattern.sub(sub, s)

    text = render(_map_strings(messages, mark), _map_strings(tools, mark) if tools is not None else None)
    if not found:
        return text, []
    out, spans, pos, n = [], [], 0, 0
    for m in re.finditer(f"\ue002{nonce}(\\d+)\ue003", text):
        out.append(text[pos : m.start()])
        n += len(out[-1])
        piece = found[int(m.group(1))]
        spans.append((n, n + len(piece)))
        out.append(piece)
        n += len(piece)
        pos = m.end()
    out.append(text[pos:])
    text = "".join(out)
    if text.count("\ue002") > own[0] or text.count("\ue003") > own[1]:  # a marker cut apart
        raise ValueError("the chat template transformed a message's special-token text in a way that cannot be "
                         "rendered safely (as text)")
    return text, spans


def apply_chat(tok: Tokenizer, messages: list[dict], add_generation_prompt: bool = True,
               tools: list | None = None, tool_choice: Any = None) -> list[int]:
    """Token ids of a chat prompt: Mistral's v3 format for tokenizers with its control tokens, else the
    tokenizer's chat template, else Mistral instruct v1 (SentencePiece), else ChatML. Message contents are always
    encoded as text (see the module docstring). `tools` / `tool_choice`: OpenAI's (levante.toolcalls says how
    each format shows them); a template that takes no tools gets them as a system instruction."""
    msgs = normalize_messages(messages)
    parsed = parse_tools(tools)
    choice = parse_tool_choice(tool_choice, parsed)
    shown = parsed if choice != "none" else []
    if call_format(tok) == "mistral":
        return mistral_tools_ids(tok, msgs, shown)
    native = template_takes_tools(tok.chat_template)
    if not native and (shown or any(m["role"] == "tool" or m.get("tool_calls") for m in msgs)):
        msgs = fallback_messages(msgs, shown, choice)
    if tok.chat_template:
        def render(m, t):
            extra = {"tools": t} if t else {}
            return render_chat_template(tok.chat_template, m, add_generation_prompt=add_generation_prompt,
                                        bos_token=tok.bos_token or "", eos_token=tok.eos_token or "", **extra)

        text, spans = render_marked(tok, render, msgs, [t.raw for t in shown] if native and shown else None)
        bos = tok.bos_token
        add_bos = False if bos and text.startswith(bos) else None
        return tok.encode(text, add_bos=add_bos, special=True, plain_spans=spans)
    if isinstance(tok, SentencePieceTokenizer):
        return mistral_instruct_ids(tok, msgs)
    text, spans = render_marked(tok, lambda m, t: chatml_text(m, add_generation_prompt), msgs)
    return tok.encode(text, special=True, plain_spans=spans)


@dataclass
class ChatPlan:
    """A chat request made ready to generate: the prompt ids, the grammar the reply follows (tool calls or a
    response format) and what parses the reply's tool calls."""

    ids: list[int]
    grammar: Grammar | None
    tok: Tokenizer
    fmt: str
    tools: list[Tool]
    choice: str | Tool

    def parser(self) -> ToolCallParser | None:
        """A fresh parser of tool calls for one choice (None when no tools are offered)."""
        return ToolCallParser(self.fmt, self.tok, self.tools) if self.tools and self.choice != "none" else None


def chat_plan(tok: Tokenizer, messages: list[dict], tools: Any = None, tool_choice: Any = None,
              parallel_tool_calls: bool | None = None, grammar: Any = None, response_format: Any = None) -> ChatPlan:
    """Validate a chat request's messages, tools and structured-output options and build its `ChatPlan`.
    ValueError (GrammarError for grammars) naming the problem."""
    parsed = parse_tools(tools)
    choice = parse_tool_choice(tool_choice, parsed)
    ids = apply_chat(tok, messages, tools=tools, tool_choice=tool_choice)
    fmt = call_format(tok)
    g_tools = tools_grammar(parsed, choice, parallel_tool_calls is not False, fmt, tok)
    g_user = grammar_of(grammar=grammar, response_format=response_format)
    if g_tools is not None and g_user is not None:
        raise GrammarError("response_format / grammar cannot be combined with tools (unless tool_choice is 'none')")
    return ChatPlan(ids, g_tools or g_user, tok, fmt, parsed, choice)
