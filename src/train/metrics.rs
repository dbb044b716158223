//! `metrics.jsonl` (one JSON object per optimizer step or evaluation) and the loss-curve
//! picture drawn from it at the end (`loss_curve.svg`).

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

/// An SVG line chart of training loss (and eval loss points) against the step.
pub fn loss_curve_svg(metrics: &[Metrics]) -> String {
    let train: Vec<(f64, f64)> = metrics
        .iter()
        .filter_map(|m| m.loss.map(|l| (m.step as f64, l)))
        .collect();
    let eval: Vec<(f64, f64)> = metrics
        .iter()
        .filter_map(|m| m.eval_loss.map(|l| (m.step as f64, l)))
        .collect();
    let all: Vec<&(f64, f64)> = train.iter().chain(&eval).collect();
    let (w, h, pad) = (640.0, 400.0, 64.0);
    let (x0, x1) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.0), b.max(p.0))
        });
    let (y0, y1) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
            (a.min(p.1), b.max(p.1))
        });
    let (x0, x1) = if x1 > x0 {
        (x0, x1)
    } else {
        (x0 - 1.0, x0 + 1.0)
    };
    let (y0, y1) = if y1 > y0 {
        (y0, y1)
    } else {
        (y0 - 1.0, y0 + 1.0)
    };
    let px = |x: f64| pad + (x - x0) / (x1 - x0) * (w - 2.0 * pad);
    let py = |y: f64| h - pad - (y - y0) / (y1 - y0) * (h - 2.0 * pad);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <line x1=\"{pad}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <line x1=\"{pad}\" y1=\"{pad}\" x2=\"{pad}\" y2=\"{b}\" stroke=\"black\"/>\n\
         <text x=\"{cx}\" y=\"{ly}\" text-anchor=\"middle\">step</text>\n\
         <text x=\"14\" y=\"{cy}\" transform=\"rotate(-90 14 {cy})\" text-anchor=\"middle\">loss</text>\n",
        b = h - pad,
        r = w - pad,
        cx = w / 2.0,
        ly = h - 12.0,
        cy = h / 2.0,
    );
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * i as f64 / 4.0;
        svg += &format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{y:.3}</text>\n",
            pad - 4.0,
            py(y) + 4.0
        );
        let x = x0 + (x1 - x0) * i as f64 / 4.0;
        let label = if (x - x.round()).abs() < 1e-9 {
            format!("{x:.0}")
        } else {
            format!("{x:.1}")
        };
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>\n",
            px(x),
            h - pad + 16.0
        );
    }
    if !train.is_empty() {
        let pts: Vec<String> = train
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        svg += &format!(
            "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"{}\"/>\n",
            pts.join(" ")
        );
    }
    for &(x, y) in &eval {
        svg += &format!(
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"#d62728\"/>\n",
            px(x),
            py(y)
        );
    }
    svg += &format!(
        "<text x=\"{}\" y=\"20\" fill=\"#1f77b4\">train loss</text><text x=\"{}\" y=\"20\" fill=\"#d62728\">eval loss</text>\n</svg>\n",
        pad,
        pad + 90.0
    );
    svg
}
