//! The one decoder (Llama, Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3), written once on the tape
//! ([`crate::autograd`]) for both devices: loading from a Hugging Face folder, moving to a GPU,
//! the forward, and the training forward/backward with per-layer checkpointing.
//!
//! ```text
//! h = E[ids] (· √d for Gemma)                                  [T, d]
//! per layer:  n = rmsnorm(h);  q, k, v = n·W{q,k,v}ᵀ (+ b) + LoRA
//!                 (Phi-3: [q | k | v] = n·W_qkvᵀ + LoRA, one GEMM, split by columns)
//!             q, k = headnorm(q), headnorm(k)                 (Qwen3, Gemma 3)
//!             q, k = rope(q), rope(k)                         (Gemma 3: local base on sliding layers;
//!                                                              Phi-3: first rotary_dim dims, longrope)
//!             a = attention(q, k, v)·Woᵀ + LoRA               (scale, soft-cap, window per layer)
//!             h = h + a               or  h = h + rmsnorm(a)  (Gemma's post-attention norm)
//!             n = rmsnorm(h);  m = (act(n·Wgᵀ) ⊙ n·Wuᵀ)·Wdᵀ   (+ LoRA on each; silu or tanh-GELU;
//!                                                              Phi-3: [g | u] = n·W_guᵀ, split)
//!             h = h + m               or  h = h + rmsnorm(m)  (Gemma's post-feedforward norm)
//! logits = rmsnorm(h)·Eᵀ (tied) or ·W_lmᵀ, then c·tanh(z/c) for Gemma 2          [T, V]
//! ```
//! Gemma's norms compute `x·rstd·(1 + w)` ([`rmsnorm::Norm`]); which switch each family turns on
//! is [`super::config::Switches`].
//! On the CPU the weights are f32 (projections f32 or NF4) and so are the activations: the
//! reference, checked against transformers + PEFT. On a GPU the projections are NF4, the rest of
//! the frozen weights and the activations bf16, and every op runs on our kernels.
//!
//! Training keeps only each layer's input; the backward replays one layer at a time on a fresh
//! replay [`Tape`] and walks it, so activation memory is layers × T × d plus one layer's values
//! (`model::memory` counts them).

use std::path::Path;

use half::bf16;

use super::adapters::Adapters;
use super::config::{Activation, LlamaConfig};
use super::lora::{LoraParams, Target};
pub use crate::autograd::BaseWeight;
use crate::autograd::{self, Batch, Dropout, KvCache, Linear, Losses, Tape, Var};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::io::safetensors::Checkpoint;
use crate::ops::{attention, cross_entropy, gemm, rmsnorm, rope, swiglu};
use crate::quant::bnb;
use crate::quant::nf4::{Nf4Config, Nf4Tensor};
use crate::tensor::{DType, Tensor};
use crate::train::optimizer::AdamWConfig;

/// How to hold the projection weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseFormat {
    /// The checkpoint's values in f32 (CPU only).
    Dense,
    /// 4-bit NF4 with this block size and double quantization.
    Nf4(Nf4Config),
}

#[derive(Debug)]
struct Projection {
    weight: BaseWeight,
    bias: Option<Tensor>,
}

#[derive(Debug)]
struct DecoderLayer {
    input_norm: Tensor,
    /// The norm before the MLP (`post_attention_layernorm`; Gemma: `pre_feedforward_layernorm`).
    post_norm: Tensor,
    /// Gemma's norms of the attention and MLP outputs before their residual adds
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`).
    branch_norms: Option<(Tensor, Tensor)>,
    /// Qwen3's per-head norms of q and k, `[head_dim]` each.
    qk_norm: Option<(Tensor, Tensor)>,
    /// In the order of [`LlamaConfig::targets`].
    proj: Vec<Projection>,
}

/// A loaded model, on one device.
#[derive(Debug)]
pub struct Llama {
    /// The model's configuration (from its config.json).
    pub config: LlamaConfig,
    device: Device,
    embed: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    /// RoPE inverse frequencies, f32 `[rotary_dim / 2]` (longrope: with the short factors).
    freqs: Tensor,
    /// Those of the sliding layers where they differ (Gemma 3's `rope_local_base_freq`).
    freqs_local: Option<Tensor>,
    /// Longrope's frequencies with the long factors, for the sequences longer than the
    /// pre-training length.
    freqs_long: Option<Tensor>,
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

fn hv(v: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// The norm weight that leaves its input unscaled: 1, or 0 where norms compute `(1 + w)`.
fn norm_identity(c: &LlamaConfig) -> f32 {
    if c.switches.norm_unit_offset {
        0.0
    } else {
        1.0
    }
}

/// The RoPE tables of a model.
struct RopeTables {
    global: Tensor,
    local: Option<Tensor>,
    long: Option<Tensor>,
}

/// The RoPE inverse frequencies f32 `[rotary_dim / 2]` on `dev`; the sliding layers' own where
/// the config gives them; longrope's short (as the global table) and long factors.
fn rope_tables(c: &LlamaConfig, dev: &Device) -> Result<RopeTables> {
    let rot = c.rotary_dim();
    let half = [rot / 2];
    let on = |f: Vec<f32>| Tensor::from_vec(f, &half, dev);
    let (global, long) = match &c.switches.longrope {
        Some(lr) => (
            rope::inv_freq_with_factors(rot, c.rope_theta, &lr.short_factor)?,
            Some(on(rope::inv_freq_with_factors(
                rot,
                c.rope_theta,
                &lr.long_factor,
            )?)?),
        ),
        None => (rope::inv_freq(rot, c.rope_theta, c.rope_scaling), None),
    };
    let local = c
        .switches
        .rope_local
        .map(|(theta, scaling)| rope::inv_freq(rot, theta, scaling));
    Ok(RopeTables {
        global: on(global)?,
        local: local.map(on).transpose()?,
        long,
    })
}

/// A host f32 tensor as bf16 on `dev`.
fn bf16_on(t: &Tensor, dev: &Device) -> Result<Tensor> {
    let v: Vec<bf16> = t
        .cpu_slice::<f32>("moving the model")?
        .iter()
        .map(|&x| bf16::from_f32(x))
        .collect();
    Tensor::from_vec(v, t.shape(), dev)
}

/// What the GPU path needs of a model, checked before anything is loaded or moved.
pub fn check_gpu_support(c: &LlamaConfig, format: BaseFormat) -> Result<()> {
    if !crate::ops::attention::CUDA_HEAD_DIMS.contains(&c.head_dim) {
        return Err(Error::InvalidArgument(format!(
            "the CUDA path needs head_dim 64, 96, 128 or 256 (the flash-attention kernels); this \
             model has {}: use --device cpu",
            c.head_dim
        )));
    }
    if format == BaseFormat::Dense {
        return Err(Error::InvalidArgument(
            "the CUDA path holds the base in NF4 (its GEMMs dequantize NF4); a dense base runs on \
             --device cpu"
                .into(),
        ));
    }
    Ok(())
}

impl Llama {
    /// Loads `dir` (config.json + safetensors) on the CPU. Projections become NF4 as they load
    /// (or stay dense); a pre-quantized bitsandbytes checkpoint loads without re-quantizing (and
    /// is dequantized for `BaseFormat::Dense`). The config is validated before any weight is read.
    pub fn load(dir: &Path, format: BaseFormat) -> Result<Llama> {
        check_model_dir(dir)?;
        let config = LlamaConfig::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open_model(dir, config.multimodal)?;
        Llama::from_checkpoint(config, &ckpt, format)
    }

    /// [`Llama::load`] onto `device` (on a GPU: checked for support first, then moved layer by
    /// layer, so the host never holds more than the CPU model).
    pub fn load_on(dir: &Path, format: BaseFormat, device: Device) -> Result<Llama> {
        if device != Device::Cpu {
            check_model_dir(dir)?;
            check_gpu_support(&LlamaConfig::from_file(&dir.join("config.json"))?, format)?;
        }
        Llama::load(dir, format)?.to_device(device)
    }

    /// The device the model lives on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// A model of configuration `config` with random weights on the CPU (uniform with the spread
    /// of N(0, 0.02²), norms 1), projections quantized like a loaded model: for benchmarks and
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
        let embed = hv(random(c.vocab_size * d), &[c.vocab_size, d])?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for _ in 0..c.num_layers {
            let mut proj = Vec::with_capacity(7);
            for &t in c.targets() {
                let (i, o) = t.dims(c);
                let w = hv(random(o * i), &[o, i])?;
                let weight = match format {
                    BaseFormat::Dense => BaseWeight::Dense(w),
                    BaseFormat::Nf4(cfg) => BaseWeight::Nf4(Nf4Tensor::quantize(&w, cfg)?),
                };
                let bias = if c.has_bias(t) {
                    Some(hv(random(o), &[o])?)
                } else {
                    None
                };
                proj.push(Projection { weight, bias });
            }
            let hd = c.head_dim;
            let unit = norm_identity(c);
            layers.push(DecoderLayer {
                input_norm: hv(vec![unit; d], &[d])?,
                post_norm: hv(vec![unit; d], &[d])?,
                branch_norms: if c.switches.sandwich_norms {
                    Some((hv(vec![unit; d], &[d])?, hv(vec![unit; d], &[d])?))
                } else {
                    None
                },
                qk_norm: if c.qk_norm() {
                    Some((hv(vec![unit; hd], &[hd])?, hv(vec![unit; hd], &[hd])?))
                } else {
                    None
                },
                proj,
            });
        }
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(hv(random(c.vocab_size * d), &[c.vocab_size, d])?)
        };
        let rt = rope_tables(c, &Device::Cpu)?;
        Ok(Llama {
            norm: hv(vec![norm_identity(c); d], &[d])?,
            device: Device::Cpu,
            config,
            embed,
            layers,
            lm_head,
            freqs: rt.global,
            freqs_local: rt.local,
            freqs_long: rt.long,
            load_warnings: Vec::new(),
        })
    }

    /// [`Llama::random`] on `device`. On a GPU the weights are drawn there (the same
    /// distribution; tensor `k` of the model from stream `seed ⊕ k·φ`, `ops::random`) and each
    /// projection is quantized to NF4 as it is drawn, so an 8B shape needs no host copy.
    pub fn random_on(
        config: LlamaConfig,
        format: BaseFormat,
        device: Device,
        seed: u64,
    ) -> Result<Llama> {
        let Device::Cuda(_) = device else {
            return Llama::random(config, format, seed);
        };
        use crate::ops::random::{uniform_cuda, PHI};
        check_gpu_support(&config, format)?;
        let nf4 = match format {
            BaseFormat::Nf4(cfg) => cfg,
            BaseFormat::Dense => unreachable!("refused by check_gpu_support"),
        };
        let c = config;
        let d = c.hidden_size;
        let a = 0.02f32 * 3f32.sqrt();
        let mut k = 0u64;
        let mut draw = |shape: &[usize]| {
            k += 1;
            uniform_cuda(shape, a, seed ^ k.wrapping_mul(PHI), &device)
        };
        let embed = draw(&[c.vocab_size, d])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(draw(&[c.vocab_size, d])?)
        };
        let unit = bf16::from_f32(norm_identity(&c));
        let ones = || Tensor::from_vec(vec![unit; d], &[d], &device);
        let mut layers = Vec::with_capacity(c.num_layers);
        for _ in 0..c.num_layers {
            let mut proj = Vec::with_capacity(7);
            for &t in c.targets() {
                let (i, o) = t.dims(&c);
                // One dense projection at a time exists in bf16, then only its NF4 form.
                let weight = BaseWeight::Nf4(Nf4Tensor::quantize(&draw(&[o, i])?, nf4)?);
                let bias = if c.has_bias(t) {
                    Some(draw(&[o])?)
                } else {
                    None
                };
                proj.push(Projection { weight, bias });
            }
            let hd = c.head_dim;
            let head_ones = || Tensor::from_vec(vec![unit; hd], &[hd], &device);
            layers.push(DecoderLayer {
                input_norm: ones()?,
                post_norm: ones()?,
                branch_norms: if c.switches.sandwich_norms {
                    Some((ones()?, ones()?))
                } else {
                    None
                },
                qk_norm: if c.qk_norm() {
                    Some((head_ones()?, head_ones()?))
                } else {
                    None
                },
                proj,
            });
        }
        let rt = rope_tables(&c, &device)?;
        Ok(Llama {
            norm: ones()?,
            config: c,
            device,
            embed,
            layers,
            lm_head,
            freqs: rt.global,
            freqs_local: rt.local,
            freqs_long: rt.long,
            load_warnings: Vec::new(),
        })
    }

    /// The model on `device`. CPU → GPU: projections in NF4 (quantized there when held dense),
    /// the rest bf16; one layer at a time, each host layer dropped once it is on the device.
    pub fn to_device(self, device: Device) -> Result<Llama> {
        if device == self.device {
            return Ok(self);
        }
        if self.device != Device::Cpu || device == Device::Cpu {
            return Err(Error::InvalidArgument(format!(
                "moving a model from {} to {device}: only CPU → GPU is supported",
                self.device
            )));
        }
        let nf4 = self
            .layers
            .first()
            .map_or(Nf4Config::default(), |l| match &l.proj[0].weight {
                BaseWeight::Nf4(q) => Nf4Config {
                    blocksize: q.blocksize,
                    double_quant: true,
                },
                BaseWeight::Dense(_) => Nf4Config::default(),
            });
        check_gpu_support(&self.config, BaseFormat::Nf4(nf4))?;
        let dev = device;
        let mut layers = Vec::with_capacity(self.layers.len());
        for layer in self.layers {
            let mut proj = Vec::with_capacity(7);
            for p in layer.proj {
                let weight = match p.weight {
                    BaseWeight::Nf4(q) => BaseWeight::Nf4(q.to_device(&dev)?),
                    BaseWeight::Dense(w) => {
                        BaseWeight::Nf4(Nf4Tensor::quantize(&bf16_on(&w, &dev)?, nf4)?)
                    }
                };
                let bias = p.bias.map(|b| bf16_on(&b, &dev)).transpose()?;
                proj.push(Projection { weight, bias });
            }
            let qk_norm = match &layer.qk_norm {
                Some((q, k)) => Some((bf16_on(q, &dev)?, bf16_on(k, &dev)?)),
                None => None,
            };
            let branch_norms = match &layer.branch_norms {
                Some((a, m)) => Some((bf16_on(a, &dev)?, bf16_on(m, &dev)?)),
                None => None,
            };
            layers.push(DecoderLayer {
                input_norm: bf16_on(&layer.input_norm, &dev)?,
                post_norm: bf16_on(&layer.post_norm, &dev)?,
                branch_norms,
                qk_norm,
                proj,
            });
        }
        Ok(Llama {
            config: self.config,
            device: dev,
            embed: bf16_on(&self.embed, &dev)?,
            lm_head: self.lm_head.map(|w| bf16_on(&w, &dev)).transpose()?,
            norm: bf16_on(&self.norm, &dev)?,
            freqs: self.freqs.to_device(&dev)?,
            freqs_local: self.freqs_local.map(|f| f.to_device(&dev)).transpose()?,
            freqs_long: self.freqs_long.map(|f| f.to_device(&dev)).transpose()?,
            layers,
            load_warnings: self.load_warnings,
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
        let embed = hv(
            ckpt.f32("model.embed_tokens.weight", &[c.vocab_size, d])?,
            &[c.vocab_size, d],
        )?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let mut proj = Vec::with_capacity(7);
            for &t in c.targets() {
                let (i, o) = t.dims(c);
                let prefix = layer_key(l, t.hf_path());
                let weight = if prequantized {
                    let q = bnb::load_nf4(ckpt, &prefix, &[o, i])?;
                    match format {
                        BaseFormat::Nf4(_) => BaseWeight::Nf4(q),
                        BaseFormat::Dense => BaseWeight::Dense(q.dequantize(DType::F32)?),
                    }
                } else {
                    let w = ckpt.f32(&format!("{prefix}.weight"), &[o, i])?;
                    match format {
                        BaseFormat::Dense => BaseWeight::Dense(hv(w, &[o, i])?),
                        BaseFormat::Nf4(cfg) => {
                            let t = Tensor::from_vec(w, &[o, i], &Device::Cpu)?;
                            BaseWeight::Nf4(Nf4Tensor::quantize(&t, cfg)?)
                        }
                    }
                };
                let bias = if c.has_bias(t) {
                    Some(hv(ckpt.f32(&format!("{prefix}.bias"), &[o])?, &[o])?)
                } else {
                    None
                };
                proj.push(Projection { weight, bias });
            }
            let hd = c.head_dim;
            let qk_norm = if c.qk_norm() {
                let norm = |n: &str| hv(ckpt.f32(&layer_key(l, n), &[hd])?, &[hd]);
                Some((
                    norm("self_attn.q_norm.weight")?,
                    norm("self_attn.k_norm.weight")?,
                ))
            } else {
                None
            };
            let norm = |n: &str| hv(ckpt.f32(&layer_key(l, n), &[d])?, &[d]);
            let (post_norm, branch_norms) = if c.switches.sandwich_norms {
                (
                    norm("pre_feedforward_layernorm.weight")?,
                    Some((
                        norm("post_attention_layernorm.weight")?,
                        norm("post_feedforward_layernorm.weight")?,
                    )),
                )
            } else {
                (norm("post_attention_layernorm.weight")?, None)
            };
            layers.push(DecoderLayer {
                qk_norm,
                input_norm: norm("input_layernorm.weight")?,
                post_norm,
                branch_norms,
                proj,
            });
        }
        let norm = hv(ckpt.f32("model.norm.weight", &[d])?, &[d])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(hv(
                ckpt.f32("lm_head.weight", &[c.vocab_size, d])?,
                &[c.vocab_size, d],
            )?)
        };
        let rt = rope_tables(c, &Device::Cpu)?;
        // Every tensor of the checkpoint must be one the config uses: a 1-layer config on a
        // 2-layer checkpoint would otherwise train a truncated model without a word.
        let mut load_warnings = Vec::new();
        let mut unused = Vec::new();
        let (outside, rest): (Vec<&str>, Vec<&str>) = ckpt
            .unused()
            .into_iter()
            .partition(|n| ckpt.outside_text_model(n));
        if !outside.is_empty() {
            load_warnings.push(format!(
                "the checkpoint's vision tower and projector ({} tensors, e.g. `{}`) are not \
                 loaded: qlora-rs trains and runs the language model of a multimodal checkpoint \
                 on text; `merge` copies them unchanged",
                outside.len(),
                outside[0]
            ));
        }
        for name in rest {
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
            device: Device::Cpu,
            config,
            embed,
            layers,
            norm,
            lm_head,
            freqs: rt.global,
            freqs_local: rt.local,
            freqs_long: rt.long,
            load_warnings,
        })
    }

    /// The output embedding `[V, d]` (the input embedding when tied).
    pub fn output_embedding(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// A projection's frozen base weight.
    pub fn base(&self, layer: usize, target: Target) -> &BaseWeight {
        &self.layers[layer].proj[self.slot(target)].weight
    }

    /// Where projection `t` sits in a layer's list (panics for a target the model lacks: the
    /// adapters were checked against the model's targets when they met it).
    fn slot(&self, t: Target) -> usize {
        self.config
            .targets()
            .iter()
            .position(|&x| x == t)
            .unwrap_or_else(|| panic!("{t:?} is not a projection of this {:?}", self.config.arch))
    }

    fn lin(&self, l: usize, t: Target) -> Linear<'_> {
        let p = &self.layers[l].proj[self.slot(t)];
        Linear {
            weight: &p.weight,
            bias: p.bias.as_ref(),
            layer: l,
            target: t,
        }
    }

    /// Layer `l`'s attention: its heads, scale, soft-cap and window.
    fn attention_dims(&self, l: usize) -> attention::Dims {
        let c = &self.config;
        attention::Dims::new(c.num_heads, c.num_kv_heads, c.head_dim)
            .with_scale(c.attn_scale())
            .with_softcap(c.switches.attn_softcap)
            .with_window(c.window(l))
    }

    /// Layer `l`'s RoPE table (Gemma 3's sliding layers have their own).
    fn freqs_of(&self, l: usize) -> &Tensor {
        match (&self.freqs_local, self.config.window(l)) {
            (Some(local), Some(_)) => local,
            _ => &self.freqs,
        }
    }

    /// RoPE on q or k (`heads` heads): longrope's short or long table for each sequence
    /// (the long one beyond the pre-training length, as transformers picks for a sequence run
    /// alone) with its attention factor, else layer `l`'s table.
    fn rope<'t>(&'t self, tape: &mut Tape<'t>, l: usize, x: Var, heads: usize) -> Result<Var> {
        let hd = self.config.head_dim;
        match (&self.config.switches.longrope, &self.freqs_long) {
            (Some(lr), Some(long)) => tape.rope_longrope(
                x,
                heads,
                hd,
                (&self.freqs, long),
                lr.original_max_position_embeddings,
                lr.attention_factor,
            ),
            _ => tape.rope(x, heads, hd, self.freqs_of(l), 1.0),
        }
    }

    /// The RMSNorm settings of every norm of the model.
    fn norm(&self) -> rmsnorm::Norm {
        let c = &self.config;
        if c.switches.norm_unit_offset {
            rmsnorm::Norm::unit_offset(c.rms_norm_eps)
        } else {
            rmsnorm::Norm::plain(c.rms_norm_eps)
        }
    }

    /// One decoder layer on `tape`, from `x`; with `cache` (generation on the CPU), attention
    /// also reads the keys and values of the tokens before these, and the cache grows by them.
    /// Each value is dropped after its last use: with no records (inference) only what the next
    /// op needs is alive.
    fn layer<'t>(
        &'t self,
        tape: &mut Tape<'t>,
        l: usize,
        x: &Var,
        cache: Option<&mut KvCache>,
    ) -> Result<Var> {
        let c = &self.config;
        let (norm, hd) = (self.norm(), c.head_dim);
        let ly = &self.layers[l];
        let n1 = tape.rmsnorm(x, &ly.input_norm, norm)?;
        let (q, k, v) = if c.switches.fused_proj {
            let qkv = tape.linear(&n1, self.lin(l, Target::Qkv))?;
            drop(n1);
            let mut parts = tape.split_cols(&qkv, &[c.q_dim(), c.kv_dim(), c.kv_dim()])?;
            drop(qkv);
            let v = parts.pop().expect("three parts");
            let k = parts.pop().expect("three parts");
            (parts.pop().expect("three parts"), k, v)
        } else {
            let qkv = [Target::Q, Target::K, Target::V].map(|t| self.lin(l, t));
            let [q, k, v]: [Var; 3] = tape
                .linears(&n1, &qkv)?
                .try_into()
                .expect("one output per projection");
            drop(n1);
            (q, k, v)
        };
        let (q, k) = match &ly.qk_norm {
            Some((qn, kn)) => (
                tape.head_rmsnorm(q, c.num_heads, hd, qn, norm)?,
                tape.head_rmsnorm(k, c.num_kv_heads, hd, kn, norm)?,
            ),
            None => (q, k),
        };
        let q = self.rope(tape, l, q, c.num_heads)?;
        let k = self.rope(tape, l, k, c.num_kv_heads)?;
        let dims = self.attention_dims(l);
        let o = match cache {
            None => tape.attention(&q, &k, &v, dims)?,
            Some(cache) => tape.attention_cached(&q, &k, &v, dims, cache)?,
        };
        drop((q, k, v));
        let mut a = tape.linear(&o, self.lin(l, Target::O))?;
        drop(o);
        if let Some((attn_out_norm, _)) = &ly.branch_norms {
            a = tape.rmsnorm(&a, attn_out_norm, norm)?;
        }
        let (h1, n2) = tape.add_rmsnorm(x, &a, &ly.post_norm, norm)?;
        drop(a);
        let (g, u) = if c.switches.fused_proj {
            let gu = tape.linear(&n2, self.lin(l, Target::GateUp))?;
            drop(n2);
            let f = c.intermediate_size;
            let mut parts = tape.split_cols(&gu, &[f, f])?;
            drop(gu);
            let u = parts.pop().expect("two parts");
            (parts.pop().expect("two parts"), u)
        } else {
            let gate_up = [Target::Gate, Target::Up].map(|t| self.lin(l, t));
            let [g, u]: [Var; 2] = tape
                .linears(&n2, &gate_up)?
                .try_into()
                .expect("one output per projection");
            drop(n2);
            (g, u)
        };
        let act = match c.switches.act {
            Activation::Silu => swiglu::Act::Silu,
            Activation::GeluTanh => swiglu::Act::GeluTanh,
        };
        let s = tape.glu(&g, &u, act)?;
        drop((g, u));
        match &ly.branch_norms {
            None => tape.linear_residual(&s, self.lin(l, Target::Down), &h1),
            Some((_, mlp_out_norm)) => {
                let m = tape.linear(&s, self.lin(l, Target::Down))?;
                drop(s);
                let m = tape.rmsnorm(&m, mlp_out_norm, norm)?;
                tape.add(&h1, &m)
            }
        }
    }

    /// The batch of `ids` packed as `cu_seqlens`, checked against the model.
    fn batch(&self, ids: &[u32], cu_seqlens: &[usize]) -> Result<Batch> {
        let batch = Batch::on(cu_seqlens.to_vec(), self.device)?;
        if ids.len() != batch.tokens() {
            return Err(Error::ShapeMismatch {
                op: "llama forward",
                expected: format!("{} token ids (cu_seqlens ends there)", batch.tokens()),
                got: format!("{} ids", ids.len()),
            });
        }
        Ok(batch)
    }

    fn check_adapters(&self, adapters: Option<&Adapters>) -> Result<()> {
        if let Some(a) = adapters {
            a.check_fits(&self.config)?;
            if a.device() != self.device {
                return Err(Error::DeviceMismatch {
                    op: "llama",
                    a: format!("model on {}", self.device),
                    b: format!("adapters on {}", a.device()),
                });
            }
        }
        Ok(())
    }

    /// The layers' output (before the final norm) without recording; with `inputs`, each
    /// layer's input is kept there (the checkpoints of a training step).
    fn layers_forward(
        &self,
        batch: &Batch,
        adapters: Option<&Adapters>,
        dropout: Option<Dropout>,
        ids: &[u32],
        mut inputs: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor> {
        let mut h = autograd::embed(&self.embed, ids, self.config.switches.embed_scale)?;
        for l in 0..self.config.num_layers {
            let mut tape = Tape::new(self.device, batch, adapters, false, dropout)?;
            let x = tape.input(h, false)?;
            let y = self.layer(&mut tape, l, &x, None)?;
            drop(tape);
            if let Some(keep) = inputs.as_mut() {
                keep.push(x.into_tensor()?);
            }
            h = y.into_tensor()?;
        }
        Ok(h)
    }

    /// Forward and backward of one packed micro-batch on the model's device: adds
    /// `grad_scale · d(loss_sum)/d(LoRA)` into the adapters' gradients and returns the loss
    /// (read back on a GPU only when asked) and the tokens counted. The trainer passes
    /// `grad_scale = 1 / (counted tokens of the whole optimizer step)`; dropout masks are drawn
    /// from `dropout_seed`.
    pub fn train_micro_batch(
        &self,
        adapters: &Adapters,
        ids: &[u32],
        labels: &[i64],
        cu_seqlens: &[usize],
        grad_scale: f32,
        dropout_seed: u64,
    ) -> Result<(Losses, usize)> {
        self.check_adapters(Some(adapters))?;
        let batch = self.batch(ids, cu_seqlens)?;
        let targets = self.targets(labels, cu_seqlens)?;
        let dropout = Some(Dropout {
            p: adapters.config().dropout,
            seed: dropout_seed,
        });
        let dev = self.device;
        // Forward, keeping each layer's input (the checkpoints); the replay in the backward
        // draws the same dropout masks.
        let mut inputs = Vec::with_capacity(self.config.num_layers);
        let h = self.layers_forward(&batch, Some(adapters), dropout, ids, Some(&mut inputs))?;
        // Final norm + fused lm_head/cross-entropy.
        let mut tape = Tape::new(dev, &batch, Some(adapters), true, None)?;
        let x = tape.input(h, true)?;
        let n = tape.rmsnorm(&x, &self.norm, self.norm())?;
        let softcap = self.config.switches.final_softcap;
        let ce = tape.lm_head_ce(
            &n,
            self.output_embedding(),
            &targets,
            Some(grad_scale),
            softcap,
        )?;
        drop(n);
        let loss = ce.var.expect("the final norm's input requires a gradient");
        let mut dh = tape
            .backward(&loss, None, &x)?
            .expect("the final norm's input requires a gradient");
        drop(x);
        // Backward, one replayed layer at a time; each layer's input is released with it.
        for l in (0..self.config.num_layers).rev() {
            let input = inputs.pop().expect("one input per layer");
            let mut tape = Tape::replay(dev, &batch, Some(adapters), dropout)?;
            let x = tape.input(input, l > 0)?;
            let y = self.layer(&mut tape, l, &x, None)?;
            match tape.backward(&y, Some(dh), &x)? {
                Some(dx) => dh = dx,
                None => break,
            }
        }
        Ok((ce.losses, ce.count))
    }

    /// The loss of one packed micro-batch without gradients (evaluation), on the model's device.
    pub fn eval_micro_batch(
        &self,
        adapters: Option<&Adapters>,
        ids: &[u32],
        labels: &[i64],
        cu_seqlens: &[usize],
    ) -> Result<(Losses, usize)> {
        self.check_adapters(adapters)?;
        let batch = self.batch(ids, cu_seqlens)?;
        let targets = self.targets(labels, cu_seqlens)?;
        let h = self.layers_forward(&batch, adapters, None, ids, None)?;
        let mut tape = Tape::new(self.device, &batch, adapters, false, None)?;
        let x = tape.input(h, false)?;
        let n = tape.rmsnorm(&x, &self.norm, self.norm())?;
        drop(x);
        let softcap = self.config.switches.final_softcap;
        let ce = tape.lm_head_ce(&n, self.output_embedding(), &targets, None, softcap)?;
        Ok((ce.losses, ce.count))
    }

    /// Final hidden states (after the last norm) `[T, d]` on the model's device.
    pub fn hidden_on(
        &self,
        adapters: Option<&Adapters>,
        ids: &[u32],
        cu_seqlens: &[usize],
    ) -> Result<Tensor> {
        self.check_adapters(adapters)?;
        let batch = self.batch(ids, cu_seqlens)?;
        let h = self.layers_forward(&batch, adapters, None, ids, None)?;
        self.final_norm(h)
    }

    fn final_norm(&self, h: Tensor) -> Result<Tensor> {
        let norm = self.norm();
        match self.device {
            Device::Cpu => {
                let d = self.config.hidden_size;
                let (n, _) = rmsnorm::forward(
                    h.cpu_slice::<f32>("final norm")?,
                    self.norm.cpu_slice::<f32>("final norm")?,
                    d,
                    norm,
                )?;
                hv(n, h.shape())
            }
            Device::Cuda(_) => Ok(rmsnorm::forward_cuda(&h, &self.norm, norm)?.0),
        }
    }

    /// Logits (f32, on the host) of normed hidden states `n` `[T, d]` on the model's device.
    fn logits_of(&self, n: &Tensor) -> Result<Vec<f32>> {
        let mut z = self.raw_logits_of(n)?;
        if let Some(c) = self.config.switches.final_softcap {
            cross_entropy::softcap_logits(&mut z, c);
        }
        Ok(z)
    }

    /// [`Llama::logits_of`] before the final soft-cap.
    fn raw_logits_of(&self, n: &Tensor) -> Result<Vec<f32>> {
        let d = self.config.hidden_size;
        match self.device {
            Device::Cpu => Ok(cross_entropy::logits(
                n.cpu_slice::<f32>("logits")?,
                self.output_embedding().cpu_slice::<f32>("logits")?,
                d,
            )),
            Device::Cuda(_) => {
                let t = n.shape()[0];
                let mut z = Tensor::uninit(&[t, self.config.vocab_size], DType::F32, &self.device)?;
                gemm::gemm_cuda(
                    gemm::Layout::Nt,
                    n,
                    self.output_embedding(),
                    &mut z,
                    1.0,
                    0.0,
                )?;
                z.to_vec::<f32>()
            }
        }
    }

    /// Logits `[vocab]` of the last position of one sequence `ids` on the model's device, with
    /// no cache: the whole forward over `ids`, then the final norm and the lm_head of the last
    /// row only (generation on a GPU, which has no KV cache yet).
    pub fn last_logits(&self, adapters: Option<&Adapters>, ids: &[u32]) -> Result<Vec<f32>> {
        let t = ids.len();
        if t == 0 {
            return Err(Error::InvalidArgument("last logits: no tokens".into()));
        }
        self.check_adapters(adapters)?;
        let batch = self.batch(ids, &[0, t])?;
        let h = self.layers_forward(&batch, adapters, None, ids, None)?;
        let last = last_row(&h)?;
        self.logits_of(&self.final_norm(last)?)
    }

    /// Runs `ids` (positions `cache.len()..`) through the model on the CPU, extending the
    /// cache; returns the logits of the last token.
    pub(crate) fn decode_step(
        &self,
        adapters: Option<&Adapters>,
        ids: &[u32],
        cache: &mut [KvCache],
    ) -> Result<Vec<f32>> {
        let start = cache.first().map_or(0, |c| c.len());
        let batch = Batch::decode(start, ids.len())?;
        let mut h = autograd::embed(&self.embed, ids, self.config.switches.embed_scale)?;
        for (l, layer_cache) in cache.iter_mut().enumerate() {
            let mut tape = Tape::new(self.device, &batch, adapters, false, None)?;
            let x = tape.input(h, false)?;
            let y = self.layer(&mut tape, l, &x, Some(layer_cache))?;
            drop((tape, x));
            h = y.into_tensor()?;
        }
        self.logits_of(&self.final_norm(last_row(&h)?)?)
    }

    /// `adapters` (host form) on the model's device, for the host-facing methods below.
    pub(crate) fn adapters_for(&self, lora: Option<&LoraParams>) -> Result<Option<Adapters>> {
        lora.map(|p| {
            super::adapters::check_fits(p, &self.config)?;
            Adapters::new(p, None, AdamWConfig::default(), self.device)
        })
        .transpose()
    }

    /// Final hidden states (after the last norm), `[T, d]`, on the host in f32.
    pub fn hidden_states(
        &self,
        lora: Option<&LoraParams>,
        ids: &[u32],
        cu_seqlens: &[usize],
    ) -> Result<Vec<f32>> {
        let a = self.adapters_for(lora)?;
        host_f32(&self.hidden_on(a.as_ref(), ids, cu_seqlens)?)
    }

    /// Logits `[T, V]` of a packed batch, on the host in f32.
    pub fn logits(
        &self,
        lora: Option<&LoraParams>,
        ids: &[u32],
        cu_seqlens: &[usize],
    ) -> Result<Vec<f32>> {
        let a = self.adapters_for(lora)?;
        let n = self.hidden_on(a.as_ref(), ids, cu_seqlens)?;
        self.logits_of(&n)
    }

    /// Loss of a packed batch (labels unshifted, −100 = not counted; shifted per sequence).
    pub fn loss(
        &self,
        lora: Option<&LoraParams>,
        ids: &[u32],
        labels: &[i64],
        cu_seqlens: &[usize],
    ) -> Result<StepLoss> {
        let a = self.adapters_for(lora)?;
        let (losses, count) = self.eval_micro_batch(a.as_ref(), ids, labels, cu_seqlens)?;
        Ok(StepLoss {
            loss_sum: losses.sum()?,
            count,
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

    /// [`Llama::train_micro_batch`] with the adapters in host form: adds
    /// `grad_scale · d(loss_sum)/d(LoRA)` into `grads` (laid out like `lora.values`). (A copy of
    /// the adapters is made on the model's device per call; a training loop keeps [`Adapters`].)
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
        crate::ops::expect_len(
            "forward_backward",
            "gradient buffer",
            grads.len(),
            &[lora.len()],
        )?;
        let a = self.adapters_for(Some(lora))?.expect("adapters given");
        let (losses, count) =
            self.train_micro_batch(&a, ids, labels, cu_seqlens, grad_scale, dropout_seed)?;
        for (g, d) in grads.iter_mut().zip(a.grads_to_host()?) {
            *g += d;
        }
        Ok(StepLoss {
            loss_sum: losses.sum()?,
            count,
        })
    }
}

/// The last row of `[T, d]`, as `[1, d]`.
fn last_row(h: &Tensor) -> Result<Tensor> {
    let op = "last row";
    let (t, d) = (h.shape()[0], h.shape()[1]);
    match h.device() {
        Device::Cpu => hv(h.cpu_slice::<f32>(op)?[(t - 1) * d..].to_vec(), &[1, d]),
        Device::Cuda(o) => {
            let mut last = Tensor::uninit(&[1, d], DType::BF16, &h.device())?;
            let cuda = crate::device::cuda::CudaDevice::get(o)?;
            let row = h.cuda_slice::<bf16>(op)?.slice((t - 1) * d..t * d);
            cuda.stream()
                .memcpy_dtod(&row, last.cuda_slice_mut::<bf16>(op)?)
                .map_err(Error::cuda("copying the last hidden row"))?;
            Ok(last)
        }
    }
}

/// A tensor's values on the host in f32 (bf16 widened).
fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    match t.dtype() {
        DType::BF16 => Ok(t.to_vec::<bf16>()?.iter().map(|v| v.to_f32()).collect()),
        _ => t.to_vec::<f32>(),
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
        let h = autograd::embed(&model.embed, &[1, 2, 3, 4, 5], None).unwrap();
        // No adapter and an input that needs no gradient: nothing to record.
        let mut tape = Tape::new(Device::Cpu, &batch, None, true, None).unwrap();
        let x = tape
            .input(h.to_device(&Device::Cpu).unwrap(), false)
            .unwrap();
        model.layer(&mut tape, 0, &x, None).unwrap();
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
        let a = Adapters::new(&lora, None, AdamWConfig::default(), Device::Cpu).unwrap();
        let mut tape = Tape::new(Device::Cpu, &batch, Some(&a), true, None).unwrap();
        let x = tape.input(h, false).unwrap();
        model.layer(&mut tape, 0, &x, None).unwrap();
        // v, attention, o, add + norm, gate, up, swiglu, down + residual
        assert_eq!(tape.records(), 8);
    }
}
