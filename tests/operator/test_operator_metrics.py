"""The operator's own series (llamafleet.operator.metrics): what a reconcile and an autoscaler
round leave in them, and its /metrics server."""

from __future__ import annotations

import socket

import httpx
import kopf
import pytest
from llamafleet.common.contract import OperatorMetric as M
from llamafleet.operator.metrics import OperatorMetrics, direction, outcome_of, serve

from tests.support.servers import free_port

KEY = {"namespace": "team", "llmservice": "chat"}


def body(**spec) -> dict:
    return {"metadata": {"namespace": "team", "name": "chat"}, "spec": spec, "status": {}}


def test_outcomes_and_directions() -> None:
    assert outcome_of(None) == "ok"
    assert outcome_of(kopf.TemporaryError("later")) == "retry"
    assert outcome_of(kopf.PermanentError("bad spec")) == "invalid"
    assert outcome_of(RuntimeError("boom")) == "error"
    assert [direction(3, 2), direction(1, 2), direction(2, 2), direction(None, 2)] == \
        ["up", "down", "steady", "steady"]


def test_a_reconcile_is_counted_timed_and_leaves_its_conditions() -> None:
    m = OperatorMetrics()
    patch = {"status": {"conditions": [
        {"type": "Ready", "status": "False", "reason": "Progressing"},
        {"type": "Capacity", "status": "True", "reason": "Planned"}]}}
    with m.reconcile(body(), patch):
        pass
    assert m.registry.get_sample_value(M.RECONCILES, {**KEY, "outcome": "ok"}) == 1
    assert m.registry.get_sample_value(M.RECONCILE_DURATION + "_count") == 1
    ready = {**KEY, "type": "Ready", "status": "False", "reason": "Progressing"}
    assert m.registry.get_sample_value(M.CONDITION, ready) == 1
    # The condition changes: its old series goes, so a dashboard never shows both.
    patch["status"]["conditions"][0] = {"type": "Ready", "status": "True", "reason": "Ready"}
    with pytest.raises(kopf.TemporaryError), m.reconcile(body(), patch):
        raise kopf.TemporaryError("waiting", delay=1)
    assert m.registry.get_sample_value(M.CONDITION, ready) is None
    assert m.registry.get_sample_value(
        M.CONDITION, {**KEY, "type": "Ready", "status": "True", "reason": "Ready"}) == 1
    assert m.registry.get_sample_value(M.RECONCILES, {**KEY, "outcome": "retry"}) == 1
    # A reconcile that wrote no conditions (it failed before) leaves them as they were.
    with pytest.raises(RuntimeError), m.reconcile(body(), {}):
        raise RuntimeError("boom")
    assert m.registry.get_sample_value(M.RECONCILES, {**KEY, "outcome": "error"}) == 1
    assert m.registry.get_sample_value(
        M.CONDITION, {**KEY, "type": "Capacity", "status": "True", "reason": "Planned"}) == 1


def test_an_autoscaler_round_leaves_its_inputs_decision_and_cold_start() -> None:
    m = OperatorMetrics()
    found = {"observedLoad": 7.0, "averageLoad": 5.5, "heldRequests": 2.0, "readyPods": 1,
             "desiredReplicas": 3, "coldStartSeconds": 42.0}
    b = body(replicas=1, scaling={"maxReplicas": 3})
    with m.autoscale(b, {"status": {"autoscaling": found}}):
        pass
    get = m.registry.get_sample_value
    assert (get(M.AUTOSCALER_LOAD, KEY), get(M.AUTOSCALER_AVERAGE_LOAD, KEY),
            get(M.AUTOSCALER_HELD_REQUESTS, KEY), get(M.AUTOSCALER_READY_PODS, KEY),
            get(M.AUTOSCALER_DESIRED_REPLICAS, KEY), get(M.AUTOSCALER_MAX_REPLICAS, KEY)) == \
        (7.0, 5.5, 2.0, 1.0, 3.0, 3.0)
    assert get(M.AUTOSCALER_DECISIONS, {**KEY, "direction": "up"}) == 1
    assert get(M.COLD_START + "_count", KEY) == 1 and get(M.COLD_START + "_sum", KEY) == 42.0
    # The next round still reports the same cold start (status keeps it): not counted again.
    b["status"] = {"autoscaling": found}
    b["spec"]["replicas"] = 3
    with m.autoscale(b, {"status": {"autoscaling": {**found, "observedLoad": None}}}):
        pass
    assert get(M.COLD_START + "_count", KEY) == 1
    assert get(M.AUTOSCALER_DECISIONS, {**KEY, "direction": "steady"}) == 1
    assert get(M.AUTOSCALER_LOAD, KEY) == 0.0  # nothing could be read
    # A round that failed before writing status.autoscaling leaves no trace.
    with m.autoscale(b, {}):
        pass
    assert get(M.AUTOSCALER_DECISIONS, {**KEY, "direction": "steady"}) == 1


def test_metrics_are_served_and_a_taken_port_does_not_stop_the_operator(caplog) -> None:
    m = OperatorMetrics()
    assert serve(m, 0, "127.0.0.1") is None
    port = free_port()
    server = serve(m, port, "127.0.0.1")
    try:
        with m.reconcile(body(), {}):
            pass
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert f'{M.RECONCILES}{{llmservice="chat",namespace="team",outcome="ok"}} 1.0' in text
    finally:
        server.shutdown()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert serve(m, taken.getsockname()[1], "127.0.0.1") is None
    assert "operator metrics not served" in caplog.text


def test_series_of_a_fleet_no_round_refreshes_go_at_the_next_scrape() -> None:
    """A deleted LLMService (or one no longer scaled by the builtin autoscaler) must not keep
    a dashboard's line or an alert such as LlamafleetAutoscalerAtMax alive."""
    now = [0.0]
    m = OperatorMetrics(conditions_ttl=100, autoscaler_ttl=50, clock=lambda: now[0])
    conditions = {"status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Ready"}]}}
    with m.reconcile(body(), conditions):
        pass
    with m.autoscale(body(replicas=2, scaling={"maxReplicas": 2}),
                     {"status": {"autoscaling": {"desiredReplicas": 2}}}):
        pass
    ready = {**KEY, "type": "Ready", "status": "True", "reason": "Ready"}

    def scrape() -> dict[str, float]:
        return {s.name: s.value for f in m.registry.collect() for s in f.samples
                if s.labels.get("llmservice") == "chat"}

    now[0] = 50
    assert {M.CONDITION, M.AUTOSCALER_MAX_REPLICAS} <= set(scrape())
    now[0] = 51
    found = scrape()
    assert M.CONDITION in found and M.AUTOSCALER_MAX_REPLICAS not in found
    assert M.AUTOSCALER_DESIRED_REPLICAS not in found
    with m.reconcile(body(), conditions):  # refreshed: kept
        pass
    now[0] = 150
    assert m.registry.get_sample_value(M.CONDITION, ready) == 1
    now[0] = 152
    assert M.CONDITION not in scrape()
    # Counters stay: they are totals, which rate() handles.
    assert m.registry.get_sample_value(M.RECONCILES, {**KEY, "outcome": "ok"}) == 2
    # The default keeps everything.
    keep = OperatorMetrics()
    with keep.reconcile(body(), conditions):
        pass
    keep.sweep()
    assert keep.registry.get_sample_value(M.CONDITION, ready) == 1
