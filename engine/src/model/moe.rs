//! Mixture-of-experts feed-forward, as llama.cpp's `build_moe_ffn` runs it.
//!
//! A router scores every expert for every token; each token keeps its top-k experts and
//! their gate weights. Tokens are then grouped by expert, so each expert's matmuls run
//! once per step over all the tokens routed to it (never once per token), and every
//! token's output is the weighted sum of its experts' outputs.

use super::Loader;
use crate::backend::Backend;
use crate::EngineError;
use std::sync::atomic::{AtomicU64, Ordering};

/// How router scores become gate weights.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Gating {
    /// Softmax over all experts, then the top-k probabilities (Qwen3-MoE, Mixtral).
    Softmax,
    /// The top-k logits, then a softmax over just those k (gpt-oss).
    SoftmaxOverSelected,
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
    /// Routes every token from its router logits [n_tokens × n_expert].
    pub fn route(&self, logits: &[f32]) -> Routes {
        let (n, k) = (self.n_expert, self.n_used);
        let mut routes = Routes { k, experts: Vec::new(), weights: Vec::new() };
        for row in logits.chunks_exact(n) {
            let scores = match self.gating {
                Gating::Softmax => softmax(row),
                Gating::SoftmaxOverSelected => row.to_vec(),
            };
            // Top k by score; ties go to the lower expert index.
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
            let chosen = &order[..k];
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
/// the biases only where the model has them.
pub struct Experts<B: Backend> {
    d: usize,
    act: Activation,
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
        let biases = match biases {
            true => Some([
                ld.expert_vectors(&name("gate", "bias"), ff, n)?,
                ld.expert_vectors(&name("up", "bias"), ff, n)?,
                ld.expert_vectors(&name("down", "bias"), d, n)?,
            ]),
            false => None,
        };
        Ok(Experts {
            d,
            act,
            gate: ld.experts(&name("gate", "weight"), d, ff, n)?,
            up: ld.experts(&name("up", "weight"), d, ff, n)?,
            down: ld.experts(&name("down", "weight"), ff, d, n)?,
            biases,
        })
    }

    /// Runs every token through its experts: x [n × d] → [n × d].
    pub fn forward(&self, b: &B, x: &B::Act, routes: &Routes, stats: &RoutingStats) -> B::Act {
        let n_tokens = routes.experts.len() / routes.k.max(1);
        let mut out = b.zeros(n_tokens, self.d);
        for (e, (rows, weights)) in routes.by_expert(self.gate.len()).iter().enumerate() {
            if rows.is_empty() {
                continue;
            }
            stats.count(e, rows.len());
            let xe = b.select_rows(x, rows); // [m × d]
            let [mut g, mut u] = b.matmuls([&self.gate[e], &self.up[e]], &xe); // [m × ff]
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
            b.add_scaled_rows(&mut out, &y, rows, weights);
        }
        out
    }
}

/// A mixture-of-experts FFN block: h = rms_norm(x); the router scores the experts from h
/// (plus a bias, in gpt-oss); each token's output is its experts' weighted sum.
pub struct MoeFfn<B: Backend> {
    norm: B::Vector,
    /// Router [n_expert × d] and its bias [n_expert].
    router: B::Weight,
    router_bias: Option<B::Vector>,
    experts: Experts<B>,
    stats: RoutingStats,
}

impl<B: Backend> MoeFfn<B> {
    /// Layer `il`'s block: its norm `blk.{il}.{norm}.weight`, the router
    /// `blk.{il}.ffn_gate_inp.{weight,bias}` and the experts of width `ff`; `biases`: the
    /// router and experts have biases.
    pub(crate) fn load(
        ld: &Loader<B>,
        il: usize,
        norm: &str,
        [d, ff]: [usize; 2],
        routing: &Routing,
        act: Activation,
        biases: bool,
    ) -> Result<MoeFfn<B>, EngineError> {
        let n = routing.n_expert;
        let router_bias = match biases {
            true => Some(ld.vector(&format!("blk.{il}.ffn_gate_inp.bias"), n)?),
            false => None,
        };
        Ok(MoeFfn {
            norm: ld.vector(&format!("blk.{il}.{norm}.weight"), d)?,
            router: ld.weight(&format!("blk.{il}.ffn_gate_inp.weight"), d, n)?,
            router_bias,
            experts: Experts::load(ld, il, [d, ff, n], act, biases)?,
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
        let routes = routing.route(&b.take_to_host(logits));
        let mut out = self.experts.forward(b, &h, &routes, &self.stats); // [n × d]
        b.all_reduce_sum(&mut out);
        out
    }

    /// Tokens routed to each expert since load.
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
        Routing { n_expert: 4, n_used: 2, gating: Gating::Softmax, normalize, scale: 1.0 }
    }

    #[test]
    fn softmax_over_selected_weighs_only_the_chosen_logits() {
        let r = Routing { gating: Gating::SoftmaxOverSelected, ..routing(false) };
        let routes = r.route(&[1.0, 4.0, 3.0, -2.0]);
        assert_eq!(routes.experts, vec![1, 2]);
        let w = softmax(&[4.0, 3.0]);
        assert_eq!(routes.weights, w);
        assert!((routes.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn picks_the_top_k_experts_best_first() {
        let logits = [0.0, 3.0, 1.0, 2.0, /* token 1 */ 5.0, 0.0, 0.0, 4.0];
        let r = routing(false).route(&logits);
        assert_eq!(r.experts, vec![1, 3, 0, 3]);
        let p = softmax(&logits[..4]);
        assert_eq!(r.weights[..2], [p[1], p[3]]);
        assert!(r.weights[0] > r.weights[1]);
    }

    #[test]
    fn normalized_weights_sum_to_one() {
        let r = routing(true).route(&[0.3, -1.0, 2.0, 0.1]);
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
