"""OpenAI tool calling: the tools and tool_choice of a request, the prompt a model sees, the grammar its
calls are generated under, and the parser that turns its output into `tool_calls`.

Two call formats:

* "mistral" -- tokenizers with Mistral's control tokens ([AVAILABLE_TOOLS], [TOOL_CALLS], [TOOL_RESULTS]):
  the prompt is mistral-common's v3 encoding (levante.chat.mistral_tools_ids) and a call is the
  [TOOL_CALLS] token followed by a JSON array ``[{"name": ..., "arguments": {...}}]``;
* "hermes" -- every other model: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks (the
  format of Hermes / Qwen / SmolLM3 templates). A chat template that mentions ``<tool_call>`` gets the tools
  through its `tools` variable, as transformers passes them; any other template gets them through a system
  instruction (`fallback_messages`), assistant calls and tool results rewritten into that format.

The calls are always generated under a grammar (xgrammar structural tags, `tools_grammar`): with "auto" the
model writes text freely until it starts a call, then the call must be one of the tools with arguments valid
under its parameters schema; "required" and a named function allow nothing but calls. So the arguments always
parse and validate. tool_choice "none" leaves the tools out of the prompt.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

from .grammar import Grammar, GrammarError
from .tokenizer import CONTROL, Tokenizer

NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
OPEN, CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_TOKENS = ("[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict
    raw: dict = field(compare=False, hash=False)  # the OpenAI tool object, as given


def parse_tools(tools: Any) -> list[Tool]:
    """Validated OpenAI `tools` ([{"type": "function", "function": {"name", "description", "parameters"}}]);
    ValueError naming the problem."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ValueError("tools must be a list of {'type': 'function', 'function': {...}} objects")
    out, seen = [], set()
    for i, t in enumerate(tools):
        ok = isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(t.get("function"), dict)
        if not ok:
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}")
        f = t["function"]
        name = f.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError(f"tools[{i}].function.name must match [a-zA-Z0-9_-]{{1,64}}, got {name!r}")
        if name in seen:
            raise ValueError(f"tools[{i}]: duplicate function name {name!r}")
        seen.add(name)
        desc = f.get("description", "")
        if not isinstance(desc, str):
            raise ValueError(f"tools[{i}].function.description must be a string")
        params = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        out.append(Tool(name, desc, params, {"type": "function", "function": dict(f)}))
    return out


def parse_tool_choice(choice: Any, tools: list[Tool]) -> str | Tool:
    """"none" | "auto" | "required" | the named Tool (OpenAI's tool_choice; default: auto with tools, none
    without)."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or a function, got {choice!r}")
        if choice != "none" and not tools:
            raise ValueError(f"tool_choice {choice!r} needs tools")
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        for t in tools:
            if t.name == name:
                return t
        raise ValueError(f"tool_choice names the function {name!r}, which is not in tools")
    raise ValueError("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name'}}")


def call_format(tok: Tokenizer) -> str:
    """"mistral" for tokenizers with Mistral's tool control tokens, else "hermes"."""
    ids = [tok.piece_to_id(p) for p in MISTRAL_TOKENS]
    if all(i is not None and tok.token_types[i] == CONTROL for i in ids):
        return "mistral"
    return "hermes"


def template_takes_tools(template: str | None) -> bool:
    """Whether a chat template renders `tools` and writes calls as <tool_call> blocks itself."""
    return bool(template) and "tools" in template and OPEN in template


def new_call_id(fmt: str) -> str:
    """A tool call id: 9 alphanumerics for Mistral (what mistral-common accepts), else OpenAI-style."""
    alphabet = string.ascii_letters + string.digits
    if fmt == "mistral":
        return "".join(secrets.choice(alphabet) for _ in range(9))
    return "call_" + "".join(secrets.choice(alphabet) for _ in range(24))


def arguments_text(args: Any) -> str:
    """A call's arguments as the JSON text OpenAI's `function.arguments` holds."""
    if isinstance(args, str):
        return args
    return json.dumps(args, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------- the prompt
def fallback_instruction(tools: list[Tool], choice: str | Tool) -> str:
    """The system instruction that tells a model without tool support about the tools (hermes format)."""
    specs = json.dumps([t.raw for t in tools], ensure_ascii=False)
    how = ("You must call one or more of them" if choice == "required" else
           f"You must call the function {choice.name}" if isinstance(choice, Tool) else
           "When a function helps, call it")
    return (f"You can call functions. Their JSON schemas: {specs}\n{how}: reply with\n{OPEN}\n"
            '{"name": <function name>, "arguments": <arguments as a JSON object>}\n'
            f"{CLOSE}\nfor each call, and nothing else. Function results come back as <tool_response> blocks.")


def fallback_messages(messages: list[dict], tools: list[Tool], choice: str | Tool) -> list[dict]:
    """`messages` for a template without tool support: the tools in the system message, assistant calls as
    <tool_call> blocks, tool results as user messages in <tool_response> blocks; consecutive messages of one
    role joined (templates that require alternating roles)."""
    out: list[dict] = []
    if tools and choice != "none":
        out.append({"role": "system", "content": fallback_instruction(tools, choice)})
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "assistant" and m.get("tool_calls"):
            blocks = [f"{OPEN}\n" + json.dumps({"name": c["function"]["name"],
                                                 "arguments": c["function"]["arguments"]}, ensure_ascii=False)
                      + f"\n{CLOSE}" for c in m["tool_calls"]]
            content = "\n".join(([content] if content else []) + blocks)
        elif role == "tool":
            role, content = "user", f"<tool_response>\n{content}\n</tool_response>"
        if out and out[-1]["role"] == role:
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n\n" + content}
        else:
            out.append({"role": role, "content": content})
    return out


# ---------------------------------------------------------------------------------------------- the grammar
def _call_schema(t: Tool) -> dict:
    return {"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"], "additionalProperties": False}


def tools_grammar(tools: list[Tool], choice: str | Tool, parallel: bool, fmt: str,
                  tok: Tokenizer) -> Grammar | None:
    """The structural-tag grammar the output follows (None for tool_choice "none")."""
    if choice == "none" or not tools:
        return None
    chosen = [choice] if isinstance(choice, Tool) else tools
    must = choice != "auto"
    if fmt == "mistral":
        calls = {"type": "array", "items": {"anyOf": [_call_schema(t) for t in chosen]}, "minItems": 1}
        if not parallel:
            calls["maxItems"] = 1
        trigger = tok.piece_to_id("[TOOL_CALLS]")
        tag = {"type": "tag", "begin": {"type": "token", "token": trigger},
               "content": {"type": "sequence", "elements": [{"type": "const_string", "value": " "},
                                                             {"type": "json_schema", "json_schema": calls}]},
               "end": ""}
        fmt_spec = {"type": "token_triggered_tags", "trigger_tokens": [trigger], "tags": [tag],
                    "at_least_one": must, "stop_after_first": True}
    else:
        tags = [{"type": "tag", "begin": f'{OPEN}\n{{"name": "{t.name}", "arguments": ',
                 "content": {"type": "json_schema", "json_schema": t.parameters}, "end": f"}}\n{CLOSE}"}
                for t in chosen]
        if must:
            fmt_spec = {"type": "tags_with_separator", "tags": tags, "separator": "\n", "at_least_one": True,
                        "stop_after_first": not parallel}
        else:
            fmt_spec = {"type": "triggered_tags", "triggers": [OPEN], "tags": tags, "at_least_one": False,
                        "stop_after_first": not parallel}
    return Grammar.structural_tag({"type": "structural_tag", "format": fmt_spec})


# ---------------------------------------------------------------------------------------------- the output
@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text

    def openai(self, index: int | None = None) -> dict:
        d = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return d if index is None else {"index": index, **d}


class ToolCallParser:
    """Splits a model's streamed output into content text and tool calls.

    `push(text, token)` per generated token returns the content that is safe to show now and the calls that
    just completed; `finish()` the rest. Text that could be the start of a call is held back until it is
    known not to be one."""

    def __init__(self, fmt: str, tok: Tokenizer, tools: list[Tool]) -> None:
        self.fmt, self.tools = fmt, {t.name: t for t in tools}
        self.trigger = tok.piece_to_id("[TOOL_CALLS]") if fmt == "mistral" else None
        self.buf = ""  # text not yet shown (hermes) / the calls' JSON (mistral)
        self.pending_space = ""  # whitespace held back (hermes)
        self.in_calls = False
        self.calls: list[ToolCall] = []

    def push(self, text: str, token: int | None = None) -> tuple[str, list[ToolCall]]:
        if self.fmt == "mistral":
            if token is not None and token == self.trigger:
                self.in_calls = True
                return "", []
            if self.in_calls:
                self.buf += text
                return "", []
            return text, []
        self.buf += text
        out, done = [], []
        while True:
            if self.in_calls:
                end = self.buf.find(CLOSE)
                if end < 0:
                    break
                done.append(self._call(self.buf[:end]))
                self.buf = self.buf[end + len(CLOSE):]
                self.in_calls = False
            else:
                start = self.buf.find(OPEN)
                if start >= 0:
                    out.append(self._text(self.buf[:start], before_call=True))
                    self.buf = self.buf[start + len(OPEN):]
                    self.in_calls = True
                    continue
                keep = _partial_suffix(self.buf, OPEN)
                out.append(self._text(self.buf[: len(self.buf) - keep], before_call=False))
                self.buf = self.buf[len(self.buf) - keep:]
                break
        self.calls += done
        return "".join(out), done

    def _text(self, text: str, before_call: bool) -> str:
        """Content text to show: whitespace is held back until more text follows (the separators around calls
        are not content); text right before a call loses its trailing whitespace."""
        text = self.pending_space + text
        self.pending_space = ""
        if before_call:
            return text.rstrip()
        body = text.rstrip()
        self.pending_space = text[len(body):]
        return body

    def finish(self) -> tuple[str, list[ToolCall]]:
        if self.fmt == "mistral":
            if not self.in_calls:
                return "", []
            try:
                items = json.loads(self.buf)
            except json.JSONDecodeError:  # cut off by max_tokens: no complete call
                return "", []
            done = [self._call(json.dumps(it, ensure_ascii=False)) for it in (items if isinstance(items, list)
                                                                              else [items])]
            self.calls += done
            return "", done
        rest, self.buf = self.buf, ""
        if self.in_calls:  # a call cut off by max_tokens: dropped, it is neither content nor a call
            return "", []
        tail = self._text(rest, before_call=False)
        return (tail if self.calls else tail + self.pending_space), []

    def _call(self, text: str) -> ToolCall:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise GrammarError(f"the model's tool call is not valid JSON: {e}") from None
        name = obj.get("name") if isinstance(obj, dict) else None
        if name not in self.tools:
            raise GrammarError(f"the model called an unknown function {name!r}")
        args = obj.get("arguments", obj.get("parameters", {}))
        return ToolCall(new_call_id(self.fmt), name, arguments_text(args))


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class ChatOutput:
    """One choice's token events -> an OpenAI chat message (content, tool_calls) or stream deltas."""

    def __init__(self, parser: ToolCallParser | None) -> None:
        self.parser = parser
        self.content: list[str] = []
        self.calls: list[ToolCall] = []

    def _deltas(self, text: str, done: list[ToolCall]) -> list[dict]:
        out = []
        if text:
            self.content.append(text)
            out.append({"content": text})
        for c in done:
            out.append({"tool_calls": [c.openai(len(self.calls))]})
            self.calls.append(c)
        return out

    def push(self, ev) -> list[dict]:
        """The deltas a `TokenEvent` releases (content text, completed calls)."""
        if self.parser is None:
            return self._deltas(ev.text, [])
        if ev.stop_token:
            return []
        return self._deltas(*self.parser.push(ev.text, ev.token))

    def finish(self) -> list[dict]:
        """The deltas left at the end (held-back text; Mistral's calls, complete only at the end)."""
        return self._deltas(*self.parser.finish()) if self.parser is not None else []

    def message(self) -> dict:
        text = "".join(self.content)
        msg: dict[str, Any] = {"role": "assistant", "content": (text or None) if self.calls else text}
        if self.calls:
            msg["tool_calls"] = [c.openai() for c in self.calls]
        return msg

    def finish_reason(self, reason: str | None) -> str | None:
        return "tool_calls" if self.calls else reason
