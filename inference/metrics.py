"""Every Prometheus series of the pod, defined once (their names: ``contract.PodMetric``)."""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
from llamafleet.common.contract import MetricLabel as L
from llamafleet.common.contract import PodMetric as M
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)
FEW = 8  # StepHistogram: up to this many values a step are bucketed one by one


class StepHistogram:
    """A histogram that takes a whole engine step's observations in one call.

    prometheus_client's ``Histogram.observe`` takes one value (a lock, a walk over the
    buckets); the engine observes one inter-token gap per sequence per step, and 64 such calls
    cost a tenth of a millisecond per step on the engine thread, more than the rest of its
    bookkeeping. Here a step's values are bucketed with numpy at once; the series it exposes
    are a ``Histogram``'s (``_bucket`` with ``le``, ``_count``, ``_sum``)."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float],
                 registry: CollectorRegistry):
        self.name, self.documentation = name, documentation
        self.bounds = np.array([*buckets, np.inf])
        self._bounds = [*buckets, math.inf]  # for bisect: a few values cost less one by one
        self._counts = np.zeros(len(self.bounds), dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()  # observe (engine thread) against collect (scrapes)
        registry.register(self)

    def observe(self, value: float) -> None:
        self.observe_many((value,))

    def observe_many(self, values: Sequence[float] | np.ndarray) -> None:
        if len(values) <= FEW:  # a step of a few sequences: numpy's calls cost more than this
            if not len(values):
                return
            bounds, counts = self._bounds, self._counts
            with self._lock:
                for x in values:
                    counts[bisect.bisect_left(bounds, x)] += 1  # the first bound >= value: le
                    self._sum += float(x)
            return
        v = np.asarray(values, dtype=np.float64)
        at = np.searchsorted(self.bounds, v, side="left")  # the first bound >= value: le
        counts = np.bincount(at, minlength=len(self.bounds))
        with self._lock:
            self._counts += counts
            self._sum += float(v.sum())

    def describe(self) -> list[HistogramMetricFamily]:
        return [HistogramMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterator[HistogramMetricFamily]:
        with self._lock:
            cumulative, total = np.cumsum(self._counts), self._sum
        yield HistogramMetricFamily(
            self.name, self.documentation, sum_value=total,
            buckets=[(floatToGoString(b), int(c)) for b, c in zip(self.bounds, cumulative,
                                                                    strict=True)])


class LoraRequestsInfo:
    """The Gateway API Inference Extension model-server protocol's LoRA gauge (vLLM's
    ``vllm:lora_requests_info``), read from the engine at every scrape.

    One series: ``running_lora_adapters`` names the adapters of running sequences and
    ``waiting_lora_adapters`` those of queued requests (comma-separated, sorted, no spaces);
    ``max_lora`` is the number of adapters loaded. Every loaded adapter is in memory and ready,
    and the engine runs any number of adapter sets in turn, so the adapters that may run at once
    are the loaded ones; llama.cpp has no adapter slots to configure (vLLM's ``--max-loras``).
    The value is the time the labels last changed (Unix seconds), as the protocol asks: a
    picker takes the series with the latest value, and there is only ever this one. The pod
    loads adapters only when told (start-up, ``POST /v1/adapters``), never on a request."""

    _labelnames = (L.RUNNING_LORA_ADAPTERS, L.WAITING_LORA_ADAPTERS, L.MAX_LORA)
    DOC = ("LoRA adapters of running and of waiting requests, and how many are loaded "
           "(labels); the value is when they last changed (Unix seconds).")

    def __init__(self, registry: CollectorRegistry):
        self._read: Callable[[], tuple[Iterable[str], Iterable[str], int]] = \
            lambda: ((), (), 0)
        self._labels: tuple[str, str, str] | None = None
        self._since = 0.0
        self._lock = threading.Lock()  # concurrent scrapes
        registry.register(self)

    def follow(self, read: Callable[[], tuple[Iterable[str], Iterable[str], int]]) -> None:
        """``read()`` -> (running adapters' names, waiting adapters' names, adapters loaded)."""
        self._read = read

    def describe(self) -> list[GaugeMetricFamily]:
        return [GaugeMetricFamily(M.LORA_REQUESTS_INFO, self.DOC, labels=self._labelnames)]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running, waiting, loaded = self._read()
        labels = (",".join(sorted(set(running))), ",".join(sorted(set(waiting))), str(loaded))
        with self._lock:
            if labels != self._labels:
                self._labels, self._since = labels, time.time()
            since = self._since
        family = GaugeMetricFamily(M.LORA_REQUESTS_INFO, self.DOC, labels=self._labelnames)
        family.add_metric(labels, since)
        yield family


class PrefixCache:
    """The prefix cache's figures, read from the engine at every scrape: the tokens its slots
    and prompt cache saved, and the host-RAM prompt cache's bytes, limit, entries, restores
    and evictions (all 0 when the pod has none: its limit says so)."""

    REUSED = "Prompt tokens taken from the prefix cache instead of being decoded again."
    PRIVATE = frozenset(m.removesuffix("_total") for m in (
        M.PREFIX_TOKENS_REUSED, M.PROMPT_CACHE_BYTES, M.PROMPT_CACHE_LIMIT_BYTES,
        M.PROMPT_CACHE_ENTRIES, M.PROMPT_CACHE_RESTORES, M.PROMPT_CACHE_EVICTIONS))

    def __init__(self, registry: CollectorRegistry):
        self._engine: Any = None
        registry.register(self)

    def follow(self, engine: Any) -> None:
        """``engine``: its ``prefix_tokens_reused``, ``prompt_cache_restores`` and
        ``prompt_cache`` (None without one): snapshots that any thread may take."""
        self._engine = engine

    def describe(self) -> list[Any]:
        return list(self.collect())

    def collect(self) -> Iterator[Any]:
        engine = self._engine
        cache = engine.prompt_cache if engine else None
        yield CounterMetricFamily(M.PREFIX_TOKENS_REUSED, self.REUSED,
                                  value=engine.prefix_tokens_reused if engine else 0)
        yield GaugeMetricFamily(M.PROMPT_CACHE_BYTES, "Bytes of KV state the host-RAM prompt "
                                "cache holds.", value=cache.bytes if cache else 0)
        yield GaugeMetricFamily(M.PROMPT_CACHE_LIMIT_BYTES, "The host-RAM prompt cache's "
                                "limit (--prompt-cache-mib; 0: none).",
                                value=cache.limit_bytes if cache else 0)
        yield GaugeMetricFamily(M.PROMPT_CACHE_ENTRIES, "Prompt states the host-RAM prompt "
                                "cache holds.", value=len(cache) if cache else 0)
        yield CounterMetricFamily(M.PROMPT_CACHE_RESTORES, "Prompt states copied back from "
                                  "host RAM into a slot instead of a prefill.",
                                  value=engine.prompt_cache_restores if engine else 0)
        yield CounterMetricFamily(M.PROMPT_CACHE_EVICTIONS, "Prompt states pushed out of the "
                                  "host-RAM prompt cache to make room (least recently used).",
                                  value=cache.evictions if cache else 0)


class Speculation:
    """Speculative decoding's counters by kind of draft, read from the engine at every scrape
    (its ``speculation``: kind -> drafted and accepted tokens)."""

    def __init__(self, registry: CollectorRegistry):
        self._read: Callable[[], dict[str, Any]] = dict
        registry.register(self)

    def follow(self, read: Callable[[], dict[str, Any]]) -> None:
        self._read = read

    def _families(self) -> tuple[CounterMetricFamily, CounterMetricFamily, GaugeMetricFamily]:
        return (
            CounterMetricFamily(M.SPECULATIVE_DRAFT_TOKENS, "Draft tokens verified "
                                "(speculative decoding), by kind of draft.", labels=[L.KIND]),
            CounterMetricFamily(M.SPECULATIVE_ACCEPTED_TOKENS, "Draft tokens accepted "
                                "(speculative decoding), by kind of draft.", labels=[L.KIND]),
            GaugeMetricFamily(M.SPECULATIVE_ACCEPTANCE, "Draft tokens accepted over those "
                              "verified since start-up, by kind of draft.", labels=[L.KIND]))

    def describe(self) -> tuple[CounterMetricFamily, CounterMetricFamily, GaugeMetricFamily]:
        return self._families()

    def collect(self) -> Iterator[Any]:
        drafted, accepted, rate = self._families()
        for kind, stats in self._read().items():
            drafted.add_metric([kind], stats.drafted)
            accepted.add_metric([kind], stats.accepted)
            rate.add_metric([kind], stats.accepted / stats.drafted if stats.drafted else 0.0)
        yield from (drafted, accepted, rate)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            M.REQUESTS, "Finished requests.", [L.API, L.OUTCOME, L.FINISH_REASON],
            registry=r)
        self.prompt_tokens = Counter(
            M.PROMPT_TOKENS, "Prompt tokens processed.", registry=r)
        self.completion_tokens = Counter(
            M.COMPLETION_TOKENS, "Tokens generated.", registry=r)
        self.ttft = StepHistogram(
            M.TIME_TO_FIRST_TOKEN, "Submit to first token.",
            LATENCY_BUCKETS, r)
        self.itl = StepHistogram(
            M.INTER_TOKEN_LATENCY, "Gap between tokens of one sequence.",
            TOKEN_GAP_BUCKETS, r)
        self.e2e = Histogram(
            M.REQUEST_DURATION, "Submit to last token.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            M.QUEUE_WAIT, "Time waiting for a free sequence.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.batch_occupancy = Histogram(
            M.BATCH_OCCUPANCY, "Sequences decoded together in one step.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256), registry=r)
        self.steps = Counter(M.ENGINE_STEPS, "llama_decode calls.", registry=r)
        # The load gauges (running, queued, KV cells used, utilisation) are read from the
        # engine when scraped (follow()), not set by steps: an idle engine takes no step, and
        # routers and autoscalers must then read 0, not the last busy step's values.
        self.running = Gauge(M.RUNNING, "Sequences in the batch.", registry=r)
        self.queued = Gauge(M.QUEUE_DEPTH, "Requests waiting.", registry=r)
        self.kv_used = Gauge(
            M.KV_CACHE_CELLS_USED, "KV cells holding the tokens of running sequences "
            "(prefixes kept in free slots for reuse are not counted: any request takes them).",
            registry=r)
        self.kv_total = Gauge(M.KV_CACHE_CELLS_TOTAL, "KV cells in the context.", registry=r)
        # The Gateway API Inference Extension's model-server protocol reads waiting
        # (llamafleet_queue_depth), running (llamafleet_running_sequences) and this.
        self.kv_utilization = Gauge(
            M.KV_CACHE_UTILIZATION,
            "KV cells holding running sequences' tokens over the cells planned for the "
            "context (0..1).", registry=r)
        self.max_batch = Gauge(M.MAX_BATCH_SIZE, "Sequences that may run at once.",
                               registry=r)
        self.model = Info(M.MODEL, "The served model.", registry=r)
        self.step_part_seconds = Counter(
            M.ENGINE_STEP_SECONDS,
            "Engine thread time by part of a step (only with STEP_PROFILE on): batch, decode, "
            "sample, text, deliver, admit, other.", [L.PART], registry=r)
        self.lora = LoraRequestsInfo(r)
        self.ready = Gauge(M.READY, "1 while the pod answers /ready (engine alive, not "
                           "draining), else 0.", registry=r)
        self.prefix_cache = PrefixCache(r)
        self.speculation = Speculation(r)
        # Per tenant (common.tenants): configured names, "-" (none) or "_unknown".
        self.tenant_requests = Counter(
            M.TENANT_REQUESTS, "Requests admitted, by tenant.", [L.TENANT], registry=r)
        self.tenant_tokens = Counter(
            M.TENANT_TOKENS, "Tokens charged to each tenant (kind: prompt, completion).",
            [L.TENANT, L.KIND], registry=r)
        self.tenant_rejected = Counter(
            M.TENANT_REJECTED, "Requests refused with 429 by a tenant's limit (reason: "
            "requests_per_second, tokens_per_minute, concurrent_requests).",
            [L.TENANT, L.REASON], registry=r)
        self.tenant_queue_wait = Histogram(
            M.TENANT_QUEUE_WAIT, "Time waiting for a free sequence, by tenant.", [L.TENANT],
            buckets=LATENCY_BUCKETS, registry=r)

    @property
    def public(self) -> Any:
        """The registry without what tells one user about another's prompts (the prefix
        cache's savings and what it holds): what an HTTP /metrics without an API key shows."""
        registry, private = self.registry, PrefixCache.PRIVATE

        class Public:
            def collect(self) -> Iterator[Any]:
                return (f for f in registry.collect() if f.name not in private)

        return Public()

    def follow(self, engine: Any, kv_total: int) -> None:
        """Read the load gauges from ``engine`` at every scrape (its ``running``, ``queued``
        and ``kv_cells_used``: snapshots that any thread may take)."""
        self.kv_total.set(kv_total)
        self.running.set_function(lambda: engine.running)
        self.queued.set_function(lambda: engine.queued)
        self.kv_used.set_function(lambda: engine.kv_cells_used)
        self.kv_utilization.set_function(
            lambda: min(1.0, engine.kv_cells_used / kv_total) if kv_total else 0.0)
        self.prefix_cache.follow(engine)
        self.speculation.follow(lambda: engine.speculation)

    def follow_adapters(self, engine: Any, adapters: Any) -> None:
        """Read the LoRA gauge from ``engine`` (its ``adapter_sets()``: sets of adapters with
        a ``name``) and ``adapters`` (the registry: ``all()``) at every scrape."""

        def read() -> tuple[list[str], list[str], int]:
            running, waiting = engine.adapter_sets()
            return ([a.name for s in running for a in s], [a.name for s in waiting for a in s],
                    len(adapters.all()))

        self.lora.follow(read)


class EngineMetrics:
    """Adapts engine hooks (engine thread) to the Prometheus series."""

    def __init__(self, metrics: Metrics):
        self.m = metrics
        self._last_token: dict[int, float] = {}

    def on_step(self, running: int, batch_tokens: int, queued: int, kv_tokens: int) -> None:
        self.m.steps.inc()
        self.m.batch_occupancy.observe(running)

    def on_tokens(self, first, later) -> None:
        now = time.monotonic()
        last_token = self._last_token
        if first:
            self.m.ttft.observe_many([now - req.enqueued_at for req in first])
            for req in first:
                last_token[id(req)] = now
        if later:
            gaps = []
            for req in later:
                last = last_token.get(id(req))
                if last is not None:
                    gaps.append(now - last)
                last_token[id(req)] = now
            self.m.itl.observe_many(gaps)

    def on_finish(self, req, prompt_tokens: int, completion_tokens: int) -> None:
        # Counted here, when the engine lets the request go, not when its answer is
        # written: a client that left mid-stream still counts what was decoded for it.
        self._last_token.pop(id(req), None)
        self.m.prompt_tokens.inc(prompt_tokens)
        self.m.completion_tokens.inc(completion_tokens)
