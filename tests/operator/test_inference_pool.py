"""spec.routing.inferencePool -> an InferencePool that the upstream CRD would admit.

The schema below is our own encoding of the facts of the upstream CRD
(kubernetes-sigs/gateway-api-inference-extension, config/crd/bases/
inference.networking.k8s.io_inferencepools.yaml, version v1), not a copy of its file."""

from __future__ import annotations

import jsonschema
import pytest
from llamafleet.common.contract import HTTP_PORT
from llamafleet.operator import builders as B
from llamafleet.operator.spec import SpecError, parse_spec

LABEL_VALUE = {"type": "string", "maxLength": 63,
               "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
INFERENCE_POOL_V1 = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "inference.networking.k8s.io/v1"},
        "kind": {"const": "InferencePool"},
        "metadata": {"type": "object", "required": ["name", "namespace"]},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["extensionRef", "selector", "targetPorts"],
            "properties": {
                "selector": {
                    "type": "object", "required": ["matchLabels"],
                    "properties": {"matchLabels": {"type": "object",
                                                   "additionalProperties": LABEL_VALUE}}},
                "targetPorts": {
                    "type": "array", "minItems": 1, "maxItems": 1,
                    "items": {"type": "object", "required": ["number"],
                              "properties": {"number": PORT}}},
                "extensionRef": {
                    "type": "object", "required": ["name"], "additionalProperties": False,
                    "properties": {
                        "group": {"type": "string"},
                        "kind": {"type": "string", "minLength": 1, "maxLength": 63,
                                 "pattern": r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"},
                        "name": {"type": "string", "minLength": 1, "maxLength": 253},
                        "portNumber": PORT,
                        "failureMode": {"enum": ["FailOpen", "FailClose"]}}},
            },
        },
    },
}


def _spec(**routing):
    return parse_spec({"model": {"source": {"embedded": True}}, "routing": routing})


def test_the_pool_selects_the_pods_and_names_the_picker() -> None:
    names = B.Names("chat", "team-a")
    pool = B.build_inference_pool(names, _spec(inferencePool={
        "enabled": True, "endpointPicker": {"name": "chat-epp", "port": 9002}}))
    jsonschema.validate(pool, INFERENCE_POOL_V1)
    assert pool["spec"]["selector"]["matchLabels"] == B.pod_selector_labels("chat")  # no router pod
    assert pool["spec"]["targetPorts"] == [{"number": HTTP_PORT}]
    assert pool["spec"]["extensionRef"] == {"name": "chat-epp", "portNumber": 9002,
                                            "failureMode": "FailClose"}
    assert pool["metadata"]["namespace"] == "team-a"


def test_the_schema_catches_what_the_upstream_crd_refuses() -> None:
    names = B.Names("chat", "team-a")
    good = B.build_inference_pool(names, _spec(inferencePool={
        "enabled": True, "endpointPicker": {"name": "epp", "failureMode": "FailOpen"}}))
    jsonschema.validate(good, INFERENCE_POOL_V1)
    assert good["spec"]["extensionRef"]["portNumber"] == 9002  # upstream's default, explicit
    for path, value in ((("targetPorts",), [{"number": 1}, {"number": 2}]),
                        (("targetPorts",), [{"number": 70000}]),
                        (("extensionRef", "failureMode"), "Sometimes"),
                        (("selector", "matchLabels", "x"), "-bad-"),
                        (("endpointPickerRef",), {"name": "x"})):
        bad = {**good, "spec": {k: (dict(v) if isinstance(v, dict) else v)
                                for k, v in good["spec"].items()}}
        target = bad["spec"]
        for key in path[:-1]:
            target[key] = dict(target[key])
            target = target[key]
        target[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, INFERENCE_POOL_V1)


def test_the_spec_asks_for_the_picker_and_checks_it() -> None:
    assert not _spec().routing.inferencePool.enabled
    with pytest.raises(SpecError, match="endpointPicker.name"):
        _spec(inferencePool={"enabled": True})
    with pytest.raises(SpecError, match="routing.inferencePool.endpointPicker.port"):
        _spec(inferencePool={"enabled": True, "endpointPicker": {"name": "e", "port": 0}})
    with pytest.raises(SpecError, match="failureMode"):
        _spec(inferencePool={"enabled": True, "endpointPicker": {"name": "e",
                                                                 "failureMode": "Maybe"}})
