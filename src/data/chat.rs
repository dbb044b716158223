//! Chat templates: the model's Jinja template rendered with minijinja the way transformers'
//! `apply_chat_template` renders it (`trim_blocks`, `lstrip_blocks`, loop controls, Python
//! string methods, `raise_exception`, `tojson` without HTML escaping; `{% generation %}` markers
//! accepted and ignored), with `messages`, `bos_token`, `eos_token` and `add_generation_prompt`.
//!
//! Assistant spans for loss masking come from the template itself: for each assistant message
//! `i`, render `messages[..i]` with the generation prompt (`P`) and `messages[..=i]` without
//! (`Q`); the assistant's text is `Q[len(P)..]`. This works for any template whose renderings
//! extend each other, and is checked: a template that rewrites earlier turns is an error.

use minijinja::{context, Environment, ErrorKind};

use super::formats::Message;
use crate::error::{Error, Result};

pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

fn tojson(
    value: minijinja::Value,
    indent: Option<usize>,
) -> std::result::Result<String, minijinja::Error> {
    let v: serde_json::Value = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let out = match indent {
        Some(n) => {
            let indent = " ".repeat(n);
            let mut buf = Vec::new();
            let fmt = serde_json::ser::PrettyFormatter::with_indent(indent.as_bytes());
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
            serde::Serialize::serialize(&v, &mut ser)
                .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
            String::from_utf8(buf).expect("serde_json writes UTF-8")
        }
        // Python's json.dumps separators: ", " and ": ".
        None => python_json(&v),
    };
    Ok(out)
}

/// `json.dumps(v, ensure_ascii=False)`.
fn python_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Array(a) => {
            format!(
                "[{}]",
                a.iter().map(python_json).collect::<Vec<_>>().join(", ")
            )
        }
        serde_json::Value::Object(o) => format!(
            "{{{}}}",
            o.iter()
                .map(|(k, v)| format!(
                    "{}: {}",
                    serde_json::Value::String(k.clone()),
                    python_json(v)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => other.to_string(),
    }
}

impl ChatTemplate {
    pub fn new(
        template: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_filter("tojson", tojson);
        let source = strip_generation_tags(template);
        env.add_template_owned("chat", source)
            .map_err(|e| Error::InvalidArgument(format!("cannot parse the chat template: {e}")))?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders `messages`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat").expect("added in new()");
        tmpl.render(context! {
            messages => messages,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
            add_generation_prompt => add_generation_prompt,
        })
        .map_err(|e| {
            let mut msg = e.to_string();
            if let Some(d) = e.detail() {
                if !msg.contains(d) {
                    msg = format!("{msg}: {d}");
                }
            }
            Error::InvalidArgument(format!("chat template: {msg}"))
        })
    }

    /// The rendering of `messages` and the byte ranges of every assistant turn in it.
    pub fn render_with_assistant_spans(
        &self,
        messages: &[Message],
    ) -> Result<(String, Vec<(usize, usize)>)> {
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let prefix = self.render(&messages[..i], true)?;
            let upto = self.render(&messages[..=i], false)?;
            if !upto.starts_with(&prefix) || !full.starts_with(&upto) {
                return Err(Error::InvalidArgument(format!(
                    "the chat template renders message {i} in a way that changes earlier text, so \
                     assistant turns cannot be located; use --train-on-prompt to train on everything"
                )));
            }
            spans.push((prefix.len(), upto.len()));
        }
        Ok((full, spans))
    }
}

/// Removes transformers' `{% generation %}` / `{% endgeneration %}` markers (they only tag
/// assistant text for `return_assistant_tokens_mask`; we find those spans ourselves).
fn strip_generation_tags(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let tag = &rest[start + 2..start + len];
        let word = tag.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        out.push_str(&rest[..start]);
        if word != "generation" && word != "endgeneration" {
            out.push_str(&rest[start..start + len + 2]);
        }
        rest = &rest[start + len + 2..];
    }
    out.push_str(rest);
    out
}
