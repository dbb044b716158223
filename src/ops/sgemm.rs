//! The CPU backend's f32 GEMM on x86-64 CPUs with AVX-512: `C = alpha·A·B + beta·C` for strided
//! A (m×k) and B (k×n), C (m×n) with rows `rsc` apart and columns `csc` apart.
//!
//! ```text
//! for each K block [p, p+kc)                       kc = ⌈k / ⌈k/576⌉⌉ (depends on k alone)
//!   for each panel of 64 columns of C              B[p.., panel] packed: kc rows of 64 floats
//!     for each tile of 6 rows of C                 A read in place, 6 rows at a time
//!       acc[6][64] = Σ_{κ<kc} A[i, p+κ]·B[p+κ, j]  one FMA chain per element, κ in order
//!       C = alpha·acc + beta·C   (first block; C not read when beta = 0)
//!       C = alpha·acc + C        (later blocks)
//! ```
//! The 6×64 tile holds its sums in 24 of the 32 vector registers; each k step loads 4 vectors of
//! B and broadcasts 6 elements of A for 24 FMAs, so the two FMA ports, not the loads, set the
//! pace. A is not packed: a 6-row tile reads six streams of A in place, which costs nothing where
//! A is row-major and keeps a skinny product (few columns of C, as in attention's P·V) from
//! spending as long on copying A as on multiplying it. B is packed once per K block and panel by
//! the thread that uses it.
//!
//! Threads split the grid of (panel, row tile) pairs, panel-major, into contiguous ranges; a
//! panel cut between two threads is packed by both. Every element of C is one thread's and is
//! computed by the same operations in the same order whatever the split, so the result does not
//! depend on the number of threads. A product of at most 16 columns (a LoRA rank) uses a narrow
//! layout instead: panels of one vector and tiles of 12 rows (13 loads per 12 FMAs). One of 17
//! to 63 columns with more rows than columns runs transposed (`Cᵀ = Bᵀ·Aᵀ`) where its long
//! side fills the 64-wide panels better.
//!
//! Other CPUs, and f64, use `matrixmultiply` (see `matmul`); the two round differently, so
//! results on CPUs with and without AVX-512 can differ in the last bits. (The module exists on
//! x86-64 only.)

use std::arch::x86_64::*;

/// Rows of C per tile of the wide layout.
const MR: usize = 6;
/// Columns of C per panel of the wide layout (4 vectors of 16).
const NR: usize = 64;
/// Rows of C per tile of the narrow layout (products of at most 16 columns: one vector).
const MR_NARROW: usize = 12;
/// The longest K block.
const KC_MAX: usize = 576;

/// Whether this CPU runs [`sgemm`] (AVX-512F, detected once).
pub fn available() -> bool {
    static YES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *YES.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
}

/// A strided matrix operand: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub struct Strided {
    /// Element (0, 0).
    pub ptr: *const f32,
    /// Elements between rows.
    pub rs: isize,
    /// Elements between columns.
    pub cs: isize,
}

/// The output: element `(i, j)` at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub struct Out {
    /// Element (0, 0).
    pub ptr: *mut f32,
    /// Elements between rows.
    pub rs: isize,
    /// Elements between columns.
    pub cs: isize,
}

// SAFETY: the operands are only read, and C's elements are split between threads so that each is
// written by one (see `sgemm`); the pointers are valid for the whole call, which joins its
// threads before returning.
unsafe impl Send for Strided {}
// SAFETY: as above.
unsafe impl Sync for Strided {}
// SAFETY: as above.
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

/// The fraction of a padded tile grid that is real work, for choosing an orientation.
fn fill(m: usize, n: usize) -> f64 {
    (m as f64 / m.next_multiple_of(MR) as f64) * (n as f64 / n.next_multiple_of(NR) as f64)
}

/// One product of a sum: `alpha·A·B` with A `m × k` and B `k × n`.
#[derive(Clone, Copy)]
pub struct Term {
    /// The inner dimension.
    pub k: usize,
    /// The product's factor.
    pub alpha: f32,
    /// A, `m × k`.
    pub a: Strided,
    /// B, `k × n`.
    pub b: Strided,
}

impl Term {
    /// The same product of the transposes: `alpha·Bᵀ·Aᵀ`.
    fn t(self) -> Term {
        Term {
            a: Strided {
                ptr: self.b.ptr,
                rs: self.b.cs,
                cs: self.b.rs,
            },
            b: Strided {
                ptr: self.a.ptr,
                rs: self.a.cs,
                cs: self.a.rs,
            },
            ..self
        }
    }
}

/// `C = Σ alpha_t·A_t·B_t + beta·C` over the `terms` (at most 2), on up to `threads` threads
/// (see the module docs): the terms' K blocks run one after another into the same sums of C,
/// the first applying beta and the others adding, as if each term were its own call with
/// beta = 1 after the first.
///
/// # Safety
/// [`available`] must be true. Every `(i, j)` with `i < m, j < k` of each `a`, `i < k, j < n` of
/// each `b` and `i < m, j < n` of `c` must be in bounds, and no other thread may touch C's
/// elements during the call.
pub unsafe fn sgemm(m: usize, n: usize, terms: &[Term], beta: f32, c: Out, threads: usize) {
    assert!(terms.len() <= 2, "sgemm: at most two terms");
    if m == 0 || n == 0 {
        return;
    }
    let k: usize = terms.iter().map(|t| t.k).sum();
    if k == 0 {
        // SAFETY: forwarded from the caller.
        unsafe { scale_c(m, n, beta, c) };
        return;
    }
    if n > 16 && n < NR && fill(n, m) > fill(m, n) {
        let tt: Vec<Term> = terms.iter().map(|t| t.t()).collect();
        let ct = Out {
            ptr: c.ptr,
            rs: c.cs,
            cs: c.rs,
        };
        // SAFETY: the transposed views address the same elements.
        return unsafe { sgemm(n, m, &tt, beta, ct, threads) };
    }
    let narrow = n <= 16;
    let panels = if narrow { 1 } else { n.div_ceil(NR) };
    let tiles = m.div_ceil(if narrow { MR_NARROW } else { MR });
    let items = panels * tiles;
    let parts = if m * n * k < super::matmul::PARALLEL_MIN {
        1
    } else {
        threads.clamp(1, items)
    };
    let longest = terms.iter().map(|t| block_len(t.k)).max().unwrap_or(0);
    let lines = longest * if narrow { 1 } else { 4 };
    let one = |p: usize| {
        let (start, end) = (p * items / parts, (p + 1) * items / parts);
        if start >= end {
            return;
        }
        PANEL.with(|cell| {
            // A part never runs inside another on one thread (a part calls no GEMM), so the
            // buffer is free here.
            let mut buf = cell.borrow_mut();
            if buf.len() < lines {
                buf.resize(lines, Line([0.0; 16]));
            }
            let packed = buf.as_mut_ptr() as *mut f32;
            let part = if narrow { run_part::<1> } else { run_part::<4> };
            // SAFETY: forwarded from the caller; part p writes the tiles of items start..end
            // only, and the buffer holds the longest K block's panel.
            unsafe { part(m, n, terms, beta, c, start, end, packed) }
        })
    };
    super::matmul::in_parts(parts, one);
}

/// `C = beta·C` (a product with k = 0; C is not read when beta = 0).
unsafe fn scale_c(m: usize, n: usize, beta: f32, c: Out) {
    for i in 0..m {
        for j in 0..n {
            // SAFETY: in bounds by the caller's contract.
            unsafe {
                let p = c.ptr.offset(i as isize * c.rs + j as isize * c.cs);
                *p = if beta == 0.0 { 0.0 } else { beta * *p };
            }
        }
    }
}

/// 16 floats, 64-byte aligned: the unit of a packed panel.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([f32; 16]);

thread_local! {
    // This thread's packed panel: grown to the longest K block once, then reused.
    static PANEL: std::cell::RefCell<Vec<Line>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The length of each K block of a term with inner dimension `k` (balanced, ≤ [`KC_MAX`]).
fn block_len(k: usize) -> usize {
    k.div_ceil(k.div_ceil(KC_MAX).max(1))
}

/// The tiles of grid items `start..end` (item `q·tiles + t` is row tile t of panel q), with
/// panels of `V` vectors (4: the wide layout, 6-row tiles; 1: the narrow one, 12-row tiles),
/// B packed into `packed` (room for the longest K block's panel).
#[allow(clippy::too_many_arguments)]
unsafe fn run_part<const V: usize>(
    m: usize,
    n: usize,
    terms: &[Term],
    beta: f32,
    c: Out,
    start: usize,
    end: usize,
    packed: *mut f32,
) {
    let (mr, nr) = if V == 4 { (MR, NR) } else { (MR_NARROW, 16) };
    let tiles = m.div_ceil(mr);
    let mut first = true;
    for term in terms {
        let (a, b, k) = (term.a, term.b, term.k);
        let kc_len = block_len(k);
        let mut p0 = 0;
        while p0 < k {
            let kc = kc_len.min(k - p0);
            let mut item = start;
            while item < end {
                let q = item / tiles;
                let t_end = end.min((q + 1) * tiles) - q * tiles;
                let j0 = q * nr;
                let cols = nr.min(n - j0);
                // SAFETY: rows p0..p0+kc and columns j0..j0+cols of B are in bounds; the buffer
                // holds kc_len·16·V floats.
                unsafe {
                    pack_b::<V>(
                        kc,
                        cols,
                        b.ptr.offset(p0 as isize * b.rs + j0 as isize * b.cs),
                        b.rs,
                        b.cs,
                        packed,
                    )
                };
                for t in item - q * tiles..t_end {
                    let i0 = t * mr;
                    let rows = mr.min(m - i0);
                    // SAFETY: in bounds by the caller's contract.
                    let (at, ct) = unsafe {
                        (
                            Strided {
                                ptr: a.ptr.offset(i0 as isize * a.rs + p0 as isize * a.cs),
                                ..a
                            },
                            Out {
                                ptr: c.ptr.offset(i0 as isize * c.rs + j0 as isize * c.cs),
                                ..c
                            },
                        )
                    };
                    let e = Epilogue {
                        alpha: term.alpha,
                        beta,
                        first,
                        cols,
                    };
                    // SAFETY: the tile's rows and columns are in bounds (rows ≤ mr, cols ≤ nr).
                    unsafe { tile_rows::<V>(rows, kc, at, packed, ct, e) };
                }
                item = q * tiles + t_end;
            }
            p0 += kc;
            first = false;
        }
    }
}

/// [`tile`] for a tile of `rows` rows (at most 6 for `V` = 4, 12 for `V` = 1).
unsafe fn tile_rows<const V: usize>(
    rows: usize,
    kc: usize,
    a: Strided,
    b: *const f32,
    c: Out,
    e: Epilogue,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        if V == 4 {
            match rows {
                6 => tile::<6, 4>(kc, a, b, c, e),
                5 => tile::<5, 4>(kc, a, b, c, e),
                4 => tile::<4, 4>(kc, a, b, c, e),
                3 => tile::<3, 4>(kc, a, b, c, e),
                2 => tile::<2, 4>(kc, a, b, c, e),
                _ => tile::<1, 4>(kc, a, b, c, e),
            }
        } else {
            match rows {
                12 => tile::<12, 1>(kc, a, b, c, e),
                11 => tile::<11, 1>(kc, a, b, c, e),
                10 => tile::<10, 1>(kc, a, b, c, e),
                9 => tile::<9, 1>(kc, a, b, c, e),
                8 => tile::<8, 1>(kc, a, b, c, e),
                7 => tile::<7, 1>(kc, a, b, c, e),
                6 => tile::<6, 1>(kc, a, b, c, e),
                5 => tile::<5, 1>(kc, a, b, c, e),
                4 => tile::<4, 1>(kc, a, b, c, e),
                3 => tile::<3, 1>(kc, a, b, c, e),
                2 => tile::<2, 1>(kc, a, b, c, e),
                _ => tile::<1, 1>(kc, a, b, c, e),
            }
        }
    }
}

/// Packs `kc` rows and `cols ≤ w` columns of B (element `(κ, j)` at `b + κ·rs + j·cs`) into
/// `out[κ·w + j]`, zero past `cols`, for panels `w = 16·V` wide.
#[target_feature(enable = "avx512f")]
unsafe fn pack_b<const V: usize>(
    kc: usize,
    cols: usize,
    b: *const f32,
    rs: isize,
    cs: isize,
    out: *mut f32,
) {
    let w = 16 * V;
    // SAFETY (whole body): the caller's bounds; `out` holds kc·64 floats, 64-byte aligned.
    unsafe {
        if cs == 1 {
            let masks = lane_masks(cols);
            for kk in 0..kc {
                let src = b.offset(kk as isize * rs);
                let dst = out.add(kk * w);
                for (h, &mk) in masks.iter().enumerate().take(V) {
                    _mm512_store_ps(dst.add(16 * h), _mm512_maskz_loadu_ps(mk, src.add(16 * h)));
                }
            }
            return;
        }
        if cols < w {
            std::ptr::write_bytes(out, 0, kc * w);
        }
        if rs == 1 {
            // Each column of B is a contiguous run of kc floats (B = Wᵀ of a row-major W).
            // Transpose 16 × 16 blocks: 16 columns' runs in, 16 rows of the panel out.
            let mut j = 0;
            while j + 16 <= cols {
                let mut kk = 0;
                while kk + 16 <= kc {
                    let mut r = [_mm512_setzero_ps(); 16];
                    for (x, v) in r.iter_mut().enumerate() {
                        *v = _mm512_loadu_ps(b.offset((j + x) as isize * cs + kk as isize));
                    }
                    let t = transpose16(r);
                    for (y, v) in t.iter().enumerate() {
                        _mm512_store_ps(out.add((kk + y) * w + j), *v);
                    }
                    kk += 16;
                }
                for kk in kk..kc {
                    for x in 0..16 {
                        *out.add(kk * w + j + x) = *b.offset((j + x) as isize * cs + kk as isize);
                    }
                }
                j += 16;
            }
            for j in j..cols {
                let src = b.offset(j as isize * cs);
                for kk in 0..kc {
                    *out.add(kk * w + j) = *src.add(kk);
                }
            }
            return;
        }
        for j in 0..cols {
            for kk in 0..kc {
                *out.add(kk * w + j) = *b.offset(kk as isize * rs + j as isize * cs);
            }
        }
    }
}

/// The masks of the 4 vectors of a 64-wide row whose first `cols` lanes are real.
fn lane_masks(cols: usize) -> [u16; 4] {
    let mut m = [0u16; 4];
    for (h, v) in m.iter_mut().enumerate() {
        let live = cols.saturating_sub(16 * h).min(16);
        *v = if live == 16 {
            u16::MAX
        } else {
            (1u16 << live) - 1
        };
    }
    m
}

/// The transpose of a 16 × 16 block held as 16 row vectors: row y of the result holds element y
/// of every input row.
#[target_feature(enable = "avx512f")]
fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // 1: interleave the 32-bit elements of row pairs (0,1), (2,3), …
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (x, y) = (r[i & !1], r[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(x, y)
        } else {
            _mm512_unpackhi_ps(x, y)
        }
    });
    // 2: interleave 64-bit pairs: within each group of 4, (t0, t2) and (t1, t3).
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let g = i & !3;
        let (x, y) = (t[g + (i & 3) / 2], t[g + 2 + (i & 3) / 2]);
        if i % 2 == 0 {
            _mm512_shuffle_ps::<0x44>(x, y)
        } else {
            _mm512_shuffle_ps::<0xEE>(x, y)
        }
    });
    // 3: even and odd 128-bit lanes of groups 4 apart.
    let v: [__m512; 16] = std::array::from_fn(|i| {
        let g = (i / 8) * 8;
        let (x, y) = (u[g + (i & 3)], u[g + 4 + (i & 3)]);
        if i & 4 == 0 {
            _mm512_shuffle_f32x4::<0x88>(x, y)
        } else {
            _mm512_shuffle_f32x4::<0xDD>(x, y)
        }
    });
    // 4: the same across the two halves.
    std::array::from_fn(|i| {
        let (x, y) = (v[i & 7], v[8 + (i & 7)]);
        if i < 8 {
            _mm512_shuffle_f32x4::<0x88>(x, y)
        } else {
            _mm512_shuffle_f32x4::<0xDD>(x, y)
        }
    })
}

/// How a tile's sums meet C.
#[derive(Clone, Copy)]
struct Epilogue {
    alpha: f32,
    beta: f32,
    /// The first K block: C is scaled by beta (not read when beta = 0); later blocks add.
    first: bool,
    cols: usize,
}

/// One tile of `R` rows and up to `16·V` columns over one K block (see the module docs).
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize, const V: usize>(
    kc: usize,
    a: Strided,
    b: *const f32,
    c: Out,
    e: Epilogue,
) {
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    // SAFETY (whole body): the caller's bounds; `b` holds kc·64 floats, 64-byte aligned.
    unsafe {
        if c.cs == 1 {
            for i in 0..R {
                let row = c.ptr.offset(i as isize * c.rs) as *const i8;
                for h in 0..V {
                    _mm_prefetch::<_MM_HINT_T0>(row.add(64 * h));
                }
            }
        }
        // Each row of A through its own pointer and one shared offset, so that a k step costs
        // one add for A's addresses (not one per row).
        let rows: [*const f32; R] = std::array::from_fn(|i| a.ptr.offset(i as isize * a.rs));
        let mut off = 0isize;
        let mut bp = b;
        for _ in 0..kc {
            let bv: [__m512; V] = std::array::from_fn(|h| _mm512_load_ps(bp.add(16 * h)));
            for (row, &ap) in acc.iter_mut().zip(&rows) {
                let x = _mm512_set1_ps(*ap.offset(off));
                for (s, &v) in row.iter_mut().zip(&bv) {
                    *s = _mm512_fmadd_ps(x, v, *s);
                }
            }
            off += a.cs;
            bp = bp.add(16 * V);
        }
        let alpha = _mm512_set1_ps(e.alpha);
        let beta = _mm512_set1_ps(e.beta);
        let masks = lane_masks(e.cols);
        if c.cs == 1 {
            for (i, row) in acc.iter().enumerate() {
                let dst = c.ptr.offset(i as isize * c.rs);
                for (h, (&s, &mk)) in row.iter().zip(&masks).enumerate() {
                    if mk == 0 {
                        continue;
                    }
                    let p = dst.add(16 * h);
                    let v = if e.first && e.beta == 0.0 {
                        _mm512_mul_ps(alpha, s)
                    } else if e.first {
                        let old = _mm512_maskz_loadu_ps(mk, p);
                        _mm512_fmadd_ps(alpha, s, _mm512_mul_ps(beta, old))
                    } else {
                        _mm512_fmadd_ps(alpha, s, _mm512_maskz_loadu_ps(mk, p))
                    };
                    _mm512_mask_storeu_ps(p, mk, v);
                }
            }
        } else {
            // A transposed product: C's tile is written element by element, with the same
            // operations as the vector path.
            let mut t = [Line([0.0; 16]); 4];
            for (i, row) in acc.iter().enumerate() {
                for (h, &s) in row.iter().enumerate() {
                    _mm512_store_ps(t[h].0.as_mut_ptr(), s);
                }
                for j in 0..e.cols {
                    let s = t[j / 16].0[j % 16];
                    let p = c.ptr.offset(i as isize * c.rs + j as isize * c.cs);
                    *p = if e.first && e.beta == 0.0 {
                        e.alpha * s
                    } else if e.first {
                        e.alpha.mul_add(s, e.beta * *p)
                    } else {
                        e.alpha.mul_add(s, *p)
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A strided matrix of `rows × cols` in `buf`, row-major or column-major.
    fn view(buf: &[f32], rows: usize, cols: usize, col_major: bool) -> Strided {
        let (rs, cs) = if col_major {
            (1, rows as isize)
        } else {
            (cols as isize, 1)
        };
        assert!(buf.len() >= rows * cols);
        Strided {
            ptr: buf.as_ptr(),
            rs,
            cs,
        }
    }

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn transpose16_transposes() {
        if !available() {
            return;
        }
        let x: Vec<f32> = (0..256).map(|i| i as f32).collect();
        // SAFETY: AVX-512F is available; the loads and stores stay within `x` and `y`.
        let y = unsafe {
            let r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(x.as_ptr().add(16 * i)));
            let t = transpose16(r);
            let mut y = vec![0.0f32; 256];
            for (i, v) in t.iter().enumerate() {
                _mm512_storeu_ps(y.as_mut_ptr().add(16 * i), *v);
            }
            y
        };
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(y[16 * i + j], x[16 * j + i], "element ({i}, {j})");
            }
        }
    }

    /// Against an f64 reference, on sizes that leave partial tiles, panels and K blocks, every
    /// layout of A, B and C, both betas, and 1 or 3 threads (which must agree bit for bit).
    #[test]
    fn matches_f64_reference_on_awkward_shapes() {
        if !available() {
            return;
        }
        let shapes = [
            (1, 1, 1),
            (7, 5, 3),
            (13, 389, 67),
            (6, 64, 64),
            (37, 770, 130),
            (200, 97, 17),
            (5, 33, 300),
            (16, 512, 576),
            (50, 300, 16),
            (130, 64, 5),
            (25, 1200, 13),
        ];
        for (si, &(m, k, n)) in shapes.iter().enumerate() {
            let a = rand(m * k, 1 + si as u64);
            let b = rand(k * n, 100 + si as u64);
            let c0 = rand(m * n, 200 + si as u64);
            for layout in 0..8 {
                let (a_cm, b_cm, c_cm) = (layout & 1 != 0, layout & 2 != 0, layout & 4 != 0);
                for (alpha, beta) in [(1.0f32, 0.0f32), (0.5, 1.0), (-2.0, 0.25)] {
                    let av = view(&a, m, k, a_cm);
                    let bv = view(&b, k, n, b_cm);
                    let mut want = vec![0.0f64; m * n];
                    for i in 0..m {
                        for j in 0..n {
                            let mut s = 0.0f64;
                            for p in 0..k {
                                // SAFETY: within the views.
                                let (x, y) = unsafe {
                                    (
                                        *av.ptr.offset(i as isize * av.rs + p as isize * av.cs),
                                        *bv.ptr.offset(p as isize * bv.rs + j as isize * bv.cs),
                                    )
                                };
                                s += x as f64 * y as f64;
                            }
                            let old = if c_cm { c0[j * m + i] } else { c0[i * n + j] };
                            want[i * n + j] = alpha as f64 * s + beta as f64 * old as f64;
                        }
                    }
                    let mut got = Vec::new();
                    for threads in [1, 3] {
                        let mut c = c0.clone();
                        if beta == 0.0 {
                            c.iter_mut().for_each(|v| *v = f32::NAN);
                        }
                        let (rs, cs) = if c_cm {
                            (1, m as isize)
                        } else {
                            (n as isize, 1)
                        };
                        let out = Out {
                            ptr: c.as_mut_ptr(),
                            rs,
                            cs,
                        };
                        // SAFETY: AVX-512F is available and the views fit their buffers.
                        let term = Term {
                            k,
                            alpha,
                            a: av,
                            b: bv,
                        };
                        unsafe { sgemm(m, n, &[term], beta, out, threads) };
                        let row_major: Vec<f32> = (0..m * n)
                            .map(|e| {
                                let (i, j) = (e / n, e % n);
                                if c_cm {
                                    c[j * m + i]
                                } else {
                                    c[e]
                                }
                            })
                            .collect();
                        got.push(row_major);
                    }
                    assert_eq!(
                        got[0].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        got[1].iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        "{m}x{k}x{n} layout {layout}: 1 and 3 threads differ"
                    );
                    let tol = 1e-5 * (k as f64).sqrt() * (1.0 + alpha.abs() as f64);
                    for (e, (&g, &w)) in got[0].iter().zip(&want).enumerate() {
                        assert!(
                            (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
                            "{m}x{k}x{n} layout {layout} alpha {alpha} beta {beta}: \
                             element {e} is {g}, want {w}"
                        );
                    }
                }
            }
        }
    }

    /// Two terms equal one call for the first and a second with beta = 1, bit for bit (the
    /// fused LoRA term), whatever their inner dimensions.
    #[test]
    fn two_terms_equal_two_calls() {
        if !available() {
            return;
        }
        for &(m, n, k1, k2) in &[
            (37, 130, 700, 16),
            (512, 64, 64, 8),
            (20, 9, 33, 600),
            (300, 40, 50, 16),
        ] {
            let a1 = rand(m * k1, 7);
            let b1 = rand(k1 * n, 8);
            let a2 = rand(m * k2, 9);
            let b2 = rand(k2 * n, 10);
            let c0 = rand(m * n, 11);
            let t1 = Term {
                k: k1,
                alpha: 1.5,
                a: view(&a1, m, k1, false),
                b: view(&b1, k1, n, true),
            };
            let t2 = Term {
                k: k2,
                alpha: 0.25,
                a: view(&a2, m, k2, false),
                b: view(&b2, k2, n, true),
            };
            let (mut fused, mut apart) = (c0.clone(), c0.clone());
            let out = |c: &mut Vec<f32>| Out {
                ptr: c.as_mut_ptr(),
                rs: n as isize,
                cs: 1,
            };
            // SAFETY: AVX-512F is available and the views fit their buffers.
            unsafe {
                sgemm(m, n, &[t1, t2], 0.5, out(&mut fused), 2);
                sgemm(m, n, &[t1], 0.5, out(&mut apart), 2);
                sgemm(m, n, &[t2], 1.0, out(&mut apart), 2);
            }
            assert!(
                fused
                    .iter()
                    .zip(&apart)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{m}x{n} with k {k1} + {k2}"
            );
        }
    }
}
