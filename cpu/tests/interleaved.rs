//! Interleaved weights (16 rows read together): the AVX-512 kernels give exactly the
//! scalar reference's arithmetic, one token gives what many give, rows after the last
//! whole group go through the row kernels, and the results are the dot products the
//! scalar row kernels compute, within float rounding.

use turbine_cpu::act::QuantizedActs;
use turbine_cpu::dot::vec_dot_scalar;
use turbine_cpu::interleaved::{reference, Interleaved};
use turbine_cpu::matmul::{matmul_interleaved, matmul_quantized, WeightView};
use turbine_cpu::{GgmlType, Isa};

fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Random blocks with small finite f16 scales.
fn random_weights(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    let mut data: Vec<u8> = (0..rows * ty.row_bytes(cols).unwrap()).map(|_| xorshift(&mut s) as u8).collect();
    for block in data.chunks_mut(ty.type_size()) {
        let d = 0.01 + (xorshift(&mut s) % 100) as f32 / 1e4;
        let at = if ty == GgmlType::Q6_K { 208 } else { 0 };
        block[at..at + 2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
        if ty == GgmlType::Q4_K {
            block[2..4].copy_from_slice(&half::f16::from_f32(d / 3.0).to_le_bytes());
        }
    }
    data
}

fn random_acts(n: usize, cols: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n * cols).map(|_| (xorshift(&mut s) % 20001) as f32 / 10000.0 - 1.0).collect()
}

const TYPES: [GgmlType; 5] = [GgmlType::Q8_0, GgmlType::Q5_0, GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q6_K];

#[test]
fn interleaved_kernels_match_the_reference_bit_for_bit() {
    if !Interleaved::supports(GgmlType::Q8_0) {
        eprintln!("skipped: this CPU has no AVX-512 VNNI, so no interleaved kernels");
        return;
    }
    for ty in TYPES {
        let k = ty.block_size();
        for (rows, cols) in [(16, k), (48, if k == 32 { 640 } else { 1024 }), (37, 3 * k), (256, 2 * k)] {
            let data = random_weights(ty, rows, cols, rows as u64 * 31 + cols as u64);
            let w = WeightView::new(ty, rows, cols, &data).unwrap();
            let il = Interleaved::new(&w).unwrap();
            assert_eq!(il.rows(), rows / 16 * 16);
            for n in [1usize, 2, 5, 16, 17, 40] {
                let x = random_acts(n, cols, n as u64 + 7);
                let acts = QuantizedActs::new(ty.act_type(), &x, cols);
                let mut got = vec![f32::NAN; n * rows];
                matmul_interleaved(&w, &il, &acts, &mut got);
                let mut want = vec![f32::NAN; n * rows];
                reference(&w, &acts, &mut want);
                // The rows after the last group come from the row kernels.
                let tail = WeightView { rows: rows - il.rows(), data: &data[il.rows() * w.row_bytes()..], ..w };
                let mut tail_out = vec![f32::NAN; n * tail.rows];
                matmul_quantized(Isa::best(), &tail, &acts, &mut tail_out);
                for t in 0..n {
                    for r in 0..rows {
                        let (g, i) = (got[t * rows + r], t * rows + r);
                        let want = if r < il.rows() { want[i] } else { tail_out[t * tail.rows + r - il.rows()] };
                        assert_eq!(g.to_bits(), want.to_bits(), "{ty} {rows}x{cols}, {n} tokens: token {t} row {r}");
                        // And it is the dot product, within rounding.
                        let exact = vec_dot_scalar(ty, cols, w.row(r), acts.row(t));
                        assert!((g - exact).abs() <= 1e-4 * (1.0 + exact.abs()), "{ty}: {g} vs {exact}");
                    }
                }
                // One token alone gives what it gives among many.
                for t in [0, n - 1] {
                    let one = QuantizedActs::new(ty.act_type(), &x[t * cols..(t + 1) * cols], cols);
                    let mut alone = vec![f32::NAN; rows];
                    matmul_interleaved(&w, &il, &one, &mut alone);
                    assert_eq!(
                        alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        got[t * rows..(t + 1) * rows].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{ty}: token {t} alone"
                    );
                }
            }
        }
    }
}

#[test]
fn types_without_an_interleaved_form_and_short_matrices_are_refused() {
    let data = random_weights(GgmlType::Q5_K, 32, 256, 1);
    assert!(Interleaved::new(&WeightView::new(GgmlType::Q5_K, 32, 256, &data).unwrap()).is_none());
    let data = random_weights(GgmlType::Q8_0, 15, 64, 2);
    assert!(Interleaved::new(&WeightView::new(GgmlType::Q8_0, 15, 64, &data).unwrap()).is_none());
}

/// Wide (f64) sums: the column shards of a matrix, summed in f64 and rounded once, give the
/// whole matrix's wide result rounded once, bit for bit; and that is the f32 result within
/// rounding.
#[test]
fn wide_sums_of_column_shards_round_to_the_whole_rows_sums() {
    if !Interleaved::supports(GgmlType::Q8_0) {
        eprintln!("skipped: this CPU has no AVX-512 VNNI, so no interleaved kernels");
        return;
    }
    for ty in TYPES {
        let (rows, k) = (48, ty.block_size());
        let cols = 8 * k;
        let data = random_weights(ty, rows, cols, 99);
        let w = WeightView::new(ty, rows, cols, &data).unwrap();
        let il = Interleaved::new(&w).unwrap();
        let n = 5;
        let x = random_acts(n, cols, 3);
        let acts = QuantizedActs::new(ty.act_type(), &x, cols);
        let mut whole = vec![0.0f64; n * rows];
        turbine_cpu::matmul::matmul_interleaved_wide(&w, &il, &acts, &mut whole);
        let mut narrow = vec![0.0f32; n * rows];
        matmul_interleaved(&w, &il, &acts, &mut narrow);
        for ranks in [2usize, 4] {
            let mut sum = vec![0.0f64; n * rows];
            let (rb, per) = (w.row_bytes(), ty.row_bytes(cols / ranks).unwrap());
            for r in 0..ranks {
                let part: Vec<u8> = data.chunks(rb).flat_map(|row| row[r * per..(r + 1) * per].to_vec()).collect();
                let pw = WeightView::new(ty, rows, cols / ranks, &part).unwrap();
                let pil = Interleaved::new(&pw).unwrap();
                let c = cols / ranks;
                let px: Vec<f32> = x.chunks(cols).flat_map(|row| row[r * c..(r + 1) * c].to_vec()).collect();
                let pacts = QuantizedActs::new(ty.act_type(), &px, c);
                let mut out = vec![0.0f64; n * rows];
                turbine_cpu::matmul::matmul_interleaved_wide(&pw, &pil, &pacts, &mut out);
                sum.iter_mut().zip(&out).for_each(|(s, o)| *s += o);
            }
            for (i, (s, w)) in sum.iter().zip(&whole).enumerate() {
                assert_eq!(
                    (*s as f32).to_bits(),
                    (*w as f32).to_bits(),
                    "{ty}, {ranks} shards, output {i}: {s} vs {w}"
                );
            }
        }
        for (wide, f) in whole.iter().zip(&narrow) {
            assert!((*wide as f32 - f).abs() <= 1e-5 * (1.0 + f.abs()), "{ty}: wide {wide} vs {f}");
        }
    }
}
