//! The CPU backend's f32 GEMM (`ops::matmul::gemm`, over `matrixmultiply` and the CPU's cores)
//! on the products of one SmolLM2-135M training step at 512 tokens, against the machine's peak:
//!
//!     cargo run --release --example cpu_gemm -- [PEAK_GFLOPS]
//!
//! The peak defaults to the cores × clock × 64 f32 FLOPs a cycle (two AVX-512 FMA units of 16
//! lanes) with the clock from /proc/cpuinfo's "cpu MHz"; give another as the argument (e.g. half
//! of it for a CPU with one AVX-512 FMA unit, or with AVX2 only).

use std::time::Instant;

use qlora_rs::ops::matmul::{cpu_threads, gemm, Mat};

fn clock_ghz() -> Option<f64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("cpu MHz"))?;
    let mhz: f64 = line.split(':').nth(1)?.trim().parse().ok()?;
    Some(mhz / 1000.0)
}

fn main() {
    let threads = cpu_threads();
    let peak = std::env::args()
        .nth(1)
        .and_then(|a| a.parse::<f64>().ok())
        .unwrap_or_else(|| threads as f64 * clock_ghz().unwrap_or(2.0) * 64.0);
    // (name, m, k, n, transposed B): the linear layers' forward `X·Wᵀ` and input gradient
    // `dY·W`, attention's `P·V`, and one lm_head chunk of the CPU's cross-entropy.
    let t = 512;
    let shapes: &[(&str, usize, usize, usize, bool)] = &[
        ("q/o forward   X·Wᵀ", t, 576, 576, true),
        ("k/v forward   X·Wᵀ", t, 576, 192, true),
        ("gate/up fwd   X·Wᵀ", t, 576, 1536, true),
        ("down forward  X·Wᵀ", t, 1536, 576, true),
        ("gate/up dx    dY·W", t, 1536, 576, false),
        ("down dx       dY·W", t, 576, 1536, false),
        ("attention     P·V ", t, t, 64, false),
        ("lm_head chunk h·Wᵀ", 320, 576, 49152, true),
    ];
    println!("f32 GEMM on {threads} threads; peak assumed {peak:.0} GFLOP/s");
    let (mut flops, mut secs) = (0.0, 0.0);
    for &(name, m, k, n, bt) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| ((i % 7) as f32 - 3.0) * 0.01).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i % 5) as f32 - 2.0) * 0.01).collect();
        let mut c = vec![0.0f32; m * n];
        let bm = if bt {
            Mat::new(&b, n, k).t()
        } else {
            Mat::new(&b, k, n)
        };
        gemm(Mat::new(&a, m, k), bm, &mut c, 1.0, 0.0);
        let reps = (2e9 / (2.0 * (m * k * n) as f64)).ceil().max(1.0) as usize;
        let started = Instant::now();
        for _ in 0..reps {
            gemm(Mat::new(&a, m, k), bm, &mut c, 1.0, 0.0);
        }
        let s = started.elapsed().as_secs_f64();
        let f = 2.0 * (m * k * n * reps) as f64;
        flops += f;
        secs += s;
        let g = f / s / 1e9;
        println!(
            "  {name}  {m:>4}×{k:>5}×{n:>5}  {g:6.1} GFLOP/s  {:4.1}% of peak",
            100.0 * g / peak
        );
    }
    let g = flops / secs / 1e9;
    println!(
        "  all                                   {g:6.1} GFLOP/s  {:4.1}% of peak",
        100.0 * g / peak
    );
}
