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
            let probs = match self.gating {
                Gating::Softmax => softmax(row),
            };
            // Top k by probability; ties go to the lower expert index.
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
            let chosen = &order[..k];
            let mut w: Vec<f32> = chosen.iter().map(|&e| probs[e]).collect();
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

/// The SwiGLU experts of one layer: expert e is down[e] · (silu(gate[e] · x) ⊙ up[e] · x).
pub struct Experts<B: Backend> {
    d: usize,
    gate: Vec<B::Weight>,
    up: Vec<B::Weight>,
    down: Vec<B::Weight>,
}

impl<B: Backend> Experts<B> {
    /// `blk.{il}.ffn_{gate,up,down}_exps.weight`: [d, ff, n], [d, ff, n], [ff, d, n].
    pub(crate) fn load(ld: &Loader<B>, il: usize, d: usize, ff: usize, n: usize) -> Result<Experts<B>, EngineError> {
        let name = |s: &str| format!("blk.{il}.ffn_{s}_exps.weight");
        Ok(Experts {
            d,
            gate: ld.experts(&name("gate"), d, ff, n)?,
            up: ld.experts(&name("up"), d, ff, n)?,
            down: ld.experts(&name("down"), ff, d, n)?,
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
            let [mut g, u] = b.matmuls([&self.gate[e], &self.up[e]], &xe); // [m × ff]
            b.swiglu(&mut g, &u);
            let y = b.matmul(&self.down[e], &g); // [m × d]
            b.add_scaled_rows(&mut out, &y, rows, weights);
        }
        out
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
