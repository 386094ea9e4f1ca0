//! The GPU check in one command: every kernel against the CPU reference on random inputs,
//! with a per-kernel threshold on the normalized squared error (or exact equality where
//! the kernel promises the CPU's bits); `--perf` adds the matrix kernels' weight bandwidth
//! beside the device-to-device copy bandwidth measured in the same run. A word that is not
//! a flag keeps only the checks whose group name contains it (matvec, elementwise, matmul,
//! embed, attention, moe, argmax). Without a GPU it prints "skipped: no GPU" and exits 0.
//!   cargo run --release -p turbine-cuda --bin turbine-gpu-check [-- --perf] [-- attention]
//!
//! The references are the CPU code the engine runs: turbine-cpu's kernels where the engine
//! calls them, and plain copies of the engine's own arithmetic (attention, MoE routing and
//! combine, greedy argmax) where it lives in the engine crate, which this crate does not
//! depend on; each copy names what it mirrors.
//!
//! The kernels the engine's CUDA backend adds (backend.cu) are checked through the backend
//! seam instead, with the end-to-end comparison of whole models: `turbine-gpu-e2e` (the root
//! crate's `cuda` feature).

#[path = "gpu_check/attention.rs"]
mod attention;
#[path = "gpu_check/moe.rs"]
mod moe;
#[path = "gpu_check/readback.rs"]
mod readback;

use std::process::ExitCode;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use turbine_cpu::act::QuantizedActs;
use turbine_cpu::interleaved::Interleaved;
use turbine_cpu::matmul::{self, WeightView};
use turbine_cpu::{dequant, ops, GgmlType};
/// The checks' random inputs (shared with turbine-gpu-e2e).
pub(crate) use turbine_cuda::testdata::{random_weights, Rng};
use turbine_cuda::{kernels, runtime, CudaError, Gpu};

pub(crate) type Check = Result<(), String>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let perf = args.iter().any(|a| a == "--perf");
    let only = args.iter().find(|a| !a.starts_with("--")).cloned();
    let gpu = match Gpu::open(0) {
        Ok(g) => g,
        Err(e @ (CudaError::NoDriver | CudaError::NoDevice { .. } | CudaError::Driver(_))) => {
            println!("skipped: no GPU ({e})");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(arch) = gpu.arch() else {
        eprintln!("error: {} (compute capability {:?}) is not supported yet", gpu.name, gpu.capability);
        return ExitCode::FAILURE;
    };
    println!("GPU: {} (sm_{}{}), kernels for {arch}", gpu.name, gpu.capability.0, gpu.capability.1);
    match run(&gpu.ctx, arch, perf, only.as_deref()) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(failed) => {
            eprintln!("{failed} checks failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The loaded kernels by name.
pub(crate) struct Kernels {
    pub(crate) stream: Arc<CudaStream>,
    functions: Vec<(String, CudaFunction)>,
}

impl Kernels {
    fn load(ctx: &Arc<CudaContext>, arch: &str) -> Result<Kernels, String> {
        // The engine's cache (TURBINE_KERNEL_CACHE, else ~/.cache/turbine/kernels), with its
        // precompiled CUBINs where NVRTC is missing.
        let cache = runtime::kernel_cache_dir();
        let mut functions = Vec::new();
        for (name, source) in kernels::SOURCES {
            let cubin = runtime::cubin_for(name, source, arch, cache.as_deref()).map_err(|e| e.to_string())?;
            let module = ctx.load_module(Ptx::from_binary(cubin)).map_err(|e| format!("{name}: {e:?}"))?;
            for entry in kernels::entry_points(source) {
                let f = module.load_function(&entry).map_err(|e| format!("{entry}: {e:?}"))?;
                functions.push((entry, f));
            }
        }
        Ok(Kernels { stream: ctx.default_stream(), functions })
    }

    pub(crate) fn get(&self, name: &str) -> Result<&CudaFunction, String> {
        self.functions.iter().find(|(n, _)| n == name).map(|(_, f)| f).ok_or(format!("no kernel {name}"))
    }
}

pub(crate) fn drv<T>(r: Result<T, cudarc::driver::DriverError>) -> Result<T, String> {
    r.map_err(|e| format!("{e:?}"))
}

/// A null device pointer, for a kernel's optional array.
pub(crate) const NULL: u64 = 0;

pub(crate) fn cfg(grid: (u32, u32, u32), block: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: block, shared_mem_bytes: 0 }
}

/// `n` NaNs on the device: outputs start poisoned, so a value the kernel never wrote fails.
pub(crate) fn poisoned(k: &Kernels, n: usize) -> Result<CudaSlice<f32>, String> {
    drv(k.stream.clone_htod(&vec![f32::NAN; n]))
}

/// Σ(got − want)² / Σ want².
pub(crate) fn nse(got: &[f32], want: &[f32]) -> f64 {
    let err: f64 = got.iter().zip(want).map(|(g, w)| (f64::from(*g) - f64::from(*w)).powi(2)).sum();
    let norm: f64 = want.iter().map(|w| f64::from(*w).powi(2)).sum();
    err / norm.max(f64::MIN_POSITIVE)
}

pub(crate) fn report(name: &str, nse: f64, limit: f64) -> Check {
    let ok = nse.is_finite() && nse <= limit;
    println!("{} {name}: nse {nse:.2e} (limit {limit:.0e})", if ok { "ok  " } else { "FAIL" });
    if ok {
        Ok(())
    } else {
        Err(name.to_string())
    }
}

/// An exact comparison: how many of `got` differ from `want` (bits for floats, so NaN
/// equals NaN and −0 differs from +0).
pub(crate) fn report_exact(name: &str, mismatches: usize, total: usize) -> Check {
    let ok = mismatches == 0;
    println!("{} {name}: {mismatches} of {total} differ (exact)", if ok { "ok  " } else { "FAIL" });
    if ok {
        Ok(())
    } else {
        Err(name.to_string())
    }
}

pub(crate) fn bit_mismatches(got: &[f32], want: &[f32]) -> usize {
    got.iter().zip(want).filter(|(g, w)| g.to_bits() != w.to_bits()).count() + got.len().abs_diff(want.len())
}

/// Failures among `results`, as one check.
pub(crate) fn all(results: Vec<Check>) -> Check {
    let failed: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join(", "))
    }
}

/// 1 for a failed check, after saying why (a comparison over its limit was printed when
/// made; a driver error, such as an illegal address, was not).
fn tally(check: Check) -> usize {
    match check {
        Ok(()) => 0,
        Err(e) => {
            println!("     failed: {e}");
            1
        }
    }
}

/// The quantized types the matrix kernels handle.
pub(crate) const MATRIX_TYPES: [GgmlType; 6] =
    [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::MXFP4, GgmlType::Q4_K, GgmlType::Q6_K];

fn run(ctx: &Arc<CudaContext>, arch: &str, perf: bool, only: Option<&str>) -> Result<usize, String> {
    let k = Kernels::load(ctx, arch)?;
    let mut failed = 0;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let wanted = |group: &str| only.is_none_or(|o| group.contains(o));
    if wanted("matvec") {
        for ty in MATRIX_TYPES {
            failed += tally(check_matvec(&k, ty, 256, 2048, 3, &mut rng));
        }
    }
    if wanted("elementwise") {
        failed += tally(check_elementwise(&k, &mut rng));
    }
    if wanted("matmul") {
        for ty in MATRIX_TYPES {
            for tokens in [1, 3, 8, 33] {
                failed += tally(check_matmul(&k, ty, 98, 1024, tokens, &mut rng));
            }
        }
    }
    if wanted("embed") {
        failed += tally(readback::check_embed(&k, &mut rng));
    }
    if wanted("argmax") {
        failed += tally(readback::check_argmax(&k, &mut rng));
    }
    if wanted("attention") {
        for case in &attention::CASES {
            failed += tally(attention::check(&k, case, &mut rng));
        }
    }
    if wanted("moe") {
        failed += tally(moe::check_routing(&k, &mut rng));
        failed += tally(moe::check_experts(&k, &mut rng));
    }
    if perf {
        perf_matvec(ctx, &k, &mut rng)?;
    }
    Ok(failed)
}

const MATVEC_ROWS_PER_BLOCK: u32 = 4;

/// `x` ([rows][cols] on the device, cols a multiple of 32) quantized by `quantize_q8`:
/// (bytes, one scale per 32).
pub(crate) fn quantize(
    k: &Kernels,
    x: &CudaSlice<f32>,
    rows: usize,
    cols: usize,
) -> Result<(CudaSlice<i8>, CudaSlice<f32>), String> {
    let s = &k.stream;
    let mut xq = drv(s.alloc_zeros::<i8>(rows * cols))?;
    let mut xs = drv(s.alloc_zeros::<f32>(rows * cols / 32))?;
    let n_blocks = (rows * cols / 32) as i32;
    let f = k.get("quantize_q8")?;
    // SAFETY: the arguments match the kernel's signature and the buffers' sizes.
    drv(unsafe {
        s.launch_builder(f)
            .arg(x)
            .arg(&mut xq)
            .arg(&mut xs)
            .arg(&n_blocks)
            .launch(cfg(((n_blocks as u32).div_ceil(8), 1, 1), (256, 1, 1)))
    })?;
    Ok((xq, xs))
}

/// The kernel name for `ty` after `prefix` (matvec_q4_k...).
pub(crate) fn kernel_for(prefix: &str, ty: GgmlType) -> String {
    format!("{prefix}_{}", ty.to_string().to_lowercase())
}

/// Quantizes `x` ([tokens][cols]) on the GPU and multiplies by `w`.
fn gpu_matvec(
    k: &Kernels,
    ty: GgmlType,
    w: &CudaSlice<u8>,
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
) -> Result<Vec<f32>, String> {
    let s = &k.stream;
    let xd_dev = drv(s.clone_htod(x))?;
    let (xq, xs) = quantize(k, &xd_dev, tokens, cols)?;
    let mut y = poisoned(k, tokens * rows)?;
    let f = k.get(&kernel_for("matvec", ty))?;
    let (rows_i, blocks, row_bytes) =
        (rows as i32, (cols / ty.block_size()) as i32, ty.row_bytes(cols).unwrap_or(0) as i32);
    let cfg = LaunchConfig {
        grid_dim: ((rows as u32).div_ceil(MATVEC_ROWS_PER_BLOCK), tokens as u32, 1),
        block_dim: (32, MATVEC_ROWS_PER_BLOCK, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: as above.
    drv(unsafe {
        s.launch_builder(f).arg(w).arg(&xq).arg(&xs).arg(&mut y).arg(&rows_i).arg(&blocks).arg(&row_bytes).launch(cfg)
    })?;
    drv(s.clone_dtoh(&y))
}

/// matmul.cu's tile: rows × tokens per block.
const MATMUL_ROWS: u32 = 4;
const MATMUL_TOKENS: u32 = 8;

/// Quantizes `x` ([tokens][cols]) on the GPU and multiplies by `w` with the tiled kernel.
fn gpu_matmul(
    k: &Kernels,
    ty: GgmlType,
    w: &CudaSlice<u8>,
    rows: usize,
    cols: usize,
    x: &[f32],
    tokens: usize,
) -> Result<Vec<f32>, String> {
    let s = &k.stream;
    let xd_dev = drv(s.clone_htod(x))?;
    let (xq, xs) = quantize(k, &xd_dev, tokens, cols)?;
    let mut y = poisoned(k, tokens * rows)?;
    let f = k.get(&kernel_for("matmul", ty))?;
    let (rows_i, blocks, row_bytes, tokens_i) =
        (rows as i32, (cols / ty.block_size()) as i32, ty.row_bytes(cols).unwrap_or(0) as i32, tokens as i32);
    let grid = ((rows as u32).div_ceil(MATMUL_ROWS), (tokens as u32).div_ceil(MATMUL_TOKENS), 1);
    // SAFETY: the arguments match the kernel's signature and the buffers' sizes.
    drv(unsafe {
        s.launch_builder(f)
            .arg(w)
            .arg(&xq)
            .arg(&xs)
            .arg(&mut y)
            .arg(&rows_i)
            .arg(&blocks)
            .arg(&row_bytes)
            .arg(&tokens_i)
            .launch(cfg(grid, (32, MATMUL_ROWS, 1)))
    })?;
    drv(s.clone_dtoh(&y))
}

/// What the engine's CPU backend computes for `w` · x (CpuBackend::matmul): the interleaved
/// kernels where this CPU and type have them, the row kernels otherwise, activations
/// quantized to the type's `act_type`.
pub(crate) fn cpu_matmul(ty: GgmlType, w: &[u8], rows: usize, cols: usize, x: &[f32], tokens: usize) -> Vec<f32> {
    let view = WeightView::new(ty, rows, cols, w).expect("whole rows");
    let mut out = vec![0.0f32; tokens * rows];
    match Interleaved::new(&view) {
        Some(il) if tokens > 0 => {
            let acts = QuantizedActs::new(ty.act_type(), x, cols);
            matmul::matmul_interleaved(&view, &il, &acts, &mut out);
        }
        _ => matmul::matmul(&view, x, tokens, &mut out),
    }
    out
}

fn check_matmul(k: &Kernels, ty: GgmlType, rows: usize, cols: usize, tokens: usize, rng: &mut Rng) -> Check {
    let w = random_weights(ty, rows, cols, rng);
    let x = rng.floats(tokens * cols);
    let w_dev = drv(k.stream.clone_htod(&w))?;
    let got = gpu_matmul(k, ty, &w_dev, rows, cols, &x, tokens)?;
    let want = cpu_matmul(ty, &w, rows, cols, &x, tokens);
    report(&format!("matmul {ty} {rows}x{cols} x{tokens}"), nse(&got, &want), matmul_limit(ty))
}

/// Both sides quantize the activations to 8 bits: in blocks of 32 here, and there in the
/// type's activation format, Q8_0 (blocks of 32 with an f16 scale: nearly the same
/// values, ~5e-8 apart) or for the K-quants Q8_K (blocks of 256: ~3e-5), as the test
/// below measures.
pub(crate) fn matmul_limit(ty: GgmlType) -> f64 {
    if ty.block_size() == 256 {
        5e-4
    } else {
        2e-6
    }
}

fn check_matvec(k: &Kernels, ty: GgmlType, rows: usize, cols: usize, tokens: usize, rng: &mut Rng) -> Check {
    let w = random_weights(ty, rows, cols, rng);
    let x = rng.floats(tokens * cols);
    let w_dev = drv(k.stream.clone_htod(&w))?;
    let got = gpu_matvec(k, ty, &w_dev, rows, cols, &x, tokens)?;
    // The reference: dequantized rows times the unquantized activations, in f64.
    let row_bytes = ty.row_bytes(cols).unwrap_or(0);
    let mut row = vec![0.0f32; cols];
    let mut want = vec![0.0f32; tokens * rows];
    for r in 0..rows {
        dequant::dequantize_row(ty, &w[r * row_bytes..(r + 1) * row_bytes], &mut row);
        for t in 0..tokens {
            let xt = &x[t * cols..(t + 1) * cols];
            want[t * rows + r] = row.iter().zip(xt).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>() as f32;
        }
    }
    // 8-bit activations: ~1e-5 relative squared error per product, summed over 2048.
    report(&format!("matvec {ty} {rows}x{cols} x{tokens}"), nse(&got, &want), 1e-3)
}

fn check_elementwise(k: &Kernels, rng: &mut Rng) -> Check {
    let s = &k.stream;
    let (rows, cols) = (5usize, 640usize);
    let x: Vec<f32> = (0..rows * cols).map(|_| rng.float()).collect();
    let w: Vec<f32> = (0..cols).map(|_| 1.0 + rng.float() * 0.5).collect();
    let mut results = Vec::new();

    // RMSNorm.
    let (xd, wd) = (drv(s.clone_htod(&x))?, drv(s.clone_htod(&w))?);
    let mut yd = drv(s.alloc_zeros::<f32>(rows * cols))?;
    let (cols_i, eps) = (cols as i32, 1e-6f32);
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: the arguments match the kernel's signature and the buffers' sizes.
    drv(unsafe {
        s.launch_builder(k.get("rms_norm")?).arg(&xd).arg(&wd).arg(&mut yd).arg(&cols_i).arg(&eps).launch(cfg)
    })?;
    let mut want = x.clone();
    want.chunks_mut(cols).for_each(|r| ops::rms_norm(r, &w, eps));
    results.push(report("rms_norm", nse(&drv(s.clone_dtoh(&yd))?, &want), 1e-10));

    // RoPE (NEOX), heads of 64, positions 0, 7, 100, 1000, 4000.
    let (head_dim, base, freq_scale) = (64i32, 10000.0f32, 1.0f32);
    let pos: Vec<i32> = vec![0, 7, 100, 1000, 4000];
    let mut xr = drv(s.clone_htod(&x))?;
    let pd = drv(s.clone_htod(&pos))?;
    let n_pairs = (rows * cols / 2) as i32;
    let cfg =
        LaunchConfig { grid_dim: ((n_pairs as u32).div_ceil(256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: as above.
    drv(unsafe {
        s.launch_builder(k.get("rope_neox")?)
            .arg(&mut xr)
            .arg(&pd)
            .arg(&cols_i)
            .arg(&head_dim)
            .arg(&base)
            .arg(&freq_scale)
            .arg(&n_pairs)
            .launch(cfg)
    })?;
    let mut want = x.clone();
    for (r, row) in want.chunks_mut(cols).enumerate() {
        row.chunks_mut(head_dim as usize).for_each(|h| ops::rope_neox(h, pos[r] as u32, base, freq_scale));
    }
    // The CPU builds each angle by repeated multiplication (as ggml's CPU code), the GPU
    // with one powf per pair (as ggml's CUDA code): at position 4000 the angles differ by
    // up to ~1e-2 rad, hence the looser limit.
    results.push(report("rope_neox", nse(&drv(s.clone_dtoh(&xr))?, &want), 1e-4));

    // GeGLU and SwiGLU.
    let up: Vec<f32> = (0..rows * cols).map(|_| rng.float()).collect();
    let n = (rows * cols) as i32;
    let cfg = LaunchConfig { grid_dim: ((n as u32).div_ceil(256), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    for (name, reference) in [
        ("geglu", (|g: f32, u: f32| ops::gelu_tanh_exact(g) * u) as fn(f32, f32) -> f32),
        ("swiglu", |g: f32, u: f32| g / (1.0 + (-g).exp()) * u),
    ] {
        let (mut gd, ud) = (drv(s.clone_htod(&x))?, drv(s.clone_htod(&up))?);
        // SAFETY: as above.
        drv(unsafe { s.launch_builder(k.get(name)?).arg(&mut gd).arg(&ud).arg(&n).launch(cfg) })?;
        let want: Vec<f32> = x.iter().zip(&up).map(|(&g, &u)| reference(g, u)).collect();
        results.push(report(name, nse(&drv(s.clone_dtoh(&gd))?, &want), 1e-10));
    }

    // Softmax over rows of scores.
    let scores: Vec<f32> = x.iter().map(|v| v * 8.0).collect();
    let mut sd = drv(s.clone_htod(&scores))?;
    let cfg = LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: as above.
    drv(unsafe { s.launch_builder(k.get("softmax_rows")?).arg(&mut sd).arg(&cols_i).launch(cfg) })?;
    let mut want = scores.clone();
    want.chunks_mut(cols).for_each(ops::softmax);
    results.push(report("softmax_rows", nse(&drv(s.clone_dtoh(&sd))?, &want), 1e-10));

    results.into_iter().collect::<Result<Vec<()>, String>>().map(|_| ())
}

/// Each matrix-vector kernel's weight bandwidth on a 4096 × 4096 matrix (one token), and the
/// tiled matrix kernel's at one tile of tokens, beside a 1 GiB device-to-device copy.
fn perf_matvec(ctx: &Arc<CudaContext>, k: &Kernels, rng: &mut Rng) -> Result<(), String> {
    let s = &k.stream;
    let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let bytes = 1usize << 30;
    let src = drv(s.alloc_zeros::<u8>(bytes))?;
    let mut dst = drv(s.alloc_zeros::<u8>(bytes))?;
    let start = drv(ctx.new_event(timing))?;
    drv(start.record(s))?;
    for _ in 0..5 {
        drv(s.memcpy_dtod(&src, &mut dst))?;
    }
    let end = drv(s.record_event(timing))?;
    drv(end.synchronize())?;
    let ms = drv(start.elapsed_ms(&end))? / 5.0;
    // A copy reads and writes every byte.
    println!("copy: {:.0} GB/s (read + write)", 2.0 * bytes as f64 / (f64::from(ms) * 1e6));
    let (rows, cols) = (4096usize, 4096usize);
    // The mean time of 20 runs after one to warm up.
    let time = |run: &mut dyn FnMut() -> Result<Vec<f32>, String>| -> Result<f32, String> {
        run()?;
        let start = drv(s.record_event(timing))?;
        for _ in 0..20 {
            run()?;
        }
        let end = drv(s.record_event(timing))?;
        drv(end.synchronize())?;
        Ok(drv(start.elapsed_ms(&end))? / 20.0)
    };
    for ty in MATRIX_TYPES {
        let w = random_weights(ty, rows, cols, rng);
        let wd = drv(s.clone_htod(&w))?;
        let x = rng.floats(cols);
        let ms = time(&mut || gpu_matvec(k, ty, &wd, rows, cols, &x, 1))?;
        println!(
            "matvec {ty} {rows}x{cols}: {:.0} GB/s of weights ({ms:.3} ms, host transfers included)",
            w.len() as f64 / (f64::from(ms) * 1e6)
        );
        let tokens = MATMUL_TOKENS as usize;
        let x = rng.floats(tokens * cols);
        let ms = time(&mut || gpu_matmul(k, ty, &wd, rows, cols, &x, tokens))?;
        println!(
            "matmul {ty} {rows}x{cols} x{tokens}: {:.0} GB/s of weights ({ms:.3} ms, host transfers included)",
            w.len() as f64 / (f64::from(ms) * 1e6)
        );
    }
    Ok(())
}

/// What the dp4a kernels compute, in f64 on the host: activations quantized as
/// `quantize_q8` does (32 per block, d = max|x| / 127 in f32, q = round(x / d)) times the
/// dequantized weights. The thresholds are checked against it below.
#[cfg(test)]
pub(crate) fn ideal_gpu_matmul(ty: GgmlType, w: &[u8], rows: usize, cols: usize, x: &[f32]) -> Vec<f32> {
    let xq: Vec<f64> = x
        .chunks(32)
        .flat_map(|b| {
            let amax = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            b.iter().map(move |v| f64::from((v * inv).round_ties_even()) * f64::from(amax / 127.0)).collect::<Vec<_>>()
        })
        .collect();
    let row_bytes = ty.row_bytes(cols).expect("whole blocks");
    let mut row = vec![0.0f32; cols];
    let tokens = x.len() / cols;
    let mut y = vec![0.0f32; tokens * rows];
    for r in 0..rows {
        dequant::dequantize_row(ty, &w[r * row_bytes..(r + 1) * row_bytes], &mut row);
        for t in 0..tokens {
            let dot: f64 = row.iter().zip(&xq[t * cols..(t + 1) * cols]).map(|(&a, &b)| f64::from(a) * b).sum();
            y[t * rows + r] = dot as f32;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exact dp4a kernel differs from the engine's CPU matmul by well under the check's
    /// limit (a tenth), for every type and token count the check runs.
    #[test]
    fn matmul_limit_leaves_room_for_the_quantization() {
        let mut rng = Rng(42);
        for ty in MATRIX_TYPES {
            for tokens in [1, 3, 8, 33] {
                let (rows, cols) = (98, 1024);
                let w = random_weights(ty, rows, cols, &mut rng);
                let x = rng.floats(tokens * cols);
                let e = nse(&ideal_gpu_matmul(ty, &w, rows, cols, &x), &cpu_matmul(ty, &w, rows, cols, &x, tokens));
                println!("{ty} x{tokens}: ideal kernel vs engine nse {e:.2e}");
                assert!(e < matmul_limit(ty) / 10.0, "{ty} x{tokens}: {e:.2e}");
            }
        }
    }
}
