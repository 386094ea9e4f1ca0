// Activations to 8-bit blocks of 32 for the dp4a matrix-vector kernels: q = round(x / d),
// d = max|x| / 127 (f32), one warp per block.
//   x: [rows][cols] f32, cols a multiple of 32; q: [rows][cols] i8; d: [rows][cols / 32] f32.
extern "C" __global__ void quantize_q8(const float* __restrict__ x, i8* __restrict__ q, float* __restrict__ d,
                                       int n_blocks) {
    int block = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (block >= n_blocks) return;
    float v = x[block * 32 + lane];
    float amax = warp_max(fabsf(v));
    float scale = amax / 127.0f;
    float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    q[block * 32 + lane] = (i8)__float2int_rn(v * inv);
    if (lane == 0) d[block] = scale;
}
