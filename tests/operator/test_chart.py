"""The Helm chart: lint, render, and validate every rendered object against Kubernetes 1.33."""

from __future__ import annotations

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from llamafleet.common.contract import HTTP_PORT, OPERATOR_ENV_PREFIX, USER_ID, VERSION
from llamafleet.operator.settings import OperatorSettings

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".tools/bin/helm"
CHART = ROOT / "charts/llamafleet"
CUSTOM_KINDS = {"LLMService", "PodMonitor"}  # not in the upstream schemas


@pytest.fixture(scope="module")
def helm() -> Path:
    if not HELM.exists():
        pytest.fail("helm is missing: run scripts/system-deps.sh")
    return HELM


def render(helm: Path, *sets: str) -> list[dict]:
    args = [str(helm), "template", "rel", str(CHART), "-n", "llm", "--include-crds"]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


@pytest.mark.parametrize("values", [[], ["sample.enabled=true", "monitoring.podMonitor=true"],
                                    ["operator.watchNamespaces={a,b}", "image.tag=9.9.9"],
                                    ["crds.install=false", "fullnameOverride=x"]])
def test_lint_strict(helm: Path, values: list[str]) -> None:
    args = [str(helm), "lint", "--strict", str(CHART)]
    for s in values:
        args += ["--set", s]
    r = subprocess.run(args, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_rendered_objects_validate_against_kubernetes_133(helm: Path) -> None:
    docs = render(helm, "sample.enabled=true", "monitoring.podMonitor=true")
    kinds = {d["kind"] for d in docs}
    assert {"CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding", "ServiceAccount",
            "Deployment", "Pod", "LLMService", "PodMonitor"} <= kinds
    for d in docs:
        if d["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(d, "1.33.0", strict=True)


def test_chart_crd_is_the_crds_folder_templated_and_kept(helm: Path) -> None:
    crd = next(d for d in render(helm) if d["kind"] == "CustomResourceDefinition")
    meta = crd.pop("metadata")
    source = yaml.safe_load((ROOT / "crds/llmservice.yaml").read_text())
    assert meta["name"] == source.pop("metadata")["name"]
    assert crd == source
    # A template, not crds/ (which helm never upgrades); uninstall keeps it.
    assert meta["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert not (CHART / "crds").exists()
    assert (CHART / "files/crds/llmservice.yaml").read_text() == \
        (ROOT / "crds/llmservice.yaml").read_text()
    out = subprocess.run([str(helm), "template", "rel", str(CHART), "--set", "crds.install=false"],
                         capture_output=True, text=True, check=True).stdout
    assert "CustomResourceDefinition" not in out


def test_sample_is_a_valid_llmservice(helm: Path) -> None:
    from llamafleet.operator.spec import parse_spec

    sample = next(d for d in render(helm, "sample.enabled=true") if d["kind"] == "LLMService")
    spec = parse_spec(sample["spec"])
    assert spec.model.source.embedded and spec.resources.gpus == 0


RULES = yaml.safe_load((CHART / "files/rbac-rules.yaml").read_text())


def test_rbac_comes_from_the_single_rules_file(helm: Path) -> None:
    docs = render(helm)
    role = next(d for d in docs if d["kind"] == "ClusterRole")
    assert role["rules"] == RULES["cluster"] + RULES["namespaced"]
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]
    verbs = {v for r in role["rules"] for v in r["verbs"]}
    assert "*" not in verbs and "escalate" not in verbs
    assert {"apiGroups": ["llamafleet.io"], "resources": ["llmservices/finalizers"],
            "verbs": ["update"]} in role["rules"]


def test_watch_namespaces_get_roles_not_cluster_wide_secrets(helm: Path) -> None:
    docs = render(helm, "operator.watchNamespaces={a,b}")
    cluster = next(d for d in docs if d["kind"] == "ClusterRole")
    assert cluster["rules"] == RULES["cluster"]
    assert not {"secrets", "deployments"} & {r for rule in cluster["rules"] for r in rule["resources"]}
    roles = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "Role"}
    bindings = {d["metadata"]["namespace"]: d for d in docs if d["kind"] == "RoleBinding"}
    assert set(roles) == set(bindings) == {"a", "b"}
    for ns in ("a", "b"):
        assert roles[ns]["rules"] == RULES["namespaced"]
        assert bindings[ns]["roleRef"]["name"] == roles[ns]["metadata"]["name"]
        assert bindings[ns]["subjects"] == [{"kind": "ServiceAccount", "name": "rel-llamafleet",
                                             "namespace": "llm"}]
    for d in docs:
        if d["kind"] not in CUSTOM_KINDS:
            kubernetes_validate.validate(d, "1.33.0", strict=True)


def test_name_overrides(helm: Path) -> None:
    dep = next(d for d in render(helm, "fullnameOverride=fleet-op") if d["kind"] == "Deployment")
    assert dep["metadata"]["name"] == "fleet-op"
    docs = render(helm, "nameOverride=lf")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    assert dep["metadata"]["name"] == "rel-lf"
    assert dep["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] == "lf-operator"
    sa = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]


def test_security_contexts_are_values_with_strict_defaults(helm: Path) -> None:
    pod = next(d for d in render(helm) if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001,
                                      "seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]}}
    pod = next(d for d in render(helm, "operator.podSecurityContext.runAsUser=2000",
                                 "operator.securityContext.readOnlyRootFilesystem=false")
               if d["kind"] == "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == 2000
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is False


def test_operator_gets_both_images(helm: Path) -> None:
    dep = next(d for d in render(helm, "gpuImage.repository=reg/lf-cuda") if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LLAMAFLEET_OPERATOR_IMAGE_TAG"] == "0.1.0"
    assert env["LLAMAFLEET_OPERATOR_GPU_IMAGE_REPOSITORY"] == "reg/lf-cuda"
    assert env["LLAMAFLEET_OPERATOR_GPU_IMAGE_TAG"] == "0.1.0-cuda"


def test_the_model_cache_values_become_operator_settings(helm: Path, monkeypatch) -> None:
    def settings(*sets: str) -> OperatorSettings:
        dep = next(d for d in render(helm, *sets) if d["kind"] == "Deployment")
        for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]:
            if "value" in e:
                monkeypatch.setenv(e["name"], e["value"])
        return OperatorSettings()

    off = settings()  # off by default: each pod downloads its model (no ReadWriteMany needed)
    assert not off.model_cache_enabled and not off.model_cache_storage_class
    on = settings("modelCache.enabled=true", "modelCache.storageClass=nfs",
                  "modelCache.size=200Gi", "modelCache.claimName=models-cache")
    assert on.model_cache_enabled and on.model_cache_storage_class == "nfs"
    assert (on.model_cache_size, on.model_cache_claim) == ("200Gi", "models-cache")
    assert on.model_cache_access_mode == "ReadWriteMany"
    r = subprocess.run([str(helm), "template", "x", str(CHART), "--set",
                        "modelCache.accessMode=ReadMany"], capture_output=True, text=True)
    assert r.returncode != 0 and "accessMode" in r.stderr


def test_helm_test_pod_uses_the_api_key_and_passes_the_network_policy(helm: Path) -> None:
    pod = next(d for d in render(helm, "sample.enabled=true") if d["kind"] == "Pod")
    assert pod["metadata"]["labels"]["llamafleet.io/client"] == "true"
    env = pod["spec"]["containers"][0]["env"]
    assert env == [{"name": "API_KEY", "valueFrom": {"secretKeyRef": {
        "name": "chat-cpu-api-key", "key": "api-key"}}}]


def test_values_schema_rejects_typos(helm: Path) -> None:
    r = subprocess.run([str(helm), "template", "x", str(CHART), "--set", "operater.replicas=1"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "operater" in r.stderr


def test_operator_watch_namespaces_become_flags(helm: Path) -> None:
    dep = next(d for d in render(helm, "operator.watchNamespaces={a,b}") if d["kind"] == "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=a" in args and "--namespace=b" in args


def test_operator_env_keys_are_operator_settings_and_the_version_is_the_contracts(helm: Path) -> None:
    # OperatorSettings ignores unknown LLAMAFLEET_OPERATOR_* variables: a typo would pass silently.
    docs = render(helm, "operator.watchNamespaces={a,b}")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    names = [e["name"] for c in dep["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])
             if e["name"].startswith(OPERATOR_ENV_PREFIX)]
    assert len(names) >= 6
    unknown = {n for n in names if n.removeprefix(OPERATOR_ENV_PREFIX).lower()
               not in OperatorSettings.model_fields}
    assert not unknown
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == VERSION  # the image tag the operator defaults to


def test_the_chart_uses_the_contracts_user_and_http_port(helm: Path) -> None:
    docs = render(helm, "sample.enabled=true")
    operator = next(d for d in docs if d["kind"] == "Deployment")
    test_pod = next(d for d in docs if d["kind"] == "Pod")
    for pod in (operator["spec"]["template"]["spec"], test_pod["spec"]):
        assert pod["securityContext"]["runAsUser"] == USER_ID
    assert f".svc:{HTTP_PORT}" in " ".join(test_pod["spec"]["containers"][0]["command"])


def test_operator_may_autoscale(helm: Path) -> None:
    """spec.scaling: pods read, the scale subresource written, HPAs and ScaledObjects kept."""
    role = next(d for d in render(helm) if d["kind"] == "ClusterRole")
    allowed = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert {("", "pods", "list"), ("llamafleet.io", "llmservices/scale", "patch"),
            ("autoscaling", "horizontalpodautoscalers", "create"),
            ("autoscaling", "horizontalpodautoscalers", "delete"),
            ("keda.sh", "scaledobjects", "update")} <= allowed
    dep = next(d for d in render(helm, "operator.autoscaleIntervalSeconds=5")
               if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LLAMAFLEET_OPERATOR_AUTOSCALE_INTERVAL"] == "5"


def test_operator_may_keep_adapters(helm: Path) -> None:
    """spec.adapters: the ConfigMap kept, the pods listed and their API key read; the timeout
    of a call to a pod is a value."""
    role = next(d for d in render(helm) if d["kind"] == "ClusterRole")
    allowed = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
               for r in rule["resources"] for v in rule["verbs"]}
    assert {("", "configmaps", v) for v in ("get", "create", "update", "delete")} | {
        ("", "pods", "list"), ("", "secrets", "get")} <= allowed
    dep = next(d for d in render(helm, "operator.adapterTimeoutSeconds=20")
               if d["kind"] == "Deployment")
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LLAMAFLEET_OPERATOR_ADAPTER_TIMEOUT"] == "20"


def test_the_pod_monitor_scrapes_the_pods_and_the_routers(helm: Path) -> None:
    from llamafleet.operator import builders as B
    from llamafleet.operator.planning import plan_service
    from llamafleet.operator.spec import parse_spec

    monitor = next(d for d in render(helm, "monitoring.podMonitor=true") if d["kind"] == "PodMonitor")
    selector = monitor["spec"]["selector"]
    (expr,) = selector["matchExpressions"]
    spec = parse_spec({"model": {"source": {"embedded": True}}, "replicas": 2})
    names = B.Names("chat", "team-a")
    router = B.build_router_deployment(names, spec, "img:1")["spec"]["template"]
    serve = B.build_deployment(names, spec, plan_service(spec, []), "img:1")["spec"]["template"]
    endpoints = {e["port"]: e["path"] for e in monitor["spec"]["podMetricsEndpoints"]}
    assert endpoints == {"metrics": "/metrics", "router": B.ROUTER_METRICS_PATH}
    for template in (serve, router):
        labels = template["metadata"]["labels"]
        assert all(labels.get(k) == v for k, v in selector["matchLabels"].items())
        assert labels[expr["key"]] in expr["values"]
        # each pod has exactly one of the two ports, so no target scrapes a wrong path
        ports = {p["name"] for c in template["spec"]["containers"] for p in c["ports"]}
        assert len(ports & set(endpoints)) == 1


def test_the_operator_knows_its_pods_so_network_policies_let_the_autoscaler_read_metrics(
        helm: Path, monkeypatch) -> None:
    dep = next(d for d in render(helm) if d["kind"] == "Deployment")
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LLAMAFLEET_OPERATOR_POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.namespace"
    monkeypatch.setenv("LLAMAFLEET_OPERATOR_POD_NAMESPACE", "llamafleet-system")
    monkeypatch.setenv("LLAMAFLEET_OPERATOR_POD_LABELS", env["LLAMAFLEET_OPERATOR_POD_LABELS"]["value"])
    peer = OperatorSettings().operator_peer
    assert peer is not None
    assert peer["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "llamafleet-system"}
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert peer["podSelector"]["matchLabels"].items() <= pod_labels.items()
