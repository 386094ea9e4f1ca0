//! Activation quantizers: float rows into the 8-bit block formats that quantized weight
//! rows are dotted with (llama.cpp's `vec_dot_type`), in llama.cpp's byte layouts.
//!
//! They follow ggml's reference quantizers (`quantize_row_q8_0_ref`,
//! `quantize_row_q8_1_ref`, `quantize_row_q8_K_ref` in `ggml-quants.c`) exactly, so the
//! bytes are the same as llama.cpp's.

use rayon::prelude::*;

use crate::{ActRow, ActType, QK, QK_K};

/// Quantize one row `x` into `dst` in format `ty`.
///
/// Panics when `x` is not a whole number of blocks or `dst` is not exactly one quantized
/// row: shapes are fixed by the model, so a mismatch is a programming error.
/// `ActType::F32` writes the floats' little-endian bytes.
pub fn quantize_row(ty: ActType, x: &[f32], dst: &mut [u8]) {
    assert_eq!(x.len() % ty.block_size(), 0, "quantize_row: {} floats is not a whole number of {ty:?} blocks", x.len());
    assert_eq!(dst.len(), ty.row_bytes(x.len()), "quantize_row: wrong {ty:?} output size");
    #[cfg(target_arch = "x86_64")]
    if ty == ActType::Q8_K && crate::Isa::best() == crate::Isa::Avx512 {
        for (x, y) in x.chunks_exact(QK_K).zip(dst.chunks_exact_mut(ty.type_size())) {
            // SAFETY: Isa::best() is Avx512 only when the CPU has AVX-512 F, BW and AVX2.
            unsafe { block_q8_k_avx512(x, y) };
        }
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::best() != crate::Isa::Scalar {
        // SAFETY: Isa::best() is Avx2 or better only when the CPU has AVX2 and FMA.
        return unsafe { quantize_row_avx2(ty, x, dst) };
    }
    quantize_blocks(ty, x, dst);
}

/// [`quantize_blocks`] compiled for AVX2: the same operations on each element (the loops
/// vectorize; the crate's baseline is SSE2), so the same bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quantize_row_avx2(ty: ActType, x: &[f32], dst: &mut [u8]) {
    quantize_blocks(ty, x, dst)
}

/// The portable quantizer, block by block.
#[inline(always)]
pub fn quantize_blocks(ty: ActType, x: &[f32], dst: &mut [u8]) {
    let blocks = x.chunks_exact(ty.block_size()).zip(dst.chunks_exact_mut(ty.type_size()));
    match ty {
        ActType::F32 => blocks.for_each(|(x, y)| y.copy_from_slice(&x[0].to_le_bytes())),
        ActType::Q8_0 => blocks.for_each(|(x, y)| block_q8_0(x, y)),
        ActType::Q8_1 => blocks.for_each(|(x, y)| block_q8_1(x, y)),
        ActType::Q8_K => blocks.for_each(|(x, y)| block_q8_k(x, y)),
    }
}

/// Rounds half to even like `f32::round_ties_even`, for |x| < 2^22 (quantized values
/// are at most 127): adding and subtracting 1.5·2^23 leaves the integer the FPU's
/// round-to-nearest-even picked. `round_ties_even` itself becomes a libm call on
/// baseline x86-64, which showed up at 5% of prompt processing.
#[inline(always)]
fn round_half_even(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (x + MAGIC) - MAGIC
}

/// Scale and inverse scale of a 32-element Q8_0 / Q8_1 block: d = amax / 127 and
/// id = 127 / amax, as llama.cpp's x86 quantizer (`arch/x86/quants.c`) computes them:
/// that is the code our reference outputs come from, and its inverse differs from the
/// portable `_ref` version's 1/d in the last bit.
#[inline]
fn q8_scale(x: &[f32]) -> (f32, f32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    (d, id)
}

/// Q8_0, 34 bytes: `d: f16, qs: [i8; 32]`. q = x·id rounded half to even
/// (`_mm256_round_ps` with `_MM_ROUND_NEAREST`, as llama.cpp on x86).
fn block_q8_0(x: &[f32], y: &mut [u8]) {
    let (d, id) = q8_scale(x);
    y[0..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
    for (q, &v) in y[2..2 + QK].iter_mut().zip(x) {
        *q = round_half_even(v * id) as i8 as u8;
    }
}

/// Q8_1, 36 bytes: `d: f16, s: f16, qs: [i8; 32]` with s = d * sum(q), which lets
/// Q4_1 / Q5_1 dots apply their min without touching the quants.
fn block_q8_1(x: &[f32], y: &mut [u8]) {
    let (d, id) = q8_scale(x);
    let mut sum = 0i32;
    for (q, &v) in y[4..4 + QK].iter_mut().zip(x) {
        let qi = round_half_even(v * id) as i8;
        sum += i32::from(qi);
        *q = qi as u8;
    }
    y[0..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
    y[2..4].copy_from_slice(&half::f16::from_f32(sum as f32 * d).to_le_bytes());
}

/// Q8_K, 292 bytes: `d: f32, qs: [i8; 256], bsums: [i16; 16]` (bsums = sums of 16 quants).
///
/// The scale comes from the *signed* value of largest magnitude (the first one on ties):
/// iscale = -127 / max, so that value becomes -127 and nothing rounds to -128.
/// q = nearest_int(iscale * x) (round half to even, as ggml's float-magic `nearest_int`),
/// capped at 127; d = 1 / iscale. An all-zero block is all zeros.
fn block_q8_k(x: &[f32], y: &mut [u8]) {
    // The largest magnitude (a loop that vectorizes), then the first value that has it.
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let max = x.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0);
    if amax == 0.0 {
        y.fill(0);
        return;
    }
    let iscale = -127.0 / max;
    let (head, bsums) = y.split_at_mut(4 + QK_K);
    for (q, &v) in head[4..].iter_mut().zip(x) {
        let qi = (round_half_even(iscale * v) as i32).min(127);
        *q = qi as i8 as u8;
    }
    for (sum, qs) in bsums.chunks_exact_mut(2).zip(head[4..].chunks_exact(16)) {
        let s: i32 = qs.iter().map(|&q| i32::from(q as i8)).sum();
        sum.copy_from_slice(&(s as i16).to_le_bytes());
    }
    head[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
}

/// [`block_q8_k`] 16 elements at a time, the same bytes for finite inputs: the same
/// largest magnitude and first value having it, `vcvtps2dq`'s rounding (half to even,
/// the default mode) for `round_half_even`, and each 16-element sum from one vector.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
fn block_q8_k_avx512(x: &[f32], y: &mut [u8]) {
    use std::arch::x86_64::*;
    let x: &[f32; QK_K] = x.try_into().expect("block_q8_k: one block");
    let y: &mut [u8; 4 + QK_K + 32] = y.try_into().expect("block_q8_k: one block");
    let (chunks, _) = x.as_chunks::<16>();
    // SAFETY (each `_mm512_loadu_ps` below): reads one 16-element chunk. A function, not
    // a closure: closures do not inherit the target features.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn load(c: &[f32; 16]) -> __m512 {
        unsafe { _mm512_loadu_ps(c.as_ptr()) }
    }
    let mut m = _mm512_setzero_ps();
    for c in chunks {
        m = _mm512_max_ps(m, _mm512_abs_ps(load(c)));
    }
    let amax = _mm512_reduce_max_ps(m);
    if amax == 0.0 {
        y.fill(0);
        return;
    }
    let mut max = 0.0;
    for c in chunks {
        let hits = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(_mm512_abs_ps(load(c)), _mm512_set1_ps(amax));
        if hits != 0 {
            max = c[hits.trailing_zeros() as usize];
            break;
        }
    }
    let iscale = -127.0 / max;
    let (head, bsums) = y.split_at_mut(4 + QK_K);
    for (i, c) in chunks.iter().enumerate() {
        let q = _mm512_min_epi32(
            _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_set1_ps(iscale), load(c))),
            _mm512_set1_epi32(127),
        );
        // SAFETY: writes the 16 bytes of this chunk's quants.
        unsafe { _mm_storeu_si128(head[4 + 16 * i..].as_mut_ptr().cast(), _mm512_cvtepi32_epi8(q)) };
        bsums[2 * i..2 * i + 2].copy_from_slice(&(_mm512_reduce_add_epi32(q) as i16).to_le_bytes());
    }
    head[0..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
}

/// Below this many elements a batch is quantized on the calling thread: splitting it
/// costs more than it saves.
const PAR_MIN_ELEMS: usize = 1 << 14;

/// A batch of activation rows, quantized once into the format a weight type needs and
/// reused for every weight with that activation type (e.g. Q, K, V projections).
#[derive(Clone, Debug)]
pub struct QuantizedActs {
    pub ty: ActType,
    /// Elements per row.
    pub cols: usize,
    pub rows: usize,
    /// Quantized rows back to back (`ty.row_bytes(cols)` each); empty for `F32`.
    bytes: Vec<u8>,
    /// The rows as given, for `ActType::F32`; empty otherwise.
    floats: Vec<f32>,
}

impl QuantizedActs {
    /// Quantize the rows of `x` (`x.len() / cols` rows of `cols` floats) into `ty`.
    ///
    /// Panics when `cols` is 0 or not a multiple of `ty`'s block size, or when `x` is not a
    /// whole number of rows (programming errors: shapes come from the validated model).
    pub fn new(ty: ActType, x: &[f32], cols: usize) -> Self {
        let mut acts = QuantizedActs { ty, cols, rows: 0, bytes: Vec::new(), floats: Vec::new() };
        acts.requantize(ty, x, cols);
        acts
    }

    /// Quantize a new batch into this one, reusing its buffers (no allocation once they are
    /// big enough, e.g. on every decode step).
    pub fn requantize(&mut self, ty: ActType, x: &[f32], cols: usize) {
        assert!(
            cols > 0 && cols.is_multiple_of(ty.block_size()),
            "QuantizedActs: {cols} columns is not a whole number of {ty:?} blocks"
        );
        assert_eq!(x.len() % cols, 0, "QuantizedActs: {} floats is not a whole number of rows of {cols}", x.len());
        self.ty = ty;
        self.cols = cols;
        self.rows = x.len() / cols;
        self.bytes.clear();
        self.floats.clear();
        if ty == ActType::F32 {
            self.floats.extend_from_slice(x);
            return;
        }
        let row_bytes = ty.row_bytes(cols);
        self.bytes.resize(self.rows * row_bytes, 0);
        if self.rows > 1 && x.len() >= PAR_MIN_ELEMS {
            self.bytes
                .par_chunks_mut(row_bytes)
                .zip(x.par_chunks(cols))
                .for_each(|(dst, src)| quantize_row(ty, src, dst));
        } else {
            for (dst, src) in self.bytes.chunks_mut(row_bytes).zip(x.chunks(cols)) {
                quantize_row(ty, src, dst);
            }
        }
    }

    /// Row `i` as a dot product consumes it. Panics when `i >= self.rows`.
    /// The bytes of quantized row `i` (empty for `F32`).
    pub fn quant_row(&self, i: usize) -> &[u8] {
        match self.row(i) {
            ActRow::Quant(q) => q,
            ActRow::F32(_) => &[],
        }
    }

    pub fn row(&self, i: usize) -> ActRow<'_> {
        assert!(i < self.rows, "QuantizedActs::row: row {i} of {}", self.rows);
        if self.ty == ActType::F32 {
            ActRow::F32(&self.floats[i * self.cols..(i + 1) * self.cols])
        } else {
            let rb = self.ty.row_bytes(self.cols);
            ActRow::Quant(&self.bytes[i * rb..(i + 1) * rb])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{quantize_blocks, quantize_row, round_half_even};
    use crate::ActType;

    #[test]
    fn dispatched_quantizers_write_the_portable_bytes() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for ty in [ActType::Q8_0, ActType::Q8_1, ActType::Q8_K] {
            for row in 0..40 {
                let n = 2 * ActType::Q8_K.block_size();
                let scale = [0.0f32, 1e-6, 1.0, 37.0, 3e4][row % 5];
                let mut x: Vec<f32> = (0..n).map(|_| ((next() % 20_001) as f32 / 10_000.0 - 1.0) * scale).collect();
                if row % 7 == 3 {
                    // Ties for the largest magnitude, either sign first, and values that
                    // land halfway between two quants.
                    let (i, j) = ((next() % 256) as usize, (next() % 256) as usize);
                    (x[i], x[j]) = (-2.0 * scale, 2.0 * scale);
                    x[(i + 1) % 256] = 2.0 * scale * 0.5 / 127.0;
                }
                let (mut fast, mut portable) = (vec![0u8; ty.row_bytes(n)], vec![0u8; ty.row_bytes(n)]);
                quantize_row(ty, &x, &mut fast);
                quantize_blocks(ty, &x, &mut portable);
                assert_eq!(fast, portable, "{ty:?} row {row}");
            }
        }
    }

    #[test]
    fn magic_rounding_equals_round_ties_even() {
        for i in -300_000..300_000 {
            let x = i as f32 / 1000.0;
            assert_eq!(round_half_even(x), x.round_ties_even(), "{x}");
        }
        for x in [0.5f32, 1.5, 2.5, -0.5, -1.5, 126.5, -127.5, 127.49999, f32::MIN_POSITIVE] {
            assert_eq!(round_half_even(x), x.round_ties_even(), "{x}");
        }
    }
}
