"""Prefill and decode speed of llama-cpp-python builds, side by side in one run, one machine.

Each build (a wheel from scripts/build-llama-cpp-python.sh) is installed into its own folder
and measured in its own process through llamafleet's backend (the same llama_decode calls the
engine makes): prefill tok/s of a 512-token prompt, decode tok/s of one sequence, and decode
tok/s of 4 sequences stepping together. Builds alternate over rounds so drift on a shared
machine hits them alike. Each figure is the best of the rounds (on 2 cores, another process
that wakes up for a moment stalls llama.cpp's OpenMP threads and cuts a round to a fraction),
and the median and every round are recorded beside it.

    .venv/bin/python benchmarks/cpu_builds.py \\
        --wheel before=~/.cache/llamafleet/wheels/llama_cpp_python-0.3.36+llamafleet.OLD-*.whl \\
        --wheel native=$(scripts/build-llama-cpp-python.sh) \\
        --wheel portable=$(scripts/build-llama-cpp-python.sh --portable)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from llamafleet.bench import load as bench
from llamafleet.inference.model_packages import embedded_model_path

HERE = Path(__file__).parent

MEASURE = r"""
import json, sys, time
from pathlib import Path
from llamafleet.inference.llama_backend import LlamaBackend, LlamaModel, BACKEND_MODULES
from llamafleet.inference.selftest import GREEDY
import llama_cpp
model_path, threads, n_prompt, n_decode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = LlamaModel(Path(model_path), gpu_layers=0)
b = LlamaBackend(model, n_seq=4, context_size=1024, n_batch=512, threads=threads)
words = model.tokenize("The history of lighthouses is long and varied. " * 64, add_bos=True)
prompt = words[:n_prompt]
def prefill(seq, toks):
    b.decode(toks, list(range(len(toks))), [seq] * len(toks), [i == len(toks) - 1 for i in range(len(toks))])
def run_decode(seqs):
    samplers, pos, last = {}, {}, {}
    for s in seqs:  # a logits row is valid until the next decode: sample right after each prefill
        toks = prompt[:16 + s]
        prefill(s, toks)
        samplers[s] = b.new_sampler(GREEDY)
        last[s], pos[s] = b.sample(samplers[s], len(toks) - 1), len(toks)
    t0 = time.perf_counter()
    for _ in range(n_decode):
        order = list(seqs)
        b.decode([last[s] for s in order], [pos[s] for s in order], order, [True] * len(order))
        for i, s in enumerate(order):
            last[s] = b.sample(samplers[s], i)
            pos[s] += 1
    dt = time.perf_counter() - t0
    for s in seqs:
        b.free_sampler(samplers[s]); b.clear_sequence(s)
    return n_decode * len(seqs) / dt
prefill(0, prompt[:32]); b.clear_sequence(0)  # warm-up
t0 = time.perf_counter(); prefill(0, prompt); pre = len(prompt) / (time.perf_counter() - t0)
b.clear_sequence(0)
one = run_decode([0])
four = run_decode([0, 1, 2, 3])
print(json.dumps({"prefill_tok_s": pre, "decode_1_tok_s": one, "decode_4_tok_s": four,
                  "llama_cpp_python": llama_cpp.__version__, "modules": BACKEND_MODULES,
                  "system_info": llama_cpp.llama_print_system_info().decode().strip()}))
"""


def install(wheel: Path, into: Path) -> Path:
    site = into / wheel.stem
    if not (site / "llama_cpp").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                        str(site), str(wheel)], check=True)
    return site


def measure(site: Path, model: Path, threads: int, n_prompt: int, n_decode: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the venv's own llama_cpp
    out = subprocess.run([sys.executable, "-c", MEASURE, str(model), str(threads), str(n_prompt),
                          str(n_decode)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", action="append", required=True, metavar="NAME=WHEEL",
                    help="a build to measure, e.g. native=path/to/llama_cpp_python-...whl")
    ap.add_argument("--model", type=Path, default=None, help="GGUF (default: the embedded model)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args()
    builds = {}
    for spec in a.wheel:
        name, sep, path = spec.partition("=")
        if not sep or not Path(path).expanduser().is_file():
            ap.error(f"--wheel needs NAME=PATH to an existing wheel, got {spec!r}")
        builds[name] = install(Path(path).expanduser(), HERE / ".build" / "sites")
    model = a.model or embedded_model_path()
    runs: dict[str, list[dict]] = {name: [] for name in builds}
    for _ in range(a.rounds):
        for name, site in builds.items():
            runs[name].append(measure(site, model, a.threads, a.prompt_tokens, a.decode_tokens))
    keys = ("prefill_tok_s", "decode_1_tok_s", "decode_4_tok_s")
    results = {name: {**{k: round(max(r[k] for r in rs), 1) for k in keys},
                      "median": {k: round(statistics.median(r[k] for r in rs), 1) for k in keys},
                      "rounds": [{k: round(r[k], 1) for k in keys} for r in rs],
                      **{k: rs[0][k] for k in ("llama_cpp_python", "modules", "system_info")}}
               for name, rs in runs.items()}
    report = {**bench.environment(), "model": model.name,
              "settings": {"threads": a.threads, "prompt_tokens": a.prompt_tokens,
                           "decode_tokens": a.decode_tokens, "rounds": a.rounds},
              "builds": results}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"builds-{stamp}.json").write_text(json.dumps(report, indent=2))
    print(f"{report['machine']['cpu']} ({' '.join(report['machine']['isa'])}), "
          f"{a.threads} threads, {model.name}")
    print(f"{'build (best of rounds)':<22} {'prefill':>9} {'decode x1':>10} {'decode x4':>10}  "
          "llama-cpp-python")
    for name, r in results.items():
        print(f"{name:<22} {r['prefill_tok_s']:>9} {r['decode_1_tok_s']:>10} "
              f"{r['decode_4_tok_s']:>10}  {r['llama_cpp_python']}")
    print(f"-> {a.out / f'builds-{stamp}.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
