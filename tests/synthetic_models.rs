//! Architectures against llama.cpp on synthetic models (scripts/synth/make_models.py
//! writes them: 2 layers of width 64 with every structural feature of the architecture and
//! its family's real BPE vocabulary; fixtures from scripts/synth/gen_fixtures.py):
//! llama (Llama 3), qwen2, qwen3, qwen3moe, gpt-oss and deepseek2 (DeepSeek-V3).
//!
//! Each F32 model is the strict test: run with an F32 KV cache against llama.cpp with an
//! F32 cache and flash attention off (attention in f32 on both sides), every teacher-forced
//! argmax and every greedy continuation is llama.cpp's and logits agree within 1e-3 (seen:
//! ~7e-6 on logits up to ~23). Each quantized twin (Q8_0; gpt-oss: MXFP4 experts) runs with
//! the default F16 cache against llama.cpp's default; it is reported (|Δlogit|, argmax agreement) and its greedy
//! continuations must agree for at least their first 8 tokens.

#[allow(dead_code)] // each test crate uses some of the helpers
mod common;
use common::{fixture, ids};
use serde_json::Value;
use std::path::PathBuf;
use turbine::engine::backend::cpu::CpuBackend;
use turbine::engine::generate::{LoadedModel, Session};
use turbine::engine::kv::KvType;
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
fn teacher_forced(m: &LoadedModel<CpuBackend>, kv: KvType, want: &Value, fx: &Value) -> (usize, usize, f32, f64) {
    let tokens = ids(&fx["ids"]);
    let probes = ids(&fx["probe_ids"]);
    let mut session = Session::with_kv_type(m, tokens.len() + 1, kv);
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
fn greedy(m: &LoadedModel<CpuBackend>, kv: KvType, prompts: &[Value], n: usize) -> Vec<Vec<u32>> {
    prompts
        .iter()
        .map(|p| {
            let prompt = m.tokenizer.encode(p.as_str().expect("prompt"), true, true);
            let mut session = Session::with_kv_type(m, prompt.len() + n + 1, kv);
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

/// The F32 twin: every teacher-forced argmax and greedy continuation is llama.cpp's.
fn f32_model_matches_llama_cpp_strictly(arch: &str) {
    let fx = fixture(&format!("synthetic/{arch}.json"));
    let m = model(&format!("{arch}-f32.gguf"));
    assert_eq!(m.arch.info().architecture, arch);
    let (same, n, max_d, mean_d) = teacher_forced(&m, KvType::F32, &fx["f32"], &fx);
    println!("{arch} F32: argmax {same}/{n}, |Δlogit| max {max_d:.6} mean {mean_d:.6}");
    assert_eq!(same, n, "every teacher-forced argmax is llama.cpp's");
    assert!(max_d <= 1e-3, "logits within 1e-3 of llama.cpp's: max |Δ| {max_d}");
    assert!(mean_d <= 1e-5, "mean |Δ| {mean_d}");
    let prompts = fx["prompts"].as_array().expect("prompts");
    let want: Vec<Vec<u32>> = fx["f32"]["greedy"].as_array().expect("greedy").iter().map(ids).collect();
    assert_eq!(greedy(&m, KvType::F32, prompts, 32), want, "32-token greedy continuations");
}

/// The quantized twin (`quant`: q8_0, or mxfp4 experts): argmaxes agree at ≥ 90% of
/// positions, greedy for ≥ 8 tokens.
fn quantized_model_stays_close_to_llama_cpp(arch: &str, quant: &str) {
    let fx = fixture(&format!("synthetic/{arch}.json"));
    let m = model(&format!("{arch}-{quant}.gguf"));
    let (same, n, max_d, mean_d) = teacher_forced(&m, KvType::F16, &fx[quant], &fx);
    println!("{arch} {quant}: argmax {same}/{n}, |Δlogit| max {max_d:.4} mean {mean_d:.4}");
    assert!(same * 10 >= n * 9, "argmax agreement {same}/{n}");
    let prompts = fx["prompts"].as_array().expect("prompts");
    let want: Vec<Vec<u32>> = fx[quant]["greedy"].as_array().expect("greedy").iter().map(ids).collect();
    for (got, want) in greedy(&m, KvType::F16, prompts, 32).iter().zip(&want) {
        let agree = got.iter().zip(want).take_while(|(a, b)| a == b).count();
        println!("{arch} {quant} greedy: first {agree} of {} tokens agree", want.len());
        assert!(agree >= 8.min(want.len()), "greedy continuations agree for {agree} tokens: {got:?} vs {want:?}");
    }
}

#[test]
fn llama_f32() {
    f32_model_matches_llama_cpp_strictly("llama");
}

#[test]
fn llama_q8_0() {
    quantized_model_stays_close_to_llama_cpp("llama", "q8_0");
}

#[test]
fn qwen2_f32() {
    f32_model_matches_llama_cpp_strictly("qwen2");
}

#[test]
fn qwen2_q8_0() {
    quantized_model_stays_close_to_llama_cpp("qwen2", "q8_0");
}

#[test]
fn qwen3_f32() {
    f32_model_matches_llama_cpp_strictly("qwen3");
}

#[test]
fn qwen3_q8_0() {
    quantized_model_stays_close_to_llama_cpp("qwen3", "q8_0");
}

#[test]
fn qwen3moe_f32() {
    f32_model_matches_llama_cpp_strictly("qwen3moe");
}

#[test]
fn qwen3moe_q8_0() {
    quantized_model_stays_close_to_llama_cpp("qwen3moe", "q8_0");
}

#[test]
fn gpt_oss_f32() {
    f32_model_matches_llama_cpp_strictly("gpt-oss");
}

#[test]
fn gpt_oss_mxfp4() {
    quantized_model_stays_close_to_llama_cpp("gpt-oss", "mxfp4");
}

#[test]
fn deepseek2_f32() {
    f32_model_matches_llama_cpp_strictly("deepseek2");
}

#[test]
fn deepseek2_q8_0() {
    quantized_model_stays_close_to_llama_cpp("deepseek2", "q8_0");
}

/// Each model's tokenizer gives llama.cpp's ids on llama.cpp's tokenizer test corpus:
/// Llama 3's pre-tokenizer (llama), Qwen2's (qwen2, qwen3, qwen3moe), o200k (gpt-oss)
/// and DeepSeek-V3's (deepseek2), each over its family's vocabulary.
fn tokenizes_like_llama_cpp(arch: &str) {
    let fx = fixture(&format!("synthetic/{arch}.json"));
    let m = model(&format!("{arch}-f32.gguf"));
    let texts = fx["corpus"].as_array().expect("corpus");
    let want = fx["corpus_ids"].as_array().expect("corpus_ids");
    assert_eq!(texts.len(), want.len());
    assert!(texts.len() >= 30, "{} texts", texts.len());
    for (text, want) in texts.iter().zip(want) {
        let text = text.as_str().expect("text");
        assert_eq!(m.tokenizer.encode(text, true, true), ids(want), "{arch}: {text:?}");
    }
}

#[test]
fn tokenizers_match_llama_cpp() {
    for arch in ["llama", "qwen2", "gpt-oss", "deepseek2"] {
        tokenizes_like_llama_cpp(arch);
    }
}

/// Every token of the teacher-forced sequence reaches k experts in every layer, and the
/// router spreads them: no expert of the 16 is left out of all 48 × 4 choices.
#[test]
fn qwen3moe_routes_every_token_to_k_experts() {
    let fx = fixture("synthetic/qwen3moe.json");
    let m = model("qwen3moe-f32.gguf");
    let tokens = ids(&fx["ids"]);
    let mut session = Session::new(&m, tokens.len() + 1);
    session.feed(&tokens, true).expect("forward");
    let stats = m.arch.routing_stats();
    assert_eq!(stats.len(), 2, "two layers");
    for layer in &stats {
        assert_eq!(layer.len(), 16);
        assert_eq!(layer.iter().sum::<u64>(), tokens.len() as u64 * 4, "{layer:?}");
        assert!(layer.iter().all(|&c| c > 0), "{layer:?}");
    }
}

/// Batched vs one token at a time: a prompt fed whole (each expert's matmuls over all the
/// tokens routed to it, the experts side by side) gives the logits of the same tokens fed
/// one by one (one token per expert call), bit for bit, for the MoE and latent-attention
/// models.
#[test]
fn moe_batches_match_one_token_at_a_time() {
    for name in ["qwen3moe-q8_0.gguf", "gpt-oss-mxfp4.gguf", "deepseek2-q8_0.gguf"] {
        let m = model(name);
        let tokens: Vec<u32> = (0..24u32).map(|i| 1000 + i * 37).collect();
        let mut whole = Session::new(&m, 32);
        let batched = whole.feed(&tokens, true).expect("batch");
        let mut single = Session::new(&m, 32);
        let mut max_d = 0.0f32;
        for (p, &t) in tokens.iter().enumerate() {
            let one = single.feed(&[t], false).expect("token");
            let (a, b) = (batched.row(p), one.row(0));
            assert_eq!(argmax(a), argmax(b), "{name}: position {p}");
            max_d = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(max_d, f32::max);
        }
        println!("{name}: batched vs one at a time, max |Δlogit| {max_d}");
        assert_eq!(max_d, 0.0, "{name}: batched and one-at-a-time logits differ");
    }
}

/// A structured output behind a reasoning marker: tokens before `</think>` are sampled
/// freely, the first token after it must begin the document. Logits are made up, so the
/// choice shows which tokens were allowed.
#[test]
fn a_format_after_the_reasoning_starts_with_the_answer() {
    use std::sync::Arc;
    use turbine::engine::generate::{GenerateOptions, Generation, Step};
    use turbine::engine::json_format::JsonFormat;
    use turbine::engine::sampler::SamplerParams;
    let m = model("qwen3-q8_0.gguf");
    let tok = &m.tokenizer;
    let one = |text: &str| {
        let ids = tok.encode(text, false, true);
        assert_eq!(ids.len(), 1, "{text:?} is one token");
        ids[0]
    };
    let (word, brace) = (one("hello"), one("{"));
    // Several tokens in this vocabulary (one in Qwen3's own).
    let close = tok.encode("</think>", false, true);
    let format = JsonFormat::from_request(&serde_json::json!("json")).expect("json").expect("a format");
    let opts = GenerateOptions {
        num_predict: Some(16),
        num_ctx: 64,
        sampler: SamplerParams::greedy(),
        stop: vec![],
        logprobs: None,
        render_special: true,
        format: Some(Arc::new(format.after(close.clone()))),
    };
    let mut gen = Generation::new(tok, &[one("hi")], &opts);
    // Most likely `word`, then `brace`, then everything else.
    let logits = |best: u32| {
        let mut l = vec![0.0f32; tok.n_vocab()];
        l[brace as usize] = 5.0;
        l[best as usize] = 10.0;
        l
    };
    let token = |s: Step| match s {
        Step::Continue { token, .. } => token,
        Step::Finished { reason, text } => panic!("finished early: {reason:?} {text:?}"),
    };
    assert_eq!(token(gen.step(&logits(word), 2)), word, "reasoning is free text");
    for (i, &t) in close.iter().enumerate() {
        assert_eq!(token(gen.step(&logits(t), 3 + i)), t);
    }
    assert_eq!(token(gen.step(&logits(word), 3 + close.len())), brace, "after </think> the answer is JSON");
}
