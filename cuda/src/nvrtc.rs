//! Compiling kernel sources with NVRTC (through cudarc, loaded at run time) into CUBIN for
//! one architecture, with ptxas's resource report checked for register spills, and a disk
//! cache of the results.

use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::{result, sys};

use crate::CudaError;

/// A compiled kernel file: its CUBIN and NVRTC's log (ptxas's report included).
#[derive(Debug, Clone)]
pub struct Compiled {
    pub cubin: Vec<u8>,
    pub log: String,
}

/// Whether libnvrtc can be loaded in this process.
pub fn available() -> bool {
    // SAFETY: only tries to open the library by its candidate names.
    unsafe { sys::is_culib_present() }
}

/// NVRTC's version (major, minor).
pub fn version() -> Result<(i32, i32), CudaError> {
    if !available() {
        return Err(CudaError::NoNvrtc);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC writes two ints.
    unsafe { sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| CudaError::Driver(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

/// Compiles `source` (named `kernel` in messages) to CUBIN for `arch` (e.g. "sm_90a"),
/// optimized, with ptxas's verbose report, and fails on any register spill.
pub fn compile(kernel: &str, source: &str, arch: &str) -> Result<Compiled, CudaError> {
    if !available() {
        return Err(CudaError::NoNvrtc);
    }
    let compile_error = |log: String| CudaError::Compile { kernel: kernel.into(), arch: arch.into(), log };
    let src = CString::new(source).map_err(|_| compile_error("source contains a NUL byte".into()))?;
    let name = CString::new(format!("{kernel}.cu")).map_err(|_| compile_error("bad kernel name".into()))?;
    let prog = result::create_program(&src, Some(&name)).map_err(|e| compile_error(format!("{e:?}")))?;
    let options = [format!("--gpu-architecture={arch}"), "-Xptxas=-v".into(), "--std=c++17".into()];
    // SAFETY: `prog` was created above and is destroyed once below.
    let compiled = unsafe { result::compile_program(prog, &options) };
    // SAFETY: as above.
    let log = unsafe { result::get_program_log(prog) }.map(text).unwrap_or_default();
    let cubin = compiled.map_err(|_| compile_error(log.clone())).and_then(|()| {
        // SAFETY: as above.
        unsafe { cubin_of(prog) }.map_err(|e| compile_error(format!("{e}\n{log}")))
    });
    // SAFETY: as above; the program is not used after this.
    unsafe { result::destroy_program(prog) }.ok();
    let compiled = Compiled { cubin: cubin?, log };
    check_spills(kernel, arch, &compiled.log)?;
    Ok(compiled)
}

/// # Safety
/// `prog` is a live, compiled NVRTC program.
unsafe fn cubin_of(prog: sys::nvrtcProgram) -> Result<Vec<u8>, String> {
    let mut size = 0usize;
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }.result().map_err(|e| format!("nvrtcGetCUBINSize: {e:?}"))?;
    let mut cubin = vec![0u8; size];
    unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char) }
        .result()
        .map_err(|e| format!("nvrtcGetCUBIN: {e:?}"))?;
    if cubin.is_empty() {
        return Err("NVRTC produced no CUBIN".into());
    }
    Ok(cubin)
}

fn text(log: Vec<c_char>) -> String {
    let bytes: Vec<u8> = log.into_iter().map(|c| c as u8).take_while(|&b| b != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Fails when ptxas reports spill stores or loads for any function in `log`.
pub fn check_spills(kernel: &str, arch: &str, log: &str) -> Result<(), CudaError> {
    let mut function = "";
    for line in log.lines() {
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            function = rest.trim();
        }
        let spills = ["spill stores", "spill loads"].iter().any(|what| {
            line.split(" bytes ").zip(line.split(" bytes ").skip(1)).any(|(before, after)| {
                after.starts_with(what) && before.rsplit([',', ' ']).next().is_some_and(|n| n.trim() != "0")
            })
        });
        if spills {
            return Err(CudaError::Spill {
                kernel: kernel.into(),
                arch: arch.into(),
                detail: format!("{function}: {}", line.trim()),
            });
        }
    }
    Ok(())
}

/// [`compile`], through a disk cache under `dir` keyed by the source, the architecture
/// and NVRTC's version.
pub fn compile_cached(dir: &Path, kernel: &str, source: &str, arch: &str) -> Result<Vec<u8>, CudaError> {
    let (major, minor) = version()?;
    let path = cache_path(dir, source, arch, major, minor);
    if let Ok(cubin) = std::fs::read(&path) {
        if !cubin.is_empty() {
            return Ok(cubin);
        }
    }
    let compiled = compile(kernel, source, arch)?;
    // A cache that cannot be written costs a recompilation next time, nothing more.
    if std::fs::create_dir_all(dir).is_ok() {
        let tmp = path.with_extension("tmp");
        if std::fs::write(&tmp, &compiled.cubin).is_ok() {
            std::fs::rename(&tmp, &path).ok();
        }
    }
    Ok(compiled.cubin)
}

fn cache_path(dir: &Path, source: &str, arch: &str, major: i32, minor: i32) -> PathBuf {
    // FNV-1a over everything that changes the CUBIN.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in source.bytes().chain(arch.bytes()).chain(format!("{major}.{minor}").bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    dir.join(format!("{arch}-{h:016x}.cubin"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spills_in_the_report_are_found_and_none_pass() {
        let clean = "ptxas info    : Function properties for k\nptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n";
        assert!(check_spills("k", "sm_90a", clean).is_ok());
        let spilled = "ptxas info    : Function properties for big\nptxas         .     40 bytes stack frame, 36 bytes spill stores, 36 bytes spill loads\n";
        match check_spills("k", "sm_90a", spilled) {
            Err(CudaError::Spill { detail, .. }) => assert!(detail.starts_with("big:"), "{detail}"),
            other => panic!("{other:?}"),
        }
    }
}
