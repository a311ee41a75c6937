"""The Kubernetes API emulator the integration tests run against, and helpers for it.

KMock stores objects as sent; the emulator subclass below fills the gaps the operator
relies on (as docs/testing.md describes):
- server-set metadata (uid, resourceVersion, creationTimestamp, generation bumped on
  spec changes), because kopf.adopt() and observedGeneration rely on them;
- PUT (replace). KMock 0.8 maps only PATCH to an update (a recursive dict merge) and
  speaks neither PUT nor server-side apply. The operator repairs drift with
  read-compare-replace (a PUT guarded by resourceVersion, which removes the fields the
  desired object no longer has), so the emulator implements PUT as a real API server
  does: the stored object becomes the body, server-set metadata and status are kept,
  and a stale resourceVersion gets 409 Conflict. We chose PUT over server-side apply
  because its semantics are small enough to emulate exactly; emulating SSA's field
  ownership would mostly test the emulator;
- `refuse`: plurals whose writes the emulator answers with 403, to test failures.
There is no garbage collector and no Deployment controller, so tests assert
ownerReferences and set a Deployment's status themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import uuid
from pathlib import Path
from typing import Any

import aiohttp.web
import httpx
import kmock

NS = "team-a"
LLMS = "/apis/llamafleet.io/v1alpha1/namespaces/team-a/llmservices"


class Emulator(kmock.KubernetesEmulator):
    """KMock plus the server-set metadata that a real API server adds."""

    refuse: set[str] = set()

    def _status(self, code: int, reason: str, message: str):
        return aiohttp.web.json_response({"apiVersion": "v1", "kind": "Status", "code": code,
                                          "status": "Failure", "reason": reason,
                                          "message": message, "metadata": {}}, status=code)

    async def _replace(self, request):
        key = (request.resource, request.namespace, request.name)
        async with self._lock:
            if key not in self._objects or self._objects[key].deleted:
                return self._status(404, "NotFound", f"{request.name} not found")
            current = self._objects[key].raw
            body = copy.deepcopy(request.data)
            meta, old = body.setdefault("metadata", {}), current.get("metadata", {})
            if meta.get("resourceVersion") != old.get("resourceVersion"):
                return self._status(409, "Conflict", "the object has been modified")
            self._rv = getattr(self, "_rv", 0) + 1
            for field in ("uid", "creationTimestamp"):
                meta[field] = old.get(field)
            spec_changed = body.get("spec") != current.get("spec")
            meta["generation"] = int(old.get("generation", 1)) + (1 if spec_changed else 0)
            meta["resourceVersion"] = str(self._rv)
            body.pop("status", None)
            if "status" in current:
                body["status"] = current["status"]
            self._objects[key].create(body)
            raw = self._objects[key].raw
            await self._buses[request.resource].put({"type": "MODIFIED", "object": raw})
        return aiohttp.web.json_response(raw)

    async def _handle(self, request):
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        data = request.data if isinstance(request.data, dict) else None
        writing = request.action == kmock.action.CREATE or request.method == kmock.method.PUT
        if request.resource is not None and writing and request.resource.plural in self.refuse:
            return self._status(403, "Forbidden", f"{request.resource.plural}: refused by the test")
        if request.method == kmock.method.PUT and request.resource is not None and data:
            return await self._replace(request)
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
    "v1/serviceaccounts": dict(kind="ServiceAccount", namespaced=True),
    "rbac.authorization.k8s.io/v1/roles": dict(kind="Role", namespaced=True),
    "rbac.authorization.k8s.io/v1/rolebindings": dict(kind="RoleBinding", namespaced=True),
    "v1/events": dict(kind="Event", namespaced=True),
    "apps/v1/deployments": dict(kind="Deployment", namespaced=True, subresources={"status"}),
    "networking.k8s.io/v1/networkpolicies": dict(kind="NetworkPolicy", namespaced=True),
    "policy/v1/poddisruptionbudgets": dict(kind="PodDisruptionBudget", namespaced=True),
    "inference.networking.k8s.io/v1/inferencepools": dict(kind="InferencePool", namespaced=True),
}
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}


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
async def kopf_runner():
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
