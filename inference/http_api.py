"""FastAPI routers: thin, over the generation core (:mod:`generation_core`) and the front
doors' wire shapes (:mod:`front_doors`)."""

from __future__ import annotations

import base64
import hmac
import logging
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from llamafleet.common import protocol as P
from llamafleet.common import tenants as T
from llamafleet.common import tracing
from llamafleet.common.contract import VERSION, env_name
from llamafleet.common.errors import (
    BadRequest,
    LlamafleetError,
    NotFound,
    NotReady,
    RateLimited,
    RequestTooLarge,
    Unauthorized,
    http_error,
)
from llamafleet.common.logs import request_id_from_headers
from llamafleet.common.tenants import Caller
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from .front_doors import anthropic_messages, openai_chat, openai_responses, tokens
from .front_doors.http_stream import sse_response, unless_client_leaves
from .generation_core import Answer, Conversation, Core, Turn
from .serving import Serving

log = logging.getLogger(__name__)

STUDIO_DIR = Path(__file__).parent / "studio"


def error_response(err: LlamafleetError) -> JSONResponse:
    """The pod's HTTP answer to a domain error (common.errors.http_error)."""
    return JSONResponse(*http_error(err))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    if err.get("type") == "json_invalid":
        return ("We could not parse the JSON body of your request. Expected a JSON object; "
                f"{err.get('ctx', {}).get('error', 'invalid JSON')}."), None
    if err.get("type") == "missing" and loc:
        return f"Missing required parameter: '{'.'.join(loc)}'.", loc[0]
    if err.get("type") == "extra_forbidden":
        return f"Unrecognized request argument supplied: {'.'.join(loc)}.", ".".join(loc)
    if err.get("type") == "unsupported":  # common/protocol.py's lists, wherever it stands
        return f"{err['msg']}.", ".".join([*loc, err["ctx"]["param"]])
    if err.get("type") == "lone_surrogate":  # common/protocol.py: the path is in the message
        return f"{err['msg']}.", err["ctx"]["param"] or None
    where = ".".join(loc)
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return (f"Invalid value for '{where}': {msg}." if where else f"{msg}."), (loc[0] if loc else None)


def serving_of(request: Request) -> Serving:
    serving = getattr(request.app.state, "serving", None)
    if serving is None:
        raise NotReady("The model is still loading.")
    return serving


def _identify(request: Request, token: str | None, how: str) -> Caller:
    """The caller of ``request`` by its key (``token``); Unauthorized when a key is needed and
    this one is neither API_KEY nor a tenant's. Keys are compared as bytes in constant time:
    compare_digest refuses str with non-ASCII characters (that was a 500); Starlette decodes
    headers as latin-1, so this gives back the bytes the client sent."""
    settings = request.app.state.settings
    key, tf = settings.api_key, request.app.state.tenants
    if key is None and tf is None:
        return Caller()
    if token is not None:
        given = token.encode("latin-1")
        if key is not None and hmac.compare_digest(given, key.get_secret_value().encode()):
            # The pods' own key (the router's backend key): the router names the tenant and
            # priority it admitted the request under, and has counted its limits.
            return Caller(request.headers.get(T.TENANT_HEADER, ""),
                          _priority_header(request.headers.get(T.PRIORITY_HEADER)), admin=True)
        if tf is not None and (entry := tf.current().lookup(given)) is not None:
            return Caller(entry.tenant, T.priority_of(entry, request.headers.get(T.OBJECTIVE_HEADER)))
    raise Unauthorized(f"Incorrect API key provided. Pass it as {how}.")


def _priority_header(value: str | None) -> int:
    if not value:
        return 0
    try:
        p = int(value)
    except ValueError:
        raise BadRequest(f"{T.PRIORITY_HEADER} must be an integer") from None
    lo, hi = T.PRIORITY_RANGE
    return max(lo, min(hi, p))


# The dependencies below are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency
# in its thread pool, two thread hand-offs per generating request (and, under load, dozens of
# pool threads contending for the GIL with the engine thread) for a few dictionary lookups.
async def check_api_key(request: Request) -> None:
    request.state.caller = _identify(request, T.bearer_token(request.headers.get("authorization", "")),
                                     "'Authorization: Bearer <key>'")


async def check_admin_key(request: Request) -> None:
    """/info and /metrics: API_KEY only (a tenant's key does not open them)."""
    key = request.app.state.settings.api_key
    if key is None:
        return
    given = (T.bearer_token(request.headers.get("authorization", "")) or "").encode("latin-1")
    if not hmac.compare_digest(given, key.get_secret_value().encode()):
        raise Unauthorized("Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.")


def caller_of(request: Request) -> Caller:
    return getattr(request.state, "caller", None) or Caller()


async def admit(request: Request) -> None:
    """A generating request's admission by its tenant's limits: 429 rate_limit_exceeded (and
    when to retry) beyond one. The router admitted those it sends (the pods' own key)."""
    caller = caller_of(request)
    tf = request.app.state.tenants
    serving = getattr(request.app.state, "serving", None)
    label = T.tenant_label(caller.tenant, tf.current() if tf is not None else None)
    if tf is not None and caller.tenant and not caller.admin:
        limits = tf.current().limits.get(caller.tenant, T.Limits())
        try:
            caller.lease = request.app.state.limiter.admit(caller.tenant, limits)
        except RateLimited as e:
            if serving is not None:
                serving.metrics.tenant_rejected.labels(label, e.reason).inc()
            raise
    if serving is not None:
        serving.metrics.tenant_requests.labels(label).inc()


class ReleaseLeases:
    """Ends each request's lease on its tenant's limits (concurrent requests) once its answer
    has gone, streams included, however it ends."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        try:
            await self.app(scope, receive, send)
        finally:
            caller = state.get("caller")
            if caller is not None and caller.lease is not None:
                caller.lease.release()


api = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])


@api.get("/models", response_model_exclude_none=True)
async def list_models(request: Request) -> P.ModelList:
    s = serving_of(request)
    return P.ModelList(data=[P.ModelCard(**card) for card in s.models()])


@api.get("/models/{model_id:path}", response_model_exclude_none=True)
async def get_model(model_id: str, request: Request) -> P.ModelCard:
    s = serving_of(request)
    served = s.check_model(model_id)
    return next(P.ModelCard(**card) for card in s.models() if card["id"] == served)


async def adapters_enabled(request: Request) -> None:
    """Loading files onto the pod at run time needs a key: without API_KEY the routes are off.
    A tenant's key does not load them."""
    if request.app.state.settings.api_key is None:
        raise NotFound("Loading adapters at run time needs an API key "
                       f"({env_name('api_key')}); start-up adapters: {env_name('lora_adapters')}.")
    if not caller_of(request).admin:
        raise Unauthorized(f"Loading adapters needs the pod's own key ({env_name('api_key')}).")


@api.post("/adapters", dependencies=[Depends(adapters_enabled)], status_code=201,
          response_model_exclude_none=True)
async def load_adapter(body: P.LoadAdapterRequest, request: Request) -> P.ModelCard:
    s = serving_of(request)
    a = await s.load_adapter(body.name, body.path, body.scale)
    log.info("LoRA adapter %s loaded from %s (scale %g)", a.name, a.path, a.scale)
    return P.ModelCard(**s.adapter_card(a))


@api.delete("/adapters/{name:path}", dependencies=[Depends(adapters_enabled)])
async def unload_adapter(name: str, request: Request) -> dict:
    a = await serving_of(request).unload_adapter(name)
    log.info("LoRA adapter %s unloaded", a.name)
    return {"id": a.name, "object": "model", "deleted": True}


def core_of(request: Request) -> Core:
    """The generation core over the pod's serving layer (built once, kept on app.state)."""
    s = serving_of(request)
    core = getattr(request.app.state, "core", None)
    if core is None or core.serving is not s:
        core = request.app.state.core = Core(s)
    return core


async def _answer_or_leave(request: Request, turn: Turn) -> Answer | None:
    """The whole answer; None (and the turn cancelled) if the client leaves first."""
    answer = await unless_client_leaves(request, turn.answer())  # re-raises a failed turn's error
    if answer is None:
        turn.cancel()
    return answer


async def _reply(request: Request, turn: Turn, view, stream: bool, *, errors=error_response,
                 error_frame=openai_chat.error_frame, last: bytes = openai_chat.DONE) -> Response:
    """A front door's answer: ``view.frames(turn)`` as SSE, or ``view.whole(answer)``."""
    if stream:
        trailer = None
        if caller_of(request).admin and request.headers.get(T.USAGE_TRAILER_HEADER) == "1":
            def trailer() -> bytes:  # the router charges the tenant's tokens from it
                fin = turn.gen.finished
                p, c = (fin.prompt_tokens, fin.completion_tokens) if fin else \
                    (len(turn.prepared.prompt), 0)
                return T.USAGE_COMMENT + f"{p} {c}\n\n".encode()
        return await sse_response(view.frames(turn), turn.cancel, request, error_response=errors,
                                  error_frame=error_frame, last=last, trailer=trailer)
    if (answer := await _answer_or_leave(request, turn)) is None:
        return Response(status_code=499)
    done = answer.done
    return JSONResponse(view.whole(answer), headers={
        T.USAGE_HEADER: f"{done.prompt_tokens} {done.completion_tokens}"})


async def _start(request: Request, conv: Conversation, model: str | None, api: str,
                 user: str | None, stream: bool) -> tuple[Core, Turn, str]:
    """The turn, and the id it is served as (the base model's or an adapter's)."""
    core = core_of(request)
    served = core.serving.check_model(model)
    prepared = await core.prepare(conv)
    return core, core.start(prepared, api=api, request_id=request_id_from_headers(request.headers),
                            user=user, stream=stream, model=served,
                            caller=caller_of(request), trace=tracing.extract(request.headers)), served


@api.post("/chat/completions", dependencies=[Depends(admit)])
async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
    core, turn, served = await _start(request, openai_chat.conversation(body), body.model,
                                      "http_chat", body.user, bool(body.stream))
    view = openai_chat.ChatView(body, served, core.serving.fingerprint)
    return await _reply(request, turn, view, bool(body.stream))


@api.post("/responses", dependencies=[Depends(admit)])
async def responses(body: openai_responses.ResponsesRequest, request: Request) -> Response:
    core, turn, served = await _start(request, openai_responses.conversation(body), body.model,
                                      "http_responses", body.user, body.stream)
    view = openai_responses.ResponseView(body, served)
    return await _reply(request, turn, view, body.stream, error_frame=openai_responses.error_event,
                        last=b"")


@api.post("/embeddings", dependencies=[Depends(admit)])
async def embeddings(body: P.EmbeddingRequest, request: Request) -> Response:
    s = serving_of(request)
    s.check_base_model(body.model, "Embeddings")
    dims = s.embedder.dimensions if s.embedder is not None else None
    if body.dimensions is not None and body.dimensions != dims:
        raise BadRequest(f"dimensions: this model's embeddings have {dims} dimensions and "
                         "cannot be shortened", param="dimensions")
    if (done := await unless_client_leaves(request, s.embed(body.inputs))) is None:
        return Response(status_code=499)  # the work was cancelled with the request
    vectors, n_tokens = done
    caller = caller_of(request)
    if caller.lease is not None:
        caller.lease.charge(n_tokens)
    s.count_tenant_tokens(caller.tenant, n_tokens, 0)
    log.info("embeddings", extra={"request_id": request_id_from_headers(request.headers),
                                  "api": "http_embeddings", "user": body.user,
                                  "inputs": len(vectors), "prompt_tokens": n_tokens})
    data = [P.Embedding(index=i, embedding=base64.b64encode(v.astype("<f4").tobytes()).decode()
                        if body.encoding_format == "base64" else v.tolist())
            for i, v in enumerate(vectors)]
    return JSONResponse(P.EmbeddingList(
        data=data, model=s.model_id,
        usage=P.EmbeddingUsage(prompt_tokens=n_tokens, total_tokens=n_tokens)).model_dump(),
        headers={T.USAGE_HEADER: f"{n_tokens} 0"})


@api.post("/completions", dependencies=[Depends(admit)])
async def completions(body: P.CompletionRequest, request: Request) -> Response:
    core = core_of(request)
    served = core.serving.check_model(body.model)
    raw = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) \
        else body.prompt
    prepared = await core.prepare_text(
        raw, openai_chat.sampling_of(body, body.max_tokens if body.max_tokens is not None else 16),
        stop=body.stop_list, ignore_eos=body.ignore_eos, logprobs=body.logprobs)
    turn = core.start(prepared, api="http_completions",
                      request_id=request_id_from_headers(request.headers), user=body.user,
                      stream=bool(body.stream), model=served, caller=caller_of(request),
                      trace=tracing.extract(request.headers))
    view = openai_chat.CompletionView(body, served, core.serving.fingerprint)
    return await _reply(request, turn, view, bool(body.stream))


async def check_anthropic_key(request: Request) -> None:
    """Anthropic's clients send the key as ``x-api-key``; ``Authorization: Bearer`` works too."""
    key = request.headers.get("x-api-key")
    if key is None:
        return await check_api_key(request)
    request.state.caller = _identify(request, key.strip(), "'x-api-key: <key>'")


@api.post("/chat/completions/render")
async def render_chat(body: P.ChatCompletionRequest, request: Request) -> dict:
    core_of(request).serving.check_model(body.model)
    return await tokens.render_chat(core_of(request), body)


@api.post("/completions/render")
async def render_completion(body: P.CompletionRequest, request: Request) -> dict:
    core_of(request).serving.check_model(body.model)
    return await tokens.render_completion(core_of(request), body)


token_api = APIRouter(dependencies=[Depends(check_api_key)])


@token_api.post("/tokenize")
async def tokenize(body: tokens.TokenizeRequest, request: Request) -> dict:
    return await tokens.tokenize(core_of(request), body)


@token_api.post("/detokenize")
async def detokenize(body: tokens.DetokenizeRequest, request: Request) -> dict:
    return await tokens.detokenize(core_of(request), body)


anthropic_api = APIRouter(prefix="/v1", dependencies=[Depends(check_anthropic_key)])


@anthropic_api.post("/messages", dependencies=[Depends(admit)])
async def messages(body: anthropic_messages.MessagesRequest, request: Request) -> Response:
    user = body.metadata.user_id if body.metadata else None
    core, turn, served = await _start(request, anthropic_messages.conversation(body), body.model,
                                      "http_messages", user, body.stream)
    view = anthropic_messages.MessageView(body, served, len(turn.prepared.prompt))
    return await _reply(request, turn, view, body.stream, errors=anthropic_messages.error_response,
                        error_frame=anthropic_messages.error_event, last=b"")


health = APIRouter()


@health.get("/health")
async def liveness(request: Request) -> dict:
    serving = getattr(request.app.state, "serving", None)
    if serving is not None and not serving.engine.alive:
        return JSONResponse({"status": "engine stopped"}, status_code=500)  # type: ignore[return-value]
    if serving is not None:
        # A hung llama_decode (a GPU fault) leaves the thread alive but makes no progress.
        stalled = serving.engine.stalled_for()
        if stalled > request.app.state.settings.engine_stall_timeout_s:
            return JSONResponse({"status": "engine stalled", "stalled_s": round(stalled, 1)},  # type: ignore[return-value]
                                status_code=500)
    return {"status": "ok"}


@health.get("/ready")
async def readiness(request: Request) -> Response:
    serving = getattr(request.app.state, "serving", None)
    if serving is None or not serving.engine.alive:
        return error_response(NotReady("The model is not loaded yet."))
    if serving.draining:
        return error_response(NotReady("The server is shutting down."))
    return JSONResponse({"status": "ready", "model": serving.model_id})


@health.get("/info", dependencies=[Depends(check_admin_key)])
async def info(request: Request) -> dict:
    return serving_of(request).info(private=request.app.state.settings.api_key is not None)


@health.get("/metrics", dependencies=[Depends(check_admin_key)])
async def metrics(request: Request) -> Response:
    # Without a key anyone may read it: then the prefix cache's savings are left out (/info's rule).
    m = serving_of(request).metrics
    keyed = request.app.state.settings.api_key is not None
    return Response(generate_latest(m.registry if keyed else m.public),
                    media_type=CONTENT_TYPE_LATEST)


class BodyLimit:
    """Refuses a request body over ``limit`` bytes with 413 before the app parses anything:
    at once when Content-Length says so, else as soon as the count of arriving bytes passes
    it (chunked uploads). The body is read here and handed on in one piece, so the app never
    holds more than ``limit``. Our own few lines: neither Starlette nor uvicorn caps bodies
    (uvicorn's limits cover headers only) and FastAPI turns errors raised while it reads the
    body into a 400."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(scope, receive, send)
        chunks: list[bytes] = []
        size = 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client left: let the app see that
                first = msg
                break
            size += len(msg.get("body", b""))
            if size > self.limit:
                return await self._refuse(scope, receive, send)
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        pending = [first]

        async def replay() -> dict:
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        err = RequestTooLarge(f"The request body is larger than {self.limit} bytes "
                              f"({env_name('max_request_bytes')}).")
        response = error_response(err)
        response.headers["Connection"] = "close"  # do not read (and discard) the rest
        await response(scope, receive, send)


def create_app(settings, serving: Serving | None = None) -> FastAPI:
    app = FastAPI(title="llamafleet", version=VERSION, docs_url="/docs", redoc_url=None)
    app.add_middleware(BodyLimit, limit=settings.request_bytes_limit)
    app.add_middleware(ReleaseLeases)
    app.state.settings = settings
    app.state.serving = serving
    # The tenants file (checked when the settings were read) and every tenant's budgets.
    app.state.tenants = T.load(settings.tenants_file) if settings.tenants_file else None
    app.state.limiter = T.Limiter()
    if serving is not None:
        serving.tenants, serving.limiter = app.state.tenants, app.state.limiter

    def shaped(request: Request, exc: LlamafleetError) -> JSONResponse:
        """Each front door's own error shape: Anthropic's on /v1/messages, else OpenAI's."""
        if request.url.path.rstrip("/") == "/v1/messages":
            return anthropic_messages.error_response(exc)
        return error_response(exc)

    @app.exception_handler(LlamafleetError)
    async def _domain(request: Request, exc: LlamafleetError) -> JSONResponse:
        return shaped(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return shaped(request, BadRequest(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {"error": {"message": str(exc.detail), "type": "invalid_request_error",
                          "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    app.include_router(api)
    app.include_router(anthropic_api)
    app.include_router(token_api)
    app.include_router(health)
    if STUDIO_DIR.is_dir() and (STUDIO_DIR / "index.html").exists():
        app.mount("/studio", StaticFiles(directory=STUDIO_DIR, html=True), name="studio")

        @app.get("/", include_in_schema=False)
        async def _root() -> RedirectResponse:
            return RedirectResponse("/studio/")

    return app
