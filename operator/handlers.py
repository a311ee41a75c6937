"""kopf handlers: thin. They read the world, call the pure builders and apply the result.

Reconciliation is idempotent and level-based: the same function runs on create, on spec
updates, on operator restart (resume) and on a timer that re-plans against the nodes,
renews certificates and refreshes status.

Children are only written or deleted when this LLMService is their controller; any
same-named object it does not control blocks the whole reconcile with a Conflict
condition, before anything is changed. Each child carries a content hash, and it is
replaced (not merge-patched) when it drifted, so that fields removed from the desired
object disappear from the live one; an unchanged plan never rolls the pods.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import secrets
import threading
from collections.abc import Iterator
from typing import Any

import kopf
from kubernetes import config as k8s_config
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ApiException as DynApiException
from kubernetes.dynamic.exceptions import NotFoundError, ResourceNotFoundError
from kubernetes.utils import parse_quantity
from llamafleet.common.contract import API_GROUP, API_VERSION, LLMSERVICE_PLURAL

from . import autoscaler, certs
from . import builders as B
from .planning import NodeGPU, ServicePlan, plan_service
from .settings import OperatorSettings
from .spec import LLMServiceSpec, SpecError, check_name, parse_spec
from .status import (
    Condition,
    Key,
    capacity_condition,
    certificates_condition,
    merge,
    status_from,
)

GROUP, VERSION, PLURAL = API_GROUP, API_VERSION, LLMSERVICE_PLURAL

log = logging.getLogger(__name__)


# --- start-up ---------------------------------------------------------------------------------


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = logging.INFO
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="llamafleet.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="llamafleet.io")
    settings.networking.error_backoffs = [1, 2, 5, 10, 30, 60]
    if "settings" not in memo:  # kopf.run(memo=...) may bring them
        memo.settings = OperatorSettings()
    memo.dyn = DynamicClient(_api_client(memo.settings))
    memo.locks = KeyedLocks()


def _api_client(settings: OperatorSettings) -> ApiClient:
    if settings.kubeconfig:
        return k8s_config.new_client_from_config(config_file=settings.kubeconfig)
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
def reconcile(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger, memo: kopf.Memo,
              gpu_nodes: kopf.Index, **_: Any) -> None:
    _reconcile(body, patch, logger, memo, gpu_nodes, event=True)


# kopf fixes a timer's interval when the handler is registered, before any startup handler
# runs: the one setting read at import time.
@kopf.timer(GROUP, VERSION, PLURAL, interval=OperatorSettings().resync_seconds, idle=0)
def resync(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger, memo: kopf.Memo,
           gpu_nodes: kopf.Index, **_: Any) -> None:
    _reconcile(body, patch, logger, memo, gpu_nodes, event=False)


def _builtin_scaling(spec: kopf.Spec, **_: Any) -> bool:
    scaling = spec.get("scaling") or {}
    return bool(scaling) and scaling.get("mode", "builtin") == "builtin"


# Like resync's, this interval is fixed at import.
@kopf.timer(GROUP, VERSION, PLURAL, interval=OperatorSettings().autoscale_interval, idle=0,
            backoff=OperatorSettings().autoscale_interval, when=_builtin_scaling)
async def autoscale(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger,
                    memo: kopf.Memo, **_: Any) -> None:
    """spec.scaling.mode builtin: read the load, decide, write the scale subresource and
    status.autoscaling (llamafleet.operator.autoscaler)."""
    try:
        parsed = parse_spec(dict(body["spec"]))
    except SpecError:
        return  # reconcile reports it
    if parsed.scaling is None:
        return
    settings: OperatorSettings = memo.settings
    before = (body.get("status") or {}).get("autoscaling") or {}
    try:
        decision = await autoscaler.autoscale(dict(body), parsed, memo.dyn,
                                              settings.autoscale_read_timeout)
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


class KeyedLocks:
    """One lock per key (an LLMService's uid), kept only while a reconcile holds or waits
    for it: the last one to leave drops the entry. So the map never outgrows the reconciles
    in flight (kopf's worker threads), deleted LLMServices leave nothing behind, and no
    delete handler is needed (one would need a finalizer to be sure to run)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}  # key -> (lock, users)

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (None, 0))
            lock = lock or threading.Lock()
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)


def _reconcile(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger, memo: kopf.Memo,
               index: kopf.Index, event: bool) -> None:
    # kopf may run the timer and a change handler of one object at once (thread pool).
    with memo.locks.hold(body["metadata"]["uid"]):
        _reconcile_locked(body, patch, logger, memo, _nodes(index), event)


def _reconcile_locked(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger,
                      memo: kopf.Memo, nodes: list[NodeGPU], event: bool) -> None:
    """Parse, plan, write the children, then set the status from what was read back."""
    settings: OperatorSettings = memo.settings
    meta = body["metadata"]
    names = B.Names(meta["name"], meta["namespace"])
    conditions = list((body.get("status") or {}).get("conditions") or [])
    generation = meta.get("generation")

    settled: list[Condition] = []  # conditions already known when a later step fails

    def fail(phase: str | None, *conds: Condition) -> None:
        patch.status["conditions"] = merge(conditions, [*settled, *conds])
        if phase:
            patch.status["phase"] = phase

    try:
        check_name(names.name)
        parsed = parse_spec(dict(body["spec"]))
    except SpecError as e:
        fail("Failed", Condition("Ready", "False", "InvalidSpec", str(e)),
             Condition("Progressing", "False", "InvalidSpec", "Fix the spec to continue."))
        patch.status["observedGeneration"] = generation
        raise kopf.PermanentError(f"invalid spec: {e}") from None

    plan = plan_service(parsed, nodes)
    previous = ((body.get("status") or {}).get("capacity") or {}).get("maxBatchSize")
    patch.status["capacity"] = {"maxBatchSize": plan.max_batch_size, "mode": plan.mode,
                                "gpuMemoryMiB": plan.gpu_memory_mib, "reason": plan.reason}
    patch.status["selector"] = B.selector_string(names.name)
    # Rewritten below once the children show whether HTTP goes through the router yet;
    # "router": None removes that key (status is merge-patched).
    patch.status["endpoints"] = {"router": None,
                                 **B.endpoints(names, settings.cluster_domain, parsed, False)}
    patch.status["model"] = _model_label(parsed)
    patch.status["observedGeneration"] = generation
    if not plan.fits:
        st = status_from(parsed, plan, {})
        fail(st.phase, *st.conditions)
        raise kopf.TemporaryError(f"cannot place the model: {plan.reason}", delay=60)
    settled.append(capacity_condition(plan))
    if previous is not None and previous != plan.max_batch_size:
        logger.info("re-planned max_batch_size %s -> %s: %s", previous, plan.max_batch_size,
                    plan.reason)

    children = Children(memo.dyn, names, meta["uid"])
    step = "read"
    try:
        # Ownership first: if any object we would write (or delete) belongs to someone
        # else, change nothing at all.
        children.read(parsed)
        if (conflicts := children.conflicts()):
            msg = "; ".join(conflicts) + ". Nothing was changed: delete or rename those " \
                "objects, or give this LLMService another name."
            fail("Failed", Condition("Ready", "False", "Conflict", msg),
                 Condition("Progressing", "False", "Conflict", "Blocked by foreign objects."))
            raise kopf.TemporaryError(f"conflict: {msg}", delay=settings.resync_seconds)
        if parsed.scaling is not None and "replicas" not in (body.get("spec") or {}):
            step = "replicas"
            # The scale subresource reads an absent spec.replicas as 0: an HPA would think
            # the fleet is off and never scale it, KEDA that it is already at zero, and the
            # router that it must scale it from zero. Write the starting size once, as the
            # autoscaler does.
            autoscaler.write_replicas(memo.dyn, names, parsed.replicas)
        step = "certificates"
        if parsed.tls.enabled:
            not_after = ensure_certificates(children, body, names, parsed, logger,
                                            settings.cluster_domain)
            patch.status["certificates"] = {"notAfter": not_after.isoformat(),
                                            "clientSecret": names.client_secret}
        settled.append(certificates_condition(parsed, children.live))
        step = "api key"
        problem = ensure_api_key(children, body, names, parsed, logger)
        if problem:
            fail("Degraded", Condition("Ready", "False", "APIKeyMissing", problem))
            raise kopf.TemporaryError(problem, delay=settings.resync_seconds)
        image = B.image_for(parsed, settings)
        was_routed, routed = routing(children, names, parsed)
        patch.status["endpoints"] = {"router": None, **B.endpoints(
            names, settings.cluster_domain, parsed, routed)}
        # The NetworkPolicy goes first: pods never run without it when it is wanted.
        step = "network policy"
        if parsed.networkPolicy.enabled:
            children.apply(body, B.build_network_policy(
                names, parsed, routed_only=was_routed and routed,
                operator_peer=settings.operator_peer), logger, event)
        else:
            children.remove(NETWORK_POLICY, logger)
        step = "children"
        if parsed.podDisruptionBudget.enabled and parsed.replicas > 0:
            children.apply(body, B.build_pdb(names, parsed), logger, event)
        else:
            children.remove(PDB, logger)
        if parsed.router_enabled:
            step = "router"  # its RBAC before the pods that use it
            for obj in (B.build_router_service_account(names), B.build_router_role(names),
                        B.build_router_role_binding(names),
                        B.build_router_deployment(names, parsed, image)):
                children.apply(body, obj, logger, event)
            step = "children"
        children.apply(body, B.build_pod_service(names), logger, event)
        children.apply(body, B.build_service(names, routed), logger, event)
        children.apply(body, B.build_deployment(names, parsed, plan, image), logger, event)
        if not parsed.router_enabled:  # after the Service is back on the pods
            for key in reversed(router_keys(names)):
                children.remove(key, logger)
        if parsed.routing.inferencePool.enabled:
            children.apply(body, B.build_inference_pool(names, parsed), logger, event)
        else:
            children.remove(INFERENCE_POOL, logger)
        step = "autoscaling"
        mode = parsed.scaling.mode if parsed.scaling else None
        if mode == "hpa":
            children.apply(body, B.build_hpa(names, parsed, plan), logger, event)
        else:
            children.remove(HPA, logger)
        if mode == "keda":
            children.apply(body, B.build_scaled_object(names, parsed, plan,
                                                       settings.prometheus_url), logger, event)
        else:
            children.remove(SCALED_OBJECT, logger)
    except MissingAPI as e:
        fail("Degraded", Condition("Ready", "False", "MissingAPI", str(e)))
        raise kopf.TemporaryError(str(e), delay=settings.resync_seconds) from None
    except (ApiException, DynApiException) as e:
        if step == "network policy":
            ready, reason, msg = "False", "NetworkPolicyFailed", "the NetworkPolicy could " \
                f"not be applied, so the Deployment is held back: {e.status} {e.reason}; retrying"
        else:
            ready, reason, msg = "Unknown", "APIError", f"Kubernetes API error ({step}): " \
                f"{e.status} {e.reason}; retrying"
        fail(None, Condition("Ready", ready, reason, msg))
        raise kopf.TemporaryError(msg, delay=min(10.0, settings.resync_seconds)) from e

    st = status_from(parsed, plan, children.live)
    patch.status.update(phase=st.phase, conditions=merge(conditions, st.conditions),
                        replicas=st.replicas, readyReplicas=st.ready_replicas)


def _model_label(spec: LLMServiceSpec) -> str:
    src = spec.model.source
    if src.pvc:
        return f"pvc:{src.pvc.claimName}/{src.pvc.path}"
    if src.url:
        return src.url.url.rsplit("/", 1)[-1]
    assert src.embedded is not None
    return f"embedded:{src.embedded.name}"


def routing(children: Children, names: B.Names, spec: LLMServiceSpec) -> tuple[bool, bool]:
    """(was_routed, routed): whether Service ``<name>`` selected the router when read, and
    whether it selects the router from now on.

    It moves to the router once a router pod is ready, so that enabling the router never
    sends clients to pods that are still starting; it stays there while the router
    Deployment exists, so that it does not flap with the router's readiness.
    """
    service = children.get(SERVICE) or {}
    was = (service.get("spec") or {}).get("selector") == B.router_selector_labels(names.name)
    router = router_keys(names)[-1]
    if not spec.router_enabled or not children.owned(router):
        return was, False
    ready = int(((children.get(router) or {}).get("status") or {}).get("readyReplicas") or 0)
    return was, was or ready > 0


# --- children: ownership, drift repair ------------------------------------------------------

DEPLOYMENT = ("apps/v1", "Deployment", "")
SERVICE = ("v1", "Service", "")
NETWORK_POLICY = ("networking.k8s.io/v1", "NetworkPolicy", "")
PDB = ("policy/v1", "PodDisruptionBudget", "")
INFERENCE_POOL = (B.INFERENCE_POOL_API, "InferencePool", "")
HPA = ("autoscaling/v2", "HorizontalPodAutoscaler", "")
SCALED_OBJECT = (B.KEDA_API, "ScaledObject", "")
# What to install when the cluster does not serve a kind the spec asks for.
INSTALL_HINT = {
    "InferencePool": "install the Gateway API Inference Extension CRDs, or disable "
                     "spec.routing.inferencePool",
    "ScaledObject": "install KEDA, or use spec.scaling.mode builtin or hpa",
}
RBAC = "rbac.authorization.k8s.io/v1"


def router_keys(names: B.Names) -> list[Key]:
    """The router's children, in the order they are created (the Deployment last)."""
    return [("v1", "ServiceAccount", names.router), (RBAC, "Role", names.router),
            (RBAC, "RoleBinding", names.router), ("apps/v1", "Deployment", names.router)]


class MissingAPI(Exception):
    """The cluster does not serve a kind the spec asks for (its CRD is not installed)."""


def _secret(name: str) -> Key:
    return ("v1", "Secret", name)


def controller_uid(obj: dict) -> str | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


class Children:
    """The objects one LLMService owns, read once per reconcile.

    Only objects whose controller ownerReference is this LLMService's UID are ever
    written or deleted. Writes are read-compare-replace: when the live object differs
    from the desired one (content hash, or any desired field changed or missing), it is
    replaced (PUT, guarded by resourceVersion), which also removes fields that the
    desired object no longer has. Fields the desired object never sets (server
    defaults, other controllers' annotations) do not count as drift.
    """

    def __init__(self, dyn: DynamicClient, names: B.Names, uid: str):
        self.dyn, self.names, self.uid = dyn, names, uid
        self.live: dict[Key, dict | None] = {}
        self.writes: set[Key] = set()

    def _key(self, key: Key) -> Key:
        return key if key[2] else (key[0], key[1], self.names.name)

    def _api(self, key: Key) -> Any:
        return self.dyn.resources.get(api_version=key[0], kind=key[1])

    def read(self, spec: LLMServiceSpec) -> dict[Key, dict | None]:
        """Read every child this spec writes, or deletes if it is ours."""
        writes = [DEPLOYMENT, SERVICE, ("v1", "Service", self.names.pod_service)]
        optional = [NETWORK_POLICY, PDB, _secret(self.names.api_key_secret)]
        if spec.networkPolicy.enabled:
            writes.append(optional.pop(0))
        if spec.podDisruptionBudget.enabled and spec.replicas > 0:
            writes.append(PDB)
            optional.remove(PDB)
        if not spec.auth.apiKeySecret:
            writes.append(optional.pop())
        elif spec.auth.apiKeySecret == self.names.api_key_secret:  # the user's own Secret
            optional.pop()
        if spec.tls.enabled:
            writes += [_secret(n) for n in (self.names.ca_secret, self.names.server_secret,
                                            self.names.client_secret)]
        (writes if spec.routing.inferencePool.enabled else optional).append(INFERENCE_POOL)
        mode = spec.scaling.mode if spec.scaling else None
        (writes if mode == "hpa" else optional).append(HPA)
        (writes if mode == "keda" else optional).append(SCALED_OBJECT)
        (writes if spec.router_enabled else optional).extend(router_keys(self.names))
        self.writes = {self._key(k) for k in writes}
        for key in map(self._key, writes + optional):
            try:
                self.live[key] = self._api(key).get(
                    name=key[2], namespace=self.names.namespace).to_dict()
            except NotFoundError:
                self.live[key] = None
            except ResourceNotFoundError:  # not served here: nothing of ours to delete
                if key in self.writes:
                    hint = INSTALL_HINT.get(key[1], "install its CRD")
                    raise MissingAPI(f"the cluster does not serve {key[0]} {key[1]}: "
                                     f"{hint}") from None
                self.live[key] = None
        return self.live

    def get(self, key: Key) -> dict | None:
        return self.live.get(self._key(key))

    def conflicts(self) -> list[str]:
        """Existing objects with our names that this LLMService does not control."""
        out = []
        for (api_version, kind, name), obj in self.live.items():
            if (api_version, kind, name) not in self.writes:
                continue  # a same-named object we would only delete if ours: left alone
            if obj is not None and controller_uid(obj) != self.uid:
                out.append(f"{kind} {self.names.namespace}/{name} exists and is not controlled "
                           f"by this LLMService ({_controller_of(obj)})")
        return out

    def owned(self, key: Key) -> bool:
        obj = self.get(key)
        return obj is not None and controller_uid(obj) == self.uid

    def apply(self, owner: kopf.Body, obj: dict, logger: logging.Logger,
              event: bool = True) -> None:
        """Create the object, or replace it when the live one drifted from it."""
        kopf.adopt(obj, owner=owner)
        key = (obj["apiVersion"], obj["kind"], obj["metadata"]["name"])
        live = self.get(key)
        api, ns = self._api(key), self.names.namespace
        if live is None:
            self.live[key] = api.create(body=obj, namespace=ns).to_dict()
            verb = "created"
        elif controller_uid(live) != self.uid:  # read() reports these before any write
            raise kopf.TemporaryError(f"{key[1]} {key[2]} is not ours", delay=60)
        elif drifted(obj, live):
            body = json.loads(json.dumps(obj))
            meta = body["metadata"]
            meta["resourceVersion"] = live["metadata"].get("resourceVersion")
            if live["metadata"].get("finalizers"):
                meta["finalizers"] = live["metadata"]["finalizers"]
            if "status" in live:  # ignored by the API server; kept for emulators
                body["status"] = live["status"]
            if obj["kind"] == "Service":  # immutable, allocated by the API server
                for field in ("clusterIP", "clusterIPs"):
                    if field in (live.get("spec") or {}):
                        body["spec"][field] = live["spec"][field]
            self.live[key] = api.replace(body=body, name=key[2], namespace=ns).to_dict()
            verb = "updated"
        else:
            return
        if event:
            logger.info("%s %s %s", verb, obj["kind"], key[2])
        else:
            log.info("%s %s %s/%s", verb, obj["kind"], ns, key[2])

    def remove(self, key: Key, logger: logging.Logger) -> None:
        """Delete a child that the spec no longer wants, only if it is ours."""
        key = self._key(key)
        if self.owned(key):
            self._api(key).delete(name=key[2], namespace=self.names.namespace)
            self.live[key] = None
            logger.info("deleted %s %s (no longer in the spec)", key[1], key[2])


def _controller_of(obj: dict) -> str:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return f"controller: {ref.get('kind')} {ref.get('name')}"
    return "no controller"


def drifted(desired: dict, live: dict) -> bool:
    want = desired["metadata"].get("annotations", {}).get(B.HASH_ANNOTATION)
    have = ((live.get("metadata") or {}).get("annotations") or {}).get(B.HASH_ANNOTATION)
    return want != have or not _contains(live, desired)


def _contains(live: Any, want: Any) -> bool:
    """Every field of ``want`` is in ``live`` with the same value (lists: same length)."""
    if isinstance(want, dict):
        return isinstance(live, dict) and all(
            k in live and _contains(live[k], v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(live, list) and len(live) == len(want) and all(
            _contains(a, b) for a, b in zip(live, want, strict=False))
    return live == want or _same_scalar(live, want)


def _same_scalar(a: Any, b: Any) -> bool:
    """The API server returns quantities and ints-as-strings in canonical form."""
    if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
        return False
    if str(a) == str(b):
        return True
    try:
        return parse_quantity(a) == parse_quantity(b)
    except (ValueError, TypeError):
        return False


# --- secrets ----------------------------------------------------------------------------------

ROTATION_PHASE = "llamafleet.io/ca-rotation"
ROTATION_SINCE = "llamafleet.io/ca-rotation-since"


def _pair(secret: dict | None, key: str, cert: str) -> certs.KeyPair | None:
    if secret is None:
        return None
    k, c = B.secret_bytes(secret, key), B.secret_bytes(secret, cert)
    return certs.KeyPair(k, c) if k and c else None


def read_ca(secret: dict | None) -> certs.CAState | None:
    if secret is None:
        return None
    bundle = B.secret_bytes(secret, "ca.crt")
    signer = _pair(secret, "ca.key", "signer.crt") or _pair(secret, "ca.key", "ca.crt")
    if signer is None or bundle is None:
        return None
    annotations = (secret.get("metadata") or {}).get("annotations") or {}
    phase = annotations.get(ROTATION_PHASE, "")
    try:
        since = dt.datetime.fromisoformat(annotations[ROTATION_SINCE])
    except (KeyError, ValueError):
        since = dt.datetime.fromtimestamp(0, dt.UTC)
    return certs.CAState(signer, bundle, _pair(secret, "next.key", "next.crt"),
                         phase if phase in ("overlap", "reissued") else "", since)


def build_ca_secret(names: B.Names, ca: certs.CAState) -> dict:
    data = {"ca.crt": ca.bundle, "ca.key": ca.signer.key_pem, "signer.crt": ca.signer.cert_pem}
    if ca.next is not None:
        data.update({"next.crt": ca.next.cert_pem, "next.key": ca.next.key_pem})
    annotations = {ROTATION_PHASE: ca.phase, ROTATION_SINCE: ca.since.isoformat()} \
        if ca.phase and ca.since else None
    return B.build_secret(names, names.ca_secret, data, False, annotations=annotations)


def ensure_certificates(children: Children, owner: kopf.Body, names: B.Names,
                        spec: LLMServiceSpec, logger: logging.Logger,
                        cluster_domain: str) -> dt.datetime:
    """CA, server and client Secrets: issue what is missing, renew what is due, and rotate
    the CA with an overlap (certs.advance_ca). Returns the earliest leaf expiry."""
    validity = certs.parse_duration(spec.tls.validity)
    renew = certs.parse_duration(spec.tls.renewBefore)
    overlap = certs.parse_duration(spec.tls.caOverlap)
    now = dt.datetime.now(dt.UTC)
    before = read_ca(children.get(_secret(names.ca_secret)))
    leaves = {secret_name: _pair(children.get(_secret(secret_name)), "tls.key", "tls.crt")
              for secret_name in (names.server_secret, names.client_secret)}
    due = certs.renewal_due(before, leaves, renew_before=renew, overlap=overlap, now=now)
    due_leaves = set(due.leaves)
    server = leaves[names.server_secret]
    sans = names.dns_names(cluster_domain)
    if server is not None and certs.subject_names(server) != set(sans):
        due_leaves.add(names.server_secret)  # the Services' names changed (e.g. <name>-pods)
    ca = certs.advance_ca(before, f"{names.name}.{names.namespace} llamafleet CA",
                          validity=validity, renew_before=renew, overlap=overlap, now=now)
    if due.ca:
        logger.info("CA of %s: %s", names.name, {
            "new": "issued a new CA", "rotate": "published a new CA beside the old one",
            "switch": "leaf certificates move to the new CA",
            "drop": "dropped the old CA"}[due.ca])
    children.apply(owner, build_ca_secret(names, ca), logger)
    not_after = []
    for secret_name, leaf in leaves.items():
        client = secret_name == names.client_secret
        if secret_name in due_leaves:
            leaf = certs.issue(ca.signer, f"{names.name}-{'client' if client else 'server'}",
                               validity, sans=[] if client else sans, client=client)
            logger.info("%s %s certificate, valid until %s",
                        "renewed" if children.get(_secret(secret_name)) is not None
                        else "issued", "client" if client else "server",
                        leaf.not_after.isoformat())
        assert leaf is not None  # renewal_due names every missing leaf
        children.apply(owner, B.build_secret(names, secret_name, {
            "tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem, "ca.crt": ca.bundle}, True),
            logger)
        not_after.append(leaf.not_after)
    return min(not_after)


def ensure_api_key(children: Children, owner: kopf.Body, names: B.Names,
                   spec: LLMServiceSpec, logger: logging.Logger) -> str | None:
    """Generate `<name>-api-key` (kept once made), or check the user's Secret; returns a
    problem to report, or None."""
    generated = _secret(names.api_key_secret)
    if spec.auth.apiKeySecret:
        if spec.auth.apiKeySecret != names.api_key_secret:
            children.remove(generated, logger)
        secret_name, key = B.api_key_ref(names, spec)
        try:
            user = children.dyn.resources.get(api_version="v1", kind="Secret").get(
                name=secret_name, namespace=names.namespace).to_dict()
        except NotFoundError:
            return f"spec.auth.apiKeySecret names Secret {secret_name}, which does not exist"
        if not B.secret_bytes(user, key):
            return f"Secret {secret_name} has no key {key!r} (spec.auth.apiKeySecretKey)"
        return None
    current = children.get(generated)
    value = B.secret_bytes(current, B.API_KEY_KEY) if current else None
    if not value:
        value = secrets.token_urlsafe(32).encode()
    children.apply(owner, B.build_secret(names, names.api_key_secret, {B.API_KEY_KEY: value},
                                         False, component="auth"), logger)
    return None


__all__ = ["reconcile", "resync", "gpu_nodes", "startup", "Children", "ensure_certificates",
           "ensure_api_key", "ServicePlan"]
