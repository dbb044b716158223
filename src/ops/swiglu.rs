//! SwiGLU, the gate of Llama's MLP: `h = silu(g) ⊙ u`, all `[T, F]`.
//!
//! With `σ = 1/(1+e^{−g})`, `silu(g) = g·σ` and `silu'(g) = σ·(1 + g·(1 − σ))`:
//! ```text
//! dg = dh ⊙ u ⊙ σ·(1 + g·(1 − σ))
//! du = dh ⊙ g·σ
//! ```

use super::{expect_len, Real};
use crate::error::Result;

fn sigmoid<T: Real>(g: T) -> T {
    T::one() / (T::one() + (-g).exp())
}

/// `h = silu(gate) ⊙ up`.
pub fn forward<T: Real>(gate: &[T], up: &[T]) -> Result<Vec<T>> {
    expect_len("swiglu", "up", up.len(), &[gate.len()])?;
    Ok(gate
        .iter()
        .zip(up)
        .map(|(&g, &u)| g * sigmoid(g) * u)
        .collect())
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
    let mut dg = Vec::with_capacity(gate.len());
    let mut du = Vec::with_capacity(gate.len());
    for ((&g, &u), &d) in gate.iter().zip(up).zip(dh) {
        let s = sigmoid(g);
        dg.push(d * u * s * (T::one() + g * (T::one() - s)));
        du.push(d * g * s);
    }
    Ok((dg, du))
}
