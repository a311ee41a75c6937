"""The router's hold queue order (priority first, round robin by tenant) and the usage
trailer that the router strips from streams."""

from __future__ import annotations

import asyncio

from llamafleet.router.hold_queue import HoldQueue, Waiter
from llamafleet.router.tenancy import UsageTrailer


def _w(priority: int, tenant: str, loop) -> Waiter:
    return Waiter(priority, tenant, set(), loop.create_future())


def test_higher_priority_first_then_tenants_in_turn() -> None:
    loop = asyncio.new_event_loop()
    try:
        q = HoldQueue()
        a = [_w(0, "a", loop) for _ in range(4)]
        b = [_w(0, "b", loop) for _ in range(2)]
        urgent = _w(5, "c", loop)
        for w in [*a, *b, urgent]:
            q.push(w)
        served = []
        while len(q):
            w = next(q.order())
            q.served(w)
            served.append(w)
        assert served == [urgent, a[0], b[0], a[1], b[1], a[2], a[3]]
        # Places handed out together (several slots free at once) go round the tenants too.
        for w in [*a, *b]:
            q.push(w)
        assert list(q.order()) == [a[0], b[0], a[1], b[1], a[2], a[3]]
    finally:
        loop.close()


def test_the_lowest_priority_is_shed_first_from_the_tenant_holding_most() -> None:
    loop = asyncio.new_event_loop()
    try:
        q = HoldQueue()
        ws = [_w(0, "a", loop), _w(0, "a", loop), _w(0, "b", loop), _w(-1, "c", loop),
              _w(-1, "d", loop), _w(-1, "d", loop)]
        for w in ws:
            q.push(w)
        assert q.lowest() is ws[5]
        assert q.remove(ws[5]) and not q.remove(ws[5])
        assert q.lowest() is ws[4]
        assert len(q) == 5
    finally:
        loop.close()


def test_the_usage_trailer_is_read_and_removed_however_the_stream_is_cut() -> None:
    body = (b'data: {"choices": [{"delta": {"content": "a: llamafleet-usage x"}}]}\n\n'
            b"data: [DONE]\n\n: llamafleet-usage 12 30\n\n")
    for size in (1, 2, 3, 7, 19, len(body)):
        t = UsageTrailer()
        out = b"".join(t.feed(body[i:i + size]) for i in range(0, len(body), size)) + t.flush()
        assert out == body[:body.index(b": llamafleet-usage 12")]
        assert t.usage() == (12, 30)
    t = UsageTrailer()  # an event's end is never held back (the client dispatches it)
    assert t.feed(b"data: x\n\n") == b"data: x\n\n" and t.usage() is None
    assert t.feed(b": llama") == b"" and t.feed(b"fleet\n") == b": llamafleet\n"  # a comment
