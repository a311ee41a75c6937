"""The pod's readiness gauge and its prefix cache's series on /metrics, over the scripted pod
(the real Serving, Engine and app; no llama.cpp): the prefix cache's are shown on the HTTP port
only behind an API key, as /info's prefix_tokens_reused is."""

from __future__ import annotations

from llamafleet.common.contract import PodMetric
from llamafleet.inference.prompt_cache import PromptCache
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.scripted import ScriptedPod


def samples(text: str) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


async def test_ready_follows_the_pod_and_reuse_needs_the_key() -> None:
    pod = ScriptedPod(["a", "b"])
    pod.serving.metrics.follow(pod.engine, 8192)  # as serving.build() does
    try:
        async with pod.client() as h:
            found = samples((await h.get("/metrics")).text)
            assert found[PodMetric.READY] == 1.0
            assert PodMetric.PREFIX_TOKENS_REUSED not in found  # no key: anyone may read it
            pod.serving.draining = True  # SIGTERM: /ready fails, so does the gauge
            assert (await h.get("/ready")).status_code == 503
            assert samples((await h.get("/metrics")).text)[PodMetric.READY] == 0.0
        # The metrics port serves the whole registry (a NetworkPolicy admits only Prometheus).
        pod.engine.cache.prefix_tokens_reused = 7
        full = samples(generate_latest(pod.serving.metrics.registry).decode())
        assert full[PodMetric.PREFIX_TOKENS_REUSED] == 7
        assert full[PodMetric.PROMPT_CACHE_LIMIT_BYTES] == 0  # this pod has no prompt cache
    finally:
        pod.close()


async def test_the_prompt_cache_shows_what_it_holds_restores_and_evicts() -> None:
    pod = ScriptedPod(["a"])
    pod.serving.metrics.follow(pod.engine, 8192)
    cache = pod.engine.cache.prompt_cache = PromptCache(limit_bytes=25, min_tokens=2)
    try:
        for prompt in ([1, 2, 3], [4, 5, 6], [7, 8, 9]):  # 10 bytes each: the first goes
            cache.put(prompt, b"s" * 10)
        pod.engine.cache.prompt_cache_restores = 4
        full = samples(generate_latest(pod.serving.metrics.registry).decode())
        assert (full[PodMetric.PROMPT_CACHE_BYTES], full[PodMetric.PROMPT_CACHE_LIMIT_BYTES],
                full[PodMetric.PROMPT_CACHE_ENTRIES], full[PodMetric.PROMPT_CACHE_RESTORES],
                full[PodMetric.PROMPT_CACHE_EVICTIONS]) == (20, 25, 2, 4, 1)
        async with pod.client() as h:  # no key: none of it
            shown = samples((await h.get("/metrics")).text)
        assert not {k for k in shown if k.startswith("llamafleet_prompt_cache")}
    finally:
        pod.close()
    guarded = ScriptedPod(["a"], api_key="s3cret")
    try:
        async with guarded.client(Authorization="Bearer s3cret") as h:
            assert PodMetric.PREFIX_TOKENS_REUSED in samples((await h.get("/metrics")).text)
        async with guarded.client() as h:
            assert (await h.get("/metrics")).status_code == 401
    finally:
        guarded.close()
