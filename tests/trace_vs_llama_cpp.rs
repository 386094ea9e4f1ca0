//! Debugging aid, not part of the suite: compares every named intermediate activation of
//! Gemma 3 with a llama.cpp graph dump, to find where two runs start to differ.
//!   ~/.cache/turbine-llama/llama-ref-dump tensors MODEL ids.txt trace.bin
//!   TURBINE_TRACE=trace.bin TURBINE_TRACE_IDS="2 818 5279" \
//!     cargo test --release --test trace_vs_llama_cpp -- --ignored --nocapture

#[allow(dead_code)] // this debugging aid uses only part of the shared helpers
mod common;

use std::collections::HashMap;
use std::sync::Arc;
use turbine::engine::backend::cpu::CpuBackend;
use turbine::engine::backend::Backend;
use turbine::engine::gguf::Gguf;
use turbine::engine::model::gemma3::Gemma3;
use turbine::engine::model::{Architecture, Batch};

/// name → (ne, data) for the first occurrence of each name in a dump.
fn read_trace(path: &str) -> HashMap<String, (Vec<i64>, Vec<f32>)> {
    let bytes = std::fs::read(path).expect("trace file");
    let mut out = HashMap::new();
    let mut o = 0;
    while o + 96 <= bytes.len() {
        let name = String::from_utf8_lossy(&bytes[o..o + 64]).trim_end_matches('\0').to_string();
        let ne: Vec<i64> =
            (0..4).map(|i| i64::from_le_bytes(bytes[o + 64 + 8 * i..o + 72 + 8 * i].try_into().unwrap())).collect();
        let n = ne.iter().product::<i64>() as usize;
        o += 96;
        let data = bytes[o..o + 4 * n].chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        o += 4 * n;
        // Repeated names (a tensor and its reshapes) get #2, #3... suffixes.
        let mut key = name.clone();
        let mut k = 1;
        while out.contains_key(&key) {
            k += 1;
            key = format!("{name}#{k}");
        }
        out.insert(key, (ne, data));
    }
    out
}

#[test]
#[ignore]
fn trace_vs_llama_cpp() {
    let (Ok(trace), Ok(ids)) = (std::env::var("TURBINE_TRACE"), std::env::var("TURBINE_TRACE_IDS")) else {
        panic!("set TURBINE_TRACE and TURBINE_TRACE_IDS");
    };
    let reference = read_trace(&trace);
    let tokens: Vec<u32> = ids.split_whitespace().map(|t| t.parse().unwrap()).collect();
    let file = Arc::new(Gguf::open(&common::default_model_path()).unwrap());
    let b = CpuBackend::default();
    let model = Gemma3::load(&b, &file).unwrap();
    let mut kv = b.new_kv(&model.kv_spec(tokens.len(), 1));
    let batch = Batch::for_sequence(0, 0, &tokens, true);
    let mut tap = |name: &str, il: usize, act: &<CpuBackend as Backend>::Act| {
        let key = match name.split_once('#') {
            Some((n, k)) => format!("{n}-{il}#{k}"),
            None => format!("{name}-{il}"),
        };
        let Some((_, want)) = reference.get(&key) else { return };
        let got = &act.data;
        if got.len() != want.len() {
            println!("{key}: size {} vs {}", got.len(), want.len());
            return;
        }
        let num: f64 = got.iter().zip(want).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let den: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum();
        let max = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        println!("{key:>20}: nmse {:.3e} max|d| {max:.4e}", num / den.max(1e-30));
        if std::env::var("TURBINE_TRACE_ROWS").is_ok() {
            for (r, (a, b)) in got.chunks(act.cols).zip(want.chunks(act.cols)).enumerate() {
                let m = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
                println!("{:>24} row {r}: max|d| {m:.3e}", "");
            }
        }
    };
    model.forward_traced(&b, &batch, &mut kv, &mut tap).unwrap();
}
