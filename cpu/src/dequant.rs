//! Scalar dequantization of one row, for every supported weight type.
//!
//! This is the reference the dot products and the SIMD kernels are checked against, and
//! the path for embedding lookups. It follows `dequantize_row_*` in llama.cpp's
//! `ggml/src/ggml-quants.c` operation for operation, so results are bit-identical.
//!
//! Byte layouts are llama.cpp's block structs (`ggml-common.h`), little-endian. The
//! small block-field helpers are public so the dot products (scalar and SIMD) decode
//! scales exactly the same way.

use crate::{GgmlType, QK, QK_K};

/// IQ4_NL's non-linear 4-bit codebook (`kvalues_iq4nl`).
pub const KVALUES_IQ4NL: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// MXFP4's E2M1 values, doubled so they are integers (`kvalues_mxfp4`); the scale
/// [`e8m0_to_f32_half`] absorbs the factor 1/2.
pub const KVALUES_MXFP4: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// The little-endian f16 at `b[off..off + 2]`, as f32.
#[inline]
pub fn read_f16(b: &[u8], off: usize) -> f32 {
    half::f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

/// The little-endian bf16 at `b[off..off + 2]`, as f32: the top half of an f32. A plain
/// shift like ggml's `GGML_BF16_TO_FP32` (`half`'s conversion would quiet NaNs).
#[inline]
pub fn read_bf16(b: &[u8], off: usize) -> f32 {
    f32::from_bits(u32::from(u16::from_le_bytes([b[off], b[off + 1]])) << 16)
}

/// The little-endian f32 at `b[off..off + 4]`.
#[inline]
pub fn read_f32(b: &[u8], off: usize) -> f32 {
    f32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// The little-endian u32 at `b[off..off + 4]`.
#[inline]
pub fn read_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// An E8M0 scale times 1/2, i.e. 2^(e-128), built from its bits as ggml's
/// `GGML_E8M0_TO_FP32_HALF` does: e = 0 and 1 give the subnormals 2^-128 and 2^-127.
#[inline]
pub fn e8m0_to_f32_half(e: u8) -> f32 {
    let bits = if e < 2 { 0x0020_0000u32 << e } else { u32::from(e - 1) << 23 };
    f32::from_bits(bits)
}

/// Scale and min of sub-block `j` (0..8) of a Q4_K / Q5_K block from its 12 packed
/// `scales` bytes (ggml's `get_scale_min_k4`). Layout, 6 bits each:
/// bytes 0..4 = sc[0..4] | (sc[4..8] >> 4) << 6, bytes 4..8 = m[0..4] | (m[4..8] >> 4) << 6,
/// bytes 8..12 = (sc[4..8] & 15) | (m[4..8] & 15) << 4.
#[inline]
pub fn k4_scale_min(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        let sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        let m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
        (sc, m)
    }
}

/// The 16 signed sub-block scales of a Q3_K block (already minus the bias 32) from its
/// 12 packed `scales` bytes. Scale j has its low 4 bits in byte j (j < 8, low nibble) or
/// byte j-8 (high nibble), and its top 2 bits in byte 8 + j%4 at bit 2*(j/4). This is
/// the `kmask1`/`kmask2` shuffle of ggml's `dequantize_row_q3_K`, one scale at a time.
#[inline]
pub fn q3k_scales(q: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (j, o) in out.iter_mut().enumerate() {
        let lo = if j < 8 { q[j] & 0xF } else { q[j - 8] >> 4 };
        let hi = (q[8 + j % 4] >> (2 * (j / 4))) & 3;
        *o = ((lo | (hi << 4)) as i8) - 32;
    }
    out
}

/// Dequantize one row of `dst.len()` elements stored as `ty` in `src`.
///
/// Panics when `src` is not exactly one row of `dst.len()` elements: callers validate
/// shapes when they load a model, so a mismatch here is a programming error.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    assert_eq!(
        Some(src.len()),
        ty.row_bytes(dst.len()),
        "dequantize_row: {ty} row of {} elements needs a whole number of blocks and matching bytes",
        dst.len()
    );
    let per_block: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => return dequant_floats(src, dst, 4, |b| read_f32(b, 0)),
        GgmlType::F16 => return dequant_floats(src, dst, 2, |b| read_f16(b, 0)),
        GgmlType::BF16 => return dequant_floats(src, dst, 2, |b| read_bf16(b, 0)),
        GgmlType::Q4_0 => block_q4_0,
        GgmlType::Q4_1 => block_q4_1,
        GgmlType::Q5_0 => block_q5_0,
        GgmlType::Q5_1 => block_q5_1,
        GgmlType::Q8_0 => block_q8_0,
        GgmlType::Q2_K => block_q2_k,
        GgmlType::Q3_K => block_q3_k,
        GgmlType::Q4_K => block_q4_k,
        GgmlType::Q5_K => block_q5_k,
        GgmlType::Q6_K => block_q6_k,
        GgmlType::IQ4_NL => block_iq4_nl,
        GgmlType::MXFP4 => block_mxfp4,
    };
    for (b, y) in src.chunks_exact(ty.type_size()).zip(dst.chunks_exact_mut(ty.block_size())) {
        per_block(b, y);
    }
}

/// F32 / F16 / BF16: one element per `size` bytes.
#[inline]
fn dequant_floats(src: &[u8], dst: &mut [f32], size: usize, conv: impl Fn(&[u8]) -> f32) {
    for (b, y) in src.chunks_exact(size).zip(dst.iter_mut()) {
        *y = conv(b);
    }
}

/// Q4_0, 18 bytes: `d: f16, qs: [u8; 16]`. Element j is the low nibble of qs[j], element
/// j+16 the high nibble; x = (q - 8) * d.
fn block_q4_0(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b, 0);
    let qs = &b[2..2 + QK / 2];
    for (j, &q) in qs.iter().enumerate() {
        y[j] = ((q & 0xF) as i32 - 8) as f32 * d;
        y[j + QK / 2] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// Q4_1, 20 bytes: `d: f16, m: f16, qs: [u8; 16]`; x = q * d + m.
fn block_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (read_f16(b, 0), read_f16(b, 2));
    let qs = &b[4..4 + QK / 2];
    for (j, &q) in qs.iter().enumerate() {
        y[j] = (q & 0xF) as f32 * d + m;
        y[j + QK / 2] = (q >> 4) as f32 * d + m;
    }
}

/// The 5-bit values of a Q5_0 / Q5_1 block: nibbles as Q4_0, plus bit j of the u32
/// `qh` as bit 4 of element j.
#[inline]
pub fn q5_values(qh: u32, qs: &[u8]) -> [u8; QK] {
    let mut v = [0u8; QK];
    for (j, &q) in qs.iter().enumerate() {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        v[j] = (q & 0xF) | h0;
        v[j + QK / 2] = (q >> 4) | h1;
    }
    v
}

/// Q5_0, 22 bytes: `d: f16, qh: u32, qs: [u8; 16]`; x = (q - 16) * d.
fn block_q5_0(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b, 0);
    let v = q5_values(read_u32(b, 2), &b[6..6 + QK / 2]);
    for (yj, &q) in y.iter_mut().zip(&v) {
        *yj = (q as i32 - 16) as f32 * d;
    }
}

/// Q5_1, 24 bytes: `d: f16, m: f16, qh: u32, qs: [u8; 16]`; x = q * d + m.
fn block_q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (read_f16(b, 0), read_f16(b, 2));
    let v = q5_values(read_u32(b, 4), &b[8..8 + QK / 2]);
    for (yj, &q) in y.iter_mut().zip(&v) {
        *yj = q as f32 * d + m;
    }
}

/// Q8_0, 34 bytes: `d: f16, qs: [i8; 32]`; x = q * d.
fn block_q8_0(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b, 0);
    for (yj, &q) in y.iter_mut().zip(&b[2..2 + QK]) {
        *yj = (q as i8) as f32 * d;
    }
}

/// IQ4_NL, 18 bytes: `d: f16, qs: [u8; 16]`, nibbles as Q4_0; x = d * KVALUES_IQ4NL[q].
fn block_iq4_nl(b: &[u8], y: &mut [f32]) {
    let d = read_f16(b, 0);
    for (j, &q) in b[2..2 + QK / 2].iter().enumerate() {
        y[j] = d * KVALUES_IQ4NL[(q & 0xF) as usize] as f32;
        y[j + QK / 2] = d * KVALUES_IQ4NL[(q >> 4) as usize] as f32;
    }
}

/// MXFP4, 17 bytes: `e: u8 (E8M0), qs: [u8; 16]`, nibbles as Q4_0;
/// x = KVALUES_MXFP4[q] * 2^(e-128).
fn block_mxfp4(b: &[u8], y: &mut [f32]) {
    let d = e8m0_to_f32_half(b[0]);
    for (j, &q) in b[1..1 + QK / 2].iter().enumerate() {
        y[j] = KVALUES_MXFP4[(q & 0xF) as usize] as f32 * d;
        y[j + QK / 2] = KVALUES_MXFP4[(q >> 4) as usize] as f32 * d;
    }
}

/// Q2_K, 84 bytes: `scales: [u8; 16], qs: [u8; 64], d: f16, dmin: f16`.
/// 16 sub-blocks of 16; scale byte = sc | m << 4. Each 128-element half uses 32 qs
/// bytes: 2-bit field `shift` = 2k of qs[l] holds element 32k + l of that half.
/// x = d * sc * q - dmin * m.
fn block_q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (read_f16(b, 80), read_f16(b, 82));
    let mut is = 0; // sub-block index, 0..16
    for q in qs.chunks_exact(32) {
        for shift in [0, 2, 4, 6] {
            for half in [&q[..16], &q[16..]] {
                let sc = scales[is];
                let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
                for (yl, &ql) in y[16 * is..16 * is + 16].iter_mut().zip(half) {
                    *yl = dl * ((ql >> shift) & 3) as f32 - ml;
                }
                is += 1;
            }
        }
    }
}

/// Q3_K, 110 bytes: `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16`.
/// 16 sub-blocks of 16 with 6-bit scales (see [`q3k_scales`]). The low 2 bits come as
/// in Q2_K; bit `m` of hmask[l] (m counting 0..8 over the 8 groups of 32) is the high
/// bit, and a clear high bit means subtract 4. x = d * (sc - 32) * q.
fn block_q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs) = (&b[0..32], &b[32..96]);
    let scales = q3k_scales(&b[96..108]);
    let d = read_f16(b, 108);
    let mut is = 0; // sub-block index, 0..16
    let mut m = 1u8; // hmask bit of the current group of 32
    for q in qs.chunks_exact(32) {
        for shift in [0, 2, 4, 6] {
            for (half, hm) in [(&q[..16], &hmask[..16]), (&q[16..], &hmask[16..])] {
                let dl = d * scales[is] as f32;
                let group = y[16 * is..16 * is + 16].iter_mut();
                for ((yl, &ql), &h) in group.zip(half).zip(hm) {
                    let v = ((ql >> shift) & 3) as i32 - if h & m != 0 { 0 } else { 4 };
                    *yl = dl * v as f32;
                }
                is += 1;
            }
            m <<= 1;
        }
    }
}

/// Q4_K, 144 bytes: `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`.
/// 8 sub-blocks of 32 with 6-bit scale and min (see [`k4_scale_min`]); each 64 elements
/// use 32 qs bytes: low nibbles are sub-block 2i, high nibbles 2i+1.
/// x = d * sc * q - dmin * m.
fn block_q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (read_f16(b, 0), read_f16(b, 2));
    let scales = &b[4..16];
    for (i, (q, out)) in b[16..144].chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = k4_scale_min(2 * i, scales);
        let (sc2, m2) = k4_scale_min(2 * i + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        for (l, &ql) in q.iter().enumerate() {
            out[l] = d1 * (ql & 0xF) as f32 - m1;
            out[l + 32] = d2 * (ql >> 4) as f32 - m2;
        }
    }
}

/// Q5_K, 176 bytes: `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`.
/// As Q4_K, plus a 5th bit: for the 64-element chunk i, bit 2i of qh[l] goes with the low
/// nibble of qs[32i + l] and bit 2i+1 with the high nibble.
fn block_q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (read_f16(b, 0), read_f16(b, 2));
    let (scales, qh) = (&b[4..16], &b[16..48]);
    for (i, (q, out)) in b[48..176].chunks_exact(32).zip(y.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = k4_scale_min(2 * i, scales);
        let (sc2, m2) = k4_scale_min(2 * i + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        let (u1, u2) = (1u8 << (2 * i), 2u8 << (2 * i));
        for (l, (&ql, &h)) in q.iter().zip(qh).enumerate() {
            let lo = (ql & 0xF) + if h & u1 != 0 { 16 } else { 0 };
            let hi = (ql >> 4) + if h & u2 != 0 { 16 } else { 0 };
            out[l] = d1 * lo as f32 - m1;
            out[l + 32] = d2 * hi as f32 - m2;
        }
    }
}

/// The 256 signed 6-bit values (q - 32) of a Q6_K block, in element order. Per 128-element
/// half (64 ql bytes, 32 qh bytes), for l < 32: element l = low nibble of ql[l] with
/// qh[l] bits 0-1 on top, l+32 = low nibble of ql[l+32] with bits 2-3, l+64 = high nibble
/// of ql[l] with bits 4-5, l+96 = high nibble of ql[l+32] with bits 6-7.
#[inline]
pub fn q6k_values(ql: &[u8], qh: &[u8]) -> [i8; QK_K] {
    let mut v = [0i8; QK_K];
    for ((out, ql), qh) in v.chunks_exact_mut(128).zip(ql.chunks_exact(64)).zip(qh.chunks_exact(32)) {
        for (l, &h) in qh.iter().enumerate() {
            out[l] = ((ql[l] & 0xF) | ((h & 3) << 4)) as i8 - 32;
            out[l + 32] = ((ql[l + 32] & 0xF) | (((h >> 2) & 3) << 4)) as i8 - 32;
            out[l + 64] = ((ql[l] >> 4) | (((h >> 4) & 3) << 4)) as i8 - 32;
            out[l + 96] = ((ql[l + 32] >> 4) | (((h >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    v
}

/// Q6_K, 210 bytes: `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`.
/// 16 sub-blocks of 16 (values from [`q6k_values`]); x = d * sc * q, computed as
/// (d * sc) * q like ggml.
fn block_q6_k(b: &[u8], y: &mut [f32]) {
    let v = q6k_values(&b[0..128], &b[128..192]);
    let d = read_f16(b, 208);
    for ((out, q), &sc) in y.chunks_exact_mut(16).zip(v.chunks_exact(16)).zip(&b[192..208]) {
        let ds = d * (sc as i8) as f32;
        for (yl, &ql) in out.iter_mut().zip(q) {
            *yl = ds * ql as f32;
        }
    }
}
