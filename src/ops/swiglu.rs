//! The gated MLP activations: `h = act(g) ⊙ u`, all `[T, F]`. SwiGLU (Llama, Qwen: `act = silu`)
//! and GeGLU (Gemma 2 and 3: `act = gelu_tanh`, transformers' `gelu_pytorch_tanh`), chosen by
//! [`Act`].
//!
//! SwiGLU. With `σ = 1/(1+e^{−g})`, `silu(g) = g·σ` and `silu'(g) = σ·(1 + g·(1 − σ))`:
//! ```text
//! dg = dh ⊙ u ⊙ σ·(1 + g·(1 − σ))
//! du = dh ⊙ g·σ
//! ```
//! GeGLU. With `k = √(2/π)`, `a = 0.044715`, `s = k·(g + a·g³)` and `t = tanh(s)`:
//! ```text
//! gelu_tanh(g)  = 0.5·g·(1 + t)
//! gelu_tanh'(g) = 0.5·(1 + t) + 0.5·g·(1 − t²)·k·(1 + 3a·g²)
//! dg = dh ⊙ u ⊙ gelu_tanh'(g)
//! du = dh ⊙ gelu_tanh(g)
//! ```
//! (the derivative is exact: `d tanh(s)/dg = (1 − t²)·s'`, `s' = k·(1 + 3a·g²)`). On the GPU
//! `act(g)·u` is computed in f32 from the bf16 inputs and rounded to bf16 once, for SwiGLU as for
//! GeGLU (torch in bf16 rounds `act(g)` to bf16 first, then the product: they differ by at most
//! that one rounding).

use cudarc::driver::PushKernelArg;

use super::{check_tensor, cuda_ordinal, expect_len, fresh_chunks, fresh_chunks2, Real, PAR_CHUNK};
use crate::device::cuda::{grid_1d, CudaDevice};
use crate::device::Device;
use crate::error::Result;
use crate::tensor::{DType, Tensor};

/// The activation of the gate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// `silu(g) = g·σ(g)`: SwiGLU (Llama, Qwen).
    Silu,
    /// `gelu_tanh(g) = 0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³)))`: GeGLU (Gemma 2 and 3).
    GeluTanh,
}

impl Act {
    /// The kernels' names for this activation: (forward, backward).
    fn kernels(self) -> (&'static str, &'static str) {
        match self {
            Act::Silu => ("swiglu_fwd_bf16", "swiglu_bwd_bf16"),
            Act::GeluTanh => ("geglu_fwd_bf16", "geglu_bwd_bf16"),
        }
    }
}

/// `(gelu_tanh(g), gelu_tanh'(g))`, in the order of operations the GeGLU kernels use.
fn gelu_tanh<T: Real>(g: T) -> (T, T) {
    let (k, a) = (T::of(std::f64::consts::FRAC_2_PI.sqrt()), T::of(0.044715));
    let (half, one, three) = (T::of(0.5), T::one(), T::of(3.0));
    let g2 = g * g;
    let t = (k * (g + a * (g2 * g))).tanh();
    let value = half * g * (one + t);
    let slope = half * (one + t) + half * g * (one - t * t) * k * (one + three * a * g2);
    (value, slope)
}

/// `h = act(gate) ⊙ up`.
pub fn forward<T: Real>(gate: &[T], up: &[T], act: Act) -> Result<Vec<T>> {
    expect_len("glu", "up", up.len(), &[gate.len()])?;
    let h = fresh_chunks(gate.len(), PAR_CHUNK, |at, hs: &mut [T]| {
        let n = hs.len();
        match act {
            Act::Silu => T::silu_gate(hs, &gate[at..at + n], &up[at..at + n]),
            Act::GeluTanh => {
                for ((o, &g), &u) in hs.iter_mut().zip(&gate[at..]).zip(&up[at..]) {
                    *o = gelu_tanh(g).0 * u;
                }
            }
        }
    });
    Ok(h)
}

/// `(dgate, dup)`.
pub fn backward<T: Real>(gate: &[T], up: &[T], dh: &[T], act: Act) -> Result<(Vec<T>, Vec<T>)> {
    expect_len("glu backward", "up", up.len(), &[gate.len()])?;
    expect_len("glu backward", "output gradient", dh.len(), &[gate.len()])?;
    let (dg, du) = fresh_chunks2(gate.len(), PAR_CHUNK, |at, dgs: &mut [T], dus: &mut [T]| {
        let n = dgs.len();
        match act {
            Act::Silu => T::silu_gate_grad(
                dgs,
                dus,
                &gate[at..at + n],
                &up[at..at + n],
                &dh[at..at + n],
            ),
            Act::GeluTanh => {
                let inputs = gate[at..].iter().zip(&up[at..]).zip(&dh[at..]);
                let outputs = dgs.iter_mut().zip(dus.iter_mut());
                for ((og, ou), ((&g, &u), &d)) in outputs.zip(inputs) {
                    let (value, slope) = gelu_tanh(g);
                    *og = d * u * slope;
                    *ou = d * value;
                }
            }
        }
    });
    Ok((dg, du))
}

/// CUDA: `h = act(gate) ⊙ up` for bf16 tensors of one shape.
pub fn forward_cuda(gate: &Tensor, up: &Tensor, act: Act) -> Result<Tensor> {
    let op = "glu (cuda)";
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
    let name = act.kernels().0;
    let f = cuda.function("swiglu", name)?;
    let n_i = n as i64;
    let mut b = cuda.stream().launch_builder(f);
    b.arg(gate.cuda_slice::<half::bf16>(op)?)
        .arg(up.cuda_slice::<half::bf16>(op)?)
        .arg(h.cuda_slice_mut::<half::bf16>(op)?)
        .arg(&n_i);
    // SAFETY: swiglu_fwd_bf16 / geglu_fwd_bf16(const bf16*, const bf16*, bf16*, long long); all
    // hold n elements.
    unsafe { cuda.launch(name, b, grid_1d(n, 256)) }?;
    Ok(h)
}

/// CUDA: `(dgate, dup)`, written in place over `gate` and `up` (which the backward no longer
/// needs): the MLP backward's peak holds two `[T, F]` tensors fewer.
pub fn backward_cuda(gate: Tensor, up: Tensor, dh: &Tensor, act: Act) -> Result<(Tensor, Tensor)> {
    let op = "glu backward (cuda)";
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
    let name = act.kernels().1;
    let f = cuda.function("swiglu", name)?;
    let (n_i, gp, upp) = (n as i64, gate.device_ptr(), up.device_ptr());
    let mut b = cuda.stream().launch_builder(f);
    b.arg(&gp)
        .arg(&upp)
        .arg(dh.cuda_slice::<half::bf16>(op)?)
        .arg(&gp)
        .arg(&upp)
        .arg(&n_i);
    // SAFETY: swiglu_bwd_bf16 / geglu_bwd_bf16(const bf16* ×3, bf16* ×2, long long); all hold n
    // elements; the gradients alias gate and up, which the kernel reads at an index before
    // writing it there (each element is one thread's alone).
    unsafe { cuda.launch(name, b, grid_1d(n, 256)) }?;
    Ok((gate, up))
}
