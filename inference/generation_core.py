"""The generation core that every front door shares: no HTTP, no gRPC, no wire shapes.

A front door turns its request into a :class:`Conversation` (or a raw prompt), asks
:meth:`Core.prepare` for the prompt, the grammar and the sampling parameters, starts a
:class:`Turn`, and turns the turn's :class:`Step`\\ s and :class:`Done` (streaming) or its
:class:`Answer` (whole) into its own wire format. Tool calls, ``response_format`` and
reasoning are handled here once, for OpenAI chat and responses, Anthropic messages and gRPC.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llamafleet.common import protocol as P
from llamafleet.common.errors import InternalError, LlamafleetError, ToolCallIncomplete
from llamafleet.common.sampling import SamplingParameters
from llamafleet.common.tenants import Caller

from . import reasoning, tool_calls
from .engine import Finished, SamplingParams, TextDelta, TokenLogprob
from .serving import Generation, Serving
from .tool_families import AutoCalls, CallDelta, ForcedCalls, PlainText, TextOut, family_for

if TYPE_CHECKING:
    from opentelemetry.context import Context


@dataclass
class Conversation:
    """What a chat-like front door asks for, in the core's terms. ``messages`` are OpenAI
    chat messages (the richest shape: each front door converts to it); ``tool_choice`` is
    none | auto | required | named (with ``named_tool``)."""

    messages: list[P.ChatMessage]
    sampling: SamplingParameters = field(default_factory=SamplingParameters)
    tools: list[P.Tool] = field(default_factory=list)
    tool_choice: str = "none"
    named_tool: str | None = None
    parallel_tool_calls: bool = True
    json_schema: dict | None = None  # response_format: json_schema
    json_object: bool = False  # response_format: json_object
    schema_param: str = "response_format"
    stop: Sequence[str] = ()
    stop_param: str = "stop"
    max_tokens_param: str = "max_tokens"
    ignore_eos: bool = False
    logprobs: int | None = None
    rag_context: str | None = None
    reasoning_format: str | None = None  # llama-server's names; None: the pod's default
    prompt_param: str = "messages"  # what a too-long prompt's error names

    @property
    def forced(self) -> bool:
        return self.tool_choice in ("required", "named")


@dataclass
class Prepared:
    """A conversation made ready to run: the prompt's tokens, the engine's parameters, and
    how to read the answer."""

    prompt: list[int]
    params: SamplingParams
    conversation: Conversation | None = None
    think: bool = False  # split <think> text out
    inline_when_streamed: bool = False  # deepseek-legacy: streamed thoughts stay in the text
    thinking_opened: bool = False  # the prompt itself opened the thoughts
    prompt_param: str = "messages"


@dataclass
class Step:
    """What one piece of generated text became: content, reasoning, call pieces, and the
    logprobs of its tokens (when asked)."""

    content: str = ""
    reasoning: str = ""
    calls: list[CallDelta] = field(default_factory=list)
    logprobs: Sequence[TokenLogprob] = ()

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.calls or self.logprobs)


@dataclass
class Done:
    """The end: OpenAI's finish reason (stop | length | tool_calls), the engine's own
    (stop | length | cancelled), the token counts, and the request's stop string that ended
    the text (if one did)."""

    finish_reason: str
    reason: str
    prompt_tokens: int
    completion_tokens: int
    stop_sequence: str | None = None


@dataclass
class Answer:
    """A whole answer, read by the full-answer parsers."""

    content: str | None
    reasoning: str | None
    calls: list[tool_calls.Call]
    done: Done
    logprobs: list[TokenLogprob]


class Core:
    """Conversation -> prompt + grammar + generation, over one :class:`Serving`."""

    def __init__(self, serving: Serving):
        self.serving = serving
        self.family = family_for(serving.formatter.source)

    async def prepare(self, conv: Conversation) -> Prepared:
        s = self.serving
        grammar = None
        if conv.json_schema is not None:
            grammar = await s.schema_grammar(conv.json_schema, param=conv.schema_param)
        if conv.forced:
            grammar = await s.schema_grammar(self.family.call_schema(
                conv.tools, conv.named_tool, self._parallel(conv)), param="tools")
        reasoning.check_format(conv.reasoning_format)
        params = s.sampling(conv.sampling, stop=conv.stop, stop_param=conv.stop_param,
                            ignore_eos=conv.ignore_eos, json_object=conv.json_object,
                            grammar=grammar, logprobs=conv.logprobs)
        native = self.family.knows_tools
        offered = conv.tools if conv.tool_choice != "none" and conv.tools else None
        messages = tool_calls.template_messages(conv.messages, native, offered)
        rendered = [t.model_dump(exclude_none=True) for t in offered] if offered and native \
            else None
        # Rendering and tokenising long text take milliseconds: off the event loop.
        prompt, text = await asyncio.to_thread(s.chat_prompt_and_text, messages,
                                               conv.rag_context, rendered)
        fmt = conv.reasoning_format or s.settings.reasoning_format
        # A grammar holds the whole answer to JSON: there are no thoughts to split.
        think = fmt != "none" and grammar is None
        return Prepared(prompt, params, conv, think=think,
                        thinking_opened=think and text.rstrip().endswith(reasoning.OPEN),
                        inline_when_streamed=fmt == "deepseek-legacy",
                        prompt_param=conv.prompt_param)

    async def prepare_text(self, prompt: str | Sequence[int], sampling: SamplingParameters, *,
                           stop: Sequence[str] = (), ignore_eos: bool = False,
                           logprobs: int | None = None) -> Prepared:
        """A raw prompt (completions): no template, no tools, no reasoning split."""
        s = self.serving
        tokens = await asyncio.to_thread(s.text_prompt, prompt)
        params = s.sampling(sampling, stop=stop, ignore_eos=ignore_eos, logprobs=logprobs)
        return Prepared(tokens, params, prompt_param="prompt")

    def start(self, prepared: Prepared, *, api: str, request_id: str, user: str | None = None,
              stream: bool = True, model: str | None = None, caller: Caller | None = None,
              trace: Context | None = None) -> Turn:
        """Submit now: errors (too long, overloaded, an unknown model) raise here, before any
        output. ``model``: the request's, the base model or a LoRA adapter's name. ``caller``:
        its tenant and priority (the engine's admission) and lease (tokens are charged).
        ``trace``: the caller's trace context (tracing.extract; None when off)."""
        caller = caller or Caller()
        gen = self.serving.start(prepared.prompt, prepared.params, api=api, request_id=request_id,
                                 prompt_param=prepared.prompt_param, user=user, stream=stream,
                                 model=model, tenant=caller.tenant, priority=caller.priority,
                                 lease=caller.lease, trace=trace)
        return Turn(self, prepared, gen)

    @staticmethod
    def _parallel(conv: Conversation) -> bool:
        # A named function is exactly one call; required is one or more unless
        # parallel_tool_calls is false.
        return conv.parallel_tool_calls and conv.named_tool is None


class Turn:
    """One running generation, read as parsed steps (:meth:`steps`) or whole (:meth:`answer`)."""

    def __init__(self, core: Core, prepared: Prepared, gen: Generation):
        self.core, self.prepared, self.gen = core, prepared, gen
        conv = prepared.conversation
        self.conv = conv
        if conv is not None and conv.forced:
            names = {t.function.name for t in conv.tools
                     if conv.named_tool in (None, t.function.name)}
            self._forced: ForcedCalls | None = ForcedCalls(names, Core._parallel(conv))
        else:
            self._forced = None
        self._auto = conv is not None and conv.tool_choice == "auto"

    def cancel(self) -> None:
        self.gen.cancel()

    def _parser(self) -> ForcedCalls | AutoCalls | PlainText:
        if self._forced is not None:
            return self._forced
        if self._auto:
            assert self.conv is not None
            return self.core.family.stream(self.conv.parallel_tool_calls)
        return PlainText()

    async def steps(self) -> AsyncIterator[Step | Done]:
        """Parsed steps as the text arrives, then :class:`Done` (errors raise)."""
        parser = self._parser()
        p = self.prepared
        split = reasoning.ThinkSplit(p.thinking_opened, inline=p.inline_when_streamed) \
            if p.think else None
        calls = False
        async for ev in self.gen.events():
            if isinstance(ev, TextDelta):
                step = _step(parser, split.feed(ev.text) if split else [("content", ev.text)],
                             ev.logprobs)
                calls = calls or bool(step.calls)
                if step:
                    yield step
            elif isinstance(ev, Finished):
                step = _step(parser, split.finish() if split else [], ())
                try:
                    tail = parser.finish()
                except tool_calls.MalformedCalls as e:
                    raise self._forced_error(str(e), ev) from None
                for piece in tail:
                    if isinstance(piece, TextOut):
                        step.content += piece.text
                    else:
                        step.calls.append(piece)
                calls = calls or bool(step.calls)
                if step:
                    yield step
                yield Done("tool_calls" if calls or self._forced else _finish_reason(ev),
                           ev.reason, ev.prompt_tokens, ev.completion_tokens, ev.stop)

    async def answer(self) -> Answer:
        """The whole answer (the front door cancels the turn if its client leaves)."""
        parts: list[str] = []
        lps: list[TokenLogprob] = []
        fin: Finished | None = None
        async for ev in self.gen.events():
            if isinstance(ev, TextDelta):
                parts.append(ev.text)
                lps.extend(ev.logprobs)
            elif isinstance(ev, Finished):
                fin = ev
        assert fin is not None
        text = "".join(parts)
        thought = None
        if self.prepared.think:
            thought, text = reasoning.split(text, self.prepared.thinking_opened)
        content: str | None = text
        calls: list[tool_calls.Call] = []
        if self._forced is not None:
            try:
                calls, content = self._forced.parse(text), None
            except tool_calls.MalformedCalls as e:
                raise self._forced_error(str(e), fin) from None
        elif self._auto:
            assert self.conv is not None
            content, calls = self.core.family.parse(text)
            calls = calls if self.conv.parallel_tool_calls else calls[:1]
        done = Done("tool_calls" if calls else _finish_reason(fin), fin.reason,
                    fin.prompt_tokens, fin.completion_tokens, fin.stop)
        return Answer(content, thought, calls, done, lps)

    def _forced_error(self, why: str, fin: Finished) -> LlamafleetError:
        conv = self.conv
        assert conv is not None
        return forced_call_error(why, fin, conv.stop, conv.stop_param, conv.max_tokens_param)


def forced_call_error(why: str, fin: Finished, stop: Sequence[str], stop_param: str = "stop",
                      max_tokens_param: str = "max_tokens") -> LlamafleetError:
    """A required or named tool_choice whose answer is not a well-formed call. The grammar
    lets the model end only after a complete call, so the answer was cut: by max_tokens or
    a stop string (the request's to change: 400), else by us (500)."""
    if fin.reason == "length":
        return ToolCallIncomplete(
            f"{max_tokens_param} ran out before the forced tool call was complete ({why}); "
            f"raise {max_tokens_param} or bound the schema's strings and arrays",
            param=max_tokens_param)
    if stop:
        return ToolCallIncomplete(f"a stop string ended the forced tool call ({why}); leave "
                                  f"out {stop_param} with a required or named tool_choice",
                                  param=stop_param)
    return InternalError(f"the model's forced tool call is not well formed ({why})",
                         code="tool_call_invalid")


def _step(parser: ForcedCalls | AutoCalls | PlainText, parts: list[tuple[str, str]],
          logprobs: Sequence[TokenLogprob]) -> Step:
    step = Step(logprobs=logprobs)
    for kind, text in parts:
        if kind == "reasoning":
            step.reasoning += text
            continue
        for piece in parser.feed(text):
            if isinstance(piece, TextOut):
                step.content += piece.text
            else:
                step.calls.append(piece)
    return step


def _finish_reason(fin: Finished) -> str:
    return "length" if fin.reason == "length" else "stop"
