//! Scalar quant kernels: dequantization against llama.cpp's gguf-py (fixtures), hand-built
//! K-quant blocks, activation quantizers, scalar dot products against float dots of the
//! dequantized operands, and the parallel matmul against row-by-row dots on every ISA.

use half::f16;
use serde_json::Value;
use turbine_cpu::act::{quantize_row, QuantizedActs};
use turbine_cpu::dequant::dequantize_row;
use turbine_cpu::dot::{vec_dot, vec_dot_scalar};
use turbine_cpu::matmul::{get_row, matmul, matmul_quantized, matmul_with, WeightView};
use turbine_cpu::{ActRow, ActType, GgmlType, Isa, QK_K};

// ---------------------------------------------------------------- helpers

/// splitmix64: small, deterministic, good enough for test data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [lo, hi).
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        lo + (hi - lo) * u
    }

    /// Roughly normal (sum of four uniforms), occasionally a large outlier.
    fn value(&mut self) -> f32 {
        let v: f32 = (0..4).map(|_| self.uniform(-1.0, 1.0)).sum();
        if self.next_u64().is_multiple_of(50) {
            v * 20.0
        } else {
            v
        }
    }

    fn floats(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.value()).collect()
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

fn from_hex(s: &str) -> Vec<u8> {
    assert_eq!(s.len() % 2, 0);
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex")).collect()
}

fn f32s_from_le(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn type_named(name: &str) -> GgmlType {
    GgmlType::ALL.into_iter().find(|t| t.name() == name).expect("known type name")
}

/// Distance in units in the last place (0 for equal bits or two NaNs).
fn ulps(a: f32, b: f32) -> u64 {
    if a.is_nan() && b.is_nan() || a == b {
        return 0;
    }
    let key = |x: f32| {
        let i = x.to_bits() as i32;
        i64::from(if i < 0 { i32::MIN - i } else { i })
    };
    (key(a) - key(b)).unsigned_abs()
}

/// Byte offsets of the f16 scale fields in a block, so random blocks get sane scales.
fn f16_fields(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 | GgmlType::IQ4_NL => &[0],
        GgmlType::Q6_K => &[208],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => &[0, 2],
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        _ => &[],
    }
}

/// A random weight row of `n` elements stored as `ty`.
fn random_weights(ty: GgmlType, n: usize, rng: &mut Rng) -> Vec<u8> {
    match ty {
        GgmlType::F32 => rng.floats(n).iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => rng.floats(n).iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
        GgmlType::BF16 => rng.floats(n).iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
        _ => {
            let mut bytes = rng.bytes(ty.row_bytes(n).expect("whole blocks"));
            for block in bytes.chunks_exact_mut(ty.type_size()) {
                if ty == GgmlType::MXFP4 {
                    block[0] = 120 + (rng.next_u64() % 10) as u8; // 2^-8 .. 2^1
                }
                for &off in f16_fields(ty) {
                    let mag = rng.uniform(0.001, 0.02);
                    let v = if rng.next_u64().is_multiple_of(4) { -mag } else { mag };
                    block[off..off + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
                }
            }
            bytes
        }
    }
}

fn dequant(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    dequantize_row(ty, bytes, &mut out);
    out
}

/// The values an activation row stands for: floats, or q * d of its blocks.
fn act_values(ty: ActType, a: ActRow<'_>, n: usize) -> Vec<f32> {
    let q = match a {
        ActRow::F32(x) => return x.to_vec(),
        ActRow::Quant(q) => q,
    };
    let mut out = Vec::with_capacity(n);
    for b in q.chunks_exact(ty.type_size()) {
        let (d, qs) = match ty {
            ActType::Q8_0 => (f16::from_le_bytes([b[0], b[1]]).to_f32(), &b[2..34]),
            ActType::Q8_1 => (f16::from_le_bytes([b[0], b[1]]).to_f32(), &b[4..36]),
            ActType::Q8_K => (f32::from_le_bytes([b[0], b[1], b[2], b[3]]), &b[4..4 + QK_K]),
            ActType::F32 => unreachable!(),
        };
        out.extend(qs.iter().map(|&q| (q as i8) as f32 * d));
    }
    out
}

/// (sum of w*a, sum of |w*a|) in f64.
fn ref_dot(w: &[f32], a: &[f32]) -> (f64, f64) {
    w.iter().zip(a).fold((0.0, 0.0), |(s, m), (&x, &y)| {
        let p = f64::from(x) * f64::from(y);
        (s + p, m + p.abs())
    })
}

/// A row length of `blocks` blocks of `ty` (odd element counts for float types).
fn cols_for(ty: GgmlType, blocks: usize) -> usize {
    match ty.block_size() {
        1 => 33 * blocks,
        b => b * blocks,
    }
}

// ---------------------------------------------------------------- (a) gguf fixtures

fn fixtures() -> Value {
    serde_json::from_str(include_str!("fixtures/quant_fixtures.json")).expect("fixture json")
}

#[test]
fn dequant_matches_gguf_fixtures() {
    let fx = fixtures();
    let entries = fx["dequant"].as_array().expect("dequant list");
    let mut seen = Vec::new();
    for e in entries {
        let ty = type_named(e["type"].as_str().expect("type"));
        let n = e["n"].as_u64().expect("n") as usize;
        let bytes = from_hex(e["bytes_hex"].as_str().expect("bytes"));
        let expected = f32s_from_le(&from_hex(e["expected_hex"].as_str().expect("expected")));
        assert_eq!(expected.len(), n);
        let got = dequant(ty, &bytes, n);
        for (i, (&g, &x)) in got.iter().zip(&expected).enumerate() {
            assert!(
                ulps(g, x) <= 1,
                "{ty} element {i}: got {g:e} ({:#x}), gguf {x:e} ({:#x})",
                g.to_bits(),
                x.to_bits()
            );
        }
        seen.push(ty);
    }
    for ty in GgmlType::ALL.into_iter().filter(|&t| t != GgmlType::F32) {
        assert!(seen.contains(&ty), "no fixture for {ty}");
    }
}

/// Activation Q8_0 follows llama.cpp's x86 quantizer (id = 127/amax, round half to even),
/// which is what our llama.cpp reference runs; gguf-py follows the portable reference
/// (id = 1/d, round half away from zero). The two may differ only where x·id sits on a
/// rounding tie, and there by one step.
#[test]
fn q8_0_quantize_matches_gguf_except_at_ties() {
    let fx = fixtures();
    let q = &fx["quantize_q8_0"];
    let x = f32s_from_le(&from_hex(q["input_hex"].as_str().expect("input")));
    let expected = from_hex(q["bytes_hex"].as_str().expect("bytes"));
    let mut got = vec![0u8; ActType::Q8_0.row_bytes(x.len())];
    quantize_row(ActType::Q8_0, &x, &mut got);
    for (b, (xs, (g, e))) in x.chunks(32).zip(got.chunks(34).zip(expected.chunks(34))).enumerate() {
        assert_eq!(g[..2], e[..2], "block {b}: scale differs");
        let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        for (i, &v) in xs.iter().enumerate() {
            let (ours, theirs) = (g[2 + i] as i8, e[2 + i] as i8);
            assert_eq!(ours, (v * id).round_ties_even() as i8, "block {b} element {i}: not x86 rounding");
            let scaled = v * id;
            let at_tie = (scaled.abs().fract() - 0.5).abs() < 1e-4;
            assert!(
                ours == theirs || (at_tie && (ours - theirs).abs() == 1),
                "block {b} element {i}: {ours} vs gguf {theirs}"
            );
        }
    }
}

// ---------------------------------------------------------------- (b) hand-built blocks

/// Pack 256 2-bit values the Q2_K / Q3_K way: element 128k + r goes to byte 32k + r % 32
/// at bit 2 * (r / 32).
fn pack_2bit(q: &[u8; 256]) -> [u8; 64] {
    let mut qs = [0u8; 64];
    for (e, &v) in q.iter().enumerate() {
        let r = e % 128;
        qs[32 * (e / 128) + r % 32] |= (v & 3) << (2 * (r / 32));
    }
    qs
}

#[test]
fn q4_k_hand_block() {
    // d = 1.0, dmin = 0.5; 6-bit scales sc and mins m packed by hand (see k4_scale_min):
    let sc = [1u8, 2, 3, 4, 17, 33, 50, 63];
    let m = [0u8, 1, 2, 3, 5, 20, 40, 63];
    let scales = [
        0x41, 0x82, 0xC3, 0xC4, // sc[0..4] | (sc[4..8] >> 4) << 6
        0x00, 0x41, 0x82, 0xC3, // m[0..4] | (m[4..8] >> 4) << 6
        0x51, 0x41, 0x82, 0xFF, // (sc[4..8] & 15) | (m[4..8] & 15) << 4
    ];
    let mut block = vec![0x00, 0x3C, 0x00, 0x38]; // f16 1.0, f16 0.5
    block.extend_from_slice(&scales);
    block.extend((0..128u32).map(|i| ((i % 16) | (((i * 7) % 16) << 4)) as u8));
    let y = dequant(GgmlType::Q4_K, &block, 256);
    for c in 0..4 {
        for l in 0..32 {
            let byte = block[16 + 32 * c + l];
            let (lo, hi) = (f32::from(byte & 15), f32::from(byte >> 4));
            assert_eq!(y[64 * c + l], f32::from(sc[2 * c]) * lo - 0.5 * f32::from(m[2 * c]));
            assert_eq!(y[64 * c + 32 + l], f32::from(sc[2 * c + 1]) * hi - 0.5 * f32::from(m[2 * c + 1]));
        }
    }
}

#[test]
fn q5_k_hand_block() {
    // Same scales as the Q4_K test; 5-bit values q[e] = 11e mod 32.
    let sc = [1u8, 2, 3, 4, 17, 33, 50, 63];
    let m = [0u8, 1, 2, 3, 5, 20, 40, 63];
    let scales = [0x41, 0x82, 0xC3, 0xC4, 0x00, 0x41, 0x82, 0xC3, 0x51, 0x41, 0x82, 0xFF];
    let q: Vec<u8> = (0..256).map(|e| ((e * 11) % 32) as u8).collect();
    let (mut qh, mut qs) = ([0u8; 32], [0u8; 128]);
    for (e, &v) in q.iter().enumerate() {
        let (c, l) = (e / 32, e % 32); // sub-block c: nibble (c % 2) of qs[32 (c / 2) + l]
        qs[32 * (c / 2) + l] |= (v & 15) << (4 * (c % 2));
        qh[l] |= (v >> 4) << c;
    }
    let mut block = vec![0x00, 0x3C, 0x00, 0x38];
    block.extend_from_slice(&scales);
    block.extend_from_slice(&qh);
    block.extend_from_slice(&qs);
    let y = dequant(GgmlType::Q5_K, &block, 256);
    for (e, &v) in q.iter().enumerate() {
        let j = e / 32;
        assert_eq!(y[e], f32::from(sc[j]) * f32::from(v) - 0.5 * f32::from(m[j]), "element {e}");
    }
}

#[test]
fn q6_k_hand_block() {
    // d = 0.25, scales alternate sign; 6-bit values q[e] = 5e mod 64 (minus 32 when used).
    let q: Vec<u8> = (0..256).map(|e| ((e * 5) % 64) as u8).collect();
    let scales: Vec<i8> = (0..16).map(|j| if j % 2 == 0 { j + 1 } else { -j }).collect();
    let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
    for h in 0..2 {
        for l in 0..32 {
            let v = |k: usize| q[128 * h + 32 * k + l];
            ql[64 * h + l] = (v(0) & 15) | ((v(2) & 15) << 4);
            ql[64 * h + l + 32] = (v(1) & 15) | ((v(3) & 15) << 4);
            qh[32 * h + l] = (v(0) >> 4) | ((v(1) >> 4) << 2) | ((v(2) >> 4) << 4) | ((v(3) >> 4) << 6);
        }
    }
    let mut block = ql.to_vec();
    block.extend_from_slice(&qh);
    block.extend(scales.iter().map(|&s| s as u8));
    block.extend_from_slice(&f16::from_f32(0.25).to_le_bytes());
    let y = dequant(GgmlType::Q6_K, &block, 256);
    for (e, &v) in q.iter().enumerate() {
        let want = 0.25 * f32::from(scales[e / 16]) * (f32::from(v) - 32.0);
        assert_eq!(y[e], want, "element {e}");
    }
}

#[test]
fn q3_k_hand_block() {
    // d = 0.5; 6-bit scales sc[j] = 7j + 3 mod 64 (minus 32 when used); 3-bit values
    // q[e] = 3e mod 8 (minus 4 when used).
    let sc: Vec<u8> = (0..16).map(|j| ((7 * j + 3) % 64) as u8).collect();
    let q: [u8; 256] = std::array::from_fn(|e| ((3 * e) % 8) as u8);
    let mut scales = [0u8; 12];
    for (j, &s) in sc.iter().enumerate() {
        scales[j % 8] |= (s & 15) << (4 * (j / 8));
        scales[8 + j % 4] |= (s >> 4) << (2 * (j / 4));
    }
    let mut hmask = [0u8; 32];
    for (e, &v) in q.iter().enumerate() {
        hmask[e % 32] |= (v >> 2) << (e / 32);
    }
    let mut block = hmask.to_vec();
    block.extend_from_slice(&pack_2bit(&q));
    block.extend_from_slice(&scales);
    block.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
    let y = dequant(GgmlType::Q3_K, &block, 256);
    for (e, &v) in q.iter().enumerate() {
        let want = 0.5 * (f32::from(sc[e / 16]) - 32.0) * (f32::from(v) - 4.0);
        assert_eq!(y[e], want, "element {e}");
    }
}

#[test]
fn q2_k_hand_block() {
    // d = 0.5, dmin = 0.25; scale byte j = sc | m << 4; 2-bit values q[e] = e mod 4 xor e/64.
    let sc: Vec<u8> = (0..16).map(|j| ((5 * j + 1) % 16) as u8).collect();
    let m: Vec<u8> = (0..16).map(|j| ((3 * j) % 16) as u8).collect();
    let q: [u8; 256] = std::array::from_fn(|e| ((e % 4) ^ (e / 64)) as u8);
    let mut block: Vec<u8> = sc.iter().zip(&m).map(|(&s, &mm)| s | (mm << 4)).collect();
    block.extend_from_slice(&pack_2bit(&q));
    block.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
    block.extend_from_slice(&f16::from_f32(0.25).to_le_bytes());
    let y = dequant(GgmlType::Q2_K, &block, 256);
    for (e, &v) in q.iter().enumerate() {
        let j = e / 16;
        let want = 0.5 * f32::from(sc[j]) * f32::from(v) - 0.25 * f32::from(m[j]);
        assert_eq!(y[e], want, "element {e}");
    }
}

#[test]
fn mxfp4_scales_and_codebook() {
    // E2M1 values; x = value * 2^(e - 127), and e = 0 / 1 are f32 subnormals.
    let kv = [0.0f32, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];
    // Nibbles 0..16 in the low halves, 15..=0 in the high halves.
    let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
    for (e, scale) in [(127u8, 1.0f32), (129, 4.0), (1, 2f32.powi(-126)), (0, 2f32.powi(-127))] {
        let mut block = vec![e];
        block.extend_from_slice(&qs);
        let y = dequant(GgmlType::MXFP4, &block, 32);
        for j in 0..16 {
            assert_eq!(y[j], kv[j] * scale, "e={e} element {j}");
            assert_eq!(y[j + 16], kv[15 - j] * scale, "e={e} element {}", j + 16);
        }
    }
}

#[test]
fn legacy_hand_blocks() {
    // Q4_0: d = 2, nibble j / 15 - j -> (q - 8) * 2.
    let mut b = f16::from_f32(2.0).to_le_bytes().to_vec();
    b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let y = dequant(GgmlType::Q4_0, &b, 32);
    for j in 0..16 {
        assert_eq!(y[j], (j as f32 - 8.0) * 2.0);
        assert_eq!(y[j + 16], (7.0 - j as f32) * 2.0);
    }
    // Q5_1: d = 1, m = -16; qh bit e set for odd e, so q = nibble + 16 there.
    let mut b = f16::from_f32(1.0).to_le_bytes().to_vec();
    b.extend_from_slice(&f16::from_f32(-16.0).to_le_bytes());
    b.extend_from_slice(&0xAAAA_AAAAu32.to_le_bytes());
    b.extend((0..16u8).map(|j| j | (j << 4)));
    let y = dequant(GgmlType::Q5_1, &b, 32);
    for (e, &v) in y.iter().enumerate() {
        let q = (e % 16) as f32 + if e % 2 == 1 { 16.0 } else { 0.0 };
        assert_eq!(v, q - 16.0, "element {e}");
    }
}

// ---------------------------------------------------------------- activation quantizers

#[test]
fn q8_k_quantizer_bsums_and_scale() {
    let mut rng = Rng(7);
    let mut x = rng.floats(4 * QK_K);
    x[QK_K..2 * QK_K].fill(0.0); // an all-zero block
    x[2 * QK_K + 5] = -90.0; // a block whose largest magnitude is negative
    let mut q = vec![0u8; ActType::Q8_K.row_bytes(x.len())];
    quantize_row(ActType::Q8_K, &x, &mut q);
    for (b, (blk, xs)) in q.chunks_exact(292).zip(x.chunks_exact(QK_K)).enumerate() {
        let d = f32::from_le_bytes([blk[0], blk[1], blk[2], blk[3]]);
        let qs: Vec<i32> = blk[4..260].iter().map(|&v| i32::from(v as i8)).collect();
        for j in 0..16 {
            let bsum = i32::from(i16::from_le_bytes([blk[260 + 2 * j], blk[261 + 2 * j]]));
            assert_eq!(bsum, qs[16 * j..16 * j + 16].iter().sum::<i32>(), "block {b} bsum {j}");
        }
        if b == 1 {
            assert!(d == 0.0 && qs.iter().all(|&v| v == 0), "zero block quantizes to zeros");
            continue;
        }
        // The signed max maps to -127 (d has the opposite sign), everything within d/2.
        let imax = (0..QK_K).fold(0, |m, i| if xs[i].abs() > xs[m].abs() { i } else { m });
        assert_eq!(qs[imax], -127, "block {b}");
        for (i, (&qi, &xi)) in qs.iter().zip(xs).enumerate() {
            assert!((-127..=127).contains(&qi));
            assert!((qi as f32 * d - xi).abs() <= d.abs() * 0.5001, "block {b} element {i}");
        }
    }
    assert!(f32::from_le_bytes([q[584], q[585], q[586], q[587]]) > 0.0, "negative max gives positive d");
}

#[test]
fn q8_0_and_q8_1_quantizers() {
    let mut rng = Rng(11);
    let mut x = rng.floats(5 * 32);
    x[32..64].fill(0.0);
    let mut q0 = vec![0u8; ActType::Q8_0.row_bytes(x.len())];
    let mut q1 = vec![0u8; ActType::Q8_1.row_bytes(x.len())];
    quantize_row(ActType::Q8_0, &x, &mut q0);
    quantize_row(ActType::Q8_1, &x, &mut q1);
    for ((b0, b1), xs) in q0.chunks_exact(34).zip(q1.chunks_exact(36)).zip(x.chunks_exact(32)) {
        // Same d and quants in both layouts.
        assert_eq!(b0[0..2], b1[0..2]);
        assert_eq!(b0[2..34], b1[4..36]);
        let d = f16::from_le_bytes([b0[0], b0[1]]).to_f32();
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(d, f16::from_f32(amax / 127.0).to_f32());
        let sum: i32 = b0[2..34].iter().map(|&v| i32::from(v as i8)).sum();
        let s = f16::from_le_bytes([b1[2], b1[3]]).to_f32();
        assert_eq!(s, f16::from_f32(sum as f32 * (amax / 127.0)).to_f32(), "s = d * sum(q) in f32, then f16");
    }
}

#[test]
fn quantized_acts_rows_match_quantize_row() {
    let mut rng = Rng(3);
    for ty in [ActType::Q8_0, ActType::Q8_1, ActType::Q8_K, ActType::F32] {
        for rows in [1usize, 3, 64] {
            // 64 rows of 512 is past the parallel threshold.
            let cols = 512;
            let x = rng.floats(rows * cols);
            let acts = QuantizedActs::new(ty, &x, cols);
            assert_eq!((acts.ty, acts.rows, acts.cols), (ty, rows, cols));
            for (i, xr) in x.chunks_exact(cols).enumerate() {
                match acts.row(i) {
                    ActRow::F32(f) => assert!(ty == ActType::F32 && f == xr),
                    ActRow::Quant(q) => {
                        let mut want = vec![0u8; ty.row_bytes(cols)];
                        quantize_row(ty, xr, &mut want);
                        assert_eq!(q, &want[..], "{ty:?} row {i} of {rows}");
                    }
                }
            }
        }
    }
    // requantize reuses the buffers for a new shape.
    let mut acts = QuantizedActs::new(ActType::Q8_K, &rng.floats(2 * 256), 256);
    let x = rng.floats(3 * 64);
    acts.requantize(ActType::Q8_0, &x, 64);
    assert_eq!((acts.rows, acts.cols, acts.ty), (3, 64, ActType::Q8_0));
    let mut want = vec![0u8; 68];
    quantize_row(ActType::Q8_0, &x[128..], &mut want);
    assert!(matches!(acts.row(2), ActRow::Quant(q) if q == &want[..]));
}

// ---------------------------------------------------------------- (c) scalar dots

#[test]
fn scalar_dot_matches_float_dot_of_dequantized() {
    let mut rng = Rng(42);
    for ty in GgmlType::ALL {
        for blocks in [1usize, 3, 5] {
            let n = cols_for(ty, blocks);
            let w = random_weights(ty, n, &mut rng);
            let x = rng.floats(n);
            let acts = QuantizedActs::new(ty.act_type(), &x, n);
            let got = vec_dot_scalar(ty, n, &w, acts.row(0));
            let wf = dequant(ty, &w, n);
            let af = act_values(ty.act_type(), acts.row(0), n);
            let (want, mag) = ref_dot(&wf, &af);
            // Q4_1 / Q5_1 add the min through s = f16(d * sum q): ~2^-11 relative.
            let rel = if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) { 1e-3 } else { 2e-6 };
            let err = (f64::from(got) - want).abs();
            assert!(err <= rel * mag + 1e-6, "{ty} x{blocks}: got {got}, want {want} (err {err:e}, |terms| {mag:e})");
            // And the quantized activations stay close to the true float dot.
            let (exact, mag_x) = ref_dot(&wf, &x);
            assert!((f64::from(got) - exact).abs() <= 0.02 * mag_x + 1e-6, "{ty} x{blocks}: {got} vs float {exact}");
        }
    }
}

#[test]
#[should_panic(expected = "activations")]
fn vec_dot_rejects_wrong_activation_format() {
    let w = vec![0u8; 18];
    vec_dot_scalar(GgmlType::Q4_0, 32, &w, ActRow::F32(&[0.0; 32]));
}

#[test]
#[should_panic]
fn dequantize_rejects_partial_block() {
    let mut out = [0f32; 16];
    dequantize_row(GgmlType::Q4_0, &[0u8; 18], &mut out);
}

// ---------------------------------------------------------------- (d) matmul

#[test]
fn matmul_matches_row_by_row_dots_on_every_isa() {
    let mut rng = Rng(1234);
    let rows = 37;
    for ty in GgmlType::ALL {
        let cols = cols_for(ty, if ty.block_size() == QK_K { 2 } else { 3 });
        let data = random_weights(ty, rows * cols, &mut rng);
        let w = WeightView::new(ty, rows, cols, &data).expect("valid view");
        let wf: Vec<Vec<f32>> = (0..rows).map(|r| dequant(ty, w.row(r), cols)).collect();
        for n in [1usize, 3, 7] {
            let x = rng.floats(n * cols);
            let acts = QuantizedActs::new(ty.act_type(), &x, cols);
            for isa in Isa::available() {
                let mut out = vec![f32::NAN; n * rows];
                matmul_with(isa, &w, &x, n, &mut out);
                for t in 0..n {
                    let af = act_values(ty.act_type(), acts.row(t), cols);
                    for r in 0..rows {
                        let got = out[t * rows + r];
                        // Same kernel row by row: identical.
                        assert_eq!(
                            got,
                            vec_dot(isa, ty, cols, w.row(r), acts.row(t)),
                            "{ty} {isa:?} n={n} t={t} r={r}"
                        );
                        // Against the scalar reference: identical for Scalar, close otherwise.
                        let scalar = vec_dot_scalar(ty, cols, w.row(r), acts.row(t));
                        let (_, mag) = ref_dot(&wf[r], &af);
                        let tol = if isa == Isa::Scalar { 0.0 } else { 1e-4 * mag + 1e-6 };
                        assert!(
                            (f64::from(got) - f64::from(scalar)).abs() <= tol,
                            "{ty} {isa:?} n={n}: {got} vs scalar {scalar}"
                        );
                    }
                }
            }
            let mut best = vec![0f32; n * rows];
            let mut with_best = vec![0f32; n * rows];
            matmul(&w, &x, n, &mut best);
            matmul_with(Isa::best(), &w, &x, n, &mut with_best);
            assert_eq!(best, with_best);
        }
    }
}

#[test]
fn matmul_quantized_reuses_activations() {
    let mut rng = Rng(99);
    let (cols, n) = (512, 3);
    let x = rng.floats(n * cols);
    let acts = QuantizedActs::new(ActType::Q8_K, &x, cols);
    for (ty, rows) in [(GgmlType::Q4_K, 5), (GgmlType::Q6_K, 70)] {
        let data = random_weights(ty, rows * cols, &mut rng);
        let w = WeightView::new(ty, rows, cols, &data).expect("valid view");
        let (mut a, mut b) = (vec![0f32; n * rows], vec![0f32; n * rows]);
        matmul_quantized(Isa::best(), &w, &acts, &mut a);
        matmul(&w, &x, n, &mut b);
        assert_eq!(a, b, "{ty}");
    }
}

#[test]
fn weight_view_and_get_row() {
    let mut rng = Rng(5);
    let data = random_weights(GgmlType::Q4_K, 3 * 256, &mut rng);
    assert!(WeightView::new(GgmlType::Q4_K, 3, 256, &data).is_some());
    assert!(WeightView::new(GgmlType::Q4_K, 4, 256, &data).is_none(), "too few bytes");
    assert!(WeightView::new(GgmlType::Q4_K, 3, 128, &data).is_none(), "partial block");
    assert!(WeightView::new(GgmlType::Q4_K, usize::MAX, 256, &data).is_none(), "overflow");
    let w = WeightView::new(GgmlType::Q4_K, 3, 256, &data).expect("valid view");
    assert_eq!(w.row(2), &data[288..432]);
    let mut row = vec![0f32; 256];
    get_row(&w, 1, &mut row);
    assert_eq!(row, dequant(GgmlType::Q4_K, &data[144..288], 256));
}

#[test]
fn matmul_edge_shapes() {
    let data = random_weights(GgmlType::Q8_0, 4 * 32, &mut Rng(8));
    let w = WeightView::new(GgmlType::Q8_0, 4, 32, &data).expect("valid view");
    let mut out: Vec<f32> = Vec::new();
    matmul(&w, &[], 0, &mut out); // no tokens
    let empty = WeightView::new(GgmlType::F32, 0, 8, &[]).expect("empty view");
    matmul(&empty, &[1.0; 16], 2, &mut out); // no weight rows
}
