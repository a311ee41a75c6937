"""The builtin autoscaler end to end: the real kopf runtime against KMock's emulator, with
real `llamafleet serve` processes on loopback standing in for the pods.

The emulator (tests/support/kube.py) has no Deployment controller, so the test plays
it: whenever the Deployment's replicas change it creates or deletes Pod objects whose
`status.podIP` is 127.0.0.1, whose Ready condition is True and whose container port named
`http` is one serve process's port (pod i -> process i). It plays the EndpointSlice
controller too (one slice per pod), so that a real `llamafleet router --llmservice` finds
the pods and scales the LLMService from zero for a held request. The emulator was extended
with the LLMService `scale` subresource and label selectors (tests/support/kube.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from llamafleet.common.contract import pod_service_name
from llamafleet.router.replicas import replica_id

from tests.support.kube import (
    LLMS,
    NS,
    SLICES,
    Router,
    condition,
    create,
    endpoint_slice,
    get,
    kopf_runner,
    llmservice,
    node,
    patch,
)
from tests.support.servers import serve_process, serve_ready, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

# Timer intervals are fixed when the handlers module is imported.
INTERVAL = 1.0
os.environ.setdefault("LLAMAFLEET_OPERATOR_AUTOSCALE_INTERVAL", str(INTERVAL))
API_KEY = "autoscaler-test-key"
SERVE_FLAGS = ("--max-batch-size", "4", "--context-size", "1024", "--api-key", API_KEY)
NAME = "chat"
DEPLOYMENT = f"/apis/apps/v1/namespaces/{NS}/deployments/{NAME}"
PODS = f"/api/v1/namespaces/{NS}/pods"


@pytest.fixture(scope="module")
def serves(model_path: Path) -> Iterator[list[int]]:
    """Two serve processes with the small base model (it keeps generating with ignore_eos)."""
    procs = [serve_process("--model-path", str(model_path), *SERVE_FLAGS) for _ in range(2)]
    try:
        for proc, port in procs:
            wait_until(lambda p=proc, n=port: serve_ready(p, n), timeout=300)
        yield [port for _, port in procs]
    finally:
        for proc, _ in procs:
            proc.kill()
            proc.communicate(timeout=30)


async def deployment_controller(api: httpx.AsyncClient, ports: list[int]) -> None:
    """Keep one Ready Pod object per replica of the Deployment, pointing at serve processes."""
    pods: dict[int, str] = {}
    while True:
        dep = await get(api, DEPLOYMENT)
        if dep is not None:
            want = min(int(dep["spec"]["replicas"]), len(ports))
            labels = dep["spec"]["template"]["metadata"]["labels"]
            now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            for i in range(want):
                if i not in pods:
                    pods[i] = f"{NAME}-{i}"
                    # ...and the EndpointSlice controller: one slice per pod, as each
                    # stand-in pod has its own port.
                    await create(api, SLICES, endpoint_slice(
                        pods[i], pod_service_name(NAME), ports[i], ("127.0.0.1", True)))
                    await create(api, PODS, {
                        "apiVersion": "v1", "kind": "Pod",
                        "metadata": {"name": pods[i], "namespace": NS, "labels": labels},
                        "spec": {"containers": [{"name": "server", "ports": [
                            {"name": "http", "containerPort": ports[i]}]}]},
                        "status": {"podIP": "127.0.0.1", "conditions": [
                            {"type": "Ready", "status": "True", "lastTransitionTime": now}]}})
            for i in [i for i in pods if i >= want]:
                for path in (f"{SLICES}/{pods[i]}", f"{PODS}/{pods.pop(i)}"):
                    r = await api.delete(path)
                    assert r.status_code < 300, r.text
            status = {"replicas": want, "readyReplicas": want}
            if (dep.get("status") or {}) != status:
                await patch(api, DEPLOYMENT + "/status", {"status": status})
        await asyncio.sleep(0.05)  # a poll period, not synchronisation


async def llmservice_obj(api: httpx.AsyncClient) -> dict:
    return await get(api, f"{LLMS}/{NAME}") or {}


async def replicas(api: httpx.AsyncClient) -> int | None:
    return ((await llmservice_obj(api)).get("spec") or {}).get("replicas")


async def stream(port: int, started: asyncio.Event) -> None:
    """One long streaming completion; cancelled by the test (the client leaves)."""
    body = {"prompt": "Once upon a time", "max_tokens": 900, "ignore_eos": True, "stream": True}
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream("POST", f"http://127.0.0.1:{port}/v1/completions", json=body,
                                 headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    started.set()


async def test_load_scales_up_then_down_then_to_zero_and_a_request_brings_one_back(
        api, serves: list[int], tmp_path: Path) -> None:
    await create(api, "/api/v1/nodes", node("big", 81559, "NVIDIA H100 80GB HBM3"))
    await create(api, f"/api/v1/namespaces/{NS}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keys", "namespace": NS},
        "data": {"api-key": base64.b64encode(API_KEY.encode()).decode()}})
    scaling = {"minReplicas": 1, "maxReplicas": 2, "targetInFlightPerReplica": 1,
               "averageWindow": "1s", "scaleDownDelay": "2s", "idleBeforeZero": "3s"}
    controller = asyncio.create_task(deployment_controller(api, serves))
    try:
        async with kopf_runner() as runner:
            # No replicas in the spec: the fleet starts at max(minReplicas, 1), written to
            # spec.replicas.
            await create(api, LLMS, llmservice(NAME, scaling=scaling,
                                               auth={"apiKeySecret": "keys"}))
            await wait_until(lambda: get(api, f"{PODS}/{NAME}-0"), timeout=30)
            obj = await wait_until(lambda: _autoscaling(api, lambda a: a.get("podsRead") == 1))
            assert obj["status"]["autoscaling"]["desiredReplicas"] == 1
            # Written through the scale subresource (absent, it would read as 0).
            assert (await llmservice_obj(api))["spec"].get("replicas") == 1

            # Three concurrent streams on pod 0, target 1 per replica: up to max (2).
            started = [asyncio.Event() for _ in range(3)]
            streams = [asyncio.create_task(stream(serves[0], e)) for e in started]
            for e in started:
                await asyncio.wait_for(e.wait(), 120)
            t0 = time.monotonic()
            await wait_until(lambda: _is(replicas(api), 2), timeout=30)
            rose = time.monotonic() - t0
            assert rose <= 2 * INTERVAL + 0.5, f"replicas rose after {rose:.2f}s"
            auto = (await llmservice_obj(api))["status"]["autoscaling"]
            assert auto["observedLoad"] >= 2 and auto["desiredReplicas"] == 2, auto
            scaled_up_at = auto["lastScaleTime"]
            # ...and the normal reconcile carries it to the Deployment, the pods follow.
            await wait_until(lambda: get(api, f"{PODS}/{NAME}-1"), timeout=30)

            # The load stops (the clients leave): after scaleDownDelay, back to 1.
            for task in streams:
                task.cancel()
            t1 = time.monotonic()
            await wait_until(lambda: _is(replicas(api), 1), timeout=60)
            assert time.monotonic() - t1 >= 2.0  # not before scaleDownDelay
            auto = (await llmservice_obj(api))["status"]["autoscaling"]
            assert auto["desiredReplicas"] == 1 and auto["lastScaleTime"] > scaled_up_at, auto
            await wait_until(lambda: _absent(get(api, f"{PODS}/{NAME}-1")), timeout=30)

            # minReplicas 0: after idleBeforeZero without requests, zero.
            await patch(api, f"{LLMS}/{NAME}", {"spec": {"scaling": {"minReplicas": 0}}})
            await wait_until(lambda: _is(replicas(api), 0), timeout=60)
            obj = await llmservice_obj(api)
            assert "zero" in obj["status"]["autoscaling"]["reason"], obj["status"]["autoscaling"]
            await wait_until(lambda: _absent(get(api, f"{PODS}/{NAME}-0")), timeout=30)
            obj = await wait_until(lambda: _with(api, lambda o: (condition(
                o, "Ready") or {}).get("reason") == "ScaledToZero"), timeout=30)
            assert obj["status"]["phase"] == "Pending"

            # A request through the router is held; the router scales 0 -> 1 through the
            # scale subresource, pod 0 comes back, and the request completes.
            router = Router(NAME, tmp_path / "kubeconfig", "--backend-api-key", API_KEY)
            try:
                assert (await wait_until(router.health, timeout=60))["backends"] == []
                answer = await router.http.post(
                    "/v1/completions", json={"prompt": "The sea is", "max_tokens": 4},
                    headers={"Authorization": f"Bearer {API_KEY}"})
                assert answer.status_code == 200, answer.text
                assert answer.json()["choices"][0]["text"]
                assert answer.headers["x-llamafleet-backend"] == \
                    replica_id(f"http://127.0.0.1:{serves[0]}")
                assert await router.metric("llamafleet_router_scale_ups_total",
                                           outcome="scaled") == 1
            finally:
                await router.stop()
            obj = await wait_until(lambda: _autoscaling(
                api, lambda a: a.get("coldStartSeconds") is not None), timeout=30)
            assert obj["status"]["autoscaling"]["coldStartSeconds"] >= 0
            assert await replicas(api) == 1
        assert runner.exception is None, runner.output
    finally:
        controller.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await controller


async def test_hpa_and_keda_modes_emit_their_object_and_remove_it_when_the_mode_changes(api) -> None:
    await create(api, "/api/v1/nodes", node("big", 81559, "NVIDIA H100 80GB HBM3"))
    hpa_path = f"/apis/autoscaling/v2/namespaces/{NS}/horizontalpodautoscalers/modes"
    so_path = f"/apis/keda.sh/v1alpha1/namespaces/{NS}/scaledobjects/modes"
    async with kopf_runner() as runner:
        await create(api, LLMS, llmservice("modes", scaling={
            "mode": "hpa", "minReplicas": 1, "maxReplicas": 3, "targetInFlightPerReplica": 4}))
        hpa = await wait_until(lambda: get(api, hpa_path))
        # The HPA reads the fleet's size from the scale subresource: never 0 while it runs.
        assert (await get(api, f"{LLMS}/modes/scale"))["spec"]["replicas"] == 1
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "llamafleet.io/v1alpha1",
                                                 "kind": "LLMService", "name": "modes"}
        assert hpa["metadata"]["ownerReferences"][0]["name"] == "modes"
        await patch(api, f"{LLMS}/modes", {"spec": {"scaling": {"mode": "keda", "minReplicas": 0}}})
        so = await wait_until(lambda: get(api, so_path))
        assert so["spec"]["minReplicaCount"] == 0
        await wait_until(lambda: _absent(get(api, hpa_path)))
        await patch(api, f"{LLMS}/modes", {"spec": {"scaling": {"mode": "builtin"}}})
        await wait_until(lambda: _absent(get(api, so_path)))
        # The builtin timer now runs for it (no pods: nothing read, nothing scaled).
        obj = await wait_until(lambda: _autoscaling_of(api, "modes"))
        assert obj["status"]["autoscaling"]["readyPods"] == 0
    assert runner.exception is None, runner.output


async def _autoscaling_of(api: httpx.AsyncClient, name: str) -> dict | None:
    obj = await get(api, f"{LLMS}/{name}") or {}
    return obj if (obj.get("status") or {}).get("autoscaling") else None


async def _is(value, expected) -> bool:
    return await value == expected


async def _absent(value) -> bool:
    return await value is None


async def _with(api: httpx.AsyncClient, cond) -> dict | None:
    obj = await llmservice_obj(api)
    return obj if obj and cond(obj) else None


async def _autoscaling(api: httpx.AsyncClient, cond) -> dict | None:
    obj = await llmservice_obj(api)
    auto = (obj.get("status") or {}).get("autoscaling")
    return obj if auto and cond(auto) else None
