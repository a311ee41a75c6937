"""Pure operator parts: spec validation, planning, manifest builders (validated against the
Kubernetes 1.33 schemas) and certificates that really verify."""

from __future__ import annotations

import datetime as dt
import ssl
import socket
import threading

import kubernetes_validate
import pytest
import yaml
from pathlib import Path

from llamafleet.inference.embedded import EMBEDDED, GEMMA, SMOLLM2
from llamafleet.operator import builders as B
from llamafleet.operator import certs
from llamafleet.operator.planning import NodeGPU, plan_service
from llamafleet.operator.spec import SpecError, parse_spec

K8S = "1.33.0"
ROOT = Path(__file__).resolve().parents[2]


def spec(**over):  # noqa: ANN003, ANN201
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
def test_invalid_specs_say_what_to_fix(raw, needle) -> None:  # noqa: ANN001
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
def test_embedded_source_names_the_model_for_the_pod_and_the_planner(source, name) -> None:  # noqa: ANN001
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
def test_bad_embedded_source_says_what_to_fix(source, needle) -> None:  # noqa: ANN001
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
    assert env["LLM_LLAMA_SERVICE_DEFAULT_TEMPERATURE"] == "0.2"
    assert env["LLM_LLAMA_SERVICE_SYSTEM_PROMPT"] == "Be brief."
    assert env["LLM_LLAMA_SERVICE_ENV"] == "production"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "gpu"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert dep["spec"]["selector"]["matchLabels"] == B.selector_labels("chat")


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
    s = spec(networkPolicy={"enabled": True}, podDisruptionBudget={"enabled": True})
    for obj in (B.build_service(NAMES), B.build_network_policy(NAMES, s), B.build_pdb(NAMES, s),
                B.build_secret(NAMES, "chat-ca", {"ca.crt": b"x"}, tls=False)):
        validate(obj)


def test_crd_is_valid_and_matches_the_chart_copy() -> None:
    crd = yaml.safe_load((ROOT / "crds/llmservice.yaml").read_text())
    validate(crd)
    chart_copy = ROOT / "charts/llamafleet/crds/llmservice.yaml"
    assert chart_copy.read_text() == (ROOT / "crds/llmservice.yaml").read_text()
    props = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    # Kept as given: scheduling (Kubernetes' own types) and model.source.embedded (a boolean
    # or {name}); everything else is pruned by the API server.
    embedded = props["model"]["properties"]["source"]["properties"].pop("embedded")
    assert embedded["x-kubernetes-preserve-unknown-fields"] is True
    assert "x-kubernetes-preserve-unknown-fields" not in yaml.safe_dump(
        {k: v for k, v in props.items() if k != "scheduling"})
    for model in EMBEDDED.values():
        assert model.name in embedded["description"]


def test_examples_parse_as_valid_specs() -> None:
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "LLMService":
                parse_spec(doc["spec"])


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


def test_server_and_client_certificates_complete_a_real_mtls_handshake(tmp_path) -> None:  # noqa: ANN001
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
        "chat", "chat.team-a", "chat.team-a.svc", "chat.team-a.svc.cluster.local", "localhost"}
    assert server.not_after <= ca.not_after
