//! Engine workers: one thread per loaded model loads it, starts its continuous-batching
//! scheduler, and turns each job (template, tokenization, context checks) into a scheduler
//! request whose events stream back to the HTTP thread. HTTP threads never run kernels.

use super::catalog::Entry;
use super::host::KeepAlive;
use super::metrics::Metrics;
use super::output::{OutputParser, ThinkFormat};
use super::ratelimit::Limiter;
use super::template::{ChatTemplate, Think};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};
use turbine::engine::backend::cpu::CpuBackend;
use turbine::engine::generate::{Device, DoneReason, GenerateOptions, LoadedModel, TokenLogprob};
use turbine::engine::json_format::JsonFormat;
use turbine::engine::kv::{KvLayout, KvType, BLOCK_TOKENS};
use turbine::engine::sampler::SamplerParams;
use turbine::engine::scheduler::{Refused, Request, Scheduler, SchedulerConfig, SchedulerStats, SeqEvent};
use turbine::engine::tokenizer::Tokenizer;
use turbine::engine::EngineError;

/// What a job asks of the model.
pub enum JobInput {
    /// Only make sure the model is loaded.
    Load,
    /// Continue `prompt` (templated already), after the `context` token ids if any; or
    /// `messages` through the model's template, filling in before `suffix` if not empty,
    /// with the request's `think`.
    Generate {
        prompt: String,
        context: Vec<u32>,
        messages: Option<Vec<super::template::Message>>,
        suffix: String,
        think: Think,
        /// The tools a chat request offers (`[{"type": "function", "function": {…}}]`).
        tools: Option<serde_json::Value>,
    },
    /// One normalized embedding per input text.
    Embed { inputs: Vec<String> },
}

/// Generation settings of a job (Ollama's options, already validated).
#[derive(Clone, Debug)]
pub struct JobOptions {
    pub num_predict: Option<usize>,
    pub num_ctx: usize,
    pub sampler: SamplerParams,
    pub stop: Vec<String>,
    /// Report each generated token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
    /// Drop the oldest prompt tokens when the prompt does not fit (else an error).
    pub truncate: bool,
    pub keep_alive: KeepAlive,
    /// Structured output (`format` / `response_format`).
    pub format: Option<Arc<JsonFormat>>,
}

pub struct Job {
    pub input: JobInput,
    pub opts: JobOptions,
    events: Sender<Event>,
    /// Tokens the job has used so far, read by its `Events`.
    counts: Arc<TokenCounts>,
    /// Counts the job as pending until dropped (whichever way the job ends).
    guard: JobGuard,
    /// Set when the HTTP side stops listening.
    cancel: Arc<AtomicBool>,
}

impl Job {
    /// Sends the job's last event, after marking it finished (so a client that reacts to
    /// the answer, e.g. by unloading, sees the model idle).
    fn finish(self, event: Event) {
        let Job { events, guard, .. } = self;
        drop(guard);
        let _ = events.send(event);
    }
}

/// Prompt and generated tokens of a job, counted by the engine side as they are used.
#[derive(Default)]
pub struct TokenCounts {
    prompt: AtomicUsize,
    generated: AtomicUsize,
}

/// A job's events, seen from the HTTP side; dropping it cancels the job. Each `recv`
/// also charges the tokens used since the last one to the request's meter.
pub struct Events {
    rx: Receiver<Event>,
    cancel: Arc<AtomicBool>,
    counts: Arc<TokenCounts>,
    meter: Meter,
    /// Tokens already charged: (prompt, generated).
    charged: (usize, usize),
    submitted: Instant,
    last_token_at: Option<Instant>,
}

impl Events {
    pub fn recv(&mut self) -> Result<Event, std::sync::mpsc::RecvError> {
        let event = self.rx.recv();
        self.settle();
        event
    }

    pub fn recv_timeout(&mut self, wait: Duration) -> Result<Event, std::sync::mpsc::RecvTimeoutError> {
        let event = self.rx.recv_timeout(wait);
        self.settle();
        event
    }

    /// Charges new tokens and times them (first token, then the gaps between tokens).
    fn settle(&mut self) {
        let prompt = self.counts.prompt.load(Ordering::SeqCst);
        let generated = self.counts.generated.load(Ordering::SeqCst);
        let (new_prompt, new_generated) =
            (prompt.saturating_sub(self.charged.0), generated.saturating_sub(self.charged.1));
        if new_prompt + new_generated == 0 {
            return;
        }
        self.charged = (prompt.max(self.charged.0), generated.max(self.charged.1));
        self.meter.charge(new_prompt, new_generated);
        if new_generated > 0 {
            let now = Instant::now();
            match self.last_token_at {
                None => self.meter.metrics.time_to_first_token.observe(now - self.submitted),
                Some(t) => {
                    let gap = (now - t) / new_generated as u32;
                    for _ in 0..new_generated.min(64) {
                        self.meter.metrics.time_per_output_token.observe(gap);
                    }
                }
            }
            self.last_token_at = Some(now);
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        self.settle();
    }
}

/// Where a request's token usage goes: the server's metrics and, for a request made with
/// an API key, that key's token bucket.
#[derive(Clone)]
pub struct Meter {
    pub metrics: Arc<Metrics>,
    pub key: Option<(Arc<Limiter>, String)>,
}

impl Meter {
    pub fn charge(&self, prompt: usize, generated: usize) {
        self.metrics.prompt_tokens.fetch_add(prompt as u64, Ordering::Relaxed);
        self.metrics.generated_tokens.fetch_add(generated as u64, Ordering::Relaxed);
        if let Some((limiter, id)) = &self.key {
            limiter.charge(id, (prompt + generated) as u64);
        }
    }
}

/// Final statistics of a job (Ollama's final-chunk fields).
#[derive(Clone, Debug, Default)]
pub struct Done {
    /// "stop", "length" or "load".
    pub done_reason: &'static str,
    pub load_duration: Duration,
    pub prompt_eval_count: usize,
    pub prompt_eval_duration: Duration,
    pub eval_count: usize,
    pub eval_duration: Duration,
    /// Prompt plus generated token ids.
    pub context: Vec<u32>,
    /// For embedding jobs, one vector per input.
    pub embeddings: Vec<Vec<f32>>,
}

pub enum Event {
    Text(String),
    /// Reasoning of a thinking model, when the request asked for it (`think`).
    Thinking(String),
    /// A tool call, `{"function": {"name", "arguments": {…}}}`.
    ToolCall(serde_json::Value),
    /// A generated token's log-probability as Ollama and OpenAI shape it, before its text.
    Logprob(serde_json::Value),
    Done(Done),
    /// `status` is the HTTP status to use if nothing was streamed yet.
    Error {
        status: u16,
        message: String,
    },
}

/// Set once when the engine cannot go on (a tensor-parallel MPI rank was lost): waiting
/// requests are answered with it.
static ENGINE_FAILURE: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Why the engine cannot go on, once it cannot.
pub fn engine_failure() -> Option<&'static str> {
    ENGINE_FAILURE.get().copied()
}

/// Marks the engine as failed with `why`, for every waiting request.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub fn fail_engine(why: &'static str) {
    let _ = ENGINE_FAILURE.set(why);
}

/// Serving limits, from the environment (Ollama's names where Ollama has one).
#[derive(Clone, Debug, PartialEq)]
pub struct EngineLimits {
    /// OLLAMA_NUM_PARALLEL: sequences running at once per model (None: what the KV cache
    /// budget allows, at most AUTO_MAX_PARALLEL).
    pub num_parallel: Option<usize>,
    /// OLLAMA_MAX_QUEUE: requests waiting per model before 503.
    pub max_queue: usize,
    /// TURBINE_KV_CACHE_MB: KV cache budget per model when OLLAMA_NUM_PARALLEL is unset.
    pub kv_cache_mb: usize,
    /// Cache provisioned per sequence (OLLAMA_CONTEXT_LENGTH, default 4096).
    pub num_ctx: usize,
    /// OLLAMA_MAX_LOADED_MODELS: models resident at once (default 3, Ollama's per-device
    /// default).
    pub max_loaded: usize,
    /// TURBINE_MAX_MEMORY_MB: weights plus KV pools of the resident models (default: the
    /// memory available when the server starts).
    pub max_memory_mb: usize,
    /// OLLAMA_KV_CACHE_TYPE: f16 (default) or f32.
    pub kv_type: KvType,
    /// `turbine serve --tp N`: each model split over N tensor-parallel ranks (threads of
    /// this process, the cores shared evenly); 1: whole.
    pub tensor_parallel: usize,
    /// `turbine serve --pp M`: each model split into M pipeline stages; 1: whole.
    pub pipeline_stages: usize,
    /// `turbine serve --device`: where whole models run.
    pub device: Device,
}

/// Most sequences the automatic OLLAMA_NUM_PARALLEL picks.
pub const AUTO_MAX_PARALLEL: usize = 32;

impl Default for EngineLimits {
    fn default() -> Self {
        EngineLimits {
            num_parallel: None,
            max_queue: 512,
            kv_cache_mb: 1024,
            num_ctx: super::options::default_num_ctx(),
            max_loaded: 3,
            max_memory_mb: available_memory_mb().unwrap_or(usize::MAX >> 20),
            kv_type: KvType::F16,
            tensor_parallel: 1,
            pipeline_stages: 1,
            device: Device::Cpu,
        }
    }
}

impl EngineLimits {
    /// Reads the environment; a value that is set but unusable is an error naming it.
    pub fn from_env() -> Result<EngineLimits, String> {
        let var = |name: &str, max: usize| -> Result<Option<usize>, String> {
            match std::env::var(name) {
                Err(_) => Ok(None),
                Ok(v) if v.trim().is_empty() => Ok(None),
                Ok(v) => match v.trim().parse::<usize>() {
                    Ok(n) if n <= max => Ok(Some(n)),
                    _ => Err(format!("{name}={v:?}: expected a whole number from 0 to {max}")),
                },
            }
        };
        let d = EngineLimits::default();
        Ok(EngineLimits {
            num_parallel: var("OLLAMA_NUM_PARALLEL", 1024)?.filter(|&n| n > 0),
            max_queue: var("OLLAMA_MAX_QUEUE", 1 << 20)?.unwrap_or(d.max_queue),
            kv_cache_mb: var("TURBINE_KV_CACHE_MB", 1 << 30)?.unwrap_or(d.kv_cache_mb).max(1),
            num_ctx: d.num_ctx,
            max_loaded: var("OLLAMA_MAX_LOADED_MODELS", 1024)?.filter(|&n| n > 0).unwrap_or(d.max_loaded),
            max_memory_mb: var("TURBINE_MAX_MEMORY_MB", 1 << 30)?.filter(|&n| n > 0).unwrap_or(d.max_memory_mb),
            kv_type: match std::env::var("OLLAMA_KV_CACHE_TYPE") {
                Ok(v) => KvType::parse(&v).map_err(|e| format!("OLLAMA_KV_CACHE_TYPE: {e}"))?,
                Err(_) => d.kv_type,
            },
            tensor_parallel: d.tensor_parallel,
            pipeline_stages: d.pipeline_stages,
            device: d.device,
        })
    }

    /// The scheduler of a model whose cache looks like `layout`.
    fn scheduler_config(&self, layout: &KvLayout, context_length: usize) -> SchedulerConfig {
        let per_seq = self.num_ctx.clamp(4, context_length.max(4));
        let parallel = self.num_parallel.unwrap_or_else(|| {
            let one = SchedulerConfig::new(1, 0, per_seq, context_length).kv_spec(layout);
            let one = one.with_type(self.kv_type).pool_bytes().max(1);
            (self.kv_cache_mb.saturating_mul(1 << 20) / one).clamp(1, AUTO_MAX_PARALLEL)
        });
        // One sequence may use the whole pool, never more: a longer context could only
        // end in a full cache after preempting everyone else.
        let pool_tokens = parallel.saturating_mul(per_seq.div_ceil(BLOCK_TOKENS) * BLOCK_TOKENS);
        let mut cfg = SchedulerConfig::new(parallel, self.max_queue, per_seq, context_length.min(pool_tokens));
        cfg.kv_type = self.kv_type;
        cfg
    }
}

/// MemAvailable from /proc/meminfo, in MiB.
fn available_memory_mb() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Ollama's answer when the queue is full.
pub const BUSY: &str = "server busy, please try again.  maximum pending requests exceeded";

/// A model's worker thread, seen from the HTTP side.
pub struct ModelWorker {
    pub entry: Entry,
    tx: Mutex<Sender<Job>>,
    state: Arc<WorkerState>,
    last_used: Mutex<Instant>,
}

/// Shared between the worker thread and the registry.
struct WorkerState {
    /// Jobs submitted and not yet finished.
    pending: AtomicUsize,
    /// When the model may be unloaded (None: never), set after each job.
    expires_at: Mutex<Option<SystemTime>>,
    /// Context length of the last job, for /api/ps.
    num_ctx: AtomicUsize,
    /// Set once the model is in memory.
    loaded: AtomicUsize,
    /// Bytes of the KV cache pool, once the scheduler runs.
    kv_bytes: AtomicUsize,
    /// Bytes the weights hold beyond the mapped file (repacked copies, column shares), once
    /// loaded.
    owned_bytes: AtomicUsize,
    /// Set once loaded when the model runs on a GPU (its weights and cache in GPU memory).
    on_gpu: AtomicBool,
    scheduler_stats: Mutex<Option<Arc<SchedulerStats>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ModelWorker {
    /// Starts the thread; the model loads there, before the first job runs.
    fn start(entry: Entry, limits: EngineLimits) -> ModelWorker {
        let (tx, rx) = channel::<Job>();
        let state = Arc::new(WorkerState {
            pending: AtomicUsize::new(0),
            expires_at: Mutex::new(None),
            num_ctx: AtomicUsize::new(0),
            loaded: AtomicUsize::new(0),
            kv_bytes: AtomicUsize::new(0),
            owned_bytes: AtomicUsize::new(0),
            on_gpu: AtomicBool::new(false),
            scheduler_stats: Mutex::new(None),
        });
        let (path, template, st) = (entry.blob.clone(), entry.template.clone(), state.clone());
        let name = entry.name.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("engine:{}", entry.name))
            .spawn(move || worker_loop(&path, &name, template.as_deref(), rx, &st, &limits));
        if let Err(e) = spawned {
            eprintln!("turbine serve: cannot start an engine thread: {e}");
        }
        ModelWorker { entry, tx: Mutex::new(tx), state, last_used: Mutex::new(Instant::now()) }
    }

    /// Queues a job; its events arrive on the returned channel, its usage goes to `meter`.
    pub fn submit(&self, input: JobInput, opts: JobOptions, meter: &Meter) -> Events {
        let (etx, erx) = channel();
        self.state.pending.fetch_add(1, Ordering::SeqCst);
        let guard = JobGuard { state: self.state.clone(), keep_alive: opts.keep_alive };
        let cancel = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(TokenCounts::default());
        let job = Job { input, opts, events: etx, counts: counts.clone(), guard, cancel: cancel.clone() };
        if let Err(e) = lock(&self.tx).send(job) {
            e.0.finish(Event::Error { status: 500, message: "model runner has stopped".into() });
        }
        Events {
            rx: erx,
            cancel,
            counts,
            meter: meter.clone(),
            charged: (0, 0),
            submitted: Instant::now(),
            last_token_at: None,
        }
    }

    /// The running scheduler's live figures (None until the model is loaded).
    pub fn scheduler_stats(&self) -> Option<Arc<SchedulerStats>> {
        lock(&self.state.scheduler_stats).clone()
    }

    pub fn is_loaded(&self) -> bool {
        self.state.loaded.load(Ordering::SeqCst) == 1
    }

    pub fn expires_at(&self) -> Option<SystemTime> {
        *lock(&self.state.expires_at)
    }

    /// Memory the model holds (or will hold): its mapped file, what its weights hold
    /// beyond it (repacked copies; known once loaded) and its KV cache pool.
    pub fn resident_bytes(&self) -> u64 {
        let own = self.state.kv_bytes.load(Ordering::SeqCst) + self.state.owned_bytes.load(Ordering::SeqCst);
        self.entry.size.saturating_add(own as u64)
    }

    /// Of [`ModelWorker::resident_bytes`], those in GPU memory (all of them, or none).
    pub fn gpu_bytes(&self) -> u64 {
        match self.state.on_gpu.load(Ordering::SeqCst) {
            true => self.resident_bytes(),
            false => 0,
        }
    }

    pub fn context_length(&self) -> usize {
        self.state.num_ctx.load(Ordering::SeqCst)
    }

    fn idle_and_expired(&self, now: SystemTime) -> bool {
        self.state.pending.load(Ordering::SeqCst) == 0
            && (self.has_failed() || self.expires_at().is_some_and(|t| t <= now))
    }

    /// Whether the model failed to load, or broke since (a tensor-parallel or pipeline
    /// group that lost a member): the next request for it loads it afresh.
    fn has_failed(&self) -> bool {
        let broken = lock(&self.state.scheduler_stats).as_ref().is_some_and(|s| s.broken.load(Ordering::SeqCst));
        self.state.loaded.load(Ordering::SeqCst) == 2 || broken
    }
}

/// Marks a job finished when dropped (with its request, whichever way it ends).
struct JobGuard {
    state: Arc<WorkerState>,
    keep_alive: KeepAlive,
}

impl Drop for JobGuard {
    fn drop(&mut self) {
        *lock(&self.state.expires_at) = match self.keep_alive {
            KeepAlive::Forever => None,
            KeepAlive::For(d) => Some(SystemTime::now() + d),
        };
        self.state.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Memory the weights of `model` hold in this process beyond the mapped file: repacked
/// copies and column shares, of every rank here (under MPI, rank 0's alone).
fn owned_here(model: &LoadedModel<CpuBackend>) -> usize {
    let ranks = &model.arch.info().rank_weight_bytes;
    #[cfg(feature = "mpi")]
    let ranks = if super::MPI_WORLD.get().is_some() { &ranks[..ranks.len().min(1)] } else { &ranks[..] };
    let owned = match ranks.is_empty() {
        true => model.backend.weight_bytes().owned,
        false => ranks.iter().map(|w| w.owned).sum(),
    };
    usize::try_from(owned).unwrap_or(usize::MAX)
}

/// The model at `path`: whole, split over threads of this process, or, under MPI, split
/// over the processes of the world.
fn load_model(path: &std::path::Path, limits: &EngineLimits) -> Result<LoadedModel<CpuBackend>, EngineError> {
    #[cfg(feature = "mpi")]
    if let Some(world) = super::MPI_WORLD.get() {
        return LoadedModel::load_mpi(path, world);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    match (limits.tensor_parallel.max(1), limits.pipeline_stages.max(1)) {
        (1, 1) => LoadedModel::load_on(path, limits.device),
        (ranks, 1) => LoadedModel::load_split(path, ranks, (cores / ranks).max(1)),
        (1, stages) => LoadedModel::load_pipeline(path, stages, (cores / stages).max(1)),
        (ranks, stages) => LoadedModel::load_pipeline_split(path, stages, ranks, (cores / (ranks * stages)).max(1)),
    }
}

fn worker_loop(
    path: &std::path::Path,
    name: &str,
    template: Option<&str>,
    rx: Receiver<Job>,
    state: &Arc<WorkerState>,
    limits: &EngineLimits,
) {
    let loaded = catch_unwind(|| load_model(path, limits));
    let started = match loaded {
        Ok(Ok(m)) => {
            let model = Arc::new(m);
            let cfg = limits.scheduler_config(&model.arch.kv_layout(), model.arch.info().context_length);
            // Every rank in this process holds a pool like rank 0's (its own heads' keys and
            // values; a pipeline stage's pool has room for every layer, and touches only its
            // own). Under MPI the other ranks' pools are in other processes.
            let ranks = limits.tensor_parallel.max(1);
            #[cfg(feature = "mpi")]
            let pools_here = if super::MPI_WORLD.get().is_some() { 1 } else { ranks };
            #[cfg(not(feature = "mpi"))]
            let pools_here = ranks;
            let kv_bytes = cfg.kv_spec(&model.arch.kv_layout()).pool_bytes().saturating_mul(pools_here);
            state.kv_bytes.store(kv_bytes, Ordering::SeqCst);
            let owned = owned_here(&model);
            state.owned_bytes.store(owned, Ordering::SeqCst);
            state.on_gpu.store(model.backend.offloads(), Ordering::SeqCst);
            eprintln!(
                "turbine serve: loaded {} in {:.2?}{}{} ({} MiB of repacked weights): {} sequences at once, {} tokens of cache each, KV pool {} MiB",
                path.display(),
                model.load_time,
                match (ranks, limits.pipeline_stages) {
                    (1, 0 | 1) => String::new(),
                    (1, stages) => format!(" in {stages} pipeline stages"),
                    (_, 0 | 1) => format!(" over {ranks} tensor-parallel ranks"),
                    (_, stages) => format!(" in {stages} pipeline stages over {ranks} tensor-parallel ranks each"),
                },
                // The device is resolved before serving: never `auto` here.
                if model.backend.offloads() { format!(" on {}", limits.device) } else { String::new() },
                owned >> 20,
                cfg.max_running,
                cfg.tokens_per_seq,
                kv_bytes >> 20
            );
            let max_ctx = cfg.max_seq_tokens.max(4);
            Scheduler::start(model.clone(), cfg)
                .map(|s| (model, s, max_ctx))
                .map_err(|e| format!("error starting the scheduler: {e}"))
        }
        Ok(Err(e)) => Err(format!("error loading model: {e}")),
        Err(_) => Err("error loading model: internal error".to_string()),
    };
    let (model, scheduler, max_ctx) = match started {
        Ok(ms) => ms,
        Err(message) => {
            eprintln!("turbine serve: {message}");
            state.loaded.store(2, Ordering::SeqCst);
            // Answer what is queued; the registry drops this worker once idle.
            // (Jobs still in the channel when it closes are dropped, which ends them too.)
            while let Ok(job) = rx.recv_timeout(Duration::from_millis(50)) {
                job.finish(Event::Error { status: 500, message: message.clone() });
            }
            return;
        }
    };
    *lock(&state.scheduler_stats) = Some(scheduler.stats.clone());
    state.loaded.store(1, Ordering::SeqCst);
    let template = ChatTemplate::for_entry(template, &model.file);
    let mut load_duration = model.load_time;
    for job in rx {
        let num_ctx = job.opts.num_ctx.clamp(4, max_ctx);
        state.num_ctx.store(num_ctx, Ordering::SeqCst);
        if matches!(job.input, JobInput::Embed { .. }) {
            // On a thread of its own, so generation jobs keep flowing to the scheduler.
            let (model, load) = (model.clone(), load_duration);
            let spawned = std::thread::Builder::new()
                .name("turbine-embed".into())
                .spawn(move || run_embed_job(&model, job, num_ctx, load));
            if let Err(e) = spawned {
                eprintln!("turbine serve: cannot start an embedding thread: {e}");
            }
            load_duration = Duration::ZERO;
            continue;
        }
        let prepared = catch_unwind(AssertUnwindSafe(|| prepare(&model, name, &template, &job, num_ctx)));
        let (ids, opts, parsing) = match prepared {
            Ok(Ok(Some(p))) => p,
            Ok(Ok(None)) => {
                job.finish(Event::Done(Done { done_reason: "load", load_duration, ..Done::default() }));
                load_duration = Duration::ZERO;
                continue;
            }
            Ok(Err((status, message))) => {
                job.finish(Event::Error { status, message });
                continue;
            }
            Err(_) => {
                job.finish(Event::Error { status: 500, message: "internal error in the engine".into() });
                continue;
            }
        };
        let Job { events, guard, cancel, counts, .. } = job;
        counts.prompt.store(ids.len(), Ordering::SeqCst);
        let request = Request {
            prompt: ids.clone(),
            opts,
            events: stream_events(events.clone(), ids, load_duration, guard, counts, model.clone(), parsing),
            cancel,
        };
        load_duration = Duration::ZERO;
        // A refused request is dropped inside `submit`, which ends its job first.
        match scheduler.submit(request) {
            Ok(()) => {}
            Err(Refused::QueueFull) => drop(events.send(Event::Error { status: 503, message: BUSY.into() })),
            Err(Refused::Stopped) => {
                drop(events.send(Event::Error { status: 500, message: "model runner has stopped".into() }))
            }
        }
    }
}

/// The scheduler's events for one job, as the HTTP side wants them.
fn stream_events(
    events: Sender<Event>,
    mut ids: Vec<u32>,
    load_duration: Duration,
    guard: JobGuard,
    counts: Arc<TokenCounts>,
    model: Arc<LoadedModel<CpuBackend>>,
    mut parsing: Option<Parsing>,
) -> Box<dyn FnMut(SeqEvent) -> bool + Send> {
    // Held until the request's last event (or until the request is dropped unanswered).
    let mut guard = Some(guard);
    Box::new(move |e| {
        if matches!(e, SeqEvent::Done(_) | SeqEvent::Error(_)) {
            guard.take();
        }
        if matches!(e, SeqEvent::Text(_)) {
            // About one token per piece of text; the exact count comes with Done.
            counts.generated.fetch_add(1, Ordering::SeqCst);
        }
        // A parsed model's text is split into reasoning, answer and tool calls first.
        let split = match (&e, parsing.as_mut()) {
            (SeqEvent::Text(t), Some(p)) => Some(p.parser.push(t)),
            (SeqEvent::Done(_), Some(p)) => Some(p.parser.finish()),
            _ => None,
        };
        if let (Some(split), Some(p)) = (split, parsing.as_ref()) {
            let mut out = Vec::new();
            if p.wanted && !split.thinking.is_empty() {
                out.push(Event::Thinking(split.thinking));
            }
            if !split.content.is_empty() {
                out.push(Event::Text(split.content));
            }
            out.extend(split.calls.into_iter().map(Event::ToolCall));
            if out.into_iter().any(|ev| events.send(ev).is_err()) {
                return false;
            }
        }
        let event = match e {
            SeqEvent::Text(_) if parsing.is_some() => return true, // sent above
            SeqEvent::Text(t) => Event::Text(t),
            SeqEvent::Logprob(lp) => Event::Logprob(logprob_json(&model, &lp)),
            SeqEvent::Error(e) => {
                let status = match e {
                    EngineError::ContextFull { .. } => 400,
                    _ => 500,
                };
                Event::Error { status, message: e.to_string() }
            }
            SeqEvent::Done(stats) => {
                let done_reason = match stats.done_reason {
                    DoneReason::Stop => "stop",
                    DoneReason::Length | DoneReason::Cancelled => "length",
                };
                ids.extend(&stats.generated);
                counts.generated.fetch_max(stats.generated.len(), Ordering::SeqCst);
                Event::Done(Done {
                    done_reason,
                    load_duration,
                    prompt_eval_count: stats.prompt_tokens,
                    prompt_eval_duration: stats.prompt_time,
                    eval_count: stats.generated.len(),
                    eval_duration: stats.gen_time,
                    context: std::mem::take(&mut ids),
                    embeddings: Vec::new(),
                })
            }
        };
        events.send(event).is_ok()
    })
}

/// Runs an embedding job and answers it (embedding requests do not go through the batch).
fn run_embed_job(model: &LoadedModel<CpuBackend>, job: Job, num_ctx: usize, load_duration: Duration) {
    let JobInput::Embed { inputs } = &job.input else { return };
    let done = catch_unwind(AssertUnwindSafe(|| embed_inputs(model, inputs, &job, num_ctx)));
    let event = match done {
        Ok(Ok(d)) => Event::Done(Done { load_duration, ..d }),
        Ok(Err((status, message))) => Event::Error { status, message },
        Err(_) => Event::Error { status: 500, message: "internal error in the engine".into() },
    };
    job.finish(event);
}

/// Embeds each input, stopping early when the client has gone. An input longer than the
/// context is cut to it when `truncate`, else refused.
fn embed_inputs(
    model: &LoadedModel<CpuBackend>,
    inputs: &[String],
    job: &Job,
    num_ctx: usize,
) -> Result<Done, (u16, String)> {
    let opts = &job.opts;
    let start = std::time::Instant::now();
    let mut embeddings = Vec::with_capacity(inputs.len());
    let mut prompt_eval_count = 0;
    for text in inputs {
        if job.cancel.load(Ordering::Relaxed) {
            return Err((499, "request canceled".into()));
        }
        let mut ids = model.tokenizer.encode(text, true, true);
        if ids.len() > num_ctx {
            if !opts.truncate {
                return Err((400, "input length exceeds the context length".into()));
            }
            ids.truncate(num_ctx);
        }
        if ids.is_empty() {
            return Err((400, "input is empty after tokenization".into()));
        }
        prompt_eval_count += ids.len();
        job.counts.prompt.store(prompt_eval_count, Ordering::SeqCst);
        embeddings.push(model.embed(&ids).map_err(|e| (500, e.to_string()))?);
    }
    Ok(Done {
        done_reason: "stop",
        prompt_eval_count,
        prompt_eval_duration: start.elapsed(),
        embeddings,
        ..Done::default()
    })
}

/// `{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`, the entry both
/// Ollama and OpenAI use.
fn logprob_json(model: &LoadedModel<CpuBackend>, lp: &TokenLogprob) -> serde_json::Value {
    let entry = |id: u32, logprob: f32| {
        let bytes = model.tokenizer.token_to_piece(id);
        serde_json::json!({ "token": String::from_utf8_lossy(&bytes), "logprob": logprob, "bytes": bytes })
    };
    let mut v = entry(lp.token, lp.logprob);
    v["top_logprobs"] = lp.top.iter().map(|&(id, l)| entry(id, l)).collect();
    v
}

/// How a model's output is split into reasoning, answer and tool calls, and whether the
/// reasoning is sent.
struct Parsing {
    parser: OutputParser,
    wanted: bool,
}

/// A job's prompt as token ids, its generation options, and how to split its output.
type Prepared = (Vec<u32>, GenerateOptions, Option<Parsing>);

/// A job's prompt and options; None for a load-only job.
fn prepare(
    model: &LoadedModel<CpuBackend>,
    name: &str,
    template: &ChatTemplate,
    job: &Job,
    num_ctx: usize,
) -> Result<Option<Prepared>, (u16, String)> {
    let (prompt, context, messages, suffix, think, tools) = match &job.input {
        JobInput::Load | JobInput::Embed { .. } => return Ok(None),
        JobInput::Generate { prompt, context, messages, suffix, think, tools } => {
            (prompt, context, messages, suffix, think, tools)
        }
    };
    let rendered;
    let (text, add_bos) = match messages {
        Some(m) => {
            rendered = template.render_with(m, suffix, think, tools.as_ref()).map_err(|e| (400, e))?;
            (&rendered, !template.starts_with_bos(&rendered))
        }
        None => (prompt, true),
    };
    // Only output that follows the model's own template is parsed for reasoning and calls.
    let format = template.think_format().filter(|_| messages.is_some());
    if think.asked() && format.is_none() {
        return Err((400, format!("\"{name}\" does not support thinking")));
    }
    let offers_tools = tools.as_ref().and_then(|t| t.as_array()).is_some_and(|t| !t.is_empty());
    if offers_tools && !template.supports_tools() {
        return Err((400, format!("\"{name}\" does not support tools")));
    }
    // Unset is the model's default, as in Ollama: a thinking model thinks, and says so.
    let wanted = *think != Think::Off;
    let parsed = format.or(offers_tools.then_some(ThinkFormat::Tags));
    let parsing = parsed.map(|f| Parsing { parser: OutputParser::new(f, offers_tools, text), wanted });
    let tok = &model.tokenizer;
    if context.iter().any(|&t| t as usize >= tok.n_vocab()) {
        return Err((400, "context holds token ids outside the model's vocabulary".into()));
    }
    let mut ids = context.clone();
    ids.extend(tok.encode(text, add_bos && context.is_empty(), true));
    if ids.is_empty() {
        return Err((400, "prompt is empty after tokenization".into()));
    }
    if ids.len() >= num_ctx {
        if !job.opts.truncate {
            return Err((400, "input length exceeds the context length".into()));
        }
        // Keep the first token (BOS) and the most recent ones.
        let keep = num_ctx / 2;
        let tail = ids.split_off(ids.len() - keep);
        ids.truncate(1);
        ids.extend(tail);
    }
    let opts = GenerateOptions {
        num_predict: job.opts.num_predict,
        num_ctx,
        sampler: job.opts.sampler.clone(),
        stop: job.opts.stop.clone(),
        logprobs: job.opts.logprobs,
        render_special: format == Some(ThinkFormat::Harmony),
        format: job.opts.format.as_ref().map(|f| after_reasoning(f, tok, format, wanted)),
    };
    Ok(Some((ids, opts, parsing)))
}

/// A structured output that begins where the reasoning ends: after harmony's
/// `<|channel|>final<|message|>`, or `</think>` when a tagged model thinks; at once
/// otherwise.
fn after_reasoning(f: &Arc<JsonFormat>, tok: &Tokenizer, think: Option<ThinkFormat>, wanted: bool) -> Arc<JsonFormat> {
    let marker = match (think, wanted) {
        (Some(ThinkFormat::Harmony), _) => "<|channel|>final<|message|>",
        (Some(ThinkFormat::Tags), true) => "</think>",
        _ => return f.clone(),
    };
    Arc::new(f.after(tok.encode(marker, false, true)))
}

/// The loaded (or loading) models by display name.
#[derive(Default)]
pub struct Models {
    workers: Mutex<HashMap<String, Arc<ModelWorker>>>,
    limits: EngineLimits,
}

impl Models {
    pub fn new(limits: EngineLimits) -> Models {
        Models { workers: Mutex::default(), limits }
    }

    /// The worker for an installed model, started if needed. Starting one beyond
    /// OLLAMA_MAX_LOADED_MODELS or the memory budget first unloads idle models, least
    /// recently used first; when every loaded model is busy the answer is Ollama's busy
    /// message (a 503).
    pub fn get(&self, entry: &Entry) -> Result<Arc<ModelWorker>, String> {
        let mut w = lock(&self.workers);
        if let Some(existing) = w.get(&entry.name) {
            if existing.entry.digest == entry.digest && !existing.has_failed() {
                *lock(&existing.last_used) = Instant::now();
                return Ok(existing.clone());
            }
            w.remove(&entry.name);
        }
        let budget = (self.limits.max_memory_mb as u64).saturating_mul(1 << 20);
        let over = |w: &HashMap<String, Arc<ModelWorker>>| {
            let used: u64 = w.values().map(|m| m.resident_bytes()).sum();
            // The new model's KV pool is not known before it loads: count the budget it is
            // sized to.
            let new = entry.size.saturating_add((self.limits.kv_cache_mb as u64).saturating_mul(1 << 20));
            w.len() >= self.limits.max_loaded || (!w.is_empty() && used.saturating_add(new) > budget)
        };
        while over(&w) {
            let idle = w.values().filter(|m| m.state.pending.load(Ordering::SeqCst) == 0);
            let Some(oldest) = idle.min_by_key(|m| *lock(&m.last_used)).map(|m| m.entry.name.clone()) else {
                return Err(BUSY.to_string());
            };
            w.remove(&oldest);
        }
        let worker = Arc::new(ModelWorker::start(entry.clone(), self.limits.clone()));
        w.insert(entry.name.clone(), worker.clone());
        Ok(worker)
    }
    /// Unloads a model now (its thread ends after the jobs it holds).
    pub fn unload(&self, name: &str) -> bool {
        lock(&self.workers).remove(name).is_some()
    }

    /// Drops idle models whose keep_alive has run out.
    pub fn reap(&self) {
        let now = SystemTime::now();
        lock(&self.workers).retain(|_, w| !w.idle_and_expired(now));
    }

    /// The models in memory, for /api/ps.
    pub fn loaded(&self) -> Vec<Arc<ModelWorker>> {
        let mut v: Vec<_> = lock(&self.workers).values().filter(|w| w.is_loaded()).cloned().collect();
        v.sort_by(|a, b| a.entry.name.cmp(&b.entry.name));
        v
    }
}
