"""The engine's fake model boundary (our own ``Backend`` protocol, no llama.cpp) and the helpers
that drive an engine over it: the scheduler's tests (tests/inference/test_engine.py), the step
profile's, the start-up self-test's and the scripted pod's (tests/support/scripted.py)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from pathlib import Path

from llamafleet.common.errors import BadRequest
from llamafleet.inference.engine import (
    Engine,
    Failed,
    Finished,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)

EOG = 0


class FakeBackend:
    """Token t+1 follows t; each token's text is its number and a space. Token ``EOG``
    ends a sequence. Records every decode call so tests can inspect batches.

    Knobs: ``eog_from``, sample ``EOG`` instead of any token >= it; ``refused_grammar``,
    ``new_sampler`` refuses a request with that grammar (as llama.cpp refuses a bad one);
    ``follows``, the token that follows each token (instead of t+1)."""

    n_batch = 8

    def __init__(self, eog_from: int | None = None, refused_grammar: str | None = None,
                 follows=None):
        self.batches: list[tuple[list[int], list[int], list[int], list[bool]]] = []
        self.cleared: list[int] = []
        self.trimmed: list[tuple[int, int]] = []
        self.copied: list[tuple[int, int, int]] = []
        self.samplers: dict[int, SamplingParams] = {}
        self.eog_from = eog_from
        self.refused_grammar = refused_grammar
        self.follows = follows or (lambda t: t + 1)
        self._token_at: dict[int, int] = {}  # batch index -> token, for rows with logits
        self.gate: threading.Event | None = None
        self.nonfinite_logits = 0  # what logits_nonfinite() reports (start-up self-test)
        self.decode_error: Exception | None = None  # raised by every decode when set
        self.sample_batches: list[list[int]] = []  # the batch indices of each sample_batch
        self.adapters: tuple = ()  # the adapter set now applied (set_adapters)
        self.decode_adapters: list[tuple] = []  # the adapter set of each recorded decode
        self.adapter_changes: list[tuple] = []
        self.loaded: dict[int, Path] = {}  # load_adapter's handles
        self.freed: list[int] = []

    def new_sampler(self, params: SamplingParams):
        if self.refused_grammar is not None and params.grammar == self.refused_grammar:
            raise BadRequest("bad grammar")
        s = object()
        self.samplers[id(s)] = params
        return s

    def free_sampler(self, sampler) -> None:
        del self.samplers[id(sampler)]

    def decode(self, tokens: Sequence[int], pos: Sequence[int], seq: Sequence[int],
               logits: Sequence[bool]) -> None:
        if self.gate is not None:
            self.gate.wait(10)
        if self.decode_error is not None:
            raise self.decode_error
        self.batches.append((list(tokens), list(pos), list(seq), list(logits)))
        self.decode_adapters.append(self.adapters)
        self._token_at = {i: t for i, t in enumerate(tokens) if logits[i]}

    def sample_batch(self, samplers, indices) -> list[int]:
        self.sample_batches.append(list(indices))
        return [self.sample(s, i) for s, i in zip(samplers, indices, strict=True)]

    def sample(self, sampler, batch_index: int) -> int:
        nxt = self.follows(self._token_at[batch_index])
        if self.eog_from is not None and nxt >= self.eog_from:
            return EOG
        return nxt

    def logits_nonfinite(self, batch_index: int) -> int:
        return self.nonfinite_logits

    def token_bytes(self, token: int) -> bytes:
        return f"{token} ".encode()

    def is_eog(self, token: int) -> bool:
        return token == EOG

    def clear_sequence(self, seq_id: int) -> None:
        self.cleared.append(seq_id)

    def trim_sequence(self, seq_id: int, keep: int) -> bool:
        self.trimmed.append((seq_id, keep))
        return True

    def copy_sequence(self, src: int, dst: int, keep: int) -> bool:
        self.copied.append((src, dst, keep))
        return True

    def set_adapters(self, adapters: tuple) -> None:
        self.adapters = adapters
        self.adapter_changes.append(adapters)

    def load_adapter(self, path: Path) -> int:
        """A handle; a file whose name starts with "bad" is refused (as llama.cpp refuses a
        LoRA for another model)."""
        if path.name.startswith("bad"):
            raise BadRequest(f"llama.cpp could not load the LoRA adapter {path}", param="path")
        handle = len(self.loaded) + 1
        self.loaded[handle] = path
        return handle

    def free_adapter(self, handle: int) -> None:
        self.freed.append(handle)


_FINISHES = itertools.count()  # the order in which collectors saw their final event


class Collector:
    def __init__(self) -> None:
        self.events: list = []
        self.done = threading.Event()
        self.finished_at: int | None = None  # the place of its final event among all's

    def __call__(self, ev) -> None:
        self.events.append(ev)
        if isinstance(ev, (Finished, Failed)):
            self.finished_at = next(_FINISHES)
            self.done.set()

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextDelta))

    @property
    def final(self):
        finals = [e for e in self.events if isinstance(e, (Finished, Failed))]
        assert len(finals) == 1, self.events
        return finals[0]


class FixedStepCost:
    """A step cost (engine.StepCost's interface) of a fixed token share: the fake's steps
    take microseconds, whose noise must not decide whether a test's sequences draft. None:
    unknown, every draft let through."""

    def __init__(self, share: float | None = None, draft: float = 0.0):
        self.share, self.draft = share, draft  # draft: a draft model's round over a step
        self.draft_calls: list[int] = []  # rounds of each draft-model call observed

    def observe(self, tokens: int, seconds: float) -> None:
        pass

    def observe_draft(self, rounds: int, seconds: float) -> None:
        self.draft_calls.append(rounds)

    def token_share(self, tokens: int, draft_model: bool = False) -> float | None:
        if self.share is None:
            return None
        return self.share + (self.draft if draft_model else 0.0)


def make_engine(backend: FakeBackend, max_batch_size: int = 4, queue_size: int = 8,
                context_size: int = 64, speculative_k: int = 0,
                step_cost: FixedStepCost | None = None) -> Engine:
    e = Engine(backend, max_batch_size=max_batch_size, queue_size=queue_size,
               context_size=context_size, speculative_k=speculative_k,
               step_cost=step_cost or FixedStepCost())  # type: ignore[arg-type]
    e.start()
    return e


def submit(engine: Engine, prompt: list[int], **params) -> Collector:
    c = Collector()
    engine.submit(GenerationRequest(prompt, SamplingParams(**params), c))
    return c
