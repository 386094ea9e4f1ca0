//! Every operation of the backend seam on the CUDA backend against the CPU backend, on
//! random inputs (ggml's test-backend-ops, at the trait): the host code that launches each
//! kernel is checked with it, before whole models run. Each result is compared exactly
//! where the GPU promises the CPU's bits (copies, element-wise updates, embedding rows),
//! else by normalized squared error under a limit that says what may differ.

use std::sync::Arc;

use turbine::cpu::ops::Yarn;
use turbine::cpu::GgmlType;
use turbine::cuda::testdata::{random_weights, Rng};
use turbine::engine::backend::cpu::CpuBackend;
use turbine::engine::backend::cuda::CudaBackend;
use turbine::engine::backend::{AttnShape, Backend, KvCache};
use turbine::engine::gguf::Gguf;
use turbine::engine::kv::{KvLayout, KvSpec, KvType};
use turbine::engine::model::Batch;

use super::nse;

/// A failed comparison's name, or a setup error.
type Check = Result<(), String>;
/// A group of checks.
type Step = fn(&mut Pair, &mut Rng) -> Check;
type Act<B> = <B as Backend>::Act;
/// A gated activation on each backend.
type Gated = (
    fn(&CpuBackend, &mut Act<CpuBackend>, &Act<CpuBackend>),
    fn(&CudaBackend, &mut Act<CudaBackend>, &Act<CudaBackend>),
);

/// A GGUF file in memory holding `tensors` (name, type, dims, data), 32-byte aligned.
fn gguf(tensors: &[(String, GgmlType, Vec<u64>, Vec<u8>)]) -> Result<Arc<Gguf>, String> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend(0u64.to_le_bytes());
    let mut data: Vec<u8> = Vec::new();
    for (name, ty, dims, bytes) in tensors {
        while !data.len().is_multiple_of(32) {
            data.push(0);
        }
        out.extend((name.len() as u64).to_le_bytes());
        out.extend(name.as_bytes());
        out.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(ty.id().to_le_bytes());
        out.extend((data.len() as u64).to_le_bytes());
        data.extend_from_slice(bytes);
    }
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    out.extend(data);
    Gguf::from_bytes(out).map(Arc::new).map_err(|e| e.to_string())
}

/// The CPU and CUDA backends side by side.
struct Pair<'a> {
    cpu: CpuBackend,
    gpu: &'a CudaBackend,
    failed: Vec<String>,
}

impl Pair<'_> {
    /// Compares by normalized squared error (NaN fails).
    fn close(&mut self, name: &str, got: &[f32], want: &[f32], limit: f64) {
        let e = if got.len() == want.len() { nse(got, want) } else { f64::INFINITY };
        let ok = e.is_finite() && e <= limit;
        println!("{} {name}: nse {e:.2e} (limit {limit:.0e})", if ok { "ok  " } else { "FAIL" });
        if !ok {
            self.failed.push(name.to_string());
        }
    }

    /// Compares bit for bit.
    fn exact(&mut self, name: &str, got: &[f32], want: &[f32]) {
        let differ =
            got.iter().zip(want).filter(|(a, b)| a.to_bits() != b.to_bits()).count() + got.len().abs_diff(want.len());
        println!("{} {name}: {differ} of {} differ (exact)", if differ == 0 { "ok  " } else { "FAIL" }, want.len());
        if differ > 0 {
            self.failed.push(name.to_string());
        }
    }

    /// A pass's end on the GPU: its pending error, as a failure.
    fn settle(&mut self, name: &str) {
        if let Some(e) = self.gpu.take_tp_error() {
            println!("FAIL {name}: {e}");
            self.failed.push(format!("{name} (device error)"));
        }
    }

    fn acts(
        &self,
        rows: usize,
        cols: usize,
        data: &[f32],
    ) -> (<CpuBackend as Backend>::Act, <CudaBackend as Backend>::Act) {
        (self.cpu.from_host(rows, cols, data.to_vec()), self.gpu.from_host(rows, cols, data.to_vec()))
    }
}

/// Runs every operation's check; the names of those that failed.
pub fn check(gpu: &CudaBackend) -> Vec<String> {
    let mut p = Pair { cpu: CpuBackend::default(), gpu, failed: Vec::new() };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let steps: [(&str, Step); 8] = [
        ("copies", copies),
        ("matmul", matmuls),
        ("embed", embeds),
        ("norms", norms),
        ("rope", ropes),
        ("element-wise", elementwise),
        ("gathers", gathers),
        ("attention", attentions),
    ];
    for (name, step) in steps {
        if let Err(e) = step(&mut p, &mut rng) {
            println!("FAIL {name}: {e}");
            p.failed.push(name.to_string());
        }
        p.settle(name);
    }
    // A shape the kernels cannot take fails the pass with an error, not a panic, and the
    // next pass runs.
    let (_, x) = p.acts(2, 64, &rng.floats(128));
    let (_, y) = p.acts(3, 64, &rng.floats(192));
    let mut x2 = gpu.from_host(2, 64, vec![0.0; 128]);
    gpu.add(&mut x2, &y);
    let _ = gpu.to_host(&x2);
    match gpu.take_tp_error() {
        Some(e) => println!("ok   a bad shape is the pass's error: {e}"),
        None => p.failed.push("a bad shape went unreported".into()),
    }
    let back = gpu.to_host(&x);
    if back.len() != 128 || gpu.take_tp_error().is_some() {
        p.failed.push("the pass after an error failed too".into());
    }
    p.failed
}

fn copies(p: &mut Pair, rng: &mut Rng) -> Check {
    let data = rng.floats(7 * 33);
    let (_, g) = p.acts(7, 33, &data);
    let back = p.gpu.to_host(&g);
    p.exact("from_host/to_host", &back, &data);
    let z = p.gpu.zeros(5, 9);
    let zeros = p.gpu.to_host(&z);
    p.exact("zeros", &zeros, &[0.0; 45]);
    Ok(())
}

const MATRIX_TYPES: [GgmlType; 9] = [
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q5_0,
    GgmlType::MXFP4,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
];

/// Both sides quantize the activations to the same 8-bit integers (the CPU's quantizers,
/// copied) and multiply them exactly; only f32 summation orders differ (~1e-13). An
/// approximate quantizer would show as ~1e-7 (Q8_0) to ~3e-5 (Q8_K).
const MATMUL_LIMIT: f64 = 1e-6;

fn matmuls(p: &mut Pair, rng: &mut Rng) -> Check {
    let (rows, cols) = (96usize, 512usize);
    let tensors: Vec<_> = MATRIX_TYPES
        .iter()
        .map(|&ty| (format!("w.{ty}"), ty, vec![cols as u64, rows as u64], random_weights(ty, rows, cols, rng)))
        .collect();
    let file = gguf(&tensors)?;
    for ty in MATRIX_TYPES {
        let info = file.tensor(&format!("w.{ty}")).ok_or("tensor missing")?;
        let (wc, wg) = (
            p.cpu.weight(&file, info).map_err(|e| e.to_string())?,
            p.gpu.weight(&file, info).map_err(|e| e.to_string())?,
        );
        for tokens in [1, 5, 17] {
            let (xc, xg) = p.acts(tokens, cols, &rng.floats(tokens * cols));
            let (want, got) = (p.cpu.to_host(&p.cpu.matmul(&wc, &xc)), p.gpu.to_host(&p.gpu.matmul(&wg, &xg)));
            p.close(&format!("matmul {ty} {rows}x{cols} x{tokens}"), &got, &want, MATMUL_LIMIT);
        }
    }
    // One input, weights of both activation formats.
    let get = |ty: GgmlType| file.tensor(&format!("w.{ty}")).ok_or("tensor missing");
    let (a, b) = (get(GgmlType::Q5_0)?, get(GgmlType::Q4_K)?);
    let wc = [p.cpu.weight(&file, a).map_err(|e| e.to_string())?, p.cpu.weight(&file, b).map_err(|e| e.to_string())?];
    let wg = [p.gpu.weight(&file, a).map_err(|e| e.to_string())?, p.gpu.weight(&file, b).map_err(|e| e.to_string())?];
    let (xc, xg) = p.acts(3, cols, &rng.floats(3 * cols));
    let want = p.cpu.matmuls([&wc[0], &wc[1]], &xc);
    let got = p.gpu.matmuls([&wg[0], &wg[1]], &xg);
    for i in 0..2 {
        let (g, w) = (p.gpu.to_host(&got[i]), p.cpu.to_host(&want[i]));
        p.close(&format!("matmuls [Q5_0, Q4_K] x3, product {i}"), &g, &w, MATMUL_LIMIT);
    }
    Ok(())
}

fn embeds(p: &mut Pair, rng: &mut Rng) -> Check {
    let (vocab, cols) = (50usize, 512usize);
    let types = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q5_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ];
    let tensors: Vec<_> = types
        .iter()
        .map(|&ty| (format!("t.{ty}"), ty, vec![cols as u64, vocab as u64], random_weights(ty, vocab, cols, rng)))
        .collect();
    let file = gguf(&tensors)?;
    let tokens = [3u32, 0, 49, 17, 3];
    for ty in types {
        let info = file.tensor(&format!("t.{ty}")).ok_or("tensor missing")?;
        let tc = p.cpu.lookup_table(&file, info).map_err(|e| e.to_string())?;
        let tg = p.gpu.lookup_table(&file, info).map_err(|e| e.to_string())?;
        let want = p.cpu.to_host(&p.cpu.embed(&tc, &tokens, 25.3).map_err(|e| e.to_string())?);
        let got = p.gpu.to_host(&p.gpu.embed(&tg, &tokens, 25.3).map_err(|e| e.to_string())?);
        p.exact(&format!("embed {ty}"), &got, &want);
    }
    Ok(())
}

fn vectors(p: &Pair, name: &str, values: &[f32]) -> Result<(Vec<f32>, <CudaBackend as Backend>::Vector), String> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let file = gguf(&[(name.to_string(), GgmlType::F32, vec![values.len() as u64], bytes)])?;
    let info = file.tensor(name).ok_or("tensor missing")?;
    Ok((p.cpu.vector(&file, info).map_err(|e| e.to_string())?, p.gpu.vector(&file, info).map_err(|e| e.to_string())?))
}

fn norms(p: &mut Pair, rng: &mut Rng) -> Check {
    let (rows, cols) = (5usize, 640usize);
    let x: Vec<f32> = rng.floats(rows * cols).iter().map(|v| v * 3.0).collect();
    for seg in [640usize, 64] {
        let w: Vec<f32> = (0..seg).map(|_| 1.0 + rng.float() * 0.5).collect();
        let (wc, wg) = vectors(p, "norm", &w)?;
        let (xc, xg) = p.acts(rows, cols, &x);
        let want = p.cpu.to_host(&p.cpu.rms_norm(&xc, &wc, 1e-6));
        let got = p.gpu.to_host(&p.gpu.rms_norm(&xg, &wg, 1e-6));
        // Sums of squares in f64 on both sides, in other orders: the mean rounds alike.
        p.close(&format!("rms_norm segments of {seg}"), &got, &want, 1e-12);
    }
    Ok(())
}

fn ropes(p: &mut Pair, rng: &mut Rng) -> Check {
    let positions = [0u32, 5, 100, 3000, 40_000];
    let rows = positions.len();
    // The same angles as the CPU builds them, then sin and cos (within an ulp or two).
    let limit = 1e-10;
    for (hd, heads) in [(64usize, 4usize), (16, 2)] {
        let cols = hd * heads;
        let x = rng.floats(rows * cols);
        let run = |p: &mut Pair,
                   name: &str,
                   f: &dyn Fn(&CpuBackend, &mut <CpuBackend as Backend>::Act),
                   g: &dyn Fn(&CudaBackend, &mut <CudaBackend as Backend>::Act)| {
            let (mut xc, mut xg) = p.acts(rows, cols, &x);
            f(&p.cpu, &mut xc);
            g(p.gpu, &mut xg);
            let (want, got) = (p.cpu.to_host(&xc), p.gpu.to_host(&xg));
            p.close(&format!("{name}, heads of {hd}"), &got, &want, limit);
        };
        run(p, "rope_neox", &|b, x| b.rope_neox(x, &positions, hd, 10_000.0, 1.0), &|b, x| {
            b.rope_neox(x, &positions, hd, 10_000.0, 1.0)
        });
        run(p, "rope_neox ×0.25", &|b, x| b.rope_neox(x, &positions, hd, 1e6, 0.25), &|b, x| {
            b.rope_neox(x, &positions, hd, 1e6, 0.25)
        });
        let factors: Vec<f32> = (0..hd / 2).map(|i| 1.0 + i as f32 * 0.7).collect();
        let (fc, fg) = vectors(p, "rope_freqs", &factors)?;
        run(p, "rope_norm with factors", &|b, x| b.rope_norm(x, &positions, hd, 500_000.0, 1.0, Some(&fc)), &|b, x| {
            b.rope_norm(x, &positions, hd, 500_000.0, 1.0, Some(&fg))
        });
        run(p, "rope_norm", &|b, x| b.rope_norm(x, &positions, hd, 10_000.0, 0.5, None), &|b, x| {
            b.rope_norm(x, &positions, hd, 10_000.0, 0.5, None)
        });
        let yarn = Yarn::new(hd, 150_000.0, 32.0, 4096);
        run(p, "rope_neox_yarn", &|b, x| b.rope_neox_yarn(x, &positions, hd, 150_000.0, &yarn), &|b, x| {
            b.rope_neox_yarn(x, &positions, hd, 150_000.0, &yarn)
        });
        let ds = Yarn::deepseek(hd, 10_000.0, 4.0, 128);
        run(p, "rope_norm_yarn", &|b, x| b.rope_norm_yarn(x, &positions, hd, 10_000.0, &ds), &|b, x| {
            b.rope_norm_yarn(x, &positions, hd, 10_000.0, &ds)
        });
    }
    Ok(())
}

fn elementwise(p: &mut Pair, rng: &mut Rng) -> Check {
    let (rows, cols) = (6usize, 300usize);
    let (a, b) = (rng.floats(rows * cols), rng.floats(rows * cols));
    let ((mut ac, bc), (mut ag, bg)) = {
        let (ac, ag) = p.acts(rows, cols, &a);
        let (bc, bg) = p.acts(rows, cols, &b);
        ((ac, bc), (ag, bg))
    };
    p.cpu.scale(&mut ac, 0.37);
    p.gpu.scale(&mut ag, 0.37);
    p.cpu.add(&mut ac, &bc);
    p.gpu.add(&mut ag, &bg);
    let bias = rng.floats(cols);
    let (vc, vg) = vectors(p, "bias", &bias)?;
    p.cpu.add_bias(&mut ac, &vc);
    p.gpu.add_bias(&mut ag, &vg);
    let (want, got) = (p.cpu.to_host(&ac), p.gpu.to_host(&ag));
    p.exact("scale, add, add_bias", &got, &want);

    // Rows may repeat: each is added in order.
    let (xc, xg) = p.acts(4, cols, &rng.floats(4 * cols));
    let (targets, weights) = ([2usize, 0, 2, 5], [0.3f32, -1.5, 0.7, 0.01]);
    p.cpu.add_scaled_rows(&mut ac, &xc, &targets, &weights);
    p.gpu.add_scaled_rows(&mut ag, &xg, &targets, &weights);
    let (want, got) = (p.cpu.to_host(&ac), p.gpu.to_host(&ag));
    p.exact("add_scaled_rows", &got, &want);

    // Gated activations: the gate spread over ±12 reaches GeGLU's saturated ends.
    let gate: Vec<f32> = rng.floats(rows * cols).iter().map(|v| v * 12.0).collect();
    let up = rng.floats(rows * cols);
    let gated: [(&str, f64, Gated); 3] = [
        // The f16 table's entries; a tanh an ulp apart may round to the next f16 once in a while.
        ("geglu", 1e-7, (|b, g, u| b.geglu(g, u), |b, g, u| b.geglu(g, u))),
        ("swiglu", 1e-10, (|b, g, u| b.swiglu(g, u), |b, g, u| b.swiglu(g, u))),
        ("swiglu_oai", 1e-10, (|b, g, u| b.swiglu_oai(g, u, 1.702, 7.0), |b, g, u| b.swiglu_oai(g, u, 1.702, 7.0))),
    ];
    for (name, limit, (f, g)) in gated {
        let ((mut gc, mut gg), (uc, ug)) = (p.acts(rows, cols, &gate), p.acts(rows, cols, &up));
        f(&p.cpu, &mut gc, &uc);
        g(p.gpu, &mut gg, &ug);
        let (want, got) = (p.cpu.to_host(&gc), p.gpu.to_host(&gg));
        p.close(name, &got, &want, limit);
    }
    Ok(())
}

fn gathers(p: &mut Pair, rng: &mut Rng) -> Check {
    let (rows, cols) = (5usize, 90usize);
    let (xc, xg) = p.acts(rows, cols, &rng.floats(rows * cols));
    let spans = [(10usize, 20usize), (0, 5), (85, 5)];
    let (want, got) = (p.cpu.to_host(&p.cpu.gather_cols(&xc, &spans)), p.gpu.to_host(&p.gpu.gather_cols(&xg, &spans)));
    p.exact("gather_cols", &got, &want);
    let (yc, yg) = p.acts(rows, 7, &rng.floats(rows * 7));
    let (want, got) =
        (p.cpu.to_host(&p.cpu.concat_cols(&[&xc, &yc, &xc])), p.gpu.to_host(&p.gpu.concat_cols(&[&xg, &yg, &xg])));
    p.exact("concat_cols", &got, &want);
    let picks = [4usize, 0, 4, 2];
    let (want, got) = (p.cpu.to_host(&p.cpu.select_rows(&xc, &picks)), p.gpu.to_host(&p.gpu.select_rows(&xg, &picks)));
    p.exact("select_rows", &got, &want);
    Ok(())
}

/// One attention layer's shape and cache.
struct AttnCase {
    name: &'static str,
    shape: AttnShape,
    shared_v: bool,
    sinks: bool,
    dtype: KvType,
}

/// Against the CPU's arithmetic the GPU's f32 attention differs by the CPU's f16 rounding of
/// Q and of the V accumulator on its path for short runs (~1.5e-7, turbine-gpu-check).
const ATTENTION_LIMIT: f64 = 1e-5;

fn attentions(p: &mut Pair, rng: &mut Rng) -> Check {
    let shape = |n_heads, n_kv_heads, head_dim, v_head_dim, window| AttnShape {
        n_heads,
        n_kv_heads,
        head_dim,
        v_head_dim,
        window,
        scale: 1.0 / (head_dim as f32).sqrt(),
    };
    let cases = [
        AttnCase {
            name: "gemma3 4/1 hd256, window 32",
            shape: shape(4, 1, 256, 256, Some(32)),
            shared_v: false,
            sinks: false,
            dtype: KvType::F16,
        },
        AttnCase {
            name: "gpt-oss 8/2 hd64, window 16, sinks",
            shape: shape(8, 2, 64, 64, Some(16)),
            shared_v: false,
            sinks: true,
            dtype: KvType::F16,
        },
        AttnCase {
            name: "deepseek MLA 4/1 80/64 shared V",
            shape: shape(4, 1, 80, 64, None),
            shared_v: true,
            sinks: false,
            dtype: KvType::F16,
        },
        AttnCase {
            name: "llama 8/2 hd128, f32 cache",
            shape: shape(8, 2, 128, 128, None),
            shared_v: false,
            sinks: false,
            dtype: KvType::F32,
        },
    ];
    for c in &cases {
        attention_case(p, c, rng)?;
    }
    Ok(())
}

/// Two steps on three sequence slots: a 70-token prompt (the CPU's f32 path) beside a
/// 5-token one, then a decode token for each and a third sequence's 3-token prompt.
fn attention_case(p: &mut Pair, c: &AttnCase, rng: &mut Rng) -> Check {
    let s = c.shape;
    let kv_dim = s.n_kv_heads * s.head_dim;
    let layout = KvLayout { kv_dim, windows: vec![s.window], shared_v: c.shared_v };
    let spec = KvSpec::for_sequences(&layout, 128, 3, 128).with_type(c.dtype);
    let (mut kc, mut kg) = (p.cpu.new_kv(&spec), p.gpu.new_kv(&spec));
    let sinks = if c.sinks {
        Some(vectors(p, "sinks", &rng.floats(s.n_heads).iter().map(|v| 1.0 + 2.0 * v).collect::<Vec<_>>())?)
    } else {
        None
    };
    let steps: [&[(usize, usize, usize)]; 2] = [&[(0, 0, 70), (1, 0, 5)], &[(1, 5, 1), (0, 70, 1), (2, 0, 3)]];
    for (i, step) in steps.iter().enumerate() {
        let mut batch = Batch::default();
        for &(seq, start, n) in step.iter() {
            for pos in start..start + n {
                batch.push(seq, pos as u32, 1, false);
            }
        }
        let rows = batch.len();
        kc.blocks_mut().begin_batch(&batch).map_err(|e| e.to_string())?;
        kg.blocks_mut().begin_batch(&batch).map_err(|e| e.to_string())?;
        let q = rng.floats(rows * s.n_heads * s.head_dim).iter().map(|v| 3.0 * v).collect::<Vec<_>>();
        let k = rng.floats(rows * kv_dim);
        let v_cols = if c.shared_v { kv_dim } else { s.n_kv_heads * s.v_head_dim };
        let v = if c.shared_v { k.clone() } else { rng.floats(rows * v_cols) };
        let ((qc, qg), (kcpu, kgpu), (vc, vg)) =
            (p.acts(rows, q.len() / rows, &q), p.acts(rows, kv_dim, &k), p.acts(rows, v_cols, &v));
        let want = p.cpu.attention(&mut kc, 0, &batch.layout, &qc, &kcpu, &vc, s, sinks.as_ref().map(|x| &x.0));
        let got = p.gpu.attention(&mut kg, 0, &batch.layout, &qg, &kgpu, &vg, s, sinks.as_ref().map(|x| &x.1));
        kc.blocks_mut().end_batch(&batch);
        kg.blocks_mut().end_batch(&batch);
        let (want, got) = (p.cpu.to_host(&want), p.gpu.to_host(&got));
        p.close(&format!("attention {}, step {} ({rows} rows)", c.name, i + 1), &got, &want, ATTENTION_LIMIT);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The in-memory files parse, and the CPU side of the checks accepts every weight and
    /// table they make (so a GPU run fails only on the GPU's side).
    #[test]
    fn test_files_load_on_the_cpu() {
        let mut rng = Rng(5);
        let cpu = CpuBackend::default();
        let tensors: Vec<_> = MATRIX_TYPES
            .iter()
            .map(|&ty| (format!("w.{ty}"), ty, vec![512, 8], random_weights(ty, 8, 512, &mut rng)))
            .collect();
        let file = gguf(&tensors).expect("parses");
        for ty in MATRIX_TYPES {
            let info = file.tensor(&format!("w.{ty}")).expect("tensor");
            let w = cpu.weight(&file, info).expect("weight");
            let y = cpu.to_host(&cpu.matmul(&w, &cpu.from_host(2, 512, rng.floats(1024))));
            assert!(y.len() == 16 && y.iter().all(|v| v.is_finite()), "{ty}: {y:?}");
            let t = cpu.lookup_table(&file, info).expect("table");
            assert_eq!(cpu.to_host(&cpu.embed(&t, &[7, 0], 1.0).expect("rows")).len(), 1024);
        }
    }
}
