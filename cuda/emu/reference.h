// The CPU's definitions, in plain C++: what the emulated kernels are compared with. Each
// function names the Rust code it follows (turbine-cpu's cpu/src, the engine's
// engine/src/backend/cpu.rs and engine/src/model/moe.rs, engine/src/sampler.rs), with the
// same operations in the same order where the kernel promises the CPU's bits. Floats are
// IEEE single precision with every operation rounded on its own (-ffp-contract=off), as
// Rust computes them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "emu.h"

namespace ref {

using std::vector;
const float inf = std::numeric_limits<float>::infinity();

inline float f16_to_f32(uint16_t h) { return emu::f16_bits_to_f32(h); }
inline uint16_t f32_to_f16(float f) { return emu::f32_to_f16_bits(f); }
// x rounded to the nearest f16 (half::f16::from_f32(x).to_f32()).
inline float f16_round(float x) { return f16_to_f32(f32_to_f16(x)); }

// ---------------------------------------------------------------------------------------
// Weight formats (cpu/src/types.rs, cpu/src/dequant.rs: llama.cpp's block layouts).

enum Type { Q8_0, Q4_0, Q5_0, MXFP4, Q4_K, Q6_K, F32, F16, BF16 };
inline const char* type_name(Type t) {
    static const char* names[] = {"q8_0", "q4_0", "q5_0", "mxfp4", "q4_k", "q6_k", "f32", "f16", "bf16"};
    return names[t];
}
// Elements per block.
inline int block_size(Type t) { return t == Q4_K || t == Q6_K ? 256 : t >= F32 ? 1 : 32; }
// Bytes per block.
inline int type_size(Type t) {
    switch (t) {
        case Q8_0: return 34;
        case Q4_0: return 18;
        case Q5_0: return 22;
        case MXFP4: return 17;
        case Q4_K: return 144;
        case Q6_K: return 210;
        case F32: return 4;
        default: return 2;
    }
}
inline size_t row_bytes(Type t, int cols) { return (size_t)cols / block_size(t) * type_size(t); }
// The activation format the CPU dots a weight type with (GgmlType::act_type).
inline bool uses_q8_k(Type t) { return t == Q4_K || t == Q6_K; }

inline float read_f16(const uint8_t* p) { return f16_to_f32((uint16_t)(p[0] | p[1] << 8)); }
inline float read_bf16(const uint8_t* p) { return emu::bits_float((uint32_t)(p[0] | p[1] << 8) << 16); }
inline uint32_t read_u32(const uint8_t* p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }

const int8_t KVALUES_MXFP4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

// dequant::e8m0_to_f32_half.
inline float e8m0_to_f32_half(uint8_t e) { return emu::bits_float(e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23); }

// dequant::k4_scale_min.
inline void k4_scale_min(int j, const uint8_t* q, int* sc, int* m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// dequant::dequantize_row, one block.
inline void dequantize_block(Type t, const uint8_t* b, float* y) {
    switch (t) {
        case F32: memcpy(y, b, 4); return;
        case F16: y[0] = read_f16(b); return;
        case BF16: y[0] = read_bf16(b); return;
        case Q8_0: {
            float d = read_f16(b);
            for (int j = 0; j < 32; ++j) y[j] = (float)(int8_t)b[2 + j] * d;
            return;
        }
        case Q4_0: {
            float d = read_f16(b);
            for (int j = 0; j < 16; ++j) {
                y[j] = (float)((b[2 + j] & 0xF) - 8) * d;
                y[j + 16] = (float)((b[2 + j] >> 4) - 8) * d;
            }
            return;
        }
        case Q5_0: {  // q5_values, then (q - 16)·d
            float d = read_f16(b);
            uint32_t qh = read_u32(b + 2);
            for (int j = 0; j < 16; ++j) {
                int h0 = ((qh >> j) << 4) & 0x10, h1 = (qh >> (j + 12)) & 0x10;
                y[j] = (float)(((b[6 + j] & 0xF) | h0) - 16) * d;
                y[j + 16] = (float)(((b[6 + j] >> 4) | h1) - 16) * d;
            }
            return;
        }
        case MXFP4: {
            float d = e8m0_to_f32_half(b[0]);
            for (int j = 0; j < 16; ++j) {
                y[j] = (float)KVALUES_MXFP4[b[1 + j] & 0xF] * d;
                y[j + 16] = (float)KVALUES_MXFP4[b[1 + j] >> 4] * d;
            }
            return;
        }
        case Q4_K: {
            float d = read_f16(b), dmin = read_f16(b + 2);
            for (int i = 0; i < 4; ++i) {
                int sc1, m1, sc2, m2;
                k4_scale_min(2 * i, b + 4, &sc1, &m1);
                k4_scale_min(2 * i + 1, b + 4, &sc2, &m2);
                float d1 = d * (float)sc1, mm1 = dmin * (float)m1, d2 = d * (float)sc2, mm2 = dmin * (float)m2;
                for (int l = 0; l < 32; ++l) {
                    uint8_t q = b[16 + 32 * i + l];
                    y[64 * i + l] = d1 * (float)(q & 0xF) - mm1;
                    y[64 * i + l + 32] = d2 * (float)(q >> 4) - mm2;
                }
            }
            return;
        }
        case Q6_K: {  // q6k_values, then (d·sc)·q
            int8_t v[256];
            for (int n = 0; n < 2; ++n) {
                const uint8_t* ql = b + 64 * n;
                const uint8_t* qh = b + 128 + 32 * n;
                for (int l = 0; l < 32; ++l) {
                    v[128 * n + l] = (int8_t)((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32;
                    v[128 * n + l + 32] = (int8_t)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                    v[128 * n + l + 64] = (int8_t)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                    v[128 * n + l + 96] = (int8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                }
            }
            float d = read_f16(b + 208);
            for (int s = 0; s < 16; ++s) {
                float ds = d * (float)(int8_t)b[192 + s];
                for (int l = 0; l < 16; ++l) y[16 * s + l] = ds * (float)v[16 * s + l];
            }
            return;
        }
    }
}

inline vector<float> dequantize_row(Type t, const uint8_t* row, int cols) {
    vector<float> y(cols);
    for (int b = 0; b < cols / block_size(t); ++b) dequantize_block(t, row + (size_t)b * type_size(t), &y[(size_t)b * block_size(t)]);
    return y;
}

// ---------------------------------------------------------------------------------------
// Activation quantizers (cpu/src/act.rs), as the kernels' layout: q one i8 per element, d
// one f32 per 32 elements.

// act.rs round_half_even: the FPU's nearest-even rounding through 1.5·2^23.
inline float round_half_even(float x) {
    const float magic = 12582912.0f;
    return (x + magic) - magic;
}

// act.rs block_q8_0 (with q8_scale), the scale as the f16 the CPU stores.
inline void quantize_q8_0(const float* x, int8_t* q, float* d) {
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
    float dd = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
    *d = f16_round(dd);
    for (int i = 0; i < 32; ++i) q[i] = (int8_t)round_half_even(x[i] * id);
}

// act.rs block_q8_k over 256 elements; its d repeated for each 32.
inline void quantize_q8_k(const float* x, int8_t* q, float* d) {
    float amax = 0.0f;
    for (int i = 0; i < 256; ++i) amax = std::max(amax, std::fabs(x[i]));
    float mx = 0.0f;
    for (int i = 0; i < 256; ++i)
        if (std::fabs(x[i]) == amax) {
            mx = x[i];
            break;
        }
    if (amax == 0.0f) {
        memset(q, 0, 256);
        for (int j = 0; j < 8; ++j) d[j] = 0.0f;
        return;
    }
    float iscale = -127.0f / mx;
    for (int i = 0; i < 256; ++i) q[i] = (int8_t)std::min((int)round_half_even(iscale * x[i]), 127);
    for (int j = 0; j < 8; ++j) d[j] = 1.0f / iscale;
}

// What cuda/src/bin/gpu_check.rs's ideal_gpu_matmul says quantize_q8 computes: d = amax /
// 127 in f32, q = x·(127 / amax) rounded to nearest even.
inline void quantize_q8_plain(const float* x, int8_t* q, float* d) {
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[i]));
    float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    *d = amax / 127.0f;
    for (int i = 0; i < 32; ++i) q[i] = (int8_t)nearbyintf(x[i] * inv);
}

// ---------------------------------------------------------------------------------------
// Float operations (cpu/src/ops.rs).

// ops::rms_norm of one segment: squares in f32 summed in f64, the mean rounded to f32.
inline void rms_norm(float* x, const float* w, int n, float eps) {
    double ss = 0.0;
    for (int i = 0; i < n; ++i) ss += (double)(x[i] * x[i]);
    float mean = (float)(ss / (double)n);
    float scale = 1.0f / sqrtf(mean + eps);
    for (int i = 0; i < n; ++i) x[i] = x[i] * scale * w[i];
}

// ops::rope_neox of one head.
inline void rope_neox(float* head, int d, uint32_t pos, float base, float freq_scale) {
    int half = d / 2;
    float theta_scale = powf(base, -2.0f / (float)d);
    float theta = (float)pos * freq_scale;
    for (int i = 0; i < half; ++i) {
        float s = sinf(theta), c = cosf(theta);
        float a = head[i], b = head[i + half];
        head[i] = a * c - b * s;
        head[i + half] = a * s + b * c;
        theta *= theta_scale;
    }
}

// ops::rope_norm of one head (factors: Llama 3's per-pair divisors, or null).
inline void rope_norm(float* head, int d, uint32_t pos, float base, float freq_scale, const float* factors) {
    float theta_scale = powf(base, -2.0f / (float)d);
    float theta_base = (float)pos;
    for (int i = 0; i < d / 2; ++i) {
        float factor = factors ? factors[i] : 1.0f;
        float angle = freq_scale * (theta_base / factor);
        float s = sinf(angle), c = cosf(angle);
        float a = head[2 * i], b = head[2 * i + 1];
        head[2 * i] = a * c - b * s;
        head[2 * i + 1] = a * s + b * c;
        theta_base *= theta_scale;
    }
}

// ops::Yarn.
struct Yarn {
    float freq_scale, ext_factor, attn_factor, corr_lo, corr_hi;

    // Yarn::new: llama.cpp's parameters for a context extended `factor` times.
    static Yarn make(int n_dims, float base, float factor, int orig_ctx) {
        const float beta_fast = 32.0f, beta_slow = 1.0f, pi = 3.14159265358979323846f;
        auto corr_dim = [&](float n_rot) {
            return (float)n_dims * logf((float)orig_ctx / (n_rot * 2.0f * pi)) / (2.0f * logf(base));
        };
        float start = std::max(floorf(corr_dim(beta_fast)), 0.0f);
        float end = std::min(ceilf(corr_dim(beta_slow)), (float)n_dims - 1.0f);
        float mscale = factor <= 1.0f ? 1.0f : 0.1f * logf(factor) + 1.0f;
        float attn_factor = mscale * (1.0f / (1.0f + 0.1f * logf(factor)));
        return Yarn{1.0f / factor, 1.0f, attn_factor, start, end};
    }
    // Yarn::deepseek.
    static Yarn deepseek(int n_dims, float base, float factor, int orig_ctx) {
        Yarn y = make(n_dims, base, factor, orig_ctx);
        y.attn_factor = 1.0f / (1.0f + 0.1f * logf(factor));
        return y;
    }
    // What the CUDA backend's host code hands the kernel as mscale (engine/src/backend/
    // cuda/ops.rs, Rope::yarn): attn_factor times the magnitude term.
    float host_mscale() const {
        float m = attn_factor;
        if (ext_factor != 0.0f) m *= 1.0f + 0.1f * logf(1.0f / freq_scale);
        return m;
    }
    // Yarn::cos_sin.
    void cos_sin(float theta_extrap, int i, float* c, float* s) const {
        float theta_interp = freq_scale * theta_extrap;
        float theta = theta_interp, mscale = attn_factor;
        if (ext_factor != 0.0f) {
            float y = ((float)i - corr_lo) / std::max(corr_hi - corr_lo, 0.001f);
            float ramp_mix = (1.0f - std::min(std::max(y, 0.0f), 1.0f)) * ext_factor;
            theta = theta_interp * (1.0f - ramp_mix) + theta_extrap * ramp_mix;
            mscale *= 1.0f + 0.1f * logf(1.0f / freq_scale);
        }
        *c = cosf(theta) * mscale;
        *s = sinf(theta) * mscale;
    }
};

// ops::rope_neox_yarn / ops::rope_norm_yarn of one head.
inline void rope_yarn(float* head, int d, uint32_t pos, float base, const Yarn& y, bool neox) {
    int half = d / 2;
    float theta_scale = powf(base, -2.0f / (float)d);
    float theta = (float)pos;
    for (int i = 0; i < half; ++i) {
        float c, s;
        y.cos_sin(theta, i, &c, &s);
        float* pa = neox ? &head[i] : &head[2 * i];
        float* pb = neox ? &head[i + half] : &head[2 * i + 1];
        float a = *pa, b = *pb;
        *pa = a * c - b * s;
        *pb = a * s + b * c;
        theta *= theta_scale;
    }
}

// ops::gelu_tanh_exact.
inline float gelu_tanh_exact(float x) {
    const float sqrt_2_over_pi = 0.7978846f;
    return 0.5f * x * (1.0f + tanhf(sqrt_2_over_pi * x * (1.0f + 0.044715f * x * x)));
}

// ops::gelu_tanh (the f16 table: f16(gelu(f16(x))), saturating outside ±10).
inline float gelu_tanh(float x) {
    if (x <= -10.0f) return 0.0f;
    if (x >= 10.0f) return x;
    return f16_round(gelu_tanh_exact(f16_round(x)));
}

// ops::swiglu, one element.
inline float swiglu(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// ops::swiglu_oai, one element.
inline float swiglu_oai(float g, float u, float alpha, float limit) {
    float x = std::min(g, limit);
    float y = std::min(std::max(u, -limit), limit);
    return x / (1.0f + expf(alpha * -x)) * (y + 1.0f);
}

// ops::softmax of one row in place (-inf entries become 0; a row of -inf all 0).
inline void softmax(float* x, int n) {
    float mx = -inf;
    for (int i = 0; i < n; ++i) mx = fmaxf(mx, x[i]);
    if (mx == -inf) {
        for (int i = 0; i < n; ++i) x[i] = 0.0f;
        return;
    }
    double sum = 0.0;
    for (int i = 0; i < n; ++i) {
        x[i] = expf(x[i] - mx);
        sum += (double)x[i];
    }
    float inv = (float)(1.0 / sum);
    for (int i = 0; i < n; ++i) x[i] *= inv;
}

// ---------------------------------------------------------------------------------------
// Mixture of experts (engine/src/model/moe.rs, as copied in cuda/src/bin/gpu_check/moe.rs).

// f32::total_cmp as a signed integer key.
inline int32_t total_key(float x) {
    int32_t i = (int32_t)emu::float_bits(x);
    return i ^ (int32_t)((uint32_t)(i >> 31) >> 1);
}

// moe.rs top_k: indices of the k largest by total_cmp, best first, ties to the lower index.
inline vector<int> top_k(const vector<float>& x, int k) {
    vector<int> order(x.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return total_key(x[a]) > total_key(x[b]); });
    order.resize(k);
    return order;
}

// moe.rs softmax: the sum in f64.
inline vector<float> moe_softmax(const vector<float>& row) {
    float mx = -inf;
    for (float v : row) mx = fmaxf(mx, v);
    vector<float> e(row.size());
    double sum = 0.0;
    for (size_t i = 0; i < row.size(); ++i) {
        e[i] = expf(row[i] - mx);
        sum += (double)e[i];
    }
    float inv = (float)(1.0 / sum);
    for (auto& v : e) v *= inv;
    return e;
}

enum Gating { SOFTMAX = 0, SOFTMAX_SELECTED = 1, SIGMOID = 2 };  // moe.cu's GATING_*

struct Routing {
    int n_expert, k;
    Gating gating;
    bool normalize;
    float scale;
    int groups, kept;  // groups 0: no group-limited routing
};

// moe.rs Routing::route for one token.
inline void route(const Routing& r, const float* logits, const float* sel_bias, int* ids, float* weights) {
    vector<float> row(logits, logits + r.n_expert), scores(r.n_expert);
    if (r.gating == SOFTMAX)
        scores = moe_softmax(row);
    else if (r.gating == SOFTMAX_SELECTED)
        scores = row;
    else
        for (int i = 0; i < r.n_expert; ++i) scores[i] = 1.0f / (1.0f + expf(-row[i]));
    vector<float> select = scores;
    if (sel_bias)
        for (int i = 0; i < r.n_expert; ++i) select[i] += sel_bias[i];
    int per_group = r.groups > 0 ? r.n_expert / r.groups : 0;
    if (r.groups > 1 && per_group > 0) {  // mask_weak_groups
        vector<float> group_scores;
        for (int g = 0; g < r.groups; ++g) {
            vector<float> gv(select.begin() + g * per_group, select.begin() + (g + 1) * per_group);
            float s = -0.0f;  // Rust's f32 sum starts from -0
            for (int i : top_k(gv, std::min(2, per_group))) s += gv[i];
            group_scores.push_back(s);
        }
        vector<int> keep = top_k(group_scores, r.kept);
        for (int g = 0; g < r.groups; ++g)
            if (std::find(keep.begin(), keep.end(), g) == keep.end())
                for (int i = 0; i < per_group; ++i) select[g * per_group + i] = -inf;
    }
    vector<int> chosen = top_k(select, r.k);
    vector<float> w;
    for (int e : chosen) w.push_back(scores[e]);
    if (r.gating == SOFTMAX_SELECTED) w = moe_softmax(w);
    if (r.normalize) {
        float s = -0.0f;
        for (float v : w) s += v;
        s = std::max(s, 6.1035156e-5f);
        for (auto& v : w) v /= s;
    }
    if (r.scale != 1.0f)
        for (auto& v : w) v *= r.scale;
    for (int j = 0; j < r.k; ++j) {
        ids[j] = chosen[j];
        weights[j] = w[j];
    }
}

// engine/src/sampler.rs argmax: the largest by `>` (NaN never wins), its first position, 0
// when there is none.
inline int argmax(const float* x, int n) {
    float mx = -inf;
    for (int i = 0; i < n; ++i)
        if (x[i] > mx) mx = x[i];
    for (int i = 0; i < n; ++i)
        if (x[i] == mx) return i;
    return 0;
}

}  // namespace ref
