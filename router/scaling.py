"""Scale from zero: when requests wait and no replica is ready, the router sets the
LLMService's replicas from 0 to 1 through its `scale` subresource, once per hold episode."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from kubernetes import client
from kubernetes.client.exceptions import ApiException
from llamafleet.common.contract import API_GROUP, API_VERSION, LLMSERVICE_PLURAL

from .metrics import RouterMetrics
from .replicas import Pool

log = logging.getLogger(__name__)

API_TIMEOUT = 10.0  # seconds per call to the API server
CONFLICT_TRIES = 3  # re-reads after a 409 (the scale changed between our read and write)


class Scaler:
    def __init__(self, api: client.ApiClient, namespace: str, llmservice: str,
                 metrics: RouterMetrics):
        self.api = client.CustomObjectsApi(api)
        self.namespace, self.name = namespace, llmservice
        self.metrics = metrics

    def scale_up(self) -> str:
        """Reads the scale; at 0 replicas writes 1. Blocking (runs in a worker thread).

        Returns the outcome: ``scaled``, or ``not_needed`` (replicas were already above 0:
        pods are starting, or something else scales this LLMService). The write is a PUT
        of the Scale just read, so it carries its resourceVersion: had another writer set
        replicas to 3 meanwhile, the API server answers 409 instead of our 1 undoing it.
        Raises ApiException (or a connection error) when the API refuses or is unreachable."""
        ref = (API_GROUP, API_VERSION, self.namespace, LLMSERVICE_PLURAL, self.name)
        for _ in range(CONFLICT_TRIES):
            scale = self.api.get_namespaced_custom_object_scale(*ref, _request_timeout=API_TIMEOUT)
            if int((scale.get("spec") or {}).get("replicas") or 0) > 0:
                return "not_needed"
            scale["spec"] = {**(scale.get("spec") or {}), "replicas": 1}
            try:
                self.api.replace_namespaced_custom_object_scale(*ref, scale,
                                                                _request_timeout=API_TIMEOUT)
            except ApiException as e:
                if e.status == 409:
                    continue
                raise
            return "scaled"
        raise RuntimeError(f"the scale of {self.name} kept changing ({CONFLICT_TRIES} conflicts)")

    async def _scale_up(self) -> str:
        try:
            outcome = await asyncio.to_thread(self.scale_up)
        except Exception as e:  # noqa: BLE001 - logged and counted; held requests keep waiting
            reason = f"API error {e.status} {e.reason}" if isinstance(e, ApiException) else repr(e)
            log.warning("could not scale LLMService %s/%s from zero: %s; held requests wait "
                        "until their hold timeout", self.namespace, self.name, reason)
            outcome = "error"
        else:
            if outcome == "scaled":
                log.info("scaled LLMService %s/%s from 0 to 1 replica", self.namespace, self.name)
        self.metrics.scale_ups.labels(outcome).inc()
        return outcome

    async def run(self, pool: Pool, held: Callable[[], int]) -> None:
        """Forever: one scale-up per hold episode. An episode begins when a request is held
        while no replica is ready and ends when a replica is ready or no request is held
        (all timed out); a later held request then begins a new one. ``pool.changed`` is
        notified on every change of readiness and of ``held()``.

        The cold start is measured from a successful scale-up to the first ready replica,
        even when that comes after the episode's requests timed out."""
        scaled_at: float | None = None
        while True:
            async with pool.changed:
                await pool.changed.wait_for(
                    lambda since=scaled_at: (since is not None and bool(pool.ready()))
                    or (held() > 0 and not pool.ready()))
            if scaled_at is not None and pool.ready():
                self.metrics.cold_start.observe(time.monotonic() - scaled_at)
                scaled_at = None
                continue
            if await self._scale_up() == "scaled":
                scaled_at = time.monotonic()
            async with pool.changed:
                await pool.changed.wait_for(lambda: bool(pool.ready()) or held() == 0)
