//! `metrics.jsonl`: one JSON object per optimizer step or evaluation (the loss curves drawn
//! from it at the end are [`super::plot`]'s).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One line of `metrics.jsonl`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Optimizer steps completed, this one included.
    pub step: u64,
    /// Epoch the step's data came from, from 0.
    pub epoch: u64,
    /// Training loss (nats per counted token): the mean over the steps since the last logged one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub loss: Option<f64>,
    /// Learning rate of this step.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lr: Option<f64>,
    /// Global L2 norm of the adapter gradients, before clipping.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grad_norm: Option<f64>,
    /// Tokens in the micro-batches since the last logged step (counted or not).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tokens: Option<u64>,
    /// `tokens` over the wall-clock seconds since the last logged step.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tokens_per_s: Option<f64>,
    /// Resident memory of the process (CPU) or device memory in use (CUDA), bytes.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub memory_bytes: Option<u64>,
    /// Evaluation-set loss, nats per counted token; set only on an evaluation's own line.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub eval_loss: Option<f64>,
}

/// Writer of a run's `metrics.jsonl`.
pub struct MetricsLog {
    path: PathBuf,
}

impl MetricsLog {
    /// Opens `output/metrics.jsonl`, keeping only lines up to `keep_until_step` (a resumed run
    /// rewrites what came after its checkpoint).
    pub fn open(output: &Path, keep_until_step: Option<u64>) -> Result<MetricsLog> {
        let path = output.join("metrics.jsonl");
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        match keep_until_step {
            Some(step) if path.is_file() => {
                // Resuming: the lines up to the checkpoint stay byte for byte; what a stopped run
                // logged after it (and a line cut short by a kill) is cut off, to be logged again.
                let text = std::fs::read_to_string(&path).map_err(io)?;
                let mut keep = 0usize;
                for line in text.split_inclusive('\n') {
                    let whole = line.ends_with('\n');
                    let m = serde_json::from_str::<Metrics>(line.trim_end());
                    match m {
                        Ok(m) if whole && m.step <= step => keep += line.len(),
                        _ if whole && line.trim().is_empty() => keep += line.len(),
                        _ => break,
                    }
                }
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io)?;
                f.set_len(keep as u64).map_err(io)?;
            }
            _ => std::fs::write(&path, "").map_err(io)?,
        }
        Ok(MetricsLog { path })
    }

    /// Appends `m` as one JSON line.
    pub fn append(&self, m: &Metrics) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.path)
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })?;
        writeln!(f, "{}", serde_json::to_string(m).expect("plain struct")).map_err(|source| {
            Error::Io {
                path: self.path.clone(),
                source,
            }
        })
    }

    /// The file: `<output>/metrics.jsonl`.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Every line of a metrics file.
pub fn read(path: &Path) -> Result<Vec<Metrics>> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| Error::Format {
                path: path.to_path_buf(),
                msg: format!("line {}: {e}", i + 1),
            })
        })
        .collect()
}
