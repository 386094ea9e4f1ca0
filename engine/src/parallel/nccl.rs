//! Collectives over NCCL (the `nccl` feature): NVIDIA's collective library through cudarc,
//! loaded at run time, one rank per GPU. Not run on a GPU yet.
//!
//! The CPU backend's tensor parallelism hands the communicator host slices, so each
//! collective stages them through the rank's GPU: its values go up, NCCL all-gathers every
//! rank's, they come back, and sums are taken on the host in rank order, as
//! [`super::InProcess`] and the MPI communicator take them (NCCL's own reductions add in
//! an order of their own, which would change the last bits). A header all-gather first (the
//! collective's kind and length on every rank) catches ranks that disagree, and lets
//! all-gathers of different lengths be padded to the longest.
//!
//! Ranks are threads of this process over several GPUs ([`NcclComm::group`],
//! `ncclCommInitAll`), or processes that got the group's id from one rank some other way
//! ([`NcclComm::new_group_id`], then [`NcclComm::open`] and [`Joining::join`], or
//! [`NcclComm::join`]): under MPI, `TURBINE_COLLECTIVES=nccl` passes it over MPI (see
//! `super::mpi`). NCCL allows one rank per GPU, so on one GPU the group has one rank.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use turbine_cuda::cudarc::driver::{CudaContext, CudaStream};
use turbine_cuda::cudarc::nccl::{Comm, Id};

use super::gathered::{self, Exchange};
use super::{CommError, Communicator};
use crate::EngineError;

/// The id every rank of a group joins with, made by one rank and sent to the others.
pub type GroupId = [std::ffi::c_char; 128];

/// One rank of a group over NCCL.
pub struct NcclComm {
    rank: usize,
    size: usize,
    comm: Mutex<Rank>,
    busy_ns: AtomicU64,
    /// Set once this rank failed a collective or left: later ones fail at once.
    left: AtomicBool,
}

/// The NCCL communicator and the stream its collectives run on.
struct Rank {
    comm: Comm,
    stream: Arc<CudaStream>,
}

// SAFETY: NCCL communicators may be used from any thread, one call at a time; every use
// is under `NcclComm::comm`'s lock.
unsafe impl Send for Rank {}

fn unavailable(why: impl std::fmt::Display) -> EngineError {
    EngineError::TensorParallel(format!("NCCL: {why}"))
}

/// The driver and libnccl can be loaded (cudarc panics on a missing library otherwise).
fn check_libraries() -> Result<(), EngineError> {
    // SAFETY: each only tries to open its library by its candidate names.
    if !unsafe { turbine_cuda::cudarc::driver::sys::is_culib_present() } {
        return Err(unavailable("no CUDA driver (libcuda) on this machine"));
    }
    if !unsafe { turbine_cuda::cudarc::nccl::sys::is_culib_present() } {
        return Err(unavailable(
            "libnccl.so not found: NCCL installs libnccl.so.2 (PyTorch's wheels under nvidia/nccl/lib); \
             link libnccl.so to it in a directory on LD_LIBRARY_PATH",
        ));
    }
    Ok(())
}

fn stream_of(ordinal: usize) -> Result<Arc<CudaStream>, EngineError> {
    let ctx = CudaContext::new(ordinal).map_err(|e| unavailable(format!("GPU {ordinal}: {e:?}")))?;
    Ok(ctx.default_stream())
}

impl NcclComm {
    /// A group of one rank per GPU of `ordinals`, all in this process.
    pub fn group(ordinals: &[usize]) -> Result<Vec<NcclComm>, EngineError> {
        check_libraries()?;
        let streams = ordinals.iter().map(|&o| stream_of(o)).collect::<Result<Vec<_>, _>>()?;
        let comms = Comm::from_devices(streams.clone()).map_err(|e| unavailable(format!("{e:?}")))?;
        let size = comms.len();
        Ok(comms
            .into_iter()
            .zip(streams)
            .enumerate()
            .map(|(rank, (comm, stream))| NcclComm::wrap(rank, size, comm, stream))
            .collect())
    }

    /// A new group's id, on the rank that makes it.
    pub fn new_group_id() -> Result<GroupId, EngineError> {
        check_libraries()?;
        Id::new().map(|id| *id.internal()).map_err(|e| unavailable(format!("{e:?}")))
    }

    /// Rank `rank` of `size` on GPU `ordinal`, joining the group of `id`.
    pub fn join(ordinal: usize, rank: usize, size: usize, id: GroupId) -> Result<NcclComm, EngineError> {
        check_libraries()?;
        Joining { ordinal, stream: stream_of(ordinal)? }.join(rank, size, id)
    }

    /// The GPU a process's rank will join a group on: `local_rank` (its rank among the
    /// group's processes on this machine) modulo the GPUs visible here. Everything that
    /// can fail before NCCL's init fails here, at once: that init waits for every rank, so
    /// a rank must not enter it before all know that all can (see `super::mpi`).
    pub fn open(local_rank: usize) -> Result<Joining, EngineError> {
        check_libraries()?;
        let count = CudaContext::device_count().map_err(|e| unavailable(format!("no usable GPU: {e:?}")))?;
        let count = usize::try_from(count).ok().filter(|&n| n > 0).ok_or_else(|| unavailable("no GPU visible"))?;
        let ordinal = local_rank % count;
        Ok(Joining { ordinal, stream: stream_of(ordinal)? })
    }

    fn wrap(rank: usize, size: usize, comm: Comm, stream: Arc<CudaStream>) -> NcclComm {
        NcclComm {
            rank,
            size,
            comm: Mutex::new(Rank { comm, stream }),
            busy_ns: AtomicU64::new(0),
            left: AtomicBool::new(false),
        }
    }
}

/// A rank's GPU, opened ([`NcclComm::open`]) and ready to join a group.
pub struct Joining {
    ordinal: usize,
    stream: Arc<CudaStream>,
}

impl Joining {
    /// The GPU's ordinal among those visible to this process.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Joins the group of `id` as rank `rank` of `size`: blocks until every rank of the
    /// group has joined (NCCL's `ncclCommInitRank`).
    pub fn join(self, rank: usize, size: usize, id: GroupId) -> Result<NcclComm, EngineError> {
        // cudarc panics on ranks beyond i32.
        if rank >= size || i32::try_from(size).is_err() {
            return Err(unavailable(format!("rank {rank} of a group of {size}")));
        }
        let comm = Comm::from_rank(self.stream.clone(), rank, size, Id::uninit(id))
            .map_err(|e| unavailable(format!("joining the group on GPU {}: {e:?}", self.ordinal)))?;
        Ok(NcclComm::wrap(rank, size, comm, self.stream))
    }
}

impl Exchange for NcclComm {
    fn exchange(&self, op: u64, local: &[f64]) -> Result<Vec<Vec<f64>>, CommError> {
        if self.left.load(Ordering::SeqCst) {
            return Err(CommError::RankLost { rank: self.rank });
        }
        let start = Instant::now();
        let rank = self.comm.lock().unwrap_or_else(|e| e.into_inner());
        let out = self.exchange_on(&rank, op, local);
        self.busy_ns.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if out.is_err() {
            self.left.store(true, Ordering::SeqCst);
        }
        out
    }
}

impl NcclComm {
    /// [`Exchange::exchange`] with the rank's communicator in hand: the header, then the
    /// values padded to the longest.
    fn exchange_on(&self, rank: &Rank, op: u64, local: &[f64]) -> Result<Vec<Vec<f64>>, CommError> {
        let heads = rank.all_gather(&[op as f64, local.len() as f64])?;
        let heads: Vec<(u64, u64)> = heads.chunks_exact(2).map(|h| (h[0] as u64, h[1] as u64)).collect();
        gathered::check_calls(self.rank, op, local.len(), &heads)?;
        let lens: Vec<usize> = heads.iter().map(|h| h.1 as usize).collect();
        let longest = lens.iter().copied().max().unwrap_or(0);
        let mut padded = local.to_vec();
        padded.resize(longest, 0.0);
        let all = rank.all_gather(&padded)?;
        Ok(lens.iter().enumerate().map(|(r, &n)| all[r * longest..][..n].to_vec()).collect())
    }
}

impl Rank {
    /// Every rank's `local` (the same length on every rank), concatenated in rank order.
    fn all_gather(&self, local: &[f64]) -> Result<Vec<f64>, CommError> {
        let failed = |what: &str, e: &dyn std::fmt::Debug| CommError::Mismatch(format!("NCCL {what}: {e:?}"));
        let size = self.comm.world_size();
        let len = local.len().max(1);
        let mut up = local.to_vec();
        up.resize(len, 0.0); // NCCL takes no empty buffers
        let send = self.stream.clone_htod(&up).map_err(|e| failed("upload", &e))?;
        let mut recv = self.stream.alloc_zeros::<f64>(len * size).map_err(|e| failed("allocation", &e))?;
        self.comm.all_gather(&send, &mut recv).map_err(|e| failed("all-gather", &e))?;
        let all = self.stream.clone_dtoh(&recv).map_err(|e| failed("download", &e))?;
        self.stream.synchronize().map_err(|e| failed("synchronize", &e))?;
        Ok(all.chunks_exact(len).flat_map(|c| c[..local.len()].iter().copied()).collect())
    }
}

impl Communicator for NcclComm {
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

    /// Later collectives of this rank fail at once; the others' fail when NCCL reports the
    /// lost peer (or wait: NCCL has no leaving a communicator short of aborting it).
    fn abandon(&self) {
        self.left.store(true, Ordering::SeqCst);
    }
}
