//! Weights of the 32-element block types with Q8_0 activations (Q8_0, Q5_0, Q4_0),
//! repacked at load time so that 16 rows are read together.
//!
//! In the row layout every dot product ends in a horizontal sum, and every block's
//! integer sum is spread over 8 lanes, so each block pays a float conversion and a
//! multiply-add on 8 lanes. Interleaved, lane i of a 512-bit vector belongs to row i of a
//! group of 16: instruction j (of 8 per block) takes bytes 4j..4j+4 of each of the 16
//! rows' block and the same 4 activation bytes broadcast to every lane. Eight VNNI
//! `dpbusd` leave the 16 rows' exact block sums in one vector, which is converted, scaled
//! and accumulated once for 16 rows, and the accumulator at the end holds the 16 outputs:
//! no horizontal sums. The weight quants are stored unsigned (`dpbusd` multiplies
//! unsigned by signed bytes): the type's quant plus `offset`, corrected by starting each
//! block's sum at `-offset · Σ activation quants`.
//!
//! The K-quants (Q4_K, Q6_K; Q8_K activations) work the same way per sub-block (32 or
//! 16 elements): the sub-block's exact sums for 16 rows are multiplied by the 16 rows'
//! integer sub-block scales and summed in integers over the block, then scaled once.
//!
//! Per group and block (`group_block_bytes`; 16 times the type's block size, Q4_K 64
//! bytes more):
//! * Q8_0: 8 × 64 quant bytes (quant + 128), then 16 f16 scales;
//! * Q4_0: 4 × 64 bytes, lane i = row i's `qs[4j..4j + 4]` (low nibbles are elements
//!   4j.., high nibbles 16 + 4j..), then the scales;
//! * Q5_0: as Q4_0, then 8 × u64 masks of the fifth bits (bit 4i + k of mask j: element
//!   4j + k of row i), then the scales;
//! * Q4_K: 32 × 64 bytes (vector 8c + j, lane i = row i's `qs[32c + 4j..+4]`: low nibbles
//!   are sub-block 2c, high nibbles 2c + 1), 8 × 16 sub-block scales (sub-block-major),
//!   4 × 32 bytes of mins (pair p: row i's mins 2p and 2p + 1), 16 f16 d, 16 f16 dmin;
//! * Q6_K: 32 × 64 bytes of low nibbles (vector j: instructions j and j + 32), 16 × 64
//!   bytes of top bits (vector k: instructions k + 16m at bits 2m), 16 × 16 signed
//!   sub-block scales, 16 f16 d. Instruction j covers elements 4j..4j + 4.
//!
//! Every output is a sum over blocks, in block order, of fused multiply-adds of the
//! block's exact integer sum with `d_w · d_a`, whatever the number of tokens, so one
//! token and many give bit-identical results; [`reference`] computes the same in scalar
//! code.

use rayon::prelude::*;

use crate::act::QuantizedActs;
use crate::dequant::{k4_scale_min, q6k_values};
use crate::matmul::WeightView;
use crate::{ActType, GgmlType, Isa, QK_K};

/// Rows per interleaved group (one 512-bit vector of i32 lanes).
pub const GROUP_ROWS: usize = 16;

/// A weight matrix's first `groups · 16` rows, interleaved; the rows after them stay in
/// the original layout and go through the row kernels.
pub struct Interleaved {
    pub ty: GgmlType,
    pub cols: usize,
    pub groups: usize,
    data: Vec<u8>,
}

impl Interleaved {
    /// Bytes of memory the repacked copy holds.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }
}

/// The integer offset added to each stored quant to make it unsigned.
pub(crate) fn offset(ty: GgmlType) -> i32 {
    match ty {
        GgmlType::Q8_0 => 128,
        GgmlType::Q5_0 => 16,
        _ => 8,
    }
}

/// Bytes of one group's block.
pub fn group_block_bytes(ty: GgmlType) -> usize {
    match ty {
        GgmlType::Q4_K => 2048 + 128 + 128 + 64,
        _ => GROUP_ROWS * ty.type_size(),
    }
}

impl Interleaved {
    /// Whether `ty` has an interleaved form and this CPU has its kernels.
    pub fn supports(ty: GgmlType) -> bool {
        matches!(ty, GgmlType::Q8_0 | GgmlType::Q5_0 | GgmlType::Q4_0 | GgmlType::Q4_K | GgmlType::Q6_K)
            && Isa::best() == Isa::Avx512
            && crate::simd::isa_usable(Isa::Avx512)
    }

    /// The interleaved copy of `w`'s whole groups of 16 rows, or None where
    /// [`Interleaved::supports`] says no or `w` has fewer than 16 rows.
    pub fn new(w: &WeightView<'_>) -> Option<Interleaved> {
        let groups = w.rows / GROUP_ROWS;
        if !Self::supports(w.ty) || groups == 0 {
            return None;
        }
        let blocks = w.cols / w.ty.block_size();
        let gbb = group_block_bytes(w.ty);
        let mut data = vec![0u8; groups.checked_mul(blocks)?.checked_mul(gbb)?];
        let (rb, bb) = (w.row_bytes(), w.ty.type_size());
        data.par_chunks_exact_mut(blocks * gbb).enumerate().for_each(|(g, group)| {
            for (b, dst) in group.chunks_exact_mut(gbb).enumerate() {
                let rows: [&[u8]; GROUP_ROWS] = std::array::from_fn(|i| {
                    let at = (g * GROUP_ROWS + i) * rb + b * bb;
                    &w.data[at..at + bb]
                });
                repack_block(w.ty, rows, dst);
            }
        });
        Some(Interleaved { ty: w.ty, cols: w.cols, groups, data })
    }

    /// Rows held here.
    pub fn rows(&self) -> usize {
        self.groups * GROUP_ROWS
    }

    /// Blocks per row.
    pub fn blocks(&self) -> usize {
        self.cols / self.ty.block_size()
    }

    /// Group g's blocks, back to back.
    pub(crate) fn group(&self, g: usize) -> &[u8] {
        let len = self.blocks() * group_block_bytes(self.ty);
        &self.data[g * len..(g + 1) * len]
    }

    /// Groups g..end, contiguous: what a kernel streams through, for prefetching ahead.
    pub(crate) fn groups_from(&self, g: usize, end: usize) -> &[u8] {
        let len = self.blocks() * group_block_bytes(self.ty);
        &self.data[g * len..end * len]
    }
}

/// 16 rows' blocks (each `ty.type_size()` bytes) into one group block.
fn repack_block(ty: GgmlType, rows: [&[u8]; GROUP_ROWS], dst: &mut [u8]) {
    match ty {
        GgmlType::Q4_K => repack_q4_k(rows, dst),
        GgmlType::Q6_K => repack_q6_k(rows, dst),
        _ => repack_32(ty, rows, dst),
    }
}

/// `bytes[i]` (4 bytes for each of the 16 rows) into the 64 bytes of one vector.
fn put_lanes(dst: &mut [u8], bytes: impl Fn(usize, usize) -> u8) {
    for i in 0..GROUP_ROWS {
        for k in 0..4 {
            dst[4 * i + k] = bytes(i, k);
        }
    }
}

/// Q4_K `{d, dmin, scales[12], qs[128]}`.
fn repack_q4_k(rows: [&[u8]; GROUP_ROWS], dst: &mut [u8]) {
    for v in 0..32 {
        put_lanes(&mut dst[64 * v..64 * v + 64], |i, k| rows[i][16 + 4 * v + k]);
    }
    for (i, row) in rows.iter().enumerate() {
        for s in 0..8 {
            let (sc, m) = k4_scale_min(s, &row[4..16]);
            dst[2048 + 16 * s + i] = sc;
            dst[2048 + 128 + 32 * (s / 2) + 2 * i + s % 2] = m;
        }
        dst[2304 + 2 * i..2304 + 2 * i + 2].copy_from_slice(&row[0..2]);
        dst[2336 + 2 * i..2336 + 2 * i + 2].copy_from_slice(&row[2..4]);
    }
}

/// Q6_K `{ql[128], qh[64], scales[16], d}`: quants decoded (0..64), then split into
/// nibbles and top bits.
fn repack_q6_k(rows: [&[u8]; GROUP_ROWS], dst: &mut [u8]) {
    let u: [[u8; QK_K]; GROUP_ROWS] =
        std::array::from_fn(|i| q6k_values(&rows[i][0..128], &rows[i][128..192]).map(|q| (q + 32) as u8));
    for j in 0..32 {
        put_lanes(&mut dst[64 * j..64 * j + 64], |i, k| (u[i][4 * j + k] & 0xf) | (u[i][4 * (j + 32) + k] & 0xf) << 4);
    }
    for v in 0..16 {
        put_lanes(&mut dst[2048 + 64 * v..2048 + 64 * v + 64], |i, k| {
            (0..4).map(|m| (u[i][4 * (v + 16 * m) + k] >> 4) << (2 * m)).fold(0, |a, b| a | b)
        });
    }
    for (i, row) in rows.iter().enumerate() {
        for s in 0..16 {
            dst[3072 + 16 * s + i] = row[192 + s];
        }
        dst[3328 + 2 * i..3328 + 2 * i + 2].copy_from_slice(&row[208..210]);
    }
}

/// Q8_0, Q5_0, Q4_0.
fn repack_32(ty: GgmlType, rows: [&[u8]; GROUP_ROWS], dst: &mut [u8]) {
    let quant_bytes = match ty {
        GgmlType::Q8_0 => 512,
        _ => 256,
    };
    // Scales last, in row order.
    let scales = &mut dst[group_block_bytes(ty) - 2 * GROUP_ROWS..];
    for (i, row) in rows.iter().enumerate() {
        scales[2 * i..2 * i + 2].copy_from_slice(&row[..2]);
    }
    let quants = match ty {
        GgmlType::Q8_0 => &rows.map(|r| &r[2..34]),
        GgmlType::Q5_0 => &rows.map(|r| &r[6..22]),
        _ => &rows.map(|r| &r[2..18]),
    };
    let vectors = quant_bytes / 64;
    for j in 0..vectors {
        for (i, q) in quants.iter().enumerate() {
            for k in 0..4 {
                let byte = q[4 * j + k];
                dst[64 * j + 4 * i + k] = if ty == GgmlType::Q8_0 { byte ^ 0x80 } else { byte };
            }
        }
    }
    if ty == GgmlType::Q5_0 {
        for j in 0..8 {
            let mut mask = 0u64;
            for (i, row) in rows.iter().enumerate() {
                let qh = u32::from_le_bytes([row[2], row[3], row[4], row[5]]);
                mask |= u64::from((qh >> (4 * j)) & 0xf) << (4 * i);
            }
            dst[256 + 8 * j..256 + 8 * j + 8].copy_from_slice(&mask.to_le_bytes());
        }
    }
}

/// What the kernels need of each token's activation blocks besides the quants: the
/// block scale as f32 and, per block, the integers that start or finish its sums:
/// * Q8_0, Q5_0, Q4_0 (Q8_0 activations): `-offset · Σ q`, one per block;
/// * Q4_K: the sums of the 8 sub-blocks of 32 quants, two i16 per i32 (pair p: sub-blocks
///   2p, 2p + 1), for the mins;
/// * Q6_K: `-32 · Σ q` of the 16 sub-blocks of 16 (Q8_K's `bsums`), for the offset.
pub struct ActSums {
    pub blocks: usize,
    /// Integers per block.
    pub per_block: usize,
    pub d: Vec<f32>,
    pub ints: Vec<i32>,
}

impl ActSums {
    pub fn new(ty: GgmlType, acts: &QuantizedActs) -> ActSums {
        assert_eq!(acts.ty, ty.act_type(), "interleaved {ty} weights take {:?} activations", ty.act_type());
        let blocks = acts.cols / ty.block_size();
        let per_block = match ty {
            GgmlType::Q4_K => 4,
            GgmlType::Q6_K => 16,
            _ => 1,
        };
        let mut d = Vec::with_capacity(acts.rows * blocks);
        let mut ints = Vec::with_capacity(acts.rows * blocks * per_block);
        for t in 0..acts.rows {
            for b in acts.quant_row(t).chunks_exact(acts.ty.type_size()) {
                if acts.ty == ActType::Q8_K {
                    d.push(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                    // The 16 sums of 16 quants (a fixed array: this runs per block per token).
                    let mut bsums = [0i32; 16];
                    for (s, v) in bsums.iter_mut().zip(b[260..292].chunks_exact(2)) {
                        *s = i32::from(i16::from_le_bytes([v[0], v[1]]));
                    }
                    if ty == GgmlType::Q4_K {
                        for p in 0..4 {
                            let lo = (bsums[4 * p] + bsums[4 * p + 1]) as u16;
                            let hi = (bsums[4 * p + 2] + bsums[4 * p + 3]) as u16;
                            ints.push((u32::from(lo) | u32::from(hi) << 16) as i32);
                        }
                    } else {
                        ints.extend(bsums.iter().map(|s| -32 * s));
                    }
                } else {
                    d.push(half::f16::from_le_bytes([b[0], b[1]]).to_f32());
                    ints.push(-offset(ty) * b[2..34].iter().map(|&q| i32::from(q as i8)).sum::<i32>());
                }
            }
        }
        ActSums { blocks, per_block, d, ints }
    }

    /// Token t's block scales and integers.
    pub fn row(&self, t: usize) -> (&[f32], &[i32]) {
        let n = self.blocks * self.per_block;
        (&self.d[t * self.blocks..(t + 1) * self.blocks], &self.ints[t * n..(t + 1) * n])
    }
}

/// The signed quant of element k of a block of `ty` (the bytes of one original block).
fn quant(ty: GgmlType, block: &[u8], k: usize) -> i32 {
    let nibble = |qs: &[u8]| i32::from(if k < 16 { qs[k] & 0xf } else { qs[k - 16] >> 4 });
    match ty {
        GgmlType::Q8_0 => i32::from(block[2 + k] as i8),
        GgmlType::Q5_0 => {
            let qh = u32::from_le_bytes([block[2], block[3], block[4], block[5]]);
            (nibble(&block[6..22]) | (((qh >> k) & 1) << 4) as i32) - 16
        }
        _ => nibble(&block[2..18]) - 8,
    }
}

/// The interleaved kernels' arithmetic in scalar code, on the original row layout:
/// `out[t * w.rows + r]` for every row of `w` (the test oracle).
pub fn reference(w: &WeightView<'_>, acts: &QuantizedActs, out: &mut [f32]) {
    let sums = ActSums::new(w.ty, acts);
    let (bb, ab) = (w.ty.type_size(), acts.ty.type_size());
    for t in 0..acts.rows {
        let (a, (ds, _)) = (acts.quant_row(t), sums.row(t));
        for r in 0..w.rows {
            let mut acc = 0.0f32;
            for b in 0..sums.blocks {
                let (x, y) = (&w.row(r)[b * bb..(b + 1) * bb], &a[b * ab..(b + 1) * ab]);
                acc = match w.ty {
                    GgmlType::Q4_K => reference_q4_k(x, y, acc),
                    GgmlType::Q6_K => reference_q6_k(x, y, acc),
                    _ => {
                        let isum = (0..32).map(|k| quant(w.ty, x, k) * i32::from(y[2 + k] as i8)).sum::<i32>();
                        let dw = half::f16::from_le_bytes([x[0], x[1]]).to_f32();
                        (isum as f32).mul_add(dw * ds[b], acc)
                    }
                };
            }
            out[t * w.rows + r] = acc;
        }
    }
}

/// Q8_K block `y`: its scale and signed quants.
fn q8k(y: &[u8]) -> (f32, impl Fn(usize) -> i32 + '_) {
    (f32::from_le_bytes([y[0], y[1], y[2], y[3]]), move |k: usize| i32::from(y[4 + k] as i8))
}

/// One Q4_K block: Σ_s sc_s · Σ q·y, then the mins Σ_s m_s · Σ y, each scaled once.
fn reference_q4_k(x: &[u8], y: &[u8], acc: f32) -> f32 {
    let (dy, yq) = q8k(y);
    let q = |k: usize| {
        let (c, l) = (k / 64, k % 64);
        let byte = x[16 + 32 * c + l % 32];
        i32::from(if l < 32 { byte & 0xf } else { byte >> 4 })
    };
    let (mut tot, mut mins) = (0i32, 0i32);
    for s in 0..8 {
        let (sc, m) = k4_scale_min(s, &x[4..16]);
        tot += i32::from(sc) * (32 * s..32 * s + 32).map(|k| q(k) * yq(k)).sum::<i32>();
        mins += i32::from(m) * (32 * s..32 * s + 32).map(&yq).sum::<i32>();
    }
    let (d, dmin) = (half::f16::from_le_bytes([x[0], x[1]]).to_f32(), half::f16::from_le_bytes([x[2], x[3]]).to_f32());
    let acc = (tot as f32).mul_add(d * dy, acc);
    (mins as f32).mul_add(dmin * -dy, acc)
}

/// One Q6_K block: Σ_s sc_s · Σ (q - 32)·y, scaled once.
fn reference_q6_k(x: &[u8], y: &[u8], acc: f32) -> f32 {
    let (dy, yq) = q8k(y);
    let v = q6k_values(&x[0..128], &x[128..192]);
    let tot: i32 = (0..16)
        .map(|s| i32::from(x[192 + s] as i8) * (16 * s..16 * s + 16).map(|k| i32::from(v[k]) * yq(k)).sum::<i32>())
        .sum();
    (tot as f32).mul_add(half::f16::from_le_bytes([x[208], x[209]]).to_f32() * dy, acc)
}
