"""A no-op OpenAI-compatible streaming server: the ceiling of a benchmark client.

It answers ``GET /v1/models`` and ``POST /v1/chat/completions`` (``stream: true``) with
``max_tokens`` pre-rendered SSE chunks written as fast as the socket takes them (the
streams take turns, one event each, like a decode step), then the
usage chunk and ``[DONE]``, over HTTP/1.1 keep-alive. No model, no sampling, no framework:
only the standard library, so it runs wherever ``llamafleet bench`` runs. Whatever
events/s a client reaches against it is that client's own limit
(``llamafleet bench --self-test``).

Several worker processes share one port (``SO_REUSEPORT``), so the server is not the
limit either: one worker writes events several times faster than one client parses them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import signal
import socket
import sys
import threading
from collections.abc import Callable

from llamafleet.common.contract import SYSTEM_FINGERPRINT  # standard library only

MODEL_ID = "noop"
_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ntransfer-encoding: chunked\r\n"
         b"cache-control: no-cache\r\n\r\n")


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _event(obj: dict) -> bytes:
    return _chunk(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


def _frame(delta: dict, finish: str | None) -> dict:
    """A chunk the size and shape of llamafleet's own (the client parses the same bytes)."""
    return {"id": "chatcmpl-0123456789abcdef01234567", "object": "chat.completion.chunk",
            "created": 1764000000, "model": MODEL_ID, "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


TOKEN = _event(_frame({"content": " tok"}, None))
FIRST = _event(_frame({"role": "assistant", "content": ""}, None))
DONE = _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n"


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line, *fields = head.decode("latin-1").split("\r\n")
            method, path = line.split(" ")[:2]
            headers = dict(f.split(":", 1) for f in fields if ":" in f)
            headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            if method == "GET" and path == "/v1/models":
                data = json.dumps({"object": "list", "data": [
                    {"id": MODEL_ID, "object": "model", "created": 0, "owned_by": "noop"}]}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(data), data))
            elif method == "POST" and path == "/v1/chat/completions":
                req = json.loads(body or b"{}")
                n = int(req.get("max_tokens") or 16)
                writer.write(_HEAD % b"text/event-stream" + FIRST)
                for _ in range(n):
                    writer.write(TOKEN)
                    await writer.drain()
                    # Let the other streams write theirs, as a server's decode step would:
                    # each event then leaves in its own packet, not in a block of them.
                    await asyncio.sleep(0)
                writer.write(_event(_frame({}, "length")))
                if (req.get("stream_options") or {}).get("include_usage"):
                    writer.write(_event({**_frame({}, None), "choices": [], "usage": {
                        "prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}}))
                writer.write(DONE)
            else:
                data = b'{"error":{"message":"not found","type":"not_found_error"}}'
                writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(data), data))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


def _worker(host: str, port: int, ready) -> None:
    async def main() -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        server = await asyncio.start_server(_handle, sock=sock, backlog=1024)
        ready.release()
        await server.serve_forever()

    asyncio.run(main())


def start(workers: int = 1, host: str = "127.0.0.1", port: int = 0) -> tuple[int, Callable[[], None]]:
    """Start ``workers`` server processes on one port; returns (port, stop)."""
    probe = socket.socket()  # reserves the port until every worker listens on it
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    probe.bind((host, port))
    port = probe.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Semaphore(0)
    procs = [ctx.Process(target=_worker, args=(host, port, ready), daemon=True)
             for _ in range(max(1, workers))]
    for p in procs:
        p.start()
    try:
        started = 0
        while started < len(procs):
            if ready.acquire(timeout=0.5):
                started += 1
            elif not all(p.is_alive() for p in procs):
                for p in procs:
                    p.terminate()
                raise RuntimeError("a no-op server worker exited at start-up")
    finally:
        probe.close()

    def stop() -> None:
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(10)

    return port, stop


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    p.add_argument("--workers", type=int, default=1, help="server processes")
    args = p.parse_args(argv)
    port, stop = start(args.workers, args.host, args.port)
    print(f"no-op server on http://{args.host}:{port}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
