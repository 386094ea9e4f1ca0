//! The kernel sources, embedded. Each is compiled as `COMMON` followed by its own text
//! (NVRTC is given no include path).

/// Helpers every source uses (f16 conversion, unaligned loads, warp and block sums).
pub const COMMON: &str = include_str!("../kernels/common.cuh");

/// (name, source) of every kernel file.
pub const SOURCES: [(&str, &str); 3] = [
    ("quantize", include_str!("../kernels/quantize.cu")),
    ("matvec", include_str!("../kernels/matvec.cu")),
    ("elementwise", include_str!("../kernels/elementwise.cu")),
];

/// The architectures kernels are built for: Ampere (A100) and Hopper (H100, H200).
pub const ARCHS: [&str; 2] = ["sm_80", "sm_90a"];

/// The text NVRTC compiles for `source`.
pub fn full_source(source: &str) -> String {
    format!("{COMMON}\n{source}")
}

/// The entry points (`extern "C" __global__` functions) a source defines, for checks and
/// for loading: those written out and those a `MATVEC(name, ...)` line instantiates
/// (the macros' own definitions, continued with `\`, are skipped).
pub fn entry_points(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in source.lines().map(str::trim).filter(|l| !l.ends_with('\\')) {
        let name = if let Some(rest) = line.strip_prefix("extern \"C\" __global__ void ") {
            rest.split('(').next()
        } else if line.starts_with("MATVEC(") {
            line.split('(').nth(1).and_then(|r| r.split(',').next())
        } else {
            None
        };
        names.extend(name.map(|n| n.trim().to_string()));
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_points_are_found_in_every_source() {
        let all: Vec<String> = SOURCES.iter().flat_map(|(_, s)| entry_points(s)).collect();
        for name in ["quantize_q8", "matvec_q8_0", "matvec_q6_k", "rms_norm", "rope_neox", "softmax_rows", "embed_q8_0"]
        {
            assert!(all.iter().any(|n| n == name), "{name} missing from {all:?}");
        }
        assert!(!all.iter().any(|n| n == "NAME"), "a macro definition counted: {all:?}");
    }
}
