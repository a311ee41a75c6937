"""The real kopf runtime against KMock's Kubernetes API emulator.

KMock stores objects as sent; two gaps are filled in the emulator subclass below (noted
as the TESTING-NOTES describe): server-set metadata (uid, resourceVersion,
creationTimestamp, generation bumped on spec changes), because kopf.adopt() and
observedGeneration rely on them. There is no garbage collector and no Deployment
controller, so tests assert ownerReferences and set a Deployment's status themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import base64
import datetime as dt
import os
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import kmock
import pytest
import yaml
from cryptography import x509

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

# The resync timer's interval is fixed when the handlers module is imported.
os.environ.setdefault("LLAMAFLEET_OPERATOR_RESYNC_SECONDS", "0.5")

NS = "team-a"
LLMS = "/apis/llamafleet.io/v1alpha1/namespaces/team-a/llmservices"


class Emulator(kmock.KubernetesEmulator):
    """KMock plus the server-set metadata that a real API server adds."""

    async def _handle(self, request):  # noqa: ANN001, ANN202
        now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        data = request.data if isinstance(request.data, dict) else None
        if request.resource is not None and data is not None:
            meta = data.setdefault("metadata", {})
            self._rv = getattr(self, "_rv", 0) + 1
            if request.action == kmock.action.CREATE:
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", now)
                meta["generation"] = 1
                meta["resourceVersion"] = str(self._rv)
            elif request.action == kmock.action.UPDATE and request.name is not None:
                key = (request.resource, request.namespace, request.name)
                if key in self.objects and "spec" in data and request.subresource is None:
                    current = self.objects[key].raw
                    meta["generation"] = int(current.get("metadata", {}).get("generation", 1)) + 1
                meta["resourceVersion"] = str(self._rv)
        return await super()._handle(request)


RESOURCES = {
    "llamafleet.io/v1alpha1/llmservices": dict(kind="LLMService", namespaced=True,
                                               subresources={"status", "scale"}),
    "v1/nodes": dict(kind="Node", namespaced=False),
    # kopf waits for namespaces in discovery even cluster-wide (it never lists them then).
    "v1/namespaces": dict(kind="Namespace", namespaced=False),
    "v1/secrets": dict(kind="Secret", namespaced=True),
    "v1/services": dict(kind="Service", namespaced=True),
    "v1/events": dict(kind="Event", namespaced=True),
    "apps/v1/deployments": dict(kind="Deployment", namespaced=True, subresources={"status"}),
    "networking.k8s.io/v1/networkpolicies": dict(kind="NetworkPolicy", namespaced=True),
    "policy/v1/poddisruptionbudgets": dict(kind="PodDisruptionBudget", namespaced=True),
}
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}


@pytest.fixture()
def kmock_options() -> dict:
    return {"cls": Emulator}


@pytest.fixture()
async def api(kmock, tmp_path, monkeypatch):  # noqa: ANN001, ANN201
    for name, info in RESOURCES.items():
        kmock.resources[name] = {**info, "verbs": VERBS}
    url = str(kmock.url).rstrip("/")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": url, "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "test"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u"}}]}))
    monkeypatch.setenv("KMOCK_URL", url)
    from llamafleet.operator import handlers
    from llamafleet.operator.settings import OperatorSettings

    monkeypatch.setattr(handlers, "SETTINGS", OperatorSettings(kubeconfig=str(kubeconfig)))
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield client


async def create(api: httpx.AsyncClient, path: str, body: dict) -> dict:
    r = await api.post(path, json=body)
    assert r.status_code < 300, r.text
    return r.json()


async def patch(api: httpx.AsyncClient, path: str, body: dict) -> dict:
    r = await api.patch(path, json=body, headers={"content-type": "application/merge-patch+json"})
    assert r.status_code < 300, r.text
    return r.json()


async def get(api: httpx.AsyncClient, path: str) -> dict | None:
    r = await api.get(path)
    return r.json() if r.status_code == 200 else None


async def until(fn, timeout: float = 30) -> Any:  # noqa: ANN001
    """Await a condition that the operator (another thread) makes true; no fixed sleeps."""
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = await fn()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met in {timeout}s; last value: {last!r}")


def node(name: str, memory_mib: int, product: str) -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {
        "nvidia.com/gpu.memory": str(memory_mib), "nvidia.com/gpu.count": "1",
        "nvidia.com/gpu.product": product, "kubernetes.io/hostname": name}}}


def llmservice(name: str, **spec: Any) -> dict:
    body = {"model": {"source": {"pvc": {"claimName": "models", "path": "mistral-7b.gguf"}},
                      "contextSize": 4096,
                      "shape": {"sizeBytes": 4_370_000_000, "layers": 32, "kvHeads": 8,
                                "keyLength": 128, "valueLength": 128}},
            "resources": {"gpus": 1, "cpu": "4", "memory": "16Gi"},
            "batching": {"maxBatchSize": 16}, "tls": {"validity": "8760h", "renewBefore": "720h"}}
    body.update(spec)
    return {"apiVersion": "llamafleet.io/v1alpha1", "kind": "LLMService",
            "metadata": {"name": name, "namespace": NS}, "spec": body}


def env_of(dep: dict) -> dict[str, str]:
    c = dep["spec"]["template"]["spec"]["containers"][0]
    return {e["name"].removeprefix("LLM_LLAMA_SERVICE_"): e.get("value") for e in c["env"]}


def condition(obj: dict | None, type_: str) -> dict | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c
    return None


@contextlib.asynccontextmanager
async def kopf_runner():  # noqa: ANN201
    """KopfRunner in its thread; entered and left off the event loop, because KMock serves
    the operator's API calls from this loop and must keep running while kopf stops."""
    from kopf.testing import KopfRunner

    app = Path(__file__).with_name("kopf_app.py")
    runner = KopfRunner(["run", "--standalone", "-A", str(app)], timeout=60)
    await asyncio.to_thread(runner.__enter__)
    try:
        yield runner
    finally:
        await asyncio.to_thread(runner.__exit__, None, None, None)


async def test_llmservice_becomes_pods_with_planned_batching_certs_and_status(api) -> None:  # noqa: ANN001
    await create(api, "/api/v1/nodes", node("small", 6144, "NVIDIA RTX A2000"))
    await create(api, "/api/v1/nodes", node("big", 81559, "NVIDIA H100 80GB HBM3"))
    async with kopf_runner() as runner:
        await create(api, LLMS, llmservice("chat"))
        dep_path = f"/apis/apps/v1/namespaces/{NS}/deployments/chat"
        dep = await until(lambda: get(api, dep_path))
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
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["securityContext"]["runAsNonRoot"] is True
        expr = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"][0]["matchExpressions"][0]
        assert expr == {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["81558"]}
        owner = dep["metadata"]["ownerReferences"][0]
        assert owner["kind"] == "LLMService" and owner["name"] == "chat" and owner["uid"]

        svc = await until(lambda: get(api, f"/api/v1/namespaces/{NS}/services/chat"))
        assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {
            "http": 16070, "grpc": 16071, "metrics": 16072}
        secrets = {}
        for s in ("chat-ca", "chat-server-tls", "chat-client-tls"):
            secrets[s] = await until(lambda s=s: get(api, f"/api/v1/namespaces/{NS}/secrets/{s}"))
        server_cert = x509.load_pem_x509_certificate(
            base64.b64decode(secrets["chat-server-tls"]["data"]["tls.crt"]))
        sans = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "chat.team-a.svc" in sans.get_values_for_type(x509.DNSName)

        obj = await until(lambda: _with(api, "chat", lambda o: condition(o, "CapacityPlanned")))
        assert condition(obj, "CapacityPlanned")["status"] == "True"
        assert obj["status"]["capacity"]["maxBatchSize"] == 16
        assert obj["status"]["capacity"]["gpuMemoryMiB"] == 81559
        assert condition(obj, "CertificatesReady")["status"] == "True"
        assert obj["status"]["endpoints"]["grpc"] == "chat.team-a.svc.cluster.local:16071"
        assert condition(obj, "Ready")["status"] == "False"  # no replica is ready yet

        # The Deployment controller is absent: report one ready replica ourselves.
        await patch(api, dep_path + "/status", {"status": {"replicas": 1, "readyReplicas": 1}})
        obj = await until(lambda: _with(api, "chat", lambda o: (condition(o, "Ready") or {}).get(
            "status") == "True"))
        assert obj["status"]["phase"] == "Ready" and obj["status"]["readyReplicas"] == 1
        assert obj["status"]["observedGeneration"] == 1

        # A spec update rolls the Deployment.
        hash_before = dep["metadata"]["annotations"]["llamafleet.io/spec-hash"]
        await patch(api, f"{LLMS}/chat", {"spec": {"model": {"contextSize": 2048}}})
        dep = await until(lambda: _dep_if(api, dep_path, lambda d: env_of(d)["CONTEXT_SIZE"] == "2048"))
        assert dep["metadata"]["annotations"]["llamafleet.io/spec-hash"] != hash_before
        obj = await until(lambda: _with(api, "chat", lambda o: o["status"].get("observedGeneration") == 2))

        # A relabelled node re-plans: the big node shrinks to 8 GB.
        await patch(api, "/api/v1/nodes/big", {"metadata": {"labels": {"nvidia.com/gpu.memory": "8192"}}})
        dep = await until(lambda: _dep_if(api, dep_path, lambda d: env_of(d)["MAX_BATCH_SIZE"] != "16"),
                          timeout=30)
        assert int(env_of(dep)["MAX_BATCH_SIZE"]) < 16
        obj = await until(lambda: _with(api, "chat", lambda o: o["status"]["capacity"]["gpuMemoryMiB"] == 8192))

    assert runner.exit_code == 0, runner.output
    assert runner.exception is None


async def test_small_gpu_node_plans_one_sequence(api) -> None:  # noqa: ANN001
    await create(api, "/api/v1/nodes", node("small", 6144, "NVIDIA RTX A2000"))
    async with kopf_runner() as runner:
        await create(api, LLMS, llmservice("tiny"))
        dep = await until(lambda: get(api, f"/apis/apps/v1/namespaces/{NS}/deployments/tiny"))
        assert env_of(dep)["MAX_BATCH_SIZE"] == "1"
    assert runner.exception is None


async def test_invalid_spec_gets_a_condition_and_the_operator_keeps_running(api) -> None:  # noqa: ANN001
    await create(api, "/api/v1/nodes", node("big", 81559, "NVIDIA H100 80GB HBM3"))
    async with kopf_runner() as runner:
        bad = llmservice("broken")
        bad["spec"]["model"]["source"] = {"pvc": {"claimName": "m", "path": "x.gguf"},
                                          "embedded": True}
        bad["spec"]["batching"] = {"maxBatchSize": 0}
        await create(api, LLMS, bad)
        obj = await until(lambda: _with(api, "broken", lambda o: condition(o, "Ready")))
        ready = condition(obj, "Ready")
        assert ready["reason"] == "InvalidSpec"
        assert "exactly one of model.source" in ready["message"]
        assert "spec.batching.maxBatchSize" in ready["message"]
        assert obj["status"]["phase"] == "Failed"
        assert await get(api, f"/apis/apps/v1/namespaces/{NS}/deployments/broken") is None
        # ...and a valid one next to it still reconciles.
        await create(api, LLMS, llmservice("fine"))
        await until(lambda: get(api, f"/apis/apps/v1/namespaces/{NS}/deployments/fine"))
    assert runner.exception is None


async def test_short_lived_certificates_are_renewed(api) -> None:  # noqa: ANN001
    await create(api, "/api/v1/nodes", node("big", 81559, "NVIDIA H100 80GB HBM3"))
    async with kopf_runner() as runner:
        # validity 3s, renew 2s before: due one second after issue.
        await create(api, LLMS, llmservice("rot", tls={"validity": "3s", "renewBefore": "2s"}))
        path = f"/api/v1/namespaces/{NS}/secrets/rot-server-tls"
        first = await until(lambda: get(api, path))
        first_crt = first["data"]["tls.crt"]
        renewed = await until(lambda: _secret_changed(api, path, first_crt), timeout=20)
        cert = x509.load_pem_x509_certificate(base64.b64decode(renewed["data"]["tls.crt"]))
        assert cert.not_valid_after_utc > x509.load_pem_x509_certificate(
            base64.b64decode(first_crt)).not_valid_after_utc
    assert runner.exception is None


async def test_cpu_service_with_optional_children(api) -> None:  # noqa: ANN001
    async with kopf_runner() as runner:
        await create(api, LLMS, llmservice(
            "cpu", model={"source": {"embedded": True}, "contextSize": 2048},
            resources={"gpus": 0, "cpu": "2", "memory": "4Gi"},
            networkPolicy={"enabled": True, "allowedClients": [{"podSelector": {"app": "gateway"}}]},
            podDisruptionBudget={"enabled": True, "minAvailable": 1}))
        dep = await until(lambda: get(api, f"/apis/apps/v1/namespaces/{NS}/deployments/cpu"))
        c = dep["spec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in c["resources"]["limits"]
        assert env_of(dep)["GPU_LAYERS"] == "0"
        assert env_of(dep)["EMBEDDED_MODEL"] == "smollm2-135m-instruct"
        assert "MODEL_PATH" not in env_of(dep)
        np_ = await until(lambda: get(api, f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/cpu"))
        assert np_["spec"]["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {"app": "gateway"}}}]
        await until(lambda: get(api, f"/apis/policy/v1/namespaces/{NS}/poddisruptionbudgets/cpu"))
        # The other embedded model, by name: the pod gets the name, the status shows it.
        await create(api, LLMS, llmservice(
            "base", model={"source": {"embedded": {"name": "gemma-3-270m"}}},
            resources={"gpus": 0, "cpu": "2", "memory": "4Gi"}))
        dep = await until(lambda: get(api, f"/apis/apps/v1/namespaces/{NS}/deployments/base"))
        assert env_of(dep)["EMBEDDED_MODEL"] == "gemma-3-270m"
        await until(lambda: _with(api, "base", lambda o: o["status"].get("model")
                                  == "embedded:gemma-3-270m"))
    assert runner.exception is None


async def _with(api: httpx.AsyncClient, name: str, pred) -> dict | None:  # noqa: ANN001
    obj = await get(api, f"{LLMS}/{name}")
    return obj if obj and obj.get("status") and pred(obj) else None


async def _dep_if(api: httpx.AsyncClient, path: str, pred) -> dict | None:  # noqa: ANN001
    dep = await get(api, path)
    return dep if dep and pred(dep) else None


async def _secret_changed(api: httpx.AsyncClient, path: str, old: str) -> dict | None:
    s = await get(api, path)
    return s if s and s["data"]["tls.crt"] != old else None

