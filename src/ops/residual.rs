//! Residual add `y = a + b` (`[T, d]`). Backward: `da = dy`, `db = dy`; the residual stream is
//! the one activation gradient that accumulates (`+=`) rather than being written.

use super::{expect_len, Real};
use crate::error::Result;

/// `a + b`, element by element (both `[T, d]`, equal lengths).
pub fn forward<T: Real>(a: &[T], b: &[T]) -> Result<Vec<T>> {
    expect_len("residual add", "second input", b.len(), &[a.len()])?;
    Ok(a.iter().zip(b).map(|(&x, &y)| x + y).collect())
}

/// `acc += dy` (the residual stream's gradient accumulates).
pub fn accumulate<T: Real>(acc: &mut [T], dy: &[T]) -> Result<()> {
    expect_len("residual add backward", "gradient", dy.len(), &[acc.len()])?;
    for (a, &d) in acc.iter_mut().zip(dy) {
        *a += d;
    }
    Ok(())
}
