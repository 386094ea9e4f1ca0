// Mixture-of-experts routing and combine, as engine/src/model/moe.rs (Routing::route and
// Experts::forward) compute them. The experts' products are matmul.cu's matvec_id_*.

// Floats in Rust's f32::total_cmp order as signed integers (NaNs included, −0 < +0).
__device__ __forceinline__ int total_key(float x) {
    int i = __float_as_int(x);
    return i ^ (int)((u32)(i >> 31) >> 1);
}

// Below every (key, expert) pair.
#define KEY_NONE (-9223372036854775807LL - 1)

// (key, expert) as one integer: larger key first, then the lower expert (the engine's
// ties rule), so the best is the maximum.
__device__ __forceinline__ long long rank_key(float x, int e) {
    return ((long long)total_key(x) << 32) | (long long)(0xffffffffu - (u32)e);
}

__device__ __forceinline__ long long warp_max_ll(long long v) {
    for (int o = 16; o > 0; o >>= 1) {
        long long other = __shfl_xor_sync(0xffffffffu, v, o);
        v = other > v ? other : v;
    }
    return v;
}

__device__ __forceinline__ double warp_sum_f64(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

#define MOE_MAX_EXPERTS 512
#define MOE_MAX_K 32
#define MOE_WARPS 4

// Gating (moe.rs's Gating): how router logits become scores.
#define GATING_SOFTMAX 0          // softmax over all experts, weights the top-k probabilities
#define GATING_SOFTMAX_SELECTED 1 // top-k logits, then a softmax over those k (gpt-oss)
#define GATING_SIGMOID 2          // a sigmoid per expert (DeepSeek-V3)

// Each token's top-k experts, best first, and their weights. One warp per token, grid
// ⌈tokens / MOE_WARPS⌉, block (32, MOE_WARPS).
//   logits: [tokens][n_expert] f32 (router output, its bias added); sel_bias: [n_expert]
//   or null (DeepSeek-V3's exp_probs_b: shifts the choice, not the weights); groups > 1:
//   the experts form `groups` equal groups scored by the sum of their two best selection
//   scores, and only the best `kept` groups compete; normalize: divide the k weights by
//   their sum (at least 2^−14); scale multiplies them.
//   ids: [tokens][k] i32, weights: [tokens][k] f32.
// The host checks n_expert ≤ MOE_MAX_EXPERTS, 1 ≤ k ≤ min(n_expert, MOE_MAX_K), groups ≤ 32.
// Sums are taken in the engine's order (the f32 ones one after another, in slot order).
extern "C" __global__ void __launch_bounds__(32 * MOE_WARPS) moe_route(
    const float* __restrict__ logits, const float* __restrict__ sel_bias, int* __restrict__ ids,
    float* __restrict__ weights, int tokens, int n_expert, int k, int gating, int normalize, float scale, int groups,
    int kept) {
    __shared__ float score_s[MOE_WARPS][MOE_MAX_EXPERTS];
    __shared__ float select_s[MOE_WARPS][MOE_MAX_EXPERTS];
    int t = blockIdx.x * MOE_WARPS + threadIdx.y, lane = threadIdx.x;
    if (t >= tokens) return;
    float* score = score_s[threadIdx.y];
    float* select = select_s[threadIdx.y];
    const float* x = logits + (size_t)t * n_expert;

    // Scores: softmax (sum in f64, as ggml), sigmoid, or the logits themselves.
    float mx = -INFINITY;
    for (int e = lane; e < n_expert; e += 32) mx = fmaxf(mx, x[e]);
    mx = warp_max(mx);
    double sum = 0.0;
    for (int e = lane; e < n_expert; e += 32) {
        float s = x[e];
        if (gating == GATING_SOFTMAX) {
            s = expf(s - mx);
            sum += (double)s;
        } else if (gating == GATING_SIGMOID) {
            s = 1.0f / (1.0f + expf(-s));
        }
        score[e] = s;
    }
    sum = warp_sum_f64(sum);
    float inv = (float)(1.0 / sum);
    for (int e = lane; e < n_expert; e += 32) {
        if (gating == GATING_SOFTMAX) score[e] *= inv;
        select[e] = sel_bias ? score[e] + sel_bias[e] : score[e];
    }
    __syncwarp();

    // Group-limited routing: lane g scores group g by its two best (best + second), then
    // keeps it if fewer than `kept` groups beat it; the others' experts drop out.
    int per_group = groups > 0 ? n_expert / groups : 0;
    if (groups > 1 && per_group > 0) {
        float gscore = -INFINITY;
        if (lane < groups) {
            long long b1 = KEY_NONE, b2 = KEY_NONE;
            float v1 = 0.0f, v2 = 0.0f;
            for (int i = 0; i < per_group; ++i) {
                float v = select[lane * per_group + i];
                long long key = rank_key(v, i);
                if (key > b1) {
                    b2 = b1, v2 = v1;
                    b1 = key, v1 = v;
                } else if (key > b2) {
                    b2 = key, v2 = v;
                }
            }
            gscore = per_group > 1 ? v1 + v2 : v1;  // the engine's sum from −0: exactly these
        }
        int rank = 0;
        for (int g = 0; g < groups; ++g) {
            float other = __shfl_sync(0xffffffffu, gscore, g);
            rank += rank_key(other, g) > rank_key(gscore, lane);
        }
        __syncwarp();
        for (int g = 0; g < groups; ++g) {
            bool keep = __shfl_sync(0xffffffffu, rank, g) < kept;
            if (!keep)
                for (int i = lane; i < per_group; i += 32) select[g * per_group + i] = -INFINITY;
        }
        __syncwarp();
    }

    // Top-k: k rounds of a warp-wide maximum; lane j keeps choice j. Bit i of `taken`
    // marks expert lane + 32·i as chosen.
    int mine = 0;
    u32 taken = 0;
    for (int j = 0; j < k; ++j) {
        long long best = KEY_NONE;
        for (int e = lane, i = 0; e < n_expert; e += 32, ++i) {
            long long key = (taken >> i) & 1 ? KEY_NONE : rank_key(select[e], e);
            best = key > best ? key : best;
        }
        best = warp_max_ll(best);
        int e = (int)(0xffffffffu - (u32)(best & 0xffffffff));
        if (lane == j) mine = e;
        if (lane == e % 32) taken |= 1u << (e / 32);
    }

    // Weights, in slot order.
    float w = lane < k ? score[mine] : 0.0f;
    if (gating == GATING_SOFTMAX_SELECTED) {
        float m = warp_max(lane < k ? w : -INFINITY);
        float e = lane < k ? expf(w - m) : 0.0f;
        double s = 0.0;
        for (int j = 0; j < k; ++j) s += (double)__shfl_sync(0xffffffffu, e, j);
        w = e * (float)(1.0 / s);
    }
    if (normalize) {
        float s = -0.0f;  // Rust's f32 sum starts from −0
        for (int j = 0; j < k; ++j) s += __shfl_sync(0xffffffffu, w, j);
        w = w / fmaxf(s, 6.103515625e-5f);
    }
    if (scale != 1.0f) w *= scale;
    if (lane < k) {
        ids[(size_t)t * k + lane] = mine;
        weights[(size_t)t * k + lane] = w;
    }
}

// out[t] = Σ_j weights[t][j] · y[t·k + j], added in ascending expert order starting from
// zero, each product and sum rounded apart, as the engine's add_scaled_rows over experts
// in order: the same bits for the same y. Grid tokens, 1-D blocks over d.
//   y: [tokens·k][d] (matvec_id's output for the down product); ids, weights: [tokens][k]
//   (k ≤ MOE_MAX_K, ids of a token distinct); out: [tokens][d].
extern "C" __global__ void moe_combine(const float* __restrict__ y, const int* __restrict__ ids,
                                       const float* __restrict__ weights, float* __restrict__ out, int k, int d) {
    __shared__ int order[MOE_MAX_K];
    int t = blockIdx.x;
    const int* id = ids + (size_t)t * k;
    if (threadIdx.x < k) {
        int j = threadIdx.x, rank = 0;
        for (int i = 0; i < k; ++i) rank += id[i] < id[j] || (id[i] == id[j] && i < j);
        order[rank] = j;
    }
    __syncthreads();
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
        float acc = 0.0f;
        for (int r = 0; r < k; ++r) {
            int j = order[r];
            acc = __fadd_rn(acc, __fmul_rn(weights[(size_t)t * k + j], y[((size_t)t * k + j) * d + c]));
        }
        out[(size_t)t * d + c] = acc;
    }
}
