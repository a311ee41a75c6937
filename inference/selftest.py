"""Start-up self-test: decode a few tokens before the pod reports ready.

A llama.cpp build that cannot run on the machine at hand (an AMX kernel that faults, a
CUDA build for another architecture, a broken driver) should fail its start-up probe,
not the first user. ``llamafleet serve`` runs :func:`self_test` on the engine's backend
after the model loads and before ``/ready`` turns true. A failure raises
:class:`SelfTestFailed` (the server exits 1 with the message); a crash inside llama.cpp
kills the process before it ever reports ready, and the last log line names the test.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from .engine import Backend, SamplingParams

log = logging.getLogger(__name__)

SELF_TEST_TOKENS = 4
GREEDY = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)


class SelfTestFailed(Exception):
    """The model loaded but cannot decode on this machine; the message says what failed."""


@dataclass(frozen=True)
class SelfTestResult:
    tokens: tuple[int, ...]
    seconds: float


def self_test(backend: Backend, prompt: Sequence[int], n_tokens: int = SELF_TEST_TOKENS,
              seq_id: int = 0) -> SelfTestResult:
    """Prefill ``prompt`` and greedily decode ``n_tokens`` one row at a time on ``seq_id``,
    checking every logits row is finite; leave the sequence empty. It uses the backend
    directly: run it as ``Engine.start(startup=...)``, on the engine thread before its loop
    (a decode from any other thread slows every later step; Engine.start says why)."""
    if not prompt:
        raise SelfTestFailed("self-test: the prompt tokenised to nothing")
    log.info("start-up self-test: decoding %d tokens on this machine's llama.cpp build "
             "(a crash here means the build cannot run on this CPU/GPU)", n_tokens)
    start = time.monotonic()
    sampler = backend.new_sampler(GREEDY)
    out: list[int] = []
    try:
        tokens, pos = list(prompt), list(range(len(prompt)))
        for _ in range(n_tokens):
            last = len(tokens) - 1
            try:
                backend.decode(tokens, pos, [seq_id] * len(tokens),
                               [i == last for i in range(len(tokens))])
            except Exception as e:
                raise SelfTestFailed(f"self-test: llama_decode failed: {e}") from e
            bad = backend.logits_nonfinite(last)
            if bad:
                raise SelfTestFailed(
                    f"self-test: {bad} of the model's logits are NaN or infinite after "
                    f"{len(out)} generated tokens; this llama.cpp build computes wrong "
                    "results on this machine")
            token = backend.sample(sampler, last)
            out.append(token)
            tokens, pos = [token], [pos[-1] + 1]
    finally:
        backend.free_sampler(sampler)
        backend.clear_sequence(seq_id)
    result = SelfTestResult(tuple(out), time.monotonic() - start)
    log.info("start-up self-test passed: %d tokens in %.0f ms", n_tokens, result.seconds * 1e3)
    return result
