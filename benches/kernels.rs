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
use qlora_rs::ops::gemm::{self, Layout, LoraCuda};
use qlora_rs::ops::rmsnorm::Norm;
use qlora_rs::ops::{attention, cross_entropy, dropout, embedding, rmsnorm, rope, split, swiglu};
use qlora_rs::quant::nf4::{Nf4Config, Nf4Tensor};
use qlora_rs::testing::gpu_or_skip;
use qlora_rs::train::optimizer::{AdamWConfig, AdamWCuda};
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

fn bf16_tensor(device: &Device, shape: &[usize], seed: u64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(random_bf16(n, seed), shape, device).unwrap()
}

/// Memory-bound kernels of the step at Llama-3-8B sizes (4096 tokens): GB/s of bytes read and
/// written, to compare with the `copy` group.
fn step_kernels(c: &mut Criterion) {
    let Some((device, dev)) = cuda("rmsnorm/rope/embedding/swiglu/split/adamw/cross_entropy")
    else {
        return;
    };
    let (t, d, f, heads, hd) = (4096usize, 4096usize, 14336usize, 32usize, 128usize);

    let mut g = c.benchmark_group("rmsnorm");
    let x = bf16_tensor(&device, &[t, d], 2);
    let w = bf16_tensor(&device, &[d], 3);
    g.throughput(Throughput::Bytes((2 * t * d * 2 + d * 2 + t * 4) as u64));
    g.bench_function(BenchmarkId::new("fwd_bf16", format!("{t}x{d}")), |b| {
        b.iter_custom(|iters| {
            timed(&dev, iters, || {
                drop(rmsnorm::forward_cuda(&x, &w, Norm::plain(1e-5)).unwrap())
            })
        })
    });
    let (_, rstd) = rmsnorm::forward_cuda(&x, &w, Norm::plain(1e-5)).unwrap();
    let dy = bf16_tensor(&device, &[t, d], 4);
    g.throughput(Throughput::Bytes((3 * t * d * 2 + d * 2 + t * 4) as u64));
    g.bench_function(BenchmarkId::new("bwd_bf16", format!("{t}x{d}")), |b| {
        b.iter_custom(|iters| {
            timed(&dev, iters, || {
                drop(rmsnorm::backward_cuda(&x, &w, &rstd, &dy, None, Norm::plain(1e-5)).unwrap())
            })
        })
    });
    // Gemma's norm: the effective weight 1 + w, added in f32 inside the same kernels.
    let gemma = Norm::unit_offset(1e-6);
    g.throughput(Throughput::Bytes((2 * t * d * 2 + d * 2 + t * 4) as u64));
    g.bench_function(
        BenchmarkId::new("fwd_unit_offset_bf16", format!("{t}x{d}")),
        |b| {
            b.iter_custom(|iters| {
                timed(&dev, iters, || {
                    drop(rmsnorm::forward_cuda(&x, &w, gemma).unwrap())
                })
            })
        },
    );
    g.throughput(Throughput::Bytes((3 * t * d * 2 + d * 2 + t * 4) as u64));
    g.bench_function(
        BenchmarkId::new("bwd_unit_offset_bf16", format!("{t}x{d}")),
        |b| {
            b.iter_custom(|iters| {
                timed(&dev, iters, || {
                    drop(rmsnorm::backward_cuda(&x, &w, &rstd, &dy, None, gemma).unwrap())
                })
            })
        },
    );
    g.finish();

    let mut g = c.benchmark_group("rope");
    let mut q = bf16_tensor(&device, &[t, heads, hd], 5);
    let pos = Tensor::from_vec((0..t as i32).collect::<Vec<_>>(), &[t], &device).unwrap();
    let freqs = Tensor::from_vec(
        rope::inv_freq(hd, 500_000.0, rope::RopeScaling::None),
        &[hd / 2],
        &device,
    )
    .unwrap();
    g.throughput(Throughput::Bytes((2 * t * heads * hd * 2) as u64));
    g.bench_function(
        BenchmarkId::new("fwd_bf16", format!("{t}x{heads}x{hd}")),
        |b| {
            b.iter_custom(|iters| {
                timed(&dev, iters, || {
                    rope::apply_cuda(&mut q, &pos, &freqs, 1.0, false).unwrap()
                })
            })
        },
    );
    // Phi-4-mini: 24 heads of 128, the first 96 dims rotated (partial_rotary_factor 0.75),
    // longrope's attention factor; the pass-through dims are neither read nor written.
    let (ph, rot) = (24usize, 96usize);
    let mut pq = bf16_tensor(&device, &[t, ph, hd], 11);
    let pfreqs = Tensor::from_vec(
        rope::inv_freq(rot, 10_000.0, rope::RopeScaling::None),
        &[rot / 2],
        &device,
    )
    .unwrap();
    g.throughput(Throughput::Bytes((2 * t * ph * rot * 2) as u64));
    g.bench_function(
        BenchmarkId::new("fwd_partial_bf16", format!("{t}x{ph}x{hd}_rot{rot}")),
        |b| {
            b.iter_custom(|iters| {
                timed(&dev, iters, || {
                    rope::apply_cuda(&mut pq, &pos, &pfreqs, 1.19, false).unwrap()
                })
            })
        },
    );
    g.finish();

    // kernels/split.cu: Phi-3's fused projections split into their parts (Phi-4-mini's qkv
    // [T, 3072 + 1024 + 1024], Phi-3-mini's gate_up [T, 2 × 8192]) and the concat of the
    // backward; bytes read + written.
    let mut g = c.benchmark_group("split");
    for (name, widths) in [
        ("qkv", vec![3072usize, 1024, 1024]),
        ("gate_up", vec![8192, 8192]),
    ] {
        let w: usize = widths.iter().sum();
        let x = bf16_tensor(&device, &[t, w], 12);
        g.throughput(Throughput::Bytes((2 * t * w * 2) as u64));
        g.bench_function(
            BenchmarkId::new(format!("split_{name}_bf16"), format!("{t}x{w}")),
            |b| {
                b.iter_custom(|iters| {
                    timed(&dev, iters, || {
                        drop(split::split_cols(&x, &widths).unwrap())
                    })
                })
            },
        );
        let parts = split::split_cols(&x, &widths).unwrap();
        let refs: Vec<&Tensor> = parts.iter().collect();
        g.bench_function(
            BenchmarkId::new(format!("concat_{name}_bf16"), format!("{t}x{w}")),
            |b| {
                b.iter_custom(|iters| {
                    timed(&dev, iters, || drop(split::concat_cols(&refs).unwrap()))
                })
            },
        );
    }
    g.finish();

    // kernels/embedding.cu: the gather and the elementwise kernels of the step.
    let mut g = c.benchmark_group("embedding");
    // The gather takes host ids, so its time includes their upload (as in the step).
    let table = bf16_tensor(&device, &[32_000, d], 20);
    let ids: Vec<u32> = (0..t as u32).map(|i| i * 31 % 32_000).collect();
    g.throughput(Throughput::Bytes((2 * t * d * 2 + t * 4) as u64));
    g.bench_function(BenchmarkId::new("gather_bf16", format!("{t}x{d}")), |b| {
        b.iter_custom(|iters| {
            timed(&dev, iters, || {
                drop(embedding::forward_cuda(&table, &ids, None).unwrap())
            })
        })
    });
    // Gemma's scaled embedding (√d, rounded to bf16 on the host).
    let scale = Some((d as f32).sqrt());
    g.bench_function(
        BenchmarkId::new("gather_scaled_bf16", format!("{t}x{d}")),
        |b| {
            b.iter_custom(|iters| {
                timed(&dev, iters, || {
                    drop(embedding::forward_cuda(&table, &ids, scale).unwrap())
                })
            })
        },
    );
    let (ea, eb) = (
        bf16_tensor(&device, &[t, d], 21),
        bf16_tensor(&device, &[t, d], 22),
    );
    g.throughput(Throughput::Bytes((3 * t * d * 2) as u64));
    g.bench_function(BenchmarkId::new("add_bf16", format!("{t}x{d}")), |b| {
        b.iter_custom(|iters| timed(&dev, iters, || drop(embedding::add_cuda(&ea, &eb).unwrap())))
    });
    let mut ey = bf16_tensor(&device, &[t, d], 23);
    let bias = bf16_tensor(&device, &[d], 24);
    g.throughput(Throughput::Bytes((2 * t * d * 2 + d * 2) as u64));
    g.bench_function(BenchmarkId::new("bias_add_bf16", format!("{t}x{d}")), |b| {
        b.iter_custom(|iters| {
            timed(&dev, iters, || {
                embedding::bias_add_cuda(&mut ey, &bias).unwrap()
            })
        })
    });
    g.throughput(Throughput::Bytes((2 * t * d * 2) as u64));
    g.bench_function(BenchmarkId::new("dropout_bf16", format!("{t}x{d}")), |b| {
        b.iter_custom(|iters| {
            timed(&dev, iters, || {
                drop(dropout::dropout_cuda(&ea, 0.1, 7).unwrap())
            })
        })
    });
    g.finish();

    let mut g = c.benchmark_group("swiglu");
    let gate = bf16_tensor(&device, &[t, f], 6);
    let upt = bf16_tensor(&device, &[t, f], 7);
    g.throughput(Throughput::Bytes((3 * t * f * 2) as u64));
    g.bench_function(BenchmarkId::new("fwd_bf16", format!("{t}x{f}")), |b| {
        b.iter_custom(|iters| {
            timed(&dev, iters, || {
                drop(swiglu::forward_cuda(&gate, &upt, swiglu::Act::Silu).unwrap())
            })
        })
    });
    // GeGLU (Gemma): gelu_tanh in place of silu, same traffic.
    g.bench_function(
        BenchmarkId::new("geglu_fwd_bf16", format!("{t}x{f}")),
        |b| {
            b.iter_custom(|iters| {
                timed(&dev, iters, || {
                    drop(swiglu::forward_cuda(&gate, &upt, swiglu::Act::GeluTanh).unwrap())
                })
            })
        },
    );
    // Backwards: read gate, up, dh; write dgate, dup over gate and up (the pair is threaded
    // through the iterations, as the step hands its buffers on).
    let dhg = bf16_tensor(&device, &[t, f], 10);
    let mut pair = Some((gate, upt));
    g.throughput(Throughput::Bytes((5 * t * f * 2) as u64));
    for (name, act) in [
        ("bwd_bf16", swiglu::Act::Silu),
        ("geglu_bwd_bf16", swiglu::Act::GeluTanh),
    ] {
        g.bench_function(BenchmarkId::new(name, format!("{t}x{f}")), |b| {
            b.iter_custom(|iters| {
                timed(&dev, iters, || {
                    let (gt, ut) = pair.take().unwrap();
                    pair = Some(swiglu::backward_cuda(gt, ut, &dhg, act).unwrap());
                })
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("cross_entropy");
    let (rows, vocab) = (256usize, 128_256usize);
    let logits0: Vec<f32> = (0..rows * vocab)
        .map(|i| ((i * 2_654_435_761usize) % 1000) as f32 / 100.0)
        .collect();
    let mut logits = Tensor::from_vec(logits0, &[rows, vocab], &device).unwrap();
    let targets: Vec<i64> = (0..rows as i64).map(|i| i * 97).collect();
    g.throughput(Throughput::Bytes((rows * vocab * 4 * 3) as u64));
    g.bench_function(
        BenchmarkId::new("chunk_f32", format!("{rows}x{vocab}")),
        |b| {
            b.iter_custom(|iters| {
                timed(&dev, iters, || {
                    drop(cross_entropy::chunk_cuda(&mut logits, &targets, 1.0, None).unwrap())
                })
            })
        },
    );
    // Gemma 2's final-logit soft-cap (c = 30): one tanh per logit more.
    g.bench_function(
        BenchmarkId::new("chunk_f32_softcap", format!("{rows}x{vocab}")),
        |b| {
            b.iter_custom(|iters| {
                timed(&dev, iters, || {
                    drop(cross_entropy::chunk_cuda(&mut logits, &targets, 1.0, Some(30.0)).unwrap())
                })
            })
        },
    );
    g.finish();

    // The fused, chunked lm_head + CE at 8192 tokens × 4096 × 128,256 (Llama-3-8B), beside the
    // bf16 GEMM alone for the same logits (the target: within 15% of it).
    let (tt, vv) = (8192usize, 128_256usize);
    let hh = bf16_tensor(&device, &[tt, d], 8);
    let ww = bf16_tensor(&device, &[vv, d], 9);
    let tg: Vec<i64> = (0..tt as i64).map(|i| (i * 7919) % vv as i64).collect();
    g_flops(c, "lm_head_ce", (2 * tt * vv * d) as u64, |name, bench| {
        bench.bench_function(BenchmarkId::new(name, format!("{tt}x{vv}x{d}")), |b| {
            b.iter_custom(|iters| {
                timed(&dev, iters, || {
                    drop(
                        cross_entropy::lm_head_ce_cuda(
                            &hh,
                            &ww,
                            &tg,
                            Some(1.0 / tt as f32),
                            cross_entropy::DEFAULT_CHUNK,
                            None,
                        )
                        .unwrap(),
                    )
                })
            })
        });
    });
    g_flops(c, "lm_head_ce", (2 * tt * vv * d) as u64, |name, bench| {
        let id = BenchmarkId::new(format!("{name}_softcap"), format!("{tt}x{vv}x{d}"));
        bench.bench_function(id, |b| {
            b.iter_custom(|iters| {
                timed(&dev, iters, || {
                    let g = Some(1.0 / tt as f32);
                    let chunk = cross_entropy::DEFAULT_CHUNK;
                    drop(
                        cross_entropy::lm_head_ce_cuda(&hh, &ww, &tg, g, chunk, Some(30.0))
                            .unwrap(),
                    )
                })
            })
        });
    });
    let mut logits = Tensor::zeros(&[tt, vv], DType::BF16, &device).unwrap();
    g_flops(c, "lm_head_ce", (2 * tt * vv * d) as u64, |_, bench| {
        bench.bench_function(
            BenchmarkId::new("logits_gemm_only", format!("{tt}x{vv}x{d}")),
            |b| {
                b.iter_custom(|iters| {
                    timed(&dev, iters, || {
                        gemm::gemm_cuda(Layout::Nt, &hh, &ww, &mut logits, 1.0, 0.0).unwrap()
                    })
                })
            },
        );
    });

    let mut g = c.benchmark_group("adamw");
    let n = 41_943_040usize; // Llama-3-8B, rank 16 on all seven projections
    let mut p = Tensor::from_vec(vec![0.01f32; n], &[n], &device).unwrap();
    let grads = Tensor::from_vec(vec![0.001f32; n], &[n], &device).unwrap();
    let Device::Cuda(o) = device else {
        unreachable!()
    };
    let mut opt = AdamWCuda::new(AdamWConfig::default(), n, o).unwrap();
    // norm reads g; the update reads p, g, m, v and writes p, m, v
    g.throughput(Throughput::Bytes((8 * n * 4) as u64));
    g.bench_function(BenchmarkId::new("step_f32", format!("{n}")), |b| {
        b.iter_custom(|iters| timed(&dev, iters, || opt.step(&mut p, &grads, 1e-4, 1.0).unwrap()))
    });
    g.finish();
}

/// A benchmark group measured in FLOPs (criterion's "elements").
fn g_flops(
    c: &mut Criterion,
    group: &str,
    flops: u64,
    f: impl FnOnce(&str, &mut criterion::BenchmarkGroup<criterion::measurement::WallTime>),
) {
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Elements(flops));
    f("fused_chunk256", &mut g);
    g.finish();
}

/// Llama-3-8B projection shapes (N = out, K = in).
const LLAMA3_8B: [(usize, usize); 4] = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)];
const MS: [usize; 5] = [1, 16, 512, 2048, 8192];

/// bf16 GEMM Y = X·Wᵀ (bf16 out) and the NF4 GEMM at the Llama-3-8B shapes. Throughput is in
/// "elements" = FLOPs (2·M·N·K), so criterion's elem/s reads as FLOP/s. Ceilings on an H100
/// (PEERS.md): cuBLAS bf16 ≈ 711 TFLOP/s at 2048×14336×4096; `mma.sync` runs at about half.
fn gemm(c: &mut Criterion) {
    let Some((device, dev)) = cuda("gemm/nf4_gemm/lora") else {
        return;
    };
    for (group_name, nf4) in [("gemm", false), ("nf4_gemm", true)] {
        let mut g = c.benchmark_group(group_name);
        for (n, k) in LLAMA3_8B {
            let w = bf16_tensor(&device, &[n, k], 11);
            let q = Nf4Tensor::quantize(&w, Nf4Config::default()).unwrap();
            for m in MS {
                let x = bf16_tensor(&device, &[m, k], 12);
                let mut y = Tensor::zeros(&[m, n], DType::BF16, &device).unwrap();
                g.throughput(Throughput::Elements((2 * m * n * k) as u64));
                g.bench_function(BenchmarkId::new("nt_bf16", format!("{m}x{n}x{k}")), |b| {
                    b.iter_custom(|iters| {
                        timed(&dev, iters, || {
                            if nf4 {
                                drop(gemm::nf4_forward_cuda(&x, &q, None).unwrap())
                            } else {
                                gemm::gemm_cuda(Layout::Nt, &x, &w, &mut y, 1.0, 0.0).unwrap()
                            }
                        })
                    })
                });
            }
        }
        g.finish();
    }
    cublas_reference(c, &dev);
    // The adapter path of one 4096→4096 layer, rank 16, 2048 tokens: forward, then backward.
    let mut g = c.benchmark_group("lora");
    let (t, i, o, r) = (2048usize, 4096usize, 4096usize, 16usize);
    let w = bf16_tensor(&device, &[o, i], 13);
    let q = Nf4Tensor::quantize(&w, Nf4Config::default()).unwrap();
    let (x, a, bm, dy) = (
        bf16_tensor(&device, &[t, i], 14),
        bf16_tensor(&device, &[r, i], 15),
        bf16_tensor(&device, &[o, r], 16),
        bf16_tensor(&device, &[t, o], 17),
    );
    let lora = LoraCuda {
        a: &a,
        b: &bm,
        scale: 2.0,
    };
    let (_, xa) = gemm::lora_forward_cuda(&x, &q, &lora).unwrap();
    let mut ga = Tensor::zeros(&[r, i], DType::F32, &device).unwrap();
    let mut gb = Tensor::zeros(&[o, r], DType::F32, &device).unwrap();
    let fwd_flops = 2 * t * o * i + 2 * t * r * (i + o);
    g.throughput(Throughput::Elements(fwd_flops as u64));
    g.bench_function(BenchmarkId::new("fwd", format!("{t}x{o}x{i}_r{r}")), |b| {
        b.iter_custom(|iters| {
            timed(&dev, iters, || {
                drop(gemm::lora_forward_cuda(&x, &q, &lora).unwrap())
            })
        })
    });
    g.throughput(Throughput::Elements(
        (2 * t * o * i + 8 * t * r * (i + o)) as u64,
    ));
    g.bench_function(BenchmarkId::new("bwd", format!("{t}x{o}x{i}_r{r}")), |b| {
        b.iter_custom(|iters| {
            timed(&dev, iters, || {
                drop(gemm::lora_backward_cuda(&x, &q, &lora, &xa, &dy, &mut ga, &mut gb).unwrap())
            })
        })
    });
    g.finish();
}

/// The projections of one input as one launch against one launch per weight, at Llama-3-8B's
/// q/k/v (4096 + 1024 + 1024 outputs of 4096, GQA) and gate/up (2 × 14336 of 4096): the forward
/// (`lora_forward_group` against `nf4_forward_cuda` per weight) and the input gradient
/// (`lora_backward_group` against `nf4_dx` plus β = 1 accumulations), without adapters, so the
/// NF4 GEMMs alone are compared. Throughput in FLOPs.
fn nf4_group(c: &mut Criterion) {
    let Some((device, dev)) = cuda("nf4_group") else {
        return;
    };
    let mut g = c.benchmark_group("nf4_group");
    let k = 4096usize;
    for (name, outs) in [
        ("qkv", &[4096usize, 1024, 1024][..]),
        ("gate_up", &[14336, 14336][..]),
    ] {
        let qs: Vec<Nf4Tensor> = outs
            .iter()
            .enumerate()
            .map(|(j, &n)| {
                let w = bf16_tensor(&device, &[n, k], 30 + j as u64);
                Nf4Tensor::quantize(&w, Nf4Config::default()).unwrap()
            })
            .collect();
        for m in [512usize, 2048, 8192] {
            let x = bf16_tensor(&device, &[m, k], 40);
            let dys: Vec<Tensor> = outs
                .iter()
                .enumerate()
                .map(|(j, &n)| bf16_tensor(&device, &[m, n], 50 + j as u64))
                .collect();
            let shape = format!(
                "{m}x{}x{k}",
                outs.iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join("+")
            );
            let flops: usize = outs.iter().map(|&n| 2 * m * n * k).sum();
            g.throughput(Throughput::Elements(flops as u64));
            let layers: Vec<_> = qs.iter().map(|q| (q, None)).collect();
            g.bench_function(
                BenchmarkId::new(format!("{name}_fwd_grouped"), &shape),
                |b| {
                    b.iter_custom(|iters| {
                        timed(&dev, iters, || {
                            // SAFETY: no adapter views.
                            drop(unsafe { gemm::lora_forward_group(&x, &layers) }.unwrap())
                        })
                    })
                },
            );
            g.bench_function(
                BenchmarkId::new(format!("{name}_fwd_separate"), &shape),
                |b| {
                    b.iter_custom(|iters| {
                        timed(&dev, iters, || {
                            for q in &qs {
                                drop(gemm::nf4_forward_cuda(&x, q, None).unwrap())
                            }
                        })
                    })
                },
            );
            let grads: Vec<gemm::GroupGrad> = qs
                .iter()
                .zip(&dys)
                .map(|(w, dy)| gemm::GroupGrad { w, lora: None, dy })
                .collect();
            g.bench_function(
                BenchmarkId::new(format!("{name}_dx_grouped"), &shape),
                |b| {
                    b.iter_custom(|iters| {
                        timed(&dev, iters, || {
                            let input = gemm::LayerInput::Kept(&x);
                            // SAFETY: no adapter views.
                            drop(unsafe { gemm::lora_backward_group(input, &grads) }.unwrap())
                        })
                    })
                },
            );
            g.bench_function(
                BenchmarkId::new(format!("{name}_dx_separate"), &shape),
                |b| {
                    b.iter_custom(|iters| {
                        timed(&dev, iters, || {
                            let mut dx = gemm::nf4_dx_cuda(&dys[0], &qs[0]).unwrap();
                            for (dy, q) in dys.iter().zip(&qs).skip(1) {
                                dx = gemm::nf4_dx_acc(dy, q, dx).unwrap();
                            }
                            drop(dx)
                        })
                    })
                },
            );
        }
    }
    g.finish();
}

/// cuBLAS bf16 GEMM (fp32 accumulate) at the same shapes as `gemm/nt_bf16`: the ceiling our
/// `mma.sync` kernels are measured against, in the same process on the same card. Row-major
/// Y[m,n] = X[m,k]·W[n,k]ᵀ is column-major Yᵀ = op(W)·X with op = transpose, so cuBLAS gets
/// (transa, transb) = (T, N), (m, n, k) = (n, m, k), lda = ldb = k, ldc = n. cuBLAS is loaded at
/// run time; where libcublas is not on the loader path the group prints SKIPPED and says so.
fn cublas_reference(c: &mut Criterion, dev: &Arc<CudaDevice>) {
    use cudarc::cublas::{sys::cublasOperation_t as Op, CudaBlas, Gemm, GemmConfig};
    // SAFETY: only probes whether the shared library can be opened.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        preload_pip_cublas();
    }
    // SAFETY: as above.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        eprintln!(
            "SKIPPED bench group cublas: libcublas not found on the loader path (on a host with \
             PyTorch: export LD_LIBRARY_PATH=\"$(python3 -c 'import nvidia.cublas as m; \
             print(m.__path__[0])')/lib\")"
        );
        return;
    }
    let blas = CudaBlas::new(dev.stream().clone()).expect("cuBLAS handle");
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    let mut upload = |len: usize| {
        let host: Vec<bf16> = (0..len)
            .map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0)))
            .collect();
        dev.stream().clone_htod(&host).unwrap()
    };
    let mut g = c.benchmark_group("cublas");
    for (n, k) in LLAMA3_8B {
        let w = upload(n * k);
        for m in MS {
            let x = upload(m * k);
            let mut y = dev.stream().alloc_zeros::<bf16>(m * n).unwrap();
            let cfg = GemmConfig {
                transa: Op::CUBLAS_OP_T,
                transb: Op::CUBLAS_OP_N,
                m: n as i32,
                n: m as i32,
                k: k as i32,
                alpha: bf16::ONE,
                lda: k as i32,
                ldb: k as i32,
                beta: bf16::ZERO,
                ldc: n as i32,
            };
            g.throughput(Throughput::Elements((2 * m * n * k) as u64));
            g.bench_function(BenchmarkId::new("nt_bf16", format!("{m}x{n}x{k}")), |b| {
                b.iter_custom(|iters| {
                    timed(dev, iters, || {
                        // SAFETY: the buffers hold m·k, n·k and m·n elements, matching cfg.
                        unsafe { blas.gemm(cfg, &w, &x, &mut y) }.unwrap()
                    })
                })
            });
        }
    }
    g.finish();
}

/// PyTorch hosts carry cuBLAS in the `nvidia-cublas` wheel, off the loader path. Opening it once
/// by absolute path makes the later open by soname (cudarc's) find the loaded copy.
fn preload_pip_cublas() {
    let Ok(out) = std::process::Command::new("python3")
        .args(["-c", "import nvidia.cublas as m; print(m.__path__[0])"])
        .output()
    else {
        return;
    };
    let dir = std::path::PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("lib");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return;
    };
    let mut libs: Vec<_> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libcublas") && n.contains(".so"))
        })
        .collect();
    // libcublasLt first: libcublas needs it.
    libs.sort_by_key(|p| !p.to_string_lossy().contains("cublasLt"));
    for lib in libs {
        // SAFETY: loading NVIDIA's cuBLAS runs only its ordinary initialisers.
        if let Ok(handle) = unsafe { libloading::Library::new(&lib) } {
            std::mem::forget(handle);
        }
    }
}

/// Flash attention, causal: fwd FLOPs 2·B·H·S²·D (the convention of the FlashAttention papers),
/// fwd+bwd 3.5× that. Ceilings on an H100 (PEERS.md): PyTorch SDPA fwd/fwd+bwd 244/213 TFLOP/s
/// at (1,32,2048,128); FlashAttention-2 published fwd+bwd 265 at 2k, 308 at 8k.
/// One Gemma 2 case (soft cap 50, window 1024 of 8192 tokens) is counted with the same causal
/// FLOPs, so its figure shows what the skipped tiles save (it needs about a quarter of the
/// causal products). Head dims 96 (Phi-3.5-mini: 32 heads, no GQA) and 256 (Gemma 2 2B: 8 heads
/// on 4, plain and with its soft cap 50 and window 4096 on 8192 tokens) beside 64 and 128.
fn attention(c: &mut Criterion) {
    let Some((device, dev)) = cuda("attention") else {
        return;
    };
    let mut g = c.benchmark_group("attention");
    for (b, h, kv, s, d, window) in [
        (1usize, 32usize, 8usize, 2048usize, 128usize, None),
        (1, 32, 8, 8192, 128, None),
        (4, 32, 8, 2048, 128, None),
        (1, 9, 3, 2048, 64, None),
        (1, 32, 8, 8192, 128, Some(1024usize)),
        (1, 32, 32, 2048, 96, None),
        (1, 8, 4, 2048, 256, None),
        (1, 8, 4, 8192, 256, Some(4096)),
    ] {
        let t = b * s;
        let mut dims = attention::Dims::new(h, kv, d);
        if window.is_some() {
            dims = dims.with_softcap(Some(50.0)).with_window(window);
        }
        let cu: Vec<usize> = (0..=b).map(|i| i * s).collect();
        let q = bf16_tensor(&device, &[t, h, d], 21);
        let k = bf16_tensor(&device, &[t, kv, d], 22);
        let v = bf16_tensor(&device, &[t, kv, d], 23);
        let dout = bf16_tensor(&device, &[t, h, d], 24);
        let flops = 2 * b * h * s * s * d;
        let label = match window {
            Some(w) => format!("b{b}_h{h}_s{s}_d{d}_softcap50_window{w}"),
            None => format!("b{b}_h{h}_s{s}_d{d}"),
        };
        g.throughput(Throughput::Elements(flops as u64));
        g.bench_function(BenchmarkId::new("fwd", &label), |bn| {
            bn.iter_custom(|iters| {
                timed(&dev, iters, || {
                    drop(attention::forward_cuda(dims, &q, &k, &v, &cu).unwrap())
                })
            })
        });
        g.throughput(Throughput::Elements((flops as f64 * 3.5) as u64));
        g.bench_function(BenchmarkId::new("fwd_bwd", &label), |bn| {
            bn.iter_custom(|iters| {
                timed(&dev, iters, || {
                    let (o, lse) = attention::forward_cuda(dims, &q, &k, &v, &cu).unwrap();
                    drop(attention::backward_cuda(dims, &q, &k, &v, &o, &lse, &dout, &cu).unwrap())
                })
            })
        });
    }
    g.finish();
}

criterion_group!(benches, copy, nf4, step_kernels, gemm, nf4_group, attention);
criterion_main!(benches);
