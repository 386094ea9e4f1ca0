//! The CPU backend: activations in host `Vec<f32>`, weights zero-copy in the GGUF map,
//! kernels from `turbine_cpu` (SIMD chosen at run time, rayon across rows and heads).

use super::{AttnShape, Backend, BatchLayout, KvCache, PipelineStage, WeightSizes, Yarn};
use crate::gguf::{Gguf, TensorInfo};
use crate::kv::{BlockManager, KvSpec, KvType, BLOCK_TOKENS};
use crate::parallel::{row_bytes_of, shard_bytes, CommError, Communicator, Part};
use crate::EngineError;
use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use turbine_cpu::act::QuantizedActs;
use turbine_cpu::attention::{self, QueryRow};
use turbine_cpu::interleaved::Interleaved;
use turbine_cpu::matmul::{self, WeightView};
use turbine_cpu::{half_ops, ops, GgmlType, Isa};

/// The CPU backend; for one rank of an in-process tensor-parallel group, with that rank's
/// communicator.
#[derive(Clone, Default)]
pub struct CpuBackend {
    tp: Option<Arc<TpRank>>,
    /// Bytes of the file's tensors this backend's weights and vectors cover, and of them
    /// the tables only looked up by row (see [`CpuBackend::weight_bytes`]).
    held: Arc<[AtomicU64; 3]>,
    /// Its place under pipeline parallelism.
    stage: Option<PipelineStage>,
    /// The host of a model offloaded to another backend: its caches record their block
    /// changes for the device's mirrors (see [`super::offload`]).
    hosts_device: bool,
}

/// A rank's communicator and the first collective error it met (the forward pass runs to
/// its end, then reports it).
struct TpRank {
    comm: Box<dyn Communicator>,
    error: std::sync::Mutex<Option<CommError>>,
}

impl TpRank {
    fn record(&self, r: Result<(), CommError>) {
        if let Err(e) = r {
            self.error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
        }
    }
}

impl CpuBackend {
    /// The backend of one rank of a tensor-parallel group.
    pub fn tensor_parallel(comm: impl Communicator + 'static) -> CpuBackend {
        let rank = TpRank { comm: Box::new(comm), error: std::sync::Mutex::new(None) };
        CpuBackend { tp: Some(Arc::new(rank)), ..Default::default() }
    }

    /// The host backend of a model offloaded to another backend (see [`super::offload`]).
    pub fn host() -> CpuBackend {
        CpuBackend { hosts_device: true, ..Default::default() }
    }

    /// Whether this is the host of a model offloaded to another backend.
    pub fn offloads(&self) -> bool {
        self.hosts_device
    }

    /// Under tensor parallelism, leaves the group for good (see `Communicator::abandon`).
    pub fn abandon_group(&self) {
        if let Some(tp) = &self.tp {
            tp.comm.abandon();
        }
    }

    /// The weights this backend made, in bytes (see [`WeightSizes`]).
    pub fn weight_bytes(&self) -> WeightSizes {
        let get = |i: usize| self.held[i].load(Ordering::Relaxed);
        WeightSizes { covered: get(0), lookup_only: get(1), owned: get(2) }
    }

    /// Counts `w`'s own memory: its repacked copy, and its bytes when they are a copy.
    fn own(&self, w: Result<CpuWeight, EngineError>, copied: usize) -> Result<CpuWeight, EngineError> {
        let w = w?;
        let repacked = w.interleaved.as_ref().map_or(0, |il| il.bytes());
        self.held[2].fetch_add((repacked + copied) as u64, Ordering::Relaxed);
        Ok(w)
    }

    fn hold(&self, bytes: usize, lookup_only: bool) {
        self.held[0].fetch_add(bytes as u64, Ordering::Relaxed);
        if lookup_only {
            self.held[1].fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }

    /// This backend as stage `stage` of a `stages`-stage pipeline.
    pub fn as_stage(mut self, stage: PipelineStage) -> CpuBackend {
        self.stage = Some(stage);
        self
    }

    /// Under tensor parallelism, this rank's time in collectives so far (waiting for the
    /// other ranks included).
    pub fn collective_time(&self) -> Option<std::time::Duration> {
        Some(self.tp.as_ref()?.comm.busy())
    }
}

/// A row-major f32 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuAct {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl CpuAct {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

/// A weight matrix: in the memory-mapped GGUF file, or, for a tensor-parallel shard, its
/// own copy of its part; and, for the types that have one on this CPU, its interleaved
/// copy (16 rows read together), which matmuls use.
pub struct CpuWeight {
    bytes: WeightBytes,
    ty: GgmlType,
    rows: usize,
    cols: usize,
    interleaved: Option<Interleaved>,
}

enum WeightBytes {
    /// The tensor's bytes in the mapped file, or the part of them from `start`, `len` long
    /// (a tensor-parallel share of whole rows: no copy).
    Mapped {
        file: Arc<Gguf>,
        tensor: TensorInfo,
        start: usize,
        len: usize,
    },
    Owned(Vec<u8>),
}

impl CpuWeight {
    pub fn view(&self) -> WeightView<'_> {
        let data = match &self.bytes {
            WeightBytes::Mapped { file, tensor, start, len } => &file.tensor_data(tensor)[*start..*start + *len],
            WeightBytes::Owned(bytes) => bytes,
        };
        WeightView { ty: self.ty, rows: self.rows, cols: self.cols, data }
    }

    /// A weight over `bytes` (`rows` rows of `cols` elements of `ty`), checked, with its
    /// interleaved copy where the type has one.
    fn new(name: &str, bytes: WeightBytes, ty: GgmlType, rows: usize, cols: usize) -> Result<CpuWeight, EngineError> {
        let mut weight = CpuWeight::checked(name, bytes, ty, rows, cols)?;
        if Interleaved::supports(ty) {
            weight.interleaved = Interleaved::new(&weight.view());
        }
        Ok(weight)
    }

    /// A weight over `bytes`, checked, without an interleaved copy.
    fn checked(
        name: &str,
        bytes: WeightBytes,
        ty: GgmlType,
        rows: usize,
        cols: usize,
    ) -> Result<CpuWeight, EngineError> {
        let weight = CpuWeight { bytes, ty, rows, cols, interleaved: None };
        WeightView::new(ty, rows, cols, weight.view().data).ok_or_else(|| EngineError::BadValue {
            key: name.into(),
            value: format!("{rows}x{cols} {ty}"),
            why: "the data is not that many whole rows",
        })?;
        Ok(weight)
    }

    /// A weight that owns its bytes (a shard, or one made in memory).
    pub fn from_bytes(
        name: &str,
        ty: GgmlType,
        rows: usize,
        cols: usize,
        bytes: Vec<u8>,
    ) -> Result<CpuWeight, EngineError> {
        CpuWeight::new(name, WeightBytes::Owned(bytes), ty, rows, cols)
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// Keys and values in fixed-size blocks: per layer, one array of
/// `[block][token in block][kv_dim]` over the blocks of the layer's group. Which block
/// holds what is the [`BlockManager`]'s business.
pub struct CpuKv {
    blocks: BlockManager,
    layers: Vec<Cells>,
}

/// One layer's keys and values, zero-initialised, so pages the pool never uses are never
/// touched. With shared values ([`KvSpec::shared_v`]) `values` is empty and each value is
/// the leading part of its key.
enum Cells {
    /// f16 bits (llama.cpp's default cache type).
    F16 {
        keys: Vec<u16>,
        values: Vec<u16>,
    },
    F32 {
        keys: Vec<f32>,
        values: Vec<f32>,
    },
}

impl Cells {
    fn new(dtype: KvType, len: usize, shared_v: bool) -> Cells {
        let v_len = if shared_v { 0 } else { len };
        match dtype {
            KvType::F16 => Cells::F16 { keys: vec![0; len], values: vec![0; v_len] },
            KvType::F32 => Cells::F32 { keys: vec![0.0; len], values: vec![0.0; v_len] },
        }
    }

    /// Stores one token's key and value rows at element offset `at` (the value only when
    /// values are stored apart).
    fn write(&mut self, at: usize, k: &[f32], v: &[f32]) {
        fn put<T>(dst: &mut [T], at: usize, src: &[f32], conv: impl Fn(f32) -> T) {
            dst[at..at + src.len()].iter_mut().zip(src).for_each(|(d, &x)| *d = conv(x));
        }
        let half = |x: f32| f16::from_f32(x).to_bits();
        match self {
            Cells::F16 { keys, values } => {
                put(keys, at, k, half);
                if !values.is_empty() {
                    put(values, at, v, half);
                }
            }
            Cells::F32 { keys, values } => {
                put(keys, at, k, |x| x);
                if !values.is_empty() {
                    put(values, at, v, |x| x);
                }
            }
        }
    }

    /// The key and value rows at `at`, widened to f32 (shared values: read from the key).
    fn read_into(&self, at: usize, k: &mut [f32], v: &mut [f32]) {
        fn get<T: Copy>(out: &mut [f32], src: &[T], at: usize, conv: impl Fn(T) -> f32) {
            let n = out.len();
            out.iter_mut().zip(&src[at..at + n]).for_each(|(o, &x)| *o = conv(x));
        }
        let half = |x: u16| f16::from_bits(x).to_f32();
        match self {
            Cells::F16 { keys, values } => {
                get(k, keys, at, half);
                get(v, if values.is_empty() { keys } else { values }, at, half);
            }
            Cells::F32 { keys, values } => {
                get(k, keys, at, |x| x);
                get(v, if values.is_empty() { keys } else { values }, at, |x| x);
            }
        }
    }
}

impl KvCache for CpuKv {
    fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    fn blocks_mut(&mut self) -> &mut BlockManager {
        &mut self.blocks
    }
}

impl CpuKv {
    /// A zeroed cache; `recording` its block changes for other ranks to mirror.
    fn new(spec: &KvSpec, recording: bool) -> CpuKv {
        let block_len = BLOCK_TOKENS * spec.kv_dim;
        let layer_len = |layer: usize| spec.groups[spec.layer_slot[layer].0].n_blocks * block_len;
        let layers = (0..spec.n_layers).map(|l| Cells::new(spec.dtype, layer_len(l), spec.shared_v)).collect();
        let blocks = if recording { BlockManager::recording(spec) } else { BlockManager::new(spec) };
        CpuKv { blocks, layers }
    }

    /// Where position `pos` of `seq` lives in `layer`'s arrays: a function from position
    /// to element offset, valid for positions whose block is held.
    fn locator(&self, layer: usize, seq: usize) -> impl Fn(usize) -> usize + '_ {
        let spec = self.blocks.spec();
        let table = self.blocks.table(seq, spec.layer_slot[layer].0);
        let d = spec.kv_dim;
        move |pos| (table[pos / BLOCK_TOKENS] as usize * BLOCK_TOKENS + pos % BLOCK_TOKENS) * d
    }

    /// Writes one token's K and V rows (its block was reserved by `begin_batch`).
    fn store(&mut self, layer: usize, seq: usize, pos: usize, k: &[f32], v: &[f32]) {
        let at = self.locator(layer, seq)(pos);
        self.layers[layer].write(at, k, v);
    }

    /// Keys and values of `seq` in `layer` from position `from` to `to` (exclusive), as
    /// contiguous f32 rows.
    fn widen(&self, layer: usize, seq: usize, from: usize, to: usize) -> (Vec<f32>, Vec<f32>) {
        let d = self.blocks.spec().kv_dim;
        let at = self.locator(layer, seq);
        let (mut k, mut v) = (vec![0.0f32; (to - from) * d], vec![0.0f32; (to - from) * d]);
        k.par_chunks_mut(d)
            .zip(v.par_chunks_mut(d))
            .enumerate()
            .for_each(|(i, (k, v))| self.layers[layer].read_into(at(from + i), k, v));
        (k, v)
    }
}

impl Backend for CpuBackend {
    type Act = CpuAct;
    type Weight = CpuWeight;
    type Vector = Vec<f32>;
    type Kv = CpuKv;

    fn name(&self) -> &'static str {
        "CPU"
    }

    fn weight(&self, file: &Arc<Gguf>, tensor: &TensorInfo) -> Result<CpuWeight, EngineError> {
        let (cols, rows) = matrix_shape(tensor)?;
        let len = file.tensor_data(tensor).len();
        let bytes = WeightBytes::Mapped { file: file.clone(), tensor: tensor.clone(), start: 0, len };
        self.hold(len, false);
        self.own(CpuWeight::new(&tensor.name, bytes, tensor.ty, rows, cols), 0)
    }

    /// Rows are a range of the mapped file (no copy); columns, the rank's own copy.
    fn weight_part(&self, file: &Arc<Gguf>, tensor: &TensorInfo, part: Part) -> Result<CpuWeight, EngineError> {
        let (cols, rows) = matrix_shape(tensor)?;
        if let Part::Rows(r) = &part {
            let range = row_bytes_of(&tensor.name, tensor.ty, rows, cols, r)?;
            let bytes = WeightBytes::Mapped {
                file: file.clone(),
                tensor: tensor.clone(),
                start: range.start,
                len: range.len(),
            };
            self.hold(range.len(), false);
            return self.own(CpuWeight::new(&tensor.name, bytes, tensor.ty, r.len(), cols), 0);
        }
        let (rows, cols, bytes) = shard_bytes(&tensor.name, tensor.ty, rows, cols, file.tensor_data(tensor), part)?;
        let copied = bytes.len();
        self.hold(copied, false);
        self.own(CpuWeight::from_bytes(&tensor.name, tensor.ty, rows, cols, bytes), copied)
    }

    fn lookup_table(&self, file: &Arc<Gguf>, tensor: &TensorInfo) -> Result<CpuWeight, EngineError> {
        let (cols, rows) = matrix_shape(tensor)?;
        let len = file.tensor_data(tensor).len();
        let bytes = WeightBytes::Mapped { file: file.clone(), tensor: tensor.clone(), start: 0, len };
        self.hold(len, true);
        CpuWeight::checked(&tensor.name, bytes, tensor.ty, rows, cols)
    }

    fn tensor_parallel(&self) -> (usize, usize) {
        self.tp.as_ref().map_or((0, 1), |t| (t.comm.rank(), t.comm.size()))
    }

    fn pipeline_stage(&self) -> Option<&PipelineStage> {
        self.stage.as_ref()
    }

    fn all_reduce_sum(&self, x: &mut CpuAct) {
        if let Some(tp) = &self.tp {
            tp.record(tp.comm.all_reduce_sum(&mut x.data));
        }
    }

    /// Under tensor parallelism (a group of one included, the reference for larger ones),
    /// interleaved weights sum in f64 until after the all-reduce; alone, the f32 kernels
    /// (3% faster prompt processing) do.
    fn matmul_reduced(&self, w: &CpuWeight, x: &CpuAct) -> CpuAct {
        let il = w.interleaved.as_ref().filter(|_| self.tp.is_some() && x.rows > 0 && x.cols == w.cols);
        let Some(il) = il else {
            let mut y = self.matmul(w, x);
            self.all_reduce_sum(&mut y);
            return y;
        };
        let acts = QuantizedActs::new(w.ty.act_type(), &x.data, x.cols);
        let mut wide = vec![0.0f64; x.rows * w.rows];
        matmul::matmul_interleaved_wide(&w.view(), il, &acts, &mut wide);
        if let Some(tp) = &self.tp {
            tp.record(tp.comm.all_reduce_sum_f64(&mut wide));
        }
        CpuAct { rows: x.rows, cols: w.rows, data: wide.iter().map(|&v| v as f32).collect() }
    }

    fn all_gather_cols(&self, x: CpuAct) -> CpuAct {
        let Some(tp) = &self.tp else { return x };
        // Each rank's width, exact as an f32 (a vocabulary share is far below 2^24).
        let widths = match tp.comm.all_gather(&[x.cols as f32]) {
            Ok(w) => w.iter().map(|&c| c as usize).collect::<Vec<_>>(),
            Err(e) => {
                tp.record(Err(e));
                return x;
            }
        };
        let parts = match tp.comm.all_gather(&x.data) {
            Ok(p) => p,
            Err(e) => {
                tp.record(Err(e));
                return x;
            }
        };
        // Rank-major [rank][row][its columns] to row-major [row][all columns].
        let cols: usize = widths.iter().sum();
        let mut out = self.zeros(x.rows, cols);
        let (mut src, mut at) = (0, 0);
        for w in widths {
            for r in 0..x.rows {
                out.data[r * cols + at..r * cols + at + w].copy_from_slice(&parts[src..src + w]);
                src += w;
            }
            at += w;
        }
        out
    }

    fn take_tp_error(&self) -> Option<EngineError> {
        let tp = self.tp.as_ref()?;
        let e = tp.error.lock().unwrap_or_else(|p| p.into_inner()).take();
        e.map(|e| EngineError::TensorParallel(e.to_string()))
    }

    fn vector(&self, file: &Arc<Gguf>, tensor: &TensorInfo) -> Result<Vec<f32>, EngineError> {
        if tensor.dims.len() != 1 || tensor.ty != GgmlType::F32 {
            return Err(EngineError::shape(&tensor.name, "a 1-D F32 tensor", &tensor.dims));
        }
        let bytes = file.tensor_data(tensor);
        self.hold(bytes.len(), false);
        Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    /// Rank 0 of a tensor-parallel group and stage 0 of a pipeline record their caches'
    /// block changes for the others to mirror (see [`crate::parallel::Sharded`]).
    fn new_kv(&self, spec: &KvSpec) -> CpuKv {
        let leads_group = self.tp.is_some() && self.tensor_parallel().0 == 0;
        let leads_pipeline = self.stage.as_ref().is_some_and(|s| s.is_first() && s.count > 1);
        CpuKv::new(spec, leads_group || leads_pipeline || self.hosts_device)
    }

    fn zeros(&self, rows: usize, cols: usize) -> CpuAct {
        CpuAct { rows, cols, data: vec![0.0; rows * cols] }
    }

    fn n_rows(&self, x: &CpuAct) -> usize {
        x.rows
    }

    fn from_host(&self, rows: usize, cols: usize, data: Vec<f32>) -> CpuAct {
        debug_assert_eq!(data.len(), rows * cols);
        CpuAct { rows, cols, data }
    }

    fn embed(&self, table: &CpuWeight, tokens: &[u32], scale: f32) -> Result<CpuAct, EngineError> {
        let view = table.view();
        let mut out = self.zeros(tokens.len(), table.cols);
        for (row, &t) in out.data.chunks_exact_mut(table.cols).zip(tokens) {
            if t as usize >= table.rows {
                return Err(EngineError::TokenOutOfRange { token: t, n_vocab: table.rows });
            }
            matmul::get_row(&view, t as usize, row);
            row.iter_mut().for_each(|x| *x *= scale);
        }
        Ok(out)
    }

    fn matmul(&self, w: &CpuWeight, x: &CpuAct) -> CpuAct {
        let mut out = self.zeros(x.rows, w.rows);
        match &w.interleaved {
            Some(il) if x.rows > 0 && x.cols == w.cols => {
                let acts = QuantizedActs::new(w.ty.act_type(), &x.data, x.cols);
                matmul::matmul_interleaved(&w.view(), il, &acts, &mut out.data);
            }
            _ => matmul::matmul(&w.view(), &x.data, x.rows, &mut out.data),
        }
        out
    }

    /// Quantizes the input once per activation type the weights need.
    fn matmuls<const N: usize>(&self, ws: [&CpuWeight; N], x: &CpuAct) -> [CpuAct; N] {
        let mut quantized: Vec<QuantizedActs> = Vec::new();
        ws.map(|w| {
            let ty = w.ty.act_type();
            if w.cols == 0 || x.rows == 0 || x.cols != w.cols {
                return self.matmul(w, x); // its own checks and messages
            }
            let i = match quantized.iter().position(|q| q.ty == ty) {
                Some(i) => i,
                None => {
                    quantized.push(QuantizedActs::new(ty, &x.data, x.cols));
                    quantized.len() - 1
                }
            };
            let mut out = self.zeros(x.rows, w.rows);
            match &w.interleaved {
                Some(il) => matmul::matmul_interleaved(&w.view(), il, &quantized[i], &mut out.data),
                None => matmul::matmul_quantized(Isa::best(), &w.view(), &quantized[i], &mut out.data),
            }
            out
        })
    }

    fn rms_norm(&self, x: &CpuAct, w: &Vec<f32>, eps: f32) -> CpuAct {
        let mut out = x.clone();
        for_each_chunk(&mut out.data, w.len(), |s| ops::rms_norm(s, w, eps));
        out
    }

    fn rope_neox(&self, x: &mut CpuAct, positions: &[u32], head_dim: usize, base: f32, freq_scale: f32) {
        rope_rows(x, positions, head_dim, |h, p| ops::rope_neox(h, p, base, freq_scale));
    }

    fn rope_norm(
        &self,
        x: &mut CpuAct,
        positions: &[u32],
        head_dim: usize,
        base: f32,
        freq_scale: f32,
        factors: Option<&Vec<f32>>,
    ) {
        let factors = factors.map(Vec::as_slice);
        rope_rows(x, positions, head_dim, |h, p| ops::rope_norm(h, p, base, freq_scale, factors));
    }

    fn rope_neox_yarn(&self, x: &mut CpuAct, positions: &[u32], head_dim: usize, base: f32, yarn: &Yarn) {
        rope_rows(x, positions, head_dim, |h, p| ops::rope_neox_yarn(h, p, base, yarn));
    }

    fn rope_norm_yarn(&self, x: &mut CpuAct, positions: &[u32], head_dim: usize, base: f32, yarn: &Yarn) {
        rope_rows(x, positions, head_dim, |h, p| ops::rope_norm_yarn(h, p, base, yarn));
    }

    fn scale(&self, x: &mut CpuAct, s: f32) {
        x.data.iter_mut().for_each(|v| *v *= s);
    }

    fn add(&self, y: &mut CpuAct, x: &CpuAct) {
        ops::add_assign(&mut y.data, &x.data);
    }

    fn add_bias(&self, x: &mut CpuAct, bias: &Vec<f32>) {
        x.data.chunks_exact_mut(x.cols).for_each(|row| ops::add_assign(row, bias));
    }

    fn add_scaled_rows(&self, y: &mut CpuAct, x: &CpuAct, rows: &[usize], weights: &[f32]) {
        for ((src, &r), &w) in x.data.chunks_exact(x.cols).zip(rows).zip(weights) {
            let dst = &mut y.data[r * y.cols..(r + 1) * y.cols];
            dst.iter_mut().zip(src).for_each(|(d, &s)| *d += w * s);
        }
    }

    fn geglu(&self, gate: &mut CpuAct, up: &CpuAct) {
        if gate.data.len() < PARALLEL_MIN_ELEMENTS {
            ops::geglu(&mut gate.data, &up.data);
        } else {
            gate.data.par_chunks_mut(4096).zip(up.data.par_chunks(4096)).for_each(|(g, u)| ops::geglu(g, u));
        }
    }

    fn swiglu(&self, gate: &mut CpuAct, up: &CpuAct) {
        if gate.data.len() < PARALLEL_MIN_ELEMENTS {
            ops::swiglu(&mut gate.data, &up.data);
        } else {
            gate.data.par_chunks_mut(4096).zip(up.data.par_chunks(4096)).for_each(|(g, u)| ops::swiglu(g, u));
        }
    }

    fn swiglu_oai(&self, gate: &mut CpuAct, up: &CpuAct, alpha: f32, limit: f32) {
        if gate.data.len() < PARALLEL_MIN_ELEMENTS {
            ops::swiglu_oai(&mut gate.data, &up.data, alpha, limit);
        } else {
            let (g, u) = (gate.data.par_chunks_mut(4096), up.data.par_chunks(4096));
            g.zip(u).for_each(|(g, u)| ops::swiglu_oai(g, u, alpha, limit));
        }
    }

    fn attention(
        &self,
        kv: &mut CpuKv,
        layer: usize,
        batch: &BatchLayout,
        q: &CpuAct,
        k: &CpuAct,
        v: &CpuAct,
        shape: AttnShape,
        sinks: Option<&Vec<f32>>,
    ) -> CpuAct {
        for i in 0..batch.len() {
            kv.store(layer, batch.seqs[i], batch.positions[i] as usize, k.row(i), v.row(i));
        }
        let (hd, vd) = (shape.head_dim, shape.v_head_dim);
        let mut out = self.zeros(q.rows, shape.n_heads * vd);
        let kv = &*kv;
        let first_key = |pos: usize| match shape.window {
            Some(w) => (pos + 1).saturating_sub(w as usize),
            None => 0,
        };
        // A sequence with many query rows in this batch (a long prompt chunk) attends in
        // f32 from keys widened once for the batch, not once per query and head. The choice
        // depends only on the sequence's own rows, so a sequence's results do not depend
        // on what else shares the batch.
        let mut rows_per_seq: HashMap<usize, (usize, usize, usize)> = HashMap::new();
        for (&seq, &pos) in batch.seqs.iter().zip(&batch.positions) {
            let e = rows_per_seq.entry(seq).or_insert((0, usize::MAX, 0));
            *e = (e.0 + 1, e.1.min(first_key(pos as usize)), e.2.max(pos as usize + 1));
        }
        let f16_cache = matches!(kv.layers[layer], Cells::F16 { .. });
        let widened: HashMap<usize, (usize, Vec<f32>, Vec<f32>)> = rows_per_seq
            .into_iter()
            .filter(|&(_, (rows, _, _))| f16_cache && rows >= F32_ATTENTION_MIN_QUERIES)
            .map(|(seq, (_, from, to))| {
                let (k, v) = kv.widen(layer, seq, from, to);
                (seq, (from, k, v))
            })
            .collect();
        let cells = &kv.layers[layer];
        let (d, shared_v) = (kv.blocks.spec().kv_dim, kv.blocks.spec().shared_v);
        // Within a token's row: KV head h's key, and its value (shared values: the key's
        // leading part).
        let khead = |h: usize| h * hd..(h + 1) * hd;
        let vhead = |h: usize| if shared_v { h * hd..h * hd + vd } else { h * vd..(h + 1) * vd };
        let query = |t: usize, h: usize| {
            let (lo, pos) = (first_key(batch.positions[t] as usize), batch.positions[t] as usize);
            QueryRow {
                q: &q.row(t)[h * hd..(h + 1) * hd],
                keys: lo..pos + 1,
                sink: sinks.and_then(|s| s.get(h)).copied(),
            }
        };
        let jobs = attention_jobs(batch, shape, |seq| widened.contains_key(&seq) || matches!(cells, Cells::F32 { .. }));
        let mut slots: Vec<Option<&mut [f32]>> = out.data.chunks_mut(vd).map(Some).collect();
        let jobs: Vec<(AttnJob, Vec<&mut [f32]>)> = jobs
            .into_iter()
            .map(|job| {
                let outs = job.rows().filter_map(|(t, h)| slots[t * shape.n_heads + h].take()).collect();
                (job, outs)
            })
            .collect();
        jobs.into_par_iter().for_each(|(job, mut outs)| {
            let (seq, kvh) = (job.seq, job.kv_head);
            let rows: Vec<QueryRow> = job.rows().map(|(t, h)| query(t, h)).collect();
            let (kh, vh) = (khead(kvh), vhead(kvh));
            let at = kv.locator(layer, seq);
            match (widened.get(&seq), cells) {
                (Some((from, keys, values)), _) => {
                    let key = |p: usize| &keys[(p - from) * d..][kh.clone()];
                    let value = |p: usize| &values[(p - from) * d..][vh.clone()];
                    attention::attend_rows(&rows, key, value, shape.scale, &mut outs);
                }
                (None, Cells::F32 { keys, values }) => {
                    let values = if shared_v { keys } else { values };
                    let key = |p: usize| &keys[at(p)..][kh.clone()];
                    let value = |p: usize| &values[at(p)..][vh.clone()];
                    attention::attend_rows(&rows, key, value, shape.scale, &mut outs);
                }
                (None, Cells::F16 { keys, values }) => {
                    let values = if shared_v { keys } else { values };
                    let (keys, values): (&[f16], &[f16]) = (keys.reinterpret_cast(), values.reinterpret_cast());
                    // A one-token job: its heads read the same keys, in lockstep.
                    for (rows, outs) in rows.chunks(half_ops::GROUP_MAX).zip(outs.chunks_mut(half_ops::GROUP_MAX)) {
                        let kv =
                            rows[0].keys.clone().map(|p| (&keys[at(p)..][kh.clone()], &values[at(p)..][vh.clone()]));
                        attend_online_f16(rows, kv, shape.scale, outs);
                    }
                }
            }
        });
        out
    }

    fn gather_cols(&self, x: &CpuAct, spans: &[(usize, usize)]) -> CpuAct {
        let cols = spans.iter().map(|&(_, len)| len).sum();
        let mut out = self.zeros(x.rows, cols);
        for (dst, src) in out.data.chunks_exact_mut(cols.max(1)).zip(x.data.chunks_exact(x.cols.max(1))) {
            let mut at = 0;
            for &(start, len) in spans {
                dst[at..at + len].copy_from_slice(&src[start..start + len]);
                at += len;
            }
        }
        out
    }

    fn concat_cols(&self, parts: &[&CpuAct]) -> CpuAct {
        let rows = parts.first().map_or(0, |p| p.rows);
        let cols = parts.iter().map(|p| p.cols).sum();
        let mut out = self.zeros(rows, cols);
        for (r, dst) in out.data.chunks_exact_mut(cols.max(1)).enumerate() {
            let mut at = 0;
            for p in parts {
                dst[at..at + p.cols].copy_from_slice(p.row(r));
                at += p.cols;
            }
        }
        out
    }

    fn run_all<T: Send, R: Send>(&self, jobs: Vec<T>, f: impl Fn(T) -> R + Sync + Send) -> Vec<R> {
        jobs.into_par_iter().map(f).collect()
    }

    fn select_rows(&self, x: &CpuAct, rows: &[usize]) -> CpuAct {
        let mut out = self.zeros(rows.len(), x.cols);
        for (dst, &r) in out.data.chunks_exact_mut(x.cols).zip(rows) {
            dst.copy_from_slice(x.row(r));
        }
        out
    }

    fn to_host(&self, x: &CpuAct) -> Vec<f32> {
        x.data.clone()
    }

    fn take_to_host(&self, x: CpuAct) -> Vec<f32> {
        x.data
    }
}

/// (ne0, ne1) of a 2-D tensor: columns and rows.
fn matrix_shape(tensor: &TensorInfo) -> Result<(usize, usize), EngineError> {
    match tensor.dims[..] {
        [c, r] => Ok((c as usize, r as usize)),
        _ => Err(EngineError::shape(&tensor.name, "2 dimensions", &tensor.dims)),
    }
}

/// Element-wise work below this size runs on the calling thread: handing it to the pool
/// costs more than it saves (a decode step's norms and activations are a few thousand
/// floats).
const PARALLEL_MIN_ELEMENTS: usize = 1 << 15;

/// `rope` on every `head_dim` segment of row i at positions[i], rows in parallel when
/// there are enough of them.
fn rope_rows(x: &mut CpuAct, positions: &[u32], head_dim: usize, rope: impl Fn(&mut [f32], u32) + Sync) {
    let rope_row = |(row, &p): (&mut [f32], &u32)| row.chunks_exact_mut(head_dim).for_each(|h| rope(h, p));
    if x.data.len() < PARALLEL_MIN_ELEMENTS {
        x.data.chunks_mut(x.cols).zip(positions).for_each(rope_row);
    } else {
        x.data.par_chunks_mut(x.cols).zip(positions).for_each(rope_row);
    }
}

/// `f` on every `chunk`-long piece of `data`, in parallel when there is enough of it.
fn for_each_chunk(data: &mut [f32], chunk: usize, f: impl Fn(&mut [f32]) + Sync + Send) {
    if data.len() < PARALLEL_MIN_ELEMENTS {
        data.chunks_mut(chunk).for_each(f);
    } else {
        data.par_chunks_mut(chunk).for_each(f);
    }
}

/// Query tokens per attention job on the tiled f32 path: with a group's heads, enough
/// rows to fill the kernel's tiles; small enough to spread a prompt over the threads.
const TILE_TOKENS: usize = 4;

/// A piece of a layer's attention: query rows (token, head) of one sequence that read
/// the same KV head.
struct AttnJob {
    seq: usize,
    kv_head: usize,
    /// Batch rows.
    tokens: Vec<usize>,
    heads: std::ops::Range<usize>,
}

impl AttnJob {
    /// The job's (batch row, head) pairs, tokens outer: a tile of rows then shares its
    /// tokens' key ranges.
    fn rows(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.tokens.iter().flat_map(move |&t| self.heads.clone().map(move |h| (t, h)))
    }
}

/// The batch's attention split into jobs. Sequences on the tiled path (`tiled(seq)`) get
/// jobs of [`TILE_TOKENS`] tokens × a KV head's query heads; the others one job per
/// token and KV head (or part of its query heads), for the f16 kernel.
fn attention_jobs(batch: &BatchLayout, shape: AttnShape, tiled: impl Fn(usize) -> bool) -> Vec<AttnJob> {
    let group = shape.n_heads / shape.n_kv_heads;
    let mut per_seq: Vec<(usize, Vec<usize>)> = Vec::new();
    for (t, &seq) in batch.seqs.iter().enumerate() {
        match per_seq.iter_mut().find(|(s, _)| *s == seq) {
            Some((_, rows)) => rows.push(t),
            None => per_seq.push((seq, vec![t])),
        }
    }
    // One-token jobs take a KV head's query heads together, split when there would be
    // fewer jobs than threads (a single sequence decoding): a head's result does not
    // depend on which others share its job.
    let one_token_jobs: usize =
        per_seq.iter().filter(|(seq, _)| !tiled(*seq)).map(|(_, rows)| rows.len() * shape.n_kv_heads).sum();
    let splits = rayon::current_num_threads().div_ceil(one_token_jobs.max(1));
    let heads_per_job = group.div_ceil(splits).max(1);
    let mut jobs = Vec::new();
    for (seq, rows) in per_seq {
        if tiled(seq) {
            for tokens in rows.chunks(TILE_TOKENS) {
                for kv_head in 0..shape.n_kv_heads {
                    let heads = kv_head * group..(kv_head + 1) * group;
                    jobs.push(AttnJob { seq, kv_head, tokens: tokens.to_vec(), heads });
                }
            }
        } else {
            for &t in &rows {
                for kv_head in 0..shape.n_kv_heads {
                    for first in (kv_head * group..(kv_head + 1) * group).step_by(heads_per_job) {
                        let heads = first..(first + heads_per_job).min((kv_head + 1) * group);
                        jobs.push(AttnJob { seq, kv_head, tokens: vec![t], heads });
                    }
                }
            }
        }
    }
    jobs
}

/// Sequences with fewer query rows than this in a batch run attention the way llama.cpp's
/// CPU flash-attention does for small batches and decode: Q rounded to f16 and the weighted
/// sum of V accumulated in f16 with an online softmax. Longer runs accumulate in f32,
/// as llama.cpp's tiled kernel does. Matching its rounding keeps our logits within the
/// noise of llama.cpp's own, which the reference fixtures check.
const F32_ATTENTION_MIN_QUERIES: usize = 64;

/// Online-softmax attention with Q in f16 and the V accumulator in f16 (rescaled when
/// a new maximum score appears), as ggml's `flash_attn_ext_f16_one_chunk`; a sink is
/// folded in after the keys, on the f32 result, as there. Up to `half_ops::GROUP_MAX`
/// query rows over the same keys run in lockstep, each key and value converted once for
/// all of them; each row's arithmetic is what it would be alone.
fn attend_online_f16<'a>(
    rows: &[QueryRow],
    kv: impl Iterator<Item = (&'a [f16], &'a [f16])>,
    scale: f32,
    outs: &mut [&mut [f32]],
) {
    let n = rows.len();
    debug_assert!(rows.iter().all(|r| r.keys == rows[0].keys), "lockstep rows read other keys");
    // Q rounded to f16 and back, whole slices at a time (F16C, not a call per element).
    let q16: Vec<Vec<f32>> = rows
        .iter()
        .map(|r| {
            let mut h = vec![f16::ZERO; r.q.len()];
            h.convert_from_f32_slice(r.q);
            let mut back = vec![0.0f32; r.q.len()];
            h.convert_to_f32_slice(&mut back);
            back
        })
        .collect();
    let qs: Vec<&[f32]> = q16.iter().map(Vec::as_slice).collect();
    let mut accs: Vec<Vec<f16>> = outs.iter().map(|o| vec![f16::ZERO; o.len()]).collect();
    let (mut max, mut sum) = (vec![f32::NEG_INFINITY; n], vec![0.0f32; n]);
    let (mut dots, mut vs) = (vec![0.0f32; n], vec![0.0f32; n]);
    for (k, v) in kv {
        half_ops::dots_f16_f32(k, &qs, &mut dots);
        for j in 0..n {
            let s = dots[j] * scale;
            let mut ms = 1.0f32;
            vs[j] = 1.0;
            if s > max[j] {
                ms = (max[j] - s).exp();
                max[j] = s;
                half_ops::scale_f16(&mut accs[j], ms);
            } else {
                vs[j] = (s - max[j]).exp();
            }
            sum[j] = sum[j] * ms + vs[j];
        }
        half_ops::mads_f16(&mut accs, v, &vs);
    }
    for (j, out) in outs.iter_mut().enumerate() {
        accs[j].convert_to_f32_slice(out);
        if let Some(s) = rows[j].sink {
            if s > max[j] {
                let ms = (max[j] - s).exp();
                out.iter_mut().for_each(|o| *o *= ms);
                sum[j] = sum[j] * ms + 1.0;
            } else {
                sum[j] += (s - max[j]).exp();
            }
        }
        let inv = if sum[j] == 0.0 { 0.0 } else { 1.0 / sum[j] };
        out.iter_mut().for_each(|o| *o *= inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvLayout;
    use crate::model::Batch;

    /// Deterministic values in [-1, 1), rounded to f16 so both caches hold the same keys.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                f16::from_f32((x % 2000) as f32 / 1000.0 - 1.0).to_f32()
            })
            .collect()
    }

    /// The plain reference: softmax over (scale·q·k, then the sink) of each value row.
    fn reference(q: &[f32], keys: &[&[f32]], vals: &[&[f32]], scale: f32, sink: Option<f32>) -> Vec<f32> {
        let s: Vec<f64> = keys
            .iter()
            .map(|k| k.iter().zip(q).map(|(a, b)| f64::from(a * b)).sum::<f64>() * f64::from(scale))
            .collect();
        let max = s.iter().copied().chain(sink.map(f64::from)).fold(f64::NEG_INFINITY, f64::max);
        let w: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
        let sum = w.iter().sum::<f64>() + sink.map_or(0.0, |x| (f64::from(x) - max).exp());
        (0..vals[0].len())
            .map(|d| (w.iter().zip(vals).map(|(w, v)| w * f64::from(v[d])).sum::<f64>() / sum) as f32)
            .collect()
    }

    /// The f16 online kernel (decode, short prompts) and the f32 one agree with the
    /// plain softmax, with and without a sink, within f16 rounding.
    #[test]
    fn attention_kernels_match_the_plain_softmax() {
        let (n, d) = (40, 16);
        let q = values(d, 1);
        let (k, v) = (values(n * d, 2), values(n * d, 3));
        let rows: Vec<(&[f32], &[f32])> = k.chunks(d).zip(v.chunks(d)).collect();
        let (k16, v16): (Vec<f16>, Vec<f16>) =
            (k.iter().map(|&x| f16::from_f32(x)).collect(), v.iter().map(|&x| f16::from_f32(x)).collect());
        let rows16: Vec<(&[f16], &[f16])> = k16.chunks(d).zip(v16.chunks(d)).collect();
        for sink in [None, Some(-0.5), Some(4.0)] {
            let keys: Vec<&[f32]> = rows.iter().map(|r| r.0).collect();
            let vals: Vec<&[f32]> = rows.iter().map(|r| r.1).collect();
            let want = reference(&q, &keys, &vals, 0.7, sink);
            let (mut a, mut b) = (vec![0.0; d], vec![0.0; d]);
            let row = QueryRow { q: &q, keys: 0..n, sink };
            attention::attend_one(&row, |p| rows[p].0, |p| rows[p].1, 0.7, &mut a);
            attend_online_f16(&[row.clone()], rows16.iter().copied(), 0.7, &mut [&mut b]);
            for ((x, y), w) in a.iter().zip(&b).zip(&want) {
                assert!((x - w).abs() < 1e-5, "f32 kernel {x} vs {w} (sink {sink:?})");
                assert!((y - w).abs() < 2e-3, "f16 kernel {y} vs {w} (sink {sink:?})");
            }
        }
    }

    /// Heads run in lockstep give each head exactly what it gets alone.
    #[test]
    fn heads_in_lockstep_equal_heads_alone() {
        let (n, d, g) = (37, 24, 4);
        let (k, v) = (values(n * d, 12), values(n * d, 13));
        let (k16, v16): (Vec<f16>, Vec<f16>) =
            (k.iter().map(|&x| f16::from_f32(x)).collect(), v.iter().map(|&x| f16::from_f32(x)).collect());
        let kv = || k16.chunks(d).zip(v16.chunks(d));
        let qs: Vec<Vec<f32>> = (0..g).map(|j| values(d, 20 + j as u32).iter().map(|x| x * 3.0).collect()).collect();
        let sinks = [None, Some(0.5), Some(9.0), None];
        let rows: Vec<QueryRow> = (0..g).map(|j| QueryRow { q: &qs[j], keys: 0..n, sink: sinks[j] }).collect();
        let mut together = vec![vec![0.0f32; d]; g];
        let mut outs: Vec<&mut [f32]> = together.iter_mut().map(Vec::as_mut_slice).collect();
        attend_online_f16(&rows, kv(), 0.3, &mut outs);
        for (j, row) in rows.iter().enumerate() {
            let mut alone = vec![0.0f32; d];
            attend_online_f16(std::slice::from_ref(row), kv(), 0.3, &mut [&mut alone]);
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&together[j]), bits(&alone), "head {j}");
        }
    }

    /// Random well-formed blocks of `ty` (small finite scales).
    fn random_matrix(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        if ty == GgmlType::F32 {
            return values(rows * cols, seed as u32).iter().flat_map(|v| v.to_le_bytes()).collect();
        }
        let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut data: Vec<u8> = (0..rows * ty.row_bytes(cols).expect("whole blocks")).map(|_| next() as u8).collect();
        for block in data.chunks_mut(ty.type_size()) {
            let d = f16::from_f32(0.01 + (next() % 100) as f32 / 1e4).to_le_bytes();
            let at = if ty == GgmlType::Q6_K { 208 } else { 0 };
            block[at..at + 2].copy_from_slice(&d);
            if ty == GgmlType::Q4_K {
                block[2..4].copy_from_slice(&f16::from_f32(0.002).to_le_bytes());
            }
        }
        data
    }

    /// Column-parallel shards give exactly the unsharded rows; row-parallel shards, summed
    /// by the in-process all-reduce, give the unsharded products within float rounding,
    /// the same bits on every rank.
    #[test]
    fn sharded_matmuls_equal_the_unsharded_one() {
        use crate::parallel::{even_range, shard_bytes, Communicator, InProcess, Part};
        for ty in [GgmlType::Q8_0, GgmlType::Q4_K, GgmlType::F32] {
            let (rows, cols, tokens) = (64, 1024, 3);
            let data = random_matrix(ty, rows, cols, 7);
            let full = CpuWeight::from_bytes("w", ty, rows, cols, data.clone()).expect("weight");
            let x = CpuAct { rows: tokens, cols, data: values(tokens * cols, 9) };
            let want = CpuBackend::default().matmul(&full, &x);
            for ranks in [1, 2, 4] {
                let part = |by_rows: bool, rank| {
                    let part = match by_rows {
                        true => Part::Rows(even_range(rows, 1, rank, ranks)),
                        false => Part::Cols(even_range(cols / ty.block_size(), ty.block_size(), rank, ranks)),
                    };
                    let (r, c, bytes) = shard_bytes("w", ty, rows, cols, &data, part).expect("shard");
                    CpuWeight::from_bytes("w", ty, r, c, bytes).expect("weight")
                };
                // By rows: each rank's outputs are the full product's columns r·rows/n...
                let per = rows / ranks;
                for rank in 0..ranks {
                    let got = CpuBackend::default().matmul(&part(true, rank), &x);
                    for t in 0..tokens {
                        let w = &want.row(t)[rank * per..(rank + 1) * per];
                        assert_eq!(got.row(t), w, "{ty} rows, {ranks} ranks, rank {rank}");
                    }
                }
                // By columns: partial products, summed.
                let sums: Vec<Vec<f32>> = std::thread::scope(|s| {
                    let handles: Vec<_> = InProcess::group(ranks)
                        .into_iter()
                        .map(|comm| {
                            let (x, part) = (&x, &part);
                            s.spawn(move || {
                                let w = part(false, comm.rank());
                                let c = cols / ranks;
                                let xs: Vec<f32> =
                                    x.data.chunks(cols).flat_map(|r| r[comm.rank() * c..][..c].to_vec()).collect();
                                let mut y =
                                    CpuBackend::default().matmul(&w, &CpuAct { rows: tokens, cols: c, data: xs });
                                comm.all_reduce_sum(&mut y.data).expect("all-reduce");
                                y.data
                            })
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().expect("rank")).collect()
                });
                for got in &sums {
                    assert_eq!(
                        got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        sums[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                    );
                    for (g, w) in got.iter().zip(&want.data) {
                        assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{ty} cols, {ranks} ranks: {g} vs {w}");
                    }
                }
            }
        }
    }

    /// Multi-head latent attention's cache: values are the leading part of each key, and
    /// the f16 and f32 caches give the plain result.
    #[test]
    fn shared_values_are_read_from_the_keys() {
        let (n_heads, hd, vd, n) = (2, 6, 4, 5);
        let layout = KvLayout { kv_dim: hd, windows: vec![None], shared_v: true };
        let shape = AttnShape { n_heads, n_kv_heads: 1, head_dim: hd, v_head_dim: vd, window: None, scale: 0.5 };
        let (q, k) = (values(n * n_heads * hd, 4), values(n * hd, 5));
        let want: Vec<f32> = (0..n)
            .flat_map(|t| {
                let keys: Vec<&[f32]> = k.chunks(hd).take(t + 1).collect();
                let vals: Vec<&[f32]> = keys.iter().map(|r| &r[..vd]).collect();
                let q = &q;
                (0..n_heads).flat_map(move |h| reference(&q[(t * n_heads + h) * hd..][..hd], &keys, &vals, 0.5, None))
            })
            .collect();
        for dtype in [KvType::F32, KvType::F16] {
            let spec = KvSpec::for_sequences(&layout, 64, 1, 64).with_type(dtype);
            assert_eq!(spec.pool_bytes(), 4 * 16 * hd * dtype.bytes_per_value(), "keys only");
            let mut kv = CpuKv::new(&spec, false);
            let batch = Batch::for_sequence(0, 0, &vec![0; n], true);
            kv.blocks_mut().begin_batch(&batch).expect("blocks");
            let act = |rows: usize, data: &[f32]| CpuAct { rows, cols: data.len() / rows, data: data.to_vec() };
            let (qa, ka) = (act(n, &q), act(n, &k));
            let out = CpuBackend::default().attention(&mut kv, 0, &batch.layout, &qa, &ka, &ka, shape, None);
            assert_eq!((out.rows, out.cols), (n, n_heads * vd));
            for (x, w) in out.data.iter().zip(&want) {
                assert!((x - w).abs() < 2e-3, "{dtype:?}: {x} vs {w}");
            }
        }
    }
}
