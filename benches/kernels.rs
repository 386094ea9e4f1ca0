//! Quantized matrix-vector (one token: decode) and matrix-matrix (many tokens: prompt
//! processing) kernels at the layer shapes of Gemma 3 270M (the default model), Llama 3
//! 8B and gpt-oss 20B, through both paths: the row kernels (`rows`) and the interleaved
//! kernels the engine uses for the types that have them (`interleaved`). One token
//! reports weight bytes per second; many tokens report multiply-adds per second
//! (criterion's "elements"). `memory/read` measures the machine's streaming read
//! bandwidth beside them.
//!   cargo bench --bench kernels [-- FILTER]

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use turbine::cpu::act::QuantizedActs;
use turbine::cpu::interleaved::Interleaved;
use turbine::cpu::matmul::{matmul_interleaved, matmul_quantized, WeightView};
use turbine::cpu::{GgmlType, Isa};

/// Random but well-formed blocks: each block's f16 scale (bytes 0..2, or 208..210 for
/// Q6_K; MXFP4 has an exponent byte) is kept small so values stay finite.
fn random_weights(ty: GgmlType, rows: usize, cols: usize) -> Vec<u8> {
    let n = ty.row_bytes(cols).expect("cols is a block multiple") * rows;
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut bytes: Vec<u8> = (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let scale = half::f16::from_f32(0.01).to_le_bytes();
    for block in bytes.chunks_mut(ty.type_size()) {
        match ty {
            GgmlType::MXFP4 => block[0] = 120,
            GgmlType::Q6_K => block[208..210].copy_from_slice(&scale),
            _ => block[..2].copy_from_slice(&scale),
        }
    }
    bytes
}

/// (model, tensor, type, rows, cols).
const SHAPES: [(&str, &str, GgmlType, usize, usize); 14] = [
    ("gemma3-270m", "attn_q", GgmlType::Q5_0, 1024, 640),
    ("gemma3-270m", "ffn_up", GgmlType::Q5_0, 2048, 640),
    ("gemma3-270m", "ffn_down", GgmlType::Q4_K, 640, 2048),
    ("gemma3-270m", "ffn_down", GgmlType::Q6_K, 640, 2048),
    ("gemma3-270m", "attn_v", GgmlType::Q8_0, 256, 640),
    ("gemma3-270m", "output", GgmlType::Q8_0, 262144, 640),
    ("llama3-8b", "attn_q", GgmlType::Q4_K, 4096, 4096),
    ("llama3-8b", "ffn_up", GgmlType::Q4_K, 14336, 4096),
    ("llama3-8b", "ffn_down", GgmlType::Q6_K, 4096, 14336),
    ("llama3-8b", "ffn_up", GgmlType::Q8_0, 14336, 4096),
    ("llama3-8b", "ffn_up", GgmlType::Q4_0, 14336, 4096),
    ("gpt-oss-20b", "attn_q", GgmlType::Q8_0, 4096, 2880),
    ("gpt-oss-20b", "expert_up", GgmlType::MXFP4, 2880, 2880),
    ("gpt-oss-20b", "output", GgmlType::Q8_0, 201088, 2880),
];

fn bench_matmul(c: &mut Criterion) {
    let mut group = c.benchmark_group("matmul");
    group.sample_size(10);
    for (model, name, ty, rows, cols) in SHAPES {
        let w = random_weights(ty, rows, cols);
        let view = WeightView::new(ty, rows, cols, &w).expect("sizes match");
        let interleaved = Interleaved::new(&view);
        // Prompt batches over the big matrices are seconds each: fewer tokens there.
        let many = if rows * cols > 50_000_000 { 64 } else { 512 };
        // 8: a decode step of 8 sequences (the server batching concurrent requests).
        for n in [1usize, 8, many] {
            let x: Vec<f32> = (0..n * cols).map(|i| ((i % 97) as f32 - 48.0) / 50.0).collect();
            let acts = QuantizedActs::new(ty.act_type(), &x, cols);
            let mut out = vec![0.0f32; n * rows];
            group.throughput(if n == 1 {
                Throughput::Bytes(w.len() as u64)
            } else {
                Throughput::Elements((rows * cols * n) as u64)
            });
            let label = |path: &str| BenchmarkId::new(format!("{model}/{name}/{ty}/{rows}x{cols}/{path}"), n);
            group.bench_with_input(label("rows"), &n, |b, _| {
                b.iter(|| matmul_quantized(Isa::best(), &view, &acts, &mut out))
            });
            if let Some(il) = &interleaved {
                group.bench_with_input(label("interleaved"), &n, |b, _| {
                    b.iter(|| matmul_interleaved(&view, il, &acts, &mut out))
                });
            }
        }
    }
    group.finish();
}

/// The roofline's other side: how fast this machine streams memory with every thread of
/// the pool, XOR-folded so nothing is optimized away, in bytes per second. 128 MiB fits
/// the last-level cache of some servers (the 2-core dev VM has 260 MiB of L3, so a small
/// model's weights stay there between decode steps); 2 GiB does not.
fn bench_memory(c: &mut Criterion) {
    use rayon::prelude::*;
    let mut group = c.benchmark_group("memory");
    group.sample_size(10);
    for mib in [128u64, 2048] {
        let data: Vec<u64> = (0..(mib << 20) / 8).collect();
        group.throughput(Throughput::Bytes((data.len() * 8) as u64));
        group.bench_function(format!("read/{mib}MiB"), |b| {
            b.iter(|| data.par_chunks(1 << 16).map(|c| c.iter().fold(0u64, |a, &x| a ^ x)).reduce(|| 0, |a, b| a ^ b))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_matmul, bench_memory);
criterion_main!(benches);
