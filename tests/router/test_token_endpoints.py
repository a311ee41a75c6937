"""The token endpoints through a real `llamafleet router` to a real pod (SmolLM2-135M-Instruct):
/tokenize, /detokenize and the render endpoints answer as the pod does, and the rendered
prompt is the one the generating endpoints run (their usage counts it)."""

from __future__ import annotations

import httpx
import pytest

from tests.support.servers import start_router

pytestmark = pytest.mark.integration

CHAT = {"messages": [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "Name a colour."}]}


@pytest.fixture(scope="module")
def router(instruct_server):
    r = start_router([instruct_server.url])
    yield r
    print(r.stop()[-4000:])  # shown when a test failed


def post(base: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(base + path, json=body, timeout=60)


def test_tokenize_and_detokenize_through_the_router(router, instruct_server) -> None:
    text = "Hello, wörld! 🙂"
    for special in (False, True):
        body = {"content": text, "add_special": special}
        r = post(router.url, "/tokenize", body)
        assert r.status_code == 200 and "x-llamafleet-backend" in r.headers
        assert r.json() == post(instruct_server.url, "/tokenize", body).json()
    tokens = post(router.url, "/tokenize", {"content": text})
    assert tokens.json()["tokens"] == instruct_server.serving.model.tokenize(text, False)
    back = post(router.url, "/detokenize", tokens.json())
    assert back.json() == {"content": text}
    bad = post(router.url, "/detokenize", {"tokens": [-1]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_render_through_the_router_is_the_prompt_that_runs(router, instruct_server) -> None:
    r = post(router.url, "/v1/chat/completions/render", CHAT)
    assert r.status_code == 200
    ids = r.json()["token_ids"]
    assert ids == post(instruct_server.url, "/v1/chat/completions/render", CHAT).json()["token_ids"]
    ran = post(router.url, "/v1/chat/completions", {**CHAT, "max_tokens": 1})
    assert ran.json()["usage"]["prompt_tokens"] == len(ids)

    prompt = {"prompt": "Once upon a time"}
    ids = post(router.url, "/v1/completions/render", prompt).json()["token_ids"]
    assert ids == post(router.url, "/tokenize", {"content": prompt["prompt"],
                                                 "add_special": True}).json()["tokens"]
    ran = post(router.url, "/v1/completions", {**prompt, "max_tokens": 1})
    assert ran.json()["usage"]["prompt_tokens"] == len(ids)

    bad = post(router.url, "/v1/chat/completions/render", {"messages": []})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
