//! `import-gguf`: a GGUF file (llama.cpp's format) of the architecture `llama`, `qwen2` or
//! `qwen3` → a Hugging Face model folder that this crate and transformers load: `config.json`,
//! bf16 `model.safetensors`, `tokenizer.json`, `tokenizer_config.json` and
//! `generation_config.json`.
//!
//! | `general.architecture` | Hugging Face | what differs from `llama` |
//! |---|---|---|
//! | `llama` | `LlamaForCausalLM` (Llama, Mistral, SmolLM, …) | q/k rows reordered (below); Llama 3 scaling from `rope_freqs` |
//! | `qwen2` | `Qwen2ForCausalLM` (Qwen2, Qwen2.5) | q/k/v biases (required); rows as stored |
//! | `qwen3` | `Qwen3ForCausalLM` | per-head q/k norms (required); `head_dim` from `attention.key_length`; biases optional (`attention_bias`) |
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
//! # Tokenizer
//!
//! See [`tokenizer`]: byte-level BPE (`tokenizer.ggml.model == "gpt2"`) only.

pub mod tokenizer;

use std::collections::BTreeMap;
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use half::bf16;
use serde_json::{json, Value as Json};

use super::config::{HfConfig, LlamaConfig};
use crate::error::{Error, Result};
use crate::ops::rope::{self, RopeScaling};
use crate::quant::gguf::{self, GgufFile, TensorInfo};

/// The `general.architecture` values that can be imported, for messages.
pub const SUPPORTED_ARCHITECTURES: &str = "llama, qwen2, qwen3";

/// A llama.cpp architecture and the Hugging Face family it becomes (its metadata prefix and
/// `model_type` are the same name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    Llama,
    Qwen2,
    Qwen3,
}

impl Family {
    fn from_arch(arch: &str) -> Option<Family> {
        Some(match arch {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            _ => return None,
        })
    }

    /// The metadata prefix and `model_type`.
    fn name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }

    /// The transformers class (and the family's name in messages).
    fn class(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Qwen2 => "Qwen2ForCausalLM",
            Family::Qwen3 => "Qwen3ForCausalLM",
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
        writeln!(
            f,
            "tokenizer: byte-level BPE, pre-tokenizer `{}`, {} tokens ({} special)",
            self.tokenizer_pre, self.tokens, self.special_tokens
        )?;
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
        if let Some(r) = opt_usize(g, &key("rope.dimension_count"))? {
            if r != head_dim {
                return Err(g.error(format!(
                    "metadata `{}` is {r} but heads have {head_dim} dimensions: partial rotary \
                     embeddings are not supported",
                    key("rope.dimension_count")
                )));
            }
        }
        let vocab_size = g
            .tensor("token_embd.weight")
            .map(|t| t.shape()[0])
            .ok_or_else(|| g.error("tensor `token_embd.weight` is missing"))?;
        let eps_key = key("attention.layer_norm_rms_epsilon");
        let rms_eps = opt_f32(g, &eps_key)?
            .ok_or_else(|| g.error(format!("metadata `{eps_key}` is missing")))?;
        let id = |key: &str| -> Result<Option<u64>> { Ok(opt_usize(g, key)?.map(|x| x as u64)) };
        Ok(Hyper {
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
        })
    }

    fn config_json(&self, g: &GgufFile, plan: &Plan) -> Json {
        let name = g.get("general.name").and_then(gguf::Value::as_str);
        let mut c = json!({
            "architectures": [self.family.class()],
            "model_type": self.family.name(),
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
            "hidden_act": "silu",
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
            Family::Llama => json!({"mlp_bias": false, "pretraining_tp": 1}),
            // llama.cpp's qwen2/qwen3 attend to the whole context.
            Family::Qwen2 | Family::Qwen3 => json!({
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
        "output.weight" => return Some(("lm_head.weight".into(), vec![v, d], None)),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let l: usize = layer.parse().ok().filter(|&l| l < hp.layers)?;
    let llama = hp.family == Family::Llama;
    let qwen = matches!(hp.family, Family::Qwen2 | Family::Qwen3);
    let qwen3 = hp.family == Family::Qwen3;
    let (hf, kind, shape, heads) = match part {
        "attn_norm.weight" => ("input_layernorm", "weight", vec![d], None),
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
        "attn_q_norm.weight" if qwen3 => ("self_attn.q_norm", "weight", vec![hp.head_dim], None),
        "attn_k_norm.weight" if qwen3 => ("self_attn.k_norm", "weight", vec![hp.head_dim], None),
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
    for (index, t) in g.tensors.iter().enumerate() {
        if !t.ggml_type.is_supported() {
            return Err(g.error(format!(
                "tensor `{}` has type {}, which cannot be imported (supported: {})",
                t.name,
                t.ggml_type,
                gguf::supported_type_names()
            )));
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
        tensors.push(Planned {
            index: Some(index),
            hf_name,
            shape,
            unpermute_heads,
        });
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
    };
    let mut required = vec![
        "token_embd.weight".to_string(),
        "output_norm.weight".to_string(),
    ];
    let mut zero_filled = Vec::new();
    for l in 0..hp.layers {
        let mut parts = vec![
            "attn_norm.weight",
            "ffn_norm.weight",
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_output.weight",
            "ffn_gate.weight",
            "ffn_up.weight",
            "ffn_down.weight",
        ];
        if hp.family == Family::Qwen3 {
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
    while header.len() % 8 != 0 {
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
