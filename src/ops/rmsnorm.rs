//! RMSNorm (Llama's `LlamaRMSNorm`), with a frozen weight.
//!
//! Forward, per row `x` of length d (`[T, d]`):
//! ```text
//! r = 1 / sqrt(mean(x²) + eps)          saved: r [T]
//! y = (x · r) ⊙ w
//! ```
//! Backward (w frozen: no dw). With `g = dy ⊙ w` and `x̂ = x · r`:
//! ```text
//! ∂y_i/∂x_j = w_i · r · (δ_ij − x̂_i x̂_j / d)
//! dx = r · (g − x̂ · mean(g ⊙ x̂))
//! ```

use super::{expect_len, Real};
use crate::error::Result;

/// `y = (x·r)⊙w` per row; returns `(y [T, d], r [T])`.
pub fn forward<T: Real>(x: &[T], w: &[T], d: usize, eps: f64) -> Result<(Vec<T>, Vec<T>)> {
    expect_len("rmsnorm", "weight", w.len(), &[d])?;
    if d == 0 || x.len() % d != 0 {
        expect_len("rmsnorm", "input [T, d]", x.len(), &[x.len() / d.max(1), d])?;
    }
    let rows = x.len() / d;
    let mut y = vec![T::zero(); x.len()];
    let mut rstd = vec![T::zero(); rows];
    let (eps, dn) = (T::of(eps), T::of(d as f64));
    for t in 0..rows {
        let xr = &x[t * d..(t + 1) * d];
        let ms = xr.iter().map(|&v| v * v).sum::<T>() / dn;
        let r = T::one() / (ms + eps).sqrt();
        rstd[t] = r;
        for ((yo, &xv), &wv) in y[t * d..(t + 1) * d].iter_mut().zip(xr).zip(w) {
            *yo = (xv * r) * wv;
        }
    }
    Ok((y, rstd))
}

/// `dx = r·(g − x̂·mean(g⊙x̂))`, `g = dy⊙w`, `x̂ = x·r`.
pub fn backward<T: Real>(x: &[T], w: &[T], rstd: &[T], dy: &[T], d: usize) -> Result<Vec<T>> {
    let rows = rstd.len();
    expect_len("rmsnorm backward", "input", x.len(), &[rows, d])?;
    expect_len("rmsnorm backward", "output gradient", dy.len(), &[rows, d])?;
    expect_len("rmsnorm backward", "weight", w.len(), &[d])?;
    let mut dx = vec![T::zero(); x.len()];
    let dn = T::of(d as f64);
    for t in 0..rows {
        let (xr, dyr) = (&x[t * d..(t + 1) * d], &dy[t * d..(t + 1) * d]);
        let r = rstd[t];
        let dot = xr
            .iter()
            .zip(dyr)
            .zip(w)
            .map(|((&xv, &g), &wv)| g * wv * xv * r)
            .sum::<T>()
            / dn;
        for (i, dxo) in dx[t * d..(t + 1) * d].iter_mut().enumerate() {
            let xhat = xr[i] * r;
            *dxo = r * (dyr[i] * w[i] - xhat * dot);
        }
    }
    Ok(dx)
}
