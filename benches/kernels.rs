//! Criterion benches of every kernel family, device-synchronised (`iter_custom`: launch `iters`
//! times, synchronise, read the clock). Memory-bound kernels report bytes moved (read + written)
//! so criterion prints GB/s; the `copy` group is the ceiling they are compared with.
//!
//! Without a GPU the CUDA groups print `SKIPPED (no CUDA device)` and register nothing, unless
//! `QLORA_REQUIRE_GPU=1` (set on the GPU host), when a missing GPU is an error.
//!
//! Run: `cargo bench --bench kernels [-- <group or name filter>]`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use qlora_rs::device::{CudaDevice, Device};
use qlora_rs::quant::nf4::{Nf4Config, Nf4Tensor};
use qlora_rs::testing::gpu_or_skip;
use qlora_rs::{DType, Tensor};
use rand::{Rng, SeedableRng};

fn cuda(group: &str) -> Option<(Device, Arc<CudaDevice>)> {
    match gpu_or_skip(&format!("bench group {group}")) {
        Some(dev @ Device::Cuda(o)) => Some((dev, CudaDevice::get(o).expect("CUDA device"))),
        _ => None,
    }
}

/// Times `iters` calls of `f` on the device: synchronise, launch all, synchronise.
fn timed(dev: &CudaDevice, iters: u64, mut f: impl FnMut()) -> Duration {
    dev.synchronize().unwrap();
    let start = Instant::now();
    for _ in 0..iters {
        f();
    }
    dev.synchronize().unwrap();
    start.elapsed()
}

/// Device-to-device copy: the bandwidth ceiling for memory-bound kernels (bytes read + written).
fn copy(c: &mut Criterion) {
    let Some((_, dev)) = cuda("copy") else {
        return;
    };
    let mut group = c.benchmark_group("copy");
    for mib in [64usize, 512] {
        let n = mib << 20;
        let src = dev.stream().alloc_zeros::<u8>(n).unwrap();
        let mut dst = dev.stream().alloc_zeros::<u8>(n).unwrap();
        group.throughput(Throughput::Bytes(2 * n as u64));
        group.bench_function(BenchmarkId::new("dtod", format!("{mib}MiB")), |b| {
            b.iter_custom(|iters| {
                timed(&dev, iters, || {
                    dev.stream().memcpy_dtod(&src, &mut dst).unwrap()
                })
            })
        });
    }
    group.finish();
}

fn random_bf16(n: usize, seed: u64) -> Vec<bf16> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| bf16::from_f32(rng.random_range(-0.05f32..0.05)))
        .collect()
}

/// NF4 dequantize (to bf16) and quantize (from bf16) at the Llama-3-8B MLP shapes, blocksize 64
/// with double quantization (the QLoRA default).
fn nf4(c: &mut Criterion) {
    let Some((device, dev)) = cuda("nf4") else {
        return;
    };
    let mut group = c.benchmark_group("nf4");
    for (rows, cols) in [(4096usize, 14336usize), (14336, 4096)] {
        let n = rows * cols;
        let w = Tensor::from_vec(random_bf16(n, 1), &[rows, cols], &device).unwrap();
        let mut q = Nf4Tensor::quantize(&w, Nf4Config::default()).unwrap();
        let nblocks = q.nblocks();
        // packed codes + one absmax code per block + second-level absmax + the bf16 output
        let dequant_bytes = n / 2 + nblocks + 4 * nblocks.div_ceil(256) + 2 * n;
        let mut out = Tensor::zeros(&[rows, cols], DType::BF16, &device).unwrap();
        group.throughput(Throughput::Bytes(dequant_bytes as u64));
        group.bench_function(
            BenchmarkId::new("dequantize_bf16", format!("{rows}x{cols}")),
            |b| b.iter_custom(|iters| timed(&dev, iters, || q.dequantize_into(&mut out).unwrap())),
        );
        // bf16 input read twice (absmax, then codes) counts once: the second read hits L1/L2.
        let quant_bytes = 2 * n + n / 2 + 4 * nblocks + nblocks + 4 * nblocks.div_ceil(256);
        group.throughput(Throughput::Bytes(quant_bytes as u64));
        group.bench_function(
            BenchmarkId::new("quantize_bf16", format!("{rows}x{cols}")),
            |b| b.iter_custom(|iters| timed(&dev, iters, || q.quantize_from(&w).unwrap())),
        );
    }
    group.finish();
}

criterion_group!(benches, copy, nf4);
criterion_main!(benches);
