//! RMSNorm (Llama's `LlamaRMSNorm`, Gemma's `Gemma2RMSNorm`), with a frozen weight.
//!
//! Forward, per row `x` of length d (`[T, d]`), with the effective weight `w̃` ([`Norm`]):
//! ```text
//! r = 1 / sqrt(mean(x²) + eps)          saved: r [T]
//! y = (x · r) ⊙ w̃
//! w̃ = w                                 Norm::plain (Llama, Qwen)
//! w̃ = 1 + w                             Norm::unit_offset (Gemma: the checkpoint stores w̃ − 1)
//! ```
//! Backward (w frozen: no dw). With `g = dy ⊙ w̃` and `x̂ = x · r`:
//! ```text
//! ∂y_i/∂x_j = w̃_i · r · (δ_ij − x̂_i x̂_j / d)
//! dx = r · (g − x̂ · mean(g ⊙ x̂))
//! ```
//! The unit offset is added in f32 (the CPU's `1 + w`; on the GPU `1.0f + float(w)` inside the
//! kernels, never a bf16 `1 + w`), and the product `(x·r)·(1 + w)` is rounded once, as
//! transformers' `Gemma2RMSNorm` computes it (`x.float()` normalised, times `1 + w.float()`, then
//! cast to the input's dtype). With `unit_offset` false every value is today's Llama math, bit for
//! bit.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{
    check_tensor, cuda_ordinal, expect_len, for_chunks, fresh_rows, row_block, Real, NULL_PTR,
    PAR_CHUNK,
};
use crate::device::cuda::CudaDevice;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// How an RMSNorm scales: its `eps` and whether the weight is stored as an offset from one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Norm {
    /// Added to `mean(x²)` under the square root.
    pub eps: f64,
    /// The effective weight is `1 + w` (Gemma) instead of `w` (Llama, Qwen).
    pub unit_offset: bool,
}

impl Norm {
    /// `y = x·r·w` (Llama, Qwen).
    pub fn plain(eps: f64) -> Norm {
        Norm {
            eps,
            unit_offset: false,
        }
    }

    /// `y = x·r·(1 + w)` (Gemma 2 and 3).
    pub fn unit_offset(eps: f64) -> Norm {
        Norm {
            eps,
            unit_offset: true,
        }
    }

    /// The flag as the kernels take it.
    fn flag(self) -> i32 {
        i32::from(self.unit_offset)
    }
}

/// The effective weight `w̃` (`w`, or `1 + w` with a unit offset).
fn effective<T: Real>(w: &[T], norm: Norm) -> std::borrow::Cow<'_, [T]> {
    if norm.unit_offset {
        std::borrow::Cow::Owned(w.iter().map(|&v| T::one() + v).collect())
    } else {
        std::borrow::Cow::Borrowed(w)
    }
}

/// `y = (x·r)⊙w̃` per row; returns `(y [T, d], r [T])`.
pub fn forward<T: Real>(x: &[T], w: &[T], d: usize, norm: Norm) -> Result<(Vec<T>, Vec<T>)> {
    expect_len("rmsnorm", "weight", w.len(), &[d])?;
    let w = &*effective(w, norm);
    if d == 0 || !x.len().is_multiple_of(d) {
        expect_len("rmsnorm", "input [T, d]", x.len(), &[x.len() / d.max(1), d])?;
    }
    let rows = x.len() / d;
    let mut rstd = vec![T::zero(); rows];
    let (eps, dn) = (T::of(norm.eps), T::of(d as f64));
    // Rows in parallel; each row computed as one thread computes it.
    for_chunks(&mut rstd, (PAR_CHUNK / d).max(1), |t0, rs| {
        for (j, r) in rs.iter_mut().enumerate() {
            let t = t0 + j;
            let xr = &x[t * d..(t + 1) * d];
            let ms = xr.iter().map(|&v| v * v).sum::<T>() / dn;
            *r = T::one() / (ms + eps).sqrt();
        }
    });
    let y = fresh_rows(x.len(), d, |t0, ys: &mut [T]| {
        for (j, yr) in ys.chunks_mut(d).enumerate() {
            let t = t0 + j;
            let (xr, r) = (&x[t * d..(t + 1) * d], rstd[t]);
            for ((yo, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
                *yo = (xv * r) * wv;
            }
        }
    });
    Ok((y, rstd))
}

/// `dx = r·(g − x̂·mean(g⊙x̂))`, `g = dy⊙w̃`, `x̂ = x·r` (`norm.eps` is not used: r is saved).
pub fn backward<T: Real>(
    x: &[T],
    w: &[T],
    rstd: &[T],
    dy: &[T],
    d: usize,
    norm: Norm,
) -> Result<Vec<T>> {
    let rows = rstd.len();
    expect_len("rmsnorm backward", "input", x.len(), &[rows, d])?;
    expect_len("rmsnorm backward", "output gradient", dy.len(), &[rows, d])?;
    expect_len("rmsnorm backward", "weight", w.len(), &[d])?;
    let w = &*effective(w, norm);
    let dn = T::of(d as f64);
    let dx = fresh_rows(x.len(), d, |t0, dxs: &mut [T]| {
        for (j, dxr) in dxs.chunks_mut(d).enumerate() {
            let t = t0 + j;
            let (xr, dyr) = (&x[t * d..(t + 1) * d], &dy[t * d..(t + 1) * d]);
            let r = rstd[t];
            let dot = xr
                .iter()
                .zip(dyr)
                .zip(w)
                .map(|((&xv, &g), &wv)| g * wv * xv * r)
                .sum::<T>()
                / dn;
            for (i, dxo) in dxr.iter_mut().enumerate() {
                let xhat = xr[i] * r;
                *dxo = r * (dyr[i] * w[i] - xhat * dot);
            }
        }
    });
    Ok(dx)
}

fn rows_cols(op: &'static str, x: &Tensor) -> Result<(usize, usize)> {
    match x.shape() {
        [t, d] => Ok((*t, *d)),
        other => Err(Error::ShapeMismatch {
            op,
            expected: "[T, d]".into(),
            got: format!("{other:?}"),
        }),
    }
}

fn row_launch(rows: usize, d: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (row_block(d), 1, 1),
        shared_mem_bytes: 0,
    }
}

/// CUDA: `(y, rstd)` for x bf16 `[T, d]`, w bf16 `[d]` (kernel `rmsnorm_fwd_bf16`).
pub fn forward_cuda(x: &Tensor, w: &Tensor, norm: Norm) -> Result<(Tensor, Tensor)> {
    let op = "rmsnorm (cuda)";
    let o = cuda_ordinal(op, x)?;
    let dev = Device::Cuda(o);
    let (t, d) = rows_cols(op, x)?;
    check_tensor(op, "x", x, DType::BF16, &[t, d], dev)?;
    check_tensor(op, "weight", w, DType::BF16, &[d], dev)?;
    let mut y = Tensor::uninit(&[t, d], DType::BF16, &dev)?;
    let mut rstd = Tensor::uninit(&[t], DType::F32, &dev)?;
    if t == 0 {
        return Ok((y, rstd));
    }
    let cuda = CudaDevice::get(o)?;
    let name = "rmsnorm_fwd_bf16";
    let f = cuda.function("rmsnorm", name)?;
    let (d_i, eps_f, offset) = (d as i32, norm.eps as f32, norm.flag());
    let mut b = cuda.stream().launch_builder(f);
    b.arg(x.cuda_slice::<half::bf16>(op)?)
        .arg(w.cuda_slice::<half::bf16>(op)?)
        .arg(y.cuda_slice_mut::<half::bf16>(op)?)
        .arg(rstd.cuda_slice_mut::<f32>(op)?)
        .arg(&d_i)
        .arg(&eps_f)
        .arg(&offset);
    // SAFETY: rmsnorm_fwd_bf16(const bf16*, const bf16*, bf16*, float*, int, float, int); x and y
    // hold T·d, w d, rstd T (checked above); one block per row.
    unsafe { cuda.launch(name, b, row_launch(t, d)) }?;
    Ok((y, rstd))
}

/// CUDA: the residual add fused before the norm: `(h = a + b, y = rmsnorm(h), rstd)`.
pub fn forward_residual_cuda(
    a: &Tensor,
    b_in: &Tensor,
    w: &Tensor,
    norm: Norm,
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "rmsnorm+residual (cuda)";
    let o = cuda_ordinal(op, a)?;
    let dev = Device::Cuda(o);
    let (t, d) = rows_cols(op, a)?;
    check_tensor(op, "a", a, DType::BF16, &[t, d], dev)?;
    check_tensor(op, "b", b_in, DType::BF16, &[t, d], dev)?;
    check_tensor(op, "weight", w, DType::BF16, &[d], dev)?;
    let mut h = Tensor::uninit(&[t, d], DType::BF16, &dev)?;
    let mut y = Tensor::uninit(&[t, d], DType::BF16, &dev)?;
    let mut rstd = Tensor::uninit(&[t], DType::F32, &dev)?;
    if t == 0 {
        return Ok((h, y, rstd));
    }
    let cuda = CudaDevice::get(o)?;
    let name = "rmsnorm_residual_fwd_bf16";
    let f = cuda.function("rmsnorm", name)?;
    let (d_i, eps_f, offset) = (d as i32, norm.eps as f32, norm.flag());
    let mut b = cuda.stream().launch_builder(f);
    b.arg(a.cuda_slice::<half::bf16>(op)?)
        .arg(b_in.cuda_slice::<half::bf16>(op)?)
        .arg(h.cuda_slice_mut::<half::bf16>(op)?)
        .arg(w.cuda_slice::<half::bf16>(op)?)
        .arg(y.cuda_slice_mut::<half::bf16>(op)?)
        .arg(rstd.cuda_slice_mut::<f32>(op)?)
        .arg(&d_i)
        .arg(&eps_f)
        .arg(&offset);
    // SAFETY: rmsnorm_residual_fwd_bf16(const bf16*, const bf16*, bf16*, const bf16*, bf16*,
    // float*, int, float, int); a, b, h, y hold T·d, w d, rstd T (checked above).
    unsafe { cuda.launch(name, b, row_launch(t, d)) }?;
    Ok((h, y, rstd))
}

/// CUDA: `dx` (plus `dres`, the residual stream's gradient, when given); `norm.eps` is not used
/// (r is saved).
pub fn backward_cuda(
    x: &Tensor,
    w: &Tensor,
    rstd: &Tensor,
    dy: &Tensor,
    dres: Option<&Tensor>,
    norm: Norm,
) -> Result<Tensor> {
    let op = "rmsnorm backward (cuda)";
    let o = cuda_ordinal(op, x)?;
    let dev = Device::Cuda(o);
    let (t, d) = rows_cols(op, x)?;
    check_tensor(op, "x", x, DType::BF16, &[t, d], dev)?;
    check_tensor(op, "weight", w, DType::BF16, &[d], dev)?;
    check_tensor(op, "rstd", rstd, DType::F32, &[t], dev)?;
    check_tensor(op, "dy", dy, DType::BF16, &[t, d], dev)?;
    if let Some(r) = dres {
        check_tensor(op, "dres", r, DType::BF16, &[t, d], dev)?;
    }
    let mut dx = Tensor::uninit(&[t, d], DType::BF16, &dev)?;
    if t == 0 {
        return Ok(dx);
    }
    let cuda = CudaDevice::get(o)?;
    let name = "rmsnorm_bwd_bf16";
    let f = cuda.function("rmsnorm", name)?;
    let (d_i, offset) = (d as i32, norm.flag());
    let mut b = cuda.stream().launch_builder(f);
    b.arg(x.cuda_slice::<half::bf16>(op)?)
        .arg(w.cuda_slice::<half::bf16>(op)?)
        .arg(rstd.cuda_slice::<f32>(op)?)
        .arg(dy.cuda_slice::<half::bf16>(op)?);
    match dres {
        Some(r) => b.arg(r.cuda_slice::<half::bf16>(op)?),
        None => b.arg(&NULL_PTR),
    };
    b.arg(dx.cuda_slice_mut::<half::bf16>(op)?)
        .arg(&d_i)
        .arg(&offset);
    // SAFETY: rmsnorm_bwd_bf16(const bf16*, const bf16*, const float*, const bf16*, const
    // bf16* (nullable), bf16*, int, int); every [T, d] buffer checked above, rstd T, w d.
    unsafe { cuda.launch(name, b, row_launch(t, d)) }?;
    Ok(dx)
}
