"""Hard limits on what one request may ask for, and the checks that enforce them.

Each limit keeps a single unauthenticated request from taking the pod down or stalling
other users; the README ("Limits") lists them with the same reasons.
"""

from __future__ import annotations

import json
import re
from typing import Any

from llamafleet.common.errors import BadRequest

# --- stop strings (both APIs) ----------------------------------------------------------------
# The engine looks for every stop string in the text of every token of a sequence, on the
# engine thread; more or longer ones slow every user's step.
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 64

# --- response_format json_schema ---------------------------------------------------------------
# llama-cpp-python's converter spells a bound such as maxLength: N as N nested optional
# groups, and llama.cpp's grammar parser recurses once per group: 200000 overflows the
# stack (SIGSEGV). Measured here: 512 still parses (0.4 ms), 1024 is refused by llama.cpp's
# own repetition check, so each bound is capped at 256 (margin for items made of several
# rules), and their sum, which the grammar's size follows, at 4096.
MAX_SCHEMA_BYTES = 16 * 1024  # the schema as compact JSON
MAX_SCHEMA_DEPTH = 32  # nesting of objects/arrays in the schema document
MAX_SCHEMA_BOUND = 256  # any minLength/maxLength/minItems/maxItems/{m,n} in a pattern
MAX_SCHEMA_BOUNDS_TOTAL = 4096  # all of those bounds added up
MAX_PATTERN_CHARS = 512  # a regular expression in "pattern"
SCHEMA_CONVERT_TIMEOUT_S = 1.0  # converting the schema to a grammar, off the event loop
_BOUND_KEYS = ("minLength", "maxLength", "minItems", "maxItems", "minProperties",
               "maxProperties")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_DATA_KEYS = ("const", "enum", "default", "examples")  # JSON values, not schemas
_QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


def check_json_schema(schema: Any, param: str = "response_format") -> None:
    """Refuse a schema whose grammar would be too big to build or parse, before building it
    (response_format's, or the one made from tools' parameters; errors name ``param``)."""
    where_ = "response_format.json_schema" if param == "response_format" else param

    def _schema_error(message: str) -> BadRequest:
        return BadRequest(f"{where_}: {message}", param=param)

    size = len(json.dumps(schema, separators=(",", ":")))
    if size > MAX_SCHEMA_BYTES:
        raise _schema_error(f"the schema is {size} bytes; the limit is {MAX_SCHEMA_BYTES}")
    total = 0

    def bound(where: str, value: Any) -> None:
        nonlocal total
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise _schema_error(f"{where} must be a non-negative integer")
        if value > MAX_SCHEMA_BOUND:
            raise _schema_error(f"{where} is {value}; the limit is {MAX_SCHEMA_BOUND}")
        total += value
        if total > MAX_SCHEMA_BOUNDS_TOTAL:
            raise _schema_error("the length and item bounds add up to more than "
                                f"{MAX_SCHEMA_BOUNDS_TOTAL}")

    def walk(node: Any, path: str, depth: int) -> None:
        if depth > MAX_SCHEMA_DEPTH:
            raise _schema_error(f"the schema is nested deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}[{i}]", depth + 1)
            return
        if not isinstance(node, dict):
            return
        for key in _BOUND_KEYS:
            if key in node:
                bound(f"{path}.{key}", node[key])
        ref = node.get("$ref")
        if ref is not None and not (isinstance(ref, str) and ref.startswith("#/")):
            raise _schema_error(f"{path}.$ref must point inside the schema ('#/...')")
        pattern = node.get("pattern")
        if pattern is not None:
            if not isinstance(pattern, str) or len(pattern) > MAX_PATTERN_CHARS:
                raise _schema_error(f"{path}.pattern must be a string of at most "
                                    f"{MAX_PATTERN_CHARS} characters")
            for m in _QUANTIFIER.finditer(pattern):
                for n in m.groups():
                    if n:
                        bound(f"{path}.pattern {m.group(0)}", int(n))
        for key, value in node.items():
            if key in _DATA_KEYS:
                continue
            if key in _SCHEMA_MAPS and isinstance(value, dict):
                for name, sub in value.items():
                    walk(sub, f"{path}.{key}.{name}", depth + 2)
            else:
                walk(value, f"{path}.{key}", depth + 1)

    walk(schema, "schema", 0)
