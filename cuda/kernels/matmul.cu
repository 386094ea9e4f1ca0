// Quantized weights times many 8-bit activation rows (from quantize_q8), for prefill and
// large batches, and the mixture-of-experts product that sends each token to its own
// experts in one launch.
//
// A weight "piece" is 32 consecutive elements of a row (one activation block): one block
// of the 32-element formats, one sub-block of a 256-element K-quant block. A piece is
// decoded once into 8 words of 4 signed bytes (elements 4j..4j+3 in word j) and scales,
// then dotted with as many activation rows as the kernel holds.

// A decoded piece: x_e = d_lo·q_e (e < 16) or d_hi·q_e (e ≥ 16), minus dmin (the K-quants'
// offset, applied through the activation sum; 0 elsewhere).
struct Piece {
    int q[8];
    float d_lo, d_hi, dmin;
};

// Q8_0 {d: f16, qs: i8[32]}, 34 bytes.
__device__ __forceinline__ void decode_q8_0(const u8* row, int b, int, Piece* p) {
    const u8* blk = row + 34 * b;
#pragma unroll
    for (int j = 0; j < 8; ++j) p->q[j] = (int)ld_u32_2(blk + 2 + 4 * j);
    p->d_lo = p->d_hi = f16_to_f32(ld_u16(blk));
    p->dmin = 0.0f;
}

// Q4_0 {d, qs[16]}: element k < 16 is the low nibble of qs[k], k + 16 the high one; q − 8.
__device__ __forceinline__ void decode_q4_0(const u8* row, int b, int, Piece* p) {
    const u8* blk = row + 18 * b;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        u32 w = ld_u32_2(blk + 2 + 4 * j);
        p->q[j] = (int)__vsub4(w & 0x0f0f0f0fu, 0x08080808u);
        p->q[4 + j] = (int)__vsub4((w >> 4) & 0x0f0f0f0fu, 0x08080808u);
    }
    p->d_lo = p->d_hi = f16_to_f32(ld_u16(blk));
    p->dmin = 0.0f;
}

// Bits 0..3 of `h` to bit 4 of bytes 0..3.
__device__ __forceinline__ u32 spread_bit4(u32 h) {
    return ((h & 1u) << 4) | ((h & 2u) << 11) | ((h & 4u) << 18) | ((h & 8u) << 25);
}

// Q5_0 {d, qh: u32, qs[16]}: the nibbles as Q4_0 plus bit k of qh as bit 4; q − 16.
__device__ __forceinline__ void decode_q5_0(const u8* row, int b, int, Piece* p) {
    const u8* blk = row + 22 * b;
    u32 qh = ld_u32_2(blk + 2);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        u32 w = ld_u32_2(blk + 6 + 4 * j);
        u32 lo = (w & 0x0f0f0f0fu) | spread_bit4(qh >> (4 * j));
        u32 hi = ((w >> 4) & 0x0f0f0f0fu) | spread_bit4(qh >> (16 + 4 * j));
        p->q[j] = (int)__vsub4(lo, 0x10101010u);
        p->q[4 + j] = (int)__vsub4(hi, 0x10101010u);
    }
    p->d_lo = p->d_hi = f16_to_f32(ld_u16(blk));
    p->dmin = 0.0f;
}

__device__ __forceinline__ void decode_mxfp4(const u8* row, int b, int, Piece* p) {
    const u8* blk = row + 17 * b;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        p->q[j] = (int)mxfp4_word(blk + 1 + 4 * j, 0);
        p->q[4 + j] = (int)mxfp4_word(blk + 1 + 4 * j, 4);
    }
    p->d_lo = p->d_hi = e8m0_half(blk[0]);
    p->dmin = 0.0f;
}

// Q4_K {d, dmin, scales[12], qs[128]}, 144 bytes: piece p of block b is sub-block p: the
// nibbles of qs[32·(p/2)..+32], low for even p; x = d·sc·q − dmin·m.
__device__ __forceinline__ void k4_scale_min(int j, const u8* s, int* sc, int* m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

__device__ __forceinline__ void decode_q4_k(const u8* row, int b, int piece, Piece* p) {
    const u8* blk = row + 144 * b;
    const u8* qs = blk + 16 + 32 * (piece / 2);
    int shift = 4 * (piece & 1);
#pragma unroll
    for (int j = 0; j < 8; ++j) p->q[j] = (int)((ld_u32_2(qs + 4 * j) >> shift) & 0x0f0f0f0fu);
    int sc, m;
    k4_scale_min(piece, blk + 4, &sc, &m);
    p->d_lo = p->d_hi = f16_to_f32(ld_u16(blk)) * (float)sc;
    p->dmin = f16_to_f32(ld_u16(blk + 2)) * (float)m;
}

// Q6_K {ql[128], qh[64], scales: i8[16], d}, 210 bytes: piece p (32 elements) of block b
// is elements 128n + 32k + l (n = p / 4, k = p % 4, l < 32): the low or high nibbles of
// ql[64n + 32(k & 1) + l], bits 2k..2k+2 of qh[32n + l] on top; q − 32. Its two halves
// have their own scales, sc[8n + 2k] and sc[8n + 2k + 1].
__device__ __forceinline__ void decode_q6_k(const u8* row, int b, int piece, Piece* p) {
    const u8* blk = row + 210 * b;
    int n = piece / 4, k = piece % 4;
    const u8* ql = blk + 64 * n + 32 * (k & 1);
    const u8* qh = blk + 128 + 32 * n;
    int shift = 4 * (k >> 1);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        u32 lo = (ld_u32_2(ql + 4 * j) >> shift) & 0x0f0f0f0fu;
        u32 hi = ((ld_u32_2(qh + 4 * j) >> (2 * k)) & 0x03030303u) << 4;
        p->q[j] = (int)__vsub4(lo | hi, 0x20202020u);
    }
    const i8* sc = (const i8*)(blk + 192) + 8 * n + 2 * k;
    float d = f16_to_f32(ld_u16(blk + 208));
    p->d_lo = d * (float)sc[0];
    p->d_hi = d * (float)sc[1];
    p->dmin = 0.0f;
}

// A decoded piece times one activation block (32 bytes, 16-byte aligned, scale xd).
// HAS_MIN adds the K-quants' offset term, −dmin·Σx.
template <bool HAS_MIN>
__device__ __forceinline__ float piece_dot(const Piece& p, const i8* x, float xd) {
    int4 a = ((const int4*)x)[0], c = ((const int4*)x)[1];
    int lo = __dp4a(p.q[0], a.x, 0);
    lo = __dp4a(p.q[1], a.y, lo);
    lo = __dp4a(p.q[2], a.z, lo);
    lo = __dp4a(p.q[3], a.w, lo);
    int hi = __dp4a(p.q[4], c.x, 0);
    hi = __dp4a(p.q[5], c.y, hi);
    hi = __dp4a(p.q[6], c.z, hi);
    hi = __dp4a(p.q[7], c.w, hi);
    float r = p.d_lo * (float)lo + p.d_hi * (float)hi;
    if (HAS_MIN) {
        int s = __dp4a(0x01010101, a.x, 0);
        s = __dp4a(0x01010101, a.y, s);
        s = __dp4a(0x01010101, a.z, s);
        s = __dp4a(0x01010101, a.w, s);
        s = __dp4a(0x01010101, c.x, s);
        s = __dp4a(0x01010101, c.y, s);
        s = __dp4a(0x01010101, c.z, s);
        s = __dp4a(0x01010101, c.w, s);
        r -= p.dmin * (float)s;
    }
    return xd * r;
}

// ---------------------------------------------------------------------------------------
// Dense product, y[t][r] = W[r] · x[t], a tile of MM_ROWS rows × MM_TOKENS tokens per
// block: warp w takes row blockIdx.x·MM_ROWS + w; lane l decodes pieces l, l + 32, ... of
// it once and dots each with the tile's MM_TOKENS activation rows (which the block's warps
// share through L1), so the weights are read once per MM_TOKENS tokens instead of once
// per token. Grid (⌈rows / MM_ROWS⌉, ⌈tokens / MM_TOKENS⌉), block (32, MM_ROWS).
//   w: rows × row_bytes (GGUF layout), cols = 32 · pieces; xq: [tokens][cols] i8;
//   xd: [tokens][cols / 32] f32; y: [tokens][rows].
// dp4a on CUDA cores, as llama.cpp's mmvq for batches up to 8; long prompts would gain from
// int8 tensor-core tiles (mma), which this does not use yet.
#define MM_ROWS 4
#define MM_TOKENS 8

#define MATMUL(NAME, DECODE, PIECES, HAS_MIN)                                                           \
    extern "C" __global__ void __launch_bounds__(32 * MM_ROWS)                                          \
        NAME(const u8* __restrict__ w, const i8* __restrict__ xq, const float* __restrict__ xd,          \
             float* __restrict__ y, int rows, int blocks, int row_bytes, int tokens) {                  \
        int r = blockIdx.x * MM_ROWS + threadIdx.y, t0 = blockIdx.y * MM_TOKENS;                        \
        if (r >= rows) return;                                                                          \
        int pieces = PIECES * blocks, n = min(MM_TOKENS, tokens - t0);                                  \
        const u8* row = w + (size_t)r * row_bytes;                                                      \
        const i8* x = xq + (size_t)t0 * pieces * 32;                                                    \
        const float* d = xd + (size_t)t0 * pieces;                                                      \
        float acc[MM_TOKENS];                                                                           \
        _Pragma("unroll") for (int j = 0; j < MM_TOKENS; ++j) acc[j] = 0.0f;                           \
        for (int i = threadIdx.x; i < pieces; i += 32) {                                                \
            Piece p;                                                                                    \
            DECODE(row, i / PIECES, i % PIECES, &p);                                                    \
            _Pragma("unroll") for (int j = 0; j < MM_TOKENS; ++j) if (j < n) acc[j] +=                  \
                piece_dot<HAS_MIN>(p, x + ((size_t)j * pieces + i) * 32, d[(size_t)j * pieces + i]);   \
        }                                                                                               \
        _Pragma("unroll") for (int j = 0; j < MM_TOKENS; ++j) {                                         \
            float s = warp_sum(acc[j]);                                                                 \
            if (threadIdx.x == 0 && j < n) y[(size_t)(t0 + j) * rows + r] = s;                          \
        }                                                                                               \
    }

MATMUL(matmul_q8_0, decode_q8_0, 1, false)
MATMUL(matmul_q4_0, decode_q4_0, 1, false)
MATMUL(matmul_q5_0, decode_q5_0, 1, false)
MATMUL(matmul_mxfp4, decode_mxfp4, 1, false)
MATMUL(matmul_q4_k, decode_q4_k, 8, true)
MATMUL(matmul_q6_k, decode_q6_k, 8, false)

// ---------------------------------------------------------------------------------------
// Mixture of experts: every (token, choice) slot s = t·k + j runs through its own expert
// ids[s], all slots in one launch (llama.cpp's mul_mat_vec_id):
//   y[s][r] = W_{ids[s]}[r] · x[a] (+ bias[ids[s]][r]),  a = s / k (x_per_slot = 0: the
//   gate and up products, one input row per token) or a = s (x_per_slot = 1: down, whose
//   input is the slot's own activation).
//   w: [n_expert][rows][row_bytes], the GGUF 3-D expert tensor as stored; ids: [slots]
//   i32, checked on the host to be < n_expert; xq, xd: the activation rows as for MATMUL;
//   bias: [n_expert][rows] f32 or null; y: [slots][rows].
// One warp per row, as the decode matrix-vector kernels; grid (⌈rows / MM_ROWS⌉, slots),
// block (32, MM_ROWS). A slot's expert is read once per slot: with many tokens per expert
// (long prompts), sorting slots by expert into MATMUL tiles would read it once per tile.
#define MATVEC_ID(NAME, DECODE, PIECES, HAS_MIN)                                                        \
    extern "C" __global__ void __launch_bounds__(32 * MM_ROWS)                                          \
        NAME(const u8* __restrict__ w, const int* __restrict__ ids, const i8* __restrict__ xq,          \
             const float* __restrict__ xd, const float* __restrict__ bias, float* __restrict__ y,       \
             int rows, int blocks, int row_bytes, int k, int x_per_slot) {                              \
        int r = blockIdx.x * MM_ROWS + threadIdx.y, s = blockIdx.y;                                     \
        if (r >= rows) return;                                                                          \
        int e = ids[s], a = x_per_slot ? s : s / k, pieces = PIECES * blocks;                           \
        const u8* row = w + ((size_t)e * rows + r) * row_bytes;                                         \
        const i8* x = xq + (size_t)a * pieces * 32;                                                     \
        const float* d = xd + (size_t)a * pieces;                                                       \
        float acc = 0.0f;                                                                               \
        for (int i = threadIdx.x; i < pieces; i += 32) {                                                \
            Piece p;                                                                                    \
            DECODE(row, i / PIECES, i % PIECES, &p);                                                    \
            acc += piece_dot<HAS_MIN>(p, x + (size_t)i * 32, d[i]);                                     \
        }                                                                                               \
        acc = warp_sum(acc);                                                                            \
        if (threadIdx.x == 0) y[(size_t)s * rows + r] = acc + (bias ? bias[(size_t)e * rows + r] : 0.0f); \
    }

MATVEC_ID(matvec_id_q8_0, decode_q8_0, 1, false)
MATVEC_ID(matvec_id_q4_0, decode_q4_0, 1, false)
MATVEC_ID(matvec_id_q5_0, decode_q5_0, 1, false)
MATVEC_ID(matvec_id_mxfp4, decode_mxfp4, 1, false)
MATVEC_ID(matvec_id_q4_k, decode_q4_k, 8, true)
MATVEC_ID(matvec_id_q6_k, decode_q6_k, 8, false)
