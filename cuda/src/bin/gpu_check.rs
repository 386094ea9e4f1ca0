//! The GPU check in one command: every kernel against the CPU reference on random inputs,
//! with a per-kernel threshold on the normalized squared error; `--perf` adds each
//! matrix-vector kernel's weight bandwidth beside the device-to-device copy bandwidth
//! measured in the same run. Without a GPU it prints "skipped: no GPU" and exits 0.
//!   cargo run --release -p turbine-cuda --bin turbine-gpu-check [-- --perf]
//!
//! Not yet here: the end-to-end greedy comparison, which needs the CUDA backend behind the
//! engine's seam.

use std::process::ExitCode;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};
use cudarc::nvrtc::Ptx;
use turbine_cpu::{dequant, ops, GgmlType};
use turbine_cuda::{kernels, nvrtc, CudaError, Gpu};

type Check = Result<(), String>;

fn main() -> ExitCode {
    let perf = std::env::args().any(|a| a == "--perf");
    let gpu = match Gpu::open(0) {
        Ok(g) => g,
        Err(e @ (CudaError::NoDriver | CudaError::Driver(_))) => {
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
    match run(&gpu.ctx, arch, perf) {
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
struct Kernels {
    stream: Arc<CudaStream>,
    functions: Vec<(String, CudaFunction)>,
}

impl Kernels {
    fn load(ctx: &Arc<CudaContext>, arch: &str) -> Result<Kernels, String> {
        let cache = std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache/turbine/kernels"));
        let mut functions = Vec::new();
        for (name, source) in kernels::SOURCES {
            let full = kernels::full_source(source);
            let cubin = match &cache {
                Some(dir) => nvrtc::compile_cached(dir, name, &full, arch),
                None => nvrtc::compile(name, &full, arch).map(|c| c.cubin),
            }
            .map_err(|e| e.to_string())?;
            let module = ctx.load_module(Ptx::from_binary(cubin)).map_err(|e| format!("{name}: {e:?}"))?;
            for entry in kernels::entry_points(source) {
                let f = module.load_function(&entry).map_err(|e| format!("{entry}: {e:?}"))?;
                functions.push((entry, f));
            }
        }
        Ok(Kernels { stream: ctx.default_stream(), functions })
    }

    fn get(&self, name: &str) -> Result<&CudaFunction, String> {
        self.functions.iter().find(|(n, _)| n == name).map(|(_, f)| f).ok_or(format!("no kernel {name}"))
    }
}

fn drv<T>(r: Result<T, cudarc::driver::DriverError>) -> Result<T, String> {
    r.map_err(|e| format!("{e:?}"))
}

/// Σ(got − want)² / Σ want².
fn nse(got: &[f32], want: &[f32]) -> f64 {
    let err: f64 = got.iter().zip(want).map(|(g, w)| (f64::from(*g) - f64::from(*w)).powi(2)).sum();
    let norm: f64 = want.iter().map(|w| f64::from(*w).powi(2)).sum();
    err / norm.max(f64::MIN_POSITIVE)
}

fn report(name: &str, nse: f64, limit: f64) -> Check {
    let ok = nse.is_finite() && nse <= limit;
    println!("{} {name}: nse {nse:.2e} (limit {limit:.0e})", if ok { "ok  " } else { "FAIL" });
    if ok {
        Ok(())
    } else {
        Err(name.to_string())
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn float(&mut self) -> f32 {
        (self.next() % 20001) as f32 / 10000.0 - 1.0
    }
}

/// Random blocks of `ty` with small finite scales.
fn random_weights(ty: GgmlType, rows: usize, cols: usize, rng: &mut Rng) -> Vec<u8> {
    let row_bytes = ty.row_bytes(cols).unwrap_or(0);
    let mut w: Vec<u8> = (0..rows * row_bytes).map(|_| rng.next() as u8).collect();
    for block in w.chunks_mut(ty.type_size()) {
        let d = half::f16::from_f32(0.01 + (rng.next() % 100) as f32 / 1e4).to_le_bytes();
        match ty {
            GgmlType::MXFP4 => block[0] = 118 + (rng.next() % 8) as u8,
            GgmlType::Q6_K => block[208..210].copy_from_slice(&d),
            GgmlType::Q4_K => {
                block[..2].copy_from_slice(&d);
                block[2..4].copy_from_slice(&half::f16::from_f32(0.003).to_le_bytes());
            }
            _ => block[..2].copy_from_slice(&d),
        }
    }
    w
}

fn run(ctx: &Arc<CudaContext>, arch: &str, perf: bool) -> Result<usize, String> {
    let k = Kernels::load(ctx, arch)?;
    let mut failed = 0;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::MXFP4, GgmlType::Q4_K, GgmlType::Q6_K] {
        failed += usize::from(check_matvec(&k, ty, 256, 2048, 3, &mut rng).is_err());
    }
    failed += usize::from(check_elementwise(&k, &mut rng).is_err());
    if perf {
        perf_matvec(ctx, &k, &mut rng)?;
    }
    Ok(failed)
}

const MATVEC_ROWS_PER_BLOCK: u32 = 4;

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
    let mut xq = drv(s.alloc_zeros::<i8>(tokens * cols))?;
    let mut xs = drv(s.alloc_zeros::<f32>(tokens * cols / 32))?;
    let mut y = drv(s.alloc_zeros::<f32>(tokens * rows))?;
    let n_blocks = (tokens * cols / 32) as i32;
    let cfg =
        LaunchConfig { grid_dim: ((n_blocks as u32).div_ceil(8), 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let f = k.get("quantize_q8")?;
    // SAFETY: the arguments match the kernel's signature and the buffers' sizes.
    drv(unsafe { s.launch_builder(f).arg(&xd_dev).arg(&mut xq).arg(&mut xs).arg(&n_blocks).launch(cfg) })?;
    let name = format!("matvec_{}", ty.to_string().to_lowercase());
    let f = k.get(&name)?;
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

fn check_matvec(k: &Kernels, ty: GgmlType, rows: usize, cols: usize, tokens: usize, rng: &mut Rng) -> Check {
    let w = random_weights(ty, rows, cols, rng);
    let x: Vec<f32> = (0..tokens * cols).map(|_| rng.float()).collect();
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

    // Embedding gather from a Q8_0 table.
    let (vocab, ids) = (50usize, vec![3i32, 0, 49, 17]);
    let table = random_weights(GgmlType::Q8_0, vocab, cols, rng);
    let (td, id) = (drv(s.clone_htod(&table))?, drv(s.clone_htod(&ids))?);
    let mut ed = drv(s.alloc_zeros::<f32>(ids.len() * cols))?;
    let scale = 2.0f32;
    let cfg = LaunchConfig { grid_dim: (ids.len() as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: as above; the ids are inside the table.
    drv(unsafe {
        s.launch_builder(k.get("embed_q8_0")?).arg(&td).arg(&id).arg(&mut ed).arg(&cols_i).arg(&scale).launch(cfg)
    })?;
    let row_bytes = GgmlType::Q8_0.row_bytes(cols).unwrap_or(0);
    let mut want = vec![0.0f32; ids.len() * cols];
    for (t, &i) in ids.iter().enumerate() {
        let dst = &mut want[t * cols..(t + 1) * cols];
        dequant::dequantize_row(GgmlType::Q8_0, &table[i as usize * row_bytes..(i as usize + 1) * row_bytes], dst);
        dst.iter_mut().for_each(|v| *v *= scale);
    }
    results.push(report("embed_q8_0", nse(&drv(s.clone_dtoh(&ed))?, &want), 1e-12));

    results.into_iter().collect::<Result<Vec<()>, String>>().map(|_| ())
}

/// Each matrix-vector kernel's weight bandwidth on a 4096 × 4096 matrix (one token), beside
/// a 1 GiB device-to-device copy.
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
    for ty in [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q5_0, GgmlType::MXFP4, GgmlType::Q4_K, GgmlType::Q6_K] {
        let w = random_weights(ty, rows, cols, rng);
        let wd = drv(s.clone_htod(&w))?;
        let x: Vec<f32> = (0..cols).map(|_| rng.float()).collect();
        gpu_matvec(k, ty, &wd, rows, cols, &x, 1)?;
        let start = drv(s.record_event(timing))?;
        for _ in 0..20 {
            gpu_matvec(k, ty, &wd, rows, cols, &x, 1)?;
        }
        let end = drv(s.record_event(timing))?;
        drv(end.synchronize())?;
        let ms = drv(start.elapsed_ms(&end))? / 20.0;
        println!(
            "matvec {ty} {rows}x{cols}: {:.0} GB/s of weights ({ms:.3} ms, host transfers included)",
            w.len() as f64 / (f64::from(ms) * 1e6)
        );
    }
    Ok(())
}
