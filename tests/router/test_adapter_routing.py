"""A real `llamafleet router` process sends requests that name a LoRA adapter to the replicas
that hold it (stub replicas, tests/router/stub_replica.py, that export the pod's LoRA gauge and
list their adapters on /v1/models), and any other request anywhere."""

from __future__ import annotations

import httpx
import pytest
from llamafleet.router.replicas import replica_id

from tests.router.test_robustness import Stub, fleet
from tests.support.servers import wait_until

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"


def _ask(router, model: str, i: int) -> str:
    r = httpx.post(router.url + CHAT, timeout=10, json={
        "model": model, "messages": [{"role": "user", "content": f"question {i}"}]})
    assert r.status_code == 200, r.text
    return r.headers["x-llamafleet-backend"]


def test_requests_for_an_adapter_go_to_its_holders_and_others_anywhere() -> None:
    plain, holder = Stub(), Stub(adapters="tuned,other")
    with fleet([plain, holder]) as router:
        # Polls are sequential per replica: a second poll of /v1/models means the first one's
        # adapters are in the router's books.
        wait_until(lambda: httpx.get(f"{holder.url}/stub/polls").json()["models"] >= 2)
        assert httpx.get(f"{plain.url}/stub/polls").json()["models"] == 0  # no gauge: no GET
        assert {_ask(router, "tuned", i) for i in range(8)} == {replica_id(holder.url)}
        # An adapter no replica holds, and the base model: never refused, prefix and load.
        assert {_ask(router, "nobody-has-it", i) for i in range(2)} <= {
            replica_id(plain.url), replica_id(holder.url)}
        served = {_ask(router, "stub", i) for i in range(16)}
        assert replica_id(plain.url) in served
