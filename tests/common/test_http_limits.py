"""common.http_limits on a real uvicorn on loopback: an answer sent while the client is still
sending its request reaches the client (a lingering close, not a reset)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import uvicorn
from llamafleet.common.errors import LlamafleetError
from llamafleet.common.http_limits import (
    LINGER_BYTES,
    Limits,
    check_head,
    read_body,
    refuse,
    uvicorn_options,
)

from tests.support.servers import free_port, wait_until

LIMITS = Limits(max_header_bytes=32 * 1024, max_headers=100, head_timeout=5,
                max_body_bytes=64 * 1024, body_timeout=5, max_connections=16)


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    try:
        check_head(scope, LIMITS)
        body = await read_body(receive, LIMITS.max_body_bytes, LIMITS.body_timeout)
    except LlamafleetError as e:
        await refuse(e, send)
        return
    answer = str(len(body)).encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(answer)).encode())]})
    await send({"type": "http.response.body", "body": answer})


@contextlib.contextmanager
def server() -> Iterator[int]:
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            lifespan="off", **uvicorn_options(LIMITS))
    s = uvicorn.Server(config)
    thread = threading.Thread(target=s.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: s.started, timeout=30)
        yield port
    finally:
        s.should_exit = True
        thread.join(30)


def send_then_read(port: int, head: bytes, more: int) -> bytes:
    """Sends ``head`` and then ``more`` bytes (the client goes on sending after the server
    has answered), closes its sending side, and reads everything the server sends. A reset
    anywhere fails the test: that is the bug this guards against."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(head)
        chunk = b"a" * 16384
        for _ in range(more // len(chunk)):
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while data := s.recv(65536):
            out += data
        return out


def test_a_head_over_the_limit_gets_its_400_while_the_client_still_sends() -> None:
    with server() as port:
        head = b"POST / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * (40 * 1024)
        out = send_then_read(port, head, 256 * 1024)
        assert out.startswith(b"HTTP/1.1 400"), out[:200]


def test_a_declared_body_over_the_limit_gets_its_413_while_the_client_still_sends() -> None:
    with server() as port:
        head = b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 1000000\r\n\r\n"
        out = send_then_read(port, head, 256 * 1024)
        assert out.startswith(b"HTTP/1.1 413"), out[:200]
        assert b"max_request_bytes" in out


def test_a_client_that_never_stops_sending_is_cut_off() -> None:
    """The drain is bounded: past LINGER_BYTES the connection is closed (a reset, then)."""
    with server() as port, socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000\r\n\r\n")
        sent = 0
        chunk = b"a" * 65536
        try:
            while sent < 64 * LINGER_BYTES:
                s.sendall(chunk)
                sent += len(chunk)
        except (ConnectionResetError, BrokenPipeError):
            pass
        assert sent < 64 * LINGER_BYTES


def test_a_kept_alive_connection_still_serves_the_next_request() -> None:
    with server() as port, socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for _ in range(2):
            s.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n\r\nabc")
            out = s.recv(65536)
            assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"3"), out
