"""/v1/embeddings on the real instruct model, judged by the official client."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.support.servers import free_port, read_response, send_request, wait_until

pytestmark = pytest.mark.integration
EMBED = "/v1/embeddings"

TEXTS = ["The cat sat on the mat.", "Kubernetes schedules pods onto nodes.",
         "A short one", "Llamas are domesticated South American camelids."]


@pytest.fixture()
def client(instruct_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=instruct_server.url + "/v1", api_key="unused", max_retries=0)


def vectors(client, inputs, **kw) -> np.ndarray:
    r = client.embeddings.create(model=client.models.list().data[0].id, input=inputs, **kw)
    assert [d.index for d in r.data] == list(range(len(r.data)))
    return np.array([d.embedding for d in r.data], dtype=np.float32)


def test_embeddings_are_deterministic_normalised_and_batch_consistent(client) -> None:
    batch = vectors(client, TEXTS)
    assert batch.shape[0] == len(TEXTS) and batch.shape[1] > 100
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(vectors(client, TEXTS), batch)  # deterministic
    alone = np.concatenate([vectors(client, t) for t in TEXTS])
    # One input alone or among others: the same vector (batch shapes differ, so within
    # float tolerance).
    np.testing.assert_allclose(alone, batch, atol=2e-3)
    assert np.all(np.sum(alone * batch, axis=1) > 0.9999)
    # Different texts, different vectors.
    assert float(batch[0] @ batch[1]) < 0.999


def test_base64_and_token_arrays(client, instruct_server) -> None:
    floats = vectors(client, TEXTS[0])
    r = client.embeddings.create(model=client.models.list().data[0].id, input=TEXTS[0],
                                 encoding_format="base64")
    # Little-endian float32, as OpenAI sends it.
    decoded = np.frombuffer(base64.b64decode(r.data[0].embedding), dtype="<f4")
    np.testing.assert_array_equal(decoded, floats[0])
    model = instruct_server.serving.model
    ids = model.tokenize(TEXTS[0], model.add_bos)
    np.testing.assert_array_equal(vectors(client, [ids]), floats)
    assert r.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "dimensions": 3}, "dimensions"),
    ({"input": ""}, "input"),
    ({"input": [[10 ** 9]]}, "input"),  # was "prompt" (issue 23, item 15)
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "colour": 1}, "colour"),
])
def test_bad_embedding_requests(instruct_server, body, param) -> None:
    r = httpx.post(instruct_server.url + "/v1/embeddings", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# --- issue 23: abandoned work, a bounded queue, the event loop (items 7, 19) -------------------


def hold_decodes(embedder, monkeypatch) -> tuple[threading.Event, threading.Event, list]:
    """Fault injection at our boundary: every embeddings llama_decode waits for ``release``;
    ``entered`` is set at the first, ``calls`` counts them."""
    entered, release, calls = threading.Event(), threading.Event(), []
    real = embedder._decode

    def held(*args):
        calls.append(len(args))
        entered.set()
        release.wait(120)
        return real(*args)

    monkeypatch.setattr(embedder, "_decode", held)
    return entered, release, calls


def test_an_abandoned_request_stops_at_its_next_decode(instruct_server, monkeypatch) -> None:
    """Issue 23, item 7: 100 inputs of 507 tokens, client gone, and a 1-token request sent
    after it waited 457 s: the abandoned work ran to its end."""
    serving = instruct_server.serving
    entered, release, calls = hold_decodes(serving.embedder, monkeypatch)
    try:
        sock = send_request(instruct_server.url, EMBED, {"input": ["word " * 400] * 40})
        assert entered.wait(60)
        sock.close()  # the client leaves during its first llama_decode
        wait_until(lambda: serving.embeddings_pending == 0)
    finally:
        release.set()
    r = httpx.post(instruct_server.url + EMBED, json={"input": "hi"}, timeout=60)
    assert r.status_code == 200, r.text
    assert len(calls) == 2  # the abandoned request's first decode, then this one's


def test_the_embeddings_queue_is_bounded(instruct_server, monkeypatch) -> None:
    serving = instruct_server.serving
    monkeypatch.setattr(serving, "settings",
                        serving.settings.model_copy(update={"embeddings_queue_size": 2}))
    entered, release, _ = hold_decodes(serving.embedder, monkeypatch)
    try:
        admitted = [send_request(instruct_server.url, EMBED, {"input": t}) for t in TEXTS[:2]]
        wait_until(lambda: entered.is_set() and serving.embeddings_pending == 2)
        t0 = time.monotonic()
        r = httpx.post(instruct_server.url + EMBED, json={"input": "one more"}, timeout=30)
        assert time.monotonic() - t0 < 5  # at once, not after the others
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        err = r.json()["error"]
        assert err["code"] == "overloaded" and "EMBEDDINGS_QUEUE_SIZE" in err["message"]
    finally:
        release.set()
    assert [read_response(sock)[0] for sock in admitted] == [200, 200]


def test_inputs_are_tokenised_off_the_event_loop(instruct_server, monkeypatch) -> None:
    """Issue 23, item 19."""
    model = instruct_server.serving.model
    entered, release = threading.Event(), threading.Event()
    real = model.tokenize
    mark = "a text whose tokenising is held"

    def held(text: str, add_bos: bool) -> list[int]:
        if text == mark:
            entered.set()
            release.wait(60)
        return real(text, add_bos)

    monkeypatch.setattr(model, "tokenize", held)
    sock = send_request(instruct_server.url, EMBED, {"input": ["first", mark]})
    try:
        assert entered.wait(30)
        r = httpx.get(instruct_server.url + "/health", timeout=5)  # the loop is free
        assert r.status_code == 200
    finally:
        release.set()
    assert read_response(sock)[0] == 200


# --- issue 23 on a separate `llamafleet serve` (Gemma 3, 262k vocabulary): items 7, 8, 15 ----------


DRAIN_S = 2.0


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def gemma_pod(model_path, tmp_path_factory):
    """`llamafleet serve` with Gemma 3 270M, its console log in a file."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("pod") / "serve.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llamafleet.common.cli", "serve", "--host", "127.0.0.1",
         "--http-port", str(port), "--grpc-port", "0", "--metrics-port", "0", "--threads", "2",
         "--log-format", "console", "--model-path", str(model_path), "--max-batch-size", "1",
         "--context-size", "512", "--drain-timeout-s", str(DRAIN_S)],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            return httpx.get(url + "/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, timeout=300)
        yield proc, url, log_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_a_507_token_input_leaves_rss_bounded(gemma_pod) -> None:
    """Issue 23, item 8: asking for every token's logits (262,144 floats each) grew RSS by
    about 1 GiB for one 507-token input, and it stayed grown."""
    proc, url, _ = gemma_pod
    before = rss_mib(proc.pid)
    r = httpx.post(url + EMBED, json={"input": [list(range(1000, 1507))]}, timeout=300)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 507
    after = rss_mib(proc.pid)
    print(f"RSS {before:.0f} MiB -> {after:.0f} MiB after one 507-token input "
          f"(+{after - before:.0f} MiB)")
    assert after - before < 200


def test_a_newline_in_user_cannot_forge_a_log_line(gemma_pod) -> None:
    """Issue 23, item 15, in the console log format."""
    _, url, log_path = gemma_pod
    forged = "12:00:00 WARNING llamafleet.inference.main: forged"
    r = httpx.post(url + EMBED, json={"input": "hi", "user": f"mallory\n{forged}"}, timeout=60)
    assert r.status_code == 200
    lines = log_path.read_text().splitlines()
    assert not any(line.startswith(forged) for line in lines)
    assert any("user=" in line and "mallory\\n" + forged in line for line in lines)


def test_sigterm_during_embeddings_exits_within_the_drain_timeout(gemma_pod) -> None:
    """Issue 23, item 7: the process exited 70 s after SIGTERM, far past its drain timeout;
    the request that was cut gets a 503 (another replica may take it)."""
    proc, url, _ = gemma_pod
    box: dict = {}

    def big() -> None:
        box["r"] = httpx.post(url + EMBED, json={"input": [list(range(1000, 1500))] * 100},
                              timeout=300)

    t = threading.Thread(target=big)
    t.start()
    wait_until(lambda: httpx.get(url + "/info", timeout=5).json()["embeddings_pending"] == 1)
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(120) == 0
    took = time.monotonic() - t0
    t.join(30)
    print(f"exited {took:.1f} s after SIGTERM (drain timeout {DRAIN_S:g} s)")
    assert took < DRAIN_S + 8  # one 64-token llama_decode, the listeners' close
    assert box["r"].status_code == 503 and "shutting down" in box["r"].json()["error"]["message"]
