//! Matrix products and embedding lookups: activations quantized to 8 bits the CPU's way
//! (backend.cu `quantize_*_exact`), then matvec.cu's warp-per-row kernels for one token or
//! matmul.cu's 4-row × 8-token tiles for more; float weights through backend.cu's
//! `matmul_float_*`; and the mixture-of-experts product of a stack of experts, each
//! (token, choice) slot through its own (matmul.cu's `matvec_id_*`).

use super::moe::{Stack, VectorStack};
use super::{launch, ActMode, CudaAct, CudaBackend, CudaWeight, Fallible, Product};
use turbine_cuda::cudarc::driver::CudaSlice;

/// Rows of a weight per block of the product kernels (a warp each; matmul.cu's MM_ROWS),
/// and tokens per tile (MM_TOKENS).
pub(super) const ROWS_PER_BLOCK: usize = 4;
pub(super) const TOKENS_PER_TILE: usize = 8;
/// Warps (quantization blocks) per block of the quantizers.
const QUANTIZE_WARPS: usize = 8;
/// The grid's y and z dimensions' limit.
const GRID_YZ: usize = 65_535;

/// An activation matrix in 8 bits: q [rows][cols] i8 and one f32 scale per 32.
pub(super) struct Quantized {
    q: CudaSlice<i8>,
    d: CudaSlice<f32>,
}

/// The input of a group of products, quantized at most once per format.
#[derive(Default)]
pub(super) struct QuantizedCache {
    q8_0: Option<Quantized>,
    q8_k: Option<Quantized>,
}

impl QuantizedCache {
    /// `x` in `mode`'s format, quantized on the first call for that format.
    fn get(&mut self, be: &CudaBackend, x: &CudaAct, mode: ActMode) -> Fallible<&Quantized> {
        let slot = match mode {
            ActMode::Q8_0 => &mut self.q8_0,
            ActMode::Q8K => &mut self.q8_k,
        };
        if slot.is_none() {
            *slot = Some(be.quantize(x, mode)?);
        }
        slot.as_ref().ok_or_else(|| "quantized input missing".to_string())
    }
}

/// ⌈n / per⌉ blocks along the grid's x dimension.
pub(super) fn blocks_x(n: usize, per: usize) -> Fallible<u32> {
    u32::try_from(n.div_ceil(per))
        .ok()
        .filter(|&b| b <= i32::MAX as u32)
        .ok_or_else(|| format!("{n} is too many for one launch"))
}

/// ⌈n / per⌉ blocks along y or z.
pub(super) fn blocks_yz(n: usize, per: usize) -> Fallible<u32> {
    let b = n.div_ceil(per);
    match b <= GRID_YZ {
        true => Ok(b as u32),
        false => Err(format!("{n} rows need more than {GRID_YZ} blocks along a grid dimension: split the batch")),
    }
}

/// `v` as a kernel's 32-bit size.
pub(super) fn int(v: usize, what: &str) -> Fallible<i32> {
    i32::try_from(v).map_err(|_| format!("{what} = {v} does not fit the kernels' 32-bit sizes"))
}

impl CudaBackend {
    /// x · wᵀ: [n × cols] → [n × rows], reusing `cache`'s quantized input.
    pub(super) fn product(&self, w: &CudaWeight, x: &CudaAct, cache: &mut QuantizedCache) -> Fallible<CudaAct> {
        if x.cols != w.cols {
            return Err(format!("a [{} x {}] input for a {}x{} {} weight", x.rows, x.cols, w.rows, w.cols, w.ty));
        }
        let mut y = self.act(x.rows, w.rows)?;
        if y.len() == 0 {
            return Ok(y);
        }
        let tokens = int(x.rows, "tokens")?;
        let grid_x = blocks_x(w.rows, ROWS_PER_BLOCK)?;
        let tiles = blocks_yz(x.rows, TOKENS_PER_TILE)?;
        let block = (32, ROWS_PER_BLOCK as u32, 1);
        let d = w.dims;
        let wv = w.view()?;
        let out = y.dev_mut()?;
        match &w.product {
            Product::Float(f) => {
                launch!(self, f, (grid_x, tiles, 1), block; &wv, x.dev()?, out, &d.rows, &d.cols, &tokens)?;
            }
            Product::Quantized { mode, matvec, matmul, .. } => {
                let q = cache.get(self, x, *mode)?;
                if x.rows == 1 {
                    launch!(self, matvec, (grid_x, 1, 1), block; &wv, &q.q, &q.d, out, &d.rows, &d.blocks, &d.row_bytes)?;
                } else {
                    let grid = (grid_x, tiles, 1);
                    launch!(self, matmul, grid, block; &wv, &q.q, &q.d, out, &d.rows, &d.blocks, &d.row_bytes, &tokens)?;
                }
            }
            Product::None => return Err(format!("a {}x{} {} lookup table is not a matrix", w.rows, w.cols, w.ty)),
        }
        Ok(y)
    }

    /// Each (token, choice) slot s through its own expert of the stack `w` (matmul.cu's
    /// MATVEC_ID): y[s] = W[ids[s]] · x[a] (+ bias[ids[s]]), a = s / k (`per_slot` false:
    /// one input row per token, for gate and up) or s (true: the slot's own row, for
    /// down): [slots × rows]. `ids` [slots] must be experts of the stack (checked by
    /// `moe::Plan`).
    #[allow(clippy::too_many_arguments)] // the stack, its bias, the input, the slots and their layout are all distinct
    pub(super) fn product_by_slot(
        &self,
        w: &Stack,
        bias: Option<&VectorStack>,
        x: &CudaAct,
        ids: &CudaSlice<i32>,
        k: usize,
        per_slot: bool,
        cache: &mut QuantizedCache,
    ) -> Fallible<CudaAct> {
        let (m, slots) = (w.matrix(), ids.len());
        // The slots the input's rows cover: its own row each, or k per token.
        let inputs = if per_slot { x.rows } else { x.rows.checked_mul(k).ok_or("slots overflow")? };
        if x.cols != m.cols || inputs != slots || k == 0 {
            return Err(format!(
                "{slots} slots of {k} per token over a [{} x {}] input, {} columns",
                x.rows, x.cols, m.cols
            ));
        }
        if let Some(b) = bias {
            if b.len() != m.rows || b.count() != w.count() {
                return Err(format!(
                    "{} biases of {} for {} experts of {} rows",
                    b.count(),
                    b.len(),
                    w.count(),
                    m.rows
                ));
            }
        }
        let mut y = self.act(slots, m.rows)?;
        if y.len() == 0 {
            return Ok(y);
        }
        let (f, mode) = w.kernel();
        let q = cache.get(self, x, mode)?;
        let wv = w.view()?;
        let bias_view = bias.map(VectorStack::view).transpose()?;
        let bias_ptr = bias_view.as_ref().map_or(0u64, |b| self.raw(b));
        let grid = (blocks_x(m.rows, ROWS_PER_BLOCK)?, blocks_yz(slots, 1)?, 1);
        let (k_i, per_slot_i, d) = (int(k, "experts per token")?, i32::from(per_slot), m.dims);
        // MATVEC_ID(w, ids, xq, xd, bias, y, rows, blocks, row_bytes, k, x_per_slot), grid
        // (⌈rows / 4⌉, slots), block (32, 4), as cuda/src/bin/gpu_check/moe.rs launches it.
        // The kernel reads W rows [ids[s]·rows, +rows) of the stack (ids < count, checked),
        // input row a < x.rows (checked above), bias [count × rows] and writes y [slots × rows].
        launch!(self, f, grid, (32, ROWS_PER_BLOCK as u32, 1);
            &wv, ids, &q.q, &q.d, &bias_ptr, y.dev_mut()?, &d.rows, &d.blocks, &d.row_bytes, &k_i, &per_slot_i)?;
        Ok(y)
    }

    /// x [rows × cols] in 8 bits, `mode`'s way (cols whole blocks of it).
    fn quantize(&self, x: &CudaAct, mode: ActMode) -> Fallible<Quantized> {
        let block = match mode {
            ActMode::Q8_0 => 32,
            ActMode::Q8K => 256,
        };
        if !x.cols.is_multiple_of(block) {
            return Err(format!("{} columns are not whole {block}-element blocks", x.cols));
        }
        let n = x.len();
        let (q, d) = (self.alloc::<i8>(n)?, self.alloc::<f32>(n / 32)?);
        let n_blocks = int(n / block, "activation blocks")?;
        let grid = (blocks_x(n / block, QUANTIZE_WARPS)?, 1, 1);
        let f = match mode {
            ActMode::Q8_0 => &self.kernels().quantize_q8_0,
            ActMode::Q8K => &self.kernels().quantize_q8_k,
        };
        launch!(self, f, grid, (32 * QUANTIZE_WARPS as u32, 1, 1); x.dev()?, &q, &d, &n_blocks)?;
        Ok(Quantized { q, d })
    }

    /// Row i = table row tokens[i] · scale (tokens checked against the table).
    pub(super) fn embed_rows(&self, table: &CudaWeight, tokens: &[u32], scale: f32) -> Fallible<CudaAct> {
        let f = table.embed.as_ref().ok_or_else(|| format!("no CUDA lookup kernel for {} tables", table.ty))?;
        let mut y = self.act(tokens.len(), table.cols)?;
        if y.len() == 0 {
            return Ok(y);
        }
        let ids = self.upload(tokens)?;
        let grid = (blocks_x(tokens.len(), 1)?, 1, 1);
        let tv = table.view()?;
        launch!(self, f, grid, (256, 1, 1); &tv, &ids, y.dev_mut()?, &table.dims.cols, &scale)?;
        Ok(y)
    }
}
