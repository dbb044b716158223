//! LoRA dropout: inverted dropout on the adapter's input, `x̃ = x ⊙ m` with
//! `m_i ∈ {0, 1/(1 − p)}`, and a mask that is a pure function of (micro-batch seed, layer,
//! projection, element index), computed by the same counter-based hash on both devices:
//! ```text
//! seed = run seed ⊕ ((step << 16 | micro-batch) · φ)
//! s   = seed ⊕ ((layer << 8 | target) · φ)        one stream per adapted projection
//! u_i = unit(s, i)                                [`super::random`]; i the flat index in [T, in]
//! m_i = 1/(1 − p) if u_i ≥ p (p as f32), else 0
//! ```
//! So the CPU and the GPU train with the same masks, a run resumed on the other device goes on
//! as it would have, and the backward redraws the forward's mask from the seed instead of
//! keeping it. The CUDA kernel is `dropout_bf16` in `kernels/embedding.cu`.

use cudarc::driver::PushKernelArg;

use super::random::{unit, PHI};
use super::{check_tensor, cuda_ordinal};
use crate::device::cuda::{grid_1d, CudaDevice};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// The dropout seed of micro-batch `i` of optimizer step `step` in a run seeded `seed` (both
/// devices, so a run resumed on the other one draws the masks it would have drawn).
pub fn batch_seed(seed: u64, step: u64, i: usize) -> u64 {
    seed ^ (step << 16 | i as u64).wrapping_mul(PHI)
}

/// The seed of one projection's mask: `seed` is the micro-batch's, `target` the projection's
/// index in [`crate::model::lora::Target::ALL`] order.
pub fn stream_seed(seed: u64, layer: usize, target: u64) -> u64 {
    seed ^ ((layer as u64) << 8 | target).wrapping_mul(PHI)
}

/// Whether element `i` of the mask with stream seed `s` is kept.
pub fn keep(s: u64, i: u64, p: f32) -> bool {
    unit(s, i) >= p
}

/// The mask of `n` elements for stream seed `s`: `1/(1 − p)` where kept, 0 where dropped.
pub fn mask(s: u64, p: f32, n: usize) -> Vec<f32> {
    let scale = 1.0 / (1.0 - p);
    let mut m = vec![0.0f32; n];
    // Each element a pure function of its index: drawn in parallel.
    super::for_chunks(&mut m, super::PAR_CHUNK, |at, ms| {
        for (j, v) in ms.iter_mut().enumerate() {
            *v = if keep(s, (at + j) as u64, p) {
                scale
            } else {
                0.0
            };
        }
    });
    m
}

/// CUDA: `y = x ⊙ m` with the mask of [`mask`] (`seed` a [`stream_seed`]); `y` is rounded to bf16.
pub fn dropout_cuda(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    let op = "dropout (cuda)";
    let o = cuda_ordinal(op, x)?;
    let dev = Device::Cuda(o);
    check_tensor(op, "x", x, DType::BF16, x.shape(), dev)?;
    if !(0.0..1.0).contains(&p) {
        return Err(Error::InvalidArgument(format!(
            "{op}: probability {p} is not in [0, 1)"
        )));
    }
    let mut y = Tensor::uninit(x.shape(), DType::BF16, &dev)?;
    let n = x.elem_count();
    if n == 0 {
        return Ok(y);
    }
    let cuda = CudaDevice::get(o)?;
    let name = "dropout_bf16";
    let f = cuda.function("embedding", name)?;
    let n_i = n as i64;
    let mut b = cuda.stream().launch_builder(f);
    b.arg(x.cuda_slice::<half::bf16>(op)?)
        .arg(y.cuda_slice_mut::<half::bf16>(op)?)
        .arg(&n_i)
        .arg(&seed)
        .arg(&p);
    // SAFETY: dropout_bf16(const bf16*, bf16*, long long, unsigned long long, float); x and y
    // hold n elements.
    unsafe { cuda.launch(name, b, grid_1d(n, 256)) }?;
    Ok(y)
}
