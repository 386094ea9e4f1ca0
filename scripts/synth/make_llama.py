#!/usr/bin/env python3
"""Synthetic Llama 3 GGUFs for checking Turbine's `llama` architecture against llama.cpp.

    python3 scripts/synth/make_llama.py OUT_DIR

Writes OUT_DIR/llama-f32.gguf (every tensor F32) and OUT_DIR/llama-q8_0.gguf (the matrices
Q8_0, the rest F32): small dimensions but every structural feature of Llama 3 (grouped-query
attention, SwiGLU, untied output, RoPE with `rope_freqs` divisors), Llama 3's real BPE
vocabulary (llama.cpp's ggml-vocab-llama-bpe.gguf, from scripts/fetch-vocabs.sh), and random
weights of a sensible scale from fixed seeds: the same bytes on every run (numpy's PCG64).
"""
import os
import sys

import numpy as np
import gguf

VOCABS = os.environ.get("TURBINE_VOCABS", os.path.expanduser("~/.cache/turbine-vocabs"))
SEED = 20261125
N_EMBD, N_HEAD, N_HEAD_KV, N_FF, N_LAYER, N_CTX = 64, 4, 2, 160, 2, 512
HEAD_DIM = N_EMBD // N_HEAD
ROPE_BASE = 500000.0


def vocab():
    """Tokens, token types, merges and special ids of Llama 3's vocabulary file."""
    r = gguf.GGUFReader(os.path.join(VOCABS, "ggml-vocab-llama-bpe.gguf"))
    f = r.fields

    def strings(key):
        field = f[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    def scalar(key):
        return int(f[key].parts[f[key].data[0]][0])

    types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data]
    return strings("tokenizer.ggml.tokens"), types, strings("tokenizer.ggml.merges"), {
        "bos": scalar("tokenizer.ggml.bos_token_id"),
        "eos": scalar("tokenizer.ggml.eos_token_id"),
    }


def llama3_rope_freqs():
    """Llama 3.1's frequency divisors for HEAD_DIM (factor 8, low 1, high 4, 8192 ctx)."""
    factor, low, high, old_ctx = 8.0, 1.0, 4.0, 8192
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, HEAD_DIM, 2):
        freq = 1.0 / (ROPE_BASE ** (i / HEAD_DIM))
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def tensors(n_vocab):
    """Name → float32 array (numpy shape: rows × cols, as GGUF stores [cols, rows])."""
    rng = np.random.default_rng(SEED)

    def mat(rows, cols, scale=1.0):
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    t = {"token_embd.weight": (rng.standard_normal((n_vocab, N_EMBD)) * 0.5).astype(np.float32)}
    for il in range(N_LAYER):
        p = f"blk.{il}."
        t[p + "attn_norm.weight"] = norm(N_EMBD)
        t[p + "attn_q.weight"] = mat(N_HEAD * HEAD_DIM, N_EMBD)
        t[p + "attn_k.weight"] = mat(N_HEAD_KV * HEAD_DIM, N_EMBD)
        t[p + "attn_v.weight"] = mat(N_HEAD_KV * HEAD_DIM, N_EMBD)
        t[p + "attn_output.weight"] = mat(N_EMBD, N_HEAD * HEAD_DIM)
        t[p + "ffn_norm.weight"] = norm(N_EMBD)
        t[p + "ffn_gate.weight"] = mat(N_FF, N_EMBD)
        t[p + "ffn_up.weight"] = mat(N_FF, N_EMBD)
        t[p + "ffn_down.weight"] = mat(N_EMBD, N_FF)
    t["output_norm.weight"] = norm(N_EMBD)
    t["output.weight"] = mat(n_vocab, N_EMBD, scale=4.0)
    t["rope_freqs.weight"] = llama3_rope_freqs()
    return t


def write(path, quantize):
    tokens, types, merges, special = vocab()
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("turbine-synthetic-llama3")
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(ROPE_BASE)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(special["bos"])
    w.add_eos_token_id(special["eos"])
    for name, data in tensors(len(tokens)).items():
        if quantize and data.ndim == 2:
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/turbine-synth")
    os.makedirs(out, exist_ok=True)
    write(os.path.join(out, "llama-f32.gguf"), quantize=False)
    write(os.path.join(out, "llama-q8_0.gguf"), quantize=True)
    print(out)


if __name__ == "__main__":
    main()
