"""This tree's `llamafleet serve` against an earlier commit's, side by side in one run.

Both serve the same model with the same settings, one at a time on the machine, interleaved
level by level (baseline, this tree, baseline, ... for ``--rounds``), measured by the same
client (`llamafleet bench`, streaming). The baseline runs from a git worktree of ``--ref``
(under benchmarks/.build/), imported ahead of this tree's installed package, so nothing is
reinstalled. Records JSON with both commits, the machine and the settings.

Both run with tracing off (no OTEL_* in their environment). ``--tracing`` adds this tree with
tracing on, exporting over OTLP/HTTP to a sink in this process that only counts what it gets
(for information: what tracing costs when on).

    .venv/bin/python benchmarks/baseline.py --ref ef80ee4                  # Gemma 3 270M, c1 and c4
    .venv/bin/python benchmarks/baseline.py --ref ef80ee4 --model smollm2-135m-instruct
    .venv/bin/python benchmarks/baseline.py --ref main~1 --tracing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from compare import VENV_BIN, free_port, running
from llamafleet.bench import load as bench
from llamafleet.common.contract import EMBEDDED_MODELS, GEMMA
from llamafleet.inference.model_packages import embedded_model_path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PARTS = ("inference", "common", "router", "operator")


def baseline_tree(ref: str) -> tuple[Path, str]:
    """A worktree of ``ref`` and a folder that makes its parts importable as ``llamafleet``."""
    commit = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, capture_output=True, text=True,
                            check=True).stdout.strip()
    tree = HERE / ".build" / f"baseline-{commit[:12]}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT,
                       check=True, capture_output=True)
    shim = tree / ".shim" / "llamafleet"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "__init__.py").touch()
    for part in PARTS:
        link = shim / part
        if not link.exists():
            link.symlink_to(tree / part)
    return shim.parent, commit


def measure(label: str, env: dict[str, str], model: Path, level: int, args: argparse.Namespace
            ) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(VENV_BIN / "python"), "-m", "llamafleet.common.cli", "serve",
           "--model-path", str(model), "--host", "127.0.0.1", "--http-port", str(port),
           "--grpc-port", "0", "--metrics-port", "0", "--max-batch-size", str(level),
           "--context-size", str(args.context), "--threads", str(args.threads),
           "--no-embeddings", "--log-level", "warning"]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "serve.log"
        out = Path(tmp) / "bench.json"
        # Tracing stays off unless ``env`` turns it on (common/tracing.py: OTEL_*).
        full_env = {**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}, **env}
        with running(cmd, url, log, env=full_env):
            ns = argparse.ArgumentParser()
            bench.add_arguments(ns)
            bench_args = ns.parse_args(["--url", url, "--concurrent", str(level), "--requests",
                                        str(args.requests or max(8, 4 * level)),
                                        "--max-tokens", str(args.max_tokens), "--json", str(out)])
            bench.main(bench_args)
        result = json.loads(out.read_text())["results"][0]
    return {"server": label, "level": level, **{k: result.get(k) for k in (
        "tokens_per_s", "ttft_p50_s", "ttft_p90_s", "itl_p50_s", "completed", "failed")}}


class Sink(ThreadingHTTPServer):
    """An OTLP/HTTP receiver that answers 200 and counts the export requests and bytes."""

    def __init__(self) -> None:
        self.exports = self.bytes = 0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("content-length", 0))
                self.rfile.read(n)
                sink.exports += 1
                sink.bytes += n
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", required=True, help="the baseline commit (any git ref)")
    p.add_argument("--model", choices=list(EMBEDDED_MODELS), default=GEMMA.name)
    p.add_argument("--levels", default="1,4")
    p.add_argument("--rounds", type=int, default=2, help="interleaved runs of each server")
    p.add_argument("--requests", type=int, default=0, help="per run (default: 4 x level, >= 8)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--json", type=Path)
    p.add_argument("--tracing", action="store_true",
                   help="also this tree with tracing on, exporting to a local OTLP/HTTP sink")
    args = p.parse_args()
    shim, base_commit = baseline_tree(args.ref)
    model = embedded_model_path(args.model)
    servers = {"baseline": {"PYTHONPATH": str(shim)}, "this tree": {}}
    sink = Sink() if args.tracing else None
    if sink is not None:
        servers["tracing on"] = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink.server_port}"}
    runs = []
    for level in (int(x) for x in args.levels.split(",")):
        for _ in range(args.rounds):
            for label, env in servers.items():
                runs.append(measure(label, env, model, level, args))
                print(f"{label:>10} c{level}: {runs[-1]['tokens_per_s']} tok/s, TTFT p50 "
                      f"{runs[-1]['ttft_p50_s']} s", flush=True)
    summary = []
    for level in sorted({r["level"] for r in runs}):
        tps = {label: [r["tokens_per_s"] for r in runs if r["level"] == level
                       and r["server"] == label] for label in servers}
        base, ours = statistics.mean(tps["baseline"]), statistics.mean(tps["this tree"])
        # The medians too: on a shared machine one disturbed run moves a mean of a few.
        mbase, mours = statistics.median(tps["baseline"]), statistics.median(tps["this tree"])
        summary.append({"level": level, "baseline_tokens_per_s": round(base, 2),
                        "tokens_per_s": round(ours, 2), "ratio": round(ours / base, 3),
                        "median_ratio": round(mours / mbase, 3)})
        print(f"c{level}: this tree {ours:.1f} tok/s vs baseline {base:.1f} ({ours / base:.2f}x)")
        if "tracing on" in tps:
            on = statistics.mean(tps["tracing on"])
            summary[-1].update(tracing_on_tokens_per_s=round(on, 2), tracing_on_ratio=round(on / base, 3),
                               tracing_on_median_ratio=round(statistics.median(tps["tracing on"]) / mbase, 3))
            print(f"c{level}: tracing on {on:.1f} tok/s ({on / base:.2f}x)")
    out = args.json or HERE / "results" / (
        f"baseline-{args.model}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**bench.environment(), "baseline_commit": base_commit,
                               "model": args.model, "settings": {k: str(v) for k, v in
                                                                 vars(args).items()},
                               "summary": summary, "runs": runs,
                               **({"otlp_sink": {"exports": sink.exports, "bytes": sink.bytes}}
                                  if sink is not None else {})}, indent=2))
    print(f"wrote {out}")
    return 0 if all(r["failed"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
