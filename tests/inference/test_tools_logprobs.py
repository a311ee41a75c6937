"""Tool calling and logprobs on the real instruct model, judged by the official client."""

from __future__ import annotations

import json
import math

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

pytestmark = pytest.mark.integration

WEATHER = {"type": "object",
           "properties": {"city": {"type": "string", "maxLength": 20},
                          "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
        "required": ["zone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "description": "Time in a zone",
                                      "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture()
def client(instruct_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=instruct_server.url + "/v1", api_key="unused", max_retries=0)


def _check_calls(calls, names, held_to_schema: bool = True) -> None:
    """Calls as OpenAI's: ids, offered names, JSON arguments; held to the function's schema
    when a grammar held them (required or named), not under auto (the model's own text)."""
    assert calls
    for c in calls:
        assert c.id.startswith("call_") and c.type == "function"
        assert c.function.name in names
        arguments = json.loads(c.function.arguments)
        if held_to_schema:
            jsonschema.validate(arguments, SCHEMAS[c.function.name])


@pytest.mark.parametrize("choice, names", [
    ("required", {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
])
def test_required_and_named_calls_are_valid(client, choice, names) -> None:
    r = client.chat.completions.create(model=client.models.list().data[0].id,
                                       messages=ASK, tools=TOOLS, tool_choice=choice,
                                       max_tokens=80, temperature=0)
    choice0 = r.choices[0]
    assert choice0.finish_reason == "tool_calls", choice0
    assert choice0.message.content is None
    _check_calls(choice0.message.tool_calls, names)


@pytest.mark.parametrize("choice, names", [
    ("required", {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}),
])
def test_streamed_calls_name_first_then_arguments_in_pieces(client, choice, names) -> None:
    stream = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=ASK, tools=TOOLS, tool_choice=choice,
        parallel_tool_calls=False, max_tokens=80, temperature=0, stream=True)
    calls: dict[int, dict] = {}
    pieces = 0
    finish = None
    for chunk in stream:
        ch = chunk.choices[0]
        finish = ch.finish_reason or finish
        for d in ch.delta.tool_calls or ():
            if d.index not in calls:
                assert d.function.name and d.id.startswith("call_")  # the name comes first
                calls[d.index] = {"name": d.function.name, "args": ""}
            else:
                assert d.function.name is None
                calls[d.index]["args"] += d.function.arguments
                pieces += 1
    assert finish == "tool_calls"
    assert list(calls) == [0]  # parallel_tool_calls=False: one call
    assert pieces > 1  # the arguments arrive in pieces
    call = calls[0]
    assert call["name"] in names
    jsonschema.validate(json.loads(call["args"]), SCHEMAS[call["name"]])


class Address(BaseModel):
    city: str = Field(max_length=20)
    country: str = Field(max_length=20)


class Person(BaseModel):
    """As instructor sends a response model: pydantic's schema, with $defs and $ref."""

    name: str = Field(max_length=20)
    home: Address


PERSON_TOOL = {"type": "function", "function": {
    "name": "Person", "description": "Correctly extracted `Person` with all the required "
    "parameters with correct types", "parameters": Person.model_json_schema()}}
NAMED = {"type": "function", "function": {"name": "Person"}}
PEOPLE = ["Alice lives in Paris, France.", "Bob moved to Berlin in Germany last year.",
          "My neighbour Chen is from Shanghai, China.", "Dana grew up in Lima, Peru.",
          "Extract: Emeka, Lagos, Nigeria.", "Who is Farid? He lives in Cairo, Egypt."]


def test_pydantic_schema_with_defs_works_as_a_required_and_a_named_tool(client) -> None:
    assert "$defs" in PERSON_TOOL["function"]["parameters"]  # the case of issue 23, item 13
    for choice in ("required", NAMED):
        r = client.chat.completions.create(
            model=client.models.list().data[0].id, tools=[PERSON_TOOL, *TOOLS],
            tool_choice=choice, max_tokens=120, temperature=0,
            messages=[{"role": "user", "content": PEOPLE[0]}])
        calls = r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "tool_calls" and calls, r
        for c in calls:
            if c.function.name == "Person":
                Person.model_validate_json(c.function.arguments)
            else:
                jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_named_choice_is_exactly_one_well_formed_call(client, stream) -> None:
    """issue 23, item 14: the grammar allowed an array of calls (the model went on adding
    calls, or two when streamed), and a raw newline in a string made the answer plain
    content with finish_reason stop."""
    model = client.models.list().data[0].id
    for text in PEOPLE[:3] if stream else PEOPLE:
        args = dict(model=model, messages=[{"role": "user", "content": text}],
                    tools=[PERSON_TOOL, *TOOLS], tool_choice=NAMED, max_tokens=120,
                    temperature=0)
        if stream:
            calls: dict[int, dict] = {}
            finish = None
            for chunk in client.chat.completions.create(stream=True, **args):
                ch = chunk.choices[0]
                assert ch.delta.content in (None, ""), chunk  # never content
                finish = ch.finish_reason or finish
                for d in ch.delta.tool_calls or ():
                    call = calls.setdefault(d.index, {"name": d.function.name, "args": ""})
                    call["args"] += d.function.arguments or ""
            assert finish == "tool_calls" and list(calls) == [0], (text, calls)
            name, arguments = calls[0]["name"], calls[0]["args"]
        else:
            r = client.chat.completions.create(**args)
            msg = r.choices[0].message
            assert r.choices[0].finish_reason == "tool_calls" and msg.content is None, (text, r)
            assert len(msg.tool_calls) == 1, (text, msg.tool_calls)
            name, arguments = msg.tool_calls[0].function.name, msg.tool_calls[0].function.arguments
        assert name == "Person"
        Person.model_validate_json(arguments)  # strict JSON, the schema's shape


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_forced_call_that_cannot_be_completed_is_an_error_not_content(client, stream) -> None:
    args = dict(model=client.models.list().data[0].id, tools=[PERSON_TOOL], tool_choice=NAMED,
                messages=[{"role": "user", "content": PEOPLE[0]}], max_tokens=4)
    with pytest.raises(openai.APIError) as caught:
        if stream:
            for chunk in client.chat.completions.create(stream=True, **args):
                assert chunk.choices[0].finish_reason is None, chunk  # no "stop" before it
        else:
            client.chat.completions.create(**args)
    err = caught.value
    assert "max_tokens ran out before the forced tool call was complete" in err.message
    if not stream:
        assert isinstance(err, openai.BadRequestError)
        assert err.code == "tool_call_incomplete" and err.param == "max_tokens"


def test_required_with_parallel_tool_calls_false_is_one_call(client) -> None:
    r = client.chat.completions.create(
        model=client.models.list().data[0].id, tools=[PERSON_TOOL, *TOOLS],
        tool_choice="required", parallel_tool_calls=False, max_tokens=120, temperature=0,
        messages=[{"role": "user", "content": "Weather in Paris and the time in Tokyo?"}])
    assert r.choices[0].finish_reason == "tool_calls"
    assert len(r.choices[0].message.tool_calls) == 1


def test_tool_result_round_trip(client) -> None:
    model = client.models.list().data[0].id
    first = client.chat.completions.create(
        model=model, messages=ASK, tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=80, temperature=0)
    call = first.choices[0].message.tool_calls[0]
    # The response's message object itself, as agent frameworks send it back.
    messages = [*ASK, first.choices[0].message,
                {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    second = client.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                            max_tokens=30, temperature=0)
    # The same tools and question, plus the call and its result: a longer prompt.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 10
    msg = second.choices[0].message
    assert msg.content or msg.tool_calls
    final = client.chat.completions.create(model=model, messages=messages, tools=TOOLS,
                                           tool_choice="none", max_tokens=30, temperature=0)
    assert final.choices[0].message.content and final.choices[0].message.tool_calls is None


def test_auto_answers_text_or_a_valid_call(client) -> None:
    r = client.chat.completions.create(model=client.models.list().data[0].id, messages=ASK,
                                       tools=TOOLS, max_tokens=80, temperature=0)
    choice = r.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        _check_calls(choice.message.tool_calls, set(SCHEMAS), held_to_schema=False)
    else:
        assert choice.message.content


def test_top_logprobs_two_alternatives_per_token(client) -> None:
    r = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": "Hi!"}],
        max_tokens=8, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 8
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 2
        assert all(a.logprob <= 0 for a in t.top_logprobs)
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.logprob <= t.top_logprobs[0].logprob + 1e-6
        assert sum(math.exp(a.logprob) for a in t.top_logprobs) <= 1 + 1e-6
    assert "".join(t.token for t in content) == r.choices[0].message.content
    # Greedy: the sampled token is the most likely one.
    g = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": "Hi!"}],
        max_tokens=4, logprobs=True, top_logprobs=1, temperature=0, extra_body={"repeat_penalty": 1})
    for t in g.choices[0].logprobs.content:
        assert t.token == t.top_logprobs[0].token and t.logprob == t.top_logprobs[0].logprob


def test_logprobs_streamed_and_on_completions(client) -> None:
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi!"}], max_tokens=6,
        logprobs=True, top_logprobs=2, stream=True, extra_body={"ignore_eos": True})
    tokens = [t for c in stream if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.content]
    assert len(tokens) == 6 and all(len(t.top_logprobs) == 2 for t in tokens)
    r = client.completions.create(model=model, prompt="One, two,", max_tokens=5, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) <= 3 for t in lp.top_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text
