"""A reconcile as data: (spec, capacity plan, names, observed state) -> the ordered steps.

Pure: nothing here talks to the API server. :mod:`llamafleet.operator.reconcile` reads the
children, calls :func:`plan_steps` and walks the list; each step says which condition it
sets when the API server refuses it. The order is the point, and each rule is a unit test
(tests/operator/test_reconcile_steps.py):

1. ``spec.replicas`` is written through the scale subresource before anything else when
   spec.scaling is set and the object has none (the scale subresource reads an absent
   spec.replicas as 0).
2. The Secrets (certificates, then the API key) before the workloads that mount them. A
   user's API key Secret first replaces the generated one (deleted); one that does not
   exist, or lacks its key, stops the reconcile there (Ready False APIKeyMissing).
3. The NetworkPolicy before every workload: pods never run without it when it is wanted.
   Its failure holds the Deployment back (Ready False NetworkPolicyFailed).
4. The router's ServiceAccount, Role and RoleBinding before its Deployment, so that its
   RBAC exists before the pods that use it; the router ahead of the Services (Service
   ``<name>`` may select its pods) and of the serve pods' Deployment.
5. Service ``<name>`` is (re)pointed before the router's objects are deleted, which go in
   reverse order of creation (Deployment first): turning the router off never leaves the
   Service selecting pods that are going away.
6. Service ``<name>`` moves to the router only once a router pod is Ready, and stays there
   while the router Deployment exists (:func:`routing`). The NetworkPolicy closes the
   pods' HTTP port to clients one reconcile later, once the Service was read routed.
7. The InferencePool after the pods' Service and Deployment, then the
   HorizontalPodAutoscaler and ScaledObject, after the workloads they scale.
8. A child the spec turns off is deleted at the place where it would be written, and only
   if this LLMService controls it (:class:`Delete`).
9. A URL model with the model cache on (:mod:`llamafleet.operator.model_cache`): the cache's
   claim and Job are ensured before the Deployment, and the Deployment is written only once
   the Job has put the file in the cache. Meanwhile a live Deployment is left as it is (the
   model it serves keeps serving while a new one downloads); pods never start on a file
   that is not there.
10. spec.adapters: the ConfigMap the pods read their start-up adapters from before the
   Deployment (new pods start with the new list); the running pods are brought to it last
   (:mod:`llamafleet.operator.adapters`), after every write to the API server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from . import builders as B
from .model_cache import CacheState
from .planning import ServicePlan
from .settings import OperatorSettings
from .spec import LLMServiceSpec
from .status import Condition, Key

# Children whose name is the LLMService's: "" is filled in with Names.name (:func:`named`).
DEPLOYMENT: Key = ("apps/v1", "Deployment", "")
SERVICE: Key = ("v1", "Service", "")
NETWORK_POLICY: Key = ("networking.k8s.io/v1", "NetworkPolicy", "")
PDB: Key = ("policy/v1", "PodDisruptionBudget", "")
INFERENCE_POOL: Key = (B.INFERENCE_POOL_API, "InferencePool", "")
HPA: Key = ("autoscaling/v2", "HorizontalPodAutoscaler", "")
SCALED_OBJECT: Key = (B.KEDA_API, "ScaledObject", "")
RBAC = "rbac.authorization.k8s.io/v1"


def named(key: Key, names: B.Names) -> Key:
    return key if key[2] else (key[0], key[1], names.name)


def secret_key(name: str) -> Key:
    return ("v1", "Secret", name)


def adapters_key(names: B.Names) -> Key:
    return ("v1", "ConfigMap", B.adapters_config_map_name(names))


def router_keys(names: B.Names) -> list[Key]:
    """The router's children, in the order they are created (the Deployment last)."""
    return [("v1", "ServiceAccount", names.router), (RBAC, "Role", names.router),
            (RBAC, "RoleBinding", names.router), ("apps/v1", "Deployment", names.router)]


def child_keys(spec: LLMServiceSpec, names: B.Names) -> tuple[list[Key], list[Key]]:
    """(writes, deletes): the children this spec writes, and those it deletes if they are
    this LLMService's. Both are read before any step; a same-named object in ``writes``
    that another controller owns blocks the reconcile."""
    writes = [DEPLOYMENT, SERVICE, ("v1", "Service", names.pod_service)]
    deletes = [NETWORK_POLICY, PDB, secret_key(names.api_key_secret)]
    if spec.networkPolicy.enabled:
        writes.append(deletes.pop(0))
    if spec.podDisruptionBudget.enabled and spec.replicas > 0:
        writes.append(PDB)
        deletes.remove(PDB)
    if not spec.auth.apiKeySecret:
        writes.append(deletes.pop())
    elif spec.auth.apiKeySecret == names.api_key_secret:  # the user's own Secret
        deletes.pop()
    if spec.tls.enabled:
        writes += [secret_key(n) for n in (names.ca_secret, names.server_secret,
                                           names.client_secret)]
    (writes if spec.routing.inferencePool.enabled else deletes).append(INFERENCE_POOL)
    mode = spec.scaling.mode if spec.scaling else None
    (writes if mode == "hpa" else deletes).append(HPA)
    (writes if mode == "keda" else deletes).append(SCALED_OBJECT)
    (writes if spec.router_enabled else deletes).extend(router_keys(names))
    (writes if spec.adapters else deletes).append(adapters_key(names))
    return [named(k, names) for k in writes], [named(k, names) for k in deletes]


@dataclass(frozen=True)
class Observed:
    """What the plan needs from the world, as read before any step."""

    replicas_set: bool  # the object's spec has replicas (absent: the scale subresource reads 0)
    service: dict | None = None  # Service <name>
    router: dict | None = None  # the router Deployment, when this LLMService controls it
    cache: CacheState | None = None  # the model's cache entry, when the model cache holds it
    adapters_reported: bool = False  # status.adapters is set (pods may still hold adapters)
    adapters_refused: frozenset[str] = frozenset()  # adapters a pod could not load, last time


def routing(names: B.Names, spec: LLMServiceSpec, observed: Observed) -> tuple[bool, bool]:
    """(was_routed, routed): whether Service ``<name>`` selected the router when read, and
    whether it selects the router from now on.

    It moves to the router once a router pod is ready, so that enabling the router never
    sends clients to pods that are still starting; it stays there while the router
    Deployment exists, so that it does not flap with the router's readiness.
    """
    service = observed.service or {}
    was = (service.get("spec") or {}).get("selector") == B.router_selector_labels(names.name)
    if not spec.router_enabled or observed.router is None:
        return was, False
    ready = int((observed.router.get("status") or {}).get("readyReplicas") or 0)
    return was, was or ready > 0


# --- steps ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OnFailure:
    """The condition a step sets when the API server refuses it; ``message`` has an
    ``{error}`` field for the API server's status and reason."""

    type: str
    status: str
    reason: str
    message: str

    def condition(self, error: str) -> Condition:
        return Condition(self.type, self.status, self.reason, self.message.format(error=error))


def api_error(label: str) -> OnFailure:
    return OnFailure("Ready", "Unknown", "APIError",
                     f"Kubernetes API error ({label}): {{error}}; retrying")


NETWORK_POLICY_FAILED = OnFailure(
    "Ready", "False", "NetworkPolicyFailed",
    "the NetworkPolicy could not be applied, so the Deployment is held back: {error}; retrying")


@dataclass(frozen=True)
class Apply:
    """Create ``obj``, or replace it when the live one drifted."""

    obj: dict
    on_failure: OnFailure

    @property
    def key(self) -> Key:
        return (self.obj["apiVersion"], self.obj["kind"], self.obj["metadata"]["name"])


@dataclass(frozen=True)
class Delete:
    """Delete the child ``key`` if this LLMService controls it (absent: nothing to do)."""

    key: Key
    on_failure: OnFailure


WRITE_REPLICAS, CERTIFICATES, API_KEY, MODEL_CACHE, ADAPTERS = \
    "replicas", "certificates", "api key", "model cache", "adapters"
Action = Literal["replicas", "certificates", "api key", "model cache", "adapters"]
ACTIONS: tuple[Action, ...] = (WRITE_REPLICAS, CERTIFICATES, API_KEY, MODEL_CACHE, ADAPTERS)


@dataclass(frozen=True)
class Ensure:
    """An action that llamafleet.operator.reconcile carries out itself: what it writes
    depends on what was read, the clock or chance (new keys and certificates)."""

    action: Action
    on_failure: OnFailure


Step = Apply | Delete | Ensure


def _apply_or_delete(wanted: bool, build: Callable[[], dict], key: Key, names: B.Names,
                     on_failure: OnFailure) -> Apply | Delete:
    """A child the spec may turn off: written when wanted, else deleted if ours."""
    return Apply(build(), on_failure) if wanted else Delete(named(key, names), on_failure)


def plan_steps(spec: LLMServiceSpec, plan: ServicePlan, names: B.Names, observed: Observed,
               settings: OperatorSettings) -> list[Step]:
    """The ordered steps of one reconcile (the module's docstring says why this order)."""
    was_routed, routed = routing(names, spec, observed)
    image = B.image_for(spec, settings)
    children, router, scaling = api_error("children"), api_error("router"), \
        api_error("autoscaling")
    steps: list[Step] = []
    if spec.scaling is not None and not observed.replicas_set:
        steps.append(Ensure(WRITE_REPLICAS, api_error(WRITE_REPLICAS)))
    if spec.tls.enabled:
        steps.append(Ensure(CERTIFICATES, api_error(CERTIFICATES)))
    if spec.auth.apiKeySecret and spec.auth.apiKeySecret != names.api_key_secret:
        # The user's Secret replaces the generated one.
        steps.append(Delete(secret_key(names.api_key_secret), api_error(API_KEY)))
    steps.append(Ensure(API_KEY, api_error(API_KEY)))
    steps.append(_apply_or_delete(
        spec.networkPolicy.enabled,
        lambda: B.build_network_policy(names, spec, routed_only=was_routed and routed,
                                       operator_peer=settings.operator_peer),
        NETWORK_POLICY, names, NETWORK_POLICY_FAILED))
    steps.append(_apply_or_delete(spec.podDisruptionBudget.enabled and spec.replicas > 0,
                                  lambda: B.build_pdb(names, spec), PDB, names, children))
    if spec.router_enabled:
        steps += [Apply(obj, router) for obj in (
            B.build_router_service_account(names), B.build_router_role(names),
            B.build_router_role_binding(names), B.build_router_deployment(names, spec, image))]
    steps.append(_apply_or_delete(bool(spec.adapters),
                                  lambda: B.build_adapters_config_map(
                                      names, spec, observed.adapters_refused),
                                  adapters_key(names), names, children))
    steps += [Apply(B.build_pod_service(names), children),
              Apply(B.build_service(names, routed), children)]
    cache = observed.cache
    if cache is not None:
        steps.append(Ensure(MODEL_CACHE, api_error(MODEL_CACHE)))
    if cache is None or cache.ready:
        steps.append(Apply(B.build_deployment(names, spec, plan, image,
                                              cache.claim if cache else None), children))
    if not spec.router_enabled:
        steps += [Delete(key, children) for key in reversed(router_keys(names))]
    steps.append(_apply_or_delete(spec.routing.inferencePool.enabled,
                                  lambda: B.build_inference_pool(names, spec),
                                  INFERENCE_POOL, names, children))
    mode = spec.scaling.mode if spec.scaling else None
    steps.append(_apply_or_delete(mode == "hpa", lambda: B.build_hpa(names, spec, plan),
                                  HPA, names, scaling))
    steps.append(_apply_or_delete(
        mode == "keda", lambda: B.build_scaled_object(names, spec, plan, settings.prometheus_url),
        SCALED_OBJECT, names, scaling))
    if spec.adapters or observed.adapters_reported:
        steps.append(Ensure(ADAPTERS, api_error(ADAPTERS)))
    return steps


def step_keys(steps: Sequence[Step]) -> list[Key]:
    """The children the steps apply or delete, in order (actions left out)."""
    return [s.key for s in steps if not isinstance(s, Ensure)]
