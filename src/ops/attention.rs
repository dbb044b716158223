//! Causal grouped-query attention over packed variable-length sequences, with the options of
//! Gemma 2 / Gemma 3: a score scale other than `1/√D`, tanh soft-capping of the scores, and a
//! sliding window.
//!
//! q `[T, H, D]`, k and v `[T, Hkv, D]`, `cu_seqlens` `[B + 1]`; query head `h` reads key/value
//! head `h / (H / Hkv)` (transformers' `repeat_kv`). Within each sequence (never across
//! sequences), positions counted from the sequence's start, query row i sees key row j iff
//! `j ≤ i` and, with a window w, `i − j < w` (transformers' `sliding_window_overlay`:
//! `kv_idx > q_idx − w`); V(i) is that set. With the scale σ (`Dims::scale`, default `1/√D`) and
//! the soft cap c (`Dims::softcap`, default none):
//! ```text
//! R_ij = σ (q_i · k_j)
//! S_ij = c · tanh(R_ij / c)                    with a soft cap; else S_ij = R_ij
//! lse_i = log Σ_{j∈V(i)} exp(S_ij)             saved: lse [T, H]
//! P_ij = exp(S_ij − lse_i)                      (0 for j ∉ V(i))
//! o_i  = Σ_j P_ij v_j
//! ```
//! Backward (the flash-attention-2 recurrences; P is recomputed from q, k and lse):
//! ```text
//! D_i   = dO_i · o_i
//! dv_j += Σ_i P_ij dO_i                        summed over the H/Hkv query heads sharing j's head
//! dP_ij = dO_i · v_j
//! dS_ij = P_ij (dP_ij − D_i)
//! dR_ij = dS_ij · (1 − tanh²(R_ij / c))        = dS_ij (1 − (S_ij / c)²); dR = dS without a cap
//! dq_i  = σ Σ_j dR_ij k_j
//! dk_j += σ Σ_i dR_ij q_i
//! ```
//! The default scale is taken in the reference's own precision (`1/√D` exactly in f64, so an f64
//! finite-difference check sees the exact default); a scale set with [`Dims::with_scale`] is used
//! as given (an f32). Generation with a KV cache ([`forward_cached`]) counts positions from the
//! sequence's start too, so the window there covers the absolute positions `p − w < j ≤ p`.
//!
//! The CPU reference forms one sequence's `L × L` scores per head at a time (memory is
//! `L²` for the largest sequence, not `T²`), and with a window its products start at each block
//! of rows' first visible column; the CUDA kernels never form the scores, and with a window they
//! visit only the key tiles that a query tile can see, masking only the tiles on the window's or
//! the diagonal's edge.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use std::mem::MaybeUninit;

use rayon::prelude::*;

use super::matmul::{gemm, gemm_sum_threads, Mat, Product};
use super::{
    assume_init, check_cu_seqlens, check_tensor, cuda_ordinal, expect_len, uninit, zeroed, zeros,
    Real,
};
use crate::device::cuda::CudaDevice;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// Head layout and the score options (scale, soft cap, sliding window).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dims {
    /// Query heads H: q and o are `[T, H, D]`.
    pub heads: usize,
    /// Key/value heads Hkv (divides H): k and v are `[T, Hkv, D]`.
    pub kv_heads: usize,
    /// Per-head width D.
    pub head_dim: usize,
    /// The factor σ of the scores `σ (q · k)`: `1/√D` unless set (Gemma 2:
    /// `query_pre_attn_scalar^-½`).
    pub scale: f32,
    /// Soft cap c of the scores, `c · tanh(S / c)` (Gemma 2's `attn_logit_softcapping`); none
    /// when `None`.
    pub softcap: Option<f32>,
    /// Sliding window w: query i sees keys `i − w < j ≤ i`; all earlier keys when `None`.
    pub window: Option<usize>,
}

impl Dims {
    /// `heads` query heads over `kv_heads` key/value heads of width `head_dim`, with the scale
    /// `1/√head_dim`, no soft cap and no window (Llama, Qwen).
    pub fn new(heads: usize, kv_heads: usize, head_dim: usize) -> Dims {
        Dims {
            heads,
            kv_heads,
            head_dim,
            scale: default_scale(head_dim),
            softcap: None,
            window: None,
        }
    }

    /// The same with the score factor `scale` (finite, > 0).
    pub fn with_scale(self, scale: f32) -> Dims {
        Dims { scale, ..self }
    }

    /// The same with the soft cap `softcap` (finite, > 0), or none.
    pub fn with_softcap(self, softcap: Option<f32>) -> Dims {
        Dims { softcap, ..self }
    }

    /// The same with the sliding window `window` (≥ 1), or none.
    pub fn with_window(self, window: Option<usize>) -> Dims {
        Dims { window, ..self }
    }

    fn check(&self) -> Result<()> {
        if self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return Err(Error::InvalidArgument(format!(
                "attention: query heads ({}) must be a multiple of key/value heads ({})",
                self.heads, self.kv_heads
            )));
        }
        if self.head_dim == 0 {
            return Err(Error::InvalidArgument("attention: head_dim is 0".into()));
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "attention: scale {} must be finite and greater than 0",
                self.scale
            )));
        }
        if let Some(c) = self.softcap {
            if !(c.is_finite() && c > 0.0) {
                return Err(Error::InvalidArgument(format!(
                    "attention: softcap {c} must be finite and greater than 0 (or none)"
                )));
            }
        }
        if self.window == Some(0) {
            return Err(Error::InvalidArgument(
                "attention: window 0 must be at least 1 (or none)".into(),
            ));
        }
        Ok(())
    }

    /// σ, c and w in the reference's precision: the default scale as `1/√D` computed in `T`
    /// (today's math exactly, also in f64), any other scale as given.
    fn options<T: Real>(&self) -> Options<T> {
        let scale = if self.scale == default_scale(self.head_dim) {
            T::one() / T::of(self.head_dim as f64).sqrt()
        } else {
            T::of(self.scale as f64)
        };
        Options {
            scale,
            softcap: self.softcap.map(|c| T::of(c as f64)),
            window: self.window,
        }
    }
}

/// `1/√D` in f32, as the kernels have always taken it.
fn default_scale(head_dim: usize) -> f32 {
    1.0 / (head_dim as f32).sqrt()
}

/// The score options of the CPU reference, in its precision.
#[derive(Clone, Copy)]
struct Options<T> {
    scale: T,
    softcap: Option<T>,
    window: Option<usize>,
}

impl<T: Real> Options<T> {
    /// The first key row that query row `i` sees (positions within one sequence).
    fn first_key(&self, i: usize) -> usize {
        self.window.map_or(0, |w| (i + 1).saturating_sub(w))
    }

    /// One past the last query row (of `l`) that sees key row `j`.
    fn query_end(&self, j: usize, l: usize) -> usize {
        self.window.map_or(l, |w| j.saturating_add(w).min(l))
    }
}

fn check<T: Real>(
    op: &'static str,
    d: Dims,
    q: &[T],
    k: &[T],
    v: &[T],
    cu: &[usize],
) -> Result<usize> {
    d.check()?;
    let tokens = q.len() / (d.heads * d.head_dim);
    expect_len(op, "q [T, H, D]", q.len(), &[tokens, d.heads, d.head_dim])?;
    expect_len(
        op,
        "k [T, Hkv, D]",
        k.len(),
        &[tokens, d.kv_heads, d.head_dim],
    )?;
    expect_len(
        op,
        "v [T, Hkv, D]",
        v.len(),
        &[tokens, d.kv_heads, d.head_dim],
    )?;
    check_cu_seqlens(op, cu, tokens)?;
    Ok(tokens)
}

/// Rows `r0..r1` of one (sequence, head)'s probabilities into `p`, whose row `i − r0` holds
/// columns `base..` (`ld` apart): the scores of columns `first_key(r0)..r1` by one product, then
/// the softmax of each row's visible keys, zero elsewhere in `base..r1`. With `lse` (the rows'
/// saved log-sum-exps) P = e^(S − lse); else e^(S − max)/Σ, and the rows' lse are returned. With
/// a soft cap and `cap`, also writes `1 − tanh²(R/c)` at the visible entries (zero elsewhere)
/// into `cap` (laid out like `p`), the factor of the backward through the cap.
#[allow(clippy::too_many_arguments)]
fn block_probabilities<T: Real>(
    q: Mat<T>,
    k: Mat<T>,
    opt: Options<T>,
    (r0, r1): (usize, usize),
    p: &mut [T],
    (base, ld): (usize, usize),
    lse: Option<&[T]>,
    mut cap: Option<&mut [T]>,
) -> Vec<T> {
    let c0 = opt.first_key(r0);
    // Every element is the same dot product as in the full product; columns past r1 and before
    // the block's first visible column are never needed.
    gemm_serial(
        q.block(r0, r1, 0, q.cols),
        k.block(c0, r1, 0, k.cols).t(),
        &mut p[c0 - base..],
        ld,
        opt.scale,
    );
    let mut out_lse = Vec::with_capacity(r1 - r0);
    for i in r0..r1 {
        let lo = opt.first_key(i);
        let row = &mut p[(i - r0) * ld..(i - r0) * ld + (r1 - base)];
        let (vis, width) = (lo - base..i + 1 - base, r1 - base);
        if let Some(c) = opt.softcap {
            for (j, s) in row[vis.clone()].iter_mut().enumerate() {
                let t = (*s / c).tanh();
                *s = c * t;
                if let Some(g) = cap.as_deref_mut() {
                    g[(i - r0) * ld + vis.start + j] = T::one() - t * t;
                }
            }
            if let Some(g) = cap.as_deref_mut() {
                let g = &mut g[(i - r0) * ld..(i - r0) * ld + width];
                g[..vis.start].fill(T::zero());
                g[vis.end..].fill(T::zero());
            }
        }
        let m = match lse {
            Some(saved) => {
                T::exp_shifted(&mut row[vis.clone()], saved[i - r0], T::one());
                saved[i - r0]
            }
            None => {
                let mx = T::max_of(&row[vis.clone()]);
                let sum = T::exp_shifted_sum(&mut row[vis.clone()], mx);
                T::scale_slice(&mut row[vis.clone()], T::one() / sum);
                mx + sum.ln()
            }
        };
        row[..vis.start].fill(T::zero());
        row[vis.end..].fill(T::zero());
        out_lse.push(m);
    }
    out_lse
}

/// `C = alpha·A·B` into C's rows `ldc` apart, on this thread (the CPU reference's attention runs
/// its blocks in parallel, one product per task).
fn gemm_serial<T: Real>(a: Mat<T>, b: Mat<T>, c: &mut [T], ldc: usize, alpha: T) {
    gemm_sum_threads(&[Product { a, b, alpha }], c, ldc, T::zero(), 1);
}

/// Rows per block of the causal products: a block of rows `r0..r1` of `P` (or `S`, `dS`) is
/// zero beyond column `r1` (and, with a window, before its first row's first visible column),
/// so its products stop (and start) there. Blocks are also the CPU reference's unit of work.
const CAUSAL_BLOCK: usize = 64;

/// The `(r0, r1)` row blocks of an `l`-row causal matrix.
fn causal_blocks(l: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..l)
        .step_by(CAUSAL_BLOCK)
        .map(move |r0| (r0, (r0 + CAUSAL_BLOCK).min(l)))
}

/// One (sequence, head)'s operands: q, k, v as `L × D` views.
struct Head<'a, T> {
    s0: usize,
    l: usize,
    h: usize,
    q: Mat<'a, T>,
    k: Mat<'a, T>,
    v: Mat<'a, T>,
}

/// The views of every (sequence, head), in order.
fn heads<'a, T: Real>(
    d: Dims,
    (q, k, v): (&'a [T], &'a [T], &'a [T]),
    cu_seqlens: &[usize],
) -> Vec<Head<'a, T>> {
    let (h_n, kv_n, dim) = (d.heads, d.kv_heads, d.head_dim);
    let group = h_n / kv_n;
    pairs(cu_seqlens, h_n)
        .into_iter()
        .map(|(s0, l, h)| {
            let g = h / group;
            Head {
                s0,
                l,
                h,
                q: Mat::strided(&q[(s0 * h_n + h) * dim..], l, dim, h_n * dim),
                k: Mat::strided(&k[(s0 * kv_n + g) * dim..], l, dim, kv_n * dim),
                v: Mat::strided(&v[(s0 * kv_n + g) * dim..], l, dim, kv_n * dim),
            }
        })
        .collect()
}

/// `(head index, r0, r1)` of every block of rows of every head, in order: the tasks of the CPU
/// reference.
fn head_blocks<T>(heads: &[Head<T>]) -> Vec<(usize, usize, usize)> {
    heads
        .iter()
        .enumerate()
        .flat_map(|(x, hd)| causal_blocks(hd.l).map(move |(r0, r1)| (x, r0, r1)))
        .collect()
}

/// Returns `(o [T, H, D], lse [T, H])`.
pub fn forward<T: Real>(
    d: Dims,
    q: &[T],
    k: &[T],
    v: &[T],
    cu_seqlens: &[usize],
) -> Result<(Vec<T>, Vec<T>)> {
    let tokens = check("attention", d, q, k, v, cu_seqlens)?;
    let (h_n, dim) = (d.heads, d.head_dim);
    let opt = d.options::<T>();
    let heads = heads(d, (q, k, v), cu_seqlens);
    // Every (sequence, head, block of rows) on its own, in parallel; gathered in order.
    let blocks: Vec<_> = head_blocks(&heads)
        .into_par_iter()
        .map(|(x, r0, r1)| {
            let hd = &heads[x];
            let c0 = opt.first_key(r0);
            let w = r1 - c0;
            let mut p = vec![T::zero(); (r1 - r0) * w];
            let row_lse =
                block_probabilities(hd.q, hd.k, opt, (r0, r1), &mut p, (c0, w), None, None);
            // o = P·v over the block's visible columns (the terms skipped are the zeros outside
            // the causal window: the sums are those of the full product).
            let mut ob = vec![T::zero(); (r1 - r0) * dim];
            gemm_serial(
                Mat::new(&p, r1 - r0, w),
                hd.v.block(c0, r1, 0, dim),
                &mut ob,
                dim,
                T::one(),
            );
            (x, r0, ob, row_lse)
        })
        .collect();
    let mut o = zeros(q.len());
    let mut lse = vec![T::zero(); tokens * h_n];
    for (x, r0, ob, row_lse) in blocks {
        let hd = &heads[x];
        for (i, (orow, &m)) in ob.chunks(dim).zip(&row_lse).enumerate() {
            let at = (hd.s0 + r0 + i) * h_n + hd.h;
            o[at * dim..(at + 1) * dim].copy_from_slice(orow);
            lse[at] = m;
        }
    }
    Ok((o, lse))
}

/// `(start, length, head)` of every head of every sequence, in order.
fn pairs(cu_seqlens: &[usize], heads: usize) -> Vec<(usize, usize, usize)> {
    cu_seqlens
        .windows(2)
        .flat_map(|w| (0..heads).map(move |h| (w[0], w[1] - w[0], h)))
        .collect()
}

/// Bytes of `P` and `dS` the backward holds at once (at least one head's): heads are taken in
/// groups under this budget.
const BACKWARD_BUDGET: usize = 256 << 20;

/// Returns `(dq, dk, dv)`, shaped like q, k, v.
#[allow(clippy::too_many_arguments)]
pub fn backward<T: Real>(
    d: Dims,
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[T],
    d_o: &[T],
    cu_seqlens: &[usize],
) -> Result<(Vec<T>, Vec<T>, Vec<T>)> {
    let tokens = check("attention backward", d, q, k, v, cu_seqlens)?;
    expect_len("attention backward", "o", o.len(), &[q.len()])?;
    expect_len(
        "attention backward",
        "output gradient",
        d_o.len(),
        &[q.len()],
    )?;
    expect_len(
        "attention backward",
        "lse [T, H]",
        lse.len(),
        &[tokens, d.heads],
    )?;
    let (h_n, kv_n, dim) = (d.heads, d.kv_heads, d.head_dim);
    let group = h_n / kv_n;
    let opt = d.options::<T>();
    let heads = heads(d, (q, k, v), cu_seqlens);
    let (mut dq, mut dk, mut dv) = (zeros(q.len()), zeros(k.len()), zeros(v.len()));
    let elem = std::mem::size_of::<T>();
    let mut first = 0;
    while first < heads.len() {
        // Heads first..last hold their P and dS at once (2·L² each).
        let mut last = first + 1;
        let mut bytes = 2 * heads[first].l.pow(2) * elem;
        while last < heads.len() && bytes + 2 * heads[last].l.pow(2) * elem <= BACKWARD_BUDGET {
            bytes += 2 * heads[last].l.pow(2) * elem;
            last += 1;
        }
        let group_heads = &heads[first..last];
        let d_os: Vec<Mat<T>> = group_heads
            .iter()
            .map(|hd| Mat::strided(&d_o[(hd.s0 * h_n + hd.h) * dim..], hd.l, dim, h_n * dim))
            .collect();
        // Zeroed block by block by the tasks that fill them (in parallel, and just before use).
        let mut p_all: Vec<Vec<MaybeUninit<T>>> =
            group_heads.iter().map(|hd| uninit(hd.l * hd.l)).collect();
        let mut ds_all: Vec<Vec<MaybeUninit<T>>> =
            group_heads.iter().map(|hd| uninit(hd.l * hd.l)).collect();
        // Phase 1, per block of rows: P (from the saved lse), dS = P ⊙ (dO·vᵀ − D) (times
        // 1 − tanh² through a soft cap), and dq = σ dS·k over the block's visible columns.
        let mut tasks = Vec::new();
        for (x, (p, ds)) in p_all.iter_mut().zip(ds_all.iter_mut()).enumerate() {
            let l = group_heads[x].l;
            let rows = p
                .chunks_mut(CAUSAL_BLOCK * l)
                .zip(ds.chunks_mut(CAUSAL_BLOCK * l));
            for ((r0, r1), (pb, dsb)) in causal_blocks(l).zip(rows) {
                tasks.push((x, r0, r1, pb, dsb));
            }
        }
        let dq_blocks: Vec<_> = tasks
            .into_par_iter()
            .map(|(x, r0, r1, pb, dsb)| {
                let (pb, dsb) = (zeroed(pb), zeroed(dsb));
                let hd = &group_heads[x];
                let (l, s0) = (hd.l, hd.s0);
                let c0 = opt.first_key(r0);
                let doh = d_os[x];
                let row_lse: Vec<T> = (r0..r1).map(|i| lse[(s0 + i) * h_n + hd.h]).collect();
                let mut cap = opt.softcap.map(|_| vec![T::zero(); (r1 - r0) * l]);
                block_probabilities(
                    hd.q,
                    hd.k,
                    opt,
                    (r0, r1),
                    pb,
                    (0, l),
                    Some(&row_lse),
                    cap.as_deref_mut(),
                );
                gemm_serial(
                    doh.block(r0, r1, 0, dim),
                    hd.v.block(c0, r1, 0, dim).t(),
                    &mut dsb[c0..],
                    l,
                    T::one(),
                );
                for i in r0..r1 {
                    // D_i = dO_i · o_i
                    let at = ((s0 + i) * h_n + hd.h) * dim;
                    let d_i: T = (0..dim).map(|c| d_o[at + c] * o[at + c]).sum();
                    let lo = opt.first_key(i);
                    let row = (i - r0) * l;
                    let (ds_row, p_row) = (&mut dsb[row..row + r1], &pb[row..row + r1]);
                    for (s, &pv) in ds_row[lo..=i].iter_mut().zip(&p_row[lo..]) {
                        *s = pv * (*s - d_i);
                    }
                    if let Some(cg) = &cap {
                        for (s, &f) in ds_row[lo..=i].iter_mut().zip(&cg[row + lo..]) {
                            *s *= f;
                        }
                    }
                    ds_row[..lo].fill(T::zero());
                    ds_row[i + 1..].fill(T::zero());
                }
                let mut dqb = vec![T::zero(); (r1 - r0) * dim];
                gemm_serial(
                    Mat::strided(&dsb[c0..], r1 - r0, r1 - c0, l),
                    hd.k.block(c0, r1, 0, dim),
                    &mut dqb,
                    dim,
                    opt.scale,
                );
                (x, r0, dqb)
            })
            .collect();
        // SAFETY: every block of every matrix was zeroed (and filled) by phase 1.
        let p_all: Vec<Vec<T>> = p_all
            .into_iter()
            .map(|v| unsafe { assume_init(v) })
            .collect();
        let ds_all: Vec<Vec<T>> = ds_all
            .into_iter()
            .map(|v| unsafe { assume_init(v) })
            .collect();
        // Phase 2, per block of key rows c0..c1 (the rows of Pᵀ and dSᵀ span columns
        // c0..query_end(c1 − 1)): dv_h = Pᵀ·dO_h and dk_h = σ dSᵀ·q_h.
        let dkv_blocks: Vec<_> = head_blocks(group_heads)
            .into_par_iter()
            .map(|(x, c0, c1)| {
                let hd = &group_heads[x];
                let l = hd.l;
                let r1 = opt.query_end(c1 - 1, l);
                let doh = d_os[x];
                let mut dvb = vec![T::zero(); (c1 - c0) * dim];
                gemm_serial(
                    Mat::new(&p_all[x], l, l).t().block(c0, c1, c0, r1),
                    doh.block(c0, r1, 0, dim),
                    &mut dvb,
                    dim,
                    T::one(),
                );
                let mut dkb = vec![T::zero(); (c1 - c0) * dim];
                gemm_serial(
                    Mat::new(&ds_all[x], l, l).t().block(c0, c1, c0, r1),
                    hd.q.block(c0, r1, 0, dim),
                    &mut dkb,
                    dim,
                    opt.scale,
                );
                (x, c0, dkb, dvb)
            })
            .collect();
        for (x, r0, dqb) in dq_blocks {
            let hd = &group_heads[x];
            for (i, row) in dqb.chunks(dim).enumerate() {
                let at = ((hd.s0 + r0 + i) * h_n + hd.h) * dim;
                dq[at..at + dim].copy_from_slice(row);
            }
        }
        // dk and dv summed over the heads of a group in head order (the blocks come in order).
        for (x, c0, dkb, dvb) in dkv_blocks {
            let hd = &group_heads[x];
            let g = hd.h / group;
            for (i, (krow, vrow)) in dkb.chunks(dim).zip(dvb.chunks(dim)).enumerate() {
                let at = ((hd.s0 + c0 + i) * kv_n + g) * dim;
                for c in 0..dim {
                    dk[at + c] += krow[c];
                    dv[at + c] += vrow[c];
                }
            }
        }
        first = last;
    }
    Ok((dq, dk, dv))
}

/// Decoding with a KV cache: `n` new query rows at absolute positions `start..start + n` (one
/// sequence) attend to the cached keys/values `0..start + n` (the new ones already appended),
/// causally, and with a window w only to positions `p − w < j ≤ p` for the query at `p`. q
/// `[n, H, D]`, k and v `[start + n, Hkv, D]`; returns o `[n, H, D]`.
pub fn forward_cached<T: Real>(d: Dims, q: &[T], k: &[T], v: &[T], start: usize) -> Result<Vec<T>> {
    d.check()?;
    let n = q.len() / (d.heads * d.head_dim);
    let total = start + n;
    expect_len(
        "attention (cached)",
        "q [n, H, D]",
        q.len(),
        &[n, d.heads, d.head_dim],
    )?;
    expect_len(
        "attention (cached)",
        "k cache",
        k.len(),
        &[total, d.kv_heads, d.head_dim],
    )?;
    expect_len(
        "attention (cached)",
        "v cache",
        v.len(),
        &[total, d.kv_heads, d.head_dim],
    )?;
    if n == 0 {
        return Ok(Vec::new());
    }
    let (h_n, kv_n, dim) = (d.heads, d.kv_heads, d.head_dim);
    let group = h_n / kv_n;
    let opt = d.options::<T>();
    // Keys before the first query's window are seen by no query: the products start there.
    let c0 = opt.first_key(start);
    let cols = total - c0;
    let mut o = vec![T::zero(); q.len()];
    for h in 0..h_n {
        let g = h / group;
        let qh = Mat::strided(&q[h * dim..], n, dim, h_n * dim);
        let kg = Mat::strided(&k[(c0 * kv_n + g) * dim..], cols, dim, kv_n * dim);
        let vg = Mat::strided(&v[(c0 * kv_n + g) * dim..], cols, dim, kv_n * dim);
        // Row i holds the scores of keys c0..total.
        let mut s = vec![T::zero(); n * cols];
        gemm(qh, kg.t(), &mut s, opt.scale, T::zero());
        for (i, row) in s.chunks_mut(cols).enumerate() {
            let lo = opt.first_key(start + i) - c0;
            let visible = start + i + 1 - c0;
            if let Some(c) = opt.softcap {
                for x in row[lo..visible].iter_mut() {
                    *x = c * (*x / c).tanh();
                }
            }
            let m = T::max_of(&row[lo..visible]);
            let z = T::exp_shifted_sum(&mut row[lo..visible], m);
            T::scale_slice(&mut row[lo..visible], T::one() / z);
            row[..lo].fill(T::zero());
            row[visible..].fill(T::zero());
        }
        let mut oh = vec![T::zero(); n * dim];
        gemm(Mat::new(&s, n, cols), vg, &mut oh, T::one(), T::zero());
        for i in 0..n {
            o[(i * h_n + h) * dim..(i * h_n + h + 1) * dim]
                .copy_from_slice(&oh[i * dim..(i + 1) * dim]);
        }
    }
    Ok(o)
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct AttnParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    lse: u64,
    dout: u64,
    dq: u64,
    dk: u64,
    dv: u64,
    dsum: u64,
    cu_seqlens: u64,
    heads: i32,
    kv_heads: i32,
    scale: f32,
    /// The soft cap c, 0 for none.
    softcap: f32,
    /// The window w, 0 for none.
    window: i32,
}
// SAFETY: #[repr(C)] plain data laid out like the kernel's `AttnParams`.
unsafe impl cudarc::driver::DeviceRepr for AttnParams {}

const TILE: usize = 64;

/// The head dims the flash-attention kernels are compiled for (kernels/attention.cu).
pub const CUDA_HEAD_DIMS: [usize; 4] = [64, 96, 128, 256];

/// One head dim's kernels and how each is launched (the tiling notes in kernels/attention.cu).
struct Tiling {
    /// fwd, fwd_opt, dkdv, dkdv_opt, dq, dq_opt, dsum.
    names: [&'static str; 7],
    /// Query rows per forward block (`AttFwdRows::BM`: 32 per warp where the accumulators fit
    /// the registers, else 16) and its shared memory: Q of that many rows, K and V of 64.
    fwd_rows: usize,
    /// fwd and fwd_opt with 16 rows per warp (64 per block), for cards whose SMs cannot hold two
    /// of the wide forward's blocks (head dim 128 only: [`fwd_query_rows`]).
    fwd_r16: Option<[&'static str; 2]>,
    /// Dynamic shared memory of the forward (0: its tiles are static).
    fwd_smem: usize,
    /// Keys per dK/dV block and its threads.
    dkdv_rows: usize,
    dkdv_threads: u32,
    /// Threads and dynamic shared memory of dQ.
    dq_threads: u32,
    dq_smem: usize,
}

macro_rules! flash_names {
    ($d:literal) => {
        [
            concat!("flash_fwd_d", $d),
            concat!("flash_fwd_opt_d", $d),
            concat!("flash_bwd_dkdv_d", $d),
            concat!("flash_bwd_dkdv_opt_d", $d),
            concat!("flash_bwd_dq_d", $d),
            concat!("flash_bwd_dq_opt_d", $d),
            concat!("flash_bwd_dsum_d", $d),
        ]
    };
}

/// Shared memory a kernel declares statically, at most (above it, tiles are dynamic and the
/// launcher opts in).
const STATIC_SMEM: usize = 48 * 1024;

/// The forward's tiles in bytes: Q of `rows` rows, K and V of 64, all × D bf16.
fn fwd_tiles_bytes(rows: usize, head_dim: usize) -> usize {
    (rows + 2 * TILE) * head_dim * 2
}

/// The dynamic shared memory a launch passes for tiles of `bytes`: 0 where they are static.
fn dynamic_smem(bytes: usize) -> usize {
    if bytes > STATIC_SMEM {
        bytes
    } else {
        0
    }
}

/// The kernels of a head dim in [`CUDA_HEAD_DIMS`]. Shared memory: the forward holds Q of
/// `fwd_rows` rows and K and V tiles of 64 × D bf16, dQ two 64-row tiles (three at 256: Q, dO
/// and one for V then K), dK/dV K and V of `dkdv_rows` keys plus Q and dO of 64 queries (twice
/// at 64 and 128); static up to 48 KiB, dynamic (opted in) above.
fn tiling(head_dim: usize) -> Tiling {
    let tile = TILE * head_dim * 2;
    let (names, fwd_rows, dkdv_rows, dkdv_threads, dq_threads, dq_smem) = match head_dim {
        64 => (flash_names!(64), 128, 64, 128, 128, 0),
        96 => (flash_names!(96), 128, 64, 128, 128, 0),
        128 => (flash_names!(128), 128, 64, 256, 128, 0),
        // 96 KiB per block, within the 99 KiB of sm_86/sm_89 (and sm_80's 163, sm_90's 227).
        256 => (flash_names!(256), 64, 32, 256, 256, 3 * tile),
        _ => unreachable!("head_dim {head_dim} checked against CUDA_HEAD_DIMS"),
    };
    Tiling {
        names,
        fwd_rows,
        fwd_r16: (head_dim == 128).then_some(["flash_fwd_r16_d128", "flash_fwd_opt_r16_d128"]),
        fwd_smem: dynamic_smem(fwd_tiles_bytes(fwd_rows, head_dim)),
        dkdv_rows,
        dkdv_threads,
        dq_threads,
        dq_smem,
    }
}

impl Tiling {
    /// Dynamic shared memory of dK/dV: K and V of `dkdv_rows` keys, Q and dO of 64 queries,
    /// the latter twice at head dim 64 and 128 (the next pair fetched while one is used:
    /// `AttDkdvBuffers`).
    fn dkdv_smem(&self, head_dim: usize) -> usize {
        let buffers = if matches!(head_dim, 64 | 128) { 2 } else { 1 };
        (2 * self.dkdv_rows + 2 * buffers * TILE) * head_dim * 2
    }

    /// The most shared memory any of this head dim's kernels takes per block, in bytes.
    fn max_smem(&self, head_dim: usize) -> usize {
        let fwd = fwd_tiles_bytes(self.fwd_rows, head_dim);
        self.dkdv_smem(head_dim).max(fwd).max(self.dq_smem)
    }
}

/// The most shared memory per block the flash-attention kernels need at `head_dim` (one of
/// [`CUDA_HEAD_DIMS`]): 48 KiB at 64 and 96, 96 KiB at 128 and 256.
pub fn cuda_shared_memory(head_dim: usize) -> Option<usize> {
    CUDA_HEAD_DIMS
        .contains(&head_dim)
        .then(|| tiling(head_dim).max_smem(head_dim))
}

impl AttnParams {
    /// The options as the kernels take them: the scale as given, 0 for no soft cap, and 0 for no
    /// window or one that no sequence of the batch outgrows (`max_len` its longest), which is the
    /// same attention and lets the kernels skip the window's masks.
    fn options(d: Dims, max_len: usize) -> AttnParams {
        AttnParams {
            scale: d.scale,
            softcap: d.softcap.unwrap_or(0.0),
            window: match d.window {
                Some(w) if w < max_len => w as i32,
                _ => 0,
            },
            ..AttnParams::default()
        }
    }

    /// 1 where the `_opt` kernels are needed (a soft cap or a window), else 0.
    fn options_index(&self) -> usize {
        usize::from(self.softcap > 0.0 || self.window > 0)
    }

    /// The kernel of `base` (`fwd`, `dkdv` or `dq`) for these options and head dim (one of
    /// [`CUDA_HEAD_DIMS`], checked): the `_opt` kernels read the soft cap and the window; the
    /// plain ones (the scale only) are compiled without that code, which costs registers.
    fn kernel(&self, base: &str, head_dim: usize) -> &'static str {
        let opt = self.options_index();
        let names = tiling(head_dim).names;
        match base {
            "fwd" => names[opt],
            "dkdv" => names[2 + opt],
            "dq" => names[4 + opt],
            _ => unreachable!("attention kernel {base}: fwd, dkdv or dq"),
        }
    }
}

/// Checks the CUDA inputs; returns (tokens, device, cu_seqlens on the device, longest sequence).
fn check_cuda(
    op: &'static str,
    d: Dims,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu: &[usize],
) -> Result<(usize, Device, Tensor, usize)> {
    d.check()?;
    if !CUDA_HEAD_DIMS.contains(&d.head_dim) {
        return Err(Error::InvalidArgument(format!(
            "{op}: head_dim {} is not supported by the flash-attention kernels (64, 96, 128 or \
             256)",
            d.head_dim
        )));
    }
    let o = cuda_ordinal(op, q)?;
    let dev = Device::Cuda(o);
    let tokens = q.shape().first().copied().unwrap_or(0);
    // `[T, heads, head_dim]`, or the same memory as `[T, heads·head_dim]` (a projection's output).
    let heads_shape = |heads: usize, t: &Tensor| {
        if t.shape().len() == 2 {
            vec![tokens, heads * d.head_dim]
        } else {
            vec![tokens, heads, d.head_dim]
        }
    };
    check_tensor(op, "q", q, DType::BF16, &heads_shape(d.heads, q), dev)?;
    check_tensor(op, "k", k, DType::BF16, &heads_shape(d.kv_heads, k), dev)?;
    check_tensor(op, "v", v, DType::BF16, &heads_shape(d.kv_heads, v), dev)?;
    check_cu_seqlens(op, cu, tokens)?;
    let max_len = cu.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    let cu_dev = Tensor::from_vec(
        cu.iter().map(|&c| c as i32).collect::<Vec<_>>(),
        &[cu.len()],
        &dev,
    )?;
    Ok((tokens, dev, cu_dev, max_len))
}

fn grid(max_len: usize, heads: usize, seqs: usize, threads: u32, smem: usize) -> LaunchConfig {
    grid_rows(max_len, TILE, heads, seqs, threads, smem)
}

/// One block per `rows` rows of the longest sequence, per head, per sequence.
fn grid_rows(
    max_len: usize,
    rows: usize,
    heads: usize,
    seqs: usize,
    threads: u32,
    smem: usize,
) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (max_len.div_ceil(rows) as u32, heads as u32, seqs as u32),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

/// CUDA flash attention forward: `(o [T, H, D] bf16, lse [T, H] f32)`; q, k and v may also be
/// given as `[T, heads·D]` (the same memory), and o then has q's shape `[T, H·D]`.
pub fn forward_cuda(
    d: Dims,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &[usize],
) -> Result<(Tensor, Tensor)> {
    forward_cuda_rows(d, q, k, v, cu_seqlens, None)
}

/// The query rows per forward block on this card: the head dim's wide tile (128 at D ≤ 128)
/// where an SM holds two such blocks' shared memory (H100, A100: 228 and 164 KiB), else the
/// 64-row kernels where they exist (D = 128 on sm_86/89/120, whose 100 KiB hold one 64 KiB block
/// but two of 48 KiB).
fn fwd_query_rows(cuda: &CudaDevice, head_dim: usize) -> usize {
    let tl = tiling(head_dim);
    if tl.fwd_r16.is_none() {
        return tl.fwd_rows;
    }
    let wide = fwd_tiles_bytes(tl.fwd_rows, head_dim);
    let (per_sm, reserved) = cuda.shared_memory_per_multiprocessor();
    if 2 * (wide + reserved) <= per_sm {
        tl.fwd_rows
    } else {
        TILE
    }
}

/// [`forward_cuda`] with the query rows per block given: `Some(64)` picks the 16-rows-a-warp
/// kernels where the head dim has them (128), `Some` of the head dim's wide tile the wide ones,
/// `None` what the card suits. The result is the same bit for bit; tests run both tilings.
#[doc(hidden)]
pub fn forward_cuda_rows(
    d: Dims,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cu_seqlens: &[usize],
    rows: Option<usize>,
) -> Result<(Tensor, Tensor)> {
    let op = "flash attention (cuda)";
    let (tokens, dev, cu, max_len) = check_cuda(op, d, q, k, v, cu_seqlens)?;
    let o = Tensor::uninit(q.shape(), DType::BF16, &dev)?;
    let lse = Tensor::uninit(&[tokens, d.heads], DType::F32, &dev)?;
    if tokens == 0 {
        return Ok((o, lse));
    }
    let p = AttnParams {
        q: q.device_ptr(),
        k: k.device_ptr(),
        v: v.device_ptr(),
        o: o.device_ptr(),
        lse: lse.device_ptr(),
        cu_seqlens: cu.device_ptr(),
        heads: d.heads as i32,
        kv_heads: d.kv_heads as i32,
        ..AttnParams::options(d, max_len)
    };
    let Device::Cuda(ord) = dev else {
        unreachable!("checked")
    };
    let cuda = CudaDevice::get(ord)?;
    let tl = tiling(d.head_dim);
    let rows = match rows {
        Some(r) => r,
        None => fwd_query_rows(&cuda, d.head_dim),
    };
    let (name, smem) = match tl.fwd_r16 {
        Some(r16) if rows == TILE => (
            r16[p.options_index()],
            dynamic_smem(fwd_tiles_bytes(TILE, d.head_dim)),
        ),
        _ if rows == tl.fwd_rows => (p.kernel("fwd", d.head_dim), tl.fwd_smem),
        _ => {
            return Err(Error::InvalidArgument(format!(
                "{op}: no forward kernel at head_dim {} takes {rows} query rows per block",
                d.head_dim
            )))
        }
    };
    let f = if smem > 0 {
        cuda.function_with_shared("attention", name, smem)?
    } else {
        cuda.function("attention", name)?
    };
    let mut b = cuda.stream().launch_builder(f);
    b.arg(&p);
    // SAFETY: flash_fwd[_opt]_d*(AttnParams): q/k/v/o/lse checked above ([T, H|Hkv, D] bf16,
    // lse [T, H] f32), cu_seqlens validated (0 .. T, increasing) and on the device; the grid
    // covers the longest sequence in blocks of `rows` queries (the chosen kernel's BM); 128
    // threads as the kernel assumes; `smem` bytes of dynamic shared memory where the kernel's
    // tiles are dynamic (opted in above); all buffers outlive the launch; scale and soft cap
    // finite (checked), window ≥ 0.
    unsafe {
        cuda.launch(
            name,
            b,
            grid_rows(max_len, rows, d.heads, cu_seqlens.len() - 1, 128, smem),
        )
    }?;
    Ok((o, lse))
}

/// CUDA flash attention backward (deterministic): `(dq, dk, dv)` in bf16.
#[allow(clippy::too_many_arguments)]
pub fn backward_cuda(
    d: Dims,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    cu_seqlens: &[usize],
) -> Result<(Tensor, Tensor, Tensor)> {
    let op = "flash attention backward (cuda)";
    let (tokens, dev, cu, max_len) = check_cuda(op, d, q, k, v, cu_seqlens)?;
    check_tensor(op, "o", o, DType::BF16, q.shape(), dev)?;
    check_tensor(op, "dO", d_o, DType::BF16, q.shape(), dev)?;
    check_tensor(op, "lse", lse, DType::F32, &[tokens, d.heads], dev)?;
    let dq = Tensor::uninit(q.shape(), DType::BF16, &dev)?;
    let dk = Tensor::uninit(k.shape(), DType::BF16, &dev)?;
    let dv = Tensor::uninit(v.shape(), DType::BF16, &dev)?;
    if tokens == 0 {
        return Ok((dq, dk, dv));
    }
    let dsum = Tensor::uninit(&[tokens, d.heads], DType::F32, &dev)?;
    let p = AttnParams {
        q: q.device_ptr(),
        k: k.device_ptr(),
        v: v.device_ptr(),
        o: o.device_ptr(),
        lse: lse.device_ptr(),
        dout: d_o.device_ptr(),
        dq: dq.device_ptr(),
        dk: dk.device_ptr(),
        dv: dv.device_ptr(),
        dsum: dsum.device_ptr(),
        cu_seqlens: cu.device_ptr(),
        heads: d.heads as i32,
        kv_heads: d.kv_heads as i32,
        ..AttnParams::options(d, max_len)
    };
    let Device::Cuda(ord) = dev else {
        unreachable!("checked")
    };
    let cuda = CudaDevice::get(ord)?;
    let tl = tiling(d.head_dim);
    let seqs = cu_seqlens.len() - 1;
    // D_i = dO_i · O_i: one warp per (token, head).
    let name = tl.names[6];
    let f = cuda.function("attention", name)?;
    let tokens_i = tokens as i32;
    let mut b = cuda.stream().launch_builder(f);
    b.arg(&p).arg(&tokens_i);
    let warps = tokens * d.heads;
    let cfg = LaunchConfig {
        grid_dim: (warps.div_ceil(8) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: flash_bwd_dsum_*(AttnParams, int): dout, o [T, H, D] and dsum [T, H] checked; one
    // warp per (token, head), bounds-checked in the kernel.
    unsafe { cuda.launch(name, b, cfg) }?;
    // dK, dV over key tiles (K, V, Q and dO tiles in dynamic shared memory).
    let name = p.kernel("dkdv", d.head_dim);
    let smem = tl.dkdv_smem(d.head_dim);
    let f = cuda.function_with_shared("attention", name, smem)?;
    let mut b = cuda.stream().launch_builder(f);
    b.arg(&p);
    let cfg = grid_rows(
        max_len,
        tl.dkdv_rows,
        d.kv_heads,
        seqs,
        tl.dkdv_threads,
        smem,
    );
    // SAFETY: flash_bwd_dkdv[_opt]_*(AttnParams): every buffer checked above; dsum written by the
    // previous launch on the same stream; `smem` bytes of dynamic shared memory (opted in above),
    // one block per `dkdv_rows` keys and the thread count the kernel's warp/column split assumes.
    unsafe { cuda.launch(name, b, cfg) }?;
    // dQ over query tiles.
    let name = p.kernel("dq", d.head_dim);
    let f = if tl.dq_smem > 0 {
        cuda.function_with_shared("attention", name, tl.dq_smem)?
    } else {
        cuda.function("attention", name)?
    };
    let mut b = cuda.stream().launch_builder(f);
    b.arg(&p);
    let cfg = grid(max_len, d.heads, seqs, tl.dq_threads, tl.dq_smem);
    // SAFETY: flash_bwd_dq[_opt]_*(AttnParams): as above; the thread count the kernel's column
    // split assumes and its dynamic shared memory (opted in above) where it has any.
    unsafe { cuda.launch(name, b, cfg) }?;
    Ok((dq, dk, dv))
}
