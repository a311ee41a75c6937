"""The step profile against the fake model boundary: every step counted once, its parts
where they belong, nothing wrapped when it is off."""

from __future__ import annotations

import time
from collections.abc import Sequence

from llamafleet.inference import profiling
from llamafleet.inference.engine import Engine, Finished

from tests.support.fake_backend import FakeBackend, make_engine, submit

DECODE_S = 0.003


class SlowDecode(FakeBackend):
    """Each decode does DECODE_S of work (the time under test), each sample none."""

    def decode(self, tokens: Sequence[int], pos: Sequence[int], seq: Sequence[int],
               logits: Sequence[bool]) -> None:
        end = time.perf_counter() + DECODE_S
        while time.perf_counter() < end:
            pass
        super().decode(tokens, pos, seq, logits)


def _profiled(backend: FakeBackend) -> tuple[Engine, profiling.StepProfile]:
    eng = Engine(backend, max_batch_size=4, queue_size=8, context_size=64)
    prof = profiling.install(eng)
    eng.start()
    return eng, prof


def test_every_step_is_counted_once_with_decode_time_in_decode() -> None:
    be = SlowDecode()
    eng, prof = _profiled(be)
    a = submit(eng, [1, 2, 3], max_tokens=6, ignore_eos=True)
    b = submit(eng, [7, 8], max_tokens=6, ignore_eos=True)
    assert a.done.wait(10) and b.done.wait(10)
    s = prof.summary()  # while the engine thread (whose CPU time it reads) still runs
    eng.stop()
    assert isinstance(a.final, Finished) and isinstance(b.final, Finished)
    allsteps = s["all_steps"]
    # the last step closed when the engine went idle, not at some later step
    assert allsteps["steps"] == len(be.batches)
    assert allsteps["batch_tokens"] == sum(len(t) for t, *_ in be.batches)
    parts = allsteps["parts_ms_per_step"]
    assert set(parts) == set(profiling.PARTS)
    assert parts["decode"] >= DECODE_S * 1e3 * 0.95
    assert parts["decode"] > parts["sample"] and parts["decode"] > parts["other"]
    assert abs(sum(parts.values()) - allsteps["ms_per_step"]) < 0.01
    # pure decode steps of both sequences, keyed by batch size
    pure = [t for t, *_ in be.batches if len(t) == 2]
    assert s["decode_steps_by_batch"]["2"]["steps"] == len(pure) > 0
    assert s["thread_cpu_s"]["engine"] >= 0


def test_sampler_errors_and_idle_time_do_not_count_as_steps() -> None:
    be = FakeBackend(refused_grammar="root ::= bad")
    eng, prof = _profiled(be)
    bad = submit(eng, [1, 2], grammar="root ::= bad")
    assert bad.done.wait(5)
    first = submit(eng, [1, 2], max_tokens=2, ignore_eos=True)
    assert first.done.wait(5)
    idle_until = time.perf_counter() + 0.1  # the engine idles meanwhile
    while time.perf_counter() < idle_until:
        pass
    second = submit(eng, [1, 2], max_tokens=2, ignore_eos=True)
    assert second.done.wait(5)
    eng.stop()
    s = prof.summary()["all_steps"]
    assert s["steps"] == len(be.batches) == 4  # a prefill and a decode step each
    assert s["ms_per_step"] * s["steps"] < 50  # the 100 ms idle is in no step


def test_off_means_nothing_is_wrapped() -> None:
    be = FakeBackend()
    eng = make_engine(be)
    assert eng.backend is be and not isinstance(eng.observer, profiling._TimedObserver)
    eng.stop()
