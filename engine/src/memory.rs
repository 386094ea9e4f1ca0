//! The C allocator's settings for inference, and giving memory back after a model goes.
//!
//! Every forward pass allocates activation matrices of a few MiB and frees them. With
//! glibc's defaults, blocks this large are mapped and unmapped each time (or the top of
//! the heap is trimmed back), so every pass pays page faults on fresh zero pages:
//! measured at 10% of prompt processing on the default model. [`tune_allocator`] keeps
//! such blocks in the heap for reuse; [`release_freed`] returns freed memory to the
//! system when a model is unloaded, which would otherwise stay with the process.

/// Blocks below this size come from the heap (glibc's ceiling for the setting: 32 MiB).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 32 << 20;

/// Free memory at the top of the heap is kept up to this size.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 256 << 20;

/// Sets the allocator up for inference (process-wide; the `turbine` binary calls it at
/// start). Does nothing off glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes the allocator's parameters; it is thread-safe.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}

/// Returns the heap's free memory to the system (after a model's weights are dropped).
pub fn release_freed() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim walks the allocator's own free lists; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Calls [`release_freed`] when dropped: the last field of a loaded model, so it runs
/// after the weights before it are dropped.
#[derive(Debug, Default)]
pub struct ReleaseOnDrop;

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        release_freed();
    }
}
