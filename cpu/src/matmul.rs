//! Weight-matrix times activations, parallel over blocks of weight rows.
//!
//! The activations are quantized once into the weight type's activation format, then
//! each rayon task takes a block of weight rows and dots them with every token, so each
//! weight byte is read from memory once per call (decode is memory-bound on weights).

use rayon::prelude::*;

use crate::act::QuantizedActs;
use crate::dequant::dequantize_row;
use crate::dot::{vec_dot, vec_dot_rows};
use crate::interleaved::{ActSums, Interleaved, GROUP_ROWS};
use crate::simd::{self, dot_row_tokens, dot_rows_packed, PackedActs, ROW_TOKENS};
use crate::{GgmlType, Isa};

/// A row-major weight matrix of `rows` rows of `cols` elements stored as `ty`, each row
/// `ty.row_bytes(cols)` bytes (a GGUF tensor with ne0 = cols, ne1 = rows).
#[derive(Clone, Copy, Debug)]
pub struct WeightView<'a> {
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub data: &'a [u8],
}

impl<'a> WeightView<'a> {
    /// A view of `data`, or None when `cols` is not a whole number of blocks or `data` is
    /// not exactly `rows` rows.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, data: &'a [u8]) -> Option<Self> {
        let size = ty.row_bytes(cols)?.checked_mul(rows)?;
        (size == data.len()).then_some(WeightView { ty, rows, cols, data })
    }

    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        self.cols / self.ty.block_size() * self.ty.type_size()
    }

    /// The bytes of row `i`. Panics when `i >= self.rows`.
    pub fn row(&self, i: usize) -> &'a [u8] {
        assert!(i < self.rows, "WeightView::row: row {i} of {}", self.rows);
        let rb = self.row_bytes();
        &self.data[i * rb..(i + 1) * rb]
    }
}

/// Row `r` of `w` dequantized into `dst` (`w.cols` floats), e.g. an embedding lookup.
/// Panics when `r >= w.rows` or `dst.len() != w.cols`.
pub fn get_row(w: &WeightView<'_>, r: usize, dst: &mut [f32]) {
    assert_eq!(dst.len(), w.cols, "get_row: destination is not {} floats", w.cols);
    dequantize_row(w.ty, w.row(r), dst);
}

/// `out[t * w.rows + r] = dot(row r of w, row t of x)` for the `n` rows of `x` (each
/// `w.cols` floats), with the best SIMD kernels this CPU has.
///
/// Panics when `x` is not `n * w.cols` floats or `out` not `n * w.rows`.
pub fn matmul(w: &WeightView<'_>, x: &[f32], n: usize, out: &mut [f32]) {
    matmul_with(Isa::best(), w, x, n, out);
}

/// [`matmul`] with kernels for `isa` (which must be one of `Isa::available()`).
pub fn matmul_with(isa: Isa, w: &WeightView<'_>, x: &[f32], n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), n * w.cols, "matmul: input is not {n} rows of {} floats", w.cols);
    assert_eq!(out.len(), n * w.rows, "matmul: output is not {n} rows of {} floats", w.rows);
    if out.is_empty() {
        return;
    }
    if w.cols == 0 {
        out.fill(0.0); // empty dot products
        return;
    }
    let acts = QuantizedActs::new(w.ty.act_type(), x, w.cols);
    matmul_quantized(isa, w, &acts, out);
}

/// [`matmul`] with activations already quantized to `w.ty.act_type()`, so one batch can
/// be quantized once and used for several weights with the same activation type.
///
/// Panics when `acts` has another format or width, or `out` is not `acts.rows * w.rows`.
pub fn matmul_quantized(isa: Isa, w: &WeightView<'_>, acts: &QuantizedActs, out: &mut [f32]) {
    let n = check_shapes(w, acts, out);
    if out.is_empty() {
        return;
    }
    if n == 1 {
        // One token: out is already indexed by weight row, so tasks write it directly. No
        // weight row is read twice, so tasks need not fit a cache: a few per thread keep
        // the load balanced without paying for thousands of tiny tasks (a 128k-row output
        // projection of short rows).
        let chunk = w.rows.div_ceil(4 * rayon::current_num_threads()).max(1);
        out.par_chunks_mut(chunk).enumerate().for_each(|(c, dst)| {
            rows_times_tokens(isa, w, acts, c * chunk, &mut [dst]);
        });
        return;
    }
    let chunk = rows_per_task(w.rows);
    // Several tokens: task c takes weight rows c·chunk.. and writes them for every token,
    // into its piece of each token's output row (disjoint pieces, no scratch or
    // transpose).
    let packed = PackedActs::for_weights(isa, w.ty, acts);
    let mut tasks: Vec<Vec<&mut [f32]>> = (0..w.rows.div_ceil(chunk)).map(|_| Vec::with_capacity(n)).collect();
    for token_out in out.chunks_mut(w.rows) {
        for (task, piece) in tasks.iter_mut().zip(token_out.chunks_mut(chunk)) {
            task.push(piece);
        }
    }
    tasks.into_par_iter().enumerate().for_each(|(c, mut outs)| match &packed {
        Some(p) => rows_times_packed_tokens(w, acts, p, c * chunk, &mut outs),
        None => rows_times_tokens(isa, w, acts, c * chunk, &mut outs),
    });
}

/// Panics unless `acts` are in `w`'s activation format and width and `out` holds one
/// output row per activation row; returns the number of activation rows.
fn check_shapes<O>(w: &WeightView<'_>, acts: &QuantizedActs, out: &[O]) -> usize {
    assert_eq!(acts.ty, w.ty.act_type(), "matmul: {} weights need {:?} activations", w.ty, w.ty.act_type());
    assert_eq!(acts.cols, w.cols, "matmul: activations have {} columns, weights {}", acts.cols, w.cols);
    let n = acts.rows;
    assert_eq!(out.len(), n * w.rows, "matmul: output is not {n} rows of {} floats", w.rows);
    n
}

/// [`matmul_quantized`] for a weight whose whole groups of 16 rows are also held
/// interleaved (`il`, made by `Interleaved::new(w)`): those rows go through the
/// interleaved kernels, any rows after them through the row kernels. The interleaved
/// kernels give the same results for one token as for many.
///
/// Panics when `il` is not `w`'s, or on the shape mismatches [`matmul_quantized`] panics on.
pub fn matmul_interleaved(w: &WeightView<'_>, il: &Interleaved, acts: &QuantizedActs, out: &mut [f32]) {
    interleaved_into(w, il, acts, out);
}

/// [`matmul_interleaved`] with each output summed in f64 from exact block products (see
/// `simd::interleaved::Accs`): the column shards of a tensor-parallel row-parallel matmul
/// add up, in f64, to what the whole matrix gives, before one rounding to f32. Rows after
/// the last whole group come from the row kernels' f32 results.
pub fn matmul_interleaved_wide(w: &WeightView<'_>, il: &Interleaved, acts: &QuantizedActs, out: &mut [f64]) {
    interleaved_into(w, il, acts, out);
}

/// The element an interleaved matmul writes: f32, or f64 for wide sums.
pub trait Output: Copy + Send + Sync + Default {
    const WIDE: bool;
    fn from_f32(x: f32) -> Self;
    fn from_f64(x: f64) -> Self;
}

impl Output for f32 {
    const WIDE: bool = false;
    fn from_f32(x: f32) -> f32 {
        x
    }
    fn from_f64(x: f64) -> f32 {
        x as f32
    }
}

impl Output for f64 {
    const WIDE: bool = true;
    fn from_f32(x: f32) -> f64 {
        f64::from(x)
    }
    fn from_f64(x: f64) -> f64 {
        x
    }
}

fn interleaved_into<O: Output>(w: &WeightView<'_>, il: &Interleaved, acts: &QuantizedActs, out: &mut [O]) {
    assert!(il.ty == w.ty && il.cols == w.cols && il.rows() <= w.rows, "matmul: interleaved copy of another weight");
    let n = check_shapes(w, acts, out);
    if out.is_empty() {
        return;
    }
    let sums = ActSums::new(w.ty, acts);
    let head = il.rows();
    let groups_per_task = il.groups.div_ceil(4 * rayon::current_num_threads()).max(1);
    let chunk = groups_per_task * GROUP_ROWS;
    let mut tasks: Vec<Vec<&mut [O]>> = (0..head.div_ceil(chunk)).map(|_| Vec::with_capacity(n)).collect();
    for token_out in out.chunks_mut(w.rows) {
        for (task, piece) in tasks.iter_mut().zip(token_out[..head].chunks_mut(chunk)) {
            task.push(piece);
        }
    }
    tasks.into_par_iter().enumerate().for_each(|(c, mut outs)| {
        let task = (c * groups_per_task, (c * groups_per_task + groups_per_task).min(il.groups));
        for g in task.0..task.1 {
            group_times_tokens(il, g, task, acts, &sums, (g - task.0) * GROUP_ROWS, &mut outs);
        }
    });
    if head < w.rows {
        let rb = w.row_bytes();
        let tail = WeightView { rows: w.rows - head, data: &w.data[head * rb..], ..*w };
        let mut tail_out = vec![0.0f32; n * tail.rows];
        matmul_quantized(Isa::best(), &tail, acts, &mut tail_out);
        for (dst, src) in out.chunks_mut(w.rows).zip(tail_out.chunks(tail.rows)) {
            dst[head..].iter_mut().zip(src).for_each(|(d, &s)| *d = O::from_f32(s));
        }
    }
}

/// Group g of `il` (in the task of groups first..stream_end) times every token, into
/// `outs[t][at..at + 16]`.
fn group_times_tokens<O: Output>(
    il: &Interleaved,
    g: usize,
    (first, stream_end): (usize, usize),
    acts: &QuantizedActs,
    sums: &ActSums,
    at: usize,
    outs: &mut [&mut [O]],
) {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::simd::interleaved::{
            group_tokens, group_tokens_q4_k, group_tokens_q6_k, sums_rows, AHEAD_BYTES, MAX_K_TOKENS, MAX_TOKENS,
        };
        let group = il.group(g);
        // The kernels request each block AHEAD_BYTES before they reach it, through the
        // task's later groups; a task's first blocks are requested here.
        let stream = il.groups_from(g, stream_end);
        if g == first {
            simd::prefetch(stream, 0, AHEAD_BYTES);
        }
        // Wide sums take two registers per token.
        let most = if O::WIDE || matches!(il.ty, GgmlType::Q4_K | GgmlType::Q6_K) { MAX_K_TOKENS } else { MAX_TOKENS };
        let mut t = 0;
        while t < acts.rows {
            let left = acts.rows - t;
            // Expanded inside `unsafe` blocks: `Interleaved` exists only where
            // `Interleaved::supports` found the AVX-512 VNNI kernels usable on this CPU.
            macro_rules! kernel {
                ($T:expr, $wide:expr, $a:expr, $s:expr) => {
                    match il.ty {
                        GgmlType::Q4_K => group_tokens_q4_k::<$T, $wide>(group, stream, $a, $s),
                        GgmlType::Q6_K => group_tokens_q6_k::<$T, $wide>(group, stream, $a, $s),
                        ty => group_tokens::<$T, $wide>(ty, group, stream, $a, $s),
                    }
                };
            }
            macro_rules! tile {
                ($T:expr) => {{
                    let a: [&[u8]; $T] = std::array::from_fn(|k| acts.quant_row(t + k));
                    let s = sums_rows::<$T>(sums, t);
                    if O::WIDE {
                        // SAFETY: see `kernel!`.
                        let r = unsafe { kernel!($T, true, a, s).wide() };
                        for (k, r) in r.iter().enumerate() {
                            outs[t + k][at..at + GROUP_ROWS].iter_mut().zip(r).for_each(|(o, &v)| *o = O::from_f64(v));
                        }
                    } else {
                        // SAFETY: see `kernel!`.
                        let r = unsafe { kernel!($T, false, a, s).narrow() };
                        for (k, r) in r.iter().enumerate() {
                            outs[t + k][at..at + GROUP_ROWS].iter_mut().zip(r).for_each(|(o, &v)| *o = O::from_f32(v));
                        }
                    }
                    $T
                }};
            }
            t += match left {
                _ if left >= MAX_TOKENS && most >= MAX_TOKENS => tile!(MAX_TOKENS),
                _ if left >= 8 => tile!(8),
                _ if left >= 4 => tile!(4),
                _ if left >= 2 => tile!(2),
                _ => tile!(1),
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (il, g, acts, sums, at, outs);
        unreachable!("interleaved weights exist only on x86-64");
    }
}

/// Weight rows per rayon task: enough tasks (4 per thread) to balance the load, but at
/// most 64 rows so a task's weights stay in cache while it loops over the tokens.
fn rows_per_task(rows: usize) -> usize {
    let tasks = 4 * rayon::current_num_threads();
    rows.div_ceil(tasks).clamp(1, 64)
}

/// Tokens per inner tile: a tile's activation rows stay in cache while the task's weight
/// rows pass over them.
const TOKEN_TILE: usize = 8;

/// [`rows_times_tokens`] through the packed many-token kernels.
fn rows_times_packed_tokens(
    w: &WeightView<'_>,
    acts: &QuantizedActs,
    p: &PackedActs,
    first: usize,
    outs: &mut [&mut [f32]],
) {
    let rb = w.row_bytes();
    let rows = &w.data[first * rb..(first + outs[0].len()) * rb];
    for t0 in (0..acts.rows).step_by(TOKEN_TILE) {
        dot_rows_packed(w.ty, w.cols, rows, acts, p, t0..(t0 + TOKEN_TILE).min(acts.rows), outs);
    }
}

/// Dots weight rows `first..first + outs[0].len()` with every token, writing
/// `outs[t][i]` for weight row `first + i` and token t.
fn rows_times_tokens(isa: Isa, w: &WeightView<'_>, acts: &QuantizedActs, first: usize, outs: &mut [&mut [f32]]) {
    let n = acts.rows;
    let rows = outs[0].len();
    if n == 1 {
        let rb = w.row_bytes();
        vec_dot_rows(isa, w.ty, w.cols, &w.data[first * rb..(first + rows) * rb], acts.row(0), outs[0]);
        return;
    }
    let mut group = [0f32; ROW_TOKENS];
    for t0 in (0..n).step_by(TOKEN_TILE) {
        let tokens = t0..(t0 + TOKEN_TILE).min(n);
        let rb = w.row_bytes();
        let task_rows = &w.data[first * rb..(first + rows) * rb];
        for (i, wr) in (first..first + rows).map(|r| (r - first, w.row(r))) {
            if t0 == 0 {
                // The first tile brings the rows from memory; later ones find them in cache.
                simd::prefetch(task_rows, i * rb + simd::PREFETCH_BYTES, rb);
            }
            let mut t = tokens.start;
            // Groups of tokens share each decoded weight block where a kernel allows.
            while t + ROW_TOKENS <= tokens.end {
                let a = std::array::from_fn(|k| acts.row(t + k));
                if !dot_row_tokens(isa, w.ty, w.cols, wr, a, &mut group) {
                    break;
                }
                for (k, v) in group.iter().enumerate() {
                    outs[t + k][i] = *v;
                }
                t += ROW_TOKENS;
            }
            for (t, out) in outs.iter_mut().enumerate().take(tokens.end).skip(t) {
                out[i] = vec_dot(isa, w.ty, w.cols, wr, acts.row(t));
            }
        }
    }
}
