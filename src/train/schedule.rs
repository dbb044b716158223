//! Learning-rate schedules with linear warmup, as transformers' `get_scheduler` defines them.
//! The rate of optimizer step `k` (0-based) is `lr · f(k)`:
//! ```text
//! k < W:     f = k / W                                   (the first step of a warmup runs at 0)
//! constant:  f = 1
//! linear:    f = max(0, (N − k) / (N − W))
//! cosine:    f = max(0, ½·(1 + cos(π · (k − W) / (N − W))))
//! ```
//! with `W` warmup steps and `N` total steps.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How the rate decays after warmup (`--schedule`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Half a cosine period, from `lr` to 0 at step N.
    Cosine,
    /// A straight line, from `lr` to 0 at step N.
    Linear,
    /// `lr` for every step after warmup.
    Constant,
}

impl std::str::FromStr for ScheduleKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "cosine" => Ok(ScheduleKind::Cosine),
            "linear" => Ok(ScheduleKind::Linear),
            "constant" => Ok(ScheduleKind::Constant),
            _ => Err(Error::InvalidArgument(format!(
                "unknown schedule `{s}`: use cosine, linear or constant"
            ))),
        }
    }
}

/// A schedule over `total` optimizer steps.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Schedule {
    /// Decay after warmup.
    pub kind: ScheduleKind,
    /// Peak learning rate, reached when warmup ends.
    pub lr: f64,
    /// Warmup steps W, over which the rate rises linearly from 0.
    pub warmup: u64,
    /// Total optimizer steps N of the run.
    pub total: u64,
}

impl Schedule {
    /// The learning rate of optimizer step `k` (0-based).
    pub fn lr(&self, k: u64) -> f64 {
        let (k, w, n) = (k as f64, self.warmup as f64, self.total as f64);
        if k < w {
            return self.lr * k / w.max(1.0);
        }
        let f = match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => ((n - k) / (n - w).max(1.0)).max(0.0),
            ScheduleKind::Cosine => {
                let progress = (k - w) / (n - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        };
        self.lr * f
    }
}
