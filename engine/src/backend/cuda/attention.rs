//! The paged KV cache on the device and attention over it (attention.cu): kv_store writes
//! the batch's K and V rows into their blocks, attn_split runs flash-decoding splits of
//! each query's keys, attn_combine merges them (with gpt-oss's sinks).
//!
//! The cache is the CPU's layout (`CpuKv`): per layer one array of
//! `[block][16 tokens][kv_dim]` over its group's pool (f16 bits, or f32), and a value array
//! beside it unless values are shared with the keys. Which block holds what is the
//! [`BlockManager`]'s business, as on the CPU. A step's block tables go up once: the batch's
//! sequences renumbered 0.. in order of appearance, their positions, and each group's
//! tables of those sequences ([distinct][stride], padded with NO_BLOCK), in one array; a
//! later layer with the same content reuses it.

use super::products::{blocks_x, blocks_yz, int};
use super::{launch, AttnShape, BatchLayout, CudaAct, CudaBackend, CudaVector, Fallible};
use crate::backend::KvCache;
use crate::kv::{BlockManager, KvSpec, KvType, BLOCK_TOKENS, NO_BLOCK};
use turbine_cuda::cudarc::driver::{CudaSlice, CudaView};

/// attention.cu's warps per attn_split block.
pub(super) const ATTN_WARPS: u32 = 4;
/// Keys per split at least: a split's fixed cost (its partial result) against parallelism.
const MIN_SPLIT_KEYS: usize = 64;
/// Splits per query at most, and the most floats the partial outputs may take.
const MAX_SPLITS: usize = 256;
const MAX_PARTIAL_FLOATS: usize = 1 << 24;

/// Keys and values of every layer and sequence slot, on the device.
pub struct CudaKv {
    blocks: BlockManager,
    /// Per layer; empty when the cache could not be allocated.
    layers: Vec<Cells>,
    /// Why the cache has no memory (reported by every attention on it).
    unallocated: Option<String>,
    /// The last step's block tables on the device (see the module's comment).
    step: Option<StepTables>,
}

/// One layer's pool; `values` is None with shared values.
enum Cells {
    F16 { keys: CudaSlice<u16>, values: Option<CudaSlice<u16>> },
    F32 { keys: CudaSlice<f32>, values: Option<CudaSlice<f32>> },
}

impl Cells {
    /// Device addresses of the keys and the values (the keys again with shared values), and
    /// whether the cache is f32.
    fn pointers(&self, be: &CudaBackend) -> (u64, u64, bool) {
        match self {
            Cells::F16 { keys, values } => {
                let k = be.raw(keys);
                (k, values.as_ref().map_or(k, |v| be.raw(v)), false)
            }
            Cells::F32 { keys, values } => {
                let k = be.raw(keys);
                (k, values.as_ref().map_or(k, |v| be.raw(v)), true)
            }
        }
    }
}

/// The block tables of one step on the device, laid out [seqs: rows][positions: rows]
/// [group 0: distinct × stride][group 1]...; `packed.host` is what was sent (compared to
/// reuse it).
struct StepTables {
    packed: Packed,
    dev: CudaSlice<u32>,
}

impl StepTables {
    fn seqs(&self) -> CudaView<'_, u32> {
        self.dev.slice(0..self.packed.rows)
    }

    fn positions(&self) -> CudaView<'_, u32> {
        let rows = self.packed.rows;
        self.dev.slice(rows..2 * rows)
    }

    fn tables(&self, group: usize) -> CudaView<'_, u32> {
        let len = self.packed.distinct * self.packed.stride;
        let at = 2 * self.packed.rows + group * len;
        self.dev.slice(at..at + len)
    }
}

impl KvCache for CudaKv {
    fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    fn blocks_mut(&mut self) -> &mut BlockManager {
        &mut self.blocks
    }
}

impl CudaKv {
    /// A zeroed pool per layer for `spec`.
    pub(super) fn new(be: &CudaBackend, spec: &KvSpec) -> Fallible<CudaKv> {
        let block_len = BLOCK_TOKENS.checked_mul(spec.kv_dim).ok_or("KV width overflows")?;
        let mut layers = Vec::with_capacity(spec.n_layers);
        for layer in 0..spec.n_layers {
            let group = spec.layer_slot.get(layer).map(|s| s.0).ok_or("a layer without a group")?;
            let n_blocks = spec.groups.get(group).map(|g| g.n_blocks).ok_or("a missing group")?;
            let len = n_blocks.checked_mul(block_len).ok_or("KV pool size overflows")?.max(1);
            layers.push(match spec.dtype {
                KvType::F16 => {
                    let values = if spec.shared_v { None } else { Some(be.zeroed::<u16>(len)?) };
                    Cells::F16 { keys: be.zeroed::<u16>(len)?, values }
                }
                KvType::F32 => {
                    let values = if spec.shared_v { None } else { Some(be.zeroed::<f32>(len)?) };
                    Cells::F32 { keys: be.zeroed::<f32>(len)?, values }
                }
            });
        }
        Ok(CudaKv { blocks: BlockManager::new(spec), layers, step: None, unallocated: None })
    }

    /// The bookkeeping without device memory, after a failed allocation (`why`): every
    /// attention on it fails with that reason, so the step that uses it fails, not another.
    pub(super) fn unallocated(spec: &KvSpec, why: String) -> CudaKv {
        CudaKv { blocks: BlockManager::new(spec), layers: Vec::new(), step: None, unallocated: Some(why) }
    }

    /// Stores the batch's K and V rows of `layer`, then attends each query row to its
    /// sequence's keys up to its position: [rows × n_heads·v_head_dim].
    pub(super) fn attend(
        &mut self,
        be: &CudaBackend,
        layer: usize,
        batch: &BatchLayout,
        [q, k, v]: [&CudaAct; 3],
        shape: AttnShape,
        sinks: Option<&CudaVector>,
    ) -> Fallible<CudaAct> {
        if let Some(why) = &self.unallocated {
            return Err(format!("the KV cache could not be allocated: {why}"));
        }
        let spec = self.blocks.spec();
        let (kv_dim, shared_v) = (spec.kv_dim, spec.shared_v);
        let group =
            spec.layer_slot.get(layer).map(|s| s.0).ok_or_else(|| format!("layer {layer} is not in the cache"))?;
        check_shape(shape, [q, k, v], batch, kv_dim, shared_v)?;
        if shape.window == Some(0) {
            return Err("a sliding window of 0 tokens".into());
        }
        if let Some(s) = sinks {
            if s.len() < shape.n_heads {
                return Err(format!("{} sinks for {} heads", s.len(), shape.n_heads));
            }
        }
        let mut out = be.act(q.rows, shape.n_heads * shape.v_head_dim)?;
        if out.len() == 0 {
            return Ok(out);
        }
        self.upload_tables(be, batch)?;
        let cells = self.layers.get(layer).ok_or("the KV cache was not allocated")?;
        let step = self.step.as_ref().ok_or("block tables missing")?;
        step.packed.check_reach(group, |p| first_key(shape.window, p))?;
        let (keys, values, f32_cache) = cells.pointers(be);
        let dtype = usize::from(f32_cache);
        let rows = q.rows;
        let (grid_rows, k_cols, v_cols) = (blocks_yz(rows, 1)?, int(k.cols, "K width")?, int(v.cols, "V width")?);
        let (kv_dim_i, stride) = (int(kv_dim, "kv_dim")?, int(step.packed.stride, "table stride")?);
        let no_values = 0u64;
        let (seqs, pos, tables) = (step.seqs(), step.positions(), step.tables(group));
        let kk = be.kernels();
        launch!(be, &kk.kv_store[dtype], (grid_rows, 1, 1), (128, 1, 1);
            &keys, if shared_v { &no_values } else { &values }, k.dev()?, v.dev()?, &tables, &seqs, &pos,
            &k_cols, &v_cols, &kv_dim_i, &stride)?;

        let (n_splits, split_len) = splits(&batch.positions, shape);
        let split_len = int(split_len, "split length")?;
        let parts = rows * shape.n_heads * n_splits;
        let (mut part_o, mut part_ml) =
            (be.alloc::<f32>(parts * shape.v_head_dim.max(1))?, be.alloc::<f32>(parts * 2)?);
        let width = match shape.head_dim.max(shape.v_head_dim) {
            0..=128 => 0,
            129..=256 => 1,
            257..=576 => 2,
            d => return Err(format!("heads of {d} values (the kernels take up to 576)")),
        };
        let (n_heads, n_kv) = (int(shape.n_heads, "heads")?, int(shape.n_kv_heads, "KV heads")?);
        let (hd, vd) = (int(shape.head_dim, "head_dim")?, int(shape.v_head_dim, "v_head_dim")?);
        let (shared, window) = (i32::from(shared_v), int(shape.window.map_or(0, |w| w as usize), "window")?);
        let grid = (blocks_x(shape.n_kv_heads, 1)?, grid_rows, blocks_yz(n_splits, 1)?);
        launch!(be, &kk.attn_split[width][dtype], grid, (32, ATTN_WARPS, 1);
            q.dev()?, &keys, &values, &tables, &seqs, &pos, &mut part_o, &mut part_ml, &n_heads, &n_kv, &hd, &vd,
            &kv_dim_i, &shared, &stride, &window, &shape.scale, &split_len)?;

        let sinks_ptr = match sinks {
            Some(s) => be.raw(&s.dev()?),
            None => 0u64,
        };
        let n_splits_i = int(n_splits, "splits")?;
        let grid = (blocks_x(shape.n_heads, 1)?, grid_rows, 1);
        launch!(be, &kk.attn_combine, grid, (128, 1, 1);
            &part_o, &part_ml, &sinks_ptr, out.dev_mut()?, &n_heads, &vd, &n_splits_i)?;
        Ok(out)
    }

    /// Uploads the step's sequences, positions and block tables unless the last upload
    /// holds the same.
    fn upload_tables(&mut self, be: &CudaBackend, batch: &BatchLayout) -> Fallible<()> {
        let packed = pack(&self.blocks, batch)?;
        if self.step.as_ref().is_some_and(|t| t.packed.host == packed.host) {
            return Ok(());
        }
        let dev = be.upload(&packed.host)?;
        self.step = Some(StepTables { packed, dev });
        Ok(())
    }
}

/// A step's sequences, positions and block tables as one array for the device (see
/// [`StepTables`]), and what the host checks launches against.
#[derive(Debug, PartialEq)]
struct Packed {
    host: Vec<u32>,
    rows: usize,
    distinct: usize,
    stride: usize,
    /// Per group and renumbered sequence: its first block still held (a sliding window
    /// gives blocks back from the front).
    first_held: Vec<usize>,
}

impl Packed {
    /// Checks that every row's keys from `first_key(position)` on are in blocks its
    /// sequence still holds in `group` (the kernels would read a given-back entry).
    fn check_reach(&self, group: usize, first_key: impl Fn(usize) -> usize) -> Fallible<()> {
        for i in 0..self.rows {
            let (seq, pos) = (self.host[i] as usize, self.host[self.rows + i] as usize);
            let held = self.first_held.get(group * self.distinct + seq).copied().unwrap_or(usize::MAX);
            if first_key(pos) / BLOCK_TOKENS < held {
                return Err(format!("position {pos} reads keys its sequence gave back (first held block {held})"));
            }
        }
        Ok(())
    }
}

/// Packs the batch's sequences (renumbered 0.. in order of appearance), positions and each
/// group's tables of those sequences ([distinct][stride], padded with NO_BLOCK), checking
/// that every position's own block is held.
fn pack(blocks: &BlockManager, batch: &BatchLayout) -> Fallible<Packed> {
    let rows = batch.len();
    if batch.seqs.len() != rows {
        return Err(format!("{} sequence slots for {rows} positions", batch.seqs.len()));
    }
    let groups = blocks.spec().groups.len();
    if groups == 0 {
        return Err("a KV cache without layer groups".into());
    }
    let mut distinct: Vec<usize> = Vec::new();
    let mut host = Vec::with_capacity(2 * rows);
    for &s in &batch.seqs {
        if s >= blocks.n_seqs() {
            return Err(format!("sequence slot {s} of {}", blocks.n_seqs()));
        }
        let i = match distinct.iter().position(|&d| d == s) {
            Some(i) => i,
            None => {
                distinct.push(s);
                distinct.len() - 1
            }
        };
        host.push(i as u32);
    }
    // Every position's block must be held in every group: kv_store writes table[pos / 16].
    for (&s, &p) in batch.seqs.iter().zip(&batch.positions) {
        let i = p as usize / BLOCK_TOKENS;
        if (0..groups).any(|g| blocks.table(s, g).get(i).is_none_or(|&b| b == NO_BLOCK)) || p > i32::MAX as u32 {
            return Err(format!("position {p} of sequence {s} has no block (begin_batch first)"));
        }
    }
    host.extend_from_slice(&batch.positions);
    let stride =
        (0..groups).flat_map(|g| distinct.iter().map(move |&s| blocks.table(s, g).len())).max().unwrap_or(0).max(1);
    let mut first_held = Vec::with_capacity(groups * distinct.len());
    for g in 0..groups {
        for &s in &distinct {
            let table = blocks.table(s, g);
            host.extend_from_slice(table);
            host.extend(std::iter::repeat_n(NO_BLOCK, stride - table.len()));
            first_held.push(table.iter().position(|&b| b != NO_BLOCK).unwrap_or(table.len()));
        }
    }
    Ok(Packed { host, rows, distinct: distinct.len(), stride, first_held })
}

/// The first key a query at `pos` reads (attention.cu's `lo`).
fn first_key(window: Option<u32>, pos: usize) -> usize {
    window.map_or(0, |w| (pos + 1).saturating_sub(w as usize))
}

/// (splits, keys per split) of a batch's attention: enough splits of the longest row's
/// keys to spread over the GPU, at least MIN_SPLIT_KEYS keys each, with the partial results
/// ([rows][heads][splits][vd]) under MAX_PARTIAL_FLOATS.
fn splits(positions: &[u32], shape: AttnShape) -> (usize, usize) {
    let most = positions.iter().map(|&p| p as usize + 1 - first_key(shape.window, p as usize)).max().unwrap_or(1);
    let per_split = positions.len().max(1) * shape.n_heads.max(1) * shape.v_head_dim.max(2);
    let n_splits = most.div_ceil(MIN_SPLIT_KEYS).min(MAX_SPLITS).min((MAX_PARTIAL_FLOATS / per_split).max(1)).max(1);
    (n_splits, most.div_ceil(n_splits).max(1))
}

/// The shapes attention.cu takes: q [rows × n_heads·hd], k [rows × kv_dim] (n_kv_heads·hd),
/// v [rows × n_kv_heads·vd] within kv_dim (ignored with shared values), query heads a
/// multiple of KV heads.
fn check_shape(
    s: AttnShape,
    [q, k, v]: [&CudaAct; 3],
    batch: &BatchLayout,
    kv_dim: usize,
    shared_v: bool,
) -> Fallible<()> {
    let rows = batch.len();
    let bad = |why: &str| {
        Err(format!(
            "{why}: q {}x{}, k {}x{}, v {}x{}, {rows} batch rows, heads {}/{} of {}/{}, kv_dim {kv_dim}",
            q.rows, q.cols, k.rows, k.cols, v.rows, v.cols, s.n_heads, s.n_kv_heads, s.head_dim, s.v_head_dim
        ))
    };
    if q.rows != rows || k.rows != rows || v.rows != rows {
        return bad("rows differ");
    }
    if s.n_kv_heads == 0 || s.n_heads == 0 || !s.n_heads.is_multiple_of(s.n_kv_heads) {
        return bad("query heads are not a multiple of KV heads");
    }
    if q.cols != s.n_heads * s.head_dim || k.cols != kv_dim || s.n_kv_heads * s.head_dim != kv_dim {
        return bad("widths do not match the shape");
    }
    let v_width =
        if shared_v { s.v_head_dim <= s.head_dim } else { v.cols == s.n_kv_heads * s.v_head_dim && v.cols <= kv_dim };
    if !v_width {
        return bad("value widths do not match the shape");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvLayout;
    use crate::model::Batch;

    fn shape(window: Option<u32>) -> AttnShape {
        AttnShape { n_heads: 4, n_kv_heads: 1, head_dim: 64, v_head_dim: 64, window, scale: 1.0 }
    }

    /// Two groups (full, and a 32-token window), a 70-token and a 5-token prompt, then a
    /// step decoding both: the sequences renumbered by appearance, the tables padded, the
    /// window's given-back blocks found.
    #[test]
    fn tables_are_packed_per_group_and_checked() {
        let layout = KvLayout { kv_dim: 64, windows: vec![None, Some(32)], shared_v: false };
        let mut blocks = BlockManager::new(&KvSpec::for_sequences(&layout, 128, 3, 128));
        let mut first = Batch::for_sequence(0, 0, &[1; 70], false);
        for p in 0..5 {
            first.push(2, p, 1, false);
        }
        blocks.begin_batch(&first).expect("reserve");
        blocks.end_batch(&first);
        let mut step = Batch::default();
        step.push(2, 5, 1, false);
        step.push(0, 70, 1, false);
        blocks.begin_batch(&step).expect("reserve");
        let p = pack(&blocks, &step.layout).expect("pack");
        assert_eq!((p.rows, p.distinct, p.stride), (2, 2, 5));
        assert_eq!(&p.host[..4], &[0, 1, 5, 70], "sequence 2 first, then 0; positions");
        for g in 0..2 {
            let at = 4 + g * 2 * 5;
            let (s2, s0) = (&p.host[at..at + 5], &p.host[at + 5..at + 10]);
            assert_eq!(&s2[..1], blocks.table(2, g));
            assert!(s2[1..].iter().all(|&b| b == NO_BLOCK), "padding");
            assert_eq!(s0, blocks.table(0, g));
        }
        assert_eq!(p.first_held, vec![0, 0, 0, 2], "the window gave back sequence 0's first two blocks");
        assert!(p.check_reach(1, |pos| first_key(Some(32), pos)).is_ok());
        assert!(p.check_reach(1, |pos| first_key(None, pos)).is_err(), "full attention over a windowed group");
        assert!(p.check_reach(0, |pos| first_key(None, pos)).is_ok());
        // A position without a reserved block is refused.
        let mut ahead = Batch::default();
        ahead.push(1, 0, 1, false);
        assert!(pack(&blocks, &ahead.layout).is_err());
    }

    #[test]
    fn splits_spread_long_rows_and_bound_the_partial_results() {
        assert_eq!(splits(&[5, 70], shape(None)), (2, 36));
        assert_eq!(splits(&[4095], shape(None)), (64, 64));
        assert_eq!(splits(&[100_000], shape(Some(512))), (8, 64), "a window bounds the keys");
        assert_eq!(splits(&[0], shape(None)), (1, 1));
        let long: Vec<u32> = (0..512).map(|p| 30_000 + p).collect();
        let (n, len) = splits(&long, AttnShape { n_heads: 8, v_head_dim: 128, ..shape(None) });
        assert_eq!(n, MAX_PARTIAL_FLOATS / (512 * 8 * 128));
        assert!(n * len >= 30_512);
    }
}
