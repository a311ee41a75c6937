"""The serving layer: prompts, sampling defaults and generations, shared by HTTP and gRPC.

No HTTP or gRPC imports here. Objects are built once at start-up (:func:`build`) and
kept for the life of the process.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llamafleet.common import tracing
from llamafleet.common.capacity import Plan
from llamafleet.common.contract import EMBEDDED_MODELS, SYSTEM_FINGERPRINT, env_name
from llamafleet.common.errors import (
    BadRequest,
    ContextTooLong,
    LlamafleetError,
    ModelError,
    NotFound,
    NotReady,
    Overloaded,
)
from llamafleet.common.sampling import DEFAULTS, SamplingParameters
from llamafleet.common.tenants import Lease, Limiter, TenantFile, tenant_label
from llamafleet.common.versions import llama_cpp_python_version

from . import capacity
from .adapters import Adapter, Adapters
from .draft_model import DraftModel, check_vocabulary
from .engine import (
    Engine,
    Failed,
    Finished,
    GenerationRequest,
    SamplingParams,
    Started,
    TextDelta,
    deliver_each,
)
from .limits import MAX_STOP_CHARS, MAX_STOP_STRINGS, SCHEMA_CONVERT_TIMEOUT_S, check_json_schema
from .metrics import EngineMetrics, Metrics
from .model import ChatFormatter, apply_rag, resolve_model_path
from .profiling import StepProfile, wrap_bridge
from .profiling import install as install_profile
from .prompt_cache import PromptCache
from .settings import Settings

if TYPE_CHECKING:
    from opentelemetry.context import Context

log = logging.getLogger(__name__)


@dataclass
class Generation:
    """One submitted request. Iterate :meth:`events`; leaving early cancels it."""

    serving: Serving
    req: GenerationRequest
    api: str
    queue: asyncio.Queue
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished: Finished | None = None
    user: str | None = None  # OpenAI's end-user id, for the log
    lease: Lease | None = None  # its tenant's limits: tokens are charged to it
    trace: Context | None = None  # the caller's trace context (tracing.extract): None when tracing is off
    queue_wait_s: float | None = None  # from Started: None while not admitted

    async def events(self) -> AsyncIterator[TextDelta | Finished]:
        outcome, reason = "cancelled", "cancelled"
        try:
            while True:
                ev = await self.queue.get()
                if isinstance(ev, Started):
                    self.queue_wait_s = ev.queue_wait_s
                    self.serving.metrics.queue_wait.observe(ev.queue_wait_s)
                    self.serving.metrics.tenant_queue_wait.labels(
                        self.serving.tenant_label(self.req.tenant)).observe(ev.queue_wait_s)
                    continue
                if isinstance(ev, Failed):
                    outcome, reason = "error", type(ev.error).__name__
                    raise ev.error
                if isinstance(ev, TextDelta) and self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                if isinstance(ev, Finished):
                    self.finished = ev
                    outcome = "cancelled" if ev.reason == "cancelled" else "ok"
                    reason = ev.reason
                yield ev
                if isinstance(ev, Finished):
                    return
        finally:
            self.req.cancel()
            self.serving.record(self, outcome, reason)

    def cancel(self) -> None:
        self.req.cancel()


def trace_generation(gen: Generation, outcome: str, reason: str, end: float) -> None:
    """The pod's spans of one generation, made now that it has ended (on the event loop),
    from the times its request carries: the engine thread never calls OpenTelemetry.
    ``llamafleet.pod.generation`` (queued to ended, the caller's child, the first token
    as an event) holds ``queue_wait`` (queued to the engine taking it), ``prefill`` (to the
    prompt being in the KV cache) and ``decode`` (first token to the end)."""
    req, fin = gen.req, gen.finished
    clock = tracing.wall_offset()
    prompt = fin.prompt_tokens if fin else len(req.prompt)
    attrs = {"llamafleet.api": gen.api, "llamafleet.request_id": req.request_id,
             "llamafleet.outcome": outcome, "llamafleet.stream": req.stream,
             "gen_ai.response.finish_reasons": (reason,), "gen_ai.usage.input_tokens": prompt}
    if fin is not None:
        attrs["gen_ai.usage.output_tokens"] = fin.completion_tokens
    first = req.first_token_at
    if first:
        attrs["llamafleet.ttft_s"] = first - req.enqueued_at
    events = [("first_token", first, {})] if first else []
    root = tracing.record_span("llamafleet.pod.generation", gen.trace, req.enqueued_at, end,
                               tracing.SpanKind.SERVER, attrs, events, clock)
    if gen.queue_wait_s is None:  # never admitted: refused, cancelled or failed in the queue
        return
    parent = tracing.child(root)
    admitted = req.enqueued_at + gen.queue_wait_s
    tracing.record_span("llamafleet.pod.queue_wait", parent, req.enqueued_at, admitted,
                        offset=clock)
    tracing.record_span("llamafleet.pod.prefill", parent, admitted, req.prefilled_at or end,
                        attributes={"gen_ai.usage.input_tokens": prompt}, offset=clock)
    if first:
        tracing.record_span("llamafleet.pod.decode", parent, first, end, attributes={
            "gen_ai.usage.output_tokens": fin.completion_tokens if fin else 0}, offset=clock)


class LoopBridge:
    """Engine thread -> event loop. Events of one engine step are queued together and the
    loop is woken once, not once per token per request (cross-thread wake-ups cost CPU
    that the decode threads need)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def send(self, q: asyncio.Queue, event: object) -> None:
        self.send_many(((q, event),))

    def send_many(self, items: Iterable[tuple[asyncio.Queue, object]]) -> None:
        """Queue events for the loop and wake it once (the engine hands over a whole step)."""
        with self._lock:
            self._pending.extend(items)
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._pending = self._pending, collections.deque()
            self._scheduled = False
        for q, event in items:
            q.put_nowait(event)


@dataclass(frozen=True, eq=False)
class QueueSink:
    """An engine request's sink: events go to ``queue`` on the bridge's loop."""

    bridge: LoopBridge
    queue: asyncio.Queue

    def __call__(self, event: object) -> None:
        self.bridge.send(self.queue, event)


def deliver(events: list[tuple[GenerationRequest, Any]]) -> None:
    """The engine's hand-over of one step's events: one lock and one wake-up per event
    loop, not per event. Sinks that are not :class:`QueueSink` are called one by one."""
    by_bridge: dict[LoopBridge, list[tuple[asyncio.Queue, object]]] = {}
    others = []
    for req, event in events:
        sink = req.sink
        if type(sink) is QueueSink:
            by_bridge.setdefault(sink.bridge, []).append((sink.queue, event))
        else:
            others.append((req, event))
    for bridge, items in by_bridge.items():
        bridge.send_many(items)
    if others:
        deliver_each(others)


class Serving:
    def __init__(self, settings: Settings, model: Any, engine: Engine, metrics: Metrics,
                 plan: Plan, embedder: Any = None):
        self.settings = settings
        self.embedder = embedder  # embeddings.Embedder, or None when turned off
        self.model = model
        self.engine = engine
        self.metrics = metrics
        self.plan = plan
        # The tenants file (common.tenants.TenantFile), given by the HTTP app that reads it.
        self.tenants: TenantFile | None = None
        self.limiter = Limiter()  # every tenant's budgets (the HTTP app's, shared with gRPC)
        self.model_id = settings.model_name or model.path.name.removesuffix(".gguf")
        self.created = int(time.time())
        self.fingerprint = SYSTEM_FINGERPRINT
        self._bridges: dict[asyncio.AbstractEventLoop, LoopBridge] = {}
        # Schema -> grammar conversion runs here, never on the event loop; two workers so
        # one slow schema cannot hold up every other json_schema request.
        self._grammar_pool = ThreadPoolExecutor(2, thread_name_prefix="llamafleet-grammar")
        # Embeddings decode on one thread of their own, always the same: each thread that calls
        # llama_decode gets its own OpenMP team, and extra teams slowed every engine step
        # (Engine.start says how much).
        self._embed_thread = ThreadPoolExecutor(1, thread_name_prefix="llamafleet-embeddings")
        # One cancel flag per admitted embeddings request (event loop only): the queue bound
        # counts them, and shutdown sets them all.
        self._embed_jobs: set[threading.Event] = set()
        self.draining = False  # set on SIGTERM: new generations are refused
        self.profile: StepProfile | None = None  # set by build() when STEP_PROFILE is on
        self.formatter = ChatFormatter.for_model(
            settings.chat_template, model.meta, model.bos_text, model.eos_text)
        # LoRA adapters by name (adapters.py); the backend loads them on the engine thread.
        self.adapters = Adapters(self.model_id, engine, engine.backend)  # type: ignore[arg-type]
        metrics.follow_adapters(engine, self.adapters)  # the GIE LoRA gauge
        metrics.ready.set_function(lambda: float(self.engine.alive and not self.draining))

    # --- models and adapters ------------------------------------------------------------

    def check_model(self, requested: str | None) -> str:
        """The id a request's ``model`` is served as: the base model's (also for an empty or
        missing ``model``) or an adapter's name; ModelNotFound (404) for any other name."""
        adapters = self.adapters.resolve(requested)
        return adapters[0].name if adapters else self.model_id

    def check_base_model(self, requested: str | None, what: str) -> None:
        """For the parts that run on the base model only (embeddings): an adapter's name is a
        400 that says so."""
        if self.adapters.resolve(requested):
            raise BadRequest(f"{what} run on the base model '{self.model_id}', not on an "
                             "adapter", param="model")

    def models(self) -> list[dict[str, Any]]:
        """The model cards' fields of the base model and each adapter, for /v1/models: an
        adapter's card adds its parent (the base model), root (its file) and scale."""
        return [{"id": self.model_id, "created": self.created},
                *(self.adapter_card(a) for a in self.adapters.all())]

    def adapter_card(self, a: Adapter) -> dict[str, Any]:
        return {"id": a.name, "created": a.created, "parent": self.model_id, "root": str(a.path),
                "scale": a.scale}

    async def load_adapter(self, name: str, path: str, scale: float) -> Adapter:
        return await asyncio.to_thread(self.adapters.load, name, Path(path), scale)

    async def unload_adapter(self, name: str) -> Adapter:
        return await asyncio.to_thread(self.adapters.unload, name)

    def chat_prompt(self, messages: list[dict[str, Any]], rag_context: str | None = None,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        """``messages`` as chat templates read them (tool_calls.template_messages); ``tools``
        are rendered by the template (only when it knows tools)."""
        return self.chat_prompt_and_text(messages, rag_context, tools)[0]

    def chat_prompt_and_text(self, messages: list[dict[str, Any]], rag_context: str | None = None,
                             tools: list[dict[str, Any]] | None = None) -> tuple[list[int], str]:
        """:meth:`chat_prompt`, and the rendered text."""
        messages = [dict(m) for m in messages]
        if self.settings.system_prompt and not any(
                m["role"] in ("system", "developer") for m in messages):
            messages.insert(0, {"role": "system", "content": self.settings.system_prompt})
        if rag_context:
            last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"),
                            default=None)
            if last_user is None:
                raise BadRequest("rag_context needs a user message", param="rag_context")
            messages[last_user]["content"] = apply_rag(
                self.settings.rag_template, rag_context, messages[last_user]["content"])
        text = self.formatter.render(messages, tools)
        if self.settings.log_prompts:
            log.debug("prompt: %r", text)
        add_bos = self.model.add_bos and not text.startswith(self.model.bos_text)
        return self.model.tokenize(text, add_bos), text

    def text_prompt(self, prompt: str | Sequence[int], param: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            return self.model.tokenize(prompt, self.model.add_bos)
        bad = [t for t in prompt if not 0 <= t < self.model.n_vocab]
        if bad:
            raise BadRequest(f"token id {bad[0]} is outside the vocabulary (0..{self.model.n_vocab - 1})",
                             param=param)
        return list(prompt)

    def sampling(self, requested: SamplingParameters, *, stop: Sequence[str] = (),
                 stop_param: str = "stop", grammar: str | None = None, json_object: bool = False,
                 ignore_eos: bool = False, logprobs: int | None = None) -> SamplingParams:
        """The engine's parameters: the request's values, else the pod's DEFAULT_* settings,
        else the built-in defaults (llamafleet.common.sampling). ``grammar`` comes from
        :meth:`schema_grammar`."""
        check_stop(stop, stop_param)
        if grammar is None and json_object:
            grammar = JSON_GRAMMAR
        values = requested.over(self.settings.sampling_defaults, DEFAULTS)
        return SamplingParams(**values.model_dump(), stop=tuple(stop), grammar=grammar,
                              ignore_eos=ignore_eos, logprobs=logprobs)

    async def schema_grammar(self, schema: dict, param: str = "response_format") -> str:
        """A JSON schema (response_format's, or tool calls') as GBNF: checked against the
        limits first, then converted in a worker thread within SCHEMA_CONVERT_TIMEOUT_S.
        Errors name ``param``."""
        check_json_schema(schema, param)
        loop = asyncio.get_running_loop()
        work = loop.run_in_executor(self._grammar_pool, _schema_grammar, schema, self.model,
                                    param)
        try:
            return await asyncio.wait_for(work, SCHEMA_CONVERT_TIMEOUT_S)
        except TimeoutError:
            raise BadRequest(
                f"{param}: converting the schema to a grammar took more "
                f"than {SCHEMA_CONVERT_TIMEOUT_S:g} s; simplify the schema",
                param=param) from None

    async def embed(self, inputs: Sequence[str | Sequence[int]]) -> tuple[list[Any], int]:
        """One vector per input (text or token ids), and the number of tokens embedded.

        At most ``embeddings_queue_size`` requests are admitted (waiting or embedding); past
        that, 503 'overloaded' at once. Cancelling the awaiting task (the client left) stops
        the work before its next llama_decode, and so does :meth:`cancel_embeddings`."""
        if self.embedder is None:
            raise NotFound("Embeddings are turned off on this server "
                           f"({env_name('embeddings')}=false).")
        if self.draining:
            raise NotReady("The server is shutting down; retry on another replica.")
        # Tokenising 2048 long inputs takes a while: off the event loop (and off the
        # embeddings thread, so that a bad input gets its 400 without waiting in line).
        tokens = await asyncio.to_thread(self._embedding_tokens, inputs)
        limit = self.settings.embeddings_queue_size
        if len(self._embed_jobs) >= limit:
            raise Overloaded(f"The server is overloaded: {limit} embeddings requests are "
                             f"already waiting or running ({env_name('embeddings_queue_size')}). "
                             "Retry shortly.")
        from .embeddings import Cancelled

        cancelled = threading.Event()
        self._embed_jobs.add(cancelled)
        try:
            vectors = await asyncio.get_running_loop().run_in_executor(
                self._embed_thread, self.embedder.embed, tokens, cancelled)
        except Cancelled:
            raise NotReady("The server is shutting down; retry on another replica.") from None
        finally:
            # Client gone (the await was cancelled) or done: a job not started yet is
            # dropped from the executor's queue; a running one stops before its next decode.
            cancelled.set()
            self._embed_jobs.discard(cancelled)
        return vectors, sum(map(len, tokens))

    def _embedding_tokens(self, inputs: Sequence[str | Sequence[int]]) -> list[list[int]]:
        assert self.embedder is not None
        tokens = [self.text_prompt(i, param="input") if not isinstance(i, str)
                  else self.model.tokenize(i, self.model.add_bos) for i in inputs]
        self.embedder.check(tokens)
        return tokens

    @property
    def embeddings_pending(self) -> int:
        """Embeddings requests admitted and not yet answered (waiting or running)."""
        return len(self._embed_jobs)

    def cancel_embeddings(self) -> None:
        """Stop every admitted embeddings request (shutdown): each ends with 'shutting down'
        after at most the llama_decode it is in."""
        for cancelled in list(self._embed_jobs):
            cancelled.set()

    # --- generation ---------------------------------------------------------------------

    def start(self, prompt: list[int], params: SamplingParams, *, api: str,
              request_id: str, prompt_param: str = "messages", user: str | None = None,
              stream: bool = True, model: str | None = None, tenant: str = "",
              priority: int = 0, lease: Lease | None = None, trace: Context | None = None) -> Generation:
        """Submit now: errors (too long, overloaded, an unknown ``model``) raise here, before
        any output. ``stream=False``: the text comes in one delta right before the end (no
        event per token crosses to the event loop). ``model`` names the base model or an
        adapter to run with. ``tenant`` and ``priority`` go to the engine's admission;
        ``lease`` (the tenant's limits) is charged the prompt now and the completion at the
        end. ``trace``: the caller's trace context (tracing.extract), parent of the spans
        recorded when the generation ends."""
        if not self.engine.alive:
            raise NotReady("The model is not loaded yet.")
        if self.draining:
            raise NotReady("The server is shutting down; retry on another replica.")
        if len(prompt) >= self.engine.context_size:
            raise ContextTooLong(len(prompt), self.engine.context_size, param=prompt_param)
        q: asyncio.Queue = asyncio.Queue()
        bridge = self._bridge()
        req = GenerationRequest(prompt, params, QueueSink(bridge, q), request_id, stream=stream,
                                tenant=tenant, priority=priority)
        gen = Generation(self, req, api, q, user=user, lease=lease, trace=trace)

        def submit(adapters: tuple) -> None:
            req.adapters = adapters
            self.engine.submit(req)

        try:
            if model and model != self.model_id:
                self.adapters.submit(model, submit)
            else:
                self.engine.submit(req)
        except LlamafleetError as e:
            gen.lease = None  # nothing ran: nothing to charge
            self.record(gen, "rejected", type(e).__name__)
            raise
        if lease is not None:
            lease.charge(len(prompt))
        return gen

    def tenant_label(self, tenant: str) -> str:
        """``tenant`` as the metrics' label (bounded: configured names, else a fixed one)."""
        tf = self.tenants
        return tenant_label(tenant, tf.current() if tf is not None else None)

    def count_tenant_tokens(self, tenant: str, prompt: int, completion: int) -> None:
        label = self.tenant_label(tenant)
        if prompt:
            self.metrics.tenant_tokens.labels(label, "prompt").inc(prompt)
        if completion:
            self.metrics.tenant_tokens.labels(label, "completion").inc(completion)

    def _bridge(self) -> LoopBridge:
        loop = asyncio.get_running_loop()
        bridge = self._bridges.get(loop)
        if bridge is None:
            bridge = self._bridges[loop] = LoopBridge(loop)
            if self.profile is not None:
                wrap_bridge(bridge, self.profile)
        return bridge

    def record(self, gen: Generation, outcome: str, reason: str) -> None:
        m = self.metrics
        m.requests.labels(gen.api, outcome, reason).inc()
        fin = gen.finished
        now = time.monotonic()
        duration = now - gen.submitted
        ttft = (gen.first_token_at - gen.submitted) if gen.first_token_at else None
        if fin is not None:  # the token counters count in EngineMetrics.on_finish
            m.e2e.observe(duration)
            if gen.lease is not None:
                gen.lease.charge(fin.completion_tokens)
            self.count_tenant_tokens(gen.req.tenant, fin.prompt_tokens, fin.completion_tokens)
        log.info(
            "request finished",
            extra={"request_id": gen.req.request_id, "api": gen.api, "outcome": outcome,
                   "user": gen.user,
                   "finish_reason": reason,
                   "prompt_tokens": fin.prompt_tokens if fin else len(gen.req.prompt),
                   "completion_tokens": fin.completion_tokens if fin else None,
                   "ttft_s": round(ttft, 4) if ttft is not None else None,
                   "duration_s": round(duration, 4)},
        )
        if gen.trace is not None:
            trace_generation(gen, outcome, reason, now)

    def info(self, private: bool = False) -> dict[str, Any]:
        """``private`` (only behind the API key): also how many prompt tokens the prefix
        cache saved, which tells one user how much of another's prompt was cached."""
        out = {
            "model": self.model_id,
            "model_path": str(self.model.path),
            "llama_cpp_python": llama_cpp_python_version(),
            "context_size": self.engine.context_size,
            "max_batch_size": self.engine.max_batch_size,
            "n_batch": self.engine.backend.n_batch,
            "capacity": self.plan.as_dict(),
            "running": self.engine.running,
            "queued": self.engine.queued,
            "queue_size": self.engine.queue_size,
            "embeddings_pending": self.embeddings_pending,
            "ready": self.engine.alive and not self.draining,
            "studio": {"knowledge_url": self.settings.studio_knowledge_url},
            **({"step_profile": self.profile.summary()} if self.profile is not None else {}),
        }
        if private:
            out["prefix_tokens_reused"] = self.engine.prefix_tokens_reused
            out["prompt_cache_restores"] = self.engine.prompt_cache_restores
            out["prefix_tokens_shared"] = self.engine.cache.prefix_tokens_shared
        return out

    def close(self) -> None:
        self.engine.stop()
        self._embed_thread.shutdown(wait=True, cancel_futures=True)  # before its context goes
        if self.embedder is not None:
            self.embedder.close()
        self._grammar_pool.shutdown(wait=False, cancel_futures=True)


def check_stop(stop: Sequence[str], param: str) -> None:
    """The stop-string limits (limits.py), the same on HTTP and gRPC."""
    if len(stop) > MAX_STOP_STRINGS:
        raise BadRequest(f"{param}: at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}",
                         param=param)
    for s in stop:
        if not s:
            raise BadRequest(f"{param}: stop strings must not be empty", param=param)
        if len(s) > MAX_STOP_CHARS:
            raise BadRequest(f"{param}: a stop string may have at most {MAX_STOP_CHARS} "
                             f"characters, got {len(s)}", param=param)


# A JSON string's character: no raw control characters (JSON forbids them; json.loads
# refuses them), as in llama.cpp's own json-schema-to-grammar and llama-cpp-python's
# JSON_GBNF. llama-cpp-python's converter allows any character but '"' and '\\', so a
# model could write a raw newline inside a string and the answer did not parse.
STRICT_JSON_CHAR = (r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] '
                    r'[0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])')


def json_schema_to_gbnf(schema: dict) -> str:
    """llama-cpp-python's converter (its json_schema_to_gbnf), with strict JSON strings."""
    from llama_cpp.llama_grammar import BuiltinRule, SchemaConverter

    class Strict(SchemaConverter):
        def _add_primitive(self, name: str, rule: BuiltinRule):  # type: ignore[override]
            if name == "char":
                rule = BuiltinRule(STRICT_JSON_CHAR, [])
            return super()._add_primitive(name, rule)

    converter = Strict(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    converter.visit(converter.resolve_refs(json.loads(json.dumps(schema)), "stdin"), "")
    return converter.format_grammar()


def _schema_grammar(schema: dict, model: Any, param: str) -> str:
    """Convert, then parse once here so that a grammar llama.cpp refuses is a 400 before
    the request is queued (not a failure inside the engine or mid-stream)."""
    try:
        grammar = json_schema_to_gbnf(schema)
    except Exception as e:
        raise BadRequest(f"{param}: unsupported JSON schema: {e}", param=param) from e
    if not model.grammar_ok(grammar):
        raise BadRequest(f"{param}: llama.cpp refused the grammar made from "
                         "this schema (too many repetitions?)", param=param)
    return grammar


def _json_grammar() -> str:
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF


JSON_GRAMMAR = _json_grammar()


SPLIT_FROM = 8  # kv_layout auto: sequences from which one KV stream each pays (see Settings)


def kv_layout(setting: str, max_batch_size: int) -> str:
    """The KV layout for a pod: the setting, or for 'auto' the measured choice by batch size."""
    if setting != "auto":
        return setting
    return "split" if max_batch_size >= SPLIT_FROM else "unified"


def load_draft_model(settings: Settings, target: Any, *, n_seq: int, n_batch: int,
                     kv_layout: str) -> DraftModel:
    """The draft model of ``--speculative draft``: loaded, its vocabulary checked against the
    served model's (ModelError, one line, otherwise), with a context of its own shaped like the
    served model's."""
    return draft_context(settings, load_draft_weights(settings, target), target, n_seq=n_seq,
                         n_batch=n_batch, kv_layout=kv_layout)


def load_draft_weights(settings: Settings, target: Any) -> Any:
    """The draft model's weights (a LlamaModel), its vocabulary checked against ``target``'s:
    loaded before the capacity plan, which counts them."""
    from .llama_backend import LlamaModel

    name = settings.draft_model
    assert name is not None  # Settings: mode draft needs it
    if name in EMBEDDED_MODELS:
        path = resolve_model_path(None, name, settings.embedded_model_dir)
    elif Path(name).is_file():
        path = resolve_model_path(Path(name))
    else:
        raise ModelError(f"draft model not found: {name} ({env_name('draft_model')} is a GGUF "
                         f"path or the name of an embedded model: {', '.join(EMBEDDED_MODELS)})")
    log.info("loading draft model %s", path)
    model = LlamaModel(path, settings.gpu_layers)
    try:
        check_vocabulary(target, model, path)
    except ModelError:
        model.close()
        raise
    return model


def draft_context(settings: Settings, model: Any, target: Any, *, n_seq: int, n_batch: int,
                  kv_layout: str) -> DraftModel:
    """The draft model's own context, slot for slot with the served model's (closes ``model``
    when it cannot be made)."""
    from .llama_backend import LlamaBackend

    try:
        backend = LlamaBackend(model, n_seq=n_seq, context_size=settings.context_size,
                               n_batch=n_batch, threads=settings.threads,
                               kv_cache_type=settings.kv_cache_type, swa_full=settings.swa_full,
                               kv_layout=kv_layout)
    except ModelError:
        model.close()
        raise
    return DraftModel(backend, n_seq, target.is_eog)


def build(settings: Settings) -> Serving:
    """Load the model, plan capacity, start the engine. Raises ModelError/CapacityError."""
    from .llama_backend import LlamaBackend, LlamaModel
    from .selftest import SelfTestFailed, self_test

    path = resolve_model_path(settings.model_path, settings.embedded_model,
                              settings.embedded_model_dir)
    # GPUs probed before the load: their free memory must still hold the weights' room,
    # which the plan subtracts (inference/capacity.py, probe_for_pod).
    gpus = capacity.probe_for_pod(settings)
    log.info("loading model %s", path)
    model = LlamaModel(path, settings.gpu_layers)
    draft_weights = None
    if settings.speculative == "draft":
        try:
            draft_weights = load_draft_weights(settings, model)
        except ModelError:
            model.close()
            raise
    plan = capacity.plan_for_pod(settings, model.shape, gpus,
                                 draft_shape=draft_weights and draft_weights.shape)
    log.info("max_batch_size=%d: %s", plan.max_batch_size, plan.reason)
    # Each running sequence adds a token to every step's batch: the batch must hold them all.
    n_batch = max(settings.n_batch, plan.max_batch_size)
    if n_batch != settings.n_batch:
        log.warning("n_batch raised from %d to %d to fit max_batch_size=%d (one token per "
                    "running sequence per step)", settings.n_batch, n_batch, plan.max_batch_size)
    layout = kv_layout(settings.kv_layout, plan.max_batch_size)
    backend = LlamaBackend(model, n_seq=plan.max_batch_size, context_size=settings.context_size,
                           n_batch=n_batch, threads=settings.threads,
                           kv_cache_type=settings.kv_cache_type, swa_full=settings.swa_full,
                           kv_layout=layout)
    log.info("KV layout %s (%s) for %d sequences", layout, settings.kv_layout,
             plan.max_batch_size)
    metrics = Metrics()
    metrics.max_batch.set(plan.max_batch_size)
    metrics.model.info({"name": settings.model_name or path.stem, "path": str(path),
                        "architecture": model.shape.architecture,
                        "context_size": str(settings.context_size)})
    prompt_cache = PromptCache(settings.prompt_cache_mib << 20) if settings.prompt_cache_mib else None
    speculative_k = settings.speculative_k if settings.speculative != "none" else 0
    if speculative_k and backend.n_swa and not settings.swa_full:
        # A rejected draft's cells must be dropped, and a sliding window that moved past
        # them leaves the sequence unable to go on from there (trim_sequence says no):
        # every miss would decode the whole sequence again.
        log.warning("speculative decoding stays off: %s has sliding-window attention (%d "
                    "tokens); set %s to use it", path.name, backend.n_swa, env_name("swa_full"))
        speculative_k = 0
    draft = None
    if draft_weights is not None and not speculative_k:
        draft_weights.close()
    elif draft_weights is not None:
        try:
            draft = draft_context(settings, draft_weights, model, n_seq=plan.max_batch_size,
                                  n_batch=n_batch, kv_layout=layout)
        except ModelError:
            backend.close()
            raise
    engine = Engine(backend, max_batch_size=plan.max_batch_size, queue_size=settings.queue_size,
                    context_size=settings.context_size,
                    observer=EngineMetrics(metrics), prompt_cache=prompt_cache,
                    deliver=deliver, prefill_step_s=settings.prefill_step_ms / 1e3 or None,
                    speculative_k=speculative_k, draft_model=draft)
    metrics.follow(engine, backend.n_ctx)
    profile = install_profile(engine, metrics) if settings.step_profile else None
    probe = model.tokenize("The sky is", add_bos=model.add_bos)
    try:
        engine.start(startup=lambda b: self_test(b, probe))  # on the engine thread
    except SelfTestFailed as e:
        backend.close()
        raise ModelError(f"{e} (model {path}, llama-cpp-python {llama_cpp_python_version()})") from e
    embedder = None
    if settings.embeddings:
        from .embeddings import Embedder

        # One thread: a second multi-threaded OpenMP team in the process (ggml's CPU back-end
        # uses OpenMP) made libgomp throttle its spinning, and every engine step took about
        # twice as long afterwards (2 cores, Gemma 3 270M: 143 -> 73 tok/s for one stream).
        embedder = Embedder(model, context_size=settings.embeddings_context_size,
                            threads=1, pooling=settings.embeddings_pooling)
    serving = Serving(settings, model, engine, metrics, plan, embedder)
    serving.profile = profile
    for name, adapter_path, scale in settings.lora:
        try:
            serving.adapters.load(name, adapter_path, scale)
        except LlamafleetError as e:
            serving.close()
            backend.close()
            raise ModelError(f"LoRA adapter {name} ({env_name('lora_adapters')}): {e}") from e
        log.info("LoRA adapter %s loaded from %s (scale %g)", name, adapter_path, scale)
    return serving
