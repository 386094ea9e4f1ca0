//! AVX-512 VNNI kernels for interleaved weights (`crate::interleaved`): one group of 16
//! rows times up to [`MAX_TOKENS`] activation rows per call (the K-quants: up to
//! [`MAX_K_TOKENS`]).

use std::arch::x86_64::*;

use crate::interleaved::{group_block_bytes, ActSums, GROUP_ROWS};
use crate::GgmlType;

/// Tokens per call: one accumulator register each, beside the 8 weight vectors.
pub const MAX_TOKENS: usize = 16;

/// Tokens per K-quant call: a float and an integer accumulator each.
pub const MAX_K_TOKENS: usize = 8;

const Q8_0_BLOCK: usize = 34;
const Q8_K_BLOCK: usize = 292;

/// The 8 unsigned weight vectors of one group block (instruction j's in `w[j]`) and the
/// 16 rows' scales. Written without closures, which would not inherit the target
/// features and so would not be inlined.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn decode(ty: GgmlType, gb: &[u8]) -> ([__m512i; 8], __m512) {
    assert_eq!(gb.len(), group_block_bytes(ty), "interleaved: not one group block");
    let scales = &gb[gb.len() - 2 * GROUP_ROWS..];
    // SAFETY: reads the 32 bytes of `scales`.
    let d = _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(scales.as_ptr().cast()) });
    let mut w = [_mm512_setzero_si512(); 8];
    let vectors = if ty == GgmlType::Q8_0 { 8 } else { 4 };
    for (j, w) in w.iter_mut().enumerate().take(vectors) {
        // SAFETY: vector j lies in the quant bytes before the scales (checked length).
        *w = unsafe { _mm512_loadu_si512(gb[64 * j..64 * j + 64].as_ptr().cast()) };
    }
    if ty == GgmlType::Q8_0 {
        return (w, d);
    }
    // Low nibbles are instructions 0..4, high nibbles 4..8.
    let low4 = _mm512_set1_epi8(0x0f);
    for j in 0..4 {
        w[j + 4] = _mm512_and_si512(_mm512_srli_epi16::<4>(w[j]), low4);
        w[j] = _mm512_and_si512(w[j], low4);
    }
    if ty == GgmlType::Q5_0 {
        // The fifth bits: 16 added where a mask bit is set.
        let sixteen = _mm512_set1_epi8(16);
        for (j, w) in w.iter_mut().enumerate() {
            let m = &gb[256 + 8 * j..256 + 8 * j + 8];
            let mask = u64::from_le_bytes([m[0], m[1], m[2], m[3], m[4], m[5], m[6], m[7]]);
            *w = _mm512_mask_add_epi8(*w, mask, *w, sixteen);
        }
    }
    (w, d)
}

/// `out[t][i] = Σ_b isum(row i, token t, block b) · (d_w · d_a)` for the group's 16 rows
/// and T tokens: `group` is the group's blocks, `acts[t]` token t's Q8_0 row and `sums`
/// its per-block scales and corrections (from [`ActSums::row`]).
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI and F16C. Lengths are checked.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn group_tokens<const T: usize, const WIDE: bool>(
    ty: GgmlType,
    group: &[u8],
    stream: &[u8],
    acts: [&[u8]; T],
    sums: [(&[f32], &[i32]); T],
) -> Accs<T, WIDE> {
    let gbb = group_block_bytes(ty);
    let blocks = group.len() / gbb;
    assert!(acts.iter().all(|a| a.len() == blocks * Q8_0_BLOCK), "interleaved: activation rows do not fit");
    assert!(sums.iter().all(|(d, c)| d.len() == blocks && c.len() == blocks), "interleaved: sums do not fit");
    let mut acc = Accs::<T, WIDE>::new();
    for (b, gb) in group.chunks_exact(gbb).enumerate() {
        prefetch_ahead(stream, b, gbb);
        let (w, dw) = decode(ty, gb);
        for t in 0..T {
            let y = &acts[t][b * Q8_0_BLOCK + 2..(b + 1) * Q8_0_BLOCK];
            let mut isum = _mm512_set1_epi32(sums[t].1[b]);
            for (j, w) in w.iter().enumerate() {
                let four = i32::from_le_bytes([y[4 * j], y[4 * j + 1], y[4 * j + 2], y[4 * j + 3]]);
                isum = _mm512_dpbusd_epi32(isum, *w, _mm512_set1_epi32(four));
            }
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(sums[t].0[b]));
            acc.add(t, isum, scale);
        }
    }
    acc
}

/// How far ahead of the group block being computed its weights are requested. A kernel
/// streams through the groups of its task (`stream`: this group and those after it), so
/// the requests run on past the group's end and each block arrives before it is used
/// (requesting whole groups up front stalled on full miss queues, and left a gap at
/// each group's start: on a 2-core EPYC, streaming gave one-token decode +23% and 8
/// tokens a step +18%; 2048 bytes ahead was slower, 6144 and 8192 the same).
pub(crate) const AHEAD_BYTES: usize = 4096;

/// Requests the bytes `AHEAD_BYTES` ahead of block `b` of `stream`, one block's worth.
#[inline(always)]
fn prefetch_ahead(stream: &[u8], b: usize, gbb: usize) {
    crate::simd::prefetch(stream, b * gbb + AHEAD_BYTES, gbb);
}

/// `sums` of `ActSums` rows t0..t0 + T.
pub(crate) fn sums_rows<const T: usize>(sums: &ActSums, t0: usize) -> [(&[f32], &[i32]); T] {
    std::array::from_fn(|k| sums.row(t0 + k))
}

/// Four activation bytes broadcast to every lane.
#[inline]
#[target_feature(enable = "avx512f")]
fn broadcast4(y: &[u8], at: usize) -> __m512i {
    _mm512_set1_epi32(i32::from_le_bytes([y[at], y[at + 1], y[at + 2], y[at + 3]]))
}

/// 64 bytes of `gb` from `at` as a vector.
#[inline]
#[target_feature(enable = "avx512f")]
fn load64(gb: &[u8], at: usize) -> __m512i {
    // SAFETY: the slice holds exactly the 64 bytes read.
    unsafe { _mm512_loadu_si512(gb[at..at + 64].as_ptr().cast()) }
}

/// 16 f16 of `gb` from `at` as floats.
#[inline]
#[target_feature(enable = "avx512f,f16c")]
fn load_f16x16(gb: &[u8], at: usize) -> __m512 {
    // SAFETY: the slice holds exactly the 32 bytes read.
    _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(gb[at..at + 32].as_ptr().cast()) })
}

/// 16 bytes of `gb` from `at`.
#[inline]
#[target_feature(enable = "avx512f")]
fn load16(gb: &[u8], at: usize) -> __m128i {
    // SAFETY: the slice holds exactly the 16 bytes read.
    unsafe { _mm_loadu_si128(gb[at..at + 16].as_ptr().cast()) }
}

/// [`group_tokens`] for Q4_K weights and Q8_K activations: per block, per sub-block of
/// 32, eight `dpbusd` give the 16 rows' exact sums, multiplied by the rows' scales and
/// summed over the block in integers; the mins' sums come from `dpwssd` of the rows'
/// mins with the sub-block sums of the activations (`sums`: 4 pairs per block).
///
/// # Safety
/// As [`group_tokens`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn group_tokens_q4_k<const T: usize, const WIDE: bool>(
    group: &[u8],
    stream: &[u8],
    acts: [&[u8]; T],
    sums: [(&[f32], &[i32]); T],
) -> Accs<T, WIDE> {
    let gbb = group_block_bytes(GgmlType::Q4_K);
    let blocks = group.len() / gbb;
    assert!(acts.iter().all(|a| a.len() == blocks * Q8_K_BLOCK), "interleaved: activation rows do not fit");
    assert!(sums.iter().all(|(d, c)| d.len() == blocks && c.len() == 4 * blocks), "interleaved: sums do not fit");
    let low4 = _mm512_set1_epi8(0x0f);
    let mut acc = Accs::<T, WIDE>::new();
    for (b, gb) in group.chunks_exact(gbb).enumerate() {
        prefetch_ahead(stream, b, gbb);
        let mut tot = [_mm512_setzero_si512(); T];
        for s in 0..8 {
            // Sub-block s: chunk s / 2's bytes, low nibbles for even s, high for odd.
            let mut w = [_mm512_setzero_si512(); 8];
            for (j, w) in w.iter_mut().enumerate() {
                let bytes = load64(gb, 64 * (8 * (s / 2) + j));
                *w = if s % 2 == 0 { bytes } else { _mm512_srli_epi16::<4>(bytes) };
                *w = _mm512_and_si512(*w, low4);
            }
            let sc = _mm512_cvtepu8_epi32(load16(gb, 2048 + 16 * s));
            for t in 0..T {
                let y = &acts[t][b * Q8_K_BLOCK + 4 + 32 * s..b * Q8_K_BLOCK + 4 + 32 * s + 32];
                let mut isum = _mm512_setzero_si512();
                for (j, w) in w.iter().enumerate() {
                    isum = _mm512_dpbusd_epi32(isum, *w, broadcast4(y, 4 * j));
                }
                tot[t] = _mm512_add_epi32(tot[t], _mm512_mullo_epi32(isum, sc));
            }
        }
        let mut mins = [_mm512_setzero_si512(); 4];
        for (p, m) in mins.iter_mut().enumerate() {
            // SAFETY: reads the 32 bytes of pair p's mins.
            *m = _mm512_cvtepu8_epi16(unsafe { _mm256_loadu_si256(gb[2176 + 32 * p..2208 + 32 * p].as_ptr().cast()) });
        }
        let (d, dmin) = (load_f16x16(gb, 2304), load_f16x16(gb, 2336));
        for t in 0..T {
            let mut msum = _mm512_setzero_si512();
            for (p, m) in mins.iter().enumerate() {
                msum = _mm512_dpwssd_epi32(msum, *m, _mm512_set1_epi32(sums[t].1[4 * b + p]));
            }
            let dy = sums[t].0[b];
            acc.add(t, tot[t], _mm512_mul_ps(d, _mm512_set1_ps(dy)));
            acc.add(t, msum, _mm512_mul_ps(dmin, _mm512_set1_ps(-dy)));
        }
    }
    acc
}

/// [`group_tokens`] for Q6_K weights and Q8_K activations: per sub-block of 16, four
/// `dpbusd` starting from `-32 · Σ y` (`sums`: 16 per block) give the 16 rows' exact
/// sums of (q - 32)·y, multiplied by the rows' signed scales and summed over the block.
///
/// # Safety
/// As [`group_tokens`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(crate) unsafe fn group_tokens_q6_k<const T: usize, const WIDE: bool>(
    group: &[u8],
    stream: &[u8],
    acts: [&[u8]; T],
    sums: [(&[f32], &[i32]); T],
) -> Accs<T, WIDE> {
    let gbb = group_block_bytes(GgmlType::Q6_K);
    let blocks = group.len() / gbb;
    assert!(acts.iter().all(|a| a.len() == blocks * Q8_K_BLOCK), "interleaved: activation rows do not fit");
    assert!(sums.iter().all(|(d, c)| d.len() == blocks && c.len() == 16 * blocks), "interleaved: sums do not fit");
    let (low4, top2) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x30));
    let mut acc = Accs::<T, WIDE>::new();
    for (b, gb) in group.chunks_exact(gbb).enumerate() {
        prefetch_ahead(stream, b, gbb);
        let mut tot = [_mm512_setzero_si512(); T];
        for s in 0..16 {
            let mut w = [_mm512_setzero_si512(); 4];
            for (q, w) in w.iter_mut().enumerate() {
                let j = 4 * s + q;
                let nib = load64(gb, 64 * (j % 32));
                let low = if j < 32 { nib } else { _mm512_srli_epi16::<4>(nib) };
                // Instruction j's top bits sit at bits 2m of vector j % 16 (m = j / 16):
                // moved to bits 4..6 (a 16-bit shift only brings in bits that `top2` drops).
                let h = load64(gb, 2048 + 64 * (j % 16));
                let high = match j / 16 {
                    0 => _mm512_slli_epi16::<4>(h),
                    1 => _mm512_slli_epi16::<2>(h),
                    2 => h,
                    _ => _mm512_srli_epi16::<2>(h),
                };
                *w = _mm512_or_si512(_mm512_and_si512(low, low4), _mm512_and_si512(high, top2));
            }
            let sc = _mm512_cvtepi8_epi32(load16(gb, 3072 + 16 * s));
            for t in 0..T {
                let y = &acts[t][b * Q8_K_BLOCK + 4 + 16 * s..b * Q8_K_BLOCK + 4 + 16 * s + 16];
                let mut isum = _mm512_set1_epi32(sums[t].1[16 * b + s]);
                for (q, w) in w.iter().enumerate() {
                    isum = _mm512_dpbusd_epi32(isum, *w, broadcast4(y, 4 * q));
                }
                tot[t] = _mm512_add_epi32(tot[t], _mm512_mullo_epi32(isum, sc));
            }
        }
        let d = load_f16x16(gb, 3328);
        for t in 0..T {
            let dy = sums[t].0[b];
            acc.add(t, tot[t], _mm512_mul_ps(d, _mm512_set1_ps(dy)));
        }
    }
    acc
}

/// Per token, the 16 rows' sums over blocks of `isum · scale`: f32 fused multiply-adds,
/// or (`WIDE`) f64 ones, in which each block's product is exact (a 32-bit integer times an
/// f32), so only the additions round, at f64 precision. Wide sums of parts of a row (the
/// column shards of tensor parallelism) then add up to the whole row's sum rounded the same
/// way, once they are rounded to f32 after their all-reduce.
pub(crate) struct Accs<const T: usize, const WIDE: bool> {
    narrow: [__m512; T],
    wide: [[__m512d; 2]; T],
}

impl<const T: usize, const WIDE: bool> Accs<T, WIDE> {
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn new() -> Self {
        Accs { narrow: [_mm512_setzero_ps(); T], wide: [[_mm512_setzero_pd(); 2]; T] }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn add(&mut self, t: usize, isum: __m512i, scale: __m512) {
        if WIDE {
            let halves = [_mm512_castsi512_si256(isum), _mm512_extracti64x4_epi64::<1>(isum)];
            let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(scale)));
            let scales = [_mm512_castps512_ps256(scale), high];
            for h in 0..2 {
                let x = _mm512_cvtepi32_pd(halves[h]);
                self.wide[t][h] = _mm512_fmadd_pd(x, _mm512_cvtps_pd(scales[h]), self.wide[t][h]);
            }
        } else {
            self.narrow[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, self.narrow[t]);
        }
    }

    /// The f32 sums (narrow accumulators).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn narrow(&self) -> [[f32; GROUP_ROWS]; T] {
        let mut out = [[0.0f32; GROUP_ROWS]; T];
        for (o, a) in out.iter_mut().zip(self.narrow) {
            // SAFETY: writes exactly the 16 floats of `o`.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr(), a) };
        }
        out
    }

    /// The f64 sums (wide accumulators).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn wide(&self) -> [[f64; GROUP_ROWS]; T] {
        let mut out = [[0.0f64; GROUP_ROWS]; T];
        for (o, a) in out.iter_mut().zip(self.wide) {
            // SAFETY: each store writes 8 of the 16 doubles of `o`.
            unsafe {
                _mm512_storeu_pd(o.as_mut_ptr(), a[0]);
                _mm512_storeu_pd(o[8..].as_mut_ptr(), a[1]);
            }
        }
        out
    }
}
