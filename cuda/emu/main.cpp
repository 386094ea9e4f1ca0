// Runs every kernel of cuda/kernels/ under the CPU emulator (emu.h) against the CPU's
// definitions (reference.h), on seeded random inputs with ragged shapes. Built and run by
// cuda/tests/emulated.rs, which also checks that every kernel entry point was launched.
//
//   usage: emulated [GROUP]   (GROUP: a substring of the groups to run, e.g. attention)
//          emulated --selftest CASE   (one of selftest.h's rule-breaking kernels)
//
// Thresholds: bit-exact where the kernel promises the CPU's bits through IEEE operations
// alone (quantizers, embeddings, copies, element-wise updates, the MoE combine, argmax, the
// KV store) or where cuda/src/bin/gpu_check.rs asks for it; elsewhere a normalized squared
// error, Σ(got − want)² / Σ want², against the limit given with each check and why.
//
// Output: one line per check, then "kernels launched: ..." and "<n> checks, <m> failed".

#include "emu.h"
#include "reference.h"
#include "harness.h"
#include "selftest.h"

// The kernel sources, each as NVRTC compiles it (common.cuh, then the file) in its own
// namespace k_<file>, with inline PTX replaced by C++: written by cuda/tests/emulated.rs.
#include "kernels.inc"

using harness::check_bits;
using harness::check_equal;
using harness::check_nse;
using harness::fmt;
using harness::poisoned;
using harness::Rng;
using std::string;
using std::vector;
typedef unsigned char byte;

// ⌈a / b⌉.
static unsigned cdiv(size_t a, size_t b) { return (unsigned)((a + b - 1) / b); }

// The engine's grid for a grid-stride kernel (engine/src/backend/cuda/ops.rs stride_grid).
static dim3 stride_grid(size_t n) { return dim3((unsigned)std::min<size_t>(std::max<size_t>(cdiv(n, 256), 1), 1 << 20)); }

// =======================================================================================
// Activation quantizers: quantize.cu quantize_q8 (what gpu_check's products use) and
// backend.cu quantize_q8_0_exact / quantize_q8_k_exact (the CUDA backend's, promising the
// CPU's bytes). All bit-exact.

// Blocks of 32 floats of varied magnitudes, and the cases that decide the rounding: an
// all-zero block, halfway values (amax 127 makes the inverse scale exactly 1), a negative
// maximum.
static vector<float> q8_input(int n_blocks, Rng& rng) {
    vector<float> x;
    for (int b = 0; b < n_blocks; ++b) {
        float scale = powf(10.0f, (float)(b % 7) - 3.0f);
        for (int i = 0; i < 32; ++i) x.push_back(rng.uniform() * scale);
    }
    for (int i = 0; i < 32; ++i) x[i] = 0.0f;
    for (int i = 0; i < 32; ++i) x[32 + i] = i == 0 ? 127.0f : (float)(i - 16) + 0.5f;
    x[64 + 5] = -3.0f;
    return x;
}

// Blocks of 256 with the first-largest-magnitude rule's cases: a tie between +7 at 31
// (lane 31) and −7 at 32 (lane 0), −5 at 2 before +5 at 33, halfway values with iscale 1.
static vector<float> q8k_input(int n_blocks, Rng& rng) {
    vector<float> x;
    for (int b = 0; b < n_blocks; ++b) {
        float scale = powf(10.0f, (float)(b % 5) - 2.0f);
        for (int i = 0; i < 256; ++i) x.push_back(rng.uniform() * scale);
    }
    for (int i = 0; i < 256; ++i) x[i] = 0.0f;
    x[256 + 31] = 7.0f;
    x[256 + 32] = -7.0f;
    x[512 + 2] = -5.0f;
    x[512 + 33] = 5.0f;
    for (int i = 0; i < 256; ++i) x[768 + i] = (float)(i % 200 - 100) + 0.5f;
    x[768 + 7] = -127.0f;
    x[768 + 8] = 127.0f;
    return x;
}

static void check_quantizers(Rng& rng) {
    // The CUDA backend's launch: 8 warps (quantization blocks) per block of 256.
    for (int n_blocks : {37, 8}) {
        vector<float> x = q8_input(n_blocks, rng);
        size_t n = x.size();
        vector<int8_t> q(n, 99), want_q(n);
        vector<float> d = poisoned(n / 32), want_d(n / 32);
        for (size_t b = 0; b < n / 32; ++b) ref::quantize_q8_plain(&x[32 * b], &want_q[32 * b], &want_d[b]);
        EMU_LAUNCH(k_quantize::quantize_q8, dim3(cdiv(n_blocks, 8)), dim3(256), x.data(), q.data(), d.data(), n_blocks);
        check_equal(fmt("quantize_q8 %d blocks: q", n_blocks), q, want_q);
        check_bits(fmt("quantize_q8 %d blocks: d", n_blocks), d, want_d);

        std::fill(q.begin(), q.end(), 99);
        d = poisoned(n / 32);
        for (size_t b = 0; b < n / 32; ++b) ref::quantize_q8_0(&x[32 * b], &want_q[32 * b], &want_d[b]);
        EMU_LAUNCH(k_backend::quantize_q8_0_exact, dim3(cdiv(n_blocks, 8)), dim3(256), x.data(), q.data(), d.data(),
                   n_blocks);
        check_equal(fmt("quantize_q8_0_exact %d blocks vs act.rs block_q8_0: q", n_blocks), q, want_q);
        check_bits(fmt("quantize_q8_0_exact %d blocks vs act.rs block_q8_0: d", n_blocks), d, want_d);
    }
    for (int n_blocks : {11, 4}) {
        vector<float> x = q8k_input(n_blocks, rng);
        size_t n = x.size();
        vector<int8_t> q(n, 99), want_q(n);
        vector<float> d = poisoned(n / 32), want_d(n / 32);
        for (size_t b = 0; b < n / 256; ++b) ref::quantize_q8_k(&x[256 * b], &want_q[256 * b], &want_d[8 * b]);
        EMU_LAUNCH(k_backend::quantize_q8_k_exact, dim3(cdiv(n_blocks, 8)), dim3(256), x.data(), q.data(), d.data(),
                   n_blocks);
        check_equal(fmt("quantize_q8_k_exact %d blocks vs act.rs block_q8_k: q", n_blocks), q, want_q);
        check_bits(fmt("quantize_q8_k_exact %d blocks vs act.rs block_q8_k: d", n_blocks), d, want_d);
    }
}

// =======================================================================================
// Quantized products: matvec.cu matvec_*, matmul.cu matmul_* and matvec_id_*, on 8-bit
// activations quantized as the CPU does for the type (Q8_0, or Q8_K for the K-quants).
// Reference: the dequantized weights (dequant.rs) times those activations, in f64. The
// kernels' integer dot products are exact, so only f32 rounding separates them: limit 1e-10
// (gpu_check's limits, 2e-6 and 5e-4, are against the engine, whose activations differ).

typedef void (*MatvecFn)(const byte*, const signed char*, const float*, float*, int, int, int);
typedef void (*MatmulFn)(const byte*, const signed char*, const float*, float*, int, int, int, int);
typedef void (*MatvecIdFn)(const byte*, const int*, const signed char*, const float*, const float*, float*, int, int,
                           int, int, int);

struct ProductKernels {
    ref::Type type;
    const char* matvec_name;
    MatvecFn matvec;
    const char* matmul_name;
    MatmulFn matmul;
    const char* id_name;
    MatvecIdFn id;
};
#define PRODUCT_KERNELS(TYPE, SUFFIX)                                                                             \
    ProductKernels {                                                                                              \
        ref::TYPE, "matvec_" #SUFFIX, k_matvec::matvec_##SUFFIX, "matmul_" #SUFFIX, k_matmul::matmul_##SUFFIX,     \
            "matvec_id_" #SUFFIX, k_matmul::matvec_id_##SUFFIX                                                    \
    }

// Rows of 8-bit activations as the kernels read them: q [rows][cols], d [rows][cols / 32].
struct Acts {
    vector<int8_t> q;
    vector<float> d;
};

static Acts quantize_acts(ref::Type t, const vector<float>& x) {
    Acts a{vector<int8_t>(x.size()), vector<float>(x.size() / 32)};
    int block = ref::uses_q8_k(t) ? 256 : 32;
    for (size_t b = 0; b < x.size() / block; ++b) {
        if (block == 256)
            ref::quantize_q8_k(&x[256 * b], &a.q[256 * b], &a.d[8 * b]);
        else
            ref::quantize_q8_0(&x[32 * b], &a.q[32 * b], &a.d[b]);
    }
    return a;
}

// Σ w[i]·q[i]·d[i / 32] in f64 for activation row `row`.
static double act_dot(const vector<float>& w, const Acts& a, size_t row, int cols) {
    double s = 0.0;
    const int8_t* q = &a.q[row * cols];
    const float* d = &a.d[row * cols / 32];
    for (int i = 0; i < cols; ++i) s += (double)w[i] * ((double)q[i] * (double)d[i / 32]);
    return s;
}

static void check_products(Rng& rng) {
    const ProductKernels kernels[] = {
        PRODUCT_KERNELS(Q8_0, q8_0),   PRODUCT_KERNELS(Q4_0, q4_0), PRODUCT_KERNELS(Q5_0, q5_0),
        PRODUCT_KERNELS(MXFP4, mxfp4), PRODUCT_KERNELS(Q4_K, q4_k), PRODUCT_KERNELS(Q6_K, q6_k),
    };
    const int rows_per_block = 4, tokens_per_tile = 8;  // the CUDA backend's tiles
    for (const ProductKernels& k : kernels) {
        const ref::Type t = k.type;
        const bool kq = ref::block_size(t) == 256;
        struct Shape {
            int rows, cols;
            vector<int> tokens;
        };
        // Rows not a multiple of 4; pieces (32 columns) fewer than a warp's lanes, and not a
        // multiple of 32; token counts around the tile of 8.
        const Shape shapes[] = {{37, 512, {1, 3, 8, 9, 17}}, {5, kq ? 2304 : 1440, {2, 11}}, {98, kq ? 256 : 64, {1, 8}}};
        for (const Shape& s : shapes) {
            const int blocks = s.cols / ref::block_size(t), rb = (int)ref::row_bytes(t, s.cols);
            vector<byte> w = harness::random_weights(t, s.rows, s.cols, rng);
            vector<vector<float>> deq;
            for (int r = 0; r < s.rows; ++r) deq.push_back(ref::dequantize_row(t, &w[(size_t)r * rb], s.cols));
            for (int tokens : s.tokens) {
                Acts a = quantize_acts(t, rng.floats((size_t)tokens * s.cols));
                vector<float> want((size_t)tokens * s.rows);
                for (int tt = 0; tt < tokens; ++tt)
                    for (int r = 0; r < s.rows; ++r) want[(size_t)tt * s.rows + r] = (float)act_dot(deq[r], a, tt, s.cols);
                vector<float> y = poisoned(want.size());
                emu::launch(k.matmul_name, dim3(cdiv(s.rows, rows_per_block), cdiv(tokens, tokens_per_tile)),
                            dim3(32, rows_per_block), k.matmul, w.data(), a.q.data(), a.d.data(), y.data(), s.rows,
                            blocks, rb, tokens);
                check_nse(fmt("%s %dx%d x%d", k.matmul_name, s.rows, s.cols, tokens), y, want, 1e-10);
                if (tokens <= 3) {
                    y = poisoned(want.size());
                    emu::launch(k.matvec_name, dim3(cdiv(s.rows, rows_per_block), tokens), dim3(32, rows_per_block),
                                k.matvec, w.data(), a.q.data(), a.d.data(), y.data(), s.rows, blocks, rb);
                    check_nse(fmt("%s %dx%d x%d", k.matvec_name, s.rows, s.cols, tokens), y, want, 1e-10);
                }
            }
        }

        // Experts (MoE): 5 experts of 37 rows; 3 tokens, 2 slots each. Gate/up read one input
        // row per token (x_per_slot 0), down one per slot (1) and adds a bias.
        const int n_expert = 5, rows = 37, cols = 512, tokens = 3, k_used = 2;
        const int blocks = cols / ref::block_size(t), rb = (int)ref::row_bytes(t, cols);
        vector<byte> w = harness::random_weights(t, n_expert * rows, cols, rng);
        const vector<int> ids = {4, 1, 0, 4, 2, 3};
        vector<float> bias = rng.floats((size_t)n_expert * rows, 0.1f);
        for (int per_slot = 0; per_slot < 2; ++per_slot) {
            int act_rows = per_slot ? tokens * k_used : tokens;
            Acts a = quantize_acts(t, rng.floats((size_t)act_rows * cols));
            vector<float> want((size_t)tokens * k_used * rows);
            for (int slot = 0; slot < tokens * k_used; ++slot) {
                int e = ids[slot], row = per_slot ? slot : slot / k_used;
                for (int r = 0; r < rows; ++r) {
                    vector<float> wr = ref::dequantize_row(t, &w[((size_t)e * rows + r) * rb], cols);
                    want[(size_t)slot * rows + r] =
                        (float)(act_dot(wr, a, row, cols) + (per_slot ? (double)bias[(size_t)e * rows + r] : 0.0));
                }
            }
            vector<float> y = poisoned(want.size());
            emu::launch(k.id_name, dim3(cdiv(rows, rows_per_block), tokens * k_used), dim3(32, rows_per_block), k.id,
                        w.data(), ids.data(), a.q.data(), a.d.data(), per_slot ? bias.data() : nullptr, y.data(), rows,
                        blocks, rb, k_used, per_slot);
            check_nse(fmt("%s %d experts of %dx%d, %s", k.id_name, n_expert, rows, cols,
                          per_slot ? "input per slot, bias" : "input per token"),
                      y, want, 1e-10);
        }
    }
}

// backend.cu matmul_float_*: float weights times f32 activations (the CPU's ActType::F32
// products). Reference: the same in f64; f32 summation over ≤ 1000 columns leaves ~1e-13.
typedef void (*FloatProductFn)(const byte*, const float*, float*, int, int, int);

static void check_float_products(Rng& rng) {
    struct {
        ref::Type type;
        const char* name;
        FloatProductFn f;
    } kernels[] = {{ref::F32, "matmul_float_f32", k_backend::matmul_float_f32},
                   {ref::F16, "matmul_float_f16", k_backend::matmul_float_f16},
                   {ref::BF16, "matmul_float_bf16", k_backend::matmul_float_bf16}};
    for (auto& k : kernels) {
        for (int cols : {100, 1000}) {
            const int rows = 37;
            vector<byte> w = harness::random_weights(k.type, rows, cols, rng);
            vector<vector<float>> deq;
            for (int r = 0; r < rows; ++r) deq.push_back(ref::dequantize_row(k.type, &w[ref::row_bytes(k.type, cols) * r], cols));
            for (int tokens : {1, 3, 8, 9, 17}) {
                vector<float> x = rng.floats((size_t)tokens * cols), want((size_t)tokens * rows);
                for (int tt = 0; tt < tokens; ++tt)
                    for (int r = 0; r < rows; ++r) {
                        double s = 0.0;
                        for (int c = 0; c < cols; ++c) s += (double)deq[r][c] * x[(size_t)tt * cols + c];
                        want[(size_t)tt * rows + r] = (float)s;
                    }
                vector<float> y = poisoned(want.size());
                emu::launch(k.name, dim3(cdiv(rows, 4), cdiv(tokens, 8)), dim3(32, 4), k.f, w.data(), x.data(), y.data(),
                            rows, cols, tokens);
                check_nse(fmt("%s %dx%d x%d", k.name, rows, cols, tokens), y, want, 1e-10);
            }
        }
    }
}

// =======================================================================================
// embed.cu: rows of the table, dequantized and scaled, against the CPU backend's embed
// (matmul::get_row, then × scale): the same bits (gpu_check's check is exact too).

typedef void (*EmbedFn)(const byte*, const int*, float*, int, float);

static void check_embed(Rng& rng) {
    struct {
        ref::Type type;
        const char* name;
        EmbedFn f;
    } kernels[] = {
        {ref::F32, "embed_f32", k_embed::embed_f32},    {ref::F16, "embed_f16", k_embed::embed_f16},
        {ref::BF16, "embed_bf16", k_embed::embed_bf16}, {ref::Q8_0, "embed_q8_0", k_embed::embed_q8_0},
        {ref::Q4_0, "embed_q4_0", k_embed::embed_q4_0}, {ref::Q5_0, "embed_q5_0", k_embed::embed_q5_0},
        {ref::Q4_K, "embed_q4_k", k_embed::embed_q4_k}, {ref::Q6_K, "embed_q6_k", k_embed::embed_q6_k},
    };
    const vector<int> ids = {3, 0, 49, 17, 3};
    const float scale = 25.3f;
    for (auto& k : kernels) {
        // 640 columns (gemma3:270m's) is not a multiple of the block's 256 threads.
        for (int cols : {512, 640}) {
            if (cols % ref::block_size(k.type)) continue;
            const int vocab = 50;
            vector<byte> table = harness::random_weights(k.type, vocab, cols, rng);
            vector<float> want;
            for (int id : ids)
                for (float v : ref::dequantize_row(k.type, &table[ref::row_bytes(k.type, cols) * id], cols)) want.push_back(v * scale);
            vector<float> y = poisoned(want.size());
            emu::launch(k.name, dim3((unsigned)ids.size()), dim3(256), k.f, table.data(), ids.data(), y.data(), cols, scale);
            check_bits(fmt("%s %dx%d vs get_row x scale", k.name, vocab, cols), y, want);
        }
    }
}

// =======================================================================================
// elementwise.cu, against ops.rs with gpu_check's limits: rms_norm 1e-10 (f32 sums against
// the CPU's f64), rope 1e-4 (one powf per pair against the CPU's repeated products: up to
// ~1e-2 rad apart at position 4000), the activations and softmax 1e-10.

static void check_elementwise(Rng& rng) {
    {
        const int rows = 5, cols = 640;
        vector<float> x = rng.floats(rows * cols), w(cols);
        for (auto& v : w) v = 1.0f + 0.5f * rng.uniform();
        vector<float> want = x, y = poisoned(x.size());
        for (int r = 0; r < rows; ++r) ref::rms_norm(&want[r * cols], w.data(), cols, 1e-6f);
        EMU_LAUNCH(k_elementwise::rms_norm, dim3(rows), dim3(256), x.data(), w.data(), y.data(), cols, 1e-6f);
        check_nse("rms_norm 5x640 vs ops::rms_norm", y, want, 1e-10);
    }
    {
        const int rows = 5, head_dim = 64, cols = 3 * head_dim, n_pairs = rows * cols / 2;
        const vector<int> pos = {0, 7, 100, 1000, 4000};
        for (int neox = 1; neox >= 0; --neox) {
            vector<float> x = rng.floats(rows * cols), want = x;
            const float base = 10000.0f, freq_scale = neox ? 1.0f : 0.5f;
            for (int r = 0; r < rows; ++r)
                for (int h = 0; h < cols / head_dim; ++h) {
                    float* head = &want[r * cols + h * head_dim];
                    if (neox)
                        ref::rope_neox(head, head_dim, pos[r], base, freq_scale);
                    else
                        ref::rope_norm(head, head_dim, pos[r], base, freq_scale, nullptr);
                }
            if (neox)
                EMU_LAUNCH(k_elementwise::rope_neox, dim3(cdiv(n_pairs, 256)), dim3(256), x.data(), pos.data(), cols,
                           head_dim, base, freq_scale, n_pairs);
            else
                EMU_LAUNCH(k_elementwise::rope_norm, dim3(cdiv(n_pairs, 256)), dim3(256), x.data(), pos.data(), cols,
                           head_dim, base, freq_scale, n_pairs);
            check_nse(neox ? "rope_neox vs ops::rope_neox" : "rope_norm vs ops::rope_norm (freq_scale 0.5)", x, want, 1e-4);
        }
    }
    {
        const int n = 5 * 640 + 17;
        vector<float> gate = rng.floats(n, 6.0f), up = rng.floats(n);
        vector<float> g = gate, want(n);
        for (int i = 0; i < n; ++i) want[i] = ref::gelu_tanh_exact(gate[i]) * up[i];
        EMU_LAUNCH(k_elementwise::geglu, dim3(cdiv(n, 256)), dim3(256), g.data(), up.data(), n);
        check_nse("geglu vs ops::gelu_tanh_exact", g, want, 1e-10);
        g = gate;
        for (int i = 0; i < n; ++i) want[i] = ref::swiglu(gate[i], up[i]);
        EMU_LAUNCH(k_elementwise::swiglu, dim3(cdiv(n, 256)), dim3(256), g.data(), up.data(), n);
        check_nse("swiglu vs ops::swiglu", g, want, 1e-10);
        g = gate;
        vector<float> up_wide = rng.floats(n, 10.0f);
        const float alpha = 1.702f, limit = 7.0f;
        for (int i = 0; i < n; ++i) want[i] = ref::swiglu_oai(gate[i] * 2.0f, up_wide[i], alpha, limit);
        for (auto& v : g) v *= 2.0f;  // some gates above the limit
        EMU_LAUNCH(k_elementwise::swiglu_oai, dim3(cdiv(n, 256)), dim3(256), g.data(), up_wide.data(), n, alpha, limit);
        check_nse("swiglu_oai vs ops::swiglu_oai", g, want, 1e-10);
    }
    {
        // Rows of scores; one with −∞ entries, one all −∞ (all 0 on the CPU).
        const int rows = 5, cols = 700;
        vector<float> x = rng.floats(rows * cols, 8.0f);
        for (int i = 0; i < cols; i += 3) x[cols + i] = -ref::inf;
        for (int i = 0; i < cols; ++i) x[2 * cols + i] = -ref::inf;
        vector<float> want = x;
        for (int r = 0; r < rows; ++r) ref::softmax(&want[r * cols], cols);
        EMU_LAUNCH(k_elementwise::softmax_rows, dim3(rows), dim3(256), x.data(), cols);
        check_nse("softmax_rows 5x700 vs ops::softmax", x, want, 1e-10);
    }
}

// =======================================================================================
// backend.cu's float operations (all but the quantizers and float products), with the CUDA
// backend's launches (engine/src/backend/cuda/ops.rs). Those made of IEEE operations the
// kernel rounds as the CPU does are bit-exact; rope_exact and geglu_exact call sincosf /
// tanhf, a few ulp apart on a GPU, hence limits: 1e-12 for RoPE (ulp-level; the CPU's
// repeated products replaced by a powf give ~1e-5 at position 32767) and 1e-9 for GeGLU (a
// few f16 roundings may flip; skipping one of the two f16 roundings gives ~1e-7).

static void check_backend_ops(Rng& rng) {
    // RMSNorm of whole rows and of heads, blockDim as the backend picks it.
    struct {
        int rows, cols, seg;
    } norms[] = {{5, 640, 640}, {3, 512, 64}, {4, 300, 100}, {2, 4096, 4096}};
    for (auto& c : norms) {
        vector<float> x = rng.floats((size_t)c.rows * c.cols, 3.0f), w(c.seg);
        for (auto& v : w) v = 1.0f + 0.5f * rng.uniform();
        vector<float> want = x, y = poisoned(x.size());
        int segments = c.rows * c.cols / c.seg;
        for (int s = 0; s < segments; ++s) ref::rms_norm(&want[(size_t)s * c.seg], w.data(), c.seg, 1e-5f);
        unsigned threads = std::min((c.seg + 31) / 32 * 32, 256);
        EMU_LAUNCH(k_backend::rms_norm_exact, dim3(segments), dim3(threads), x.data(), w.data(), y.data(), c.seg, 1e-5f);
        check_bits(fmt("rms_norm_exact %dx%d, segments of %d vs ops::rms_norm", c.rows, c.cols, c.seg), y, want);
    }

    // RoPE: plain NEOX and normal (with and without Llama 3's factors), YaRN (NEOX, normal
    // with DeepSeek's factor, and ext_factor 0).
    {
        const vector<int> pos = {0, 7, 100, 4000, 32767};
        const int rows = (int)pos.size();
        struct Case {
            const char* name;
            bool neox;
            int head_dim, heads;
            float base, freq_scale;
            bool factors;
            int yarn;  // 0 plain, 1 Yarn::new, 2 Yarn::deepseek, 3 ext_factor 0
        } cases[] = {
            {"neox hd64", true, 64, 3, 10000.0f, 1.0f, false, 0},
            {"norm hd128 with factors, freq_scale 0.25", false, 128, 2, 500000.0f, 0.25f, true, 0},
            {"norm hd64", false, 64, 3, 10000.0f, 1.0f, false, 0},
            {"neox hd128 yarn x4", true, 128, 2, 1000000.0f, 1.0f, false, 1},
            {"norm hd64 yarn deepseek x40", false, 64, 3, 10000.0f, 1.0f, false, 2},
            {"neox hd64 yarn ext_factor 0", true, 64, 1, 10000.0f, 1.0f, false, 3},
        };
        for (const Case& c : cases) {
            const int cols = c.heads * c.head_dim, n_pairs = rows * cols / 2;
            vector<float> x = rng.floats((size_t)rows * cols, 2.0f), want = x;
            vector<float> factors(c.head_dim / 2);
            for (auto& f : factors) f = 1.0f + 4.0f * (rng.uniform() + 1.0f);
            ref::Yarn y{};
            if (c.yarn == 1) y = ref::Yarn::make(c.head_dim, c.base, 4.0f, 8192);
            if (c.yarn == 2) y = ref::Yarn::deepseek(c.head_dim, c.base, 40.0f, 4096);
            if (c.yarn == 3) y = ref::Yarn{0.5f, 0.0f, 1.0f, 0.0f, 0.0f};
            for (int r = 0; r < rows; ++r)
                for (int h = 0; h < c.heads; ++h) {
                    float* head = &want[(size_t)r * cols + h * c.head_dim];
                    if (c.yarn)
                        ref::rope_yarn(head, c.head_dim, pos[r], c.base, y, c.neox);
                    else if (c.neox)
                        ref::rope_neox(head, c.head_dim, pos[r], c.base, c.freq_scale);
                    else
                        ref::rope_norm(head, c.head_dim, pos[r], c.base, c.freq_scale, c.factors ? factors.data() : nullptr);
                }
            // The host's parameters (engine/src/backend/cuda/ops.rs Rope::plain / Rope::yarn).
            float theta_scale = powf(c.base, -2.0f / (float)c.head_dim);
            float freq_scale = c.yarn ? y.freq_scale : c.freq_scale;
            float ext = c.yarn ? y.ext_factor : 0.0f, mscale = c.yarn ? y.host_mscale() : 1.0f;
            float lo = c.yarn ? y.corr_lo : 0.0f, hi = c.yarn ? y.corr_hi : 0.0f;
            EMU_LAUNCH(k_backend::rope_exact, dim3(cdiv(n_pairs, 256)), dim3(256), x.data(), pos.data(),
                       c.factors ? factors.data() : nullptr, cols, c.head_dim, (int)c.neox, n_pairs, theta_scale,
                       freq_scale, c.yarn ? 1 : 0, ext, mscale, lo, hi);
            check_nse(fmt("rope_exact %s vs ops.rs", c.name), x, want, 1e-12);
        }
    }

    // GeGLU over [−12, 12], the saturation points ±10 and their neighbours included.
    {
        const long long n = 3000;
        vector<float> gate = rng.floats(n, 12.0f), up = rng.floats(n);
        const float edges[] = {-10.0f, 10.0f, nextafterf(-10.0f, 0.0f), nextafterf(10.0f, 0.0f), 0.0f, -0.0f};
        for (int i = 0; i < 6; ++i) gate[i] = edges[i];
        vector<float> want(n);
        for (long long i = 0; i < n; ++i) want[i] = ref::gelu_tanh(gate[i]) * up[i];
        vector<float> g = gate;
        EMU_LAUNCH(k_backend::geglu_exact, stride_grid(n), dim3(256), g.data(), up.data(), n);
        check_nse("geglu_exact vs ops::geglu (f16 table)", g, want, 1e-9);
        g = gate;  // a grid smaller than the elements: the grid-stride loop
        EMU_LAUNCH(k_backend::geglu_exact, dim3(2), dim3(256), g.data(), up.data(), n);
        check_nse("geglu_exact, 2 blocks", g, want, 1e-9);
    }

    // Element-wise updates, each with the backend's grid and with 3 blocks (grid-stride).
    for (unsigned blocks : {0u, 3u}) {
        const int rows = 7, cols = 333;
        const long long n = rows * cols;
        const dim3 grid = blocks ? dim3(blocks) : stride_grid(n);
        const string how = blocks ? fmt(", %u blocks", blocks) : string();
        vector<float> x = rng.floats(n, 5.0f), y0 = rng.floats(n, 5.0f), bias = rng.floats(cols);
        vector<float> got = x, want = x;
        for (auto& v : want) v *= 0.37f;
        EMU_LAUNCH(k_backend::scale_exact, grid, dim3(256), got.data(), 0.37f, n);
        check_bits("scale_exact" + how, got, want);
        got = y0;
        for (long long i = 0; i < n; ++i) want[i] = y0[i] + x[i];
        EMU_LAUNCH(k_backend::add_exact, grid, dim3(256), got.data(), x.data(), n);
        check_bits("add_exact" + how, got, want);
        got = x;
        for (long long i = 0; i < n; ++i) want[i] = x[i] + bias[i % cols];
        EMU_LAUNCH(k_backend::add_bias_rows, grid, dim3(256), got.data(), bias.data(), cols, n);
        check_bits("add_bias_rows" + how, got, want);
    }

    // y[rows[i]] += w[i]·x[i] in order, rows repeating (the CPU's add_scaled_rows).
    {
        const int y_rows = 6, cols = 1000;
        const vector<int> rows = {2, 0, 2, 5, 2, 1, 5};
        const int n = (int)rows.size();
        vector<float> y = rng.floats((size_t)y_rows * cols), x = rng.floats((size_t)n * cols, 100.0f), w = rng.floats(n);
        vector<float> want = y;
        for (int i = 0; i < n; ++i)
            for (int c = 0; c < cols; ++c) want[(size_t)rows[i] * cols + c] += w[i] * x[(size_t)i * cols + c];
        for (unsigned blocks : {cdiv(cols, 256), 1u}) {
            vector<float> got = y;
            EMU_LAUNCH(k_backend::add_scaled_rows, dim3(blocks), dim3(256), got.data(), x.data(), rows.data(), w.data(), n,
                       cols);
            check_bits(fmt("add_scaled_rows %d rows into %d, %u blocks", n, y_rows, blocks), got, want);
        }
    }

    // Gathers and copies (select_rows, gather_cols, concat_cols on the CPU).
    {
        const int x_rows = 9, x_cols = 50;
        vector<float> x = rng.floats((size_t)x_rows * x_cols);
        const vector<int> pick = {8, 0, 3, 3, 7};
        const long long n = (long long)pick.size() * x_cols;
        vector<float> want;
        for (int r : pick) want.insert(want.end(), &x[(size_t)r * x_cols], &x[(size_t)(r + 1) * x_cols]);
        for (unsigned blocks : {0u, 1u}) {
            vector<float> got = poisoned(n);
            EMU_LAUNCH(k_backend::gather_rows, blocks ? dim3(blocks) : stride_grid(n), dim3(256), x.data(), pick.data(),
                       got.data(), x_cols, n);
            check_bits(fmt("gather_rows%s", blocks ? ", 1 block" : ""), got, want);
        }

        // Spans (start, len) of each row's columns, side by side.
        const int spans[][2] = {{5, 10}, {0, 3}, {40, 10}, {20, 1}};
        vector<int> src;
        for (auto& s : spans)
            for (int c = s[0]; c < s[0] + s[1]; ++c) src.push_back(c);
        const int out_cols = (int)src.size();
        const long long m = (long long)x_rows * out_cols;
        want.clear();
        for (int r = 0; r < x_rows; ++r)
            for (int c : src) want.push_back(x[(size_t)r * x_cols + c]);
        for (unsigned blocks : {0u, 1u}) {
            vector<float> got = poisoned(m);
            EMU_LAUNCH(k_backend::gather_cols, blocks ? dim3(blocks) : stride_grid(m), dim3(256), x.data(), src.data(),
                       got.data(), x_cols, out_cols, m);
            check_bits(fmt("gather_cols%s", blocks ? ", 1 block" : ""), got, want);
        }

        // Three parts of 7, 20 and 1 columns concatenated: every output cell written once.
        const int part_cols[] = {7, 20, 1}, total = 28;
        vector<vector<float>> parts;
        for (int pc : part_cols) parts.push_back(rng.floats((size_t)x_rows * pc));
        want.assign((size_t)x_rows * total, 0.0f);
        vector<float> got = poisoned(want.size());
        int at = 0;
        for (int p = 0; p < 3; ++p) {
            for (int r = 0; r < x_rows; ++r)
                for (int c = 0; c < part_cols[p]; ++c) want[(size_t)r * total + at + c] = parts[p][(size_t)r * part_cols[p] + c];
            const long long pn = (long long)x_rows * part_cols[p];
            EMU_LAUNCH(k_backend::copy_cols, p == 1 ? dim3(1) : stride_grid(pn), dim3(256), parts[p].data(), got.data(),
                       part_cols[p], total, at, pn);
            at += part_cols[p];
        }
        check_bits("copy_cols (a concat of 7, 20 and 1 columns)", got, want);
    }
}

// =======================================================================================
// attention.cu: kv_store, attn_split, attn_combine over a paged cache as the CPU backend
// lays it out (engine/src/backend/cpu.rs CpuKv; the layout in attention.cu's comment).
// kv_store: the whole pool bit-exact (cells it must not touch hold a sentinel). Attention:
// against the exact softmax in f64 over the stored keys and values with the unrounded
// queries, gpu_check's EXACT_LIMIT (1e-9). Splits past a row's keys must leave (−∞, 0).

struct AttnCase {
    const char* name;
    int n_heads, n_kv, hd, vd;
    bool shared_v;
    int window;  // 0: none
    bool sinks;
    int split_len;
};

// The ragged batch: (sequence, first position, rows). Sequence 0 decodes at a long
// position, 1 continues a short prompt, 2 is a prompt chunk, 3 a first token.
struct Span {
    int seq, first, n;
};
static const Span attn_batch[] = {{1, 40, 3}, {0, 300, 1}, {2, 90, 20}, {3, 0, 1}};
static const int attn_seqs = 4, block_tokens = 16;
static const uint32_t no_block = 0xffffffffu;

template <class T>
static float cache_load(const T& v) {
    if constexpr (sizeof(T) == 2) return ref::f16_to_f32(v); else return v;
}
template <class T>
static T cache_store(float x) {
    if constexpr (sizeof(T) == 2) return ref::f32_to_f16(x); else return x;
}

// The (kernel name, function) of attn_split for the cache type and head width.
template <class T>
static void launch_split(int width, dim3 grid, const float* q, const T* keys, const T* values, const uint32_t* tables,
                         const int* seqs, const int* pos, float* part_o, float* part_ml, int n_heads, int n_kv, int hd,
                         int vd, int kv_dim, int shared_v, int stride, int window, float scale, int split_len) {
    const dim3 block(32, 4);
#define EMU_SPLIT_ARGS q, keys, values, tables, seqs, pos, part_o, part_ml, n_heads, n_kv, hd, vd, kv_dim, shared_v, stride, window, scale, split_len
    if constexpr (sizeof(T) == 2) {
        if (width == 128) EMU_LAUNCH(k_attention::attn_split_f16_128, grid, block, EMU_SPLIT_ARGS);
        if (width == 256) EMU_LAUNCH(k_attention::attn_split_f16_256, grid, block, EMU_SPLIT_ARGS);
        if (width == 576) EMU_LAUNCH(k_attention::attn_split_f16_576, grid, block, EMU_SPLIT_ARGS);
    } else {
        if (width == 128) EMU_LAUNCH(k_attention::attn_split_f32_128, grid, block, EMU_SPLIT_ARGS);
        if (width == 256) EMU_LAUNCH(k_attention::attn_split_f32_256, grid, block, EMU_SPLIT_ARGS);
        if (width == 576) EMU_LAUNCH(k_attention::attn_split_f32_576, grid, block, EMU_SPLIT_ARGS);
    }
#undef EMU_SPLIT_ARGS
}

template <class T>
static void check_attention_case(const AttnCase& c, Rng& rng) {
    const bool f16 = sizeof(T) == 2;
    const string name = fmt("%s, %s cache", c.name, f16 ? "f16" : "f32");
    const int kv_dim = c.n_kv * c.hd, v_cols = c.n_kv * c.vd;
    const int group = c.n_heads / c.n_kv;

    // Block tables: each sequence's blocks up to its last position, those wholly before its
    // first query's window given back; block ids shuffled over a pool with spare blocks.
    vector<int> first(attn_seqs), end(attn_seqs);
    for (const Span& s : attn_batch) first[s.seq] = s.first, end[s.seq] = s.first + s.n;
    int stride = 0, needed = 0;
    for (int s = 0; s < attn_seqs; ++s) {
        stride = std::max(stride, (int)cdiv(end[s], block_tokens));
        needed += (int)cdiv(end[s], block_tokens);
    }
    const int n_blocks = needed + 7;
    vector<uint32_t> ids(n_blocks);
    std::iota(ids.begin(), ids.end(), 0u);
    for (int i = n_blocks - 1; i > 0; --i) std::swap(ids[i], ids[rng.below(i + 1)]);
    vector<uint32_t> tables((size_t)attn_seqs * stride, no_block);
    int next = 0;
    auto first_key = [&](int p) { return c.window > 0 ? std::max(0, p + 1 - c.window) : 0; };
    for (int s = 0; s < attn_seqs; ++s)
        for (int b = 0; b < (int)cdiv(end[s], block_tokens); ++b)
            if ((b + 1) * block_tokens > first_key(first[s])) tables[(size_t)s * stride + b] = ids[next++];
    auto at = [&](int s, int p) {
        uint32_t b = tables[(size_t)s * stride + p / block_tokens];
        return b == no_block ? (size_t)-1 : ((size_t)b * block_tokens + p % block_tokens) * kv_dim;
    };

    // The pool: a sentinel everywhere, each sequence's history in its held blocks.
    T sentinel;
    if constexpr (sizeof(T) == 2) sentinel = 0x7e01; else sentinel = emu::bits_float(0x7fc00123u);
    const size_t pool = (size_t)n_blocks * block_tokens * kv_dim;
    vector<T> keys(pool, sentinel), values(c.shared_v ? 0 : pool, sentinel);
    for (int s = 0; s < attn_seqs; ++s)
        for (int p = 0; p < first[s]; ++p) {
            size_t a = at(s, p);
            if (a == (size_t)-1) continue;
            for (int i = 0; i < kv_dim; ++i) keys[a + i] = cache_store<T>(rng.uniform());
            if (!c.shared_v)
                for (int i = 0; i < v_cols; ++i) values[a + i] = cache_store<T>(rng.uniform());
        }

    // The batch.
    vector<int> seqs, pos;
    for (const Span& s : attn_batch)
        for (int p = s.first; p < s.first + s.n; ++p) seqs.push_back(s.seq), pos.push_back(p);
    const int rows = (int)pos.size();
    vector<float> k_new = rng.floats((size_t)rows * kv_dim), v_new = rng.floats((size_t)rows * v_cols);
    vector<float> q = rng.floats((size_t)rows * c.n_heads * c.hd, 3.0f);
    vector<float> sinks;
    for (int h = 0; h < c.n_heads; ++h) sinks.push_back(1.0f + 2.0f * rng.uniform());
    const float scale = 1.0f / sqrtf((float)c.hd);

    // kv_store against Cells::write.
    vector<T> want_keys = keys, want_values = values;
    for (int i = 0; i < rows; ++i) {
        size_t a = at(seqs[i], pos[i]);
        for (int j = 0; j < kv_dim; ++j) want_keys[a + j] = cache_store<T>(k_new[(size_t)i * kv_dim + j]);
        if (!c.shared_v)
            for (int j = 0; j < v_cols; ++j) want_values[a + j] = cache_store<T>(v_new[(size_t)i * v_cols + j]);
    }
    T* values_arg = c.shared_v ? nullptr : values.data();
    if constexpr (f16)
        EMU_LAUNCH(k_attention::kv_store_f16, dim3(rows), dim3(128), keys.data(), values_arg, k_new.data(), v_new.data(),
                   tables.data(), seqs.data(), pos.data(), kv_dim, v_cols, kv_dim, stride);
    else
        EMU_LAUNCH(k_attention::kv_store_f32, dim3(rows), dim3(128), keys.data(), values_arg, k_new.data(), v_new.data(),
                   tables.data(), seqs.data(), pos.data(), kv_dim, v_cols, kv_dim, stride);
    {
        vector<uint32_t> got, want;
        for (size_t i = 0; i < pool; ++i) {
            got.push_back(emu::float_bits(cache_load(keys[i])));
            want.push_back(emu::float_bits(cache_load(want_keys[i])));
        }
        for (size_t i = 0; i < values.size(); ++i) {
            got.push_back(emu::float_bits(cache_load(values[i])));
            want.push_back(emu::float_bits(cache_load(want_values[i])));
        }
        check_equal(fmt("kv_store_%s %s: the pool", f16 ? "f16" : "f32", name.c_str()), got, want);
    }

    // attn_split over the splits the longest row needs, then attn_combine.
    int most = 0;
    for (int t = 0; t < rows; ++t) most = std::max(most, pos[t] + 1 - first_key(pos[t]));
    const int n_splits = (int)cdiv(most, c.split_len);
    const int width = std::max(c.hd, c.vd) <= 128 ? 128 : std::max(c.hd, c.vd) <= 256 ? 256 : 576;
    vector<float> part_o = poisoned((size_t)rows * c.n_heads * n_splits * c.vd);
    vector<float> part_ml = poisoned((size_t)rows * c.n_heads * n_splits * 2);
    const T* values_ptr = c.shared_v ? keys.data() : values.data();
    launch_split<T>(width, dim3(c.n_kv, rows, n_splits), q.data(), keys.data(), values_ptr, tables.data(), seqs.data(),
                    pos.data(), part_o.data(), part_ml.data(), c.n_heads, c.n_kv, c.hd, c.vd, kv_dim, (int)c.shared_v,
                    stride, c.window, scale, c.split_len);
    {
        vector<float> got, want;
        for (int t = 0; t < rows; ++t)
            for (int h = 0; h < c.n_heads; ++h)
                for (int z = 0; z < n_splits; ++z)
                    if (first_key(pos[t]) + z * c.split_len > pos[t]) {
                        size_t part = ((size_t)t * c.n_heads + h) * n_splits + z;
                        got.push_back(part_ml[2 * part]);
                        got.push_back(part_ml[2 * part + 1]);
                        want.push_back(-ref::inf);
                        want.push_back(0.0f);
                    }
        check_bits(fmt("attn_split %s: the empty splits' (m, l)", name.c_str()), got, want);
    }
    vector<float> out = poisoned((size_t)rows * c.n_heads * c.vd);
    EMU_LAUNCH(k_attention::attn_combine, dim3(c.n_heads, rows), dim3(128), part_o.data(), part_ml.data(),
               c.sinks ? sinks.data() : nullptr, out.data(), c.n_heads, c.vd, n_splits);

    // The exact softmax over the stored keys (lo..=pos) and the sink.
    vector<float> want(out.size());
    for (int t = 0; t < rows; ++t) {
        const int s = seqs[t], p = pos[t], lo = first_key(p);
        for (int h = 0; h < c.n_heads; ++h) {
            const int kvh = h / group;
            const float* qh = &q[((size_t)t * c.n_heads + h) * c.hd];
            vector<double> w;
            double mx = c.sinks ? (double)sinks[h] : -HUGE_VAL;
            for (int j = lo; j <= p; ++j) {
                double dot = 0.0;
                for (int i = 0; i < c.hd; ++i) dot += (double)qh[i] * cache_load(want_keys[at(s, j) + kvh * c.hd + i]);
                w.push_back(dot * scale);
                mx = std::max(mx, dot * scale);
            }
            double sum = c.sinks ? exp((double)sinks[h] - mx) : 0.0;
            for (auto& v : w) sum += (v = exp(v - mx));
            for (int d = 0; d < c.vd; ++d) {
                double acc = 0.0;
                for (int j = lo; j <= p; ++j) {
                    size_t a = at(s, j);
                    float v = c.shared_v ? cache_load(want_keys[a + kvh * c.hd + d]) : cache_load(want_values[a + kvh * c.vd + d]);
                    acc += w[j - lo] * v;
                }
                want[((size_t)t * c.n_heads + h) * c.vd + d] = (float)(acc / sum);
            }
        }
    }
    check_nse(fmt("attention %s (%d rows, %d splits of %d)", name.c_str(), rows, n_splits, c.split_len), out, want, 1e-9);
}

// attn_combine alone on crafted partial results: splits all empty (with and without a
// sink: 0, as the CPU's 0 for a zero sum), and a sink above every split's maximum.
static void check_combine_edges(Rng& rng) {
    const int n_heads = 3, vd = 200, n_splits = 4, rows = 2;
    vector<float> part_o = rng.floats((size_t)rows * n_heads * n_splits * vd), part_ml;
    for (int i = 0; i < rows * n_heads * n_splits; ++i) {
        bool empty = i < n_heads * n_splits || i % n_splits == 3;  // row 0 all empty
        part_ml.push_back(empty ? -ref::inf : 2.0f * rng.uniform());
        part_ml.push_back(empty ? 0.0f : 1.0f + 10.0f * (rng.uniform() + 1.0f));
    }
    const vector<float> sinks = {50.0f, -1.0f, 0.5f};
    for (bool with_sinks : {false, true}) {
        vector<float> out = poisoned((size_t)rows * n_heads * vd), want(out.size());
        for (int r = 0; r < rows; ++r)
            for (int h = 0; h < n_heads; ++h) {
                const float* ml = &part_ml[2 * ((size_t)r * n_heads + h) * n_splits];
                double big = with_sinks ? sinks[h] : -HUGE_VAL, sum = 0.0;
                for (int z = 0; z < n_splits; ++z) big = std::max(big, (double)ml[2 * z]);
                if (with_sinks && big > -HUGE_VAL) sum += exp(sinks[h] - big);
                for (int z = 0; z < n_splits; ++z)
                    if (ml[2 * z] > -ref::inf) sum += exp(ml[2 * z] - big) * ml[2 * z + 1];
                for (int d = 0; d < vd; ++d) {
                    double v = 0.0;
                    for (int z = 0; z < n_splits; ++z)
                        if (ml[2 * z] > -ref::inf)
                            v += exp(ml[2 * z] - big) * part_o[(((size_t)r * n_heads + h) * n_splits + z) * vd + d];
                    want[((size_t)r * n_heads + h) * vd + d] = sum == 0.0 ? 0.0f : (float)(v / sum);
                }
            }
        EMU_LAUNCH(k_attention::attn_combine, dim3(n_heads, rows), dim3(128), part_o.data(), part_ml.data(),
                   with_sinks ? sinks.data() : nullptr, out.data(), n_heads, vd, n_splits);
        vector<float> row0(out.begin(), out.begin() + n_heads * vd), zeros(n_heads * vd, 0.0f);
        check_bits(fmt("attn_combine, every split empty%s: zeros", with_sinks ? ", sinks" : ""), row0, zeros);
        check_nse(fmt("attn_combine, crafted splits%s", with_sinks ? ", a sink above every maximum" : ""), out, want, 1e-12);
    }
}

static void check_attention(Rng& rng) {
    // gpu_check's shapes, scaled down to keep the emulation quick, and the ragged ones:
    // head sizes not a multiple of 32, vd ≠ hd with separate values, an odd group.
    const AttnCase f16_cases[] = {
        {"llama GQA 8/2 hd128", 8, 2, 128, 128, false, 0, false, 64},
        {"gpt-oss 16/2 hd64, window 50, sinks", 16, 2, 64, 64, false, 50, true, 32},
        {"gemma3 4/1 hd256, window 100", 4, 1, 256, 256, false, 100, false, 48},
        {"deepseek MLA 2/1 576/512 shared V", 2, 1, 576, 512, true, 0, false, 128},
        {"hd192 vd128 4/2, window 1", 4, 2, 192, 128, false, 1, false, 64},
        {"hd96 6/3, one split", 6, 3, 96, 96, false, 0, true, 1000},
    };
    const AttnCase f32_cases[] = {
        {"llama GQA 8/2 hd128, sinks", 8, 2, 128, 128, false, 0, true, 64},
        {"gemma3 2/1 hd256, window 100", 2, 1, 256, 256, false, 100, false, 40},
        {"deepseek MLA 2/1 576/512 shared V", 2, 1, 576, 512, true, 0, false, 100},
    };
    for (const AttnCase& c : f16_cases) check_attention_case<uint16_t>(c, rng);
    for (const AttnCase& c : f32_cases) check_attention_case<float>(c, rng);
    check_combine_edges(rng);
}

// =======================================================================================
// moe.cu: moe_route against moe.rs Routing::route (experts exact, weights 1e-10 as
// gpu_check: expf rounding), moe_combine against Experts::forward's add in ascending expert
// order (bit-exact, as gpu_check).

static void check_moe(Rng& rng) {
    using ref::Routing;
    struct {
        const char* name;
        Routing r;
        int tokens;
        bool bias, ties;
    } cases[] = {
        {"mixtral softmax top-2 of 8", {8, 2, ref::SOFTMAX, true, 1.0f, 0, 0}, 9, false, false},
        {"qwen3moe softmax top-8 of 128, normalized", {128, 8, ref::SOFTMAX, true, 1.0f, 0, 0}, 7, false, true},
        {"gpt-oss top-4 of 32, then softmax", {32, 4, ref::SOFTMAX_SELECTED, false, 1.0f, 0, 0}, 5, false, true},
        {"deepseek-v3 sigmoid, bias, 4 of 8 groups, top-8 of 256, x2.5", {256, 8, ref::SIGMOID, true, 2.5f, 8, 4}, 6, true, false},
        {"deepseek-v2 softmax, 3 of 8 groups, top-6 of 160, x16", {160, 6, ref::SOFTMAX, false, 16.0f, 8, 3}, 4, false, true},
        {"512 experts, top-32 (the limits)", {512, 32, ref::SOFTMAX, true, 1.0f, 0, 0}, 3, false, false},
        {"groups of one expert, 8 of 32 kept, top-1", {32, 1, ref::SIGMOID, false, 1.0f, 32, 8}, 5, true, true},
    };
    for (auto& c : cases) {
        vector<float> logits = rng.floats((size_t)c.tokens * c.r.n_expert);
        for (auto& x : logits) x = c.ties ? roundf(x * 8.0f) / 2.0f : x * 4.0f;
        vector<float> bias = rng.floats(c.r.n_expert, 0.5f);
        vector<int> ids((size_t)c.tokens * c.r.k, -1), want_ids(ids.size());
        vector<float> w = poisoned(ids.size()), want_w(ids.size());
        for (int t = 0; t < c.tokens; ++t)
            ref::route(c.r, &logits[(size_t)t * c.r.n_expert], c.bias ? bias.data() : nullptr, &want_ids[(size_t)t * c.r.k],
                       &want_w[(size_t)t * c.r.k]);
        EMU_LAUNCH(k_moe::moe_route, dim3(cdiv(c.tokens, 4)), dim3(32, 4), logits.data(), c.bias ? bias.data() : nullptr,
                   ids.data(), w.data(), c.tokens, c.r.n_expert, c.r.k, (int)c.r.gating, (int)c.r.normalize, c.r.scale,
                   c.r.groups, c.r.kept);
        check_equal(fmt("moe_route %s: experts", c.name), ids, want_ids);
        check_nse(fmt("moe_route %s: weights", c.name), w, want_w, 1e-10);
    }

    // Combine: each token's experts distinct, in shuffled slot order; values of wide range
    // so that the order of the sums shows.
    for (int k : {4, 32}) {
        const int tokens = 5, d = 300, n_expert = 40;
        vector<int> ids;
        for (int t = 0; t < tokens; ++t) {
            vector<int> e(n_expert);
            std::iota(e.begin(), e.end(), 0);
            for (int i = n_expert - 1; i > 0; --i) std::swap(e[i], e[rng.below(i + 1)]);
            ids.insert(ids.end(), e.begin(), e.begin() + k);
        }
        vector<float> w = rng.floats((size_t)tokens * k), y = rng.floats((size_t)tokens * k * d);
        for (auto& v : y) v *= 1e3f * v;
        vector<float> out = poisoned((size_t)tokens * d), want((size_t)tokens * d, 0.0f);
        for (int t = 0; t < tokens; ++t)
            for (int e = 0; e < n_expert; ++e)
                for (int j = 0; j < k; ++j)
                    if (ids[(size_t)t * k + j] == e)
                        for (int col = 0; col < d; ++col)
                            want[(size_t)t * d + col] += w[(size_t)t * k + j] * y[((size_t)t * k + j) * d + col];
        EMU_LAUNCH(k_moe::moe_combine, dim3(tokens), dim3(256), y.data(), ids.data(), w.data(), out.data(), k, d);
        check_bits(fmt("moe_combine top-%d, %d values", k, d), out, want);
    }
}

// =======================================================================================
// sample.cu argmax_rows against engine/src/sampler.rs argmax, exact: gpu_check's rows of a
// 262144-token vocabulary (random, constant, NaN, −∞, a repeated maximum, ±0 among NaNs,
// the maximum last), a ragged width, and an empty row.

static void check_argmax(Rng& rng) {
    auto run = [&](const char* what, const vector<vector<float>>& rows, int cols, unsigned threads) {
        vector<float> x;
        for (auto& r : rows) x.insert(x.end(), r.begin(), r.end());
        vector<int> out(rows.size(), -1), want;
        for (auto& r : rows) want.push_back(ref::argmax(r.data(), cols));
        EMU_LAUNCH(k_sample::argmax_rows, dim3((unsigned)rows.size()), dim3(threads), x.data(), out.data(), cols);
        check_equal(fmt("argmax_rows %s (%zu rows of %d, %u threads)", what, rows.size(), cols, threads), out, want);
    };
    {
        const int cols = 262144;
        vector<vector<float>> rows;
        rows.push_back(rng.floats(cols, 30.0f));
        rows.push_back(vector<float>(cols, 2.0f));
        rows.push_back(vector<float>(cols, std::numeric_limits<float>::quiet_NaN()));
        rows.push_back(vector<float>(cols, -ref::inf));
        vector<float> twice = rng.floats(cols);
        twice[200000] = twice[1234] = 5.0f;
        rows.push_back(twice);
        vector<float> zeros(cols);
        for (int i = 0; i < cols; ++i) zeros[i] = i % 3 == 0 ? std::numeric_limits<float>::quiet_NaN() : -1.0f - (float)(i % 7);
        zeros[100] = -0.0f;
        zeros[50000] = 0.0f;
        rows.push_back(zeros);
        vector<float> last = rng.floats(cols);
        last[cols - 1] = 1.5f;
        rows.push_back(last);
        run("gpu_check's rows", rows, cols, 1024);
    }
    {
        const int cols = 1000;
        vector<vector<float>> rows = {rng.floats(cols), rng.floats(cols), vector<float>(cols, -ref::inf)};
        rows[1][999] = 7.0f;
        rows[1][998] = 7.0f;
        run("ragged", rows, cols, 256);
    }
    run("empty rows", vector<vector<float>>(2), 0, 64);
}

// =======================================================================================

int main(int argc, char** argv) {
    if (argc > 2 && string(argv[1]) == "--selftest") return selftest::run(argv[2]);
    if (argc > 1) harness::only = argv[1];
    Rng rng(0x9e3779b97f4a7c15ull);
    if (harness::wanted("quantize")) check_quantizers(rng);
    if (harness::wanted("matrix")) check_products(rng);
    if (harness::wanted("float_matrix")) check_float_products(rng);
    if (harness::wanted("embed")) check_embed(rng);
    if (harness::wanted("elementwise")) check_elementwise(rng);
    if (harness::wanted("backend_ops")) check_backend_ops(rng);
    if (harness::wanted("attention")) check_attention(rng);
    if (harness::wanted("moe")) check_moe(rng);
    if (harness::wanted("argmax")) check_argmax(rng);
    printf("kernels launched:");
    for (const string& k : emu::st.launched) printf(" %s", k.c_str());
    printf("\n%d checks, %d failed\n", harness::checks, harness::failures);
    return harness::failures ? 1 : 0;
}
