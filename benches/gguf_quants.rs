//! GGUF quantization (llama.cpp's reference quantizers, src/quant/ggml_quants.rs) on the CPU:
//! throughput in bytes of f32 input, for one 4096 × 4096 weight (an 8B model's attention
//! projection), all cores (rayon) and one.
//!
//! Run: `cargo bench --bench gguf_quants`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qlora_rs::quant::ggml_quants::quantize;
use qlora_rs::quant::gguf::GgmlType;

fn quantize_bench(c: &mut Criterion) {
    let (rows, row_len) = (4096usize, 4096usize);
    // Deterministic weight-like values (no RNG needed for timing).
    let x: Vec<f32> = (0..rows * row_len)
        .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 0.04)
        .collect();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    let mut g = c.benchmark_group("gguf_quantize");
    g.sample_size(10);
    g.throughput(Throughput::Bytes((x.len() * 4) as u64));
    for ty in [
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q5_1,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ] {
        g.bench_with_input(BenchmarkId::new("all_cores", ty.name()), &ty, |b, &ty| {
            b.iter(|| quantize(ty, &x, row_len).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("one_core", ty.name()), &ty, |b, &ty| {
            b.iter(|| one.install(|| quantize(ty, &x, row_len).unwrap()))
        });
    }
    g.finish();
}

criterion_group!(benches, quantize_bench);
criterion_main!(benches);
