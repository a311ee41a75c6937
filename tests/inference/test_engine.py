"""The scheduler against a fake model boundary (no llama.cpp)."""

from __future__ import annotations

import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llamafleet.common.errors import BadRequest, ContextTooLong, Overloaded
from llamafleet.inference.engine import (
    DECODE,
    MIN_PREFILL_CHUNK,
    Engine,
    Failed,
    Finished,
    GenerationRequest,
    SamplingParams,
    Started,
    TextAssembler,
    TextDelta,
)

from tests.support.fake_backend import Collector, FakeBackend, make_engine, submit
from tests.support.servers import wait_until


def test_generates_until_max_tokens_then_length() -> None:
    be = FakeBackend()
    eng = make_engine(be)
    c = submit(eng, [10, 11, 12], max_tokens=3)
    assert c.done.wait(5)
    eng.stop()
    assert c.final == Finished("length", 3, 3)
    assert c.text == "13 14 15 "
    assert isinstance(c.events[0], Started)


def test_end_of_generation_is_stop() -> None:
    be = FakeBackend(eog_from=5)
    eng = make_engine(be)
    c = submit(eng, [1, 2], max_tokens=50)
    assert c.done.wait(5)
    eng.stop()
    assert c.final == Finished("stop", 2, 2)
    assert c.text == "3 4 "


def test_ignore_eos_generates_exactly_max_tokens() -> None:
    be = FakeBackend(eog_from=5)
    eng = make_engine(be)
    c = submit(eng, [1, 2], max_tokens=6, ignore_eos=True)
    assert c.done.wait(5)
    eng.stop()
    assert c.final.reason == "length" and c.final.completion_tokens == 6


def test_context_limit_finishes_with_length() -> None:
    be = FakeBackend()
    eng = make_engine(be, context_size=8)
    c = submit(eng, [1, 2, 3, 4, 5], max_tokens=100)
    assert c.done.wait(5)
    eng.stop()
    assert c.final.reason == "length"
    assert 5 + c.final.completion_tokens <= 8


def test_prompt_at_context_size_is_refused_with_both_numbers() -> None:
    eng = make_engine(FakeBackend(), context_size=8)
    with pytest.raises(ContextTooLong) as e:
        submit(eng, list(range(1, 9)))
    eng.stop()
    assert "8 tokens" in e.value.message and "maximum context length is 8" in e.value.message


def test_stop_string_is_cut_and_never_streamed_in_part() -> None:
    be = FakeBackend()
    eng = make_engine(be)
    c = submit(eng, [1], max_tokens=20, stop=("4 5",))
    assert c.done.wait(5)
    eng.stop()
    assert c.final.reason == "stop"
    assert c.text == "2 3 "
    assert all("4" not in e.text for e in c.events if isinstance(e, TextDelta))


def test_prefill_is_chunked_within_n_batch_and_mixed_with_decode() -> None:
    be = FakeBackend()
    eng = make_engine(be)
    be.gate = threading.Event()
    a = submit(eng, [1, 2], max_tokens=30)
    b = submit(eng, list(range(100, 120)), max_tokens=2)  # 20 prompt tokens > n_batch 8
    be.gate.set()
    assert a.done.wait(5) and b.done.wait(5)
    eng.stop()
    assert all(len(tokens) <= be.n_batch for tokens, *_ in be.batches)
    mixed = [seqs for _, _, seqs, _ in be.batches if len(set(seqs)) > 1]
    assert mixed, "decode of one sequence and prefill of another share a step"
    assert b.text == "120 121 "


def test_cancelled_request_frees_its_slot_at_the_next_step() -> None:
    be = FakeBackend()
    eng = make_engine(be, max_batch_size=1, context_size=10**9)
    req = GenerationRequest([1], SamplingParams(max_tokens=10**9), Collector())
    eng.submit(req)
    wait_until(lambda: any(isinstance(e, TextDelta) for e in req.sink.events))
    req.cancel()
    assert req.sink.done.wait(5)
    assert req.sink.final.reason == "cancelled"
    c = submit(eng, [5], max_tokens=2)
    assert c.done.wait(5)
    eng.stop()
    assert c.text == "6 7 "


def held_engine() -> tuple[FakeBackend, Engine, Collector]:
    """One slot, a queue of 2, and the engine held inside decode with a request running."""
    be = FakeBackend()
    be.gate = threading.Event()
    eng = make_engine(be, max_batch_size=1, queue_size=2)
    first = submit(eng, [1], max_tokens=5)
    wait_until(lambda: eng.running)
    return be, eng, first


def test_queue_full_is_overloaded_at_once() -> None:
    be, eng, first = held_engine()
    queued = [submit(eng, [1], max_tokens=1) for _ in range(2)]
    with pytest.raises(Overloaded):
        submit(eng, [1], max_tokens=1)
    be.gate.set()
    assert all(c.done.wait(5) for c in [first, *queued])
    eng.stop()


def test_one_bad_request_fails_alone() -> None:
    be = FakeBackend(refused_grammar="root ::= bad")
    eng = make_engine(be)
    good = submit(eng, [1], max_tokens=3)
    bad = submit(eng, [1], max_tokens=3, grammar="root ::= bad")
    assert good.done.wait(5) and bad.done.wait(5)
    eng.stop()
    assert isinstance(bad.final, Failed) and isinstance(bad.final.error, BadRequest)
    assert good.final.reason == "length"


def test_a_consumer_that_raises_does_not_stop_the_engine() -> None:
    be = FakeBackend()
    eng = make_engine(be)

    def broken(ev) -> None:
        raise RuntimeError("consumer gone")

    eng.submit(GenerationRequest([1], SamplingParams(max_tokens=50), broken))
    c = submit(eng, [1], max_tokens=3)
    assert c.done.wait(5)
    eng.stop()
    assert c.final.reason == "length"


def test_stop_fails_everything_still_known() -> None:
    be = FakeBackend()
    be.gate = threading.Event()
    eng = make_engine(be, max_batch_size=1)
    running = submit(eng, [1], max_tokens=100)
    waiting = submit(eng, [1], max_tokens=100)
    wait_until(lambda: eng.running)
    eng._stopping = True
    be.gate.set()
    eng.stop()
    for c in (running, waiting):
        assert c.done.wait(5)
        assert isinstance(c.final, (Failed, Finished))


@pytest.mark.parametrize("split", [1, 2, 3])
def test_text_assembler_holds_back_partial_utf8(split: int) -> None:
    data = "héllo 🌍".encode()
    t = TextAssembler(())
    out = ""
    for i in range(0, len(data), split):
        piece, _ = t.feed(data[i:i + split])
        piece.encode("utf-8")  # always valid text
        out += piece
    out += t.flush()
    assert out == "héllo 🌍"


def test_text_assembler_holds_a_possible_stop_prefix_then_releases_it() -> None:
    t = TextAssembler(["</end>"])
    assert t.feed(b"abc</e") == ("abc", False)
    assert t.feed(b"x") == ("</ex", False)
    assert t.feed(b"</end>tail") == ("", True)


# --- properties ---------------------------------------------------------------------------

request_st = st.tuples(
    st.lists(st.integers(1, 50), min_size=1, max_size=20),  # prompt
    st.integers(1, 12),                                      # max_tokens
    st.booleans(),                                           # cancel early
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(request_st, min_size=1, max_size=12),
       max_batch=st.integers(1, 4), queue_size=st.integers(0, 6))
def test_every_request_finishes_exactly_once_and_bounds_hold(requests, max_batch, queue_size) -> None:
    be = FakeBackend()
    eng = make_engine(be, max_batch_size=max_batch, queue_size=queue_size, context_size=64)
    accepted: list[tuple[GenerationRequest, Collector]] = []
    rejected = 0
    for prompt, max_tokens, cancel in requests:
        c = Collector()
        req = GenerationRequest(prompt, SamplingParams(max_tokens=max_tokens), c)
        try:
            eng.submit(req)
        except Overloaded:
            rejected += 1
            continue
        if cancel:
            req.cancel()
        accepted.append((req, c))
        assert eng.queued <= queue_size + max_batch
    for _, c in accepted:
        assert c.done.wait(10)
    eng.stop()
    for req, c in accepted:
        final = c.final  # exactly one final event
        if isinstance(final, Finished) and final.reason != "cancelled":
            assert final.completion_tokens <= req.params.max_tokens
    for _, _, seqs, _ in be.batches:
        assert len(set(seqs)) <= max_batch
        assert all(0 <= s < max_batch for s in seqs)
    assert not be.samplers, "every sampler is freed"
    assert eng.running == 0
    if rejected:
        assert len(requests) > queue_size


def test_prefix_cache_skips_the_shared_part_of_the_prefill() -> None:
    be = FakeBackend()
    eng = make_engine(be, max_batch_size=2)
    system = list(range(1, 21))  # a 20-token "system prompt"
    first = submit(eng, system + [30, 31], max_tokens=2)
    assert first.done.wait(5)
    be.batches.clear()
    second = submit(eng, system + [40, 41, 42], max_tokens=2)
    assert second.done.wait(5)
    eng.stop()
    prefilled = [t for tokens, *_ in be.batches for t in tokens]
    assert prefilled[:3] == [40, 41, 42]  # only the new part of the prompt was decoded
    assert eng.prefix_tokens_reused == 20
    assert (be.trimmed and be.trimmed[-1][1] == 20)
    assert second.final.prompt_tokens == 23 and second.text == "43 44 "


def test_seeded_requests_never_reuse_cached_cells() -> None:
    be = FakeBackend()
    eng = make_engine(be, max_batch_size=1)
    prompt = list(range(1, 21))
    a = submit(eng, prompt, max_tokens=2, seed=5)
    assert a.done.wait(5)
    b = submit(eng, prompt, max_tokens=2, seed=5)
    assert b.done.wait(5)
    eng.stop()
    assert eng.prefix_tokens_reused == 0 and a.text == b.text


def test_cancelled_sequences_leave_nothing_cached() -> None:
    be = FakeBackend()
    eng = make_engine(be, max_batch_size=1, context_size=10**9)
    req = GenerationRequest([1, 2, 3], SamplingParams(max_tokens=10**9), Collector())
    eng.submit(req)
    wait_until(lambda: any(isinstance(e, TextDelta) for e in req.sink.events))
    req.cancel()
    assert req.sink.done.wait(5)
    c = submit(eng, [1, 2, 3, 4], max_tokens=1)
    assert c.done.wait(5)
    eng.stop()
    assert eng.prefix_tokens_reused == 0 and 0 in be.cleared


# --- hardening (issue 12) --------------------------------------------------------------------


def test_the_earliest_stop_string_wins_not_the_first_listed() -> None:
    text = TextAssembler(["cd", "b"])
    assert text.feed(b"abcd") == ("a", True)


def test_max_batch_size_above_n_batch_is_refused_naming_both() -> None:
    with pytest.raises(ValueError, match=r"max_batch_size \(9\).*n_batch \(8\)"):
        Engine(FakeBackend(), max_batch_size=9, queue_size=1, context_size=64)


def test_cancelled_waiting_requests_are_purged_when_the_queue_is_full() -> None:
    be, eng, first = held_engine()
    gone = [GenerationRequest([1], SamplingParams(max_tokens=1), Collector()) for _ in range(2)]
    for req in gone:
        eng.submit(req)
        req.cancel()  # the client left while it waited
    live = submit(eng, [1], max_tokens=1)  # not refused: the cancelled ones make room
    assert all(req.sink.final == Finished("cancelled", 1, 0) for req in gone)
    assert eng.queued == 1
    submit(eng, [1], max_tokens=1)
    with pytest.raises(Overloaded):  # live requests still count
        submit(eng, [1], max_tokens=1)
    be.gate.set()
    assert first.done.wait(5) and live.done.wait(5)
    eng.stop()


def test_stalled_for_counts_only_while_sequences_run() -> None:
    be = FakeBackend()
    be.gate = threading.Event()
    eng = make_engine(be, max_batch_size=1)
    assert eng.stalled_for() == 0.0
    c = submit(eng, [1], max_tokens=2)
    wait_until(lambda: eng.stalled_for() > 0.05, timeout=5)
    be.gate.set()
    assert c.done.wait(5)
    wait_until(lambda: eng.running == 0, timeout=5)
    assert eng.stalled_for() == 0.0
    eng.stop()


# --- building the batch (no engine thread) ---------------------------------------------------


def _seq(slot: int, prompt: list[int], n_past: int = 0, next_token: int | None = None):
    from llamafleet.inference.engine import DECODE, _Sequence

    seq = _Sequence(GenerationRequest(prompt, SamplingParams(), Collector()), slot, None,
                    TextAssembler(()), n_past=n_past)
    if next_token is not None:
        seq.state, seq.next_token = DECODE, next_token
    return seq


def test_batch_gives_the_budget_to_the_shortest_prompt_first_and_keeps_slot_order() -> None:
    from llamafleet.inference.engine import build_batch

    long = _seq(0, list(range(100, 110)))  # 10 prompt tokens, none cached
    dec = _seq(1, [1, 2], n_past=3, next_token=7)
    short = _seq(2, [50, 51, 52], n_past=1)  # 1 token reused from the prefix cache
    b = build_batch([long, dec, short], n_batch=8)
    # The short prompt (2 left) gets its budget before the long one, which takes the rest;
    # the tokens go in slot order, each sequence's together (one ubatch per run of
    # consecutive slots with split KV streams).
    assert b.tokens == [100, 101, 102, 103, 104, 7, 51, 52]
    assert b.pos == [0, 1, 2, 3, 4, 3, 1, 2]
    assert b.seqs == [0, 0, 0, 0, 0, 1, 2, 2]
    assert b.logits == [False] * 5 + [True, False, True]  # the long chunk is not its last
    assert b.advance == [(long, 5), (dec, 1), (short, 2)]
    assert b.sample == [(dec, 5), (short, 7)]


def test_prefill_budget_bounds_prompt_tokens_of_a_step() -> None:
    from llamafleet.inference.engine import build_batch

    long = _seq(0, list(range(100, 140)))
    dec = _seq(1, [1, 2], n_past=3, next_token=7)
    b = build_batch([long, dec], n_batch=32, prefill_budget=6)
    assert b.advance == [(long, 6), (dec, 1)]
    alone = build_batch([_seq(0, list(range(100, 140)))], n_batch=32, prefill_budget=6)
    assert len(alone.tokens) == 6
    assert len(build_batch([_seq(0, list(range(100, 140)))], n_batch=32).tokens) == 32


def test_a_hurried_prompt_takes_the_prefill_budget_alone() -> None:
    """Another tenant's newcomer (``hurry``) prefills first, even when longer, and no other
    prompt gets a chunk beside it, nor (in its last chunk) any decoding token: its first
    token is not held by them."""
    from llamafleet.inference.engine import build_batch

    short = _seq(0, [50, 51])
    newcomer = _seq(1, list(range(60, 66)))
    newcomer.hurry = True
    dec = _seq(2, [1, 2], n_past=3, next_token=7)
    # Its last chunk goes without the decoding sequence too (a step as short as alone).
    b = build_batch([short, newcomer, dec], n_batch=32)
    assert b.advance == [(newcomer, 6)] and b.sample == [(newcomer, 5)]
    assert short.passed_over == 1
    assert b.alone
    # Never two steps in a row: another newcomer right after it takes the decoding
    # sequence along (however many tenants' newcomers arrive, decoding goes on).
    again = build_batch([short, newcomer, dec], n_batch=32, alone_ok=False)
    assert again.advance == [(newcomer, 6), (dec, 1)] and not again.alone
    # An earlier chunk of a longer one keeps the decoding sequences company.
    assert build_batch([short, newcomer, dec], n_batch=32, prefill_budget=4).advance == [
        (newcomer, 4), (dec, 1)]
    newcomer.state = dec.state  # prefilled: the others' prompts go on
    assert build_batch([short, newcomer, dec], n_batch=32).advance[0] == (short, 2)


def test_batch_samples_where_a_prompt_ends_and_leaves_finished_sequences_out() -> None:
    from llamafleet.inference.engine import DONE, build_batch

    a = _seq(0, [10, 11, 12], n_past=1)
    done = _seq(1, [5, 6], n_past=2, next_token=9)
    done.state = DONE
    b = _seq(2, [20])
    batch = build_batch([a, done, b], n_batch=8)
    assert batch.tokens == [11, 12, 20] and batch.pos == [1, 2, 0] and batch.seqs == [0, 0, 2]
    assert batch.logits == [False, True, True]
    assert batch.sample == [(a, 1), (b, 2)] and batch.advance == [(a, 2), (b, 1)]


@given(st.lists(st.tuples(st.integers(1, 20), st.integers(0, 19), st.booleans()),
                min_size=1, max_size=8), st.integers(8, 16))
def test_batch_bounds_hold_for_any_mix(shapes, n_batch) -> None:
    from llamafleet.inference.engine import build_batch

    seqs = []
    for slot, (length, cached, decoding) in enumerate(shapes):
        prompt = list(range(length))
        seqs.append(_seq(slot, prompt, n_past=length + 1, next_token=3) if decoding
                    else _seq(slot, prompt, n_past=min(cached, length - 1)))
    b = build_batch(seqs, n_batch)
    assert len(b.tokens) == len(b.pos) == len(b.seqs) == len(b.logits) <= n_batch
    assert sum(n for _, n in b.advance) == len(b.tokens)
    # Every decoding sequence is in (max_batch_size <= n_batch), each exactly once.
    assert [s for s, _ in b.advance if s.state.name == "DECODE"] == \
        [s for s in seqs if s.state.name == "DECODE"]
    for seq, index in b.sample:
        assert b.seqs[index] == seq.slot and b.logits[index]
    assert sum(b.logits) == len(b.sample)
    for seq, n in b.advance:  # a sequence's positions continue its cache, in order
        assert [p for p, s in zip(b.pos, b.seqs, strict=True) if s == seq.slot] == \
            list(range(seq.n_past, seq.n_past + n))


def test_startup_runs_on_the_engine_thread_before_any_request() -> None:
    be = FakeBackend()
    seen: list[str] = []
    eng = Engine(be, max_batch_size=4, queue_size=8, context_size=64)
    eng.start(startup=lambda b: seen.append(threading.current_thread().name))
    c = submit(eng, [1], max_tokens=1)
    assert c.done.wait(5)
    eng.stop()
    assert seen == ["llamafleet-engine"]


def test_a_failing_startup_is_raised_and_the_engine_never_runs() -> None:
    eng = Engine(FakeBackend(), max_batch_size=4, queue_size=8, context_size=64)

    def broken(_b: object) -> None:
        raise RuntimeError("self-test failed")

    with pytest.raises(RuntimeError, match="self-test failed"):
        eng.start(startup=broken)
    assert not eng.alive


def test_a_long_prompt_is_never_starved_by_short_ones() -> None:
    from llamafleet.inference.engine import PASSED_OVER_MAX, build_batch

    long = _seq(0, list(range(100, 140)))  # 40 tokens
    steps_without = 0
    for step in range(3 * PASSED_OVER_MAX):
        # Every step, two fresh short prompts that fill the whole budget between them.
        shorts = [_seq(1 + i, list(range(4 * step + 10 * i, 4 * step + 10 * i + 4))) for i in (0, 1)]
        b = build_batch([long, *shorts], n_batch=8)
        got = dict((s.slot, n) for s, n in b.advance).get(0, 0)
        if got:
            long.n_past += got
            break
        steps_without += 1
    assert steps_without == PASSED_OVER_MAX and long.n_past == 8


def test_a_request_that_does_not_stream_gets_its_text_in_one_delta_at_the_end() -> None:
    be = FakeBackend()
    e = make_engine(be)
    try:
        c = Collector()
        e.submit(GenerationRequest([1, 2], SamplingParams(max_tokens=5, stop=("9 ",)), c,
                                   stream=False))
        streamed = submit(e, [1, 2], max_tokens=5)
        assert c.done.wait(10) and streamed.done.wait(10)
        deltas = [ev for ev in c.events if isinstance(ev, TextDelta)]
        assert [d.text for d in deltas] == ["3 4 5 6 7 "]  # one delta, then Finished
        assert isinstance(c.events[-1], Finished) and c.events[-1].completion_tokens == 5
        assert streamed.text == "3 4 5 6 7 "
        assert len([ev for ev in streamed.events if isinstance(ev, TextDelta)]) > 1
    finally:
        e.stop()


def test_identical_prompts_arriving_together_prefill_their_prefix_once() -> None:
    """64 clients, one prompt: one sequence prefills it, the others wait one step and then
    take its cells, prefilling only their last token."""
    be = FakeBackend()
    be.n_batch = 128  # a whole prompt in one step
    e = make_engine(be, max_batch_size=8, context_size=256)
    prompt = list(range(100, 180))  # 80 tokens
    be.gate = threading.Event()  # hold the first step until all eight are queued
    try:
        cs = [submit(e, prompt, max_tokens=3) for _ in range(8)]
        be.gate.set()
        assert all(c.done.wait(10) for c in cs)
        assert all(c.text == "180 181 182 " for c in cs)
        prompt_tokens = sum(1 for toks, _, _, logits in be.batches for t in toks if t < 180)
        assert prompt_tokens == 80 + 7  # one whole prefill, then one token per follower
        assert sorted(dst for _, dst, _ in be.copied) == list(range(1, 8))
        assert {keep for _, _, keep in be.copied} == {79}
        assert e.cache.prefix_tokens_shared == 7 * 79
    finally:
        e.stop()


def test_seeded_requests_never_share_cells() -> None:
    be = FakeBackend()
    be.n_batch = 64
    e = make_engine(be, max_batch_size=4, context_size=256)
    prompt = list(range(100, 160))
    be.gate = threading.Event()
    try:
        cs = [submit(e, prompt, max_tokens=2, seed=7) for _ in range(3)]
        be.gate.set()
        assert all(c.done.wait(10) for c in cs)
        assert be.copied == []
    finally:
        e.stop()


def test_followers_wait_for_the_leader_of_a_long_common_prefix() -> None:
    """A prompt longer than a step: the others wait while one prefills it, then take its
    cells (at most the last stretch is computed again by each)."""
    be = FakeBackend()
    be.n_batch = 64
    e = make_engine(be, max_batch_size=4, context_size=512)
    prompt = [100 + (i % 50) for i in range(200)]
    try:
        cs = [submit(e, prompt, max_tokens=2) for _ in range(4)]
        assert all(c.done.wait(10) for c in cs)
        decoded = sum(len(toks) for toks, _, _, _ in be.batches)
        assert decoded - 4 * 2 < 200 + 3 * 64  # alone, each would have prefilled all 200
        assert e.cache.prefix_tokens_shared >= 3 * 128
    finally:
        e.stop()


def test_prefill_budget_applies_while_anyone_may_wait_for_the_step() -> None:
    """Bounded while a sequence decodes or a slot is free (a request may arrive for it);
    with every slot prefilling, nobody waits: whole n_batch chunks."""
    eng = Engine(FakeBackend(), max_batch_size=2, queue_size=8, context_size=64,
                 prefill_step_s=0.05)
    assert eng.prefill_budget() is None  # no cost per token measured yet
    eng._token_s = 0.001
    a = _seq(eng.cache.take([1, 2, 3])[0], list(range(40)))
    eng._running = [a]
    assert eng.prefill_budget() == 50  # a slot is free
    b = _seq(eng.cache.take([4, 5, 6])[0], list(range(40)))
    eng._running = [a, b]
    assert eng.prefill_budget() is None  # all slots prefilling
    b.state, b.next_token = DECODE, 7
    assert eng.prefill_budget() == 50  # b decodes
    eng._token_s = 1.0
    assert eng.prefill_budget() == MIN_PREFILL_CHUNK
