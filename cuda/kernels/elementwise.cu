// The float operations between matmuls. Shapes: rows of `cols` floats, row-major.

// RMSNorm: y = x / sqrt(mean(x²) + eps) · w; one block per row.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ w,
                                    float* __restrict__ y, int cols, float eps) {
    __shared__ float scratch[32];
    const float* xr = x + (size_t)blockIdx.x * cols;
    float* yr = y + (size_t)blockIdx.x * cols;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) ss += xr[i] * xr[i];
    ss = block_sum(ss, scratch);
    float scale = rsqrtf(ss / (float)cols + eps);
    for (int i = threadIdx.x; i < cols; i += blockDim.x) yr[i] = xr[i] * scale * w[i];
}

// Rotary embedding of every head of row r at position pos[r], in place; one thread per
// rotated pair. NEOX pairs (i, i + d/2); "norm" pairs (2i, 2i + 1). The angle of pair i is
// pos · freq_scale · base^(−2i/d).
__device__ __forceinline__ void rotate(float* a, float* b, float theta) {
    float c, s;
    sincosf(theta, &s, &c);
    float x0 = *a, x1 = *b;
    *a = x0 * c - x1 * s;
    *b = x0 * s + x1 * c;
}

// Pair i of the rows' heads: its head's start, and (in k) the pair's index in the head.
__device__ __forceinline__ float* rope_pair(float* x, int i, int cols, int head_dim, int* k) {
    int half = head_dim / 2, pairs_per_row = cols / 2;
    int r = i / pairs_per_row, h = (i % pairs_per_row) / half;
    *k = i % half;
    return x + (size_t)r * cols + h * head_dim;
}

// The angle of pair i (index k in its head): its row's position times the pair's frequency.
__device__ __forceinline__ float rope_angle(const int* pos, int i, int cols, int head_dim, float base, float freq_scale,
                                            int k) {
    return (float)pos[i / (cols / 2)] * freq_scale * powf(base, -2.0f * (float)k / (float)head_dim);
}

extern "C" __global__ void rope_neox(float* __restrict__ x, const int* __restrict__ pos, int cols, int head_dim,
                                     float base, float freq_scale, int n_pairs) {
    int i = blockIdx.x * blockDim.x + threadIdx.x, k;
    if (i >= n_pairs) return;
    float* head = rope_pair(x, i, cols, head_dim, &k);
    rotate(head + k, head + k + head_dim / 2, rope_angle(pos, i, cols, head_dim, base, freq_scale, k));
}

extern "C" __global__ void rope_norm(float* __restrict__ x, const int* __restrict__ pos, int cols, int head_dim,
                                     float base, float freq_scale, int n_pairs) {
    int i = blockIdx.x * blockDim.x + threadIdx.x, k;
    if (i >= n_pairs) return;
    float* head = rope_pair(x, i, cols, head_dim, &k);
    rotate(head + 2 * k, head + 2 * k + 1, rope_angle(pos, i, cols, head_dim, base, freq_scale, k));
}

// Gated activations in place: gate = act(gate) · up.
extern "C" __global__ void geglu(float* __restrict__ gate, const float* __restrict__ up, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = gate[i];
    float g = 0.5f * x * (1.0f + tanhf(0.7978845608f * x * (1.0f + 0.044715f * x * x)));
    gate[i] = g * up[i];
}

extern "C" __global__ void swiglu(float* __restrict__ gate, const float* __restrict__ up, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = gate[i];
    gate[i] = x / (1.0f + expf(-x)) * up[i];
}

// gpt-oss: g = min(gate, limit), u = clamp(up, ±limit), g·σ(alpha·g)·(u + 1).
extern "C" __global__ void swiglu_oai(float* __restrict__ gate, const float* __restrict__ up, int n, float alpha,
                                      float limit) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float x = fminf(gate[i], limit), u = fminf(fmaxf(up[i], -limit), limit);
    gate[i] = x / (1.0f + expf(-alpha * x)) * (u + 1.0f);
}

// Softmax of each row in place (scores already scaled; -inf entries become 0); one block
// per row.
extern "C" __global__ void softmax_rows(float* __restrict__ x, int cols) {
    __shared__ float scratch[32];
    float* xr = x + (size_t)blockIdx.x * cols;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) m = fmaxf(m, xr[i]);
    __shared__ float row_max;
    // Block max: per-warp max, then the first warp's.
    m = warp_max(m);
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = m;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? scratch[threadIdx.x] : -INFINITY;
        v = warp_max(v);
        if (threadIdx.x == 0) row_max = v;
    }
    __syncthreads();
    m = row_max;
    float s = 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float e = m == -INFINITY ? 0.0f : expf(xr[i] - m);
        xr[i] = e;
        s += e;
    }
    s = block_sum(s, scratch);
    float inv = s > 0.0f ? 1.0f / s : 0.0f;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) xr[i] *= inv;
}
