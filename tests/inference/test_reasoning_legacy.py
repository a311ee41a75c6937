"""llama-server's ``deepseek-legacy`` reasoning format on the scripted backend: whole answers
move the thoughts to the reasoning field (as ``deepseek``); streamed ones leave them in the
text, in their tags (with the ``<think>`` the template opened)."""

from __future__ import annotations

import anthropic
import openai
import pytest

from tests.support.scripted import CHATML, THINKING, ScriptedPod

ASK = [{"role": "user", "content": "Is it sunny?"}]
SCRIPT = ["<think>", "Paris is", " in France", "</think>", "\n\nSunny."]


@pytest.mark.parametrize("opened", [False, True])
async def test_legacy_moves_whole_thoughts_and_streams_them_inline(opened: bool) -> None:
    pod = ScriptedPod(SCRIPT[1:] if opened else SCRIPT, template=THINKING if opened else CHATML)
    legacy = {"reasoning_format": "deepseek-legacy"}
    try:
        c = openai.AsyncOpenAI(base_url="http://pod/v1", api_key="x", http_client=pod.client())
        r = await c.chat.completions.create(model="scripted", messages=ASK, extra_body=legacy)
        msg = r.choices[0].message
        assert (msg.content, msg.model_extra["reasoning_content"]) == ("Sunny.", "Paris is in France")
        chunks = [ch async for ch in await c.chat.completions.create(
            model="scripted", messages=ASK, stream=True, extra_body=legacy)]
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        assert "".join(d.content or "" for d in deltas) == \
            "<think>Paris is in France</think>\n\nSunny."
        assert not any(d.model_extra.get("reasoning_content") for d in deltas)
        async with c.responses.stream(model="scripted", input="?", extra_body=legacy) as s:
            final = await s.get_final_response()
        assert [o.type for o in final.output] == ["message"]
        assert final.output_text.startswith("<think>Paris")
    finally:
        pod.close()


async def test_legacy_as_the_pods_default_and_on_messages() -> None:
    pod = ScriptedPod(SCRIPT, reasoning_format="deepseek-legacy")
    try:
        claude = anthropic.AsyncAnthropic(base_url="http://pod", api_key="x",
                                          http_client=pod.client2(), max_retries=0)
        m = await claude.messages.create(model="scripted", max_tokens=20, messages=ASK)
        assert [b.type for b in m.content] == ["thinking", "text"]
        async with claude.messages.stream(model="scripted", max_tokens=20, messages=ASK) as s:
            final = await s.get_final_message()
        assert [b.type for b in final.content] == ["text"]
        assert final.content[0].text == "<think>Paris is in France</think>\n\nSunny."
        async with pod.client() as h:
            r = await h.post("/v1/chat/completions", json={
                "messages": ASK, "reasoning_format": "deepseek-legacyy"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "reasoning_format"
    finally:
        pod.close()
