// The kernels the engine's CUDA backend (engine/src/backend/cuda/) needs beyond the other
// files: activation quantizers and float operations written to round as the CPU backend's
// code does (turbine-cpu's act.rs and ops.rs), so that a forward pass on the GPU stays
// within float-summation-order noise of the CPU's, and the small copies and gathers the
// backend seam asks for. Products and sums that the CPU rounds apart are written with
// __fmul_rn / __fadd_rn: NVRTC would otherwise fuse them into multiply-adds.
//
// Element counts that can pass 2^31 (a prompt's logits) are 64-bit, walked by a grid-stride
// loop; the host launches at most 2^20 blocks of 256 threads.

// f32 to f16 bits, rounded to nearest even (half::f16::from_f32).
__device__ __forceinline__ u16 to_f16_bits(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

// f rounded to the nearest f16, as an f32.
__device__ __forceinline__ float f16_round(float f) { return f16_to_f32(to_f16_bits(f)); }

__device__ __forceinline__ int warp_min_int(int v) {
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

#define GRID_STRIDE(i, n) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

// ---------------------------------------------------------------------------------------
// Activation quantization into the layout matvec.cu and matmul.cu read (q: i8 per element,
// d: one f32 scale per 32), with the CPU's rounding (turbine-cpu act.rs), so the integer
// dot products are the CPU's.

// Q8_0 (llama.cpp x86's quantizer): d = amax / 127, q = round_half_even(x · (127 / amax));
// the scale kept as the f16 the CPU stores. One warp per 32-element block, 8 per block.
//   x: [n_blocks·32] f32; q: [n_blocks·32] i8; d: [n_blocks] f32.
extern "C" __global__ void quantize_q8_0_exact(const float* __restrict__ x, i8* __restrict__ q,
                                               float* __restrict__ d, int n_blocks) {
    int block = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (block >= n_blocks) return;
    float v = x[(size_t)block * 32 + lane];
    float amax = warp_max(fabsf(v));
    float id = amax != 0.0f ? __fdiv_rn(127.0f, amax) : 0.0f;
    q[(size_t)block * 32 + lane] = (i8)__float2int_rn(__fmul_rn(v, id));
    if (lane == 0) d[block] = f16_round(__fdiv_rn(amax, 127.0f));
}

// Q8_K (ggml's quantize_row_q8_K_ref): the value of largest magnitude (the first one on
// ties) gives iscale = −127 / max; q = min(round_half_even(iscale · x), 127); d = 1 / iscale;
// an all-zero block is zeros. d is written once per 32 elements, the layout the dp4a kernels
// read. One warp per 256-element block (lane l holds elements l + 32j), 8 per block.
//   x: [n_blocks·256] f32; q: [n_blocks·256] i8; d: [n_blocks·8] f32.
extern "C" __global__ void quantize_q8_k_exact(const float* __restrict__ x, i8* __restrict__ q,
                                               float* __restrict__ d, int n_blocks) {
    int block = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (block >= n_blocks) return;
    const float* xb = x + (size_t)block * 256;
    i8* qb = q + (size_t)block * 256;
    float v[8];
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        v[j] = xb[lane + 32 * j];
        amax = fmaxf(amax, fabsf(v[j]));
    }
    amax = warp_max(amax);
    // This lane's first element of that magnitude (j ascending is index ascending), then the
    // warp's first.
    int first = 256;
#pragma unroll
    for (int j = 0; j < 8; ++j)
        if (first == 256 && fabsf(v[j]) == amax) first = lane + 32 * j;
    first = warp_min_int(first);
    if (amax == 0.0f || first == 256) {
#pragma unroll
        for (int j = 0; j < 8; ++j) qb[lane + 32 * j] = 0;
        if (lane < 8) d[(size_t)block * 8 + lane] = 0.0f;
        return;
    }
    float iscale = __fdiv_rn(-127.0f, xb[first]);
#pragma unroll
    for (int j = 0; j < 8; ++j) qb[lane + 32 * j] = (i8)min(__float2int_rn(__fmul_rn(iscale, v[j])), 127);
    if (lane < 8) d[(size_t)block * 8 + lane] = __fdiv_rn(1.0f, iscale);
}

// ---------------------------------------------------------------------------------------
// Float weights (F32, F16, BF16: routers, small models) times f32 activations, as the CPU
// does them (activation type F32): y[t][r] = W[r] · x[t]. A tile of FW_ROWS rows ×
// FW_TOKENS tokens per block, a warp per row, lanes over the columns (coalesced), each
// weight element read once per tile. Grid (⌈rows / FW_ROWS⌉, ⌈tokens / FW_TOKENS⌉), block
// (32, FW_ROWS).
//   w: [rows][cols] elements; x: [tokens][cols]; y: [tokens][rows].
#define FW_ROWS 4
#define FW_TOKENS 8

__device__ __forceinline__ float fw_f32(const u8* row, int c) { return ((const float*)row)[c]; }
__device__ __forceinline__ float fw_f16(const u8* row, int c) { return f16_to_f32(((const u16*)row)[c]); }
__device__ __forceinline__ float fw_bf16(const u8* row, int c) {
    return __uint_as_float((u32)((const u16*)row)[c] << 16);
}

#define MATMUL_FLOAT(NAME, LOAD, ELEM_BYTES)                                                           \
    extern "C" __global__ void __launch_bounds__(32 * FW_ROWS)                                         \
        NAME(const u8* __restrict__ w, const float* __restrict__ x, float* __restrict__ y, int rows,    \
             int cols, int tokens) {                                                                   \
        int r = blockIdx.x * FW_ROWS + threadIdx.y, t0 = blockIdx.y * FW_TOKENS;                       \
        if (r >= rows) return;                                                                         \
        int n = min(FW_TOKENS, tokens - t0);                                                           \
        const u8* row = w + (size_t)r * cols * ELEM_BYTES;                                             \
        const float* xt = x + (size_t)t0 * cols;                                                       \
        float acc[FW_TOKENS];                                                                          \
        _Pragma("unroll") for (int j = 0; j < FW_TOKENS; ++j) acc[j] = 0.0f;                          \
        for (int c = threadIdx.x; c < cols; c += 32) {                                                 \
            float wv = LOAD(row, c);                                                                   \
            _Pragma("unroll") for (int j = 0; j < FW_TOKENS; ++j) if (j < n) acc[j] +=                 \
                wv * xt[(size_t)j * cols + c];                                                         \
        }                                                                                              \
        _Pragma("unroll") for (int j = 0; j < FW_TOKENS; ++j) {                                        \
            float s = warp_sum(acc[j]);                                                                \
            if (threadIdx.x == 0 && j < n) y[(size_t)(t0 + j) * rows + r] = s;                         \
        }                                                                                              \
    }

MATMUL_FLOAT(matmul_float_f32, fw_f32, 4)
MATMUL_FLOAT(matmul_float_f16, fw_f16, 2)
MATMUL_FLOAT(matmul_float_bf16, fw_bf16, 2)

// ---------------------------------------------------------------------------------------
// RMSNorm as turbine-cpu's ops::rms_norm: squares rounded to f32 and summed in f64, the mean
// rounded to f32, scale = 1 / sqrt(mean + eps), y = (x · scale) · w. One block per segment
// of `cols` values (a whole row, or one head of a row: the segments are contiguous);
// blockDim a multiple of 32.
//   x, y: [segments][cols]; w: [cols].
__device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < (blockDim.x >> 5)) ? scratch[lane] : 0.0;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void rms_norm_exact(const float* __restrict__ x, const float* __restrict__ w,
                                          float* __restrict__ y, int cols, float eps) {
    __shared__ double scratch[32];
    const float* xr = x + (size_t)blockIdx.x * cols;
    float* yr = y + (size_t)blockIdx.x * cols;
    double ss = 0.0;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) ss += (double)__fmul_rn(xr[i], xr[i]);
    ss = block_sum_f64(ss, scratch);
    float mean = (float)(ss / (double)cols);
    float scale = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
    for (int i = threadIdx.x; i < cols; i += blockDim.x) yr[i] = __fmul_rn(__fmul_rn(xr[i], scale), w[i]);
}

// ---------------------------------------------------------------------------------------
// Rotary embeddings of every head of row r at position pos[r], in place, as turbine-cpu's
// rope_neox, rope_norm (with Llama 3's per-pair frequency divisors) and their YaRN variants:
// pair k's frequency is theta_scale^k built by k multiplications, as the CPU advances it
// (theta_scale = base^(−2 / head_dim), computed on the host the CPU's way). One thread per
// rotated pair.
//   x: [rows][cols], cols = heads · head_dim; pos: [rows]; factors: [head_dim / 2] or null;
//   neox: pairs (k, k + head_dim/2), else (2k, 2k + 1).
//   yarn = 0: the angle is freq_scale · p · theta_scale^k (NEOX: (p · freq_scale) ·
//   theta_scale^k, the CPU's order) over the factor; yarn = 1: ops::Yarn::cos_sin with
//   ext_factor, the corrective dims [corr_lo, corr_hi] and mscale (attn_factor times
//   YaRN's magnitude term, computed on the host).
__device__ __forceinline__ void yarn_cos_sin(float theta_extrap, int k, float freq_scale, float ext_factor,
                                             float mscale, float corr_lo, float corr_hi, float* c, float* s) {
    float theta_interp = __fmul_rn(freq_scale, theta_extrap), theta = theta_interp;
    if (ext_factor != 0.0f) {
        float y = __fdiv_rn(__fsub_rn((float)k, corr_lo), fmaxf(__fsub_rn(corr_hi, corr_lo), 0.001f));
        float ramp = __fmul_rn(__fsub_rn(1.0f, fminf(fmaxf(y, 0.0f), 1.0f)), ext_factor);
        theta = __fadd_rn(__fmul_rn(theta_interp, __fsub_rn(1.0f, ramp)), __fmul_rn(theta_extrap, ramp));
    }
    float sn, cs;
    sincosf(theta, &sn, &cs);
    *c = __fmul_rn(cs, mscale);
    *s = __fmul_rn(sn, mscale);
}

extern "C" __global__ void rope_exact(float* __restrict__ x, const int* __restrict__ pos,
                                      const float* __restrict__ factors, int cols, int head_dim, int neox,
                                      int n_pairs, float theta_scale, float freq_scale, int yarn,
                                      float ext_factor, float mscale, float corr_lo, float corr_hi) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_pairs) return;
    int half = head_dim / 2, per_row = cols / 2;
    int r = i / per_row, in_row = i % per_row, h = in_row / half, k = in_row % half;
    float* head = x + (size_t)r * cols + (size_t)h * head_dim;
    float p = (float)pos[r], c, s;
    if (yarn) {
        float theta = p;
        for (int j = 0; j < k; ++j) theta = __fmul_rn(theta, theta_scale);
        yarn_cos_sin(theta, k, freq_scale, ext_factor, mscale, corr_lo, corr_hi, &c, &s);
    } else if (neox) {
        float theta = __fmul_rn(p, freq_scale);
        for (int j = 0; j < k; ++j) theta = __fmul_rn(theta, theta_scale);
        sincosf(theta, &s, &c);
    } else {
        float theta_base = p;
        for (int j = 0; j < k; ++j) theta_base = __fmul_rn(theta_base, theta_scale);
        float factor = factors ? factors[k] : 1.0f;
        sincosf(__fmul_rn(freq_scale, __fdiv_rn(theta_base, factor)), &s, &c);
    }
    float* a = neox ? head + k : head + 2 * k;
    float* b = neox ? head + k + half : head + 2 * k + 1;
    float x0 = *a, x1 = *b;
    *a = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
    *b = __fadd_rn(__fmul_rn(x0, s), __fmul_rn(x1, c));
}

// ---------------------------------------------------------------------------------------
// GeGLU as the CPU computes it (ggml's GELU_FP16 table): the input rounded to f16, the
// tanh GELU of that in f32 rounded to f16 (the table's entry), 0 at or below −10 and x at
// or above 10; times up. In place on gate.
__device__ __forceinline__ float gelu_tanh_f32(float x) {
    // 0.5·x·(1 + tanh(√(2/π)·x·(1 + 0.044715·x²))), the CPU's order, nothing fused.
    float inner = __fmul_rn(__fmul_rn(0.7978846f, x), __fadd_rn(1.0f, __fmul_rn(__fmul_rn(0.044715f, x), x)));
    return __fmul_rn(__fmul_rn(0.5f, x), __fadd_rn(1.0f, tanhf(inner)));
}

extern "C" __global__ void geglu_exact(float* __restrict__ gate, const float* __restrict__ up, long long n) {
    GRID_STRIDE(i, n) {
        float x = gate[i], g;
        if (x <= -10.0f)
            g = 0.0f;
        else if (x >= 10.0f)
            g = x;
        else
            g = f16_round(gelu_tanh_f32(f16_round(x)));
        gate[i] = __fmul_rn(g, up[i]);
    }
}

// ---------------------------------------------------------------------------------------
// Element-wise updates, in place.

// x *= s.
extern "C" __global__ void scale_exact(float* __restrict__ x, float s, long long n) {
    GRID_STRIDE(i, n) x[i] = __fmul_rn(x[i], s);
}

// y += x.
extern "C" __global__ void add_exact(float* __restrict__ y, const float* __restrict__ x, long long n) {
    GRID_STRIDE(i, n) y[i] = __fadd_rn(y[i], x[i]);
}

// Every row of x += bias: x [n / cols][cols], bias [cols].
extern "C" __global__ void add_bias_rows(float* __restrict__ x, const float* __restrict__ bias, int cols,
                                         long long n) {
    GRID_STRIDE(i, n) x[i] = __fadd_rn(x[i], bias[i % cols]);
}

// y[rows[i]] += weights[i] · x[i] for i = 0, 1, ... in order (a row may repeat: each column
// takes its sums in the CPU's order), product and sum rounded apart. Threads over columns.
//   y: [.][cols]; x: [n][cols]; rows, weights: [n].
extern "C" __global__ void add_scaled_rows(float* __restrict__ y, const float* __restrict__ x,
                                           const int* __restrict__ rows, const float* __restrict__ weights, int n,
                                           int cols) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < cols; c += gridDim.x * blockDim.x) {
        for (int i = 0; i < n; ++i) {
            float* d = y + (size_t)rows[i] * cols + c;
            *d = __fadd_rn(*d, __fmul_rn(weights[i], x[(size_t)i * cols + c]));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Copies between layouts (indices checked on the host).

// out[i] = x[rows[i]]: x [.][cols], rows [n / cols], out [n / cols][cols].
extern "C" __global__ void gather_rows(const float* __restrict__ x, const int* __restrict__ rows,
                                       float* __restrict__ out, int cols, long long n) {
    GRID_STRIDE(i, n) out[i] = x[(size_t)rows[i / cols] * cols + i % cols];
}

// out[r][j] = x[r][src[j]]: x [.][x_cols], src [out_cols], out [n / out_cols][out_cols].
extern "C" __global__ void gather_cols(const float* __restrict__ x, const int* __restrict__ src,
                                       float* __restrict__ out, int x_cols, int out_cols, long long n) {
    GRID_STRIDE(i, n) out[i] = x[(i / out_cols) * x_cols + src[i % out_cols]];
}

// out[r][at + c] = x[r][c]: x [.][x_cols] (n = its element count), out [.][out_cols].
extern "C" __global__ void copy_cols(const float* __restrict__ x, float* __restrict__ out, int x_cols,
                                     int out_cols, int at, long long n) {
    GRID_STRIDE(i, n) out[(i / x_cols) * out_cols + at + i % x_cols] = x[i];
}
