//! Chat templates: the model's Jinja template rendered with minijinja the way transformers'
//! `apply_chat_template` renders it (`trim_blocks`, `lstrip_blocks`, loop controls, Python
//! string methods; jinja2's `trim`, with Python's whitespace; the helpers transformers adds:
//! `raise_exception`, `strftime_now` and a `tojson` without HTML escaping; `{% generation %}`
//! markers accepted and ignored), with `messages`, `tools`, `documents`, `bos_token`,
//! `eos_token`, `add_generation_prompt` and the caller's extra keyword arguments
//! (`--chat-template-kwargs`), which override the others.
//!
//! Assistant spans for loss masking come from the template itself. First the prefix rule: for
//! each assistant message `i`, render `messages[..i]` with the generation prompt (`P`) and
//! `messages[..=i]` without (`Q`); the assistant's text is `Q[len(P)..]`. That needs renderings
//! that extend each other; templates that re-render earlier turns (Qwen3 drops the reasoning of
//! turns before the last user message, and renders a last assistant turn differently) break it,
//! so then each turn is located in the one full rendering: a private-use character is put at the
//! end of every message's text (or its last tool call's name), the conversation is rendered once
//! with them, and — after checking that taking them out gives the full rendering exactly — a
//! turn starts where the text after the previous message's mark stops agreeing with `P`, and
//! ends where the text after its own mark stops agreeing with `Q`. On either path, where `P`
//! reaches past the role header into the turn (Qwen3's generation prompt with `enable_thinking:
//! false` ends in an empty think block, which a single-turn record's rendering shares; a turn
//! starting `<tool_call>` shares its `<t` by chance), the turn starts right after the header,
//! which is found by rendering a plain assistant message in its place: the think block a turn
//! shows, empty or not, is trained, as TRL's generation markers for Qwen3 train it. A template
//! that closes the conversation with `eos_token` where there is no generation prompt (Phi-3's
//! and Phi-3.5's, after the last message) ends every `Q` with it: on either path, where the full
//! rendering does not go on with all of `Q` (a turn before the last) the turn ends before that
//! eos_token (after its `<|end|>\n`, not in the `<|` that eos_token `<|endoftext|>` and the next
//! role header `<|user|>` share), and the last turn takes it, as TRL's generation markers for
//! Phi-3 train them. A turn that cannot be located either way is an error naming the message.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use minijinja::value::{Enumerator, Object, ObjectRepr};
use minijinja::{Environment, ErrorKind, Value};

use super::formats::Message;
use crate::error::{Error, Result};

/// A broken-down local time, for `strftime_now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LocalTime {
    /// The year, e.g. 2026.
    pub year: i32,
    /// 1–12.
    pub month: u32,
    /// 1–31.
    pub day: u32,
    /// 0–23.
    pub hour: u32,
    /// 0–59.
    pub minute: u32,
    /// 0–59.
    pub second: u32,
    /// 0–999999.
    pub microsecond: u32,
    /// 0 = Sunday.
    pub weekday: u32,
    /// 0-based day of the year.
    pub yearday: u32,
}

impl LocalTime {
    /// Now, in the local time zone (what Python's `datetime.now()` gives).
    pub fn now() -> LocalTime {
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let t = since.as_secs() as libc::time_t;
        // SAFETY: localtime_r writes the zeroed `tm` we own; `t` is a plain value.
        let mut tm: libc::tm = unsafe { std::mem::zeroed() };
        let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
        if !ok {
            return LocalTime::from_unix_utc(since.as_secs() as i64, since.subsec_micros());
        }
        LocalTime {
            year: tm.tm_year + 1900,
            month: (tm.tm_mon + 1) as u32,
            day: tm.tm_mday as u32,
            hour: tm.tm_hour as u32,
            minute: tm.tm_min as u32,
            second: tm.tm_sec as u32,
            microsecond: since.subsec_micros(),
            weekday: tm.tm_wday as u32,
            yearday: tm.tm_yday as u32,
        }
    }

    /// A UTC time from seconds since 1970 (civil-from-days, proleptic Gregorian).
    pub fn from_unix_utc(secs: i64, microsecond: u32) -> LocalTime {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = (yoe + era * 400 + i64::from(month <= 2)) as i32;
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        const BEFORE: [u32; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
        let yearday = BEFORE[month as usize - 1] + day - 1 + u32::from(leap && month > 2);
        LocalTime {
            year,
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem / 60 % 60) as u32,
            second: (rem % 60) as u32,
            microsecond,
            weekday: (days + 4).rem_euclid(7) as u32,
            yearday,
        }
    }
}

const DAYS: [&str; 7] = [
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];
const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];

/// Python's `strftime` (the C library's, in the C locale) for the codes templates use.
pub fn strftime(format: &str, t: &LocalTime) -> std::result::Result<String, String> {
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        // glibc's `%-d`: no padding.
        let mut code = chars.next();
        let pad = code != Some('-');
        if !pad {
            code = chars.next();
        }
        let num = |v: u32, width: usize| {
            if pad {
                format!("{v:0width$}")
            } else {
                v.to_string()
            }
        };
        let hour12 = if t.hour.is_multiple_of(12) {
            12
        } else {
            t.hour % 12
        };
        match code {
            Some('a') => out.push_str(&DAYS[t.weekday as usize][..3]),
            Some('A') => out.push_str(DAYS[t.weekday as usize]),
            Some('w') => out.push_str(&t.weekday.to_string()),
            Some('d') => out.push_str(&num(t.day, 2)),
            Some('e') => out.push_str(&format!("{:2}", t.day)),
            Some('b') | Some('h') => out.push_str(&MONTHS[t.month as usize - 1][..3]),
            Some('B') => out.push_str(MONTHS[t.month as usize - 1]),
            Some('m') => out.push_str(&num(t.month, 2)),
            Some('y') => out.push_str(&num(t.year.rem_euclid(100) as u32, 2)),
            Some('Y') => out.push_str(&t.year.to_string()),
            Some('H') => out.push_str(&num(t.hour, 2)),
            Some('I') => out.push_str(&num(hour12, 2)),
            Some('p') => out.push_str(if t.hour < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&num(t.minute, 2)),
            Some('S') => out.push_str(&num(t.second, 2)),
            Some('f') => out.push_str(&format!("{:06}", t.microsecond)),
            Some('j') => out.push_str(&num(t.yearday + 1, 3)),
            Some('F') => out.push_str(&format!("{}-{:02}-{:02}", t.year, t.month, t.day)),
            Some('T') => out.push_str(&format!("{:02}:{:02}:{:02}", t.hour, t.minute, t.second)),
            Some('D') => out.push_str(&format!(
                "{:02}/{:02}/{:02}",
                t.month,
                t.day,
                t.year.rem_euclid(100)
            )),
            Some('%') => out.push('%'),
            Some(other) => {
                return Err(format!(
                    "strftime_now: the format code %{other} is not supported by qlora-rs"
                ))
            }
            None => return Err("strftime_now: the format ends with a lone %".into()),
        }
    }
    Ok(out)
}

/// Which keys of each message the template has read, over every rendering of one conversation
/// (its prefixes and marked copies included): a key no rendering reads is a key the template does
/// not use. Clones share the log; two logs always compare equal (it is a record of renderings,
/// not part of the input).
#[derive(Clone, Default)]
pub struct ReadLog(Arc<Mutex<Vec<BTreeSet<String>>>>);

impl std::fmt::Debug for ReadLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadLog")
    }
}

impl PartialEq for ReadLog {
    fn eq(&self, _: &ReadLog) -> bool {
        true
    }
}

impl ReadLog {
    fn note(&self, message: usize, keys: impl IntoIterator<Item = String>) {
        if let Ok(mut g) = self.0.lock() {
            if g.len() <= message {
                g.resize(message + 1, BTreeSet::new());
            }
            g[message].extend(keys);
        }
    }

    /// The keys of message `i` that some rendering has read (looked up, tested for, or
    /// iterated over, as `tojson` and `items()` do); those of its tool calls as
    /// `tool_calls[].id` and `tool_calls[].function.name`.
    pub fn read(&self, i: usize) -> BTreeSet<String> {
        self.0
            .lock()
            .ok()
            .and_then(|g| g.get(i).cloned())
            .unwrap_or_default()
    }
}

/// A message as the template sees it: a map that notes in its log every key the template looks
/// up (`message.name`, `message['name']`, `'name' in message`, `message.get('name')`), or all of
/// them when it iterates the message. Its tool calls, and their `function`, are tracked the same
/// way, their keys noted as `tool_calls[].id` and `tool_calls[].function.name`.
#[derive(Debug)]
struct Tracked {
    inner: Value,
    keys: Vec<Value>,
    index: usize,
    /// What the keys are noted under: "" for the message, `tool_calls[].` for a tool call,
    /// `tool_calls[].function.` for its function.
    prefix: &'static str,
    log: ReadLog,
}

impl Tracked {
    /// `v` tracked under `prefix` when it is a map, else as it is.
    fn wrap(v: Value, index: usize, prefix: &'static str, log: &ReadLog) -> Value {
        if v.kind() != minijinja::value::ValueKind::Map {
            return v;
        }
        let keys: Vec<Value> = v.try_iter().map(|it| it.collect()).unwrap_or_default();
        Value::from_object(Tracked {
            inner: v,
            keys,
            index,
            prefix,
            log: log.clone(),
        })
    }
}

impl Object for Tracked {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let k = key.as_str();
        if let Some(k) = k {
            self.log.note(self.index, [format!("{}{k}", self.prefix)]);
        }
        let v = self
            .inner
            .get_item(key)
            .ok()
            .filter(|v| !v.is_undefined())?;
        let wrap = |v, prefix| Tracked::wrap(v, self.index, prefix, &self.log);
        Some(match (self.prefix, k) {
            ("", Some("tool_calls")) if v.kind() == minijinja::value::ValueKind::Seq => {
                match v.try_iter() {
                    Ok(calls) => Value::from(
                        calls
                            .map(|c| wrap(c, "tool_calls[]."))
                            .collect::<Vec<Value>>(),
                    ),
                    Err(_) => v,
                }
            }
            ("tool_calls[].", Some("function")) => wrap(v, "tool_calls[].function."),
            _ => v,
        })
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        self.log.note(
            self.index,
            self.keys
                .iter()
                .filter_map(|k| k.as_str().map(|k| format!("{}{k}", self.prefix))),
        );
        Enumerator::Values(self.keys.clone())
    }

    fn enumerator_len(self: &Arc<Self>) -> Option<usize> {
        Some(self.keys.len())
    }

    fn is_true(self: &Arc<Self>) -> bool {
        !self.keys.is_empty()
    }
}

/// What a template renders: the conversation and what `apply_chat_template` passes beside it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ChatInput {
    /// The messages as the template sees them (maps, keys in the data's order).
    pub messages: Vec<Value>,
    /// `tools=`: a list of tool definitions (JSON schemas).
    pub tools: Option<Value>,
    /// Extra template variables (`--chat-template-kwargs`, a record's `chat_template_kwargs`).
    pub kwargs: Vec<(String, Value)>,
    /// The message keys the template read while rendering this input.
    pub reads: ReadLog,
}

impl ChatInput {
    /// Plain `{role, content}` messages.
    pub fn from_messages(messages: &[Message]) -> ChatInput {
        ChatInput {
            messages: messages.iter().map(Value::from_serialize).collect(),
            ..ChatInput::default()
        }
    }

    /// The same input with only the first `n` messages (sharing the read log).
    pub fn first(&self, n: usize) -> ChatInput {
        ChatInput {
            messages: self.messages[..n].to_vec(),
            tools: self.tools.clone(),
            kwargs: self.kwargs.clone(),
            reads: self.reads.clone(),
        }
    }

    /// The messages as the template receives them: maps wrapped so that what it reads is noted.
    fn tracked_messages(&self) -> Vec<Value> {
        self.messages
            .iter()
            .enumerate()
            .map(|(index, m)| Tracked::wrap(m.clone(), index, "", &self.reads))
            .collect()
    }
}

/// A model's chat template, compiled once, with the helpers transformers gives templates
/// (`raise_exception`, `strftime_now`, `tojson` with Python's options).
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The names the template reads from its context (`messages`, `tools`, its own kwargs…).
    variables: HashSet<String>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    clock: Arc<Mutex<Option<LocalTime>>>,
}

fn tojson(
    value: Value,
    kwargs: minijinja::value::Kwargs,
) -> std::result::Result<String, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let (item_sep, key_sep) = match &separators {
        Some(s) if !s.is_none() => {
            let parts: Vec<String> = s
                .try_iter()?
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    )
                })?;
            match parts.as_slice() {
                [a, b] => (a.clone(), b.clone()),
                _ => {
                    return Err(minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ))
                }
            }
        }
        // Python's json.dumps: ", " and ": ", or "," at line ends when indenting.
        _ => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
    };
    let json = PyJson {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
        ensure_ascii: ensure_ascii.unwrap_or(false),
    };
    let mut out = String::new();
    json.write(&value, 0, &mut out)?;
    Ok(out)
}

/// Python's `json.dumps`, over template values (maps keep their order).
struct PyJson {
    indent: Option<usize>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
    ensure_ascii: bool,
}

impl PyJson {
    fn string(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{8}' => out.push_str("\\b"),
                '\u{c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for u in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }

    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    }

    fn write(
        &self,
        v: &Value,
        depth: usize,
        out: &mut String,
    ) -> std::result::Result<(), minijinja::Error> {
        use minijinja::value::ValueKind;
        match v.kind() {
            ValueKind::Undefined | ValueKind::None => out.push_str("null"),
            ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
            ValueKind::Number => {
                let f = f64::try_from(v.clone())?;
                if f.is_nan() {
                    out.push_str("NaN")
                } else if f.is_infinite() {
                    out.push_str(if f > 0.0 { "Infinity" } else { "-Infinity" })
                } else {
                    // Shortest round-trip digits with ".0" on whole numbers, as Python's repr.
                    let s = serde_json::to_string(&f).map_err(|e| {
                        minijinja::Error::new(ErrorKind::InvalidOperation, e.to_string())
                    })?;
                    out.push_str(&s)
                }
            }
            ValueKind::String => self.string(v.as_str().unwrap_or_default(), out),
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                out.push('[');
                if items.is_empty() {
                    out.push(']');
                    return Ok(());
                }
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    self.write(item, depth + 1, out)?;
                }
                self.newline(depth, out);
                out.push(']');
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if self.sort_keys {
                    keys.sort();
                }
                out.push('{');
                if keys.is_empty() {
                    out.push('}');
                    return Ok(());
                }
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(depth + 1, out);
                    match k.as_str() {
                        Some(s) => self.string(s, out),
                        None => self.string(&k.to_string(), out),
                    }
                    out.push_str(&self.key_sep);
                    self.write(&v.get_item(k)?, depth + 1, out)?;
                }
                self.newline(depth, out);
                out.push('}');
            }
            _ => {
                return Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("tojson: cannot write a {} as JSON", v.kind()),
                ))
            }
        }
        Ok(())
    }
}

/// Names `apply_chat_template` passes itself: template kwargs cannot replace them.
const RESERVED: [&str; 4] = ["messages", "tools", "documents", "add_generation_prompt"];

impl ChatTemplate {
    /// Compiles `template` with the tokenizer's special tokens as template variables.
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
                Err(
                    minijinja::Error::new(ErrorKind::InvalidOperation, msg.clone())
                        .with_source(Raised(msg)),
                )
            },
        );
        // jinja2's `trim` is Python's str.strip(): U+001C..U+001F are whitespace there too.
        env.add_filter("trim", py_trim);
        let clock: Arc<Mutex<Option<LocalTime>>> = Arc::default();
        let fixed = Arc::clone(&clock);
        env.add_function(
            "strftime_now",
            move |format: String| -> std::result::Result<String, minijinja::Error> {
                let t = fixed
                    .lock()
                    .map(|g| *g)
                    .unwrap_or(None)
                    .unwrap_or_else(LocalTime::now);
                strftime(&format, &t)
                    .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, e))
            },
        );
        env.add_filter("tojson", tojson);
        let source = strip_generation_tags(template);
        env.add_template_owned("chat", source)
            .map_err(|e| Error::InvalidArgument(format!("cannot parse the chat template: {e}")))?;
        let variables = env
            .get_template("chat")
            .expect("just added")
            .undeclared_variables(false);
        Ok(ChatTemplate {
            env,
            variables,
            bos_token,
            eos_token,
            clock,
        })
    }

    /// Whether the template reads the variable `name` anywhere (e.g. `tools`, or a kwarg such as
    /// `enable_thinking`).
    pub fn uses_variable(&self, name: &str) -> bool {
        self.variables.contains(name)
    }

    /// The names the template reads from its context, sorted (`messages`, `tools`, its own
    /// kwargs such as `enable_thinking`, the helpers it calls).
    pub fn variables(&self) -> impl Iterator<Item = &str> {
        let mut names: Vec<&str> = self.variables.iter().map(String::as_str).collect();
        names.sort_unstable();
        names.into_iter()
    }

    /// Makes `strftime_now` answer `t` instead of the current time (`None`: the clock again),
    /// for reproducible renderings.
    pub fn set_time(&self, t: Option<LocalTime>) {
        if let Ok(mut g) = self.clock.lock() {
            *g = t;
        }
    }

    /// Renders plain `{role, content}` messages.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_input(&ChatInput::from_messages(messages), add_generation_prompt)
    }

    /// Renders a conversation as `apply_chat_template(messages, tools=…, add_generation_prompt=…,
    /// **kwargs)` does. Where the template refuses the conversation with its own
    /// `raise_exception` (Gemma's "System role not supported"), the error says so and gives the
    /// template's message; see [`ChatTemplate::explain`] for what to do about it.
    pub fn render_input(&self, input: &ChatInput, add_generation_prompt: bool) -> Result<String> {
        self.render_raw(input, add_generation_prompt)?.map_err(|e| {
            if let Some(msg) = raised(&e) {
                return Error::InvalidArgument(format!(
                    "the chat template refuses the conversation (\"{msg}\")"
                ));
            }
            let mut msg = e.to_string();
            if let Some(d) = e.detail() {
                if !msg.contains(d) {
                    msg = format!("{msg}: {d}");
                }
            }
            Error::InvalidArgument(format!("chat template: {msg}"))
        })
    }

    /// `e`, from rendering `input` for training, with what to do where the template refuses the
    /// whole conversation with its own `raise_exception` and a change that qlora-rs can name
    /// makes it render: a first system message merged into the first user message (Gemma 2
    /// takes no system role), consecutive messages of one role merged (Gemma 2 wants user and
    /// assistant to alternate), or the conversation started with a user message (in the order
    /// they are tried: a user message first, runs merged, the system message merged). Each change
    /// named is one the template needs: the conversation renders with all of them, and not
    /// without any one. Other errors come back as they are.
    pub fn explain(&self, input: &ChatInput, e: Error) -> Error {
        let Ok(Err(raw)) = self.render_raw(input, false) else {
            return e;
        };
        let Some(msg) = raised(&raw) else {
            return e;
        };
        let mut text = format!("the chat template refuses the conversation (\"{msg}\")");
        let renders = |fixes: &[&Fix]| {
            let mut messages = input.messages.clone();
            for f in fixes {
                messages = (f.apply)(&messages).unwrap_or(messages);
            }
            let probe = ChatInput {
                messages,
                tools: input.tools.clone(),
                kwargs: input.kwargs.clone(),
                // Its own log: these are not the record's messages.
                reads: ReadLog::default(),
            };
            matches!(self.render_raw(&probe, false), Ok(Ok(_)))
        };
        // The changes this conversation admits, each after the ones before; then the fewest of
        // them that still render.
        let mut needed: Vec<&Fix> = Vec::new();
        let mut messages = input.messages.clone();
        for f in &FIXES {
            if let Some(changed) = (f.apply)(&messages) {
                messages = changed;
                needed.push(f);
            }
        }
        if !needed.is_empty() && renders(&needed) {
            let mut k = 0;
            while k < needed.len() {
                let mut without = needed.clone();
                without.remove(k);
                if !without.is_empty() && renders(&without) {
                    needed = without;
                } else {
                    k += 1;
                }
            }
            for f in needed {
                text.push_str(". ");
                text.push_str(&(f.advice)(&input.messages));
            }
        }
        Error::InvalidArgument(text)
    }

    /// The rendering, or the template's own error (the outer error: kwargs that cannot be set).
    fn render_raw(
        &self,
        input: &ChatInput,
        add_generation_prompt: bool,
    ) -> Result<std::result::Result<String, minijinja::Error>> {
        let tmpl = self.env.get_template("chat").expect("added in new()");
        let mut ctx: Vec<(String, Value)> = vec![
            (
                "bos_token".into(),
                Value::from(self.bos_token.clone().unwrap_or_default()),
            ),
            (
                "eos_token".into(),
                Value::from(self.eos_token.clone().unwrap_or_default()),
            ),
        ];
        for (k, v) in &input.kwargs {
            if RESERVED.contains(&k.as_str()) {
                return Err(Error::InvalidArgument(format!(
                    "chat template kwargs cannot set `{k}` (apply_chat_template passes it itself)"
                )));
            }
            ctx.retain(|(name, _)| name != k);
            ctx.push((k.clone(), v.clone()));
        }
        ctx.push(("messages".into(), Value::from(input.tracked_messages())));
        ctx.push((
            "tools".into(),
            input.tools.clone().unwrap_or(Value::from(())),
        ));
        ctx.push(("documents".into(), Value::from(())));
        ctx.push((
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        ));
        let ctx: Value = ctx.into_iter().collect();
        Ok(tmpl.render(ctx))
    }

    /// The rendering of `messages` and the byte ranges of every assistant turn in it.
    pub fn render_with_assistant_spans(
        &self,
        messages: &[Message],
    ) -> Result<(String, Vec<(usize, usize)>)> {
        let trained: Vec<bool> = messages.iter().map(|m| m.role == "assistant").collect();
        self.spans(&ChatInput::from_messages(messages), &trained)
    }

    /// The full rendering of `input` (no generation prompt) and the byte range of every message
    /// `i` with `trained[i]`, in order: by the prefix rule where the template allows it, else by
    /// locating each turn in the one rendering (see the module notes).
    pub fn spans(
        &self,
        input: &ChatInput,
        trained: &[bool],
    ) -> Result<(String, Vec<(usize, usize)>)> {
        let full = self.render_input(input, false)?;
        if let Some(spans) = self.prefix_spans(input, trained, &full)? {
            return Ok((full, spans));
        }
        let spans = self.located_spans(input, trained, &full)?;
        Ok((full, spans))
    }

    fn prefix_spans(
        &self,
        input: &ChatInput,
        trained: &[bool],
        full: &str,
    ) -> Result<Option<Vec<(usize, usize)>>> {
        let mut spans = Vec::new();
        for i in (0..input.messages.len()).filter(|&i| trained[i]) {
            let prefix = self.render_input(&input.first(i), true)?;
            let upto = self.render_input(&input.first(i + 1), false)?;
            let upto = self.unclosed(&upto, full);
            if !upto.starts_with(&prefix) || !full.starts_with(upto) {
                return Ok(None);
            }
            // Qwen3's generation prompt with `enable_thinking: false` holds the turn's empty
            // think block too: the turn starts right after its role header all the same.
            let start = self
                .opening(input, i, full, |t| Some(t.to_string()))
                .map_or(prefix.len(), |o| o.min(prefix.len()));
            spans.push((start, upto.len()));
        }
        Ok(Some(spans))
    }

    fn located_spans(
        &self,
        input: &ChatInput,
        trained: &[bool],
        full: &str,
    ) -> Result<Vec<(usize, usize)>> {
        let n = input.messages.len();
        let fail = |i: usize, why: &str| {
            Error::InvalidArgument(format!(
                "the chat template renders earlier turns differently once later ones follow, and \
                 assistant message {i} cannot be located in the full rendering ({why}); use \
                 --train-on-prompt to train on everything"
            ))
        };
        if full.chars().any(|c| is_mark(c) || c == PLAIN) || n >= MARK_COUNT {
            let first = (0..n).find(|&i| trained[i]).unwrap_or(0);
            return Err(fail(
                first,
                "the text holds private-use characters of the planes qlora-rs marks turns with",
            ));
        }
        let marked_msgs: Vec<Value> = input
            .messages
            .iter()
            .enumerate()
            .map(|(k, m)| mark_message(m, k).unwrap_or_else(|| m.clone()))
            .collect();
        let marked = ChatInput {
            messages: marked_msgs,
            tools: input.tools.clone(),
            kwargs: input.kwargs.clone(),
            reads: input.reads.clone(),
        };
        let (clean, pos) = unmark(&self.render_input(&marked, false)?);
        if clean != full {
            let first = (0..n).find(|&i| trained[i]).unwrap_or(0);
            return Err(fail(
                first,
                "the template changes a message's text in a way that the marks disturb",
            ));
        }
        let mut spans = Vec::new();
        let mut prev_end = 0;
        for i in (0..n).filter(|&i| trained[i]) {
            let p = (0..i).rev().find(|&k| pos[k].is_some());
            let anchor = p.map_or(0, |k| pos[k].expect("found"));
            let rest = &full[anchor..];
            let prompt = self.render_input(&marked.first(i), true)?;
            let tail = after(&prompt, p).ok_or_else(|| fail(i, "its prompt lost a mark"))?;
            let prompted = common_prefix(&tail, rest);
            let start = anchor
                + self
                    .opening(&marked, i, rest, |t| after(t, p))
                    .map_or(prompted, |o| o.min(prompted));
            let upto = self.render_input(&marked.first(i + 1), false)?;
            let (from, tail) = match pos[i] {
                Some(b) => (b, after(&upto, Some(i))),
                None => (anchor, after(&upto, p)),
            };
            let tail = tail.ok_or_else(|| fail(i, "its rendering lost a mark"))?;
            let end = from + common_prefix(self.unclosed(&tail, &full[from..]), &full[from..]);
            let next = (i + 1..n).find_map(|k| pos[k]).unwrap_or(full.len());
            if start < prev_end || end <= start || end > next {
                return Err(fail(i, "its start and end do not enclose a turn"));
            }
            spans.push((start, end));
            prev_end = end;
        }
        Ok(spans)
    }

    /// `upto` (a rendering without the generation prompt, or its end) less the `eos_token` it ends
    /// with where `full` (the full rendering, from the same place) does not go on with all of it:
    /// a template that closes the conversation with eos_token (Phi-3's) writes it after a turn
    /// only where that turn is the last. Else `upto` as it is.
    fn unclosed<'a>(&self, upto: &'a str, full: &str) -> &'a str {
        match self.eos_token.as_deref().filter(|e| !e.is_empty()) {
            Some(eos) if !full.starts_with(upto) => upto.strip_suffix(eos).unwrap_or(upto),
            _ => upto,
        }
    }

    /// How far into `rest` (the full rendering from where the conversation before turn `i` is
    /// compared: after mark `p` on the located path, from the start on the prefix path) the
    /// opening of assistant turn `i` reaches: the role header that the template writes for a
    /// plain assistant message at this point (`{role: assistant, content: PLAIN}`, then a user
    /// message). `cut` takes a rendering of `input` to the text compared with `rest` (after mark
    /// `p`, marks taken out; or all of it). `None` where these renderings fail or lose the mark,
    /// or where that rendering parts from the real one no further than the conversation before
    /// the turn reaches (the previous message's end).
    ///
    /// The generation prompt alone can reach past the header into the turn: with
    /// `enable_thinking: false`, Qwen3's ends in an empty think block, all of which a last turn
    /// without reasoning shares (it is rendered with an empty think block of its own; on the
    /// prefix path too, e.g. a single-turn record), `<think>\n` of which a turn with reasoning
    /// shares, and `<t` of which a turn that starts `<tool_call>` shares by chance. TRL's
    /// generation markers for Qwen3 train everything after the header, so the turn starts there.
    /// Where the generation prompt is the header (ChatML, Llama 3.x, Qwen2.5), nothing changes.
    fn opening(
        &self,
        input: &ChatInput,
        i: usize,
        rest: &str,
        cut: impl Fn(&str) -> Option<String>,
    ) -> Option<usize> {
        let before = self.render_input(&input.first(i), false).ok()?;
        let floor = common_prefix(&cut(&before)?, rest);
        let message = |role: &str| -> Value {
            [
                ("role", Value::from(role)),
                ("content", Value::from(PLAIN.to_string())),
            ]
            .into_iter()
            .collect()
        };
        let mut probe = input.first(i);
        // Its own log: the probe's messages are not the record's.
        probe.reads = ReadLog::default();
        probe.messages.push(message("assistant"));
        probe.messages.push(message("user"));
        let text = self.render_input(&probe, false).ok()?;
        let header = common_prefix(&cut(&text)?, rest);
        // A probe that parts from the real text before the turn's place tells nothing of it.
        (header > floor).then_some(header)
    }
}

/// What a template's `raise_exception` was called with (the source of the render error).
#[derive(Debug)]
struct Raised(String);

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Raised {}

/// The message of the `raise_exception` that ended a rendering, if one did.
fn raised(e: &minijinja::Error) -> Option<&str> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(r) = s.downcast_ref::<Raised>() {
            return Some(&r.0);
        }
        source = s.source();
    }
    None
}

/// jinja2's `trim(value, chars=None)`: Python's `str.strip`, whose whitespace is Rust's plus
/// U+001C..U+001F.
fn py_trim(value: &str, chars: Option<String>) -> String {
    match chars {
        Some(chars) => value.trim_matches(|c| chars.contains(c)).to_string(),
        None => value
            .trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
            .to_string(),
    }
}

/// A change to a conversation that a template refusing it may need, and what to tell the user.
struct Fix {
    /// The changed messages; `None` where the change does not apply to them.
    apply: fn(&[Value]) -> Option<Vec<Value>>,
    /// What to do, for the messages as they were.
    advice: fn(&[Value]) -> String,
}

const FIXES: [Fix; 3] = [
    Fix {
        apply: user_first,
        advice: |m| {
            let k = usize::from(role_of(&m[0]) == "system");
            format!(
                "The template wants the conversation to start with a user message (message \
                 {k} is {})",
                role_of(&m[k])
            )
        },
    },
    Fix {
        apply: merge_runs,
        advice: |m| {
            let roles: Vec<String> = m.iter().map(role_of).collect();
            let i = (1..roles.len())
                .find(|&i| roles[i] == roles[i - 1])
                .unwrap_or(1);
            format!(
                "The template wants user and assistant messages to alternate: merge \
                 consecutive messages of one role into one (messages {} and {i} are both {})",
                i - 1,
                roles.get(i).map_or("", String::as_str)
            )
        },
    },
    Fix {
        apply: fold_system,
        advice: |_| {
            "The template takes no system message: put the system prompt at the start of \
             the first user message (then a blank line), or use a model whose chat template \
             accepts a system role"
                .into()
        },
    },
];

fn role_of(m: &Value) -> String {
    m.get_attr("role")
        .ok()
        .and_then(|r| r.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// The text of a message with string content and no tool calls (what can be merged).
fn plain_text(m: &Value) -> Option<String> {
    let calls = m.get_attr("tool_calls").ok();
    if calls.is_some_and(|c| !c.is_undefined() && !c.is_none()) {
        return None;
    }
    m.get_attr("content")
        .ok()
        .and_then(|c| c.as_str().map(str::to_string))
}

/// A first system message put at the start of the first user message, a blank line between.
fn fold_system(m: &[Value]) -> Option<Vec<Value>> {
    if m.len() < 2 || role_of(&m[0]) != "system" || role_of(&m[1]) != "user" {
        return None;
    }
    let (system, user) = (plain_text(&m[0])?, plain_text(&m[1])?);
    let first = with_entry(&m[1], "content", |_| {
        Some(Value::from(format!("{system}\n\n{user}")))
    })?;
    Some(
        std::iter::once(first)
            .chain(m[2..].iter().cloned())
            .collect(),
    )
}

/// Consecutive user (or assistant) messages merged into one, blank lines between.
fn merge_runs(m: &[Value]) -> Option<Vec<Value>> {
    let mut out: Vec<Value> = Vec::with_capacity(m.len());
    let mut merged = false;
    for msg in m {
        let role = role_of(msg);
        if let Some(last) = out.last_mut() {
            if role == role_of(last) && (role == "user" || role == "assistant") {
                let (a, b) = (plain_text(last)?, plain_text(msg)?);
                *last = with_entry(last, "content", |_| {
                    Some(Value::from(format!("{a}\n\n{b}")))
                })?;
                merged = true;
                continue;
            }
        }
        out.push(msg.clone());
    }
    merged.then_some(out)
}

/// The assistant messages before the first user message left out (after a system message).
fn user_first(m: &[Value]) -> Option<Vec<Value>> {
    let k = usize::from(m.first().is_some_and(|x| role_of(x) == "system"));
    let first_user = m.iter().skip(k).position(|x| role_of(x) == "user")?;
    if first_user == 0 || role_of(&m[k]) != "assistant" {
        return None;
    }
    Some(m[..k].iter().chain(&m[k + first_user..]).cloned().collect())
}

/// The length in bytes of the longest common prefix of `a` and `b`, on a character boundary.
fn common_prefix(a: &str, b: &str) -> usize {
    let mut l = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    while !a.is_char_boundary(l) {
        l -= 1;
    }
    l
}

/// The text after mark `k` of a rendering (all of it when k is None), marks taken out; `None`
/// when the mark is not there.
fn after(text: &str, k: Option<usize>) -> Option<String> {
    match k {
        None => Some(unmark(text).0),
        Some(k) => {
            let c = mark(k);
            let at = text.find(c)?;
            Some(unmark(&text[at + c.len_utf8()..]).0)
        }
    }
}

/// The text of the plain messages that [`ChatTemplate::opening`] renders: a private-use character
/// of plane 16, never in real text (records holding one are refused where it is used), and no
/// mark, so it stays in the probe's rendering and ends every agreement with the real text.
const PLAIN: char = '\u{100000}';

/// Marks: one private-use character per message (plane 15), never in real text.
const MARK_BASE: u32 = 0xF0000;
const MARK_COUNT: usize = 0xFFFE;

fn mark(k: usize) -> char {
    char::from_u32(MARK_BASE + k as u32).expect("plane 15 private use")
}

fn is_mark(c: char) -> bool {
    (MARK_BASE..MARK_BASE + MARK_COUNT as u32).contains(&(c as u32))
}

/// `text` without marks, and where each mark stood in it (by message index).
fn unmark(text: &str) -> (String, Vec<Option<usize>>) {
    let mut out = String::with_capacity(text.len());
    let mut pos: Vec<Option<usize>> = Vec::new();
    for c in text.chars() {
        if is_mark(c) {
            let k = (c as u32 - MARK_BASE) as usize;
            if pos.len() <= k {
                pos.resize(k + 1, None);
            }
            // A mark written twice cannot anchor anything.
            pos[k] = if pos[k].is_some() {
                Some(usize::MAX)
            } else {
                Some(out.len())
            };
        } else {
            out.push(c);
        }
    }
    let pos = pos
        .into_iter()
        .map(|p| p.filter(|&x| x != usize::MAX))
        .collect::<Vec<_>>();
    (out, pos)
}

/// A copy of a map value with `key` replaced by `f(old)`; `None` where `f` gives none.
fn with_entry(map: &Value, key: &str, f: impl FnOnce(&Value) -> Option<Value>) -> Option<Value> {
    let old = map.get_attr(key).ok()?;
    let new = f(&old)?;
    let mut entries: Vec<(Value, Value)> = Vec::new();
    for k in map.try_iter().ok()? {
        let v = if k.as_str() == Some(key) {
            new.clone()
        } else {
            map.get_item(&k).ok()?
        };
        entries.push((k, v));
    }
    Some(entries.into_iter().collect())
}

/// Message `k` with its mark at the end of its text (before trailing whitespace, which
/// templates trim), or else at the end of its last tool call's name.
fn mark_message(m: &Value, k: usize) -> Option<Value> {
    let c = mark(k);
    let content = m.get_attr("content").ok();
    if let Some(text) = content.as_ref().and_then(|v| v.as_str()) {
        if !text.trim().is_empty() {
            let cut = text.trim_end().len();
            let s = format!("{}{c}{}", &text[..cut], &text[cut..]);
            return with_entry(m, "content", |_| Some(Value::from(s)));
        }
    }
    with_entry(m, "tool_calls", |calls| {
        let list: Vec<Value> = calls.try_iter().ok()?.collect();
        let last = list.last()?;
        let named = |call: &Value| {
            with_entry(call, "name", |name| {
                Some(Value::from(format!("{}{c}", name.as_str()?)))
            })
        };
        let new_last = match last.get_attr("function") {
            Ok(f) if f.kind() == minijinja::value::ValueKind::Map => {
                with_entry(last, "function", |f| named(f))?
            }
            _ => named(last)?,
        };
        let mut list = list.clone();
        *list.last_mut().expect("non-empty") = new_last;
        Some(Value::from(list))
    })
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
