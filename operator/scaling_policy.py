"""The builtin autoscaler as a pure function: load readings + previous state -> replicas.

The operator's timer (llamafleet.operator.scaling_loop) reads the world, calls :func:`decide`
and writes the result; nothing here talks to the API server or reads the clock.

The load is the in-flight requests (running + queued) of the ready pods plus the requests
the router holds. Its moving average (an exponential one, time constant ``averageWindow``)
gives the recommendation ``ceil(average / target)``, clamped to
``[max(minReplicas, 1), maxReplicas]``. As with a HorizontalPodAutoscaler's stabilization
windows:

- up: once the recommendation has stayed above the current replicas for
  ``scaleUpStabilization`` (0s: at once), scale to the lowest recommendation of that time;
- down: once it has stayed below them for ``scaleDownDelay``, scale to the highest
  recommendation of that time (each step down waits a full delay again);
- zero: with ``minReplicas`` 0, after ``idleBeforeZero`` without any request (no load, and
  no pod's finished-request counter moved between readings);
- from zero: requests held at the router bring at least one replica back at once.

A pod whose metrics could not be read is a missing reading, never a zero: the others'
average stands in for it, and the fleet never goes to zero while any ready pod is unread.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .spec import Scaling

_EPSILON = 1e-9  # float noise must not add a replica: ceil(2.0000000001) is 3


@dataclass(frozen=True)
class Policy:
    """spec.scaling with durations in seconds and the target resolved."""

    min_replicas: int
    max_replicas: int
    target: int
    average_window: float = 30.0
    up_stabilization: float = 0.0
    down_delay: float = 300.0
    idle_before_zero: float = 900.0

    @classmethod
    def from_spec(cls, scaling: Scaling, default_target: int) -> Policy:
        """``default_target``: the planned max_batch_size, when the spec names no target."""
        return cls(scaling.minReplicas, scaling.maxReplicas,
                   scaling.targetInFlightPerReplica or max(1, default_target),
                   scaling.seconds("averageWindow"), scaling.seconds("scaleUpStabilization"),
                   scaling.seconds("scaleDownDelay"), scaling.seconds("idleBeforeZero"))


@dataclass(frozen=True)
class PodLoad:
    """One ready pod. ``in_flight`` None: its metrics could not be read."""

    name: str
    in_flight: float | None = None  # llamafleet_running_sequences + llamafleet_queue_depth
    requests_total: float | None = None  # llamafleet_requests_total, all labels summed
    ready_since: dt.datetime | None = None  # its Ready condition's lastTransitionTime


@dataclass(frozen=True)
class Readings:
    pods: Sequence[PodLoad] = ()
    held: float | None = None  # the routers' hold queues summed; None: no router read


@dataclass(frozen=True)
class State:
    """What the autoscaler remembers between readings (kept in status.autoscaling)."""

    average: float | None = None
    observed_at: dt.datetime | None = None
    last_scale_time: dt.datetime | None = None
    last_active_time: dt.datetime | None = None
    up_since: dt.datetime | None = None
    up_floor: int | None = None
    down_since: dt.datetime | None = None
    down_ceiling: int | None = None
    request_counts: Mapping[str, float] = field(default_factory=dict)
    last_replicas: int | None = None
    cold_start_since: dt.datetime | None = None
    cold_start_seconds: float | None = None

    def to_status(self) -> dict[str, Any]:
        """status.autoscaling fields (camelCase, RFC 3339 times); unset ones are null, so
        that a merge patch clears them."""
        def stamp(t: dt.datetime | None) -> str | None:
            return t.astimezone(dt.UTC).isoformat().replace("+00:00", "Z") if t else None

        return {
            "averageLoad": self.average,
            "observedAt": stamp(self.observed_at), "lastScaleTime": stamp(self.last_scale_time),
            "lastActiveTime": stamp(self.last_active_time), "upSince": stamp(self.up_since),
            "upFloor": self.up_floor, "downSince": stamp(self.down_since),
            "downCeiling": self.down_ceiling, "requestCounts": dict(self.request_counts),
            "lastReplicas": self.last_replicas, "coldStartSince": stamp(self.cold_start_since),
            "coldStartSeconds": self.cold_start_seconds,
        }

    @classmethod
    def from_status(cls, status: Mapping[str, Any] | None) -> State:
        """The state written by :meth:`to_status`; anything unreadable starts afresh."""
        s = dict(status or {})

        def time(key: str) -> dt.datetime | None:
            try:
                return dt.datetime.fromisoformat(str(s[key]).replace("Z", "+00:00"))
            except (KeyError, ValueError, TypeError):
                return None

        def number(key: str, kind: type = float) -> Any:
            try:
                return None if s.get(key) is None else kind(s[key])
            except (ValueError, TypeError):
                return None

        counts = s.get("requestCounts") if isinstance(s.get("requestCounts"), dict) else {}
        return cls(number("averageLoad"), time("observedAt"), time("lastScaleTime"),
                   time("lastActiveTime"), time("upSince"), number("upFloor", int),
                   time("downSince"), number("downCeiling", int),
                   {str(k): float(v) for k, v in counts.items() if isinstance(v, (int, float))},
                   number("lastReplicas", int), time("coldStartSince"),
                   number("coldStartSeconds"))


@dataclass(frozen=True)
class Decision:
    replicas: int  # what spec.replicas should be (== current: no change)
    reason: str
    state: State
    load: float | None  # this reading's load (None: nothing could be read)
    recommendation: int  # ceil(average / target), clamped to [max(min, 1), max]
    pods_read: int = 0
    ready_pods: int = 0
    held: float | None = None

    def to_status(self) -> dict[str, Any]:
        return {**self.state.to_status(), "desiredReplicas": self.replicas, "reason": self.reason,
                "observedLoad": self.load, "heldRequests": self.held,
                "podsRead": self.pods_read, "readyPods": self.ready_pods}


def _seconds(a: dt.datetime, b: dt.datetime | None) -> float:
    return (a - b).total_seconds() if b is not None else 0.0


def _fmt(x: float) -> str:
    return f"{x:.2f}".rstrip("0").rstrip(".")


def decide(readings: Readings, state: State, policy: Policy, current: int,
           now: dt.datetime) -> Decision:
    """The replicas this LLMService should have now, why, and the state to keep."""
    pods = list(readings.pods)
    read = [p for p in pods if p.in_flight is not None]
    unread = len(pods) - len(read)
    held = readings.held or 0.0
    state = _cold_start(state, pods, current, now)

    if pods and not read:
        # No pod could be read: hold still, and learn nothing from it (the router's count
        # alone would read as an idle fleet).
        return Decision(current, f"metrics of all {len(pods)} ready pods unreadable; keeping "
                        f"{current}", replace(state, last_replicas=current), None,
                        current, 0, len(pods), readings.held)

    # The unread pods count as the average of the read ones (none read: only the router's).
    pod_load = sum(p.in_flight or 0.0 for p in read)
    if read and unread:
        pod_load *= len(pods) / len(read)
    load = pod_load + held

    # Activity: load now, a request finished since the last reading, a pod not read, or a
    # scale-up from zero whose pods are not ready yet (the router's, for a held request: its
    # request reaches a pod only once one is ready, so the fleet is not idle before that).
    counts = {p.name: p.requests_total for p in read if p.requests_total is not None}
    moved = any(c > state.request_counts.get(name, c) for name, c in counts.items())
    starting = state.cold_start_since is not None
    active = load > 0 or moved or unread > 0 or starting
    last_active = now if active or state.last_active_time is None else state.last_active_time

    if state.average is None or state.observed_at is None or policy.average_window <= 0:
        average = load
    else:
        alpha = 1 - math.exp(-max(0.0, _seconds(now, state.observed_at)) / policy.average_window)
        average = state.average + alpha * (load - state.average)
    floor = max(policy.min_replicas, 1)
    recommendation = min(max(math.ceil(average / policy.target - _EPSILON), floor),
                         policy.max_replicas)
    state = replace(state, average=average, observed_at=now, last_active_time=last_active,
                    request_counts=counts)

    def result(replicas: int, reason: str, st: State) -> Decision:
        if replicas != current:
            st = replace(st, last_scale_time=now, up_since=None, up_floor=None, down_since=None,
                         down_ceiling=None)
            if current == 0:
                st = replace(st, cold_start_since=now)
        return Decision(replicas, reason, replace(st, last_replicas=replicas), load,
                        recommendation, len(read), len(pods), readings.held)

    inputs = f"load {_fmt(load)}, average {_fmt(average)}, target {policy.target}/replica"

    if current == 0:
        if held > 0 or active:
            return result(recommendation, f"requests while scaled to zero ({_fmt(held)} held "
                          f"at the router); {inputs}", state)
        if policy.min_replicas == 0:
            return result(0, "scaled to zero; no requests", state)
        return result(recommendation, f"below minReplicas ({policy.min_replicas}); {inputs}",
                      state)

    if policy.min_replicas == 0 and not active:
        idle = _seconds(now, last_active)
        if idle >= policy.idle_before_zero:
            return result(0, f"no requests for {_fmt(idle)}s (idleBeforeZero "
                          f"{_fmt(policy.idle_before_zero)}s): scaling to zero", state)

    if recommendation > current:
        since = state.up_since or now
        floor_up = min(state.up_floor or recommendation, recommendation)
        state = replace(state, up_since=since, up_floor=floor_up, down_since=None,
                        down_ceiling=None)
        waited = _seconds(now, since)
        if waited >= policy.up_stabilization:
            return result(floor_up, f"scaling up {current} -> {floor_up}; {inputs}", state)
        return result(current, f"scale-up to {floor_up} waits for scaleUpStabilization "
                      f"({_fmt(waited)}s of {_fmt(policy.up_stabilization)}s); {inputs}", state)

    if recommendation < current:
        since = state.down_since or now
        ceiling = max(state.down_ceiling or recommendation, recommendation)
        state = replace(state, down_since=since, down_ceiling=ceiling, up_since=None,
                        up_floor=None)
        waited = _seconds(now, since)
        if waited >= policy.down_delay:
            return result(ceiling, f"scaling down {current} -> {ceiling} after "
                          f"{_fmt(waited)}s of lower load; {inputs}", state)
        return result(current, f"scale-down to {ceiling} waits for scaleDownDelay "
                      f"({_fmt(waited)}s of {_fmt(policy.down_delay)}s); {inputs}", state)

    state = replace(state, up_since=None, up_floor=None, down_since=None, down_ceiling=None)
    return result(current, f"steady at {current}; {inputs}", state)


def _cold_start(state: State, pods: Sequence[PodLoad], current: int, now: dt.datetime) -> State:
    """Scale-ups from zero (ours, or another writer's such as the router's, seen at the
    next reading) are timed until the first pod is Ready (its condition's transition time
    when known)."""
    if current > 0 and state.last_replicas == 0 and state.cold_start_since is None:
        state = replace(state, cold_start_since=now)
    if state.cold_start_since is None or current == 0:
        return replace(state, cold_start_since=None) if current == 0 else state
    if not pods:
        return state
    ready = min((p.ready_since or now for p in pods), default=now)
    seconds = max(0.0, _seconds(ready, state.cold_start_since))
    return replace(state, cold_start_since=None, cold_start_seconds=round(seconds, 3))
