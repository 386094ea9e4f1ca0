//! Choosing where a model runs (`--device`), and the offload that runs a model on another
//! backend through a host backend (how `--device cuda` runs on a GPU). Without a GPU the
//! device stands in as a second CPU backend: the offload's cache mirroring is the same code,
//! so the logits must be the direct model's bit for bit, on the default model and on every
//! synthetic architecture. (The CUDA backend itself is compared with the CPU on a GPU by
//! `turbine-gpu-e2e`.)

#[allow(dead_code)] // each test binary uses part of the shared helpers
mod common;

use common::synthetic;
use std::path::Path;
use turbine::engine::backend::cpu::CpuBackend;
use turbine::engine::backend::Backend;
use turbine::engine::generate::{Device, LoadedModel};
use turbine::engine::model::Batch;
use turbine::engine::EngineError;

/// Two prompts fed together (logits of every position), then `steps` greedy tokens of
/// both decoded together; then the first sequence is cleared and refilled with the second
/// prompt, so its slot's old blocks must be gone on the device too.
fn run(m: &LoadedModel<CpuBackend>, steps: usize) -> (Vec<f32>, Vec<Vec<u32>>, Vec<f32>) {
    let prompts = [vec![1u32, 100, 2000, 300, 41, 5000, 60, 7], vec![2, 99, 812, 12]];
    let mut kv = m.backend.new_kv(&m.arch.kv_spec(64, prompts.len()));
    let (logits, tokens) = common::prompts_then_greedy(m, &mut kv, &prompts, steps);
    turbine::engine::backend::KvCache::clear(&mut kv, 0);
    let refill = Batch::for_sequence(0, 0, &prompts[1], false);
    let again = m.arch.forward(&m.backend, &refill, &mut kv).expect("refilled slot");
    (logits, tokens, again.data)
}

fn check(path: &Path) {
    let direct = LoadedModel::load(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let offloaded = LoadedModel::load_offloaded(path, CpuBackend::default())
        .unwrap_or_else(|e| panic!("{}: offloaded: {e}", path.display()));
    let (want, got) = (run(&direct, 5), run(&offloaded, 5));
    let same = |a: &[f32], b: &[f32]| a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same(&got.0, &want.0), "{}: prompt logits differ", path.display());
    assert_eq!(got.1, want.1, "{}: greedy tokens", path.display());
    assert!(same(&got.2, &want.2), "{}: logits after clearing a slot differ", path.display());
    // The host keeps no weights of its own: they are the device's.
    assert_eq!(offloaded.backend.weight_bytes().covered, 0);
}

#[test]
fn an_offloaded_model_is_the_direct_model() {
    check(&common::default_model_path());
    for name in ["llama-q8_0", "qwen3moe-q8_0", "gpt-oss-mxfp4", "deepseek2-q8_0"] {
        check(&synthetic(&format!("{name}.gguf")));
    }
}

#[test]
fn embeddings_of_an_offloaded_model_are_the_direct_models() {
    let path = common::default_model_path();
    let direct = LoadedModel::load(&path).expect("model");
    let offloaded = LoadedModel::load_offloaded(&path, CpuBackend::default()).expect("offloaded model");
    let tokens = direct.tokenizer.encode("Embeddings through the offload.", true, true);
    assert_eq!(offloaded.embed(&tokens).expect("offloaded"), direct.embed(&tokens).expect("direct"));
}

#[test]
fn devices_parse_and_refuse_what_they_do_not_know() {
    let parse = |s: &str| s.parse::<Device>();
    assert_eq!(parse("cpu"), Ok(Device::Cpu));
    assert_eq!(parse("cuda"), Ok(Device::Cuda(0)));
    assert_eq!(parse("cuda:3"), Ok(Device::Cuda(3)));
    assert_eq!(parse("auto"), Ok(Device::Auto));
    for bad in ["gpu", "cuda:", "cuda:-1", "cuda:x", "CUDA", "cuda:99999999"] {
        let e = parse(bad).expect_err(bad);
        assert!(e.contains(bad) && e.contains("cuda:N"), "{bad}: {e}");
    }
    assert_eq!(Device::Cuda(2).to_string(), "cuda:2");
}

/// This machine has no GPU (and the default build no CUDA backend): asking for one is a
/// clear error naming the device and why, and `auto` runs on the CPU.
#[test]
fn without_a_gpu_cuda_is_refused_and_auto_runs_on_the_cpu() {
    let path = common::default_model_path();
    match LoadedModel::load_on(&path, Device::Cuda(1)) {
        Err(EngineError::NoDevice { device, why }) => {
            assert_eq!(device, "cuda:1");
            assert!(why.contains("CUDA"), "{why}");
        }
        Err(e) => panic!("expected NoDevice, got {e}"),
        Ok(_) => panic!("a model loaded on a GPU on a machine without one"),
    }
    let auto = LoadedModel::load_on(&path, Device::Auto).expect("auto falls back to the CPU");
    let direct = LoadedModel::load(&path).expect("model");
    let batch = Batch::for_sequence(0, 0, &[2, 651, 6037, 576], false);
    let mut kv = auto.backend.new_kv(&auto.arch.kv_spec(16, 1));
    let mut kv2 = direct.backend.new_kv(&direct.arch.kv_spec(16, 1));
    let a = auto.arch.forward(&auto.backend, &batch, &mut kv).expect("auto");
    assert_eq!(a.data, direct.arch.forward(&direct.backend, &batch, &mut kv2).expect("cpu").data);
}
