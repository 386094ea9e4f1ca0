//! Mixture-of-experts feed-forward, as llama.cpp's `build_moe_ffn` runs it.
//!
//! A router scores every expert for every token; each token keeps its top-k experts and
//! their gate weights. Tokens are then grouped by expert, so each expert's matmuls run
//! once per step over all the tokens routed to it (never once per token), and every
//! token's output is the weighted sum of its experts' outputs. A backend with a grouped
//! path of its own (CUDA: every (token, choice) slot through its expert in one launch per
//! product) may run the whole combine instead ([`Backend::moe_grouped`]); the routing stays
//! here, on the host, either way.

use super::decoder::{DecoderConfig, SwiGlu};
use super::{required, Loader};
use crate::backend::{Backend, ExpertWeights};
use crate::gguf::Gguf;
use crate::parallel::even_range;
use crate::EngineError;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// How router scores become gate weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Gating {
    /// Softmax over all experts, then the top-k probabilities (Qwen3-MoE, Mixtral).
    Softmax,
    /// The top-k logits, then a softmax over just those k (gpt-oss).
    SoftmaxOverSelected,
    /// A sigmoid per expert (DeepSeek-V3).
    Sigmoid,
}

/// The routing rule of one model.
#[derive(Clone, Copy, Debug)]
pub struct Routing {
    pub n_expert: usize,
    /// Experts per token (k).
    pub n_used: usize,
    pub gating: Gating,
    /// Renormalize the k weights to sum to 1 (Qwen3-MoE's norm_topk_prob).
    pub normalize: bool,
    /// Multiplier on the weights (1 for none).
    pub scale: f32,
    /// Group-limited routing (DeepSeek-V3): (groups, groups kept). The experts form equal
    /// groups scored by the sum of their two best; only the best groups' experts compete.
    pub groups: Option<(usize, usize)>,
}

/// `{arch}.expert_count`, `expert_used_count` and `expert_feed_forward_length` (else
/// `ff_fallback`, Qwen3-MoE's feed_forward_length / expert_used_count), checked: 1 to
/// expert_count experts per token, of width > 0.
pub(crate) fn expert_counts(
    g: &Gguf,
    cfg: &DecoderConfig,
    ff_fallback: impl Fn(usize) -> Result<usize, EngineError>,
) -> Result<[usize; 3], EngineError> {
    let get = |k: &str| -> Result<usize, EngineError> { Ok(required(g.get_u32(&cfg.key(k)), &cfg.key(k))? as usize) };
    let (n_expert, n_used) = (get("expert_count")?, get("expert_used_count")?);
    let n_ff_exp = match g.get_u32(&cfg.key("expert_feed_forward_length"))? {
        Some(v) => v as usize,
        None if n_used > 0 => ff_fallback(n_used)?,
        None => 0,
    };
    if n_expert == 0 || n_used == 0 || n_used > n_expert || n_ff_exp == 0 {
        return Err(EngineError::BadValue {
            key: cfg.key("expert_used_count"),
            value: format!("{n_used} of {n_expert} experts of width {n_ff_exp}"),
            why: "need 1 to expert_count experts per token, of width > 0",
        });
    }
    Ok([n_expert, n_used, n_ff_exp])
}

/// Each token's chosen experts, best first, and their weights: [n_tokens × k] each.
#[derive(Clone, Debug, PartialEq)]
pub struct Routes {
    pub k: usize,
    pub experts: Vec<usize>,
    pub weights: Vec<f32>,
}

impl Routes {
    /// Per expert: the tokens routed to it (ascending) and their weights.
    pub fn by_expert(&self, n_expert: usize) -> Vec<(Vec<usize>, Vec<f32>)> {
        let mut groups = vec![(Vec::new(), Vec::new()); n_expert];
        for (i, (&e, &w)) in self.experts.iter().zip(&self.weights).enumerate() {
            groups[e].0.push(i / self.k);
            groups[e].1.push(w);
        }
        groups
    }
}

impl Routing {
    /// Routes every token from its router logits [n_tokens × n_expert]. A selection bias
    /// [n_expert] (DeepSeek-V3's `exp_probs_b`) shifts which experts are chosen, not
    /// their weights.
    pub fn route(&self, logits: &[f32], selection_bias: Option<&[f32]>) -> Routes {
        let (n, k) = (self.n_expert, self.n_used);
        let mut routes = Routes { k, experts: Vec::new(), weights: Vec::new() };
        for row in logits.chunks_exact(n) {
            let scores = match self.gating {
                Gating::Softmax => softmax(row),
                Gating::SoftmaxOverSelected => row.to_vec(),
                Gating::Sigmoid => row.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
            };
            let mut select = scores.clone();
            if let Some(bias) = selection_bias {
                select.iter_mut().zip(bias).for_each(|(s, b)| *s += b);
            }
            if let Some((groups, kept)) = self.groups {
                mask_weak_groups(&mut select, groups, kept);
            }
            let chosen = &top_k(&select, k)[..];
            let mut w: Vec<f32> = chosen.iter().map(|&e| scores[e]).collect();
            if self.gating == Gating::SoftmaxOverSelected {
                w = softmax(&w);
            }
            if self.normalize {
                // llama.cpp clamps the sum at the smallest normal f16 to avoid dividing by 0.
                let sum = w.iter().sum::<f32>().max(6.103_515_6e-5);
                w.iter_mut().for_each(|x| *x /= sum);
            }
            if self.scale != 1.0 {
                w.iter_mut().for_each(|x| *x *= self.scale);
            }
            routes.experts.extend_from_slice(chosen);
            routes.weights.extend(w);
        }
        routes
    }
}

/// Indices of the k largest values, best first; ties go to the lower index.
fn top_k(x: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[b].total_cmp(&x[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// Sets to -∞ the experts outside the `kept` groups of `groups` equal groups whose two
/// best scores sum highest.
fn mask_weak_groups(select: &mut [f32], groups: usize, kept: usize) {
    let per_group = select.len() / groups.max(1);
    if groups <= 1 || per_group == 0 {
        return;
    }
    let group_scores: Vec<f32> =
        select.chunks_exact(per_group).map(|g| top_k(g, 2).iter().map(|&i| g[i]).sum()).collect();
    let keep = top_k(&group_scores, kept);
    for (g, chunk) in select.chunks_exact_mut(per_group).enumerate() {
        if !keep.contains(&g) {
            chunk.iter_mut().for_each(|s| *s = f32::NEG_INFINITY);
        }
    }
}

/// Softmax of one row, its sum accumulated in f64 as ggml does.
fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = row.iter().map(|&x| (x - max).exp()).collect();
    let sum: f64 = e.iter().map(|&x| f64::from(x)).sum();
    let inv = (1.0 / sum) as f32;
    e.iter().map(|&x| x * inv).collect()
}

/// An expert's gated activation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Activation {
    /// silu(gate) ⊙ up.
    SwiGlu,
    /// gpt-oss's clamped form (`turbine_cpu::ops::swiglu_oai`).
    SwiGluOai { alpha: f32, limit: f32 },
}

/// The gated experts of one layer: expert e is
/// down[e] · act(gate[e] · x + b_gate[e], up[e] · x + b_up[e]) + b_down[e],
/// the biases only where the model has them. Under tensor parallelism a rank holds and
/// runs only its own experts (expert parallelism); the vectors below are indexed from
/// the first of them.
pub struct Experts<B: Backend> {
    d: usize,
    act: Activation,
    /// The layer's expert count, and this rank's experts (all of them alone).
    n_expert: usize,
    owned: Range<usize>,
    gate: Vec<B::Weight>,
    up: Vec<B::Weight>,
    down: Vec<B::Weight>,
    /// Per expert: gate [ff], up [ff] and down [d] biases.
    biases: Option<[Vec<B::Vector>; 3]>,
}

impl<B: Backend> Experts<B> {
    /// `blk.{il}.ffn_{gate,up,down}_exps.weight`: [d, ff, n], [d, ff, n], [ff, d, n], and
    /// with `biases`, `…_exps.bias`: [ff, n], [ff, n], [d, n].
    pub(crate) fn load(
        ld: &Loader<B>,
        il: usize,
        [d, ff, n]: [usize; 3],
        act: Activation,
        biases: bool,
    ) -> Result<Experts<B>, EngineError> {
        let name = |s: &str, kind: &str| format!("blk.{il}.ffn_{s}_exps.{kind}");
        let (rank, ranks) = ld.shard();
        let owned = even_range(n, 1, rank, ranks);
        let vectors = |s: &str, len: usize| ld.expert_vectors(&name(s, "bias"), len, n, owned.clone());
        let biases = match biases {
            true => Some([vectors("gate", ff)?, vectors("up", ff)?, vectors("down", d)?]),
            false => None,
        };
        let weights = |s: &str, cols, rows| ld.experts(&name(s, "weight"), cols, rows, n, owned.clone());
        Ok(Experts {
            d,
            act,
            gate: weights("gate", d, ff)?,
            up: weights("up", d, ff)?,
            down: weights("down", ff, d)?,
            biases,
            n_expert: n,
            owned,
        })
    }

    /// Runs every token through its experts (this rank's): x [n × d] → [n × d], to be
    /// summed over the ranks.
    pub fn forward(&self, b: &B, x: &B::Act, routes: &Routes, stats: &RoutingStats) -> B::Act {
        let n_tokens = routes.experts.len() / routes.k.max(1);
        let groups = routes.by_expert(self.n_expert);
        let busy: Vec<usize> = self.owned.clone().filter(|&e| !groups[e].0.is_empty()).collect();
        busy.iter().for_each(|&e| stats.count(e, groups[e].0.len()));
        // The backend's grouped path where it has one (all the slots in a few launches);
        // it takes every expert of the layer, so only a rank that holds them all asks.
        if self.owned == (0..self.n_expert) {
            if let Some(out) = b.moe_grouped(x, routes, &self.weights()) {
                return out;
            }
        }
        // The experts run side by side; their outputs are combined in expert order, so the
        // result does not depend on which finishes first.
        let outputs = b.run_all(busy.clone(), |e| self.expert(b, e, &b.select_rows(x, &groups[e].0)));
        let mut out = b.zeros(n_tokens, self.d);
        for (e, y) in busy.into_iter().zip(outputs) {
            let (rows, weights) = &groups[e];
            b.add_scaled_rows(&mut out, &y, rows, weights);
        }
        out
    }

    /// The experts as [`Backend::moe_grouped`] takes them.
    fn weights(&self) -> ExpertWeights<'_, B> {
        ExpertWeights {
            gate: &self.gate,
            up: &self.up,
            down: &self.down,
            biases: self.biases.as_ref().map(|[g, u, d]| [&g[..], &u[..], &d[..]]),
            act: self.act,
        }
    }

    /// Expert `e` on its tokens: x [m × d] → [m × d].
    fn expert(&self, b: &B, expert: usize, x: &B::Act) -> B::Act {
        let e = expert - self.owned.start;
        let [mut g, mut u] = b.matmuls([&self.gate[e], &self.up[e]], x); // [m × ff]
        if let Some([bg, bu, _]) = &self.biases {
            b.add_bias(&mut g, &bg[e]);
            b.add_bias(&mut u, &bu[e]);
        }
        match self.act {
            Activation::SwiGlu => b.swiglu(&mut g, &u),
            Activation::SwiGluOai { alpha, limit } => b.swiglu_oai(&mut g, &u, alpha, limit),
        }
        let mut y = b.matmul(&self.down[e], &g); // [m × d]
        if let Some([_, _, bd]) = &self.biases {
            b.add_bias(&mut y, &bd[e]);
        }
        y
    }
}

/// What a model's MoE blocks have beyond a router and SwiGLU experts.
#[derive(Clone, Copy, Debug)]
pub struct MoeSpec<'a> {
    /// The block's norm, `blk.{il}.{norm}.weight`.
    pub norm: &'a str,
    /// [d, expert width].
    pub dims: [usize; 2],
    pub act: Activation,
    /// The router and the experts have biases (gpt-oss).
    pub biases: bool,
    /// `blk.{il}.exp_probs_b.bias`, a selection bias (DeepSeek-V3).
    pub selection_bias: bool,
    /// Width of the always-on shared experts `ffn_{gate,up,down}_shexp` (DeepSeek).
    pub shared_ff: Option<usize>,
}

/// A mixture-of-experts FFN block: h = rms_norm(x); the router scores the experts from h;
/// each token's output is its experts' weighted sum, plus the shared experts' SwiGLU of h
/// where the model has them.
pub struct MoeFfn<B: Backend> {
    norm: B::Vector,
    /// Router [n_expert × d] and its bias [n_expert].
    router: B::Weight,
    router_bias: Option<B::Vector>,
    selection_bias: Option<Vec<f32>>,
    experts: Experts<B>,
    /// The always-on shared experts (this rank's share of their width).
    shared: Option<SwiGlu<B>>,
    stats: RoutingStats,
}

impl<B: Backend> MoeFfn<B> {
    /// Layer `il`'s block: its norm, the router `blk.{il}.ffn_gate_inp.*`, the experts
    /// and what `spec` adds.
    pub(crate) fn load(ld: &Loader<B>, il: usize, spec: MoeSpec, routing: &Routing) -> Result<MoeFfn<B>, EngineError> {
        let ([d, ff], n) = (spec.dims, routing.n_expert);
        let name = |s: &str, kind: &str| format!("blk.{il}.{s}.{kind}");
        let router_bias = match spec.biases {
            true => Some(ld.vector(&name("ffn_gate_inp", "bias"), n)?),
            false => None,
        };
        let selection_bias = match spec.selection_bias {
            true => Some(ld.host_vector(&name("exp_probs_b", "bias"), n)?),
            false => None,
        };
        let shared = match spec.shared_ff {
            Some(sff) => Some(SwiGlu::load(ld, il, ["ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"], d, sff)?),
            None => None,
        };
        Ok(MoeFfn {
            norm: ld.vector(&name(spec.norm, "weight"), d)?,
            router: ld.weight(&name("ffn_gate_inp", "weight"), d, n)?,
            router_bias,
            selection_bias,
            experts: Experts::load(ld, il, [d, ff, n], spec.act, spec.biases)?,
            shared,
            stats: RoutingStats::new(n),
        })
    }

    /// x [n × d] → [n × d].
    pub fn forward(&self, b: &B, x: &B::Act, rms_eps: f32, routing: &Routing) -> B::Act {
        let h = b.rms_norm(x, &self.norm, rms_eps); // [n × d]
        let mut logits = b.matmul(&self.router, &h); // [n × n_expert]
        if let Some(bias) = &self.router_bias {
            b.add_bias(&mut logits, bias);
        }
        let routes = routing.route(&b.take_to_host(logits), self.selection_bias.as_deref());
        let mut out = self.experts.forward(b, &h, &routes, &self.stats); // [n × d]
        if let Some(shared) = &self.shared {
            b.add(&mut out, &shared.partial(b, &h));
        }
        // The experts' combine and the shared experts' row-parallel sum, in one all-reduce.
        b.all_reduce_sum(&mut out);
        out
    }

    /// Tokens routed to each expert since load (this rank's experts under tensor
    /// parallelism; zero for the others).
    pub fn routing_stats(&self) -> Vec<u64> {
        self.stats.snapshot()
    }
}

/// Tokens routed to each expert of one layer since load, for debugging a router
/// (`Architecture::routing_stats`).
pub struct RoutingStats {
    counts: Vec<AtomicU64>,
}

impl RoutingStats {
    pub fn new(n_expert: usize) -> RoutingStats {
        RoutingStats { counts: (0..n_expert).map(|_| AtomicU64::new(0)).collect() }
    }

    fn count(&self, expert: usize, tokens: usize) {
        if let Some(c) = self.counts.get(expert) {
            c.fetch_add(tokens as u64, Ordering::Relaxed);
        }
    }

    pub fn snapshot(&self) -> Vec<u64> {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(normalize: bool) -> Routing {
        Routing { n_expert: 4, n_used: 2, gating: Gating::Softmax, normalize, scale: 1.0, groups: None }
    }

    #[test]
    fn sigmoid_gating_chooses_by_biased_score_weighs_by_unbiased_and_limits_groups() {
        let r = Routing {
            n_expert: 8,
            n_used: 2,
            gating: Gating::Sigmoid,
            normalize: true,
            scale: 2.5,
            groups: Some((4, 2)),
        };
        // Groups {0,1} {2,3} {4,5} {6,7}: sums of scores make groups 1 and 3 the best two
        // once expert 7's bias lifts group 3 above group 0.
        let logits = [2.0, 1.0, 3.0, 2.5, -1.0, -1.0, 0.0, 0.5];
        let bias = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0];
        let routes = r.route(&logits, Some(&bias));
        assert_eq!(routes.experts, vec![7, 2], "expert 0 is out with its group");
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        let (a, b) = (sig(0.5), sig(3.0));
        let want = [a / (a + b) * 2.5, b / (a + b) * 2.5];
        assert!(routes.weights.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-6), "{:?}", routes.weights);
    }

    #[test]
    fn softmax_over_selected_weighs_only_the_chosen_logits() {
        let r = Routing { gating: Gating::SoftmaxOverSelected, ..routing(false) };
        let routes = r.route(&[1.0, 4.0, 3.0, -2.0], None);
        assert_eq!(routes.experts, vec![1, 2]);
        let w = softmax(&[4.0, 3.0]);
        assert_eq!(routes.weights, w);
        assert!((routes.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn picks_the_top_k_experts_best_first() {
        let logits = [0.0, 3.0, 1.0, 2.0, /* token 1 */ 5.0, 0.0, 0.0, 4.0];
        let r = routing(false).route(&logits, None);
        assert_eq!(r.experts, vec![1, 3, 0, 3]);
        let p = softmax(&logits[..4]);
        assert_eq!(r.weights[..2], [p[1], p[3]]);
        assert!(r.weights[0] > r.weights[1]);
    }

    #[test]
    fn normalized_weights_sum_to_one() {
        let r = routing(true).route(&[0.3, -1.0, 2.0, 0.1], None);
        assert_eq!(r.experts, vec![2, 0]);
        assert!((r.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        let p = softmax(&[0.3, -1.0, 2.0, 0.1]);
        assert!((r.weights[0] - p[2] / (p[2] + p[0])).abs() < 1e-6);
    }

    #[test]
    fn groups_tokens_by_expert() {
        let r = Routes { k: 2, experts: vec![1, 3, 0, 3, 1, 0], weights: vec![0.6, 0.4, 0.7, 0.3, 0.5, 0.5] };
        let g = r.by_expert(4);
        assert_eq!(g[0], (vec![1, 2], vec![0.7, 0.5]));
        assert_eq!(g[1], (vec![0, 2], vec![0.6, 0.5]));
        assert_eq!(g[2], (vec![], vec![]));
        assert_eq!(g[3], (vec![0, 1], vec![0.4, 0.3]));
    }
}
