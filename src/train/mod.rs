//! Training: configuration, optimizer, learning-rate schedules, checkpoints, metrics, the loss
//! curves and the loop.

pub mod checkpoint;
pub mod config;
pub mod metrics;
pub mod optimizer;
pub mod plot;
pub mod run_dir;
pub mod schedule;
pub mod trainer;

pub use config::TrainConfig;
pub use trainer::{Summary, Trainer};
