"""OpenAI wire types (request validation and response shapes), named as OpenAI names them."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from .sampling import MaxTokens, MinP, Penalty, RepeatPenalty, Seed, Temperature, TopK, TopP

# Where a model's <think> text goes (llama-server's names): none leaves it in the text;
# deepseek (and auto) move it to the API's reasoning field; deepseek-legacy does so in whole
# answers and leaves it inline, in its tags, when streamed.
ReasoningFormat = Literal["auto", "none", "deepseek", "deepseek-legacy"]


class _Wire(BaseModel):
    """A request part: a field we do not know is refused with a 400 that names it, never
    silently dropped (OpenAI's own wording: "Unrecognized request argument supplied")."""

    model_config = ConfigDict(extra="forbid")


# OpenAI fields we know but do not implement: a 400 naming the field and saying why. A test
# (tests/common/test_protocol_fields.py) holds every field of the official client's request
# types to "a field of our model, or listed here", so a new OpenAI field cannot go unhandled.
UNSUPPORTED_CHAT = {
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "logit_bias": "logit_bias is not supported",
    "functions": "the deprecated 'functions' API is not supported; use 'tools'",
    "function_call": "the deprecated 'function_call' is not supported; use 'tool_choice'",
    "metadata": "stored completions are not supported",
    "store": "stored completions are not supported",
    "service_tier": "service tiers are not supported",
    "reasoning_effort": "reasoning effort is not supported",
    "web_search_options": "web search is not supported",
    "verbosity": "verbosity is not supported",
    "prompt_cache_key": "prompt caching is automatic (shared prefixes are reused); no key",
    "prompt_cache_retention": "prompt caching is automatic; no retention setting",
    "prompt_cache_options": "prompt caching is automatic; no options",
    "moderation": "moderation is not supported",
    "safety_identifier": "safety identifiers are not supported",
}
UNSUPPORTED_COMPLETIONS = {
    "best_of": "best_of is not supported",
    "echo": "echo is not supported",
    "suffix": "suffix is not supported",
    "logit_bias": "logit_bias is not supported",
}


def _refuse(data: Any, unsupported: dict[str, str]) -> Any:
    if not isinstance(data, dict):
        return data
    for name, why in unsupported.items():
        # A field left at its "off" value asks for nothing: accepted (and dropped).
        if data.get(name) not in (None, False, [], {}, ""):
            raise PydanticCustomError("unsupported", "unsupported parameter '{param}': "
                                      "{why}", {"param": name, "why": why})
    return {k: v for k, v in data.items() if k not in unsupported}


_LEAVES = (int, float, bool, type(None))


def _lone_surrogate(v: Any, path: tuple[str, ...]) -> tuple[tuple[str, ...], int] | None:
    """Where a string in parsed JSON holds a lone UTF-16 surrogate, and at which character.
    JSON may escape one (``"\\ud800"``) and Python's parser keeps it, but it is not Unicode
    text: encoding it as UTF-8 for the tokenizer, a log or an answer raised a 500."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            return path, e.start
        return None
    if isinstance(v, dict):
        for key, item in v.items():
            found = _lone_surrogate(key, path) or _lone_surrogate(item, (*path, str(key)))
            if found:
                return found
    elif isinstance(v, list):
        for i, item in enumerate(v):
            if not isinstance(item, _LEAVES):
                found = _lone_surrogate(item, (*path, str(i)))
                if found:
                    return found
    return None


def _refuse_surrogates(data: Any) -> Any:
    """A request with a lone surrogate anywhere: a 400 naming the field (the whole request
    is checked once, at its top model, before any field is used)."""
    found = _lone_surrogate(data, ())
    if found:
        path, at = found
        raise PydanticCustomError(
            "lone_surrogate", "Invalid value for '{param}': it holds a lone UTF-16 surrogate "
            "at character {at}, which is not valid Unicode text (escape a character beyond "
            "U+FFFF as a surrogate pair, or send it as UTF-8)", {"param": ".".join(path), "at": at})
    return data


class TextPart(_Wire):
    type: Literal["text"]
    text: str


class FunctionCall(_Wire):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Wire):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


# Fields of an assistant message that clients send back as they received it (an agent
# appends the response's message to the next request): accepted while empty.
UNSUPPORTED_MESSAGE = {
    "audio": "audio is not supported",
    "function_call": "the deprecated 'function_call' is not supported; use 'tool_calls'",
    "annotations": "annotations are not supported",
}


class ChatMessage(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns
    tool_call_id: str | None = None  # role "tool"
    refusal: str | None = None  # an earlier assistant turn, sent back as received

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        return _refuse(data, UNSUPPORTED_MESSAGE)

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Wire):
    include_usage: bool = False
    include_obfuscation: bool = False  # padding against side channels: not needed, never sent


class FunctionDef(_Wire):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # calls are always grammar-enforced for required/named


class Tool(_Wire):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Wire):
    name: str


class NamedToolChoice(_Wire):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(_Wire):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Wire):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        # Without a schema there is nothing to enforce: an answer would be unconstrained
        # while the client believes it is held to a schema.
        if self.type == "json_schema" and (self.json_schema is None
                                           or self.json_schema.schema_ is None):
            raise ValueError("type 'json_schema' needs json_schema.schema (a JSON schema; "
                             "use type 'json_object' for any JSON)")
        return self


# Counted and measured by serving.check_stop (limits.py), the same for gRPC.
Stop = str | list[str] | None


class _SamplingFields(_Wire):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = Field(None, description="extension")
    min_p: MinP | None = Field(None, description="extension")
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repeat_penalty: RepeatPenalty | None = Field(None, description="extension")
    seed: Seed | None = None
    stop: Stop = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = Field(False, description="extension: generate exactly max_tokens")

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data: Any) -> Any:
        return _refuse_surrogates(data)

    @property
    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


# logprobs: how many alternatives per token OpenAI allows
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = None
    response_format: ResponseFormat | None = None
    rag_context: str | None = Field(None, description="extension: placed via the RAG template")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    reasoning_format: ReasoningFormat | None = Field(
        None, description="extension (llama-server's): where <think> text goes; default the pod's")

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        return _refuse(data, UNSUPPORTED_CHAT)

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools and \
                self.tool_choice.function.name not in {t.function.name for t in self.tools}:
            raise ValueError(f"tool_choice names '{self.tool_choice.function.name}', "
                             "which is not in tools")
        if self.response_format and self.response_format.type != "text" and \
                self.tool_choice_mode not in ("none", "auto"):
            raise ValueError("response_format cannot be combined with a required or named "
                             "tool_choice")
        if not any(m.role in ("user", "assistant", "tool") for m in self.messages):
            raise ValueError("messages must contain at least one user message")
        return self

    @property
    def tool_choice_mode(self) -> str:
        """none | auto | required | named; OpenAI's default is auto when tools are given."""
        if not self.tools:
            return "none"
        if self.tool_choice is None:
            return "auto"
        return "named" if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int]
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data: Any) -> Any:
        return _refuse(data, UNSUPPORTED_COMPLETIONS)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
        if isinstance(v, list) and not v or v == "":
            raise ValueError("prompt must not be empty")
        return v


MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit on inputs per request


class EmbeddingRequest(_Wire):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1, description="only the model's own size")
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_is_unicode(cls, data: Any) -> Any:
        return _refuse_surrogates(data)

    @field_validator("input")
    @classmethod
    def _inputs(cls, v: Any) -> Any:
        if v == "" or v == []:
            raise ValueError("input must not be empty")
        if isinstance(v, list) and len(v) > MAX_EMBEDDING_INPUTS and not isinstance(v[0], int):
            raise ValueError(f"at most {MAX_EMBEDDING_INPUTS} inputs per request")
        return v

    @property
    def inputs(self) -> list[str | list[int]]:
        """One entry per vector: a text or a token array."""
        if isinstance(self.input, str) or (self.input and isinstance(self.input[0], int)):
            return [self.input]  # type: ignore[list-item]
        return list(self.input)  # type: ignore[arg-type]


# --- responses ----------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion,
                   total_tokens=prompt + completion)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None = None


class _Reasoning(BaseModel):
    """``reasoning_content`` (llama-server's and DeepSeek's field) only when there is some."""

    reasoning_content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_empty_reasoning(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict) and data.get("reasoning_content") is None:
            data.pop("reasoning_content", None)
        return data


class AssistantMessage(_Reasoning):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class FunctionCallDelta(BaseModel):
    name: str | None = None
    arguments: str = ""


class ToolCallDelta(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallDelta


class Delta(_Reasoning):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llamafleet"
    # A LoRA adapter's card names the base model it runs on (as vLLM and the GIE do); the
    # base model's has none, and the field is left out of its card.
    parent: str | None = None
    # An adapter's file on the pod (vLLM's card gives an adapter's path as root too) and
    # scale: the operator compares them with spec.adapters to apply a changed list.
    root: str | None = None
    scale: float | None = None


class LoadAdapterRequest(BaseModel):
    """``POST /v1/adapters``: a LoRA adapter GGUF on the pod, loaded under a new name."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="The model id requests name it by.")
    path: str = Field(description="Absolute path of the adapter GGUF on the pod.")
    scale: float = Field(1.0, description="How much of the adapter applies (1: as trained).")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
