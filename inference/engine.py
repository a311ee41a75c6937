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
``DECODE`` (a sampled token waits to be decoded) or ``DONE`` (finished; its slot is free).

The model sits behind the small :class:`Backend` protocol so the scheduler can be
tested with a fake; :mod:`llamafleet.inference.llama_backend` is the real one.
"""

from __future__ import annotations

import codecs
import enum
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from llamafleet.common.errors import BadRequest, ContextTooLong, InternalError, LlamafleetError, Overloaded

from .prompt_cache import PromptCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
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
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)

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


class EngineObserver(Protocol):
    """Hooks for metrics; every method is called on the engine thread."""

    def on_step(self, running: int, batch_tokens: int, queued: int, kv_tokens: int) -> None: ...

    def on_first_token(self, req: GenerationRequest) -> None: ...

    def on_token(self, req: GenerationRequest) -> None: ...

    def on_finish(self, req: GenerationRequest) -> None: ...


class _NullObserver:
    def on_step(self, running: int, batch_tokens: int, queued: int, kv_tokens: int) -> None:
        pass

    def on_first_token(self, req: GenerationRequest) -> None:
        pass

    def on_token(self, req: GenerationRequest) -> None:
        pass

    def on_finish(self, req: GenerationRequest) -> None:
        pass


class TextAssembler:
    """Bytes of tokens in, safe text out.

    Holds back incomplete UTF-8 sequences (the codec does this) and any tail that could
    still become a stop string, so a stop string is never streamed in part.
    """

    def __init__(self, stop: Sequence[str]):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._pending = ""

    def feed(self, data: bytes) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        self._pending += self._decoder.decode(data)
        # The earliest stop string in the text wins, whatever its place in the list.
        hits = [at for at in (self._pending.find(s) for s in self._stop) if at >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            return out, True
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
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return out


class State(enum.Enum):
    PREFILL = "prefill"  # prompt tokens from n_past on are not in the KV cache yet
    DECODE = "decode"  # next_token was sampled and goes into the next batch
    DONE = "done"  # finished or failed; the slot is released


PREFILL, DECODE, DONE = State.PREFILL, State.DECODE, State.DONE


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

    def kv_tokens(self) -> list[int]:
        return (list(self.req.prompt) + self.generated)[: self.n_past]


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


PASSED_OVER_MAX = 4  # steps a prefill may get no budget before it goes first


def build_batch(running: Sequence[_Sequence], n_batch: int) -> Batch:
    """Every decoding sequence's next token first, then prompt chunks of prefilling
    sequences, shortest remaining prompt first, until ``n_batch`` tokens. A prefill's last
    chunk asks for logits (for its first sampled token); an earlier chunk does not.

    Shortest first: a request whose prefix came from the cache has a few tokens left to
    prefill, and gets its first token in this step instead of waiting behind another
    request's long prompt (the long one takes what is left of the budget). A prefill left
    without budget counts the step (``passed_over``); after PASSED_OVER_MAX such steps it
    goes first."""
    b = Batch()
    for seq in running:
        if seq.state is DECODE:
            b.sample.append((seq, len(b.tokens)))
            b.advance.append((seq, 1))
            b.tokens.append(seq.next_token)
            b.pos.append(seq.n_past)
            b.seqs.append(seq.slot)
            b.logits.append(True)
    budget = n_batch - len(b.tokens)
    # Shortest first, except that a prompt passed over PASSED_OVER_MAX steps in a row goes
    # first: a stream of short prompts never starves a long one.
    prefilling = sorted((s for s in running if s.state is PREFILL),
                        key=lambda s: (s.passed_over < PASSED_OVER_MAX,
                                       len(s.req.prompt) - s.n_past))
    for seq in prefilling:
        if budget <= 0:
            seq.passed_over += 1
            continue
        seq.passed_over = 0
        start = seq.n_past
        take = min(budget, len(seq.req.prompt) - start)
        last = start + take == len(seq.req.prompt)
        b.tokens.extend(seq.req.prompt[start : start + take])
        b.pos.extend(range(start, start + take))
        b.seqs.extend([seq.slot] * take)
        b.logits.extend([False] * (take - 1))
        b.logits.append(last)
        b.advance.append((seq, take))
        if last:
            b.sample.append((seq, len(b.tokens) - 1))
        budget -= take
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
    ):
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if max_batch_size > backend.n_batch:
            # Every running sequence puts a token into each step's batch, and the batch
            # holds n_batch tokens: more would write past llama_batch's arrays.
            raise ValueError(f"max_batch_size ({max_batch_size}) must not exceed n_batch "
                             f"({backend.n_batch})")
        self.backend = backend
        self.max_batch_size = max_batch_size
        self.context_size = context_size
        self.queue_size = queue_size
        self.observer: EngineObserver = observer or _NullObserver()
        # Room for queue_size waiting requests beyond the free slots, and stop()'s None.
        self._waiting: queue.Queue[GenerationRequest | None] = queue.Queue(
            maxsize=queue_size + max_batch_size + 1)
        self._admit_lock = threading.Lock()
        self._free_slots = list(range(max_batch_size - 1, -1, -1))
        # Prefix cache: what a free slot's KV cells still hold, so a new request that
        # starts the same way (a shared system prompt, a chat's earlier turns) skips that
        # part of the prefill.
        self._cached: dict[int, list[int]] = {}
        self.prefix_tokens_reused = 0
        # ...and beyond the slots, in host RAM (prompt_cache.py); the backend then needs
        # save_sequence / restore_sequence.
        self.prompt_cache = prompt_cache
        self.prompt_cache_restores = 0
        self._running: list[_Sequence] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
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
            limit = self.queue_size + len(self._free_slots)
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

    def _purge_cancelled(self) -> None:
        """Drop waiting requests whose clients have gone, so that they stop counting
        against queue_size (a retry storm would otherwise turn live clients away)."""
        q = self._waiting
        with q.mutex:  # queue.Queue's own lock over its deque
            gone = [r for r in q.queue if r is not None and r.cancelled.is_set()]
            if not gone:
                return
            q.queue = type(q.queue)(r for r in q.queue if r is None or not r.cancelled.is_set())
            q.not_full.notify_all()
        for req in gone:
            self._emit(req, Finished("cancelled", len(req.prompt), 0))

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
                if not self._admit(block=not self._running):
                    break
                if self._running:
                    self._step()
        except BaseException:  # pragma: no cover - a bug in the scheduler itself
            log.exception("engine thread crashed")
            raise
        finally:
            self.alive = False
            self._drain()

    def _admit(self, block: bool) -> bool:
        """Move waiting requests into free slots. False when asked to stop."""
        while self._free_slots:
            try:
                req = self._waiting.get(block=block)
            except queue.Empty:
                return True
            block = False
            if req is None:
                return False
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
            slot, reused = self._take_slot(req)
            seq = _Sequence(req, slot, sampler, TextAssembler(req.params.stop), n_past=reused)
            self._running.append(seq)
            self._emit(req, Started(time.monotonic() - req.enqueued_at))
        return True

    def _take_slot(self, req: GenerationRequest) -> tuple[int, int]:
        """A free slot, preferring the one whose cached tokens share the longest prefix with
        the prompt; returns (slot, tokens reused). Seeded requests start from scratch: reused
        cells were computed in another batch shape, and llama.cpp's kernels are not
        batch-invariant, so only a full prefill reproduces a seeded request exactly."""
        best, best_len = self._free_slots[-1], 0
        reuse, from_slot = req.params.seed is None, False
        if reuse:
            for slot in self._free_slots:
                cached = self._cached.get(slot, ())
                n = 0
                for a, b in zip(cached, req.prompt, strict=False):
                    if a != b:
                        break
                    n += 1
                if n > best_len:
                    best, best_len = slot, n
            restores = self.prompt_cache_restores
            best, best_len = self._restore_if_longer(req.prompt, best, best_len)
            from_slot = self.prompt_cache_restores == restores
        self._free_slots.remove(best)
        keep = self._keep(best, best_len, len(req.prompt))
        if reuse and from_slot and best_len and not keep:
            # The slot's tokens matched but its cells no longer serve them (a sliding
            # window moved past the prefix while it generated): the host prompt cache holds
            # the prefix as it was right after its prefill.
            best, shared = self._restore_if_longer(req.prompt, best, 0, into=best)
            keep = self._keep(best, shared, len(req.prompt))
        self.prefix_tokens_reused += keep
        return best, keep

    def _keep(self, slot: int, matched: int, prompt_len: int) -> int:
        """Keeps the slot's first ``matched`` cells for a prompt when they still serve it,
        else clears the slot; returns the tokens kept."""
        cached = self._cached.pop(slot, ())
        keep = min(matched, prompt_len - 1)  # re-decode at least one token for logits
        # trim_sequence also says whether what is left still serves the prompt (a sliding
        # window may have been overwritten): if not, a full prefill.
        if keep <= 0 or not self.backend.trim_sequence(slot, keep):
            if cached:
                self.backend.clear_sequence(slot)
            keep = 0
        return keep

    def _restore_if_longer(self, prompt: Sequence[int], best: int, best_len: int,
                           into: int | None = None) -> tuple[int, int]:
        """When the host prompt cache shares more of the prompt than any free slot, copy
        that state into a free slot (``into``, else an empty one if any) and use it."""
        entry = self.prompt_cache.longest(prompt) if self.prompt_cache is not None else None
        if entry is None or entry[2] <= best_len:
            return best, best_len
        tokens, state, shared = entry
        if into is None:
            empty = [s for s in self._free_slots if not self._cached.get(s)]
            into = empty[0] if empty else best
        self._cached.pop(into, None)
        if not self.backend.restore_sequence(into, state):  # type: ignore[attr-defined]
            return into, 0
        self._cached[into] = list(tokens)
        self.prompt_cache_restores += 1
        return into, shared

    def _save_prompt(self, seq: _Sequence) -> None:
        """Right after its prefill the sequence's cells hold exactly its prompt: keep a copy
        in the host prompt cache (seeded requests never reuse cells, so never saved)."""
        cache, prompt = self.prompt_cache, seq.req.prompt
        if cache is None or seq.req.params.seed is not None or not cache.wants(prompt):
            return
        cache.put(prompt, self.backend.save_sequence(seq.slot))  # type: ignore[attr-defined]

    def _step(self) -> None:
        for seq in [s for s in self._running if s.req.cancelled.is_set()]:
            self._finish(seq, "cancelled")
        if not self._running:
            return
        batch = build_batch(self._running, self.backend.n_batch)
        # KV cells in use, from our own bookkeeping (asking llama.cpp per sequence each step
        # cost a measurable share of a 7 ms step).
        kv_tokens = sum(s.n_past for s in self._running) + sum(map(len, self._cached.values()))
        self.observer.on_step(len(self._running), len(batch.tokens), self.queued, kv_tokens)
        try:
            self.backend.decode(batch.tokens, batch.pos, batch.seqs, batch.logits)
        except Exception as e:
            log.exception("llama_decode failed for a batch of %d tokens", len(batch.tokens))
            for seq, _ in batch.advance:
                self._fail(seq, InternalError(f"decode failed: {e}"))
            return
        finally:
            self.last_progress = time.monotonic()
        self.steps += 1
        self._apply(batch)

    def _apply(self, batch: Batch) -> None:
        """The batch is in the KV cache: advance its sequences, then sample those that
        asked for logits (each moves to DECODE, or finishes)."""
        for seq, n in batch.advance:
            seq.n_past += n
            if seq.state is DECODE:
                seq.generated.append(seq.next_token)
        for seq, index in batch.sample:
            self._accept(seq, index)

    def _accept(self, seq: _Sequence, index: int) -> None:
        try:
            if seq.state is PREFILL:
                self._save_prompt(seq)
            token = self.backend.sample(seq.sampler, index)
            if self.backend.is_eog(token) and not seq.req.params.ignore_eos:
                self._finish(seq, "stop")
                return
            seq.completion_tokens += 1
            if not seq.started:
                seq.started = True
                self.observer.on_first_token(seq.req)
            else:
                self.observer.on_token(seq.req)
            top = seq.req.params.logprobs
            lp = () if top is None else (self.backend.logprob(index, token, top),)
            text, hit_stop = seq.text.feed(self.backend.token_bytes(token))
            if text or lp:
                self._emit(seq.req, TextDelta(text, lp))
            if hit_stop:
                self._finish(seq, "stop", flush=False)
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
        self._running.remove(seq)
        self.observer.on_finish(seq.req)
        try:
            if keep_cache:
                self._cached[seq.slot] = seq.kv_tokens()
            else:
                self.backend.clear_sequence(seq.slot)
            self.backend.free_sampler(seq.sampler)
        finally:
            self._free_slots.append(seq.slot)

    def _finish(self, seq: _Sequence, reason: str, flush: bool = True) -> None:
        self._release(seq, keep_cache=reason != "cancelled")
        if flush and reason != "cancelled":
            tail = seq.text.flush()
            if tail:
                self._emit(seq.req, TextDelta(tail))
        self._emit(seq.req, Finished(reason, len(seq.req.prompt), seq.completion_tokens))

    def _fail(self, seq: _Sequence, err: LlamafleetError) -> None:
        self._release(seq)
        self._emit(seq.req, Failed(err))

    def _emit(self, req: GenerationRequest, event: Event) -> None:
        try:
            req.sink(event)
        except Exception:
            log.warning("dropping events for %s: its consumer failed", req.request_id, exc_info=True)
            req.cancel()

    def _drain(self) -> None:
        """On shutdown, every request still known gets a final event."""
        for seq in list(self._running):
            self._fail(seq, Overloaded("The server is shutting down."))
        while True:
            try:
                req = self._waiting.get_nowait()
            except queue.Empty:
                break
            if req is not None:
                self._emit(req, Failed(Overloaded("The server is shutting down.")))

