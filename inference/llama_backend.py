"""The real model boundary: llama.cpp through llama-cpp-python's C API.

We drive the C API (``llama_batch``, sequences, sampler chains) rather than the
``Llama`` class because that class owns one sequence and one sampler; continuous
batching needs many of each on one context.
"""

from __future__ import annotations

import ctypes
import logging
import random
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import _internals
from llama_cpp import llama_cpp as C
from llamafleet.common.errors import BadRequest, ModelError

from .engine import SamplingParams, TokenLogprob
from .model import ModelShape, model_shape

log = logging.getLogger(__name__)

KV_TYPES = {"f16": 1, "f32": 0, "q8_0": 8}  # ggml_type ids

# llama.cpp logs through one process-wide callback; route it into Python logging (JSON in
# production) instead of raw stderr. The ctypes callback must stay referenced, so it lives
# at module level. Info chatter is debug here; warnings and errors keep their level.
_llama_log = logging.getLogger("llama.cpp")
_LEVELS = {2: logging.WARNING, 3: logging.ERROR}


@C.llama_log_callback
def _forward_llama_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    lvl = _LEVELS.get(level, logging.DEBUG)
    if _llama_log.isEnabledFor(lvl):
        _llama_log.log(lvl, "%s", text.decode("utf-8", "replace").rstrip())


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
        return bool(C.llama_vocab_is_eog(self.vocab, token))

    def grammar_ok(self, grammar: str) -> bool:
        """Whether llama.cpp accepts a GBNF grammar (parsed and freed; any thread)."""
        g = C.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if not g:
            return False
        C.llama_sampler_free(g)
        return True

    def close(self) -> None:
        self._model.close()


PENALTY_LAST_N = 64  # tokens of history the penalties look at (llama.cpp's default)


@dataclass(eq=False)
class Penalties:
    """Repeat / frequency / presence penalties over the last ``PENALTY_LAST_N`` generated
    tokens, with llama.cpp's exact arithmetic (float32; a positive logit is divided by the
    repeat penalty, a negative one multiplied).

    Why not ``llama_sampler_init_penalties``: it looks every vocabulary entry up in its
    history map, about 0.8 ms per token for Gemma's 262k vocabulary, which at 4 streams
    cost 3 ms of every 37 ms step. Here only the tokens in the history are touched, in
    place in the logits row, before the chain runs, so the chain sees the same numbers.
    """

    repeat: np.float32
    frequency: np.float32
    presence: np.float32
    history: deque[int] = field(default_factory=lambda: deque(maxlen=PENALTY_LAST_N))

    def apply(self, logits: np.ndarray) -> None:
        if not self.history:
            return
        counts = Counter(self.history)
        ids = np.fromiter(counts.keys(), dtype=np.intp, count=len(counts))
        n = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
        row = logits[ids]
        row = np.where(row <= 0, row * self.repeat, row / self.repeat)
        logits[ids] = row - (n * self.frequency + self.presence)


@dataclass(eq=False)
class Sampler:
    chain: ctypes.c_void_p
    penalties: Penalties | None = None


class LlamaBackend:
    """One llama_context with ``n_seq_max`` sequences; used only by the engine thread."""

    def __init__(self, model: LlamaModel, *, n_seq: int, context_size: int, n_batch: int,
                 threads: int, kv_cache_type: str = "f16", swa_full: bool = False):
        self.model = model
        self.n_batch = n_batch
        params = C.llama_context_default_params()
        params.n_ctx = context_size * n_seq
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = n_seq
        params.n_threads = threads
        params.n_threads_batch = threads
        params.type_k = KV_TYPES[kv_cache_type]
        params.type_v = KV_TYPES[kv_cache_type]
        # One KV buffer shared by all sequences: one attention pass per step over mixed
        # decode + prefill rows (split per-sequence streams make llama.cpp cut such a batch
        # into several equal-length ubatches). Measured here, 4 streams, Gemma 270M, 2 cores:
        # 103.7 tok/s unified vs 87.5 split end to end (before the kernel patch); pure decode
        # steps cost the same either way (12.0 vs 11.8 ms with it).
        params.kv_unified = True
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
        self._batch = C.llama_batch_init(n_batch, 0, 1)
        # Sliding-window attention span (Gemma 3: 512); 0 for models without one.
        self.n_swa = C.llama_model_n_swa(model.ptr)

    def new_sampler(self, p: SamplingParams) -> Sampler:
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        add = lambda s: C.llama_sampler_chain_add(chain, s)  # noqa: E731
        if p.grammar:
            g = C.llama_sampler_init_grammar(self.model.vocab, p.grammar.encode(), b"root")
            if not g:
                C.llama_sampler_free(chain)
                raise BadRequest("invalid grammar", param="response_format")
            add(g)
        penalties = None
        if p.repeat_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
            penalties = Penalties(np.float32(p.repeat_penalty), np.float32(p.frequency_penalty),
                                  np.float32(p.presence_penalty))
        sampler = Sampler(chain, penalties)
        if p.temperature <= 0:
            add(C.llama_sampler_init_greedy())
            return sampler
        if p.top_k > 0:
            add(C.llama_sampler_init_top_k(p.top_k))
        if p.top_p < 1.0:
            add(C.llama_sampler_init_top_p(p.top_p, 1))
        if p.min_p > 0:
            add(C.llama_sampler_init_min_p(p.min_p, 1))
        add(C.llama_sampler_init_temp(p.temperature))
        seed = p.seed if p.seed is not None else random.getrandbits(32)
        add(C.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return sampler

    def free_sampler(self, sampler: Sampler) -> None:
        C.llama_sampler_free(sampler.chain)

    def decode(self, tokens: Sequence[int], pos: Sequence[int], seq: Sequence[int],
               logits: Sequence[bool]) -> None:
        self.fill_batch(tokens, pos, seq, logits)
        self.decode_batch()

    def fill_batch(self, tokens: Sequence[int], pos: Sequence[int], seq: Sequence[int],
                   logits: Sequence[bool]) -> None:
        b = self._batch
        n = len(tokens)
        if n > self.n_batch:  # the llama_batch arrays hold n_batch tokens
            raise ValueError(f"a batch of {n} tokens exceeds n_batch {self.n_batch}")
        b.n_tokens = n
        for i in range(n):
            b.token[i] = tokens[i]
            b.pos[i] = pos[i]
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq[i]
            b.logits[i] = logits[i]

    def decode_batch(self) -> None:
        rc = C.llama_decode(self.ctx, self._batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def synchronize(self) -> None:
        """Wait for the device's queued work (the step profile uses it; a no-op on CPU)."""
        C.llama_synchronize(self.ctx)

    def sample(self, sampler: Sampler, batch_index: int) -> int:
        pen = sampler.penalties
        if pen is not None:
            row = C.llama_get_logits_ith(self.ctx, batch_index)
            pen.apply(np.ctypeslib.as_array(row, shape=(self.model.n_vocab,)))
        token = C.llama_sampler_sample(sampler.chain, self.ctx, batch_index)
        if pen is not None:
            pen.history.append(token)
        return token

    def logprob(self, batch_index: int, token: int, top: int) -> TokenLogprob:
        # The row the chain read: the penalties were applied to it in place, and the chain
        # samples from a copy.
        row = np.ctypeslib.as_array(C.llama_get_logits_ith(self.ctx, batch_index),
                                    shape=(self.model.n_vocab,)).astype(np.float64)
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

    def token_bytes(self, token: int) -> bytes:
        return self.model.token_bytes(token)

    def is_eog(self, token: int) -> bool:
        return self.model.is_eog(token)

    def clear_sequence(self, seq_id: int) -> None:
        C.llama_memory_seq_rm(self._mem, seq_id, -1, -1)

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
        if self._batch is not None:
            C.llama_batch_free(self._batch)
            self._batch = None
        self._ctx.close()
