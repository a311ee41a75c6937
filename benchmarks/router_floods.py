"""The router's memory (RSS) under three floods from unauthenticated clients on loopback
(issue 23, item 3), for this tree or another one's interpreter (to compare with main):

- **header flood**: connections that each send a request head with an 8 MiB header;
- **body flood**: connections that each announce an 8 MiB body, send all but its last byte,
  and then stall;
- **hold flood**: 300 complete requests of 1 MiB each while no replica is ready (all held).

For each: the router's RSS before, its peak during the flood (sampled every 20 ms from
/proc), and 3 s after the clients have gone; plus the slowest /health answer during the
flood. Writes JSON (commit, machine, settings, figures) to --out and prints it.

    .venv/bin/python benchmarks/router_floods.py --out benchmarks/results/router_floods.json
    .venv/bin/python benchmarks/router_floods.py --python ../main/.venv/bin/python --tree ../main
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Sampler:
    """Peak RSS of ``pid`` and the slowest /health, sampled in a thread."""

    def __init__(self, pid: int, url: str):
        self.pid, self.url, self.peak, self.health_worst = pid, url, 0.0, 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mib(self.pid))
            n += 1
            if n % 10 == 1:
                t = time.monotonic()
                try:
                    httpx.get(f"{self.url}/health", timeout=10)
                    self.health_worst = max(self.health_worst, time.monotonic() - t)
                except httpx.HTTPError:
                    self.health_worst = float("inf")

    def __enter__(self) -> Sampler:
        self._t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._t.join(5)


async def header_flood(port: int, n: int) -> None:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-big: "

    async def one() -> None:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(head)
            for _ in range(8):
                w.write(b"a" * MiB)
                await w.drain()
            w.write(b"\r\ncontent-length: 2\r\n\r\n{}")
            await w.drain()
            await asyncio.wait_for(r.read(), 5)
            w.close()
        except (TimeoutError, OSError):
            pass

    await asyncio.gather(*(one() for _ in range(n)))


async def _open_and_hold(port: int, n: int, hold_s: float, data: bytes) -> list:
    """``n`` connections that each send ``data`` (a request, whole or in part) and wait."""
    async def one():
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(data)
            await w.drain()
            return w
        except OSError:
            return None

    writers = await asyncio.gather(*(one() for _ in range(n)))
    await asyncio.sleep(hold_s)
    return writers


def _post_head(length: int) -> bytes:
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
            b"application/json\r\ncontent-length: %d\r\n\r\n" % length)


async def body_flood(port: int, n: int, hold_s: float) -> list:
    size = 8 * MiB
    return await _open_and_hold(port, n, hold_s, _post_head(size) + b"{" + b" " * (size - 2))


async def hold_flood(port: int, n: int, hold_s: float) -> list:
    text = "x" * (MiB - 200)
    body = json.dumps({"messages": [{"role": "user", "content": text}]}).encode()
    return await _open_and_hold(port, n, hold_s, _post_head(len(body)) + body)


def run(python: str, flood: str, n: int) -> dict:
    port = free_port()
    cmd = [python, "-m", "llamafleet.common.cli", "router", "--backends",
           f"http://127.0.0.1:{free_port()}", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "WARNING", "--log-format", "console"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        time.sleep(1)
        before = rss_mib(proc.pid)
        with Sampler(proc.pid, url) as sampler:
            t = time.monotonic()
            if flood == "header":
                asyncio.run(header_flood(port, n))
            else:
                async def go() -> None:
                    fn = body_flood if flood == "body" else hold_flood
                    writers = await fn(port, n, 5.0)
                    for w in writers:
                        if w is not None:
                            w.close()
                asyncio.run(go())
            took = time.monotonic() - t
        time.sleep(3)
        after = rss_mib(proc.pid)
        return {"flood": flood, "connections": n, "rss_before_mib": round(before, 1),
                "rss_peak_mib": round(sampler.peak, 1), "rss_after_mib": round(after, 1),
                "health_worst_s": round(sampler.health_worst, 3), "flood_s": round(took, 1)}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=sys.executable, help="interpreter with llamafleet")
    ap.add_argument("--headers", type=int, default=64, help="header-flood connections")
    ap.add_argument("--bodies", type=int, default=64, help="body-flood connections")
    ap.add_argument("--held", type=int, default=300, help="hold-flood requests")
    ap.add_argument("--tree", type=Path, default=ROOT, help="the tree --python runs (for the commit)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    tree = str(args.tree)
    commit = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    results = [run(args.python, "header", args.headers), run(args.python, "body", args.bodies),
               run(args.python, "hold", args.held)]
    out = {"commit": commit, "tree": tree, "machine": platform.node(),
           "cpus": len(__import__("os").sched_getaffinity(0)), "settings": "defaults",
           "results": results}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
