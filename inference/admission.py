"""The engine's waiting room: who is admitted next, by priority and by tenant.

Requests carry a tenant (the API key's, "" without tenants) and a priority (higher first).
:class:`FairQueue` is a :class:`queue.Queue` (the engine's submitting threads put, its one
thread gets; the standard library's locking and blocking are kept) that gives out:

1. control items (the stop sentinel, wake-ups) before any request;
2. then the highest priority that has a request waiting;
3. within it, the tenant with the fewest running sequences (``running_of``, the engine's
   count), and among equals the one served longest ago (round robin): a tenant with many
   requests waiting cannot push another tenant's request to the back, whatever the order
   of arrival;
4. within a tenant, its requests in order (a preempted sequence goes back first).

With one tenant and one priority (every request without tenants) this is first in, first
out, as before. :func:`fair_share` says how many running sequences a tenant may keep while
others wait (the engine preempts beyond it).
"""

from __future__ import annotations

import queue
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from typing import Any


class FairQueue(queue.Queue):
    """See the module. ``classify(item)`` gives a request's (priority, tenant), or None for
    a control item. Not to be read through ``.queue``: :meth:`snapshot`, :meth:`remove_if`."""

    def __init__(self, maxsize: int, classify: Callable[[Any], tuple[int, str] | None]):
        self.classify = classify
        # The engine's running sequences per tenant (read on get, which only the engine
        # thread calls).
        self.running_of: Callable[[str], int] = lambda tenant: 0
        super().__init__(maxsize)

    # queue.Queue's storage hooks, called under its mutex.
    def _init(self, maxsize: int) -> None:
        self._control: deque = deque()
        self._levels: dict[int, OrderedDict[str, deque]] = {}  # priority -> tenant -> items
        self._n = 0

    def _qsize(self) -> int:
        return self._n + len(self._control)

    def _put(self, item: Any) -> None:
        self._add(item, front=False)

    def _get(self) -> Any:
        if self._control:
            return self._control.popleft()
        priority, tenant = self._next()
        level = self._levels[priority]
        items = level[tenant]
        item = items.popleft()
        self._n -= 1
        if items:
            level.move_to_end(tenant)  # served: the others' turn among equals
        else:
            del level[tenant]
            if not level:
                del self._levels[priority]
        return item

    def _add(self, item: Any, front: bool) -> None:
        key = self.classify(item)
        if key is None:
            self._control.append(item)
            return
        priority, tenant = key
        items = self._levels.setdefault(priority, OrderedDict()).setdefault(tenant, deque())
        if front:
            items.appendleft(item)
        else:
            items.append(item)
        self._n += 1

    def _next(self) -> tuple[int, str]:
        priority = max(self._levels)
        running = self.running_of
        # min() keeps the first of equals: the level's order is the round robin.
        return priority, min(self._levels[priority], key=running)

    # --- for the engine ------------------------------------------------------------------

    def peek(self) -> Any:
        """The request :meth:`get` would give next (control items aside), or None."""
        with self.mutex:
            if not self._n:
                return None
            priority, tenant = self._next()
            return self._levels[priority][tenant][0]

    def put_front(self, item: Any) -> None:
        """Back at the head of its tenant's line, beyond ``maxsize`` (a preempted sequence:
        it was admitted once and is not turned away)."""
        with self.mutex:
            self._add(item, front=True)
            self.not_empty.notify()

    def _items(self) -> Iterator[Any]:
        for level in self._levels.values():
            for items in level.values():
                yield from items

    def snapshot(self) -> list[Any]:
        """The waiting requests (any order)."""
        with self.mutex:
            return list(self._items())

    def remove_if(self, gone: Callable[[Any], bool]) -> list[Any]:
        """Take out the waiting requests ``gone`` says yes to; returns them."""
        with self.mutex:
            out = [item for item in self._items() if gone(item)]
            if not out:
                return out
            drop = {id(item) for item in out}
            for priority in list(self._levels):
                level = self._levels[priority]
                for tenant in list(level):
                    kept = deque(item for item in level[tenant] if id(item) not in drop)
                    if kept:
                        level[tenant] = kept
                    else:
                        del level[tenant]
                if not level:
                    del self._levels[priority]
            self._n -= len(out)
            self.not_full.notify_all()
            return out


def fair_share(slots: int, tenants: int) -> int:
    """Running sequences each of ``tenants`` active tenants may keep while another waits:
    an equal share of the slots, at least one."""
    return max(1, slots // max(1, tenants))
