"""The committed gRPC stubs are exactly what the pinned generator makes from the .proto,
and the wire contract's field numbers are as docs/architecture.md fixes them."""

from __future__ import annotations

from llamafleet.inference.proto import generate
from llamafleet.inference.proto import local_pb2 as pb


def test_stubs_are_fresh() -> None:
    assert generate.main(["--check"]) == 0


def test_field_numbers_are_the_contract() -> None:
    def numbers(msg) -> dict[str, int]:
        return {f.name: f.number for f in msg.DESCRIPTOR.fields}

    assert numbers(pb.LLMLocalServiceGenerateStreamRequest) == {
        "system_prompt": 1, "user_prompt": 2, "rag_context": 3, "history": 4, "params": 5}
    assert numbers(pb.LLMLocalServiceGenerateStreamResponse) == {"token": 1, "finish_details": 2}
    assert numbers(pb.ConversationTurn) == {"role": 1, "content": 2}
    assert numbers(pb.GenerationParams) == {
        "max_new_tokens": 1, "temperature": 2, "top_k": 3, "top_p": 4, "repetition_penalty": 5,
        "stop_sequences": 6, "seed": 7, "engine_specific_params": 20}
    assert numbers(pb.FinishDetails) == {"finish_reason": 1, "prompt_tokens": 2,
                                         "completion_tokens": 3}
    assert pb.DESCRIPTOR.package == "sentiric.llm.v1"
    assert pb.DESCRIPTOR.services_by_name["LLMLocalService"].methods_by_name[
        "GenerateStream"].server_streaming
