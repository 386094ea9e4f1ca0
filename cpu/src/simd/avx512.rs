//! AVX-512 kernels (F, BW, VL and VNNI) for every weight type.
//!
//! Compared with AVX2 they work on 64 bytes at a time: two 32-element blocks per vector
//! for the small block types, 64 elements of a K-quant block per vector. VNNI `dpbusd`
//! replaces `maddubs` + `madd` where no per-pair scale is needed, and `dpwssd` fuses the
//! K-quants' scale multiply with the accumulation.

use std::arch::x86_64::*;

use super::avx2::{
    bsums_dot, f16x4, hsum_ps, k4_scales_and_mins, k4_scales_mins, load128, load256, min_x1, mins_x4, q8k_d, q8k_qs,
    quants_iq4_nl, quants_mxfp4, quants_q4_0, quants_q4_1, quants_q8_0, weight_scales_x4, KSums, Scale, Q8_0, Q8_1,
    Q8_K,
};
use super::common::{at, f16_at, u32_at, unpack_q3_scales};
use super::PackedPair;
use crate::{ActRow, GgmlType};

/// The dot product of a row `w` of `ty` with the matching activations `a`.
///
/// # Safety
/// The CPU must support AVX-512 F, BW, VL and VNNI, AVX2, FMA and F16C; `w` and `a`
/// must be whole rows of the same length (as `super::checked_rows` makes them).
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

// ---- Loads and small helpers ----

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn load512(b: &[u8; 64]) -> __m512i {
    // SAFETY: reads exactly the 64 bytes of `b`.
    unsafe { _mm512_loadu_si512(b.as_ptr().cast()) }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn load_ps(x: &[f32; 16]) -> __m512 {
    // SAFETY: reads exactly the 16 floats of `x`.
    unsafe { _mm512_loadu_ps(x.as_ptr()) }
}

/// `lo` in bytes 0..32, `hi` in bytes 32..64.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn join(lo: __m256i, hi: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

// ---- Float rows ----

/// As `avx2::dot_float`, 16 lanes wide: `load16` converts `V = 16 * B` bytes to floats.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_float<const B: usize, const V: usize>(w: &[u8], x: &[f32], load16: impl Fn(&[u8; V]) -> __m512) -> f32 {
    debug_assert_eq!(V, 16 * B);
    let (wv, w_tail) = w.as_chunks::<V>();
    let (xv, x_tail) = x.as_chunks::<16>();
    let mut acc = [_mm512_setzero_ps(); 4];
    let (w4, x4) = (wv.chunks_exact(4), xv.chunks_exact(4));
    let (w_rest, x_rest) = (w4.remainder(), x4.remainder());
    for (w4, x4) in w4.zip(x4) {
        for k in 0..4 {
            acc[k] = _mm512_fmadd_ps(load16(&w4[k]), load_ps(&x4[k]), acc[k]);
        }
    }
    for (k, (wc, xc)) in w_rest.iter().zip(x_rest).enumerate() {
        acc[k] = _mm512_fmadd_ps(load16(wc), load_ps(xc), acc[k]);
    }
    if !x_tail.is_empty() {
        let (mut wt, mut xt) = ([0u8; V], [0f32; 16]);
        wt[..w_tail.len()].copy_from_slice(w_tail);
        xt[..x_tail.len()].copy_from_slice(x_tail);
        acc[3] = _mm512_fmadd_ps(load16(&wt), load_ps(&xt), acc[3]);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_f32(w: &[u8], x: &[f32]) -> f32 {
    // SAFETY: reads exactly the 64 bytes of `b`.
    dot_float::<4, 64>(w, x, |b| unsafe { _mm512_loadu_ps(b.as_ptr().cast()) })
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_f16(w: &[u8], x: &[f32]) -> f32 {
    dot_float::<2, 32>(w, x, |b| _mm512_cvtph_ps(load256(b)))
}

/// BF16 is the top half of an f32.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_bf16(w: &[u8], x: &[f32]) -> f32 {
    dot_float::<2, 32>(w, x, |b| _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(load256(b)))))
}

// ---- 32-element blocks (Q8_0 / Q8_1 activations), two per vector ----

/// For pair p of a group of four blocks: lanes 0..8 take block 2p's scale, 8..16 block 2p+1's.
static PAIR_SCALE_LANES: [[i32; 16]; 2] =
    [[0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3]];

/// As `avx2::dot_blocks_32`, two blocks per vector: one `dpbusd` gives both blocks'
/// sums (lanes 0..8 and 8..16), scaled by a vector holding each block's scale in its
/// lanes. Leftover blocks take 256-bit steps.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_blocks_32<const W: usize, const A: usize>(
    w: &[u8],
    a: &[u8],
    scale: Scale,
    decode: impl Fn(&[u8; W]) -> __m256i,
) -> f32 {
    dot_blocks_32_tokens::<W, A, 1>(w, [a], scale, decode)[0]
}

/// [`dot_blocks_32`] of one weight row with `T` activation rows: each weight block is
/// decoded once and dotted with every row (prompt processing reuses weights across
/// tokens). Per row the operations and their order are exactly `dot_blocks_32`'s, so
/// the results are bit-identical to T single-row calls.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_blocks_32_tokens<const W: usize, const A: usize, const T: usize>(
    w: &[u8],
    a: [&[u8]; T],
    scale: Scale,
    decode: impl Fn(&[u8; W]) -> __m256i,
) -> [f32; T] {
    let affine = A == Q8_1;
    let (w4, w_rest) = w.as_chunks::<W>().0.as_chunks::<4>();
    let a4: [&[[[u8; A]; 4]]; T] = a.map(|a| a.as_chunks::<A>().0.as_chunks::<4>().0);
    let mut acc = [[_mm512_setzero_ps(); 2]; T];
    let mut mins = [_mm_setzero_ps(); T];
    for (g, xs) in w4.iter().enumerate() {
        // Everything that depends on the weights alone is done once for all T rows.
        let qx = [0, 1].map(|p| join(decode(&xs[2 * p]), decode(&xs[2 * p + 1])));
        let (abs_x, neg_x) = (qx.map(|q| _mm512_abs_epi8(q)), qx.map(|q| _mm512_movepi8_mask(q)));
        let dw = weight_scales_x4(scale, xs);
        for t in 0..T {
            let ys = &a4[t][g];
            let d = _mm512_castps128_ps512(_mm_mul_ps(dw, f16x4(ys, 0)));
            for p in 0..2 {
                let qy = join(load256(at(&ys[2 * p], A - 32)), load256(at(&ys[2 * p + 1], A - 32)));
                let zero = _mm512_setzero_si512();
                // Signed × signed: VNNI `dpbusd` wants unsigned × signed, so the weights'
                // signs move onto the activations (AVX-512 has no `vpsignb`).
                let sums = if affine {
                    _mm512_dpbusd_epi32(zero, qx[p], qy)
                } else {
                    _mm512_dpbusd_epi32(zero, abs_x[p], _mm512_mask_sub_epi8(qy, neg_x[p], zero, qy))
                };
                // SAFETY: reads exactly the 64 bytes of the table row.
                let lanes = unsafe { _mm512_loadu_si512(PAIR_SCALE_LANES[p].as_ptr().cast()) };
                acc[t][p] = _mm512_fmadd_ps(_mm512_permutexvar_ps(lanes, d), _mm512_cvtepi32_ps(sums), acc[t][p]);
            }
            if affine {
                mins[t] = mins_x4(mins[t], xs, ys);
            }
        }
    }
    let mut sum = [0.0f32; T];
    for t in 0..T {
        sum[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
    }
    rest_blocks_32::<W, A, T>(w_rest, w4.len() * 4, a, scale, &decode, &mut sum, &mut mins);
    for t in 0..T {
        sum[t] += hsum_ps(_mm256_zextps128_ps256(mins[t]));
    }
    sum
}

/// The blocks after the last whole group of four (from block `first` on), 256 bits at a
/// time, added to `sum` (and, for Q8_1 activations, to `mins`).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn rest_blocks_32<const W: usize, const A: usize, const T: usize>(
    w_rest: &[[u8; W]],
    first: usize,
    a: [&[u8]; T],
    scale: Scale,
    decode: &impl Fn(&[u8; W]) -> __m256i,
    sum: &mut [f32; T],
    mins: &mut [__m128; T],
) {
    let affine = A == Q8_1;
    for (b, x) in w_rest.iter().enumerate() {
        let qx = decode(x);
        for t in 0..T {
            let y = &a[t].as_chunks::<A>().0[first + b];
            let qy = load256(at(y, A - 32));
            let zero = _mm256_setzero_si256();
            let sums = if affine {
                _mm256_dpbusd_epi32(zero, qx, qy)
            } else {
                _mm256_dpbusd_epi32(zero, _mm256_sign_epi8(qx, qx), _mm256_sign_epi8(qy, qx))
            };
            sum[t] += scale.of(x) * f16_at(y, 0) * hsum_ps(_mm256_cvtepi32_ps(sums));
            if affine {
                mins[t] = min_x1(mins[t], x, y);
            }
        }
    }
}

/// [`dot_blocks_32_tokens`] for Q8_0 activations packed by `PackedActs`. Per token the
/// integer lanes, the scale products and the float operations are the same, in the same
/// order, so the results are bit-identical; what depends on the token alone was done once
/// by the packing, and the weights' sign trick becomes a bias: `dpbusd` of the weights
/// plus 128 (unsigned), starting from the packed `-128 · Σ` lanes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_blocks_32_packed<const W: usize, const K: u8, const T: usize>(
    w: &[u8],
    p: [&[PackedPair]; T],
    a: [&[u8]; T],
    scale: Scale,
) -> [f32; T] {
    let decode = |b: &[u8; W]| decode_signed_32::<K>(b);
    let (w4, w_rest) = w.as_chunks::<W>().0.as_chunks::<4>();
    let flip = _mm512_set1_epi8(i8::MIN);
    // SAFETY: each reads exactly the 64 bytes of a table row.
    let lanes = unsafe {
        [
            _mm512_loadu_si512(PAIR_SCALE_LANES[0].as_ptr().cast()),
            _mm512_loadu_si512(PAIR_SCALE_LANES[1].as_ptr().cast()),
        ]
    };
    let mut acc = [[_mm512_setzero_ps(); 2]; T];
    for (g, xs) in w4.iter().enumerate() {
        // Written out rather than with `array::map`, whose closures are not inlined here.
        let u = [
            _mm512_xor_si512(join(decode_signed_32::<K>(&xs[0]), decode_signed_32::<K>(&xs[1])), flip),
            _mm512_xor_si512(join(decode_signed_32::<K>(&xs[2]), decode_signed_32::<K>(&xs[3])), flip),
        ];
        let dw = _mm512_castps128_ps512(weight_scales_x4(scale, xs));
        let dwl = [_mm512_permutexvar_ps(lanes[0], dw), _mm512_permutexvar_ps(lanes[1], dw)];
        for t in 0..T {
            for q in 0..2 {
                let pp = &p[t][2 * g + q];
                // SAFETY: each load reads exactly one 64-byte field of `pp`.
                let (qy, neg_bias, dy) = unsafe {
                    (
                        _mm512_loadu_si512(pp.q.as_ptr().cast()),
                        _mm512_loadu_si512(pp.neg_bias.as_ptr().cast()),
                        _mm512_loadu_ps(pp.d.as_ptr()),
                    )
                };
                let sums = _mm512_dpbusd_epi32(neg_bias, u[q], qy);
                acc[t][q] = _mm512_fmadd_ps(_mm512_mul_ps(dwl[q], dy), _mm512_cvtepi32_ps(sums), acc[t][q]);
            }
        }
    }
    let mut sum = [0.0f32; T];
    for t in 0..T {
        sum[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]));
    }
    let mut mins = [_mm_setzero_ps(); T];
    rest_blocks_32::<W, Q8_0, T>(w_rest, w4.len() * 4, a, scale, &decode, &mut sum, &mut mins);
    for t in 0..T {
        sum[t] += hsum_ps(_mm256_zextps128_ps256(mins[t]));
    }
    sum
}

/// One weight row of `ty` (a type with Q8_0 activations) dotted with T packed activation
/// rows `p` (`a`: the same rows unpacked).
///
/// # Safety
/// As [`vec_dot`], for every row of `a`; each `p[t]` holds the pairs of all whole groups
/// of four blocks of the row.
pub(super) unsafe fn vec_dot_packed<const T: usize>(
    ty: GgmlType,
    w: &[u8],
    p: [&[PackedPair]; T],
    a: [&[u8]; T],
) -> [f32; T] {
    match ty {
        GgmlType::Q4_0 => dot_blocks_32_packed::<18, KIND_Q4_0, T>(w, p, a, Scale::F16),
        GgmlType::Q5_0 => dot_blocks_32_packed::<22, KIND_Q5_0, T>(w, p, a, Scale::F16),
        GgmlType::Q8_0 => dot_blocks_32_packed::<34, KIND_Q8_0, T>(w, p, a, Scale::F16),
        GgmlType::IQ4_NL => dot_blocks_32_packed::<18, KIND_IQ4_NL, T>(w, p, a, Scale::F16),
        GgmlType::MXFP4 => dot_blocks_32_packed::<17, KIND_MXFP4, T>(w, p, a, Scale::E8M0),
        other => unreachable!("no packed kernel for {other}: PackedActs::for_weights refuses it"),
    }
}

const KIND_Q4_0: u8 = 0;
const KIND_Q5_0: u8 = 1;
const KIND_Q8_0: u8 = 2;
const KIND_IQ4_NL: u8 = 3;
const KIND_MXFP4: u8 = 4;

/// The 32 signed quants of one block of a type with Q8_0 activations (`K` names it).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn decode_signed_32<const K: u8>(b: &[u8]) -> __m256i {
    match K {
        KIND_Q4_0 => quants_q4_0(at(b, 0)),
        KIND_Q5_0 => quants_q5::<true>(u32_at(b, 2), at(b, 6)),
        KIND_Q8_0 => quants_q8_0(at(b, 0)),
        KIND_IQ4_NL => quants_iq4_nl(at(b, 0)),
        _ => quants_mxfp4(at(b, 0)),
    }
}

const TOKENS: usize = super::ROW_TOKENS;

/// One weight row of `ty` dotted with `TOKENS` activation rows, for the 32-element block
/// types; None for the others (callers then dot token by token).
///
/// # Safety
/// As [`vec_dot`], for every row of `a`.
pub(super) unsafe fn vec_dot_tokens(ty: GgmlType, w: &[u8], a: [&[u8]; TOKENS]) -> Option<[f32; TOKENS]> {
    Some(match ty {
        GgmlType::Q4_0 => dot_blocks_32_tokens::<18, Q8_0, TOKENS>(w, a, Scale::F16, |b| quants_q4_0(b)),
        GgmlType::Q4_1 => dot_blocks_32_tokens::<20, Q8_1, TOKENS>(w, a, Scale::F16, |b| quants_q4_1(b)),
        GgmlType::Q5_0 => {
            dot_blocks_32_tokens::<22, Q8_0, TOKENS>(w, a, Scale::F16, |b| quants_q5::<true>(u32_at(b, 2), at(b, 6)))
        }
        GgmlType::Q5_1 => {
            dot_blocks_32_tokens::<24, Q8_1, TOKENS>(w, a, Scale::F16, |b| quants_q5::<false>(u32_at(b, 4), at(b, 8)))
        }
        GgmlType::Q8_0 => dot_blocks_32_tokens::<34, Q8_0, TOKENS>(w, a, Scale::F16, |b| quants_q8_0(b)),
        GgmlType::IQ4_NL => dot_blocks_32_tokens::<18, Q8_0, TOKENS>(w, a, Scale::F16, |b| quants_iq4_nl(b)),
        GgmlType::MXFP4 => dot_blocks_32_tokens::<17, Q8_0, TOKENS>(w, a, Scale::E8M0, |b| quants_mxfp4(b)),
        GgmlType::Q4_K => dot_k4_tokens::<144, false, TOKENS>(w, a),
        GgmlType::Q5_K => dot_k4_tokens::<176, true, TOKENS>(w, a),
        GgmlType::Q6_K => dot_q6_k_tokens::<TOKENS>(w, a),
        _ => return None,
    })
}

/// Q5_0 / Q5_1: the nibbles of `qs` with the 5th bits of `qh` as a byte mask. Q5_0
/// (x = (q - 16)·d) subtracts 16 where the bit is clear; Q5_1 adds 16 where it is set.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn quants_q5<const SIGNED: bool>(qh: u32, qs: &[u8; 16]) -> __m256i {
    let nibbles = super::avx2::nibbles_32(qs);
    let sixteen = _mm256_set1_epi8(16);
    if SIGNED {
        _mm256_mask_sub_epi8(nibbles, !qh, nibbles, sixteen)
    } else {
        _mm256_mask_add_epi8(nibbles, qh, nibbles, sixteen)
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_q4_0(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_32::<18, Q8_0>(w, a, Scale::F16, |b| quants_q4_0(b))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_q4_1(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_32::<20, Q8_1>(w, a, Scale::F16, |b| quants_q4_1(b))
}

/// Q5_0 `{d, qh: u32, qs[16]}`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_q5_0(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_32::<22, Q8_0>(w, a, Scale::F16, |b| quants_q5::<true>(u32_at(b, 2), at(b, 6)))
}

/// Q5_1 `{d, m, qh: u32, qs[16]}`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_q5_1(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_32::<24, Q8_1>(w, a, Scale::F16, |b| quants_q5::<false>(u32_at(b, 4), at(b, 8)))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_q8_0(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_32::<34, Q8_0>(w, a, Scale::F16, |b| quants_q8_0(b))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_iq4_nl(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_32::<18, Q8_0>(w, a, Scale::F16, |b| quants_iq4_nl(b))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_mxfp4(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_32::<17, Q8_0>(w, a, Scale::E8M0, |b| quants_mxfp4(b))
}

// ---- 256-element K-quant blocks (Q8_K activations), 64 elements per vector ----

/// For each of the four 64-element vectors of a block: which sub-block of `size`
/// elements each of the 32 i16 product pairs left by `maddubs` belongs to.
const fn sub_block_of_pairs(size: usize) -> [[i16; 32]; 4] {
    let mut t = [[0i16; 32]; 4];
    let mut v = 0;
    while v < 4 {
        let mut pair = 0;
        while pair < 32 {
            t[v][pair] = ((64 * v + 2 * pair) / size) as i16;
            pair += 1;
        }
        v += 1;
    }
    t
}

static PAIRS_IN_16: [[i16; 32]; 4] = sub_block_of_pairs(16);
static PAIRS_IN_32: [[i16; 32]; 4] = sub_block_of_pairs(32);

/// i16 sub-block scales (`scales`' low lanes) spread over the pairs they apply to.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn scales_for(scales: __m512i, sub_block_of_pair: &[i16; 32]) -> __m512i {
    // SAFETY: reads exactly the 64 bytes of the table.
    let index = unsafe { _mm512_loadu_si512(sub_block_of_pair.as_ptr().cast()) };
    _mm512_permutexvar_epi16(index, scales)
}

/// i16 scales from 16 i8 (or, `UNSIGNED`, u8) values.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn widen_scales<const UNSIGNED: bool>(s: __m128i) -> __m512i {
    let s = if UNSIGNED { _mm256_cvtepu8_epi16(s) } else { _mm256_cvtepi8_epi16(s) };
    _mm512_zextsi256_si512(s)
}

/// `acc` + Σ scale·u·y over 64 elements, in 16 i32 lanes: unsigned weight quants `u`
/// (≤ 63, so `maddubs` cannot saturate) times activation quants, then VNNI `dpwssd`
/// multiplies the i16 pairs by their scales and accumulates.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn scaled_dot(acc: __m512i, u: __m512i, y: &[u8; 64], scales: __m512i) -> __m512i {
    _mm512_dpwssd_epi32(acc, _mm512_maddubs_epi16(u, load512(y)), scales)
}

/// 32 bytes in both halves of a vector, the upper copy shifted down by 2 bits. The 2-bit
/// fields of Q2_K/Q3_K quants and Q6_K high bits sit at bits 2j..2j+2 for 32-element
/// group j, so bits 0..2 / 4..6 hold groups 0, 1 / 2, 3 across the two halves.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn two_bit_groups(b: &[u8; 32]) -> __m512i {
    let shift = join(_mm256_setzero_si256(), _mm256_set1_epi16(2));
    _mm512_srlv_epi16(_mm512_broadcast_i64x4(load256(b)), shift)
}

/// Bit `shift` of each byte in the lower half of a copy of `b` in both halves, bit
/// `shift + 1` in the upper half, as a byte mask: one bit per element of two 32-element
/// groups (Q3_K's hmask, Q5_K's qh).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn bit_pair_mask(b: __m512i, shift: u32) -> __mmask64 {
    // A 16-bit shift moves the high byte's low bits into the low byte's top; the test
    // only looks at bits 0 and 1, which come from the byte itself for shift ≤ 6.
    let shifted = _mm512_srl_epi16(b, _mm_cvtsi32_si128(shift as i32));
    _mm512_test_epi8_mask(shifted, join(_mm256_set1_epi8(1), _mm256_set1_epi8(2)))
}

/// As `avx2::dot_blocks_k` with 16-lane integer sums; the mins stay 256 bits wide.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_blocks_k<const W: usize>(w: &[u8], a: &[u8], block: impl Fn(&[u8; W], &[u8; Q8_K]) -> KSums<__m512i>) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let mut acc_mins = _mm256_setzero_ps();
    for (x, y) in w.as_chunks::<W>().0.iter().zip(a.as_chunks::<Q8_K>().0) {
        let dy = q8k_d(y);
        let s = block(x, y);
        acc = _mm512_fmadd_ps(_mm512_set1_ps(s.d * dy), _mm512_cvtepi32_ps(s.sumi), acc);
        if let Some((dmin, summ)) = s.mins {
            acc_mins = _mm256_fmadd_ps(_mm256_set1_ps(-dmin * dy), _mm256_cvtepi32_ps(summ), acc_mins);
        }
    }
    _mm512_reduce_add_ps(acc) + hsum_ps(acc_mins)
}

/// `avx2::offset_correction` in the low lanes of a 512-bit sum.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn offset_correction<const LOG2_K: i32>(sc: __m128i, y: &[u8; Q8_K]) -> __m512i {
    _mm512_zextsi256_si512(super::avx2::offset_correction::<LOG2_K>(sc, y))
}

/// Q2_K `{scales[16], qs[64], d, dmin}`; layout as in `avx2::dot_q2_k`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_q2_k(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_k::<84>(w, a, |x, y| {
        let sc = load128(at(x, 0));
        let low4 = _mm_set1_epi8(0x0f);
        let scales = widen_scales::<true>(_mm_and_si128(sc, low4));
        let mins = _mm_and_si128(_mm_srli_epi16::<4>(sc), low4);
        let mut sumi = _mm512_setzero_si512();
        for h in 0..2 {
            let q = two_bit_groups(at(x, 16 + 32 * h));
            for p in 0..2 {
                let u = _mm512_and_si512(_mm512_srl_epi16(q, _mm_cvtsi32_si128(4 * p as i32)), _mm512_set1_epi8(3));
                sumi = scaled_dot(sumi, u, q8k_qs(y, 128 * h + 64 * p), scales_for(scales, &PAIRS_IN_16[2 * h + p]));
            }
        }
        KSums { d: f16_at(x, 80), sumi, mins: Some((f16_at(x, 82), bsums_dot(mins, y))) }
    })
}

/// Q3_K `{hmask[32], qs[64], scales[12], d}`; weights and offset as in `avx2::dot_q3_k`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_q3_k(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_k::<110>(w, a, |x, y| {
        let u = unpack_q3_scales(at(x, 96));
        let biased = _mm_set_epi32(u[3] as i32, u[2] as i32, u[1] as i32, u[0] as i32);
        let sc = _mm_sub_epi8(biased, _mm_set1_epi8(32));
        let scales = widen_scales::<false>(sc);
        let hmask = _mm512_broadcast_i64x4(load256(at(x, 0)));
        let mut sumi = offset_correction::<2>(sc, y);
        for h in 0..2 {
            let q = two_bit_groups(at(x, 32 + 32 * h));
            for p in 0..2 {
                let low = _mm512_and_si512(_mm512_srl_epi16(q, _mm_cvtsi32_si128(4 * p as i32)), _mm512_set1_epi8(3));
                let high = bit_pair_mask(hmask, (4 * h + 2 * p) as u32);
                let u = _mm512_mask_add_epi8(low, high, low, _mm512_set1_epi8(4));
                sumi = scaled_dot(sumi, u, q8k_qs(y, 128 * h + 64 * p), scales_for(scales, &PAIRS_IN_16[2 * h + p]));
            }
        }
        KSums { d: f16_at(x, 108), sumi, mins: None }
    })
}

/// Q4_K / Q5_K; layout as in `avx2::k4_block`. Chunk c's 32 qs bytes give a vector of
/// 64 elements: low nibbles in the lower half, high nibbles in the upper.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn k4_block<const W: usize, const QH: bool>(x: &[u8; W], y: &[u8; Q8_K]) -> KSums<__m512i> {
    let (sm, summ) = k4_scales_mins(at(x, 4), y);
    let scales = widen_scales::<true>(sm);
    let qs_off = if QH { 48 } else { 16 };
    let qh = if QH { _mm512_broadcast_i64x4(load256(at(x, 16))) } else { _mm512_setzero_si512() };
    let mut sumi = _mm512_setzero_si512();
    for (c, pairs) in PAIRS_IN_32.iter().enumerate() {
        let q = load256(at(x, qs_off + 32 * c));
        let mut u = _mm512_and_si512(join(q, _mm256_srli_epi16::<4>(q)), _mm512_set1_epi8(0x0f));
        if QH {
            u = _mm512_mask_add_epi8(u, bit_pair_mask(qh, 2 * c as u32), u, _mm512_set1_epi8(16));
        }
        sumi = scaled_dot(sumi, u, q8k_qs(y, 64 * c), scales_for(scales, pairs));
    }
    KSums { d: f16_at(x, 0), sumi, mins: Some((f16_at(x, 2), summ)) }
}

/// [`k4_block`] and `dot_blocks_k` for one Q4_K / Q5_K weight row and `T` activation rows:
/// the weight nibbles and scales of a block are unpacked once for all rows. Per row the
/// operations and their order are exactly `dot_blocks_k(.., k4_block)`'s, so the results
/// are bit-identical to T single-row calls.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_k4_tokens<const W: usize, const QH: bool, const T: usize>(w: &[u8], a: [&[u8]; T]) -> [f32; T] {
    let ys: [&[[u8; Q8_K]]; T] = a.map(|a| a.as_chunks::<Q8_K>().0);
    let mut acc = [_mm512_setzero_ps(); T];
    let mut acc_mins = [_mm256_setzero_ps(); T];
    for (b, x) in w.as_chunks::<W>().0.iter().enumerate() {
        let (sm, mins_twice) = k4_scales_and_mins(at(x, 4));
        let scales = widen_scales::<true>(sm);
        let qs_off = if QH { 48 } else { 16 };
        let qh = if QH { _mm512_broadcast_i64x4(load256(at(x, 16))) } else { _mm512_setzero_si512() };
        let chunk = |c: usize| {
            let q = load256(at(x, qs_off + 32 * c));
            let mut u = _mm512_and_si512(join(q, _mm256_srli_epi16::<4>(q)), _mm512_set1_epi8(0x0f));
            if QH {
                u = _mm512_mask_add_epi8(u, bit_pair_mask(qh, 2 * c as u32), u, _mm512_set1_epi8(16));
            }
            (u, scales_for(scales, &PAIRS_IN_32[c]))
        };
        let chunks = [chunk(0), chunk(1), chunk(2), chunk(3)];
        let (d, dmin) = (f16_at(x, 0), f16_at(x, 2));
        for t in 0..T {
            let y = &ys[t][b];
            let dy = q8k_d(y);
            let mut sumi = _mm512_setzero_si512();
            for (c, (u, sc)) in chunks.iter().enumerate() {
                sumi = scaled_dot(sumi, *u, q8k_qs(y, 64 * c), *sc);
            }
            acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(d * dy), _mm512_cvtepi32_ps(sumi), acc[t]);
            let summ = bsums_dot(mins_twice, y);
            acc_mins[t] = _mm256_fmadd_ps(_mm256_set1_ps(-dmin * dy), _mm256_cvtepi32_ps(summ), acc_mins[t]);
        }
    }
    let mut out = [0.0f32; T];
    for t in 0..T {
        out[t] = _mm512_reduce_add_ps(acc[t]) + hsum_ps(acc_mins[t]);
    }
    out
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_q4_k(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_k::<144>(w, a, |x, y| k4_block::<144, false>(x, y))
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_q5_k(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_k::<176>(w, a, |x, y| k4_block::<176, true>(x, y))
}

/// `dot_q6_k` for one weight row and `T` activation rows: each block's 6-bit quants and
/// scales are unpacked once for all rows. Per row the operations and their order are
/// exactly `dot_q6_k`'s, so the results are bit-identical to T single-row calls.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_q6_k_tokens<const T: usize>(w: &[u8], a: [&[u8]; T]) -> [f32; T] {
    let ys: [&[[u8; Q8_K]]; T] = a.map(|a| a.as_chunks::<Q8_K>().0);
    let mut acc = [_mm512_setzero_ps(); T];
    for (b, x) in w.as_chunks::<210>().0.iter().enumerate() {
        let sc = load128(at(x, 192));
        let scales = widen_scales::<false>(sc);
        let (low4, top2) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x30));
        let half = |h: usize| {
            let ql = load512(at(x, 64 * h));
            let qh = two_bit_groups(at(x, 128 + 32 * h));
            let lo = _mm512_or_si512(_mm512_and_si512(ql, low4), _mm512_and_si512(_mm512_slli_epi16::<4>(qh), top2));
            let hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(ql), low4), _mm512_and_si512(qh, top2));
            [(lo, scales_for(scales, &PAIRS_IN_16[2 * h])), (hi, scales_for(scales, &PAIRS_IN_16[2 * h + 1]))]
        };
        let groups = [half(0), half(1)];
        let d = f16_at(x, 208);
        for t in 0..T {
            let y = &ys[t][b];
            let dy = q8k_d(y);
            let mut sumi = offset_correction::<5>(sc, y);
            for (h, [(lo, s_lo), (hi, s_hi)]) in groups.iter().enumerate() {
                sumi = scaled_dot(sumi, *lo, q8k_qs(y, 128 * h), *s_lo);
                sumi = scaled_dot(sumi, *hi, q8k_qs(y, 128 * h + 64), *s_hi);
            }
            acc[t] = _mm512_fmadd_ps(_mm512_set1_ps(d * dy), _mm512_cvtepi32_ps(sumi), acc[t]);
        }
    }
    // `dot_blocks_k` adds its (here zero) min accumulator; so does this, so that -0.0
    // results match too.
    acc.map(|a| _mm512_reduce_add_ps(a) + hsum_ps(_mm256_setzero_ps()))
}

/// Q6_K `{ql[128], qh[64], scales[16] i8, d}`; layout and offset as in `avx2::dot_q6_k`.
/// Half h's 64 ql bytes hold groups 0, 1 in their low nibbles and 2, 3 in their high
/// nibbles; `two_bit_groups` lines the qh bits up with them.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
fn dot_q6_k(w: &[u8], a: &[u8]) -> f32 {
    dot_blocks_k::<210>(w, a, |x, y| {
        let sc = load128(at(x, 192));
        let scales = widen_scales::<false>(sc);
        let (low4, top2) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x30));
        let mut sumi = offset_correction::<5>(sc, y);
        for h in 0..2 {
            let ql = load512(at(x, 64 * h));
            let qh = two_bit_groups(at(x, 128 + 32 * h));
            let lo = _mm512_or_si512(_mm512_and_si512(ql, low4), _mm512_and_si512(_mm512_slli_epi16::<4>(qh), top2));
            let hi = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(ql), low4), _mm512_and_si512(qh, top2));
            sumi = scaled_dot(sumi, lo, q8k_qs(y, 128 * h), scales_for(scales, &PAIRS_IN_16[2 * h]));
            sumi = scaled_dot(sumi, hi, q8k_qs(y, 128 * h + 64), scales_for(scales, &PAIRS_IN_16[2 * h + 1]));
        }
        KSums { d: f16_at(x, 208), sumi, mins: None }
    })
}
