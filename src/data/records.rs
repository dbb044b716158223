//! Reading datasets: a JSON array of records, or JSON Lines (one record per line; blank lines
//! skipped), in UTF-8 (a byte-order mark is skipped), plain or gzip-compressed. Errors name the
//! file and the line (or record) and what was wrong; a line that is not a JSON object is a bad
//! record, reported with every other one ([`read_all`]).

use std::path::Path;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// One record and where it came from.
#[derive(Clone, Debug)]
pub struct Record {
    /// 0-based position in the dataset.
    pub index: usize,
    /// 1-based line in a JSONL file.
    pub line: Option<usize>,
    /// The record's keys and values.
    pub fields: Map<String, Value>,
    /// The record's JSON text: chat records are read from it again with their keys in the
    /// order the file gives them (Python dicts keep that order, and templates print it).
    pub raw: Box<RawValue>,
}

impl PartialEq for Record {
    fn eq(&self, other: &Record) -> bool {
        (self.index, self.line, &self.fields) == (other.index, other.line, &other.fields)
    }
}

impl Record {
    /// "record 3 (line 4)" for messages.
    pub fn locate(&self) -> String {
        match self.line {
            Some(l) => format!("record {} (line {l})", self.index),
            None => format!("record {}", self.index),
        }
    }

    /// The record as a template value, its maps in the file's key order.
    pub fn ordered(&self) -> std::result::Result<minijinja::Value, serde_json::Error> {
        serde_json::from_str(self.raw.get())
    }
}

/// A record that cannot be used, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadRecord {
    /// 0-based position in the dataset (bad records counted).
    pub index: usize,
    /// 1-based line in a JSONL file.
    pub line: Option<usize>,
    /// What is wrong, starting with where: `record 3 (line 4): …` or `line 4: …`.
    pub what: String,
}

impl std::fmt::Display for BadRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

fn format_err(path: &Path, msg: String) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg,
    }
}

/// The file as UTF-8 text: gzip-compressed files are inflated, a UTF-8 byte-order mark is
/// skipped (as Python's `utf-8-sig` does), other binary formats are named, and invalid UTF-8 is
/// an error with its line and byte offset.
fn text_of(path: &Path) -> Result<String> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = std::fs::read(path).map_err(io)?;
    if bytes.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(&bytes[..]), &mut out)
            .map_err(|e| format_err(path, format!("a gzip file that does not inflate: {e}")))?;
        bytes = out;
    }
    let binary = [
        (&b"PAR1"[..], "a Parquet file"),
        (b"ARROW1", "an Arrow file"),
        (&[0x28, 0xb5, 0x2f, 0xfd], "a zstd-compressed file"),
        (b"BZh", "a bzip2-compressed file"),
        (&[0xfd, b'7', b'z', b'X', b'Z', 0], "an xz-compressed file"),
        (b"PK\x03\x04", "a zip archive"),
        (b"SQLite format 3", "an SQLite database"),
    ];
    if let Some((_, what)) = binary.iter().find(|(magic, _)| bytes.starts_with(magic)) {
        return Err(format_err(
            path,
            format!(
                "this is {what}, not a dataset qlora-rs reads: give JSON Lines or a JSON array of \
                 records (UTF-8, or gzip-compressed UTF-8)"
            ),
        ));
    }
    let body = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    match std::str::from_utf8(body) {
        Ok(text) => Ok(text.to_string()),
        Err(e) => {
            let at = e.valid_up_to();
            let line = body[..at].iter().filter(|&&b| b == b'\n').count() + 1;
            let line_start = body[..at]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |p| p + 1);
            let bad: Vec<String> = body[at..(at + 4).min(body.len())]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let binary = body.iter().take(4096).any(|&b| b == 0);
            Err(format_err(
                path,
                format!(
                    "line {line}, byte {} of the line (byte {} of the file): {} (bytes {})",
                    at - line_start + 1,
                    at + 1,
                    if binary {
                        "this looks like a binary file, not JSON text"
                    } else {
                        "invalid UTF-8; datasets must be UTF-8 text"
                    },
                    bad.join(" ")
                ),
            ))
        }
    }
}

/// Reads every record of `path` (JSON Lines or a JSON array; `.gz` files too); the first bad
/// record is an error.
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let (records, bad) = read_all(path)?;
    match bad.into_iter().next() {
        Some(b) => Err(format_err(path, b.what)),
        None => Ok(records),
    }
}

/// Reads every record of `path` (JSON Lines or a JSON array; `.gz` files too), and every line or
/// element that is not a JSON object, each a [`BadRecord`]. A file that cannot be read as text,
/// or a JSON array that does not parse, is an error.
pub fn read_all(path: &Path) -> Result<(Vec<Record>, Vec<BadRecord>)> {
    let text = text_of(path)?;
    let object = |raw: Box<RawValue>,
                  index: usize,
                  line: Option<usize>|
     -> std::result::Result<Record, BadRecord> {
        let at = line
            .map(|l| format!("line {l}"))
            .unwrap_or(format!("record {index}"));
        let bad = |what: String| BadRecord { index, line, what };
        let value: Value = serde_json::from_str(raw.get())
            .map_err(|e| bad(format!("{at}: not valid JSON: {e}")))?;
        match value {
            Value::Object(fields) => Ok(Record {
                index,
                line,
                fields,
                raw,
            }),
            other => {
                let kind = match other {
                    Value::Array(_) => "an array",
                    Value::String(_) => "a string",
                    Value::Number(_) => "a number",
                    Value::Bool(_) => "a boolean",
                    _ => "null",
                };
                Err(bad(format!("{at}: expected a JSON object, found {kind}")))
            }
        }
    };
    let mut records = Vec::new();
    let mut bad = Vec::new();
    if text.trim_start().starts_with('[') {
        let values: Vec<Box<RawValue>> = serde_json::from_str(&text).map_err(|e| {
            format_err(
                path,
                format!("line {}: not a valid JSON array: {e}", e.line()),
            )
        })?;
        for (i, v) in values.into_iter().enumerate() {
            match object(v, i, None) {
                Ok(r) => records.push(r),
                Err(b) => bad.push(b),
            }
        }
        return Ok((records, bad));
    }
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let index = records.len() + bad.len();
        let parsed = serde_json::from_str::<Box<RawValue>>(line)
            .map_err(|e| BadRecord {
                index,
                line: Some(n + 1),
                what: format!("line {}: not valid JSON: {e}", n + 1),
            })
            .and_then(|v| object(v, index, Some(n + 1)));
        match parsed {
            Ok(r) => records.push(r),
            Err(b) => bad.push(b),
        }
    }
    Ok((records, bad))
}
