//! The model's tokenizer (`tokenizer.json`, through the `tokenizers` crate) and the special
//! tokens and chat template of `tokenizer_config.json` (or `chat_template.jinja`).

use std::path::Path;

use serde_json::Value;

use super::chat::ChatTemplate;
use crate::error::{Error, Result};

/// Token ids and the byte range of each in the encoded text.
pub type Encoded = (Vec<u32>, Vec<(usize, usize)>);

/// A model folder's tokenizer (tokenizer.json) with what tokenizer_config.json adds: the special
/// tokens and the chat template.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    /// The beginning-of-sequence token's text, as the chat template sees it.
    pub bos_token: Option<String>,
    /// The end-of-sequence token's text.
    pub eos_token: Option<String>,
    /// The end-of-sequence token's id: generation stops at it.
    pub eos_id: Option<u32>,
    /// The model's chat template, if it has one.
    pub chat_template: Option<ChatTemplate>,
    /// The longest token of the vocabulary in UTF-8 bytes: n tokens never cover more than
    /// n times this many bytes of text (what lets a huge record be cut before it is encoded).
    pub max_token_bytes: usize,
}

fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

impl TextTokenizer {
    /// Loads `dir/tokenizer.json` with `dir/tokenizer_config.json` (special tokens, chat
    /// template) and `dir/chat_template.jinja` when present.
    pub fn load(dir: &Path) -> Result<TextTokenizer> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            return Err(format_err(dir, "no tokenizer.json in the model folder"));
        }
        let inner = tokenizers::Tokenizer::from_file(&tok_path)
            .map_err(|e| format_err(&tok_path, format!("cannot load the tokenizer: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path).map_err(|source| Error::Io {
                path: cfg_path.clone(),
                source,
            })?;
            serde_json::from_str(&text)
                .map_err(|e| format_err(&cfg_path, format!("not valid JSON: {e}")))?
        } else {
            Value::Null
        };
        let bos_token = token_string(cfg.get("bos_token"));
        let eos_token = token_string(cfg.get("eos_token"));
        let eos_id = eos_token.as_deref().and_then(|t| inner.token_to_id(t));
        let jinja_path = dir.join("chat_template.jinja");
        let template_text = if jinja_path.is_file() {
            Some(
                std::fs::read_to_string(&jinja_path).map_err(|source| Error::Io {
                    path: jinja_path.clone(),
                    source,
                })?,
            )
        } else {
            match cfg.get("chat_template") {
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: take "default".
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template").and_then(Value::as_str))
                    .map(str::to_string),
                _ => None,
            }
        };
        let chat_template = template_text
            .map(|t| {
                ChatTemplate::new(&t, bos_token.clone(), eos_token.clone())
                    .map_err(|e| format_err(&cfg_path, format!("chat template: {e}")))
            })
            .transpose()?;
        let max_token_bytes = inner
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(1);
        Ok(TextTokenizer {
            inner,
            bos_token,
            eos_token,
            eos_id,
            chat_template,
            max_token_bytes,
        })
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids and their byte ranges in `text`.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Encoded> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| {
            Error::InvalidArgument(format!("tokenizer failed on {:?}: {e}", preview(text)))
        })?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// The text of `ids` (special tokens left out with `skip_special_tokens`).
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::InvalidArgument(format!("tokenizer cannot decode {ids:?}: {e}")))
    }

    /// The id of one token's text, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// What `qlora-rs generate --chat` gives the model: `user` as the one user message, rendered
    /// by the chat template with the generation prompt and tokenized without adding special
    /// tokens, as `apply_chat_template([{"role": "user", "content": user}],
    /// add_generation_prompt=True)` does. An error where the tokenizer has no chat template.
    pub fn chat_prompt(&self, user: &str) -> Result<Vec<u32>> {
        let template = self.chat_template.as_ref().ok_or_else(|| {
            Error::InvalidArgument(
                "--chat needs a chat template, and the model's tokenizer_config.json has none; use --prompt".into(),
            )
        })?;
        let message = super::formats::Message {
            role: "user".into(),
            content: user.into(),
        };
        let text = template.render(&[message], true)?;
        Ok(self.encode(&text, false)?.0)
    }
}

fn preview(text: &str) -> String {
    text.chars().take(40).collect()
}
