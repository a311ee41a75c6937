"""The per-LLMService reconcile locks: one reconcile of an object at a time, and no entry
left behind once no reconcile needs it (issue 23, item 20: memo.locks grew by one entry
per LLMService ever seen, deleted ones included)."""

from __future__ import annotations

import logging
import threading

import kopf
import pytest
from llamafleet.operator import handlers, reconcile, runtime
from llamafleet.operator.settings import OperatorSettings

from tests.support.servers import wait_until


@pytest.fixture()
def memo(monkeypatch) -> kopf.Memo:
    """The memo as the operator's startup handler fills it (the Kubernetes client is not
    used here: no API server is asked anything)."""
    monkeypatch.setattr(runtime, "api_client", lambda settings: None)
    monkeypatch.setattr(runtime, "DynamicClient", lambda client, **kw: object())
    memo = kopf.Memo()
    memo.settings = OperatorSettings()
    handlers.startup(settings=kopf.OperatorSettings(), memo=memo)
    return memo


def reconcile_one(memo: kopf.Memo, uid: str) -> None:
    reconcile.run({"metadata": {"uid": uid}}, kopf.Patch(), logging.getLogger(__name__), memo,
                  [], event=False)


def test_locks_of_reconciled_llmservices_do_not_stay(memo, monkeypatch) -> None:
    seen: list[str] = []
    monkeypatch.setattr(reconcile, "run_locked",
                        lambda body, *a: seen.append(body["metadata"]["uid"]))
    for i in range(500):  # 500 LLMServices created, reconciled, then deleted
        reconcile_one(memo, f"uid-{i}")
    assert len(seen) == 500
    assert len(memo.locks) == 0


def test_one_reconcile_of_an_object_at_a_time_and_then_nothing_left(memo, monkeypatch) -> None:
    release = threading.Event()
    active: list[str] = []
    overlap: list[int] = []

    def locked(body, *_):
        active.append(body["metadata"]["uid"])
        overlap.append(len(active))
        if len(overlap) == 1:
            assert release.wait(30)  # the first holds the lock until the test lets it go
        active.remove(body["metadata"]["uid"])

    monkeypatch.setattr(reconcile, "run_locked", locked)
    first = threading.Thread(target=reconcile_one, args=(memo, "same"))
    second = threading.Thread(target=reconcile_one, args=(memo, "same"))
    first.start()
    wait_until(lambda: overlap == [1])
    second.start()
    wait_until(lambda: memo.locks._locks["same"][1] == 2)  # the second waits for the lock
    assert overlap == [1] and len(memo.locks) == 1
    reconcile_other = threading.Thread(target=reconcile_one, args=(memo, "other"))
    reconcile_other.start()  # another object is not held up by this one
    reconcile_other.join(30)
    assert not reconcile_other.is_alive() and overlap == [1, 2]  # beside the first
    release.set()
    first.join(30)
    second.join(30)
    assert overlap == [1, 2, 1]  # the second ran alone, after the first
    assert len(memo.locks) == 0
