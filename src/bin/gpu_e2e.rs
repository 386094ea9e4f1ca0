//! The end-to-end GPU check in one command: first every operation of the backend seam on
//! the CUDA backend against the CPU backend on random inputs (`gpu_e2e/ops.rs`), then each
//! model runs on the CPU backend and on the CUDA backend, and the two are compared on the logits of every prompt position (normalized
//! squared error) and on a greedy continuation (identical tokens, or the first divergence
//! with both sides' logits of the two candidates); then the GPU's decode and prefill speed
//! on the first model, decode beside the device-to-device copy bandwidth measured in the
//! same run. Without a GPU it prints "skipped: no GPU" and exits 0.
//!
//! On a mixture-of-experts model it also checks the CUDA backend's grouped expert path
//! (`Backend::moe_grouped`): that the runs above took it (every decode step of one sequence
//! does, where the experts' type has matvec_id kernels), and that it gives the per-expert
//! path's logits within rounding and its greedy tokens, the per-expert path run on the
//! same GPU with the grouped one switched off.
//!
//!   cargo run --release --features cuda --bin turbine-gpu-e2e [-- OPTIONS]
//!
//! Built with `--features nccl` too, it also runs the first model split over one rank per
//! GPU with its collectives over NCCL, against the in-process group (bit for bit).
//!
//!   --model NAME_OR_PATH  a model to check (repeatable); by default gemma3:270m from the
//!                         store, then the synthetic models present in $TURBINE_SYNTH or
//!                         ~/.cache/turbine-synth (mixture-of-experts ones first)
//!   --tokens N            greedy tokens to compare (32)
//!   --kv f16|f32          the KV cache type of both backends (f16)
//!   --no-perf             skip the speed measurements
//!   --ops-only            only the operations' check
//!   --precompile DIR      compile every kernel for sm_80 and sm_90a into DIR and exit (needs
//!                         NVRTC, not a GPU); on a GPU machine without NVRTC, set
//!                         TURBINE_KERNEL_CACHE=DIR
//!
//! Exit status: 0 when every model found passes (missing ones are listed as skipped), 1
//! otherwise.

#[path = "gpu_e2e/ops.rs"]
mod ops;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use turbine::cpu::GgmlType;
use turbine::cuda::cudarc::driver::sys::CUevent_flags;
use turbine::cuda::CudaError;
use turbine::engine::backend::cpu::CpuBackend;
use turbine::engine::backend::cuda::CudaBackend;
use turbine::engine::backend::Backend;
use turbine::engine::generate::{LoadedModel, Session};
use turbine::engine::kv::KvType;
use turbine::engine::sampler::argmax;
use turbine::engine::{store, EngineError};

const PROMPT: &str = "Turbine is an inference engine for large language models. Here is a short story about \
                      a lighthouse keeper who finds a message in a bottle:";

/// Logits may differ by the two backends' rounding: 8-bit activations quantized with
/// other summation orders, attention in f32 on the GPU and partly in f16 on the CPU. On
/// the CPU alone, changing the rounding of one sum (tensor-parallel f32 vs f64 partial
/// sums, docs/ARCHITECTURE.md) moved the default model's logits by 3e-4 to 2e-3 of squared
/// error; a wrong kernel gives 1e-1 and more.
const LOGITS_NSE_LIMIT: f64 = 1e-2;

/// Prompt tokens of the prefill measurement (the scheduler's step budget).
const PREFILL_TOKENS: usize = 512;
/// Decode steps timed, after a few to warm up.
const DECODE_STEPS: usize = 64;

struct Options {
    models: Vec<String>,
    tokens: usize,
    kv: KvType,
    perf: bool,
    ops_only: bool,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--precompile") {
        return precompile(args.get(i + 1));
    }
    let opts = match parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let gpu = match CudaBackend::new(0) {
        Ok(b) => b,
        Err(e @ (CudaError::NoDriver | CudaError::NoDevice { .. })) => {
            println!("skipped: no GPU ({e})");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (name, arch) = gpu.device();
    println!("GPU: {name}, kernels for {arch}");
    match run(&gpu, &opts) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn precompile(dir: Option<&String>) -> ExitCode {
    let Some(dir) = dir else {
        eprintln!("error: --precompile needs a directory");
        return ExitCode::FAILURE;
    };
    match turbine::cuda::runtime::precompile(std::path::Path::new(dir)) {
        Ok(files) => {
            println!("{} CUBINs in {dir} (set TURBINE_KERNEL_CACHE={dir} where NVRTC is missing)", files.len());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut opts = Options { models: Vec::new(), tokens: 32, kv: KvType::F16, perf: true, ops_only: false };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--model" => opts.models.push(value()?),
            "--tokens" => opts.tokens = value()?.parse().map_err(|e| format!("--tokens: {e}"))?,
            "--kv" => opts.kv = KvType::parse(&value()?)?,
            "--no-perf" => opts.perf = false,
            "--ops-only" => opts.ops_only = true,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if opts.models.is_empty() {
        opts.models = default_models();
    }
    Ok(opts)
}

/// gemma3:270m, then the synthetic models (scripts/fetch-test-data.sh), MoE ones first.
fn default_models() -> Vec<String> {
    let dir = std::env::var_os("TURBINE_SYNTH")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/turbine-synth"));
    let synth = [
        "qwen3moe-q8_0",
        "gpt-oss-mxfp4",
        "deepseek2-q8_0",
        "qwen3moe-f32",
        "gpt-oss-f32",
        "deepseek2-f32",
        "llama-q8_0",
        "qwen2-q8_0",
        "qwen3-q8_0",
        "llama-f32",
        "qwen2-f32",
        "qwen3-f32",
    ];
    let mut models = vec!["gemma3:270m".to_string()];
    models.extend(synth.iter().map(|n| dir.join(format!("{n}.gguf")).display().to_string()));
    models
}

fn run(gpu: &CudaBackend, opts: &Options) -> Result<bool, String> {
    let copy_gbs = copy_bandwidth(gpu)?;
    println!("device-to-device copy: {copy_gbs:.0} GB/s (bytes read + written)");
    let (mut passed, mut failed, mut missing) = (Vec::new(), Vec::new(), Vec::new());
    println!("\n== backend operations, CUDA against CPU");
    let t = Instant::now();
    let op_failures = ops::check(gpu);
    println!("({:.1} s)", t.elapsed().as_secs_f64());
    match op_failures.is_empty() {
        true => passed.push("operations".to_string()),
        false => failed.push(format!("operations ({})", op_failures.join("; "))),
    }
    let models: &[String] = if opts.ops_only { &[] } else { &opts.models };
    let (mut perf_done, mut perf_lines) = (!opts.perf, Vec::new());
    for name in models {
        let path = match store::resolve(name) {
            Ok(p) => p,
            Err(e) => {
                println!("\n== {name}: missing ({e})");
                missing.push(name.clone());
                continue;
            }
        };
        println!("\n== {name} ({})", path.display());
        match check_model(gpu, &path, opts) {
            Ok((ok, gpu_model)) => {
                if !perf_done {
                    perf_done = true;
                    match perf(&gpu_model, copy_gbs) {
                        Ok(lines) => perf_lines = lines,
                        Err(e) => {
                            println!("FAIL perf: {e}");
                            failed.push(format!("{name} (perf)"));
                        }
                    }
                }
                if ok { &mut passed } else { &mut failed }.push(name.clone());
            }
            Err(e) => {
                println!("FAIL {name}: {e}");
                failed.push(name.clone());
            }
        }
    }
    #[cfg(feature = "nccl")]
    if let Some(path) = models.iter().find_map(|m| store::resolve(m).ok()) {
        println!("\n== NCCL ({})", path.display());
        match check_nccl(&path, opts) {
            Ok(()) => passed.push("NCCL".to_string()),
            Err(e) => {
                println!("FAIL NCCL: {e}");
                failed.push("NCCL".to_string());
            }
        }
    }
    println!("\n== summary: {} passed, {} failed, {} missing", passed.len(), failed.len(), missing.len());
    for (what, list) in [("passed", &passed), ("FAILED", &failed), ("missing", &missing)] {
        if !list.is_empty() {
            println!("{what}: {}", list.join(", "));
        }
    }
    println!("copy bandwidth: {copy_gbs:.0} GB/s");
    perf_lines.iter().for_each(|l| println!("{l}"));
    Ok(failed.is_empty() && !passed.is_empty())
}

/// Σ(got − want)² / Σ want².
fn nse(got: &[f32], want: &[f32]) -> f64 {
    let err: f64 = got.iter().zip(want).map(|(g, w)| (f64::from(*g) - f64::from(*w)).powi(2)).sum();
    let norm: f64 = want.iter().map(|w| f64::from(*w).powi(2)).sum();
    err / norm.max(f64::MIN_POSITIVE)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn e2s(e: EngineError) -> String {
    e.to_string()
}

/// A model on the GPU, and the bytes of weights a decode step reads (all but the tables
/// only looked up by row).
struct GpuModel {
    model: LoadedModel<CudaBackend>,
    decode_bytes: u64,
}

/// Loads `path` on both backends and compares them; the verdict and the GPU model.
fn check_model(gpu: &CudaBackend, path: &std::path::Path, opts: &Options) -> Result<(bool, GpuModel), String> {
    let t = Instant::now();
    let cpu_model = LoadedModel::load(path).map_err(e2s)?;
    let cpu_load = t.elapsed();
    let t = Instant::now();
    // The backend counts the weights of every model it loaded: this one's is the difference.
    let (weights_before, lookup_before) = gpu.weight_bytes();
    let gpu_model = LoadedModel::load_cuda(path, gpu.clone()).map_err(e2s)?;
    let (weights, lookup) = gpu.weight_bytes();
    let decode_bytes = (weights - weights_before) - (lookup - lookup_before);
    println!(
        "loaded: CPU {:.1} s, GPU {:.1} s ({}, {:.0} MB on the GPU)",
        cpu_load.as_secs_f64(),
        t.elapsed().as_secs_f64(),
        cpu_model.arch.info().architecture,
        (weights - weights_before) as f64 / 1e6
    );
    let prompt = cpu_model.tokenizer.encode(PROMPT, true, true);
    let ctx = prompt.len() + opts.tokens + 1;
    let grouped_before = gpu.grouped_moe_runs();

    // (a) The logits of every prompt position.
    let cpu_logits = Session::with_kv_type(&cpu_model, ctx, opts.kv).feed(&prompt, true).map_err(e2s)?;
    let gpu_logits = Session::with_kv_type(&gpu_model, ctx, opts.kv).feed(&prompt, true).map_err(e2s)?;
    let n_vocab = cpu_logits.n_vocab;
    if gpu_logits.data.len() != cpu_logits.data.len() {
        let (g, c) = (gpu_logits.data.len(), cpu_logits.data.len());
        return Err(format!("{g} logits on the GPU, {c} on the CPU"));
    }
    let e = nse(&gpu_logits.data, &cpu_logits.data);
    let noise = max_abs_diff(&gpu_logits.data, &cpu_logits.data);
    let same_argmax = (0..prompt.len())
        .filter(|&p| argmax(&gpu_logits.data[p * n_vocab..][..n_vocab]) == argmax(cpu_logits.row(p)))
        .count();
    let logits_ok = e.is_finite() && e <= LOGITS_NSE_LIMIT;
    println!(
        "{} logits of {} prompt positions: nse {e:.2e} (limit {LOGITS_NSE_LIMIT:.0e}), max |Δ| {noise:.3}, argmax agrees at {same_argmax}/{}",
        if logits_ok { "ok  " } else { "FAIL" },
        prompt.len(),
        prompt.len()
    );

    // (b) Greedy continuations, each backend on its own.
    let (cpu_tokens, cpu_rows) = greedy(&cpu_model, &prompt, opts)?;
    let (gpu_tokens, gpu_rows) = greedy(&gpu_model, &prompt, opts)?;
    let greedy_ok = match cpu_tokens.iter().zip(&gpu_tokens).position(|(a, b)| a != b) {
        None if cpu_tokens.len() == gpu_tokens.len() => {
            println!(
                "ok   greedy: {} tokens identical: {:?}",
                cpu_tokens.len(),
                cpu_model.tokenizer.decode(&cpu_tokens)
            );
            true
        }
        None => {
            println!("FAIL greedy: same tokens but {} on the CPU, {} on the GPU", cpu_tokens.len(), gpu_tokens.len());
            false
        }
        Some(i) => divergence(i, (&cpu_tokens, &cpu_rows), (&gpu_tokens, &gpu_rows), noise, &cpu_model),
    };

    // (c) The model as `--device cuda` runs it: offloaded, its caches driven from the host,
    // the same kernels in the same order, so the GPU's own tokens exactly.
    let offloaded = LoadedModel::load_offloaded(path, gpu.clone()).map_err(e2s)?;
    let (offloaded_tokens, _) = greedy(&offloaded, &prompt, opts)?;
    let offload_ok = offloaded_tokens == gpu_tokens;
    println!(
        "{} offloaded (--device cuda): {} greedy tokens {}",
        if offload_ok { "ok  " } else { "FAIL" },
        offloaded_tokens.len(),
        if offload_ok { "identical to the GPU model's" } else { "differ from the GPU model's" }
    );
    drop(offloaded);

    // (d) A mixture-of-experts model: the grouped expert path against the per-expert one.
    let moe_ok = match gpu_model.arch.routing_stats().is_empty() {
        true => true,
        false => {
            let runs = gpu.grouped_moe_runs() - grouped_before;
            let reference = (&gpu_logits.data[..], &gpu_tokens[..], &gpu_rows[..]);
            check_grouped_moe(gpu, &gpu_model, &prompt, reference, runs, noise, opts)?
        }
    };
    Ok((logits_ok && greedy_ok && offload_ok && moe_ok, GpuModel { model: gpu_model, decode_bytes }))
}

/// Expert types with the grouped path's kernels (matmul.cu's matvec_id_*).
const GROUPED_TYPES: [GgmlType; 6] =
    [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::MXFP4, GgmlType::Q4_K, GgmlType::Q6_K];

/// The grouped expert path on a mixture-of-experts model: `runs` layers took it during the
/// checks above (none only where the experts' types have no kernels for it), and the
/// per-expert path, the grouped one switched off, gives the same prompt logits within
/// rounding and the same greedy tokens as `grouped` (logits of the prompt, greedy tokens
/// and their logits); a divergence within `noise` (the CPU against the GPU) is a near tie.
fn check_grouped_moe(
    gpu: &CudaBackend,
    model: &LoadedModel<CudaBackend>,
    prompt: &[u32],
    grouped: (&[f32], &[u32], &[Vec<f32>]),
    runs: u64,
    noise: f32,
    opts: &Options,
) -> Result<bool, String> {
    let experts: Vec<GgmlType> =
        model.file.tensors().iter().filter(|t| t.name.contains("_exps.weight")).map(|t| t.ty).collect();
    let expected = !experts.is_empty() && experts.iter().all(|t| GROUPED_TYPES.contains(t));
    let used_ok = runs > 0 || !expected;
    println!(
        "{} grouped MoE path: {runs} layer runs during the checks above ({})",
        if used_ok { "ok  " } else { "FAIL" },
        if expected {
            "expected: the experts have matvec_id kernels"
        } else {
            "none expected for these experts' types"
        }
    );
    // The per-expert path on the same GPU; the switch goes back on whatever happens.
    gpu.set_grouped_moe(false);
    let per_expert = (|| {
        let ctx = prompt.len() + opts.tokens + 1;
        let logits = Session::with_kv_type(model, ctx, opts.kv).feed(prompt, true).map_err(e2s)?.data;
        Ok::<_, String>((logits, greedy(model, prompt, opts)?))
    })();
    gpu.set_grouped_moe(true);
    let (logits, (tokens, rows)) = per_expert?;
    let (g_logits, g_tokens, g_rows) = grouped;
    if logits.len() != g_logits.len() {
        return Err(format!("{} logits per-expert, {} grouped", logits.len(), g_logits.len()));
    }
    let e = nse(g_logits, &logits);
    let same_bits = g_logits.iter().zip(&logits).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
    let logits_ok = e.is_finite() && e <= LOGITS_NSE_LIMIT;
    println!(
        "{} grouped against per-expert, logits of {} prompt positions: nse {e:.2e}, max |Δ| {:.2e}, {same_bits}/{} identical",
        if logits_ok { "ok  " } else { "FAIL" },
        prompt.len(),
        max_abs_diff(g_logits, &logits),
        logits.len()
    );
    let greedy_ok = match tokens.iter().zip(g_tokens).position(|(a, b)| a != b) {
        None if tokens.len() == g_tokens.len() => {
            println!("ok   grouped against per-expert: {} greedy tokens identical", tokens.len());
            true
        }
        None => {
            println!(
                "FAIL grouped against per-expert: {} greedy tokens per-expert, {} grouped",
                tokens.len(),
                g_tokens.len()
            );
            false
        }
        Some(i) => {
            let (p, g) = (tokens[i] as usize, g_tokens[i] as usize);
            let margin = rows[i][p] - rows[i][g];
            let tie = margin <= 2.0 * noise;
            println!(
                "{} grouped against per-expert: greedy tokens diverge at {i}: per-expert {p} (margin {margin:.4}), grouped {g} (margin {:.4}){}",
                if tie { "warn" } else { "FAIL" },
                g_rows[i][g] - g_rows[i][p],
                if tie { ": a near tie" } else { "" }
            );
            tie
        }
    };
    Ok(used_ok && logits_ok && greedy_ok)
}

/// Reports the first divergence at step `i`: the two candidates' logits on each side. Within
/// the logits' measured noise (twice the prompt's max |Δ|) it is a near tie, reported and
/// passed; beyond it, a failure.
fn divergence(
    i: usize,
    (cpu_tokens, cpu_rows): (&[u32], &[Vec<f32>]),
    (gpu_tokens, gpu_rows): (&[u32], &[Vec<f32>]),
    noise: f32,
    model: &LoadedModel<CpuBackend>,
) -> bool {
    let (c, g) = (cpu_tokens[i] as usize, gpu_tokens[i] as usize);
    let cpu_margin = cpu_rows[i][c] - cpu_rows[i][g];
    let gpu_margin = gpu_rows[i][g] - gpu_rows[i][c];
    let tie = cpu_margin <= 2.0 * noise;
    println!(
        "{} greedy: first divergence at token {i} of {}: CPU {c} {:?} (margin {cpu_margin:.4} over the GPU's pick), GPU {g} {:?} (margin {gpu_margin:.4}){}",
        if tie { "warn" } else { "FAIL" },
        cpu_tokens.len(),
        model.tokenizer.decode(&[c as u32]),
        model.tokenizer.decode(&[g as u32]),
        if tie { format!(": a near tie (within 2 × max |Δ| = {:.3})", 2.0 * noise) } else { String::new() }
    );
    println!("     CPU: {:?}", model.tokenizer.decode(cpu_tokens));
    println!("     GPU: {:?}", model.tokenizer.decode(gpu_tokens));
    tie
}

/// Tensor parallelism with its collectives over NCCL (the `nccl` feature), one rank per GPU
/// of this machine (NCCL takes one rank per GPU: one, on a one-GPU machine), against the
/// in-process group of as many ranks: the same sums in the same order, so the same logits
/// bit for bit and the same greedy tokens.
#[cfg(feature = "nccl")]
fn check_nccl(path: &std::path::Path, opts: &Options) -> Result<(), String> {
    let gpus = turbine::cuda::cudarc::driver::CudaContext::device_count().map_err(|e| format!("{e:?}"))?;
    let ordinals: Vec<usize> = (0..usize::try_from(gpus).unwrap_or(1).max(1)).collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()) / ordinals.len();
    let nccl = LoadedModel::load_split_nccl(path, &ordinals, threads.max(1)).map_err(e2s)?;
    let group = LoadedModel::load_split(path, ordinals.len(), threads.max(1)).map_err(e2s)?;
    let prompt = group.tokenizer.encode(PROMPT, true, true);
    let ctx = prompt.len() + opts.tokens + 1;
    let over_nccl = Session::with_kv_type(&nccl, ctx, opts.kv).feed(&prompt, true).map_err(e2s)?;
    let in_process = Session::with_kv_type(&group, ctx, opts.kv).feed(&prompt, true).map_err(e2s)?;
    let same = over_nccl.data.len() == in_process.data.len()
        && over_nccl.data.iter().zip(&in_process.data).all(|(a, b)| a.to_bits() == b.to_bits());
    if !same {
        let e = nse(&over_nccl.data, &in_process.data);
        return Err(format!("{} ranks: logits differ from the in-process group's (nse {e:.2e})", ordinals.len()));
    }
    let (a, _) = greedy(&nccl, &prompt, opts)?;
    let (b, _) = greedy(&group, &prompt, opts)?;
    if a != b {
        return Err(format!("{} ranks: greedy tokens differ: {a:?} vs {b:?}", ordinals.len()));
    }
    println!(
        "ok   {} rank(s) over NCCL: logits of {} positions bit for bit and {} greedy tokens as the in-process group",
        ordinals.len(),
        prompt.len(),
        a.len()
    );
    Ok(())
}

/// `opts.tokens` greedy tokens after `prompt` (fewer at an end-of-generation token), and the
/// logits each was picked from.
fn greedy<B: Backend>(
    model: &LoadedModel<B>,
    prompt: &[u32],
    opts: &Options,
) -> Result<(Vec<u32>, Vec<Vec<f32>>), String> {
    let mut session = Session::with_kv_type(model, prompt.len() + opts.tokens + 1, opts.kv);
    let mut logits = session.feed(prompt, false).map_err(e2s)?.data;
    let (mut tokens, mut rows) = (Vec::new(), Vec::new());
    for _ in 0..opts.tokens {
        let next = argmax(&logits);
        tokens.push(next);
        rows.push(std::mem::take(&mut logits));
        if model.tokenizer.is_eog(next) {
            break;
        }
        logits = session.feed(&[next], false).map_err(e2s)?.data;
    }
    Ok((tokens, rows))
}

/// A 1 GiB device-to-device copy, timed with events: GB/s of bytes read plus written.
fn copy_bandwidth(gpu: &CudaBackend) -> Result<f64, String> {
    let rt = gpu.runtime();
    let s = rt.stream();
    let drv = |e| format!("copy bandwidth: {e:?}");
    let bytes = 1usize << 30;
    let src = s.alloc_zeros::<u8>(bytes).map_err(drv)?;
    let mut dst = s.alloc_zeros::<u8>(bytes).map_err(drv)?;
    s.memcpy_dtod(&src, &mut dst).map_err(drv)?;
    let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
    let start = s.record_event(timing).map_err(drv)?;
    let runs = 10;
    for _ in 0..runs {
        s.memcpy_dtod(&src, &mut dst).map_err(drv)?;
    }
    let end = s.record_event(timing).map_err(drv)?;
    end.synchronize().map_err(drv)?;
    let ms = f64::from(start.elapsed_ms(&end).map_err(drv)?) / f64::from(runs);
    Ok(2.0 * bytes as f64 / (ms * 1e6))
}

/// Decode and prefill speed of a model on the GPU; the lines it printed.
fn perf(gpu_model: &GpuModel, copy_gbs: f64) -> Result<Vec<String>, String> {
    let model = &gpu_model.model;
    let info = model.arch.info();
    // A decode step reads every weight once, except the tables it only looks rows up in.
    let per_token = gpu_model.decode_bytes as f64;
    let prompt = model.tokenizer.encode(PROMPT, true, true);
    let mut session = Session::new(model, prompt.len() + DECODE_STEPS + 8);
    let mut logits = session.feed(&prompt, false).map_err(e2s)?.data;
    let mut step = |logits: &mut Vec<f32>| -> Result<(), String> {
        *logits = session.feed(&[argmax(logits)], false).map_err(e2s)?.data;
        Ok(())
    };
    for _ in 0..4 {
        step(&mut logits)?;
    }
    let t = Instant::now();
    for _ in 0..DECODE_STEPS {
        step(&mut logits)?;
    }
    let s = t.elapsed().as_secs_f64() / DECODE_STEPS as f64;
    let gbs = per_token / s / 1e9;
    let decode = format!(
        "perf decode ({}): {:.1} tok/s ({:.2} ms/token); {:.0} MB of weights per token → {gbs:.0} GB/s = {:.0}% of the copy bandwidth",
        info.architecture,
        1.0 / s,
        s * 1e3,
        per_token / 1e6,
        100.0 * gbs / copy_gbs
    );
    println!("{decode}");
    let n = PREFILL_TOKENS.min(info.context_length.saturating_sub(1)).max(1);
    let tokens: Vec<u32> = prompt.iter().copied().cycle().take(n).collect();
    let mut times = Vec::new();
    for _ in 0..4 {
        let mut session = Session::new(model, n + 1);
        let t = Instant::now();
        session.feed(&tokens, false).map_err(e2s)?;
        times.push(t.elapsed().as_secs_f64());
    }
    // The first run warms up; the median of the others.
    let mut timed = times[1..].to_vec();
    timed.sort_by(f64::total_cmp);
    let s = timed[timed.len() / 2];
    let prefill =
        format!("perf prefill ({}): {n} tokens in {:.1} ms = {:.0} tok/s", info.architecture, s * 1e3, n as f64 / s);
    println!("{prefill}");
    Ok(vec![decode, prefill])
}
