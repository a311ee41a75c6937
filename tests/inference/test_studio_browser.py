"""The studio in Debian's chromium (Playwright by executable path) against the real server."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import httpx
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.browser]

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@contextlib.contextmanager
def open_studio(browser, server):
    ctx = browser.new_context(viewport={"width": 1366, "height": 820})
    pg = ctx.new_page()
    pg.set_default_timeout(60_000)
    pg.goto(server.url + "/studio/")
    pg.get_by_text("model ready").wait_for()
    yield pg
    ctx.close()


@pytest.fixture()
def page(browser, instruct_server):
    """The studio on the default embedded model, a chat model, as users first see it."""
    with open_studio(browser, instruct_server) as pg:
        yield pg


@pytest.fixture()
def base_model_page(browser, server):
    """The studio on Gemma 3 270M, a base model: it continues text until it is stopped."""
    with open_studio(browser, server) as pg:
        yield pg


def send(page, text: str) -> None:
    page.get_by_test_id("chat-input").fill(text)
    page.get_by_test_id("send").click()


# Every length the last answer takes on screen, recorded in the page as it changes.
RECORD_ANSWER_LENGTHS = """() => { window.__lengths = [];
  new MutationObserver(() => {
    const e = document.querySelectorAll('[data-testid=assistant-message]');
    if (e.length) window.__lengths.push(e[e.length - 1].textContent.length);
  }).observe(document.body, {subtree: true, childList: true, characterData: true}); }"""


def test_answer_uses_the_rag_context_streams_in_and_metrics_show(page) -> None:
    requests: list[dict] = []
    page.on("request", lambda r: requests.append(json.loads(r.post_data))
            if r.url.endswith("/v1/chat/completions") else None)
    page.get_by_test_id("system-prompt").fill("You are a pirate.")
    page.get_by_test_id("rag-context").fill("The treasure is buried under the old oak.")
    page.get_by_test_id("max-tokens").fill("80")
    page.get_by_test_id("temperature").fill("0")
    page.evaluate(RECORD_ANSWER_LENGTHS)
    send(page, "Where is the treasure?")
    answer = page.get_by_test_id("assistant-message").last
    page.wait_for_function("() => { const e = document.querySelectorAll("
                           "'[data-testid=assistant-message]'); return e.length && "
                           "e[e.length-1].textContent.length > 0 }")
    page.get_by_test_id("send").wait_for()  # the stream ended
    # The chat model answers from the context (a base model would ramble on instead).
    assert "oak" in answer.text_content().lower(), answer.text_content()
    shown = sorted({n for n in page.evaluate("window.__lengths") if n > 0})
    assert len(shown) >= 2, shown  # it streamed in: the answer grew on screen
    body = requests[0]
    assert body["stream"] is True and body["max_tokens"] == 80 and body["temperature"] == 0
    assert body["messages"][0] == {"role": "system", "content": "You are a pirate."}
    assert body["rag_context"] == "The treasure is buried under the old oak."
    assert re.fullmatch(r"\d+ ms", page.get_by_test_id("metric-ttft").inner_text())
    assert re.fullmatch(r"\d+\.\d", page.get_by_test_id("metric-tps").inner_text())
    assert int(page.get_by_test_id("metric-completion-tokens").inner_text()) > 1
    # a second turn sends the first one as history
    send(page, "And then?")
    page.get_by_test_id("send").wait_for()
    roles = [m["role"] for m in requests[-1]["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "studio-desktop.png"))
    page.set_viewport_size({"width": 390, "height": 844})
    page.screenshot(path=str(ARTIFACTS / "studio-phone.png"), full_page=True)


def test_stop_ends_the_stream_and_frees_the_sequence(base_model_page, server) -> None:
    page = base_model_page
    page.get_by_test_id("max-tokens").fill("900")
    send(page, "Count from one to one thousand.")
    page.wait_for_function("() => { const e = document.querySelectorAll("
                           "'[data-testid=assistant-message]'); return e.length && "
                           "e[e.length-1].textContent.length > 20 }")
    page.get_by_test_id("stop").click()
    page.get_by_test_id("send").wait_for(state="attached")
    page.wait_for_function("async () => (await (await fetch('/info')).json()).running === 0")
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    send(page, "Hello again")
    page.get_by_test_id("send").wait_for()
    assert page.get_by_test_id("assistant-message").last.text_content()


def test_errors_are_readable(page) -> None:
    page.get_by_test_id("temperature").fill("7")
    send(page, "hi")
    err = page.get_by_test_id("error-message")
    err.wait_for()
    assert "temperature" in err.inner_text() and "HTTP 400" in err.inner_text()


def test_markdown_renders_code_and_never_runs_scripts(page) -> None:
    md = ("Here is **bold**:\n\n```python\nprint('hi')\n```\n\n"
          "<script>window.__pwned = 1</script>\n\n<img src=x onerror=\"window.__pwned = 2\">")

    def fake_stream(route) -> None:
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
                 "choices": [{"index": 0, "delta": {"content": md}, "finish_reason": None}]}
        route.fulfill(status=200, headers={"content-type": "text/event-stream"},
                      body=f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n")

    page.route("**/v1/chat/completions", fake_stream)
    send(page, "show me")
    answer = page.get_by_test_id("assistant-message").last
    answer.locator("pre code").wait_for()
    assert "print('hi')" in answer.locator("pre code").inner_text()
    assert answer.locator("strong").inner_text() == "bold"
    assert answer.locator("script").count() == 0
    assert page.evaluate("() => window.__pwned") is None


def test_enter_sends_and_shift_enter_adds_a_line(page) -> None:
    box = page.get_by_test_id("chat-input")
    box.click()
    box.type("line one")
    box.press("Shift+Enter")
    box.type("line two")
    assert box.input_value() == "line one\nline two"
    with page.expect_request("**/v1/chat/completions") as req:
        box.press("Enter")
    sent = json.loads(req.value.post_data)["messages"][-1]["content"]
    assert sent == "line one\nline two"
    page.get_by_test_id("send").wait_for(state="attached")
