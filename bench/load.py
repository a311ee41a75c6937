"""`llamafleet bench`: concurrent streaming load against OpenAI-compatible servers.

It measures what users feel: aggregate completion tokens/s, time to first token and
inter-token latency, per concurrency level, and with ``--compare`` the same load against
a second server, interleaved level by level in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import queue
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp
import httpx
from llamafleet.common.contract import BACKEND_HEADER, HTTP_PORT
from llamafleet.common.versions import llama_cpp_python_version

DEFAULT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
STREAMS_PER_PROCESS = 8  # 'auto': one client process per this many concurrent streams


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=f"http://127.0.0.1:{HTTP_PORT}", help="server base URL")
    p.add_argument("--compare", metavar="URL2", help="a second server, measured in the same run")
    p.add_argument("--concurrent", default="1,4", help="concurrency levels: '4' or '1,2,4,8'")
    p.add_argument("--requests", type=int, default=0,
                   help="requests per level (default: 2 x concurrency, at least 4)")
    p.add_argument("--max-tokens", type=int, default=64, help="completion tokens per request")
    p.add_argument("--prompt-file", type=Path, help="file with the prompt (default: a short story)")
    p.add_argument("--api-key", help="bearer key")
    p.add_argument("--model", help="model id (default: the first of /v1/models)")
    p.add_argument("--json", dest="json_out", type=Path, help="write results as JSON here")
    p.add_argument("--timeout", type=float, default=600, help="seconds per request")
    p.add_argument("--seed", type=int, default=None,
                   help="send seed N+i with request i (default: no seed)")
    p.add_argument("--no-ignore-eos", action="store_true",
                   help="let requests stop early at end of generation")
    p.add_argument("--processes", default="auto",
                   help="client processes sharing each level's streams: N, or 'auto' "
                   f"(one per {STREAMS_PER_PROCESS} streams, at most half the cores). At high "
                   "concurrency one Python SSE client process can itself be the limit "
                   "(--self-test measures it)")
    p.add_argument("--self-test", action="store_true",
                   help="measure this client's own ceiling: serve --concurrent against a "
                   "no-op streaming server (no model), with 1 process and then --processes, "
                   "and report events/s (tokens/s)")


@dataclass
class Sample:
    ok: bool
    completion_tokens: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None
    backend: str | None = None  # the replica that served it, where a router says (its header)


@dataclass
class LevelResult:
    server: str
    url: str
    concurrency: int
    requests: int
    completed: int
    failed: int
    wall_s: float
    completion_tokens: int
    tokens_per_s: float
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    itl_p50_s: float | None
    errors: list[str]
    processes: int = 1  # client processes that shared the streams


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


def session(streams: int, headers: dict | None = None) -> aiohttp.ClientSession:
    """The streaming client: up to ``streams`` connections (and a spare two), a new one per
    request. Reusing a kept-alive connection that the server is closing fails the request
    without the server being at fault (llama-server's: "Can not write request body" for about
    half the requests of a c64 run); a connection costs a loopback handshake per request of
    tens of tokens.

    aiohttp rather than httpx: its HTTP parser is C; against the no-op server (``--self-test``,
    2 cores) one process took in 61-66k events/s where httpx took 23-26k
    (benchmarks/results/cpu-client-ceiling-20261205-030325-*.json), so a client that shares the
    machine with the server it measures takes less from it, and one process carries more
    streams."""
    return aiohttp.ClientSession(
        headers=headers or {}, connector=aiohttp.TCPConnector(limit=streams + 2, force_close=True))


async def _one(client: aiohttp.ClientSession, url: str, body: dict, timeout: float) -> Sample:
    """One streamed chat completion (``session``'s client): its tokens, TTFT and gaps."""
    t0 = time.perf_counter()
    last = None
    s = Sample(ok=False)
    try:
        async with client.post(f"{url}/v1/chat/completions", json=body,
                               timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            s.backend = r.headers.get(BACKEND_HEADER)
            if r.status != 200:
                s.error = f"HTTP {r.status}: {(await r.read())[:200]!r}"
                return s
            chunks = 0
            async for raw in r.content:  # line by line
                if not raw.startswith(b"data: "):
                    continue
                data = raw[6:].rstrip(b"\r\n")
                if data == b"[DONE]":
                    s.ok = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    s.error = str(obj["error"])[:200]
                    return s
                if obj.get("usage"):
                    s.completion_tokens = obj["usage"]["completion_tokens"]
                for ch in obj.get("choices", []):
                    if ch.get("delta", {}).get("content"):
                        now = time.perf_counter()
                        if last is None:
                            s.ttft_s = now - t0
                        else:
                            s.itl_s.append(now - last)
                        last = now
                        chunks += 1
            if not s.completion_tokens:
                s.completion_tokens = chunks
    except (aiohttp.ClientError, TimeoutError, ValueError) as e:  # ValueError: bad JSON, a huge line
        s.error = f"{type(e).__name__}: {e}"[:200]
    return s


def _body(model: str, prompt: str, args: argparse.Namespace) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": args.max_tokens, "stream": True, "temperature": 0.7,
            "stream_options": {"include_usage": True}}
    if not args.no_ignore_eos:
        body["ignore_eos"] = True
    return body


async def _drive(url: str, body: dict, headers: dict, concurrency: int, indices: list[int],
                 seed: int | None, timeout: float, tick: Callable[[], None] = lambda: None
                 ) -> tuple[list[Sample], float, float]:
    """Requests ``indices`` over ``concurrency`` streams; returns (samples, start, end) on
    the system-wide monotonic clock, so several processes' spans can be joined."""
    todo = list(indices)
    samples: list[Sample] = []
    async with session(concurrency, headers) as client:
        async def worker() -> None:
            while todo:
                i = todo.pop()
                seeded = body if seed is None else {**body, "seed": seed + i}
                samples.append(await _one(client, url, seeded, timeout))
                tick()

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return samples, t0, time.monotonic()


def _client_process(barrier, results, *drive_args) -> None:
    barrier.wait(timeout=120)  # every process starts its streams together (or all give up)
    results.put(asyncio.run(_drive(*drive_args)))


def _spread(processes: int, url: str, body: dict, headers: dict, concurrency: int, n: int,
            args: argparse.Namespace, progress: Progress) -> tuple[list[Sample], float]:
    """One level over ``processes`` client processes: each owns a share of the streams and
    the requests that fall on them. Returns (samples, wall seconds from first start to last
    end)."""
    ctx = multiprocessing.get_context("spawn")
    shares = [concurrency // processes + (k < concurrency % processes) for k in range(processes)]
    owner = [k for k, c in enumerate(shares) for _ in range(c)]
    indices = [[i for i in range(n) if owner[i % concurrency] == k] for k in range(processes)]
    barrier, results = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_client_process, daemon=True,
                         args=(barrier, results, url, body, headers, shares[k], indices[k],
                               args.seed, args.timeout))
             for k in range(processes)]
    for p in procs:
        p.start()
    got: list[tuple[list[Sample], float, float]] = []
    while len(got) < processes:
        try:
            got.append(results.get(timeout=1.0))
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and results.empty():
                break
        else:
            for _ in got[-1][0]:
                progress.tick()
    for p in procs:
        p.join(10)
    samples = [s for part in got for s in part[0]]
    lost = n - len(samples)  # requests of a client process that died
    samples += [Sample(ok=False, error="a client process failed")] * lost
    wall = max(t1 for _, _, t1 in got) - min(t0 for _, t0, _ in got) if got else 0.0
    return samples, wall


def processes_for(concurrency: int, processes: int | None) -> int:
    """Client processes for one level: as asked, else one per STREAMS_PER_PROCESS streams,
    at most half the cores (the other half is for a server on the same machine)."""
    if processes is None:
        cap = max(1, (os.cpu_count() or 1) // 2)
        processes = min(cap, -(-concurrency // STREAMS_PER_PROCESS))
    return max(1, min(processes, concurrency))


async def _in_process(url: str, body: dict, headers: dict, concurrency: int, n: int,
                      args: argparse.Namespace, progress: Progress) -> tuple[list[Sample], float]:
    samples, t0, t1 = await _drive(url, body, headers, concurrency, list(range(n)), args.seed,
                                   args.timeout, progress.tick)
    return samples, t1 - t0


def run_level(name: str, url: str, model: str, prompt: str, concurrency: int, n: int,
              args: argparse.Namespace, progress: Progress, processes: int = 1) -> LevelResult:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    body = _body(model, prompt, args)
    processes = max(1, min(processes, concurrency))
    if processes == 1:
        samples, wall = asyncio.run(_in_process(url, body, headers, concurrency, n, args, progress))
    else:
        samples, wall = _spread(processes, url, body, headers, concurrency, n, args, progress)
    good = [s for s in samples if s.ok]
    tokens = sum(s.completion_tokens for s in good)
    ttfts = [s.ttft_s for s in good if s.ttft_s is not None]
    itls = [x for s in good for x in s.itl_s]
    return LevelResult(
        server=name, url=url, concurrency=concurrency, requests=n, completed=len(good),
        failed=n - len(good), wall_s=round(wall, 3), completion_tokens=tokens,
        tokens_per_s=round(tokens / wall, 2) if wall else 0.0,
        ttft_p50_s=_pct(ttfts, 0.5), ttft_p95_s=_pct(ttfts, 0.95),
        itl_p50_s=statistics.median(itls) if itls else None,
        errors=sorted({s.error for s in samples if s.error})[:5], processes=processes)


class Progress:
    def __init__(self, total: int):
        self.total, self.done = total, 0
        self.tty = sys.stderr.isatty()

    def tick(self) -> None:
        self.done += 1
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        line = f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} requests"
        if self.tty or self.done == self.total:
            sys.stderr.write(line + ("\n" if self.done == self.total else ""))
            sys.stderr.flush()


def _model_of(url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def _fmt(v: float | None, scale: float = 1000.0) -> str:
    return "-" if v is None else f"{v * scale:.0f}"


def print_table(results: list[LevelResult], out=sys.stdout) -> None:
    base: dict[str, float] = {}
    for r in results:
        if r.concurrency == min(x.concurrency for x in results if x.server == r.server):
            base.setdefault(r.server, r.tokens_per_s)
    first = results[0].server if results else ""
    compared = len({r.server for r in results}) > 1  # a "vs <first server>" column only then
    by_level = {(r.server, r.concurrency): r for r in results}
    ref_head = f"  vs {first}" if compared else ""
    print(f"{'server':<12}{'conc':>5}{'tok/s':>9}{'ttft p50':>10}{'ttft p95':>10}"
          f"{'itl p50':>9}{'ok':>5}{'fail':>5}{'vs c1':>8}{ref_head}", file=out)
    for r in results:
        vs1 = r.tokens_per_s / base[r.server] if base.get(r.server) else 0
        ref = by_level.get((first, r.concurrency))
        vs_ref = f"{r.tokens_per_s / ref.tokens_per_s:.2f}x" if ref and ref.tokens_per_s else "-"
        print(f"{r.server:<12}{r.concurrency:>5}{r.tokens_per_s:>9.1f}{_fmt(r.ttft_p50_s):>8}ms"
              f"{_fmt(r.ttft_p95_s):>8}ms{_fmt(r.itl_p50_s):>7}ms{r.completed:>5}{r.failed:>5}"
              f"{vs1:>7.2f}x" + (f"{vs_ref:>{len(ref_head)}}" if compared else ""), file=out)
        for e in r.errors:
            print(f"    error: {e}", file=out)


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip() or None
    except OSError:
        commit = None
    cpu, flags = platform.processor(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
            if cpu and flags:
                break
    except OSError:
        pass
    # The instruction sets that pick llama.cpp's kernels: which CPU class ran the figures.
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return {"commit": commit, "machine": {"cpu": cpu, "isa": isa, "cores": os.cpu_count(),
                                          "platform": platform.platform()},
            "llama_cpp_python": llama_cpp_python_version(),
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                      time.gmtime())}


def _processes_arg(value: str) -> int | None:
    """'auto' -> None; N >= 1 -> N; anything else raises ValueError."""
    if str(value).strip().lower() == "auto":
        return None
    n = int(value)
    if n < 1:
        raise ValueError(value)
    return n


def main(args: argparse.Namespace) -> int:
    try:
        levels = [int(x) for x in str(args.concurrent).split(",") if x.strip()]
    except ValueError:
        levels = []
    try:
        processes = _processes_arg(args.processes)
    except ValueError:
        processes = 0
    problem = ("--concurrent needs positive integers, e.g. 1,4" if not levels or min(levels) < 1
               else "--requests must be >= 0" if args.requests < 0
               else "--max-tokens must be >= 1" if args.max_tokens < 1
               else "--processes needs 'auto' or an integer >= 1" if processes == 0
               else "--self-test runs its own server: leave out --compare"
               if args.self_test and args.compare else None)
    if problem:
        print(f"llamafleet bench: {problem}", file=sys.stderr)
        return 2
    prompt = args.prompt_file.read_text() if args.prompt_file else DEFAULT_PROMPT
    stop_noop = None
    if args.self_test:
        from . import noop_server

        # Its workers share the machine with the client's; a quarter of the cores is plenty
        # for a server that only writes pre-rendered chunks.
        port, stop_noop = noop_server.start(max(1, (os.cpu_count() or 1) // 4))
        args.url = f"http://127.0.0.1:{port}"
    try:
        return _run(args, levels, processes, prompt)
    finally:
        if stop_noop is not None:
            stop_noop()


def _run(args: argparse.Namespace, levels: list[int], processes: int | None, prompt: str) -> int:
    # (name, url, client processes at level c)
    if args.self_test:  # the same no-op server, read by one process, then by several
        many = lambda c: max(2, processes_for(c, processes))  # noqa: E731
        servers = [("client-1p", args.url, lambda c: 1), ("client-Np", args.url, many)]
    else:
        servers = [("llamafleet" if not args.compare else "target", args.url,
                    lambda c: processes_for(c, processes))]
        if args.compare:
            servers.append(("compare", args.compare, lambda c: processes_for(c, processes)))
    try:
        models = {url: args.model or _model_of(url, args.api_key) for _, url, _ in servers}
    except httpx.HTTPError as e:
        print(f"llamafleet bench: cannot reach the server: {e}", file=sys.stderr)
        return 1
    counts = {c: args.requests or max(4, 2 * c) for c in levels}
    progress = Progress(sum(counts.values()) * len(servers))
    results: list[LevelResult] = []
    for c in levels:
        for name, url, procs in servers:  # interleaved: every server at this level, then the next
            results.append(run_level(name, url, models[url], prompt, c, counts[c], args,
                                     progress, procs(c)))
    print_table(results)
    if args.self_test:
        for one, many in zip(results[::2], results[1::2], strict=True):
            print(f"client ceiling at {one.concurrency} streams: {one.tokens_per_s:.0f} events/s "
                  f"with 1 process, {many.tokens_per_s:.0f} with {many.processes}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({
            **environment(),
            "settings": {"concurrent": levels, "max_tokens": args.max_tokens,
                         "requests": counts, "prompt": prompt[:200],
                         "ignore_eos": not args.no_ignore_eos, "models": models,
                         "processes": args.processes, "self_test": args.self_test},
            "results": [asdict(r) for r in results]}, indent=2))
    return 0 if all(r.failed == 0 for r in results) else 1
