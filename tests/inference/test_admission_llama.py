"""Preemption for a tenant's fair share on the real model (Gemma 3 270M, llama.cpp): the
preempted sequence's cells go to the host prompt cache and come back, and it goes on from
where it stopped. (The exact token stream through a preemption is the scheduler's test,
tests/inference/test_admission.py; llama.cpp does not promise bitwise equal logits from a
restored state, test_prompt_cache.py, so greedy text past the resume may drift here.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from llamafleet.inference.engine import Engine, GenerationRequest, SamplingParams, TextDelta
from llamafleet.inference.llama_backend import LlamaBackend, LlamaModel
from llamafleet.inference.prompt_cache import PromptCache

from tests.support.fake_backend import Collector
from tests.support.servers import wait_until

pytestmark = pytest.mark.integration

PROMPTS = {"a0": "The history of the lighthouse begins",
           "a1": "A short guide to growing tomatoes in a small garden",
           "b": "Three facts about the moon:"}


def _run(model: LlamaModel, jobs: list[tuple[str, str, int]], flood: bool
         ) -> tuple[dict, Engine]:
    """Each job (name, tenant, max_tokens), greedy; with ``flood``, b is submitted once both
    a's decode, so that it finds every slot taken."""
    be = LlamaBackend(model, n_seq=2, context_size=256, n_batch=128, threads=2)
    eng = Engine(be, max_batch_size=2, queue_size=4, context_size=256,
                 prompt_cache=PromptCache(64 << 20, min_tokens=4))
    eng.start()
    out: dict[str, Collector] = {}
    try:
        for name, tenant, n in jobs:
            if flood and tenant == "b":
                wait_until(lambda: all(len(out[a].events) > 2 for a in ("a0", "a1")), timeout=60)
            out[name] = c = Collector()
            eng.submit(GenerationRequest(model.tokenize(PROMPTS[name], True),
                                         SamplingParams(max_tokens=n, temperature=0.0,
                                                        ignore_eos=True), c, tenant=tenant))
        for c in out.values():
            assert c.done.wait(120)
    finally:
        eng.stop()
        be.close()
    return out, eng


def test_a_preempted_sequence_comes_back_from_the_host_cache_and_goes_on(model_path: Path
                                                                           ) -> None:
    model = LlamaModel(model_path, gpu_layers=0)
    try:
        alone, _ = _run(model, [("a1", "a", 48)], flood=False)
        mixed, eng = _run(model, [("a0", "a", 48), ("a1", "a", 48), ("b", "b", 4)], flood=True)
    finally:
        model.close()
    assert eng.preemptions == 1  # a1, the younger of tenant a's two, for b
    assert eng.prompt_cache_restores >= 1  # its cells came back, not its tokens recomputed
    done = [n for n, c in sorted(mixed.items(), key=lambda nc: nc[1].finished_at)]
    assert done[0] == "b"
    for c in mixed.values():
        assert c.final.reason == "length"
    assert mixed["a0"].final.completion_tokens == 48
    assert mixed["a1"].final == alone["a1"].final  # all 48 tokens
    # What a1 streamed before it was preempted is what it streams alone.
    deltas = [e.text for e in mixed["a1"].events if isinstance(e, TextDelta)]
    alone_deltas = [e.text for e in alone["a1"].events if isinstance(e, TextDelta)]
    assert len(deltas) == len(alone_deltas) == 48
    assert deltas[:2] == alone_deltas[:2]
