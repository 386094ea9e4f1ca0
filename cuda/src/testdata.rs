//! Deterministic random inputs for the GPU checks (`turbine-gpu-check` here and the root
//! crate's `turbine-gpu-e2e`): the same weights on both sides of each comparison.

use turbine_cpu::GgmlType;

/// A xorshift generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// In [−1, 1], in steps of 1e-4.
    pub fn float(&mut self) -> f32 {
        (self.next() % 20001) as f32 / 10000.0 - 1.0
    }

    pub fn floats(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.float()).collect()
    }

    /// In 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Random blocks of `ty` with small finite scales; finite values for the float types.
pub fn random_weights(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    match ty {
        GgmlType::F32 => return rng.floats(rows * cols).iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => {
            return rng.floats(rows * cols).iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        }
        GgmlType::BF16 => {
            return rng.floats(rows * cols).iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        }
        _ => {}
    }
    let row_bytes = ty.row_bytes(cols).unwrap_or(0);
    let mut w: Vec<u8> = (0..rows * row_bytes).map(|_| rng.next() as u8).collect();
    for block in w.chunks_mut(ty.type_size()) {
        let d = half::f16::from_f32(0.01 + (rng.next() % 100) as f32 / 1e4).to_le_bytes();
        match ty {
            GgmlType::MXFP4 => block[0] = 118 + (rng.next() % 8) as u8,
            GgmlType::Q6_K => block[208..210].copy_from_slice(&d),
            GgmlType::Q4_K => {
                block[..2].copy_from_slice(&d);
                block[2..4].copy_from_slice(&half::f16::from_f32(0.003).to_le_bytes());
            }
            _ => block[..2].copy_from_slice(&d),
        }
    }
    w
}
