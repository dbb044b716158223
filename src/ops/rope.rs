//! Rotary position embedding (Hugging Face's `rotate_half` layout), with Llama-3 and linear
//! frequency scaling, partial rotary (Phi-3 / Phi-4-mini's `partial_rotary_factor`) and a
//! magnitude on the rotation (longrope's `attention_factor`). Positions restart at 0 for every
//! packed sequence.
//!
//! With `R = freqs.len()` frequencies, only the first `rot = 2R ≤ D` dims of each head (D =
//! head dim) are rotated; dims `rot..D` pass through unchanged (transformers applies
//! `rotate_half` to `q[..., :rot]` and concatenates the rest). For `i < R` the pair
//! `(x_i, x_{i+R})` of each head is rotated by `θ = p · f_i` and scaled by the magnitude `m`:
//! ```text
//! y_i       = x_i · (m cos θ) − x_{i+R} · (m sin θ)
//! y_{i+R}   = x_{i+R} · (m cos θ) + x_i · (m sin θ)
//! y_j       = x_j                                  (rot ≤ j < D: not scaled by m)
//! f_i       = 1 / theta^(2i/rot)                   (f32, as transformers computes it)
//! ```
//! `m cos θ` and `m sin θ` are f32 products (transformers' `cos * attention_scaling`); `m = 1`
//! changes nothing (the products are exact) and full rotary is `rot = D`. The backward is
//! `m` times the rotation by −θ on the rotated dims (the rotation matrix is orthogonal), the
//! identity on the others: `dx_i = dy_i (m cos θ) + dy_{i+R} (m sin θ)`,
//! `dx_{i+R} = dy_{i+R} (m cos θ) − dy_i (m sin θ)`, `dx_j = dy_j`.
//!
//! Llama-3 scaling (`rope_type: "llama3"`), with wavelength `λ_i = 2π / f_i`, old context `L`:
//! `λ_i < L/high` keeps `f_i`; `λ_i > L/low` uses `f_i / factor`; between them
//! `(1 − s)·f_i/factor + s·f_i` with `s = (L/λ_i − low) / (high − low)`. Linear scaling divides
//! every `f_i` by `factor`. Longrope (Phi-3) divides each frequency by its own factor
//! ([`inv_freq_with_factors`]).

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

/// The `dim/2` rotation frequencies of `dim` rotated dims: the head dim, or `rot` with partial
/// rotary (transformers builds the table over `int(head_dim · partial_rotary_factor)`).
pub fn inv_freq(dim: usize, theta: f32, scaling: RopeScaling) -> Vec<f32> {
    let base: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / theta.powf((2 * i) as f32 / dim as f32))
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

/// The `dim/2` frequencies of `dim` rotated dims, each divided by its own factor (longrope's
/// `short_factor` or `long_factor`): `f_i = 1 / (factors[i] · theta^(2i/dim))`, in f32 with the
/// product first, as transformers' `1.0 / (ext_factors * base**(arange(0, dim, 2) / dim))`.
pub fn inv_freq_with_factors(dim: usize, theta: f32, factors: &[f32]) -> Result<Vec<f32>> {
    if dim == 0 || !dim.is_multiple_of(2) {
        return Err(Error::InvalidArgument(format!(
            "rope frequencies with factors: the rotated dims ({dim}) must be even and non-zero"
        )));
    }
    if factors.len() != dim / 2 {
        return Err(Error::InvalidArgument(format!(
            "rope frequencies with factors: {} factors for {dim} rotated dims, which need {}",
            factors.len(),
            dim / 2
        )));
    }
    if let Some(i) = factors.iter().position(|f| !(f.is_finite() && *f > 0.0)) {
        return Err(Error::InvalidArgument(format!(
            "rope frequencies with factors: factor {i} is {}, not a positive number",
            factors[i]
        )));
    }
    Ok(factors
        .iter()
        .enumerate()
        .map(|(i, &e)| 1.0 / (e * theta.powf((2 * i) as f32 / dim as f32)))
        .collect())
}

/// Checks the rotary part of a head: `pairs` frequencies rotate `2·pairs` of the `head_dim`
/// dims (at least one pair, at most all of the head), with a finite magnitude.
fn check_rotary(op: &str, head_dim: usize, pairs: usize, mag: f32) -> Result<()> {
    if pairs == 0 || 2 * pairs > head_dim {
        return Err(Error::InvalidArgument(format!(
            "{op}: {pairs} frequencies rotate {} dims of each head; that must be at least 2 and \
             at most head_dim {head_dim}",
            2 * pairs
        )));
    }
    if !mag.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "{op}: the magnitude (attention factor) {mag} is not finite"
        )));
    }
    Ok(())
}

fn rotate<T: Real>(
    x: &mut [T],
    positions: &[u32],
    heads: usize,
    head_dim: usize,
    freqs: &[f32],
    mag: f32,
    direction: f64,
) -> Result<()> {
    check_rotary("rope", head_dim, freqs.len(), mag)?;
    expect_len(
        "rope",
        "q or k [T, heads, head_dim]",
        x.len(),
        &[positions.len(), heads, head_dim],
    )?;
    let half = freqs.len();
    if heads * head_dim == 0 {
        return Ok(());
    }
    let m = T::of(mag as f64);
    let angles = Angles::of(positions, freqs);
    // Tokens in parallel, each rotated as one thread rotates it.
    for_rows(x, heads * head_dim, |t0, xs| {
        let mut cos = vec![T::zero(); half];
        let mut sin = vec![T::zero(); half];
        for (j, row) in xs.chunks_mut(heads * head_dim).enumerate() {
            let at = (t0 + j) * half;
            for i in 0..half {
                // × m is exact for m = 1: the plain rotation's values, bit for bit.
                cos[i] = T::of(angles.cos[at + i]) * m;
                sin[i] = T::of(direction * angles.sin[at + i]) * m;
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

/// `cos θ` and `sin θ` in f64 of every (token, frequency) of one batch, `θ = p · f_i` rounded to
/// f32 first. They are the same for every layer and for the forward, the replay and the backward
/// of a step, so each thread keeps the tables of the last few (positions, frequencies) it rotated
/// (a model whose layers alternate two frequency sets, as Gemma 3's local and global layers do,
/// keeps both) and computes a table only for a new batch.
struct Angles {
    positions: Vec<u32>,
    freqs: Vec<f32>,
    /// `[T, freqs]`
    cos: Vec<f64>,
    /// `[T, freqs]`
    sin: Vec<f64>,
}

/// Tables each thread keeps ([`Angles`]), the least recently used replaced first.
const ANGLE_TABLES: usize = 4;

impl Angles {
    fn of(positions: &[u32], freqs: &[f32]) -> std::sync::Arc<Angles> {
        use std::cell::RefCell;
        use std::sync::Arc;
        thread_local! {
            // Most recently used last.
            static KEPT: RefCell<Vec<Arc<Angles>>> = const { RefCell::new(Vec::new()) };
        }
        KEPT.with(|cell| {
            let mut kept = cell.borrow_mut();
            let hit = kept
                .iter()
                .position(|a| a.positions == positions && a.freqs == freqs);
            let a = match hit {
                Some(i) => kept.remove(i),
                None => {
                    let n = positions.len() * freqs.len();
                    let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
                    for &p in positions {
                        for &f in freqs {
                            let angle = (p as f32 * f) as f64;
                            cos.push(angle.cos());
                            sin.push(angle.sin());
                        }
                    }
                    if kept.len() == ANGLE_TABLES {
                        kept.remove(0);
                    }
                    Arc::new(Angles {
                        positions: positions.to_vec(),
                        freqs: freqs.to_vec(),
                        cos,
                        sin,
                    })
                }
            };
            kept.push(Arc::clone(&a));
            a
        })
    }
}

/// Rotates the first `2·freqs.len()` dims of each head of `x` (`[T, heads, head_dim]`) in place
/// for token positions `positions` (`[T]`), scaled by `mag` (1 for plain RoPE); the other dims
/// are left as they are.
pub fn forward<T: Real>(
    x: &mut [T],
    positions: &[u32],
    heads: usize,
    head_dim: usize,
    freqs: &[f32],
    mag: f32,
) -> Result<()> {
    rotate(x, positions, heads, head_dim, freqs, mag, 1.0)
}

/// The gradient through [`forward`], in place: the rotated dims of `dy` rotated by −θ and
/// scaled by `mag`, the others unchanged.
pub fn backward<T: Real>(
    dy: &mut [T],
    positions: &[u32],
    heads: usize,
    head_dim: usize,
    freqs: &[f32],
    mag: f32,
) -> Result<()> {
    rotate(dy, positions, heads, head_dim, freqs, mag, -1.0)
}

/// Positions `0..len` for every sequence of `cu_seqlens`.
pub fn positions_from_cu_seqlens(cu_seqlens: &[usize]) -> Vec<u32> {
    cu_seqlens
        .windows(2)
        .flat_map(|w| (0..(w[1] - w[0]) as u32).collect::<Vec<_>>())
        .collect()
}

/// CUDA: rotates the first `rot` dims of each head of `x` (bf16 `[T, heads, head_dim]`) in place
/// and scales them by `mag`; `positions` i32 `[T]`, `freqs` f32 `[rot / 2]` (from [`inv_freq`]
/// or [`inv_freq_with_factors`]), `rot ≤ head_dim`; dims `rot..head_dim` are not touched.
/// `backward` rotates by −θ (the gradient: `mag` times the inverse rotation).
pub fn apply_cuda(
    x: &mut Tensor,
    positions: &Tensor,
    freqs: &Tensor,
    mag: f32,
    backward: bool,
) -> Result<()> {
    let t = x.shape().first().copied().unwrap_or(0);
    apply_cuda_rows(x, positions, freqs, mag, backward, 0..t)
}

/// [`apply_cuda`] on the tokens `rows` of `x` only (the others untouched): a packed batch whose
/// sequences use different tables (longrope's short and long factors) is rotated a run of
/// sequences at a time.
pub fn apply_cuda_rows(
    x: &mut Tensor,
    positions: &Tensor,
    freqs: &Tensor,
    mag: f32,
    backward: bool,
    rows: std::ops::Range<usize>,
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
    let half_rot = match freqs.shape() {
        [r] => *r,
        other => {
            return Err(Error::ShapeMismatch {
                op,
                expected: "freqs [rot / 2]".into(),
                got: format!("{other:?}"),
            })
        }
    };
    check_rotary(op, hd, half_rot, mag)?;
    check_tensor(op, "positions", positions, DType::I32, &[t], dev)?;
    check_tensor(op, "freqs", freqs, DType::F32, &[half_rot], dev)?;
    if rows.start > rows.end || rows.end > t {
        return Err(Error::InvalidArgument(format!(
            "{op}: rows {rows:?} of {t} tokens"
        )));
    }
    let (row0, t) = (rows.start, rows.end - rows.start);
    let pairs = t * heads * half_rot;
    if pairs == 0 {
        return Ok(());
    }
    let cuda = CudaDevice::get(o)?;
    let name = "rope_fwd_bf16";
    let f = cuda.function("rope", name)?;
    let (t_i, h_i, d_i, r_i, sign) = (
        t as i32,
        heads as i32,
        hd as i32,
        half_rot as i32,
        if backward { -1.0f32 } else { 1.0 },
    );
    let width = heads * hd;
    let xs = x.cuda_slice_mut::<half::bf16>(op)?;
    let mut xv = xs.slice_mut(row0 * width..(row0 + t) * width);
    let pv = positions.cuda_slice::<i32>(op)?.slice(row0..row0 + t);
    let mut b = cuda.stream().launch_builder(f);
    b.arg(&mut xv)
        .arg(&pv)
        .arg(freqs.cuda_slice::<f32>(op)?)
        .arg(&t_i)
        .arg(&h_i)
        .arg(&d_i)
        .arg(&r_i)
        .arg(&sign)
        .arg(&mag);
    // SAFETY: rope_fwd_bf16(bf16*, const int*, const float*, int, int, int, int, float, float);
    // the views of x and positions hold the rows' T·heads·head_dim and T (checked in range), freqs `half_rot` (2·half_rot ≤ head_dim, checked); one
    // thread per rotated pair, bounds-checked.
    unsafe { cuda.launch(name, b, grid_1d(pairs, 256)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table is computed once per (positions, frequencies) and found again while it is among
    /// the kept ones, also when two frequency sets alternate; its values are the ones computed
    /// on the spot.
    #[test]
    fn angle_tables_are_kept_and_hold_the_angles() {
        let positions: Vec<u32> = (0..37).chain(0..5).collect();
        let local = inv_freq(16, 10_000.0, RopeScaling::None);
        let global = inv_freq(16, 1_000_000.0, RopeScaling::None);
        let a = Angles::of(&positions, &local);
        let b = Angles::of(&positions, &global);
        assert!(std::sync::Arc::ptr_eq(&a, &Angles::of(&positions, &local)));
        assert!(std::sync::Arc::ptr_eq(&b, &Angles::of(&positions, &global)));
        assert!(!std::sync::Arc::ptr_eq(&a, &b));
        for (t, &p) in positions.iter().enumerate() {
            for (i, &f) in global.iter().enumerate() {
                let angle = (p as f32 * f) as f64;
                assert_eq!(b.cos[t * global.len() + i], angle.cos());
                assert_eq!(b.sin[t * global.len() + i], angle.sin());
            }
        }
        // Other positions: a table of their own.
        let c = Angles::of(&positions[..10], &local);
        assert!(!std::sync::Arc::ptr_eq(&a, &c));
        assert_eq!(c.cos.len(), 10 * local.len());
    }
}
