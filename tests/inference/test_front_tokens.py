"""The token endpoints without a model: the same prompt the generating doors run."""

from __future__ import annotations

import pytest

from tests.support.scripted import BASE, ScriptedPod


@pytest.fixture
def pod():
    p = ScriptedPod(["x"])
    yield p
    p.close()


async def test_render_gives_the_prompt_the_generation_would_run(pod) -> None:
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    async with pod.client() as c:
        ids = (await c.post("/v1/chat/completions/render", json=chat)).json()["token_ids"]
        assert ids[-1] == BASE and bytes(t - 1 for t in ids[:-1]).decode() == pod.model.prompts[-1]
        rendered = pod.model.prompts[-1]
        await c.post("/v1/chat/completions", json=chat)
        assert pod.model.prompts[-1] == rendered
        r = await c.post("/v1/completions/render", json={"prompt": "abc"})
        assert r.json()["token_ids"] == [98, 99, 100, BASE]
        r = await c.post("/v1/chat/completions/render", json={"messages": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


async def test_tokenize_and_detokenize(pod) -> None:
    async with pod.client() as c:
        assert (await c.post("/tokenize", json={"content": "ab"})).json() == {"tokens": [98, 99, BASE]}
        r = await c.post("/detokenize", json={"tokens": [BASE + 1]})
        assert r.json() == {"content": "x"}
        r = await c.post("/detokenize", json={"tokens": [-1]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tokens"
        r = await c.post("/tokenize", json={"text": "ab"})
        assert r.status_code == 400
