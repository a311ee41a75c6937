"""The real kopf runtime against KMock's Kubernetes API emulator (tests/support/kube.py
says what the emulator adds to KMock, and why)."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from tests.support.kube import LLMS, NS, condition, create, env_of, get, kopf_runner, llmservice, node, patch
from tests.support.servers import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

# The resync timer's interval is fixed when the handlers module is imported.
os.environ.setdefault("LLAMAFLEET_OPERATOR_RESYNC_SECONDS", "0.5")


async def test_llmservice_becomes_pods_with_planned_batching_certs_and_status(api) -> None:
    await create(api, "/api/v1/nodes", node("small", 6144, "NVIDIA RTX A2000"))
    await create(api, "/api/v1/nodes", node("big", 81559, "NVIDIA H100 80GB HBM3"))
    async with kopf_runner() as runner:
        await create(api, LLMS, llmservice("chat"))
        dep_path = f"/apis/apps/v1/namespaces/{NS}/deployments/chat"
        dep = await wait_until(lambda: get(api, dep_path))
        pod = dep["spec"]["template"]["spec"]
        c = pod["containers"][0]
        env = env_of(dep)
        # The 80 GB node fits the cap; the pods are pinned above the 6 GB node type.
        assert env["MAX_BATCH_SIZE"] == "16"
        assert env["MODEL_PATH"] == "/models/mistral-7b.gguf"
        assert env["CONTEXT_SIZE"] == "4096" and env["GRPC_PORT"] == "16071"
        assert env["GRPC_CA_PATH"] == "/etc/llamafleet/tls/ca.crt"
        assert [p["containerPort"] for p in c["ports"]] == [16070, 16071, 16072]
        assert c["startupProbe"]["httpGet"]["path"] == "/ready"
        assert c["livenessProbe"]["httpGet"]["path"] == "/health"
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert c["image"] == "llamafleet:0.1.0-cuda"  # GPU pods get the CUDA image
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["securityContext"]["runAsNonRoot"] is True
        expr = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"][0]["matchExpressions"][0]
        assert expr == {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["81558"]}
        owner = dep["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "LLMService" and owner["name"] == "chat" and owner["uid"]

        svc = await wait_until(lambda: get(api, f"/api/v1/namespaces/{NS}/services/chat"))
        assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {
            "http": 16070, "grpc": 16071, "metrics": 16072}
        secrets = {}
        for s in ("chat-ca", "chat-server-tls", "chat-client-tls"):
            secrets[s] = await wait_until(lambda s=s: get(api, f"/api/v1/namespaces/{NS}/secrets/{s}"))
        server_cert = x509.load_pem_x509_certificate(
            base64.b64decode(secrets["chat-server-tls"]["data"]["tls.crt"]))
        sans = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "chat.team-a.svc" in sans.get_values_for_type(x509.DNSName)

        obj = await wait_until(lambda: _with(api, "chat", lambda o: condition(o, "CapacityPlanned")))
        assert condition(obj, "CapacityPlanned")["status"] == "True"
        assert obj["status"]["capacity"]["maxBatchSize"] == 16
        assert obj["status"]["capacity"]["gpuMemoryMiB"] == 81559
        assert condition(obj, "CertificatesReady")["status"] == "True"
        assert obj["status"]["endpoints"]["grpc"] == "chat.team-a.svc.cluster.local:16071"
        assert condition(obj, "Ready")["status"] == "False"  # no replica is ready yet

        # The Deployment controller is absent: report one ready replica ourselves.
        await patch(api, dep_path + "/status", {"status": {"replicas": 1, "readyReplicas": 1}})
        obj = await wait_until(lambda: _with(api, "chat", lambda o: (condition(o, "Ready") or {}).get(
            "status") == "True"))
        assert obj["status"]["phase"] == "Ready" and obj["status"]["readyReplicas"] == 1
        assert obj["status"]["observedGeneration"] == 1

        # A spec update rolls the Deployment.
        hash_before = dep["metadata"]["annotations"]["llamafleet.io/spec-hash"]
        await patch(api, f"{LLMS}/chat", {"spec": {"model": {"contextSize": 2048}}})
        dep = await wait_until(lambda: _dep_if(api, dep_path, lambda d: env_of(d)["CONTEXT_SIZE"] == "2048"))
        assert dep["metadata"]["annotations"]["llamafleet.io/spec-hash"] != hash_before
        obj = await wait_until(
            lambda: _with(api, "chat", lambda o: o["status"].get("observedGeneration") == 2))

        # A relabelled node re-plans: the big node shrinks to 8 GB.
        await patch(api, "/api/v1/nodes/big", {"metadata": {"labels": {"nvidia.com/gpu.memory": "8192"}}})
        dep = await wait_until(lambda: _dep_if(api, dep_path, lambda d: env_of(d)["MAX_BATCH_SIZE"] != "16"),
                          timeout=30)
        assert int(env_of(dep)["MAX_BATCH_SIZE"]) < 16
        obj = await wait_until(lambda: _with(
            api, "chat", lambda o: o["status"]["capacity"]["gpuMemoryMiB"] == 8192))

    assert runner.exit_code == 0, runner.output
    assert runner.exception is None


async def test_small_gpu_node_plans_one_sequence(api) -> None:
    await create(api, "/api/v1/nodes", node("small", 6144, "NVIDIA RTX A2000"))
    async with kopf_runner() as runner:
        await create(api, LLMS, llmservice("tiny"))
        dep = await wait_until(lambda: get(api, f"/apis/apps/v1/namespaces/{NS}/deployments/tiny"))
        assert env_of(dep)["MAX_BATCH_SIZE"] == "1"
    assert runner.exception is None


async def test_invalid_spec_gets_a_condition_and_the_operator_keeps_running(api) -> None:
    await create(api, "/api/v1/nodes", node("big", 81559, "NVIDIA H100 80GB HBM3"))
    async with kopf_runner() as runner:
        bad = llmservice("broken")
        bad["spec"]["model"]["source"] = {"pvc": {"claimName": "m", "path": "x.gguf"},
                                          "embedded": True}
        bad["spec"]["batching"] = {"maxBatchSize": 0}
        await create(api, LLMS, bad)
        obj = await wait_until(lambda: _with(api, "broken", lambda o: condition(o, "Ready")))
        ready = condition(obj, "Ready")
        assert ready["reason"] == "InvalidSpec"
        assert "exactly one of model.source" in ready["message"]
        assert "spec.batching.maxBatchSize" in ready["message"]
        assert obj["status"]["phase"] == "Failed"
        assert await get(api, f"/apis/apps/v1/namespaces/{NS}/deployments/broken") is None
        # Input the API server would reject later: a dotted name, a PDB that blocks drains.
        await create(api, LLMS, llmservice("chat.v2"))
        await create(api, LLMS, llmservice("nodrain", podDisruptionBudget={"enabled": True}))
        for name, needle in (("chat.v2", "must be a DNS label"),
                             ("nodrain", "minAvailable (1) must be below replicas (1)")):
            obj = await wait_until(lambda name=name: _with(api, name, lambda o: condition(o, "Ready")))
            assert condition(obj, "Ready")["reason"] == "InvalidSpec"
            assert needle in condition(obj, "Ready")["message"]
            assert await get(api, f"/apis/apps/v1/namespaces/{NS}/deployments/{name}") is None
        # ...and a valid one next to it still reconciles.
        await create(api, LLMS, llmservice("fine"))
        await wait_until(lambda: get(api, f"/apis/apps/v1/namespaces/{NS}/deployments/fine"))
    assert runner.exception is None


async def test_short_lived_certificates_are_renewed(api) -> None:
    await create(api, "/api/v1/nodes", node("big", 81559, "NVIDIA H100 80GB HBM3"))
    async with kopf_runner() as runner:
        # validity 3s, renew 2s before: due one second after issue.
        await create(api, LLMS, llmservice("rot", tls={"validity": "3s", "renewBefore": "2s",
                                                       "caOverlap": "0.5s"}))
        path = f"/api/v1/namespaces/{NS}/secrets/rot-server-tls"
        first = await wait_until(lambda: get(api, path))
        first_crt = first["data"]["tls.crt"]
        renewed = await wait_until(lambda: _secret_changed(api, path, first_crt), timeout=20)
        cert = x509.load_pem_x509_certificate(base64.b64decode(renewed["data"]["tls.crt"]))
        assert cert.not_valid_after_utc > x509.load_pem_x509_certificate(
            base64.b64decode(first_crt)).not_valid_after_utc
    assert runner.exception is None


async def test_cpu_service_with_optional_children(api) -> None:
    async with kopf_runner() as runner:
        await create(api, LLMS, llmservice(
            "cpu", model={"source": {"embedded": True}, "contextSize": 2048},
            resources={"gpus": 0, "cpu": "2", "memory": "4Gi"},
            replicas=2, imagePullSecrets=[{"name": "regcred"}],
            networkPolicy={"enabled": True, "allowedClients": [{"podSelector": {"app": "gateway"}}],
                           "monitoringNamespaces": ["monitoring"]},
            podDisruptionBudget={"enabled": True, "minAvailable": 1}))
        dep = await wait_until(lambda: get(api, f"/apis/apps/v1/namespaces/{NS}/deployments/cpu"))
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
        assert env_of(dep)["GPU_LAYERS"] == "0"
        assert c["image"] == "llamafleet:0.1.0"  # the CPU image for gpus: 0
        assert env_of(dep)["EMBEDDED_MODEL"] == "smollm2-135m-instruct"
        assert "MODEL_PATH" not in env_of(dep)
        np_ = await wait_until(
            lambda: get(api, f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/cpu"))
        assert np_["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"app": "gateway"}}}]
        # Two replicas bring the router (test_router_kopf.py): its metrics port too.
        assert np_["spec"]["ingress"][-1] == {"from": [{"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": "monitoring"}}}], "ports": [{"port": 16072, "protocol": "TCP"},
                                                                      {"port": 16073, "protocol": "TCP"}]}
        assert dep["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        await wait_until(lambda: get(api, f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/cpu"))
        # The other embedded model, by name: the pod gets the name, the status shows it.
        await create(api, LLMS, llmservice(
            "base", model={"source": {"embedded": {"name": "gemma-3-270m"}}},
            resources={"gpus": 0, "cpu": "2", "memory": "4Gi"}))
        dep = await wait_until(lambda: get(api, f"/apis/apps/v1/namespaces/{NS}/deployments/base"))
        assert env_of(dep)["EMBEDDED_MODEL"] == "gemma-3-270m"
        await wait_until(lambda: _with(api, "base", lambda o: o["status"].get("model")
                                  == "embedded:gemma-3-270m"))
    assert runner.exception is None


async def _with(api: httpx.AsyncClient, name: str, pred) -> dict | None:
    obj = await get(api, f"{LLMS}/{name}")
    return obj if obj and obj.get("status") and pred(obj) else None


async def _dep_if(api: httpx.AsyncClient, path: str, pred) -> dict | None:
    dep = await get(api, path)
    return dep if dep and pred(dep) else None


async def _secret_changed(api: httpx.AsyncClient, path: str, old: str) -> dict | None:
    s = await get(api, path)
    return s if s and s["data"]["tls.crt"] != old else None



NP_PATH = f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies"
DEP_PATH = f"/apis/apps/v1/namespaces/{NS}/deployments"
PDB_PATH = f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets"
SECRETS = f"/api/v1/namespaces/{NS}/secrets"


async def test_foreign_objects_survive_untouched_with_a_conflict(api, kmock) -> None:
    other = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "payments", "uid": "1234",
             "controller": True}
    foreign_dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {
        "name": "taken", "namespace": NS, "labels": {"team": "payments"}},
        "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "pay"}}, "template": {
            "metadata": {"labels": {"app": "pay"}},
            "spec": {"containers": [{"name": "pay", "image": "payments:7"}]}}}}
    foreign_np = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {
        "name": "taken", "namespace": NS, "ownerReferences": [other]},
        "spec": {"podSelector": {"matchLabels": {"app": "pay"}}, "policyTypes": ["Ingress"]}}
    foreign_pdb = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {
        "name": "taken", "namespace": NS}, "spec": {"minAvailable": 2, "selector": {
            "matchLabels": {"app": "pay"}}}}
    dep0 = await create(api, DEP_PATH, foreign_dep)
    np0 = await create(api, NP_PATH, foreign_np)
    pdb0 = await create(api, PDB_PATH, foreign_pdb)
    async with kopf_runner() as runner:
        await create(api, LLMS, llmservice("taken", resources={"gpus": 0, "cpu": "1", "memory": "2Gi"},
                                           model={"source": {"embedded": True}}))
        obj = await wait_until(lambda: _with(api, "taken", lambda o: (condition(o, "Ready") or {}).get(
            "reason") == "Conflict"))
        msg = condition(obj, "Ready")["message"]
        assert condition(obj, "Ready")["status"] == "False"
        assert f"Deployment {NS}/taken exists and is not controlled by this LLMService (no controller)" in msg
        assert f"NetworkPolicy {NS}/taken exists" in msg and "Deployment payments" in msg
        assert "PodDisruptionBudget" not in msg  # PDB is off: a same-named one is not in the way
        # Let a few resyncs (0.5 s each) pass: still nothing changed, nothing created.
        await wait_until(lambda: _with(api, "taken", lambda o: _transitioned_before(o, "Ready", 1.5)))
        assert await get(api, f"{DEP_PATH}/taken") == dep0
        assert await get(api, f"{NP_PATH}/taken") == np0
        assert await get(api, f"{PDB_PATH}/taken") == pdb0
        assert await get(api, f"/api/v1/namespaces/{NS}/services/taken") is None
        for secret in ("taken-api-key", "taken-ca", "taken-server-tls"):
            assert await get(api, f"{SECRETS}/{secret}") is None
        # Once the owners remove theirs, the LLMService proceeds; the foreign PDB stays.
        for path in (f"{DEP_PATH}/taken", f"{NP_PATH}/taken"):
            assert (await api.delete(path)).status_code == 200
        dep = await wait_until(lambda: get(api, f"{DEP_PATH}/taken"))
        assert dep["metadata"]["ownerReferences"][0]["kind"] == "LLMService"
        assert (await get(api, f"{NP_PATH}/taken"))["metadata"]["ownerReferences"][0]["name"] == "taken"
        assert await get(api, f"{PDB_PATH}/taken") == pdb0
    assert runner.exception is None


def _transitioned_before(obj: dict, type_: str, seconds: float) -> bool:
    c = condition(obj, type_)
    when = dt.datetime.strptime(c["lastTransitionTime"], "%Y-%m-%dT%H:%M:%SZ").replace(
        tzinfo=dt.UTC)
    return (dt.datetime.now(dt.UTC) - when).total_seconds() > seconds


async def test_a_default_llmservice_gets_a_network_policy_and_an_api_key(api, kmock) -> None:
    async with kopf_runner() as runner:
        await create(api, LLMS, {"apiVersion": "llamafleet.io/v1alpha1", "kind": "LLMService",
                                 "metadata": {"name": "plain", "namespace": NS},
                                 "spec": {"model": {"source": {"embedded": True}}}})
        dep = await wait_until(lambda: get(api, f"{DEP_PATH}/plain"))
        np_ = await get(api, f"{NP_PATH}/plain")
        key = await get(api, f"{SECRETS}/plain-api-key")
        # Created in this order: the NetworkPolicy before the Deployment.
        assert np_ and int(np_["metadata"]["resourceVersion"]) < int(dep["metadata"]["resourceVersion"])
        assert np_["spec"]["ingress"] == [{
            "from": [{"podSelector": {"matchLabels": {"llamafleet.io/client": "true"}}}],
            "ports": [{"port": 16070, "protocol": "TCP"}, {"port": 16071, "protocol": "TCP"}]}]
        assert len(base64.b64decode(key["data"]["api-key"])) >= 32
        assert key["metadata"]["ownerReferences"][0]["uid"] == (await get(api, f"{LLMS}/plain"))[
            "metadata"]["uid"]
        env = dep["spec"]["template"]["spec"]["containers"][0]["env"]
        assert {"name": "LLM_LLAMA_SERVICE_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": "plain-api-key", "key": "api-key"}}} in env
        # The key is made once: resyncs keep it.
        rv = key["metadata"]["resourceVersion"]
        await wait_until(
            lambda: _with(api, "plain", lambda o: _transitioned_before(o, "CapacityPlanned", 1.5)))
        assert (await get(api, f"{SECRETS}/plain-api-key"))["metadata"]["resourceVersion"] == rv

        # A user-named Secret replaces the generated one; a missing one is reported.
        await patch(api, f"{LLMS}/plain", {"spec": {"auth": {"apiKeySecret": "team-key"}}})
        obj = await wait_until(lambda: _with(api, "plain", lambda o: (condition(o, "Ready") or {}).get(
            "reason") == "APIKeyMissing"))
        assert "team-key, which does not exist" in condition(obj, "Ready")["message"]
        await create(api, SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {
            "name": "team-key", "namespace": NS}, "data": {"api-key": base64.b64encode(b"s3cret").decode()}})
        key_ref = {"name": "LLM_LLAMA_SERVICE_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": "team-key", "key": "api-key"}}}
        dep = await wait_until(lambda: _dep_if(api, f"{DEP_PATH}/plain", lambda d: key_ref in d[
            "spec"]["template"]["spec"]["containers"][0]["env"]))
        await wait_until(lambda: _gone(api, f"{SECRETS}/plain-api-key"))
        assert await get(api, f"{SECRETS}/team-key")  # the user's Secret is only read
    assert runner.exception is None


async def _gone(api: httpx.AsyncClient, path: str) -> bool:
    return await get(api, path) is None


async def test_a_failing_network_policy_blocks_the_rollout(api, kmock) -> None:
    kmock.refuse = {"networkpolicies"}
    async with kopf_runner() as runner:
        await create(api, LLMS, llmservice("guarded", resources={"gpus": 0, "cpu": "1", "memory": "2Gi"},
                                           model={"source": {"embedded": True}}))
        obj = await wait_until(lambda: _with(api, "guarded", lambda o: (condition(o, "Ready") or {}).get(
            "reason") == "NetworkPolicyFailed"))
        assert "403" in condition(obj, "Ready")["message"]
        assert await get(api, f"{DEP_PATH}/guarded") is None
        kmock.refuse = set()  # the cause is fixed: the rollout goes on
        await wait_until(lambda: get(api, f"{DEP_PATH}/guarded"))
        assert await get(api, f"{NP_PATH}/guarded")
    assert runner.exception is None


async def test_drift_is_repaired_and_removed_fields_disappear(api) -> None:
    await create(api, "/api/v1/nodes", node("small", 6144, "NVIDIA RTX A2000"))
    await create(api, "/api/v1/nodes", node("big", 81559, "NVIDIA H100 80GB HBM3"))
    url = {"url": {"url": "https://models.example/m.gguf", "sha256": "a" * 64}}
    async with kopf_runner() as runner:
        await create(api, LLMS, llmservice("drift", model={
            "source": url, "contextSize": 4096,
            "shape": {"sizeBytes": 4_370_000_000, "layers": 32, "kvHeads": 8, "keyLength": 128,
                      "valueLength": 128}}))
        dep = await wait_until(lambda: get(api, f"{DEP_PATH}/drift"))
        pod = dep["spec"]["template"]["spec"]
        assert pod["initContainers"][0]["name"] == "fetch-model" and "affinity" in pod
        # url -> pvc, and 1 GPU -> 0: the init container and the GPU affinity go away.
        await patch(api, f"{LLMS}/drift", {"spec": {
            "model": {"source": {"url": None, "pvc": {"claimName": "models", "path": "m.gguf"}}},
            "resources": {"gpus": 0}}})
        dep = await wait_until(lambda: _dep_if(api, f"{DEP_PATH}/drift",
                                          lambda d: env_of(d)["GPU_LAYERS"] == "0"))
        pod = dep["spec"]["template"]["spec"]
        assert "initContainers" not in pod and "affinity" not in pod
        assert pod["volumes"][-1] == {"name": "model", "persistentVolumeClaim": {
            "claimName": "models", "readOnly": True}}
        assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
        assert not [t for t in pod.get("tolerations", []) if t.get("key") == "nvidia.com/gpu"]

        # Hand edits are reverted on the next resync: a loosened NetworkPolicy...
        np_ = await get(api, f"{NP_PATH}/drift")
        want = np_["spec"]["ingress"]
        await patch(api, f"{NP_PATH}/drift", {"spec": {"ingress": [{}]}})  # admit everyone
        await wait_until(lambda: _dep_if(api, f"{NP_PATH}/drift", lambda n: n["spec"]["ingress"] == want))
        # ...a field removed from the Deployment, and a foreign field added to one we own.
        await patch(api, f"{DEP_PATH}/drift", {"spec": {"template": {"spec": {
            "automountServiceAccountToken": None, "hostNetwork": True}}}})
        dep = await wait_until(lambda: _dep_if(api, f"{DEP_PATH}/drift", lambda d: d["spec"]["template"][
            "spec"].get("automountServiceAccountToken") is False))
        # A replace makes the live object the desired one: the added field is gone too.
        assert "hostNetwork" not in dep["spec"]["template"]["spec"]
    assert runner.exception is None


def _material(secret: dict) -> dict[str, bytes]:
    return {k: base64.b64decode(secret["data"][k]) for k in ("ca.crt", "tls.crt", "tls.key")}


def _kubelet_writes(d: Path, material: dict[str, bytes]) -> None:
    for name, data in material.items():
        (d / name).write_bytes(data)


def _generate(ch, stub_mod, pb) -> str:
    replies = list(stub_mod.LLMLocalServiceStub(ch).GenerateStream(
        pb.LLMLocalServiceGenerateStreamRequest(user_prompt="Hi", params=pb.GenerationParams(
            max_new_tokens=1)), timeout=60))
    return replies[-1].WhichOneof("type")


def _call(target: str, client: dict[str, bytes]) -> str:
    """One call on a new connection (a new TLS handshake) with a client's mounted files."""
    import grpc
    from llamafleet.inference.proto import local_pb2 as pb
    from llamafleet.inference.proto import local_pb2_grpc as pb_grpc

    creds = grpc.ssl_channel_credentials(root_certificates=client["ca.crt"],
                                         private_key=client["tls.key"],
                                         certificate_chain=client["tls.crt"])
    with grpc.secure_channel(target, creds, options=[
            ("grpc.ssl_target_name_override", "localhost")]) as ch:
        return _generate(ch, pb_grpc, pb)


async def test_ca_rotation_keeps_grpc_clients_connected(api, tmp_path, model_path) -> None:
    """A real `llamafleet serve` gRPC server and clients fed from the operator's Secrets, as
    a kubelet would mount them, but at different times: at every change, the server with
    the newest files must accept the client with the previous files and vice versa, and a
    channel opened before the rotation keeps working throughout."""
    import grpc
    from llamafleet.inference.proto import local_pb2 as pb
    from llamafleet.inference.proto import local_pb2_grpc as pb_grpc

    from tests.support.servers import start_server

    await create(api, "/api/v1/nodes", node("big", 81559, "NVIDIA H100 80GB HBM3"))
    srv_dir = tmp_path / "server"
    srv_dir.mkdir()
    async with kopf_runner() as runner:
        # The CA (twice the validity: 30 s) is due 20 s in; each overlap window is 4 s.
        await create(api, LLMS, llmservice("rot", tls={"validity": "15s", "renewBefore": "10s",
                                                       "caOverlap": "4s"}))
        srv_path, cli_path = f"{SECRETS}/rot-server-tls", f"{SECRETS}/rot-client-tls"
        server_now = _material(await wait_until(lambda: get(api, srv_path)))
        client_now = _material(await wait_until(lambda: get(api, cli_path)))
        ca0 = await get(api, f"{SECRETS}/rot-ca")
        _kubelet_writes(srv_dir, server_now)
        server = await asyncio.to_thread(
            start_server, model_path=model_path, grpc_ca_path=srv_dir / "ca.crt",
            grpc_cert_path=srv_dir / "tls.crt", grpc_key_path=srv_dir / "tls.key")
        try:
            target = server.grpc_target
            creds = grpc.ssl_channel_credentials(
                root_certificates=client_now["ca.crt"], private_key=client_now["tls.key"],
                certificate_chain=client_now["tls.crt"])
            early = grpc.secure_channel(target, creds, options=[
                ("grpc.ssl_target_name_override", "localhost")])
            assert await asyncio.to_thread(_generate, early, pb_grpc, pb) == "finish_details"
            phases, checks, end = [], 0, time.monotonic() + 120
            while True:
                ca = await get(api, f"{SECRETS}/rot-ca")
                phase = ((ca["metadata"].get("annotations") or {}).get("llamafleet.io/ca-rotation"))
                if phase and phase not in phases:
                    phases.append(phase)
                if phases == ["overlap", "reissued"] and not phase:
                    break  # the old CA is dropped: rotation complete
                assert time.monotonic() < end, f"rotation did not complete; phases {phases}"
                server_new = _material(await get(api, srv_path))
                client_new = _material(await get(api, cli_path))
                if (server_new, client_new) == (server_now, client_now):
                    await asyncio.sleep(0.1)  # polling interval, not synchronisation
                    continue
                # The server's mount is fresh and the client's is not, and the reverse.
                for srv_files, cli_files in ((server_new, client_now), (server_now, client_new),
                                             (server_new, client_new)):
                    _kubelet_writes(srv_dir, srv_files)
                    assert await asyncio.to_thread(_call, target, cli_files) == "finish_details"
                    checks += 1
                server_now, client_now = server_new, client_new
                assert await asyncio.to_thread(_generate, early, pb_grpc, pb) == "finish_details"
            assert checks >= 6  # at least the two CA steps, each seen from both sides
            ca1 = await get(api, f"{SECRETS}/rot-ca")
            assert ca1["data"]["signer.crt"] != ca0["data"]["signer.crt"]
            assert base64.b64decode(ca1["data"]["ca.crt"]).count(b"BEGIN CERTIFICATE") == 1
            # The channel opened before the rotation is still connected and served.
            assert await asyncio.to_thread(_generate, early, pb_grpc, pb) == "finish_details"
            early.close()
            # A client that kept its pre-rotation files cannot open a new connection now.
            stale = _material(await get(api, cli_path)) | {"ca.crt": base64.b64decode(ca0["data"]["ca.crt"])}
            _kubelet_writes(srv_dir, _material(await get(api, srv_path)))
            with pytest.raises(grpc.RpcError):
                await asyncio.to_thread(_call, target, stale)
        finally:
            await asyncio.to_thread(server.stop)
    assert runner.exception is None


POOLS = f"/apis/inference.networking.k8s.io/v1/namespaces/{NS}/inferencepools"


async def test_an_inference_pool_follows_spec_routing(api) -> None:
    from tests.operator.test_inference_pool import INFERENCE_POOL_V1, jsonschema

    async with kopf_runner() as runner:
        await create(api, LLMS, llmservice("gie", routing={"inferencePool": {
            "enabled": True, "endpointPicker": {"name": "gie-epp", "port": 9002}}}))
        pool = await wait_until(lambda: get(api, f"{POOLS}/gie"))
        jsonschema.validate(pool, INFERENCE_POOL_V1)  # as the upstream CRD would
        assert pool["spec"]["extensionRef"]["name"] == "gie-epp"
        assert pool["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "gie"
        assert pool["metadata"]["ownerReferences"][0]["name"] == "gie"
        # A changed picker port is repaired in place; disabling removes the pool.
        await patch(api, f"{LLMS}/gie", {"spec": {"routing": {"inferencePool": {
            "endpointPicker": {"port": 9100}}}}})
        await wait_until(lambda: _dep_if(api, f"{POOLS}/gie", lambda p: p["spec"][
            "extensionRef"]["portNumber"] == 9100))
        await patch(api, f"{LLMS}/gie", {"spec": {"routing": {"inferencePool": {"enabled": False}}}})
        await wait_until(lambda: _gone(api, f"{POOLS}/gie"))
        # Enabled without a picker: a precise condition, and nothing created.
        await create(api, LLMS, llmservice("nopicker", routing={"inferencePool": {"enabled": True}}))
        obj = await wait_until(lambda: _with(api, "nopicker", lambda o: condition(o, "Ready")))
        assert condition(obj, "Ready")["reason"] == "InvalidSpec"
        assert "endpointPicker.name" in condition(obj, "Ready")["message"]
        assert await get(api, f"{POOLS}/nopicker") is None
    assert runner.exception is None


async def test_an_inference_pool_without_its_crd_is_a_condition(api, kmock) -> None:
    del kmock.resources["inference.networking.k8s.io/v1/inferencepools"]
    async with kopf_runner() as runner:
        await create(api, LLMS, llmservice("nocrd", routing={"inferencePool": {
            "enabled": True, "endpointPicker": {"name": "epp"}}}))
        obj = await wait_until(lambda: _with(api, "nocrd", lambda o: (
            condition(o, "Ready") or {}).get("reason") == "MissingAPI"))
        assert "Gateway API Inference Extension" in condition(obj, "Ready")["message"]
        # Without the pool, a neighbour reconciles as before.
        await create(api, LLMS, llmservice("plain"))
        await wait_until(lambda: get(api, f"{DEP_PATH}/plain"))
        # Turning the pool off lets it proceed (and leaves no failing resync behind when kopf
        # stops: such a timer sometimes escapes kopf's daemon killer, and kopf never exits).
        await patch(api, f"{LLMS}/nocrd", {"spec": {"routing": {"inferencePool": {"enabled": False}}}})
        await wait_until(lambda: get(api, f"{DEP_PATH}/nocrd"))
    assert runner.exception is None
