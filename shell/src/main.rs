//! The `turbine` command.

mod bench;
mod client;
mod gateway;
mod modelfile;
mod server;

use clap::{Parser, Subcommand};
use std::io::Write;
use std::process::ExitCode;
use turbine::engine::generate::{Device, GenerateOptions, LoadedModel, Session};
use turbine::engine::sampler::SamplerParams;
use turbine::engine::{store, EngineError};

#[derive(Parser)]
#[command(name = "turbine", version, about = "Kernel-first LLM inference engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a raw prompt (no chat template) and print the continuation.
    Generate(GenerateArgs),
    /// Measure prompt processing (pp) and generation (tg) speed, as llama-bench does.
    Bench {
        /// Model name (e.g. gemma3:270m) or path to a .gguf file.
        #[arg(short, long)]
        model: String,
        /// Prompt tokens per pp test (0: skip).
        #[arg(short = 'p', long = "n-prompt", default_value_t = 512)]
        n_prompt: usize,
        /// Tokens per tg test (0: skip).
        #[arg(short = 'n', long = "n-gen", default_value_t = 128)]
        n_gen: usize,
        /// Threads (default: all cores).
        #[arg(short = 't', long, value_parser = clap::value_parser!(u16).range(1..))]
        threads: Option<u16>,
        /// Timed repetitions of each test.
        #[arg(short = 'r', long = "repetitions", default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..))]
        reps: u16,
        #[arg(short = 'o', long = "output", value_enum, default_value_t = bench::Format::Md)]
        format: bench::Format,
        /// Sequences decoding together in the tg test, one token each per step (as the
        /// server batches concurrent requests); t/s counts the tokens of all of them.
        #[arg(long = "parallel", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
        parallel: u16,
        /// Tensor-parallel ranks (threads of this process, each with threads / tp
        /// threads and its share of the weights; under mpirun, its processes).
        #[arg(long = "tp", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        tp: u16,
        /// Pipeline stages (consecutive layer ranges on threads of this process, each
        /// with threads / pp threads and its layers' weights; with --tp, each stage over
        /// tp ranks; under mpirun, its processes, not with --tp).
        #[arg(long = "pp", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        pp: u16,
        /// Tokens already in the cache (of every sequence) when each test starts, as
        /// llama-bench's -d: filled untimed, so tg and pp are measured at that depth.
        #[arg(short = 'd', long = "n-depth", default_value_t = 0)]
        depth: usize,
        /// Where the model runs: cpu, cuda (GPU 0), cuda:N, or auto (a GPU where one can
        /// be used, else the CPU). A GPU needs a build with --features cuda.
        #[arg(long, default_value_t = Device::Cpu, value_name = "DEVICE")]
        device: Device,
    },
    /// Serve Ollama's HTTP API (and OpenAI's chat completions) on OLLAMA_HOST
    /// (default 127.0.0.1:11434) for the models in the store.
    Serve {
        #[command(flatten)]
        listen: ListenFlags,
        /// Split each model over N tensor-parallel ranks (threads of this process, the
        /// cores shared evenly among them; under mpirun, its processes).
        #[arg(long = "tp", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        tp: u16,
        /// Split each model into M pipeline stages (consecutive layer ranges on threads of
        /// this process, the cores shared evenly; with --tp, each stage over N ranks; under
        /// mpirun, its processes, not with --tp).
        #[arg(long = "pp", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=64))]
        pp: u16,
        /// Where whole models run: cpu, cuda (GPU 0), cuda:N, or auto (a GPU where one can
        /// be used, else the CPU). A GPU needs a build with --features cuda.
        #[arg(long, default_value_t = Device::Cpu, value_name = "DEVICE")]
        device: Device,
    },
    /// Serve the same API in front of compute nodes (`turbine serve` elsewhere), with API
    /// keys and rate limits here and no engine: requests go to a node with the model,
    /// conversations stay on one node, failed nodes are skipped.
    Gateway {
        /// A compute node's base URL, http://host:port (repeatable). TURBINE_NODE_KEY, if
        /// set, is sent to the nodes as their API key.
        #[arg(long = "node", value_name = "URL")]
        nodes: Vec<String>,
        /// A JSON file: {"nodes": ["http://host:port", ...], "node_key": "..."}.
        #[arg(long, value_name = "FILE")]
        config: Option<std::path::PathBuf>,
        #[command(flatten)]
        listen: ListenFlags,
    },
    /// Manage the API keys `turbine serve` requires once any exists (stored hashed in
    /// TURBINE_HOME/keys.json, default ~/.turbine).
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// List the models the server has (client of `turbine serve`, at OLLAMA_HOST).
    #[command(visible_alias = "ls")]
    List,
    /// List the models the server has loaded.
    Ps,
    /// Show a model's architecture, size, context length, quantization and capabilities.
    Show { model: String },
    /// Unload a model from the server.
    Stop { model: String },
    /// Create a model from a Modelfile (FROM a GGUF file or a model; PARAMETER, TEMPLATE,
    /// SYSTEM, LICENSE), uploading the GGUF to the server (client of the server).
    Create {
        model: String,
        /// The Modelfile (default: ./Modelfile).
        #[arg(short = 'f', long = "file", default_value = "Modelfile")]
        file: std::path::PathBuf,
    },
    /// Install a model under another name too (client of the server).
    Cp { source: String, destination: String },
    /// Remove models from the store (client of the server).
    Rm {
        #[arg(required = true)]
        models: Vec<String>,
    },
    /// Chat with a model: answer PROMPT (and/or piped stdin) once, or chat interactively.
    Run {
        model: String,
        /// The prompt (words are joined with spaces); none on a terminal starts a chat.
        prompt: Vec<String>,
        /// How long the model stays loaded after the request (e.g. 5m, 1h, 0, -1).
        #[arg(long = "keepalive")]
        keep_alive: Option<String>,
        /// Print timings (token counts and rates) after each answer, on stderr.
        #[arg(long)]
        verbose: bool,
        /// Ask a thinking model to think: --think, --think=false, --think=low/medium/high.
        #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true", value_name = "LEVEL")]
        think: Option<String>,
        /// Do not print a thinking model's reasoning.
        #[arg(long)]
        hidethinking: bool,
        /// Response format: json, or a JSON schema (its text) the answers must follow.
        #[arg(long)]
        format: Option<String>,
        /// Chat interactively even when stdin is not a terminal.
        #[arg(long, hide = true)]
        interactive: bool,
    },
    /// Print the token ids of a text as a JSON array.
    Tokenize {
        /// Model name (e.g. gemma3:270m) or path to a .gguf file.
        #[arg(short, long)]
        model: String,
        text: String,
    },
}

/// How `serve` and `gateway` listen.
#[derive(clap::Args)]
struct ListenFlags {
    /// Refuse requests without a valid API key even before the key file exists (once it
    /// exists, keys are always required).
    #[arg(long)]
    require_auth: bool,
    /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<std::path::PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<std::path::PathBuf>,
}

impl ListenFlags {
    fn args(self) -> server::ListenArgs {
        server::ListenArgs { require_auth: self.require_auth, tls_cert: self.tls_cert, tls_key: self.tls_key }
    }
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key and print it (only this once).
    Create {
        /// A name to tell keys apart.
        #[arg(long, default_value = "")]
        name: String,
        /// Requests per minute (default: unlimited).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        rpm: Option<u64>,
        /// Prompt plus generated tokens per minute (default: unlimited).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        tpm: Option<u64>,
    },
    /// List keys: id, name, limits, created, last used (never the key).
    #[command(visible_alias = "ls")]
    List,
    /// Revoke a key by id; the server refuses it from its next request on.
    Revoke { id: String },
}

/// `turbine keys ...`.
fn keys_command(command: KeysCommand) -> Result<(), String> {
    use server::keys;
    let path = keys::keys_path();
    match command {
        KeysCommand::Create { name, rpm, tpm } => {
            let (record, secret) = keys::create(&path, &name, rpm, tpm)?;
            eprintln!("created key {} in {}; it is shown only now:", record.id, path.display());
            println!("{secret}");
        }
        KeysCommand::List => {
            let limit = |v: Option<u64>| v.map_or("-".to_string(), |n| n.to_string());
            let when = |t: Option<u64>| {
                t.map_or("never".to_string(), |s| {
                    server::host::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s))
                        .split('.')
                        .next()
                        .unwrap_or_default()
                        .to_string()
                })
            };
            println!("{:<10} {:<20} {:>8} {:>10} {:<20} {:<20}", "ID", "NAME", "RPM", "TPM", "CREATED", "LAST USED");
            for k in keys::list(&path)? {
                println!(
                    "{:<10} {:<20} {:>8} {:>10} {:<20} {:<20}",
                    k.id,
                    k.name,
                    limit(k.rpm),
                    limit(k.tpm),
                    when(Some(k.created)),
                    when(k.last_used)
                );
            }
        }
        KeysCommand::Revoke { id } => {
            let record = keys::revoke(&path, &id)?;
            println!(
                "revoked key {}{}",
                record.id,
                if record.name.is_empty() { String::new() } else { format!(" ({})", record.name) }
            );
        }
    }
    Ok(())
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Model name (e.g. gemma3:270m) or path to a .gguf file.
    #[arg(short, long)]
    model: String,
    /// Tokens to generate (-1: until end of generation or the context is full).
    #[arg(short = 'n', long, default_value_t = 128, allow_negative_numbers = true)]
    num_predict: i64,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long, default_value_t = 40)]
    top_k: i32,
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.1)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 64)]
    repeat_last_n: i32,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Context length (default: 4096, at most the model's).
    #[arg(long, default_value_t = 4096)]
    num_ctx: usize,
    /// Where the model runs: cpu, cuda (GPU 0), cuda:N, or auto (a GPU where one can
    /// be used, else the CPU). A GPU needs a build with --features cuda.
    #[arg(long, default_value_t = Device::Cpu, value_name = "DEVICE")]
    device: Device,
    prompt: String,
}

fn load(model: &str) -> Result<LoadedModel<turbine::engine::backend::cpu::CpuBackend>, EngineError> {
    LoadedModel::load(&store::resolve(model)?)
}

fn generate(args: GenerateArgs) -> Result<(), EngineError> {
    let model = LoadedModel::load_on(&store::resolve(&args.model)?, args.device)?;
    let tok = &model.tokenizer;
    let prompt = tok.encode(&args.prompt, true, true);
    let num_ctx = args.num_ctx.clamp(1, model.arch.info().context_length);
    let opts = GenerateOptions {
        num_predict: usize::try_from(args.num_predict).ok(),
        num_ctx,
        sampler: SamplerParams {
            temperature: args.temperature,
            top_k: args.top_k,
            top_p: args.top_p,
            min_p: args.min_p,
            repeat_penalty: args.repeat_penalty,
            repeat_last_n: args.repeat_last_n,
            seed: args.seed,
            ..SamplerParams::default()
        },
        stop: args.stop,
        logprobs: None,
        render_special: false,
        format: None,
    };
    let mut session = Session::new(&model, num_ctx);
    let mut stdout = std::io::stdout().lock();
    let stats = session
        .generate(&prompt, &opts, |text| stdout.write_all(text.as_bytes()).and_then(|_| stdout.flush()).is_ok())?;
    let _ = writeln!(stdout);
    let secs = |d: std::time::Duration| d.as_secs_f64().max(1e-9);
    eprintln!("load: {:.3} s", model.load_time.as_secs_f64());
    eprintln!(
        "prompt: {} tokens in {:.3} s ({:.1} tokens/s)",
        stats.prompt_tokens,
        stats.prompt_time.as_secs_f64(),
        stats.prompt_tokens as f64 / secs(stats.prompt_time)
    );
    eprintln!(
        "generate: {} tokens in {:.3} s ({:.1} tokens/s), done: {:?}",
        stats.generated.len(),
        stats.gen_time.as_secs_f64(),
        stats.generated.len() as f64 / secs(stats.gen_time),
        stats.done_reason
    );
    Ok(())
}

fn tokenize(model: &str, text: &str) -> Result<(), EngineError> {
    let model = load(model)?;
    let ids = model.tokenizer.encode(text, true, true);
    println!("{}", serde_json::to_string(&ids).unwrap_or_default());
    Ok(())
}

/// Runs a client command against the server at OLLAMA_HOST; errors print as Ollama's CLI
/// prints them (`Error: <message from the server>`) and exit 1.
fn client_main(f: impl FnOnce(&client::Target) -> Result<(), String>) -> ExitCode {
    match client::Target::from_env().and_then(|t| f(&t)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The device of `--device`, checked before any model loads (`auto`: the one it found). A
/// GPU runs whole models: split ones (`--tp`, `--pp`, mpirun) run on the CPU.
fn whole_on(device: Device, (tp, pp): (u16, u16)) -> Result<Device, String> {
    match device {
        Device::Cpu => Ok(Device::Cpu),
        _ if tp > 1 || pp > 1 || launched_by_mpirun() => {
            Err(format!("--device {device} runs a whole model; split models (--tp, --pp, mpirun) run on the CPU"))
        }
        _ => device.resolve().map_err(|e| e.to_string()),
    }
}

/// Whether an MPI launcher (OpenMPI's or MPICH's) started this process.
fn launched_by_mpirun() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"].iter().any(|v| std::env::var_os(v).is_some())
}

/// TURBINE_COLLECTIVES picks what carries the collectives of ranks that are MPI processes;
/// in a process mpirun did not start it has nothing to pick, which its user should hear.
fn note_unused_collectives() {
    let set = std::env::var("TURBINE_COLLECTIVES")
        .is_ok_and(|v| !v.trim().is_empty() && !v.trim().eq_ignore_ascii_case("mpi"));
    if set && !launched_by_mpirun() {
        eprintln!(
            "turbine: TURBINE_COLLECTIVES is for ranks started by mpirun; ignored (in-process ranks share memory)"
        );
    }
}

/// Under an MPI launcher: the world, which must have `tp` processes (tensor parallelism)
/// or `pp` (a pipeline, one stage per process).
#[cfg(feature = "mpi")]
fn mpi_world(
    (tp, pp): (usize, usize),
) -> Result<Option<std::sync::Arc<turbine::engine::parallel::mpi::MpiWorld>>, String> {
    let Some(world) = turbine::engine::parallel::mpi::MpiWorld::from_launcher()? else {
        return Ok(None);
    };
    if tp > 1 && pp > 1 {
        return Err("under mpirun, either --tp or --pp: each process is one rank or one stage".into());
    }
    let (ranks, flag) = if pp > 1 { (pp, "--pp") } else { (tp, "--tp") };
    if world.size() != ranks {
        return Err(format!("started as {} MPI processes for {flag} {ranks}: run mpirun -np {ranks}", world.size()));
    }
    let world = if pp > 1 { world.pipelined() } else { world };
    Ok(Some(std::sync::Arc::new(world)))
}

/// An MPI rank other than 0: follows rank 0 until it ends.
#[cfg(feature = "mpi")]
fn follow(world: &turbine::engine::parallel::mpi::MpiWorld) -> ExitCode {
    // One write, so that mpirun's merged output (and the tests reading it) keep the line whole.
    let line =
        format!("turbine: rank {} of {} (pid {}) following rank 0\n", world.rank(), world.size(), std::process::id());
    std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes()).ok();
    match turbine::engine::parallel::mpi::follow(world) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: rank {}: {e}", world.rank());
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    turbine::engine::memory::tune_allocator();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Bench { model, n_prompt, n_gen, threads, reps, format, parallel, tp, pp, depth, device } => {
            note_unused_collectives();
            let device = match whole_on(device, (tp, pp)) {
                Ok(device) => device,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let threads =
                threads.map_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()), usize::from);
            let args = bench::BenchArgs {
                n_prompt,
                n_gen,
                threads,
                reps: reps.into(),
                format,
                parallel: parallel.into(),
                tp: usize::from(tp) * usize::from(pp),
                depth,
                load_anon_bytes: None,
                ranks_here: usize::from(tp) * usize::from(pp),
            };
            // Under mpirun: the other ranks follow, rank 0 measures the model split over them.
            #[cfg(feature = "mpi")]
            let world = match mpi_world((tp.into(), pp.into())) {
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
                Ok(Some(world)) if world.rank() > 0 => return follow(&world),
                Ok(world) => world,
            };
            let before = bench::rss_anon_bytes();
            let ranks = args.tp;
            let loaded = store::resolve(&model).and_then(|p| {
                #[cfg(feature = "mpi")]
                if let Some(world) = &world {
                    return LoadedModel::load_mpi(&p, world).map(|m| (m, 1));
                }
                let per_rank = (threads / ranks).max(1);
                let here = match (usize::from(tp), usize::from(pp)) {
                    (1, 1) => LoadedModel::load_on(&p, device),
                    (tp, 1) => LoadedModel::load_split(&p, tp, per_rank),
                    (1, pp) => LoadedModel::load_pipeline(&p, pp, per_rank),
                    (tp, pp) => LoadedModel::load_pipeline_split(&p, pp, tp, per_rank),
                };
                here.map(|m| (m, ranks))
            });
            let result = loaded.and_then(|(m, ranks_here)| {
                let loaded = before.zip(bench::rss_anon_bytes()).map(|(b, a)| a.saturating_sub(b));
                bench::bench(&model, &m, &bench::BenchArgs { load_anon_bytes: loaded, ranks_here, ..args })
            });
            #[cfg(feature = "mpi")]
            if let Some(world) = &world {
                world.release_followers();
            }
            result
        }
        Command::Generate(args) => generate(args),
        Command::Tokenize { model, text } => tokenize(&model, &text),
        Command::List => return client_main(client::list),
        Command::Ps => return client_main(client::ps),
        Command::Show { model } => return client_main(|t| client::show(t, &model)),
        Command::Stop { model } => return client_main(|t| client::stop(t, &model)),
        Command::Create { model, file } => return client_main(|t| client::create(t, &model, &file)),
        Command::Cp { source, destination } => return client_main(|t| client::copy(t, &source, &destination)),
        Command::Rm { models } => return client_main(|t| client::remove(t, &models)),
        Command::Run { model, prompt, keep_alive, verbose, think, hidethinking, format, interactive } => {
            let args = client::RunArgs {
                model,
                prompt,
                keep_alive,
                verbose,
                think,
                hide_thinking: hidethinking,
                format,
                interactive,
            };
            return client_main(|t| client::run(t, args));
        }
        Command::Gateway { nodes, config, listen } => {
            if let Err(e) = gateway::run(&gateway::GatewayArgs { listen: listen.args(), nodes, config }) {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            Ok(())
        }
        Command::Keys { command } => {
            if let Err(e) = keys_command(command) {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            Ok(())
        }
        Command::Serve { listen, tp, pp, device } => {
            note_unused_collectives();
            let device = match whole_on(device, (tp, pp)) {
                Ok(device) => device,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            #[cfg(feature = "mpi")]
            match mpi_world((tp.into(), pp.into())) {
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
                Ok(Some(world)) if world.rank() > 0 => return follow(&world),
                Ok(Some(world)) => {
                    let _ = server::MPI_WORLD.set(world);
                    if let Err(e) = server::fail_on_termination() {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                }
                Ok(None) => {}
            }
            if let Err(e) = server::serve(&listen.args(), tp.into(), pp.into(), device) {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
