"""The llama.cpp boundary on the real model: our own penalty step against llama.cpp's."""

from __future__ import annotations

from pathlib import Path

import pytest
from llamafleet.inference.engine import SamplingParams
from llamafleet.inference.llama_backend import PENALTY_LAST_N, LlamaBackend, LlamaModel
from llamafleet.inference.llama_backend import llama_cpp as _llama_cpp

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


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_penalties_match_llama_cpp_sampler(backend: LlamaBackend, temperature: float) -> None:
    """Strong penalties change the text; ours must change it exactly as llama.cpp's would."""
    params = SamplingParams(temperature=temperature, seed=7, top_k=40, top_p=0.95, min_p=0.05,
                            repeat_penalty=1.5, frequency_penalty=0.4, presence_penalty=0.3)
    ours = backend.new_sampler(params)
    assert ours.penalties is not None
    try:
        got = _generate(backend, lambda i: backend.sample(ours, i), 48)
    finally:
        backend.free_sampler(ours)

    # Reference: the same chain with llama.cpp's own penalties sampler right after creation
    # order (grammar, penalties, top-k, top-p, min-p, temperature, dist).
    plain = backend.new_sampler(SamplingParams(**{**params.__dict__, "repeat_penalty": 1.0,
                                                  "frequency_penalty": 0.0,
                                                  "presence_penalty": 0.0}))
    ref = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
    C.llama_sampler_chain_add(ref, C.llama_sampler_init_penalties(
        backend.model.n_vocab, PENALTY_LAST_N, 1.5, 0.4, 0.3))
    for i in range(C.llama_sampler_chain_n(plain.chain)):
        C.llama_sampler_chain_add(ref, C.llama_sampler_clone(C.llama_sampler_chain_get(plain.chain, i)))
    backend.free_sampler(plain)
    try:
        want = _generate(backend, lambda i: C.llama_sampler_sample(ref, backend.ctx, i), 48)
    finally:
        C.llama_sampler_free(ref)

    unpenalised = backend.new_sampler(SamplingParams(**{**params.__dict__, "repeat_penalty": 1.0,
                                                        "frequency_penalty": 0.0,
                                                        "presence_penalty": 0.0}))
    try:
        free = _generate(backend, lambda i: backend.sample(unpenalised, i), 48)
    finally:
        backend.free_sampler(unpenalised)

    assert got == want
    assert got != free, "the penalties should have changed the text"
