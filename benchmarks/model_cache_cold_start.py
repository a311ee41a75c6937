"""Cold start from zero with a cold model cache vs a warm one (issue 27), on one machine.

A local HTTP server serves an embedded model's GGUF (Gemma 3 270M by default, from its PyPI
package) as a model URL would be; local processes stand in for the pods:

- cold cache: `llamafleet fetch --url --sha256 --out CACHE/<sha256>.gguf` (what the cache's
  Job runs, and what each pod's init container runs without the cache), then `llamafleet
  serve --model-path` that file, timed from the start of the fetch to the first 200 of /ready;
- warm cache: the file is already in the cache (the Job completed before): only `llamafleet
  serve`, timed from its start to /ready. Scaling out, or from zero, is this case.

Each case runs --runs times, alternating, with a fresh cache directory for each cold run;
cold_fetch_s and cold_serve_s are the cold start's two parts. The machine's load average
goes in the record: `llamafleet serve`'s start-up (model load, self-test) varies with it.
--rate-mib-s caps the server's sending rate (a model server farther away than loopback);
0 is loopback as fast as it goes. Kubernetes' own share (scheduling the Job and the pods,
pulling images, attaching the volume) is not in these figures.

    .venv/bin/python benchmarks/model_cache_cold_start.py --rate-mib-s 0,50
    # writes benchmarks/results/model-cache-cold-start-*.json
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from compare import VENV_BIN, free_port
from llamafleet.common.contract import EMBEDDED_MODELS, GEMMA, cache_file_name
from llamafleet.inference.model_packages import embedded_model_path, sha256_of

HERE = Path(__file__).parent


def serve_file(path: Path, rate_mib_s: float) -> tuple[http.server.ThreadingHTTPServer, str]:
    """An HTTP server for ``path`` at ``rate_mib_s`` (0: unthrottled)."""
    data_len = path.stat().st_size

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(data_len))
            self.end_headers()
            chunk = 1 << 20
            t0 = time.perf_counter()
            sent = 0
            with path.open("rb") as f:
                while (block := f.read(chunk)):
                    self.wfile.write(block)
                    sent += len(block)
                    if rate_mib_s > 0:  # pace to the rate: sleep until this much is due
                        due = t0 + sent / (rate_mib_s * 2**20)
                        if (wait := due - time.perf_counter()) > 0:
                            time.sleep(wait)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}/{path.name}"


def start_to_ready(model: Path, threads: int, log: Path) -> float:
    """Seconds from starting `llamafleet serve` to its first /ready 200 (then stopped)."""
    port = free_port()
    cmd = [str(VENV_BIN / "llamafleet"), "serve", "--model-path", str(model), "--host",
           "127.0.0.1", "--http-port", str(port), "--grpc-port", "0", "--metrics-port", "0",
           "--threads", str(threads)]
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"llamafleet serve exited with {proc.returncode}; see {log}")
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                        return time.perf_counter() - t0
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - t0 > 300:
                    raise RuntimeError(f"llamafleet serve was not ready in 300 s; see {log}")
                time.sleep(0.02)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def fetch(url: str, sha256: str, out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(VENV_BIN / "llamafleet"), "fetch", "--url", url, "--sha256", sha256,
                    "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(EMBEDDED_MODELS), default=GEMMA.name)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate-mib-s", default="0", help="comma-separated server rates (0: loopback)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    model = embedded_model_path(a.model)
    sha = sha256_of(model)
    size = model.stat().st_size
    work = Path(tempfile.mkdtemp(prefix="llamafleet-cache-bench-"))
    served = work / "srv" / model.name
    served.parent.mkdir()
    shutil.copyfile(model, served)
    warm_cache = work / "warm"
    warm_cache.mkdir()
    shutil.copyfile(model, warm_cache / cache_file_name(sha))
    results = []
    load_before = os.getloadavg()
    try:
        for rate in (float(r) for r in a.rate_mib_s.split(",")):
            httpd, url = serve_file(served, rate)
            cold_fetch, cold_serve, cold_total, warm = [], [], [], []
            try:
                for i in range(a.runs):
                    cache = work / f"cold-{rate:g}-{i}"
                    cache.mkdir()
                    f = fetch(url, sha, cache / cache_file_name(sha))
                    s = start_to_ready(cache / cache_file_name(sha), a.threads,
                                       work / f"serve-cold-{rate:g}-{i}.log")
                    cold_fetch.append(f)
                    cold_serve.append(s)
                    cold_total.append(f + s)
                    shutil.rmtree(cache)
                    warm.append(start_to_ready(warm_cache / cache_file_name(sha), a.threads,
                                               work / f"serve-warm-{rate:g}-{i}.log"))
            finally:
                httpd.shutdown()
                httpd.server_close()
            results.append({
                "rate_mib_s": rate or "loopback", "runs": a.runs,
                "cold_cache_s": {"median": median(cold_total), "all": [round(x, 3) for x in cold_total]},
                "cold_fetch_s": {"median": median(cold_fetch), "all": [round(x, 3) for x in cold_fetch]},
                "cold_serve_s": {"median": median(cold_serve), "all": [round(x, 3) for x in cold_serve]},
                "warm_cache_s": {"median": median(warm), "all": [round(x, 3) for x in warm]},
                "cold_over_warm": round(median(cold_total) / median(warm), 2)})
            print(json.dumps(results[-1]), file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    commit = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    out = {"commit": commit, "machine": platform.node(), "cpu": platform.processor() or
           platform.machine(), "cpus": len(os.sched_getaffinity(0)),
           "loadavg_before": [round(x, 2) for x in load_before],
           "loadavg_after": [round(x, 2) for x in os.getloadavg()],
           "model": a.model, "model_bytes": size, "sha256": sha,
           "settings": {"threads": a.threads, "runs": a.runs,
                        "measured": "llamafleet fetch (cold only) + llamafleet serve start "
                                    "to first /ready 200, local processes"},
           "results": results}
    text = json.dumps(out, indent=2)
    print(text)
    path = a.out or HERE / "results" / time.strftime("model-cache-cold-start-%Y%m%d-%H%M%S.json")
    path.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
