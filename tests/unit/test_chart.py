"""The Helm chart: lint, render, and validate every rendered object against Kubernetes 1.33."""

from __future__ import annotations

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

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
                                    ["operator.watchNamespaces={a,b}", "image.tag=9.9.9"]])
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


def test_chart_crd_is_the_crds_folder(helm: Path) -> None:
    crd = next(d for d in render(helm) if d["kind"] == "CustomResourceDefinition")
    assert crd == yaml.safe_load((ROOT / "crds/llmservice.yaml").read_text())


def test_sample_is_a_valid_llmservice(helm: Path) -> None:
    from llamafleet.operator.spec import parse_spec

    sample = next(d for d in render(helm, "sample.enabled=true") if d["kind"] == "LLMService")
    spec = parse_spec(sample["spec"])
    assert spec.model.source.embedded and spec.resources.gpus == 0


def test_rbac_comes_from_the_single_rules_file(helm: Path) -> None:
    role = next(d for d in render(helm) if d["kind"] == "ClusterRole")
    assert role["rules"] == yaml.safe_load((CHART / "files/rbac-rules.yaml").read_text())
    verbs = {v for r in role["rules"] for v in r["verbs"]}
    assert "*" not in verbs and "escalate" not in verbs


def test_values_schema_rejects_typos(helm: Path) -> None:
    r = subprocess.run([str(helm), "template", "x", str(CHART), "--set", "operater.replicas=1"],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "operater" in r.stderr


def test_operator_watch_namespaces_become_flags(helm: Path) -> None:
    dep = next(d for d in render(helm, "operator.watchNamespaces={a,b}") if d["kind"] == "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=a" in args and "--namespace=b" in args
