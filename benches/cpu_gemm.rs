//! The CPU backend's f32 GEMM (`ops::matmul`: our AVX-512 kernel `ops::sgemm` where the CPU has
//! it, else `matrixmultiply`) at the shapes of a SmolLM2-135M step at 512 tokens: throughput in
//! FLOP/s (criterion's "elements" are FLOPs), on all cores. Compare with the cores' FMA peak
//! (cores × clock × 2 FMA units × 16 lanes × 2 on AVX-512).
//!
//! Run: `cargo bench --bench cpu_gemm`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qlora_rs::ops::matmul::{gemm_new, gemm_sum_threads, Mat, Product};

fn values(n: usize, seed: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 0.618_034 + seed).fract() - 0.5) * 0.1)
        .collect()
}

fn gemm_bench(c: &mut Criterion) {
    // (name, m, k, n, A stored transposed, B stored transposed): y = x·Wᵀ of the projections
    // (B = Wᵀ), dx = dy·W (B = W), the LoRA x·Aᵀ (16 columns), attention's Q·Kᵀ and P·V blocks.
    let shapes = [
        ("gate_up_fwd", 512, 576, 1536, false, true),
        ("down_dx", 512, 576, 1536, false, false),
        ("down_fwd", 512, 1536, 576, false, true),
        ("q_fwd", 512, 576, 576, false, true),
        ("lora_xa", 512, 576, 16, false, true),
        ("lora_da", 16, 512, 576, true, false),
        ("attn_qk_block", 64, 64, 512, false, true),
        ("attn_pv_block", 64, 512, 64, false, false),
    ];
    let mut g = c.benchmark_group("cpu_gemm");
    g.sample_size(10);
    for (name, m, k, n, at, bt) in shapes {
        let a = values(m * k, 0.1);
        let b = values(k * n, 0.7);
        let am = if at {
            Mat::new(&a, k, m).t()
        } else {
            Mat::new(&a, m, k)
        };
        let bm = if bt {
            Mat::new(&b, n, k).t()
        } else {
            Mat::new(&b, k, n)
        };
        let product = Product {
            a: am,
            b: bm,
            alpha: 1.0f32,
        };
        g.throughput(Throughput::Elements(2 * (m * k * n) as u64));
        let id = format!("{m}x{k}x{n}");
        g.bench_with_input(BenchmarkId::new(name, &id), &product, |bch, p| {
            bch.iter(|| gemm_new(&[*p]))
        });
        if m * k * n <= 1 << 21 {
            // The attention blocks run one per task: on one thread.
            let mut out = vec![0.0f32; m * n];
            g.bench_with_input(
                BenchmarkId::new(format!("{name}_1t"), &id),
                &product,
                |bch, p| bch.iter(|| gemm_sum_threads(&[*p], &mut out, n, 0.0, 1)),
            );
        }
    }
    g.finish();
}

criterion_group!(benches, gemm_bench);
criterion_main!(benches);
