//! Memory-mapped safetensors checkpoints: one `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Tensors are read one at a time (the pages of one tensor are
//! touched, converted and released), so loading peaks near one tensor of host memory, not the
//! model. Every error names the file and the tensor.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, TensorInfo};
use safetensors::SafeTensors;

use crate::error::{Error, Result};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    header_len: usize,
    meta: Metadata,
}

/// One checkpoint: its shards and which shard holds each tensor.
pub struct Checkpoint {
    shards: Vec<Shard>,
    /// Tensor name (as the model reads it) → the shard that holds it.
    index: HashMap<String, usize>,
    /// Names read under another name than the stored one ([`Checkpoint::text_model`]): the
    /// name the model reads → the name in the file.
    stored: HashMap<String, String>,
    /// Names read so far ([`Checkpoint::unused`] lists the others).
    used: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// A tensor found in a checkpoint: where it is, its dtype, shape and bytes.
pub struct TensorRef<'a> {
    /// The shard file that holds it.
    pub file: &'a Path,
    /// Tensor name.
    pub name: &'a str,
    /// Element type as stored.
    pub dtype: Dtype,
    /// Row-major shape.
    pub shape: &'a [usize],
    /// The raw little-endian data, mapped from the file.
    pub bytes: &'a [u8],
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

impl Shard {
    fn open(path: &Path) -> Result<Shard> {
        let file = File::open(path).map_err(io_err(path))?;
        // SAFETY: the file is opened read-only; like every mmap-based loader we rely on the
        // checkpoint not being modified while it is loaded.
        let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
        if mmap.len() < 8 {
            return Err(format_err(
                path,
                format!("truncated: {} bytes, not a safetensors file", mmap.len()),
            ));
        }
        let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
            let declared = u64::from_le_bytes(mmap[..8].try_into().unwrap());
            format_err(
                path,
                format!(
                    "not a readable safetensors file ({e}); the file has {} bytes and declares a \
                     {declared}-byte header (a truncated download?)",
                    mmap.len()
                ),
            )
        })?;
        Ok(Shard {
            path: path.to_path_buf(),
            mmap,
            header_len,
            meta,
        })
    }

    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.meta.info(name)
    }
}

impl Checkpoint {
    /// Opens `dir/model.safetensors`, or the shards of `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Checkpoint> {
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.is_file() {
            return Checkpoint::open_sharded(&index_path);
        }
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Checkpoint::open_files(&[single]);
        }
        Err(format_err(
            dir,
            "no model.safetensors or model.safetensors.index.json in this folder",
        ))
    }

    /// Opens a model folder's weights as [`Checkpoint::open_dir`], the language model alone
    /// ([`Checkpoint::text_model`]) when its config says `multimodal`.
    pub fn open_model(dir: &Path, multimodal: bool) -> Result<Checkpoint> {
        let ckpt = Checkpoint::open_dir(dir)?;
        if multimodal {
            ckpt.text_model()
        } else {
            Ok(ckpt)
        }
    }

    /// Opens shards named by a `model.safetensors.index.json` (`weight_map`: tensor → file).
    pub fn open_sharded(index_path: &Path) -> Result<Checkpoint> {
        let text = std::fs::read_to_string(index_path).map_err(io_err(index_path))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format_err(index_path, format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| format_err(index_path, "no `weight_map` object"))?;
        let dir = index_path.parent().unwrap_or(Path::new("."));
        let mut files: Vec<String> = map
            .values()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format_err(index_path, "`weight_map` values must be file names"))
            })
            .collect::<Result<_>>()?;
        files.sort();
        files.dedup();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        let ckpt = Checkpoint::open_files(&paths)?;
        for (tensor, file) in map {
            let file = file.as_str().unwrap_or_default();
            match ckpt.index.get(tensor) {
                Some(&i) if ckpt.shards[i].path.ends_with(file) => {}
                Some(&i) => {
                    return Err(format_err(
                        index_path,
                        format!(
                            "weight_map puts `{tensor}` in {file}, but it is in {}",
                            ckpt.shards[i].path.display()
                        ),
                    ))
                }
                None => {
                    return Err(format_err(
                        &dir.join(file),
                        format!(
                            "tensor `{tensor}` listed in {} is missing",
                            index_path.display()
                        ),
                    ))
                }
            }
        }
        Ok(ckpt)
    }

    /// Opens the given files as one checkpoint.
    pub fn open_files(paths: &[PathBuf]) -> Result<Checkpoint> {
        let mut shards = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            let shard = Shard::open(p)?;
            for name in shard.meta.tensors().keys() {
                if let Some(prev) = index.insert(name.clone(), i) {
                    return Err(format_err(
                        p,
                        format!("tensor `{name}` is also in {}", paths[prev].display()),
                    ));
                }
            }
            shards.push(shard);
        }
        Ok(Checkpoint {
            shards,
            index,
            stored: HashMap::new(),
            used: Default::default(),
        })
    }

    /// A multimodal checkpoint's language model read as a plain one: its tensors, stored under
    /// `language_model.model.` (transformers 4.x and the hub; the output layer as
    /// `language_model.lm_head.`) or transformers 5's module path `model.language_model.` (the
    /// output layer as `lm_head.`), answer to `model.…` and `lm_head.…`; the vision tower and the
    /// projector keep their names ([`Checkpoint::outside_text_model`] tells them).
    pub fn text_model(mut self) -> Result<Checkpoint> {
        let layouts: [&[(&str, &str)]; 2] = [
            &[
                ("language_model.model.", "model."),
                ("language_model.lm_head.", "lm_head."),
            ],
            &[("model.language_model.", "model.")],
        ];
        let Some(renames) = layouts.into_iter().find(|l| {
            self.index
                .keys()
                .any(|n| n.starts_with(l[0].0) && n.contains(".layers."))
        }) else {
            return Err(format_err(
                &self.shards[0].path,
                "config.json says model_type gemma3 (a multimodal checkpoint) but no decoder \
                 layer is stored under `language_model.model.` (transformers 4.x, the hub) or \
                 `model.language_model.` (transformers 5's module names)",
            ));
        };
        let mut index: HashMap<String, usize> = HashMap::with_capacity(self.index.len());
        for (name, shard) in std::mem::take(&mut self.index) {
            let read = renames
                .iter()
                .find_map(|(from, to)| name.strip_prefix(from).map(|rest| format!("{to}{rest}")));
            let key = read.clone().unwrap_or_else(|| name.clone());
            if let Some(&other) = index.get(&key) {
                return Err(format_err(
                    &self.shards[shard].path,
                    format!(
                        "tensor `{name}` and a tensor in {} are both the language model's `{key}`",
                        self.shards[other].path.display()
                    ),
                ));
            }
            index.insert(key.clone(), shard);
            if read.is_some() {
                self.stored.insert(key, name);
            }
        }
        self.index = index;
        Ok(self)
    }

    /// The name a tensor has in the file (differs from `name` in a multimodal checkpoint's
    /// language model).
    pub fn stored_name<'a>(&'a self, name: &'a str) -> &'a str {
        self.stored.get(name).map(String::as_str).unwrap_or(name)
    }

    /// Whether `name` is a tensor of a multimodal checkpoint outside its language model (the
    /// vision tower, the projector), after [`Checkpoint::text_model`].
    pub fn outside_text_model(&self, name: &str) -> bool {
        !self.stored.is_empty() && !self.stored.contains_key(name) && name != "lm_head.weight"
    }

    /// Whether a tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Every tensor name, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// The tensors nobody has read, sorted: after a model has loaded, the weights its config
    /// does not use.
    pub fn unused(&self) -> Vec<&str> {
        let used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        self.names()
            .into_iter()
            .filter(|n| !used.contains(*n))
            .collect()
    }

    /// The file a tensor is in (or the first shard, for errors about missing tensors).
    fn file_of(&self, name: &str) -> &Path {
        let i = self.index.get(name).copied().unwrap_or(0);
        &self.shards[i].path
    }

    /// Finds a tensor; a missing one is an error naming the file(s) and the tensor.
    pub fn get<'a>(&'a self, name: &'a str) -> Result<TensorRef<'a>> {
        let Some(&i) = self.index.get(name) else {
            let files: Vec<String> = self
                .shards
                .iter()
                .map(|s| s.path.display().to_string())
                .collect();
            return Err(Error::Format {
                path: self.shards[0].path.clone(),
                msg: format!("tensor `{name}` not found (looked in {})", files.join(", ")),
            });
        };
        self.used
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_string());
        let shard = &self.shards[i];
        let name = self.stored_name(name);
        let info = shard.info(name).expect("indexed tensor has metadata");
        let start = 8 + shard.header_len + info.data_offsets.0;
        let end = 8 + shard.header_len + info.data_offsets.1;
        if end > shard.mmap.len() {
            return Err(format_err(
                &shard.path,
                format!(
                    "tensor `{name}` needs bytes {start}..{end} but the file has {} (truncated?)",
                    shard.mmap.len()
                ),
            ));
        }
        Ok(TensorRef {
            file: &shard.path,
            name,
            dtype: info.dtype,
            shape: &info.shape,
            bytes: &shard.mmap[start..end],
        })
    }

    /// A float tensor (F32, BF16 or F16) of exactly `shape`, converted to f32; any NaN or ±Inf
    /// in it is an error naming the tensor, the count and the first.
    pub fn f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.get(name)?;
        t.expect_shape(shape)?;
        let v = t.to_f32()?;
        // A NaN or ±Inf weight poisons every value downstream (and NF4 quantization would hide
        // it as a finite code): refused here, for every tensor read as numbers.
        let bad = v.iter().filter(|x| !x.is_finite()).count();
        if bad > 0 {
            let first = v.iter().position(|x| !x.is_finite()).unwrap_or(0);
            return Err(self.error(
                name,
                format!(
                    "holds {bad} non-finite value(s) (NaN or ±Inf) of {}; the first, {}, at flat \
                     index {first}",
                    v.len(),
                    v[first]
                ),
            ));
        }
        Ok(v)
    }

    /// A U8 tensor of exactly `shape`.
    pub fn u8(&self, name: &str, shape: &[usize]) -> Result<Vec<u8>> {
        let t = self.get(name)?;
        t.expect_shape(shape)?;
        if t.dtype != Dtype::U8 {
            return Err(t.wrong_dtype("U8"));
        }
        Ok(t.bytes.to_vec())
    }

    /// Error for a tensor that exists but is unusable.
    pub fn error(&self, name: &str, msg: impl std::fmt::Display) -> Error {
        format_err(self.file_of(name), format!("tensor `{name}`: {msg}"))
    }
}

impl TensorRef<'_> {
    /// Checks that the shape is exactly `shape`; the error names the file and the tensor.
    pub fn expect_shape(&self, shape: &[usize]) -> Result<()> {
        if self.shape == shape {
            Ok(())
        } else {
            Err(format_err(
                self.file,
                format!(
                    "tensor `{}` has shape {:?}, expected {:?}",
                    self.name, self.shape, shape
                ),
            ))
        }
    }

    /// The format error for a tensor whose dtype is not `expected`, naming the file and the tensor.
    pub fn wrong_dtype(&self, expected: &str) -> Error {
        format_err(
            self.file,
            format!(
                "tensor `{}` has dtype {:?}, expected {expected}",
                self.name, self.dtype
            ),
        )
    }

    /// Converts F32, BF16 or F16 data to f32 (exactly).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let b = self.bytes;
        Ok(match self.dtype {
            Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            _ => return Err(self.wrong_dtype("F32, BF16 or F16")),
        })
    }
}
