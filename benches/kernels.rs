//! Quantized matrix-vector and matrix-matrix kernels at Gemma 3 270M's shapes, with
//! throughput in weight bytes per second.
//!   cargo bench --bench kernels

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use turbine::cpu::matmul::{matmul, WeightView};
use turbine::cpu::GgmlType;

/// Random but well-formed blocks: the first two bytes of each block (an f16 scale in
/// most layouts) are kept small so values stay finite.
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
    for block in bytes.chunks_mut(ty.type_size()) {
        let scale = half::f16::from_f32(0.01).to_le_bytes();
        block[..2].copy_from_slice(&scale);
    }
    bytes
}

fn bench_matmul(c: &mut Criterion) {
    // (name, type, rows, cols) of Gemma 3 270M Q4_K_M tensors.
    let shapes = [
        ("attn_q", GgmlType::Q5_0, 1024, 640),
        ("ffn_up", GgmlType::Q5_0, 2048, 640),
        ("ffn_down", GgmlType::Q4_K, 640, 2048),
        ("ffn_down", GgmlType::Q6_K, 640, 2048),
        ("attn_v", GgmlType::Q8_0, 256, 640),
        ("output", GgmlType::Q8_0, 262144, 640),
    ];
    let mut group = c.benchmark_group("matmul");
    group.sample_size(10);
    for (name, ty, rows, cols) in shapes {
        let w = random_weights(ty, rows, cols);
        let view = WeightView::new(ty, rows, cols, &w).expect("sizes match");
        for n in [1usize, 64] {
            let x: Vec<f32> = (0..n * cols).map(|i| ((i % 97) as f32 - 48.0) / 50.0).collect();
            let mut out = vec![0.0f32; n * rows];
            group.throughput(Throughput::Bytes(w.len() as u64));
            let id = BenchmarkId::new(format!("{name}/{ty}/{rows}x{cols}"), n);
            group.bench_with_input(id, &n, |b, &n| b.iter(|| matmul(&view, &x, n, &mut out)));
        }
    }
    group.finish();
}

criterion_group!(benches, bench_matmul);
criterion_main!(benches);
