"""The pod's HTTP server reads heads and bodies within bounds of size and time (issue 23,
item 3): a real `llamafleet serve` (embedded model) on loopback, with short deadlines."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.servers import RunningServer, exchange, start_server

pytestmark = pytest.mark.integration

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def pod(model_path: Path) -> Iterator[RunningServer]:
    srv = start_server(model_path=model_path, header_timeout_s=1.0, body_timeout_s=1.0)
    yield srv
    srv.stop()


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def test_huge_headers_are_cut_at_the_head_limit_and_never_held(pod: RunningServer) -> None:
    port = pod.settings.http_port
    before = rss_mib()
    results: list[bytes] = []

    def one() -> None:
        head = b"GET /health HTTP/1.1\r\nhost: x\r\nx-big: "
        results.append(exchange(port, head, *[b"a" * MiB] * 32, b"\r\n\r\n"))

    threads = [threading.Thread(target=one) for _ in range(8)]  # eight 32 MiB headers
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 8
    assert all(r == b"" or r.startswith(b"HTTP/1.1 400") for r in results), results
    assert rss_mib() - before < 64  # it grew by over 300 MiB when heads were unbounded
    many = {f"x-h{i}": "v" for i in range(150)}
    r = httpx.get(f"{pod.url}/v1/models", headers=many, timeout=10)
    assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"


def test_slow_heads_and_bodies_get_408_at_their_deadlines(pod: RunningServer) -> None:
    port = pod.settings.http_port
    t = time.monotonic()
    out = exchange(port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
    assert out.startswith(b"HTTP/1.1 408"), out
    assert time.monotonic() - t < 4
    t = time.monotonic()
    out = exchange(port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                         b"application/json\r\ncontent-length: 100\r\n\r\n{")
    assert b" 408 " in out.split(b"\r\n")[0] and b"request_timeout" in out, out
    assert time.monotonic() - t < 4
    # A request on time is served as before.
    r = httpx.post(f"{pod.url}/v1/completions", json={"prompt": "The sea", "max_tokens": 2},
                   timeout=60)
    assert r.status_code == 200, r.text
    # /health answers at once all along.
    t = time.monotonic()
    assert httpx.get(f"{pod.url}/health", timeout=5).status_code == 200
    assert time.monotonic() - t < 1
