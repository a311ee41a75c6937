"""Admission by priority and by tenant: the waiting room (admission.FairQueue) alone, then the
engine over the fake model boundary (priority first; a tenant below its fair share preempts a
flooding one, whose preempted sequence resumes where it stopped)."""

from __future__ import annotations

import itertools
import threading

from llamafleet.inference.admission import FairQueue, fair_share
from llamafleet.inference.engine import Finished, GenerationRequest, SamplingParams, Started

from tests.support.fake_backend import Collector, FakeBackend, make_engine
from tests.support.servers import wait_until


class Item:
    def __init__(self, name: str, tenant: str = "", priority: int = 0):
        self.name, self.tenant, self.priority = name, tenant, priority

    def __repr__(self) -> str:
        return self.name


def classify(item: object) -> tuple[int, str] | None:
    return (item.priority, item.tenant) if isinstance(item, Item) else None


def drain(q: FairQueue) -> list[str]:
    out = []
    while not q.empty():
        out.append(repr(q.get_nowait()))
    return out


def test_one_tenant_one_priority_is_first_in_first_out() -> None:
    q = FairQueue(0, classify)
    for i in range(5):
        q.put(Item(f"r{i}"))
    assert drain(q) == ["r0", "r1", "r2", "r3", "r4"]


def test_higher_priority_first_then_tenants_in_turn_not_by_arrival() -> None:
    q = FairQueue(0, classify)
    for i in range(4):
        q.put(Item(f"a{i}", "a"))
    q.put(Item("b0", "b"))
    q.put(Item("c0", "c"))
    q.put(Item("b1", "b"))
    q.put(Item("urgent", "c", priority=5))
    assert drain(q) == ["urgent", "a0", "b0", "c0", "a1", "b1", "a2", "a3"]


def test_the_tenant_with_fewest_running_goes_first() -> None:
    q = FairQueue(0, classify)
    running = {"a": 3, "b": 0}
    q.running_of = lambda t: running.get(t, 0)
    q.put(Item("a0", "a"))
    q.put(Item("b0", "b"))
    assert repr(q.peek()) == "b0"
    assert drain(q) == ["b0", "a0"]


def test_control_items_first_put_front_beyond_maxsize_snapshot_and_remove() -> None:
    q = FairQueue(3, classify)
    q.put(Item("a0", "a"))
    q.put(Item("a1", "a"))
    stop = object()
    q.put(stop)
    assert q.full()
    q.put_front(Item("back", "a"))  # a preempted sequence: never refused
    assert sorted(map(repr, q.snapshot())) == ["a0", "a1", "back"]
    assert [repr(i) for i in q.remove_if(lambda i: i.name == "a0")] == ["a0"]
    assert q.qsize() == 3  # a1, back and the control item
    assert q.get_nowait() is stop
    assert drain(q) == ["back", "a1"]
    assert q.peek() is None


def test_fair_share() -> None:
    assert fair_share(4, 1) == 4 and fair_share(4, 2) == 2 and fair_share(4, 3) == 1
    assert fair_share(2, 5) == 1 and fair_share(8, 0) == 8


class Order:
    """Collectors that also record, across requests, the order of their events."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def collector(self, name: str) -> Collector:
        order = self

        class Named(Collector):
            def __call__(self, ev) -> None:
                with order.lock:
                    order.log.append((name, type(ev).__name__))
                super().__call__(ev)

        return Named()

    def first(self, kind: str) -> list[str]:
        return [n for n, k in self.log if k == kind]


class StepGate:
    """FakeBackend.gate that lets ``steps`` decodes through, then holds every decode until
    :meth:`set`."""

    def __init__(self, steps: int):
        self.steps = steps
        self.opened = threading.Event()
        self.held = threading.Event()  # a decode waits at the gate
        self.lock = threading.Lock()

    def wait(self, timeout: float) -> bool:
        with self.lock:
            if self.steps > 0:
                self.steps -= 1
                return True
        self.held.set()
        return self.opened.wait(timeout)

    def set(self) -> None:
        self.opened.set()


def request(prompt: list[int], c: Collector, max_tokens: int, tenant: str = "",
            priority: int = 0) -> GenerationRequest:
    return GenerationRequest(prompt, SamplingParams(max_tokens=max_tokens), c, tenant=tenant,
                             priority=priority)


def test_higher_priority_is_admitted_before_lower_ones_that_queued_earlier() -> None:
    be = FakeBackend()
    eng = make_engine(be, max_batch_size=1)
    order = Order()
    be.gate = threading.Event()  # the first request holds the only slot
    busy = order.collector("busy")
    eng.submit(request([1], busy, 4))
    wait_until(lambda: eng.running == 1, timeout=5)
    for name, prio in (("low0", 0), ("low1", 0), ("high", 5), ("mid", 2)):
        eng.submit(request([10], order.collector(name), 2, tenant="t", priority=prio))
    be.gate.set()
    wait_until(lambda: len(order.first("Finished")) == 5, timeout=10)
    eng.stop()
    assert order.first("Started") == ["busy", "high", "mid", "low0", "low1"]


def test_a_tenant_below_its_fair_share_preempts_a_flooding_one() -> None:
    """Tenant a holds both slots with long generations and has more waiting; tenant b's short
    request is admitted at once (a's youngest decoding sequence is preempted) and finishes
    before any of a's. The preempted sequence resumes where it stopped: every a request
    still gets exactly the tokens it would have alone."""
    be = FakeBackend()
    eng = make_engine(be, max_batch_size=2, queue_size=8, context_size=512)
    order = Order()
    a = [order.collector(f"a{i}") for i in range(3)]
    be.gate = gate = StepGate(6)
    eng.submit(request([10], a[0], 200, tenant="a"))
    eng.submit(request([20], a[1], 200, tenant="a"))
    assert gate.held.wait(5)
    assert eng.running == 2 and all(len(c.events) > 1 for c in a[:2])  # both decoding
    eng.submit(request([30], a[2], 200, tenant="a"))
    b = order.collector("b")
    eng.submit(request([40], b, 3, tenant="b"))
    be.gate.set()
    for c in (b, *a):
        assert c.done.wait(20)
    eng.stop()
    assert order.first("Finished")[0] == "b"
    assert eng.preemptions >= 1
    assert b.text == "41 42 43 "
    for c, start in zip(a, (10, 20, 30), strict=True):
        assert c.final == Finished("length", 1, 200)
        assert c.text == "".join(f"{t} " for t in range(start + 1, start + 201))
        assert sum(isinstance(e, Started) for e in c.events) == 1


def test_without_tenants_nothing_is_preempted() -> None:
    be = FakeBackend()
    eng = make_engine(be, max_batch_size=2, queue_size=8, context_size=512)
    cs = [Collector() for _ in range(4)]
    be.gate = gate = StepGate(6)
    for i, c in enumerate(cs[:2]):
        eng.submit(request([10 * (i + 1)], c, 50))
    assert gate.held.wait(5)
    for i, c in enumerate(cs[2:]):
        eng.submit(request([30 + 10 * i], c, 3))
    gate.set()
    for c in cs:
        assert c.done.wait(20)
    eng.stop()
    assert eng.preemptions == 0


def test_a_prefilling_sequence_is_preempted_too_and_prefills_again() -> None:
    """Tenant a's two long prompts are still prefilling (8 batch tokens a step) when b's
    request comes: one of them gives way at once, and later finishes its prompt and its
    tokens as if nothing happened."""
    be = FakeBackend()
    eng = make_engine(be, max_batch_size=2, queue_size=8, context_size=512)
    order = Order()
    a = [order.collector(f"a{i}") for i in range(2)]
    be.gate = gate = StepGate(2)
    for i, c in enumerate(a):
        eng.submit(request(list(range(100 * (i + 1), 100 * (i + 1) + 40)), c, 5, tenant="a"))
    assert gate.held.wait(5)
    assert eng.running == 2 and not any(len(c.events) > 1 for c in a)  # both prefilling
    b = order.collector("b")
    eng.submit(request([40, 41], b, 3, tenant="b"))
    gate.set()
    for c in (b, *a):
        assert c.done.wait(20)
    eng.stop()
    assert order.first("Finished")[0] == "b" and eng.preemptions >= 1
    # b started before either a had a token: it took a prefilling sequence's slot.
    assert order.log.index(("b", "Started")) < min(
        order.log.index((n, "TextDelta")) for n in ("a0", "a1"))
    for i, c in enumerate(a):
        first = 100 * (i + 1) + 40
        assert c.final == Finished("length", 40, 5)
        assert c.text == "".join(f"{t} " for t in range(first, first + 5))


def test_newcomers_of_many_tenants_never_hold_a_decoding_sequence_two_steps() -> None:
    """Each newcomer of another tenant is hurried, and its last prompt chunk goes without the
    decoding sequences; with a newcomer in every step, tenant a's stream would stop. It
    misses at most one step in two."""
    be = FakeBackend()
    eng = make_engine(be, max_batch_size=2, queue_size=16, context_size=512)
    a = Collector()
    be.gate = gate = StepGate(2)  # a's prompt, then one decode step
    eng.submit(request([10], a, 200, tenant="a"))
    assert gate.held.wait(5)
    newcomers = [Collector() for _ in range(8)]
    for i, c in enumerate(newcomers):
        eng.submit(request([1000 + 10 * i, 1001 + 10 * i, 1002 + 10 * i], c, 1, tenant=f"t{i}"))
    gate.set()
    for c in newcomers:
        assert c.done.wait(20)
    a.done.wait(20)
    eng.stop()
    # From the first newcomer's prefill to the last one's: which steps decoded a's token.
    steps = [b for b in be.batches if any(t >= 1000 for t in b[0])]
    assert len(steps) == len(newcomers)
    first, last = be.batches.index(steps[0]), be.batches.index(steps[-1])
    with_a = [any(t < 1000 for t in b[0]) for b in be.batches[first:last + 1]]
    assert not all(with_a)  # some newcomer went alone (its first token as fast as alone)
    assert all(x or y for x, y in itertools.pairwise(with_a))  # never two steps without a
