"""The request limits of limits.py, checked without a model."""

from __future__ import annotations

import pytest
from llamafleet.common.errors import BadRequest
from llamafleet.inference.limits import MAX_SCHEMA_BOUND, MAX_SCHEMA_DEPTH, check_json_schema


def nested(depth: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 64},
                                      "tags": {"type": "array", "maxItems": 8,
                                               "items": {"type": "string"}}}},
    {"type": "string", "pattern": "^[a-z]{2,16}$", "maxLength": MAX_SCHEMA_BOUND},
    # a property named like a keyword, and data that looks like one, are not bounds
    {"type": "object", "properties": {"maxLength": {"type": "string"}},
     "default": {"maxItems": 10**9}},
    {"$defs": {"a": {"type": "integer"}}, "$ref": "#/$defs/a"},
    nested(MAX_SCHEMA_DEPTH // 2),
])
def test_ordinary_schemas_pass(schema: dict) -> None:
    check_json_schema(schema)


@pytest.mark.parametrize("schema, needle", [
    ({"type": "string", "maxLength": 200000}, "maxLength is 200000"),
    ({"type": "string", "minLength": -1}, "non-negative"),
    ({"type": "array", "minItems": 5000}, "minItems"),
    ({"type": "array", "maxItems": 5000}, "maxItems"),
    ({"type": "string", "pattern": "^a{0,100000}$"}, "pattern {0,100000}"),
    ({"type": "string", "pattern": "^a{3000}$"}, "{3000}"),
    ({"type": "string", "pattern": "a" * 600}, "pattern must be"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 250}
                                       for i in range(20)}}, "add up"),
    (nested(MAX_SCHEMA_DEPTH), "deeper"),
    ({"$ref": "https://example.com/schema.json"}, "$ref"),
    ({"enum": ["x" * 20000]}, "bytes"),
])
def test_schemas_over_the_limits_are_refused_by_name(schema: dict, needle: str) -> None:
    with pytest.raises(BadRequest) as e:
        check_json_schema(schema)
    assert e.value.param == "response_format"
    assert needle in e.value.message
