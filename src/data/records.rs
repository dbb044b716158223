//! Reading datasets: a JSON array of records, or JSON Lines (one record per line; blank lines
//! skipped). Errors name the file and the line (or record) and what was wrong.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// One record and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// 0-based position in the dataset.
    pub index: usize,
    /// 1-based line in a JSONL file.
    pub line: Option<usize>,
    pub fields: Map<String, Value>,
}

impl Record {
    /// "record 3 (line 4)" for messages.
    pub fn locate(&self) -> String {
        match self.line {
            Some(l) => format!("record {} (line {l})", self.index),
            None => format!("record {}", self.index),
        }
    }
}

fn format_err(path: &Path, msg: String) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg,
    }
}

/// Reads every record of `path`.
pub fn read(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let object = |value: Value, index: usize, line: Option<usize>| -> Result<Record> {
        match value {
            Value::Object(fields) => Ok(Record {
                index,
                line,
                fields,
            }),
            other => {
                let kind = match other {
                    Value::Array(_) => "an array",
                    Value::String(_) => "a string",
                    Value::Number(_) => "a number",
                    Value::Bool(_) => "a boolean",
                    _ => "null",
                };
                let at = line
                    .map(|l| format!("line {l}"))
                    .unwrap_or(format!("record {index}"));
                Err(format_err(
                    path,
                    format!("{at}: expected a JSON object, found {kind}"),
                ))
            }
        }
    };
    if text.trim_start().starts_with('[') {
        let values: Vec<Value> = serde_json::from_str(&text).map_err(|e| {
            format_err(
                path,
                format!("line {}: not a valid JSON array: {e}", e.line()),
            )
        })?;
        return values
            .into_iter()
            .enumerate()
            .map(|(i, v)| object(v, i, None))
            .collect();
    }
    let mut records = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .map_err(|e| format_err(path, format!("line {}: not valid JSON: {e}", n + 1)))?;
        records.push(object(value, records.len(), Some(n + 1))?);
    }
    Ok(records)
}
