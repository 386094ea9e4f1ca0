//! Dot products of one weight row with one activation row.
//!
//! [`vec_dot_scalar`] is the reference: it computes each type the way ggml's generic
//! `ggml_vec_dot_*_q8_*_generic` functions (`ggml-cpu/quants.c`) do, integer sums per
//! block and then the float scales in the same order, so it matches llama.cpp closely.
//! [`vec_dot`] picks a SIMD kernel from `crate::simd` when one exists.

use crate::dequant::{
    e8m0_to_f32_half, k4_scale_min, q3k_scales, q5_values, q6k_values, read_bf16, read_f16, read_f32, read_u32,
    KVALUES_IQ4NL, KVALUES_MXFP4,
};
use crate::{ActRow, ActType, GgmlType, Isa, QK, QK_K};

/// The dot product with the kernel for `isa`, or the scalar one when `isa` is `Scalar` or
/// has no kernel for `ty`. Same contract as [`vec_dot_scalar`].
pub fn vec_dot(isa: Isa, ty: GgmlType, n: usize, w: &[u8], a: ActRow<'_>) -> f32 {
    if isa != Isa::Scalar {
        if let Some(v) = crate::simd::vec_dot(isa, ty, n, w, a) {
            return v;
        }
    }
    vec_dot_scalar(ty, n, w, a)
}

/// Dots `out.len()` consecutive weight rows (each `ty.row_bytes(n)` bytes of `w`) with
/// one activation row: [`vec_dot`] for every row, with the dispatch done once.
pub fn vec_dot_rows(isa: Isa, ty: GgmlType, n: usize, w: &[u8], a: ActRow<'_>, out: &mut [f32]) {
    if isa != Isa::Scalar && crate::simd::dot_rows(isa, ty, n, w, a, out) {
        return;
    }
    let row_bytes = ty.row_bytes(n).unwrap_or(0).max(1);
    for (o, row) in out.iter_mut().zip(w.chunks_exact(row_bytes)) {
        *o = vec_dot_scalar(ty, n, row, a);
    }
}

/// The dot product of a weight row of `n` elements stored as `ty` with an activation row:
/// `ActRow::F32` of `n` floats for F32/F16/BF16 weights, otherwise `ActRow::Quant` holding
/// `n` elements in `ty.act_type()`.
///
/// Panics on a size or format mismatch (a programming error: shapes are validated when a
/// model is loaded and activations are quantized to `ty.act_type()` by this crate).
pub fn vec_dot_scalar(ty: GgmlType, n: usize, w: &[u8], a: ActRow<'_>) -> f32 {
    assert_eq!(Some(w.len()), ty.row_bytes(n), "vec_dot: {ty} row of {n} elements has the wrong size");
    let act = ty.act_type();
    match (act, a) {
        (ActType::F32, ActRow::F32(x)) => {
            assert_eq!(x.len(), n, "vec_dot: activation row is not {n} floats");
            match ty {
                GgmlType::F16 => dot_floats(w, x, 2, |b| read_f16(b, 0)),
                GgmlType::BF16 => dot_floats(w, x, 2, |b| read_bf16(b, 0)),
                _ => dot_floats(w, x, 4, |b| read_f32(b, 0)),
            }
        }
        (ActType::Q8_0 | ActType::Q8_1 | ActType::Q8_K, ActRow::Quant(y)) => {
            assert_eq!(y.len(), act.row_bytes(n), "vec_dot: {act:?} activation row of {n} elements has the wrong size");
            let dot: fn(&[u8], &[u8]) -> f32 = match ty {
                GgmlType::Q4_0 => dot_q4_0,
                GgmlType::Q4_1 => dot_q4_1,
                GgmlType::Q5_0 => dot_q5_0,
                GgmlType::Q5_1 => dot_q5_1,
                GgmlType::Q8_0 => dot_q8_0,
                GgmlType::IQ4_NL => dot_iq4_nl,
                GgmlType::MXFP4 => dot_mxfp4,
                GgmlType::Q2_K => dot_q2_k,
                GgmlType::Q3_K => dot_q3_k,
                GgmlType::Q4_K => dot_q4_k,
                GgmlType::Q5_K => dot_q5_k,
                GgmlType::Q6_K => dot_q6_k,
                GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => {
                    unreachable!("float types use F32 activations")
                }
            };
            dot(w, y)
        }
        _ => panic!("vec_dot: {ty} weights take {act:?} activations"),
    }
}

/// Float weights (one per `size` bytes) with float activations: products in f32, summed
/// in f64 like ggml's scalar `ggml_vec_dot_f32` (`ggml_float` accumulator).
fn dot_floats(w: &[u8], x: &[f32], size: usize, conv: impl Fn(&[u8]) -> f32) -> f32 {
    let mut sum = 0f64;
    for (b, &v) in w.chunks_exact(size).zip(x) {
        sum += f64::from(conv(b) * v);
    }
    sum as f32
}

/// Byte `i` of a block as the signed quant it stores.
#[inline]
fn i8_at(b: &[u8], i: usize) -> i32 {
    i32::from(b[i] as i8)
}

/// Pairs of (weight block, activation block) of the given byte sizes.
#[inline]
fn blocks<'a>(w: &'a [u8], wsize: usize, y: &'a [u8], ysize: usize) -> impl Iterator<Item = (&'a [u8], &'a [u8])> {
    w.chunks_exact(wsize).zip(y.chunks_exact(ysize))
}

// ---- 32-element blocks with Q8_0 (`d: f16, qs: [i8; 32]`, 34 bytes) or
// ---- Q8_1 (`d: f16, s: f16, qs: [i8; 32]`, 36 bytes) activations.

/// Integer dot of 16 nibble bytes (low nibble = element j, high = j + 16) with 32 i8
/// activations, each nibble mapped through `val`.
#[inline]
fn nibble_dot(qs: &[u8], yq: &[u8], val: impl Fn(u8) -> i32) -> i32 {
    let (mut s0, mut s1) = (0i32, 0i32);
    for (j, &q) in qs.iter().enumerate() {
        s0 += val(q & 0xF) * i8_at(yq, j);
        s1 += val(q >> 4) * i8_at(yq, j + QK / 2);
    }
    s0 + s1
}

/// Integer dot of 32 5-bit values (offset by `bias`) with 32 i8 activations.
#[inline]
fn q5_dot(qh: u32, qs: &[u8], yq: &[u8], bias: i32) -> i32 {
    let v = q5_values(qh, qs);
    v.iter().enumerate().map(|(j, &q)| (i32::from(q) - bias) * i8_at(yq, j)).sum()
}

fn dot_q4_0(w: &[u8], y: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in blocks(w, 18, y, 34) {
        let sumi = nibble_dot(&x[2..18], &y[2..34], |q| i32::from(q) - 8);
        sumf += sumi as f32 * read_f16(x, 0) * read_f16(y, 0);
    }
    sumf
}

/// Q4_1 / Q5_1 use s = d_y * sum(q_y) to add the weight min m: sum(m * d_y * q_y) = m * s.
fn dot_q4_1(w: &[u8], y: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in blocks(w, 20, y, 36) {
        let sumi = nibble_dot(&x[4..20], &y[4..36], i32::from);
        sumf += (read_f16(x, 0) * read_f16(y, 0)) * sumi as f32 + read_f16(x, 2) * read_f16(y, 2);
    }
    sumf
}

fn dot_q5_0(w: &[u8], y: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in blocks(w, 22, y, 34) {
        let sumi = q5_dot(read_u32(x, 2), &x[6..22], &y[2..34], 16);
        sumf += (read_f16(x, 0) * read_f16(y, 0)) * sumi as f32;
    }
    sumf
}

fn dot_q5_1(w: &[u8], y: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in blocks(w, 24, y, 36) {
        let sumi = q5_dot(read_u32(x, 4), &x[8..24], &y[4..36], 0);
        sumf += (read_f16(x, 0) * read_f16(y, 0)) * sumi as f32 + read_f16(x, 2) * read_f16(y, 2);
    }
    sumf
}

fn dot_q8_0(w: &[u8], y: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in blocks(w, 34, y, 34) {
        let sumi: i32 = (2..34).map(|j| i8_at(x, j) * i8_at(y, j)).sum();
        sumf += sumi as f32 * (read_f16(x, 0) * read_f16(y, 0));
    }
    sumf
}

fn dot_iq4_nl(w: &[u8], y: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in blocks(w, 18, y, 34) {
        let d = read_f16(y, 0) * read_f16(x, 0);
        let sumi = nibble_dot(&x[2..18], &y[2..34], |q| i32::from(KVALUES_IQ4NL[q as usize]));
        sumf += d * sumi as f32;
    }
    sumf
}

fn dot_mxfp4(w: &[u8], y: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in blocks(w, 17, y, 34) {
        let d = read_f16(y, 0) * e8m0_to_f32_half(x[0]);
        let sumi = nibble_dot(&x[1..17], &y[2..34], |q| i32::from(KVALUES_MXFP4[q as usize]));
        sumf += d * sumi as f32;
    }
    sumf
}

// ---- 256-element K-quant blocks with Q8_K activations:
// ---- `d: f32, qs: [i8; 256], bsums: [i16; 16]` (292 bytes).

const Q8K_BYTES: usize = 292;

/// The `d` of a Q8_K block.
#[inline]
fn q8k_d(y: &[u8]) -> f32 {
    read_f32(y, 0)
}

/// The quants of a Q8_K block.
#[inline]
fn q8k_qs(y: &[u8]) -> &[u8] {
    &y[4..4 + QK_K]
}

/// `bsums[j]` of a Q8_K block: the sum of its quants 16j..16j+16.
#[inline]
fn q8k_bsum(y: &[u8], j: usize) -> i32 {
    let off = 4 + QK_K + 2 * j;
    i32::from(i16::from_le_bytes([y[off], y[off + 1]]))
}

/// ggml's generic K-quant inner loop: eight i32 lanes, lane l summing
/// `scale16[g] * w[i] * a[i]` over elements i = l (mod 8), where g = i / 16 is the
/// element's 16-wide sub-block. The lanes are then scaled in float one by one.
#[inline]
fn lane_sums(wq: &[i8; QK_K], aq: &[u8], scale16: &[i32; 16]) -> [i32; 8] {
    let mut aux32 = [0i32; 8];
    for (g, (wg, ag)) in wq.chunks_exact(16).zip(aq.chunks_exact(16)).enumerate() {
        for (i, (&wv, &av)) in wg.iter().zip(ag).enumerate() {
            aux32[i % 8] += scale16[g] * (i32::from(wv) * i32::from(av as i8));
        }
    }
    aux32
}

/// Q2_K, 84 bytes: `scales: [u8; 16] (sc | m << 4), qs: [u8; 64], d: f16, dmin: f16`.
/// x = d * sc * q - dmin * m; the min part is dmin * sum_j m_j * bsums_j.
fn dot_q2_k(w: &[u8], y: &[u8]) -> f32 {
    let mut sumf = 0f32;
    for (x, y) in blocks(w, 84, y, Q8K_BYTES) {
        let sc = &x[0..16];
        let summs: i32 = (0..16).map(|j| q8k_bsum(y, j) * i32::from(sc[j] >> 4)).sum();
        let dall = q8k_d(y) * read_f16(x, 80);
        let dmin = q8k_d(y) * read_f16(x, 82);
        let wq = q2k_values(&x[16..80]);
        let scale16: [i32; 16] = std::array::from_fn(|j| i32::from(sc[j] & 0xF));
        let isum: i32 = lane_sums(&wq, q8k_qs(y), &scale16).iter().sum();
        sumf += dall * isum as f32 - dmin * summs as f32;
    }
    sumf
}

/// The 2-bit values of a Q2_K block in element order: element 128k + r comes from byte
/// 32k + r % 32 at bit 2 * (r / 32).
fn q2k_values(qs: &[u8]) -> [i8; QK_K] {
    let mut v = [0i8; QK_K];
    for (e, o) in v.iter_mut().enumerate() {
        let r = e % 128;
        *o = ((qs[32 * (e / 128) + r % 32] >> (2 * (r / 32))) & 3) as i8;
    }
    v
}

/// The 3-bit values of a Q3_K block (-4..=3) in element order: the low 2 bits as Q2_K,
/// minus 4 when bit e / 32 of hmask[e % 32] is clear.
fn q3k_values(hmask: &[u8], qs: &[u8]) -> [i8; QK_K] {
    let mut v = q2k_values(qs);
    for (e, o) in v.iter_mut().enumerate() {
        if hmask[e % 32] & (1 << (e / 32)) == 0 {
            *o -= 4;
        }
    }
    v
}

/// Q3_K, 110 bytes: `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16`.
fn dot_q3_k(w: &[u8], y: &[u8]) -> f32 {
    let mut sums = [0f32; 8];
    for (x, y) in blocks(w, 110, y, Q8K_BYTES) {
        let wq = q3k_values(&x[0..32], &x[32..96]);
        let scale16 = q3k_scales(&x[96..108]).map(i32::from);
        let aux32 = lane_sums(&wq, q8k_qs(y), &scale16);
        let d = read_f16(x, 108) * q8k_d(y);
        add_lanes(&mut sums, d, &aux32);
    }
    sums.iter().fold(0f32, |s, &v| s + v)
}

/// `sums[l] += d * aux32[l]`, ggml's per-block float step.
#[inline]
fn add_lanes(sums: &mut [f32; 8], d: f32, aux32: &[i32; 8]) {
    for (s, &a) in sums.iter_mut().zip(aux32) {
        *s += d * a as f32;
    }
}

/// Q4_K / Q5_K: 8 sub-blocks of 32 with 6-bit scale and min. The scales give each
/// 16-element group scale sc[g / 2]; the min part is dmin * sum_j m[j / 2] * bsums_j,
/// subtracted as each block goes, and the lanes are added at the end, as in ggml.
fn dot_k4_like(w: &[u8], wsize: usize, y: &[u8], values: impl Fn(&[u8]) -> [i8; QK_K]) -> f32 {
    let mut sumf = 0f32;
    let mut sums = [0f32; 8];
    for (x, y) in blocks(w, wsize, y, Q8K_BYTES) {
        let scales = &x[4..16];
        let sm: [(u8, u8); 8] = std::array::from_fn(|j| k4_scale_min(j, scales));
        let sumi: i32 = (0..16).map(|j| q8k_bsum(y, j) * i32::from(sm[j / 2].1)).sum();
        let scale16: [i32; 16] = std::array::from_fn(|g| i32::from(sm[g / 2].0));
        let aux32 = lane_sums(&values(x), q8k_qs(y), &scale16);
        add_lanes(&mut sums, read_f16(x, 0) * q8k_d(y), &aux32);
        let dmin = read_f16(x, 2) * q8k_d(y);
        sumf -= dmin * sumi as f32;
    }
    sums.iter().fold(sumf, |s, &v| s + v)
}

/// Q4_K, 144 bytes: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`; each 64
/// elements take 32 qs bytes, low nibbles first.
fn dot_q4_k(w: &[u8], y: &[u8]) -> f32 {
    dot_k4_like(w, 144, y, |x| nibble_values(&x[16..144], None))
}

/// Q5_K, 176 bytes: `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`.
fn dot_q5_k(w: &[u8], y: &[u8]) -> f32 {
    dot_k4_like(w, 176, y, |x| nibble_values(&x[48..176], Some(&x[16..48])))
}

/// The 4-bit (or, with `qh`, 5-bit) values of a Q4_K / Q5_K block in element order:
/// chunk i of 64 elements = low nibbles of qs[32i..32i+32], then their high nibbles; the
/// 5th bit of element 32c + l (c = 0..8) is bit c of qh[l].
fn nibble_values(qs: &[u8], qh: Option<&[u8]>) -> [i8; QK_K] {
    let mut v = [0i8; QK_K];
    for (e, o) in v.iter_mut().enumerate() {
        let (c, l) = (e / 32, e % 32);
        let byte = qs[32 * (c / 2) + l];
        let mut q = if c % 2 == 0 { byte & 0xF } else { byte >> 4 };
        if let Some(qh) = qh {
            q |= ((qh[l] >> c) & 1) << 4;
        }
        *o = q as i8;
    }
    v
}

/// Q6_K, 210 bytes: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`.
fn dot_q6_k(w: &[u8], y: &[u8]) -> f32 {
    let mut sums = [0f32; 8];
    for (x, y) in blocks(w, 210, y, Q8K_BYTES) {
        let wq = q6k_values(&x[0..128], &x[128..192]);
        let scale16: [i32; 16] = std::array::from_fn(|g| i8_at(x, 192 + g));
        let aux32 = lane_sums(&wq, q8k_qs(y), &scale16);
        add_lanes(&mut sums, read_f16(x, 208) * q8k_d(y), &aux32);
    }
    sums.iter().fold(0f32, |s, &v| s + v)
}
