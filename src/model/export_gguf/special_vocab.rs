//! The special-token metadata llama.cpp's converter writes after a SentencePiece vocabulary
//! (gguf-py's `SpecialVocab(dir, n_vocab=…)`, merges not loaded), with its rules:
//!
//! - from `tokenizer.json`: the normalizer's lowercase / strip-accents flags; the post-processor
//!   (ByteLevel: no BOS/EOS added unless said otherwise; TemplateProcessing: BOS added when its
//!   single template starts with the BOS (or CLS) token, EOS when it ends with a special token,
//!   which becomes the EOS (the configured EOS then the EOT id), a SEP flag from the pair
//!   template's middle);
//! - from `tokenizer_config.json` (nothing more without one): the chat template (else
//!   `chat_template.jinja`, else `chat_template.json`); for each of bos, eos, unk, sep, pad, cls,
//!   mask (and eot/eom when added above) the `add_<t>_token` flag where the post-processor did
//!   not decide it, and `<t>_token`'s id among tokenizer.json's added tokens;
//! - from `config.json`: `<t>_token_id` (or `text_config`'s) for the types still without one.
//!
//! Ids at or past the vocabulary are skipped, as the converter skips them. Written in the
//! converter's order: ids (bos, eos, unknown, seperator, padding, mask, eot, eom: cls has no key),
//! then the add_bos/add_eos/add_sep flags, the chat template, the normalizer flags.

use std::path::Path;

use serde_json::{Map, Value as Json};

use super::vocab::read_json;
use crate::error::{Error, Result};
use crate::quant::gguf::Value;

fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// A non-empty string (Python's truthiness of a token name).
fn truthy(v: &Json) -> bool {
    match v {
        Json::Null => false,
        Json::String(s) => !s.is_empty(),
        Json::Object(m) => !m.is_empty(),
        Json::Bool(b) => *b,
        _ => true,
    }
}

/// `part["SpecialToken"]["id"]` when a non-empty string.
fn special_id(part: Option<&Json>) -> Option<String> {
    part.and_then(|p| p["SpecialToken"]["id"].as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

struct State {
    n_vocab: usize,
    types: Vec<&'static str>,
    ids: Vec<(&'static str, u64)>,
    add: Vec<(&'static str, bool)>,
    lowercase: Option<bool>,
    strip_accents: Option<bool>,
}

impl State {
    fn set_id(&mut self, path: &Path, typ: &'static str, v: &Json) -> Result<()> {
        let Json::Number(n) = v else { return Ok(()) };
        if !(n.is_u64() || n.is_i64()) {
            return Ok(());
        }
        let id = n
            .as_u64()
            .ok_or_else(|| format_err(path, format!("{typ} token id {n} is negative")))?;
        if (id as usize) < self.n_vocab && !self.ids.iter().any(|(t, _)| *t == typ) {
            self.ids.push((typ, id));
        }
        Ok(())
    }

    fn set_add(&mut self, typ: &'static str, value: bool, overwrite: bool) {
        match self.add.iter_mut().find(|(t, _)| *t == typ) {
            Some(slot) if overwrite => slot.1 = value,
            Some(_) => {}
            None => self.add.push((typ, value)),
        }
    }

    fn normalizer(&mut self, n: &Json) {
        match n["type"].as_str() {
            Some("Lowercase") => self.lowercase = Some(true),
            Some("StripAccents") => self.strip_accents = Some(true),
            Some("BertNormalizer") => {
                if let Some(b) = n["lowercase"].as_bool() {
                    self.lowercase = Some(b);
                }
                if let Some(b) = n["strip_accents"].as_bool() {
                    self.strip_accents = Some(b);
                }
            }
            Some("Sequence") => {
                for m in n["normalizers"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or(&[])
                {
                    self.normalizer(m);
                }
            }
            _ => {}
        }
    }
}

/// The TemplateProcessing rules (gguf-py's "crude parsing"), updating `cfg`'s token names as
/// the converter does.
fn template(st: &mut State, p: &Json, cfg: &mut Option<Map<String, Json>>) {
    let empty = Vec::new();
    let single = p["single"].as_array().unwrap_or(&empty);
    let mut pair: &[Json] = p["pair"].as_array().unwrap_or(&empty);
    let get = |cfg: &Option<Map<String, Json>>, k: &str| {
        cfg.as_ref()
            .and_then(|c| c.get(k).cloned())
            .unwrap_or(Json::Null)
    };
    let (mut first, mut last) = (None, None);
    if single.len() > 1 {
        first = special_id(single.first());
        if let Some(f) = &first {
            let fj = Json::String(f.clone());
            let (bos, cls) = (get(cfg, "bos_token"), get(cfg, "cls_token"));
            if let Some(c) = cfg.as_mut() {
                if fj != bos && fj != cls {
                    if !truthy(&bos) {
                        c.insert("bos_token".into(), fj.clone());
                    }
                    if !truthy(&cls) {
                        c.insert("cls_token".into(), fj.clone());
                    }
                }
            }
            let (bos, cls) = if cfg.is_some() {
                (get(cfg, "bos_token"), get(cfg, "cls_token"))
            } else {
                (fj.clone(), Json::Null)
            };
            st.set_add("bos", fj == bos || fj == cls, true);
        }
        last = special_id(single.last());
        if let Some(l) = &last {
            let lj = Json::String(l.clone());
            let eos = get(cfg, "eos_token");
            if let Some(c) = cfg.as_mut() {
                if lj != eos {
                    for extra in ["eot", "eom"] {
                        if !st.types.contains(&extra) {
                            st.types.push(extra);
                            c.insert(format!("{extra}_token"), eos.clone());
                            break;
                        }
                    }
                    c.insert("eos_token".into(), lj.clone());
                }
            }
            st.set_add("eos", true, true);
        }
    }
    if pair.is_empty() {
        return;
    }
    if first.is_some() && special_id(pair.first()) == first {
        pair = &pair[1..];
    }
    if last.is_some() && !pair.is_empty() && special_id(pair.last()) == last {
        pair = &pair[..pair.len() - 1];
    }
    fn seq(p: Option<&Json>) -> Option<&str> {
        p.and_then(|p| p["Sequence"]["id"].as_str())
    }
    if pair.len() < 3 || seq(pair.first()) != Some("A") || seq(pair.last()) != Some("B") {
        return;
    }
    let middle = &pair[1..pair.len() - 1];
    let sep = get(cfg, "sep_token");
    // Without a config the converter's EOS is the template's last token.
    let eos = match (&cfg, &last) {
        (None, Some(l)) => Json::String(l.clone()),
        _ => get(cfg, "eos_token"),
    };
    let is_sep = |e: &str| Json::String(e.into()) == sep || Json::String(e.into()) == eos;
    let mut add_sep = special_id(middle.first()).is_some_and(|e| is_sep(&e) && last.is_none());
    if middle.len() == 2 && special_id(middle.get(1)).is_some_and(|e| is_sep(&e)) {
        add_sep = true;
    }
    st.set_add("sep", add_sep, true);
    if add_sep && !truthy(&sep) {
        if let Some(c) = cfg.as_mut() {
            c.insert("sep_token".into(), eos);
        }
    }
}

/// The chat template the converter writes, if any: `tokenizer_config.json`'s `chat_template`,
/// else `chat_template.jinja`, else `chat_template.json`'s.
fn chat_template(dir: &Path, cfg: &Map<String, Json>) -> Result<Option<String>> {
    let cfg_path = dir.join("tokenizer_config.json");
    let jinja = dir.join("chat_template.jinja");
    let json_file = dir.join("chat_template.json");
    let (value, path) = if let Some(v) = cfg.get("chat_template") {
        (v.clone(), cfg_path)
    } else if jinja.is_file() {
        if dir.join("additional_chat_templates").is_dir() {
            return Err(format_err(
                &dir.join("additional_chat_templates"),
                "named chat templates besides the default are not written (llama.cpp's \
                 converter writes them in no fixed order); remove the folder to export the \
                 default one",
            ));
        }
        let t = std::fs::read_to_string(&jinja).map_err(|source| Error::Io {
            path: jinja.clone(),
            source,
        })?;
        return Ok(Some(t));
    } else if json_file.is_file() {
        (read_json(&json_file)?["chat_template"].clone(), json_file)
    } else {
        return Ok(None);
    };
    match value {
        Json::Null => Ok(None),
        Json::String(t) => Ok(Some(t)),
        Json::Array(named) => {
            if let Some(other) = named.iter().find(|t| t["name"] != "default") {
                return Err(format_err(
                    &path,
                    format!(
                        "chat_template {} is a named template besides the default, which is \
                         not written (llama.cpp's converter writes them in no fixed order)",
                        other["name"]
                    ),
                ));
            }
            Ok(named
                .iter()
                .find_map(|t| t["template"].as_str())
                .map(str::to_string))
        }
        other => Err(format_err(
            &path,
            format!("chat_template is {other}, expected a string or a list of named templates"),
        )),
    }
}

/// The special-token metadata for the model folder `dir` (its `tokenizer.json` is `tok`) and a
/// vocabulary of `n_vocab` tokens.
pub fn special_vocab(dir: &Path, tok: &Json, n_vocab: usize) -> Result<Vec<(String, Value)>> {
    let mut st = State {
        n_vocab,
        types: vec!["bos", "eos", "unk", "sep", "pad", "cls", "mask"],
        ids: Vec::new(),
        add: Vec::new(),
        lowercase: None,
        strip_accents: None,
    };
    let tok_path = dir.join("tokenizer.json");
    if !tok["normalizer"].is_null() {
        st.normalizer(&tok["normalizer"]);
    }
    let cfg_path = dir.join("tokenizer_config.json");
    let mut cfg = if cfg_path.is_file() {
        match read_json(&cfg_path)? {
            Json::Object(m) if m.is_empty() => None,
            Json::Object(m) => Some(m),
            other => {
                return Err(format_err(
                    &cfg_path,
                    format!("expected an object, found {other}"),
                ))
            }
        }
    } else {
        None
    };
    if let Some(c) = cfg.as_mut() {
        for (from, to) in [("cls_token", "bos_token"), ("sep_token", "eos_token")] {
            if !truthy(c.get(to).unwrap_or(&Json::Null))
                && truthy(c.get(from).unwrap_or(&Json::Null))
            {
                let v = c[from].clone();
                c.insert(to.into(), v);
            }
        }
    }
    let post = &tok["post_processor"];
    if truthy(post) {
        let processors = match post["processors"].as_array() {
            Some(ps) => ps.clone(),
            None => vec![post.clone()],
        };
        for p in &processors {
            match p["type"].as_str() {
                Some("ByteLevel") => {
                    st.set_add("bos", false, false);
                    st.set_add("eos", false, false);
                }
                Some("TemplateProcessing") => template(&mut st, p, &mut cfg),
                Some("RobertaProcessing") => {
                    return Err(format_err(
                        &tok_path,
                        "post_processor RobertaProcessing (a BERT-style encoder's) has no \
                         counterpart for a SentencePiece decoder model",
                    ))
                }
                _ => {}
            }
        }
    }
    let mut template_text = None;
    if let Some(c) = &cfg {
        template_text = chat_template(dir, c)?;
        let empty = Vec::new();
        let added = tok["added_tokens"].as_array().unwrap_or(&empty);
        for typ in st.types.clone() {
            if let Some(b) = c.get(&format!("add_{typ}_token")).and_then(Json::as_bool) {
                st.set_add(typ, b, false);
            }
            let name = match c.get(&format!("{typ}_token")) {
                Some(Json::String(s)) => s.as_str(),
                Some(Json::Object(m)) => match m.get("content") {
                    Some(Json::String(s)) => s.as_str(),
                    _ => continue,
                },
                _ => continue,
            };
            if let Some(id) = added.iter().find(|a| a["content"].as_str() == Some(name)) {
                st.set_id(&cfg_path, typ, &id["id"])?;
            }
        }
    }
    let config_path = dir.join("config.json");
    if config_path.is_file() {
        let config = read_json(&config_path)?;
        for typ in st.types.clone() {
            let key = format!("{typ}_token_id");
            let v = match &config[&key] {
                Json::Null => &config["text_config"][&key],
                v => v,
            };
            st.set_id(&config_path, typ, v)?;
        }
    }

    let mut out = Vec::new();
    for (typ, id) in &st.ids {
        let key = match *typ {
            "unk" => "unknown",
            "sep" => "seperator",
            "pad" => "padding",
            "cls" => continue,
            t => t,
        };
        out.push((
            format!("tokenizer.ggml.{key}_token_id"),
            Value::U32(*id as u32),
        ));
    }
    for (typ, b) in &st.add {
        if matches!(*typ, "bos" | "eos" | "sep") {
            out.push((format!("tokenizer.ggml.add_{typ}_token"), Value::Bool(*b)));
        }
    }
    if let Some(t) = template_text {
        out.push(("tokenizer.chat_template".into(), Value::String(t)));
    }
    if let Some(b) = st.lowercase {
        out.push(("tokenizer.ggml.normalizer.lowercase".into(), Value::Bool(b)));
    }
    if let Some(b) = st.strip_accents {
        out.push((
            "tokenizer.ggml.normalizer.strip_accents".into(),
            Value::Bool(b),
        ));
    }
    Ok(out)
}
