// Attention over the engine's paged KV cache (engine/src/kv.rs, CpuKv in
// engine/src/backend/cpu.rs), flash-decoding style: the keys of each query are cut into
// splits that run in parallel, each leaving a partial softmax (its max, its sum of
// exponentials and its unnormalized weighted sum of values); attn_combine merges them.
//
// The cache of one layer, as the CPU backend lays it out:
//   keys, values: [n_blocks][16][kv_dim] (u16 f16 bits, or f32 for an f32 cache), the
//     layer group's pool of 16-token blocks. A token's key row holds n_kv_heads heads of
//     hd values (KV head h at h·hd); its value row, at the same offset in `values`, holds
//     heads of vd values (h at h·vd). With shared values (multi-head latent attention)
//     there is no value array: pass the keys, and head h's value is the first vd values of
//     its key (at h·hd).
//   tables: [n_seqs][table_stride] u32, row s the block table of sequence slot s in this
//     layer's group (BlockManager::table(s, group)): position p of s is token p % 16 of
//     block tables[s][p / 16]. Entries the queries do not reach (past the end, or given
//     back by a sliding window: u32::MAX) are never read.
// A batch is ragged: row i of q is the token at position pos[i] of sequence seqs[i],
// already stored (kv_store), and attends to that sequence's keys lo..=pos[i], lo =
// max(0, pos[i] + 1 − window) (window 0: lo = 0). Query head h reads KV head
// h / (n_heads / n_kv_heads). gpt-oss's sinks (one logit per query head) join the
// softmax's denominator in attn_combine.

// f32 to f16 bits, rounded to nearest even (as half::f16::from_f32).
__device__ __forceinline__ u16 f32_to_f16(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ float kv_load(const u16* p, size_t i) { return f16_to_f32(p[i]); }
__device__ __forceinline__ float kv_load(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ void kv_put(u16* p, size_t i, float x) { p[i] = f32_to_f16(x); }
__device__ __forceinline__ void kv_put(float* p, size_t i, float x) { p[i] = x; }

// Element offset of position p of a sequence (its table row `table`) in the pool.
__device__ __forceinline__ size_t kv_offset(const u32* table, int p, int kv_dim) {
    return ((size_t)table[p / 16] * 16 + p % 16) * kv_dim;
}

// Stores row i of k ([rows][k_cols], k_cols = n_kv_heads·hd) and v ([rows][v_cols]) at
// position pos[i] of seqs[i]; `values` null with shared values (nothing to store). One
// block per row; its block was reserved by the BlockManager.
#define KV_STORE(NAME, T)                                                                               \
    extern "C" __global__ void NAME(T* __restrict__ keys, T* __restrict__ values,                       \
                                    const float* __restrict__ k, const float* __restrict__ v,           \
                                    const u32* __restrict__ tables, const int* __restrict__ seqs,       \
                                    const int* __restrict__ pos, int k_cols, int v_cols, int kv_dim,    \
                                    int table_stride) {                                                 \
        int i = blockIdx.x;                                                                             \
        size_t at = kv_offset(tables + (size_t)seqs[i] * table_stride, pos[i], kv_dim);                 \
        for (int c = threadIdx.x; c < k_cols; c += blockDim.x) kv_put(keys, at + c, k[(size_t)i * k_cols + c]); \
        if (values)                                                                                     \
            for (int c = threadIdx.x; c < v_cols; c += blockDim.x)                                      \
                kv_put(values, at + c, v[(size_t)i * v_cols + c]);                                      \
    }

KV_STORE(kv_store_f16, u16)
KV_STORE(kv_store_f32, float)

// One split of the keys of one batch row for the query heads of one KV head.
// Grid (n_kv_heads, rows, n_splits), block (32, ATTN_WARPS): split z covers keys
// lo + z·split_len .. lo + (z + 1)·split_len − 1 (clipped to pos); warp w takes the
// group's query heads w, w + ATTN_WARPS, ... in turn, each with an online softmax in f32
// over the split's keys (the warps of a block read the same key and value rows, from L1).
// Lane l holds the query and output elements l, l + 32, ..., hence hd, vd ≤ 32·PER_LANE
// (instantiated for 128, 256 and 576, the largest being DeepSeek's latent plus its RoPE
// part).
//   q: [rows][n_heads·hd] f32, not rounded; scale multiplies q·k.
//   part_o: [rows][n_heads][n_splits][vd], Σ exp(s − m)·v over the split's keys;
//   part_ml: [rows][n_heads][n_splits][2], (m, Σ exp(s − m)); a split past the row's keys
//   writes (−∞, 0) and no part_o.
#define ATTN_WARPS 4

#define ATTN_SPLIT(NAME, T, PER_LANE)                                                                   \
    extern "C" __global__ void __launch_bounds__(32 * ATTN_WARPS) NAME(                                 \
        const float* __restrict__ q, const T* __restrict__ keys, const T* __restrict__ values,          \
        const u32* __restrict__ tables, const int* __restrict__ seqs, const int* __restrict__ pos,       \
        float* __restrict__ part_o, float* __restrict__ part_ml, int n_heads, int n_kv_heads, int hd,   \
        int vd, int kv_dim, int shared_v, int table_stride, int window, float scale, int split_len) {   \
        int kvh = blockIdx.x, row = blockIdx.y, split = blockIdx.z, n_splits = gridDim.z;               \
        int lane = threadIdx.x, group = n_heads / n_kv_heads;                                           \
        int last = pos[row], lo = window > 0 ? max(0, last + 1 - window) : 0;                           \
        int from = lo + split * split_len, to = min(last + 1, from + split_len);                        \
        const u32* table = tables + (size_t)seqs[row] * table_stride;                                   \
        int k_off = kvh * hd, v_off = shared_v ? kvh * hd : kvh * vd;                                   \
        for (int h = kvh * group + threadIdx.y; h < (kvh + 1) * group; h += ATTN_WARPS) {               \
            size_t part = ((size_t)row * n_heads + h) * n_splits + split;                               \
            if (from >= to) {                                                                           \
                if (lane == 0) {                                                                        \
                    part_ml[2 * part] = -INFINITY;                                                      \
                    part_ml[2 * part + 1] = 0.0f;                                                       \
                }                                                                                       \
                continue;                                                                               \
            }                                                                                           \
            const float* qh = q + ((size_t)row * n_heads + h) * hd;                                     \
            float qv[PER_LANE], acc[PER_LANE];                                                          \
            _Pragma("unroll") for (int i = 0; i < PER_LANE; ++i) {                                      \
                int c = lane + 32 * i;                                                                  \
                qv[i] = c < hd ? qh[c] : 0.0f;                                                          \
                acc[i] = 0.0f;                                                                          \
            }                                                                                           \
            float m = -INFINITY, l = 0.0f;                                                              \
            for (int p = from; p < to; ++p) {                                                           \
                size_t at = kv_offset(table, p, kv_dim);                                                \
                float s = 0.0f;                                                                         \
                _Pragma("unroll") for (int i = 0; i < PER_LANE; ++i) {                                  \
                    int c = lane + 32 * i;                                                              \
                    if (c < hd) s += qv[i] * kv_load(keys, at + k_off + c);                             \
                }                                                                                       \
                s = warp_sum(s) * scale;                                                                \
                /* Online softmax: rescale what came before when the maximum grows. */                  \
                float m_new = fmaxf(m, s);                                                              \
                float old = m == -INFINITY ? 0.0f : expf(m - m_new), e = expf(s - m_new);               \
                l = l * old + e;                                                                        \
                m = m_new;                                                                              \
                _Pragma("unroll") for (int i = 0; i < PER_LANE; ++i) {                                  \
                    int c = lane + 32 * i;                                                              \
                    if (c < vd) acc[i] = acc[i] * old + e * kv_load(values, at + v_off + c);            \
                }                                                                                       \
            }                                                                                           \
            float* o = part_o + part * vd;                                                              \
            _Pragma("unroll") for (int i = 0; i < PER_LANE; ++i) {                                      \
                int c = lane + 32 * i;                                                                  \
                if (c < vd) o[c] = acc[i];                                                              \
            }                                                                                           \
            if (lane == 0) {                                                                            \
                part_ml[2 * part] = m;                                                                  \
                part_ml[2 * part + 1] = l;                                                              \
            }                                                                                           \
        }                                                                                               \
    }

ATTN_SPLIT(attn_split_f16_128, u16, 4)
ATTN_SPLIT(attn_split_f16_256, u16, 8)
ATTN_SPLIT(attn_split_f16_576, u16, 18)
ATTN_SPLIT(attn_split_f32_128, float, 4)
ATTN_SPLIT(attn_split_f32_256, float, 8)
ATTN_SPLIT(attn_split_f32_576, float, 18)

// Merges the splits of each (row, query head): M = max over the splits' m and the sink,
// out = Σ exp(m_z − M)·o_z / (Σ exp(m_z − M)·l_z + exp(sink − M)); 0 where the sum is 0,
// as the CPU backend. Grid (n_heads, rows), 1-D blocks over vd.
//   sinks: [n_heads] f32 or null; out: [rows][n_heads·vd].
extern "C" __global__ void attn_combine(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                        const float* __restrict__ sinks, float* __restrict__ out, int n_heads,
                                        int vd, int n_splits) {
    int h = blockIdx.x, row = blockIdx.y;
    size_t first = ((size_t)row * n_heads + h) * n_splits;
    const float* ml = part_ml + 2 * first;
    float big = sinks ? sinks[h] : -INFINITY;
    for (int z = 0; z < n_splits; ++z) big = fmaxf(big, ml[2 * z]);
    float sum = sinks && big > -INFINITY ? expf(sinks[h] - big) : 0.0f;
    for (int z = 0; z < n_splits; ++z)
        if (ml[2 * z] > -INFINITY) sum += expf(ml[2 * z] - big) * ml[2 * z + 1];
    float inv = sum == 0.0f ? 0.0f : 1.0f / sum;
    float* o = out + ((size_t)row * n_heads + h) * vd;
    for (int c = threadIdx.x; c < vd; c += blockDim.x) {
        float v = 0.0f;
        for (int z = 0; z < n_splits; ++z)
            if (ml[2 * z] > -INFINITY) v += expf(ml[2 * z] - big) * part_o[(first + z) * vd + c];
        o[c] = v * inv;
    }
}
