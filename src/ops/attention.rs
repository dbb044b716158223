//! Causal grouped-query attention over packed variable-length sequences.
//!
//! q `[T, H, D]`, k and v `[T, Hkv, D]`, `cu_seqlens` `[B + 1]`; query head `h` reads key/value
//! head `h / (H / Hkv)` (transformers' `repeat_kv`). Within each sequence, for query row i and
//! key rows j ≤ i (never across sequences):
//! ```text
//! S_ij = (q_i · k_j) / √D
//! lse_i = log Σ_{j≤i} exp(S_ij)                saved: lse [T, H]
//! P_ij = exp(S_ij − lse_i)
//! o_i  = Σ_j P_ij v_j
//! ```
//! Backward (the flash-attention-2 recurrences; P is recomputed from q, k and lse):
//! ```text
//! D_i   = dO_i · o_i
//! dv_j += Σ_i P_ij dO_i                        summed over the H/Hkv query heads sharing j's head
//! dP_ij = dO_i · v_j
//! dS_ij = P_ij (dP_ij − D_i)
//! dq_i  = Σ_j dS_ij k_j / √D
//! dk_j += Σ_i dS_ij q_i / √D
//! ```
//! The CPU reference forms one sequence's `L × L` scores per head at a time (memory is
//! `L²` for the largest sequence, not `T²`); the CUDA kernel never forms them.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use rayon::prelude::*;

use super::matmul::{gemm, gemm_ldc, Mat};
use super::{check_cu_seqlens, check_tensor, cuda_ordinal, expect_len, zeros, Real};
use crate::device::cuda::CudaDevice;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// Head layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dims {
    /// Query heads H: q and o are `[T, H, D]`.
    pub heads: usize,
    /// Key/value heads Hkv (divides H): k and v are `[T, Hkv, D]`.
    pub kv_heads: usize,
    /// Per-head width D.
    pub head_dim: usize,
}

impl Dims {
    fn check(&self) -> Result<()> {
        if self.kv_heads == 0 || self.heads % self.kv_heads != 0 {
            return Err(Error::InvalidArgument(format!(
                "attention: query heads ({}) must be a multiple of key/value heads ({})",
                self.heads, self.kv_heads
            )));
        }
        if self.head_dim == 0 {
            return Err(Error::InvalidArgument("attention: head_dim is 0".into()));
        }
        Ok(())
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

/// One sequence's probabilities `P` (`L × L`, zero above the diagonal) for head `h`, from
/// `S = q·kᵀ/√D`; returns the row log-sum-exps when `lse` is `None`, else uses the given ones.
fn probabilities<T: Real>(q: Mat<T>, k: Mat<T>, scale: T, lse: Option<&[T]>) -> (Vec<T>, Vec<T>) {
    let l = q.rows;
    let mut p = vec![T::zero(); l * l];
    // Causal: each block of rows only needs the columns up to its last row (the rest of S is
    // zeroed below); every element is the same dot product as in the full product.
    for (r0, r1) in causal_blocks(l) {
        gemm_ldc(
            q.block(r0, r1, 0, q.cols),
            k.block(0, r1, 0, k.cols).t(),
            &mut p[r0 * l..],
            l,
            scale,
            T::zero(),
        );
    }
    let mut out_lse = Vec::with_capacity(l);
    for i in 0..l {
        let row = &mut p[i * l..(i + 1) * l];
        let m = match lse {
            Some(saved) => saved[i],
            None => {
                let mx = row[..=i].iter().fold(T::neg_infinity(), |a, &b| a.max(b));
                let sum: T = row[..=i].iter().map(|&s| (s - mx).exp()).sum();
                mx + sum.ln()
            }
        };
        for s in row[..=i].iter_mut() {
            *s = (*s - m).exp();
        }
        row[i + 1..].fill(T::zero());
        out_lse.push(m);
    }
    (p, out_lse)
}

/// Rows per block of the causal products: a block of rows `r0..r1` of `P` (or `S`, `dS`) is
/// zero beyond column `r1`, so its products stop there.
const CAUSAL_BLOCK: usize = 64;

/// The `(r0, r1)` row blocks of an `l`-row causal matrix.
fn causal_blocks(l: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..l)
        .step_by(CAUSAL_BLOCK)
        .map(move |r0| (r0, (r0 + CAUSAL_BLOCK).min(l)))
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
    let (h_n, kv_n, dim) = (d.heads, d.kv_heads, d.head_dim);
    let group = h_n / kv_n;
    let scale = T::one() / T::of(dim as f64).sqrt();
    // Every (sequence, head) on its own, in parallel; gathered in a fixed order.
    let per_head: Vec<_> = pairs(cu_seqlens, h_n)
        .into_par_iter()
        .map(|(s0, l, h)| {
            let g = h / group;
            let qh = Mat::strided(&q[(s0 * h_n + h) * dim..], l, dim, h_n * dim);
            let kg = Mat::strided(&k[(s0 * kv_n + g) * dim..], l, dim, kv_n * dim);
            let vg = Mat::strided(&v[(s0 * kv_n + g) * dim..], l, dim, kv_n * dim);
            let (p, row_lse) = probabilities(qh, kg, scale, None);
            let mut oh = vec![T::zero(); l * dim];
            // o = P·v over the nonzero columns of each block of P's rows (the terms skipped are
            // the zeros above the diagonal: the sums are those of the full product).
            let pm = Mat::new(&p, l, l);
            for (r0, r1) in causal_blocks(l) {
                gemm(
                    pm.block(r0, r1, 0, r1),
                    vg.block(0, r1, 0, dim),
                    &mut oh[r0 * dim..r1 * dim],
                    T::one(),
                    T::zero(),
                );
            }
            (s0, l, h, oh, row_lse)
        })
        .collect();
    let mut o = zeros(q.len());
    let mut lse = vec![T::zero(); tokens * h_n];
    for (s0, l, h, oh, row_lse) in per_head {
        for i in 0..l {
            let dst = ((s0 + i) * h_n + h) * dim;
            o[dst..dst + dim].copy_from_slice(&oh[i * dim..(i + 1) * dim]);
            lse[(s0 + i) * h_n + h] = row_lse[i];
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
    let scale = T::one() / T::of(dim as f64).sqrt();
    // Every (sequence, head) on its own, in parallel; dk and dv summed over the heads of a
    // group in a fixed order.
    let per_head: Vec<_> = pairs(cu_seqlens, h_n)
        .into_par_iter()
        .map(|(s0, l, h)| {
            let g = h / group;
            let qh = Mat::strided(&q[(s0 * h_n + h) * dim..], l, dim, h_n * dim);
            let kg = Mat::strided(&k[(s0 * kv_n + g) * dim..], l, dim, kv_n * dim);
            let vg = Mat::strided(&v[(s0 * kv_n + g) * dim..], l, dim, kv_n * dim);
            let doh = Mat::strided(&d_o[(s0 * h_n + h) * dim..], l, dim, h_n * dim);
            let row_lse: Vec<T> = (0..l).map(|i| lse[(s0 + i) * h_n + h]).collect();
            let (p, _) = probabilities(qh, kg, scale, Some(&row_lse));
            // D_i = dO_i · o_i
            let di: Vec<T> = (0..l)
                .map(|i| {
                    let at = ((s0 + i) * h_n + h) * dim;
                    (0..dim).map(|c| d_o[at + c] * o[at + c]).sum()
                })
                .collect();
            // The products below skip the zeros of P and dS above the diagonal: row blocks
            // r0..r1 of P and dS stop at column r1; rows c0..c1 of Pᵀ and dSᵀ start at c0.
            let pm = Mat::new(&p, l, l);
            // dv_g += Pᵀ·dO_h
            let mut dvh = vec![T::zero(); l * dim];
            for (c0, c1) in causal_blocks(l) {
                gemm(
                    pm.t().block(c0, c1, c0, l),
                    doh.block(c0, l, 0, dim),
                    &mut dvh[c0 * dim..c1 * dim],
                    T::one(),
                    T::zero(),
                );
            }
            // dS = P ⊙ (dO·vᵀ − D)
            let mut ds = vec![T::zero(); l * l];
            for (r0, r1) in causal_blocks(l) {
                gemm_ldc(
                    doh.block(r0, r1, 0, dim),
                    vg.block(0, r1, 0, dim).t(),
                    &mut ds[r0 * l..],
                    l,
                    T::one(),
                    T::zero(),
                );
            }
            for (i, ((ds_row, p_row), &d_i)) in
                ds.chunks_mut(l).zip(p.chunks(l)).zip(&di).enumerate()
            {
                for (s, &pv) in ds_row[..=i].iter_mut().zip(p_row) {
                    *s = pv * (*s - d_i);
                }
                ds_row[i + 1..].fill(T::zero());
            }
            let dsm = Mat::new(&ds, l, l);
            let mut dqh = vec![T::zero(); l * dim];
            for (r0, r1) in causal_blocks(l) {
                gemm(
                    dsm.block(r0, r1, 0, r1),
                    kg.block(0, r1, 0, dim),
                    &mut dqh[r0 * dim..r1 * dim],
                    scale,
                    T::zero(),
                );
            }
            let mut dkh = vec![T::zero(); l * dim];
            for (c0, c1) in causal_blocks(l) {
                gemm(
                    dsm.t().block(c0, c1, c0, l),
                    qh.block(c0, l, 0, dim),
                    &mut dkh[c0 * dim..c1 * dim],
                    scale,
                    T::zero(),
                );
            }
            (s0, l, h, dqh, dkh, dvh)
        })
        .collect();
    let (mut dq, mut dk, mut dv) = (zeros(q.len()), zeros(k.len()), zeros(v.len()));
    for (s0, l, h, dqh, dkh, dvh) in per_head {
        let g = h / group;
        for i in 0..l {
            let qa = ((s0 + i) * h_n + h) * dim;
            let ka = ((s0 + i) * kv_n + g) * dim;
            dq[qa..qa + dim].copy_from_slice(&dqh[i * dim..(i + 1) * dim]);
            for c in 0..dim {
                dk[ka + c] += dkh[i * dim + c];
                dv[ka + c] += dvh[i * dim + c];
            }
        }
    }
    Ok((dq, dk, dv))
}

/// Decoding with a KV cache: `n` new query rows at absolute positions `start..start + n` (one
/// sequence) attend to the cached keys/values `0..start + n` (the new ones already appended),
/// causally. q `[n, H, D]`, k and v `[start + n, Hkv, D]`; returns o `[n, H, D]`.
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
    let (h_n, kv_n, dim) = (d.heads, d.kv_heads, d.head_dim);
    let group = h_n / kv_n;
    let scale = T::one() / T::of(dim as f64).sqrt();
    let mut o = vec![T::zero(); q.len()];
    for h in 0..h_n {
        let g = h / group;
        let qh = Mat::strided(&q[h * dim..], n, dim, h_n * dim);
        let kg = Mat::strided(&k[g * dim..], total, dim, kv_n * dim);
        let vg = Mat::strided(&v[g * dim..], total, dim, kv_n * dim);
        let mut s = vec![T::zero(); n * total];
        gemm(qh, kg.t(), &mut s, scale, T::zero());
        for (i, row) in s.chunks_mut(total).enumerate() {
            let visible = start + i + 1;
            let m = row[..visible]
                .iter()
                .fold(T::neg_infinity(), |a, &b| a.max(b));
            let mut z = T::zero();
            for x in row[..visible].iter_mut() {
                *x = (*x - m).exp();
                z += *x;
            }
            for x in row[..visible].iter_mut() {
                *x /= z;
            }
            row[visible..].fill(T::zero());
        }
        let mut oh = vec![T::zero(); n * dim];
        gemm(Mat::new(&s, n, total), vg, &mut oh, T::one(), T::zero());
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
}
// SAFETY: #[repr(C)] plain data laid out like the kernel's `AttnParams`.
unsafe impl cudarc::driver::DeviceRepr for AttnParams {}

const TILE: usize = 64;

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
    if d.head_dim != 64 && d.head_dim != 128 {
        return Err(Error::InvalidArgument(format!(
            "{op}: head_dim {} is not supported by the flash-attention kernels (64 or 128)",
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
    LaunchConfig {
        grid_dim: (max_len.div_ceil(TILE) as u32, heads as u32, seqs as u32),
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
        scale: 1.0 / (d.head_dim as f32).sqrt(),
        ..AttnParams::default()
    };
    let Device::Cuda(ord) = dev else {
        unreachable!("checked")
    };
    let cuda = CudaDevice::get(ord)?;
    let name = if d.head_dim == 64 {
        "flash_fwd_d64"
    } else {
        "flash_fwd_d128"
    };
    let f = cuda.function("attention", name)?;
    let mut b = cuda.stream().launch_builder(&f);
    b.arg(&p);
    // SAFETY: flash_fwd_d*(AttnParams): q/k/v/o/lse checked above ([T, H|Hkv, D] bf16, lse
    // [T, H] f32), cu_seqlens validated (0 .. T, increasing) and on the device; the grid covers
    // the longest sequence; 128 threads as the kernel assumes; all buffers outlive the launch.
    unsafe {
        cuda.launch(
            name,
            b,
            grid(max_len, d.heads, cu_seqlens.len() - 1, 128, 0),
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
        scale: 1.0 / (d.head_dim as f32).sqrt(),
    };
    let Device::Cuda(ord) = dev else {
        unreachable!("checked")
    };
    let cuda = CudaDevice::get(ord)?;
    let suffix = if d.head_dim == 64 { "d64" } else { "d128" };
    let seqs = cu_seqlens.len() - 1;
    // D_i = dO_i · O_i: one warp per (token, head).
    let name: &'static str = if suffix == "d64" {
        "flash_bwd_dsum_d64"
    } else {
        "flash_bwd_dsum_d128"
    };
    let f = cuda.function("attention", name)?;
    let tokens_i = tokens as i32;
    let mut b = cuda.stream().launch_builder(&f);
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
    // dK, dV over key tiles (4 tiles of 64 × D in dynamic shared memory).
    let (name, threads): (&'static str, u32) = if suffix == "d64" {
        ("flash_bwd_dkdv_d64", 128)
    } else {
        ("flash_bwd_dkdv_d128", 256)
    };
    let smem = 4 * TILE * d.head_dim * 2;
    let f = cuda.function_with_shared("attention", name, smem)?;
    let mut b = cuda.stream().launch_builder(&f);
    b.arg(&p);
    // SAFETY: flash_bwd_dkdv_*(AttnParams): every buffer checked above; dsum written by the
    // previous launch on the same stream; `smem` bytes of dynamic shared memory (opted in above)
    // and the thread count the kernel's warp/column split assumes.
    unsafe { cuda.launch(name, b, grid(max_len, d.kv_heads, seqs, threads, smem)) }?;
    // dQ over query tiles.
    let name: &'static str = if suffix == "d64" {
        "flash_bwd_dq_d64"
    } else {
        "flash_bwd_dq_d128"
    };
    let f = cuda.function("attention", name)?;
    let mut b = cuda.stream().launch_builder(&f);
    b.arg(&p);
    // SAFETY: flash_bwd_dq_*(AttnParams): as above; 128 threads.
    unsafe { cuda.launch(name, b, grid(max_len, d.heads, seqs, 128, 0)) }?;
    Ok((dq, dk, dv))
}
