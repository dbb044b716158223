//! Rotary position embedding (Hugging Face's `rotate_half` layout), with Llama-3 and linear
//! frequency scaling. Positions restart at 0 for every packed sequence.
//!
//! For head dimension D and `i < D/2`, the pair `(x_i, x_{i+D/2})` of each head is rotated by
//! `θ = p · f_i`:
//! ```text
//! y_i       = x_i · cos θ − x_{i+D/2} · sin θ
//! y_{i+D/2} = x_{i+D/2} · cos θ + x_i · sin θ
//! f_i       = 1 / theta^(2i/D)                     (f32, as transformers computes it)
//! ```
//! The backward is the rotation by −θ (the rotation matrix is orthogonal):
//! `dx_i = dy_i cos θ + dy_{i+D/2} sin θ`, `dx_{i+D/2} = dy_{i+D/2} cos θ − dy_i sin θ`.
//!
//! Llama-3 scaling (`rope_type: "llama3"`), with wavelength `λ_i = 2π / f_i`, old context `L`:
//! `λ_i < L/high` keeps `f_i`; `λ_i > L/low` uses `f_i / factor`; between them
//! `(1 − s)·f_i/factor + s·f_i` with `s = (L/λ_i − low) / (high − low)`. Linear scaling divides
//! every `f_i` by `factor`.

use cudarc::driver::PushKernelArg;

use super::{check_tensor, cuda_ordinal, expect_len, for_rows, Real};
use crate::device::cuda::{grid_1d, CudaDevice};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// How the frequencies are scaled for long context.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// Unscaled frequencies (`rope_type: "default"`).
    None,
    /// Every frequency divided by `factor` (`rope_type: "linear"`).
    Linear {
        /// Divisor of every frequency.
        factor: f32,
    },
    /// Llama 3's wavelength-dependent scaling (`rope_type: "llama3"`).
    Llama3 {
        /// Divisor of the low frequencies (long wavelengths).
        factor: f32,
        /// Frequencies whose wavelength exceeds `L / low_freq_factor` are divided by `factor`.
        low_freq_factor: f32,
        /// Frequencies whose wavelength is under `L / high_freq_factor` are kept.
        high_freq_factor: f32,
        /// L: the context length, in tokens, the frequencies were designed for.
        original_max_position_embeddings: usize,
    },
}

/// The `D/2` rotation frequencies.
pub fn inv_freq(head_dim: usize, theta: f32, scaling: RopeScaling) -> Vec<f32> {
    let base: Vec<f32> = (0..head_dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / head_dim as f32))
        .collect();
    match scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let old = original_max_position_embeddings as f32;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

fn rotate<T: Real>(
    x: &mut [T],
    positions: &[u32],
    heads: usize,
    head_dim: usize,
    freqs: &[f32],
    direction: f64,
) -> Result<()> {
    if head_dim % 2 != 0 || freqs.len() != head_dim / 2 {
        return Err(Error::InvalidArgument(format!(
            "rope: head_dim {head_dim} must be even with {} frequencies, got {}",
            head_dim / 2,
            freqs.len()
        )));
    }
    expect_len(
        "rope",
        "q or k [T, heads, head_dim]",
        x.len(),
        &[positions.len(), heads, head_dim],
    )?;
    let half = head_dim / 2;
    if heads * head_dim == 0 {
        return Ok(());
    }
    // Tokens in parallel, each rotated as one thread rotates it.
    for_rows(x, heads * head_dim, |t0, xs| {
        let mut cos = vec![T::zero(); half];
        let mut sin = vec![T::zero(); half];
        for (j, row) in xs.chunks_mut(heads * head_dim).enumerate() {
            let p = positions[t0 + j];
            for i in 0..half {
                let angle = (p as f32 * freqs[i]) as f64;
                cos[i] = T::of(angle.cos());
                sin[i] = T::of(direction * angle.sin());
            }
            for v in row.chunks_mut(head_dim) {
                for i in 0..half {
                    let (a, b) = (v[i], v[i + half]);
                    v[i] = a * cos[i] - b * sin[i];
                    v[i + half] = b * cos[i] + a * sin[i];
                }
            }
        }
    });
    Ok(())
}

/// Rotates `x` (`[T, heads, head_dim]`) in place for token positions `positions` (`[T]`).
pub fn forward<T: Real>(
    x: &mut [T],
    positions: &[u32],
    heads: usize,
    head_dim: usize,
    freqs: &[f32],
) -> Result<()> {
    rotate(x, positions, heads, head_dim, freqs, 1.0)
}

/// The gradient through the rotation, in place: rotates `dy` by −θ.
pub fn backward<T: Real>(
    dy: &mut [T],
    positions: &[u32],
    heads: usize,
    head_dim: usize,
    freqs: &[f32],
) -> Result<()> {
    rotate(dy, positions, heads, head_dim, freqs, -1.0)
}

/// Positions `0..len` for every sequence of `cu_seqlens`.
pub fn positions_from_cu_seqlens(cu_seqlens: &[usize]) -> Vec<u32> {
    cu_seqlens
        .windows(2)
        .flat_map(|w| (0..(w[1] - w[0]) as u32).collect::<Vec<_>>())
        .collect()
}

/// CUDA: rotates `x` (bf16 `[T, heads, head_dim]`) in place; `positions` i32 `[T]`, `freqs`
/// f32 `[head_dim / 2]` (from [`inv_freq`]); `backward` rotates by −θ.
pub fn apply_cuda(
    x: &mut Tensor,
    positions: &Tensor,
    freqs: &Tensor,
    backward: bool,
) -> Result<()> {
    let op = "rope (cuda)";
    let o = cuda_ordinal(op, x)?;
    let dev = Device::Cuda(o);
    let (t, heads, hd) = match x.shape() {
        [t, h, d] => (*t, *h, *d),
        other => {
            return Err(Error::ShapeMismatch {
                op,
                expected: "[T, heads, head_dim]".into(),
                got: format!("{other:?}"),
            })
        }
    };
    if hd % 2 != 0 {
        return Err(Error::InvalidArgument(format!(
            "{op}: head_dim {hd} must be even"
        )));
    }
    check_tensor(op, "positions", positions, DType::I32, &[t], dev)?;
    check_tensor(op, "freqs", freqs, DType::F32, &[hd / 2], dev)?;
    let pairs = t * heads * hd / 2;
    if pairs == 0 {
        return Ok(());
    }
    let cuda = CudaDevice::get(o)?;
    let name = "rope_fwd_bf16";
    let f = cuda.function("rope", name)?;
    let (t_i, h_i, d_i, sign) = (
        t as i32,
        heads as i32,
        hd as i32,
        if backward { -1.0f32 } else { 1.0 },
    );
    let mut b = cuda.stream().launch_builder(&f);
    b.arg(x.cuda_slice_mut::<half::bf16>(op)?)
        .arg(positions.cuda_slice::<i32>(op)?)
        .arg(freqs.cuda_slice::<f32>(op)?)
        .arg(&t_i)
        .arg(&h_i)
        .arg(&d_i)
        .arg(&sign);
    // SAFETY: rope_fwd_bf16(bf16*, const int*, const float*, int, int, int, float); x holds
    // T·heads·head_dim, positions T, freqs head_dim/2; one thread per pair, bounds-checked.
    unsafe { cuda.launch(name, b, grid_1d(pairs, 256)) }
}
