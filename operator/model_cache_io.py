"""The model cache's API calls: read an entry's claim, Job and progress; create what is
missing (:mod:`llamafleet.operator.model_cache` builds the objects and reads the reports).

The claim and the Job are shared by every LLMService of the namespace that names the same
sha256, so they are never replaced or deleted here: created when missing (an
AlreadyExists from a concurrent reconcile is success), and the Job gets this LLMService in
its ownerReferences.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import kopf
from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ApiException as DynApiException
from kubernetes.dynamic.exceptions import ConflictError, NotFoundError
from llamafleet.common.contract import JOB_NAME_LABEL

from . import builders as B
from . import model_cache as M
from .settings import OperatorSettings
from .spec import LLMServiceSpec

log = logging.getLogger(__name__)

PVC = ("v1", "PersistentVolumeClaim")
JOB = ("batch/v1", "Job")


def _api(dyn: DynamicClient, kind: tuple[str, str]) -> Any:
    return dyn.resources.get(api_version=kind[0], kind=kind[1])


def _get(dyn: DynamicClient, kind: tuple[str, str], name: str, namespace: str) -> dict | None:
    try:
        return _api(dyn, kind).get(name=name, namespace=namespace).to_dict()
    except NotFoundError:
        return None


def _newest_pod_log(dyn: DynamicClient, job: str, namespace: str) -> str:
    """The log tail of the Job's newest pod ('' when it has none yet or the log is gone)."""
    pods = _api(dyn, ("v1", "Pod")).get(namespace=namespace,
                                        label_selector=f"{JOB_NAME_LABEL}={job}").to_dict()
    items = sorted(pods.get("items") or [],
                   key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
    if not items:
        return ""
    try:
        return CoreV1Api(dyn.client).read_namespaced_pod_log(
            items[-1]["metadata"]["name"], namespace, container="fetch",
            tail_lines=M.LOG_TAIL_LINES)
    except ApiException as e:
        if e.status in (400, 404):  # the container has not started, or the pod went away
            return ""
        raise


def read_cache(dyn: DynamicClient, namespace: str, entry: M.Entry, settings: OperatorSettings,
               owner_uid: str, previous: dict | None) -> M.CacheState:
    """The entry's state. A completed Job whose result status.modelCache already shows is
    not read again (its pod's log is not needed any more)."""
    claim = settings.model_cache_claim
    pvc = _get(dyn, PVC, claim, namespace)
    job = _get(dyn, JOB, entry.job, namespace)
    done_before = (previous or {}).get("file") == entry.file and \
        (previous or {}).get("state") == "Cached"
    text = ""
    if job is not None and not (done_before and M.job_succeeded(job)):
        text = _newest_pod_log(dyn, entry.job, namespace)
    state = M.cache_state(entry, claim, pvc, job, text, owner_uid)
    if done_before and state.ready and not text:
        total = (previous or {}).get("bytesTotal")
        state = dataclasses.replace(state, bytes_done=total or 0, bytes_total=total)
    return state


def fetch_image(spec: LLMServiceSpec, settings: OperatorSettings) -> str:
    """The spec's image if it names one, else the operator's CPU image (never the CUDA one:
    a download needs no GPU, and the CPU image is the smaller pull)."""
    if spec.image.repository or spec.image.tag:
        return B.image_for(spec, settings)  # the pods' own image, which their nodes can pull
    return f"{settings.image_repository}:{settings.image_tag}"


def ensure_cache(dyn: DynamicClient, owner: kopf.Body, spec: LLMServiceSpec,
                 settings: OperatorSettings, cache: M.CacheState,
                 logger: logging.Logger) -> None:
    """Create the claim and the Job when missing; add this LLMService to the Job's owners."""
    namespace = owner["metadata"]["namespace"]
    me = M.owner_reference(dict(owner))
    if not cache.claim_exists:
        _create(dyn, PVC, M.build_cache_pvc(namespace, settings), logger)
    if not cache.job_exists:
        job = M.build_fetch_job(namespace, cache.entry, cache.claim, fetch_image(spec, settings),
                                spec, [me])
        _create(dyn, JOB, job, logger)
    elif not cache.has_owner:
        owners = [*cache.job_owners, me]
        _api(dyn, JOB).patch(name=cache.entry.job, namespace=namespace,
                             body={"metadata": {"ownerReferences": owners}},
                             content_type="application/merge-patch+json")
        logger.info("sharing the model cache's Job %s (%s)", cache.entry.job, cache.entry.file)


def _create(dyn: DynamicClient, kind: tuple[str, str], obj: dict, logger: logging.Logger) -> None:
    try:
        _api(dyn, kind).create(body=obj, namespace=obj["metadata"]["namespace"])
    except ConflictError:  # AlreadyExists: another reconcile made it a moment ago
        return
    except DynApiException as e:
        if e.status == 409:
            return
        raise
    logger.info("created %s %s", obj["kind"], obj["metadata"]["name"])
