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
RATE_WEIGHT = 0.25  # weight of the latest verification in a sequence's acceptance rate


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

    __slots__ = ("k_max", "k", "rate", "_misses", "_skip", "_probe")

    def __init__(self, k: int, rate: float = 1.0):
        self.k_max = self.k = k
        # Draft tokens accepted per draft token, recent verifications weighing most; a new
        # sequence starts from what its kind of draft has achieved so far.
        self.rate = rate
        self._misses = 0
        self._skip = 0
        self._probe = False  # the next draft after a pause for a low rate: one token

    def length(self, limit: int, share: float | None = None) -> int:
        """Draft tokens this step, at most ``limit``: 0 while drafting is paused (each call
        counts one paused step). ``share``: the share of this step's time its tokens cost
        (``StepCost.token_share``): a draft token pays only where it is accepted more often
        than that. Below it the sequence pauses as after a miss, and drafts one token when
        the pause is over (what refreshes its rate)."""
        if self._skip:
            self._skip -= 1
            return 0
        if self._probe:
            self._probe = False
            return min(1, limit)
        if share is not None and self.rate < share:
            self.k, self._probe = 1, True
            self._pause()
            return 0
        return min(self.k, limit)

    def _pause(self) -> None:
        self._misses += 1
        self._skip = min(SKIP_MAX, 1 << (self._misses - 1))

    def verified(self, drafted: int, accepted: int) -> None:
        self.rate += RATE_WEIGHT * (accepted / drafted - self.rate)
        if accepted == drafted:
            self.k = min(self.k_max, self.k + 1)
            self._misses = 0
        elif accepted:
            self.k = accepted
            self._misses = 0
        else:
            self.k = 1
            self._pause()


class StepCost:
    """What a decode step costs by the tokens in it, learnt from the engine's own steps: a
    least-squares line, seconds = fixed + per_token x tokens, over recent steps (each weighs
    DECAY of the one after it).

    Where a step's time hardly grows with its tokens (a GPU: decoding reads the weights once
    for the whole batch) a draft token is nearly free, and any acceptance pays. Where it grows
    in proportion (a CPU of a few cores: a step of 5 tokens of the embedded SmolLM2 took 3.2x
    a step of 1, benchmarks/speculative.py's ``verify_cost``) a draft token costs what the
    batch's own tokens do, and pays only when it is accepted at least as often as the batch's
    tokens' share of the step: ``token_share``.

    A draft model's own decodes come on top (``observe_draft``): a round of them (one draft
    token for every drafting sequence) costs ``round`` seconds, and a step of B sequences that
    each draft k tokens pays k rounds for B x k draft tokens. Drafting then pays where
    rate x B x k x step(B) > B x (per_token x B x k + k x round), that is where the acceptance
    rate exceeds the tokens' share plus ``round / step(B)``."""

    DECAY = 0.98
    MIN_WEIGHT = 8.0  # steps (decayed) before the line is trusted
    MIN_SPREAD = 0.25  # variance of the steps' token counts below which no slope is known
    DRAFT_WEIGHT = 0.25  # weight of the latest draft-model call in its seconds per round

    __slots__ = ("_w", "_x", "_y", "_xx", "_xy", "_round")

    def __init__(self) -> None:
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self._round: float | None = None  # a draft model's seconds per round of drafts

    def observe(self, tokens: int, seconds: float) -> None:
        d = self.DECAY
        self._w = self._w * d + 1.0
        self._x = self._x * d + tokens
        self._y = self._y * d + seconds
        self._xx = self._xx * d + tokens * tokens
        self._xy = self._xy * d + tokens * seconds

    def line(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per token), or None while unknown: too few steps, or all of
        about one size (the slope cannot be told from the fixed part)."""
        w = self._w
        if w < self.MIN_WEIGHT:
            return None
        mx, my = self._x / w, self._y / w
        var = self._xx / w - mx * mx
        if var < self.MIN_SPREAD:
            return None
        per_token = max((self._xy / w - mx * my) / var, 0.0)
        return max(my - per_token * mx, 0.0), per_token

    def observe_draft(self, rounds: int, seconds: float) -> None:
        """``rounds`` rounds of a draft model's drafting took ``seconds`` (its catch-up with
        the accepted tokens left out: after a pause it is long, and timing it as rounds
        would make the pause longer still)."""
        per_round = seconds / max(rounds, 1)
        r = self._round
        self._round = per_round if r is None else r + self.DRAFT_WEIGHT * (per_round - r)

    def token_share(self, tokens: int, draft_model: bool = False) -> float | None:
        """The acceptance rate a draft token must beat in a step of ``tokens`` tokens: the
        share of the step that is the tokens' own cost (0: a step's time does not grow with
        its tokens; near 1: it grows in proportion), plus, for a draft model, its round's time
        over the step's. None while unknown (then every draft is let through: drafts are what
        make steps differ in size)."""
        line = self.line()
        if line is None:
            return None
        fixed, per_token = line
        total = fixed + per_token * tokens
        if total <= 0:
            return None
        share = per_token * tokens / total
        if draft_model and self._round is not None:
            share += self._round / total
        return share


class NgramLookup(AdaptiveLength):
    """The trigrams of one sequence's accepted tokens (prompt and output) and where each last
    ended, updated as tokens are accepted; its drafts' length adapts (AdaptiveLength)."""

    __slots__ = ("tokens", "_index")

    def __init__(self, k: int, rate: float = 1.0):
        super().__init__(k, rate)
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

    def draft(self, next_token: int, limit: int, share: float | None = None) -> list[int]:
        """Up to ``min(k, limit)`` tokens to follow ``next_token`` (sampled, not yet in the
        cache): what followed the latest earlier occurrence of the trigram ending in it."""
        n = self.length(limit, share)
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
