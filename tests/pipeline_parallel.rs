//! Pipeline parallelism in one process: the default model and every synthetic architecture
//! (dense, mixture-of-experts, latent attention) split into 2 and 3 stages of consecutive
//! layers give the whole model's logits bit for bit (the same kernels run on the same rows;
//! a sequence is never split between micro-batches) and its greedy continuation; several
//! sequences in one batch go through as micro-batches with the same result. Stages split
//! over tensor-parallel ranks themselves (`--tp 2 --pp 2`) give the 2-rank model's logits
//! bit for bit.

#[allow(dead_code)] // each test binary uses part of the shared helpers
mod common;

use common::synthetic;
use std::path::Path;
use turbine::engine::backend::cpu::CpuBackend;
use turbine::engine::backend::Backend;
use turbine::engine::generate::LoadedModel;

/// The logits of every position of each of `prompts` (fed together, one sequence each),
/// then `steps` greedy tokens of every sequence decoded together.
fn run(m: &LoadedModel<CpuBackend>, prompts: &[Vec<u32>], steps: usize) -> (Vec<f32>, Vec<Vec<u32>>) {
    let mut kv = m.backend.new_kv(&m.arch.kv_spec(64, prompts.len()));
    common::prompts_then_greedy(m, &mut kv, prompts, steps)
}

/// The pipelines to compare with the whole model: `stages` stages split by weight, and
/// stages at the given layer boundaries.
fn check(path: &Path, stages: &[usize], cuts: &[&[usize]]) {
    let prompts = vec![vec![1u32, 100, 2000, 300, 41, 5000, 60, 7], vec![2, 99, 812, 12], vec![5, 6, 7, 8, 9, 10]];
    let whole = LoadedModel::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let want = run(&whole, &prompts, 5);
    let balanced = stages.iter().map(|&n| (format!("{n} stages"), LoadedModel::load_pipeline(path, n, 1), n));
    let given =
        cuts.iter().map(|c| (format!("stages at {c:?}"), LoadedModel::load_pipeline_at(path, c, 1), c.len() - 1));
    for (what, piped, n) in balanced.chain(given) {
        let piped = piped.unwrap_or_else(|e| panic!("{}: {what}: {e}", path.display()));
        let got = run(&piped, &prompts, 5);
        let same = got.0.len() == want.0.len() && got.0.iter().zip(&want.0).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{}: {what}: logits differ", path.display());
        assert_eq!(got.1, want.1, "{}: {what}: greedy tokens", path.display());
        assert_eq!(piped.arch.info().rank_weight_bytes.len(), n);
    }
}

/// Stages over 2 tensor-parallel ranks each against the model over 2 ranks alone: the
/// same shares of the same layers, so the same logits bit for bit.
fn check_split_stages(path: &Path, stages: usize, cuts: &[&[usize]]) {
    let prompts = vec![vec![1u32, 100, 2000, 300, 41, 5000, 60, 7], vec![2, 99, 812, 12], vec![5, 6, 7, 8, 9, 10]];
    let split = LoadedModel::load_split(path, 2, 1).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let want = run(&split, &prompts, 5);
    let balanced = std::iter::once((format!("{stages} stages"), LoadedModel::load_pipeline_split(path, stages, 2, 1)));
    let given = cuts.iter().map(|c| (format!("stages at {c:?}"), LoadedModel::load_pipeline_split_at(path, c, 2, 1)));
    for (what, piped) in balanced.chain(given) {
        let piped = piped.unwrap_or_else(|e| panic!("{}: {what}: {e}", path.display()));
        let got = run(&piped, &prompts, 5);
        let same = got.0.len() == want.0.len() && got.0.iter().zip(&want.0).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{}: {what} over 2 ranks: logits differ", path.display());
        assert_eq!(got.1, want.1, "{}: {what} over 2 ranks: greedy tokens", path.display());
    }
}

#[test]
fn stages_over_tensor_parallel_ranks_are_the_split_model() {
    check_split_stages(&common::default_model_path(), 2, &[&[0, 9, 18]]);
    check_split_stages(&synthetic("qwen3moe-q8_0.gguf"), 2, &[&[0, 1, 2]]);
    // Three layers: a layer per stage, and an empty middle stage.
    for name in ["gpt-oss-mxfp4", "deepseek2-q8_0"] {
        check_split_stages(&synthetic(&format!("{name}.gguf")), 2, &[&[0, 1, 2, 3], &[0, 2, 2, 3]]);
    }
}

#[test]
fn the_default_model_in_stages_is_the_whole_model() {
    check(&common::default_model_path(), &[2, 3], &[&[0, 9, 18], &[0, 5, 11, 18]]);
}

#[test]
fn every_synthetic_architecture_in_stages_is_the_whole_model() {
    for name in ["llama-q8_0", "qwen2-f32", "qwen3-q8_0", "qwen3moe-q8_0"] {
        check(&synthetic(&format!("{name}.gguf")), &[2], &[&[0, 1, 2]]);
    }
    // Three layers: a layer per stage, and an empty middle stage.
    for name in ["gpt-oss-mxfp4", "gpt-oss-f32", "deepseek2-q8_0", "deepseek2-f32"] {
        check(&synthetic(&format!("{name}.gguf")), &[2], &[&[0, 1, 2, 3], &[0, 2, 2, 3]]);
    }
}

/// Stages split by weight: the default model's tied 170 MB output projection outweighs
/// its 18 layers together, so 2 stages are every layer, then the head alone.
#[test]
fn stages_balance_the_weights() {
    let file = turbine::engine::gguf::Gguf::open(&common::default_model_path()).expect("default model");
    assert_eq!(turbine::engine::parallel::stage_cuts(&file, 18, 2), vec![0, 18, 18]);
    let three = turbine::engine::parallel::stage_cuts(&file, 18, 3);
    assert_eq!((three[0], three[3]), (0, 18));
    assert!(three[1] > 0 && three[1] < three[2], "{three:?}");
}

#[test]
fn bad_stages_are_refused() {
    let path = common::default_model_path();
    let err = LoadedModel::load_pipeline(&path, 1, 1).err().expect("refused");
    assert!(err.to_string().contains("at least 2 stages"), "{err}");
    for cuts in [&[0, 9][..], &[1, 9, 18], &[0, 10, 9, 18], &[0, 9, 17]] {
        assert!(LoadedModel::load_pipeline_at(&path, cuts, 1).is_err(), "{cuts:?}");
    }
}
