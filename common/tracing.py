"""OpenTelemetry tracing, shared by the router and the pod: off unless the standard ``OTEL_*``
environment asks for the OTLP exporter (:func:`wanted`), W3C ``traceparent`` in and out.

Off, nothing of the SDK is imported and no provider exists: the hot paths test
:data:`ON` (a module-level bool) and do nothing else. On, the provider is ours, not the
API's global one: it is never swapped under another library, and tests can install an
in-memory exporter (:func:`install`) and take it away again (:func:`uninstall`).

The engine thread never calls OpenTelemetry: the pod's spans are made on the event loop when
a generation ends, from timestamps its request carries (:func:`record_span`)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry import propagate
from opentelemetry import trace as api

# Re-exported: the router and the pod name span kinds and statuses through this module.
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace import StatusCode as StatusCode

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

log = logging.getLogger(__name__)

ON = False  # a provider is installed: the only thing hot paths look at
_provider: TracerProvider | None = None
_tracer: api.Tracer = api.NoOpTracer()

# The headers the W3C propagator reads and writes (the router replaces the client's own).
TRACE_HEADERS = (b"traceparent", b"tracestate")


def wanted(env: Mapping[str, str] = os.environ) -> bool:
    """Whether the environment asks for traces over OTLP: not when ``OTEL_SDK_DISABLED`` is
    true or ``OTEL_TRACES_EXPORTER`` is ``none``; yes when ``OTEL_TRACES_EXPORTER`` names
    ``otlp``, or (unset) when ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_ENDPOINT`` names a receiver. The SDK's own default exporter is otlp,
    but a process that sends spans to localhost:4318 because nobody said anything would cost
    every pod for nothing: an endpoint or an explicit exporter is the opt-in."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":  # the SDK's boolean: only "true"
        return False
    exporters = {e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()}
    if exporters:
        if "otlp" not in exporters:
            if exporters - {"none"}:
                log.warning("OTEL_TRACES_EXPORTER=%s: only otlp (over HTTP) is supported; "
                            "tracing stays off", env["OTEL_TRACES_EXPORTER"])
            return False
        return True
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def setup(service: str, env: Mapping[str, str] = os.environ) -> bool:
    """Turns tracing on when :func:`wanted`: a provider with a batch processor and the OTLP/HTTP
    exporter, both configured by the SDK from ``OTEL_*`` (endpoint, headers, timeouts,
    ``OTEL_BSP_*``, ``OTEL_TRACES_SAMPLER``, ``OTEL_RESOURCE_ATTRIBUTES``). ``service`` is the
    ``service.name`` unless ``OTEL_SERVICE_NAME`` or the resource attributes name one. The
    provider flushes at exit (the SDK's atexit hook). Returns whether tracing is on."""
    if not wanted(env):
        return False
    protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol and protocol != "http/protobuf":
        log.warning("OTLP protocol %r is not available here: spans go as http/protobuf", protocol)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    install(BatchSpanProcessor(OTLPSpanExporter()), service)
    log.info("tracing on: OTLP/HTTP, service %s", _provider.resource.attributes.get("service.name"))
    return True


def install(processor: SpanProcessor, service: str) -> TracerProvider:
    """Turns tracing on with ``processor`` (tests: a SimpleSpanProcessor over an
    InMemorySpanExporter). Replaces any provider installed before."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    global ON, _provider, _tracer
    resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": service}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor)
    uninstall()
    _provider, _tracer, ON = provider, provider.get_tracer("llamafleet"), True
    return provider


def uninstall() -> None:
    """Turns tracing off, flushing and closing the provider installed."""
    global ON, _provider, _tracer
    if _provider is not None:
        _provider.shutdown()
    _provider, _tracer, ON = None, api.NoOpTracer(), False


def extract(headers: Mapping[str, str]) -> Context | None:
    """The caller's trace context from ``traceparent``/``tracestate`` (HTTP headers or gRPC
    metadata), or None when tracing is off: None is what callers keep and pass on."""
    if not ON:
        return None
    return propagate.extract(headers)


def start_span(name: str, parent: Context | None, kind: SpanKind = SpanKind.INTERNAL,
               attributes: Mapping[str, Any] | None = None, start: float | None = None) -> Span:
    """A live span (the router's, which end as their answers do). ``start``: a
    ``time.monotonic()`` reading, for a span that began before it could be made."""
    return _tracer.start_span(name, parent, kind, attributes,
                              start_time=None if start is None else epoch_ns(start))


def child(span: Span) -> Context:
    """A context whose parent is ``span``: what start_span takes to nest under it."""
    return api.set_span_in_context(span)


def record_span(name: str, parent: Context | None, start: float, end: float,
                kind: SpanKind = SpanKind.INTERNAL,
                attributes: Mapping[str, Any] | None = None,
                events: Sequence[tuple[str, float, Mapping[str, Any]]] = (),
                offset: int | None = None) -> Span:
    """A span that has already happened, from ``time.monotonic()`` readings (events: name,
    time, attributes); returns it, ended. ``offset`` (:func:`wall_offset`): one reading for
    spans made together, so that one's end and the next's start are the same instant."""
    offset = wall_offset() if offset is None else offset
    span = _tracer.start_span(name, parent, kind, attributes, start_time=epoch_ns(start, offset))
    for ev_name, at, attrs in events:
        span.add_event(ev_name, attrs, timestamp=epoch_ns(at, offset))
    span.end(end_time=epoch_ns(end, offset))
    return span


def wall_offset() -> int:
    """Wall-clock nanoseconds minus monotonic ones, now."""
    return time.time_ns() - time.monotonic_ns()


def epoch_ns(monotonic: float, offset: int | None = None) -> int:
    """A ``time.monotonic()`` reading as OpenTelemetry's wall-clock nanoseconds."""
    return (wall_offset() if offset is None else offset) + int(monotonic * 1e9)


def inject(headers: list[tuple[bytes, bytes]], span: Span) -> list[tuple[bytes, bytes]]:
    """``headers`` (raw, as a proxy sends them) with the trace headers replaced by ``span``'s:
    the next hop's parent is this span, not the client's."""
    carrier: MutableMapping[str, str] = {}
    propagate.inject(carrier, child(span))
    return [*((k, v) for k, v in headers if k.lower() not in TRACE_HEADERS),
            *((k.encode("latin-1"), v.encode("latin-1")) for k, v in carrier.items())]
