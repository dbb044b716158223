//! Training checkpoints, written atomically: everything goes into a temporary folder, which is
//! renamed into place (`checkpoints/step-000120/`), then the `checkpoints/latest` pointer is
//! replaced by a rename. A crash or a full disk at any point leaves the previous checkpoint, and
//! the pointer to it, intact.
//!
//! A checkpoint holds the adapter (PEFT layout, loadable on its own), the AdamW state
//! (`optimizer.safetensors`: m and v), and `trainer_state.json` (step, epoch, position in the
//! epoch's batches, tokens seen, and the run's configuration for the compatibility check).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::optimizer::{AdamW, AdamWConfig};
use crate::error::{Error, Result};
use crate::io::adapters;
use crate::io::safetensors::Checkpoint;
use crate::model::config::LlamaConfig;
use crate::model::lora::LoraParams;

/// Where the run is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Current epoch, from 0.
    pub epoch: u64,
    /// Micro-batches of this epoch already consumed.
    pub cursor: usize,
    /// Tokens of the micro-batches trained on so far (every packed token, counted or not).
    pub tokens_seen: u64,
    /// The run's configuration, for the compatibility check on resume.
    pub config: TrainConfig,
    /// The training data file's fingerprint ([`fingerprint`]), so that a resume on changed data
    /// is refused (absent in checkpoints written before it was recorded).
    #[serde(default)]
    pub data_fingerprint: Option<String>,
}

/// A file's fingerprint: its length and the FNV-1a 64 hash of its bytes (a stable function,
/// unlike std's hasher), as `"<bytes> bytes, fnv1a64 <hex>"`.
pub fn fingerprint(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in &bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    Ok(format!("{} bytes, fnv1a64 {h:016x}", bytes.len()))
}

const KEEP: usize = 2;

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The folder of a run's checkpoints: `<output>/checkpoints`.
pub fn checkpoints_dir(output: &Path) -> PathBuf {
    output.join("checkpoints")
}

/// Writes a checkpoint; returns its folder.
pub fn save(output: &Path, lora: &LoraParams, opt: &AdamW, state: &TrainState) -> Result<PathBuf> {
    let root = checkpoints_dir(output);
    std::fs::create_dir_all(&root).map_err(io(&root))?;
    let name = format!("step-{:06}", state.step);
    let tmp = root.join(format!(".tmp-{name}"));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        adapters::save(&tmp, lora, Some(&state.config.model.display().to_string()))?;
        let m: &[u8] = bytemuck::cast_slice(&opt.m);
        let v: &[u8] = bytemuck::cast_slice(&opt.v);
        let shape = vec![opt.m.len()];
        let views = vec![
            (
                "m",
                TensorView::new(Dtype::F32, shape.clone(), m).expect("valid view"),
            ),
            (
                "v",
                TensorView::new(Dtype::F32, shape, v).expect("valid view"),
            ),
        ];
        let meta: HashMap<String, String> = [
            ("step".to_string(), opt.step.to_string()),
            (
                "config".to_string(),
                serde_json::to_string(&opt.config).expect("plain struct"),
            ),
        ]
        .into();
        let bytes = safetensors::serialize(views, Some(meta)).map_err(|e| Error::Format {
            path: tmp.clone(),
            msg: format!("cannot serialise the optimizer state: {e}"),
        })?;
        let opt_path = tmp.join("optimizer.safetensors");
        std::fs::write(&opt_path, bytes).map_err(io(&opt_path))?;
        let state_path = tmp.join("trainer_state.json");
        std::fs::write(
            &state_path,
            serde_json::to_string_pretty(state).expect("plain struct"),
        )
        .map_err(io(&state_path))?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let dest = root.join(&name);
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(io(&dest))?;
    }
    std::fs::rename(&tmp, &dest).map_err(io(&dest))?;
    adapters::write_atomic(&root.join("latest"), name.as_bytes())?;
    // Keep the newest few.
    let mut steps: Vec<PathBuf> = std::fs::read_dir(&root)
        .map_err(io(&root))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-"))
        })
        .collect();
    steps.sort();
    for old in steps.iter().rev().skip(KEEP) {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(dest)
}

/// The latest checkpoint of `output`, if any.
pub fn latest(output: &Path) -> Result<Option<PathBuf>> {
    let pointer = checkpoints_dir(output).join("latest");
    if !pointer.is_file() {
        return Ok(None);
    }
    let name = std::fs::read_to_string(&pointer).map_err(io(&pointer))?;
    let dir = checkpoints_dir(output).join(name.trim());
    if !dir.is_dir() {
        return Err(Error::Format {
            path: pointer,
            msg: format!("points to {}, which does not exist", dir.display()),
        });
    }
    Ok(Some(dir))
}

/// Loads a checkpoint folder for a model of configuration `model`.
pub fn load(dir: &Path, model: &LlamaConfig) -> Result<(LoraParams, AdamW, TrainState)> {
    let lora = adapters::load(dir, model)?;
    let state_path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&state_path).map_err(io(&state_path))?;
    let state: TrainState = serde_json::from_str(&text).map_err(|e| Error::Format {
        path: state_path.clone(),
        msg: format!("not a valid trainer state: {e}"),
    })?;
    let opt_path = dir.join("optimizer.safetensors");
    let ckpt = Checkpoint::open_files(std::slice::from_ref(&opt_path))?;
    let m = ckpt.f32("m", &[lora.len()])?;
    let v = ckpt.f32("v", &[lora.len()])?;
    let bytes = std::fs::read(&opt_path).map_err(io(&opt_path))?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::Format {
            path: opt_path.clone(),
            msg: e.to_string(),
        })?;
    let meta = header.metadata().clone().unwrap_or_default();
    let bad = |what: &str| Error::Format {
        path: opt_path.clone(),
        msg: format!("missing or invalid `{what}` in the metadata"),
    };
    let step: u64 = meta
        .get("step")
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("step"))?;
    let config: AdamWConfig = meta
        .get("config")
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| bad("config"))?;
    Ok((lora, AdamW { config, step, m, v }, state))
}
