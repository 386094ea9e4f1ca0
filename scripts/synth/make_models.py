#!/usr/bin/env python3
"""Synthetic GGUFs for checking Turbine's architectures against llama.cpp.

    python3 scripts/synth/make_models.py OUT_DIR [ARCH...]

For each architecture (default: all of ARCHS) writes OUT_DIR/{arch}-f32.gguf (every tensor
F32) and a quantized twin OUT_DIR/{arch}-{quant}.gguf (q8_0: the matrices Q8_0; mxfp4: the
experts MXFP4 as released gpt-oss files have them, the other matrices Q8_0; the rest F32,
the MoE router F32 as llama.cpp's quantizer keeps it): small dimensions but every structural feature of the
architecture, the real BPE vocabulary of its family (llama.cpp's ggml-vocab-*.gguf, from
scripts/fetch-vocabs.sh), and random weights of a sensible scale from fixed seeds: the same
bytes on every run (numpy's PCG64).

  llama     Llama 3: grouped-query attention, SwiGLU, untied output, RoPE with rope_freqs
  qwen2     Qwen2.5: Q/K/V biases, NEOX RoPE, tied output, ChatML template
  qwen3     Qwen3: QK-norm, head size 32 with q width 128 != n_embd 64, NEOX RoPE, tied;
            a thinking chat template (QWEN3_THINKING_TEMPLATE)
  qwen3moe  Qwen3-MoE: Qwen3's attention, 16 experts of width 32, top-4, renormalized
  gpt-oss   gpt-oss: Q/K/V/O biases, attention sinks, a 16-token sliding window on even
            layers (128 in the real models; 16 here so the tests' sequences reach past
            it), YaRN RoPE (factor 32 over 4096), 8 experts of width 32 with biases, top-4
            softmax over the selected, clamped SwiGLU; Llama 3's vocabulary with the
            o200k (gpt-4o) pre-tokenizer
  deepseek2 DeepSeek-V3: multi-head latent attention (q LoRA rank 32, kv LoRA rank 64,
            32 + 16 RoPE query/key dims, values of 32), YaRN RoPE with log multiplier,
            one leading dense layer, then 16 experts in 4 groups (2 kept), top-4 by
            sigmoid with a selection bias, renormalized and scaled 2.5, one shared expert;
            DeepSeek LLM's vocabulary with the DeepSeek-V3 pre-tokenizer
"""
import os
import sys

import numpy as np
import gguf

VOCABS = os.environ.get("TURBINE_VOCABS", os.path.expanduser("~/.cache/turbine-vocabs"))
SEED = 20261125

# ChatML as Qwen3's thinking models render it: offered tools listed in a system turn,
# an assistant's calls as <tool_call> JSON; the generation prompt opens the reasoning
# (`<think>`), or closes an empty one when `enable_thinking` is false.
QWEN3_THINKING_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\n# Tools\n' }}{%- for t in tools %}"
    "{{ t.function.name + ': ' + (t.function.description or '') + '\n' }}{%- endfor %}"
    "{{ '<|im_end|>\n' }}{%- endif %}"
    "{%- for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content }}"
    "{%- for c in m.tool_calls or [] %}{{ '<tool_call>\n{\"name\": \"' + c.function.name + '\", \"arguments\": ' }}"
    "{{- c.function.arguments | tojson }}{{ '}\n</tool_call>' }}{%- endfor %}{{ '<|im_end|>\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}"
    "{%- else %}{{ '<think>\n' }}{%- endif %}{%- endif %}"
)

ARCHS = {
    "llama": dict(vocab="llama-bpe", embd=64, head=4, head_kv=2, head_dim=16, ff=160, layers=2,
                  rope_base=500000.0, tied=False, rope_freqs=True),
    "qwen2": dict(vocab="qwen2", embd=64, head=4, head_kv=2, head_dim=16, ff=160, layers=2,
                  rope_base=1000000.0, tied=True, qkv_bias=True),
    "qwen3": dict(vocab="qwen2", embd=64, head=4, head_kv=2, head_dim=32, ff=160, layers=2,
                  rope_base=1000000.0, tied=True, qk_norm=True, template=QWEN3_THINKING_TEMPLATE),
    "qwen3moe": dict(vocab="qwen2", embd=64, head=4, head_kv=2, head_dim=32, ff=96, layers=2,
                     rope_base=1000000.0, tied=True, qk_norm=True, experts=16, experts_used=4, expert_ff=32),
    "gpt-oss": dict(vocab="llama-bpe", pre="gpt-4o", embd=64, head=4, head_kv=2, head_dim=32, ff=32, layers=3,
                    rope_base=150000.0, tied=False, qkv_bias=True, out_bias=True, sinks=True,
                    sliding_window=16, yarn=(32.0, 4096), experts=8, experts_used=4, expert_ff=32,
                    expert_bias=True, router_bias=True, post_attention_norm=True, quant="mxfp4"),
    "deepseek2": dict(vocab="deepseek-llm", pre="deepseek-v3", embd=64, head=4, head_kv=1, head_dim=64 + 16, ff=96, layers=3,
                      rope_base=10000.0, tied=False, yarn=(4.0, 128), yarn_log_mul=0.1,
                      mla=dict(q_rank=32, kv_rank=64, nope=32, rope=16, v_head=32), dense_lead=1,
                      experts=16, experts_used=4, expert_ff=32, expert_groups=(4, 2), shared_experts=1,
                      sigmoid=True, selection_bias=True, weights_scale=2.5),
}
N_CTX = 512


def vocab(name):
    """Tokens, token types, merges, special ids and chat template of a vocabulary file."""
    r = gguf.GGUFReader(os.path.join(VOCABS, f"ggml-vocab-{name}.gguf"))
    f = r.fields

    def strings(key):
        field = f[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    def scalar(key):
        return int(f[key].parts[f[key].data[0]][0])

    types = [int(f["tokenizer.ggml.token_type"].parts[i][0]) for i in f["tokenizer.ggml.token_type"].data]
    template = None
    if "tokenizer.chat_template" in f:
        template = bytes(f["tokenizer.chat_template"].parts[f["tokenizer.chat_template"].data[0]]).decode("utf-8")
    return dict(
        tokens=strings("tokenizer.ggml.tokens"),
        types=types,
        merges=strings("tokenizer.ggml.merges"),
        pre=bytes(f["tokenizer.ggml.pre"].parts[f["tokenizer.ggml.pre"].data[0]]).decode("utf-8"),
        bos=scalar("tokenizer.ggml.bos_token_id"),
        eos=scalar("tokenizer.ggml.eos_token_id"),
        template=template,
    )


def llama3_rope_freqs(head_dim, base):
    """Llama 3.1's frequency divisors (factor 8, low 1, high 4, 8192 ctx)."""
    factor, low, high, old_ctx = 8.0, 1.0, 4.0, 8192
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / (base ** (i / head_dim))
        wavelen = 2 * np.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def tensors(a, n_vocab, seed):
    """Name → float32 array (numpy shape: reversed GGUF dims, e.g. rows × cols)."""
    rng = np.random.default_rng(seed)
    d, q, kv = a["embd"], a["head"] * a["head_dim"], a["head_kv"] * a["head_dim"]

    def mat(rows, cols, scale=1.0, lead=()):
        return (rng.standard_normal((*lead, rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def bias(n):
        return (0.5 * rng.standard_normal(n)).astype(np.float32)

    t = {"token_embd.weight": (rng.standard_normal((n_vocab, d)) * 0.5).astype(np.float32)}
    for il in range(a["layers"]):
        p = f"blk.{il}."
        t[p + "attn_norm.weight"] = norm(d)
        if "mla" in a:
            mla_tensors(t, p, a, mat, norm)
            moe_layer = il >= a["dense_lead"]
            ffn_tensors(t, p, a, mat, norm, bias, rng, moe_layer)
            continue
        t[p + "attn_q.weight"] = mat(q, d)
        t[p + "attn_k.weight"] = mat(kv, d)
        t[p + "attn_v.weight"] = mat(kv, d)
        if a.get("qkv_bias"):
            t[p + "attn_q.bias"], t[p + "attn_k.bias"], t[p + "attn_v.bias"] = bias(q), bias(kv), bias(kv)
        if a.get("qk_norm"):
            t[p + "attn_q_norm.weight"], t[p + "attn_k_norm.weight"] = norm(a["head_dim"]), norm(a["head_dim"])
        t[p + "attn_output.weight"] = mat(d, q)
        if a.get("out_bias"):
            t[p + "attn_output.bias"] = bias(d)
        if a.get("sinks"):
            t[p + "attn_sinks.weight"] = (rng.standard_normal(a["head"]) * 1.0).astype(np.float32)
        t[p + ("post_attention_norm.weight" if a.get("post_attention_norm") else "ffn_norm.weight")] = norm(d)
        ffn_tensors(t, p, a, mat, norm, bias, rng, "experts" in a)
    t["output_norm.weight"] = norm(d)
    if not a["tied"]:
        t["output.weight"] = mat(n_vocab, d, scale=4.0)
    if a.get("rope_freqs"):
        t["rope_freqs.weight"] = llama3_rope_freqs(a["head_dim"], a["rope_base"])
    return t


def mla_tensors(t, p, a, mat, norm):
    """DeepSeek's latent attention: q LoRA, the latent + RoPE key, per-head k_b and v_b."""
    d, h, m = a["embd"], a["head"], a["mla"]
    k_mla = m["nope"] + m["rope"]
    t[p + "attn_q_a.weight"] = mat(m["q_rank"], d)
    t[p + "attn_q_a_norm.weight"] = norm(m["q_rank"])
    t[p + "attn_q_b.weight"] = mat(h * k_mla, m["q_rank"])
    t[p + "attn_kv_a_mqa.weight"] = mat(m["kv_rank"] + m["rope"], d)
    t[p + "attn_kv_a_norm.weight"] = norm(m["kv_rank"])
    t[p + "attn_k_b.weight"] = mat(m["kv_rank"], m["nope"], lead=(h,))
    t[p + "attn_v_b.weight"] = mat(m["v_head"], m["kv_rank"], lead=(h,))
    t[p + "attn_output.weight"] = mat(d, h * m["v_head"])
    t[p + "ffn_norm.weight"] = norm(d)


def ffn_tensors(t, p, a, mat, norm, bias, rng, moe):
    """A dense SwiGLU FFN, or routed experts (with their optional extras)."""
    d = a["embd"]
    if moe:
        n, ff = a["experts"], a["expert_ff"]
        # A router with a spread of 2 logits, so the top-k choice is clear-cut but varied.
        t[p + "ffn_gate_inp.weight"] = mat(n, d, scale=2.0)
        if a.get("router_bias"):
            t[p + "ffn_gate_inp.bias"] = bias(n)
        t[p + "ffn_gate_exps.weight"] = mat(ff, d, lead=(n,))
        t[p + "ffn_up_exps.weight"] = mat(ff, d, lead=(n,))
        t[p + "ffn_down_exps.weight"] = mat(d, ff, lead=(n,))
        if a.get("expert_bias"):
            t[p + "ffn_gate_exps.bias"] = (0.5 * rng.standard_normal((n, ff))).astype(np.float32)
            t[p + "ffn_up_exps.bias"] = (0.5 * rng.standard_normal((n, ff))).astype(np.float32)
            t[p + "ffn_down_exps.bias"] = (0.5 * rng.standard_normal((n, d))).astype(np.float32)
        if a.get("selection_bias"):
            t[p + "exp_probs_b.bias"] = (0.3 * rng.standard_normal(n)).astype(np.float32)
        if a.get("shared_experts"):
            sff = ff * a["shared_experts"]
            t[p + "ffn_gate_shexp.weight"] = mat(sff, d)
            t[p + "ffn_up_shexp.weight"] = mat(sff, d)
            t[p + "ffn_down_shexp.weight"] = mat(d, sff)
    else:
        t[p + "ffn_gate.weight"] = mat(a["ff"], d)
        t[p + "ffn_up.weight"] = mat(a["ff"], d)
        t[p + "ffn_down.weight"] = mat(d, a["ff"])


def quant_type(name, data, quant):
    """The storage type of a tensor in the quantized twin."""
    if data.ndim < 2 or name.endswith(".bias") or "ffn_gate_inp" in name:
        return None
    if quant == "mxfp4" and "_exps." in name:
        return gguf.GGMLQuantizationType.MXFP4
    return gguf.GGMLQuantizationType.Q8_0


def write(path, arch, quant):
    a, v = ARCHS[arch], vocab(ARCHS[arch]["vocab"])
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"turbine-synthetic-{arch}")
    w.add_context_length(N_CTX)
    w.add_embedding_length(a["embd"])
    w.add_block_count(a["layers"])
    w.add_feed_forward_length(a["ff"])
    w.add_head_count(a["head"])
    w.add_head_count_kv(a["head_kv"])
    if "mla" in a:
        w.add_key_length(a["head_dim"])
        w.add_value_length(a["mla"]["kv_rank"])
    elif a["head_dim"] * a["head"] != a["embd"]:
        w.add_key_length(a["head_dim"])
        w.add_value_length(a["head_dim"])
    if "mla" not in a:
        w.add_rope_dimension_count(a["head_dim"])
    w.add_rope_freq_base(a["rope_base"])
    if "yarn" in a:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(a["yarn"][0])
        w.add_rope_scaling_orig_ctx_len(a["yarn"][1])
    if "sliding_window" in a:
        w.add_sliding_window(a["sliding_window"])
    w.add_layer_norm_rms_eps(1e-6 if arch.startswith("qwen") else 1e-5)
    if "mla" in a:
        m = a["mla"]
        w.add_q_lora_rank(m["q_rank"])
        w.add_kv_lora_rank(m["kv_rank"])
        w.add_key_length_mla(m["nope"] + m["rope"])
        w.add_value_length_mla(m["v_head"])
        w.add_rope_dimension_count(m["rope"])
        w.add_leading_dense_block_count(a["dense_lead"])
        w.add_expert_shared_count(a["shared_experts"])
        w.add_expert_group_count(a["expert_groups"][0])
        w.add_expert_group_used_count(a["expert_groups"][1])
        w.add_expert_weights_scale(a["weights_scale"])
        w.add_expert_weights_norm(True)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_vocab_size(len(v["tokens"]))
    if "yarn_log_mul" in a:
        w.add_rope_scaling_yarn_log_mul(a["yarn_log_mul"])
    if "experts" in a:
        w.add_expert_count(a["experts"])
        w.add_expert_used_count(a["experts_used"])
        w.add_expert_feed_forward_length(a["expert_ff"])
    file_types = {None: gguf.LlamaFileType.ALL_F32, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                  "mxfp4": gguf.LlamaFileType.MOSTLY_MXFP4_MOE}
    w.add_file_type(file_types[quant])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(a.get("pre", v["pre"]))
    w.add_token_list(v["tokens"])
    w.add_token_types(v["types"])
    w.add_token_merges(v["merges"])
    w.add_bos_token_id(v["bos"])
    w.add_eos_token_id(v["eos"])
    if arch.startswith("qwen"):
        w.add_add_bos_token(False)
    if a.get("template", v["template"]):
        w.add_chat_template(a.get("template", v["template"]))
    # llama keeps the seed of the first version of this script (its fixtures came first).
    seed = SEED if arch == "llama" else SEED + sum(map(ord, arch))
    for name, data in tensors(a, len(v["tokens"]), seed).items():
        ty = quant and quant_type(name, data, quant)
        if ty:
            w.add_tensor(name, gguf.quants.quantize(data, ty), raw_dtype=ty)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.expanduser("~/.cache/turbine-synth")
    archs = sys.argv[2:] or list(ARCHS)
    os.makedirs(out, exist_ok=True)
    for arch in archs:
        quant = ARCHS[arch].get("quant", "q8_0")
        write(os.path.join(out, f"{arch}-f32.gguf"), arch, None)
        write(os.path.join(out, f"{arch}-{quant}.gguf"), arch, quant)
    print(out)


if __name__ == "__main__":
    main()
