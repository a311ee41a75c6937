"""Tool calling without a model: the families' templates render tools, calls and results,
their call syntaxes parse, and grammar-enforced output streams as OpenAI deltas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llamafleet.common import protocol as P
from llamafleet.inference import tools
from llamafleet.inference.model import CHATML_TEMPLATE, ChatFormatter

# Chat templates as published with the models (copied from llama.cpp's models/templates).
TEMPLATES = Path(__file__).parent.parent / "data" / "templates"

TOOL = P.Tool(type="function", function=P.FunctionDef(
    name="get_weather", description="Weather in a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}},
                "required": ["city"]}))
CALL_ID = "abc123XYZ"  # Mistral's template wants 9 alphanumeric characters
CONVERSATION = P.ChatCompletionRequest(messages=[
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": CALL_ID, "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": CALL_ID, "content": "21 degrees"},
]).messages

FAMILIES = [
    ("Qwen-Qwen2.5-7B-Instruct.jinja", "hermes"),
    ("Qwen-Qwen3-0.6B.jinja", "hermes"),
    ("NousResearch-Hermes-3-Llama-3.1-8B-tool_use.jinja", "hermes"),
    ("meta-llama-Llama-3.2-3B-Instruct.jinja", "llama3"),
    ("mistralai-Mistral-Nemo-Instruct-2407.jinja", "mistral"),
    ("google-gemma-2-2b-it.jinja", "gemma"),
]


def render(source: str, messages=CONVERSATION) -> str:
    native = tools.template_knows_tools(source)
    f = ChatFormatter(source, "<s>", "</s>")
    return f.render(tools.template_messages(messages, native, [TOOL]),
                    [TOOL.model_dump(exclude_none=True)] if native else None)


@pytest.mark.parametrize("name, family", FAMILIES)
def test_family_templates_render_tools_calls_and_results(name, family) -> None:
    source = (TEMPLATES / name).read_text()
    assert tools.family_of(source) == family
    messages = CONVERSATION[1:] if family == "gemma" else CONVERSATION  # no system role
    text = render(source, messages)
    assert "get_weather" in text and "Weather in a city" in text  # the tool is offered
    assert "Paris" in text.split("Weather in Paris?", 1)[1]  # the call's arguments
    assert "21 degrees" in text  # the result


def test_a_template_without_tools_gets_them_in_the_first_user_turn() -> None:
    assert tools.family_of(CHATML_TEMPLATE) == "generic"
    text = render(CHATML_TEMPLATE)
    user = text.split("<|im_start|>user\n", 1)[1]
    assert user.startswith("You may call one or more of these functions")
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert "<tool_response>\n21 degrees\n</tool_response>" in text


@pytest.mark.parametrize("family, text, content", [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
               '</tool_call>', "Sure."),
    ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None),
    ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', None),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', None),
    ("gemma", 'Let me check.\n```tool_code\n{"name": "get_weather", "parameters": '
              '{"city": "Paris"}}\n```', "Let me check."),
    ("generic", '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
     None),
])
def test_family_call_syntax_parses(family, text, content) -> None:
    got_content, calls = tools.parse_calls(family, text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather",
                                                                   {"city": "Paris"})]


@pytest.mark.parametrize("family", ["hermes", "llama3", "mistral", "gemma", "generic"])
def test_plain_text_and_broken_calls_stay_content(family) -> None:
    for text in ["Paris is sunny.", '<tool_call>{"name": "get_weather", "argu',
                 '[TOOL_CALLS][{"nam', '{"nope": 1}']:
        assert tools.parse_calls(family, text) == (text, [])


def test_grammar_output_streams_name_first_then_argument_pieces() -> None:
    text = ('[{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", "n": [1, {"a": 2}]}},'
            ' {"name":"get_time","arguments":{}}]')
    s = tools.CallStream()
    deltas = [d for i in range(0, len(text), 3) for d in s.feed(text[i:i + 3])]
    by_index: dict[int, list[P.ToolCallDelta]] = {}
    for d in deltas:
        by_index.setdefault(d.index, []).append(d)
    assert sorted(by_index) == [0, 1]
    for i, (name, calls) in enumerate(zip(["get_weather", "get_time"], by_index.values(),
                                          strict=True)):
        assert calls[0].function.name == name and calls[0].id.startswith("call_")
        assert all(c.function.name is None and c.id is None for c in calls[1:])
        args = "".join(c.function.arguments for c in calls)
        assert json.loads(args) == json.loads(text)[i]["arguments"]
    assert len(by_index[0]) > 3  # in pieces


def test_call_schema_shapes() -> None:
    other = P.Tool(type="function", function=P.FunctionDef(name="get_time"))
    one = tools.call_schema([TOOL, other], "get_time", parallel=False)
    assert one["properties"]["name"] == {"const": "get_time"}
    assert one["properties"]["arguments"] == {"type": "object"}
    many = tools.call_schema([TOOL, other], None, parallel=True)
    assert many["type"] == "array" and len(many["items"]["anyOf"]) == 2
