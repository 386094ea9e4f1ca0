// Shared by every kernel source (prepended before compilation: NVRTC gets no include path).
// GGUF blocks are byte-packed (Q8_0 is 34 bytes), so weights are read 2 bytes at a time
// and assembled; activations are ours and 4-byte aligned.

typedef unsigned char u8;
typedef signed char i8;
typedef unsigned short u16;
typedef unsigned int u32;

// math.h's, which NVRTC does not have without a toolkit include path.
#define INFINITY __int_as_float(0x7f800000)

// f16 bits to float (no cuda_fp16.h under NVRTC without a toolkit include path).
__device__ __forceinline__ float f16_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 ld_u16(const u8* p) {
    return (u16)p[0] | ((u16)p[1] << 8);
}

// Four bytes at a 2-byte-aligned address, little-endian.
__device__ __forceinline__ u32 ld_u32_2(const u8* p) {
    const u16* h = (const u16*)p;
    return (u32)h[0] | ((u32)h[1] << 16);
}

__device__ __forceinline__ float ld_f16(const u8* p) {
    return f16_to_f32(*(const u16*)p);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of up to 1024 threads (blockDim.x a multiple of 32); every thread
// gets the result. `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < (blockDim.x >> 5)) ? scratch[lane] : 0.0f;
    v = warp_sum(v);
    return v;
}

// MXFP4 {e: E8M0, qs[16]}, 17 bytes (byte-aligned): E2M1 codes through the doubled table,
// nibbles ordered as Q4_0; the scale is 2^(e − 128) (the table's factor 2 folded in). Used by
// matvec.cu and matmul.cu.
__constant__ signed char MXFP4_VALUES[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

__device__ __forceinline__ float e8m0_half(u8 e) {
    u32 bits = e < 2 ? (0x00200000u << e) : ((u32)(e - 1) << 23);
    return __uint_as_float(bits);
}

// Four codes of `qs` (the low nibbles at shift 0, the high at 4) as four signed bytes.
__device__ __forceinline__ u32 mxfp4_word(const u8* qs, int shift) {
    u32 v = 0;
#pragma unroll
    for (int k = 0; k < 4; ++k) v |= (u32)(u8)MXFP4_VALUES[(qs[k] >> shift) & 15] << (8 * k);
    return v;
}
