//! Writing GGUF files (version 3, the layout [`super::gguf`] reads), streaming: the header and
//! tensor table are written first from the planned types and shapes (every tensor's size and
//! offset is known before its data exists), then each tensor's data as it is produced, so only
//! one tensor is in memory at a time.
//!
//! The file is written under a temporary name in the destination folder and renamed into place
//! only when complete; on any error the temporary file is removed, so a partial GGUF is never
//! left behind.
//!
//! Metadata values keep their [`Value`] type; an empty array is written as an array of `uint32`
//! (GGUF requires an element type). Tensor data starts at a multiple of [`DEFAULT_ALIGNMENT`]
//! and each tensor is padded with zeros to the next multiple.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::gguf::{GgmlType, Value, DEFAULT_ALIGNMENT};
use crate::error::{Error, Result};

/// One tensor of the file to write.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedTensor {
    /// The tensor's name in the file (llama.cpp's naming, e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Row-major shape (the Hugging Face order); written reversed, as ggml's `ne`.
    pub shape: Vec<usize>,
    /// How the data is stored.
    pub ty: GgmlType,
}

impl PlannedTensor {
    /// Bytes of data: rows × blocks per row × bytes per block.
    pub fn bytes(&self) -> Result<u64> {
        let row = *self.shape.last().unwrap_or(&1);
        let (bs, ts) = match (self.ty.block_size(), self.ty.type_size()) {
            (Some(b), Some(t)) => (b, t),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "tensor `{}`: unknown ggml type {}",
                    self.name, self.ty
                )))
            }
        };
        if !row.is_multiple_of(bs) {
            return Err(Error::InvalidArgument(format!(
                "tensor `{}`: rows of {row} values are not a whole number of {} blocks ({bs} \
                 values)",
                self.name, self.ty
            )));
        }
        let rows: usize = self.shape.iter().rev().skip(1).product();
        Ok((rows * (row / bs) * ts) as u64)
    }
}

/// A GGUF file to write: metadata in order, then tensors in order.
#[derive(Clone, Debug, Default)]
pub struct GgufWriter {
    /// Key-value metadata, written in this order.
    pub metadata: Vec<(String, Value)>,
    /// The tensor table, written in this order.
    pub tensors: Vec<PlannedTensor>,
}

fn pad(n: u64) -> u64 {
    n.div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT - n
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::Array(items) => {
            let elem = items.first().map_or(4, type_id);
            out.extend_from_slice(&elem.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

impl GgufWriter {
    /// Adds a metadata entry (after the ones already added).
    pub fn set(&mut self, key: &str, value: Value) {
        self.metadata.push((key.to_string(), value));
    }

    /// The header: magic, version, counts, metadata, tensor table (with offsets), padding.
    /// Checks that arrays hold one type and that every tensor's size is known.
    pub fn header(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            if let Value::Array(items) = value {
                if let Some(first) = items.first() {
                    if items.iter().any(|i| type_id(i) != type_id(first)) {
                        return Err(Error::InvalidArgument(format!(
                            "metadata `{key}`: an array must hold values of one type"
                        )));
                    }
                }
            }
            put_str(&mut out, key);
            out.extend_from_slice(&type_id(value).to_le_bytes());
            put_value(&mut out, value);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for &d in t.shape.iter().rev() {
                out.extend_from_slice(&(d as u64).to_le_bytes());
            }
            out.extend_from_slice(&t.ty.0.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            let n = t.bytes()?;
            offset += n + pad(n);
        }
        out.resize(out.len() + pad(out.len() as u64) as usize, 0);
        Ok(out)
    }

    /// Writes the file to `path`: the header, then `produce(i)` for each tensor `i` in order
    /// (which must return exactly the tensor's [`PlannedTensor::bytes`]). The data goes to a
    /// temporary file beside `path`, renamed into place at the end; on error it is removed.
    pub fn write(
        &self,
        path: &Path,
        mut produce: impl FnMut(usize) -> Result<Vec<u8>>,
    ) -> Result<u64> {
        let header = self.header()?;
        let tmp = temp_path(path);
        let result = (|| -> Result<u64> {
            let io = |source| Error::Io {
                path: tmp.clone(),
                source,
            };
            let file = File::create(&tmp).map_err(io)?;
            let mut w = BufWriter::with_capacity(1 << 22, file);
            w.write_all(&header).map_err(io)?;
            let mut total = header.len() as u64;
            for (i, t) in self.tensors.iter().enumerate() {
                let data = produce(i)?;
                let want = t.bytes()?;
                if data.len() as u64 != want {
                    return Err(Error::InvalidArgument(format!(
                        "tensor `{}`: {} bytes produced, {want} expected for {} {:?}",
                        t.name,
                        data.len(),
                        t.ty,
                        t.shape
                    )));
                }
                w.write_all(&data).map_err(io)?;
                let p = pad(want) as usize;
                w.write_all(&vec![0u8; p]).map_err(io)?;
                total += want + p as u64;
            }
            let file = w.into_inner().map_err(|e| io(e.into_error()))?;
            file.sync_all().map_err(io)?;
            Ok(total)
        })();
        match result {
            Ok(total) => {
                std::fs::rename(&tmp, path).map_err(|source| Error::Io {
                    path: path.to_path_buf(),
                    source,
                })?;
                Ok(total)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }
}

/// `DIR/.NAME.partial-PID` beside `path`: same folder (so the rename is atomic), hidden, and
/// named for the process that writes it.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out.gguf".into());
    path.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::gguf::GgufFile;

    #[test]
    fn a_written_file_reads_back_with_its_metadata_and_tensors() {
        let dir = std::env::temp_dir().join(format!("qlora-gguf-write-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.gguf");
        let mut w = GgufWriter::default();
        w.set("general.architecture", Value::String("llama".into()));
        w.set("x.count", Value::U32(7));
        w.set("x.eps", Value::F32(1e-5));
        w.set(
            "x.list",
            Value::Array(vec![Value::String("a".into()), Value::String("bc".into())]),
        );
        w.set("x.empty", Value::Array(vec![]));
        w.tensors = vec![
            PlannedTensor {
                name: "a".into(),
                shape: vec![3, 5],
                ty: GgmlType::F32,
            },
            PlannedTensor {
                name: "b".into(),
                shape: vec![7],
                ty: GgmlType::F16,
            },
        ];
        let a: Vec<f32> = (0..15).map(|i| i as f32 * 0.5 - 3.0).collect();
        let b: Vec<f32> = (0..7).map(|i| i as f32 * 0.25).collect();
        w.write(&path, |i| {
            Ok(match i {
                0 => a.iter().flat_map(|v| v.to_le_bytes()).collect(),
                _ => b
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
            })
        })
        .unwrap();
        let g = GgufFile::open(&path).unwrap();
        assert_eq!(g.get("x.count").and_then(Value::as_u64), Some(7));
        assert_eq!(g.get("x.eps"), Some(&Value::F32(1e-5)));
        assert_eq!(g.get("x.list").and_then(Value::as_array).unwrap().len(), 2);
        assert_eq!(g.tensor("a").unwrap().shape(), vec![3, 5]);
        assert_eq!(g.dequantize("a").unwrap(), a);
        assert_eq!(g.dequantize("b").unwrap(), b);
        assert!(!temp_path(&path).exists());
        // A producer that fails leaves nothing behind, not even the old file's replacement.
        let err = w.write(&dir.join("u.gguf"), |_| Ok(vec![0u8; 3]));
        assert!(err.unwrap_err().to_string().contains("bytes produced"));
        assert!(!dir.join("u.gguf").exists());
        assert!(!temp_path(&dir.join("u.gguf")).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
