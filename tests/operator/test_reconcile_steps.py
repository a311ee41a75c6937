"""The reconcile as a plan (issue 25): each ordering rule of
llamafleet.operator.reconcile_steps, and the condition each step sets when it fails, checked
on the pure plan; then the applier that walks it, against a Children stand-in."""

from __future__ import annotations

import logging

import pytest
from kubernetes.client.exceptions import ApiException
from llamafleet.common.contract import HTTP_PORT
from llamafleet.operator import builders as B
from llamafleet.operator.model_cache import CacheState, Entry
from llamafleet.operator.planning import plan_service
from llamafleet.operator.reconcile import Halt, apply_steps
from llamafleet.operator.reconcile_steps import (
    ACTIONS,
    API_KEY,
    CERTIFICATES,
    MODEL_CACHE,
    WRITE_REPLICAS,
    Apply,
    Delete,
    Ensure,
    Observed,
    child_keys,
    plan_steps,
    router_keys,
    routing,
    secret_key,
    step_keys,
)
from llamafleet.operator.settings import OperatorSettings
from llamafleet.operator.spec import parse_spec

NAMES = B.Names("chat", "team-a")
SETTINGS = OperatorSettings()
ROUTER = router_keys(NAMES)
ROUTER_DEPLOYMENT = ROUTER[-1]
SERVICE = ("v1", "Service", "chat")
DEPLOYMENT = ("apps/v1", "Deployment", "chat")
NETWORK_POLICY = ("networking.k8s.io/v1", "NetworkPolicy", "chat")
WORKLOADS = {DEPLOYMENT, ROUTER_DEPLOYMENT}
PICKER = {"enabled": True, "endpointPicker": {"name": "chat-epp"}}


def spec(**over):
    raw = {"model": {"source": {"embedded": True}}, "resources": {"gpus": 0, "memory": "4Gi"}}
    raw.update(over)
    return parse_spec(raw)


def steps(s, observed: Observed | None = None):
    return plan_steps(s, plan_service(s, []), NAMES, observed or Observed(replicas_set=True),
                      SETTINGS)


def where(plan, key) -> int:
    """The index of the step that applies or deletes ``key``, or runs action ``key``."""
    return next(i for i, st in enumerate(plan)
                if (st.action if isinstance(st, Ensure) else st.key) == key)


def keys(plan) -> list:
    return [st.action if isinstance(st, Ensure) else st.key for st in plan]


def routed_observed(ready: int = 1, was_routed: bool = False) -> Observed:
    """The router Deployment is ours with ``ready`` pods; Service <name> as built before."""
    service = B.build_service(NAMES, routed=was_routed)
    return Observed(True, service=service, router={"status": {"readyReplicas": ready}})


# --- ordering rules ------------------------------------------------------------------------


@pytest.mark.parametrize("over", [{}, {"replicas": 3}, {"networkPolicy": {"enabled": False}}])
def test_the_network_policy_comes_before_every_other_child(over) -> None:
    plan = steps(spec(**over))
    first_child = next(i for i, st in enumerate(plan) if not isinstance(st, Ensure))
    assert plan[first_child].key == NETWORK_POLICY
    kind = Apply if spec(**over).networkPolicy.enabled else Delete
    assert isinstance(plan[first_child], kind)


def test_router_rbac_comes_before_the_router_and_the_router_before_the_pods() -> None:
    plan = steps(spec(replicas=3))
    sa, role, binding, router = (where(plan, k) for k in ROUTER)
    assert sa < role < binding < router
    assert router < where(plan, ("v1", "Service", NAMES.pod_service)) < where(plan, SERVICE) \
        < where(plan, DEPLOYMENT)
    assert all(isinstance(plan[where(plan, k)], Apply) for k in ROUTER)


def test_turning_the_router_off_repoints_the_service_before_deleting_the_router() -> None:
    off = spec(replicas=3, routing={"router": {"enabled": False}})
    plan = steps(off, routed_observed(ready=2, was_routed=True))
    service = plan[where(plan, SERVICE)]
    assert isinstance(service, Apply)
    assert service.obj["spec"]["selector"] == B.pod_selector_labels("chat")  # back on the pods
    deletes = [i for i, st in enumerate(plan) if isinstance(st, Delete) and st.key in ROUTER]
    assert [plan[i].key for i in deletes] == ROUTER[::-1]  # the Deployment first, the SA last
    assert where(plan, SERVICE) < where(plan, DEPLOYMENT) < min(deletes)


def test_the_service_moves_to_the_router_only_once_a_router_pod_is_ready() -> None:
    on = spec(replicas=3)
    for observed, routed in [(Observed(True), False),  # no router Deployment of ours yet
                             (routed_observed(ready=0), False),  # not ready yet
                             (routed_observed(ready=1), True),
                             (routed_observed(ready=0, was_routed=True), True)]:  # it stays
        assert routing(NAMES, on, observed)[1] is routed
        service = steps(on, observed)[where(steps(on, observed), SERVICE)].obj
        want = B.router_selector_labels if routed else B.pod_selector_labels
        assert service["spec"]["selector"] == want("chat")


def test_the_pods_http_port_closes_to_clients_one_reconcile_after_the_service_moved() -> None:
    on = spec(replicas=3)

    def client_ports(observed: Observed) -> list[int]:
        policy = steps(on, observed)[where(steps(on, observed), NETWORK_POLICY)].obj
        return [p["port"] for p in policy["spec"]["ingress"][0]["ports"]]

    moving, moved = client_ports(routed_observed(1)), client_ports(routed_observed(1, True))
    assert HTTP_PORT in moving and HTTP_PORT not in moved


def test_replicas_are_written_first_only_when_scaling_and_the_object_has_none() -> None:
    scaled = spec(scaling={"maxReplicas": 4})
    assert keys(steps(scaled, Observed(replicas_set=False)))[0] == WRITE_REPLICAS
    assert WRITE_REPLICAS not in keys(steps(scaled, Observed(replicas_set=True)))
    assert WRITE_REPLICAS not in keys(steps(spec(), Observed(replicas_set=False)))


def test_certificates_then_the_api_key_come_before_the_children_that_mount_them() -> None:
    plan = steps(spec())
    assert keys(plan)[:2] == [CERTIFICATES, API_KEY]
    assert where(plan, API_KEY) < where(plan, NETWORK_POLICY) < where(plan, DEPLOYMENT)
    assert CERTIFICATES not in keys(steps(spec(tls={"enabled": False})))


def test_a_users_api_key_secret_replaces_the_generated_one_before_it_is_checked() -> None:
    generated = secret_key(NAMES.api_key_secret)
    plan = steps(spec(auth={"apiKeySecret": "mine"}))
    assert isinstance(plan[where(plan, generated)], Delete)
    assert where(plan, generated) < where(plan, API_KEY)
    assert generated not in keys(steps(spec()))  # generated: written by the API-key action
    # The user named their own Secret like the generated one: it is theirs, never deleted.
    assert generated not in keys(steps(spec(auth={"apiKeySecret": NAMES.api_key_secret})))


@pytest.mark.parametrize("mode", ["hpa", "keda"])
def test_autoscalers_come_last_after_the_workloads_they_scale(mode) -> None:
    plan = steps(spec(scaling={"mode": mode, "maxReplicas": 4}, routing={"inferencePool": PICKER}))
    scaler = ("autoscaling/v2", "HorizontalPodAutoscaler", "chat") if mode == "hpa" \
        else (B.KEDA_API, "ScaledObject", "chat")
    assert isinstance(plan[where(plan, scaler)], Apply)
    assert where(plan, scaler) >= len(plan) - 2
    assert max(where(plan, k) for k in WORKLOADS) < where(plan, (
        B.INFERENCE_POOL_API, "InferencePool", "chat")) < where(plan, scaler)


def test_the_model_cache_comes_before_the_deployment_which_waits_for_the_file() -> None:
    s = spec(model={"source": {"url": {"url": "https://m.example/m.gguf", "sha256": "a" * 64}}})
    on = OperatorSettings(model_cache_enabled=True)

    def plan(state: str) -> list:
        cache = CacheState(Entry("https://m.example/m.gguf", "a" * 64), "cache", state)
        return plan_steps(s, plan_service(s, []), NAMES, Observed(True, cache=cache), on)

    for state in ("Pending", "Downloading", "Failed"):  # no Deployment written (a live one stays)
        waiting = plan(state)
        assert MODEL_CACHE in [st.action for st in waiting if isinstance(st, Ensure)]
        assert DEPLOYMENT not in step_keys(waiting)
    ready = plan("Cached")
    assert where(ready, MODEL_CACHE) < where(ready, DEPLOYMENT)
    dep = next(st.obj for st in ready if isinstance(st, Apply) and st.key == DEPLOYMENT)
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "cache", "readOnly": True}} \
        in dep["spec"]["template"]["spec"]["volumes"]
    # The cache off: no action, and the Deployment as before (each pod downloads).
    plain = steps(s)
    assert MODEL_CACHE not in [st.action for st in plain if isinstance(st, Ensure)]
    assert DEPLOYMENT in step_keys(plain)


@pytest.mark.parametrize("over", [
    {}, {"replicas": 0, "podDisruptionBudget": {"enabled": True, "minAvailable": 0}},
    {"replicas": 3, "podDisruptionBudget": {"enabled": True, "minAvailable": 1}},
    {"replicas": 3, "routing": {"inferencePool": PICKER}},
    {"scaling": {"mode": "hpa", "maxReplicas": 4}, "auth": {"apiKeySecret": "mine"}},
    {"scaling": {"mode": "keda", "maxReplicas": 4}, "tls": {"enabled": False},
     "networkPolicy": {"enabled": False}},
])
def test_the_plan_writes_what_is_read_as_ours_to_write_and_deletes_only_the_rest(over) -> None:
    s = spec(**over)
    writes, deletes = child_keys(s, NAMES)
    plan = steps(s)
    applied = [st.key for st in plan if isinstance(st, Apply)]
    deleted = [st.key for st in plan if isinstance(st, Delete)]
    assert set(applied) <= set(writes) and set(deleted) <= set(deletes)
    # Every child is either written or deleted; Secrets are the actions' own.
    assert set(applied) | set(deleted) | {k for k in writes if k[1] == "Secret"} \
        == set(writes) | set(deletes)
    assert len(applied) == len(set(applied)) and not set(applied) & set(deleted)


# --- the condition each step sets when it fails -------------------------------------------


def test_each_step_names_the_condition_it_sets_when_it_fails() -> None:
    plan = steps(spec(replicas=3, scaling={"mode": "hpa", "maxReplicas": 4}),
                 Observed(replicas_set=False))
    err = "403 Forbidden"
    policy = plan[where(plan, NETWORK_POLICY)].on_failure.condition(err)
    assert (policy.type, policy.status, policy.reason) == ("Ready", "False",
                                                            "NetworkPolicyFailed")
    assert "Deployment is held back: 403 Forbidden" in policy.message
    labels = {WRITE_REPLICAS: "replicas", CERTIFICATES: "certificates", API_KEY: "api key",
              ROUTER[0]: "router", ROUTER_DEPLOYMENT: "router", DEPLOYMENT: "children",
              SERVICE: "children", ("autoscaling/v2", "HorizontalPodAutoscaler", "chat"):
              "autoscaling"}
    for key, label in labels.items():
        c = plan[where(plan, key)].on_failure.condition(err)
        assert (c.type, c.status, c.reason) == ("Ready", "Unknown", "APIError"), key
        assert c.message == f"Kubernetes API error ({label}): 403 Forbidden; retrying"
    deleting = steps(spec(networkPolicy={"enabled": False}))  # deleting it fails alike
    assert deleting[where(deleting, NETWORK_POLICY)].on_failure.reason == "NetworkPolicyFailed"


class FakeChildren:
    """Records what the applier asks of the Children client; refuses one key."""

    def __init__(self, refuse=None):
        self.done: list = []
        self.refuse = refuse

    def apply(self, owner, obj, logger, event=True) -> None:
        self._do((obj["apiVersion"], obj["kind"], obj["metadata"]["name"]))

    def remove(self, key, logger) -> None:
        self._do(key)

    def _do(self, key) -> None:
        if key == self.refuse:
            raise ApiException(status=422, reason="Unprocessable Entity")
        self.done.append(key)


def walk(plan, children):
    actions = {name: (lambda name=name: children.done.append(name)) for name in ACTIONS}
    apply_steps(plan, children, {}, logging.getLogger(__name__), False, actions, 7.0)


def test_the_applier_walks_the_steps_in_order() -> None:
    plan = steps(spec(replicas=3))
    children = FakeChildren()
    walk(plan, children)
    assert children.done == keys(plan)


def test_the_applier_stops_at_the_refused_step_with_its_condition() -> None:
    plan = steps(spec(replicas=3))
    children = FakeChildren(refuse=NETWORK_POLICY)
    with pytest.raises(Halt) as e:
        walk(plan, children)
    assert children.done == keys(plan)[:where(plan, NETWORK_POLICY)]  # no workload written
    assert e.value.phase is None and e.value.delay == 7.0
    [c] = e.value.conditions
    assert (c.type, c.status, c.reason) == ("Ready", "False", "NetworkPolicyFailed")
    assert "422 Unprocessable Entity" in c.message and str(e.value) == c.message
    assert isinstance(e.value.__cause__, ApiException)

    children = FakeChildren(refuse=ROUTER[1])  # the router's Role
    with pytest.raises(Halt) as e:
        walk(plan, children)
    assert ROUTER_DEPLOYMENT not in children.done and DEPLOYMENT not in children.done
    assert e.value.conditions[0].message == \
        "Kubernetes API error (router): 422 Unprocessable Entity; retrying"
