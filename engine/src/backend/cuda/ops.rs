//! The float operations between products (backend.cu and elementwise.cu): norms, RoPE,
//! gated activations, element-wise updates, and the gathers and copies the seam asks for.
//! Each checks its shapes and indices on the host, since the kernels trust them.

use super::products::{blocks_x, int};
use super::{launch, CudaAct, CudaBackend, CudaVector, Fallible, Yarn};

/// Threads per block of the element-wise kernels, and the most blocks a grid-stride kernel
/// is launched with.
const THREADS: u32 = 256;
const MAX_STRIDE_BLOCKS: usize = 1 << 20;

/// A grid-stride kernel's blocks for `n` elements.
fn stride_grid(n: usize) -> (u32, u32, u32) {
    (n.div_ceil(THREADS as usize).clamp(1, MAX_STRIDE_BLOCKS) as u32, 1, 1)
}

/// `n` as a grid-stride kernel's 64-bit count.
fn count(n: usize) -> Fallible<i64> {
    i64::try_from(n).map_err(|_| format!("{n} elements"))
}

/// How a RoPE call rotates: the style, the per-pair frequency ratio as the CPU computes it,
/// and either plain (linear) scaling with optional per-pair divisors or YaRN.
pub(super) struct Rope<'a> {
    neox: bool,
    theta_scale: f32,
    freq_scale: f32,
    factors: Option<&'a CudaVector>,
    /// (ext_factor, mscale, corr_lo, corr_hi) for YaRN.
    yarn: Option<(f32, f32, f32, f32)>,
}

impl<'a> Rope<'a> {
    pub(super) fn plain(
        neox: bool,
        base: f32,
        head_dim: usize,
        freq_scale: f32,
        factors: Option<&'a CudaVector>,
    ) -> Rope<'a> {
        Rope { neox, theta_scale: theta_scale(base, head_dim), freq_scale, factors, yarn: None }
    }

    /// YaRN as `Yarn::cos_sin`: mscale is its attn_factor times the magnitude term, with
    /// the CPU's operations.
    pub(super) fn yarn(neox: bool, base: f32, head_dim: usize, yarn: &Yarn) -> Rope<'a> {
        let mut mscale = yarn.attn_factor;
        if yarn.ext_factor != 0.0 {
            mscale *= 1.0 + 0.1 * (1.0 / yarn.freq_scale).ln();
        }
        let [lo, hi] = yarn.corr_dims;
        let params = Some((yarn.ext_factor, mscale, lo, hi));
        Rope {
            neox,
            theta_scale: theta_scale(base, head_dim),
            freq_scale: yarn.freq_scale,
            factors: None,
            yarn: params,
        }
    }
}

/// base^(−2 / head_dim), as turbine-cpu's RoPE computes it.
fn theta_scale(base: f32, head_dim: usize) -> f32 {
    base.powf(-2.0 / head_dim as f32)
}

/// A gated activation: gate = act(gate) · up.
#[derive(Clone, Copy)]
pub(super) enum Gate {
    GeGlu,
    SwiGlu,
    SwiGluOai { alpha: f32, limit: f32 },
}

impl CudaBackend {
    /// RMSNorm of every `w.len()`-long segment of every row.
    pub(super) fn norm(&self, x: &CudaAct, w: &CudaVector, eps: f32) -> Fallible<CudaAct> {
        let seg = w.len();
        if seg == 0 || !x.cols.is_multiple_of(seg) {
            return Err(format!("a norm of {seg} values over rows of {}", x.cols));
        }
        let mut y = self.act(x.rows, x.cols)?;
        if y.len() == 0 {
            return Ok(y);
        }
        let grid = (blocks_x(x.len() / seg, 1)?, 1, 1);
        // A multiple of 32 up to 256: a head of 64 values needs no idle warps.
        let threads = seg.next_multiple_of(32).min(THREADS as usize) as u32;
        let seg_i = int(seg, "norm width")?;
        let (k, wv) = (&self.kernels().rms_norm, w.dev()?);
        launch!(self, k, grid, (threads, 1, 1); x.dev()?, &wv, y.dev_mut()?, &seg_i, &eps)?;
        Ok(y)
    }

    /// Rotates every `head_dim` segment of row i at positions[i], in place.
    pub(super) fn rope(&self, x: &mut CudaAct, positions: &[u32], head_dim: usize, r: Rope) -> Fallible<()> {
        if positions.len() != x.rows {
            return Err(format!("{} positions for {} rows", positions.len(), x.rows));
        }
        if head_dim == 0 || !head_dim.is_multiple_of(2) || !x.cols.is_multiple_of(head_dim) {
            return Err(format!("heads of {head_dim} in rows of {}", x.cols));
        }
        if let Some(f) = r.factors {
            if f.len() < head_dim / 2 {
                return Err(format!("{} RoPE factors for heads of {head_dim}", f.len()));
            }
        }
        if x.len() == 0 {
            return Ok(());
        }
        let pos = self.positions(positions)?;
        let factors = match r.factors {
            Some(f) => self.raw(&f.dev()?),
            None => 0u64,
        };
        let n_pairs = x.len() / 2;
        let (cols, hd, pairs) = (int(x.cols, "columns")?, int(head_dim, "head_dim")?, int(n_pairs, "pairs")?);
        let neox = i32::from(r.neox);
        let (yarn, (ext, mscale, lo, hi)) = match r.yarn {
            Some(p) => (1i32, p),
            None => (0i32, (0.0, 1.0, 0.0, 0.0)),
        };
        let grid = (blocks_x(n_pairs, THREADS as usize)?, 1, 1);
        let k = &self.kernels().rope;
        launch!(self, k, grid, (THREADS, 1, 1);
            x.dev_mut()?, pos.as_ref(), &factors, &cols, &hd, &neox, &pairs, &r.theta_scale, &r.freq_scale,
            &yarn, &ext, &mscale, &lo, &hi)
    }

    pub(super) fn gated(&self, gate: Gate, g: &mut CudaAct, up: &CudaAct) -> Fallible<()> {
        if (g.rows, g.cols) != (up.rows, up.cols) {
            return Err(format!("gate {}x{}, up {}x{}", g.rows, g.cols, up.rows, up.cols));
        }
        let n = g.len();
        if n == 0 {
            return Ok(());
        }
        let k = self.kernels();
        match gate {
            Gate::GeGlu => {
                let n64 = count(n)?;
                launch!(self, &k.geglu, stride_grid(n), (THREADS, 1, 1); g.dev_mut()?, up.dev()?, &n64)
            }
            // elementwise.cu's: one thread per element, a 32-bit count.
            Gate::SwiGlu => {
                let (grid, n) = ((blocks_x(n, THREADS as usize)?, 1, 1), int(n, "elements")?);
                launch!(self, &k.swiglu, grid, (THREADS, 1, 1); g.dev_mut()?, up.dev()?, &n)
            }
            Gate::SwiGluOai { alpha, limit } => {
                let (grid, n) = ((blocks_x(n, THREADS as usize)?, 1, 1), int(n, "elements")?);
                launch!(self, &k.swiglu_oai, grid, (THREADS, 1, 1); g.dev_mut()?, up.dev()?, &n, &alpha, &limit)
            }
        }
    }

    pub(super) fn scale_in_place(&self, x: &mut CudaAct, s: f32) -> Fallible<()> {
        let n = x.len();
        if n == 0 {
            return Ok(());
        }
        let n64 = count(n)?;
        launch!(self, &self.kernels().scale, stride_grid(n), (THREADS, 1, 1); x.dev_mut()?, &s, &n64)
    }

    pub(super) fn add_in_place(&self, y: &mut CudaAct, x: &CudaAct) -> Fallible<()> {
        if (y.rows, y.cols) != (x.rows, x.cols) {
            return Err(format!("{}x{} += {}x{}", y.rows, y.cols, x.rows, x.cols));
        }
        let n = y.len();
        if n == 0 {
            return Ok(());
        }
        let n64 = count(n)?;
        launch!(self, &self.kernels().add, stride_grid(n), (THREADS, 1, 1); y.dev_mut()?, x.dev()?, &n64)
    }

    pub(super) fn bias_in_place(&self, x: &mut CudaAct, bias: &CudaVector) -> Fallible<()> {
        if bias.len() != x.cols {
            return Err(format!("a bias of {} on rows of {}", bias.len(), x.cols));
        }
        let n = x.len();
        if n == 0 {
            return Ok(());
        }
        let (cols, n64) = (int(x.cols, "columns")?, count(n)?);
        let (k, bv) = (&self.kernels().add_bias, bias.dev()?);
        launch!(self, k, stride_grid(n), (THREADS, 1, 1); x.dev_mut()?, &bv, &cols, &n64)
    }

    /// y[rows[i]] += weights[i] · x[i], in order.
    pub(super) fn scaled_rows(&self, y: &mut CudaAct, x: &CudaAct, rows: &[usize], weights: &[f32]) -> Fallible<()> {
        if rows.len() != x.rows || weights.len() != x.rows || x.cols != y.cols {
            let (n, w) = (rows.len(), weights.len());
            return Err(format!("{n} rows and {w} weights of a {}x{} matrix into {} columns", x.rows, x.cols, y.cols));
        }
        if let Some(&r) = rows.iter().find(|&&r| r >= y.rows) {
            return Err(format!("row {r} of {}", y.rows));
        }
        int(y.rows, "rows")?;
        if x.len() == 0 {
            return Ok(());
        }
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let (idx, w) = (self.upload(&idx)?, self.upload(weights)?);
        let (n, cols) = (int(x.rows, "rows")?, int(x.cols, "columns")?);
        let grid = (blocks_x(x.cols, THREADS as usize)?, 1, 1);
        let k = &self.kernels().add_scaled_rows;
        launch!(self, k, grid, (THREADS, 1, 1); y.dev_mut()?, x.dev()?, &idx, &w, &n, &cols)
    }

    /// Each row's `spans` of columns, side by side.
    pub(super) fn columns(&self, x: &CudaAct, spans: &[(usize, usize)]) -> Fallible<CudaAct> {
        let mut src = Vec::new();
        for &(start, len) in spans {
            match start.checked_add(len) {
                Some(end) if end <= x.cols => src.extend((start..end).map(|c| c as u32)),
                _ => return Err(format!("columns {start}+{len} of {}", x.cols)),
            }
        }
        let mut y = self.act(x.rows, src.len())?;
        if y.len() == 0 {
            return Ok(y);
        }
        let src_dev = self.upload(&src)?;
        let (x_cols, y_cols) = (int(x.cols, "columns")?, int(src.len(), "columns")?);
        let n = count(y.len())?;
        let k = &self.kernels().gather_cols;
        launch!(self, k, stride_grid(y.len()), (THREADS, 1, 1); x.dev()?, &src_dev, y.dev_mut()?, &x_cols, &y_cols, &n)?;
        Ok(y)
    }

    /// The matrices side by side, row by row.
    pub(super) fn concat(&self, parts: &[&CudaAct]) -> Fallible<CudaAct> {
        let rows = parts.first().map_or(0, |p| p.rows);
        if let Some(p) = parts.iter().find(|p| p.rows != rows) {
            return Err(format!("parts of {} and {rows} rows", p.rows));
        }
        let cols: usize = parts.iter().map(|p| p.cols).sum();
        let mut y = self.act(rows, cols)?;
        let y_cols = int(cols, "columns")?;
        let mut at = 0usize;
        for p in parts {
            if p.len() > 0 {
                let (p_cols, at_i, n) = (int(p.cols, "columns")?, int(at, "column")?, count(p.len())?);
                let k = &self.kernels().copy_cols;
                launch!(self, k, stride_grid(p.len()), (THREADS, 1, 1); p.dev()?, y.dev_mut()?, &p_cols, &y_cols, &at_i, &n)?;
            }
            at += p.cols;
        }
        Ok(y)
    }

    /// The given rows, in order.
    pub(super) fn pick_rows(&self, x: &CudaAct, rows: &[usize]) -> Fallible<CudaAct> {
        if let Some(&r) = rows.iter().find(|&&r| r >= x.rows) {
            return Err(format!("row {r} of {}", x.rows));
        }
        int(x.rows, "rows")?;
        let mut y = self.act(rows.len(), x.cols)?;
        if y.len() == 0 {
            return Ok(y);
        }
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let idx = self.upload(&idx)?;
        let (cols, n) = (int(x.cols, "columns")?, count(y.len())?);
        let k = &self.kernels().gather_rows;
        launch!(self, k, stride_grid(y.len()), (THREADS, 1, 1); x.dev()?, &idx, y.dev_mut()?, &cols, &n)?;
        Ok(y)
    }
}
