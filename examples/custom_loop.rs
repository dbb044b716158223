//! Embedding qlora-rs in your own training loop: load a model with its base quantized to NF4 on
//! the device you choose, attach LoRA adapters to chosen layers and projections, run forward,
//! backward and an AdamW step yourself, and save a PEFT adapter. The same code runs on the CPU
//! and on a GPU.
//!
//!     cargo run --release --example custom_loop -- [--device cpu|cuda] [MODEL_DIR [OUTPUT_DIR]]
//!
//! Without a model folder it uses the tiny test model of this repository (whose head_dim 32 the
//! GPU's attention kernels do not take: give a real model folder with `--device cuda`).

use std::path::PathBuf;

use qlora_rs::data::tokenizer::TextTokenizer;
use qlora_rs::device::{self, Availability};
use qlora_rs::io::adapters;
use qlora_rs::model::adapters::Adapters;
use qlora_rs::model::llama::{BaseFormat, Llama};
use qlora_rs::model::lora::{LoraConfig, LoraParams, Target};
use qlora_rs::ops::cross_entropy::IGNORE_INDEX;
use qlora_rs::quant::nf4::Nf4Config;
use qlora_rs::train::optimizer::AdamWConfig;
use qlora_rs::DeviceRequest;

fn main() -> qlora_rs::Result<()> {
    let mut request = DeviceRequest::Cpu;
    let mut paths = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--device" => {
                let v = args.next().unwrap_or_default();
                request = v.parse()?;
            }
            _ => paths.push(PathBuf::from(a)),
        }
    }
    let mut paths = paths.into_iter();
    let model_dir = paths.next().unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/tiny-llama")
    });
    let out = paths
        .next()
        .unwrap_or_else(|| std::env::temp_dir().join("qlora-rs-custom-loop"));
    let selection = device::select(request, &Availability::probe())?;
    let device = selection.device;
    println!("device: {}", selection.reason);

    // 1. The base model, quantized to NF4 as it loads, on the device; and its tokenizer.
    let model = Llama::load_on(&model_dir, BaseFormat::Nf4(Nf4Config::default()), device)?;
    let tokenizer = TextTokenizer::load(&model_dir)?;

    // 2. Adapters on q and v of the last layer only (rank 8, alpha 16), with their gradients
    //    and AdamW state where the model lives.
    let lora_cfg = LoraConfig {
        rank: 8,
        alpha: 16.0,
        rslora: false,
        dropout: 0.0,
        targets: vec![Target::Q, Target::V],
    };
    let last = model.config.num_layers - 1;
    let lora = LoraParams::init_on_layers(&model.config, lora_cfg, &[last], 0)?;
    let mut adapters = Adapters::new(&lora, None, AdamWConfig::default(), device)?;

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
    let counted = qlora_rs::ops::cross_entropy::shift_labels(&labels, &cu)
        .iter()
        .filter(|&&l| l != IGNORE_INDEX)
        .count();

    // 4. Your loop: zero the gradients, forward + backward, clip and step.
    for step in 0..20 {
        adapters.zero_grads()?;
        let (loss, count) =
            model.train_micro_batch(&adapters, &ids, &labels, &cu, 1.0 / counted as f32, step)?;
        adapters.step(5e-3, 1.0)?;
        if step % 5 == 0 {
            // Reading the loss (and the norm) back synchronises a GPU: only on logged steps.
            println!(
                "step {step:2}: loss {:.4}, grad norm {:.3}",
                loss.sum()? / count as f64,
                adapters.grad_norm()?
            );
        }
    }

    // 5. A PEFT adapter (adapter_model.safetensors + adapter_config.json).
    adapters::save(
        &out,
        &adapters.to_host()?,
        Some(&model_dir.display().to_string()),
    )?;
    println!("adapter saved to {}", out.display());
    Ok(())
}
