//! DeepSeek-V2/V3/V3.1 (`deepseek2`), as llama.cpp runs it with multi-head latent
//! attention (`src/models/deepseek2.cpp`, MLA files with split `attn_k_b`/`attn_v_b`).
//!
//! Attention (MLA, absorbed): each token is compressed to a latent c = rms_norm(W_kv_a·h)
//! [r = kv_lora_rank] plus one shared RoPE key k_pe [n_rot]; the cache holds only
//! [c ; k_pe] (r + n_rot values per token and layer) and each value is its c. Queries
//! come through a low-rank bottleneck (q_a → RMSNorm → q_b; V2-Lite has a plain wq), are
//! split per head into q_nope [nope] and q_pe [n_rot]; q_nope is absorbed into the latent
//! space by head h's W_k_b [r × nope], so head h attends with [W_k_b·q_nope ; rope(q_pe)]
//! to every [c ; rope(k_pe)] like multi-query attention, and its output [r] goes back to
//! value space through W_v_b [v_head × r]. RoPE is the normal (adjacent-pair) style with
//! YaRN; the attention scale is mscale²/√(nope + n_rot).
//!
//! FFN: the first `leading_dense_block_count` layers are dense SwiGLU; the rest are
//! mixture-of-experts with always-on shared experts, routed by a sigmoid (V3) or softmax
//! (V2) score, a selection bias (`exp_probs_b`), group-limited top-k, renormalized
//! weights and `expert_weights_scale`.

use super::decoder::{Decoder, DecoderConfig, DenseFfn, Layers};
use super::moe::{expert_counts, Activation, Gating, MoeFfn, MoeSpec, Routing};
use super::{required, Batch, Layered, Loader};
use crate::backend::{AttnShape, Backend, Yarn};
use crate::gguf::Gguf;
use crate::kv::KvLayout;
use crate::parallel::Part;
use crate::EngineError;
use std::sync::Arc;

pub type DeepSeek2<B> = Decoder<B, DeepSeek2Layers<B>>;

/// MLA sizes.
#[derive(Clone, Copy, Debug)]
struct Mla {
    /// Latent width (kv_lora_rank).
    rank: usize,
    /// Per head: the query/key part without RoPE, the RoPE part, the value width.
    nope: usize,
    rope: usize,
    v_head: usize,
}

/// Queries: through a low-rank bottleneck, or one matrix (V2-Lite).
enum QueryProj<B: Backend> {
    LowRank { a: B::Weight, norm: B::Vector, b: B::Weight },
    Full(B::Weight),
}

struct Attention<B: Backend> {
    norm: B::Vector,
    q: QueryProj<B>,
    /// [(rank + rope) × d]: the latent and the RoPE key.
    kv_a: B::Weight,
    kv_a_norm: B::Vector,
    /// Per head: W_k_b [rank × nope] and W_v_b [v_head × rank].
    k_b: Vec<B::Weight>,
    v_b: Vec<B::Weight>,
    wo: B::Weight,
}

enum Ffn<B: Backend> {
    Dense(DenseFfn<B>),
    Moe(Box<MoeFfn<B>>),
}

pub struct DeepSeek2Layers<B: Backend> {
    mla: Mla,
    attention: Layered<Attention<B>>,
    ffn: Layered<Ffn<B>>,
    routing: Routing,
    /// RoPE (YaRN where the file scales it) and the attention scale it implies.
    yarn: Yarn,
    kq_scale: f32,
}

pub fn load<B: Backend>(backend: &B, file: &Arc<Gguf>) -> Result<DeepSeek2<B>, EngineError> {
    Decoder::load(backend, file, "deepseek2", |ld, cfg| {
        let mla = read_mla(file, cfg)?;
        let (yarn, kq_scale) = rope_and_scale(file, cfg, &mla)?;
        let (routing, n_ff_exp, n_shared) = read_routing(file, cfg)?;
        let n_dense = file.get_u32(&cfg.key("leading_dense_block_count"))?.map_or(0, |v| v as usize);
        let spec = MoeSpec {
            norm: "ffn_norm",
            dims: [cfg.n_embd, n_ff_exp],
            act: Activation::SwiGlu,
            biases: false,
            // V3 has one; V2 does not (checked on the first MoE layer).
            selection_bias: file.tensor(&format!("blk.{n_dense}.exp_probs_b.bias")).is_some(),
            shared_ff: (n_shared > 0).then_some(n_ff_exp * n_shared),
        };
        let load_ffn = |il: usize| -> Result<Ffn<B>, EngineError> {
            Ok(match il < n_dense {
                true => Ffn::Dense(DenseFfn::load(ld, cfg, il)?),
                false => Ffn::Moe(Box::new(MoeFfn::load(ld, il, spec, &routing)?)),
            })
        };
        Ok(DeepSeek2Layers {
            mla,
            attention: ld.per_layer(cfg.n_layers, |il| load_attention(ld, cfg, &mla, il))?,
            ffn: ld.per_layer(cfg.n_layers, load_ffn)?,
            routing,
            yarn,
            kq_scale,
        })
    })
}

/// The MLA sizes, checked against each other: the cached key is [latent ; rope].
fn read_mla(g: &Gguf, cfg: &DecoderConfig) -> Result<Mla, EngineError> {
    let get = |k: &str| -> Result<usize, EngineError> { Ok(required(g.get_u32(&cfg.key(k)), &cfg.key(k))? as usize) };
    let key_mla = cfg.key("attention.key_length_mla");
    if g.get_u32(&key_mla)?.is_none() {
        return Err(EngineError::MissingKey(format!(
            "{key_mla} (a DeepSeek file without multi-head latent attention tensors; convert it again with a current llama.cpp)"
        )));
    }
    let (rank, k_mla, v_head) =
        (get("attention.kv_lora_rank")?, get("attention.key_length_mla")?, get("attention.value_length_mla")?);
    let rope = get("rope.dimension_count")?;
    let bad = |key: String, value: usize, why| Err(EngineError::BadValue { key, value: value.to_string(), why });
    if rope == 0 || rope % 2 != 0 || rope >= k_mla {
        return bad(cfg.key("rope.dimension_count"), rope, "must be even, > 0 and below key_length_mla");
    }
    if cfg.n_kv_heads != 1 || cfg.head_dim != rank + rope {
        return bad(cfg.key("attention.key_length"), cfg.head_dim, "MLA caches one head of kv_lora_rank + rope values");
    }
    if rank == 0 || v_head == 0 {
        return bad(cfg.key("attention.kv_lora_rank"), rank, "kv_lora_rank and value_length_mla must be > 0");
    }
    Ok(Mla { rank, nope: k_mla - rope, rope, v_head })
}

/// YaRN for the RoPE dims (plain RoPE when the file does not scale it) and llama.cpp's
/// attention scale: mscale²/√(nope + rope), mscale = 1 + 0.1·log_mul·ln(factor).
fn rope_and_scale(g: &Gguf, cfg: &DecoderConfig, mla: &Mla) -> Result<(Yarn, f32), EngineError> {
    let factor = 1.0 / cfg.rope_freq_scale;
    // llama.cpp cancels the 0.1 the converter multiplied in.
    let log_mul = g.get_f32(&cfg.key("rope.scaling.yarn_log_multiplier"))?.unwrap_or(0.0) / 0.1;
    let yarn = match cfg.yarn {
        Some(_) if log_mul != 0.0 => {
            let orig = g.get_u32(&cfg.key("rope.scaling.original_context_length"))?;
            Yarn::deepseek(mla.rope, cfg.rope_base, factor, orig.map_or(cfg.context_length, |v| v as usize))
        }
        Some(_) => {
            let orig = g.get_u32(&cfg.key("rope.scaling.original_context_length"))?;
            Yarn::new(mla.rope, cfg.rope_base, factor, orig.map_or(cfg.context_length, |v| v as usize))
        }
        // Linear or no scaling: the same rotation with YaRN's ramp off.
        None => Yarn { freq_scale: cfg.rope_freq_scale, ext_factor: 0.0, attn_factor: 1.0, corr_dims: [0.0, 0.0] },
    };
    let attn_factor_org = yarn.attn_factor * (1.0 + 0.1 * (1.0 / yarn.freq_scale).ln());
    let mscale = attn_factor_org * (1.0 + 0.1 * log_mul * (1.0 / yarn.freq_scale).ln());
    Ok((yarn, mscale * mscale / ((mla.nope + mla.rope) as f32).sqrt()))
}

/// Routing, expert width and the number of shared experts.
fn read_routing(g: &Gguf, cfg: &DecoderConfig) -> Result<(Routing, usize, usize), EngineError> {
    let opt = |k: &str| -> Result<usize, EngineError> { Ok(g.get_u32(&cfg.key(k))?.unwrap_or(0) as usize) };
    let missing = |_| Err(EngineError::MissingKey(cfg.key("expert_feed_forward_length")));
    let [n_expert, n_used, n_ff_exp] = expert_counts(g, cfg, missing)?;
    let gating = match g.get_u32(&cfg.key("expert_gating_func"))? {
        None | Some(0) | Some(1) => Gating::Softmax,
        Some(2) => Gating::Sigmoid,
        Some(other) => {
            let key = cfg.key("expert_gating_func");
            return Err(EngineError::BadValue { key, value: other.to_string(), why: "1 (softmax) or 2 (sigmoid)" });
        }
    };
    let (n_groups, n_groups_used) = (opt("expert_group_count")?, opt("expert_group_used_count")?);
    let groups = match n_groups > 1 {
        true if n_expert % n_groups == 0 && (1..=n_groups).contains(&n_groups_used) => Some((n_groups, n_groups_used)),
        true => {
            return Err(EngineError::BadValue {
                key: cfg.key("expert_group_count"),
                value: format!("{n_groups} groups, {n_groups_used} used, of {n_expert} experts"),
                why: "groups must divide expert_count, and 1 to all of them be used",
            })
        }
        false => None,
    };
    let scale = g.get_f32(&cfg.key("expert_weights_scale"))?.filter(|&s| s != 0.0).unwrap_or(1.0);
    let normalize = g.get_bool(&cfg.key("expert_weights_norm"))?.unwrap_or(false);
    let routing = Routing { n_expert, n_used, gating, normalize, scale, groups };
    Ok((routing, n_ff_exp, opt("expert_shared_count")?))
}

fn load_attention<B: Backend>(
    ld: &Loader<B>,
    cfg: &DecoderConfig,
    mla: &Mla,
    il: usize,
) -> Result<Attention<B>, EngineError> {
    let n = |s: &str| format!("blk.{il}.{s}.weight");
    let (d, h, k_mla) = (cfg.n_embd, cfg.n_heads, mla.nope + mla.rope);
    // This rank's query heads: their rows of the query projection, their per-head
    // matrices and their columns of the output projection. The latent is every rank's.
    let heads = cfg.heads.q.clone();
    let q_rows = Part::Rows(heads.start * k_mla..heads.end * k_mla);
    let q = match ld.file.tensor(&n("attn_q_a")) {
        Some(t) => {
            let q_rank = t.dims.get(1).copied().unwrap_or(0) as usize;
            QueryProj::LowRank {
                a: ld.weight(&n("attn_q_a"), d, q_rank)?,
                norm: ld.vector(&n("attn_q_a_norm"), q_rank)?,
                b: ld.weight_part(&n("attn_q_b"), q_rank, h * k_mla, q_rows)?,
            }
        }
        None => QueryProj::Full(ld.weight_part(&n("attn_q"), d, h * k_mla, q_rows)?),
    };
    let wo_cols = Part::Cols(heads.start * mla.v_head..heads.end * mla.v_head);
    Ok(Attention {
        norm: ld.vector(&n("attn_norm"), d)?,
        q,
        kv_a: ld.weight(&n("attn_kv_a_mqa"), d, mla.rank + mla.rope)?,
        kv_a_norm: ld.vector(&n("attn_kv_a_norm"), mla.rank)?,
        k_b: ld.experts(&n("attn_k_b"), mla.nope, mla.rank, h, heads.clone())?,
        v_b: ld.experts(&n("attn_v_b"), mla.rank, mla.v_head, h, heads)?,
        wo: ld.weight_part(&n("attn_output"), h * mla.v_head, d, wo_cols)?,
    })
}

impl<B: Backend> Layers<B> for DeepSeek2Layers<B> {
    fn attention(&self, cfg: &DecoderConfig, b: &B, il: usize, x: &B::Act, batch: &Batch, kv: &mut B::Kv) -> B::Act {
        let (l, m, n_heads) = (&self.attention[il], self.mla, cfg.n_heads);
        let k_mla = m.nope + m.rope;
        let pos = &batch.layout.positions;
        let h = b.rms_norm(x, &l.norm, cfg.rms_eps); // [n × d]
        let q = match &l.q {
            QueryProj::LowRank { a, norm, b: wb } => b.matmul(wb, &b.rms_norm(&b.matmul(a, &h), norm, cfg.rms_eps)),
            QueryProj::Full(w) => b.matmul(w, &h),
        }; // [n × heads·(nope + rope)]
           // The cached key: [latent c (normalized) ; k_pe (rotated)], [n × (rank + rope)].
        let kv_a = b.matmul(&l.kv_a, &h);
        let latent = b.rms_norm(&b.gather_cols(&kv_a, &[(0, m.rank)]), &l.kv_a_norm, cfg.rms_eps);
        let mut k_pe = b.gather_cols(&kv_a, &[(m.rank, m.rope)]);
        b.rope_norm_yarn(&mut k_pe, pos, m.rope, cfg.rope_base, &self.yarn);
        let key = b.concat_cols(&[&latent, &k_pe]);
        // Per head: [W_k_b·q_nope ; rope(q_pe)], [n × heads·(rank + rope)].
        let pe_spans: Vec<(usize, usize)> = (0..n_heads).map(|hd| (hd * k_mla + m.nope, m.rope)).collect();
        let mut q_pe = b.gather_cols(&q, &pe_spans);
        b.rope_norm_yarn(&mut q_pe, pos, m.rope, cfg.rope_base, &self.yarn);
        let heads: Vec<[B::Act; 2]> = (0..n_heads)
            .map(|hd| {
                let q_nope = b.gather_cols(&q, &[(hd * k_mla, m.nope)]);
                [b.matmul(&l.k_b[hd], &q_nope), b.gather_cols(&q_pe, &[(hd * m.rope, m.rope)])]
            })
            .collect();
        let query = b.concat_cols(&heads.iter().flatten().collect::<Vec<_>>());
        let shape = AttnShape {
            n_heads,
            n_kv_heads: 1,
            head_dim: m.rank + m.rope,
            v_head_dim: m.rank,
            window: None,
            scale: self.kq_scale,
        };
        let a = b.attention(kv, il, &batch.layout, &query, &key, &key, shape, None); // [n × heads·rank]
                                                                                     // Back to value space per head: [n × heads·v_head].
        let values: Vec<B::Act> =
            (0..n_heads).map(|hd| b.matmul(&l.v_b[hd], &b.gather_cols(&a, &[(hd * m.rank, m.rank)]))).collect();
        b.matmul_reduced(&l.wo, &b.concat_cols(&values.iter().collect::<Vec<_>>()))
        // [n × d]
    }

    fn feed_forward(&self, cfg: &DecoderConfig, b: &B, il: usize, x: &B::Act) -> B::Act {
        match &self.ffn[il] {
            Ffn::Dense(f) => f.forward(cfg, b, x),
            Ffn::Moe(f) => f.forward(b, x, cfg.rms_eps, &self.routing),
        }
    }

    fn routing_stats(&self) -> Vec<Vec<u64>> {
        let moe = |f: &Ffn<B>| match f {
            Ffn::Moe(m) => m.routing_stats(),
            Ffn::Dense(_) => Vec::new(),
        };
        self.ffn.iter().map(moe).collect()
    }

    fn kv_layout(&self, cfg: &DecoderConfig) -> KvLayout {
        KvLayout { kv_dim: self.mla.rank + self.mla.rope, windows: vec![None; cfg.n_layers], shared_v: true }
    }
}
