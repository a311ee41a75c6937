"""Real servers on loopback for tests of every part: free ports, `llamafleet serve` in a
thread (:func:`start_server`) or as a process (:func:`serve_process`), `llamafleet router` as a
process (:func:`start_router`), raw HTTP exchanges, and :func:`wait_until` (no sleeps used as
synchronisation). The pytest fixtures built on these (the embedded models, the session's
servers) are in tests/conftest.py."""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


def exchange(port: int, *parts: bytes, read_timeout: float = 10) -> bytes:
    """Sends ``parts`` on one new loopback connection, then reads until the server closes it
    (a reset counts as closed: a server that stops reading early may reset) or says nothing
    for ``read_timeout``."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        out = b""
        try:
            for part in parts:
                s.sendall(part)
            while chunk := s.recv(65536):
                out += chunk
        except (TimeoutError, ConnectionResetError, BrokenPipeError):
            pass
        return out


def wait_until(cond, timeout: float = 30.0):
    """Poll a condition that another thread makes true, with a deadline (no fixed sleeps);
    return its first truthy value. When ``cond()`` returns an awaitable, await this."""
    end = time.monotonic() + timeout
    value = cond()
    if inspect.isawaitable(value):
        return _await_until(cond, value, end, timeout)
    while not value:
        _check_deadline(end, timeout, value)
        threading.Event().wait(0.01)
        value = cond()
    return value


async def _await_until(cond, first, end: float, timeout: float):
    value = await first
    while not value:
        _check_deadline(end, timeout, value)
        await asyncio.sleep(0.01)  # yield to the loop between polls
        value = await cond()
    return value


def _check_deadline(end: float, timeout: float, last: object) -> None:
    if time.monotonic() > end:
        raise AssertionError(f"condition not met in {timeout:g}s; last value: {last!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_process(*flags: str, port: int | None = None) -> tuple[subprocess.Popen, int]:
    """`llamafleet serve` as users and pods start it: a separate process (that a test may
    kill) on loopback; returns it and its HTTP port."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "llamafleet.common.cli", "serve", "--host", "127.0.0.1",
           "--http-port", str(port), "--grpc-port", str(free_port()),
           "--metrics-port", str(free_port()), "--threads", "2", "--log-format", "console",
           *flags]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), port


def serve_ready(proc: subprocess.Popen, port: int) -> bool:
    """For wait_until: the process answers /ready (and fails loudly if it died)."""
    if proc.poll() is not None:
        raise AssertionError(f"serve exited {proc.returncode}: {proc.stdout.read()[-3000:]}")
    try:
        return httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def send_request(url: str, path: str, body: dict, headers: dict | None = None
                 ) -> socket.socket:
    """POST ``body`` as JSON on a socket of its own and return the socket unread: the
    request is in flight until :func:`read_response`, and closing the socket is a client
    that leaves. (A streaming answer now sends its status line only with its first token,
    so an httpx client would block in ``stream()`` while the request waits in the queue.)"""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()  # ASCII: escapes what UTF-8 cannot carry (\ud800)
    head = b"".join(k.encode() + b": " + (v if isinstance(v, bytes) else v.encode()) + b"\r\n"
                    for k, v in (headers or {}).items())
    sock = socket.create_connection((host, int(port)), timeout=300)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
                 .encode() + head + b"\r\n" + data)
    return sock


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """The status and the raw rest (headers and body) of a :func:`send_request` answer."""
    out = b""
    with sock:
        while chunk := sock.recv(65536):
            out += chunk
    status_line, _, rest = out.partition(b"\r\n")
    return int(status_line.split()[1]), rest


def json_body(rest: bytes) -> dict:
    """The JSON body of a plain (not chunked) :func:`read_response` answer."""
    return json.loads(rest.split(b"\r\n\r\n", 1)[1])


@dataclass
class RunningServer:
    server: object
    settings: object
    thread: threading.Thread
    loop: asyncio.AbstractEventLoop

    @property
    def url(self) -> str:
        scheme = "https" if self.settings.http_tls else "http"
        return f"{scheme}://127.0.0.1:{self.settings.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.settings.grpc_port}"

    @property
    def serving(self):
        return self.server.serving

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.server.stop)
        self.thread.join(60)


def start_server(**overrides) -> RunningServer:
    """A real `llamafleet serve` in a thread; returns once the model is loaded."""
    from llamafleet.inference.main import Server
    from llamafleet.inference.settings import Settings

    values = dict(host="127.0.0.1", http_port=free_port(), grpc_port=free_port(),
                  metrics_port=free_port(), context_size=1024, max_batch_size=4,
                  threads=2, default_max_tokens=64)
    values.update(overrides)
    settings = Settings(**values)
    ready = threading.Event()
    box: dict = {}

    def run() -> None:
        async def main() -> None:
            server = Server(settings)
            box["server"], box["loop"] = server, asyncio.get_running_loop()

            async def signal_ready() -> None:
                await server.ready.wait()
                ready.set()

            waiter = asyncio.create_task(signal_ready())
            try:
                await server.run()
            except BaseException as e:  # noqa: BLE001 - reported to the test
                box["error"] = e
            finally:
                waiter.cancel()
                ready.set()

        asyncio.run(main())

    thread = threading.Thread(target=run, name="test-server", daemon=True)
    thread.start()
    assert ready.wait(300), "server did not become ready"
    if "error" in box or box["server"].failed:
        raise RuntimeError(f"server failed to start: {box.get('error') or box['server'].failed}")
    return RunningServer(box["server"], settings, thread, box["loop"])


@dataclass
class LoopbackProcess:
    """A server process of ours listening on a loopback port."""

    proc: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class Router(LoopbackProcess):
    """A `llamafleet router` process on loopback (:func:`start_router`)."""

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.url}/router/metrics", timeout=5).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def stop(self) -> str:
        self.proc.terminate()
        return self.proc.communicate(timeout=30)[0]


def start_router(backends: list[str], *flags: str) -> Router:
    """`llamafleet router` as users start it (static ``--backends``), once its /health answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "llamafleet.common.cli", "router",
           "--backends", ",".join(backends), "--host", "127.0.0.1", "--port", str(port),
           "--poll-interval", "0.2", "--log-format", "console", *flags]
    router = Router(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True), port)

    def up() -> bool:
        if router.proc.poll() is not None:
            raise AssertionError(f"router exited: {router.proc.stdout.read()[-3000:]}")
        try:
            return httpx.get(f"{router.url}/health", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, timeout=60)
    return router
