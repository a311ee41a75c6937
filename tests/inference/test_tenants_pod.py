"""Tenants in a pod without a router, without a model (the real app, Serving, Engine and core
on a scripted backend): every front door fills GenerationRequest.tenant and .priority, keys
are checked, limits answer 429 with an honest Retry-After, and the router's trusted headers."""

from __future__ import annotations

import asyncio

import grpc
import openai
import pytest
from llamafleet.common import tenants as T
from llamafleet.inference.grpc_server import start_grpc
from llamafleet.inference.proto import local_pb2 as pb
from llamafleet.inference.proto import local_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.support.scripted import ScriptedPod
from tests.support.servers import wait_until

TENANTS = """
keys:
  - {key: sk-a, tenant: team-a, priority: 3, allowObjectiveHeader: {critical: 9}}
  - {key: sk-b, tenant: team-b, limits: {concurrentRequests: 1}}
  - {key: sk-c, tenant: team-c, limits: {tokensPerMinute: %d}}
"""
ASK = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def pod(tmp_path):
    path = tmp_path / "tenants.yaml"
    path.write_text(TENANTS % 120)
    p = ScriptedPod(["Hello", ",", " world"], api_key="pod-key", tenants_file=str(path))
    p.tenants_path = path
    seen = p.seen = []
    submit = p.engine.submit

    def record(req):
        seen.append((req.tenant, req.priority))
        return submit(req)

    p.engine.submit = record
    yield p
    p.close()


def oa(pod, key: str, **headers) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://pod/v1", api_key=key, max_retries=0,
                              http_client=pod.client(**headers))


async def test_every_http_front_door_fills_tenant_and_priority(pod) -> None:
    c = oa(pod, "sk-a")
    await c.chat.completions.create(model="", messages=ASK)
    await c.completions.create(model="", prompt="Hi")
    await c.responses.create(model="", input="Hi")
    async with pod.client() as h:
        r = await h.post("/v1/messages", headers={"x-api-key": "sk-a"}, json={
            "model": "", "max_tokens": 8, "messages": ASK})
        assert r.status_code == 200, r.text
    assert pod.seen == [("team-a", 3)] * 4
    # The GIE objective header, where the key allows it; an objective it does not map: its own.
    await oa(pod, "sk-a", **{T.OBJECTIVE_HEADER: "critical"}).chat.completions.create(
        model="", messages=ASK)
    await oa(pod, "sk-a", **{T.OBJECTIVE_HEADER: "other"}).chat.completions.create(
        model="", messages=ASK)
    await oa(pod, "sk-b", **{T.OBJECTIVE_HEADER: "critical"}).chat.completions.create(
        model="", messages=ASK)
    assert pod.seen[4:] == [("team-a", 9), ("team-a", 3), ("team-b", 0)]


async def test_grpc_fills_tenant_and_priority_from_its_metadata(pod) -> None:
    server = await start_grpc(pod.settings, pod.serving, port=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_port}") as channel:
            stub = pb_grpc.LLMLocalServiceStub(channel)
            req = pb.LLMLocalServiceGenerateStreamRequest(user_prompt="Hi")
            replies = [r async for r in stub.GenerateStream(
                req, metadata=(("authorization", "Bearer sk-a"),
                               (T.OBJECTIVE_HEADER, "critical")))]
            assert replies[-1].finish_details.finish_reason == "stop"
            _ = [r async for r in stub.GenerateStream(req)]  # no key: mutual TLS is gRPC's auth
            with pytest.raises(grpc.aio.AioRpcError) as e:
                _ = [r async for r in stub.GenerateStream(
                    req, metadata=(("authorization", "Bearer sk-nope"),))]
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        await server.stop(None)
    assert pod.seen == [("team-a", 9), ("", 0)]


async def test_unknown_keys_get_401_in_each_doors_shape_and_the_pods_key_still_works(pod) -> None:
    async with pod.client() as h:
        r = await h.post("/v1/chat/completions", headers={"authorization": "Bearer sk-nope"},
                         json={"messages": ASK})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = await h.post("/v1/messages", headers={"x-api-key": "sk-nope"},
                         json={"model": "", "max_tokens": 8, "messages": ASK})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = await h.post("/v1/chat/completions", json={"messages": ASK})
        assert r.status_code == 401
        # A tenant's key opens neither /metrics nor the adapters' routes.
        assert (await h.get("/metrics", headers={"authorization": "Bearer sk-a"})).status_code == 401
        r = await h.post("/v1/adapters", headers={"authorization": "Bearer sk-a"},
                         json={"name": "x", "path": "/x.gguf"})
        assert r.status_code == 401
    r = await oa(pod, "pod-key").chat.completions.create(model="", messages=ASK)
    assert r.choices[0].message.content == "Hello, world"
    assert pod.seen[-1] == ("", 0)


async def test_concurrent_requests_limit_answers_429_until_one_ends(pod) -> None:
    gate = pod.backend.hold(1)
    c = oa(pod, "sk-b")
    # (The in-process transport hands over an answer once it is whole: the task holds it.)
    first = asyncio.create_task(c.chat.completions.create(model="", messages=ASK, stream=True))

    async def running() -> bool:
        return pod.engine.running == 1

    await wait_until(running, timeout=10)
    async with pod.client() as h:
        r = await h.post("/v1/chat/completions", headers={"authorization": "Bearer sk-b"},
                         json={"messages": ASK})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert "concurrent" in r.json()["error"]["message"]
        r = await h.post("/v1/messages", headers={"x-api-key": "sk-b"},
                         json={"model": "", "max_tokens": 8, "messages": ASK})
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    gate.set()
    _ = [ch async for ch in await first]
    await c.chat.completions.create(model="", messages=ASK)  # its lease ended with the stream
    text = (await pod.client(authorization="Bearer pod-key").get("/metrics")).text
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value
           for f in text_string_to_metric_families(text) for s in f.samples}
    assert got[("llamafleet_tenant_rejected_total",
                (("reason", "concurrent_requests"), ("tenant", "team-b")))] == 2
    assert got[("llamafleet_tenant_requests_total", (("tenant", "team-b"),))] == 2
    assert got[("llamafleet_tenant_tokens_total", (("kind", "completion"), ("tenant", "team-b")))] == 6


async def test_tokens_per_minute_is_enforced_within_one_requests_tokens(pod) -> None:
    c = oa(pod, "sk-c")
    served = 0
    for _ in range(20):
        try:
            r = await c.chat.completions.create(model="", messages=ASK)
        except openai.RateLimitError as e:
            retry = int(e.response.headers["retry-after"])
            break
        served += r.usage.total_tokens
        one = r.usage.total_tokens
    else:
        raise AssertionError("never limited")
    # Admitted while the budget (120) was not spent: at most one request beyond it.
    assert 120 <= served <= 120 + one
    # Honest: the debt at 2 tokens a second, and no sooner.
    assert retry == max(1, -(-(served - 120) // 2)) or retry == -(-(served - 120) // 2) + 1
    assert pod.serving.limiter.tokens_left("team-c") < 0


async def test_a_rotated_key_works_within_seconds_and_the_old_one_stops(pod) -> None:
    c_old = oa(pod, "sk-a")
    await c_old.chat.completions.create(model="", messages=ASK)
    pod.tenants_path.write_text((TENANTS % 120).replace("sk-a", "sk-a2"))

    async def rotated() -> bool:
        async with pod.client() as h:
            new = await h.post("/v1/chat/completions", headers={"authorization": "Bearer sk-a2"},
                               json={"messages": ASK})
            old = await h.post("/v1/chat/completions", headers={"authorization": "Bearer sk-a"},
                               json={"messages": ASK})
        return new.status_code == 200 and old.status_code == 401

    await wait_until(rotated, timeout=10)
    # A malformed rewrite is ignored: the last good file stays in force.
    pod.tenants_path.write_text("keys: [{key: sk-x, tenant: a, limits: {tokensPerMinute: -1}}]")

    async def checked() -> bool:
        return pod.app.state.tenants.errors == 1 or pod.app.state.tenants.current() is None

    await wait_until(checked, timeout=10)
    r = await oa(pod, "sk-a2").chat.completions.create(model="", messages=ASK)
    assert r.choices[0].message.content == "Hello, world"


async def test_the_routers_key_names_the_tenant_counts_no_limit_and_gets_the_usage(pod) -> None:
    headers = {"authorization": "Bearer pod-key", T.TENANT_HEADER: "team-b",
               T.PRIORITY_HEADER: "7", T.USAGE_TRAILER_HEADER: "1"}
    async with pod.client(**headers) as h:
        r = await h.post("/v1/chat/completions", json={"messages": ASK})
        assert r.status_code == 200
        prompt, completion = T.parse_usage(r.headers[T.USAGE_HEADER])
        assert completion == 3 and prompt == r.json()["usage"]["prompt_tokens"]
        r = await h.post("/v1/chat/completions", json={"messages": ASK, "stream": True})
        assert r.text.endswith(f": llamafleet-usage {prompt} 3\n\n")
        assert "data: [DONE]" in r.text
    assert pod.seen[-2:] == [("team-b", 7), ("team-b", 7)]
    # A tenant's key cannot pose as another tenant, nor ask for the trailer.
    async with pod.client(**{**headers, "authorization": "Bearer sk-a"}) as h:
        r = await h.post("/v1/chat/completions", json={"messages": ASK, "stream": True})
        assert "llamafleet-usage" not in r.text
    assert pod.seen[-1] == ("team-a", 3)
