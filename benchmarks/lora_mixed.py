"""Mixed-adapter throughput: one `llamafleet serve` with two LoRA adapters, a mixed load of base,
adapter 1 and adapter 2 against the same load on adapter 1 alone (and on the base alone, for
reference), at concurrency 6, side by side in one run (issue 27).

llama.cpp applies adapters to a whole context, so the engine runs one adapter set per decode
step: with three sets in flight at concurrency 6 each step carries about two sequences instead
of six, and every switch of set costs a compute-graph reservation. This measures what that
costs against a single set.

The model is the random llama of benchmarks/make_random_gguf.py (float32, byte vocabulary) and
two random rank-8 adapters for it, written into a temporary folder. The modes run in rounds,
interleaved (alone, mixed, base, alone, mixed, base, ...), so the drift of a shared machine
weighs on each alike; every request is a non-streaming /v1/completions with ignore_eos. Each
mode reports tokens per wall-clock second (the figure asked for), tokens per second of the
server's own CPU time (much steadier on a shared machine) and tokens per decode step.

    .venv/bin/python benchmarks/lora_mixed.py      # writes benchmarks/results/lora-mixed-*.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from compare import VENV_BIN, free_port, running
from llamafleet.bench import load as bench
from llamafleet.common.contract import PodMetric

HERE = Path(__file__).parent
KEY = "lora-mixed-bench"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["The cat sat on", "Hello there, how", "Once upon a time", "1, 2, 3, 4,",
           "Kubernetes pods", "llama.cpp adapters", "A mixed run of", "Six at once"]


def _generator():
    spec = importlib.util.spec_from_file_location("make_random_gguf", HERE / "make_random_gguf.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def run_mode(url: str, models: list[str], requests: int, concurrency: int,
                   max_tokens: int) -> dict:
    """``requests`` completions, ``concurrency`` at a time; request i names ``models[i % n]``."""
    todo = list(range(requests))
    done: list[tuple[str, int, float]] = []  # (model, completion tokens, latency)
    errors: list[str] = []
    async with httpx.AsyncClient(headers=AUTH, timeout=600,
                                 limits=httpx.Limits(max_connections=concurrency + 2)) as client:
        async def worker() -> None:
            while todo:
                i = todo.pop(0)
                model = models[i % len(models)]
                t0 = time.perf_counter()
                r = await client.post(f"{url}/v1/completions", json={
                    "model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                    "ignore_eos": True, "temperature": 0})
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                    continue
                done.append((model, r.json()["usage"]["completion_tokens"],
                             time.perf_counter() - t0))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    tokens = sum(n for _, n, _ in done)
    return {"completed": len(done), "failed": len(errors), "errors": sorted(set(errors))[:3],
            "wall_s": round(wall, 3), "tokens": tokens, "tokens_per_s": round(tokens / wall, 1),
            "latency_p50_s": round(statistics.median(t for *_, t in done), 4) if done else None,
            "requests_by_model": {m: sum(1 for d in done if d[0] == m) for m in models}}


def cpu_seconds(pid: int) -> float:
    """The process's user + system CPU time so far (/proc/PID/stat): the server's own work,
    which other processes on a shared machine disturb far less than the wall clock."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def steps_of(url: str) -> float | None:
    """The pod's decode steps so far (PodMetric.ENGINE_STEPS), if it exports them."""
    text = httpx.get(url + "/metrics", headers=AUTH).text
    for line in text.splitlines():
        if line.startswith(PodMetric.ENGINE_STEPS):
            return float(line.split()[-1])
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ff", type=int, default=768)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--requests", type=int, default=36, help="requests per mode and round")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    # One thread: on a shared 2-core machine a second llama.cpp thread spins at each step's
    # barrier while other processes hold the cores, which swamps what this measures.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--context", type=int, default=256, help="context per sequence")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args()

    a.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    gen = _generator()
    load_start = list(os.getloadavg())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        shape = dict(dim=a.dim, layers=a.layers, ff=a.ff, heads=a.heads, kv_heads=a.heads,
                     context=a.context * a.concurrency, rank=a.rank)
        one = gen.write_lora_set(Path(tmp) / "one", **shape, lora_seed=1)
        two = gen.write_lora_set(Path(tmp) / "two", **shape, lora_seed=2)
        server = stack.enter_context(running([
            str(VENV_BIN / "llamafleet"), "serve", "--model-path", str(one["base"]),
            "--model-name", "base", "--host", "127.0.0.1", "--http-port", str(port),
            "--grpc-port", "0", "--metrics-port", "0", "--api-key", KEY,
            "--context-size", str(a.context), "--max-batch-size", str(a.concurrency),
            "--threads", str(a.threads), "--no-embeddings",
            "--lora", f"one={one['lora']}", "--lora", f"two={two['lora']}",
            "--log-level", "warning"], url, a.out / "lora-mixed-server.log", AUTH))
        modes = {"adapter-alone": ["one"], "mixed": ["base", "one", "two"], "base-alone": ["base"]}
        # Warm-up: every adapter set once (the first graph reservations, page faults).
        asyncio.run(run_mode(url, modes["mixed"], a.concurrency, a.concurrency, 8))
        rounds: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(a.rounds):
            for name, models in modes.items():
                before, cpu = steps_of(url), cpu_seconds(server.pid)
                result = asyncio.run(run_mode(url, models, a.requests, a.concurrency,
                                              a.max_tokens))
                cpu = cpu_seconds(server.pid) - cpu
                after = steps_of(url)
                result["server_cpu_s"] = round(cpu, 3)
                result["tokens_per_cpu_s"] = round(result["tokens"] / cpu, 1) if cpu else None
                if before is not None and after is not None:
                    result["engine_steps"] = after - before
                    result["tokens_per_step"] = round(result["tokens"] / (after - before), 2)
                rounds[name].append(result)
                print(name, json.dumps(result), file=sys.stderr)
    summary = {}
    for name, results in rounds.items():
        rates = [r["tokens_per_s"] for r in results]
        per_cpu = [r["tokens_per_cpu_s"] for r in results if r["tokens_per_cpu_s"]]
        summary[name] = {"tokens_per_s_median": statistics.median(rates),
                         "tokens_per_s_rounds": rates,
                         "tokens_per_cpu_s_median": statistics.median(per_cpu) if per_cpu else None,
                         "tokens_per_step_median": statistics.median(
                             r.get("tokens_per_step") or 0 for r in results),
                         "failed": sum(r["failed"] for r in results)}
    for key in ("tokens_per_s_median", "tokens_per_cpu_s_median"):
        alone = summary["adapter-alone"][key]
        summary[f"mixed_vs_adapter_alone_{key.removesuffix('_median')}"] = round(
            summary["mixed"][key] / alone, 3) if alone else None
        summary[f"base_vs_adapter_alone_{key.removesuffix('_median')}"] = round(
            summary["base-alone"][key] / alone, 3) if alone else None
    record = {"benchmark": "lora_mixed", **bench.environment(),
              # Other work on the machine shows here (2 cores: above 2 means contention).
              "load_average_at_start_and_end": [load_start, list(os.getloadavg())],
              "model": f"random llama (make_random_gguf.py) dim {a.dim}, {a.layers} layers, "
                       f"ff {a.ff}, float32; two random rank-{a.rank} LoRA adapters",
              "settings": {k: v for k, v in vars(a).items() if k != "out"},
              "modes": {k: v for k, v in modes.items()}, "summary": summary, "rounds": rounds}
    path = a.out / f"lora-mixed-{stamp}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(summary, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
