//! `import-gguf`: a GGUF file (llama.cpp's format) of the architecture `llama`, `qwen2`,
//! `qwen3`, `gemma2`, `gemma3` or `phi3` → a Hugging Face model folder that this crate and transformers load: `config.json`,
//! bf16 `model.safetensors`, `tokenizer.json`, `tokenizer_config.json` and
//! `generation_config.json`.
//!
//! | `general.architecture` | Hugging Face | what differs from `llama` |
//! |---|---|---|
//! | `llama` | `LlamaForCausalLM` (Llama, Mistral, SmolLM, …) | q/k rows reordered (below); Llama 3 scaling from `rope_freqs` |
//! | `qwen2` | `Qwen2ForCausalLM` (Qwen2, Qwen2.5) | q/k/v biases (required); rows as stored |
//! | `qwen3` | `Qwen3ForCausalLM` | per-head q/k norms (required); `head_dim` from `attention.key_length`; biases optional (`attention_bias`) |
//! | `gemma2` | `Gemma2ForCausalLM` | four norms per layer, stored as `1 + w` (the 1 is subtracted); tied output; soft-caps, window and sliding layers as llama.cpp reads them |
//! | `gemma3` | `Gemma3ForCausalLM` (`gemma3_text`) | Gemma 2's layer with q/k norms; `rope.freq_base_swa` → `rope_local_base_freq`; no attention soft-cap |
//! | `phi3` | `Phi3ForCausalLM` (Phi-3, Phi-3.5, Phi-4-mini) | `attn_qkv` → `qkv_proj`, `ffn_up` ([gate; up]) → `gate_up_proj`, rows as stored; longrope from `rope_factors_{long,short}`; partial rotary; sliding window |
//!
//! # Weights
//!
//! Each tensor is dequantized to f32 ([`crate::quant::gguf`]), rounded to bf16 (nearest even)
//! and written under its Hugging Face name, one tensor at a time (host memory peaks near one
//! tensor, not the model):
//!
//! ```text
//! token_embd            → model.embed_tokens          output_norm → model.norm
//! output                → lm_head (absent: tied)       rope_freqs  → (config: llama3 scaling)
//! blk.N.attn_norm       → model.layers.N.input_layernorm
//! blk.N.ffn_norm        → model.layers.N.post_attention_layernorm
//! blk.N.attn_{q,k,v}    → model.layers.N.self_attn.{q,k,v}_proj        (.weight; .bias: qwen2/3)
//! blk.N.attn_output     → model.layers.N.self_attn.o_proj              (.weight; .bias: qwen3)
//! blk.N.attn_{q,k}_norm → model.layers.N.self_attn.{q,k}_norm          (qwen3)
//! blk.N.ffn_{gate,up,down} → model.layers.N.mlp.{gate,up,down}_proj
//! ```
//!
//! For `llama`, whose RoPE rotates adjacent pairs, llama.cpp's converter reorders the rows of
//! `q_proj` (with `n_head`) and `k_proj` (with `n_head_kv`) so that each head's rotary pairs are
//! interleaved rather than split in halves: viewing the rows as `[n, 2, hd/2]` (head, half,
//! index) it stores them as `[n, hd/2, 2]`. Here the inverse is applied: HF row
//! `h·hd + s·hd/2 + i` = GGUF row `h·hd + 2i + s`. `qwen2` and `qwen3` rotate halves in
//! llama.cpp too (NeoX order): their rows are written as stored.
//!
//! A `qwen3` file with q/k/v biases becomes `attention_bias: true`, which in transformers also
//! gives `o_proj` a bias: llama.cpp's `qwen3` has none, so where `attn_output.bias` is absent it
//! is written as zeros (the same model; the report lists them). Every tensor of the file must
//! have a place in the Hugging Face model and every tensor the model needs must be in the file:
//! anything else is refused by name before anything is written.
//!
//! # Config
//!
//! From the `<arch>.*` metadata: `embedding_length`, `feed_forward_length`, `block_count`,
//! `attention.head_count(_kv)`, `attention.key_length` (`head_dim`; `value_length` must equal
//! it), `attention.layer_norm_rms_epsilon`, `rope.freq_base`, `context_length`,
//! `rope.scaling.*` (none or linear: yarn and the rest are refused by name), and for `llama` a
//! `rope_freqs` tensor, which is accepted when it equals Llama 3's scaling (factor = its largest
//! entry, low/high frequency factors 1 and 4, original context 8192 — the values of every
//! Llama 3.x release). The vocabulary size is the number of rows of `token_embd` (the token list
//! may be shorter, never longer); `tie_word_embeddings` is the absence of `output.weight`.
//! Qwen2/Qwen3 configs get `use_sliding_window: false` (llama.cpp attends to the whole context
//! for both).
//!
//! Phi-3: `rope.dimension_count` / head width → `partial_rotary_factor`;
//! `rope.scaling.original_context_length` → `original_max_position_embeddings`;
//! `rope_factors_long.weight` / `rope_factors_short.weight` → `rope_scaling` {type longrope,
//! long_factor, short_factor} (both or neither); `rope.scaling.attn_factor` must be the factor
//! transformers derives, `√(1 + ln s / ln L)` with `s` = context / original context (1 without
//! longrope), since Phi3Config cannot state another; `attention.sliding_window` (0: none) →
//! `sliding_window` — the model as its converter read it (llama.cpp's `phi3` currently attends
//! to the whole context). heads × head width must be the hidden size; separate `attn_q/k/v`
//! or an `ffn_gate` are refused (a Hugging Face Phi-3 has them fused).
//!
//! Gemma: the config holds what llama.cpp runs, its defaults where a key is absent
//! (`llama_model_gemma2/3::load_arch_hparams`): `query_pre_attn_scalar` = the head width (the
//! 27B's layer count: hidden/heads), since llama.cpp scales attention by its inverse root;
//! gemma2's soft-caps 50 and 30 and window 4096; gemma3's final soft-cap where given (none
//! otherwise) and a window only when `attention.sliding_window` is set; `layer_types` from
//! `attention.sliding_window_pattern` (per-layer array or period) or the default pattern
//! (gemma2 2, gemma3 6: layers `i mod n < n − 1` slide).
//!
//! # Tokenizer
//!
//! See [`tokenizer`]: byte-level BPE (`tokenizer.ggml.model == "gpt2"`) and SentencePiece
//! (`llama`, [`spm_tokenizer`]: tokenizer.json only, the GGUF holds no tokenizer.model).

pub mod spm_tokenizer;
pub mod tokenizer;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use half::bf16;
use serde_json::{json, Value as Json};

use super::config::{Arch, HfConfig, LlamaConfig};
use super::export_gguf::{gemma_default_sliding, gemma_query_pre_attn_scalar};
use crate::error::{Error, Result};
use crate::ops::rope::{self, RopeScaling};
use crate::quant::gguf::{self, GgufFile, TensorInfo};

/// The `general.architecture` values that can be imported, for messages.
pub const SUPPORTED_ARCHITECTURES: &str = "llama, qwen2, qwen3, gemma2, gemma3, phi3";

/// A llama.cpp architecture and the Hugging Face family it becomes (its metadata prefix, and
/// the `model_type` but for `gemma3`, whose text model is `gemma3_text`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Llama,
    Qwen2,
    Qwen3,
    Gemma2,
    Gemma3,
    Phi3,
}

impl Family {
    fn from_arch(arch: &str) -> Option<Family> {
        Some(match arch {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma2" => Family::Gemma2,
            "gemma3" => Family::Gemma3,
            "phi3" => Family::Phi3,
            _ => return None,
        })
    }

    /// The metadata prefix (`general.architecture`).
    fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
            Family::Phi3 => "phi3",
        }
    }

    /// `model_type` in config.json.
    fn model_type(self) -> &'static str {
        match self {
            Family::Gemma3 => "gemma3_text",
            f => f.name(),
        }
    }

    fn is_gemma(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }

    /// The crate's [`Arch`] of a Gemma family.
    fn arch(self) -> Arch {
        match self {
            Family::Llama => Arch::Llama,
            Family::Qwen2 => Arch::Qwen2,
            Family::Qwen3 => Arch::Qwen3,
            Family::Gemma2 => Arch::Gemma2,
            Family::Gemma3 => Arch::Gemma3,
            Family::Phi3 => Arch::Phi3,
        }
    }

    /// The transformers class (and the family's name in messages).
    fn class(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
            Family::Phi3 => "Phi3ForCausalLM",
        }
    }
}

/// What [`import_gguf`] converted.
#[derive(Clone, Debug)]
pub struct ImportReport {
    /// `general.architecture` of the file (`llama`, `qwen2` or `qwen3`).
    pub architecture: String,
    /// The validated configuration written to `config.json`.
    pub config: LlamaConfig,
    /// GGUF tensors converted, by ggml type name.
    pub tensors_by_type: BTreeMap<String, usize>,
    /// Tensors written to `model.safetensors`.
    pub tensors_written: usize,
    /// Values written (every tensor, norms and biases included).
    pub parameters: usize,
    /// GGUF tensors not written as weights (`rope_freqs.weight`, folded into the config).
    pub skipped: Vec<String>,
    /// Tensors the Hugging Face model needs that the file does not hold, written as zeros
    /// (`o_proj.bias` of a Qwen3 with q/k/v biases: llama.cpp's `qwen3` has no output bias).
    pub zero_filled: Vec<String>,
    /// `tokenizer.ggml.model`: `gpt2` (byte-level BPE) or `llama` (SentencePiece).
    pub tokenizer_model: String,
    /// `tokenizer.ggml.pre`, the pre-tokenizer of the tokenizer written.
    pub tokenizer_pre: String,
    /// Tokens in the tokenizer.
    pub tokens: usize,
    /// How many of `tokens` are special (control or unknown) tokens.
    pub special_tokens: usize,
    /// The files written.
    pub files: Vec<PathBuf>,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let mut extras = String::new();
        if c.head_dim * c.num_heads != c.hidden_size {
            extras += &format!(", head_dim {}", c.head_dim);
        }
        if c.qk_norm() {
            extras += ", q/k norms";
        }
        if c.qkv_bias {
            extras += if c.o_bias {
                ", q/k/v/o biases"
            } else {
                ", q/k/v biases"
            };
        }
        if c.tie_word_embeddings {
            extras += ", tied embeddings";
        }
        writeln!(
            f,
            "{}: {} layers, hidden {}, intermediate {}, {} heads / {} kv heads, vocab {}{extras}",
            self.architecture,
            c.num_layers,
            c.hidden_size,
            c.intermediate_size,
            c.num_heads,
            c.num_kv_heads,
            c.vocab_size,
        )?;
        let types: Vec<String> = self
            .tensors_by_type
            .iter()
            .map(|(t, n)| format!("{n} {t}"))
            .collect();
        writeln!(
            f,
            "weights: {} tensors ({}), {} parameters, written as bf16",
            self.tensors_written,
            types.join(", "),
            self.parameters
        )?;
        if !self.skipped.is_empty() {
            writeln!(f, "folded into the config: {}", self.skipped.join(", "))?;
        }
        if !self.zero_filled.is_empty() {
            writeln!(
                f,
                "written as zeros (not in the file; llama.cpp runs the model without them): {}",
                self.zero_filled.join(", ")
            )?;
        }
        if self.tokenizer_model == "llama" {
            writeln!(
                f,
                "tokenizer: SentencePiece as byte-fallback BPE (tokenizer.json only), {} tokens \
                 ({} special)",
                self.tokens, self.special_tokens
            )?;
        } else {
            writeln!(
                f,
                "tokenizer: byte-level BPE, pre-tokenizer `{}`, {} tokens ({} special)",
                self.tokenizer_pre, self.tokens, self.special_tokens
            )?;
        }
        let files: Vec<String> = self.files.iter().map(|p| p.display().to_string()).collect();
        write!(f, "wrote {}", files.join(", "))
    }
}

/// Converts the GGUF file `gguf` (architecture `llama`, `qwen2` or `qwen3`) into a Hugging
/// Face folder `out` (created if needed; files of the same names are replaced). Everything is
/// checked before the first file is written: the architecture, the config, every tensor's
/// name, type and shape, the tokenizer.
pub fn import_gguf(gguf: &Path, out: &Path) -> Result<ImportReport> {
    let g = GgufFile::open(gguf)?;
    let arch = meta_str(&g, "general.architecture")?;
    let Some(family) = Family::from_arch(arch) else {
        return Err(g.error(format!(
            "architecture `{arch}` is not supported: the architectures that can be imported \
             are {SUPPORTED_ARCHITECTURES}"
        )));
    };
    let hp = Hyper::read(&g, family)?;
    let plan = plan_tensors(&g, &hp)?;
    let tok = tokenizer::build(&g, hp.context_length)?;
    if tok.tokens > hp.vocab_size {
        return Err(g.error(format!(
            "the tokenizer has {} tokens but token_embd.weight has only {} rows",
            tok.tokens, hp.vocab_size
        )));
    }
    let config_json = hp.config_json(&g, &plan);
    let hf: HfConfig = serde_json::from_value(config_json.clone())
        .map_err(|e| g.error(format!("cannot build config.json: {e}")))?;
    let config = LlamaConfig::try_from(hf)
        .map_err(|e| g.error(format!("the GGUF's hyperparameters are not usable: {e}")))?;

    std::fs::create_dir_all(out).map_err(|source| Error::Io {
        path: out.to_path_buf(),
        source,
    })?;
    let mut files = Vec::new();
    let weights = out.join("model.safetensors");
    let parameters = write_safetensors(&g, &plan.tensors, &weights)?;
    files.push(weights);
    let generation = json!({
        "bos_token_id": hp.bos_id,
        "eos_token_id": hp.eos_id,
        "do_sample": false,
    });
    for (name, value) in [
        ("config.json", &config_json),
        ("generation_config.json", &generation),
        ("tokenizer.json", &tok.tokenizer_json),
        ("tokenizer_config.json", &tok.tokenizer_config),
    ] {
        let path = out.join(name);
        let text = serde_json::to_string_pretty(value).expect("JSON of plain values");
        crate::io::adapters::write_atomic(&path, text.as_bytes())?;
        files.push(path);
    }
    let mut tensors_by_type = BTreeMap::new();
    for index in plan.tensors.iter().filter_map(|t| t.index) {
        *tensors_by_type
            .entry(g.tensors[index].ggml_type.name())
            .or_insert(0) += 1;
    }
    Ok(ImportReport {
        architecture: family.name().to_string(),
        config,
        tensors_by_type,
        tensors_written: plan.tensors.len(),
        parameters,
        skipped: plan.skipped,
        zero_filled: plan.zero_filled,
        tokenizer_model: tok.model.into(),
        tokenizer_pre: tok.pre,
        tokens: tok.tokens,
        special_tokens: tok.special_tokens,
        files,
    })
}

fn meta<'a>(g: &'a GgufFile, key: &str) -> Result<&'a gguf::Value> {
    g.get(key)
        .ok_or_else(|| g.error(format!("metadata `{key}` is missing")))
}

fn meta_str<'a>(g: &'a GgufFile, key: &str) -> Result<&'a str> {
    let v = meta(g, key)?;
    v.as_str().ok_or_else(|| {
        g.error(format!(
            "metadata `{key}` is a {}, expected a string",
            v.type_name()
        ))
    })
}

fn opt_usize(g: &GgufFile, key: &str) -> Result<Option<usize>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => match v.as_u64().and_then(|x| usize::try_from(x).ok()) {
            Some(x) => Ok(Some(x)),
            None => Err(g.error(format!(
                "metadata `{key}` is {v:?}, expected a non-negative integer (one value for all \
                 layers)"
            ))),
        },
    }
}

fn req_usize(g: &GgufFile, key: &str) -> Result<usize> {
    match opt_usize(g, key)? {
        Some(0) => Err(g.error(format!("metadata `{key}` is 0"))),
        Some(x) => Ok(x),
        None => Err(g.error(format!("metadata `{key}` is missing"))),
    }
}

fn opt_f32(g: &GgufFile, key: &str) -> Result<Option<f32>> {
    match g.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(|x| Some(x as f32))
            .ok_or_else(|| g.error(format!("metadata `{key}` is {v:?}, expected a number"))),
    }
}

/// An f32 from the file as the decimal it was written from (1e-5, not 9.99999974e-6).
fn decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

/// The `<arch>.*` hyperparameters.
struct Hyper {
    family: Family,
    hidden: usize,
    intermediate: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab_size: usize,
    rms_eps: f32,
    rope_theta: f32,
    context_length: usize,
    bos_id: Option<u64>,
    eos_id: Option<u64>,
    /// Gemma's settings as llama.cpp runs them.
    gemma: Option<GemmaHyper>,
    /// Dimensions of each head that RoPE rotates (`rope.dimension_count`; Phi-3 may rotate a
    /// share of the head, the other families the whole head).
    rotary_dim: usize,
    /// Phi-3's settings.
    phi3: Option<Phi3Hyper>,
}

/// What llama.cpp's `phi3` reads beyond the common keys (`llama_model_phi3::load_arch_hparams`,
/// `Phi3MiniModel.set_gguf_parameters` of its converter).
struct Phi3Hyper {
    /// `rope.scaling.original_context_length` (the pre-training length; longrope switches to
    /// its long factors beyond it).
    original_context: usize,
    /// `rope.scaling.attn_factor` (1 when absent, as llama.cpp takes it).
    attn_factor: f32,
    /// `attention.sliding_window` (0 or absent: none).
    sliding_window: Option<usize>,
}

/// What llama.cpp's `gemma2`/`gemma3` read or assume beyond the common keys
/// (`llama_model_gemma2/3::load_arch_hparams`).
struct GemmaHyper {
    /// The `query_pre_attn_scalar` llama.cpp's attention scale amounts to.
    query_pre_attn_scalar: usize,
    attn_softcap: Option<f32>,
    final_softcap: Option<f32>,
    /// The sliding window span (`None`: no layer slides).
    sliding_window: Option<usize>,
    /// Per layer, whether it slides.
    sliding: Vec<bool>,
    /// Gemma 3's RoPE base of the sliding layers.
    rope_theta_local: f32,
}

impl Hyper {
    fn read(g: &GgufFile, family: Family) -> Result<Hyper> {
        let a = family.name();
        let key = |k: &str| format!("{a}.{k}");
        let hidden = req_usize(g, &key("embedding_length"))?;
        let heads = req_usize(g, &key("attention.head_count"))?;
        let kv_heads = opt_usize(g, &key("attention.head_count_kv"))?.unwrap_or(heads);
        if kv_heads == 0 || heads % kv_heads != 0 {
            return Err(g.error(format!(
                "metadata `{}` ({kv_heads}) must divide `{}` ({heads})",
                key("attention.head_count_kv"),
                key("attention.head_count")
            )));
        }
        let head_dim = match opt_usize(g, &key("attention.key_length"))? {
            Some(k) => k,
            None if hidden % heads == 0 => hidden / heads,
            None => {
                return Err(g.error(format!(
                    "`{}` ({heads}) does not divide `{}` ({hidden})",
                    key("attention.head_count"),
                    key("embedding_length")
                )))
            }
        };
        if let Some(v) = opt_usize(g, &key("attention.value_length"))? {
            if v != head_dim {
                return Err(g.error(format!(
                    "metadata `{}` ({v}) differs from the key length ({head_dim}): keys and \
                     values of different widths are not supported",
                    key("attention.value_length")
                )));
            }
        }
        let rotary_dim = opt_usize(g, &key("rope.dimension_count"))?.unwrap_or(head_dim);
        // Partial rotary embeddings: Phi-3 only (checked in `with_phi3`).
        if family != Family::Phi3 && rotary_dim != head_dim {
            return Err(g.error(format!(
                "metadata `{}` is {rotary_dim} but heads have {head_dim} dimensions: partial \
                 rotary embeddings are not supported for {}",
                key("rope.dimension_count"),
                family.name()
            )));
        }
        let vocab_size = g
            .tensor("token_embd.weight")
            .map(|t| t.shape()[0])
            .ok_or_else(|| g.error("tensor `token_embd.weight` is missing"))?;
        let eps_key = key("attention.layer_norm_rms_epsilon");
        let rms_eps = opt_f32(g, &eps_key)?
            .ok_or_else(|| g.error(format!("metadata `{eps_key}` is missing")))?;
        let id = |key: &str| -> Result<Option<u64>> { Ok(opt_usize(g, key)?.map(|x| x as u64)) };
        Hyper {
            family,
            hidden,
            intermediate: req_usize(g, &key("feed_forward_length"))?,
            layers: req_usize(g, &key("block_count"))?,
            heads,
            kv_heads,
            head_dim,
            vocab_size,
            rms_eps,
            rope_theta: opt_f32(g, &key("rope.freq_base"))?.unwrap_or(10_000.0),
            context_length: opt_usize(g, &key("context_length"))?.unwrap_or(2048),
            bos_id: id("tokenizer.ggml.bos_token_id")?,
            eos_id: id("tokenizer.ggml.eos_token_id")?,
            gemma: None,
            rotary_dim,
            phi3: None,
        }
        .with_gemma(g)?
        .with_phi3(g)
    }

    /// Fills [`Hyper::phi3`] for `phi3` files, refusing by key what a Hugging Face Phi-3 cannot
    /// hold.
    fn with_phi3(mut self, g: &GgufFile) -> Result<Hyper> {
        if self.family != Family::Phi3 {
            return Ok(self);
        }
        let key = |k: &str| format!("phi3.{k}");
        if self.heads * self.head_dim != self.hidden {
            return Err(g.error(format!(
                "`{}` ({}) × head width {} is not `{}` ({}): llama.cpp's phi3 and a Hugging \
                 Face Phi-3 take the attention width to be the hidden size",
                key("attention.head_count"),
                self.heads,
                self.head_dim,
                key("embedding_length"),
                self.hidden
            )));
        }
        let rot = self.rotary_dim;
        if rot == 0 || rot > self.head_dim || !rot.is_multiple_of(2) {
            return Err(g.error(format!(
                "metadata `{}` is {rot}: an even number of at most the head width {} is needed",
                key("rope.dimension_count"),
                self.head_dim
            )));
        }
        if (self.head_dim as f64 * (rot as f64 / self.head_dim as f64)) as usize != rot {
            return Err(g.error(format!(
                "metadata `{}` is {rot}, which no partial_rotary_factor gives for a head width \
                 of {} (transformers rotates int(head_dim × factor) dimensions)",
                key("rope.dimension_count"),
                self.head_dim
            )));
        }
        let original_context = opt_usize(g, &key("rope.scaling.original_context_length"))?
            .filter(|&n| n > 0)
            .unwrap_or(self.context_length);
        let attn_factor = opt_f32(g, &key("rope.scaling.attn_factor"))?.unwrap_or(1.0);
        let sliding_window = opt_usize(g, &key("attention.sliding_window"))?.filter(|&w| w > 0);
        self.phi3 = Some(Phi3Hyper {
            original_context,
            attn_factor,
            sliding_window,
        });
        Ok(self)
    }

    /// Fills [`Hyper::gemma`] for `gemma2`/`gemma3` files with llama.cpp's defaults where a
    /// key is absent.
    fn with_gemma(mut self, g: &GgufFile) -> Result<Hyper> {
        if !self.family.is_gemma() {
            return Ok(self);
        }
        let a = self.family.name();
        let key = |k: &str| format!("{a}.{k}");
        let gemma2 = self.family == Family::Gemma2;
        let positive = |k: &str| -> Result<Option<f32>> {
            match opt_f32(g, &key(k))? {
                Some(x) if x.is_nan() || x < 0.0 => Err(g.error(format!(
                    "metadata `{}` is {x}, expected a positive number",
                    key(k)
                ))),
                x => Ok(x.filter(|&x| x > 0.0)),
            }
        };
        let (attn_softcap, final_softcap) = if gemma2 {
            // llama.cpp's gemma2 always soft-caps, with 50 and 30 by default.
            let attn = positive("attn_logit_softcapping")?.or(Some(50.0));
            let fin = match opt_f32(g, &key("final_logit_softcapping"))? {
                Some(x) if x.is_nan() || x <= 0.0 => {
                    return Err(g.error(format!(
                        "metadata `{}` is {x}: llama.cpp's gemma2 divides by it",
                        key("final_logit_softcapping")
                    )))
                }
                x => x.or(Some(30.0)),
            };
            (attn, fin)
        } else {
            // llama.cpp's gemma3 has no attention soft-capping (a key would be ignored).
            (None, positive("final_logit_softcapping")?)
        };
        let window = opt_usize(g, &key("attention.sliding_window"))?;
        let sliding_window = if gemma2 {
            Some(window.filter(|&w| w > 0).unwrap_or(4096))
        } else {
            window.filter(|&w| w > 0)
        };
        let sliding = match sliding_window {
            None => vec![false; self.layers],
            Some(_) => self.sliding_pattern(g, &key("attention.sliding_window_pattern"))?,
        };
        let sliding_window = sliding_window.filter(|_| sliding.iter().any(|&s| s));
        let swa_key = key("rope.freq_base_swa");
        let rope_theta_local = match opt_f32(g, &swa_key)? {
            Some(t) if gemma2 && t != self.rope_theta => {
                return Err(g.error(format!(
                    "metadata `{swa_key}` is {t} but `{}` is {}: a Hugging Face Gemma2 has one \
                     RoPE base for every layer",
                    key("rope.freq_base"),
                    self.rope_theta
                )))
            }
            Some(t) => t,
            None if gemma2 => self.rope_theta,
            None => 10_000.0,
        };
        self.gemma = Some(GemmaHyper {
            query_pre_attn_scalar: gemma_query_pre_attn_scalar(
                self.family.arch(),
                self.layers,
                self.hidden,
                self.heads,
                self.head_dim,
            ),
            attn_softcap,
            final_softcap,
            sliding_window,
            sliding,
            rope_theta_local,
        });
        Ok(self)
    }

    /// The sliding layers as llama.cpp's `load_swa_pattern` reads them: a per-layer array, a
    /// period `n` (layers `i mod n < n − 1` slide; 0: all), or the family's default.
    fn sliding_pattern(&self, g: &GgufFile, k: &str) -> Result<Vec<bool>> {
        match g.get(k) {
            None => Ok(gemma_default_sliding(self.family.arch(), self.layers)),
            Some(gguf::Value::Array(items)) => {
                if items.len() != self.layers {
                    return Err(g.error(format!(
                        "metadata `{k}` has {} entries for {} layers",
                        items.len(),
                        self.layers
                    )));
                }
                items
                    .iter()
                    .map(|v| match v {
                        gguf::Value::Bool(b) => Ok(*b),
                        v => v.as_u64().map(|x| x != 0).ok_or_else(|| {
                            g.error(format!(
                                "metadata `{k}` holds {v:?}, expected booleans or integers"
                            ))
                        }),
                    })
                    .collect()
            }
            Some(v) => {
                let n = v.as_u64().ok_or_else(|| {
                    g.error(format!(
                        "metadata `{k}` is {v:?}, expected a layer period or a per-layer array"
                    ))
                })? as usize;
                Ok((0..self.layers).map(|i| n == 0 || i % n < n - 1).collect())
            }
        }
    }

    fn config_json(&self, g: &GgufFile, plan: &Plan) -> Json {
        let name = g.get("general.name").and_then(gguf::Value::as_str);
        let mut c = json!({
            "architectures": [self.family.class()],
            "model_type": self.family.model_type(),
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": decimal(self.rms_eps),
            "rope_theta": decimal(self.rope_theta),
            "rope_scaling": plan.rope_scaling,
            "max_position_embeddings": self.context_length,
            "tie_word_embeddings": plan.tied,
            "attention_bias": plan.attention_bias,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": true,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "torch_dtype": "bfloat16",
            "_name_or_path": name,
        });
        let extra = match self.family {
            Family::Llama => json!({"hidden_act": "silu", "mlp_bias": false, "pretraining_tp": 1}),
            Family::Gemma2 | Family::Gemma3 => {
                let gm = self.gemma.as_ref().expect("read for gemma2/gemma3");
                let types: Vec<&str> = gm
                    .sliding
                    .iter()
                    .map(|&s| {
                        if s {
                            "sliding_attention"
                        } else {
                            "full_attention"
                        }
                    })
                    .collect();
                let mut e = json!({
                    "hidden_activation": "gelu_pytorch_tanh",
                    "query_pre_attn_scalar": gm.query_pre_attn_scalar,
                    "attn_logit_softcapping": gm.attn_softcap.map(decimal),
                    "final_logit_softcapping": gm.final_softcap.map(decimal),
                    "sliding_window": gm.sliding_window,
                    "layer_types": types,
                    "use_bidirectional_attention": false,
                });
                if self.family == Family::Gemma3 {
                    // transformers 4.x: `rope_scaling` is the global layers', the sliding
                    // layers run at `rope_local_base_freq` unscaled — as in llama.cpp.
                    e["rope_local_base_freq"] = json!(decimal(gm.rope_theta_local));
                }
                e
            }
            Family::Phi3 => {
                let p = self.phi3.as_ref().expect("read for phi3");
                json!({
                    "hidden_act": "silu",
                    "original_max_position_embeddings": p.original_context,
                    "partial_rotary_factor": self.rotary_dim as f64 / self.head_dim as f64,
                    "sliding_window": p.sliding_window,
                    "pad_token_id": null,
                    "resid_pdrop": 0.0,
                    "embd_pdrop": 0.0,
                })
            }
            // llama.cpp's qwen2/qwen3 attend to the whole context.
            Family::Qwen2 | Family::Qwen3 => json!({
                "hidden_act": "silu",
                "use_sliding_window": false,
                "sliding_window": null,
                "max_window_layers": self.layers,
            }),
        };
        let (Json::Object(c_map), Json::Object(extra)) = (&mut c, extra) else {
            unreachable!("JSON objects")
        };
        c_map.extend(extra);
        c
    }
}

/// One tensor to write.
struct Planned {
    /// Index in the GGUF tensor table; `None`: zeros (a bias the file does not hold).
    index: Option<usize>,
    hf_name: String,
    /// Row-major shape.
    shape: Vec<usize>,
    /// Undo llama.cpp's rotary row order with this many heads.
    unpermute_heads: Option<usize>,
    /// A Gemma norm, stored by llama.cpp as `1 + w`: subtract the 1.
    unit_offset: bool,
}

struct Plan {
    tensors: Vec<Planned>,
    tied: bool,
    /// q/k/v biases (and o's, for Qwen3) in the Hugging Face model.
    attention_bias: bool,
    rope_scaling: Option<Json>,
    skipped: Vec<String>,
    zero_filled: Vec<String>,
}

/// The HF name, expected shape and head count (for q/k rows to un-permute) of a GGUF tensor
/// name, for the tensors the family has.
fn map_name(name: &str, hp: &Hyper) -> Option<(String, Vec<usize>, Option<usize>)> {
    let (d, f, v) = (hp.hidden, hp.intermediate, hp.vocab_size);
    let (qd, kvd) = (hp.heads * hp.head_dim, hp.kv_heads * hp.head_dim);
    match name {
        "token_embd.weight" => return Some(("model.embed_tokens.weight".into(), vec![v, d], None)),
        "output_norm.weight" => return Some(("model.norm.weight".into(), vec![d], None)),
        // llama.cpp's gemma2 always ties the output matrix to the embedding.
        "output.weight" if hp.family != Family::Gemma2 => {
            return Some(("lm_head.weight".into(), vec![v, d], None))
        }
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let l: usize = layer.parse().ok().filter(|&l| l < hp.layers)?;
    let llama = hp.family == Family::Llama;
    let qwen = matches!(hp.family, Family::Qwen2 | Family::Qwen3);
    let qwen3 = hp.family == Family::Qwen3;
    let gemma = hp.family.is_gemma();
    let qk_norm = matches!(hp.family, Family::Qwen3 | Family::Gemma3);
    let phi3 = hp.family == Family::Phi3;
    let (hf, kind, shape, heads) = match part {
        // Phi-3: q/k/v and gate/up fused, as in the Hugging Face model (ffn_up holds
        // [gate; up], gate first); separate attn_q/k/v or an ffn_gate have no place in it.
        "attn_qkv.weight" if phi3 => ("self_attn.qkv_proj", "weight", vec![qd + 2 * kvd, d], None),
        "ffn_up.weight" if phi3 => ("mlp.gate_up_proj", "weight", vec![2 * f, d], None),
        "attn_q.weight" | "attn_k.weight" | "attn_v.weight" | "ffn_gate.weight" if phi3 => {
            return None
        }
        "attn_norm.weight" => ("input_layernorm", "weight", vec![d], None),
        "post_attention_norm.weight" if gemma => {
            ("post_attention_layernorm", "weight", vec![d], None)
        }
        "ffn_norm.weight" if gemma => ("pre_feedforward_layernorm", "weight", vec![d], None),
        "post_ffw_norm.weight" if gemma => ("post_feedforward_layernorm", "weight", vec![d], None),
        "ffn_norm.weight" => ("post_attention_layernorm", "weight", vec![d], None),
        "attn_q.weight" => ("self_attn.q_proj", "weight", vec![qd, d], Some(hp.heads)),
        "attn_k.weight" => (
            "self_attn.k_proj",
            "weight",
            vec![kvd, d],
            Some(hp.kv_heads),
        ),
        "attn_v.weight" => ("self_attn.v_proj", "weight", vec![kvd, d], None),
        "attn_output.weight" => ("self_attn.o_proj", "weight", vec![d, qd], None),
        "ffn_gate.weight" => ("mlp.gate_proj", "weight", vec![f, d], None),
        "ffn_up.weight" => ("mlp.up_proj", "weight", vec![f, d], None),
        "ffn_down.weight" => ("mlp.down_proj", "weight", vec![d, f], None),
        "attn_q.bias" if qwen => ("self_attn.q_proj", "bias", vec![qd], None),
        "attn_k.bias" if qwen => ("self_attn.k_proj", "bias", vec![kvd], None),
        "attn_v.bias" if qwen => ("self_attn.v_proj", "bias", vec![kvd], None),
        "attn_output.bias" if qwen3 => ("self_attn.o_proj", "bias", vec![d], None),
        "attn_q_norm.weight" if qk_norm => ("self_attn.q_norm", "weight", vec![hp.head_dim], None),
        "attn_k_norm.weight" if qk_norm => ("self_attn.k_norm", "weight", vec![hp.head_dim], None),
        _ => return None,
    };
    Some((
        format!("model.layers.{l}.{hf}.{kind}"),
        shape,
        heads.filter(|_| llama),
    ))
}

/// Maps and checks every tensor (name, type, shape) and that none is missing.
fn plan_tensors(g: &GgufFile, hp: &Hyper) -> Result<Plan> {
    let mut tensors = Vec::new();
    let mut skipped = Vec::new();
    let mut rope_scaling = rope_scaling_from_metadata(g, hp.family)?;
    let class = hp.family.class();
    let (mut long_factor, mut short_factor) = (None, None);
    for (index, t) in g.tensors.iter().enumerate() {
        if !t.ggml_type.is_supported() {
            return Err(g.error(format!(
                "tensor `{}` has type {}, which cannot be imported (supported: {})",
                t.name,
                t.ggml_type,
                gguf::supported_type_names()
            )));
        }
        if hp.family == Family::Phi3
            && (t.name == "rope_factors_long.weight" || t.name == "rope_factors_short.weight")
        {
            let f = g.dequantize(&t.name)?;
            if f.len() != hp.rotary_dim / 2 || f.iter().any(|x| !(x.is_finite() && *x > 0.0)) {
                return Err(g.error(format!(
                    "tensor `{}` has {} values; longrope needs {} positive ones (rope \
                     dimension count / 2)",
                    t.name,
                    f.len(),
                    hp.rotary_dim / 2
                )));
            }
            if t.name.contains("long") {
                long_factor = Some(f);
            } else {
                short_factor = Some(f);
            }
            skipped.push(t.name.clone());
            continue;
        }
        if t.name == "rope_freqs.weight" && hp.family == Family::Llama {
            rope_scaling = Some(llama3_scaling_from_rope_freqs(g, t, hp)?);
            skipped.push(t.name.clone());
            continue;
        }
        let Some((hf_name, shape, unpermute_heads)) = map_name(&t.name, hp) else {
            return Err(g.error(format!(
                "tensor `{}` has no counterpart in a Hugging Face {class} ({} layers)",
                t.name, hp.layers
            )));
        };
        if t.shape() != shape {
            return Err(g.error(format!(
                "tensor `{}` has shape {:?} (ggml dims {:?}), expected {:?} for {hf_name}",
                t.name,
                t.shape(),
                t.dims,
                shape
            )));
        }
        let unit_offset = hp.family.is_gemma() && hf_name.ends_with("norm.weight");
        tensors.push(Planned {
            index: Some(index),
            hf_name,
            shape,
            unpermute_heads,
            unit_offset,
        });
    }
    if let Some(p) = &hp.phi3 {
        rope_scaling = phi3_longrope(g, hp, p, rope_scaling, long_factor, short_factor)?;
    }
    let tied = g.tensor("output.weight").is_none();
    // Qwen2 always has q/k/v biases; Qwen3 has them (and o's) when the file has any.
    let is_bias = |t: &&TensorInfo| {
        t.name.starts_with("blk.")
            && [
                "attn_q.bias",
                "attn_k.bias",
                "attn_v.bias",
                "attn_output.bias",
            ]
            .iter()
            .any(|b| t.name.ends_with(&format!(".{b}")))
    };
    let attention_bias = match hp.family {
        Family::Llama => false,
        Family::Qwen2 => true,
        Family::Qwen3 => g.tensors.iter().any(|t| is_bias(&t)),
        Family::Gemma2 | Family::Gemma3 | Family::Phi3 => false,
    };
    let mut required = vec![
        "token_embd.weight".to_string(),
        "output_norm.weight".to_string(),
    ];
    let mut zero_filled = Vec::new();
    for l in 0..hp.layers {
        let mut parts = if hp.family == Family::Phi3 {
            vec![
                "attn_norm.weight",
                "ffn_norm.weight",
                "attn_qkv.weight",
                "attn_output.weight",
                "ffn_up.weight",
                "ffn_down.weight",
            ]
        } else {
            vec![
                "attn_norm.weight",
                "ffn_norm.weight",
                "attn_q.weight",
                "attn_k.weight",
                "attn_v.weight",
                "attn_output.weight",
                "ffn_gate.weight",
                "ffn_up.weight",
                "ffn_down.weight",
            ]
        };
        if hp.family.is_gemma() {
            parts.extend(["post_attention_norm.weight", "post_ffw_norm.weight"]);
        }
        if matches!(hp.family, Family::Qwen3 | Family::Gemma3) {
            parts.extend(["attn_q_norm.weight", "attn_k_norm.weight"]);
        }
        if attention_bias {
            parts.extend(["attn_q.bias", "attn_k.bias", "attn_v.bias"]);
        }
        required.extend(parts.iter().map(|p| format!("blk.{l}.{p}")));
        if attention_bias && hp.family == Family::Qwen3 {
            let name = format!("blk.{l}.attn_output.bias");
            if g.tensor(&name).is_none() {
                let hf_name = format!("model.layers.{l}.self_attn.o_proj.bias");
                zero_filled.push(hf_name.clone());
                tensors.push(Planned {
                    index: None,
                    hf_name,
                    shape: vec![hp.hidden],
                    unpermute_heads: None,
                    unit_offset: false,
                });
            }
        }
    }
    if let Some(missing) = required.iter().find(|n| g.tensor(n).is_none()) {
        let why = if missing.ends_with(".bias") && hp.family == Family::Qwen3 {
            " (the file has other q/k/v/o biases: a Qwen3 has them on every layer or on none)"
        } else {
            ""
        };
        return Err(g.error(format!(
            "tensor `{missing}` is missing: a Hugging Face {class} needs it{why}"
        )));
    }
    Ok(Plan {
        tensors,
        tied,
        attention_bias,
        rope_scaling,
        skipped,
        zero_filled,
    })
}

/// `<arch>.rope.scaling.*` → the HF `rope_scaling` object (None when absent or "none").
fn rope_scaling_from_metadata(g: &GgufFile, family: Family) -> Result<Option<Json>> {
    let a = family.name();
    let (type_key, factor_key, linear_key) = (
        format!("{a}.rope.scaling.type"),
        format!("{a}.rope.scaling.factor"),
        format!("{a}.rope.scale_linear"),
    );
    let kind = match g.get(&type_key) {
        Some(v) => v
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| g.error(format!("metadata `{type_key}` is {v:?}, expected a string")))?,
        None if g.get(&linear_key).is_some() => "linear".into(),
        None => return Ok(None),
    };
    match kind.as_str() {
        "none" => Ok(None),
        "linear" => {
            let factor = match opt_f32(g, &factor_key)? {
                Some(f) => f,
                None => opt_f32(g, &linear_key)?
                    .ok_or_else(|| g.error(format!("metadata `{factor_key}` is missing")))?,
            };
            Ok(Some(
                json!({"rope_type": "linear", "type": "linear", "factor": decimal(factor)}),
            ))
        }
        other => Err(g.error(format!(
            "metadata `{type_key}` is `{other}`: that rope scaling is not supported (supported: \
             none and linear{})",
            if family == Family::Llama {
                ", or Llama 3's as a rope_freqs tensor"
            } else {
                ""
            }
        ))),
    }
}

/// Phi-3's longrope from `rope_factors_{long,short}.weight` and the `phi3.rope.scaling.*` keys,
/// as the `rope_scaling` transformers' Phi3Config reads (type, short_factor, long_factor — the
/// three keys its 4.x validation allows; `original_max_position_embeddings` and the attention
/// factor go elsewhere). The attention factor llama.cpp applies (`attn_factor`) must be the one
/// transformers derives from the context lengths, since that config cannot state another.
fn phi3_longrope(
    g: &GgufFile,
    hp: &Hyper,
    p: &Phi3Hyper,
    scaling: Option<Json>,
    long: Option<Vec<f32>>,
    short: Option<Vec<f32>>,
) -> Result<Option<Json>> {
    if let Some(s) = scaling {
        return Err(g.error(format!(
            "metadata `phi3.rope.scaling.type` gives {s}: llama.cpp's phi3 scales RoPE by \
             longrope's factor tensors only"
        )));
    }
    let key = "phi3.rope.scaling.attn_factor";
    let (long, short) = match (long, short) {
        (Some(l), Some(s)) => (l, s),
        (None, None) => {
            if (p.attn_factor - 1.0).abs() > 1e-6 {
                return Err(g.error(format!(
                    "metadata `{key}` is {} without longrope factor tensors: a Hugging Face \
                     Phi-3 without longrope scales cos/sin by 1",
                    p.attn_factor
                )));
            }
            return Ok(None);
        }
        (l, _) => {
            return Err(g.error(format!(
                "tensor `{}` is missing: longrope needs both rope_factors_long.weight and \
                 rope_factors_short.weight",
                if l.is_some() {
                    "rope_factors_short.weight"
                } else {
                    "rope_factors_long.weight"
                }
            )))
        }
    };
    let scale = hp.context_length as f64 / p.original_context as f64;
    let derived = if scale <= 1.0 {
        1.0
    } else {
        (1.0 + scale.ln() / (p.original_context as f64).ln()).sqrt()
    };
    if (p.attn_factor as f64 - derived).abs() > 1e-6 * derived {
        return Err(g.error(format!(
            "metadata `{key}` is {}, but a Hugging Face Phi-3 with context {} and original \
             context {} scales cos/sin by {derived:.7} (its config cannot state another \
             attention factor)",
            p.attn_factor, hp.context_length, p.original_context
        )));
    }
    let list = |f: &[f32]| -> Vec<f64> { f.iter().map(|&x| decimal(x)).collect() };
    Ok(Some(json!({
        "type": "longrope",
        "short_factor": list(&short),
        "long_factor": list(&long),
    })))
}

/// Llama 3 rope scaling recovered from `rope_freqs.weight` (llama.cpp's per-frequency divisors).
fn llama3_scaling_from_rope_freqs(g: &GgufFile, t: &TensorInfo, hp: &Hyper) -> Result<Json> {
    let freqs = g.dequantize(&t.name)?;
    if freqs.len() != hp.head_dim / 2 {
        return Err(g.error(format!(
            "tensor `{}` has {} values, expected head_dim/2 = {}",
            t.name,
            freqs.len(),
            hp.head_dim / 2
        )));
    }
    let factor = freqs.iter().copied().fold(f32::MIN, f32::max);
    let scaling = RopeScaling::Llama3 {
        factor,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    let base = rope::inv_freq(hp.head_dim, hp.rope_theta, RopeScaling::None);
    let scaled = rope::inv_freq(hp.head_dim, hp.rope_theta, scaling);
    let matches = base
        .iter()
        .zip(&scaled)
        .zip(&freqs)
        .all(|((b, s), f)| ((b / s) - f).abs() <= 1e-3 * f.abs().max(1.0));
    if !matches || factor < 1.0 {
        return Err(g.error(format!(
            "tensor `{}` (rope frequency factors) does not match Llama 3 scaling with factor \
             {factor}, low/high frequency factors 1/4 and original context 8192: unsupported \
             rope scaling",
            t.name
        )));
    }
    Ok(json!({
        "rope_type": "llama3",
        "factor": decimal(factor),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }))
}

/// Which way [`reorder_rope_rows`] goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RopeRows {
    /// Hugging Face's half-split order → llama.cpp's pairwise order (export).
    ToLlamaCpp,
    /// llama.cpp's pairwise order → Hugging Face's half-split order (import).
    ToHuggingFace,
}

/// llama.cpp's q/k row order for its `llama` architecture, whose RoPE rotates adjacent pairs:
/// `w` is `[rows, cols]` with `rows = heads · hd` (a bias has `cols = 1`), and GGUF row
/// `h·hd + 2i + s` holds HF row `h·hd + s·hd/2 + i`. Reorders in the direction given.
pub(crate) fn reorder_rope_rows(w: &[f32], cols: usize, heads: usize, to: RopeRows) -> Vec<f32> {
    let rows = w.len() / cols;
    let hd = rows / heads;
    let half = hd / 2;
    let mut out = vec![0.0f32; w.len()];
    for h in 0..heads {
        for s in 0..2 {
            for i in 0..half {
                let hf = (h * hd + s * half + i) * cols;
                let gguf = (h * hd + 2 * i + s) * cols;
                let (src, dst) = match to {
                    RopeRows::ToLlamaCpp => (hf, gguf),
                    RopeRows::ToHuggingFace => (gguf, hf),
                };
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// Writes the planned tensors as bf16 safetensors (`format: pt`), streaming one tensor at a
/// time into a temporary file that is renamed into place. Returns the number of values.
fn write_safetensors(g: &GgufFile, plan: &[Planned], path: &Path) -> Result<usize> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for p in plan {
        let n: usize = p.shape.iter().product();
        header.insert(
            p.hf_name.clone(),
            json!({"dtype": "BF16", "shape": p.shape, "data_offsets": [offset, offset + 2 * n]}),
        );
        offset += 2 * n;
    }
    let mut header = serde_json::to_string(&Json::Object(header)).expect("JSON of plain values");
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let tmp = path.with_extension("safetensors.tmp");
    let written = write_data(g, plan, &header, &tmp);
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    let values = written?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(values)
}

/// The header and every tensor's bf16 data, into `tmp`.
fn write_data(g: &GgufFile, plan: &[Planned], header: &str, tmp: &Path) -> Result<usize> {
    let io = |source| Error::Io {
        path: tmp.to_path_buf(),
        source,
    };
    let file = File::create(tmp).map_err(io)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(header.as_bytes()).map_err(io)?;
    let mut values = 0;
    for p in plan {
        let Some(index) = p.index else {
            let n: usize = p.shape.iter().product();
            w.write_all(&vec![0u8; 2 * n]).map_err(io)?;
            values += n;
            continue;
        };
        let t = &g.tensors[index];
        let mut x = g.dequantize(&t.name)?;
        if p.unit_offset {
            for v in x.iter_mut() {
                *v -= 1.0;
            }
        }
        if let Some(heads) = p.unpermute_heads {
            let cols = p.shape[1];
            if p.shape[0] % heads != 0 || (p.shape[0] / heads) % 2 != 0 {
                return Err(g.error(format!(
                    "tensor `{}`: {} rows do not split into {heads} heads of even size",
                    t.name, p.shape[0]
                )));
            }
            x = reorder_rope_rows(&x, cols, heads, RopeRows::ToHuggingFace);
        }
        let bytes: Vec<u8> = x
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect();
        w.write_all(&bytes).map_err(io)?;
        values += x.len();
    }
    w.flush().map_err(io)?;
    Ok(values)
}
