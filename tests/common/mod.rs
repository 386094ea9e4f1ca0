//! Shared helpers for tests that run the real default model.

use std::path::PathBuf;
use turbine::engine::backend::cpu::{CpuBackend, CpuKv};
use turbine::engine::generate::LoadedModel;
use turbine::engine::model::Batch;
use turbine::engine::sampler::argmax;

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

/// A synthetic model of scripts/synth/ (written by scripts/fetch-test-data.sh): in
/// $TURBINE_SYNTH, else ~/.cache/turbine-synth.
pub fn synthetic(name: &str) -> PathBuf {
    std::env::var_os("TURBINE_SYNTH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/turbine-synth"))
        .join(name)
}

/// Feeds `prompts` together into `kv` (one sequence each, slots 0..), returning the logits
/// of every position, then decodes `steps` greedy tokens of every sequence together.
pub fn prompts_then_greedy(
    m: &LoadedModel<CpuBackend>,
    kv: &mut CpuKv,
    prompts: &[Vec<u32>],
    steps: usize,
) -> (Vec<f32>, Vec<Vec<u32>>) {
    let mut batch = Batch::default();
    for (seq, p) in prompts.iter().enumerate() {
        for (i, &t) in p.iter().enumerate() {
            batch.push(seq, i as u32, t, true);
        }
    }
    let logits = m.arch.forward(&m.backend, &batch, kv).expect("prompts");
    let last_row = |seq: usize| (0..batch.len()).rev().find(|&i| batch.layout.seqs[i] == seq).expect("a row");
    let mut last: Vec<Vec<f32>> = (0..prompts.len()).map(|seq| logits.row(last_row(seq)).to_vec()).collect();
    let mut tokens = vec![Vec::new(); prompts.len()];
    for step in 0..steps {
        let mut b = Batch::default();
        for (seq, p) in prompts.iter().enumerate() {
            let next = argmax(&last[seq]);
            tokens[seq].push(next);
            b.push(seq, (p.len() + step) as u32, next, true);
        }
        let out = m.arch.forward(&m.backend, &b, kv).expect("step");
        last = (0..prompts.len()).map(|seq| out.row(seq).to_vec()).collect();
    }
    (logits.data, tokens)
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
