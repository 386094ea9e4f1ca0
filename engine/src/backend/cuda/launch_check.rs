//! Checks, without a GPU, what the compiler cannot: that every `launch!` of this backend
//! passes as many arguments as its kernel takes (one missing or extra shifts every later
//! argument: the kernel reads garbage, the launch does not fail), and that the block shapes
//! the host assumes are the ones the kernels are written for. The kernels' parameter
//! lists and `#define`s are read from the .cu sources (`turbine_cuda::kernels::SOURCES`);
//! which kernels each launch may run is listed below, in the order of the launches in each
//! file, so that a new launch must be listed to pass.

use super::{attention, moe, products};
use std::collections::HashMap;
use turbine_cuda::kernels::{entry_points, SOURCES};

/// The quantized types with product kernels, and the types with lookup kernels.
const QUANTIZED: [&str; 6] = ["q8_0", "q4_0", "q5_0", "mxfp4", "q4_k", "q6_k"];
const LOOKUP: [&str; 8] = ["f32", "f16", "bf16", "q8_0", "q4_0", "q5_0", "q4_k", "q6_k"];

fn names(prefix: &str, suffixes: &[&str]) -> Vec<String> {
    suffixes.iter().map(|s| format!("{prefix}{s}")).collect()
}

fn one(name: &str) -> Vec<String> {
    vec![name.to_string()]
}

/// Per file of the backend: its source, and per `launch!` in order, the kernels it may run.
fn sites() -> Vec<(&'static str, &'static str, Vec<Vec<String>>)> {
    let attn_split = ["f16", "f32"].iter().flat_map(|t| names(&format!("attn_split_{t}_"), &["128", "256", "576"]));
    vec![
        ("mod.rs", include_str!("mod.rs"), vec![]),
        (
            "products.rs",
            include_str!("products.rs"),
            vec![
                names("matmul_float_", &["f32", "f16", "bf16"]),
                names("matvec_", &QUANTIZED),
                names("matmul_", &QUANTIZED),
                names("matvec_id_", &QUANTIZED),
                vec!["quantize_q8_0_exact".into(), "quantize_q8_k_exact".into()],
                names("embed_", &LOOKUP),
            ],
        ),
        (
            "ops.rs",
            include_str!("ops.rs"),
            [
                "rms_norm_exact",
                "rope_exact",
                "geglu_exact",
                "swiglu",
                "swiglu_oai",
                "scale_exact",
                "add_exact",
                "add_bias_rows",
                "add_scaled_rows",
                "gather_cols",
                "copy_cols",
                "gather_rows",
            ]
            .map(one)
            .to_vec(),
        ),
        (
            "attention.rs",
            include_str!("attention.rs"),
            vec![names("kv_store_", &["f16", "f32"]), attn_split.collect(), one("attn_combine")],
        ),
        ("moe.rs", include_str!("moe.rs"), vec![one("moe_combine")]),
    ]
}

/// `src` without its `//` comments (none of these files has `//` inside a string).
fn strip_comments(src: &str) -> String {
    src.lines().map(|l| l.find("//").map_or(l, |at| &l[..at])).collect::<Vec<_>>().join("\n")
}

/// The text between the bracket at `open` and its match, and the index after the match.
fn bracketed(s: &str, open: usize) -> Option<(&str, usize)> {
    let mut depth = 0i32;
    for (i, c) in s[open..].char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some((&s[open + 1..open + i], open + i + 1));
                }
            }
            _ => {}
        }
    }
    None
}

/// The pieces of `s` between commas outside brackets, empty ones (a trailing comma) left out.
fn top_level_items(s: &str) -> Vec<&str> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                items.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&s[start..]);
    items.into_iter().map(str::trim).filter(|p| !p.is_empty()).collect()
}

/// Per `launch!` of a Rust source: its kernel expression and its arguments.
fn launches(src: &str) -> Vec<(String, Vec<String>)> {
    let src = strip_comments(src);
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(at) = src[from..].find("launch!(").map(|i| from + i) {
        let Some((body, end)) = bracketed(&src, at + "launch!".len()) else { panic!("an unclosed launch! at {at}") };
        let Some((head, args)) = body.split_once(';') else { panic!("a launch! without `;`: {body}") };
        let kernel = top_level_items(head).get(1).map_or(String::new(), |k| k.to_string());
        out.push((kernel, top_level_items(args).into_iter().map(String::from).collect()));
        from = end;
    }
    out
}

/// Every kernel of the sources and its parameters, those of kernels a macro defines
/// included (`MATVEC(matvec_q8_0, ...)` takes the parameters of `#define MATVEC`'s kernel).
fn kernel_params() -> HashMap<String, Vec<String>> {
    const ENTRY: &str = "extern \"C\" __global__ void";
    let mut kernels = HashMap::new();
    for (file, source) in SOURCES {
        // One logical line per `#define`, as the preprocessor sees it.
        let text = strip_comments(&source.replace("\\\n", " "));
        let (mut own, mut macros) = (HashMap::new(), HashMap::new());
        let mut from = 0;
        while let Some(at) = text[from..].find(ENTRY).map(|i| from + i) {
            let mut rest = text[at + ENTRY.len()..].trim_start();
            if rest.starts_with("__launch_bounds__") {
                let open = rest.find('(').unwrap_or(0);
                rest = bracketed(rest, open).map_or(rest, |(_, end)| rest[end..].trim_start());
            }
            let open = rest.find('(').unwrap_or_else(|| panic!("{file}: a kernel without parameters"));
            let name = rest[..open].trim().to_string();
            let (params, _) = bracketed(rest, open).unwrap_or_else(|| panic!("{file}: {name}'s parameters"));
            let params: Vec<String> = top_level_items(params).into_iter().map(String::from).collect();
            let line = &text[text[..at].rfind('\n').map_or(0, |i| i + 1)..];
            match line.strip_prefix("#define ") {
                Some(def) => macros.insert(def.split('(').next().unwrap_or("").trim().to_string(), params),
                None => own.insert(name, params),
            };
            from = at + ENTRY.len();
        }
        for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
            let Some((head, rest)) = line.split_once('(') else { continue };
            if let Some(params) = macros.get(head.trim()) {
                own.insert(rest.split(',').next().unwrap_or("").trim().to_string(), params.clone());
            }
        }
        // The names the runtime loads, no more and no fewer.
        let (mut mine, mut loaded): (Vec<String>, Vec<String>) = (own.keys().cloned().collect(), entry_points(source));
        mine.sort();
        loaded.sort();
        assert_eq!(mine, loaded, "{file}");
        kernels.extend(own);
    }
    kernels
}

/// The value of `#define name value` in the sources (each file that defines it).
fn defines(name: &str) -> Vec<usize> {
    let prefix = format!("#define {name} ");
    SOURCES
        .iter()
        .flat_map(|(_, s)| s.lines())
        .filter_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .map(|v| v.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{name} = {v}")))
        .collect()
}

#[test]
fn every_launch_passes_its_kernels_parameter_count() {
    let params = kernel_params();
    for (file, src, expected) in sites() {
        let found = launches(src);
        let listed: Vec<&String> = found.iter().map(|(k, _)| k).collect();
        assert_eq!(found.len(), expected.len(), "{file}: launches {listed:?} against the list in launch_check.rs");
        for ((kernel, args), names) in found.iter().zip(&expected) {
            for name in names {
                let p = params.get(name).unwrap_or_else(|| panic!("{file}: no kernel {name} in the sources"));
                assert_eq!(
                    args.len(),
                    p.len(),
                    "{file}: launch!({kernel}) passes {} arguments {args:?} to {name}({p:?})",
                    args.len()
                );
            }
        }
    }
}

#[test]
fn the_parsers_find_what_they_should() {
    let params = kernel_params();
    assert_eq!(params["rope_exact"].len(), 14);
    assert_eq!(params["matvec_id_q4_k"].len(), 11, "a macro's kernel, __launch_bounds__ skipped");
    assert_eq!(params["attn_split_f32_576"].len(), 18);
    assert_eq!(params["quantize_q8_0_exact"][3], "int n_blocks");
    let l = launches("launch!(be, &k.f[i], (a, b(c, d), 1), (32, 4, 1);\n  x.dev()?, &y, // z, w\n &[1, 2],\n)?;");
    assert_eq!(l, vec![("&k.f[i]".to_string(), vec!["x.dev()?".to_string(), "&y".into(), "&[1, 2]".into()])]);
}

/// The block shapes the host launches with are those the kernels index by.
#[test]
fn block_shapes_match_the_kernels_defines() {
    assert_eq!(defines("ROWS_PER_BLOCK"), vec![products::ROWS_PER_BLOCK], "matvec.cu");
    assert_eq!(defines("MM_ROWS"), vec![products::ROWS_PER_BLOCK], "matmul.cu");
    assert_eq!(defines("FW_ROWS"), vec![products::ROWS_PER_BLOCK], "backend.cu");
    assert_eq!(defines("MM_TOKENS"), vec![products::TOKENS_PER_TILE], "matmul.cu");
    assert_eq!(defines("FW_TOKENS"), vec![products::TOKENS_PER_TILE], "backend.cu");
    assert_eq!(defines("ATTN_WARPS"), vec![attention::ATTN_WARPS as usize], "attention.cu");
    assert_eq!(defines("MOE_MAX_K"), vec![moe::MAX_K], "moe.cu");
}
