//! The C API from C: builds libturbine.a, compiles `examples/c/generate.c` and
//! `tests/c/misuse.c` with the system C compiler against it, and runs them on the default
//! model.
//!
//! The library is built by a nested `cargo build --release -p turbine --lib` into its own
//! target directory (`<target>/capi`): the outer cargo holds its target directory's lock
//! while tests run, and a fresh build guarantees the archive matches the sources.

#[allow(dead_code)]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use turbine::engine::generate::{GenerateOptions, Session};
use turbine::engine::sampler::SamplerParams;

/// System libraries a program linking libturbine.a needs on Linux/glibc (as
/// `rustc --print native-static-libs` reports; the README lists the same).
const SYSTEM_LIBS: &[&str] = &["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where this test's build outputs go: `<target>/capi`, next to the profile directory
/// holding this test binary (`<target>/<profile>/deps/c_api-…`).
fn scratch_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let target = exe.ancestors().nth(3).map(Path::to_path_buf).unwrap_or_else(|| repo().join("target"));
    target.join("capi")
}

/// Builds libturbine.a once per test run and returns its path.
fn libturbine() -> &'static Path {
    static LIB: OnceLock<PathBuf> = OnceLock::new();
    LIB.get_or_init(|| {
        let target = scratch_dir();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(cargo)
            .args(["build", "--release", "--offline", "-p", "turbine", "--lib"])
            .current_dir(repo())
            .env("CARGO_TARGET_DIR", &target)
            .output()
            .expect("running cargo");
        assert!(out.status.success(), "cargo build of libturbine.a failed:\n{}", String::from_utf8_lossy(&out.stderr));
        let lib = target.join("release").join("libturbine.a");
        assert!(lib.is_file(), "{} missing after the build", lib.display());
        lib
    })
}

/// Compiles one C file against libturbine.a with the system compiler (`$CC`, else `cc`).
fn compile_c(source: &str, name: &str) -> PathBuf {
    let exe = scratch_dir().join(name);
    let cc = std::env::var_os("CC").unwrap_or_else(|| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror", "-Iinclude", source])
        .arg(libturbine())
        .args(SYSTEM_LIBS)
        .arg("-o")
        .arg(&exe)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("running the C compiler {cc:?} (install one, e.g. gcc): {e}"));
    assert!(out.status.success(), "compiling {source} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    exe
}

fn run(exe: &Path, args: &[&str]) -> Output {
    Command::new(exe).args(args).output().unwrap_or_else(|e| panic!("running {}: {e}", exe.display()))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// What `turbine generate -m MODEL -n N --temperature 0 PROMPT` prints on stdout: the
/// CLI's own path (Session::generate, greedy, context 4096) plus its closing newline.
fn cli_greedy(prompt: &str, n: usize) -> String {
    greedy_with(&common::load_default_model(), prompt, n)
}

/// The greedy continuation `model` gives, as [`cli_greedy`] prints it.
fn greedy_with(
    model: &turbine::engine::generate::LoadedModel<turbine::engine::backend::cpu::CpuBackend>,
    prompt: &str,
    n: usize,
) -> String {
    let ids = model.tokenizer.encode(prompt, true, true);
    let num_ctx = 4096.min(model.arch.info().context_length);
    let opts = GenerateOptions {
        num_predict: Some(n),
        num_ctx,
        sampler: SamplerParams::greedy(),
        stop: Vec::new(),
        logprobs: None,
        render_special: false,
        format: None,
    };
    let mut out = String::new();
    Session::new(model, num_ctx)
        .generate(&ids, &opts, |piece| {
            out.push_str(piece);
            true
        })
        .expect("generating with the engine");
    out + "\n"
}

#[test]
fn c_example_matches_turbine_generate() {
    let exe = compile_c("examples/c/generate.c", "generate");
    let model = common::default_model_path();
    let model = model.to_str().expect("model path is UTF-8");
    let prompts = [
        "The capital of France is",
        "<start_of_turn>user\nÉcris un haïku sur le café.<end_of_turn>\n<start_of_turn>model\n",
    ];
    for prompt in prompts {
        let expected = cli_greedy(prompt, 24);
        assert!(expected.trim().len() > 10, "reference continuation too short: {expected:?}");
        for mode in [&[][..], &["--step"][..]] {
            let args: Vec<&str> = mode.iter().copied().chain([model, "24", prompt]).collect();
            let out = run(&exe, &args);
            assert!(out.status.success(), "generate {args:?} failed: {}", text(&out.stderr));
            assert_eq!(text(&out.stdout), expected, "generate {mode:?} on {prompt:?}");
        }
    }
}

/// The example with `--tp 2`: the model split over two ranks through
/// `turbine_model_load_split` continues as the one-rank group does.
#[test]
fn c_example_runs_a_split_model() {
    let exe = compile_c("examples/c/generate.c", "generate");
    let path = common::default_model_path();
    let one_rank = turbine::engine::generate::LoadedModel::load_split(&path, 1, 1).expect("one-rank group");
    let prompt = "The capital of France is";
    let expected = greedy_with(&one_rank, prompt, 16);
    let args = ["--tp", "2", path.to_str().expect("UTF-8 path"), "16", prompt];
    let out = run(&exe, &args);
    assert!(out.status.success(), "generate {args:?} failed: {}", text(&out.stderr));
    assert_eq!(text(&out.stdout), expected);
}

/// Bad model files for the misuse program: a missing path, the first MiB of the model
/// (cut inside the metadata), the model without its last 4 KiB (cut inside the weights)
/// and a text file.
fn bad_model_files(model: &Path) -> [PathBuf; 4] {
    let dir = scratch_dir().join(format!("bad-models-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating the scratch directory");
    let bytes = std::fs::read(model).expect("reading the model");
    let files = [dir.join("missing.gguf"), dir.join("head.gguf"), dir.join("tail.gguf"), dir.join("garbage.gguf")];
    std::fs::write(&files[1], &bytes[..1 << 20]).expect("writing head.gguf");
    std::fs::write(&files[2], &bytes[..bytes.len() - 4096]).expect("writing tail.gguf");
    std::fs::write(&files[3], b"this is not a GGUF file\n").expect("writing garbage.gguf");
    files
}

#[test]
fn c_misuse_returns_documented_statuses() {
    let exe = compile_c("tests/c/misuse.c", "misuse");
    let model = common::default_model_path();
    let bad = bad_model_files(&model);
    let mut args = vec![model.to_str().expect("model path is UTF-8")];
    args.extend(bad.iter().map(|p| p.to_str().expect("scratch path is UTF-8")));
    let out = run(&exe, &args);
    let _ = std::fs::remove_dir_all(bad[0].parent().expect("scratch directory"));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "misuse checks failed ({}):\n{stdout}\n{}", out.status, text(&out.stderr));
    assert!(stdout.contains("checks: 0 failed"), "{stdout}");
    // The messages say what was wrong.
    for needle in ["model_out is NULL", "No such file", "out of range", "needed", "not valid UTF-8", "context full"] {
        assert!(stdout.contains(needle), "no message mentions {needle:?}:\n{stdout}");
    }
}

/// Names of the functions `src/capi*` exports (`extern "C" fn NAME(`).
fn exported_functions() -> Vec<String> {
    let dir = repo().join("src").join("capi");
    let mut files = vec![repo().join("src").join("capi.rs")];
    files.extend(std::fs::read_dir(&dir).expect("src/capi").map(|e| e.expect("dir entry").path()));
    let mut names = Vec::new();
    for file in files {
        let source = std::fs::read_to_string(&file).expect("reading the C API source");
        for rest in source.split("extern \"C\" fn ").skip(1) {
            names.extend(rest.split('(').next().filter(|n| n.starts_with("turbine_")).map(str::to_string));
        }
    }
    names.sort();
    names
}

/// The header without its comments.
fn header_code() -> String {
    let header = std::fs::read_to_string(repo().join("include").join("turbine.h")).expect("include/turbine.h");
    let mut code = String::new();
    let mut rest = header.as_str();
    while let Some(start) = rest.find("/*") {
        code.push_str(&rest[..start]);
        rest = rest[start..].find("*/").map_or("", |end| &rest[start + end + 2..]);
    }
    code + rest
}

#[test]
fn header_matches_the_library() {
    let code = header_code();
    // Functions: every export declared, every declaration exported.
    let mut declared = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = rest.find("turbine_") {
        let tail = &rest[at..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        if tail[end..].trim_start().starts_with('(') {
            declared.push(tail[..end].to_string());
        }
        rest = &tail[end..];
    }
    declared.sort();
    declared.dedup();
    assert_eq!(declared, exported_functions(), "include/turbine.h and src/capi disagree on the functions");
    // Constants: the header's values are the library's.
    use turbine::capi::*;
    let constants: &[(&str, i128)] = &[
        ("TURBINE_OK", TURBINE_OK.into()),
        ("TURBINE_ERR_NULL_ARGUMENT", TURBINE_ERR_NULL_ARGUMENT.into()),
        ("TURBINE_ERR_INVALID_ARGUMENT", TURBINE_ERR_INVALID_ARGUMENT.into()),
        ("TURBINE_ERR_BUFFER_TOO_SMALL", TURBINE_ERR_BUFFER_TOO_SMALL.into()),
        ("TURBINE_ERR_TOKEN_OUT_OF_RANGE", TURBINE_ERR_TOKEN_OUT_OF_RANGE.into()),
        ("TURBINE_ERR_IO", TURBINE_ERR_IO.into()),
        ("TURBINE_ERR_MODEL", TURBINE_ERR_MODEL.into()),
        ("TURBINE_ERR_CONTEXT_FULL", TURBINE_ERR_CONTEXT_FULL.into()),
        ("TURBINE_ERR_INVALID_STATE", TURBINE_ERR_INVALID_STATE.into()),
        ("TURBINE_ERR_INTERNAL", TURBINE_ERR_INTERNAL.into()),
        ("TURBINE_ERR_DEVICE", TURBINE_ERR_DEVICE.into()),
        ("TURBINE_MAX_THREADS", TURBINE_MAX_THREADS.into()),
        ("TURBINE_SEED_RANDOM", TURBINE_SEED_RANDOM.into()),
        ("TURBINE_DONE_STOP", TURBINE_DONE_STOP.into()),
        ("TURBINE_DONE_LENGTH", TURBINE_DONE_LENGTH.into()),
        ("TURBINE_DONE_CANCELLED", TURBINE_DONE_CANCELLED.into()),
    ];
    let defines: Vec<(&str, &str)> = code
        .lines()
        .filter_map(|l| l.trim().strip_prefix("#define "))
        .filter_map(|d| d.split_once(' '))
        .filter(|(name, _)| name.starts_with("TURBINE_") && *name != "TURBINE_H")
        .collect();
    assert_eq!(defines.len(), constants.len(), "header defines {defines:?}");
    for (name, value) in defines {
        let value = value.trim().trim_start_matches('(').trim_end_matches(')');
        let parsed = if value == "UINT64_MAX" { u64::MAX.into() } else { value.parse::<i128>().expect(name) };
        let expected =
            constants.iter().find(|(n, _)| *n == name).unwrap_or_else(|| panic!("{name} not in the library"));
        assert_eq!(parsed, expected.1, "{name}");
    }
}
