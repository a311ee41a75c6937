"""kopf handlers: thin. They read the world, call the pure builders and apply the result.

Reconciliation is idempotent and level-based: the same function runs on create, on spec
updates, on operator restart (resume) and on a timer that re-plans against the nodes,
renews certificates and refreshes status. Each child carries a content hash; it is
patched only when the hash differs, so an unchanged plan never rolls the pods.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import Any

import kopf
from kubernetes import config as k8s_config
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ApiException as DynApiException
from kubernetes.dynamic.exceptions import NotFoundError

from . import builders as B
from . import certs
from .planning import NodeGPU, ServicePlan, plan_service
from .settings import OperatorSettings
from .spec import LLMServiceSpec, SpecError, parse_spec

GROUP, VERSION, PLURAL = "llamafleet.io", "v1alpha1", "llmservices"
SETTINGS = OperatorSettings()
MERGE = "application/merge-patch+json"

log = logging.getLogger(__name__)


# --- start-up ---------------------------------------------------------------------------------


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = logging.INFO
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="llamafleet.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="llamafleet.io")
    settings.networking.error_backoffs = [1, 2, 5, 10, 30, 60]
    memo.dyn = DynamicClient(_api_client())
    memo.locks = {}


def _api_client() -> ApiClient:
    if SETTINGS.kubeconfig:
        return k8s_config.new_client_from_config(config_file=SETTINGS.kubeconfig)
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    return ApiClient()


# --- node index -----------------------------------------------------------------------------


@kopf.index("v1", "nodes")
def gpu_nodes(name: str, labels: dict, **_: Any) -> dict[str, NodeGPU] | None:
    node = NodeGPU.from_labels(name, dict(labels))
    return {name: node} if node else None


def _nodes(index: kopf.Index) -> list[NodeGPU]:
    return [node for store in index.values() for node in store]


# --- reconcile ------------------------------------------------------------------------------


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def reconcile(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status,
              patch: kopf.Patch, logger: logging.Logger, memo: kopf.Memo,
              gpu_nodes: kopf.Index, **_: Any) -> None:
    _reconcile(body, spec, meta, status, patch, logger, memo, gpu_nodes, event=True)


@kopf.timer(GROUP, VERSION, PLURAL, interval=SETTINGS.resync_seconds, idle=0)
def resync(body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status,
           patch: kopf.Patch, logger: logging.Logger, memo: kopf.Memo,
           gpu_nodes: kopf.Index, **_: Any) -> None:
    _reconcile(body, spec, meta, status, patch, logger, memo, gpu_nodes, event=False)


def _reconcile(body: kopf.Body, spec: Any, meta: Any, status: Any, patch: kopf.Patch,
               logger: logging.Logger, memo: kopf.Memo, index: kopf.Index, event: bool) -> None:
    # kopf may run the timer and a change handler of one object at once (thread pool).
    with memo.locks.setdefault(meta["uid"], threading.Lock()):
        _reconcile_locked(body, spec, meta, status, patch, logger, memo, index, event)


def _reconcile_locked(body: kopf.Body, spec: Any, meta: Any, status: Any, patch: kopf.Patch,
                      logger: logging.Logger, memo: kopf.Memo, index: kopf.Index,
                      event: bool) -> None:
    names = B.Names(meta["name"], meta["namespace"])
    conditions = list((status or {}).get("conditions") or [])
    generation = meta.get("generation")
    try:
        parsed = parse_spec(dict(spec))
    except SpecError as e:
        _set(conditions, "Ready", "False", "InvalidSpec", str(e))
        _set(conditions, "Progressing", "False", "InvalidSpec", "Fix the spec to continue.")
        patch.status.update(phase="Failed", conditions=conditions, observedGeneration=generation)
        raise kopf.PermanentError(f"invalid spec: {e}") from None

    dyn: DynamicClient = memo.dyn
    plan = plan_service(parsed, _nodes(index))
    previous = ((status or {}).get("capacity") or {}).get("maxBatchSize")
    patch.status["capacity"] = {"maxBatchSize": plan.max_batch_size, "mode": plan.mode,
                                "gpuMemoryMiB": plan.gpu_memory_mib, "reason": plan.reason}
    patch.status["selector"] = B.selector_string(names.name)
    patch.status["endpoints"] = B.endpoints(names, SETTINGS.cluster_domain)
    patch.status["model"] = _model_label(parsed)
    patch.status["observedGeneration"] = generation
    if not plan.fits:
        _set(conditions, "CapacityPlanned", "False", "InsufficientMemory", plan.reason)
        _set(conditions, "Ready", "False", "InsufficientMemory",
             "No schedulable node has enough GPU memory for one sequence.")
        patch.status.update(phase="Degraded", conditions=conditions)
        raise kopf.TemporaryError(f"cannot place the model: {plan.reason}", delay=60)
    _set(conditions, "CapacityPlanned", "True", "Planned", plan.reason)
    if previous is not None and previous != plan.max_batch_size:
        logger.info("re-planned max_batch_size %s -> %s: %s", previous, plan.max_batch_size,
                    plan.reason)

    try:
        if parsed.tls.enabled:
            not_after = ensure_certificates(dyn, body, names, parsed, logger)
            patch.status["certificates"] = {"notAfter": not_after.isoformat(),
                                            "clientSecret": names.client_secret}
            _set(conditions, "CertificatesReady", "True", "Issued",
                 f"server and client certificates valid until {not_after.isoformat()}")
        else:
            _set(conditions, "CertificatesReady", "True", "Disabled", "tls.enabled is false")
        image = f"{parsed.image.repository or SETTINGS.image_repository}:" \
                f"{parsed.image.tag or SETTINGS.image_tag}"
        children = [B.build_deployment(names, parsed, plan, image), B.build_service(names)]
        children.append(B.build_network_policy(names, parsed) if parsed.networkPolicy.enabled
                        else _absent("networking.k8s.io/v1", "NetworkPolicy", names))
        children.append(B.build_pdb(names, parsed) if parsed.podDisruptionBudget.enabled
                        else _absent("policy/v1", "PodDisruptionBudget", names))
        for child in children:
            apply(dyn, body, child, logger if event else None)
        deployment = dyn.resources.get(api_version="apps/v1", kind="Deployment").get(
            name=names.name, namespace=names.namespace).to_dict()
    except (ApiException, DynApiException) as e:
        _set(conditions, "Ready", "Unknown", "APIError", f"Kubernetes API error: {e.status} "
             f"{e.reason}; retrying")
        patch.status["conditions"] = conditions
        raise kopf.TemporaryError(f"Kubernetes API error {e.status}: {e.reason}", delay=10) from e

    dstatus = deployment.get("status") or {}
    ready = int(dstatus.get("readyReplicas") or 0)
    want = parsed.replicas
    patch.status.update(replicas=int(dstatus.get("replicas") or 0), readyReplicas=ready)
    if ready >= want and want > 0:
        _set(conditions, "Ready", "True", "ReplicasReady", f"{ready}/{want} replicas ready")
        _set(conditions, "Progressing", "False", "Complete", "All replicas are up to date.")
        phase = "Ready"
    elif want == 0:
        _set(conditions, "Ready", "False", "ScaledToZero", "replicas is 0")
        _set(conditions, "Progressing", "False", "ScaledToZero", "replicas is 0")
        phase = "Pending"
    else:
        _set(conditions, "Ready", "False", "ReplicasNotReady", f"{ready}/{want} replicas ready")
        _set(conditions, "Progressing", "True", "RollingOut", f"waiting for {want - ready} "
             "replica(s); model loading can take minutes")
        phase = "Progressing"
    patch.status.update(phase=phase, conditions=conditions)


def _model_label(spec: LLMServiceSpec) -> str:
    src = spec.model.source
    if src.pvc:
        return f"pvc:{src.pvc.claimName}/{src.pvc.path}"
    if src.url:
        return src.url.url.rsplit("/", 1)[-1]
    assert src.embedded is not None
    return f"embedded:{src.embedded.name}"


def _absent(api_version: str, kind: str, names: B.Names) -> dict:
    return {"apiVersion": api_version, "kind": kind, "metadata": {
        "name": names.name, "namespace": names.namespace}, "_absent": True}


def apply(dyn: DynamicClient, owner: kopf.Body, obj: dict, logger: logging.Logger | None) -> None:
    """Create, or patch when the content hash differs; delete optional children turned off."""
    api = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
    name, ns = obj["metadata"]["name"], obj["metadata"]["namespace"]
    try:
        current = api.get(name=name, namespace=ns).to_dict()
    except NotFoundError:
        current = None
    if obj.get("_absent"):
        if current is not None:
            api.delete(name=name, namespace=ns)
            if logger:
                logger.info("deleted %s %s (turned off in the spec)", obj["kind"], name)
        return
    kopf.adopt(obj, owner=owner)
    if current is None:
        create_or_patch(api, obj, ns)
        if logger:
            logger.info("created %s %s", obj["kind"], name)
        return
    want = obj["metadata"]["annotations"][B.HASH_ANNOTATION]
    have = ((current.get("metadata") or {}).get("annotations") or {}).get(B.HASH_ANNOTATION)
    if want != have:
        api.patch(body=obj, name=name, namespace=ns, content_type=MERGE)
        if logger:
            logger.info("updated %s %s", obj["kind"], name)


def create_or_patch(api: Any, obj: dict, ns: str) -> None:
    try:
        api.create(body=obj, namespace=ns)
    except DynApiException as e:
        if e.status != 409:
            raise
        api.patch(body=obj, name=obj["metadata"]["name"], namespace=ns, content_type=MERGE)


def ensure_certificates(dyn: DynamicClient, owner: kopf.Body, names: B.Names,
                        spec: LLMServiceSpec, logger: logging.Logger) -> dt.datetime:
    """CA, server and client Secrets; (re)issue what is missing or due for renewal."""
    api = dyn.resources.get(api_version="v1", kind="Secret")
    validity = certs.parse_duration(spec.tls.validity)
    renew = certs.parse_duration(spec.tls.renewBefore)

    def read(name: str) -> dict | None:
        try:
            return api.get(name=name, namespace=names.namespace).to_dict()
        except NotFoundError:
            return None

    def pair(secret: dict | None, key: str, cert: str) -> certs.KeyPair | None:
        if secret is None:
            return None
        k, c = B.secret_bytes(secret, key), B.secret_bytes(secret, cert)
        return certs.KeyPair(k, c) if k and c else None

    def write(name: str, data: dict[str, bytes], tls: bool, existed: bool) -> None:
        obj = B.build_secret(names, name, data, tls)
        kopf.adopt(obj, owner=owner)
        if existed:
            api.patch(body=obj, name=name, namespace=names.namespace, content_type=MERGE)
        else:
            create_or_patch(api, obj, names.namespace)

    ca_secret = read(names.ca_secret)
    ca = pair(ca_secret, "ca.key", "ca.crt")
    reissue = False
    if ca is None or certs.needs_renewal(ca, renew):
        # The CA outlives its leaves: twice the validity.
        ca = certs.new_ca(f"{names.name}.{names.namespace} llamafleet CA", validity * 2)
        write(names.ca_secret, {"ca.crt": ca.cert_pem, "ca.key": ca.key_pem}, False,
              ca_secret is not None)
        logger.info("issued a new CA for %s", names.name)
        reissue = True
    not_after = []
    for secret_name, client in ((names.server_secret, False), (names.client_secret, True)):
        current = read(secret_name)
        leaf = pair(current, "tls.key", "tls.crt")
        stale = current is None or leaf is None or reissue or \
            B.secret_bytes(current, "ca.crt") != ca.cert_pem or certs.needs_renewal(leaf, renew)
        if stale:
            leaf = certs.issue(ca, f"{names.name}-{'client' if client else 'server'}", validity,
                               sans=[] if client else names.dns_names(SETTINGS.cluster_domain),
                               client=client)
            write(secret_name, {"tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem,
                                "ca.crt": ca.cert_pem}, True, current is not None)
            logger.info("%s %s certificate, valid until %s",
                        "renewed" if current is not None else "issued",
                        "client" if client else "server", leaf.not_after.isoformat())
        assert leaf is not None
        not_after.append(leaf.not_after)
    return min(not_after)


def _set(conditions: list[dict], type_: str, status: str, reason: str, message: str) -> None:
    """Set a condition; lastTransitionTime moves only when the status changes."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    for c in conditions:
        if c.get("type") == type_:
            if c.get("status") != status:
                c["lastTransitionTime"] = now
            c.update(status=status, reason=reason, message=message)
            return
    conditions.append({"type": type_, "status": status, "reason": reason, "message": message,
                       "lastTransitionTime": now})


__all__ = ["reconcile", "resync", "gpu_nodes", "startup", "apply", "ensure_certificates",
           "ServicePlan"]
