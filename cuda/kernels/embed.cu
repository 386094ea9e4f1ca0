// Embedding gather: y[t] = dequant(table[ids[t]]) · scale, one block per token (ids are
// checked on the host against the table's rows). Each element is dequantized with the CPU
// code's formula and rounding order (turbine-cpu's dequantize_row, products and sums
// rounded apart), so a row comes out with the same bits as the CPU backend's lookup.
//   table: [vocab] rows of cols elements in the tensor's GGUF layout; y: [tokens][cols].
// gemma3:270m's token_embd (its tied output too) is Q8_0: with 640 columns the K-quants
// do not fit, and llama.cpp's Q4_K_M falls back to Q8_0 for it. Llama-style Q4_K_M files
// store token_embd as Q4_K or Q6_K; F16, BF16 and F32 come with unquantized files.

// Element i of a block, as f32.
__device__ __forceinline__ float dq_f32(const u8* blk, int) { return *(const float*)blk; }
__device__ __forceinline__ float dq_f16(const u8* blk, int) { return ld_f16(blk); }
__device__ __forceinline__ float dq_bf16(const u8* blk, int) { return __uint_as_float((u32)ld_u16(blk) << 16); }

// Q8_0 {d: f16, qs: i8[32]}: q·d.
__device__ __forceinline__ float dq_q8_0(const u8* blk, int i) { return __fmul_rn((float)(i8)blk[2 + i], ld_f16(blk)); }

// Q4_0 {d, qs[16]}: element i < 16 the low nibble of qs[i], i ≥ 16 the high nibble of
// qs[i − 16]; (q − 8)·d.
__device__ __forceinline__ float dq_q4_0(const u8* blk, int i) {
    int q = (blk[2 + i % 16] >> (4 * (i / 16))) & 15;
    return __fmul_rn((float)(q - 8), ld_f16(blk));
}

// Q5_0 {d, qh: u32, qs[16]}: the nibble as Q4_0 plus bit i of qh as bit 4; (q − 16)·d.
__device__ __forceinline__ float dq_q5_0(const u8* blk, int i) {
    u32 qh = ld_u32_2(blk + 2);
    int q = ((blk[6 + i % 16] >> (4 * (i / 16))) & 15) | (((qh >> i) & 1) << 4);
    return __fmul_rn((float)(q - 16), ld_f16(blk));
}

// Q4_K {d, dmin, scales[12], qs[128]}: element i is in 64-element chunk c = i / 64, the
// low nibble of qs[32c + i % 64] (sub-block 2c) or, from i % 64 = 32 on, the high nibble
// of qs[32c + i % 64 − 32] (sub-block 2c + 1); (d·sc)·q − dmin·m.
__device__ __forceinline__ float dq_q4_k(const u8* blk, int i) {
    int c = i / 64, l = i % 64, sub = 2 * c + l / 32;
    int q = (blk[16 + 32 * c + l % 32] >> (4 * (l / 32))) & 15;
    const u8* s = blk + 4;
    int sc, m;
    if (sub < 4) {
        sc = s[sub] & 63;
        m = s[sub + 4] & 63;
    } else {
        sc = (s[sub + 4] & 15) | ((s[sub - 4] >> 6) << 4);
        m = (s[sub + 4] >> 4) | ((s[sub] >> 6) << 4);
    }
    float d1 = __fmul_rn(ld_f16(blk), (float)sc), m1 = __fmul_rn(ld_f16(blk + 2), (float)m);
    return __fsub_rn(__fmul_rn(d1, (float)q), m1);
}

// Q6_K {ql[128], qh[64], scales: i8[16], d}: element i is in half n = i / 128, quarter
// k = (i % 128) / 32, l = i % 32: the low (k < 2) or high nibble of ql[64n + 32(k & 1) + l]
// with bits 2k..2k+2 of qh[32n + l] on top; (d·sc[i / 16])·(q − 32).
__device__ __forceinline__ float dq_q6_k(const u8* blk, int i) {
    int n = i / 128, k = (i % 128) / 32, l = i % 32;
    int lo = (blk[64 * n + 32 * (k & 1) + l] >> (4 * (k >> 1))) & 15;
    int hi = (blk[128 + 32 * n + l] >> (2 * k)) & 3;
    float ds = __fmul_rn(ld_f16(blk + 208), (float)((const i8*)blk)[192 + i / 16]);
    return __fmul_rn(ds, (float)((lo | (hi << 4)) - 32));
}

#define EMBED(NAME, DEQUANT, BLOCK_ELEMS, BLOCK_BYTES)                                                  \
    extern "C" __global__ void NAME(const u8* __restrict__ table, const int* __restrict__ ids,          \
                                    float* __restrict__ y, int cols, float scale) {                     \
        const u8* row = table + (size_t)ids[blockIdx.x] * (cols / BLOCK_ELEMS) * BLOCK_BYTES;          \
        float* yr = y + (size_t)blockIdx.x * cols;                                                      \
        for (int i = threadIdx.x; i < cols; i += blockDim.x)                                            \
            yr[i] = __fmul_rn(DEQUANT(row + (size_t)(i / BLOCK_ELEMS) * BLOCK_BYTES, i % BLOCK_ELEMS), scale); \
    }

EMBED(embed_f32, dq_f32, 1, 4)
EMBED(embed_f16, dq_f16, 1, 2)
EMBED(embed_bf16, dq_bf16, 1, 2)
EMBED(embed_q8_0, dq_q8_0, 32, 34)
EMBED(embed_q4_0, dq_q4_0, 32, 18)
EMBED(embed_q5_0, dq_q5_0, 32, 22)
EMBED(embed_q4_k, dq_q4_k, 256, 144)
EMBED(embed_q6_k, dq_q6_k, 256, 210)
