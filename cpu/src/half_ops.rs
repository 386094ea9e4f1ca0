//! Row kernels on f16 data (the KV cache): the pieces of ggml-style online-softmax
//! attention that accumulates V in f16. Each has a portable reference and an
//! AVX2/FMA/F16C version with the same per-element rounding (one FMA rounding, then
//! round-to-nearest-even to f16), so the two agree bit for bit.

use half::f16;

fn use_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::Isa::best() != crate::Isa::Scalar && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// acc[i] = f16(v[i] · s + acc[i]) (ggml's `ggml_vec_mad_f16`).
pub fn mad_f16(acc: &mut [f16], v: &[f16], s: f32) {
    assert_eq!(acc.len(), v.len(), "mad_f16: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if use_f16c() {
        // SAFETY: the CPU has AVX2, FMA and F16C; lengths are equal.
        return unsafe { x86::mad_f16(acc, v, s) };
    }
    mad_f16_portable(acc, v, s)
}

/// acc[i] = f16(acc[i] · s) (ggml's `ggml_vec_scale_f16`).
pub fn scale_f16(acc: &mut [f16], s: f32) {
    #[cfg(target_arch = "x86_64")]
    if use_f16c() {
        // SAFETY: the CPU has AVX2, FMA and F16C.
        return unsafe { x86::scale_f16(acc, s) };
    }
    scale_f16_portable(acc, s)
}

/// Σ k[i]·q[i] with f16 keys and f32 queries, accumulated in f32.
pub fn dot_f16_f32(k: &[f16], q: &[f32]) -> f32 {
    assert_eq!(k.len(), q.len(), "dot_f16_f32: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if use_f16c() {
        // SAFETY: the CPU has AVX2, FMA and F16C; lengths are equal.
        return unsafe { x86::dot_f16_f32(k, q) };
    }
    dot_f16_f32_portable(k, q)
}

/// Query rows per call of the grouped kernels: one accumulator register each.
pub const GROUP_MAX: usize = 4;

/// `out[j] = dot_f16_f32(k, qs[j])` for up to [`GROUP_MAX`] query rows, bit for bit,
/// each 8 keys converted once for all of them (the query heads that share a KV head).
pub fn dots_f16_f32(k: &[f16], qs: &[&[f32]], out: &mut [f32]) {
    assert!(qs.len() <= GROUP_MAX && out.len() == qs.len(), "dots_f16_f32: {} rows", qs.len());
    assert!(qs.iter().all(|q| q.len() == k.len()), "dots_f16_f32: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if use_f16c() {
        // SAFETY: the CPU has AVX2, FMA and F16C; lengths are equal.
        return unsafe { x86::dots_f16_f32(k, qs, out) };
    }
    qs.iter().zip(out).for_each(|(q, o)| *o = dot_f16_f32_portable(k, q));
}

/// `mad_f16(accs[j], v, s[j])` for up to [`GROUP_MAX`] accumulators, bit for bit, each 8
/// values converted once for all of them.
pub fn mads_f16(accs: &mut [Vec<f16>], v: &[f16], s: &[f32]) {
    assert!(accs.len() <= GROUP_MAX && s.len() == accs.len(), "mads_f16: {} rows", accs.len());
    assert!(accs.iter().all(|a| a.len() == v.len()), "mads_f16: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if use_f16c() {
        // SAFETY: the CPU has AVX2, FMA and F16C; lengths are equal.
        return unsafe { x86::mads_f16(accs, v, s) };
    }
    accs.iter_mut().zip(s).for_each(|(a, &s)| mad_f16_portable(a, v, s));
}

pub fn mad_f16_portable(acc: &mut [f16], v: &[f16], s: f32) {
    for (a, x) in acc.iter_mut().zip(v) {
        *a = f16::from_f32(x.to_f32().mul_add(s, a.to_f32()));
    }
}

pub fn scale_f16_portable(acc: &mut [f16], s: f32) {
    acc.iter_mut().for_each(|a| *a = f16::from_f32(a.to_f32() * s));
}

/// Eight f32 lanes accumulated like the x86 version (lane i takes elements i mod 8),
/// then summed.
pub fn dot_f16_f32_portable(k: &[f16], q: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    for (i, (a, &b)) in k.iter().zip(q).enumerate() {
        lanes[i % 8] = a.to_f32().mul_add(b, lanes[i % 8]);
    }
    lanes.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    fn load_ph(x: &[f16]) -> __m256 {
        debug_assert!(x.len() >= 8);
        // SAFETY: reads 8 f16 (16 bytes) from a slice of at least 8.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(x.as_ptr().cast())) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    fn store_ph(x: &mut [f16], v: __m256) {
        debug_assert!(x.len() >= 8);
        // SAFETY: writes 8 f16 (16 bytes) into a slice of at least 8.
        unsafe { _mm_storeu_si128(x.as_mut_ptr().cast(), _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v)) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn mad_f16(acc: &mut [f16], v: &[f16], s: f32) {
        let sv = _mm256_set1_ps(s);
        let (mut a8, mut v8) = (acc.chunks_exact_mut(8), v.chunks_exact(8));
        for (a, x) in (&mut a8).zip(&mut v8) {
            let r = _mm256_fmadd_ps(load_ph(x), sv, load_ph(a));
            store_ph(a, r);
        }
        super::mad_f16_portable(a8.into_remainder(), v8.remainder(), s);
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn scale_f16(acc: &mut [f16], s: f32) {
        let sv = _mm256_set1_ps(s);
        let mut a8 = acc.chunks_exact_mut(8);
        for a in &mut a8 {
            let r = _mm256_mul_ps(load_ph(a), sv);
            store_ph(a, r);
        }
        super::scale_f16_portable(a8.into_remainder(), s);
    }

    /// 8 floats of `x` from `at`.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn load_ps(x: &[f32], at: usize) -> __m256 {
        let x = &x[at..at + 8];
        // SAFETY: reads the 8 floats of `x`.
        unsafe { _mm256_loadu_ps(x.as_ptr()) }
    }

    /// The lanes summed as `dot_f16_f32` sums them, plus the portable tail.
    #[target_feature(enable = "avx2,fma,f16c")]
    fn finish(acc: __m256, tail: f32) -> f32 {
        let mut lanes = [0.0f32; 8];
        // SAFETY: writes 8 floats into an array of 8.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
        lanes.iter().sum::<f32>() + tail
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dots_f16_f32(k: &[f16], qs: &[&[f32]], out: &mut [f32]) {
        let whole = k.len() / 8 * 8;
        let mut acc = [_mm256_setzero_ps(); super::GROUP_MAX];
        for c in (0..whole).step_by(8) {
            let kv = load_ph(&k[c..]);
            for (a, q) in acc.iter_mut().zip(qs) {
                *a = _mm256_fmadd_ps(kv, load_ps(q, c), *a);
            }
        }
        for ((o, a), q) in out.iter_mut().zip(acc).zip(qs) {
            *o = finish(a, super::dot_f16_f32_portable(&k[whole..], &q[whole..]));
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn mads_f16(accs: &mut [Vec<f16>], v: &[f16], s: &[f32]) {
        let whole = v.len() / 8 * 8;
        let mut sv = [_mm256_setzero_ps(); super::GROUP_MAX];
        sv.iter_mut().zip(s).for_each(|(sv, &s)| *sv = _mm256_set1_ps(s));
        for c in (0..whole).step_by(8) {
            let x = load_ph(&v[c..]);
            for (a, sv) in accs.iter_mut().zip(sv) {
                let r = _mm256_fmadd_ps(x, sv, load_ph(&a[c..]));
                store_ph(&mut a[c..], r);
            }
        }
        for (a, &s) in accs.iter_mut().zip(s) {
            super::mad_f16_portable(&mut a[whole..], &v[whole..], s);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn dot_f16_f32(k: &[f16], q: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let (k8, q8) = (k.chunks_exact(8), q.chunks_exact(8));
        let tail = super::dot_f16_f32_portable(k8.remainder(), q8.remainder());
        for (a, b) in k8.zip(q8) {
            // SAFETY: reads the 8 floats of `b`.
            let bv = unsafe { _mm256_loadu_ps(b.as_ptr()) };
            acc = _mm256_fmadd_ps(load_ph(a), bv, acc);
        }
        finish(acc, tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(n: usize, seed: u32) -> Vec<f16> {
        (0..n)
            .map(|i| f16::from_f32((((i as u32).wrapping_mul(2654435761) ^ seed) % 2001) as f32 / 100.0 - 10.0))
            .collect()
    }

    #[test]
    fn fast_paths_equal_portable_bit_for_bit() {
        for n in [0usize, 1, 7, 8, 9, 64, 256, 259] {
            let v = row(n, 7);
            let (mut a, mut b) = (row(n, 3), row(n, 3));
            mad_f16(&mut a, &v, 0.731);
            mad_f16_portable(&mut b, &v, 0.731);
            assert_eq!(a, b, "mad n={n}");
            scale_f16(&mut a, 0.377);
            scale_f16_portable(&mut b, 0.377);
            assert_eq!(a, b, "scale n={n}");
        }
    }

    /// The grouped kernels give each row exactly what the one-row kernels give it.
    #[test]
    fn grouped_kernels_equal_one_row_bit_for_bit() {
        for n in [1usize, 8, 13, 256] {
            for g in 1..=GROUP_MAX {
                let k = row(n, 5);
                let qs: Vec<Vec<f32>> =
                    (0..g).map(|j| (0..n).map(|i| ((i * 7 + j * 3) as f32 * 0.37).sin()).collect()).collect();
                let q_refs: Vec<&[f32]> = qs.iter().map(Vec::as_slice).collect();
                let mut dots = vec![0.0; g];
                dots_f16_f32(&k, &q_refs, &mut dots);
                for (d, q) in dots.iter().zip(&qs) {
                    assert_eq!(d.to_bits(), dot_f16_f32(&k, q).to_bits(), "dots n={n} g={g}");
                }
                let scales: Vec<f32> = (0..g).map(|j| 0.3 + j as f32 * 0.21).collect();
                let mut accs: Vec<Vec<f16>> = (0..g).map(|j| row(n, 17 + j as u32)).collect();
                let mut want = accs.clone();
                mads_f16(&mut accs, &k, &scales);
                want.iter_mut().zip(&scales).for_each(|(a, &s)| mad_f16(a, &k, s));
                assert_eq!(accs, want, "mads n={n} g={g}");
            }
        }
    }

    #[test]
    fn dot_matches_portable_and_f64() {
        for n in [1usize, 8, 13, 256] {
            let k = row(n, 11);
            let q: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let exact: f64 = k.iter().zip(&q).map(|(a, &b)| a.to_f32() as f64 * b as f64).sum();
            let (fast, slow) = (dot_f16_f32(&k, &q), dot_f16_f32_portable(&k, &q));
            let bound = 1e-5 * k.iter().zip(&q).map(|(a, b)| (a.to_f32() * b).abs()).sum::<f32>().max(1.0);
            assert!(
                (fast - slow).abs() <= bound && (fast as f64 - exact).abs() <= bound as f64,
                "n={n}: {fast} {slow} {exact}"
            );
        }
    }
}
