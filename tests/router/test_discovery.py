"""In-cluster discovery and scale from zero, at our own boundaries: EndpointSlices (API
dicts) to replica URLs (pure), the settings that choose the mode, and the scaler's once
per hold episode rule with its Kubernetes call replaced (tests/router/
test_discovery_kmock.py drives the real thing against the API emulator)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from kubernetes.client import ApiClient
from llamafleet.common.contract import HTTP_PORT, ROUTER_RBAC_RULES, pod_service_name
from llamafleet.router.discovery import slice_urls
from llamafleet.router.metrics import RouterMetrics
from llamafleet.router.replicas import Pool
from llamafleet.router.scaling import Scaler
from llamafleet.router.settings import RouterSettings
from pydantic import ValidationError

from tests.support.servers import wait_until


def eps(*endpoints: dict, ports: list | None = None, address_type: str = "IPv4") -> dict:
    return {"addressType": address_type, "endpoints": list(endpoints),
            "ports": [{"name": "http", "port": 16070, "protocol": "TCP"}] if ports is None else ports}


def ep(*addresses: str, **conditions: bool) -> dict:
    out: dict = {"addresses": list(addresses)}
    if conditions:
        out["conditions"] = conditions
    return out


def test_ready_endpoints_become_urls_on_the_http_port() -> None:
    s = eps(ep("10.0.0.1", ready=True), ep("10.0.0.2", ready=False, serving=True),
            ep("10.0.0.3"), ports=[{"name": "metrics", "port": 16072},
                                   {"name": "http", "port": 8080}])
    # ready=false is left out; no conditions at all counts as ready (the API's rule).
    assert slice_urls([s]) == ["http://10.0.0.1:8080", "http://10.0.0.3:8080"]


def test_slices_merge_and_an_endpoint_is_one_replica() -> None:
    a = eps(ep("10.0.0.2", "10.0.0.9"), ep("10.0.0.1"))
    b = eps(ep("10.0.0.1"), {"addresses": []}, ep("10.0.0.4", ready=True))
    b["endpoints"].append({"addresses": ["10.0.0.5"], "conditions": None})
    # Fungible addresses of one endpoint are one pod: only the first is used.
    assert slice_urls([a, b]) == ["http://10.0.0.1:16070", "http://10.0.0.2:16070",
                                  "http://10.0.0.4:16070", "http://10.0.0.5:16070"]


def test_port_falls_back_to_the_contract_and_ipv6_is_bracketed() -> None:
    assert slice_urls([eps(ep("10.0.0.1"), ports=[])]) == [f"http://10.0.0.1:{HTTP_PORT}"]
    assert slice_urls([eps(ep("10.0.0.1"), ports=[{"name": "http", "port": None}])]) == [
        f"http://10.0.0.1:{HTTP_PORT}"]
    assert slice_urls([eps(ep("fd00::1"), address_type="IPv6")]) == ["http://[fd00::1]:16070"]
    assert slice_urls([{"endpoints": None}, {}]) == []


def test_the_contract_names_the_pod_service_and_the_routers_rbac() -> None:
    assert pod_service_name("chat") == "chat-pods"
    rules = {r["resources"][0]: set(r["verbs"]) for r in ROUTER_RBAC_RULES}
    assert rules == {"endpointslices": {"get", "list", "watch"},
                     "llmservices/scale": {"get", "patch", "update"}}


def test_the_router_needs_exactly_one_of_backends_and_llmservice(monkeypatch) -> None:
    for var in ("BACKENDS", "LLMSERVICE", "NAMESPACE"):
        monkeypatch.delenv(f"LLM_LLAMA_SERVICE_ROUTER_{var}", raising=False)
    one = "give exactly one of --backends URL,URL"
    with pytest.raises(ValidationError, match=one):
        RouterSettings()
    with pytest.raises(ValidationError, match=one):
        RouterSettings(backends=" , ")
    with pytest.raises(ValidationError, match=one):
        RouterSettings(backends="http://a:1", llmservice="chat")
    with pytest.raises(ValidationError, match="is not an http"):
        RouterSettings(backends="notaurl")
    with pytest.raises(ValidationError, match="llmservice"):
        RouterSettings(llmservice="Chat_1")
    assert RouterSettings(backends="http://a:1/, http://b:2").backend_urls == ["http://a:1",
                                                                              "http://b:2"]
    s = RouterSettings(llmservice="chat", namespace="team-a")
    assert (s.llmservice, s.namespace, s.backend_urls) == ("chat", "team-a", [])


def test_namespace_defaults_to_the_pods_own(monkeypatch, tmp_path) -> None:
    from llamafleet.router import settings as S

    monkeypatch.delenv("LLM_LLAMA_SERVICE_ROUTER_NAMESPACE", raising=False)
    monkeypatch.setattr(S, "NAMESPACE_FILE", tmp_path / "absent")
    assert RouterSettings(llmservice="chat").namespace == "default"
    (tmp_path / "namespace").write_text("team-b\n")
    monkeypatch.setattr(S, "NAMESPACE_FILE", tmp_path / "namespace")
    assert RouterSettings(llmservice="chat").namespace == "team-b"


async def test_one_scale_up_per_hold_episode_and_the_cold_start_is_measured() -> None:
    metrics = RouterMetrics()
    async with httpx.AsyncClient() as http:
        pool = Pool(http, 1.0, {})
        # An API client that is never used: scale_up (the Kubernetes call) is replaced.
        scaler = Scaler(ApiClient(), "team-a", "chat", metrics)
        outcomes = ["scaled", "error"]
        calls: list[str] = []

        def scale_up() -> str:
            calls.append("up")
            outcome = outcomes.pop(0)
            if outcome == "error":
                raise RuntimeError("API down")
            return outcome

        scaler.scale_up = scale_up  # type: ignore[method-assign]
        held = [0]
        task = asyncio.create_task(scaler.run(pool, lambda: held[0]))

        async def hold(n: int) -> None:
            held[0] = n
            await pool.notify()

        def count(outcome: str) -> float:
            return metrics.scale_ups.labels(outcome)._value.get()

        try:
            await hold(1)
            await wait_until(lambda: _async(count("scaled") == 1))
            await hold(3)  # more requests in the same episode: no new scale-up
            await pool.set_urls(["http://10.0.0.1:16070"])
            pool.replicas["http://10.0.0.1:16070"].ready = True
            await pool.notify()
            await wait_until(lambda: _async(metrics.cold_start._sum.get() > 0))
            assert calls == ["up"]
            # The replica goes away and requests wait again: a new episode, and its error
            # is counted (the requests keep waiting).
            await pool.set_urls([])
            await hold(1)
            await wait_until(lambda: _async(count("error") == 1))
            assert calls == ["up", "up"]
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task


async def _async(value: bool) -> bool:
    return value
