"""The engine's own step, in process, against llama.cpp's `llama-batched-bench` on the same model.

No HTTP and no client: B requests of PP prompt tokens are submitted straight to an
:class:`~llamafleet.inference.engine.Engine` on the real llama.cpp backend, each generating TG
tokens (ignore_eos), with the step profile on. It reports, for the steps that decode all B
sequences at once:

* ``decode_ms``: the mean ``llama_decode`` (+ sync) per step, next to batched-bench's text
  generation step at the same B, PP, TG and threads (its T_TG / TG): the physical floor;
* ``host_us_per_seq``: everything else in the step (batch fill, batched sampling, text,
  delivery, scheduling) in µs per sequence.

    python benchmarks/engine_step.py --model random.gguf --batch 64 --pp 100 --tg 96 \\
        --batched-bench benchmarks/.build/bin/llama-batched-bench-patched --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from llamafleet.bench import load as bench
from llamafleet.inference.engine import Engine, Finished, GenerationRequest, SamplingParams
from llamafleet.inference.llama_backend import LlamaBackend, LlamaModel
from llamafleet.inference.main import keep_heap_warm
from llamafleet.inference.metrics import EngineMetrics, Metrics
from llamafleet.inference.profiling import install


def engine_step(model_path: Path, batch: int, pp: int, tg: int, threads: int,
                layout: str = "split", context: int = 256) -> dict:
    model = LlamaModel(model_path, gpu_layers=0)
    be = LlamaBackend(model, n_seq=batch, context_size=context, n_batch=max(512, batch),
                      threads=threads, kv_layout=layout)
    engine = Engine(be, max_batch_size=batch, queue_size=batch, context_size=context,
                    observer=EngineMetrics(Metrics()))  # the pod's metrics, as it runs
    prof = install(engine)
    engine.start()
    try:
        done, left = threading.Event(), [batch]

        def sink(ev: object) -> None:
            if isinstance(ev, Finished):
                left[0] -= 1
                if not left[0]:
                    done.set()

        # Distinct prompts (no prefix reuse), the same length for every sequence.
        params = SamplingParams(max_tokens=tg, ignore_eos=True)
        t0 = time.perf_counter()
        for i in range(batch):
            prompt = [3 + (7 * i + j) % (model.n_vocab - 3) for j in range(pp)]
            engine.submit(GenerationRequest(prompt, params, sink))
        done.wait()
        wall = time.perf_counter() - t0
    finally:
        engine.stop()
        be.close()
        model.close()
    step = prof.summary()["decode_steps_by_batch"].get(str(batch), {})
    parts = step.get("parts_ms_per_step", {})
    host = sum(v for k, v in parts.items() if k != "decode")
    return {"batch": batch, "layout": layout, "steps": step.get("steps", 0),
            "decode_ms": parts.get("decode"), "parts_ms_per_step": parts,
            "host_us_per_seq": round(host * 1e3 / batch, 2),
            "tokens_per_s": round(batch * tg / wall, 1), "wall_s": round(wall, 3)}


def batched_bench(binary: Path, model_path: Path, batch: int, pp: int, tg: int, threads: int,
                  unified: bool = False) -> dict:
    cmd = [str(binary), "-m", str(model_path), "-c", str(batch * (pp + tg + 8)), "-b", "2048",
           "-ub", "512", "-npp", str(pp), "-ntg", str(tg), "-npl", str(batch), "-t", str(threads)]
    if unified:
        cmd.append("-kvu")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    row = [r for r in out.splitlines() if re.match(r"^\|\s+\d", r)][-1]
    cells = [c.strip() for c in row.strip("|").split("|")]
    t_tg = float(cells[6])  # PP | TG | B | N_KV | T_PP | S_PP | T_TG | S_TG | T | S
    return {"batch": batch, "unified": unified, "tg_step_ms": round(t_tg / tg * 1e3, 3),
            "tg_tokens_per_s": float(cells[7])}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--batch", default="64", help="batch sizes, e.g. 16,64,128")
    p.add_argument("--pp", type=int, default=100)
    p.add_argument("--tg", type=int, default=96)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--layout", default="split", choices=["split", "unified"])
    p.add_argument("--batched-bench", type=Path, help="llama-batched-bench from the same build")
    p.add_argument("--json", dest="json_out", type=Path)
    args = p.parse_args()
    keep_heap_warm()  # as `llamafleet serve` does
    records = []
    for b in (int(x) for x in args.batch.split(",")):
        rec = {"engine": engine_step(args.model, b, args.pp, args.tg, args.threads, args.layout,
                                     context=args.pp + args.tg + 16)}
        if args.batched_bench:
            rec["batched_bench"] = batched_bench(args.batched_bench, args.model, b, args.pp,
                                                 args.tg, args.threads,
                                                 unified=args.layout == "unified")
            rec["decode_over_floor"] = round(rec["engine"]["decode_ms"]
                                             / rec["batched_bench"]["tg_step_ms"], 3)
        records.append(rec)
        e = rec["engine"]
        print(f"B={b:>4} decode {e['decode_ms']:.2f} ms/step"
              + (f" (batched-bench {rec['batched_bench']['tg_step_ms']:.2f}, "
                 f"{rec['decode_over_floor']:.2f}x)" if "batched_bench" in rec else "")
              + f", host {e['host_us_per_seq']:.1f} µs/seq/step, {e['tokens_per_s']:.0f} tok/s")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({
            **bench.environment(), "settings": {k: str(v) for k, v in vars(args).items()},
            "levels": records}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
