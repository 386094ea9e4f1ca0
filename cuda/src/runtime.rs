//! An opened GPU ready to run Turbine's kernels: every source compiled for the GPU's
//! architecture (precompiled CUBINs from the cache directory where there are, else NVRTC
//! through its disk cache), loaded, and looked up by name; one stream for all work.
//!
//! One stream keeps every operation in issue order, so a buffer is never read before the
//! launch that writes it has run and never freed (stream-ordered) before its last reader.
//! cudarc's per-buffer event tracking, which exists for several streams, is turned off:
//! it would create two CUDA events for every allocation.

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaFunction, CudaStream};
use cudarc::nvrtc::Ptx;

use crate::{kernels, nvrtc, CudaError, Gpu};

/// A GPU with every kernel of [`kernels::SOURCES`] loaded.
pub struct Runtime {
    gpu: Gpu,
    arch: &'static str,
    stream: Arc<CudaStream>,
    functions: HashMap<String, CudaFunction>,
}

impl Runtime {
    /// Opens GPU `ordinal` and loads every kernel: `NoDriver`/`NoDevice` without a GPU,
    /// `Unsupported` for an architecture the kernels are not built for, `NoNvrtc` when the
    /// kernels are neither compilable nor precompiled ([`precompile`]).
    pub fn new(ordinal: usize) -> Result<Runtime, CudaError> {
        let gpu = Gpu::open(ordinal)?;
        let arch =
            gpu.arch().ok_or_else(|| CudaError::Unsupported { name: gpu.name.clone(), capability: gpu.capability })?;
        // SAFETY: every buffer of this context object is used on `stream` alone (see the
        // module's comment), so cudarc's cross-stream events are not needed.
        unsafe { gpu.ctx.disable_event_tracking() };
        keep_pool_memory(&gpu.ctx);
        let stream = gpu.ctx.default_stream();
        let functions = load_kernels(&gpu.ctx, arch, kernel_cache_dir().as_deref())?;
        Ok(Runtime { gpu, arch, stream, functions })
    }

    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    pub fn ctx(&self) -> &Arc<CudaContext> {
        &self.gpu.ctx
    }

    /// The architecture the kernels were built for (sm_80 or sm_90a).
    pub fn arch(&self) -> &'static str {
        self.arch
    }

    /// The stream every operation goes on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The kernel `name` (a cheap handle).
    pub fn function(&self, name: &str) -> Result<CudaFunction, CudaError> {
        self.functions.get(name).cloned().ok_or_else(|| CudaError::Driver(format!("no kernel named {name}")))
    }

    pub fn has(&self, name: &str) -> bool {
        self.functions.contains_key(name)
    }

    /// Gives the pool's unused memory back to the driver (after a model is dropped).
    pub fn trim(&self) {
        // SAFETY: a device of this context; trimming only releases unused pool memory.
        unsafe {
            if self.stream.synchronize().is_ok() {
                if let Ok(pool) = result::device::get_default_mem_pool(self.gpu.ctx.cu_device()) {
                    let _ = sys::cuMemPoolTrimTo(pool, 0);
                }
            }
        }
    }
}

/// Stream-ordered allocations come from the device's default pool, which by default gives
/// its memory back to the driver at every synchronization, so each step's activations would
/// be mapped anew. A release threshold of "never" keeps them ([`Runtime::trim`] frees).
fn keep_pool_memory(ctx: &CudaContext) {
    // SAFETY: the device is the context's; the attribute takes a u64 by pointer. A failure
    // only costs speed, so it is ignored.
    unsafe {
        if let Ok(pool) = result::device::get_default_mem_pool(ctx.cu_device()) {
            let mut threshold = u64::MAX;
            let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD;
            let _ = sys::cuMemPoolSetAttribute(pool, attr, &mut threshold as *mut u64 as *mut c_void);
        }
    }
}

/// Where compiled kernels are cached: $TURBINE_KERNEL_CACHE, else ~/.cache/turbine/kernels.
pub fn kernel_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("TURBINE_KERNEL_CACHE") {
        return Some(PathBuf::from(dir));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/turbine/kernels"))
}

fn load_kernels(
    ctx: &Arc<CudaContext>,
    arch: &str,
    cache: Option<&Path>,
) -> Result<HashMap<String, CudaFunction>, CudaError> {
    let mut functions = HashMap::new();
    for (name, source) in kernels::SOURCES {
        let cubin = cubin_for(name, source, arch, cache)?;
        let module = ctx
            .load_module(Ptx::from_binary(cubin))
            .map_err(|e| CudaError::Driver(format!("loading {name}: {e:?}")))?;
        for entry in kernels::entry_points(source) {
            let f = module.load_function(&entry).map_err(|e| CudaError::Driver(format!("{entry}: {e:?}")))?;
            functions.insert(entry, f);
        }
    }
    Ok(functions)
}

/// `source`'s CUBIN for `arch`: one [`precompile`] left in the cache (it needs no NVRTC,
/// and a CUBIN loads on any driver as new as its compiler), else compiled by NVRTC through
/// the cache.
pub fn cubin_for(name: &str, source: &str, arch: &str, cache: Option<&Path>) -> Result<Vec<u8>, CudaError> {
    let full = kernels::full_source(source);
    let precompiled = cache.map(|dir| precompiled_path(dir, &full, arch)).and_then(|p| std::fs::read(p).ok());
    if let Some(cubin) = precompiled.filter(|c| !c.is_empty()) {
        return Ok(cubin);
    }
    match cache {
        Some(dir) => nvrtc::compile_cached(dir, name, &full, arch),
        None => nvrtc::compile(name, &full, arch).map(|c| c.cubin),
    }
}

/// Compiles every kernel source for every architecture into `dir` under names that do not
/// depend on NVRTC's version, for a machine that has a GPU but no NVRTC (run
/// `turbine-gpu-e2e --precompile DIR` where NVRTC is, carry DIR, set TURBINE_KERNEL_CACHE).
/// Returns the files written.
pub fn precompile(dir: &Path) -> Result<Vec<PathBuf>, CudaError> {
    std::fs::create_dir_all(dir).map_err(|e| CudaError::Driver(format!("{}: {e}", dir.display())))?;
    let mut written = Vec::new();
    for arch in kernels::ARCHS {
        for (name, source) in kernels::SOURCES {
            let full = kernels::full_source(source);
            let compiled = nvrtc::compile(name, &full, arch)?;
            let path = precompiled_path(dir, &full, arch);
            std::fs::write(&path, &compiled.cubin)
                .map_err(|e| CudaError::Driver(format!("{}: {e}", path.display())))?;
            written.push(path);
        }
    }
    Ok(written)
}

fn precompiled_path(dir: &Path, full_source: &str, arch: &str) -> PathBuf {
    // FNV-1a over what decides the CUBIN apart from the compiler.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in full_source.bytes().chain(arch.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    dir.join(format!("{arch}-{h:016x}-precompiled.cubin"))
}
