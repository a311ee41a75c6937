"""Tool-call formats as classes: one per chat-template family, plus the grammar-enforced one.

Each format holds its grammar (the JSON schema that forced calls are held to), a full-answer
parser (:meth:`parse`) and a streaming parser (:meth:`stream`, an object with
``feed()``/``finish()`` that turns the model's text into :class:`TextOut` and
:class:`CallDelta` pieces as it arrives), in one shape that every front door can use. Our own
JSON call format, its grammar and strict parser are in :mod:`tool_calls`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

from llamafleet.common import protocol as P

from . import tool_calls
from .reasoning import partial_suffix
from .tool_calls import Call, json_calls


@dataclass
class TextOut:
    """Answer text that is no call (content)."""

    text: str


@dataclass
class CallDelta:
    """A piece of call ``index``: its start (``id`` and ``name``) or some of its arguments."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


Piece = TextOut | CallDelta

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)
_FENCE = re.compile(r"```(?:json|tool_code|tool_call)?\s*(.*?)\s*```", re.S)


def call_pieces(calls: list[Call], first: int = 0) -> list[CallDelta]:
    """Whole calls as stream pieces: each call's name first, then its arguments."""
    out: list[CallDelta] = []
    for i, c in enumerate(calls, first):
        out.append(CallDelta(i, id=tool_calls.new_call_id(), name=c.name))
        out.append(CallDelta(i, arguments=c.arguments))
    return out


class ToolFamily:
    """A chat-template family's own call syntax (``tool_choice: auto``)."""

    name: ClassVar[str] = "generic"
    template_marker: ClassVar[str] = "\x00"  # what the template's source text holds
    # A regex of the markers around and between calls (besides blanks and JSON's [ , ] }),
    # which the streaming parser skips.
    call_markers: ClassVar[str] = r"</?tool_call>"
    renders_tools: ClassVar[bool] = True  # its templates can render ``tools`` themselves
    knows_tools: bool = True  # this template renders ``tools`` itself

    def call_schema(self, offered: list[P.Tool], named: str | None, parallel: bool) -> dict[str, Any]:
        """The grammar (as a JSON schema) that required or named calls are held to: the
        same JSON call format for every family (small models write it reliably)."""
        return tool_calls.call_schema(offered, named, parallel)

    def parse(self, text: str) -> tuple[str | None, list[Call]]:
        """The content and the calls of a whole answer; text that is no valid call stays content."""
        try:
            found = self._calls(text)
        except (ValueError, AttributeError, TypeError):
            found = None
        return found if found is not None else (text, [])

    def _calls(self, text: str) -> tuple[str | None, list[Call]] | None:
        """This syntax's rule: (content, calls), or None when ``text`` holds no call."""
        found = _HERMES.findall(text)
        if not found:
            return None
        content = text[: text.index("<tool_call>")].strip()
        return content or None, [c for body in found for c in json_calls(body)]

    def call_start(self, text: str, at_start: bool) -> tuple[int | None, int]:
        """Where a call begins in ``text`` (None: not yet), and how many characters at its
        end to hold back (they may begin one). ``at_start``: ``text`` opens the answer."""
        marker = "<tool_call>"
        at = text.find(marker)
        return (at, 0) if at >= 0 else (None, partial_suffix(text, marker))

    def stream(self, parallel: bool = True) -> AutoCalls:
        return AutoCalls(self, parallel)

    @classmethod
    def call_head(cls) -> re.Pattern[str]:
        """What comes before a call's arguments object, in this family's syntax: markers and
        separators, then ``{"name": "<name>", "arguments"|"parameters": `` and the ``{``
        that opens them (arguments written as a JSON string do not stream)."""
        return _call_head(cls.call_markers)


class Hermes(ToolFamily):
    """Hermes 2/3, Qwen 2.5/3: ``<tool_call>{"name": …, "arguments": …}</tool_call>``."""

    name = "hermes"
    template_marker = "<tool_call>"


class Mistral(ToolFamily):
    """``[TOOL_CALLS] [{"name": …, "arguments": …}]``."""

    name = "mistral"
    template_marker = "[TOOL_CALLS]"
    call_markers = r"\[TOOL_CALLS\]"

    def _calls(self, text: str) -> tuple[str | None, list[Call]] | None:
        head, sep, rest = text.partition("[TOOL_CALLS]")
        return (head.strip() or None, json_calls(rest.strip())) if sep else None

    def call_start(self, text: str, at_start: bool) -> tuple[int | None, int]:
        at = text.find("[TOOL_CALLS]")
        return (at, 0) if at >= 0 else (None, partial_suffix(text, "[TOOL_CALLS]"))


class Llama3(ToolFamily):
    """Llama 3.x: the whole answer is ``{"name": …, "parameters": …}`` (after an optional
    ``<|python_tag|>``), calls separated by ``;``."""

    name = "llama3"
    template_marker = "<|start_header_id|>"
    call_markers = r"<\|python_tag\|>"

    def _calls(self, text: str) -> tuple[str | None, list[Call]] | None:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return None
        return None, [c for part in body.split(";") if part.strip() for c in json_calls(part)]

    def call_start(self, text: str, at_start: bool) -> tuple[int | None, int]:
        if not at_start:
            return None, 0
        body = text.lstrip()
        if not body:
            return None, len(text)  # only blanks so far: undecided
        tag = "<|python_tag|>"
        if body.startswith(("{", tag)):
            return 0, 0
        if tag.startswith(body):
            return None, len(text)
        return None, 0


class Gemma(ToolFamily):
    """Gemma: a JSON call, bare or in a ```json fence. Its templates render no tools: they
    are offered in the first user turn."""

    name = "gemma"
    template_marker = "<start_of_turn>"
    call_markers = r"```(?:json|tool_code|tool_call)?"
    renders_tools = False

    def _calls(self, text: str) -> tuple[str | None, list[Call]] | None:
        m = _FENCE.search(text)
        body = m.group(1) if m else text.strip()
        if not body.startswith(("{", "[")):
            return None
        content = text[: m.start()].strip() if m else ""
        return content or None, json_calls(body)

    def call_start(self, text: str, at_start: bool) -> tuple[int | None, int]:
        at = text.find("```")
        if at >= 0:
            return at, 0
        if at_start:
            body = text.lstrip()
            if not body:
                return None, len(text)
            if body.startswith(("{", "[")):
                return 0, 0
        return None, partial_suffix(text, "```")


class Generic(ToolFamily):
    """A template that knows no tool syntax: offered tools and the Hermes syntax are
    described in the first user turn (as llama.cpp's generic format)."""

    name = "generic"


# Checked in this order: Hermes-style templates of Llama models carry both <tool_call> and
# Llama's header tokens.
FAMILIES: tuple[type[ToolFamily], ...] = (Hermes, Mistral, Llama3, Gemma)
BY_NAME: dict[str, type[ToolFamily]] = {cls.name: cls for cls in (*FAMILIES, Generic)}


@cache
def _call_head(markers: str) -> re.Pattern[str]:
    return re.compile(r'(?:\s|[\[\],;}]|' + markers + r')*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"'
                      r'\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')


def family_for(template: str) -> ToolFamily:
    """The family whose marker the template's source holds (in this order: Hermes-style
    templates of Llama models carry both), else :class:`Generic`."""
    fam: ToolFamily = next((cls() for cls in FAMILIES if cls.template_marker in template),
                           Generic())
    fam.knows_tools = fam.renders_tools and "tools" in template
    return fam


class AutoCalls:
    """The streaming parser of ``tool_choice: auto``: text before a call goes out as it
    comes (less what may begin a call marker); from a call's start, each call's name goes
    out once it is complete, then its arguments as they are written. A call the stream
    cannot read (keys in another order, arguments as a string) comes whole at the end from
    the family's full-answer parser; text from a call marker on that turns out to be no
    call at all is content."""

    def __init__(self, family: ToolFamily, parallel: bool):
        self.family, self.parallel = family, parallel
        self._pending = ""  # not yet sent: may begin a call
        self._sent = ""  # content already sent
        self._call: str | None = None  # from the call's start on
        self._reader = tool_calls.CallStream(family.call_head())

    def feed(self, text: str) -> list[Piece]:
        if self._call is not None:
            self._call += text
            return self._read(text)
        self._pending += text
        at, hold = self.family.call_start(self._pending, at_start=not self._sent)
        if at is not None:
            out, self._call, self._pending = self._pending[:at], self._pending[at:], ""
            self._sent += out
            return ([TextOut(out)] if out else []) + self._read(self._call)
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        self._sent += out
        return [TextOut(out)] if out else []

    def _read(self, text: str) -> list[Piece]:
        return [CallDelta(d.index, d.id, d.function.name, d.function.arguments or "")
                for d in self._reader.feed(text) if self.parallel or d.index == 0]

    def finish(self) -> list[Piece]:
        if self._call is None:
            return [TextOut(self._pending)] if self._pending else []
        _, calls = self.family.parse(self._sent + self._call)
        streamed = self._reader.calls
        if not streamed:
            if not calls:
                return [TextOut(self._call)]
            return call_pieces(calls if self.parallel else calls[:1])
        # Calls after the streamed ones that the stream could not read.
        return call_pieces(calls[streamed:], streamed) if self.parallel else []


class ForcedCalls:
    """The grammar-enforced format (``tool_choice`` required or named), read as it streams
    (each call's name once complete, then its arguments) and strictly at the end."""

    def __init__(self, names: set[str], parallel: bool):
        self.names, self.parallel = names, parallel
        self._stream = tool_calls.CallStream()
        self._text: list[str] = []

    def feed(self, text: str) -> list[Piece]:
        self._text.append(text)
        return [CallDelta(d.index, d.id, d.function.name, d.function.arguments)
                for d in self._stream.feed(text)]

    def finish(self) -> list[Piece]:
        """Checks the whole answer; raises :class:`tool_calls.MalformedCalls` if it is not the calls."""
        tool_calls.forced_calls("".join(self._text), self.names, self.parallel)
        return []

    def parse(self, text: str) -> list[Call]:
        return tool_calls.forced_calls(text, self.names, self.parallel)


class PlainText:
    """No tools: every piece is content."""

    def feed(self, text: str) -> list[Piece]:
        return [TextOut(text)] if text else []

    def finish(self) -> list[Piece]:
        return []
