"""High concurrency on the CPU (issue 30): llamafleet against llama-server and llama.cpp's floor.

On the random small-vocabulary llama (benchmarks/make_random_gguf.py: dim 256, 4 layers,
ff 768, the 259-token byte vocabulary), which decodes 64 sequences in milliseconds as a real
model does on a GPU, so that the server's own work around ``llama_decode`` shows:

* side by side, each server alone on the machine while it is measured, interleaved
  ours/theirs level by level: ``llamafleet serve`` (``--max-batch-size LEVEL``,
  ``--context-size 256``) and ``llama-server -np LEVEL -c 256*LEVEL`` (its default KV
  layout: one stream per sequence), both from the same vendored llama.cpp with our patches
  (benchmarks/build_llama_server.sh --patched). Per level: non-streaming ("plain") tokens/s,
  then streaming tokens/s with TTFT p50/p90 (``llamafleet bench``'s client over several
  processes); every request ``ignore_eos`` with a fixed number of tokens;
* ``llama-batched-bench`` from the same build, model and threads at B = each level, its
  default (split) KV layout and ``-kvu``: its decode step is the floor that issue 30's
  acceptance compares our decode step against;
* a ``serve --step-profile`` pass of llamafleet at the same levels (benchmarks/step_profile.py),
  with non-streaming requests (the client then uses next to no CPU beside the server): ms per
  pure decode step by part, and µs per sequence;
* then a table of the ratios and issue 30's acceptance lines with PASS/FAIL.

    .venv/bin/python benchmarks/high_concurrency.py   # -> benchmarks/results/high-concurrency-*.json|md
    .venv/bin/python benchmarks/high_concurrency.py --skip-build --levels 64 --requests 64

While measuring it holds /tmp/llamafleet-bench.lock (other work on this shared machine pauses
while that file exists); it waits for a lock that someone else holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUILD = HERE / ".build"
VENV_BIN = Path(sys.executable).parent

# The model of issue 30: about 4M parameters, byte-level vocabulary of 259 tokens.
MODEL_SHAPE = {"dim": 256, "layers": 4, "ff": 768, "heads": 16, "kv_heads": 4}
LOCK = Path("/tmp/llamafleet-bench.lock")

# Issue 30's acceptance at c64, against llama-server -np 64 (its default KV layout) and
# llama-batched-bench B=64 (its default KV layout), same build, model and threads.
ACCEPT_LEVEL = 64
ACCEPT_PLAIN = 1.0          # llamafleet / llama-server, non-streaming tokens/s, at least
ACCEPT_STREAM = 1.3         # llamafleet / llama-server, streaming tokens/s, at least
ACCEPT_STEP = 1.2           # our decode step / batched-bench's decode step, at most
ACCEPT_HOST_US = 30.0       # host work outside llama_decode, µs per sequence per step, at most
NOISY = 0.05                # others' share of the CPU above which a figure is flagged


# --- pure helpers (tests/bench/test_high_concurrency.py) ------------------------------

def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (as ``llamafleet bench`` computes its p50/p95)."""
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def parse_batched_bench(output: str, kv_unified: bool) -> list[dict]:
    """llama-batched-bench's ``--output-format jsonl`` lines, each with its decode step:
    ``step_ms`` = t_tg / tg (every step decodes one token of each of the ``pl`` sequences)."""
    rows = []
    for line in output.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        r = json.loads(line)
        rows.append({"kv_unified": kv_unified, "batch": r["pl"], "pp": r["pp"], "tg": r["tg"],
                     "step_ms": round(r["t_tg"] / r["tg"] * 1e3, 4),
                     "decode_tok_s": round(r["speed_tg"], 1), "prefill_tok_s": round(r["speed_pp"], 1),
                     "raw": r})
    return rows


def host_us_per_sequence(us_per_sequence: dict[str, float]) -> float | None:
    """Host work outside llama_decode: every step part but ``decode``, µs per sequence."""
    if not us_per_sequence:
        return None
    return round(sum(v for k, v in us_per_sequence.items() if k != "decode"), 1)


def stream_ceiling(record: dict, c: int, floor_step_ms: float | None,
                   streams: list[dict | None]) -> dict:
    """What streaming can reach on this machine when the client shares its cores: the
    decode floor's CPU per token (llama-batched-bench's step x threads / c) plus the
    client's own CPU per streamed token (the mean over both servers' runs), on all cores.
    No server reaches it (its own HTTP and host work come on top); a line above it is out
    of reach here, whatever the server does."""
    per_token = [r["client_cpu_s"] * 1e6 / r["completion_tokens"] for r in streams
                 if r and r.get("client_cpu_s") is not None and r.get("completion_tokens")]
    client_us = round(sum(per_token) / len(per_token), 1) if per_token else None
    threads = record.get("settings", {}).get("threads")
    cores = record.get("machine", {}).get("cores")
    if client_us is None or floor_step_ms is None or not threads or not cores:
        return {"stream_client_us_per_token": client_us, "stream_ceiling_tok_s": None}
    floor_us = floor_step_ms * 1e3 * threads / c
    return {"stream_client_us_per_token": client_us,
            "stream_ceiling_tok_s": round(cores * 1e6 / (floor_us + client_us), 1)}


def evaluate(record: dict) -> dict:
    """Per level: the ratios; at ACCEPT_LEVEL: issue 30's acceptance lines, each PASS only
    when its figure exists and meets the bound (a missing figure FAILs)."""
    by = {(r["server"], r["mode"], r["concurrency"]): r for r in record.get("side_by_side", [])}
    floor = {(r["kv_unified"], r["batch"]): r["step_ms"] for r in record.get("batched_bench", [])}
    prof = {p["concurrency"]: p for p in record.get("step_profile", [])}
    levels = sorted({c for _, _, c in by} | set(prof))
    rows = []
    for c in levels:
        def tok(server: str, mode: str, c: int = c) -> float | None:
            r = by.get((server, mode, c))
            return r["tokens_per_s"] if r else None

        def ttft(server: str, key: str, c: int = c) -> float | None:
            r = by.get((server, "stream", c))
            return r.get(key) if r else None

        p = prof.get(c, {})
        step = p.get("decode_steps", {})
        parts = step.get("parts_ms_per_step", {})
        step_ms = step.get("ms_per_step") if step.get("steps") else None
        decode_ms = parts.get("decode") if step_ms is not None else None
        rows.append({
            "concurrency": c,
            "plain_tok_s": {"llamafleet": tok("llamafleet", "plain"),
                            "llama_server": tok("llama-server", "plain")},
            "stream_tok_s": {"llamafleet": tok("llamafleet", "stream"),
                             "llama_server": tok("llama-server", "stream")},
            "plain_ratio": ratio(tok("llamafleet", "plain"), tok("llama-server", "plain")),
            "stream_ratio": ratio(tok("llamafleet", "stream"), tok("llama-server", "stream")),
            "ttft_s": {s: {"p50": ttft(s, "ttft_p50_s"), "p90": ttft(s, "ttft_p90_s")}
                       for s in ("llamafleet", "llama-server")},
            "step_ms": step_ms, "decode_ms": decode_ms, "pure_decode_steps": step.get("steps", 0),
            "batched_bench_step_ms": floor.get((False, c)),
            "batched_bench_unified_step_ms": floor.get((True, c)),
            "step_vs_batched_bench": ratio(step_ms, floor.get((False, c))),
            "decode_vs_batched_bench": ratio(decode_ms, floor.get((False, c))),
            "host_us_per_sequence": host_us_per_sequence(step.get("us_per_sequence", {}))
            if step_ms is not None else None,
            "us_per_sequence": step.get("us_per_sequence", {}) if step_ms is not None else {},
            **stream_ceiling(record, c, floor.get((False, c)),
                             [by.get((s, "stream", c)) for s in ("llamafleet", "llama-server")]),
        })
    at = {r["concurrency"]: r for r in rows}.get(ACCEPT_LEVEL, {})

    def line(text: str, value: float | None, ok: bool) -> dict:
        return {"line": text, "value": value, "ok": value is not None and ok}

    c = ACCEPT_LEVEL
    plain, stream = at.get("plain_ratio"), at.get("stream_ratio")
    step, host = at.get("step_vs_batched_bench"), at.get("host_us_per_sequence")
    acceptance = [
        line(f"c{c} plain tok/s >= {ACCEPT_PLAIN}x llama-server -np {c}", plain,
             plain is not None and plain >= ACCEPT_PLAIN),
        line(f"c{c} streaming tok/s >= {ACCEPT_STREAM}x llama-server -np {c}", stream,
             stream is not None and stream >= ACCEPT_STREAM),
        line(f"decode step at {c} sequences <= {ACCEPT_STEP}x llama-batched-bench B={c}", step,
             step is not None and step <= ACCEPT_STEP),
        line(f"host work outside llama_decode <= {ACCEPT_HOST_US:g} µs per sequence per step "
             f"(at {c})", host, host is not None and host <= ACCEPT_HOST_US),
    ]
    return {"levels": rows, "acceptance": acceptance}


def _f(v: float | None, fmt: str = ".0f", scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, fmt)


def markdown(record: dict, summary: dict) -> str:
    s = record["settings"]
    m = record["machine"]
    out = [f"# High concurrency on the CPU ({record['time']}, commit "
           f"{(record.get('commit') or '?')[:10]}{' + changes' if record.get('dirty') else ''})", "",
           f"Machine: {m['cpu']}, {m['cores']} cores. Model: random llama {s['model_shape']} "
           f"({s['n_vocab']}-token vocabulary). {s['max_tokens']} tokens per request (ignore_eos), "
           f"{s['context_per_sequence']} tokens of context per sequence, {s['threads']} threads, "
           f"requests per level and mode {s['requests']}, streaming client processes "
           f"{s['processes']}. llama-server `-np LEVEL -c {s['context_per_sequence']}*LEVEL` "
           "(its default KV layout), same patched llama.cpp build.", "",
           "| conc | plain tok/s ours / theirs | ratio | streaming tok/s ours / theirs | ratio "
           "| TTFT p50 ms ours / theirs | TTFT p90 ms ours / theirs |",
           "|---|---|---|---|---|---|---|"]
    for r in summary["levels"]:
        t = r["ttft_s"]
        out.append(
            f"| {r['concurrency']} | {_f(r['plain_tok_s']['llamafleet'])} / "
            f"{_f(r['plain_tok_s']['llama_server'])} | {_f(r['plain_ratio'], '.2f')} | "
            f"{_f(r['stream_tok_s']['llamafleet'])} / {_f(r['stream_tok_s']['llama_server'])} | "
            f"{_f(r['stream_ratio'], '.2f')} | {_f(t['llamafleet']['p50'], '.0f', 1e3)} / "
            f"{_f(t['llama-server']['p50'], '.0f', 1e3)} | {_f(t['llamafleet']['p90'], '.0f', 1e3)} / "
            f"{_f(t['llama-server']['p90'], '.0f', 1e3)} |")
    parts = next((list(r["us_per_sequence"]) for r in summary["levels"] if r["us_per_sequence"]), [])
    out += ["", "Decode step (llamafleet `--step-profile`, pure decode steps of exactly LEVEL "
            "sequences) against `llama-batched-bench` (same build, model, threads):", "",
            "| conc | our step ms | llama_decode ms | batched-bench step ms split / unified "
            "| step / batched-bench | decode / batched-bench | host µs/seq/step | "
            + " | ".join(f"{p} µs/seq" for p in parts) + " |",
            "|---" * (8 + len(parts)) + "|"]
    for r in summary["levels"]:
        out.append(
            f"| {r['concurrency']} | {_f(r['step_ms'], '.2f')} | {_f(r['decode_ms'], '.2f')} | "
            f"{_f(r['batched_bench_step_ms'], '.2f')} / {_f(r['batched_bench_unified_step_ms'], '.2f')} | "
            f"{_f(r['step_vs_batched_bench'], '.2f')} | {_f(r['decode_vs_batched_bench'], '.2f')} | "
            f"{_f(r['host_us_per_sequence'], '.1f')} | "
            + " | ".join(_f(r["us_per_sequence"].get(p), ".1f") for p in parts) + " |")
    out += ["", "Acceptance (issue 30, CPU):", ""]
    out += [f"- **{'PASS' if a['ok'] else 'FAIL'}** {a['line']}: {_f(a['value'], '.2f')}"
            for a in summary["acceptance"]]
    for r in summary["levels"]:
        ceiling, theirs = r.get("stream_ceiling_tok_s"), r["stream_tok_s"]["llama_server"]
        if ceiling is not None and theirs:
            out.append(f"- c{r['concurrency']} streaming ceiling on this machine: {ceiling:.0f} "
                       f"tok/s = {ceiling / theirs:.2f}x llama-server's streaming figure (the "
                       f"decode floor's CPU plus the client's {r['stream_client_us_per_token']:.0f} "
                       "µs per streamed token, on all cores; no server reaches it)")
    failed = [f"{r['server']} {r['mode']} c{r['concurrency']}: {r['failed']} failed, "
              f"{r['short']} short" for r in record["side_by_side"] if r["failed"] or r["short"]]
    if failed:
        out += ["", "Incomplete: " + "; ".join(failed)]
    noisy = [f"{r['server']} {r['mode']} c{r['concurrency']} {r['others_cpu_share']:.0%}"
             for r in record["side_by_side"] if (r.get("others_cpu_share") or 0) > NOISY]
    noisy += [f"step profile c{p['concurrency']} {p['others_cpu_share']:.0%}"
              for p in record.get("step_profile", []) if (p.get("others_cpu_share") or 0) > NOISY]
    out += ["", f"Others' CPU while measuring (share of all cores; above {NOISY:.0%} the figure is "
            "suspect): " + ("; ".join(noisy) if noisy else "none above it")]
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in record["run_s"].items() if k != "total")
    out += ["", f"Run: {record['run_s']['total']:.0f} s measuring ({phases})."]
    return "\n".join(out) + "\n"


# --- measuring -----------------------------------------------------------------------------

@dataclass
class Figures:
    server: str
    mode: str  # "plain" (non-streaming) or "stream"
    concurrency: int
    requests: int
    completed: int
    failed: int
    short: int  # completed with fewer completion tokens than asked
    wall_s: float
    completion_tokens: int
    tokens_per_s: float
    ttft_p50_s: float | None  # streaming: first token; plain: whole response
    ttft_p90_s: float | None
    latency_p50_s: float | None = None  # plain only: whole response
    latency_p90_s: float | None = None
    itl_p50_s: float | None = None
    processes: int = 1
    errors: list[str] = field(default_factory=list)
    others_cpu_share: float | None = None  # CPU others used meanwhile, share of all cores
    client_cpu_s: float | None = None  # the client's own CPU (this process and its client processes)


def figures(server: str, mode: str, c: int, samples: list, wall: float, max_tokens: int,
            processes: int) -> Figures:
    good = [s for s in samples if s.ok]
    tokens = sum(s.completion_tokens for s in good)
    first = [s.ttft_s for s in good if s.ttft_s is not None]
    itls = sorted(x for s in good for x in s.itl_s)
    plain = mode == "plain"
    return Figures(
        server=server, mode=mode, concurrency=c, requests=len(samples), completed=len(good),
        failed=len(samples) - len(good), short=sum(s.completion_tokens < max_tokens for s in good),
        wall_s=round(wall, 3), completion_tokens=tokens,
        tokens_per_s=round(tokens / wall, 1) if wall else 0.0,
        ttft_p50_s=None if plain else percentile(first, 0.5),
        ttft_p90_s=None if plain else percentile(first, 0.9),
        latency_p50_s=percentile(first, 0.5) if plain else None,
        latency_p90_s=percentile(first, 0.9) if plain else None,
        itl_p50_s=percentile(itls, 0.5), processes=processes,
        errors=sorted({s.error for s in samples if s.error})[:5])


def _body(model: str, max_tokens: int, stream: bool) -> dict:
    """``llamafleet bench``'s request (its prompt, temperature, ignore_eos), streaming or not."""
    from llamafleet.bench import load as bench

    body = bench._body(model, bench.DEFAULT_PROMPT, argparse.Namespace(
        max_tokens=max_tokens, no_ignore_eos=False))
    if not stream:
        body["stream"] = False
        body.pop("stream_options", None)
    return body


async def _plain(url: str, body: dict, concurrency: int, n: int, timeout: float) -> tuple[list, float]:
    """Non-streaming requests over ``concurrency`` connections (one client process: a whole
    answer is one JSON body, so the client's cost per token is nil)."""
    import httpx
    from llamafleet.bench.load import Sample

    todo = list(range(n))
    samples: list[Sample] = []
    # A new connection per request: reusing one that the server's keep-alive timer is closing
    # fails the request (ReadError) without the server being at fault.
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits) as client:
        async def one() -> Sample:
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{url}/v1/chat/completions", json=body, timeout=timeout)
                if r.status_code != 200:
                    return Sample(ok=False, error=f"HTTP {r.status_code}: {r.text[:200]!r}")
                usage = r.json().get("usage") or {}
                return Sample(ok=True, completion_tokens=usage.get("completion_tokens", 0),
                              ttft_s=time.perf_counter() - t0)
            except (httpx.HTTPError, ValueError) as e:
                return Sample(ok=False, error=f"{type(e).__name__}: {e}"[:200])

        async def worker() -> None:
            while todo:
                todo.pop()
                samples.append(await one())

        t0 = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return samples, time.monotonic() - t0


class CpuWatch:
    """CPU that others used while we measured: the machine's busy time (/proc/stat) less this
    process's and its reaped children's (servers, client processes, llama-batched-bench), as
    a share of all cores over the window. Our own servers are reaped when they stop, so read
    it after a segment's server is gone; the live server's share shows up as others' until
    then (``stop`` takes the server's CPU seconds for that)."""

    @staticmethod
    def _busy() -> float:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return (sum(f) - f[3] - (f[4] if len(f) > 4 else 0)) / os.sysconf("SC_CLK_TCK")

    def __init__(self) -> None:
        self.t0, self.busy0, self.ours0 = time.monotonic(), self._busy(), own_cpu_s()

    def others_share(self, live_cpu_s: float = 0.0) -> float:
        wall = max(time.monotonic() - self.t0, 1e-9)
        others = (self._busy() - self.busy0) - (own_cpu_s() - self.ours0) - live_cpu_s
        return round(max(0.0, others) / (wall * (os.cpu_count() or 1)), 3)


def wait_quiet(limit_s: float, waits: list[float]) -> None:
    """Before a segment: wait (up to ``limit_s``) until others use under NOISY of the CPU over
    one second, e.g. a test that started before the lock finishing; the wait goes in ``waits``."""
    t0 = time.monotonic()
    while True:
        watch = CpuWatch()
        time.sleep(1.0)
        share = watch.others_share()
        if share <= NOISY or time.monotonic() - t0 > limit_s:
            break
        if time.monotonic() - t0 < 1.5:
            print(f"  others use {share:.0%} of the CPU: waiting (up to {limit_s:.0f} s)", flush=True)
    waits.append(round(time.monotonic() - t0, 1))


def own_cpu_s() -> float:
    """CPU seconds of this process and its reaped children. Over a segment: the client's (in
    this process, or its client processes, reaped when they end; the server is still alive,
    so it is not among them)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def process_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a live process and its threads."""
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def measure(server: str, url: str, model: str, c: int, n: int, a: argparse.Namespace,
            pid: int) -> list[Figures]:
    """One level on one server (process ``pid``): plain, then streaming through
    ``llamafleet bench``'s client; each with the CPU share others used meanwhile."""
    from llamafleet.bench import load as bench

    watch, cpu0, client0 = CpuWatch(), process_cpu_s(pid), own_cpu_s()
    samples, wall = asyncio.run(_plain(url, _body(model, a.max_tokens, False), c, n, 600))
    out = [figures(server, "plain", c, samples, wall, a.max_tokens, 1)]
    out[-1].others_cpu_share = watch.others_share(process_cpu_s(pid) - cpu0)
    out[-1].client_cpu_s = round(own_cpu_s() - client0, 3)
    watch, cpu0, client0 = CpuWatch(), process_cpu_s(pid), own_cpu_s()
    ns = argparse.Namespace(max_tokens=a.max_tokens, no_ignore_eos=False, seed=None, timeout=600,
                            api_key=None)
    body, progress = _body(model, a.max_tokens, True), bench.Progress(n)
    procs = max(1, min(a.processes, c))
    if procs == 1:
        samples, wall = asyncio.run(bench._in_process(url, body, {}, c, n, ns, progress))
    else:
        samples, wall = bench._spread(procs, url, body, {}, c, n, ns, progress)
    out.append(figures(server, "stream", c, samples, wall, a.max_tokens, procs))
    out[-1].others_cpu_share = watch.others_share(process_cpu_s(pid) - cpu0)
    out[-1].client_cpu_s = round(own_cpu_s() - client0, 3)
    for f in out:
        print(f"  {server:<13}{f.mode:<7}c{c:<4}{f.tokens_per_s:>9.1f} tok/s  "
              f"{f.completed}/{f.requests} ok, {f.short} short, others' CPU "
              f"{f.others_cpu_share:.0%}"
              + (f"  TTFT p50 {_f(f.ttft_p50_s, '.0f', 1e3)} ms p90 {_f(f.ttft_p90_s, '.0f', 1e3)} ms"
                 if f.mode == "stream" else "")
              + "".join(f"\n    error: {e}" for e in f.errors), flush=True)
    return out


def warm_up(url: str, model: str) -> dict:
    """One unmeasured request (graph allocation, page faults); returns its usage."""
    import httpx

    r = httpx.post(f"{url}/v1/chat/completions", timeout=600, json=_body(model, 8, False))
    r.raise_for_status()
    return r.json().get("usage") or {}


def llamafleet_cmd(model: Path, port: int, level: int, a: argparse.Namespace, *extra: str) -> list[str]:
    return [str(VENV_BIN / "llamafleet"), "serve", "--model-path", str(model), "--host", "127.0.0.1",
            "--http-port", str(port), "--grpc-port", "0", "--metrics-port", "0",
            "--context-size", str(a.context), "--max-batch-size", str(level),
            "--queue-size", "1024", "--threads", str(a.threads), "--log-level", "warning", *extra]


def llama_server_cmd(binary: Path, model: Path, port: int, level: int, a: argparse.Namespace) -> list[str]:
    return [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(level), "-c", str(a.context * level), "-t", str(a.threads),
            "-tb", str(a.threads), "--no-webui"]


def log_value(log: Path, key: str) -> str | None:
    """The first ``key`` line of a llama.cpp log (e.g. ``kv_unified``, ``system_info``)."""
    try:
        for line in log.read_text(errors="replace").splitlines():
            if key in line:
                return line.split(key, 1)[1].strip(" =:'")
    except OSError:
        pass
    return None


def cmake_options(build: Path) -> dict[str, str]:
    """The options of the llama-server / llama-batched-bench build that pick its kernels."""
    keep = ("CMAKE_BUILD_TYPE", "BUILD_SHARED_LIBS", "GGML_NATIVE", "GGML_AVX2", "GGML_AVX512",
            "GGML_OPENMP", "CMAKE_C_FLAGS", "CMAKE_CXX_FLAGS")
    out = {}
    try:
        for line in (build / "CMakeCache.txt").read_text().splitlines():
            name, _, value = line.partition("=")
            if name.split(":")[0] in keep:
                out[name.split(":")[0]] = value
    except OSError:
        pass
    return out


def python_system_info() -> str | None:
    """llama.cpp's system_info as llamafleet's llama-cpp-python build reports it (the CPU
    features its kernels use: compare with llama-server's)."""
    out = subprocess.run([sys.executable, "-c", "import llama_cpp; "
                          "print(llama_cpp.llama_print_system_info().decode().strip())"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or None


def batched_bench(binary: Path, model: Path, levels: list[int], pp: int, a: argparse.Namespace,
                  logs: Path) -> list[dict]:
    rows = []
    for unified in (False, True):
        flag = "--kv-unified" if unified else "--no-kv-unified"
        cmd = [str(binary), "-m", str(model), "-c", str(max(levels) * a.context), "-b", "2048",
               "-ub", "512", "-npp", str(pp), "-ntg", str(a.max_tokens),
               "-npl", ",".join(map(str, levels)), "-t", str(a.threads), "-tb", str(a.threads),
               flag, "--output-format", "jsonl"]
        watch = CpuWatch()
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        others = watch.others_share()
        (logs / f"batched-bench{'-kvu' if unified else ''}.log").write_text(out.stdout + out.stderr)
        if out.returncode != 0:
            raise RuntimeError(f"llama-batched-bench failed ({out.returncode}): {out.stderr[-2000:]}")
        got = parse_batched_bench(out.stdout + "\n" + out.stderr, unified)
        for r in got:
            r["command"] = " ".join([binary.name, *cmd[1:]])
            r["others_cpu_share"] = others  # over the whole run of this layout
            print(f"  batched-bench {'unified' if unified else 'split':<8}B={r['batch']:<4}"
                  f"{r['step_ms']:>8.2f} ms per step, {r['decode_tok_s']:>9.1f} tok/s", flush=True)
        rows += got
    return rows


def ensure_model(path: Path) -> Path:
    if not path.exists():
        sys.path.insert(0, str(HERE))
        import make_random_gguf

        path.parent.mkdir(parents=True, exist_ok=True)
        make_random_gguf.write(path, MODEL_SHAPE["dim"], MODEL_SHAPE["layers"], MODEL_SHAPE["ff"],
                               MODEL_SHAPE["heads"], MODEL_SHAPE["kv_heads"], context=4096)
    return path


class Lock:
    """/tmp/llamafleet-bench.lock while measuring: waits for another holder, removes only its
    own, and puts it back (counted in ``restored``) if someone else's clean-up removes it."""

    def __init__(self, path: Path):
        self.path, self.held, self.restored = path, False, 0
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None

    def _mark(self) -> None:
        self.path.write_text(f"{os.getpid()} benchmarks/high_concurrency.py\n")

    def _keep(self) -> None:
        while not self._stop.wait(1.0):
            if not self.path.exists():
                self._mark()
                self.restored += 1
                print(f"  {self.path} was removed by someone else: put back", flush=True)

    def __enter__(self) -> Lock:
        waited = False
        while self.path.exists():
            if not waited:
                print(f"waiting for {self.path} (another benchmark is measuring)", flush=True)
                waited = True
            time.sleep(10)
        self._mark()
        self.held = True
        self._watch = threading.Thread(target=self._keep, daemon=True)
        self._watch.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.join()
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def run(a: argparse.Namespace) -> int:
    sys.path.insert(0, str(HERE))
    import httpx
    import step_profile
    from compare import free_port, running
    from llamafleet.bench import load as bench

    levels = a.levels
    server_bin = BUILD / "bin" / "llama-server-patched"
    bb_bin = BUILD / "bin" / "llama-batched-bench-patched"
    if not a.skip_build:
        t0 = time.monotonic()
        print("building llama-server and llama-batched-bench (--patched) ...", flush=True)
        subprocess.run(["bash", str(HERE / "build_llama_server.sh"), "--patched"], check=True,
                       stdout=subprocess.DEVNULL)
        print(f"  built in {time.monotonic() - t0:.0f} s", flush=True)
    for b in (server_bin, bb_bin):
        if not b.exists():
            print(f"{b} not found: run benchmarks/build_llama_server.sh --patched", file=sys.stderr)
            return 2
    model = ensure_model(BUILD / "random-d{dim}-l{layers}-ff{ff}.gguf".format(**MODEL_SHAPE))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = BUILD / f"logs-high-concurrency-{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    requests = {c: a.requests or 2 * c for c in levels}
    env = bench.environment()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True, check=False).stdout.strip() != ""
    record: dict[str, Any] = {
        **env, "dirty": dirty, "model": {"file": model.name, **MODEL_SHAPE},
        "settings": {"levels": levels, "max_tokens": a.max_tokens, "requests": requests,
                     "threads": a.threads, "context_per_sequence": a.context,
                     "processes": a.processes, "ignore_eos": True, "model_shape": MODEL_SHAPE,
                     "n_vocab": 259, "prompt": bench.DEFAULT_PROMPT,
                     "llamafleet": " ".join(llamafleet_cmd(model, 0, 0, a)[1:]).replace(
                         "--http-port 0", "--http-port PORT").replace(
                         "--max-batch-size 0", "--max-batch-size LEVEL"),
                     "llama_server": " ".join([server_bin.name] + llama_server_cmd(
                         server_bin, model, 0, 0, a)[1:]).replace("--port 0", "--port PORT").replace(
                         "-np 0", "-np LEVEL").replace("-c 0", f"-c {a.context}*LEVEL")},
        "side_by_side": [], "step_profile": [], "batched_bench": [], "servers": {},
        "system_info": {"llamafleet": python_system_info(),
                        "llama_server_build": cmake_options(BUILD / "build-patched")}}
    run_s: dict[str, float] = {}
    waits: list[float] = []
    with Lock(a.lock) as lock:
        t_all = time.monotonic()
        # Others' work on this shared machine shows here (1-minute load, before and after).
        record["load_avg_1m"] = {"before": round(os.getloadavg()[0], 2)}
        t0 = time.monotonic()
        prompt_tokens = None
        for c in levels:
            for name in ("llamafleet", "llama-server"):
                wait_quiet(a.quiet_wait, waits)
                port = free_port()
                url = f"http://127.0.0.1:{port}"
                cmd = (llamafleet_cmd(model, port, c, a) if name == "llamafleet"
                       else llama_server_cmd(server_bin, model, port, c, a))
                log = logs / f"{name}-c{c}.log"
                with running(cmd, url, log) as proc:
                    model_id = httpx.get(url + "/v1/models").json()["data"][0]["id"]
                    usage = warm_up(url, model_id)
                    if name == "llamafleet":
                        info = httpx.get(url + "/info").json()
                        prompt_tokens = prompt_tokens or usage.get("prompt_tokens")
                        record["servers"].setdefault(name, {})[str(c)] = {
                            k: info.get(k) for k in ("max_batch_size", "context_size",
                                                     "llama_cpp_python")}
                        if info.get("max_batch_size") != c:
                            print(f"  warning: llamafleet runs max_batch_size "
                                  f"{info.get('max_batch_size')}, not {c}", flush=True)
                    record["servers"].setdefault(name, {}).setdefault(str(c), {})[
                        "prompt_tokens"] = usage.get("prompt_tokens")
                    for f in measure(name, url, model_id, c, requests[c], a, proc.pid):
                        record["side_by_side"].append(f.__dict__)
                if name == "llama-server":
                    record["servers"][name][str(c)]["kv_unified"] = log_value(log, "kv_unified")
        run_s["side_by_side"] = time.monotonic() - t0

        t0 = time.monotonic()
        for c in levels:
            wait_quiet(a.quiet_wait, waits)
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            with running(llamafleet_cmd(model, port, c, a, "--step-profile"), url,
                         logs / f"llamafleet-step-profile-c{c}.log") as proc:
                ours = httpx.get(url + "/v1/models").json()["data"][0]["id"]
                warm_up(url, ours)
                watch, cpu0 = CpuWatch(), process_cpu_s(proc.pid)
                # Non-streaming: the client and the server's event loop then cost next to
                # nothing per token, so the steps are the engine's own (a streaming client's
                # processes share these 2 cores with llama_decode's threads).
                body = _body(ours, a.max_tokens, False)
                def load(url=url, body=body, c=c) -> tuple[int, dict]:
                    samples, _ = asyncio.run(_plain(url, body, c, requests[c], 600))
                    return 0, {"requests": len(samples), "ok": sum(x.ok for x in samples)}

                lv = step_profile.profiled(url, c, load)
                lv["others_cpu_share"] = watch.others_share(process_cpu_s(proc.pid) - cpu0)
                record["step_profile"].append(lv)
                d = lv["decode_steps"]
                print(f"  step profile c{c}: {d['steps']} pure decode steps, {d['ms_per_step']:.2f} ms "
                      f"per step, decode {d['parts_ms_per_step'].get('decode', 0):.2f} ms, host "
                      f"{host_us_per_sequence(d['us_per_sequence'])} µs/seq", flush=True)
        run_s["step_profile"] = time.monotonic() - t0

        t0 = time.monotonic()
        # Prompt + completion must fit a sequence's context in batched-bench's split layout.
        pp = min(prompt_tokens or 128, a.context - a.max_tokens)
        record["settings"]["batched_bench_pp"] = pp
        wait_quiet(a.quiet_wait, waits)
        record["batched_bench"] = batched_bench(bb_bin, model, levels, pp, a, logs)
        run_s["batched_bench"] = time.monotonic() - t0
        record["load_avg_1m"]["after"] = round(os.getloadavg()[0], 2)
        run_s["total"] = time.monotonic() - t_all
        record["lock_restored"] = lock.restored
        record["quiet_waits_s"] = waits
    record["run_s"] = {k: round(v, 1) for k, v in run_s.items()}
    record["logs"] = str(logs.relative_to(ROOT))
    summary = evaluate(record)
    record["summary"] = summary
    out = a.json or HERE / "results" / f"high-concurrency-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    md = markdown(record, summary)
    out.with_suffix(".md").write_text(md)
    print("\n" + md)
    print(f"wrote {out} and {out.with_suffix('.md')}")
    incomplete = any(r["failed"] for r in record["side_by_side"])
    return 1 if incomplete else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[16, 64, 128],
                   help="concurrency levels = max_batch_size = llama-server -np (default: 16,64,128)")
    p.add_argument("--max-tokens", type=int, default=96, help="completion tokens per request")
    p.add_argument("--requests", type=int, default=128,
                   help="requests per level, server and mode; 0: 2 x level (default: %(default)s: "
                   "8 rounds of streams at c16, 2 at c64, 1 at c128, which keeps a run of today's "
                   "engine under 10 minutes on 2 cores)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--context", type=int, default=256, help="context per sequence")
    p.add_argument("--processes", type=int, default=2, help="client processes for streaming")
    p.add_argument("--skip-build", action="store_true",
                   help="use the llama-server and llama-batched-bench already built")
    p.add_argument("--json", type=Path, help="record path (default: "
                   "benchmarks/results/high-concurrency-<time>.json, with a .md beside it)")
    p.add_argument("--lock", type=Path, default=LOCK, help="held while measuring")
    p.add_argument("--quiet-wait", type=float, default=120,
                   help="before each server: wait up to this many seconds for others' CPU use "
                   f"to fall under {round(NOISY * 100)}%% (default: %(default)s)")
    a = p.parse_args(argv)
    if a.max_tokens >= a.context:
        p.error("--max-tokens must leave room for the prompt in --context")
    # SIGTERM runs the finally clauses too: servers stopped, lock removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.chdir(ROOT)
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
