"""The router's ASGI app (Starlette): OpenAI requests in, the chosen replica's answer out,
passed through chunk by chunk as it arrives."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
from kubernetes.client import ApiClient
from llamafleet.common.contract import router_env_name
from llamafleet.common.errors import (
    BadRequest,
    InternalError,
    LlamafleetError,
    MethodNotAllowed,
    NotFound,
    NotReady,
    Overloaded,
    QueueFull,
    ReplicaFailed,
    http_error,
    openai_body,
)
from llamafleet.common.http_limits import ClientLeft, ReadLimits, declared_length, read_body
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from .affinity import Affinity, _h64, adapter_keys, block_hashes, prompt_prefix
from .discovery import SliceWatch
from .metrics import RouterMetrics
from .replicas import PollPolicy, Pool, Replica, holding
from .scaling import Scaler
from .settings import RouterSettings

log = logging.getLogger(__name__)

ROUTING_KEY_HEADER = "x-llamafleet-routing-key"
BACKEND_HEADER = "x-llamafleet-backend"  # on answers: the replica that served it
# Hop-by-hop headers (RFC 9110 7.6.1) and the ones httpx recomputes.
_DROP = {b"host", b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer",
         b"upgrade", b"proxy-authorization", b"proxy-authenticate", b"content-length",
         b"content-encoding"}
# On answers, also the replica's own date and server: uvicorn adds the router's.
_DROP_ANSWER = _DROP | {b"date", b"server"}
# The replicas' paths that clients reach through the router: the OpenAI API (and Anthropic's
# /v1/messages), /tokenize and /detokenize, and /info and /metrics (behind the pods' API key).
# Not their /docs, /openapi.json, /studio/ or /.
PROXIED_PREFIXES = ("/v1/",)
PROXIED_PATHS = {"/info", "/metrics", "/tokenize", "/detokenize"}
PROXIED_METHODS = {"GET", "POST", "DELETE", "PUT"}


def error_response(err: LlamafleetError) -> JSONResponse:
    """The router's HTTP answer to a domain error (common.errors.http_error)."""
    return JSONResponse(*http_error(err))


class _Retry(Exception):
    """This replica failed before any byte was sent to the client: try another."""


class _Left(Exception):
    """The client went away before its answer began."""


class _Reservation:
    """Bytes of request bodies counted against --max-buffered-bytes until released."""

    def __init__(self, router: Router, size: int):
        self.router, self.size = router, size
        router.buffered += size

    def resize(self, size: int) -> None:
        self.router.buffered += size - self.size
        self.size = size

    def release(self) -> None:
        self.router.buffered -= self.size
        self.size = 0


class _Answer(StreamingResponse):
    """A replica's answer, passed through; ``cleanup`` runs however the response ends, even
    when the client left before its body iterator began (its ``finally`` then never runs)."""

    def __init__(self, content: AsyncIterator[bytes], status_code: int,
                 cleanup: Callable[[], Awaitable[None]]):
        super().__init__(content, status_code=status_code)
        self._cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._cleanup()


class Router:
    def __init__(self, settings: RouterSettings, metrics: RouterMetrics | None = None,
                 kube: ApiClient | None = None):
        """``kube``: the Kubernetes API, needed with ``settings.llmservice`` (discovery)."""
        if settings.llmservice and kube is None:
            raise ValueError("--llmservice needs a Kubernetes API client")
        s = self.settings = settings
        self.kube = kube
        self.metrics = metrics or RouterMetrics()
        # Proxied requests: a read timeout as the last resort (a stopped replica is found by
        # its polls first); no pool wait (no connection cap).
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=s.connect_timeout, read=s.read_timeout,
                                  write=s.read_timeout, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        # Polls: their own client and timeouts, so they never wait behind proxied requests.
        self.poll_client = httpx.AsyncClient(timeout=httpx.Timeout(s.poll_timeout))
        key = settings.backend_api_key
        self.backend_headers = {"authorization": f"Bearer {key.get_secret_value()}"} if key else {}
        self.pool = Pool(self.poll_client,
                         PollPolicy(interval=s.poll_interval, timeout=s.poll_timeout,
                                    failure_budget=s.poll_failure_budget,
                                    backoff=s.failure_backoff, backoff_max=s.failure_backoff_max),
                         self.backend_headers)
        self.affinity = Affinity(settings.virtual_nodes, settings.load_factor,
                                 settings.affinity_entries)
        self.held = 0
        self.buffered = 0  # bytes of request bodies held now (--max-buffered-bytes)

    def is_operator(self, request: Request) -> bool:
        """The caller presented --backend-api-key (the pods' key): it may see replica URLs."""
        key = self.settings.backend_api_key
        if key is None:
            return False
        given = request.headers.get("authorization", "").encode("latin-1")
        return hmac.compare_digest(given, f"Bearer {key.get_secret_value()}".encode())

    # --- choosing a replica ------------------------------------------------------------
    def route_of(self, request: Request, raw: bytes) -> tuple[list[int], str | None]:
        """The request's affinity keys (its routing key, else its prefix blocks) and the
        ``model`` its body names (a LoRA adapter's name, or the base model's)."""
        body = None
        if request.method == "POST" and raw:
            with contextlib.suppress(ValueError, RecursionError):  # the replica answers the 400
                body = json.loads(raw)
        if not isinstance(body, dict):
            body = {}
        model = body.get("model")
        model = model if isinstance(model, str) and model else None
        key = request.headers.get(ROUTING_KEY_HEADER)
        if key:
            return [_h64(key.encode("latin-1"))], model
        return (block_hashes(prompt_prefix(body), self.settings.block_chars) if body else []), model

    async def choose(self, keys: list[int], tried: set[str], deadline: float,
                     leaving: asyncio.Future, model: str | None = None) -> Replica:
        """A usable replica this request has not tried; holds the request (bounded) while
        there is none, until ``deadline`` or until the client leaves (_Left). When ``model``
        names a LoRA adapter that some of them hold, one of those (any other would answer
        404), by prefix under that adapter and load; when none holds it, any."""
        candidates = [b for b in self.pool.ready() if b.url not in tried]
        if not candidates:
            if self.held >= self.settings.hold_queue_size:
                self.metrics.refused.labels("queue_full").inc()
                raise QueueFull(f"{self.held} requests are already waiting for a ready replica.")
            self.held += 1
            self.metrics.held.set(self.held)
            try:
                await self.pool.notify()  # the scaler (--llmservice) watches ``held``
                waiting = asyncio.ensure_future(self._wait_for_ready(tried, deadline))
                await asyncio.wait({waiting, leaving}, return_when=asyncio.FIRST_COMPLETED)
                if not waiting.done():  # the client left: its place is free at once
                    waiting.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiting
                    self.metrics.refused.labels("client_left").inc()
                    raise _Left
                candidates = waiting.result()
            finally:
                self.held -= 1
                self.metrics.held.set(self.held)
                await self.pool.notify()
        if model and (holders := holding(candidates, model)):
            candidates, keys = holders, adapter_keys(model, keys)
        # The candidates themselves, not pool.replicas: a replica may leave the pool (its
        # EndpointSlice changed) while this request waited.
        by_url = {b.url: b for b in candidates}
        loads = {u: b.load for u, b in by_url.items()}
        url, hit = self.affinity.pick(keys, loads, lambda u: by_url[u].kv_use,
                                      lambda u: by_url[u].slots)
        self.metrics.affinity.labels("hit" if hit else "miss").inc()
        return by_url[url]

    async def _wait_for_ready(self, tried: set[str], deadline: float) -> list[Replica]:
        async with self.pool.changed:
            while True:
                # Never one this request has tried: a replica that failed it once passes
                # its next poll a second later and would fail it again.
                ready = [b for b in self.pool.ready() if b.url not in tried]
                if ready:
                    return ready
                left = deadline - time.monotonic()
                if tried and not set(self.pool.replicas) - tried:
                    left = 0  # every replica known has failed this request: none to wait for
                if left <= 0:
                    self.metrics.refused.labels("replica_failed" if tried else "hold_timeout").inc()
                    if tried:
                        raise ReplicaFailed(
                            f"The request failed on {len(tried)} replica(s) before any answer, "
                            "and no other replica was ready for it.")
                    raise NotReady(f"No replica became ready within {self.settings.hold_timeout:g} s.")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.pool.changed.wait(), left)

    # --- proxying ----------------------------------------------------------------------
    def target(self, request: Request) -> str:
        """The path and query to send, as the client sent them (percent-encoding kept) with
        dot segments resolved; NotFound for paths the router does not proxy."""
        scope = request.scope
        raw = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string") or b""
        try:
            url = httpx.URL("http://router" + (raw + (b"?" + query if query else b"")).decode("latin-1"))
        except (httpx.InvalidURL, ValueError) as e:
            raise BadRequest(f"The request path is not a valid URL path: {e}") from None
        if not (url.path.startswith(PROXIED_PREFIXES) or url.path in PROXIED_PATHS):
            raise NotFound(f"No route {url.path!r} on this server.")
        if request.method not in PROXIED_METHODS:
            raise MethodNotAllowed(f"Method {request.method} is not allowed here.")
        return url.raw_path.decode("ascii")

    async def proxy(self, request: Request) -> Response:
        started = time.monotonic()
        s = self.settings
        deadline = started + s.hold_timeout
        path = self.target(request)
        # Admission before the body is read: a refusal costs the router no body bytes.
        if not self.pool.ready() and self.held >= s.hold_queue_size:
            self.metrics.refused.labels("queue_full").inc()
            raise QueueFull(f"{self.held} requests are already waiting for a ready replica.")
        length = declared_length(request.scope)
        if length is None:  # chunked: count the most it may be; else HTTP/1.1 has no body
            chunked = any(k == b"transfer-encoding" for k, _ in request.scope["headers"])
            length = s.max_request_bytes if chunked else 0
        size = length
        if self.buffered + size > s.max_buffered_bytes:
            self.metrics.refused.labels("buffer_full").inc()
            raise Overloaded("The router holds as many request bodies as it may "
                             f"({router_env_name('max_buffered_bytes')}); retry shortly.")
        reservation = _Reservation(self, size)
        try:
            try:
                raw = await read_body(request.receive, s.max_request_bytes,
                                      started + s.body_timeout,
                                      router_env_name("max_request_bytes"))
            except ClientLeft:
                raise _Left from None
            request.state.body_read = True
            reservation.resize(len(raw))
            keys, model = self.route_of(request, raw)
            # The client's own Authorization goes through: replicas check the API key. Raw
            # bytes: a header's value is not text (httpx would refuse a non-ASCII one).
            headers = [(k, v) for k, v in request.scope["headers"] if k not in _DROP]
            leaving = asyncio.ensure_future(_disconnected(request.receive))
            try:
                response = await self._send(request, keys, model, path, headers, raw,
                                            started, deadline, leaving, reservation)
            finally:
                leaving.cancel()
        except _Left:
            reservation.release()
            return Response(status_code=499)
        except BaseException:
            reservation.release()
            raise
        return response

    async def _send(self, request: Request, keys: list[int], model: str | None, path: str,
                    headers: list[tuple[bytes, bytes]], raw: bytes, started: float,
                    deadline: float, leaving: asyncio.Future,
                    reservation: _Reservation) -> Response:
        tried: set[str] = set()
        while True:
            if len(tried) >= self.settings.max_attempts:
                raise ReplicaFailed(f"The request failed on {len(tried)} replicas before any "
                                    f"answer ({router_env_name('max_attempts')}).")
            replica = await self.choose(keys, tried, deadline, leaving, model)
            tried.add(replica.url)
            others = len(tried) < self.settings.max_attempts and \
                any(b.url not in tried for b in self.pool.ready())
            try:
                return await self._attempt(request, replica, path, headers, raw, started,
                                           others, leaving, reservation)
            except _Retry:
                continue

    async def _attempt(self, request: Request, replica: Replica, path: str,
                       headers: list[tuple[bytes, bytes]], raw: bytes, started: float,
                       others: bool, leaving: asyncio.Future,
                       reservation: _Reservation) -> Response:
        """Sends to one replica and waits for the first byte of the body (the first token
        when streaming) while watching for the client leaving and for the replica being
        given up by its poller. Retries (raises _Retry) on a connect error, a replica that
        dies or is given up before answering (it backs off: --failure-backoff), and on a
        503 while ``others`` (another ready replica not yet tried) exist; after the first
        byte, never."""
        upstream_req = self.client.build_request(request.method, replica.url + path,
                                                 headers=headers, content=raw)
        replica.in_flight += 1
        self.metrics.in_flight.labels(replica.id).inc()
        done = False

        def finish(outcome: str) -> None:
            nonlocal done
            if not done:
                done = True
                replica.in_flight -= 1
                self.metrics.in_flight.labels(replica.id).dec()
                self.metrics.requests.labels(replica.id, outcome).inc()

        upstream: httpx.Response | None = None

        async def first() -> tuple[httpx.Response, AsyncIterator[bytes], bytes]:
            nonlocal upstream
            upstream = await self.client.send(upstream_req, stream=True)
            chunks = upstream.aiter_raw()
            if upstream.status_code == 503 and others:
                return upstream, chunks, b""
            return upstream, chunks, await anext(chunks, b"")

        lost = replica.lost
        sending = asyncio.ensure_future(first())
        gone = asyncio.ensure_future(lost.wait())
        try:
            await asyncio.wait({sending, leaving, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not sending.done():  # the client left, or the replica was given up
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                await sending
            if upstream is not None:
                await upstream.aclose()
            if leaving.done():
                finish("cancelled")
                raise _Left
            await self.pool.failed(replica, "given up by its poller")
            finish("retried")
            raise _Retry
        try:
            resp, chunks, head = sending.result()
        except httpx.HTTPError as e:  # connect error, or the replica died before answering
            await self.pool.failed(replica, repr(e))
            finish("retried")
            raise _Retry from e
        if resp.status_code == 503 and others:
            await resp.aclose()
            finish("retried")
            raise _Retry
        self.pool.answered(replica)
        self.metrics.ttft.observe(time.monotonic() - started)
        sse = resp.headers.get("content-type", "").startswith("text/event-stream")

        async def rest() -> AsyncIterator[bytes]:
            outcome = "ok" if resp.status_code < 400 else "error"
            gone = asyncio.ensure_future(lost.wait())
            try:
                if head:
                    yield head
                while True:
                    # Each chunk, unless the poller gives the replica up first (a stream
                    # stopped mid-way would otherwise hold its client until --read-timeout).
                    nxt = asyncio.ensure_future(anext(chunks, None))
                    await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                    if not nxt.done():
                        nxt.cancel()
                        with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
                            await nxt
                        raise httpx.ReadError("the replica stopped answering its polls")
                    chunk = nxt.result()
                    if chunk is None:
                        break
                    yield chunk
            except httpx.HTTPError as e:
                outcome = "broken"  # streaming began: never retried
                log.warning("replica %s broke off an answer: %r", replica.url, e)
                if not sse:
                    raise  # the server aborts the connection: the client sees a cut answer
                # As the pod reports errors mid-stream: an OpenAI error event.
                err = InternalError("The replica serving this stream failed.")
                yield b"data: " + json.dumps(openai_body(err)).encode() + b"\n\n"
            except asyncio.CancelledError:
                outcome = "cancelled"
                raise
            finally:
                gone.cancel()
                await resp.aclose()
                finish(outcome)
                reservation.release()

        async def cleanup() -> None:  # also when the stream never started (client gone)
            await resp.aclose()
            finish("cancelled")
            reservation.release()

        answer = _Answer(rest(), resp.status_code, cleanup)
        answer.raw_headers = [(k, v) for k, v in resp.headers.raw
                              if k.lower() not in _DROP_ANSWER]
        answer.raw_headers.append((BACKEND_HEADER.encode(), replica.id.encode()))
        return answer


async def _disconnected(receive) -> None:
    """Returns when the client goes away (the body has been read, so the next message the
    server has for us is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def create_app(router: Router) -> ASGIApp:
    def refused(request: Request, e: LlamafleetError) -> Response:
        answer = error_response(e)
        if not getattr(request.state, "body_read", False):
            answer.headers["Connection"] = "close"  # the body is never read
        return answer

    async def proxy(request: Request) -> Response:
        try:
            return await router.proxy(request)
        except LlamafleetError as e:
            return refused(request, e)

    async def metrics(_: Request) -> Response:
        router.metrics.ready.set(len(router.pool.ready()))
        return Response(generate_latest(router.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def health(request: Request) -> Response:
        # ``backends``: every replica the router knows (--backends, or the ready endpoints
        # of the EndpointSlices), by id; ``ready_backends``: those usable now. A caller with
        # --backend-api-key also gets ``urls`` (id -> URL); nobody else sees addresses.
        out = {"status": "ok", "ready_backends": len(router.pool.ready()),
               "backends": sorted(b.id for b in router.pool.replicas.values())}
        if router.is_operator(request):
            out["urls"] = router.pool.by_id()
        return JSONResponse(out)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 405:
            return refused(request, MethodNotAllowed(f"Method {request.method} is not allowed here."))
        if exc.status_code == 404:
            return refused(request, NotFound(f"No route {request.url.path!r} on this server."))
        body = {"error": {"message": str(exc.detail), "type": "invalid_request_error",
                          "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def server_error(_: Request, exc: Exception) -> Response:
        log.error("internal error: %r", exc, exc_info=exc)
        return error_response(InternalError("The router failed on this request."))

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette):
        tasks = []
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
            await router.pool.close()
            await router.client.aclose()
            await router.poll_client.aclose()

    # The router answers /health, /ready (it is ready while it can hold requests) and
    # /router/metrics itself; /v1/*, /info and /metrics go to a replica; anything else is
    # an OpenAI-shaped 404.
    any_method = ["GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"]
    routes = [Route("/health", health), Route("/ready", health),
              Route("/router/metrics", metrics),
              *(Route(p, proxy, methods=any_method) for p in
                [*(f"{prefix}{{path:path}}" for prefix in PROXIED_PREFIXES), *PROXIED_PATHS])]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, Exception: server_error})
    # Header count and declared body size are checked before anything else; the proxy
    # reads bodies itself, once it has admitted the request.
    return ReadLimits(app, router.settings.read_limits, read=False)
