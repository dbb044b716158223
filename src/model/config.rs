//! Model configuration: `config.json` read into [`HfConfig`] (a mirror of the file, every
//! optional field optional) and validated into [`LlamaConfig`] (sizes derived and checked)
//! before any weight is read.
//!
//! Both config dialects are accepted: transformers 4.x (`rope_theta` + `rope_scaling` with
//! `rope_type` or the legacy `type`, `torch_dtype`) and 5.x (`rope_parameters` holding
//! `rope_theta` and the scaling, `dtype`).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::lora::Target;
use crate::error::{Error, Result};
use crate::ops::rope::RopeScaling;

/// `config.json` as transformers writes it (the fields this crate reads).
#[derive(Clone, Debug, Deserialize)]
pub struct HfConfig {
    /// `llama`, `mistral`, `qwen2`, `qwen3`, `gemma2`, `gemma3_text` or `phi3` (anything else is
    /// refused).
    pub model_type: Option<String>,
    /// Model width d.
    pub hidden_size: Option<usize>,
    /// MLP width f.
    pub intermediate_size: Option<usize>,
    /// Decoder layers.
    pub num_hidden_layers: Option<usize>,
    /// Query heads.
    pub num_attention_heads: Option<usize>,
    /// Key/value heads (grouped-query attention); absent means as many as query heads.
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; absent means `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// Vocabulary size V.
    pub vocab_size: Option<usize>,
    /// RMSNorm epsilon; absent means 1e-6.
    pub rms_norm_eps: Option<f64>,
    /// RoPE base (transformers 4.x); absent means 10000.
    pub rope_theta: Option<f64>,
    /// RoPE scaling block (transformers 4.x): `rope_type` or `type`, `factor`, ….
    pub rope_scaling: Option<Value>,
    /// RoPE block of transformers 5.x: `rope_theta` and the scaling; wins over the 4.x fields.
    pub rope_parameters: Option<Value>,
    /// Whether the LM head reuses the embedding matrix; absent means false.
    pub tie_word_embeddings: Option<bool>,
    /// Context length in tokens; absent means 2048.
    pub max_position_embeddings: Option<usize>,
    /// MLP activation; only `silu` is accepted.
    pub hidden_act: Option<String>,
    /// Biases on q, k, v and o for Llama (Qwen2 always has q, k, v biases and never o's).
    pub attention_bias: Option<bool>,
    /// MLP biases; `true` is refused.
    pub mlp_bias: Option<bool>,
    /// Sliding-window attention span (Mistral, and Qwen2/Qwen3 with `use_sliding_window`).
    pub sliding_window: Option<usize>,
    /// Whether Qwen2's and Qwen3's `sliding_window` applies.
    pub use_sliding_window: Option<bool>,
    /// Per layer, `full_attention` or `sliding_attention` (transformers ≥ 4.53 writes it).
    pub layer_types: Option<Vec<String>>,
    /// Checkpoint dtype (transformers 4.x).
    pub torch_dtype: Option<String>,
    /// Checkpoint dtype (transformers 5.x); wins over `torch_dtype`.
    pub dtype: Option<String>,
    /// The quantization block of a pre-quantized checkpoint (only bitsandbytes 4-bit NF4 loads).
    pub quantization_config: Option<Value>,
    /// Gemma's MLP activation (Gemma reads this, not `hidden_act`).
    pub hidden_activation: Option<String>,
    /// Gemma: attention scores are scaled by `query_pre_attn_scalar^-1/2`.
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 2: `c·tanh(s/c)` on attention scores (absent: 50; null: none).
    #[serde(default, deserialize_with = "present")]
    pub attn_logit_softcapping: Option<Option<f64>>,
    /// Gemma 2: `c·tanh(z/c)` on the final logits (absent: 30; null: none).
    #[serde(default, deserialize_with = "present")]
    pub final_logit_softcapping: Option<Option<f64>>,
    /// Gemma 3 (transformers 4.x): every n-th layer is global, the rest sliding.
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 3 (transformers 4.x): the RoPE base of the sliding layers.
    pub rope_local_base_freq: Option<f64>,
    /// Qwen2/Qwen3 without `layer_types`: layers from this index on slide.
    pub max_window_layers: Option<usize>,
    /// Gemma: attention in both directions within the window (embedding models); refused.
    pub use_bidirectional_attention: Option<bool>,
    /// A multimodal checkpoint's language model (`gemma3`): its config, read as the model's.
    pub text_config: Option<Value>,
    /// Phi-3 (transformers 4.x): the share of each head that RoPE rotates (Phi-4-mini: 0.75);
    /// 5.x writes it inside `rope_parameters`.
    pub partial_rotary_factor: Option<f64>,
    /// Phi-3: the context length of pre-training, beyond which longrope uses its long factors.
    pub original_max_position_embeddings: Option<usize>,
    /// Dropout on attention probabilities; only 0 is supported.
    pub attention_dropout: Option<f64>,
    /// Phi-3's dropout on each branch before its residual add; only 0 is supported.
    pub resid_pdrop: Option<f64>,
    /// Phi-3's dropout on the embeddings; only 0 is supported.
    pub embd_pdrop: Option<f64>,
}

/// Tells a field given as `null` (`Some(None)`) from a field left out (`None`).
fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(d).map(Some)
}

/// The model families this crate runs (all share Llama's decoder layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// `model_type` `llama`.
    Llama,
    /// `model_type` `mistral`.
    Mistral,
    /// Llama with biases on q, k and v.
    Qwen2,
    /// Llama with an RMSNorm over each head of q and of k before RoPE (`q_norm`, `k_norm`),
    /// `head_dim` from the config (not `hidden_size / heads`), and `attention_bias` on q, k, v
    /// and o alike.
    Qwen3,
    /// `model_type` `gemma2`: see [`Switches`] (every switch on, no q/k norms).
    Gemma2,
    /// `model_type` `gemma3_text`: Gemma 2's layer with q/k norms, no soft-capping by default,
    /// and a second RoPE base for the sliding layers.
    Gemma3,
    /// `model_type` `phi3` (Phi-3, Phi-3.5, Phi-4-mini): q/k/v stored as one `qkv_proj` and
    /// gate/up as one `gate_up_proj`, RoPE on a share of each head, `longrope` scaling.
    Phi3,
}

impl Arch {
    /// Gemma 2 or 3: the `(1 + w)` norms, the scaled embedding, four norms per layer.
    pub fn is_gemma(self) -> bool {
        matches!(self, Arch::Gemma2 | Arch::Gemma3)
    }
}

/// The accepted `model_type`s, for messages.
pub const SUPPORTED_MODEL_TYPES: &str =
    "llama, mistral, qwen2, qwen3, gemma2, gemma3_text, gemma3 (its language model), phi3";

/// The MLP's gate activation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Activation {
    /// `silu(g) ⊙ u` (SwiGLU): Llama, Mistral, Qwen.
    #[default]
    Silu,
    /// `gelu_tanh(g) ⊙ u` (GeGLU, transformers' `gelu_pytorch_tanh`): Gemma.
    GeluTanh,
}

/// The switches by which one decoder serves every family. `Switches::default()` is Llama's
/// layer; Gemma turns most of them on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Switches {
    /// The MLP's gate activation.
    pub act: Activation,
    /// RMSNorm weights are offsets from one: `x·rstd·(1 + w)` (Gemma).
    pub norm_unit_offset: bool,
    /// Norms after attention and after the MLP too, on the branch before the residual add:
    /// `h = h + norm(attn(norm(h)))`, `h = h + norm(mlp(norm(h)))` (Gemma).
    pub sandwich_norms: bool,
    /// The embedding rows are multiplied by this (Gemma: `√hidden_size`, rounded to the
    /// activations' dtype).
    pub embed_scale: Option<f32>,
    /// Attention scale; `None` is `1/√head_dim` (Gemma: `query_pre_attn_scalar^-1/2`).
    pub attn_scale: Option<f32>,
    /// Attention scores soft-capped as `c·tanh(s/c)` (Gemma 2).
    pub attn_softcap: Option<f32>,
    /// Final logits soft-capped as `c·tanh(z/c)` (Gemma 2).
    pub final_softcap: Option<f32>,
    /// Which layers use `sliding_window`; empty means every layer does (Mistral).
    pub sliding_layers: Vec<bool>,
    /// RoPE base and scaling of the sliding layers where they differ from the global ones
    /// (Gemma 3).
    pub rope_local: Option<(f32, RopeScaling)>,
    /// RoPE rotates only the first this-many dims of each head (`partial_rotary_factor`, Phi);
    /// `None` rotates all of `head_dim`.
    pub rotary_dim: Option<usize>,
    /// Phi-3's `longrope` scaling (the global `rope_scaling` is then `None`).
    pub longrope: Option<LongRope>,
    /// q/k/v are one projection `qkv_proj` `[q + 2·kv, d]` and gate/up one `gate_up_proj`
    /// `[2f, d]` (gate first), as Phi-3 stores them; LoRA adapts each fused projection whole.
    pub fused_proj: bool,
}

/// Phi-3's `longrope`: frequencies divided per dimension by `short_factor`, or by
/// `long_factor` when the longest sequence of a forward is longer than
/// `original_max_position_embeddings` (transformers picks the set per forward from the largest
/// position id), and cos/sin multiplied by `attention_factor`.
#[derive(Clone, Debug, PartialEq)]
pub struct LongRope {
    /// Per-frequency divisors for sequences within the pre-training length.
    pub short_factor: Vec<f32>,
    /// Per-frequency divisors for longer sequences.
    pub long_factor: Vec<f32>,
    /// The pre-training context length.
    pub original_max_position_embeddings: usize,
    /// Multiplier of cos and sin: given, or `√(1 + ln s / ln L)` with
    /// `s = max_position_embeddings / L` (1 where s ≤ 1).
    pub attention_factor: f32,
}

/// A validated configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// Model family, from `model_type`.
    pub arch: Arch,
    /// Model width d: the residual stream is `[T, d]`.
    pub hidden_size: usize,
    /// MLP width f: gate and up are `[f, d]`, down is `[d, f]`.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads; divides `num_heads`.
    pub num_kv_heads: usize,
    /// Per-head width (even, for RoPE).
    pub head_dim: usize,
    /// Vocabulary size V: the embedding is `[V, d]`, logits `[T, V]`.
    pub vocab_size: usize,
    /// RMSNorm epsilon (> 0).
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RoPE frequency scaling (none, linear or llama3).
    pub rope_scaling: RopeScaling,
    /// The LM head is the embedding matrix (no separate `lm_head.weight`).
    pub tie_word_embeddings: bool,
    /// Context length in tokens; generation stops there.
    pub max_position_embeddings: usize,
    /// Biases on q, k and v (Qwen2, or Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Sliding-window attention span of the layers that slide (`switches.sliding_layers`);
    /// `None` when no layer does. A query at position i sees keys i − w < j ≤ i.
    pub sliding_window: Option<usize>,
    /// The checkpoint's `torch_dtype` / `dtype`, if stated.
    pub dtype: Option<String>,
    /// The `quantization_config` block of a pre-quantized checkpoint.
    pub quantization_config: Option<Value>,
    /// The family's switches in the one decoder.
    pub switches: Switches,
    /// The language model of a multimodal checkpoint (`model_type` `gemma3`,
    /// Gemma3ForConditionalGeneration): its tensors are stored under `language_model.model.`
    /// (or transformers 5's module path `model.language_model.`), the vision tower and projector
    /// beside them are left as they are, and adapters name the modules
    /// `model.language_model.layers.*` as PEFT does on that model.
    pub multimodal: bool,
}

impl LlamaConfig {
    /// How many dims of each head RoPE rotates (even; `head_dim` unless partial).
    pub fn rotary_dim(&self) -> usize {
        self.switches.rotary_dim.unwrap_or(self.head_dim)
    }

    /// The LoRA-adaptable projections of each layer, in the order a layer runs them:
    /// [`Target::ALL`], or Phi-3's fused four.
    pub fn targets(&self) -> &'static [Target] {
        if self.switches.fused_proj {
            &Target::FUSED
        } else {
            &Target::ALL
        }
    }

    /// Whether projection `t` has a bias (q, k, v with `qkv_bias`; o with `o_bias`; the fused
    /// projections never).
    pub fn has_bias(&self, t: Target) -> bool {
        match t {
            Target::Q | Target::K | Target::V => self.qkv_bias,
            Target::O => self.o_bias,
            _ => false,
        }
    }

    /// Whether q and k pass through an RMSNorm per head before RoPE (`q_norm`/`k_norm` of
    /// Qwen3 and Gemma 3).
    pub fn qk_norm(&self) -> bool {
        matches!(self.arch, Arch::Qwen3 | Arch::Gemma3)
    }

    /// The sliding-window span of layer `l`'s attention (`None`: full causal attention).
    pub fn window(&self, l: usize) -> Option<usize> {
        let slides = self.switches.sliding_layers.get(l).copied();
        self.sliding_window.filter(|_| slides.unwrap_or(true))
    }

    /// Attention scale of every layer.
    pub fn attn_scale(&self) -> f32 {
        self.switches
            .attn_scale
            .unwrap_or_else(|| 1.0 / (self.head_dim as f32).sqrt())
    }

    /// Reads and validates `config.json`; errors name the file and the field.
    pub fn from_file(path: &Path) -> Result<LlamaConfig> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let hf: HfConfig = serde_json::from_str(&text).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            msg: format!("not a valid config.json: {e}"),
        })?;
        LlamaConfig::try_from(hf).map_err(|e| Error::Format {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })
    }

    /// Where a multimodal checkpoint's language model keeps its layers' modules, as PEFT names
    /// them (`model.language_model.layers`), else `model.layers`.
    pub fn layers_module(&self) -> &'static str {
        if self.multimodal {
            "model.language_model.layers"
        } else {
            "model.layers"
        }
    }

    /// Query heads sharing one key/value head.
    pub fn n_kv_groups(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Width of q (`heads · head_dim`).
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of k and v (`kv_heads · head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Parameters of the base model (embedding counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        let attn = d * self.q_dim() * 2 + d * self.kv_dim() * 2;
        let norms = if self.switches.sandwich_norms {
            4 * d
        } else {
            2 * d
        };
        let qk = if self.qk_norm() { 2 * self.head_dim } else { 0 };
        let layer = attn + 3 * d * f + norms + qk;
        let emb = self.vocab_size * d;
        self.num_layers * layer + d + emb * if self.tie_word_embeddings { 1 } else { 2 }
    }
}

fn required(field: &str, v: Option<usize>) -> Result<usize> {
    match v {
        Some(0) => Err(Error::InvalidArgument(format!(
            "config field `{field}` is 0"
        ))),
        Some(x) => Ok(x),
        None => Err(Error::InvalidArgument(format!(
            "config field `{field}` is missing"
        ))),
    }
}

fn num(v: &Value, key: &str, field: &str) -> Result<f64> {
    v.get(key).and_then(Value::as_f64).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "config field `{field}.{key}` is missing or not a number"
        ))
    })
}

/// The scaling from `rope_parameters` / `rope_scaling` (`field` names which one, for errors).
fn parse_rope_scaling(v: &Value, field: &str) -> Result<RopeScaling> {
    match rope_type(v) {
        // Read by `phi_rope` (for phi3 only; refused there for the rest).
        "default" | "longrope" | "su" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num(v, "factor", field)? as f32,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num(v, "factor", field)? as f32,
            low_freq_factor: num(v, "low_freq_factor", field)? as f32,
            high_freq_factor: num(v, "high_freq_factor", field)? as f32,
            original_max_position_embeddings: num(v, "original_max_position_embeddings", field)?
                as usize,
        }),
        other => Err(Error::InvalidArgument(format!(
            "config field `{field}` has rope_type `{other}`: supported are default, linear and \
             llama3 (and longrope for phi3)"
        ))),
    }
}

/// `rope_type` (or the legacy `type`) of a RoPE block.
fn rope_type(v: &Value) -> &str {
    v.get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default")
}

/// The rotated width of each head and Phi-3's longrope, as transformers' Phi3Config and
/// `_compute_longrope_parameters` read them; both refused for the other families.
fn phi_rope(
    c: &HfConfig,
    arch: Arch,
    head_dim: usize,
    block: Option<&Value>,
) -> Result<(Option<usize>, Option<LongRope>)> {
    let field = if c.rope_parameters.is_some() {
        "rope_parameters"
    } else {
        "rope_scaling"
    };
    let factor = block
        .and_then(|b| b.get("partial_rotary_factor"))
        .and_then(Value::as_f64)
        .or(c.partial_rotary_factor)
        .unwrap_or(1.0);
    let kind = block.map_or("default", rope_type);
    let phi = arch == Arch::Phi3;
    let long = matches!(kind, "longrope" | "su") || (phi && kind == "yarn");
    if !phi && long {
        return Err(Error::InvalidArgument(format!(
            "config field `{field}` has rope_type `{kind}`, which is read for phi3 only"
        )));
    }
    if !phi && factor != 1.0 {
        return Err(Error::InvalidArgument(format!(
            "config field `partial_rotary_factor` is {factor}: partial rotary embeddings are read \
             for phi3 only"
        )));
    }
    if !(factor > 0.0 && factor <= 1.0) {
        return Err(Error::InvalidArgument(format!(
            "config field `partial_rotary_factor` must be in (0, 1], got {factor}"
        )));
    }
    // transformers: `int(head_dim * partial_rotary_factor)`.
    let rot = (head_dim as f64 * factor) as usize;
    if rot < 2 || !rot.is_multiple_of(2) {
        return Err(Error::InvalidArgument(format!(
            "config: head_dim {head_dim} × partial_rotary_factor {factor} gives {rot} rotary \
             dims; an even number ≥ 2 is needed"
        )));
    }
    let rotary_dim = (rot != head_dim).then_some(rot);
    if !long {
        return Ok((rotary_dim, None));
    }
    let b = block.expect("a longrope type comes from a block");
    let factors = |key: &str| -> Result<Vec<f32>> {
        let v = b.get(key).and_then(Value::as_array).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "config field `{field}.{key}` is missing or not a list (longrope needs \
                 short_factor and long_factor)"
            ))
        })?;
        let f: Vec<f32> = v
            .iter()
            .map(|x| {
                x.as_f64()
                    .filter(|x| x.is_finite() && *x > 0.0)
                    .map(|x| x as f32)
            })
            .collect::<Option<_>>()
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "config field `{field}.{key}` must hold positive numbers"
                ))
            })?;
        if f.len() != rot / 2 {
            return Err(Error::InvalidArgument(format!(
                "config field `{field}.{key}` has {} values; {} are needed (one per rotated pair: \
                 head_dim {head_dim} × partial_rotary_factor {factor} / 2)",
                f.len(),
                rot / 2
            )));
        }
        Ok(f)
    };
    // Phi3Config always has `original_max_position_embeddings` (default 4096), and transformers
    // prefers it to the block's own.
    let original = c.original_max_position_embeddings.unwrap_or(4096);
    if original < 2 {
        return Err(Error::InvalidArgument(format!(
            "config field `original_max_position_embeddings` is {original}; longrope needs ≥ 2"
        )));
    }
    let max_pos = c.max_position_embeddings.unwrap_or(4096);
    let scale = match b.get("factor").and_then(Value::as_f64) {
        Some(f) => f,
        None => max_pos as f64 / original as f64,
    };
    let attention_factor = match b.get("attention_factor").and_then(Value::as_f64) {
        Some(a) => a,
        None if scale <= 1.0 => 1.0,
        None => (1.0 + scale.ln() / (original as f64).ln()).sqrt(),
    };
    Ok((
        rotary_dim,
        Some(LongRope {
            short_factor: factors("short_factor")?,
            long_factor: factors("long_factor")?,
            original_max_position_embeddings: original,
            attention_factor: attention_factor as f32,
        }),
    ))
}

impl TryFrom<HfConfig> for LlamaConfig {
    type Error = Error;

    fn try_from(c: HfConfig) -> Result<LlamaConfig> {
        let model_type = c.model_type.clone().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "config field `model_type` is missing (supported: {SUPPORTED_MODEL_TYPES})"
            ))
        })?;
        let model_type = model_type.as_str();
        let arch = match model_type {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            "gemma2" => Arch::Gemma2,
            "gemma3_text" => Arch::Gemma3,
            "phi3" => Arch::Phi3,
            "gemma3" => return multimodal_text_config(c),
            other => {
                return Err(Error::InvalidArgument(format!(
                    "model_type `{other}` is not supported (supported: {SUPPORTED_MODEL_TYPES})"
                )))
            }
        };
        let act = if arch.is_gemma() {
            // Gemma's MLP reads `hidden_activation` (transformers' default gelu_pytorch_tanh);
            // a `hidden_act` beside it is not read by transformers either.
            match c
                .hidden_activation
                .as_deref()
                .unwrap_or("gelu_pytorch_tanh")
            {
                "gelu_pytorch_tanh" => Activation::GeluTanh,
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "config field `hidden_activation` is `{other}`: only gelu_pytorch_tanh \
                         (GeGLU with the tanh GELU) is supported for {model_type}"
                    )))
                }
            }
        } else {
            if let Some(act) = c.hidden_act.as_deref() {
                if act != "silu" {
                    return Err(Error::InvalidArgument(format!(
                        "config field `hidden_act` is `{act}`: only silu (SwiGLU) is supported"
                    )));
                }
            }
            Activation::Silu
        };
        if c.use_bidirectional_attention == Some(true) {
            return Err(Error::InvalidArgument(
                "config field `use_bidirectional_attention` is true (an embedding model's \
                 attention): only causal attention is supported"
                    .into(),
            ));
        }
        for (field, v) in [
            ("attention_dropout", c.attention_dropout),
            ("resid_pdrop", c.resid_pdrop),
            ("embd_pdrop", c.embd_pdrop),
        ] {
            if let Some(p) = v.filter(|&p| p != 0.0) {
                return Err(Error::InvalidArgument(format!(
                    "config field `{field}` is {p}: only 0 is supported (LoRA dropout is set with \
                     --lora-dropout)"
                )));
            }
        }
        if c.mlp_bias == Some(true) {
            return Err(Error::InvalidArgument(
                "config field `mlp_bias` is true: MLP biases are not supported".into(),
            ));
        }
        // Gemma's config classes fill what a config.json leaves out (the hub's multimodal Gemma 3
        // configs list only a few fields of `text_config`): their defaults, as transformers reads
        // the file. Note head_dim is 256 there, not hidden_size / heads.
        let c = if arch.is_gemma() {
            let vocab = if arch == Arch::Gemma2 {
                256_000
            } else {
                262_208
            };
            HfConfig {
                vocab_size: c.vocab_size.or(Some(vocab)),
                hidden_size: c.hidden_size.or(Some(2304)),
                intermediate_size: c.intermediate_size.or(Some(9216)),
                num_hidden_layers: c.num_hidden_layers.or(Some(26)),
                num_attention_heads: c.num_attention_heads.or(Some(8)),
                num_key_value_heads: c.num_key_value_heads.or(Some(4)),
                head_dim: c.head_dim.or(Some(256)),
                ..c
            }
        } else {
            c
        };
        let hidden_size = required("hidden_size", c.hidden_size)?;
        let intermediate_size = required("intermediate_size", c.intermediate_size)?;
        let num_layers = required("num_hidden_layers", c.num_hidden_layers)?;
        let num_heads = required("num_attention_heads", c.num_attention_heads)?;
        let num_kv_heads = required(
            "num_key_value_heads",
            c.num_key_value_heads.or(Some(num_heads)),
        )?;
        let vocab_size = required("vocab_size", c.vocab_size)?;
        let head_dim = match c.head_dim {
            Some(h) => required("head_dim", Some(h))?,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(Error::InvalidArgument(format!(
                        "config: num_attention_heads ({num_heads}) does not divide hidden_size \
                         ({hidden_size}) and no head_dim is given"
                    )));
                }
                hidden_size / num_heads
            }
        };
        if num_heads % num_kv_heads != 0 {
            return Err(Error::InvalidArgument(format!(
                "config: num_key_value_heads ({num_kv_heads}) does not divide num_attention_heads \
                 ({num_heads})"
            )));
        }
        if head_dim % 2 != 0 {
            return Err(Error::InvalidArgument(format!(
                "config: head_dim ({head_dim}) must be even for rotary embeddings"
            )));
        }
        // Which layers slide: `layer_types` where given, else the family's rule (transformers'
        // defaults: Gemma 2 every other layer from the first, Gemma 3 all but every
        // `sliding_window_pattern`-th, Qwen from `max_window_layers` on, Mistral every layer).
        let sliding_layers: Vec<bool> = match &c.layer_types {
            Some(types) => {
                if types.len() != num_layers {
                    return Err(Error::InvalidArgument(format!(
                        "config field `layer_types` lists {} layers but num_hidden_layers is \
                         {num_layers}",
                        types.len()
                    )));
                }
                types
                    .iter()
                    .enumerate()
                    .map(|(i, t)| match t.as_str() {
                        "full_attention" => Ok(false),
                        "sliding_attention" => Ok(true),
                        other => Err(Error::InvalidArgument(format!(
                            "config field `layer_types` has `{other}` for layer {i}: supported \
                             are full_attention and sliding_attention"
                        ))),
                    })
                    .collect::<Result<_>>()?
            }
            None => (0..num_layers)
                .map(|i| match arch {
                    Arch::Gemma2 => i % 2 == 0,
                    Arch::Gemma3 => (i + 1) % c.sliding_window_pattern.unwrap_or(6).max(1) != 0,
                    Arch::Qwen2 | Arch::Qwen3 => i >= c.max_window_layers.unwrap_or(28),
                    Arch::Llama | Arch::Mistral | Arch::Phi3 => true,
                })
                .collect(),
        };
        let span = match arch {
            Arch::Gemma2 | Arch::Gemma3 => Some(c.sliding_window.unwrap_or(4096)),
            Arch::Qwen2 | Arch::Qwen3 if c.use_sliding_window != Some(true) => None,
            Arch::Llama if c.layer_types.is_none() => None,
            _ => c.sliding_window,
        };
        let listed_sliding = c.layer_types.is_some() && sliding_layers.iter().any(|&s| s);
        if span.is_none() && listed_sliding && matches!(arch, Arch::Llama | Arch::Mistral) {
            return Err(Error::InvalidArgument(
                "config field `layer_types` lists sliding_attention layers but `sliding_window` \
                 is not set"
                    .into(),
            ));
        }
        if span == Some(0) {
            return Err(Error::InvalidArgument(
                "config field `sliding_window` is 0".into(),
            ));
        }
        let sliding_window = span.filter(|_| sliding_layers.iter().any(|&s| s));

        // RoPE. transformers 5: `rope_parameters` {rope_theta, rope_type, …} (Gemma 3: one such
        // block per layer type); 4.x: `rope_theta` + `rope_scaling` (Gemma 3 adds
        // `rope_local_base_freq` for the sliding layers).
        let defaults_theta = match arch {
            Arch::Gemma3 => 1_000_000.0,
            _ => 10_000.0,
        };
        let rope_of = |p: &Value, field: &str, default_theta: f64| -> Result<(f32, RopeScaling)> {
            let theta = p
                .get("rope_theta")
                .and_then(Value::as_f64)
                .or(c.rope_theta)
                .unwrap_or(default_theta);
            Ok((theta as f32, parse_rope_scaling(p, field)?))
        };
        let per_type = c
            .rope_parameters
            .as_ref()
            .filter(|p| p.get("full_attention").is_some() || p.get("sliding_attention").is_some());
        let ((rope_theta, rope_scaling), rope_local) = if let Some(p) = per_type {
            if arch != Arch::Gemma3 {
                return Err(Error::InvalidArgument(format!(
                    "config field `rope_parameters` is given per layer type, which only \
                     gemma3_text reads; this config is {model_type}"
                )));
            }
            let global = match p.get("full_attention") {
                Some(g) => rope_of(g, "rope_parameters.full_attention", defaults_theta)?,
                None => (defaults_theta as f32, RopeScaling::None),
            };
            let local = match p.get("sliding_attention") {
                Some(l) => {
                    let theta = l
                        .get("rope_theta")
                        .and_then(Value::as_f64)
                        .unwrap_or(10_000.0);
                    (
                        theta as f32,
                        parse_rope_scaling(l, "rope_parameters.sliding_attention")?,
                    )
                }
                None => (10_000.0, RopeScaling::None),
            };
            (global, Some(local))
        } else {
            let global = match (&c.rope_parameters, &c.rope_scaling) {
                (Some(p), _) => rope_of(p, "rope_parameters", defaults_theta)?,
                (None, Some(s)) if !s.is_null() => (
                    c.rope_theta.unwrap_or(defaults_theta) as f32,
                    parse_rope_scaling(s, "rope_scaling")?,
                ),
                _ => (
                    c.rope_theta.unwrap_or(defaults_theta) as f32,
                    RopeScaling::None,
                ),
            };
            let local = (arch == Arch::Gemma3).then(|| {
                (
                    c.rope_local_base_freq.unwrap_or(10_000.0) as f32,
                    RopeScaling::None,
                )
            });
            (global, local)
        };
        // Phi-3: RoPE over a share of each head, and longrope (`su`, and `yarn` which Phi3Config
        // renames to longrope). The block holding them is `rope_parameters` (5.x) or
        // `rope_scaling` (4.x).
        let rope_block = c
            .rope_parameters
            .as_ref()
            .or(c.rope_scaling.as_ref())
            .filter(|v| !v.is_null() && per_type.is_none());
        let (rotary_dim, longrope) = phi_rope(&c, arch, head_dim, rope_block)?;
        let rope_scaling = if longrope.is_some() {
            RopeScaling::None
        } else {
            rope_scaling
        };
        let attention_bias = c.attention_bias.unwrap_or(false);
        if arch == Arch::Phi3 && attention_bias {
            return Err(Error::InvalidArgument(
                "config field `attention_bias` is true, but phi3's qkv_proj and o_proj have no \
                 biases (transformers does not read the field for phi3)"
                    .into(),
            ));
        }

        let positive = |field: &str, v: f64| -> Result<f32> {
            if v.is_finite() && v > 0.0 {
                Ok(v as f32)
            } else {
                Err(Error::InvalidArgument(format!(
                    "config field `{field}` must be a positive number, got {v}"
                )))
            }
        };
        // Gemma 2's class defaults are 50 and 30 where the field is absent; null turns it off.
        let softcap = |field: &str, v: Option<Option<f64>>, default: Option<f64>| {
            v.unwrap_or(default).map(|x| positive(field, x)).transpose()
        };
        let switches = if arch.is_gemma() {
            let gemma2 = arch == Arch::Gemma2;
            let scalar = c.query_pre_attn_scalar.unwrap_or(256.0);
            positive("query_pre_attn_scalar", scalar)?;
            Switches {
                act,
                norm_unit_offset: true,
                sandwich_norms: true,
                // transformers: `hidden_size ** 0.5` as an f32 tensor, cast to the weights' dtype.
                embed_scale: Some((hidden_size as f64).sqrt() as f32),
                attn_scale: Some(scalar.powf(-0.5) as f32),
                attn_softcap: softcap(
                    "attn_logit_softcapping",
                    c.attn_logit_softcapping,
                    gemma2.then_some(50.0),
                )?,
                final_softcap: softcap(
                    "final_logit_softcapping",
                    c.final_logit_softcapping,
                    gemma2.then_some(30.0),
                )?,
                sliding_layers,
                rope_local: rope_local.filter(|_| arch == Arch::Gemma3),
                ..Switches::default()
            }
        } else {
            for (field, v) in [
                ("attn_logit_softcapping", c.attn_logit_softcapping),
                ("final_logit_softcapping", c.final_logit_softcapping),
            ] {
                if let Some(Some(x)) = v {
                    return Err(Error::InvalidArgument(format!(
                        "config field `{field}` is {x}: soft-capping is read for gemma2 and \
                         gemma3_text only, not {model_type}"
                    )));
                }
            }
            Switches {
                act,
                sliding_layers,
                fused_proj: arch == Arch::Phi3,
                ..Switches::default()
            }
        };
        let switches = Switches {
            rotary_dim,
            longrope,
            ..switches
        };
        // Phi3Config's default is 1e-5; the others' 1e-6.
        let rms_norm_eps = c
            .rms_norm_eps
            .unwrap_or(if arch == Arch::Phi3 { 1e-5 } else { 1e-6 });
        if rms_norm_eps.is_nan() || rms_norm_eps <= 0.0 {
            return Err(Error::InvalidArgument(format!(
                "config field `rms_norm_eps` must be positive, got {rms_norm_eps}"
            )));
        }
        Ok(LlamaConfig {
            arch,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            // Gemma's classes default to tied embeddings.
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(arch.is_gemma()),
            max_position_embeddings: c.max_position_embeddings.unwrap_or(match arch {
                Arch::Gemma2 => 8192,
                Arch::Gemma3 => 131_072,
                Arch::Phi3 => 4096,
                _ => 2048,
            }),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch != Arch::Qwen2 && attention_bias,
            sliding_window,
            dtype: c.dtype.or(c.torch_dtype),
            quantization_config: c.quantization_config.filter(|v| !v.is_null()),
            switches,
            multimodal: false,
        })
    }
}

/// A multimodal `gemma3` config (Gemma3ForConditionalGeneration): the language model's config
/// is `text_config` (a `gemma3_text` config; transformers' defaults where it is short), the
/// checkpoint's dtype and quantization block sit at the top, and tying is the top level's
/// `tie_word_embeddings` (transformers 5 reads that one; 4.x read the text config's: two that
/// disagree are refused). Errors name the field as `text_config.<field>`.
fn multimodal_text_config(c: HfConfig) -> Result<LlamaConfig> {
    let Some(mut text) = c.text_config.clone().filter(Value::is_object) else {
        return Err(Error::InvalidArgument(
            "model_type `gemma3` (multimodal) needs the language model's config in \
             `text_config`, and there is none"
                .into(),
        ));
    };
    let inner = text
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("gemma3_text")
        .to_string();
    if inner != "gemma3_text" {
        return Err(Error::InvalidArgument(format!(
            "config field `text_config.model_type` is `{inner}`: a gemma3 checkpoint's language \
             model must be gemma3_text"
        )));
    }
    text["model_type"] = Value::from("gemma3_text");
    let mut t: HfConfig = serde_json::from_value(text).map_err(|e| {
        Error::InvalidArgument(format!(
            "config field `text_config` is not a valid config: {e}"
        ))
    })?;
    t.dtype = t.dtype.or(c.dtype).or(c.torch_dtype.clone());
    t.torch_dtype = t.torch_dtype.or(c.torch_dtype);
    if t.quantization_config.is_none() {
        t.quantization_config = c.quantization_config;
    }
    match (c.tie_word_embeddings, t.tie_word_embeddings) {
        (Some(top), Some(inner)) if top != inner => {
            return Err(Error::InvalidArgument(format!(
                "config fields `tie_word_embeddings` ({top}) and \
                 `text_config.tie_word_embeddings` ({inner}) disagree: transformers 5 ties by \
                 the first and 4.x by the second"
            )))
        }
        (top, inner) => t.tie_word_embeddings = top.or(inner),
    }
    let cfg = LlamaConfig::try_from(t).map_err(|e| match e {
        Error::InvalidArgument(m) => {
            Error::InvalidArgument(m.replace("config field `", "config field `text_config."))
        }
        other => other,
    })?;
    Ok(LlamaConfig {
        multimodal: true,
        ..cfg
    })
}
