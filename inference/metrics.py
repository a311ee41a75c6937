"""Every Prometheus series of the pod, defined once (prefix ``llamafleet_``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5)


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
        self._counts = np.zeros(len(self.bounds), dtype=np.int64)
        self._sum = 0.0
        self._lock = threading.Lock()  # observe (engine thread) against collect (scrapes)
        registry.register(self)

    def observe(self, value: float) -> None:
        self.observe_many((value,))

    def observe_many(self, values: Sequence[float] | np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64)
        if not v.size:
            return
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


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            "llamafleet_requests_total", "Finished requests.", ["api", "outcome", "finish_reason"],
            registry=r)
        self.prompt_tokens = Counter(
            "llamafleet_prompt_tokens_total", "Prompt tokens processed.", registry=r)
        self.completion_tokens = Counter(
            "llamafleet_completion_tokens_total", "Tokens generated.", registry=r)
        self.ttft = StepHistogram(
            "llamafleet_time_to_first_token_seconds", "Submit to first token.",
            LATENCY_BUCKETS, r)
        self.itl = StepHistogram(
            "llamafleet_inter_token_latency_seconds", "Gap between tokens of one sequence.",
            TOKEN_GAP_BUCKETS, r)
        self.e2e = Histogram(
            "llamafleet_request_duration_seconds", "Submit to last token.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "llamafleet_queue_wait_seconds", "Time waiting for a free sequence.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.batch_occupancy = Histogram(
            "llamafleet_batch_occupancy", "Sequences decoded together in one step.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256), registry=r)
        self.steps = Counter("llamafleet_engine_steps_total", "llama_decode calls.", registry=r)
        # The load gauges (running, queued, KV cells used, utilisation) are read from the
        # engine when scraped (follow()), not set by steps: an idle engine takes no step, and
        # routers and autoscalers must then read 0, not the last busy step's values.
        self.running = Gauge("llamafleet_running_sequences", "Sequences in the batch.", registry=r)
        self.queued = Gauge("llamafleet_queue_depth", "Requests waiting.", registry=r)
        self.kv_used = Gauge(
            "llamafleet_kv_cache_cells_used", "KV cells holding the tokens of running sequences "
            "(prefixes kept in free slots for reuse are not counted: any request takes them).",
            registry=r)
        self.kv_total = Gauge("llamafleet_kv_cache_cells_total", "KV cells in the context.", registry=r)
        # The Gateway API Inference Extension's model-server protocol reads waiting
        # (llamafleet_queue_depth), running (llamafleet_running_sequences) and this.
        self.kv_utilization = Gauge(
            "llamafleet_kv_cache_utilization",
            "KV cells holding running sequences' tokens over the cells planned for the "
            "context (0..1).", registry=r)
        self.max_batch = Gauge("llamafleet_max_batch_size", "Sequences that may run at once.",
                               registry=r)
        self.model = Info("llamafleet_model", "The served model.", registry=r)
        self.step_part_seconds = Counter(
            "llamafleet_engine_step_seconds_total",
            "Engine thread time by part of a step (only with STEP_PROFILE on): batch, decode, "
            "sample, text, deliver, admit, other.", ["part"], registry=r)


    def follow(self, engine: Any, kv_total: int) -> None:
        """Read the load gauges from ``engine`` at every scrape (its ``running``, ``queued``
        and ``kv_cells_used``: snapshots that any thread may take)."""
        self.kv_total.set(kv_total)
        self.running.set_function(lambda: engine.running)
        self.queued.set_function(lambda: engine.queued)
        self.kv_used.set_function(lambda: engine.kv_cells_used)
        self.kv_utilization.set_function(
            lambda: min(1.0, engine.kv_cells_used / kv_total) if kv_total else 0.0)


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
