"""Write a random-weight llama-architecture GGUF of a chosen size (byte-level vocabulary).

For load tests where a real model cannot travel (the GPU machine takes 64 MiB). The
weights are noise, so the text is too; with `ignore_eos` the lengths are exact.

    python benchmarks/make_random_gguf.py out.gguf --dim 2048 --layers 16 --ff 5632

With ``--lora`` it writes the LoRA proof material into a folder instead: the random llama in
float32, a random LoRA adapter for it, and the same model with that adapter merged into its
weights (``write_lora_set``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np

# The weight matrices a LoRA adapts (every linear layer of every block), as llama.cpp names them.
LORA_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def weights(dim: int, layers: int, ff: int, heads: int, kv_heads: int, seed: int = 0,
            fill: float | None = None, dtype: type = np.float16) -> dict[str, np.ndarray]:
    """Every tensor of the random llama, by GGUF name, in file order (numpy order: a matrix is
    [n_out, n_in]). The same arguments give the same weights."""
    rng = np.random.default_rng(seed)
    head_dim = dim // heads

    def mat(rows: int, cols: int) -> np.ndarray:
        if fill is not None:
            return np.full((rows, cols), fill, dtype=dtype)
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(dtype)

    def norm() -> np.ndarray:
        return np.ones(dim, dtype=np.float32)

    out = {"token_embd.weight": mat(N_VOCAB, dim), "output_norm.weight": norm(),
           "output.weight": mat(N_VOCAB, dim)}
    for i in range(layers):
        p = f"blk.{i}."
        out[p + "attn_norm.weight"] = norm()
        out[p + "attn_q.weight"] = mat(dim, dim)
        out[p + "attn_k.weight"] = mat(kv_heads * head_dim, dim)
        out[p + "attn_v.weight"] = mat(kv_heads * head_dim, dim)
        out[p + "attn_output.weight"] = mat(dim, dim)
        out[p + "ffn_norm.weight"] = norm()
        out[p + "ffn_gate.weight"] = mat(ff, dim)
        out[p + "ffn_up.weight"] = mat(ff, dim)
        out[p + "ffn_down.weight"] = mat(dim, ff)
    return out


TOKENS = [b"<unk>", b"<s>", b"</s>"] + [f"<0x{i:02X}>".encode() for i in range(256)]
N_VOCAB = len(TOKENS)


def _write_model(path: Path, tensors: dict[str, np.ndarray], dim: int, layers: int, ff: int,
                 heads: int, kv_heads: int, context: int, name: str = "random-llama") -> int:
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(context)
    w.add_embedding_length(dim)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(dim // heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    f32 = tensors["token_embd.weight"].dtype == np.float32
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if f32 else gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("llama")
    w.add_token_list(TOKENS)
    w.add_token_scores([0.0] * N_VOCAB)
    w.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
                      + [gguf.TokenType.BYTE] * 256)
    w.add_unk_token_id(0)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for tensor_name, arr in tensors.items():
        w.add_tensor(tensor_name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sum(a.size for a in tensors.values())


def write(path: Path, dim: int, layers: int, ff: int, heads: int, kv_heads: int,
          context: int, seed: int = 0, fill: float | None = None,
          dtype: type = np.float16) -> int:
    """``fill`` puts one value in every weight matrix instead of noise: NaN makes a model
    whose logits are all NaN, which `llamafleet serve`'s start-up self-test must refuse.
    ``dtype`` float32 writes an F32 model (the LoRA proofs compare it with a merged copy)."""
    tensors = weights(dim, layers, ff, heads, kv_heads, seed, fill, dtype)
    return _write_model(path, tensors, dim, layers, ff, heads, kv_heads, context)


def lora_weights(dim: int, layers: int, ff: int, heads: int, kv_heads: int, rank: int = 8,
                 seed: int = 1, std: float = 0.1) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A random LoRA for the random llama: for each adapted weight W ([n_out, n_in]) the pair
    A ([rank, n_in]) and B ([n_out, rank]), float32, as llama.cpp reads ``<W>.lora_a`` and
    ``<W>.lora_b``. With std 0.1 and alpha = rank, B·A is about as large as W (std 0.02 to 0.03),
    so the adapter changes greedy text."""
    rng = np.random.default_rng(seed)
    shapes = {name: arr.shape for name, arr in
              weights(dim, layers, ff, heads, kv_heads, fill=0.0).items()}
    out = {}
    for name, (n_out, n_in) in ((n, s) for n, s in shapes.items()
                                if n.startswith("blk.") and n.split(".")[2] in LORA_TARGETS):
        a = rng.standard_normal((rank, n_in), dtype=np.float32) * std
        b = rng.standard_normal((n_out, rank), dtype=np.float32) * std
        out[name] = (a, b)
    return out


def write_lora(path: Path, lora: dict[str, tuple[np.ndarray, np.ndarray]], alpha: float,
               name: str = "random-lora") -> None:
    """llama.cpp's LoRA GGUF (convert_lora_to_gguf.py's layout; src/llama-adapter.cpp reads
    it): general.type "adapter", adapter.type "lora", adapter.lora.alpha, and tensors
    ``<base tensor>.lora_a`` / ``.lora_b``. llama.cpp scales B·A by scale * alpha / rank."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_name(name)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    for weight, (a, b) in lora.items():
        base = weight.removesuffix(".weight")
        w.add_tensor(base + ".weight.lora_a", a)
        w.add_tensor(base + ".weight.lora_b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def merge(tensors: dict[str, np.ndarray], lora: dict[str, tuple[np.ndarray, np.ndarray]],
          alpha: float, scale: float = 1.0) -> dict[str, np.ndarray]:
    """W' = W + scale * (alpha / rank) * B·A, in float32: what llama.cpp computes at run time
    with the adapter set (llama-adapter.h, get_scale), folded into the weights."""
    out = dict(tensors)
    for name, (a, b) in lora.items():
        rank = a.shape[0]
        out[name] = (tensors[name].astype(np.float32)
                     + np.float32(scale * alpha / rank) * (b @ a)).astype(np.float32)
    return out


def write_lora_set(folder: Path, dim: int, layers: int, ff: int, heads: int, kv_heads: int,
                   context: int, *, rank: int = 8, alpha: float = 8.0, scale: float = 1.0,
                   lora_seed: int = 1) -> dict[str, Path]:
    """The proof material for LoRA serving, all float32: ``base`` (the random llama), ``lora``
    (a random adapter for it) and ``merged`` (the base with the adapter folded in at
    ``scale``). Serving base + lora at ``scale`` must give the merged model's greedy tokens."""
    folder.mkdir(parents=True, exist_ok=True)
    shape = (dim, layers, ff, heads, kv_heads)
    base = weights(*shape, dtype=np.float32)
    lora = lora_weights(*shape, rank=rank, seed=lora_seed)
    paths = {"base": folder / "base.gguf", "lora": folder / f"lora-{lora_seed}.gguf",
             "merged": folder / f"merged-{lora_seed}.gguf"}
    _write_model(paths["base"], base, *shape, context)
    write_lora(paths["lora"], lora, alpha)
    _write_model(paths["merged"], merge(base, lora, alpha, scale), *shape, context,
                 name="random-llama-merged")
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--ff", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0,
                    help="the weights' seed: two models of one vocabulary and different weights "
                    "(a served model and its draft model, --speculative draft)")
    ap.add_argument("--fill", type=float, default=None,
                    help="one value for every weight instead of noise (e.g. nan, for a broken model)")
    ap.add_argument("--lora", action="store_true",
                    help="OUT is a folder: write base.gguf (float32), lora-1.gguf (a random LoRA "
                    "for it) and merged-1.gguf (the base with that LoRA merged in)")
    ap.add_argument("--rank", type=int, default=8, help="--lora: the adapter's rank")
    ap.add_argument("--alpha", type=float, default=8.0, help="--lora: adapter.lora.alpha")
    ap.add_argument("--scale", type=float, default=1.0, help="--lora: the scale merged in")
    a = ap.parse_args()
    if a.lora:
        paths = write_lora_set(a.out, a.dim, a.layers, a.ff, a.heads, a.kv_heads, a.context,
                               rank=a.rank, alpha=a.alpha, scale=a.scale)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
        return
    n = write(a.out, a.dim, a.layers, a.ff, a.heads, a.kv_heads, a.context, seed=a.seed,
              fill=a.fill)
    print(f"wrote {a.out}: {n / 1e9:.2f}B parameters, {a.out.stat().st_size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
