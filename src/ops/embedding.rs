//! Embedding gather: `h[t] = E[ids[t]]` (`E` `[V, d]` frozen, so there is no backward: nothing
//! upstream of the embedding trains).

use super::Real;
use crate::error::{Error, Result};

/// Rows of `table` (`[vocab, d]`) for each id; an id outside the vocabulary is an error naming
/// its position.
pub fn forward<T: Real>(table: &[T], d: usize, ids: &[u32]) -> Result<Vec<T>> {
    let vocab = table.len() / d.max(1);
    let mut h = Vec::with_capacity(ids.len() * d);
    for (pos, &id) in ids.iter().enumerate() {
        let id = id as usize;
        if id >= vocab {
            return Err(Error::InvalidArgument(format!(
                "embedding: token id {id} at position {pos} is outside the vocabulary (size {vocab})"
            )));
        }
        h.extend_from_slice(&table[id * d..(id + 1) * d]);
    }
    Ok(h)
}
