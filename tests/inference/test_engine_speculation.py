"""Prompt-lookup speculation in the engine, against the fake model boundary: drafts are
verified in the step's one decode, the longest agreeing prefix is kept, the rest of the cells
are dropped, and the output is what it is without speculation."""

from __future__ import annotations

import threading

import pytest
from llamafleet.common.contract import SPECULATIVE_K_DEFAULT
from llamafleet.inference.draft_model import DraftModel
from llamafleet.inference.engine import Engine, Finished, GenerationRequest, SamplingParams, TextDelta
from llamafleet.inference.speculative import SKIP_MAX, AdaptiveLength, NgramLookup, StepCost

from tests.support.fake_backend import (
    EOG,
    Collector,
    FakeBackend,
    FixedStepCost,
    make_engine,
    submit,
)


def cycle(n: int):
    """1 -> 2 -> ... -> n -> 1: an answer that repeats itself, so drafts agree."""
    return lambda t: t % n + 1


def run(prompt: list[int], k: int, follows=None, max_batch_size: int = 4,
        share: float | None = None, **params):
    be = FakeBackend(follows=follows)
    eng = make_engine(be, max_batch_size=max_batch_size, context_size=256, speculative_k=k,
                      step_cost=FixedStepCost(share))
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

    assert (Settings().speculative, Settings().speculative_k) == ("none", SPECULATIVE_K_DEFAULT)
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


def test_draft_mode_needs_a_draft_model_and_a_draft_model_needs_draft_mode(monkeypatch) -> None:
    import argparse

    from llamafleet.common import cli
    from llamafleet.inference.settings import Settings
    from pydantic import ValidationError

    p = argparse.ArgumentParser()
    cli.add_settings_flags(p, Settings)
    s = cli.load_settings(p.parse_args(["--speculative", "draft", "--draft-model", "d.gguf"]),
                          Settings)
    assert (s.speculative, s.draft_model) == ("draft", "d.gguf")
    with pytest.raises(ValidationError, match="speculative 'draft' needs "
                       r"LLM_LLAMA_SERVICE_DRAFT_MODEL \(--draft-model\)"):
        Settings(speculative="draft")
    monkeypatch.setenv("LLM_LLAMA_SERVICE_DRAFT_MODEL", "d.gguf")
    with pytest.raises(ValidationError, match=r"LLM_LLAMA_SERVICE_DRAFT_MODEL \(--draft-model\) is "
                       "set but speculative is 'ngram'"):
        Settings(speculative="ngram")
    with pytest.raises(ValueError, match="a draft model needs speculative_k >= 1"):
        Engine(FakeBackend(), max_batch_size=2, queue_size=1, context_size=64,
               draft_model=DraftModel(FakeDraftBackend(), 2, lambda t: t == EOG))


class FakeDraftBackend:
    """The draft model's context, faked: the token after t is t + 1; each sequence's cells are
    a list, and a decode must continue it exactly where it ends (no hole, no overwrite)."""

    def __init__(self, n_batch: int = 8):
        self.n_batch = n_batch
        self.cells: dict[int, list[int]] = {}
        self.decodes: list[tuple[list[int], list[int], list[int]]] = []
        self._at: dict[int, int] = {}

    def decode(self, tokens, pos, seq, logits) -> None:
        for t, p, s in zip(tokens, pos, seq, strict=True):
            cells = self.cells.setdefault(s, [])
            assert p == len(cells), (s, p, cells)
            cells.append(t)
        self.decodes.append((list(tokens), list(pos), list(seq)))
        self._at = {i: t for i, (t, want) in enumerate(zip(tokens, logits, strict=True)) if want}

    def argmax(self, batch_indices) -> list[int]:
        return [self._at[i] + 1 for i in batch_indices]

    def clear_sequence(self, seq_id: int) -> None:
        self.cells[seq_id] = []

    def trim_sequence(self, seq_id: int, keep: int) -> bool:
        del self.cells.setdefault(seq_id, [])[keep:]
        return True


def test_the_draft_model_catches_up_in_bounded_steps_trims_rejections_and_frees_slots() -> None:
    be = FakeDraftBackend(n_batch=8)
    dm = DraftModel(be, 2, lambda t: t == EOG)
    prompt = list(range(10, 22))  # 12 tokens: more than one draft batch holds
    # Step 1: 8 of the prompt's tokens fit; no draft yet. Step 2: the rest and the next token.
    assert dm.draft([(1, [*prompt, 22], 3)]) == [[]]
    assert dm.draft([(1, [*prompt, 22], 3)]) == [[23, 24, 25]]
    assert be.cells[1] == [*prompt, 22, 23, 24] and dm.cells(1) == 15
    # 23 accepted, then the served model said 30: the cells of 24 go, 23 and 30 come in, and
    # two sequences draft in the same decodes.
    assert dm.draft([(0, [5, 6], 2), (1, [*prompt, 22, 23, 30], 2)]) == [[7, 8], [31, 32]]
    assert be.cells[1] == [*prompt, 22, 23, 30, 31]
    assert be.decodes[-1] == ([7, 31], [2, 15], [0, 1])  # one round for both
    # A draft stops at an end of generation; a slot taken by another request starts over.
    assert dm.draft([(0, [EOG - 1], 4)]) == [[EOG]]
    dm.release(1)
    assert be.cells[1] == [] and dm.cells(1) == 0


def test_an_engine_with_a_draft_model_emits_what_it_would_without_and_frees_the_draft_cells() -> None:
    def run_with(draft: bool, **params):
        be, dbe = FakeBackend(), FakeDraftBackend(n_batch=8)
        eng = Engine(be, max_batch_size=2, queue_size=4, context_size=256,
                     speculative_k=4 if draft else 0,
                     draft_model=DraftModel(dbe, 2, be.is_eog) if draft else None)
        eng.start()
        c = submit(eng, [1, 2, 3], **params)
        assert c.done.wait(5)
        eng.stop()
        return c, eng, dbe

    off, _, _ = run_with(False, max_tokens=20)
    on, eng, dbe = run_with(True, max_tokens=20)
    assert on.text == off.text and on.final == off.final
    stats = eng.speculation["draft"]
    # The fake draft model agrees with the fake model: every draft token is accepted.
    assert stats.drafted >= 10 and stats.accepted == stats.drafted
    assert eng.speculation["ngram"].drafted == 0
    assert all(not cells for cells in dbe.cells.values())  # released with the sequence


class PartlyWrongDraftBackend(FakeDraftBackend):
    """A draft model that agrees with the fake model (t + 1 after t) except after every
    third token: about two of three draft tokens are accepted."""

    def argmax(self, batch_indices) -> list[int]:
        return [self._at[i] + (2 if self._at[i] % 3 == 0 else 1) for i in batch_indices]


def test_a_draft_models_own_time_raises_the_acceptance_its_drafts_must_beat() -> None:
    def run_with(step_cost: FixedStepCost | None) -> tuple[Collector, Engine]:
        be = FakeBackend()
        eng = Engine(be, max_batch_size=2, queue_size=4, context_size=256,
                     speculative_k=4 if step_cost else 0, step_cost=step_cost,  # type: ignore[arg-type]
                     draft_model=DraftModel(PartlyWrongDraftBackend(), 2, be.is_eog)
                     if step_cost else None)
        eng.start()
        c = submit(eng, [1, 2, 3], max_tokens=60)
        assert c.done.wait(5)
        eng.stop()
        return c, eng

    off, _ = run_with(None)
    cheap_cost, dear_cost = FixedStepCost(0.3), FixedStepCost(0.3, draft=0.6)
    cheap, eng_cheap = run_with(cheap_cost)
    dear, eng_dear = run_with(dear_cost)
    assert cheap.text == dear.text == off.text
    rate = eng_cheap.speculation["draft"].accepted / eng_cheap.speculation["draft"].drafted
    assert 0.3 < rate < 0.9  # worth drafting at a share of 0.3, not at 0.3 + 0.6
    # Where the draft model's rounds cost 60% of a step, the sequence soon drafts only the
    # odd probe token; where they cost nothing, it keeps drafting.
    assert eng_dear.speculation["draft"].drafted < eng_cheap.speculation["draft"].drafted / 2
    # The engine reports the draft model's timed rounds: those after a draft's first decode.
    assert cheap_cost.draft_calls and max(cheap_cost.draft_calls) <= 3


# --- what a draft token costs, and who drafts then ---------------------------------------
def test_the_step_cost_line_is_learnt_from_steps_of_different_sizes() -> None:
    cpu, gpu, flat = StepCost(), StepCost(), StepCost()
    for i in range(40):
        n = 1 + i % 5
        cpu.observe(n, 0.004 + 0.005 * n)  # a CPU: each token costs about what the step does
        gpu.observe(n, 0.010 + 0.0001 * n)  # a GPU: the weights are read once per step
        flat.observe(3, 0.02)  # one size only: no slope can be told
    fixed, per_token = cpu.line()
    assert fixed == pytest.approx(0.004) and per_token == pytest.approx(0.005)
    assert cpu.token_share(1) == pytest.approx(5 / 9)
    assert cpu.token_share(8) == pytest.approx(40 / 44)
    assert gpu.token_share(1) < 0.02
    assert flat.line() is None and flat.token_share(1) is None
    assert StepCost().token_share(1) is None  # nothing seen yet
    # A draft model's rounds come on top of the tokens' share, for draft-model drafts only:
    # 3 ms a round against a 9 ms step of one token.
    assert cpu.token_share(1, draft_model=True) == pytest.approx(5 / 9)  # no round seen yet
    cpu.observe_draft(4, 0.012)
    assert cpu.token_share(1, draft_model=True) == pytest.approx(5 / 9 + 3 / 9)
    assert cpu.token_share(1) == pytest.approx(5 / 9)
    cpu.observe_draft(1, 0.007)  # recent calls weigh most: 3 + 0.25 x (7 - 3) = 4 ms
    assert cpu.token_share(8, draft_model=True) == pytest.approx(40 / 44 + 4 / 44)


def test_a_sequence_accepted_less_often_than_its_tokens_cost_pauses_then_probes() -> None:
    a = AdaptiveLength(4)
    assert a.length(10, share=0.9) == 4  # a new sequence's rate: its kind's so far (here 1.0)
    a.verified(4, 2)  # rate 1.0 -> 0.875, k 2
    assert a.rate == pytest.approx(0.875)
    assert a.length(10, share=0.5) == 2  # worth it where tokens cost half a step
    assert a.length(10, share=0.9) == 0  # not where they cost 90%: paused one step,
    assert a.length(10, share=0.9) == 0
    assert a.length(10, share=0.9) == 1  # then one token, to refresh the rate
    a.verified(1, 1)
    assert a.rate > 0.9 and a.length(10, share=0.9) == 2
    # Below the share every time: the pauses grow to SKIP_MAX steps between probes.
    b = AdaptiveLength(4, rate=0.1)
    lengths = [b.length(10, share=0.5) for _ in range(200)]
    probes = [k for k, n in enumerate(lengths) if n]
    assert len(probes) > 3 and all(lengths[k] == 1 for k in probes)
    assert probes[-1] - probes[-2] == SKIP_MAX + 2  # a pause, the refused step, the probe


def test_costly_draft_tokens_are_drafted_only_by_sequences_that_earn_them() -> None:
    # Each trigram of the cycle first comes in the prompt followed by 9: the first round's
    # drafts are wrong, the later ones (from the answer itself) right.
    prompt = [t for i in range(6) for t in ((i % 6) + 1, (i + 1) % 6 + 1, (i + 2) % 6 + 1, 9)]
    off, _, _ = run(prompt + [1, 2], 0, cycle(6), max_tokens=60)
    free, be_free, _ = run(prompt + [1, 2], 4, cycle(6), max_tokens=60)
    dear, be_dear, eng = run(prompt + [1, 2], 4, cycle(6), max_tokens=60, share=0.9)
    assert free.text == dear.text == off.text
    # Paused by its low rate, it drafts one token now and then until its rate is back.
    assert 0 < drafted_rows(be_dear) < drafted_rows(be_free)
    assert any(sum(logits) > 2 for _, _, _, logits in be_dear.batches)  # and then more
    # A sequence whose drafts all agree keeps drafting whatever a token costs.
    on, be, eng = run([1, 2, 3, 4, 5, 6, 1, 2], 4, cycle(6), max_tokens=24, share=0.99)
    assert eng.speculation["ngram"].accepted >= 14 and len(be.batches) < 12


def test_a_new_sequence_starts_from_its_kinds_acceptance_so_far() -> None:
    be = FakeBackend()
    eng = make_engine(be, context_size=256, speculative_k=4, step_cost=FixedStepCost(0.9))
    first = submit(eng, [4, 5, 6, 99, 4, 5], max_tokens=12)  # its one draft is rejected
    assert first.done.wait(5)
    stats = eng.speculation["ngram"]
    assert stats.drafted == 4 and stats.accepted == 0
    before = len(be.batches)
    second = submit(eng, [4, 5, 6, 99, 4, 5], max_tokens=12)
    assert second.done.wait(5)
    eng.stop()
    # Its rate starts at 0 (0 of 4 so far) < 0.9: it pauses before it drafts at all.
    assert all(sum(logits) <= 1 for _, _, _, logits in be.batches[before:before + 2])
