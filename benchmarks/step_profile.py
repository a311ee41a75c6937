"""Where a step's time goes, per concurrency level, on a running `llamafleet serve --step-profile`.

For each level it runs `llamafleet bench` at that level alone and reads /info's
``step_profile`` before and after, and records:

* the bench result (tokens/s, TTFT, ITL);
* the mean parts of a pure decode step of exactly that many sequences
  (``decode_steps_by_batch``: batch fill, llama_decode + sync, sampling, text, delivery,
  admission, other Python), in ms per step and in µs per sequence;
* the CPU seconds of the event loop thread (SSE writing) and of the engine thread over the
  level, against its wall time.

    python benchmarks/step_profile.py --url http://127.0.0.1:16070 --concurrent 1,4 \\
        --max-tokens 64 --requests 8 --json benchmarks/results/cpu-step-profile.json

Needs only httpx (and this package), so it runs where `llamafleet bench` runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
from llamafleet.bench import load as bench
from llamafleet.common.contract import HTTP_PORT, env_name


def _profile(url: str) -> dict:
    info = httpx.get(f"{url}/info", timeout=30).json()
    if "step_profile" not in info:
        raise SystemExit(f"{url} runs without --step-profile ({env_name('step_profile')})")
    return info["step_profile"]


def _totals(agg: dict | None) -> tuple[int, dict[str, float]]:
    """(steps, seconds per part) of a summary aggregate."""
    if not agg:
        return 0, {}
    n = agg["steps"]
    return n, {k: v * n / 1e3 for k, v in agg["parts_ms_per_step"].items()}


def _delta(before: dict | None, after: dict | None) -> dict:
    n0, p0 = _totals(before)
    n1, p1 = _totals(after)
    n = n1 - n0
    parts = {k: (v - p0.get(k, 0.0)) / max(n, 1) * 1e3 for k, v in p1.items()}
    return {"steps": n, "ms_per_step": round(sum(parts.values()), 3),
            "parts_ms_per_step": {k: round(v, 3) for k, v in parts.items()}}


def level(url: str, c: int, args: argparse.Namespace) -> dict:
    """One level through ``llamafleet bench`` (streaming, its client processes)."""
    def load() -> tuple[int, dict]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "bench.json"
            bench_args = argparse.ArgumentParser()
            bench.add_arguments(bench_args)
            ns = bench_args.parse_args(["--url", url, "--concurrent", str(c), "--max-tokens",
                                        str(args.max_tokens), "--requests", str(args.requests or 0),
                                        "--processes", args.processes, "--json", str(out)])
            rc = bench.main(ns)
            return rc, json.loads(out.read_text())["results"][0] if out.exists() else {}

    return profiled(url, c, load)


def profiled(url: str, c: int, load) -> dict:
    """The server's step parts and thread CPU while ``load()`` runs (it returns the client's
    exit status and result record)."""
    before = _profile(url)
    t0 = time.monotonic()
    rc, result = load()
    wall = time.monotonic() - t0
    after = _profile(url)
    key = str(c)
    step = _delta(before["decode_steps_by_batch"].get(key), after["decode_steps_by_batch"].get(key))
    step["us_per_sequence"] = {k: round(v * 1e3 / c, 1)
                               for k, v in step["parts_ms_per_step"].items()}
    cpu = {k: round(v - before["thread_cpu_s"].get(k, 0.0), 3)
           for k, v in after["thread_cpu_s"].items()}
    return {"concurrency": c, "bench_rc": rc, "bench": result,
            "decode_steps": step, "all_steps": _delta(before["all_steps"], after["all_steps"]),
            "thread_cpu_s": cpu, "wall_s": round(wall, 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=f"http://127.0.0.1:{HTTP_PORT}")
    p.add_argument("--concurrent", default="1,4")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=0, help="per level (default: bench's)")
    p.add_argument("--processes", default="auto", help="client processes (see bench)")
    p.add_argument("--json", dest="json_out", type=Path)
    args = p.parse_args()
    levels = [int(x) for x in args.concurrent.split(",")]
    info = httpx.get(f"{args.url}/info", timeout=30).json()
    records = [level(args.url, c, args) for c in levels]
    print(f"{'conc':>5}{'tok/s':>9}{'step ms':>9}  " + "".join(f"{k:>9}" for k in
                                                              records[0]["decode_steps"]["parts_ms_per_step"])
          + f"{'loop cpu':>10}{'eng cpu':>9}{'wall':>7}")
    for r in records:
        d = r["decode_steps"]
        print(f"{r['concurrency']:>5}{r['bench'].get('tokens_per_s', 0):>9.1f}{d['ms_per_step']:>9.3f}  "
              + "".join(f"{v:>9.3f}" for v in d["parts_ms_per_step"].values())
              + f"{r['thread_cpu_s'].get('event_loop', 0):>9.2f}s{r['thread_cpu_s'].get('engine', 0):>8.2f}s"
              + f"{r['wall_s']:>6.1f}s")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({
            **bench.environment(), "server": {k: info.get(k) for k in (
                "model", "llama_cpp_python", "context_size", "max_batch_size")},
            "settings": {"concurrent": levels, "max_tokens": args.max_tokens,
                         "requests": args.requests, "processes": args.processes},
            "levels": records}, indent=2))
    return 0 if all(r["bench_rc"] == 0 for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
