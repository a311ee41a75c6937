"""Tenants at the fleet's front door: a real `llamafleet router` process on loopback with a
tenants file, in front of a real pod app without a model (tests/support/scripted.py):
unknown keys, limits with an honest Retry-After, tokens charged from the pod's own count,
key rotation by a file rewrite, the tenant and priority passed on to the pod, and a hold
queue that serves the higher priority first."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from llamafleet.common import tenants as T

from tests.support.scripted import ScriptedPod, ServedPod
from tests.support.servers import start_router, wait_until

pytestmark = pytest.mark.integration

TENANTS = """
keys:
  - {key: sk-a, tenant: team-a, priority: 5}
  - {key: sk-low, tenant: team-low, priority: -1}
  - {key: sk-tpm, tenant: team-tpm, limits: {tokensPerMinute: 120}}
  - {key: sk-rps, tenant: team-rps, limits: {requestsPerSecond: 0.2}}
  - key: sk-gie
    tenant: team-gie
    allowObjectiveHeader: {critical: 8}
"""
ASK = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def fleet(tmp_path):
    path = tmp_path / "tenants.yaml"
    path.write_text(TENANTS)
    pod = ServedPod(ScriptedPod(["Hello", ",", " world"], api_key="pod-key",
                                tenants_file=str(path)))
    seen: list[tuple[str, int]] = []
    submit = pod.pod.engine.submit

    def record(req):
        seen.append((req.tenant, req.priority))
        return submit(req)

    pod.pod.engine.submit = record
    # One slot, as the pod's /metrics tells the router: with --max-queued-per-replica 0 a
    # second request waits in the router's hold queue.
    pod.pod.serving.metrics.max_batch.set(1)
    router = start_router([pod.url], "--tenants-file", str(path), "--backend-api-key", "pod-key",
                          "--max-queued-per-replica", "0")
    try:
        wait_until(lambda: httpx.get(f"{router.url}/health").json()["ready_backends"] == 1)
        yield router, pod, path, seen
    finally:
        router.stop()
        pod.close()


def chat(url: str, key: str, stream: bool = False, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
        "messages": ASK, "stream": stream}, headers={"authorization": f"Bearer {key}", **headers})


def test_keys_tenants_and_priorities_reach_the_pod(fleet) -> None:
    router, pod, _, seen = fleet
    r = chat(router.url, "sk-nope")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{router.url}/v1/messages", headers={"x-api-key": "sk-nope"},
                   json={"model": "", "max_tokens": 8, "messages": ASK})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert chat(router.url, "sk-a").json()["choices"][0]["message"]["content"] == "Hello, world"
    # A client cannot name another tenant: the router sets those headers itself.
    assert chat(router.url, "sk-a", **{T.TENANT_HEADER: "team-low"}).status_code == 200
    r = httpx.post(f"{router.url}/v1/messages", headers={"x-api-key": "sk-gie",
                                                         T.OBJECTIVE_HEADER: "critical"},
                   json={"model": "", "max_tokens": 8, "messages": ASK})
    assert r.status_code == 200
    # The pods' own key still works through the router (no tenant).
    assert chat(router.url, "pod-key").status_code == 200
    assert seen == [("team-a", 5), ("team-a", 5), ("team-gie", 8), ("", 0)]
    # A stream passes whole, without the pod's usage comment.
    r = chat(router.url, "sk-a", stream=True)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    assert "llamafleet-usage" not in r.text
    assert router.metric("llamafleet_router_tenant_requests_total", tenant="team-a") == 3
    assert router.metric("llamafleet_router_tenant_tokens_total", tenant="team-a",
                         kind="completion") == 9


def test_tokens_per_minute_within_one_request_and_an_honest_retry_after(fleet) -> None:
    router, _, _, _ = fleet
    served, one = 0, 0
    for i in range(40):
        r = chat(router.url, "sk-tpm", stream=bool(i % 2))
        if r.status_code == 429:
            break
        assert r.status_code == 200, r.text
        pod_usage = T.parse_usage(r.headers.get(T.USAGE_HEADER, "")) if not i % 2 else None
        one = sum(pod_usage) if pod_usage else one
        served += one if pod_usage else 0
    else:
        raise AssertionError("never limited")
    body = r.json()["error"]
    assert body["code"] == "rate_limit_exceeded" and "tokens per minute" in body["message"]
    retry = int(r.headers["retry-after"])
    assert 1 <= retry <= 60 * one // 120 + 1  # at most one request's tokens in debt
    charged = router.metric("llamafleet_router_tenant_tokens_total", tenant="team-tpm")
    assert 120 <= charged <= 120 + one + 2 * retry  # the budget refills 2 tokens a second
    assert router.metric("llamafleet_router_tenant_rejected_total", tenant="team-tpm",
                         reason="tokens_per_minute") == 1


def test_requests_per_second_retry_after_is_honest(fleet) -> None:
    router, _, _, _ = fleet
    assert chat(router.url, "sk-rps").status_code == 200
    r = chat(router.url, "sk-rps")
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    retry = int(r.headers["retry-after"])
    assert 1 <= retry <= 5
    # Polled, no fixed sleep: it is refused until about then, and admitted after.
    t0 = time.monotonic()
    wait_until(lambda: chat(router.url, "sk-rps").status_code == 200, timeout=retry + 5)
    assert time.monotonic() - t0 >= retry - 1.5


def test_a_rotated_key_works_within_seconds_and_the_old_one_stops(fleet) -> None:
    router, _, path, _ = fleet
    assert chat(router.url, "sk-a").status_code == 200
    new = path.with_suffix(".new")
    new.write_text(TENANTS.replace("sk-a,", "sk-a2,"))
    new.replace(path)  # as the kubelet swaps a mounted Secret's files
    wait_until(lambda: chat(router.url, "sk-a2").status_code == 200 and
               chat(router.url, "sk-a").status_code == 401, timeout=15)
    # A malformed rewrite: logged, and the last good file stays in force.
    path.write_text("keys: [{key: sk-z, tenant: z, limits: {concurrentRequests: -1}}]")
    t0 = time.monotonic()
    wait_until(lambda: time.monotonic() - t0 > 2.5 and chat(router.url, "sk-a2").status_code == 200,
               timeout=15)
    assert chat(router.url, "sk-z").status_code == 401
    out = router.stop()
    assert "tenants file" in out and "is malformed" in out and "concurrentRequests" in out
    assert "sk-z" not in out and "sk-a2" not in out


def test_a_malformed_file_stops_start_up_with_a_clear_message(tmp_path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("keys: [{key: sk-secret, tenant: a, limits: {tokensPerMinute: -5}}]")
    with pytest.raises(AssertionError) as e:
        start_router(["http://127.0.0.1:9"], "--tenants-file", str(path))
    assert "tokensPerMinute: must be >= 1" in str(e.value) and "sk-secret" not in str(e.value)


def test_the_hold_queue_serves_the_higher_priority_first(fleet) -> None:
    router, pod, _, seen = fleet
    gate = pod.pod.backend.hold(1)
    results: dict[str, list[int]] = {}

    def send(name: str, key: str) -> None:
        results.setdefault(name, []).append(chat(router.url, key).status_code)

    # One running in the pod's one slot (held by the gate), then a low-priority request and
    # a high one, held by the router in that order.
    threads = [threading.Thread(target=send, args=("fill", "sk-a"))]
    threads[0].start()
    wait_until(lambda: pod.pod.engine.running == 1, timeout=15)
    for name, key in (("low", "sk-low"), ("high", "sk-a")):
        threads.append(threading.Thread(target=send, args=(name, key)))
        threads[-1].start()
        depth = len(threads) - 1
        wait_until(lambda d=depth: router.metric("llamafleet_router_hold_queue_depth") == d,
                   timeout=10)
    gate.set()
    for t in threads:
        t.join(60)
    assert results == {"fill": [200], "low": [200], "high": [200]}
    assert [p for _, p in seen] == [5, 5, -1]  # the high priority went first
    assert router.metric("llamafleet_router_tenant_queue_wait_seconds_count",
                         tenant="team-low") == 1


def test_the_hold_queue_takes_tenants_of_one_priority_in_turn(fleet) -> None:
    router, pod, _, seen = fleet
    gate = pod.pod.backend.hold(1)
    threads: list[threading.Thread] = []

    def send(key: str) -> None:
        threads.append(threading.Thread(target=chat, args=(router.url, key)))
        threads[-1].start()

    send("sk-gie")  # runs in the pod's one slot, held there by the gate
    wait_until(lambda: pod.pod.engine.running == 1, timeout=15)
    for depth, key in enumerate(["sk-gie", "sk-gie", "sk-gie", "sk-tpm"], start=1):
        send(key)  # held by the router in this order: three of team-gie, then team-tpm
        wait_until(lambda d=depth: router.metric("llamafleet_router_hold_queue_depth") == d,
                   timeout=10)
    gate.set()
    for t in threads:
        t.join(60)
    # Both of priority 0: team-tpm's one request goes second, not behind all of team-gie's.
    assert [t for t, _ in seen] == ["team-gie", "team-gie", "team-tpm", "team-gie", "team-gie"]
