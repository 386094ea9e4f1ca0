//! Tensor and pipeline parallelism across processes (and machines) over MPI, the `mpi`
//! feature (the `mpi` crate over Debian's OpenMPI): `mpirun -np N turbine serve --tp N`,
//! or `--pp N` for one pipeline stage per process (then the stages talk point-to-point
//! along the pipeline's chain, see [`MpiChain`]).
//!
//! Every process of the world is one rank. Rank 0 runs the HTTP shell and the scheduler;
//! its split models are [`Sharded`] over an [`MpiComm`], and their followers are the
//! other processes, which run [`follow`]: they wait for rank 0's messages (load a model's
//! share, take steps, unload it) by broadcast and answer by gather. The collectives of a
//! forward pass are MPI all-gathers, summed in rank order on every rank, so the results
//! are those of the in-process group bit for bit.
//!
//! `TURBINE_COLLECTIVES=nccl` ([`Collectives`]) moves a split model's collectives onto NCCL
//! (the `nccl` feature, one GPU per rank) while rank 0's messages stay on MPI: each load
//! makes a new NCCL group, whose id rank 0 broadcasts inside the load's exchange, once
//! every rank has shown it can join (`join_nccl`). A pipeline's stages talk over MPI
//! either way (they hold whole layers and have no collectives to run).
//!
//! MPI is initialized for serialized use from several threads (a model's steps come from
//! its scheduler thread, its collectives from rank 0's pool, loads from the server's
//! threads); every call takes one process-wide lock. Split by tensors, several models can
//! be resident: rank 0's exchanges with the other ranks take turns (a model's whole step,
//! a load with its answers, an unload: [`take_turn`]), so every rank sees whole exchanges
//! in one order and no model's collectives fall between another's. A pipeline world holds
//! one model at a time (its stages serve one chain).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::Communicator as _;
use mpi::traits::*;
use mpi::Count;
use serde::{Deserialize, Serialize};

use super::gathered::{self, Exchange};
use super::group::{thread_pool, Answer, Follower, Followers, Sharded, Step};
#[cfg(feature = "nccl")]
use super::nccl::{GroupId, NcclComm};
use super::pipeline::{self, wire, Chain, MicroResult, Onward, Pipelined, StageRank};
use super::{CommError, Communicator};
use crate::backend::cpu::CpuBackend;
use crate::backend::WeightSizes;
use crate::gguf::Gguf;
use crate::model::Architecture;
use crate::EngineError;

/// Held for every MPI call of this process.
static MPI_LOCK: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    MPI_LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Rank 0's turn with the other ranks: taken for a model's whole step, for a load until
/// every rank answered, and for an unload. Held by one thread at a time, which may take it
/// again (a load that fails unloads inside its own turn).
struct Turn {
    holder: Mutex<(Option<std::thread::ThreadId>, usize)>,
    free: Condvar,
}

static TURN: Turn = Turn { holder: Mutex::new((None, 0)), free: Condvar::new() };

/// This thread's turn, until the guard drops.
struct TurnGuard;

fn take_turn() -> TurnGuard {
    let me = std::thread::current().id();
    let mut h = TURN.holder.lock().unwrap_or_else(|e| e.into_inner());
    while h.0.is_some_and(|t| t != me) {
        h = TURN.free.wait(h).unwrap_or_else(|e| e.into_inner());
    }
    *h = (Some(me), h.1 + 1);
    TurnGuard
}

impl Drop for TurnGuard {
    fn drop(&mut self) {
        let mut h = TURN.holder.lock().unwrap_or_else(|e| e.into_inner());
        h.1 -= 1;
        if h.1 == 0 {
            h.0 = None;
            TURN.free.notify_all();
        }
    }
}

/// The world communicator, shared by this process's threads. Safety: MPI is initialized
/// with `Threading::Serialized` and every call is made under [`MPI_LOCK`].
struct Shared(SimpleCommunicator);
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}
unsafe impl Send for MpiWorld {}
unsafe impl Sync for MpiWorld {}

/// This process's MPI world, while MPI is initialized (finalized when dropped).
/// Safety of sharing it between threads: as for [`Shared`].
pub struct MpiWorld {
    _universe: Universe,
    comm: Arc<Shared>,
    rank: usize,
    size: usize,
    resident: Arc<Resident>,
    /// Models load as a pipeline of one stage per rank, instead of split by tensors.
    pipeline: bool,
    /// What carries the collectives of models split by tensors (rank 0's choice counts:
    /// each load tells the other ranks).
    collectives: Collectives,
    /// The id of the next model loaded split by tensors.
    next_model: AtomicU64,
}

/// Whether a model is loaded over the world. One at a time: a load waits until the last
/// model's shares are unloaded, so its `Load` never overtakes the other's `Unload` (nor
/// falls between the other's steps).
#[derive(Default)]
struct Resident {
    loaded: Mutex<bool>,
    freed: Condvar,
}

/// How long a load waits for the resident model to go.
const RESIDENT_WAIT: Duration = Duration::from_secs(600);

impl Resident {
    fn claim(&self) -> Result<(), EngineError> {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        let deadline = Instant::now() + RESIDENT_WAIT;
        while *loaded {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(mpi_error("another model stays loaded over the MPI world (one at a time)"));
            }
            loaded = self.freed.wait_timeout(loaded, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        *loaded = true;
        Ok(())
    }

    fn release(&self) {
        *self.loaded.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.freed.notify_all();
    }
}

impl MpiWorld {
    /// Initializes MPI when this process was started by an MPI launcher with more than
    /// one rank (OpenMPI's or MPICH's environment); None otherwise.
    pub fn from_launcher() -> Result<Option<MpiWorld>, String> {
        let launched = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
            .iter()
            .filter_map(|v| std::env::var(v).ok())
            .any(|size| size.trim().parse::<usize>().is_ok_and(|n| n > 1));
        if !launched {
            return Ok(None);
        }
        // Before MPI starts: a bad value ends every rank at once, none waiting on another.
        let collectives = Collectives::from_env()?;
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or("MPI was already initialized in this process")?;
        if threading < mpi::Threading::Serialized {
            return Err(format!("the MPI library offers {threading:?} threading; serialized calls are needed"));
        }
        let comm = universe.world();
        let (rank, size) = (comm.rank() as usize, comm.size() as usize);
        let resident = Arc::default();
        let next_model = AtomicU64::new(0);
        Ok(Some(MpiWorld {
            _universe: universe,
            comm: Arc::new(Shared(comm)),
            rank,
            size,
            resident,
            pipeline: false,
            collectives,
            next_model,
        }))
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Models will load as pipelines, one stage per rank (`mpirun -np N turbine serve
    /// --pp N`), instead of split by tensors.
    pub fn pipelined(mut self) -> MpiWorld {
        if self.collectives == Collectives::Nccl && self.rank == 0 {
            eprintln!("turbine: {COLLECTIVES_VAR}=nccl is for --tp; a pipeline's stages talk over MPI");
        }
        self.pipeline = true;
        self
    }

    /// Whether models load as pipelines (one at a time) rather than split by tensors.
    pub fn is_pipelined(&self) -> bool {
        self.pipeline
    }

    /// Rank 0: loads `path` split over every rank of the world, the others loading their
    /// shares (or stages) as they are told.
    pub fn load(&self, path: &Path) -> Result<WorldModel, EngineError> {
        let file = Arc::new(Gguf::open(path)?);
        if self.pipeline {
            return self.load_pipeline(file, path);
        }
        let id = self.next_model.fetch_add(1, Ordering::Relaxed);
        // Until every rank answered: no other model's step falls between.
        let _turn = take_turn();
        let collectives = self.collectives;
        broadcast(&self.comm, &Message::Load { id, path: path.to_path_buf(), collectives })?;
        // The other ranks take the same steps: a failure here is the load's on every rank,
        // and none of them answers it.
        let comm = self.rank_comm(collectives)?;
        if collectives == Collectives::Nccl {
            eprintln!("turbine: model {id}'s collectives over NCCL, {} ranks", self.size);
        }
        // From here on dropping the followers unloads the other ranks' shares.
        let followers = Box::new(Processes { comm: self.comm.clone(), size: self.size, id, turn: None });
        let (backend, sharded) = Sharded::lead(comm, &file, threads_per_rank(), None, followers)?;
        Ok((file, backend, Box::new(sharded)))
    }

    /// [`MpiWorld::load`] as a pipeline of one stage per rank, once the last one is gone.
    fn load_pipeline(&self, file: Arc<Gguf>, path: &Path) -> Result<WorldModel, EngineError> {
        let cuts = pipeline::balanced_split(&file, self.size)?;
        self.resident.claim()?;
        if let Err(e) = broadcast(&self.comm, &Message::LoadStage { path: path.to_path_buf(), cuts: cuts.clone() }) {
            self.resident.release();
            return Err(e);
        }
        // From here on dropping the chain unloads the other ranks' stages and frees the world.
        let (comm, size, resident) = (self.comm.clone(), self.size, self.resident.clone());
        let chain = Box::new(MpiChain { comm: comm.clone(), size, resident, running: false, early: VecDeque::new() });
        let answers = move || gather_answers(&comm, size);
        let (backend, model) = Pipelined::lead(&file, &cuts, (1, threads_per_rank()), chain, answers)?;
        Ok((file, backend, Box::new(model)))
    }

    /// Rank 0: tells the other ranks to end [`follow`].
    pub fn release_followers(&self) {
        let _turn = take_turn();
        broadcast(&self.comm, &Message::Exit).ok();
    }

    fn communicator(&self) -> MpiComm {
        MpiComm { comm: self.comm.clone(), rank: self.rank, size: self.size, busy_ns: AtomicU64::new(0) }
    }

    /// This rank's collectives for the model loading now, made by every rank at the same
    /// point of the load's exchange: over MPI, or over NCCL once every rank has joined.
    fn rank_comm(&self, collectives: Collectives) -> Result<RankComm, EngineError> {
        match collectives {
            Collectives::Mpi => Ok(RankComm::Mpi(self.communicator())),
            #[cfg(feature = "nccl")]
            Collectives::Nccl => Ok(RankComm::Nccl(join_nccl(self)?, self.comm.clone())),
            #[cfg(not(feature = "nccl"))]
            Collectives::Nccl => Err(mpi_error(WITHOUT_NCCL)),
        }
    }
}

/// The environment variable that picks what carries the collectives under MPI.
pub const COLLECTIVES_VAR: &str = "TURBINE_COLLECTIVES";

const WITHOUT_NCCL: &str = "built without NCCL: build with --features mpi,nccl";

/// What carries the collectives of a model split by tensors over the MPI world
/// (`TURBINE_COLLECTIVES`): MPI itself (the default), or NCCL between the ranks' GPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Collectives {
    #[default]
    Mpi,
    Nccl,
}

impl Collectives {
    /// `TURBINE_COLLECTIVES` (unset or empty: MPI).
    pub fn from_env() -> Result<Collectives, String> {
        let value = std::env::var_os(COLLECTIVES_VAR).map(|v| v.to_string_lossy().into_owned());
        Collectives::parse(value.as_deref())
    }

    fn parse(value: Option<&str>) -> Result<Collectives, String> {
        let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            return Ok(Collectives::Mpi);
        };
        if v.eq_ignore_ascii_case("mpi") {
            Ok(Collectives::Mpi)
        } else if v.eq_ignore_ascii_case("nccl") && cfg!(feature = "nccl") {
            Ok(Collectives::Nccl)
        } else if v.eq_ignore_ascii_case("nccl") {
            Err(format!("{COLLECTIVES_VAR}={v}: {WITHOUT_NCCL}"))
        } else {
            Err(format!("{COLLECTIVES_VAR}={v:?} is not known: use mpi (the default) or nccl"))
        }
    }
}

/// A model loaded over the world, as rank 0 holds it: the file, rank 0's backend and the
/// model (split by tensors, or a pipeline).
pub type WorldModel = (Arc<Gguf>, CpuBackend, Box<dyn Architecture<CpuBackend>>);

/// Set by the SIGTERM handler [`on_termination`] installs.
static TERMINATED: AtomicBool = AtomicBool::new(false);

extern "C" fn note_termination(_signal: libc::c_int) {
    TERMINATED.store(true, Ordering::SeqCst); // async-signal-safe: one atomic store
}

/// Calls `then` (on a thread of its own) once this process gets SIGTERM. Under mpirun,
/// that is how a rank learns that another rank died: the launcher ends the job, sending
/// SIGTERM to every process left and SIGKILL a second later (OpenMPI's default
/// `odls_base_sigkill_timeout`); a rank blocked in a collective with the dead one never
/// returns from it, so this is rank 0's chance to answer its waiting requests.
pub fn on_termination(then: impl FnOnce() + Send + 'static) -> Result<(), String> {
    // SAFETY: the handler only stores to an atomic.
    let previous = unsafe { libc::signal(libc::SIGTERM, note_termination as *const () as libc::sighandler_t) };
    if previous == libc::SIG_ERR {
        return Err("cannot handle SIGTERM".into());
    }
    std::thread::Builder::new()
        .name("turbine-sigterm".into())
        .spawn(move || {
            while !TERMINATED.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            then();
        })
        .map(drop)
        .map_err(|e| format!("cannot start the SIGTERM watcher: {e}"))
}

/// Threads for this process's rank: the cores shared by the ranks on this machine
/// (OpenMPI's or MPICH's count of local ranks).
fn threads_per_rank() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let local = ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse::<usize>().ok())
        .unwrap_or(1);
    (cores / local.max(1)).max(1)
}

/// What rank 0 tells the other processes.
#[derive(Debug, Serialize, Deserialize)]
enum Message {
    /// Load your share of this file (which every machine must have at this path) as model
    /// `id`, its collectives over `collectives`.
    Load { id: u64, path: PathBuf, collectives: Collectives },
    /// Load your stage (your rank's) of this file cut at `cuts`, as
    /// `pipeline::stage_at` reads them.
    LoadStage { path: PathBuf, cuts: Vec<usize> },
    /// Every stage loaded: serve the pipeline's chain until it stops.
    Run,
    /// Steps of model `id`.
    Steps { id: u64, steps: Vec<Step> },
    /// Drop model `id` (a pipeline's stage: None).
    Unload { id: Option<u64> },
    /// Leave [`follow`].
    Exit,
}

fn mpi_error(what: impl std::fmt::Display) -> EngineError {
    EngineError::TensorParallel(format!("MPI: {what}"))
}

/// Rank 0 sends `message` to every rank.
fn broadcast(comm: &Shared, message: &Message) -> Result<(), EngineError> {
    let bytes = serde_json::to_vec(message).map_err(mpi_error)?;
    broadcast_bytes(comm, bytes);
    Ok(())
}

/// Rank 0 sends `bytes` to every rank (which take them with [`receive_bytes`]).
fn broadcast_bytes(comm: &Shared, mut bytes: Vec<u8>) {
    let _guard = lock();
    let root = comm.0.process_at_rank(0);
    let mut len = [bytes.len() as u64];
    root.broadcast_into(&mut len[..]);
    root.broadcast_into(&mut bytes[..]);
}

/// The largest message a follower accepts (a step's batch is a few thousand tokens).
const MAX_MESSAGE_BYTES: usize = 1 << 30;

/// The other ranks receive rank 0's next message.
fn receive(comm: &Shared) -> Result<Message, EngineError> {
    let bytes = receive_bytes(comm)?;
    serde_json::from_slice(&bytes).map_err(|e| mpi_error(format!("a message from rank 0 is not readable: {e}")))
}

/// The other ranks receive the bytes rank 0 sends with [`broadcast_bytes`].
fn receive_bytes(comm: &Shared) -> Result<Vec<u8>, EngineError> {
    let _guard = lock();
    let root = comm.0.process_at_rank(0);
    let mut len = [0u64];
    root.broadcast_into(&mut len[..]);
    let len = usize::try_from(len[0]).ok().filter(|&n| n <= MAX_MESSAGE_BYTES);
    let len =
        len.ok_or_else(|| mpi_error(format!("a message from rank 0 claims more than {MAX_MESSAGE_BYTES} bytes")))?;
    let mut bytes = vec![0u8; len];
    root.broadcast_into(&mut bytes[..]);
    Ok(bytes)
}

/// A follower's answer as it travels: the error as text.
type WireAnswer = Result<WeightSizes, String>;

/// A follower process sends its answer to rank 0.
fn answer(comm: &Shared, answer: Answer) -> Result<(), EngineError> {
    let wire: WireAnswer = answer.map_err(|e| e.to_string());
    let bytes = serde_json::to_vec(&wire).map_err(mpi_error)?;
    send_to_root(comm, &bytes);
    Ok(())
}

/// A follower's part of rank 0's [`gather_bytes`].
fn send_to_root(comm: &Shared, bytes: &[u8]) {
    let _guard = lock();
    let root = comm.0.process_at_rank(0);
    root.gather_into(&[bytes.len() as u64][..]);
    root.gather_varcount_into(bytes);
}

/// Rank 0's side of the other processes, for one loaded model (`id`).
struct Processes {
    comm: Arc<Shared>,
    size: usize,
    id: u64,
    /// Held from a step's beginning to its end.
    turn: Option<TurnGuard>,
}

impl Followers for Processes {
    fn send(&mut self, steps: Vec<Step>) -> Result<(), EngineError> {
        broadcast(&self.comm, &Message::Steps { id: self.id, steps })
    }

    fn answers(&mut self) -> Vec<Answer> {
        gather_answers(&self.comm, self.size)
    }

    fn step_begins(&mut self) {
        self.turn = Some(take_turn());
    }

    fn step_ends(&mut self) {
        self.turn = None;
    }
}

/// Rank 0 gathers the bytes every other rank sends with [`send_to_root`], in rank order
/// (ranks 1 and up).
fn gather_bytes(comm: &Shared, size: usize) -> Vec<Vec<u8>> {
    let _guard = lock();
    let root = comm.0.process_at_rank(0);
    let mut lens = vec![0u64; size];
    root.gather_into_root(&[0u64][..], &mut lens[..]);
    let counts: Vec<Count> = lens.iter().map(|&l| l as Count).collect();
    let displs: Vec<Count> = offsets(&counts);
    let mut all = vec![0u8; lens.iter().sum::<u64>() as usize];
    let mut partition = PartitionMut::new(&mut all[..], counts.clone(), &displs[..]);
    root.gather_varcount_into_root(&[0u8; 0][..], &mut partition);
    (1..size).map(|r| all[displs[r] as usize..][..counts[r] as usize].to_vec()).collect()
}

/// Rank 0 gathers every other rank's answer, in rank order.
fn gather_answers(comm: &Shared, size: usize) -> Vec<Answer> {
    gather_bytes(comm, size)
        .iter()
        .enumerate()
        .map(|(i, b)| match serde_json::from_slice::<WireAnswer>(b) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(EngineError::TensorParallel(format!("rank {}: {e}", i + 1))),
            Err(e) => Err(mpi_error(format!("rank {}'s answer is not readable: {e}", i + 1))),
        })
        .collect()
}

impl Drop for Processes {
    /// The model goes: so do its shares.
    fn drop(&mut self) {
        let _turn = take_turn();
        broadcast(&self.comm, &Message::Unload { id: Some(self.id) }).ok();
    }
}

/// Tags of the pipeline's point-to-point messages: down the chain of stages, and from the
/// last stage back to rank 0.
const DOWN: mpi::Tag = 11;
const BACK: mpi::Tag = 12;

/// How long rank 0 waits between looks at a send in progress (and at the answers that
/// may have come meanwhile), so it does not take the core of a stage on the same machine.
const POLL: Duration = Duration::from_micros(20);

/// Rank 0's side of a pipeline over the world: stage r is rank r.
struct MpiChain {
    comm: Arc<Shared>,
    size: usize,
    resident: Arc<Resident>,
    /// Whether the stages were told to run (after every stage loaded).
    running: bool,
    /// Answers of the last stage taken while a send was in progress.
    early: VecDeque<Result<MicroResult, EngineError>>,
}

impl MpiChain {
    /// The last stage's next answer, when one has come.
    fn answer_waiting(comm: &Shared, last: usize) -> Option<Result<MicroResult, EngineError>> {
        let _guard = lock();
        let from = comm.0.process_at_rank(last as i32);
        from.immediate_probe_with_tag(BACK)?;
        Some(wire::decode_result(&from.receive_vec_with_tag::<u8>(BACK).0))
    }
}

impl Chain for MpiChain {
    /// Sent without blocking, taking the last stage's answers meanwhile: a blocking send
    /// could wait on stage 1 handing on to stage 2 ... waiting on the last stage, which
    /// waits for rank 0 to take its answer.
    fn send(&mut self, message: pipeline::Message) -> Result<(), EngineError> {
        if !self.running {
            broadcast(&self.comm, &Message::Run)?;
            self.running = true;
        }
        let bytes = wire::encode_message(message)?;
        let (comm, early, last) = (&self.comm, &mut self.early, self.size - 1);
        mpi::request::scope(|scope| {
            let mut request = {
                let _guard = lock();
                comm.0.process_at_rank(1).immediate_send_with_tag(scope, &bytes[..], DOWN)
            };
            loop {
                let tested = {
                    let _guard = lock();
                    request.test()
                };
                match tested {
                    Ok(_) => return,
                    Err(pending) => request = pending,
                }
                match MpiChain::answer_waiting(comm, last) {
                    Some(answer) => early.push_back(answer),
                    None => std::thread::sleep(POLL),
                }
            }
        });
        Ok(())
    }

    fn result(&mut self) -> Result<MicroResult, EngineError> {
        if let Some(answer) = self.early.pop_front() {
            return answer;
        }
        let bytes = {
            let _guard = lock();
            self.comm.0.process_at_rank((self.size - 1) as i32).receive_vec_with_tag::<u8>(BACK).0
        };
        wire::decode_result(&bytes)
    }
}

impl Drop for MpiChain {
    /// The model goes: the running stages stop down the chain (each then waits for rank
    /// 0's next broadcast); stages that never ran are told to unload.
    fn drop(&mut self) {
        if self.running {
            if let Ok(bytes) = wire::encode_message(pipeline::Message::Stop) {
                let _guard = lock();
                self.comm.0.process_at_rank(1).send_with_tag(&bytes[..], DOWN);
            }
        } else {
            broadcast(&self.comm, &Message::Unload { id: None }).ok();
        }
        self.resident.release();
    }
}

/// A stage rank's ways out: on to the next rank, or from the last back to rank 0.
struct MpiOnward<'a> {
    comm: &'a Shared,
    rank: usize,
}

impl Onward for MpiOnward<'_> {
    fn next(&mut self, message: pipeline::Message) -> bool {
        self.send(self.rank + 1, DOWN, wire::encode_message(message))
    }

    fn back(&mut self, result: MicroResult) -> bool {
        self.send(0, BACK, wire::encode_result(result))
    }
}

impl MpiOnward<'_> {
    fn send(&self, to: usize, tag: mpi::Tag, bytes: Result<Vec<u8>, EngineError>) -> bool {
        match bytes {
            Ok(bytes) => {
                let _guard = lock();
                self.comm.0.process_at_rank(to as i32).send_with_tag(&bytes[..], tag);
                true
            }
            Err(e) => {
                eprintln!("turbine: pipeline rank {} cannot send: {e}", self.rank);
                false
            }
        }
    }
}

/// A stage rank serves the chain: messages from the rank before it until it stops. A
/// message it cannot read ends the job (the ranks after it would wait forever).
fn serve_stage(world: &MpiWorld, pool: &rayon::ThreadPool, me: &mut StageRank) {
    let (comm, rank) = (&world.comm, world.rank);
    let inbox = || {
        let bytes = {
            let _guard = lock();
            comm.0.process_at_rank(rank as i32 - 1).receive_vec_with_tag::<u8>(DOWN).0
        };
        match wire::decode_message(&bytes) {
            Ok(m) => Some(m),
            Err(e) => {
                eprintln!("turbine: pipeline rank {rank}: {e}");
                comm.0.abort(1)
            }
        }
    };
    pool.install(|| me.serve(inbox, &mut MpiOnward { comm, rank }));
}

/// Each count's start in a buffer holding them all in order.
fn offsets(counts: &[Count]) -> Vec<Count> {
    counts.iter().scan(0, |at, &c| Some(std::mem::replace(at, *at + c))).collect()
}

/// A rank other than 0: follows rank 0's messages until it says to stop. A failed load is
/// answered (rank 0 is gathering the answers); a failed step aborts the MPI job at once,
/// since its peers may be waiting in a collective it will not join.
pub fn follow(world: &MpiWorld) -> Result<(), String> {
    let mut models: HashMap<u64, (rayon::ThreadPool, Follower)> = HashMap::new();
    let mut stage: Option<(rayon::ThreadPool, StageRank)> = None;
    loop {
        match receive(&world.comm).map_err(|e| e.to_string())? {
            Message::Load { id, path, collectives } => {
                // As rank 0 does, at the same point: a failure is the load's on every rank,
                // which rank 0 reports (with this rank's reason); no answer is due.
                let Ok(comm) = world.rank_comm(collectives) else {
                    continue;
                };
                let loaded = thread_pool(threads_per_rank()).and_then(|pool| {
                    let file = Arc::new(Gguf::open(&path)?);
                    let me = pool.install(|| Follower::load(comm, &file, None))?;
                    Ok((pool, me))
                });
                let reply = match &loaded {
                    Ok((_, me)) => me.loaded(),
                    Err(e) => Err(EngineError::TensorParallel(e.to_string())),
                };
                answer(&world.comm, reply).map_err(|e| e.to_string())?;
                if let Ok(model) = loaded {
                    models.insert(id, model);
                }
            }
            Message::LoadStage { path, cuts } => {
                // The previous model's memory first.
                drop((std::mem::take(&mut models), stage.take()));
                let loaded = load_stage(world, &path, &cuts);
                let reply = loaded.as_ref().map(|(_, me)| me.weight_bytes());
                let reply = reply.map_err(|e| EngineError::TensorParallel(e.to_string()));
                answer(&world.comm, reply).map_err(|e| e.to_string())?;
                stage = loaded.ok();
            }
            Message::Run => {
                let Some((pool, mut me)) = stage.take() else {
                    return Err("rank 0 started a pipeline whose stage this rank did not load".into());
                };
                serve_stage(world, &pool, &mut me);
            }
            Message::Steps { id, steps } => {
                let Some((pool, me)) = models.get_mut(&id) else {
                    return Err(format!("rank 0 sent a step of model {id}, which this rank does not hold"));
                };
                for step in steps {
                    if let Some(reply) = pool.install(|| me.take(step)) {
                        if let Err(e) = &reply {
                            // Rank 0 may be waiting in a collective this rank will not join:
                            // end the job now (rank 0 answers its requests on the SIGTERM).
                            eprintln!("turbine: tensor-parallel rank {} failed a step: {e}", world.rank);
                            world.comm.0.abort(1);
                        }
                        answer(&world.comm, reply).map_err(|e| e.to_string())?;
                    }
                }
            }
            Message::Unload { id: Some(id) } => drop(models.remove(&id)),
            Message::Unload { id: None } => stage = None,
            Message::Exit => return Ok(()),
        }
    }
}

/// This rank's stage of `path` cut at `cuts` (stage r is rank r), in a pool of its own.
fn load_stage(world: &MpiWorld, path: &Path, cuts: &[usize]) -> Result<(rayon::ThreadPool, StageRank), EngineError> {
    if pipeline::check_cuts(cuts)? != world.size {
        return Err(mpi_error(format!("{} stages for {} ranks", cuts.len().saturating_sub(1), world.size)));
    }
    let pool = thread_pool(threads_per_rank())?;
    let file = Arc::new(Gguf::open(path)?);
    let me = pool.install(|| StageRank::load(&file, pipeline::stage_at(cuts, world.rank), 1, threads_per_rank()))?;
    Ok((pool, me))
}

/// One rank's side of collectives over MPI: every contribution is all-gathered and
/// combined in rank order on every rank, as [`super::InProcess`] combines them.
pub struct MpiComm {
    comm: Arc<Shared>,
    rank: usize,
    size: usize,
    busy_ns: AtomicU64,
}

impl Exchange for MpiComm {
    fn exchange(&self, op: u64, local: &[f64]) -> Result<Vec<Vec<f64>>, CommError> {
        let start = Instant::now();
        let _guard = lock();
        let world = &self.comm.0;
        let mut heads = vec![0u64; 2 * self.size];
        world.all_gather_into(&[op, local.len() as u64][..], &mut heads[..]);
        let heads: Vec<(u64, u64)> = heads.chunks_exact(2).map(|h| (h[0], h[1])).collect();
        gathered::check_calls(self.rank, op, local.len(), &heads)?;
        let lens: Vec<u64> = heads.iter().map(|h| h.1).collect();
        let counts: Vec<Count> = lens.iter().map(|&l| l as Count).collect();
        let displs = offsets(&counts);
        let mut all = vec![0f64; lens.iter().sum::<u64>() as usize];
        let mut partition = PartitionMut::new(&mut all[..], counts.clone(), &displs[..]);
        world.all_gather_varcount_into(local, &mut partition);
        let parts = (0..self.size).map(|r| all[displs[r] as usize..][..counts[r] as usize].to_vec()).collect();
        self.busy_ns.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(parts)
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        gathered::all_reduce_sum(self, buf)
    }

    /// Summed in rank order, as the in-process group sums.
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), CommError> {
        gathered::all_reduce_sum_f64(self, buf)
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        gathered::all_gather(self, local)
    }

    fn busy(&self) -> Duration {
        Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed))
    }

    /// MPI has no leaving a communicator: the job ends (rank 0 answers its requests on
    /// the SIGTERM that follows).
    fn abandon(&self) {
        eprintln!("turbine: tensor-parallel rank {} failed mid-step; ending the MPI job", self.rank);
        self.comm.0.abort(1);
    }
}

/// A rank's collectives for one model split by tensors, as `TURBINE_COLLECTIVES` chose.
enum RankComm {
    Mpi(MpiComm),
    /// NCCL's, with the world to end when this rank leaves (as [`MpiComm`] does): NCCL
    /// has no leaving a group, and the other ranks may be waiting for this one in a
    /// collective on their GPUs.
    #[cfg(feature = "nccl")]
    Nccl(NcclComm, Arc<Shared>),
}

impl RankComm {
    fn inner(&self) -> &dyn Communicator {
        match self {
            RankComm::Mpi(c) => c,
            #[cfg(feature = "nccl")]
            RankComm::Nccl(c, _) => c,
        }
    }
}

impl Communicator for RankComm {
    fn rank(&self) -> usize {
        self.inner().rank()
    }

    fn size(&self) -> usize {
        self.inner().size()
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        self.inner().all_reduce_sum(buf)
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), CommError> {
        self.inner().all_reduce_sum_f64(buf)
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        self.inner().all_gather(local)
    }

    fn busy(&self) -> Duration {
        self.inner().busy()
    }

    fn abandon(&self) {
        match self {
            RankComm::Mpi(c) => c.abandon(),
            #[cfg(feature = "nccl")]
            RankComm::Nccl(c, world) => {
                c.abandon();
                eprintln!("turbine: tensor-parallel rank {} failed mid-step; ending the MPI job", c.rank());
                world.0.abort(1);
            }
        }
    }
}

/// Every rank, at the same point of a load: joins a new NCCL group. NCCL's init waits for
/// every rank of the group, so a rank that cannot join (no driver, no libnccl, no GPU)
/// would leave the others waiting in it for good: first every rank opens its GPU and the
/// ranks agree that all could, with the group's id from rank 0; only then do they join,
/// and agree again that all did.
#[cfg(feature = "nccl")]
fn join_nccl(world: &MpiWorld) -> Result<NcclComm, EngineError> {
    let opened = NcclComm::open(local_rank(world.rank));
    // Rank 0's outcome carries the group's id, made once its own GPU is open.
    let mine = match (&opened, world.rank) {
        (Err(e), _) => Err(reason(e)),
        (Ok(_), 0) => NcclComm::new_group_id().map(|id| id.iter().map(|&c| c as u8).collect()).map_err(|e| reason(&e)),
        (Ok(_), _) => Ok(Vec::new()),
    };
    let id = group_id(&agree(world, "opening each rank's GPU", mine)?)?;
    let joined = opened?.join(world.rank, world.size, id);
    agree(world, "joining the group", joined.as_ref().map(|_| Vec::new()).map_err(reason))?;
    joined
}

/// The group id rank 0 sent.
#[cfg(feature = "nccl")]
fn group_id(bytes: &[u8]) -> Result<GroupId, EngineError> {
    let bytes: [u8; 128] =
        bytes.try_into().map_err(|_| mpi_error(format!("an NCCL group id of {} bytes, not 128", bytes.len())))?;
    Ok(bytes.map(|b| b as std::ffi::c_char))
}

/// This process's rank among the world's processes on its machine (OpenMPI's or MPICH's
/// count), else its rank in the world: which of the machine's GPUs it takes.
#[cfg(feature = "nccl")]
fn local_rank(rank: usize) -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse::<usize>().ok())
        .unwrap_or(rank)
}

/// Why a rank failed, without the error kind's prefix (the agreed error adds its own).
#[cfg(feature = "nccl")]
fn reason(e: &EngineError) -> String {
    match e {
        EngineError::TensorParallel(why) => why.clone(),
        e => e.to_string(),
    }
}

/// One rank's outcome of a stage every rank goes through together: a payload (rank 0's
/// is what every rank needs next) or why it failed.
#[cfg(feature = "nccl")]
type Outcome = Result<Vec<u8>, String>;

/// Every rank's `mine` for stage `what`, agreed: rank 0 gathers them and sends every rank
/// the verdict, its own payload when all succeeded, else every failure by rank. So all
/// ranks go on, or none does, and each learns why.
#[cfg(feature = "nccl")]
fn agree(world: &MpiWorld, what: &str, mine: Outcome) -> Result<Vec<u8>, EngineError> {
    // An outcome is bytes and text, which always encode; one that could not be read
    // counts as that rank's failure.
    let encode = |o: &Outcome| serde_json::to_vec(o).unwrap_or_default();
    let bytes = if world.rank == 0 {
        let theirs = gather_bytes(&world.comm, world.size);
        let all = std::iter::once(mine).chain(theirs.iter().map(|b| decode_outcome(b)));
        let verdict = encode(&verdict_of(all, what));
        broadcast_bytes(&world.comm, verdict.clone());
        verdict
    } else {
        send_to_root(&world.comm, &encode(&mine));
        receive_bytes(&world.comm)?
    };
    // Every rank reads the same bytes, so every rank reaches the same verdict.
    decode_outcome(&bytes).map_err(EngineError::TensorParallel)
}

#[cfg(feature = "nccl")]
fn decode_outcome(bytes: &[u8]) -> Outcome {
    serde_json::from_slice(bytes).unwrap_or_else(|e| Err(format!("an unreadable outcome ({e})")))
}

/// Rank 0's payload if every rank (in rank order, rank 0 first) succeeded; else the
/// failures, ranks with the same reason together.
#[cfg(feature = "nccl")]
fn verdict_of(outcomes: impl Iterator<Item = Outcome>, what: &str) -> Outcome {
    let mut payload = None;
    let mut failed: Vec<(String, Vec<usize>)> = Vec::new();
    for (rank, outcome) in outcomes.enumerate() {
        match outcome {
            Ok(p) if rank == 0 => payload = Some(p),
            Ok(_) => {}
            Err(why) => match failed.iter_mut().find(|(w, _)| *w == why) {
                Some((_, ranks)) => ranks.push(rank),
                None => failed.push((why, vec![rank])),
            },
        }
    }
    if failed.is_empty() {
        return payload.ok_or_else(|| "rank 0 sent no outcome".into());
    }
    let each: Vec<String> = failed
        .iter()
        .map(|(why, ranks)| {
            let list: Vec<String> = ranks.iter().map(usize::to_string).collect();
            let noun = if ranks.len() == 1 { "rank" } else { "ranks" };
            format!("{noun} {}: {why}", list.join(", "))
        })
        .collect();
    Err(format!("NCCL could not start on every rank ({what}): {}", each.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectives_are_mpi_or_nccl_and_nothing_else() {
        for unset in [None, Some(""), Some(" "), Some("mpi"), Some("MPI")] {
            assert_eq!(Collectives::parse(unset), Ok(Collectives::Mpi), "{unset:?}");
        }
        let nccl = Collectives::parse(Some("nccl"));
        if cfg!(feature = "nccl") {
            assert_eq!(nccl, Ok(Collectives::Nccl));
        } else {
            assert!(nccl.is_err_and(|e| e.contains("built without NCCL: build with --features mpi,nccl")));
        }
        let e = Collectives::parse(Some("gloo")).unwrap_err();
        assert!(e.contains("TURBINE_COLLECTIVES=\"gloo\"") && e.contains("mpi") && e.contains("nccl"), "{e}");
    }

    #[cfg(feature = "nccl")]
    #[test]
    fn a_verdict_is_rank_0s_payload_or_every_failure_by_rank() {
        let ok = |p: &[u8]| Ok(p.to_vec());
        assert_eq!(verdict_of([ok(b"id"), ok(b""), ok(b"")].into_iter(), "x"), Ok(b"id".to_vec()));
        let why = |w: &str| Err(w.to_string());
        let v = verdict_of([why("no driver"), ok(b""), why("no driver"), why("no GPU")].into_iter(), "opening");
        assert_eq!(
            v,
            Err("NCCL could not start on every rank (opening): ranks 0, 2: no driver; rank 3: no GPU".into())
        );
    }
}
