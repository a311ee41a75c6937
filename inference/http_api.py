"""FastAPI routers: thin, over :mod:`serving`. OpenAI wire shapes and error bodies."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from pathlib import Path
from typing import TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from llamafleet.common import protocol as P
from llamafleet.common.contract import VERSION, env_name
from llamafleet.common.errors import (
    BadRequest,
    InternalError,
    LlamafleetError,
    NotReady,
    RequestTooLarge,
    ToolCallIncomplete,
    Unauthorized,
    http_error,
    openai_body,
)
from llamafleet.common.logs import request_id_from_headers
from llamafleet.common.sampling import SamplingParameters
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import tools
from .engine import Finished, TextDelta, TokenLogprob
from .serving import Generation, Serving

log = logging.getLogger(__name__)
T = TypeVar("T")

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


def check_api_key(request: Request) -> None:
    key = request.app.state.settings.api_key
    if key is None:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    # As bytes: compare_digest refuses str with non-ASCII characters (that was a 500).
    # Starlette decodes headers as latin-1, so this gives back the bytes the client sent.
    given = token.strip().encode("latin-1")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, key.get_secret_value().encode()):
        raise Unauthorized("Incorrect API key provided. Pass it as 'Authorization: Bearer <key>'.")


api = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])


@api.get("/models")
async def list_models(request: Request) -> P.ModelList:
    s = serving_of(request)
    return P.ModelList(data=[P.ModelCard(id=s.model_id, created=s.created)])


@api.get("/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> P.ModelCard:
    s = serving_of(request)
    s.check_model(model_id)
    return P.ModelCard(id=s.model_id, created=s.created)


def _params(s: Serving, body: P._SamplingFields, max_tokens: int | None, **extra) -> object:
    requested = SamplingParameters(**{**body.model_dump(include=set(SamplingParameters.model_fields)),
                                      "max_tokens": max_tokens})
    return s.sampling(requested, stop=body.stop_list, ignore_eos=body.ignore_eos, **extra)


@api.post("/chat/completions")
async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Response:
    s = serving_of(request)
    s.check_model(body.model)
    fmt = body.response_format
    grammar = None
    mode = body.tool_choice_mode
    if fmt and fmt.type == "json_schema" and fmt.json_schema:
        grammar = await s.schema_grammar(fmt.json_schema.schema_ or {})
    forced = mode in ("required", "named")
    named = body.tool_choice.function.name if mode == "named" else None  # type: ignore[union-attr]
    # A named function is exactly one call; required is one or more unless
    # parallel_tool_calls is false.
    parallel = body.parallel_tool_calls and named is None
    if forced:
        grammar = await s.schema_grammar(
            tools.call_schema(body.tools or [], named, parallel), param="tools")
    params = _params(
        s, body, body.max_completion_tokens or body.max_tokens,
        json_object=bool(fmt and fmt.type == "json_object"), grammar=grammar,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None)
    native = tools.template_knows_tools(s.formatter.source)
    offered = body.tools if mode != "none" else None
    messages = tools.template_messages(body.messages, native, offered)
    rendered_tools = [t.model_dump(exclude_none=True) for t in offered] if offered and native \
        else None
    # Rendering and tokenising long text take milliseconds: off the event loop.
    prompt = await asyncio.to_thread(s.chat_prompt, messages, body.rag_context, rendered_tools)
    gen = s.start(prompt, params, api="http_chat", request_id=request_id_from_headers(request.headers),
                  user=body.user, stream=bool(body.stream))
    rid, created = P.new_id("chatcmpl"), P.now()
    family = tools.family_of(s.formatter.source)

    offered_names = {t.function.name for t in body.tools or [] if named in (None, t.function.name)}

    def forced_calls(text: str, fin: Finished) -> list[tools.Call]:
        """The calls of a required or named tool_choice; an error when the answer is not
        them (never content: the client asked for a call)."""
        try:
            return tools.forced_calls(text, offered_names, parallel)
        except tools.MalformedCalls as e:
            raise _forced_call_error(str(e), fin, body.stop_list) from None

    def answer(text: str, fin: Finished) -> tuple[str | None, list[tools.Call], str]:
        """content, calls, finish_reason of a whole answer."""
        calls: list[tools.Call] | None = []
        content: str | None = text
        if forced:
            calls, content = forced_calls(text, fin), None
        elif mode == "auto":
            content, calls = tools.parse_calls(family, text)
            calls = calls if body.parallel_tool_calls else calls[:1]
        return content, calls, "tool_calls" if calls else _finish_reason(fin)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: P.Delta, finish: str | None = None,
                  logprobs: P.ChoiceLogprobs | None = None) -> P.ChatCompletionChunk:
            return P.ChatCompletionChunk(
                id=rid, created=created, model=s.model_id, system_fingerprint=s.fingerprint,
                choices=[P.ChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)])

        content_frame = FastFrame(chunk(P.Delta(content="\x00")), include_usage)
        call_stream = tools.CallStream()

        async def frames() -> AsyncIterator[P.BaseModel | bytes]:
            # The role frame goes out with the first event, not before: until then no byte
            # has left, so a router may still retry the request on another replica.
            role = chunk(P.Delta(role="assistant", content=""))
            held: list[str] = []  # auto with tools: the answer is parsed when complete;
            # required/named: checked when complete (its pieces have gone out already)
            async for ev in gen.events():
                if role is not None:
                    yield role
                    role = None
                if isinstance(ev, TextDelta):
                    lp = _chat_logprobs(ev.logprobs) if body.logprobs else None
                    if forced:
                        held.append(ev.text)
                        deltas = call_stream.feed(ev.text)
                        if deltas or lp:
                            yield chunk(P.Delta(tool_calls=deltas or None), logprobs=lp)
                    elif mode == "auto":
                        held.append(ev.text)
                        if lp:
                            yield chunk(P.Delta(), logprobs=lp)
                    elif lp:
                        yield chunk(P.Delta(content=ev.text), logprobs=lp)
                    else:
                        yield content_frame.render(ev.text)
                elif isinstance(ev, Finished):
                    finish = _finish_reason(ev)
                    if forced:
                        forced_calls("".join(held), ev)  # an error event if not well formed
                        finish = "tool_calls"
                    elif mode == "auto":
                        content, calls, finish = answer("".join(held), ev)
                        if content:
                            yield chunk(P.Delta(content=content))
                        for i, c in enumerate(calls):
                            yield chunk(P.Delta(tool_calls=[P.ToolCallDelta(
                                index=i, id=tools.new_call_id(), type="function",
                                function=P.FunctionCallDelta(name=c.name))]))
                            yield chunk(P.Delta(tool_calls=[P.ToolCallDelta(
                                index=i, function=P.FunctionCallDelta(arguments=c.arguments))]))
                    yield chunk(P.Delta(), finish)
                    if include_usage:
                        yield P.ChatCompletionChunk(
                            id=rid, created=created, model=s.model_id,
                            system_fingerprint=s.fingerprint, choices=[],
                            usage=P.Usage.of(ev.prompt_tokens, ev.completion_tokens))

        return await _sse(frames(), gen, include_usage, request)
    if (done := await _collect(gen, request)) is None:
        return Response(status_code=499)
    text, fin, lps = done
    content, calls, finish = answer(text, fin)
    message = P.AssistantMessage(content=content,
                                 tool_calls=[c.wire() for c in calls] or None)
    return JSONResponse(P.ChatCompletion(
        id=rid, created=created, model=s.model_id, system_fingerprint=s.fingerprint,
        choices=[P.ChatChoice(message=message, finish_reason=finish,
                              logprobs=_chat_logprobs(lps) if body.logprobs else None)],
        usage=P.Usage.of(fin.prompt_tokens, fin.completion_tokens)).model_dump(exclude_none=False))


@api.post("/embeddings")
async def embeddings(body: P.EmbeddingRequest, request: Request) -> Response:
    s = serving_of(request)
    s.check_model(body.model)
    dims = s.embedder.dimensions if s.embedder is not None else None
    if body.dimensions is not None and body.dimensions != dims:
        raise BadRequest(f"dimensions: this model's embeddings have {dims} dimensions and "
                         "cannot be shortened", param="dimensions")
    if (done := await _unless_client_leaves(request, s.embed(body.inputs))) is None:
        return Response(status_code=499)  # the work was cancelled with the request
    vectors, n_tokens = done
    log.info("embeddings", extra={"request_id": request_id_from_headers(request.headers),
                                  "api": "http_embeddings", "user": body.user,
                                  "inputs": len(vectors), "prompt_tokens": n_tokens})
    data = [P.Embedding(index=i, embedding=base64.b64encode(v.astype("<f4").tobytes()).decode()
                        if body.encoding_format == "base64" else v.tolist())
            for i, v in enumerate(vectors)]
    return JSONResponse(P.EmbeddingList(
        data=data, model=s.model_id,
        usage=P.EmbeddingUsage(prompt_tokens=n_tokens, total_tokens=n_tokens)).model_dump())


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


def _chat_logprobs(lps: Sequence[TokenLogprob]) -> P.ChoiceLogprobs:
    return P.ChoiceLogprobs(content=[
        P.TokenLogprob(token=_text(lp.token), logprob=lp.logprob, bytes=list(lp.token),
                       top_logprobs=[P.TopLogprob(token=_text(t), logprob=v, bytes=list(t))
                                     for t, v in lp.top])
        for lp in lps])


def _completion_logprobs(lps: Sequence[TokenLogprob], offset: int = 0) -> P.CompletionLogprobs:
    offsets = []
    for lp in lps:
        offsets.append(offset)
        offset += len(_text(lp.token))
    return P.CompletionLogprobs(
        tokens=[_text(lp.token) for lp in lps], token_logprobs=[lp.logprob for lp in lps],
        top_logprobs=[{_text(t): v for t, v in lp.top} for lp in lps], text_offset=offsets)


@api.post("/completions")
async def completions(body: P.CompletionRequest, request: Request) -> Response:
    s = serving_of(request)
    s.check_model(body.model)
    raw = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) \
        else body.prompt
    prompt = await asyncio.to_thread(s.text_prompt, raw)
    params = _params(s, body, body.max_tokens if body.max_tokens is not None else 16,
                     logprobs=body.logprobs)
    gen = s.start(prompt, params, api="http_completions",
                  request_id=request_id_from_headers(request.headers), prompt_param="prompt",
                  user=body.user, stream=bool(body.stream))
    rid, created = P.new_id("cmpl"), P.now()

    def make(text: str, finish: str | None, usage: P.Usage | None = None,
             logprobs: P.CompletionLogprobs | None = None) -> P.Completion:
        return P.Completion(id=rid, created=created, model=s.model_id,
                            system_fingerprint=s.fingerprint,
                            choices=[P.CompletionChoice(text=text, finish_reason=finish,
                                                        logprobs=logprobs)],
                            usage=usage)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        text_frame = FastFrame(make("\x00", None), include_usage)

        async def frames() -> AsyncIterator[P.BaseModel | bytes]:
            offset = 0
            async for ev in gen.events():
                if isinstance(ev, TextDelta) and body.logprobs is not None:
                    yield make(ev.text, None, logprobs=_completion_logprobs(ev.logprobs, offset))
                    offset += len(ev.text)
                elif isinstance(ev, TextDelta):
                    yield text_frame.render(ev.text)
                elif isinstance(ev, Finished):
                    yield make("", _finish_reason(ev))
                    if include_usage:
                        c = make("", None, P.Usage.of(ev.prompt_tokens, ev.completion_tokens))
                        c.choices = []
                        yield c

        return await _sse(frames(), gen, include_usage, request)
    if (done := await _collect(gen, request)) is None:
        return Response(status_code=499)
    text, fin, lps = done
    return JSONResponse(make(text, _finish_reason(fin),
                             P.Usage.of(fin.prompt_tokens, fin.completion_tokens),
                             _completion_logprobs(lps) if body.logprobs is not None else None
                             ).model_dump())


def _forced_call_error(why: str, fin: Finished, stop: Sequence[str]) -> LlamafleetError:
    """A required or named tool_choice whose answer is not a well-formed call. The grammar
    lets the model end only after a complete call, so the answer was cut: by max_tokens or
    a stop string (the request's to change: 400), else by us (500)."""
    if fin.reason == "length":
        return ToolCallIncomplete(
            f"max_tokens ran out before the forced tool call was complete ({why}); "
            "raise max_tokens or bound the schema's strings and arrays", param="max_tokens")
    if stop:
        return ToolCallIncomplete(f"a stop string ended the forced tool call ({why}); "
                                  "leave out stop with a required or named tool_choice",
                                  param="stop")
    return InternalError(f"the model's forced tool call is not well formed ({why})",
                         code="tool_call_invalid")


def _finish_reason(fin: Finished) -> str:
    return "length" if fin.reason == "length" else "stop"


class FastFrame:
    """A pre-serialised SSE frame with one string slot: per token we splice in the JSON of
    the text instead of building and dumping a pydantic model (the event loop shares two
    cores with the decode threads, so every microsecond here slows decoding)."""

    def __init__(self, template: P.BaseModel, include_usage: bool):
        text = _frame_bytes(template, include_usage).decode()
        self._head, self._tail = text.split('"\\u0000"', 1)

    def render(self, value: str) -> bytes:
        return (self._head + json.dumps(value) + self._tail).encode()


def _frame_bytes(frame: P.BaseModel, include_usage: bool) -> bytes:
    data = frame.model_dump(exclude_none=False)
    if not include_usage:
        data.pop("usage", None)
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


async def _sse(frames: AsyncIterator[P.BaseModel | bytes], gen: Generation, include_usage: bool,
               request: Request) -> Response:
    """SSE frames `data: {...}` then `data: [DONE]`.

    The status line waits for the first frame, which comes with the generation's first
    output or its end: a request that fails before it (queued when the server shuts down, a
    failed prefill) gets a plain OpenAI error with its own status, a 503 that a router may
    retry elsewhere, instead of 200 and an error event. Normal requests lose nothing: until
    that frame there was nothing to send. An error after it is sent as an OpenAI error event
    (the status line has gone)."""
    frames = aiter(frames)
    try:
        first = await _unless_client_leaves(request, anext(frames))
    except LlamafleetError as e:
        gen.cancel()
        return error_response(e)
    except StopAsyncIteration:
        first = None
    if first is None:  # the client left (or nothing came): the generation is cancelled
        gen.cancel()
        await frames.aclose()
        return Response(status_code=499)

    async def body() -> AsyncIterator[bytes]:
        try:
            yield first if isinstance(first, bytes) else _frame_bytes(first, include_usage)
            async for frame in frames:
                yield frame if isinstance(frame, bytes) else _frame_bytes(frame, include_usage)
        except LlamafleetError as e:
            yield b"data: " + json.dumps(openai_body(e)).encode() + b"\n\n"
        finally:
            gen.cancel()  # client gone or done: free the sequence at the next step
        yield b"data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _unless_client_leaves(request: Request, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None (with ``work`` cancelled) when the client disconnects
    first. For handlers that wait before answering: Starlette does not cancel them when
    the client goes, so abandoned work would otherwise run on."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message the
    server has for us is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(gen: Generation, request: Request
                   ) -> tuple[str, Finished, list[TokenLogprob]] | None:
    """Gather a whole answer; cancel the sequence if the client disconnects first."""

    async def run() -> tuple[str, Finished, list[TokenLogprob]]:
        parts: list[str] = []
        lps: list[TokenLogprob] = []
        fin: Finished | None = None
        async for ev in gen.events():
            if isinstance(ev, TextDelta):
                parts.append(ev.text)
                lps.extend(ev.logprobs)
            elif isinstance(ev, Finished):
                fin = ev
        return "".join(parts), fin, lps  # type: ignore[return-value]

    done = await _unless_client_leaves(request, run())  # re-raises a failed generation's error
    if done is None:  # the client left first
        gen.cancel()
    return done


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


@health.get("/info", dependencies=[Depends(check_api_key)])
async def info(request: Request) -> dict:
    return serving_of(request).info(private=request.app.state.settings.api_key is not None)


@health.get("/metrics", dependencies=[Depends(check_api_key)])
async def metrics(request: Request) -> Response:
    return Response(generate_latest(serving_of(request).metrics.registry),
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
    app.state.settings = settings
    app.state.serving = serving

    @app.exception_handler(LlamafleetError)
    async def _domain(_: Request, exc: LlamafleetError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(BadRequest(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {"error": {"message": str(exc.detail), "type": "invalid_request_error",
                          "param": None, "code": None}}
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    app.include_router(api)
    app.include_router(health)
    if STUDIO_DIR.is_dir() and (STUDIO_DIR / "index.html").exists():
        app.mount("/studio", StaticFiles(directory=STUDIO_DIR, html=True), name="studio")

        @app.get("/", include_in_schema=False)
        async def _root() -> RedirectResponse:
            return RedirectResponse("/studio/")

    return app
