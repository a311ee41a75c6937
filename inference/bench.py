"""`llamafleet bench`: concurrent streaming load against OpenAI-compatible servers.

It measures what users feel: aggregate completion tokens/s, time to first token and
inter-token latency, per concurrency level, and with ``--compare`` the same load against
a second server, interleaved level by level in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
from llamafleet.common.contract import HTTP_PORT

DEFAULT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


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


@dataclass
class Sample:
    ok: bool
    completion_tokens: int = 0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None


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


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = min(len(values) - 1, max(0, round(q * (len(values) - 1))))
    return values[k]


async def _one(client: httpx.AsyncClient, url: str, body: dict, timeout: float) -> Sample:
    t0 = time.perf_counter()
    last = None
    s = Sample(ok=False)
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body,
                                 timeout=timeout) as r:
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return s
            chunks = 0
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
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
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        s.error = f"{type(e).__name__}: {e}"[:200]
    return s


async def run_level(name: str, url: str, model: str, prompt: str, concurrency: int, n: int,
                    args: argparse.Namespace, progress: Progress) -> LevelResult:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": args.max_tokens, "stream": True, "temperature": 0.7,
            "stream_options": {"include_usage": True}}
    if not args.no_ignore_eos:
        body["ignore_eos"] = True
    limits = httpx.Limits(max_connections=concurrency + 2)
    todo = list(range(n))
    samples: list[Sample] = []
    async with httpx.AsyncClient(headers=headers, limits=limits) as client:
        async def worker() -> None:
            while todo:
                i = todo.pop()
                seeded = body if args.seed is None else {**body, "seed": args.seed + i}
                samples.append(await _one(client, url, seeded, args.timeout))
                progress.tick()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
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
        errors=sorted({s.error for s in samples if s.error})[:5])


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
    import os

    from .model import llama_cpp_python_version

    return {"commit": commit, "machine": {"cpu": cpu, "isa": isa, "cores": os.cpu_count(),
                                          "platform": platform.platform()},
            "llama_cpp_python": llama_cpp_python_version(),
            "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                      time.gmtime())}


def main(args: argparse.Namespace) -> int:
    try:
        levels = [int(x) for x in str(args.concurrent).split(",") if x.strip()]
    except ValueError:
        levels = []
    problem = ("--concurrent needs positive integers, e.g. 1,4" if not levels or min(levels) < 1
               else "--requests must be >= 0" if args.requests < 0
               else "--max-tokens must be >= 1" if args.max_tokens < 1 else None)
    if problem:
        print(f"llamafleet bench: {problem}", file=sys.stderr)
        return 2
    prompt = args.prompt_file.read_text() if args.prompt_file else DEFAULT_PROMPT
    servers = [("llamafleet" if not args.compare else "target", args.url)]
    if args.compare:
        servers.append(("compare", args.compare))
    try:
        models = {url: args.model or _model_of(url, args.api_key) for _, url in servers}
    except httpx.HTTPError as e:
        print(f"llamafleet bench: cannot reach the server: {e}", file=sys.stderr)
        return 1
    counts = {c: args.requests or max(4, 2 * c) for c in levels}
    progress = Progress(sum(counts.values()) * len(servers))
    results: list[LevelResult] = []
    for c in levels:
        for name, url in servers:  # interleaved: every server at this level, then the next
            results.append(asyncio.run(run_level(name, url, models[url], prompt, c, counts[c],
                                                 args, progress)))
    print_table(results)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({
            **environment(),
            "settings": {"concurrent": levels, "max_tokens": args.max_tokens,
                         "requests": counts, "prompt": prompt[:200],
                         "ignore_eos": not args.no_ignore_eos, "models": models},
            "results": [asdict(r) for r in results]}, indent=2))
    return 0 if all(r.failed == 0 for r in results) else 1
