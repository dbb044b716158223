//! Fused, chunked lm_head + cross-entropy: the `[T, V]` logits never exist whole.
//!
//! For final hidden states h `[T, d]`, the output embedding W `[V, d]` (the input embedding when
//! tied) and targets `y` `[T]` (−100 = not counted), per chunk of rows:
//! ```text
//! z_t    = h_t · Wᵀ                               [C, V] for the chunk only
//! lse_t  = log Σ_v exp(z_tv)
//! loss   = Σ_{t counted} (lse_t − z_{t,y_t})      returned with the count of counted rows
//! dz_t   = g · (softmax(z_t) − onehot(y_t))       g = d(objective)/d(loss sum); 0 for ignored rows
//! dh_t   = dz_t · W                               W frozen: no dW
//! ```
//! Targets are the labels shifted by one within each packed sequence ([`shift_labels`]): the
//! logits at position t predict token t + 1, and the last position of a sequence predicts
//! nothing — transformers' causal-LM loss, computed per sequence.
//!
//! Final-logit soft-capping (Gemma 2's `final_logit_softcapping` c, `softcap: Some(c)`): the
//! softmax and the loss see the capped logits z' instead of z, and the chain rule brings the
//! derivative of the cap into the gradient:
//! ```text
//! z'_tv  = c · tanh(z_tv / c)                      (−c, c); ≈ z where |z| ≪ c
//! lse_t  = log Σ_v exp(z'_tv)      loss = Σ (lse_t − z'_{t,y_t})
//! dz_t   = g · (softmax(z'_t) − onehot(y_t)) ⊙ (1 − tanh²(z_t / c))   with tanh(z/c) = z'/c
//! ```
//! The logits are capped in f32, as transformers caps the f32 logits (`logits / c`, `tanh`,
//! `· c`). With `softcap: None` every value is the uncapped math, bit for bit.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use rayon::prelude::*;

use super::matmul::{gemm, Mat};
use super::{check_tensor, cuda_ordinal, expect_len, zeros, Real};
use crate::device::cuda::CudaDevice;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// The label value that is not counted.
pub const IGNORE_INDEX: i64 = -100;

/// Rows per chunk on CUDA: the transient logits are `chunk × V` (63 MiB of f32 at V = 128,256,
/// 94 MiB of workspace with the gradient). 128 is the row tile of the tensor-core GEMMs that
/// compute the chunk's logits and `dh`: a smaller chunk leaves most of each tile's rows empty
/// while the whole lm_head weight is still read once per chunk.
pub const DEFAULT_CHUNK: usize = 128;

/// Multiple of the CPU's chunk rows.
const CPU_CHUNK_STEP: usize = 32;

/// Rows per chunk on the CPU: as many as keep the transient logits within 64 MiB, in multiples
/// of 32 (320 rows at V = 49,152, 128 at V = 128,256), 512 at most. Each chunk
/// streams the whole lm_head weight through two GEMMs (the logits and `dh`), which re-pack it:
/// few large chunks pack it few times. Every row's logits, loss and `dh` are computed alike
/// whatever the chunk (one GEMM element and one row at a time), and the losses are summed in row
/// order, so the result does not depend on it.
pub fn cpu_chunk(vocab: usize) -> usize {
    const BYTES: usize = 64 << 20;
    let rows = BYTES / (4 * vocab.max(1));
    (rows / CPU_CHUNK_STEP * CPU_CHUNK_STEP).clamp(CPU_CHUNK_STEP, 512)
}

/// `targets[t] = labels[t + 1]` within each sequence of `cu_seqlens`, −100 at each sequence end.
pub fn shift_labels(labels: &[i64], cu_seqlens: &[usize]) -> Vec<i64> {
    let mut targets = vec![IGNORE_INDEX; labels.len()];
    for w in cu_seqlens.windows(2) {
        let (start, end) = (w[0], w[1]);
        if end > start + 1 {
            targets[start..end - 1].copy_from_slice(&labels[start + 1..end]);
        }
    }
    targets
}

/// Loss sum, counted rows, and (when a gradient scale is given) `dh`.
#[derive(Debug)]
pub struct Output<T> {
    /// Sum of the counted rows' losses, nats (f64 whatever `T` is).
    pub loss_sum: f64,
    /// Rows whose target is not −100.
    pub count: usize,
    /// `[T, d]`: gradient of `g · loss_sum` with respect to h; `None` without a gradient scale.
    pub dh: Option<Vec<T>>,
}

/// Checks every target before any work: in `[0, vocab)` or −100.
pub fn check_targets(targets: &[i64], vocab: usize) -> Result<()> {
    match targets
        .iter()
        .enumerate()
        .find(|(_, &y)| y != IGNORE_INDEX && (y < 0 || y as usize >= vocab))
    {
        Some((pos, &y)) => Err(Error::InvalidArgument(format!(
            "cross-entropy: label {y} at position {pos} is outside the vocabulary (size {vocab}; \
             -100 marks a position that is not counted)"
        ))),
        None => Ok(()),
    }
}

/// `z ← c·tanh(z/c)` for every logit: Gemma 2's final-logit soft-capping, for the logits the
/// generation path computes itself (the fused op caps its own, see the module docs). `c` is the
/// model's `final_logit_softcapping`, positive and finite ([`check_softcap`] says so by name).
pub fn softcap_logits(logits: &mut [f32], c: f32) {
    for z in logits.iter_mut() {
        *z = c * (*z / c).tanh();
    }
}

/// A soft-cap must be positive and finite: `c·tanh(z/c)` is meaningless otherwise.
pub fn check_softcap(softcap: Option<f64>) -> Result<()> {
    match softcap {
        Some(c) if !(c.is_finite() && c > 0.0) => Err(Error::InvalidArgument(format!(
            "cross-entropy: the logit soft-cap must be positive and finite, got {c}"
        ))),
        _ => Ok(()),
    }
}

/// Logits `h·Wᵀ` (`[T, V]`), for evaluation and tests; training uses [`forward_backward`].
pub fn logits<T: Real>(h: &[T], w: &[T], d: usize) -> Vec<T> {
    let (t, v) = (h.len() / d, w.len() / d);
    let mut z = vec![T::zero(); t * v];
    gemm(
        Mat::new(h, t, d),
        Mat::new(w, v, d).t(),
        &mut z,
        T::one(),
        T::zero(),
    );
    z
}

/// The fused op. `grad_scale = Some(g)` also returns `dh` for `g · loss_sum`; `softcap = Some(c)`
/// caps the logits at ±c first (module docs).
pub fn forward_backward<T: Real>(
    h: &[T],
    w: &[T],
    d: usize,
    targets: &[i64],
    grad_scale: Option<T>,
    chunk: usize,
    softcap: Option<T>,
) -> Result<Output<T>> {
    check_softcap(softcap.map(|c| c.to_f64().unwrap_or(f64::NAN)))?;
    let tokens = targets.len();
    expect_len(
        "cross-entropy",
        "hidden states [T, d]",
        h.len(),
        &[tokens, d],
    )?;
    if d == 0 || !w.len().is_multiple_of(d) {
        return Err(Error::ShapeMismatch {
            op: "cross-entropy",
            expected: format!("lm_head weight [V, {d}]"),
            got: format!("{} elements", w.len()),
        });
    }
    let vocab = w.len() / d;
    check_targets(targets, vocab)?;
    let chunk = chunk.max(1);
    let mut dh = grad_scale.map(|_| zeros(h.len()));
    let (mut loss_sum, mut count) = (0.0f64, 0usize);
    let mut z = zeros(chunk * vocab);
    for c0 in (0..tokens).step_by(chunk) {
        let rows = chunk.min(tokens - c0);
        let zc = &mut z[..rows * vocab];
        gemm(
            Mat::new(&h[c0 * d..(c0 + rows) * d], rows, d),
            Mat::new(w, vocab, d).t(),
            zc,
            T::one(),
            T::zero(),
        );
        // Rows in parallel; their losses summed in row order (the same sum on any core count).
        let row_losses: Vec<Option<f64>> = zc
            .par_chunks_mut(vocab)
            .enumerate()
            .map(|(r, row)| {
                let y = targets[c0 + r];
                if y == IGNORE_INDEX {
                    row.fill(T::zero());
                    return None;
                }
                if let Some(c) = softcap {
                    for s in row.iter_mut() {
                        *s = c * (*s / c).tanh();
                    }
                }
                let m = T::max_of(row);
                let zy = row[y as usize];
                let Some(c) = softcap else {
                    // The row becomes e^(z − m) in place: the loss needs only Σ and z_y, and
                    // the gradient g·softmax is that row times g/Σ.
                    let sum = T::exp_shifted_sum(row, m);
                    let lse = m + sum.ln();
                    if let Some(g) = grad_scale {
                        T::scale_slice(row, g / sum);
                        row[y as usize] -= g;
                    }
                    return Some((lse - zy).to_f64().unwrap_or(f64::NAN));
                };
                let sum: T = row.iter().map(|&s| (s - m).fast_exp()).sum();
                let lse = m + sum.ln();
                let loss = (lse - zy).to_f64().unwrap_or(f64::NAN);
                // The row holds z' = c·tanh(z/c): tanh(z/c) = z'/c.
                if let Some(g) = grad_scale {
                    for (v, s) in row.iter_mut().enumerate() {
                        let onehot = if v == y as usize { T::one() } else { T::zero() };
                        let t = *s / c;
                        *s = g * ((*s - lse).fast_exp() - onehot) * (T::one() - t * t);
                    }
                }
                Some(loss)
            })
            .collect();
        for l in row_losses.into_iter().flatten() {
            loss_sum += l;
            count += 1;
        }
        if let Some(dh) = dh.as_mut() {
            gemm(
                Mat::new(zc, rows, vocab),
                Mat::new(w, vocab, d),
                &mut dh[c0 * d..(c0 + rows) * d],
                T::one(),
                T::zero(),
            );
        }
    }
    Ok(Output {
        loss_sum,
        count,
        dh,
    })
}

/// CUDA: over one chunk of fp32 logits `[rows, V]`, overwrites them with
/// `grad_scale·(softmax − onehot)` (times `1 − tanh²(z/c)` with `softcap = Some(c)`, the
/// softmax then of the capped logits) and returns each row's loss (f32 `[rows]`, 0 for −100).
/// Targets are checked on the host before the launch.
pub fn chunk_cuda(
    logits: &mut Tensor,
    targets: &[i64],
    grad_scale: f32,
    softcap: Option<f32>,
) -> Result<Tensor> {
    let op = "cross-entropy (cuda)";
    check_softcap(softcap.map(f64::from))?;
    let o = cuda_ordinal(op, logits)?;
    let dev = Device::Cuda(o);
    let (rows, vocab) = match logits.shape() {
        [r, v] => (*r, *v),
        other => {
            return Err(Error::ShapeMismatch {
                op,
                expected: "[rows, V]".into(),
                got: format!("{other:?}"),
            })
        }
    };
    check_tensor(op, "logits", logits, DType::F32, &[rows, vocab], dev)?;
    expect_len(op, "targets", targets.len(), &[rows])?;
    check_targets(targets, vocab)?;
    let t: Vec<i32> = targets
        .iter()
        .map(|&y| if y == IGNORE_INDEX { -1 } else { y as i32 })
        .collect();
    let t = Tensor::from_vec(t, &[rows], &dev)?;
    let mut loss = Tensor::uninit(&[rows], DType::F32, &dev)?;
    if rows == 0 {
        return Ok(loss);
    }
    let cuda = CudaDevice::get(o)?;
    let name = "ce_fwd_bwd_f32";
    let f = cuda.function("cross_entropy", name)?;
    let (v_i, ld, cap) = (vocab as i32, vocab as i64, kernel_softcap(softcap));
    let mut b = cuda.stream().launch_builder(f);
    b.arg(logits.cuda_slice_mut::<f32>(op)?)
        .arg(t.cuda_slice::<i32>(op)?)
        .arg(loss.cuda_slice_mut::<f32>(op)?)
        .arg(&v_i)
        .arg(&ld)
        .arg(&grad_scale)
        .arg(&super::NULL_PTR)
        .arg(&cap);
    let cfg = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: ce_fwd_bwd_f32(float*, const int*, float*, int, long long, float, bf16* (null),
    // float); logits rows·V, targets and loss rows; every target is −1 or < V (checked); one
    // block per row.
    unsafe { cuda.launch(name, b, cfg) }?;
    Ok(loss)
}

/// The kernels' soft-cap argument: `c`, or 0 for none (they test `softcap > 0`).
fn kernel_softcap(softcap: Option<f32>) -> f32 {
    softcap.unwrap_or(0.0)
}

/// Result of the fused lm_head + cross-entropy on CUDA.
pub struct CudaCeOutput {
    /// Per-token losses (f32 `[T]`, 0 where not counted): summed on the host only when logged.
    pub loss: Tensor,
    /// Tokens counted.
    pub count: usize,
    /// `dh = grad_scale · dlogits · W` (bf16 `[T, d]`); `None` for the loss alone.
    pub dh: Option<Tensor>,
}

/// CUDA: the fused, chunked lm_head + cross-entropy: for each chunk of `chunk` tokens, the fp32
/// logits `h_c·Wᵀ` (GEMM), loss and dlogits in place (one kernel), then `dh_c = dz_c·W` (GEMM).
/// With `grad_scale` `None` (evaluation) only the loss is computed: the logits GEMM and a
/// read-only loss kernel per chunk, no gradient and no `dh` GEMM. Only one chunk of logits exists
/// at a time: `chunk · Vp · 6` bytes of workspace with the gradient, `chunk · Vp · 4` without
/// (Vp: V rounded up to a multiple of 8, the row alignment the GEMM operands need). With
/// `softcap = Some(c)` the CE kernel caps each chunk's logits at ±c first (module docs).
pub fn lm_head_ce_cuda(
    h: &Tensor,
    w: &Tensor,
    targets: &[i64],
    grad_scale: Option<f32>,
    chunk: usize,
    softcap: Option<f32>,
) -> Result<CudaCeOutput> {
    use super::gemm::{gemm_ptrs, Layout};
    let op = "lm_head + cross-entropy (cuda)";
    check_softcap(softcap.map(f64::from))?;
    let o = cuda_ordinal(op, h)?;
    let dev = Device::Cuda(o);
    let (t, d) = match h.shape() {
        [t, d] => (*t, *d),
        other => {
            return Err(Error::ShapeMismatch {
                op,
                expected: "h [T, d]".into(),
                got: format!("{other:?}"),
            })
        }
    };
    let vocab = w.shape().first().copied().unwrap_or(0);
    check_tensor(op, "h", h, DType::BF16, &[t, d], dev)?;
    check_tensor(op, "lm_head weight", w, DType::BF16, &[vocab, d], dev)?;
    expect_len(op, "targets", targets.len(), &[t])?;
    check_targets(targets, vocab)?;
    let count = targets.iter().filter(|&&y| y != IGNORE_INDEX).count();
    let chunk = chunk.clamp(1, t.max(1));
    // Every row of both is written: the loss by the CE kernel, dh by the chunk's dh GEMM.
    let loss = Tensor::uninit(&[t], DType::F32, &dev)?;
    let dh = match grad_scale {
        Some(_) => Some(Tensor::uninit(&[t, d], DType::BF16, &dev)?),
        None => None,
    };
    if t == 0 {
        return Ok(CudaCeOutput { loss, count, dh });
    }
    let t_dev: Vec<i32> = targets
        .iter()
        .map(|&y| if y == IGNORE_INDEX { -1 } else { y as i32 })
        .collect();
    let t_dev = Tensor::from_vec(t_dev, &[t], &dev)?;
    // The chunk's logits have rows padded to a multiple of 8 elements: the tensor-core GEMM needs
    // 16-byte aligned rows. Only the V real columns are written or read (the GEMMs read nothing
    // past their K or N, the CE kernels touch columns < V).
    let vp = vocab.next_multiple_of(8);
    let z = Tensor::uninit(&[chunk, vp], DType::F32, &dev)?;
    let zb = match grad_scale {
        Some(_) => Some(Tensor::uninit(&[chunk, vp], DType::BF16, &dev)?),
        None => None,
    };
    let cuda = CudaDevice::get(o)?;
    let ce_name = if dh.is_some() {
        "ce_fwd_bwd_f32"
    } else {
        "ce_loss_f32"
    };
    let ce = cuda.function("cross_entropy", ce_name)?;
    let (hp, wp, zp) = (h.device_ptr(), w.device_ptr(), z.device_ptr());
    let (tp, lp) = (t_dev.device_ptr(), loss.device_ptr());
    for c0 in (0..t).step_by(chunk) {
        let rows = chunk.min(t - c0);
        // SAFETY: pointer arithmetic stays inside h [T, d] and z [chunk, Vp]; the shapes were
        // checked above; every buffer outlives the stream-ordered launches.
        unsafe {
            gemm_ptrs(
                o,
                Layout::Nt,
                hp + (c0 * d * 2) as u64,
                d,
                wp,
                d,
                zp,
                vp,
                rows,
                vocab,
                d,
                DType::F32,
                1.0,
                0.0,
            )?;
        }
        let (v_i, ld, cap) = (vocab as i32, vp as i64, kernel_softcap(softcap));
        let (tc, lc) = (tp + (c0 * 4) as u64, lp + (c0 * 4) as u64);
        let mut b = cuda.stream().launch_builder(ce);
        b.arg(&zp).arg(&tc).arg(&lc).arg(&v_i).arg(&ld);
        let (scale, zbp) = (
            grad_scale.unwrap_or(0.0),
            zb.as_ref().map(|z| z.device_ptr()),
        );
        if let Some(zbp) = &zbp {
            b.arg(&scale).arg(zbp);
        }
        b.arg(&cap);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: ce_fwd_bwd_f32(float*, const int*, float*, int, long long, float, bf16*,
        // float) or ce_loss_f32(const float*, const int*, float*, int, long long, float), as
        // pushed above, over
        // `rows` rows of the chunk buffers; targets and losses offset to the chunk; targets
        // checked against V.
        unsafe { cuda.launch(ce_name, b, cfg) }?;
        if let (Some(zbp), Some(dh)) = (zbp, &dh) {
            // SAFETY: as above; dz (bf16 [rows, V], row length Vp) · W ([V, d]) into dh rows
            // c0.. (beta 0).
            unsafe {
                gemm_ptrs(
                    o,
                    Layout::Nn,
                    zbp,
                    vp,
                    wp,
                    d,
                    dh.device_ptr() + (c0 * d * 2) as u64,
                    d,
                    rows,
                    d,
                    vocab,
                    DType::BF16,
                    1.0,
                    0.0,
                )?;
            }
        }
    }
    Ok(CudaCeOutput { loss, count, dh })
}
