"""No OpenAI request field is silently ignored: each is honoured (a field of our request
model) or refused with a 400 that names it (listed with its reason)."""

from __future__ import annotations

import typing

import pytest
from llamafleet.common import protocol as P
from openai.types import completion_create_params, embedding_create_params
from openai.types.chat import completion_create_params as chat_params
from pydantic import ValidationError

CASES = [
    (chat_params.CompletionCreateParamsBase, P.ChatCompletionRequest, P.UNSUPPORTED_CHAT),
    (completion_create_params.CompletionCreateParamsBase, P.CompletionRequest,
     P.UNSUPPORTED_COMPLETIONS),
    (embedding_create_params.EmbeddingCreateParams, P.EmbeddingRequest, {}),
]


@pytest.mark.parametrize("client_type, ours, unsupported", CASES)
def test_every_client_field_is_honoured_or_refused(client_type, ours, unsupported) -> None:
    fields = set(typing.get_type_hints(client_type)) - {"stream"}
    unhandled = fields - set(ours.model_fields) - set(unsupported)
    assert not unhandled, f"OpenAI fields neither honoured nor refused: {sorted(unhandled)}"
    assert not set(unsupported) & set(ours.model_fields)


@pytest.mark.parametrize("name", sorted(P.UNSUPPORTED_CHAT))
def test_unsupported_chat_field_is_refused_by_name(name) -> None:
    with pytest.raises(ValidationError) as e:
        P.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **{name: "on"})
    err = e.value.errors()[0]
    assert err["type"] == "unsupported" and err["ctx"]["param"] == name


def test_unknown_fields_are_refused_where_they_are() -> None:
    with pytest.raises(ValidationError) as e:
        P.ChatCompletionRequest(messages=[{"role": "user", "content": "x", "colour": 1}])
    assert e.value.errors()[0]["type"] == "extra_forbidden"
    assert e.value.errors()[0]["loc"] == ("messages", 0, "colour")
    # An unsupported field left off asks for nothing.
    P.ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], store=False,
                            logit_bias={})


def test_every_message_field_is_honoured_or_refused() -> None:
    from openai.types.chat import (
        ChatCompletionAssistantMessageParam,
        ChatCompletionToolMessageParam,
        ChatCompletionUserMessageParam,
    )

    for t in (ChatCompletionAssistantMessageParam, ChatCompletionToolMessageParam,
              ChatCompletionUserMessageParam):
        unhandled = set(typing.get_type_hints(t)) - set(P.ChatMessage.model_fields) \
            - set(P.UNSUPPORTED_MESSAGE)
        assert not unhandled, (t.__name__, sorted(unhandled))
    # Sent back empty (as a response carried them): accepted; with a value: refused by name.
    P.ChatMessage(role="assistant", content="x", audio=None, function_call=None, annotations=[])
    with pytest.raises(ValidationError) as e:
        P.ChatMessage(role="assistant", content="x", function_call={"name": "f"})
    assert e.value.errors()[0]["ctx"]["param"] == "function_call"
