//! `simd::dot_row_tokens` (one weight row × several tokens, weights decoded once) and
//! `simd::dot_row_packed` (the same over packed activations) give exactly what `vec_dot`
//! gives token by token.

use turbine_cpu::act::QuantizedActs;
use turbine_cpu::dot::vec_dot;
use turbine_cpu::matmul::{matmul_with, WeightView};
use turbine_cpu::simd::{dot_row_tokens, dot_rows_packed, PackedActs, ROW_TOKENS};
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

/// Activations with a spread of magnitudes, including rows whose largest value sits at
/// -127 after quantization.
fn activations(rows: usize, n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..rows * n)
        .map(|_| ((xorshift(&mut s) % 2001) as f32 - 1000.0) / (1.0 + (xorshift(&mut s) % 300) as f32))
        .collect()
}

#[test]
fn packed_tokens_equal_single_token_dots() {
    let packable = [GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::Q8_0, GgmlType::IQ4_NL, GgmlType::MXFP4];
    for isa in Isa::available() {
        for ty in GgmlType::ALL {
            // Whole groups of four blocks, and groups plus 1–3 blocks read unpacked.
            for blocks in [1usize, 4, 7, 8, 20, 23] {
                let n = blocks * ty.block_size();
                let w = random_row(ty, n, 11 + blocks as u64);
                // 13 tokens: a call of 8, one of 4 and one of 1.
                let acts = QuantizedActs::new(ty.act_type(), &activations(13, n, blocks as u64), n);
                let Some(packed) = PackedActs::for_weights(isa, ty, &acts) else {
                    assert!(isa != Isa::Avx512 || !packable.contains(&ty), "{ty} should pack on {isa:?}");
                    continue;
                };
                assert!(isa == Isa::Avx512 && packable.contains(&ty), "{ty} packed on {isa:?}");
                for tokens in [0..13, 3..11, 5..6] {
                    // Two weight rows (the same one twice): outs[token][row].
                    let two = [w.clone(), w.clone()].concat();
                    let mut out = [[f32::NAN; 2]; 13];
                    let mut outs: Vec<&mut [f32]> = out.iter_mut().map(|o| o.as_mut_slice()).collect();
                    dot_rows_packed(ty, n, &two, &acts, &packed, tokens.clone(), &mut outs);
                    for (t, got) in tokens.flat_map(|t| [(t, &out[t][0]), (t, &out[t][1])]) {
                        let want = vec_dot(isa, ty, n, &w, acts.row(t));
                        assert_eq!(got.to_bits(), want.to_bits(), "{ty} {blocks} blocks token {t}: {got} vs {want}");
                    }
                }
            }
        }
    }
}

#[test]
fn a_token_gets_the_same_logits_whatever_the_batch() {
    // The property the scheduler's batch invariance rests on, at the matmul level: row t
    // of a many-token matmul equals the one-token matmul of row t, bit for bit.
    for isa in Isa::available() {
        for ty in GgmlType::ALL {
            let (rows, n) = (37, 5 * ty.block_size());
            let w: Vec<u8> = (0..rows).flat_map(|r| random_row(ty, n, 100 + r as u64)).collect();
            let view = WeightView::new(ty, rows, n, &w).expect("whole rows");
            let x = activations(11, n, 5);
            let mut batched = vec![0f32; 11 * rows];
            matmul_with(isa, &view, &x, 11, &mut batched);
            for t in 0..11 {
                let mut alone = vec![0f32; rows];
                matmul_with(isa, &view, &x[t * n..(t + 1) * n], 1, &mut alone);
                let got: Vec<u32> = batched[t * rows..(t + 1) * rows].iter().map(|v| v.to_bits()).collect();
                let want: Vec<u32> = alone.iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, want, "{ty} on {isa:?}, token {t}");
            }
        }
    }
}
