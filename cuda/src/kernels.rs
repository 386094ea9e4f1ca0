//! The kernel sources, embedded. Each is compiled as `COMMON` followed by its own text
//! (NVRTC is given no include path).

/// Helpers every source uses (f16 conversion, unaligned loads, warp and block sums).
pub const COMMON: &str = include_str!("../kernels/common.cuh");

/// (name, source) of every kernel file.
pub const SOURCES: [(&str, &str); 9] = [
    ("quantize", include_str!("../kernels/quantize.cu")),
    ("matvec", include_str!("../kernels/matvec.cu")),
    ("matmul", include_str!("../kernels/matmul.cu")),
    ("elementwise", include_str!("../kernels/elementwise.cu")),
    ("embed", include_str!("../kernels/embed.cu")),
    ("attention", include_str!("../kernels/attention.cu")),
    ("moe", include_str!("../kernels/moe.cu")),
    ("sample", include_str!("../kernels/sample.cu")),
    ("backend", include_str!("../kernels/backend.cu")),
];

/// The architectures kernels are built for: Ampere (A100) and Hopper (H100, H200).
pub const ARCHS: [&str; 2] = ["sm_80", "sm_90a"];

/// The text NVRTC compiles for `source`.
pub fn full_source(source: &str) -> String {
    format!("{COMMON}\n{source}")
}

/// The macros that define a kernel named by their first argument, used at the start of a
/// line (`MATVEC(matvec_q8_0, ...)`).
pub const KERNEL_MACROS: [&str; 7] =
    ["MATVEC", "MATMUL", "MATVEC_ID", "KV_STORE", "ATTN_SPLIT", "EMBED", "MATMUL_FLOAT"];

/// The entry points (`extern "C" __global__` functions) a source defines, for checks and
/// for loading: those written out and those a [`KERNEL_MACROS`] line instantiates (the
/// macros' own definitions, continued with `\`, are skipped).
pub fn entry_points(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in source.lines().map(str::trim).filter(|l| !l.ends_with('\\')) {
        let name = if let Some(rest) = line.strip_prefix("extern \"C\" __global__ void ") {
            // `__launch_bounds__(n)` may come between the return type and the name.
            let rest =
                rest.strip_prefix("__launch_bounds__(").map_or(rest, |r| r.split_once(')').map_or(r, |(_, n)| n));
            rest.split('(').next()
        } else if let Some((head, rest)) = line.split_once('(') {
            KERNEL_MACROS.contains(&head).then(|| rest.split(',').next()).flatten()
        } else {
            None
        };
        names.extend(name.map(|n| n.trim().to_string()).filter(|n| !n.is_empty()));
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_points_are_found_in_every_source() {
        let all: Vec<String> = SOURCES.iter().flat_map(|(_, s)| entry_points(s)).collect();
        let expected = [
            "quantize_q8",
            "matvec_q8_0",
            "matvec_q6_k",
            "matmul_q4_k",
            "matmul_mxfp4",
            "matvec_id_q6_k",
            "rms_norm",
            "rope_neox",
            "softmax_rows",
            "embed_q8_0",
            "embed_q4_k",
            "embed_f16",
            "kv_store_f16",
            "attn_split_f16_128",
            "attn_split_f32_576",
            "attn_combine",
            "moe_route",
            "moe_combine",
            "argmax_rows",
            "quantize_q8_0_exact",
            "quantize_q8_k_exact",
            "matmul_float_f32",
            "matmul_float_bf16",
            "rms_norm_exact",
            "rope_exact",
            "geglu_exact",
            "add_scaled_rows",
            "gather_cols",
            "copy_cols",
        ];
        for name in expected {
            assert!(all.iter().any(|n| n == name), "{name} missing from {all:?}");
        }
        let mut unique = all.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), all.len(), "a kernel name twice: {all:?}");
        assert!(!all.iter().any(|n| n == "NAME"), "a macro definition counted: {all:?}");
        assert!(!all.iter().any(|n| n.contains(' ') || n.contains("__launch_bounds__")), "{all:?}");
    }
}
