//! One whole training step (forward, per-layer recomputation, backward, AdamW) at a small shape,
//! on the CPU backend: throughput in tokens. The CUDA step joins this group when it lands.
//!
//! Run: `cargo bench --bench step`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qlora_rs::model::config::LlamaConfig;
use qlora_rs::model::llama::{BaseFormat, Llama};
use qlora_rs::model::lora::{LoraConfig, LoraParams, Target};
use qlora_rs::model::shapes;
use qlora_rs::quant::nf4::Nf4Config;
use qlora_rs::train::optimizer::{AdamW, AdamWConfig};

/// SmolLM2's layer shape, 4 layers and a 4096-token vocabulary: small enough for a CPU bench.
fn small_shape() -> LlamaConfig {
    let mut c = shapes::by_name("smollm2-135m").unwrap();
    c.num_layers = 4;
    c.vocab_size = 4096;
    c
}

fn step(c: &mut Criterion) {
    let cfg = small_shape();
    let model = Llama::random(cfg.clone(), BaseFormat::Nf4(Nf4Config::default()), 0).unwrap();
    let lora_cfg = LoraConfig {
        rank: 16,
        alpha: 32.0,
        rslora: false,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
    };
    let mut lora = LoraParams::init(&cfg, lora_cfg, 0).unwrap();
    let mut opt = AdamW::new(AdamWConfig::default(), lora.len());
    let tokens = 256usize;
    let ids: Vec<u32> = (0..tokens as u32).map(|i| (i * 7919) % 4096).collect();
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let mut grads = vec![0.0f32; lora.len()];
    let mut g = c.benchmark_group("step");
    g.sample_size(10);
    g.throughput(Throughput::Elements(tokens as u64));
    g.bench_function("cpu_smollm2_4layers_256tok", |b| {
        b.iter(|| {
            grads.fill(0.0);
            model
                .forward_backward(
                    &lora,
                    &mut grads,
                    &ids,
                    &labels,
                    &[0, tokens],
                    1.0 / 255.0,
                    0,
                )
                .unwrap();
            opt.step(&mut lora.values, &grads, 1e-4).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, step);
criterion_main!(benches);
