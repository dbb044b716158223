//! Residual add `y = a + b` (`[T, d]`). Backward: `da = dy`, `db = dy`; the residual stream is
//! the one activation gradient that accumulates (`+=`) rather than being written.

use super::{expect_len, for_chunks, fresh_chunks, Real, PAR_CHUNK};
use crate::error::Result;

/// `a + b`, element by element (both `[T, d]`, equal lengths).
pub fn forward<T: Real>(a: &[T], b: &[T]) -> Result<Vec<T>> {
    expect_len("residual add", "second input", b.len(), &[a.len()])?;
    let y = fresh_chunks(a.len(), PAR_CHUNK, |at, ys: &mut [T]| {
        for ((o, &x), &v) in ys.iter_mut().zip(&a[at..]).zip(&b[at..]) {
            *o = x + v;
        }
    });
    Ok(y)
}

/// `acc += dy` (the residual stream's gradient accumulates).
pub fn accumulate<T: Real>(acc: &mut [T], dy: &[T]) -> Result<()> {
    expect_len("residual add backward", "gradient", dy.len(), &[acc.len()])?;
    for_chunks(acc, PAR_CHUNK, |at, accs| {
        for (a, &d) in accs.iter_mut().zip(&dy[at..]) {
            *a += d;
        }
    });
    Ok(())
}
