//! Dataset formats, detected from a record's keys or named with `--format`:
//!
//! | format | keys | trained on (by default) |
//! |---|---|---|
//! | `text` | `text` | everything |
//! | `prompt-completion` | `prompt`, `completion` | the completion |
//! | `messages` | `messages`: `[{role, content}]` | assistant turns |
//! | `alpaca` | `instruction`, `output`, optional `input` | the output |
//! | `sharegpt` | `conversations`: `[{from, value}]` (`human`/`gpt`/`system`) | assistant turns |

use std::path::Path;

use serde_json::Value;

use super::records::Record;
use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    PromptCompletion,
    Messages,
    Alpaca,
    ShareGpt,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::PromptCompletion => "prompt-completion",
            Format::Messages => "messages",
            Format::Alpaca => "alpaca",
            Format::ShareGpt => "sharegpt",
        }
    }

    fn keys(self) -> &'static str {
        match self {
            Format::Text => "`text`",
            Format::PromptCompletion => "`prompt` and `completion`",
            Format::Messages => "`messages` (a list of {role, content})",
            Format::Alpaca => "`instruction` and `output` (and optionally `input`)",
            Format::ShareGpt => "`conversations` (a list of {from, value})",
        }
    }

    /// `auto` (None) or a format name.
    pub fn parse(s: &str) -> Result<Option<Format>> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "auto" => Ok(None),
            "text" => Ok(Some(Format::Text)),
            "prompt-completion" | "completion" => Ok(Some(Format::PromptCompletion)),
            "messages" | "chat" => Ok(Some(Format::Messages)),
            "alpaca" => Ok(Some(Format::Alpaca)),
            "sharegpt" => Ok(Some(Format::ShareGpt)),
            _ => Err(Error::InvalidArgument(format!(
                "unknown format `{s}`: use auto, text, prompt-completion, messages, alpaca or sharegpt"
            ))),
        }
    }

    /// The format a record's keys indicate.
    pub fn detect(r: &Record) -> Option<Format> {
        let has = |k: &str| r.fields.contains_key(k);
        if has("messages") {
            Some(Format::Messages)
        } else if has("conversations") {
            Some(Format::ShareGpt)
        } else if has("instruction") && has("output") {
            Some(Format::Alpaca)
        } else if has("prompt") && has("completion") {
            Some(Format::PromptCompletion)
        } else if has("text") {
            Some(Format::Text)
        } else {
            None
        }
    }
}

/// One chat message.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A record turned into what gets tokenized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Example {
    /// Plain text pieces; `true` marks the pieces that are trained on.
    Segments(Vec<(String, bool)>),
    /// A conversation for the chat template.
    Chat(Vec<Message>),
}

fn record_err(path: &Path, r: &Record, format: Format, what: String) -> Error {
    let mut found: Vec<&str> = r.fields.keys().map(String::as_str).collect();
    found.sort_unstable();
    Error::Format {
        path: path.to_path_buf(),
        msg: format!(
            "{}: {what}; format {} needs {} (found keys: {})",
            r.locate(),
            format.name(),
            format.keys(),
            found.join(", ")
        ),
    }
}

fn string<'a>(path: &Path, r: &'a Record, format: Format, key: &str) -> Result<&'a str> {
    match r.fields.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(record_err(
            path,
            r,
            format,
            format!("`{key}` is not a string"),
        )),
        None => Err(record_err(path, r, format, format!("`{key}` is missing"))),
    }
}

/// The roles chat templates know (OpenAI's and Hugging Face's names; `ipython` is Llama 3's
/// tool-result role).
const KNOWN_ROLES: [&str; 6] = [
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "ipython",
];

/// Levenshtein distance, for "did you mean" on short names.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

fn messages(
    path: &Path,
    r: &Record,
    format: Format,
    key: &str,
    role_key: &str,
    content_key: &str,
) -> Result<Vec<Message>> {
    let list = match r.fields.get(key) {
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(record_err(
                path,
                r,
                format,
                format!("`{key}` is not a list"),
            ))
        }
        None => return Err(record_err(path, r, format, format!("`{key}` is missing"))),
    };
    if list.is_empty() {
        return Err(record_err(path, r, format, format!("`{key}` is empty")));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let get = |k: &str| m.get(k).and_then(Value::as_str);
            match (get(role_key), get(content_key)) {
                (Some(role), Some(content)) => {
                    let role = match (format, role) {
                        (Format::ShareGpt, "human" | "user") => "user",
                        (Format::ShareGpt, "gpt" | "assistant" | "chatgpt" | "bing" | "bard") => "assistant",
                        (Format::ShareGpt, "system") => "system",
                        (Format::ShareGpt, other) => {
                            return Err(record_err(
                                path,
                                r,
                                format,
                                format!("message {i} has `{role_key}: {other}` (expected human, gpt or system)"),
                            ))
                        }
                        (_, other) if KNOWN_ROLES.contains(&other) => other,
                        (_, other) => {
                            let hint = KNOWN_ROLES
                                .iter()
                                .find(|k| edit_distance(k, other) <= 2)
                                .map(|k| format!("; did you mean `{k}`?"))
                                .unwrap_or_default();
                            return Err(record_err(
                                path,
                                r,
                                format,
                                format!(
                                    "message {i} has the unknown role `{other}` (expected one of \
                                     {}){hint}",
                                    KNOWN_ROLES.join(", ")
                                ),
                            ));
                        }
                    };
                    Ok(Message {
                        role: role.to_string(),
                        content: content.to_string(),
                    })
                }
                _ => Err(record_err(
                    path,
                    r,
                    format,
                    format!("message {i} needs string `{role_key}` and `{content_key}`"),
                )),
            }
        })
        .collect()
}

/// The classic Stanford Alpaca prompt, for models without a chat template.
fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately \
             completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides \
             further context. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    }
}

/// Converts a record. Alpaca records become a two-turn chat when the model has a chat template
/// (`chat = true`), else the Alpaca prompt text.
pub fn to_example(path: &Path, r: &Record, format: Format, chat: bool) -> Result<Example> {
    Ok(match format {
        Format::Text => {
            Example::Segments(vec![(string(path, r, format, "text")?.to_string(), true)])
        }
        Format::PromptCompletion => Example::Segments(vec![
            (string(path, r, format, "prompt")?.to_string(), false),
            (string(path, r, format, "completion")?.to_string(), true),
        ]),
        Format::Messages => {
            Example::Chat(messages(path, r, format, "messages", "role", "content")?)
        }
        Format::ShareGpt => {
            Example::Chat(messages(path, r, format, "conversations", "from", "value")?)
        }
        Format::Alpaca => {
            let instruction = string(path, r, format, "instruction")?;
            let output = string(path, r, format, "output")?;
            let input = match r.fields.get("input") {
                None | Some(Value::Null) => "",
                Some(Value::String(s)) => s,
                Some(_) => {
                    return Err(record_err(
                        path,
                        r,
                        format,
                        "`input` is not a string".into(),
                    ))
                }
            };
            if chat {
                let user = if input.is_empty() {
                    instruction.to_string()
                } else {
                    format!("{instruction}\n\n{input}")
                };
                Example::Chat(vec![
                    Message {
                        role: "user".into(),
                        content: user,
                    },
                    Message {
                        role: "assistant".into(),
                        content: output.to_string(),
                    },
                ])
            } else {
                Example::Segments(vec![
                    (alpaca_prompt(instruction, input), false),
                    (output.to_string(), true),
                ])
            }
        }
    })
}
