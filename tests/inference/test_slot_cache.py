"""Which slot a prompt takes (pure: SlotCache over a fake KV boundary). A chat template makes
every prompt share its first few tokens with every slot; that must not cost another tenant
the prefix its slot holds while empty slots are free."""

from __future__ import annotations

from llamafleet.inference.prompt_cache import PromptCache
from llamafleet.inference.slot_cache import SlotCache

TEMPLATE = [1, 2, 3, 4, 5]  # what every prompt starts with (a chat template's first tokens)


def tenant(n: int, question: int = 0, length: int = 60) -> list[int]:
    return TEMPLATE + [1000 * n + i for i in range(length)] + [question]


class KV:
    """Cells per sequence, as the engine's backend keeps them (only what SlotCache calls)."""

    def __init__(self) -> None:
        self.cleared: list[int] = []
        self.trimmed: list[tuple[int, int]] = []
        self.restored: list[int] = []

    def clear_sequence(self, seq_id: int) -> None:
        self.cleared.append(seq_id)

    def trim_sequence(self, seq_id: int, keep: int) -> bool:
        self.trimmed.append((seq_id, keep))
        return True

    def save_sequence(self, seq_id: int) -> bytes:
        return b"s" * 10

    def restore_sequence(self, seq_id: int, state: bytes) -> bool:
        self.restored.append(seq_id)
        return True

    def copy_sequence(self, src: int, dst: int, keep: int) -> bool:
        return True


def test_a_prompt_sharing_only_the_templates_tokens_takes_an_empty_slot() -> None:
    kv = KV()
    cache = SlotCache(kv, n_slots=3)
    slot, reused = cache.take(tenant(1))
    assert (slot, reused) == (0, 0)
    cache.release(slot, tenant(1) + [7, 8])
    # Tenant 2 shares the template (5 tokens) with slot 0: it takes empty slot 1 instead.
    slot, reused = cache.take(tenant(2))
    assert (slot, reused) == (1, 0)
    assert kv.trimmed == [] and kv.cleared == []
    cache.release(slot, tenant(2))
    # Tenant 1's next question finds its prefix where it left it.
    slot, reused = cache.take(tenant(1, question=9))
    assert (slot, reused) == (0, len(tenant(1)) - 1)


def test_a_prompt_that_continues_a_slots_cells_or_shares_most_of_them_takes_that_slot() -> None:
    cache = SlotCache(KV(), n_slots=2)
    short = [1, 2, 3, 4, 5, 6, 7, 8]  # shorter than min_reuse, all of it in common
    slot, _ = cache.take(short)
    cache.release(slot, short + [9])
    assert cache.take(short + [9, 10, 11]) == (0, 9)
    assert cache.take(tenant(2)) == (1, 0)
    cache.release(0, tenant(1) + [7])
    cache.release(1, tenant(2))
    # No empty slot left: the longest match, however short, as before.
    assert cache.take(tenant(3)) == (0, len(TEMPLATE))


def test_with_one_kv_stream_per_sequence_the_lowest_free_slot_wins_over_an_empty_one() -> None:
    """Packed (split KV streams): running sequences stay at consecutive low slots, one ubatch."""
    # Packed: slot 0 (its template tokens reused, tenant 1's prefix trimmed off); else slot 2.
    for packed, expect, trimmed in ((True, (0, len(TEMPLATE)), [(0, 5)]), (False, (2, 0), [])):
        kv = KV()
        cache = SlotCache(kv, n_slots=3, packed=packed)
        assert cache.take(tenant(1)) == (0, 0) and cache.take(tenant(2)) == (1, 0)
        cache.release(0, tenant(1))
        cache.release(1, tenant(2))
        assert cache.take(tenant(3)) == expect and kv.trimmed == trimmed


def test_a_cold_prompt_restores_from_host_ram_into_an_empty_slot_not_a_tenants() -> None:
    kv = KV()
    prompts = PromptCache(limit_bytes=100, min_tokens=8)
    cache = SlotCache(kv, n_slots=2, prompt_cache=prompts)
    prompts.put(tenant(3), b"t3")
    cache.release(0, tenant(1))
    slot, reused = cache.take(tenant(3, question=4))
    assert slot == 1 and reused == len(tenant(3)) - 1 and kv.restored == [1]
    assert kv.cleared == [] and kv.trimmed == [(1, reused)]


def test_a_lookup_that_shares_only_the_template_neither_restores_nor_refreshes() -> None:
    prompts = PromptCache(limit_bytes=20, min_tokens=8)  # room for two entries
    prompts.put(tenant(1), b"a" * 10)
    prompts.put(tenant(2), b"b" * 10)
    assert prompts.longest(tenant(1, question=3))[1] == b"a" * 10  # used: most recent
    assert prompts.longest(tenant(9)) is None  # 5 tokens in common: less than min_tokens
    prompts.put(tenant(3), b"c" * 10)  # the least recently *used* goes: tenant 2
    assert tenant(1) in prompts and tenant(2) not in prompts
    # Nothing longer than what a slot already shares: no entry, none refreshed.
    assert prompts.longest(tenant(1), longer_than=len(tenant(1))) is None


def test_the_engine_packs_slots_when_its_backend_keeps_one_kv_stream_per_sequence() -> None:
    from tests.support.fake_backend import FakeBackend, make_engine

    for layout in ("split", "unified"):
        backend = FakeBackend()
        backend.kv_layout = layout  # as LlamaBackend says
        engine = make_engine(backend)
        try:
            assert engine.cache.packed == (layout == "split")
        finally:
            engine.stop()


def test_four_tenants_on_a_replica_that_holds_four_are_prefilled_once_each() -> None:
    """The fleet benchmark's replica in small: 4 unified slots, a prompt cache of 4 states (and
    a stale one from before), 4 tenants asking in turn. Each tenant's system prompt is computed
    once; before, a template-deep match took another tenant's slot and every lookup refreshed
    the stale entry, so tenants were evicted and prefilled again."""
    import random

    kv = KV()
    prompts = PromptCache(limit_bytes=40, min_tokens=8)
    cache = SlotCache(kv, n_slots=4, prompt_cache=prompts)
    prompts.put(tenant(99), kv.save_sequence(0))  # a probe's state, never asked for again
    rng, cold, running = random.Random(7), [], []
    for _ in range(200):
        t = rng.randrange(4)
        prompt = tenant(t, question=rng.randrange(6))
        slot, reused = cache.take(prompt)
        if reused < len(tenant(t)) - 1:
            cold.append(t)
        cache.saved_prompt(slot, prompt)
        running.append((slot, prompt))
        if len(running) > rng.randrange(1, 4):  # one to three in flight
            done, gen = running.pop(0), [7, 8]
            cache.release(done[0], done[1] + gen)
    assert sorted(cold) == [0, 1, 2, 3]
