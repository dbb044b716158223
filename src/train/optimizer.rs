//! AdamW over the one flat buffer of every LoRA parameter, and the global gradient-norm clip.
//!
//! PyTorch's `torch.optim.AdamW` (decoupled weight decay), step `t` ≥ 1, per element:
//! ```text
//! θ ← θ · (1 − lr·λ)
//! m ← β1·m + (1 − β1)·g
//! v ← β2·v + (1 − β2)·g²
//! θ ← θ − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + ε)
//! ```
//! Clipping (`clip_grad_norm_`): `‖g‖₂` over the whole buffer; if it exceeds `max`, every
//! gradient is scaled by `max / (‖g‖ + 1e-6)`.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// AdamW hyper-parameters (the learning rate comes from the schedule at each step).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Optimizer state, laid out like the parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// Steps taken so far.
    pub step: u64,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl AdamW {
    pub fn new(config: AdamWConfig, len: usize) -> AdamW {
        AdamW {
            config,
            step: 0,
            m: vec![0.0; len],
            v: vec![0.0; len],
        }
    }

    /// One update of `params` with `grads` at learning rate `lr`.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64) -> Result<()> {
        if params.len() != self.m.len() || grads.len() != self.m.len() {
            return Err(Error::ShapeMismatch {
                op: "adamw",
                expected: format!("{} parameters and gradients", self.m.len()),
                got: format!("{} parameters, {} gradients", params.len(), grads.len()),
            });
        }
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let (b1, b2) = (c.beta1 as f32, c.beta2 as f32);
        let decay = (1.0 - lr * c.weight_decay) as f32;
        let step_size = (lr / (1.0 - c.beta1.powi(t))) as f32;
        let bc2_sqrt = (1.0 - c.beta2.powi(t)).sqrt() as f32;
        let eps = c.eps as f32;
        for (((p, &g), m), v) in params
            .iter_mut()
            .zip(grads)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            *p *= decay;
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *p -= step_size * *m / (v.sqrt() / bc2_sqrt + eps);
        }
        Ok(())
    }
}

/// `‖g‖₂` over the buffer (accumulated in f64).
pub fn grad_norm(grads: &[f32]) -> f64 {
    grads
        .iter()
        .map(|&g| (g as f64) * (g as f64))
        .sum::<f64>()
        .sqrt()
}

/// Scales `grads` so their norm is at most `max_norm`; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    let norm = grad_norm(grads);
    if max_norm > 0.0 && norm > max_norm {
        let scale = (max_norm / (norm + 1e-6)) as f32;
        for g in grads.iter_mut() {
            *g *= scale;
        }
    }
    norm
}
