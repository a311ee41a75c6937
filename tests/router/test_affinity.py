"""Prefix affinity (pure): chained block hashes, the ring, and bounded loads."""

from __future__ import annotations

from collections import Counter

from llamafleet.router.affinity import (
    Affinity,
    Ring,
    adapter_keys,
    block_hashes,
    load_bound,
    prompt_prefix,
)

SYSTEM = "You are the support bot of tenant {0}. " * 20


def _chat(tenant: int, turns: list[str]) -> dict:
    msgs = [{"role": "system", "content": SYSTEM.format(tenant)}]
    msgs += [{"role": "user", "content": t} for t in turns]
    return {"messages": msgs}


def test_the_prefix_is_every_message_but_the_last_or_the_prompt() -> None:
    a = prompt_prefix(_chat(1, ["hello"]))
    assert a == prompt_prefix(_chat(1, ["something else entirely"]))
    assert a != prompt_prefix(_chat(2, ["hello"]))
    assert prompt_prefix({"messages": [{"role": "user", "content": "only"}]}).endswith("only\x1e")
    assert prompt_prefix({"prompt": "abc"}) == "abc"
    assert prompt_prefix({"prompt": ["ab", "c"]}) == "abc"
    assert prompt_prefix({}) == ""
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]},
                          {"role": "user", "content": "y"}]}
    assert prompt_prefix(parts) == "user\x1fx\x1e"


def test_block_hashes_are_chained_so_equal_hashes_mean_equal_prefixes() -> None:
    a = block_hashes("a" * 100 + "b" * 100, 50)
    b = block_hashes("a" * 100 + "c" * 100, 50)
    assert len(a) == 4 and a[:2] == b[:2] and a[2] != b[2]
    # The same block text after a different prefix hashes differently.
    c = block_hashes("z" * 50 + "a" * 50, 50)
    assert c[1] != a[1]
    assert block_hashes("short", 256) == block_hashes("short", 256) and len(block_hashes("short", 256)) == 1
    assert block_hashes("", 256) == []


def test_the_ring_walks_each_backend_once_and_moves_few_keys_when_one_leaves() -> None:
    ring3, ring2 = Ring(["a", "b", "c"], 256), Ring(["a", "b"], 256)
    assert sorted(ring3.walk(12345)) == ["a", "b", "c"]
    keys = [block_hashes(f"tenant {i}", 256)[0] for i in range(600)]
    moved = [k for k in keys if next(ring3.walk(k)) != "c" and next(ring3.walk(k)) != next(ring2.walk(k))]
    assert moved == []  # only c's keys move
    share = Counter(next(ring3.walk(k)) for k in keys)
    assert all(120 < n < 300 for n in share.values()), share


def test_same_prefix_sticks_to_one_backend_and_a_longer_match_wins() -> None:
    aff = Affinity(vnodes=64, factor=1.25, entries=1000)
    loads = {"a": 0.0, "b": 0.0, "c": 0.0}
    first, hit = aff.pick(block_hashes(SYSTEM.format(7), 64), loads)
    assert not hit
    again, hit = aff.pick(block_hashes(SYSTEM.format(7) + "more turns", 64), loads)
    assert (again, hit) == (first, True)


def test_no_backend_takes_more_than_the_bound() -> None:
    aff = Affinity(vnodes=64, factor=1.25, entries=1000)
    loads = {"a": 0.0, "b": 0.0, "c": 0.0}
    blocks = block_hashes(SYSTEM.format(1), 64)  # one hot tenant
    for _ in range(30):
        bound = load_bound(loads, 1.25)
        chosen, _ = aff.pick(blocks, loads)
        assert loads[chosen] < bound
        loads[chosen] += 1
    assert max(loads.values()) <= 13  # ceil(1.25 * 30 / 3)
    assert min(loads.values()) >= 4  # the overflow went to the others


def test_the_lru_forgets_old_prefixes_and_gone_backends_are_skipped() -> None:
    aff = Affinity(vnodes=16, factor=1.25, entries=4)
    loads = {"a": 0.0, "b": 0.0}
    aff.pick(block_hashes("x" * 64, 16), loads)  # 4 blocks: the table is full
    aff.pick(block_hashes("y" * 64, 16), loads)
    assert len(aff._seen) == 4
    chosen, _ = aff.pick(block_hashes("y" * 64, 16), {"c": 0.0})
    assert chosen == "c"


def test_an_overflow_does_not_move_the_prefix_away_from_its_replica() -> None:
    aff = Affinity(vnodes=64, factor=1.25, entries=1000)
    blocks = block_hashes(SYSTEM.format(3), 64)
    home, _ = aff.pick(blocks, {"a": 0.0, "b": 0.0, "c": 0.0})
    busy = {b: (5.0 if b == home else 0.0) for b in "abc"}
    elsewhere, hit = aff.pick(blocks, busy)
    assert elsewhere != home and not hit
    assert aff.pick(blocks, {"a": 0.0, "b": 0.0, "c": 0.0}) == (home, True)


def test_a_prefix_holder_with_a_free_slot_takes_the_request_above_the_bound() -> None:
    aff = Affinity(vnodes=64, factor=1.25, entries=1000)
    blocks = block_hashes(SYSTEM.format(4), 64)
    idle = {"a": 0.0, "b": 0.0, "c": 0.0}
    home, _ = aff.pick(blocks, idle)
    one = {b: (1.0 if b == home else 0.0) for b in "abc"}
    assert load_bound(one, 1.25) == 1  # the bound alone would send it elsewhere
    assert aff.pick(blocks, one, slots=lambda b: 4.0) == (home, True)
    full = {b: (4.0 if b == home else 0.0) for b in "abc"}
    elsewhere, hit = aff.pick(blocks, full, slots=lambda b: 4.0)
    assert elsewhere != home and not hit  # no free slot and over the bound: overflow


def test_new_prefixes_spread_evenly_and_stay_put() -> None:
    idle = {"a": 0.0, "b": 0.0, "c": 0.0}
    for salt in range(20):  # whatever the hashes, 6 tenants land 2/2/2 on an idle fleet
        aff = Affinity(vnodes=256, factor=1.25, entries=1000)
        homes = {t: aff.pick(block_hashes(f"{salt} " + SYSTEM.format(t), 64), idle)[0]
                 for t in range(6)}
        assert sorted(Counter(homes.values()).values()) == [2, 2, 2], (salt, homes)
        # ...and each tenant keeps its replica.
        for t, home in homes.items():
            assert aff.pick(block_hashes(f"{salt} " + SYSTEM.format(t), 64), idle) == (home, True)


def test_a_new_prefix_goes_home_to_the_replica_with_fewest_even_when_it_is_busier() -> None:
    """A replica over the load bound but with a free sequence slot still takes a new tenant
    when it is home to the fewest: homes outlive the moment's load."""
    idle = {"a": 0.0, "b": 0.0, "c": 0.0}
    for slots, expect_balanced in ((4.0, True), (0.0, False)):
        aff = Affinity(vnodes=64, factor=1.25, entries=1000)
        homes = [aff.pick(block_hashes(SYSTEM.format(t), 64), idle)[0] for t in range(4)]
        crowded = Counter(homes).most_common(1)[0][0]  # home to two, the others to one
        busy = {b: (0.0 if b == crowded else 3.0) for b in idle}
        assert load_bound(busy, 1.25) == 3  # the two with one home each are at the bound
        home, hit = aff.pick(block_hashes(SYSTEM.format(9), 64), busy, slots=lambda b, n=slots: n)
        assert not hit and (home != crowded) == expect_balanced


def test_a_prompt_of_any_shape_gives_a_prefix_never_an_error() -> None:
    # Unauthenticated input: a part whose text is not a string, roles that are not strings.
    body = {"messages": [{"role": "system", "content": [{"type": "text", "text": {"x": 1}},
                                                        {"type": "text", "text": "kept"}, 7]},
                         {"role": 3, "content": None}, "not a message"]}
    assert "kept" in prompt_prefix(body)
    assert prompt_prefix({"prompt": ["a", 1, None, "b"]}) == "ab"
    assert prompt_prefix({"messages": {"not": "a list"}, "prompt": 5}) == ""


def test_responses_and_messages_share_their_instructions_and_system_prompt() -> None:
    def responses(tenant: int, question: str, history: list | None = None) -> dict:
        return {"instructions": SYSTEM.format(tenant),
                "input": [*(history or []), {"role": "user", "content": question}]}

    a = prompt_prefix(responses(1, "hello"))
    assert a == prompt_prefix(responses(1, "other")) != prompt_prefix(responses(2, "hello"))
    assert SYSTEM.format(1) in prompt_prefix({"instructions": SYSTEM.format(1), "input": "hi"})
    assert prompt_prefix({"input": "just this"}) == "just this"
    turn = [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "42"}]
    assert prompt_prefix(responses(1, "q", turn)).startswith(a) and "42" in prompt_prefix(
        responses(1, "q", turn))

    def messages(tenant: int, question: str) -> dict:
        return {"system": [{"type": "text", "text": SYSTEM.format(tenant)}], "max_tokens": 5,
                "messages": [{"role": "user", "content": question}]}

    m = prompt_prefix(messages(1, "hello"))
    assert SYSTEM.format(1) in m and m == prompt_prefix(messages(1, "other"))
    assert m != prompt_prefix(messages(2, "hello"))
    assert prompt_prefix({"system": 5, "input": 7}) == "system\x1f\x1e"


def test_adapter_keys_are_a_prefix_under_one_adapter_still_chained() -> None:
    a = block_hashes("a" * 100 + "b" * 100, 50)
    b = block_hashes("a" * 100 + "c" * 100, 50)
    one_a, one_b = adapter_keys("one", a), adapter_keys("one", b)
    assert one_a[:2] == one_b[:2] and one_a[2] != one_b[2]  # equal prefix, equal keys
    assert not set(one_a) & set(a) and not set(one_a) & set(adapter_keys("two", a))
    assert adapter_keys("one", []) == []


def test_candidate_sets_that_alternate_keep_their_rings() -> None:
    aff = Affinity(vnodes=50, factor=1.25, entries=100)
    fleet, holders = {"a": 0.0, "b": 0.0, "c": 0.0}, {"a": 0.0, "c": 0.0}
    aff.pick([1], fleet)
    ring = aff._rings[("a", "b", "c")]
    for i in range(5):
        assert aff.pick([2 + i], holders)[0] in holders
        aff.pick([9 + i], fleet)
    assert aff._rings[("a", "b", "c")] is ring and len(aff._rings) == 2
    for i in range(Affinity.RINGS + 2):  # a bounded number of them
        aff.pick([1], {f"r{i}": 0.0})
    assert len(aff._rings) == Affinity.RINGS
