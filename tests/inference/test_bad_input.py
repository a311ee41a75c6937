"""Bad input gets a precise OpenAI-shaped error and never disturbs other users."""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from tests.support.servers import send_request, start_server, wait_until

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"


def msgs(text: str = "hi") -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("body, status, param, needle", [
    ({"messages": []}, 400, "messages", "at least 1"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages", "role"),
    ({"messages": msgs(), "temperature": 5}, 400, "temperature", "less than or equal to 2"),
    ({"messages": msgs(), "top_p": 0}, 400, "top_p", "greater than 0"),
    ({"messages": msgs(), "max_tokens": 0}, 400, "max_tokens", "greater than or equal to 1"),
    ({"messages": msgs(), "n": 3}, 400, "n", "less than or equal to 1"),
    ({"messages": msgs(), "stop": [""]}, 400, "stop", "empty"),
    ({"messages": msgs(), "presence_penalty": 3}, 400, "presence_penalty", "2"),
    ({}, 400, "messages", "Missing required parameter"),
    ({"messages": msgs(), "model": "gpt-4"}, 404, "model", "does not exist"),
    ({"messages": [{"role": "system", "content": "only system"}]}, 400, None, "user message"),
    ({"messages": msgs(), "temprature": 1}, 400, "temprature", "Unrecognized request argument"),
    ({"messages": [{"role": "user", "content": "x", "colour": 1}]}, 400, "messages.0.colour",
     "Unrecognized"),
    ({"messages": msgs(), "logit_bias": {"1": 5}}, 400, "logit_bias", "unsupported parameter"),
    ({"messages": [*msgs(), {"role": "assistant", "content": "x", "function_call": {"name": "f"}}]},
     400, "messages.1.function_call", "use 'tool_calls'"),
    ({"messages": msgs(), "top_logprobs": 2}, 400, None, "needs logprobs"),
    ({"messages": msgs(), "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs", "20"),
    ({"messages": msgs(), "tool_choice": "required"}, 400, None, "needs tools"),
    ({"messages": msgs(), "tools": [{"type": "function", "function": {"name": "a b"}}]}, 400,
     "tools", "pattern"),
    ({"messages": msgs(), "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "string", "maxLength": 100000}}}],
      "tool_choice": "required"}, 400, "tools", "limit"),
    ({"messages": msgs(), "tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, None,
     "not in tools"),
    # Nothing to enforce: was unconstrained output (issue 23, item 15).
    ({"messages": msgs(), "response_format": {"type": "json_schema"}}, 400, "response_format",
     "needs json_schema.schema"),
    ({"messages": msgs(), "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     400, "response_format", "needs json_schema.schema"),
])
def test_bad_chat_requests(server, body, status, param, needle) -> None:
    r = httpx.post(server.url + CHAT, json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"]
    if param:
        assert err["param"] == param


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "best_of": 2}, "best_of"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "colour": 1}, "colour"),
])
def test_bad_completion_fields_are_named(server, body, param) -> None:
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


@pytest.mark.parametrize("path, body, param", [
    (CHAT, {"messages": msgs("a\ud800b")}, "messages.0.content"),
    (CHAT, {"messages": [{"role": "system", "content": "\ud800"}, *msgs()]}, "messages.0.content"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": "x\udfff"}]}]},
     "messages.0.content.0.text"),
    (CHAT, {"messages": msgs(), "rag_context": "facts \ud800"}, "rag_context"),
    (CHAT, {"messages": msgs(), "model": "\ud800"}, "model"),
    (CHAT, {"messages": msgs(), "user": "u\ud800"}, "user"),
    (CHAT, {"messages": msgs(), "stop": ["\ud800"]}, "stop.0"),
    (CHAT, {"messages": msgs(), "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"\ud800": {}}}}}],
      "tool_choice": "required"}, "tools.0.function.parameters.properties"),
    ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"prompt": ["ok \ud800"]}, "prompt.0"),
    ("/v1/embeddings", {"input": "\ud800"}, "input"),
    ("/v1/embeddings", {"input": ["fine", "bad \ud800"]}, "input.1"),
    ("/v1/embeddings", {"input": "x", "model": "\udbff"}, "model"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(server, path, body, param) -> None:
    """JSON may escape a lone UTF-16 surrogate (\\ud800); it is not Unicode text. It gave a
    500 (and for `model`, building the 404 crashed): issue 23, item 10."""
    content = json.dumps(body).encode()  # ASCII JSON: "\\ud800" as the escape
    assert b"\\ud" in content
    r = httpx.post(server.url + path, content=content, timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert "lone UTF-16 surrogate" in err["message"] and f"'{param}'" in err["message"]


def test_an_unknown_model_in_the_path_gets_a_404(server) -> None:
    # Bytes that are not UTF-8 (a surrogate's UTF-8-like encoding) in the path: still a 404.
    r = httpx.get(server.url + "/v1/models/%ED%A0%80x", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_malformed_json(server) -> None:
    r = httpx.post(server.url + CHAT, content=b'{"messages": [', timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "could not parse the JSON body" in r.json()["error"]["message"]


def test_prompt_longer_than_context_names_both_lengths(server) -> None:
    r = httpx.post(server.url + CHAT, json={"messages": msgs("word " * 2000)}, timeout=30)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded"
    assert "maximum context length is 1024 tokens" in err["message"]
    n = int(err["message"].split("resulted in ")[1].split(" ")[0])
    assert n > 1024
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "word " * 2000}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_completion_token_ids_outside_the_vocabulary(server) -> None:
    r = httpx.post(server.url + "/v1/completions", json={"prompt": [1, 10**9]}, timeout=30)
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]


def test_official_client_sees_typed_errors(server) -> None:
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=server.serving.model_id, messages=[])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=msgs())


def test_bad_input_does_not_disturb_a_running_stream(server) -> None:
    result: dict = {}

    def stream() -> None:
        with httpx.stream("POST", server.url + CHAT, timeout=120, json={
                "messages": msgs("Tell me a long story."), "max_tokens": 60, "stream": True,
                "ignore_eos": True, "stream_options": {"include_usage": True}}) as r:
            result["lines"] = [line for line in r.iter_lines() if line.startswith("data: ")]

    t = threading.Thread(target=stream)
    t.start()
    for body in ({"messages": []}, {"messages": msgs(), "temperature": -1},
                 {"messages": msgs("x " * 3000)}):
        assert httpx.post(server.url + CHAT, json=body, timeout=30).status_code == 400
    httpx.post(server.url + CHAT, content=b"{{{{", timeout=30,
               headers={"content-type": "application/json"})
    t.join(120)
    lines = result["lines"]
    assert lines[-1] == "data: [DONE]"
    assert '"completion_tokens":60' in lines[-2]


@pytest.fixture(scope="module")
def tight_server(model_path):
    srv = start_server(model_path=model_path, max_batch_size=1, queue_size=1,
                       api_key="s3cret", grpc_port=0, metrics_port=0)
    yield srv
    srv.stop()


def test_api_key_is_required_when_set(tight_server) -> None:
    url = tight_server.url + "/v1/models"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}).json()["error"]["code"] == \
        "invalid_api_key"
    assert httpx.get(url, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert httpx.get(tight_server.url + "/health").status_code == 200


def test_full_queue_answers_overloaded_at_once(tight_server) -> None:
    headers = {"Authorization": "Bearer s3cret"}
    engine = tight_server.serving.engine
    # Long enough that neither stream can finish while the test looks at the queue.
    body = {"messages": msgs(), "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120, headers=headers) as h:
        with h.stream("POST", tight_server.url + CHAT, json=body) as running:
            # Keep the line iterator referenced: a discarded one is closed by the garbage
            # collector, which closes the connection and cancels this request.
            lines = running.iter_lines()
            next(lines)
            wait_until(lambda: engine.running == 1)
            # A queued stream has no status line yet (it comes with its first token).
            with send_request(tight_server.url, CHAT, body, headers):
                wait_until(lambda: engine.queued == 1)
                r = h.post(tight_server.url + CHAT, json={**body, "stream": False})
                assert r.status_code == 503
                assert r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "overloaded"
