//! The `llama` architecture against llama.cpp on synthetic Llama 3 models
//! (scripts/synth/make_llama.py writes them: 2 layers of width 64, grouped-query attention,
//! SwiGLU, RoPE with `rope_freqs` divisors, Llama 3's BPE vocabulary; fixtures from
//! scripts/synth/gen_llama_fixtures.py).
//!
//! The F32 model is the strict test: every teacher-forced argmax and every greedy
//! continuation is llama.cpp's, and logits agree to 5e-3 (on logits of magnitude up to
//! ~23; mean |Δ| ~1e-4). The goal is 1e-3: Turbine keeps its KV cache in F16 while
//! llama.cpp ran this model with an F32 cache (LLAMA_REF_KV_F32), the first suspect for
//! the rest. The Q8_0 model is reported (|Δlogit|, argmax agreement) and its greedy
//! continuations must agree for at least their first 8 tokens.

mod common;
use common::{fixture, ids};
use serde_json::Value;
use std::path::PathBuf;
use turbine::engine::backend::cpu::CpuBackend;
use turbine::engine::generate::{LoadedModel, Session};
use turbine::engine::sampler::argmax;

/// Where scripts/fetch-test-data.sh writes the synthetic models (TURBINE_SYNTH overrides).
fn model(name: &str) -> LoadedModel<CpuBackend> {
    let dir = std::env::var_os("TURBINE_SYNTH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/turbine-synth"));
    let path = dir.join(name);
    LoadedModel::load(&path).unwrap_or_else(|e| panic!("{}: {e}; run scripts/fetch-test-data.sh", path.display()))
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

/// Teacher-forced logits over the fixture's ids: (positions whose argmax is llama.cpp's,
/// positions, max |Δ|, mean |Δ|) over each position's top-10 and 64 probe logits.
fn teacher_forced(m: &LoadedModel<CpuBackend>, want: &Value, fx: &Value) -> (usize, usize, f32, f64) {
    let tokens = ids(&fx["ids"]);
    let probes = ids(&fx["probe_ids"]);
    let mut session = Session::new(m, tokens.len() + 1);
    let logits = session.feed(&tokens, true).expect("forward");
    let (mut same, mut max_d, mut sum_d, mut n_d) = (0, 0.0f32, 0.0f64, 0usize);
    for p in 0..tokens.len() {
        let top = ids(&want["top_ids"][p]);
        let reference = [floats(&want["top_logits"][p]), floats(&want["probe_logits"][p])].concat();
        let row = logits.row(p);
        same += usize::from(argmax(row) == top[0]);
        for (&id, r) in top.iter().chain(&probes).zip(&reference) {
            let d = (row[id as usize] - r).abs();
            max_d = max_d.max(d);
            sum_d += f64::from(d);
            n_d += 1;
        }
    }
    (same, tokens.len(), max_d, sum_d / n_d as f64)
}

/// Greedy continuations (32 tokens, or up to an end-of-generation token) of the prompts.
fn greedy(m: &LoadedModel<CpuBackend>, prompts: &[Value], n: usize) -> Vec<Vec<u32>> {
    prompts
        .iter()
        .map(|p| {
            let prompt = m.tokenizer.encode(p.as_str().expect("prompt"), true, true);
            let mut session = Session::new(m, prompt.len() + n + 1);
            let mut logits = session.feed(&prompt, false).expect("prompt");
            let mut out = Vec::new();
            for _ in 0..n {
                let next = argmax(logits.row(0));
                out.push(next);
                if m.tokenizer.is_eog(next) {
                    break;
                }
                logits = session.feed(&[next], false).expect("decode");
            }
            out
        })
        .collect()
}

#[test]
fn f32_model_matches_llama_cpp_strictly() {
    let fx = fixture("synthetic/llama.json");
    let m = model("llama-f32.gguf");
    assert_eq!(m.arch.info().architecture, "llama");
    let (same, n, max_d, mean_d) = teacher_forced(&m, &fx["f32"], &fx);
    println!("F32: argmax {same}/{n}, |Δlogit| max {max_d:.6} mean {mean_d:.6}");
    assert_eq!(same, n, "every teacher-forced argmax is llama.cpp's");
    assert!(max_d <= 5e-3, "logits within 5e-3 of llama.cpp's: max |Δ| {max_d}");
    assert!(mean_d <= 2e-4, "mean |Δ| {mean_d}");
    let prompts = fx["prompts"].as_array().expect("prompts");
    let want: Vec<Vec<u32>> = fx["f32"]["greedy"].as_array().expect("greedy").iter().map(ids).collect();
    assert_eq!(greedy(&m, prompts, 32), want, "32-token greedy continuations");
}

#[test]
fn q8_0_model_stays_close_to_llama_cpp() {
    let fx = fixture("synthetic/llama.json");
    let m = model("llama-q8_0.gguf");
    let (same, n, max_d, mean_d) = teacher_forced(&m, &fx["q8_0"], &fx);
    println!("Q8_0: argmax {same}/{n}, |Δlogit| max {max_d:.4} mean {mean_d:.4}");
    assert!(same * 10 >= n * 9, "argmax agreement {same}/{n}");
    let prompts = fx["prompts"].as_array().expect("prompts");
    let want: Vec<Vec<u32>> = fx["q8_0"]["greedy"].as_array().expect("greedy").iter().map(ids).collect();
    for (got, want) in greedy(&m, prompts, 32).iter().zip(&want) {
        let agree = got.iter().zip(want).take_while(|(a, b)| a == b).count();
        println!("Q8_0 greedy: first {agree} of {} tokens agree", want.len());
        assert!(agree >= 8.min(want.len()), "greedy continuations agree for {agree} tokens: {got:?} vs {want:?}");
    }
}
