//! Token sampling with Ollama's options, applied in llama.cpp's order:
//! penalties → top-k → typical-p → top-p → min-p → temperature → draw.
//! A temperature of 0 (or below) is greedy: the highest raw logit, lowest id on ties, with
//! no penalties (as llama.cpp's greedy sampler and Ollama's temperature 0).

use std::collections::{HashMap, VecDeque};

/// Sampling options with Ollama's names and defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplerParams {
    pub temperature: f32,
    /// Keep the k most likely tokens (≤ 0: all).
    pub top_k: i32,
    /// Keep the smallest set whose probability reaches p (≥ 1: all).
    pub top_p: f32,
    /// Drop tokens less likely than min_p × the most likely one.
    pub min_p: f32,
    /// Locally typical sampling (≥ 1: off).
    pub typical_p: f32,
    /// Penalty on tokens seen in the last `repeat_last_n` (1: off).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalties look at (0: none, -1: all seen).
    pub repeat_last_n: i32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    /// The same seed gives the same tokens; None draws a seed from the clock.
    pub seed: Option<u64>,
}

impl Default for SamplerParams {
    fn default() -> Self {
        SamplerParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.0,
            typical_p: 1.0,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
        }
    }
}

impl SamplerParams {
    /// Greedy decoding with no penalties.
    pub fn greedy() -> Self {
        SamplerParams { temperature: 0.0, repeat_penalty: 1.0, ..Self::default() }
    }
}

/// A small, fast, seedable generator (SplitMix64); quality is ample for sampling.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Clone, Copy, Debug)]
struct Candidate {
    id: u32,
    logit: f32,
    p: f32,
}

pub struct Sampler {
    params: SamplerParams,
    rng: Rng,
    /// Recent tokens for the penalties, newest last.
    history: VecDeque<u32>,
}

impl Sampler {
    pub fn new(params: SamplerParams) -> Sampler {
        let seed = params.seed.unwrap_or_else(|| {
            let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            t.as_nanos() as u64
        });
        Sampler { params, rng: Rng::new(seed), history: VecDeque::new() }
    }

    pub fn params(&self) -> &SamplerParams {
        &self.params
    }

    /// Records a token (prompt or generated) for the repetition penalties.
    pub fn accept(&mut self, token: u32) {
        let cap = match self.params.repeat_last_n {
            n if n < 0 => usize::MAX,
            n => n as usize,
        };
        if cap == 0 {
            return;
        }
        if self.history.len() == cap {
            self.history.pop_front();
        }
        self.history.push_back(token);
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let mut logits = logits.to_vec();
        self.apply_penalties(&mut logits);
        let mut c = candidates(&logits);
        top_k(&mut c, self.params.top_k);
        self.draw(c)
    }

    /// [`Sampler::sample`] among the tokens `allowed` accepts (structured outputs): the
    /// penalties, then top-k over the allowed tokens only (asked about most likely first,
    /// so most of the vocabulary is never asked), then the rest as usual; greedy takes
    /// the most likely allowed token. None when no token is allowed.
    pub fn sample_allowed(&mut self, logits: &[f32], allowed: &mut dyn FnMut(u32) -> bool) -> Option<u32> {
        let greedy = self.params.temperature <= 0.0;
        let c = match greedy {
            true => candidates(logits),
            false => {
                let mut penalized = logits.to_vec();
                self.apply_penalties(&mut penalized);
                candidates(&penalized)
            }
        };
        let want = match (greedy, self.params.top_k) {
            (true, _) => 1,
            (false, k) if k > 0 => k as usize,
            _ => usize::MAX,
        };
        let c = most_likely_allowed(c, want, allowed);
        match (c.first(), greedy) {
            (None, _) => None,
            (Some(best), true) => Some(best.id),
            (Some(_), false) => Some(self.draw(c)),
        }
    }

    /// Typical-p, top-p, min-p, temperature and the draw over candidates sorted most
    /// likely first.
    fn draw(&mut self, mut c: Vec<Candidate>) -> u32 {
        typical_p(&mut c, self.params.typical_p);
        top_p(&mut c, self.params.top_p);
        min_p(&mut c, self.params.min_p);
        c.iter_mut().for_each(|x| x.logit /= self.params.temperature);
        softmax(&mut c);
        let r = self.rng.next_f64() as f32;
        let mut acc = 0.0;
        for x in &c {
            acc += x.p;
            if r < acc {
                return x.id;
            }
        }
        c.last().map_or(0, |x| x.id)
    }

    /// Repeat penalty (divide positive logits, multiply negative ones), then frequency
    /// and presence penalties, for tokens in the recent history.
    fn apply_penalties(&self, logits: &mut [f32]) {
        let p = &self.params;
        if self.history.is_empty()
            || (p.repeat_penalty == 1.0 && p.frequency_penalty == 0.0 && p.presence_penalty == 0.0)
        {
            return;
        }
        let mut counts: HashMap<u32, u32> = HashMap::new();
        for &t in &self.history {
            *counts.entry(t).or_default() += 1;
        }
        for (&t, &n) in &counts {
            let Some(l) = logits.get_mut(t as usize) else {
                continue;
            };
            *l = if *l <= 0.0 { *l * p.repeat_penalty } else { *l / p.repeat_penalty };
            *l -= n as f32 * p.frequency_penalty + p.presence_penalty;
        }
    }
}

/// Index of the largest value; the lowest index wins ties.
pub fn argmax(x: &[f32]) -> u32 {
    // The maximum in 16 independent lanes (a loop the compiler vectorizes; NaN never
    // wins a comparison, as below), then its first position.
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for chunk in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    x.iter().position(|&v| v == max).unwrap_or(0) as u32
}

/// [`argmax`] as a plain scan: the reference it is tested against.
#[cfg(test)]
fn argmax_scan(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// Every token, by id.
fn candidates(logits: &[f32]) -> Vec<Candidate> {
    logits.iter().enumerate().map(|(i, &l)| Candidate { id: i as u32, logit: l, p: 0.0 }).collect()
}

/// Most likely first; the lowest id first among equals (as [`argmax`]).
fn rank(a: &Candidate, b: &Candidate) -> std::cmp::Ordering {
    b.logit.total_cmp(&a.logit).then(a.id.cmp(&b.id))
}

/// The first `want` candidates `allowed` accepts, in rank order, asking in windows of
/// growing size so that only the likely part of the vocabulary is ranked and asked.
fn most_likely_allowed(mut c: Vec<Candidate>, want: usize, allowed: &mut dyn FnMut(u32) -> bool) -> Vec<Candidate> {
    let mut out = Vec::new();
    let (mut start, mut window) = (0, 256usize);
    while start < c.len() && out.len() < want {
        let rest = &mut c[start..];
        let n = window.min(rest.len());
        if n < rest.len() {
            rest.select_nth_unstable_by(n - 1, rank);
        }
        rest[..n].sort_by(rank);
        for x in &rest[..n] {
            if out.len() < want && allowed(x.id) {
                out.push(*x);
            }
        }
        start += n;
        window = window.saturating_mul(8);
    }
    out
}

fn sort_desc(c: &mut [Candidate]) {
    c.sort_by(rank);
}

fn top_k(c: &mut Vec<Candidate>, k: i32) {
    if k > 0 && (k as usize) < c.len() {
        let k = k as usize;
        c.select_nth_unstable_by(k - 1, rank);
        c.truncate(k);
    }
    sort_desc(c);
}

fn softmax(c: &mut [Candidate]) {
    let max = c.iter().map(|x| x.logit).fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f64;
    for x in c.iter_mut() {
        x.p = (x.logit - max).exp();
        sum += x.p as f64;
    }
    c.iter_mut().for_each(|x| x.p = (x.p as f64 / sum) as f32);
}

/// Keeps the smallest prefix (by probability) whose mass reaches p.
fn top_p(c: &mut Vec<Candidate>, p: f32) {
    if p >= 1.0 {
        return;
    }
    softmax(c);
    let mut acc = 0.0;
    let mut keep = c.len();
    for (i, x) in c.iter().enumerate() {
        acc += x.p;
        if acc >= p {
            keep = i + 1;
            break;
        }
    }
    c.truncate(keep.max(1));
}

/// Drops candidates whose probability is below min_p × the top one.
fn min_p(c: &mut Vec<Candidate>, min_p: f32) {
    if min_p <= 0.0 || c.is_empty() {
        return;
    }
    let threshold = c[0].logit + min_p.ln();
    let keep = c.iter().take_while(|x| x.logit >= threshold).count();
    c.truncate(keep.max(1));
}

/// Locally typical sampling: keeps the tokens whose surprisal is closest to the
/// distribution's entropy until their mass reaches p.
fn typical_p(c: &mut Vec<Candidate>, p: f32) {
    if p >= 1.0 || c.is_empty() {
        return;
    }
    softmax(c);
    let entropy: f32 = c.iter().filter(|x| x.p > 0.0).map(|x| -x.p * x.p.ln()).sum();
    let mut order: Vec<(f32, Candidate)> = c.iter().map(|x| ((-x.p.ln() - entropy).abs(), *x)).collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut acc = 0.0;
    let mut keep = order.len();
    for (i, (_, x)) in order.iter().enumerate() {
        acc += x.p;
        if acc > p {
            keep = i + 1;
            break;
        }
    }
    *c = order.into_iter().take(keep.max(1)).map(|(_, x)| x).collect();
    sort_desc(c);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.5, -1.0, 3.0, 0.0]
    }

    #[test]
    fn greedy_takes_lowest_index_of_max() {
        let mut s = Sampler::new(SamplerParams::greedy());
        assert_eq!(s.sample(&logits()), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_different_seed_differs() {
        let l: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 1000) as f32 / 300.0).collect();
        let run = |seed| {
            let p = SamplerParams { seed: Some(seed), top_k: 0, top_p: 1.0, temperature: 1.5, ..Default::default() };
            let mut s = Sampler::new(p);
            (0..50).map(|_| s.sample(&l)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let p = SamplerParams { top_k: 1, seed: Some(1), ..Default::default() };
        let mut s = Sampler::new(p);
        for _ in 0..20 {
            assert_eq!(s.sample(&logits()), 1);
        }
    }

    /// top_k = 1 at temperature 1: deterministic, and penalties apply.
    fn penalized(p: SamplerParams) -> Sampler {
        Sampler::new(SamplerParams { temperature: 1.0, top_k: 1, seed: Some(0), ..p })
    }

    #[test]
    fn greedy_ignores_penalties() {
        let mut s = Sampler::new(SamplerParams { repeat_penalty: 2.0, ..SamplerParams::greedy() });
        s.accept(1);
        assert_eq!(s.sample(&logits()), 1);
    }

    #[test]
    fn repeat_penalty_moves_the_choice() {
        let mut s = penalized(SamplerParams { repeat_penalty: 2.0, ..SamplerParams::default() });
        s.accept(1);
        s.accept(4);
        // 3.0 / 2 = 1.5 for ids 1 and 4; id 2 (2.5) now wins.
        assert_eq!(s.sample(&logits()), 2);
    }

    #[test]
    fn presence_and_frequency_penalties_subtract() {
        let p =
            SamplerParams { frequency_penalty: 0.4, presence_penalty: 0.2, repeat_penalty: 1.0, ..Default::default() };
        let mut s = penalized(p);
        s.accept(1);
        s.accept(1);
        s.accept(4);
        // id 1: 3 - 0.8 - 0.2 = 2.0; id 4: 3 - 0.4 - 0.2 = 2.4; id 2: 2.5 wins.
        assert_eq!(s.sample(&logits()), 2);
    }

    #[test]
    fn min_p_and_top_p_only_keep_likely_tokens() {
        let l = vec![10.0, 9.9, 0.0, -5.0];
        for p in [
            SamplerParams { min_p: 0.5, top_k: 0, top_p: 1.0, temperature: 1.0, ..Default::default() },
            SamplerParams { min_p: 0.0, top_k: 0, top_p: 0.9, temperature: 1.0, ..Default::default() },
        ] {
            let mut s = Sampler::new(SamplerParams { seed: Some(3), ..p });
            for _ in 0..200 {
                assert!(s.sample(&l) <= 1);
            }
        }
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p = softmax([ln 1, ln 3]) = [0.25, 0.75].
        let l = vec![0.0, 3f32.ln()];
        let mut s = Sampler::new(SamplerParams {
            top_k: 0,
            top_p: 1.0,
            temperature: 1.0,
            seed: Some(11),
            ..Default::default()
        });
        let ones = (0..4000).filter(|_| s.sample(&l) == 1).count();
        assert!((2850..3150).contains(&ones), "{ones}");
    }

    #[test]
    fn repeat_last_n_bounds_history() {
        let mut s = penalized(SamplerParams { repeat_last_n: 2, repeat_penalty: 100.0, ..SamplerParams::default() });
        s.accept(1);
        s.accept(5);
        s.accept(5);
        // id 1 left the window: it is not penalized.
        assert_eq!(s.sample(&logits()), 1);
    }

    #[test]
    fn argmax_equals_the_plain_scan() {
        let mut cases: Vec<Vec<f32>> = vec![vec![], vec![f32::NAN; 40], vec![f32::NEG_INFINITY; 33], vec![2.0; 37]];
        for n in [1usize, 15, 16, 17, 100, 1000] {
            cases.push((0..n).map(|i| ((i * 7919) % 97) as f32 - 48.0).collect());
            let mut with_nan: Vec<f32> = (0..n).map(|i| (i % 13) as f32).collect();
            with_nan[n / 2] = f32::NAN;
            cases.push(with_nan);
        }
        for x in &cases {
            assert_eq!(argmax(x), argmax_scan(x), "{x:?}");
        }
    }

    /// Constrained sampling takes the most likely allowed token, asks about few tokens
    /// of a large vocabulary, and keeps top-k among the allowed ones only.
    #[test]
    fn sampling_among_allowed_tokens() {
        let logits: Vec<f32> = (0..100_000).map(|i| ((i * 7919) % 100_000) as f32 / 1000.0).collect();
        let order = {
            let mut ids: Vec<u32> = (0..100_000).collect();
            ids.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]).then(a.cmp(&b)));
            ids
        };
        let mut asked = 0;
        let even = &mut |id: u32| {
            asked += 1;
            id % 2 == 0
        };
        let mut greedy = Sampler::new(SamplerParams::greedy());
        let best_even = *order.iter().find(|&&id| id % 2 == 0).unwrap();
        assert_eq!(greedy.sample_allowed(&logits, even), Some(best_even));
        assert!(asked <= 256, "asked about {asked} tokens");
        // Sampled with top_k 3: always one of the three most likely even tokens.
        let top3: Vec<u32> = order.iter().copied().filter(|id| id % 2 == 0).take(3).collect();
        let mut s = Sampler::new(SamplerParams { top_k: 3, top_p: 1.0, seed: Some(1), ..SamplerParams::default() });
        for _ in 0..50 {
            let t = s.sample_allowed(&logits, &mut |id| id % 2 == 0).unwrap();
            assert!(top3.contains(&t), "{t} not among {top3:?}");
        }
        // Allowed tokens deep in the ranking are still found; none allowed gives None.
        let last = *order.last().unwrap();
        assert_eq!(greedy.sample_allowed(&logits, &mut |id| id == last), Some(last));
        assert_eq!(greedy.sample_allowed(&logits, &mut |_| false), None);
    }
}
