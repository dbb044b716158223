//! The ops of a training step, one module per op family. Each module holds the math in its `//!`
//! docs (the backward derived by hand, shapes on every buffer), the CPU reference (generic over
//! f32/f64 so finite-difference checks run in f64) and, as the kernel issues land, the CUDA
//! launcher it is checked against.
//!
//! Layout conventions: activations are row-major `[T, features]` over the T tokens of a packed
//! micro-batch; per-head tensors are `[T, heads, head_dim]`; `cu_seqlens` (`[B + 1]`, from 0 to
//! T) marks where each packed sequence starts. Gradient rule (llm.c): parameter gradients are
//! accumulated (`+=`); activation gradients are written (`=`).

pub mod attention;
pub mod cross_entropy;
pub mod dropout;
pub mod embedding;
pub mod gemm;
pub mod linear;
pub mod matmul;
pub mod random;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
#[cfg(target_arch = "x86_64")]
pub mod sgemm;
pub mod split;
pub mod swiglu;
pub mod vexp;

use std::mem::MaybeUninit;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{shape_str, DType, Tensor};

/// Floating-point element of the CPU reference: f32 for the model, f64 for gradient checks.
pub trait Real:
    num_traits::Float
    + num_traits::FromPrimitive
    + num_traits::NumAssign
    + std::iter::Sum
    + Default
    + Copy
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
{
    /// `C = alpha·A·B + beta·C` for strided `A` (m×k) and `B` (k×n) and `C` (m×n) with rows
    /// `rsc` apart (columns contiguous); one thread.
    ///
    /// # Safety
    /// Every index `i·rs + j·cs` of `a` and `b` within their shapes must be in bounds, and every
    /// `i·rsc + j` of `c`; no other thread may touch those elements of `c` meanwhile.
    /// [`matmul::gemm`] checks and splits.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: Self,
        a: *const Self,
        rsa: isize,
        csa: isize,
        b: *const Self,
        rsb: isize,
        csb: isize,
        beta: Self,
        c: *mut Self,
        rsc: isize,
    );

    /// The constant `v` in this type, for literals in generic code.
    fn of(v: f64) -> Self {
        Self::from_f64(v).expect("finite constant")
    }

    /// e^x; in f32 the polynomial of [`vexp::exp`] (within 2 ulp), which vectorizes.
    fn fast_exp(self) -> Self {
        self.exp()
    }

    /// `xs[i] ← e^(xs[i] − shift)`, returning their sum (in f32 through [`vexp`]: SIMD, the
    /// sum in a fixed order).
    fn exp_shifted_sum(xs: &mut [Self], shift: Self) -> Self {
        let mut sum = Self::zero();
        for x in xs.iter_mut() {
            *x = (*x - shift).exp();
            sum += *x;
        }
        sum
    }

    /// `xs[i] ← scale · e^(xs[i] − shift)`.
    fn exp_shifted(xs: &mut [Self], shift: Self, scale: Self) {
        for x in xs.iter_mut() {
            *x = scale * (*x - shift).exp();
        }
    }

    /// The sum of products of [`matmul::gemm_sum`] on up to `threads` threads with this type's
    /// own kernel for this CPU (f32 on AVX-512: `ops::sgemm`); `false` where there is none, and
    /// `gemm_sum` splits each product over [`Real::gemm_raw`] itself.
    ///
    /// # Safety
    /// The products' views must be in bounds and C must hold their `m` rows of `n` elements
    /// `ldc` apart, untouched by other threads meanwhile.
    unsafe fn gemm_own(
        _products: &[matmul::Product<Self>],
        _beta: Self,
        _c: *mut Self,
        _ldc: usize,
        _threads: usize,
    ) -> bool {
        false
    }

    /// `h[i] ← g·σ(g)·u` (SwiGLU's forward; see `swiglu`); in f32 the same operations built
    /// for the CPU's widest SIMD ([`vexp::silu_gate`]).
    fn silu_gate(h: &mut [Self], gate: &[Self], up: &[Self]) {
        for ((o, &g), &u) in h.iter_mut().zip(gate).zip(up) {
            *o = g * (Self::one() / (Self::one() + (-g).fast_exp())) * u;
        }
    }

    /// SwiGLU's backward (see `swiglu`); in f32 [`vexp::silu_gate_grad`].
    fn silu_gate_grad(dg: &mut [Self], du: &mut [Self], gate: &[Self], up: &[Self], dh: &[Self]) {
        let one = Self::one();
        let outputs = dg.iter_mut().zip(du.iter_mut());
        for ((og, ou), ((&g, &u), &d)) in outputs.zip(gate.iter().zip(up).zip(dh)) {
            let s = one / (one + (-g).fast_exp());
            *og = d * u * s * (one + g * (one - s));
            *ou = d * g * s;
        }
    }

    /// `xs[i] ← xs[i] · s`.
    fn scale_slice(xs: &mut [Self], s: Self) {
        for x in xs.iter_mut() {
            *x *= s;
        }
    }

    /// The largest element (−inf when empty; NaN elements skipped, as `max` skips them).
    fn max_of(xs: &[Self]) -> Self {
        xs.iter().fold(Self::neg_infinity(), |a, &b| a.max(b))
    }
}

impl Real for f32 {
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f32,
        a: *const f32,
        rsa: isize,
        csa: isize,
        b: *const f32,
        rsb: isize,
        csb: isize,
        beta: f32,
        c: *mut f32,
        rsc: isize,
    ) {
        // SAFETY: forwarded from the caller's contract.
        unsafe { matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, 1) }
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn gemm_own(
        products: &[matmul::Product<f32>],
        beta: f32,
        c: *mut f32,
        ldc: usize,
        threads: usize,
    ) -> bool {
        if !sgemm::available() {
            return false;
        }
        let view = |m: matmul::Mat<f32>| sgemm::Strided {
            ptr: m.data.as_ptr(),
            rs: m.row_stride as isize,
            cs: m.col_stride as isize,
        };
        let terms: Vec<sgemm::Term> = products
            .iter()
            .map(|p| sgemm::Term {
                k: p.a.cols,
                alpha: p.alpha,
                a: view(p.a),
                b: view(p.b),
            })
            .collect();
        let out = sgemm::Out {
            ptr: c,
            rs: ldc as isize,
            cs: 1,
        };
        let (m, n) = (products[0].a.rows, products[0].b.cols);
        // SAFETY: AVX-512F is present; the bounds are the caller's contract.
        unsafe { sgemm::sgemm(m, n, &terms, beta, out, threads) };
        true
    }

    #[inline(always)]
    fn fast_exp(self) -> f32 {
        vexp::exp(self)
    }

    fn exp_shifted_sum(xs: &mut [f32], shift: f32) -> f32 {
        vexp::exp_shifted_sum(xs, shift)
    }

    fn exp_shifted(xs: &mut [f32], shift: f32, scale: f32) {
        vexp::exp_shifted(xs, shift, scale)
    }

    fn scale_slice(xs: &mut [f32], s: f32) {
        vexp::scale(xs, s)
    }

    fn silu_gate(h: &mut [f32], gate: &[f32], up: &[f32]) {
        vexp::silu_gate(h, gate, up)
    }

    fn silu_gate_grad(dg: &mut [f32], du: &mut [f32], gate: &[f32], up: &[f32], dh: &[f32]) {
        vexp::silu_gate_grad(dg, du, gate, up, dh)
    }

    fn max_of(xs: &[f32]) -> f32 {
        vexp::max(xs)
    }
}

impl Real for f64 {
    unsafe fn gemm_raw(
        m: usize,
        k: usize,
        n: usize,
        alpha: f64,
        a: *const f64,
        rsa: isize,
        csa: isize,
        b: *const f64,
        rsb: isize,
        csb: isize,
        beta: f64,
        c: *mut f64,
        rsc: isize,
    ) {
        // SAFETY: forwarded from the caller's contract.
        unsafe { matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, 1) }
    }
}

/// Checks that a buffer holds exactly `shape`'s element count.
pub(crate) fn expect_len(op: &'static str, what: &str, len: usize, shape: &[usize]) -> Result<()> {
    let want: usize = shape.iter().product();
    if len == want {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            op,
            expected: format!("{what} {shape:?} ({want} elements)"),
            got: format!("{len} elements"),
        })
    }
}

/// Checks `cu_seqlens`: starts at 0, strictly increasing, ends at `tokens`.
pub fn check_cu_seqlens(op: &'static str, cu_seqlens: &[usize], tokens: usize) -> Result<()> {
    if cu_seqlens.len() < 2 || cu_seqlens[0] != 0 {
        return Err(Error::InvalidArgument(format!(
            "{op}: cu_seqlens must start at 0 and hold at least one sequence, got {cu_seqlens:?}"
        )));
    }
    if let Some(w) = cu_seqlens.windows(2).position(|w| w[1] <= w[0]) {
        return Err(Error::InvalidArgument(format!(
            "{op}: cu_seqlens must be strictly increasing, but entry {} ({}) follows {}",
            w + 1,
            cu_seqlens[w + 1],
            cu_seqlens[w]
        )));
    }
    let last = *cu_seqlens.last().unwrap();
    if last != tokens {
        return Err(Error::InvalidArgument(format!(
            "{op}: cu_seqlens ends at {last} but there are {tokens} tokens"
        )));
    }
    Ok(())
}

/// Checks one tensor argument of a CUDA launcher: dtype, shape and that it lives on `device`.
pub(crate) fn check_tensor(
    op: &'static str,
    name: &str,
    t: &Tensor,
    dtype: DType,
    shape: &[usize],
    device: Device,
) -> Result<()> {
    if t.dtype() != dtype {
        return Err(Error::DTypeMismatch {
            op,
            expected: format!("{name}: {dtype}"),
            got: t.dtype().to_string(),
        });
    }
    if t.shape() != shape {
        return Err(Error::ShapeMismatch {
            op,
            expected: format!("{name} {}", shape_str(shape)),
            got: shape_str(t.shape()),
        });
    }
    if t.device() != device {
        return Err(Error::DeviceMismatch {
            op,
            a: device.to_string(),
            b: format!("{name} on {}", t.device()),
        });
    }
    Ok(())
}

/// The CUDA ordinal of a launcher's first tensor (an error for a CPU tensor).
pub(crate) fn cuda_ordinal(op: &'static str, t: &Tensor) -> Result<usize> {
    match t.device() {
        Device::Cuda(o) => Ok(o),
        Device::Cpu => Err(Error::InvalidArgument(format!(
            "{op}: the CUDA kernel needs CUDA tensors; this one is on the CPU (use the CPU reference)"
        ))),
    }
}

/// Threads per block for a kernel that walks rows of `d` elements with one block per row.
pub(crate) fn row_block(d: usize) -> u32 {
    (d.div_ceil(32) * 32).clamp(32, 256) as u32
}

/// A null device pointer, for optional kernel arguments.
pub(crate) const NULL_PTR: u64 = 0;

/// Elements per task of the CPU reference's elementwise ops when they run in parallel.
pub(crate) const PAR_CHUNK: usize = 1 << 14;

/// Runs `f(start, chunk)` over `out` cut into pieces of `chunk` elements (the last may be
/// shorter), `start` the index of the piece's first element: in parallel over the CPU's cores
/// ([`matmul::cpu_threads`]) when there is more than one piece, else in order on this thread.
/// `f` must compute each element of a piece from `start` and the element's index alone (as the
/// elementwise ops do), so the result does not depend on the thread count or the split.
pub(crate) fn for_chunks<T: Send>(out: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    use rayon::prelude::*;
    let chunk = chunk.max(1);
    if matmul::cpu_threads() < 2 || out.len() <= chunk {
        for (c, piece) in out.chunks_mut(chunk).enumerate() {
            f(c * chunk, piece);
        }
    } else {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each(|(c, piece)| f(c * chunk, piece));
    }
}

/// [`for_chunks`] over whole rows of `row` elements: `f(first_row, rows)`, about
/// [`PAR_CHUNK`] elements (at least one row) per piece.
pub(crate) fn for_rows<T: Send>(out: &mut [T], row: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let (row, chunk) = row_pieces(row);
    for_chunks(out, chunk, |start, piece| f(start / row, piece));
}

/// `(row, chunk)` for cutting rows of `row` elements into pieces of whole rows: the row length
/// (at least 1) and a piece of about [`PAR_CHUNK`] elements (at least one row).
fn row_pieces(row: usize) -> (usize, usize) {
    let row = row.max(1);
    (row, (PAR_CHUNK / row).max(1) * row)
}

/// [`for_chunks`] over two outputs of one length, cut alike: `f(start, a_piece, b_piece)`.
pub(crate) fn for_chunks2<T: Send>(
    a: &mut [T],
    b: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T], &mut [T]) + Sync,
) {
    use rayon::prelude::*;
    assert_eq!(a.len(), b.len(), "for_chunks2: outputs of one length");
    let chunk = chunk.max(1);
    if matmul::cpu_threads() < 2 || a.len() <= chunk {
        for (c, (pa, pb)) in a.chunks_mut(chunk).zip(b.chunks_mut(chunk)).enumerate() {
            f(c * chunk, pa, pb);
        }
    } else {
        a.par_chunks_mut(chunk)
            .zip(b.par_chunks_mut(chunk))
            .enumerate()
            .for_each(|(c, (pa, pb))| f(c * chunk, pa, pb));
    }
}

/// A buffer of `n` elements not yet written.
pub(crate) fn uninit<T>(n: usize) -> Vec<MaybeUninit<T>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: MaybeUninit needs no initialization.
    unsafe { v.set_len(n) };
    v
}

/// `s` with every element set to zero, as initialized values.
pub(crate) fn zeroed<T: Real>(s: &mut [MaybeUninit<T>]) -> &mut [T] {
    for x in s.iter_mut() {
        x.write(T::zero());
    }
    // SAFETY: every element was written just above; MaybeUninit<T> has T's layout.
    unsafe { &mut *(s as *mut [MaybeUninit<T>] as *mut [T]) }
}

/// The buffer as initialized values.
///
/// # Safety
/// Every element must have been written (through [`zeroed`], piece by piece).
pub(crate) unsafe fn assume_init<T>(v: Vec<MaybeUninit<T>>) -> Vec<T> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: the caller's contract; MaybeUninit<T> has T's layout, and the allocation is
    // handed over whole (pointer, length and capacity).
    unsafe { Vec::from_raw_parts(v.as_mut_ptr() as *mut T, v.len(), v.capacity()) }
}

/// A fresh buffer of `n` elements filled by [`for_chunks`] with `f`: each piece is zeroed by the
/// task that fills it, just before `f` runs, so the zeros are written in that core's cache and
/// not by a pass of their own over the whole buffer (as `zeros` then `for_chunks` would).
pub(crate) fn fresh_chunks<T: Real>(
    n: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    let mut v = uninit(n);
    for_chunks(&mut v, chunk, |start, piece| f(start, zeroed(piece)));
    // SAFETY: for_chunks hands every element to one piece, and each piece was zeroed.
    unsafe { assume_init(v) }
}

/// [`fresh_chunks`] over whole rows of `row` elements, as [`for_rows`] cuts them.
pub(crate) fn fresh_rows<T: Real>(
    n: usize,
    row: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Vec<T> {
    let (row, chunk) = row_pieces(row);
    fresh_chunks(n, chunk, |start, piece| f(start / row, piece))
}

/// [`fresh_chunks`] for two outputs of `n` elements, cut alike ([`for_chunks2`]).
pub(crate) fn fresh_chunks2<T: Real>(
    n: usize,
    chunk: usize,
    f: impl Fn(usize, &mut [T], &mut [T]) + Sync,
) -> (Vec<T>, Vec<T>) {
    let (mut a, mut b) = (uninit(n), uninit(n));
    for_chunks2(&mut a, &mut b, chunk, |start, pa, pb| {
        f(start, zeroed(pa), zeroed(pb))
    });
    // SAFETY: for_chunks2 hands every element of both to one piece, and each was zeroed.
    unsafe { (assume_init(a), assume_init(b)) }
}

/// `vec![T::zero(); n]`, zeroed over the CPU's cores when large (a fresh buffer's zeroing and
/// first touch are otherwise one thread's work between the parallel ops).
pub(crate) fn zeros<T: Real>(n: usize) -> Vec<T> {
    use rayon::prelude::*;
    if matmul::cpu_threads() < 2 || n < 4 * PAR_CHUNK {
        return vec![T::zero(); n];
    }
    let mut v = Vec::with_capacity(n);
    v.spare_capacity_mut()
        .par_chunks_mut(PAR_CHUNK)
        .for_each(|c| {
            for x in c {
                x.write(T::zero());
            }
        });
    // SAFETY: the capacity is at least n and all of its first n elements were written above.
    unsafe { v.set_len(n) };
    v
}
