//! Pipeline parallelism: consecutive layer ranges on different ranks (stages), the hidden
//! states handed from each stage to the next, several micro-batches in flight.
//!
//! Stage 0 runs on the caller's thread: [`Pipelined`] is an [`Architecture`] whose forward
//! pass splits the batch into micro-batches at sequence boundaries, runs each through its
//! own layers (the embeddings first) and hands it on; while the next stages work on one
//! micro-batch, stage 0 computes the next. The last stage applies the output norm and head
//! and sends each micro-batch's logits back. Every stage holds only its layers' weights
//! and keeps caches that mirror stage 0's blocks (the block changes recorded between
//! steps, as for tensor parallelism), reserving each whole batch before its micro-batches
//! and releasing it after them, as stage 0 does.
//!
//! A sequence's tokens are never split between micro-batches, so each sequence's rows meet
//! the same kernels (attention picks its arithmetic by a sequence's row count) and a split
//! model computes what the whole one does.

use std::collections::HashMap;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use super::group::{sync_caches, thread_pool, Answer, CacheStep, Sharded};
use crate::backend::cpu::{CpuBackend, CpuKv};
use crate::backend::{Backend, KvCache, PipelineStage, WeightSizes};
use crate::gguf::Gguf;
use crate::kv::{BlockOp, KvLayout};
use crate::model::{self, Architecture, Batch, Logits, ModelInfo, StageEnd, StageOutput};
use crate::EngineError;

/// What travels down the chain of stages after stage 0. Each stage takes what concerns it
/// and passes it on, so every stage receives from one place, in order: the stage before
/// it (a channel in one process, MPI point-to-point between processes).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Message {
    /// Make or drop a mirror of one of stage 0's caches.
    Cache(CacheStep),
    /// A batch starts on cache `id`: replay `ops`, then reserve its blocks.
    Begin { id: u64, ops: Vec<BlockOp>, batch: Batch },
    /// Micro-batch `index` of the current batch with the hidden states entering this
    /// stage's layers (or the error of an earlier stage).
    Micro { index: usize, batch: Batch, input: Result<Vec<f32>, String>, want_hidden: bool },
    /// The batch is done: release what left a sliding window, register full blocks.
    End { batch: Batch },
    /// The model goes: every stage ends.
    Stop,
}

/// The last stage's answer for one micro-batch.
pub(crate) type MicroResult = (usize, Result<StageOutput, String>);

/// Stage 0's way to the later stages.
pub(crate) trait Chain: Send {
    /// Hands `message` to stage 1, which passes on what is not only its own.
    fn send(&mut self, message: Message) -> Result<(), EngineError>;
    /// The last stage's next answer.
    fn result(&mut self) -> Result<MicroResult, EngineError>;
}

/// A later stage's ways out: on to the next stage, or (the last) back to stage 0. False
/// when the other side is gone.
pub(crate) trait Onward {
    fn next(&mut self, message: Message) -> bool;
    fn back(&mut self, result: MicroResult) -> bool;
}

/// A model split over consecutive layer ranges (stages); to its user, one
/// [`Architecture`] over stage 0's backend.
pub struct Pipelined {
    /// Stage 0's layers (and the embeddings), run in its own pool.
    arch: Box<dyn Architecture<CpuBackend>>,
    layers: Range<usize>,
    info: ModelInfo,
    pool: rayon::ThreadPool,
    /// Locked for a whole forward pass, so passes from several threads stay in order: the
    /// later stages, and stage 0's caches they mirror.
    chain: Mutex<(Box<dyn Chain>, Mirrors)>,
}

/// Stage 0's caches the later stages mirror, with handles that die with them.
type Mirrors = Vec<(u64, Weak<()>)>;

impl Pipelined {
    /// Loads `file` split over `stages` ≥ 2 pipeline stages of `threads` threads each, the
    /// layers shared to balance the stages' weights ([`stage_cuts`]): the backend of
    /// stage 0, which the caller passes to every call, and the model.
    pub fn load(file: &Arc<Gguf>, stages: usize, threads: usize) -> Result<(CpuBackend, Pipelined), EngineError> {
        Pipelined::load_at(file, &balanced_split(file, stages)?, threads)
    }

    /// [`Pipelined::load`] with each stage split over `ranks` tensor-parallel ranks.
    pub fn load_split(
        file: &Arc<Gguf>,
        stages: usize,
        ranks: usize,
        threads: usize,
    ) -> Result<(CpuBackend, Pipelined), EngineError> {
        Pipelined::load_split_at(file, &balanced_split(file, stages)?, ranks, threads)
    }

    /// [`Pipelined::load`] with the stages' boundaries given: stage s runs layers
    /// cuts[s]..cuts[s + 1] (cuts ascending from 0 to the layer count, 3 or more of them).
    pub fn load_at(file: &Arc<Gguf>, cuts: &[usize], threads: usize) -> Result<(CpuBackend, Pipelined), EngineError> {
        Pipelined::load_split_at(file, cuts, 1, threads)
    }

    /// [`Pipelined::load_at`] with each stage split over `ranks` tensor-parallel ranks
    /// (threads of this process, `threads` each): `--tp ranks --pp stages`.
    pub fn load_split_at(
        file: &Arc<Gguf>,
        cuts: &[usize],
        ranks: usize,
        threads: usize,
    ) -> Result<(CpuBackend, Pipelined), EngineError> {
        let stages = check_cuts(cuts)?;
        let (results_tx, results) = channel();
        let (loaded_tx, loaded) = channel();
        // The last stage first, so each stage knows where to hand its micro-batches.
        let mut next: Option<Sender<Message>> = None;
        let mut threads_of_stages = Vec::new();
        for index in (1..stages).rev() {
            let (tx, rx) = channel();
            let out = ChannelOut { next: next.take(), back: results_tx.clone() };
            let (file, loaded_tx, place) = (file.clone(), loaded_tx.clone(), stage_at(cuts, index));
            let thread = std::thread::Builder::new()
                .name(format!("turbine-pp{index}"))
                .spawn(move || run_stage_thread(&file, place, (ranks, threads), rx, out, loaded_tx))
                .map_err(|e| EngineError::TensorParallel(format!("cannot start a pipeline stage: {e}")))?;
            threads_of_stages.push(thread);
            next = Some(tx);
        }
        drop((loaded_tx, results_tx));
        let chain = Box::new(Threads { first: next, results, threads: threads_of_stages });
        let answers = move || {
            let mut answers: Vec<(usize, Answer)> = loaded.iter().collect();
            answers.sort_by_key(|(stage, _)| *stage);
            answers.into_iter().map(|(_, a)| a).collect()
        };
        Pipelined::lead(file, cuts, (ranks, threads), chain, answers)
    }

    /// Stage 0 of `file` cut at `cuts`, over `ranks` tensor-parallel ranks of `threads`
    /// threads, leading the later stages through `chain`; they are loading theirs, and
    /// `answers` waits for their reports in stage order.
    pub(crate) fn lead(
        file: &Arc<Gguf>,
        cuts: &[usize],
        (ranks, threads): (usize, usize),
        chain: Box<dyn Chain>,
        answers: impl FnOnce() -> Vec<Answer>,
    ) -> Result<(CpuBackend, Pipelined), EngineError> {
        let stages = check_cuts(cuts)?;
        // A stage over ranks runs in its group's pools; its own then only hands on.
        let own_threads = if ranks > 1 { 1 } else { threads };
        let loaded = thread_pool(own_threads).and_then(|pool| {
            let (backend, arch) = pool.install(|| load_stage(file, stage_at(cuts, 0), ranks, threads))?;
            Ok((pool, backend, arch))
        });
        // Every later stage reports its load, even when stage 0's failed.
        let answers = answers();
        let (pool, backend, arch) = loaded?;
        let mut info = arch.info().clone();
        info.rank_weight_bytes = vec![stage_bytes(&backend, arch.as_ref())];
        for a in answers {
            info.rank_weight_bytes.push(a?);
        }
        if info.rank_weight_bytes.len() != stages {
            return Err(EngineError::TensorParallel("a pipeline stage ended while loading".into()));
        }
        if cuts[stages] != info.n_layers {
            return Err(EngineError::BadValue {
                key: "pipeline stages".into(),
                value: format!("{cuts:?}"),
                why: "the last boundary must be the layer count",
            });
        }
        let layers = stage_at(cuts, 0).layers;
        Ok((backend, Pipelined { arch, layers, info, pool, chain: Mutex::new((chain, Vec::new())) }))
    }

    /// One forward pass through every stage, micro-batch by micro-batch (the blocks of
    /// `batch` already reserved in stage 0's cache).
    fn run(
        &self,
        backend: &CpuBackend,
        batch: &Batch,
        kv: &mut CpuKv,
        want_hidden: bool,
    ) -> Result<Vec<(Range<usize>, StageOutput)>, EngineError> {
        let mut guard = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        let (chain, mirrored) = &mut *guard;
        for step in sync_caches(mirrored, kv) {
            chain.send(Message::Cache(step))?;
        }
        let (id, ops) = (kv.blocks().identity().0, kv.blocks_mut().take_journal());
        self.arch.stage_batch_begins(backend, kv, batch, &ops)?;
        chain.send(Message::Begin { id, ops, batch: batch.clone() })?;
        let micros = micro_batches(batch, self.info.rank_weight_bytes.len());
        for (index, (rows, micro)) in micros.iter().enumerate() {
            let layers = self.layers.clone();
            let compute = || self.arch.compute_stage(backend, micro, kv, layers, None, StageEnd::Handoff);
            // A panic still sends its micro-batch on (as an error), so every answer comes back.
            let out = catch_unwind(AssertUnwindSafe(|| self.pool.install(compute)))
                .unwrap_or_else(|_| Err(EngineError::TensorParallel("stage 0 failed".into())));
            let input = match out {
                Ok(StageOutput::Hidden(h)) => Ok(h),
                Ok(StageOutput::Logits(_)) => Err("stage 0 ended the model".to_string()),
                Err(e) => Err(e.to_string()),
            };
            debug_assert!(rows.len() == micro.len());
            chain.send(Message::Micro { index, batch: micro.clone(), input, want_hidden })?;
        }
        let mut outs: Vec<Option<Result<StageOutput, String>>> = (0..micros.len()).map(|_| None).collect();
        for _ in 0..micros.len() {
            let (index, out) = chain.result()?;
            if let Some(slot) = outs.get_mut(index) {
                *slot = Some(out);
            }
        }
        chain.send(Message::End { batch: batch.clone() })?;
        self.arch.stage_batch_ends(backend, kv, batch)?;
        micros
            .into_iter()
            .zip(outs)
            .map(|((rows, _), out)| match out {
                Some(Ok(o)) => Ok((rows, o)),
                Some(Err(e)) => Err(EngineError::TensorParallel(format!("pipeline: {e}"))),
                None => Err(EngineError::TensorParallel("a pipeline stage gave no answer".into())),
            })
            .collect()
    }
}

/// Stage `place` of `file`: its backend and model, whole or split over `ranks`
/// tensor-parallel ranks of `threads` threads (threads of this process).
fn load_stage(
    file: &Arc<Gguf>,
    place: PipelineStage,
    ranks: usize,
    threads: usize,
) -> Result<(CpuBackend, Box<dyn Architecture<CpuBackend>>), EngineError> {
    let index = place.index;
    if ranks > 1 {
        let (backend, sharded) = Sharded::load_stage(file, ranks, threads, Some(place))?;
        return Ok((backend, Box::new(sharded)));
    }
    let backend = CpuBackend::default().as_stage(place);
    let arch = catch_unwind(AssertUnwindSafe(|| model::load(&backend, file)))
        .unwrap_or_else(|_| Err(EngineError::TensorParallel(format!("stage {index} failed loading"))))?;
    Ok((backend, arch))
}

/// What a stage's weights cover: its backend's, or over tensor-parallel ranks, theirs
/// summed (a pipeline reports its weights per stage).
fn stage_bytes(backend: &CpuBackend, arch: &dyn Architecture<CpuBackend>) -> WeightSizes {
    let ranks = &arch.info().rank_weight_bytes;
    if ranks.is_empty() {
        return backend.weight_bytes();
    }
    ranks.iter().fold(WeightSizes::default(), |t, r| WeightSizes {
        covered: t.covered + r.covered,
        lookup_only: t.lookup_only + r.lookup_only,
        owned: t.owned + r.owned,
    })
}

/// The boundaries of `stages` stages of `file` balanced by weight, after checking that
/// the split is one the search may take on.
pub(crate) fn balanced_split(file: &Gguf, stages: usize) -> Result<Vec<usize>, EngineError> {
    if stages < 2 {
        return Err(EngineError::BadValue {
            key: "pipeline stages".into(),
            value: stages.to_string(),
            why: "a pipeline has at least 2 stages",
        });
    }
    let arch = file.architecture()?;
    let key = format!("{arch}.block_count");
    let n_layers = crate::model::required(file.get_u32(&key), &key)? as usize;
    check_split(n_layers, stages, file.tensors().len()).map_err(|why| EngineError::BadValue {
        key,
        value: format!("{n_layers} layers in {stages} stages"),
        why,
    })?;
    Ok(stage_cuts(file, n_layers, stages))
}

/// The stage count of `cuts`, when they ascend from 0 and make 2 to 64 stages.
pub(crate) fn check_cuts(cuts: &[usize]) -> Result<usize, EngineError> {
    let stages = cuts.len().saturating_sub(1);
    if !(2..=MAX_STAGES).contains(&stages) || cuts[0] != 0 || cuts.windows(2).any(|w| w[0] > w[1]) {
        return Err(EngineError::BadValue {
            key: "pipeline stages".into(),
            value: format!("{cuts:?}"),
            why: "stage boundaries must ascend from 0, for 2 to 64 stages",
        });
    }
    Ok(stages)
}

/// Stage `index` of the pipeline cut at `cuts`.
pub(crate) fn stage_at(cuts: &[usize], index: usize) -> PipelineStage {
    PipelineStage { index, count: cuts.len() - 1, layers: cuts[index]..cuts[index + 1] }
}

/// Most layers and stages a weight-balanced split takes: its search costs stages × layers²
/// steps (about half a second at the limits), which a model file's count must not inflate.
const MAX_SPLIT_LAYERS: usize = 4096;
const MAX_STAGES: usize = 64;

/// Why `n_layers` layers of a file of `n_tensors` tensors cannot be split into `stages`.
fn check_split(n_layers: usize, stages: usize, n_tensors: usize) -> Result<(), &'static str> {
    if n_layers > n_tensors {
        return Err("more layers than the file has tensors");
    }
    if n_layers > MAX_SPLIT_LAYERS || stages > MAX_STAGES {
        return Err("a pipeline splits at most 4096 layers into at most 64 stages");
    }
    Ok(())
}

/// The boundaries of `stages` stages over `n_layers` layers (stage s runs cuts[s]..cuts[s + 1]):
/// consecutive ranges chosen so that the largest stage's weights (its layers', and the last
/// stage's output projection) are as small as they can be. Decoding reads every weight once
/// a step, so weight bytes are the work. A stage may have no layer (a last stage holding
/// only a large head).
pub fn stage_cuts(file: &Gguf, n_layers: usize, stages: usize) -> Vec<usize> {
    let mut bytes = vec![0u64; n_layers];
    for t in file.tensors() {
        let layer = t.name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|n| n.parse::<usize>().ok());
        if let Some(il) = layer.filter(|&il| il < n_layers) {
            bytes[il] += t.n_bytes as u64;
        }
    }
    let head =
        ["output.weight", "token_embd.weight"].iter().find_map(|n| file.tensor(n)).map_or(0, |t| t.n_bytes as u64);
    balanced_cuts(&bytes, head, stages.max(1))
}

/// Stage boundaries 0 = c_0 ≤ c_1 ≤ … ≤ c_stages = n over `weights`, the last stage also
/// carrying `tail`, minimizing the largest stage's sum (dynamic programming over where
/// each stage ends; ties go to the earlier cut).
fn balanced_cuts(weights: &[u64], tail: u64, stages: usize) -> Vec<usize> {
    let n = weights.len();
    let running = weights.iter().scan(0u64, |total, &w| {
        *total += w;
        Some(*total)
    });
    let prefix: Vec<u64> = std::iter::once(0).chain(running).collect();
    let sum = |a: usize, b: usize| prefix[b] - prefix[a];
    // best[s][i]: the smallest largest sum of the first s stages over the first i layers.
    let mut best = vec![vec![u64::MAX; n + 1]; stages + 1];
    let mut from = vec![vec![0usize; n + 1]; stages + 1];
    best[0][0] = 0;
    for s in 1..=stages {
        for i in 0..=n {
            for j in 0..=i {
                if best[s - 1][j] == u64::MAX {
                    continue;
                }
                let own = sum(j, i) + if s == stages { tail } else { 0 };
                let cost = best[s - 1][j].max(own);
                if cost < best[s][i] {
                    (best[s][i], from[s][i]) = (cost, j);
                }
            }
        }
    }
    let mut cuts = vec![n; stages + 1];
    for s in (1..=stages).rev() {
        cuts[s - 1] = from[s][cuts[s]];
    }
    cuts
}

/// The batch split into up to `n` micro-batches of whole sequence runs, with roughly even
/// token counts, in order: each with the batch rows it covers.
fn micro_batches(batch: &Batch, n: usize) -> Vec<(Range<usize>, Batch)> {
    // Runs of consecutive tokens of one sequence.
    let mut runs: Vec<Range<usize>> = Vec::new();
    for (i, &seq) in batch.layout.seqs.iter().enumerate() {
        match runs.last_mut() {
            Some(r) if batch.layout.seqs[r.start] == seq => r.end = i + 1,
            _ => runs.push(i..i + 1),
        }
    }
    let target = batch.len().div_ceil(n.max(1)).max(1);
    let mut groups: Vec<Range<usize>> = Vec::new();
    for run in runs {
        match groups.last_mut() {
            Some(g) if g.len() < target => g.end = run.end,
            _ => groups.push(run),
        }
    }
    groups
        .into_iter()
        .map(|rows| {
            let mut micro = Batch::default();
            for i in rows.clone() {
                micro.push(batch.layout.seqs[i], batch.layout.positions[i], batch.tokens[i], batch.want_logits[i]);
            }
            (rows, micro)
        })
        .collect()
}

impl Architecture<CpuBackend> for Pipelined {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn kv_layout(&self) -> KvLayout {
        self.arch.kv_layout()
    }

    fn compute(&self, backend: &CpuBackend, batch: &Batch, kv: &mut CpuKv) -> Result<Logits, EngineError> {
        let n_vocab = self.info.n_vocab;
        let mut logits = Logits { rows: Vec::new(), n_vocab, data: Vec::new() };
        for (rows, out) in self.run(backend, batch, kv, false)? {
            let StageOutput::Logits(l) = out else {
                return Err(EngineError::TensorParallel("the last stage returned no logits".into()));
            };
            logits.rows.extend(l.rows.iter().map(|r| r + rows.start));
            logits.data.extend(l.data);
        }
        Ok(logits)
    }

    fn compute_hidden(&self, backend: &CpuBackend, batch: &Batch, kv: &mut CpuKv) -> Result<Vec<f32>, EngineError> {
        let mut hidden = Vec::new();
        for (_, out) in self.run(backend, batch, kv, true)? {
            match out {
                StageOutput::Hidden(h) => hidden.extend(h),
                StageOutput::Logits(_) => return Err(EngineError::TensorParallel("hidden states expected".into())),
            }
        }
        Ok(hidden)
    }

    fn routing_stats(&self) -> Vec<Vec<u64>> {
        self.arch.routing_stats()
    }

    /// Stage 0 runs in its own pool.
    fn runs_on_global_pool(&self) -> bool {
        false
    }
}

/// The later stages as threads of this process, linked by channels.
struct Threads {
    first: Option<Sender<Message>>,
    results: Receiver<MicroResult>,
    threads: Vec<JoinHandle<()>>,
}

fn stage_gone() -> EngineError {
    EngineError::TensorParallel("a pipeline stage ended".into())
}

impl Chain for Threads {
    fn send(&mut self, message: Message) -> Result<(), EngineError> {
        self.first.as_ref().ok_or_else(stage_gone)?.send(message).map_err(|_| stage_gone())
    }

    fn result(&mut self) -> Result<MicroResult, EngineError> {
        self.results.recv().map_err(|_| stage_gone())
    }
}

impl Drop for Threads {
    fn drop(&mut self) {
        if let Some(first) = self.first.take() {
            first.send(Message::Stop).ok();
        }
        for t in self.threads.drain(..) {
            t.join().ok();
        }
    }
}

/// A stage thread's ways out.
struct ChannelOut {
    next: Option<Sender<Message>>,
    back: Sender<MicroResult>,
}

impl Onward for ChannelOut {
    fn next(&mut self, message: Message) -> bool {
        self.next.as_ref().is_some_and(|tx| tx.send(message).is_ok())
    }

    fn back(&mut self, result: MicroResult) -> bool {
        self.back.send(result).is_ok()
    }
}

/// A stage thread's life: its pool, its layers, then messages until the chain stops.
fn run_stage_thread(
    file: &Arc<Gguf>,
    place: PipelineStage,
    (ranks, threads): (usize, usize),
    messages: Receiver<Message>,
    mut out: ChannelOut,
    loaded: Sender<(usize, Answer)>,
) {
    let stage = place.index;
    let own_threads = if ranks > 1 { 1 } else { threads };
    let me = thread_pool(own_threads)
        .and_then(|pool| pool.install(|| StageRank::load(file, place, ranks, threads)).map(|me| (pool, me)));
    let me = match me {
        Ok(me) => me,
        Err(e) => {
            loaded.send((stage, Err(e))).ok();
            return;
        }
    };
    let (pool, mut me) = me;
    loaded.send((stage, Ok(me.weight_bytes()))).ok();
    drop(loaded);
    pool.install(move || me.serve(move || messages.recv().ok(), &mut out));
}

/// A stage after the first: its layers' share of the model and its mirrors of stage 0's
/// caches.
pub(crate) struct StageRank {
    place: PipelineStage,
    backend: CpuBackend,
    arch: Box<dyn Architecture<CpuBackend>>,
}

impl StageRank {
    /// Loads stage `place` of `file` over `ranks` tensor-parallel ranks of `threads`
    /// threads (call it inside the stage's thread pool).
    pub(crate) fn load(
        file: &Arc<Gguf>,
        place: PipelineStage,
        ranks: usize,
        threads: usize,
    ) -> Result<StageRank, EngineError> {
        let (backend, arch) = load_stage(file, place.clone(), ranks, threads)?;
        Ok(StageRank { place, backend, arch })
    }

    /// What its weights cover, for stage 0's report.
    pub(crate) fn weight_bytes(&self) -> WeightSizes {
        stage_bytes(&self.backend, self.arch.as_ref())
    }

    /// Takes messages from `inbox` until the chain stops (or the stage before is gone),
    /// passing on what is not only its own; a micro-batch goes on with this stage's hidden
    /// states, or back to stage 0 from the last stage.
    pub(crate) fn serve(&mut self, mut inbox: impl FnMut() -> Option<Message>, out: &mut dyn Onward) {
        let (stage, last) = (self.place.index, self.place.is_last());
        let mut caches: HashMap<u64, CpuKv> = HashMap::new();
        // The current batch's cache, and why it could not start.
        let mut current: Option<(u64, Option<String>)> = None;
        let mut failed = false;
        while let Some(message) = inbox() {
            let pass_on = match message {
                Message::Cache(step) => {
                    match &step {
                        CacheStep::New { id, spec } => {
                            caches.insert(*id, self.backend.new_kv(spec));
                        }
                        CacheStep::Drop { id } => {
                            caches.remove(id);
                        }
                    }
                    Some(Message::Cache(step))
                }
                Message::Begin { id, ops, batch } => {
                    let started = match caches.get_mut(&id) {
                        // A stage over ranks: its cache recorded `ops` for its followers.
                        Some(kv) => kv
                            .blocks_mut()
                            .apply(&ops)
                            .and_then(|()| kv.blocks_mut().begin_batch(&batch))
                            .and_then(|()| self.arch.stage_batch_begins(&self.backend, kv, &batch, &[])),
                        None => Err(EngineError::TensorParallel(format!("stage 0's cache {id} is not mirrored"))),
                    };
                    current = Some((id, started.err().map(|e| format!("stage {stage}: {e}"))));
                    Some(Message::Begin { id, ops, batch })
                }
                Message::Micro { index, batch, input, want_hidden } => {
                    let output = self.micro(&mut caches, &current, &mut failed, &batch, input, want_hidden);
                    if last {
                        if !out.back((index, output)) {
                            return;
                        }
                        None
                    } else {
                        let input = output.and_then(|o| match o {
                            StageOutput::Hidden(h) => Ok(h),
                            StageOutput::Logits(_) => Err(format!("stage {stage} ended the model early")),
                        });
                        Some(Message::Micro { index, batch, input, want_hidden })
                    }
                }
                Message::End { batch } => {
                    if let Some((id, None)) = current.take() {
                        if let Some(kv) = caches.get_mut(&id) {
                            // An error here broke the stage's group; its next step says so.
                            self.arch.stage_batch_ends(&self.backend, kv, &batch).ok();
                            kv.blocks_mut().end_batch(&batch);
                        }
                    }
                    Some(Message::End { batch })
                }
                Message::Stop => {
                    if !last {
                        out.next(Message::Stop);
                    }
                    return;
                }
            };
            if let Some(m) = pass_on.filter(|_| !last) {
                if !out.next(m) {
                    return;
                }
            }
        }
    }

    /// This stage's layers over one micro-batch, or why not.
    fn micro(
        &self,
        caches: &mut HashMap<u64, CpuKv>,
        current: &Option<(u64, Option<String>)>,
        failed: &mut bool,
        batch: &Batch,
        input: Result<Vec<f32>, String>,
        want_hidden: bool,
    ) -> Result<StageOutput, String> {
        let stage = self.place.index;
        let end = match (self.place.is_last(), want_hidden) {
            (false, _) => StageEnd::Handoff,
            (true, false) => StageEnd::Logits,
            (true, true) => StageEnd::Hidden,
        };
        match (current, input) {
            (_, Err(e)) => Err(e),
            _ if *failed => Err(format!("stage {stage} failed earlier")),
            (Some((_, Some(why))), _) => Err(why.clone()),
            (Some((id, None)), Ok(x)) => {
                let Some(kv) = caches.get_mut(id) else { return Err(format!("stage {stage}: no cache")) };
                let layers = self.place.layers.clone();
                let run = || self.arch.compute_stage(&self.backend, batch, kv, layers, Some(x), end);
                // A panic becomes this micro-batch's error, passed on like any other, so no
                // stage waits for an answer that never comes; the stage refuses what follows.
                catch_unwind(AssertUnwindSafe(run))
                    .unwrap_or_else(|_| {
                        *failed = true;
                        Err(EngineError::TensorParallel("panicked".into()))
                    })
                    .map_err(|e| format!("stage {stage}: {e}"))
            }
            (None, Ok(_)) => Err(format!("stage {stage}: a micro-batch before its batch")),
        }
    }
}

/// Pipeline messages as bytes, for stages in other processes: the message's JSON with its
/// floats (hidden states, logits) taken out, then the floats as little-endian f32, so
/// they travel exactly and without JSON's cost.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
pub(crate) mod wire {
    use super::{Message, MicroResult, StageOutput};
    use crate::EngineError;
    use serde::{de::DeserializeOwned, Serialize};

    /// Where a message keeps its floats.
    trait Floats {
        fn floats(&mut self) -> Option<&mut Vec<f32>>;
    }

    impl Floats for Message {
        fn floats(&mut self) -> Option<&mut Vec<f32>> {
            match self {
                Message::Micro { input: Ok(x), .. } => Some(x),
                _ => None,
            }
        }
    }

    impl Floats for MicroResult {
        fn floats(&mut self) -> Option<&mut Vec<f32>> {
            match &mut self.1 {
                Ok(StageOutput::Hidden(h)) => Some(h),
                Ok(StageOutput::Logits(l)) => Some(&mut l.data),
                Err(_) => None,
            }
        }
    }

    fn bad(why: impl std::fmt::Display) -> EngineError {
        EngineError::TensorParallel(format!("pipeline message: {why}"))
    }

    fn encode<T: Serialize + Floats>(mut m: T) -> Result<Vec<u8>, EngineError> {
        let floats = m.floats().map(std::mem::take).unwrap_or_default();
        let head = serde_json::to_vec(&m).map_err(bad)?;
        let mut out = Vec::with_capacity(8 + head.len() + 4 * floats.len());
        out.extend_from_slice(&(head.len() as u64).to_le_bytes());
        out.extend_from_slice(&head);
        out.extend(floats.iter().flat_map(|f| f.to_le_bytes()));
        Ok(out)
    }

    fn decode<T: DeserializeOwned + Floats>(bytes: &[u8]) -> Result<T, EngineError> {
        let (len, rest) = bytes.split_first_chunk::<8>().ok_or_else(|| bad("shorter than its header"))?;
        let len = usize::try_from(u64::from_le_bytes(*len)).ok().filter(|&n| n <= rest.len());
        let (head, data) = rest.split_at(len.ok_or_else(|| bad("its JSON claims more bytes than it has"))?);
        let mut m: T = serde_json::from_slice(head).map_err(bad)?;
        if data.len() % 4 != 0 {
            return Err(bad(format!("{} bytes of floats", data.len())));
        }
        match m.floats() {
            Some(slot) => *slot = data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            None if data.is_empty() => {}
            None => return Err(bad("floats with a message that has none")),
        }
        Ok(m)
    }

    pub(crate) fn encode_message(m: Message) -> Result<Vec<u8>, EngineError> {
        encode(m)
    }

    pub(crate) fn decode_message(bytes: &[u8]) -> Result<Message, EngineError> {
        decode(bytes)
    }

    pub(crate) fn encode_result(r: MicroResult) -> Result<Vec<u8>, EngineError> {
        encode(r)
    }

    pub(crate) fn decode_result(bytes: &[u8]) -> Result<MicroResult, EngineError> {
        decode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::wire::{decode_message, decode_result, encode_message, encode_result};
    use super::{balanced_cuts, check_split, Message};
    use crate::model::{Batch, Logits, StageOutput};

    #[test]
    fn messages_cross_the_wire_exactly() {
        let batch = Batch::for_sequence(3, 7, &[1, 2, 3], false);
        let hidden = vec![1.5f32, -0.0, f32::MIN_POSITIVE, 1e-45, f32::MAX, 0.1];
        let m = Message::Micro { index: 2, batch: batch.clone(), input: Ok(hidden.clone()), want_hidden: true };
        let back = decode_message(&encode_message(m).unwrap()).unwrap();
        let Message::Micro { index: 2, batch: b, input: Ok(x), want_hidden: true } = back else { panic!("{back:?}") };
        assert_eq!((b.tokens, b.layout.positions), (batch.tokens.clone(), batch.layout.positions.clone()));
        assert_eq!(
            x.iter().map(|f| f.to_bits()).collect::<Vec<_>>(),
            hidden.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
        );
        let failed = Message::Micro { index: 0, batch, input: Err("stage 1: no".into()), want_hidden: false };
        assert!(
            matches!(decode_message(&encode_message(failed).unwrap()).unwrap(), Message::Micro { input: Err(e), .. } if e == "stage 1: no")
        );
        let logits = Logits { rows: vec![0, 2], n_vocab: 3, data: vec![0.25, -1.0, 3.0, 4.0, 5.0, f32::NEG_INFINITY] };
        let (i, out) = decode_result(&encode_result((1, Ok(StageOutput::Logits(logits.clone())))).unwrap()).unwrap();
        let Ok(StageOutput::Logits(l)) = out else { panic!("{out:?}") };
        assert_eq!((i, l.rows, l.n_vocab, l.data), (1, logits.rows, 3, logits.data));
        assert!(matches!(decode_message(&encode_message(Message::Stop).unwrap()).unwrap(), Message::Stop));
    }

    #[test]
    fn damaged_messages_are_refused() {
        let good = encode_message(Message::Micro {
            index: 0,
            batch: Batch::default(),
            input: Ok(vec![1.0, 2.0]),
            want_hidden: false,
        })
        .unwrap();
        assert!(decode_message(&good[..good.len() - 1]).is_err(), "a float cut short");
        assert!(decode_message(&good[..5]).is_err(), "no header");
        let mut long = good.clone();
        long[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode_message(&long).is_err(), "a header claiming more than is there");
        let mut stop = encode_message(Message::Stop).unwrap();
        stop.extend_from_slice(&1f32.to_le_bytes());
        assert!(decode_message(&stop).is_err(), "floats with a message that has none");
    }

    #[test]
    fn splits_too_large_to_search_are_refused() {
        assert_eq!(check_split(18, 2, 300), Ok(()));
        assert_eq!(check_split(4096, 64, 40_000), Ok(()));
        assert!(check_split(301, 2, 300).is_err(), "more layers than tensors");
        assert!(check_split(4097, 2, 1 << 20).is_err(), "a file claiming too many layers");
        assert!(check_split(18, 65, 300).is_err(), "too many stages");
    }

    #[test]
    fn stages_balance_weights_with_the_head_on_the_last() {
        // Even layers, no head: an even split.
        assert_eq!(balanced_cuts(&[10; 8], 0, 2), vec![0, 4, 8]);
        assert_eq!(balanced_cuts(&[10; 9], 0, 3), vec![0, 3, 6, 9]);
        // A head as large as 4 layers: the last stage takes fewer layers.
        assert_eq!(balanced_cuts(&[10; 8], 40, 2), vec![0, 6, 8]);
        // A head larger than every layer together: the last stage holds only the head.
        assert_eq!(balanced_cuts(&[10; 4], 1000, 2), vec![0, 4, 4]);
        // One heavy layer in the middle.
        assert_eq!(balanced_cuts(&[1, 1, 10, 1, 1], 0, 3), vec![0, 2, 3, 5]);
        // More stages than layers: some stages are empty, every layer placed once.
        let cuts = balanced_cuts(&[5, 5], 0, 4);
        assert_eq!((cuts[0], cuts[4]), (0, 2));
        assert!(cuts.windows(2).all(|w| w[0] <= w[1]));
    }
}
