"""Token endpoints (llama-server's ``/tokenize`` and ``/detokenize``, and the render endpoints
that the Gateway API Inference Extension's precise prefix routing calls): the core's prompt,
without generating."""

from __future__ import annotations

import asyncio
from typing import Any

from llamafleet.common import protocol as P
from llamafleet.common.errors import BadRequest
from pydantic import Field, model_validator

from ..generation_core import Core
from . import openai_chat


class TokenizeRequest(P._Wire):
    content: str
    add_special: bool = False

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data: Any) -> Any:
        return P._refuse_surrogates(data)


class DetokenizeRequest(P._Wire):
    tokens: list[int] = Field(max_length=1_000_000)


async def tokenize(core: Core, body: TokenizeRequest) -> dict:
    model = core.serving.model
    tokens = await asyncio.to_thread(model.tokenize, body.content, body.add_special and model.add_bos)
    return {"tokens": tokens}


async def detokenize(core: Core, body: DetokenizeRequest) -> dict:
    model = core.serving.model
    bad = [t for t in body.tokens if not 0 <= t < model.n_vocab]
    if bad:
        raise BadRequest(f"token id {bad[0]} is outside the vocabulary (0..{model.n_vocab - 1})",
                         param="tokens")
    data = b"".join(model.token_bytes(t) for t in body.tokens)
    return {"content": data.decode("utf-8", "replace")}


async def render_chat(core: Core, body: P.ChatCompletionRequest) -> dict:
    """The prompt's token ids exactly as /v1/chat/completions would run them."""
    prepared = await core.prepare(openai_chat.conversation(body))
    return {"token_ids": prepared.prompt}


async def render_completion(core: Core, body: P.CompletionRequest) -> dict:
    raw = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) \
        else body.prompt
    prepared = await core.prepare_text(raw, openai_chat.sampling_of(body, body.max_tokens))
    return {"token_ids": prepared.prompt}
