"""`llamafleet router --llmservice NAME` in a cluster: it finds its replicas in the
EndpointSlices of the LLMService's pod Service and scales the LLMService from zero.

Real parts: the router as a subprocess (KUBECONFIG pointing at KMock's emulator, as in a
pod with a kubeconfig), a real `llamafleet serve` on loopback, real inference. The emulator
(tests/support/kube.py) is extended where KMock 0.8 falls short: it filters lists and
watches by labelSelector and serves the `scale` subresource as a real API server does.
There are no controllers: the test itself plays the Deployment and EndpointSlice
controllers, publishing a slice whose ready endpoint is the serve process.

The emulator answers from this test's event loop, so the test never blocks it: HTTP goes
through httpx.AsyncClient and waits through the async form of wait_until."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import httpx
import pytest
from llamafleet.common.contract import pod_service_name
from llamafleet.router.replicas import replica_id

from tests.support.kube import LLMS, SLICES, Emulator, Router, create, endpoint_slice, get, llmservice
from tests.support.servers import free_port, serve_process, wait_until

pytestmark = pytest.mark.integration

SERVE_FLAGS = ("--max-batch-size", "2", "--context-size", "1024", "--default-max-tokens", "8")


async def replicas(api: httpx.AsyncClient, name: str) -> int:
    return int(((await get(api, f"{LLMS}/{name}")) or {}).get("spec", {}).get("replicas", -1))


async def test_a_held_request_scales_from_zero_and_completes_once_a_replica_is_ready(
        api: httpx.AsyncClient, tmp_path: Path, instruct_model_path: Path) -> None:
    # The replica's process starts now (its model loads meanwhile), but the router learns of
    # it only from an EndpointSlice.
    serve, port = serve_process("--model-path", str(instruct_model_path), *SERVE_FLAGS)
    await create(api, LLMS, llmservice("chat", replicas=0))
    service = pod_service_name("chat")
    # Another Service's slice in the namespace: never the router's.
    await create(api, SLICES, endpoint_slice("other-abc", "other-pods", port, ("127.0.0.1", True)))
    router = Router("chat", tmp_path / "kubeconfig")
    try:
        assert (await wait_until(router.health, timeout=60))["backends"] == []
        ask = asyncio.create_task(router.http.post(
            "/v1/completions", json={"prompt": "The sea is", "max_tokens": 4}))
        # Held, and the LLMService is scaled from 0 to 1 through its scale subresource.
        await wait_until(lambda: _eq(router.metric("llamafleet_router_hold_queue_depth"), 1))
        await wait_until(lambda: _eq(replicas(api, "chat"), 1))
        # Counted once the scale call has returned (the replicas may show it first).
        await wait_until(lambda: _eq(router.metric("llamafleet_router_scale_ups_total",
                                                   outcome="scaled"), 1))
        scale = await get(api, f"{LLMS}/chat/scale")
        assert scale["kind"] == "Scale" and scale["spec"]["replicas"] == 1

        # The pod is up: the EndpointSlice controller publishes it, beside a pod that is not
        # ready (a free loopback address that nothing serves).
        await wait_until(lambda: _ready(serve, port), timeout=300)
        await create(api, SLICES, endpoint_slice(f"{service}-x1", service, port,
                                                 ("127.0.0.1", True), ("127.0.0.2", False)))
        url = f"http://127.0.0.1:{port}"
        answer = await asyncio.wait_for(ask, 300)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"]
        # Callers see replicas by id, never by (internal) URL.
        assert answer.headers["x-llamafleet-backend"] == replica_id(url)
        # Only the ready endpoint of the router's own Service is a replica.
        assert (await router.health())["backends"] == [replica_id(url)]
        assert await router.metric("llamafleet_router_cold_start_seconds_count") == 1

        # The slice goes away (the pod is gone): so does the replica.
        r = await api.delete(f"{SLICES}/{service}-x1")
        assert r.status_code < 300, r.text
        await wait_until(lambda: _eq(_field(router.health(), "backends"), []))
        assert await router.metric("llamafleet_router_backends_ready") == 0

        # A new hold episode: replicas are already 1, so nothing is scaled; a new slice with
        # the endpoint ready again serves it.
        ask = asyncio.create_task(router.http.post(
            "/v1/completions", json={"prompt": "The sky is", "max_tokens": 4}))
        await wait_until(lambda: _eq(router.metric("llamafleet_router_scale_ups_total",
                                                   outcome="not_needed"), 1))
        await create(api, SLICES, endpoint_slice(f"{service}-x2", service, port,
                                                 ("127.0.0.1", True)))
        answer = await asyncio.wait_for(ask, 300)
        assert answer.status_code == 200, answer.text
        # Counted once the scale call has returned (the replicas may show it first).
        await wait_until(lambda: _eq(router.metric("llamafleet_router_scale_ups_total",
                                                   outcome="scaled"), 1))
    finally:
        out = await router.stop()
        serve.kill()
        await asyncio.to_thread(serve.communicate, timeout=30)
    assert "ready replicas of team-a/chat-pods: none" in out, out[-3000:]


async def test_api_trouble_never_stops_the_router(
        api: httpx.AsyncClient, tmp_path: Path, monkeypatch) -> None:
    """The API refuses the scale write (RBAC missing, say): the router logs and counts it,
    keeps running, and the held request ends with the usual 503 after its hold timeout.
    Its first watch expires (410 Gone): it lists and watches again, and sees new slices."""
    await create(api, LLMS, llmservice("idle", replicas=0))
    monkeypatch.setattr(Emulator, "refuse", {"llmservices"})
    monkeypatch.setattr(Emulator, "expire_watches", 1)
    router = Router("idle", tmp_path / "kubeconfig", "--hold-timeout", "2")
    try:
        await wait_until(router.health, timeout=60)
        r = await router.http.post("/v1/chat/completions",
                                   json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        await wait_until(lambda: _eq(router.metric("llamafleet_router_scale_ups_total",
                                                   outcome="error"), 1))
        assert await replicas(api, "idle") == 0
        assert (await router.health())["status"] == "ok"
        # The watch recovered from its 410: a slice published now is seen (nothing serves
        # this address, so the replica is known but not ready).
        nowhere = free_port()
        await create(api, SLICES, endpoint_slice("idle-pods-a", pod_service_name("idle"), nowhere,
                                                 ("127.0.0.1", True)))
        await wait_until(lambda: _eq(_field(router.health(), "backends"),
                                     [replica_id(f"http://127.0.0.1:{nowhere}")]))
    finally:
        out = await router.stop()
    assert "could not scale LLMService team-a/idle from zero: API error 403" in out, out[-3000:]
    assert "EndpointSlice watch expired (410 Gone); listing again" in out, out[-3000:]


async def _eq(value, expected) -> bool:
    return (await value) == expected


async def _field(health, key: str):
    return ((await health) or {}).get(key)


async def _ready(proc: subprocess.Popen, port: int) -> bool:
    if proc.poll() is not None:
        raise AssertionError(f"serve exited {proc.returncode}: {proc.stdout.read()[-3000:]}")
    try:
        async with httpx.AsyncClient(timeout=2) as c:
            return (await c.get(f"http://127.0.0.1:{port}/ready")).status_code == 200
    except httpx.TransportError:
        return False
