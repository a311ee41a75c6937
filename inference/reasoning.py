"""Reasoning output: a model's ``<think>…</think>`` text, split from its answer as it streams.

The names of ``reasoning_format`` are llama-server's: ``none`` leaves the thoughts in the
content as the model wrote them; ``deepseek`` (and ``auto``, the default) moves them to
the front door's reasoning field (``reasoning_content``, a reasoning item, a thinking block);
``deepseek-legacy`` moves them in whole answers and leaves them in the content, in their
tags, when streamed (:class:`ThinkSplit` ``inline``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import get_args

from llamafleet.common.errors import BadRequest
from llamafleet.common.protocol import ReasoningFormat

REASONING_FORMATS: tuple[str, ...] = get_args(ReasoningFormat)
OPEN, CLOSE = "<think>", "</think>"


def check_format(value: str | None, param: str = "reasoning_format") -> None:
    if value is not None and value not in REASONING_FORMATS:
        raise BadRequest(f"{param} must be one of {', '.join(REASONING_FORMATS)}, got {value!r}",
                         param=param)


@dataclass
class ReasoningOut:
    text: str


def partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that begins ``marker``: what a streaming
    parser holds back, since the next piece may complete the marker (think tags here, call
    markers in tool_families)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ThinkSplit:
    """Text in pieces -> ("reasoning" | "content", text) pieces. Thoughts open the answer:
    with ``<think>`` (after blanks), or at once when the prompt already opened them (the
    template ended the generation prompt with ``<think>``). ``inline`` (deepseek-legacy,
    streamed): everything is content, with the ``<think>`` that the prompt opened."""

    def __init__(self, opened: bool = False, inline: bool = False):
        self._state = "think" if opened else "start"
        self._buf = ""
        # deepseek-legacy, streamed: what to put before the first piece (None: split)
        self._inline = (OPEN if opened else "") if inline else None

    def feed(self, text: str) -> list[tuple[str, str]]:
        if self._inline is not None:
            text, self._inline = self._inline + text, ""
            return [("content", text)] if text else []
        self._buf += text
        out: list[tuple[str, str]] = []
        while self._buf:
            if self._state == "start":
                body = self._buf.lstrip()
                if body.startswith(OPEN):
                    self._buf, self._state = body[len(OPEN):].lstrip("\n"), "think"
                    continue
                if not body or OPEN.startswith(body):
                    break  # undecided
                self._state = "content"
            if self._state == "think":
                at = self._buf.find(CLOSE)
                if at >= 0:
                    if at:
                        out.append(("reasoning", self._buf[:at]))
                    self._buf, self._state = self._buf[at + len(CLOSE):], "gap"
                    continue
                cut = len(self._buf) - partial_suffix(self._buf, CLOSE)
                if cut:
                    out.append(("reasoning", self._buf[:cut]))
                self._buf = self._buf[cut:]
                break
            if self._state == "gap":  # the blanks between thoughts and answer are neither
                self._buf = self._buf.lstrip()
                if not self._buf:
                    break
                self._state = "content"
            out.append(("content", self._buf))
            self._buf = ""
        return out

    def finish(self) -> list[tuple[str, str]]:
        rest, self._buf = self._buf, ""
        if not rest or self._state == "gap":
            return []
        return [("reasoning" if self._state == "think" else "content", rest)]


def split(text: str, opened: bool = False) -> tuple[str | None, str]:
    """A whole answer's reasoning (None when it has none) and its content."""
    s = ThinkSplit(opened)
    parts = s.feed(text) + s.finish()
    reasoning = "".join(t for k, t in parts if k == "reasoning")
    content = "".join(t for k, t in parts if k == "content")
    thought = opened or any(k == "reasoning" for k, _ in parts)
    return (reasoning if thought else None), content
