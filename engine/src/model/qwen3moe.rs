//! Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B), as llama.cpp runs it
//! (`src/models/qwen3moe.cpp`).
//!
//! Qwen3's attention (QK-norm, NEOX RoPE) with a mixture-of-experts FFN in every layer:
//! h = rms_norm(x); a router [n_expert × d] scores the experts, a softmax over all of
//! them picks each token's top k (`expert_used_count`), whose probabilities are
//! renormalized to sum to 1 (norm_topk_prob); the output is Σ w_e · SwiGLU_e(h). No
//! shared expert.

use super::decoder::{Decoder, DecoderConfig, Layers};
use super::moe::{expert_counts, Activation, Gating, MoeFfn, MoeSpec, Routing};
use super::qwen3::Attention;
use super::Batch;
use super::Layered;
use crate::backend::Backend;
use crate::gguf::Gguf;
use crate::EngineError;
use std::sync::Arc;

pub type Qwen3Moe<B> = Decoder<B, Qwen3MoeLayers<B>>;

pub struct Qwen3MoeLayers<B: Backend> {
    attention: Layered<Attention<B>>,
    ffn: Layered<MoeFfn<B>>,
    routing: Routing,
}

pub fn load<B: Backend>(backend: &B, file: &Arc<Gguf>) -> Result<Qwen3Moe<B>, EngineError> {
    Decoder::load(backend, file, "qwen3moe", |ld, cfg| {
        let (routing, n_ff_exp) = read_routing(file, cfg)?;
        let spec = MoeSpec {
            norm: "ffn_norm",
            dims: [cfg.n_embd, n_ff_exp],
            act: Activation::SwiGlu,
            biases: false,
            selection_bias: false,
            shared_ff: None,
        };
        let load_ffn = |il| MoeFfn::load(ld, il, spec, &routing);
        Ok(Qwen3MoeLayers {
            attention: ld.per_layer(cfg.n_layers, |il| Attention::load(ld, cfg, il))?,
            ffn: ld.per_layer(cfg.n_layers, load_ffn)?,
            routing,
        })
    })
}

/// Expert count, experts per token and the expert FFN width
/// (`expert_feed_forward_length`, else `feed_forward_length / expert_used_count`).
fn read_routing(g: &Gguf, cfg: &DecoderConfig) -> Result<(Routing, usize), EngineError> {
    let [n_expert, n_used, n_ff_exp] = expert_counts(g, cfg, |n_used| Ok(cfg.dense_ff()? / n_used))?;
    let routing = Routing { n_expert, n_used, gating: Gating::Softmax, normalize: true, scale: 1.0, groups: None };
    Ok((routing, n_ff_exp))
}

impl<B: Backend> Layers<B> for Qwen3MoeLayers<B> {
    fn routing_stats(&self) -> Vec<Vec<u64>> {
        self.ffn.iter().map(MoeFfn::routing_stats).collect()
    }

    fn attention(&self, cfg: &DecoderConfig, b: &B, il: usize, x: &B::Act, batch: &Batch, kv: &mut B::Kv) -> B::Act {
        self.attention[il].forward(cfg, b, il, x, batch, kv)
    }

    fn feed_forward(&self, cfg: &DecoderConfig, b: &B, il: usize, x: &B::Act) -> B::Act {
        self.ffn[il].forward(b, x, cfg.rms_eps, &self.routing)
    }
}
