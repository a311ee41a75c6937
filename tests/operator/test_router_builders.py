"""The router the operator deploys (issue #15): the spec's default, the builders (validated
against the Kubernetes 1.33 schemas), the CRD beside the pydantic spec, and the RBAC that
the operator must hold to grant the router's Role."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from llamafleet.common import contract as C
from llamafleet.operator import builders as B
from llamafleet.operator.planning import plan_service
from llamafleet.operator.spec import RouterSpec, parse_spec
from llamafleet.router.settings import RouterSettings

ROOT = Path(__file__).resolve().parents[2]
NAMES = B.Names("chat", "team-a")


def spec(**over):
    raw = {"model": {"source": {"embedded": True}}, "resources": {"gpus": 0, "memory": "4Gi"}}
    raw.update(over)
    return parse_spec(raw)


def validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, "1.33.0", strict=True)


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("over, enabled", [
    ({}, False), ({"replicas": 0}, False), ({"replicas": 2}, True),
    ({"routing": {"router": {"enabled": True}}}, True),
    ({"replicas": 3, "routing": {"router": {"enabled": False}}}, False),
])
def test_the_router_is_on_by_default_only_with_several_replicas(over, enabled) -> None:
    assert spec(**over).router_enabled is enabled


@pytest.mark.parametrize("router, needle", [
    ({"replicas": 0}, "spec.routing.router.replicas"),
    ({"resources": {"cpu": "lots"}}, "spec.routing.router.resources.cpu"),
    ({"replica": 2}, "spec.routing.router.replica"),
])
def test_a_bad_router_spec_says_what_to_fix(router, needle) -> None:
    from llamafleet.operator.spec import SpecError

    with pytest.raises(SpecError, match=needle):
        spec(routing={"router": router})


def test_the_crd_declares_the_router_as_the_spec_does() -> None:
    crd = yaml.safe_load((ROOT / "crds/llmservice.yaml").read_text())
    version = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema = version["properties"]["spec"]["properties"]["routing"]["properties"]["router"]
    props = schema["properties"]
    assert "default" not in props["enabled"]  # unset: LLMServiceSpec.router_enabled decides
    defaults = RouterSpec()
    assert props["replicas"]["default"] == defaults.replicas
    assert props["replicas"]["minimum"] == RouterSpec.model_fields["replicas"].metadata[0].ge
    assert {k: v["default"] for k, v in props["resources"]["properties"].items()} == \
        defaults.resources.model_dump()
    assert set(props) == set(RouterSpec.model_fields)
    assert "router" in version["properties"]["status"]["properties"]["endpoints"]["properties"]
    assert "<= 58" in version["x-kubernetes-validations"][0]["rule"]


def test_router_deployment_is_valid_and_complete() -> None:
    s = spec(replicas=2, imagePullSecrets=[{"name": "regcred"}], logging={"level": "debug"},
             routing={"router": {"replicas": 2, "resources": {"cpu": "1", "memory": "1Gi"}}})
    dep = B.build_router_deployment(NAMES, s, "llamafleet:0.1.0")
    validate(dep)
    assert dep["metadata"]["name"] == "chat-router" and dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "llamafleet:0.1.0" and c["command"] == ["llamafleet"] and c["args"] == ["router"]
    assert c["ports"] == [{"name": "router", "containerPort": C.ROUTER_PORT, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "router"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "router"}
    assert c["resources"] == {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "1Gi"}}
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["serviceAccountName"] == "chat-router" and pod["automountServiceAccountToken"] is True
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert "nodeSelector" not in pod and "tolerations" not in pod  # no GPU node needed
    env = {e["name"]: e for e in c["env"]}
    assert env["LLM_LLAMA_SERVICE_ROUTER_LLMSERVICE"]["value"] == "chat"
    assert env["LLM_LLAMA_SERVICE_ROUTER_NAMESPACE"]["valueFrom"] == {"fieldRef": {
        "fieldPath": "metadata.namespace"}}
    assert env["LLM_LLAMA_SERVICE_ROUTER_BACKEND_API_KEY"]["valueFrom"] == {"secretKeyRef": {
        "name": "chat-api-key", "key": "api-key"}}
    assert env["LLM_LLAMA_SERVICE_ROUTER_PORT"]["value"] == str(C.ROUTER_PORT)
    assert env["LLM_LLAMA_SERVICE_ROUTER_LOG_LEVEL"]["value"] == "DEBUG"
    template = dep["spec"]["template"]["metadata"]
    assert template["annotations"] == {"prometheus.io/scrape": "true", "prometheus.io/port": "16073",
                                       "prometheus.io/path": "/router/metrics"}
    assert dep["spec"]["selector"]["matchLabels"] == B.router_selector_labels("chat")
    assert matches(B.router_selector_labels("chat"), template["labels"])


def test_the_router_reads_the_users_api_key_secret_like_the_pods() -> None:
    s = spec(replicas=2, auth={"apiKeySecret": "team-keys", "apiKeySecretKey": "llm"})
    dep = B.build_router_deployment(NAMES, s, "img:1")
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LLM_LLAMA_SERVICE_ROUTER_BACKEND_API_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "team-keys", "key": "llm"}


# The router's side of the interface (issue #15) adds these settings; until that branch is
# merged, RouterSettings may lack them (then this set is empty by itself).
NOT_YET_ROUTER_SETTINGS = {"llmservice", "namespace"} - set(RouterSettings.model_fields)


def test_every_env_key_of_the_router_is_a_router_setting() -> None:
    # RouterSettings ignores unknown LLM_LLAMA_SERVICE_ROUTER_* variables: a typo would pass.
    dep = B.build_router_deployment(NAMES, spec(replicas=2), "img:1")
    names = [e["name"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]]
    assert all(n.startswith(C.ROUTER_ENV_PREFIX) for n in names)
    keys = {n.removeprefix(C.ROUTER_ENV_PREFIX).lower() for n in names}
    assert keys - set(RouterSettings.model_fields) <= NOT_YET_ROUTER_SETTINGS


def test_selectors_keep_serve_and_router_pods_apart() -> None:
    s = spec(replicas=2, podDisruptionBudget={"enabled": True},
             routing={"inferencePool": {"enabled": True, "endpointPicker": {"name": "epp"}}})
    serve = B.build_deployment(NAMES, s, plan_service(s, []), "img:1")["spec"]["template"][
        "metadata"]["labels"]
    router = B.build_router_deployment(NAMES, s, "img:1")["spec"]["template"]["metadata"]["labels"]
    serve_selectors = [B.build_pod_service(NAMES)["spec"]["selector"],
                       B.build_service(NAMES, routed=False)["spec"]["selector"],
                       B.build_pdb(NAMES, s)["spec"]["selector"]["matchLabels"],
                       B.build_inference_pool(NAMES, s)["spec"]["selector"]["matchLabels"],
                       dict(kv.split("=") for kv in B.selector_string("chat").split(","))]
    for sel in serve_selectors:
        assert matches(sel, serve) and not matches(sel, router)
    routed = B.build_service(NAMES, routed=True)["spec"]["selector"]
    assert matches(routed, router) and not matches(routed, serve)
    # The NetworkPolicy covers both kinds of pod.
    np_selector = B.build_network_policy(NAMES, s)["spec"]["podSelector"]["matchLabels"]
    assert matches(np_selector, serve) and matches(np_selector, router)


def test_services_route_http_to_the_router_and_keep_grpc_on_the_pods() -> None:
    pods, direct, routed = (B.build_pod_service(NAMES), B.build_service(NAMES),
                            B.build_service(NAMES, routed=True))
    for svc in (pods, direct, routed):
        validate(svc)
    assert pods["metadata"]["name"] == C.pod_service_name("chat") == "chat-pods"
    assert pods["spec"]["ports"] == direct["spec"]["ports"]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in pods["spec"]["ports"]} == {
        "http": (C.HTTP_PORT, "http"), "grpc": (C.GRPC_PORT, "grpc"),
        "metrics": (C.METRICS_PORT, "metrics")}
    assert routed["metadata"]["name"] == "chat"
    assert routed["spec"]["ports"] == [{"name": "http", "port": C.HTTP_PORT, "targetPort": "router",
                                        "protocol": "TCP"}]


def _ports(rule: dict) -> set[int]:
    return {p["port"] for p in rule["ports"]}


def test_network_policy_with_the_router() -> None:
    s = spec(replicas=2, networkPolicy={"monitoringNamespaces": ["monitoring"]})
    np_ = B.build_network_policy(NAMES, s)
    validate(np_)
    clients, router, metrics = np_["spec"]["ingress"]
    # Until the Service has moved to the router, clients still reach the pods' HTTP port.
    assert _ports(clients) == {C.HTTP_PORT, C.GRPC_PORT, C.ROUTER_PORT}
    assert router == {"from": [{"podSelector": {"matchLabels": B.router_selector_labels("chat")}}],
                      "ports": [{"port": C.HTTP_PORT, "protocol": "TCP"}]}
    assert _ports(metrics) == {C.METRICS_PORT, C.ROUTER_PORT}  # /router/metrics is on its port
    assert np_["spec"]["policyTypes"] == ["Ingress"]  # egress open: API server, pods
    clients, router, _ = B.build_network_policy(NAMES, s, routed_only=True)["spec"]["ingress"]
    assert _ports(clients) == {C.GRPC_PORT, C.ROUTER_PORT} and _ports(router) == {C.HTTP_PORT}
    # Without the router, routed_only changes nothing.
    off = spec(networkPolicy={"monitoringNamespaces": ["monitoring"]})
    assert B.build_network_policy(NAMES, off, routed_only=True) == B.build_network_policy(NAMES, off)
    assert [_ports(r) for r in B.build_network_policy(NAMES, off)["spec"]["ingress"]] == [
        {C.HTTP_PORT, C.GRPC_PORT}, {C.METRICS_PORT}]


def test_router_rbac_is_the_contracts_rules_scoped_to_this_llmservice() -> None:
    sa, role, binding = (B.build_router_service_account(NAMES), B.build_router_role(NAMES),
                         B.build_router_role_binding(NAMES))
    for obj in (sa, role, binding):
        validate(obj)
        assert obj["metadata"]["name"] == "chat-router" and obj["metadata"]["namespace"] == "team-a"
    assert [{k: v for k, v in r.items() if k != "resourceNames"} for r in role["rules"]] == [
        {k: list(v) for k, v in r.items()} for r in C.ROUTER_RBAC_RULES]
    by_resource = {r["resources"][0]: r for r in role["rules"]}
    assert by_resource["llmservices/scale"]["resourceNames"] == ["chat"]
    assert "resourceNames" not in by_resource["endpointslices"]  # generated names
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "chat-router"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "chat-router",
                                    "namespace": "team-a"}]


def test_the_operator_holds_what_it_grants_the_router_and_writes_its_objects() -> None:
    # Kubernetes refuses a Role (or its RoleBinding) granting more than its creator holds.
    rules = yaml.safe_load((ROOT / "charts/llamafleet/files/rbac-rules.yaml").read_text())
    held = {(g, r, v) for rule in rules["namespaced"] for g in rule["apiGroups"]
            for r in rule["resources"] for v in rule["verbs"]}
    granted = {(g, r, v) for rule in C.ROUTER_RBAC_RULES for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert granted <= held
    for group, resource in (("", "serviceaccounts"), ("rbac.authorization.k8s.io", "roles"),
                            ("rbac.authorization.k8s.io", "rolebindings")):
        for verb in ("get", "create", "update", "delete"):
            assert (group, resource, verb) in held


def test_endpoints_say_where_http_and_grpc_go() -> None:
    one, two = spec(), spec(replicas=2)
    assert B.endpoints(NAMES, "cluster.local", one, routed=False) == {
        "http": "http://chat.team-a.svc.cluster.local:16070",
        "grpc": "chat.team-a.svc.cluster.local:16071"}
    assert B.endpoints(NAMES, "cluster.local", two, routed=True) == {
        "http": "http://chat.team-a.svc.cluster.local:16070",
        "grpc": "chat-pods.team-a.svc.cluster.local:16071",
        "router": "http://chat.team-a.svc.cluster.local:16070"}
    # gRPC goes to the pod Service as soon as the router is on, before HTTP moves.
    assert "router" not in B.endpoints(NAMES, "cluster.local", two, routed=False)


def test_the_builtin_autoscaler_may_read_metrics_through_the_network_policy() -> None:
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "llamafleet-operator"}}}
    scaled = parse_spec({"model": {"source": {"embedded": True}},
                         "scaling": {"minReplicas": 0, "maxReplicas": 3}})
    policy = B.build_network_policy(B.Names("chat", "team-a"), scaled, operator_peer=peer)
    validate(policy)
    rules = [r for r in policy["spec"]["ingress"] if r["from"] == [peer]]
    assert [{p["port"] for p in r["ports"]} for r in rules] == [{C.HTTP_PORT, C.ROUTER_PORT}]
    fixed = parse_spec({"model": {"source": {"embedded": True}}, "replicas": 2})
    for spec, op in ((fixed, peer), (scaled, None)):  # not autoscaled, or operator unknown
        policy = B.build_network_policy(B.Names("chat", "team-a"), spec, operator_peer=op)
        assert all(r["from"] != [peer] for r in policy["spec"]["ingress"])
