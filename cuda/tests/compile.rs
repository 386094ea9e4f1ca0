//! The CI compile check: every kernel source compiles with NVRTC 13.0 to CUBIN for sm_80
//! and sm_90a with no register spills, and a broken kernel is caught.
//!
//! NVRTC comes from PyPI (`nvidia-cuda-nvrtc` 13.0.x, unpacked by scripts/fetch-test-data.sh
//! into ~/.cache/turbine-nvrtc, or TURBINE_NVRTC_DIR). NVRTC finds its builtins library
//! through the loader's search path, which a process reads when it starts, so each test
//! runs itself again in a child process with LD_LIBRARY_PATH pointing there.

use std::path::PathBuf;
use std::process::Command;

use turbine_cuda::{kernels, nvrtc, CudaError};

const CHILD: &str = "TURBINE_NVRTC_CHILD";

fn nvrtc_dir() -> Option<PathBuf> {
    let dir = match std::env::var_os("TURBINE_NVRTC_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/turbine-nvrtc/nvidia/cu13/lib"),
    };
    dir.join("libnvrtc.so.13").exists().then_some(dir)
}

/// In the parent: runs `test` in a child with NVRTC on the search path and returns true
/// (the caller then stops); in the child: false (the caller does the work).
fn ran_in_child(test: &str) -> bool {
    if std::env::var_os(CHILD).is_some() {
        return false;
    }
    let dir = nvrtc_dir().expect(
        "NVRTC 13.0 not found: run scripts/fetch-test-data.sh (it unpacks PyPI's nvidia-cuda-nvrtc into \
         ~/.cache/turbine-nvrtc) or set TURBINE_NVRTC_DIR to a directory holding libnvrtc.so.13",
    );
    let path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", dir.display()),
        _ => dir.display().to_string(),
    };
    let exe = std::env::current_exe().expect("the test binary's path");
    let out = Command::new(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("LD_LIBRARY_PATH", path)
        .env(CHILD, "1")
        .output()
        .expect("running the test again in a child process");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{test} failed in the child process (see its output above)");
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 passed"), "the child ran no test");
    true
}

#[test]
fn every_kernel_compiles_for_sm_80_and_sm_90a_without_spills() {
    if ran_in_child("every_kernel_compiles_for_sm_80_and_sm_90a_without_spills") {
        return;
    }
    let (major, minor) = nvrtc::version().expect("NVRTC loads");
    assert_eq!(major, 13, "NVRTC {major}.{minor}: the CI check pins 13.0");
    for (name, source) in kernels::SOURCES {
        let entries = kernels::entry_points(source);
        assert!(!entries.is_empty(), "{name} defines no kernels");
        for arch in kernels::ARCHS {
            let compiled = match nvrtc::compile(name, &kernels::full_source(source), arch) {
                Ok(c) => c,
                Err(e) => panic!("{e}"),
            };
            for entry in &entries {
                assert!(
                    compiled.log.contains(&format!("Compiling entry function '{entry}' for '{arch}'")),
                    "{name}: ptxas did not report {entry} for {arch}:\n{}",
                    compiled.log
                );
            }
            // And the other way: every kernel ptxas built is one `entry_points` finds (a
            // kernel from a macro missing from KERNEL_MACROS could not be loaded by name).
            for line in compiled.log.lines() {
                if let Some(rest) = line.split("Compiling entry function '").nth(1) {
                    let built = rest.split('\'').next().unwrap_or_default();
                    assert!(entries.iter().any(|e| e == built), "{name}: {built} is not among {entries:?}");
                }
            }
            println!("{name} {arch}: {} kernels, {} bytes of CUBIN", entries.len(), compiled.cubin.len());
        }
    }
}

#[test]
fn a_broken_kernel_fails_the_check() {
    if ran_in_child("a_broken_kernel_fails_the_check") {
        return;
    }
    // A type error: the check must name the kernel and carry NVRTC's message.
    let broken = "extern \"C\" __global__ void k(float* y) { y[threadIdx.x] = undefined_value; }";
    match nvrtc::compile("broken", &kernels::full_source(broken), "sm_90a") {
        Err(CudaError::Compile { kernel, log, .. }) => {
            assert_eq!(kernel, "broken");
            assert!(log.contains("undefined_value"), "{log}");
        }
        Err(e) => panic!("expected a compile error, got: {e}"),
        Ok(c) => panic!("a broken kernel passed:\n{}", c.log),
    }
    // A kernel whose 64 live values cannot fit the 32 registers its launch bounds leave
    // spills, and that fails too.
    let spilling = "extern \"C\" __global__ void __launch_bounds__(1024, 2) k(const float* x, float* y) {\n\
        float v[64];\n\
        #pragma unroll\n\
        for (int i = 0; i < 64; ++i) v[i] = x[threadIdx.x + i * 1024];\n\
        float s = 0.0f;\n\
        #pragma unroll\n\
        for (int r = 1; r < 8; ++r)\n\
        #pragma unroll\n\
        for (int i = 0; i < 64; ++i) s += v[i] * v[(i + r) % 64];\n\
        y[threadIdx.x] = s; }";
    match nvrtc::compile("spilling", &kernels::full_source(spilling), "sm_90a") {
        Err(CudaError::Spill { kernel, detail, .. }) => {
            assert_eq!(kernel, "spilling");
            println!("caught: {detail}");
        }
        Err(e) => panic!("expected a spill, got: {e}"),
        Ok(c) => panic!("a spilling kernel passed:\n{}", c.log),
    }
}
