"""The replicas the router may use: where they are, whether they are ready, and their load
(in-flight requests through this router, and queue depth and KV use polled from /metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

# The pod's series (llamafleet.inference.metrics) that the router reads.
RUNNING = "llamafleet_running_sequences"
WAITING = "llamafleet_queue_depth"
KV_USED = "llamafleet_kv_cache_cells_used"
KV_TOTAL = "llamafleet_kv_cache_cells_total"
SLOTS = "llamafleet_max_batch_size"


@dataclass
class Backend:
    url: str
    ready: bool = False
    in_flight: int = 0
    running: float = 0.0
    waiting: float = 0.0
    kv_use: float = 0.0  # 0..1
    slots: float = 0.0  # sequences it runs at once (its max batch size); 0 until polled
    others: float = 0.0  # at the last poll: requests on it that were not ours

    @property
    def load(self) -> float:
        """Requests on the replica: ours in flight now (exact), plus those of other clients
        and routers as of the last poll (running + waiting beyond ours then)."""
        return self.in_flight + self.others


def parse_metrics(text: str) -> dict[str, float]:
    wanted = {RUNNING, WAITING, KV_USED, KV_TOTAL, SLOTS}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                out[sample.name] = sample.value
    return out


class Pool:
    """Backends by URL; ``changed`` wakes requests held while none is ready."""

    def __init__(self, client: httpx.AsyncClient, poll_interval: float, headers: dict[str, str]):
        self.client = client
        self.poll_interval = poll_interval
        self.headers = headers
        self.backends: dict[str, Backend] = {}
        self.changed = asyncio.Condition()
        self._added = asyncio.Event()  # new URLs: poll them now, not at the next period

    def ready(self) -> list[Backend]:
        return [b for b in self.backends.values() if b.ready]

    async def set_urls(self, urls: list[str]) -> None:
        """The current set of replicas (static --backends, or an EndpointSlice watch)."""
        for url in urls:
            if url not in self.backends:
                self.backends[url] = Backend(url)
                self._added.set()
        for url in set(self.backends) - set(urls):
            del self.backends[url]
        await self.notify()

    async def notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def mark_down(self, backend: Backend) -> None:
        """A connect error: out of rotation until its next good poll."""
        if backend.ready:
            log.warning("replica %s is unreachable; out of rotation until it answers", backend.url)
        backend.ready = False

    async def poll_once(self, backend: Backend) -> None:
        was = backend.ready
        try:
            r = await self.client.get(f"{backend.url}/ready", headers=self.headers)
            backend.ready = r.status_code == 200
            if backend.ready:
                ours = backend.in_flight
                m = await self.client.get(f"{backend.url}/metrics", headers=self.headers)
                if m.status_code == 200:
                    values = parse_metrics(m.text)
                    backend.running = values.get(RUNNING, 0.0)
                    backend.waiting = values.get(WAITING, 0.0)
                    backend.slots = values.get(SLOTS, 0.0)
                    backend.others = max(0.0, backend.running + backend.waiting
                                         - min(ours, backend.in_flight))
                    total = values.get(KV_TOTAL, 0.0)
                    backend.kv_use = values.get(KV_USED, 0.0) / total if total else 0.0
        except httpx.HTTPError:
            backend.ready = False
        if backend.ready != was:
            log.info("replica %s is %s", backend.url, "ready" if backend.ready else "not ready")
            await self.notify()

    async def poll_forever(self) -> None:
        while True:
            self._added.clear()
            await asyncio.gather(*(self.poll_once(b) for b in list(self.backends.values())))
            with contextlib.suppress(TimeoutError):  # the poll period, or sooner for new URLs
                await asyncio.wait_for(self._added.wait(), self.poll_interval)
