//! Qwen2 and Qwen2.5 (dense), as llama.cpp runs them (`src/models/qwen2.cpp`).
//!
//! Llama's layer with two changes: Q, K and V have biases, and RoPE rotates the two
//! halves of each head (NEOX style) instead of adjacent pairs. Small Qwen models tie the
//! output projection to the embeddings.

use super::decoder::{Decoder, DecoderConfig, DenseFfn, Layers};
use super::{Batch, Layered, Loader};
use crate::backend::Backend;
use crate::gguf::Gguf;
use crate::parallel::Part;
use crate::EngineError;
use std::sync::Arc;

pub type Qwen2<B> = Decoder<B, Qwen2Layers<B>>;

/// Qwen2's attention block (gpt-oss's too, which adds an output bias and sinks).
pub struct Attention<B: Backend> {
    norm: B::Vector,
    wq: B::Weight,
    wk: B::Weight,
    wv: B::Weight,
    /// Biases of Q [q_dim], K and V [kv_dim].
    bq: B::Vector,
    bk: B::Vector,
    bv: B::Vector,
    wo: B::Weight,
}

impl<B: Backend> Attention<B> {
    pub(crate) fn load(ld: &Loader<B>, cfg: &DecoderConfig, il: usize) -> Result<Attention<B>, EngineError> {
        let w = |s: &str| format!("blk.{il}.{s}.weight");
        let bias = |s: &str| format!("blk.{il}.{s}.bias");
        let (d, q, kv) = (cfg.n_embd, cfg.q_dim(), cfg.kv_dim());
        Ok(Attention {
            norm: ld.vector(&w("attn_norm"), d)?,
            wq: ld.weight_part(&w("attn_q"), d, q, Part::Rows(cfg.q_rows()))?,
            wk: ld.weight_part(&w("attn_k"), d, kv, Part::Rows(cfg.kv_rows()))?,
            wv: ld.weight_part(&w("attn_v"), d, kv, Part::Rows(cfg.kv_rows()))?,
            bq: ld.vector_part(&bias("attn_q"), q, cfg.q_rows())?,
            bk: ld.vector_part(&bias("attn_k"), kv, cfg.kv_rows())?,
            bv: ld.vector_part(&bias("attn_v"), kv, cfg.kv_rows())?,
            wo: ld.weight_part(&w("attn_output"), q, d, Part::Cols(cfg.q_rows()))?,
        })
    }

    /// x [n × d] → q [n × n_heads·hd], k and v [n × n_kv_heads·hd], biases added.
    pub fn project(&self, cfg: &DecoderConfig, b: &B, x: &B::Act) -> [B::Act; 3] {
        let h = b.rms_norm(x, &self.norm, cfg.rms_eps);
        let [mut q, mut k, mut v] = b.matmuls([&self.wq, &self.wk, &self.wv], &h);
        b.add_bias(&mut q, &self.bq);
        b.add_bias(&mut k, &self.bk);
        b.add_bias(&mut v, &self.bv);
        [q, k, v]
    }

    /// The output projection: [n × n_heads·hd] → [n × d], summed over the ranks.
    pub fn output(&self, b: &B, a: &B::Act) -> B::Act {
        b.matmul_reduced(&self.wo, a)
    }
}

pub struct Qwen2Layers<B: Backend> {
    attention: Layered<Attention<B>>,
    ffn: Layered<DenseFfn<B>>,
}

pub fn load<B: Backend>(backend: &B, file: &Arc<Gguf>) -> Result<Qwen2<B>, EngineError> {
    Decoder::load(backend, file, "qwen2", |ld, cfg| {
        Ok(Qwen2Layers {
            attention: ld.per_layer(cfg.n_layers, |il| Attention::load(ld, cfg, il))?,
            ffn: ld.per_layer(cfg.n_layers, |il| DenseFfn::load(ld, cfg, il))?,
        })
    })
}

impl<B: Backend> Layers<B> for Qwen2Layers<B> {
    fn attention(&self, cfg: &DecoderConfig, b: &B, il: usize, x: &B::Act, batch: &Batch, kv: &mut B::Kv) -> B::Act {
        let l = &self.attention[il];
        let [mut q, mut k, v] = l.project(cfg, b, x);
        let pos = &batch.layout.positions;
        cfg.rope_neox(b, &mut q, pos);
        cfg.rope_neox(b, &mut k, pos);
        let a = b.attention(kv, il, &batch.layout, &q, &k, &v, cfg.attn_shape(), None); // [n × n_heads·hd]
        l.output(b, &a)
    }

    fn feed_forward(&self, cfg: &DecoderConfig, b: &B, il: usize, x: &B::Act) -> B::Act {
        self.ffn[il].forward(cfg, b, x)
    }
}
