"""Embeddings per second: llamafleet's /v1/embeddings against llama.cpp's
`llama-server --embeddings` (built by build_llama_server.sh), same GGUF, same pooling,
same threads, each alone on the machine while it is measured.

    .venv/bin/python benchmarks/embeddings.py          # prints a JSON line per server
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx
from compare import HERE, VENV_BIN, free_port, running
from llamafleet.common.contract import SMOLLM2
from llamafleet.inference.model_packages import embedded_model_path

TEXTS = [f"Document {i}: llamas and alpacas graze on the high plains of the Andes, "
         f"and their wool keeps them warm at night." for i in range(64)]


def measure(url: str, batch: int, rounds: int) -> dict:
    model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
    body = {"model": model, "input": TEXTS[:batch]}
    httpx.post(url + "/v1/embeddings", json=body, timeout=600).raise_for_status()  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/embeddings", json=body, timeout=600)
        r.raise_for_status()
        times.append(time.perf_counter() - t0)
        assert len(r.json()["data"]) == batch
    med = statistics.median(times)
    return {"batch": batch, "rounds": rounds, "median_s": round(med, 4),
            "embeddings_per_s": round(batch / med, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--llama-server", type=Path, default=HERE / ".build/bin/llama-server")
    a = ap.parse_args()
    model = embedded_model_path(SMOLLM2.name)
    servers = {"llamafleet": lambda p: [
        str(VENV_BIN / "llamafleet"), "serve", "--model-path", str(model), "--host", "127.0.0.1",
        "--http-port", str(p), "--grpc-port", "0", "--metrics-port", "0", "--threads",
        str(a.threads), "--embeddings-pooling", "mean", "--embeddings-context-size", "2048",
        "--log-level", "warning"]}
    if a.llama_server.exists():
        servers["llama-server"] = lambda p: [
            str(a.llama_server), "-m", str(model), "--host", "127.0.0.1", "--port", str(p),
            "--embeddings", "--pooling", "mean", "-c", "2048", "-b", "2048", "-ub", "2048",
            "-np", "16", "-t", str(a.threads), "-tb", str(a.threads)]
    else:
        print(f"{a.llama_server} not found: run benchmarks/build_llama_server.sh", file=sys.stderr)
    for name, cmd in servers.items():
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with running(cmd(port), url, Path(f"/tmp/embeddings-bench-{name}.log")):
            for b in (int(x) for x in a.batches.split(",")):
                print(json.dumps({"server": name, **measure(url, b, a.rounds)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
