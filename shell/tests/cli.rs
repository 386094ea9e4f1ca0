//! The `turbine` binary end to end on the default model.

use std::path::PathBuf;
use std::process::{Command, Output};
use turbine::engine::generate::{GenerateOptions, LoadedModel, Session};
use turbine::engine::sampler::SamplerParams;

const MODEL_SHA: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";

fn model_path() -> PathBuf {
    let p = turbine::engine::store::models_dir().join("blobs").join(format!("sha256-{MODEL_SHA}"));
    assert!(p.is_file(), "default model not found at {}: run scripts/fetch-default-model.sh", p.display());
    p
}

fn turbine(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_turbine")).args(args).output().expect("run turbine")
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "turbine failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).expect("utf-8 stdout")
}

#[test]
fn tokenize_prints_ids_as_json() {
    let out = stdout(&turbine(&["tokenize", "-m", "gemma3:270m", "Hello world"]));
    assert_eq!(out.trim(), "[2,9259,1902]");
}

#[test]
fn greedy_generate_prints_the_engines_greedy_text() {
    let prompt = "The capital of France is";
    let out = stdout(&turbine(&["generate", "-m", "gemma3:270m", "-n", "12", "--temperature", "0", prompt]));
    let model = LoadedModel::load(&model_path()).expect("load");
    let ids = model.tokenizer.encode(prompt, true, true);
    let opts = GenerateOptions {
        num_predict: Some(12),
        num_ctx: 64,
        sampler: SamplerParams::greedy(),
        stop: vec![],
        logprobs: None,
        render_special: false,
        format: None,
    };
    let mut want = String::new();
    Session::new(&model, 64)
        .generate(&ids, &opts, |t| {
            want.push_str(t);
            true
        })
        .expect("generate");
    assert_eq!(out, format!("{want}\n"));
    assert!(!want.trim().is_empty());
}

#[test]
fn seeded_sampling_is_reproducible() {
    let args = ["generate", "-m", "gemma3:270m", "-n", "12", "--seed", "7", "--temperature", "1.0", "Once upon a time"];
    assert_eq!(stdout(&turbine(&args)), stdout(&turbine(&args)));
}

#[test]
fn bench_json_has_llama_bench_fields() {
    let out =
        stdout(&turbine(&["bench", "-m", "gemma3:270m", "-p", "8", "-n", "4", "-r", "2", "-t", "1", "-o", "json"]));
    let rows: serde_json::Value = serde_json::from_str(&out).expect("json");
    let rows = rows.as_array().expect("array");
    assert_eq!(rows.len(), 2);
    for (row, (n_prompt, n_gen)) in rows.iter().zip([(8, 0), (0, 4)]) {
        assert_eq!(row["n_prompt"], n_prompt);
        assert_eq!(row["n_gen"], n_gen);
        assert_eq!(row["n_threads"], 1);
        assert_eq!(row["samples_ns"].as_array().unwrap().len(), 2);
        assert!(row["avg_ts"].as_f64().unwrap() > 0.0);
        assert!(row["stddev_ts"].as_f64().unwrap() >= 0.0);
    }
}

/// `-d`: the tests run after that many tokens of every sequence are in the cache.
#[test]
fn bench_at_a_depth() {
    let args =
        ["bench", "-m", "gemma3:270m", "-p", "8", "-n", "4", "-d", "16", "--parallel", "2", "-r", "1", "-t", "1"];
    let rows: serde_json::Value =
        serde_json::from_str(&stdout(&turbine(&[&args[..], &["-o", "json"]].concat()))).expect("json");
    let rows = rows.as_array().expect("array");
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["n_depth"] == 16 && r["avg_ts"].as_f64().unwrap() > 0.0), "{rows:?}");
    let table = stdout(&turbine(&args));
    assert!(table.contains("pp8 @ d16") && table.contains("tg4 ×2 @ d16"), "{table}");
}

#[test]
fn errors_are_reported_not_panics() {
    for args in [
        vec!["generate", "-m", "no-such-model:tag", "hi"],
        vec!["generate", "-m", "/nonexistent/file.gguf", "hi"],
        vec!["generate", "-m", "gemma3:270m", "--num-ctx", "3", "a b c d e f g"],
        vec!["bench", "-m", "gemma3:270m", "-p", "100000"],
        vec!["bench", "-m", "gemma3:270m", "-p", "8", "-d", "40000"],
    ] {
        let o = turbine(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

/// `--device`: without a GPU (and in this build without the CUDA backend), asking for one
/// fails before any model loads, with the device and the reason; a split model on a GPU is
/// refused; `auto` falls back to the CPU and says so, with the CPU's greedy text.
#[test]
fn devices_without_a_gpu() {
    for args in [
        vec!["generate", "-m", "gemma3:270m", "--device", "cuda", "hi"],
        vec!["bench", "-m", "gemma3:270m", "-p", "8", "--device", "cuda:1"],
        vec!["serve", "--device", "cuda"],
    ] {
        let o = turbine(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.starts_with("error: device cuda:") && err.contains("CUDA"), "{args:?}: {err}");
    }
    let o = turbine(&["serve", "--device", "cuda", "--tp", "2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("split models (--tp, --pp, mpirun) run on the CPU"), "{err}");
    let bad = turbine(&["bench", "-m", "gemma3:270m", "--device", "gpu0"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("cuda:N"));

    let generate = |device: &str| {
        turbine(&["generate", "-m", "gemma3:270m", "-n", "8", "--temperature", "0", "--device", device, "Hello"])
    };
    let auto = generate("auto");
    assert!(String::from_utf8_lossy(&auto.stderr).contains("running on the CPU"));
    assert_eq!(stdout(&auto), stdout(&generate("cpu")));
    let bench = stdout(&turbine(&["bench", "-m", "gemma3:270m", "-p", "8", "-n", "0", "-r", "1", "--device", "auto"]));
    assert!(bench.contains("| CPU |"), "{bench}");
}

/// TURBINE_COLLECTIVES outside mpirun: the run goes on in process, and says it was ignored.
#[test]
fn collectives_outside_mpirun_are_noted() {
    let o = Command::new(env!("CARGO_BIN_EXE_turbine"))
        .args(["bench", "-m", "gemma3:270m", "-p", "8", "-n", "0", "-r", "1", "--tp", "2"])
        .env("TURBINE_COLLECTIVES", "nccl")
        .output()
        .expect("run turbine");
    assert!(String::from_utf8_lossy(&o.stderr).contains("TURBINE_COLLECTIVES is for ranks started by mpirun"));
    assert!(stdout(&o).contains("pp8"));
}
