//! Training pieces: AdamW against PyTorch (the golden `next_losses`), clipping, schedules.

use qlora_rs::io::adapters;
use qlora_rs::io::safetensors::Checkpoint;
use qlora_rs::model::llama::{BaseFormat, Llama};
use qlora_rs::train::optimizer::{clip_grad_norm, grad_norm, AdamW, AdamWConfig};
use qlora_rs::train::schedule::{Schedule, ScheduleKind};

use crate::common::llama_fixture as fixture;

fn ints(c: &Checkpoint, name: &str) -> Vec<i64> {
    c.get(name)
        .unwrap()
        .bytes
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[test]
fn adamw_steps_reproduce_pytorch_losses() {
    let model = Llama::load(&fixture("tiny-llama"), BaseFormat::Dense).unwrap();
    let mut lora = adapters::load(&fixture("tiny-llama-lora"), &model.config).unwrap();
    let golden = Checkpoint::open_files(&[fixture("tiny-llama-golden.safetensors")]).unwrap();
    let ids: Vec<u32> = ints(&golden, "input_ids")
        .iter()
        .map(|&v| v as u32)
        .collect();
    let labels = ints(&golden, "labels");
    let want = golden.get("next_losses").unwrap().to_f32().unwrap();
    let cu = [0, ids.len()];
    let mut opt = AdamW::new(AdamWConfig::default(), lora.len());
    for (step, &expected) in want.iter().enumerate() {
        let mut grads = vec![0.0f32; lora.len()];
        let count = 29.0;
        let loss = model
            .forward_backward(&lora, &mut grads, &ids, &labels, &cu, 1.0 / count, 0)
            .unwrap();
        let mean = loss.loss_sum / loss.count as f64;
        assert!(
            (mean - expected as f64).abs() <= 2e-4 * expected as f64,
            "step {step}: loss {mean} vs PyTorch {expected}"
        );
        opt.step(&mut lora.values, &grads, 1e-2).unwrap();
    }
    assert_eq!(opt.step, 4);
}

#[test]
fn adamw_matches_the_formula_with_weight_decay() {
    let cfg = AdamWConfig {
        beta1: 0.8,
        beta2: 0.99,
        eps: 1e-6,
        weight_decay: 0.1,
    };
    let mut opt = AdamW::new(cfg, 2);
    let mut p = vec![1.0f32, -2.0];
    let g1 = [0.5f32, -0.25];
    opt.step(&mut p, &g1, 0.1).unwrap();
    // Step 1: m = 0.2g, v = 0.01g², m̂ = g, v̂ = g²: θ·(1 − 0.01) − 0.1·g/(|g| + ε).
    let expect: Vec<f32> = [1.0f64, -2.0]
        .iter()
        .zip(&g1)
        .map(|(&t, &g)| (t * 0.99 - 0.1 * g as f64 / ((g as f64).abs() + 1e-6)) as f32)
        .collect();
    for (a, b) in p.iter().zip(&expect) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    assert!(opt.step(&mut p, &[1.0], 0.1).is_err());
}

#[test]
fn clipping_scales_to_the_max_norm() {
    let mut g = vec![3.0f32, 4.0];
    assert_eq!(grad_norm(&g), 5.0);
    let before = clip_grad_norm(&mut g, 1.0);
    assert_eq!(before, 5.0);
    assert!((grad_norm(&g) - 1.0).abs() < 1e-5);
    let mut small = vec![0.3f32, 0.4];
    clip_grad_norm(&mut small, 1.0);
    assert_eq!(small, vec![0.3, 0.4]);
}

#[test]
fn schedules_follow_transformers() {
    let s = |kind| Schedule {
        kind,
        lr: 1.0,
        warmup: 10,
        total: 110,
    };
    for kind in [
        ScheduleKind::Cosine,
        ScheduleKind::Linear,
        ScheduleKind::Constant,
    ] {
        assert_eq!(s(kind).lr(0), 0.0);
        assert!((s(kind).lr(5) - 0.5).abs() < 1e-12);
        assert!((s(kind).lr(10) - 1.0).abs() < 1e-12);
    }
    assert!((s(ScheduleKind::Cosine).lr(60) - 0.5).abs() < 1e-12);
    assert!((s(ScheduleKind::Linear).lr(60) - 0.5).abs() < 1e-12);
    assert!(s(ScheduleKind::Cosine).lr(110).abs() < 1e-12);
    assert_eq!(s(ScheduleKind::Linear).lr(200), 0.0);
    assert_eq!(s(ScheduleKind::Constant).lr(200), 1.0);
    assert!("triangle".parse::<ScheduleKind>().is_err());
}
