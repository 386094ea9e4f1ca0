//! Engine workers: one thread per loaded model owns its `LoadedModel` and runs the jobs
//! sent to it, one at a time, streaming events back. HTTP threads never run kernels.
//! (Continuous batching will replace the one-job-at-a-time loop behind the same `submit`.)

use super::catalog::Entry;
use super::host::KeepAlive;
use super::template::ChatTemplate;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use turbine::engine::backend::cpu::CpuBackend;
use turbine::engine::generate::{DoneReason, GenerateOptions, LoadedModel, Session};
use turbine::engine::sampler::SamplerParams;

/// What a job asks of the model.
pub enum JobInput {
    /// Only make sure the model is loaded.
    Load,
    /// Continue `prompt` (templated already), after the `context` token ids if any.
    Generate { prompt: String, context: Vec<u32>, messages: Option<Vec<super::template::Message>> },
}

/// Generation settings of a job (Ollama's options, already validated).
#[derive(Clone, Debug)]
pub struct JobOptions {
    pub num_predict: Option<usize>,
    pub num_ctx: usize,
    pub sampler: SamplerParams,
    pub stop: Vec<String>,
    /// Drop the oldest prompt tokens when the prompt does not fit (else an error).
    pub truncate: bool,
    pub keep_alive: KeepAlive,
}

pub struct Job {
    pub input: JobInput,
    pub opts: JobOptions,
    pub events: Sender<Event>,
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
}

pub enum Event {
    Text(String),
    Done(Done),
    /// `status` is the HTTP status to use if nothing was streamed yet.
    Error {
        status: u16,
        message: String,
    },
}

/// A model's worker thread, seen from the HTTP side.
pub struct ModelWorker {
    pub entry: Entry,
    tx: Mutex<Sender<Job>>,
    state: Arc<WorkerState>,
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
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ModelWorker {
    /// Starts the thread; the model loads there, before the first job runs.
    fn start(entry: Entry) -> ModelWorker {
        let (tx, rx) = channel::<Job>();
        let state = Arc::new(WorkerState {
            pending: AtomicUsize::new(0),
            expires_at: Mutex::new(None),
            num_ctx: AtomicUsize::new(0),
            loaded: AtomicUsize::new(0),
        });
        let (path, st) = (entry.blob.clone(), state.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("engine:{}", entry.name))
            .spawn(move || worker_loop(&path, rx, &st));
        if let Err(e) = spawned {
            eprintln!("turbine serve: cannot start an engine thread: {e}");
        }
        ModelWorker { entry, tx: Mutex::new(tx), state }
    }

    /// Queues a job; its events arrive on the returned channel.
    pub fn submit(&self, input: JobInput, opts: JobOptions) -> Receiver<Event> {
        let (etx, erx) = channel();
        self.state.pending.fetch_add(1, Ordering::SeqCst);
        let job = Job { input, opts, events: etx };
        if let Err(e) = lock(&self.tx).send(job) {
            self.state.pending.fetch_sub(1, Ordering::SeqCst);
            let _ = e.0.events.send(Event::Error { status: 500, message: "model runner has stopped".into() });
        }
        erx
    }

    pub fn is_loaded(&self) -> bool {
        self.state.loaded.load(Ordering::SeqCst) == 1
    }

    pub fn expires_at(&self) -> Option<SystemTime> {
        *lock(&self.state.expires_at)
    }

    pub fn context_length(&self) -> usize {
        self.state.num_ctx.load(Ordering::SeqCst)
    }

    fn idle_and_expired(&self, now: SystemTime) -> bool {
        let failed = self.state.loaded.load(Ordering::SeqCst) == 2;
        self.state.pending.load(Ordering::SeqCst) == 0 && (failed || self.expires_at().is_some_and(|t| t <= now))
    }
}

fn worker_loop(path: &std::path::Path, rx: Receiver<Job>, state: &WorkerState) {
    let loaded = catch_unwind(|| LoadedModel::load(path));
    let model = match loaded {
        Ok(Ok(m)) => m,
        failed => {
            let message = match failed {
                Ok(Err(e)) => format!("error loading model: {e}"),
                _ => "error loading model: internal error".to_string(),
            };
            eprintln!("turbine serve: {message}");
            state.loaded.store(2, Ordering::SeqCst);
            // Answer what is queued; the registry drops this worker once idle.
            while let Ok(job) = rx.recv_timeout(Duration::from_millis(50)) {
                let _ = job.events.send(Event::Error { status: 500, message: message.clone() });
                state.pending.fetch_sub(1, Ordering::SeqCst);
            }
            return;
        }
    };
    state.loaded.store(1, Ordering::SeqCst);
    let template = ChatTemplate::for_model(&model.file);
    let mut load_duration = model.load_time;
    for job in rx {
        let num_ctx = job.opts.num_ctx.clamp(4, model.arch.info().context_length.max(4));
        state.num_ctx.store(num_ctx, Ordering::SeqCst);
        let result = catch_unwind(AssertUnwindSafe(|| run_job(&model, &template, &job, num_ctx, load_duration)));
        let event = match result {
            Ok(Ok(Some(done))) => Some(Event::Done(done)),
            Ok(Ok(None)) => None,
            Ok(Err((status, message))) => Some(Event::Error { status, message }),
            Err(_) => Some(Event::Error { status: 500, message: "internal error in the engine".into() }),
        };
        load_duration = Duration::ZERO;
        *lock(&state.expires_at) = match job.opts.keep_alive {
            KeepAlive::Forever => None,
            KeepAlive::For(d) => Some(SystemTime::now() + d),
        };
        state.pending.fetch_sub(1, Ordering::SeqCst);
        if let Some(e) = event {
            let _ = job.events.send(e);
        }
    }
}

/// Runs one job; Ok(None) when the client went away.
fn run_job(
    model: &LoadedModel<CpuBackend>,
    template: &ChatTemplate,
    job: &Job,
    num_ctx: usize,
    load_duration: Duration,
) -> Result<Option<Done>, (u16, String)> {
    let (prompt, context, messages) = match &job.input {
        JobInput::Load => return Ok(Some(Done { done_reason: "load", load_duration, ..Done::default() })),
        JobInput::Generate { prompt, context, messages } => (prompt, context, messages),
    };
    let rendered;
    let (text, add_bos) = match messages {
        Some(m) => {
            rendered = template.render(m).map_err(|e| (400, e))?;
            (&rendered, !template.starts_with_bos(&rendered))
        }
        None => (prompt, true),
    };
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
    };
    let mut session = Session::new(model, num_ctx);
    let stats = session
        .generate(&ids, &opts, |t| job.events.send(Event::Text(t.to_string())).is_ok())
        .map_err(|e| (500, e.to_string()))?;
    let done_reason = match stats.done_reason {
        DoneReason::Stop => "stop",
        DoneReason::Length => "length",
        DoneReason::Cancelled => return Ok(None),
    };
    let eval_count = stats.generated.len();
    ids.extend(&stats.generated);
    Ok(Some(Done {
        done_reason,
        load_duration,
        prompt_eval_count: stats.prompt_tokens,
        prompt_eval_duration: stats.prompt_time,
        eval_count,
        eval_duration: stats.gen_time,
        context: ids,
    }))
}

/// The loaded (or loading) models by display name.
#[derive(Default)]
pub struct Models {
    workers: Mutex<HashMap<String, Arc<ModelWorker>>>,
}

impl Models {
    /// The worker for an installed model, started if needed.
    pub fn get(&self, entry: &Entry) -> Arc<ModelWorker> {
        let mut w = lock(&self.workers);
        if let Some(existing) = w.get(&entry.name) {
            let failed = existing.state.loaded.load(Ordering::SeqCst) == 2;
            if existing.entry.digest == entry.digest && !failed {
                return existing.clone();
            }
        }
        let worker = Arc::new(ModelWorker::start(entry.clone()));
        w.insert(entry.name.clone(), worker.clone());
        worker
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
