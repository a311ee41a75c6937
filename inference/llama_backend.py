"""The real model boundary: llama.cpp through llama-cpp-python's C API.

We drive the C API (``llama_batch``, sequences, sampler chains) rather than the
``Llama`` class because that class owns one sequence and one sampler; continuous
batching needs many of each on one context.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import _internals
from llama_cpp import llama_cpp as C
from llamafleet.common.errors import BadRequest, ModelError

from .engine import SamplingParams, TokenLogprob
from .model import ModelShape, model_shape
from .sampler import Sampler, SamplerPool, seed32

log = logging.getLogger(__name__)

KV_TYPES = {"f16": 1, "f32": 0, "q8_0": 8}  # ggml_type ids

# llama.cpp logs through one process-wide callback; route it into Python logging (JSON in
# production) instead of raw stderr. The ctypes callback must stay referenced, so it lives
# at module level. Info chatter is debug here; warnings and errors keep their level.
_llama_log = logging.getLogger("llama.cpp")
_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml_log_level: WARN = 3, ERROR = 4
_capture = threading.local()  # errors llama.cpp logs on this thread (captured_errors)


@C.llama_log_callback
def _forward_llama_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    lvl = _LEVELS.get(level, logging.DEBUG)
    lines = getattr(_capture, "lines", None)
    if lines is not None and lvl == logging.ERROR:
        lines.append(text.decode("utf-8", "replace").strip())
    if _llama_log.isEnabledFor(lvl):
        _llama_log.log(lvl, "%s", text.decode("utf-8", "replace").rstrip())


@contextlib.contextmanager
def captured_errors() -> Iterator[list[str]]:
    """The error lines llama.cpp logs on this thread meanwhile (it reports why a call failed
    only in its log)."""
    _capture.lines = lines = []
    try:
        yield lines
    finally:
        _capture.lines = None


C.llama_log_set(_forward_llama_log, ctypes.c_void_p(0))


def load_backend_modules() -> list[str]:
    """Load ggml's back-end modules when this llama-cpp-python is a portable build.

    A portable build (``scripts/build-llama-cpp-python.sh --portable``, the CPU image) has
    no -march=native: ggml's CPU code comes as one module per x86 variant
    (libggml-cpu-haswell.so, ...-skylakex.so, ...) and ggml loads the one that scores best
    on the CPU at hand, as upstream's own images do. llama-cpp-python never asks ggml to
    load modules, so we do, once, before any model loads. A native build links its
    back-ends in and has no modules: nothing to do. Returns the module files found.
    """
    lib = Path(llama_cpp.__file__).parent / "lib"
    modules = sorted(p.name for p in lib.glob("libggml-*.so")
                     if p.name not in ("libggml-base.so", "libggml.so"))
    if modules:
        # The registry of the libggml that libllama uses: its soname file (libggml.so.0). A
        # wheel stores libggml.so, .so.0 and .so.0.x as separate files, and each one dlopen()ed
        # is a separate library with a registry of its own.
        sonames = sorted(lib.glob("libggml.so.*"), key=lambda p: len(p.name))
        libggml = ctypes.CDLL(str(sonames[0] if sonames else lib / "libggml.so"))
        libggml.ggml_backend_reg_count.restype = ctypes.c_size_t
        if libggml.ggml_backend_reg_count() == 0:  # once per process
            load_all = libggml.ggml_backend_load_all_from_path
            load_all.argtypes, load_all.restype = [ctypes.c_char_p], None
            load_all(str(lib).encode())
    return modules


BACKEND_MODULES = load_backend_modules()

__all__ = ["LlamaModel", "LlamaBackend", "llama_cpp"]


class LlamaModel:
    """Loaded weights + vocabulary. Tokenisation is read-only and safe from any thread."""

    def __init__(self, path: Path, gpu_layers: int):
        params = C.llama_model_default_params()
        # 999 = "all": llama.cpp overflows on INT32_MAX when it adds the output layer.
        params.n_gpu_layers = 999 if gpu_layers < 0 else gpu_layers
        try:
            self._model = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
        except ValueError as e:
            raise ModelError(f"llama.cpp could not load {path}: {e}") from e
        self.path = path
        self.vocab = self._model.vocab
        self.meta = self._model.metadata()
        self.n_vocab = self._model.n_vocab()
        self.shape: ModelShape = model_shape(self.meta, self._model.size())
        self.add_bos = self._model.add_bos_token()
        self.bos_text = self._text(self._model.token_bos())
        self.eos_text = self._text(self._model.token_eos())
        self._piece_cache: dict[int, bytes] = {}
        self._eog_cache: dict[int, bool] = {}

    @property
    def ptr(self):
        return self._model.model

    def _text(self, token: int) -> str:
        return self._model.token_get_text(token) if token >= 0 else ""

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self._model.tokenize(text.encode("utf-8"), add_bos, True)

    def token_bytes(self, token: int) -> bytes:
        piece = self._piece_cache.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = C.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = C.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
            piece = buf.raw[:n]
            self._piece_cache[token] = piece
        return piece

    def is_eog(self, token: int) -> bool:
        eog = self._eog_cache.get(token)
        if eog is None:  # a dict hit costs far less than the ctypes call, every token
            eog = self._eog_cache[token] = bool(C.llama_vocab_is_eog(self.vocab, token))
        return eog

    def grammar_ok(self, grammar: str) -> bool:
        """Whether llama.cpp accepts a GBNF grammar (parsed and freed; any thread)."""
        g = C.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if not g:
            return False
        C.llama_sampler_free(g)
        return True

    def close(self) -> None:
        self._model.close()


KV_LAYOUTS = ("split", "unified")


class LlamaBackend:
    """One llama_context with ``n_seq_max`` sequences; used only by the engine thread."""

    def __init__(self, model: LlamaModel, *, n_seq: int, context_size: int, n_batch: int,
                 threads: int, kv_cache_type: str = "f16", swa_full: bool = False,
                 kv_layout: str = "split", n_ubatch: int | None = None):
        if kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, not {kv_layout!r}")
        self.model = model
        # The model's own (cached) lookups, bound here: the engine calls them for every
        # sequence every step, and a forwarding method is one more Python frame each time.
        self.token_bytes: Callable[[int], bytes] = model.token_bytes
        self.is_eog: Callable[[int], bool] = model.is_eog
        self.n_batch = n_batch
        self.kv_layout = kv_layout
        params = C.llama_context_default_params()
        params.n_ctx = context_size * n_seq
        params.n_batch = n_batch
        params.n_ubatch = n_ubatch or n_batch
        params.n_seq_max = n_seq
        params.n_threads = threads
        params.n_threads_batch = threads
        params.type_k = KV_TYPES[kv_cache_type]
        params.type_v = KV_TYPES[kv_cache_type]
        # "split": one KV stream per sequence (llama-server's default with -np N). A token
        # attends over its own sequence's cells only, so attention grows with batch x own
        # length. "unified": one buffer for all sequences; every token attends over the used
        # cells of all of them (masked), batch x total cells: 4.4x slower at 64 sequences on
        # the random llama of benchmarks/high_concurrency.py. Unified's one advantage is that
        # a batch mixing decode and prefill rows is one ubatch; split streams cut it into
        # equal-length ubatches of consecutive sequence ids (llama_batch_allocr::split_equal),
        # which the engine's batch order and slot choice keep few (see Engine).
        params.kv_unified = kv_layout == "unified"
        # Sliding-window layers keep only their window by default (llama-server does the
        # same). Then a sequence that runs past the window lets llama.cpp overwrite its
        # oldest cells, and a free slot's cached prefix may no longer serve a new prompt
        # (trim_sequence checks); swa_full keeps every position, at the memory of full
        # attention in those layers.
        params.swa_full = swa_full
        params.no_perf = True
        try:
            self._ctx = _internals.LlamaContext(model=model._model, params=params, verbose=False)
        except ValueError as e:
            raise ModelError(
                f"could not create a context of {context_size} tokens x {n_seq} sequences: {e}"
            ) from e
        self.ctx = self._ctx.ctx
        self.n_ctx = C.llama_n_ctx(self.ctx)  # KV cells, all sequences together
        self._mem = C.llama_get_memory(self.ctx)
        self._batch = _Batch(n_batch)
        # Row of llama.cpp's logits matrix for each batch index (-1: no logits asked).
        self._out_row = np.full(n_batch, -1, dtype=np.intp)
        self._n_out = 0
        self._logits_key: tuple[int | None, int] | None = None  # logits(): the view's buffer
        self._logits_view = np.empty((0, model.n_vocab), dtype=np.float32)
        # Sliding-window attention span (Gemma 3: 512); 0 for models without one.
        self.n_swa = C.llama_model_n_swa(model.ptr)
        self.pool = SamplerPool(model.n_vocab, capacity=n_seq + 1)
        self._grammars = 0  # open samplers with a grammar (sample_batch checks them)
        self.grammar_resamples = 0  # grammar rows the free draw broke (sample_batch)
        self._adapters: tuple = ()  # the set on the context (set_adapters)

    # --- LoRA adapters (engine thread: llama.cpp's model keeps a list of its adapters) -----

    def load_adapter(self, path: Path) -> ctypes.c_void_p:
        """A LoRA adapter GGUF for this model, loaded (not yet applied); BadRequest with
        llama.cpp's reason when it refuses the file."""
        with captured_errors() as errors:
            handle = C.llama_adapter_lora_init(self.model.ptr, str(path).encode())
        if not handle:
            why = "; ".join(e.split(": ", 1)[-1] for e in errors) or "see the pod's log"
            raise BadRequest(f"llama.cpp could not load the LoRA adapter {path}: {why}",
                             param="path", code="invalid_adapter")
        return handle

    def free_adapter(self, handle: ctypes.c_void_p) -> None:
        """Frees an adapter that no sequence uses any more (the context forgets it first)."""
        if any(a.handle is handle for a in self._adapters):
            self.set_adapters(())
        C.llama_adapter_lora_free(handle)

    def set_adapters(self, adapters: tuple) -> None:
        """Applies an adapter set to the following decodes: objects with ``handle`` (from
        load_adapter) and ``scale``; () = none. llama.cpp rebuilds its compute graph's
        reservation at each change."""
        n = len(adapters)
        if n:
            handles = (C.llama_adapter_lora_p_ctypes * n)(*(a.handle for a in adapters))
            scales = (ctypes.c_float * n)(*(a.scale for a in adapters))
            rc = C.llama_set_adapters_lora(self.ctx, handles, n, scales)
        else:
            rc = C.llama_set_adapters_lora(self.ctx, None, 0, None)
        if rc != 0:
            raise RuntimeError(f"llama_set_adapters_lora returned {rc}")
        self._adapters = tuple(adapters)

    def new_sampler(self, p: SamplingParams) -> Sampler:
        """A sampler for one sequence. Every request samples in the batched pool
        (sampler.py); a grammar adds a llama.cpp chain (grammar + the same filters) beside it,
        used only when the pool's token breaks the grammar."""
        grammar = None
        if p.grammar:
            grammar = C.llama_sampler_init_grammar(self.model.vocab, p.grammar.encode(), b"root")
            if not grammar:
                raise BadRequest("invalid grammar", param="response_format")
        sampler = self.pool.open(p)
        if grammar is not None:
            chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
            C.llama_sampler_chain_add(chain, grammar)
            if p.temperature <= 0:
                C.llama_sampler_chain_add(chain, C.llama_sampler_init_greedy())
            else:
                if p.top_k > 0:
                    C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_k(p.top_k))
                if p.top_p < 1.0:
                    C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_p(p.top_p, 1))
                if p.min_p > 0:
                    C.llama_sampler_chain_add(chain, C.llama_sampler_init_min_p(p.min_p, 1))
                C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(p.temperature))
                seed = seed32(p.seed) if p.seed is not None else C.LLAMA_DEFAULT_SEED
                C.llama_sampler_chain_add(chain, C.llama_sampler_init_dist(seed))
            sampler.chain, sampler.grammar = chain, grammar
            self._grammars += 1
        return sampler

    def free_sampler(self, sampler: Sampler) -> None:
        if sampler.chain is not None:
            C.llama_sampler_free(sampler.chain)  # frees the grammar with it
            sampler.chain = sampler.grammar = None
            self._grammars -= 1
        self.pool.close(sampler)

    def decode(self, tokens: Sequence[int], pos: Sequence[int], seq: Sequence[int],
               logits: Sequence[bool]) -> None:
        self.fill_batch(tokens, pos, seq, logits)
        self.decode_batch()

    def fill_batch(self, tokens: Sequence[int], pos: Sequence[int], seq: Sequence[int],
                   logits: Sequence[bool]) -> None:
        n = len(tokens)
        if n > self.n_batch:  # the llama_batch arrays hold n_batch tokens
            raise ValueError(f"a batch of {n} tokens exceeds n_batch {self.n_batch}")
        flags = self._batch.fill(tokens, pos, seq, logits)
        counted = np.cumsum(flags, dtype=np.intp)
        self._out_row[:n] = np.where(flags != 0, counted - 1, -1)
        self._n_out = int(counted[-1]) if n else 0

    def decode_batch(self) -> None:
        rc = C.llama_decode(self.ctx, self._batch.batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def synchronize(self) -> None:
        """Wait for the device's queued work (the step profile uses it; a no-op on CPU)."""
        C.llama_synchronize(self.ctx)

    def logits(self) -> np.ndarray:
        """The last decode's logits, one row per batch token that asked for them, in batch
        order (llama.cpp reorders its output buffer to batch order when it is read)."""
        key = (_logits_address(self.ctx), self._n_out)
        if key != self._logits_key:  # the buffer moves only when llama.cpp regrows it
            self._logits_key = key
            n = self._n_out * self.model.n_vocab
            buf = (ctypes.c_float * n).from_address(key[0]) if n else (ctypes.c_float * 0)()
            self._logits_view = np.ctypeslib.as_array(buf).reshape(self._n_out, self.model.n_vocab)
        return self._logits_view

    def sample(self, sampler: Sampler, batch_index: int) -> int:
        return self.sample_batch([sampler], [batch_index])[0]

    def sample_batch(self, samplers: Sequence[Sampler], indices: Sequence[int]) -> list[int]:
        """One token for each sampler from the row at its batch index, all rows together:
        penalties, then the batched draw (sampler.py). A grammar sampler whose drawn token the
        grammar refuses samples again through its llama.cpp chain, grammar first (llama-server's
        common_sampler does the same: checking one token costs little, constraining the whole
        vocabulary costs milliseconds on a 262k vocabulary; greedy output is exactly the
        constrained argmax either way)."""
        pool = self.pool
        logits = self.logits()
        rows = self._out_row[np.asarray(indices, dtype=np.intp)]
        pr = pool.rows_of(samplers)
        pool.penalise(logits, rows, samplers, pr)
        tokens = pool.sample(logits, rows, samplers, pr)
        for i, s in enumerate(samplers if self._grammars else ()):
            if s.grammar is None:
                continue
            if self._grammar_allows(s.grammar, int(tokens[i]), logits[rows[i]]):
                C.llama_sampler_accept(s.chain, int(tokens[i]))
            else:  # the chain reads the same (penalised) row and accepts what it draws
                self.grammar_resamples += 1
                tokens[i] = C.llama_sampler_sample(s.chain, self.ctx, indices[i])
        pool.accept(samplers, tokens, pr)
        return tokens.tolist()

    def argmax(self, batch_indices: Sequence[int]) -> list[int]:
        """The most likely token at each batch index of the last decode, no sampler: a draft
        model's greedy choice (inference/draft_model.py)."""
        rows = self._out_row[np.asarray(batch_indices, dtype=np.intp)]
        return self.logits()[rows].argmax(axis=1).tolist()

    @staticmethod
    def _grammar_allows(grammar: ctypes.c_void_p, token: int, row: np.ndarray) -> bool:
        data = (C.llama_token_data * 1)(C.llama_token_data(token, float(row[token]), 0.0))
        arr = C.llama_token_data_array(data, 1, -1, False)
        C.llama_sampler_apply(grammar, ctypes.byref(arr))
        return bool(np.isfinite(data[0].logit))

    def logprob(self, batch_index: int, token: int, top: int) -> TokenLogprob:
        # The row the sampler read: the penalties were applied to it in place.
        row = self.logits()[self._out_row[batch_index]].astype(np.float64)
        peak = row.max()
        logprobs = row - (peak + np.log(np.exp(row - peak).sum()))
        best = np.argpartition(-logprobs, top)[:top] if top else np.empty(0, dtype=np.intp)
        best = best[np.argsort(-logprobs[best])]
        tb = self.model.token_bytes
        return TokenLogprob(tb(token), float(logprobs[token]),
                            tuple((tb(int(t)), float(logprobs[t])) for t in best))

    def logits_nonfinite(self, batch_index: int) -> int:
        row = C.llama_get_logits_ith(self.ctx, batch_index)
        logits = np.ctypeslib.as_array(row, shape=(self.model.n_vocab,))
        return int(logits.size - np.count_nonzero(np.isfinite(logits)))

    def clear_sequence(self, seq_id: int) -> None:
        C.llama_memory_seq_rm(self._mem, seq_id, -1, -1)

    def copy_sequence(self, src: int, dst: int, keep: int) -> bool:
        """Make ``dst`` hold the first ``keep`` positions of ``src``'s cells; False (and
        ``dst`` empty) if they cannot serve a continuation from ``keep``. In one KV buffer
        the cells are shared (metadata only); across per-sequence streams llama.cpp copies
        the source stream at the next decode (a device copy: a few MiB, far cheaper than
        the prefill it saves)."""
        C.llama_memory_seq_rm(self._mem, dst, -1, -1)
        C.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
        if self.trim_sequence(dst, keep):
            return True
        C.llama_memory_seq_rm(self._mem, dst, -1, -1)
        return False

    def trim_sequence(self, seq_id: int, keep: int) -> bool:
        if not C.llama_memory_seq_rm(self._mem, seq_id, keep, -1):
            return False
        # With swa_full=False the sliding-window layers keep only the last n_swa positions
        # of a sequence; cells that slid out were overwritten. The next token (at `keep`)
        # attends to positions after keep - n_swa, so the cells left must reach back that
        # far and end at keep - 1 (llama-server's guard in server-context.cpp, the same
        # test). Otherwise it would attend to a partial window (wrong text, silently), or
        # llama_decode would refuse the batch.
        lo = C.llama_memory_seq_pos_min(self._mem, seq_id)
        hi = C.llama_memory_seq_pos_max(self._mem, seq_id)
        oldest_needed = max(0, keep - self.n_swa) if self.n_swa else 0
        return hi == keep - 1 and 0 <= lo <= oldest_needed

    def save_sequence(self, seq_id: int) -> bytes:
        """The sequence's KV state, serialized (for the host-RAM prompt cache)."""
        size = C.llama_state_seq_get_size(self.ctx, seq_id)
        buf = (ctypes.c_uint8 * size)()
        written = C.llama_state_seq_get_data(self.ctx, buf, size, seq_id)
        return bytes(memoryview(buf)[:written])

    def restore_sequence(self, seq_id: int, state: bytes) -> bool:
        """Replaces the sequence's cells with a saved state; False if it does not fit."""
        C.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        if C.llama_state_seq_set_data(self.ctx, buf, len(state), seq_id) == 0:
            C.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
            return False
        return True

    def close(self) -> None:
        self._batch = None
        self._ctx.close()


# llama_get_logits as an address (an int): the binding's float pointer costs a ctypes cast per
# step to compare, and logits() only needs to know whether the buffer moved.
_logits_address = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)(("llama_get_logits", C._lib))


class _Batch:
    """A ``llama_batch`` whose columns are numpy arrays we own, filled with whole-array writes.

    ``llama_batch_init`` allocates the columns in C, and filling them through ctypes costs about
    1 µs per token and column; here a step's batch is a few slice assignments. llama.cpp only
    reads the struct during ``llama_decode``; it is never passed to ``llama_batch_free``."""

    def __init__(self, n: int):
        i32 = ctypes.POINTER(ctypes.c_int32)
        self.token = np.zeros(n, np.int32)
        self.pos = np.zeros(n, np.int32)
        self.n_seq_id = np.ones(n, np.int32)
        self.seq = np.zeros(n, np.int32)
        self.logits = np.zeros(n, np.int8)
        base = self.seq.ctypes.data
        self._seq_ptrs = (i32 * n)(*(ctypes.cast(base + 4 * i, i32) for i in range(n)))
        b = C.llama_batch()
        b.n_tokens = 0
        b.token = self.token.ctypes.data_as(i32)
        b.embd = None
        b.pos = self.pos.ctypes.data_as(i32)
        b.n_seq_id = self.n_seq_id.ctypes.data_as(i32)
        b.seq_id = ctypes.cast(self._seq_ptrs, ctypes.POINTER(i32))
        b.logits = self.logits.ctypes.data_as(ctypes.POINTER(ctypes.c_int8))
        self.batch = b

    def fill(self, tokens: Sequence[int], pos: Sequence[int], seq: Sequence[int],
             logits: Sequence[bool]) -> np.ndarray:
        n = len(tokens)
        self.batch.n_tokens = n
        self.token[:n] = tokens
        self.pos[:n] = pos
        self.seq[:n] = seq
        self.logits[:n] = logits
        return self.logits[:n]
