"""Prompt cache beyond the slots: KV states of recent prompts in host RAM (llama-server's
``--cache-ram``).

A replica's free sequence slots keep their prompts' KV cells, but there are only
``max_batch_size`` of them: tenants and conversations that take turns evict each other, and
each eviction costs a full prefill next time. After every prefill the engine copies the
sequence's state out (``llama_state_seq_get_data``) into this LRU, bounded in bytes; a
later request whose prompt shares a longer prefix with an entry than with any free slot
gets that state copied back into a slot (``llama_state_seq_set_data``) and prefills only
the rest. Entries hold the prompt alone (saved before generation), so a sliding-window
model's cells still reach back to the prompt's start when its prompt fits the window; the
engine's trim_sequence guard decides, as for slots, whether restored cells may be used.

Each entry belongs to the LoRA adapter set its cells were computed under (``adapters``, ``()``
for the base model); a lookup sees only the entries of its own set.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

# Prompt tokens in common below which reusing cells is not worth what it costs: a state's copy
# from host RAM, or a free slot's cells that another prompt may still want (every prompt of a
# chat template starts with the same few tokens).
MIN_REUSE = 32


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PromptCache:
    """(adapter set, token prefix) -> serialized sequence state, least recently used out
    first."""

    def __init__(self, limit_bytes: int, min_tokens: int = MIN_REUSE):
        self.limit_bytes = limit_bytes
        self.min_tokens = min_tokens
        self.bytes = 0
        self.evictions = 0  # entries pushed out to make room (LRU), since start-up
        self._entries: OrderedDict[tuple[tuple, tuple[int, ...]], bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, tokens: Sequence[int]) -> bool:
        """Whether the base model's entry for exactly these tokens is held."""
        return ((), tuple(tokens)) in self._entries

    def wants(self, tokens: Sequence[int], adapters: tuple = ()) -> bool:
        """Whether saving these tokens' state is worth its copy (long enough, not held)."""
        key = (adapters, tuple(tokens))
        if key in self._entries:
            self._entries.move_to_end(key)
            return False
        return len(key[1]) >= self.min_tokens

    def put(self, tokens: Sequence[int], state: bytes, adapters: tuple = ()) -> None:
        """Holds ``state`` for ``tokens``. An entry that the new one serves nearly as well
        goes: one that is a prefix of it (an earlier turn of the same conversation), or one
        that differs from it only in a short tail (the same system prompt with another
        question). Otherwise every question of a tenant would hold a copy of its system
        prompt, and a few busy tenants would push the others' prefixes out."""
        if len(state) > self.limit_bytes:
            return
        key = (adapters, tuple(tokens))
        for old in [k for k in self._entries if k[0] == adapters and self._served_by(k[1], key[1])]:
            self.bytes -= len(self._entries.pop(old))
        self._entries[key] = state
        self.bytes += len(state)
        while self.bytes > self.limit_bytes:
            _, old = self._entries.popitem(last=False)
            self.bytes -= len(old)
            self.evictions += 1

    def _served_by(self, old: tuple[int, ...], new: tuple[int, ...]) -> bool:
        n = shared_prefix(old, new)
        return n == len(old) or (n >= self.min_tokens and len(old) - n <= len(old) // 16)

    def longest(self, prompt: Sequence[int], adapters: tuple = (),
                longer_than: int = 0) -> tuple[tuple[int, ...], bytes, int] | None:
        """The entry of ``adapters`` sharing the longest prefix with ``prompt``, if it shares
        more than ``longer_than`` tokens and at least ``min_tokens``: (tokens, state, shared).
        Only that entry counts as used (LRU): one that shares a chat template's first tokens
        with every prompt would otherwise be refreshed by every lookup and outlive the
        prefixes that are reused."""
        best: tuple[tuple[int, ...], bytes, int] | None = None
        least = max(longer_than + 1, self.min_tokens)
        for (under, key), state in self._entries.items():
            if under != adapters:
                continue
            n = shared_prefix(key, prompt)
            if n >= least and (best is None or n > best[2]):
                best = (key, state, n)
        if best is not None:
            self._entries.move_to_end((adapters, best[0]))
        return best
