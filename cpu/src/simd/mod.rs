//! SIMD dot products (AVX2, AVX-512 / VNNI), chosen at run time. Each one is tested
//! against the scalar reference in `crate::dot`.
//!
//! The kernels follow ggml's x86 `quants.c`: weight quants are unpacked to bytes and
//! multiplied with the int8 activation quants by `maddubs` (AVX2) or VNNI `dpbusd` /
//! `dpwssd` (AVX-512), summed exactly in integers per block, and only then scaled by the
//! block's float scales and accumulated with FMA. The integer sums therefore equal the
//! scalar reference's; only the order of float operations differs.
//!
//! Two assumptions shared with ggml, both met by `act::quantize_row`:
//! * activation quants lie in [-127, 127] (the sign trick that turns signed × signed into
//!   unsigned × signed would get -128 wrong);
//! * Q8_K `bsums` are the sums of their 16 quants (the K-quant kernels take min and
//!   offset corrections from them instead of from the quants).

mod common;
#[cfg(target_arch = "x86_64")]
pub(crate) mod interleaved;
mod packed;

pub use packed::{PackedActs, PackedPair};

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;

use crate::{ActRow, ActType, GgmlType, Isa};

/// The SIMD dot product of one weight row with one activation row, or None when `isa`
/// has no kernel for `ty` (the caller then uses the scalar one).
///
/// `n` is the number of elements; `w` holds `n / block_size` weight blocks and `a` the
/// activations in `ty.act_type()`'s format. Panics when the lengths or the activation
/// format do not match. Every type has an AVX2 and an AVX-512 kernel, so this returns
/// None only for `Isa::Scalar` and for an `isa` this CPU cannot run (including the
/// hypothetical AVX2 CPU without F16C).
pub fn vec_dot(isa: Isa, ty: GgmlType, n: usize, w: &[u8], a: ActRow<'_>) -> Option<f32> {
    let mut out = [0.0f32];
    dot_rows(isa, ty, n, w, a, &mut out).then_some(out[0])
}

/// Dots `out.len()` consecutive weight rows (`w` holds exactly that many rows of `n`
/// elements of `ty`) with one activation row, writing `out[i]` for row i. Checks are made
/// once for the whole range, so this is the call for many rows (decode). Returns false,
/// writing nothing, where [`vec_dot`] would return None.
pub fn dot_rows(isa: Isa, ty: GgmlType, n: usize, w: &[u8], a: ActRow<'_>, out: &mut [f32]) -> bool {
    if !isa_usable(isa) {
        return false;
    }
    let row_bytes = checked_row_bytes(ty, n, a);
    assert_eq!(Some(w.len()), row_bytes.checked_mul(out.len()), "simd::dot_rows: weights are not {} rows", out.len());
    #[cfg(target_arch = "x86_64")]
    {
        for (i, (o, row)) in out.iter_mut().zip(w.chunks_exact(row_bytes.max(1))).enumerate() {
            prefetch(w, i * row_bytes + PREFETCH_BYTES, row_bytes);
            // SAFETY: `isa_usable` says the CPU has the features each kernel enables
            // (Isa::Avx2 = avx2 + fma, Isa::Avx512 = that + avx512f/bw/vl/vnni, both +
            // f16c), and every row and `a` hold exactly `n` elements (checked above).
            *o = unsafe {
                match isa {
                    Isa::Avx512 => avx512::vec_dot(ty, row, a),
                    _ => avx2::vec_dot(ty, row, a),
                }
            };
        }
        true
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, a, out);
        false
    }
}

/// How far ahead of the row being dotted [`dot_rows`] asks the CPU to fetch weights:
/// decode streams each weight once, and the hardware prefetchers stop at every 4 KiB
/// page (measured on the dev machine: tg128 50 → 72 t/s).
pub const PREFETCH_BYTES: usize = 3072;

/// Hints the CPU to bring `len` bytes of `w` from `start` (clamped to `w`) into cache.
#[inline(always)]
pub fn prefetch(w: &[u8], start: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let end = start.saturating_add(len).min(w.len());
        let first = start.min(end);
        let base = w[first..end].as_ptr();
        for off in (0..end - first).step_by(64) {
            // SAFETY: a prefetch is a hint and never faults; the address is inside `w`.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(base.add(off).cast()) };
        }
    }
}

/// Activation rows per [`dot_row_tokens`] call.
pub const ROW_TOKENS: usize = 8;

/// One weight row dotted with [`ROW_TOKENS`] activation rows, each weight block decoded
/// once for all of them (prompt processing). The results are bit-identical to
/// [`vec_dot`] on each row. Returns false, writing nothing, where there is no such kernel
/// (today: AVX-512 has them for the 32-element block types).
pub fn dot_row_tokens(
    isa: Isa,
    ty: GgmlType,
    n: usize,
    w: &[u8],
    a: [ActRow<'_>; ROW_TOKENS],
    out: &mut [f32; ROW_TOKENS],
) -> bool {
    if isa != Isa::Avx512 || !isa_usable(isa) {
        return false;
    }
    assert_eq!(w.len(), checked_row_bytes(ty, n, a[0]), "simd::dot_row_tokens: weight row is not {n} {ty}");
    let ActRow::Quant(first) = a[0] else { return false };
    // The other rows need only the first one's length (same format, checked above).
    let mut rows = [first; ROW_TOKENS];
    for (row, act) in rows.iter_mut().zip(a) {
        match act {
            ActRow::Quant(q) if q.len() == first.len() => *row = q,
            _ => panic!("simd::dot_row_tokens: activation rows differ in format or length"),
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `isa_usable(Avx512)` says the CPU has every feature the kernels enable,
        // and the weight row and all activation rows hold exactly `n` elements.
        match unsafe { avx512::vec_dot_tokens(ty, w, rows) } {
            Some(v) => {
                *out = v;
                true
            }
            None => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (rows, out);
        false
    }
}

/// Activation rows per packed-kernel call (the most; fewer at the end of a range).
pub const PACKED_TOKENS: usize = 8;

/// Consecutive weight rows of `ty` (`n` elements each; `w` holds as many as each
/// `outs[t]` has elements) dotted with activation rows `tokens` of `acts`, through their
/// packed form `packed` (from `PackedActs::for_weights`), writing `outs[t][i]` for weight
/// row i and token t. Bit-identical to [`vec_dot`] on each pair. Checks are made once for
/// the whole call; panics when the shapes disagree.
pub fn dot_rows_packed(
    ty: GgmlType,
    n: usize,
    w: &[u8],
    acts: &crate::act::QuantizedActs,
    packed: &PackedActs,
    tokens: std::ops::Range<usize>,
    outs: &mut [&mut [f32]],
) {
    let n_tok = acts.rows;
    let n_rows = outs.first().map_or(0, |o| o.len());
    if tokens.is_empty() || n_rows == 0 {
        return;
    }
    let row_bytes = checked_row_bytes(ty, n, ActRow::Quant(acts.quant_row(0)));
    assert!(ty.act_type() == ActType::Q8_0 && acts.cols == n, "simd::dot_rows_packed: activations do not fit {n} {ty}");
    assert_eq!(packed.pairs, n / 128 * packed::GROUP_PAIRS, "simd::dot_rows_packed: packing is for another width");
    assert!(tokens.end <= n_tok && packed.rows == n_tok, "simd::dot_rows_packed: tokens out of range");
    assert!(outs.len() == n_tok && outs.iter().all(|o| o.len() == n_rows), "simd::dot_rows_packed: output shape");
    assert_eq!(Some(w.len()), row_bytes.checked_mul(n_rows), "simd::dot_rows_packed: weights are not whole rows");
    assert!(isa_usable(Isa::Avx512), "simd::dot_rows_packed: packed activations exist only with AVX-512");
    #[cfg(target_arch = "x86_64")]
    {
        let mut t = tokens.start;
        while t < tokens.end {
            // SAFETY: AVX-512 is usable (asserted), the weight rows and every activation
            // row hold exactly `n` elements, and every packed row holds the pairs of
            // `n`'s whole groups of four blocks (all checked above).
            t += unsafe {
                match tokens.end - t {
                    left if left >= PACKED_TOKENS => {
                        packed_rows::<PACKED_TOKENS>(ty, w, row_bytes, acts, packed, t, outs)
                    }
                    left if left >= 4 => packed_rows::<4>(ty, w, row_bytes, acts, packed, t, outs),
                    _ => packed_rows::<1>(ty, w, row_bytes, acts, packed, t, outs),
                }
            };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, packed, outs);
        unreachable!("no packed activations off x86-64");
    }
}

/// Tokens t..t + T against every weight row; returns T.
///
/// # Safety
/// As `avx512::vec_dot_packed`, for every row of `w`.
#[cfg(target_arch = "x86_64")]
unsafe fn packed_rows<const T: usize>(
    ty: GgmlType,
    w: &[u8],
    row_bytes: usize,
    acts: &crate::act::QuantizedActs,
    packed: &PackedActs,
    t: usize,
    outs: &mut [&mut [f32]],
) -> usize {
    let p = std::array::from_fn(|k| packed.row(t + k));
    let a = std::array::from_fn(|k| acts.quant_row(t + k));
    // Results gather in row-major blocks, then go out token by token in contiguous runs.
    const BLOCK: usize = 64;
    let mut block = [[0f32; T]; BLOCK];
    for (b, rows) in w.chunks(BLOCK * row_bytes).enumerate() {
        let first_byte = b * BLOCK * row_bytes;
        for (i, (row, v)) in rows.chunks_exact(row_bytes).zip(block.iter_mut()).enumerate() {
            // The first tokens bring the rows from memory; later ones find them in cache.
            if t == 0 {
                prefetch(w, first_byte + i * row_bytes + PREFETCH_BYTES, row_bytes);
            }
            // SAFETY: forwarded from the caller.
            *v = unsafe { avx512::vec_dot_packed(ty, row, p, a) };
        }
        let n = rows.len() / row_bytes;
        for (k, out) in outs[t..t + T].iter_mut().enumerate() {
            for (o, v) in out[b * BLOCK..b * BLOCK + n].iter_mut().zip(&block) {
                *o = v[k];
            }
        }
    }
    T
}

/// Whether kernels for `isa` may run here. Checked against the (cached) detection so
/// that a wrong `isa` cannot run instructions the CPU lacks. The kernels also use F16C to
/// convert f16 scales and weights: `Isa` does not promise it, but every CPU with AVX2
/// has it.
pub(crate) fn isa_usable(isa: Isa) -> bool {
    let supported = match isa {
        Isa::Scalar => false,
        Isa::Avx2 => Isa::best() != Isa::Scalar,
        Isa::Avx512 => Isa::best() == Isa::Avx512,
    };
    supported && has_f16c()
}

fn has_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Bytes of one weight row of `n` elements of `ty`, after checking that `a` is exactly
/// `n` elements of `ty`'s activation format (the same contract as
/// `dot::vec_dot_scalar`), so kernels can walk whole blocks.
fn checked_row_bytes(ty: GgmlType, n: usize, a: ActRow<'_>) -> usize {
    let Some(row_bytes) = ty.row_bytes(n) else { panic!("simd: {n} is not a whole number of {ty} blocks") };
    match (ty.act_type(), a) {
        (ActType::F32, ActRow::F32(x)) => assert_eq!(x.len(), n, "simd: activation row is not {n} floats"),
        (at, ActRow::Quant(q)) if at != ActType::F32 => {
            assert_eq!(q.len(), at.row_bytes(n), "simd: {at:?} activation row of {n} elements has the wrong size")
        }
        (at, _) => panic!("simd: {ty} weights take {at:?} activations"),
    }
    row_bytes
}
