"""The host-RAM prompt cache's bookkeeping (pure): LRU by bytes, longest shared prefix."""

from __future__ import annotations

from llamafleet.inference.prompt_cache import PromptCache, shared_prefix


def test_longest_shared_prefix_wins_and_is_refreshed() -> None:
    c = PromptCache(limit_bytes=100, min_tokens=2)
    c.put([1, 2, 3, 4], b"a" * 10)
    c.put([1, 2, 9], b"b" * 10)
    c.put([7, 8], b"c" * 10)
    tokens, state, n = c.longest([1, 2, 3, 4, 5])
    assert (tokens, state, n) == ((1, 2, 3, 4), b"a" * 10, 4)
    assert c.longest([1, 2, 9, 9])[2] == 3
    assert c.longest([5, 5]) is None
    assert shared_prefix([1, 2, 3], [1, 2]) == 2 and shared_prefix([], [1]) == 0


def test_bytes_bound_evicts_least_recently_used() -> None:
    c = PromptCache(limit_bytes=25, min_tokens=1)
    c.put([1], b"x" * 10)
    c.put([2], b"y" * 10)
    c.longest([1])  # 1 is now the most recently used
    c.put([3], b"z" * 10)  # 30 bytes > 25: the least recently used (2) goes
    assert [1] in c and [3] in c and [2] not in c
    assert c.bytes == 20 and len(c) == 2
    c.put([4], b"w" * 26)  # larger than the whole cache: not kept, nothing evicted
    assert [4] not in c and len(c) == 2


def test_only_new_prompts_long_enough_are_worth_a_copy() -> None:
    c = PromptCache(limit_bytes=100, min_tokens=3)
    assert not c.wants([1, 2])
    assert c.wants([1, 2, 3])
    c.put([1, 2, 3], b"s")
    assert not c.wants([1, 2, 3])  # held already (and refreshed)
    c.put([1, 2, 3], b"longer")  # replaced, bytes recounted
    assert c.bytes == len(b"longer")


def test_an_entry_the_new_one_serves_as_well_makes_room() -> None:
    c = PromptCache(limit_bytes=1000, min_tokens=4)
    system_a, system_b = list(range(100, 164)), list(range(200, 264))
    c.put(system_a + [1, 2], b"a1")
    c.put(system_b + [1], b"b1")
    c.put(system_a + [3, 4, 5], b"a2")  # same tenant, another question: replaces a1
    assert len(c) == 2 and system_a + [1, 2] not in c and system_b + [1] in c
    c.put(system_b + [1, 7, 8, 9] + list(range(40)), b"b2")  # the conversation goes on
    assert system_b + [1] not in c and len(c) == 2
    c.put(system_a[:40] + list(range(900, 960)), b"other")  # shares too little: both stay
    assert len(c) == 3 and c.bytes == 2 + 2 + 5
