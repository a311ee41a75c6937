"""`llamafleet serve`: the model first, then gRPC and metrics, then HTTP (probes answer once
it listens; the operator's startupProbe allows for the load).

SIGTERM (or SIGINT) drains: /ready fails and new requests get 503 at once, running
generations get ``drain_timeout_s`` to finish, then the listeners close and the process
exits 0. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from types import FrameType

import uvicorn
from llamafleet.common import malloc, tracing
from llamafleet.common.http_limits import ReadLimits, uvicorn_options
from prometheus_client import start_http_server

from .http_api import create_app
from .serving import Serving, build
from .settings import Settings
from .tls import ReloadingSSLContext

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.05


class _Uvicorn(uvicorn.Server):
    """uvicorn, with its SIGTERM/SIGINT handler starting our drain instead of stopping at
    once. Unlike uvicorn's, it does not re-raise the signal after shutdown, so a drained
    pod exits 0."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]):
        super().__init__(config)
        self._on_signal = on_signal
        self._signalled = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._signalled:  # a second signal: stop now
            self.should_exit = True
            return
        self._signalled = True
        self._on_signal()


class Server:
    """All listeners of one pod. ``await run()`` until ``stop()`` or a signal."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.app = create_app(settings)
        self.serving: Serving | None = None
        self.grpc = None
        self._metrics_server = None
        self.ready = asyncio.Event()
        self.failed: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task | None = None
        ssl = {}
        if settings.http_tls:
            ssl = {"ssl_certfile": str(settings.grpc_cert_path),
                   "ssl_keyfile": str(settings.grpc_key_path),
                   "ssl_context_factory": ReloadingSSLContext(settings.grpc_cert_path,  # type: ignore[arg-type]
                                                              settings.grpc_key_path)}  # type: ignore[arg-type]
        # uvicorn's own grace period only covers flushing responses after our drain.
        # Bounded reads (heads and bodies, in bytes and time): llamafleet.common.http_limits.
        limits = settings.read_limits
        self.http = _Uvicorn(uvicorn.Config(
            ReadLimits(self.app, limits), host=settings.host, port=settings.http_port,
            log_config=None, timeout_graceful_shutdown=5, **uvicorn_options(limits), **ssl),
            self._on_signal)

    @property
    def http_port(self) -> int:
        servers = getattr(self.http, "servers", None) or []
        for srv in servers:
            for sock in srv.sockets:
                return sock.getsockname()[1]
        return self.settings.http_port

    async def _load(self) -> None:
        try:
            # On the main thread, like init_backends (which says why).
            self.serving = build(self.settings)
            self.serving.tenants = self.app.state.tenants
            self.serving.limiter = self.app.state.limiter
            self.app.state.serving = self.serving
            if self.settings.grpc_port:
                from .grpc_server import start_grpc

                self.grpc = await start_grpc(self.settings, self.serving)
            if self.settings.metrics_port:
                self._metrics_server, _ = start_http_server(
                    self.settings.metrics_port, self.settings.host, self.serving.metrics.registry)
            log.info("model %s loaded, max_batch_size %d", self.serving.model_id,
                     self.serving.engine.max_batch_size)
        except BaseException as e:
            self.failed = e
            log.error("start-up failed: %s", e)
            self.ready.set()
            raise

    async def run(self) -> None:
        async def mark_ready() -> None:
            while not self.http.started and not self.http.should_exit:
                await asyncio.sleep(0.01)
            self.ready.set()

        self._loop = asyncio.get_running_loop()
        try:
            await self._load()
            watcher = asyncio.create_task(mark_ready())
            await self.http.serve()
            watcher.cancel()
        finally:
            self.ready.set()
            await self.shutdown()
        if self.failed is not None:
            raise self.failed

    def stop(self) -> None:
        self.http.should_exit = True

    def _on_signal(self) -> None:
        """From the signal handler: start the drain on the event loop."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = asyncio.ensure_future(self.drain())

    async def drain(self) -> None:
        """Refuse new work, give running and queued generations and embeddings requests
        ``drain_timeout_s`` to finish (whatever is left then ends with a 'shutting down'
        error: a 503 when nothing was sent yet), then stop."""
        serving = self.serving
        if serving is not None:
            serving.draining = True
            engine = serving.engine
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.settings.drain_timeout_s
            log.info("draining: %d running, %d queued, %d embeddings requests, up to %gs",
                     engine.running, engine.queued, serving.embeddings_pending,
                     self.settings.drain_timeout_s)
            while (engine.running or engine.queued or serving.embeddings_pending) \
                    and loop.time() < deadline:
                await asyncio.sleep(DRAIN_POLL_S)
            if serving.embeddings_pending:
                # Each stops before its next llama_decode (at most EMBED_BATCH tokens away)
                # and answers 503, so closing the embeddings thread does not wait for them.
                log.warning("drain timeout: ending %d embeddings requests",
                            serving.embeddings_pending)
                serving.cancel_embeddings()
            if engine.running or engine.queued:
                log.warning("drain timeout: ending %d running and %d queued generations",
                            engine.running, engine.queued)
                await asyncio.to_thread(engine.stop)
        self.stop()

    async def shutdown(self) -> None:
        if self.grpc is not None:
            await self.grpc.stop(grace=5)
            self.grpc = None
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server = None
        if self.serving is not None:
            await asyncio.to_thread(self.serving.close)


def init_backends() -> None:
    """Initialise llama.cpp's back-ends (CUDA device discovery) on the main thread.

    With the CUDA build (seen on an H100), the first model load crashed when llama.cpp's shared
    libraries were loaded after grpc's and numpy's, and when that load ran in a worker thread
    and so initialised the back-ends there (inside print_info, after grpc was imported). So
    ``cli.setup_serve`` imports llama_cpp first, this runs on the main thread, and ``Server._load``
    loads the model on the main thread too.
    """
    import llama_cpp

    from . import llama_backend  # noqa: F401 - routes llama.cpp's logs into logging

    llama_cpp.llama_backend_init()
    log.info("llama.cpp %s", llama_cpp.llama_print_system_info().decode().strip())


def keep_heap_warm() -> None:
    """Every engine step makes numpy temporaries of 100 KiB to tens of MiB (a block of logits
    rows, sort keys, weights) and frees them. With glibc's moving thresholds they went to
    fresh mappings, or to heap that was trimmed after each step, and every step paid the page
    faults again: sampling 64 sequences took 12 µs per sequence instead of 7.6. Blocks up to
    32 MiB come from the heap, and up to 64 MiB of free heap stays mapped; bigger ones (an
    embeddings batch's logits) still get their own mapping and go back to the OS."""
    malloc.set_thresholds(32 << 20, 64 << 20)


def serve(settings: Settings) -> int:
    keep_heap_warm()
    init_backends()
    # The engine thread re-takes the GIL after every llama_decode; with the default 5 ms
    # switch interval it can wait that long behind the event loop. 0.5 ms keeps steps tight.
    sys.setswitchinterval(0.0005)
    tracing.setup("llamafleet-pod")  # off unless OTEL_* asks (docs/observability.md)

    async def main() -> None:
        await Server(settings).run()  # uvicorn handles SIGTERM/SIGINT

    try:
        try:
            import uvloop  # faster loop and cross-thread wake-ups; optional
        except ImportError:
            asyncio.run(main())
        else:
            uvloop.run(main())
    except Exception as e:
        log.debug("exit", exc_info=e)
        return 1
    return 0
