//! The CUDA side of Turbine: kernels written in CUDA C (`kernels/*.cu`), embedded in the
//! binary, compiled at run time by NVRTC for the GPU found (CUBIN for sm_80 or sm_90a,
//! cached on disk), and run through cudarc. Both the driver and NVRTC are loaded
//! dynamically, so this crate builds and its checks run on machines without CUDA; a
//! missing driver, GPU or NVRTC is a [`CudaError`], never a panic.
//!
//! What exists so far: kernels for a forward pass and its readback (activation
//! quantization; quantized matrix-vector products for decode and tiled matrix products
//! for prefill, Q8_0, Q4_0, Q5_0, MXFP4, Q4_K and Q6_K; RMSNorm, RoPE, the gated
//! activations and softmax; the embedding gather for F32, F16, BF16, Q8_0, Q4_0, Q5_0,
//! Q4_K and Q6_K tables; storing K/V rows into the engine's paged cache and flash-decoding
//! attention over it, with GQA, sliding windows, sinks and shared values; MoE routing, the
//! experts' products through an ids array and their weighted combine; greedy argmax),
//! their compile check (`tests/compile.rs`, run in CI against NVRTC 13.0 from PyPI), the
//! GPU check against the CPU code (`turbine-gpu-check`) and the device probe; and
//! [`runtime::Runtime`], an opened GPU with every kernel loaded, which the engine's CUDA
//! backend (`turbine-engine`'s `cuda` feature) drives. None has run on a GPU yet.

pub mod device;
pub mod kernels;
pub mod nvrtc;
pub mod runtime;
pub mod testdata;

/// The cudarc this crate is built on, for the engine's backend (device buffers, launches).
pub use cudarc;
pub use device::Gpu;
pub use runtime::Runtime;

/// Why something CUDA could not be done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CudaError {
    /// libcuda (the driver) could not be loaded: no NVIDIA driver on this machine.
    NoDriver,
    /// libnvrtc could not be loaded (install the CUDA 13 NVRTC, or put it on
    /// LD_LIBRARY_PATH).
    NoNvrtc,
    /// The driver loaded but there is no GPU with this ordinal (`found` GPUs).
    NoDevice { ordinal: usize, found: usize },
    /// The GPU is of an architecture the kernels are not built for.
    Unsupported { name: String, capability: (i32, i32) },
    /// The driver answered with an error (out of memory, a failed launch...).
    Driver(String),
    /// A kernel source did not compile; `log` is NVRTC's.
    Compile { kernel: String, arch: String, log: String },
    /// A kernel compiled but spills registers to local memory.
    Spill { kernel: String, arch: String, detail: String },
}

impl std::fmt::Display for CudaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CudaError::NoDriver => write!(f, "no CUDA driver (libcuda) found on this machine"),
            CudaError::NoNvrtc => {
                write!(f, "NVRTC (libnvrtc.so.13) not found: install CUDA 13's NVRTC or add it to LD_LIBRARY_PATH")
            }
            CudaError::NoDevice { ordinal, found } => write!(f, "no CUDA GPU {ordinal} ({found} found)"),
            CudaError::Unsupported { name, capability: (major, minor) } => {
                write!(f, "{name} (compute capability {major}.{minor}) is not supported: kernels are built for sm_80 and sm_90a")
            }
            CudaError::Driver(e) => write!(f, "CUDA driver error: {e}"),
            CudaError::Compile { kernel, arch, log } => {
                write!(f, "kernel {kernel} does not compile for {arch}:\n{log}")
            }
            CudaError::Spill { kernel, arch, detail } => {
                write!(f, "kernel {kernel} spills registers on {arch}: {detail}")
            }
        }
    }
}

impl std::error::Error for CudaError {}
