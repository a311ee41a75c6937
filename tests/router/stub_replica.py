"""A stand-in for `llamafleet serve` in router tests: a separate process (so a test can
SIGSTOP or kill it) that speaks just enough HTTP/1.1, on asyncio streams, to be sick in
exactly the ways a test asks for.

    python stub_replica.py PORT MODE [API_KEY]

MODE:
- ``ok``: /ready 200, /metrics the pod's load gauges, and any other request 200 with a small
  JSON answer; ``"stream": true`` in a POST body gets 50 SSE events 0.1 s apart.
- ``fail``: like ``ok``, but every POST is read and then its connection dropped without a
  byte of answer (a replica that fails before its first byte but passes its polls).
API_KEY: /metrics then needs ``Authorization: Bearer API_KEY`` (401 otherwise).
STUB_ADAPTERS (environment, comma-separated): LoRA adapters it holds; /metrics then has the
pod's LoRA gauge (max_lora: how many) and GET /v1/models lists them with their parent.

``GET /stub/log`` answers what it received: each request's method, path and headers (polls
aside); ``GET /stub/polls`` how many polls of /metrics (and, with adapters, of /v1/models) it
has had.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

METRICS = (b"llamafleet_running_sequences 0.0\nllamafleet_queue_depth 0.0\n"
           b"llamafleet_kv_cache_cells_used 0.0\nllamafleet_kv_cache_cells_total 1024.0\n"
           b"llamafleet_max_batch_size 4.0\n")
ADAPTERS = [a for a in os.environ.get("STUB_ADAPTERS", "").split(",") if a]
if ADAPTERS:
    METRICS += (b'llamafleet_lora_requests_info{running_lora_adapters="",'
                b'waiting_lora_adapters="",max_lora="%d"} 1.0\n' % len(ADAPTERS))
MODELS = json.dumps({"object": "list", "data": [
    {"id": "stub", "object": "model"},
    *({"id": a, "object": "model", "parent": "stub"} for a in ADAPTERS)]}).encode()


def answer(status: int, body: bytes, ctype: bytes = b"application/json",
           extra: bytes = b"") -> bytes:
    return (b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
            b"date: Thu, 01 Jan 2026 00:00:00 GMT\r\nserver: stub\r\n%s\r\n"
            % (status, ctype, len(body), extra)) + body


async def main(port: int, mode: str, key: str | None) -> None:
    log: list[dict] = []
    polls = {"metrics": 0, "models": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [tuple(x.split(":", 1)) for x in lines[1:] if x]
                hmap = {k.strip().lower(): v.strip() for k, v in headers}
                body = await reader.readexactly(int(hmap.get("content-length", "0")))
                path = target.split("?")[0]
                models = bool(ADAPTERS) and method == "GET" and path == "/v1/models"
                if path not in ("/ready", "/metrics", "/stub/log", "/stub/polls") and not models:
                    log.append({"method": method, "path": target,
                                "headers": [[k.strip(), v.strip()] for k, v in headers]})
                if path == "/ready":
                    writer.write(answer(200, b'{"status":"ready"}'))
                elif path == "/stub/polls":
                    writer.write(answer(200, json.dumps(polls).encode()))
                elif path == "/metrics":
                    polls["metrics"] += 1
                    if key and hmap.get("authorization") != f"Bearer {key}":
                        writer.write(answer(401, b'{"error":{"message":"key"}}'))
                    else:
                        writer.write(answer(200, METRICS, b"text/plain"))
                elif models:
                    polls["models"] += 1
                    writer.write(answer(200, MODELS))
                elif path == "/stub/log":
                    writer.write(answer(200, json.dumps(log).encode()))
                elif method == "POST" and mode == "fail":
                    writer.transport.abort()
                    return
                elif method == "POST" and b'"stream": true' in body.replace(b'":true', b'": true'):
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                                 b"transfer-encoding: chunked\r\n\r\n")
                    for i in range(50):
                        event = b'data: {"i": %d}\n\n' % i
                        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                        await writer.drain()
                        await asyncio.sleep(0.1)
                    writer.write(b"0\r\n\r\n")
                else:
                    writer.write(answer(200, b'{"object": "stub", "ok": true}'))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, limit=64 * 1024 * 1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
