"""spec.adapters on the running pods: each ready pod's adapters (its /v1/models) brought to the
spec's through its runtime endpoints (``POST /v1/adapters``, ``DELETE /v1/adapters/{name}``,
behind the API key), and what each pod then holds, for status.adapters.

Why at run time: the pods read their start-up list from a ConfigMap (builders.add_adapters), so
a changed list reaches new and restarted pods without a rollout; the pods already running get
it here, the way the builtin autoscaler reaches them (the pod's IP and HTTP port, plain HTTP
inside the cluster, the NetworkPolicy admitting the operator). A pod can load only the files it
has: those of the sources its template listed (the ``llamafleet.io/adapter-sources``
annotation). A new URL adapter or a new PVC changes the template, so the Deployment rolls out
and the new pods start with it; the old ones meanwhile unload what was removed and keep the
rest. Unloading an adapter that requests are using answers 409 (the pod never drops them): it
is retried at the next resync. An adapter a pod refuses to load (400: no such file, or one
llama.cpp refuses) is reported in status.adapters[].refused and left out of the ConfigMap, since
a pod stops when a start-up adapter fails; the running pods retry it at each resync, and once
one loads it, it is back in the ConfigMap.

:func:`plan_pod` is pure; :func:`sync` does the I/O, best effort: a pod that does not answer is
reported, never an error of the reconcile.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx
from kubernetes.dynamic import DynamicClient
from llamafleet.common.contract import HTTP_PORT

from . import builders as B
from .scaling_loop import _api_key, _list_pods, ready_targets
from .spec import LLMServiceSpec
from .status import Condition

log = logging.getLogger(__name__)

Held = dict[str, tuple[str, float]]  # adapter name -> (file on the pod, scale)


def wanted_on(spec: LLMServiceSpec, sources: Iterable[str]) -> Held:
    """The spec's adapters whose files a pod with ``sources`` has."""
    have = set(sources)
    return {a.name: (B.adapter_path(spec, a), a.scale) for a in spec.adapters
            if B.adapter_source(a) in have}


def plan_pod(wanted: Held, held: Held) -> tuple[list[str], list[tuple[str, str, float]]]:
    """(names to unload, (name, path, scale) to load): what a pod holding ``held`` must do to
    hold ``wanted``. An adapter whose file or scale changed is unloaded, then loaded again."""
    unload = sorted(n for n, v in held.items() if wanted.get(n) != v)
    load = sorted((n, *v) for n, v in wanted.items() if held.get(n) != v)
    return unload, load


def pod_sources(pod: dict) -> list[str]:
    """The adapter sources a pod's template gave it (none without the annotation)."""
    text = ((pod.get("metadata") or {}).get("annotations") or {}).get(
        B.ADAPTER_SOURCES_ANNOTATION)
    try:
        value = json.loads(text) if text else []
    except ValueError:
        return []
    return [s for s in value if isinstance(s, str)] if isinstance(value, list) else []


@dataclass
class PodAdapters:
    """One ready pod after a sync: what it holds, what it lacks the file for (it waits for the
    rollout), and what went wrong."""

    pod: str
    held: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # no such file, or llama.cpp refused it
    answered: bool = True

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pod": self.pod, "adapters": sorted(self.held)}
        if self.missing:
            out["awaitingRollout"] = sorted(self.missing)
        if self.problems:
            out["problems"] = self.problems
        if self.refused:
            out["refused"] = sorted(self.refused)
        return out


def _error(r: httpx.Response) -> str:
    try:
        err = r.json()["error"]
        return f"{r.status_code} {err.get('code') or err.get('type')}: {err.get('message')}"
    except (ValueError, KeyError, TypeError):
        return f"{r.status_code}: {r.text[:200]}"


async def sync_pod(client: httpx.AsyncClient, url: str, name: str, headers: dict[str, str],
                   wanted: Held, all_names: Iterable[str]) -> PodAdapters:
    out = PodAdapters(name, missing=sorted(set(all_names) - set(wanted)))
    try:
        r = await client.get(f"{url}/v1/models", headers=headers)
        r.raise_for_status()
        held: Held = {m["id"]: (str(m.get("root") or ""), float(m.get("scale") or 1.0))
                      for m in r.json()["data"] if m.get("parent")}
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
        out.answered = False
        out.problems.append(f"no answer from /v1/models: {e}")
        return out
    unload, load = plan_pod(wanted, held)
    for adapter in unload:
        r = await client.delete(f"{url}/v1/adapters/{quote(adapter, safe='/')}", headers=headers)
        if r.status_code in (200, 404):  # 404: gone already
            held.pop(adapter, None)
            log.info("pod %s: LoRA adapter %s unloaded", name, adapter)
        else:
            out.problems.append(f"unload {adapter}: {_error(r)}")
    for adapter, path, scale in load:
        if adapter in held:
            continue  # its unload failed (in use): load it again next time
        r = await client.post(f"{url}/v1/adapters", headers=headers,
                              json={"name": adapter, "path": path, "scale": scale})
        if r.status_code == 201:
            held[adapter] = (path, scale)
            log.info("pod %s: LoRA adapter %s loaded from %s (scale %g)", name, adapter, path,
                     scale)
        else:
            out.problems.append(f"load {adapter}: {_error(r)}")
            if r.status_code == 400:  # the file: a pod would not start with it either
                out.refused.append(adapter)
    out.held = sorted(held)
    return out


async def sync(dyn: DynamicClient, names: B.Names, spec: LLMServiceSpec,
               timeout: float) -> list[PodAdapters]:
    """Every ready pod brought to the spec's adapters (as far as its files allow), concurrently."""
    pods, key = await asyncio.gather(
        asyncio.to_thread(_list_pods, dyn, names, "inference"),
        asyncio.to_thread(_api_key, dyn, names, spec))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    by_name = {(p.get("metadata") or {}).get("name"): p for p in pods}
    all_names = [a.name for a in spec.adapters]
    async with httpx.AsyncClient(timeout=timeout) as client:
        done = await asyncio.gather(*(
            sync_pod(client, t.url, t.name, headers,
                     wanted_on(spec, pod_sources(by_name.get(t.name) or {})), all_names)
            for t in ready_targets(pods, "http", HTTP_PORT)))
    return sorted(done, key=lambda p: p.pod)


def condition(spec: LLMServiceSpec, pods: list[PodAdapters]) -> Condition:
    """AdaptersReady: every ready pod holds every adapter of the spec (and nothing else)."""
    want = sorted(a.name for a in spec.adapters)
    if not pods:
        return Condition("AdaptersReady", "Unknown", "NoReadyReplicas",
                         "no ready replica to load adapters on yet")
    problems = [f"{p.pod}: {q}" for p in pods for q in p.problems]
    if problems:
        return Condition("AdaptersReady", "False", "AdapterError",
                         "; ".join(problems) + "; retrying at the next resync")
    waiting = [p.pod for p in pods if p.missing]
    if waiting:
        return Condition("AdaptersReady", "False", "RollingOut",
                         f"{len(waiting)} replica(s) lack an adapter's file and are being "
                         f"replaced: {', '.join(waiting)}")
    if all(p.held == want for p in pods):
        what = ", ".join(want) if want else "none"
        return Condition("AdaptersReady", "True", "Loaded",
                         f"{len(pods)} replica(s) hold the adapters: {what}")
    return Condition("AdaptersReady", "False", "AdapterError", "the replicas' adapters differ "
                     "from spec.adapters; retrying at the next resync")
