"""The replicas the router may use: where they are, whether they are ready, their load
(in-flight requests through this router, and queue depth and KV use polled from /metrics) and
the LoRA adapters they hold."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass, field

import httpx
from llamafleet.common.contract import MetricLabel, PodMetric
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

# The pod's series (llamafleet.inference.metrics) that the router reads.
RUNNING, WAITING, SLOTS = PodMetric.RUNNING, PodMetric.QUEUE_DEPTH, PodMetric.MAX_BATCH_SIZE
KV_USED, KV_TOTAL = PodMetric.KV_CACHE_CELLS_USED, PodMetric.KV_CACHE_CELLS_TOTAL
LORA = PodMetric.LORA_REQUESTS_INFO


def replica_id(url: str) -> str:
    """What callers see for a replica (``x-llamafleet-backend``, /health, metric labels): a
    stable short hash of its URL, never the URL, which is an internal address. The router
    logs each id with its URL when the replica joins."""
    return "r-" + hashlib.blake2b(url.encode(), digest_size=4).hexdigest()


@dataclass
class Replica:
    url: str
    ready: bool = False  # its last poll answered, and /ready said 200
    in_flight: int = 0
    running: float = 0.0
    waiting: float = 0.0
    kv_use: float = 0.0  # 0..1
    slots: float = 0.0  # sequences it runs at once (its max batch size); 0 until polled
    others: float = 0.0  # at the last poll: requests on it that were not ours
    adapters: frozenset[str] = frozenset()  # LoRA adapters loaded on it, at the last poll
    missed_polls: int = 0  # polls in a row that got no answer in time
    failures: int = 0  # requests in a row that failed on it before any answer
    out_until: float = 0.0  # time.monotonic(): out of rotation until then (failure backoff)
    auth_warned: bool = False
    announced: bool = False  # ``usable`` as last logged and notified
    # Set when the poller gives it up (its failure budget is spent): requests on it stop
    # waiting for it. A new Event once it answers again.
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    id: str = field(init=False)

    def __post_init__(self) -> None:
        self.id = replica_id(self.url)

    @property
    def load(self) -> float:
        """Requests on the replica: ours in flight now (exact), plus those of other clients
        and routers as of the last poll (running + waiting beyond ours then)."""
        return self.in_flight + self.others

    @property
    def usable(self) -> bool:
        """Ready, and not backing off after failed requests."""
        return self.ready and time.monotonic() >= self.out_until


def parse_metrics(text: str) -> tuple[dict[str, float], dict[str, str]]:
    """The load gauges' values, and the labels of the LoRA gauge ({} without one)."""
    wanted = {RUNNING, WAITING, KV_USED, KV_TOTAL, SLOTS}
    out: dict[str, float] = {}
    lora: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[sample.name] = sample.value
            elif sample.name == LORA:
                lora = sample.labels
    return out, lora


def lora_state(labels: dict[str, str]) -> tuple[frozenset[str], int]:
    """From the LoRA gauge's labels: the adapters that running or waiting requests use, and
    how many adapters are loaded (its ``max_lora``)."""
    active = frozenset(name.strip() for key in (MetricLabel.RUNNING_LORA_ADAPTERS,
                                                MetricLabel.WAITING_LORA_ADAPTERS)
                       for name in labels.get(key, "").split(",") if name.strip())
    loaded = labels.get(MetricLabel.MAX_LORA, "")
    return active, int(loaded) if loaded.isdigit() else 0


def listed_adapters(models: object) -> frozenset[str]:
    """The adapters in a /v1/models answer: the models with a ``parent`` (the base)."""
    data = models.get("data") if isinstance(models, dict) else None
    return frozenset(m["id"] for m in data or () if isinstance(m, dict)
                     and m.get("parent") and isinstance(m.get("id"), str))


def holding(replicas: list[Replica], model: str) -> list[Replica]:
    """Those of ``replicas`` that hold the adapter that ``model`` names; none when no replica
    does (``model`` is then the base model, or an adapter not loaded anywhere yet)."""
    return [b for b in replicas if model in b.adapters]


@dataclass(frozen=True)
class PollPolicy:
    interval: float
    timeout: float
    failure_budget: int
    backoff: float
    backoff_max: float


class Pool:
    """Replicas by URL, each polled by its own task (a replica that never answers delays
    no other's poll); ``changed`` wakes requests held while none is usable."""

    def __init__(self, client: httpx.AsyncClient, policy: PollPolicy, headers: dict[str, str]):
        self.client = client  # its own client: polls never queue behind proxied requests
        self.policy = policy
        self.headers = headers
        self.replicas: dict[str, Replica] = {}
        self.changed = asyncio.Condition()
        self._tasks: dict[str, asyncio.Task] = {}

    def ready(self) -> list[Replica]:
        return [b for b in self.replicas.values() if b.usable]

    def by_id(self) -> dict[str, str]:
        return {b.id: b.url for b in self.replicas.values()}

    async def set_urls(self, urls: list[str]) -> None:
        """The current set of replicas (static --backends, or an EndpointSlice watch); new
        ones are polled at once."""
        for url in urls:
            if url not in self.replicas:
                b = self.replicas[url] = Replica(url)
                log.info("replica %s is %s", b.id, url)
                self._tasks[url] = asyncio.create_task(self._poll_forever(b))
        for url in set(self.replicas) - set(urls):
            # Its requests in flight go on: a pod that leaves its EndpointSlice is often
            # draining (SIGTERM), and finishes what it has.
            del self.replicas[url]
            task = self._tasks.pop(url, None)
            if task is not None:
                task.cancel()
        await self.notify()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def failed(self, replica: Replica, why: object) -> None:
        """A request failed on it before any answer: out of rotation for the backoff, which
        doubles with each failure in a row (its polls alone would put it back at once)."""
        replica.failures += 1
        p = self.policy
        pause = min(p.backoff * 2 ** (replica.failures - 1), p.backoff_max)
        replica.out_until = time.monotonic() + pause
        replica.announced = False
        log.warning("replica %s failed a request before answering (%s); out of rotation for "
                    "%g s", replica.url, why, pause)
        await self.notify()

    def answered(self, replica: Replica) -> None:
        replica.failures = 0

    async def poll_once(self, replica: Replica) -> None:
        """One poll within the poll timeout; a poll that gets no answer in time counts
        against the replica's failure budget."""
        try:
            async with asyncio.timeout(self.policy.timeout):
                await self._poll(replica)
        except (httpx.HTTPError, TimeoutError) as e:
            replica.ready = False
            replica.missed_polls += 1
            if replica.missed_polls == self.policy.failure_budget:
                log.warning("replica %s answered none of its last %d polls (%r); its requests "
                            "go elsewhere", replica.url, replica.missed_polls, e)
                replica.lost.set()
        if replica.usable != replica.announced:  # also when a failure backoff has ended
            replica.announced = replica.usable
            log.info("replica %s is %s", replica.url, "ready" if replica.usable else "not ready")
            await self.notify()

    async def _poll(self, replica: Replica) -> None:
        r = await self.client.get(f"{replica.url}/ready", headers=self.headers)
        # It answers: reset before ``ready`` can say so (the rest of the poll awaits /metrics),
        # or a request sent meanwhile would wait on the Event of when it was given up, find
        # it set, and give the replica up again.
        replica.missed_polls = 0
        if replica.lost.is_set():
            replica.lost = asyncio.Event()
        replica.ready = r.status_code == 200
        if not replica.ready:
            return
        ours = replica.in_flight
        m = await self.client.get(f"{replica.url}/metrics", headers=self.headers)
        if m.status_code in (401, 403):
            if not replica.auth_warned:
                replica.auth_warned = True
                log.warning("replica %s refuses the router's polls of /metrics (%d): it has an "
                            "API key, and --backend-api-key is %s. The router routes to it "
                            "without knowing its load (queue, running sequences, KV cache).",
                            replica.url, m.status_code,
                            "not its key" if self.headers else "not set")
            return
        if m.status_code == 200:
            replica.auth_warned = False
            values, lora = parse_metrics(m.text)
            replica.running = values.get(RUNNING, 0.0)
            replica.waiting = values.get(WAITING, 0.0)
            replica.slots = values.get(SLOTS, 0.0)
            replica.others = max(0.0, replica.running + replica.waiting
                                 - min(ours, replica.in_flight))
            total = values.get(KV_TOTAL, 0.0)
            replica.kv_use = values.get(KV_USED, 0.0) / total if total else 0.0
            replica.adapters = await self._adapters(replica, lora)

    async def _adapters(self, replica: Replica, lora: dict[str, str]) -> frozenset[str]:
        """The adapters loaded on it. The LoRA gauge names only those that requests use now
        and counts the loaded ones; when it counts any, /v1/models names them all (a small
        GET that a pod without adapters never gets)."""
        active, loaded = lora_state(lora)
        if not loaded:
            return active
        r = await self.client.get(f"{replica.url}/v1/models", headers=self.headers)
        try:
            listed = listed_adapters(r.json()) if r.status_code == 200 else frozenset()
        except ValueError:
            listed = frozenset()
        return active | listed

    async def _poll_forever(self, replica: Replica) -> None:
        while True:
            await self.poll_once(replica)
            await asyncio.sleep(self.policy.interval)
