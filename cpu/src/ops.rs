//! Float element-wise and row kernels used between matmuls: norms, RoPE, activations,
//! softmax. Plain loops the compiler vectorizes; they are a small share of the time.

use half::f16;

/// RMSNorm of one row in place: x = x / sqrt(mean(x²) + eps) * w. Squares are taken in
/// f32 and summed in f64, then the mean is rounded to f32, as ggml does.
pub fn rms_norm(x: &mut [f32], w: &[f32], eps: f32) {
    debug_assert_eq!(x.len(), w.len());
    let sum_sq: f64 = x.iter().map(|&v| (v * v) as f64).sum();
    let mean = (sum_sq / x.len() as f64) as f32;
    let scale = 1.0 / (mean + eps).sqrt();
    for (v, &g) in x.iter_mut().zip(w) {
        *v = *v * scale * g;
    }
}

/// tanh-approximated GELU, as ggml computes it when `GGML_GELU_FP16` is set: the input
/// is rounded to f16 and the result looked up in a table of f16 results, saturating
/// outside ±10.
pub fn gelu_tanh(x: f32) -> f32 {
    if x <= -10.0 {
        return 0.0;
    }
    if x >= 10.0 {
        return x;
    }
    gelu_table()[f16::from_f32(x).to_bits() as usize].to_f32()
}

/// f16(gelu(h)) for every f16 bit pattern h, built on first use (128 KiB), and one
/// padding entry so that a 4-byte gather at the last entry stays inside.
fn gelu_table() -> &'static [f16] {
    static TABLE: std::sync::OnceLock<Vec<f16>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t: Vec<f16> =
            (0..=u16::MAX).map(|h| f16::from_f32(gelu_tanh_exact(f16::from_bits(h).to_f32()))).collect();
        t.push(f16::ZERO);
        t
    })
}

/// tanh-approximated GELU in f32: 0.5·x·(1 + tanh(√(2/π)·x·(1 + 0.044715·x²))).
pub fn gelu_tanh_exact(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x * x)).tanh())
}

/// GeGLU: gate[i] = gelu(gate[i]) * up[i].
pub fn geglu(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "geglu: gate and up differ in length");
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::best() == crate::Isa::Avx512 {
        // SAFETY: Isa::best() is Avx512 only when the CPU has AVX-512 F, BW and F16C.
        done = unsafe { geglu_avx512(gate, up) };
    }
    geglu_portable(&mut gate[done..], &up[done..]);
}

/// The scalar GeGLU, the reference for the vector one.
pub fn geglu_portable(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = gelu_tanh(*g) * u;
    }
}

/// [`geglu`] 16 at a time, the same table lookups (the f16 rounding of `vcvtps2ph` is
/// `f16::from_f32`'s); returns how many elements it did (the rest are left).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
fn geglu_avx512(gate: &mut [f32], up: &[f32]) -> usize {
    use std::arch::x86_64::*;
    let table = gelu_table();
    let whole = gate.len() / 16 * 16;
    let (lo, hi) = (_mm512_set1_ps(-10.0), _mm512_set1_ps(10.0));
    for (g, u) in gate[..whole].chunks_exact_mut(16).zip(up.chunks_exact(16)) {
        // SAFETY: each load and store covers the 16 floats of its chunk; the gather reads
        // 4 bytes at entry h of the table (65537 entries) for h < 65536.
        unsafe {
            let x = _mm512_loadu_ps(g.as_ptr());
            let h = _mm512_cvtepu16_epi32(_mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(x));
            let pair = _mm512_i32gather_epi32::<2>(h, table.as_ptr().cast());
            let y = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(pair));
            // Saturation as in gelu_tanh: 0 at or below -10, x at or above 10.
            let y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask::<_CMP_LE_OQ>(x, lo), _mm512_setzero_ps());
            let y = _mm512_mask_mov_ps(y, _mm512_cmp_ps_mask::<_CMP_GE_OQ>(x, hi), x);
            _mm512_storeu_ps(g.as_mut_ptr(), _mm512_mul_ps(y, _mm512_loadu_ps(u.as_ptr())));
        }
    }
    whole
}

/// Rotary embedding, NEOX style (pairs (i, i + d/2)), of one head in place.
/// `theta_scale` = base^(-2/d); the angle of pair i at position p is p·theta_scale^i.
pub fn rope_neox(head: &mut [f32], pos: u32, base: f32, freq_scale: f32) {
    let d = head.len();
    let half = d / 2;
    let theta_scale = base.powf(-2.0 / d as f32);
    let mut theta = pos as f32 * freq_scale;
    for i in 0..half {
        let (sin, cos) = theta.sin_cos();
        let (a, b) = (head[i], head[i + half]);
        head[i] = a * cos - b * sin;
        head[i + half] = a * sin + b * cos;
        theta *= theta_scale;
    }
}

/// YaRN rotary scaling (context extension) as ggml computes it: each pair's angle mixes the
/// interpolated angle (freq_scale · θ) with the original one by a ramp over the pair index
/// between the correction dims, and cos and sin are scaled by `attn_factor` · (1 + 0.1·ln
/// (1/freq_scale)).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Yarn {
    pub freq_scale: f32,
    /// 1 applies YaRN's ramp and magnitude scaling; 0 is plain linear scaling.
    pub ext_factor: f32,
    pub attn_factor: f32,
    /// First and last pair dims of the ramp.
    pub corr_dims: [f32; 2],
}

impl Yarn {
    /// llama.cpp's parameters for a context extended `factor` times beyond `orig_ctx`,
    /// with its default betas (32 and 1): the attention factor 1 + 0.1·ln(factor) that
    /// llama.cpp computes is cancelled by the same term inside the rotation, as there.
    pub fn new(n_dims: usize, base: f32, factor: f32, orig_ctx: usize) -> Yarn {
        let (beta_fast, beta_slow) = (32.0f32, 1.0f32);
        let corr_dim = |n_rot: f32| {
            n_dims as f32 * (orig_ctx as f32 / (n_rot * 2.0 * std::f32::consts::PI)).ln() / (2.0 * base.ln())
        };
        let start = corr_dim(beta_fast).floor().max(0.0);
        let end = corr_dim(beta_slow).ceil().min(n_dims as f32 - 1.0);
        let mscale = |scale: f32| if scale <= 1.0 { 1.0 } else { 0.1 * scale.ln() + 1.0 };
        let attn_factor = mscale(factor) * (1.0 / (1.0 + 0.1 * factor.ln()));
        Yarn { freq_scale: 1.0 / factor, ext_factor: 1.0, attn_factor, corr_dims: [start, end] }
    }

    /// DeepSeek's variant (`rope.scaling.yarn_log_multiplier` set): llama.cpp's attention
    /// factor is then 1/(1 + 0.1·ln(factor)), so cos and sin are unscaled overall; the
    /// magnitude correction goes into the attention scale instead (see deepseek2.rs).
    pub fn deepseek(n_dims: usize, base: f32, factor: f32, orig_ctx: usize) -> Yarn {
        Yarn { attn_factor: 1.0 / (1.0 + 0.1 * factor.ln()), ..Yarn::new(n_dims, base, factor, orig_ctx) }
    }

    /// cos and sin of pair `i` (dims 2i, 2i + 1) whose unscaled angle is `theta_extrap`.
    fn cos_sin(&self, theta_extrap: f32, i: usize) -> (f32, f32) {
        let theta_interp = self.freq_scale * theta_extrap;
        let (mut theta, mut mscale) = (theta_interp, self.attn_factor);
        if self.ext_factor != 0.0 {
            let [low, high] = self.corr_dims;
            let y = (i as f32 - low) / (high - low).max(0.001);
            let ramp_mix = (1.0 - y.clamp(0.0, 1.0)) * self.ext_factor;
            theta = theta_interp * (1.0 - ramp_mix) + theta_extrap * ramp_mix;
            mscale *= 1.0 + 0.1 * (1.0 / self.freq_scale).ln();
        }
        (theta.cos() * mscale, theta.sin() * mscale)
    }
}

/// NEOX rotary embedding (pair i is dims i and i + d/2) of one head in place, with YaRN
/// scaling, as ggml's `rope_f32` in NEOX mode.
pub fn rope_neox_yarn(head: &mut [f32], pos: u32, base: f32, yarn: &Yarn) {
    let d = head.len();
    let half = d / 2;
    let theta_scale = base.powf(-2.0 / d as f32);
    let mut theta = pos as f32;
    for i in 0..half {
        let (cos, sin) = yarn.cos_sin(theta, i);
        let (a, b) = (head[i], head[i + half]);
        head[i] = a * cos - b * sin;
        head[i + half] = a * sin + b * cos;
        theta *= theta_scale;
    }
}

/// Normal-style rotary embedding (pair i is dims 2i and 2i + 1) of one head in place,
/// with YaRN scaling, as ggml's `rope_f32` in normal mode (DeepSeek).
pub fn rope_norm_yarn(head: &mut [f32], pos: u32, base: f32, yarn: &Yarn) {
    let theta_scale = base.powf(-2.0 / head.len() as f32);
    let mut theta = pos as f32;
    for (i, pair) in head.chunks_exact_mut(2).enumerate() {
        let (cos, sin) = yarn.cos_sin(theta, i);
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * cos - b * sin;
        pair[1] = a * sin + b * cos;
        theta *= theta_scale;
    }
}

/// Rotary embedding, "normal" style (pairs (2i, 2i + 1), llama.cpp's default rope type),
/// of one head in place. As ggml computes it: the angle of pair i at position p is
/// freq_scale · p·base^(-2i/d) / factors[i], the base power advanced by repeated
/// multiplication. `factors` are Llama 3's per-pair frequency divisors (`rope_freqs`).
pub fn rope_norm(head: &mut [f32], pos: u32, base: f32, freq_scale: f32, factors: Option<&[f32]>) {
    let d = head.len();
    let theta_scale = base.powf(-2.0 / d as f32);
    let mut theta_base = pos as f32;
    for (i, pair) in head.chunks_exact_mut(2).enumerate() {
        let factor = factors.and_then(|f| f.get(i)).copied().unwrap_or(1.0);
        let (sin, cos) = (freq_scale * (theta_base / factor)).sin_cos();
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * cos - b * sin;
        pair[1] = a * sin + b * cos;
        theta_base *= theta_scale;
    }
}

/// gate = silu(gate) · up, silu(x) = x / (1 + e^-x) (SwiGLU).
pub fn swiglu(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// Softmax in place over a row; -inf entries become 0.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        x.iter_mut().for_each(|v| *v = 0.0);
        return;
    }
    let mut sum = 0.0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    let inv = (1.0 / sum) as f32;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// Softmax with an attention sink: a learned logit per head that takes part in the
/// normalization but has no value (gpt-oss), as ggml's `soft_max_ext` with sinks.
pub fn softmax_with_sink(x: &mut [f32], sink: f32) {
    let max = x.iter().copied().fold(sink, f32::max);
    let mut sum = 0.0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    sum += f64::from((sink - max).exp());
    let inv = (1.0 / sum) as f32;
    x.iter_mut().for_each(|v| *v *= inv);
}

/// gate = gpt-oss's clamped SwiGLU: g = min(gate, limit), u = clamp(up, ±limit),
/// g·σ(alpha·g)·(u + 1).
pub fn swiglu_oai(gate: &mut [f32], up: &[f32], alpha: f32, limit: f32) {
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = g.min(limit);
        let y = u.clamp(-limit, limit);
        *g = x / (1.0 + (alpha * -x).exp()) * (y + 1.0);
    }
}

/// y += x.
pub fn add_assign(y: &mut [f32], x: &[f32]) {
    for (a, &b) in y.iter_mut().zip(x) {
        *a += b;
    }
}

/// Dot product of two float rows (attention scores): the AVX2/FMA version where the CPU
/// has it, else the portable one.
pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    match crate::Isa::best() {
        // SAFETY: Isa::best() is Avx512 only when the CPU has AVX-512 F (and AVX2, FMA).
        crate::Isa::Avx512 => return unsafe { dot_f32_avx512(a, b) },
        // SAFETY: Isa::best() is Avx2 or better only when the CPU has AVX2 and FMA.
        crate::Isa::Avx2 => return unsafe { dot_f32_fma(a, b) },
        crate::Isa::Scalar => {}
    }
    dot_f32_portable(a, b)
}

/// y += s * x (attention's weighted sum of values), dispatched like [`dot_f32`].
pub fn axpy(y: &mut [f32], s: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    match crate::Isa::best() {
        // SAFETY: as in dot_f32.
        crate::Isa::Avx512 => return unsafe { axpy_avx512(y, s, x) },
        // SAFETY: as in dot_f32.
        crate::Isa::Avx2 => return unsafe { axpy_fma(y, s, x) },
        crate::Isa::Scalar => {}
    }
    axpy_portable(y, s, x)
}

/// out = Σ_k weights[k] · rows[k], accumulated in row order with fused multiply-adds:
/// the same result as zeroing `out` and calling [`axpy`] once per row, but with the sums
/// held in registers across rows (attention's weighted sum of values).
pub fn weighted_sum<'a>(out: &mut [f32], weights: &[f32], rows: impl Iterator<Item = &'a [f32]> + Clone) {
    #[cfg(target_arch = "x86_64")]
    if crate::Isa::best() == crate::Isa::Avx512 {
        // SAFETY: Isa::best() is Avx512 only when the CPU has AVX-512 F.
        return unsafe { weighted_sum_avx512(out, weights, rows) };
    }
    out.iter_mut().for_each(|o| *o = 0.0);
    for (&w, row) in weights.iter().zip(rows) {
        axpy(out, w, row);
    }
}

/// [`weighted_sum`] 128 columns at a time in eight 16-lane registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn weighted_sum_avx512<'a>(out: &mut [f32], weights: &[f32], rows: impl Iterator<Item = &'a [f32]> + Clone) {
    use std::arch::x86_64::*;
    const COLS: usize = 128;
    let whole = out.len() / COLS * COLS;
    for c in (0..whole).step_by(COLS) {
        let mut acc = [_mm512_setzero_ps(); COLS / 16];
        for (&w, row) in weights.iter().zip(rows.clone()) {
            let (w, row) = (_mm512_set1_ps(w), &row[c..c + COLS]);
            for (j, acc) in acc.iter_mut().enumerate() {
                // SAFETY: reads 16 of the 128 floats of `row`.
                *acc = _mm512_fmadd_ps(w, unsafe { _mm512_loadu_ps(row[16 * j..].as_ptr()) }, *acc);
            }
        }
        for (j, acc) in acc.iter().enumerate() {
            // SAFETY: writes 16 of the 128 floats of this chunk of `out`.
            unsafe { _mm512_storeu_ps(out[c + 16 * j..].as_mut_ptr(), *acc) };
        }
    }
    let tail = &mut out[whole..];
    tail.iter_mut().for_each(|o| *o = 0.0);
    for (&w, row) in weights.iter().zip(rows) {
        for (o, &v) in tail.iter_mut().zip(&row[whole..]) {
            *o = w.mul_add(v, *o);
        }
    }
}

/// Lanes of independent accumulators: four AVX registers, so consecutive FMAs do not
/// wait on each other's latency.
pub(crate) const LANES: usize = 32;

/// The reference dot product: 32 accumulator lanes, then their pairwise sum, then the
/// tail.
pub fn dot_f32_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; LANES];
    let (ac, bc) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ac.remainder().iter().zip(bc.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    pairwise_sum(acc) + tail
}

/// Lane i plus lane i + half, halving until one is left: a tree of 5 dependent adds
/// (which vectorizes) instead of a chain of 31.
#[inline(always)]
fn pairwise_sum(mut acc: [f32; LANES]) -> f32 {
    let mut half = LANES / 2;
    while half > 0 {
        for i in 0..half {
            acc[i] += acc[i + half];
        }
        half /= 2;
    }
    acc[0]
}

pub fn axpy_portable(y: &mut [f32], s: f32, x: &[f32]) {
    for (a, &b) in y.iter_mut().zip(x) {
        *a += s * b;
    }
}

/// [`dot_f32_portable`] with fused multiply-adds on four 8-lane registers (lanes 0..8,
/// 8..16, 16..24, 24..32 of the 32 accumulators), summed in the same pairwise tree.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn dot_f32_fma(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (ac, bc) = (a.as_chunks::<LANES>(), b.as_chunks::<LANES>());
    let mut acc = [_mm256_setzero_ps(); 4];
    for (x, y) in ac.0.iter().zip(bc.0) {
        for (k, acc) in acc.iter_mut().enumerate() {
            // SAFETY: each load reads 8 floats of a 32-float chunk.
            let (xv, yv) = unsafe { (_mm256_loadu_ps(x[8 * k..].as_ptr()), _mm256_loadu_ps(y[8 * k..].as_ptr())) };
            *acc = _mm256_fmadd_ps(xv, yv, *acc);
        }
    }
    let tail = dot_tail(ac.1, bc.1);
    let s8 = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
    sum8_pairwise(s8) + tail
}

/// Lanes i and i + 4, then i and i + 2, then 0 and 1.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma")]
fn sum8_pairwise(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)))
}

/// [`dot_f32_fma`] on two 16-lane registers: the same lanes, operations and tree, so the
/// same result.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn dot_f32_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let (ac, bc) = (a.as_chunks::<LANES>(), b.as_chunks::<LANES>());
    let mut acc = [_mm512_setzero_ps(); 2];
    for (x, y) in ac.0.iter().zip(bc.0) {
        for (k, acc) in acc.iter_mut().enumerate() {
            // SAFETY: each load reads 16 floats of a 32-float chunk.
            let (xv, yv) = unsafe { (_mm512_loadu_ps(x[16 * k..].as_ptr()), _mm512_loadu_ps(y[16 * k..].as_ptr())) };
            *acc = _mm512_fmadd_ps(xv, yv, *acc);
        }
    }
    reduce_dot_avx512(acc) + dot_tail(ac.1, bc.1)
}

/// The products of the elements after the last whole chunk of [`LANES`], summed in order
/// (the tail of every dot product here).
#[inline(always)]
pub(crate) fn dot_tail(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The 32 accumulator lanes of [`dot_f32_avx512`] (lanes 0..16, 16..32) summed in the
/// pairwise tree of [`dot_f32_portable`].
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
pub(crate) fn reduce_dot_avx512(acc: [std::arch::x86_64::__m512; 2]) -> f32 {
    use std::arch::x86_64::*;
    let s16 = _mm512_add_ps(acc[0], acc[1]);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(s16)));
    let s8 = _mm256_add_ps(_mm512_castps512_ps256(s16), hi);
    sum8_pairwise(s8)
}

#[inline(always)]
fn axpy_fused(y: &mut [f32], s: f32, x: &[f32]) {
    for (a, &b) in y.iter_mut().zip(x) {
        *a = s.mul_add(b, *a);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn axpy_fma(y: &mut [f32], s: f32, x: &[f32]) {
    axpy_fused(y, s, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn axpy_avx512(y: &mut [f32], s: f32, x: &[f32]) {
    axpy_fused(y, s, x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yarn_keeps_high_frequencies_and_interpolates_low_ones() {
        let base = 10_000.0;
        let yarn = Yarn::new(64, base, 32.0, 4096);
        let [low, high] = yarn.corr_dims;
        assert!(0.0 < low && low < high && high < 63.0, "{:?}", yarn.corr_dims);
        assert!((yarn.attn_factor - 1.0).abs() < 1e-6, "llama.cpp's factor cancels: {}", yarn.attn_factor);
        let mscale = 1.0 + 0.1 * 32f32.ln();
        // Pair 0 (fastest) keeps its angle, the last pair's is divided by 32; both are
        // scaled by mscale.
        let (mut h, p) = (vec![0.0f32; 64], 5u32);
        h[0] = 1.0;
        h[31] = 1.0;
        rope_neox_yarn(&mut h, p, base, &yarn);
        let last = p as f32 * base.powf(-62.0 / 64.0) / 32.0;
        assert!((h[0] - (p as f32).cos() * mscale).abs() < 1e-5 && (h[32] - (p as f32).sin() * mscale).abs() < 1e-5);
        assert!((h[31] - last.cos() * mscale).abs() < 1e-5 && (h[63] - last.sin() * mscale).abs() < 1e-5);
        // ext_factor 0 is plain linear scaling: NEOX RoPE at freq_scale.
        let linear = Yarn { ext_factor: 0.0, attn_factor: 1.0, ..yarn };
        let (mut a, mut b) = ((0..64).map(|i| i as f32 * 0.1).collect::<Vec<_>>(), Vec::new());
        b.clone_from(&a);
        rope_neox_yarn(&mut a, 9, base, &linear);
        rope_neox(&mut b, 9, base, 1.0 / 32.0);
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5));
    }

    #[test]
    fn a_sink_takes_its_share_of_the_softmax() {
        let mut x = vec![1.0, 2.0, 0.5];
        softmax_with_sink(&mut x, 1.5);
        let e: Vec<f32> = [1.0f32, 2.0, 0.5, 1.5].iter().map(|v| v.exp()).collect();
        let sum: f32 = e.iter().sum();
        assert!(x.iter().zip(&e).all(|(p, e)| (p - e / sum).abs() < 1e-6));
        // A sink far above every score leaves almost nothing for the keys.
        let mut y = vec![0.0, 0.0];
        softmax_with_sink(&mut y, 50.0);
        assert!(y.iter().all(|&p| p < 1e-20));
    }

    #[test]
    fn oai_swiglu_clamps_gate_and_up() {
        let (mut g, u) = (vec![0.0, 1.0, 10.0, -3.0], vec![2.0, -20.0, 0.0, 1.0]);
        swiglu_oai(&mut g, &u, 1.702, 7.0);
        let f = |x: f32, y: f32| x / (1.0 + (-1.702 * x).exp()) * (y + 1.0);
        let want = [f(0.0, 2.0), f(1.0, -7.0), f(7.0, 0.0), f(-3.0, 1.0)];
        assert!(g.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-6), "{g:?} {want:?}");
    }

    #[test]
    fn rope_norm_rotates_adjacent_pairs() {
        // Position 0 is the identity; a pair's norm is kept; pair i turns by p·base^(-2i/d).
        let mut h = vec![1.0, 2.0, 3.0, 4.0];
        rope_norm(&mut h, 0, 10_000.0, 1.0, None);
        assert_eq!(h, vec![1.0, 2.0, 3.0, 4.0]);
        let mut h = vec![1.0, 0.0, 1.0, 0.0];
        rope_norm(&mut h, 3, 100.0, 1.0, None);
        let (s0, c0) = 3.0f32.sin_cos();
        let (s1, c1) = (3.0f32 * 100f32.powf(-0.5)).sin_cos();
        assert!((h[0] - c0).abs() < 1e-6 && (h[1] - s0).abs() < 1e-6);
        assert!((h[2] - c1).abs() < 1e-6 && (h[3] - s1).abs() < 1e-6);
        // A frequency factor of 2 halves that pair's angle.
        let mut f = vec![1.0, 0.0, 1.0, 0.0];
        rope_norm(&mut f, 6, 100.0, 1.0, Some(&[2.0, 1.0]));
        assert!((f[0] - c0).abs() < 1e-6 && (f[1] - s0).abs() < 1e-6);
    }

    #[test]
    fn swiglu_is_silu_times_up() {
        let mut g = vec![0.0, 1.0, -2.0];
        swiglu(&mut g, &[5.0, 2.0, 1.0]);
        assert_eq!(g[0], 0.0);
        assert!((g[1] - 2.0 / (1.0 + (-1.0f32).exp())).abs() < 1e-6);
        assert!((g[2] - (-2.0 / (1.0 + 2.0f32.exp()))).abs() < 1e-6);
    }

    #[test]
    fn rms_norm_unit_weights_gives_unit_rms() {
        let mut x = vec![1.0, -2.0, 3.0, -4.0];
        rms_norm(&mut x, &[1.0; 4], 0.0);
        let rms = (x.iter().map(|v| v * v).sum::<f32>() / 4.0).sqrt();
        assert!((rms - 1.0).abs() < 1e-6);
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() {
        let orig: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
        let mut h = orig.clone();
        rope_neox(&mut h, 0, 10000.0, 1.0);
        assert_eq!(h, orig);
        rope_neox(&mut h, 17, 10000.0, 1.0);
        let n0: f32 = orig.iter().map(|v| v * v).sum();
        let n1: f32 = h.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
        assert_ne!(h, orig);
    }

    #[test]
    fn gelu_matches_exact_within_f16_rounding() {
        for i in -100..100 {
            let x = i as f32 * 0.13;
            let (a, b) = (gelu_tanh(x), gelu_tanh_exact(x));
            assert!((a - b).abs() <= 2e-3 * (1.0 + b.abs()), "{x}: {a} vs {b}");
        }
        assert_eq!(gelu_tanh(-11.0), 0.0);
        assert_eq!(gelu_tanh(12.0), 12.0);
    }

    #[test]
    fn fast_dot_and_axpy_match_portable() {
        for n in [0usize, 1, 7, 31, 32, 33, 256, 300] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 53 % 97) as f32 - 48.0) / 5.0).collect();
            let (fast, slow) = (dot_f32(&a, &b), dot_f32_portable(&a, &b));
            let bound = 1e-5 * a.iter().zip(&b).map(|(x, y)| (x * y).abs()).sum::<f32>().max(1.0);
            assert!((fast - slow).abs() <= bound, "n={n}: {fast} vs {slow}");
            #[cfg(target_arch = "x86_64")]
            if crate::Isa::best() == crate::Isa::Avx512 {
                // SAFETY: the CPU has AVX-512 F, AVX2 and FMA (Isa::best says so).
                let (v8, v16) = unsafe { (dot_f32_fma(&a, &b), dot_f32_avx512(&a, &b)) };
                assert_eq!(v8.to_bits(), v16.to_bits(), "n={n}: AVX2 and AVX-512 lanes differ");
            }
            let (mut y1, mut y2) = (b.clone(), b.clone());
            axpy(&mut y1, 0.37, &a);
            axpy_portable(&mut y2, 0.37, &a);
            for (p, q) in y1.iter().zip(&y2) {
                assert!((p - q).abs() <= 1e-5 * (1.0 + q.abs()), "n={n}: {p} vs {q}");
            }
        }
    }

    #[test]
    fn vector_geglu_matches_the_scalar_one_bit_for_bit() {
        let special = [-10.5, -10.0, -9.99, -1e-8, 0.0, -0.0, 1e-40, 3.0, 9.99, 10.0, 10.5, 1e6, -1e6];
        let gate: Vec<f32> = special.iter().copied().chain((0..2000).map(|i| (i as f32 - 1000.0) * 0.0123)).collect();
        let up: Vec<f32> = (0..gate.len()).map(|i| 1.0 - i as f32 * 0.001).collect();
        let (mut fast, mut slow) = (gate.clone(), gate.clone());
        geglu(&mut fast, &up);
        geglu_portable(&mut slow, &up);
        for (i, (a, b)) in fast.iter().zip(&slow).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "gate {} -> {a} vs {b}", gate[i]);
        }
    }

    #[test]
    fn weighted_sum_is_axpy_per_row() {
        for n in [1usize, 100, 128, 256, 300] {
            let rows: Vec<Vec<f32>> =
                (0..37).map(|r| (0..n).map(|i| ((i * 31 + r * 17) % 61) as f32 / 7.0 - 4.0).collect()).collect();
            let w: Vec<f32> = (0..37).map(|r| (r as f32 * 0.37).sin()).collect();
            let mut want = vec![0.0f32; n];
            for (&s, row) in w.iter().zip(&rows) {
                axpy(&mut want, s, row);
            }
            let mut got = vec![f32::NAN; n];
            weighted_sum(&mut got, &w, rows.iter().map(|r| r.as_slice()));
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "n={n}");
        }
    }

    #[test]
    fn gelu_table_is_gelu_of_the_f16_input_rounded_to_f16() {
        for i in -19_999..20_000 {
            let x = i as f32 * 0.000_5;
            let want = f16::from_f32(gelu_tanh_exact(f16::from_f32(x).to_f32())).to_f32();
            assert_eq!(gelu_tanh(x).to_bits(), want.to_bits(), "{x}");
        }
    }

    #[test]
    fn softmax_sums_to_one_and_masks() {
        let mut x = vec![1.0, 2.0, f32::NEG_INFINITY, 0.5];
        softmax(&mut x);
        assert!((x.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert_eq!(x[2], 0.0);
    }
}
