//! Turbine: a kernel-first LLM inference engine.
//!
//! This root crate is what users link (as an rlib, or as `libturbine.a`). It re-exports
//! the engine (GGUF, tokenizer, models, sampler) and the CPU kernels, and exports the C API
//! that `include/turbine.h` declares ([`capi`]).

pub use turbine_cpu as cpu;
#[cfg(feature = "cuda")]
pub use turbine_cuda as cuda;
pub use turbine_engine as engine;

pub mod capi;
