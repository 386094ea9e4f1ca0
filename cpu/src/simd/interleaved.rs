//! AVX-512 VNNI kernels for interleaved weights (`crate::interleaved`): one group of 16
//! rows times up to [`MAX_TOKENS`] activation rows per call.

use std::arch::x86_64::*;

use crate::interleaved::{group_block_bytes, ActSums, GROUP_ROWS};
use crate::GgmlType;

/// Tokens per call: one accumulator register each, beside the 8 weight vectors.
pub const MAX_TOKENS: usize = 16;

const Q8_0_BLOCK: usize = 34;

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
pub(crate) unsafe fn group_tokens<const T: usize>(
    ty: GgmlType,
    group: &[u8],
    acts: [&[u8]; T],
    sums: [(&[f32], &[i32]); T],
) -> [[f32; GROUP_ROWS]; T] {
    let gbb = group_block_bytes(ty);
    let blocks = group.len() / gbb;
    assert!(acts.iter().all(|a| a.len() == blocks * Q8_0_BLOCK), "interleaved: activation rows do not fit");
    assert!(sums.iter().all(|(d, c)| d.len() == blocks && c.len() == blocks), "interleaved: sums do not fit");
    let mut acc = [_mm512_setzero_ps(); T];
    for (b, gb) in group.chunks_exact(gbb).enumerate() {
        let (w, dw) = decode(ty, gb);
        for t in 0..T {
            let y = &acts[t][b * Q8_0_BLOCK + 2..(b + 1) * Q8_0_BLOCK];
            let mut isum = _mm512_set1_epi32(sums[t].1[b]);
            for (j, w) in w.iter().enumerate() {
                let four = i32::from_le_bytes([y[4 * j], y[4 * j + 1], y[4 * j + 2], y[4 * j + 3]]);
                isum = _mm512_dpbusd_epi32(isum, *w, _mm512_set1_epi32(four));
            }
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(sums[t].0[b]));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[t]);
        }
    }
    let mut out = [[0.0f32; GROUP_ROWS]; T];
    for (o, a) in out.iter_mut().zip(acc) {
        // SAFETY: writes exactly the 16 floats of `o`.
        unsafe { _mm512_storeu_ps(o.as_mut_ptr(), a) };
    }
    out
}

/// `sums` of `ActSums` rows t0..t0 + T.
pub(crate) fn sums_rows<const T: usize>(sums: &ActSums, t0: usize) -> [(&[f32], &[i32]); T] {
    std::array::from_fn(|k| sums.row(t0 + k))
}
