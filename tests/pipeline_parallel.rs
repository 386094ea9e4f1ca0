//! Pipeline parallelism in one process: the default model and every synthetic architecture
//! (dense, mixture-of-experts, latent attention) split into 2 and 3 stages of consecutive
//! layers give the whole model's logits bit for bit (the same kernels run on the same rows;
//! a sequence is never split between micro-batches) and its greedy continuation; several
//! sequences in one batch go through as micro-batches with the same result.

#[allow(dead_code)] // each test binary uses part of the shared helpers
mod common;

use std::path::{Path, PathBuf};
use turbine::engine::backend::cpu::CpuBackend;
use turbine::engine::backend::Backend;
use turbine::engine::generate::LoadedModel;
use turbine::engine::model::Batch;
use turbine::engine::sampler::argmax;

fn synthetic(name: &str) -> PathBuf {
    std::env::var_os("TURBINE_SYNTH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/turbine-synth"))
        .join(name)
}

/// The logits of every position of each of `prompts` (fed together, one sequence each),
/// then `steps` greedy tokens of every sequence decoded together.
fn run(m: &LoadedModel<CpuBackend>, prompts: &[Vec<u32>], steps: usize) -> (Vec<f32>, Vec<Vec<u32>>) {
    let mut kv = m.backend.new_kv(&m.arch.kv_spec(64, prompts.len()));
    let mut batch = Batch::default();
    for (seq, p) in prompts.iter().enumerate() {
        for (i, &t) in p.iter().enumerate() {
            batch.push(seq, i as u32, t, true);
        }
    }
    let logits = m.arch.forward(&m.backend, &batch, &mut kv).expect("prompts");
    let mut last: Vec<Vec<f32>> = prompts
        .iter()
        .enumerate()
        .map(|(seq, _)| {
            let row = (0..batch.len()).rev().find(|&i| batch.layout.seqs[i] == seq).expect("a row");
            logits.row(row).to_vec()
        })
        .collect();
    let mut tokens = vec![Vec::new(); prompts.len()];
    for step in 0..steps {
        let mut b = Batch::default();
        for (seq, p) in prompts.iter().enumerate() {
            let next = argmax(&last[seq]);
            tokens[seq].push(next);
            b.push(seq, (p.len() + step) as u32, next, true);
        }
        let out = m.arch.forward(&m.backend, &b, &mut kv).expect("step");
        last = (0..prompts.len()).map(|seq| out.row(seq).to_vec()).collect();
    }
    (logits.data, tokens)
}

fn check(path: &Path, stage_counts: &[usize]) {
    let prompts = vec![vec![1u32, 100, 2000, 300, 41, 5000, 60, 7], vec![2, 99, 812, 12], vec![5, 6, 7, 8, 9, 10]];
    let whole = LoadedModel::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let want = run(&whole, &prompts, 5);
    for &stages in stage_counts {
        let piped = LoadedModel::load_pipeline(path, stages, 1).expect("pipeline");
        let got = run(&piped, &prompts, 5);
        let same = got.0.len() == want.0.len() && got.0.iter().zip(&want.0).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{}: {stages} stages: logits differ", path.display());
        assert_eq!(got.1, want.1, "{}: {stages} stages: greedy tokens", path.display());
        assert_eq!(piped.arch.info().rank_weight_bytes.len(), stages);
    }
}

#[test]
fn the_default_model_in_stages_is_the_whole_model() {
    check(&common::default_model_path(), &[2, 3]);
}

#[test]
fn every_synthetic_architecture_in_stages_is_the_whole_model() {
    for name in
        ["llama-q8_0", "qwen2-f32", "qwen3-q8_0", "qwen3moe-q8_0", "gpt-oss-mxfp4", "deepseek2-q8_0", "deepseek2-f32"]
    {
        check(&synthetic(&format!("{name}.gguf")), &[2]);
    }
    // Three layers, three stages: one layer each.
    check(&synthetic("gpt-oss-f32.gguf"), &[3]);
}

#[test]
fn a_single_stage_is_refused() {
    let err = LoadedModel::load_pipeline(&common::default_model_path(), 1, 1).err().expect("refused");
    assert!(err.to_string().contains("at least 2 stages"), "{err}");
}
