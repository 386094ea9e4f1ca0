//! A model split over the ranks of an in-process group, run as one model.
//!
//! Rank 0 runs on the caller's thread: [`Sharded`] is an [`Architecture`] whose forward
//! pass first hands the step to the other ranks (the followers, each a thread with its own
//! thread pool, share of the weights and caches), then computes rank 0's share; the ranks
//! meet in the collectives, and rank 0 returns the gathered logits. So the scheduler, the
//! sampler and the HTTP shell run a split model exactly as they run a whole one.
//!
//! The followers' caches mirror rank 0's: rank 0's caches record the block changes the
//! scheduler makes between steps ([`BlockOp`]), and each step carries them, so every rank
//! holds the same block tables. A follower keeps one cache per cache of rank 0 (the
//! scheduler's, an embedding request's), created on first use and dropped after rank 0
//! drops its own.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

use super::InProcess;
use crate::backend::cpu::{CpuBackend, CpuKv};
use crate::backend::{Backend, KvCache};
use crate::gguf::Gguf;
use crate::kv::{BlockOp, KvLayout, KvSpec};
use crate::model::{self, Architecture, Batch, Logits, ModelInfo};
use crate::EngineError;

/// What rank 0 tells a follower.
#[derive(Clone)]
enum Step {
    /// Make a cache like rank 0's cache `id`.
    NewCache { id: u64, spec: KvSpec },
    /// Rank 0 dropped cache `id`.
    DropCache { id: u64 },
    /// Replay `ops` on cache `id`, then run `batch` through it: the logits' forward, or
    /// the hidden states' when `hidden`. Answered with the result.
    Forward { id: u64, ops: Vec<BlockOp>, batch: Batch, hidden: bool },
}

/// A follower's answer: to its load, the bytes its weights cover (see
/// `CpuBackend::weight_bytes`); to a forward step, nothing.
type Answer = Result<(u64, u64), EngineError>;

struct Follower {
    tx: Option<Sender<Step>>,
    done: Receiver<Answer>,
    thread: Option<JoinHandle<()>>,
}

/// The followers, and rank 0's caches they mirror with handles that die with them.
struct Followers {
    ranks: Vec<Follower>,
    mirrored: Vec<(u64, Weak<()>)>,
}

/// A model split over `ranks` threads of this process (tensor parallelism); to its user,
/// one [`Architecture`] over rank 0's backend.
pub struct Sharded {
    /// Rank 0's share of the model, run in its own pool.
    arch: Box<dyn Architecture<CpuBackend>>,
    /// Rank 0's description, with every rank's weight bytes.
    info: ModelInfo,
    pool: rayon::ThreadPool,
    /// Locked for a whole step, so steps from several threads (the scheduler, an
    /// embedding request) reach every rank in the same order.
    followers: Mutex<Followers>,
}

impl Sharded {
    /// Loads `file` split over `ranks` ranks of `threads` threads each: the backend of
    /// rank 0, which the caller passes to every call, and the model.
    pub fn load(file: &Arc<Gguf>, ranks: usize, threads: usize) -> Result<(CpuBackend, Sharded), EngineError> {
        let mut comms = InProcess::group(ranks.max(1)).into_iter();
        let first = comms.next().ok_or_else(|| EngineError::TensorParallel("no ranks".into()))?;
        let pool = thread_pool(threads)?;
        let mut followers = Vec::new();
        for comm in comms {
            followers.push(Follower::start(comm, file, threads)?);
        }
        let backend = CpuBackend::tensor_parallel(first);
        let arch = pool.install(|| model::load(&backend, file))?;
        // Every follower reports its load; the first failure is the group's.
        let mut info = arch.info().clone();
        info.rank_weight_bytes.push(backend.weight_bytes());
        for f in &followers {
            info.rank_weight_bytes.push(f.answer()?);
        }
        let followers = Mutex::new(Followers { ranks: followers, mirrored: Vec::new() });
        Ok((backend, Sharded { arch, info, pool, followers }))
    }

    /// One step on every rank: the followers get it first, then rank 0 runs `run` on its
    /// share; the first error of any rank is the step's.
    fn step<T>(
        &self,
        kv: &mut CpuKv,
        batch: &Batch,
        hidden: bool,
        run: impl FnOnce(&mut CpuKv) -> Result<T, EngineError> + Send,
    ) -> Result<T, EngineError>
    where
        T: Send,
    {
        let mut followers = self.followers.lock().unwrap_or_else(|e| e.into_inner());
        let Followers { ranks, mirrored } = &mut *followers;
        let (id, alive) = kv.blocks().identity();
        let mut steps = Vec::new();
        mirrored.retain(|(old, handle)| {
            let live = handle.strong_count() > 0;
            if !live {
                steps.push(Step::DropCache { id: *old });
            }
            live
        });
        if !mirrored.iter().any(|(m, _)| *m == id) {
            steps.push(Step::NewCache { id, spec: kv.blocks().spec().clone() });
            mirrored.push((id, alive));
        }
        let ops = kv.blocks_mut().take_journal();
        for f in ranks.iter() {
            for s in &steps {
                f.send(s.clone())?;
            }
            f.send(Step::Forward { id, ops: ops.clone(), batch: batch.clone(), hidden })?;
        }
        let mine = self.pool.install(|| run(kv));
        // Every follower answers, even after an error, so no answer is left for the next step.
        let answers: Vec<_> = ranks.iter().map(Follower::answer).collect();
        let theirs: Result<Vec<_>, EngineError> = answers.into_iter().collect();
        let out = mine?;
        theirs.map(|_| out)
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
        self.step(kv, batch, false, |kv| self.arch.compute(backend, batch, kv))
    }

    fn compute_hidden(&self, backend: &CpuBackend, batch: &Batch, kv: &mut CpuKv) -> Result<Vec<f32>, EngineError> {
        self.step(kv, batch, true, |kv| self.arch.compute_hidden(backend, batch, kv))
    }

    fn routing_stats(&self) -> Vec<Vec<u64>> {
        self.arch.routing_stats()
    }
}

impl Drop for Sharded {
    fn drop(&mut self) {
        let followers = &mut self.followers.get_mut().unwrap_or_else(|e| e.into_inner()).ranks;
        for f in followers.iter_mut() {
            f.tx.take(); // ends the follower's loop
        }
        for f in followers.iter_mut() {
            if let Some(t) = f.thread.take() {
                t.join().ok();
            }
        }
    }
}

impl Follower {
    /// A thread that loads its rank's share of `file`, reports, then follows steps.
    fn start(comm: InProcess, file: &Arc<Gguf>, threads: usize) -> Result<Follower, EngineError> {
        let (tx, steps) = channel();
        let (answers, done) = channel();
        let file = file.clone();
        let thread = std::thread::Builder::new()
            .name(format!("turbine-tp{}", super::Communicator::rank(&comm)))
            .spawn(move || follow(comm, &file, threads, steps, answers))
            .map_err(|e| EngineError::TensorParallel(format!("cannot start a rank thread: {e}")))?;
        Ok(Follower { tx: Some(tx), done, thread: Some(thread) })
    }

    fn send(&self, step: Step) -> Result<(), EngineError> {
        let gone = || EngineError::TensorParallel("a tensor-parallel rank thread ended".into());
        self.tx.as_ref().ok_or_else(gone)?.send(step).map_err(|_| gone())
    }

    /// The follower's answer to its load or its last forward step.
    fn answer(&self) -> Answer {
        self.done
            .recv()
            .unwrap_or_else(|_| Err(EngineError::TensorParallel("a tensor-parallel rank thread ended".into())))
    }
}

fn thread_pool(threads: usize) -> Result<rayon::ThreadPool, EngineError> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| EngineError::TensorParallel(format!("cannot start a rank's thread pool: {e}")))
}

/// A follower's life: its pool, its share of the model, then steps until rank 0 goes.
fn follow(comm: InProcess, file: &Arc<Gguf>, threads: usize, steps: Receiver<Step>, answers: Sender<Answer>) {
    let pool = match thread_pool(threads) {
        Ok(p) => p,
        Err(e) => {
            answers.send(Err(e)).ok();
            return;
        }
    };
    pool.install(move || {
        let backend = CpuBackend::tensor_parallel(comm);
        let arch = match model::load(&backend, file) {
            Ok(a) => a,
            Err(e) => {
                answers.send(Err(e)).ok();
                return;
            }
        };
        answers.send(Ok(backend.weight_bytes())).ok();
        let mut caches: HashMap<u64, CpuKv> = HashMap::new();
        for step in steps {
            match step {
                Step::NewCache { id, spec } => {
                    caches.insert(id, backend.new_kv(&spec));
                }
                Step::DropCache { id } => {
                    caches.remove(&id);
                }
                Step::Forward { id, ops, batch, hidden } => {
                    let result = match caches.get_mut(&id) {
                        Some(kv) => kv.blocks_mut().apply(&ops).and_then(|()| match hidden {
                            true => arch.forward_hidden(&backend, &batch, kv).map(|_| (0, 0)),
                            false => arch.forward(&backend, &batch, kv).map(|_| (0, 0)),
                        }),
                        None => Err(EngineError::TensorParallel(format!("rank 0's cache {id} is not mirrored"))),
                    };
                    // A rank that failed leaves the group (its communicator goes with this
                    // thread), so the others' collectives end with an error, never a wait.
                    let failed = result.is_err();
                    if answers.send(result).is_err() || failed {
                        return;
                    }
                }
            }
        }
    });
}
