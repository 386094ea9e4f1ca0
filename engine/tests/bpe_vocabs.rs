//! Byte-level BPE against llama.cpp: the vocabulary-only GGUFs llama.cpp ships for its own
//! tokenizer tests (`models/ggml-vocab-*.gguf`, from the llama-cpp-python sdist, fetched by
//! `scripts/fetch-vocabs.sh`), each with its test inputs (`.inp`) and the token ids llama.cpp
//! produces for them (`.out`). Every input must give exactly llama.cpp's ids, and decoding
//! them must give the input back.

use std::path::PathBuf;
use turbine_engine::gguf::Gguf;
use turbine_engine::tokenizer::Tokenizer;

/// Where `scripts/fetch-vocabs.sh` puts the files (TURBINE_VOCABS overrides).
fn vocab_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TURBINE_VOCABS") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    home.join(".cache/turbine-vocabs")
}

/// (input, llama.cpp's ids) pairs of one vocabulary's test files.
fn cases(name: &str) -> Vec<(String, Vec<u32>)> {
    let dir = vocab_dir();
    let read = |ext: &str| {
        let path = dir.join(format!("ggml-vocab-{name}.gguf.{ext}"));
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run scripts/fetch-vocabs.sh", path.display()))
    };
    let inputs: Vec<String> = read("inp").split("\n__ggml_vocab_test__\n").map(String::from).collect();
    let outputs: Vec<Vec<u32>> =
        read("out").lines().map(|l| l.split_whitespace().map(|t| t.parse().expect("token id")).collect()).collect();
    // The input file ends with a separator line; its last piece is empty.
    assert!(inputs.len() >= outputs.len(), "{name}: {} inputs, {} outputs", inputs.len(), outputs.len());
    inputs.into_iter().zip(outputs).collect()
}

fn tokenizer(name: &str) -> Tokenizer {
    let path = vocab_dir().join(format!("ggml-vocab-{name}.gguf"));
    let g = Gguf::open(&path).unwrap_or_else(|e| panic!("{}: {e}; run scripts/fetch-vocabs.sh", path.display()));
    Tokenizer::from_gguf(&g).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn check(name: &str) {
    let tok = tokenizer(name);
    let mut failures = Vec::new();
    let all = cases(name);
    assert!(all.len() >= 30, "{name}: only {} cases", all.len());
    for (text, want) in &all {
        let got = tok.encode(text, false, true);
        if &got != want {
            failures.push(format!("{text:?}\n  llama.cpp {want:?}\n  turbine   {got:?}"));
            continue;
        }
        assert_eq!(tok.decode(&got), *text, "{name}: decoding {got:?}");
    }
    assert!(failures.is_empty(), "{name}: {} of {} differ:\n{}", failures.len(), all.len(), failures.join("\n"));
}

#[test]
fn llama3() {
    check("llama-bpe");
}

#[test]
fn qwen2() {
    check("qwen2");
}

#[test]
fn gpt2() {
    check("gpt-2");
}

#[test]
fn deepseek_llm() {
    check("deepseek-llm");
}

#[test]
fn deepseek_coder() {
    check("deepseek-coder");
}

#[test]
fn qwen35() {
    check("qwen35");
}

#[test]
fn starcoder() {
    check("starcoder");
}

#[test]
fn refact() {
    check("refact");
}

#[test]
fn command_r() {
    check("command-r");
}

#[test]
fn falcon() {
    check("falcon");
}

#[test]
fn mpt() {
    check("mpt");
}
