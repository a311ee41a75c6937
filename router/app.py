"""The router's ASGI app (Starlette): OpenAI requests in, the chosen replica's answer out,
passed through chunk by chunk as it arrives."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator

import httpx
from kubernetes.client import ApiClient
from llamafleet.common.errors import (
    InternalError,
    LlamafleetError,
    NotReady,
    QueueFull,
    error_response,
    openai_body,
)
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .affinity import Affinity, _h64, block_hashes, prompt_prefix
from .backends import Backend, Pool
from .discovery import SliceWatch
from .metrics import RouterMetrics
from .scaling import Scaler
from .settings import RouterSettings

log = logging.getLogger(__name__)

ROUTING_KEY_HEADER = "x-llamafleet-routing-key"
BACKEND_HEADER = "x-llamafleet-backend"  # on answers: the replica that served it
# Hop-by-hop headers (RFC 9110 7.6.1) and the ones httpx recomputes.
_DROP = {"host", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
         "proxy-authorization", "proxy-authenticate", "content-length", "content-encoding"}


class _Retry(Exception):
    """This replica failed before any byte was sent to the client: try another."""


class Router:
    def __init__(self, settings: RouterSettings, metrics: RouterMetrics | None = None,
                 kube: ApiClient | None = None):
        """``kube``: the Kubernetes API, needed with ``settings.llmservice`` (discovery)."""
        if settings.llmservice and kube is None:
            raise ValueError("--llmservice needs a Kubernetes API client")
        self.settings = settings
        self.kube = kube
        self.metrics = metrics or RouterMetrics()
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(None, connect=settings.connect_timeout),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        key = settings.backend_api_key
        self.backend_headers = {"authorization": f"Bearer {key.get_secret_value()}"} if key else {}
        self.pool = Pool(self.client, settings.poll_interval, self.backend_headers)
        self.affinity = Affinity(settings.virtual_nodes, settings.load_factor,
                                 settings.affinity_entries)
        self.held = 0

    # --- choosing a replica ------------------------------------------------------------
    def keys_of(self, request: Request, body: dict | None) -> list[int]:
        key = request.headers.get(ROUTING_KEY_HEADER)
        if key:
            return [_h64(key.encode())]
        return block_hashes(prompt_prefix(body or {}), self.settings.block_chars)

    async def choose(self, keys: list[int], tried: set[str], deadline: float) -> Backend:
        """A ready replica not yet tried; holds the request (bounded) while there is none."""
        candidates = [b for b in self.pool.ready() if b.url not in tried]
        if not candidates:
            if self.held >= self.settings.hold_queue_size:
                self.metrics.refused.labels("queue_full").inc()
                raise QueueFull(f"{self.held} requests are already waiting for a ready replica.")
            self.held += 1
            self.metrics.held.set(self.held)
            try:
                await self.pool.notify()  # the scaler (--llmservice) watches ``held``
                candidates = await self._wait_for_ready(tried, deadline)
            finally:
                self.held -= 1
                self.metrics.held.set(self.held)
                await self.pool.notify()
        # The candidates themselves, not pool.backends: a replica may leave the pool (its
        # EndpointSlice changed) while this request waited.
        by_url = {b.url: b for b in candidates}
        loads = {u: b.load for u, b in by_url.items()}
        url, hit = self.affinity.pick(keys, loads, lambda u: by_url[u].kv_use,
                                      lambda u: by_url[u].slots)
        self.metrics.affinity.labels("hit" if hit else "miss").inc()
        return by_url[url]

    async def _wait_for_ready(self, tried: set[str], deadline: float) -> list[Backend]:
        async with self.pool.changed:
            while True:
                ready = self.pool.ready()
                if ready:
                    # Untried ones first; a replica tried before is ready again only after
                    # a good poll (a failure takes it out of the rotation).
                    return [b for b in ready if b.url not in tried] or ready
                left = deadline - time.monotonic()
                if left <= 0:
                    self.metrics.refused.labels("hold_timeout").inc()
                    raise NotReady(f"No replica became ready within {self.settings.hold_timeout:g} s.")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.pool.changed.wait(), left)

    # --- proxying ----------------------------------------------------------------------
    async def proxy(self, request: Request) -> Response:
        started = time.monotonic()
        deadline = started + self.settings.hold_timeout
        raw = await request.body()
        body = None
        if request.method == "POST":
            with contextlib.suppress(ValueError):
                parsed = json.loads(raw or b"{}")
                body = parsed if isinstance(parsed, dict) else None
        keys = self.keys_of(request, body)
        # The client's own Authorization goes through: replicas check the API key.
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP}
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        tried: set[str] = set()
        while True:
            backend = await self.choose(keys, tried, deadline)
            tried.add(backend.url)
            others = any(b.url not in tried for b in self.pool.ready())
            try:
                return await self._attempt(request, backend, path, headers, raw, started, others)
            except _Retry:
                continue

    async def _attempt(self, request: Request, backend: Backend, path: str,
                       headers: dict[str, str], raw: bytes, started: float,
                       others: bool) -> Response:
        """Sends to one replica and waits for the first byte of the body (the first token
        when streaming) while watching for the client leaving. Retries (raises _Retry) on a
        connect error or a replica that dies before answering (it leaves the rotation until
        its next good poll), and on a 503 while ``others`` (another ready replica not yet
        tried) exist; after the first byte, never."""
        upstream_req = self.client.build_request(request.method, backend.url + path,
                                                 headers=headers, content=raw)
        backend.in_flight += 1
        self.metrics.in_flight.labels(backend.url).inc()
        done = False

        def finish(outcome: str) -> None:
            nonlocal done
            if not done:
                done = True
                backend.in_flight -= 1
                self.metrics.in_flight.labels(backend.url).dec()
                self.metrics.requests.labels(backend.url, outcome).inc()

        upstream: httpx.Response | None = None

        async def first() -> tuple[httpx.Response, AsyncIterator[bytes], bytes]:
            nonlocal upstream
            upstream = await self.client.send(upstream_req, stream=True)
            chunks = upstream.aiter_raw()
            if upstream.status_code == 503 and others:
                return upstream, chunks, b""
            return upstream, chunks, await anext(chunks, b"")

        sending = asyncio.ensure_future(first())
        leaving = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({sending, leaving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            leaving.cancel()
        if not sending.done():  # the client left: cancel upstream
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await sending
            if upstream is not None:
                await upstream.aclose()
            finish("cancelled")
            return Response(status_code=499)
        try:
            resp, chunks, head = sending.result()
        except httpx.HTTPError as e:  # connect error, or the replica died before answering
            log.warning("replica %s failed before answering (%r); trying another", backend.url, e)
            await self.pool.mark_down(backend)
            finish("retried")
            raise _Retry from e
        if resp.status_code == 503 and others:
            await resp.aclose()
            finish("retried")
            raise _Retry
        self.metrics.ttft.observe(time.monotonic() - started)
        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in _DROP}
        out_headers[BACKEND_HEADER] = backend.url
        sse = resp.headers.get("content-type", "").startswith("text/event-stream")

        async def rest() -> AsyncIterator[bytes]:
            outcome = "ok" if resp.status_code < 400 else "error"
            try:
                if head:
                    yield head
                async for chunk in chunks:
                    yield chunk
            except httpx.HTTPError as e:
                outcome = "broken"  # streaming began: never retried
                log.warning("replica %s broke off an answer: %r", backend.url, e)
                if not sse:
                    raise  # the server aborts the connection: the client sees a cut answer
                # As the pod reports errors mid-stream: an OpenAI error event.
                err = InternalError(f"The replica serving this stream failed: {e!r}")
                yield b"data: " + json.dumps(openai_body(err)).encode() + b"\n\n"
            except asyncio.CancelledError:
                outcome = "cancelled"
                raise
            finally:
                await resp.aclose()
                finish(outcome)

        return StreamingResponse(rest(), status_code=resp.status_code, headers=out_headers)


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message the
    server has for us is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(router: Router) -> Starlette:
    async def proxy(request: Request) -> Response:
        try:
            return await router.proxy(request)
        except LlamafleetError as e:
            return error_response(e)

    async def metrics(_: Request) -> Response:
        router.metrics.ready.set(len(router.pool.ready()))
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def health(_: Request) -> Response:
        # ``backends``: every replica the router knows (--backends, or the ready endpoints
        # of the EndpointSlices); ``ready_backends``: those whose /ready answered 200.
        return JSONResponse({"status": "ok", "ready_backends": len(router.pool.ready()),
                             "backends": sorted(router.pool.backends)})

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette):
        tasks = [asyncio.create_task(router.pool.poll_forever())]
        watch = None
        s = router.settings
        if s.llmservice and router.kube is not None:
            loop = asyncio.get_running_loop()

            def on_urls(urls: list[str]) -> None:  # called in the watch thread
                asyncio.run_coroutine_threadsafe(router.pool.set_urls(urls), loop)

            watch = SliceWatch(router.kube, s.namespace, s.llmservice, on_urls)
            watch.start()
            scaler = Scaler(router.kube, s.namespace, s.llmservice, router.metrics)
            tasks.append(asyncio.create_task(scaler.run(router.pool, lambda: router.held)))
        else:
            await router.pool.set_urls(s.backend_urls)
        try:
            yield
        finally:
            if watch is not None:
                watch.stop()
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await router.client.aclose()

    # The router answers /health, /ready (it is ready while it can hold requests) and
    # /router/metrics itself; everything else, /v1/* and the replicas' /metrics included,
    # goes to a replica.
    routes = [Route("/health", health), Route("/ready", health),
              Route("/router/metrics", metrics),
              Route("/{path:path}", proxy, methods=["GET", "POST", "DELETE", "PUT"])]
    return Starlette(routes=routes, lifespan=lifespan)
