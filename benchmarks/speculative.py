"""Speculative decoding (prompt lookup, or a draft model) on and off, side by side in one
process on one model.

One :class:`~llamafleet.inference.engine.Engine` on the real llama.cpp backend serves every
round; between rounds only its ``speculative_k`` changes (0: off), alternating off, on, off,
on ... so both modes see the same machine, model, caches and heat. Requests go straight to the
engine (no HTTP: the server's own work is the same either way), greedy, and each workload's
prompts run once before the rounds so their prefixes are cached for both modes alike.

Workloads, on the embedded chat model (SmolLM2-135M-Instruct, ChatML):

* ``copy``: a long RAG context of several documents and a question whose answer quotes one of
  them (what prompt lookup is for);
* ``free``: questions whose answers copy nothing (what it must not slow down).

Each is run at the concurrency levels given (``copy`` at 1 and 16, ``free`` at 1 by default):
``tokens_per_s`` is completion tokens over the round's wall time, and ``ratio`` is on / off
(the mean over the rounds of each mode). Before the rounds, ``verify_cost`` times a step of
1 .. k+1 tokens of one sequence: what speculation could gain here at best.

    python benchmarks/speculative.py --rounds 3 \\
        --json benchmarks/results/speculative-$(date +%Y%m%d-%H%M%S).json

With ``--draft-model`` (a GGUF of the model's vocabulary, or an embedded model's name) the
'on' rounds draft with that model instead of prompt lookup (``--speculative draft``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

from llamafleet.bench import load as bench
from llamafleet.common.contract import SMOLLM2, SPECULATIVE_K_DEFAULT
from llamafleet.inference.engine import Engine, Finished, GenerationRequest, SamplingParams
from llamafleet.inference.llama_backend import LlamaBackend, LlamaModel
from llamafleet.inference.main import keep_heap_warm
from llamafleet.inference.model_packages import embedded_model_path
from llamafleet.inference.serving import load_draft_model
from llamafleet.inference.settings import Settings

DOCUMENTS = [
    ("Returns", "Items bought in our stores or online can be returned within thirty days of "
     "delivery. The item must be unused and in its original packaging, with the receipt or "
     "the order number. Refunds are paid to the card used for the purchase within five "
     "working days after we receive the item. Sale items can be exchanged but not refunded."),
    ("Delivery", "Standard delivery takes three to five working days and is free for orders "
     "over fifty euros; below that it costs four euros ninety. Express delivery arrives the "
     "next working day when ordered before two in the afternoon and costs nine euros. We do "
     "not deliver on Sundays or public holidays."),
    ("Warranty", "Every electrical product comes with a two year warranty that covers faults "
     "in materials and workmanship. It does not cover damage caused by accidents, misuse, or "
     "repairs made by anyone other than our service centres. To make a claim, bring the "
     "product and the receipt to any of our stores."),
    ("Opening hours", "Our stores are open from nine in the morning to eight in the evening "
     "from Monday to Saturday, and from eleven to five on Sundays. The customer service line "
     "answers from eight to eight every day except on the first of January."),
    ("Gift cards", "Gift cards can be used in every store and online, for up to three years "
     "after the date of purchase. They cannot be exchanged for cash, and a lost card can only "
     "be replaced when the original receipt is shown."),
    ("Loyalty programme", "Members collect one point for every euro spent. Every hundred "
     "points give a voucher of five euros, sent by email at the start of each month. Points "
     "expire two years after they were collected."),
]
COPY_QUESTIONS = [f"Quote the section about {title.lower()} exactly, word for word."
                  for title, _ in DOCUMENTS]
FREE_QUESTIONS = [
    "Write a short poem about autumn leaves.",
    "Give three tips for learning to play the guitar.",
    "Describe a day at the beach in a few sentences.",
    "Why do cats purr? Answer briefly.",
    "Invent a name and a slogan for a coffee shop.",
    "Tell a very short story about a dragon who is afraid of the dark.",
]
SYSTEM = "You are a helpful assistant. When asked to quote, copy the text exactly."


def chat(user: str) -> str:
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            "<|im_start|>assistant\n")


def copy_prompt(question: str) -> str:
    context = "\n\n".join(f"## {title}\n{text}" for title, text in DOCUMENTS)
    return chat(f"Documents:\n\n{context}\n\n{question}")


def run_round(engine: Engine, prompts: list[list[int]], concurrency: int,
              max_tokens: int) -> dict:
    """Every prompt once, ``concurrency`` at a time; completion tokens over wall time."""
    lock, slots = threading.Lock(), threading.Semaphore(concurrency)
    tokens, done = [0], threading.Event()
    left = [len(prompts)]

    def sink(ev: object) -> None:
        if isinstance(ev, Finished):
            with lock:
                tokens[0] += ev.completion_tokens
                left[0] -= 1
                if not left[0]:
                    done.set()
            slots.release()

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    t0 = time.perf_counter()
    for prompt in prompts:
        slots.acquire()
        engine.submit(GenerationRequest(prompt, params, sink))
    done.wait()
    wall = time.perf_counter() - t0
    return {"tokens": tokens[0], "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens[0] / wall, 2)}


def verify_cost(be: LlamaBackend, prompt: list[int], k: int, repeats: int = 12) -> dict:
    """What a step that verifies a draft costs on this machine: the median ``llama_decode`` of
    n = 1 .. k+1 tokens of one sequence (every position with logits) behind ``prompt``, and
    the best ratio speculation could reach if every draft were accepted (n tokens for the
    time of a step of n, against one token per step of 1). On a GPU a step of a few tokens
    costs about what a step of one does; where it costs n times as much, no draft pays."""
    n0 = len(prompt)
    be.decode(prompt, list(range(n0)), [0] * n0, [False] * (n0 - 1) + [True])
    ms = {}
    for n in range(1, k + 2):
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            be.decode([prompt[-1]] * n, list(range(n0, n0 + n)), [0] * n, [True] * n)
            times.append((time.perf_counter() - t) * 1e3)
            be.trim_sequence(0, n0)
        ms[n] = round(statistics.median(times[2:]), 3)
    be.clear_sequence(0)
    return {"decode_ms_by_tokens": ms,
            "ceiling_at_full_acceptance": round(max(n * ms[1] / ms[n] for n in ms), 3)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="a GGUF (default: the embedded SmolLM2)")
    p.add_argument("--draft-model", help="draft with this model (a GGUF path or an embedded "
                   "model's name) instead of prompt lookup")
    p.add_argument("--k", type=int, default=SPECULATIVE_K_DEFAULT,
                   help="--speculative-k of the 'on' rounds (default: the pod's)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of each mode, alternating")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--levels", default="copy:1,free:1,copy:16",
                   help="workload:concurrency pairs")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--json", dest="json_out", type=Path)
    args = p.parse_args()
    keep_heap_warm()  # as `llamafleet serve` does
    path = args.model or embedded_model_path(SMOLLM2.name)
    model = LlamaModel(path, gpu_layers=0)
    context = 2048
    be = LlamaBackend(model, n_seq=args.max_batch_size, context_size=context, n_batch=512,
                      threads=args.threads)
    draft = None
    if args.draft_model:
        settings = Settings(speculative="draft", draft_model=args.draft_model,
                            threads=args.threads, context_size=context, gpu_layers=0)
        draft = load_draft_model(settings, model, n_seq=args.max_batch_size, n_batch=512,
                                 kv_layout=be.kv_layout)
    engine = Engine(be, max_batch_size=args.max_batch_size, queue_size=64, context_size=context,
                    prefill_step_s=0.05, speculative_k=args.k, draft_model=draft)

    def tokenize(text: str) -> list[int]:
        return model.tokenize(text, add_bos=model.add_bos)

    workloads = {"copy": [tokenize(copy_prompt(q)) for q in COPY_QUESTIONS],
                 "free": [tokenize(chat(q)) for q in FREE_QUESTIONS]}
    cost = verify_cost(be, workloads["copy"][0], args.k)
    print(f"verify cost, ms by tokens in the step: {cost['decode_ms_by_tokens']}; ceiling at "
          f"full acceptance {cost['ceiling_at_full_acceptance']:.2f}x", flush=True)
    engine.start()
    levels = []
    try:
        for level in args.levels.split(","):
            name, conc = level.split(":")
            c = int(conc)
            # At concurrency c, c requests at a time from the workload's prompts, repeated
            # to keep c busy for a while (at least 2c requests).
            base = workloads[name]
            prompts = (base * (1 + (2 * c) // len(base)))[:max(len(base), 2 * c)]
            engine.speculative_k = 0
            run_round(engine, prompts, c, args.max_tokens)  # warm-up: caches for both
            rounds: dict[str, list[dict]] = {"off": [], "on": []}
            spec = engine.speculation[engine.speculative_kind]
            for i in range(2 * args.rounds):
                mode = "off" if i % 2 == 0 else "on"
                engine.speculative_k = args.k if mode == "on" else 0
                drafted, accepted = spec.drafted, spec.accepted
                r = run_round(engine, prompts, c, args.max_tokens)
                r["drafted"], r["accepted"] = spec.drafted - drafted, spec.accepted - accepted
                rounds[mode].append(r)
                print(f"{name} c={c} {mode}: {r['tokens_per_s']:.1f} tok/s "
                      f"({r['tokens']} tokens, drafted {r['drafted']}, accepted "
                      f"{r['accepted']})", flush=True)
            off = statistics.mean(r["tokens_per_s"] for r in rounds["off"])
            on = statistics.mean(r["tokens_per_s"] for r in rounds["on"])
            drafted = sum(r["drafted"] for r in rounds["on"])
            accepted = sum(r["accepted"] for r in rounds["on"])
            rec = {"workload": name, "concurrency": c, "requests": len(prompts),
                   "off_tokens_per_s": round(off, 2), "on_tokens_per_s": round(on, 2),
                   "ratio": round(on / off, 3),
                   "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
                   "rounds": rounds}
            levels.append(rec)
            print(f"== {name} c={c}: off {off:.1f}, on {on:.1f} tok/s: {on / off:.2f}x",
                  flush=True)
    finally:
        engine.stop()
        be.close()
        if draft is not None:
            draft.backend.close()
            draft.backend.model.close()
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps({
            **bench.environment(), "model": path.name,
            "settings": {**{k: str(v) for k, v in vars(args).items()}, "context_size": context,
                         "n_batch": 512, "prefill_step_ms": 50, "temperature": 0},
            "verify_cost": cost, "levels": levels}, indent=2))
    model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
