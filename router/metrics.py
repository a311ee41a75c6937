"""Every Prometheus series of the router, defined once (their names: ``contract.RouterMetric``)."""

from __future__ import annotations

from llamafleet.common.contract import MetricLabel as L
from llamafleet.common.contract import RouterMetric as M
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# A pod's start: scheduling, image pull, model download and load (seconds to many minutes).
COLD_START_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1200)


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry or CollectorRegistry()
        self.requests = Counter(
            M.REQUESTS,
            "Proxied attempts by backend (its replica id, as in x-llamafleet-backend) and "
            "outcome (ok, error = a 4xx/5xx answered, retried = connect error, dropped "
            "connection, replica given up by its poller, or 503, before any byte; broken = "
            "failed after streaming began, cancelled = the client left).",
            [L.BACKEND, L.OUTCOME], registry=r)
        self.refused = Counter(
            M.REFUSED,
            "Requests the router answered itself (queue_full = 429, hold_timeout = 503, "
            "replica_failed = 502 once the replicas it tried failed and no other was ready, "
            "buffer_full = 503 before the body was read, client_left = the client left while "
            "held).",
            [L.REASON], registry=r)
        self.affinity = Counter(
            M.AFFINITY,
            "Replica choices: hit = the replica that last served the longest matching prefix; "
            "miss = placed by the hash ring or by load.", [L.RESULT], registry=r)
        self.held = Gauge(M.HOLD_QUEUE_DEPTH,
                          "Requests waiting for a ready replica.", registry=r)
        self.in_flight = Gauge(M.IN_FLIGHT,
                               "Requests proxied now, by backend (replica id).",
                               [L.BACKEND], registry=r)
        self.ready = Gauge(M.BACKENDS_READY, "Replicas ready.", registry=r)
        self.ttft = Histogram(
            M.TIME_TO_FIRST_TOKEN,
            "Arrival at the router to the first byte of the answer's body (the first token "
            "when streaming), holding and retries included.", buckets=TTFT_BUCKETS, registry=r)
        self.scale_ups = Counter(
            M.SCALE_UPS,
            "Scale-from-zero attempts, one per hold episode (--llmservice): scaled = replicas "
            "set from 0 to 1, not_needed = already above 0, error = the API refused or failed.",
            [L.OUTCOME], registry=r)
        self.cold_start = Histogram(
            M.COLD_START,
            "From scaling the LLMService from 0 to 1 until the first replica was ready.",
            buckets=COLD_START_BUCKETS, registry=r)
        # Per tenant (common.tenants): configured names, "-" (none) or "_unknown".
        self.tenant_requests = Counter(
            M.TENANT_REQUESTS, "Requests admitted by the tenants' limits, by tenant.",
            [L.TENANT], registry=r)
        self.tenant_tokens = Counter(
            M.TENANT_TOKENS, "Tokens charged to each tenant as the replicas reported them "
            "(kind: prompt, completion).", [L.TENANT, L.KIND], registry=r)
        self.tenant_rejected = Counter(
            M.TENANT_REJECTED, "Requests refused with 429, by tenant and reason "
            "(requests_per_second, tokens_per_minute, concurrent_requests; shed = a held "
            "request of the lowest priority that made room; queue_full).",
            [L.TENANT, L.REASON], registry=r)
        self.tenant_queue_wait = Histogram(
            M.TENANT_QUEUE_WAIT, "Time held in the router's hold queue, by tenant (0 when "
            "sent at once).", [L.TENANT], buckets=WAIT_BUCKETS, registry=r)
