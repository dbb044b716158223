//! The Llama decoder (Llama, Mistral, Qwen2) on the CPU backend: loading from a Hugging Face
//! folder, the forward, and the training forward/backward with per-layer checkpointing.
//!
//! ```text
//! h = E[ids]                                                   [T, d]
//! per layer:  n = rmsnorm(h);  q, k, v = n·W{q,k,v}ᵀ (+ b) + LoRA;  q, k = rope(q), rope(k)
//!             h = h + attention(q, k, v)·Woᵀ + LoRA
//!             n = rmsnorm(h);  h = h + (silu(n·Wgᵀ) ⊙ n·Wuᵀ)·Wdᵀ (+ LoRA on each)
//! logits = rmsnorm(h)·Eᵀ (tied) or ·W_lmᵀ                        [T, V]
//! ```
//! Training keeps only each layer's input; the backward replays one layer at a time on a fresh
//! [`Tape`] and walks it, so activation memory is layers × T × d plus one layer's values.

use std::borrow::Cow;
use std::path::Path;

use super::config::LlamaConfig;
use super::lora::{LoraParams, Target};
use crate::autograd::{Batch, Dropout, Frozen, NormId, Tape};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::io::safetensors::Checkpoint;
use crate::ops::{cross_entropy, embedding, rope};
use crate::quant::bnb;
use crate::quant::nf4::{Nf4Config, Nf4Tensor};
use crate::tensor::{DType, Tensor};

/// A frozen projection weight `[out, in]`. (Seven per layer: the variants' size difference does
/// not matter.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum BaseWeight {
    /// Full precision (for LoRA without quantization, and as the reference of QLoRA).
    Dense(Vec<f32>),
    /// 4-bit NF4, dequantized on use.
    Nf4(Nf4Tensor),
}

impl BaseWeight {
    /// The weight in f32.
    pub fn to_f32(&self) -> Result<Cow<'_, [f32]>> {
        match self {
            BaseWeight::Dense(w) => Ok(Cow::Borrowed(w)),
            BaseWeight::Nf4(q) => Ok(Cow::Owned(q.dequantize(DType::F32)?.to_vec::<f32>()?)),
        }
    }
}

/// How to hold the projection weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseFormat {
    Dense,
    Nf4(Nf4Config),
}

#[derive(Debug)]
struct Projection {
    weight: BaseWeight,
    bias: Option<Vec<f32>>,
}

#[derive(Debug)]
struct DecoderLayer {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    /// In [`Target::ALL`] order.
    proj: Vec<Projection>,
}

/// A loaded model.
#[derive(Debug)]
pub struct Llama {
    pub config: LlamaConfig,
    embed: Vec<f32>,
    layers: Vec<DecoderLayer>,
    norm: Vec<f32>,
    lm_head: Option<Vec<f32>>,
    freqs: Vec<f32>,
    /// What loading left aside and why (checkpoint tensors the config makes redundant), for the
    /// command line to print as warnings.
    pub load_warnings: Vec<String>,
}

/// Loss of one micro-batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepLoss {
    /// Sum of the token losses.
    pub loss_sum: f64,
    /// Tokens counted (labels ≠ −100 after the shift).
    pub count: usize,
}

fn layer_key(l: usize, rest: &str) -> String {
    format!("model.layers.{l}.{rest}")
}

impl Llama {
    /// Loads `dir` (config.json + safetensors). Projections become NF4 as they load (or stay
    /// dense); a pre-quantized bitsandbytes checkpoint loads without re-quantizing (and is
    /// dequantized for `BaseFormat::Dense`). The config is validated before any weight is read.
    pub fn load(dir: &Path, format: BaseFormat) -> Result<Llama> {
        check_model_dir(dir)?;
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open_dir(dir)?;
        Llama::from_checkpoint(config, &ckpt, format)
    }

    /// A model of configuration `config` with random weights (uniform with the spread of
    /// N(0, 0.02²), norms 1), projections quantized like a loaded model: for benchmarks and
    /// memory plans without a download.
    pub fn random(config: LlamaConfig, format: BaseFormat, seed: u64) -> Result<Llama> {
        use rand::{Rng, SeedableRng};
        let c = &config;
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        // U(-a, a) with a = 0.02·√3 has the standard deviation 0.02.
        let a = 0.02f32 * 3f32.sqrt();
        let mut random =
            |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-a..a)).collect() };
        let d = c.hidden_size;
        let embed = random(c.vocab_size * d);
        let mut layers = Vec::with_capacity(c.num_layers);
        for _ in 0..c.num_layers {
            let mut proj = Vec::with_capacity(7);
            for t in Target::ALL {
                let (i, o) = t.dims(c);
                let w = random(o * i);
                let weight = match format {
                    BaseFormat::Dense => BaseWeight::Dense(w),
                    BaseFormat::Nf4(cfg) => {
                        let t = Tensor::from_vec(w, &[o, i], &Device::Cpu)?;
                        BaseWeight::Nf4(Nf4Tensor::quantize(&t, cfg)?)
                    }
                };
                let bias = match t {
                    Target::Q | Target::K | Target::V if c.qkv_bias => Some(random(o)),
                    Target::O if c.o_bias => Some(random(o)),
                    _ => None,
                };
                proj.push(Projection { weight, bias });
            }
            layers.push(DecoderLayer {
                input_norm: vec![1.0; d],
                post_norm: vec![1.0; d],
                proj,
            });
        }
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(random(c.vocab_size * d))
        };
        let freqs = rope::inv_freq(c.head_dim, c.rope_theta, c.rope_scaling);
        Ok(Llama {
            norm: vec![1.0; d],
            config,
            embed,
            layers,
            lm_head,
            freqs,
            load_warnings: Vec::new(),
        })
    }

    /// Builds the model from an open checkpoint, one tensor at a time.
    pub fn from_checkpoint(
        config: LlamaConfig,
        ckpt: &Checkpoint,
        format: BaseFormat,
    ) -> Result<Llama> {
        let c = &config;
        let d = c.hidden_size;
        let prequantized = bnb::is_bnb_4bit(c.quantization_config.as_ref())?;
        let embed = ckpt.f32("model.embed_tokens.weight", &[c.vocab_size, d])?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let mut proj = Vec::with_capacity(7);
            for t in Target::ALL {
                let (i, o) = t.dims(c);
                let prefix = layer_key(l, t.hf_path());
                let weight = if prequantized {
                    let q = bnb::load_nf4(ckpt, &prefix, &[o, i])?;
                    match format {
                        BaseFormat::Nf4(_) => BaseWeight::Nf4(q),
                        BaseFormat::Dense => BaseWeight::Dense(q.dequantize(DType::F32)?.to_vec()?),
                    }
                } else {
                    let w = ckpt.f32(&format!("{prefix}.weight"), &[o, i])?;
                    match format {
                        BaseFormat::Dense => BaseWeight::Dense(w),
                        BaseFormat::Nf4(cfg) => {
                            let t = Tensor::from_vec(w, &[o, i], &Device::Cpu)?;
                            BaseWeight::Nf4(Nf4Tensor::quantize(&t, cfg)?)
                        }
                    }
                };
                let has_bias = match t {
                    Target::Q | Target::K | Target::V => c.qkv_bias,
                    Target::O => c.o_bias,
                    _ => false,
                };
                let bias = if has_bias {
                    Some(ckpt.f32(&format!("{prefix}.bias"), &[o])?)
                } else {
                    None
                };
                proj.push(Projection { weight, bias });
            }
            layers.push(DecoderLayer {
                input_norm: ckpt.f32(&layer_key(l, "input_layernorm.weight"), &[d])?,
                post_norm: ckpt.f32(&layer_key(l, "post_attention_layernorm.weight"), &[d])?,
                proj,
            });
        }
        let norm = ckpt.f32("model.norm.weight", &[d])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(ckpt.f32("lm_head.weight", &[c.vocab_size, d])?)
        };
        let freqs = rope::inv_freq(c.head_dim, c.rope_theta, c.rope_scaling);
        // Every tensor of the checkpoint must be one the config uses: a 1-layer config on a
        // 2-layer checkpoint would otherwise train a truncated model without a word.
        let mut load_warnings = Vec::new();
        let mut unused = Vec::new();
        for name in ckpt.unused() {
            if name == "lm_head.weight" && c.tie_word_embeddings {
                load_warnings.push(
                    "the checkpoint's `lm_head.weight` is not used: config.json has \
                     tie_word_embeddings: true, so the output layer is the input embedding (as \
                     transformers loads it)"
                        .to_string(),
                );
            } else if name.ends_with(".rotary_emb.inv_freq") {
                // Derived data some older checkpoints carry; computed from the config instead.
            } else {
                unused.push(name);
            }
        }
        if !unused.is_empty() {
            let shown: Vec<String> = unused.iter().take(6).map(|n| format!("`{n}`")).collect();
            return Err(Error::InvalidArgument(format!(
                "the checkpoint holds {} tensor(s) that config.json does not use \
                 (num_hidden_layers {}, tie_word_embeddings {}): {}{} — the config and the \
                 weights disagree",
                unused.len(),
                c.num_layers,
                c.tie_word_embeddings,
                shown.join(", "),
                if unused.len() > 6 { ", …" } else { "" }
            )));
        }
        Ok(Llama {
            config,
            embed,
            layers,
            norm,
            lm_head,
            freqs,
            load_warnings,
        })
    }

    /// The untied output embedding `[V, d]`, if any.
    pub(crate) fn lm_head(&self) -> Option<&[f32]> {
        self.lm_head.as_deref()
    }

    /// The input embedding `[V, d]`.
    pub(crate) fn embedding(&self) -> &[f32] {
        &self.embed
    }

    /// RoPE frequencies (`head_dim / 2`).
    pub(crate) fn rope_freqs(&self) -> &[f32] {
        &self.freqs
    }

    /// The output embedding `[V, d]` (the input embedding when tied).
    pub fn output_embedding(&self) -> &[f32] {
        self.lm_head.as_deref().unwrap_or(&self.embed)
    }

    /// A projection's frozen base weight.
    pub fn base(&self, layer: usize, target: Target) -> &BaseWeight {
        &self.layers[layer].proj[target as usize].weight
    }

    fn check_lora(&self, lora: Option<&LoraParams>) -> Result<()> {
        if let Some(l) = lora {
            for s in &l.slots {
                let (i, o) = s.target.dims(&self.config);
                if s.layer >= self.config.num_layers || s.in_features != i || s.out_features != o {
                    return Err(Error::InvalidArgument(format!(
                        "LoRA adapter for layer {} {} is {}→{}, the model has {} layers and {}→{}",
                        s.layer,
                        s.target.module(),
                        s.in_features,
                        s.out_features,
                        self.config.num_layers,
                        i,
                        o
                    )));
                }
            }
        }
        Ok(())
    }

    /// One decoder layer on `tape`, from `x`.
    fn layer(
        &self,
        tape: &mut Tape,
        l: usize,
        x: crate::autograd::Var,
    ) -> Result<crate::autograd::Var> {
        let c = &self.config;
        let n1 = tape.rmsnorm(x, NormId::Input(l))?;
        let q = tape.linear(n1, l, Target::Q)?;
        let k = tape.linear(n1, l, Target::K)?;
        let v = tape.linear(n1, l, Target::V)?;
        let q = tape.rope(q, c.num_heads)?;
        let k = tape.rope(k, c.num_kv_heads)?;
        let o = tape.attention(q, k, v)?;
        let a = tape.linear(o, l, Target::O)?;
        let h1 = tape.add(x, a)?;
        let n2 = tape.rmsnorm(h1, NormId::PostAttention(l))?;
        let g = tape.linear(n2, l, Target::Gate)?;
        let u = tape.linear(n2, l, Target::Up)?;
        let s = tape.swiglu(g, u)?;
        let dn = tape.linear(s, l, Target::Down)?;
        tape.add(h1, dn)
    }

    /// Runs layer `l` without recording.
    fn layer_inference(
        &self,
        lora: Option<&LoraParams>,
        batch: &Batch,
        l: usize,
        h: Vec<f32>,
    ) -> Result<Vec<f32>> {
        let mut tape = Tape::new(self, lora, batch, &self.freqs, false, None);
        let x = tape.leaf(h, false);
        let y = self.layer(&mut tape, l, x)?;
        Ok(tape.take(y))
    }

    fn check_batch(&self, ids: &[u32], batch: &Batch) -> Result<()> {
        if ids.len() != batch.tokens() {
            return Err(Error::ShapeMismatch {
                op: "llama forward",
                expected: format!("{} token ids (cu_seqlens ends there)", batch.tokens()),
                got: format!("{} ids", ids.len()),
            });
        }
        if let Some(w) = self.config.sliding_window {
            if let Some(long) = batch
                .cu_seqlens
                .windows(2)
                .map(|p| p[1] - p[0])
                .find(|&len| len > w)
            {
                return Err(Error::InvalidArgument(format!(
                    "a sequence of {long} tokens is longer than the model's sliding window ({w}), \
                     which this attention does not implement: use --seq-len {w} or less"
                )));
            }
        }
        Ok(())
    }

    /// Final hidden states (after the last norm), `[T, d]`.
    pub fn hidden_states(
        &self,
        lora: Option<&LoraParams>,
        ids: &[u32],
        cu_seqlens: &[usize],
    ) -> Result<Vec<f32>> {
        self.check_lora(lora)?;
        let batch = Batch::new(cu_seqlens.to_vec())?;
        self.check_batch(ids, &batch)?;
        let mut h = embedding::forward(&self.embed, self.config.hidden_size, ids)?;
        for l in 0..self.config.num_layers {
            h = self.layer_inference(lora, &batch, l, h)?;
        }
        let (n, _) = crate::ops::rmsnorm::forward(
            &h,
            &self.norm,
            self.config.hidden_size,
            self.config.rms_norm_eps,
        )?;
        Ok(n)
    }

    /// Logits `[T, V]` of a packed batch.
    pub fn logits(
        &self,
        lora: Option<&LoraParams>,
        ids: &[u32],
        cu_seqlens: &[usize],
    ) -> Result<Vec<f32>> {
        let h = self.hidden_states(lora, ids, cu_seqlens)?;
        Ok(cross_entropy::logits(
            &h,
            self.output_embedding(),
            self.config.hidden_size,
        ))
    }

    /// Loss of a packed batch (labels unshifted, −100 = not counted; shifted per sequence).
    pub fn loss(
        &self,
        lora: Option<&LoraParams>,
        ids: &[u32],
        labels: &[i64],
        cu_seqlens: &[usize],
    ) -> Result<StepLoss> {
        let h = self.hidden_states(lora, ids, cu_seqlens)?;
        let targets = self.targets(labels, cu_seqlens)?;
        let out = cross_entropy::forward_backward(
            &h,
            self.output_embedding(),
            self.config.hidden_size,
            &targets,
            None,
            cross_entropy::DEFAULT_CHUNK,
        )?;
        Ok(StepLoss {
            loss_sum: out.loss_sum,
            count: out.count,
        })
    }

    fn targets(&self, labels: &[i64], cu_seqlens: &[usize]) -> Result<Vec<i64>> {
        if labels.len() != *cu_seqlens.last().unwrap_or(&0) {
            return Err(Error::ShapeMismatch {
                op: "llama loss",
                expected: format!("{} labels", cu_seqlens.last().unwrap_or(&0)),
                got: format!("{}", labels.len()),
            });
        }
        let targets = cross_entropy::shift_labels(labels, cu_seqlens);
        cross_entropy::check_targets(&targets, self.config.vocab_size)?;
        Ok(targets)
    }

    /// Forward and backward of one packed micro-batch: returns the loss and adds
    /// `grad_scale · d(loss_sum)/d(LoRA)` into `grads` (laid out like `lora.values`). The trainer
    /// passes `grad_scale = 1 / (counted tokens of the whole optimizer step)`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward(
        &self,
        lora: &LoraParams,
        grads: &mut [f32],
        ids: &[u32],
        labels: &[i64],
        cu_seqlens: &[usize],
        grad_scale: f32,
        dropout_seed: u64,
    ) -> Result<StepLoss> {
        self.check_lora(Some(lora))?;
        crate::ops::expect_len(
            "forward_backward",
            "gradient buffer",
            grads.len(),
            &[lora.len()],
        )?;
        let batch = Batch::new(cu_seqlens.to_vec())?;
        self.check_batch(ids, &batch)?;
        let targets = self.targets(labels, cu_seqlens)?;
        let dropout = Some(Dropout {
            p: lora.config.dropout,
            seed: dropout_seed,
        });
        let d = self.config.hidden_size;
        // Forward, keeping each layer's input (the checkpoints).
        let mut inputs = Vec::with_capacity(self.config.num_layers);
        let mut h = embedding::forward(&self.embed, d, ids)?;
        for l in 0..self.config.num_layers {
            inputs.push(h.clone());
            // Not recorded; the replay in the backward draws the same dropout masks.
            let mut tape = Tape::new(self, Some(lora), &batch, &self.freqs, false, dropout);
            let x = tape.leaf(h, false);
            let y = self.layer(&mut tape, l, x)?;
            h = tape.take(y);
        }
        // Final norm + fused lm_head/cross-entropy.
        let mut tape = Tape::new(self, Some(lora), &batch, &self.freqs, true, None);
        let x = tape.leaf(h, true);
        let n = tape.rmsnorm(x, NormId::Final)?;
        let ce = cross_entropy::forward_backward(
            tape.value(n),
            self.output_embedding(),
            d,
            &targets,
            Some(grad_scale),
            cross_entropy::DEFAULT_CHUNK,
        )?;
        let dn = ce.dh.expect("gradient requested");
        let mut dh = tape
            .backward(n, dn, x, grads)?
            .expect("the final norm input requires a gradient");
        // Backward, one replayed layer at a time.
        for l in (0..self.config.num_layers).rev() {
            let mut tape = Tape::new(self, Some(lora), &batch, &self.freqs, true, dropout);
            let x = tape.leaf(std::mem::take(&mut inputs[l]), l > 0);
            let y = self.layer(&mut tape, l, x)?;
            match tape.backward(y, dh, x, grads)? {
                Some(dx) => dh = dx,
                None => break,
            }
        }
        Ok(StepLoss {
            loss_sum: ce.loss_sum,
            count: ce.count,
        })
    }
}

impl Frozen for Llama {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn norm(&self, id: NormId) -> &[f32] {
        match id {
            NormId::Input(l) => &self.layers[l].input_norm,
            NormId::PostAttention(l) => &self.layers[l].post_norm,
            NormId::Final => &self.norm,
        }
    }

    fn base_weight(&self, layer: usize, target: Target) -> Result<Cow<'_, [f32]>> {
        self.base(layer, target).to_f32()
    }

    fn bias(&self, layer: usize, target: Target) -> Option<&[f32]> {
        self.layers[layer].proj[target as usize].bias.as_deref()
    }
}

/// `--model` must be a Hugging Face model folder; a file (a GGUF, a single safetensors) gets a
/// message that says what to give instead.
pub fn check_model_dir(dir: &Path) -> Result<()> {
    if dir.is_file() {
        let hint = match dir.extension().and_then(|e| e.to_str()) {
            Some("gguf") => "; convert a GGUF file first with `qlora-rs import-gguf`",
            _ => "",
        };
        return Err(Error::InvalidArgument(format!(
            "--model {} is a file: give the model's folder (config.json, *.safetensors, \
             tokenizer.json){hint}",
            dir.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora::LoraConfig;

    fn tiny() -> Llama {
        let dir = crate::testing::project_root().join("tests/fixtures/llama/tiny-llama");
        Llama::load(&dir, BaseFormat::Dense).unwrap()
    }

    #[test]
    fn tape_records_only_what_a_gradient_flows_through() {
        let model = tiny();
        let batch = Batch::new(vec![0, 5]).unwrap();
        let h = embedding::forward(&model.embed, 96, &[1, 2, 3, 4, 5]).unwrap();
        // No adapter and an input that needs no gradient: nothing to record.
        let mut tape = Tape::new(&model, None, &batch, &model.freqs, true, None);
        let x = tape.leaf(h.clone(), false);
        model.layer(&mut tape, 0, x).unwrap();
        assert_eq!(tape.records(), 0);
        // An adapter on v only: the first norm and q/k (and their RoPE) stay unrecorded.
        let cfg = LoraConfig {
            rank: 2,
            alpha: 4.0,
            rslora: false,
            dropout: 0.0,
            targets: vec![Target::V],
        };
        let lora = LoraParams::init(&model.config, cfg, 1).unwrap();
        let mut tape = Tape::new(&model, Some(&lora), &batch, &model.freqs, true, None);
        let x = tape.leaf(h, false);
        model.layer(&mut tape, 0, x).unwrap();
        // v, attention, o, add, norm, gate, up, swiglu, down, add
        assert_eq!(tape.records(), 10);
    }
}
