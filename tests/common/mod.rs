//! Shared helpers for tests that run the real default model.

use std::path::PathBuf;
use turbine::engine::backend::cpu::CpuBackend;
use turbine::engine::generate::LoadedModel;

pub const DEFAULT_MODEL_SHA: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

/// The default model's GGUF: $TURBINE_TEST_MODEL, else the store's gemma3:270m blob.
/// Panics with the command to run when it is missing: these tests must not pass by
/// skipping.
pub fn default_model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("TURBINE_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let p = turbine::engine::store::models_dir().join("blobs").join(format!("sha256-{DEFAULT_MODEL_SHA}"));
    assert!(p.is_file(), "default model not found at {}: run scripts/fetch-default-model.sh", p.display());
    p
}

pub fn load_default_model() -> LoadedModel<CpuBackend> {
    let path = default_model_path();
    LoadedModel::load(&path).unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

pub fn fixture(rel: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(rel);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[allow(dead_code)] // not every test binary reads id fixtures
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("id array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}
