//! Qwen3 (dense), as llama.cpp runs it (`src/models/qwen3.cpp`).
//!
//! Llama's layer with QK-norm: after the Q and K projections each head is RMS-normalized
//! with its own learned weight (`attn_q_norm`, `attn_k_norm`, [head_dim]) before NEOX
//! RoPE. No biases. Qwen3-MoE (`qwen3moe.rs`) shares this attention.

use super::decoder::{Decoder, DecoderConfig, DenseFfn, Layers};
use super::{Batch, Layered, Loader};
use crate::backend::Backend;
use crate::gguf::Gguf;
use crate::parallel::Part;
use crate::EngineError;
use std::sync::Arc;

pub type Qwen3<B> = Decoder<B, Qwen3Layers<B>>;

/// Qwen3's attention block (also Qwen3-MoE's).
pub struct Attention<B: Backend> {
    norm: B::Vector,
    wq: B::Weight,
    wk: B::Weight,
    wv: B::Weight,
    /// Per-head RMSNorm weights [head_dim].
    q_norm: B::Vector,
    k_norm: B::Vector,
    wo: B::Weight,
}

impl<B: Backend> Attention<B> {
    pub(crate) fn load(ld: &Loader<B>, cfg: &DecoderConfig, il: usize) -> Result<Attention<B>, EngineError> {
        let n = |s: &str| format!("blk.{il}.{s}.weight");
        let (d, hd) = (cfg.n_embd, cfg.head_dim);
        Ok(Attention {
            norm: ld.vector(&n("attn_norm"), d)?,
            wq: ld.weight_part(&n("attn_q"), d, cfg.q_dim(), Part::Rows(cfg.q_rows()))?,
            wk: ld.weight_part(&n("attn_k"), d, cfg.kv_dim(), Part::Rows(cfg.kv_rows()))?,
            wv: ld.weight_part(&n("attn_v"), d, cfg.kv_dim(), Part::Rows(cfg.kv_rows()))?,
            q_norm: ld.vector(&n("attn_q_norm"), hd)?,
            k_norm: ld.vector(&n("attn_k_norm"), hd)?,
            wo: ld.weight_part(&n("attn_output"), cfg.q_dim(), d, Part::Cols(cfg.q_rows()))?,
        })
    }

    /// x [n × d] → [n × d] for layer `il`.
    pub fn forward(&self, cfg: &DecoderConfig, b: &B, il: usize, x: &B::Act, batch: &Batch, kv: &mut B::Kv) -> B::Act {
        let h = b.rms_norm(x, &self.norm, cfg.rms_eps);
        // q [n × n_heads·hd], k and v [n × n_kv_heads·hd]
        let [q, k, v] = b.matmuls([&self.wq, &self.wk, &self.wv], &h);
        let mut q = b.rms_norm(&q, &self.q_norm, cfg.rms_eps); // per head
        let mut k = b.rms_norm(&k, &self.k_norm, cfg.rms_eps);
        let pos = &batch.layout.positions;
        cfg.rope_neox(b, &mut q, pos);
        cfg.rope_neox(b, &mut k, pos);
        let a = b.attention(kv, il, &batch.layout, &q, &k, &v, cfg.attn_shape(), None); // [n × n_heads·hd]
        b.matmul_reduced(&self.wo, &a) // [n × d]
    }
}

pub struct Qwen3Layers<B: Backend> {
    attention: Layered<Attention<B>>,
    ffn: Layered<DenseFfn<B>>,
}

pub fn load<B: Backend>(backend: &B, file: &Arc<Gguf>) -> Result<Qwen3<B>, EngineError> {
    Decoder::load(backend, file, "qwen3", |ld, cfg| {
        Ok(Qwen3Layers {
            attention: ld.per_layer(cfg.n_layers, |il| Attention::load(ld, cfg, il))?,
            ffn: ld.per_layer(cfg.n_layers, |il| DenseFfn::load(ld, cfg, il))?,
        })
    })
}

impl<B: Backend> Layers<B> for Qwen3Layers<B> {
    fn attention(&self, cfg: &DecoderConfig, b: &B, il: usize, x: &B::Act, batch: &Batch, kv: &mut B::Kv) -> B::Act {
        self.attention[il].forward(cfg, b, il, x, batch, kv)
    }

    fn feed_forward(&self, cfg: &DecoderConfig, b: &B, il: usize, x: &B::Act) -> B::Act {
        self.ffn[il].forward(cfg, b, x)
    }
}
