//! SwiGLU, the gate of Llama's MLP: `h = silu(g) ⊙ u`, all `[T, F]`.
//!
//! With `σ = 1/(1+e^{−g})`, `silu(g) = g·σ` and `silu'(g) = σ·(1 + g·(1 − σ))`:
//! ```text
//! dg = dh ⊙ u ⊙ σ·(1 + g·(1 − σ))
//! du = dh ⊙ g·σ
//! ```

use cudarc::driver::PushKernelArg;

use super::{
    check_tensor, cuda_ordinal, expect_len, for_chunks, for_chunks2, zeros, Real, PAR_CHUNK,
};
use crate::device::cuda::{grid_1d, CudaDevice};
use crate::device::Device;
use crate::error::Result;
use crate::tensor::{DType, Tensor};

fn sigmoid<T: Real>(g: T) -> T {
    T::one() / (T::one() + (-g).exp())
}

/// `h = silu(gate) ⊙ up`.
pub fn forward<T: Real>(gate: &[T], up: &[T]) -> Result<Vec<T>> {
    expect_len("swiglu", "up", up.len(), &[gate.len()])?;
    let mut h = zeros(gate.len());
    for_chunks(&mut h, PAR_CHUNK, |at, hs| {
        for ((o, &g), &u) in hs.iter_mut().zip(&gate[at..]).zip(&up[at..]) {
            *o = g * sigmoid(g) * u;
        }
    });
    Ok(h)
}

/// `(dgate, dup)`.
pub fn backward<T: Real>(gate: &[T], up: &[T], dh: &[T]) -> Result<(Vec<T>, Vec<T>)> {
    expect_len("swiglu backward", "up", up.len(), &[gate.len()])?;
    expect_len(
        "swiglu backward",
        "output gradient",
        dh.len(),
        &[gate.len()],
    )?;
    let mut dg = zeros(gate.len());
    let mut du = zeros(gate.len());
    for_chunks2(&mut dg, &mut du, PAR_CHUNK, |at, dgs, dus| {
        let inputs = gate[at..].iter().zip(&up[at..]).zip(&dh[at..]);
        for ((og, ou), ((&g, &u), &d)) in dgs.iter_mut().zip(dus.iter_mut()).zip(inputs) {
            let s = sigmoid(g);
            *og = d * u * s * (T::one() + g * (T::one() - s));
            *ou = d * g * s;
        }
    });
    Ok((dg, du))
}

/// CUDA: `h = silu(gate) ⊙ up` for bf16 tensors of one shape.
pub fn forward_cuda(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let op = "swiglu (cuda)";
    let o = cuda_ordinal(op, gate)?;
    let dev = Device::Cuda(o);
    let shape = gate.shape().to_vec();
    check_tensor(op, "gate", gate, DType::BF16, &shape, dev)?;
    check_tensor(op, "up", up, DType::BF16, &shape, dev)?;
    let mut h = Tensor::uninit(&shape, DType::BF16, &dev)?;
    let n = gate.elem_count();
    if n == 0 {
        return Ok(h);
    }
    let cuda = CudaDevice::get(o)?;
    let name = "swiglu_fwd_bf16";
    let f = cuda.function("swiglu", name)?;
    let n_i = n as i64;
    let mut b = cuda.stream().launch_builder(&f);
    b.arg(gate.cuda_slice::<half::bf16>(op)?)
        .arg(up.cuda_slice::<half::bf16>(op)?)
        .arg(h.cuda_slice_mut::<half::bf16>(op)?)
        .arg(&n_i);
    // SAFETY: swiglu_fwd_bf16(const bf16*, const bf16*, bf16*, long long); all hold n elements.
    unsafe { cuda.launch(name, b, grid_1d(n, 256)) }?;
    Ok(h)
}

/// CUDA: `(dgate, dup)`, written in place over `gate` and `up` (which the backward no longer
/// needs): the MLP backward's peak holds two `[T, F]` tensors fewer.
pub fn backward_cuda(gate: Tensor, up: Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    let op = "swiglu backward (cuda)";
    let o = cuda_ordinal(op, &gate)?;
    let dev = Device::Cuda(o);
    let shape = gate.shape().to_vec();
    check_tensor(op, "gate", &gate, DType::BF16, &shape, dev)?;
    check_tensor(op, "up", &up, DType::BF16, &shape, dev)?;
    check_tensor(op, "dh", dh, DType::BF16, &shape, dev)?;
    let n = gate.elem_count();
    if n == 0 {
        return Ok((gate, up));
    }
    let cuda = CudaDevice::get(o)?;
    let name = "swiglu_bwd_bf16";
    let f = cuda.function("swiglu", name)?;
    let (n_i, gp, upp) = (n as i64, gate.device_ptr(), up.device_ptr());
    let mut b = cuda.stream().launch_builder(&f);
    b.arg(&gp)
        .arg(&upp)
        .arg(dh.cuda_slice::<half::bf16>(op)?)
        .arg(&gp)
        .arg(&upp)
        .arg(&n_i);
    // SAFETY: swiglu_bwd_bf16(const bf16* ×3, bf16* ×2, long long); all hold n elements; the
    // gradients alias gate and up, which the kernel reads at an index before writing it there
    // (each element is one thread's alone).
    unsafe { cuda.launch(name, b, grid_1d(n, 256)) }?;
    Ok((gate, up))
}
