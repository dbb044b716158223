//! Tensor-core GEMMs on CUDA (`kernels/gemm.cu`): the three products of a linear layer, the
//! NF4 variants that dequantize W inside the kernel, and the fused LoRA forward/backward.
//!
//! For `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ` (x `[T, in]`, W `[out, in]`, A `[r, in]`, B `[out, r]`):
//! ```text
//! forward   xa = s·x·Aᵀ                  gemm NT  [T, r]      (kept for the backward)
//!           y  = x·Wᵀ + xa·Bᵀ            NF4 GEMM NT with the adapter as a second k-phase
//! backward  g  = s·dy·B                  gemm NN  [T, r]
//!           dx = dy·W + g·A              NF4 GEMM NN with the adapter as a second k-phase
//!           dA += gᵀ·x                   gemm TN  [r, in]  fp32, split-K over T
//!           dB += dyᵀ·xa                 gemm TN  [out, r] fp32, split-K over T
//! ```
//! With LoRA dropout (x̃ = x ⊙ m feeds the adapter) `dA += gᵀ·x̃`, and the adapter's part of dx
//! is masked, `(g·A) ⊙ m`, so it is a separate gemm NN added after the NF4 GEMM.
//! Every GEMM accumulates in fp32; `C = alpha·A·B + beta·C`. The CPU reference of all of it is
//! `ops::linear` (and `ops::matmul` for the plain products). Requirements, checked here: bf16
//! operands, contiguous dimensions multiples of 8 (16 for NF4 weights), rank a multiple of 8 for
//! the fused adapter (the CUDA step zero-pads other ranks: `LoraParams::padded_to_rank`).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{check_tensor, cuda_ordinal};
use crate::device::cuda::{grid_1d, CudaDevice};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::quant::nf4::{Absmax, Nf4Tensor};
use crate::tensor::{shape_str, DType, Tensor};

const TILE: usize = 128;
const BK: usize = 32;
const STAGES: usize = 3;
const THREADS: u32 = 256;
/// Rows at or below which the NF4 forward takes the memory-bound small-M kernel.
pub const SMALL_M: usize = 16;

/// Which product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `C[M,N] = A[M,K]·B[N,K]ᵀ` (forward: y = x·Wᵀ).
    Nt,
    /// `C[M,N] = A[M,K]·B[K,N]` (input gradient: dx = dy·W).
    Nn,
    /// `C[M,N] = A[K,M]ᵀ·B[K,N]` (weight-shaped gradient: dW = dyᵀ·x).
    Tn,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct GemmParams {
    a: u64,
    b: u64,
    c: u64,
    partial: u64,
    a2: u64,
    b2: u64,
    lda: i64,
    ldb: i64,
    ldc: i64,
    lda2: i64,
    ldb2: i64,
    m: i32,
    n: i32,
    k: i32,
    k2: i32,
    k_tiles_per_split: i32,
    alpha: f32,
    beta: f32,
}
// SAFETY: #[repr(C)] plain data laid out like the kernel's `GemmParams`.
unsafe impl cudarc::driver::DeviceRepr for GemmParams {}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Nf4Params {
    packed: u64,
    absmax: u64,
    absmax_q: u64,
    absmax2: u64,
    offset: u64,
    code2: u64,
    code: u64,
    rows: i64,
    cols: i64,
    /// log2 of the blocksize (a power of two: `nf4::check_blocksize`), so the kernels find an
    /// element's block with a shift.
    blocksize_log2: i32,
}
// SAFETY: #[repr(C)] plain data laid out like the kernel's `Nf4Params`.
unsafe impl cudarc::driver::DeviceRepr for Nf4Params {}

fn dims2(op: &'static str, name: &str, t: &Tensor) -> Result<(usize, usize)> {
    match t.shape() {
        [a, b] => Ok((*a, *b)),
        other => Err(Error::ShapeMismatch {
            op,
            expected: format!("{name}: a matrix"),
            got: shape_str(other),
        }),
    }
}

fn multiple_of(op: &'static str, what: &str, v: usize, m: usize) -> Result<()> {
    if v % m == 0 {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{op}: {what} ({v}) must be a multiple of {m} for the tensor-core kernels"
        )))
    }
}

/// The kernels copy A and B (and the adapter's views) in 16-byte chunks (`cp.async`, `uint4`
/// loads) and store C one element at a time: a raw address they are given must be aligned to
/// that, or the card faults (misaligned address) after the launch, far from the cause.
fn aligned(op: &'static str, what: &str, addr: u64, bytes: u64) -> Result<()> {
    if addr % bytes == 0 {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{op}: {what}'s device address 0x{addr:x} must be {bytes}-byte aligned"
        )))
    }
}

/// A row length must hold the dimension stored along it.
fn holds(op: &'static str, what: &str, ld: usize, dim: usize) -> Result<()> {
    if ld >= dim {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{op}: {what}'s row length ({ld}) is shorter than the {dim} elements each row holds"
        )))
    }
}

fn launch_cfg(m: usize, n: usize, splits: usize, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            n.div_ceil(TILE) as u32,
            m.div_ceil(TILE) as u32,
            splits as u32,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

/// Split-K factor: enough blocks to fill the GPU twice when the output has few tiles.
fn split_k(dev: &CudaDevice, m: usize, n: usize, k: usize) -> usize {
    let tiles = m.div_ceil(TILE) * n.div_ceil(TILE);
    let k_tiles = k.div_ceil(BK);
    let want = (2 * dev.multiprocessor_count()).div_ceil(tiles);
    want.clamp(1, (k_tiles / 4).clamp(1, 32))
}

/// `C = alpha·op(A)·op(B) + beta·C` (A, B bf16; C bf16 or f32, of shape `[M, N]`). K is split
/// across blocks (deterministically, reduced in order) when the card has more SMs than the output
/// has tiles; see [`gemm_cuda_split`] to fix the split.
pub fn gemm_cuda(
    layout: Layout,
    a: &Tensor,
    b: &Tensor,
    c: &mut Tensor,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    gemm_cuda_split(layout, a, b, c, alpha, beta, None)
}

/// [`gemm_cuda`] with the split-K count pinned: `Some(1)` never splits (the NF4 kernels never do,
/// so their results equal it bit for bit on every card), `Some(s)` splits K into at most `s`
/// parts, `None` chooses from the card's SM count. The split changes the order of the fp32 sums,
/// so results depend on it by rounding only.
pub fn gemm_cuda_split(
    layout: Layout,
    a: &Tensor,
    b: &Tensor,
    c: &mut Tensor,
    alpha: f32,
    beta: f32,
    splits: Option<usize>,
) -> Result<()> {
    let op = "gemm (cuda)";
    let o = cuda_ordinal(op, a)?;
    let dev = Device::Cuda(o);
    let (a0, a1) = dims2(op, "A", a)?;
    let (b0, b1) = dims2(op, "B", b)?;
    let (m, k, n) = match layout {
        Layout::Nt => (a0, a1, b0),
        Layout::Nn => (a0, a1, b1),
        Layout::Tn => (a1, a0, b1),
    };
    let (bk_rows, bk_cols) = match layout {
        Layout::Nt => (n, k),
        _ => (k, n),
    };
    check_tensor(op, "A", a, DType::BF16, &[a0, a1], dev)?;
    check_tensor(op, "B", b, DType::BF16, &[bk_rows, bk_cols], dev)?;
    let out = c.dtype();
    if out != DType::BF16 && out != DType::F32 {
        return Err(Error::DTypeMismatch {
            op,
            expected: "C: bf16 or f32".into(),
            got: out.to_string(),
        });
    }
    check_tensor(op, "C", c, out, &[m, n], dev)?;
    // Contiguous dimensions: A's rows (a1), B's rows (b1), and C's rows (n, for the epilogue).
    multiple_of(op, "A's row length", a1, 8)?;
    multiple_of(op, "B's row length", b1, 8)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    // SAFETY: the pointers come from the tensors checked above, with their row lengths as
    // leading dimensions; they outlive the stream-ordered launches.
    unsafe {
        gemm_ptrs_split(
            o,
            layout,
            [a.device_ptr(), b.device_ptr(), c.device_ptr()],
            [a1, b1, n],
            [m, n, k],
            out,
            alpha,
            beta,
            splits,
        )
    }
}

/// [`gemm_cuda`] on raw device addresses (row blocks of larger buffers, e.g. one chunk of
/// tokens). `lda`/`ldb`/`ldc` are row lengths in elements; multiples of 8 for A and B (16-byte
/// rows). A row may be longer than the dimension it holds (K, or M/N for a transposed operand);
/// nothing past that dimension is read, so the padding may hold anything.
///
/// # Safety
/// Each pointer must address a live bf16 (A, B) or `out`-typed (C) buffer of at least
/// `rows × ld` elements for the shape `layout` implies (A `[M,K]` or `[K,M]`, B `[N,K]` or
/// `[K,N]`, C `[M,N]`), 16-byte aligned rows, on device `ordinal`, alive until the work runs.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_ptrs(
    ordinal: usize,
    layout: Layout,
    a: u64,
    lda: usize,
    b: u64,
    ldb: usize,
    c: u64,
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    out: DType,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        gemm_ptrs_split(
            ordinal,
            layout,
            [a, b, c],
            [lda, ldb, ldc],
            [m, n, k],
            out,
            alpha,
            beta,
            None,
        )
    }
}

/// [`gemm_ptrs`] with pointers `[A, B, C]`, row lengths `[lda, ldb, ldc]`, `[M, N, K]` and the
/// split-K count (see [`gemm_cuda_split`]).
///
/// # Safety
/// As [`gemm_ptrs`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_ptrs_split(
    ordinal: usize,
    layout: Layout,
    [a, b, c]: [u64; 3],
    [lda, ldb, ldc]: [usize; 3],
    [m, n, k]: [usize; 3],
    out: DType,
    alpha: f32,
    beta: f32,
    splits: Option<usize>,
) -> Result<()> {
    let op = "gemm (cuda)";
    multiple_of(op, "A's row length", lda, 8)?;
    multiple_of(op, "B's row length", ldb, 8)?;
    // The dimension along each operand's rows: A [M,K] / [K,M], B [N,K] / [K,N], C [M,N].
    let (a_row, b_row) = match layout {
        Layout::Nt => (k, k),
        Layout::Nn => (k, n),
        Layout::Tn => (m, n),
    };
    holds(op, "A", lda, a_row)?;
    holds(op, "B", ldb, b_row)?;
    holds(op, "C", ldc, n)?;
    aligned(op, "A", a, 16)?;
    aligned(op, "B", b, 16)?;
    aligned(op, "C", c, out.size_in_bytes() as u64)?;
    if splits == Some(0) {
        return Err(Error::InvalidArgument(format!(
            "{op}: a split-K count of 0 (1 means no split)"
        )));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    let dev = Device::Cuda(ordinal);
    let cuda = CudaDevice::get(ordinal)?;
    let splits = match splits {
        _ if k == 0 => 1,
        Some(s) => s,
        None => split_k(&cuda, m, n, k),
    };
    let k_tiles = k.div_ceil(BK).max(1);
    let per_split = k_tiles.div_ceil(splits);
    let splits = k_tiles.div_ceil(per_split);
    let workspace = if splits > 1 {
        Some(Tensor::uninit(&[splits * m * n], DType::F32, &dev)?)
    } else {
        None
    };
    let params = GemmParams {
        a,
        b,
        c,
        partial: workspace.as_ref().map_or(0, |w| w.device_ptr()),
        lda: lda as i64,
        ldb: ldb as i64,
        ldc: ldc as i64,
        m: m as i32,
        n: n as i32,
        k: k as i32,
        k_tiles_per_split: per_split as i32,
        alpha,
        beta,
        ..GemmParams::default()
    };
    let name = match (layout, out) {
        (Layout::Nt, DType::BF16) => "gemm_nt_bf16",
        (Layout::Nt, _) => "gemm_nt_f32",
        (Layout::Nn, DType::BF16) => "gemm_nn_bf16",
        (Layout::Nn, _) => "gemm_nn_f32",
        (Layout::Tn, DType::BF16) => "gemm_tn_bf16",
        (Layout::Tn, _) => "gemm_tn_f32",
    };
    let smem = 2 * STAGES * TILE * BK * 2;
    let f = cuda.function_with_shared("gemm", name, smem)?;
    let mut bld = cuda.stream().launch_builder(&f);
    bld.arg(&params);
    // SAFETY: the caller's contract covers the pointers and shapes; the workspace holds
    // splits·M·N floats; the kernel needs `smem` bytes of dynamic shared memory (allowed above)
    // and 256 threads, which cfg gives.
    unsafe { cuda.launch(name, bld, launch_cfg(m, n, splits, smem)) }?;
    if let Some(ws) = workspace {
        let red = if out == DType::BF16 {
            "gemm_splitk_reduce_bf16"
        } else {
            "gemm_splitk_reduce_f32"
        };
        let f = cuda.function("gemm", red)?;
        let (splits_i, m_i, n_i, ldc_i) = (splits as i32, m as i32, n as i32, ldc as i64);
        let mut bld = cuda.stream().launch_builder(&f);
        bld.arg(ws.cuda_slice::<f32>(op)?)
            .arg(&splits_i)
            .arg(&c)
            .arg(&m_i)
            .arg(&n_i)
            .arg(&ldc_i)
            .arg(&alpha)
            .arg(&beta);
        // SAFETY: gemm_splitk_reduce_*(const float*, int, T*, int, int, long long, float,
        // float): the workspace holds splits·M·N floats written by the GEMM above on the same
        // stream; C is the caller's [M, N] buffer with row length ldc.
        unsafe { cuda.launch(red, bld, grid_1d(m * n, 256)) }?;
    }
    Ok(())
}

fn nf4_params(w: &Nf4Tensor) -> Result<Nf4Params> {
    let (rows, cols) = match w.shape.as_slice() {
        [r, c] => (*r, *c),
        other => {
            return Err(Error::ShapeMismatch {
                op: "nf4 gemm",
                expected: "a 2-D NF4 weight".into(),
                got: shape_str(other),
            })
        }
    };
    w.validate()?;
    let mut p = Nf4Params {
        packed: w.packed.device_ptr(),
        code: w.code.device_ptr(),
        rows: rows as i64,
        cols: cols as i64,
        blocksize_log2: w.blocksize.trailing_zeros() as i32,
        ..Nf4Params::default()
    };
    match &w.absmax {
        Absmax::Plain(a) => p.absmax = a.device_ptr(),
        Absmax::Double {
            q,
            absmax2,
            offset,
            code2,
        } => {
            p.absmax_q = q.device_ptr();
            p.absmax2 = absmax2.device_ptr();
            p.offset = offset.device_ptr();
            p.code2 = code2.device_ptr();
        }
    }
    Ok(p)
}

/// `y = x·Wᵀ` (+ `xa·Bᵀ` with `adapter = Some((xa, b))`): x bf16 `[M, K]`, W NF4 `[N, K]`,
/// xa bf16 `[M, r]` (already scaled by s), b bf16 `[N, r]`; y bf16 `[M, N]`. For M ≤ 16
/// (generation, tiny batches) a memory-bound kernel streams W once instead of the tensor-core
/// tiles.
pub fn nf4_forward_cuda(
    x: &Tensor,
    w: &Nf4Tensor,
    adapter: Option<(&Tensor, &Tensor)>,
) -> Result<Tensor> {
    let op = "nf4 gemm forward (cuda)";
    let o = cuda_ordinal(op, x)?;
    let dev = Device::Cuda(o);
    let (m, k) = dims2(op, "x", x)?;
    let p = nf4_params(w)?;
    let n = p.rows as usize;
    if p.cols as usize != k || w.device() != dev {
        return Err(Error::ShapeMismatch {
            op,
            expected: format!("W [N, {k}] on {dev}"),
            got: format!("{} on {}", shape_str(&w.shape), w.device()),
        });
    }
    check_tensor(op, "x", x, DType::BF16, &[m, k], dev)?;
    multiple_of(op, "in_features", k, 16)?;
    let y = Tensor::uninit(&[m, n], DType::BF16, &dev)?;
    let mut g = GemmParams {
        a: x.device_ptr(),
        c: y.device_ptr(),
        lda: k as i64,
        ldc: n as i64,
        m: m as i32,
        n: n as i32,
        k: k as i32,
        k_tiles_per_split: k.div_ceil(BK) as i32,
        alpha: 1.0,
        beta: 0.0,
        ..GemmParams::default()
    };
    if let Some((xa, b)) = adapter {
        let r = xa.shape().get(1).copied().unwrap_or(0);
        check_tensor(op, "x·Aᵀ", xa, DType::BF16, &[m, r], dev)?;
        check_tensor(op, "lora_B", b, DType::BF16, &[n, r], dev)?;
        multiple_of(op, "LoRA rank", r, 8)?;
        g.a2 = xa.device_ptr();
        g.b2 = b.device_ptr();
        g.lda2 = r as i64;
        g.ldb2 = r as i64;
        g.k2 = r as i32;
    }
    nf4_forward_launch(o, g, p, y)
}

/// The launch half of [`nf4_forward_cuda`] (`g` filled and checked by the caller).
fn nf4_forward_launch(o: usize, g: GemmParams, p: Nf4Params, y: Tensor) -> Result<Tensor> {
    let (m, n) = (g.m as usize, g.n as usize);
    if m == 0 || n == 0 {
        return Ok(y);
    }
    if m <= SMALL_M {
        let cuda = CudaDevice::get(o)?;
        let name = "gemm_nf4_small_m_bf16";
        let f = cuda.function("gemm", name)?;
        let mut bld = cuda.stream().launch_builder(&f);
        bld.arg(&g).arg(&p);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(32) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: gemm_nf4_small_m_bf16(GemmParams, Nf4Params): M ≤ 16 rows of x (the kernel's
        // staging buffer holds 16), the other pointers as for the tensor-core path; 32 output
        // columns per block of 256 threads.
        return unsafe { cuda.launch(name, bld, cfg) }.map(|_| y);
    }
    launch_nf4(o, "gemm_nf4_nt_bf16", g, p, m, n)?;
    Ok(y)
}

/// `dx = dy·W`: dy bf16 `[M, N_out]`, W NF4 `[N_out, N_in]`; dx bf16 `[M, N_in]`.
pub fn nf4_dx_cuda(dy: &Tensor, w: &Nf4Tensor) -> Result<Tensor> {
    // SAFETY: no adapter term, so the kernel reads only the checked tensors.
    unsafe { nf4_dx(dy, w, None, 0.0, None) }
}

/// [`nf4_dx_cuda`] written into `out` (bf16 `[M, N_in]`, overwritten whole), e.g. the buffer of
/// the layer input x once nothing needs x any more: one `[M, N_in]` tensor fewer at that point.
pub fn nf4_dx_into(dy: &Tensor, w: &Nf4Tensor, out: Tensor) -> Result<Tensor> {
    // SAFETY: as in nf4_dx_cuda.
    unsafe { nf4_dx(dy, w, Some(out), 0.0, None) }
}

/// `acc + dy·W` into `acc` (bf16 `[M, N_in]`): a gradient that meets others (q, k and v into
/// their input) summed in the GEMM's epilogue (β = 1), with no temporary and one rounding.
pub fn nf4_dx_acc(dy: &Tensor, w: &Nf4Tensor, acc: Tensor) -> Result<Tensor> {
    // SAFETY: as in nf4_dx_cuda.
    unsafe { nf4_dx(dy, w, Some(acc), 1.0, None) }
}

/// The adapter's input gradient `g·A` as the NF4 dX kernel's second phase of K, so that
/// `dx = dy·W + g·A` is one GEMM: `g = s·dy·B` bf16 `[M, r]` and the LoRA A bf16 `[r, N_in]`
/// (device addresses, contiguous rows, r a multiple of 8).
#[derive(Clone, Copy)]
struct DxAdapter {
    g: u64,
    a: u64,
    r: usize,
}

/// # Safety
/// With `adapter`, its addresses must hold live bf16 `[M, r]` and `[r, N_in]` matrices on dy's
/// device until the stream's work is done (shapes are the caller's to check).
unsafe fn nf4_dx(
    dy: &Tensor,
    w: &Nf4Tensor,
    out: Option<Tensor>,
    beta: f32,
    adapter: Option<DxAdapter>,
) -> Result<Tensor> {
    let op = "nf4 gemm dx (cuda)";
    let o = cuda_ordinal(op, dy)?;
    let dev = Device::Cuda(o);
    let (m, k) = dims2(op, "dy", dy)?;
    let p = nf4_params(w)?;
    let n = p.cols as usize;
    if p.rows as usize != k || w.device() != dev {
        return Err(Error::ShapeMismatch {
            op,
            expected: format!("W [{k}, N] on {dev}"),
            got: format!("{} on {}", shape_str(&w.shape), w.device()),
        });
    }
    check_tensor(op, "dy", dy, DType::BF16, &[m, k], dev)?;
    multiple_of(op, "out_features", k, 8)?;
    multiple_of(op, "in_features", n, 16)?;
    let dx = match out {
        Some(t) => {
            check_tensor(op, "dx (output)", &t, DType::BF16, &[m, n], dev)?;
            t
        }
        None => Tensor::uninit(&[m, n], DType::BF16, &dev)?,
    };
    if m == 0 || n == 0 {
        return Ok(dx);
    }
    let mut g = GemmParams {
        a: dy.device_ptr(),
        c: dx.device_ptr(),
        lda: k as i64,
        ldc: n as i64,
        m: m as i32,
        n: n as i32,
        k: k as i32,
        k_tiles_per_split: k.div_ceil(BK) as i32,
        alpha: 1.0,
        beta,
        ..GemmParams::default()
    };
    if let Some(ad) = adapter {
        multiple_of(op, "LoRA rank", ad.r, 8)?;
        g.a2 = ad.g;
        g.lda2 = ad.r as i64;
        g.b2 = ad.a;
        g.ldb2 = n as i64;
        g.k2 = ad.r as i32;
    }
    launch_nf4(o, "gemm_nf4_nn_bf16", g, p, m, n)?;
    Ok(dx)
}

fn launch_nf4(
    o: usize,
    name: &'static str,
    g: GemmParams,
    p: Nf4Params,
    m: usize,
    n: usize,
) -> Result<()> {
    let cuda = CudaDevice::get(o)?;
    let smem = (STAGES + 2) * TILE * BK * 2;
    let f = cuda.function_with_shared("gemm", name, smem)?;
    let mut bld = cuda.stream().launch_builder(&f);
    bld.arg(&g).arg(&p);
    // SAFETY: gemm_nf4_*(GemmParams, Nf4Params): the pointers come from tensors checked by the
    // callers (x/dy bf16 [M, K], the output bf16 [M, N], the NF4 parts validated against W's
    // shape), alive until the stream-ordered work is done; `smem` bytes of dynamic shared memory
    // (3 A stages + 2 B buffers) and 256 threads, as the kernel expects.
    unsafe { cuda.launch(name, bld, launch_cfg(m, n, 1, smem)) }
}

/// The adapter of one layer on the device: A `[r, in]` and B `[out, r]` in bf16 (copies of the
/// fp32 master weights, refreshed after each optimizer step), and its scale.
pub struct LoraCuda<'a> {
    /// A, bf16 `[r, in]`.
    pub a: &'a Tensor,
    /// B, bf16 `[out, r]`.
    pub b: &'a Tensor,
    /// The adapter scale s ([`crate::model::lora::LoraConfig::scale`]).
    pub scale: f32,
}

/// Forward of an NF4 linear layer with its adapter: returns `(y, xa)` with `xa = s·x·Aᵀ`.
pub fn lora_forward_cuda(x: &Tensor, w: &Nf4Tensor, lora: &LoraCuda) -> Result<(Tensor, Tensor)> {
    let (m, _) = dims2("lora forward (cuda)", "x", x)?;
    let r = lora.a.shape().first().copied().unwrap_or(0);
    let mut xa = Tensor::uninit(&[m, r], DType::BF16, &x.device())?;
    gemm_cuda(Layout::Nt, x, lora.a, &mut xa, lora.scale, 0.0)?;
    let y = nf4_forward_cuda(x, w, Some((&xa, lora.b)))?;
    Ok((y, xa))
}

/// Backward of [`lora_forward_cuda`]: returns dx and accumulates `dA` / `dB` (fp32, shaped like
/// A and B) into `grad_a` / `grad_b`.
pub fn lora_backward_cuda(
    x: &Tensor,
    w: &Nf4Tensor,
    lora: &LoraCuda,
    xa: &Tensor,
    dy: &Tensor,
    grad_a: &mut Tensor,
    grad_b: &mut Tensor,
) -> Result<Tensor> {
    let op = "lora backward (cuda)";
    let (m, _) = dims2(op, "dy", dy)?;
    let r = lora.a.shape().first().copied().unwrap_or(0);
    let mut g = Tensor::uninit(&[m, r], DType::BF16, &dy.device())?;
    gemm_cuda(Layout::Nn, dy, lora.b, &mut g, lora.scale, 0.0)?; // g = s·dy·B
    check_tensor(
        op,
        "lora_A",
        lora.a,
        DType::BF16,
        &[r, w.shape.get(1).copied().unwrap_or(0)],
        dy.device(),
    )?;
    let adapter = DxAdapter {
        g: g.device_ptr(),
        a: lora.a.device_ptr(),
        r,
    };
    // SAFETY: g [M, r] and A [r, N_in] are live bf16 tensors on dy's device (checked above).
    let dx = unsafe { nf4_dx(dy, w, None, 0.0, Some(adapter))? }; // dy·W + g·A
    gemm_cuda(Layout::Tn, &g, x, grad_a, 1.0, 1.0)?; // dA += gᵀ·x = s·(dy·B)ᵀ·x
    gemm_cuda(Layout::Tn, dy, xa, grad_b, 1.0, 1.0)?; // dB += dyᵀ·xa
    Ok(dx)
}

/// A bf16 matrix on the device by address: a view into a larger buffer (one adapter of the
/// flat bf16 mirror of the LoRA parameters).
#[derive(Clone, Copy, Debug)]
pub struct DevMat {
    /// Device address of element `[0, 0]`; the matrix is contiguous and row-major.
    pub ptr: u64,
    /// Number of rows.
    pub rows: usize,
    /// Number of columns (the row stride, in elements).
    pub cols: usize,
}

/// One adapter as views into the flat buffers: A `[r, in]` and B `[out, r]` (bf16 mirror), and
/// where their fp32 gradients accumulate; with `dropout = Some((p, seed))` the adapter sees
/// `x̃ = x ⊙ m` (the mask redrawn from the seed in the backward).
#[derive(Clone, Copy, Debug)]
pub struct LoraView {
    /// A, `[r, in]`.
    pub a: DevMat,
    /// B, `[out, r]`.
    pub b: DevMat,
    /// Device address of dA, fp32 `[r, in]`, accumulated into (`+=`).
    pub grad_a: u64,
    /// Device address of dB, fp32 `[out, r]`, accumulated into (`+=`).
    pub grad_b: u64,
    /// The adapter scale s.
    pub scale: f32,
    /// Dropout probability p and the projection's mask seed ([`super::dropout::stream_seed`]);
    /// `None` for no dropout.
    pub dropout: Option<(f32, u64)>,
}

/// Checks an adapter view against its layer (W `[out, in]`, x with `k` = in features): A
/// `[r, in]`, B `[out, r]` with r a multiple of 8, A and B 16-byte aligned (the kernels copy
/// them in 16-byte chunks), the fp32 gradients 4-byte aligned, no null address. Returns r.
fn check_view(op: &'static str, l: &LoraView, w: &Nf4Tensor, k: usize) -> Result<usize> {
    let n = w.shape.first().copied().unwrap_or(0);
    let r = l.a.rows;
    if l.a.cols != k || l.b.rows != n || l.b.cols != r || w.shape != [n, k] {
        return Err(Error::ShapeMismatch {
            op,
            expected: format!("A [r, {k}], B [{n}, r], W [{n}, {k}] (x has {k} features)"),
            got: format!(
                "A [{r}, {}], B [{}, {}], W {}",
                l.a.cols,
                l.b.rows,
                l.b.cols,
                shape_str(&w.shape)
            ),
        });
    }
    multiple_of(op, "LoRA rank", r, 8)?;
    multiple_of(op, "in_features", k, 16)?;
    for (what, addr, bytes) in [
        ("A", l.a.ptr, 16),
        ("B", l.b.ptr, 16),
        ("dA", l.grad_a, 4),
        ("dB", l.grad_b, 4),
    ] {
        if addr == 0 {
            return Err(Error::InvalidArgument(format!(
                "{op}: the adapter's {what} view has a null device address"
            )));
        }
        aligned(op, what, addr, bytes)?;
    }
    Ok(r)
}

/// `C = alpha·A·B + beta·C` on addresses, for the views below (bf16 out unless `f32_out`).
///
/// # Safety
/// As [`gemm_ptrs`].
#[allow(clippy::too_many_arguments)]
unsafe fn mm(
    o: usize,
    layout: Layout,
    a: u64,
    lda: usize,
    b: u64,
    ldb: usize,
    c: u64,
    ldc: usize,
    mnk: (usize, usize, usize),
    f32_out: bool,
    alpha: f32,
    beta: f32,
) -> Result<()> {
    let out = if f32_out { DType::F32 } else { DType::BF16 };
    // SAFETY: forwarded from the caller's contract.
    unsafe {
        gemm_ptrs(
            o, layout, a, lda, b, ldb, c, ldc, mnk.0, mnk.1, mnk.2, out, alpha, beta,
        )
    }
}

/// [`lora_forward_cuda`] for an adapter given as views. Returns `(y, xa = s·x̃·Aᵀ)`.
///
/// # Safety
/// The view's addresses are read and written by kernels as given: `l.a` and `l.b` must point
/// into live bf16 device memory on x's device holding A `[r, in]` and B `[out, r]`, and
/// `l.grad_a`/`l.grad_b` into live fp32 memory of the same shapes, until the stream's work is
/// done (the launcher checks shapes, alignment and null addresses, not what they point to).
pub unsafe fn lora_forward_view(
    x: &Tensor,
    w: &Nf4Tensor,
    l: &LoraView,
) -> Result<(Tensor, Tensor)> {
    let op = "lora forward (cuda)";
    let o = cuda_ordinal(op, x)?;
    let (m, k) = dims2(op, "x", x)?;
    let n = w.shape.first().copied().unwrap_or(0);
    let r = check_view(op, l, w, k)?;
    check_tensor(op, "x", x, DType::BF16, &[m, k], Device::Cuda(o))?;
    let xa = adapter_input(o, x, l, (m, k, r))?;
    let p = nf4_params(w)?;
    let y = Tensor::uninit(&[m, n], DType::BF16, &x.device())?;
    let g = GemmParams {
        a: x.device_ptr(),
        c: y.device_ptr(),
        a2: xa.device_ptr(),
        b2: l.b.ptr,
        lda: k as i64,
        ldc: n as i64,
        lda2: r as i64,
        ldb2: r as i64,
        m: m as i32,
        n: n as i32,
        k: k as i32,
        k2: r as i32,
        k_tiles_per_split: k.div_ceil(BK) as i32,
        alpha: 1.0,
        beta: 0.0,
        ..GemmParams::default()
    };
    let y = nf4_forward_launch(o, g, p, y)?;
    Ok((y, xa))
}

/// `xa = s·x̃·Aᵀ` alone (`x̃` the dropped-out x): what the backward of the layer needs from its
/// forward, without the layer's output (the replay of a layer whose output nothing reads).
///
/// # Safety
/// The view's addresses are read and written by kernels as given: `l.a` and `l.b` must point
/// into live bf16 device memory on x's device holding A `[r, in]` and B `[out, r]`, and
/// `l.grad_a`/`l.grad_b` into live fp32 memory of the same shapes, until the stream's work is
/// done (the launcher checks shapes, alignment and null addresses, not what they point to).
pub unsafe fn lora_xa_view(x: &Tensor, w: &Nf4Tensor, l: &LoraView) -> Result<Tensor> {
    let op = "lora x·Aᵀ (cuda)";
    let o = cuda_ordinal(op, x)?;
    let (m, k) = dims2(op, "x", x)?;
    let r = check_view(op, l, w, k)?;
    check_tensor(op, "x", x, DType::BF16, &[m, k], Device::Cuda(o))?;
    adapter_input(o, x, l, (m, k, r))
}

/// `s·x̃·Aᵀ` for a checked view (x `[M, K]` bf16 on device `o`, rank r).
fn adapter_input(
    o: usize,
    x: &Tensor,
    l: &LoraView,
    (m, k, r): (usize, usize, usize),
) -> Result<Tensor> {
    let xa = Tensor::uninit(&[m, r], DType::BF16, &x.device())?;
    let dropped = match l.dropout {
        Some((p, seed)) => Some(super::dropout::dropout_cuda(x, p, seed)?),
        None => None,
    };
    let x_ad = dropped.as_ref().unwrap_or(x);
    // SAFETY: x (and its dropout) [M, K] bf16, A a live [r, K] bf16 view (checked by
    // `check_view`), xa [M, r]; all on device `o`.
    unsafe {
        mm(
            o,
            Layout::Nt,
            x_ad.device_ptr(),
            k,
            l.a.ptr,
            k,
            xa.device_ptr(),
            r,
            (m, r, k),
            false,
            l.scale,
            0.0,
        )?
    };
    Ok(xa)
}

/// [`lora_backward_cuda`] for an adapter given as views: returns dx; dA, dB accumulate (fp32)
/// at the views' gradient addresses. With dropout, `dx += (s·(dy·B)·A) ⊙ m` and
/// `dA += s·(dy·B)ᵀ·x̃`.
///
/// # Safety
/// The view's addresses are read and written by kernels as given: `l.a` and `l.b` must point
/// into live bf16 device memory on x's device holding A `[r, in]` and B `[out, r]`, and
/// `l.grad_a`/`l.grad_b` into live fp32 memory of the same shapes, until the stream's work is
/// done (the launcher checks shapes, alignment and null addresses, not what they point to).
pub unsafe fn lora_backward_view(
    x: &Tensor,
    w: &Nf4Tensor,
    l: &LoraView,
    xa: &Tensor,
    dy: &Tensor,
) -> Result<Tensor> {
    // SAFETY: forwarded from the caller's contract.
    unsafe { lora_backward(LayerInput::Kept(x), w, l, xa, dy) }
}

/// [`lora_backward_view`] for a layer input that nothing needs afterwards: dx (the same shape)
/// is written over it, so the backward holds one `[M, K]` tensor fewer (the MLP down
/// projection's input is `[T, F]`, the largest activation of a layer).
///
/// # Safety
/// The view's addresses are read and written by kernels as given: `l.a` and `l.b` must point
/// into live bf16 device memory on x's device holding A `[r, in]` and B `[out, r]`, and
/// `l.grad_a`/`l.grad_b` into live fp32 memory of the same shapes, until the stream's work is
/// done (the launcher checks shapes, alignment and null addresses, not what they point to).
pub unsafe fn lora_backward_view_over_x(
    x: Tensor,
    w: &Nf4Tensor,
    l: &LoraView,
    xa: &Tensor,
    dy: &Tensor,
) -> Result<Tensor> {
    // SAFETY: forwarded from the caller's contract.
    unsafe { lora_backward(LayerInput::Spent(x), w, l, xa, dy) }
}

/// [`lora_backward_view`] with dx added into `acc` (bf16, x's shape), the gradient the input
/// already has from other consumers: `acc + dy·W + s·(dy·B)·A` in the NF4 GEMM's epilogue
/// (β = 1), with no `[M, K]` temporary (one with dropout, for the masked adapter term).
///
/// # Safety
/// The view's addresses are read and written by kernels as given: `l.a` and `l.b` must point
/// into live bf16 device memory on x's device holding A `[r, in]` and B `[out, r]`, and
/// `l.grad_a`/`l.grad_b` into live fp32 memory of the same shapes, until the stream's work is
/// done (the launcher checks shapes, alignment and null addresses, not what they point to).
pub unsafe fn lora_backward_view_acc(
    x: &Tensor,
    w: &Nf4Tensor,
    l: &LoraView,
    xa: &Tensor,
    dy: &Tensor,
    acc: Tensor,
) -> Result<Tensor> {
    // SAFETY: forwarded from the caller's contract.
    unsafe { lora_backward(LayerInput::Accumulate(x, acc), w, l, xa, dy) }
}

/// The layer input of a backward: still needed by the caller, spent (its buffer takes dx), or
/// kept with a gradient to add dx into.
enum LayerInput<'a> {
    Kept(&'a Tensor),
    Spent(Tensor),
    Accumulate(&'a Tensor, Tensor),
}

/// # Safety
/// As [`lora_backward_view`].
unsafe fn lora_backward(
    input: LayerInput<'_>,
    w: &Nf4Tensor,
    l: &LoraView,
    xa: &Tensor,
    dy: &Tensor,
) -> Result<Tensor> {
    let op = "lora backward (cuda)";
    let x = match &input {
        LayerInput::Kept(x) | LayerInput::Accumulate(x, _) => *x,
        LayerInput::Spent(x) => x,
    };
    let o = cuda_ordinal(op, dy)?;
    let (m, n) = dims2(op, "dy", dy)?;
    let (_, k) = dims2(op, "x", x)?;
    if w.shape.first() != Some(&n) {
        return Err(Error::ShapeMismatch {
            op,
            expected: format!("dy [{m}, out] for W [out, in] = {}", shape_str(&w.shape)),
            got: shape_str(dy.shape()),
        });
    }
    let r = check_view(op, l, w, k)?;
    check_tensor(op, "dy", dy, DType::BF16, &[m, n], Device::Cuda(o))?;
    check_tensor(op, "x", x, DType::BF16, &[m, k], Device::Cuda(o))?;
    check_tensor(op, "x·Aᵀ", xa, DType::BF16, &[m, r], Device::Cuda(o))?;
    // The adapter's gradients first, while x is intact; dx after, perhaps over x.
    let g = Tensor::uninit(&[m, r], DType::BF16, &dy.device())?;
    // SAFETY (every call below): dy [M, N], B view [N, r], g [M, r], A view [r, K], dx and the
    // adapter term [M, K], x and its dropout [M, K], xa [M, r], the gradient views [r, K] and
    // [N, r] fp32: shapes checked above and by `check_view`; all on device `o`.
    unsafe {
        // g = s·dy·B
        mm(
            o,
            Layout::Nn,
            dy.device_ptr(),
            n,
            l.b.ptr,
            r,
            g.device_ptr(),
            r,
            (m, r, n),
            false,
            l.scale,
            0.0,
        )?;
        // dB += dyᵀ·xa
        mm(
            o,
            Layout::Tn,
            dy.device_ptr(),
            n,
            xa.device_ptr(),
            r,
            l.grad_b,
            r,
            (n, r, m),
            true,
            1.0,
            1.0,
        )?;
    }
    // dA += gᵀ·x̃ = s·(dy·B)ᵀ·x̃
    let x_ad = match l.dropout {
        Some((p, seed)) => Some(super::dropout::dropout_cuda(x, p, seed)?),
        None => None,
    };
    unsafe {
        mm(
            o,
            Layout::Tn,
            g.device_ptr(),
            r,
            x_ad.as_ref().unwrap_or(x).device_ptr(),
            k,
            l.grad_a,
            k,
            (r, k, m),
            true,
            1.0,
            1.0,
        )?
    };
    drop(x_ad);
    // dx = dy·W + g·A: without dropout the adapter's term is the NF4 GEMM's second phase of K;
    // with it, dy·W first and the masked term added after.
    let adapter = match l.dropout {
        None => Some(DxAdapter {
            g: g.device_ptr(),
            a: l.a.ptr,
            r,
        }),
        Some(_) => None,
    };
    // SAFETY: g [M, r] (above) and the A view [r, K] (checked by `check_view`) on device `o`.
    let dx = unsafe {
        match input {
            LayerInput::Kept(_) => nf4_dx(dy, w, None, 0.0, adapter)?,
            LayerInput::Spent(x) => nf4_dx(dy, w, Some(x), 0.0, adapter)?,
            LayerInput::Accumulate(_, acc) => nf4_dx(dy, w, Some(acc), 1.0, adapter)?,
        }
    };
    match l.dropout {
        None => Ok(dx),
        Some((p, seed)) => {
            // dx += (g·A) ⊙ m
            let ga = Tensor::uninit(&[m, k], DType::BF16, &dy.device())?;
            unsafe {
                mm(
                    o,
                    Layout::Nn,
                    g.device_ptr(),
                    r,
                    l.a.ptr,
                    k,
                    ga.device_ptr(),
                    k,
                    (m, k, r),
                    false,
                    1.0,
                    0.0,
                )?
            };
            super::embedding::add_cuda(&dx, &super::dropout::dropout_cuda(&ga, p, seed)?)
        }
    }
}
