"""spec.scaling modes hpa and keda: the HPA validates against Kubernetes 1.33's schema and the
ScaledObject against KEDA's own CRD (vendored in tests/data, source and version in its header)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from llamafleet.operator import builders as B
from llamafleet.operator.planning import NodeGPU, plan_service
from llamafleet.operator.spec import parse_spec

DATA = Path(__file__).resolve().parents[1] / "data"
NAMES = B.Names("chat", "team-a")
PROMETHEUS = "http://prometheus.monitoring.svc:9090"


def _plan(spec):
    return plan_service(spec, [NodeGPU("n", {"nvidia.com/gpu.memory": "81559"}, 81559, 1, "GPU")])


def _spec(**scaling: Any):
    return parse_spec({"model": {"source": {"embedded": True}}, "resources": {"gpus": 1},
                       "scaling": {"maxReplicas": 4, **scaling}})


def _strict(schema: Any) -> Any:
    """The CRD's structural schema, with unknown fields an error: the API server would
    silently prune them, which is how a misspelt field goes unnoticed."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if out.get("type") == "object" and "properties" in out \
                and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def keda_schema() -> dict:
    crd = yaml.safe_load((DATA / "keda.sh_scaledobjects.yaml").read_text())
    assert crd["metadata"]["name"] == "scaledobjects.keda.sh"
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1")
    return _strict(version["schema"]["openAPIV3Schema"])


def test_hpa_targets_the_llmservice_scale_subresource_and_validates() -> None:
    s = _spec(minReplicas=2, targetInFlightPerReplica=6, scaleDownDelay="10m",
              scaleUpStabilization="30s", mode="hpa")
    hpa = B.build_hpa(NAMES, s, _plan(s))
    kubernetes_validate.validate(hpa, "1.33.0", strict=True)
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "llamafleet.io/v1alpha1",
                                      "kind": "LLMService", "name": "chat"}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 4)
    assert spec["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": "llamafleet_inflight"},
        "target": {"type": "AverageValue", "averageValue": "6"}}}]
    assert spec["behavior"] == {"scaleUp": {"stabilizationWindowSeconds": 30},
                                "scaleDown": {"stabilizationWindowSeconds": 600}}


def test_hpa_default_target_is_the_planned_batch_and_windows_are_capped() -> None:
    s = _spec(mode="hpa", scaleDownDelay="3h")
    plan = _plan(s)
    hpa = B.build_hpa(NAMES, s, plan)
    kubernetes_validate.validate(hpa, "1.33.0", strict=True)
    target = hpa["spec"]["metrics"][0]["pods"]["target"]["averageValue"]
    assert target == str(plan.max_batch_size)
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 3600


def test_scaled_object_validates_against_kedas_crd(keda_schema: dict) -> None:
    s = _spec(mode="keda", minReplicas=0, targetInFlightPerReplica=3, idleBeforeZero="10m")
    so = B.build_scaled_object(NAMES, s, _plan(s), PROMETHEUS)
    jsonschema.validate(so, keda_schema)
    spec = so["spec"]
    assert spec["scaleTargetRef"]["kind"] == "LLMService"
    assert (spec["minReplicaCount"], spec["maxReplicaCount"], spec["cooldownPeriod"]) == (0, 4, 600)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["threshold"] == "3"
    assert trigger["metadata"]["serverAddress"] == PROMETHEUS
    query = trigger["metadata"]["query"]
    for series in ("llamafleet_running_sequences", "llamafleet_queue_depth",
                   "llamafleet_router_hold_queue_depth"):
        assert f'{series}{{namespace="team-a",app_kubernetes_io_instance="chat"}}' in query
    assert query.count("or vector(0)") == 3  # zero pods still give a number
    # KEDA's own CEL rule (the schema cannot express it): min <= max.
    assert spec["minReplicaCount"] <= spec["maxReplicaCount"]


def test_the_validation_catches_a_misspelt_field(keda_schema: dict) -> None:
    s = _spec(mode="keda")
    so = B.build_scaled_object(NAMES, s, _plan(s), PROMETHEUS)
    so["spec"]["minReplicas"] = 1  # an HPA's name, not KEDA's
    with pytest.raises(jsonschema.ValidationError, match="minReplicas"):
        jsonschema.validate(so, keda_schema)
    hpa = B.build_hpa(NAMES, _spec(mode="hpa"), _plan(_spec()))
    hpa["spec"]["minReplicaCount"] = 1
    with pytest.raises(Exception, match="minReplicaCount"):
        kubernetes_validate.validate(hpa, "1.33.0", strict=True)


def test_the_chart_podmonitor_copies_the_instance_label_the_keda_query_uses() -> None:
    text = (Path(__file__).resolve().parents[2] / "charts/llamafleet/templates/podmonitor.yaml"
            ).read_text()
    assert "app.kubernetes.io/instance" in text.split("podTargetLabels:")[1]
