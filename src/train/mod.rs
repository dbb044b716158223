//! Training: the optimizer, learning-rate schedules, and the loop.

pub mod optimizer;
pub mod schedule;
