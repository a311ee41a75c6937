"""Hostile input, sliding-window cache reuse, hangs and shutdowns (issue 12), each against a
real server with the embedded model (Gemma 3 270M, 512-token sliding window)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from llamafleet.inference.limits import MAX_STOP_CHARS, MAX_STOP_STRINGS
from llamafleet.inference.proto import local_pb2 as pb
from llamafleet.inference.proto import local_pb2_grpc as pb_grpc

from tests.support.servers import free_port, json_body, read_response, send_request, start_server, wait_until

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
KEY = "clé-s3cret"  # non-ASCII on purpose
AUTH = {"Authorization": b"Bearer " + KEY.encode()}


def msgs(text: str = "hi") -> list[dict]:
    return [{"role": "user", "content": text}]


def schema_request(schema: dict) -> dict:
    return {"messages": msgs("Give me JSON."), "max_tokens": 8,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}


def stream_in_background(url: str, body: dict, headers: dict | None = None
                         ) -> tuple[threading.Thread, dict]:
    """A streaming chat request in a thread; box['lines'] gets its data lines, box['first']
    is set at the first content chunk."""
    box: dict = {"first": threading.Event()}

    def run() -> None:
        with httpx.stream("POST", url + CHAT, json={**body, "stream": True}, timeout=300,
                          headers=headers) as r:
            box["status"] = r.status_code
            lines = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if '"content":"' in line and '"content":""' not in line:
                        box["first"].set()
            box["lines"] = lines
        box["first"].set()

    t = threading.Thread(target=run)
    t.start()
    return t, box


def completion_tokens(lines: list[str]) -> int:
    return json.loads(lines[-2].removeprefix("data: "))["usage"]["completion_tokens"]


LONG_STREAM = {"messages": msgs("Tell me a long story."), "max_tokens": 60, "ignore_eos": True,
               "stream_options": {"include_usage": True}}


# --- 1. grammar bombs --------------------------------------------------------------------------


@pytest.mark.parametrize("schema, needle", [
    ({"type": "string", "maxLength": 200000}, "maxLength is 200000"),
    ({"type": "array", "items": {"type": "integer"}, "maxItems": 100000}, "maxItems"),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 100000}, "minItems"),
    ({"type": "string", "pattern": "^a{0,200000}$"}, "pattern {0,200000}"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 250}
                                       for i in range(20)}}, "add up"),
])
def test_grammar_bombs_get_a_400_within_a_second(server, schema, needle) -> None:
    t0 = time.monotonic()
    r = httpx.post(server.url + CHAT, json=schema_request(schema), timeout=30)
    assert time.monotonic() - t0 < 1.0
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "response_format" and needle in err["message"]
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


def test_a_schema_within_the_limits_still_constrains_the_output(server) -> None:
    r = httpx.post(server.url + CHAT, timeout=60, json={
        **schema_request({"type": "object", "properties": {"a": {"type": "string", "maxLength": 8}},
                          "required": ["a"]}), "max_tokens": 40, "temperature": 0})
    assert r.status_code == 200, r.text
    value = json.loads(r.json()["choices"][0]["message"]["content"])
    assert len(value["a"]) <= 8


# --- 2. request size -----------------------------------------------------------------------------


def raw_request(server, head: bytes, body: bytes = b"") -> bytes:
    """Send a request head (and body bytes) on a plain socket; return the response read."""
    port = server.settings.http_port
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head + body)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_a_declared_64_mb_body_gets_413_before_it_is_sent(server) -> None:
    t0 = time.monotonic()
    resp = raw_request(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Type: application/json\r\nContent-Length: 67108864\r\n\r\n",
                       b'{"messages": [')
    assert time.monotonic() - t0 < 1.0
    assert resp.startswith(b"HTTP/1.1 413"), resp[:200]
    err = json.loads(resp.split(b"\r\n\r\n", 1)[1])["error"]
    assert err["code"] == "request_too_large" and "MAX_REQUEST_BYTES" in err["message"]


def test_a_chunked_body_is_cut_at_the_limit(server) -> None:
    limit = server.settings.request_bytes_limit
    assert limit == 1024 * 1024 + 32 * 1024  # the default for context_size 1024
    data = b"x" * (limit + 1)
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
    resp = raw_request(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n", body)
    assert resp.startswith(b"HTTP/1.1 413"), resp[:200]


def test_health_answers_within_a_second_while_64_mb_arrive(server) -> None:
    sent = {"bytes": 0}

    def upload() -> None:
        chunk = b"x" * 65536
        try:
            with socket.create_connection(("127.0.0.1", server.settings.http_port)) as s:
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
                for _ in range(1024):  # 64 MiB
                    s.sendall(b"10000\r\n" + chunk + b"\r\n")
                    sent["bytes"] += len(chunk)
        except OSError:
            pass  # the server answered 413 and closed the connection

    t = threading.Thread(target=upload)
    t.start()
    slowest = 0.0
    while t.is_alive() or slowest == 0.0:
        t0 = time.monotonic()
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        slowest = max(slowest, time.monotonic() - t0)
    t.join()
    assert slowest < 1.0
    assert sent["bytes"] < 64 * 1024 * 1024  # cut off long before the end


def test_grpc_messages_over_the_limit_are_resource_exhausted(server) -> None:
    with grpc.insecure_channel(server.grpc_target) as ch:
        stub = pb_grpc.LLMLocalServiceStub(ch)
        big = pb.LLMLocalServiceGenerateStreamRequest(user_prompt="x" * (2 * 1024 * 1024))
        with pytest.raises(grpc.RpcError) as e:
            list(stub.GenerateStream(big, timeout=30))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_hostile_requests_do_not_disturb_a_running_stream(server) -> None:
    t, box = stream_in_background(server.url, LONG_STREAM)
    assert box["first"].wait(120)
    for schema in ({"type": "string", "maxLength": 200000},
                   {"type": "string", "pattern": "^a{0,200000}$"}):
        assert httpx.post(server.url + CHAT, json=schema_request(schema), timeout=30).status_code == 400
    raw_request(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 67108864\r\n\r\n")
    r = httpx.post(server.url + CHAT, timeout=30,
                   json={"messages": msgs(), "stop": ["x"] * (MAX_STOP_STRINGS + 1)})
    assert r.status_code == 400
    t.join(300)
    assert box["lines"][-1] == "data: [DONE]"
    assert completion_tokens(box["lines"]) == 60


# --- 3. prefix cache and the sliding window ---------------------------------------------------------


PREFIX = " ".join(f"Item {i} is a {c} box." for i, c in
                  zip(range(34), ["red", "blue", "green"] * 12, strict=False)) + "\n"


def _b_request(url: str) -> str:
    r = httpx.post(url + "/v1/completions", timeout=300, json={
        "prompt": PREFIX + "Now list the green boxes:", "max_tokens": 24, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


# llama.cpp keeps n_swa + n_ubatch cells per sequence for the sliding-window layers; with
# n_batch 64 (so n_ubatch 64), A's 1100 tokens overwrite every cell of the shared prefix.
# No host prompt cache: these tests are about a slot's own cells (when they slid out, the
# prefix comes from the prompt cache instead: test_prompt_cache.py).
SWA_SERVER = dict(context_size=2048, max_batch_size=1, n_batch=64, grpc_port=0, metrics_port=0,
                  prompt_cache_mib=0)


@pytest.fixture(scope="module", params=["split", "unified"])
def swa_server(model_path, request):
    srv = start_server(model_path=model_path, kv_layout=request.param, **SWA_SERVER)
    yield srv
    srv.stop()


def test_a_slid_out_window_is_not_reused(swa_server, model_path) -> None:
    engine = swa_server.serving.engine
    assert engine.backend.n_swa == 512
    prefix_tokens = len(swa_server.serving.text_prompt(PREFIX))
    assert 280 < prefix_tokens < 320
    # A: the prefix, then 800 tokens; its slot keeps them, and its window has slid past them.
    r = httpx.post(swa_server.url + "/v1/completions", timeout=600, json={
        "prompt": PREFIX, "max_tokens": 800, "ignore_eos": True, "temperature": 0})
    assert r.json()["usage"]["completion_tokens"] == 800
    before = engine.prefix_tokens_reused
    b_after_a = _b_request(swa_server.url)
    fresh = start_server(model_path=model_path, kv_layout=engine.backend.kv_layout, **SWA_SERVER)
    try:
        assert _b_request(fresh.url) == b_after_a
    finally:
        fresh.stop()
    assert engine.prefix_tokens_reused == before  # the window was gone: a full prefill


def test_a_window_still_held_is_reused(swa_server) -> None:
    # B is short: its whole sequence stays inside the window, so a repeat reuses it. (No
    # comparison of the text: a reused prefix changes the batch shape, and llama.cpp's CPU
    # kernels are not batch-invariant; see docs/testing.md.)
    engine = swa_server.serving.engine
    _b_request(swa_server.url)
    before = engine.prefix_tokens_reused
    _b_request(swa_server.url)
    assert engine.prefix_tokens_reused - before > 250


# --- 4. batch bounds and stop strings ------------------------------------------------------------------


def test_max_batch_size_above_n_batch_raises_n_batch(model_path) -> None:
    srv = start_server(model_path=model_path, max_batch_size=20, n_batch=16, context_size=128,
                       grpc_port=0, metrics_port=0)
    try:
        assert httpx.get(srv.url + "/info").json()["n_batch"] == 20
        results: list[int] = []

        def one(i: int) -> None:
            r = httpx.post(srv.url + "/v1/completions", timeout=300, json={
                "prompt": f"Count {i}:", "max_tokens": 6, "ignore_eos": True})
            results.append(r.json()["usage"]["completion_tokens"])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert results == [6] * 20
        assert httpx.get(srv.url + "/health").status_code == 200
    finally:
        srv.stop()


@pytest.mark.parametrize("stop, needle", [
    (["x"] * (MAX_STOP_STRINGS + 1), f"at most {MAX_STOP_STRINGS} stop strings"),
    ("y" * (MAX_STOP_CHARS + 1), f"at most {MAX_STOP_CHARS} characters"),
    ([""], "empty"),
])
def test_stop_string_limits_on_both_apis(server, stop, needle) -> None:
    r = httpx.post(server.url + CHAT, json={"messages": msgs(), "stop": stop}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop"
    assert needle in r.json()["error"]["message"]
    seqs = stop if isinstance(stop, list) else [stop]
    with grpc.insecure_channel(server.grpc_target) as ch:
        req = pb.LLMLocalServiceGenerateStreamRequest(
            user_prompt="hi", params=pb.GenerationParams(stop_sequences=seqs))
        with pytest.raises(grpc.RpcError) as e:
            list(pb_grpc.LLMLocalServiceStub(ch).GenerateStream(req, timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "stop_sequences" in e.value.details() and needle in e.value.details()


def test_the_earliest_stop_string_in_the_text_wins(server) -> None:
    body = {"messages": msgs("The capital of Spain?"), "max_tokens": 40, "temperature": 0}
    free = httpx.post(server.url + CHAT, json=body, timeout=60).json()["choices"][0]["message"]["content"]
    assert "capital" in free
    # " capital" is one token: both stop strings arrive together; "cap" comes first in the text.
    r = httpx.post(server.url + CHAT, json={**body, "stop": ["ital", "cap"]}, timeout=60).json()
    assert r["choices"][0]["message"]["content"] == free[:min(free.find("cap"), free.find("ital"))]


# --- 5-7. auth, liveness and the queue, on a server with a key --------------------------------------------


@pytest.fixture(scope="module")
def guarded(model_path):
    srv = start_server(model_path=model_path, api_key=KEY, max_batch_size=1, queue_size=1,
                       engine_stall_timeout_s=1.0, grpc_port=0, metrics_port=0)
    yield srv
    srv.stop()


def test_api_key_is_compared_as_bytes(guarded) -> None:
    url = guarded.url + "/v1/models"
    assert httpx.get(url, headers={"Authorization": b"Bearer cl\xc3\xa9-wrong"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": b"Bearer \xff\xfe"}).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer s3cret"}).status_code == 401
    assert httpx.get(url, headers=AUTH).status_code == 200


def test_info_and_metrics_need_the_key_probes_do_not(guarded, server) -> None:
    for path in ("/info", "/metrics"):
        r = httpx.get(guarded.url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(guarded.url + path, headers=AUTH).status_code == 200
    for path in ("/health", "/ready"):
        assert httpx.get(guarded.url + path).status_code == 200
    assert "prefix_tokens_reused" in httpx.get(guarded.url + "/info", headers=AUTH).json()
    # Without a key /info is open to anyone, so it leaves out what the cache saved.
    assert "prefix_tokens_reused" not in httpx.get(server.url + "/info").json()


def test_health_fails_while_decode_hangs(guarded) -> None:
    # Fault injection at our Backend boundary: the real llama_decode, held like a hung GPU.
    backend = guarded.serving.engine.backend
    entered, release = threading.Event(), threading.Event()
    real = backend.decode

    def hung(*args):
        entered.set()
        release.wait(120)
        return real(*args)

    backend.decode = hung
    try:
        t, box = stream_in_background(guarded.url, {**LONG_STREAM, "max_tokens": 4}, AUTH)
        assert entered.wait(60)
        wait_until(lambda: httpx.get(guarded.url + "/health").status_code == 500, timeout=20)
        assert httpx.get(guarded.url + "/health").json()["status"] == "engine stalled"
    finally:
        del backend.decode
        release.set()
    t.join(120)
    assert box["lines"][-1] == "data: [DONE]" and completion_tokens(box["lines"]) == 4
    assert httpx.get(guarded.url + "/health").status_code == 200


def test_clients_that_gave_up_do_not_hold_queue_places(guarded) -> None:
    engine = guarded.serving.engine
    body = {"messages": msgs(), "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120, headers=AUTH) as h:
        with h.stream("POST", guarded.url + CHAT, json=body) as running:
            lines = running.iter_lines()  # kept referenced: see test_bad_input
            next(lines)
            wait_until(lambda: engine.running == 1)
            # Queued streams have no status line yet (it comes with the first token).
            with send_request(guarded.url, CHAT, body, AUTH):  # the quitter
                wait_until(lambda: engine.queued == 1)
            # The quitter's request is cancelled but still waits: the queue looks full.
            wait_until(lambda: all(r.cancelled.is_set() for r in engine._waiting.snapshot()))
            with send_request(guarded.url, CHAT, body, AUTH):  # admitted: the cancelled one was purged
                wait_until(lambda: engine.queued == 1 and
                           not any(r.cancelled.is_set() for r in engine._waiting.snapshot()))
                r = h.post(guarded.url + CHAT, json={**body, "stream": False})
                assert r.status_code == 503  # the live one does count


def load_gauges(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", headers=AUTH, timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
            if s.name in {"llamafleet_queue_depth", "llamafleet_running_sequences",
                          "llamafleet_kv_cache_cells_used", "llamafleet_kv_cache_utilization"}}


def test_load_gauges_read_zero_once_idle(guarded) -> None:
    """Issue 23, item 11: the gauges kept the last step's values (42 queued and 313 cells,
    30 s after the load), so an idle fleet looked loaded and never scaled to zero."""
    engine = guarded.serving.engine
    body = {"messages": msgs(), "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120, headers=AUTH) as h:
        with h.stream("POST", guarded.url + CHAT, json=body) as running:
            lines = running.iter_lines()  # kept referenced: see test_bad_input
            next(lines)
            with send_request(guarded.url, CHAT, body, AUTH):
                busy = wait_until(lambda: (g := load_gauges(guarded.url))[
                    "llamafleet_queue_depth"] == 1 and g)
                assert busy["llamafleet_running_sequences"] == 1
                assert busy["llamafleet_kv_cache_cells_used"] > 0
                assert 0 < busy["llamafleet_kv_cache_utilization"] <= 1
            # The waiting client leaves first, then the running one: no step follows.
            wait_until(lambda: all(r.cancelled.is_set() for r in engine._waiting.snapshot()))
    wait_until(lambda: engine.running == 0 and engine.queued == 0)
    assert load_gauges(guarded.url) == {
        "llamafleet_queue_depth": 0, "llamafleet_running_sequences": 0,
        "llamafleet_kv_cache_cells_used": 0, "llamafleet_kv_cache_utilization": 0}


def test_token_counters_count_a_stream_whose_client_left(guarded) -> None:
    """Issue 23, item 15: they stayed at 0 when a client left mid-stream."""
    m = guarded.serving.metrics
    prompt0, completion0 = m.prompt_tokens._value.get(), m.completion_tokens._value.get()
    body = {"messages": msgs(), "max_tokens": 900, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120, headers=AUTH) as h, \
            h.stream("POST", guarded.url + CHAT, json=body) as r:
        seen = 0
        for line in r.iter_lines():
            seen += '"content":"' in line and '"content":""' not in line
            if seen == 5:
                break
    wait_until(lambda: guarded.serving.engine.running == 0)
    wait_until(lambda: m.completion_tokens._value.get() - completion0 >= 5)
    assert m.prompt_tokens._value.get() > prompt0


def test_queued_streams_get_503_when_the_server_shuts_down(model_path) -> None:
    """Issue 23, item 12: a queued stream that has produced nothing got 200 and then an
    error event; a 503 lets a router retry it on another replica. The running stream, which
    has sent tokens, still ends with an error event."""
    srv = start_server(model_path=model_path, max_batch_size=1, queue_size=4, grpc_port=0,
                       metrics_port=0, drain_timeout_s=0.5)
    try:
        engine = srv.serving.engine
        body = {"messages": msgs(), "max_tokens": 900, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=120) as h, \
                h.stream("POST", srv.url + CHAT, json=body) as running:
            lines = running.iter_lines()
            next(lines)
            queued = [send_request(srv.url, CHAT, body) for _ in range(2)]
            wait_until(lambda: engine.queued == 2)
            srv.loop.call_soon_threadsafe(srv.server._start_drain)  # what SIGTERM does
            for sock in queued:
                status, rest = read_response(sock)
                assert status == 503, rest[:300]
                err = json_body(rest)["error"]
                assert err["type"] == "server_error" and "shutting down" in err["message"]
                assert b"retry-after:" in rest.lower()
            tail = [line for line in lines if line]
            assert "shutting down" in tail[-2] and tail[-1] == "data: [DONE]"
        srv.thread.join(60)
        assert not srv.thread.is_alive()
    finally:
        if srv.thread.is_alive():
            srv.stop()


# --- 8. graceful shutdown --------------------------------------------------------------------------------


def test_sigterm_lets_a_running_stream_finish_then_exits_0(model_path: Path, tmp_path) -> None:
    port = free_port()
    env = {**os.environ, "LLM_LLAMA_SERVICE_MODEL_PATH": str(model_path),
           "LLM_LLAMA_SERVICE_HOST": "127.0.0.1", "LLM_LLAMA_SERVICE_HTTP_PORT": str(port),
           "LLM_LLAMA_SERVICE_GRPC_PORT": "0", "LLM_LLAMA_SERVICE_METRICS_PORT": "0",
           "LLM_LLAMA_SERVICE_CONTEXT_SIZE": "1024", "LLM_LLAMA_SERVICE_MAX_BATCH_SIZE": "2",
           "LLM_LLAMA_SERVICE_THREADS": "2", "LLM_LLAMA_SERVICE_DRAIN_TIMEOUT_S": "240"}
    exe = Path(sys.executable).with_name("llamafleet")
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([str(exe), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(url + "/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            return False

    try:
        wait_until(ready, timeout=300)
        t, box = stream_in_background(url, {**LONG_STREAM, "max_tokens": 200})
        assert box["first"].wait(120)
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: httpx.get(url + "/ready", timeout=5).status_code == 503)
        r = httpx.post(url + CHAT, json={"messages": msgs()}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        t.join(300)
        assert box["lines"][-1] == "data: [DONE]"
        assert completion_tokens(box["lines"]) == 200
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


# --- 9. HTTP TLS reload ----------------------------------------------------------------------------------


def test_http_tls_picks_up_renewed_certificate_files(model_path, tmp_path) -> None:
    import datetime as dt

    from llamafleet.operator import certs

    day = dt.timedelta(days=1)

    def write(ca: certs.KeyPair) -> None:
        server = certs.issue(ca, "localhost", day, sans=["localhost", "127.0.0.1"])
        (tmp_path / "ca.crt").write_bytes(ca.cert_pem)
        (tmp_path / "tls.crt").write_bytes(server.cert_pem)
        (tmp_path / "tls.key").write_bytes(server.key_pem)

    old = certs.new_ca("old-ca", day)
    write(old)
    (tmp_path / "old.pem").write_bytes(old.cert_pem)
    srv = start_server(model_path=model_path, grpc_port=0, metrics_port=0, http_tls=True,
                       grpc_ca_path=tmp_path / "ca.crt", grpc_cert_path=tmp_path / "tls.crt",
                       grpc_key_path=tmp_path / "tls.key")
    url = srv.url.replace("127.0.0.1", "localhost") + "/ready"
    try:
        assert httpx.get(url, verify=str(tmp_path / "old.pem")).status_code == 200
        new = certs.new_ca("renewed-ca", day)
        write(new)  # in place, as a Secret update does
        (tmp_path / "new.pem").write_bytes(new.cert_pem)
        assert httpx.get(url, verify=str(tmp_path / "new.pem")).status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(url, verify=str(tmp_path / "old.pem"))
    finally:
        srv.stop()
