//! Continuous batching: one thread per loaded model runs every active sequence in each
//! forward pass.
//!
//! Each step builds one batch from the running sequences: one token for each sequence
//! that is generating, and fixed-size chunks of the prompts still being read (chunked
//! prefill, under a token budget). It runs a single forward over the batch, samples each
//! sequence with its own options and seed, and streams each token's text to its request.
//! Finished and cancelled sequences leave the batch at once and give their cache blocks
//! back; their full blocks stay in the prefix cache for later prompts that start the
//! same way. When the block pool runs out, the newest sequence is preempted: its blocks
//! are freed and it is recomputed later, so nothing is dropped.
//!
//! Results do not depend on what else shares a batch: every kernel treats rows
//! independently, a prompt is always cut at the same chunk boundaries, and attention picks
//! its arithmetic from the sequence's own rows (see the CPU backend). They can depend on
//! the cache's history: keys and values reused from the prefix cache, or recomputed after
//! a preemption, were computed in other chunks than a fresh run would use, so they may
//! differ from a fresh run's in the last bits.

use crate::backend::{Backend, KvCache};
use crate::generate::{check_prompt, GenerateOptions, GenerateStats, Generation, LoadedModel, Step, TokenLogprob};
use crate::kv::{KvSpec, KvType};
use crate::model::Batch;
use crate::EngineError;
use rayon::prelude::*;
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};

/// How a scheduler batches and how much cache it has.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Most sequences running at once (each holds a slot of the KV cache).
    pub max_running: usize,
    /// Most requests waiting for a slot; beyond it `submit` refuses.
    pub max_queue: usize,
    /// Tokens of cache to provision per running sequence (the pool holds
    /// `max_running` times this; one sequence may use more while others use less).
    pub tokens_per_seq: usize,
    /// Most tokens one sequence may hold (the model's context length).
    pub max_seq_tokens: usize,
    /// Prompts are fed in chunks of this many tokens.
    pub chunk_tokens: usize,
    /// Prompt-chunk tokens per step, beyond the decode tokens (at least one chunk runs).
    pub step_tokens: usize,
    pub kv_type: KvType,
}

impl SchedulerConfig {
    /// `max_running` sequences of `tokens_per_seq`, with the default chunking.
    pub fn new(max_running: usize, max_queue: usize, tokens_per_seq: usize, max_seq_tokens: usize) -> Self {
        SchedulerConfig {
            max_running: max_running.max(1),
            max_queue,
            tokens_per_seq: tokens_per_seq.max(1),
            max_seq_tokens: max_seq_tokens.max(1),
            chunk_tokens: 256,
            step_tokens: 512,
            kv_type: KvType::F16,
        }
    }

    /// The block pool this configuration asks for.
    pub fn kv_spec(&self, layout: &crate::kv::KvLayout) -> KvSpec {
        let mut spec = KvSpec::for_sequences(layout, self.tokens_per_seq, self.max_running, self.chunk_tokens);
        spec.max_tokens = self.max_seq_tokens;
        spec.with_type(self.kv_type)
    }
}

/// What a request hears back.
#[derive(Debug)]
pub enum SeqEvent {
    /// Final text, in order.
    Text(String),
    /// A generated token's log-probability (when the request asked), before its text.
    Logprob(TokenLogprob),
    Done(GenerateStats),
    Error(EngineError),
}

/// A prompt to complete. `events` returns false once nobody listens any more, which
/// cancels the request; so does setting `cancel`.
pub struct Request {
    pub prompt: Vec<u32>,
    pub opts: GenerateOptions,
    pub events: Box<dyn FnMut(SeqEvent) -> bool + Send>,
    pub cancel: Arc<AtomicBool>,
}

/// Why `submit` refused a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// `max_queue` requests already wait.
    QueueFull,
    /// The scheduler thread has stopped.
    Stopped,
}

/// Live counts, for /api/ps and metrics.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_free: AtomicUsize,
    pub steps: AtomicUsize,
    pub preemptions: AtomicUsize,
    /// Set when a forward pass failed in a way the model cannot recover from (a
    /// tensor-parallel or pipeline group that lost a member, a GPU that failed): the model
    /// must be reloaded.
    pub broken: std::sync::atomic::AtomicBool,
}

/// Handle to a model's scheduler thread.
pub struct Scheduler {
    tx: Mutex<Sender<Request>>,
    max_queue: usize,
    pub stats: Arc<SchedulerStats>,
}

impl Scheduler {
    /// Starts the scheduler thread for a loaded model.
    pub fn start<B>(model: Arc<LoadedModel<B>>, cfg: SchedulerConfig) -> std::io::Result<Scheduler>
    where
        B: Backend + 'static,
        B::Kv: Send,
    {
        let (tx, rx) = channel();
        let stats = Arc::new(SchedulerStats::default());
        let st = stats.clone();
        let max_queue = cfg.max_queue;
        std::thread::Builder::new().name("turbine-scheduler".into()).spawn(move || run(&model, &cfg, &rx, &st))?;
        Ok(Scheduler { tx: Mutex::new(tx), max_queue, stats })
    }

    /// Queues a request; its events arrive through its callback.
    pub fn submit(&self, req: Request) -> Result<(), Refused> {
        if self.stats.waiting.load(Ordering::SeqCst) >= self.max_queue {
            return Err(Refused::QueueFull);
        }
        self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        let tx = self.tx.lock().unwrap_or_else(|e| e.into_inner());
        tx.send(req).map_err(|_| {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            Refused::Stopped
        })
    }
}

/// A request admitted to a cache slot.
struct Running<'m> {
    slot: usize,
    /// Prompt, then each sampled token: everything the cache will hold.
    tokens: Vec<u32>,
    /// How many of `tokens` the cache holds.
    in_cache: usize,
    prompt_len: usize,
    /// Prompt tokens computed (not found in the prefix cache).
    prompt_computed: usize,
    gen: Generation<'m>,
    req: Request,
}

impl Running<'_> {
    fn is_decoding(&self) -> bool {
        self.tokens.len() - self.in_cache == 1 && self.in_cache >= self.prompt_len
    }

    fn send(&mut self, e: SeqEvent) -> bool {
        (self.req.events)(e) && !self.req.cancel.load(Ordering::Relaxed)
    }
}

/// A request waiting for a slot: new, or preempted with what it had generated.
enum Waiting<'m> {
    New(Request),
    Preempted(Box<Running<'m>>),
}

struct State<'m, B: Backend> {
    model: &'m LoadedModel<B>,
    cfg: &'m SchedulerConfig,
    kv: B::Kv,
    free_slots: Vec<usize>,
    waiting: VecDeque<Waiting<'m>>,
    /// In admission order: the last is the newest, preempted first.
    running: Vec<Running<'m>>,
    stats: &'m SchedulerStats,
}

fn run<B: Backend>(model: &LoadedModel<B>, cfg: &SchedulerConfig, rx: &Receiver<Request>, stats: &SchedulerStats) {
    let kv = model.backend.new_kv(&cfg.kv_spec(&model.arch.kv_layout()));
    let mut s = State {
        model,
        cfg,
        kv,
        free_slots: (0..cfg.max_running).rev().collect(),
        waiting: VecDeque::new(),
        running: Vec::new(),
        stats,
    };
    loop {
        let idle = s.running.is_empty() && s.waiting.is_empty();
        let incoming = match idle {
            true => match rx.recv() {
                Ok(r) => vec![r],
                Err(_) => return,
            },
            false => rx.try_iter().collect(),
        };
        s.waiting.extend(incoming.into_iter().map(Waiting::New));
        let stepped = catch_unwind(AssertUnwindSafe(|| {
            s.admit();
            s.step();
        }));
        if stepped.is_err() {
            // A fault outside the forward (sampling, streaming): the running requests'
            // state cannot be trusted; they end with an error, the model keeps serving.
            s.fail_running("internal error in the scheduler");
        }
        s.publish();
    }
}

impl<'m, B: Backend> State<'m, B> {
    /// Moves waiting requests into free slots, first come first served.
    fn admit(&mut self) {
        while !self.free_slots.is_empty() {
            let Some(w) = self.waiting.pop_front() else { return };
            let mut r = match w {
                Waiting::Preempted(r) => *r,
                Waiting::New(req) => {
                    self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                    match check_prompt(0, &req.prompt, &req.opts) {
                        Ok(()) => self.start(req),
                        Err(e) => {
                            let mut req = req;
                            (req.events)(SeqEvent::Error(e));
                            continue;
                        }
                    }
                }
            };
            let Some(slot) = self.free_slots.pop() else { return };
            r.slot = slot;
            // Running (and so owning its slot) before anything else can fail.
            self.running.push(r);
            let Some(r) = self.running.last_mut() else { return };
            r.in_cache = self.kv.blocks_mut().attach_prefix(slot, &r.tokens);
            if r.gen.generated().is_empty() {
                r.prompt_computed = r.prompt_len - r.in_cache;
            }
        }
    }

    fn start(&self, req: Request) -> Running<'m> {
        let gen = Generation::new(&self.model.tokenizer, &req.prompt, &req.opts);
        let tokens = req.prompt.clone();
        let prompt_len = tokens.len();
        Running { slot: usize::MAX, tokens, in_cache: 0, prompt_len, prompt_computed: prompt_len, gen, req }
    }

    /// One forward pass over every running sequence that has work.
    fn step(&mut self) {
        self.drop_cancelled();
        let plan = self.plan();
        if plan.is_empty() {
            return;
        }
        let plan = self.reserve(plan);
        if plan.is_empty() {
            return;
        }
        let mut batch = Batch::default();
        for &(i, n) in &plan {
            let r = &self.running[i];
            let end = r.in_cache + n;
            for (pos, &t) in r.tokens[r.in_cache..end].iter().enumerate() {
                batch.push(r.slot, (r.in_cache + pos) as u32, t, end == r.tokens.len() && pos + 1 == n);
            }
        }
        let (model, kv) = (self.model, &mut self.kv);
        let result = catch_unwind(AssertUnwindSafe(|| model.arch.forward(&model.backend, &batch, kv)));
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        let logits = match result {
            Ok(Ok(l)) => l,
            failed => {
                let message = match failed {
                    Ok(Err(e)) => {
                        // A group that lost a rank, or a GPU that failed (its errors may
                        // persist): the server loads the model afresh for the next request.
                        if matches!(e, EngineError::TensorParallel(_) | EngineError::Device { .. }) {
                            self.stats.broken.store(true, Ordering::SeqCst);
                        }
                        e.to_string()
                    }
                    _ => "internal error in the engine".to_string(),
                };
                let mut failed: Vec<usize> = plan.iter().map(|&(i, _)| i).collect();
                failed.sort_unstable();
                for i in failed.into_iter().rev() {
                    let mut r = self.running.remove(i);
                    r.send(SeqEvent::Error(EngineError::BadBatch(message.clone())));
                    self.release(r.slot);
                }
                return;
            }
        };
        for &(i, n) in &plan {
            self.running[i].in_cache += n;
        }
        self.sample(&logits, &batch);
    }

    /// (running index, tokens to feed), in admission order: one token for every decoding
    /// sequence, and prompt chunks while the step's budget lasts (at least one).
    fn plan(&self) -> Vec<(usize, usize)> {
        let mut plan: Vec<(usize, usize)> = Vec::new();
        let mut prefill = 0usize;
        for (i, r) in self.running.iter().enumerate() {
            let left = r.tokens.len() - r.in_cache;
            if left == 0 {
                continue;
            }
            if r.is_decoding() {
                plan.push((i, 1));
                continue;
            }
            // Chunks end at fixed offsets of the prompt, whatever else runs.
            let n = left.min(self.cfg.chunk_tokens - r.in_cache % self.cfg.chunk_tokens);
            if prefill > 0 && prefill + n > self.cfg.step_tokens {
                continue;
            }
            prefill += n;
            plan.push((i, n));
        }
        plan
    }

    /// Grows each planned sequence's blocks, preempting the newest sequences when the pool
    /// runs out. Returns the plan that can run (indices into the remaining `running`).
    fn reserve(&mut self, mut plan: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
        let mut k = 0;
        while k < plan.len() {
            let (i, n) = plan[k];
            let (slot, len) = (self.running[i].slot, self.running[i].in_cache + n);
            match self.kv.blocks_mut().grow(slot, len) {
                Ok(()) => k += 1,
                Err(EngineError::KvCacheFull { .. }) if self.running.len() > 1 => {
                    let victim = self.running.len() - 1;
                    self.preempt(victim);
                    plan.retain(|&(j, _)| j != victim);
                    // Growing again is a no-op for those already grown.
                    k = 0;
                }
                Err(e) => {
                    let mut r = self.running.remove(i);
                    r.send(SeqEvent::Error(e));
                    self.release(r.slot);
                    plan.remove(k);
                    plan.iter_mut().for_each(|(j, _)| *j -= usize::from(*j > i));
                }
            }
        }
        plan
    }

    /// Frees a running sequence's blocks and queues it to be recomputed first.
    fn preempt(&mut self, i: usize) {
        let mut r = self.running.remove(i);
        self.release(r.slot);
        r.in_cache = 0;
        self.stats.preemptions.fetch_add(1, Ordering::Relaxed);
        self.waiting.push_front(Waiting::Preempted(Box::new(r)));
    }

    fn release(&mut self, slot: usize) {
        self.kv.clear(slot);
        self.free_slots.push(slot);
    }

    /// Samples every sequence whose last token was fed, in parallel, then streams the
    /// text and retires the finished.
    fn sample(&mut self, logits: &crate::model::Logits, batch: &Batch) {
        let mut rows: Vec<Option<&[f32]>> = vec![None; self.running.len()];
        for (k, &b) in logits.rows.iter().enumerate() {
            if let Some(i) = self.running.iter().position(|r| r.slot == batch.layout.seqs[b]) {
                rows[i] = Some(logits.row(k));
            }
        }
        let steps: Vec<Option<Step>> =
            self.running.par_iter_mut().zip(rows).map(|(r, row)| row.map(|l| r.gen.step(l, r.in_cache))).collect();
        let mut finished = Vec::new();
        for (i, step) in steps.into_iter().enumerate() {
            let r = &mut self.running[i];
            if let Some(lp) = r.gen.take_logprob() {
                if !r.send(SeqEvent::Logprob(lp)) {
                    finished.push(i);
                    continue;
                }
            }
            match step {
                None => {}
                Some(Step::Continue { token, text }) => {
                    r.tokens.push(token);
                    if !text.is_empty() && !r.send(SeqEvent::Text(text)) {
                        finished.push(i);
                    }
                }
                Some(Step::Finished { reason, text }) => {
                    if !text.is_empty() {
                        r.send(SeqEvent::Text(text));
                    }
                    let stats = r.gen.stats(reason, r.prompt_computed);
                    r.send(SeqEvent::Done(stats));
                    finished.push(i);
                }
            }
        }
        for i in finished.into_iter().rev() {
            let r = self.running.remove(i);
            self.release(r.slot);
        }
    }

    fn fail_running(&mut self, message: &str) {
        for mut r in std::mem::take(&mut self.running) {
            r.send(SeqEvent::Error(EngineError::BadBatch(message.to_string())));
            self.release(r.slot);
        }
    }

    /// Retires requests whose client has gone.
    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].req.cancel.load(Ordering::Relaxed) {
                let r = self.running.remove(i);
                self.release(r.slot);
            } else {
                i += 1;
            }
        }
        let stats = self.stats;
        self.waiting.retain(|w| match w {
            Waiting::New(req) => {
                let keep = !req.cancel.load(Ordering::Relaxed);
                if !keep {
                    stats.waiting.fetch_sub(1, Ordering::SeqCst);
                }
                keep
            }
            Waiting::Preempted(r) => !r.req.cancel.load(Ordering::Relaxed),
        });
    }

    fn publish(&self) {
        let (used, free) = self.kv.blocks().usage();
        self.stats.running.store(self.running.len(), Ordering::Relaxed);
        self.stats.kv_blocks_used.store(used, Ordering::Relaxed);
        self.stats.kv_blocks_free.store(free, Ordering::Relaxed);
    }
}
