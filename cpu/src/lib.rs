//! CPU kernels. Kernels know nothing of models: they take byte slices in ggml's block
//! layouts, float slices and shapes.
//!
//! Every kernel has a plain scalar version that is the test oracle for the SIMD ones.

pub mod act;
pub mod attention;
pub mod dequant;
pub mod dot;
pub mod half_ops;
pub mod interleaved;
pub mod matmul;
pub mod ops;
pub mod simd;
pub mod types;

pub use types::{ActType, GgmlType, QK, QK_K};

/// One activation row as a dot product consumes it: floats for float weights, or the
/// bytes of quantized blocks (`ActType::Q8_0`, `Q8_1`, `Q8_K`) for quantized weights.
#[derive(Clone, Copy, Debug)]
pub enum ActRow<'a> {
    F32(&'a [f32]),
    Quant(&'a [u8]),
}

/// The instruction set a kernel is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

impl Isa {
    /// The best instruction set this CPU supports (detected once).
    pub fn best() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(Isa::detect)
    }

    fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var_os("TURBINE_FORCE_SCALAR").is_some() {
                return Isa::Scalar;
            }
            if is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
            {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Scalar
    }

    /// Every instruction set this CPU can run, scalar first (for tests).
    pub fn available() -> Vec<Isa> {
        let best = Isa::best();
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&isa| match best {
                Isa::Scalar => isa == Isa::Scalar,
                Isa::Avx2 => isa != Isa::Avx512,
                Isa::Avx512 => true,
            })
            .collect()
    }
}
