"""The model cache: URL-sourced models downloaded once per namespace, by a Job, into a volume
that the pods mount read-only (docs/architecture.md, "Model cache").

- One PersistentVolumeClaim per namespace (``OperatorSettings.model_cache_claim``, storage
  class, size and access mode from the settings; ReadWriteMany by default). The operator
  creates it when missing and never deletes it: the cache outlives the LLMServices. A claim
  an admin made under that name is used as it is.
- Each file in it is ``<sha256>.gguf`` (:func:`llamafleet.common.contract.cache_file_name`),
  written by one Job per sha256, ``llamafleet-fetch-<first 16 hex digits>``: two LLMServices
  with the same sha256 name the same Job and the same file. The Job runs ``llamafleet
  fetch`` (resume with HTTP Range from ``<file>.part``, sha256 checked, atomic rename), so a
  retry (a new pod of the Job) resumes where the last one stopped. A wrong sha256 or an HTTP
  4xx ends the Job at once (podFailurePolicy on FETCH_EXIT_PERMANENT).
- Each LLMService that uses a Job adds itself to the Job's ownerReferences (never as its
  controller): the Job goes away with the last of them, the file stays. A completed Job is
  the record that the file is there; with no Job, a new one finds the file, checks its
  sha256 and completes without downloading.
- Progress: the operator reads the last JSON progress line (FETCH_PROGRESS_EVENT) from the
  log of the Job's newest pod and writes it to status.modelCache.

Pure: builders and the reading of what the Job reports. llamafleet.operator.reconcile makes
the API calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from llamafleet.common.contract import (
    FETCH_EXIT_PERMANENT,
    FETCH_PROGRESS_EVENT,
    USER_ID,
    cache_file_name,
)

from .spec import LLMServiceSpec
from .status import Condition

CACHE_DIR = "/cache"  # where the fetch Job's pod mounts the cache volume
COMPONENT = "model-cache"
SHA_ANNOTATION = "llamafleet.io/sha256"
URL_ANNOTATION = "llamafleet.io/url"
BACKOFF_LIMIT = 6  # the Job's retries: each a new pod that resumes the part file
LOG_TAIL_LINES = 20

State = Literal["Pending", "Downloading", "Cached", "Failed"]


@dataclass(frozen=True)
class Entry:
    """One file of the cache: the URL it comes from and its sha256 (the key)."""

    url: str
    sha256: str

    @property
    def file(self) -> str:
        return cache_file_name(self.sha256)

    @property
    def job(self) -> str:
        return f"llamafleet-fetch-{self.sha256.lower()[:16]}"


def model_entry(spec: LLMServiceSpec, enabled: bool) -> Entry | None:
    """The cache entry of the spec's model: URL sources when the cache is on (the CRD
    requires a sha256 with every URL, which keys the entry)."""
    src = spec.model.source.url
    return Entry(src.url, src.sha256.lower()) if enabled and src else None


def cache_labels() -> dict[str, str]:
    return {"app.kubernetes.io/name": "llamafleet", "app.kubernetes.io/component": COMPONENT,
            "app.kubernetes.io/managed-by": "llamafleet-operator",
            "app.kubernetes.io/part-of": "llamafleet"}


def build_cache_pvc(namespace: str, settings: Any) -> dict:
    spec: dict[str, Any] = {"accessModes": [settings.model_cache_access_mode],
                            "resources": {"requests": {"storage": settings.model_cache_size}}}
    if settings.model_cache_storage_class:
        spec["storageClassName"] = settings.model_cache_storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": settings.model_cache_claim, "namespace": namespace,
                         "labels": cache_labels()},
            "spec": spec}


def owner_reference(owner: dict) -> dict:
    """A reference that makes the Job go away with its last LLMService, controlling nothing
    (several LLMServices share the Job)."""
    return {"apiVersion": owner["apiVersion"], "kind": owner["kind"],
            "name": owner["metadata"]["name"], "uid": owner["metadata"]["uid"],
            "controller": False, "blockOwnerDeletion": False}


def build_fetch_job(namespace: str, entry: Entry, claim: str, image: str, spec: LLMServiceSpec,
                    owners: list[dict]) -> dict:
    """The Job that puts ``entry`` into the cache; the LLMService that creates it lends it
    its image, pull policy and pull secrets."""
    security = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]}}
    container = {
        "name": "fetch", "image": image, "imagePullPolicy": spec.image.pullPolicy,
        "command": ["llamafleet", "fetch", "--url", entry.url, "--sha256", entry.sha256,
                    "--out", f"{CACHE_DIR}/{entry.file}"],
        "volumeMounts": [{"name": "cache", "mountPath": CACHE_DIR},
                         {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": security,
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"},
                      "limits": {"memory": "512Mi"}},
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # each retry is a new pod: its log is the one to read
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": USER_ID, "runAsGroup": USER_ID,
                            "fsGroup": USER_ID, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "cache", "persistentVolumeClaim": {"claimName": claim}},
                    {"name": "tmp", "emptyDir": {}}],
    }
    if spec.imagePullSecrets:
        pod["imagePullSecrets"] = [{"name": s.name} for s in spec.imagePullSecrets]
    annotations = {SHA_ANNOTATION: entry.sha256, URL_ANNOTATION: entry.url}
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": entry.job, "namespace": namespace, "labels": cache_labels(),
                     "annotations": annotations, "ownerReferences": owners},
        "spec": {
            "backoffLimit": BACKOFF_LIMIT,
            # A wrong sha256 or an HTTP 4xx would fail the same way again: stop at once.
            "podFailurePolicy": {"rules": [{"action": "FailJob", "onExitCodes": {
                "containerName": "fetch", "operator": "In",
                "values": [FETCH_EXIT_PERMANENT]}}]},
            "template": {"metadata": {"labels": cache_labels(), "annotations": annotations},
                         "spec": pod},
        },
    }


# --- what the Job reports -----------------------------------------------------------------------


def parse_log(text: str) -> tuple[int | None, int | None, str | None]:
    """(bytes done, total, error) from the tail of a fetch pod's log: the last progress
    line, and the last ``llamafleet fetch: ...`` error line."""
    done = total = error = None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("llamafleet fetch:"):
            error = line.removeprefix("llamafleet fetch:").strip()
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("event") == FETCH_PROGRESS_EVENT:
            done, total = int(rec.get("bytes") or 0), rec.get("total")
    return done, total, error


def _job_condition(job: dict, type_: str) -> dict | None:
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_ and c.get("status") == "True":
            return c
    return None


def job_succeeded(job: dict) -> bool:
    return _job_condition(job, "Complete") is not None or \
        int((job.get("status") or {}).get("succeeded") or 0) > 0


@dataclass(frozen=True)
class CacheState:
    """The spec's cache entry as read: its Job's state and the last progress it reported."""

    entry: Entry
    claim: str
    state: State
    bytes_done: int = 0
    bytes_total: int | None = None
    message: str = ""
    has_owner: bool = False  # the Job already names this LLMService among its owners
    job_owners: tuple[dict, ...] = ()  # the Job's ownerReferences as read
    job_exists: bool = False
    claim_exists: bool = False

    @property
    def ready(self) -> bool:
        return self.state == "Cached"

    def status(self) -> dict:
        """status.modelCache."""
        out: dict[str, Any] = {"claim": self.claim, "file": self.entry.file,
                               "job": self.entry.job, "state": self.state,
                               "bytesDone": self.bytes_done, "bytesTotal": self.bytes_total}
        out["message"] = self.message or None
        return out

    def condition(self) -> Condition:
        if self.state == "Cached":
            return Condition("ModelCached", "True", "Cached",
                             f"{self.entry.file} is in the cache volume {self.claim}")
        if self.state == "Failed":
            return Condition("ModelCached", "False", "DownloadFailed", self.message)
        return Condition("ModelCached", "False", "Downloading", self.message)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def progress_message(done: int, total: int | None) -> str:
    if total:
        return f"{_size(done)} of {_size(total)} ({100 * done // total}%)"
    return f"{_size(done)} so far"


def cache_state(entry: Entry, claim: str, pvc: dict | None, job: dict | None, log: str,
                owner_uid: str) -> CacheState:
    """What the cache entry's claim, Job and the log tail of the Job's newest pod say."""
    base = dict(entry=entry, claim=claim, claim_exists=pvc is not None,
                job_exists=job is not None)
    if job is None:
        return CacheState(**base, state="Pending", message=f"creating the Job {entry.job}")
    owners = (job.get("metadata") or {}).get("ownerReferences") or []
    base["has_owner"] = any(o.get("uid") == owner_uid for o in owners)
    base["job_owners"] = tuple(owners)
    sha = ((job.get("metadata") or {}).get("annotations") or {}).get(SHA_ANNOTATION)
    if sha and sha != entry.sha256:
        return CacheState(**base, state="Failed", message=(
            f"the Job {entry.job} fetches sha256 {sha}, not {entry.sha256}; delete it"))
    done, total, error = parse_log(log)
    progress = dict(bytes_done=done or 0, bytes_total=total)
    if job_succeeded(job):
        size = total if total is not None else done
        return CacheState(**base, state="Cached", bytes_done=size or 0, bytes_total=size,
                          message="")
    if (failed := _job_condition(job, "Failed")) is not None:
        why = error or failed.get("message") or failed.get("reason") or "the Job failed"
        return CacheState(**base, **progress, state="Failed", message=(
            f"the Job {entry.job} failed: {why}. Fix model.source.url (or its sha256), or "
            f"delete the Job to try again"))
    phase = ((pvc or {}).get("status") or {}).get("phase")
    if phase == "Pending":
        msg = (f"waiting for the cache volume {claim} to be bound (its storage class must "
               "offer its access mode; see docs/architecture.md, Model cache)")
    elif done is None:
        msg = f"the Job {entry.job} is starting"
    else:
        msg = f"downloading {entry.file}: {progress_message(done, total)}"
    if error:  # an attempt failed; the Job retries it in a new pod
        msg += f"; the last attempt: {error}"
    return CacheState(**base, **progress, state="Downloading", message=msg)
