"""/v1/embeddings: pooled, L2-normalised vectors from a second llama_context.

Why not batched with the generation engine: embeddings need a context with
``embeddings`` on and a pooling type, and llama.cpp turns that on for a whole context (every
row of a batch), not per sequence; sharing the engine's context would mean switching it per
step and holding up every stream. A context of its own on the same weights costs only its
KV cache (``embeddings_context_size`` tokens), needs no change to the engine's step, and
many inputs of one request share its llama_decode calls as separate sequences. It runs on
one dedicated thread with one llama.cpp thread (serving.py says why), one request at a time,
so the event loop never waits on it.

Outputs, and so memory: a context with ``embeddings`` on makes every token of a batch an
output, and llama.cpp then computes and stores that token's logits too (n_vocab floats; the
LM head runs on every output row). Handed a whole 507-token input in one llama_decode, Gemma 3
(262,144 tokens) took about 1 GiB of logits, host buffer and compute buffer together, and
kept it. So the context pools nothing itself (``LLAMA_POOLING_TYPE_NONE``); we decode at most
:data:`EMBED_BATCH` tokens per llama_decode, pool the rows ourselves, and turn outputs on
(``llama_set_embeddings``) only for the tokens the pooling reads: every token for mean, the
last for last, the first for cls. The other tokens only fill the KV cache and give no row,
so 'last' never computes a logit it does not need. Attention is causal (a generative
model's), so a sequence decoded in pieces sees exactly what it saw in one piece.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
from llama_cpp import _internals
from llama_cpp import llama_cpp as C
from llamafleet.common.contract import env_name
from llamafleet.common.errors import BadRequest, InternalError, ModelError

MAX_SEQS = 16  # inputs held in the KV cache together (llama_context's n_seq_max)
# Tokens per llama_decode, so also output rows per decode: the logits buffer and the LM
# head's part of the compute buffer are EMBED_BATCH x n_vocab floats (64 MiB for Gemma 3's
# vocabulary), whatever the length of the input. Smaller batches gave no less memory worth
# having and more decode calls.
EMBED_BATCH = 64
_POOLING = {"mean": C.LLAMA_POOLING_TYPE_MEAN, "last": C.LLAMA_POOLING_TYPE_LAST}
_SUPPORTED = {C.LLAMA_POOLING_TYPE_MEAN: "mean", C.LLAMA_POOLING_TYPE_CLS: "cls",
              C.LLAMA_POOLING_TYPE_LAST: "last"}


class Cancelled(Exception):
    """The request's client left, or the server is stopping: the rest is not decoded."""


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
        kind = pooling_type(pooling, model.meta)
        if kind not in _SUPPORTED:
            raise ModelError(f"the model's pooling type {kind} is not supported for "
                             f"/v1/embeddings; set {env_name('embeddings_pooling')}")
        self.pooling = _SUPPORTED[kind]
        batch = min(EMBED_BATCH, context_size)
        params = C.llama_context_default_params()
        params.n_ctx = context_size
        params.n_batch = params.n_ubatch = batch
        params.n_seq_max = MAX_SEQS
        params.n_threads = params.n_threads_batch = threads
        params.embeddings = True
        params.pooling_type = C.LLAMA_POOLING_TYPE_NONE  # pooled here (the module says why)
        params.kv_unified = True
        params.no_perf = True
        try:
            self._ctx = _internals.LlamaContext(model=model._model, params=params, verbose=False)
        except ValueError as e:
            raise ModelError(f"could not create the embeddings context: {e}") from e
        self.model = model
        self.ctx = self._ctx.ctx
        self.n_ctx = context_size
        self.n_batch = batch
        self.dimensions = C.llama_model_n_embd_out(model.ptr)
        self._mem = C.llama_get_memory(self.ctx)
        self._batch = C.llama_batch_init(batch, 0, 1)
        self._outputs_on = True
        self._lock = threading.Lock()
        self.decodes = 0  # llama_decode calls so far (tests read it)

    def check(self, inputs: Sequence[Sequence[int]]) -> None:
        """The limits, before any work is queued: a 400 naming ``input``."""
        for i, toks in enumerate(inputs):
            if not toks:
                raise BadRequest(f"input[{i}] is empty", param="input")
            if len(toks) > self.n_ctx:
                raise BadRequest(f"input[{i}] has {len(toks)} tokens; the limit is {self.n_ctx} "
                                 f"({env_name('embeddings_context_size')})", param="input")

    def embed(self, inputs: Sequence[Sequence[int]],
              cancelled: threading.Event | None = None) -> list[np.ndarray]:
        """One L2-normalised vector per input (token ids); as many inputs share the KV cache
        as fit in it. ``cancelled`` is checked before every llama_decode: once set, the rest
        is skipped and :class:`Cancelled` raised."""
        self.check(inputs)
        out: list[np.ndarray] = []
        with self._lock:
            group: list[Sequence[int]] = []
            for toks in inputs:
                if group and (len(group) == MAX_SEQS
                              or sum(map(len, group)) + len(toks) > self.n_ctx):
                    out.extend(self._embed_group(group, cancelled))
                    group = []
                group.append(toks)
            out.extend(self._embed_group(group, cancelled))
        return out

    def _wanted(self, n: int) -> range:
        """Positions whose rows the pooling reads, in an input of ``n`` tokens."""
        if self.pooling == "mean":
            return range(n)
        return range(n - 1, n) if self.pooling == "last" else range(1)

    def _embed_group(self, group: Sequence[Sequence[int]],
                     cancelled: threading.Event | None) -> list[np.ndarray]:
        C.llama_memory_clear(self._mem, True)
        # (token, pos, seq) without a row first, then those with one; each sequence's
        # positions stay in order (cls: its one row is position 0, so rows come first).
        rows: list[tuple[int, int, int]] = []
        fill: list[tuple[int, int, int]] = []
        for seq, toks in enumerate(group):
            wanted = self._wanted(len(toks))
            for pos, tok in enumerate(toks):
                (rows if pos in wanted else fill).append((tok, pos, seq))
        phases = [(rows, True), (fill, False)] if self.pooling == "cls" else \
            [(fill, False), (rows, True)]
        sums = np.zeros((len(group), self.dimensions), dtype=np.float64)
        for items, outputs in phases:
            for at in range(0, len(items), self.n_batch):
                if cancelled is not None and cancelled.is_set():
                    raise Cancelled()
                part = items[at : at + self.n_batch]
                self._decode(part, outputs)
                if outputs:
                    ptr = C.llama_get_embeddings(self.ctx)
                    got = np.ctypeslib.as_array(ptr, shape=(len(part), self.dimensions))
                    np.add.at(sums, [seq for _, _, seq in part], got)
        vectors = []
        for seq, toks in enumerate(group):
            v = (sums[seq] / len(self._wanted(len(toks)))).astype(np.float32)
            norm = float(np.linalg.norm(v))
            vectors.append(v / norm if norm > 0 else v)
        return vectors

    def _decode(self, part: Sequence[tuple[int, int, int]], outputs: bool) -> None:
        if outputs != self._outputs_on:
            # Off: the tokens only fill the KV cache; llama.cpp computes no row for them.
            C.llama_set_embeddings(self.ctx, outputs)
            self._outputs_on = outputs
        b = self._batch
        for n, (tok, pos, seq) in enumerate(part):
            b.token[n], b.pos[n], b.n_seq_id[n] = tok, pos, 1
            b.seq_id[n][0] = seq
            b.logits[n] = outputs
        b.n_tokens = len(part)
        rc = C.llama_decode(self.ctx, b)
        self.decodes += 1
        if rc != 0:
            raise InternalError(f"llama_decode returned {rc} for embeddings")  # a 500, OpenAI-shaped

    def close(self) -> None:
        if self._batch is not None:
            C.llama_batch_free(self._batch)
            self._batch = None
        self._ctx.close()
