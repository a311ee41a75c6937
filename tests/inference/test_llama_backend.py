"""The llama.cpp boundary on the real model: the batched sampler against llama.cpp's chain."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from llamafleet.inference.engine import SamplingParams
from llamafleet.inference.llama_backend import LlamaBackend, LlamaModel
from llamafleet.inference.llama_backend import llama_cpp as _llama_cpp
from llamafleet.inference.sampler import PENALTY_LAST_N

pytestmark = pytest.mark.integration

C = _llama_cpp.llama_cpp


@pytest.fixture(scope="module")
def backend(model_path: Path):
    model = LlamaModel(model_path, gpu_layers=0)
    be = LlamaBackend(model, n_seq=1, context_size=512, n_batch=128, threads=2)
    yield be
    be.close()
    model.close()


def _generate(be: LlamaBackend, sample, n: int) -> list[int]:
    prompt = be.model.tokenize("The lighthouse keeper opened the bottle and read", True)
    be.clear_sequence(0)
    be.decode(prompt, list(range(len(prompt))), [0] * len(prompt),
              [i == len(prompt) - 1 for i in range(len(prompt))])
    out, index = [], len(prompt) - 1
    for k in range(n):
        token = sample(index)
        out.append(token)
        be.decode([token], [len(prompt) + k], [0], [True])
        index = 0
    return out


def _reference_chain(be: LlamaBackend, p: SamplingParams) -> ctypes.c_void_p:
    """llama.cpp's own chain for ``p``, its own penalties sampler first (what llamafleet
    sampled through before the batched sampler)."""
    ref = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
    C.llama_sampler_chain_add(ref, C.llama_sampler_init_penalties(
        be.model.n_vocab, PENALTY_LAST_N, p.repeat_penalty, p.frequency_penalty,
        p.presence_penalty))
    C.llama_sampler_chain_add(ref, C.llama_sampler_init_greedy())
    return ref


def test_greedy_output_is_token_for_token_llama_cpps(backend: LlamaBackend) -> None:
    """Strong penalties change the text; the batched sampler must change it exactly as
    llama.cpp's chain does, token for token."""
    params = SamplingParams(temperature=0.0, repeat_penalty=1.5, frequency_penalty=0.4,
                            presence_penalty=0.3)
    ours = backend.new_sampler(params)
    try:
        got = _generate(backend, lambda i: backend.sample(ours, i), 48)
    finally:
        backend.free_sampler(ours)
    ref = _reference_chain(backend, params)
    try:
        want = _generate(backend, lambda i: C.llama_sampler_sample(ref, backend.ctx, i), 48)
    finally:
        C.llama_sampler_free(ref)
    plain = backend.new_sampler(SamplingParams(temperature=0.0, repeat_penalty=1.0))
    try:
        free = _generate(backend, lambda i: backend.sample(plain, i), 48)
    finally:
        backend.free_sampler(plain)
    assert got == want
    assert got != free, "the penalties should have changed the text"


def test_logits_rows_follow_the_batch_order(backend: LlamaBackend) -> None:
    """The matrix the batch sampler reads has one row per token that asked for logits, in
    batch order: each row equals llama_get_logits_ith at that token's batch index."""
    prompt = backend.model.tokenize("One two three four five six", True)
    backend.clear_sequence(0)
    flags = [i % 3 == 1 or i == len(prompt) - 1 for i in range(len(prompt))]
    backend.decode(prompt, list(range(len(prompt))), [0] * len(prompt), flags)
    rows = backend.logits()
    assert rows.shape[0] == sum(flags)
    for row, index in enumerate(i for i, f in enumerate(flags) if f):
        ith = np.ctypeslib.as_array(C.llama_get_logits_ith(backend.ctx, index),
                                    shape=(backend.model.n_vocab,))
        np.testing.assert_array_equal(rows[row], ith)
    backend.clear_sequence(0)


def test_a_grammar_holds_when_the_free_draw_breaks_it(backend: LlamaBackend) -> None:
    """The pool draws without the grammar and the chain resamples only when the grammar
    refuses that token: every token still obeys it."""
    grammar = 'root ::= [0-9]+ "."'
    before = backend.grammar_resamples
    s = backend.new_sampler(SamplingParams(temperature=0.8, grammar=grammar, seed=3))
    try:
        out = _generate(backend, lambda i: backend.sample(s, i), 6)
    finally:
        backend.free_sampler(s)
    text = b"".join(backend.model.token_bytes(t) for t in out).decode()
    assert text and all(c.isdigit() or c == "." for c in text), text
    assert backend.grammar_resamples > before  # the model's own words broke it


def test_a_grammar_that_allows_the_free_draw_costs_no_constrained_pass(
        backend: LlamaBackend) -> None:
    """Greedy under a grammar that allows what the model writes: every token is the free
    draw, checked against the grammar alone (no pass over the whole vocabulary), and the text
    is the unconstrained greedy text."""
    plain = backend.new_sampler(SamplingParams(temperature=0.0))
    try:
        free = _generate(backend, lambda i: backend.sample(plain, i), 12)
    finally:
        backend.free_sampler(plain)
    before = backend.grammar_resamples
    s = backend.new_sampler(SamplingParams(temperature=0.0, grammar="root ::= [^\\x00]*"))
    try:
        constrained = _generate(backend, lambda i: backend.sample(s, i), 12)
    finally:
        backend.free_sampler(s)
    assert constrained == free
    assert backend.grammar_resamples == before
