"""Which sequence slot a request takes, and what the KV cells of free slots still hold.

The scheduler (:class:`~llamafleet.inference.engine.Engine`) admits, steps and applies; this
class owns the cache policy behind a small interface (vLLM splits its ``KVCacheManager`` from
the scheduler the same way):

* :meth:`SlotCache.take`: a free slot for a prompt, and how many of its tokens are already in
  the slot's cells (from the slot itself, or copied in from the host-RAM prompt cache);
* :meth:`SlotCache.saved_prompt`: right after a prefill, a copy of the sequence's state into
  the host-RAM prompt cache;
* :meth:`SlotCache.release`: a finished sequence's slot goes back, its cells kept for reuse or
  cleared.

A free slot's cells keep its last sequence's tokens, so a new request that starts the same way
(a shared system prompt, a chat's earlier turns) skips that part of the prefill; beyond the
slots, :class:`~llamafleet.inference.prompt_cache.PromptCache` keeps recent prompts' states in
host RAM. Without a useful prefix (``MIN_REUSE`` tokens in common, or half of what the slot
holds) a request takes:

* with one KV stream per sequence (``packed``), the lowest free slot: llama.cpp decodes the
  running sequences in one ubatch per run of consecutive slots
  (``llama_batch_allocr::split_equal``), so running sequences packed at the low slots decode
  in the fewest ubatches, and an extra ubatch costs every step a pass over the weights; what
  that slot held is usually in the host prompt cache;
* with one unified buffer, the lowest empty slot, else the lowest free one: a slot that holds
  another prompt keeps it for that prompt's next request (every prompt of a chat template
  shares its first few tokens with every slot, and taking the slot that shares them threw
  away another tenant's prefix while empty slots waited: benchmarks/prefix_routing.py).

Cells hold what a model computed under one LoRA adapter set (a request's ``adapters``, ``()``
for the base model): a slot's cells and a prompt cache entry are reused only by a request of
the same set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from .prompt_cache import MIN_REUSE, PromptCache, shared_prefix


class KVBackend(Protocol):
    """What the cache needs from the model boundary."""

    def clear_sequence(self, seq_id: int) -> None: ...

    def trim_sequence(self, seq_id: int, keep: int) -> bool:
        """Drop positions >= keep of a sequence; False if the cache cannot do that, or if
        the cells left cannot serve a continuation from ``keep`` (then the caller clears
        the sequence and prefills from scratch)."""
        ...

    def save_sequence(self, seq_id: int) -> bytes:
        """The sequence's KV state, serialized."""
        ...

    def restore_sequence(self, seq_id: int, state: bytes) -> bool:
        """Replace the sequence's cells with a saved state; False if it does not fit."""
        ...

    def copy_sequence(self, src: int, dst: int, keep: int) -> bool:
        """Make ``dst`` hold the first ``keep`` positions of ``src``; False if they cannot
        serve a continuation (``dst`` is then empty)."""
        ...


class SlotCache:
    """Free slots and what their cells hold; used only on the engine thread (``free`` may
    be read from any)."""

    def __init__(self, backend: KVBackend, n_slots: int, prompt_cache: PromptCache | None = None,
                 packed: bool = False):
        self.backend = backend
        self.prompt_cache = prompt_cache
        self.packed = packed  # one KV stream per sequence: keep running sequences at low slots
        self._free: set[int] = set(range(n_slots))
        self._cached: dict[int, list[int]] = {}  # free slot -> the tokens its cells hold
        self._cached_under: dict[int, tuple] = {}  # free slot -> the adapter set of its cells
        # Fewer tokens in common than this (and less than half of what a slot holds): the
        # match does not count (take). The prompt cache's own threshold when there is one.
        self.min_reuse = prompt_cache.min_tokens if prompt_cache is not None else MIN_REUSE
        self.prefix_tokens_reused = 0
        self.prefix_tokens_shared = 0  # copied between running sequences (share)
        self.prompt_cache_restores = 0

    @property
    def free(self) -> int:
        return len(self._free)

    def _empty(self) -> int | None:
        """The lowest free slot whose cells hold nothing."""
        return min((s for s in self._free if not self._cached.get(s)), default=None)

    def cached_tokens(self) -> int:
        """Cells that free slots keep for reuse."""
        return sum(map(len, self._cached.values()))

    def take(self, prompt: Sequence[int], reuse: bool = True,
             adapters: tuple = ()) -> tuple[int, int]:
        """A free slot for ``prompt``, preferring the one whose cached tokens share the longest
        prefix with it (the lowest slot among equals), unless that is fewer than
        ``min_reuse`` tokens and less than half of what the slot holds (then the lowest free
        slot if ``packed``, else the lowest empty one if any); returns (slot, tokens reused).

        ``reuse=False`` (a seeded request) starts from scratch: reused cells were computed in
        another batch shape, and llama.cpp's kernels are not batch-invariant, so only a full
        prefill reproduces a seeded request exactly.

        Only cells computed under the same ``adapters`` are reused."""
        best, best_len = min(self._free), 0
        from_slot = False
        if reuse:
            under = self._cached_under
            for slot in sorted(self._free):
                if under.get(slot, ()) != adapters:
                    continue
                n = shared_prefix(self._cached.get(slot, ()), prompt)
                if n > best_len:
                    best, best_len = slot, n
        if best_len < self.min_reuse and 2 * best_len < len(self._cached.get(best, ())):
            # Too little in common to count (see the module's docstring).
            other = min(self._free) if self.packed else self._empty()
            if other is not None and other != best:
                best, best_len = other, 0
        if reuse:
            restores = self.prompt_cache_restores
            best, best_len = self._restore_if_longer(prompt, best, best_len, adapters=adapters)
            from_slot = self.prompt_cache_restores == restores
        self._free.remove(best)
        keep = self._keep(best, best_len, len(prompt))
        if reuse and from_slot and best_len and not keep:
            # The slot's tokens matched but its cells no longer serve them (a sliding
            # window moved past the prefix while it generated): the host prompt cache holds
            # the prefix as it was right after its prefill.
            best, shared = self._restore_if_longer(prompt, best, 0, into=best, adapters=adapters)
            keep = self._keep(best, shared, len(prompt))
        self.prefix_tokens_reused += keep
        return best, keep

    def _keep(self, slot: int, matched: int, prompt_len: int) -> int:
        """Keeps the slot's first ``matched`` cells for a prompt when they still serve it,
        else clears the slot; returns the tokens kept."""
        cached = self._cached.pop(slot, ())
        self._cached_under.pop(slot, None)
        keep = min(matched, prompt_len - 1)  # re-decode at least one token for logits
        # trim_sequence also says whether what is left still serves the prompt (a sliding
        # window may have been overwritten): if not, a full prefill.
        if keep <= 0 or not self.backend.trim_sequence(slot, keep):
            if cached:
                self.backend.clear_sequence(slot)
            keep = 0
        return keep

    def _restore_if_longer(self, prompt: Sequence[int], best: int, best_len: int,
                           into: int | None = None, adapters: tuple = ()) -> tuple[int, int]:
        """When the host prompt cache shares more of the prompt than any free slot (under the
        same adapters), copy that state into a free slot (``into``, else the lowest empty one
        if any) and use it."""
        entry = self.prompt_cache.longest(prompt, adapters, longer_than=best_len) \
            if self.prompt_cache is not None else None
        if entry is None:
            return best, best_len
        tokens, state, shared = entry
        if into is None:
            empty = self._empty()
            into = best if empty is None else empty
        self._cached.pop(into, None)
        self._cached_under.pop(into, None)
        if not self.backend.restore_sequence(into, state):
            return into, 0
        self._cached[into] = list(tokens)
        if adapters:
            self._cached_under[into] = adapters
        self.prompt_cache_restores += 1
        return into, shared

    def share(self, src: int, dst: int, keep: int) -> bool:
        """A running sequence's first ``keep`` cells into another running sequence's slot
        (both prompts start the same way): that part of the prefill is skipped."""
        if not self.backend.copy_sequence(src, dst, keep):
            return False
        self.prefix_tokens_shared += keep
        return True

    def saved_prompt(self, slot: int, prompt: Sequence[int], reuse: bool = True,
                     adapters: tuple = ()) -> None:
        """Right after its prefill the sequence's cells hold exactly its prompt: keep a copy
        in the host prompt cache (seeded requests never reuse cells, so never saved)."""
        cache = self.prompt_cache
        if cache is None or not reuse or not cache.wants(prompt, adapters):
            return
        cache.put(prompt, self.backend.save_sequence(slot), adapters)

    def release(self, slot: int, tokens: list[int] | None, adapters: tuple = ()) -> None:
        """A slot is free again; ``tokens``: what its cells hold, kept for reuse (None:
        cleared), computed under ``adapters``."""
        try:
            if tokens is not None:
                self._cached[slot] = tokens
                if adapters:
                    self._cached_under[slot] = adapters
                else:
                    self._cached_under.pop(slot, None)
            else:
                self._cached.pop(slot, None)
                self._cached_under.pop(slot, None)
                self.backend.clear_sequence(slot)
        finally:
            self._free.add(slot)
