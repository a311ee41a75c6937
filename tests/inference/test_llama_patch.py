"""Our llama.cpp patch (patches/llama.cpp/0001-sgemm-q0-prefetch.patch) against ggml's own path.

The patch sends one-row Q8_0/Q5_0/Q4_0 products (every decode step of a sequence) through
llamafile's tinyBLAS kernel instead of ggml's vec_dot. LLAMAFLEET_SGEMM_Q0_GEMV=0, read once per
process, restores ggml's path. The embedded model is re-quantised "pure" to each type, loaded
without weight repacking (repacked weights take another kernel), and the logits of one-row
decodes are compared between two processes, one per path. Runs wherever the tests run: AVX2,
AVX-512 and (with the AMX kernels left out, scripts/llama-cpp-env.sh) AMX machines alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration

# One process: prefill a prompt, then decode fixed tokens one row at a time; save those logits.
ONE_ROW_LOGITS = r"""
import sys, numpy as np, llama_cpp as C
path, out = sys.argv[1], sys.argv[2]
C.llama_backend_init()
mp = C.llama_model_default_params()
mp.n_gpu_layers = 0
mp.use_extra_bufts = False  # no repacking: the Q0 weights go through ggml_compute_forward_mul_mat
model = C.llama_model_load_from_file(path.encode(), mp)
cp = C.llama_context_default_params()
cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 128, 64, 64, 2, 2
ctx = C.llama_init_from_model(model, cp)
vocab = C.llama_model_get_vocab(model)
def tokens(text, bos):
    buf = (C.llama_token * 64)()
    return list(buf[:C.llama_tokenize(vocab, text, len(text), buf, 64, bos, False)])
prompt, cont = tokens(b"The lighthouse keeper climbed", True), tokens(b" the stairs at dawn", False)
batch = (C.llama_token * len(prompt))(*prompt)
assert C.llama_decode(ctx, C.llama_batch_get_one(batch, len(prompt))) == 0
n_vocab, rows, one = C.llama_vocab_n_tokens(vocab), [], (C.llama_token * 1)()
for t in cont:
    one[0] = t
    assert C.llama_decode(ctx, C.llama_batch_get_one(one, 1)) == 0
    rows.append(np.ctypeslib.as_array(C.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy())
np.save(out, np.stack(rows))
"""

FTYPES = {"Q8_0": 7, "Q5_0": 8, "Q4_0": 2}  # llama_ftype LLAMA_FTYPE_MOSTLY_*


@pytest.fixture(scope="module")
def quantised(model_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import llama_cpp as C

    out = {}
    for name, ftype in FTYPES.items():
        dst = tmp_path_factory.mktemp("q0") / f"gemma-{name}.gguf"
        params = C.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, 2
        params.allow_requantize = True
        params.pure = True  # every weight matrix in this type, the tied output matrix included
        assert C.llama_model_quantize(str(model_path).encode(), str(dst).encode(),
                                      params) == 0, name
        out[name] = dst
    return out


def _one_row_logits(model: Path, out: Path, reference: bool) -> tuple[np.ndarray, str]:
    env = {**os.environ, "LLAMAFLEET_SGEMM_Q0_GEMV": "0" if reference else "1"}
    r = subprocess.run([sys.executable, "-c", ONE_ROW_LOGITS, str(model), str(out)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return np.load(out), r.stderr


@pytest.mark.parametrize("qtype", list(FTYPES))
def test_one_row_logits_match_ggml_reference(qtype: str, quantised: dict[str, Path],
                                             tmp_path: Path) -> None:
    patched, log = _one_row_logits(quantised[qtype], tmp_path / "patched.npy", reference=False)
    assert "LLAMAFLEET_SGEMM_Q0_GEMV=0" not in log
    ref, ref_log = _one_row_logits(quantised[qtype], tmp_path / "ref.npy", reference=True)
    assert "LLAMAFLEET_SGEMM_Q0_GEMV=0, one-row Q0 products use ggml's vec_dot" in ref_log
    assert patched.shape == ref.shape and patched.shape[0] >= 3
    assert np.isfinite(patched).all()
    # Same products, summed in another order: equal up to float32 rounding.
    scale = float(np.abs(ref).max())
    worst = float(np.abs(patched - ref).max())
    print(f"{qtype}: max |patched - reference| = {worst:.3g} (max |logit| {scale:.3g})")
    assert worst <= 1e-4 * scale, (qtype, worst, scale)
    assert (patched.argmax(axis=1) == ref.argmax(axis=1)).all()
