"""Anthropic's Messages API (``POST /v1/messages``): its request -> the core's conversation,
the core's steps -> a ``message`` or its event stream (``message_start``,
``content_block_start``/``delta``/``stop``, ``message_delta``, ``message_stop``), and errors in
Anthropic's shape (``{"type": "error", "error": {"type", "message"}}``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi.responses import JSONResponse
from llamafleet.common import protocol as P
from llamafleet.common.errors import (
    BadRequest,
    LlamafleetError,
    encodable,
    mapping_for,
    retry_after,
)
from llamafleet.common.sampling import MaxTokens, SamplingParameters, Temperature, TopK, TopP
from pydantic import ConfigDict, Field, model_validator

from ..generation_core import Answer, Conversation, Done, Turn
from ..tool_families import CallDelta

UNSUPPORTED_MESSAGES = {
    "thinking": "thinking budgets are not supported; a thinking model's thoughts come as "
                "thinking blocks (choose with 'reasoning_format')",
    "service_tier": "service tiers are not supported",
    "container": "containers are not supported",
    "mcp_servers": "MCP servers are not supported",
    "context_management": "context management is not supported",
}

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               503: "overloaded_error"}


def error_body(e: LlamafleetError) -> dict:
    status = mapping_for(e).http_status
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"),
                                       "message": encodable(e.message)}}


def error_response(e: LlamafleetError) -> JSONResponse:
    headers = {"Retry-After": str(ra)} if (ra := retry_after(e)) is not None else {}
    return JSONResponse(error_body(e), status_code=mapping_for(e).http_status, headers=headers)


def error_event(e: LlamafleetError) -> bytes:
    return _event("error", error_body(e))


class _Wire(P._Wire):
    pass


class _Block(P.BaseModel):
    model_config = ConfigDict(extra="ignore")  # cache_control, citations: sent back as received


class TextBlock(_Block):
    type: Literal["text"]
    text: str


class ToolUseBlock(_Block):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


class ToolResultBlock(_Block):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] = ""
    is_error: bool = False

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)


class ThinkingBlock(_Block):
    """An earlier answer's thoughts, sent back: not shown to the model again."""

    type: Literal["thinking", "redacted_thinking"]


Block = TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock


class Message(_Wire):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Tool(_Wire):
    type: Literal["custom"] | None = None
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    input_schema: dict[str, Any]
    cache_control: dict | None = None


class ToolChoice(_Wire):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Metadata(_Wire):
    user_id: str | None = None


class MessagesRequest(_Wire):
    model: str | None = None
    max_tokens: MaxTokens
    messages: list[Message] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    stream: bool = False
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    metadata: Metadata | None = None
    reasoning_format: P.ReasoningFormat | None = Field(
        None, description="extension (llama-server's): where <think> text goes")

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        return P._refuse(P._refuse_surrogates(data), UNSUPPORTED_MESSAGES)

    @model_validator(mode="after")
    def _check(self) -> MessagesRequest:
        tc = self.tool_choice
        if tc is not None and tc.type == "tool":
            if not tc.name:
                raise ValueError("tool_choice type 'tool' needs a name")
            if tc.name not in {t.name for t in self.tools or []}:
                raise ValueError(f"tool_choice names '{tc.name}', which is not in tools")
        if tc is not None and tc.type in ("any", "tool") and not self.tools:
            raise ValueError("tool_choice needs tools")
        return self

    @property
    def mode(self) -> str:
        if not self.tools:
            return "none"
        tc = self.tool_choice
        return {None: "auto", "auto": "auto", "any": "required", "tool": "named",
                "none": "none"}[tc.type if tc else None]


def _messages(body: MessagesRequest) -> list[P.ChatMessage]:
    out: list[P.ChatMessage] = []
    if body.system:
        text = body.system if isinstance(body.system, str) else "".join(b.text for b in body.system)
        out.append(P.ChatMessage(role="system", content=text))
    for i, m in enumerate(body.messages):
        if isinstance(m.content, str):
            out.append(P.ChatMessage(role=m.role, content=m.content))
            continue
        text = "".join(b.text for b in m.content if isinstance(b, TextBlock))
        calls = [P.ToolCall(id=b.id, function=P.FunctionCall(name=b.name, arguments=json.dumps(b.input)))
                 for b in m.content if isinstance(b, ToolUseBlock)]
        results = [b for b in m.content if isinstance(b, ToolResultBlock)]
        if m.role == "assistant" and results:
            raise BadRequest(f"messages.{i}: tool_result blocks belong in a user message",
                             param=f"messages.{i}.content")
        for r in results:  # results first: they answer the previous turn's calls
            out.append(P.ChatMessage(role="tool", tool_call_id=r.tool_use_id,
                                     content=("Error: " if r.is_error else "") + r.text))
        if text or calls or not results:
            out.append(P.ChatMessage(role=m.role, content=text, tool_calls=calls or None))
    return out


def conversation(body: MessagesRequest) -> Conversation:
    mode = body.mode
    tools = [P.Tool(type="function", function=P.FunctionDef(
        name=t.name, description=t.description, parameters=t.input_schema))
        for t in body.tools or []]
    tc = body.tool_choice
    return Conversation(
        messages=_messages(body),
        sampling=SamplingParameters(max_tokens=body.max_tokens, temperature=body.temperature,
                                    top_p=body.top_p, top_k=body.top_k),
        tools=tools, tool_choice=mode, named_tool=tc.name if mode == "named" and tc else None,
        parallel_tool_calls=not (tc and tc.disable_parallel_tool_use),
        stop=tuple(body.stop_sequences or ()), stop_param="stop_sequences",
        reasoning_format=body.reasoning_format)


def _stop_reason(done: Done) -> str:
    reason = {"tool_calls": "tool_use", "length": "max_tokens"}.get(done.finish_reason)
    return reason or ("stop_sequence" if done.stop_sequence is not None else "end_turn")


def _stop_sequence(done: Done) -> str | None:
    """The stop sequence that ended the text (only when it is the stop reason)."""
    return done.stop_sequence if _stop_reason(done) == "stop_sequence" else None


def _event(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: ".encode() + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _input(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return {}


def _tool_id() -> str:
    return P.new_id("toolu").replace("-", "_")


class MessageView:
    """One message's wire shapes."""

    def __init__(self, body: MessagesRequest, model: str, prompt_tokens: int):
        self.body, self.model, self.prompt_tokens = body, model, prompt_tokens
        self.id = P.new_id("msg").replace("-", "_")

    def message(self, content: list[dict], done: Done | None) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": _stop_reason(done) if done else None,
                "stop_sequence": _stop_sequence(done) if done else None,
                "usage": {"input_tokens": done.prompt_tokens if done else self.prompt_tokens,
                          "output_tokens": done.completion_tokens if done else 0}}

    def whole(self, a: Answer) -> dict:
        content: list[dict] = []
        if a.reasoning is not None:
            content.append({"type": "thinking", "thinking": a.reasoning, "signature": ""})
        if a.content:
            content.append({"type": "text", "text": a.content})
        content += [{"type": "tool_use", "id": _tool_id(), "name": c.name, "input": _input(c.arguments)}
                    for c in a.calls]
        return self.message(content, a.done)

    async def frames(self, turn: Turn) -> AsyncIterator[bytes]:
        blocks = _BlockStream()
        first = True
        async for step in turn.steps():
            if first:
                yield _event("message_start", {"type": "message_start",
                                               "message": self.message([], None)})
                first = False
            if isinstance(step, Done):
                for frame in blocks.close():
                    yield frame
                yield _event("message_delta", {
                    "type": "message_delta",
                    "delta": {"stop_reason": _stop_reason(step),
                              "stop_sequence": _stop_sequence(step)},
                    "usage": {"output_tokens": step.completion_tokens}})
                yield _event("message_stop", {"type": "message_stop"})
                continue
            for frame in blocks.step(step.reasoning, step.content, step.calls):
                yield frame


class _BlockStream:
    """Content blocks as they open, grow and close; one open at a time."""

    def __init__(self) -> None:
        self.index = -1
        self._open: str | None = None

    def step(self, reasoning: str, content: str, calls: list[CallDelta]) -> list[bytes]:
        out: list[bytes] = []
        if reasoning:
            out += self._ensure("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(self._delta({"type": "thinking_delta", "thinking": reasoning}))
        if content:
            out += self._ensure("text", {"type": "text", "text": ""})
            out.append(self._delta({"type": "text_delta", "text": content}))
        for c in calls:
            if c.name is not None:
                out += self.close()
                out += self._ensure("tool_use", {"type": "tool_use", "id": _tool_id(),
                                                 "name": c.name, "input": {}})
            if c.arguments:
                out.append(self._delta({"type": "input_json_delta", "partial_json": c.arguments}))
        return out

    def _delta(self, delta: dict) -> bytes:
        return _event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                              "delta": delta})

    def _ensure(self, kind: str, block: dict) -> list[bytes]:
        if self._open == kind:
            return []
        out = self.close()
        self.index += 1
        self._open = kind
        out.append(_event("content_block_start", {"type": "content_block_start",
                                                  "index": self.index, "content_block": block}))
        return out

    def close(self) -> list[bytes]:
        if self._open is None:
            return []
        out = []
        if self._open == "thinking":
            out.append(self._delta({"type": "signature_delta", "signature": ""}))
        self._open = None
        out.append(_event("content_block_stop", {"type": "content_block_stop", "index": self.index}))
        return out
