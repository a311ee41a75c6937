"""`llamafleet router` as users start it (a separate process, static --backends) in front of
real `llamafleet serve` processes on loopback: the official openai client through it,
affinity and routing keys, holding while no replica is up, client disconnects, and a
replica killed mid-run."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from llamafleet.router.replicas import replica_id
from prometheus_client.parser import text_string_to_metric_families

from tests.support.servers import Router, free_port, serve_process, serve_ready, start_router, wait_until

pytestmark = pytest.mark.integration

SERVE_FLAGS = ("--max-batch-size", "2", "--context-size", "1024", "--default-max-tokens", "16")


@dataclass
class Fleet:
    router: Router
    replicas: list[tuple[subprocess.Popen, int]] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for _, port in self.replicas]


@pytest.fixture(scope="module")
def fleet(instruct_model_path: Path) -> Iterator[Fleet]:
    replicas = [serve_process("--model-path", str(instruct_model_path), *SERVE_FLAGS)
                for _ in range(2)]
    try:
        for proc, port in replicas:
            wait_until(lambda p=proc, n=port: serve_ready(p, n), timeout=300)
        router = start_router([f"http://127.0.0.1:{port}" for _, port in replicas])
        try:
            wait_until(lambda: router.metric("llamafleet_router_backends_ready") == 2, timeout=30)
            yield Fleet(router, replicas)
        finally:
            print(router.stop()[-8000:])  # shown when a test failed
    finally:
        for proc, _ in replicas:
            proc.kill()
            proc.communicate(timeout=30)


def _client(router: Router) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_the_openai_client_works_through_the_router_streaming_and_not(fleet: Fleet) -> None:
    client = _client(fleet.router)
    model = client.models.list().data[0].id  # GET passes through too
    messages = [{"role": "system", "content": "You are a terse assistant. " * 10},
                {"role": "user", "content": "Name three colours."}]
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=12)
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content
    assert out.usage.completion_tokens > 0

    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=12,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason in {"stop", "length"}

    text = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8)
    assert text.choices[0].text
    # A stream is counted once the router has sent its end, which the client may read first.
    wait_until(lambda: fleet.router.metric("llamafleet_router_requests_total", outcome="ok") >= 4)
    assert fleet.router.metric("llamafleet_router_affinity_total", result="hit") >= 1
    assert fleet.router.metric("llamafleet_router_time_to_first_token_seconds_count") >= 4


def test_same_prefix_or_routing_key_goes_to_the_same_replica(fleet: Fleet) -> None:
    def backend(body: dict, headers: dict | None = None) -> str:
        r = httpx.post(f"{fleet.router.url}/v1/chat/completions", json=body, headers=headers,
                       timeout=120)
        assert r.status_code == 200, r.text
        return r.headers["x-llamafleet-backend"]

    system = {"role": "system", "content": "You answer about the tenant's invoices. " * 8}
    seen = {backend({"messages": [system, {"role": "user", "content": q}], "max_tokens": 2})
            for q in ("hi", "what is due?", "and next month?")}
    assert len(seen) == 1
    key = {"x-llamafleet-routing-key": "tenant-42"}
    keyed = {backend({"messages": [{"role": "user", "content": f"q{i}"}], "max_tokens": 2}, key)
             for i in range(3)}
    assert len(keyed) == 1


def test_bad_input_gets_the_replicas_openai_error(fleet: Fleet) -> None:
    r = httpx.post(f"{fleet.router.url}/v1/chat/completions", json={"messages": "nope"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_a_client_that_leaves_cancels_upstream(fleet: Fleet) -> None:
    def cancelled_on_replicas() -> float:
        total = 0.0
        for url in fleet.urls:
            text = httpx.get(f"{url}/metrics", timeout=5).text
            total += sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                         if s.name == "llamafleet_requests_total"
                         and s.labels.get("outcome") == "cancelled")
        return total

    before = cancelled_on_replicas()
    body = {"messages": [{"role": "user", "content": "Count forever."}], "max_tokens": 900,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{fleet.router.url}/v1/chat/completions", json=body,
                      timeout=120) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    # The client closed the connection after one event: the replica stops the sequence.
    wait_until(lambda: cancelled_on_replicas() == before + 1, timeout=60)
    wait_until(lambda: fleet.router.metric("llamafleet_router_requests_total",
                                           outcome="cancelled") >= 1, timeout=30)


def test_killing_a_replica_mid_run_loses_no_request_that_had_not_started_streaming(fleet: Fleet) -> None:
    victim_proc, victim_port = fleet.replicas[0]
    victim = f"http://127.0.0.1:{victim_port}"
    results: dict[int, dict] = {}

    def stream(i: int) -> None:
        rec = results[i] = {"bytes": 0, "done": False, "error": None}
        body = {"messages": [{"role": "system", "content": f"Tenant {i} prompt. " * 12},
                             {"role": "user", "content": "Tell me a long story."}],
                "max_tokens": 96, "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{fleet.router.url}/v1/chat/completions", json=body,
                              timeout=180) as r:
                rec["status"] = r.status_code
                for line in r.iter_lines():
                    rec["bytes"] += len(line)
                    rec["done"] = rec["done"] or line == "data: [DONE]"
                    if '"error"' in line:
                        rec["error"] = line
        except httpx.HTTPError as e:
            rec["error"] = repr(e)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    # Two sequences decode on the victim and at least one more waits in its queue.
    # Metric labels name replicas by id, never by URL (an internal address).
    wait_until(lambda: fleet.router.metric("llamafleet_router_in_flight",
                                           backend=replica_id(victim)) >= 3,
               timeout=120)
    wait_until(lambda: any(r["bytes"] for r in list(results.values())), timeout=120)
    victim_proc.kill()
    victim_proc.wait(30)
    for t in threads:
        t.join(300)
    assert len(results) == 8
    for i, rec in results.items():
        if not (rec["done"] and rec["error"] is None):
            # Only a stream that had begun may fail, and it fails visibly.
            assert rec["bytes"] > 0 and rec["error"], (i, rec)
    assert fleet.router.metric("llamafleet_router_requests_total", backend=replica_id(victim),
                               outcome="retried") >= 1
    assert sum(r["done"] and r["error"] is None for r in results.values()) >= 6


def test_a_request_sent_while_no_backend_is_up_completes_once_one_starts(
        instruct_model_path: Path) -> None:
    port = free_port()
    router = start_router([f"http://127.0.0.1:{port}"], "--hold-queue-size", "1")
    box: dict = {}
    proc = None

    def ask() -> None:
        box["r"] = httpx.post(f"{router.url}/v1/completions", timeout=300,
                              json={"prompt": "The sea is", "max_tokens": 4})

    t = threading.Thread(target=ask)
    try:
        t.start()
        wait_until(lambda: router.metric("llamafleet_router_hold_queue_depth") == 1, timeout=30)
        # The hold queue is full: the next request is refused at once, OpenAI-shaped.
        full = httpx.post(f"{router.url}/v1/completions", json={"prompt": "x"}, timeout=30)
        assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
        assert full.headers["retry-after"]
        proc, _ = serve_process("--model-path", str(instruct_model_path), *SERVE_FLAGS, port=port)
        t.join(300)
        assert box["r"].status_code == 200, box["r"].text
        assert box["r"].json()["choices"][0]["text"]
        assert router.metric("llamafleet_router_hold_queue_depth") == 0
    finally:
        router.stop()
        if proc is not None:
            proc.kill()
            proc.communicate(timeout=30)


def test_no_replica_within_the_hold_timeout_is_a_503() -> None:
    router = start_router([f"http://127.0.0.1:{free_port()}"], "--hold-timeout", "0.3")
    try:
        r = httpx.post(f"{router.url}/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert router.metric("llamafleet_router_refused_total", reason="hold_timeout") == 1
    finally:
        router.stop()


def test_replicas_check_the_clients_api_key_through_the_router(instruct_model_path: Path) -> None:
    proc, port = serve_process("--model-path", str(instruct_model_path), *SERVE_FLAGS,
                               "--api-key", "s3cret")
    router = None
    try:
        wait_until(lambda: serve_ready(proc, port), timeout=300)
        router = start_router([f"http://127.0.0.1:{port}"], "--backend-api-key", "s3cret")
        wait_until(lambda: router.metric("llamafleet_router_backends_ready") == 1, timeout=30)
        body = {"prompt": "The sea is", "max_tokens": 2}
        # The router's own key is only for its polls: a client without one is refused.
        r = httpx.post(f"{router.url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(f"{router.url}/v1/completions", json=body, timeout=120,
                       headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200, r.text
    finally:
        if router is not None:
            router.stop()
        proc.kill()
        proc.communicate(timeout=30)
