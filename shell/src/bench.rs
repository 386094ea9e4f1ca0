//! `turbine bench`: prompt processing and generation speed, measured the way llama.cpp's
//! llama-bench measures it, so the two tables can be compared line by line.
//!
//! pp = one batch of P random tokens (BOS first when the model adds one) through the model
//! with an empty cache; tg = N tokens decoded one at a time from an empty cache, each next
//! token random. Sampling is excluded. One warm-up run of each test precedes the timed
//! repetitions; each repetition starts from an empty cache.

use serde_json::json;
use std::time::Instant;
use turbine::engine::backend::cpu::CpuBackend;
use turbine::engine::backend::Backend;
use turbine::engine::generate::{LoadedModel, Session};
use turbine::engine::model::Batch;
use turbine::engine::sampler::Rng;
use turbine::engine::EngineError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Md,
    Json,
}

pub struct BenchArgs {
    pub n_prompt: usize,
    pub n_gen: usize,
    pub threads: usize,
    pub reps: usize,
    pub format: Format,
    /// Sequences decoding together in the tg test.
    pub parallel: usize,
    /// Tensor-parallel ranks or pipeline stages (threads of this process), `threads / tp`
    /// threads each.
    pub tp: usize,
    /// Tokens in the cache before each test (untimed).
    pub depth: usize,
    /// The anonymous memory loading the model took in this process, reported after the
    /// results, and the ranks it holds (under mpirun, one: the others are processes).
    pub load_anon_bytes: Option<u64>,
    pub ranks_here: usize,
}

/// One test's timings.
struct TestResult {
    n_prompt: usize,
    n_gen: usize,
    /// Sequences decoding together (tg).
    n_parallel: usize,
    /// Tokens in the cache before the test.
    depth: usize,
    samples_ns: Vec<u64>,
    /// Tensor parallelism: rank 0's time in collectives per repetition.
    collective_ns: u64,
}

impl TestResult {
    fn name(&self) -> String {
        let test = match (self.n_gen, self.n_parallel) {
            (0, _) => format!("pp{}", self.n_prompt),
            (n, 1) => format!("tg{n}"),
            (n, b) => format!("tg{n} ×{b}"),
        };
        match self.depth {
            0 => test,
            d => format!("{test} @ d{d}"),
        }
    }

    fn tokens(&self) -> usize {
        self.n_prompt + self.n_gen * self.n_parallel
    }

    fn samples_ts(&self) -> Vec<f64> {
        self.samples_ns.iter().map(|&ns| self.tokens() as f64 * 1e9 / ns.max(1) as f64).collect()
    }
}

fn mean_stddev(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 { xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// Random token ids in [0, n_vocab), BOS first when the model adds one.
fn random_tokens(model: &LoadedModel<CpuBackend>, rng: &mut Rng, n: usize) -> Vec<u32> {
    let n_vocab = model.tokenizer.n_vocab() as u64;
    let mut tokens: Vec<u32> = (0..n).map(|_| (rng.next_u64() % n_vocab) as u32).collect();
    if let (Some(first), Some(bos), true) = (tokens.first_mut(), model.tokenizer.bos(), model.tokenizer.add_bos()) {
        *first = bos;
    }
    tokens
}

/// Time of one prompt-processing run of `n` tokens after `depth` untimed ones, in ns.
fn run_prompt(model: &LoadedModel<CpuBackend>, rng: &mut Rng, n: usize, depth: usize) -> Result<u64, EngineError> {
    let context = random_tokens(model, rng, depth + n);
    let (before, tokens) = context.split_at(depth);
    let mut session = Session::new(model, depth + n + 1);
    if depth > 0 {
        session.feed(before, false)?;
    }
    let start = Instant::now();
    session.feed(tokens, false)?;
    Ok(start.elapsed().as_nanos() as u64)
}

/// Time of `n` decode steps of `parallel` sequences, each step one batch with a token
/// (and its logits) per sequence, after `depth` untimed tokens of each, in ns.
fn run_gen(
    model: &LoadedModel<CpuBackend>,
    rng: &mut Rng,
    (n, parallel): (usize, usize),
    depth: usize,
) -> Result<u64, EngineError> {
    let tokens: Vec<Vec<u32>> = (0..parallel).map(|_| random_tokens(model, rng, depth + n)).collect();
    let batch = |step: usize| {
        let mut batch = Batch::default();
        for (seq, t) in tokens.iter().enumerate() {
            batch.push(seq, (depth + step) as u32, t[depth + step], true);
        }
        batch
    };
    // The context: each sequence's first `depth` tokens, a sequence per batch.
    let contexts =
        || (0..parallel).filter(|_| depth > 0).map(|seq| Batch::for_sequence(seq, 0, &tokens[seq][..depth], false));
    let mut kv = model.backend.new_kv(&model.arch.kv_spec(depth + n + 1, parallel));
    for context in contexts() {
        model.arch.forward(&model.backend, &context, &mut kv)?;
    }
    let start = Instant::now();
    for step in 0..n {
        model.arch.forward(&model.backend, &batch(step), &mut kv)?;
    }
    Ok(start.elapsed().as_nanos() as u64)
}

fn run_test(
    model: &LoadedModel<CpuBackend>,
    n_prompt: usize,
    (n_gen, n_parallel): (usize, usize),
    (depth, reps): (usize, usize),
) -> Result<TestResult, EngineError> {
    let mut rng = Rng::new(0x5eed);
    let run = |rng: &mut Rng| match n_gen {
        0 => run_prompt(model, rng, n_prompt, depth),
        _ => run_gen(model, rng, (n_gen, n_parallel), depth),
    };
    run(&mut rng)?; // warm-up
    let collectives = || model.backend.collective_time().unwrap_or_default();
    let before = collectives();
    let samples_ns = (0..reps).map(|_| run(&mut rng)).collect::<Result<Vec<_>, _>>()?;
    let collective_ns = (collectives() - before).as_nanos() as u64 / reps.max(1) as u64;
    Ok(TestResult { n_prompt, n_gen, n_parallel, depth, samples_ns, collective_ns })
}

/// Runs the tests and prints the table or JSON on stdout.
pub fn bench(model_arg: &str, model: &LoadedModel<CpuBackend>, args: &BenchArgs) -> Result<(), EngineError> {
    let limit = model.arch.info().context_length;
    let longest = args.n_prompt.max(args.n_gen).saturating_add(args.depth);
    if longest >= limit {
        return Err(EngineError::ContextFull { needed: longest.saturating_add(1), limit });
    }
    let pool =
        rayon::ThreadPoolBuilder::new().num_threads(args.threads).build().map_err(|_| EngineError::BadValue {
            key: "-t".into(),
            value: args.threads.to_string(),
            why: "cannot start a thread pool of that size",
        })?;
    let mut results = Vec::new();
    pool.install(|| -> Result<(), EngineError> {
        if args.n_prompt > 0 {
            results.push(run_test(model, args.n_prompt, (0, 1), (args.depth, args.reps))?);
        }
        if args.n_gen > 0 {
            results.push(run_test(model, 0, (args.n_gen, args.parallel), (args.depth, args.reps))?);
        }
        Ok(())
    })?;
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    match (args.load_anon_bytes, args.tp, args.ranks_here) {
        (Some(b), 1, _) => eprintln!("model: {:.1} MiB of anonymous memory at load", mib(b)),
        (Some(b), _, 1) => eprintln!("rank 0's process: {:.1} MiB of anonymous memory at load", mib(b)),
        (Some(b), _, here) => {
            let per_rank = mib(b) / here as f64;
            eprintln!("{here} ranks: {:.1} MiB of anonymous memory at load ({per_rank:.1} MiB per rank)", mib(b));
        }
        (None, _, _) => {}
    }
    let file_bytes: u64 = model.file.tensors().iter().map(|t| t.n_bytes as u64).sum();
    for (rank, w) in model.arch.info().rank_weight_bytes.iter().enumerate() {
        let (own, lookup) = (w.covered.saturating_sub(w.lookup_only), w.lookup_only);
        eprintln!(
            "rank {rank}: {:.1} MiB of the file's {:.1} MiB of weights ({:.1}%), plus the {:.1} MiB embedding table \
             it only looks up",
            mib(own),
            mib(file_bytes),
            100.0 * own as f64 / file_bytes.max(1) as f64,
            mib(lookup)
        );
    }
    if args.tp > 1 {
        for r in &results {
            let (runs, steps) = (r.samples_ns.len().max(1), r.n_gen.max(1));
            let step_ms = r.samples_ns.iter().sum::<u64>() as f64 / runs as f64 / steps as f64 / 1e6;
            let coll_ms = r.collective_ns as f64 / steps as f64 / 1e6;
            // Tensor parallelism's collectives; a pipeline has none.
            let collectives = match model.backend.collective_time() {
                Some(_) => format!(", rank 0 in collectives {coll_ms:.2} ms of it"),
                None => String::new(),
            };
            eprintln!(
                "{}: {} ranks × {} threads: {step_ms:.2} ms per {}{collectives}",
                r.name(),
                args.tp,
                (args.threads / args.tp).max(1),
                if r.n_gen == 0 { "run" } else { "step" }
            );
        }
    }
    let info = ModelSummary::of(model_arg, model);
    match args.format {
        Format::Md => print_markdown(&info, args.threads, &results),
        Format::Json => print_json(&info, args.threads, &results),
    }
    Ok(())
}

/// What llama-bench prints about the model.
struct ModelSummary {
    path: String,
    model_type: String,
    size_bytes: u64,
    n_params: u64,
    /// llama-bench's backend column: CPU, or CUDA for a model offloaded to a GPU.
    backend: &'static str,
}

impl ModelSummary {
    fn of(path: &str, model: &LoadedModel<CpuBackend>) -> ModelSummary {
        let file = &model.file;
        let size_bytes = file.tensors().iter().map(|t| t.n_bytes as u64).sum();
        let label = file.get_str("general.size_label").ok().flatten().unwrap_or("?").to_string();
        let ftype = file
            .get_u32("general.file_type")
            .ok()
            .flatten()
            .and_then(turbine::engine::file_type::description)
            .unwrap_or("?");
        let info = model.arch.info();
        ModelSummary {
            path: path.to_string(),
            model_type: format!("{} {label} {ftype}", info.architecture),
            size_bytes,
            n_params: info.n_params,
            backend: if model.backend.offloads() { "CUDA" } else { "CPU" },
        }
    }
}

fn print_markdown(m: &ModelSummary, threads: usize, results: &[TestResult]) {
    println!("| model | size | params | backend | threads | test | t/s |");
    println!("| --- | ---: | ---: | --- | ---: | ---: | ---: |");
    for r in results {
        let (mean, sd) = mean_stddev(&r.samples_ts());
        println!(
            "| {} | {:.2} MiB | {:.2} M | {} | {threads} | {} | {mean:.2} ± {sd:.2} |",
            m.model_type,
            m.size_bytes as f64 / (1024.0 * 1024.0),
            m.n_params as f64 / 1e6,
            m.backend,
            r.name()
        );
    }
}

fn print_json(m: &ModelSummary, threads: usize, results: &[TestResult]) {
    let rows: Vec<_> = results
        .iter()
        .map(|r| {
            let ts = r.samples_ts();
            let ns: Vec<f64> = r.samples_ns.iter().map(|&x| x as f64).collect();
            let (avg_ts, stddev_ts) = mean_stddev(&ts);
            let (avg_ns, stddev_ns) = mean_stddev(&ns);
            json!({
                "model_filename": m.path,
                "model_type": m.model_type,
                "model_size": m.size_bytes,
                "model_n_params": m.n_params,
                "backends": m.backend,
                "n_threads": threads,
                "n_prompt": r.n_prompt,
                "n_gen": r.n_gen,
                "n_parallel": r.n_parallel,
                "n_depth": r.depth,
                "avg_ns": avg_ns as u64,
                "stddev_ns": stddev_ns as u64,
                "avg_ts": avg_ts,
                "stddev_ts": stddev_ts,
                "samples_ns": r.samples_ns,
                "samples_ts": ts,
            })
        })
        .collect();
    println!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default());
}

/// The process's resident anonymous memory (weights' copies, caches), from /proc on Linux.
pub fn rss_anon_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("RssAnon:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb.saturating_mul(1024))
}
