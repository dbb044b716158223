//! Column split of an activation and its backward, the column concat: Phi-3's fused projections
//! (`qkv_proj`'s output `[T, q + k + v]` into q, k and v; `gate_up_proj`'s `[T, 2F]` into gate
//! and up).
//!
//! For `x` `[T, W]` and widths `w_0, …, w_{n−1}` with `Σ w_k = W`, part `k` starts at column
//! `o_k = Σ_{l<k} w_l`:
//! ```text
//! split:   x_k[t, j] = x[t, o_k + j]            x_k [T, w_k], j < w_k
//! concat:  y[t, o_k + j] = x_k[t, j]            y [T, W]
//! ```
//! Each is the other's inverse and its backward: the gradient of a split is the concat of the
//! parts' gradients (a part whose gradient is missing, because nothing used it, contributes
//! zeros), and the gradient of a concat is the split of its gradient. Both only move values, so
//! both devices are exact: f32 on the CPU, bf16 on a GPU (the tape's activations), copied bit
//! for bit by one strided-copy kernel, 16 bytes per thread when every width is a multiple of 8.

use cudarc::driver::PushKernelArg;

use super::{expect_len, Real};
use crate::device::cuda::{grid_1d, CudaDevice};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// Checks `widths` (at least one, each at least 1) against a total `width` (when known); returns
/// each part's first column.
fn offsets(op: &'static str, widths: &[usize], width: Option<usize>) -> Result<Vec<usize>> {
    if widths.is_empty() || widths.contains(&0) {
        return Err(Error::InvalidArgument(format!(
            "{op}: the widths of the parts must be at least one, each at least 1; got {widths:?}"
        )));
    }
    let sum: usize = widths.iter().sum();
    if let Some(w) = width {
        if sum != w {
            return Err(Error::ShapeMismatch {
                op,
                expected: format!("parts of widths {widths:?} (sum {sum}) of [T, {sum}]"),
                got: format!("[T, {w}]"),
            });
        }
    }
    Ok(widths
        .iter()
        .scan(0, |o, &w| {
            *o += w;
            Some(*o - w)
        })
        .collect())
}

/// The parts of `x` (`[tokens, Σ widths]`): part `k` is `[tokens, widths[k]]`.
pub fn split<T: Real>(x: &[T], tokens: usize, widths: &[usize]) -> Result<Vec<Vec<T>>> {
    let op = "split_cols";
    let width: usize = widths.iter().sum();
    let starts = offsets(op, widths, None)?;
    expect_len(op, "x [T, Σ widths]", x.len(), &[tokens, width])?;
    Ok(widths
        .iter()
        .zip(&starts)
        .map(|(&w, &o)| {
            let mut part = Vec::with_capacity(tokens * w);
            for row in x.chunks_exact(width) {
                part.extend_from_slice(&row[o..o + w]);
            }
            part
        })
        .collect())
}

/// `y` (`[tokens, Σ widths]`) with the parts side by side: the backward of [`split`].
pub fn concat<T: Real>(parts: &[&[T]], tokens: usize, widths: &[usize]) -> Result<Vec<T>> {
    let parts: Vec<Option<&[T]>> = parts.iter().map(|&p| Some(p)).collect();
    concat_or_zeros(&parts, tokens, widths)
}

/// [`concat`] where a missing part (`None`) reads as zeros.
pub fn concat_or_zeros<T: Real>(
    parts: &[Option<&[T]>],
    tokens: usize,
    widths: &[usize],
) -> Result<Vec<T>> {
    let op = "concat_cols";
    let starts = offsets(op, widths, None)?;
    if parts.len() != widths.len() {
        return Err(Error::InvalidArgument(format!(
            "{op}: {} parts for {} widths {widths:?}",
            parts.len(),
            widths.len()
        )));
    }
    let width: usize = widths.iter().sum();
    let mut y = vec![T::zero(); tokens * width];
    for ((part, &w), &o) in parts.iter().zip(widths).zip(&starts) {
        let Some(part) = part else { continue };
        expect_len(op, "a part [T, width]", part.len(), &[tokens, w])?;
        for (row, src) in y.chunks_exact_mut(width).zip(part.chunks_exact(w)) {
            row[o..o + w].copy_from_slice(src);
        }
    }
    Ok(y)
}

/// `[T, W]` of a 2-D tensor.
fn rows_cols(op: &'static str, what: &str, t: &Tensor) -> Result<(usize, usize)> {
    match t.shape() {
        [r, c] => Ok((*r, *c)),
        other => Err(Error::ShapeMismatch {
            op,
            expected: format!("{what} [T, width]"),
            got: format!("{other:?}"),
        }),
    }
}

/// The dtype each device's copies take: f32 on the CPU, bf16 on a GPU (the tape's activations).
fn check_dtype(op: &'static str, what: &str, t: &Tensor) -> Result<()> {
    let want = match t.device() {
        Device::Cpu => DType::F32,
        Device::Cuda(_) => DType::BF16,
    };
    if t.dtype() != want {
        return Err(Error::DTypeMismatch {
            op,
            expected: format!("{what}: {want} on {}", t.device()),
            got: t.dtype().to_string(),
        });
    }
    Ok(())
}

/// The parts of `x` (`[T, Σ widths]`, f32 on the CPU, bf16 on a GPU), each `[T, widths[k]]`, on
/// `x`'s device.
pub fn split_cols(x: &Tensor, widths: &[usize]) -> Result<Vec<Tensor>> {
    let op = "split_cols";
    let (t, width) = rows_cols(op, "x", x)?;
    let starts = offsets(op, widths, Some(width))?;
    check_dtype(op, "x", x)?;
    match x.device() {
        Device::Cpu => split(x.cpu_slice::<f32>(op)?, t, widths)?
            .into_iter()
            .zip(widths)
            .map(|(p, &w)| Tensor::from_vec(p, &[t, w], &Device::Cpu))
            .collect(),
        dev @ Device::Cuda(o) => widths
            .iter()
            .zip(&starts)
            .map(|(&w, &start)| {
                let mut part = Tensor::uninit(&[t, w], DType::BF16, &dev)?;
                copy_cols_cuda(op, o, (x, width, start), (&mut part, w, 0), t, w)?;
                Ok(part)
            })
            .collect(),
    }
}

/// The parts side by side, `[T, Σ widths]` (f32 on the CPU, bf16 on a GPU; every part `[T, w_k]`
/// of one dtype on one device): the backward of [`split_cols`].
pub fn concat_cols(parts: &[&Tensor]) -> Result<Tensor> {
    let op = "concat_cols";
    let widths = parts
        .iter()
        .map(|p| rows_cols(op, "a part", p).map(|(_, w)| w))
        .collect::<Result<Vec<_>>>()?;
    let parts: Vec<Option<&Tensor>> = parts.iter().map(|&p| Some(p)).collect();
    concat_cols_or_zeros(&parts, &widths)
}

/// [`concat_cols`] where a missing part (`None`, of width `widths[k]`) reads as zeros; at least
/// one part must be given (it sets T, the device and the dtype). The gradient of the tape's
/// split.
pub fn concat_cols_or_zeros(parts: &[Option<&Tensor>], widths: &[usize]) -> Result<Tensor> {
    let op = "concat_cols";
    let starts = offsets(op, widths, None)?;
    if parts.len() != widths.len() {
        return Err(Error::InvalidArgument(format!(
            "{op}: {} parts for {} widths {widths:?}",
            parts.len(),
            widths.len()
        )));
    }
    let Some(first) = parts.iter().flatten().next() else {
        return Err(Error::InvalidArgument(format!(
            "{op}: no part given (widths {widths:?}): nothing sets T or the device"
        )));
    };
    let (t, _) = rows_cols(op, "a part", first)?;
    let (device, dtype) = (first.device(), first.dtype());
    for (k, (p, &w)) in parts.iter().zip(widths).enumerate() {
        let Some(p) = p else { continue };
        check_dtype(op, "a part", p)?;
        if p.shape() != [t, w] || p.device() != device {
            return Err(Error::ShapeMismatch {
                op,
                expected: format!("part {k} [{t}, {w}] on {device} (parts of widths {widths:?})"),
                got: format!("{:?} on {}", p.shape(), p.device()),
            });
        }
    }
    let width: usize = widths.iter().sum();
    match device {
        Device::Cpu => {
            let slices = parts
                .iter()
                .map(|p| p.map(|p| p.cpu_slice::<f32>(op)).transpose())
                .collect::<Result<Vec<_>>>()?;
            Tensor::from_vec(concat_or_zeros(&slices, t, widths)?, &[t, width], &device)
        }
        Device::Cuda(o) => {
            // Written whole unless a part is missing.
            let mut y = if parts.iter().all(Option::is_some) {
                Tensor::uninit(&[t, width], dtype, &device)?
            } else {
                Tensor::zeros(&[t, width], dtype, &device)?
            };
            for ((p, &w), &start) in parts.iter().zip(widths).zip(&starts) {
                if let Some(p) = p {
                    copy_cols_cuda(op, o, (p, w, 0), (&mut y, width, start), t, w)?;
                }
            }
            Ok(y)
        }
    }
}

/// CUDA: `dst[r, dst_col + c] = src[r, src_col + c]` for `r < rows`, `c < cols`; `(tensor, row
/// length, first column)` for each side, both bf16 on GPU `o` with `rows` rows and the block
/// inside them (checked by the callers). 8 values (16 bytes) per thread when every length and
/// column is a multiple of 8 and both buffers are 16-byte aligned, else one.
fn copy_cols_cuda(
    op: &'static str,
    o: usize,
    src: (&Tensor, usize, usize),
    dst: (&mut Tensor, usize, usize),
    rows: usize,
    cols: usize,
) -> Result<()> {
    let ((s, s_ld, s_col), (d, d_ld, d_col)) = (src, dst);
    debug_assert!(s_col + cols <= s_ld && d_col + cols <= d_ld);
    debug_assert!(s.elem_count() == rows * s_ld && d.elem_count() == rows * d_ld);
    if rows * cols == 0 {
        return Ok(());
    }
    let vector = [s_ld, s_col, d_ld, d_col, cols].iter().all(|v| v % 8 == 0)
        && s.device_ptr() % 16 == 0
        && d.device_ptr() % 16 == 0;
    let (name, u) = if vector {
        ("split_copy_x8_bf16", 8)
    } else {
        ("split_copy_bf16", 1)
    };
    let cuda = CudaDevice::get(o)?;
    let f = cuda.function("split", name)?;
    let units = |v: usize| (v / u) as i64;
    let (s_ld_u, s_col_u, d_ld_u, d_col_u) = (units(s_ld), units(s_col), units(d_ld), units(d_col));
    let (rows_i, cols_u) = (rows as i64, units(cols));
    let mut b = cuda.stream().launch_builder(f);
    b.arg(s.cuda_slice::<half::bf16>(op)?)
        .arg(&s_ld_u)
        .arg(&s_col_u)
        .arg(d.cuda_slice_mut::<half::bf16>(op)?)
        .arg(&d_ld_u)
        .arg(&d_col_u)
        .arg(&rows_i)
        .arg(&cols_u);
    // SAFETY: split_copy_bf16 / split_copy_x8_bf16(const V*, long long ×2, V*, long long ×4)
    // with V a bf16 or (vector) 16 bytes, every size in units of V (whole units: checked above,
    // with the alignment): src holds rows·s_ld bf16 and dst rows·d_ld, and every column read or
    // written is below s_col + cols ≤ s_ld and d_col + cols ≤ d_ld (the callers' widths and
    // offsets). One thread per unit of the block, bounds-checked; src and dst are different
    // tensors.
    unsafe { cuda.launch(name, b, grid_1d(rows * cols / u, 256)) }
}
