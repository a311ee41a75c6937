"""Domain errors, and the ONE table that maps them to HTTP (OpenAI shape) and gRPC.

Plain data only: each transport turns an entry into its own answer (``http_error`` into a
response in the pod's and the router's HTTP servers, ``grpc_status`` into a
``grpc.StatusCode`` in llamafleet.inference.grpc_server)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class ModelError(Exception):
    """The model cannot be used (start-up, not a client's error); the message says why and
    what to do."""


class LlamafleetError(Exception):
    """Base of every error a client may see. ``param`` names the offending field."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class BadRequest(LlamafleetError):
    pass


class ContextTooLong(BadRequest):
    def __init__(self, prompt_tokens: int, limit: int, param: str | None = "messages"):
        super().__init__(
            f"This model's maximum context length is {limit} tokens. However, your prompt "
            f"resulted in {prompt_tokens} tokens. Please shorten the prompt.",
            param=param,
            code="context_length_exceeded",
        )
        self.prompt_tokens = prompt_tokens
        self.limit = limit


class ToolCallIncomplete(BadRequest):
    """A required or named tool_choice whose call the request's own limits cut short
    (max_tokens, a stop string): no call, and never the partial text as content."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message, param=param, code="tool_call_incomplete")


class Unauthorized(LlamafleetError):
    pass


class RequestTooLarge(LlamafleetError):
    pass


class RequestTimeout(LlamafleetError):
    """The request's head or body did not arrive by its deadline (a slow or stalled client)."""


class HeadersTooLarge(LlamafleetError):
    """More header fields than the server accepts."""


class ModelNotFound(LlamafleetError):
    pass


class NotFound(LlamafleetError):
    """A route that this server has turned off."""


class Conflict(LlamafleetError):
    """The request conflicts with the server's state: a name already taken, or something
    still in use (a LoRA adapter that running requests need)."""


class MethodNotAllowed(LlamafleetError):
    """A route that exists, asked with another method."""


class Overloaded(LlamafleetError):
    retry_after_s = 1


class NotReady(LlamafleetError):
    retry_after_s = 5


class QueueFull(LlamafleetError):
    """The router's hold queue is full (no replica ready, and too many already waiting)."""

    retry_after_s = 5


class RateLimited(LlamafleetError):
    """A tenant's limit is exceeded (common.tenants), or a held request of the lowest
    priority was shed: 429 rate_limit_exceeded, with an honest Retry-After."""

    def __init__(self, message: str, *, reason: str, retry_after_s: int):
        super().__init__(message, code="rate_limit_exceeded")
        self.reason = reason
        self.retry_after_s = retry_after_s


class ReplicaFailed(LlamafleetError):
    """The router sent the request to replicas and each failed before answering (a connect
    error, a dropped connection, or a replica that stopped answering)."""

    retry_after_s = 1


class InternalError(LlamafleetError):
    pass


@dataclass(frozen=True)
class ErrorMapping:
    http_status: int
    openai_type: str
    default_code: str | None
    grpc_status: str  # the name of a grpc.StatusCode member


ERROR_TABLE: dict[type[LlamafleetError], ErrorMapping] = {
    BadRequest: ErrorMapping(400, "invalid_request_error", None, "INVALID_ARGUMENT"),
    Unauthorized: ErrorMapping(401, "invalid_request_error", "invalid_api_key", "UNAUTHENTICATED"),
    RequestTooLarge: ErrorMapping(413, "invalid_request_error", "request_too_large", "RESOURCE_EXHAUSTED"),
    RequestTimeout: ErrorMapping(408, "invalid_request_error", "request_timeout", "DEADLINE_EXCEEDED"),
    HeadersTooLarge: ErrorMapping(431, "invalid_request_error", "headers_too_large", "INVALID_ARGUMENT"),
    ModelNotFound: ErrorMapping(404, "invalid_request_error", "model_not_found", "NOT_FOUND"),
    NotFound: ErrorMapping(404, "invalid_request_error", "not_found", "NOT_FOUND"),
    Conflict: ErrorMapping(409, "invalid_request_error", "conflict", "FAILED_PRECONDITION"),
    MethodNotAllowed: ErrorMapping(405, "invalid_request_error", "method_not_allowed", "UNIMPLEMENTED"),
    Overloaded: ErrorMapping(503, "server_error", "overloaded", "RESOURCE_EXHAUSTED"),
    NotReady: ErrorMapping(503, "server_error", "not_ready", "UNAVAILABLE"),
    QueueFull: ErrorMapping(429, "rate_limit_error", "queue_full", "RESOURCE_EXHAUSTED"),
    RateLimited: ErrorMapping(429, "rate_limit_error", "rate_limit_exceeded", "RESOURCE_EXHAUSTED"),
    ReplicaFailed: ErrorMapping(502, "server_error", "replica_failed", "UNAVAILABLE"),
    InternalError: ErrorMapping(500, "server_error", "internal_error", "INTERNAL"),
}


def mapping_for(err: LlamafleetError) -> ErrorMapping:
    for cls in type(err).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]  # type: ignore[index]
    return ERROR_TABLE[InternalError]


def encodable(text: str) -> str:
    """``text`` as UTF-8 can carry it: a lone surrogate a client sent (echoed in a message)
    is written as its escape, so building the error answer cannot fail."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def openai_body(err: LlamafleetError) -> dict:
    m = mapping_for(err)
    return {
        "error": {
            "message": encodable(err.message),
            "type": m.openai_type,
            "param": err.param,
            "code": err.code or m.default_code,
        }
    }


def retry_after(err: LlamafleetError) -> int | None:
    return getattr(err, "retry_after_s", None)


# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors).
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                         403: "permission_error", 404: "not_found_error",
                         413: "request_too_large", 429: "rate_limit_error",
                         503: "overloaded_error"}


def anthropic_body(err: LlamafleetError) -> dict:
    """Anthropic's error shape (/v1/messages)."""
    status = mapping_for(err).http_status
    return {"type": "error", "error": {"type": ANTHROPIC_ERROR_TYPES.get(status, "api_error"),
                                       "message": encodable(err.message)}}


class HttpError(NamedTuple):
    """The HTTP answer to a domain error, in the order of Starlette's ``JSONResponse``
    arguments: ``JSONResponse(*http_error(err))``."""

    content: dict  # the OpenAI error body
    status_code: int
    headers: dict[str, str]  # Retry-After, when the error says when to retry


def http_error(err: LlamafleetError, *, anthropic: bool = False) -> HttpError:
    """The HTTP answer to a domain error (pod and router): OpenAI body (Anthropic's with
    ``anthropic``), status, Retry-After."""
    headers = {}
    if (ra := retry_after(err)) is not None:
        headers["Retry-After"] = str(ra)
    body = anthropic_body(err) if anthropic else openai_body(err)
    return HttpError(body, mapping_for(err).http_status, headers)
