//! A model split over the ranks of a group, run as one model.
//!
//! Rank 0 runs on the caller's thread: [`Sharded`] is an [`Architecture`] whose forward
//! pass first hands the step to the other ranks (the followers: threads of this process
//! with their own thread pools, or other processes under MPI, each with its share of the
//! weights and its caches), then computes rank 0's share; the ranks meet in the
//! collectives, and rank 0 returns the gathered logits. So the scheduler, the sampler and
//! the HTTP shell run a split model exactly as they run a whole one.
//!
//! The followers' caches mirror rank 0's: rank 0's caches record the block changes the
//! scheduler makes between steps ([`BlockOp`]), and each step carries them, so every rank
//! holds the same block tables. A follower keeps one cache per cache of rank 0 (the
//! scheduler's, an embedding request's), created on first use and dropped after rank 0
//! drops its own.

use std::collections::HashMap;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use super::{Communicator, InProcess};
use crate::backend::cpu::{CpuBackend, CpuKv};
use crate::backend::{Backend, KvCache, PipelineStage, WeightSizes};
use crate::gguf::Gguf;
use crate::kv::{BlockOp, KvLayout, KvSpec};
use crate::model::{self, Architecture, Batch, Logits, ModelInfo, StageEnd, StageOutput};
use crate::EngineError;

/// A change to the set of rank 0's caches the other ranks mirror.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum CacheStep {
    /// Make a cache like rank 0's cache `id`.
    New { id: u64, spec: KvSpec },
    /// Rank 0 dropped cache `id`.
    Drop { id: u64 },
}

/// What rank 0 tells a follower.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum Step {
    Cache(CacheStep),
    /// Replay `ops` on cache `id`, then run `batch` through it: the logits' forward, or
    /// the hidden states' when `hidden`. Answered with the result.
    Forward {
        id: u64,
        ops: Vec<BlockOp>,
        batch: Batch,
        hidden: bool,
    },
    /// A pipeline stage split over ranks: replay `ops` on cache `id`, then reserve the
    /// blocks of `batch`, whose micro-batches follow. Answered.
    BeginBatch {
        id: u64,
        ops: Vec<BlockOp>,
        batch: Batch,
    },
    /// After `ops` (none, as a rule: the blocks were reserved with the batch), the stage's
    /// layers over micro-batch `batch` of the current batch on cache `id` (see
    /// `Architecture::compute_stage`). Answered.
    Stage {
        id: u64,
        ops: Vec<BlockOp>,
        batch: Batch,
        layers: Range<usize>,
        input: Option<Vec<f32>>,
        end: StageEnd,
    },
    /// After `ops` (none, as a rule), the current batch on cache `id` is done. Not answered.
    EndBatch {
        id: u64,
        ops: Vec<BlockOp>,
        batch: Batch,
    },
}

/// A follower's answer: to its load, the bytes its weights cover (see
/// `CpuBackend::weight_bytes`); to a forward step, nothing.
pub(crate) type Answer = Result<WeightSizes, EngineError>;

/// How rank 0 reaches the other ranks.
pub(crate) trait Followers: Send {
    /// Hands `steps` to every other rank, in order.
    fn send(&mut self, steps: Vec<Step>) -> Result<(), EngineError>;
    /// Every other rank's answer to its last forward step (or to its load), in rank order.
    fn answers(&mut self) -> Vec<Answer>;
    /// A step begins and ends: followers other models share (processes under MPI) take
    /// turns between models for whole steps.
    fn step_begins(&mut self) {}
    fn step_ends(&mut self) {}
}

/// The followers, and rank 0's caches they mirror with handles that die with them.
struct Group {
    followers: Box<dyn Followers>,
    mirrored: Vec<(u64, Weak<()>)>,
}

/// A model split over ranks (tensor parallelism); to its user, one [`Architecture`] over
/// rank 0's backend.
pub struct Sharded {
    /// Rank 0's share of the model, run in its own pool.
    arch: Box<dyn Architecture<CpuBackend>>,
    /// Rank 0's description, with every rank's weight bytes.
    info: ModelInfo,
    pool: rayon::ThreadPool,
    /// Locked for a whole step, so steps from several threads (the scheduler, an
    /// embedding request) reach every rank in the same order.
    group: Mutex<Group>,
    /// Set when rank 0 failed mid-step and left the group: every later step is refused.
    broken: AtomicBool,
}

impl Sharded {
    /// Loads `file` split over `ranks` threads of this process of `threads` threads each:
    /// the backend of rank 0, which the caller passes to every call, and the model.
    pub fn load(file: &Arc<Gguf>, ranks: usize, threads: usize) -> Result<(CpuBackend, Sharded), EngineError> {
        Sharded::load_stage(file, ranks, threads, None)
    }

    /// [`Sharded::load`] of one pipeline stage's layers (`stage`), or of every layer.
    pub(crate) fn load_stage(
        file: &Arc<Gguf>,
        ranks: usize,
        threads: usize,
        stage: Option<PipelineStage>,
    ) -> Result<(CpuBackend, Sharded), EngineError> {
        Sharded::load_over(file, InProcess::group(ranks.max(1)), threads, stage)
    }

    /// [`Sharded::load_stage`] over the ranks of `comms` (one thread of this process each,
    /// `comms[0]` rank 0's): the in-process group, or NCCL's.
    pub(crate) fn load_over<C: Communicator + 'static>(
        file: &Arc<Gguf>,
        comms: Vec<C>,
        threads: usize,
        stage: Option<PipelineStage>,
    ) -> Result<(CpuBackend, Sharded), EngineError> {
        let mut comms = comms.into_iter();
        let first = comms.next().ok_or_else(|| EngineError::TensorParallel("no ranks".into()))?;
        let followers =
            comms.map(|comm| Thread::start(comm, file, threads, stage.clone())).collect::<Result<Vec<_>, _>>()?;
        Sharded::lead(first, file, threads, stage, Box::new(Threads(followers)))
    }

    /// Rank 0's share of `file` over `comm`, leading `followers`, which are loading theirs.
    pub(crate) fn lead(
        comm: impl Communicator + 'static,
        file: &Arc<Gguf>,
        threads: usize,
        stage: Option<PipelineStage>,
        mut followers: Box<dyn Followers>,
    ) -> Result<(CpuBackend, Sharded), EngineError> {
        let backend = stage_of(CpuBackend::tensor_parallel(comm), stage);
        let loaded = thread_pool(threads).and_then(|pool| {
            let arch = catch_unwind(AssertUnwindSafe(|| pool.install(|| model::load(&backend, file))));
            let arch = arch.unwrap_or_else(|_| Err(EngineError::TensorParallel("rank 0 failed loading".into())));
            Ok((pool, arch?))
        });
        // Every follower reports its load, even when rank 0's failed; the first failure
        // is the group's.
        let answers = followers.answers();
        let (pool, arch) = loaded?;
        let mut info = arch.info().clone();
        info.rank_weight_bytes.push(backend.weight_bytes());
        for a in answers {
            info.rank_weight_bytes.push(a?);
        }
        let group = Mutex::new(Group { followers, mirrored: Vec::new() });
        Ok((backend, Sharded { arch, info, pool, group, broken: AtomicBool::new(false) }))
    }

    /// One step on every rank: the followers get it first (`step`, made from the cache's
    /// id and its recorded block changes), then rank 0 runs `run` on its share; the first
    /// error of any rank is the step's. Unanswered steps (`answered` false) return at once.
    fn step<T>(
        &self,
        (backend, kv): (&CpuBackend, &mut CpuKv),
        step: impl FnOnce(u64, Vec<BlockOp>) -> Step,
        answered: bool,
        run: impl FnOnce(&mut CpuKv) -> Result<T, EngineError> + Send,
    ) -> Result<T, EngineError>
    where
        T: Send,
    {
        if self.broken.load(Ordering::SeqCst) {
            return Err(EngineError::TensorParallel("rank 0 left the group after a failure".into()));
        }
        if !kv.blocks().is_recording() {
            // The followers could not follow its block changes.
            return Err(EngineError::TensorParallel("a cache not made by rank 0's backend".into()));
        }
        let mut group = self.group.lock().unwrap_or_else(|e| e.into_inner());
        let Group { followers, mirrored } = &mut *group;
        // Within the step's turn (under MPI, other models' steps wait), ended on every path.
        followers.step_begins();
        let exchange = || {
            let mut steps: Vec<Step> = sync_caches(mirrored, kv).into_iter().map(Step::Cache).collect();
            let id = kv.blocks().identity().0;
            steps.push(step(id, kv.blocks_mut().take_journal()));
            followers.send(steps)?;
            let mine = catch_unwind(AssertUnwindSafe(|| self.pool.install(|| run(kv)))).unwrap_or_else(|_| {
                // The others may be waiting in a collective rank 0 will never join.
                self.broken.store(true, Ordering::SeqCst);
                backend.abandon_group();
                Err(EngineError::TensorParallel("rank 0 failed mid-step and left the group".into()))
            });
            if !answered {
                return mine;
            }
            // Every follower answers, even after an error, so no answer is left for the next step.
            let theirs: Result<Vec<_>, EngineError> = followers.answers().into_iter().collect();
            let out = mine?;
            theirs.map(|_| out)
        };
        let out = exchange();
        followers.step_ends();
        out
    }

    /// A forward pass's step: the logits', or the hidden states' when `hidden`.
    fn forward_step(batch: &Batch, hidden: bool) -> impl FnOnce(u64, Vec<BlockOp>) -> Step + '_ {
        move |id, ops| Step::Forward { id, ops, batch: batch.clone(), hidden }
    }
}

impl Architecture<CpuBackend> for Sharded {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn kv_layout(&self) -> KvLayout {
        self.arch.kv_layout()
    }

    fn compute(&self, backend: &CpuBackend, batch: &Batch, kv: &mut CpuKv) -> Result<Logits, EngineError> {
        let step = Sharded::forward_step(batch, false);
        self.step((backend, kv), step, true, |kv| self.arch.compute(backend, batch, kv))
    }

    fn compute_hidden(&self, backend: &CpuBackend, batch: &Batch, kv: &mut CpuKv) -> Result<Vec<f32>, EngineError> {
        let step = Sharded::forward_step(batch, true);
        self.step((backend, kv), step, true, |kv| self.arch.compute_hidden(backend, batch, kv))
    }

    /// A pipeline stage over ranks: every rank runs its share of the stage's layers.
    fn compute_stage(
        &self,
        backend: &CpuBackend,
        batch: &Batch,
        kv: &mut CpuKv,
        layers: Range<usize>,
        input: Option<Vec<f32>>,
        end: StageEnd,
    ) -> Result<StageOutput, EngineError> {
        let (b, l, x) = (batch.clone(), layers.clone(), input.clone());
        let step = move |id, ops| Step::Stage { id, ops, batch: b, layers: l, input: x, end };
        self.step((backend, kv), step, true, |kv| self.arch.compute_stage(backend, batch, kv, layers, input, end))
    }

    /// The followers reserve the batch's blocks too, after the block changes `ops` that
    /// came with it and those rank 0's cache recorded since.
    fn stage_batch_begins(
        &self,
        backend: &CpuBackend,
        kv: &mut CpuKv,
        batch: &Batch,
        ops: &[BlockOp],
    ) -> Result<(), EngineError> {
        let step = |id, recorded: Vec<BlockOp>| Step::BeginBatch {
            id,
            ops: ops.iter().cloned().chain(recorded).collect(),
            batch: batch.clone(),
        };
        self.step((backend, kv), step, true, |_| Ok(()))
    }

    fn stage_batch_ends(&self, backend: &CpuBackend, kv: &mut CpuKv, batch: &Batch) -> Result<(), EngineError> {
        let step = |id, ops| Step::EndBatch { id, ops, batch: batch.clone() };
        self.step((backend, kv), step, false, |_| Ok(()))
    }

    fn routing_stats(&self) -> Vec<Vec<u64>> {
        self.arch.routing_stats()
    }

    /// Rank 0 runs in its own pool; a step holds the MPI world's turn.
    fn runs_on_global_pool(&self) -> bool {
        false
    }
}

/// The steps that bring the other ranks' caches in line with rank 0's: `kv` made where
/// it is new to them, caches rank 0 has dropped dropped. `mirrored` lists rank 0's caches
/// they hold, with handles that die with them.
pub(crate) fn sync_caches(mirrored: &mut Vec<(u64, Weak<()>)>, kv: &CpuKv) -> Vec<CacheStep> {
    let (id, alive) = kv.blocks().identity();
    let mut steps = Vec::new();
    mirrored.retain(|(old, handle)| {
        let live = handle.strong_count() > 0;
        if !live {
            steps.push(CacheStep::Drop { id: *old });
        }
        live
    });
    if !mirrored.iter().any(|(m, _)| *m == id) {
        steps.push(CacheStep::New { id, spec: kv.blocks().spec().clone() });
        mirrored.push((id, alive));
    }
    steps
}

pub(crate) fn thread_pool(threads: usize) -> Result<rayon::ThreadPool, EngineError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| EngineError::TensorParallel(format!("cannot start a rank's thread pool: {e}")))
}

/// A follower rank: its share of the model and its mirrors of rank 0's caches.
pub(crate) struct Follower {
    backend: CpuBackend,
    arch: Box<dyn Architecture<CpuBackend>>,
    caches: HashMap<u64, CpuKv>,
}

impl Follower {
    /// Loads this rank's share of `file` (on the current thread pool).
    pub(crate) fn load(
        comm: impl Communicator + 'static,
        file: &Arc<Gguf>,
        stage: Option<PipelineStage>,
    ) -> Result<Follower, EngineError> {
        let backend = stage_of(CpuBackend::tensor_parallel(comm), stage);
        let arch = model::load(&backend, file)?;
        Ok(Follower { backend, arch, caches: HashMap::new() })
    }

    /// What its load answers.
    pub(crate) fn loaded(&self) -> Answer {
        Ok(self.backend.weight_bytes())
    }

    /// Makes or drops a mirror of one of rank 0's caches.
    fn mirror(&mut self, step: CacheStep) {
        match step {
            CacheStep::New { id, spec } => {
                self.caches.insert(id, self.backend.new_kv(&spec));
            }
            CacheStep::Drop { id } => {
                self.caches.remove(&id);
            }
        }
    }

    /// Takes one step (on the current thread pool); a forward step's answer.
    pub(crate) fn take(&mut self, step: Step) -> Option<Answer> {
        match step {
            Step::Cache(c) => {
                self.mirror(c);
                None
            }
            Step::Forward { id, ops, batch, hidden } => Some(match self.caches.get_mut(&id) {
                Some(kv) => kv.blocks_mut().apply(&ops).and_then(|()| match hidden {
                    true => self.arch.forward_hidden(&self.backend, &batch, kv).map(|_| WeightSizes::default()),
                    false => self.arch.forward(&self.backend, &batch, kv).map(|_| WeightSizes::default()),
                }),
                None => Err(EngineError::TensorParallel(format!("rank 0's cache {id} is not mirrored"))),
            }),
            Step::BeginBatch { id, ops, batch } => Some(
                self.cache(id)
                    .and_then(|kv| kv.blocks_mut().apply(&ops).and_then(|()| kv.blocks_mut().begin_batch(&batch)))
                    .map(|()| WeightSizes::default()),
            ),
            Step::Stage { id, ops, batch, layers, input, end } => Some(match self.caches.get_mut(&id) {
                Some(kv) => kv.blocks_mut().apply(&ops).and_then(|()| {
                    self.arch
                        .compute_stage(&self.backend, &batch, kv, layers, input, end)
                        .map(|_| WeightSizes::default())
                }),
                None => Err(EngineError::TensorParallel(format!("rank 0's cache {id} is not mirrored"))),
            }),
            Step::EndBatch { id, ops, batch } => {
                if let Ok(kv) = self.cache(id) {
                    // A failure here shows at the next step, whose blocks then disagree.
                    kv.blocks_mut().apply(&ops).ok();
                    kv.blocks_mut().end_batch(&batch);
                }
                None
            }
        }
    }

    /// Its mirror of rank 0's cache `id`.
    fn cache(&mut self, id: u64) -> Result<&mut CpuKv, EngineError> {
        self.caches
            .get_mut(&id)
            .ok_or_else(|| EngineError::TensorParallel(format!("rank 0's cache {id} is not mirrored")))
    }
}

/// `backend` for one pipeline stage's layers, or for every layer.
fn stage_of(backend: CpuBackend, stage: Option<PipelineStage>) -> CpuBackend {
    match stage {
        Some(s) => backend.as_stage(s),
        None => backend,
    }
}

/// A follower thread of this process.
struct Thread {
    tx: Option<Sender<Step>>,
    done: Receiver<Answer>,
    thread: Option<JoinHandle<()>>,
}

/// The followers as threads of this process.
struct Threads(Vec<Thread>);

impl Followers for Threads {
    fn send(&mut self, steps: Vec<Step>) -> Result<(), EngineError> {
        let gone = || EngineError::TensorParallel("a tensor-parallel rank thread ended".into());
        for t in &self.0 {
            for s in &steps {
                t.tx.as_ref().ok_or_else(gone)?.send(s.clone()).map_err(|_| gone())?;
            }
        }
        Ok(())
    }

    fn answers(&mut self) -> Vec<Answer> {
        let gone = || EngineError::TensorParallel("a tensor-parallel rank thread ended".into());
        self.0.iter().map(|t| t.done.recv().unwrap_or_else(|_| Err(gone()))).collect()
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        for t in &mut self.0 {
            t.tx.take(); // ends the follower's loop
        }
        for t in &mut self.0 {
            if let Some(t) = t.thread.take() {
                t.join().ok();
            }
        }
    }
}

impl Thread {
    /// A thread that loads its rank's share of `file`, reports, then follows steps.
    fn start(
        comm: impl Communicator + 'static,
        file: &Arc<Gguf>,
        threads: usize,
        stage: Option<PipelineStage>,
    ) -> Result<Thread, EngineError> {
        let (tx, steps) = channel();
        let (answers, done) = channel();
        let file = file.clone();
        let thread = std::thread::Builder::new()
            .name(format!("turbine-tp{}", comm.rank()))
            .spawn(move || follow(comm, &file, threads, stage, steps, answers))
            .map_err(|e| EngineError::TensorParallel(format!("cannot start a rank thread: {e}")))?;
        Ok(Thread { tx: Some(tx), done, thread: Some(thread) })
    }
}

/// A follower thread's life: its pool, its share of the model, then steps until rank 0
/// goes. A rank that fails leaves the group (its communicator goes with this thread), so
/// the others' collectives end with an error, never a wait.
fn follow(
    comm: impl Communicator + 'static,
    file: &Arc<Gguf>,
    threads: usize,
    stage: Option<PipelineStage>,
    steps: Receiver<Step>,
    answers: Sender<Answer>,
) {
    let pool = match thread_pool(threads) {
        Ok(p) => p,
        Err(e) => {
            answers.send(Err(e)).ok();
            return;
        }
    };
    pool.install(move || {
        let mut me = match Follower::load(comm, file, stage) {
            Ok(f) => f,
            Err(e) => {
                answers.send(Err(e)).ok();
                return;
            }
        };
        answers.send(me.loaded()).ok();
        for step in steps {
            if let Some(answer) = me.take(step) {
                let failed = answer.is_err();
                if answers.send(answer).is_err() || failed {
                    return;
                }
            }
        }
    });
}
