//! gpt-oss (gpt-oss-20b, gpt-oss-120b), as llama.cpp runs it (`src/models/openai-moe.cpp`).
//!
//! Per layer: RMSNorm → Q, K, V with biases → NEOX RoPE with YaRN scaling → attention
//! scaled by 1/√head_dim with a learned sink logit per head (it joins the softmax's
//! normalization, with no value), over a 128-token sliding window on alternate layers
//! (even ones, by default) → output projection with bias → residual → RMSNorm → mixture of
//! experts → residual. The router (with bias) keeps each token's top-k logits and softmaxes
//! over just those; each expert is a clamped SwiGLU (α 1.702, limit 7) with biases, its
//! weights MXFP4 in released files. The output projection is untied.

use super::decoder::{swa_pattern, Decoder, DecoderConfig, Layers};
use super::moe::{expert_counts, Activation, Gating, MoeFfn, MoeSpec, Routing};
use super::{qwen2, required, Batch, Layered, Loader};
use crate::backend::{Backend, Yarn};
use crate::gguf::Gguf;
use crate::kv::KvLayout;
use crate::EngineError;
use std::sync::Arc;

pub type GptOss<B> = Decoder<B, GptOssLayers<B>>;

/// The clamped SwiGLU's constants (llama.cpp hard-codes them too).
const SWIGLU_ALPHA: f32 = 1.702;
const SWIGLU_LIMIT: f32 = 7.0;

/// Qwen2's biased Q/K/V and output projections, plus:
struct Attention<B: Backend> {
    qkvo: qwen2::Attention<B>,
    /// The output bias [d].
    bo: B::Vector,
    /// One sink logit per head [n_heads] (this rank's).
    sinks: B::Vector,
}

pub struct GptOssLayers<B: Backend> {
    attention: Layered<Attention<B>>,
    ffn: Layered<MoeFfn<B>>,
    routing: Routing,
    /// Per layer: its sliding window (None: full attention).
    windows: Vec<Option<u32>>,
    /// RoPE of sliding-window layers: their base (`rope.freq_base_swa`, default the
    /// global one) and YaRN parameters, which depend on it.
    swa_rope_base: f32,
    swa_yarn: Option<Yarn>,
}

pub fn load<B: Backend>(backend: &B, file: &Arc<Gguf>) -> Result<GptOss<B>, EngineError> {
    Decoder::load(backend, file, "gpt-oss", |ld, cfg| {
        let (routing, n_ff_exp) = read_routing(file, cfg)?;
        let swa_rope_base = file.get_f32(&cfg.key("rope.freq_base_swa"))?.unwrap_or(cfg.rope_base);
        let swa_yarn = cfg.yarn.map(|_| {
            let factor = 1.0 / cfg.rope_freq_scale;
            let orig = file.get_u32(&cfg.key("rope.scaling.original_context_length")).ok().flatten();
            Yarn::new(cfg.head_dim, swa_rope_base, factor, orig.map_or(cfg.context_length, |v| v as usize))
        });
        let spec = MoeSpec {
            norm: "post_attention_norm",
            dims: [cfg.n_embd, n_ff_exp],
            act: Activation::SwiGluOai { alpha: SWIGLU_ALPHA, limit: SWIGLU_LIMIT },
            biases: true,
            selection_bias: false,
            shared_ff: None,
        };
        let load_ffn = |il| MoeFfn::load(ld, il, spec, &routing);
        Ok(GptOssLayers {
            attention: ld.per_layer(cfg.n_layers, |il| load_attention(ld, cfg, il))?,
            ffn: ld.per_layer(cfg.n_layers, load_ffn)?,
            routing,
            windows: read_windows(file, cfg)?,
            swa_rope_base,
            swa_yarn,
        })
    })
}

fn load_attention<B: Backend>(ld: &Loader<B>, cfg: &DecoderConfig, il: usize) -> Result<Attention<B>, EngineError> {
    Ok(Attention {
        qkvo: qwen2::Attention::load(ld, cfg, il)?,
        bo: ld.vector(&format!("blk.{il}.attn_output.bias"), cfg.n_embd)?,
        sinks: ld.vector_part(&format!("blk.{il}.attn_sinks.weight"), cfg.n_heads, cfg.heads.q.clone())?,
    })
}

/// Expert count, experts per token and the expert FFN width.
fn read_routing(g: &Gguf, cfg: &DecoderConfig) -> Result<(Routing, usize), EngineError> {
    let missing = |_| Err(EngineError::MissingKey(cfg.key("expert_feed_forward_length")));
    let [n_expert, n_used, n_ff_exp] = expert_counts(g, cfg, missing)?;
    let routing =
        Routing { n_expert, n_used, gating: Gating::SoftmaxOverSelected, normalize: false, scale: 1.0, groups: None };
    Ok((routing, n_ff_exp))
}

/// `attention.sliding_window` on the layers `attention.sliding_window_pattern` marks
/// (default: period 2, the even layers).
fn read_windows(g: &Gguf, cfg: &DecoderConfig) -> Result<Vec<Option<u32>>, EngineError> {
    let key = cfg.key("attention.sliding_window");
    let window = required(g.get_u32(&key), &key)?;
    if window == 0 {
        return Err(EngineError::BadValue { key, value: "0".into(), why: "must be > 0" });
    }
    let is_swa = swa_pattern(g, &cfg.key("attention.sliding_window_pattern"), cfg.n_layers, 2)?;
    Ok(is_swa.into_iter().map(|swa| swa.then_some(window)).collect())
}

impl<B: Backend> GptOssLayers<B> {
    /// NEOX RoPE with the base and YaRN parameters of layer `il`.
    fn rope(&self, cfg: &DecoderConfig, b: &B, il: usize, x: &mut B::Act, positions: &[u32]) {
        if self.windows[il].is_none() {
            return cfg.rope_neox(b, x, positions);
        }
        match &self.swa_yarn {
            Some(yarn) => b.rope_neox_yarn(x, positions, cfg.head_dim, self.swa_rope_base, yarn),
            None => b.rope_neox(x, positions, cfg.head_dim, self.swa_rope_base, cfg.rope_freq_scale),
        }
    }
}

impl<B: Backend> Layers<B> for GptOssLayers<B> {
    fn attention(&self, cfg: &DecoderConfig, b: &B, il: usize, x: &B::Act, batch: &Batch, kv: &mut B::Kv) -> B::Act {
        let l = &self.attention[il];
        let [mut q, mut k, v] = l.qkvo.project(cfg, b, x); // [n × n_heads·hd], [n × n_kv_heads·hd] ×2
        let pos = &batch.layout.positions;
        self.rope(cfg, b, il, &mut q, pos);
        self.rope(cfg, b, il, &mut k, pos);
        let shape = crate::backend::AttnShape { window: self.windows[il], ..cfg.attn_shape() };
        let a = b.attention(kv, il, &batch.layout, &q, &k, &v, shape, Some(&l.sinks)); // [n × n_heads·hd]
        let mut o = l.qkvo.output(b, &a); // [n × d]
        b.add_bias(&mut o, &l.bo); // after the sum over ranks: once
        o
    }

    fn feed_forward(&self, cfg: &DecoderConfig, b: &B, il: usize, x: &B::Act) -> B::Act {
        self.ffn[il].forward(b, x, cfg.rms_eps, &self.routing)
    }

    fn routing_stats(&self) -> Vec<Vec<u64>> {
        self.ffn.iter().map(MoeFfn::routing_stats).collect()
    }

    fn kv_layout(&self, cfg: &DecoderConfig) -> KvLayout {
        KvLayout { kv_dim: cfg.kv_dim(), windows: self.windows.clone(), shared_v: false }
    }
}
