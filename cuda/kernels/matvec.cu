// Quantized weights times 8-bit activations (from quantize_q8): y[t][r] = W[r] · x[t].
// One warp per weight row (blockDim = 32 × ROWS_PER_BLOCK), gridDim.y = tokens. Each lane
// takes activation blocks of 32 (for the K-quants: the 32-element pieces of a 256-element
// weight block), multiplies 4 weight and 4 activation bytes at a time with dp4a, scales
// the integer sum once per block, and the warp sums the lanes.
//   w: rows × row_bytes (GGUF layout); xq: [tokens][cols] i8; xd: [tokens][cols / 32];
//   y: [tokens][rows].

#define ROWS_PER_BLOCK 4

__device__ __forceinline__ int act_word(const i8* xq, int block, int word) {
    return ((const int*)(xq + 32 * block))[word];
}

// Q8_0 {d: f16, qs: i8[32]}, 34 bytes.
__device__ __forceinline__ float piece_q8_0(const u8* row, int b, int, const i8* xq, const float* xd) {
    const u8* blk = row + 34 * b;
    int isum = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) isum = __dp4a((int)ld_u32_2(blk + 2 + 4 * j), act_word(xq, b, j), isum);
    return f16_to_f32(ld_u16(blk)) * xd[b] * (float)isum;
}

// Q4_0 {d, qs[16]}: element k < 16 is the low nibble of qs[k], k + 16 the high one; q - 8.
__device__ __forceinline__ float piece_q4_0(const u8* row, int b, int, const i8* xq, const float* xd) {
    const u8* blk = row + 18 * b;
    int isum = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        u32 w = ld_u32_2(blk + 2 + 4 * j);
        isum = __dp4a((int)__vsub4(w & 0x0f0f0f0fu, 0x08080808u), act_word(xq, b, j), isum);
        isum = __dp4a((int)__vsub4((w >> 4) & 0x0f0f0f0fu, 0x08080808u), act_word(xq, b, 4 + j), isum);
    }
    return f16_to_f32(ld_u16(blk)) * xd[b] * (float)isum;
}

// Bits 0..3 of `h` to bit 4 of bytes 0..3.
__device__ __forceinline__ u32 spread_bit4(u32 h) {
    return ((h & 1u) << 4) | ((h & 2u) << 11) | ((h & 4u) << 18) | ((h & 8u) << 25);
}

// Q5_0 {d, qh: u32, qs[16]}: the nibbles plus bit k of qh as bit 4; q - 16.
__device__ __forceinline__ float piece_q5_0(const u8* row, int b, int, const i8* xq, const float* xd) {
    const u8* blk = row + 22 * b;
    u32 qh = ld_u32_2(blk + 2);
    int isum = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        u32 w = ld_u32_2(blk + 6 + 4 * j);
        u32 lo = (w & 0x0f0f0f0fu) | spread_bit4(qh >> (4 * j));
        u32 hi = ((w >> 4) & 0x0f0f0f0fu) | spread_bit4(qh >> (16 + 4 * j));
        isum = __dp4a((int)__vsub4(lo, 0x10101010u), act_word(xq, b, j), isum);
        isum = __dp4a((int)__vsub4(hi, 0x10101010u), act_word(xq, b, 4 + j), isum);
    }
    return f16_to_f32(ld_u16(blk)) * xd[b] * (float)isum;
}

__device__ __forceinline__ float piece_mxfp4(const u8* row, int b, int, const i8* xq, const float* xd) {
    const u8* blk = row + 17 * b;
    int isum = 0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        isum = __dp4a((int)mxfp4_word(blk + 1 + 4 * j, 0), act_word(xq, b, j), isum);
        isum = __dp4a((int)mxfp4_word(blk + 1 + 4 * j, 4), act_word(xq, b, 4 + j), isum);
    }
    return e8m0_half(blk[0]) * xd[b] * (float)isum;
}

// Q4_K {d, dmin, scales[12], qs[128]}, 144 bytes: piece p of block b is sub-block p (32
// elements): nibbles of qs[32·(p/2)..+32], low for even p; x = d·sc·q − dmin·m.
__device__ __forceinline__ void k4_scale_min(int j, const u8* s, int* sc, int* m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

__device__ __forceinline__ float piece_q4_k(const u8* row, int b, int p, const i8* xq, const float* xd) {
    const u8* blk = row + 144 * b;
    const u8* qs = blk + 16 + 32 * (p / 2);
    int shift = 4 * (p & 1), a = 8 * b + p;
    int isum = 0, xsum = 0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        int x = act_word(xq, a, j);
        isum = __dp4a((int)((ld_u32_2(qs + 4 * j) >> shift) & 0x0f0f0f0fu), x, isum);
        xsum = __dp4a(0x01010101, x, xsum);
    }
    int sc, m;
    k4_scale_min(p, blk + 4, &sc, &m);
    float d = f16_to_f32(ld_u16(blk)), dmin = f16_to_f32(ld_u16(blk + 2));
    return xd[a] * (d * (float)(sc * isum) - dmin * (float)(m * xsum));
}

// Q6_K {ql[128], qh[64], scales: i8[16], d}, 210 bytes: piece p (32 elements) of block b is
// elements 128n + 32k + l (n = p / 4, k = p % 4, l < 32): the low or high nibbles of
// ql[64n + 32(k & 1) + l], bits 2k..2k+2 of qh[32n + l] on top; q − 32, scale
// sc[8n + l / 16 + 2k].
__device__ __forceinline__ float piece_q6_k(const u8* row, int b, int p, const i8* xq, const float* xd) {
    const u8* blk = row + 210 * b;
    int n = p / 4, k = p % 4, a = 8 * b + p;
    const u8* ql = blk + 64 * n + 32 * (k & 1);
    const u8* qh = blk + 128 + 32 * n;
    int shift = 4 * (k >> 1);
    int isum[2] = {0, 0};
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        u32 lo = (ld_u32_2(ql + 4 * j) >> shift) & 0x0f0f0f0fu;
        u32 hi = ((ld_u32_2(qh + 4 * j) >> (2 * k)) & 0x03030303u) << 4;
        isum[j / 4] = __dp4a((int)__vsub4(lo | hi, 0x20202020u), act_word(xq, a, j), isum[j / 4]);
    }
    const i8* sc = (const i8*)(blk + 192) + 8 * n + 2 * k;
    return xd[a] * f16_to_f32(ld_u16(blk + 208)) * (float)(sc[0] * isum[0] + sc[1] * isum[1]);
}

// One warp per row: lane l takes pieces l, l + 32, ... of the row, PIECES per weight block
// (a piece is one activation block of 32), and the warp sums them.
#define MATVEC(NAME, PIECE, PIECES)                                                                    \
    extern "C" __global__ void NAME(const u8* __restrict__ w, const i8* __restrict__ xq,               \
                                    const float* __restrict__ xd, float* __restrict__ y, int rows,     \
                                    int blocks, int row_bytes) {                                       \
        int r = blockIdx.x * ROWS_PER_BLOCK + threadIdx.y, t = blockIdx.y;                             \
        if (r >= rows) return;                                                                         \
        const u8* row = w + (size_t)r * row_bytes;                                                     \
        const i8* x = xq + (size_t)t * blocks * PIECES * 32;                                           \
        const float* d = xd + (size_t)t * blocks * PIECES;                                             \
        float acc = 0.0f;                                                                              \
        for (int i = threadIdx.x; i < PIECES * blocks; i += 32) acc += PIECE(row, i / PIECES, i % PIECES, x, d); \
        acc = warp_sum(acc);                                                                           \
        if (threadIdx.x == 0) y[(size_t)t * rows + r] = acc;                                           \
    }

MATVEC(matvec_q8_0, piece_q8_0, 1)
MATVEC(matvec_q4_0, piece_q4_0, 1)
MATVEC(matvec_q5_0, piece_q5_0, 1)
MATVEC(matvec_mxfp4, piece_mxfp4, 1)
MATVEC(matvec_q4_k, piece_q4_k, 8)
MATVEC(matvec_q6_k, piece_q6_k, 8)
