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
- `refuse`: plurals whose writes the emulator answers with 403, to test failures;
- `labelSelector` on lists and watches (`k=v`, `k==v`, `k!=v`, `k`, `!k`, comma-joined).
  KMock ignores it and would hand the router every EndpointSlice of the namespace, and the
  autoscaler every pod; and a `kind` on list responses (the dynamic client needs it);
- the `scale` subresource, as a real API server serves it for a CRD with
  `subresources.scale` (crds/llmservice.yaml): GET returns an `autoscaling/v1` Scale
  built from spec.replicas (0 when absent) and status.replicas/status.selector; PUT and
  PATCH write only spec.replicas to the object (a PUT with a stale resourceVersion gets
  409). KMock would return the whole object, and merge a written Scale into it;
- `expire_watches`: the next N watches get a 410 Gone ERROR event, as when a watch's
  resourceVersion is older than the API server's history; clients must list again;
- a Pod's `log` subresource, as the kubelet serves it through the API server: the text the
  test stored in `logs[(namespace, pod)]` (the last `tailLines` lines when asked), 400 for a
  pod without one (as for a container that has not started).
There is no garbage collector and no Deployment controller, so tests assert
ownerReferences and set a Deployment's status themselves (or, like tests/operator/test_autoscaling_kopf.py,
play the Deployment controller by creating Pod objects).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import aiohttp.web
import httpx
import kmock
import yaml
from llamafleet.common.contract import SERVICE_NAME_LABEL
from prometheus_client.parser import text_string_to_metric_families

from tests.support.servers import free_port

NS = "team-a"
LLMS = "/apis/llamafleet.io/v1alpha1/namespaces/team-a/llmservices"
SLICES = f"/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"


class Emulator(kmock.KubernetesEmulator):
    """KMock plus the server-set metadata that a real API server adds."""

    refuse: set[str] = set()
    expire_watches = 0  # the next N watches end at once with 410 Gone (an expired version)

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

    def _scale_of(self, obj: dict) -> dict:
        meta, status = obj.get("metadata", {}), obj.get("status") or {}
        return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {k: meta.get(k) for k in ("name", "namespace", "uid",
                                                      "resourceVersion", "creationTimestamp")},
                "spec": {"replicas": int((obj.get("spec") or {}).get("replicas") or 0)},
                "status": {"replicas": int(status.get("replicas") or 0),
                           "selector": status.get("selector", "")}}

    async def _scale(self, request):
        key = (request.resource, request.namespace, request.name)
        writing = request.method in (kmock.method.PUT, kmock.method.PATCH)
        if writing and request.resource.plural in self.refuse:
            return self._status(403, "Forbidden", f"{request.resource.plural}/scale: refused by the test")
        async with self._lock:
            if key not in self._objects or self._objects[key].deleted:
                return self._status(404, "NotFound", f"{request.name} not found")
            current = self._objects[key].raw
            body = request.data if isinstance(request.data, dict) else {}
            if writing:
                meta, old = body.get("metadata") or {}, current.get("metadata", {})
                if (request.method == kmock.method.PUT and meta.get("resourceVersion")
                        and meta["resourceVersion"] != old.get("resourceVersion")):
                    return self._status(409, "Conflict", "the object has been modified")
                replicas = (body.get("spec") or {}).get("replicas")
                if replicas is not None and (not isinstance(replicas, int) or replicas < 0):
                    return self._status(422, "Invalid", "spec.replicas must be an integer >= 0")
                if replicas is not None and replicas != (current.get("spec") or {}).get("replicas"):
                    self._rv = getattr(self, "_rv", 0) + 1
                    self._objects[key].patch({"spec": {"replicas": replicas}, "metadata": {
                        "resourceVersion": str(self._rv),
                        "generation": int(old.get("generation", 1)) + 1}})
                    await self._buses[request.resource].put(
                        {"type": "MODIFIED", "object": self._objects[key].raw})
            return aiohttp.web.json_response(self._scale_of(self._objects[key].raw))

    async def _serve_list(self, request):
        result = await super()._serve_list(request)
        # A real API server names the list's kind (the dynamic client needs it).
        res = request.resource
        info = RESOURCES.get(f"{res.group}/{res.version}/{res.plural}".lstrip("/"))
        if info:
            result.update(kind=info["kind"] + "List",
                          apiVersion=f"{res.group}/{res.version}".lstrip("/"))
        selector = (request.params or {}).get("labelSelector")
        if selector:
            result["items"] = [o for o in result["items"] if selects(selector, o)]
        return result

    async def _serve_watch(self, request):
        if self.expire_watches > 0:  # as an API server whose history moved past the version
            self.expire_watches -= 1
            yield b""
            yield {"type": "ERROR", "object": {
                "apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 410,
                "reason": "Expired", "message": "too old resource version", "metadata": {}}}
            return
        selector = (request.params or {}).get("labelSelector", "")
        async for event in super()._serve_watch(request):
            if not isinstance(event, dict) or selects(selector, event.get("object") or {}):
                yield event

    def _log(self, request):
        logs: dict[tuple[str, str], str] = getattr(self, "logs", {})
        text = logs.get((request.namespace, request.name))
        if text is None:
            return self._status(400, "BadRequest", f"container in pod {request.name} is waiting "
                                "to start")
        tail = (request.params or {}).get("tailLines")
        if tail is not None:
            text = "".join(text.splitlines(keepends=True)[-int(tail):])
        return aiohttp.web.Response(text=text, content_type="text/plain")

    async def _handle(self, request):
        if request.resource is not None and request.subresource == "scale":
            return await self._scale(request)
        if request.resource is not None and request.subresource == "log":
            return self._log(request)
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


def selects(selector: str, obj: dict) -> bool:
    """A label selector of equality (k=v, k==v), inequality (k!=v) and existence (k, !k)
    terms, comma-separated (set-based terms are not needed here)."""
    labels = (obj.get("metadata") or {}).get("labels") or {}
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            ok = labels.get(k.strip()) != v.strip()
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            ok = labels.get(k.strip()) == v.strip()
        elif term.startswith("!"):
            ok = term[1:] not in labels
        else:
            ok = term in labels
        if not ok:
            return False
    return True


RESOURCES = {
    "llamafleet.io/v1alpha1/llmservices": dict(kind="LLMService", namespaced=True,
                                               subresources={"status", "scale"}),
    "v1/nodes": dict(kind="Node", namespaced=False),
    # kopf waits for namespaces in discovery even cluster-wide (it never lists them then).
    "v1/namespaces": dict(kind="Namespace", namespaced=False),
    # As in a cluster: kopf lists and watches CRDs to notice resources that come and go (the
    # RBAC audit then sees it use the chart's rule for them).
    "apiextensions.k8s.io/v1/customresourcedefinitions": dict(kind="CustomResourceDefinition",
                                                               namespaced=False),
    "v1/secrets": dict(kind="Secret", namespaced=True),
    "v1/configmaps": dict(kind="ConfigMap", namespaced=True),
    "v1/services": dict(kind="Service", namespaced=True),
    "v1/serviceaccounts": dict(kind="ServiceAccount", namespaced=True),
    "rbac.authorization.k8s.io/v1/roles": dict(kind="Role", namespaced=True),
    "rbac.authorization.k8s.io/v1/rolebindings": dict(kind="RoleBinding", namespaced=True),
    "v1/events": dict(kind="Event", namespaced=True),
    "discovery.k8s.io/v1/endpointslices": dict(kind="EndpointSlice", namespaced=True),
    "v1/pods": dict(kind="Pod", namespaced=True, subresources={"status", "log"}),
    "v1/persistentvolumeclaims": dict(kind="PersistentVolumeClaim", namespaced=True,
                                      subresources={"status"}),
    "batch/v1/jobs": dict(kind="Job", namespaced=True, subresources={"status"}),
    "apps/v1/deployments": dict(kind="Deployment", namespaced=True, subresources={"status"}),
    "networking.k8s.io/v1/networkpolicies": dict(kind="NetworkPolicy", namespaced=True),
    "policy/v1/poddisruptionbudgets": dict(kind="PodDisruptionBudget", namespaced=True),
    "inference.networking.k8s.io/v1/inferencepools": dict(kind="InferencePool", namespaced=True),
    "autoscaling/v2/horizontalpodautoscalers": dict(kind="HorizontalPodAutoscaler", namespaced=True),
    "keda.sh/v1alpha1/scaledobjects": dict(kind="ScaledObject", namespaced=True),
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


class Router:
    """`llamafleet router --llmservice NAME` as a subprocess, with KUBECONFIG pointing at the
    emulator (as in a pod with a kubeconfig). It logs in with its own token, which the RBAC
    audit (rbac_audit.py) takes for the router's ServiceAccount."""

    def __init__(self, name: str, kubeconfig: Path, *flags: str):
        from tests.support.rbac_audit import ROUTER_TOKEN

        config = yaml.safe_load(kubeconfig.read_text())
        for user in config["users"]:
            user["user"]["token"] = ROUTER_TOKEN + name
        kubeconfig = kubeconfig.with_name(f"{kubeconfig.name}.router-{name}")
        kubeconfig.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        env.pop("KUBERNETES_SERVICE_HOST", None)  # not in a pod: use the kubeconfig
        cmd = [sys.executable, "-m", "llamafleet.common.cli", "router", "--llmservice", name,
               "--namespace", NS, "--host", "127.0.0.1", "--port", str(self.port),
               "--poll-interval", "0.2", "--log-format", "console", *flags]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        self.http = httpx.AsyncClient(base_url=self.url, timeout=300)

    async def health(self) -> dict | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"router exited: {self.proc.stdout.read()[-3000:]}")
        try:
            return (await self.http.get("/health", timeout=2)).json()
        except httpx.TransportError:
            return None

    async def metric(self, name: str, **labels: str) -> float:
        text = (await self.http.get("/router/metrics")).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    async def stop(self) -> str:
        await self.http.aclose()
        self.proc.terminate()
        return (await asyncio.to_thread(self.proc.communicate, timeout=30))[0]


def endpoint_slice(name: str, service: str, port: int, *endpoints: tuple[str, bool]) -> dict:
    """What the EndpointSlice controller writes for a Service's pods."""
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": NS, "labels": {SERVICE_NAME_LABEL: service}},
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "conditions": {"ready": ready}}
                          for ip, ready in endpoints]}
