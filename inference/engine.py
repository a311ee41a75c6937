"""Continuous batching: one engine thread, one llama_decode per step.

The engine knows nothing of HTTP or gRPC. Callers build a :class:`GenerationRequest`
(prompt tokens + :class:`SamplingParams` + a sink for :class:`Event`s) and
:meth:`Engine.submit` it. Each step the engine

1. admits waiting requests into free sequence slots,
2. drops cancelled sequences (freeing their KV cells),
3. builds ONE :class:`Batch` (:func:`build_batch`): the next token of every decoding
   sequence, then prompt chunks of prefilling ones within ``n_batch``,
4. decodes it once, then applies the result: every sequence advances by what it put in
   the batch, and each that asked for logits samples with its own sampler chain.

Each sequence is in one :class:`State`: ``PREFILL`` (prompt tokens still to decode),
``DECODE`` (a sampled token waits to be decoded), ``RESUME`` (preempted and back: its prompt
and generated tokens are decoded again, nothing sampled) or ``DONE`` (finished; its slot is
free).

Tenants and priorities: waiting requests are admitted by priority, then fairly among tenants
(:mod:`llamafleet.inference.admission`). When a tenant below its fair share of the slots
waits while another holds more than its share, the engine preempts that tenant's youngest
sequence (of no higher priority, never a seeded one): its cells go to the host
prompt cache (and stay in its freed slot until reused), it waits at the head of its tenant's
line, and when admitted again it decodes what the cache no longer holds and goes on where it
stopped, its sampler and text untouched. Without tenants nothing is preempted.

The model sits behind the small :class:`Backend` protocol so the scheduler can be
tested with a fake; :mod:`llamafleet.inference.llama_backend` is the real one.

LoRA adapters: a request carries an adapter set (``GenerationRequest.adapters``, opaque to
the scheduler, ``()`` for the base model). llama.cpp sets adapters per context, so one step
decodes the sequences of one adapter set only: with sequences of several sets running, the
steps take the sets in turn, the one served longest ago first (:meth:`Engine._group`), so no
set waits more than one step per other set. Cached cells (free slots, the host prompt cache,
prefixes shared in flight) are reused only under the adapter set that computed them. With
every running sequence on one set (always, when no adapter is loaded) nothing changes.
"""

from __future__ import annotations

import bisect
import codecs
import enum
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

from llamafleet.common.errors import BadRequest, ContextTooLong, InternalError, LlamafleetError, Overloaded
from llamafleet.common.sampling import DEFAULTS

from .admission import FairQueue, fair_share
from .draft_model import DraftModel
from .prompt_cache import PromptCache, shared_prefix
from .slot_cache import SlotCache
from .speculative import K_MAX, AdaptiveLength, NgramLookup, SpeculationStats, StepCost

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    """One sequence's sampling, resolved. Callers fill every value (serving.Serving.sampling:
    the request's, else the pod's DEFAULT_* settings, else DEFAULTS); a value left out here
    takes the one model's default too (llamafleet.common.sampling.DEFAULTS)."""

    temperature: float = DEFAULTS.temperature
    top_k: int = DEFAULTS.top_k
    top_p: float = DEFAULTS.top_p
    min_p: float = DEFAULTS.min_p
    repeat_penalty: float = DEFAULTS.repeat_penalty
    presence_penalty: float = DEFAULTS.presence_penalty
    frequency_penalty: float = DEFAULTS.frequency_penalty
    seed: int | None = DEFAULTS.seed
    max_tokens: int = DEFAULTS.max_tokens
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # GBNF, e.g. for response_format json_object
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; n: the token's logprob and the n most likely


# --- events sent to the caller (from the engine thread) -----------------------------------


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability and the ``top`` most likely tokens', from the
    logits the sampler saw (after penalties, before top-k/p and temperature)."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...]


@dataclass(frozen=True)
class Started:
    queue_wait_s: float


@dataclass(frozen=True)
class TextDelta:
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()  # only for requests that ask


@dataclass(frozen=True)
class Finished:
    reason: str  # stop | length | cancelled
    prompt_tokens: int
    completion_tokens: int
    stop: str | None = None  # the request's stop string that ended the text, if one did


@dataclass(frozen=True)
class Failed:
    error: LlamafleetError


Event = Started | TextDelta | Finished | Failed


@dataclass(eq=False)
class GenerationRequest:
    prompt: Sequence[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    request_id: str = ""
    # False: the text is held and sent as one delta before Finished, not one per token
    # (a non-streaming answer needs nothing earlier, and every event costs the event loop).
    stream: bool = True
    # The LoRA adapter set it runs with: hashable and opaque here (the backend applies it);
    # () is the base model. See the module's docstring.
    adapters: tuple = ()
    tenant: str = ""  # who asked (the API key's tenant; "" without tenants)
    priority: int = 0  # higher first at admission (the key's, or the GIE objective header's)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    # Written on the engine thread once per request (monotonic; 0: not reached), read on the
    # event loop after its Finished (the bridge's lock orders them): tracing's prefill and
    # first-token times, with no OpenTelemetry call on the engine thread.
    prefilled_at: float = 0.0
    first_token_at: float = 0.0

    def cancel(self) -> None:
        self.cancelled.set()


class Backend(Protocol):
    """The model boundary: everything the scheduler needs from llama.cpp."""

    n_batch: int

    def new_sampler(self, params: SamplingParams) -> Any: ...

    def free_sampler(self, sampler: Any) -> None: ...

    def decode(self, tokens: Sequence[int], pos: Sequence[int], seq: Sequence[int],
               logits: Sequence[bool]) -> None: ...

    def sample(self, sampler: Any, batch_index: int) -> int: ...

    def sample_batch(self, samplers: Sequence[Any], indices: Sequence[int]) -> list[int]:
        """One token per sampler, from the logits row at the matching batch index: every
        row of a step at once."""
        ...

    def logprob(self, batch_index: int, token: int, top: int) -> TokenLogprob:
        """``token``'s log-probability at ``batch_index`` after :meth:`sample`, and the
        ``top`` most likely tokens'."""
        ...

    def logits_nonfinite(self, batch_index: int) -> int:
        """How many of the logits at ``batch_index`` are NaN or infinite (start-up self-test)."""
        ...

    def token_bytes(self, token: int) -> bytes: ...

    def is_eog(self, token: int) -> bool: ...

    def clear_sequence(self, seq_id: int) -> None: ...

    def trim_sequence(self, seq_id: int, keep: int) -> bool:
        """Drop positions >= keep of a sequence; False if the cache cannot do that, or if
        the cells left cannot serve a continuation from ``keep`` (then the caller clears
        the sequence and prefills from scratch)."""
        ...

    def set_adapters(self, adapters: tuple) -> None:
        """Apply an adapter set (a request's ``adapters``; () = none) to the following decodes.
        Called only when the set changes, so a backend that serves no adapters never sees it."""
        ...


class EngineObserver(Protocol):
    """Hooks for metrics; every method is called on the engine thread."""

    def on_step(self, running: int, batch_tokens: int, queued: int, kv_tokens: int) -> None: ...

    def on_tokens(self, first: Sequence[GenerationRequest],
                  later: Sequence[GenerationRequest]) -> None:
        """Once per step: the requests that got their first token, and the others that got
        one."""
        ...

    def on_finish(self, req: GenerationRequest, prompt_tokens: int,
                  completion_tokens: int) -> None:
        """An admitted request left the batch (finished, cancelled or failed) after
        processing these tokens."""


class _NullObserver:
    def on_step(self, running: int, batch_tokens: int, queued: int, kv_tokens: int) -> None:
        pass

    def on_tokens(self, first: Sequence[GenerationRequest],
                  later: Sequence[GenerationRequest]) -> None:
        pass

    def on_finish(self, req: GenerationRequest, prompt_tokens: int,
                  completion_tokens: int) -> None:
        pass


class TextAssembler:
    """Bytes of tokens in, safe text out.

    Holds back incomplete UTF-8 sequences (the codec does this) and any tail that could
    still become a stop string, so a stop string is never streamed in part.
    """

    def __init__(self, stop: Sequence[str]):
        self._decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        self._stop = [s for s in stop if s]
        # Characters that end some proper prefix of a stop string: text ending in none of
        # them holds nothing back (the common case, checked in O(1) per token).
        self._prefix_ends = {s[k - 1] for s in self._stop for k in range(1, len(s))}
        self._pending = ""
        self.matched: str | None = None  # the stop string that was hit

    def feed(self, data: bytes) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit: :attr:`matched`)."""
        text = self._decode(data)
        if not self._stop:
            return text, False
        pending = self._pending = self._pending + text
        # The earliest stop string in the text wins, whatever its place in the list.
        first = -1
        for s in self._stop:
            at = pending.find(s)
            if at >= 0 and (first < 0 or at < first):
                first, self.matched = at, s  # only when a stop string is in the text
        if first >= 0:
            self._pending = ""
            return pending[:first], True
        if not pending or pending[-1] not in self._prefix_ends:
            self._pending = ""
            return pending, False
        hold = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self._pending)), hold, -1):
                if self._pending.endswith(s[:k]):
                    hold = k
                    break
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, False

    def flush(self) -> str:
        out = self._pending + self._decode(b"", final=True)
        self._pending = ""
        return out


class State(enum.Enum):
    PREFILL = "prefill"  # prompt tokens from n_past on are not in the KV cache yet
    DECODE = "decode"  # next_token was sampled and goes into the next batch
    RESUME = "resume"  # preempted and admitted again: ``resume`` from n_past on is decoded
    DONE = "done"  # finished or failed; the slot is released


PREFILL, DECODE, RESUME, DONE = State.PREFILL, State.DECODE, State.RESUME, State.DONE


@dataclass(eq=False)
class _Sequence:
    req: GenerationRequest
    slot: int
    sampler: Any
    text: TextAssembler
    n_past: int = 0  # tokens already in the KV cache
    state: State = PREFILL
    next_token: int = -1  # DECODE: sampled, not yet decoded
    completion_tokens: int = 0
    started: bool = False
    generated: list[int] = field(default_factory=list)  # sampled tokens now in the KV cache
    passed_over: int = 0  # PREFILL: steps in a row that left it no budget (build_batch)
    follows: bool = False  # PREFILL: waits for another sequence's prefill of its prefix
    # PREFILL: admitted below its tenant's fair share while other tenants run: its prompt
    # takes a step's prefill budget alone (build_batch), so its first token is not held by
    # the other tenants' prompt chunks.
    hurry: bool = False
    held: list[TextDelta] = field(default_factory=list)  # not streamed: sent at the end
    resume: list[int] | None = None  # RESUME: prompt + generated, to be in the KV cache
    # Speculation on: its draft length, and with prompt lookup its index (None: off for it).
    lookup: AdaptiveLength | None = None

    def pending(self) -> Sequence[int]:
        """The tokens a PREFILL or RESUME sequence decodes, from ``n_past`` on."""
        return self.req.prompt if self.resume is None else self.resume

    def kv_tokens(self) -> list[int]:
        return (list(self.req.prompt) + self.generated)[: self.n_past]

    def shared_with(self, prompt: Sequence[int]) -> int:
        """How many first tokens of ``prompt`` this sequence's cells hold."""
        own = self.req.prompt
        n = shared_prefix(own, prompt)
        if n == len(own) and self.generated:
            n += shared_prefix(self.generated, prompt[n:])
        return min(n, self.n_past)


@dataclass(eq=False)
class Batch:
    """One llama_decode's input, and what each sequence gets from it.

    ``tokens``/``pos``/``seqs``/``logits`` are llama_batch's columns; ``advance`` pairs
    each sequence in the batch with how many of its tokens it holds; ``sample`` pairs each
    sequence that asked for logits with its row.
    """

    tokens: list[int] = field(default_factory=list)
    pos: list[int] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)
    logits: list[bool] = field(default_factory=list)
    advance: list[tuple[_Sequence, int]] = field(default_factory=list)
    sample: list[tuple[_Sequence, int]] = field(default_factory=list)
    alone: bool = False  # decoding sequences were left out for a hurried prompt
    # Speculation: (sequence, batch index of its next token, its draft); the draft follows
    # the next token in the batch, every position with logits (Engine._verify).
    drafts: list[tuple[_Sequence, int, list[int]]] = field(default_factory=list)


PASSED_OVER_MAX = 4  # steps a prefill may get no budget before it goes first


def build_batch(running: Sequence[_Sequence], n_batch: int,
                prefill_budget: int | None = None,
                drafts: dict[int, list[int]] | None = None, alone_ok: bool = True) -> Batch:
    """Every decoding sequence's next token, and prompt chunks of prefilling sequences,
    shortest remaining prompt first, within ``n_batch`` tokens and ``prefill_budget`` prompt
    tokens (chunked prefill: a long prompt never holds the running streams, or a request that
    arrives, for more than one bounded step). A prefill's last chunk asks for logits
    (for its first sampled token); an earlier chunk does not.

    Tokens go into the batch in the order of ``running`` (the engine keeps it in slot order),
    each sequence's tokens together: with one KV stream per sequence llama.cpp cuts a batch
    into ubatches of *consecutive* sequence ids with equal token counts, so a batch in slot
    order is one ubatch for every decoding sequence (plus one for what is left of a prompt
    chunk) instead of one per break in the order.

    Shortest first: a request whose prefix came from the cache has a few tokens left to
    prefill, and gets its first token in this step instead of waiting behind another
    request's long prompt (the long one takes what is left of the budget). A prefill left
    without budget counts the step (``passed_over``); after PASSED_OVER_MAX such steps it
    goes first. A ``hurry`` prompt (another tenant's newcomer, see ``_Sequence``) goes before
    them all, and while one prefills no other prompt gets a chunk; its last chunk goes
    without the decoding sequences too, unless ``alone_ok`` is False (the engine's previous
    step went so: decoding sequences never miss two steps in a row, however many tenants'
    newcomers arrive).

    ``drafts`` (speculation; by ``id`` of a decoding sequence): tokens that follow its next
    token in the batch, each with logits, verified after the decode (Engine._verify). The
    caller keeps them within ``n_batch``; they come out of the prompt tokens' room."""
    decoding = [s for s in running if s.state is DECODE]
    if not drafts and len(decoding) == len(running):  # pure decode (most steps): at once
        b = Batch(tokens=[s.next_token for s in decoding], pos=[s.n_past for s in decoding],
                  seqs=[s.slot for s in decoding], logits=[True] * len(decoding),
                  advance=[(s, 1) for s in decoding])
        b.sample = list(zip(decoding, range(len(decoding)), strict=True))
        return b
    budget = n_batch - len(decoding)
    if drafts:
        budget -= sum(map(len, drafts.values()))
    if prefill_budget is not None:
        budget = min(budget, prefill_budget)
    # Shortest first, except that a prompt passed over PASSED_OVER_MAX steps in a row goes
    # first: a stream of short prompts never starves a long one.
    prefilling = sorted((s for s in running if s.state is not DECODE and not s.follows),
                        key=lambda s: (not s.hurry, s.passed_over < PASSED_OVER_MAX,
                                       len(s.pending()) - s.n_past))
    hurry = bool(prefilling) and prefilling[0].hurry
    takes: dict[int, int] = {}
    for seq in prefilling:
        if budget <= 0 or (hurry and not seq.hurry):
            seq.passed_over += 1
            continue
        seq.passed_over = 0
        take = min(budget, len(seq.pending()) - seq.n_past)
        takes[id(seq)] = take
        budget -= take
    # A hurried prompt that ends in this step goes alone: beside it, the other tenants'
    # decoding tokens make the step that yields its first token longer (four streams of
    # the default model on a 2-core CPU nearly double a short prompt's step). They wait
    # this one step, bounded by the prefill budget; a longer prompt's earlier chunks keep
    # them company.
    first = prefilling[0] if prefilling else None
    alone = hurry and alone_ok and takes.get(id(first)) == len(first.pending()) - first.n_past
    b = Batch(alone=alone and bool(decoding))
    for seq in running:
        if seq.state is DECODE:
            if alone:
                continue
            b.sample.append((seq, len(b.tokens)))
            b.advance.append((seq, 1))
            b.tokens.append(seq.next_token)
            b.pos.append(seq.n_past)
            b.seqs.append(seq.slot)
            b.logits.append(True)
            if drafts and (draft := drafts.get(id(seq))):
                b.drafts.append((seq, len(b.tokens) - 1, draft))
                m = len(draft)
                b.tokens.extend(draft)
                b.pos.extend(range(seq.n_past + 1, seq.n_past + 1 + m))
                b.seqs.extend([seq.slot] * m)
                b.logits.extend([True] * m)
            continue
        take = takes.get(id(seq), 0)
        if not take:
            continue
        start = seq.n_past
        tokens = seq.pending()
        # A resumed sequence's next token is already sampled: no logits at its end.
        last = start + take == len(tokens) and seq.state is PREFILL
        b.tokens.extend(tokens[start : start + take])
        b.pos.extend(range(start, start + take))
        b.seqs.extend([seq.slot] * take)
        b.logits.extend([False] * (take - 1))
        b.logits.append(last)
        b.advance.append((seq, take))
        if last:
            b.sample.append((seq, len(b.tokens) - 1))
    return b


class Engine:
    """Owns the backend; all llama.cpp calls happen on its one thread."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_batch_size: int,
        queue_size: int,
        context_size: int,
        observer: EngineObserver | None = None,
        prompt_cache: PromptCache | None = None,
        deliver: Callable[[list[tuple[GenerationRequest, Event]]], None] | None = None,
        prefill_step_s: float | None = None,
        speculative_k: int = 0,
        draft_model: DraftModel | None = None,
        step_cost: StepCost | None = None,
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_batch_size > backend.n_batch:
            # Every running sequence puts a token into each step's batch, and the batch
            # holds n_batch tokens: more would write past llama_batch's arrays.
            raise ValueError(f"max_batch_size ({max_batch_size}) must not exceed n_batch "
                             f"({backend.n_batch})")
        if not 0 <= speculative_k <= K_MAX:
            raise ValueError(f"speculative_k must be 0 (off) to {K_MAX}, not {speculative_k}")
        if draft_model is not None and not speculative_k:
            raise ValueError("a draft model needs speculative_k >= 1")
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.context_size = context_size
        self.queue_size = queue_size
        self.observer: EngineObserver = observer or _NullObserver()
        # Room for queue_size waiting requests beyond the free slots, and stop()'s None.
        self._waiting = FairQueue(queue_size + max_batch_size + 1, _classify)
        self._tenants: dict[str, int] = {}  # running sequences per tenant (none: absent)
        self._waiting.running_of = lambda tenant: self._tenants.get(tenant, 0)
        self.preemptions = 0  # sequences preempted for another tenant's fair share
        self._admit_lock = threading.Lock()
        self.cache = SlotCache(backend, max_batch_size, prompt_cache,  # type: ignore[arg-type]
                               packed=getattr(backend, "kv_layout", None) == "split")
        self._running: list[_Sequence] = []  # in slot order (build_batch says why)
        # Events of a step go out together at its end (deliver), not one hand-over per token.
        self._outbox: list[tuple[GenerationRequest, Event]] = []
        self._deliver = deliver or deliver_each
        # Chunked prefill: a step's prompt tokens are held to what fits prefill_step_s at the
        # measured cost per batch token (prefill_budget says when; None: up to n_batch).
        self.prefill_step_s = prefill_step_s
        # Speculation: draft tokens per sequence and step, at most; 0: off, and no sequence
        # carries a lookup. The drafts come from the draft model when there is one
        # (inference/draft_model.py), else from prompt lookup (inference/speculative.py).
        self.speculative_k = speculative_k
        self.draft_model = draft_model
        self.speculative_kind = "draft" if draft_model is not None else "ngram"
        self.speculation = {"ngram": SpeculationStats(), "draft": SpeculationStats()}
        # What a draft token costs, learnt from decode steps without prompt tokens while
        # speculating (StepCost; a test may give its own).
        self.step_cost = step_cost or StepCost()
        self._token_s: float | None = None  # seconds per batch token, steps with prompt tokens
        self._thread: threading.Thread | None = None
        # Adapter sets of the running sequences (how many each) in order of arrival, the step
        # each was last decoded at, and the set the backend has now (Engine._group).
        self._sets: dict[tuple, int] = {}
        self._served: dict[tuple, int] = {}
        self._turns = 0
        self._alone_last = False  # the last step left the decoding sequences out
        self._adapters: tuple | None = ()  # None: unknown (a change failed)
        # Work for the engine thread between steps (Engine.call).
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._stopping = False
        self.steps = 0
        self.adapter_switches = 0  # times the backend's adapter set changed
        self.alive = False
        self.last_progress = time.monotonic()  # when a step last finished (or work began)

    # --- public, any thread ------------------------------------------------------------

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def queued(self) -> int:
        return self._waiting.qsize()

    @property
    def prompt_cache(self) -> PromptCache | None:
        return self.cache.prompt_cache

    @property
    def prefix_tokens_reused(self) -> int:
        return self.cache.prefix_tokens_reused

    @property
    def prompt_cache_restores(self) -> int:
        return self.cache.prompt_cache_restores

    def prefill_budget(self) -> int | None:
        """Prompt tokens the next step may carry (None: up to n_batch). Bounded while anyone
        may be waiting for the step to end: a decoding sequence, or a request that arrives
        for a free slot (its own prefill starts only at the next step). With every slot taken
        and none decoding, nobody is: whole n_batch chunks then."""
        if self.prefill_step_s is None or self._token_s is None:
            return None
        if not self.cache.free and all(s.state is not DECODE for s in self._running):
            return None
        return max(MIN_PREFILL_CHUNK, int(self.prefill_step_s / self._token_s))

    @property
    def kv_cells_used(self) -> int:
        """KV cells holding running sequences' tokens (a snapshot, for metrics)."""
        return sum(s.n_past for s in list(self._running))

    def stalled_for(self) -> float:
        """Seconds without a finished step while sequences are running; 0 when idle."""
        if not self._running:
            return 0.0
        return max(0.0, time.monotonic() - self.last_progress)

    def submit(self, req: GenerationRequest) -> None:
        """Queue a request, or raise at once (too long, overloaded, stopped)."""
        if len(req.prompt) == 0:
            raise BadRequest("The prompt is empty.", param="prompt")
        if len(req.prompt) >= self.context_size:
            raise ContextTooLong(len(req.prompt), self.context_size)
        if self._stopping or not self.alive:
            raise Overloaded("The engine is not running.")
        with self._admit_lock:
            # Room for queue_size waiting requests beyond the free slots: a request that
            # can start at the next step never counts as queued.
            limit = self.queue_size + self.cache.free
            if self._waiting.qsize() >= limit:
                self._purge_cancelled()
            if self._waiting.qsize() >= limit:
                raise Overloaded(
                    f"The server is overloaded: {self.queue_size} requests are already "
                    "waiting. Retry shortly."
                )
            try:
                self._waiting.put_nowait(req)
            except queue.Full:
                raise Overloaded("The server is overloaded. Retry shortly.") from None

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the engine thread between two steps (adapters are loaded, freed and
        checked there: llama.cpp's context and model are the engine thread's); its result
        or exception arrives in the returned future."""
        done: Future = Future()
        if self._stopping or not self.alive:
            done.set_exception(Overloaded("The engine is not running."))
            return done
        self._calls.put((fn, done))
        try:  # wake an engine thread that waits for requests
            self._waiting.put_nowait(_WAKE)  # type: ignore[arg-type]
        except queue.Full:
            pass  # a full queue: the thread is not waiting
        return done

    def requests_with(self, uses: Callable[[tuple], bool]) -> int:
        """Running and waiting requests whose adapter set ``uses`` says yes to. Exact on the
        engine thread (in :meth:`call`); a snapshot elsewhere."""
        running, waiting = self._requests()
        return sum(1 for r in (*running, *waiting) if uses(r.adapters))

    def adapter_sets(self) -> tuple[set[tuple], set[tuple]]:
        """The adapter sets of the running sequences and of the waiting requests (a snapshot
        that any thread may take: the pod's LoRA gauge)."""
        running, waiting = self._requests()
        return {r.adapters for r in running}, {r.adapters for r in waiting}

    def _requests(self) -> tuple[list[GenerationRequest], list[GenerationRequest]]:
        """The running and the waiting requests (a snapshot)."""
        running = [s.req for s in list(self._running)]
        waiting = [_request_of(r) for r in self._waiting.snapshot()]
        return running, waiting

    def _run_calls(self) -> None:
        while True:
            try:
                fn, done = self._calls.get_nowait()
            except queue.Empty:
                return
            if not done.set_running_or_notify_cancel():
                continue
            try:
                done.set_result(fn())
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                done.set_exception(e)

    def _purge_cancelled(self) -> None:
        """Drop waiting requests whose clients have gone, so that they stop counting
        against queue_size (a retry storm would otherwise turn live clients away)."""
        gone = self._waiting.remove_if(
            lambda r: isinstance(r, GenerationRequest) and r.cancelled.is_set())
        if not gone:
            return
        # On the submitting thread, not the engine's: delivered now, not at a step's end.
        self._deliver([(req, Finished("cancelled", len(req.prompt), 0)) for req in gone])

    def start(self, startup: Callable[[Backend], object] | None = None) -> None:
        """Start the engine thread. ``startup`` (the start-up self-test) runs first, on that
        thread; its exception is raised here and the engine does not start.

        Every llama.cpp decode of the context then comes from this one thread. A decode from
        another thread gives that thread an OpenMP team of its own, and with more OpenMP
        threads than cores libgomp stops spinning at ggml's barriers: after a self-test on the
        main thread, every later step took twice as long on 2 cores (Gemma 3 270M, one
        stream: 7 -> 12.5 ms per llama_decode).
        """
        started, failure = threading.Event(), []

        def run() -> None:
            if startup is not None:
                try:
                    startup(self.backend)
                except BaseException as e:  # noqa: BLE001 - handed to start()'s caller
                    failure.append(e)
                    started.set()
                    return
            self.alive = True
            started.set()
            self._run()

        self._thread = threading.Thread(target=run, name="llamafleet-engine", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            self._thread.join()
            raise failure[0]

    def stop(self, timeout: float | None = 30) -> None:
        self._stopping = True
        try:
            self._waiting.put_nowait(None)
        except queue.Full:
            pass
        if self._thread is not None:
            self._thread.join(timeout)

    # --- engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping:
                if not self._calls.empty():
                    self._run_calls()
                more = self._admit(block=not self._running)
                if more and self._running:
                    self._step()
                self._flush()
                if not more:
                    break
        except BaseException:  # pragma: no cover - a bug in the scheduler itself
            log.exception("engine thread crashed")
            raise
        finally:
            self.alive = False
            self._drain()
            self._flush()
            while not self._calls.empty():
                _, done = self._calls.get_nowait()
                if done.set_running_or_notify_cancel():
                    done.set_exception(Overloaded("The engine stopped."))

    def _flush(self) -> None:
        if self._outbox:
            out, self._outbox = self._outbox, []
            self._deliver(out)

    def _admit(self, block: bool) -> bool:
        """Move waiting requests into free slots (one freed for a tenant below its fair
        share, if need be). False when asked to stop."""
        if not self.cache.free and self._tenants:
            self._preempt_for_fair_share()
        while self.cache.free:
            try:
                req = self._waiting.get(block=block)
            except queue.Empty:
                return True
            block = False
            if req is None:
                return False
            if req is _WAKE:
                continue
            if isinstance(req, _Parked):
                self._resume(req.seq)
                continue
            if req.cancelled.is_set():
                self._emit(req, Finished("cancelled", len(req.prompt), 0))
                continue
            try:
                sampler = self.backend.new_sampler(req.params)
            except LlamafleetError as e:
                self._emit(req, Failed(e))
                continue
            except Exception as e:
                log.exception("could not create a sampler for %s", req.request_id)
                self._emit(req, Failed(InternalError(f"could not start generation: {e}")))
                continue
            if not self._running:
                self.last_progress = time.monotonic()  # the stall clock starts with work
            slot, reused = self.cache.take(req.prompt, reuse=req.params.seed is None,
                                           adapters=req.adapters)
            seq = _Sequence(req, slot, sampler, TextAssembler(req.params.stop), n_past=reused)
            if self.speculative_k:
                stats = self.speculation[self.speculative_kind]
                rate = stats.accepted / stats.drafted if stats.drafted else 1.0
                seq.lookup = (AdaptiveLength if self.draft_model is not None else NgramLookup)(
                    self.speculative_k, rate)
            tenants = self._tenants
            seq.hurry = bool(tenants.keys() - {req.tenant}) and tenants.get(req.tenant, 0) < \
                fair_share(self.max_batch_size, len(tenants.keys() | {req.tenant}))
            self._join(seq)
            self._emit(req, Started(time.monotonic() - req.enqueued_at))
        return True

    def _join(self, seq: _Sequence) -> None:
        """A sequence enters the running set (admitted, or resumed)."""
        bisect.insort(self._running, seq, key=_slot_of)
        key, tenant = seq.req.adapters, seq.req.tenant
        self._sets[key] = self._sets.get(key, 0) + 1
        self._tenants[tenant] = self._tenants.get(tenant, 0) + 1

    def _leave(self, seq: _Sequence) -> None:
        """A sequence leaves the running set (finished, failed, or preempted)."""
        self._running.remove(seq)
        key, tenant = seq.req.adapters, seq.req.tenant
        if self._sets[key] > 1:
            self._sets[key] -= 1
        else:
            del self._sets[key]
            self._served.pop(key, None)
        if self._tenants[tenant] > 1:
            self._tenants[tenant] -= 1
        else:
            del self._tenants[tenant]

    def _preempt_for_fair_share(self) -> None:
        """Every slot is taken. If the request admitted next belongs to a tenant below its
        fair share while another tenant holds more than its share, free one slot: the youngest
        sequence (prefilling or decoding) of the most served such tenant, of no higher
        priority than the waiting request, never a seeded one (its cells would be computed
        again in another batch shape, and it must reproduce)."""
        nxt = self._waiting.peek()
        if nxt is None:
            return
        req = _request_of(nxt)
        tenants = self._tenants
        share = fair_share(self.max_batch_size, len(tenants.keys() | {req.tenant}))
        if tenants.get(req.tenant, 0) >= share:
            return
        victims = [s for s in self._running
                   if s.req.tenant != req.tenant
                   and tenants[s.req.tenant] > share and s.req.priority <= req.priority
                   and s.req.params.seed is None]
        if victims:
            self._preempt(max(victims, key=lambda s: (-s.req.priority, tenants[s.req.tenant],
                                                      s.req.enqueued_at)))

    def _preempt(self, seq: _Sequence) -> None:
        self._leave(seq)
        seq.follows = False
        tokens = seq.kv_tokens()
        self.cache.saved_prompt(seq.slot, tokens, True, seq.req.adapters)  # to host RAM
        self.cache.release(seq.slot, tokens, seq.req.adapters)
        if self.draft_model is not None:
            self.draft_model.release(seq.slot)
        seq.slot = -1
        self.preemptions += 1
        self._waiting.put_front(_Parked(seq))

    def _resume(self, seq: _Sequence) -> None:
        """A preempted sequence is admitted again. One preempted while prefilling goes on with
        its prompt from what the cache still holds; one that had sampled (DECODE, or RESUME
        again) decodes its prompt and generated tokens from there, then goes on with its
        sampled next token."""
        req = seq.req
        if req.cancelled.is_set():
            self.observer.on_finish(req, len(req.prompt), seq.completion_tokens)
            self.backend.free_sampler(seq.sampler)
            seq.state = DONE
            self._emit(req, Finished("cancelled", len(req.prompt), seq.completion_tokens))
            return
        if seq.state is PREFILL:
            seq.slot, seq.n_past = self.cache.take(req.prompt, adapters=req.adapters)
        else:
            seq.resume = list(req.prompt) + seq.generated
            seq.slot, seq.n_past = self.cache.take(seq.resume, adapters=req.adapters)
            seq.state = RESUME
        self._join(seq)

    def _step(self) -> None:
        for seq in [s for s in self._running if s.req.cancelled.is_set()]:
            self._finish(seq, "cancelled")
        if not self._running:
            return
        if any(s.state is PREFILL for s in self._running):
            self._share_prefixes()
        group = self._group()
        try:
            self._use_adapters(group[0].req.adapters)
        except Exception as e:
            log.exception("could not set the adapters of %d sequences", len(group))
            for seq in group:
                self._fail(seq, InternalError(f"could not set the adapters: {e}"))
            return
        drafts = self._drafts(group) if self.speculative_k else None
        batch = build_batch(group, self.backend.n_batch, self.prefill_budget(), drafts,
                            alone_ok=not self._alone_last)
        self._alone_last = batch.alone
        # KV cells in use, from our own bookkeeping (asking llama.cpp per sequence each step
        # cost a measurable share of a 7 ms step).
        kv_tokens = sum(s.n_past for s in self._running) + self.cache.cached_tokens()
        self.observer.on_step(len(self._running), len(batch.tokens), self.queued, kv_tokens)
        started = time.perf_counter()
        try:
            self.backend.decode(batch.tokens, batch.pos, batch.seqs, batch.logits)
        except Exception as e:
            log.exception("llama_decode failed for a batch of %d tokens", len(batch.tokens))
            for seq, _ in batch.advance:
                self._fail(seq, InternalError(f"decode failed: {e}"))
            return
        finally:
            self.last_progress = time.monotonic()
        n = len(batch.tokens)
        drafted = sum(len(d) for _, _, d in batch.drafts) if batch.drafts else 0
        if n > len(batch.sample) + drafted:  # prompt tokens in it: learn their cost
            per_token = (time.perf_counter() - started) / n
            self._token_s = per_token if self._token_s is None else (
                0.7 * self._token_s + 0.3 * per_token)
        elif self.speculative_k:  # what a draft token costs here (StepCost)
            self.step_cost.observe(n, time.perf_counter() - started)
        self.steps += 1
        self._apply(batch)

    def _drafts(self, group: list[_Sequence]) -> dict[int, list[int]] | None:
        """This step's drafts (by ``id`` of the sequence). Drafts take the batch room of the
        free slots, ``speculative_k`` tokens per free slot: a sequence's draft costs about
        what another sequence's token would, so with every slot taken (the batch full: the
        device busy with real tokens) nobody drafts, and the fewer sequences run, the more
        room the drafts have. Within that, each sequence's draft is as long as its own
        acceptance allows (AdaptiveLength); with prompt lookup, only where its n-gram occurred
        before; with a draft model, what that model predicts (all drafting sequences in the
        same few decodes of the draft context)."""
        room = min((self.max_batch_size - len(self._running)) * self.speculative_k,
                   self.backend.n_batch - len(group))
        if room <= 0:
            return None
        drafts: dict[int, list[int]] = {}
        wants: list[tuple[_Sequence, int]] = []
        share = self.step_cost.token_share(len(group), self.draft_model is not None)
        for seq in group:
            lookup = seq.lookup
            if lookup is None or seq.state is not DECODE:
                continue
            # The last drafted position must stay inside the sequence's context, and a draft
            # of n tokens yields n + 1 tokens at most: none past max_tokens.
            limit = min(room, self.context_size - seq.n_past - 2,
                        seq.req.params.max_tokens - seq.completion_tokens - 1)
            if limit <= 0:
                continue
            if isinstance(lookup, NgramLookup):
                lookup.sync(seq.req.prompt, seq.generated)
                draft = lookup.draft(seq.next_token, limit, share)
            else:
                n = lookup.length(limit, share)
                if n:
                    wants.append((seq, n))
                draft = [0] * n  # room held for the draft model's tokens
            if draft:
                drafts[id(seq)] = draft
                room -= len(draft)
                if room <= 0:
                    break
        if wants:
            self._draft_with_model(wants, drafts)
        return drafts

    def _draft_with_model(self, wants: list[tuple[_Sequence, int]],
                          drafts: dict[int, list[int]]) -> None:
        """The draft model's drafts for ``wants`` (sequence, most tokens) into ``drafts``; a
        sequence whose draft model has not caught up with it yet drafts nothing this step. A
        failing draft model costs this step's drafts, never a request."""
        assert self.draft_model is not None
        try:
            out = self.draft_model.draft([(s.slot, [*s.req.prompt, *s.generated, s.next_token], n)
                                          for s, n in wants])
            rounds, seconds = self.draft_model.rounds_timed
            if rounds:  # a one-token draft has none: its decode is mostly catch-up
                self.step_cost.observe_draft(rounds, seconds)
        except Exception:
            log.exception("the draft model failed; this step goes without drafts")
            self.draft_model.reset()
            out = [[] for _ in wants]
        for (seq, _), draft in zip(wants, out, strict=True):
            if draft:
                drafts[id(seq)] = draft
            else:
                del drafts[id(seq)]

    def _group(self) -> list[_Sequence]:
        """The running sequences this step decodes: all of them when they share one adapter
        set (always without adapters: nothing but a dict's length is read), else those of the
        set decoded longest ago (in order of arrival among sets never decoded). Each set gets a
        step at least once per as many steps as there are sets: none waits forever."""
        if len(self._sets) == 1:
            return self._running
        served = self._served
        turn = min(self._sets, key=lambda k: served.get(k, -1))
        self._turns += 1
        served[turn] = self._turns
        return [s for s in self._running if s.req.adapters == turn]

    def _use_adapters(self, adapters: tuple) -> None:
        if adapters != self._adapters:
            self._adapters = None  # unknown while the backend changes it
            self.backend.set_adapters(adapters)
            self._adapters = adapters
            self.adapter_switches += 1

    def _share_prefixes(self) -> None:
        """Running sequences whose prompts start the same way (a shared system prompt, the
        same question from many clients) compute that prefix once: a prefilling sequence
        takes another's cells that hold more of its prompt than its own (SlotCache.share),
        and while one of them is still prefilling the common part the others wait for it
        instead of computing it too. Prompts are grouped by their first SHARE_MIN tokens, so
        the cost is linear in the running sequences. Seeded requests take no part (their
        cells must come from their own prefill to reproduce)."""
        groups: dict[tuple, list[_Sequence]] = {}
        for s in self._running:
            s.follows = False
            p = s.req.prompt
            if len(p) > SHARE_MIN and s.req.params.seed is None:
                # Cells computed under one adapter set serve that set only.
                groups.setdefault((s.req.adapters, *p[:SHARE_MIN]), []).append(s)
        for members in groups.values():
            if len(members) < 2:
                continue
            for f in members:
                if f.state is not PREFILL:
                    continue
                limit = len(f.req.prompt) - 1  # at least one token left for its logits
                donor, best = None, f.n_past
                # The most advanced first; a few at most (each comparison walks the prefix).
                for d in sorted(members, key=_n_past, reverse=True)[:SHARE_CANDIDATES]:
                    if d is f or d.n_past <= best:
                        continue
                    n = min(d.shared_with(f.req.prompt), limit)
                    if n > best:
                        donor, best = d, n
                if donor is not None and best - f.n_past >= SHARE_MIN and \
                        self.cache.share(donor.slot, f.slot, best):
                    f.n_past = best
            # One leader prefills what the group has in common; the others wait for it.
            prefilling = [m for m in members if m.state is PREFILL]
            if len(prefilling) < 2:
                continue
            leader = max(prefilling, key=lambda m: (m.n_past, -m.slot))
            for f in prefilling:
                if f is not leader:
                    common = min(shared_prefix(leader.req.prompt, f.req.prompt),
                                 len(f.req.prompt) - 1)
                    f.follows = common - f.n_past >= SHARE_MIN and leader.n_past < common

    def _apply(self, batch: Batch) -> None:
        """The batch is in the KV cache: advance its sequences, then sample every sequence
        that asked for logits at once (each moves to DECODE, or finishes)."""
        for seq, n in batch.advance:
            seq.n_past += n
            if seq.state is DECODE:
                seq.generated.append(seq.next_token)
            elif seq.state is RESUME and seq.n_past == len(seq.resume):
                seq.state, seq.resume = DECODE, None
        if not batch.sample:
            return
        now = 0.0
        for seq, _ in batch.sample:
            if seq.state is PREFILL:
                now = now or time.monotonic()
                seq.req.prefilled_at = now
                self.cache.saved_prompt(seq.slot, seq.req.prompt, seq.req.params.seed is None,
                                        seq.req.adapters)
        first: list[GenerationRequest] = []
        later: list[GenerationRequest] = []
        self._sample(batch.sample, first, later)
        if batch.drafts:
            self._verify(batch.drafts, first, later)
        if first:
            now = time.monotonic()
            for req in first:
                req.first_token_at = now
        if first or later:
            self.observer.on_tokens(first, later)

    def _sample(self, rows: list[tuple[_Sequence, int]], first: list[GenerationRequest],
                later: list[GenerationRequest]) -> None:
        """Sample each sequence at its batch index, all at once, and accept the tokens."""
        try:
            tokens = self.backend.sample_batch([s.sampler for s, _ in rows],
                                               [i for _, i in rows])
        except Exception:
            log.exception("batched sampling failed; sampling the %d sequences one by one",
                          len(rows))
            tokens = [self._sample_one(seq, index) for seq, index in rows]
        for (seq, index), token in zip(rows, tokens, strict=True):
            if token is not None:
                self._accept(seq, index, token, first, later)

    def _verify(self, drafts: list[tuple[_Sequence, int, list[int]]],
                first: list[GenerationRequest], later: list[GenerationRequest]) -> None:
        """Speculation: each draft was decoded behind its sequence's next token, and that
        token's row was sampled with the others (``_apply``). While the token sampled equals
        the draft's next one, that draft token is the sequence's own (its cells are in the
        cache): the sequence takes it and samples the row after it. Rounds of one row per
        sequence, so a sampler sees its tokens in order (penalties, grammar) and samples only
        what is emitted: greedy output is unchanged, sampled output keeps its distribution,
        and stop strings, max_tokens and end-of-generation end a sequence inside a draft
        exactly as they would outside. Then the rejected positions' cells are dropped, so the
        caches (slots, host prompt cache, shared prefixes, a preempted sequence) only ever see
        accepted tokens."""
        ends = [seq.n_past + len(draft) for seq, _, draft in drafts]  # cells written
        live = drafts
        j = 0
        while live:
            live = [(seq, index, draft) for seq, index, draft in live
                    if j < len(draft) and seq.state is DECODE and seq.next_token == draft[j]]
            for seq, _, draft in live:
                seq.generated.append(draft[j])
                seq.n_past += 1
            j += 1
            if live:
                self._sample([(seq, index + j) for seq, index, _ in live], first, later)
        stats = self.speculation[self.speculative_kind]
        for (seq, _, draft), end in zip(drafts, ends, strict=True):
            accepted = len(draft) - (end - seq.n_past)
            stats.drafted += len(draft)
            stats.accepted += accepted
            if seq.lookup is not None:
                seq.lookup.verified(len(draft), accepted)
            if seq.state is DONE or seq.n_past == end:
                # A finished sequence's slot is trimmed when it is taken again
                # (SlotCache.take keeps only what its tokens share with the new prompt).
                continue
            if not self.backend.trim_sequence(seq.slot, seq.n_past):
                # The cache could not drop just the rejected cells (a sliding window moved
                # past what is left): decode the sequence again, without speculation.
                log.warning("KV rollback failed for %s; decoding it again without "
                            "speculation", seq.req.request_id)
                self.backend.clear_sequence(seq.slot)
                seq.resume = list(seq.req.prompt) + seq.generated
                seq.n_past, seq.state, seq.lookup = 0, RESUME, None

    def _sample_one(self, seq: _Sequence, index: int) -> int | None:
        """One sequence alone (after a failed batch): a failure fails this sequence only."""
        try:
            return self.backend.sample(seq.sampler, index)
        except Exception as e:
            log.exception("sampling failed for %s", seq.req.request_id)
            self._fail(seq, InternalError(f"sampling failed: {e}"))
            return None

    def _accept(self, seq: _Sequence, index: int, token: int, first: list[GenerationRequest],
                later: list[GenerationRequest]) -> None:
        try:
            if self.backend.is_eog(token) and not seq.req.params.ignore_eos:
                self._finish(seq, "stop")
                return
            seq.completion_tokens += 1
            if not seq.started:
                seq.started = True
                first.append(seq.req)
            else:
                later.append(seq.req)
            top = seq.req.params.logprobs
            lp = () if top is None else (self.backend.logprob(index, token, top),)
            text, hit_stop = seq.text.feed(self.backend.token_bytes(token))
            if text or lp:
                if seq.req.stream:
                    self._emit(seq.req, TextDelta(text, lp))
                else:
                    seq.held.append(TextDelta(text, lp))
            if hit_stop:
                self._finish(seq, "stop", flush=False, stop=seq.text.matched)
            elif seq.completion_tokens >= seq.req.params.max_tokens:
                self._finish(seq, "length")
            elif seq.n_past + 1 >= self.context_size:
                self._finish(seq, "length")
            else:
                seq.next_token = token
                seq.state = DECODE
        except Exception as e:
            log.exception("sampling failed for %s", seq.req.request_id)
            self._fail(seq, InternalError(f"sampling failed: {e}"))

    def _release(self, seq: _Sequence, keep_cache: bool = False) -> None:
        seq.state = DONE
        self._leave(seq)
        key = seq.req.adapters
        self.observer.on_finish(seq.req, len(seq.req.prompt), seq.completion_tokens)
        try:
            if self.draft_model is not None:
                self.draft_model.release(seq.slot)
            self.cache.release(seq.slot, seq.kv_tokens() if keep_cache else None, key)
        finally:
            self.backend.free_sampler(seq.sampler)

    def _finish(self, seq: _Sequence, reason: str, flush: bool = True,
                stop: str | None = None) -> None:
        self._release(seq, keep_cache=reason != "cancelled")
        if flush and reason != "cancelled":
            tail = seq.text.flush()
            if tail:
                seq.held.append(TextDelta(tail))
        if seq.held and reason != "cancelled":
            if seq.req.stream:  # only the tail
                events = seq.held
            else:  # the whole answer in one delta
                events = [TextDelta("".join(d.text for d in seq.held),
                                    tuple(lp for d in seq.held for lp in d.logprobs))]
            for event in events:
                self._emit(seq.req, event)
        self._emit(seq.req, Finished(reason, len(seq.req.prompt), seq.completion_tokens, stop))

    def _fail(self, seq: _Sequence, err: LlamafleetError) -> None:
        self._release(seq)
        self._emit(seq.req, Failed(err))

    def _emit(self, req: GenerationRequest, event: Event) -> None:
        self._outbox.append((req, event))

    def _drain(self) -> None:
        """On shutdown, every request still known gets a final event."""
        for seq in list(self._running):
            self._fail(seq, Overloaded("The server is shutting down."))
        while True:
            try:
                req = self._waiting.get_nowait()
            except queue.Empty:
                break
            if isinstance(req, _Parked):
                seq = req.seq
                self.observer.on_finish(seq.req, len(seq.req.prompt), seq.completion_tokens)
                self.backend.free_sampler(seq.sampler)
                req = seq.req
            if isinstance(req, GenerationRequest):
                self._emit(req, Failed(Overloaded("The server is shutting down.")))


@dataclass(eq=False)
class _Parked:
    """A preempted sequence waiting to be admitted again."""

    seq: _Sequence


def _request_of(item: GenerationRequest | _Parked) -> GenerationRequest:
    return item.seq.req if isinstance(item, _Parked) else item


def _classify(item: object) -> tuple[int, str] | None:
    """A waiting item's (priority, tenant) for the FairQueue; None: a control item."""
    if isinstance(item, GenerationRequest | _Parked):
        req = _request_of(item)
        return req.priority, req.tenant
    return None


_WAKE = object()  # put in the waiting queue by Engine.call: the engine thread has work
MIN_PREFILL_CHUNK = 16  # prompt tokens a step always carries, however slow the hardware
SHARE_MIN = 32  # prompt tokens in common from which running sequences share their cells
SHARE_CANDIDATES = 4  # sequences a prefilling one compares itself with, the most advanced


def _slot_of(seq: _Sequence) -> int:
    return seq.slot


def _n_past(seq: _Sequence) -> int:
    return seq.n_past


def deliver_each(events: list[tuple[GenerationRequest, Event]]) -> None:
    """Hand each event to its request's sink; a failing sink cancels its request only."""
    for req, event in events:
        try:
            req.sink(event)
        except Exception:
            log.warning("dropping events for %s: its consumer failed", req.request_id,
                        exc_info=True)
            req.cancel()
