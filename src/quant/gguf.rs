//! GGUF files (llama.cpp's model format, versions 2 and 3): a memory-mapped reader and the
//! dequantization of its common tensor types to f32.
//!
//! # File layout (all integers little-endian)
//!
//! ```text
//! magic "GGUF" · version u32 · tensor_count u64 · kv_count u64
//! kv_count × (key: string, value_type u32, value)
//! tensor_count × (name: string, n_dims u32, ne[n_dims] u64, ggml_type u32, offset u64)
//! padding to `general.alignment` (default 32) · tensor data (each at data_start + offset)
//! string = len u64 + UTF-8 bytes;  array = elem_type u32 + count u64 + count values
//! value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array,
//!              10 u64, 11 i64, 12 f64
//! ```
//!
//! Dimensions are stored innermost first: `ne[0]` is the length of a row, so the row-major
//! (PyTorch / Hugging Face) shape is the reversed list. Quantized types pack each row in blocks
//! of `QK` consecutive values; a row is a whole number of blocks.
//!
//! # Block layouts and dequantization (ggml's formats; `f16` values are IEEE half)
//!
//! | type | values / bytes per block | layout | value `i` of the block |
//! |---|---|---|---|
//! | F32, F16, BF16 | 1 / 4, 2, 2 | the value | exact conversion |
//! | Q8_0 | 32 / 34 | `d: f16, q: [i8; 32]` | `q[i]·d` |
//! | Q4_0 | 32 / 18 | `d: f16, qs: [u8; 16]` | `(n_i − 8)·d` |
//! | Q4_1 | 32 / 20 | `d: f16, m: f16, qs: [u8; 16]` | `n_i·d + m` |
//! | Q5_0 | 32 / 22 | `d: f16, qh: [u8; 4], qs: [u8; 16]` | `(n_i − 16)·d` |
//! | Q5_1 | 32 / 24 | `d: f16, m: f16, qh: [u8; 4], qs: [u8; 16]` | `n_i·d + m` |
//! | Q4_K | 256 / 144 | `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]` | see below |
//! | Q5_K | 256 / 176 | `d, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]` | see below |
//! | Q6_K | 256 / 210 | `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16` | see below |
//!
//! Q4_0 / Q4_1 nibbles: `n_i = qs[i] & 0xF` for `i < 16` (low nibbles hold elements 0..15) and
//! `n_i = qs[i−16] >> 4` for `16 ≤ i < 32`. Q5_0 / Q5_1 add a fifth bit from `qh` read as a
//! little-endian u32 `h`: `n_i` gains `16·((h >> i) & 1)` (bit `i` belongs to element `i`).
//!
//! Q4_K: eight sub-blocks of 32 values, each with a 6-bit scale `sc_j` and a 6-bit min `m_j`
//! packed in `scales`: for `j < 4`, `sc_j = s[j] & 63`, `m_j = s[j+4] & 63`; for `j ≥ 4`,
//! `sc_j = (s[j+4] & 0xF) | (s[j−4] >> 6) << 4`, `m_j = (s[j+4] >> 4) | (s[j] >> 6) << 4`.
//! The 256 values are four chunks of 64: chunk `c` reads `qs[32c .. 32c+32]`, its first 32 values
//! are the low nibbles (sub-block `2c`), the next 32 the high nibbles (sub-block `2c+1`), and
//! `x = (d·sc_j)·n − dmin·m_j`.
//!
//! Q5_K: Q4_K's scales, mins and nibbles plus a fifth bit: value `l` of sub-block `j` (`l < 32`)
//! adds `16·((qh[l] >> j) & 1)` to its nibble before `x = (d·sc_j)·n − dmin·m_j`.
//!
//! Q6_K: sixteen sub-blocks of 16 values with int8 scales; two halves of 128 values, half `h`
//! reading `ql[64h ..]`, `qh[32h ..]`, `scales[8h ..]`. For `l < 32` in a half, with `is = l/16`:
//! ```text
//! q[l]      = (ql[l]    & 0xF | ((qh[l] >> 0) & 3) << 4) − 32    scale sc[is]
//! q[l + 32] = (ql[l+32] & 0xF | ((qh[l] >> 2) & 3) << 4) − 32    scale sc[is + 2]
//! q[l + 64] = (ql[l]    >> 4  | ((qh[l] >> 4) & 3) << 4) − 32    scale sc[is + 4]
//! q[l + 96] = (ql[l+32] >> 4  | ((qh[l] >> 6) & 3) << 4) − 32    scale sc[is + 6]
//! x = (d·sc)·q
//! ```
//! Every product is evaluated in f32 in the order written (as ggml and gguf-py do), so the
//! results are bit-identical to theirs.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;

use crate::error::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
/// `general.alignment` when the file does not set it.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's largest tensor rank.
const MAX_DIMS: usize = 4;

/// A ggml tensor type, by its id in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

impl GgmlType {
    /// 32-bit float, one value per element.
    pub const F32: GgmlType = GgmlType(0);
    /// IEEE half, one value per element.
    pub const F16: GgmlType = GgmlType(1);
    /// 4-bit values with one f16 scale per block of 32.
    pub const Q4_0: GgmlType = GgmlType(2);
    /// 4-bit values with an f16 scale and an f16 min per block of 32.
    pub const Q4_1: GgmlType = GgmlType(3);
    /// 5-bit values with one f16 scale per block of 32.
    pub const Q5_0: GgmlType = GgmlType(6);
    /// 5-bit values with an f16 scale and an f16 min per block of 32.
    pub const Q5_1: GgmlType = GgmlType(7);
    /// 8-bit values with one f16 scale per block of 32.
    pub const Q8_0: GgmlType = GgmlType(8);
    /// 4-bit "k-quant": blocks of 256 in eight sub-blocks with 6-bit scales and mins.
    pub const Q4_K: GgmlType = GgmlType(12);
    /// 5-bit "k-quant": Q4_K's layout plus one high bit per value.
    pub const Q5_K: GgmlType = GgmlType(13);
    /// 6-bit "k-quant": blocks of 256 in sixteen sub-blocks with int8 scales.
    pub const Q6_K: GgmlType = GgmlType(14);
    /// bfloat16, one value per element.
    pub const BF16: GgmlType = GgmlType(30);

    /// The types [`dequantize`] converts.
    pub const SUPPORTED: [GgmlType; 11] = [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    /// ggml's name, values per block and bytes per block (`None` for an id ggml does not have).
    fn traits(self) -> Option<(&'static str, usize, usize)> {
        Some(match self.0 {
            0 => ("F32", 1, 4),
            1 => ("F16", 1, 2),
            2 => ("Q4_0", 32, 18),
            3 => ("Q4_1", 32, 20),
            6 => ("Q5_0", 32, 22),
            7 => ("Q5_1", 32, 24),
            8 => ("Q8_0", 32, 34),
            9 => ("Q8_1", 32, 40),
            10 => ("Q2_K", 256, 84),
            11 => ("Q3_K", 256, 110),
            12 => ("Q4_K", 256, 144),
            13 => ("Q5_K", 256, 176),
            14 => ("Q6_K", 256, 210),
            15 => ("Q8_K", 256, 292),
            16 => ("IQ2_XXS", 256, 66),
            17 => ("IQ2_XS", 256, 74),
            18 => ("IQ3_XXS", 256, 98),
            19 => ("IQ1_S", 256, 50),
            20 => ("IQ4_NL", 32, 18),
            21 => ("IQ3_S", 256, 110),
            22 => ("IQ2_S", 256, 82),
            23 => ("IQ4_XS", 256, 136),
            24 => ("I8", 1, 1),
            25 => ("I16", 1, 2),
            26 => ("I32", 1, 4),
            27 => ("I64", 1, 8),
            28 => ("F64", 1, 8),
            29 => ("IQ1_M", 256, 56),
            30 => ("BF16", 1, 2),
            34 => ("TQ1_0", 256, 54),
            35 => ("TQ2_0", 256, 66),
            39 => ("MXFP4", 32, 17),
            40 => ("NVFP4", 64, 36),
            41 => ("Q1_0", 128, 18),
            _ => return None,
        })
    }

    /// ggml's name of the type (`type 123` for an unknown id).
    pub fn name(self) -> String {
        match self.traits() {
            Some((n, _, _)) => n.to_string(),
            None => format!("type {}", self.0),
        }
    }

    /// Values per block (1 for plain types).
    pub fn block_size(self) -> Option<usize> {
        self.traits().map(|t| t.1)
    }

    /// Bytes per block.
    pub fn type_size(self) -> Option<usize> {
        self.traits().map(|t| t.2)
    }

    /// Whether [`dequantize`] converts this type.
    pub fn is_supported(self) -> bool {
        GgmlType::SUPPORTED.contains(&self)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

/// The names of [`GgmlType::SUPPORTED`], for messages.
pub fn supported_type_names() -> String {
    GgmlType::SUPPORTED
        .iter()
        .map(|t| t.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// Value type 0.
    U8(u8),
    /// Value type 1.
    I8(i8),
    /// Value type 2.
    U16(u16),
    /// Value type 3.
    I16(i16),
    /// Value type 4.
    U32(u32),
    /// Value type 5.
    I32(i32),
    /// Value type 6.
    F32(f32),
    /// Value type 7 (one byte, 0 or 1).
    Bool(bool),
    /// Value type 8: a length-prefixed UTF-8 string.
    String(String),
    /// Value type 9: elements of one type.
    Array(Vec<Value>),
    /// Value type 10.
    U64(u64),
    /// Value type 11.
    I64(i64),
    /// Value type 12.
    F64(f64),
}

impl Value {
    /// The GGUF name of the value's type.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "uint8",
            Value::I8(_) => "int8",
            Value::U16(_) => "uint16",
            Value::I16(_) => "int16",
            Value::U32(_) => "uint32",
            Value::I32(_) => "int32",
            Value::F32(_) => "float32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
            Value::U64(_) => "uint64",
            Value::I64(_) => "int64",
            Value::F64(_) => "float64",
        }
    }

    /// Any integer type holding a value ≥ 0.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::I8(v) => Some(v.into()),
            Value::I16(v) => Some(v.into()),
            Value::I32(v) => Some(v.into()),
            Value::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// A float or an integer, as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// A `Bool`'s value; `None` for any other type.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// A `String`'s text; `None` for any other type.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// An `Array`'s elements; `None` for any other type.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// One tensor's entry in the file's tensor table.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// Tensor name as written in the file (llama.cpp's naming, e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// ggml's dimensions, innermost (row length) first.
    pub dims: Vec<usize>,
    /// How the data is stored (plain or quantized).
    pub ggml_type: GgmlType,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    /// Number of values.
    pub n_elements: usize,
    /// Number of bytes of data.
    pub n_bytes: usize,
}

impl TensorInfo {
    /// The row-major (Hugging Face) shape: the dimensions reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// An open GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    /// GGUF format version (2 or 3).
    pub version: u32,
    /// Key–value metadata, in file order.
    pub metadata: Vec<(String, Value)>,
    /// Tensor table, in file order.
    pub tensors: Vec<TensorInfo>,
    /// Alignment of the data section and of every tensor's offset, bytes (`general.alignment`,
    /// else [`DEFAULT_ALIGNMENT`]).
    pub alignment: u64,
    /// Byte offset of the data section in the file.
    pub data_offset: u64,
}

fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// A bounds-checked little-endian reader over the mapped header.
struct Cursor<'a> {
    path: &'a Path,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.buf.len() => {
                let s = &self.buf[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => Err(format_err(
                self.path,
                format!(
                    "truncated: the file ends at byte {} while reading {} ({n} bytes at byte {})",
                    self.buf.len(),
                    what(),
                    self.pos
                ),
            )),
        }
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that must fit what is left of the file at `min_size` bytes per item.
    fn count(&mut self, min_size: usize, what: &dyn Fn() -> String) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_size as u64) > left {
            return Err(format_err(
                self.path,
                format!(
                    "{} declares {n} items but only {left} bytes are left (a truncated or corrupt file?)",
                    what()
                ),
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let len = self.count(1, what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| format_err(self.path, format!("{} is not valid UTF-8", what())))
    }

    fn value(&mut self, vtype: u32, what: &dyn Fn() -> String, depth: usize) -> Result<Value> {
        Ok(match vtype {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(format_err(
                        self.path,
                        format!("{}: bool byte {b} is neither 0 nor 1", what()),
                    ))
                }
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth >= 8 {
                    return Err(format_err(
                        self.path,
                        format!("{}: arrays nested more than 8 deep", what()),
                    ));
                }
                let elem = self.u32(what)?;
                // The smallest encoding of one element (a string or array is at least 8 or 12).
                let min = match elem {
                    0 | 1 | 7 => 1,
                    2 | 3 => 2,
                    4..=6 => 4,
                    8 | 10..=12 => 8,
                    9 => 12,
                    other => {
                        return Err(format_err(
                            self.path,
                            format!("{}: unknown array element type {other}", what()),
                        ))
                    }
                };
                let n = self.count(min, what)?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem, what, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            other => {
                return Err(format_err(
                    self.path,
                    format!("{}: unknown value type {other}", what()),
                ))
            }
        })
    }
}

impl GgufFile {
    /// Maps `path` and reads its header, metadata and tensor table; checks that every tensor's
    /// data lies inside the file. Errors name the file (and the key or tensor).
    pub fn open(path: &Path) -> Result<GgufFile> {
        let file = File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: the file is opened read-only; like every mmap-based loader we rely on it not
        // being modified while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut c = Cursor {
            path,
            buf: &mmap,
            pos: 0,
        };
        let magic = c.array::<4>(&|| "the magic number".into())?;
        if &magic != MAGIC {
            return Err(format_err(
                path,
                format!("not a GGUF file (starts with {magic:02x?}, expected \"GGUF\")"),
            ));
        }
        let version = c.u32(&|| "the version".into())?;
        match version {
            2 | 3 => {}
            1 => {
                return Err(format_err(
                    path,
                    "GGUF version 1 is not supported (versions 2 and 3 are); re-convert the model",
                ))
            }
            v if v.swap_bytes() <= 3 => {
                return Err(format_err(
                    path,
                    "a big-endian GGUF file: only little-endian files are supported",
                ))
            }
            v => {
                return Err(format_err(
                    path,
                    format!("GGUF version {v} is not supported (versions 2 and 3 are)"),
                ))
            }
        }
        let n_tensors = c.count(24, &|| "the tensor count".into())?;
        let n_kv = c.count(13, &|| "the metadata count".into())?;
        let mut metadata = Vec::with_capacity(n_kv);
        for i in 0..n_kv {
            let key = c.string(&|| format!("the key of metadata entry {i}"))?;
            let what = || format!("metadata `{key}`");
            let vtype = c.u32(&what)?;
            let value = c.value(vtype, &what, 0)?;
            metadata.push((key, value));
        }
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some((_, v)) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() => a,
                _ => {
                    return Err(format_err(
                        path,
                        format!("metadata `general.alignment` is {v:?}, not a power of two"),
                    ))
                }
            },
        };
        let mut tensors = Vec::with_capacity(n_tensors);
        for i in 0..n_tensors {
            let name = c.string(&|| format!("the name of tensor {i}"))?;
            let what = || format!("the info of tensor `{name}`");
            let n_dims = c.u32(&what)? as usize;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(format_err(
                    path,
                    format!("tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"),
                ));
            }
            let mut dims = Vec::with_capacity(n_dims);
            for _ in 0..n_dims {
                let d = c.u64(&what)?;
                dims.push(
                    usize::try_from(d).map_err(|_| {
                        format_err(path, format!("tensor `{name}` has dimension {d}"))
                    })?,
                );
            }
            let ggml_type = GgmlType(c.u32(&what)?);
            let offset = c.u64(&what)?;
            let (n_elements, n_bytes) =
                tensor_size(&name, &dims, ggml_type).map_err(|msg| format_err(path, msg))?;
            if offset % alignment != 0 {
                return Err(format_err(
                    path,
                    format!("tensor `{name}` starts at offset {offset}, not a multiple of the alignment {alignment}"),
                ));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                n_elements,
                n_bytes,
            });
        }
        let data_offset = (c.pos as u64).div_ceil(alignment) * alignment;
        for t in &tensors {
            let end = data_offset
                .checked_add(t.offset)
                .and_then(|s| s.checked_add(t.n_bytes as u64));
            if end.is_none_or(|e| e > mmap.len() as u64) {
                return Err(format_err(
                    path,
                    format!(
                        "truncated: tensor `{}` needs bytes {}..{} but the file has {}",
                        t.name,
                        data_offset + t.offset,
                        data_offset as u128 + t.offset as u128 + t.n_bytes as u128,
                        mmap.len()
                    ),
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = tensors.iter().find(|t| !seen.insert(t.name.as_str())) {
            return Err(format_err(
                path,
                format!("tensor `{}` appears twice", dup.name),
            ));
        }
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// A tensor's table entry.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// A tensor's raw data (its bounds were checked by [`GgufFile::open`]).
    pub fn tensor_bytes(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + t.offset) as usize;
        &self.mmap[start..start + t.n_bytes]
    }

    /// A tensor's values in f32, in row-major order of [`TensorInfo::shape`]. A missing tensor or
    /// an unsupported type is an error naming the file and the tensor.
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let t = self
            .tensor(name)
            .ok_or_else(|| format_err(&self.path, format!("tensor `{name}` not found")))?;
        let mut out = vec![0.0f32; t.n_elements];
        dequantize(t.ggml_type, self.tensor_bytes(t), &mut out)
            .map_err(|e| format_err(&self.path, format!("tensor `{name}`: {e}")))?;
        Ok(out)
    }

    /// An error about this file.
    pub fn error(&self, msg: impl Into<String>) -> Error {
        format_err(&self.path, msg)
    }
}

/// Values and bytes of a tensor; the message names the tensor.
fn tensor_size(
    name: &str,
    dims: &[usize],
    ty: GgmlType,
) -> std::result::Result<(usize, usize), String> {
    let Some((tname, block, size)) = ty.traits() else {
        return Err(format!("tensor `{name}` has unknown ggml type id {}", ty.0));
    };
    let n = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("tensor `{name}` has dimensions {dims:?}, too many values"))?;
    if !dims[0].is_multiple_of(block) {
        return Err(format!(
            "tensor `{name}` ({tname}) has rows of {} values, not a multiple of its block of {block}",
            dims[0]
        ));
    }
    let bytes = (n / block)
        .checked_mul(size)
        .ok_or_else(|| format!("tensor `{name}` is too large"))?;
    Ok((n, bytes))
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// Q4_K's 6-bit scale and min of sub-block `j` (0..8) from the 12 packed bytes.
pub(crate) fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (yi, &q) in y.iter_mut().zip(&b[2..34]) {
        *yi = (q as i8) as f32 * d;
    }
}

fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let (lo, hi) = y.split_at_mut(16);
    for (j, &q) in b[2..18].iter().enumerate() {
        lo[j] = ((q & 0xF) as i32 - 8) as f32 * d;
        hi[j] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let (lo, hi) = y.split_at_mut(16);
    for (j, &q) in b[4..20].iter().enumerate() {
        lo[j] = (q & 0xF) as f32 * d + m;
        hi[j] = (q >> 4) as f32 * d + m;
    }
}

fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let h = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let (lo, hi) = y.split_at_mut(16);
    for (j, &q) in b[6..22].iter().enumerate() {
        let n0 = (q & 0xF) as i32 | ((h >> j) << 4 & 0x10) as i32;
        let n1 = (q >> 4) as i32 | (h >> (j + 12) & 0x10) as i32;
        lo[j] = (n0 - 16) as f32 * d;
        hi[j] = (n1 - 16) as f32 * d;
    }
}

fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let h = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let (lo, hi) = y.split_at_mut(16);
    for (j, &q) in b[8..24].iter().enumerate() {
        let n0 = (q & 0xF) as u32 | ((h >> j) << 4 & 0x10);
        let n1 = (q >> 4) as u32 | (h >> (j + 12) & 0x10);
        lo[j] = n0 as f32 * d + m;
        hi[j] = n1 as f32 * d + m;
    }
}

fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    dequant_k_4_5(&b[..16], Some(&b[16..48]), &b[48..176], y);
}

fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    dequant_k_4_5(&b[..16], None, &b[16..144], y);
}

/// Q4_K and Q5_K: `head` is `d, dmin, scales`; Q5_K adds the fifth bit of each value from `qh`
/// (bit `j` of `qh[l]` for sub-block `j`), Q4_K has none.
fn dequant_k_4_5(head: &[u8], qh: Option<&[u8]>, qs: &[u8], y: &mut [f32]) {
    let d = f16_at(head, 0);
    let dmin = f16_at(head, 2);
    let scales = &head[4..16];
    for c in 0..4 {
        let (sc1, m1) = q4k_scale_min(2 * c, scales);
        let (sc2, m2) = q4k_scale_min(2 * c + 1, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        let q = &qs[32 * c..32 * c + 32];
        let out = &mut y[64 * c..64 * c + 64];
        for l in 0..32 {
            let (h1, h2) = match qh {
                Some(qh) => ((qh[l] >> (2 * c) & 1) << 4, (qh[l] >> (2 * c + 1) & 1) << 4),
                None => (0, 0),
            };
            out[l] = d1 * ((q[l] & 0xF) + h1) as f32 - min1;
            out[l + 32] = d2 * ((q[l] >> 4) + h2) as f32 - min2;
        }
    }
}

fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for h in 0..2 {
        let ql = &b[64 * h..64 * h + 64];
        let qh = &b[128 + 32 * h..128 + 32 * h + 32];
        let sc = &b[192 + 8 * h..192 + 8 * h + 8];
        let out = &mut y[128 * h..128 * h + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * (sc[k] as i8) as f32;
            out[l] = s(is) * q1 as f32;
            out[l + 32] = s(is + 2) * q2 as f32;
            out[l + 64] = s(is + 4) * q3 as f32;
            out[l + 96] = s(is + 6) * q4 as f32;
        }
    }
}

/// Dequantizes `bytes` of type `ty` into `out` (whose length is the number of values). The error
/// names the type (unsupported) or the size mismatch.
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<()> {
    let (Some(block), Some(size)) = (ty.block_size(), ty.type_size()) else {
        return Err(Error::InvalidArgument(format!(
            "unknown ggml type id {}",
            ty.0
        )));
    };
    if !ty.is_supported() {
        return Err(Error::InvalidArgument(format!(
            "type {ty} cannot be dequantized (supported: {})",
            supported_type_names()
        )));
    }
    if !out.len().is_multiple_of(block) || bytes.len() != out.len() / block * size {
        return Err(Error::InvalidArgument(format!(
            "{ty}: {} bytes do not hold {} values (blocks of {block} values in {size} bytes)",
            bytes.len(),
            out.len()
        )));
    }
    let blocks = bytes.chunks_exact(size).zip(out.chunks_exact_mut(block));
    match ty {
        GgmlType::F32 => {
            blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = f16_at(b, 0)),
        GgmlType::BF16 => {
            blocks.for_each(|(b, y)| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32())
        }
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| dequant_q8_0(b, y)),
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| dequant_q4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| dequant_q4_1(b, y)),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| dequant_q5_0(b, y)),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| dequant_q5_1(b, y)),
        GgmlType::Q4_K => blocks.for_each(|(b, y)| dequant_q4_k(b, y)),
        GgmlType::Q5_K => blocks.for_each(|(b, y)| dequant_q5_k(b, y)),
        GgmlType::Q6_K => blocks.for_each(|(b, y)| dequant_q6_k(b, y)),
        _ => unreachable!("is_supported covers every arm"),
    }
    Ok(())
}
