//! SIMD dot products against the scalar reference (`dot::vec_dot_scalar`), for every
//! weight type and every instruction set this CPU runs.
//!
//! Weights are random block bytes whose scale fields are overwritten with finite scales;
//! activations are random floats quantized with `act::quantize_row`, as in inference.
//! Two regimes:
//! * `Mode::Exact`: every scale is a power of two and activations lie on a 2^-7 grid,
//!   small enough (checked per row) that no float operation rounds. Both sides then
//!   compute the exact value and must agree bit for bit, so any wrong integer (a
//!   misplaced bit, scale or offset) fails.
//! * `Mode::Random`: scales with random mantissas over a range of exponents (f16
//!   subnormals and E8M0 edge values included) and activations of mixed magnitudes,
//!   compared with a rounding-error bound.

use half::{bf16, f16};
use turbine_cpu::act::quantize_row;
use turbine_cpu::dot::vec_dot_scalar;
use turbine_cpu::{simd, ActRow, ActType, GgmlType, Isa};

/// SplitMix64: small, deterministic, good enough for test data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in lo..=hi.
    fn int(&mut self, lo: i32, hi: i32) -> i32 {
        lo + self.below((hi - lo + 1) as u64) as i32
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    fn sign(&mut self) -> f32 {
        if self.next() & 1 == 0 {
            1.0
        } else {
            -1.0
        }
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            *b = self.next() as u8;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Exact,
    Random,
}

/// Where a block keeps a float scale.
#[derive(Clone, Copy)]
enum Field {
    F16(usize),
    /// MXFP4's exponent byte: the scale is 2^(e-128) (ggml's E8M0 "half").
    E8M0(usize),
}

/// A quantized type's scale fields, each with the largest |weight| per unit of that
/// scale (|x| ≤ Σ |scale|·max), from the block layouts in ggml-common.h.
fn scale_fields(ty: GgmlType) -> &'static [(Field, f64)] {
    use Field::*;
    match ty {
        GgmlType::Q4_0 => &[(F16(0), 8.0)],
        GgmlType::Q4_1 => &[(F16(0), 15.0), (F16(2), 1.0)],
        GgmlType::Q5_0 => &[(F16(0), 16.0)],
        GgmlType::Q5_1 => &[(F16(0), 31.0), (F16(2), 1.0)],
        GgmlType::Q8_0 => &[(F16(0), 128.0)],
        GgmlType::IQ4_NL => &[(F16(0), 127.0)],
        GgmlType::MXFP4 => &[(E8M0(0), 12.0)],
        // scale ≤ 15 × q ≤ 3; min ≤ 15.
        GgmlType::Q2_K => &[(F16(80), 45.0), (F16(82), 15.0)],
        // |scale - 32| ≤ 32 × |q| ≤ 4.
        GgmlType::Q3_K => &[(F16(108), 128.0)],
        // scale ≤ 63 × q ≤ 15 (Q5_K: 31); min ≤ 63.
        GgmlType::Q4_K => &[(F16(0), 945.0), (F16(2), 63.0)],
        GgmlType::Q5_K => &[(F16(0), 1953.0), (F16(2), 63.0)],
        // |scale| ≤ 128 × |q - 32| ≤ 32.
        GgmlType::Q6_K => &[(F16(208), 4096.0)],
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => &[],
    }
}

fn is_float(ty: GgmlType) -> bool {
    ty.act_type() == ActType::F32
}

fn read_f16(b: &[u8], off: usize) -> f32 {
    f16::from_le_bytes([b[off], b[off + 1]]).to_f32()
}

fn field_value(block: &[u8], field: Field) -> f64 {
    match field {
        Field::F16(off) => read_f16(block, off) as f64,
        Field::E8M0(off) => 2f64.powi(block[off] as i32 - 128),
    }
}

/// A float weight scale: Exact, ±2^-10; Random, ±(1..2)·2^-(6..=13), sometimes an f16
/// subnormal.
fn f16_scale(mode: Mode, rng: &mut Rng) -> f16 {
    match mode {
        Mode::Exact => f16::from_f32(rng.sign() / 1024.0),
        Mode::Random if rng.below(16) == 0 => f16::from_bits(rng.int(1, 0x3ff) as u16 | (rng.next() as u16 & 0x8000)),
        Mode::Random => f16::from_f32(rng.sign() * (1.5 + 0.5 * rng.unit()) * 2f32.powi(-rng.int(6, 13))),
    }
}

/// The MXFP4 exponents of one row. One row in four takes 0..=3, scales 2^-128..=2^-125
/// (E8M0's special case and f32 subnormals); the others Exact, 2^-2..=2^2 and Random,
/// 2^-18..=2^17. A row keeps to one range so the small scales are not drowned out.
fn e8m0_range(mode: Mode, rng: &mut Rng) -> (i32, i32) {
    match mode {
        _ if rng.below(4) == 0 => (0, 3),
        Mode::Exact => (126, 130),
        Mode::Random => (110, 145),
    }
}

/// A weight row of `n` elements of `ty`.
fn weight_row(ty: GgmlType, n: usize, mode: Mode, rng: &mut Rng) -> Vec<u8> {
    if is_float(ty) {
        // Exact: integers of at most 6 bits times 2^-6, exact in every float format.
        let mut value = || match mode {
            Mode::Exact => rng.int(-63, 63) as f32 / 64.0,
            Mode::Random => rng.unit() * 2f32.powi(rng.int(-6, 2)),
        };
        return (0..n)
            .flat_map(|_| match ty {
                GgmlType::F32 => value().to_le_bytes().to_vec(),
                GgmlType::F16 => f16::from_f32(value()).to_le_bytes().to_vec(),
                _ => bf16::from_f32(value()).to_le_bytes().to_vec(),
            })
            .collect();
    }
    let mut w = vec![0u8; ty.row_bytes(n).unwrap()];
    rng.fill(&mut w);
    let (e_lo, e_hi) = e8m0_range(mode, rng);
    for block in w.chunks_exact_mut(ty.type_size()) {
        for &(field, _) in scale_fields(ty) {
            match field {
                Field::F16(off) => block[off..off + 2].copy_from_slice(&f16_scale(mode, rng).to_le_bytes()),
                Field::E8M0(off) => block[off] = rng.int(e_lo, e_hi) as u8,
            }
        }
    }
    w
}

/// Activation floats for `n` elements, in blocks of `block` (the activation format's).
/// Exact: multiples of 2^-7 in [-3, 3]·2^-7 with one ±127·2^-7 per block, so quantizing
/// gives the scale ±2^-7 and the integers themselves. Random: each block at its own
/// magnitude, sometimes all zeros, sometimes with an outlier.
fn activations(n: usize, block: usize, mode: Mode, rng: &mut Rng) -> Vec<f32> {
    let mut x = Vec::with_capacity(n);
    for _ in 0..n.div_ceil(block) {
        let len = block.min(n - x.len());
        let start = x.len();
        match mode {
            Mode::Exact if block == 1 => x.push(rng.int(-127, 127) as f32 / 128.0),
            Mode::Exact => {
                x.extend((0..len).map(|_| rng.int(-3, 3) as f32 / 128.0));
                x[start + rng.below(len as u64) as usize] = rng.sign() * 127.0 / 128.0;
            }
            Mode::Random if block > 1 && rng.below(16) == 0 => x.extend(std::iter::repeat_n(0.0, len)),
            Mode::Random => {
                let scale = 2f32.powi(rng.int(-8, 4));
                x.extend((0..len).map(|_| rng.unit() * scale));
                if block > 1 && rng.below(4) == 0 {
                    x[start + rng.below(len as u64) as usize] *= 50.0;
                }
            }
        }
    }
    x
}

/// |activation| per element, dequantized from the quantized row (or the floats).
fn activation_magnitudes(act: ActType, row: ActRow<'_>) -> Vec<f64> {
    match row {
        ActRow::F32(x) => x.iter().map(|v| v.abs() as f64).collect(),
        ActRow::Quant(q) => {
            let (d_of, qs_at): (fn(&[u8]) -> f64, usize) = match act {
                ActType::Q8_0 => (|b| read_f16(b, 0) as f64, 2),
                ActType::Q8_1 => (|b| read_f16(b, 0) as f64, 4),
                _ => (|b| f32::from_le_bytes(b[0..4].try_into().unwrap()) as f64, 4),
            };
            q.chunks_exact(act.type_size())
                .flat_map(|b| {
                    let d = d_of(b).abs();
                    b[qs_at..qs_at + act.block_size()].iter().map(move |&q| d * (q as i8).abs() as f64)
                })
                .collect()
        }
    }
}

/// Per element, the largest |weight| the block's scales allow (floats: the value).
fn weight_bounds(ty: GgmlType, w: &[u8]) -> Vec<f64> {
    match ty {
        GgmlType::F32 => w.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap()).abs() as f64).collect(),
        GgmlType::F16 => w.chunks_exact(2).map(|b| read_f16(b, 0).abs() as f64).collect(),
        GgmlType::BF16 => w.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32().abs() as f64).collect(),
        _ => w
            .chunks_exact(ty.type_size())
            .flat_map(|b| {
                let bound: f64 = scale_fields(ty).iter().map(|&(f, max)| field_value(b, f).abs() * max).sum();
                std::iter::repeat_n(bound, ty.block_size())
            })
            .collect(),
    }
}

/// The smallest nonzero scale any term of the dot product is a multiple of (Exact mode):
/// the smallest weight scale times the smallest activation scale.
fn exact_quantum(ty: GgmlType, w: &[u8], act_mags: &[f64], a: ActRow<'_>) -> f64 {
    if is_float(ty) {
        return 2f64.powi(-6) * 2f64.powi(-7);
    }
    let w_min = w
        .chunks_exact(ty.type_size())
        .flat_map(|b| scale_fields(ty).iter().map(move |&(f, _)| field_value(b, f).abs()))
        .fold(f64::INFINITY, f64::min);
    let ActRow::Quant(q) = a else { unreachable!() };
    let act = ty.act_type();
    // Every activation block has a ±127 quant, so its scale is its largest magnitude / 127.
    let a_min = act_mags
        .chunks_exact(act.block_size())
        .map(|m| m.iter().cloned().fold(0.0, f64::max) / 127.0)
        .fold(f64::INFINITY, f64::min);
    assert_eq!(q.len(), act.row_bytes(act_mags.len()));
    w_min * a_min
}

/// Runs one row through the scalar reference and every SIMD instruction set.
fn check_row(ty: GgmlType, n: usize, mode: Mode, rng: &mut Rng) -> bool {
    let act = ty.act_type();
    let w = weight_row(ty, n, mode, rng);
    let x = activations(n, act.block_size(), mode, rng);
    let mut q = vec![0u8; act.row_bytes(n)];
    let a = if act == ActType::F32 {
        ActRow::F32(&x)
    } else {
        quantize_row(act, &x, &mut q);
        ActRow::Quant(&q)
    };
    let mags = activation_magnitudes(act, a);
    // An upper bound on Σ |w_i·y_i| (and on every partial sum either side forms).
    let bound: f64 = weight_bounds(ty, &w).iter().zip(&mags).map(|(w, a)| w * a).sum();
    if mode == Mode::Exact {
        let quantum = exact_quantum(ty, &w, &mags, a);
        // Multiples of a power of two q ≥ 2^-149 below 2^24·q are all f32 values.
        assert!(quantum.log2().fract() == 0.0, "{ty}: exact-mode scales are not powers of two");
        assert!(quantum >= 2f64.powi(-149), "{ty}: exact-mode quantum {quantum:e} is below f32's");
        if bound / quantum >= (1u64 << 24) as f64 {
            return false; // a float could round: this size cannot be checked exactly
        }
    }
    let want = vec_dot_scalar(ty, n, &w, a);
    for isa in Isa::available().into_iter().filter(|&isa| isa != Isa::Scalar) {
        let got = simd::vec_dot(isa, ty, n, &w, a).unwrap_or_else(|| panic!("{ty} has no {isa:?} kernel"));
        match mode {
            Mode::Exact => assert!(got == want, "{ty} {isa:?} n={n}: {got} != scalar {want} (exact mode)"),
            Mode::Random => {
                // Both sides form the same integer sums and differ only in the order of
                // float operations. Each is a chain of at most `blocks + 32` roundings
                // (per-block scaling and accumulation, then the lane reduction) of values
                // bounded by `bound`; a rounding errs by at most u·|value| (u = 2^-24), or
                // half the smallest subnormal 2^-150 below f32's normal range. So each side
                // is within chain·(u·bound + 2^-150) of the exact value, and they are within
                // twice that of each other.
                let chain = (n / ty.block_size()) as f64 + 32.0;
                let tol = chain * (f32::EPSILON as f64 * bound + 2f64.powi(-149));
                let diff = (got as f64 - want as f64).abs();
                assert!(diff <= tol, "{ty} {isa:?} n={n}: {got} vs scalar {want}: |diff| {diff:e} > {tol:e}");
            }
        }
    }
    true
}

/// Row lengths: for block types 1, 2, 3, 7, 11, 16 and 33 blocks (odd counts leave
/// AVX-512's two-block step a tail); for float types lengths around the vector widths.
fn lengths(ty: GgmlType) -> Vec<usize> {
    if is_float(ty) {
        vec![1, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 257, 1000]
    } else {
        [1, 2, 3, 7, 11, 16, 33].iter().map(|b| b * ty.block_size()).collect()
    }
}

#[test]
fn simd_matches_scalar_exactly_when_nothing_rounds() {
    let mut rng = Rng(1);
    for ty in GgmlType::ALL {
        let mut checked = 0;
        for n in lengths(ty) {
            for _ in 0..8 {
                checked += check_row(ty, n, Mode::Exact, &mut rng) as usize;
            }
        }
        // At least 1, 2 and 3 blocks always fit in 24 bits; most types fit everything.
        assert!(checked >= 3 * 8, "{ty}: only {checked} rows could be checked exactly");
    }
}

#[test]
fn simd_matches_scalar_within_rounding() {
    let mut rng = Rng(2);
    for ty in GgmlType::ALL {
        for n in lengths(ty) {
            for _ in 0..8 {
                check_row(ty, n, Mode::Random, &mut rng);
            }
        }
    }
}

/// Every type has a kernel for every SIMD instruction set this CPU runs; the scalar
/// "instruction set" has none (the caller uses `dot::vec_dot_scalar`).
#[test]
fn every_simd_isa_has_every_kernel() {
    let isas = Isa::available();
    eprintln!("instruction sets on this CPU: {isas:?}");
    for ty in GgmlType::ALL {
        let n = ty.block_size() * 2;
        let w = vec![0u8; ty.row_bytes(n).unwrap()];
        let x = vec![0f32; n];
        let q = vec![0u8; ty.act_type().row_bytes(n)];
        let a = if is_float(ty) { ActRow::F32(&x) } else { ActRow::Quant(&q) };
        for &isa in &isas {
            let got = simd::vec_dot(isa, ty, n, &w, a);
            if isa == Isa::Scalar {
                assert_eq!(got, None, "{ty}: Isa::Scalar should defer to the scalar reference");
            } else {
                assert_eq!(got, Some(0.0), "{ty}: no {isa:?} kernel");
            }
        }
    }
}
