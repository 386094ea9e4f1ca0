//! The engine: GGUF files, tokenizers, model architectures, sampler, KV cache.
//!
//! A request's path: text → [`tokenizer`] → token ids → [`model`] forward passes over
//! the [`backend`] seam (prefill in one batch, then one token per step) → logits →
//! [`sampler`] → token → text. A weight's path: GGUF file → memory map ([`gguf`]) →
//! backend weight (zero-copy on the CPU) → quantized matmul kernels.

pub mod backend;
pub mod error;
pub mod file_type;
pub mod generate;
pub mod gguf;
pub mod json_format;
pub mod kv;
pub mod memory;
pub mod model;
pub mod parallel;
pub mod sampler;
pub mod scheduler;
pub mod store;
pub mod tokenizer;

pub use error::EngineError;
