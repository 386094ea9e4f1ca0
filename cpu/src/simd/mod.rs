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
    // Checked against the (cached) detection so that a wrong `isa` cannot run
    // instructions the CPU lacks; this costs an atomic load or two per row. The kernels
    // also use F16C to convert f16 scales and weights: `Isa` does not promise it, but
    // every CPU with AVX2 has it.
    let supported = match isa {
        Isa::Scalar => false,
        Isa::Avx2 => Isa::best() != Isa::Scalar,
        Isa::Avx512 => Isa::best() == Isa::Avx512,
    };
    if !supported || !has_f16c() {
        return None;
    }
    let (w, a) = checked_rows(ty, n, w, a);
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `supported` and `has_f16c` say the CPU has the features each kernel
        // enables (Isa::Avx2 = avx2 + fma, Isa::Avx512 = that + avx512f/bw/vl/vnni,
        // both + f16c), and `checked_rows` checked both rows hold exactly `n` elements.
        unsafe {
            match isa {
                Isa::Avx512 => Some(avx512::vec_dot(ty, w, a)),
                _ => Some(avx2::vec_dot(ty, w, a)),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (w, a);
        None
    }
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

/// Checks that `w` and `a` are exactly `n` elements of `ty` and of its activation format
/// (the same contract as `dot::vec_dot_scalar`), so kernels can walk whole blocks.
fn checked_rows<'a>(ty: GgmlType, n: usize, w: &'a [u8], a: ActRow<'a>) -> (&'a [u8], ActRow<'a>) {
    assert_eq!(Some(w.len()), ty.row_bytes(n), "simd::vec_dot: {ty} row of {n} elements has the wrong size");
    match (ty.act_type(), a) {
        (ActType::F32, ActRow::F32(x)) => assert_eq!(x.len(), n, "simd::vec_dot: activation row is not {n} floats"),
        (at, ActRow::Quant(q)) if at != ActType::F32 => assert_eq!(
            q.len(),
            at.row_bytes(n),
            "simd::vec_dot: {at:?} activation row of {n} elements has the wrong size"
        ),
        (at, _) => panic!("simd::vec_dot: {ty} weights take {at:?} activations"),
    }
    (w, a)
}
