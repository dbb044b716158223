//! Counter-based random numbers, the same on the CPU and in the CUDA kernels: value `i` of the
//! stream seeded `s` is a pure function of `(s, i)`, so any element can be drawn on its own, in
//! any order, on either device:
//! ```text
//! h_i = splitmix64(s ⊕ i · φ)          φ = 0x9E3779B97F4A7C15 (the golden ratio in 64 bits)
//! u_i = (h_i >> 40) · 2⁻²⁴             24 bits: uniform on [0, 1), exact in f32
//! ```
//! Users: LoRA dropout masks ([`super::dropout`]) and random weights for benchmarks
//! ([`uniform_cuda`], kernel `uniform_bf16` in `kernels/embedding.cu`).

use cudarc::driver::PushKernelArg;

use super::cuda_ordinal;
use crate::device::cuda::{grid_1d, CudaDevice};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// φ: the odd constant that spreads counters (and streams) over 64 bits.
pub const PHI: u64 = 0x9E37_79B9_7F4A_7C15;

/// Steele, Lea and Flood's SplitMix64 output function (of the state after one step).
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(PHI);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `u_i` of stream `s`: uniform on [0, 1) with 24 bits.
pub fn unit(s: u64, i: u64) -> f32 {
    (splitmix64(s ^ i.wrapping_mul(PHI)) >> 40) as f32 * (1.0 / 16_777_216.0)
}

/// `a · (2·u_i − 1)`: uniform on [−a, a) (the product is the only rounding).
pub fn uniform(s: u64, i: u64, a: f32) -> f32 {
    a * (2.0 * unit(s, i) - 1.0)
}

/// A bf16 tensor of `shape` on `device` (a GPU) holding `uniform(s, i, a)` at flat index `i`,
/// drawn on the device: no host copy, whatever the size.
pub fn uniform_cuda(shape: &[usize], a: f32, s: u64, device: &Device) -> Result<Tensor> {
    let op = "uniform (cuda)";
    if !a.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "{op}: the bound {a} is not finite"
        )));
    }
    let mut y = Tensor::uninit(shape, DType::BF16, device)?;
    let o = cuda_ordinal(op, &y)?;
    let n = y.elem_count();
    if n == 0 {
        return Ok(y);
    }
    let cuda = CudaDevice::get(o)?;
    let name = "uniform_bf16";
    let f = cuda.function("embedding", name)?;
    let n_i = n as i64;
    let mut b = cuda.stream().launch_builder(f);
    b.arg(y.cuda_slice_mut::<half::bf16>(op)?)
        .arg(&n_i)
        .arg(&s)
        .arg(&a);
    // SAFETY: uniform_bf16(bf16*, long long, unsigned long long, float); y holds n elements.
    unsafe { cuda.launch(name, b, grid_1d(n, 256)) }?;
    Ok(y)
}
