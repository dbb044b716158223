//! Dataset formats, detected from a record's keys or named with `--format`:
//!
//! | format | keys | trained on (by default) |
//! |---|---|---|
//! | `text` | `text` | everything |
//! | `prompt-completion` | `prompt`, `completion` (strings, or lists of messages) | the completion |
//! | `messages` | `messages`: `[{role, content}]` | assistant turns |
//! | `alpaca` | `instruction`, `output`, optional `input` | the output |
//! | `sharegpt` | `conversations`: `[{from, value}]` (`human`/`gpt`/`system`) | assistant turns |
//!
//! Messages reach the chat template as `apply_chat_template` passes them: every key kept, keys
//! whose value is null dropped (so `content: null` beside `tool_calls` is the OpenAI layout, as
//! transformers normalizes it), `reasoning_content` filled from `thinking` or `reasoning` and
//! `thinking` from it (transformers' reasoning aliases). Content given as a list of parts is
//! joined as transformers' OpenAI-compatible server joins it for text models (the `text` of
//! every `text`, `input_text` or `output_text` part, separated by spaces); any other part
//! (`image_url`, `input_audio`, …) is refused by name. Assistant `tool_calls` (`{function:
//! {name, arguments}}` or `{name, arguments}`, arguments an object or a JSON string) and `tool`
//! messages are passed as they are; a record's `tools` (a list, or a JSON string of one, as TRL
//! reads it) or else `--tools` is the template's `tools`, and a record's
//! `chat_template_kwargs` (TRL's per-record key) go over `--chat-template-kwargs`. An assistant
//! message with OpenAI's `weight: 0` is rendered but not trained on.
//!
//! Nothing is dropped without a word: a record key that the format does not read (`id`,
//! `source`, …), a ShareGPT message key other than `from` and `value`, a message key that the
//! chat template never reads (`name` or `tool_call_id` for templates that do not print them), a
//! tool call's key that it never reads (`messages[].tool_calls[].id`, `…type`, a stray key in
//! `function`) and a record's `chat_template_kwargs` entry the template never reads are counted
//! and named in the data summary (and `--chat-template-kwargs` keys it never reads are warned
//! about there: [`super::option_warnings`]). Where leaving a key out would change what is
//! trained, the record is refused instead (see [`LOSS_KEYS`] and [`CONTEXT_KEYS`]): keys that ask
//! for a loss mask or weight we do not apply, record keys that hold prompt text the format does
//! not render (`system`, `history`), `tools` with a template that never reads them, and text of a
//! trained turn (`content`, `tool_calls`, a call's `function`, `name` or `arguments`, reasoning)
//! that the template never reads.

use std::path::Path;

use minijinja::value::ValueKind;
use serde_json::Value;

use super::chat::{ChatInput, ChatTemplate};
use super::records::Record;
use crate::error::{Error, Result};

/// The layouts of a training record, told apart by their keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `{"text": …}`: plain text, every token trained.
    Text,
    /// `{"prompt": …, "completion": …}`: strings, or lists of messages (TRL's conversational form).
    PromptCompletion,
    /// `{"messages": [{"role", "content"}, …]}`, rendered with the model's chat template.
    Messages,
    /// `{"instruction", "input", "output"}`, rendered as a user and an assistant turn.
    Alpaca,
    /// `{"conversations": [{"from", "value"}, …]}`, mapped to messages.
    ShareGpt,
}

impl Format {
    /// The name `--format` takes.
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
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The message's text.
    pub content: String,
}

/// A conversation for the chat template, and which of its messages carry loss.
#[derive(Clone, Debug, PartialEq)]
pub struct Conversation {
    /// The messages (and tools, template variables) as the template receives them.
    pub input: ChatInput,
    /// Per message: an assistant turn that is trained on (not `weight: 0`).
    pub trained: Vec<bool>,
    /// Conversational prompt-completion: the first `n` messages are the prompt, and the tokens
    /// past where the prompt's rendering (with the generation prompt) stops agreeing with the
    /// whole are trained on (TRL's completion mask).
    pub prompt_len: Option<usize>,
    /// The keys the record gave, for the account of what the template did not use (empty for
    /// conversations qlora-rs builds itself, from Alpaca or ShareGPT records).
    pub given: GivenKeys,
}

/// The keys a record's messages and `chat_template_kwargs` had, before they reached the template.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GivenKeys {
    /// Per message: the list it came from (`messages`, `prompt` or `completion`), its index in
    /// that list, and its keys with a non-null value, in the file's order.
    pub messages: Vec<(&'static str, usize, Vec<String>)>,
    /// The names in the record's own `chat_template_kwargs`.
    pub kwargs: Vec<String>,
}

/// Message keys that would ask for a loss mask or weight that qlora-rs does not apply (OpenAI's
/// `weight` is the one it reads): a record with one is refused rather than trained otherwise
/// than it says.
pub const LOSS_KEYS: [&str; 8] = [
    "train",
    "training",
    "trainable",
    "train_detail",
    "loss",
    "loss_weight",
    "mask",
    "masked",
];

/// Record keys whose text would be left out of the prompt (a `system` prompt beside the
/// messages, LLaMA-Factory's `history` of earlier turns) or whose weighting would not be applied:
/// a record with one (not null or empty) is refused.
pub const CONTEXT_KEYS: [&str; 6] = [
    "system",
    "system_prompt",
    "history",
    "weight",
    "loss_weight",
    "sample_weight",
];

/// The keys of a message that hold text it renders; with the reasoning aliases read as one.
const REASONING_KEYS: [&str; 3] = ["reasoning_content", "thinking", "reasoning"];

/// The keys of a tool call that hold what it calls (as [`GivenKeys`] labels them): a trained
/// turn's call whose template never reads one of them is refused.
const TOOL_CALL_TEXT: [&str; 5] = [
    "tool_calls[].function",
    "tool_calls[].function.name",
    "tool_calls[].function.arguments",
    "tool_calls[].name",
    "tool_calls[].arguments",
];

/// A value that carries nothing: null, an empty string, list or object.
fn is_empty_value(v: &minijinja::Value) -> bool {
    v.is_undefined()
        || v.is_none()
        || v.as_str().is_some_and(|s| s.trim().is_empty())
        || (matches!(v.kind(), ValueKind::Seq | ValueKind::Map) && v.len() == Some(0))
}

impl Conversation {
    /// Plain `{role, content}` messages, assistant turns trained.
    pub fn from_messages(messages: &[Message]) -> Conversation {
        Conversation {
            input: ChatInput::from_messages(messages),
            trained: messages.iter().map(|m| m.role == "assistant").collect(),
            prompt_len: None,
            given: GivenKeys::default(),
        }
    }

    /// Plain `{role, content}` messages (ShareGPT, or Alpaca rendered with the chat template),
    /// assistant turns trained, with `--tools` and `--chat-template-kwargs`.
    pub fn with_options(messages: &[Message], opts: &ChatOptions) -> Conversation {
        let mut c = Conversation::from_messages(messages);
        c.input.tools = opts.tools.clone();
        c.input.kwargs = opts.kwargs.clone();
        c
    }

    /// After rendering: the keys the record gave that neither qlora-rs nor the template used
    /// (as summary labels such as `messages[].name`), or why the record cannot be trained as
    /// given (a trained turn's text, or the tools, that the template never reads).
    pub fn unused_keys(&self, template: &ChatTemplate) -> std::result::Result<Vec<String>, String> {
        let tools = self.input.tools.as_ref();
        if tools.is_some_and(|t| !is_empty_value(t)) && !template.uses_variable("tools") {
            return Err(
                "has tools, but the chat template never reads `tools`, so the tool \
                        definitions would be left out of the prompt (use a template with tool \
                        support, or remove them)"
                    .into(),
            );
        }
        let mut unused = Vec::new();
        for (i, (list, index, keys)) in self.given.messages.iter().enumerate() {
            let read = self.input.reads.read(i);
            let trained = match self.prompt_len {
                Some(n) => i >= n,
                None => self.trained.get(i).copied().unwrap_or(false),
            };
            // Unread keys, and those under them (said once, by the outermost).
            let mut unread: Vec<&str> = Vec::new();
            for k in keys {
                let used = match k.as_str() {
                    "role" | "weight" => true,
                    k if REASONING_KEYS.contains(&k) => {
                        REASONING_KEYS.iter().any(|r| read.contains(*r))
                    }
                    k => read.contains(k),
                };
                if used {
                    continue;
                }
                let parent = k.rsplit_once('.').map(|(p, _)| p.trim_end_matches("[]"));
                let under_unread = parent.is_some_and(|p| unread.contains(&p));
                unread.push(k);
                if under_unread {
                    continue;
                }
                let carries = if k.contains('.') {
                    // A tool call's function, name and arguments, whatever their value.
                    TOOL_CALL_TEXT.contains(&k.as_str())
                } else {
                    let text = ["content", "tool_calls"].contains(&k.as_str())
                        || REASONING_KEYS.contains(&k.as_str());
                    text && !is_empty_value(&self.input.messages[i].get_attr(k).unwrap_or_default())
                };
                if trained && carries {
                    let which = if *list == "messages" {
                        format!("message {index}")
                    } else {
                        format!("`{list}` message {index}")
                    };
                    let fix = if k.contains('.') {
                        "use a template that renders tool calls laid out so, or give them the \
                         other way: {\"function\": {\"name\": …, \"arguments\": …}} or \
                         {\"name\": …, \"arguments\": …}"
                    } else {
                        "use a template that renders it, or move it into `content`"
                    };
                    return Err(format!(
                        "{which} is trained on, but the chat template never reads its `{k}`, so \
                         that text would be left out of what is trained ({fix})"
                    ));
                }
                unused.push(format!("{list}[].{k}"));
            }
        }
        for k in &self.given.kwargs {
            if !template.uses_variable(k) {
                unused.push(format!("chat_template_kwargs.{k}"));
            }
        }
        Ok(unused)
    }

    /// No message has any text, reasoning or tool call.
    pub fn is_blank(&self) -> bool {
        self.input.messages.iter().all(|m| {
            let text = |k: &str| {
                m.get_attr(k)
                    .ok()
                    .and_then(|v| v.as_str().map(|s| s.trim().is_empty()))
                    .unwrap_or(true)
            };
            text("content")
                && text("reasoning_content")
                && m.get_attr("tool_calls")
                    .map(|v| v.len().unwrap_or(0) == 0)
                    .unwrap_or(true)
        })
    }
}

/// A record turned into what gets tokenized.
#[derive(Clone, Debug, PartialEq)]
pub enum Example {
    /// Plain text pieces; `true` marks the pieces that are trained on.
    Segments(Vec<(String, bool)>),
    /// A conversation for the chat template.
    Chat(Conversation),
}

impl Example {
    /// A chat of plain `{role, content}` messages.
    pub fn chat(messages: &[Message]) -> Example {
        Example::Chat(Conversation::from_messages(messages))
    }
}

/// What the command line adds to every chat record: `--tools` and `--chat-template-kwargs`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChatOptions {
    /// The tool definitions of records that have no `tools` of their own.
    pub tools: Option<minijinja::Value>,
    /// Extra template variables (a record's `chat_template_kwargs` go over these).
    pub kwargs: Vec<(String, minijinja::Value)>,
}

impl ChatOptions {
    /// `--tools FILE` (a JSON list of tool definitions) and `--chat-template-kwargs JSON` (an
    /// object).
    pub fn parse(tools: Option<&Path>, kwargs: Option<&str>) -> Result<ChatOptions> {
        let tools = match tools {
            None => None,
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| Error::Io {
                    path: p.to_path_buf(),
                    source,
                })?;
                let v: minijinja::Value =
                    serde_json::from_str(&text).map_err(|e| Error::Format {
                        path: p.to_path_buf(),
                        msg: format!("--tools: not valid JSON: {e}"),
                    })?;
                check_tools(&v).map_err(|what| Error::Format {
                    path: p.to_path_buf(),
                    msg: format!("--tools: {what}"),
                })?;
                Some(v)
            }
        };
        let kwargs = match kwargs {
            None => Vec::new(),
            Some(s) => {
                let v: minijinja::Value = serde_json::from_str(s).map_err(|e| {
                    Error::InvalidArgument(format!("--chat-template-kwargs: not valid JSON: {e}"))
                })?;
                map_entries(&v).ok_or_else(|| {
                    Error::InvalidArgument(
                        "--chat-template-kwargs must be a JSON object, e.g. '{\"enable_thinking\": false}'"
                            .into(),
                    )
                })?
            }
        };
        Ok(ChatOptions { tools, kwargs })
    }
}

/// Template variables by name, in order.
type TemplateKwargs = Vec<(String, minijinja::Value)>;

/// The entries of a map value, in order; `None` when it is not a map.
fn map_entries(v: &minijinja::Value) -> Option<Vec<(String, minijinja::Value)>> {
    if v.kind() != ValueKind::Map {
        return None;
    }
    v.try_iter()
        .ok()?
        .map(|k| {
            let val = v.get_item(&k).ok()?;
            Some((k.as_str()?.to_string(), val))
        })
        .collect()
}

fn check_tools(v: &minijinja::Value) -> std::result::Result<(), String> {
    if v.kind() != ValueKind::Seq {
        return Err(format!(
            "tools must be a list of tool definitions, found {}",
            v.kind()
        ));
    }
    for (j, t) in v.try_iter().map_err(|e| e.to_string())?.enumerate() {
        if t.kind() != ValueKind::Map {
            return Err(format!("tool {j} is not an object (found {})", t.kind()));
        }
    }
    Ok(())
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
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
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

/// The messages of a list of `{role_key, content_key}` objects (ShareGPT's `conversations`), and
/// the other keys they had, as summary labels (an error for the keys that would ask for a loss
/// mask: [`LOSS_KEYS`] and `weight`).
fn messages(
    path: &Path,
    r: &Record,
    format: Format,
    key: &str,
    role_key: &str,
    content_key: &str,
) -> Result<(Vec<Message>, Vec<String>)> {
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
    let out = list
        .iter()
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
        .collect::<Result<Vec<Message>>>()?;
    let mut unused = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let Some(m) = m.as_object() else { continue };
        for (k, v) in m {
            if k == role_key || k == content_key || v.is_null() {
                continue;
            }
            if k == "weight" {
                return Err(msg_err(
                    path,
                    r,
                    key,
                    i,
                    format!(
                        "has `weight`, which format {} does not read, so the loss would not \
                         follow it (OpenAI's `weight` is read in the messages format)",
                        format.name()
                    ),
                ));
            }
            loss_key(std::iter::once(k.as_str())).map_err(|what| msg_err(path, r, key, i, what))?;
            unused.push(format!("{key}[].{k}"));
        }
    }
    Ok((out, unused))
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

fn msg_err(path: &Path, r: &Record, key: &str, i: usize, what: String) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: if key == "messages" {
            format!("{}: message {i} {what}", r.locate())
        } else {
            format!("{}: `{key}` message {i} {what}", r.locate())
        },
    }
}

/// Text parts joined as transformers' server joins them for text-only models.
fn join_parts(list: &minijinja::Value) -> std::result::Result<String, String> {
    let mut texts = Vec::new();
    for (j, part) in list.try_iter().map_err(|e| e.to_string())?.enumerate() {
        let Some(entries) = map_entries(&part) else {
            return Err(format!(
                "has content part {j} that is not an object (found {})",
                part.kind()
            ));
        };
        let get = |k: &str| entries.iter().find(|(n, _)| n == k).map(|(_, v)| v);
        let kind = get("type").and_then(|t| t.as_str()).ok_or_else(|| {
            format!("has content part {j} without a string `type` (expected \"text\")")
        })?;
        match kind {
            "text" | "input_text" | "output_text" => match get("text").and_then(|t| t.as_str()) {
                Some(t) => texts.push(t.to_string()),
                None => {
                    return Err(format!(
                        "has content part {j} of type {kind} without a string `text`"
                    ))
                }
            },
            other => {
                return Err(format!(
                    "has content part {j} of type `{other}`: qlora-rs trains text-only models, so \
                     only text parts (type text, input_text or output_text) can be used"
                ))
            }
        }
    }
    Ok(texts.join(" "))
}

fn check_tool_call(j: usize, c: &minijinja::Value) -> std::result::Result<(), String> {
    if c.kind() != ValueKind::Map {
        return Err(format!(
            "has tool call {j} that is not an object (found {})",
            c.kind()
        ));
    }
    let f = match c.get_attr("function") {
        Ok(f) if f.kind() == ValueKind::Map => f,
        Ok(f) if !f.is_undefined() && !f.is_none() => {
            return Err(format!(
                "has tool call {j} whose `function` is not an object"
            ))
        }
        _ => c.clone(),
    };
    if f.get_attr("name")
        .ok()
        .and_then(|n| n.as_str().map(str::to_string))
        .is_none()
    {
        return Err(format!("has tool call {j} without a string `name` (expected {{\"function\": {{\"name\": …, \"arguments\": …}}}})"));
    }
    let args = f.get_attr("arguments").unwrap_or_default();
    match args.kind() {
        ValueKind::Map => Ok(()),
        ValueKind::String => {
            let s = args.as_str().unwrap_or_default();
            serde_json::from_str::<Value>(s).map(|_| ()).map_err(|e| {
                format!("has tool call {j} whose `arguments` string is not valid JSON ({e})")
            })
        }
        ValueKind::Undefined | ValueKind::None => {
            Err(format!("has tool call {j} without `arguments`"))
        }
        other => Err(format!(
            "has tool call {j} whose `arguments` is a {other} (expected an object or a JSON string)"
        )),
    }
}

/// The keys a tool call was given (not null), as labels under its message: `tool_calls[].id`,
/// `tool_calls[].function`, `tool_calls[].function.name`, ….
fn tool_call_keys(c: &minijinja::Value) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in map_entries(c).unwrap_or_default() {
        if v.is_none() {
            continue;
        }
        out.push(format!("tool_calls[].{k}"));
        if k == "function" {
            for (f, v) in map_entries(&v).unwrap_or_default() {
                if !v.is_none() {
                    out.push(format!("tool_calls[].function.{f}"));
                }
            }
        }
    }
    out
}

/// A message as the template receives it, whether it is trained on, and the keys it was given.
type ChatMessage = (minijinja::Value, bool, Vec<String>);

/// The message key of [`LOSS_KEYS`] that `keys` holds, refused.
fn loss_key<'a>(mut keys: impl Iterator<Item = &'a str>) -> std::result::Result<(), String> {
    match keys.find(|k| LOSS_KEYS.contains(k)) {
        Some(k) => Err(format!(
            "has `{k}`, which qlora-rs does not read, so the loss would not follow it (leave an \
             assistant turn out of the loss with `weight: 0` in the messages format, or remove \
             the key)"
        )),
        None => Ok(()),
    }
}

/// One message of a `messages` list as `apply_chat_template` passes it (see the module notes),
/// whether it is trained on, and its keys.
fn chat_message(m: &minijinja::Value) -> std::result::Result<ChatMessage, String> {
    let Some(entries) = map_entries(m) else {
        return Err(format!("is not an object (found {})", m.kind()));
    };
    // transformers drops the keys whose value is None.
    let mut entries: Vec<(String, minijinja::Value)> =
        entries.into_iter().filter(|(_, v)| !v.is_none()).collect();
    let mut given: Vec<String> = entries.iter().map(|(k, _)| k.clone()).collect();
    loss_key(given.iter().map(String::as_str))?;
    let get = |entries: &[(String, minijinja::Value)], k: &str| {
        entries.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    };
    let role = match get(&entries, "role") {
        Some(v) => v
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("has a `role` that is not a string (found {})", v.kind()))?,
        None => return Err("has no `role`".into()),
    };
    if !KNOWN_ROLES.contains(&role.as_str()) {
        let hint = KNOWN_ROLES
            .iter()
            .find(|k| edit_distance(k, &role) <= 2)
            .map(|k| format!("; did you mean `{k}`?"))
            .unwrap_or_default();
        return Err(format!(
            "has the unknown role `{role}` (expected one of {}){hint}",
            KNOWN_ROLES.join(", ")
        ));
    }
    let assistant = role == "assistant";
    let tool_calls = get(&entries, "tool_calls");
    if let Some(calls) = &tool_calls {
        if !assistant {
            return Err(format!(
                "has `tool_calls` but its role is {role} (only assistant messages call tools)"
            ));
        }
        if calls.kind() != ValueKind::Seq {
            return Err(format!(
                "has `tool_calls` that is not a list (found {})",
                calls.kind()
            ));
        }
        for (j, c) in calls.try_iter().map_err(|e| e.to_string())?.enumerate() {
            check_tool_call(j, &c)?;
            given.extend(tool_call_keys(&c));
        }
    }
    match get(&entries, "content") {
        None if tool_calls.is_some() => {}
        None => return Err("has no `content` (missing or null, and no `tool_calls`)".into()),
        Some(c) if c.kind() == ValueKind::String => {}
        Some(c) if c.kind() == ValueKind::Seq => {
            let joined = minijinja::Value::from(join_parts(&c)?);
            for e in entries.iter_mut().filter(|(k, _)| k == "content") {
                e.1 = joined.clone();
            }
        }
        Some(c) => {
            return Err(format!(
                "has `content` that is a {} (expected a string or a list of text parts)",
                c.kind()
            ))
        }
    }
    let mut trained = assistant;
    if let Some(w) = get(&entries, "weight") {
        if !assistant {
            return Err(format!(
                "has `weight` but its role is {role} (OpenAI's weight is for assistant messages)"
            ));
        }
        match w.as_i64() {
            Some(0) if w.is_integer() => trained = false,
            Some(1) if w.is_integer() => {}
            _ => return Err(format!("has `weight: {w}` (expected 0 or 1)")),
        }
    }
    // transformers' reasoning aliases: `reasoning_content` from `thinking` or `reasoning`, and
    // `thinking` first (for templates that read that name).
    let reasoning = ["reasoning_content", "thinking", "reasoning"]
        .iter()
        .find_map(|k| get(&entries, k));
    if let Some(r) = reasoning {
        let mut out = vec![("thinking".to_string(), r.clone())];
        for (k, v) in entries {
            if k == "thinking" {
                out[0].1 = v;
            } else {
                out.push((k, v));
            }
        }
        match out.iter_mut().find(|(k, _)| k == "reasoning_content") {
            Some(e) => e.1 = r,
            None => out.push(("reasoning_content".into(), r)),
        }
        entries = out;
    }
    Ok((entries.into_iter().collect(), trained, given))
}

/// The messages of one list, whether each is trained on, and where each came from.
type ChatList = (
    Vec<minijinja::Value>,
    Vec<bool>,
    Vec<(&'static str, usize, Vec<String>)>,
);

/// A list of messages (a record's `messages`, or its `prompt` or `completion` list).
fn chat_list(
    path: &Path,
    r: &Record,
    key: &'static str,
    list: &minijinja::Value,
) -> Result<ChatList> {
    let mut messages = Vec::new();
    let mut trained = Vec::new();
    let mut given = Vec::new();
    for (i, m) in list
        .try_iter()
        .map_err(|e| msg_err(path, r, key, 0, e.to_string()))?
        .enumerate()
    {
        let (m, t, keys) = chat_message(&m).map_err(|what| msg_err(path, r, key, i, what))?;
        messages.push(m);
        trained.push(t);
        given.push((key, i, keys));
    }
    Ok((messages, trained, given))
}

/// The record's `tools` (or `--tools`) and template kwargs (`--chat-template-kwargs` with the
/// record's `chat_template_kwargs` over them).
fn chat_extras(
    path: &Path,
    r: &Record,
    ordered: &minijinja::Value,
    opts: &ChatOptions,
) -> Result<(Option<minijinja::Value>, TemplateKwargs, Vec<String>)> {
    let bad = |what: String| Error::Format {
        path: path.to_path_buf(),
        msg: format!("{}: {what}", r.locate()),
    };
    let tools = match ordered.get_attr("tools").unwrap_or_default() {
        t if t.is_undefined() || t.is_none() => opts.tools.clone(),
        t => {
            let t = match t.as_str() {
                Some(s) => serde_json::from_str(s)
                    .map_err(|e| bad(format!("`tools` is a string that is not valid JSON: {e}")))?,
                None => t,
            };
            check_tools(&t).map_err(|w| bad(format!("`tools`: {w}")))?;
            Some(t)
        }
    };
    let mut kwargs = opts.kwargs.clone();
    let mut own = Vec::new();
    match ordered.get_attr("chat_template_kwargs").unwrap_or_default() {
        k if k.is_undefined() || k.is_none() => {}
        k => {
            let entries = map_entries(&k)
                .ok_or_else(|| bad("`chat_template_kwargs` is not an object".into()))?;
            for (name, v) in entries {
                kwargs.retain(|(n, _)| *n != name);
                own.push(name.clone());
                kwargs.push((name, v));
            }
        }
    }
    Ok((tools, kwargs, own))
}

fn ordered(path: &Path, r: &Record) -> Result<minijinja::Value> {
    r.ordered().map_err(|e| Error::Format {
        path: path.to_path_buf(),
        msg: format!("{}: {e}", r.locate()),
    })
}

/// Chat-only keys on a record that is not rendered with the chat template.
fn no_chat_keys(path: &Path, r: &Record, format: Format) -> Result<()> {
    for key in ["tools", "chat_template_kwargs"] {
        if r.fields.contains_key(key) {
            return Err(record_err(
                path,
                r,
                format,
                format!("`{key}` is only used with chat records (messages, or prompt and completion as lists of messages)"),
            ));
        }
    }
    Ok(())
}

/// A record converted, with what the conversion did not use.
#[derive(Clone, Debug, PartialEq)]
pub struct Converted {
    /// What gets tokenized.
    pub example: Example,
    /// The record's layout: the format's name, or `prompt-completion (conversational)` for
    /// prompt and completion given as lists of messages.
    pub kind: &'static str,
    /// Keys the conversion did not read, as summary labels (`record key `id``,
    /// `conversations[].name`); a chat template's unread message keys are found when it renders
    /// ([`Conversation::unused_keys`]).
    pub unused: Vec<String>,
}

/// Converts a record. Alpaca records become a two-turn chat when the model has a chat template
/// (`chat = true`), else the Alpaca prompt text.
pub fn to_example(
    path: &Path,
    r: &Record,
    format: Format,
    chat: bool,
    opts: &ChatOptions,
) -> Result<Example> {
    convert(path, r, format, chat, opts).map(|c| c.example)
}

/// The record keys a format reads.
fn record_keys(format: Format, conversational: bool) -> &'static [&'static str] {
    match format {
        Format::Text => &["text"],
        Format::PromptCompletion if conversational => {
            &["prompt", "completion", "tools", "chat_template_kwargs"]
        }
        Format::PromptCompletion => &["prompt", "completion"],
        Format::Messages => &["messages", "tools", "chat_template_kwargs"],
        Format::Alpaca => &["instruction", "input", "output"],
        Format::ShareGpt => &["conversations"],
    }
}

/// The record keys `format` does not read, as summary labels; an error for the keys of
/// [`CONTEXT_KEYS`] whose leaving out would change what is trained.
fn unread_record_keys(
    path: &Path,
    r: &Record,
    format: Format,
    conversational: bool,
) -> Result<Vec<String>> {
    let used = record_keys(format, conversational);
    let mut unused = Vec::new();
    for (k, v) in &r.fields {
        if used.contains(&k.as_str()) || v.is_null() {
            continue;
        }
        if CONTEXT_KEYS.contains(&k.as_str()) {
            let weight = k.contains("weight");
            let harmless = if weight {
                v.as_f64() == Some(1.0)
            } else {
                is_empty_value(&minijinja::Value::from_serialize(v))
            };
            if !harmless {
                let why = if weight {
                    "qlora-rs does not weight records, so the loss would not follow it (remove it, \
                     or leave the record out)"
                        .to_string()
                } else {
                    format!(
                        "format {} does not read it, so its text would be left out of the prompt \
                         ({}, or remove it)",
                        format.name(),
                        if k == "history" {
                            "give the earlier turns as `messages`"
                        } else {
                            "give it as a first message with role system, in the messages format"
                        }
                    )
                };
                return Err(Error::Format {
                    path: path.to_path_buf(),
                    msg: format!("{}: has `{k}`: {why}", r.locate()),
                });
            }
        }
        unused.push(format!("record key `{k}`"));
    }
    Ok(unused)
}

/// [`to_example`] with the record's layout and the keys it did not read.
pub fn convert(
    path: &Path,
    r: &Record,
    format: Format,
    chat: bool,
    opts: &ChatOptions,
) -> Result<Converted> {
    let conversational = format == Format::PromptCompletion
        && (matches!(r.fields.get("prompt"), Some(Value::Array(_)))
            || matches!(r.fields.get("completion"), Some(Value::Array(_))));
    let mut unused = Vec::new();
    let example = match format {
        Format::Text => {
            no_chat_keys(path, r, format)?;
            Example::Segments(vec![(string(path, r, format, "text")?.to_string(), true)])
        }
        Format::PromptCompletion if conversational => {
            // TRL's conversational prompt-completion.
            let o = ordered(path, r)?;
            let mut lists = Vec::new();
            for key in ["prompt", "completion"] {
                let list = o.get_attr(key).unwrap_or_default();
                if list.kind() != ValueKind::Seq {
                    return Err(record_err(
                        path,
                        r,
                        format,
                        format!(
                            "`{key}` is not a list of messages (found {}), and the other one is: \
                             give both as strings or both as lists",
                            list.kind()
                        ),
                    ));
                }
                if list.len() == Some(0) {
                    return Err(record_err(path, r, format, format!("`{key}` is empty")));
                }
                lists.push(chat_list(path, r, key, &list)?);
            }
            let (completion, _, completion_keys) = lists.pop().expect("two lists");
            let (mut messages, _, mut message_keys) = lists.pop().expect("two lists");
            message_keys.extend(completion_keys);
            let weightless = o
                .get_attr("completion")
                .ok()
                .and_then(|c| c.try_iter().ok())
                .and_then(|mut it| {
                    it.position(|m| m.get_attr("weight").ok().and_then(|w| w.as_i64()) == Some(0))
                });
            if let Some(i) = weightless {
                return Err(msg_err(
                    path,
                    r,
                    "completion",
                    i,
                    "has `weight: 0`; with prompt-completion the whole completion is trained on \
                     (use the messages format to leave turns out)"
                        .into(),
                ));
            }
            let prompt_len = messages.len();
            messages.extend(completion);
            let (tools, kwargs, own) = chat_extras(path, r, &o, opts)?;
            let given = GivenKeys {
                messages: message_keys,
                kwargs: own,
            };
            Example::Chat(Conversation {
                trained: vec![false; messages.len()],
                input: ChatInput {
                    messages,
                    tools,
                    kwargs,
                    ..ChatInput::default()
                },
                prompt_len: Some(prompt_len),
                given,
            })
        }
        Format::PromptCompletion => {
            no_chat_keys(path, r, format)?;
            Example::Segments(vec![
                (string(path, r, format, "prompt")?.to_string(), false),
                (string(path, r, format, "completion")?.to_string(), true),
            ])
        }
        Format::Messages => {
            let o = ordered(path, r)?;
            match o.get_attr("messages").unwrap_or_default() {
                l if l.kind() == ValueKind::Seq && l.len() != Some(0) => {
                    let (messages, trained, message_keys) = chat_list(path, r, "messages", &l)?;
                    let (tools, kwargs, own) = chat_extras(path, r, &o, opts)?;
                    let given = GivenKeys {
                        messages: message_keys,
                        kwargs: own,
                    };
                    Example::Chat(Conversation {
                        input: ChatInput {
                            messages,
                            tools,
                            kwargs,
                            ..ChatInput::default()
                        },
                        trained,
                        prompt_len: None,
                        given,
                    })
                }
                l if l.kind() == ValueKind::Seq => {
                    return Err(record_err(path, r, format, "`messages` is empty".into()))
                }
                l if l.is_undefined() => {
                    return Err(record_err(path, r, format, "`messages` is missing".into()))
                }
                _ => {
                    return Err(record_err(
                        path,
                        r,
                        format,
                        "`messages` is not a list".into(),
                    ))
                }
            }
        }
        Format::ShareGpt => {
            no_chat_keys(path, r, format)?;
            let (list, unread) = messages(path, r, format, "conversations", "from", "value")?;
            unused.extend(unread);
            Example::Chat(Conversation::with_options(&list, opts))
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
            no_chat_keys(path, r, format)?;
            if chat {
                let user = if input.is_empty() {
                    instruction.to_string()
                } else {
                    format!("{instruction}\n\n{input}")
                };
                Example::Chat(Conversation::with_options(
                    &[
                        Message {
                            role: "user".into(),
                            content: user,
                        },
                        Message {
                            role: "assistant".into(),
                            content: output.to_string(),
                        },
                    ],
                    opts,
                ))
            } else {
                Example::Segments(vec![
                    (alpaca_prompt(instruction, input), false),
                    (output.to_string(), true),
                ])
            }
        }
    };
    unused.splice(0..0, unread_record_keys(path, r, format, conversational)?);
    Ok(Converted {
        example,
        kind: if conversational {
            "prompt-completion (conversational)"
        } else {
            format.name()
        },
        unused,
    })
}
