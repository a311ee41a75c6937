"""Tracing through a real router in front of a real pod: one trace id from the client's
traceparent through the router's spans (request, route, hold) to the pod's (generation,
queue_wait, prefill, decode), with token counts.

Two shapes, each real where it counts:
- In one process (the router's app under uvicorn in a thread, the pod in another, real HTTP on
  loopback between them), so one InMemorySpanExporter sees both sides' spans and their
  parent links exactly. The request is held until the router learns of the pod, as discovery
  tells it of a replica that scaled up (Pool.set_urls, what the EndpointSlice watch calls).
- As users run them (`llamafleet router` and `llamafleet serve` processes turned on by OTEL_*
  alone), exporting over OTLP/HTTP to a receiver in the test that decodes the protobuf
  ExportTraceServiceRequest: the spans of both services share the client's trace id."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import uvicorn
from llamafleet.router.app import Router, create_app
from llamafleet.router.settings import RouterSettings
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support.servers import (
    RunningServer,
    free_port,
    serve_process,
    serve_ready,
    start_router,
    wait_until,
)

pytestmark = pytest.mark.integration

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
POD_SPANS = {"llamafleet.pod.generation", "llamafleet.pod.queue_wait", "llamafleet.pod.prefill",
             "llamafleet.pod.decode"}
ROUTER_SPANS = {"llamafleet.router.request", "llamafleet.router.route", "llamafleet.router.hold"}


class ThreadRouter:
    """The router's app (create_app, as `llamafleet router` serves it) under uvicorn in a
    thread of this process, so that its spans reach this process's exporter."""

    def __init__(self, backends: list[str]):
        self.port = free_port()
        self.router = Router(RouterSettings(backends=",".join(backends), host="127.0.0.1",
                                            port=self.port, poll_interval=0.2))
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.router), host="127.0.0.1",
                                                    port=self.port, log_level="warning"))
        self.loop: asyncio.AbstractEventLoop | None = None

        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve()

        self.thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_backends(self, urls: list[str]) -> None:
        """As the EndpointSlice watch does when a replica becomes ready (app.lifespan)."""
        assert self.loop is not None
        asyncio.run_coroutine_threadsafe(self.router.pool.set_urls(urls), self.loop).result(10)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _by_trace(exporter: InMemorySpanExporter, trace_id: int) -> dict[str, list]:
    out: dict[str, list] = {}
    for s in exporter.get_finished_spans():
        if s.context.trace_id == trace_id:
            out.setdefault(s.name, []).append(s)
    return out


def test_one_trace_through_router_and_pod_in_process(server: RunningServer,
                                                     spans: InMemorySpanExporter) -> None:
    router = ThreadRouter([f"http://127.0.0.1:{free_port()}"])  # nothing there yet
    box: dict = {}

    def ask() -> None:  # held: no replica is ready
        box["r"] = httpx.post(f"{router.url}/v1/completions", timeout=120,
                              headers={"traceparent": TRACEPARENT},
                              json={"prompt": "The sea is", "max_tokens": 4})

    t = threading.Thread(target=ask)
    try:
        t.start()
        wait_until(lambda: router.router.held == 1, timeout=30)
        router.set_backends([server.url])  # the replica that scaled up
        t.join(120)
        assert box["r"].status_code == 200, box["r"].text
        usage = box["r"].json()["usage"]
        got = wait_until(lambda: (g := _by_trace(spans, int(TRACE_ID, 16))).keys()
                         >= ROUTER_SPANS | POD_SPANS and g)

        (req,) = got["llamafleet.router.request"]
        assert req.parent.span_id == int(CLIENT_SPAN, 16) and req.parent.is_remote
        assert req.attributes["http.response.status_code"] == 200
        (route,) = got["llamafleet.router.route"]
        (hold,) = got["llamafleet.router.hold"]
        assert route.parent.span_id == req.context.span_id
        assert hold.parent.span_id == route.context.span_id and hold.attributes["llamafleet.served"]
        assert route.attributes["llamafleet.replica"] == req.attributes["llamafleet.replica"]
        (gen,) = got["llamafleet.pod.generation"]
        assert gen.parent.span_id == req.context.span_id  # the router's traceparent, not the client's
        assert gen.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
        assert gen.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 4
        assert gen.attributes["llamafleet.stream"] is False
        assert [e.name for e in gen.events] == ["first_token"]
        q, p, d = (got[f"llamafleet.pod.{n}"][0] for n in ("queue_wait", "prefill", "decode"))
        assert all(s.parent.span_id == gen.context.span_id for s in (q, p, d))
        # In order, one after another, within the router's span.
        assert req.start_time <= gen.start_time <= q.start_time <= q.end_time == p.start_time
        assert p.end_time <= d.start_time == gen.events[0].timestamp <= d.end_time <= req.end_time
        assert hold.end_time <= gen.start_time

        # Streaming, with a replica ready: no hold, the same shape.
        stream_trace = "5bf92f3577b34da6a3ce929d0e0e4737"
        with httpx.stream("POST", f"{router.url}/v1/chat/completions", timeout=120,
                          headers={"traceparent": f"00-{stream_trace}-{CLIENT_SPAN}-01"},
                          json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                "stream": True, "stream_options": {"include_usage": True}}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines()
                      if line.startswith("data: {")]
        usage = events[-1]["usage"]
        got = wait_until(lambda: (g := _by_trace(spans, int(stream_trace, 16))).keys()
                         >= (ROUTER_SPANS - {"llamafleet.router.hold"}) | POD_SPANS and g)
        assert "llamafleet.router.hold" not in got
        (gen,) = got["llamafleet.pod.generation"]
        assert gen.attributes["llamafleet.stream"] is True
        assert gen.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
        assert gen.parent.span_id == got["llamafleet.router.request"][0].context.span_id
    finally:
        router.stop()


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP receiver on loopback: keeps each span with its resource's service.name."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, object]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                req = ExportTraceServiceRequest.FromString(body)
                with receiver.lock:
                    for rs in req.resource_spans:
                        service = next(a.value.string_value for a in rs.resource.attributes
                                       if a.key == "service.name")
                        receiver.spans += [(service, s) for ss in rs.scope_spans for s in ss.spans]
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    def names(self, trace_id: str) -> set[tuple[str, str]]:
        with self.lock:
            return {(svc, s.name) for svc, s in self.spans if s.trace_id.hex() == trace_id}


def test_router_and_pod_processes_export_one_trace_over_otlp(
        instruct_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    # What a user sets; the processes inherit it. The batch processor exports every 100 ms.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{receiver.server_port}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    port = free_port()
    router = start_router([f"http://127.0.0.1:{port}"])
    proc = None
    box: dict = {}

    def ask() -> None:
        box["r"] = httpx.post(f"{router.url}/v1/completions", timeout=300,
                              headers={"traceparent": TRACEPARENT},
                              json={"prompt": "The sea is", "max_tokens": 4})

    t = threading.Thread(target=ask)
    try:
        t.start()  # held until the pod is up: the hold span
        wait_until(lambda: router.metric("llamafleet_router_hold_queue_depth") == 1, timeout=30)
        proc, _ = serve_process("--model-path", str(instruct_model_path), "--max-batch-size", "2",
                                "--context-size", "1024", port=port)
        wait_until(lambda: serve_ready(proc, port), timeout=120)
        t.join(120)
        assert box["r"].status_code == 200, box["r"].text
        want = {("llamafleet-router", n) for n in ROUTER_SPANS} | \
               {("llamafleet-pod", n) for n in POD_SPANS}
        wait_until(lambda: receiver.names(TRACE_ID) >= want, timeout=30)
        with receiver.lock:
            by_name = {s.name: s for _, s in receiver.spans if s.trace_id.hex() == TRACE_ID}
        assert by_name["llamafleet.router.request"].parent_span_id.hex() == CLIENT_SPAN
        assert by_name["llamafleet.pod.generation"].parent_span_id == \
            by_name["llamafleet.router.request"].span_id
    finally:
        print(router.stop()[-8000:])  # shown when the test failed
        if proc is not None:
            proc.kill()
            proc.communicate(timeout=30)
        receiver.shutdown()


def test_grpc_metadata_carries_the_traceparent_to_the_pod(server: RunningServer,
                                                          spans: InMemorySpanExporter) -> None:
    """gRPC clients call the pods directly (the router speaks HTTP): the metadata's
    traceparent is the pod's parent."""
    import grpc
    from llamafleet.inference.proto import local_pb2 as pb
    from llamafleet.inference.proto import local_pb2_grpc as pb_grpc

    with grpc.insecure_channel(server.grpc_target) as ch:
        replies = list(pb_grpc.LLMLocalServiceStub(ch).GenerateStream(
            pb.LLMLocalServiceGenerateStreamRequest(
                user_prompt="Hi", params=pb.GenerationParams(max_new_tokens=2)),
            metadata=[("traceparent", TRACEPARENT)], timeout=60))
    assert replies[-1].WhichOneof("type") == "finish_details"
    got = wait_until(lambda: (g := _by_trace(spans, int(TRACE_ID, 16))).keys() >= POD_SPANS and g)
    (gen,) = got["llamafleet.pod.generation"]
    assert gen.parent.span_id == int(CLIENT_SPAN, 16) and gen.attributes["llamafleet.api"] == "grpc"
