"""gRPC LLMLocalService over real mutual TLS, on the real model; metrics and shared batching."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from llamafleet.inference.proto import local_pb2 as pb
from llamafleet.inference.proto import local_pb2_grpc as pb_grpc
from llamafleet.operator import certs

from tests.support.servers import start_server, wait_until

pytestmark = pytest.mark.integration

DAY = dt.timedelta(days=1)


def write_material(d: Path, ca: certs.KeyPair, server: certs.KeyPair) -> None:
    (d / "ca.crt").write_bytes(ca.cert_pem)
    (d / "tls.crt").write_bytes(server.cert_pem)
    (d / "tls.key").write_bytes(server.key_pem)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("tls")
    ca = certs.new_ca("test-ca", DAY)
    server = certs.issue(ca, "localhost", DAY, sans=["localhost", "127.0.0.1"])
    write_material(d, ca, server)
    other = certs.new_ca("other-ca", DAY)
    return {"dir": d, "ca": ca, "client": certs.issue(ca, "client", DAY, client=True),
            "other_client": certs.issue(other, "intruder", DAY, client=True)}


@pytest.fixture(scope="module")
def tls_server(pki, model_path):
    d = pki["dir"]
    srv = start_server(model_path=model_path, grpc_ca_path=d / "ca.crt",
                       grpc_cert_path=d / "tls.crt", grpc_key_path=d / "tls.key")
    yield srv
    srv.stop()


def channel(target: str, ca: certs.KeyPair, client: certs.KeyPair | None) -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca.cert_pem,
        private_key=client.key_pem if client else None,
        certificate_chain=client.cert_pem if client else None)
    return grpc.secure_channel(target, creds, options=[("grpc.ssl_target_name_override", "localhost")])


def request(user: str = "Tell me a story.", **params) -> pb.LLMLocalServiceGenerateStreamRequest:
    return pb.LLMLocalServiceGenerateStreamRequest(
        system_prompt="You are terse.", user_prompt=user,
        history=[pb.ConversationTurn(role="user", content="hello"),
                 pb.ConversationTurn(role="assistant", content="hi")],
        params=pb.GenerationParams(**params))


def test_mtls_client_streams_tokens_and_finish_details(tls_server, pki) -> None:
    with channel(tls_server.grpc_target, pki["ca"], pki["client"]) as ch:
        stub = pb_grpc.LLMLocalServiceStub(ch)
        req = request(max_new_tokens=12, temperature=0.0)
        req.rag_context = "The sky on Mars is butterscotch."
        replies = list(stub.GenerateStream(req, timeout=120))
    tokens = [r.token for r in replies if r.WhichOneof("type") == "token"]
    assert replies[-1].WhichOneof("type") == "finish_details"
    fin = replies[-1].finish_details
    assert fin.finish_reason in ("stop", "length")
    assert 0 < fin.completion_tokens <= 12
    assert len(tokens) <= fin.completion_tokens
    serving = tls_server.serving
    expected_prompt = serving.chat_prompt(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello"},
         {"role": "assistant", "content": "hi"}, {"role": "user", "content": "Tell me a story."}],
        "The sky on Mars is butterscotch.")
    assert fin.prompt_tokens == len(expected_prompt)
    for t in tokens:
        t.encode("utf-8")


@pytest.mark.parametrize("who", ["no certificate", "another CA"])
def test_clients_without_a_ca_signed_certificate_are_refused(tls_server, pki, who) -> None:
    client = None if who == "no certificate" else pki["other_client"]
    with channel(tls_server.grpc_target, pki["ca"], client) as ch:
        stub = pb_grpc.LLMLocalServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.GenerateStream(request(max_new_tokens=2), timeout=20))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("params, field", [
    ({"temperature": 9.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"stop_sequences": [""]}, "stop_sequences"),
    ({"engine_specific_params": struct_pb2.Struct(fields={
        "nope": struct_pb2.Value(number_value=1)})}, "engine_specific_params"),
])
def test_bad_parameters_are_invalid_argument_and_the_server_keeps_serving(
        tls_server, pki, params, field) -> None:
    with channel(tls_server.grpc_target, pki["ca"], pki["client"]) as ch:
        stub = pb_grpc.LLMLocalServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.GenerateStream(request(**params), timeout=20))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in e.value.details()
        ok = list(stub.GenerateStream(request(max_new_tokens=2), timeout=60))
        assert ok[-1].WhichOneof("type") == "finish_details"


def test_prompt_longer_than_context_is_invalid_argument(tls_server, pki) -> None:
    with channel(tls_server.grpc_target, pki["ca"], pki["client"]) as ch:
        stub = pb_grpc.LLMLocalServiceStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.GenerateStream(request(user="word " * 3000), timeout=20))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "maximum context length is 1024" in e.value.details()


def test_cancel_frees_the_sequence(tls_server, pki) -> None:
    serving = tls_server.serving
    with channel(tls_server.grpc_target, pki["ca"], pki["client"]) as ch:
        stub = pb_grpc.LLMLocalServiceStub(ch)
        call = stub.GenerateStream(request(max_new_tokens=500, engine_specific_params=_ignore_eos()))
        next(call)
        call.cancel()
        assert call.code() == grpc.StatusCode.CANCELLED
    wait_until(lambda: serving.engine.running == 0)


def test_certificate_files_are_reloaded_without_restart(tls_server, pki, tmp_path) -> None:
    d: Path = pki["dir"]
    old_ca = pki["ca"]
    with channel(tls_server.grpc_target, old_ca, pki["client"]) as old_ch:
        stub = pb_grpc.LLMLocalServiceStub(old_ch)
        stream = stub.GenerateStream(request(max_new_tokens=80, engine_specific_params=_ignore_eos()))
        first = next(stream)
        assert first.WhichOneof("type") == "token"
        # Rotate: a new CA, server and client certificate, written in place like a Secret update.
        new_ca = certs.new_ca("rotated-ca", DAY)
        new_server = certs.issue(new_ca, "localhost", DAY, sans=["localhost", "127.0.0.1"])
        write_material(d, new_ca, new_server)
        new_client = certs.issue(new_ca, "client2", DAY, client=True)
        with channel(tls_server.grpc_target, new_ca, new_client) as new_ch:
            replies = list(pb_grpc.LLMLocalServiceStub(new_ch).GenerateStream(
                request(max_new_tokens=3), timeout=60))
            assert replies[-1].WhichOneof("type") == "finish_details"
        rest = list(stream)
        assert rest[-1].WhichOneof("type") == "finish_details"
        assert rest[-1].finish_details.completion_tokens == 80
    # An old-CA client no longer gets in on a new connection.
    with channel(tls_server.grpc_target, old_ca, pki["client"]) as ch:
        with pytest.raises(grpc.RpcError):
            list(pb_grpc.LLMLocalServiceStub(ch).GenerateStream(request(max_new_tokens=2),
                                                                 timeout=20))
    pki["ca"], pki["client"] = new_ca, new_client
    write_material(d, new_ca, new_server)


def test_grpc_and_http_share_one_batch_and_metrics_move(server) -> None:
    """Plaintext gRPC (loopback) + HTTP at once: both sequences decode in the same steps."""
    serving = server.serving
    m = serving.metrics
    seen_two = threading.Event()
    grpc_before = m.requests.labels("grpc", "ok", "length")._value.get()
    tokens_before = m.completion_tokens._value.get()

    def watch() -> None:
        while not seen_two.is_set() and not done.is_set():
            if serving.engine.running >= 2:
                seen_two.set()
            done.wait(0.001)

    done = threading.Event()
    watcher = threading.Thread(target=watch)
    watcher.start()

    async def both() -> None:
        async with grpc.aio.insecure_channel(server.grpc_target) as ch:
            stub = pb_grpc.LLMLocalServiceStub(ch)

            async def via_grpc() -> int:
                n = 0
                async for r in stub.GenerateStream(
                        request(max_new_tokens=48, engine_specific_params=_ignore_eos())):
                    n += r.WhichOneof("type") == "token"
                return n

            async def via_http() -> int:
                async with httpx.AsyncClient(timeout=120) as h:
                    r = await h.post(server.url + "/v1/chat/completions", json={
                        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 48,
                        "ignore_eos": True})
                    return r.json()["usage"]["completion_tokens"]

            await asyncio.gather(via_grpc(), via_http())

    asyncio.run(both())
    done.set()
    watcher.join()
    assert seen_two.is_set(), "gRPC and HTTP sequences never ran in the same batch"
    assert m.requests.labels("grpc", "ok", "length")._value.get() == grpc_before + 1
    assert m.completion_tokens._value.get() >= tokens_before + 96
    scrape = httpx.get(f"http://127.0.0.1:{server.settings.metrics_port}/metrics").text
    for series in ("llamafleet_requests_total", "llamafleet_time_to_first_token_seconds_bucket",
                   "llamafleet_inter_token_latency_seconds_bucket",
                   "llamafleet_request_duration_seconds_bucket",
                   "llamafleet_queue_wait_seconds_bucket", "llamafleet_batch_occupancy_bucket",
                   "llamafleet_prompt_tokens_total", "llamafleet_completion_tokens_total",
                   "llamafleet_running_sequences", "llamafleet_queue_depth",
                   "llamafleet_kv_cache_cells_used", "llamafleet_kv_cache_cells_total",
                   "llamafleet_max_batch_size", "llamafleet_model_info"):
        assert series in scrape, series
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in scrape.splitlines()
              if line.startswith("llamafleet_") and " " in line}
    assert values["llamafleet_kv_cache_cells_total"] == 4 * server.settings.context_size
    # Idle: cells count running sequences only (a free slot's cached prefix is not load),
    # read when scraped.
    wait_until(lambda: serving.engine.running == 0)
    assert m.registry.get_sample_value("llamafleet_kv_cache_cells_used") == 0
    occupancy = {k: v for k, v in values.items() if k.startswith("llamafleet_batch_occupancy_bucket")}
    assert occupancy['llamafleet_batch_occupancy_bucket{le="1.0"}'] < \
        occupancy['llamafleet_batch_occupancy_bucket{le="+Inf"}']


def test_health_and_reflection(server) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.grpc_target) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="sentiric.llm.v1.LLMLocalService"), timeout=10)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        resp = next(refl.ServerReflectionInfo(iter([
            reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        names = {s.name for s in resp.list_services_response.service}
        assert "sentiric.llm.v1.LLMLocalService" in names


def _ignore_eos() -> struct_pb2.Struct:
    return struct_pb2.Struct(fields={"ignore_eos": struct_pb2.Value(bool_value=True)})


def test_http_can_use_the_same_certificate_files(pki, model_path) -> None:
    d = pki["dir"]
    srv = start_server(model_path=model_path, grpc_port=0, metrics_port=0, http_tls=True,
                       grpc_ca_path=d / "ca.crt", grpc_cert_path=d / "tls.crt",
                       grpc_key_path=d / "tls.key")
    try:
        assert srv.url.startswith("https://")
        ca = d / "ca.crt"
        r = httpx.get(srv.url.replace("127.0.0.1", "localhost") + "/ready", verify=str(ca))
        assert r.status_code == 200
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/ready", verify=True)  # not a publicly trusted certificate
    finally:
        srv.stop()
