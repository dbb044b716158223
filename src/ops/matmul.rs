//! Matrix products for the CPU reference: f32 through our own AVX-512 kernel (`sgemm`) where the
//! CPU has it, else (and f64 always) through `matrixmultiply`. Both take strided operands, so
//! every transpose the forward and backward need is a view, not a copy.
//!
//! The three shapes of a linear layer `Y = X·Wᵀ` (X `[m, k]`, W `[n, k]`, Y `[m, n]`):
//! forward `Y = X·Wᵀ`, input gradient `dX = dY·W` (`[m, n]·[n, k]`), weight-shaped gradient
//! `dW = dYᵀ·X` (`[n, m]·[m, k]`).

use super::Real;

/// A strided read-only view of a matrix.
#[derive(Clone, Copy, Debug)]
pub struct Mat<'a, T> {
    /// The elements; element `(i, j)` is `data[i·row_stride + j·col_stride]`.
    pub data: &'a [T],
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// Elements between the starts of consecutive rows.
    pub row_stride: usize,
    /// Elements between consecutive entries of a row (1 unless transposed).
    pub col_stride: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major `rows × cols` matrix.
    pub fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// A row-major matrix whose rows are `row_stride` apart (e.g. one head of `[T, H, D]`).
    pub fn strided(data: &'a [T], rows: usize, cols: usize, row_stride: usize) -> Self {
        Mat {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// Rows `r0..r1` and columns `c0..c1` of this matrix, as a view (`r0 < r1`, `c0 < c1`).
    pub fn block(self, r0: usize, r1: usize, c0: usize, c1: usize) -> Self {
        assert!(
            r0 < r1 && r1 <= self.rows && c0 < c1 && c1 <= self.cols,
            "gemm: block {r0}..{r1} × {c0}..{c1} of a {}x{} view",
            self.rows,
            self.cols
        );
        Mat {
            data: &self.data[r0 * self.row_stride + c0 * self.col_stride..],
            rows: r1 - r0,
            cols: c1 - c0,
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        }
    }

    /// The transpose, as a view.
    pub fn t(self) -> Self {
        Mat {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    fn check(&self, what: &str) {
        if self.rows == 0 || self.cols == 0 {
            return;
        }
        let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
        assert!(
            last < self.data.len(),
            "gemm: {what} view {}x{} (strides {}, {}) reaches index {last} of {} elements",
            self.rows,
            self.cols,
            self.row_stride,
            self.col_stride,
            self.data.len()
        );
    }
}

/// `C = alpha·A·B + beta·C` with `C` row-major `[A.rows, B.cols]`.
///
/// Shapes are the caller's invariant (the ops check user-facing shapes with `Result`s before they
/// get here); a mismatch here is a bug and panics with the shapes.
///
/// Products of at least [`PARALLEL_MIN`] multiply-adds are split over the CPU's cores
/// ([`cpu_threads`]): into blocks of C's rows, or of its columns when it has more columns than
/// rows (or too few rows). Every element of C is one thread's, computed as a single call would
/// compute it, so the result does not depend on the number of threads.
pub fn gemm<T: Real>(a: Mat<T>, b: Mat<T>, c: &mut [T], alpha: T, beta: T) {
    assert_eq!(c.len(), a.rows * b.cols, "gemm: output buffer size");
    gemm_ldc(a, b, c, b.cols, alpha, beta)
}

/// [`gemm`] into a C whose rows are `ldc ≥ B.cols` elements apart (a block of a larger
/// row-major matrix); the elements between the rows' ends and the next rows are not touched.
pub fn gemm_ldc<T: Real>(a: Mat<T>, b: Mat<T>, c: &mut [T], ldc: usize, alpha: T, beta: T) {
    gemm_sum(&[Product { a, b, alpha }], c, ldc, beta)
}

/// One product `alpha·A·B` of a [`gemm_sum`].
#[derive(Clone, Copy, Debug)]
pub struct Product<'a, T> {
    /// A, `m × k`.
    pub a: Mat<'a, T>,
    /// B, `k × n`.
    pub b: Mat<'a, T>,
    /// The product's factor.
    pub alpha: T,
}

/// `C = Σ alpha_t·A_t·B_t + beta·C` over one or two products of one output shape, C's rows `ldc`
/// apart: the same sums as a [`gemm_ldc`] of the first product followed by one with beta = 1
/// for the second, but where the CPU has our own kernel (f32 on AVX-512) in one pass over C (a
/// layer's base product and its LoRA term).
pub fn gemm_sum<T: Real>(products: &[Product<T>], c: &mut [T], ldc: usize, beta: T) {
    gemm_sum_threads(products, c, ldc, beta, cpu_threads())
}

/// [`gemm_sum`] on at most `threads` threads (1 where the caller already runs in parallel).
pub fn gemm_sum_threads<T: Real>(
    products: &[Product<T>],
    c: &mut [T],
    ldc: usize,
    beta: T,
    threads: usize,
) {
    let (m, n) = check_sum(products);
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        ldc >= n && c.len() >= (m - 1) * ldc + n,
        "gemm: output buffer of {} elements for {m}x{n} rows {ldc} apart",
        c.len()
    );
    // SAFETY: the views were checked to stay within their slices, and `c` holds the m rows of n
    // elements `ldc` apart.
    unsafe { gemm_sum_raw(products, c.as_mut_ptr(), ldc, beta, threads) }
}

/// A fresh row-major `m × n` C = Σ alpha_t·A_t·B_t: [`gemm_sum`] with beta = 0 into a buffer
/// that is not zeroed first (no element of C is read before it is written).
pub fn gemm_new<T: Real>(products: &[Product<T>]) -> Vec<T> {
    let (m, n) = check_sum(products);
    let mut c = Vec::with_capacity(m * n);
    if m > 0 && n > 0 {
        // SAFETY: the views were checked; the buffer has room for the m rows of n elements, and
        // with beta = 0 each element is written before anything reads it (both kernels document
        // that C is not read when beta is 0).
        unsafe { gemm_sum_raw(products, c.as_mut_ptr(), n, T::zero(), cpu_threads()) };
    }
    // SAFETY: every one of the m·n elements was written above.
    unsafe { c.set_len(m * n) };
    c
}

/// `(m, n)` of a sum of products, after checking that they agree and that every view stays
/// within its slice.
fn check_sum<T: Real>(products: &[Product<T>]) -> (usize, usize) {
    assert!(
        (1..=2).contains(&products.len()),
        "gemm: one or two products"
    );
    let (m, n) = (products[0].a.rows, products[0].b.cols);
    for p in products {
        assert!(
            p.a.cols == p.b.rows && p.a.rows == m && p.b.cols == n,
            "gemm: {}x{} · {}x{} into {m}x{n}",
            p.a.rows,
            p.a.cols,
            p.b.rows,
            p.b.cols
        );
        p.a.check("A");
        p.b.check("B");
    }
    (m, n)
}

/// [`gemm_sum_threads`] into C at `c`, rows `ldc` apart.
///
/// # Safety
/// The views must be checked and `c` must hold the `m` rows of `n` elements `ldc` apart (m, n > 0),
/// untouched by other threads; with beta = 0 they may be uninitialized.
unsafe fn gemm_sum_raw<T: Real>(
    products: &[Product<T>],
    c: *mut T,
    ldc: usize,
    beta: T,
    threads: usize,
) {
    // SAFETY: forwarded from the caller.
    if unsafe { T::gemm_own(products, beta, c, ldc, threads) } {
        return;
    }
    for (i, p) in products.iter().enumerate() {
        let beta = if i == 0 { beta } else { T::one() };
        // SAFETY: forwarded from the caller.
        unsafe { split_gemm(p.a, p.b, c, ldc, p.alpha, beta, threads) };
    }
}

/// One product over `matrixmultiply`, split over `threads`.
///
/// # Safety
/// As [`gemm_sum_raw`].
unsafe fn split_gemm<T: Real>(
    a: Mat<T>,
    b: Mat<T>,
    c: *mut T,
    ldc: usize,
    alpha: T,
    beta: T,
    threads: usize,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    // Each part packs its share of the operand it splits and all of the other: split the larger
    // side of C, so the operand packed whole by every part is the smaller one.
    let by_rows = m >= 2 * MIN_ROWS && (m >= n || n < 2 * MIN_COLS);
    let parts = if threads < 2 || m * n * k < PARALLEL_MIN {
        1
    } else if by_rows {
        threads.min(m / MIN_ROWS)
    } else {
        threads.min(n / MIN_COLS).max(1)
    };
    let c_ptr = SyncPtr(c);
    let one = |p: usize| {
        let (len, at) = if by_rows { (m, p) } else { (n, p) };
        let (start, end) = (at * len / parts, (at + 1) * len / parts);
        // SAFETY: the views were checked to stay within their slices and `c` holds the m rows of
        // n elements `ldc` apart; part p owns rows (or columns) start..end of C, disjoint from
        // the others.
        unsafe {
            if by_rows {
                T::gemm_raw(
                    end - start,
                    k,
                    n,
                    alpha,
                    a.data.as_ptr().add(start * a.row_stride),
                    a.row_stride as isize,
                    a.col_stride as isize,
                    b.data.as_ptr(),
                    b.row_stride as isize,
                    b.col_stride as isize,
                    beta,
                    c_ptr.get().add(start * ldc),
                    ldc as isize,
                )
            } else {
                T::gemm_raw(
                    m,
                    k,
                    end - start,
                    alpha,
                    a.data.as_ptr(),
                    a.row_stride as isize,
                    a.col_stride as isize,
                    b.data.as_ptr().add(start * b.col_stride),
                    b.row_stride as isize,
                    b.col_stride as isize,
                    beta,
                    c_ptr.get().add(start),
                    ldc as isize,
                )
            }
        }
    };
    in_parts(parts, one);
}

/// Runs `one(p)` for every part `p < parts` (at least part 0): part 0 on this thread, the others
/// as rayon tasks, all joined before returning.
pub(crate) fn in_parts(parts: usize, one: impl Fn(usize) + Sync) {
    if parts <= 1 {
        return one(0);
    }
    let one = &one;
    rayon::scope(|s| {
        for p in 1..parts {
            s.spawn(move |_| one(p));
        }
        one(0);
    });
}

/// Multiply-adds below which a product runs on one thread (splitting costs more than it saves).
pub const PARALLEL_MIN: usize = 1 << 20;
const MIN_ROWS: usize = 32;
const MIN_COLS: usize = 64;

/// Threads the CPU backend splits work over: `QLORA_CPU_THREADS`, else rayon's pool size (the
/// available cores, or `RAYON_NUM_THREADS`).
pub fn cpu_threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        std::env::var("QLORA_CPU_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(rayon::current_num_threads)
    })
}

/// C's base address, shared by the threads that write disjoint parts of it.
#[derive(Clone, Copy)]
struct SyncPtr<T>(*mut T);
// SAFETY: only used by `gemm`, whose threads write disjoint elements and are joined before it
// returns.
unsafe impl<T> Send for SyncPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SyncPtr<T> {}

impl<T> SyncPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

/// `Y = X·Wᵀ`: X `[m, k]`, W `[n, k]` → Y `[m, n]` (overwritten).
pub fn matmul_nt<T: Real>(x: &[T], w: &[T], m: usize, k: usize, n: usize) -> Vec<T> {
    let mut y = vec![T::zero(); m * n];
    gemm(
        Mat::new(x, m, k),
        Mat::new(w, n, k).t(),
        &mut y,
        T::one(),
        T::zero(),
    );
    y
}
