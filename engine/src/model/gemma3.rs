//! Gemma 3 (text), as llama.cpp runs it (`src/models/gemma3.cpp`).
//!
//! Per layer: RMSNorm → Q, K, V → per-head RMSNorm of Q and K → NEOX RoPE → Q scaled by
//! 1/√head_dim → attention (sliding-window on local layers, full on global ones) → output
//! projection → post-attention RMSNorm → residual → RMSNorm → GeGLU FFN (tanh GELU) →
//! post-FFN RMSNorm → residual. Embeddings are scaled by √n_embd; the output projection
//! is tied to the embeddings unless the file has `output.weight`. The GGUF norm weights
//! already hold 1 + w, so every norm is a plain x·w.

use super::decoder::{swa_pattern, DecoderConfig};
use super::{count_params, Architecture, Batch, Loader, Logits, ModelInfo};
use crate::backend::{AttnShape, Backend, KvCache};
use crate::gguf::Gguf;
use crate::kv::KvLayout;
use crate::EngineError;
use std::sync::Arc;

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
    pub cfg: Gemma3Config,
    info: ModelInfo,
    tok_embd: B::Weight,
    /// `output.weight`, or None when tied to `tok_embd`.
    output: Option<B::Weight>,
    output_norm: B::Vector,
    layers: Vec<Layer<B>>,
}

fn load_layer<B: Backend>(ld: &Loader<B>, cfg: &Gemma3Config, il: usize) -> Result<Layer<B>, EngineError> {
    let n = |s: &str| format!("blk.{il}.{s}.weight");
    let (d, hd) = (cfg.base.n_embd, cfg.base.head_dim);
    Ok(Layer {
        attn_norm: ld.vector(&n("attn_norm"), d)?,
        wq: ld.weight(&n("attn_q"), d, cfg.base.q_dim())?,
        wk: ld.weight(&n("attn_k"), d, cfg.base.kv_dim())?,
        wv: ld.weight(&n("attn_v"), d, cfg.base.kv_dim())?,
        q_norm: ld.vector(&n("attn_q_norm"), hd)?,
        k_norm: ld.vector(&n("attn_k_norm"), hd)?,
        wo: ld.weight(&n("attn_output"), cfg.base.q_dim(), d)?,
        post_attn_norm: ld.vector(&n("post_attention_norm"), d)?,
        ffn_norm: ld.vector(&n("ffn_norm"), d)?,
        w_gate: ld.weight(&n("ffn_gate"), d, cfg.n_ff)?,
        w_up: ld.weight(&n("ffn_up"), d, cfg.n_ff)?,
        w_down: ld.weight(&n("ffn_down"), cfg.n_ff, d)?,
        post_ffn_norm: ld.vector(&n("post_ffw_norm"), d)?,
    })
}

impl<B: Backend> Gemma3<B> {
    pub fn load(backend: &B, file: &Arc<Gguf>) -> Result<Gemma3<B>, EngineError> {
        let cfg = Gemma3Config::from_gguf(file)?;
        let ld = Loader { backend, file };
        let tok_embd = ld.weight("token_embd.weight", cfg.base.n_embd, cfg.base.n_vocab)?;
        let output = match file.tensor("output.weight") {
            Some(_) => Some(ld.weight("output.weight", cfg.base.n_embd, cfg.base.n_vocab)?),
            None => None,
        };
        let output_norm = ld.vector("output_norm.weight", cfg.base.n_embd)?;
        let layers = (0..cfg.base.n_layers).map(|il| load_layer(&ld, &cfg, il)).collect::<Result<Vec<_>, _>>()?;
        let info = ModelInfo {
            architecture: "gemma3".into(),
            n_vocab: cfg.base.n_vocab,
            n_embd: cfg.base.n_embd,
            n_layers: cfg.base.n_layers,
            context_length: cfg.base.context_length,
            n_params: count_params(file),
        };
        Ok(Gemma3 { cfg, info, tok_embd, output, output_norm, layers })
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
        let mut o = b.matmul(&l.wo, &a); // [n × d]
        b.all_reduce_sum(&mut o);
        o
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
        let mut out = b.matmul(&l.w_down, &gate); // [n × d]
        b.all_reduce_sum(&mut out);
        out
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
        Ok(b.take_to_host(self.hidden(b, batch, kv, &mut |_, _, _| {})?))
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
        let cfg = &self.cfg;
        let x = self.hidden(b, batch, kv, tap)?; // [n_out × d]
        let head = self.output.as_ref().unwrap_or(&self.tok_embd);
        let mut data = b.take_to_host(b.matmul(head, &x)); // [n_out × n_vocab]
        if let Some(cap) = cfg.final_logit_softcap {
            data.iter_mut().for_each(|v| *v = (*v / cap).tanh() * cap);
        }
        Ok(Logits { rows: batch.output_rows(), n_vocab: cfg.base.n_vocab, data })
    }

    /// The layers and the output norm: [n × d] hidden states of the rows that want output.
    fn hidden(&self, b: &B, batch: &Batch, kv: &mut B::Kv, tap: &mut Tap<B>) -> Result<B::Act, EngineError> {
        let cfg = &self.cfg;
        let out_rows = batch.output_rows();
        let mut x = b.embed(&self.tok_embd, &batch.tokens, (cfg.base.n_embd as f32).sqrt())?; // [n × d]
        for il in 0..cfg.base.n_layers {
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
        Ok(b.rms_norm(&x, &self.output_norm, cfg.base.rms_eps))
    }
}
