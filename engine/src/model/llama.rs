//! Llama (1, 2, 3 and the many models that share its shape), as llama.cpp runs it
//! (`src/models/llama.cpp`).
//!
//! Per layer: RMSNorm → Q, K, V → RoPE (adjacent pairs; Llama 3's per-pair frequency
//! divisors from `rope_freqs.weight` when the file has them) → grouped-query attention
//! scaled by 1/√head_dim → output projection → residual → RMSNorm → SwiGLU FFN →
//! residual. The output projection is tied to the embeddings unless the file has
//! `output.weight`.

use super::{count_params, required, Architecture, Batch, Loader, Logits, ModelInfo};
use crate::backend::{AttnShape, Backend};
use crate::gguf::Gguf;
use crate::kv::KvLayout;
use crate::EngineError;
use std::sync::Arc;

/// Hyper-parameters read from the GGUF metadata (`llama.*`).
#[derive(Clone, Debug)]
pub struct LlamaConfig {
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub rms_eps: f32,
    pub context_length: usize,
    pub rope_base: f32,
    pub rope_freq_scale: f32,
}

impl LlamaConfig {
    pub fn from_gguf(g: &Gguf) -> Result<LlamaConfig, EngineError> {
        let key = |k: &str| format!("llama.{k}");
        let req = |k: &str| -> Result<usize, EngineError> { Ok(required(g.get_u32(&key(k)), &key(k))? as usize) };
        let n_embd = req("embedding_length")?;
        let n_layers = req("block_count")?;
        // Each layer has 9 tensors: a count the file cannot back is refused before any
        // per-layer allocation.
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
        if n_rot != head_dim {
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
        let cfg = LlamaConfig {
            n_vocab,
            n_embd,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            n_ff: req("feed_forward_length")?,
            rms_eps: required(g.get_f32(&key("attention.layer_norm_rms_epsilon")), "rms epsilon")?,
            context_length: req("context_length")?,
            rope_base: g.get_f32(&key("rope.freq_base"))?.unwrap_or(10_000.0),
            rope_freq_scale: linear_rope_scale(g, &key("rope.scaling.type"), &key("rope.scaling.factor"))?,
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// Rejects sizes the forward pass cannot run with.
    fn check(&self) -> Result<(), EngineError> {
        let bad = |key: &str, value: usize, why: &'static str| {
            Err(EngineError::BadValue { key: format!("llama.{key}"), value: value.to_string(), why })
        };
        if self.n_embd == 0 || self.n_layers == 0 || self.n_ff == 0 || self.context_length == 0 {
            return bad("embedding_length/block_count/feed_forward_length/context_length", 0, "must be > 0");
        }
        if self.n_heads == 0 || self.n_kv_heads == 0 || !self.n_heads.is_multiple_of(self.n_kv_heads) {
            return bad("attention.head_count_kv", self.n_kv_heads, "must divide attention.head_count");
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad("attention.key_length", self.head_dim, "must be even and > 0");
        }
        Ok(())
    }

    fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
}

/// `rope.scaling.type` none or linear (factor f → frequencies scaled by 1/f); Llama 3's
/// scaling comes as `rope_freqs.weight` instead.
fn linear_rope_scale(g: &Gguf, type_key: &str, factor_key: &str) -> Result<f32, EngineError> {
    let factor = g.get_f32(factor_key)?.unwrap_or(1.0);
    match g.get_str(type_key)?.unwrap_or("none") {
        "none" => Ok(1.0),
        "linear" if factor > 0.0 && factor.is_finite() => Ok(1.0 / factor),
        "linear" => {
            Err(EngineError::BadValue { key: factor_key.into(), value: factor.to_string(), why: "must be > 0" })
        }
        other => Err(EngineError::BadValue {
            key: type_key.into(),
            value: other.to_string(),
            why: "only linear RoPE scaling (or Llama 3's rope_freqs) is supported",
        }),
    }
}

struct Layer<B: Backend> {
    attn_norm: B::Vector,
    wq: B::Weight,
    wk: B::Weight,
    wv: B::Weight,
    wo: B::Weight,
    ffn_norm: B::Vector,
    w_gate: B::Weight,
    w_up: B::Weight,
    w_down: B::Weight,
}

pub struct Llama<B: Backend> {
    pub cfg: LlamaConfig,
    info: ModelInfo,
    tok_embd: B::Weight,
    /// `output.weight`, or None when tied to `tok_embd`.
    output: Option<B::Weight>,
    output_norm: B::Vector,
    /// Llama 3's per-pair RoPE frequency divisors [head_dim / 2].
    rope_freqs: Option<B::Vector>,
    layers: Vec<Layer<B>>,
}

fn load_layer<B: Backend>(ld: &Loader<B>, cfg: &LlamaConfig, il: usize) -> Result<Layer<B>, EngineError> {
    let n = |s: &str| format!("blk.{il}.{s}.weight");
    let d = cfg.n_embd;
    Ok(Layer {
        attn_norm: ld.vector(&n("attn_norm"), d)?,
        wq: ld.weight(&n("attn_q"), d, cfg.q_dim())?,
        wk: ld.weight(&n("attn_k"), d, cfg.kv_dim())?,
        wv: ld.weight(&n("attn_v"), d, cfg.kv_dim())?,
        wo: ld.weight(&n("attn_output"), cfg.q_dim(), d)?,
        ffn_norm: ld.vector(&n("ffn_norm"), d)?,
        w_gate: ld.weight(&n("ffn_gate"), d, cfg.n_ff)?,
        w_up: ld.weight(&n("ffn_up"), d, cfg.n_ff)?,
        w_down: ld.weight(&n("ffn_down"), cfg.n_ff, d)?,
    })
}

impl<B: Backend> Llama<B> {
    pub fn load(backend: &B, file: &Arc<Gguf>) -> Result<Llama<B>, EngineError> {
        let cfg = LlamaConfig::from_gguf(file)?;
        let ld = Loader { backend, file };
        let tok_embd = ld.weight("token_embd.weight", cfg.n_embd, cfg.n_vocab)?;
        let output = match file.tensor("output.weight") {
            Some(_) => Some(ld.weight("output.weight", cfg.n_embd, cfg.n_vocab)?),
            None => None,
        };
        let rope_freqs = match file.tensor("rope_freqs.weight") {
            Some(_) => Some(ld.vector("rope_freqs.weight", cfg.head_dim / 2)?),
            None => None,
        };
        let output_norm = ld.vector("output_norm.weight", cfg.n_embd)?;
        let layers = (0..cfg.n_layers).map(|il| load_layer(&ld, &cfg, il)).collect::<Result<Vec<_>, _>>()?;
        let info = ModelInfo {
            architecture: "llama".into(),
            n_vocab: cfg.n_vocab,
            n_embd: cfg.n_embd,
            n_layers: cfg.n_layers,
            context_length: cfg.context_length,
            n_params: count_params(file),
        };
        Ok(Llama { cfg, info, tok_embd, output, output_norm, rope_freqs, layers })
    }

    /// Attention of layer `il`: x [n × d] → [n × d].
    fn attention(&self, b: &B, il: usize, x: &B::Act, batch: &Batch, kv: &mut B::Kv) -> B::Act {
        let (cfg, l) = (&self.cfg, &self.layers[il]);
        let h = b.rms_norm(x, &l.attn_norm, cfg.rms_eps);
        // q [n × n_heads·hd], k and v [n × n_kv_heads·hd]
        let [mut q, mut k, v] = b.matmuls([&l.wq, &l.wk, &l.wv], &h);
        let pos = &batch.layout.positions;
        let freqs = self.rope_freqs.as_ref();
        b.rope_norm(&mut q, pos, cfg.head_dim, cfg.rope_base, cfg.rope_freq_scale, freqs);
        b.rope_norm(&mut k, pos, cfg.head_dim, cfg.rope_base, cfg.rope_freq_scale, freqs);
        let shape = AttnShape {
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            window: None,
            scale: 1.0 / (cfg.head_dim as f32).sqrt(),
        };
        let a = b.attention(kv, il, &batch.layout, &q, &k, &v, shape); // [n × n_heads·hd]
        let mut o = b.matmul(&l.wo, &a); // [n × d]
        b.all_reduce_sum(&mut o);
        o
    }

    /// SwiGLU feed-forward of layer `il`: x [n × d] → [n × d].
    fn feed_forward(&self, b: &B, il: usize, x: &B::Act) -> B::Act {
        let l = &self.layers[il];
        let h = b.rms_norm(x, &l.ffn_norm, self.cfg.rms_eps);
        let [mut gate, up] = b.matmuls([&l.w_gate, &l.w_up], &h); // [n × n_ff] each
        b.swiglu(&mut gate, &up);
        let mut out = b.matmul(&l.w_down, &gate); // [n × d]
        b.all_reduce_sum(&mut out);
        out
    }

    /// The layers and the output norm: [n × d] hidden states of the rows that want output.
    fn hidden(&self, b: &B, batch: &Batch, kv: &mut B::Kv) -> Result<B::Act, EngineError> {
        let cfg = &self.cfg;
        let out_rows = batch.output_rows();
        let mut x = b.embed(&self.tok_embd, &batch.tokens, 1.0)?; // [n × d]
        for il in 0..cfg.n_layers {
            let mut attn = self.attention(b, il, &x, batch, kv);
            if il + 1 == cfg.n_layers {
                // Only the rows that want output go through the last FFN and the head.
                attn = b.select_rows(&attn, &out_rows);
                x = b.select_rows(&x, &out_rows);
            }
            b.add(&mut attn, &x);
            let mut ffn = self.feed_forward(b, il, &attn);
            b.add(&mut ffn, &attn);
            x = ffn;
        }
        Ok(b.rms_norm(&x, &self.output_norm, cfg.rms_eps))
    }
}

impl<B: Backend> Architecture<B> for Llama<B> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn kv_layout(&self) -> KvLayout {
        KvLayout { kv_dim: self.cfg.kv_dim(), windows: vec![None; self.cfg.n_layers] }
    }

    fn compute(&self, b: &B, batch: &Batch, kv: &mut B::Kv) -> Result<Logits, EngineError> {
        let x = self.hidden(b, batch, kv)?; // [n_out × d]
        let head = self.output.as_ref().unwrap_or(&self.tok_embd);
        let data = b.take_to_host(b.matmul(head, &x)); // [n_out × n_vocab]
        Ok(Logits { rows: batch.output_rows(), n_vocab: self.cfg.n_vocab, data })
    }

    fn compute_hidden(&self, b: &B, batch: &Batch, kv: &mut B::Kv) -> Result<Vec<f32>, EngineError> {
        Ok(b.take_to_host(self.hidden(b, batch, kv)?))
    }
}
