"""The operator deploys the router (issue #15): the real kopf runtime and our handlers
against KMock's API emulator (tests/support/kube.py).

The emulator has no RBAC (so Kubernetes' check that the operator holds what it grants is
covered by tests/operator/test_router_builders.py against the chart's rules), no garbage
collector and no Deployment controller: tests assert ownerReferences and set a
Deployment's status themselves to make a router pod ready."""

from __future__ import annotations

import base64
import datetime as dt
import os

import httpx
import kubernetes_validate
import pytest
from llamafleet.common.contract import GRPC_PORT, HTTP_PORT, ROUTER_PORT
from llamafleet.operator import builders as B
from llamafleet.operator import certs

from tests.support.kube import LLMS, NS, condition, create, get, kopf_runner, llmservice, patch
from tests.support.servers import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

# The resync timer's interval is fixed when the handlers module is imported.
os.environ.setdefault("LLAMAFLEET_OPERATOR_RESYNC_SECONDS", "0.5")

DEPS = f"/apis/apps/v1/namespaces/{NS}/deployments"
SVCS = f"/api/v1/namespaces/{NS}/services"
NPS = f"/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies"
RBAC = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{NS}"
ROUTER_OBJECTS = (f"{DEPS}/{{}}-router", f"/api/v1/namespaces/{NS}/serviceaccounts/{{}}-router",
                  f"{RBAC}/roles/{{}}-router", f"{RBAC}/rolebindings/{{}}-router")


def cpu_service(name: str, **spec) -> dict:
    return llmservice(name, model={"source": {"embedded": True}},
                      resources={"gpus": 0, "cpu": "1", "memory": "2Gi"}, **spec)


async def _if(api: httpx.AsyncClient, path: str, pred) -> dict | None:
    obj = await get(api, path)
    return obj if obj and pred(obj) else None


async def _with(api: httpx.AsyncClient, name: str, pred) -> dict | None:
    return await _if(api, f"{LLMS}/{name}", lambda o: o.get("status") and pred(o))


async def _all_gone(api: httpx.AsyncClient, paths: list[str]) -> bool:
    return all([await get(api, p) is None for p in paths])


def _seconds_since(stamp: str) -> float:
    when = dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    return (dt.datetime.now(dt.UTC) - when).total_seconds()


def _client_ports(np_: dict) -> set[int]:
    return {p["port"] for p in np_["spec"]["ingress"][0]["ports"]}


def _validate(obj: dict) -> None:
    body = {k: v for k, v in obj.items() if k != "status"}
    kubernetes_validate.validate(body, "1.33.0", strict=True)


async def test_two_replicas_get_a_router_that_takes_http_once_ready(api) -> None:
    async with kopf_runner() as runner:
        await create(api, LLMS, cpu_service("duo", replicas=2))
        uid = (await wait_until(lambda: get(api, f"{LLMS}/duo")))["metadata"]["uid"]
        objs = [await wait_until(lambda p=p: get(api, p.format("duo"))) for p in ROUTER_OBJECTS]
        for obj in objs:
            _validate(obj)
            (owner,) = obj["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
                "LLMService", "duo", uid, True)
            assert obj["metadata"]["labels"]["app.kubernetes.io/component"] == "router"
        router, _, role, binding = objs
        pod = router["spec"]["template"]["spec"]
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["LLM_LLAMA_SERVICE_ROUTER_LLMSERVICE"]["value"] == "duo"
        assert env["LLM_LLAMA_SERVICE_ROUTER_NAMESPACE"]["valueFrom"]["fieldRef"] == {
            "fieldPath": "metadata.namespace"}
        assert env["LLM_LLAMA_SERVICE_ROUTER_BACKEND_API_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "duo-api-key", "key": "api-key"}
        assert pod["serviceAccountName"] == "duo-router"
        assert pod["containers"][0]["image"] == "llamafleet:0.1.0"  # the pods' image
        assert {r["resources"][0] for r in role["rules"]} == {
            "endpointslices", "llmservices/scale"}
        assert binding["subjects"][0]["name"] == "duo-router"

        pods = await wait_until(lambda: get(api, f"{SVCS}/duo-pods"))
        _validate(pods)
        assert pods["spec"]["selector"] == B.pod_selector_labels("duo")
        assert {p["name"] for p in pods["spec"]["ports"]} == {"http", "grpc", "metrics"}
        # No router pod is ready yet: Service duo still reaches the pods, and so may clients.
        svc = await wait_until(lambda: get(api, f"{SVCS}/duo"))
        assert svc["spec"]["selector"] == B.pod_selector_labels("duo")
        np_ = await get(api, f"{NPS}/duo")
        assert _client_ports(np_) == {HTTP_PORT, GRPC_PORT, ROUTER_PORT}
        assert np_["spec"]["ingress"][1]["from"] == [
            {"podSelector": {"matchLabels": B.router_selector_labels("duo")}}]
        obj = await wait_until(lambda: _with(api, "duo", lambda o: o["status"].get("endpoints")))
        assert obj["status"]["endpoints"]["grpc"] == f"duo-pods.{NS}.svc.cluster.local:{GRPC_PORT}"
        assert "router" not in obj["status"]["endpoints"]

        # A router pod is ready: HTTP moves to it, then (a resync later) the pods' HTTP port
        # closes to clients.
        await patch(api, f"{DEPS}/duo-router/status", {"status": {"replicas": 1, "readyReplicas": 1}})
        svc = await wait_until(lambda: _if(api, f"{SVCS}/duo", lambda s: s["spec"][
            "selector"] == B.router_selector_labels("duo")))
        assert svc["spec"]["ports"] == [{"name": "http", "port": HTTP_PORT, "targetPort": "router",
                                         "protocol": "TCP"}]
        await wait_until(lambda: _if(api, f"{NPS}/duo", lambda n: _client_ports(n) == {
            GRPC_PORT, ROUTER_PORT}))
        obj = await wait_until(lambda: _with(api, "duo", lambda o: o["status"]["endpoints"].get("router")))
        assert obj["status"]["endpoints"]["router"] == f"http://duo.{NS}.svc.cluster.local:{HTTP_PORT}"
        # The router's own ready pod never counts as a serve replica.
        assert condition(obj, "Ready")["status"] == "False"
        # The router stays in front while it is unready for a moment (no flapping).
        await patch(api, f"{DEPS}/duo-router/status", {"status": {"readyReplicas": 0}})
        await patch(api, f"{LLMS}/duo", {"spec": {"routing": {"router": {"replicas": 2}}}})
        await wait_until(lambda: _if(api, f"{DEPS}/duo-router", lambda d: d["spec"]["replicas"] == 2))
        assert (await get(api, f"{SVCS}/duo"))["spec"]["selector"] == B.router_selector_labels("duo")

        # Turned off: the Service goes back to the pods and the router's objects are deleted.
        await patch(api, f"{LLMS}/duo", {"spec": {"routing": {"router": {"enabled": False}}}})
        await wait_until(lambda: _all_gone(api, [p.format("duo") for p in ROUTER_OBJECTS]))
        svc = await get(api, f"{SVCS}/duo")
        assert svc["spec"]["selector"] == B.pod_selector_labels("duo")
        assert {p["name"] for p in svc["spec"]["ports"]} == {"http", "grpc", "metrics"}
        np_ = await wait_until(lambda: _if(api, f"{NPS}/duo", lambda n: len(n["spec"]["ingress"]) == 1))
        assert _client_ports(np_) == {HTTP_PORT, GRPC_PORT}
        obj = await wait_until(lambda: _with(api, "duo", lambda o: "router" not in o["status"]["endpoints"]))
        assert obj["status"]["endpoints"]["grpc"] == f"duo.{NS}.svc.cluster.local:{GRPC_PORT}"
        assert await get(api, f"{SVCS}/duo-pods")  # always there
    assert runner.exception is None


async def test_one_replica_has_no_router_until_asked_or_scaled(api) -> None:
    async with kopf_runner() as runner:
        await create(api, LLMS, cpu_service("solo"))
        # The router's objects would be written before the Services: once both Services
        # exist, there is no router.
        await wait_until(lambda: get(api, f"{SVCS}/solo"))
        assert await get(api, f"{SVCS}/solo-pods")
        assert await _all_gone(api, [p.format("solo") for p in ROUTER_OBJECTS])
        # Two replicas turn it on by default...
        await patch(api, f"{LLMS}/solo", {"spec": {"replicas": 2}})
        await wait_until(lambda: get(api, f"{DEPS}/solo-router"))
        # ...and back to one turns it off again, unless it is enabled explicitly.
        await patch(api, f"{LLMS}/solo", {"spec": {"replicas": 1}})
        await wait_until(lambda: _all_gone(api, [p.format("solo") for p in ROUTER_OBJECTS]))
        await patch(api, f"{LLMS}/solo", {"spec": {"routing": {"router": {"enabled": True}}}})
        await wait_until(lambda: get(api, f"{RBAC}/rolebindings/solo-router"))
    assert runner.exception is None


async def test_a_foreign_router_account_is_a_conflict_and_left_alone(api) -> None:
    foreign = await create(api, f"/api/v1/namespaces/{NS}/serviceaccounts", {
        "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "busy-router", "namespace": NS}})
    async with kopf_runner() as runner:
        await create(api, LLMS, cpu_service("busy", replicas=2))
        obj = await wait_until(lambda: _with(api, "busy", lambda o: (condition(o, "Ready") or {}).get(
            "reason") == "Conflict"))
        assert f"ServiceAccount {NS}/busy-router exists" in condition(obj, "Ready")["message"]
        # A few resyncs (0.5 s each) later, still nothing was written.
        await wait_until(lambda: _with(api, "busy", lambda o: (condition(o, "Ready") or {}).get(
            "lastTransitionTime") and _seconds_since(condition(o, "Ready")["lastTransitionTime"]) > 1.5))
        assert await get(api, f"{DEPS}/busy-router") is None
        assert await get(api, f"{SVCS}/busy") is None
        sa_path = f"/api/v1/namespaces/{NS}/serviceaccounts/busy-router"
        assert await get(api, sa_path) == foreign
        # Once its owner removes it, the LLMService proceeds and the account is ours. (This
        # also ends the failing resyncs before kopf stops: a timer that keeps failing while
        # kopf shuts down sometimes escapes kopf's daemon killer, and kopf never exits.)
        assert (await api.delete(sa_path)).status_code == 200
        sa = await wait_until(lambda: _owned(api, sa_path))
        assert sa["metadata"]["ownerReferences"][0]["name"] == "busy"
        await wait_until(lambda: get(api, f"{DEPS}/busy-router"))
    assert runner.exception is None


async def _owned(api, path: str) -> dict | None:
    obj = await get(api, path)
    return obj if obj and (obj.get("metadata") or {}).get("ownerReferences") else None


async def test_a_server_certificate_without_the_pod_service_names_is_reissued(api) -> None:
    """Certificates issued before the pod Service existed lack its names, which gRPC clients
    of <name>-pods verify: the operator reissues them from the same CA."""
    secrets = f"/api/v1/namespaces/{NS}/secrets"
    async with kopf_runner() as runner:
        await create(api, LLMS, cpu_service("old"))
        server = await wait_until(lambda: get(api, f"{secrets}/old-server-tls"))
        ca = await get(api, f"{secrets}/old-ca")
        signer = certs.KeyPair(base64.b64decode(ca["data"]["ca.key"]),
                               base64.b64decode(ca["data"]["signer.crt"]))
        before = B.Names("old", NS).dns_names("cluster.local")
        legacy = certs.issue(signer, "old-server", dt.timedelta(days=365),
                             sans=[n for n in before if "-pods" not in n])
        server["data"]["tls.crt"] = base64.b64encode(legacy.cert_pem).decode()
        server["data"]["tls.key"] = base64.b64encode(legacy.key_pem).decode()
        r = await api.put(f"{secrets}/old-server-tls", json=server)
        assert r.status_code == 200, r.text

        def names_of(secret: dict) -> set[str]:
            pem = base64.b64decode(secret["data"]["tls.crt"])
            return certs.subject_names(certs.KeyPair(b"", pem))

        renewed = await wait_until(lambda: _if(api, f"{secrets}/old-server-tls",
                                               lambda s: "old-pods.team-a.svc" in names_of(s)))
        assert names_of(renewed) == set(before)
    assert runner.exception is None
