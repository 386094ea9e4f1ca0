//! Gemma 3 (text), as llama.cpp runs it (`src/models/gemma3.cpp`).
//!
//! Per layer: RMSNorm → Q, K, V → per-head RMSNorm of Q and K → NEOX RoPE → Q scaled by
//! 1/√head_dim → attention (sliding-window on local layers, full on global ones) → output
//! projection → post-attention RMSNorm → residual → RMSNorm → GeGLU FFN (tanh GELU) →
//! post-FFN RMSNorm → residual. Embeddings are scaled by √n_embd; the output projection
//! is tied to the embeddings unless the file has `output.weight`. The GGUF norm weights
//! already hold 1 + w, so every norm is a plain x·w.

use super::decoder::{swa_pattern, DecoderConfig};
use super::{
    count_params, host_or_tp_error, Architecture, Batch, Layered, Loader, Logits, ModelInfo, StageEnd, StageOutput,
};
use crate::backend::{AttnShape, Backend, KvCache};
use crate::gguf::Gguf;
use crate::kv::KvLayout;
use crate::parallel::{even_range, split_heads, Heads, Part};
use crate::EngineError;
use std::ops::Range;
use std::sync::Arc;
use turbine_cpu::QK_K;

/// Hyper-parameters read from the GGUF metadata: a decoder's, and Gemma 3's own.
#[derive(Clone, Debug)]
pub struct Gemma3Config {
    /// RoPE of global layers: the file's base, scaled linearly when the file says so.
    pub base: DecoderConfig,
    pub n_ff: usize,
    /// RoPE base of sliding-window layers (unscaled).
    pub rope_base_swa: f32,
    /// Sliding window (tokens, the current one included); None: every layer is global.
    pub sliding_window: Option<u32>,
    /// Per layer: true for sliding-window (local) layers.
    pub is_swa: Vec<bool>,
    pub attn_scale: f32,
    pub final_logit_softcap: Option<f32>,
}

impl Gemma3Config {
    pub fn from_gguf(g: &Gguf) -> Result<Gemma3Config, EngineError> {
        let base = DecoderConfig::from_gguf(g, "gemma3")?;
        if base.yarn.is_some() {
            return Err(EngineError::BadValue {
                key: base.key("rope.scaling.type"),
                value: "yarn".into(),
                why: "gemma3 supports only linear RoPE scaling",
            });
        }
        let key = |k: &str| base.key(k);
        let sliding_window = g.get_u32(&key("attention.sliding_window"))?.filter(|&w| w > 0);
        let is_swa = match sliding_window {
            Some(_) => swa_pattern(g, &key("attention.sliding_window_pattern"), base.n_layers, 6)?,
            None => vec![false; base.n_layers],
        };
        // Gemma 3 27B scales queries by 1/√(n_embd/n_heads) (query_pre_attn_scalar);
        // the other sizes by 1/√head_dim. llama.cpp tells them apart by layer count.
        let attn_scale = if base.n_layers == 62 {
            1.0 / ((base.n_embd / base.n_heads.max(1)) as f32).sqrt()
        } else {
            1.0 / (base.head_dim as f32).sqrt()
        };
        Ok(Gemma3Config {
            n_ff: base.dense_ff()?,
            rope_base_swa: g.get_f32(&key("rope.freq_base_swa"))?.unwrap_or(10_000.0),
            sliding_window,
            is_swa,
            attn_scale,
            final_logit_softcap: g.get_f32(&key("final_logit_softcapping"))?.filter(|&c| c > 0.0),
            base,
        })
    }
}

struct Layer<B: Backend> {
    attn_norm: B::Vector,
    wq: B::Weight,
    wk: B::Weight,
    wv: B::Weight,
    q_norm: B::Vector,
    k_norm: B::Vector,
    wo: B::Weight,
    post_attn_norm: B::Vector,
    ffn_norm: B::Vector,
    w_gate: B::Weight,
    w_up: B::Weight,
    w_down: B::Weight,
    post_ffn_norm: B::Vector,
}

pub struct Gemma3<B: Backend> {
    /// The configuration of this rank's share (its heads and FFN width under tensor
    /// parallelism; the file's otherwise).
    pub cfg: Gemma3Config,
    info: ModelInfo,
    tok_embd: B::Weight,
    /// The output projection (this rank's vocabulary rows under tensor parallelism), or
    /// None when it is `tok_embd` itself.
    head: Option<B::Weight>,
    output_norm: B::Vector,
    layers: Layered<Layer<B>>,
}

/// A rank's share of the model under tensor parallelism (everything, alone).
struct Plan {
    heads: Heads,
    ff: Range<usize>,
}

impl Plan {
    fn new(cfg: &Gemma3Config, (rank, ranks): (usize, usize)) -> Result<Plan, EngineError> {
        let heads = split_heads(cfg.base.n_heads, cfg.base.n_kv_heads, rank, ranks)?;
        // ffn_down is split by columns at block boundaries: whole 256-element blocks.
        if ranks > 1 && !cfg.n_ff.is_multiple_of(QK_K * ranks) {
            return Err(EngineError::BadValue {
                key: cfg.base.key("feed_forward_length"),
                value: format!("{} over {ranks} ranks", cfg.n_ff),
                why: "the FFN does not split into whole 256-element blocks per rank",
            });
        }
        let ff = if ranks == 1 { 0..cfg.n_ff } else { even_range(cfg.n_ff / QK_K, QK_K, rank, ranks) };
        Ok(Plan { heads, ff })
    }

    /// Rows of Q (or columns of the output projection) of the rank's query heads.
    fn q_dims(&self, hd: usize) -> Range<usize> {
        self.heads.q.start * hd..self.heads.q.end * hd
    }

    fn kv_dims(&self, hd: usize) -> Range<usize> {
        self.heads.kv.start * hd..self.heads.kv.end * hd
    }
}

fn load_layer<B: Backend>(ld: &Loader<B>, cfg: &Gemma3Config, plan: &Plan, il: usize) -> Result<Layer<B>, EngineError> {
    let n = |s: &str| format!("blk.{il}.{s}.weight");
    let (d, hd, ff) = (cfg.base.n_embd, cfg.base.head_dim, cfg.n_ff);
    let (q_dim, kv_dim) = (cfg.base.q_dim(), cfg.base.kv_dim());
    Ok(Layer {
        attn_norm: ld.vector(&n("attn_norm"), d)?,
        wq: ld.weight_part(&n("attn_q"), d, q_dim, Part::Rows(plan.q_dims(hd)))?,
        wk: ld.weight_part(&n("attn_k"), d, kv_dim, Part::Rows(plan.kv_dims(hd)))?,
        wv: ld.weight_part(&n("attn_v"), d, kv_dim, Part::Rows(plan.kv_dims(hd)))?,
        q_norm: ld.vector(&n("attn_q_norm"), hd)?,
        k_norm: ld.vector(&n("attn_k_norm"), hd)?,
        wo: ld.weight_part(&n("attn_output"), q_dim, d, Part::Cols(plan.q_dims(hd)))?,
        post_attn_norm: ld.vector(&n("post_attention_norm"), d)?,
        ffn_norm: ld.vector(&n("ffn_norm"), d)?,
        w_gate: ld.weight_part(&n("ffn_gate"), d, ff, Part::Rows(plan.ff.clone()))?,
        w_up: ld.weight_part(&n("ffn_up"), d, ff, Part::Rows(plan.ff.clone()))?,
        w_down: ld.weight_part(&n("ffn_down"), ff, d, Part::Cols(plan.ff.clone()))?,
        post_ffn_norm: ld.vector(&n("post_ffw_norm"), d)?,
    })
}

impl<B: Backend> Gemma3<B> {
    pub fn load(backend: &B, file: &Arc<Gguf>) -> Result<Gemma3<B>, EngineError> {
        let mut cfg = Gemma3Config::from_gguf(file)?;
        let ld = Loader { backend, file };
        let plan = Plan::new(&cfg, backend.tensor_parallel())?;
        let (tok_embd, head) = ld.embeddings_and_head(cfg.base.n_embd, cfg.base.n_vocab)?;
        let output_norm = ld.vector("output_norm.weight", cfg.base.n_embd)?;
        let layers = ld.per_layer(cfg.base.n_layers, |il| load_layer(&ld, &cfg, &plan, il))?;
        // From here on the configuration describes this rank's share.
        (cfg.base.n_heads, cfg.base.n_kv_heads, cfg.n_ff) = (plan.heads.q.len(), plan.heads.kv.len(), plan.ff.len());
        let info = ModelInfo {
            architecture: "gemma3".into(),
            n_vocab: cfg.base.n_vocab,
            n_embd: cfg.base.n_embd,
            n_layers: cfg.base.n_layers,
            context_length: cfg.base.context_length,
            n_params: count_params(file),
            rank_weight_bytes: Vec::new(),
        };
        Ok(Gemma3 { cfg, info, tok_embd, head, output_norm, layers })
    }

    /// Attention of layer `il`: x [n × d] → [n × d] (before the post-attention norm).
    fn attention(&self, b: &B, il: usize, x: &B::Act, batch: &Batch, kv: &mut B::Kv, tap: &mut Tap<B>) -> B::Act {
        let (cfg, l) = (&self.cfg, &self.layers[il]);
        let h = b.rms_norm(x, &l.attn_norm, cfg.base.rms_eps);
        tap("attn_norm", il, &h);
        // q [n × n_heads·hd], k and v [n × n_kv_heads·hd]
        let [q, k, v] = b.matmuls([&l.wq, &l.wk, &l.wv], &h);
        let mut q = b.rms_norm(&q, &l.q_norm, cfg.base.rms_eps); // per head
        let mut k = b.rms_norm(&k, &l.k_norm, cfg.base.rms_eps);
        tap("Qcur_normed", il, &q);
        tap("Kcur_normed", il, &k);
        tap("Vcur", il, &v);
        let (base, scale) = match cfg.is_swa[il] {
            true => (cfg.rope_base_swa, 1.0),
            false => (cfg.base.rope_base, cfg.base.rope_freq_scale),
        };
        let pos = &batch.layout.positions;
        b.rope_neox(&mut q, pos, cfg.base.head_dim, base, scale);
        b.rope_neox(&mut k, pos, cfg.base.head_dim, base, scale);
        tap("Qcur#3", il, &q);
        tap("Kcur#3", il, &k);
        b.scale(&mut q, cfg.attn_scale);
        let shape = AttnShape {
            n_heads: cfg.base.n_heads,
            n_kv_heads: cfg.base.n_kv_heads,
            head_dim: cfg.base.head_dim,
            v_head_dim: cfg.base.head_dim,
            window: if cfg.is_swa[il] { cfg.sliding_window } else { None },
            scale: 1.0,
        };
        let a = b.attention(kv, il, &batch.layout, &q, &k, &v, shape, None); // [n × n_heads·hd]
        tap("kqv_out", il, &a);
        b.matmul_reduced(&l.wo, &a) // [n × d]
    }

    /// GeGLU feed-forward of layer `il`: x [n × d] → [n × d] (before the post-FFN norm).
    fn feed_forward(&self, b: &B, il: usize, x: &B::Act, tap: &mut Tap<B>) -> B::Act {
        let l = &self.layers[il];
        let h = b.rms_norm(x, &l.ffn_norm, self.cfg.base.rms_eps);
        tap("ffn_norm", il, &h);
        let [mut gate, up] = b.matmuls([&l.w_gate, &l.w_up], &h); // [n × n_ff] each
        tap("ffn_gate", il, &gate);
        tap("ffn_up", il, &up);
        b.geglu(&mut gate, &up);
        tap("ffn_geglu", il, &gate);
        b.matmul_reduced(&l.w_down, &gate) // [n × d]
    }
}

impl<B: Backend> Architecture<B> for Gemma3<B> {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn kv_layout(&self) -> KvLayout {
        let window = |il: usize| if self.cfg.is_swa[il] { self.cfg.sliding_window } else { None };
        let windows = (0..self.cfg.base.n_layers).map(window).collect();
        KvLayout { kv_dim: self.cfg.base.kv_dim(), windows, shared_v: false }
    }

    fn compute(&self, b: &B, batch: &Batch, kv: &mut B::Kv) -> Result<Logits, EngineError> {
        self.compute_traced(b, batch, kv, &mut |_, _, _| {})
    }

    fn compute_hidden(&self, b: &B, batch: &Batch, kv: &mut B::Kv) -> Result<Vec<f32>, EngineError> {
        let all = 0..self.cfg.base.n_layers;
        host_or_tp_error(b, self.hidden(b, batch, kv, (all, None, true), &mut |_, _, _| {})?)
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
        let x = self.hidden(b, batch, kv, (layers, input, end != StageEnd::Handoff), &mut |_, _, _| {})?;
        if end == StageEnd::Logits {
            return self.logits(b, batch, &x).map(StageOutput::Logits);
        }
        host_or_tp_error(b, x).map(StageOutput::Hidden)
    }
}

/// Observer of named intermediate activations (llama.cpp's graph tensor names), for
/// comparing against reference dumps.
pub type Tap<'a, B> = dyn FnMut(&str, usize, &<B as Backend>::Act) + 'a;

impl<B: Backend> Gemma3<B> {
    /// [`Architecture::forward`], calling `tap` with each named intermediate.
    pub fn forward_traced(
        &self,
        b: &B,
        batch: &Batch,
        kv: &mut B::Kv,
        tap: &mut Tap<B>,
    ) -> Result<Logits, EngineError> {
        kv.blocks_mut().begin_batch(batch)?;
        let logits = self.compute_traced(b, batch, kv, tap);
        kv.blocks_mut().end_batch(batch);
        logits
    }

    fn compute_traced(&self, b: &B, batch: &Batch, kv: &mut B::Kv, tap: &mut Tap<B>) -> Result<Logits, EngineError> {
        let x = self.hidden(b, batch, kv, (0..self.cfg.base.n_layers, None, true), tap)?; // [n_out × d]
        self.logits(b, batch, &x)
    }

    /// The logits of the normalized hidden states x [n_out × d], soft-capped.
    fn logits(&self, b: &B, batch: &Batch, x: &B::Act) -> Result<Logits, EngineError> {
        let cfg = &self.cfg;
        let head = self.head.as_ref().unwrap_or(&self.tok_embd);
        // [n_out × n_vocab]: under tensor parallelism each rank's vocabulary, gathered.
        let mut data = b.take_to_host(b.all_gather_cols(b.matmul(head, x)));
        if let Some(e) = b.take_tp_error() {
            return Err(e);
        }
        if let Some(cap) = cfg.final_logit_softcap {
            data.iter_mut().for_each(|v| *v = (*v / cap).tanh() * cap);
        }
        Ok(Logits { rows: batch.output_rows(), n_vocab: cfg.base.n_vocab, data })
    }

    /// A pipeline stage's part (the whole model by default): the scaled embeddings (or the
    /// hidden states entering its layers), its layers (after the model's last, only the rows
    /// that want output remain), and the output norm when asked.
    fn hidden(
        &self,
        b: &B,
        batch: &Batch,
        kv: &mut B::Kv,
        (layers, input, normalize): (Range<usize>, Option<Vec<f32>>, bool),
        tap: &mut Tap<B>,
    ) -> Result<B::Act, EngineError> {
        let cfg = &self.cfg;
        let out_rows = batch.output_rows();
        let mut x = match input {
            None => b.embed(&self.tok_embd, &batch.tokens, (cfg.base.n_embd as f32).sqrt())?, // [n × d]
            // All the batch's rows, or only those that want output after the last layer.
            Some(h) => b.from_host(h.len() / cfg.base.n_embd.max(1), cfg.base.n_embd, h),
        };
        for il in layers {
            let mut attn = self.attention(b, il, &x, batch, kv, tap);
            if il + 1 == cfg.base.n_layers {
                // Only the rows that want output go through the last FFN and the head.
                attn = b.select_rows(&attn, &out_rows);
                x = b.select_rows(&x, &out_rows);
            }
            let mut sa = b.rms_norm(&attn, &self.layers[il].post_attn_norm, cfg.base.rms_eps);
            b.add(&mut sa, &x);
            tap("sa_out", il, &sa);
            let ffn = self.feed_forward(b, il, &sa, tap);
            tap("ffn_out", il, &ffn);
            x = b.rms_norm(&ffn, &self.layers[il].post_ffn_norm, cfg.base.rms_eps);
            b.add(&mut x, &sa);
            tap("l_out", il, &x);
        }
        Ok(if normalize { b.rms_norm(&x, &self.output_norm, cfg.base.rms_eps) } else { x })
    }
}
