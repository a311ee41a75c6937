"""spec.scaling (pydantic and CRD) and the pure autoscaler: readings + state -> replicas."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
import yaml
from llamafleet.operator.scaling_policy import Decision, PodLoad, Policy, Readings, State, decide
from llamafleet.operator.spec import Scaling, SpecError, parse_spec

ROOT = Path(__file__).resolve().parents[2]
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
EMBEDDED = {"model": {"source": {"embedded": True}}}


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


# --- spec ------------------------------------------------------------------------------------


def test_scaling_defaults_and_replicas_start_at_the_floor() -> None:
    s = parse_spec({**EMBEDDED, "scaling": {"maxReplicas": 4}})
    assert s.scaling is not None and s.scaling.mode == "builtin"
    assert (s.scaling.minReplicas, s.scaling.targetInFlightPerReplica) == (1, None)
    assert s.replicas == 1
    assert parse_spec({**EMBEDDED, "scaling": {"minReplicas": 3, "maxReplicas": 4}}).replicas == 3
    # min 0: the fleet comes up once, then idles to zero.
    assert parse_spec({**EMBEDDED, "scaling": {"minReplicas": 0, "maxReplicas": 4}}).replicas == 1
    # What the autoscaler wrote (through the scale subresource) is kept.
    assert parse_spec({**EMBEDDED, "replicas": 0,
                       "scaling": {"minReplicas": 0, "maxReplicas": 4}}).replicas == 0
    assert parse_spec({**EMBEDDED, "replicas": 3}).replicas == 3  # a fixed fleet
    assert parse_spec(EMBEDDED).replicas == 1


@pytest.mark.parametrize("scaling, extra, needle", [
    ({"minReplicas": 3, "maxReplicas": 2}, {}, "minReplicas (3) must not be above"),
    ({"maxReplicas": 3}, {"replicas": 5}, "replicas (5) is outside"),
    ({"minReplicas": 2, "maxReplicas": 3}, {"replicas": 1}, "leave it out"),
    ({"maxReplicas": 0}, {}, "spec.scaling.maxReplicas"),
    ({}, {}, "spec.scaling.maxReplicas: Field required"),
    ({"maxReplicas": 2, "mode": "knative"}, {}, "spec.scaling.mode"),
    ({"maxReplicas": 2, "scaleDownDelay": "5 minutes"}, {}, "spec.scaling.scaleDownDelay"),
    ({"maxReplicas": 2, "idleBeforeZero": "0s"}, {}, "invalid duration '0s'"),
    ({"maxReplicas": 2, "targetInFlightPerReplica": 0}, {}, "targetInFlightPerReplica"),
    ({"maxReplicas": 2, "minReplicas": 0, "mode": "hpa"}, {}, "HPAScaleToZero"),
    ({"maxReplicas": 4, "minReplicas": 2}, {"podDisruptionBudget": {"enabled": True,
                                                                    "minAvailable": 2}},
     "below max(scaling.minReplicas, 1) (2)"),
])
def test_invalid_scaling_is_an_invalid_spec(scaling, extra, needle) -> None:
    with pytest.raises(SpecError) as e:
        parse_spec({**EMBEDDED, **extra, "scaling": scaling})
    assert needle in str(e.value)


def test_zero_durations_are_allowed_where_they_mean_at_once() -> None:
    s = parse_spec({**EMBEDDED, "scaling": {"maxReplicas": 2, "scaleUpStabilization": "0s",
                                            "averageWindow": "0s", "scaleDownDelay": "1m30s"}})
    assert s.scaling.seconds("scaleUpStabilization") == 0
    assert s.scaling.seconds("scaleDownDelay") == 90
    # A PDB checks against the fleet's smallest size, not the replicas of the moment.
    parse_spec({**EMBEDDED, "scaling": {"minReplicas": 2, "maxReplicas": 4},
                "podDisruptionBudget": {"enabled": True, "minAvailable": 1}})


def _crd_spec() -> dict:
    crd = yaml.safe_load((ROOT / "crds/llmservice.yaml").read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


def test_crd_scaling_mirrors_the_pydantic_model() -> None:
    spec = _crd_spec()
    assert "default" not in spec["properties"]["replicas"]  # absent means "the autoscaler's"
    scaling = spec["properties"]["scaling"]
    props = scaling["properties"]
    assert set(props) == set(Scaling.model_fields)
    assert scaling["required"] == ["maxReplicas"]
    for name, field in Scaling.model_fields.items():
        if field.is_required() or field.default is None:
            assert "default" not in props[name], name
        else:
            assert props[name]["default"] == field.default, name
        assert props[name].get("description") or name in ("maxReplicas",), name
    assert props["mode"]["enum"] == ["builtin", "hpa", "keda"]
    assert props["minReplicas"]["minimum"] == 0
    rules = " ".join(r["rule"] for r in scaling["x-kubernetes-validations"])
    assert "self.minReplicas <= self.maxReplicas" in rules and "'hpa'" in rules
    (rule,) = spec["x-kubernetes-validations"]
    assert "self.replicas >= self.scaling.minReplicas" in rule["rule"]
    assert "self.replicas <= self.scaling.maxReplicas" in rule["rule"]
    status = yaml.safe_load((ROOT / "crds/llmservice.yaml").read_text())["spec"]["versions"][0][
        "schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["autoscaling"]
    # Every field the autoscaler writes is declared (the API server prunes the rest).
    sample = decide(Readings((PodLoad("p", 1.0, 3.0, T0),), 0.0), State(),
                    Policy(0, 3, 1), 1, T0).to_status()
    assert set(sample) <= set(status["properties"])


# --- the autoscaler ---------------------------------------------------------------------------


def pods(*loads: float | None, counts: tuple[float, ...] | None = None) -> tuple[PodLoad, ...]:
    return tuple(PodLoad(f"p{i}", x, counts[i] if counts else None, T0)
                 for i, x in enumerate(loads))


def run(policy: Policy, steps: list[tuple[float, Readings]], current: int,
        state: State | None = None) -> list[Decision]:
    """Feed readings at the given times, applying each decision as the timer does."""
    state, out = state or State(), []
    for t, r in steps:
        d = decide(r, state, policy, current, at(t))
        state, current = d.state, d.replicas
        out.append(d)
    return out


def test_replicas_are_the_average_over_the_target_clamped() -> None:
    p = Policy(1, 5, target=4, average_window=0)
    assert decide(Readings(pods(9, 0)), State(), p, 1, T0).replicas == 3  # ceil(9/4)
    assert decide(Readings(pods(8, 0)), State(), p, 1, T0).replicas == 2  # exactly 2 targets
    assert decide(Readings(pods(100)), State(), p, 1, T0).replicas == 5  # max
    d = decide(Readings(pods(3), held=6), State(), p, 1, T0)
    assert (d.replicas, d.load, d.held) == (3, 9, 6)  # the router's held requests count


def test_scale_up_is_at_once_and_the_reason_shows_the_inputs() -> None:
    p = Policy(1, 4, target=1, average_window=0)
    d = decide(Readings(pods(3)), State(), p, 1, T0)
    assert d.replicas == 3
    assert "scaling up 1 -> 3" in d.reason and "load 3" in d.reason
    assert d.state.last_scale_time == T0
    status = d.to_status()
    assert status["desiredReplicas"] == 3 and status["observedLoad"] == 3
    assert status["lastScaleTime"] == "2026-01-01T00:00:00Z"


def test_the_moving_average_smooths_a_step() -> None:
    p = Policy(1, 10, target=1, average_window=10)
    quiet = decide(Readings(pods(0)), State(), p, 1, at(0))
    d = decide(Readings(pods(10)), quiet.state, p, 1, at(10))
    # One time constant: 1 - 1/e of the step.
    assert d.state.average == pytest.approx(10 * (1 - 2.718281828 ** -1), rel=1e-6)
    assert d.replicas == 7


def test_scale_up_stabilization_takes_the_lowest_recommendation_of_the_window() -> None:
    p = Policy(1, 10, target=1, average_window=0, up_stabilization=10)
    ds = run(p, [(0, Readings(pods(5))), (5, Readings(pods(3))), (10, Readings(pods(8)))], 1)
    assert [d.replicas for d in ds] == [1, 1, 3]
    assert "waits for scaleUpStabilization" in ds[0].reason
    # A dip to the current size resets the window.
    ds = run(p, [(0, Readings(pods(5))), (5, Readings(pods(1))), (10, Readings(pods(5)))], 1)
    assert [d.replicas for d in ds] == [1, 1, 1]


def test_scale_down_only_after_consistently_lower_readings() -> None:
    p = Policy(1, 10, target=1, average_window=0, down_delay=60)
    steps = [(0, Readings(pods(1, 1))), (30, Readings(pods(1, 1))),
             (50, Readings(pods(2, 2))),  # back up to the current size: the delay starts over
             (60, Readings(pods(1, 0))), (100, Readings(pods(1, 1))), (120, Readings(pods(0, 1)))]
    ds = run(p, steps, 4)
    assert [d.replicas for d in ds] == [4, 4, 4, 4, 4, 2]
    assert "waits for scaleDownDelay (40s of 60s)" in ds[4].reason
    # It goes to the highest recommendation of the window (2), not the last one (1).
    assert "scaling down 4 -> 2 after 60s" in ds[5].reason
    # ...and the next step down waits a full delay again.
    ds2 = run(p, [(121, Readings(pods(1, 0))), (180, Readings(pods(1, 0))),
                  (181, Readings(pods(1, 0)))], 2, ds[-1].state)
    assert [d.replicas for d in ds2] == [2, 2, 1]


def test_min_replicas_holds_without_load_and_nothing_goes_to_zero() -> None:
    p = Policy(2, 5, target=1, average_window=0, down_delay=0, idle_before_zero=1)
    ds = run(p, [(0, Readings(pods(0, 0))), (1000, Readings(pods(0, 0)))], 3)
    assert [d.replicas for d in ds] == [2, 2]
    # Below the minimum (someone scaled it down): back up at once.
    assert decide(Readings(()), State(), p, 0, T0).replicas == 2


def test_scale_to_zero_after_idle_and_back_on_held_requests() -> None:
    p = Policy(0, 3, target=1, average_window=0, down_delay=0, idle_before_zero=60)
    idle = Readings(pods(0, counts=(5,)))
    ds = run(p, [(0, idle), (30, idle), (59, idle), (61, idle)], 1)
    assert [d.replicas for d in ds] == [1, 1, 1, 0]
    assert "no requests for 61s" in ds[-1].reason
    assert ds[-1].state.last_active_time == at(0)
    # At zero with nothing held: stays at zero.
    d = decide(Readings((), held=0), ds[-1].state, p, 0, at(70))
    assert (d.replicas, d.reason) == (0, "scaled to zero; no requests")
    # A request held at the router: at least one at once (no stabilization, no delay).
    d = decide(Readings((), held=1), d.state, p, 0, at(80))
    assert d.replicas == 1 and "held at the router" in d.reason
    assert d.state.cold_start_since == at(80)


def test_a_scale_up_from_zero_by_the_router_is_not_undone_while_its_pod_starts() -> None:
    p = Policy(0, 3, target=1, average_window=0, down_delay=0, idle_before_zero=60)
    at_zero = run(p, [(0, Readings(pods(0, counts=(5,)))), (61, Readings(pods(0, counts=(5,))))], 1)
    assert at_zero[-1].replicas == 0
    # The router scaled to 1 for a held request (the operator did not read the router):
    # while no pod is ready, nothing is idle, however long ago the last request was.
    d = decide(Readings(()), at_zero[-1].state, p, 1, at(200))
    assert d.replicas == 1 and d.state.cold_start_since == at(200)
    d = decide(Readings(()), d.state, p, 1, at(230))
    assert d.replicas == 1
    # The pod is ready and serves the request; idle counts from then.
    d = decide(Readings(pods(1, counts=(0,))), d.state, p, 1, at(240))
    assert d.replicas == 1 and d.state.cold_start_since is None
    d = decide(Readings(pods(0, counts=(1,))), d.state, p, 1, at(250))
    d = decide(Readings(pods(0, counts=(1,))), d.state, p, 1, at(311))
    assert d.replicas == 0


def test_requests_between_readings_keep_the_fleet_from_zero() -> None:
    p = Policy(0, 3, target=1, average_window=0, idle_before_zero=60)
    # No load at any reading, but the finished-request counter moves: not idle.
    ds = run(p, [(0, Readings(pods(0, counts=(1,)))), (50, Readings(pods(0, counts=(2,)))),
                 (100, Readings(pods(0, counts=(2,)))), (111, Readings(pods(0, counts=(2,))))], 1)
    assert [d.replicas for d in ds] == [1, 1, 1, 0]
    assert ds[2].state.last_active_time == at(50)


def test_unread_pods_are_missing_readings_never_zeros() -> None:
    p = Policy(0, 6, target=1, average_window=0, down_delay=0, idle_before_zero=1)
    # One of three unread: the two read stand for it (4 + 2 -> 9 over three pods).
    d = decide(Readings(pods(4, 2, None)), State(), p, 3, T0)
    assert d.load == 9 and d.replicas == 6 and (d.pods_read, d.ready_pods) == (2, 3)
    # None read: no decision, even with the router saying nothing is held.
    before = State(average=1.0, observed_at=T0)
    d = decide(Readings(pods(None, None), held=0), before, p, 2, at(100))
    assert d.replicas == 2 and "unreadable" in d.reason and d.load is None
    assert d.state.average == 1.0 and d.state.observed_at == T0
    # An unread pod is never taken for idleness.
    ds = run(p, [(0, Readings(pods(0, None))), (100, Readings(pods(0, None)))], 1)
    assert [d.replicas for d in ds] == [1, 1]


def test_state_survives_an_operator_restart_through_status() -> None:
    p = Policy(0, 4, target=1, average_window=30, down_delay=60, idle_before_zero=600)
    d = decide(Readings(pods(0, 0, counts=(3, 4))), State(average=2.5, observed_at=at(-10)),
               p, 3, T0)
    assert d.state.down_since == T0
    restored = State.from_status(d.to_status())
    assert restored == d.state
    # ...and the countdown continues from it, as if the operator had never stopped.
    d2 = decide(Readings(pods(0, 0, counts=(3, 4))), restored, p, 3, at(60))
    assert "scaling down" in d2.reason
    assert State.from_status({"averageLoad": "x", "upSince": "yesterday"}) == State()


def test_cold_start_is_timed_to_the_first_ready_pod() -> None:
    p = Policy(0, 3, target=1, average_window=0)
    at_zero = State(last_replicas=0)
    # The router scaled 0 -> 1 between readings: the timer notices at its next reading.
    d = decide(Readings((), held=1), at_zero, p, 1, at(10))
    assert d.state.cold_start_since == at(10) and d.state.cold_start_seconds is None
    ready = PodLoad("p0", 1.0, 0.0, ready_since=at(42.5))
    d = decide(Readings((ready,), held=0), d.state, p, 1, at(45))
    assert d.state.cold_start_seconds == 32.5 and d.state.cold_start_since is None
    assert d.to_status()["coldStartSeconds"] == 32.5


def test_policy_target_defaults_to_the_planned_batch() -> None:
    s = parse_spec({**EMBEDDED, "scaling": {"maxReplicas": 3, "scaleDownDelay": "2m"}}).scaling
    p = Policy.from_spec(s, default_target=8)
    assert (p.target, p.down_delay, p.idle_before_zero, p.average_window) == (8, 120, 900, 30)
    s = parse_spec({**EMBEDDED, "scaling": {"maxReplicas": 3,
                                            "targetInFlightPerReplica": 2}}).scaling
    assert Policy.from_spec(s, default_target=8).target == 2


# --- reading the pods (llamafleet.operator.scaling_loop) ----------------------------------------


def _pod(name: str, ready: str = "True", ip: str | None = "10.0.0.5", ports=(("http", 16070),),
         deleting: bool = False) -> dict:
    meta = {"name": name, **({"deletionTimestamp": "2026-01-01T00:00:00Z"} if deleting else {})}
    status = {"conditions": [{"type": "Ready", "status": ready,
                              "lastTransitionTime": "2026-01-01T00:00:05Z"}]}
    if ip:
        status["podIP"] = ip
    return {"metadata": meta, "spec": {"containers": [{"name": "server", "ports": [
        {"name": n, "containerPort": p} for n, p in ports]}]}, "status": status}


def test_only_ready_pods_with_an_ip_are_read_on_their_named_port() -> None:
    from llamafleet.operator.scaling_loop import ready_targets

    targets = ready_targets([
        _pod("a"), _pod("b", ready="False"), _pod("c", ip=None), _pod("d", deleting=True),
        _pod("e", ports=(("grpc", 1), ("http", 8080))), _pod("f", ip="fd00::1", ports=())],
        "http", 16073)
    assert [(t.name, t.url) for t in targets] == [
        ("a", "http://10.0.0.5:16070"), ("e", "http://10.0.0.5:8080"), ("f", "http://[fd00::1]:16073")]
    assert targets[0].ready_since == at(5)


def test_prometheus_samples_are_summed_over_labels() -> None:
    from llamafleet.inference.metrics import Metrics
    from llamafleet.operator.scaling_loop import FINISHED, QUEUED, RUNNING, sums
    from prometheus_client import generate_latest

    m = Metrics()  # the pod's own series, so a renamed one fails here
    m.running.set(2)
    m.queued.set(3)
    m.requests.labels("chat", "ok", "stop").inc(4)
    m.requests.labels("completions", "error", "").inc()
    text = generate_latest(m.registry).decode()
    assert sums(text, (RUNNING, QUEUED, FINISHED)) == {RUNNING: 2, QUEUED: 3, FINISHED: 5}


def test_router_hold_gauge_name_is_the_routers() -> None:
    from llamafleet.operator.scaling_loop import HELD, sums
    from llamafleet.router.metrics import RouterMetrics
    from prometheus_client import generate_latest

    m = RouterMetrics()
    m.held.set(7)
    assert sums(generate_latest(m.registry).decode(), (HELD,)) == {HELD: 7}


async def test_a_pod_that_does_not_answer_is_a_missing_reading() -> None:
    import httpx
    from llamafleet.operator.scaling_loop import Target, read_held, read_pod

    from tests.support.servers import free_port

    dead = Target("gone", f"http://127.0.0.1:{free_port()}", None)  # nothing listens there
    async with httpx.AsyncClient(timeout=1) as client:
        load = await read_pod(client, dead, {})
        assert load.in_flight is None and load.name == "gone"
        assert await read_held(client, [dead], {}) is None
        assert await read_held(client, [], {}) is None


def test_pods_and_routers_are_listed_by_their_own_selectors() -> None:
    from types import SimpleNamespace

    from llamafleet.operator import builders as B
    from llamafleet.operator import scaling_loop

    asked: list[str] = []

    def get(namespace: str, label_selector: str):
        asked.append(label_selector)
        return SimpleNamespace(to_dict=lambda: {"items": []})

    dyn = SimpleNamespace(resources=SimpleNamespace(get=lambda **_: SimpleNamespace(get=get)))
    names = B.Names("chat", "team-a")
    scaling_loop._list_pods(dyn, names, "inference")
    scaling_loop._list_pods(dyn, names, "router")
    parse = [dict(t.split("=") for t in s.split(",")) for s in asked]
    assert parse == [B.pod_selector_labels("chat"), B.router_selector_labels("chat")]
