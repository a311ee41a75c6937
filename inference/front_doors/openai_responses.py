"""OpenAI's Responses API (``POST /v1/responses``), stateless: its request -> the core's
conversation, the core's steps -> a ``response`` object or the documented event stream
(``response.created`` … ``response.output_text.delta`` / ``response.function_call_arguments.delta``
… ``response.completed``, with usage).

Nothing is stored: ``previous_response_id``, ``store: true`` and the other fields a stateless
server cannot honour are refused with a 400 that names them (:data:`UNSUPPORTED_RESPONSES`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from llamafleet.common import protocol as P
from llamafleet.common.errors import BadRequest, LlamafleetError, mapping_for
from llamafleet.common.sampling import MaxTokens, SamplingParameters, Temperature, TopP
from pydantic import ConfigDict, Field, model_validator

from ..generation_core import Answer, Conversation, Done, Turn
from ..tool_families import CallDelta

UNSUPPORTED_RESPONSES = {
    "previous_response_id": "responses are not stored (stateless server); send the whole "
                            "conversation in 'input'",
    "conversation": "conversations are not stored (stateless server); send them in 'input'",
    "store": "responses are not stored (stateless server); set store to false",
    "background": "background responses are not supported",
    "prompt": "stored prompt templates are not supported",
    "include": "no extra output data is available to include",
    "reasoning": "reasoning options are not supported; choose with 'reasoning_format'",
    "service_tier": "service tiers are not supported",
    "metadata": "metadata is kept only with stored responses, which are not supported",
    "top_logprobs": "logprobs are not supported on /v1/responses; use /v1/chat/completions",
    "max_tool_calls": "max_tool_calls is not supported",
    "prompt_cache_key": "prompt caching is automatic (shared prefixes are reused); no key",
    "prompt_cache_retention": "prompt caching is automatic; no retention setting",
    "safety_identifier": "safety identifiers are not supported",
    "context_management": "context management is not supported",
}


class _Wire(P._Wire):
    pass


class _Echo(P.BaseModel):
    """An item a client sends back as it received it: fields we do not use are dropped."""

    model_config = ConfigDict(extra="ignore")


class InputText(_Echo):
    type: Literal["input_text", "output_text"]
    text: str


class MessageItem(_Echo):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[InputText]

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class FunctionCallItem(_Echo):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(_Echo):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[InputText]


class ReasoningItem(_Echo):
    """An earlier answer's thoughts, sent back: not shown to the model again (as chat
    templates drop earlier turns' thoughts)."""

    type: Literal["reasoning"]


InputItem = MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem


class FunctionTool(_Wire):
    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunction(_Wire):
    type: Literal["function"]
    name: str


class TextFormat(_Wire):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("text.format type 'json_schema' needs a schema")
        return self


class TextConfig(_Wire):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None


class ResponsesRequest(_Wire):
    model: str | None = None
    input: str | list[InputItem] = Field(min_length=1)
    instructions: str | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    max_output_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stream: bool = False
    truncation: Literal["disabled"] | None = None
    user: str | None = None
    reasoning_format: P.ReasoningFormat | None = Field(
        None, description="extension (llama-server's): where <think> text goes")

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        return P._refuse(P._refuse_surrogates(data), UNSUPPORTED_RESPONSES)

    @model_validator(mode="after")
    def _check(self) -> ResponsesRequest:
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedFunction) and self.tools and \
                self.tool_choice.name not in {t.name for t in self.tools}:
            raise ValueError(f"tool_choice names '{self.tool_choice.name}', which is not in tools")
        fmt = self.text.format if self.text else None
        if fmt and fmt.type != "text" and self.mode not in ("none", "auto"):
            raise ValueError("text.format cannot be combined with a required or named tool_choice")
        return self

    @property
    def mode(self) -> str:
        if not self.tools:
            return "none"
        if self.tool_choice is None:
            return "auto"
        return "named" if isinstance(self.tool_choice, NamedFunction) else self.tool_choice


def _messages(body: ResponsesRequest) -> list[P.ChatMessage]:
    out: list[P.ChatMessage] = []
    if body.instructions:
        out.append(P.ChatMessage(role="system", content=body.instructions))
    items = [MessageItem(role="user", content=body.input)] if isinstance(body.input, str) \
        else body.input
    for item in items:
        if isinstance(item, MessageItem):
            out.append(P.ChatMessage(role=item.role, content=item.text))
        elif isinstance(item, FunctionCallItem):
            call = P.ToolCall(id=item.call_id, function=P.FunctionCall(name=item.name,
                                                                       arguments=item.arguments))
            if out and out[-1].role == "assistant":
                out[-1].tool_calls = [*(out[-1].tool_calls or []), call]
            else:
                out.append(P.ChatMessage(role="assistant", content=None, tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputItem):
            text = item.output if isinstance(item.output, str) else "".join(p.text for p in item.output)
            out.append(P.ChatMessage(role="tool", tool_call_id=item.call_id, content=text))
    if not any(m.role in ("user", "assistant", "tool") for m in out):
        raise BadRequest("input must contain at least one user message", param="input")
    return out


def conversation(body: ResponsesRequest) -> Conversation:
    fmt = body.text.format if body.text else None
    mode = body.mode
    tools = [P.Tool(type="function", function=P.FunctionDef(
        name=t.name, description=t.description, parameters=t.parameters, strict=t.strict))
        for t in body.tools or []]
    return Conversation(
        messages=_messages(body),
        sampling=SamplingParameters(max_tokens=body.max_output_tokens, temperature=body.temperature,
                                    top_p=body.top_p),
        tools=tools, tool_choice=mode,
        named_tool=body.tool_choice.name if mode == "named" else None,  # type: ignore[union-attr]
        parallel_tool_calls=body.parallel_tool_calls,
        json_schema=fmt.schema_ if fmt and fmt.type == "json_schema" else None,
        json_object=bool(fmt and fmt.type == "json_object"), schema_param="text.format",
        max_tokens_param="max_output_tokens", reasoning_format=body.reasoning_format)


def _usage(done: Done) -> dict:
    return {"input_tokens": done.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": done.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def _message(item_id: str, text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [_text_part(text)] if status == "completed" else []}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _reasoning(item_id: str, text: str) -> dict:
    return {"type": "reasoning", "id": item_id, "summary": [],
            "content": [{"type": "reasoning_text", "text": text}], "status": "completed"}


def _call(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def error_event(e: LlamafleetError) -> bytes:
    """An error after the stream began: the ``error`` event."""
    m = mapping_for(e)
    return _event("error", {"code": e.code or m.default_code or m.openai_type,
                            "message": e.message, "param": e.param})


def _event(kind: str, data: dict, seq: int = 0) -> bytes:
    data = {"type": kind, **data, "sequence_number": seq}
    return f"event: {kind}\ndata: ".encode() + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


class ResponseView:
    """One response's wire shapes."""

    def __init__(self, body: ResponsesRequest, model: str):
        self.body, self.model = body, model
        self.id, self.created = P.new_id("resp").replace("-", "_"), P.now()
        self._seq = 0

    def response(self, output: list[dict], done: Done | None) -> dict:
        b = self.body
        status = "in_progress" if done is None else \
            "incomplete" if done.reason == "length" else "completed"
        tool_choice = b.tool_choice.model_dump() if isinstance(b.tool_choice, NamedFunction) \
            else (b.tool_choice or "auto")
        fmt = b.text.format.model_dump(by_alias=True, exclude_none=True) \
            if b.text and b.text.format else {"type": "text"}
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.model, "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens,
            "parallel_tool_calls": b.parallel_tool_calls, "previous_response_id": None,
            "reasoning": None, "store": False, "temperature": b.temperature, "top_p": b.top_p,
            "text": {"format": fmt}, "tool_choice": tool_choice,
            "tools": [t.model_dump() for t in b.tools or []], "truncation": "disabled",
            "user": b.user, "metadata": {},
            "usage": _usage(done) if done is not None else None,
        }

    def whole(self, a: Answer) -> dict:
        output = []
        if a.reasoning is not None:
            output.append(_reasoning(P.new_id("rs").replace("-", "_"), a.reasoning))
        if a.content:
            output.append(_message(P.new_id("msg").replace("-", "_"), a.content))
        for c in a.calls:
            w = c.wire()
            output.append(_call(P.new_id("fc").replace("-", "_"), w.id, c.name, c.arguments))
        return self.response(output, a.done)

    def event(self, kind: str, **data: Any) -> bytes:
        self._seq += 1
        return _event(kind, data, self._seq)

    async def frames(self, turn: Turn) -> AsyncIterator[bytes]:
        stream = _ItemStream(self)
        first = True
        async for step in turn.steps():
            if first:
                yield self.event("response.created", response=self.response([], None))
                yield self.event("response.in_progress", response=self.response([], None))
                first = False
            if isinstance(step, Done):
                for frame in stream.close():
                    yield frame
                kind = "response.incomplete" if step.reason == "length" else "response.completed"
                yield self.event(kind, response=self.response(stream.output, step))
                continue
            for frame in stream.step(step.reasoning, step.content, step.calls):
                yield frame


class _ItemStream:
    """Output items as they open, grow and close; one open at a time."""

    def __init__(self, view: ResponseView):
        self.view = view
        self.output: list[dict] = []
        self._open: dict | None = None
        self._text = ""

    def step(self, reasoning: str, content: str, calls: list[CallDelta]) -> list[bytes]:
        out: list[bytes] = []
        if reasoning:
            out += self._ensure("reasoning")
            out.append(self._delta("response.reasoning_text.delta", reasoning))
        if content:
            out += self._ensure("message")
            out.append(self._delta("response.output_text.delta", content))
        for c in calls:
            if c.name is not None:
                out += self._ensure("function_call", c)
            if c.arguments:
                out.append(self._delta("response.function_call_arguments.delta", c.arguments))
        return out

    def _delta(self, kind: str, text: str) -> bytes:
        self._text += text
        assert self._open is not None
        extra = {"content_index": 0} if kind != "response.function_call_arguments.delta" else {}
        if kind == "response.output_text.delta":
            extra["logprobs"] = []
        return self.view.event(kind, item_id=self._open["id"], output_index=len(self.output),
                               delta=text, **extra)

    def _ensure(self, kind: str, call: CallDelta | None = None) -> list[bytes]:
        if self._open is not None and self._open["type"] == kind and call is None:
            return []
        out = self.close()
        prefix = {"reasoning": "rs", "message": "msg", "function_call": "fc"}[kind]
        item_id = P.new_id(prefix).replace("-", "_")
        if kind == "message":
            item = _message(item_id, "", "in_progress")
        elif kind == "reasoning":
            item = {**_reasoning(item_id, ""), "content": [], "status": "in_progress"}
        else:
            assert call is not None and call.id and call.name
            item = _call(item_id, call.id, call.name, "", "in_progress")
        self._open, self._text = item, ""
        out.append(self.view.event("response.output_item.added", output_index=len(self.output),
                                   item=item))
        if kind == "message":
            out.append(self.view.event("response.content_part.added", item_id=item_id,
                                       output_index=len(self.output), content_index=0,
                                       part=_text_part("")))
        return out

    def close(self) -> list[bytes]:
        item, self._open = self._open, None
        if item is None:
            return []
        ev, at, text = self.view.event, len(self.output), self._text
        out = []
        if item["type"] == "message":
            done = _message(item["id"], text)
            out += [ev("response.output_text.done", item_id=item["id"], output_index=at,
                       content_index=0, text=text, logprobs=[]),
                    ev("response.content_part.done", item_id=item["id"], output_index=at,
                       content_index=0, part=_text_part(text))]
        elif item["type"] == "reasoning":
            done = _reasoning(item["id"], text)
            out.append(ev("response.reasoning_text.done", item_id=item["id"], output_index=at,
                          content_index=0, text=text))
        else:
            done = _call(item["id"], item["call_id"], item["name"], text)
            out.append(ev("response.function_call_arguments.done", item_id=item["id"],
                          output_index=at, name=item["name"], arguments=text))
        out.append(ev("response.output_item.done", output_index=at, item=done))
        self.output.append(done)
        return out
