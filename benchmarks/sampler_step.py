"""The batched sampler's step against a baseline commit's, side by side in one run.

One engine step's host sampling, as ``LlamaBackend.sample_batch`` runs it: penalties, the
draw (top-k, top-p, min-p, temperature) and the penalty history, for B rows of random logits
of a vocabulary of V tokens, with the pod's default sampling parameters. The baseline is
``inference/sampler.py`` as it was at ``--baseline`` (read with ``git show``; the module needs
only numpy), timed in the same process, interleaved with the working tree's, on the same
logits. Real vocabularies matter here: a random model's 259 tokens hide what a 262k
vocabulary (Gemma 3) costs per row.

    python benchmarks/sampler_step.py --baseline HEAD --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from llamafleet.bench import load as bench
from llamafleet.inference import sampler as current
from llamafleet.inference.engine import SamplingParams
from llamafleet.inference.main import keep_heap_warm

ROOT = Path(__file__).resolve().parent.parent


def baseline_module(ref: str):
    src = subprocess.run(["git", "show", f"{ref}:inference/sampler.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "baseline_sampler.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("baseline_sampler", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_sampler"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def step_us(module, logits: np.ndarray, params: SamplingParams, seconds: float) -> float:
    """Mean µs per step of penalise + sample + accept over ``logits`` (one row per sequence)."""
    n, v = logits.shape
    pool = module.SamplerPool(v, capacity=n)
    samplers = [pool.open(params) for _ in range(n)]
    rows = np.arange(n)
    for _ in range(3):  # fill the histories and the caches
        pool.accept(samplers, pool.sample(logits, rows, samplers))
    steps, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or steps < 5:
        pool.penalise(logits, rows, samplers)
        pool.accept(samplers, pool.sample(logits, rows, samplers))
        steps += 1
    return elapsed / steps * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="HEAD", help="git ref of the baseline sampler")
    p.add_argument("--vocab", default="259,49152,262144")
    p.add_argument("--batch", default="1,4,16,64")
    p.add_argument("--seconds", type=float, default=0.5, help="per measurement")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median kept)")
    p.add_argument("--json", dest="json_out", type=Path)
    args = p.parse_args()
    keep_heap_warm()  # as `llamafleet serve` does: numpy's temporaries reuse the heap
    old = baseline_module(args.baseline)
    params = SamplingParams()  # the pod's defaults: temperature 0.7, top-k 40, penalties
    rng = np.random.default_rng(0)
    records = []
    print(f"{'vocab':>7} {'batch':>5} {'baseline µs':>12} {'now µs':>9} {'µs/seq now':>10} "
          f"{'speed-up':>8}")
    for v in (int(x) for x in args.vocab.split(",")):
        for n in (int(x) for x in args.batch.split(",")):
            logits = (rng.standard_normal((n, v)) * 3).astype(np.float32)
            base, now = [], []
            for _ in range(args.rounds):
                base.append(step_us(old, logits, params, args.seconds))
                now.append(step_us(current, logits, params, args.seconds))
            b, c = float(np.median(base)), float(np.median(now))
            records.append({"vocab": v, "batch": n, "baseline_us_per_step": round(b, 1),
                            "us_per_step": round(c, 1), "us_per_seq": round(c / n, 2),
                            "speedup": round(b / c, 3), "rounds_baseline": [round(x, 1) for x in base],
                            "rounds": [round(x, 1) for x in now]})
            print(f"{v:>7} {n:>5} {b:>12.1f} {c:>9.1f} {c / n:>10.2f} {b / c:>7.2f}x")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({
            **bench.environment(), "settings": {k: str(v) for k, v in vars(args).items()},
            "baseline_commit": subprocess.run(["git", "rev-parse", args.baseline], cwd=ROOT,
                                              capture_output=True, text=True).stdout.strip(),
            "sampling": {"temperature": params.temperature, "top_k": params.top_k,
                         "top_p": params.top_p, "min_p": params.min_p,
                         "repeat_penalty": params.repeat_penalty},
            "levels": records}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
