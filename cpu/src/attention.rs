//! Attention of several query rows over f32 keys and values (prompt processing).
//!
//! Query rows that read the same KV head (the heads of a group, for a few consecutive
//! tokens) are taken together, so each key and value row is loaded once per tile of rows
//! rather than once per row. Every score, softmax and weighted sum is still computed with
//! exactly the operations of the one-row path ([`attend_one`]: `ops::dot_f32`,
//! `ops::softmax`, `ops::weighted_sum`), so the results are bit-identical to it and do not
//! depend on how rows are grouped.

use std::ops::Range;

use crate::ops;

/// One query row: its query vector, the key positions it attends to (in the caller's
/// numbering, the same for every row of a call) and its head's sink logit, if any.
#[derive(Clone, Debug)]
pub struct QueryRow<'a> {
    pub q: &'a [f32],
    pub keys: Range<usize>,
    pub sink: Option<f32>,
}

/// Rows per tile: four query rows share each key and value load.
const TILE_ROWS: usize = 4;

/// `outs[r] = softmax(scale · q_r · K) · V` over the keys of row r, with `key(p)` and
/// `value(p)` the rows at position p (each `q.len()` and `outs[r].len()` floats); a sink
/// takes part in the softmax's normalization. Bit-identical to [`attend_one`] per row.
///
/// Panics when `outs` and `queries` differ in length.
pub fn attend_rows<'a>(
    queries: &[QueryRow<'_>],
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    scale: f32,
    outs: &mut [&mut [f32]],
) {
    assert_eq!(queries.len(), outs.len(), "attend_rows: {} queries, {} outputs", queries.len(), outs.len());
    for (tile, outs) in queries.chunks(TILE_ROWS).zip(outs.chunks_mut(TILE_ROWS)) {
        let span = union(tile);
        let n = span.len();
        // weights[r * n + i]: row r's softmax weight of key span.start + i, zero for keys
        // outside its range (a zero weight leaves the weighted sum exactly as it was).
        let mut weights = vec![0.0f32; tile.len() * n];
        let keys: Vec<&[f32]> = span.clone().map(&key).collect();
        scores(tile, &keys, &mut weights);
        for (row, w) in tile.iter().zip(weights.chunks_mut(n.max(1))) {
            let own = row.keys.start - span.start..row.keys.end - span.start;
            w[own.clone()].iter_mut().for_each(|s| *s *= scale);
            match row.sink {
                Some(s) => ops::softmax_with_sink(&mut w[own.clone()], s),
                None => ops::softmax(&mut w[own.clone()]),
            }
            w[..own.start].fill(0.0);
            w[own.end..].fill(0.0);
        }
        let values: Vec<&[f32]> = span.clone().map(&value).collect();
        weighted_sums(&weights, &values, outs);
    }
}

/// The one-row path: the reference [`attend_rows`] is bit-identical to.
pub fn attend_one<'a>(
    row: &QueryRow<'_>,
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    scale: f32,
    out: &mut [f32],
) {
    let mut scores: Vec<f32> = row.keys.clone().map(|p| ops::dot_f32(row.q, key(p)) * scale).collect();
    match row.sink {
        Some(s) => ops::softmax_with_sink(&mut scores, s),
        None => ops::softmax(&mut scores),
    }
    ops::weighted_sum(out, &scores, row.keys.clone().map(&value));
}

/// The smallest range holding every row's keys (empty when all are).
fn union(rows: &[QueryRow<'_>]) -> Range<usize> {
    let live = rows.iter().filter(|r| !r.keys.is_empty());
    let start = live.clone().map(|r| r.keys.start).min().unwrap_or(0);
    let end = live.map(|r| r.keys.end).max().unwrap_or(start);
    start..end
}

/// `out[r * n + i] = dot(q_r, keys[i])` for every row and key (`n` keys).
fn scores(rows: &[QueryRow<'_>], keys: &[&[f32]], out: &mut [f32]) {
    let n = keys.len();
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::best() == crate::Isa::Avx512 && rows.len() == TILE_ROWS {
        let q: [&[f32]; TILE_ROWS] = std::array::from_fn(|r| rows[r].q);
        let mut i = 0;
        while i + 2 <= n {
            // SAFETY: Isa::best() is Avx512 only when the CPU has AVX-512 F (and AVX2, FMA).
            let d = unsafe { dots_avx512::<TILE_ROWS, 2>(q, [keys[i], keys[i + 1]]) };
            for (r, d) in d.iter().enumerate() {
                out[r * n + i..r * n + i + 2].copy_from_slice(d);
            }
            i += 2;
        }
        if i < n {
            // SAFETY: as above.
            let d = unsafe { dots_avx512::<TILE_ROWS, 1>(q, [keys[i]]) };
            for (r, d) in d.iter().enumerate() {
                out[r * n + i] = d[0];
            }
        }
        return;
    }
    for (r, row) in rows.iter().enumerate() {
        for (i, k) in keys.iter().enumerate() {
            out[r * n + i] = ops::dot_f32(row.q, k);
        }
    }
}

/// `outs[r] = Σ_i weights[r * n + i] · values[i]`, accumulated in key order (`n` values).
fn weighted_sums(weights: &[f32], values: &[&[f32]], outs: &mut [&mut [f32]]) {
    let n = values.len();
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::best() == crate::Isa::Avx512 && outs.len() == TILE_ROWS {
        let w: [&[f32]; TILE_ROWS] = std::array::from_fn(|r| &weights[r * n..(r + 1) * n]);
        // SAFETY: Isa::best() is Avx512 only when the CPU has AVX-512 F (and AVX2, FMA).
        unsafe { weighted_sums_avx512::<TILE_ROWS>(w, values, outs) };
        return;
    }
    for (r, out) in outs.iter_mut().enumerate() {
        ops::weighted_sum(out, &weights[r * n..(r + 1) * n], values.iter().copied());
    }
}

/// R×K dot products, each with `ops::dot_f32_avx512`'s lanes, operations and reduction.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn dots_avx512<const R: usize, const K: usize>(q: [&[f32]; R], k: [&[f32]; K]) -> [[f32; K]; R] {
    use std::arch::x86_64::*;
    const LANES: usize = ops::LANES;
    let d = q[0].len();
    assert!(q.iter().all(|q| q.len() == d) && k.iter().all(|k| k.len() == d), "dots: rows differ in length");
    let empty: (&[[f32; LANES]], &[f32]) = (&[], &[]);
    let (mut qc, mut kc) = ([empty; R], [empty; K]);
    for r in 0..R {
        qc[r] = q[r].as_chunks::<LANES>();
    }
    for j in 0..K {
        kc[j] = k[j].as_chunks::<LANES>();
    }
    let mut acc = [[[_mm512_setzero_ps(); 2]; K]; R];
    for c in 0..d / LANES {
        // Loops rather than `array::from_fn`, whose closures would not inherit the target
        // features and so would not be inlined.
        let mut kv = [[_mm512_setzero_ps(); 2]; K];
        for (kv, kc) in kv.iter_mut().zip(&kc) {
            for (h, kv) in kv.iter_mut().enumerate() {
                // SAFETY: reads 16 floats of a 32-float chunk.
                *kv = unsafe { _mm512_loadu_ps(kc.0[c][16 * h..].as_ptr()) };
            }
        }
        for r in 0..R {
            for h in 0..2 {
                // SAFETY: as above.
                let qv = unsafe { _mm512_loadu_ps(qc[r].0[c][16 * h..].as_ptr()) };
                for j in 0..K {
                    acc[r][j][h] = _mm512_fmadd_ps(qv, kv[j][h], acc[r][j][h]);
                }
            }
        }
    }
    let mut out = [[0.0f32; K]; R];
    for r in 0..R {
        for j in 0..K {
            out[r][j] = ops::reduce_dot_avx512(acc[r][j]) + ops::dot_tail(qc[r].1, kc[j].1);
        }
    }
    out
}

/// [`weighted_sums`] for R rows, 64 columns at a time: per column the same chain of fused
/// multiply-adds as `ops::weighted_sum` (vector lanes, then scalar `mul_add` for the
/// columns after the last whole 16).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn weighted_sums_avx512<const R: usize>(w: [&[f32]; R], values: &[&[f32]], outs: &mut [&mut [f32]]) {
    use std::arch::x86_64::*;
    const COLS: usize = 64;
    let cols = outs[0].len();
    assert!(outs.iter().all(|o| o.len() == cols), "weighted_sums: outputs differ in length");
    let whole = cols / 16 * 16;
    for c in (0..whole).step_by(COLS) {
        let regs = ((whole - c) / 16).min(COLS / 16);
        let mut acc = [[_mm512_setzero_ps(); COLS / 16]; R];
        for (i, v) in values.iter().enumerate() {
            let v = &v[c..c + 16 * regs];
            for r in 0..R {
                let wr = _mm512_set1_ps(w[r][i]);
                for j in 0..regs {
                    // SAFETY: reads 16 of the `16 * regs` floats of `v`.
                    acc[r][j] = _mm512_fmadd_ps(wr, unsafe { _mm512_loadu_ps(v[16 * j..].as_ptr()) }, acc[r][j]);
                }
            }
        }
        for (r, out) in outs.iter_mut().enumerate() {
            for j in 0..regs {
                // SAFETY: writes 16 of the `16 * regs` floats from column c.
                unsafe { _mm512_storeu_ps(out[c + 16 * j..].as_mut_ptr(), acc[r][j]) };
            }
        }
    }
    for (r, out) in outs.iter_mut().enumerate() {
        let tail = &mut out[whole..];
        tail.fill(0.0);
        for (i, v) in values.iter().enumerate() {
            for (o, &v) in tail.iter_mut().zip(&v[whole..]) {
                *o = w[r][i].mul_add(v, *o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x % 20001) as f32 / 10000.0 - 1.0
            })
            .collect()
    }

    /// Rows with causal and windowed ranges, some empty, with and without sinks, at head
    /// sizes with and without a tail: every output equals the one-row path bit for bit.
    #[test]
    fn tiles_match_the_one_row_path_bit_for_bit() {
        for (d, vd) in [(256, 256), (64, 48), (40, 70), (576, 512)] {
            let n_keys = 37;
            let (k, v) = (values(n_keys * d, 1), values(n_keys * vd, 2));
            let key = |p: usize| &k[p * d..(p + 1) * d];
            let value = |p: usize| &v[p * vd..(p + 1) * vd];
            let qs: Vec<Vec<f32>> = (0..11).map(|r| values(d, 10 + r)).collect();
            let rows: Vec<QueryRow> = qs
                .iter()
                .enumerate()
                .map(|(r, q)| {
                    let end = (20 + 3 * r).min(n_keys);
                    let start = if r % 3 == 0 { 0 } else { end.saturating_sub(9 + r) };
                    let keys = if r == 5 { 7..7 } else { start..end };
                    QueryRow { q, keys, sink: (r % 2 == 1).then_some(0.25 * r as f32) }
                })
                .collect();
            let mut got = vec![vec![f32::NAN; vd]; rows.len()];
            let mut outs: Vec<&mut [f32]> = got.iter_mut().map(|o| o.as_mut_slice()).collect();
            attend_rows(&rows, key, value, 0.125, &mut outs);
            for (row, got) in rows.iter().zip(&got) {
                let mut want = vec![f32::NAN; vd];
                attend_one(row, key, value, 0.125, &mut want);
                let (g, w): (Vec<u32>, Vec<u32>) =
                    (got.iter().map(|x| x.to_bits()).collect(), want.iter().map(|x| x.to_bits()).collect());
                assert_eq!(g, w, "d {d}, vd {vd}, keys {:?}", row.keys);
            }
        }
    }
}
