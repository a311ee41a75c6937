"""The builtin autoscaler's I/O: read the pods' and routers' metrics, call the pure
:func:`llamafleet.operator.scaling_policy.decide`, write the scale subresource.

The kopf timer that drives it lives in handlers.py (thin, like the others). Reads are
best effort: a pod or router that does not answer in time is a missing reading, which the
pure function treats as such (never as zero load).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import kopf
from kubernetes.client import CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ApiException as DynApiException
from kubernetes.dynamic.exceptions import NotFoundError
from llamafleet.common.contract import API_GROUP as GROUP
from llamafleet.common.contract import API_VERSION as VERSION
from llamafleet.common.contract import HTTP_PORT, ROUTER_PORT, PodMetric, RouterMetric
from llamafleet.common.contract import LLMSERVICE_PLURAL as PLURAL
from prometheus_client.parser import text_string_to_metric_families

from . import builders as B
from .scaling_policy import Decision, PodLoad, Policy, Readings, State, decide
from .settings import OperatorSettings
from .spec import LLMServiceSpec, SpecError, parse_spec

log = logging.getLogger(__name__)

# The pod's series (llamafleet.inference.metrics) and the router's (llamafleet.router.metrics).
RUNNING, QUEUED, FINISHED = PodMetric.RUNNING, PodMetric.QUEUE_DEPTH, PodMetric.REQUESTS
HELD = RouterMetric.HOLD_QUEUE_DEPTH


@dataclass(frozen=True)
class Target:
    """A ready pod to read: its name, base URL and when it became Ready."""

    name: str
    url: str
    ready_since: dt.datetime | None


def _time(text: Any) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None


def ready_targets(pods: Iterable[dict], port_name: str, default_port: int) -> list[Target]:
    """The pods that are Ready, have an IP and are not terminating, with the URL of their
    container port named ``port_name`` (``default_port`` when none is named so)."""
    out = []
    for pod in pods:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
        if meta.get("deletionTimestamp") or not status.get("podIP") or not ready \
                or ready.get("status") != "True":
            continue
        port = next((p.get("containerPort") for c in (pod.get("spec") or {}).get("containers") or []
                     for p in c.get("ports") or [] if p.get("name") == port_name), default_port)
        host = status["podIP"]
        host = f"[{host}]" if ":" in host else host  # IPv6
        out.append(Target(meta.get("name", ""), f"http://{host}:{port}",
                          _time(ready.get("lastTransitionTime"))))
    return out


def sums(text: str, names: Sequence[str]) -> dict[str, float]:
    """Each named sample summed over its labels (absent names are left out)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    return out


async def read_pod(client: httpx.AsyncClient, target: Target, headers: dict) -> PodLoad:
    try:
        r = await client.get(f"{target.url}/metrics", headers=headers)
        r.raise_for_status()
        values = sums(r.text, (RUNNING, QUEUED, FINISHED))
    except (httpx.HTTPError, ValueError) as e:
        log.info("autoscaler: no reading from pod %s: %s", target.name, e)
        return PodLoad(target.name, ready_since=target.ready_since)
    if RUNNING not in values and QUEUED not in values:
        log.info("autoscaler: pod %s exports no load gauges", target.name)
        return PodLoad(target.name, ready_since=target.ready_since)
    return PodLoad(target.name, values.get(RUNNING, 0.0) + values.get(QUEUED, 0.0),
                   values.get(FINISHED), target.ready_since)


async def read_held(client: httpx.AsyncClient, routers: Sequence[Target],
                    headers: dict) -> float | None:
    """The routers' hold queues summed; None when there is no router or none answered."""
    async def one(t: Target) -> float | None:
        try:
            r = await client.get(f"{t.url}/router/metrics", headers=headers)
            r.raise_for_status()
            return sums(r.text, (HELD,)).get(HELD)
        except (httpx.HTTPError, ValueError) as e:
            log.info("autoscaler: no reading from router %s: %s", t.name, e)
            return None

    values = [v for v in await asyncio.gather(*(one(t) for t in routers)) if v is not None]
    return sum(values) if values else None


def _list_pods(dyn: DynamicClient, names: B.Names, component: str) -> list[dict]:
    labels = B.router_selector_labels(names.name) if component == "router" \
        else B.pod_selector_labels(names.name)
    selector = ",".join(f"{k}={v}" for k, v in labels.items())
    pods = dyn.resources.get(api_version="v1", kind="Pod").get(
        namespace=names.namespace, label_selector=selector).to_dict()
    return list(pods.get("items") or [])


def _api_key(dyn: DynamicClient, names: B.Names, spec: LLMServiceSpec) -> str | None:
    secret_name, key = B.api_key_ref(names, spec)
    try:
        secret = dyn.resources.get(api_version="v1", kind="Secret").get(
            name=secret_name, namespace=names.namespace).to_dict()
    except NotFoundError:
        return None
    value = B.secret_bytes(secret, key)
    return value.decode().strip() if value else None


async def readings(dyn: DynamicClient, names: B.Names, spec: LLMServiceSpec,
                   timeout: float) -> Readings:
    """Read every ready pod's load and the routers' held requests, concurrently."""
    pods, routers, key = await asyncio.gather(
        asyncio.to_thread(_list_pods, dyn, names, "inference"),
        asyncio.to_thread(_list_pods, dyn, names, "router"),
        asyncio.to_thread(_api_key, dyn, names, spec))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    targets = ready_targets(pods, "http", HTTP_PORT)
    router_targets = ready_targets(routers, "router", ROUTER_PORT)
    async with httpx.AsyncClient(timeout=timeout) as client:
        loads, held = await asyncio.gather(
            asyncio.gather(*(read_pod(client, t, headers) for t in targets)),
            read_held(client, router_targets, headers))
    return Readings(tuple(loads), held)


def write_replicas(dyn: DynamicClient, names: B.Names, replicas: int) -> None:
    """Through the scale subresource, as an HPA would: the normal reconcile then carries
    spec.replicas to the Deployment."""
    CustomObjectsApi(dyn.client).patch_namespaced_custom_object_scale(
        GROUP, VERSION, names.namespace, PLURAL, names.name, {"spec": {"replicas": replicas}})


async def autoscale(body: dict, spec: LLMServiceSpec, dyn: DynamicClient, timeout: float,
                    now: dt.datetime | None = None) -> Decision:
    """One round for one LLMService whose spec.scaling.mode is builtin: read, decide, and
    write the replicas when they change. The caller writes ``decision.to_status()`` to
    status.autoscaling."""
    assert spec.scaling is not None
    meta, status = body["metadata"], body.get("status") or {}
    names = B.Names(meta["name"], meta["namespace"])
    planned = (status.get("capacity") or {}).get("maxBatchSize") or spec.batching.maxBatchSize
    policy = Policy.from_spec(spec.scaling, int(planned))
    state = State.from_status(status.get("autoscaling"))
    found = await readings(dyn, names, spec, timeout)
    decision = decide(found, state, policy, spec.replicas, now or dt.datetime.now(dt.UTC))
    if decision.replicas != spec.replicas:
        await asyncio.to_thread(write_replicas, dyn, names, decision.replicas)
    return decision


async def timer_round(body: dict, patch: kopf.Patch, logger: logging.Logger,
                      dyn: DynamicClient, settings: OperatorSettings) -> None:
    """The `autoscale` kopf timer's round: :func:`autoscale`, then status.autoscaling."""
    try:
        parsed = parse_spec(dict(body["spec"]))
    except SpecError:
        return  # reconcile reports it
    if parsed.scaling is None:
        return
    before = (body.get("status") or {}).get("autoscaling") or {}
    try:
        decision = await autoscale(body, parsed, dyn, settings.autoscale_read_timeout)
    except (ApiException, DynApiException) as e:
        raise kopf.TemporaryError(f"autoscaler: Kubernetes API error {e.status} {e.reason}",
                                  delay=settings.autoscale_interval) from e
    status = decision.to_status()
    # A merge patch keeps map keys it does not mention: pods gone are removed explicitly.
    for pod in (before.get("requestCounts") or {}):
        status["requestCounts"].setdefault(pod, None)
    patch.status["autoscaling"] = status
    if decision.replicas != parsed.replicas:
        logger.info("autoscaler: replicas %s -> %s: %s", parsed.replicas, decision.replicas,
                    decision.reason)
    cold = decision.state.cold_start_seconds
    if cold is not None and cold != before.get("coldStartSeconds"):
        logger.info("autoscaler: cold start from zero took %.1fs (until the first pod was "
                    "Ready)", cold)
