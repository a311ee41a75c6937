"""The router's view of a replica: its load from its /metrics text, the LoRA adapters it holds
(its LoRA gauge, then /v1/models), and the choice of a replica for a request that names one."""

from __future__ import annotations

import asyncio
import json

import httpx
from llamafleet.router.affinity import adapter_keys
from llamafleet.router.app import Router
from llamafleet.router.replicas import (
    PollPolicy,
    Pool,
    Replica,
    holding,
    listed_adapters,
    lora_state,
    parse_metrics,
)
from llamafleet.router.settings import RouterSettings

POD_METRICS = """\
# HELP llamafleet_running_sequences Sequences in the batch.
# TYPE llamafleet_running_sequences gauge
llamafleet_running_sequences 3.0
# HELP llamafleet_queue_depth Requests waiting.
# TYPE llamafleet_queue_depth gauge
llamafleet_queue_depth 2.0
# HELP llamafleet_kv_cache_cells_used KV cells holding tokens.
# TYPE llamafleet_kv_cache_cells_used gauge
llamafleet_kv_cache_cells_used 512.0
# HELP llamafleet_kv_cache_cells_total KV cells in the context.
# TYPE llamafleet_kv_cache_cells_total gauge
llamafleet_kv_cache_cells_total 2048.0
# HELP llamafleet_max_batch_size Sequences that may run at once.
# TYPE llamafleet_max_batch_size gauge
llamafleet_max_batch_size 4.0
# HELP llamafleet_lora_requests_info LoRA adapters.
# TYPE llamafleet_lora_requests_info gauge
llamafleet_lora_requests_info{max_lora="3",running_lora_adapters="a,b",waiting_lora_adapters="c"} 1.7e9
# HELP llamafleet_steps_total x
# TYPE llamafleet_steps_total counter
llamafleet_steps_total 9.0
"""


def test_the_pods_gauges_are_read_and_nothing_else() -> None:
    assert parse_metrics(POD_METRICS) == ({
        "llamafleet_running_sequences": 3.0, "llamafleet_queue_depth": 2.0,
        "llamafleet_kv_cache_cells_used": 512.0, "llamafleet_kv_cache_cells_total": 2048.0,
        "llamafleet_max_batch_size": 4.0}, {
        "running_lora_adapters": "a,b", "waiting_lora_adapters": "c", "max_lora": "3"})
    assert parse_metrics("llamafleet_queue_depth 1.0\n")[1] == {}  # an older pod


def test_the_lora_gauge_names_the_adapters_in_use_and_counts_the_loaded() -> None:
    labels = parse_metrics(POD_METRICS)[1]
    assert lora_state(labels) == ({"a", "b", "c"}, 3)
    # The GIE protocol's own example puts a space after each comma.
    assert lora_state({"running_lora_adapters": "x, y", "max_lora": "2"}) == ({"x", "y"}, 2)
    assert lora_state({}) == (frozenset(), 0)
    assert lora_state({"max_lora": "many"}) == (frozenset(), 0)


def test_v1_models_lists_the_adapters_as_the_models_with_a_parent() -> None:
    models = {"object": "list", "data": [{"id": "base"}, {"id": "one", "parent": "base"},
                                         {"id": 7, "parent": "base"}, "junk"]}
    assert listed_adapters(models) == {"one"}
    assert listed_adapters([]) == listed_adapters({"data": None}) == frozenset()


def _pool(answers: dict[str, str]) -> tuple[Pool, list[str]]:
    asked: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        asked.append(request.url.path)
        return httpx.Response(200, text=answers[request.url.path])

    client = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    return Pool(client, PollPolicy(1, 1, 3, 1, 1), {}), asked


async def test_a_poll_reads_v1_models_only_from_a_pod_that_has_adapters_loaded() -> None:
    plain = "llamafleet_queue_depth 0.0\n" \
        'llamafleet_lora_requests_info{running_lora_adapters="",waiting_lora_adapters="",' \
        'max_lora="0"} 1.0\n'
    pool, asked = _pool({"/ready": "{}", "/metrics": plain})
    b = Replica("http://pod")
    await pool.poll_once(b)
    assert b.ready and b.adapters == frozenset() and asked == ["/ready", "/metrics"]

    models = {"data": [{"id": "base"}, {"id": "one", "parent": "base"},
                       {"id": "two", "parent": "base"}]}
    pool, asked = _pool({"/ready": "{}", "/metrics": POD_METRICS, "/v1/models": json.dumps(models)})
    await pool.poll_once(b)
    # Loaded, idle "one" and "two" from /v1/models; "a", "b", "c" in use by the gauge.
    assert b.adapters == {"one", "two", "a", "b", "c"}
    assert asked == ["/ready", "/metrics", "/v1/models"]


async def test_a_replica_that_answers_again_is_not_lost_while_its_poll_goes_on() -> None:
    """Given up (its failure budget spent), then /ready answers: from the moment ``ready``
    says so, a request sent to it must not find the given-up Event set (it would give the
    replica up at once), even while the poll still waits for /metrics."""
    metrics_asked, release = asyncio.Event(), asyncio.Event()
    down = True

    async def handle(request: httpx.Request) -> httpx.Response:
        if down:
            raise httpx.ConnectError("refused", request=request)
        if request.url.path == "/metrics":
            metrics_asked.set()
            await release.wait()
        return httpx.Response(200, text="{}" if request.url.path == "/ready" else POD_METRICS)

    pool = Pool(httpx.AsyncClient(transport=httpx.MockTransport(handle)),
                PollPolicy(1, 5, 3, 1, 1), {})
    b = Replica("http://pod")
    for _ in range(3):
        await pool.poll_once(b)
    assert b.lost.is_set() and not b.ready
    down = False
    polling = asyncio.ensure_future(pool.poll_once(b))
    await metrics_asked.wait()  # /ready answered; /metrics not yet
    assert b.ready and not b.lost.is_set()
    release.set()
    await polling
    assert b.usable and not b.lost.is_set() and b.missed_polls == 0


def test_holding_is_the_replicas_with_the_adapter_loaded() -> None:
    a, b = Replica("http://a", adapters=frozenset({"one"})), Replica("http://b")
    assert holding([a, b], "one") == [a] and holding([a, b], "base") == []


async def test_an_adapter_goes_to_its_holders_by_its_own_prefix_and_any_replica_else() -> None:
    router = Router(RouterSettings(backends="http://a:1,http://b:2,http://c:3"))
    try:
        for url, held in (("http://a:1", {"one"}), ("http://b:2", set()),
                          ("http://c:3", {"one", "two"})):
            router.pool.replicas[url] = Replica(url, ready=True, adapters=frozenset(held))
        leaving = asyncio.get_running_loop().create_future()
        keys = [11, 22]
        for i in range(6):  # holders only, even when the others are idle and they are busy
            router.pool.replicas["http://a:1"].in_flight = i
            chosen = await router.choose(keys, set(), 1e12, leaving, "one")
            assert chosen.url in ("http://a:1", "http://c:3")
        router.pool.replicas["http://a:1"].in_flight = 0
        assert (await router.choose(keys, set(), 1e12, leaving, "two")).url == "http://c:3"
        # The one holder already tried: another replica, never a refusal (it answers 404
        # unless it has loaded the adapter meanwhile).
        assert (await router.choose(keys, {"http://c:3"}, 1e12, leaving, "two")).url != "http://c:3"
        # Not an adapter anywhere (the base model): every replica, by the unsalted prefix.
        seen = {(await router.choose([i], set(), 1e12, leaving, "base")).url for i in range(30)}
        assert seen == {"http://a:1", "http://b:2", "http://c:3"}
        # An adapter's prefix is remembered under the adapter, apart from the base model's.
        assert router.affinity._seen.get(adapter_keys("one", keys)[-1]) in ("http://a:1",
                                                                           "http://c:3")
    finally:
        await router.client.aclose()
        await router.poll_client.aclose()


def test_load_is_ours_now_plus_the_others_of_the_last_poll() -> None:
    b = Replica("http://x", in_flight=2, others=3.0)
    assert b.load == 5.0
    b.in_flight = 0
    assert b.load == 3.0

