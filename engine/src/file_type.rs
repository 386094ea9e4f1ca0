//! `general.file_type` (llama.cpp's `llama_ftype`): the short names Ollama shows and the
//! descriptions llama.cpp prints (llama-bench's model column), from one table.

/// (id, Ollama's short name, llama.cpp's description).
const FILE_TYPES: &[(u32, &str, &str)] = &[
    (0, "F32", "all F32"),
    (1, "F16", "F16"),
    (2, "Q4_0", "Q4_0"),
    (3, "Q4_1", "Q4_1"),
    (7, "Q8_0", "Q8_0"),
    (8, "Q5_0", "Q5_0"),
    (9, "Q5_1", "Q5_1"),
    (10, "Q2_K", "Q2_K - Medium"),
    (11, "Q3_K_S", "Q3_K - Small"),
    (12, "Q3_K_M", "Q3_K - Medium"),
    (13, "Q3_K_L", "Q3_K - Large"),
    (14, "Q4_K_S", "Q4_K - Small"),
    (15, "Q4_K_M", "Q4_K - Medium"),
    (16, "Q5_K_S", "Q5_K - Small"),
    (17, "Q5_K_M", "Q5_K - Medium"),
    (18, "Q6_K", "Q6_K"),
    (19, "IQ2_XXS", "IQ2_XXS - 2.0625 bpw"),
    (20, "IQ2_XS", "IQ2_XS - 2.3125 bpw"),
    (21, "Q2_K_S", "Q2_K - Small"),
    (22, "IQ3_XS", "IQ3_XS - 3.3 bpw"),
    (23, "IQ3_XXS", "IQ3_XXS - 3.0625 bpw"),
    (24, "IQ1_S", "IQ1_S - 1.5625 bpw"),
    (25, "IQ4_NL", "IQ4_NL - 4.5 bpw"),
    (26, "IQ3_S", "IQ3_S - 3.4375 bpw"),
    (27, "IQ3_M", "IQ3_S mix - 3.66 bpw"),
    (28, "IQ2_S", "IQ2_S - 2.5 bpw"),
    (29, "IQ2_M", "IQ2_M - 2.7 bpw"),
    (30, "IQ4_XS", "IQ4_XS - 4.25 bpw"),
    (31, "IQ1_M", "IQ1_M - 1.75 bpw"),
    (32, "BF16", "BF16"),
    (36, "TQ1_0", "TQ1_0 - 1.69 bpw ternary"),
    (37, "TQ2_0", "TQ2_0 - 2.06 bpw ternary"),
    (38, "MXFP4", "MXFP4 MoE"),
];

/// Ollama's short name (`Q4_K_M`), or None for an id not in the table.
pub fn short_name(id: u32) -> Option<&'static str> {
    FILE_TYPES.iter().find(|t| t.0 == id).map(|t| t.1)
}

/// llama.cpp's description (`Q4_K - Medium`), or None for an id not in the table.
pub fn description(id: u32) -> Option<&'static str> {
    FILE_TYPES.iter().find(|t| t.0 == id).map(|t| t.2)
}

#[cfg(test)]
mod tests {
    #[test]
    fn names_and_descriptions() {
        assert_eq!(super::short_name(15), Some("Q4_K_M"));
        assert_eq!(super::description(15), Some("Q4_K - Medium"));
        assert_eq!(super::short_name(4), None);
    }
}
