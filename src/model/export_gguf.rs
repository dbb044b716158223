//! `export-gguf`: a model folder, with an adapter folded in, as one GGUF file that llama.cpp
//! (and Ollama, LM Studio, anything built on it) loads — the inverse of
//! [`crate::model::import_gguf`].
//!
//! # Weights
//!
//! Each tensor is produced in f32 by [`MergedModel`] (`W + s·B·A` over the NF4-dequantized base
//! the adapter was trained on, exactly what `merge` computes; the model's own weights without an
//! adapter), rounded to bf16 as `merge` writes it (so the file holds what `merge`, llama.cpp's
//! converter and `llama-quantize` in turn would write; an `f32` file holds those bf16 values
//! exactly), renamed to llama.cpp's names, and encoded in its GGUF type, one tensor at a time:
//!
//! ```text
//! model.embed_tokens → token_embd      model.norm → output_norm      lm_head → output (untied)
//! layers.N.input_layernorm → blk.N.attn_norm    post_attention_layernorm → blk.N.ffn_norm
//! self_attn.{q,k,v}_proj → blk.N.attn_{q,k,v}   self_attn.o_proj → blk.N.attn_output
//! self_attn.{q,k}_norm → blk.N.attn_{q,k}_norm  mlp.{gate,up,down}_proj → blk.N.ffn_{gate,up,down}
//! ```
//!
//! Gemma 2 and Gemma 3 (`gemma2`, `gemma3`) have four norms per layer and store each norm as
//! `1 + w`, as llama.cpp's converter does (`Gemma2Model`/`Gemma3Model.modify_tensors`):
//!
//! ```text
//! input_layernorm → blk.N.attn_norm            post_attention_layernorm → blk.N.post_attention_norm
//! pre_feedforward_layernorm → blk.N.ffn_norm   post_feedforward_layernorm → blk.N.post_ffw_norm
//! ```
//!
//! Phi-3 (`phi3`) keeps its fused projections fused, as llama.cpp's converter
//! (`Phi3MiniModel`) does: `self_attn.qkv_proj → blk.N.attn_qkv`, `mlp.gate_up_proj →
//! blk.N.ffn_up` (`[gate; up]`, 2·intermediate rows, which llama.cpp's SwiGLU splits gate first),
//! and longrope's factors as the f32 tensors `rope_factors_long.weight` and
//! `rope_factors_short.weight` (rotary_dim/2 values each, written first, not rounded).
//!
//! Architectures: Llama and Mistral as llama.cpp's `llama`, Qwen2 as `qwen2`, Qwen3 as `qwen3`,
//! Gemma 2 as `gemma2`, Gemma 3 (`gemma3_text`) as `gemma3`, Phi-3/3.5 and Phi-4-mini as `phi3`.
//! For `llama`, whose RoPE rotates adjacent pairs, the rows of q (with `heads`) and k (with
//! `kv_heads`) — and their biases — are reordered as llama.cpp's converter does: viewing them
//! as `[n, 2, hd/2]` they are stored as `[n, hd/2, 2]`, i.e. GGUF row `h·hd + 2i + s` = HF row
//! `h·hd + s·hd/2 + i`. Qwen2/3 and Phi-3 rotate halves in llama.cpp too (NeoX order): no
//! reordering.
//! Llama 3 RoPE scaling becomes the `rope_freqs.weight` tensor (the divisor of each frequency),
//! linear scaling the `rope.scaling.*` keys.
//!
//! # Types
//!
//! `f32`, `f16` and `bf16` store every matrix in that type and vectors (norms, biases,
//! `rope_freqs`) in f32, as llama.cpp's converter does. The quantized types follow
//! `llama-quantize` (llama.cpp's `llama_tensor_get_type`) without an importance matrix:
//!
//! | `--type` | matrices | raised |
//! |---|---|---|
//! | `q8_0` | Q8_0 | |
//! | `q4_0` | Q4_0 | the output matrix: Q6_K |
//! | `q4_k_m` | Q4_K | output: Q6_K; `attn_v` and `ffn_down` of the layers `use_more_bits` picks: Q6_K |
//! | `q5_k_m` | Q5_K | the same as `q4_k_m` |
//! | `q6_k` | Q6_K | |
//!
//! where the output matrix is `output.weight`, or `token_embd.weight` when the embeddings are
//! tied; `use_more_bits(i, n)` = `i < n/8 ∨ i ≥ 7n/8 ∨ (i − n/8) mod 3 = 2`; a 70B-class model
//! (80 layers with grouped-query attention) gets Q5_K for a Q4_K `attn_v`. A fused `attn_qkv`
//! (Phi-3) is counted as an `attn_v`, as llama-quantize's `category_is_attn_v` does. A matrix whose rows
//! are not a whole number of the type's blocks falls back as llama.cpp's does: Q4_K → Q5_0,
//! Q5_K → Q5_1, Q6_K → Q8_0 (and F16 when rows are not a multiple of 32 either); for Q8_0 and
//! Q4_0 themselves, such a matrix is an error, as it is in llama.cpp. The encodings are
//! [`crate::quant::ggml_quants`], byte for byte llama.cpp's.
//!
//! # Metadata
//!
//! `general.*` (architecture, name, file_type, quantization_version), the hyperparameters under
//! the architecture's prefix (context_length, embedding_length, block_count,
//! feed_forward_length, attention.head_count(_kv), attention.key_length/value_length when
//! head_dim is not hidden/heads, attention.layer_norm_rms_epsilon, rope.freq_base,
//! rope.dimension_count, rope.scaling.*, vocab_size) and the tokenizer ([`vocab`]).
//!
//! For `gemma2`/`gemma3`, the keys of llama.cpp's converter (`gemma_metadata`): no
//! rope.dimension_count or vocab_size; the soft-caps (`attn_logit_softcapping` for gemma2,
//! `final_logit_softcapping`), `attention.sliding_window`, and for gemma3 `rope.freq_base_swa`
//! (the sliding layers' base) with `rope.scaling.*` of the global layers. Where the layers that
//! slide differ from llama.cpp's default (gemma2: every other from the first; gemma3: five of
//! every six), `attention.sliding_window_pattern` lists them (one bool per layer, which
//! llama.cpp reads). What llama.cpp's gemma2/gemma3 would run differently is refused by the
//! config field (`check_gemma`): it reads no attention scale but uses `1/√head_dim` (or
//! `1/√(hidden/heads)` at the 27B's layer count), so `query_pre_attn_scalar` must be that
//! value; gemma2 always ties the output to the embedding and always soft-caps both; gemma3
//! has no attention soft-cap and runs the sliding layers' RoPE unscaled.
//!
//! For `phi3`, the keys of `Phi3MiniModel.set_gguf_parameters` (no vocab_size or key_length):
//! `rope.dimension_count` the rotated width (`partial_rotary_factor`),
//! `rope.scaling.original_context_length`, `attention.sliding_window` (0 for none; llama.cpp's
//! `phi3` currently attends to the whole context, which the report warns of), and with longrope
//! `rope.scaling.attn_factor` (the model's attention factor). heads × head_dim must be the
//! hidden size (llama.cpp's `attn_output` is square). The tokenizer is byte-level BPE
//! ([`vocab`]) or SentencePiece ([`spm_vocab`], read from `tokenizer.model`).

pub mod sentencepiece;
pub mod special_vocab;
pub mod spm_vocab;
pub mod vocab;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use half::bf16;

use crate::error::{Error, Result};
use crate::io::adapters;
use crate::io::export::MergedModel;
use crate::model::config::{Arch, LlamaConfig};
use crate::model::import_gguf::{reorder_rope_rows, RopeRows};
use crate::ops::rope::{self, RopeScaling};
use crate::quant::ggml_quants;
use crate::quant::gguf::{GgmlType, Value};
use crate::quant::gguf_write::{self, GgufWriter, PlannedTensor};

/// The file types `export-gguf` writes (llama.cpp's `llama_ftype`s of the same names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufType {
    /// Every matrix in f32.
    F32,
    /// Every matrix in IEEE half.
    F16,
    /// Every matrix in bfloat16.
    Bf16,
    /// 8-bit blocks of 32.
    Q8_0,
    /// 4-bit blocks of 32 (output matrix Q6_K).
    Q4_0,
    /// 4-bit k-quants with the sensitive matrices in 6 bits.
    Q4KM,
    /// 5-bit k-quants with the sensitive matrices in 6 bits.
    Q5KM,
    /// 6-bit k-quants.
    Q6K,
}

impl GgufType {
    /// Every type, in the order `--help` lists them.
    pub const ALL: [GgufType; 8] = [
        GgufType::F32,
        GgufType::F16,
        GgufType::Bf16,
        GgufType::Q8_0,
        GgufType::Q4_0,
        GgufType::Q4KM,
        GgufType::Q5KM,
        GgufType::Q6K,
    ];

    /// The name on the command line (llama-quantize's, lower case).
    pub fn name(self) -> &'static str {
        match self {
            GgufType::F32 => "f32",
            GgufType::F16 => "f16",
            GgufType::Bf16 => "bf16",
            GgufType::Q8_0 => "q8_0",
            GgufType::Q4_0 => "q4_0",
            GgufType::Q4KM => "q4_k_m",
            GgufType::Q5KM => "q5_k_m",
            GgufType::Q6K => "q6_k",
        }
    }

    /// `general.file_type` (llama.cpp's `llama_ftype` value).
    fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q4_0 => 2,
            GgufType::Q8_0 => 7,
            GgufType::Q4KM => 15,
            GgufType::Q5KM => 17,
            GgufType::Q6K => 18,
            GgufType::Bf16 => 32,
        }
    }

    /// The ggml type of a matrix before the per-tensor rules.
    fn default_type(self) -> GgmlType {
        match self {
            GgufType::F32 => GgmlType::F32,
            GgufType::F16 => GgmlType::F16,
            GgufType::Bf16 => GgmlType::BF16,
            GgufType::Q8_0 => GgmlType::Q8_0,
            GgufType::Q4_0 => GgmlType::Q4_0,
            GgufType::Q4KM => GgmlType::Q4_K,
            GgufType::Q5KM => GgmlType::Q5_K,
            GgufType::Q6K => GgmlType::Q6_K,
        }
    }

    fn is_quantized(self) -> bool {
        !matches!(self, GgufType::F32 | GgufType::F16 | GgufType::Bf16)
    }
}

impl fmt::Display for GgufType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for GgufType {
    type Err = Error;
    fn from_str(s: &str) -> Result<GgufType> {
        GgufType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<&str> = GgufType::ALL.iter().map(|t| t.name()).collect();
                Error::InvalidArgument(format!(
                    "unknown GGUF type `{s}`: expected one of {}",
                    names.join(", ")
                ))
            })
    }
}

/// What to export.
#[derive(Clone, Debug)]
pub struct ExportGguf {
    /// The Hugging Face model folder (the base the adapter was trained on).
    pub model: PathBuf,
    /// The PEFT adapter folder to fold in, if any.
    pub adapter: Option<PathBuf>,
    /// The `.gguf` file to write.
    pub output: PathBuf,
    /// Its type.
    pub ty: GgufType,
    /// Replace `output` if it exists.
    pub overwrite: bool,
    /// Fold the adapter into the unquantized weights instead of the NF4 base it was trained on.
    pub onto_original: bool,
    /// Accept an adapter whose `base_model_name_or_path` names another model.
    pub allow_other_base: bool,
}

/// What [`export_gguf`] wrote.
#[derive(Clone, Debug)]
pub struct GgufReport {
    /// llama.cpp's architecture name.
    pub arch: &'static str,
    /// The file type.
    pub ty: GgufType,
    /// Tensors written, by ggml type name.
    pub tensors_by_type: BTreeMap<String, usize>,
    /// Tensors that fell back to another type, with the reason.
    pub fallbacks: Vec<String>,
    /// Projections with an adapter folded in.
    pub merged: usize,
    /// File size in bytes.
    pub bytes: u64,
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece).
    pub tokenizer_model: String,
    /// `tokenizer.ggml.pre`, tokens, control tokens, whether a chat template was written.
    pub tokenizer: (String, usize, usize, bool),
    /// Named warnings (settings llama.cpp will not apply).
    pub warnings: Vec<String>,
    /// The file written.
    pub path: PathBuf,
}

impl fmt::Display for GgufReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let types: Vec<String> = self
            .tensors_by_type
            .iter()
            .map(|(t, n)| format!("{n} {t}"))
            .collect();
        let n: usize = self.tensors_by_type.values().sum();
        writeln!(
            f,
            "{} ({}): {n} tensors ({}), {} adapted projection(s) merged",
            self.arch,
            self.ty,
            types.join(", "),
            self.merged
        )?;
        if !self.fallbacks.is_empty() {
            writeln!(
                f,
                "{} tensor(s) fell back to another type, as llama-quantize does: {}",
                self.fallbacks.len(),
                summarize(&self.fallbacks)
            )?;
        }
        let (pre, tokens, control, template) = &self.tokenizer;
        let kind = if self.tokenizer_model == "llama" {
            "SentencePiece (with scores)".to_string()
        } else {
            format!("byte-level BPE `{pre}`")
        };
        writeln!(
            f,
            "tokenizer: {kind}, {tokens} tokens ({control} control){}",
            if *template { ", chat template" } else { "" }
        )?;
        write!(
            f,
            "wrote {} ({:.1} MiB)",
            self.path.display(),
            self.bytes as f64 / (1u64 << 20) as f64
        )
    }
}

/// The first few of a list, then a count.
fn summarize(items: &[String]) -> String {
    let shown: Vec<&str> = items.iter().take(3).map(String::as_str).collect();
    if items.len() > shown.len() {
        format!(
            "{}, … ({} more)",
            shown.join("; "),
            items.len() - shown.len()
        )
    } else {
        shown.join("; ")
    }
}

/// llama.cpp's architecture of a config, with the settings it will not apply as warnings.
fn arch_of(cfg: &LlamaConfig, model: &Path) -> Result<(&'static str, Vec<String>)> {
    let mut warnings = Vec::new();
    let arch = match cfg.arch {
        Arch::Llama | Arch::Mistral => "llama",
        Arch::Qwen2 => "qwen2",
        Arch::Qwen3 => "qwen3",
        Arch::Gemma2 => "gemma2",
        Arch::Gemma3 => "gemma3",
        Arch::Phi3 => {
            check_phi3(cfg, &model.join("config.json"))?;
            "phi3"
        }
    };
    if cfg.arch.is_gemma() {
        check_gemma(cfg, &model.join("config.json"))?;
    } else if let Some(w) = cfg.sliding_window {
        if w < cfg.max_position_embeddings {
            warnings.push(format!(
                "{}: sliding_window {w}: llama.cpp's `{arch}` attends to the whole context \
                 (as every GGUF of this model does)",
                model.join("config.json").display()
            ));
        }
    }
    if cfg.o_bias && arch != "llama" {
        return Err(Error::InvalidArgument(format!(
            "{}: llama.cpp's `{arch}` has no bias on the attention output (o_proj.bias, from \
             attention_bias: true): it would refuse the file",
            model.join("config.json").display()
        )));
    }
    if cfg.arch == Arch::Qwen2 && !cfg.qkv_bias {
        return Err(Error::InvalidArgument(format!(
            "{}: a Qwen2 model without q/k/v biases cannot be written as llama.cpp's `qwen2`, \
             which requires them",
            model.display()
        )));
    }
    Ok((arch, warnings))
}

/// Refuses what llama.cpp's `phi3` cannot hold: its attention output is `[hidden, hidden]`
/// (`llama_model_phi3::load_arch_tensors`), so heads × head_dim must be the hidden size, and
/// its only rope scaling is longrope's factor tensors.
fn check_phi3(cfg: &LlamaConfig, path: &Path) -> Result<()> {
    let refuse = |msg: String| Err(Error::InvalidArgument(format!("{}: {msg}", path.display())));
    if cfg.num_heads * cfg.head_dim != cfg.hidden_size {
        return refuse(format!(
            "head_dim {} × num_attention_heads {} is not hidden_size {}: llama.cpp's `phi3` \
             takes the attention width to be the hidden size",
            cfg.head_dim, cfg.num_heads, cfg.hidden_size
        ));
    }
    if cfg.rope_scaling != RopeScaling::None {
        return refuse(format!(
            "rope scaling {:?}: llama.cpp's `phi3` reads longrope's factor tensors only",
            cfg.rope_scaling
        ));
    }
    if cfg.qkv_bias || cfg.o_bias {
        return refuse("attention biases: llama.cpp's `phi3` has none".into());
    }
    Ok(())
}

/// The layer count llama.cpp takes for the 27B model of `gemma2`/`gemma3`, whose attention
/// scale it computes from `n_embd / n_head` instead of the head width
/// (`llama_model_gemma2/3::load_arch_hparams`).
pub(crate) fn gemma_27b_layers(arch: Arch) -> usize {
    if arch == Arch::Gemma2 {
        46
    } else {
        62
    }
}

/// The attention scale llama.cpp's `gemma2`/`gemma3` use: it reads none from the file but
/// hard-codes `1/√head_dim`, or `1/√(hidden/heads)` for the 27B layer count — i.e. the
/// `query_pre_attn_scalar` it assumes.
pub(crate) fn gemma_query_pre_attn_scalar(
    arch: Arch,
    layers: usize,
    hidden: usize,
    heads: usize,
    head_dim: usize,
) -> usize {
    if layers == gemma_27b_layers(arch) {
        hidden / heads
    } else {
        head_dim
    }
}

/// llama.cpp's sliding-window layers when the file names no pattern: `gemma2` every other
/// layer from the first (pattern 2), `gemma3` five of every six (pattern 6) — the layers
/// `i mod n < n − 1` (`llama_hparams::set_swa_pattern`).
pub(crate) fn gemma_default_sliding(arch: Arch, layers: usize) -> Vec<bool> {
    let n = if arch == Arch::Gemma2 { 2 } else { 6 };
    (0..layers).map(|i| i % n < n - 1).collect()
}

/// Refuses, by the config field, what llama.cpp's `gemma2`/`gemma3` cannot run as the
/// Hugging Face model does.
fn check_gemma(cfg: &LlamaConfig, path: &Path) -> Result<()> {
    let refuse = |msg: String| Err(Error::InvalidArgument(format!("{}: {msg}", path.display())));
    let arch = if cfg.arch == Arch::Gemma2 {
        "gemma2"
    } else {
        "gemma3"
    };
    let sw = &cfg.switches;
    let assumed = gemma_query_pre_attn_scalar(
        cfg.arch,
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.head_dim,
    );
    let scale = 1.0 / (assumed as f32).sqrt();
    if (cfg.attn_scale() - scale).abs() > 1e-6 * scale {
        // The config's value back from the f32 scale (to 4 decimals: 20, not 20.0000005).
        let scalar = (1e4 / (cfg.attn_scale() as f64).powi(2)).round() / 1e4;
        let why = if cfg.num_layers == gemma_27b_layers(cfg.arch) {
            format!(
                "hidden_size / num_attention_heads = {assumed} for its {} layers (its 27B)",
                cfg.num_layers
            )
        } else {
            format!("head_dim = {assumed}")
        };
        return refuse(format!(
            "query_pre_attn_scalar {scalar}: llama.cpp's `{arch}` reads no attention scale \
             from the file and scales by 1/√({why}), so the model would run with another \
             attention scale"
        ));
    }
    if cfg.arch == Arch::Gemma2 {
        if !cfg.tie_word_embeddings {
            return refuse(
                "tie_word_embeddings is false: llama.cpp's `gemma2` always uses the embedding \
                 matrix as the output matrix (it has no output.weight)"
                    .into(),
            );
        }
        for (field, v, default) in [
            ("attn_logit_softcapping", sw.attn_softcap, 50),
            ("final_logit_softcapping", sw.final_softcap, 30),
        ] {
            if v.is_none() {
                return refuse(format!(
                    "{field} is null: llama.cpp's `gemma2` always soft-caps (with {default} \
                     where the file gives no value)"
                ));
            }
        }
    } else if let Some(c) = sw.attn_softcap {
        return refuse(format!(
            "attn_logit_softcapping {c}: llama.cpp's `gemma3` has no soft-capping of attention \
             scores (its converter asserts it is null)"
        ));
    }
    match cfg.rope_scaling {
        RopeScaling::None | RopeScaling::Linear { .. } => {}
        RopeScaling::Llama3 { .. } => {
            return refuse(format!(
                "rope scaling llama3: llama.cpp's `{arch}` reads no rope_freqs tensor"
            ))
        }
    }
    if let Some((_, scaling)) = sw.rope_local {
        if scaling != RopeScaling::None {
            return refuse(format!(
                "the sliding layers' rope scaling ({scaling:?}): llama.cpp's `{arch}` scales \
                 only the global layers' RoPE (rope.scaling.*); the sliding ones run unscaled"
            ));
        }
    }
    Ok(())
}

/// The GGUF name of a Hugging Face tensor name (`None`: not written; error: unknown).
fn gguf_name(hf: &str, cfg: &LlamaConfig) -> Result<Option<String>> {
    Ok(Some(match hf {
        "model.embed_tokens.weight" => "token_embd.weight".into(),
        "model.norm.weight" => "output_norm.weight".into(),
        "lm_head.weight" if cfg.tie_word_embeddings => return Ok(None),
        "lm_head.weight" => "output.weight".into(),
        _ => {
            let err = || {
                Error::InvalidArgument(format!(
                    "tensor `{hf}` has no counterpart in llama.cpp's {:?} model",
                    cfg.arch
                ))
            };
            let rest = hf.strip_prefix("model.layers.").ok_or_else(err)?;
            let (layer, part) = rest.split_once('.').ok_or_else(err)?;
            let l: usize = layer.parse().map_err(|_| err())?;
            if part.ends_with("rotary_emb.inv_freq") {
                return Ok(None);
            }
            let (module, kind) = part.rsplit_once('.').ok_or_else(err)?;
            let gemma = cfg.arch.is_gemma();
            let g = match module {
                "input_layernorm" => "attn_norm",
                // Gemma's four norms (llama.cpp's tensor_mapping: ATTN_POST_NORM,
                // FFN_PRE_NORM, FFN_POST_NORM).
                "post_attention_layernorm" if gemma => "post_attention_norm",
                "pre_feedforward_layernorm" if gemma => "ffn_norm",
                "post_feedforward_layernorm" if gemma => "post_ffw_norm",
                "post_attention_layernorm" => "ffn_norm",
                "self_attn.q_norm" | "self_attn.k_norm" if !cfg.qk_norm() => return Err(err()),
                // Phi-3's fused projections, kept fused (llama.cpp's `phi3` reads ffn_up as
                // [gate; up], 2·intermediate rows, gate first).
                "self_attn.qkv_proj" if cfg.switches.fused_proj => "attn_qkv",
                "mlp.gate_up_proj" if cfg.switches.fused_proj => "ffn_up",
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "self_attn.q_norm" => "attn_q_norm",
                "self_attn.k_norm" => "attn_k_norm",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                _ => return Err(err()),
            };
            let biased = match g {
                "attn_q" | "attn_k" | "attn_v" => cfg.qkv_bias,
                "attn_output" => cfg.o_bias,
                _ => false,
            };
            if kind == "bias" && !biased {
                return Err(Error::InvalidArgument(format!(
                    "tensor `{hf}`: config.json says this projection has no bias \
                     (attention_bias), so llama.cpp would not read it"
                )));
            }
            if kind != "weight" && kind != "bias" {
                return Err(err());
            }
            format!("blk.{l}.{g}.{kind}")
        }
    }))
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third
/// between.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// The layer index of a `blk.N.…` name.
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// The ggml type of one tensor, and the fallback note when llama.cpp's shape rule applied.
fn tensor_type(
    ty: GgufType,
    name: &str,
    shape: &[usize],
    cfg: &LlamaConfig,
    tied: bool,
) -> Result<(GgmlType, Option<String>)> {
    if shape.len() < 2 || !name.ends_with("weight") || name.contains("_norm.weight") {
        return Ok((GgmlType::F32, None));
    }
    if !ty.is_quantized() {
        return Ok((ty.default_type(), None));
    }
    let default = ty.default_type();
    let cols = shape[shape.len() - 1];
    let block = default.block_size().expect("a known type");
    let is_output = name == "output.weight" || (tied && name == "token_embd.weight");
    let k_m = matches!(ty, GgufType::Q4KM | GgufType::Q5KM);
    let n = cfg.num_layers;
    let mut t = default;
    if is_output {
        t = if !cols.is_multiple_of(block) {
            GgmlType::Q8_0
        } else if default != GgmlType::Q8_0 {
            GgmlType::Q6_K
        } else {
            GgmlType::Q8_0
        };
    } else if name.ends_with("attn_v.weight") || name.ends_with("attn_qkv.weight") {
        // llama-quant.cpp counts a fused attn_qkv as an attn_v (`category_is_attn_v`).
        let i = layer_of(name).unwrap_or(0);
        if k_m && use_more_bits(i, n) {
            t = GgmlType::Q6_K;
        }
        // llama.cpp's LLM_TYPE_70B (its gemma2/gemma3 have no such type).
        let seventy_b = n == 80
            && !cfg.arch.is_gemma()
            && cfg.arch != Arch::Phi3
            && (cfg.arch != Arch::Llama || cfg.num_kv_heads != cfg.num_heads);
        if seventy_b && t == GgmlType::Q4_K {
            t = GgmlType::Q5_K;
        }
    } else if name.ends_with("ffn_down.weight") {
        let i = layer_of(name).unwrap_or(0);
        if k_m && use_more_bits(i, n) {
            t = GgmlType::Q6_K;
        }
    }
    let qk = t.block_size().expect("a known type");
    if cols.is_multiple_of(qk) {
        return Ok((t, None));
    }
    let fallback = match t {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        _ => {
            return Err(Error::InvalidArgument(format!(
                "tensor `{name}` {shape:?}: rows of {cols} values are not a multiple of {qk}, \
                 which {t} needs (llama.cpp has no fallback for it either); choose f16, bf16 or \
                 f32"
            )))
        }
    };
    let (fallback, why) = if cols.is_multiple_of(32) {
        (fallback, format!("{cols} not divisible by {qk}"))
    } else {
        (GgmlType::F16, format!("{cols} not divisible by 32"))
    };
    Ok((fallback, Some(format!("{name} {t} → {fallback} ({why})"))))
}

/// A tensor to write: its source and how to transform it.
struct Item {
    planned: PlannedTensor,
    /// The Hugging Face tensor, or `None` for `rope_freqs.weight` and Phi-3's longrope factors.
    source: Option<String>,
    /// Values computed here (`rope_factors_{long,short}.weight`), written as they are (f32,
    /// not rounded to bf16, as llama.cpp's converter writes them).
    values: Option<Vec<f32>>,
    /// Reorder rows for llama.cpp's RoPE with this many heads.
    permute_heads: Option<usize>,
    /// A Gemma norm: llama.cpp stores `1 + w` (its converter's `+ 1` on every `norm.weight`).
    unit_offset: bool,
}

/// Refuses, before any work, an output that exists (without `overwrite`) or a folder that
/// cannot be written.
fn check_output(output: &Path, overwrite: bool) -> Result<()> {
    if output.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "--output {} is a folder; give a file name such as model-q4_k_m.gguf",
            output.display()
        )));
    }
    if output.exists() && !overwrite {
        return Err(Error::InvalidArgument(format!(
            "{} exists; pass --overwrite to replace it",
            output.display()
        )));
    }
    let probe = gguf_write::temp_path(output);
    std::fs::write(&probe, b"").map_err(|source| Error::Io {
        path: probe.clone(),
        source,
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Writes the GGUF file; `progress(done, total, name)` is called after each tensor.
pub fn export_gguf(
    opts: &ExportGguf,
    mut progress: impl FnMut(usize, usize, &str),
) -> Result<GgufReport> {
    check_output(&opts.output, opts.overwrite)?;
    if let Some(adapter) = &opts.adapter {
        if !opts.allow_other_base {
            if let Some(named) = adapters::other_base(&opts.model, adapter) {
                return Err(Error::InvalidArgument(format!(
                    "{}: the adapter was trained on `{named}`, not on {}; pass \
                     --allow-other-base if that folder holds the same model",
                    adapter.join(adapters::CONFIG_FILE).display(),
                    opts.model.display()
                )));
            }
        }
    }
    let model = MergedModel::open(&opts.model, opts.adapter.as_deref(), opts.onto_original)?;
    let cfg = model.cfg.clone();
    let (arch, mut warnings) = arch_of(&cfg, &opts.model)?;
    let config_json = vocab::read_json(&opts.model.join("config.json"))?;
    let vocab = vocab::read(&opts.model, cfg.vocab_size, &config_json, arch)?;
    warnings.extend(vocab.warnings.iter().cloned());

    let mut items = Vec::new();
    let mut fallbacks = Vec::new();
    let tied = cfg.tie_word_embeddings;
    let mut sources = model.tensors()?;
    // llama.cpp's order: embeddings, layers in order, then the final norm and output.
    sources.sort_by_key(|(n, _)| {
        let layer = n
            .strip_prefix("model.layers.")
            .and_then(|r| r.split('.').next())
            .and_then(|l| l.parse::<usize>().ok());
        match (n.as_str(), layer) {
            ("model.embed_tokens.weight", _) => (0, 0),
            (_, Some(l)) => (1, l),
            _ => (2, 0),
        }
    });
    // A multimodal checkpoint: the GGUF holds its language model, as llama.cpp's converter
    // writes it (the vision tower and projector go to a separate mmproj file, which this
    // command does not write).
    let (outside, sources): (Vec<_>, Vec<_>) = sources
        .into_iter()
        .partition(|(n, _)| model.outside_text_model(n));
    if !outside.is_empty() {
        warnings.push(format!(
            "the vision tower and projector ({} tensors) are not exported: the GGUF holds the \
             language model, for text; llama.cpp keeps a vision tower in a separate mmproj file \
             (its converter's --mmproj), which this command does not write",
            outside.len()
        ));
    }
    for (hf, shape) in sources {
        let Some(name) = gguf_name(&hf, &cfg)? else {
            continue;
        };
        let (ty, fallback) = tensor_type(opts.ty, &name, &shape, &cfg, tied)?;
        fallbacks.extend(fallback);
        let permute_heads = match (arch, name.split('.').nth(2)) {
            ("llama", Some("attn_q")) => Some(cfg.num_heads),
            ("llama", Some("attn_k")) => Some(cfg.num_kv_heads),
            _ => None,
        };
        let unit_offset = cfg.switches.norm_unit_offset && hf.ends_with("norm.weight");
        items.push(Item {
            planned: PlannedTensor { name, shape, ty },
            source: Some(hf),
            values: None,
            permute_heads,
            unit_offset,
        });
    }
    // rope_freqs right after token_embd, which the sort put first (as llama.cpp's converter).
    if let RopeScaling::Llama3 { .. } = cfg.rope_scaling {
        let rope_freqs = Item {
            planned: PlannedTensor {
                name: "rope_freqs.weight".into(),
                shape: vec![cfg.head_dim / 2],
                ty: GgmlType::F32,
            },
            source: None,
            values: None,
            permute_heads: None,
            unit_offset: false,
        };
        items.insert(items.len().min(1), rope_freqs);
    }
    // Phi-3's longrope factors, first (as llama.cpp's converter, which yields them before the
    // model's tensors).
    if let Some(lr) = &cfg.switches.longrope {
        for (i, (name, f)) in [
            ("rope_factors_long.weight", &lr.long_factor),
            ("rope_factors_short.weight", &lr.short_factor),
        ]
        .into_iter()
        .enumerate()
        {
            let item = Item {
                planned: PlannedTensor {
                    name: name.into(),
                    shape: vec![f.len()],
                    ty: GgmlType::F32,
                },
                source: None,
                values: Some(f.clone()),
                permute_heads: None,
                unit_offset: false,
            };
            items.insert(i, item);
        }
    }

    let mut w = GgufWriter::default();
    let name = config_json["_name_or_path"]
        .as_str()
        .map(str::to_string)
        .filter(|s| !s.is_empty())
        .or_else(|| {
            opts.model
                .canonicalize()
                .ok()?
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "model".into());
    w.set("general.architecture", Value::String(arch.into()));
    w.set("general.type", Value::String("model".into()));
    w.set("general.name", Value::String(name));
    let key = |k: &str| format!("{arch}.{k}");
    let u32v = |x: usize| Value::U32(x as u32);
    if cfg.arch.is_gemma() {
        gemma_metadata(&mut w, &cfg, arch, opts.ty);
    } else if cfg.arch == Arch::Phi3 {
        phi3_metadata(&mut w, &cfg, opts.ty);
    } else {
        w.set(&key("block_count"), u32v(cfg.num_layers));
        w.set(&key("context_length"), u32v(cfg.max_position_embeddings));
        w.set(&key("embedding_length"), u32v(cfg.hidden_size));
        w.set(&key("feed_forward_length"), u32v(cfg.intermediate_size));
        w.set(&key("attention.head_count"), u32v(cfg.num_heads));
        w.set(&key("attention.head_count_kv"), u32v(cfg.num_kv_heads));
        w.set(&key("rope.freq_base"), Value::F32(cfg.rope_theta));
        w.set(
            &key("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        );
        if cfg.head_dim * cfg.num_heads != cfg.hidden_size || cfg.arch == Arch::Qwen3 {
            w.set(&key("attention.key_length"), u32v(cfg.head_dim));
            w.set(&key("attention.value_length"), u32v(cfg.head_dim));
        }
        w.set("general.file_type", Value::U32(opts.ty.file_type()));
        w.set(&key("vocab_size"), u32v(cfg.vocab_size));
        w.set(&key("rope.dimension_count"), u32v(cfg.head_dim));
        if let RopeScaling::Linear { factor } = cfg.rope_scaling {
            w.set(&key("rope.scaling.type"), Value::String("linear".into()));
            w.set(&key("rope.scaling.factor"), Value::F32(factor));
        }
    }
    for (k, v) in &vocab.metadata {
        w.set(k, v.clone());
    }
    w.set("general.quantization_version", Value::U32(2));
    w.tensors = items.iter().map(|i| i.planned.clone()).collect();

    let total = items.len();
    let mut merged = 0;
    let bytes = w.write(&opts.output, |i| {
        let item = &items[i];
        let p = &item.planned;
        if let Some(values) = &item.values {
            progress(i + 1, total, &p.name);
            return ggml_quants::quantize(p.ty, values, values.len());
        }
        let mut x = match &item.source {
            Some(hf) => {
                let (x, adapted) = model.tensor(hf, &p.shape)?;
                merged += usize::from(adapted);
                x
            }
            None => rope_divisors(&cfg),
        };
        // The values `merge` writes (bf16), so that the file holds what merge followed by
        // llama.cpp's converter and llama-quantize would write.
        for v in x.iter_mut() {
            *v = bf16::from_f32(*v).to_f32();
        }
        // Gemma's `(1 + w)` norms as llama.cpp stores them. Added in f32 to the bf16 value
        // (exact for |w| ≥ 2^-16; llama.cpp's converter, run on a bf16 folder, adds in bf16
        // and rounds 1 + w to 2^-7).
        if item.unit_offset {
            for v in x.iter_mut() {
                *v += 1.0;
            }
        }
        if let Some(heads) = item.permute_heads {
            let cols = if p.shape.len() == 2 { p.shape[1] } else { 1 };
            x = reorder_rope_rows(&x, cols, heads, RopeRows::ToLlamaCpp);
        }
        let cols = *p.shape.last().expect("a shape");
        let data = ggml_quants::quantize(p.ty, &x, cols)?;
        progress(i + 1, total, &p.name);
        Ok(data)
    })?;
    let mut tensors_by_type = BTreeMap::new();
    for i in &items {
        *tensors_by_type.entry(i.planned.ty.name()).or_insert(0) += 1;
    }
    Ok(GgufReport {
        arch,
        ty: opts.ty,
        tensors_by_type,
        fallbacks,
        merged,
        bytes,
        tokenizer_model: vocab.model.into(),
        tokenizer: (vocab.pre, vocab.tokens, vocab.control, vocab.chat_template),
        warnings,
        path: opts.output.clone(),
    })
}

/// The `gemma2.*` / `gemma3.*` hyperparameters as llama.cpp's converter writes them
/// (`Gemma2Model.set_gguf_parameters`; `Gemma3Model.set_gguf_parameters` over
/// `TextModel.set_gguf_parameters`), plus what llama.cpp reads but that converter leaves out
/// where the model needs it: `rope.freq_base` and `rope.scaling.*` of a Gemma 2 off the
/// defaults, and `attention.sliding_window_pattern` (one bool per layer, as the converters of
/// other architectures write it) where the layers that slide are not llama.cpp's default.
fn gemma_metadata(w: &mut GgufWriter, cfg: &LlamaConfig, arch: &str, ty: GgufType) {
    let key = |k: &str| format!("{arch}.{k}");
    let u32v = |x: usize| Value::U32(x as u32);
    let sw = &cfg.switches;
    let gemma2 = cfg.arch == Arch::Gemma2;
    if !gemma2 {
        w.set(&key("block_count"), u32v(cfg.num_layers));
    }
    w.set(&key("context_length"), u32v(cfg.max_position_embeddings));
    w.set(&key("embedding_length"), u32v(cfg.hidden_size));
    if gemma2 {
        w.set(&key("block_count"), u32v(cfg.num_layers));
    }
    w.set(&key("feed_forward_length"), u32v(cfg.intermediate_size));
    w.set(&key("attention.head_count"), u32v(cfg.num_heads));
    w.set(&key("attention.head_count_kv"), u32v(cfg.num_kv_heads));
    let scaled = |w: &mut GgufWriter| {
        if let RopeScaling::Linear { factor } = cfg.rope_scaling {
            w.set(&key("rope.scaling.type"), Value::String("linear".into()));
            w.set(&key("rope.scaling.factor"), Value::F32(factor));
        }
    };
    if gemma2 {
        if cfg.rope_theta != 10_000.0 {
            w.set(&key("rope.freq_base"), Value::F32(cfg.rope_theta));
        }
        scaled(w);
    } else {
        scaled(w);
        w.set(&key("rope.freq_base"), Value::F32(cfg.rope_theta));
        if let Some((theta, _)) = sw.rope_local {
            w.set(&key("rope.freq_base_swa"), Value::F32(theta));
        }
    }
    w.set(
        &key("attention.layer_norm_rms_epsilon"),
        Value::F32(cfg.rms_norm_eps as f32),
    );
    w.set(&key("attention.key_length"), u32v(cfg.head_dim));
    w.set(&key("attention.value_length"), u32v(cfg.head_dim));
    w.set("general.file_type", Value::U32(ty.file_type()));
    if let Some(c) = sw.attn_softcap {
        w.set(&key("attn_logit_softcapping"), Value::F32(c));
    }
    if let Some(c) = sw.final_softcap {
        w.set(&key("final_logit_softcapping"), Value::F32(c));
    }
    // Which layers slide, as llama.cpp will take them.
    let sliding: Vec<bool> = (0..cfg.num_layers)
        .map(|l| cfg.window(l).is_some())
        .collect();
    if let Some(window) = cfg.sliding_window {
        w.set(&key("attention.sliding_window"), u32v(window));
    }
    // Without a window gemma3 attends to the whole context in every layer; gemma2 still
    // slides its default layers (over 4096 tokens), so it needs the all-false pattern.
    let needs_pattern = if cfg.sliding_window.is_none() {
        gemma2
    } else {
        sliding != gemma_default_sliding(cfg.arch, cfg.num_layers)
    };
    if needs_pattern {
        w.set(
            &key("attention.sliding_window_pattern"),
            Value::Array(sliding.into_iter().map(Value::Bool).collect()),
        );
    }
}

/// The `phi3.*` hyperparameters as llama.cpp's converter writes them
/// (`Phi3MiniModel.set_gguf_parameters` and, for longrope, `generate_extra_tensors`'s
/// `rope.scaling.attn_factor`). `attention.sliding_window` is written as the converter does (0
/// for none), though llama.cpp's `phi3` does not slide (it attends to the whole context).
/// The attention factor is the one the model runs with (the config's, or transformers' default
/// `√(1 + ln s / ln L)`, which is what the converter computes).
fn phi3_metadata(w: &mut GgufWriter, cfg: &LlamaConfig, ty: GgufType) {
    let key = |k: &str| format!("phi3.{k}");
    let u32v = |x: usize| Value::U32(x as u32);
    let lr = cfg.switches.longrope.as_ref();
    w.set(&key("context_length"), u32v(cfg.max_position_embeddings));
    let original = lr.map_or(cfg.max_position_embeddings, |l| {
        l.original_max_position_embeddings
    });
    w.set(&key("rope.scaling.original_context_length"), u32v(original));
    w.set(&key("embedding_length"), u32v(cfg.hidden_size));
    w.set(&key("feed_forward_length"), u32v(cfg.intermediate_size));
    w.set(&key("block_count"), u32v(cfg.num_layers));
    w.set(&key("attention.head_count"), u32v(cfg.num_heads));
    w.set(&key("attention.head_count_kv"), u32v(cfg.num_kv_heads));
    w.set(
        &key("attention.layer_norm_rms_epsilon"),
        Value::F32(cfg.rms_norm_eps as f32),
    );
    w.set(&key("rope.dimension_count"), u32v(cfg.rotary_dim()));
    w.set(&key("rope.freq_base"), Value::F32(cfg.rope_theta));
    w.set("general.file_type", Value::U32(ty.file_type()));
    w.set(
        &key("attention.sliding_window"),
        u32v(cfg.sliding_window.unwrap_or(0)),
    );
    if let Some(lr) = lr {
        w.set(
            &key("rope.scaling.attn_factor"),
            Value::F32(lr.attention_factor),
        );
    }
}

/// Llama 3 scaling as llama.cpp applies it: each frequency's divisor (`rope_freqs.weight`).
fn rope_divisors(cfg: &LlamaConfig) -> Vec<f32> {
    let base = rope::inv_freq(cfg.head_dim, cfg.rope_theta, RopeScaling::None);
    let scaled = rope::inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling);
    base.iter().zip(&scaled).map(|(b, s)| b / s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_more_bits_picks_llama_cpps_layers() {
        // 30 layers: n/8 = 3, 7n/8 = 26.
        let picked: Vec<usize> = (0..30).filter(|&i| use_more_bits(i, 30)).collect();
        assert_eq!(
            picked,
            vec![0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
        );
    }

    #[test]
    fn permuted_rows_interleave_each_heads_halves() {
        // 2 heads of 4 rows, one column: HF [a0 a1 b0 b1] per head → [a0 b0 a1 b1].
        let w: Vec<f32> = (0..8).map(|i| i as f32).collect();
        assert_eq!(
            reorder_rope_rows(&w, 1, 2, RopeRows::ToLlamaCpp),
            vec![0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
        );
        let there = reorder_rope_rows(&w, 1, 2, RopeRows::ToLlamaCpp);
        assert_eq!(reorder_rope_rows(&there, 1, 2, RopeRows::ToHuggingFace), w);
    }

    #[test]
    fn type_names_parse_and_unknown_ones_are_refused() {
        for t in GgufType::ALL {
            assert_eq!(t.name().parse::<GgufType>().unwrap(), t);
        }
        let e = "q4_k_s".parse::<GgufType>().unwrap_err().to_string();
        assert!(e.contains("q4_k_s") && e.contains("q4_k_m"), "{e}");
    }
}
