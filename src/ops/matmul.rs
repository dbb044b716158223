//! Matrix products for the CPU reference, through `matrixmultiply` (strided, so every transpose
//! the forward and backward need is a view, not a copy).
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
pub fn gemm<T: Real>(a: Mat<T>, b: Mat<T>, c: &mut [T], alpha: T, beta: T) {
    assert_eq!(
        a.cols, b.rows,
        "gemm: inner dimensions {}x{} · {}x{}",
        a.rows, a.cols, b.rows, b.cols
    );
    assert_eq!(c.len(), a.rows * b.cols, "gemm: output buffer size");
    a.check("A");
    b.check("B");
    if a.rows == 0 || b.cols == 0 {
        return;
    }
    // SAFETY: the views were checked to stay within their slices and `c` holds m·n elements.
    unsafe {
        T::gemm_raw(
            a.rows,
            a.cols,
            b.cols,
            alpha,
            a.data.as_ptr(),
            a.row_stride as isize,
            a.col_stride as isize,
            b.data.as_ptr(),
            b.row_stride as isize,
            b.col_stride as isize,
            beta,
            c.as_mut_ptr(),
        )
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
