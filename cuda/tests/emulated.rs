//! The kernels' logic, checked on the CPU: every kernel of every source in
//! `kernels::SOURCES` runs under a small CUDA emulator (cuda/emu/emu.h) against plain C++
//! copies of the CPU engine's definitions (cuda/emu/reference.h), on seeded random inputs
//! with ragged shapes (cuda/emu/main.cpp), so that a kernel edit is tested without a GPU.
//!
//! This is an emulation, not a GPU: each CUDA thread is a fiber on one CPU thread, blocks
//! run one after another, and floating point is the host's (no FMA contraction, the C
//! library's expf/sincosf/tanhf). It checks indexing, data layout, control flow,
//! barrier and warp-shuffle usage and arithmetic order; it says nothing about races,
//! timing, register or shared-memory limits, or the GPU's own rounding. The GPU checks
//! (`turbine-gpu-check`, `turbine-gpu-e2e`) remain the word on GPU behaviour.
//!
//! The test reads the kernel sources from cuda/kernels/ when it runs, prepends
//! common.cuh as NVRTC gets it, replaces the inline PTX (two f16 conversions) with C++,
//! compiles the emulator with the system C++ compiler (`c++`, or `CXX`) twice in
//! parallel — once plain (shared memory poisoned between blocks) and once with
//! AddressSanitizer (out-of-bounds accesses caught) — and runs both. It fails on any
//! mismatch, on an emulation error (a broken barrier or shuffle rule, a deadlock, a
//! misaligned vector load), on a sanitizer report, and when some kernel entry point was
//! never launched. `TURBINE_EMU_ONLY=attention` (a substring of the check groups) runs a
//! subset, without the coverage check.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use turbine_cuda::kernels::{self, SOURCES};

const CRATE_DIR: &str = env!("CARGO_MANIFEST_DIR");

/// Inline PTX the kernels use, and the emulator's function doing the same (one output, one
/// input): `asm("<template>" : "=x"(out) : "y"(in));` becomes `out = <function>(in);`.
const PTX: [(&str, &str); 2] =
    [("cvt.f32.f16 %0, %1;", "emu::f16_bits_to_f32"), ("cvt.rn.f16.f32 %0, %1;", "emu::f32_to_f16_bits")];

/// A kernel that never finishes (an infinite loop) fails the test after this long.
const RUN_LIMIT: Duration = Duration::from_secs(600);

#[test]
fn kernels_match_the_cpu_reference_under_the_emulator() {
    let dir = scratch_dir();
    let only = std::env::var("TURBINE_EMU_ONLY").ok().filter(|s| !s.is_empty());
    let entry_points = write_sources(&dir);
    let cxx = std::env::var("CXX").ok().filter(|s| !s.is_empty()).unwrap_or_else(|| "c++".to_string());
    let (plain, asan) = build(&cxx, &dir);
    let mut problems = run_checks(&cxx, &dir, &plain, asan.as_deref(), only.as_deref(), &entry_points);
    problems.extend(selftests(&plain, asan.as_deref()));
    if problems.is_empty() {
        let _ = fs::remove_dir_all(&dir);
    } else {
        panic!("{}\n(generated sources and binaries kept in {})", problems.join("\n"), dir.display());
    }
}

/// Writes each source of `SOURCES` as NVRTC compiles it (common.cuh, then the file, read
/// from cuda/kernels/ now), its inline PTX replaced, into `dir/<name>.cu.inc`, and
/// `dir/kernels.inc` including each in its own namespace `k_<name>`. Returns the sources'
/// entry points.
fn write_sources(dir: &Path) -> Vec<String> {
    let kernels_dir = Path::new(CRATE_DIR).join("kernels");
    let common = read(&kernels_dir.join("common.cuh"));
    let mut includes = String::new();
    let mut entry_points = Vec::new();
    for (name, _) in SOURCES {
        let path = kernels_dir.join(format!("{name}.cu"));
        let source = read(&path);
        entry_points.extend(kernels::entry_points(&source));
        let text = translate_asm(&path, &format!("{common}\n{source}")).unwrap_or_else(|e| panic!("{e}"));
        fs::write(dir.join(format!("{name}.cu.inc")), text).expect("writing a kernel source");
        includes.push_str(&format!("namespace k_{name} {{\n#include \"{name}.cu.inc\"\n}}\n"));
    }
    fs::write(dir.join("kernels.inc"), includes).expect("writing kernels.inc");
    entry_points
}

/// Compiles cuda/emu/main.cpp twice at once (CI has 2 cores): plain, and with
/// AddressSanitizer (its threads in the other order first). Returns the executables; the
/// second is None where the compiler cannot build or run sanitized programs at all.
fn build(cxx: &str, dir: &Path) -> (PathBuf, Option<PathBuf>) {
    let emu_dir = Path::new(CRATE_DIR).join("emu");
    let started = Instant::now();
    let plain = compile(cxx, &emu_dir, dir, "emulated", &[]);
    let asan_flags = ["-fsanitize=address", "-fno-omit-frame-pointer", "-g1", "-DEMU_ORDER_SEED=1"];
    let asan = compile(cxx, &emu_dir, dir, "emulated-asan", &asan_flags);
    let (plain, asan) = (plain.finish(), asan.finish());
    println!("compiled in {:.1} s ({cxx})", started.elapsed().as_secs_f64());
    let plain = plain.unwrap_or_else(|log| {
        panic!("the emulator did not compile with {cxx}:\n{log}\n(generated sources kept in {})", dir.display())
    });
    let asan = match asan {
        Ok(exe) => Some(exe),
        Err(log) if !sanitizer_works(cxx, dir) => {
            println!("note: {cxx} cannot build or run AddressSanitizer programs here: no bounds checks\n{log}");
            None
        }
        Err(log) => panic!("the AddressSanitizer build did not compile with {cxx}:\n{log}"),
    };
    (plain, asan)
}

/// Runs the checks in both builds at once (`only`: a subset of the groups). Returns what
/// went wrong: failed checks, emulation errors, sanitizer reports, and entry points never
/// launched.
fn run_checks(
    cxx: &str,
    dir: &Path,
    plain: &Path,
    asan: Option<&Path>,
    only: Option<&str>,
    entry_points: &[String],
) -> Vec<String> {
    let args: Vec<&str> = only.into_iter().collect();
    let started = Instant::now();
    let mut runs = vec![("plain", spawn(plain, dir, "plain", &args))];
    if let Some(exe) = asan {
        runs.push(("AddressSanitizer", spawn(exe, dir, "asan", &args)));
    }
    let results: Vec<(&str, ExitStatus, String)> = runs
        .into_iter()
        .map(|(what, run)| {
            let (status, output) = run.finish();
            (what, status, output)
        })
        .collect();
    println!("ran in {:.1} s", started.elapsed().as_secs_f64());

    let mut problems = Vec::new();
    for (what, status, output) in &results {
        println!("--- {what} build ---\n{output}");
        let finished = output.lines().any(|l| l.ends_with(" failed") && l.contains(" checks, "));
        if *what == "AddressSanitizer" && !status.success() && !finished && !sanitizer_works(cxx, dir) {
            println!("note: AddressSanitizer does not run here; its build's result is ignored");
            continue;
        }
        if !status.success() {
            problems.push(format!("{what} build ({status}):{}", failure_summary(output)));
        }
        if only.is_none() && finished {
            let launched: Vec<&str> = output
                .lines()
                .find_map(|l| l.strip_prefix("kernels launched:"))
                .map(|l| l.split_whitespace().collect())
                .unwrap_or_default();
            let missing: Vec<&String> = entry_points.iter().filter(|e| !launched.contains(&e.as_str())).collect();
            if !missing.is_empty() {
                problems.push(format!(
                    "{what} build: kernels never launched (add checks for them to cuda/emu/main.cpp): {missing:?}"
                ));
            }
        }
    }
    problems
}

/// The emulator's rule-breaking kernels (cuda/emu/selftest.h) and what each must print:
/// the emulation errors stop it with status 3.
const SELFTESTS: [(&str, &str); 6] = [
    ("shuffle-after-return", "EMU ERROR in shuffle_after_return"),
    ("syncthreads-after-return", "EMU ERROR in syncthreads_after_return"),
    ("partial-warp", "EMU ERROR in partial_warp"),
    ("mixed-warp-ops", "EMU ERROR in mixed_warp_ops"),
    ("deadlock", "deadlock: every live thread waits"),
    ("misaligned-int4", "not 16-byte aligned"),
];

/// Runs the self-tests: the emulation errors (and shared memory poisoning) in the plain
/// build, an out-of-bounds read in the AddressSanitizer build. Returns what went wrong.
fn selftests(plain: &Path, asan: Option<&Path>) -> Vec<String> {
    let run = |exe: &Path, case: &str| {
        let out = Command::new(exe)
            .args(["--selftest", case])
            .env("ASAN_OPTIONS", "detect_leaks=0")
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status, text)
    };
    let mut problems = Vec::new();
    let mut expect = |case: &str, ok: bool, status: ExitStatus, text: &str| {
        let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        println!("{} selftest {case}: {first}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            problems.push(format!("emulator self-test {case}: not caught ({status}):\n{text}"));
        }
    };
    for (case, message) in SELFTESTS {
        let (status, text) = run(plain, case);
        expect(case, status.code() == Some(3) && text.contains(message), status, &text);
    }
    let (status, text) = run(plain, "shared-poison");
    expect("shared-poison", status.success() && text.starts_with("poisoned"), status, &text);
    if let Some(asan) = asan {
        let (status, text) = run(asan, "out-of-bounds");
        let caught = !status.success() && text.contains("AddressSanitizer: heap-buffer-overflow");
        let report = text.lines().find(|l| l.contains("ERROR: AddressSanitizer")).unwrap_or(&text).to_string();
        expect("out-of-bounds", caught, status, &report);
    }
    problems
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A fresh directory under the system's temp dir.
fn scratch_dir() -> PathBuf {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!("turbine-cuda-emu-{}-{nanos}", std::process::id()));
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// `text` with every inline PTX statement replaced by the emulator's C++ (see [`PTX`]); an
/// error names the file and line of one it does not know or cannot parse.
fn translate_asm(path: &Path, text: &str) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = find_asm(rest) {
        out.push_str(&rest[..at]);
        let line = text[..text.len() - rest.len() + at].lines().count().max(1);
        let here = |why: &str| {
            format!(
                "{} (line {line} of common.cuh followed by the file): {why}; cuda/tests/emulated.rs's PTX table \
                 lists the inline PTX the emulator can stand in for",
                path.display()
            )
        };
        let (statement, after) = parse_asm(&rest[at..])
            .ok_or_else(|| here("an asm statement not of the form asm(\"...\" : \"=x\"(out) : \"y\"(in));"))?;
        let function =
            PTX.iter().find(|(template, _)| *template == statement.template.trim()).map(|(_, f)| *f).ok_or_else(
                || here(&format!("inline PTX \"{}\" has no C++ equivalent in the emulator", statement.template)),
            )?;
        out.push_str(&format!("{} = {function}({});", statement.output, statement.input));
        rest = after;
    }
    out.push_str(rest);
    Ok(out)
}

/// Where the next `asm` statement (`asm(` or `asm volatile(`) starts.
fn find_asm(s: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].find("asm").map(|i| i + from) {
        let before = s[..i].chars().next_back();
        let after = s[i + 3..].trim_start();
        let word_start = !before.is_some_and(|c| c.is_alphanumeric() || c == '_');
        if word_start && (after.starts_with('(') || after.starts_with("volatile") || after.starts_with("__volatile__"))
        {
            return Some(i);
        }
        from = i + 3;
    }
    None
}

struct AsmStatement {
    template: String,
    output: String,
    input: String,
}

/// Parses `asm [volatile] ( "template" : "=x" (out) : "y" (in) ) ;` at the start of `s`;
/// returns it and the text after it.
fn parse_asm(s: &str) -> Option<(AsmStatement, &str)> {
    let s = s.strip_prefix("asm")?.trim_start();
    let s = s.strip_prefix("volatile").or_else(|| s.strip_prefix("__volatile__")).unwrap_or(s).trim_start();
    let s = s.strip_prefix('(')?.trim_start();
    let (template, s) = string_literal(s)?;
    let s = s.trim_start().strip_prefix(':')?.trim_start();
    let (out_constraint, s) = string_literal(s)?;
    let (output, s) = parenthesized(s.trim_start())?;
    let s = s.trim_start().strip_prefix(':')?.trim_start();
    let (_, s) = string_literal(s)?;
    let (input, s) = parenthesized(s.trim_start())?;
    let s = s.trim_start().strip_prefix(')')?.trim_start().strip_prefix(';')?;
    out_constraint.starts_with('=').then_some((AsmStatement { template, output, input }, s))
}

/// A "..." literal at the start of `s` (no escapes), and the rest.
fn string_literal(s: &str) -> Option<(String, &str)> {
    let s = s.strip_prefix('"')?;
    let end = s.find('"')?;
    Some((s[..end].to_string(), &s[end + 1..]))
}

/// The text inside balanced parentheses at the start of `s`, and the rest.
fn parenthesized(s: &str) -> Option<(String, &str)> {
    let mut depth = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => {
                depth -= 1;
                if depth == 0 {
                    return Some((s[1..i].trim().to_string(), &s[i + 1..]));
                }
            }
            _ if depth == 0 => return None,
            _ => {}
        }
    }
    None
}

/// A compiler run in progress.
struct Compile {
    child: Child,
    exe: PathBuf,
    log: PathBuf,
}

/// Starts compiling cuda/emu/main.cpp into `dir/name`. -O1 keeps the build short; the
/// flags keep the host's floating point as plain IEEE operations (no contraction into
/// FMAs, no fast math) and let the kernels' pointer casts alias, as they may on a GPU.
fn compile(cxx: &str, emu_dir: &Path, dir: &Path, name: &str, extra: &[&str]) -> Compile {
    let exe = dir.join(name);
    let log = dir.join(format!("{name}.log"));
    let mut cmd = Command::new(cxx);
    cmd.args(["-std=c++17", "-O1", "-ffp-contract=off", "-fno-fast-math", "-fno-strict-aliasing", "-w"]);
    if cfg!(target_arch = "x86_64") {
        // The fibers switch stacks by hand, which a shadow stack (CET) would refuse.
        cmd.arg("-fcf-protection=none");
    }
    cmd.args(extra).arg("-I").arg(emu_dir).arg("-I").arg(dir).arg(emu_dir.join("main.cpp")).arg("-o").arg(&exe);
    let log_file = File::create(&log).expect("creating a compiler log");
    cmd.stdout(log_file.try_clone().expect("a log handle")).stderr(log_file);
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "no C++ compiler: the emulated kernel test compiles cuda/emu with `{cxx}` (g++ or clang++, C++17); \
             install one (e.g. apt-get install g++) or set CXX"
        ),
        Err(e) => panic!("running {cxx}: {e}"),
    };
    Compile { child, exe, log }
}

impl Compile {
    /// The executable, or the compiler's messages.
    fn finish(mut self) -> Result<PathBuf, String> {
        let status = self.child.wait().expect("waiting for the compiler");
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        match status.success() {
            true => Ok(self.exe),
            false => Err(format!("{status}\n{log}")),
        }
    }
}

/// A run of the emulator in progress, its output going to a file.
struct Run {
    child: Child,
    output: PathBuf,
}

fn spawn(exe: &Path, dir: &Path, tag: &str, args: &[&str]) -> Run {
    let output = dir.join(format!("{tag}.out"));
    let file = File::create(&output).expect("creating an output file");
    let child = Command::new(exe)
        .args(args)
        .env("ASAN_OPTIONS", "detect_leaks=0:allocator_may_return_null=0")
        .stdout(file.try_clone().expect("an output handle"))
        .stderr(file)
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
    Run { child, output }
}

impl Run {
    fn finish(mut self) -> (ExitStatus, String) {
        let started = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("waiting for the emulator") {
                break s;
            }
            if started.elapsed() > RUN_LIMIT {
                let _ = self.child.kill();
                let _ = self.child.wait();
                let output = fs::read_to_string(&self.output).unwrap_or_default();
                panic!("the emulator ran longer than {RUN_LIMIT:?} (a kernel that never returns?):\n{output}");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        (status, fs::read_to_string(&self.output).unwrap_or_default())
    }
}

/// The lines of `output` that say what went wrong: failed checks with their mismatches,
/// emulation errors, sanitizer reports, the final count.
fn failure_summary(output: &str) -> String {
    let mut lines = Vec::new();
    let mut in_failure = false;
    for line in output.lines() {
        let failing = line.starts_with("FAIL ");
        in_failure = failing || (in_failure && line.starts_with("       "));
        if in_failure
            || line.starts_with("EMU ERROR")
            || line.contains("ERROR: AddressSanitizer")
            || line.starts_with("SUMMARY:")
            || (line.contains(" checks, ") && line.ends_with(" failed"))
        {
            lines.push(line);
        }
    }
    if lines.is_empty() {
        // Killed by a signal, or exited before reporting: its last lines.
        let all: Vec<&str> = output.lines().collect();
        lines.extend(&all[all.len().saturating_sub(20)..]);
    }
    format!("\n{}", lines.join("\n"))
}

/// Whether a trivial AddressSanitizer program runs here (some kernels' memory layouts break
/// older sanitizer runtimes), to tell the environment's failure from the emulator's.
fn sanitizer_works(cxx: &str, dir: &Path) -> bool {
    let src = dir.join("asan-probe.cpp");
    let exe = dir.join("asan-probe");
    if fs::write(&src, "int main() { return 0; }\n").is_err() {
        return false;
    }
    let built = Command::new(cxx).arg("-fsanitize=address").arg(&src).arg("-o").arg(&exe).output();
    built.is_ok_and(|o| o.status.success())
        && Command::new(&exe).env("ASAN_OPTIONS", "detect_leaks=0").output().is_ok_and(|o| o.status.success())
}
