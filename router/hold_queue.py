"""The router's hold queue: requests waiting for a usable replica, served highest priority
first and, among requests of one priority, round robin by tenant (FIFO within a tenant)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass(eq=False)
class Waiter:
    priority: int
    tenant: str
    tried: set[str]
    future: asyncio.Future
    seq: int = 0
    route: tuple = ()  # what the router picks its replica by (prefix keys, model)
    since: float = field(default_factory=time.monotonic)


class HoldQueue:
    def __init__(self) -> None:
        # priority -> tenant -> its waiters (FIFO); the dict's order is the round robin's:
        # a tenant served goes to the back.
        self._levels: dict[int, dict[str, deque[Waiter]]] = {}
        self._seq = itertools.count()
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def push(self, w: Waiter) -> None:
        w.seq = next(self._seq)
        self._levels.setdefault(w.priority, {}).setdefault(w.tenant, deque()).append(w)
        self._n += 1

    def remove(self, w: Waiter) -> bool:
        """Takes ``w`` out (False when it is not here: served or shed already)."""
        level = self._levels.get(w.priority)
        q = level.get(w.tenant) if level is not None else None
        if q is None or w not in q:
            return False
        q.remove(w)
        self._n -= 1
        if not q:
            del level[w.tenant]  # type: ignore[union-attr]
            if not level:
                del self._levels[w.priority]
        return True

    def served(self, w: Waiter) -> None:
        """Takes ``w`` out and sends its tenant to the back of its priority's round."""
        level = self._levels[w.priority]
        q = level.pop(w.tenant)
        q.remove(w)
        self._n -= 1
        if q:
            level[w.tenant] = q  # re-inserted: last in the round
        elif not level:
            del self._levels[w.priority]

    def order(self) -> Iterator[Waiter]:
        """Every waiter in the order they should be served: priorities from the highest; in
        one priority the tenants in round-robin order, each tenant's oldest first. (A waiter
        that cannot use any replica now, having tried them, lets the next one go.)"""
        for p in sorted(self._levels, reverse=True):
            queues = [list(q) for q in self._levels[p].values()]
            # Round by round: each tenant's oldest, then each one's next, ... so that places
            # handed out together (several slots free at once) go to the tenants in turn too.
            for i in range(max(map(len, queues), default=0)):
                yield from (q[i] for q in queues if i < len(q))

    def lowest(self) -> Waiter | None:
        """The waiter to shed for a more urgent request: of the lowest priority, the tenant
        holding the most places there (on a tie the one that came last), its newest."""
        if not self._levels:
            return None
        level = self._levels[min(self._levels)]
        return max(level.values(), key=lambda q: (len(q), q[-1].seq))[-1]
