"""OpenAI chat completions and completions: request -> the core's input, the core's steps ->
OpenAI's wire shapes (whole answers and ``chat.completion.chunk`` / ``text_completion`` SSE)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence

from llamafleet.common import protocol as P
from llamafleet.common.errors import LlamafleetError, openai_body
from llamafleet.common.sampling import SamplingParameters

from ..engine import TokenLogprob
from ..generation_core import Answer, Conversation, Done, Step, Turn
from ..tool_families import CallDelta


def sampling_of(body: P._SamplingFields, max_tokens: int | None) -> SamplingParameters:
    return SamplingParameters(**{**body.model_dump(include=set(SamplingParameters.model_fields)),
                                 "max_tokens": max_tokens})


def conversation(body: P.ChatCompletionRequest) -> Conversation:
    fmt = body.response_format
    mode = body.tool_choice_mode
    return Conversation(
        messages=body.messages, sampling=sampling_of(body, body.max_completion_tokens or body.max_tokens),
        tools=body.tools or [], tool_choice=mode,
        named_tool=body.tool_choice.function.name if mode == "named" else None,  # type: ignore[union-attr]
        parallel_tool_calls=body.parallel_tool_calls,
        json_schema=(fmt.json_schema.schema_ or {}) if fmt and fmt.type == "json_schema"
        and fmt.json_schema else None,
        json_object=bool(fmt and fmt.type == "json_object"), stop=body.stop_list,
        ignore_eos=body.ignore_eos, logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        rag_context=body.rag_context, reasoning_format=body.reasoning_format)


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def chat_logprobs(lps: Sequence[TokenLogprob]) -> P.ChoiceLogprobs:
    return P.ChoiceLogprobs(content=[
        P.TokenLogprob(token=_text(lp.token), logprob=lp.logprob, bytes=list(lp.token),
                       top_logprobs=[P.TopLogprob(token=_text(t), logprob=v, bytes=list(t))
                                     for t, v in lp.top])
        for lp in lps])


def completion_logprobs(lps: Sequence[TokenLogprob], offset: int = 0) -> P.CompletionLogprobs:
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(_text(lp.token))
    return P.CompletionLogprobs(
        tokens=[_text(lp.token) for lp in lps], token_logprobs=[lp.logprob for lp in lps],
        top_logprobs=[{_text(t): v for t, v in lp.top} for lp in lps], text_offset=offsets)


class FastFrame:
    """A pre-serialised SSE frame with one string slot: per token we splice in the JSON of
    the text instead of building and dumping a pydantic model (the event loop shares two
    cores with the decode threads, so every microsecond here slows decoding)."""

    def __init__(self, template: P.BaseModel, include_usage: bool):
        text = frame_bytes(template, include_usage).decode()
        self._head, self._tail = text.split('"\\u0000"', 1)

    def render(self, value: str) -> bytes:
        return (self._head + json.dumps(value) + self._tail).encode()


def frame_bytes(frame: P.BaseModel, include_usage: bool) -> bytes:
    data = frame.model_dump(exclude_none=False)
    if not include_usage:
        data.pop("usage", None)
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def error_frame(e: LlamafleetError) -> bytes:
    return b"data: " + json.dumps(openai_body(e)).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"


def _wire_calls(calls: list[CallDelta]) -> list[P.ToolCallDelta] | None:
    return [P.ToolCallDelta(index=c.index, id=c.id, type="function" if c.name else None,
                            function=P.FunctionCallDelta(name=c.name, arguments=c.arguments))
            for c in calls] or None


class ChatView:
    """One chat completion's wire shapes."""

    def __init__(self, body: P.ChatCompletionRequest, model: str, fingerprint: str):
        self.body, self.model, self.fingerprint = body, model, fingerprint
        self.id, self.created = P.new_id("chatcmpl"), P.now()
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(self, delta: P.Delta, finish: str | None = None,
              logprobs: P.ChoiceLogprobs | None = None) -> P.ChatCompletionChunk:
        return P.ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, system_fingerprint=self.fingerprint,
            choices=[P.ChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)])

    async def frames(self, turn: Turn) -> AsyncIterator[bytes]:
        content = FastFrame(self.chunk(P.Delta(content="\x00")), self.include_usage)
        # The role frame goes out with the first event, not before: until then no byte has
        # left, so a router may still retry the request on another replica.
        role: P.ChatCompletionChunk | None = self.chunk(P.Delta(role="assistant", content=""))
        async for step in turn.steps():
            if role is not None:
                yield self._bytes(role)
                role = None
            if isinstance(step, Done):
                yield self._bytes(self.chunk(P.Delta(), step.finish_reason))
                if self.include_usage:
                    yield self._bytes(P.ChatCompletionChunk(
                        id=self.id, created=self.created, model=self.model,
                        system_fingerprint=self.fingerprint, choices=[],
                        usage=P.Usage.of(step.prompt_tokens, step.completion_tokens)))
            elif step.content and not (step.reasoning or step.calls or step.logprobs):
                yield content.render(step.content)
            else:
                yield self._bytes(self._step_chunk(step))

    def _step_chunk(self, step: Step) -> P.ChatCompletionChunk:
        lp = chat_logprobs(step.logprobs) if self.body.logprobs and step.logprobs else None
        return self.chunk(P.Delta(content=step.content or None,
                                  reasoning_content=step.reasoning or None,
                                  tool_calls=_wire_calls(step.calls)), logprobs=lp)

    def _bytes(self, frame: P.BaseModel) -> bytes:
        return frame_bytes(frame, self.include_usage)

    def whole(self, a: Answer) -> dict:
        message = P.AssistantMessage(content=a.content, reasoning_content=a.reasoning,
                                     tool_calls=[c.wire() for c in a.calls] or None)
        return P.ChatCompletion(
            id=self.id, created=self.created, model=self.model, system_fingerprint=self.fingerprint,
            choices=[P.ChatChoice(message=message, finish_reason=a.done.finish_reason,
                                  logprobs=chat_logprobs(a.logprobs) if self.body.logprobs else None)],
            usage=P.Usage.of(a.done.prompt_tokens, a.done.completion_tokens)
        ).model_dump(exclude_none=False)


class CompletionView:
    """One text completion's wire shapes."""

    def __init__(self, body: P.CompletionRequest, model: str, fingerprint: str):
        self.body, self.model, self.fingerprint = body, model, fingerprint
        self.id, self.created = P.new_id("cmpl"), P.now()
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def make(self, text: str, finish: str | None, usage: P.Usage | None = None,
             logprobs: P.CompletionLogprobs | None = None) -> P.Completion:
        return P.Completion(id=self.id, created=self.created, model=self.model,
                            system_fingerprint=self.fingerprint,
                            choices=[P.CompletionChoice(text=text, finish_reason=finish,
                                                        logprobs=logprobs)],
                            usage=usage)

    async def frames(self, turn: Turn) -> AsyncIterator[bytes]:
        text_frame = FastFrame(self.make("\x00", None), self.include_usage)
        offset = 0
        async for step in turn.steps():
            if isinstance(step, Done):
                yield frame_bytes(self.make("", step.finish_reason), self.include_usage)
                if self.include_usage:
                    c = self.make("", None, P.Usage.of(step.prompt_tokens, step.completion_tokens))
                    c.choices = []
                    yield frame_bytes(c, self.include_usage)
            elif self.body.logprobs is not None:
                yield frame_bytes(self.make(step.content, None, logprobs=completion_logprobs(
                    step.logprobs, offset)), self.include_usage)
                offset += len(step.content)
            else:
                yield text_frame.render(step.content)

    def whole(self, a: Answer) -> dict:
        return self.make(a.content or "", a.done.finish_reason,
                         P.Usage.of(a.done.prompt_tokens, a.done.completion_tokens),
                         completion_logprobs(a.logprobs) if self.body.logprobs is not None
                         else None).model_dump()
