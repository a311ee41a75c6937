"""Which stop string ended the text: the engine reports it in ``Finished.stop``, and the
Messages front door answers ``stop_reason: stop_sequence`` naming it (scripted backend)."""

from __future__ import annotations

import anthropic
import openai
import pytest
from llamafleet.inference.engine import TextAssembler

from tests.support.scripted import ScriptedPod

ASK = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def pod():
    p = ScriptedPod(["Hello", ",", " world", "!"])
    yield p
    p.close()


def claude(pod: ScriptedPod) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url="http://pod", api_key="x",
                                    http_client=pod.client2(), max_retries=0)


def test_the_assembler_names_the_earliest_stop_string() -> None:
    t = TextAssembler(["!", " wor"])
    assert (t.feed(b"Hello, wo"), t.matched) == (("Hello,", False), None)
    assert (t.feed(b"rld!"), t.matched) == (("", True), " wor")


async def test_messages_name_the_stop_sequence_that_ended_the_text(pod) -> None:
    c = claude(pod)
    m = await c.messages.create(model="scripted", max_tokens=20, messages=ASK,
                                stop_sequences=["!", " wor"])
    assert (m.content[0].text, m.stop_reason, m.stop_sequence) == ("Hello,", "stop_sequence", " wor")
    async with c.messages.stream(model="scripted", max_tokens=20, messages=ASK,
                                 stop_sequences=["!"]) as s:
        final = await s.get_final_message()
    assert (final.content[0].text, final.stop_reason, final.stop_sequence) == \
        ("Hello, world", "stop_sequence", "!")


async def test_messages_without_a_stop_string_hit_end_turn_or_max_tokens(pod) -> None:
    c = claude(pod)
    m = await c.messages.create(model="scripted", max_tokens=20, messages=ASK,
                                stop_sequences=["?"])
    assert (m.stop_reason, m.stop_sequence) == ("end_turn", None)
    async with c.messages.stream(model="scripted", max_tokens=2, messages=ASK,
                                 stop_sequences=["?"]) as s:
        final = await s.get_final_message()
    assert (final.stop_reason, final.stop_sequence) == ("max_tokens", None)


async def test_chat_still_says_stop(pod) -> None:
    c = openai.AsyncOpenAI(base_url="http://pod/v1", api_key="x", http_client=pod.client())
    r = await c.chat.completions.create(model="scripted", messages=ASK, stop=[","])
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Hello", "stop")
    assert "stop_sequence" not in r.model_dump_json()
