//! Engine errors: each names the value that was wrong and, where there is one, the limit.

use crate::gguf::GgufError;
use crate::tokenizer::TokenizerError;
use std::fmt;

#[derive(Debug)]
pub enum EngineError {
    Gguf(GgufError),
    Tokenizer(TokenizerError),
    /// The file's `general.architecture` is not one Turbine runs.
    UnsupportedArchitecture(String),
    MissingKey(String),
    MissingTensor(String),
    /// A metadata value that is present but unusable.
    BadValue {
        key: String,
        value: String,
        why: &'static str,
    },
    Shape {
        tensor: String,
        expected: String,
        found: Vec<u64>,
    },
    TokenOutOfRange {
        token: u32,
        n_vocab: usize,
    },
    /// A sequence would grow past the context length.
    ContextFull {
        needed: usize,
        limit: usize,
    },
    /// A batch whose positions or sequence slots do not fit the KV cache.
    BadBatch(String),
    /// A tensor-parallel collective failed (a rank left the group, or ranks disagreed).
    TensorParallel(String),
    /// The KV cache's block pool has too few free blocks for a batch.
    KvCacheFull {
        group: usize,
        needed: usize,
        free: usize,
    },
    ModelNotFound {
        name: String,
        looked_in: String,
    },
    Io {
        path: String,
        error: std::io::Error,
    },
    /// The device a model was asked to run on cannot be used (not built in, no driver, no
    /// such GPU).
    NoDevice {
        device: String,
        why: String,
    },
    /// A compute device failed mid-pass (out of memory, a failed kernel launch).
    Device {
        device: String,
        why: String,
    },
}

impl EngineError {
    pub fn shape(tensor: &str, expected: &str, found: &[u64]) -> EngineError {
        EngineError::Shape { tensor: tensor.to_string(), expected: expected.to_string(), found: found.to_vec() }
    }
}

impl fmt::Display for EngineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EngineError::Gguf(e) => write!(f, "{e}"),
            EngineError::Tokenizer(e) => write!(f, "{e}"),
            EngineError::UnsupportedArchitecture(a) => {
                write!(
                    f,
                    "unsupported model architecture '{a}' (supported: gemma3, llama, qwen2, qwen3, qwen3moe, gpt-oss, deepseek2)"
                )
            }
            EngineError::MissingKey(k) => write!(f, "model file is missing metadata key '{k}'"),
            EngineError::MissingTensor(t) => write!(f, "model file is missing tensor '{t}'"),
            EngineError::BadValue { key, value, why } => {
                write!(f, "metadata '{key}' = {value}: {why}")
            }
            EngineError::Shape { tensor, expected, found } => {
                write!(f, "tensor '{tensor}' has dims {found:?}, expected {expected}")
            }
            EngineError::TokenOutOfRange { token, n_vocab } => {
                write!(f, "token id {token} is out of range (vocabulary size {n_vocab})")
            }
            EngineError::ContextFull { needed, limit } => {
                write!(f, "context full: {needed} tokens needed, context length is {limit}")
            }
            EngineError::BadBatch(why) => write!(f, "invalid batch: {why}"),
            EngineError::TensorParallel(why) => write!(f, "tensor parallelism failed: {why}"),
            EngineError::KvCacheFull { group, needed, free } => {
                write!(f, "KV cache full: {needed} blocks needed in layer group {group}, {free} free")
            }
            EngineError::ModelNotFound { name, looked_in } => {
                write!(f, "model '{name}' not found (looked in {looked_in}); run scripts/fetch-default-model.sh for gemma3:270m or pass a path to a .gguf file")
            }
            EngineError::Io { path, error } => write!(f, "{path}: {error}"),
            EngineError::NoDevice { device, why } => write!(f, "device {device} is not available: {why}"),
            EngineError::Device { device, why } => write!(f, "{device} failed: {why}"),
        }
    }
}

impl std::error::Error for EngineError {}

impl From<GgufError> for EngineError {
    fn from(e: GgufError) -> Self {
        EngineError::Gguf(e)
    }
}

impl From<TokenizerError> for EngineError {
    fn from(e: TokenizerError) -> Self {
        EngineError::Tokenizer(e)
    }
}
