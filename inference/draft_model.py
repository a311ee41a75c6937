"""Speculative decoding with a draft model: a small model of the served model's vocabulary
(``--draft-model``) drafts each sequence's next tokens, greedily, from a KV cache of its own.

The engine treats its drafts as it treats prompt lookup's (:mod:`.speculative`): a draft is a
list of tokens behind the sequence's next token in the step's one batch, verified by the
sequence's own sampler (``Engine._verify``), so greedy output is the served model's token for
token whatever the draft model says. Who drafts, and how much, follows the same rules: only
the batch room of free slots, and a length that follows each sequence's acceptance
(:class:`.speculative.AdaptiveLength`).

The draft context has as many sequences as the served one, slot for slot. Before drafting,
a slot's draft cells must hold the sequence's accepted tokens: :meth:`DraftModel.draft` keeps
what they share with them, trims the rest (a rejected draft, or another request's tokens) and
decodes what is missing (the prompt at first, then each step's accepted tokens and next
token) in one batch for all drafting sequences, bounded by ``n_batch``: a long prompt catches
up over several steps and drafts once it has. Then each round decodes every draft's latest
token in one batch and takes the argmax. The engine frees a slot's draft cells when its
sequence leaves the slot (finished, cancelled, preempted); the draft context caches nothing
else, so the served model's slot and prompt caches work as without it and the draft model
decodes again what it lacks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from llamafleet.common.errors import ModelError

from .prompt_cache import shared_prefix

# Token ids whose text check_vocabulary compares, spread over the vocabulary (all of them
# for a vocabulary this small or smaller).
VOCAB_SAMPLE = 1024


class DraftBackend(Protocol):
    """What the draft model needs of its context (llama_backend.LlamaBackend has it)."""

    n_batch: int

    def decode(self, tokens: Sequence[int], pos: Sequence[int], seq: Sequence[int],
               logits: Sequence[bool]) -> None: ...

    def argmax(self, batch_indices: Sequence[int]) -> list[int]:
        """The most likely token at each batch index of the last decode."""
        ...

    def clear_sequence(self, seq_id: int) -> None: ...

    def trim_sequence(self, seq_id: int, keep: int) -> bool: ...


class DraftModel:
    """The draft model's context, and which tokens each of its sequences' cells hold.

    Used by the engine thread only."""

    def __init__(self, backend: DraftBackend, n_seq: int, is_eog: Callable[[int], bool]):
        self.backend = backend
        self.is_eog = is_eog  # a draft ends at an end-of-generation token: nothing follows it
        # The tokens in each slot's draft cells, positions 0 on.
        self._cells: list[list[int]] = [[] for _ in range(n_seq)]
        # The last draft's rounds after its first decode (one token for every unfinished
        # draft each) and their seconds: what a draft token costs, without the catch-up,
        # whose size depends on how long the sequence went without drafting (StepCost).
        self.rounds_timed: tuple[int, float] = (0, 0.0)

    def cells(self, slot: int) -> int:
        """How many of a slot's positions the draft context holds."""
        return len(self._cells[slot])

    def release(self, slot: int) -> None:
        """The slot's sequence left it: its draft cells go."""
        if self._cells[slot]:
            self.backend.clear_sequence(slot)
            self._cells[slot] = []

    def reset(self) -> None:
        """Forget every slot's cells (after a failed decode, what they hold is unknown)."""
        for slot in range(len(self._cells)):
            self.backend.clear_sequence(slot)
            self._cells[slot] = []

    def draft(self, wants: Sequence[tuple[int, list[int], int]]) -> list[list[int]]:
        """A draft for each ``(slot, tokens, n)``: ``tokens`` are the sequence's accepted
        tokens and its next token (the one the draft follows), ``n`` the most draft tokens.
        A draft is shorter when it reaches an end-of-generation token, and empty when the
        sequence's catch-up does not fit this step's batch."""
        backend = self.backend
        budget = backend.n_batch
        batch_tokens: list[int] = []
        pos: list[int] = []
        seqs: list[int] = []
        logits: list[bool] = []
        drafting: list[tuple[int, int, int]] = []  # (index in wants, slot, batch index)
        for i, (slot, tokens, n) in sorted(enumerate(wants), key=lambda w: w[1][0]):
            cells = self._cells[slot]
            # The next token's row is needed: decode it again if its cell is there already.
            keep = min(_common_prefix(cells, tokens), len(tokens) - 1)
            if keep < len(cells):
                if not backend.trim_sequence(slot, keep):
                    backend.clear_sequence(slot)
                    keep = 0
                del cells[keep:]
            if budget <= 0 or n <= 0:
                continue
            take = min(budget, len(tokens) - keep)
            budget -= take
            batch_tokens.extend(tokens[keep:keep + take])
            pos.extend(range(keep, keep + take))
            seqs.extend([slot] * take)
            logits.extend([False] * take)
            cells.extend(tokens[keep:keep + take])
            if keep + take == len(tokens):
                logits[-1] = True
                drafting.append((i, slot, len(batch_tokens) - 1))
        drafts: list[list[int]] = [[] for _ in wants]
        if not batch_tokens:
            return drafts
        backend.decode(batch_tokens, pos, seqs, logits)
        if not drafting:
            return drafts
        for (i, _, _), token in zip(drafting, backend.argmax([b for _, _, b in drafting]),
                                    strict=True):
            drafts[i].append(token)
        live = [(i, slot) for i, slot, _ in drafting]
        rounds, started = 0, time.perf_counter()
        # Each round decodes every unfinished draft's newest token, in slot order.
        while live := [(i, slot) for i, slot in live
                       if len(drafts[i]) < wants[i][2] and not self.is_eog(drafts[i][-1])]:
            batch_tokens = [drafts[i][-1] for i, _ in live]
            backend.decode(batch_tokens, [len(self._cells[slot]) for _, slot in live],
                           [slot for _, slot in live], [True] * len(live))
            for (i, slot), token, last in zip(live, backend.argmax(range(len(live))),
                                              batch_tokens, strict=True):
                self._cells[slot].append(last)
                drafts[i].append(token)
            rounds += 1
        self.rounds_timed = (rounds, time.perf_counter() - started)
        return drafts


TAIL = 32  # _common_prefix compares up to this many last tokens one by one


def _common_prefix(cells: list[int], tokens: list[int]) -> int:
    """How many first tokens ``cells`` and ``tokens`` share. Each step a slot's cells and
    its sequence's tokens differ, if at all, in their last few tokens (a rejected draft):
    whole-list comparisons settle the rest at C speed, instead of a Python loop over the
    whole context every step."""
    n = min(len(cells), len(tokens))
    if cells[:n] == tokens[:n]:
        return n
    head = max(0, n - TAIL)
    if cells[:head] == tokens[:head]:
        return head + shared_prefix(cells[head:n], tokens[head:n])
    return shared_prefix(cells, tokens)


def check_vocabulary(target, draft, draft_path: object) -> None:
    """ModelError, in one line, unless the draft model's vocabulary is the served model's: the
    same size, begin and end tokens, and the same text for a sample of ids spread over it. A
    draft is token ids, which only mean the same text in the same vocabulary."""
    why = None
    if draft.n_vocab != target.n_vocab:
        why = f"{draft.n_vocab} tokens, the served model has {target.n_vocab}"
    elif (draft.bos_text, draft.eos_text) != (target.bos_text, target.eos_text):
        why = (f"begin/end tokens {draft.bos_text!r}/{draft.eos_text!r}, the served model's "
               f"are {target.bos_text!r}/{target.eos_text!r}")
    else:
        step = max(1, target.n_vocab // VOCAB_SAMPLE)
        for token in range(0, target.n_vocab, step):
            if draft.token_bytes(token) != target.token_bytes(token):
                why = (f"token {token} is {draft.token_bytes(token)!r}, the served model's is "
                       f"{target.token_bytes(token)!r}")
                break
    if why is not None:
        raise ModelError(f"the draft model {draft_path} has another vocabulary than the served "
                         f"model ({why}): a draft model must share the served model's "
                         "vocabulary")
