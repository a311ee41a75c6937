"""common/tracing.py without servers: which OTEL_* environments turn tracing on, that off means
no provider and no context, and that the router's trace headers replace the client's."""

from __future__ import annotations

import time

import pytest
from llamafleet.common import tracing
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

CLIENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.mark.parametrize(("env", "on"), [
    ({}, False),
    ({"OTEL_SERVICE_NAME": "x"}, False),  # a name alone exports nothing
    ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
    ({"OTEL_TRACES_EXPORTER": "console, otlp"}, True),
    ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, False),
    ({"OTEL_TRACES_EXPORTER": "console"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "TRUE"}, False),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "1"}, True),  # as the SDK reads it
])
def test_the_environment_turns_tracing_on(env: dict, on: bool) -> None:
    assert tracing.wanted(env) is on


def test_setup_does_nothing_without_the_environment() -> None:
    assert tracing.setup("llamafleet-test", {}) is False
    assert not tracing.ON and tracing.extract({"traceparent": CLIENT}) is None


def test_inject_replaces_the_clients_trace_headers(spans: InMemorySpanExporter) -> None:
    parent = tracing.extract({"traceparent": CLIENT, "tracestate": "k=v"})
    span = tracing.start_span("s", parent)
    headers = tracing.inject([(b"traceparent", CLIENT.encode()), (b"Tracestate", b"k=v"),
                              (b"x-other", b"1")], span)
    span.end()
    sent = dict(headers)
    ctx = span.get_span_context()
    assert sent[b"traceparent"] == f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-01".encode()
    assert ctx.trace_id == int(CLIENT.split("-")[1], 16)
    assert sent[b"x-other"] == b"1" and sent[b"tracestate"] == b"k=v"
    assert [k.lower() for k, _ in headers].count(b"traceparent") == 1
    assert b"Tracestate" not in sent


def test_record_span_places_monotonic_times_on_the_wall_clock(spans: InMemorySpanExporter) -> None:
    now = time.monotonic()
    tracing.record_span("past", None, now - 2, now - 1, events=[("e", now - 1.5, {})])
    (s,) = spans.get_finished_spans()
    assert s.end_time - s.start_time == pytest.approx(1e9, abs=1e6)
    assert s.events[0].timestamp - s.start_time == pytest.approx(0.5e9, abs=1e6)
    assert abs(time.time_ns() - 1e9 - s.end_time) < 0.1e9
