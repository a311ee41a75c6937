"""Prefix routing: TTFT and throughput of a multi-tenant workload through `llamafleet router`
vs round-robin over the same replicas, on one machine, in one run.

The workload (the defaults): 3 replicas of `llamafleet serve` (max_batch_size 4, otherwise the
pod's default settings, a prompt cache of about four tenants) on loopback; 12 tenants, each a
~500-token system prompt, with short user turns; 192 streaming requests at concurrency 3,
tenants in a fixed pseudo-random order. (Issue 15's setting was 6 tenants, 96 requests, a
20 MiB cache and --n-batch 64.) Round-robin sends request
i to replica i mod 3 itself (what a plain Service does per connection). Each mode gets its
own tenants' prompts (a salt), so neither starts with the other's prefixes cached. The record
keeps every request's tenant, replica (the router's ``x-llamafleet-backend``), start and TTFT
(``trace``): which requests paid a cold prefill, and on which replica, is the tail's story.

    .venv/bin/python benchmarks/prefix_routing.py    # writes benchmarks/results/prefix-routing-*.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import sys
import time
from pathlib import Path

import httpx
from compare import VENV_BIN, free_port, running
from llamafleet.bench import load as bench
from llamafleet.common.contract import EMBEDDED_MODELS, GEMMA, RouterMetric
from llamafleet.inference.model_packages import embedded_model_path
from llamafleet.router.replicas import replica_id

HERE = Path(__file__).parent
WORDS = ("invoice refund policy customer account billing shipping warranty order support "
         "escalate priority contract renewal discount region tax currency ledger audit "
         "compliance ticket response agent tone concise polite verify identity").split()
# Replicas run behind an API key, as in a cluster; it also lets /info report prefix reuse.
AUTH = {"Authorization": "Bearer prefix-routing-bench"}
QUESTIONS = ["Where is my order?", "Can I get a refund?", "How do I change my plan?",
             "Why was I charged twice?", "What is your warranty?", "Talk to a human, please."]


def system_prompt(tenant: int, salt: str, words: int) -> str:
    rng = random.Random(f"{salt}-{tenant}")
    body = " ".join(rng.choice(WORDS) for _ in range(words))
    return f"You are the support assistant of tenant {tenant} ({salt}). Rules: {body}."


def workload(salt: str, tenants: int, requests: int, words: int,
             seed: int) -> list[tuple[int, list[dict]]]:
    """Each request's tenant and conversation."""
    rng = random.Random(seed)
    systems = [system_prompt(t, salt, words) for t in range(tenants)]
    return [(t, [{"role": "system", "content": systems[t]},
                 {"role": "user", "content": rng.choice(QUESTIONS)}])
            for t in (rng.randrange(tenants) for _ in range(requests))]


async def run_mode(name: str, urls: list[str], model: str, convs: list[tuple[int, list[dict]]],
                   concurrency: int, max_tokens: int) -> dict:
    """Streams every conversation once, ``concurrency`` at a time; request i goes to
    ``urls[i % len(urls)]`` (one URL: the router)."""
    todo = list(enumerate(convs))
    samples: list[bench.Sample] = []
    # Per request, in order sent: [index, tenant, replica, seconds since the start, TTFT].
    trace: list[list] = []
    async with bench.session(concurrency, AUTH) as client:
        async def worker() -> None:
            while todo:
                i, (tenant, messages) = todo.pop(0)
                body = {"model": model, "messages": messages, "max_tokens": max_tokens,
                        "stream": True, "ignore_eos": True, "temperature": 0,
                        "stream_options": {"include_usage": True}}
                sent = time.perf_counter() - t0
                s = await bench._one(client, urls[i % len(urls)], body, 600)
                samples.append(s)
                trace.append([i, tenant, s.backend or replica_id(urls[i % len(urls)]),
                              round(sent, 3), s.ttft_s and round(s.ttft_s, 3)])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    good = [s for s in samples if s.ok]
    ttfts = [s.ttft_s for s in good if s.ttft_s is not None]
    tokens = sum(s.completion_tokens for s in good)
    return {"mode": name, "requests": len(convs), "completed": len(good),
            "failed": len(samples) - len(good), "wall_s": round(wall, 2),
            "requests_per_s": round(len(good) / wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_s": bench._pct(ttfts, 0.5), "ttft_p90_s": bench._pct(ttfts, 0.9),
            "ttft_mean_s": round(sum(ttfts) / len(ttfts), 4) if ttfts else None,
            "errors": sorted({s.error for s in samples if s.error})[:5],
            "ttfts_s": sorted(round(t, 3) for t in ttfts), "trace": sorted(trace)}


def reuse_of(url: str) -> dict[str, int]:
    info = httpx.get(url + "/info", headers=AUTH).json()
    return {k: info[k] for k in ("prefix_tokens_reused", "prompt_cache_restores")}


MODES = ("round-robin", "router")


def modes(text: str) -> list[str]:
    """--modes: names from MODES, comma separated, each once."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    wrong = [m for m in names if m not in MODES]
    if wrong or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(MODES)}, each once; "
                                         f"got {text!r}")
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(EMBEDDED_MODELS), default=GEMMA.name)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--max-batch-size", type=int, default=4)
    ap.add_argument("--context", type=int, default=1024, help="context per sequence")
    ap.add_argument("--threads", type=int, default=1, help="threads per replica")
    ap.add_argument("--n-batch", type=int, default=None,
                    help="each replica's most tokens per step (default: the pod's own, 512; its "
                    "chunked prefill keeps a cold prompt from holding up the other sequences)")
    ap.add_argument("--prefill-step-ms", type=float, default=None,
                    help="each replica's chunked-prefill step target (default: the pod's own)")
    ap.add_argument("--tenants", type=int, default=12)
    ap.add_argument("--words", type=int, default=465, help="system prompt words (~500 tokens)")
    ap.add_argument("--requests", type=int, default=192)
    ap.add_argument("--concurrency", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--swa-full", action="store_true",
                    help="replicas keep every position of sliding-window layers (serve --swa-full)")
    ap.add_argument("--prompt-cache-mib", type=int, default=36,
                    help="each replica's host-RAM prompt cache (0: slots only); 36 MiB holds about "
                    "four tenants' prefixes (9 MiB each): more tenants than one replica holds, "
                    "as in a big fleet")
    ap.add_argument("--seed", type=int, default=15)
    ap.add_argument("--modes", default="round-robin,router", type=modes,
                    help="which to run, in this order: round-robin, router or both, comma "
                    "separated (the ratios need both)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args()

    model = embedded_model_path(a.model)
    a.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    ports = [free_port() for _ in range(a.replicas)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    router_port = free_port()
    router_url = f"http://127.0.0.1:{router_port}"
    with contextlib.ExitStack() as stack:
        for i, (port, url) in enumerate(zip(ports, urls, strict=True)):
            stack.enter_context(running([
                str(VENV_BIN / "llamafleet"), "serve", "--model-path", str(model), "--host",
                "127.0.0.1", "--http-port", str(port), "--grpc-port", "0", "--metrics-port", "0",
                "--context-size", str(a.context), "--max-batch-size", str(a.max_batch_size),
                "--threads", str(a.threads),
                *(["--n-batch", str(a.n_batch)] if a.n_batch else []),
                *(["--prefill-step-ms", str(a.prefill_step_ms)] if a.prefill_step_ms is not None
                  else []),
                "--prompt-cache-mib", str(a.prompt_cache_mib),
                "--api-key", AUTH["Authorization"].removeprefix("Bearer "),
                "--swa-full" if a.swa_full else "--no-swa-full",
                "--log-level", "warning"], url,
                a.out / f"prefix-routing-replica{i}.log", AUTH))
        stack.enter_context(running([
            str(VENV_BIN / "llamafleet"), "router", "--backends", ",".join(urls), "--backend-api-key",
            AUTH["Authorization"].removeprefix("Bearer "), "--host",
            "127.0.0.1", "--port", str(router_port), "--log-level", "warning"], router_url,
            a.out / "prefix-routing-router.log", AUTH))
        model_id = httpx.get(urls[0] + "/v1/models", headers=AUTH).json()["data"][0]["id"]
        probe = workload("probe", 1, 1, a.words, a.seed)[0][1]
        usage = httpx.post(urls[0] + "/v1/chat/completions", timeout=600, headers=AUTH, json={
            "model": model_id, "messages": probe, "max_tokens": 1}).json()["usage"]
        results = []
        for name in a.modes:
            targets = {"round-robin": urls, "router": [router_url]}[name]
            convs = workload(name, a.tenants, a.requests, a.words, a.seed)
            before = [reuse_of(u) for u in urls]
            results.append(asyncio.run(run_mode(name, targets, model_id, convs,
                                                a.concurrency, a.max_tokens)))
            # Per replica: prompt tokens that came from a slot or the prompt cache instead
            # of a prefill, and states restored from the prompt cache, during this mode.
            results[-1]["replicas"] = [{k: after[k] - b[k] for k in after}
                                       for b, after in zip(before, map(reuse_of, urls), strict=True)]
            print(json.dumps({k: v for k, v in results[-1].items()
                              if k not in ("ttfts_s", "trace")}), file=sys.stderr)
        router_metrics = httpx.get(router_url + "/router/metrics").text
    by_mode = {r["mode"]: r for r in results}
    rr, rt = by_mode.get("round-robin", {}), by_mode.get("router", {})
    ratios = {k: round(rt[k] / rr[k], 3) if rr.get(k) and rt.get(k) is not None else None
              for k in ("ttft_p50_s", "ttft_p90_s")}
    hits = [line for line in router_metrics.splitlines()
            if line.startswith(RouterMetric.AFFINITY)]
    record = {"benchmark": "prefix_routing", **bench.environment(), "model": a.model,
              "settings": {k: v for k, v in vars(a).items() if k != "out"},
              "prompt_tokens_per_request": usage["prompt_tokens"], "results": results,
              "router_vs_round_robin": ratios, "router_affinity": hits,
              "acceptance": {"ttft_p50_ratio_max": 0.2, "ttft_p90_ratio_max": 0.3,
                             "met": bool(ratios["ttft_p50_s"] is not None
                                         and ratios["ttft_p50_s"] <= 0.2
                                         and ratios["ttft_p90_s"] is not None
                                         and ratios["ttft_p90_s"] <= 0.3
                                         and not rr["failed"] and not rt["failed"])}}
    path = a.out / f"prefix-routing-{stamp}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"ratios": ratios, "results": [
        {k: r[k] for k in ("mode", "completed", "failed", "ttft_p50_s", "ttft_p90_s",
                           "requests_per_s", "tokens_per_s")} for r in results]}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
