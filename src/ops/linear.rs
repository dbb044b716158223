//! A frozen linear layer with an optional bias and a LoRA adapter (PEFT semantics):
//! ```text
//! y  = x·Wᵀ + b + s·(x̃·Aᵀ)·Bᵀ          x [T, in], W [out, in], b [out], A [r, in], B [out, r]
//! x̃  = x ⊙ m                            dropout on the adapter path only (m = 0 or 1/(1−p))
//! xa = x̃·Aᵀ                             [T, r], saved for the backward
//! ```
//! `s` is `alpha/r` (or `alpha/√r` with rsLoRA). W is the dequantized NF4 base on the CPU; the
//! CUDA kernels dequantize inside the GEMM. Backward (W and b frozen, so only x, A and B):
//! ```text
//! g   = dy·B                            [T, r]
//! dx  = dy·W + s·(g·A) ⊙ m              [T, in]
//! dA += s·gᵀ·x̃                          [r, in]
//! dB += s·dyᵀ·xa                        [out, r]
//! ```
//! (Unsloth's `fast_lora.py` derivation, with the dropout mask on the adapter branch.)

use super::matmul::{gemm, gemm_new, Mat, Product};
use super::{expect_len, for_chunks, for_rows, fresh_chunks, Real, PAR_CHUNK};
use crate::error::Result;

/// The adapter of one linear layer.
#[derive(Clone, Copy, Debug)]
pub struct Lora<'a, T> {
    /// `[rank, in]`
    pub a: &'a [T],
    /// `[out, rank]`
    pub b: &'a [T],
    /// LoRA rank r.
    pub rank: usize,
    /// The adapter scale s (`alpha/r`, or `alpha/√r` with rsLoRA).
    pub scale: T,
}

/// What the backward of an adapted layer needs besides x and dy: the adapter, the saved
/// `xa = x̃·Aᵀ`, and the gradient buffers (shaped like A and B) to accumulate into.
#[derive(Debug)]
pub struct LoraGrads<'a, T> {
    /// The adapter the forward used.
    pub lora: Lora<'a, T>,
    /// `[T, r]`: `x̃·Aᵀ` saved by the forward (unscaled).
    pub xa: &'a [T],
    /// `[r, in]`: dA is accumulated here (`+=`).
    pub grad_a: &'a mut [T],
    /// `[out, r]`: dB is accumulated here (`+=`).
    pub grad_b: &'a mut [T],
}

/// Shapes of one linear layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Rows T of x and y.
    pub tokens: usize,
    /// Input width: x is `[T, in]`, W is `[out, in]`.
    pub in_features: usize,
    /// Output width: y is `[T, out]`.
    pub out_features: usize,
}

fn check<T: Real>(
    op: &'static str,
    d: Dims,
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    lora: Option<&Lora<T>>,
    mask: Option<&[T]>,
) -> Result<()> {
    expect_len(op, "input x", x.len(), &[d.tokens, d.in_features])?;
    expect_len(op, "weight W", w.len(), &[d.out_features, d.in_features])?;
    if let Some(b) = bias {
        expect_len(op, "bias", b.len(), &[d.out_features])?;
    }
    if let Some(l) = lora {
        expect_len(op, "lora_A", l.a.len(), &[l.rank, d.in_features])?;
        expect_len(op, "lora_B", l.b.len(), &[d.out_features, l.rank])?;
    }
    if let Some(m) = mask {
        expect_len(op, "dropout mask", m.len(), &[d.tokens, d.in_features])?;
    }
    Ok(())
}

fn masked<'a, T: Real>(x: &'a [T], mask: Option<&[T]>) -> std::borrow::Cow<'a, [T]> {
    match mask {
        Some(m) => {
            let xd = fresh_chunks(x.len(), PAR_CHUNK, |at, out: &mut [T]| {
                for ((o, &a), &b) in out.iter_mut().zip(&x[at..]).zip(&m[at..]) {
                    *o = a * b;
                }
            });
            std::borrow::Cow::Owned(xd)
        }
        None => std::borrow::Cow::Borrowed(x),
    }
}

/// `xa = x̃·Aᵀ` (`[T, r]`) alone: what the backward needs from a forward whose output nothing
/// reads (the replay of a checkpointed layer's last projection). CUDA: `gemm::lora_xa_view`.
pub fn adapter_input<T: Real>(
    d: Dims,
    x: &[T],
    lora: &Lora<T>,
    mask: Option<&[T]>,
) -> Result<Vec<T>> {
    expect_len(
        "linear adapter input",
        "input x",
        x.len(),
        &[d.tokens, d.in_features],
    )?;
    expect_len(
        "linear adapter input",
        "lora_A",
        lora.a.len(),
        &[lora.rank, d.in_features],
    )?;
    let xd = masked(x, mask);
    let mut xa = vec![T::zero(); d.tokens * lora.rank];
    gemm(
        Mat::new(&xd, d.tokens, d.in_features),
        Mat::new(lora.a, lora.rank, d.in_features).t(),
        &mut xa,
        T::one(),
        T::zero(),
    );
    Ok(xa)
}

/// `y[t, c] += bias[c]` for `y` `[T, out]` row-major (`out = bias.len()`). The bias is frozen:
/// the backward passes `dy` through unchanged. CUDA: `embedding::bias_add_cuda`.
pub fn add_bias<T: Real>(y: &mut [T], bias: &[T]) {
    for_rows(y, bias.len(), |_, rows| {
        for row in rows.chunks_mut(bias.len().max(1)) {
            for (v, &b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    });
}

/// Returns `(y [T, out], xa [T, r])` (`xa` empty without an adapter).
pub fn forward<T: Real>(
    d: Dims,
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    lora: Option<&Lora<T>>,
    mask: Option<&[T]>,
) -> Result<(Vec<T>, Vec<T>)> {
    check("linear", d, x, w, bias, lora, mask)?;
    let (t, i, o) = (d.tokens, d.in_features, d.out_features);
    let base = Product {
        a: Mat::new(x, t, i),
        b: Mat::new(w, o, i).t(),
        alpha: T::one(),
    };
    let mut xa = Vec::new();
    let mut y = match lora {
        Some(l) => {
            let xd = masked(x, mask);
            xa = vec![T::zero(); t * l.rank];
            gemm(
                Mat::new(&xd, t, i),
                Mat::new(l.a, l.rank, i).t(),
                &mut xa,
                T::one(),
                T::zero(),
            );
            // y = x·Wᵀ + s·xa·Bᵀ in one pass over y.
            let adapter = Product {
                a: Mat::new(&xa, t, l.rank),
                b: Mat::new(l.b, o, l.rank).t(),
                alpha: l.scale,
            };
            gemm_new(&[base, adapter])
        }
        None => gemm_new(&[base]),
    };
    if let Some(b) = bias {
        add_bias(&mut y, b);
    }
    Ok((y, xa))
}

/// Gradients of one linear layer: `dx` when `need_dx`, and `dA`, `dB` accumulated into the
/// adapter's gradient buffers when there is one.
pub fn backward<T: Real>(
    d: Dims,
    x: &[T],
    w: &[T],
    lora: Option<LoraGrads<'_, T>>,
    mask: Option<&[T]>,
    dy: &[T],
    need_dx: bool,
) -> Result<Option<Vec<T>>> {
    let (t, i, o) = (d.tokens, d.in_features, d.out_features);
    expect_len("linear backward", "output gradient", dy.len(), &[t, o])?;
    check(
        "linear backward",
        d,
        x,
        w,
        None,
        lora.as_ref().map(|g| &g.lora),
        mask,
    )?;
    let base = Product {
        a: Mat::new(dy, t, o),
        b: Mat::new(w, o, i),
        alpha: T::one(),
    };
    let mut dx = None;
    if need_dx && lora.is_none() {
        dx = Some(gemm_new(&[base]));
    }
    if let Some(LoraGrads {
        lora: l,
        xa,
        grad_a,
        grad_b,
    }) = lora
    {
        let r = l.rank;
        expect_len("linear backward", "saved x·Aᵀ", xa.len(), &[t, r])?;
        expect_len("linear backward", "lora_A gradient", grad_a.len(), &[r, i])?;
        expect_len("linear backward", "lora_B gradient", grad_b.len(), &[o, r])?;
        let mut g = vec![T::zero(); t * r];
        gemm(
            Mat::new(dy, t, o),
            Mat::new(l.b, o, r),
            &mut g,
            T::one(),
            T::zero(),
        );
        if need_dx {
            let adapter = Product {
                a: Mat::new(&g, t, r),
                b: Mat::new(l.a, r, i),
                alpha: l.scale,
            };
            dx = Some(match mask {
                // dx = dy·W + s·g·A in one pass over dx.
                None => gemm_new(&[base, adapter]),
                Some(m) => {
                    let mut dx = gemm_new(&[base]);
                    let ga = gemm_new(&[Product {
                        alpha: T::one(),
                        ..adapter
                    }]);
                    let scale = l.scale;
                    for_chunks(&mut dx, PAR_CHUNK, |at, dxs| {
                        for ((dv, &gv), &mv) in dxs.iter_mut().zip(&ga[at..]).zip(&m[at..]) {
                            *dv += scale * gv * mv;
                        }
                    });
                    dx
                }
            });
        }
        let xd = masked(x, mask);
        gemm(
            Mat::new(&g, t, r).t(),
            Mat::new(&xd, t, i),
            grad_a,
            l.scale,
            T::one(),
        );
        gemm(
            Mat::new(dy, t, o).t(),
            Mat::new(xa, t, r),
            grad_b,
            l.scale,
            T::one(),
        );
    }
    Ok(dx)
}
