"""What every HTTP front door does around a turn: SSE whose status line waits for the first
frame, and waiting on work unless the client leaves first."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from llamafleet.common.errors import LlamafleetError

T = TypeVar("T")


async def sse_response(frames: AsyncIterator[bytes], cancel: Callable[[], None], request: Request,
                       *, error_response: Callable[[LlamafleetError], Response],
                       error_frame: Callable[[LlamafleetError], bytes],
                       last: bytes = b"", trailer: Callable[[], bytes] | None = None
                       ) -> Response:
    """SSE ``frames``, then ``last``.

    The status line waits for the first frame, which comes with the generation's first
    output or its end: a request that fails before it (queued when the server shuts down, a
    failed prefill) gets a plain error with its own status (``error_response``), a 503 that a
    router may retry elsewhere, instead of 200 and an error event. Normal requests lose
    nothing: until that frame there was nothing to send. An error after it is sent as
    ``error_frame`` (the status line has gone). ``trailer``: what to send after ``last`` (the
    tokens the answer cost, for the router that asked for them)."""
    frames = aiter(frames)
    try:
        first = await unless_client_leaves(request, anext(frames))
    except LlamafleetError as e:
        cancel()
        return error_response(e)
    except StopAsyncIteration:
        first = None
    if first is None:  # the client left (or nothing came): the generation is cancelled
        cancel()
        await frames.aclose()
        return Response(status_code=499)

    async def body() -> AsyncIterator[bytes]:
        try:
            yield first
            async for frame in frames:
                yield frame
        except LlamafleetError as e:
            yield error_frame(e)
        finally:
            cancel()  # client gone or done: free the sequence at the next step
        if last:
            yield last
        if trailer is not None:
            yield trailer()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None (with ``work`` cancelled) when the client disconnects
    first. For handlers that wait before answering: Starlette does not cancel them when
    the client goes, so abandoned work would otherwise run on."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message the
    server has for us is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
