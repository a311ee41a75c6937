"""One reconcile of one LLMService: parse the spec, plan the capacity, read the children,
walk the steps that :func:`llamafleet.operator.reconcile_steps.plan_steps` lists, and set
the status from what was read back.

Reconciliation is idempotent and level-based: the same function runs on create, on spec
updates, on operator restart (resume) and on a timer that re-plans against the nodes,
renews certificates and refreshes status. Ownership and drift are the Children client's
(:mod:`llamafleet.operator.children`): anything of ours that another controller owns
blocks the whole reconcile before anything is changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import kopf
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import ApiException as DynApiException

from . import adapters as adapter_sync
from . import builders as B
from . import model_cache, model_cache_io, scaling_loop
from .api_key import ensure_api_key
from .children import Children, MissingAPI
from .planning import NodeGPU, plan_service
from .reconcile_steps import (
    ADAPTERS,
    API_KEY,
    CERTIFICATES,
    MODEL_CACHE,
    SERVICE,
    WRITE_REPLICAS,
    Apply,
    Delete,
    Observed,
    OnFailure,
    Step,
    api_error,
    child_keys,
    plan_steps,
    router_keys,
    routing,
)
from .settings import OperatorSettings
from .spec import LLMServiceSpec, SpecError, check_name, parse_spec
from .status import (
    Condition,
    capacity_condition,
    certificates_condition,
    merge,
    model_condition,
    model_label,
    status_from,
)
from .tls_secrets import ensure_certificates


class Halt(Exception):
    """The reconcile stops here: ``conditions`` (and ``phase``, unless None) go to the
    status and kopf retries after ``delay`` seconds."""

    def __init__(self, message: str, phase: str | None, conditions: Iterable[Condition],
                 delay: float):
        super().__init__(message)
        self.phase, self.conditions, self.delay = phase, tuple(conditions), delay


def refused(on_failure: OnFailure, error: ApiException | DynApiException, delay: float) -> Halt:
    """The Halt of a step the API server refused: the step's own condition."""
    condition = on_failure.condition(f"{error.status} {error.reason}")
    return Halt(condition.message, None, [condition], delay)


def apply_steps(steps: Sequence[Step], children: Children, owner: kopf.Body,
                logger: logging.Logger, event: bool, actions: Mapping[str, Callable[[], None]],
                retry_delay: float) -> None:
    """Walk the steps in order. The first one the API server refuses stops the walk: it
    raises :class:`Halt` with that step's condition (the later steps wait for the retry)."""
    for step in steps:
        try:
            if isinstance(step, Apply):
                children.apply(owner, step.obj, logger, event)
            elif isinstance(step, Delete):
                children.remove(step.key, logger)
            else:
                actions[step.action]()
        except (ApiException, DynApiException) as e:
            raise refused(step.on_failure, e, retry_delay) from e


def run(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger, memo: kopf.Memo,
        nodes: list[NodeGPU], event: bool) -> None:
    """One reconcile at a time per LLMService: kopf may run the timer and a change handler
    of one object at once (thread pool)."""
    with memo.locks.hold(body["metadata"]["uid"]):
        run_locked(body, patch, logger, memo, nodes, event)


def run_locked(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger,
               memo: kopf.Memo, nodes: list[NodeGPU], event: bool) -> None:
    """Parse, plan, write the children, then set the status from what was read back."""
    settings: OperatorSettings = memo.settings
    meta = body["metadata"]
    names = B.Names(meta["name"], meta["namespace"])
    previous = list((body.get("status") or {}).get("conditions") or [])
    settled: list[Condition] = []  # conditions already known when a later step fails
    reported: list[Condition] = []  # conditions of the steps that talk to the pods

    def fail(phase: str | None, *conds: Condition) -> None:
        patch.status["conditions"] = merge(previous, [*settled, *conds])
        if phase:
            patch.status["phase"] = phase

    try:
        check_name(names.name)
        spec = parse_spec(dict(body["spec"]))
    except SpecError as e:
        fail("Failed", Condition("Ready", "False", "InvalidSpec", str(e)),
             Condition("Progressing", "False", "InvalidSpec", "Fix the spec to continue."))
        patch.status["observedGeneration"] = meta.get("generation")
        raise kopf.PermanentError(f"invalid spec: {e}") from None

    plan = plan_service(spec, nodes)
    planned_before = ((body.get("status") or {}).get("capacity") or {}).get("maxBatchSize")
    patch.status["capacity"] = {"maxBatchSize": plan.max_batch_size, "mode": plan.mode,
                                "gpuMemoryMiB": plan.gpu_memory_mib, "reason": plan.reason}
    patch.status["selector"] = B.selector_string(names.name)
    # Rewritten once the children show whether HTTP goes through the router yet;
    # "router": None removes that key (status is merge-patched).
    patch.status["endpoints"] = {"router": None,
                                 **B.endpoints(names, settings.cluster_domain, spec, False)}
    patch.status["model"] = model_label(spec)
    patch.status["observedGeneration"] = meta.get("generation")
    children = Children(memo.dyn, names, meta["uid"])
    try:
        if not plan.fits:
            st = status_from(spec, plan, {})
            raise Halt(f"cannot place the model: {plan.reason}", st.phase, st.conditions, 60)
        settled.append(capacity_condition(plan))
        if planned_before is not None and planned_before != plan.max_batch_size:
            logger.info("re-planned max_batch_size %s -> %s: %s", planned_before,
                        plan.max_batch_size, plan.reason)
        observed = _read(children, body, spec, settings)
        if not spec.tls.enabled:
            settled.append(certificates_condition(spec, children.live))
        patch.status["endpoints"] = {"router": None, **B.endpoints(
            names, settings.cluster_domain, spec, routing(names, spec, observed)[1])}
        actions = _actions(children, body, patch, logger, spec, settings, settled, observed,
                           reported)
        apply_steps(plan_steps(spec, plan, names, observed, settings), children, body, logger,
                    event, actions, retry_delay=min(10.0, settings.resync_seconds))
    except Halt as h:
        fail(h.phase, *h.conditions)
        raise kopf.TemporaryError(str(h), delay=h.delay) from h.__cause__

    st = status_from(spec, plan, children.live, observed.cache)
    patch.status["modelCache"] = observed.cache.status() if observed.cache else None
    conditions = [*st.conditions, model_condition(spec, settings.model_cache_enabled,
                                                  observed.cache), *reported]
    patch.status.update(phase=st.phase, conditions=merge(previous, conditions),
                        replicas=st.replicas, readyReplicas=st.ready_replicas)


def _read(children: Children, body: kopf.Body, spec: LLMServiceSpec,
          settings: OperatorSettings) -> Observed:
    """Ownership first: if any object we would write (or delete) belongs to someone else,
    change nothing at all."""
    try:
        children.read(*child_keys(spec, children.names))
    except MissingAPI as e:
        raise Halt(str(e), "Degraded", [Condition("Ready", "False", "MissingAPI", str(e))],
                   settings.resync_seconds) from None
    except (ApiException, DynApiException) as e:
        raise refused(api_error("read"), e, min(10.0, settings.resync_seconds)) from e
    if (conflicts := children.conflicts()):
        msg = "; ".join(conflicts) + ". Nothing was changed: delete or rename those " \
            "objects, or give this LLMService another name."
        raise Halt(f"conflict: {msg}", "Failed", [
            Condition("Ready", "False", "Conflict", msg),
            Condition("Progressing", "False", "Conflict", "Blocked by foreign objects.")],
            settings.resync_seconds)
    router = router_keys(children.names)[-1]
    cache = None
    if (entry := model_cache.model_entry(spec, settings.model_cache_enabled)) is not None:
        try:
            cache = model_cache_io.read_cache(
                children.dyn, children.names.namespace, entry, settings, children.uid,
                (body.get("status") or {}).get("modelCache"))
        except (ApiException, DynApiException) as e:
            raise refused(api_error(MODEL_CACHE), e, min(10.0, settings.resync_seconds)) from e
    reported = (body.get("status") or {}).get("adapters") or []
    return Observed(replicas_set="replicas" in (body.get("spec") or {}),
                    service=children.get(SERVICE),
                    router=children.get(router) if children.owned(router) else None,
                    cache=cache,
                    adapters_reported=bool(reported),
                    adapters_refused=frozenset(n for p in reported for n in p.get("refused") or []))


def _actions(children: Children, body: kopf.Body, patch: kopf.Patch, logger: logging.Logger,
             spec: LLMServiceSpec, settings: OperatorSettings, settled: list[Condition],
             observed: Observed, reported: list[Condition]) -> dict[str, Callable[[], None]]:
    """The plan's Ensure steps, carried out against this reconcile's children."""
    names = children.names

    def write_replicas() -> None:
        # The scale subresource reads an absent spec.replicas as 0: an HPA would think the
        # fleet is off and never scale it, KEDA that it is already at zero, and the router
        # that it must scale it from zero. Write the starting size once, as the autoscaler
        # does.
        scaling_loop.write_replicas(children.dyn, names, spec.replicas)

    def certificates() -> None:
        not_after = ensure_certificates(children, body, names, spec, logger,
                                        settings.cluster_domain)
        patch.status["certificates"] = {"notAfter": not_after.isoformat(),
                                        "clientSecret": names.client_secret}
        settled.append(certificates_condition(spec, children.live))

    def api_key() -> None:
        if (problem := ensure_api_key(children, body, names, spec, logger)):
            raise Halt(problem, "Degraded", [Condition("Ready", "False", "APIKeyMissing",
                                                       problem)], settings.resync_seconds)

    def cache() -> None:
        assert observed.cache is not None
        model_cache_io.ensure_cache(children.dyn, body, spec, settings, observed.cache, logger)

    def adapters() -> None:
        # Best effort: what the pods answered goes to the status, never into an error (a
        # kopf handler thread has no event loop of its own).
        pods = asyncio.run(adapter_sync.sync(children.dyn, names, spec, settings.adapter_timeout))
        held = spec.adapters or any(p.held for p in pods)
        # A list is replaced whole by the merge patch; None removes it.
        patch.status["adapters"] = [p.to_status() for p in pods] if held else None
        reported.append(adapter_sync.condition(spec, pods))

    return {WRITE_REPLICAS: write_replicas, CERTIFICATES: certificates, API_KEY: api_key,
            MODEL_CACHE: cache, ADAPTERS: adapters}
