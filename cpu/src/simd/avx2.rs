//! AVX2 + FMA kernels for every weight type, in the style of ggml's x86 `quants.c`.
//!
//! Every function here needs a CPU with AVX2, FMA and F16C (`Isa::Avx2` promises the
//! first two; `super::vec_dot` checks F16C, which every AVX2 CPU has). The helpers are
//! `pub(super)` so the AVX-512 kernels can reuse them for their 256-bit steps.

use std::arch::x86_64::*;

use super::common::{
    at, e8m0_to_f32_half, f16_at, f32_at, u32_at, unpack_k4_scales, unpack_q3_scales, KVALUES_IQ4NL, KVALUES_MXFP4,
};
use crate::{ActRow, GgmlType};

/// Bytes of a Q8_0 / Q8_1 / Q8_K activation block.
pub(super) const Q8_0: usize = 34;
pub(super) const Q8_1: usize = 36;
pub(super) const Q8_K: usize = 292;

/// The dot product of a row `w` of `ty` with the matching activations `a`.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C; `w` and `a` must be whole rows of the same length
/// (as `super::checked_rows` makes them).
pub(super) unsafe fn vec_dot(ty: GgmlType, w: &[u8], a: ActRow<'_>) -> f32 {
    match (ty, a) {
        (GgmlType::F32, ActRow::F32(x)) => dot_f32(w, x),
        (GgmlType::F16, ActRow::F32(x)) => dot_f16(w, x),
        (GgmlType::BF16, ActRow::F32(x)) => dot_bf16(w, x),
        (_, ActRow::Quant(a)) => match ty {
            GgmlType::Q4_0 => dot_q4_0(w, a),
            GgmlType::Q4_1 => dot_q4_1(w, a),
            GgmlType::Q5_0 => dot_q5_0(w, a),
            GgmlType::Q5_1 => dot_q5_1(w, a),
            GgmlType::Q8_0 => dot_q8_0(w, a),
            GgmlType::IQ4_NL => dot_iq4_nl(w, a),
            GgmlType::MXFP4 => dot_mxfp4(w, a),
            GgmlType::Q2_K => dot_q2_k(w, a),
            GgmlType::Q3_K => dot_q3_k(w, a),
            GgmlType::Q4_K => dot_q4_k(w, a),
            GgmlType::Q5_K => dot_q5_k(w, a),
            GgmlType::Q6_K => dot_q6_k(w, a),
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => unreachable!(),
        },
        _ => unreachable!("checked_rows matched the activation format"),
    }
}

// ---- Loads and reductions ----

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn load128(b: &[u8; 16]) -> __m128i {
    // SAFETY: reads exactly the 16 bytes of `b`.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn load256(b: &[u8; 32]) -> __m256i {
    // SAFETY: reads exactly the 32 bytes of `b`.
    unsafe { _mm256_loadu_si256(b.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn load_ps(x: &[f32; 8]) -> __m256 {
    // SAFETY: reads exactly the 8 floats of `x`.
    unsafe { _mm256_loadu_ps(x.as_ptr()) }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn hsum_ps(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

// ---- Unpacking weight quants to one byte per element ----

/// The 32 nibbles of `qs[16]` in ggml's element order: low nibbles are elements 0..16,
/// high nibbles elements 16..32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn nibbles_32(qs: &[u8; 16]) -> __m256i {
    let q = load128(qs);
    _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(q), q), _mm256_set1_epi8(0x0f))
}

/// Maps each nibble (0..16) through a 16-entry signed table with `pshufb`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn lookup_16(table: &[i8; 16], nibbles: __m256i) -> __m256i {
    // SAFETY: reads exactly the 16 bytes of `table`.
    let t = unsafe { _mm_loadu_si128(table.as_ptr().cast()) };
    _mm256_shuffle_epi8(_mm256_set_m128i(t, t), nibbles)
}

/// Byte i is 0xFF where bit i of `bits` is set, else 0 (ggml's `bytes_from_bits_32`):
/// spread byte i/8 of `bits` over bytes i, then set every bit but i%8 and compare.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bit_bytes_32(bits: u32) -> __m256i {
    let spread = _mm256_set_epi64x(0x0303_0303_0303_0303, 0x0202_0202_0202_0202, 0x0101_0101_0101_0101, 0);
    let bytes = _mm256_shuffle_epi8(_mm256_set1_epi32(bits as i32), spread);
    let all_but_bit = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    _mm256_cmpeq_epi8(_mm256_or_si256(bytes, all_but_bit), _mm256_set1_epi8(-1))
}

/// Each byte of `v` shifted right by `shift` (at most 7) and masked with `mask`: picks
/// the bit field at `shift` out of packed 1- and 2-bit quants.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn bits_at(v: __m256i, shift: i32, mask: i8) -> __m256i {
    // A 16-bit shift drags the high byte's low bits into the low byte's top; `mask`
    // only keeps bits that came from the byte itself.
    _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(shift)), _mm256_set1_epi8(mask))
}

// ---- Integer dot products of 32 bytes ----

/// Converts 16 i16 sums to 8 float lanes, each the sum of a pair.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn pair_sums_ps(x: __m256i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_madd_epi16(x, _mm256_set1_epi16(1)))
}

/// Unsigned weight bytes × signed activation bytes, as 8 partial sums.
/// `maddubs` cannot saturate here: every weight quant is ≤ 128, so a pair is ≤ 32512.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dot_u8_i8_ps(u: __m256i, y: __m256i) -> __m256 {
    pair_sums_ps(_mm256_maddubs_epi16(u, y))
}

/// Signed × signed bytes, as 8 partial sums: `maddubs` wants one operand unsigned, so
/// the weights' signs move onto the activations (|x|·(y·sign x) = x·y).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn dot_i8_i8_ps(x: __m256i, y: __m256i) -> __m256 {
    dot_u8_i8_ps(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
}

// ---- Float rows ----

/// Dot product of a row of floats stored as `B`-byte values with f32 activations;
/// `load8` converts `V = 8 * B` bytes to 8 floats. Four accumulators hide FMA latency;
/// the tail is zero-padded into one more vector.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_float<const B: usize, const V: usize>(w: &[u8], x: &[f32], load8: impl Fn(&[u8; V]) -> __m256) -> f32 {
    debug_assert_eq!(V, 8 * B);
    let (wv, w_tail) = w.as_chunks::<V>();
    let (xv, x_tail) = x.as_chunks::<8>();
    let mut acc = [_mm256_setzero_ps(); 4];
    let (w4, x4) = (wv.chunks_exact(4), xv.chunks_exact(4));
    let (w_rest, x_rest) = (w4.remainder(), x4.remainder());
    for (w4, x4) in w4.zip(x4) {
        for k in 0..4 {
            acc[k] = _mm256_fmadd_ps(load8(&w4[k]), load_ps(&x4[k]), acc[k]);
        }
    }
    for (wc, xc) in w_rest.iter().zip(x_rest) {
        acc[0] = _mm256_fmadd_ps(load8(wc), load_ps(xc), acc[0]);
    }
    if !x_tail.is_empty() {
        let (mut wt, mut xt) = ([0u8; V], [0f32; 8]);
        wt[..w_tail.len()].copy_from_slice(w_tail);
        xt[..x_tail.len()].copy_from_slice(x_tail);
        acc[1] = _mm256_fmadd_ps(load8(&wt), load_ps(&xt), acc[1]);
    }
    hsum_ps(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_f32(w: &[u8], x: &[f32]) -> f32 {
    // SAFETY: reads exactly the 32 bytes of `b`.
    dot_float::<4, 32>(w, x, |b| unsafe { _mm256_loadu_ps(b.as_ptr().cast()) })
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
    dot_float::<2, 16>(w, x, |b| _mm256_cvtph_ps(load128(b)))
}

/// BF16 is the top half of an f32.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_bf16(w: &[u8], x: &[f32]) -> f32 {
    dot_float::<2, 16>(w, x, |b| _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(load128(b)))))
}

// ---- 32-element blocks (Q8_0 / Q8_1 activations) ----

/// Where a 32-element block keeps its scale.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Scale {
    /// An f16 `d` at byte 0.
    F16,
    /// MXFP4's E8M0 exponent at byte 0: the scale is 2^(e-128).
    E8M0,
}

impl Scale {
    /// One block's scale, with scalar code (for blocks outside groups of four).
    #[inline(always)]
    pub(super) fn of(self, b: &[u8]) -> f32 {
        match self {
            Scale::F16 => f16_at(b, 0),
            Scale::E8M0 => e8m0_to_f32_half(b[0]),
        }
    }
}

/// The f16 at byte `off` of each of four blocks, as floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn f16x4<const N: usize>(blocks: &[[u8; N]; 4], off: usize) -> __m128 {
    let h = |k: usize| i16::from_le_bytes(*at(&blocks[k], off));
    _mm_cvtph_ps(_mm_setr_epi16(h(0), h(1), h(2), h(3), 0, 0, 0, 0))
}

/// Lane k: the scale of weight block k times that of activation block k.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn scales_x4<const W: usize, const A: usize>(scale: Scale, xs: &[[u8; W]; 4], ys: &[[u8; A]; 4]) -> __m128 {
    _mm_mul_ps(weight_scales_x4(scale, xs), f16x4(ys, 0))
}

/// Lane k: the scale of weight block k.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn weight_scales_x4<const W: usize>(scale: Scale, xs: &[[u8; W]; 4]) -> __m128 {
    match scale {
        Scale::F16 => f16x4(xs, 0),
        Scale::E8M0 => _mm_setr_ps(scale.of(&xs[0]), scale.of(&xs[1]), scale.of(&xs[2]), scale.of(&xs[3])),
    }
}

/// Σ m·s of four Q4_1/Q5_1 blocks (lanewise): the weight min `m` and the activation's
/// `s` = d·Σq, both f16 at byte 2.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn mins_x4<const W: usize, const A: usize>(acc: __m128, xs: &[[u8; W]; 4], ys: &[[u8; A]; 4]) -> __m128 {
    _mm_fmadd_ps(f16x4(xs, 2), f16x4(ys, 2), acc)
}

/// The same for one block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn min_x1(acc: __m128, x: &[u8], y: &[u8]) -> __m128 {
    _mm_add_ss(acc, _mm_set_ss(f16_at(x, 2) * f16_at(y, 2)))
}

/// Lane `k` of `v` in all 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn broadcast_lane(v: __m128, k: usize) -> __m256 {
    _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_set1_epi32(k as i32))
}

/// Dot product of `W`-byte weight blocks with `A`-byte activation blocks (Q8_0 or Q8_1).
/// `decode` gives a block's 32 weight quants as bytes; `scale` says where its scale is.
///
/// With Q8_0 activations (symmetric types) the weight bytes are signed. With Q8_1
/// activations (Q4_1, Q5_1: x = q·d + m) they are unsigned, and the min adds m·s.
///
/// Blocks go in fours so that their scales convert in one instruction (converting them
/// one by one costs more than the block's integer work); two accumulators keep
/// consecutive FMAs independent. Leftover blocks take scalar scales.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_blocks_32<const W: usize, const A: usize>(
    w: &[u8],
    a: &[u8],
    scale: Scale,
    decode: impl Fn(&[u8; W]) -> __m256i,
) -> f32 {
    let affine = A == Q8_1;
    let sums = |x: &[u8; W], y: &[u8; A]| {
        let (qx, qy) = (decode(x), load256(at(y, A - 32)));
        if affine {
            dot_u8_i8_ps(qx, qy)
        } else {
            dot_i8_i8_ps(qx, qy)
        }
    };
    let (w4, w_rest) = w.as_chunks::<W>().0.as_chunks::<4>();
    let (a4, a_rest) = a.as_chunks::<A>().0.as_chunks::<4>();
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut mins = _mm_setzero_ps();
    for (xs, ys) in w4.iter().zip(a4) {
        let d = scales_x4(scale, xs, ys);
        for k in 0..4 {
            acc[k % 2] = _mm256_fmadd_ps(broadcast_lane(d, k), sums(&xs[k], &ys[k]), acc[k % 2]);
        }
        if affine {
            mins = mins_x4(mins, xs, ys);
        }
    }
    for (x, y) in w_rest.iter().zip(a_rest) {
        acc[0] = _mm256_fmadd_ps(_mm256_set1_ps(scale.of(x) * f16_at(y, 0)), sums(x, y), acc[0]);
        if affine {
            mins = min_x1(mins, x, y);
        }
    }
    hsum_ps(_mm256_add_ps(acc[0], acc[1])) + hsum_ps(_mm256_zextps128_ps256(mins))
}

// The 32 quants of a block as bytes, in element order. Signed for the types dotted with
// Q8_0, unsigned for those dotted with Q8_1. Q5_0 and Q5_1 have ISA-specific decoders.

/// Q4_0 `{d, qs[16]}`: x = (q - 8)·d.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn quants_q4_0(b: &[u8; 18]) -> __m256i {
    _mm256_sub_epi8(nibbles_32(at(b, 2)), _mm256_set1_epi8(8))
}

/// Q4_1 `{d, m, qs[16]}`: x = q·d + m.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn quants_q4_1(b: &[u8; 20]) -> __m256i {
    nibbles_32(at(b, 4))
}

/// Q8_0 `{d, qs[32] i8}`: x = q·d.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn quants_q8_0(b: &[u8; 34]) -> __m256i {
    load256(at(b, 2))
}

/// IQ4_NL `{d, qs[16]}`: x = kvalues_iq4nl[nibble]·d.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn quants_iq4_nl(b: &[u8; 18]) -> __m256i {
    lookup_16(&KVALUES_IQ4NL, nibbles_32(at(b, 2)))
}

/// MXFP4 `{e: u8, qs[16]}`: x = kvalues_mxfp4[nibble]·2^(e-128).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn quants_mxfp4(b: &[u8; 17]) -> __m256i {
    lookup_16(&KVALUES_MXFP4, nibbles_32(at(b, 1)))
}

/// Q5_0 `{d, qh: u32, qs[16]}`: x = (q - 16)·d with bit i of qh the 5th bit of q_i. A
/// clear bit gives q - 16 = nibble - 16 = nibble | 0xF0 as i8; a set bit leaves the nibble.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn quants_q5_0(b: &[u8; 22]) -> __m256i {
    let high = _mm256_andnot_si256(bit_bytes_32(u32_at(b, 2)), _mm256_set1_epi8(0xf0u8 as i8));
    _mm256_or_si256(nibbles_32(at(b, 6)), high)
}

/// Q5_1 `{d, m, qh: u32, qs[16]}`: x = q·d + m, the 5th bit as in Q5_0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn quants_q5_1(b: &[u8; 24]) -> __m256i {
    let high = _mm256_and_si256(bit_bytes_32(u32_at(b, 4)), _mm256_set1_epi8(0x10));
    _mm256_or_si256(nibbles_32(at(b, 8)), high)
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q4_0(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_32::<18, Q8_0>(w, a, Scale::F16, |b| quants_q4_0(b))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q4_1(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_32::<20, Q8_1>(w, a, Scale::F16, |b| quants_q4_1(b))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q5_0(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_32::<22, Q8_0>(w, a, Scale::F16, |b| quants_q5_0(b))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q5_1(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_32::<24, Q8_1>(w, a, Scale::F16, |b| quants_q5_1(b))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q8_0(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_32::<34, Q8_0>(w, a, Scale::F16, |b| quants_q8_0(b))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_iq4_nl(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_32::<18, Q8_0>(w, a, Scale::F16, |b| quants_iq4_nl(b))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_mxfp4(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_32::<17, Q8_0>(w, a, Scale::E8M0, |b| quants_mxfp4(b))
}

// ---- 256-element K-quant blocks (Q8_K activations) ----

/// What a K-quant block contributes, before the activation scale: `d` times the integer
/// sums `sumi`, minus `dmin` times the integer sums `summ` (`None`: no min term).
pub(super) struct KSums<V> {
    pub d: f32,
    pub sumi: V,
    pub mins: Option<(f32, __m256i)>,
}

// A Q8_K block `{d: f32, qs[256] i8, bsums[16] i16}`: its scale, `N` quants from
// element `off`, and its 16 sums of 16 quants (as i16 lanes).

#[inline(always)]
pub(super) fn q8k_d(y: &[u8; Q8_K]) -> f32 {
    f32_at(y, 0)
}

#[inline(always)]
pub(super) fn q8k_qs<const N: usize>(y: &[u8; Q8_K], off: usize) -> &[u8; N] {
    at(y, 4 + off)
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn q8k_bsums(y: &[u8; Q8_K]) -> __m256i {
    load256(at(y, 260))
}

/// Dot product of `W`-byte K-quant blocks with Q8_K blocks; `block` gives one block's
/// integer sums.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_blocks_k<const W: usize>(w: &[u8], a: &[u8], block: impl Fn(&[u8; W], &[u8; Q8_K]) -> KSums<__m256i>) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (x, y) in w.as_chunks::<W>().0.iter().zip(a.as_chunks::<Q8_K>().0) {
        let dy = q8k_d(y);
        let s = block(x, y);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(s.d * dy), _mm256_cvtepi32_ps(s.sumi), acc);
        if let Some((dmin, summ)) = s.mins {
            acc = _mm256_fmadd_ps(_mm256_set1_ps(-dmin * dy), _mm256_cvtepi32_ps(summ), acc);
        }
    }
    hsum_ps(acc)
}

/// 16 i16 copies of scale bytes `lo` (lanes 0..8) and `hi` (lanes 8..16) from `scales`:
/// one per pair of products that `maddubs` leaves, for 32 elements spanning sub-blocks
/// `lo` and `hi`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn scales_for(scales: __m128i, lo: usize, hi: usize) -> __m256i {
    let splat = |i: usize| (i as i64) * 0x0101_0101_0101_0101;
    _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, _mm_set_epi64x(splat(hi), splat(lo))))
}

/// Σ scale·q·y over 32 elements as 8 i32 lanes: unsigned weight quants `u` (≤ 63, so
/// `maddubs` cannot saturate) times activation quants, then the pairs times their scales.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn scaled_dot(u: __m256i, y: &[u8; 32], scales: __m256i) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(u, load256(y)), scales)
}

/// Σ_k c_k · bsums_k for 16 i8 coefficients, as 8 i32 lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn bsums_dot(c: __m128i, y: &[u8; Q8_K]) -> __m256i {
    _mm256_madd_epi16(_mm256_cvtepi8_epi16(c), q8k_bsums(y))
}

/// -2^LOG2_K · Σ_k sc_k · bsums_k, the start of a block's sums for types whose
/// unsigned weight bytes are 2^LOG2_K too high: Σ sc·(u - k)·y = Σ sc·u·y - k·Σ sc·bsum
/// (Q3_K: k = 4, Q6_K: k = 32).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn offset_correction<const LOG2_K: i32>(sc: __m128i, y: &[u8; Q8_K]) -> __m256i {
    _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32::<LOG2_K>(bsums_dot(sc, y)))
}

/// Q4_K / Q5_K scales and mins: the scales (bytes 0..8) and Σ m_k·(bsum_2k + bsum_2k+1),
/// the min correction for sub-blocks of 32 (= two Q8_K bsums).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn k4_scales_mins(scales: &[u8; 12], y: &[u8; Q8_K]) -> (__m128i, __m256i) {
    let (sm, mins_twice) = k4_scales_and_mins(scales);
    (sm, bsums_dot(mins_twice, y))
}

/// The weight-only half of [`k4_scales_mins`]: the 8 scales and 8 mins as bytes (`sm`),
/// and each min twice (one per 16-element Q8_K sum).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) fn k4_scales_and_mins(scales: &[u8; 12]) -> (__m128i, __m128i) {
    let u = unpack_k4_scales(scales);
    let sm = _mm_set_epi32(u[3] as i32, u[2] as i32, u[1] as i32, u[0] as i32);
    let mins_twice = _mm_shuffle_epi8(sm, _mm_set_epi8(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8));
    (sm, mins_twice)
}

/// Q2_K `{scales[16] (lo nibble scale, hi nibble min), qs[64], d, dmin}`: x = d·sc·q - dmin·m
/// over sub-blocks of 16. In each 128-element half, element 32j + l is bits 2j..2j+2 of qs[l].
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q2_k(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_k::<84>(w, a, |x, y| {
        let sc = load128(at(x, 0));
        let scales = _mm_and_si128(sc, _mm_set1_epi8(0x0f));
        let mins = _mm_and_si128(_mm_srli_epi16::<4>(sc), _mm_set1_epi8(0x0f));
        let mut sumi = _mm256_setzero_si256();
        for h in 0..2 {
            let q = load256(at(x, 16 + 32 * h));
            for j in 0..4 {
                let u = bits_at(q, 2 * j as i32, 3);
                let s = scales_for(scales, 8 * h + 2 * j, 8 * h + 2 * j + 1);
                sumi = _mm256_add_epi32(sumi, scaled_dot(u, q8k_qs(y, 128 * h + 32 * j), s));
            }
        }
        KSums { d: f16_at(x, 80), sumi, mins: Some((f16_at(x, 82), bsums_dot(mins, y))) }
    })
}

/// Q3_K `{hmask[32], qs[64], scales[12], d}`: x = d·(sc - 32)·(q - 4·(1 - h)) with q the
/// 2-bit quant (laid out as in Q2_K) and h its hmask bit (bit 4·half + j of hmask[l]).
/// The weight is computed as the unsigned u = q + 4h minus 4, the 4 taken off through
/// the bsums: Σ sc·(u - 4)·y = Σ sc·u·y - 4·Σ sc·bsum.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q3_k(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_k::<110>(w, a, |x, y| {
        let u = unpack_q3_scales(at(x, 96));
        let biased = _mm_set_epi32(u[3] as i32, u[2] as i32, u[1] as i32, u[0] as i32);
        let scales = _mm_sub_epi8(biased, _mm_set1_epi8(32));
        let hmask = load256(at(x, 0));
        let mut sumi = offset_correction::<2>(scales, y);
        for h in 0..2 {
            let q = load256(at(x, 32 + 32 * h));
            for j in 0..4 {
                let high = _mm256_slli_epi16::<2>(bits_at(hmask, (4 * h + j) as i32, 1));
                let u = _mm256_or_si256(bits_at(q, 2 * j as i32, 3), high);
                let s = scales_for(scales, 8 * h + 2 * j, 8 * h + 2 * j + 1);
                sumi = _mm256_add_epi32(sumi, scaled_dot(u, q8k_qs(y, 128 * h + 32 * j), s));
            }
        }
        KSums { d: f16_at(x, 108), sumi, mins: None }
    })
}

/// Q4_K `{d, dmin, scales[12], qs[128]}` and Q5_K `{d, dmin, scales[12], qh[32], qs[128]}`:
/// x = d·sc·q - dmin·m over sub-blocks of 32. Chunk c (64 elements) is qs[32c..32c+32],
/// low nibbles first; Q5_K adds bit 2c (low) / 2c+1 (high) of qh[l] as the 5th bit.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn k4_block<const W: usize, const QH: bool>(x: &[u8; W], y: &[u8; Q8_K]) -> KSums<__m256i> {
    let (scales, summ) = k4_scales_mins(at(x, 4), y);
    let qs_off = if QH { 48 } else { 16 };
    let qh = if QH { load256(at(x, 16)) } else { _mm256_setzero_si256() };
    let low4 = _mm256_set1_epi8(0x0f);
    let mut sumi = _mm256_setzero_si256();
    for c in 0..4 {
        let q = load256(at(x, qs_off + 32 * c));
        let mut lo = _mm256_and_si256(q, low4);
        let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low4);
        if QH {
            lo = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(bits_at(qh, 2 * c as i32, 1)));
            hi = _mm256_or_si256(hi, _mm256_slli_epi16::<4>(bits_at(qh, 2 * c as i32 + 1, 1)));
        }
        let lo = scaled_dot(lo, q8k_qs(y, 64 * c), scales_for(scales, 2 * c, 2 * c));
        let hi = scaled_dot(hi, q8k_qs(y, 64 * c + 32), scales_for(scales, 2 * c + 1, 2 * c + 1));
        sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(lo, hi));
    }
    KSums { d: f16_at(x, 0), sumi, mins: Some((f16_at(x, 2), summ)) }
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q4_k(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_k::<144>(w, a, |x, y| k4_block::<144, false>(x, y))
}

#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q5_k(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_k::<176>(w, a, |x, y| k4_block::<176, true>(x, y))
}

/// Q6_K `{ql[128], qh[64], scales[16] i8, d}`: x = d·sc·(q - 32) over sub-blocks of 16.
/// In half h, 32-element group k takes the low (k < 2) or high nibbles of
/// ql[64h + 32(k%2)..] and bits 2k..2k+2 of qh[32h..] as its top two bits. The 32 is taken
/// off through the bsums: Σ sc·(q - 32)·y = Σ sc·q·y - 32·Σ sc·bsum.
#[target_feature(enable = "avx2,fma,f16c")]
fn dot_q6_k(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_k::<210>(w, a, |x, y| {
        let scales = load128(at(x, 192));
        let low4 = _mm256_set1_epi8(0x0f);
        let mut sumi = offset_correction::<5>(scales, y);
        for h in 0..2 {
            let ql = [load256(at(x, 64 * h)), load256(at(x, 64 * h + 32))];
            let qh = load256(at(x, 128 + 32 * h));
            for k in 0..4 {
                let nibbles = if k < 2 { ql[k] } else { _mm256_srli_epi16::<4>(ql[k - 2]) };
                let top = _mm256_slli_epi16::<4>(bits_at(qh, 2 * k as i32, 3));
                let u = _mm256_or_si256(_mm256_and_si256(nibbles, low4), top);
                let s = scales_for(scales, 8 * h + 2 * k, 8 * h + 2 * k + 1);
                sumi = _mm256_add_epi32(sumi, scaled_dot(u, q8k_qs(y, 128 * h + 32 * k), s));
            }
        }
        KSums { d: f16_at(x, 208), sumi, mins: None }
    })
}
