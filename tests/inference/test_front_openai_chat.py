"""OpenAI chat completions and completions over the generation core, without a model: the
official client against the real app, on a scripted backend."""

from __future__ import annotations

import json

import openai
import pytest

from tests.support.scripted import HERMES, THINKING, ScriptedPod

WEATHER = {"type": "function", "function": {
    "name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                      "required": ["city"]}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture
def pod():
    p = ScriptedPod(["Hello", ",", " world"])
    yield p
    p.close()


def client(pod: ScriptedPod) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://pod/v1", api_key="x", http_client=pod.client())


async def test_chat_whole_and_streamed(pod) -> None:
    c = client(pod)
    r = await c.chat.completions.create(model="scripted", messages=ASK)
    assert r.choices[0].message.content == "Hello, world"
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 3
    assert "reasoning_content" not in r.choices[0].message.model_dump(exclude_unset=True)
    chunks = [ch async for ch in await c.chat.completions.create(
        model="scripted", messages=ASK, stream=True, stream_options={"include_usage": True})]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "Hello, world"
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].usage.total_tokens > 3


async def test_completions_whole_and_streamed(pod) -> None:
    c = client(pod)
    r = await c.completions.create(model="scripted", prompt="Say hi")
    assert r.choices[0].text == "Hello, world" and pod.model.prompts[-1] == "Say hi"
    parts = [ch.choices[0].text async for ch in await c.completions.create(
        model="scripted", prompt="Say hi", stream=True)]
    assert "".join(parts) == "Hello, world"


async def test_forced_call_is_held_to_a_grammar_and_streams_name_then_arguments(pod) -> None:
    pod.script = ['{"name": "weather", ', '"arguments": {"city"', ': "Paris"}}']
    c = client(pod)
    r = await c.chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER],
                                        tool_choice="required")
    call = r.choices[0].message.tool_calls[0]
    assert (call.function.name, json.loads(call.function.arguments)) == ("weather", {"city": "Paris"})
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert 'weather' in pod.backend.params[-1].grammar
    deltas = [d for ch in await _chunks(c, tools=[WEATHER], tool_choice="required")
              for d in ch.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "weather" and deltas[0].id
    assert json.loads("".join(d.function.arguments for d in deltas)) == {"city": "Paris"}


async def test_a_cut_forced_call_is_a_400_naming_max_tokens(pod) -> None:
    pod.script = ['{"name": "weather", ', '"arguments": {"city"']
    with pytest.raises(openai.BadRequestError) as e:
        await client(pod).chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER],
                                                  tool_choice="required", max_tokens=2)
    assert e.value.body["param"] == "max_tokens"


async def _chunks(c: openai.AsyncOpenAI, **kw) -> list:
    return [ch async for ch in await c.chat.completions.create(
        model="scripted", messages=ASK, stream=True, **kw) if ch.choices]


async def test_auto_calls_stream_the_text_before_them_then_the_call() -> None:
    pod = ScriptedPod(["Let me", " check.", "<tool", "_call>", '{"name": "weather", "arguments": ',
                       '{"city": "Paris"}}', "</tool_call>"], template=HERMES)
    try:
        c = client(pod)
        chunks = await _chunks(c, tools=[WEATHER])
        text = [ch.choices[0].delta.content for ch in chunks if ch.choices[0].delta.content]
        assert text == ["Let me", " check."]  # as they came; nothing of the marker
        calls = [d for ch in chunks for d in ch.choices[0].delta.tool_calls or []]
        assert calls[0].function.name == "weather"
        assert json.loads("".join(d.function.arguments for d in calls)) == {"city": "Paris"}
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        assert "<tool_call> tools: " in pod.model.prompts[-1]  # the template rendered the tools
        r = await c.chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER])
        assert r.choices[0].message.content == "Let me check."
        assert r.choices[0].message.tool_calls[0].function.name == "weather"
    finally:
        pod.close()


async def test_auto_text_that_is_no_call_stays_content() -> None:
    pod = ScriptedPod(["Sure", "<tool_call>", "not json"], template=HERMES)
    try:
        chunks = await _chunks(client(pod), tools=[WEATHER])
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "Sure<tool_call>not json"
        assert chunks[-1].choices[0].finish_reason == "stop"
    finally:
        pod.close()


@pytest.mark.parametrize("opened", [False, True])
async def test_thoughts_go_to_reasoning_content(opened: bool) -> None:
    script = ["<think>", "Paris is", " in France", "</think>", "\n\nSunny."]
    pod = ScriptedPod(script[1:] if opened else script, template=THINKING if opened else HERMES)
    try:
        c = client(pod)
        r = await c.chat.completions.create(model="scripted", messages=ASK)
        msg = r.choices[0].message
        assert (msg.content, msg.model_extra["reasoning_content"]) == ("Sunny.", "Paris is in France")
        chunks = await _chunks(c)
        assert "".join(ch.choices[0].delta.model_extra.get("reasoning_content") or ""
                       for ch in chunks) == "Paris is in France"
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "Sunny."
        r = await c.chat.completions.create(model="scripted", messages=ASK,
                                            extra_body={"reasoning_format": "none"})
        assert "Paris is in France</think>" in r.choices[0].message.content
    finally:
        pod.close()


async def test_the_pod_default_reasoning_format_none_leaves_thoughts_in_content() -> None:
    pod = ScriptedPod(["<think>", "hm", "</think>", "Yes."], reasoning_format="none")
    try:
        r = await client(pod).chat.completions.create(model="scripted", messages=ASK)
        assert r.choices[0].message.content == "<think>hm</think>Yes."
    finally:
        pod.close()
