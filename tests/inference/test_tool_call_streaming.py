"""Tool calls under ``tool_choice: auto`` stream piece by piece on every front door: the text
before a call as it comes, then the call's name, then its arguments as they are generated.

The scripted backend holds the last argument piece behind a gate, and the tests read the
wire incrementally (an ASGI transport that hands each body message on as the app sends it:
httpx's own holds the whole body): what arrives while the gate is shut was sent before that
piece was generated."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
from llamafleet.inference.tool_families import FAMILIES, AutoCalls, CallDelta, Generic, TextOut

from tests.support.scripted import HERMES, ScriptedPod

WEATHER = {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
# Piece 6, the last of the arguments, waits for the gate.
SCRIPT = ["Let me", " check.", "<tool_call>", '\n{"name": "weather", ', '"arguments": {"city"',
          ': "Par', 'is"}}', "\n</tool_call>"]
LAST_ARGUMENT = 6
ASK = [{"role": "user", "content": "Weather in Paris?"}]


class LiveASGI(httpx.AsyncBaseTransport):
    """An in-process ASGI transport that streams: the response returns at
    ``http.response.start`` and its body yields each ``http.response.body`` as it is sent."""

    def __init__(self, app) -> None:
        self.app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = b"".join([c async for c in request.stream])
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": request.method, "scheme": "http", "path": request.url.path,
                 "raw_path": request.url.raw_path.split(b"?")[0],
                 "query_string": request.url.query, "root_path": "",
                 "headers": [(k.lower(), v) for k, v in request.headers.raw],
                 "server": ("pod", 80), "client": ("127.0.0.1", 1)}
        chunks: asyncio.Queue[bytes | None] = asyncio.Queue()
        start: asyncio.Future[dict] = asyncio.get_running_loop().create_future()
        closed = asyncio.Event()
        received = False

        async def receive() -> dict:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": body, "more_body": False}
            await closed.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.set_result(message)
            elif message["type"] == "http.response.body":
                await chunks.put(message.get("body", b""))
                if not message.get("more_body"):
                    await chunks.put(None)

        app = asyncio.ensure_future(self.app(scope, receive, send))
        await asyncio.wait({app, start}, return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            app.result()  # the app failed before answering: raise its error
        head = start.result()
        return httpx.Response(head["status"], headers=head["headers"],
                              stream=_Body(chunks, closed, app))


class _Body(httpx.AsyncByteStream):
    def __init__(self, chunks: asyncio.Queue, closed: asyncio.Event, app: asyncio.Future):
        self.chunks, self.closed, self.app = chunks, closed, app

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while (chunk := await self.chunks.get()) is not None:
            yield chunk

    async def aclose(self) -> None:
        self.closed.set()
        await self.app


@pytest.fixture
def pod():
    p = ScriptedPod(SCRIPT, template=HERMES)
    yield p
    p.close()


async def sse(pod: ScriptedPod, path: str, body: dict) -> AsyncIterator[dict]:
    """The JSON data of each SSE event, as it arrives."""
    async with httpx.AsyncClient(transport=LiveASGI(pod.app), base_url="http://pod") as c, \
            c.stream("POST", path, json={"model": "scripted", "stream": True, **body}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


async def read_until(events: AsyncIterator[dict], seen: list[dict], done) -> None:
    """Events into ``seen`` until ``done(seen)``; a bound only for a failing test."""
    async def go() -> None:
        async for ev in events:
            seen.append(ev)
            if done(seen):
                return
        raise AssertionError(f"the stream ended first: {seen}")

    await asyncio.wait_for(go(), 20)


async def test_chat_sends_the_name_then_argument_pieces_as_they_are_generated(pod) -> None:
    gate = pod.backend.hold(LAST_ARGUMENT)
    events = aiter(sse(pod, "/v1/chat/completions", {
        "messages": ASK, "tools": [{"type": "function", "function": WEATHER}]}))
    seen: list[dict] = []

    def calls() -> list[dict]:
        return [c for ev in seen for ch in ev["choices"] for c in ch["delta"].get("tool_calls") or []]

    await read_until(events, seen, lambda _: "".join(c["function"]["arguments"] for c in calls())
                     == '{"city": "Par')
    assert not gate.is_set()  # the last argument piece is not generated yet
    text = [ch["delta"]["content"] for ev in seen for ch in ev["choices"] if ch["delta"].get("content")]
    assert text == ["Let me", " check."]
    first = calls()[0]
    assert first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"] == {"name": "weather", "arguments": ""}
    assert [c["function"]["arguments"] for c in calls()[1:]] == ['{"city"', ': "Par']
    gate.set()
    rest = [ev async for ev in events]
    seen += rest
    assert json.loads("".join(c["function"]["arguments"] for c in calls())) == {"city": "Paris"}
    assert {c["index"] for c in calls()} == {0}
    assert rest[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_responses_sends_the_function_call_then_argument_deltas(pod) -> None:
    gate = pod.backend.hold(LAST_ARGUMENT)
    events = aiter(sse(pod, "/v1/responses", {"input": "Weather in Paris?",
                                              "tools": [{"type": "function", **WEATHER}]}))
    seen: list[dict] = []
    await read_until(events, seen, lambda s: s[-1].get("delta") == ': "Par')
    assert not gate.is_set()
    added = [ev["item"] for ev in seen if ev["type"] == "response.output_item.added"]
    assert [(i["type"], i.get("name")) for i in added] == [("message", None), ("function_call", "weather")]
    deltas = [ev["delta"] for ev in seen if ev["type"] == "response.function_call_arguments.delta"]
    assert deltas == ['{"city"', ': "Par']
    gate.set()
    seen += [ev async for ev in events]
    done = next(ev for ev in seen if ev["type"] == "response.function_call_arguments.done")
    assert json.loads(done["arguments"]) == {"city": "Paris"} and done["name"] == "weather"
    final = seen[-1]["response"]
    assert seen[-1]["type"] == "response.completed"
    assert [o["type"] for o in final["output"]] == ["message", "function_call"]
    assert final["output"][0]["content"][0]["text"] == "Let me check."


async def test_messages_sends_tool_use_then_input_json_deltas(pod) -> None:
    gate = pod.backend.hold(LAST_ARGUMENT)
    events = aiter(sse(pod, "/v1/messages", {"max_tokens": 50, "messages": ASK, "tools": [
        {"name": "weather", "input_schema": WEATHER["parameters"]}]}))
    seen: list[dict] = []
    await read_until(events, seen,
                     lambda s: s[-1].get("delta", {}).get("partial_json") == ': "Par')
    assert not gate.is_set()
    starts = [ev["content_block"] for ev in seen if ev["type"] == "content_block_start"]
    assert [(b["type"], b.get("name")) for b in starts] == [("text", None), ("tool_use", "weather")]
    pieces = [ev["delta"]["partial_json"] for ev in seen
              if ev["type"] == "content_block_delta" and ev["delta"]["type"] == "input_json_delta"]
    assert pieces == ['{"city"', ': "Par']
    gate.set()
    seen += [ev async for ev in events]
    pieces = [ev["delta"]["partial_json"] for ev in seen
              if ev["type"] == "content_block_delta" and ev["delta"]["type"] == "input_json_delta"]
    assert json.loads("".join(pieces)) == {"city": "Paris"}
    stop = next(ev for ev in seen if ev["type"] == "message_delta")
    assert stop["delta"]["stop_reason"] == "tool_use" and seen[-1]["type"] == "message_stop"


# --- each family's streaming parser -----------------------------------------------------------

def family(name: str):
    return next((cls() for cls in FAMILIES if cls.name == name), Generic())


def run(parser: AutoCalls, pieces: list[str]) -> list[list[TextOut | CallDelta]]:
    """What the parser gives for each piece, and (last) at the end."""
    return [parser.feed(p) for p in pieces] + [parser.finish()]


def calls_of(steps) -> dict[int, tuple[str, str]]:
    out: dict[int, list[str]] = {}
    for step in steps:
        for p in step:
            if isinstance(p, CallDelta):
                name, args = out.setdefault(p.index, ["", ""])
                out[p.index] = [name + (p.name or ""), args + p.arguments]
    return {i: (n, a) for i, (n, a) in out.items()}


@pytest.mark.parametrize("name, pieces", [
    ("hermes", ['<tool_call>\n{"name": "a", "arguments": {"x"', ': 1}}\n</tool_call>\n<tool_call>',
                '{"name": "b", "arguments": {}}', "</tool_call>"]),
    ("mistral", ['[TOOL_CALLS] [{"name": "a", "arguments": {"x"', ': 1}}, {"name": "b", ',
                 '"arguments": {}}]']),
    ("llama3", ['<|python_tag|>{"name": "a", "parameters": {"x"', ': 1}}; {"name": "b", ',
                '"parameters": {}}']),
    ("gemma", ['```json\n[{"name": "a", "arguments": {"x"', ': 1}}, {"name": "b", ',
               '"arguments": {}}]\n```']),
])
def test_each_family_streams_names_then_argument_pieces(name, pieces) -> None:
    steps = run(family(name).stream(), pieces)
    assert steps[0][0] == CallDelta(0, steps[0][0].id, "a", "")  # the name, as soon as complete
    assert steps[0][1] == CallDelta(0, arguments='{"x"')  # then the arguments so far
    assert steps[1][0] == CallDelta(0, arguments=": 1}")
    assert calls_of(steps) == {0: ("a", '{"x": 1}'), 1: ("b", "{}")}
    assert steps[-1] == []  # nothing held for the end
    one = calls_of(run(family(name).stream(parallel=False), pieces))
    assert one == {0: ("a", '{"x": 1}')}


def test_a_call_the_stream_cannot_read_comes_whole_at_the_end() -> None:
    pieces = ['Ok <tool_call>{"arguments": {"x": 1}, "name": "a"}</tool_call>',
              '<tool_call>{"name": "b", "arguments": "{}"}</tool_call>']
    steps = run(family("hermes").stream(), pieces)
    assert steps[0] == [TextOut("Ok ")] and steps[1] == []
    assert calls_of(steps) == {0: ("a", '{"x": 1}'), 1: ("b", "{}")}
    # Read in the stream first, the next that cannot be follows whole.
    pieces = ['<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>',
              '{"arguments": {}, "name": "b"}</tool_call>']
    assert calls_of(run(family("hermes").stream(), pieces)) == {0: ("a", "{}"), 1: ("b", "{}")}


def test_text_from_a_marker_on_that_is_no_call_is_content() -> None:
    steps = run(family("hermes").stream(), ["Sure", "<tool_call>", "not json"])
    assert [p for s in steps for p in s] == [TextOut("Sure"), TextOut("<tool_call>not json")]
