//! The skeleton shared by the decoder-only architectures whose differences all live inside
//! a layer (llama, qwen2, qwen3, qwen3moe): hyper-parameters read under the
//! architecture's key prefix, the token embeddings and output head, and the pre-norm
//! residual stack
//!
//!   x = embed(tokens)
//!   for each layer: x = x + attention(x); x = x + feed_forward(x)
//!   logits = output · rms_norm(x)
//!
//! Each architecture's file supplies its layers through [`Layers`].

use super::{
    count_params, host_or_tp_error, required, Architecture, Batch, Loader, Logits, ModelInfo, StageEnd, StageOutput,
};
use crate::backend::{AttnShape, Backend, Yarn};
use crate::gguf::Gguf;
use crate::kv::KvLayout;
use crate::parallel::{split_heads, Heads, Part};
use crate::EngineError;
use std::ops::Range;
use std::sync::Arc;

/// Hyper-parameters every decoder has, read from `{arch}.*` metadata.
#[derive(Clone, Debug)]
pub struct DecoderConfig {
    /// The metadata key prefix (`general.architecture`).
    pub arch: &'static str,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// `feed_forward_length`: required by dense FFNs, unused by mixture-of-experts ones.
    pub n_ff: Option<usize>,
    pub rms_eps: f32,
    pub context_length: usize,
    pub rope_base: f32,
    pub rope_freq_scale: f32,
    /// `rope.scaling.type = yarn`: YaRN's ramp and magnitude scaling.
    pub yarn: Option<Yarn>,
    /// This rank's query heads and the KV heads they read (all of them alone).
    pub heads: Heads,
}

impl DecoderConfig {
    pub fn from_gguf(g: &Gguf, arch: &'static str) -> Result<DecoderConfig, EngineError> {
        let key = |k: &str| format!("{arch}.{k}");
        let req = |k: &str| -> Result<usize, EngineError> { Ok(required(g.get_u32(&key(k)), &key(k))? as usize) };
        let n_embd = req("embedding_length")?;
        let n_layers = req("block_count")?;
        // Every layer has several tensors: a count the file cannot back is refused before
        // any per-layer allocation.
        if n_layers > g.tensors().len() {
            return Err(EngineError::BadValue {
                key: key("block_count"),
                value: n_layers.to_string(),
                why: "more layers than the file has tensors",
            });
        }
        let n_heads = req("attention.head_count")?;
        let n_kv_heads = g.get_u32(&key("attention.head_count_kv"))?.map_or(n_heads, |v| v as usize);
        let head_dim = match g.get_u32(&key("attention.key_length"))? {
            Some(v) => v as usize,
            None => n_embd.checked_div(n_heads).unwrap_or(0),
        };
        let n_rot = g.get_u32(&key("rope.dimension_count"))?.map_or(head_dim, |v| v as usize);
        // DeepSeek's latent attention rotates only its RoPE dims (deepseek2.rs checks them).
        if n_rot != head_dim && arch != "deepseek2" {
            return Err(EngineError::BadValue {
                key: key("rope.dimension_count"),
                value: n_rot.to_string(),
                why: "partial rotary embeddings are not supported (must equal the head size)",
            });
        }
        let n_vocab = g
            .tensor("token_embd.weight")
            .and_then(|t| t.dims.get(1).copied())
            .ok_or_else(|| EngineError::MissingTensor("token_embd.weight".into()))? as usize;
        let rope_base = g.get_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0);
        let context_length = req("context_length")?;
        let (rope_freq_scale, yarn) = rope_scaling(g, arch, head_dim, rope_base, context_length)?;
        let cfg = DecoderConfig {
            arch,
            n_vocab,
            n_embd,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            n_ff: g.get_u32(&key("feed_forward_length"))?.map(|v| v as usize),
            rms_eps: required(
                g.get_f32(&key("attention.layer_norm_rms_epsilon")),
                &key("attention.layer_norm_rms_epsilon"),
            )?,
            context_length,
            rope_base,
            rope_freq_scale,
            yarn,
            heads: Heads { q: 0..n_heads, kv: 0..n_kv_heads },
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Rejects sizes the forward pass cannot run with.
    fn check(&self) -> Result<(), EngineError> {
        let bad = |key: &str, value: usize, why: &'static str| {
            Err(EngineError::BadValue { key: self.key(key), value: value.to_string(), why })
        };
        if self.n_embd == 0 || self.n_layers == 0 || self.context_length == 0 {
            return bad("embedding_length/block_count/context_length", 0, "must be > 0");
        }
        if self.n_heads == 0 || self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad("attention.head_count_kv", self.n_kv_heads, "must divide attention.head_count");
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad("attention.key_length", self.head_dim, "must be even and > 0");
        }
        if self.n_ff == Some(0) {
            return bad("feed_forward_length", 0, "must be > 0");
        }
        Ok(())
    }

    /// `{arch}.{k}`.
    pub fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }

    /// The dense FFN width, for architectures that need it.
    pub fn dense_ff(&self) -> Result<usize, EngineError> {
        self.n_ff.ok_or_else(|| EngineError::MissingKey(self.key("feed_forward_length")))
    }

    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Rows of Q (columns of the attention output) of this rank's query heads.
    pub fn q_rows(&self) -> Range<usize> {
        self.heads.q.start * self.head_dim..self.heads.q.end * self.head_dim
    }

    /// Rows of K and V of this rank's KV heads.
    pub fn kv_rows(&self) -> Range<usize> {
        self.heads.kv.start * self.head_dim..self.heads.kv.end * self.head_dim
    }

    /// NEOX RoPE of every head of x [n × heads·head_dim], YaRN-scaled where the file says.
    pub fn rope_neox<B: Backend>(&self, b: &B, x: &mut B::Act, positions: &[u32]) {
        match &self.yarn {
            Some(yarn) => b.rope_neox_yarn(x, positions, self.head_dim, self.rope_base, yarn),
            None => b.rope_neox(x, positions, self.head_dim, self.rope_base, self.rope_freq_scale),
        }
    }

    /// Full causal attention scaled by 1/√head_dim.
    pub fn attn_shape(&self) -> AttnShape {
        AttnShape {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim,
            v_head_dim: self.head_dim,
            window: None,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
        }
    }
}

/// `rope.scaling.type`: none, linear (factor f → frequencies scaled by 1/f) or yarn (the
/// same with YaRN's ramp, from `rope.scaling.original_context_length`). Llama 3's scaling
/// comes as `rope_freqs.weight` instead.
fn rope_scaling(
    g: &Gguf,
    arch: &str,
    head_dim: usize,
    base: f32,
    context_length: usize,
) -> Result<(f32, Option<Yarn>), EngineError> {
    let (type_key, factor_key) = (format!("{arch}.rope.scaling.type"), format!("{arch}.rope.scaling.factor"));
    let factor = g.get_f32(&factor_key)?.unwrap_or(1.0);
    // llama.cpp's default type, so a factor without a type scales linearly.
    let kind = g.get_str(&type_key)?.unwrap_or("linear");
    if kind != "none" && !(factor > 0.0 && factor.is_finite()) {
        return Err(EngineError::BadValue { key: factor_key, value: factor.to_string(), why: "must be > 0" });
    }
    match kind {
        "none" => Ok((1.0, None)),
        "linear" => Ok((1.0 / factor, None)),
        "yarn" => {
            let orig_key = format!("{arch}.rope.scaling.original_context_length");
            let orig_ctx = g.get_u32(&orig_key)?.map_or(context_length, |v| v as usize);
            Ok((1.0 / factor, Some(Yarn::new(head_dim, base, factor, orig_ctx))))
        }
        other => Err(EngineError::BadValue {
            key: type_key,
            value: other.to_string(),
            why: "supported RoPE scaling types: none, linear, yarn",
        }),
    }
}

/// Which layers use the sliding window: a per-layer bool array in the file, or a period
/// n (`default_period` when absent) where layer i is local iff i % n < n - 1 (n = 0: all
/// local).
pub fn swa_pattern(g: &Gguf, key: &str, n_layers: usize, default_period: u32) -> Result<Vec<bool>, EngineError> {
    if let Some(arr) = g.get_array(key).ok().flatten() {
        let bools = arr.as_bools().ok_or_else(|| EngineError::BadValue {
            key: key.into(),
            value: arr.type_name(),
            why: "must be a u32 or an array of bool",
        })?;
        if bools.len() < n_layers {
            return Err(EngineError::BadValue {
                key: key.into(),
                value: bools.len().to_string(),
                why: "shorter than block_count",
            });
        }
        return Ok(bools[..n_layers].to_vec());
    }
    let n = g.get_u32(key)?.unwrap_or(default_period) as usize;
    Ok((0..n_layers).map(|il| n == 0 || il % n < n - 1).collect())
}

/// One architecture's layers: what happens inside the residual stack.
pub trait Layers<B: Backend>: Send + Sync {
    /// Attention of layer `il`, x [n × d] → [n × d], appending the batch's keys and values
    /// to `kv`; x is the residual stream (the layer applies its own norm).
    fn attention(&self, cfg: &DecoderConfig, b: &B, il: usize, x: &B::Act, batch: &Batch, kv: &mut B::Kv) -> B::Act;
    /// Feed-forward block of layer `il`, x [n × d] → [n × d] (its own norm included).
    fn feed_forward(&self, cfg: &DecoderConfig, b: &B, il: usize, x: &B::Act) -> B::Act;
    /// Mixture-of-experts models: tokens routed to each expert since load, per layer.
    fn routing_stats(&self) -> Vec<Vec<u64>> {
        Vec::new()
    }
    /// What the KV cache holds per token and layer (default: K and V of
    /// n_kv_heads · head_dim each, full attention everywhere).
    fn kv_layout(&self, cfg: &DecoderConfig) -> KvLayout {
        KvLayout { kv_dim: cfg.kv_dim(), windows: vec![None; cfg.n_layers], shared_v: false }
    }
}

/// down · (silu(gate · h) ⊙ up · h) over this rank's share of the hidden width: the rows
/// of gate and up and the columns of down of that share (Megatron's column- then
/// row-parallel pair). A rank may have no share when down has fewer quantization blocks
/// than there are ranks.
pub struct SwiGlu<B: Backend> {
    d: usize,
    /// gate, up [share × d] and down [d × share].
    share: Option<[B::Weight; 3]>,
}

impl<B: Backend> SwiGlu<B> {
    /// `blk.{il}.{gate,up,down}.weight`, of hidden width `ff`.
    pub(crate) fn load(ld: &Loader<B>, il: usize, names: [&str; 3], d: usize, ff: usize) -> Result<Self, EngineError> {
        let [gate, up, down] = names.map(|s| format!("blk.{il}.{s}.weight"));
        let share = ld.input_share(&down, ff)?;
        if share.is_empty() {
            return Ok(SwiGlu { d, share: None });
        }
        Ok(SwiGlu {
            d,
            share: Some([
                ld.weight_part(&gate, d, ff, Part::Rows(share.clone()))?,
                ld.weight_part(&up, d, ff, Part::Rows(share.clone()))?,
                ld.weight_part(&down, ff, d, Part::Cols(share))?,
            ]),
        })
    }

    /// h [n × d] → this rank's part of the output [n × d], before the sum over ranks.
    pub fn partial(&self, b: &B, h: &B::Act) -> B::Act {
        match &self.share {
            Some([gate, up, down]) => b.matmul(down, &Self::hidden(b, gate, up, h)),
            None => b.zeros(b.n_rows(h), self.d),
        }
    }

    /// h [n × d] → [n × d], summed over the ranks.
    pub fn reduced(&self, b: &B, h: &B::Act) -> B::Act {
        match &self.share {
            Some([gate, up, down]) => b.matmul_reduced(down, &Self::hidden(b, gate, up, h)),
            None => {
                let mut out = b.zeros(b.n_rows(h), self.d);
                b.all_reduce_sum(&mut out);
                out
            }
        }
    }

    /// silu(gate · h) ⊙ up · h: [n × share].
    fn hidden(b: &B, gate: &B::Weight, up: &B::Weight, h: &B::Act) -> B::Act {
        let [mut g, u] = b.matmuls([gate, up], h);
        b.swiglu(&mut g, &u);
        g
    }
}

/// SwiGLU feed-forward: down · (silu(gate · h) ⊙ up · h), h = rms_norm(x).
pub struct DenseFfn<B: Backend> {
    norm: B::Vector,
    ffn: SwiGlu<B>,
}

impl<B: Backend> DenseFfn<B> {
    pub(crate) fn load(ld: &Loader<B>, cfg: &DecoderConfig, il: usize) -> Result<DenseFfn<B>, EngineError> {
        let (d, ff) = (cfg.n_embd, cfg.dense_ff()?);
        Ok(DenseFfn {
            norm: ld.vector(&format!("blk.{il}.ffn_norm.weight"), d)?,
            ffn: SwiGlu::load(ld, il, ["ffn_gate", "ffn_up", "ffn_down"], d, ff)?,
        })
    }

    /// x [n × d] → [n × d].
    pub fn forward(&self, cfg: &DecoderConfig, b: &B, x: &B::Act) -> B::Act {
        let h = b.rms_norm(x, &self.norm, cfg.rms_eps);
        self.ffn.reduced(b, &h)
    }
}

/// A decoder-only transformer: embeddings, `L`'s layers, the output norm and head.
pub struct Decoder<B: Backend, L> {
    pub cfg: DecoderConfig,
    info: ModelInfo,
    tok_embd: B::Weight,
    /// `output.weight` (this rank's vocabulary rows under tensor parallelism), or None
    /// when it is `tok_embd` itself.
    output: Option<B::Weight>,
    output_norm: B::Vector,
    layers: L,
}

impl<B: Backend, L: Layers<B>> Decoder<B, L> {
    /// Reads the configuration, then the layers `load_layers` builds, then the rest.
    pub(crate) fn load(
        backend: &B,
        file: &Arc<Gguf>,
        arch: &'static str,
        load_layers: impl FnOnce(&Loader<B>, &DecoderConfig) -> Result<L, EngineError>,
    ) -> Result<Decoder<B, L>, EngineError> {
        let mut cfg = DecoderConfig::from_gguf(file, arch)?;
        let ld = Loader { backend, file };
        let (rank, ranks) = ld.shard();
        cfg.heads = split_heads(cfg.n_heads, cfg.n_kv_heads, rank, ranks)?;
        let (tok_embd, output) = ld.embeddings_and_head(cfg.n_embd, cfg.n_vocab)?;
        let output_norm = ld.vector("output_norm.weight", cfg.n_embd)?;
        let layers = load_layers(&ld, &cfg)?;
        // From here on the configuration describes this rank's heads.
        (cfg.n_heads, cfg.n_kv_heads) = (cfg.heads.q.len(), cfg.heads.kv.len());
        let info = ModelInfo {
            architecture: arch.into(),
            n_vocab: cfg.n_vocab,
            n_embd: cfg.n_embd,
            n_layers: cfg.n_layers,
            context_length: cfg.context_length,
            n_params: count_params(file),
            rank_weight_bytes: Vec::new(),
        };
        Ok(Decoder { cfg, info, tok_embd, output, output_norm, layers })
    }

    /// A pipeline stage's part (the whole model by default): the embeddings (or `input`,
    /// the hidden states entering its layers), its `layers` (after the model's last, only
    /// the rows that want output remain), and the output norm when `normalize`.
    fn hidden(
        &self,
        b: &B,
        batch: &Batch,
        kv: &mut B::Kv,
        (layers, input, normalize): (Range<usize>, Option<Vec<f32>>, bool),
    ) -> Result<B::Act, EngineError> {
        let cfg = &self.cfg;
        let out_rows = batch.output_rows();
        let mut x = match input {
            None => b.embed(&self.tok_embd, &batch.tokens, 1.0)?, // [n × d]
            // All the batch's rows, or only those that want output after the last layer.
            Some(h) => b.from_host(h.len() / cfg.n_embd.max(1), cfg.n_embd, h),
        };
        for il in layers {
            let mut attn = self.layers.attention(cfg, b, il, &x, batch, kv);
            if il + 1 == cfg.n_layers {
                // Only the rows that want output go through the last FFN and the head.
                attn = b.select_rows(&attn, &out_rows);
                x = b.select_rows(&x, &out_rows);
            }
            b.add(&mut attn, &x);
            let mut ffn = self.layers.feed_forward(cfg, b, il, &attn);
            b.add(&mut ffn, &attn);
            x = ffn;
        }
        Ok(if normalize { b.rms_norm(&x, &self.output_norm, cfg.rms_eps) } else { x })
    }

    /// The logits of the normalized hidden states x [n_out × d].
    fn logits(&self, b: &B, batch: &Batch, x: &B::Act) -> Result<Logits, EngineError> {
        let head = self.output.as_ref().unwrap_or(&self.tok_embd);
        // [n_out × n_vocab]: under tensor parallelism each rank's vocabulary, gathered.
        let data = b.take_to_host(b.all_gather_cols(b.matmul(head, x)));
        if let Some(e) = b.take_tp_error() {
            return Err(e);
        }
        Ok(Logits { rows: batch.output_rows(), n_vocab: self.cfg.n_vocab, data })
    }
}

impl<B: Backend, L: Layers<B>> Architecture<B> for Decoder<B, L> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn kv_layout(&self) -> KvLayout {
        self.layers.kv_layout(&self.cfg)
    }

    fn compute(&self, b: &B, batch: &Batch, kv: &mut B::Kv) -> Result<Logits, EngineError> {
        let x = self.hidden(b, batch, kv, (0..self.cfg.n_layers, None, true))?; // [n_out × d]
        self.logits(b, batch, &x)
    }

    fn compute_hidden(&self, b: &B, batch: &Batch, kv: &mut B::Kv) -> Result<Vec<f32>, EngineError> {
        host_or_tp_error(b, self.hidden(b, batch, kv, (0..self.cfg.n_layers, None, true))?)
    }

    fn compute_stage(
        &self,
        b: &B,
        batch: &Batch,
        kv: &mut B::Kv,
        layers: Range<usize>,
        input: Option<Vec<f32>>,
        end: StageEnd,
    ) -> Result<StageOutput, EngineError> {
        let x = self.hidden(b, batch, kv, (layers, input, end != StageEnd::Handoff))?;
        if end == StageEnd::Logits {
            return self.logits(b, batch, &x).map(StageOutput::Logits);
        }
        host_or_tp_error(b, x).map(StageOutput::Hidden)
    }

    fn routing_stats(&self) -> Vec<Vec<u64>> {
        self.layers.routing_stats()
    }
}
