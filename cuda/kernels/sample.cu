// Logits readback: what a step needs back on the host instead of whole rows of logits.

// (value, index) of the two candidates that engine/src/sampler.rs's argmax would keep: the
// larger value (NaN never wins a comparison), the lower index among equals (−0 == +0).
__device__ __forceinline__ void argmax_pick(float* v, int* i, float ov, int oi) {
    if (ov > *v || (ov == *v && oi < *i)) {
        *v = ov;
        *i = oi;
    }
}

// Greedy sampling: the index of each row's largest value, the lowest index among equals;
// 0 for a row of NaNs (or an empty row), as the CPU sampler. One block per row (blockDim a
// multiple of 32, at most 1024).
//   x: [rows][cols] f32; out: [rows] i32.
extern "C" __global__ void argmax_rows(const float* __restrict__ x, int* __restrict__ out, int cols) {
    __shared__ float vals[32];
    __shared__ int idxs[32];
    const float* xr = x + (size_t)blockIdx.x * cols;
    // INT_MAX: no candidate yet; −∞ still wins over it (an all −∞ row gives its first).
    float v = -INFINITY;
    int i = 0x7fffffff;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) argmax_pick(&v, &i, xr[c], c);
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, i, o);
        argmax_pick(&v, &i, ov, oi);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        vals[warp] = v;
        idxs[warp] = i;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < (blockDim.x >> 5) ? vals[lane] : -INFINITY;
        i = lane < (blockDim.x >> 5) ? idxs[lane] : 0x7fffffff;
        for (int o = 16; o > 0; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, v, o);
            int oi = __shfl_xor_sync(0xffffffffu, i, o);
            argmax_pick(&v, &i, ov, oi);
        }
        if (lane == 0) out[blockIdx.x] = i == 0x7fffffff ? 0 : i;
    }
}
