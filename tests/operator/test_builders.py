"""Pure operator parts: spec validation, planning, manifest builders (validated against the
Kubernetes 1.33 schemas) and certificates that really verify."""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import threading
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from llamafleet.common import contract as C
from llamafleet.common.capacity import GiB, KVShape, MemoryBudget, MiB, ModelFootprint, fit
from llamafleet.common.contract import EMBEDDED_MODELS, ENV_PREFIX, GEMMA, SMOLLM2
from llamafleet.inference.settings import Settings
from llamafleet.operator import builders as B
from llamafleet.operator import certs
from llamafleet.operator.planning import NodeGPU, plan_service
from llamafleet.operator.spec import Shape, SpecError, check_name, parse_spec

K8S = "1.33.0"
ROOT = Path(__file__).resolve().parents[2]


def spec(**over):
    raw = {"model": {"source": {"pvc": {"claimName": "models", "path": "m.gguf"}},
                     "shape": {"sizeBytes": 4_370_000_000, "layers": 32, "kvHeads": 8,
                               "keyLength": 128, "valueLength": 128}},
           "resources": {"gpus": 1, "cpu": "4", "memory": "16Gi"}}
    raw.update(over)
    return parse_spec(raw)


def nodes(*mibs: int) -> list[NodeGPU]:
    return [NodeGPU(f"n{i}", {"nvidia.com/gpu.memory": str(m), "pool": "gpu"}, m, 1, "GPU")
            for i, m in enumerate(mibs)]


NAMES = B.Names("chat", "team-a")


def validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S, strict=True)


@pytest.mark.parametrize("raw, needle", [
    ({"model": {"source": {}}}, "exactly one of model.source"),
    ({"model": {"source": {"embedded": True, "url": {"url": "https://x/m.gguf", "sha256": "a" * 64}}}},
     "exactly one"),
    ({"model": {"source": {"url": {"url": "ftp://x", "sha256": "zz"}}}}, "spec.model.source.url"),
    ({"model": {"source": {"embedded": True}}, "batching": {"maxBatchSize": 0}}, "maxBatchSize"),
    ({"model": {"source": {"embedded": True}}, "tls": {"validity": "1h", "renewBefore": "2h"}},
     "must be shorter"),
    ({"model": {"source": {"embedded": True}}, "tls": {"validity": "forever"}}, "invalid duration"),
    ({"model": {"source": {"embedded": True}}, "bogus": 1}, "spec.bogus"),
])
def test_invalid_specs_say_what_to_fix(raw, needle) -> None:
    with pytest.raises(SpecError, match=needle):
        parse_spec(raw)


def test_plan_follows_node_memory_and_pins_above_smaller_nodes() -> None:
    assert plan_service(spec(), nodes(6144)).max_batch_size == 1
    big = plan_service(spec(), nodes(6144, 81559))
    assert big.max_batch_size == 16 and big.gpu_memory_mib == 81559 and big.pin_above_mib == 81558
    none = plan_service(spec(), nodes(4096))
    assert not none.fits and "not even one sequence" in none.reason


def test_plan_respects_node_selector() -> None:
    s = spec(scheduling={"nodeSelector": {"pool": "other"}})
    p = plan_service(s, nodes(81559))
    assert p.max_batch_size == 1 and "no schedulable node" in p.reason


def test_unknown_model_is_planned_conservatively() -> None:
    s = parse_spec({"model": {"source": {"pvc": {"claimName": "m", "path": "x.gguf"}}}})
    assert "conservative" in plan_service(s, nodes(24576)).reason


@pytest.mark.parametrize("source, name", [
    (True, SMOLLM2.name),  # the older boolean form: the default model
    ({}, SMOLLM2.name),
    ({"name": "gemma-3-270m"}, GEMMA.name),
])
def test_embedded_source_names_the_model_for_the_pod_and_the_planner(source, name) -> None:
    s = spec(resources={"gpus": 0, "memory": "4Gi"}, model={"source": {"embedded": source}})
    plan = plan_service(s, [])
    assert f"embedded model {name}" in plan.reason
    dep = B.build_deployment(NAMES, s, plan, "img:1")
    validate(dep)
    env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["LLM_LLAMA_SERVICE_EMBEDDED_MODEL"] == name
    assert "LLM_LLAMA_SERVICE_MODEL_PATH" not in env  # the image knows where its models are


def test_embedded_shapes_differ_in_the_plan() -> None:
    small = spec(resources={"gpus": 0, "memory": "1Gi"}, model={"source": {"embedded": True},
                                                                  "contextSize": 8192})
    big = spec(resources={"gpus": 0, "memory": "1Gi"},
               model={"source": {"embedded": {"name": "gemma-3-270m"}}, "contextSize": 8192})
    assert plan_service(small, []).reason != plan_service(big, []).reason


@pytest.mark.parametrize("source, needle", [
    ({"embedded": {"name": "llama-70b"}},
     "spec.model.source.embedded.name: unknown embedded model 'llama-70b'; choose one of "
     "smollm2-135m-instruct, gemma-3-270m"),
    ({"embedded": {"nmae": "gemma-3-270m"}}, "spec.model.source.embedded.nmae"),
    ({"embedded": "gemma-3-270m"}, "spec.model.source.embedded"),
    ({"embedded": False}, "exactly one of model.source.pvc, model.source.url or "
                          "model.source.embedded .got none."),
])
def test_bad_embedded_source_says_what_to_fix(source, needle) -> None:
    with pytest.raises(SpecError, match=needle):
        parse_spec({"model": {"source": source}})


def test_embedded_false_beside_a_pvc_is_the_pvc() -> None:
    s = parse_spec({"model": {"source": {"embedded": False,
                                         "pvc": {"claimName": "m", "path": "x.gguf"}}}})
    assert s.model.source.embedded is None and s.model.source.pvc


def test_cpu_service_plans_from_memory_request() -> None:
    s = spec(resources={"gpus": 0, "memory": "4Gi"}, model={"source": {"embedded": True}})
    p = plan_service(s, [])
    assert p.mode == "cpu" and p.max_batch_size == 16 and p.pin_above_mib is None


# The draft model is planned with the served one (ModelFootprint.draft), as the pod plans it.
SHAPE = {"sizeBytes": 4_370_000_000, "layers": 32, "kvHeads": 8, "keyLength": 128,
         "valueLength": 128}  # spec()'s model
DRAFT_PVC = {"pvc": {"claimName": "drafts", "path": "d.gguf"}}


def footprint(shape: dict, context: int = 4096, gpu_layers: int = -1, **draft) -> ModelFootprint:
    kv = KVShape(shape["layers"], shape["kvHeads"], shape["keyLength"], shape["valueLength"],
                 shape.get("slidingWindow"), shape.get("swaPattern"))
    return ModelFootprint(shape["sizeBytes"], kv, context, gpu_layers=gpu_layers, **draft)


def drafting(source: dict, shape: dict | None = None) -> dict:
    return {"mode": "draft", "draftModel": {"source": source, **({"shape": shape} if shape else {})}}


@pytest.mark.parametrize("source", [{"embedded": True}, {"embedded": {"name": SMOLLM2.name}}])
def test_an_embedded_draft_model_shrinks_a_cpu_services_plan(source) -> None:
    cpu = {"gpus": 0, "memory": "8Gi"}
    plain = spec(resources=cpu)
    drafted = spec(resources=cpu, speculative=drafting(source))
    before, after = plan_service(plain, []), plan_service(drafted, [])
    both = footprint(SHAPE, draft=footprint(SMOLLM2.shape))
    want = fit(MemoryBudget("cpu", 8 * GiB), both, 16)
    assert after.max_batch_size == want.max_batch_size < before.max_batch_size == 5
    assert after.reason == f"CPU pods (spec.model.shape; draft: embedded model {SMOLLM2.name}): " \
                           f"{want.reason}"
    assert "with the draft model's" in after.reason


def test_a_draft_model_without_a_shape_is_planned_as_the_served_model() -> None:
    s = spec(resources={"gpus": 0, "memory": "16Gi"}, speculative=drafting(DRAFT_PVC))
    p = plan_service(s, [])
    want = fit(MemoryBudget("cpu", 16 * GiB), footprint(SHAPE, draft=footprint(SHAPE)), 16)
    assert p.max_batch_size == want.max_batch_size == 6
    assert p.max_batch_size < plan_service(spec(resources={"gpus": 0, "memory": "16Gi"}), []).max_batch_size
    assert "draft: planned as the served model (set spec.speculative.draftModel.shape)" in p.reason
    # Not the 8B-class estimate: an embedded served model bounds its draft model.
    small = spec(resources={"gpus": 0, "memory": "2Gi"},
                 model={"source": {"embedded": True}, "contextSize": 4096},
                 speculative=drafting({"url": DRAFT_URL}))
    want = fit(MemoryBudget("cpu", 2 * GiB),
               footprint(SMOLLM2.shape, draft=footprint(SMOLLM2.shape)), 16)
    assert plan_service(small, []).max_batch_size == want.max_batch_size >= 1


def test_a_declared_draft_shape_is_planned_and_named() -> None:
    cpu = {"gpus": 0, "memory": "8Gi"}
    declared = {"sizeBytes": 1_300_000_000, "layers": 16, "kvHeads": 4}
    p = plan_service(spec(resources=cpu, speculative=drafting(DRAFT_PVC, declared)), [])
    # The fields left out (keyLength, valueLength) are the served model's.
    draft = footprint({**SHAPE, **declared})
    want = fit(MemoryBudget("cpu", 8 * GiB), footprint(SHAPE, draft=draft), 16)
    assert p.max_batch_size == want.max_batch_size
    assert p.reason == f"CPU pods (spec.model.shape; draft: spec.speculative.draftModel.shape): " \
                       f"{want.reason}"
    # An embedded draft model's declared fields win over the registry's, as the model's do.
    wider = plan_service(spec(resources=cpu, speculative=drafting(
        {"embedded": True}, {"kvHeads": 32})), [])
    want = fit(MemoryBudget("cpu", 8 * GiB),
               footprint(SHAPE, draft=footprint({**SMOLLM2.shape, "kvHeads": 32})), 16)
    assert wider.max_batch_size == want.max_batch_size


def test_a_draft_model_takes_the_served_models_sliding_window_only_when_planned_as_it() -> None:
    gemma = {"source": {"embedded": {"name": GEMMA.name}}, "contextSize": 8192}
    assert GEMMA.shape.get("slidingWindow")
    cpu, budget = {"gpus": 0, "memory": "2Gi"}, MemoryBudget("cpu", 2 * GiB)
    as_served = spec(resources=cpu, model=gemma, speculative=drafting(DRAFT_PVC))
    want = fit(budget, footprint(GEMMA.shape, 8192, draft=footprint(GEMMA.shape, 8192)), 16)
    assert plan_service(as_served, []).max_batch_size == want.max_batch_size
    # A declared size and layers: a draft model of its own, whose window was not declared.
    own = spec(resources=cpu, model=gemma,
               speculative=drafting(DRAFT_PVC, {"sizeBytes": 100_000_000, "layers": 18}))
    full = {k: v for k, v in GEMMA.shape.items() if k not in ("slidingWindow", "swaPattern")}
    draft = footprint({**full, "sizeBytes": 100_000_000, "layers": 18}, 8192)
    want = fit(budget, footprint(GEMMA.shape, 8192, draft=draft), 16)
    assert draft.per_sequence_bytes > footprint(GEMMA.shape, 8192).per_sequence_bytes
    assert plan_service(own, []).max_batch_size == want.max_batch_size


def test_a_draft_model_shrinks_a_gpu_services_plan_on_its_node() -> None:
    declared = {"sizeBytes": 1_300_000_000, "layers": 16}
    gpu = nodes(12288)
    before = plan_service(spec(), gpu)
    after = plan_service(spec(speculative=drafting(DRAFT_PVC, declared)), gpu)
    want = fit(MemoryBudget("gpu", 12288 * MiB), footprint(SHAPE, draft=footprint(
        {**SHAPE, **declared})), 16)
    assert after.max_batch_size == want.max_batch_size < before.max_batch_size == 13
    assert after.reason == f"GPU (spec.model.shape; draft: spec.speculative.draftModel.shape): " \
                           f"{want.reason}"
    assert (after.gpu_memory_mib, after.pin_above_mib) == (12288, 12287)
    # gpuLayers offloads as many of the draft model's layers as of the model's (as the pod
    # does): 16 of its 24, 16 of the model's 32; the rest stays in RAM.
    deeper = {**declared, "layers": 24}
    partial = plan_service(spec(gpuLayers=16, speculative=drafting(DRAFT_PVC, deeper)), gpu)
    want = fit(MemoryBudget("gpu", 12288 * MiB), footprint(SHAPE, gpu_layers=16, draft=footprint(
        {**SHAPE, **deeper}, gpu_layers=16)), 16)
    assert partial.max_batch_size == want.max_batch_size == 15
    # The node that fits most still wins: here the larger one, pinned above the smaller.
    wide = plan_service(spec(speculative=drafting(DRAFT_PVC)), nodes(12288, 24576))
    assert (wide.max_batch_size, wide.pin_above_mib) == (13, 24575)


@pytest.mark.parametrize("speculative", [{}, {"mode": "none"}, {"mode": "ngram", "k": 8}])
def test_no_draft_model_no_change_to_the_plan(speculative) -> None:
    for resources, found in (({"gpus": 0, "memory": "8Gi"}, []), ({"gpus": 1}, nodes(12288))):
        plain = plan_service(spec(resources=resources), found)
        assert plan_service(spec(resources=resources, speculative=speculative), found) == plain
        assert "draft" not in plain.reason


def test_a_bad_draft_shape_says_what_to_fix() -> None:
    with pytest.raises(SpecError, match=r"spec\.speculative\.draftModel\.shape\.layers"):
        spec(speculative=drafting(DRAFT_PVC, {"sizeBytes": 1, "layers": 0}))
    with pytest.raises(SpecError, match=r"spec\.speculative\.draftModel\.shape\.bogus"):
        spec(speculative=drafting(DRAFT_PVC, {"bogus": 1}))


def test_deployment_is_valid_and_complete() -> None:
    s = spec(sampling={"temperature": 0.2, "maxTokens": 256}, systemPrompt="Be brief.",
             scheduling={"nodeSelector": {"pool": "gpu"},
                         "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "llm",
                                          "effect": "NoSchedule"}]})
    plan = plan_service(s, nodes(6144, 81559))
    dep = B.build_deployment(NAMES, s, plan, "llamafleet:0.1.0")
    validate(dep)
    c = dep["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["LLM_LLAMA_SERVICE_MAX_BATCH_SIZE"] == "16"
    assert env["LLM_LLAMA_SERVICE_SPECULATIVE"] == "none"  # off unless asked
    assert env["LLM_LLAMA_SERVICE_DEFAULT_TEMPERATURE"] == "0.2"
    assert env["LLM_LLAMA_SERVICE_SYSTEM_PROMPT"] == "Be brief."
    assert env["LLM_LLAMA_SERVICE_ENV"] == "production"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    # The spread counts serve pods only (router pods share selector_labels).
    assert pod["topologySpreadConstraints"][0]["labelSelector"]["matchLabels"] == \
        B.pod_selector_labels("chat")
    assert dep["spec"]["selector"]["matchLabels"] == B.selector_labels("chat")


def test_serve_pods_name_their_engine_for_llm_d_and_routers_do_not() -> None:
    # llm-d's endpoint picker picks the metric mapping by this label (README, examples/llm-d/).
    s = spec()
    dep = B.build_deployment(NAMES, s, plan_service(s, nodes(81559)), "img:1")
    assert dep["spec"]["template"]["metadata"]["labels"]["llm-d.ai/engine-type"] == "llamafleet"
    assert "llm-d.ai/engine-type" not in dep["spec"]["selector"]["matchLabels"]  # immutable
    router = B.build_router_deployment(NAMES, spec(replicas=2, routing={"router": {"enabled": True}}),
                                       "img:1")
    assert "llm-d.ai/engine-type" not in router["spec"]["template"]["metadata"]["labels"]
    engine = yaml.safe_load((ROOT / "examples/llm-d/endpoint-picker-config.yaml").read_text())
    names = {e["name"] for p in engine["plugins"] if p["type"] == "core-metrics-extractor"
             for e in p["parameters"]["engineConfigs"]}
    assert "llamafleet" in names


def test_grace_period_outlasts_the_pods_drain() -> None:
    """Scale-down must never kill a pod that is still draining its streams (issue #16)."""
    s = spec()
    dep = B.build_deployment(NAMES, s, plan_service(s, nodes(81559)), "img:1")
    pod = dep["spec"]["template"]["spec"]
    drain = float({e["name"]: e.get("value") for e in pod["containers"][0]["env"]}[
        "LLM_LLAMA_SERVICE_DRAIN_TIMEOUT_S"])
    assert drain == Settings().drain_timeout_s == C.DRAIN_TIMEOUT_S
    assert pod["terminationGracePeriodSeconds"] == C.termination_grace_seconds(drain) > drain
    assert C.termination_grace_seconds(25.2) == 31


@pytest.mark.parametrize("source", [
    {"pvc": {"claimName": "models", "path": "m.gguf"}},
    {"url": {"url": "https://models.example/m.gguf", "sha256": "a" * 64}},
    {"embedded": True},
])
def test_every_env_key_the_builders_set_is_a_pod_setting(source) -> None:
    # Settings ignores unknown LLM_LLAMA_SERVICE_* variables: a typo here would pass silently.
    s = spec(model={"source": source}, systemPrompt="Be brief.",
             speculative={"mode": "ngram", "k": 6}, sampling={
        "temperature": 0.2, "topK": 20, "topP": 0.9, "repeatPenalty": 1.2, "maxTokens": 64})
    dep = B.build_deployment(NAMES, s, plan_service(s, nodes(81559)), "img:1")
    pod = dep["spec"]["template"]["spec"]
    names = [e["name"] for c in pod["containers"] + pod.get("initContainers", [])
             for e in c.get("env", [])]
    assert len(names) > 15 and all(n.startswith(ENV_PREFIX) for n in names)
    unknown = {n for n in names if n.removeprefix(ENV_PREFIX).lower() not in Settings.model_fields}
    assert not unknown


DRAFT_URL = {"url": "https://models.example/d.gguf", "sha256": "d" * 64}


@pytest.mark.parametrize("source, path, volume", [
    ({"url": DRAFT_URL}, "/draft-model/model.gguf", {"emptyDir": {}}),
    ({"pvc": {"claimName": "drafts", "path": "/small/d.gguf"}}, "/draft-model/small/d.gguf",
     {"persistentVolumeClaim": {"claimName": "drafts", "readOnly": True}}),
    ({"pvc": {"claimName": "models", "path": "d.gguf"}}, "/models/d.gguf", None),  # the model's
    ({"embedded": {"name": "smollm2-135m-instruct"}}, "smollm2-135m-instruct", None),
])
def test_the_draft_model_reaches_the_pod_as_the_model_does(source, path, volume) -> None:
    s = spec(model={"source": {"pvc": {"claimName": "models", "path": "m.gguf"}}},
             speculative={"mode": "draft", "k": 6, "draftModel": {"source": source}})
    dep = B.build_deployment(NAMES, s, plan_service(s, nodes(81559)), "img:1")
    validate(dep)
    pod = dep["spec"]["template"]["spec"]
    server = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env[ENV_PREFIX + "SPECULATIVE"] == "draft" and env[ENV_PREFIX + "SPECULATIVE_K"] == "6"
    assert env[ENV_PREFIX + "DRAFT_MODEL"] == path
    assert all(n.removeprefix(ENV_PREFIX).lower() in Settings.model_fields for n in env)
    volumes = {v["name"]: v for v in pod["volumes"]}
    if volume is None:
        assert "draft-model" not in volumes
    else:
        assert volumes["draft-model"] == {"name": "draft-model", **volume}
        assert {"name": "draft-model", "mountPath": "/draft-model", "readOnly": True} in \
            server["volumeMounts"]
    fetch = [c for c in pod.get("initContainers", []) if c["name"] == "fetch-draft-model"]
    if "url" in source:  # downloaded and verified before the server starts
        (init,) = fetch
        assert init["command"] == ["llamafleet", "fetch", "--url", DRAFT_URL["url"], "--sha256",
                                   "d" * 64, "--out", "/draft-model/model.gguf"]
        assert {"name": "draft-model", "mountPath": "/draft-model"} in init["volumeMounts"]
    else:
        assert not fetch


def test_no_draft_model_without_mode_draft() -> None:
    s = spec(speculative={"mode": "ngram"})
    env = B.pod_env(NAMES, s, plan_service(s, nodes(81559)))
    assert ENV_PREFIX + "DRAFT_MODEL" not in {e["name"] for e in env}


def test_same_plan_same_hash_and_new_plan_new_hash() -> None:
    s = spec()
    a = B.build_deployment(NAMES, s, plan_service(s, nodes(81559)), "img:1")
    b = B.build_deployment(NAMES, s, plan_service(s, nodes(81559)), "img:1")
    c = B.build_deployment(NAMES, s, plan_service(s, nodes(8192)), "img:1")
    h = lambda d: d["metadata"]["annotations"][B.HASH_ANNOTATION]  # noqa: E731
    assert h(a) == h(b) != h(c)


def test_url_source_uses_a_verifying_init_container() -> None:
    s = spec(model={"source": {"url": {"url": "https://models.example/m.gguf", "sha256": "a" * 64}}})
    dep = B.build_deployment(NAMES, s, plan_service(s, nodes(81559)), "img:1")
    validate(dep)
    init = dep["spec"]["template"]["spec"]["initContainers"][0]
    assert init["command"][:2] == ["llamafleet", "fetch"] and "a" * 64 in init["command"]


def test_other_children_are_valid() -> None:
    s = spec(replicas=2, networkPolicy={"monitoringNamespaces": ["monitoring"]},
             podDisruptionBudget={"enabled": True})
    for obj in (B.build_service(NAMES), B.build_pod_service(NAMES), B.build_network_policy(NAMES, s),
                B.build_network_policy(NAMES, s, routed_only=True), B.build_pdb(NAMES, s),
                B.build_secret(NAMES, "chat-ca", {"ca.crt": b"x"}, tls=False)):
        validate(obj)


def test_crd_is_valid_and_matches_the_chart_copy() -> None:
    crd = yaml.safe_load((ROOT / "crds/llmservice.yaml").read_text())
    validate(crd)
    chart_copy = ROOT / "charts/llamafleet/files/crds/llmservice.yaml"
    assert chart_copy.read_text() == (ROOT / "crds/llmservice.yaml").read_text()
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    # Kept as given: scheduling (Kubernetes' own types) and model.source.embedded (a boolean
    # or {name}); everything else is pruned by the API server.
    embedded = props["model"]["properties"]["source"]["properties"].pop("embedded")
    assert embedded["x-kubernetes-preserve-unknown-fields"] is True
    draft = props["speculative"]["properties"]["draftModel"]["properties"]["source"]
    assert draft["properties"].pop("embedded")["x-kubernetes-preserve-unknown-fields"] is True
    # The draft model's shape has the model's fields (the spec's one Shape; the API server
    # would prune any the schema lacks).
    shapes = [props["model"]["properties"]["shape"],
              props["speculative"]["properties"]["draftModel"]["properties"]["shape"]]
    assert shapes[0]["properties"] == shapes[1]["properties"]
    assert set(shapes[1]["properties"]) == set(Shape.model_fields)
    assert "x-kubernetes-preserve-unknown-fields" not in yaml.safe_dump(
        {k: v for k, v in props.items() if k != "scheduling"})
    for model in EMBEDDED_MODELS.values():
        assert model.name in embedded["description"]


def test_examples_parse_as_valid_specs() -> None:
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "LLMService":
                parse_spec(doc["spec"])


@pytest.mark.parametrize("over, needle", [
    ({"networkPolicy": {"allowedClients": [{}]}}, "needs podSelector or namespaceSelector"),
    ({"podDisruptionBudget": {"enabled": True}}, "minAvailable (1) must be below replicas (1)"),
    ({"replicas": 3, "podDisruptionBudget": {"enabled": True, "minAvailable": 3}},
     "must be below replicas"),
    ({"tls": {"renewBefore": "720h", "caOverlap": "400h"}}, "caOverlap"),
    ({"imagePullSecrets": [{"name": "Bad_Name"}]}, "spec.imagePullSecrets.0.name"),
    ({"auth": {"apiKeySecret": "has space"}}, "spec.auth.apiKeySecret"),
    ({"speculative": {"mode": "ngram", "k": 17}}, "spec.speculative.k"),
    ({"speculative": {"mode": "medusa"}}, "spec.speculative.mode"),
    ({"speculative": {"mode": "draft"}}, "spec.speculative: mode draft needs draftModel.source"),
    ({"speculative": {"mode": "ngram", "draftModel": {"source": {"embedded": True}}}},
     "spec.speculative: draftModel is set but mode is 'ngram'"),
    ({"speculative": {"mode": "draft", "draftModel": {"source": {}}}},
     "spec.speculative.draftModel.source: set exactly one of speculative.draftModel.source.pvc"),
    ({"tracing": {"otlpEndpoint": "otel-collector:4318"}}, "spec.tracing.otlpEndpoint"),
    ({"tracing": {"otlpEndpoint": "http://c:4318", "sampleRatio": 2}}, "spec.tracing.sampleRatio"),
])
def test_input_the_api_server_would_reject_is_an_invalid_spec(over, needle) -> None:
    with pytest.raises(SpecError) as e:
        spec(**over)
    assert needle in str(e.value)


def test_pdb_is_fine_below_replicas_and_when_scaled_to_zero() -> None:
    spec(replicas=2, podDisruptionBudget={"enabled": True, "minAvailable": 1})
    spec(replicas=0, podDisruptionBudget={"enabled": True, "minAvailable": 1})


@pytest.mark.parametrize("name", ["a" * 59, "chat.v2", "Chat", "9chat", "chat-"])
def test_names_the_api_server_would_reject(name: str) -> None:
    with pytest.raises(SpecError, match="must be a DNS label"):
        check_name(name)


def test_good_names_pass() -> None:
    check_name("a" * 58)  # <name>-pods is then 63 characters, the most a Service name has
    check_name("chat-2")


def test_network_policy_is_on_by_default_and_closes_metrics() -> None:
    s = spec()
    assert s.networkPolicy.enabled
    np_ = B.build_network_policy(NAMES, s)
    validate(np_)
    (rule,) = np_["spec"]["ingress"]  # no rule for the metrics port
    assert rule["from"] == [{"podSelector": {"matchLabels": {"llamafleet.io/client": "true"}}}]
    assert {p["port"] for p in rule["ports"]} == {C.HTTP_PORT, C.GRPC_PORT}


def test_network_policy_admits_named_clients_and_monitoring_namespaces() -> None:
    s = spec(networkPolicy={"allowedClients": [{"podSelector": {"app": "gw"},
                                                "namespaceSelector": {"team": "a"}}],
                            "monitoringNamespaces": ["monitoring", "obs"]})
    np_ = B.build_network_policy(NAMES, s)
    validate(np_)
    clients, metrics = np_["spec"]["ingress"]
    assert clients["from"] == [{"podSelector": {"matchLabels": {"app": "gw"}},
                                "namespaceSelector": {"matchLabels": {"team": "a"}}}]
    assert metrics == {"from": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "obs"}}}],
        "ports": [{"port": C.METRICS_PORT, "protocol": "TCP"}]}


def _env_from(dep: dict, name: str) -> dict:
    env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
    return next(e for e in env if e["name"] == name)


def test_pods_read_the_api_key_from_a_secret() -> None:
    s = spec()
    dep = B.build_deployment(NAMES, s, plan_service(s, nodes(81559)), "img:1")
    assert _env_from(dep, "LLM_LLAMA_SERVICE_API_KEY") == {
        "name": "LLM_LLAMA_SERVICE_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "chat-api-key", "key": "api-key"}}}
    s = spec(auth={"apiKeySecret": "team-keys", "apiKeySecretKey": "llm"})
    dep = B.build_deployment(NAMES, s, plan_service(s, nodes(81559)), "img:1")
    validate(dep)
    assert _env_from(dep, "LLM_LLAMA_SERVICE_API_KEY")["valueFrom"]["secretKeyRef"] == {
        "name": "team-keys", "key": "llm"}


def test_image_pull_secrets_reach_the_pods() -> None:
    s = spec(imagePullSecrets=[{"name": "regcred"}])
    dep = B.build_deployment(NAMES, s, plan_service(s, nodes(81559)), "img:1")
    validate(dep)
    assert dep["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    dep = B.build_deployment(NAMES, spec(), plan_service(spec(), nodes(81559)), "img:1")
    assert "imagePullSecrets" not in dep["spec"]["template"]["spec"]


def test_image_follows_gpus_unless_the_spec_names_one() -> None:
    from llamafleet.operator.settings import OperatorSettings

    settings = OperatorSettings(image_repository="reg/lf", image_tag="1", gpu_image_repository="reg/lf",
                                gpu_image_tag="1-cuda")
    assert B.image_for(spec(), settings) == "reg/lf:1-cuda"  # default gpus: 1
    assert B.image_for(spec(resources={"gpus": 0}), settings) == "reg/lf:1"
    assert B.image_for(spec(image={"repository": "mine", "tag": "x"}), settings) == "mine:x"
    assert OperatorSettings().gpu_image_tag.endswith("-cuda")


def test_crd_rejects_empty_peers_and_bad_names() -> None:
    crd = yaml.safe_load((ROOT / "crds/llmservice.yaml").read_text())
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    np_ = schema["properties"]["spec"]["properties"]["networkPolicy"]
    assert np_["properties"]["allowedClients"]["items"]["minProperties"] == 1
    assert np_["properties"]["enabled"]["default"] is True
    assert "self.metadata.name" in schema["x-kubernetes-validations"][0]["rule"]


# --- drift detection --------------------------------------------------------------------------


def test_drift_is_a_changed_or_missing_desired_field_not_a_server_default() -> None:
    from llamafleet.operator.children import drifted

    s = spec()
    want = B.build_deployment(NAMES, s, plan_service(s, nodes(81559)), "img:1")
    live = json.loads(json.dumps(want))
    # What an API server adds or canonicalises is not drift.
    live["spec"]["revisionHistoryLimit"] = 10
    live["metadata"]["annotations"]["deployment.kubernetes.io/revision"] = "3"
    c = live["spec"]["template"]["spec"]["containers"][0]
    c["terminationMessagePath"] = "/dev/termination-log"
    c["resources"]["limits"]["nvidia.com/gpu"] = "1"
    c["resources"]["requests"]["cpu"] = "4000m"
    assert not drifted(want, live)
    # A hand edit of a field we set is.
    edited = json.loads(json.dumps(live))
    edited["spec"]["template"]["spec"]["containers"][0]["securityContext"][
        "readOnlyRootFilesystem"] = False
    assert drifted(want, edited)
    edited = json.loads(json.dumps(live))
    edited["spec"]["template"]["spec"]["containers"][0]["env"].pop()
    assert drifted(want, edited)
    np_ = B.build_network_policy(NAMES, s)
    loosened = json.loads(json.dumps(np_))
    loosened["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}})
    assert drifted(np_, loosened)


# --- certificates ---------------------------------------------------------------------------


def test_duration_parsing() -> None:
    assert certs.parse_duration("8760h") == dt.timedelta(hours=8760)
    assert certs.parse_duration("1h30m") == dt.timedelta(minutes=90)
    with pytest.raises(ValueError):
        certs.parse_duration("10")


def test_renewal_window() -> None:
    ca = certs.new_ca("ca", dt.timedelta(days=10))
    assert not certs.needs_renewal(ca, dt.timedelta(days=1))
    assert certs.needs_renewal(ca, dt.timedelta(days=11))


def test_server_and_client_certificates_complete_a_real_mtls_handshake(tmp_path) -> None:
    ca = certs.new_ca("ca", dt.timedelta(days=1))
    server = certs.issue(ca, "chat", dt.timedelta(days=1), sans=NAMES.dns_names("cluster.local"))
    client = certs.issue(ca, "client", dt.timedelta(days=1), client=True)
    other = certs.issue(certs.new_ca("other", dt.timedelta(days=1)), "x", dt.timedelta(days=1),
                        client=True)
    for name, pair in (("ca", ca), ("server", server), ("client", client), ("other", other)):
        (tmp_path / f"{name}.crt").write_bytes(pair.cert_pem)
        (tmp_path / f"{name}.key").write_bytes(pair.key_pem)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(tmp_path / "server.crt", tmp_path / "server.key")
    sctx.load_verify_locations(tmp_path / "ca.crt")
    sctx.verify_mode = ssl.CERT_REQUIRED
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    results: list = []

    def serve(n: int) -> None:
        for _ in range(n):
            conn, _ = lsock.accept()
            try:
                with sctx.wrap_socket(conn, server_side=True) as s:
                    results.append(s.getpeercert()["subject"])
            except ssl.SSLError as e:
                results.append(e)

    t = threading.Thread(target=serve, args=(3,))
    t.start()

    def connect(client_name: str, host: str) -> None:
        cctx = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        cctx.load_cert_chain(tmp_path / f"{client_name}.crt", tmp_path / f"{client_name}.key")
        with socket.create_connection(("127.0.0.1", port)) as raw:
            with cctx.wrap_socket(raw, server_hostname=host) as s:
                try:
                    s.recv(1)  # TLS 1.3: a rejected client certificate shows up here
                except (ssl.SSLError, ConnectionError):
                    pass

    connect("client", "chat.team-a.svc")      # verifies for the Service's DNS name
    connect("other", "chat.team-a.svc")       # a certificate from another CA
    with pytest.raises(ssl.SSLCertVerificationError):
        connect("client", "evil.example")     # a name not in the SANs
    t.join(10)
    lsock.close()
    assert not isinstance(results[0], Exception) and ("commonName", "client") in results[0][-1]
    assert isinstance(results[1], ssl.SSLError)
    assert isinstance(results[2], ssl.SSLError)


def test_server_certificate_names() -> None:
    from cryptography import x509

    ca = certs.new_ca("ca", dt.timedelta(days=1))
    server = certs.issue(ca, "chat", dt.timedelta(days=1), sans=NAMES.dns_names("cluster.local"))
    san = server.cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {
        "chat", "chat.team-a", "chat.team-a.svc", "chat.team-a.svc.cluster.local", "localhost",
        "chat-pods", "chat-pods.team-a", "chat-pods.team-a.svc", "chat-pods.team-a.svc.cluster.local"}
    assert certs.subject_names(server) == set(NAMES.dns_names("cluster.local"))
    assert server.not_after <= ca.not_after


def _handshake(tmp_path: Path, server: tuple, client: tuple) -> bool:
    """A TLS 1.3 mTLS handshake in memory: (leaf, trusted bundle) on each side."""
    ctxs = []
    for side, (leaf, bundle) in (("server", server), ("client", client)):
        (tmp_path / f"{side}.crt").write_bytes(leaf.cert_pem)
        (tmp_path / f"{side}.key").write_bytes(leaf.key_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if side == "server" else ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_cert_chain(tmp_path / f"{side}.crt", tmp_path / f"{side}.key")
        ctx.load_verify_locations(cadata=bundle.decode())
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctxs.append(ctx)
    bios = [ssl.MemoryBIO() for _ in range(4)]
    s = ctxs[0].wrap_bio(bios[0], bios[1], server_side=True)
    c = ctxs[1].wrap_bio(bios[2], bios[3], server_hostname="chat.team-a.svc")
    done = {"s": False, "c": False}
    try:
        for _ in range(10):
            for key, end in (("c", c), ("s", s)):
                if not done[key]:
                    try:
                        end.do_handshake()
                        done[key] = True
                    except ssl.SSLWantReadError:
                        pass
            bios[0].write(bios[3].read())
            bios[2].write(bios[1].read())
            if all(done.values()):
                c.write(b"x")  # TLS 1.3: the server checks the client's certificate now
                bios[0].write(bios[3].read())
                return s.read(1) == b"x"
    except ssl.SSLError:
        return False
    return False


def test_ca_rotation_overlaps_so_mixed_mounts_always_handshake(tmp_path) -> None:
    validity, renew, overlap = dt.timedelta(days=10), dt.timedelta(days=3), dt.timedelta(hours=1)
    t = dt.datetime.now(dt.UTC)  # certificates are issued at the real time
    kw = dict(validity=validity, renew_before=renew, overlap=overlap)
    states = []

    def leaves(ca: certs.CAState, prev: tuple | None) -> tuple:
        # As the operator does: a leaf is reissued when the signer did not sign it.
        if prev and certs.signed_by(prev[0], ca.signer):
            return prev
        return (certs.issue(ca.signer, "chat", validity, sans=NAMES.dns_names("cluster.local")),
                certs.issue(ca.signer, "client", validity, client=True))

    ca = certs.advance_ca(None, "ca", now=t, **kw)
    states.append((ca, leaves(ca, None)))
    assert certs.advance_ca(ca, "ca", now=t + dt.timedelta(days=1), **kw) is ca  # not due
    phases = []
    for now in (ca.signer.not_after - renew,                # due: publish the new CA beside
                ca.signer.not_after - renew + overlap / 2,  # nothing moves within the window
                ca.signer.not_after - renew + overlap,      # leaves move to the new CA
                ca.signer.not_after - renew + 2 * overlap):  # the old CA is dropped
        nxt = certs.advance_ca(states[-1][0], "ca", now=now, **kw)
        if nxt is not states[-1][0]:
            states.append((nxt, leaves(nxt, states[-1][1])))
            phases.append(nxt.phase)
    assert phases == ["overlap", "reissued", ""]
    first, last = states[0][0], states[-1][0]
    assert last.bundle == last.signer.cert_pem and last.signer != first.signer
    assert states[1][0].bundle.count(b"BEGIN CERTIFICATE") == 2
    # Every pair of neighbouring states handshakes both ways: a server and a client whose
    # mounts are refreshed at different times still trust each other.
    for (ca_a, (srv_a, cli_a)), (ca_b, (srv_b, cli_b)) in zip(states, states[1:], strict=False):
        assert _handshake(tmp_path, (srv_a, ca_a.bundle), (cli_b, ca_b.bundle))
        assert _handshake(tmp_path, (srv_b, ca_b.bundle), (cli_a, ca_a.bundle))
    # Without the overlap (first state straight to the last) a lagging mount fails.
    assert not _handshake(tmp_path, (states[-1][1][0], last.bundle), (states[0][1][1], first.bundle))


def test_an_expired_ca_is_replaced_at_once() -> None:
    day = dt.timedelta(days=1)
    ca = certs.advance_ca(None, "ca", validity=day, renew_before=day / 2, overlap=day / 10)
    later = ca.signer.not_after + dt.timedelta(seconds=1)
    new = certs.advance_ca(ca, "ca", validity=day, renew_before=day / 2, overlap=day / 10,
                           now=later)
    assert new.signer != ca.signer and new.phase == "" and new.bundle == new.signer.cert_pem


def test_the_tenants_secret_is_mounted_whole_into_the_pods_and_the_router() -> None:
    s = spec(replicas=2, tenants={"secretName": "team-tenants", "maxQueuedPerReplica": 2})
    dep = B.build_deployment(NAMES, s, plan_service(s, nodes(81559)), "img:1")
    router = B.build_router_deployment(NAMES, s, "img:1")
    for d, prefix in ((dep, C.ENV_PREFIX), (router, C.ROUTER_ENV_PREFIX)):
        validate(d)
        pod = d["spec"]["template"]["spec"]
        assert {"name": "tenants", "secret": {"secretName": "team-tenants",
                                              "defaultMode": 0o440}} in pod["volumes"]
        # The whole Secret (no subPath): the kubelet's updates reach the file in place.
        mount = {"name": "tenants", "mountPath": C.TENANTS_MOUNT_DIR, "readOnly": True}
        assert mount in pod["containers"][0]["volumeMounts"]
        assert pod["securityContext"]["fsGroup"] == C.USER_ID  # the 0440 files are readable
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env[prefix + "TENANTS_FILE"] == f"{C.TENANTS_MOUNT_DIR}/{C.TENANTS_SECRET_KEY}"
    env = {e["name"]: e.get("value") for e in router["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env[C.ROUTER_ENV_PREFIX + "MAX_QUEUED_PER_REPLICA"] == "2"
    plain = B.build_router_deployment(NAMES, spec(replicas=2), "img:1")["spec"]["template"]["spec"]
    assert [v["name"] for v in plain["volumes"]] == ["tmp"] and "fsGroup" not in plain["securityContext"]
    with pytest.raises(SpecError, match="tenants"):
        parse_spec(spec(tenants={"secretName": "Bad Name"}))


def test_spec_tracing_turns_on_the_otlp_exporter_of_the_pods_and_the_router() -> None:
    from llamafleet.common import tracing

    s = spec(replicas=2, tracing={"otlpEndpoint": "http://otel-collector.obs:4318",
                                  "sampleRatio": 0.25})
    dep = B.build_deployment(NAMES, s, plan_service(s, nodes(81559)), "img:1")
    router = B.build_router_deployment(NAMES, s, "img:1")
    for d in (dep, router):
        validate(d)
        env = {e["name"]: e.get("value") for e in d["spec"]["template"]["spec"]["containers"][0]["env"]}
        otel = {k: v for k, v in env.items() if k.startswith("OTEL_")}
        assert otel == {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.obs:4318",
                        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                        "OTEL_TRACES_SAMPLER_ARG": "0.25",
                        "OTEL_RESOURCE_ATTRIBUTES": f"service.namespace={NAMES.namespace},"
                                                    f"llamafleet.llmservice={NAMES.name}"}
        assert tracing.wanted(otel)  # what the processes read turns tracing on
    plain = spec(replicas=2)
    for d in (B.build_deployment(NAMES, plain, plan_service(plain, nodes(81559)), "img:1"),
              B.build_router_deployment(NAMES, plain, "img:1")):
        assert not any(e["name"].startswith("OTEL_")
                       for e in d["spec"]["template"]["spec"]["containers"][0]["env"])
