"""Sampling for the whole batch at once.

Every step the engine has one logits row per sequence that asked for one. Sampling them one
at a time through a llama.cpp sampler chain costs a ctypes round trip, a candidate array of the
whole vocabulary and numpy penalties per sequence: 78-120 µs per sequence per step, measured
with a 259-token vocabulary, which at 64 sequences is longer than the decode itself on a fast
device. Here the rows are sampled together, with numpy, from one view of llama.cpp's logits
matrix: penalties, greedy, top-k, top-p, min-p, temperature and the final draw are a few array
operations for the whole batch.

The arithmetic is llama.cpp's chain, in its order (``top_k -> top_p -> min_p -> temp -> dist``,
or ``greedy``), so the output distribution is the same:

* penalties over the last :data:`PENALTY_LAST_N` generated tokens: a positive logit is divided
  by the repeat penalty, a negative one multiplied, then ``count * frequency + presence`` is
  subtracted (float32, as llama.cpp does);
* top-k keeps the k largest logits (k <= 0: all);
* top-p takes the softmax of what is left (temperature 1) and keeps the smallest prefix, in
  descending order, whose mass reaches p (always one token);
* min-p keeps the logits at least ``max + log(p)``;
* temperature divides what is left; the draw is a softmax sample, one uniform per row.

Greedy rows (temperature 0) take the first maximum, as ``llama_sampler_init_greedy`` does, so
greedy output is token for token what the chain gives.

Randomness: a seeded request draws from a generator of its own (``numpy`` PCG64 seeded with its
seed, any 64-bit value), so its tokens do not depend on what else is in the batch; unseeded
rows share one generator. The stream of numbers is numpy's, not llama.cpp's mt19937, so a seed
gives other text than it did through the chain, and the same text every time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PENALTY_LAST_N = 64  # tokens of history the penalties look at (llama.cpp's default)

_F32 = np.float32


def seed32(seed: int) -> int:
    """A request's seed as a llama.cpp sampler seed: 32 bits, never ``LLAMA_DEFAULT_SEED``
    (0xFFFFFFFF), which llama.cpp reads as "pick a random seed". Cutting to 32 bits alone made
    seed -1, and every seed congruent to it, unseeded (yet still treated as seeded)."""
    return (seed & 0xFFFFFFFFFFFFFFFF) % 0xFFFFFFFF


@dataclass(eq=False)
class Sampler:
    """One sequence's sampler: its row in the pool's arrays (parameters, penalty history,
    generator) and, for a grammar, the llama.cpp chain that the backend keeps beside it."""

    row: int
    greedy: bool
    chain: Any = None  # llama.cpp sampler chain (grammars only), owned by the backend
    grammar: Any = None  # the grammar sampler inside ``chain``


class SamplerPool:
    """Per-sequence parameters and state in arrays (one row per open sampler) and the batched
    sampler. A step's methods take the samplers' pool rows (``rows_of``) once; what they
    read per sequence comes from those arrays, not from a Python loop over the samplers.

    Not thread-safe: the engine thread alone uses it."""

    def __init__(self, n_vocab: int, capacity: int = 8, seed: int | None = None):
        self.n_vocab = n_vocab
        self._rng = np.random.default_rng(seed)  # unseeded samplers share it
        self._seeded: dict[int, np.random.Generator] = {}  # pool row -> its own generator
        self._free: list[int] = []
        self._alloc(max(1, capacity))

    def _alloc(self, capacity: int) -> None:
        old = getattr(self, "capacity", 0)

        def grow(name: str, fill: Any, dtype: Any, shape: tuple[int, ...] = ()) -> None:
            new = np.full((capacity, *shape), fill, dtype=dtype)
            if old:
                new[:old] = getattr(self, name)
            setattr(self, name, new)

        # The filters' parameters, one row per sampler, read with one gather per step:
        # top_k (1..n_vocab; off: all), top_p (inf: off), log(min_p) (-inf: off), temperature.
        grow("filters", 0.0, _F32, (4,))
        grow("repeat", 1.0, _F32)
        grow("frequency", 0.0, _F32)
        grow("presence", 0.0, _F32)
        grow("history", -1, np.int64, (PENALTY_LAST_N,))
        grow("greedy", False, bool)
        grow("seeded", False, bool)
        # Tokens recorded in the penalty history; -1: the sampler has no penalties.
        grow("seen", -1, np.int64)
        self._free.extend(range(capacity - 1, old - 1, -1))
        self.capacity = capacity

    # --- per sequence ------------------------------------------------------------------------

    def open(self, params: Any) -> Sampler:
        """A sampler for ``params`` (an engine ``SamplingParams``)."""
        if not self._free:
            self._alloc(self.capacity * 2)
        row = self._free.pop()
        greedy = params.temperature <= 0
        self.filters[row] = (
            params.top_k if 0 < params.top_k < self.n_vocab else self.n_vocab,
            params.top_p if params.top_p < 1 else np.inf,
            np.log(_F32(params.min_p)) if params.min_p > 0 else -np.inf,
            params.temperature)
        self.repeat[row] = params.repeat_penalty
        self.frequency[row] = params.frequency_penalty
        self.presence[row] = params.presence_penalty
        self.history[row] = -1
        penalised = bool(params.repeat_penalty != 1.0 or params.frequency_penalty
                         or params.presence_penalty)
        self.seen[row] = 0 if penalised else -1
        self.greedy[row] = greedy
        self.seeded[row] = params.seed is not None and not greedy
        if self.seeded[row]:
            self._seeded[row] = np.random.Generator(
                np.random.PCG64(params.seed & 0xFFFFFFFFFFFFFFFF))
        return Sampler(row, greedy)

    def close(self, sampler: Sampler) -> None:
        self._seeded.pop(sampler.row, None)
        self._free.append(sampler.row)

    # --- the batch -----------------------------------------------------------------------------

    @staticmethod
    def rows_of(samplers: Sequence[Sampler]) -> np.ndarray:
        """The samplers' rows in the pool's arrays."""
        return np.fromiter((s.row for s in samplers), np.intp, len(samplers))

    def penalise(self, logits: np.ndarray, rows: np.ndarray, samplers: Sequence[Sampler],
                 pr: np.ndarray | None = None) -> None:
        """Apply each sampler's penalties in place to its row of ``logits`` (``rows[i]`` is
        ``samplers[i]``'s row there; ``pr`` their pool rows, if the caller has them).
        Touches only the tokens in the histories.

        A token that occurs several times in a history is read, penalised and written once
        per occurrence; every occurrence computes the same value from the same unpenalised
        logit, so the repeated writes agree and no de-duplication (a sort) is needed. A
        history shorter than PENALTY_LAST_N repeats its first token in the empty places
        (``accept``), so every row is PENALTY_LAST_N tokens wide and needs no mask. Only the
        frequency penalty needs the counts. Few numpy calls: each costs microseconds on the
        cold cache after a decode, whatever the batch."""
        pr = self.rows_of(samplers) if pr is None else pr
        active = self.seen[pr] > 0  # penalised, with a history
        if not active.all():
            if not active.any():
                return
            pr, rows = pr[active], rows[active]
        hist = self.history[pr]  # (n, PENALTY_LAST_N)
        out = rows[:, None]
        vals = logits[out, hist]
        repeat = self.repeat[pr][:, None]
        vals = np.where(vals <= 0, vals * repeat, vals / repeat)
        sub = self.presence[pr][:, None]
        frequency = self.frequency[pr]
        if frequency.any():
            real = np.arange(PENALTY_LAST_N) < self.seen[pr][:, None]
            counts = ((hist[:, :, None] == hist[:, None, :]) & real[:, None, :]).sum(axis=2)
            sub = counts.astype(_F32) * frequency[:, None] + sub
        logits[out, hist] = vals - sub

    def sample(self, logits: np.ndarray, rows: np.ndarray, samplers: Sequence[Sampler],
               pr: np.ndarray | None = None) -> np.ndarray:
        """One token per sampler from its row of ``logits`` (already penalised)."""
        n = len(samplers)
        if n == 0:
            return np.empty(0, dtype=np.int64)
        pr = self.rows_of(samplers) if pr is None else pr
        greedy = self.greedy[pr]
        if greedy.all():
            return _take_rows(logits, rows).argmax(axis=1)
        if not greedy.any():
            return self._draw(_take_rows(logits, rows), pr)
        out = np.empty(n, dtype=np.int64)
        out[greedy] = logits[rows[greedy]].argmax(axis=1)
        pick = ~greedy
        out[pick] = self._draw(logits[rows[pick]], pr[pick])
        return out

    def _draw(self, x: np.ndarray, pr: np.ndarray) -> np.ndarray:
        """One token for each of the sampled (not greedy) rows ``x``, at pool rows ``pr``."""
        ids, w = self.weights(x, pr)
        cum = w.cumsum(axis=1, dtype=np.float64)  # methods: np.cumsum adds a Python layer
        target = self._uniforms(pr) * cum[:, -1]
        at = (cum >= target[:, None]).argmax(axis=1)
        return ids[np.arange(len(ids)), at]

    def weights(self, x: np.ndarray, pr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For rows ``x`` of sampled (not greedy) samplers at pool rows ``pr``: candidate ids
        in descending logit order and their unnormalised final weights, 0 where the chain's
        filters dropped a token (what the draw samples from, in proportion). As few numpy
        calls as the arithmetic allows: each costs microseconds on a cold cache after a
        decode, whatever the batch."""
        f = self.filters[pr]
        top_k, top_p, log_min_p, temp = f[:, 0:1], f[:, 1:2], f[:, 2:3], f[:, 3:4]
        ids, vals = top_candidates(x, int(top_k.max()))
        head = vals[:, :1]
        d = vals - head
        keep = np.arange(ids.shape[1]) < top_k  # top-k
        # top-p over the top-k survivors at temperature 1: keep i while the mass before it < p.
        e = np.exp(d) * keep
        probs = e / e.sum(axis=1, keepdims=True)
        keep &= probs.cumsum(axis=1, dtype=_F32) - probs < top_p
        # min-p against the largest logit.
        keep &= vals >= head + log_min_p
        keep[:, 0] = True  # at least one token, as min_keep = 1 does
        # temperature over what is left.
        return ids, np.exp(d / temp) * keep

    def _uniforms(self, pr: np.ndarray) -> np.ndarray:
        u = self._rng.random(len(pr))
        if self._seeded:  # a seeded sampler draws from its own generator
            for i in np.flatnonzero(self.seeded[pr]):
                u[i] = self._seeded[int(pr[i])].random()
        return u

    def accept(self, samplers: Sequence[Sampler], tokens: Sequence[int] | np.ndarray,
               pr: np.ndarray | None = None) -> None:
        """Record sampled tokens in the penalty histories (a first token fills its row:
        ``penalise`` reads every place)."""
        pr = self.rows_of(samplers) if pr is None else pr
        seen = self.seen[pr]
        penalised = seen >= 0
        if not penalised.all():
            if not penalised.any():
                return
            pr, seen = pr[penalised], seen[penalised]
            tok = np.asarray(tokens, dtype=np.int64)[penalised]
        else:
            tok = np.asarray(tokens, dtype=np.int64)
        self.history[pr, seen % PENALTY_LAST_N] = tok
        first = seen == 0
        if first.any():
            self.history[pr[first]] = tok[first][:, None]
        self.seen[pr] = seen + 1


def _take_rows(logits: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``logits[rows]``: a view when the rows are consecutive (every sequence decoding one
    token), not a copy of the block (64 MiB at 64 rows of a 262k vocabulary)."""
    if len(rows) and rows[-1] - rows[0] == len(rows) - 1 and (
            len(rows) < 3 or (np.diff(rows) == 1).all()):
        return logits[rows[0]:rows[-1] + 1]
    return logits[rows]


LARGE_VOCAB = 8192  # from here the top k come from the rows' best groups (_top_candidates_large)
GROUP = 32  # entries per group there: entry j + i * (v // GROUP) is in group j
FEW_ROWS = 4  # below this many rows a large vocabulary's rows are cut one by one
STRIDE = 8  # that cut's sampling stride


_LOW = 0xFFFFFFFF
_LOW_OF: dict[int, np.ndarray] = {}  # vocabulary size -> 2**32 - 1 - id, for _order_keys


def _order_keys(x: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
    """One int64 per entry of ``x`` (float32 rows), unique within a row, that sorts as the
    values do, and among equal values the later vocabulary entry first: the value's bits
    mapped to an order-preserving integer in the high half, ``2**32 - 1 - id`` in the low.
    ``ids`` are the entries' vocabulary ids (default: their columns). numpy sorts and
    partitions int64 with SIMD kernels; ``argsort`` of the floats took several times as long,
    and ties need no second pass."""
    if ids is None:
        v = x.shape[1]
        low = _LOW_OF.get(v)
        if low is None:
            low = _LOW_OF[v] = _LOW - np.arange(v, dtype=np.int64)
    else:
        low = _LOW - ids.astype(np.int64)
    u = (x + _F32(0)).view(np.int32).astype(np.int64)  # + 0: -0.0 becomes 0.0 (they tie)
    u ^= (u >> 31) & 0x7FFFFFFF  # negative floats: larger magnitude sorts lower
    u <<= 32
    u |= low
    return u


def _top_of_keys(keys: np.ndarray, k: int) -> np.ndarray:
    """The vocabulary ids of the ``k`` largest ``keys`` per row, largest first."""
    v = keys.shape[1]
    start = max(v - k, 0)
    if start:  # in place: the keys are a temporary of the caller's
        keys.partition(start, axis=1)
    top = keys[:, start:]
    top.sort(axis=1)
    return (_LOW - (top[:, ::-1] & _LOW)).astype(np.intp)


def top_candidates(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest entries of each row of ``x``, in descending order, equal values in
    vocabulary order: (ids, values).

    One partition of the rows' order keys (:func:`_order_keys`) finds the top k, and a sort of
    those k orders them: for a small vocabulary that beat an ``argpartition`` of the values
    (2x at 64 rows of 259). A large vocabulary (Gemma's 262k) first narrows each row to the
    groups that can hold its top k (:func:`_top_candidates_large`)."""
    n, v = x.shape
    if v >= LARGE_VOCAB and k * GROUP * 8 <= v:
        return _top_candidates_few(x, k) if n < FEW_ROWS else _top_candidates_large(x, k)
    ids = _top_of_keys(_order_keys(x), k)
    return ids, x[np.arange(n)[:, None], ids]


def _top_candidates_few(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_candidates` for a few rows of a large vocabulary: each row is cut to the
    entries at or above the k-th largest of every STRIDE-th entry (a bound at least k entries
    reach), then those few are sorted. Fewer numpy calls than the grouped path, which pays
    for itself from FEW_ROWS rows on (``benchmarks/sampler_step.py``: one row of 49,152 took
    about 60% longer through the groups)."""
    n = x.shape[0]
    sub = x[:, ::STRIDE]
    bound = np.partition(sub, sub.shape[1] - k, axis=1)[:, sub.shape[1] - k]
    ids = np.empty((n, k), dtype=np.intp)
    vals = np.empty((n, k), dtype=x.dtype)
    for r in range(n):
        cand = np.flatnonzero(x[r] >= bound[r])
        cv = x[r, cand]
        top = np.argsort(-cv, kind="stable")[:k]  # stable: ties in vocabulary order
        ids[r], vals[r] = cand[top], cv[top]
    return ids, vals


def _top_of_candidates(x: np.ndarray, cand: np.ndarray, k: int, whole: np.ndarray
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The top k of each row of ``x`` among its candidate ids ``cand`` (which hold them), or
    among the whole row where ``whole`` is set."""
    rows = np.arange(x.shape[0])[:, None]
    ids = _top_of_keys(_order_keys(x[rows, cand], cand), k)
    if whole.any():
        t = np.flatnonzero(whole)
        ids[t] = _top_of_keys(_order_keys(x[t]), k)
    return ids, x[rows, ids]


def _top_candidates_large(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`top_candidates` for a large vocabulary, with one pass over the logits.

    A row's first ``m * GROUP`` entries fall into ``m`` groups of GROUP, entry ``j + i * m`` in
    group ``j`` (interleaved, so that the groups' maxima are one elementwise ``max`` over
    GROUP contiguous slices: the pass runs at memory speed, where a maximum over each
    contiguous run of 32 took several times as long). The k-th largest group maximum is a
    bound that at least k entries reach, so the row's top k are all at or above it, and only
    the groups whose maximum reaches it can hold them: the k best groups, unless maxima tie
    at the bound (then that row takes the whole-row path). Those groups' entries and the
    ``v - m * GROUP`` leftover ones are the candidates: ``k * GROUP`` plus fewer than GROUP
    per row, read with one gather. Measured with 64 rows of a 262,144-token vocabulary:
    the former stride-8 sample and per-row filter took about 16 ms; see
    ``benchmarks/sampler_step.py``."""
    n, v = x.shape
    m = v // GROUP
    if x.strides[1] != x.itemsize:
        x = np.ascontiguousarray(x)
    # (n, GROUP, m) over the rows' first m * GROUP entries: a view either way (as_strided
    # costs tens of µs, a reshape one).
    if v == m * GROUP and x.flags.c_contiguous:
        groups = x.reshape(n, GROUP, m)
    else:
        groups = np.lib.stride_tricks.as_strided(
            x, (n, GROUP, m), (x.strides[0], m * x.itemsize, x.itemsize), writeable=False)
    best = groups.max(axis=1)  # (n, m)
    order = np.argpartition(best, m - k, axis=1)  # one kth: two took several times as long
    top_groups = order[:, m - k:]  # (n, k)
    rows = np.arange(n)[:, None]
    bound = best[rows, order[:, m - k:m - k + 1]]  # the k-th largest group maximum
    tied = np.count_nonzero(best >= bound, axis=1) > k  # a group left out may reach it
    cand = (top_groups[:, :, None] + np.arange(0, GROUP * m, m)).reshape(n, k * GROUP)
    if v > m * GROUP:  # the leftovers are candidates in every row
        tail = np.arange(m * GROUP, v)
        cand = np.concatenate([cand, np.broadcast_to(tail, (n, len(tail)))], axis=1)
    return _top_of_candidates(x, cand, k, tied)
