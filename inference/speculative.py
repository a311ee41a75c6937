"""Speculative decoding by prompt lookup: a sequence's draft is what followed the last
occurrence of its latest trigram in its own prompt and output.

Answers that quote their context (RAG, code edits, summaries, extraction) repeat long runs of
the prompt; there the tokens that followed the same few tokens before are a good guess of what
comes next, and the guess costs no model. The engine decodes the draft behind the sequence's
next token in the same ``llama_decode`` (every drafted position with logits), samples each
position in order with the sequence's own sampler, keeps the draft while it agrees with what
was sampled, and drops the KV cells of the rest (``Engine._verify``). Every token sampled is a
token emitted, in order, so greedy output is the same token for token and sampled output has
the same distribution; penalties, grammars and logprobs see the tokens as without speculation.

:class:`NgramLookup` is one sequence's index; :class:`AdaptiveLength`, its adaptive draft
length, is shared with the other kind of draft, a small model's (:mod:`.draft_model`), which the
engine verifies the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from llamafleet.common.contract import SPECULATIVE_K_MAX

K_MAX = SPECULATIVE_K_MAX  # draft tokens per sequence and step, at most (--speculative-k)
# Tokens matched: trigrams. With bigrams as a fallback, free text drafted as much but 20 of 63
# draft tokens were accepted, against 40 of 67 with trigrams alone (SmolLM2,
# benchmarks/speculative.py): a wrong draft costs batch rows for nothing.
NGRAM = 3
SKIP_MAX = 32  # steps a sequence whose drafts keep failing waits before it drafts again


@dataclass
class SpeculationStats:
    """Drafted and accepted tokens of one kind of draft, since start-up (engine thread writes,
    any thread reads: metrics)."""

    drafted: int = 0
    accepted: int = 0


class AdaptiveLength:
    """How long one sequence's drafts may be now, from how its last drafts fared.

    A draft accepted whole lets the next be one token longer (up to ``k``); a draft cut short
    makes the next as long as what was accepted (at least 1); a draft rejected at its first
    token also pauses drafting for 1, 2, 4 ... SKIP_MAX steps, so a sequence whose drafts miss
    (free text for prompt lookup, a draft model that disagrees) soon costs its batch nothing."""

    __slots__ = ("k_max", "k", "_misses", "_skip")

    def __init__(self, k: int):
        self.k_max = self.k = k
        self._misses = 0
        self._skip = 0

    def length(self, limit: int) -> int:
        """Draft tokens this step, at most ``limit``: 0 while drafting is paused (each call
        counts one paused step)."""
        if self._skip:
            self._skip -= 1
            return 0
        return min(self.k, limit)

    def verified(self, drafted: int, accepted: int) -> None:
        if accepted == drafted:
            self.k = min(self.k_max, self.k + 1)
            self._misses = 0
        elif accepted:
            self.k = accepted
            self._misses = 0
        else:
            self.k = 1
            self._misses += 1
            self._skip = min(SKIP_MAX, 1 << (self._misses - 1))


class NgramLookup(AdaptiveLength):
    """The trigrams of one sequence's accepted tokens (prompt and output) and where each last
    ended, updated as tokens are accepted; its drafts' length adapts (AdaptiveLength)."""

    __slots__ = ("tokens", "_index")

    def __init__(self, k: int):
        super().__init__(k)
        self.tokens: list[int] = []  # the sequence's tokens in the KV cache, as indexed
        self._index: dict[tuple[int, ...], int] = {}  # trigram -> where what followed starts

    def sync(self, prompt: Sequence[int], generated: Sequence[int]) -> None:
        """Index the tokens accepted since the last call (``prompt + generated``)."""
        n, p = len(self.tokens), len(prompt)
        if n < p:
            self._extend(prompt[n:])
            n = p
        if n - p < len(generated):
            self._extend(generated[n - p:])

    def _extend(self, new: Sequence[int]) -> None:
        tokens, index = self.tokens, self._index
        for t in new:
            tokens.append(t)
            end = len(tokens)
            if end >= NGRAM:
                index[tuple(tokens[end - NGRAM:])] = end

    def draft(self, next_token: int, limit: int) -> list[int]:
        """Up to ``min(k, limit)`` tokens to follow ``next_token`` (sampled, not yet in the
        cache): what followed the latest earlier occurrence of the trigram ending in it."""
        n = self.length(limit)
        tokens = self.tokens
        if not n or len(tokens) < NGRAM - 1:
            return []
        at = self._index.get((*tokens[len(tokens) - NGRAM + 1:], next_token))
        if at is None:
            return []
        out = tokens[at:at + n]
        if len(out) < n:  # the match ends at the newest token: next_token follows
            out.append(next_token)
        return out
