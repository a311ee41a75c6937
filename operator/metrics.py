"""Every Prometheus series of the operator, defined once (their names: ``contract.OperatorMetric``),
and what the kopf handlers tell them.

The handlers stay thin: :meth:`OperatorMetrics.reconcile` and :meth:`OperatorMetrics.autoscale`
wrap a round and read what it wrote into kopf's status patch (the conditions,
status.autoscaling), so neither the reconcile nor the autoscaler knows about metrics.
:func:`serve` exposes them on the operator's own /metrics (``OPERATOR_METRICS_PORT``).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import kopf
from llamafleet.common.contract import MetricLabel as L
from llamafleet.common.contract import OperatorMetric as M
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

RECONCILE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# A pod's start: scheduling, image pull, model download and load (seconds to many minutes),
# as the router's llamafleet_router_cold_start_seconds.
COLD_START_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)
OBJECT = (L.NAMESPACE, L.LLMSERVICE)


def outcome_of(error: BaseException | None) -> str:
    """ok; retry (kopf.TemporaryError: the spec is fine, the world is not yet); invalid
    (kopf.PermanentError: the spec is wrong); error (anything else: kopf retries it)."""
    if error is None:
        return "ok"
    if isinstance(error, kopf.TemporaryError):
        return "retry"
    if isinstance(error, kopf.PermanentError):
        return "invalid"
    return "error"


def direction(desired: Any, current: Any) -> str:
    """up, down or steady: the autoscaler's decision against the replicas it found."""
    try:
        d, c = int(desired), int(current)
    except (TypeError, ValueError):
        return "steady"
    return "up" if d > c else "down" if d < c else "steady"


def _status(patch: Mapping[str, Any]) -> Mapping[str, Any]:
    return patch.get("status") or {}


class _Sweep:
    """Registered first: drops stale series before each scrape reads the others."""

    def __init__(self, metrics: OperatorMetrics):
        self.metrics = metrics

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        self.metrics.sweep()
        return []


class OperatorMetrics:
    """``conditions_ttl``/``autoscaler_ttl``: seconds after which an LLMService's conditions
    and autoscaler gauges go when no round has refreshed them (it was deleted, or left
    builtin scaling), so no dashboard or alert reads a fleet that is gone. None keeps them."""

    def __init__(self, registry: CollectorRegistry | None = None,
                 conditions_ttl: float | None = None, autoscaler_ttl: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        r = self.registry = registry or CollectorRegistry()
        r.register(_Sweep(self))
        self.conditions_ttl, self.autoscaler_ttl, self._clock = conditions_ttl, autoscaler_ttl, clock
        self._conditions_seen: dict[tuple[str, str], float] = {}
        self._autoscaler_seen: dict[tuple[str, str], float] = {}
        self.reconciles = Counter(
            M.RECONCILES, "Reconciles of an LLMService by outcome: ok, retry (waits for the "
            "world: a node, an API, a conflict), invalid (the spec is wrong), error (unexpected; "
            "kopf retries).", [*OBJECT, L.OUTCOME], registry=r)
        self.reconcile_duration = Histogram(
            M.RECONCILE_DURATION, "Time of one reconcile (every LLMService).",
            buckets=RECONCILE_BUCKETS, registry=r)
        self.condition = Gauge(
            M.CONDITION, "1 for each condition an LLMService has now (type, status, reason).",
            [*OBJECT, L.TYPE, L.STATUS, L.REASON], registry=r)
        self.load = Gauge(M.AUTOSCALER_LOAD, "The builtin autoscaler's last reading of the "
                          "load: in-flight requests of the ready pods plus those the router "
                          "holds.", OBJECT, registry=r)
        self.average_load = Gauge(M.AUTOSCALER_AVERAGE_LOAD, "The load's moving average "
                                  "(averageWindow) that the decision reads.", OBJECT, registry=r)
        self.held = Gauge(M.AUTOSCALER_HELD_REQUESTS, "Requests the routers held at the last "
                          "reading.", OBJECT, registry=r)
        self.ready_pods = Gauge(M.AUTOSCALER_READY_PODS, "Ready pods at the last reading.",
                                OBJECT, registry=r)
        self.desired = Gauge(M.AUTOSCALER_DESIRED_REPLICAS, "Replicas the autoscaler decided "
                             "(spec.replicas once written).", OBJECT, registry=r)
        self.max_replicas = Gauge(M.AUTOSCALER_MAX_REPLICAS, "spec.scaling.maxReplicas.",
                                  OBJECT, registry=r)
        self.decisions = Counter(M.AUTOSCALER_DECISIONS, "Autoscaler rounds by direction: up, "
                                 "down, steady.", [*OBJECT, L.DIRECTION], registry=r)
        self.cold_start = Histogram(
            M.COLD_START, "From a scale-up from zero until the LLMService's first pod was Ready.",
            OBJECT, buckets=COLD_START_BUCKETS, registry=r)
        self._conditions: dict[tuple[str, str], set[tuple[str, str, str]]] = {}
        self._lock = threading.Lock()  # kopf runs sync handlers in a thread pool

    @contextlib.contextmanager
    def reconcile(self, body: Mapping[str, Any], patch: Mapping[str, Any]) -> Iterator[None]:
        """Around one reconcile: count it, time it, and take the conditions it wrote."""
        key = _key(body)
        start, error = time.perf_counter(), None
        try:
            yield
        except BaseException as e:
            error = e
            raise
        finally:
            self.reconcile_duration.observe(time.perf_counter() - start)
            self.reconciles.labels(*key, outcome_of(error)).inc()
            conditions = _status(patch).get("conditions")
            if isinstance(conditions, list):
                self.set_conditions(key, conditions)

    def set_conditions(self, key: tuple[str, str], conditions: list[Mapping[str, Any]]) -> None:
        now = {(str(c.get("type")), str(c.get("status")), str(c.get("reason") or ""))
               for c in conditions if isinstance(c, Mapping) and c.get("type")}
        with self._lock:
            for gone in self._conditions.get(key, set()) - now:
                with contextlib.suppress(KeyError):
                    self.condition.remove(*key, *gone)
            for labels in now:
                self.condition.labels(*key, *labels).set(1)
            self._conditions[key] = now
            self._conditions_seen[key] = self._clock()

    @contextlib.contextmanager
    def autoscale(self, body: Mapping[str, Any], patch: Mapping[str, Any]) -> Iterator[None]:
        """Around one builtin autoscaler round: its inputs and decision from the
        status.autoscaling it wrote."""
        yield
        found = _status(patch).get("autoscaling")
        if not isinstance(found, Mapping):
            return
        key = _key(body)
        spec = body.get("spec") or {}
        before = (body.get("status") or {}).get("autoscaling") or {}
        for gauge, field in ((self.load, "observedLoad"), (self.average_load, "averageLoad"),
                             (self.held, "heldRequests"), (self.ready_pods, "readyPods"),
                             (self.desired, "desiredReplicas")):
            value = found.get(field)
            gauge.labels(*key).set(float(value) if isinstance(value, (int, float)) else 0.0)
        maximum = (spec.get("scaling") or {}).get("maxReplicas")
        if isinstance(maximum, int):
            self.max_replicas.labels(*key).set(maximum)
        self.decisions.labels(*key, direction(found.get("desiredReplicas"),
                                              spec.get("replicas"))).inc()
        cold = found.get("coldStartSeconds")
        if isinstance(cold, (int, float)) and cold != before.get("coldStartSeconds"):
            self.cold_start.labels(*key).observe(cold)
        with self._lock:
            self._autoscaler_seen[key] = self._clock()

    def sweep(self) -> None:
        """Drop the series of LLMServices that no round refreshed within their TTL."""
        now = self._clock()
        gauges = (self.load, self.average_load, self.held, self.ready_pods, self.desired,
                  self.max_replicas)
        with self._lock:
            for seen, ttl in ((self._conditions_seen, self.conditions_ttl),
                              (self._autoscaler_seen, self.autoscaler_ttl)):
                if ttl is None:
                    continue
                for key in [k for k, t in seen.items() if now - t > ttl]:
                    del seen[key]
                    if seen is self._conditions_seen:
                        for labels in self._conditions.pop(key, set()):
                            with contextlib.suppress(KeyError):
                                self.condition.remove(*key, *labels)
                    else:
                        for gauge in gauges:
                            with contextlib.suppress(KeyError):
                                gauge.remove(*key)


def _key(body: Mapping[str, Any]) -> tuple[str, str]:
    meta = body.get("metadata") or {}
    return str(meta.get("namespace", "")), str(meta.get("name", ""))


def serve(metrics: OperatorMetrics, port: int, host: str) -> Any:
    """/metrics on ``host:port`` in a thread; None (with a warning) when the port is taken or
    0: metrics are never a reason for the operator not to run."""
    if not port:
        return None
    try:
        server, _ = start_http_server(port, host, metrics.registry)
    except OSError as e:
        log.warning("operator metrics not served on %s:%s: %s", host, port, e)
        return None
    log.info("operator metrics on http://%s:%s/metrics", host, port)
    return server
