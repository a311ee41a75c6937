"""Console log lines and error bodies hold up against what clients send (issue 23, items 10
and 15)."""

from __future__ import annotations

import json
import logging

import pytest
from llamafleet.common import protocol as P
from llamafleet.common.errors import ERROR_TABLE, ModelNotFound, Overloaded, QueueFull
from llamafleet.common.http_limits import refuse
from llamafleet.common.logs import ConsoleFormatter
from pydantic import ValidationError


def console_line(**extra) -> str:
    record = logging.LogRecord("llamafleet.x", logging.INFO, __file__, 1, "request finished",
                               (), None)
    record.__dict__.update(extra)
    return ConsoleFormatter().format(record)


def test_a_newline_in_a_value_stays_on_one_console_line() -> None:
    line = console_line(user="mallory\n12:00:00 WARNING llamafleet: forged", api="http_chat")
    assert "\n" not in line
    assert 'user="mallory\\n12:00:00 WARNING llamafleet: forged"' in line
    assert line.endswith("api=http_chat")  # plain values stay plain


@pytest.mark.parametrize("value, shown", [
    ("café", "café"),
    ("a b", '"a b"'),
    ("x=1", '"x=1"'),
    ("tab\there", '"tab\\there"'),
    ("", '""'),
    (42, "42"),
])
def test_console_values(value, shown) -> None:
    assert console_line(v=value).endswith(f" v={shown}")


def test_an_error_that_echoes_a_lone_surrogate_still_renders() -> None:
    from llamafleet.inference.http_api import error_response

    response = error_response(ModelNotFound("The model 'x\ud800' does not exist.", param="model"))
    body = json.loads(response.body)
    assert response.status_code == 404
    assert body["error"]["message"] == "The model 'x\\ud800' does not exist."


@pytest.mark.parametrize("err", [ModelNotFound("No model 'x\ud800'.", param="model"),
                                 QueueFull("Too many requests are waiting.")])
async def test_the_plain_asgi_refusal_sends_what_the_http_servers_send(err) -> None:
    """common.http_limits answers without a web framework; the pod's and the router's
    Starlette answers carry the same status, headers and body."""
    from llamafleet.inference.http_api import error_response as pod_response
    from llamafleet.router.app import error_response as router_response

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    await refuse(err, send)
    start, body = sent
    headers = dict(start["headers"])
    assert headers.pop(b"connection") == b"close"
    for response in (pod_response(err), router_response(err)):
        assert start["status"] == response.status_code
        assert body["body"] == response.body
        assert sorted(headers.items()) == sorted(response.raw_headers)


def test_every_error_has_a_grpc_status_of_the_grpc_library() -> None:
    import grpc
    from llamafleet.inference.grpc_server import grpc_status

    for cls, mapping in ERROR_TABLE.items():
        assert isinstance(grpc.StatusCode[mapping.grpc_status], grpc.StatusCode), cls
    assert grpc_status(Overloaded("busy")) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert grpc_status(ModelNotFound("no")) is grpc.StatusCode.NOT_FOUND


def test_a_lone_surrogate_is_refused_with_its_path() -> None:
    with pytest.raises(ValidationError) as e:
        P.ChatCompletionRequest.model_validate(
            {"messages": [{"role": "user", "content": "ok"}, {"role": "user", "content": "a\udc00"}]})
    err = e.value.errors()[0]
    assert err["type"] == "lone_surrogate" and err["ctx"] == {"param": "messages.1.content", "at": 1}
    # Valid characters beyond U+FFFF (a surrogate pair in JSON) are fine.
    P.ChatCompletionRequest.model_validate(
        json.loads('{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'))


@pytest.mark.parametrize("fmt", [{"type": "json_schema"},
                                 {"type": "json_schema", "json_schema": {"name": "x"}}])
def test_json_schema_without_a_schema_is_refused(fmt) -> None:
    with pytest.raises(ValidationError, match="needs json_schema.schema"):
        P.ResponseFormat.model_validate(fmt)
    P.ResponseFormat.model_validate({"type": "json_schema", "json_schema": {"schema": {}}})
