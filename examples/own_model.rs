//! A model of your own, not our Llama, built on the tape from the public ops and trained on the
//! CPU or a GPU with the same code: a two-block pre-norm transformer with NF4 projections and
//! LoRA on each, RMSNorm, RoPE, causal attention, SwiGLU and the fused lm_head + cross-entropy.
//! Its frozen weights are random; the adapters learn a next-token rule (t → 5t + 3 mod V) that
//! the random base does not know, and the loss falls.
//!
//!     cargo run --release --example own_model -- [--device cpu|cuda]
//!
//! The whole forward is recorded on one tape and walked back once (a model this small needs no
//! checkpointing; `model::llama` shows per-layer replay).

use half::bf16;
use rand::{Rng, SeedableRng};

use qlora_rs::autograd::{embed, BaseWeight, Batch, Linear, Tape, Var};
use qlora_rs::device::{self, Availability};
use qlora_rs::model::adapters::Adapters;
use qlora_rs::model::lora::{LoraConfig, LoraParams, Target};
use qlora_rs::ops::attention::Dims;
use qlora_rs::ops::rmsnorm::Norm;
use qlora_rs::ops::rope::{self, RopeScaling};
use qlora_rs::quant::nf4::{Nf4Config, Nf4Tensor};
use qlora_rs::train::optimizer::AdamWConfig;
use qlora_rs::{Device, DeviceRequest, Result, Tensor};

const D: usize = 128;
const HEADS: usize = 2;
const HEAD_DIM: usize = 64;
const FF: usize = 256;
const VOCAB: usize = 96;
const BLOCKS: usize = 2;
const EPS: f64 = 1e-5;

struct Block {
    norm1: Tensor,
    norm2: Tensor,
    /// q, k, v, o, gate, up, down, in [`Target::ALL`] order.
    proj: Vec<BaseWeight>,
}

struct OwnModel {
    device: Device,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    head: Tensor,
    freqs: Tensor,
}

/// Activations and frozen vectors are f32 on the CPU and bf16 on a GPU.
fn activation(v: Vec<f32>, shape: &[usize], device: Device) -> Result<Tensor> {
    match device {
        Device::Cpu => Tensor::from_vec(v, shape, &device),
        Device::Cuda(_) => Tensor::from_vec(
            v.into_iter().map(bf16::from_f32).collect::<Vec<_>>(),
            shape,
            &device,
        ),
    }
}

/// `[out, in]` of each projection.
fn dims(t: Target) -> (usize, usize) {
    match t {
        Target::Q | Target::K | Target::V | Target::O => (D, D),
        Target::Gate | Target::Up => (FF, D),
        Target::Down => (D, FF),
        // The fused forms (Phi-3's layout); this model uses the seven of `Target::ALL`.
        Target::Qkv => (3 * D, D),
        Target::GateUp => (2 * FF, D),
    }
}

impl OwnModel {
    fn random(device: Device, seed: u64) -> Result<OwnModel> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut draw = |n: usize, a: f32| (0..n).map(|_| rng.random_range(-a..a)).collect();
        let mut blocks = Vec::new();
        for _ in 0..BLOCKS {
            let mut proj = Vec::new();
            for t in Target::ALL {
                let (o, i) = dims(t);
                let w = activation(draw(o * i, 1.0 / (i as f32).sqrt()), &[o, i], device)?;
                // Quantized where the weight lives (on the GPU, by our NF4 kernel).
                proj.push(BaseWeight::Nf4(Nf4Tensor::quantize(
                    &w,
                    Nf4Config::default(),
                )?));
            }
            blocks.push(Block {
                norm1: activation(vec![1.0; D], &[D], device)?,
                norm2: activation(vec![1.0; D], &[D], device)?,
                proj,
            });
        }
        let freqs = rope::inv_freq(HEAD_DIM, 10_000.0, RopeScaling::None);
        Ok(OwnModel {
            device,
            embed: activation(draw(VOCAB * D, 1.0), &[VOCAB, D], device)?,
            head: activation(draw(VOCAB * D, 0.1), &[VOCAB, D], device)?,
            norm: activation(vec![1.0; D], &[D], device)?,
            freqs: Tensor::from_vec(freqs, &[HEAD_DIM / 2], &device)?,
            blocks,
        })
    }

    fn lin(&self, l: usize, t: Target) -> Linear<'_> {
        Linear {
            weight: &self.blocks[l].proj[t as usize],
            bias: None,
            layer: l,
            target: t,
        }
    }

    /// One block: `h + attn(norm(h))`, then `+ mlp(norm(·))`.
    fn block<'a>(&'a self, tape: &mut Tape<'a>, l: usize, h: &Var) -> Result<Var> {
        let b = &self.blocks[l];
        let n = tape.rmsnorm(h, &b.norm1, Norm::plain(EPS))?;
        let q = tape.linear(&n, self.lin(l, Target::Q))?;
        let k = tape.linear(&n, self.lin(l, Target::K))?;
        let v = tape.linear(&n, self.lin(l, Target::V))?;
        let q = tape.rope(q, HEADS, HEAD_DIM, &self.freqs, 1.0)?;
        let k = tape.rope(k, HEADS, HEAD_DIM, &self.freqs, 1.0)?;
        let dims = Dims::new(HEADS, HEADS, HEAD_DIM);
        let a = tape.attention(&q, &k, &v, dims)?;
        let h1 = tape.linear_residual(&a, self.lin(l, Target::O), h)?;
        let n2 = tape.rmsnorm(&h1, &b.norm2, Norm::plain(EPS))?;
        let g = tape.linear(&n2, self.lin(l, Target::Gate))?;
        let u = tape.linear(&n2, self.lin(l, Target::Up))?;
        let s = tape.swiglu(&g, &u)?;
        tape.linear_residual(&s, self.lin(l, Target::Down), &h1)
    }
}

fn main() -> Result<()> {
    let mut request = DeviceRequest::Cpu;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--device" {
            request = args.next().unwrap_or_default().parse()?;
        }
    }
    let selection = device::select(request, &Availability::probe())?;
    let device = selection.device;
    println!("device: {}", selection.reason);
    let model = OwnModel::random(device, 1)?;

    // LoRA rank 8 on every projection of both blocks.
    let lora_cfg = LoraConfig {
        rank: 8,
        alpha: 16.0,
        rslora: false,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
    };
    let projections: Vec<(usize, Target, usize, usize)> = (0..BLOCKS)
        .flat_map(|l| {
            Target::ALL.map(|t| {
                let (o, i) = dims(t);
                (l, t, i, o)
            })
        })
        .collect();
    let lora = LoraParams::init_for(lora_cfg, &projections, BLOCKS, 0)?;
    let mut adapters = Adapters::new(&lora, None, AdamWConfig::default(), device)?;

    // Four sequences of 48 tokens following t → 5t + 3 (mod V), packed into one batch.
    let (len, seqs) = (48usize, 4usize);
    let mut ids = Vec::new();
    for s in 0..seqs {
        let mut t = (s * 17 + 1) as u32 % VOCAB as u32;
        for _ in 0..len {
            ids.push(t);
            t = (5 * t + 3) % VOCAB as u32;
        }
    }
    let cu: Vec<usize> = (0..=seqs).map(|s| s * len).collect();
    let labels: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    let targets = qlora_rs::ops::cross_entropy::shift_labels(&labels, &cu);
    let counted = targets.iter().filter(|&&t| t >= 0).count();
    let batch = Batch::on(cu, device)?;

    let (mut first, mut last) = (None, f64::NAN);
    for step in 0..=60 {
        adapters.zero_grads()?;
        let mut tape = Tape::new(device, &batch, Some(&adapters), true, None)?;
        let x = tape.input(embed(&model.embed, &ids, None)?, false)?;
        let mut h = x.clone();
        for l in 0..BLOCKS {
            h = model.block(&mut tape, l, &h)?;
        }
        let n = tape.rmsnorm(&h, &model.norm, Norm::plain(EPS))?;
        let ce = tape.lm_head_ce(&n, &model.head, &targets, Some(1.0 / counted as f32), None)?;
        let loss = ce.losses.sum()? / ce.count as f64;
        let var = ce.var.expect("the adapters make the loss trainable");
        tape.backward(&var, None, &x)?;
        adapters.step(1e-2, 1.0)?;
        first.get_or_insert(loss);
        last = loss;
        if step % 10 == 0 {
            println!("step {step:2}: loss {loss:.4}");
        }
    }
    println!(
        "loss {:.4} → {last:.4} after 60 steps on {}",
        first.unwrap_or(f64::NAN),
        model.device
    );
    Ok(())
}
