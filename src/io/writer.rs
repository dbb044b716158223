//! A streaming safetensors writer: the header is computed from the tensors' dtypes and shapes,
//! then each tensor's bytes are produced and written one at a time, so writing a checkpoint
//! needs one tensor of memory, not the model. The file appears atomically (temp + rename).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use safetensors::Dtype;
use serde_json::{json, Value};

use crate::error::{Error, Result};

/// A tensor to write: name, dtype, shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Tensor name (key in the header).
    pub name: String,
    /// Element type as stored.
    pub dtype: Dtype,
    /// Row-major shape.
    pub shape: Vec<usize>,
}

impl Entry {
    /// Size of the tensor's data, bytes.
    pub fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Writes `entries` (sorted by name in the file) to `path`, asking `produce` for each
/// tensor's little-endian bytes.
pub fn write(
    path: &Path,
    entries: &[Entry],
    metadata: &BTreeMap<String, String>,
    mut produce: impl FnMut(&Entry) -> Result<Vec<u8>>,
) -> Result<()> {
    let mut sorted: Vec<&Entry> = entries.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut offset = 0usize;
    for e in &sorted {
        let n = e.bytes();
        header.insert(
            e.name.clone(),
            json!({"dtype": dtype_name(e.dtype), "shape": e.shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut text = Value::Object(header).to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let tmp = path.with_extension("safetensors.tmp");
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let result = (|| -> Result<()> {
        let file = std::fs::File::create(&tmp).map_err(io)?;
        let mut w = std::io::BufWriter::new(file);
        w.write_all(&(text.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&text).map_err(io)?;
        for e in &sorted {
            let bytes = produce(e)?;
            if bytes.len() != e.bytes() {
                return Err(Error::Format {
                    path: path.to_path_buf(),
                    msg: format!(
                        "tensor `{}`: produced {} bytes, expected {}",
                        e.name,
                        bytes.len(),
                        e.bytes()
                    ),
                });
            }
            w.write_all(&bytes).map_err(io)?;
        }
        w.flush().map_err(io)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(io)
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "F32",
        Dtype::BF16 => "BF16",
        Dtype::F16 => "F16",
        Dtype::U8 => "U8",
        Dtype::I64 => "I64",
        Dtype::I32 => "I32",
        _ => "U8",
    }
}

/// f32 values as bf16 bytes (round to nearest even).
pub fn bf16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
        .collect()
}

/// f32 values as bytes.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    bytemuck::cast_slice(values).to_vec()
}
