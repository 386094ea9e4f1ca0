//! Scalar pieces the kernels share: block header reads, codebooks, scale unpacking.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

/// `kvalues_iq4nl`: the IQ4_NL non-linear 4-bit codebook.
pub(super) const KVALUES_IQ4NL: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];

/// `kvalues_mxfp4`: E2M1 values doubled so they are integers; the block scale
/// (`e8m0_to_f32_half`) takes the ½ back.
pub(super) const KVALUES_MXFP4: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// `N` bytes of `b` from `off` as an array. With a fixed-size `b` and a constant
/// offset the bounds check folds away.
#[inline(always)]
pub(super) fn at<const N: usize>(b: &[u8], off: usize) -> &[u8; N] {
    b[off..off + N].try_into().unwrap()
}

#[inline(always)]
pub(super) fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(*at(b, off))
}

/// The f16 at byte `off`, converted without F16C (which `Isa::Avx2` does not promise).
#[inline(always)]
pub(super) fn f16_at(b: &[u8], off: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes(*at(b, off)))
}

#[inline(always)]
pub(super) fn f32_at(b: &[u8], off: usize) -> f32 {
    f32::from_le_bytes(*at(b, off))
}

/// IEEE half to float with integer operations only, so no float operation ever sees a
/// subnormal (which costs a microcode assist on x86): normals get their exponent
/// rebiased (+112), subnormals (m·2^-24) are converted from the integer m,
/// Inf/NaN get the f32 all-ones exponent.
#[inline(always)]
pub(super) fn f16_to_f32(h: u16) -> f32 {
    let em = (h & 0x7fff) as u32;
    let sign = ((h & 0x8000) as u32) << 16;
    let magnitude = if em < 0x0400 {
        (em as f32 * f32::from_bits(0x3380_0000)).to_bits() // × 2^-24
    } else if em < 0x7c00 {
        (em << 13) + (112 << 23)
    } else {
        (em << 13) | 0x7f80_0000
    };
    f32::from_bits(magnitude | sign)
}

/// `GGML_E8M0_TO_FP32_HALF`: 2^(e-128), i.e. half the E8M0 scale 2^(e-127).
#[inline(always)]
pub(super) fn e8m0_to_f32_half(e: u8) -> f32 {
    if e < 2 {
        // 2^-128 and 2^-127 are f32 subnormals.
        f32::from_bits(0x0020_0000 << e)
    } else {
        f32::from_bits(((e - 1) as u32) << 23)
    }
}

/// The 8 six-bit scales and 8 mins of a Q4_K/Q5_K block (`scales[12]`), as
/// `get_scale_min_k4` defines them, packed as bytes 0..8 = scales, 8..16 = mins.
#[inline(always)]
pub(super) fn unpack_k4_scales(s: &[u8; 12]) -> [u32; 4] {
    const LOW6: u32 = 0x3f3f_3f3f;
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let q = [u32_at(s, 0), u32_at(s, 4), u32_at(s, 8)];
    [
        q[0] & LOW6,
        (q[2] & LOW4) | (((q[0] >> 6) & LOW2) << 4),
        q[1] & LOW6,
        ((q[2] >> 4) & LOW4) | (((q[1] >> 6) & LOW2) << 4),
    ]
}

/// The 16 six-bit scales of a Q3_K block (`scales[12]`), still biased by 32: the low
/// 4 bits come from the nibbles of bytes 0..8, the high 2 bits from bytes 8..12.
#[inline(always)]
pub(super) fn unpack_q3_scales(s: &[u8; 12]) -> [u32; 4] {
    const LOW4: u32 = 0x0f0f_0f0f;
    const LOW2: u32 = 0x0303_0303;
    let q = [u32_at(s, 0), u32_at(s, 4), u32_at(s, 8)];
    [
        (q[0] & LOW4) | ((q[2] & LOW2) << 4),
        (q[1] & LOW4) | (((q[2] >> 2) & LOW2) << 4),
        ((q[0] >> 4) & LOW4) | (((q[2] >> 4) & LOW2) << 4),
        ((q[1] >> 4) & LOW4) | (((q[2] >> 6) & LOW2) << 4),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_matches_half_for_every_value() {
        for h in 0..=u16::MAX {
            let want = half::f16::from_bits(h).to_f32();
            let got = f16_to_f32(h);
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), "{h:#06x}: {got} vs {want}");
        }
    }

    #[test]
    fn e8m0_half_is_two_to_the_e_minus_128() {
        for e in 0..=255u8 {
            assert_eq!(e8m0_to_f32_half(e), 2f64.powi(e as i32 - 128) as f32, "e = {e}");
        }
    }

    /// Scale unpacking against `get_scale_min_k4` and ggml's Q3_K loop, written plainly.
    #[test]
    fn scale_unpacking_matches_plain_definitions() {
        let mut x = 0x9e37_79b9u32;
        for _ in 0..1000 {
            let mut s = [0u8; 12];
            for b in &mut s {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
            let bytes = |u: [u32; 4]| -> Vec<u8> { u.iter().flat_map(|v| v.to_le_bytes()).collect() };
            let k4 = bytes(unpack_k4_scales(&s));
            for j in 0..8 {
                let (sc, m) = if j < 4 {
                    (s[j] & 63, s[j + 4] & 63)
                } else {
                    ((s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
                };
                assert_eq!((k4[j], k4[j + 8]), (sc, m));
            }
            let q3 = bytes(unpack_q3_scales(&s));
            for j in 0..16 {
                let low = if j < 8 { s[j] & 0xf } else { s[j - 8] >> 4 };
                let high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
                assert_eq!(q3[j], low | (high << 4), "q3 scale {j}");
            }
        }
    }
}
