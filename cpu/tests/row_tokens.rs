//! `simd::dot_row_tokens` (one weight row × several tokens, weights decoded once) gives
//! exactly what `vec_dot` gives token by token.

use turbine_cpu::act::QuantizedActs;
use turbine_cpu::dot::vec_dot;
use turbine_cpu::simd::{dot_row_tokens, ROW_TOKENS};
use turbine_cpu::{GgmlType, Isa};

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Random blocks with a small, finite scale in the first bytes (f16 d, or an E8M0
/// exponent near 1 for MXFP4) so every value is finite.
fn random_row(ty: GgmlType, n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    let mut row: Vec<u8> = (0..ty.row_bytes(n).unwrap()).map(|_| xorshift(&mut s) as u8).collect();
    for block in row.chunks_mut(ty.type_size()) {
        match ty {
            GgmlType::MXFP4 => block[0] = 120 + (xorshift(&mut s) % 16) as u8,
            _ => block[..2]
                .copy_from_slice(&half::f16::from_f32(0.01 + (xorshift(&mut s) % 100) as f32 / 1e4).to_le_bytes()),
        }
        if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
            block[2..4].copy_from_slice(&half::f16::from_f32(-0.05).to_le_bytes());
        }
        if ty == GgmlType::Q6_K {
            block[208..210].copy_from_slice(&half::f16::from_f32(0.002).to_le_bytes());
            // d
        }
        if matches!(ty, GgmlType::Q4_K | GgmlType::Q5_K) {
            block[2..4].copy_from_slice(&half::f16::from_f32(0.003).to_le_bytes());
            // dmin
        }
    }
    row
}

#[test]
fn row_tokens_equal_single_token_dots() {
    let fused = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::IQ4_NL,
        GgmlType::MXFP4,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];
    for isa in Isa::available() {
        for ty in GgmlType::ALL {
            for blocks in [1usize, 3, 4, 5, 9, 20] {
                let n = blocks * ty.block_size();
                let w = random_row(ty, n, 7 + blocks as u64);
                let x: Vec<f32> = (0..ROW_TOKENS * n).map(|i| ((i * 7919 % 255) as f32 - 127.0) / 31.0).collect();
                let acts = QuantizedActs::new(ty.act_type(), &x, n);
                let rows = std::array::from_fn(|t| acts.row(t));
                let mut out = [f32::NAN; ROW_TOKENS];
                let done = dot_row_tokens(isa, ty, n, &w, rows, &mut out);
                assert_eq!(done, isa == Isa::Avx512 && fused.contains(&ty), "{ty} on {isa:?}");
                if done {
                    for (t, got) in out.iter().enumerate() {
                        let want = vec_dot(isa, ty, n, &w, acts.row(t));
                        assert_eq!(got.to_bits(), want.to_bits(), "{ty} {blocks} blocks token {t}: {got} vs {want}");
                    }
                }
            }
        }
    }
}
