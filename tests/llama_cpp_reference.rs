//! Whole-model checks of gemma3:270m against llama.cpp fixtures
//! (regenerate with scripts/llama_ref/gen_fixtures.py).
//!
//! Gemma 3 270M Q4_K_M is numerically chaotic under 8-bit activation quantization: a
//! last-bit difference can flip a quantized activation and move logits by tenths. llama.cpp
//! itself, run on the same text with its batched kernels and with its one-token kernels
//! (both in the fixtures), disagrees on the top-1 token at ~5% of positions with a mean
//! |Δlogit| near 0.2. These tests hold Turbine to that noise floor, and check that wherever
//! our greedy choice differs from llama.cpp's, the two candidates were a near-tie.

#[allow(dead_code)] // each test binary uses part of the shared helpers
mod common;

use common::{fixture, ids, load_default_model};
use serde_json::Value;
use turbine::engine::generate::Session;
use turbine::engine::sampler::argmax;

#[test]
fn tokenizer_matches_llama_cpp_on_corpus() {
    let model = load_default_model();
    let fx = fixture("tokenizer/gemma3-270m.json");
    let cases = fx["cases"].as_array().expect("cases");
    let mut bad = Vec::new();
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let got = model.tokenizer.encode(text, true, true);
        if got != ids(&case["ids"]) {
            bad.push(format!("{text:?}\n  llama.cpp {:?}\n  turbine   {got:?}", ids(&case["ids"])));
        }
    }
    println!("{} of {} texts tokenized identically", cases.len() - bad.len(), cases.len());
    assert!(bad.is_empty(), "{} of {} texts differ:\n{}", bad.len(), cases.len(), bad.join("\n"));
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().expect("array").iter().map(|x| x.as_f64().expect("number") as f32).collect()
}

/// Top-1 agreement and |Δ| statistics of one set of logits against the reference.
#[derive(Default, Debug)]
struct Agreement {
    positions: usize,
    top1_same: usize,
    max_d: f32,
    sum_d: f64,
    n_d: usize,
}

impl Agreement {
    fn add(&mut self, top1_same: bool, got: &[f32], want: &[f32]) {
        self.positions += 1;
        self.top1_same += top1_same as usize;
        for (a, b) in got.iter().zip(want) {
            let d = (a - b).abs();
            self.max_d = self.max_d.max(d);
            self.sum_d += d as f64;
            self.n_d += 1;
        }
    }

    fn top1(&self) -> f64 {
        self.top1_same as f64 / self.positions as f64
    }

    fn mean_d(&self) -> f64 {
        self.sum_d / self.n_d as f64
    }

    fn report(&self, what: &str) {
        println!(
            "{what}: top-1 {}/{} = {:.2}%, |Δlogit| max {:.4} mean {:.4} over {} logits",
            self.top1_same,
            self.positions,
            self.top1() * 100.0,
            self.max_d,
            self.mean_d(),
            self.n_d
        );
    }
}

/// How far llama.cpp's one-token kernels move from its batched ones on the logits fixture.
fn llama_cpp_self_noise() -> Agreement {
    let fx = fixture("logits/gemma3-270m.json");
    let mut noise = Agreement::default();
    for want in fx["positions"].as_array().expect("positions") {
        let reference: Vec<f32> = [floats(&want["top_logits"]), floats(&want["probe_logits"])].concat();
        let ub1 = &want["ubatch1"];
        let other: Vec<f32> = [floats(&ub1["top_logits"]), floats(&ub1["probe_logits"])].concat();
        noise.add(ub1["top_id"].as_u64() == want["top_ids"][0].as_u64(), &other, &reference);
    }
    noise
}

#[test]
fn teacher_forced_logits_within_llama_cpp_noise() {
    let model = load_default_model();
    let fx = fixture("logits/gemma3-270m.json");
    let tokens = ids(&fx["tokens"]);
    let probes = ids(&fx["probe_ids"]);
    let positions = fx["positions"].as_array().expect("positions");
    assert!(positions.len() >= 512);
    let mut session = Session::new(&model, tokens.len() + 1);
    let logits = session.feed(&tokens, true).expect("forward");
    let mut ours = Agreement::default();
    for (p, want) in positions.iter().enumerate() {
        let top = ids(&want["top_ids"]);
        let reference: Vec<f32> = [floats(&want["top_logits"]), floats(&want["probe_logits"])].concat();
        let row = logits.row(p);
        let got: Vec<f32> = top.iter().chain(&probes).map(|&id| row[id as usize]).collect();
        ours.add(argmax(row) == top[0], &got, &reference);
    }
    let llama_self = llama_cpp_self_noise();
    ours.report("turbine vs llama.cpp (batched)");
    llama_self.report("llama.cpp one-token kernels vs llama.cpp (batched)");
    assert!(ours.top1() >= 0.90, "top-1 agreement {:.4} is far below llama.cpp's noise", ours.top1());
    assert!(
        ours.top1() >= llama_self.top1() - 0.02,
        "top-1 agreement {:.4} below llama.cpp's self-agreement {:.4} - 0.02",
        ours.top1(),
        llama_self.top1()
    );
    assert!(
        ours.mean_d() <= 1.25 * llama_self.mean_d(),
        "mean |Δlogit| {:.4} above 1.25 × llama.cpp's own {:.4}",
        ours.mean_d(),
        llama_self.mean_d()
    );
}

/// Teacher-forced over llama.cpp's greedy continuations: at every generated position our
/// argmax is llama.cpp's token, or llama.cpp's token is a near-tie: within our best logit
/// by less than the largest move llama.cpp's own logits make between its kernel paths.
#[test]
fn greedy_choices_match_llama_cpp_except_near_ties() {
    let near_tie = llama_cpp_self_noise().max_d;
    let model = load_default_model();
    let fx = fixture("greedy/gemma3-270m.json");
    let (mut same, mut total, mut worst) = (0, 0, 0.0f32);
    for case in fx["cases"].as_array().expect("cases") {
        let prompt = model.tokenizer.encode(case["prompt"].as_str().unwrap(), true, true);
        let want = ids(&case["ids"]);
        let sequence: Vec<u32> = prompt.iter().chain(&want).copied().collect();
        let mut session = Session::new(&model, sequence.len() + 1);
        let logits = session.feed(&sequence, true).expect("forward");
        for (i, &llama_token) in want.iter().enumerate() {
            let row = logits.row(prompt.len() - 1 + i);
            let ours = argmax(row);
            total += 1;
            if ours == llama_token {
                same += 1;
            } else {
                worst = worst.max(row[ours as usize] - row[llama_token as usize]);
            }
        }
    }
    println!("greedy choices: {same}/{total} identical; largest gap where they differ {worst:.3} (near-tie bound {near_tie:.3})");
    assert!(worst < near_tie, "a greedy choice differs from llama.cpp's by a logit gap of {worst}");
    assert!(same as f64 >= 0.95 * total as f64, "only {same}/{total} greedy choices identical");
}

/// The free-running figures, printed for the record: identical 64-token
/// continuations, and llama.cpp's own figure between its two kernel paths. Asserted: the
/// first token of every prompt is identical unless it is a near-tie.
#[test]
fn free_running_greedy_continuations() {
    let near_tie = llama_cpp_self_noise().max_d;
    let model = load_default_model();
    let fx = fixture("greedy/gemma3-270m.json");
    let n_predict = fx["n_predict"].as_u64().unwrap() as usize;
    let cases = fx["cases"].as_array().expect("cases");
    let prefix = |a: &[u32], b: &[u32]| a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let (mut ours_identical, mut self_identical) = (0, 0);
    for case in cases {
        let prompt_text = case["prompt"].as_str().unwrap();
        let prompt = model.tokenizer.encode(prompt_text, true, true);
        let want = ids(&case["ids"]);
        let mut session = Session::new(&model, prompt.len() + n_predict + 1);
        let mut logits = session.feed(&prompt, false).expect("prefill");
        let mut got = Vec::new();
        while got.len() < want.len() {
            let next = argmax(logits.row(0));
            got.push(next);
            if model.tokenizer.is_eog(next) || got.len() == want.len() {
                break;
            }
            if got.len() == 1 && next != want[0] {
                let gap = logits.row(0)[next as usize] - logits.row(0)[want[0] as usize];
                assert!(gap < near_tie, "first token differs by a logit gap of {gap} for {prompt_text:?}");
            }
            logits = session.feed(&[next], false).expect("decode");
        }
        let llama_ub1 = ids(&case["ids_ubatch1"]);
        ours_identical += (got == want) as usize;
        self_identical += (llama_ub1 == want) as usize;
        println!(
            "{:>2}/{} same as llama.cpp (llama.cpp one-token kernels: {:>2}): {prompt_text:?}",
            prefix(&got, &want),
            want.len(),
            prefix(&llama_ub1, &want)
        );
    }
    println!(
        "identical continuations: turbine {ours_identical}/{}, llama.cpp one-token kernels {self_identical}/{}",
        cases.len(),
        cases.len()
    );
}
