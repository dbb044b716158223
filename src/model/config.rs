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

use crate::error::{Error, Result};
use crate::ops::rope::RopeScaling;

/// `config.json` as transformers writes it (the fields this crate reads).
#[derive(Clone, Debug, Deserialize)]
pub struct HfConfig {
    /// `llama`, `mistral`, `qwen2` or `qwen3` (anything else is refused).
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
}

/// The accepted `model_type`s, for messages.
pub const SUPPORTED_MODEL_TYPES: &str = "llama, mistral, qwen2, qwen3";

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
    /// Mistral/Qwen2 sliding-window attention span, when enabled.
    pub sliding_window: Option<usize>,
    /// The checkpoint's `torch_dtype` / `dtype`, if stated.
    pub dtype: Option<String>,
    /// The `quantization_config` block of a pre-quantized checkpoint.
    pub quantization_config: Option<Value>,
}

impl LlamaConfig {
    /// Whether q and k pass through an RMSNorm per head before RoPE (Qwen3's `q_norm`/`k_norm`).
    pub fn qk_norm(&self) -> bool {
        self.arch == Arch::Qwen3
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
        let layer = attn + 3 * d * f + 2 * d;
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
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" => Ok(RopeScaling::None),
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
            "config field `{field}` has rope_type `{other}`: supported are default, linear and llama3"
        ))),
    }
}

impl TryFrom<HfConfig> for LlamaConfig {
    type Error = Error;

    fn try_from(c: HfConfig) -> Result<LlamaConfig> {
        let model_type = c.model_type.as_deref().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "config field `model_type` is missing (supported: {SUPPORTED_MODEL_TYPES})"
            ))
        })?;
        let arch = match model_type {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "model_type `{other}` is not supported (supported: {SUPPORTED_MODEL_TYPES})"
                )))
            }
        };
        if let Some(act) = c.hidden_act.as_deref() {
            if act != "silu" {
                return Err(Error::InvalidArgument(format!(
                    "config field `hidden_act` is `{act}`: only silu (SwiGLU) is supported"
                )));
            }
        }
        if c.mlp_bias == Some(true) {
            return Err(Error::InvalidArgument(
                "config field `mlp_bias` is true: MLP biases are not supported".into(),
            ));
        }
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
        // transformers 5: rope_parameters {rope_theta, rope_type, ...}; 4.x: rope_theta + rope_scaling.
        let defaults_theta = 10_000.0;
        let (rope_theta, rope_scaling) = match (&c.rope_parameters, &c.rope_scaling) {
            (Some(p), _) => (
                p.get("rope_theta")
                    .and_then(Value::as_f64)
                    .or(c.rope_theta)
                    .unwrap_or(defaults_theta),
                parse_rope_scaling(p, "rope_parameters")?,
            ),
            (None, Some(s)) if !s.is_null() => (
                c.rope_theta.unwrap_or(defaults_theta),
                parse_rope_scaling(s, "rope_scaling")?,
            ),
            _ => (c.rope_theta.unwrap_or(defaults_theta), RopeScaling::None),
        };
        let attention_bias = c.attention_bias.unwrap_or(false);
        let sliding_window = match arch {
            Arch::Mistral => c.sliding_window,
            Arch::Qwen2 | Arch::Qwen3 if c.use_sliding_window == Some(true) => c.sliding_window,
            _ => None,
        };
        // A layer listed as sliding makes the window apply (the attention here is full, so
        // sequences longer than the window are refused at run time); any other type is refused.
        let mut sliding_window = sliding_window;
        for (i, t) in c.layer_types.iter().flatten().enumerate() {
            match t.as_str() {
                "full_attention" => {}
                "sliding_attention" => {
                    sliding_window = Some(c.sliding_window.ok_or_else(|| {
                        Error::InvalidArgument(format!(
                            "config field `layer_types` lists layer {i} as sliding_attention but \
                             `sliding_window` is not set"
                        ))
                    })?);
                }
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "config field `layer_types` has `{other}` for layer {i}: supported are \
                         full_attention and sliding_attention"
                    )))
                }
            }
        }
        let rms_norm_eps = c.rms_norm_eps.unwrap_or(1e-6);
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
            rope_theta: rope_theta as f32,
            rope_scaling,
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
            max_position_embeddings: c.max_position_embeddings.unwrap_or(2048),
            qkv_bias: arch == Arch::Qwen2 || attention_bias,
            o_bias: arch != Arch::Qwen2 && attention_bias,
            sliding_window,
            dtype: c.dtype.or(c.torch_dtype),
            quantization_config: c.quantization_config.filter(|v| !v.is_null()),
        })
    }
}
