"""Tool calls: a call, our grammar-enforced call format, and the messages a chat template
sees. Each chat-template family's own call syntax is a class in :mod:`tool_families`.

Two ways a call comes out of the model:

* ``tool_choice`` ``required`` or a named function: the sampler is held to a grammar made
  from the functions' JSON schemas (:func:`call_schema`, checked against the schema limits
  of limits.py), so even a small model writes a valid call. The format is ours,
  ``{"name": ..., "arguments": {...}}`` (a JSON array of them when ``required`` allows
  parallel calls; a named function is exactly one call, as OpenAI's); :class:`CallStream`
  turns it into OpenAI's streamed ``delta.tool_calls``, and :func:`forced_calls` reads the
  whole answer strictly: what is not the calls the grammar allows is an error, never
  content.
* ``auto``: the model writes what its chat template taught it; the template's family
  (:func:`tool_families.family_for`) reads that syntax. A template that knows no tools gets
  them in a system message asking for the Hermes syntax (as llama.cpp's generic format).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from llamafleet.common import protocol as P

# --- the grammar-enforced format ------------------------------------------------------------


def call_schema(tools: list[P.Tool], name: str | None, parallel: bool) -> dict[str, Any]:
    """The JSON schema of a call to ``name`` (or to any of ``tools``); an array of one or
    more calls when ``parallel`` and no ``name`` is forced (a named tool_choice is exactly
    one call).

    Each function's parameters sit under ``properties.arguments`` here, so their local
    ``$ref``s (``#/$defs/X``, as pydantic's ``model_json_schema`` writes them) would point
    at this schema's root: their ``$defs``/``definitions`` move to the root under names of
    their own, and the references follow."""
    chosen = [t.function for t in tools if name is None or t.function.name == name]
    defs: dict[str, Any] = {}
    calls = []
    for i, f in enumerate(chosen):
        arguments = _hoist_refs(f.parameters or {"type": "object"}, f"t{i}-", defs)
        calls.append({"type": "object",
                      "properties": {"name": {"const": f.name}, "arguments": arguments},
                      "required": ["name", "arguments"]})
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = {"type": "array", "items": one, "minItems": 1} if parallel and name is None \
        else dict(one)
    if defs:
        schema["$defs"] = defs
    return schema


_DEF_MAPS = ("$defs", "definitions")


def _hoist_refs(parameters: dict[str, Any], prefix: str, defs: dict[str, Any]) -> Any:
    """``parameters`` for a place below the root: its definitions go into ``defs`` as
    ``prefix`` + name, its ``#/...`` references are rewritten to match (any other pointer
    into ``parameters`` goes through ``defs[prefix + "root"]``, a copy of it). Distinct
    names per function: llama.cpp's converter names a rule after the last part of a
    reference, so two functions' same-named definitions would otherwise share one rule."""
    if not isinstance(parameters, dict):
        return parameters
    root_key = prefix + "root"

    def target(ref: str) -> str:
        parts = ref[2:].split("/")
        if len(parts) >= 2 and parts[0] in _DEF_MAPS:
            tag = "" if parts[0] == "$defs" else "d-"
            return "#/$defs/" + "/".join([prefix + tag + parts[1], *parts[2:]])
        return "#/$defs/" + "/".join([root_key, *parts])

    used_root = False

    def rewrite(node: Any) -> Any:
        nonlocal used_root
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and v.startswith("#/"):
                out[k] = target(v)
                used_root = used_root or out[k].startswith(f"#/$defs/{root_key}")
            elif k in ("const", "enum", "default", "examples"):
                out[k] = v  # JSON data, not schemas
            else:
                out[k] = rewrite(v)
        return out

    body = {k: v for k, v in parameters.items() if k not in _DEF_MAPS}
    for key in _DEF_MAPS:
        tag = "" if key == "$defs" else "d-"
        for def_name, sub in (parameters.get(key) or {}).items():
            defs[prefix + tag + def_name] = rewrite(sub)
    body = rewrite(body)
    if used_root:
        defs[root_key] = body
    return body


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class Call:
    name: str
    arguments: str  # JSON text

    def wire(self) -> P.ToolCall:
        return P.ToolCall(id=new_call_id(), function=P.FunctionCall(name=self.name,
                                                                     arguments=self.arguments))


class MalformedCalls(ValueError):
    """Grammar-enforced output that is not the calls the grammar allows (cut short)."""


def forced_calls(text: str, names: set[str], parallel: bool) -> list[Call]:
    """The calls in grammar-enforced output, read strictly: one call object (an array of
    one or more when ``parallel``), each a ``name`` among ``names`` and an ``arguments``
    object, nothing else. Raises :class:`MalformedCalls` otherwise (for instance when
    max_tokens cut the call: the grammar cannot end it early)."""
    try:
        value = json.loads(text)  # strict: raw control characters in strings are refused
    except ValueError as e:
        raise MalformedCalls(f"the call is not complete JSON ({e.msg})") from None
    if parallel and isinstance(value, list):
        items = value
        if not items:
            raise MalformedCalls("an empty list of calls")
    else:
        items = [value]
    calls = []
    for c in items:
        if not isinstance(c, dict) or set(c) != {"name", "arguments"}:
            raise MalformedCalls("a call must be an object with 'name' and 'arguments'")
        if c["name"] not in names:
            raise MalformedCalls(f"a call to {c['name']!r}, which was not offered")
        if not isinstance(c["arguments"], dict):
            raise MalformedCalls("a call's 'arguments' must be an object")
        calls.append(Call(c["name"], json.dumps(c["arguments"], ensure_ascii=False)))
    return calls


_HEAD = re.compile(r'[\s\[,}]*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


class CallStream:
    """Calls written as JSON objects, in pieces -> ``delta.tool_calls``: each call's name as
    soon as it is complete, then its arguments as they arrive. ``head`` matches what comes
    before a call's arguments (the separators and markers before the call, ``{"name": …,
    "arguments":``) and captures the name; by default the grammar-enforced format's. Text
    that ``head`` does not match (yet) is held: :attr:`calls` says how many calls began."""

    def __init__(self, head: re.Pattern[str] = _HEAD) -> None:
        self._head = head
        self._buf = ""
        self._index = -1
        self._in_args = False
        self._depth = 0
        self._in_str = False
        self._esc = False

    def feed(self, text: str) -> list[P.ToolCallDelta]:
        self._buf += text
        out: list[P.ToolCallDelta] = []
        while self._buf:
            if not self._in_args:
                m = self._head.match(self._buf)
                if m is None:
                    break  # the head is not complete yet (or only the closing "]" is left)
                self._index += 1
                self._in_args, self._depth = True, 0
                self._buf = self._buf[m.end():]
                out.append(P.ToolCallDelta(index=self._index, id=new_call_id(), type="function",
                                           function=P.FunctionCallDelta(
                                               name=json.loads(f'"{m.group(1)}"'))))
                continue
            end = self._scan()
            piece, self._buf = (self._buf, "") if end is None else (self._buf[:end],
                                                                    self._buf[end:])
            if piece:
                out.append(P.ToolCallDelta(index=self._index,
                                           function=P.FunctionCallDelta(arguments=piece)))
            if end is None:
                break
            self._in_args = False
        return out

    @property
    def calls(self) -> int:
        return self._index + 1

    def _scan(self) -> int | None:
        """Where the arguments value ends in the buffer (exclusive), or None."""
        for i, ch in enumerate(self._buf):
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif ch == "\\":
                    self._esc = True
                elif ch == '"':
                    self._in_str = False
            elif ch == '"':
                self._in_str = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return i + 1
        return None


# --- the chat templates' side --------------------------------------------------------------


def json_calls(text: str) -> list[Call]:
    """One JSON call object, or an array of them; "parameters" (Llama 3) or "arguments"."""
    value = json.loads(text)
    items = value if isinstance(value, list) else [value]
    calls = []
    for c in items:
        args = c.get("arguments", c.get("parameters", {}))
        if not isinstance(c.get("name"), str):
            raise ValueError("a call without a name")
        calls.append(Call(c["name"], args if isinstance(args, str)
                          else json.dumps(args, ensure_ascii=False)))
    return calls



def generic_tools_prompt(tools: list[P.Tool]) -> str:
    """The system text that tells a model whose template knows no tools how to call them."""
    listing = "\n".join(json.dumps(t.function.model_dump(exclude_none=True)) for t in tools)
    return ("You may call one or more of these functions:\n<tools>\n" + listing + "\n</tools>\n"
            "To call a function, answer with <tool_call>{\"name\": <function name>, "
            "\"arguments\": <arguments object>}</tool_call> for each call, and nothing else.")


def template_messages(messages: list[P.ChatMessage], native: bool,
                      tools: list[P.Tool] | None = None) -> list[dict[str, Any]]:
    """OpenAI messages as chat templates read them: a call's arguments as a mapping (HF
    templates write them with ``tojson``), tool results with their call id. Without
    ``native`` tool support, calls become Hermes text, results user turns, and ``tools``
    (those to offer) open the first user turn (some templates have no system role)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.text}
        if m.tool_calls:
            calls = [{"id": c.id, "type": "function",
                      "function": {"name": c.function.name,
                                   "arguments": _arguments(c.function.arguments)}}
                     for c in m.tool_calls]
            if native:
                d["tool_calls"] = calls
            else:
                d["content"] = (m.text + "".join(
                    "<tool_call>" + json.dumps(c["function"]) + "</tool_call>" for c in calls))
        if m.role == "tool":
            if native:
                d["tool_call_id"] = m.tool_call_id
                if m.name:
                    d["name"] = m.name
            else:
                d = {"role": "user", "content": f"<tool_response>\n{m.text}\n</tool_response>"}
        out.append(d)
    if tools and not native:
        first = next((d for d in out if d["role"] == "user"), None)
        if first is None:
            out.insert(0, {"role": "user", "content": generic_tools_prompt(tools)})
        else:
            first["content"] = generic_tools_prompt(tools) + "\n\n" + first["content"]
    return out


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
