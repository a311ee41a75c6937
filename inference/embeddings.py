"""/v1/embeddings: pooled, L2-normalised vectors from a second llama_context.

Why not batched with the generation engine: embeddings need a context with
``embeddings`` on and a pooling type, and llama.cpp turns that on for a whole context (every
row of a batch), not per sequence; sharing the engine's context would mean switching it per
step and holding up every stream. A context of its own on the same weights costs only its
KV cache (``embeddings_context_size`` tokens), needs no change to the engine's step, and
many inputs of one request go into one llama_decode as separate sequences. It runs on one
dedicated thread with one llama.cpp thread (serving.py says why), one request at a time, so
the event loop never waits on it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
from llama_cpp import _internals
from llama_cpp import llama_cpp as C
from llamafleet.common.errors import BadRequest, InternalError, ModelError

MAX_SEQS = 16  # inputs per llama_decode (llama_context's n_seq_max)
_POOLING = {"mean": C.LLAMA_POOLING_TYPE_MEAN, "last": C.LLAMA_POOLING_TYPE_LAST}


def pooling_type(setting: str, meta: dict[str, str]) -> int:
    """The setting's pooling, or for 'model' the GGUF's own (mean when it has none)."""
    if setting != "model":
        return _POOLING[setting]
    own = meta.get(f"{meta.get('general.architecture', '')}.pooling_type")
    if own is not None and own.isdigit() and int(own) > C.LLAMA_POOLING_TYPE_NONE:
        return int(own)
    return C.LLAMA_POOLING_TYPE_MEAN


class Embedder:
    def __init__(self, model, *, context_size: int, threads: int, pooling: str):
        params = C.llama_context_default_params()
        params.n_ctx = params.n_batch = params.n_ubatch = context_size
        params.n_seq_max = MAX_SEQS
        params.n_threads = params.n_threads_batch = threads
        params.embeddings = True
        params.pooling_type = pooling_type(pooling, model.meta)
        params.kv_unified = True
        params.no_perf = True
        try:
            self._ctx = _internals.LlamaContext(model=model._model, params=params, verbose=False)
        except ValueError as e:
            raise ModelError(f"could not create the embeddings context: {e}") from e
        self.model = model
        self.ctx = self._ctx.ctx
        self.n_ctx = context_size
        self.dimensions = C.llama_model_n_embd(model.ptr)
        self._mem = C.llama_get_memory(self.ctx)
        self._batch = C.llama_batch_init(context_size, 0, 1)
        self._lock = threading.Lock()

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """One L2-normalised vector per input (token ids); as many inputs per llama_decode
        as fit in the context."""
        for i, toks in enumerate(inputs):
            if not toks:
                raise BadRequest(f"input[{i}] is empty", param="input")
            if len(toks) > self.n_ctx:
                raise BadRequest(f"input[{i}] has {len(toks)} tokens; the limit is {self.n_ctx} "
                                 "(LLM_LLAMA_SERVICE_EMBEDDINGS_CONTEXT_SIZE)", param="input")
        out: list[np.ndarray] = []
        with self._lock:
            group: list[Sequence[int]] = []
            for toks in inputs:
                if group and (len(group) == MAX_SEQS
                              or sum(map(len, group)) + len(toks) > self.n_ctx):
                    out.extend(self._decode(group))
                    group = []
                group.append(toks)
            out.extend(self._decode(group))
        return out

    def _decode(self, group: Sequence[Sequence[int]]) -> list[np.ndarray]:
        b = self._batch
        n = 0
        for seq, toks in enumerate(group):
            for pos, tok in enumerate(toks):
                b.token[n], b.pos[n], b.n_seq_id[n] = tok, pos, 1
                b.seq_id[n][0] = seq
                b.logits[n] = True  # pooling reads every token's output
                n += 1
        b.n_tokens = n
        C.llama_memory_clear(self._mem, True)
        rc = C.llama_decode(self.ctx, b)
        if rc != 0:
            raise InternalError(f"llama_decode returned {rc} for embeddings")  # a 500, OpenAI-shaped
        vectors = []
        for seq in range(len(group)):
            ptr = C.llama_get_embeddings_seq(self.ctx, seq)
            v = np.ctypeslib.as_array(ptr, shape=(self.dimensions,)).astype(np.float32)
            norm = float(np.linalg.norm(v))
            vectors.append(v / norm if norm > 0 else v)
        return vectors

    def close(self) -> None:
        if self._batch is not None:
            C.llama_batch_free(self._batch)
            self._batch = None
        self._ctx.close()
