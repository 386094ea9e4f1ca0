//! Llama (1, 2, 3 and the many models that share its shape), as llama.cpp runs it
//! (`src/models/llama.cpp`).
//!
//! Per layer: RMSNorm → Q, K, V → RoPE (adjacent pairs; Llama 3's per-pair frequency
//! divisors from `rope_freqs.weight` when the file has them) → grouped-query attention
//! scaled by 1/√head_dim → output projection → residual → RMSNorm → SwiGLU FFN →
//! residual. The output projection is tied to the embeddings unless the file has
//! `output.weight`.

use super::decoder::{Decoder, DecoderConfig, DenseFfn, Layers};
use super::{Batch, Layered, Loader};
use crate::backend::Backend;
use crate::gguf::Gguf;
use crate::parallel::Part;
use crate::EngineError;
use std::sync::Arc;

pub type Llama<B> = Decoder<B, LlamaLayers<B>>;

struct Attention<B: Backend> {
    norm: B::Vector,
    wq: B::Weight,
    wk: B::Weight,
    wv: B::Weight,
    wo: B::Weight,
}

pub struct LlamaLayers<B: Backend> {
    attention: Layered<Attention<B>>,
    ffn: Layered<DenseFfn<B>>,
    /// Llama 3's per-pair RoPE frequency divisors [head_dim / 2].
    rope_freqs: Option<B::Vector>,
}

pub fn load<B: Backend>(backend: &B, file: &Arc<Gguf>) -> Result<Llama<B>, EngineError> {
    Decoder::load(backend, file, "llama", |ld, cfg| {
        if cfg.yarn.is_some() {
            return Err(EngineError::BadValue {
                key: cfg.key("rope.scaling.type"),
                value: "yarn".into(),
                why: "YaRN is supported with NEOX RoPE only, not Llama's adjacent pairs",
            });
        }
        let rope_freqs = match file.tensor("rope_freqs.weight") {
            Some(_) => Some(ld.vector("rope_freqs.weight", cfg.head_dim / 2)?),
            None => None,
        };
        Ok(LlamaLayers {
            attention: ld.per_layer(cfg.n_layers, |il| load_attention(ld, cfg, il))?,
            ffn: ld.per_layer(cfg.n_layers, |il| DenseFfn::load(ld, cfg, il))?,
            rope_freqs,
        })
    })
}

fn load_attention<B: Backend>(ld: &Loader<B>, cfg: &DecoderConfig, il: usize) -> Result<Attention<B>, EngineError> {
    let n = |s: &str| format!("blk.{il}.{s}.weight");
    let d = cfg.n_embd;
    Ok(Attention {
        norm: ld.vector(&n("attn_norm"), d)?,
        wq: ld.weight_part(&n("attn_q"), d, cfg.q_dim(), Part::Rows(cfg.q_rows()))?,
        wk: ld.weight_part(&n("attn_k"), d, cfg.kv_dim(), Part::Rows(cfg.kv_rows()))?,
        wv: ld.weight_part(&n("attn_v"), d, cfg.kv_dim(), Part::Rows(cfg.kv_rows()))?,
        wo: ld.weight_part(&n("attn_output"), cfg.q_dim(), d, Part::Cols(cfg.q_rows()))?,
    })
}

impl<B: Backend> Layers<B> for LlamaLayers<B> {
    fn attention(&self, cfg: &DecoderConfig, b: &B, il: usize, x: &B::Act, batch: &Batch, kv: &mut B::Kv) -> B::Act {
        let l = &self.attention[il];
        let h = b.rms_norm(x, &l.norm, cfg.rms_eps);
        // q [n × n_heads·hd], k and v [n × n_kv_heads·hd]
        let [mut q, mut k, v] = b.matmuls([&l.wq, &l.wk, &l.wv], &h);
        let pos = &batch.layout.positions;
        let freqs = self.rope_freqs.as_ref();
        b.rope_norm(&mut q, pos, cfg.head_dim, cfg.rope_base, cfg.rope_freq_scale, freqs);
        b.rope_norm(&mut k, pos, cfg.head_dim, cfg.rope_base, cfg.rope_freq_scale, freqs);
        let a = b.attention(kv, il, &batch.layout, &q, &k, &v, cfg.attn_shape(), None); // [n × n_heads·hd]
        b.matmul_reduced(&l.wo, &a) // [n × d]
    }

    fn feed_forward(&self, cfg: &DecoderConfig, b: &B, il: usize, x: &B::Act) -> B::Act {
        self.ffn[il].forward(cfg, b, x)
    }
}
