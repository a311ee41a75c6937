"""Tenant fairness: does one tenant's flood starve another's requests?

One `llamafleet serve` (the default embedded model, `--max-batch-size 4`) behind `llamafleet
router`, both with one tenants file: tenant A and tenant B, equal priority, no limits. First
B alone sends one streaming request at a time (its TTFT alone); then A keeps 12 streams open
(each loop sends its next request as soon as the last one ends) while B again sends one at a
time (``--rounds N``: N such pairs, each phase's samples pooled). The figure: B's TTFT p50
under A's flood over B's TTFT p50 alone. The engine shares
its slots among tenants of equal priority, and with `--router-queue N` the router holds
requests beyond each replica's slots plus N and serves its hold queue tenant by tenant.

    .venv/bin/python benchmarks/tenant_fairness.py --rounds 3
    # writes benchmarks/results/tenant-fairness-*.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
from compare import VENV_BIN, free_port, running
from llamafleet.bench import load as bench
from llamafleet.common.contract import DEFAULT_EMBEDDED_MODEL, EMBEDDED_MODELS, PodMetric, RouterMetric

HERE = Path(__file__).parent
POD_KEY = "tenant-fairness-pod"
KEYS = {"A": "tenant-fairness-a", "B": "tenant-fairness-b"}
TENANTS = f"""keys:
  - {{key: {KEYS['A']}, tenant: tenant-a}}
  - {{key: {KEYS['B']}, tenant: tenant-b}}
"""
QUESTIONS = ["Tell me about the sea.", "Write a short poem about trees.",
             "Describe a busy market.", "Explain how bread is made."]


def p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 4) if values else None


def summary(samples: list[bench.Sample]) -> dict:
    good = [s for s in samples if s.ok]
    ttfts = [s.ttft_s for s in good if s.ttft_s is not None]
    return {"requests": len(samples), "completed": len(good), "failed": len(samples) - len(good),
            "errors": sorted({s.error for s in samples if s.error})[:5],
            "ttft_p50_s": p50(ttfts),
            "ttft_p90_s": round(sorted(ttfts)[int(0.9 * (len(ttfts) - 1))], 4) if ttfts else None,
            "ttfts_s": [round(t, 4) for t in ttfts],
            "completion_tokens": sum(s.completion_tokens for s in good)}


def waits(text: str, series: str) -> list[str]:
    """The per-tenant queue wait's sums and counts in a /metrics text."""
    return [line for line in text.splitlines() if line.startswith((series + "_sum", series + "_count"))]


def body(model: str, i: int, max_tokens: int) -> dict:
    return {"model": model, "max_tokens": max_tokens, "stream": True, "ignore_eos": True,
            "temperature": 0, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]}


async def sequential(url: str, key: str, model: str, n: int, max_tokens: int) -> list[bench.Sample]:
    """One request at a time (the next as soon as the last ends)."""
    out = []
    async with bench.session(1, {"Authorization": f"Bearer {key}"}) as client:
        for i in range(n):
            out.append(await bench._one(client, url, body(model, i, max_tokens), 600))
    return out


async def flood(url: str, key: str, model: str, streams: int, max_tokens: int,
                stop: asyncio.Event) -> list[bench.Sample]:
    """``streams`` loops, each sending its next request as soon as the last ends, until
    ``stop``; the requests in flight then finish."""
    out: list[bench.Sample] = []
    async with bench.session(streams, {"Authorization": f"Bearer {key}"}) as client:
        async def loop(j: int) -> None:
            i = j
            while not stop.is_set():
                out.append(await bench._one(client, url, body(model, i, max_tokens), 600))
                i += streams

        await asyncio.gather(*(loop(j) for j in range(streams)))
    return out


async def measure(url: str, model: str, a: argparse.Namespace) -> dict:
    """``a.rounds`` times: B alone, then B under A's flood. The p50s pool every round's
    samples of a phase, so a slow spell of the machine weighs on both phases alike."""
    alone: list[bench.Sample] = []
    under: list[bench.Sample] = []
    a_samples: list[bench.Sample] = []
    ratios, b_wall = [], 0.0
    for _ in range(a.rounds):
        alone_round = await sequential(url, KEYS["B"], model, a.b_requests, a.b_max_tokens)
        stop = asyncio.Event()
        flooding = asyncio.ensure_future(
            flood(url, KEYS["A"], model, a.a_streams, a.a_max_tokens, stop))
        # Let the flood fill the pod (every slot and the queue) before B starts.
        await asyncio.sleep(a.warmup_s)
        t0 = time.perf_counter()
        under_round = await sequential(url, KEYS["B"], model, a.b_requests, a.b_max_tokens)
        b_wall += time.perf_counter() - t0
        stop.set()
        a_samples += await flooding
        ratio = [summary(r)["ttft_p50_s"] for r in (under_round, alone_round)]
        ratios.append(round(ratio[0] / ratio[1], 3) if all(ratio) else None)
        alone += alone_round
        under += under_round
    return {"b_alone": summary(alone), "b_under_flood": summary(under),
            "b_ttft_p50_ratio_by_round": ratios,
            "b_under_flood_wall_s": round(b_wall, 2), "a_flood": {
                k: v for k, v in summary(a_samples).items() if k != "ttfts_s"}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=list(EMBEDDED_MODELS), default=DEFAULT_EMBEDDED_MODEL)
    ap.add_argument("--max-batch-size", type=int, default=4)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--a-streams", type=int, default=12, help="tenant A's streams kept open")
    ap.add_argument("--a-max-tokens", type=int, default=64)
    ap.add_argument("--b-requests", type=int, default=12, help="tenant B's requests, each phase")
    ap.add_argument("--b-max-tokens", type=int, default=16)
    ap.add_argument("--warmup-s", type=float, default=3.0,
                    help="A's flood runs this long before B starts")
    ap.add_argument("--router-queue", type=int, default=None,
                    help="router --max-queued-per-replica (unset: the router sends at once and "
                    "the engine's queue orders the requests)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="alone-then-flood rounds; the p50s pool all rounds")
    ap.add_argument("--pod-log-level", default="warning",
                    help="info logs each request's TTFT at the pod (in the pod's log)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    a = ap.parse_args()

    a.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    tenants = a.out / f"tenant-fairness-{stamp}.tenants.yaml"
    tenants.write_text(TENANTS)
    port, router_port = free_port(), free_port()
    pod_url, router_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{router_port}"
    admin = {"Authorization": f"Bearer {POD_KEY}"}
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(running([
                str(VENV_BIN / "llamafleet"), "serve", "--embedded-model", a.model,
                "--host", "127.0.0.1", "--http-port", str(port), "--grpc-port", "0",
                "--metrics-port", "0", "--context-size", str(a.context),
                "--max-batch-size", str(a.max_batch_size), "--threads", str(a.threads),
                "--api-key", POD_KEY, "--tenants-file", str(tenants), "--log-level", a.pod_log_level,
                "--log-format", "json"],
                pod_url, a.out / "tenant-fairness-pod.log", admin))
            stack.enter_context(running([
                str(VENV_BIN / "llamafleet"), "router", "--backends", pod_url,
                "--backend-api-key", POD_KEY, "--tenants-file", str(tenants),
                *(["--max-queued-per-replica", str(a.router_queue)]
                  if a.router_queue is not None else []),
                "--host", "127.0.0.1", "--port", str(router_port), "--log-level", "warning"],
                router_url, a.out / "tenant-fairness-router.log", admin))
            model_id = httpx.get(pod_url + "/v1/models", headers=admin).json()["data"][0]["id"]
            # One unmeasured request warms the pod.
            asyncio.run(sequential(router_url, KEYS["B"], model_id, 1, a.b_max_tokens))
            result = asyncio.run(measure(router_url, model_id, a))
            pod_metrics = waits(httpx.get(pod_url + "/metrics", headers=admin).text,
                                PodMetric.TENANT_QUEUE_WAIT)
            router_metrics = waits(httpx.get(router_url + "/router/metrics").text,
                                   RouterMetric.TENANT_QUEUE_WAIT)
    finally:
        tenants.unlink(missing_ok=True)
    alone, under = result["b_alone"]["ttft_p50_s"], result["b_under_flood"]["ttft_p50_s"]
    record = {"benchmark": "tenant_fairness", **bench.environment(), "model": a.model,
              "settings": {k: v for k, v in vars(a).items() if k != "out"}, **result,
              "b_ttft_p50_ratio": round(under / alone, 3) if alone and under else None,
              "queue_wait_by_tenant": {"pod": pod_metrics, "router": router_metrics}}
    path = a.out / f"tenant-fairness-{stamp}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"b_ttft_p50_alone_s": alone, "b_ttft_p50_under_flood_s": under,
                      "ratio": record["b_ttft_p50_ratio"],
                      "ratio_by_round": result["b_ttft_p50_ratio_by_round"],
                      "b_failed": result["b_under_flood"]["failed"],
                      "a_completed": result["a_flood"]["completed"]}, indent=1), file=sys.stderr)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
