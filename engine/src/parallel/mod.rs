//! Tensor parallelism's building blocks: a communicator between the ranks of a group and
//! the sharding of weights (Megatron style).
//!
//! A column-parallel weight (Q, K, V, gate, up, the output projection) is split by output
//! rows: each rank computes its slice of the outputs, and the slices are gathered. A
//! row-parallel weight (attention output, down) is split by input columns: each rank
//! multiplies its slice of the input, and the partial sums are added by an all-reduce.
//!
//! [`InProcess`] is the communicator for N ranks as threads of one process. Every rank gets
//! the same bits from a collective: sums are taken in rank order by one thread. A rank that
//! leaves (its communicator dropped, e.g. while its thread unwinds from a panic) ends the
//! group: the others' collectives return [`CommError::RankLost`] instead of waiting.

mod group;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
mod pipeline;
pub use group::Sharded;
pub(crate) use group::{sync_caches, CacheStep};
pub use pipeline::{stage_cuts, Pipelined};

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::EngineError;
use turbine_cpu::GgmlType;

/// Why a collective failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommError {
    /// A rank left the group (its thread ended or failed).
    RankLost { rank: usize },
    /// Ranks called different collectives, or with different lengths, at the same step.
    Mismatch(String),
}

impl std::fmt::Display for CommError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CommError::RankLost { rank } => write!(f, "tensor-parallel rank {rank} left the group"),
            CommError::Mismatch(what) => write!(f, "tensor-parallel ranks disagree: {what}"),
        }
    }
}

impl std::error::Error for CommError {}

/// Collectives between the ranks of a group. Every rank calls the same collectives in the
/// same order.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// `buf` = the element-wise sum of every rank's `buf`, the same on every rank.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError>;
    /// [`Communicator::all_reduce_sum`] in f64 (wide partial sums, rounded by the caller).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), CommError>;
    /// Every rank's `local`, concatenated in rank order.
    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError>;
    /// Time this rank has spent in collectives so far (waiting for the others included).
    fn busy(&self) -> Duration;
    /// Leaves the group for good, as a rank that failed mid-step must: the others'
    /// collectives then fail instead of waiting for it (under MPI, the job ends).
    fn abandon(&self);
}

/// Collectives built on an all-gather of every rank's values (MPI, NCCL): sums are taken in
/// rank order on every rank, as [`InProcess`] takes them, so the results are the same bit
/// for bit; each rank's kind of collective and length go first, so ranks that disagree get
/// an error instead of each other's data.
#[cfg_attr(not(any(feature = "mpi", feature = "nccl")), allow(dead_code))]
pub(crate) mod gathered {
    use super::CommError;

    pub(crate) const SUM: u64 = 1;
    pub(crate) const GATHER: u64 = 2;

    /// A transport's all-gather: every rank's `local`, in rank order, once [`check_calls`]
    /// passed on every rank's (kind, length).
    pub(crate) trait Exchange {
        fn exchange(&self, op: u64, local: &[f64]) -> Result<Vec<Vec<f64>>, CommError>;
    }

    /// Every rank (`heads`: each one's kind and length) called collective `op`, and for a
    /// sum with `len` values, as rank `rank` did.
    pub(crate) fn check_calls(rank: usize, op: u64, len: usize, heads: &[(u64, u64)]) -> Result<(), CommError> {
        let disagrees = |&(o, l): &(u64, u64)| o != op || (op == SUM && l != len as u64);
        match heads.iter().position(disagrees) {
            None => Ok(()),
            Some(r) => Err(CommError::Mismatch(format!(
                "rank {rank} called collective {op} with {len} values, rank {r} collective {} with {}",
                heads[r].0, heads[r].1
            ))),
        }
    }

    pub(crate) fn all_reduce_sum(ex: &impl Exchange, buf: &mut [f32]) -> Result<(), CommError> {
        let mut wide: Vec<f64> = buf.iter().map(|&x| f64::from(x)).collect();
        all_reduce_sum_f64(ex, &mut wide)?;
        buf.iter_mut().zip(&wide).for_each(|(b, &s)| *b = s as f32);
        Ok(())
    }

    pub(crate) fn all_reduce_sum_f64(ex: &impl Exchange, buf: &mut [f64]) -> Result<(), CommError> {
        let parts = ex.exchange(SUM, buf)?;
        buf.copy_from_slice(&parts[0]);
        for part in &parts[1..] {
            buf.iter_mut().zip(part).for_each(|(s, x)| *s += x);
        }
        Ok(())
    }

    pub(crate) fn all_gather(ex: &impl Exchange, local: &[f32]) -> Result<Vec<f32>, CommError> {
        let wide: Vec<f64> = local.iter().map(|&x| f64::from(x)).collect();
        Ok(ex.exchange(GATHER, &wide)?.concat().iter().map(|&x| x as f32).collect())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Sum,
    Gather,
}

struct State {
    /// Completed collectives.
    generation: u64,
    /// What each rank brought to the current one (f32 contributions widened, exactly).
    slots: Vec<Option<(Op, Vec<f64>)>>,
    /// The last completed collective's result.
    result: Result<Arc<Vec<f64>>, CommError>,
    lost: Option<usize>,
}

struct Group {
    state: Mutex<State>,
    done: Condvar,
}

/// One rank of a group of threads in this process.
pub struct InProcess {
    rank: usize,
    size: usize,
    group: Arc<Group>,
    /// Nanoseconds this rank has spent in collectives (waiting for the others included).
    busy_ns: Arc<AtomicU64>,
}

impl InProcess {
    /// The `size` ranks of a new group, rank i at index i.
    pub fn group(size: usize) -> Vec<InProcess> {
        let state = State { generation: 0, slots: vec![None; size], result: Ok(Arc::new(Vec::new())), lost: None };
        let group = Arc::new(Group { state: Mutex::new(state), done: Condvar::new() });
        (0..size).map(|rank| InProcess { rank, size, group: group.clone(), busy_ns: Arc::default() }).collect()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.group.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Brings `local` to the current collective and returns its result.
    fn collective(&self, op: Op, local: Vec<f64>) -> Result<Arc<Vec<f64>>, CommError> {
        let start = Instant::now();
        let result = self.exchange(op, local);
        self.busy_ns.fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        result
    }

    fn exchange(&self, op: Op, local: Vec<f64>) -> Result<Arc<Vec<f64>>, CommError> {
        let mut st = self.lock();
        if let Some(rank) = st.lost {
            return Err(CommError::RankLost { rank });
        }
        let generation = st.generation;
        st.slots[self.rank] = Some((op, local));
        if st.slots.iter().all(Option::is_some) {
            let slots: Vec<(Op, Vec<f64>)> = st.slots.iter_mut().filter_map(Option::take).collect();
            st.result = combine(&slots).map(Arc::new);
            st.generation += 1;
            self.group.done.notify_all();
            return st.result.clone();
        }
        while st.generation == generation {
            if let Some(rank) = st.lost {
                return Err(CommError::RankLost { rank });
            }
            st = self.group.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.result.clone()
    }
}

/// The result of one collective from every rank's contribution, in rank order.
fn combine(slots: &[(Op, Vec<f64>)]) -> Result<Vec<f64>, CommError> {
    let (op, first) = (&slots[0].0, &slots[0].1);
    if let Some((r, (o, v))) =
        slots.iter().enumerate().find(|(_, (o, v))| o != op || (*op == Op::Sum && v.len() != first.len()))
    {
        return Err(CommError::Mismatch(format!(
            "rank 0 called {op:?} with {} values, rank {r} {o:?} with {}",
            first.len(),
            v.len()
        )));
    }
    Ok(match op {
        Op::Sum => {
            let mut sum = first.clone();
            for (_, v) in &slots[1..] {
                sum.iter_mut().zip(v).for_each(|(s, x)| *s += x);
            }
            sum
        }
        Op::Gather => slots.iter().flat_map(|(_, v)| v.iter().copied()).collect(),
    })
}

impl Communicator for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    /// Summed in f64 in rank order, then rounded once.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        if self.size == 1 {
            return Ok(());
        }
        let sum = self.collective(Op::Sum, buf.iter().map(|&x| f64::from(x)).collect())?;
        buf.iter_mut().zip(sum.iter()).for_each(|(b, &s)| *b = s as f32);
        Ok(())
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<(), CommError> {
        if self.size == 1 {
            return Ok(());
        }
        let sum = self.collective(Op::Sum, buf.to_vec())?;
        buf.copy_from_slice(&sum);
        Ok(())
    }

    fn all_gather(&self, local: &[f32]) -> Result<Vec<f32>, CommError> {
        if self.size == 1 {
            return Ok(local.to_vec());
        }
        Ok(self
            .collective(Op::Gather, local.iter().map(|&x| f64::from(x)).collect())?
            .iter()
            .map(|&x| x as f32)
            .collect())
    }

    fn busy(&self) -> Duration {
        Duration::from_nanos(self.busy_ns.load(Ordering::Relaxed))
    }

    fn abandon(&self) {
        self.leave();
    }
}

impl InProcess {
    /// Marks this rank lost for the whole group and wakes every waiting rank.
    fn leave(&self) {
        let mut st = self.lock();
        if st.lost.is_none() && self.size > 1 {
            st.lost = Some(self.rank);
        }
        self.group.done.notify_all();
    }
}

impl Drop for InProcess {
    /// Leaving ends the group for the others (a rank done with its work leaves only after
    /// its last collective, which the others have then completed too).
    fn drop(&mut self) {
        self.leave();
    }
}

/// A rank's part of a weight matrix (`rows` outputs × `cols` inputs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// Output rows (column-parallel: Q, K, V, gate, up, the vocabulary of the head).
    Rows(Range<usize>),
    /// Input columns, at block boundaries (row-parallel: attention output, down).
    Cols(Range<usize>),
}

/// Rank `rank` of `ranks`'s share of `units` things of `unit` elements each (heads of
/// head_dim, blocks of 32): units r·units/ranks.. up to (r+1)·units/ranks, in elements.
pub fn even_range(units: usize, unit: usize, rank: usize, ranks: usize) -> Range<usize> {
    (rank * units / ranks) * unit..((rank + 1) * units / ranks) * unit
}

/// A rank's attention heads: query heads `q` and the KV heads they read, `kv` (indices).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heads {
    pub q: Range<usize>,
    pub kv: Range<usize>,
}

/// Rank `rank` of `ranks`'s heads: an even share of the query heads, and the KV heads they
/// read (shared by several ranks when there are fewer KV heads than ranks). The split must
/// keep each rank's query heads on whole KV heads (grouped-query attention).
pub fn split_heads(n_heads: usize, n_kv_heads: usize, rank: usize, ranks: usize) -> Result<Heads, EngineError> {
    let group = n_heads / n_kv_heads.max(1);
    let per = n_heads / ranks.max(1);
    let whole_groups = group > 0 && (per.is_multiple_of(group) || group.is_multiple_of(per));
    if ranks == 0 || per == 0 || !n_heads.is_multiple_of(ranks) || !whole_groups {
        return Err(EngineError::BadValue {
            key: "tensor parallelism".into(),
            value: format!("{n_heads} heads ({n_kv_heads} KV heads) over {ranks} ranks"),
            why: "the heads do not split evenly over the ranks",
        });
    }
    let q = rank * per..(rank + 1) * per;
    let kv = q.start / group..(q.end - 1) / group + 1;
    Ok(Heads { q, kv })
}

/// The byte range of rows `r` of a `rows` × `cols` matrix of `ty` (GGUF layout), checked.
pub fn row_bytes_of(
    name: &str,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    r: &Range<usize>,
) -> Result<Range<usize>, EngineError> {
    let bad = |why: &'static str| EngineError::BadValue {
        key: name.into(),
        value: format!("rows {r:?} of {rows}x{cols} {ty}"),
        why,
    };
    let row_bytes = ty.row_bytes(cols).ok_or_else(|| bad("columns are not whole blocks"))?;
    if r.is_empty() || r.end > rows {
        return Err(bad("rows out of range"));
    }
    Ok(r.start * row_bytes..r.end * row_bytes)
}

/// The bytes of `part` of a `rows` × `cols` matrix of `ty` (GGUF layout), with its shape
/// (rows, cols).
pub fn shard_bytes(
    name: &str,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    data: &[u8],
    part: Part,
) -> Result<(usize, usize, Vec<u8>), EngineError> {
    let bad = |why: &'static str| EngineError::BadValue {
        key: name.into(),
        value: format!("{part:?} of {rows}x{cols} {ty}"),
        why,
    };
    let row_bytes = ty.row_bytes(cols).ok_or_else(|| bad("columns are not whole blocks"))?;
    if Some(data.len()) != row_bytes.checked_mul(rows) {
        return Err(bad("the data is not the matrix"));
    }
    match &part {
        Part::Rows(r) => {
            let bytes = row_bytes_of(name, ty, rows, cols, r)?;
            Ok((r.len(), cols, data[bytes].to_vec()))
        }
        Part::Cols(c) => {
            let bs = ty.block_size();
            if c.is_empty() || c.end > cols || c.start % bs != 0 || c.end % bs != 0 {
                return Err(bad("columns out of range or not at block boundaries"));
            }
            let (from, to) = (c.start / bs * ty.type_size(), c.end / bs * ty.type_size());
            let mut out = Vec::with_capacity(rows * (to - from));
            for row in data.chunks_exact(row_bytes) {
                out.extend_from_slice(&row[from..to]);
            }
            Ok((rows, c.len(), out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_group<T: Send>(n: usize, f: impl Fn(InProcess) -> T + Sync) -> Vec<T> {
        std::thread::scope(|s| {
            let handles: Vec<_> = InProcess::group(n).into_iter().map(|c| s.spawn(|| f(c))).collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        })
    }

    #[test]
    fn every_rank_gets_the_same_sum_and_gather() {
        for n in [1, 2, 4] {
            let results = run_group(n, |c| {
                let mut buf: Vec<f32> = (0..37).map(|i| (i * (c.rank() + 1)) as f32 * 0.1).collect();
                let mut outs = Vec::new();
                for step in 0..50 {
                    buf.iter_mut().for_each(|v| *v += step as f32);
                    c.all_reduce_sum(&mut buf).expect("sum");
                    let g = c.all_gather(&[c.rank() as f32, step as f32]).expect("gather");
                    outs.push((buf.clone(), g));
                }
                outs
            });
            for r in &results[1..] {
                assert_eq!(
                    r.iter().map(|(b, _)| b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()).collect::<Vec<_>>(),
                    results[0]
                        .iter()
                        .map(|(b, _)| b.iter().map(|x| x.to_bits()).collect::<Vec<_>>())
                        .collect::<Vec<_>>()
                );
            }
            let (first, gathered) = &results[0][0];
            // Summed in f64, rounded once.
            let want: Vec<f32> =
                (0..37).map(|i| (0..n).map(|r| f64::from((i * (r + 1)) as f32 * 0.1)).sum::<f64>() as f32).collect();
            assert_eq!(first, &want, "{n} ranks");
            assert_eq!(gathered, &(0..n).flat_map(|r| [r as f32, 0.0]).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_rank_that_leaves_ends_the_others_collectives() {
        let results = run_group(3, |c| {
            if c.rank() == 1 {
                drop(c); // its thread is gone before the first collective
                return Ok(());
            }
            let mut buf = vec![1.0f32; 4];
            c.all_reduce_sum(&mut buf)
        });
        assert_eq!(results[1], Ok(()));
        for r in [0, 2] {
            assert_eq!(results[r], Err(CommError::RankLost { rank: 1 }), "rank {r}");
        }
    }

    #[test]
    fn ranks_calling_different_collectives_get_an_error() {
        let results = run_group(2, |c| {
            if c.rank() == 0 {
                c.all_reduce_sum(&mut [1.0; 3]).map(|_| ())
            } else {
                c.all_gather(&[1.0]).map(|_| ())
            }
        });
        assert!(results.iter().all(|r| matches!(r, Err(CommError::Mismatch(_)))), "{results:?}");
    }

    #[test]
    fn heads_split_by_rank_with_their_kv_heads() {
        let h = |n, kv, r, ranks| split_heads(n, kv, r, ranks).map(|h| (h.q, h.kv)).map_err(|e| e.to_string());
        assert_eq!(h(4, 1, 1, 2), Ok((2..4, 0..1)), "one KV head: every rank reads it");
        assert_eq!(h(4, 1, 3, 4), Ok((3..4, 0..1)));
        assert_eq!(h(32, 8, 1, 4), Ok((8..16, 2..4)));
        assert_eq!(h(32, 8, 5, 16), Ok((10..12, 2..3)));
        assert!(h(6, 2, 0, 4).is_err(), "6 heads over 4 ranks");
        assert!(h(0, 0, 0, 2).is_err() && h(2, 1, 0, 4).is_err() && h(4, 1, 0, 0).is_err(), "degenerate");
        assert_eq!(h(12, 2, 1, 4), Ok((3..6, 0..1)), "3 heads per rank within groups of 6");
        assert!(h(12, 4, 0, 6).is_err(), "2 heads per rank straddle groups of 3");
    }

    #[test]
    fn parts_cover_the_matrix_and_misaligned_ones_are_refused() {
        let (rows, cols, ty) = (8, 128, GgmlType::Q8_0);
        let data: Vec<u8> = (0..rows * ty.row_bytes(cols).unwrap()).map(|i| i as u8).collect();
        let rb = ty.row_bytes(cols).unwrap();
        for ranks in [1, 2, 4] {
            let parts: Vec<_> = (0..ranks)
                .map(|rank| {
                    shard_bytes("w", ty, rows, cols, &data, Part::Cols(even_range(cols / 32, 32, rank, ranks))).unwrap()
                })
                .collect();
            for r in 0..rows {
                let joined: Vec<u8> = parts
                    .iter()
                    .flat_map(|(_, c, d)| {
                        let b = ty.row_bytes(*c).unwrap();
                        d[r * b..(r + 1) * b].to_vec()
                    })
                    .collect();
                assert_eq!(joined, data[r * rb..(r + 1) * rb], "row {r}, {ranks} ranks");
            }
            let by_rows: Vec<u8> = (0..ranks)
                .flat_map(|rank| {
                    shard_bytes("w", ty, rows, cols, &data, Part::Rows(even_range(rows, 1, rank, ranks))).unwrap().2
                })
                .collect();
            assert_eq!(by_rows, data);
        }
        for part in [Part::Cols(0..16), Part::Cols(32..160), Part::Rows(4..9), Part::Rows(3..3)] {
            let r = shard_bytes("w", ty, rows, cols, &data, part.clone());
            assert!(matches!(r, Err(EngineError::BadValue { .. })), "{part:?}");
        }
    }
}
