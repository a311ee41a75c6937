"""Bounded reads with deadlines, for both HTTP servers (the pod's and the router's).

What bounds what, and who does it:
- **the request head** (request line and headers), in bytes: h11's own limit
  (``h11_max_incomplete_event_size``, passed through uvicorn). uvicorn's default parser,
  httptools, has no such limit (the pod read eight 32 MiB headers), so both servers run on
  h11. Beyond it uvicorn answers 400 and closes the connection: the head is never held.
- **the number of headers**: ``ReadLimits`` below (431). h11 bounds their total bytes
  already; the count bounds the per-header work behind it (a 32 KiB head still holds
  thousands of empty headers).
- **connections with a request in progress**: uvicorn's ``limit_concurrency`` (503 beyond).
- **the time to send the head**: ``h11_protocol`` below. uvicorn arms a timer only between
  requests on a kept-alive connection (``timeout_keep_alive``); a client that opens a
  connection and sends its head one byte every 10 s is held for ever (slowloris). Our few
  lines close such a connection after ``head_timeout``.
- **closing while the client still sends** (a 400 for a head over the limit, a 413 before
  the body was read): uvicorn closes the socket at once, and a kernel that closes a socket
  with unread bytes sends a reset, which makes the client's kernel drop the answer it had
  not read yet (the client sees "connection reset" instead of the 400). ``h11_protocol``
  closes such a connection as nginx's lingering close does: it sends its answer and its end
  (a half close), then reads and drops what the client still sends, for at most
  ``LINGER_SECONDS`` and ``LINGER_BYTES``, and closes once the client has closed its side.
- **the body**, in bytes and in time: ``read_body`` (413 as soon as the count passes the
  limit, or at once from ``Content-Length``; 408 when the whole body has not arrived by its
  deadline). Neither Starlette nor uvicorn bounds a body's size or its time.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import (
    BadRequest,
    HeadersTooLarge,
    LlamafleetError,
    RequestTimeout,
    RequestTooLarge,
    http_error,
)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass(frozen=True)
class Limits:
    """One server's read limits (each server's settings say the values and why)."""

    max_header_bytes: int
    max_headers: int
    head_timeout: float
    max_body_bytes: int
    body_timeout: float
    max_connections: int
    body_setting: str = "max_request_bytes"  # named in the 413's message


def uvicorn_options(limits: Limits) -> dict[str, Any]:
    """The uvicorn.Config arguments that apply ``limits`` (h11, its head limit, the head
    deadline, and the cap on requests in progress)."""
    return {"http": h11_protocol(limits.head_timeout),
            "h11_max_incomplete_event_size": limits.max_header_bytes,
            "limit_concurrency": limits.max_connections}


LINGER_SECONDS = 2.0  # what a closing connection still drains from a client, at most:
LINGER_BYTES = 1 << 20  # a well-behaved client stops once it reads the answer
# h11 states of the peer that mean it may still be sending the request we answered.
_UNREAD = (h11.SEND_BODY, h11.ERROR)

_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n"
                b"connection: close\r\n\r\n")


def h11_protocol(head_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline on each request head: armed when a connection
    opens and when the first bytes of a new request arrive on a kept-alive one, disarmed
    once h11 has parsed the head. A connection that misses it gets 408 and is closed (a
    connection that sent nothing is closed silently)."""

    class H11WithHeadDeadline(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _head_bytes = False
        _lingering: _LingeringClose | None = None

        def connection_made(self, transport):  # type: ignore[no-untyped-def,override]
            super().connection_made(_LingeringClose.wrap(transport, self))
            self._arm_head()

        def data_received(self, data: bytes) -> None:
            if self._lingering is not None:
                self._lingering.drop(len(data))
                return
            super().data_received(data)
            if self.conn.their_state is h11.IDLE:  # still waiting for a complete head
                self._head_bytes = self._head_bytes or bool(data)
                self._arm_head()
            else:
                self._disarm_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head()
            if self._lingering is not None:
                self._lingering.done()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            self._head_bytes = False  # a kept-alive connection: uvicorn's keep-alive timer
            super().on_response_complete()  # covers the idle time until the next head

        def _arm_head(self) -> None:
            if self._head_timer is None and not self.transport.is_closing():
                self._head_timer = self.loop.call_later(head_timeout, self._head_expired)

        def _disarm_head(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_expired(self) -> None:
            self._head_timer = None
            if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
                return
            if self._head_bytes:
                self.transport.write(_TIMEOUT_408)
            self.transport.close()

    return H11WithHeadDeadline


class ClientLeft(Exception):
    """The client closed its connection while we read its body."""


async def read_body(receive: Receive, limit: int, deadline: float,
                    setting: str = "max_request_bytes") -> bytes:
    """The whole body, or RequestTooLarge as soon as it passes ``limit`` bytes, or
    RequestTimeout when it has not all arrived by ``deadline`` (time.monotonic()), or
    ClientLeft. Holds at most ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        try:
            async with asyncio.timeout(max(left, 0)):
                msg = await receive()
        except TimeoutError:
            raise RequestTimeout("The request body did not arrive in time.") from None
        if msg["type"] == "http.disconnect":
            raise ClientLeft
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise RequestTooLarge(f"The request body is larger than {limit} bytes ({setting}).")
        if chunk:
            chunks.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(chunks) if len(chunks) != 1 else chunks[0]


def declared_length(scope: Scope) -> int | None:
    """Content-Length as sent; BadRequest when it is not a number (h11 checks it too)."""
    for k, v in scope["headers"]:
        if k == b"content-length":
            if not v.isdigit():
                raise BadRequest("Content-Length is not a number.")
            return int(v)
    return None


def check_head(scope: Scope, limits: Limits) -> None:
    """Header count and declared body size: raises before any byte of the body is read."""
    if len(scope["headers"]) > limits.max_headers:
        raise HeadersTooLarge(f"The request has more than {limits.max_headers} header fields.")
    length = declared_length(scope)
    if length is not None and length > limits.max_body_bytes:
        raise RequestTooLarge(f"The request body is larger than {limits.max_body_bytes} bytes "
                              f"({limits.body_setting}).")


async def refuse(err: LlamafleetError, send: Send) -> None:
    """The OpenAI-shaped error, and the connection closed: the rest of the body (if any) is
    never read. Plain ASGI (no web framework here): the bytes a JSONResponse would send."""
    content, status, headers = http_error(err)
    body = json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()
    raw = [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json"),
           *((k.lower().encode(), v.encode()) for k, v in headers.items()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class ReadLimits:
    """ASGI middleware: refuses a request with too many headers (431) or a declared body over
    the limit (413) before reading it; then, with ``read=True``, reads the body within its
    size and time (413, 408) and hands it on in one piece. The router reads bodies itself,
    after it has decided to admit the request (``read=False``)."""

    def __init__(self, app: Callable[..., Awaitable[None]], limits: Limits, read: bool = True):
        self.app = app
        self.limits = limits
        self.read = read

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            check_head(scope, self.limits)
            if not self.read:
                return await self.app(scope, receive, send)
            deadline = time.monotonic() + self.limits.body_timeout
            body = await read_body(receive, self.limits.max_body_bytes, deadline,
                                   self.limits.body_setting)
        except LlamafleetError as e:
            return await refuse(e, send)
        except ClientLeft:
            return None
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


class _LingeringClose:
    """The transport uvicorn's protocol sees: ``close()`` while the client may still be
    sending its request becomes a lingering close (the module's docstring says why). Every
    other attribute is the real transport's. A TLS transport cannot half close; it closes."""

    def __init__(self, transport: asyncio.Transport, protocol: Any) -> None:
        self._transport = transport
        self._protocol = protocol
        self._closing = False
        self._dropped = 0
        self._timer: asyncio.TimerHandle | None = None
        # The hot path (one call per SSE frame) as an attribute: no __getattr__ hop.
        self.write = transport.write

    @classmethod
    def wrap(cls, transport: asyncio.Transport, protocol: Any) -> Any:
        return cls(transport, protocol) if transport.can_write_eof() else transport

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        transport, conn = self._transport, self._protocol.conn
        if transport.is_closing() or conn.their_state not in _UNREAD:
            transport.close()
            return
        self._protocol._lingering = self
        transport.write_eof()  # after what is buffered: the client reads the answer, then EOF
        transport.resume_reading()  # uvicorn may have paused reading; drain what comes
        self._timer = self._protocol.loop.call_later(LINGER_SECONDS, transport.close)

    def drop(self, n: int) -> None:
        self._dropped += n
        if self._dropped > LINGER_BYTES:
            self._transport.close()

    def done(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
