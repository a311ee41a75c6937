"""The router against sick replicas and hostile clients (issue 23, items 1-6): a real
`llamafleet router` process in front of stub replicas (tests/router/stub_replica.py,
separate processes that a test can SIGSTOP), all on loopback.

Each test bounds what it waits for: no request may hang past its deadline, none may be sent
more than a bounded number of times, and /health must stay fast meanwhile."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from llamafleet.router.replicas import replica_id

from tests.support.servers import Router, exchange, free_port, start_router, wait_until

pytestmark = pytest.mark.integration

STUB = Path(__file__).with_name("stub_replica.py")
CHAT = "/v1/chat/completions"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
# Fast polls and short deadlines, so that each test's bound is seconds.
FAST = ("--poll-timeout", "0.5", "--poll-failure-budget", "2", "--failure-backoff", "5")


class Stub:
    def __init__(self, mode: str = "ok", key: str | None = None, port: int | None = None,
                 adapters: str = ""):
        """``adapters``: LoRA adapters it holds, comma-separated (STUB_ADAPTERS)."""
        self.port = port or free_port()
        self.proc = subprocess.Popen([sys.executable, str(STUB), str(self.port), mode,
                                      *([key] if key else [])],
                                     env={**os.environ, "STUB_ADAPTERS": adapters})
        wait_until(self._up, timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def received(self) -> list[dict]:
        """Requests it got, other than polls."""
        return httpx.get(f"{self.url}/stub/log", timeout=5).json()

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.kill()
        self.proc.wait(10)


@contextmanager
def fleet(stubs: list[Stub], *flags: str, extra: list[str] = ()) -> Iterator[Router]:
    """A router over ``stubs`` (and ``extra`` URLs), every stub ready through it."""
    router = start_router([s.url for s in stubs] + list(extra), *FAST, *flags)
    try:
        wait_until(lambda: router.metric("llamafleet_router_backends_ready") == len(stubs),
                   timeout=30)
        yield router
    finally:
        output = router.stop()
        for s in stubs:
            s.stop()
        assert "Traceback" not in output, output[-4000:]


def health_time(router: Router) -> float:
    t = time.monotonic()
    assert httpx.get(f"{router.url}/health", timeout=5).status_code == 200
    return time.monotonic() - t


class HealthWatch:
    """Times /health every 0.1 s in a thread while a test runs; ``worst`` is the slowest."""

    def __init__(self, router: Router):
        self.router, self.worst, self._stop = router, 0.0, threading.Event()
        self._t = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.worst = max(self.worst, health_time(self.router))

    def __enter__(self) -> HealthWatch:
        self._t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._t.join(10)


def post(router: Router, body: dict | None = None, timeout: float = 30, **kw) -> httpx.Response:
    return httpx.post(f"{router.url}{CHAT}", json=body or BODY, timeout=timeout, **kw)


# --- 1: a replica that accepts connections but never answers -----------------------------
def test_a_stopped_replica_neither_freezes_readiness_nor_holds_its_requests() -> None:
    stopped, healthy = Stub(), Stub()
    later_port = free_port()
    later = None
    with fleet([stopped, healthy], extra=[f"http://127.0.0.1:{later_port}"]) as router, \
            HealthWatch(router) as watch:
        os.kill(stopped.proc.pid, signal.SIGSTOP)
        # Requests sent now may go to the stopped replica: each gets its answer from the
        # healthy one once the stopped one is given up (2 polls of 0.5 s, 0.2 s apart).
        results: dict[int, tuple[int, float]] = {}

        def ask(i: int) -> None:
            t = time.monotonic()
            r = post(router, headers={"x-llamafleet-routing-key": f"tenant-{i}"})
            results[i] = (r.status_code, time.monotonic() - t)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        # The stopped replica leaves the rotation while its poll hangs ...
        wait_until(lambda: router.metric("llamafleet_router_backends_ready") == 1, timeout=5)
        # ... and a replica that starts meanwhile is noticed (its poll does not wait).
        later = Stub(port=later_port)
        wait_until(lambda: router.metric("llamafleet_router_backends_ready") == 2, timeout=5)
        for t in threads:
            t.join(20)
        assert sorted(results) == list(range(6))
        assert all(status == 200 and took < 8 for status, took in results.values()), results
    later.stop()
    assert watch.worst < 2.0, watch.worst


def test_a_stream_whose_replica_stops_mid_way_ends_with_an_error_event() -> None:
    stopped = Stub()
    with fleet([stopped]) as router, HealthWatch(router) as watch:
        t = time.monotonic()
        lines = []
        with httpx.stream("POST", f"{router.url}{CHAT}", json={**BODY, "stream": True},
                          timeout=30) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 2:
                    os.kill(stopped.proc.pid, signal.SIGSTOP)
        took = time.monotonic() - t
        assert '"error"' in lines[-1] and "replica" in lines[-1], lines
        assert took < 8, took
    assert watch.worst < 2.0, watch.worst


# --- 2: a replica that fails every request before its first byte -------------------------
def test_a_replica_that_fails_every_request_gets_each_request_once() -> None:
    failing = Stub("fail")
    with fleet([failing], "--hold-timeout", "3") as router, HealthWatch(router) as watch:
        t = time.monotonic()
        r = post(router)
        took = time.monotonic() - t
        # Not "no replica became ready": the replica failed it, and no other was there.
        assert r.status_code == 502 and r.json()["error"]["code"] == "replica_failed", r.text
        assert took < 6, took
        assert len(failing.received()) == 1
        # It passes its polls all along, yet its failure keeps it out of rotation for the
        # backoff (5 s here): the next request waits for it, and is sent to it once.
        t = time.monotonic()
        r = post(router, body={**BODY, "n": 2})
        assert r.status_code in (502, 503), r.text
        assert time.monotonic() - t < 6
        assert len(failing.received()) <= 2
    assert watch.worst < 2.0, watch.worst


def test_retries_go_to_other_replicas_and_stop_after_max_attempts() -> None:
    stubs = [Stub("fail") for _ in range(4)]
    with fleet(stubs, "--max-attempts", "3", "--hold-timeout", "30") as router:
        t = time.monotonic()
        r = post(router)
        assert r.status_code == 502 and r.json()["error"]["code"] == "replica_failed", r.text
        assert time.monotonic() - t < 5
        sends = [len(s.received()) for s in stubs]
        assert sorted(sends) == [0, 1, 1, 1], sends

    failing, healthy = Stub("fail"), Stub()
    with fleet([failing, healthy]) as router:
        for i in range(4):
            r = post(router, headers={"x-llamafleet-routing-key": f"k{i}"})
            assert r.status_code == 200, r.text
        assert len(failing.received()) <= 1  # then it backs off


# --- 3: bounded heads and bodies, with deadlines ------------------------------------------
def test_an_oversized_head_or_too_many_headers_never_reach_a_replica() -> None:
    stub = Stub()
    with fleet([stub], "--header-timeout", "2") as router:
        big = exchange(router.port, b"POST " + CHAT.encode() + b" HTTP/1.1\r\nhost: x\r\n"
                           b"x-big: " + b"a" * (8 * 1024 * 1024) + b"\r\ncontent-length: 2\r\n\r\n{}")
        assert big == b"" or big.startswith(b"HTTP/1.1 400"), big[:200]  # b"": reset
        many = {f"x-h{i}": "v" for i in range(10_000)}
        r = httpx.post(f"{router.url}{CHAT}", json=BODY, headers=many, timeout=10)
        assert r.status_code in (400, 431)
        few = {f"x-h{i}": "v" for i in range(150)}  # under 32 KiB, over 100 fields
        r = httpx.post(f"{router.url}{CHAT}", json=BODY, headers=few, timeout=10)
        assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
        assert stub.received() == []


def test_slow_clients_get_408_at_their_deadlines() -> None:
    stub = Stub()
    with fleet([stub], "--header-timeout", "1", "--body-timeout", "1") as router, \
            HealthWatch(router) as watch:
        t = time.monotonic()
        # A head that never ends: the connection is closed after --header-timeout.
        out = exchange(router.port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        assert out.startswith(b"HTTP/1.1 408"), out
        assert time.monotonic() - t < 4
        # A body that never ends: 408 after --body-timeout.
        t = time.monotonic()
        out = exchange(router.port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                           b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{")
        assert b" 408 " in out.split(b"\r\n")[0] and b"request_timeout" in out, out
        assert time.monotonic() - t < 4
        assert stub.received() == []
    assert watch.worst < 2.0, watch.worst


def test_refusals_come_before_the_body_is_read() -> None:
    router = start_router([f"http://127.0.0.1:{free_port()}"], "--hold-queue-size", "1",
                          "--max-request-bytes", "1048576", "--hold-timeout", "4")
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("r", post(router, timeout=60)))
    try:
        t.start()
        wait_until(lambda: router.metric("llamafleet_router_hold_queue_depth") == 1)
        # Queue full: 429 to a head that announces 1 MiB, with no byte of the body sent.
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 1048576\r\n"
                b"content-type: application/json\r\n\r\n")
        out = exchange(router.port, head, read_timeout=5)
        assert out.startswith(b"HTTP/1.1 429") and b"queue_full" in out, out[:300]
        # Too large by its Content-Length: 413 at once.
        out = exchange(router.port, head.replace(b"1048576", b"2000000"), read_timeout=5)
        assert out.startswith(b"HTTP/1.1 413") and b"request_too_large" in out, out[:300]
    finally:
        if t.ident is not None:
            t.join(10)
        output = router.stop()
    assert box["r"].status_code == 503
    assert "Traceback" not in output


# --- 4: unauthenticated inputs that gave 500 -----------------------------------------------
def test_odd_inputs_pass_through_or_get_4xx_never_500() -> None:
    stub = Stub()
    with fleet([stub]) as router:
        parts = {"model": "m", "messages": [{"role": "system", "content": [
            {"type": "text", "text": {"not": "a string"}}]}, {"role": "user", "content": "hi"}]}
        assert post(router, parts).status_code == 200
        nested = b"[" * 50_000 + b"]" * 50_000
        r = httpx.post(f"{router.url}{CHAT}", content=nested, timeout=30,
                       headers={"content-type": "application/json"})
        assert r.status_code == 200  # the replica judges the body
        r = post(router, headers={"User-Agent": "café-client".encode()})
        assert r.status_code == 200
        assert ["user-agent", "café-client".encode().decode("latin-1")] in \
            stub.received()[-1]["headers"]
        r = httpx.get(f"{router.url}/v1/models%00", timeout=10)
        assert r.status_code == 200 and stub.received()[-1]["path"] == "/v1/models%00"


# --- 5: held requests whose clients have left ---------------------------------------------
def test_held_requests_whose_clients_left_free_their_places() -> None:
    router = start_router([f"http://127.0.0.1:{free_port()}"], "--hold-queue-size", "4",
                          "--hold-timeout", "10")
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("r", post(router, timeout=60)))
    try:
        body = json.dumps(BODY).encode()
        req = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
               b"application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        socks = []
        for _ in range(4):
            s = socket.create_connection(("127.0.0.1", router.port))
            s.sendall(req)
            socks.append(s)
        wait_until(lambda: router.metric("llamafleet_router_hold_queue_depth") == 4)
        for s in socks:
            s.close()
        wait_until(lambda: router.metric("llamafleet_router_hold_queue_depth") == 0, timeout=5)
        assert router.metric("llamafleet_router_refused_total", reason="client_left") == 4
        # A new client is held, not refused.
        t.start()
        wait_until(lambda: router.metric("llamafleet_router_hold_queue_depth") == 1)
        assert "r" not in box
    finally:
        router.stop()
        if t.ident is not None:
            t.join(10)


# --- 6: smaller findings ------------------------------------------------------------------
def test_the_routers_own_errors_are_openai_shaped_and_the_pods_extras_are_not_proxied() -> None:
    stub = Stub()
    with fleet([stub]) as router:
        for method, path, status in [("PATCH", CHAT, 405), ("POST", "/router/metrics", 405),
                                     ("POST", "/health", 405), ("GET", "/docs", 404),
                                     ("GET", "/openapi.json", 404), ("GET", "/studio/", 404),
                                     ("GET", "/", 404), ("GET", "/v1/../docs", 404)]:
            r = httpx.request(method, f"{router.url}{path}", timeout=10)
            assert r.status_code == status, (method, path, r.status_code, r.text)
            assert r.json()["error"]["type"] == "invalid_request_error", (path, r.text)
        assert stub.received() == []


def test_answers_carry_one_date_and_server_and_no_internal_url() -> None:
    stub = Stub()
    with fleet([stub], "--backend-api-key", "k3y") as router:
        r = post(router)
        assert r.status_code == 200
        names = [k.lower() for k, _ in r.headers.raw]
        assert names.count(b"date") == 1 and names.count(b"server") == 1, r.headers.raw
        assert r.headers["x-llamafleet-backend"] == replica_id(stub.url)
        for text in (r.headers["x-llamafleet-backend"],
                     httpx.get(f"{router.url}/health", timeout=5).text,
                     httpx.get(f"{router.url}/router/metrics", timeout=5).text):
            assert "127.0.0.1" not in text and str(stub.port) not in text
        # The operator (who holds the pods' key) can still map ids to replicas.
        health = httpx.get(f"{router.url}/health", timeout=5,
                           headers={"Authorization": "Bearer k3y"}).json()
        assert health["urls"] == {replica_id(stub.url): stub.url}


def test_pods_that_refuse_the_routers_polls_are_a_warning() -> None:
    keyed = Stub(key="s3cret")
    router = start_router([keyed.url])
    try:
        wait_until(lambda: httpx.get(f"{keyed.url}/stub/polls").json()["metrics"] >= 2)
    finally:
        output = router.stop()
        keyed.stop()
    line = next(x for x in output.splitlines() if "refuses the router's polls" in x)
    assert "WARNING" in line and "--backend-api-key" in line, line
