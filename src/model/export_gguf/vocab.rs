//! The tokenizer of a Hugging Face model folder as GGUF metadata (the `tokenizer.*` keys
//! llama.cpp reads) — the inverse of [`crate::model::import_gguf::tokenizer`], written as
//! llama.cpp's own converter writes it. Two kinds:
//!
//! | tokenizer.json | needs | `tokenizer.ggml.model` | written by |
//! |---|---|---|---|
//! | SentencePiece: byte fallback, or `▁` for spaces (Metaspace / Replace), or Unigram (Gemma 2/3, Phi-3, Llama 2) | `tokenizer.model` | `llama` (pieces, scores, types) | [`super::spm_vocab`] |
//! | byte-level BPE (Llama 3, Qwen, SmolLM, Phi-4-mini) | — | `gpt2` (tokens, merges) | this module |
//!
//! For byte-level BPE:
//!
//! - `tokenizer.ggml.model = "gpt2"`; `tokenizer.ggml.pre` named from the `tokenizer.json`
//!   pre-tokenizer (llama.cpp picks its splitting regexes by that name):
//!
//! | tokenizer.json pre_tokenizer | `tokenizer.ggml.pre` |
//! |---|---|
//! | ByteLevel (its built-in GPT-2 regex) | `gpt-2` |
//! | Digits(individual) + ByteLevel | `smollm` |
//! | Split(Llama 3's regex) + ByteLevel(no regex) | `llama-bpe` |
//! | Split(Qwen2's regex) + ByteLevel(no regex) | `qwen2` |
//! | Split(GPT-4o's regex, as Phi-4-mini's) + ByteLevel(no regex) | `gpt-4o` |
//!
//!   anything else is refused by name (llama.cpp would split the text differently);
//! - `tokenizer.ggml.tokens`: every id from 0 to the embedding's row count, the BPE vocabulary's
//!   strings (byte-level form) and the added tokens' contents; ids nobody names are
//!   `[PAD<id>]`; `tokenizer.ggml.token_type`: 1 normal, 3 control (special added tokens, and
//!   added tokens spelled `<|…|>`), 4 user-defined (other added tokens), 5 unused (padding);
//! - `tokenizer.ggml.merges` as `"left right"` by rank;
//! - `tokenizer.ggml.{bos,eos,unknown,padding}_token_id` from `tokenizer_config.json`'s token
//!   strings, else `config.json`'s `*_token_id`; `tokenizer.ggml.add_bos_token` and
//!   `add_eos_token` from `tokenizer_config.json`, else from the post-processor (whether its
//!   template puts the BOS/EOS token around a single sequence);
//! - `tokenizer.chat_template` from `tokenizer_config.json` or `chat_template.jinja`.

use std::collections::HashMap;
use std::path::Path;

use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::quant::gguf::Value;

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

/// Llama 3's pre-tokenization regex as `tokenizer.json` files spell it, and as
/// [`crate::model::import_gguf`] writes it (without the inline case-insensitive group).
const LLAMA3_REGEXES: [&str; 2] = [
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
];
/// GPT-4o's, as Phi-4-mini's tokenizer.json spells it.
const GPT4O_REGEX: &str = crate::model::import_gguf::tokenizer::GPT4O_REGEX;
/// Qwen2's (and Qwen3's): Llama 3's with single digits.
const QWEN2_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer metadata and a summary.
pub struct Vocab {
    /// `tokenizer.ggml.model`: `gpt2` or `llama`.
    pub model: &'static str,
    /// The `tokenizer.*` entries, in the order llama.cpp's converter writes them.
    pub metadata: Vec<(String, Value)>,
    /// `tokenizer.ggml.pre`.
    pub pre: String,
    /// Tokens written (the embedding's rows).
    pub tokens: usize,
    /// How many of them are control tokens.
    pub control: usize,
    /// Whether a chat template was written.
    pub chat_template: bool,
    /// What was left out, as llama.cpp's converter leaves it out (added tokens past the
    /// embedding).
    pub warnings: Vec<String>,
}

/// A JSON file, with errors naming it.
pub(crate) fn read_json(path: &Path) -> Result<Json> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        msg: format!("not valid JSON: {e}"),
    })
}

fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// The `tokenizer.ggml.pre` name of a `tokenizer.json` pre-tokenizer.
fn pre_name(pre: &Json) -> Option<&'static str> {
    let ty = |v: &Json| v["type"].as_str().unwrap_or("").to_string();
    let byte_level = |v: &Json, regex: bool| {
        ty(v) == "ByteLevel"
            && v["use_regex"].as_bool().unwrap_or(true) == regex
            && !v["add_prefix_space"].as_bool().unwrap_or(false)
    };
    if byte_level(pre, true) {
        return Some("gpt-2");
    }
    if ty(pre) != "Sequence" {
        return None;
    }
    let parts = pre["pretokenizers"].as_array()?;
    match parts.as_slice() {
        [d, b] if ty(d) == "Digits" && d["individual_digits"] == true && byte_level(b, true) => {
            Some("smollm")
        }
        [s, b] if ty(s) == "Split" && byte_level(b, false) => {
            let isolated = s["behavior"] == "Isolated" && !s["invert"].as_bool().unwrap_or(false);
            let regex = s["pattern"]["Regex"].as_str()?;
            if !isolated {
                None
            } else if LLAMA3_REGEXES.contains(&regex) {
                Some("llama-bpe")
            } else if regex == QWEN2_REGEX {
                Some("qwen2")
            } else if regex == GPT4O_REGEX {
                Some("gpt-4o")
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Whether `tokenizer.json` is a SentencePiece model (Unigram, or BPE with byte fallback or
/// the `▁` space marker), which llama.cpp keeps as its `llama` tokenizer with scores.
fn is_sentencepiece(tok: &Json) -> bool {
    let model = &tok["model"];
    let metaspace = |v: &Json| {
        v["type"] == "Metaspace"
            || v["type"] == "Replace" && v["content"] == "\u{2581}"
            || v["pretokenizers"]
                .as_array()
                .or_else(|| v["normalizers"].as_array())
                .is_some_and(|parts| {
                    parts
                        .iter()
                        .any(|p| p["type"] == "Metaspace" || p["content"] == "\u{2581}")
                })
    };
    model["type"] == "Unigram"
        || model["byte_fallback"].as_bool() == Some(true)
        || metaspace(&tok["pre_tokenizer"])
        || metaspace(&tok["normalizer"])
}

/// A special token named in `tokenizer_config.json` (a string or `{"content": …}`).
fn token_string(v: &Json) -> Option<&str> {
    v.as_str().or_else(|| v["content"].as_str())
}

/// Whether `template` (a TemplateProcessing post-processor's `single`) starts (or ends) with
/// the special token `id_name`.
fn template_adds(post: &Json, token: &str, at_start: bool) -> bool {
    let single = match post["type"].as_str() {
        Some("TemplateProcessing") => post["single"].as_array(),
        Some("Sequence") => {
            return post["processors"]
                .as_array()
                .is_some_and(|ps| ps.iter().any(|p| template_adds(p, token, at_start)))
        }
        _ => None,
    };
    let Some(single) = single else { return false };
    let piece = if at_start {
        single.first()
    } else {
        single.last()
    };
    piece.is_some_and(|p| p["SpecialToken"]["id"].as_str() == Some(token))
}

/// Reads the tokenizer of `model_dir` for an embedding of `rows` rows and the GGUF
/// architecture `arch`; `model_cfg` is its `config.json` (for the special token ids
/// `tokenizer_config.json` does not name). A SentencePiece tokenizer goes to
/// [`super::spm_vocab`].
pub fn read(model_dir: &Path, rows: usize, model_cfg: &Json, arch: &str) -> Result<Vocab> {
    let tok_path = model_dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Err(format_err(
            &tok_path,
            "missing: a GGUF file carries its tokenizer, so export needs the model's \
             tokenizer.json",
        ));
    }
    let tok = read_json(&tok_path)?;
    let model = &tok["model"];
    if is_sentencepiece(&tok) {
        return super::spm_vocab::read(model_dir, &tok, rows, arch);
    }
    if model["type"].as_str() != Some("BPE") {
        return Err(format_err(
            &tok_path,
            format!(
                "the tokenizer model is {}, expected BPE: only byte-level BPE tokenizers can be \
                 exported to GGUF here",
                model["type"]
            ),
        ));
    }
    let pre = pre_name(&tok["pre_tokenizer"]).ok_or_else(|| {
        format_err(
            &tok_path,
            format!(
                "pre_tokenizer {} has no llama.cpp counterpart here (supported: ByteLevel; \
                 Digits + ByteLevel (smollm); Split with Llama 3's, Qwen2's or GPT-4o's regex + \
                 ByteLevel)",
                tok["pre_tokenizer"]
            ),
        )
    })?;
    match &tok["normalizer"] {
        Json::Null => {}
        // Qwen2's tokenizer.json normalizes to NFC; llama.cpp's qwen2 tokenizer does not (as
        // with every Qwen2 GGUF file, text already in NFC tokenizes the same).
        n if n["type"] == "NFC" && pre == "qwen2" => {}
        n => {
            return Err(format_err(
                &tok_path,
                format!("normalizer {n} has no llama.cpp counterpart: expected none"),
            ))
        }
    }

    // id → (string, type)
    let mut by_id: HashMap<usize, (String, i32)> = HashMap::new();
    let vocab = model["vocab"]
        .as_object()
        .ok_or_else(|| format_err(&tok_path, "model.vocab is not an object"))?;
    for (s, id) in vocab {
        let id = id
            .as_u64()
            .ok_or_else(|| format_err(&tok_path, format!("model.vocab[{s:?}] is not an id")))?;
        by_id.insert(id as usize, (s.clone(), NORMAL));
    }
    for t in tok["added_tokens"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
    {
        let (Some(id), Some(content)) = (t["id"].as_u64(), t["content"].as_str()) else {
            return Err(format_err(
                &tok_path,
                format!("added token {t} has no id or content"),
            ));
        };
        let special = t["special"].as_bool().unwrap_or(false)
            || (content.starts_with("<|") && content.ends_with("|>"));
        let ty = if special { CONTROL } else { USER_DEFINED };
        by_id.insert(id as usize, (content.to_string(), ty));
    }
    let max_id = by_id.keys().copied().max().unwrap_or(0);
    if max_id >= rows {
        return Err(format_err(
            &tok_path,
            format!(
                "token id {max_id} is beyond the embedding's {rows} rows (vocab_size in \
                 config.json)"
            ),
        ));
    }
    let mut tokens = Vec::with_capacity(rows);
    let mut types = Vec::with_capacity(rows);
    for id in 0..rows {
        let (s, ty) = by_id
            .remove(&id)
            .unwrap_or_else(|| (format!("[PAD{id}]"), UNUSED));
        tokens.push(Value::String(s));
        types.push(Value::I32(ty));
    }
    let control = types.iter().filter(|t| **t == Value::I32(CONTROL)).count();

    let merges: Vec<Value> = match model["merges"].as_array() {
        Some(m) => m
            .iter()
            .map(|e| match e {
                Json::String(s) => Ok(Value::String(s.clone())),
                Json::Array(p) if p.len() == 2 && p.iter().all(Json::is_string) => {
                    Ok(Value::String(format!(
                        "{} {}",
                        p[0].as_str().unwrap(),
                        p[1].as_str().unwrap()
                    )))
                }
                other => Err(format_err(
                    &tok_path,
                    format!("merge {other} is neither \"a b\" nor [\"a\", \"b\"]"),
                )),
            })
            .collect::<Result<_>>()?,
        None => Vec::new(),
    };

    let cfg_path = model_dir.join("tokenizer_config.json");
    let tcfg = if cfg_path.is_file() {
        read_json(&cfg_path)?
    } else {
        Json::Null
    };
    let id_of = |s: &str| -> Option<u64> {
        tok["added_tokens"]
            .as_array()
            .and_then(|a| a.iter().find(|t| t["content"].as_str() == Some(s)))
            .and_then(|t| t["id"].as_u64())
            .or_else(|| vocab.get(s).and_then(Json::as_u64))
    };
    let mut metadata = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("gpt2".into()),
        ),
        ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
    ];
    for (name, key) in [
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("unk", "unknown_token_id"),
        ("pad", "padding_token_id"),
    ] {
        let named = token_string(&tcfg[format!("{name}_token")]);
        let id = match named {
            Some(s) => Some(id_of(s).ok_or_else(|| {
                format_err(
                    &cfg_path,
                    format!("{name}_token {s:?} is not a token of tokenizer.json"),
                )
            })?),
            None => match &model_cfg[format!("{name}_token_id")] {
                Json::Number(n) => n.as_u64(),
                // A list of EOS ids (Llama 3.1's config): llama.cpp keeps one, the first.
                Json::Array(a) => a.first().and_then(Json::as_u64),
                _ => None,
            },
        };
        if let Some(id) = id {
            if id as usize >= rows {
                return Err(format_err(
                    &cfg_path,
                    format!("{name} token id {id} is beyond the vocabulary ({rows} tokens)"),
                ));
            }
            metadata.push((format!("tokenizer.ggml.{key}"), Value::U32(id as u32)));
        }
    }
    for (name, at_start) in [("bos", true), ("eos", false)] {
        let flag = match tcfg[format!("add_{name}_token")].as_bool() {
            Some(b) => b,
            None => token_string(&tcfg[format!("{name}_token")])
                .is_some_and(|t| template_adds(&tok["post_processor"], t, at_start)),
        };
        metadata.push((
            format!("tokenizer.ggml.add_{name}_token"),
            Value::Bool(flag),
        ));
    }
    let jinja = model_dir.join("chat_template.jinja");
    let template = match &tcfg["chat_template"] {
        Json::String(t) => Some(t.clone()),
        // Named templates (`[{"name": "default", "template": …}, {"name": "tool_use", …}]`):
        // llama.cpp's converter writes the default one as tokenizer.chat_template.
        Json::Array(named) => Some(
            named
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .ok_or_else(|| {
                    format_err(
                        &cfg_path,
                        "chat_template is a list without a template named \"default\"",
                    )
                })?
                .to_string(),
        ),
        _ if jinja.is_file() => {
            Some(std::fs::read_to_string(&jinja).map_err(|source| Error::Io {
                path: jinja.clone(),
                source,
            })?)
        }
        _ => None,
    };
    let chat_template = template.is_some();
    if let Some(t) = template {
        metadata.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    Ok(Vocab {
        model: "gpt2",
        warnings: Vec::new(),
        metadata,
        pre: pre.into(),
        tokens: rows,
        control,
        chat_template,
    })
}
