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
    /// Decay of the first moment m (0.9 by default).
    pub beta1: f64,
    /// Decay of the second moment v (0.999 by default).
    pub beta2: f64,
    /// Added to the bias-corrected `√v` (1e-8 by default).
    pub eps: f64,
    /// Decoupled weight decay λ: θ shrinks by `lr·λ` each step (0 by default).
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
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// Steps taken so far.
    pub step: u64,
    /// First moment, one per parameter.
    pub m: Vec<f32>,
    /// Second moment, one per parameter.
    pub v: Vec<f32>,
}

impl AdamW {
    /// Fresh state (step 0, zero moments) for `len` parameters.
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

/// Kernel arguments of `adamw_step_f32` (the C struct `AdamParams`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct AdamParams {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    decay: f32,
    step_size: f32,
    bc2_sqrt: f32,
    max_norm: f32,
}

// SAFETY: a plain #[repr(C)] struct of f32s, laid out as the kernel's `AdamParams`.
unsafe impl cudarc::driver::DeviceRepr for AdamParams {}

/// Blocks of the gradient-norm kernel (each sums a strided share of the buffer).
const NORM_BLOCKS: usize = 512;

/// AdamW on the device: parameters, gradients and state stay there; the clipping factor is
/// computed from the norm in device memory, so a step needs no host synchronisation.
pub struct AdamWCuda {
    /// Hyper-parameters.
    pub config: AdamWConfig,
    /// Steps taken so far (t of the bias correction).
    pub step: u64,
    m: crate::tensor::Tensor,
    v: crate::tensor::Tensor,
    partials: cudarc::driver::CudaSlice<f64>,
    counter: cudarc::driver::CudaSlice<u32>,
    norm: cudarc::driver::CudaSlice<f64>,
    /// The first step whose gradient norm was not finite (0: none), written by the norm kernel.
    first_bad: cudarc::driver::CudaSlice<u64>,
    ordinal: usize,
}

impl AdamWCuda {
    /// Fresh state (step 0, zero f32 moments) for `len` parameters on GPU `ordinal`.
    pub fn new(config: AdamWConfig, len: usize, ordinal: usize) -> Result<AdamWCuda> {
        use crate::device::{cuda::CudaDevice, Device};
        use crate::tensor::{DType, Tensor};
        let dev = CudaDevice::get(ordinal)?;
        let d = Device::Cuda(ordinal);
        let s = dev.stream();
        let err = Error::cuda("allocating the AdamW workspace");
        Ok(AdamWCuda {
            config,
            step: 0,
            m: Tensor::zeros(&[len], DType::F32, &d)?,
            v: Tensor::zeros(&[len], DType::F32, &d)?,
            partials: s
                .alloc_zeros::<f64>(NORM_BLOCKS)
                .map_err(Error::cuda("allocating the AdamW workspace"))?,
            counter: s
                .alloc_zeros::<u32>(1)
                .map_err(Error::cuda("allocating the AdamW workspace"))?,
            norm: s.alloc_zeros::<f64>(1).map_err(err)?,
            first_bad: s
                .alloc_zeros::<u64>(1)
                .map_err(Error::cuda("allocating the AdamW workspace"))?,
            ordinal,
        })
    }

    fn check(&self, name: &str, t: &crate::tensor::Tensor) -> Result<()> {
        crate::ops::check_tensor(
            "adamw (cuda)",
            name,
            t,
            crate::tensor::DType::F32,
            self.m.shape(),
            crate::device::Device::Cuda(self.ordinal),
        )
    }

    /// Launches the global gradient-norm reduction (result stays on the device).
    pub fn launch_grad_norm(&mut self, grads: &crate::tensor::Tensor) -> Result<()> {
        use cudarc::driver::{LaunchConfig, PushKernelArg};
        self.check("gradients", grads)?;
        let dev = crate::device::cuda::CudaDevice::get(self.ordinal)?;
        let name = "grad_norm_f32";
        let f = dev.function("adamw", name)?;
        let n = grads.elem_count() as i64;
        let blocks = (grads.elem_count().div_ceil(256)).clamp(1, NORM_BLOCKS) as u32;
        // The step this norm belongs to (the update that follows it is step + 1).
        let step = self.step + 1;
        let mut b = dev.stream().launch_builder(f);
        b.arg(grads.cuda_slice::<f32>("grad norm")?)
            .arg(&n)
            .arg(&mut self.partials)
            .arg(&mut self.counter)
            .arg(&mut self.norm)
            .arg(&step)
            .arg(&mut self.first_bad);
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: grad_norm_f32(const float*, long long, double*, unsigned*, double*, unsigned
        // long long, unsigned long long*); the grid has at most NORM_BLOCKS blocks = partials'
        // length; the counter starts at 0 and the last block resets it; first_bad is one u64.
        unsafe { dev.launch(name, b, cfg) }
    }

    /// The first step whose gradient norm was not finite, if any (synchronises: read when the
    /// host reads anyway). That step's update and every later one were skipped, so the
    /// parameters are those of the step before it.
    pub fn first_non_finite_step(&self) -> Result<Option<u64>> {
        let dev = crate::device::cuda::CudaDevice::get(self.ordinal)?;
        let v = dev
            .stream()
            .clone_dtoh(&self.first_bad)
            .map_err(Error::cuda("reading the non-finite step"))?[0];
        Ok((v != 0).then_some(v))
    }

    /// The last computed gradient norm (synchronises: for logging only).
    pub fn grad_norm(&self) -> Result<f64> {
        let dev = crate::device::cuda::CudaDevice::get(self.ordinal)?;
        Ok(dev
            .stream()
            .clone_dtoh(&self.norm)
            .map_err(Error::cuda("reading the gradient norm"))?[0])
    }

    /// Norm, clip (when `max_norm` > 0) and one AdamW update at `lr`: two launches.
    pub fn step(
        &mut self,
        params: &mut crate::tensor::Tensor,
        grads: &crate::tensor::Tensor,
        lr: f64,
        max_norm: f64,
    ) -> Result<()> {
        use cudarc::driver::PushKernelArg;
        self.check("parameters", params)?;
        self.launch_grad_norm(grads)?;
        self.step += 1;
        let c = self.config;
        let t = self.step as i32;
        let a = AdamParams {
            lr: lr as f32,
            beta1: c.beta1 as f32,
            beta2: c.beta2 as f32,
            eps: c.eps as f32,
            decay: (1.0 - lr * c.weight_decay) as f32,
            step_size: (lr / (1.0 - c.beta1.powi(t))) as f32,
            bc2_sqrt: (1.0 - c.beta2.powi(t)).sqrt() as f32,
            max_norm: max_norm as f32,
        };
        let dev = crate::device::cuda::CudaDevice::get(self.ordinal)?;
        let name = "adamw_step_f32";
        let f = dev.function("adamw", name)?;
        let n = params.elem_count();
        let n_i = n as i64;
        let mut b = dev.stream().launch_builder(f);
        b.arg(params.cuda_slice_mut::<f32>("adamw")?)
            .arg(grads.cuda_slice::<f32>("adamw")?)
            .arg(self.m.cuda_slice_mut::<f32>("adamw")?)
            .arg(self.v.cuda_slice_mut::<f32>("adamw")?)
            .arg(&n_i)
            .arg(&a)
            .arg(&self.norm);
        // SAFETY: adamw_step_f32(float*, const float*, float*, float*, long long, AdamParams,
        // const double*); p, g, m, v hold n floats (checked); AdamParams is #[repr(C)] like the
        // kernel's struct; norm is one double written by grad_norm_f32 on the same stream.
        unsafe { dev.launch(name, b, crate::device::cuda::grid_1d(n, 256)) }
    }

    /// Restores the state of a (host) optimizer, e.g. from a checkpoint.
    pub fn load(&mut self, host: &AdamW) -> Result<()> {
        let dev = crate::device::Device::Cuda(self.ordinal);
        if host.m.len() != self.m.elem_count() {
            return Err(Error::ShapeMismatch {
                op: "adamw (cuda) load",
                expected: format!("{} parameters", self.m.elem_count()),
                got: format!("{}", host.m.len()),
            });
        }
        self.m = crate::tensor::Tensor::from_vec(host.m.clone(), &[host.m.len()], &dev)?;
        self.v = crate::tensor::Tensor::from_vec(host.v.clone(), &[host.v.len()], &dev)?;
        self.step = host.step;
        self.config = host.config;
        Ok(())
    }

    /// The state on the host (for checkpoints).
    pub fn to_host(&self) -> Result<AdamW> {
        Ok(AdamW {
            config: self.config,
            step: self.step,
            m: self.m.to_vec()?,
            v: self.v.to_vec()?,
        })
    }
}
