"""The embedded models as users meet them: the default chat model answers from the context it
is given (judged through the official `openai` client), and Gemma is served when named."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.servers import free_port, start_server, wait_until

pytestmark = pytest.mark.integration

SYSTEM = "You are a helpful assistant. Answer in one sentence."
CONTEXT = "The Rock Island lighthouse was built in 1874 by the Danish engineer Karl Holm."
QUESTION = "When was the lighthouse built?"


def served(url: str) -> tuple[str, dict]:
    models = httpx.get(url + "/v1/models").json()["data"]
    assert len(models) == 1, models
    return models[0]["id"], httpx.get(url + "/info").json()


def test_the_default_server_serves_the_instruct_model_and_names_it(instruct_server) -> None:
    model_id, info = served(instruct_server.url)
    assert model_id == info["model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert info["model_path"].endswith("/SmolLM2-135M-Instruct.Q4_1.gguf")
    metrics = httpx.get(f"http://127.0.0.1:{instruct_server.settings.metrics_port}/metrics").text
    assert 'llamafleet_model_info{architecture="llama"' in metrics
    assert 'name="SmolLM2-135M-Instruct.Q4_1"' in metrics


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_with_system_prompt_and_rag_context_answers_from_the_context(
        instruct_server, stream: bool) -> None:
    client = openai.OpenAI(base_url=instruct_server.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    args = dict(model=model, temperature=0, max_tokens=80, extra_body={"rag_context": CONTEXT},
                messages=[{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": QUESTION}])
    if stream:
        chunks = list(client.chat.completions.create(stream=True, **args))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        r = client.chat.completions.create(**args)
        text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert r.usage.completion_tokens < 80
    assert finish == "stop", text  # it ends its answer by itself
    assert "1874" in text, text  # ...and the answer comes from the context


def test_a_rag_context_holding_the_question_slot_stays_as_it_is(instruct_server) -> None:
    """issue 23, item 17: the context's own "{question}" got the question spliced in."""

    def prompt_tokens(rag_context: str, question: str) -> int:
        r = httpx.post(instruct_server.url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": question}], "max_tokens": 1,
            "rag_context": rag_context})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    short = "Where is it?"
    long = "Where is it? " + "Tell me every detail you know about the place. " * 8
    # The question appears once in the prompt: a longer question adds its own tokens only,
    # whether or not the context holds the text "{question}" (or "{context}").
    plain = prompt_tokens("Notes: {quest}.", long) - prompt_tokens("Notes: {quest}.", short)
    slots = prompt_tokens("Notes: {question}.", long) - prompt_tokens("Notes: {question}.", short)
    assert plain > 50
    assert slots == plain
    both = (prompt_tokens("Notes: {question} {context}.", long)
            - prompt_tokens("Notes: {question} {context}.", short))
    assert both == plain


def test_gemma_is_served_when_named(model_path: Path) -> None:
    srv = start_server(embedded_model="gemma-3-270m", embedded_model_dir=model_path.parent,
                       max_batch_size=1, grpc_port=0, metrics_port=0)
    try:
        model_id, info = served(srv.url)
        assert model_id == info["model"] == "gemma-3-270m-q4_k_m"
        assert info["model_path"] == str(model_path)
        r = httpx.post(srv.url + "/v1/completions", timeout=120, json={
            "model": model_id, "prompt": "The sea is", "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text
    finally:
        srv.stop()


def test_serve_on_a_fresh_machine_extracts_and_serves_the_instruct_model(tmp_path: Path) -> None:
    """What `./scripts/serve.sh` does after set-up: `llamafleet serve` with no model setting
    and an empty cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_LLAMA_SERVICE_")}
    port = free_port()
    env.update(XDG_CACHE_HOME=str(tmp_path), LLM_LLAMA_SERVICE_HOST="127.0.0.1",
               LLM_LLAMA_SERVICE_HTTP_PORT=str(port), LLM_LLAMA_SERVICE_GRPC_PORT="0",
               LLM_LLAMA_SERVICE_METRICS_PORT="0", LLM_LLAMA_SERVICE_THREADS="2",
               LLM_LLAMA_SERVICE_CONTEXT_SIZE="512", LLM_LLAMA_SERVICE_MAX_BATCH_SIZE="1")
    cli = Path(sys.executable).with_name("llamafleet")
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([str(cli), "serve"], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=180)
        model_id, info = served(f"http://127.0.0.1:{port}")
        assert model_id == "SmolLM2-135M-Instruct.Q4_1"
        assert info["model_path"] == str(tmp_path / "llamafleet" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    finally:
        proc.terminate()
        proc.wait(60)
