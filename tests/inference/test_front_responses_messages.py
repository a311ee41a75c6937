"""The Responses and Messages front doors without a model: the official `openai` and
`anthropic` clients against the real app, on a scripted backend."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from tests.support.scripted import HERMES, ScriptedPod

WEATHER = {"type": "function", "name": "weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
CALL = ['{"name": "weather", ', '"arguments": {"city"', ': "Paris"}}']


@pytest.fixture
def pod():
    p = ScriptedPod(["Hello", ",", " world"], template=HERMES)
    yield p
    p.close()


def oai(pod: ScriptedPod) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://pod/v1", api_key="x", http_client=pod.client())


def claude(pod: ScriptedPod, **kw) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url="http://pod", api_key=kw.pop("api_key", "x"),
                                    http_client=pod.client2(), max_retries=0)


async def test_responses_create_and_stream(pod) -> None:
    c = oai(pod)
    r = await c.responses.create(model="scripted", input="Hi", instructions="Be brief.")
    assert r.output_text == "Hello, world" and r.status == "completed"
    assert r.usage.output_tokens == 3 and r.usage.input_tokens > 0
    assert pod.model.prompts[-1].startswith("<|im_start|>system\nBe brief.")
    async with c.responses.stream(model="scripted", input=[{"role": "user", "content": "Hi"}]) as s:
        kinds = [ev.type async for ev in s]
        final = await s.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds.count("response.output_text.delta") == 3 and kinds[-1] == "response.completed"
    assert final.output_text == "Hello, world" and final.usage.total_tokens > 3


async def test_responses_function_call_round_trip(pod) -> None:
    c = oai(pod)
    pod.script = CALL
    r = await c.responses.create(model="scripted", input="Weather in Paris?", tools=[WEATHER],
                                 tool_choice="required")
    call = r.output[0]
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}
    async with c.responses.stream(model="scripted", input="Weather in Paris?", tools=[WEATHER],
                                  tool_choice={"type": "function", "name": "weather"}) as s:
        args = [ev.delta async for ev in s if ev.type == "response.function_call_arguments.delta"]
        final = await s.get_final_response()
    assert json.loads("".join(args)) == {"city": "Paris"} and final.output[0].name == "weather"
    pod.script = ["It is", " sunny."]
    r2 = await c.responses.create(model="scripted", input=[
        {"role": "user", "content": "Weather in Paris?"}, *[o.model_dump() for o in r.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "clear"}'}],
        tools=[WEATHER])
    assert r2.output_text == "It is sunny."
    assert f'<|im_start|>tool\n{{"sky": "clear"}} for {call.call_id}' in pod.model.prompts[-1]
    assert '"arguments": {"city": "Paris"}' in pod.model.prompts[-1]  # the call, as a mapping


@pytest.mark.parametrize("field, value", [
    ("previous_response_id", "resp_1"), ("store", True), ("background", True),
    ("reasoning", {"effort": "low"}), ("include", ["reasoning.encrypted_content"])])
async def test_responses_refuse_what_a_stateless_server_cannot_do(pod, field, value) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        await oai(pod).responses.create(model="scripted", input="Hi", extra_body={field: value})
    assert e.value.body["param"] == field and field in e.value.body["message"]


async def test_responses_json_schema_is_a_grammar(pod) -> None:
    pod.script = ['{"a": 1}']
    r = await oai(pod).responses.create(model="scripted", input="Hi", text={"format": {
        "type": "json_schema", "name": "x", "schema": {"type": "object"}}})
    assert json.loads(r.output_text) == {"a": 1} and pod.backend.params[-1].grammar


async def test_messages_create_and_stream(pod) -> None:
    c = claude(pod)
    m = await c.messages.create(model="scripted", max_tokens=20, system="Be brief.",
                                messages=[{"role": "user", "content": "Hi"}])
    assert m.content[0].text == "Hello, world" and m.stop_reason == "end_turn"
    assert m.usage.output_tokens == 3 and pod.model.prompts[-1].startswith("<|im_start|>system\nBe brief.")
    blocks = [{"type": "text", "text": "Hi"}]
    async with c.messages.stream(model="scripted", max_tokens=20,
                                 messages=[{"role": "user", "content": blocks}]) as s:
        kinds = [ev.type async for ev in s]
        final = await s.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert {"content_block_start", "content_block_delta", "content_block_stop", "message_delta"} <= set(kinds)
    assert final.content[0].text == "Hello, world"


async def test_messages_tool_use_round_trip(pod) -> None:
    c = claude(pod)
    pod.script = CALL
    tools = [{"name": "weather", "input_schema": WEATHER["parameters"]}]
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    m = await c.messages.create(model="scripted", max_tokens=50, messages=ask, tools=tools,
                                tool_choice={"type": "any"})
    use = m.content[0]
    assert (m.stop_reason, use.type, use.name) == ("tool_use", "tool_use", "weather")
    assert use.input == {"city": "Paris"}
    async with c.messages.stream(model="scripted", max_tokens=50, messages=ask, tools=tools,
                                 tool_choice={"type": "tool", "name": "weather"}) as s:
        final = await s.get_final_message()
    assert final.content[0].input == {"city": "Paris"} and final.stop_reason == "tool_use"
    pod.script = ["Sunny."]
    m2 = await c.messages.create(model="scripted", max_tokens=50, tools=tools, messages=[
        *ask, {"role": "assistant", "content": [b.model_dump() for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "clear"}]}])
    assert m2.content[0].text == "Sunny."
    assert f"<|im_start|>tool\nclear for {use.id}" in pod.model.prompts[-1]
    assert '"arguments": {"city": "Paris"}' in pod.model.prompts[-1]


async def test_messages_errors_have_anthropics_shape_and_keys_come_as_x_api_key() -> None:
    pod = ScriptedPod(["ok"], api_key="s3cret")
    try:
        with pytest.raises(anthropic.AuthenticationError) as e:
            await claude(pod, api_key="wrong").messages.create(
                model="scripted", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
        assert e.value.body["error"]["type"] == "authentication_error"
        m = await claude(pod, api_key="s3cret").messages.create(
            model="scripted", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
        assert m.content[0].text == "ok"
        with pytest.raises(anthropic.BadRequestError) as e:
            await claude(pod, api_key="s3cret").messages.create(
                model="scripted", max_tokens=5, messages=[{"role": "user", "content": "Hi"}],
                extra_body={"thinking": {"type": "enabled", "budget_tokens": 1024}})
        assert e.value.body == {"type": "error", "error": {"type": "invalid_request_error",
                                                           "message": e.value.body["error"]["message"]}}
        assert "thinking" in e.value.body["error"]["message"]
        async with pod.client(**{"x-api-key": "s3cret"}) as h:
            r = await h.post("/v1/messages", json={"model": "scripted", "messages": []})
        assert r.status_code == 400 and r.json()["type"] == "error"
    finally:
        pod.close()


async def test_thinking_blocks_and_reasoning_items() -> None:
    pod = ScriptedPod(["<think>", "hm", "</think>", "Yes."])
    try:
        m = await claude(pod).messages.create(model="scripted", max_tokens=20,
                                              messages=[{"role": "user", "content": "?"}])
        assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in m.content] \
            == [("thinking", "hm"), ("text", "Yes.")]
        async with claude(pod).messages.stream(model="scripted", max_tokens=20,
                                               messages=[{"role": "user", "content": "?"}]) as s:
            final = await s.get_final_message()
        assert final.content[0].thinking == "hm" and final.content[1].text == "Yes."
        r = await oai(pod).responses.create(model="scripted", input="?")
        assert r.output[0].type == "reasoning" and r.output[0].content[0].text == "hm"
        assert r.output_text == "Yes."
        async with oai(pod).responses.stream(model="scripted", input="?") as s:
            final = await s.get_final_response()
        assert final.output[0].type == "reasoning" and final.output_text == "Yes."
    finally:
        pod.close()
