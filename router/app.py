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
from llamafleet.common import tenants as T
from llamafleet.common import tracing
from llamafleet.common.contract import BACKEND_HEADER, router_env_name
from llamafleet.common.errors import (
    BadRequest,
    InternalError,
    LlamafleetError,
    MethodNotAllowed,
    NotFound,
    NotReady,
    Overloaded,
    QueueFull,
    RateLimited,
    ReplicaFailed,
    Unauthorized,
    http_error,
    mapping_for,
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
from .hold_queue import HoldQueue, Waiter
from .metrics import RouterMetrics
from .replicas import PollPolicy, Pool, Replica, holding
from .scaling import Scaler
from .settings import RouterSettings
from .tenancy import ADMIN_PATHS, BYTES_PER_TOKEN, ROUTER_SET, Charge, UsageTrailer, client_key

log = logging.getLogger(__name__)

ROUTING_KEY_HEADER = "x-llamafleet-routing-key"
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


def error_response(err: LlamafleetError, anthropic: bool = False) -> JSONResponse:
    """The router's HTTP answer to a domain error (common.errors.http_error)."""
    return JSONResponse(*http_error(err, anthropic=anthropic))


class _Retry(Exception):
    """This replica failed before any byte was sent to the client: try another."""


class _Left(Exception):
    """The client went away before its answer began."""


class _Reservation:
    """Bytes of request bodies counted against --max-buffered-bytes until released, and the
    request's charge on its tenant's limits (released with it: concurrent requests)."""

    def __init__(self, router: Router, size: int):
        self.router, self.size = router, size
        router.buffered += size
        self.charge: Charge | None = None

    def resize(self, size: int) -> None:
        self.router.buffered += size - self.size
        self.size = size

    def release(self) -> None:
        self.router.buffered -= self.size
        self.size = 0
        if self.charge is not None and self.charge.lease is not None:
            self.charge.lease.release()

    def settle(self, usage: tuple[int, int] | None, failed: bool) -> None:
        """Charges the tenant what the answer cost (the replica's count) in place of the
        estimate charged at admission: nothing for an error answer without a count, the
        estimate for an answer cut short."""
        c = self.charge
        if c is None or c.done:
            return
        c.done = True
        if usage is None:
            if failed and c.lease is not None:
                c.lease.charge(-c.estimate)
            return
        prompt, completion = usage
        if c.lease is not None:
            c.lease.charge(prompt + completion - c.estimate)
        m = self.router.metrics
        if prompt:
            m.tenant_tokens.labels(c.tenant_label, "prompt").inc(prompt)
        if completion:
            m.tenant_tokens.labels(c.tenant_label, "completion").inc(completion)


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
        self.queue = HoldQueue()  # requests waiting for a usable replica
        self.buffered = 0  # bytes of request bodies held now (--max-buffered-bytes)
        # Tenants (--tenants-file): keys, priorities and limits, counted here for the fleet.
        self.tenants = T.load(settings.tenants_file) if settings.tenants_file else None
        self.limiter = T.Limiter()

    @property
    def held(self) -> int:
        """Requests waiting in the hold queue now."""
        return len(self.queue)

    # --- tenants ---------------------------------------------------------------------------
    def identify(self, request: Request) -> T.Caller | None:
        """The caller by its key when the router has a tenants file (None without one: the
        replicas check keys). Unauthorized for a key that is neither a tenant's nor
        --backend-api-key (the pods' own, which passes as it is: ``admin``)."""
        if self.tenants is None:
            return None
        token = client_key(request.headers)
        if token is not None:
            given = token.encode("latin-1")
            key = self.settings.backend_api_key
            if key is not None and hmac.compare_digest(given, key.get_secret_value().encode()):
                return T.Caller(admin=True)
            if (entry := self.tenants.current().lookup(given)) is not None:
                return T.Caller(entry.tenant, T.priority_of(
                    entry, request.headers.get(T.OBJECTIVE_HEADER)))
        how = "'x-api-key: <key>'" if request.url.path.rstrip("/") == "/v1/messages" \
            else "'Authorization: Bearer <key>'"
        raise Unauthorized(f"Incorrect API key provided. Pass it as {how}.")

    def label(self, tenant: str) -> str:
        return T.tenant_label(tenant, self.tenants.current() if self.tenants else None)

    def admit(self, caller: T.Caller | None) -> Charge | None:
        """The request's charge on its tenant's limits; RateLimited (429) beyond one."""
        if caller is None:
            return None
        label = self.label(caller.tenant)
        lease = None
        if caller.tenant and self.tenants is not None:
            limits = self.tenants.current().limits.get(caller.tenant, T.Limits())
            try:
                lease = self.limiter.admit(caller.tenant, limits)
            except RateLimited as e:
                self.metrics.tenant_rejected.labels(label, e.reason).inc()
                raise
        self.metrics.tenant_requests.labels(label).inc()
        return Charge(lease, label)

    def headers_for(self, request: Request, caller: T.Caller | None, path: str
                    ) -> list[tuple[bytes, bytes]]:
        """The headers sent on: the client's (hop-by-hop ones dropped). A tenant's request
        goes with --backend-api-key in place of its key, and with its tenant and priority,
        which the pods trust with their own key only (they then count no limits: the
        router did), and asks for the answer's token count."""
        headers = [(k, v) for k, v in request.scope["headers"] if k not in _DROP]
        key = self.settings.backend_api_key
        if caller is None or caller.admin or key is None or path.startswith(ADMIN_PATHS):
            return headers
        return [*((k, v) for k, v in headers if k not in ROUTER_SET),
                (b"authorization", f"Bearer {key.get_secret_value()}".encode()),
                (T.TENANT_HEADER.encode(), caller.tenant.encode()),
                (T.PRIORITY_HEADER.encode(), str(caller.priority).encode()),
                (T.USAGE_TRAILER_HEADER.encode(), b"1")]

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

    def usable(self, tried: set[str]) -> list[Replica]:
        """Ready replicas this request has not tried, and (with --max-queued-per-replica)
        that are not saturated: fewer of our requests on them than their slots plus that."""
        cap = self.settings.max_queued_per_replica
        return [b for b in self.pool.ready() if b.url not in tried and
                (cap is None or not b.slots or b.in_flight < b.slots + cap)]

    def _claim(self, candidates: list[Replica], keys: list[int], model: str | None) -> Replica:
        """The replica for a request among ``candidates`` (when ``model`` names a LoRA adapter
        that some of them hold, one of those: any other would answer 404), by prefix under
        that adapter and load; its request is counted on it at once."""
        if model and (holders := holding(candidates, model)):
            candidates, keys = holders, adapter_keys(model, keys)
        # The candidates themselves, not pool.replicas: a replica may leave the pool (its
        # EndpointSlice changed) while this request waited.
        by_url = {b.url: b for b in candidates}
        loads = {u: b.load for u, b in by_url.items()}
        url, hit = self.affinity.pick(keys, loads, lambda u: by_url[u].kv_use,
                                      lambda u: by_url[u].slots)
        self.metrics.affinity.labels("hit" if hit else "miss").inc()
        replica = by_url[url]
        replica.in_flight += 1
        self.metrics.in_flight.labels(replica.id).inc()
        return replica

    def _unclaim(self, replica: Replica) -> None:
        replica.in_flight -= 1
        self.metrics.in_flight.labels(replica.id).dec()
        self.dispatch()

    def dispatch(self) -> None:
        """Hands usable replicas to held requests: the highest priority first, tenants of one
        priority in turn (HoldQueue.order)."""
        if not len(self.queue):
            return
        for w in list(self.queue.order()):
            if w.future.done():
                continue
            candidates = self.usable(w.tried)
            if candidates:
                keys, model = w.route
                replica = self._claim(candidates, keys, model)
                self.queue.served(w)
                w.future.set_result(replica)
        self.metrics.held.set(self.held)

    def shed_for(self, priority: int) -> bool:
        """Makes room in a full hold queue for a request of ``priority``: the lowest-priority
        request held (of a lower priority) gets 429 now. False when there is none to shed."""
        low = self.queue.lowest()
        if low is None or low.priority >= priority:
            return False
        self.queue.remove(low)
        self.metrics.refused.labels("shed").inc()
        self.metrics.tenant_rejected.labels(self.label(low.tenant), "shed").inc()
        low.future.set_exception(RateLimited(
            "The router's hold queue is full and a request of a higher priority took this "
            "request's place; retry shortly.", reason="shed", retry_after_s=1))
        return True

    async def choose(self, keys: list[int], tried: set[str], deadline: float,
                     leaving: asyncio.Future, model: str | None = None,
                     caller: T.Caller | None = None, trace: tracing.Span | None = None
                     ) -> Replica:
        """A usable replica this request has not tried, counted as in flight on it; holds the
        request (bounded) while there is none or others wait before it, until ``deadline``
        or until the client leaves (_Left). Held requests go highest priority first, and
        round robin by tenant within a priority. ``trace``: the routing decision's span (with
        tracing on), parent of a ``llamafleet.router.hold`` span while the request is held."""
        caller = caller or T.Caller()
        started = time.monotonic()
        label = self.label(caller.tenant) if self.tenants is not None else None
        candidates = self.usable(tried)
        if candidates and not len(self.queue):
            if label is not None:
                self.metrics.tenant_queue_wait.labels(label).observe(0)
            return self._claim(candidates, keys, model)
        if self.held >= self.settings.hold_queue_size and not self.shed_for(caller.priority):
            self.metrics.refused.labels("queue_full").inc()
            if label is not None:
                self.metrics.tenant_rejected.labels(label, "queue_full").inc()
            raise QueueFull(f"{self.held} requests are already waiting for a ready replica.")
        w = Waiter(caller.priority, caller.tenant, tried,
                   asyncio.get_running_loop().create_future())
        w.route = (keys, model)
        self.queue.push(w)
        self.metrics.held.set(self.held)
        replica: Replica | None = None
        hold = None if trace is None else tracing.start_span(
            "llamafleet.router.hold", tracing.child(trace), start=w.since,
            attributes={"llamafleet.held_before": self.held - 1})
        try:
            await self.pool.notify()  # the scaler (--llmservice) watches ``held``
            self.dispatch()
            while not w.future.done():
                # Every replica known has failed this request: none to wait for.
                failed_all = tried and not set(self.pool.replicas) - tried
                left = 0 if failed_all else deadline - time.monotonic()
                if left <= 0:
                    self.metrics.refused.labels("replica_failed" if tried else "hold_timeout").inc()
                    if tried:
                        raise ReplicaFailed(
                            f"The request failed on {len(tried)} replica(s) before any answer, "
                            "and no other replica was ready for it.")
                    raise NotReady(f"No replica became ready within {self.settings.hold_timeout:g} s.")
                changed = asyncio.ensure_future(self._changed())
                try:
                    # At least every second: a replica's failure backoff ends without a poll.
                    await asyncio.wait({w.future, leaving, changed}, timeout=min(left, 1.0),
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                if w.future.done():
                    break
                if leaving.done():  # the client left: its place is free at once
                    self.metrics.refused.labels("client_left").inc()
                    raise _Left
                self.dispatch()
            replica = w.future.result()  # RateLimited when shed
            if label is not None:
                self.metrics.tenant_queue_wait.labels(label).observe(time.monotonic() - started)
            return replica
        except BaseException:
            if replica is None and w.future.done() and not w.future.cancelled() and \
                    w.future.exception() is None:
                self._unclaim(w.future.result())  # claimed for it as it gave up
            raise
        finally:
            if hold is not None:
                hold.set_attribute("llamafleet.served", replica is not None)
                hold.end()
            self.queue.remove(w)
            self.metrics.held.set(self.held)
            await self.pool.notify()

    async def _changed(self) -> None:
        async with self.pool.changed:
            await self.pool.changed.wait()

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
        """The request's answer from a replica. With tracing on, its span
        ``llamafleet.router.request`` (the client's traceparent its parent, the replica's
        request its child) ends with the answer (_Answer's cleanup), or here when none came."""
        if not tracing.ON:
            return await self._proxy(request, None)
        span = tracing.start_span("llamafleet.router.request", tracing.extract(request.headers),
                                  tracing.SpanKind.SERVER,
                                  {"http.request.method": request.method, "url.path": request.url.path})
        try:
            response = await self._proxy(request, span)
        except LlamafleetError as e:
            span.set_attributes({"http.response.status_code": mapping_for(e).http_status,
                                 "error.type": type(e).__name__})
            span.set_status(tracing.StatusCode.ERROR, e.message)
            span.end()
            raise
        except BaseException as e:
            span.set_attribute("error.type", type(e).__name__)
            span.set_status(tracing.StatusCode.ERROR)
            span.end()
            raise
        if not isinstance(response, _Answer):  # the client left: no answer to end it
            span.set_attribute("http.response.status_code", response.status_code)
            span.end()
        return response

    async def _proxy(self, request: Request, span: tracing.Span | None) -> Response:
        started = time.monotonic()
        s = self.settings
        deadline = started + s.hold_timeout
        path = self.target(request)
        caller = self.identify(request)  # 401 for an unknown key, with --tenants-file
        # Admission before the body is read: a refusal costs the router no body bytes.
        if not self.usable(set()) and self.held >= s.hold_queue_size and \
                ((low := self.queue.lowest()) is None or
                 low.priority >= (caller.priority if caller else 0)):
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
            reservation.charge = self.admit(caller)  # 429 beyond the tenant's limits
            try:
                raw = await read_body(request.receive, s.max_request_bytes,
                                      started + s.body_timeout,
                                      router_env_name("max_request_bytes"))
            except ClientLeft:
                raise _Left from None
            request.state.body_read = True
            reservation.resize(len(raw))
            if (charge := reservation.charge) is not None and charge.lease is not None:
                # The prompt at admission, estimated; the replica's count replaces it.
                charge.estimate = max(1, len(raw) // BYTES_PER_TOKEN)
                charge.lease.charge(charge.estimate)
            keys, model = self.route_of(request, raw)
            # The client's own Authorization goes through (replicas check the API key),
            # unless the router named the tenant (headers_for). Raw bytes: a header's value
            # is not text (httpx would refuse a non-ASCII one).
            headers = self.headers_for(request, caller, path)
            if span is not None:  # the replica's parent is this request's span
                headers = tracing.inject(headers, span)
            leaving = asyncio.ensure_future(_disconnected(request.receive))
            try:
                response = await self._send(request, keys, model, path, headers, raw,
                                            started, deadline, leaving, reservation, caller, span)
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
                    reservation: _Reservation, caller: T.Caller | None = None,
                    span: tracing.Span | None = None) -> Response:
        tried: set[str] = set()
        while True:
            if len(tried) >= self.settings.max_attempts:
                raise ReplicaFailed(f"The request failed on {len(tried)} replicas before any "
                                    f"answer ({router_env_name('max_attempts')}).")
            route = None if span is None else tracing.start_span(
                "llamafleet.router.route", tracing.child(span),
                attributes={"llamafleet.attempt": len(tried) + 1})
            try:
                replica = await self.choose(keys, tried, deadline, leaving, model, caller, route)
                if route is not None:
                    route.set_attribute("llamafleet.replica", replica.id)
            finally:
                if route is not None:
                    route.end()
            tried.add(replica.url)
            others = len(tried) < self.settings.max_attempts and \
                any(b.url not in tried for b in self.pool.ready())
            try:
                return await self._attempt(request, replica, path, headers, raw, started,
                                           others, leaving, reservation, span)
            except _Retry:
                continue

    async def _attempt(self, request: Request, replica: Replica, path: str,
                       headers: list[tuple[bytes, bytes]], raw: bytes, started: float,
                       others: bool, leaving: asyncio.Future,
                       reservation: _Reservation, span: tracing.Span | None = None) -> Response:
        """Sends to one replica and waits for the first byte of the body (the first token
        when streaming) while watching for the client leaving and for the replica being
        given up by its poller. Retries (raises _Retry) on a connect error, a replica that
        dies or is given up before answering (it backs off: --failure-backoff), and on a
        503 while ``others`` (another ready replica not yet tried) exist; after the first
        byte, never. ``span``: the request's (tracing on), ended with the answer."""
        upstream_req = self.client.build_request(request.method, replica.url + path,
                                                 headers=headers, content=raw)
        done = False  # choose() counted the request on the replica

        def finish(outcome: str) -> None:
            nonlocal done
            if not done:
                done = True
                self.metrics.requests.labels(replica.id, outcome).inc()
                self._unclaim(replica)  # its place may go to a held request

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
        counted = reservation.charge is not None
        trailer = UsageTrailer() if counted and sse else None
        usage = T.parse_usage(resp.headers.get(T.USAGE_HEADER, "")) if counted else None

        async def rest() -> AsyncIterator[bytes]:
            outcome = "ok" if resp.status_code < 400 else "error"
            ended = False  # the stream's last event ([DONE]) went to the client
            gone = asyncio.ensure_future(lost.wait())
            try:
                if head:
                    yield trailer.feed(head) if trailer is not None else head
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
                    if trailer is not None:
                        chunk = trailer.feed(chunk)
                        if not chunk:
                            continue
                    ended = sse and chunk.rstrip().endswith(b"data: [DONE]")
                    yield chunk
                if trailer is not None and (tail := trailer.flush()):
                    yield tail
            except httpx.HTTPError as e:
                outcome = "broken"  # streaming began: never retried
                log.warning("replica %s broke off an answer: %r", replica.url, e)
                if not sse:
                    raise  # the server aborts the connection: the client sees a cut answer
                # As the pod reports errors mid-stream: an OpenAI error event.
                err = InternalError("The replica serving this stream failed.")
                yield b"data: " + json.dumps(openai_body(err)).encode() + b"\n\n"
            except asyncio.CancelledError:
                # A client that leaves once it has read [DONE] got its whole answer (the
                # OpenAI SDK closes then, before the replica's end of the body).
                if not ended:
                    outcome = "cancelled"
                raise
            finally:
                gone.cancel()
                await resp.aclose()
                finish(outcome)
                reservation.settle(trailer.usage() if trailer is not None else usage,
                                   failed=resp.status_code >= 400)
                reservation.release()

        async def cleanup() -> None:  # also when the stream never started (client gone)
            await resp.aclose()
            finish("cancelled")
            reservation.settle(usage, failed=resp.status_code >= 400)
            reservation.release()
            if span is not None:
                span.set_attributes({"http.response.status_code": resp.status_code,
                                     "llamafleet.replica": replica.id})
                span.end()

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
        # Anthropic's error shape on /v1/messages, as the pods answer there; else OpenAI's.
        answer = error_response(e, anthropic=request.url.path.rstrip("/") == "/v1/messages")
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
