//! Embedding qlora-rs in your own training loop: load a model with its base quantized to NF4,
//! attach LoRA adapters to chosen layers and projections, run forward, backward and an AdamW
//! step yourself, and save a PEFT adapter.
//!
//!     cargo run --release --example custom_loop -- MODEL_DIR [OUTPUT_DIR]
//!
//! Without arguments it uses the tiny test model of this repository.

use std::path::PathBuf;

use qlora_rs::data::tokenizer::TextTokenizer;
use qlora_rs::io::adapters;
use qlora_rs::model::llama::{BaseFormat, Llama};
use qlora_rs::model::lora::{LoraConfig, LoraParams, Target};
use qlora_rs::ops::cross_entropy::IGNORE_INDEX;
use qlora_rs::quant::nf4::Nf4Config;
use qlora_rs::train::optimizer::{clip_grad_norm, AdamW, AdamWConfig};

fn main() -> qlora_rs::Result<()> {
    let mut args = std::env::args().skip(1);
    let model_dir = args.next().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/tiny-llama")
    });
    let out = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("qlora-rs-custom-loop"));

    // 1. The base model, quantized to NF4 as it loads, and its tokenizer.
    let model = Llama::load(&model_dir, BaseFormat::Nf4(Nf4Config::default()))?;
    let tokenizer = TextTokenizer::load(&model_dir)?;

    // 2. Adapters on q and v of the last layer only (rank 8, alpha 16).
    let lora_cfg = LoraConfig {
        rank: 8,
        alpha: 16.0,
        rslora: false,
        dropout: 0.0,
        targets: vec![Target::Q, Target::V],
    };
    let last = model.config.num_layers - 1;
    let mut lora = LoraParams::init_on_layers(&model.config, lora_cfg, &[last], 0)?;
    let mut opt = AdamW::new(AdamWConfig::default(), lora.len());
    let mut grads = vec![0.0f32; lora.len()];

    // 3. Two sequences packed into one batch; train on the second half of each.
    let texts = [
        "The quick brown fox jumps over the lazy dog.",
        "Rust makes systems programming fun.",
    ];
    let (mut ids, mut labels, mut cu) = (Vec::new(), Vec::new(), vec![0usize]);
    for t in texts {
        let (tok, _) = tokenizer.encode(t, true)?;
        let half = tok.len() / 2;
        labels.extend(
            tok.iter()
                .enumerate()
                .map(|(i, &id)| if i < half { IGNORE_INDEX } else { id as i64 }),
        );
        ids.extend(tok);
        cu.push(ids.len());
    }

    // 4. Your loop: zero the gradients, forward + backward, clip, step.
    for step in 0..20 {
        grads.fill(0.0);
        let counted = labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count();
        let loss = model.forward_backward(
            &lora,
            &mut grads,
            &ids,
            &labels,
            &cu,
            1.0 / counted as f32,
            step,
        )?;
        let norm = clip_grad_norm(&mut grads, 1.0);
        opt.step(&mut lora.values, &grads, 5e-3)?;
        if step % 5 == 0 {
            println!(
                "step {step:2}: loss {:.4}, grad norm {norm:.3}",
                loss.loss_sum / loss.count as f64
            );
        }
    }

    // 5. A PEFT adapter (adapter_model.safetensors + adapter_config.json).
    adapters::save(&out, &lora, Some(&model_dir.display().to_string()))?;
    println!("adapter saved to {}", out.display());
    Ok(())
}
