"""Prefix affinity: chained block hashes of the prompt prefix, and consistent hashing with
bounded loads (CHWBL, Mirrokni et al. 2016; KubeAI's PrefixHash).

Hand-written: no well-kept Python library does CHWBL (the ring libraries on PyPI —
uhashring, hash_ring — have no load bound), and the rest is a few lines of hashlib."""

from __future__ import annotations

import bisect
import hashlib
import math
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence


def _h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


def prompt_prefix(body: dict) -> str:
    """The part of a request that requests of the same conversation or tenant share: for
    chat and Anthropic messages, the system prompt (Messages' ``system``) and every message
    but the last, or the lone message; for responses, the ``instructions`` and every
    ``input`` item but the last, or the lone input; for completions, the prompt."""
    system = f"system\x1f{_text(body.get('system') or body.get('instructions'))}\x1e" \
        if body.get("system") or body.get("instructions") else ""
    messages = body.get("messages", body.get("input"))
    if isinstance(messages, str):
        return system or messages
    if isinstance(messages, list) and messages:
        shared = messages[:-1] or ([] if system else messages)
        return system + "".join(f"{m.get('role', m.get('type', ''))}\x1f"
                                f"{_text(m.get('content', m.get('output', m.get('arguments'))))}\x1e"
                                for m in shared if isinstance(m, dict))
    prompt = body.get("prompt")
    if isinstance(prompt, list):
        prompt = "".join(p for p in prompt if isinstance(p, str))
    return system + (prompt if isinstance(prompt, str) else "")


def _text(content: object) -> str:
    """The text of a message's content; parts that are not text (or whose ``text`` is not a
    string: the replica answers those with a 400) count as nothing."""
    if isinstance(content, list):
        return "".join(t for p in content if isinstance(p, dict)
                       and isinstance(t := p.get("text"), str))
    return content if isinstance(content, str) else ""


def adapter_keys(adapter: str, keys: Sequence[int]) -> list[int]:
    """``keys`` for a request that runs with the LoRA adapter ``adapter``. A pod caches
    prefixes per adapter set, so a prompt under another adapter, or the base model, is another
    prefix; each key salted with the adapter's name, chained keys stay chained (equal keys:
    equal prefix and adapter)."""
    salt = b"adapter\x1f" + adapter.encode() + b"\x1e"
    return [_h64(salt + k.to_bytes(8, "big")) for k in keys]


def block_hashes(text: str, block_chars: int) -> list[int]:
    """Chained hashes: block i's hash covers blocks 0..i, so equal hashes mean equal prefixes.
    A partial last block counts too (a short system prompt still gives one block)."""
    out: list[int] = []
    prev = b""
    for start in range(0, len(text), block_chars):
        h = _h64(prev + text[start:start + block_chars].encode())
        out.append(h)
        prev = h.to_bytes(8, "big")
    return out


class Ring:
    """A consistent-hash ring with ``vnodes`` points per backend."""

    def __init__(self, backends: Sequence[str], vnodes: int):
        points = sorted((_h64(f"{b}#{i}".encode()), b) for b in backends for i in range(vnodes))
        self._keys = [k for k, _ in points]
        self._owners = [b for _, b in points]

    def walk(self, key: int):
        """The backends in ring order from ``key``, each once."""
        if not self._keys:
            return
        seen: set[str] = set()
        start = bisect.bisect(self._keys, key)
        for i in range(len(self._keys)):
            b = self._owners[(start + i) % len(self._keys)]
            if b not in seen:
                seen.add(b)
                yield b


def load_bound(loads: dict[str, float], factor: float) -> float:
    """The most load one backend may carry, counting the request being placed."""
    return math.ceil(factor * (sum(loads.values()) + 1) / max(len(loads), 1))


class Affinity:
    """Picks a backend for a list of chained prefix-block hashes:
    1. the backend that last served the longest matching prefix, if it has room: under the
       load bound, or with a free sequence slot (an affinity hit: its KV cache likely holds
       that prefix, and a free slot starts it at once; the bound alone would send the second
       request of a tenant elsewhere whenever the fleet is nearly idle, since ceil(1.25 * 2 / 3)
       is 1, and that request would pay a full prefill);
    2. else, of the backends with room (the same test), the one home to the fewest prefixes,
       the first clockwise from the first block's hash among equals (with few tenants the
       ring alone is lumpy: 6 prefixes on 3 replicas often land 3/3/0, and a replica's caches
       then hold 3 tenants while another idles). A free slot counts as room here too: a
       prefix's home outlives the moment's load, and a replica that was busy when a tenant
       first came would otherwise end up home to fewer tenants, the others to more than
       their caches hold (measured: 5/4/3 for 12 tenants on 3 replicas, one replica's
       tenants evicting each other, benchmarks/prefix_routing.py);
    3. else the least loaded.
    Then the blocks are remembered with the chosen backend (LRU, ``entries`` at most);
    blocks already remembered with another live backend keep it (an overflow is not a move).

    The candidates are not always the whole fleet (a retry leaves out the replicas it tried,
    a LoRA request takes the replicas that hold its adapter): the rings of the last few
    candidate sets are kept, so requests that alternate between sets never rebuild one."""

    RINGS = 8

    def __init__(self, vnodes: int, factor: float, entries: int):
        self.vnodes, self.factor, self.entries = vnodes, factor, entries
        self._rings: OrderedDict[tuple[str, ...], Ring] = OrderedDict()
        self._seen: OrderedDict[int, str] = OrderedDict()
        # Each remembered prefix (its last block) and its replica, and how many per replica.
        self._homes: OrderedDict[int, str] = OrderedDict()
        self._home_count: Counter[str] = Counter()

    def pick(self, blocks: Sequence[int], loads: dict[str, float],
             tiebreak: Callable[[str], float] = lambda b: 0.0,
             slots: Callable[[str], float] = lambda b: 0.0) -> tuple[str, bool]:
        """``loads``: the candidate backends and their loads; ``slots``: a backend's sequence
        slots (its max batch size; 0 when unknown). Returns (backend, hit)."""
        if not loads:
            raise ValueError("no backend to pick from")
        members = tuple(sorted(loads))
        ring = self._ring_of(members)
        bound = load_bound(loads, self.factor)

        def room(b: str) -> bool:
            return loads[b] < max(bound, slots(b))

        chosen, hit = None, False
        for h in reversed(blocks):
            b = self._seen.get(h)
            if b is not None and b in loads:
                if room(b):
                    chosen, hit = b, True
                break
        if chosen is None and blocks:
            under = [b for b in ring.walk(blocks[0]) if room(b)]
            if under:
                fewest = min(self._home_count[b] for b in under)
                chosen = next(b for b in under if self._home_count[b] == fewest)
        if chosen is None:
            chosen = min(members, key=lambda b: (loads[b], tiebreak(b)))
        for h in blocks:
            # A request that overflowed to another replica leaves the prefix with the
            # replica that holds it, unless that one is gone.
            if hit or self._seen.get(h) not in loads:
                self._seen[h] = chosen
            self._seen.move_to_end(h)
        while len(self._seen) > self.entries:
            self._seen.popitem(last=False)
        if blocks and self._seen.get(blocks[-1]) == chosen:
            self._home(blocks[-1], chosen)
        return chosen, hit

    def _ring_of(self, members: tuple[str, ...]) -> Ring:
        ring = self._rings.get(members)
        if ring is None:
            ring = self._rings[members] = Ring(members, self.vnodes)
            while len(self._rings) > self.RINGS:
                self._rings.popitem(last=False)
        self._rings.move_to_end(members)
        return ring

    def _home(self, prefix: int, backend: str) -> None:
        old = self._homes.get(prefix)
        if old != backend:
            if old is not None:
                self._home_count[old] -= 1
            self._home_count[backend] += 1
            self._homes[prefix] = backend
        self._homes.move_to_end(prefix)
        while len(self._homes) > self.entries:
            self._home_count[self._homes.popitem(last=False)[1]] -= 1
