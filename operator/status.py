"""An LLMService's phase and conditions, as pure functions of what reconcile read back.

The kopf handlers call these and write the result; nothing here talks to the API server
or reads the clock except :func:`merge`, whose ``now`` can be given.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509

from .builders import secret_bytes
from .planning import ServicePlan
from .spec import LLMServiceSpec

if TYPE_CHECKING:
    from .model_cache import CacheState

Key = tuple[str, str, str]  # (apiVersion, kind, name) of a child object


@dataclass(frozen=True)
class Condition:
    type: str
    status: str  # "True" | "False" | "Unknown"
    reason: str
    message: str


@dataclass(frozen=True)
class Status:
    phase: str
    conditions: tuple[Condition, ...]
    replicas: int = 0
    ready_replicas: int = 0


def status_from(spec: LLMServiceSpec, plan: ServicePlan,
                children: Mapping[Key, dict | None], cache: CacheState | None = None) -> Status:
    """Phase and conditions of a reconcile that got as far as writing its children.

    ``children`` is what was read back (after the writes), keyed by (apiVersion, kind,
    name); the Deployment's status gives the replica counts and the server and client
    Secrets the certificates' expiry. ``cache``: the model's cache entry, while the model
    cache holds the model; until it is there, the Deployment is not written (or keeps its
    old model) and Ready/Progressing say why.
    """
    if not plan.fits:
        return Status("Degraded", (
            capacity_condition(plan),
            Condition("Ready", "False", "InsufficientMemory",
                      "No schedulable node has enough GPU memory for one sequence.")))
    conditions = [capacity_condition(plan), certificates_condition(spec, children)]
    deployment = next((obj for (_, kind, _), obj in children.items()
                       if kind == "Deployment" and obj and _component(obj) != "router"), {})
    dstatus = deployment.get("status") or {}
    ready, want = int(dstatus.get("readyReplicas") or 0), spec.replicas
    if want == 0:
        phase = "Pending"
        conditions += [Condition("Ready", "False", "ScaledToZero", "replicas is 0"),
                       Condition("Progressing", "False", "ScaledToZero", "replicas is 0")]
    elif ready >= want:
        phase = "Ready"
        conditions += [
            Condition("Ready", "True", "ReplicasReady", f"{ready}/{want} replicas ready"),
            Condition("Progressing", "False", "Complete", "All replicas are up to date.")]
    else:
        phase = "Progressing"
        conditions += [
            Condition("Ready", "False", "ReplicasNotReady", f"{ready}/{want} replicas ready"),
            Condition("Progressing", "True", "RollingOut", f"waiting for {want - ready} "
                      "replica(s); model loading can take minutes")]
    if cache is not None and not cache.ready and want > 0:
        failed = cache.state == "Failed"
        reason = "ModelDownloadFailed" if failed else "ModelDownloading"
        moving = Condition("Progressing", "False" if failed else "True", reason, cache.message)
        if ready >= want:  # the live pods keep serving the model they have
            conditions[-1] = moving
        else:
            phase = "Degraded" if failed else "Progressing"
            conditions[-2:] = [Condition("Ready", "False", reason, cache.message), moving]
    return Status(phase, tuple(conditions), int(dstatus.get("replicas") or 0), ready)


def _component(obj: dict) -> str | None:
    return ((obj.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component")


def capacity_condition(plan: ServicePlan) -> Condition:
    if plan.fits:
        return Condition("CapacityPlanned", "True", "Planned", plan.reason)
    return Condition("CapacityPlanned", "False", "InsufficientMemory", plan.reason)


def certificates_condition(spec: LLMServiceSpec,
                           children: Mapping[Key, dict | None]) -> Condition:
    """From the server and client Secrets read back: the earliest expiry of the two."""
    if not spec.tls.enabled:
        return Condition("CertificatesReady", "True", "Disabled", "tls.enabled is false")
    leaves = [secret_bytes(obj, "tls.crt") for (_, kind, _), obj in children.items()
              if kind == "Secret" and obj]
    expiries = [x509.load_pem_x509_certificate(pem).not_valid_after_utc for pem in leaves if pem]
    if not expiries:
        return Condition("CertificatesReady", "False", "Missing",
                         "the server and client certificate Secrets were not read back")
    return Condition("CertificatesReady", "True", "Issued", "server and client certificates "
                     f"valid until {min(expiries).isoformat()}")


def merge(previous: Iterable[dict], new: Iterable[Condition],
          now: dt.datetime | None = None) -> list[dict]:
    """The status's condition list with ``new`` set in it; ``lastTransitionTime`` moves only
    when a condition's status changes. Conditions not in ``new`` are kept as they were."""
    stamp = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = [dict(c) for c in previous]
    for cond in new:
        fields = {"status": cond.status, "reason": cond.reason, "message": cond.message}
        old = next((c for c in out if c.get("type") == cond.type), None)
        if old is None:
            out.append({"type": cond.type, **fields, "lastTransitionTime": stamp})
            continue
        if old.get("status") != cond.status:
            old["lastTransitionTime"] = stamp
        old.update(fields)
    return out


def model_condition(spec: LLMServiceSpec, cache_enabled: bool,
                    cache: CacheState | None) -> Condition:
    """ModelCached: whether the model is in the model cache (URL sources only)."""
    src = spec.model.source
    if cache is not None:
        return cache.condition()
    if src.url and not cache_enabled:
        return Condition("ModelCached", "False", "PerPodDownload", "the operator's model cache "
                         "is off: each pod downloads the model in its init container")
    where = "pvc" if src.pvc else "embedded"
    return Condition("ModelCached", "True", "NoDownload",
                     f"model.source.{where}: the pods read the model where it is")


def model_label(spec: LLMServiceSpec) -> str:
    """status.model: where the model comes from, in a few words."""
    src = spec.model.source
    if src.pvc:
        return f"pvc:{src.pvc.claimName}/{src.pvc.path}"
    if src.url:
        return src.url.url.rsplit("/", 1)[-1]
    assert src.embedded is not None
    return f"embedded:{src.embedded.name}"
