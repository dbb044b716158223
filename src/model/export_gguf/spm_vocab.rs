//! A SentencePiece tokenizer as GGUF metadata (`tokenizer.ggml.model = "llama"`), written as
//! llama.cpp's converter writes it for `llama` (Llama 2 style), `gemma2`, `gemma3`
//! (`_set_vocab_sentencepiece`) and `phi3` (`Phi3MiniModel.set_vocab`):
//!
//! - `tokenizer.ggml.tokens` / `scores` / `token_type` for every id below the config's
//!   `vocab_size`: the pieces of `tokenizer.model` with their scores, typed 2 unknown, 3 control,
//!   5 unused, 6 byte, else 1 normal (user-defined pieces too); ids past the model `[PAD<id>]`,
//!   score −10000, type 5;
//! - added tokens over them, score −1000: `added_tokens.json` (4 user defined), then
//!   `tokenizer_config.json`'s `added_tokens_decoder` (3 control when `special` or spelled as
//!   a control token (`<|…|>`, `<unused…>`, `<pad>`, `<mask>` …), else 4 with `▁` written as a
//!   space); for `phi3`, `added_tokens_decoder` (3 when `special`, else 4, spelled as is) and then
//!   `tokenizer.json`'s `added_tokens` the same way. Added tokens past `vocab_size` are left out
//!   as the converter leaves them out, each named in a warning (`phi3`'s would fail in the
//!   converter: refused here);
//! - `tokenizer.ggml.pre = "default"`, then the special-token keys
//!   ([`super::special_vocab`]);
//! - `tokenizer.ggml.add_space_prefix`: false after them for `gemma2`/`gemma3`; for `llama`,
//!   `tokenizer_config.json`'s `add_prefix_space` when set, before all of them; for `phi3` none
//!   (llama.cpp's default, true).
//!
//! A `tokenizer.model` with more pieces than `vocab_size` is refused (the converter would drop
//! the rest), as is CodeLlama's 32016-token vocabulary (its infill tokens are not written).

use std::path::Path;

use serde_json::Value as Json;

use super::sentencepiece::{self, read_pieces};
use super::special_vocab::special_vocab;
use super::vocab::{read_json, Vocab};
use crate::error::{Error, Result};
use crate::quant::gguf::Value;

/// llama.cpp's token types.
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// The converter's `does_token_look_special`.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

struct Table {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
}

impl Table {
    fn set(&mut self, id: usize, token: String, ty: i32) {
        self.tokens[id] = token;
        self.scores[id] = -1000.0;
        self.types[id] = ty;
    }
}

/// `(id, content, special)` of `tokenizer_config.json`'s `added_tokens_decoder`.
fn decoder_entries(path: &Path, cfg: &Json) -> Result<Vec<(usize, String, bool)>> {
    let Some(dec) = cfg.get("added_tokens_decoder") else {
        return Ok(Vec::new());
    };
    let dec = dec
        .as_object()
        .ok_or_else(|| format_err(path, "added_tokens_decoder is not an object"))?;
    dec.iter()
        .map(|(id, t)| {
            let n = id.parse::<usize>().map_err(|_| {
                format_err(
                    path,
                    format!("added_tokens_decoder key {id:?} is not a token id"),
                )
            })?;
            let content = t["content"].as_str().ok_or_else(|| {
                format_err(path, format!("added_tokens_decoder[{id:?}] has no content"))
            })?;
            Ok((
                n,
                content.to_string(),
                t["special"].as_bool().unwrap_or(false),
            ))
        })
        .collect()
}

/// Reads the SentencePiece tokenizer of `model_dir` (whose `tokenizer.json` is `tok`) for the
/// architecture `arch` and an embedding of `rows` rows.
pub fn read(model_dir: &Path, tok: &Json, rows: usize, arch: &str) -> Result<Vocab> {
    let sp_path = model_dir.join("tokenizer.model");
    if !sp_path.is_file() {
        return Err(format_err(
            &sp_path,
            "missing: tokenizer.json is a SentencePiece tokenizer (byte fallback / `▁` for \
             spaces), which a GGUF file holds as tokenizer.ggml.model = \"llama\" with each \
             piece's score; those are read from the SentencePiece model tokenizer.model (as \
             llama.cpp's converter reads them), so export needs that file next to tokenizer.json",
        ));
    }
    if !matches!(arch, "llama" | "gemma2" | "gemma3" | "phi3") {
        return Err(format_err(
            &model_dir.join("tokenizer.json"),
            format!(
                "a SentencePiece tokenizer for `{arch}`: llama.cpp's converter writes one only \
                 for llama, gemma2, gemma3 and phi3"
            ),
        ));
    }
    if arch == "llama" && rows == 32016 {
        return Err(format_err(
            &model_dir.join("config.json"),
            "vocab_size 32016 (CodeLlama's): its infill tokens (prefix/suffix/middle/eot), which \
             llama.cpp's converter adds, are not written here",
        ));
    }
    let pieces = read_pieces(&sp_path)?;
    if pieces.len() > rows {
        return Err(format_err(
            &sp_path,
            format!(
                "{} pieces, more than the embedding's {rows} rows (vocab_size in config.json)",
                pieces.len()
            ),
        ));
    }
    let mut t = Table {
        tokens: (0..rows).map(|i| format!("[PAD{i}]")).collect(),
        scores: vec![-10000.0; rows],
        types: vec![UNUSED; rows],
    };
    for (id, p) in pieces.into_iter().enumerate() {
        t.types[id] = match p.kind {
            sentencepiece::UNKNOWN => UNKNOWN,
            sentencepiece::CONTROL => CONTROL,
            sentencepiece::UNUSED => UNUSED,
            sentencepiece::BYTE => BYTE,
            _ => NORMAL,
        };
        t.tokens[id] = p.piece;
        t.scores[id] = p.score;
    }

    let mut warnings = Vec::new();
    let mut skipped = |path: &Path, token: &str, id: usize| {
        warnings.push(format!(
            "{}: added token {token:?} (id {id}) is beyond the embedding's {rows} rows: left \
             out, as llama.cpp's converter leaves it out",
            path.display()
        ))
    };
    let added_path = model_dir.join("added_tokens.json");
    if added_path.is_file() {
        let added = read_json(&added_path)?;
        let added = added
            .as_object()
            .ok_or_else(|| format_err(&added_path, "expected an object of token → id"))?;
        for (token, id) in added {
            let id = id.as_u64().ok_or_else(|| {
                format_err(&added_path, format!("{token:?}: {id} is not a token id"))
            })? as usize;
            if id < rows {
                t.set(id, token.clone(), USER_DEFINED);
            } else {
                skipped(&added_path, token, id);
            }
        }
    }
    let cfg_path = model_dir.join("tokenizer_config.json");
    let tcfg = if cfg_path.is_file() {
        read_json(&cfg_path)?
    } else {
        Json::Null
    };
    for (id, content, special) in decoder_entries(&cfg_path, &tcfg)? {
        if arch == "phi3" {
            if id >= rows {
                return Err(format_err(
                    &cfg_path,
                    format!("added token {id} is beyond the embedding's {rows} rows"),
                ));
            }
            t.set(id, content, if special { CONTROL } else { USER_DEFINED });
        } else if id >= rows {
            skipped(&cfg_path, &content, id);
        } else if special || looks_special(&content) {
            t.set(id, content, CONTROL);
        } else {
            t.set(id, content.replace('\u{2581}', " "), USER_DEFINED);
        }
    }
    if arch == "phi3" {
        let tok_path = model_dir.join("tokenizer.json");
        for a in tok["added_tokens"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else {
                return Err(format_err(
                    &tok_path,
                    format!("added token {a} has no id or content"),
                ));
            };
            if id as usize >= rows {
                return Err(format_err(
                    &tok_path,
                    format!("added token {id} is beyond the embedding's {rows} rows"),
                ));
            }
            let special = a["special"].as_bool().unwrap_or(false);
            t.set(
                id as usize,
                content.to_string(),
                if special { CONTROL } else { USER_DEFINED },
            );
        }
    }

    let mut metadata = Vec::new();
    if arch == "llama" {
        match tcfg.get("add_prefix_space") {
            None | Some(Json::Null) => {}
            Some(Json::Bool(b)) => {
                metadata.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(*b)))
            }
            Some(v) => {
                return Err(format_err(
                    &cfg_path,
                    format!("add_prefix_space is {v}, expected a bool"),
                ))
            }
        }
    }
    let control = t.types.iter().filter(|&&ty| ty == CONTROL).count();
    metadata.extend([
        (
            "tokenizer.ggml.model".to_string(),
            Value::String("llama".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            Value::String("default".into()),
        ),
        (
            "tokenizer.ggml.tokens".to_string(),
            Value::Array(t.tokens.into_iter().map(Value::String).collect()),
        ),
        (
            "tokenizer.ggml.scores".to_string(),
            Value::Array(t.scores.into_iter().map(Value::F32).collect()),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            Value::Array(t.types.into_iter().map(Value::I32).collect()),
        ),
    ]);
    let special = special_vocab(model_dir, tok, rows)?;
    let chat_template = special.iter().any(|(k, _)| k == "tokenizer.chat_template");
    metadata.extend(special);
    if matches!(arch, "gemma2" | "gemma3") {
        metadata.push(("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)));
    }
    Ok(Vocab {
        model: "llama",
        warnings,
        metadata,
        pre: "default".into(),
        tokens: rows,
        control,
        chat_template,
    })
}
