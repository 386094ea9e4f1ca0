//! The grouped mixture-of-experts path ([`Backend::moe_grouped`]): every (token, choice)
//! slot of a step through its own expert in one launch per product, the routes made on the
//! host as for the per-expert path.
//!
//!   x [tokens × d] → quantized once → matvec_id gate, up (one input row per token, + the
//!   stacked biases) [slots × ff] → SwiGLU (or gpt-oss's clamped form) → quantized →
//!   matvec_id down (the slot's own row, + bias) [slots × d] → moe_combine [tokens × d]
//!
//! against the per-expert path's select_rows, two products, activation, product and
//! add_scaled_rows per busy expert. It needs each of gate, up and down to be one stack
//! (`Backend::experts` makes them so) of a type with a `matvec_id_*` kernel (Q8_0, Q4_0,
//! Q5_0, MXFP4, Q4_K, Q6_K; float experts take the per-expert path), k ≤ 32 (moe.cu's
//! MOE_MAX_K) and a batch for which it pays (see [`pays`]).
//!
//! Agreement with the per-expert path. The quantization (per row), the activation (per
//! element), the biases (one rounded add, after the dot product, either way) and the combine
//! are the same bits for the same inputs: moe_combine adds each token's slots in ascending
//! expert order from zero, product and sum rounded apart, which is what add_scaled_rows over
//! the busy experts in order does. The dot products are not always: matvec_id sums each
//! row as the tiled matmul kernel does (matmul.cu's `piece_dot`, lane l taking pieces
//! l, l + 32, ..., then `warp_sum`), so where the per-expert path gave an expert 2 or more
//! tokens the rows come out with the same arithmetic (the same bits, as far as the
//! compiler contracts the shared inline code into FMAs alike in both kernels); but an
//! expert with a single token goes through matvec.cu's kernel, which scales each block's
//! integer sum otherwise (`d·xd·Σ` with one sum per block, against `xd·(d_lo·Σlo + d_hi·Σhi)`
//! and the K-quants' scale and offset folded differently), so its rows differ in the last
//! bits. A decode step, where most experts have one token, therefore agrees with the
//! per-expert path within rounding, not bit for bit; both are measured against the CPU by
//! turbine-gpu-e2e, which also compares the two paths on the GPU.

use super::ops::Gate;
use super::products::{blocks_x, int, QuantizedCache, TOKENS_PER_TILE};
use super::{launch, ActMode, CudaAct, CudaBackend, CudaVector, CudaWeight, ExpertWeights, Fallible, Product};
use crate::model::moe::{Activation, Routes};
use std::sync::Arc;
use turbine_cuda::cudarc::driver::{CudaFunction, CudaView};

#[cfg(doc)]
use crate::backend::Backend;

/// moe.cu's MOE_MAX_K: experts per token moe_combine sorts.
pub(super) const MAX_K: usize = 32;
/// The grid's y dimension's limit (matvec_id's slots).
const GRID_Y: usize = 65_535;
/// Threads per block of moe_combine (≥ MAX_K: its first k threads sort the slots).
const COMBINE_THREADS: u32 = 256;

/// What the grouped path may read beyond the per-expert path's weights per busy expert it
/// saves. The per-expert path spends on each busy expert some eight small launches and three
/// host-to-device copies (select_rows, quantize, gate, up, activation, quantize, down,
/// add_scaled_rows), a few µs each: 10 to 20 µs, the time an H100 (≈ 3 TB/s) takes to read
/// 30 to 60 MB. A figure from those estimates, not from a measurement on a GPU.
const LAUNCHES_PER_EXPERT_BYTES: u64 = 32 << 20;

/// Whether the grouped path pays for a batch whose experts get `tokens[e]` slots each, an
/// expert's gate, up and down being `expert_bytes`. The per-expert path reads an expert's
/// weights once per tile of 8 of its tokens (once for a single token); matvec_id reads them
/// once per slot. So the grouped path reads as much where no expert has more than one
/// token (a decode step of one sequence: always grouped), and more the more tokens share
/// an expert (long prompts: per expert), which it may as long as the extra reads cost less
/// than the launches it saves.
pub(super) fn pays(tokens: &[usize], expert_bytes: usize) -> bool {
    let slots: u64 = tokens.iter().map(|&t| t as u64).sum();
    let tiles: u64 = tokens.iter().map(|&t| t.div_ceil(TOKENS_PER_TILE) as u64).sum();
    let busy = tokens.iter().filter(|&&t| t > 0).count() as u64;
    let extra = u128::from(slots - tiles) * expert_bytes as u128;
    extra <= u128::from(busy) * u128::from(LAUNCHES_PER_EXPERT_BYTES)
}

/// One of gate, up and down as a stack: `count` weights of one type and shape lying side by
/// side, in expert order, in one allocation (as [`Backend::experts`] made them), with the
/// type's matvec_id kernel.
pub(super) struct Stack<'a> {
    first: &'a CudaWeight,
    count: usize,
    by_slot: &'a CudaFunction,
    mode: ActMode,
}

impl<'a> Stack<'a> {
    /// `ws` as a stack, if they are one and their type has a matvec_id kernel.
    fn of(ws: &'a [CudaWeight]) -> Option<Stack<'a>> {
        let first = ws.first()?;
        let Product::Quantized { mode, by_slot: Some(by_slot), .. } = &first.product else {
            return None;
        };
        let size = first.at.len();
        let stacked = ws.iter().enumerate().all(|(i, w)| {
            Arc::ptr_eq(&w.bytes, &first.bytes)
                && i.checked_mul(size).and_then(|o| o.checked_add(first.at.start)) == Some(w.at.start)
                && w.at.len() == size
                && (w.ty, w.rows, w.cols) == (first.ty, first.rows, first.cols)
        });
        stacked.then_some(Stack { first, count: ws.len(), by_slot, mode: *mode })
    }

    /// The first matrix (shape, type and the kernels' dimensions of every one).
    pub(super) fn matrix(&self) -> &CudaWeight {
        self.first
    }

    pub(super) fn count(&self) -> usize {
        self.count
    }

    /// The matvec_id kernel, and the activation format it reads.
    pub(super) fn kernel(&self) -> (&CudaFunction, ActMode) {
        (self.by_slot, self.mode)
    }

    /// Bytes of one matrix.
    fn size(&self) -> usize {
        self.first.at.len()
    }

    /// The whole stack on the device: [count][rows][row_bytes].
    pub(super) fn view(&self) -> Fallible<CudaView<'a, u8>> {
        let start = self.first.at.start;
        let end = self.size().checked_mul(self.count).and_then(|n| n.checked_add(start));
        end.and_then(|end| self.first.bytes.try_slice(start..end))
            .ok_or_else(|| format!("a stack of {} matrices of {} bytes", self.count, self.size()))
    }
}

/// The experts' biases of one product as a stack: `count` vectors of `len` side by side, in
/// expert order, in one allocation (as [`Backend::expert_vectors`] made them).
pub(super) struct VectorStack<'a> {
    first: &'a CudaVector,
    count: usize,
}

impl<'a> VectorStack<'a> {
    fn of(vs: &'a [CudaVector]) -> Option<VectorStack<'a>> {
        let first = vs.first()?;
        let buf = first.buf.as_ref()?;
        let stacked = vs.iter().enumerate().all(|(i, v)| {
            v.buf.as_ref().is_some_and(|b| Arc::ptr_eq(b, buf))
                && i.checked_mul(first.len).and_then(|o| o.checked_add(first.at.start)) == Some(v.at.start)
                && v.len == first.len
                && v.at.len() == first.len
        });
        stacked.then_some(VectorStack { first, count: vs.len() })
    }

    /// Elements of each vector.
    pub(super) fn len(&self) -> usize {
        self.first.len
    }

    pub(super) fn count(&self) -> usize {
        self.count
    }

    /// The whole stack on the device: [count][len].
    pub(super) fn view(&self) -> Fallible<CudaView<'a, f32>> {
        let start = self.first.at.start;
        let end = self.first.len.checked_mul(self.count).and_then(|n| n.checked_add(start));
        let buf = self.first.buf.as_ref().ok_or("an empty bias")?;
        end.and_then(|end| buf.try_slice(start..end))
            .ok_or_else(|| format!("a stack of {} vectors of {}", self.count, self.first.len))
    }
}

/// A grouped run the host has checked: every shape and index the kernels trust.
pub(super) struct Plan<'a> {
    gate: Stack<'a>,
    up: Stack<'a>,
    down: Stack<'a>,
    biases: Option<[VectorStack<'a>; 3]>,
    act: Activation,
}

impl<'a> Plan<'a> {
    /// The grouped run of `routes` for x [tokens × d] through `experts`, where the weights
    /// allow it and it pays; None sends the model to its per-expert path.
    pub(super) fn new(x: &CudaAct, routes: &Routes, experts: &'a ExpertWeights<'_, CudaBackend>) -> Option<Plan<'a>> {
        let (gate, up, down) = (Stack::of(experts.gate)?, Stack::of(experts.up)?, Stack::of(experts.down)?);
        let n = gate.count;
        let (g, u, dn) = (gate.matrix(), up.matrix(), down.matrix());
        let shapes_fit = up.count == n
            && down.count == n
            && (g.rows, g.cols) == (u.rows, u.cols)
            && g.cols == x.cols
            && dn.cols == g.rows
            && i32::try_from(n).is_ok();
        let k = routes.k;
        let slots = x.rows.checked_mul(k)?;
        let routes_fit = (1..=MAX_K).contains(&k)
            && x.rows > 0
            && routes.experts.len() == slots
            && routes.weights.len() == slots
            && slots <= GRID_Y
            && routes.experts.iter().all(|&e| e < n);
        if !shapes_fit || !routes_fit {
            return None;
        }
        let biases = match experts.biases {
            None => None,
            Some([bg, bu, bd]) => {
                let stacks = [VectorStack::of(bg)?, VectorStack::of(bu)?, VectorStack::of(bd)?];
                let lens_fit = stacks.iter().all(|s| s.count == n)
                    && (stacks[0].len(), stacks[1].len(), stacks[2].len()) == (g.rows, g.rows, dn.rows);
                if !lens_fit {
                    return None;
                }
                Some(stacks)
            }
        };
        let mut tokens = vec![0usize; n];
        routes.experts.iter().for_each(|&e| tokens[e] += 1);
        let expert_bytes = gate.size().saturating_add(up.size()).saturating_add(down.size());
        pays(&tokens, expert_bytes).then_some(Plan { gate, up, down, biases, act: experts.act })
    }

    /// Columns of the result (down's rows).
    pub(super) fn d_out(&self) -> usize {
        self.down.matrix().rows
    }

    fn bias(&self, i: usize) -> Option<&VectorStack<'a>> {
        self.biases.as_ref().map(|b| &b[i])
    }
}

impl CudaBackend {
    /// x [tokens × d] through every slot's expert and combined: [tokens × d_out].
    pub(super) fn grouped_experts(&self, x: &CudaAct, routes: &Routes, plan: &Plan) -> Fallible<CudaAct> {
        let (tokens, k) = (x.rows, routes.k);
        // Plan checked every id against the stack (< count ≤ i32::MAX).
        let ids: Vec<i32> = routes.experts.iter().map(|&e| e as i32).collect();
        let (ids, weights) = (self.upload(&ids)?, self.upload(&routes.weights)?);
        let mut x_q = QuantizedCache::default();
        let mut g = self.product_by_slot(&plan.gate, plan.bias(0), x, &ids, k, false, &mut x_q)?; // [slots × ff]
        let u = self.product_by_slot(&plan.up, plan.bias(1), x, &ids, k, false, &mut x_q)?;
        drop(x_q);
        let gate = match plan.act {
            Activation::SwiGlu => Gate::SwiGlu,
            Activation::SwiGluOai { alpha, limit } => Gate::SwiGluOai { alpha, limit },
        };
        self.gated(gate, &mut g, &u)?;
        drop(u);
        let y = self.product_by_slot(&plan.down, plan.bias(2), &g, &ids, k, true, &mut QuantizedCache::default())?;
        drop(g);
        let d_out = plan.d_out();
        let mut out = self.act(tokens, d_out)?;
        if out.len() == 0 {
            return Ok(out);
        }
        let (k_i, d_i) = (int(k, "experts per token")?, int(d_out, "columns")?);
        // moe_combine(y, ids, weights, out, k, d), grid tokens, block 256 (≥ k ≤ 32), as
        // gpu_check launches it: y [tokens·k × d] and ids, weights [tokens·k], all made above
        // for these tokens; out [tokens × d].
        let combine = &self.kernels().moe_combine;
        launch!(self, combine, (blocks_x(tokens, 1)?, 1, 1), (COMBINE_THREADS, 1, 1);
            y.dev()?, &ids, &weights, out.dev_mut()?, &k_i, &d_i)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_token_per_expert_always_pays() {
        assert!(pays(&[1, 0, 1, 1, 0, 1, 1, 1, 1, 1], usize::MAX / 2));
        assert!(pays(&[0; 4], 1 << 30));
    }

    #[test]
    fn many_tokens_per_expert_pay_only_for_small_experts() {
        // 64 tokens on each of 8 large experts (a long prompt on a Mixtral-sized layer):
        // 512 reads against 64 tiles.
        assert!(!pays(&[64; 8], 100 << 20));
        // A small expert (3 MiB): 12 tokens each read it 10 times more (30 MiB) than the
        // per-expert tiles, within the launches saved; 16 tokens each, 14 times (42 MiB).
        assert!(pays(&[12; 128], 3 << 20));
        assert!(!pays(&[16; 128], 3 << 20));
    }

    #[test]
    fn a_tile_of_tokens_counts_as_one_read() {
        // Two tokens on one 100 MB expert: one read more than the tile's, 3× the allowance.
        assert!(!pays(&[2], 100 << 20));
        assert!(pays(&[2], 30 << 20));
        assert!(pays(&[1, 1], 100 << 20));
    }
}
