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
//! Per group and block (`group_block_bytes`, 16 times the type's block size, so the
//! interleaved copy is exactly as large as the original):
//! * Q8_0: 8 × 64 quant bytes (quant + 128), then 16 f16 scales;
//! * Q4_0: 4 × 64 bytes, lane i = row i's `qs[4j..4j + 4]` (low nibbles are elements
//!   4j.., high nibbles 16 + 4j..), then the scales;
//! * Q5_0: as Q4_0, then 8 × u64 masks of the fifth bits (bit 4i + k of mask j: element
//!   4j + k of row i), then the scales.
//!
//! Every output is `Σ_b (isum_b as f32) · (d_w,b · d_a,b)` accumulated in block order
//! with fused multiply-adds, whatever the number of tokens, so one token and many give
//! bit-identical results; [`reference`] computes the same in scalar code.

use rayon::prelude::*;

use crate::act::QuantizedActs;
use crate::matmul::WeightView;
use crate::{ActType, GgmlType, Isa, QK};

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

/// The integer offset added to each stored quant to make it unsigned.
pub(crate) fn offset(ty: GgmlType) -> i32 {
    match ty {
        GgmlType::Q8_0 => 128,
        GgmlType::Q5_0 => 16,
        _ => 8,
    }
}

/// Bytes of one group's block: 16 original blocks' worth.
pub fn group_block_bytes(ty: GgmlType) -> usize {
    GROUP_ROWS * ty.type_size()
}

impl Interleaved {
    /// Whether `ty` has an interleaved form and this CPU has its kernels.
    pub fn supports(ty: GgmlType) -> bool {
        matches!(ty, GgmlType::Q8_0 | GgmlType::Q5_0 | GgmlType::Q4_0)
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
        let blocks = w.cols / QK;
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
        self.cols / QK
    }

    /// Group g's blocks, back to back.
    pub(crate) fn group(&self, g: usize) -> &[u8] {
        let len = self.blocks() * group_block_bytes(self.ty);
        &self.data[g * len..(g + 1) * len]
    }
}

/// 16 rows' blocks (each `ty.type_size()` bytes) into one group block.
fn repack_block(ty: GgmlType, rows: [&[u8]; GROUP_ROWS], dst: &mut [u8]) {
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

/// Per token and block of Q8_0 activations: the scale as f32 and the offset correction
/// `-offset · Σ q` for weights of one type.
pub struct ActSums {
    pub blocks: usize,
    pub d: Vec<f32>,
    pub corr: Vec<i32>,
}

impl ActSums {
    pub fn new(ty: GgmlType, acts: &QuantizedActs) -> ActSums {
        assert_eq!(acts.ty, ActType::Q8_0, "interleaved weights take Q8_0 activations");
        let blocks = acts.cols / QK;
        let off = offset(ty);
        let (mut d, mut corr) = (Vec::with_capacity(acts.rows * blocks), Vec::with_capacity(acts.rows * blocks));
        for t in 0..acts.rows {
            for b in acts.quant_row(t).chunks_exact(ActType::Q8_0.type_size()) {
                d.push(half::f16::from_le_bytes([b[0], b[1]]).to_f32());
                corr.push(-off * b[2..34].iter().map(|&q| i32::from(q as i8)).sum::<i32>());
            }
        }
        ActSums { blocks, d, corr }
    }

    pub fn row(&self, t: usize) -> (&[f32], &[i32]) {
        let r = t * self.blocks..(t + 1) * self.blocks;
        (&self.d[r.clone()], &self.corr[r])
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
    let (bb, ab) = (w.ty.type_size(), ActType::Q8_0.type_size());
    for t in 0..acts.rows {
        let (a, (ds, _)) = (acts.quant_row(t), sums.row(t));
        for r in 0..w.rows {
            let mut acc = 0.0f32;
            for b in 0..sums.blocks {
                let x = &w.row(r)[b * bb..(b + 1) * bb];
                let y = &a[b * ab..(b + 1) * ab];
                let isum = (0..QK).map(|k| quant(w.ty, x, k) * i32::from(y[2 + k] as i8)).sum::<i32>();
                let dw = half::f16::from_le_bytes([x[0], x[1]]).to_f32();
                acc = (isum as f32).mul_add(dw * ds[b], acc);
            }
            out[t * w.rows + r] = acc;
        }
    }
}
