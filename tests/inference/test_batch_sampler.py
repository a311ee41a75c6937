"""The batched sampler against llama.cpp's own sampler chain, on synthetic logits (no model).

llama.cpp's chain (penalties -> top-k -> top-p -> min-p -> temperature) is applied through its
C API to a candidate array, which gives the exact set of tokens it keeps and their logits; its
``dist`` step then samples the softmax of those. The pool's :meth:`SamplerPool.weights` must give
the same distribution for every parameter mix, and its draws must follow it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llamafleet.inference.sampler import PENALTY_LAST_N, SamplerPool, seed32, top_candidates

llama_cpp = pytest.importorskip("llama_cpp")
C = llama_cpp.llama_cpp


@dataclass(frozen=True)
class P:
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None


def reference_pmf(logits: np.ndarray, p: P, history: list[int]) -> np.ndarray:
    """llama.cpp's chain without its final draw: the distribution ``dist`` samples from."""
    v = len(logits)
    chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
    add = lambda s: C.llama_sampler_chain_add(chain, s)  # noqa: E731
    add(C.llama_sampler_init_penalties(v, PENALTY_LAST_N, p.repeat_penalty,
                                       p.frequency_penalty, p.presence_penalty))
    if p.top_k > 0:
        add(C.llama_sampler_init_top_k(p.top_k))
    if p.top_p < 1:
        add(C.llama_sampler_init_top_p(p.top_p, 1))
    if p.min_p > 0:
        add(C.llama_sampler_init_min_p(p.min_p, 1))
    add(C.llama_sampler_init_temp(p.temperature))
    try:
        for t in history:
            C.llama_sampler_accept(chain, t)
        data = (C.llama_token_data * v)(*(C.llama_token_data(i, float(x), 0.0)
                                          for i, x in enumerate(logits)))
        arr = C.llama_token_data_array(data, v, -1, False)
        C.llama_sampler_apply(chain, ctypes.byref(arr))
        kept = [(arr.data[i].id, arr.data[i].logit) for i in range(arr.size)]
    finally:
        C.llama_sampler_free(chain)
    pmf = np.zeros(v)
    ids = np.array([i for i, _ in kept])
    z = np.array([x for _, x in kept], dtype=np.float64)
    e = np.exp(z - z.max())
    pmf[ids] = e / e.sum()
    return pmf


def ours_pmf(logits: np.ndarray, p: P, history: list[int]) -> np.ndarray:
    pool = SamplerPool(len(logits))
    s = pool.open(p)
    for t in history:
        pool.accept([s], [t])
    x = logits[None, :].astype(np.float32).copy()
    pool.penalise(x, np.array([0]), [s])
    ids, w = pool.weights(x, np.array([s.row]))
    pmf = np.zeros(len(logits))
    pmf[ids[0]] = w[0] / w[0].sum()
    return pmf


params = st.builds(
    P,
    temperature=st.sampled_from([0.3, 0.7, 1.0, 1.5]),
    top_k=st.sampled_from([0, 1, 5, 40, 200]),
    top_p=st.sampled_from([0.3, 0.8, 0.95, 1.0]),
    min_p=st.sampled_from([0.0, 0.05, 0.2]),
    repeat_penalty=st.sampled_from([1.0, 1.1, 1.5, 0.8]),
    frequency_penalty=st.sampled_from([0.0, 0.4, -0.3]),
    presence_penalty=st.sampled_from([0.0, 0.3]),
)


@settings(max_examples=150, deadline=None)
@given(params, st.integers(0, 2**32 - 1), st.integers(0, 80), st.sampled_from([64, 259, 1000]))
def test_batched_filters_keep_what_llama_cpp_keeps_with_the_same_probabilities(
        p: P, seed: int, n_history: int, vocab: int) -> None:
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(vocab) * rng.uniform(0.5, 4)).astype(np.float32)
    history = rng.integers(0, min(vocab, 30), size=n_history).tolist()
    want = reference_pmf(logits, p, history)
    got = ours_pmf(logits, p, history)
    assert set(np.flatnonzero(got)) == set(np.flatnonzero(want))
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_draws_follow_the_distribution_for_a_whole_batch() -> None:
    """8,000 rows sampled in one call (all with the same logits and parameters): a chi-square
    test against llama.cpp's distribution. Seeded, so it is deterministic; the bound is the
    0.999 quantile of chi-square, so a sampler that is right passes by a wide margin."""
    rng = np.random.default_rng(3)
    v, n = 64, 8000
    logits = (rng.standard_normal(v) * 2).astype(np.float32)
    p = P(temperature=0.8, top_k=20, top_p=0.9, min_p=0.02, repeat_penalty=1.3,
          frequency_penalty=0.2)
    history = [int(np.argmax(logits)), 3, 3, 7]
    want = reference_pmf(logits, p, history)
    pool = SamplerPool(v, capacity=n, seed=11)
    samplers = [pool.open(p) for _ in range(n)]
    for t in history:
        pool.accept(samplers, [t] * n)
    x = np.repeat(logits[None, :], n, axis=0)
    rows = np.arange(n)
    pool.penalise(x, rows, samplers)
    tokens = pool.sample(x, rows, samplers)
    counts = np.bincount(tokens, minlength=v)
    support = want > 0
    assert counts[~support].sum() == 0, "a token outside the kept set was drawn"
    expected = want[support] * n
    chi2 = ((counts[support] - expected) ** 2 / expected).sum()
    dof = support.sum() - 1
    # Wilson-Hilferty: the chi-square quantile for z = 3.09 (p = 0.999).
    bound = dof * (1 - 2 / (9 * dof) + 3.09 * (2 / (9 * dof)) ** 0.5) ** 3
    assert chi2 < bound, (chi2, bound)


def test_greedy_takes_the_first_maximum_after_penalties() -> None:
    pool = SamplerPool(6)
    s = pool.open(P(temperature=0.0, repeat_penalty=2.0))
    pool.accept([s], [1])
    x = np.array([[1.0, 4.0, 3.0, 3.0, -1.0, 0.0]], dtype=np.float32)
    pool.penalise(x, np.array([0]), [s])
    assert x[0, 1] == 2.0  # 4 / 2
    assert pool.sample(x, np.array([0]), [s]).tolist() == [2]  # first of the tied 3.0s


def test_a_seed_reproduces_whatever_else_is_in_the_batch() -> None:
    v = 100
    logits = np.random.default_rng(0).standard_normal(v).astype(np.float32)

    def run(batch_with: int) -> list[int]:
        pool = SamplerPool(v)
        mine = pool.open(P(seed=-1, top_k=0, top_p=1.0, min_p=0.0, temperature=1.0))
        others = [pool.open(P()) for _ in range(batch_with)]
        out = []
        for _ in range(30):
            batch = [mine, *others]
            x = np.repeat(logits[None, :], len(batch), axis=0)
            tokens = pool.sample(x, np.arange(len(batch)), batch)
            pool.accept(batch, tokens)
            out.append(int(tokens[0]))
        return out

    alone = run(0)
    assert alone == run(5) == run(0)
    assert len(set(alone)) > 5, "seed -1 samples (it is a seed like any other)"


def test_seed32_never_gives_llama_cpps_random_seed() -> None:
    for seed in (-1, 0xFFFFFFFF, 2 * 0xFFFFFFFF + 1, 2**64 - 1, 0, 42):
        assert 0 <= seed32(seed) < 0xFFFFFFFF
    assert seed32(-1) != seed32(-2)


def test_top_candidates_with_ties_and_whole_vocabulary() -> None:
    x = np.array([[1, 3, 3, 3, 0], [5, 4, 3, 2, 1]], dtype=np.float32)
    ids, vals = top_candidates(x, 2)
    assert ids.tolist() == [[1, 2], [0, 1]] and vals.tolist() == [[3, 3], [5, 4]]
    ids, _ = top_candidates(x, 5)
    assert ids[1].tolist() == [0, 1, 2, 3, 4]


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 6), st.sampled_from([7, 64, 259, 8192]),
       st.integers(1, 300))  # 8192 and k <= 256: the large vocabulary's pre-filter
def test_top_candidates_is_a_stable_descending_sort(seed: int, n: int, v: int, k: int) -> None:
    """Against the definition: values descending, equal values in vocabulary order, with
    ties, infinities and both zeros (which tie) in the rows."""
    rng = np.random.default_rng(seed)
    x = rng.integers(-3, 4, size=(n, v)).astype(np.float32)  # many ties
    x[rng.random((n, v)) < 0.1] = -np.inf
    x[rng.random((n, v)) < 0.1] = -0.0
    x[rng.random((n, v)) < 0.3] += np.float32(rng.standard_normal())
    k = min(k, v)
    ids, vals = top_candidates(x, k)
    want = np.argsort(-x, axis=1, kind="stable")[:, :k]
    assert ids.tolist() == want.tolist()
    assert np.array_equal(vals, np.take_along_axis(x, want, axis=1))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 5),
       st.sampled_from([7, 64, 259, 8192, 8197, 50257]), st.integers(1, 300), st.booleans())
def test_top_candidates_match_a_full_sort(seed: int, n: int, v: int, k: int,
                                          ties: bool) -> None:
    """The candidate paths (an argpartition's k; for a large vocabulary the groups' maxima,
    then the best groups and the leftovers past the last whole group) against a stable sort
    of the whole row, on rows with few ties (the candidates decide) and rows with ties at
    the bound (the whole-row fallback)."""
    k = min(k, v)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, v)).astype(np.float32)
    x[rng.random((n, v)) < 0.05] = -np.inf
    x[:, -3:] += 4  # the leftovers (v not a multiple of the group) hold top entries
    if ties:
        x = np.round(x)
    ids, vals = top_candidates(x, k)
    want = np.argsort(-x, axis=1, kind="stable")[:, :k]
    assert ids.tolist() == want.tolist()
    assert np.array_equal(vals, np.take_along_axis(x, want, axis=1))
    gathered = np.ascontiguousarray(x[::-1])[::-1]  # rows not in memory order: same answer
    assert top_candidates(gathered, k)[0].tolist() == want.tolist()


def test_rows_in_any_order_sample_as_their_own_rows() -> None:
    """Greedy samplers read their own rows whether the rows are consecutive (a view of the
    logits) or not (a gathered copy)."""
    x = np.eye(5, dtype=np.float32)[::-1].copy()  # row r peaks at 4 - r
    pool = SamplerPool(5)
    samplers = [pool.open(P(temperature=0.0)) for _ in range(3)]
    assert pool.sample(x, np.array([1, 2, 3]), samplers).tolist() == [3, 2, 1]
    assert pool.sample(x, np.array([3, 0, 4]), samplers).tolist() == [1, 4, 0]
