"""Side-by-side throughput on one machine, one model, one run.

Servers, each alone on the machine while it is measured (same prompt, same load):
  * llamafleet at max_batch_size 1 and 4,
  * llama-cpp-python's bundled server (`python -m llama_cpp.server`),
  * llama.cpp's C++ `llama-server -np 4` (built by build_llama_server.sh; skipped if absent),
    as upstream ships it and, if built with `--patched`, with the same llama.cpp patches as
    llamafleet's llama-cpp-python (patches/llama.cpp),
plus a bare llama-cpp-python decode loop (no server) as the single-stream ceiling.
All of them load the same GGUF: an embedded model, Gemma 3 270M by default (the benchmark
model since the first record; the llama.cpp patch targets its Q8_0 output matrix).

    .venv/bin/python benchmarks/compare.py            # writes benchmarks/results/cpu-*.json|md
    .venv/bin/python benchmarks/compare.py --model smollm2-135m-instruct   # the chat model
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import httpx
from llamafleet.bench import load as bench
from llamafleet.common.contract import EMBEDDED_MODELS, GEMMA
from llamafleet.inference.model_packages import embedded_model_path

HERE = Path(__file__).parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(cmd: list[str], url: str, log: Path, headers: dict[str, str] | None = None,
            env: dict[str, str] | None = None):
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}; see {log}")
                try:
                    if httpx.get(url + "/v1/models", timeout=2, headers=headers).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{cmd[0]} did not start; see {log}")
                time.sleep(0.5)
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def bare_decode(model: Path, prompt: str, max_tokens: int, threads: int, runs: int) -> dict:
    """A bare llama-cpp-python loop: prefill, then decode one token per llama_decode.

    It samples exactly as llamafleet does by default (top-k 40, top-p 0.95, min-p 0.05,
    temperature 0.7, repeat penalty 1.1 over the last 64 tokens, with the server's own
    batched sampler, sampler.py, on a batch of one), so the gap to llamafleet's single stream
    is the cost of the server itself: scheduler, HTTP, SSE.
    """
    code = f"""
import json, time, random
import numpy as np
from llama_cpp import llama_cpp as C, _internals
from llamafleet.inference.engine import SamplingParams
from llamafleet.inference.sampler import SamplerPool
from llamafleet.inference.model import ChatFormatter
mp = C.llama_model_default_params()
m = _internals.LlamaModel(path_model={str(model)!r}, params=mp, verbose=False)
cp = C.llama_context_default_params(); cp.n_ctx = 2048; cp.n_batch = 512; cp.n_ubatch = 512
cp.n_threads = cp.n_threads_batch = {threads}
ctx = _internals.LlamaContext(model=m, params=cp, verbose=False)
# The prompt as the server makes it: the model's chat template (GGUF or built-in).
bos, eos = m.token_get_text(m.token_bos()), m.token_get_text(m.token_eos())
text = ChatFormatter.for_model(None, m.metadata(), bos, eos).render(
    [{{"role": "user", "content": {prompt!r}}}])
toks = m.tokenize(text.encode(), m.add_bos_token() and not text.startswith(bos), True)
batch = C.llama_batch_init(512, 0, 1)
rates = []
for run in range({runs}):
    C.llama_memory_clear(C.llama_get_memory(ctx.ctx), True)
    pool = SamplerPool(m.n_vocab())
    s = pool.open(SamplingParams(seed=run))
    row0 = np.zeros(1, dtype=np.intp)
    t0 = time.perf_counter()
    batch.n_tokens = len(toks)
    for i, t in enumerate(toks):
        batch.token[i] = t; batch.pos[i] = i; batch.n_seq_id[i] = 1; batch.seq_id[i][0] = 0
        batch.logits[i] = i == len(toks) - 1
    C.llama_decode(ctx.ctx, batch)
    idx, pos = len(toks) - 1, len(toks)
    for n in range({max_tokens}):
        logits = np.ctypeslib.as_array(C.llama_get_logits_ith(ctx.ctx, idx), shape=(1, m.n_vocab()))
        pool.penalise(logits, row0, [s])
        tok = int(pool.sample(logits, row0, [s])[0])
        pool.accept([s], [tok])
        if n == {max_tokens} - 1:
            break
        batch.n_tokens = 1; batch.token[0] = tok; batch.pos[0] = pos; batch.n_seq_id[0] = 1
        batch.seq_id[0][0] = 0; batch.logits[0] = True
        C.llama_decode(ctx.ctx, batch); idx = 0; pos += 1
    rates.append({max_tokens} / (time.perf_counter() - t0))
    pool.close(s)
print(json.dumps(rates))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rates = json.loads(out.stdout.strip().splitlines()[-1])
    rates = rates[1:] if len(rates) > 1 else rates  # first run warms caches
    return {"runs": len(rates), "tokens_per_s": round(sum(rates) / len(rates), 2),
            "all": [round(r, 2) for r in rates]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(EMBEDDED_MODELS), default=GEMMA.name,
                    help="embedded model that every server loads (default: %(default)s, the "
                    "benchmark model; results of others are named after them)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrent", default="1,4")
    ap.add_argument("--requests", type=int, default=24, help="requests per level")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--context", type=int, default=2048, help="context per sequence")
    ap.add_argument("--llama-server", type=Path, default=HERE / ".build/bin/llama-server")
    ap.add_argument("--skip", default="", help="comma list of servers to skip")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args()

    model = embedded_model_path(a.model)
    suffix = "" if a.model == GEMMA.name else f"-{a.model}"
    levels = [int(x) for x in a.concurrent.split(",")]
    prompt = bench.DEFAULT_PROMPT
    args = argparse.Namespace(api_key=None, max_tokens=a.max_tokens, no_ignore_eos=False,
                              timeout=600, seed=None)
    # llama-cpp-python's server has a fixed default seed, with which this prompt ends at the
    # first token every time; it alone gets a per-request seed so that it generates at all.
    seeded = {"llama-cpp-python": 1}
    servers = []
    lf = [str(VENV_BIN / "llamafleet"), "serve", "--model-path", str(model), "--host",
          "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", "--context-size",
          str(a.context), "--threads", str(a.threads), "--log-level", "warning"]
    for b in (1, 4):
        servers.append((f"llamafleet-b{b}", lambda p, b=b: lf + ["--http-port", str(p),
                                                                   "--max-batch-size", str(b)]))
    servers.append(("llama-cpp-python", lambda p: [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
        "--port", str(p), "--n_ctx", str(a.context), "--n_threads", str(a.threads),
        "--n_threads_batch", str(a.threads)]))
    for name, binary in (("llama-server-np4", a.llama_server),
                         ("llama-server-np4-patched", a.llama_server.with_name("llama-server-patched"))):
        if binary.exists():
            servers.append((name, lambda p, binary=binary: [
                str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(p),
                "-np", "4", "-c", str(a.context * 4), "-t", str(a.threads), "-tb", str(a.threads)]))
        else:
            print(f"{binary} not found: run benchmarks/build_llama_server.sh", file=sys.stderr)
    skip = set(filter(None, a.skip.split(",")))
    servers = [s for s in servers if s[0] not in skip]

    a.out.mkdir(parents=True, exist_ok=True)
    # The bare loop runs before and after the servers; its mean is the reference, so slow
    # drift of this shared machine over the run weighs on both sides alike.
    bare_before = bare_decode(model, prompt, a.max_tokens, a.threads, runs=6)
    results: list[bench.LevelResult] = []
    progress = bench.Progress(len(servers) * len(levels) * a.requests)
    for name, make_cmd in servers:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with running(make_cmd(port), url, a.out / f"{name}.log"):
            model_id = httpx.get(url + "/v1/models").json()["data"][0]["id"]
            # One unmeasured request first: first-use costs (graph allocation, page faults)
            # are not what the levels measure.
            httpx.post(url + "/v1/chat/completions", timeout=600, json={
                "model": model_id, "max_tokens": 8, "seed": 1,
                "messages": [{"role": "user", "content": prompt}]}).raise_for_status()
            for c in levels:
                level_args = argparse.Namespace(**{**vars(args), "seed": seeded.get(name)})
                results.append(bench.run_level(
                    name, url, model_id, prompt, c, a.requests, level_args, progress))
    bare_after = bare_decode(model, prompt, a.max_tokens, a.threads, runs=6)
    bare = {"tokens_per_s": round((bare_before["tokens_per_s"] + bare_after["tokens_per_s"]) / 2, 2),
            "before": bare_before, "after": bare_after}

    by = {(r.server, r.concurrency): r.tokens_per_s for r in results}
    ratios = {}
    if ("llamafleet-b4", 4) in by and ("llamafleet-b1", 1) in by:
        ratios["b4_c4_vs_b1_c1"] = round(by[("llamafleet-b4", 4)] / by[("llamafleet-b1", 1)], 3)
    for other, key in (("llama-server-np4", "b4_c4_vs_llama_server_c4"),
                       ("llama-server-np4-patched", "b4_c4_vs_patched_llama_server_c4")):
        if ("llamafleet-b4", 4) in by and (other, 4) in by:
            ratios[key] = round(by[("llamafleet-b4", 4)] / by[(other, 4)], 3)
    if ("llamafleet-b1", 1) in by:
        ratios["single_stream_vs_bare_loop"] = round(by[("llamafleet-b1", 1)] / bare["tokens_per_s"], 3)
    report = {**bench.environment(),
              "model": str(model.name),
              "settings": {"max_tokens": a.max_tokens, "concurrent": levels,
                           "requests_per_level": a.requests, "threads": a.threads,
                           "context_per_sequence": a.context, "ignore_eos": True,
                           "seeded_servers": seeded,
                           "prompt": prompt},
              "bare_decode_loop": bare, "ratios": ratios,
              "results": [asdict(r) for r in results]}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (a.out / f"cpu-{stamp}{suffix}.json").write_text(json.dumps(report, indent=2))
    lines = [f"# CPU comparison {stamp} (commit {report['commit'] and report['commit'][:10]})", "",
             f"Machine: {report['machine']['cpu']}, {report['machine']['cores']} cores. "
             f"Model: {model.name}. {a.max_tokens} tokens per request, {a.requests} requests per "
             "level, streaming, ignore_eos.", "",
             "| server | concurrency | tok/s | TTFT p50 ms | ITL p50 ms | ok | failed |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.server} | {r.concurrency} | {r.tokens_per_s:.1f} | "
                     f"{bench._fmt(r.ttft_p50_s)} | {bench._fmt(r.itl_p50_s)} | {r.completed} | "
                     f"{r.failed} |")
    lines += ["", f"Bare llama-cpp-python decode loop (single stream): {bare['tokens_per_s']} tok/s "
              f"(mean of {bare_before['tokens_per_s']} before and {bare_after['tokens_per_s']} after "
              "the servers)",
              "", "Ratios: " + ", ".join(f"{k} = {v}" for k, v in ratios.items()), ""]
    md = "\n".join(lines)
    (a.out / f"cpu-{stamp}{suffix}.md").write_text(md)
    (a.out / f"cpu-latest{suffix}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
