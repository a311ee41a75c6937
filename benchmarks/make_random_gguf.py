"""Write a random-weight llama-architecture GGUF of a chosen size (byte-level vocabulary).

For load tests where a real model cannot travel (the GPU machine takes 64 MiB). The
weights are noise, so the text is too; with `ignore_eos` the lengths are exact.

    python benchmarks/make_random_gguf.py out.gguf --dim 2048 --layers 16 --ff 5632
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np


def write(path: Path, dim: int, layers: int, ff: int, heads: int, kv_heads: int,
          context: int, seed: int = 0, fill: float | None = None) -> int:
    """``fill`` puts one value in every weight matrix instead of noise: NaN makes a model
    whose logits are all NaN, which `llamafleet serve`'s start-up self-test must refuse."""
    rng = np.random.default_rng(seed)
    head_dim = dim // heads
    tokens = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
    n_vocab = len(tokens)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("random-llama")
    w.add_context_length(context)
    w.add_embedding_length(dim)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * n_vocab)
    w.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                      + [gguf.TokenType.BYTE] * 256)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def mat(rows: int, cols: int) -> np.ndarray:
        if fill is not None:
            return np.full((rows, cols), fill, dtype=np.float16)
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    def norm() -> np.ndarray:
        return np.ones(dim, dtype=np.float32)

    params = 0

    def add(name: str, arr: np.ndarray) -> None:
        nonlocal params
        params += arr.size
        w.add_tensor(name, arr)

    add("token_embd.weight", mat(n_vocab, dim))
    add("output_norm.weight", norm())
    add("output.weight", mat(n_vocab, dim))
    for i in range(layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", norm())
        add(p + "attn_q.weight", mat(dim, dim))
        add(p + "attn_k.weight", mat(kv_heads * head_dim, dim))
        add(p + "attn_v.weight", mat(kv_heads * head_dim, dim))
        add(p + "attn_output.weight", mat(dim, dim))
        add(p + "ffn_norm.weight", norm())
        add(p + "ffn_gate.weight", mat(ff, dim))
        add(p + "ffn_up.weight", mat(ff, dim))
        add(p + "ffn_down.weight", mat(dim, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return params


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--ff", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--fill", type=float, default=None,
                    help="one value for every weight instead of noise (e.g. nan, for a broken model)")
    a = ap.parse_args()
    n = write(a.out, a.dim, a.layers, a.ff, a.heads, a.kv_heads, a.context, fill=a.fill)
    print(f"wrote {a.out}: {n / 1e9:.2f}B parameters, {a.out.stat().st_size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
