//! Q8_0 activations laid out for the many-token AVX-512 kernels.
//!
//! In the per-row kernels every weight row redoes, for every token, work that depends on
//! the token alone: loading its scales and converting them from f16, gathering two
//! 34-byte blocks into one vector, and flipping the activations' signs by the weights'
//! (VNNI multiplies unsigned by signed bytes). Packing does the token's share once per
//! matmul: per pair of blocks, the 64 quants side by side, each block's scale repeated
//! over its 8 lanes, and `-128 · Σ` of each lane's 4 quants. A kernel then starts each
//! lane's `dpbusd` at that value and feeds it the weights plus 128 as unsigned bytes,
//! which gives exactly the lanes the sign trick gives: the results stay bit-identical.

use crate::act::QuantizedActs;
use crate::{ActType, GgmlType, Isa};

/// Blocks of 32 per pair.
const PAIR_BLOCKS: usize = 2;
/// Pairs per group of four blocks (the unit the kernels walk).
pub(super) const GROUP_PAIRS: usize = 2;

/// Two Q8_0 activation blocks.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug)]
pub struct PackedPair {
    /// Quants of block 2p in bytes 0..32, of block 2p+1 in 32..64.
    pub q: [i8; 64],
    /// Lane i: -128 · (q[4i] + q[4i+1] + q[4i+2] + q[4i+3]), the starting value of the
    /// lane's `dpbusd` accumulator.
    pub neg_bias: [i32; 16],
    /// Lanes 0..8: block 2p's scale; lanes 8..16: block 2p+1's.
    pub d: [f32; 16],
}

/// Every row of a [`QuantizedActs`] of Q8_0 activations, packed: the blocks of each row's
/// whole groups of four (a row's last `blocks % 4` blocks are read from the original).
pub struct PackedActs {
    pub rows: usize,
    /// Pairs per row.
    pub pairs: usize,
    data: Vec<PackedPair>,
}

impl PackedActs {
    /// Packs `acts` when `isa` has many-token kernels for `ty` (weights with Q8_0
    /// activations, on AVX-512) and this CPU can run them; None otherwise.
    pub fn for_weights(isa: Isa, ty: GgmlType, acts: &QuantizedActs) -> Option<PackedActs> {
        if isa != Isa::Avx512 || !super::isa_usable(isa) || ty.act_type() != ActType::Q8_0 || acts.ty != ActType::Q8_0 {
            return None;
        }
        let groups = acts.cols / ActType::Q8_0.block_size() / 4;
        let pairs = groups * GROUP_PAIRS;
        let mut data = Vec::with_capacity(acts.rows * pairs);
        for t in 0..acts.rows {
            let blocks = acts.quant_row(t).chunks_exact(ActType::Q8_0.type_size());
            let whole: Vec<&[u8]> = blocks.take(pairs * PAIR_BLOCKS).collect();
            data.extend(whole.chunks_exact(PAIR_BLOCKS).map(|b| pack_pair(b[0], b[1])));
        }
        Some(PackedActs { rows: acts.rows, pairs, data })
    }

    pub fn row(&self, t: usize) -> &[PackedPair] {
        &self.data[t * self.pairs..(t + 1) * self.pairs]
    }
}

/// Packs two 34-byte Q8_0 blocks `{d: f16, qs: [i8; 32]}`.
fn pack_pair(b0: &[u8], b1: &[u8]) -> PackedPair {
    let mut p = PackedPair { q: [0; 64], neg_bias: [0; 16], d: [0.0; 16] };
    for (k, b) in [b0, b1].into_iter().enumerate() {
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        for (i, &q) in b[2..34].iter().enumerate() {
            p.q[32 * k + i] = q as i8;
        }
        p.d[8 * k..8 * k + 8].fill(d);
    }
    for (lane, quad) in p.q.chunks_exact(4).enumerate() {
        p.neg_bias[lane] = -128 * quad.iter().map(|&q| i32::from(q)).sum::<i32>();
    }
    p
}
