//! The embedding gather (embed.cu) and greedy argmax (sample.cu).

use cudarc::driver::PushKernelArg;
use turbine_cpu::matmul::{self, WeightView};
use turbine_cpu::GgmlType;

use super::{all, bit_mismatches, cfg, drv, kernel_for, poisoned, random_weights, report_exact, Check, Kernels, Rng};

/// Each table type's rows, gathered and scaled, against the CPU backend's `embed`
/// (`matmul::get_row`, then × scale): the same bits.
pub fn check_embed(k: &Kernels, rng: &mut Rng) -> Check {
    let s = &k.stream;
    let (vocab, cols, scale) = (50usize, 512usize, 25.3f32);
    let ids = vec![3i32, 0, 49, 17, 3];
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ];
    let mut results = Vec::new();
    for ty in types {
        let table = random_weights(ty, vocab, cols, rng);
        let (td, id) = (drv(s.clone_htod(&table))?, drv(s.clone_htod(&ids))?);
        let mut ed = poisoned(k, ids.len() * cols)?;
        let cols_i = cols as i32;
        // SAFETY: the arguments match the kernel's signature and the buffers' sizes; the
        // ids are inside the table.
        drv(unsafe {
            s.launch_builder(k.get(&kernel_for("embed", ty))?)
                .arg(&td)
                .arg(&id)
                .arg(&mut ed)
                .arg(&cols_i)
                .arg(&scale)
                .launch(cfg((ids.len() as u32, 1, 1), (256, 1, 1)))
        })?;
        let view = WeightView::new(ty, vocab, cols, &table).expect("whole rows");
        let mut want = vec![0.0f32; ids.len() * cols];
        for (row, &i) in want.chunks_mut(cols).zip(&ids) {
            matmul::get_row(&view, i as usize, row);
            row.iter_mut().for_each(|v| *v *= scale);
        }
        let got = drv(s.clone_dtoh(&ed))?;
        results.push(report_exact(&format!("embed {ty} {vocab}x{cols}"), bit_mismatches(&got, &want), want.len()));
    }
    all(results)
}

/// The engine's greedy pick (engine/src/sampler.rs `argmax`): the largest value by `>`
/// (NaN never wins), then its first position, 0 when there is none.
fn engine_argmax(x: &[f32]) -> u32 {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    x.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// Rows of a 262 144-token vocabulary (gemma3's) with the cases that decide ties: random,
/// constant, NaN only, −∞ only, a repeated maximum, ±0 with NaNs, the maximum last.
pub fn check_argmax(k: &Kernels, rng: &mut Rng) -> Check {
    let s = &k.stream;
    let cols = 262_144usize;
    let mut rows: Vec<Vec<f32>> = vec![
        rng.floats(cols).iter().map(|v| v * 30.0).collect(),
        vec![2.0; cols],
        vec![f32::NAN; cols],
        vec![f32::NEG_INFINITY; cols],
    ];
    let mut twice = rng.floats(cols);
    twice[200_000] = 5.0;
    twice[1234] = 5.0;
    rows.push(twice);
    let mut zeros: Vec<f32> = (0..cols).map(|i| if i % 3 == 0 { f32::NAN } else { -1.0 - (i % 7) as f32 }).collect();
    zeros[100] = -0.0;
    zeros[50_000] = 0.0;
    rows.push(zeros);
    let mut last = rng.floats(cols);
    last[cols - 1] = 1.5;
    rows.push(last);
    let x: Vec<f32> = rows.concat();
    let xd = drv(s.clone_htod(&x))?;
    let mut out = drv(s.clone_htod(&vec![-1i32; rows.len()]))?;
    let cols_i = cols as i32;
    // SAFETY: the arguments match the kernel's signature and the buffers' sizes.
    drv(unsafe {
        s.launch_builder(k.get("argmax_rows")?)
            .arg(&xd)
            .arg(&mut out)
            .arg(&cols_i)
            .launch(cfg((rows.len() as u32, 1, 1), (1024, 1, 1)))
    })?;
    let got = drv(s.clone_dtoh(&out))?;
    let want: Vec<i32> = rows.iter().map(|r| engine_argmax(r) as i32).collect();
    let mismatches = got.iter().zip(&want).filter(|(g, w)| g != w).count();
    if mismatches > 0 {
        println!("     argmax: got {got:?}, want {want:?}");
    }
    report_exact(&format!("argmax_rows {}x{cols}", rows.len()), mismatches, want.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The copy of the engine's argmax keeps its rules.
    #[test]
    fn engine_argmax_rules() {
        assert_eq!(engine_argmax(&[1.0, 3.0, 3.0, f32::NAN]), 1);
        assert_eq!(engine_argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(engine_argmax(&[f32::NAN, f32::NEG_INFINITY, f32::NEG_INFINITY]), 1);
        assert_eq!(engine_argmax(&[-0.0, 0.0]), 0);
        assert_eq!(engine_argmax(&[]), 0);
    }
}
