"""Tool calling without a model: the families' templates render tools, calls and results,
their call syntaxes parse, and grammar-enforced output streams as OpenAI deltas."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llamafleet.common import protocol as P
from llamafleet.inference import tool_calls as tools
from llamafleet.inference.model import CHATML_TEMPLATE, ChatFormatter
from llamafleet.inference.tool_families import BY_NAME, family_for

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
    native = family_for(source).knows_tools
    f = ChatFormatter(source, "<s>", "</s>")
    return f.render(tools.template_messages(messages, native, [TOOL]),
                    [TOOL.model_dump(exclude_none=True)] if native else None)


@pytest.mark.parametrize("name, family", FAMILIES)
def test_family_templates_render_tools_calls_and_results(name, family) -> None:
    source = (TEMPLATES / name).read_text()
    assert family_for(source).name == family
    messages = CONVERSATION[1:] if family == "gemma" else CONVERSATION  # no system role
    text = render(source, messages)
    assert "get_weather" in text and "Weather in a city" in text  # the tool is offered
    assert "Paris" in text.split("Weather in Paris?", 1)[1]  # the call's arguments
    assert "21 degrees" in text  # the result


def test_a_template_without_tools_gets_them_in_the_first_user_turn() -> None:
    assert family_for(CHATML_TEMPLATE).name == "generic"
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
    got_content, calls = BY_NAME[family]().parse(text)
    assert got_content == content
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather",
                                                                   {"city": "Paris"})]


@pytest.mark.parametrize("family", ["hermes", "llama3", "mistral", "gemma", "generic"])
def test_plain_text_and_broken_calls_stay_content(family) -> None:
    for text in ["Paris is sunny.", '<tool_call>{"name": "get_weather", "argu',
                 '[TOOL_CALLS][{"nam', '{"nope": 1}']:
        assert BY_NAME[family]().parse(text) == (text, [])


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


# --- forced calls (issue 23, items 13 and 14) --------------------------------------------------

# As pydantic's model_json_schema writes a model with a nested model (instructor sends this).
PERSON = {
    "$defs": {"Address": {"properties": {"city": {"title": "City", "type": "string"},
                                         "zip": {"title": "Zip", "type": "integer"}},
                          "required": ["city", "zip"], "title": "Address", "type": "object"}},
    "properties": {"name": {"title": "Name", "type": "string"},
                   "home": {"$ref": "#/$defs/Address"},
                   "past": {"items": {"$ref": "#/$defs/Address"}, "type": "array"}},
    "required": ["name", "home"], "title": "Person", "type": "object"}
# Another function whose definitions reuse the name Address, with other fields.
SHIP = {"definitions": {"Address": {"type": "object", "properties": {"port": {"type": "string"}},
                                    "required": ["port"]}},
        "type": "object", "properties": {"to": {"$ref": "#/definitions/Address"},
                                         "also": {"$ref": "#/properties/to"}},
        "required": ["to"]}


def fn(name: str, parameters: dict | None = None) -> P.Tool:
    return P.Tool(type="function", function=P.FunctionDef(name=name, parameters=parameters))


def resolve(schema: dict, ref: str):
    node = schema
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    return node


def refs(node) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if "$ref" in node else []
        return own + [r for v in node.values() for r in refs(v)]
    return [r for v in node for r in refs(v)] if isinstance(node, list) else []


@pytest.mark.parametrize("name, parallel", [("person", True), (None, False), (None, True)])
def test_call_schemas_keep_the_functions_defs_reachable(name, parallel) -> None:
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    schema = tools.call_schema([fn("person", PERSON), fn("ship", SHIP)], name, parallel)
    found = refs(schema)
    assert found and all(r.startswith("#/$defs/") for r in found)
    for r in found:  # every reference resolves from the root of the call schema
        assert isinstance(resolve(schema, r), dict), r
    grammar = json_schema_to_gbnf(json.dumps(schema))  # raised on unresolvable references
    assert '\\"zip\\"' in grammar
    if name is None:  # both functions' Address, not one rule for the two
        assert '\\"port\\"' in grammar


def test_a_named_choice_is_one_call_object_even_with_parallel_calls() -> None:
    other = fn("get_time")
    named = tools.call_schema([TOOL, other], "get_time", parallel=True)
    assert named["type"] == "object" and named["properties"]["name"] == {"const": "get_time"}
    assert tools.call_schema([TOOL, other], None, parallel=False)["anyOf"]  # one of them
    many = tools.call_schema([TOOL, other], None, parallel=True)
    assert many["type"] == "array" and many["minItems"] == 1


def test_grammar_strings_cannot_hold_raw_control_characters() -> None:
    from llamafleet.inference.serving import json_schema_to_gbnf

    grammar = json_schema_to_gbnf(tools.call_schema([fn("person", PERSON)], "person", False))
    rules = dict(line.split(" ::= ", 1) for line in grammar.splitlines() if " ::= " in line)
    assert rules["char"].startswith(r'[^"\\\x7F\x00-\x1F] | "\\"')
    assert "char*" in rules["string"]
    bounded = json_schema_to_gbnf({"type": "string", "maxLength": 5})  # char via repetition
    assert r"[^\"\\\x7F\x00-\x1F]" in bounded or r'[^"\\\x7F\x00-\x1F]' in bounded


@pytest.mark.parametrize("text, parallel, calls", [
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', False, 1),
    ('[{"name": "get_weather", "arguments": {}}, {"name": "get_time", "arguments": {}}]', True, 2),
    ('{"name": "get_weather", "arguments": {"city": "Pa\\nris"}}', False, 1),  # escaped
])
def test_forced_calls_parse(text, parallel, calls) -> None:
    got = tools.forced_calls(text, {"get_weather", "get_time"}, parallel)
    assert len(got) == calls and all(isinstance(json.loads(c.arguments), dict) for c in got)


@pytest.mark.parametrize("text, parallel", [
    ('{"name": "get_weather", "arguments": {"city": "Pa\nris"}}', False),  # raw newline
    ('{"name": "get_weather", "arguments": {"city": "Par', False),  # cut by max_tokens
    ('[{"name": "get_weather", "arguments": {}}]', False),  # a list where one call was asked
    ('[]', True),
    ('{"name": "get_time", "arguments": {}}', False),  # not the named function
    ('{"name": "get_weather", "arguments": "{}"}', False),
    ('{"name": "get_weather", "arguments": {}, "extra": 1}', False),
    ('"get_weather"', False),
])
def test_forced_calls_refuse_anything_else(text, parallel) -> None:
    with pytest.raises(tools.MalformedCalls):
        tools.forced_calls(text, {"get_weather"}, parallel)


@pytest.mark.parametrize("reason, stop, status, param", [
    ("length", [], 400, "max_tokens"),  # max_tokens ran out inside the call
    ("stop", ["}"], 400, "stop"),  # a stop string cut it
    ("stop", [], 500, None),  # the grammar should have made that impossible: ours
])
def test_an_incomplete_forced_call_is_an_error_naming_its_cause(reason, stop, status, param) -> None:
    from types import SimpleNamespace

    from llamafleet.common.errors import mapping_for, openai_body
    from llamafleet.inference.generation_core import forced_call_error

    err = forced_call_error("cut", SimpleNamespace(reason=reason), stop)
    assert mapping_for(err).http_status == status and err.param == param
    assert openai_body(err)["error"]["code"] == ("tool_call_incomplete" if status == 400
                                                 else "tool_call_invalid")
