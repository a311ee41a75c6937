"""The Responses and Messages front doors end to end: the official `openai` and `anthropic`
clients against a real pod on the default model (SmolLM2-135M-Instruct), directly and
through a real `llamafleet router`. Answers that must end are held to bounded grammars
(a forced call, a JSON schema of enums), so no assertion rests on the small model's whims."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from tests.support.servers import start_router

pytestmark = pytest.mark.integration

CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
        "additionalProperties": False}
YES_NO = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
          "required": ["answer"], "additionalProperties": False}


@pytest.fixture(scope="module")
def router(instruct_server):
    r = start_router([instruct_server.url])
    yield r
    r.stop()


@pytest.fixture(params=["pod", "router"])
def base(request, instruct_server) -> str:
    return instruct_server.url if request.param == "pod" else request.getfixturevalue("router").url


def test_responses_create_stream_and_a_function_call_round_trip(base) -> None:
    c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    r = c.responses.create(model="", input="Say hello.", instructions="Be brief.", max_output_tokens=8)
    assert r.status in ("completed", "incomplete") and 0 < r.usage.output_tokens <= 8
    fmt = {"format": {"type": "json_schema", "name": "yes_no", "schema": YES_NO}}
    with c.responses.stream(model="", input="Is Paris in France?", text=fmt) as s:
        deltas = [ev.delta for ev in s if ev.type == "response.output_text.delta"]
        final = s.get_final_response()
    assert json.loads(final.output_text)["answer"] in ("yes", "no")
    assert "".join(deltas) == final.output_text and final.usage.total_tokens > 0

    tools = [{"type": "function", "name": "weather", "description": "Weather in a city",
              "parameters": CITY}]
    first = c.responses.create(model="", input="What is the weather in Paris?", tools=tools,
                               tool_choice={"type": "function", "name": "weather"})
    call = first.output[-1]
    assert call.type == "function_call" and call.name == "weather"
    assert json.loads(call.arguments)["city"] in ("Paris", "Rome")
    second = c.responses.create(model="", tools=tools, tool_choice="none", text=fmt, input=[
        {"role": "user", "content": "Is it sunny in Paris?"}, *[o.model_dump() for o in first.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'}])
    assert second.status == "completed" and json.loads(second.output_text)["answer"] in ("yes", "no")


def test_responses_refuse_stored_state_by_name(base) -> None:
    c = openai.OpenAI(base_url=f"{base}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="", input="Hi", previous_response_id="resp_123")
    assert e.value.body["param"] == "previous_response_id"


def test_messages_create_stream_and_tool_use(base) -> None:
    c = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    m = c.messages.create(model="", max_tokens=8, system="Be brief.", messages=ask)
    assert m.stop_reason in ("end_turn", "max_tokens") and 0 < m.usage.output_tokens <= 8
    with c.messages.stream(model="", max_tokens=8, messages=ask, stop_sequences=["\n\n"]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == "".join(b.text for b in final.content if b.type == "text")
    assert final.usage.output_tokens > 0

    tools = [{"name": "weather", "description": "Weather in a city", "input_schema": CITY}]
    use_msg = c.messages.create(model="", max_tokens=64, messages=ask, tools=tools,
                                tool_choice={"type": "tool", "name": "weather"})
    use = use_msg.content[-1]
    assert use_msg.stop_reason == "tool_use" and use.type == "tool_use" and use.name == "weather"
    assert use.input["city"] in ("Paris", "Rome")
    with c.messages.stream(model="", max_tokens=64, messages=ask, tools=tools,
                           tool_choice={"type": "any"}) as s:
        streamed = s.get_final_message()
    assert streamed.stop_reason == "tool_use" and streamed.content[-1].input["city"] in ("Paris", "Rome")
    done = c.messages.create(model="", max_tokens=8, tools=tools, messages=[
        *ask, {"role": "assistant", "content": [b.model_dump() for b in use_msg.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]}])
    assert done.stop_reason in ("end_turn", "max_tokens") and done.usage.input_tokens > 0


def test_messages_errors_keep_anthropics_shape(base) -> None:
    c = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model="", max_tokens=8, messages=[])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"
