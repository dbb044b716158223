//! Embedding gather: `h[t] = E[ids[t]]` (`E` `[V, d]` frozen, so there is no backward: nothing
//! upstream of the embedding trains), optionally scaled: `h[t] = E[ids[t]] · s` (Gemma's
//! `Gemma2TextScaledWordEmbedding`, `s = √hidden_size`).
//!
//! The scale is applied as transformers applies it, in the table's dtype:
//! ```text
//! f32 table (the CPU):   h = E[id] · s                       one f32 multiply
//! bf16 table (a GPU):    h = bf16(float(E[id]) · float(bf16(s)))
//! ```
//! (`embed_scale.to(weight.dtype)`: at hidden size 3072, √3072 = 55.4256… becomes 55.5; the
//! product of two bf16 values is exact in f32, so it is rounded once.) Without a scale the rows
//! are copied, bit for bit.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{check_tensor, cuda_ordinal, row_block, Real};
use crate::device::cuda::{grid_1d, CudaDevice};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// A scale must be finite (a NaN or infinite one would poison every activation silently).
pub fn check_scale(scale: Option<f64>) -> Result<()> {
    match scale {
        Some(s) if !s.is_finite() => Err(Error::InvalidArgument(format!(
            "embedding: the scale must be finite, got {s}"
        ))),
        _ => Ok(()),
    }
}

/// Rows of `table` (`[vocab, d]`) for each id, times `scale` when given (module docs); an id
/// outside the vocabulary is an error naming its position.
pub fn forward<T: Real>(table: &[T], d: usize, ids: &[u32], scale: Option<T>) -> Result<Vec<T>> {
    check_scale(scale.map(|s| s.to_f64().unwrap_or(f64::NAN)))?;
    let vocab = table.len() / d.max(1);
    let mut h = Vec::with_capacity(ids.len() * d);
    for (pos, &id) in ids.iter().enumerate() {
        let id = id as usize;
        if id >= vocab {
            return Err(Error::InvalidArgument(format!(
                "embedding: token id {id} at position {pos} is outside the vocabulary (size {vocab})"
            )));
        }
        let row = &table[id * d..(id + 1) * d];
        match scale {
            None => h.extend_from_slice(row),
            Some(s) => h.extend(row.iter().map(|&v| v * s)),
        }
    }
    Ok(h)
}

/// The ids as i32, each checked against the vocabulary (the CUDA gather trusts them).
pub fn checked_ids(ids: &[u32], vocab: usize) -> Result<Vec<i32>> {
    ids.iter()
        .enumerate()
        .map(|(pos, &id)| {
            if (id as usize) < vocab {
                Ok(id as i32)
            } else {
                Err(Error::InvalidArgument(format!(
                    "embedding: token id {id} at position {pos} is outside the vocabulary (size {vocab})"
                )))
            }
        })
        .collect()
}

/// CUDA: rows of `table` (bf16 `[V, d]`) for `ids` (checked on the host before the launch),
/// times `scale` when given: `bf16(float(e) · float(bf16(scale)))`, the scale rounded to bf16
/// here (module docs).
pub fn forward_cuda(table: &Tensor, ids: &[u32], scale: Option<f32>) -> Result<Tensor> {
    let op = "embedding (cuda)";
    check_scale(scale.map(f64::from))?;
    let o = cuda_ordinal(op, table)?;
    let dev = Device::Cuda(o);
    let (v, d) = match table.shape() {
        [v, d] => (*v, *d),
        other => {
            return Err(Error::ShapeMismatch {
                op,
                expected: "[V, d]".into(),
                got: format!("{other:?}"),
            })
        }
    };
    check_tensor(op, "table", table, DType::BF16, &[v, d], dev)?;
    let ids = Tensor::from_vec(checked_ids(ids, v)?, &[ids.len()], &dev)?;
    let mut out = Tensor::uninit(&[ids.elem_count(), d], DType::BF16, &dev)?;
    if ids.elem_count() == 0 {
        return Ok(out);
    }
    let cuda = CudaDevice::get(o)?;
    let name = "embedding_fwd_bf16";
    let f = cuda.function("embedding", name)?;
    let d_i = d as i32;
    // transformers multiplies by `embed_scale.to(bf16)`: the scale rounded to nearest-even bf16.
    let (scale_f, scaled) = match scale {
        Some(s) => (half::bf16::from_f32(s).to_f32(), 1i32),
        None => (1.0f32, 0i32),
    };
    let mut b = cuda.stream().launch_builder(f);
    b.arg(table.cuda_slice::<half::bf16>(op)?)
        .arg(ids.cuda_slice::<i32>(op)?)
        .arg(out.cuda_slice_mut::<half::bf16>(op)?)
        .arg(&d_i)
        .arg(&scale_f)
        .arg(&scaled);
    let cfg = LaunchConfig {
        grid_dim: (ids.elem_count() as u32, 1, 1),
        block_dim: (row_block(d), 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: embedding_fwd_bf16(const bf16*, const int*, bf16*, int, float, int); every id < V
    // (checked), table V·d, out T·d; one block per token.
    unsafe { cuda.launch(name, b, cfg) }?;
    Ok(out)
}

/// CUDA: a cast between f32 and bf16 (either direction).
pub fn cast_cuda(x: &Tensor, to: DType) -> Result<Tensor> {
    let op = "cast (cuda)";
    let o = cuda_ordinal(op, x)?;
    let dev = Device::Cuda(o);
    let name = match (x.dtype(), to) {
        (DType::F32, DType::BF16) => "cast_f32_bf16",
        (DType::BF16, DType::F32) => "cast_bf16_f32",
        (from, to) => {
            return Err(Error::DTypeMismatch {
                op,
                expected: "f32 → bf16 or bf16 → f32".into(),
                got: format!("{from} → {to}"),
            })
        }
    };
    let mut y = Tensor::uninit(x.shape(), to, &dev)?;
    let n = x.elem_count();
    if n == 0 {
        return Ok(y);
    }
    let cuda = CudaDevice::get(o)?;
    let f = cuda.function("embedding", name)?;
    let n_i = n as i64;
    let mut b = cuda.stream().launch_builder(f);
    match to {
        DType::BF16 => {
            b.arg(x.cuda_slice::<f32>(op)?)
                .arg(y.cuda_slice_mut::<half::bf16>(op)?);
        }
        _ => {
            b.arg(x.cuda_slice::<half::bf16>(op)?)
                .arg(y.cuda_slice_mut::<f32>(op)?);
        }
    }
    b.arg(&n_i);
    // SAFETY: cast_*(const From*, To*, long long); x and y hold n elements of the named dtypes.
    unsafe { cuda.launch(name, b, grid_1d(n, 256)) }?;
    Ok(y)
}

/// CUDA: `out = a + b` for two bf16 tensors of one shape (residual adds, gradient sums).
pub fn add_cuda(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let op = "add (cuda)";
    let o = cuda_ordinal(op, a)?;
    let dev = Device::Cuda(o);
    let shape = a.shape().to_vec();
    check_tensor(op, "a", a, DType::BF16, &shape, dev)?;
    check_tensor(op, "b", b, DType::BF16, &shape, dev)?;
    let mut out = Tensor::uninit(&shape, DType::BF16, &dev)?;
    let n = a.elem_count();
    if n == 0 {
        return Ok(out);
    }
    let cuda = CudaDevice::get(o)?;
    let name = "add_bf16";
    let f = cuda.function("embedding", name)?;
    let n_i = n as i64;
    let mut bld = cuda.stream().launch_builder(f);
    bld.arg(a.cuda_slice::<half::bf16>(op)?)
        .arg(b.cuda_slice::<half::bf16>(op)?)
        .arg(out.cuda_slice_mut::<half::bf16>(op)?)
        .arg(&n_i);
    // SAFETY: add_bf16(const bf16*, const bf16*, bf16*, long long); all hold n elements.
    unsafe { cuda.launch(name, bld, grid_1d(n, 256)) }?;
    Ok(out)
}

/// CUDA: `acc += b` in place for two bf16 tensors of one shape (gradients that meet, the
/// residual added into a projection's output): the same kernel and rounding as [`add_cuda`],
/// without a third buffer.
pub fn add_assign_cuda(acc: &mut Tensor, b: &Tensor) -> Result<()> {
    let op = "add in place (cuda)";
    let o = cuda_ordinal(op, acc)?;
    let dev = Device::Cuda(o);
    let shape = acc.shape().to_vec();
    check_tensor(op, "acc", acc, DType::BF16, &shape, dev)?;
    check_tensor(op, "b", b, DType::BF16, &shape, dev)?;
    let n = acc.elem_count();
    if n == 0 {
        return Ok(());
    }
    let cuda = CudaDevice::get(o)?;
    let name = "add_bf16";
    let f = cuda.function("embedding", name)?;
    let n_i = n as i64;
    // add_bf16 reads a[i] and b[i] and then writes out[i], one element per thread: `a` and
    // `out` may be the same buffer.
    let a_ptr = acc.device_ptr();
    let mut bld = cuda.stream().launch_builder(f);
    bld.arg(&a_ptr)
        .arg(b.cuda_slice::<half::bf16>(op)?)
        .arg(acc.cuda_slice_mut::<half::bf16>(op)?)
        .arg(&n_i);
    // SAFETY: add_bf16(const bf16*, const bf16*, bf16*, long long); acc and b hold n elements
    // (checked); a and out alias element for element, which the kernel allows (above).
    unsafe { cuda.launch(name, bld, grid_1d(n, 256)) }?;
    Ok(())
}

/// CUDA: `y[t, c] += bias[c]` in place, y bf16 `[.., out]`, bias bf16 `[out]` (rounded once;
/// reference `linear::add_bias`).
pub fn bias_add_cuda(y: &mut Tensor, bias: &Tensor) -> Result<()> {
    let op = "bias add (cuda)";
    let o = cuda_ordinal(op, y)?;
    let dev = Device::Cuda(o);
    let cols = *y.shape().last().unwrap_or(&0);
    check_tensor(op, "y", y, DType::BF16, y.shape(), dev)?;
    check_tensor(op, "bias", bias, DType::BF16, &[cols], dev)?;
    let n = y.elem_count();
    if n == 0 {
        return Ok(());
    }
    let cuda = CudaDevice::get(o)?;
    let name = "bias_add_bf16";
    let f = cuda.function("embedding", name)?;
    let (n_i, cols_i) = (n as i64, cols as i32);
    let mut bld = cuda.stream().launch_builder(f);
    bld.arg(y.cuda_slice_mut::<half::bf16>(op)?)
        .arg(bias.cuda_slice::<half::bf16>(op)?)
        .arg(&n_i)
        .arg(&cols_i);
    // SAFETY: bias_add_bf16(bf16*, const bf16*, long long, int); y holds n elements, a multiple
    // of cols (its last dimension), and bias holds cols.
    unsafe { cuda.launch(name, bld, grid_1d(n, 256)) }?;
    Ok(())
}

/// CUDA: casts f32 `x` into the existing bf16 buffer `y` (same element count).
pub fn cast_into_cuda(x: &Tensor, y: &mut Tensor) -> Result<()> {
    let op = "cast into (cuda)";
    let o = cuda_ordinal(op, x)?;
    let dev = Device::Cuda(o);
    check_tensor(op, "x", x, DType::F32, x.shape(), dev)?;
    check_tensor(op, "y", y, DType::BF16, y.shape(), dev)?;
    let n = x.elem_count();
    if y.elem_count() != n {
        return Err(Error::ShapeMismatch {
            op,
            expected: format!("{n} elements"),
            got: format!("{}", y.elem_count()),
        });
    }
    if n == 0 {
        return Ok(());
    }
    let cuda = CudaDevice::get(o)?;
    let name = "cast_f32_bf16";
    let f = cuda.function("embedding", name)?;
    let n_i = n as i64;
    let mut b = cuda.stream().launch_builder(f);
    b.arg(x.cuda_slice::<f32>(op)?)
        .arg(y.cuda_slice_mut::<half::bf16>(op)?)
        .arg(&n_i);
    // SAFETY: cast_f32_bf16(const float*, bf16*, long long); both hold n elements.
    unsafe { cuda.launch(name, b, grid_1d(n, 256)) }
}
