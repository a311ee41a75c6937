"""Prompt-lookup speculation on the real model: greedy output with speculation is the output
without it, token for token, for prompts whose answers copy from them and for ones that do
not."""

from __future__ import annotations

from pathlib import Path

import pytest
from llamafleet.inference.engine import Engine, TextDelta
from llamafleet.inference.llama_backend import LlamaBackend, LlamaModel

from tests.support.fake_backend import FixedStepCost, submit

pytestmark = pytest.mark.integration

CONTEXT = ("The Harbour Street library opens at nine on weekdays and at ten on Saturdays. "
           "It is closed on Sundays and public holidays. Members may borrow up to eight "
           "books for three weeks; overdue books cost twenty cents a day.")
PROMPTS = [
    "<|im_start|>system\nYou answer by quoting the document exactly.<|im_end|>\n"
    f"<|im_start|>user\nDocument:\n{CONTEXT}\n\nCopy the document.<|im_end|>\n"
    "<|im_start|>assistant\n",
    f"<|im_start|>user\nDocument:\n{CONTEXT}\n\nRepeat the document exactly.<|im_end|>\n"
    '<|im_start|>assistant\nThe document says: "The Harbour Street library',
    "<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + ",
]


@pytest.fixture(scope="module")
def model(instruct_model_path: Path):
    m = LlamaModel(instruct_model_path, gpu_layers=0)
    yield m
    m.close()


# Penalties and logprobs see the tokens in order, as without speculation.
PENALISED = {"repeat_penalty": 1.2, "frequency_penalty": 0.2, "logprobs": 2}


def generate(model: LlamaModel, k: int) -> tuple[list, int]:
    be = LlamaBackend(model, n_seq=4, context_size=512, n_batch=128, threads=2)
    # Every draft let through (no cost-based pause): what is tested is the output, and
    # whether a pause comes depends on this machine's step times.
    eng = Engine(be, max_batch_size=4, queue_size=8, context_size=512, speculative_k=k,
                 step_cost=FixedStepCost())  # type: ignore[arg-type]
    eng.start()
    try:
        out = []
        runs = [(p, {}) for p in PROMPTS] + [(PROMPTS[0], PENALISED)]
        for prompt, params in runs:  # one at a time: a request alone is reproducible
            c = submit(eng, model.tokenize(prompt, add_bos=model.add_bos), temperature=0.0,
                       max_tokens=48, **params)
            assert c.done.wait(120)
            assert c.final.reason in ("stop", "length"), c.events
            out.append(c.events[1:])  # all but Started (its queue wait)
        return out, eng.speculation["ngram"].accepted
    finally:
        eng.stop()
        be.close()


def text(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def logprobs(events: list) -> list:
    return [lp for e in events if isinstance(e, TextDelta) for lp in e.logprobs]


def test_greedy_output_with_speculation_is_the_output_without(model: LlamaModel) -> None:
    off, _ = generate(model, 0)
    on, accepted = generate(model, 4)
    assert [text(run) for run in on] == [text(run) for run in off]
    assert [run[-1] for run in on] == [run[-1] for run in off]  # Finished: reason, counts
    lp_on, lp_off = logprobs(on[-1]), logprobs(off[-1])
    assert lp_on and [t.token for t in lp_on] == [t.token for t in lp_off]
    # The same rows, computed in another batch shape: equal up to the kernels' rounding.
    assert [t.logprob for t in lp_on] == pytest.approx([t.logprob for t in lp_off], abs=1e-3)
    assert accepted > 20  # the copying answers took drafts
