"""The gRPC front door without a model: a real grpc.aio server on loopback over the real
Serving, Engine and generation core, on a scripted backend."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import struct_pb2
from llamafleet.inference.grpc_server import start_grpc
from llamafleet.inference.proto import local_pb2 as pb
from llamafleet.inference.proto import local_pb2_grpc as pb_grpc

from tests.support.scripted import ScriptedPod


@pytest.fixture
async def rpc():
    pod = ScriptedPod(["Hello", ",", " world"], rag_template="{context}\n\n{question}")
    server = await start_grpc(pod.settings, pod.serving, port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.bound_port}")
    try:
        yield pod, pb_grpc.LLMLocalServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)
        pod.close()


HISTORY = [pb.ConversationTurn(role="user", content="hello"),
           pb.ConversationTurn(role="Model", content="hi")]  # Model: the contract's assistant


def request(user: str = "Tell me a story.", **params) -> pb.LLMLocalServiceGenerateStreamRequest:
    return pb.LLMLocalServiceGenerateStreamRequest(system_prompt="You are terse.", user_prompt=user,
                                                   history=HISTORY, params=params)


def engine(**fields) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(fields)
    return s


async def test_tokens_then_finish_details_over_the_chat_template(rpc) -> None:
    pod, stub = rpc
    req = request(max_new_tokens=12, temperature=0.0)
    req.rag_context = "Mars is red."
    replies = [r async for r in stub.GenerateStream(req)]
    assert [r.token for r in replies[:-1]] == ["Hello", ",", " world"]
    fin = replies[-1].finish_details
    assert (fin.finish_reason, fin.completion_tokens) == ("stop", 3)
    # The same prompt as the chat path renders: system, history (Model -> assistant), and
    # the user prompt with its RAG context.
    _, text = pod.serving.chat_prompt_and_text(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "hello"},
         {"role": "assistant", "content": "hi"}, {"role": "user", "content": "Tell me a story."}],
        "Mars is red.")
    assert pod.model.prompts[-1] == text and "Mars is red.\n\nTell me a story." in text
    assert fin.prompt_tokens == len(pod.model.tokenize(text, False))
    params = pod.backend.params[-1]
    assert (params.max_tokens, params.temperature, params.grammar) == (12, 0.0, None)


async def test_stop_sequences_length_and_engine_params(rpc) -> None:
    pod, stub = rpc
    replies = [r async for r in stub.GenerateStream(request(stop_sequences=[","]))]
    assert [r.token for r in replies[:-1]] == ["Hello"]
    assert replies[-1].finish_details.finish_reason == "stop"
    replies = [r async for r in stub.GenerateStream(request(max_new_tokens=2))]
    assert replies[-1].finish_details.finish_reason == "length"
    await stub.GenerateStream(request(engine_specific_params=engine(
        json=True, ignore_eos=True, min_p=0.2))).read()
    params = pod.backend.params[-1]
    assert params.grammar and params.ignore_eos and params.min_p == pytest.approx(0.2)


async def test_thoughts_stream_as_written(rpc) -> None:
    """The contract has no place for reasoning: <think> text streams as the model wrote it."""
    pod, stub = rpc
    pod.script = ["<think>", "hm", "</think>", "Yes."]
    replies = [r async for r in stub.GenerateStream(request())]
    assert "".join(r.token for r in replies[:-1]) == "<think>hm</think>Yes."


@pytest.mark.parametrize("req, field", [
    (request(temperature=9.0), "params.temperature"),
    (request(top_p=0.0), "params.top_p"),
    (request(top_k=-1), "params.top_k"),
    (request(max_new_tokens=0), "params.max_new_tokens"),
    (request(repetition_penalty=-1.0), "params.repetition_penalty"),
    (request(stop_sequences=[""]), "params.stop_sequences"),
    (request(engine_specific_params=engine(nope=1)), "engine_specific_params"),
    (request(engine_specific_params=engine(json=1)), "engine_specific_params.json"),
    (request(engine_specific_params=engine(min_p=True)), "engine_specific_params.min_p"),
    (request(engine_specific_params=engine(min_p=7)), "params.engine_specific_params.min_p"),
    (request(user="  "), "user_prompt"),
    (pb.LLMLocalServiceGenerateStreamRequest(
        user_prompt="hi", history=[pb.ConversationTurn(role="robot", content="x")]),
     "history[0].role"),
])
async def test_bad_requests_are_invalid_argument_naming_the_field(rpc, req, field) -> None:
    pod, stub = rpc
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.GenerateStream(req).read()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in e.value.details()
    replies = [r async for r in stub.GenerateStream(request())]  # and the server serves on
    assert replies[-1].WhichOneof("type") == "finish_details"
