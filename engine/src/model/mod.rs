//! Model architectures, one file each, all written against the [`Backend`] seam.

pub mod decoder;
pub mod deepseek2;
pub mod gemma3;
pub mod gpt_oss;
pub mod llama;
pub mod moe;
pub mod qwen2;
pub mod qwen3;
pub mod qwen3moe;

use crate::backend::{Backend, BatchLayout, KvCache};
use crate::gguf::{Gguf, TensorInfo};
use crate::kv::{BlockOp, KvLayout, KvSpec};
use crate::parallel::{even_range, Part};
use crate::EngineError;
use std::ops::Range;
use std::sync::Arc;
use turbine_cpu::GgmlType;

/// Tokens to run through the model in one forward pass: any number of sequences, each
/// contributing a run of consecutive positions (a prompt chunk or one decode token).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Batch {
    pub tokens: Vec<u32>,
    pub layout: BatchLayout,
    /// Whether to return the logits of each token.
    pub want_logits: Vec<bool>,
}

impl Batch {
    /// `tokens` of sequence `seq` at positions start.., with logits for the last token
    /// only, or for every token when `all_logits`.
    pub fn for_sequence(seq: usize, start: usize, tokens: &[u32], all_logits: bool) -> Batch {
        let mut b = Batch::default();
        for (i, &t) in tokens.iter().enumerate() {
            b.push(seq, (start + i) as u32, t, all_logits || i + 1 == tokens.len());
        }
        b
    }

    pub fn push(&mut self, seq: usize, pos: u32, token: u32, logits: bool) {
        self.tokens.push(token);
        self.layout.seqs.push(seq);
        self.layout.positions.push(pos);
        self.want_logits.push(logits);
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Indices of the tokens that want logits.
    pub fn output_rows(&self) -> Vec<usize> {
        (0..self.len()).filter(|&i| self.want_logits[i]).collect()
    }
}

/// Logits of the tokens of a batch that asked for them, in batch order.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Logits {
    /// Batch index of each row.
    pub rows: Vec<usize>,
    pub n_vocab: usize,
    pub data: Vec<f32>,
}

impl Logits {
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.n_vocab..(i + 1) * self.n_vocab]
    }
}

/// Sizes every architecture reports.
#[derive(Clone, Debug)]
pub struct ModelInfo {
    pub architecture: String,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layers: usize,
    pub context_length: usize,
    pub n_params: u64,
    /// Under tensor or pipeline parallelism, each rank's weights in bytes (rank order).
    /// Empty for a whole model.
    pub rank_weight_bytes: Vec<crate::backend::WeightSizes>,
}

/// A loaded model of some architecture.
pub trait Architecture<B: Backend>: Send + Sync {
    fn info(&self) -> &ModelInfo;
    /// Per-token KV width and per-layer attention windows.
    fn kv_layout(&self) -> KvLayout;
    /// A KV cache where `n_seqs` sequences can each hold `max_tokens` at once, whatever
    /// the size of the batches they are fed in.
    fn kv_spec(&self, max_tokens: usize, n_seqs: usize) -> KvSpec {
        KvSpec::for_sequences(&self.kv_layout(), max_tokens, n_seqs, max_tokens)
    }
    /// Runs the layers over a batch whose cache blocks are already reserved.
    fn compute(&self, backend: &B, batch: &Batch, kv: &mut B::Kv) -> Result<Logits, EngineError>;
    /// The final (normalized) hidden states, [rows × n_embd], of the tokens that ask for
    /// output, in batch order; blocks already reserved.
    fn compute_hidden(&self, backend: &B, batch: &Batch, kv: &mut B::Kv) -> Result<Vec<f32>, EngineError>;
    /// Pipeline parallelism: a stage's part of a forward pass whose cache blocks are
    /// reserved: the layers `layers` on `input` (the hidden states entering them,
    /// [rows × n_embd]; None: the batch's embeddings), then what `end` says.
    fn compute_stage(
        &self,
        backend: &B,
        batch: &Batch,
        kv: &mut B::Kv,
        layers: Range<usize>,
        input: Option<Vec<f32>>,
        end: StageEnd,
    ) -> Result<StageOutput, EngineError> {
        let _ = (backend, batch, kv, layers, input, end);
        Err(EngineError::BadValue {
            key: "general.architecture".into(),
            value: self.info().architecture.clone(),
            why: "this model cannot run as a pipeline stage",
        })
    }
    /// Pipeline parallelism, for a stage split over ranks itself (tensor parallelism):
    /// `batch` starts on `kv`, whose blocks for it are reserved, before its micro-batches
    /// run through [`Architecture::compute_stage`]; `ops` are the block changes the stage
    /// received with it. Nothing to do on one rank.
    fn stage_batch_begins(
        &self,
        backend: &B,
        kv: &mut B::Kv,
        batch: &Batch,
        ops: &[BlockOp],
    ) -> Result<(), EngineError> {
        let _ = (backend, kv, batch, ops);
        Ok(())
    }
    /// As above: `batch`'s micro-batches are done (`kv` ends it after this).
    fn stage_batch_ends(&self, backend: &B, kv: &mut B::Kv, batch: &Batch) -> Result<(), EngineError> {
        let _ = (backend, kv, batch);
        Ok(())
    }
    /// Mixture-of-experts models: tokens routed to each expert since load, per layer
    /// (empty for dense models). For debugging a router.
    fn routing_stats(&self) -> Vec<Vec<u64>> {
        Vec::new()
    }
    /// Whether a forward pass should run on a worker of the global thread pool (where the
    /// layers' many parallel operations start cheaply). Models split over ranks run in
    /// pools of their own: a global worker waiting on them could take up another model's
    /// pass meanwhile, nested inside the first (under MPI, between its collectives).
    fn runs_on_global_pool(&self) -> bool {
        true
    }
    /// [`Architecture::forward`] returning hidden states instead of logits (embeddings).
    fn forward_hidden(&self, backend: &B, batch: &Batch, kv: &mut B::Kv) -> Result<Vec<f32>, EngineError> {
        check_tokens(batch, self.info().n_vocab)?;
        kv.blocks_mut().begin_batch(batch)?;
        let hidden = on_global_pool(self.runs_on_global_pool(), || self.compute_hidden(backend, batch, kv));
        finish_batch(kv, batch, hidden.is_ok());
        hidden
    }
    /// One forward pass over `batch`, appending its keys and values to `kv`. On an error
    /// before any layer runs (a bad batch, a full cache) the cache is unchanged.
    fn forward(&self, backend: &B, batch: &Batch, kv: &mut B::Kv) -> Result<Logits, EngineError> {
        check_tokens(batch, self.info().n_vocab)?;
        kv.blocks_mut().begin_batch(batch)?;
        // On a pool thread, the layers' many parallel operations start cheaply; from any
        // other thread each one would wake the pool and wait for it.
        let logits = on_global_pool(self.runs_on_global_pool(), || self.compute(backend, batch, kv));
        finish_batch(kv, batch, logits.is_ok());
        logits
    }
}

/// Ends a pass's batch in the cache: registers its full blocks when the pass `succeeded`,
/// else forgets it (a failed pass may have stored nothing).
fn finish_batch(kv: &mut impl KvCache, batch: &Batch, succeeded: bool) {
    match succeeded {
        true => kv.blocks_mut().end_batch(batch),
        false => kv.blocks_mut().abort_batch(batch),
    }
}

/// `f` on a worker of the global thread pool (`rayon::scope` hands it to one), or here.
fn on_global_pool<T: Send>(pooled: bool, f: impl FnOnce() -> T + Send) -> T {
    match pooled {
        true => rayon::scope(|_| f()),
        false => f(),
    }
}

/// Refuses token ids outside the vocabulary before the cache records anything, so a
/// forward that fails leaves the cache as it was.
fn check_tokens(batch: &Batch, n_vocab: usize) -> Result<(), EngineError> {
    match batch.tokens.iter().find(|&&t| t as usize >= n_vocab) {
        Some(&token) => Err(EngineError::TokenOutOfRange { token, n_vocab }),
        None => Ok(()),
    }
}

/// Loads the architecture named by the file's `general.architecture`.
pub fn load<B: Backend + 'static>(backend: &B, file: &Arc<Gguf>) -> Result<Box<dyn Architecture<B>>, EngineError> {
    let arch = file.architecture()?;
    match arch {
        "gemma3" => Ok(Box::new(gemma3::Gemma3::load(backend, file)?)),
        "llama" => Ok(Box::new(llama::load(backend, file)?)),
        "qwen2" => Ok(Box::new(qwen2::load(backend, file)?)),
        "qwen3" => Ok(Box::new(qwen3::load(backend, file)?)),
        "qwen3moe" => Ok(Box::new(qwen3moe::load(backend, file)?)),
        "gpt-oss" => Ok(Box::new(gpt_oss::load(backend, file)?)),
        "deepseek2" => Ok(Box::new(deepseek2::load(backend, file)?)),
        other => Err(EngineError::UnsupportedArchitecture(other.to_string())),
    }
}

/// Per-layer parts of a model, indexed by layer number: every layer, or a pipeline stage's
/// consecutive range of them (indexing a layer outside it is a bug, and panics).
pub struct Layered<T> {
    first: usize,
    items: Vec<T>,
}

impl<T> Layered<T> {
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.items.iter()
    }
}

impl<T> std::ops::Index<usize> for Layered<T> {
    type Output = T;
    fn index(&self, layer: usize) -> &T {
        &self.items[layer - self.first]
    }
}

/// `x` in host memory, unless a collective of the pass failed (then its error).
pub(crate) fn host_or_tp_error<B: Backend>(b: &B, x: B::Act) -> Result<Vec<f32>, EngineError> {
    let host = b.take_to_host(x);
    b.take_tp_error().map_or(Ok(host), Err)
}

/// What a pipeline stage makes of the hidden states after its layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StageEnd {
    /// Hands them to the next stage as they are.
    Handoff,
    /// The last stage: the output norm, then the logits.
    Logits,
    /// The last stage: the output norm (an embedding request).
    Hidden,
}

/// What a pipeline stage hands on: the hidden states after its layers, [rows × n_embd],
/// or, from the last stage, the logits.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub enum StageOutput {
    Hidden(Vec<f32>),
    Logits(Logits),
}

/// Loads tensors by name for an architecture, checking each one's shape.
pub(crate) struct Loader<'a, B: Backend> {
    pub backend: &'a B,
    pub file: &'a Arc<Gguf>,
}

impl<B: Backend> Loader<'_, B> {
    /// A weight matrix stored as [cols, rows] in GGUF order (ne0 = cols).
    pub fn weight(&self, name: &str, cols: usize, rows: usize) -> Result<B::Weight, EngineError> {
        let t = self.file.tensor(name).ok_or_else(|| EngineError::MissingTensor(name.into()))?;
        if t.dims != [cols as u64, rows as u64] {
            return Err(EngineError::shape(name, &format!("[{cols}, {rows}]"), &t.dims));
        }
        self.backend.weight(self.file, t)
    }

    /// A [cols, rows] table only looked up by row (embeddings whose output projection is
    /// elsewhere).
    pub fn lookup_table(&self, name: &str, cols: usize, rows: usize) -> Result<B::Weight, EngineError> {
        let t = self.file.tensor(name).ok_or_else(|| EngineError::MissingTensor(name.into()))?;
        if t.dims != [cols as u64, rows as u64] {
            return Err(EngineError::shape(name, &format!("[{cols}, {rows}]"), &t.dims));
        }
        self.backend.lookup_table(self.file, t)
    }

    /// [`Loader::weight`], or only `part` of it (a tensor-parallel rank's share); the
    /// whole matrix when `part` covers it.
    pub fn weight_part(&self, name: &str, cols: usize, rows: usize, part: Part) -> Result<B::Weight, EngineError> {
        let whole = match &part {
            Part::Rows(r) => *r == (0..rows),
            Part::Cols(c) => *c == (0..cols),
        };
        if whole {
            return self.weight(name, cols, rows);
        }
        let t = self.file.tensor(name).ok_or_else(|| EngineError::MissingTensor(name.into()))?;
        if t.dims != [cols as u64, rows as u64] {
            return Err(EngineError::shape(name, &format!("[{cols}, {rows}]"), &t.dims));
        }
        self.backend.weight_part(self.file, t, part)
    }

    /// Experts `range` of the `n` of a [cols, rows, n] tensor (a rank's experts, or its
    /// heads' matrices), each a [rows × cols] weight matrix ([`Backend::experts`]: over its
    /// own slice of the file, or side by side with the others in one allocation).
    pub fn experts(
        &self,
        name: &str,
        cols: usize,
        rows: usize,
        n: usize,
        range: Range<usize>,
    ) -> Result<Vec<B::Weight>, EngineError> {
        let t = self.tensor(name, &[cols, rows, n])?;
        self.backend.experts(self.file, t, n, range)
    }

    /// (rank, ranks) of the backend's tensor-parallel group; (0, 1) alone.
    pub fn shard(&self) -> (usize, usize) {
        self.backend.tensor_parallel()
    }

    /// The layers of `n_layers` this backend's pipeline stage runs (all of them alone).
    pub fn layers(&self, n_layers: usize) -> Range<usize> {
        self.backend.pipeline_stage().map_or(0..n_layers, |s| s.layers.start.min(n_layers)..s.layers.end.min(n_layers))
    }

    /// `load` of each layer of this backend's pipeline stage.
    pub fn per_layer<T>(
        &self,
        n_layers: usize,
        load: impl FnMut(usize) -> Result<T, EngineError>,
    ) -> Result<Layered<T>, EngineError> {
        let layers = self.layers(n_layers);
        Ok(Layered { first: layers.start, items: layers.map(load).collect::<Result<_, _>>()? })
    }

    /// This rank's share of the `cols` inputs of the row-parallel matrix `name`, cut at
    /// its quantization blocks (all of them alone; possibly empty when the matrix has
    /// fewer blocks than there are ranks).
    pub fn input_share(&self, name: &str, cols: usize) -> Result<Range<usize>, EngineError> {
        let t = self.file.tensor(name).ok_or_else(|| EngineError::MissingTensor(name.into()))?;
        let bs = t.ty.block_size().max(1);
        if !cols.is_multiple_of(bs) {
            return Err(EngineError::shape(name, &format!("whole {bs}-element blocks of {cols} columns"), &t.dims));
        }
        let (rank, ranks) = self.shard();
        Ok(even_range(cols / bs, bs, rank, ranks))
    }

    /// `range` of the 1-D F32 tensor `name` of `len` values (a rank's biases or sinks).
    pub fn vector_part(&self, name: &str, len: usize, range: Range<usize>) -> Result<B::Vector, EngineError> {
        let t = self.tensor(name, &[len])?;
        if t.ty != GgmlType::F32 || range.end > len {
            return Err(EngineError::shape(name, &format!("an F32 vector to slice at {range:?}"), &t.dims));
        }
        let slice = TensorInfo {
            name: format!("{name}[{range:?}]"),
            ty: t.ty,
            dims: vec![range.len() as u64],
            offset: t.offset + (range.start * 4) as u64,
            n_bytes: range.len() * 4,
        };
        self.backend.vector(self.file, &slice)
    }

    /// The token embeddings and the output projection: under tensor parallelism the head
    /// is this rank's vocabulary rows (its logits are gathered), and the embeddings are
    /// only looked up; alone, a tied head is None (the embeddings themselves).
    pub fn embeddings_and_head(&self, d: usize, n_vocab: usize) -> Result<(B::Weight, Option<B::Weight>), EngineError> {
        if self.backend.pipeline_stage().is_some_and(|s| !s.is_last()) {
            // A pipeline stage before the last never computes logits: the embeddings are
            // only looked up (and only by the first stage).
            return Ok((self.lookup_table("token_embd.weight", d, n_vocab)?, None));
        }
        let (rank, ranks) = self.shard();
        let vocab = even_range(n_vocab, 1, rank, ranks);
        let head_name = if self.file.tensor("output.weight").is_some() { "output.weight" } else { "token_embd.weight" };
        let head = match (head_name, vocab == (0..n_vocab)) {
            ("token_embd.weight", true) => None,
            _ => Some(self.weight_part(head_name, d, n_vocab, Part::Rows(vocab))?),
        };
        // The embeddings are multiplied only when they are the whole head.
        let tok_embd = match head {
            None => self.weight("token_embd.weight", d, n_vocab)?,
            Some(_) => self.lookup_table("token_embd.weight", d, n_vocab)?,
        };
        Ok((tok_embd, head))
    }

    /// Rows `range` of the `n` of a [len, n] F32 tensor as vectors (a rank's experts'
    /// biases; [`Backend::expert_vectors`]).
    pub fn expert_vectors(
        &self,
        name: &str,
        len: usize,
        n: usize,
        range: Range<usize>,
    ) -> Result<Vec<B::Vector>, EngineError> {
        let t = self.tensor(name, &[len, n])?;
        self.backend.expert_vectors(self.file, t, n, range)
    }

    /// The tensor `name`, which must have exactly `dims`.
    fn tensor(&self, name: &str, dims: &[usize]) -> Result<&TensorInfo, EngineError> {
        let t = self.file.tensor(name).ok_or_else(|| EngineError::MissingTensor(name.into()))?;
        if !t.dims.iter().copied().eq(dims.iter().map(|&d| d as u64)) {
            return Err(EngineError::shape(name, &format!("{dims:?}"), &t.dims));
        }
        Ok(t)
    }

    /// A 1-D F32 tensor read into host memory (values the host itself uses).
    pub fn host_vector(&self, name: &str, len: usize) -> Result<Vec<f32>, EngineError> {
        let t = self.tensor(name, &[len])?;
        if t.ty != GgmlType::F32 {
            return Err(EngineError::shape(name, "an F32 vector", &t.dims));
        }
        let bytes = self.file.tensor_data(t);
        Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    }

    pub fn vector(&self, name: &str, len: usize) -> Result<B::Vector, EngineError> {
        let t = self.file.tensor(name).ok_or_else(|| EngineError::MissingTensor(name.into()))?;
        if t.dims != [len as u64] {
            return Err(EngineError::shape(name, &format!("[{len}]"), &t.dims));
        }
        self.backend.vector(self.file, t)
    }
}

/// Reads a required metadata value.
pub(crate) fn required<T>(value: Result<Option<T>, crate::gguf::GgufError>, key: &str) -> Result<T, EngineError> {
    value?.ok_or_else(|| EngineError::MissingKey(key.to_string()))
}

/// Total parameter count of the file's tensors.
pub(crate) fn count_params(file: &Gguf) -> u64 {
    file.tensors().iter().map(|t| t.n_elements() as u64).sum()
}
