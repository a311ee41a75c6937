"""Prompt-lookup speculation in the engine, against the fake model boundary: drafts are
verified in the step's one decode, the longest agreeing prefix is kept, the rest of the cells
are dropped, and the output is what it is without speculation."""

from __future__ import annotations

import threading

import pytest
from llamafleet.inference.engine import Engine, Finished, GenerationRequest, SamplingParams, TextDelta
from llamafleet.inference.speculative import NgramLookup

from tests.support.fake_backend import EOG, Collector, FakeBackend, make_engine, submit


def cycle(n: int):
    """1 -> 2 -> ... -> n -> 1: an answer that repeats itself, so drafts agree."""
    return lambda t: t % n + 1


def run(prompt: list[int], k: int, follows=None, max_batch_size: int = 4, **params):
    be = FakeBackend(follows=follows)
    eng = make_engine(be, max_batch_size=max_batch_size, context_size=256, speculative_k=k)
    c = submit(eng, prompt, **params)
    assert c.done.wait(5)
    eng.stop()
    return c, be, eng


def drafted_rows(be: FakeBackend) -> int:
    """Positions decoded with logits beyond one per sequence and batch: the drafts."""
    return sum(sum(logits) - len({s for s, want in zip(seqs, logits, strict=True) if want})
               for _, _, seqs, logits in be.batches)


@pytest.mark.parametrize("prompt, follows, params", [
    ([1, 2, 3, 4, 5, 1, 2], cycle(5), {"max_tokens": 40}),
    ([4, 5, 6, 99, 4, 5], None, {"max_tokens": 12}),  # the draft after (4, 5, 6) is wrong
    ([7, 8, 9, 7, 8, 3, 7, 8, 9, 7], cycle(9), {"max_tokens": 30}),
])
def test_greedy_output_is_the_same_with_and_without_speculation(prompt, follows, params) -> None:
    off, be_off, _ = run(prompt, 0, follows, **params)
    on, be_on, eng = run(prompt, 4, follows, **params)
    assert on.text == off.text and on.final == off.final
    assert drafted_rows(be_off) == 0 and drafted_rows(be_on) > 0
    stats = eng.speculation["ngram"]
    assert stats.drafted == drafted_rows(be_on) and 0 <= stats.accepted <= stats.drafted


def test_an_agreeing_draft_takes_several_tokens_in_one_step() -> None:
    on, be, eng = run([1, 2, 3, 4, 5, 6, 1, 2], 4, cycle(6), max_tokens=24)
    assert on.final == Finished("length", 8, 24)
    # Without speculation: one prefill and 24 decodes; with it, far fewer steps.
    assert len(be.batches) < 12
    assert eng.speculation["ngram"].accepted >= 14


def test_a_rejected_draft_is_rolled_back_to_the_last_accepted_token() -> None:
    on, be, eng = run([4, 5, 6, 99, 4, 5], 4, None, max_tokens=6)
    assert on.text == "6 7 8 9 10 11 "
    # Step 2 decodes 6 with the draft [99, 4, 5, 6] behind it; the model says 7: 6 stays.
    tokens, pos, seqs, logits = be.batches[1]
    assert tokens == [6, 99, 4, 5, 6] and pos == [6, 7, 8, 9, 10] and all(logits)
    assert (seqs[0], 7) in be.trimmed
    assert eng.speculation["ngram"].accepted == 0


def test_max_tokens_reached_inside_an_accepted_draft() -> None:
    on, be, _ = run([1, 2, 3, 4, 5, 6, 1, 2], 4, cycle(6), max_tokens=3)
    assert on.final == Finished("length", 8, 3) and on.text == "3 4 5 "


def test_end_of_generation_inside_a_draft_stops() -> None:
    # After (1, 2) the prompt has 3, EOG, 7; the model agrees up to EOG.
    follows = {1: 2, 2: 3, 3: EOG}.get
    on, _, eng = run([1, 2, 3, EOG, 7, 1, 2], 4, follows, max_tokens=20)
    off, _, _ = run([1, 2, 3, EOG, 7, 1, 2], 0, follows, max_tokens=20)
    assert on.final == off.final == Finished("stop", 7, 1) and on.text == off.text == "3 "
    # The draft [EOG, 7, 1, 2] agreed at once: the sampled EOG ended the sequence.
    assert eng.speculation["ngram"].drafted == 4


def test_a_stop_string_inside_a_draft_ends_the_text_there() -> None:
    on, _, _ = run([1, 2, 3, 4, 5, 6, 1, 2], 4, cycle(6), max_tokens=30, stop=("5 6 1",))
    off, _, _ = run([1, 2, 3, 4, 5, 6, 1, 2], 0, cycle(6), max_tokens=30, stop=("5 6 1",))
    assert on.text == off.text == "3 4 "
    assert on.final == off.final and on.final.stop == "5 6 1"


def test_a_cancelled_speculating_sequence_stops_and_clears_its_slot() -> None:
    be = FakeBackend(follows=cycle(6))
    eng = make_engine(be, context_size=10**6, speculative_k=4)

    class CancelAfterTwo(Collector):
        def __call__(self, ev) -> None:
            super().__call__(ev)
            if sum(isinstance(e, TextDelta) for e in self.events) == 2:
                req.cancel()

    c = CancelAfterTwo()
    req = GenerationRequest([1, 2, 3, 4, 5, 6, 1, 2], SamplingParams(max_tokens=10**5), c)
    eng.submit(req)
    assert c.done.wait(5)
    eng.stop()
    assert c.final.reason == "cancelled"
    assert 0 in be.cleared


def test_nobody_drafts_while_every_slot_is_taken() -> None:
    be = FakeBackend(follows=cycle(6))
    eng = make_engine(be, max_batch_size=2, speculative_k=4)
    be.gate = gate = threading.Event()
    a = submit(eng, [1, 2, 3, 4, 5, 6, 1, 2], max_tokens=12)
    b = submit(eng, [2, 3, 4, 5, 6, 1, 2, 3], max_tokens=12)
    gate.set()
    assert a.done.wait(5) and b.done.wait(5)
    eng.stop()
    both = [i for i, (_, _, seqs, _) in enumerate(be.batches) if len(set(seqs)) == 2]
    assert both and all(sum(be.batches[i][3]) <= 2 for i in both)
    assert sum(be.batches[-1][3]) > 1  # alone again, b drafts


def test_a_failed_rollback_decodes_the_sequence_again_without_speculation() -> None:
    class NoTrim(FakeBackend):
        def trim_sequence(self, seq_id: int, keep: int) -> bool:
            super().trim_sequence(seq_id, keep)
            return False

    be = NoTrim()
    eng = make_engine(be, context_size=256, speculative_k=4)
    c = submit(eng, [4, 5, 6, 99, 4, 5], max_tokens=6)
    assert c.done.wait(5)
    eng.stop()
    assert c.text == "6 7 8 9 10 11 " and 0 in be.cleared
    # After the rollback failed the sequence decoded its tokens again, and drafted no more.
    assert [4, 5, 6, 99, 4, 5, 6] in [t for t, _, _, _ in be.batches]
    assert eng.speculation["ngram"].drafted == 4


@pytest.mark.parametrize("k", [-1, 17])
def test_k_out_of_range_is_refused(k: int) -> None:
    with pytest.raises(ValueError, match="speculative_k must be 0"):
        Engine(FakeBackend(), max_batch_size=2, queue_size=1, context_size=64, speculative_k=k)


def test_the_draft_length_follows_acceptance() -> None:
    lk = NgramLookup(4)
    lk.sync([1, 2, 3, 4, 5, 6, 7, 8, 1, 2], [])
    assert lk.draft(3, 10) == [4, 5, 6, 7]
    lk.verified(4, 2)
    assert lk.draft(3, 10) == [4, 5]
    lk.verified(2, 0)  # rejected at once: one step without a draft, then 1 token
    assert lk.draft(3, 10) == []
    assert lk.draft(3, 10) == [4]
    lk.verified(1, 1)
    assert lk.draft(3, 1) == [4]  # the caller's limit
    assert lk.draft(42, 10) == []  # no earlier (1, 2, 42)


def test_flags_and_env_choose_the_mode_and_k(monkeypatch) -> None:
    import argparse

    from llamafleet.common import cli
    from llamafleet.inference.settings import Settings
    from pydantic import ValidationError

    assert (Settings().speculative, Settings().speculative_k) == ("none", 4)  # off by default
    p = argparse.ArgumentParser()
    cli.add_settings_flags(p, Settings)
    s = cli.load_settings(p.parse_args(["--speculative", "ngram", "--speculative-k", "6"]),
                          Settings)
    assert (s.speculative, s.speculative_k) == ("ngram", 6)
    monkeypatch.setenv("LLM_LLAMA_SERVICE_SPECULATIVE_K", "17")
    with pytest.raises(ValidationError, match="speculative_k"):
        Settings()
    monkeypatch.setenv("LLM_LLAMA_SERVICE_SPECULATIVE_K", "4")
    monkeypatch.setenv("LLM_LLAMA_SERVICE_SPECULATIVE", "medusa")
    with pytest.raises(ValidationError, match="speculative"):
        Settings()


def test_the_metrics_count_drafted_and_accepted_tokens_by_kind() -> None:
    from llamafleet.inference.metrics import Metrics
    from prometheus_client import generate_latest

    _, _, eng = run([1, 2, 3, 4, 5, 6, 1, 2], 4, cycle(6), max_tokens=24)
    m = Metrics()
    m.follow(eng, 1024)
    text = generate_latest(m.registry).decode()
    stats = eng.speculation["ngram"]
    assert f'llamafleet_speculative_draft_tokens_total{{kind="ngram"}} {stats.drafted:.1f}' in text
    assert f'llamafleet_speculative_accepted_tokens_total{{kind="ngram"}} {stats.accepted:.1f}' \
        in text
    rate = stats.accepted / stats.drafted
    assert f'llamafleet_speculative_acceptance_rate{{kind="ngram"}} {rate}' in text
