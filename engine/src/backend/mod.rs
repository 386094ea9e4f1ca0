//! The backend seam: the narrow set of operations a model's forward pass is written in.
//!
//! A forward pass is written once against [`Backend`] and runs on any implementation:
//! the CPU today, CUDA and tensor-parallel shards later. Every operation works on a
//! *batch*: activations are matrices with one row per token, and the tokens of a batch
//! may belong to different sequences at different positions (ragged lengths), as
//! described by [`BatchLayout`].

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod offload;

use crate::gguf::{Gguf, TensorInfo};
use crate::kv::{BlockManager, KvSpec};
use crate::model::moe::{Activation, Routes};
use crate::EngineError;
use std::ops::Range;
use std::sync::Arc;
pub use turbine_cpu::ops::Yarn;

/// Which sequence and position each row of a batch belongs to.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct BatchLayout {
    /// Position of each token in its sequence (0-based).
    pub positions: Vec<u32>,
    /// Sequence slot of each token (an index into the KV cache's sequences).
    pub seqs: Vec<usize>,
}

impl BatchLayout {
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
}

/// Shape of the attention of one layer.
#[derive(Clone, Copy, Debug)]
pub struct AttnShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Values per head (= head_dim, except in multi-head latent attention).
    pub v_head_dim: usize,
    /// Keys at distance ≥ window from the query are masked (None: full causal).
    pub window: Option<u32>,
    /// Multiplier on q·k (1.0 when q is pre-scaled).
    pub scale: f32,
}

/// The weights a backend made, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WeightSizes {
    /// Of the model file, covered by its weights and vectors (under tensor parallelism:
    /// a rank's shares and whole copies).
    pub covered: u64,
    /// Of those, tables only looked up by row (embeddings, whose pages are read only for
    /// the tokens seen).
    pub lookup_only: u64,
    /// Memory of its own beyond the mapped file: repacked copies, a rank's column shares.
    pub owned: u64,
}

/// One stage of a pipeline: its index of `count`, and its consecutive layers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelineStage {
    pub index: usize,
    pub count: usize,
    pub layers: std::ops::Range<usize>,
}

impl PipelineStage {
    pub fn is_first(&self) -> bool {
        self.index == 0
    }

    pub fn is_last(&self) -> bool {
        self.index + 1 == self.count
    }
}

/// A layer's gated experts, as [`Backend::moe_grouped`] takes them: expert e is
/// down[e] · act(gate[e] · x + b_gate[e], up[e] · x + b_up[e]) + b_down[e], the biases only
/// where the model has them.
pub struct ExpertWeights<'a, B: Backend + ?Sized> {
    /// Per expert: gate and up [ff × d], down [d × ff], as [`Backend::experts`] made them.
    pub gate: &'a [B::Weight],
    pub up: &'a [B::Weight],
    pub down: &'a [B::Weight],
    /// Per expert: gate [ff], up [ff] and down [d] biases, as [`Backend::expert_vectors`]
    /// made them.
    pub biases: Option<[&'a [B::Vector]; 3]>,
    pub act: Activation,
}

/// The `n` equal slices of `t` along its last dimension (a layer's experts, or heads'
/// matrices), each a tensor of `t`'s other dimensions over its own bytes of the file.
/// Parsing checked that the data fits the file and is whole rows of its type, so the
/// slices are whole too.
pub(crate) fn slices(t: &TensorInfo, n: usize) -> impl Iterator<Item = TensorInfo> + '_ {
    let per_slice = t.n_bytes / n.max(1);
    let dims = &t.dims[..t.dims.len().saturating_sub(1)];
    (0..n).map(move |i| TensorInfo {
        name: format!("{}[{i}]", t.name),
        ty: t.ty,
        dims: dims.to_vec(),
        offset: t.offset + (i * per_slice) as u64,
        n_bytes: per_slice,
    })
}

/// The operations a forward pass needs. Activation matrices are row-major, one row per
/// token of the batch.
pub trait Backend: Send + Sync {
    /// An f32 activation matrix resident where the backend computes.
    type Act: Send + Sync;
    /// A weight matrix in its storage type: quantized weights stay quantized.
    type Weight: Send + Sync;
    /// A small f32 vector (norm weights).
    type Vector: Send + Sync;
    /// Keys and values of every layer and sequence slot.
    type Kv: KvCache + Send;

    fn name(&self) -> &'static str;

    /// Makes a 2-D GGUF tensor usable as a weight matrix ([rows × cols], rows = dims[1]).
    fn weight(&self, file: &Arc<Gguf>, tensor: &TensorInfo) -> Result<Self::Weight, EngineError>;
    /// One rank's part of a 2-D weight for tensor parallelism: its own copy of a range of
    /// rows or columns, so a rank holds about 1/N of the sharded weights.
    fn weight_part(
        &self,
        file: &Arc<Gguf>,
        tensor: &TensorInfo,
        part: crate::parallel::Part,
    ) -> Result<Self::Weight, EngineError>;
    /// A table read only by `embed` (its rows), never multiplied: no repacking for matmuls.
    fn lookup_table(&self, file: &Arc<Gguf>, tensor: &TensorInfo) -> Result<Self::Weight, EngineError> {
        self.weight(file, tensor)
    }
    /// (rank, ranks) of this backend's tensor-parallel group; (0, 1) alone.
    fn tensor_parallel(&self) -> (usize, usize) {
        (0, 1)
    }
    /// This backend's place in a pipeline (None alone): models load and run only the
    /// stage's layers.
    fn pipeline_stage(&self) -> Option<&PipelineStage> {
        None
    }
    /// Reads a 1-D F32 tensor.
    fn vector(&self, file: &Arc<Gguf>, tensor: &TensorInfo) -> Result<Self::Vector, EngineError>;
    /// Matrices `range` of the `n` of a 3-D tensor [cols, rows, n] (its shape checked by the
    /// caller): a layer's experts, or its heads' matrices, each a [rows × cols] weight. By
    /// default each is [`Backend::weight`] of its own slice of the file; a backend may keep
    /// them side by side in one allocation instead, as [`Backend::moe_grouped`] may need.
    fn experts(
        &self,
        file: &Arc<Gguf>,
        tensor: &TensorInfo,
        n: usize,
        range: Range<usize>,
    ) -> Result<Vec<Self::Weight>, EngineError> {
        slices(tensor, n).skip(range.start).take(range.len()).map(|slice| self.weight(file, &slice)).collect()
    }
    /// Rows `range` of the `n` of a 2-D F32 tensor [len, n] (its shape checked by the
    /// caller) as vectors: the experts' biases. By default each is [`Backend::vector`] of
    /// its own slice; a backend may keep them in one allocation, as [`Backend::experts`].
    fn expert_vectors(
        &self,
        file: &Arc<Gguf>,
        tensor: &TensorInfo,
        n: usize,
        range: Range<usize>,
    ) -> Result<Vec<Self::Vector>, EngineError> {
        slices(tensor, n).skip(range.start).take(range.len()).map(|slice| self.vector(file, &slice)).collect()
    }
    fn new_kv(&self, spec: &KvSpec) -> Self::Kv;

    /// A zeroed [rows × cols] activation matrix.
    fn zeros(&self, rows: usize, cols: usize) -> Self::Act;
    /// The number of rows (tokens) of x.
    fn n_rows(&self, x: &Self::Act) -> usize;
    /// A [rows × cols] activation matrix from host memory (row-major).
    fn from_host(&self, rows: usize, cols: usize, data: Vec<f32>) -> Self::Act;
    /// Row i = table row tokens[i], times `scale`.
    fn embed(&self, table: &Self::Weight, tokens: &[u32], scale: f32) -> Result<Self::Act, EngineError>;
    /// out = x · Wᵀ: [n × cols] → [n × rows].
    fn matmul(&self, w: &Self::Weight, x: &Self::Act) -> Self::Act;
    /// [`Backend::matmul`] of several weights with the same input (Q, K and V; gate and
    /// up), which a backend may prepare once for all of them.
    fn matmuls<const N: usize>(&self, ws: [&Self::Weight; N], x: &Self::Act) -> [Self::Act; N] {
        ws.map(|w| self.matmul(w, x))
    }
    /// RMSNorm of every `w.len()`-long segment of every row (a whole row, or each head).
    fn rms_norm(&self, x: &Self::Act, w: &Self::Vector, eps: f32) -> Self::Act;
    /// NEOX rotary embedding on every `head_dim` segment of row i, at positions[i].
    fn rope_neox(&self, x: &mut Self::Act, positions: &[u32], head_dim: usize, base: f32, freq_scale: f32);
    /// Normal-style rotary embedding (adjacent pairs; Llama's), with optional per-pair
    /// frequency divisors (Llama 3's `rope_freqs`).
    fn rope_norm(
        &self,
        x: &mut Self::Act,
        positions: &[u32],
        head_dim: usize,
        base: f32,
        freq_scale: f32,
        factors: Option<&Self::Vector>,
    );
    /// NEOX rotary embedding with YaRN context extension (gpt-oss, DeepSeek).
    fn rope_neox_yarn(&self, x: &mut Self::Act, positions: &[u32], head_dim: usize, base: f32, yarn: &Yarn);
    /// Normal-style rotary embedding with YaRN (DeepSeek).
    fn rope_norm_yarn(&self, x: &mut Self::Act, positions: &[u32], head_dim: usize, base: f32, yarn: &Yarn);
    fn scale(&self, x: &mut Self::Act, s: f32);
    /// y += x.
    fn add(&self, y: &mut Self::Act, x: &Self::Act);
    /// Every row of x += bias.
    fn add_bias(&self, x: &mut Self::Act, bias: &Self::Vector);
    /// y[rows[i]] += weights[i] · x[i] (a mixture-of-experts combine).
    fn add_scaled_rows(&self, y: &mut Self::Act, x: &Self::Act, rows: &[usize], weights: &[f32]);
    /// gate = gelu_tanh(gate) * up.
    fn geglu(&self, gate: &mut Self::Act, up: &Self::Act);
    /// gate = silu(gate) * up.
    fn swiglu(&self, gate: &mut Self::Act, up: &Self::Act);
    /// gpt-oss's clamped SwiGLU (see `turbine_cpu::ops::swiglu_oai`).
    fn swiglu_oai(&self, gate: &mut Self::Act, up: &Self::Act, alpha: f32, limit: f32);
    /// Stores this batch's K and V rows of `layer` in the cache (its blocks were reserved by
    /// [`BlockManager::begin_batch`]), then attends every query row to the cached keys of
    /// its own sequence up to its own position. `sinks` [n_heads]: a learned logit per head
    /// that joins each softmax's normalization with no value (gpt-oss).
    #[allow(clippy::too_many_arguments)] // q, k, v, the cache, its layer, the batch, the shape and the sinks are all distinct
    fn attention(
        &self,
        kv: &mut Self::Kv,
        layer: usize,
        batch: &BatchLayout,
        q: &Self::Act,
        k: &Self::Act,
        v: &Self::Act,
        shape: AttnShape,
        sinks: Option<&Self::Vector>,
    ) -> Self::Act;
    /// Each row's `spans` (start, length) of columns, side by side: [n × Σ length].
    fn gather_cols(&self, x: &Self::Act, spans: &[(usize, usize)]) -> Self::Act;
    /// The matrices side by side, row by row: [n × Σ cols].
    fn concat_cols(&self, parts: &[&Self::Act]) -> Self::Act;
    /// f over independent jobs (a layer's experts), in parallel where the backend can;
    /// results in job order.
    fn run_all<T: Send, R: Send>(&self, jobs: Vec<T>, f: impl Fn(T) -> R + Sync + Send) -> Vec<R> {
        jobs.into_iter().map(f).collect()
    }
    /// The given rows, in order.
    fn select_rows(&self, x: &Self::Act, rows: &[usize]) -> Self::Act;
    /// A whole mixture-of-experts combine in the backend's own grouped way, where it has
    /// one that pays for this batch: x [n × d] through every token's routed experts
    /// (`experts` holds all of the layer's, indexed by the routes' expert ids), each
    /// output weighted and summed per token: [n × d], what the model's per-expert loop
    /// ([`Backend::select_rows`], the products, [`Backend::add_scaled_rows`] in expert
    /// order) computes, within the backend's rounding. None: no such path here (the CPU),
    /// or not for these weights or this batch; the model then runs its per-expert loop.
    /// Failures on the way are the backend's to report as its other operations' are.
    fn moe_grouped(&self, x: &Self::Act, routes: &Routes, experts: &ExpertWeights<'_, Self>) -> Option<Self::Act> {
        let _ = (x, routes, experts);
        None
    }
    /// Sums partial results across tensor-parallel shards (identity on one device). A
    /// failed collective is kept for [`Backend::take_tp_error`].
    fn all_reduce_sum(&self, _x: &mut Self::Act) {}
    /// A row-parallel product (attention output, down): `w·x`, summed over the ranks'
    /// column shards. Where the backend can, each rank's partial sums stay exact until the
    /// all-reduce and are rounded once after it, so a split model computes what the whole
    /// one does.
    fn matmul_reduced(&self, w: &Self::Weight, x: &Self::Act) -> Self::Act {
        let mut y = self.matmul(w, x);
        self.all_reduce_sum(&mut y);
        y
    }
    /// Every rank's columns of `x` side by side, in rank order (identity on one device).
    fn all_gather_cols(&self, x: Self::Act) -> Self::Act {
        x
    }
    /// The first failed collective since the last call, if any: the forward pass that
    /// met it returns it instead of its (meaningless) result. The CUDA backend reports its
    /// device failures (out of memory, a failed launch) here the same way.
    fn take_tp_error(&self) -> Option<EngineError> {
        None
    }
    /// Copies an activation matrix to host memory.
    fn to_host(&self, x: &Self::Act) -> Vec<f32>;
    /// Moves an activation matrix to host memory (no copy where it is there already).
    fn take_to_host(&self, x: Self::Act) -> Vec<f32> {
        self.to_host(&x)
    }
}

/// A paged KV cache: a backend's storage for the blocks a [`BlockManager`] hands out.
pub trait KvCache {
    fn blocks(&self) -> &BlockManager;
    fn blocks_mut(&mut self) -> &mut BlockManager;

    /// Tokens currently stored for sequence `seq`.
    fn seq_len(&self, seq: usize) -> usize {
        self.blocks().seq_len(seq)
    }
    /// Forgets every token of `seq`.
    fn clear(&mut self, seq: usize) {
        self.blocks_mut().clear(seq)
    }
    fn n_seqs(&self) -> usize {
        self.blocks().n_seqs()
    }
    fn max_tokens(&self) -> usize {
        self.blocks().max_tokens()
    }
}
