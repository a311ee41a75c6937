"""Where an engine step's time goes (setting ``STEP_PROFILE``; off by default).

When on, :func:`install` wraps the engine's backend, its observer and its ``deliver`` hook
with timers. Nothing is wrapped when off, so it costs nothing then. Each step
(from one ``on_step`` to the next, closed early when the last sequence finishes and the
engine goes idle) is split into:

* ``batch``: filling the ``llama_batch`` from Python lists;
* ``decode``: ``llama_decode`` plus ``llama_synchronize``, so a GPU's asynchronous work is
  counted here rather than in the first logits read after it;
* ``sample``: logits to tokens for the whole batch (``sample_batch``: penalties, filters,
  the draw; a grammar's check);
* ``text``: token to bytes and end-of-generation checks;
* ``deliver``: handing a step's events to the event loops (once per step);
* ``admit``: creating and freeing samplers, clearing KV cells;
* ``other``: the rest of the engine's Python (scheduling, text assembly, bookkeeping).

Besides the step parts it reads the CPU time of the event loop thread (which writes the
SSE/gRPC frames) and of the engine thread from ``/proc``, over the same window.
``/info`` shows :meth:`StepProfile.summary`; ``llamafleet_engine_step_seconds_total``
counts the same parts for Prometheus.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PARTS = ("batch", "decode", "sample", "text", "deliver", "admit", "other")


def _thread_cpu_s(tid: int) -> float | None:
    """user + system CPU seconds of one thread of this process (Linux)."""
    try:
        fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Agg:
    __slots__ = ("steps", "tokens", "parts")

    def __init__(self) -> None:
        self.steps, self.tokens = 0, 0
        self.parts = dict.fromkeys(PARTS, 0.0)

    def as_dict(self) -> dict[str, Any]:
        n = max(self.steps, 1)
        total = sum(self.parts.values())
        return {"steps": self.steps, "batch_tokens": self.tokens,
                "ms_per_step": round(total / n * 1e3, 4),
                "parts_ms_per_step": {k: round(v / n * 1e3, 4) for k, v in self.parts.items()}}


class StepProfile:
    """Accumulates step parts on the engine thread; ``summary()`` may be read from any."""

    def __init__(self, metrics: Any = None):
        self.metrics = metrics
        self._lock = threading.Lock()
        self._cur = dict.fromkeys(PARTS, 0.0)
        self._open: tuple[float, int, int] | None = None  # (start, running, batch tokens)
        self._live = 0  # sequences holding a sampler
        self.all = _Agg()
        self.by_batch: dict[int, _Agg] = {}  # pure decode steps, by sequences in the batch
        self._engine_tid: int | None = None
        self._loop_tid: int | None = None
        self._t0 = time.monotonic()
        self._cpu0: dict[str, float | None] = {}

    # --- timers (engine thread) -----------------------------------------------------------

    def timed(self, part: str, fn: Callable) -> Callable:
        cur = self._cur

        def wrapper(*a: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                cur[part] += time.perf_counter() - t

        return wrapper

    def step(self, running: int, batch_tokens: int) -> None:
        """Called at each step's ``on_step``: closes the previous step, opens this one."""
        now = time.perf_counter()
        if self._engine_tid is None:
            self._engine_tid = threading.get_native_id()
            self._cpu0["engine"] = _thread_cpu_s(self._engine_tid)
        self._close(now)
        for k in self._cur:
            self._cur[k] = 0.0
        self._open = (now, running, batch_tokens)

    def _close(self, now: float) -> None:
        if self._open is None:
            return
        start, running, tokens = self._open
        self._open = None
        parts = dict(self._cur)
        parts["other"] = max(0.0, (now - start) - sum(parts.values()))
        with self._lock:
            aggs = [self.all]
            if tokens == running:
                aggs.append(self.by_batch.setdefault(running, _Agg()))
            for agg in aggs:
                agg.steps += 1
                agg.tokens += tokens
                for k, v in parts.items():
                    agg.parts[k] += v
        if self.metrics is not None:
            for k, v in parts.items():
                self.metrics.step_part_seconds.labels(k).inc(v)

    def sequence_started(self) -> None:
        self._live += 1

    def sequence_freed(self) -> None:
        self._live -= 1
        if self._live <= 0:  # the engine goes idle: the step ends here, not at the next one
            self._live = 0
            self._close(time.perf_counter())

    # --- reading ---------------------------------------------------------------------------

    def watch_loop_thread(self) -> None:
        """Call on the event loop's thread once: its CPU time is then reported."""
        if self._loop_tid is None:
            self._loop_tid = threading.get_native_id()
            self._cpu0["event_loop"] = _thread_cpu_s(self._loop_tid)

    def summary(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {
                "all_steps": self.all.as_dict(),
                "decode_steps_by_batch": {str(b): a.as_dict()
                                          for b, a in sorted(self.by_batch.items())}}
        wall = time.monotonic() - self._t0
        cpu = {}
        for name, tid in (("engine", self._engine_tid), ("event_loop", self._loop_tid)):
            now, before = (_thread_cpu_s(tid) if tid else None), self._cpu0.get(name)
            if now is not None and before is not None:
                cpu[name] = round(now - before, 3)
        out["thread_cpu_s"] = cpu
        out["wall_s"] = round(wall, 3)
        return out


class _TimedBackend:
    """The engine's backend with its calls timed; everything else passes through."""

    def __init__(self, backend: Any, prof: StepProfile):
        self._b, self._prof = backend, prof
        fill, run = getattr(backend, "fill_batch", None), getattr(backend, "decode_batch", None)
        sync = getattr(backend, "synchronize", None) or (lambda: None)
        if fill is not None and run is not None:
            timed_fill, timed_run = prof.timed("batch", fill), prof.timed("decode", run)
            timed_sync = prof.timed("decode", sync)

            def decode(tokens, pos, seq, logits) -> None:
                timed_fill(tokens, pos, seq, logits)
                timed_run()
                timed_sync()
        else:
            decode = prof.timed("decode", backend.decode)
        self.decode = decode
        self.sample = prof.timed("sample", backend.sample)
        self.sample_batch = prof.timed("sample", backend.sample_batch)
        self.token_bytes = prof.timed("text", backend.token_bytes)
        self.is_eog = prof.timed("text", backend.is_eog)
        self.clear_sequence = prof.timed("admit", backend.clear_sequence)
        self.trim_sequence = prof.timed("admit", backend.trim_sequence)
        new, free = prof.timed("admit", backend.new_sampler), prof.timed("admit", backend.free_sampler)

        def new_sampler(params):
            s = new(params)
            prof.sequence_started()
            return s

        def free_sampler(sampler) -> None:
            free(sampler)
            prof.sequence_freed()

        self.new_sampler, self.free_sampler = new_sampler, free_sampler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._b, name)


class _TimedObserver:
    def __init__(self, inner: Any, prof: StepProfile):
        self._inner, self._prof = inner, prof

    def on_step(self, running: int, batch_tokens: int, queued: int, kv_tokens: int) -> None:
        self._prof.step(running, batch_tokens)
        self._inner.on_step(running, batch_tokens, queued, kv_tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def install(engine: Any, metrics: Any = None) -> StepProfile:
    """Wrap a not yet started engine's backend, observer and event hand-over with a new
    :class:`StepProfile`."""
    prof = StepProfile(metrics)
    engine.backend = _TimedBackend(engine.backend, prof)
    engine.cache.backend = engine.backend
    engine.observer = _TimedObserver(engine.observer, prof)
    engine._deliver = prof.timed("deliver", engine._deliver)
    return prof


def wrap_bridge(bridge: Any, prof: StepProfile) -> None:
    """Read the CPU time of this bridge's event loop thread (it is created on that thread)."""
    prof.watch_loop_thread()
