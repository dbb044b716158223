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
//! Layers of one input x (q/k/v, gate/up) go as a group: their forwards are one NF4 launch over
//! all their output tiles ([`lora_forward_group`]), and their input gradients one NF4 GEMM whose
//! K spans every weight and adapter ([`lora_backward_group`]):
//! ```text
//!           dx = Σ_j dy_j·W_j + g_j·A_j      NF4 GEMM NN, K = Σ_j (out_j + r_j)
//! ```
//! and each of the adapters' products above (xa, g, dA, dB) is one grouped launch over the
//! layers (`gemm_group_*`), each product split along K as it would be alone: the same bits.
//! Every GEMM accumulates in fp32; `C = alpha·A·B + beta·C`. The CPU reference of all of it is
//! `ops::linear` (and `ops::matmul` for the plain products). Requirements, checked here: bf16
//! operands, contiguous dimensions multiples of 8 (16 for NF4 weights), rank a multiple of 8 for
//! the fused adapter (the CUDA step zero-pads other ranks: `LoraParams::padded_to_rank`).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::{check_tensor, cuda_ordinal};
use crate::device::cuda::CudaDevice;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::quant::nf4::{Absmax, Nf4Tensor};
use crate::tensor::{shape_str, DType, Tensor};

const TILE: usize = 128;
const BK: usize = 32;
const STAGES: usize = 3;
const THREADS: u32 = 256;
/// Dynamic shared memory of the bf16 GEMMs: STAGES A tiles and STAGES B tiles of bf16.
const GEMM_SMEM: usize = 2 * STAGES * TILE * BK * 2;
/// Dynamic shared memory of the NF4 GEMMs: STAGES A tiles and two decoded B tiles of bf16.
const NF4_SMEM: usize = (STAGES + 2) * TILE * BK * 2;
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
    tile_done: u64,
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
    rows: i64,
    cols: i64,
    /// log2 of the blocksize (a power of two: `nf4::check_blocksize`), so the kernels find an
    /// element's block with a shift.
    blocksize_log2: i32,
    /// The codebook by value (the kernels' `Nf4Code`): they read it from the constant bank.
    code: [f32; 16],
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
    if v.is_multiple_of(m) {
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
    if addr.is_multiple_of(bytes) {
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

/// The row lengths and alignments a GEMM on addresses needs (see [`gemm_ptrs`]).
fn check_ptrs(
    op: &'static str,
    layout: Layout,
    [a, b, c]: [u64; 3],
    [lda, ldb, ldc]: [usize; 3],
    [m, n, k]: [usize; 3],
    out: DType,
) -> Result<()> {
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
    aligned(op, "C", c, out.size_in_bytes() as u64)
}

/// `(splits, K tiles per split)` of an `[M, N, K]` product: `pinned`, or [`split_k`]'s choice,
/// evened out so that no split is empty.
fn split_plan(cuda: &CudaDevice, [m, n, k]: [usize; 3], pinned: Option<usize>) -> (usize, usize) {
    let splits = match pinned {
        _ if k == 0 => 1,
        Some(s) => s,
        None => split_k(cuda, m, n, k),
    };
    let k_tiles = k.div_ceil(BK).max(1);
    let per_split = k_tiles.div_ceil(splits);
    (k_tiles.div_ceil(per_split), per_split)
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
    check_ptrs(op, layout, [a, b, c], [lda, ldb, ldc], [m, n, k], out)?;
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
    let (splits, per_split) = split_plan(&cuda, [m, n, k], splits);
    let workspace = if splits > 1 {
        Some(Tensor::uninit(&[splits * m * n], DType::F32, &dev)?)
    } else {
        None
    };
    let tile_done = if splits > 1 {
        cuda.tile_counters(m.div_ceil(TILE) * n.div_ceil(TILE))?
    } else {
        0
    };
    let params = GemmParams {
        a,
        b,
        c,
        partial: workspace.as_ref().map_or(0, |w| w.device_ptr()),
        tile_done,
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
    let smem = GEMM_SMEM;
    let f = cuda.function_with_shared("gemm", name, smem)?;
    let mut bld = cuda.stream().launch_builder(f);
    bld.arg(&params);
    // SAFETY: the caller's contract covers the pointers and shapes; the workspace holds
    // splits·M·N floats and the counters one zero u32 per output tile (the last split of each
    // tile sums the partials into C and resets its counter); the kernel needs `smem` bytes of
    // dynamic shared memory (allowed above) and 256 threads, which cfg gives.
    unsafe { cuda.launch(name, bld, launch_cfg(m, n, splits, smem)) }?;
    drop(workspace);
    Ok(())
}

/// The parameters of `gemm_group_*`: each product's GEMM, its tiles and its K splits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct GemmGroup {
    p: [GemmParams; GROUP_MAX],
    tiles: [i32; GROUP_MAX],
    splits: [i32; GROUP_MAX],
    products: i32,
}
// SAFETY: #[repr(C)] plain data laid out like the kernel's `GemmGroup`.
unsafe impl cudarc::driver::DeviceRepr for GemmGroup {}

/// One product of [`gemm_group_ptrs`]: `C = alpha·op(A)·op(B) + beta·C` on addresses, as
/// [`gemm_ptrs`] takes it.
#[derive(Clone, Copy, Debug)]
struct Product {
    ptrs: [u64; 3],
    lds: [usize; 3],
    mnk: [usize; 3],
    alpha: f32,
    beta: f32,
}

/// Up to [`GROUP_MAX`] independent products of one layout and output type (an adapter's small
/// GEMMs for each of q, k and v) as one launch. Each is split along K as it would be alone, so
/// each result equals [`gemm_ptrs`]'s bit for bit. One
/// product is [`gemm_ptrs`] itself. Kernels exist for the adapters' layouts: NT and NN with a
/// bf16 output, TN with an fp32 one.
///
/// # Safety
/// As [`gemm_ptrs`], for every product.
unsafe fn gemm_group_ptrs(
    o: usize,
    layout: Layout,
    out: DType,
    products: &[Product],
) -> Result<()> {
    let op = "grouped gemm (cuda)";
    if let [one] = products {
        let ([a, b, c], [lda, ldb, ldc], [m, n, k]) = (one.ptrs, one.lds, one.mnk);
        // SAFETY: forwarded from the caller's contract.
        return unsafe {
            gemm_ptrs(
                o, layout, a, lda, b, ldb, c, ldc, m, n, k, out, one.alpha, one.beta,
            )
        };
    }
    let name = match (layout, out) {
        (Layout::Nt, DType::BF16) => "gemm_group_nt_bf16",
        (Layout::Nn, DType::BF16) => "gemm_group_nn_bf16",
        (Layout::Tn, DType::F32) => "gemm_group_tn_f32",
        _ => {
            return Err(Error::InvalidArgument(format!(
                "{op}: no grouped kernel for {layout:?} with a {out:?} output"
            )))
        }
    };
    if products.len() > GROUP_MAX {
        return Err(Error::InvalidArgument(format!(
            "{op}: takes at most {GROUP_MAX} products, got {}",
            products.len()
        )));
    }
    let cuda = CudaDevice::get(o)?;
    let mut group = GemmGroup {
        products: products.len() as i32,
        ..GemmGroup::default()
    };
    let (mut partial_len, mut counters_len) = (0, 0);
    let mut partial_at = [None; GROUP_MAX];
    for (j, pr) in products.iter().enumerate() {
        check_ptrs(op, layout, pr.ptrs, pr.lds, pr.mnk, out)?;
        let [m, n, k] = pr.mnk;
        let (splits, per_split) = split_plan(&cuda, pr.mnk, None);
        group.p[j] = GemmParams {
            a: pr.ptrs[0],
            b: pr.ptrs[1],
            c: pr.ptrs[2],
            lda: pr.lds[0] as i64,
            ldb: pr.lds[1] as i64,
            ldc: pr.lds[2] as i64,
            m: m as i32,
            n: n as i32,
            k: k as i32,
            k_tiles_per_split: per_split as i32,
            alpha: pr.alpha,
            beta: pr.beta,
            ..GemmParams::default()
        };
        group.tiles[j] = (m.div_ceil(TILE) * n.div_ceil(TILE)) as i32;
        group.splits[j] = splits as i32;
        if splits > 1 && m * n > 0 {
            partial_at[j] = Some((partial_len, counters_len));
            partial_len += splits * m * n;
            counters_len += group.tiles[j] as usize;
        }
    }
    let tiles: usize = group.tiles.iter().map(|&t| t as usize).sum();
    if tiles == 0 {
        return Ok(());
    }
    let workspace = if partial_len > 0 {
        Some(Tensor::uninit(
            &[partial_len],
            DType::F32,
            &Device::Cuda(o),
        )?)
    } else {
        None
    };
    if let Some(ws) = &workspace {
        let counters = cuda.tile_counters(counters_len)?;
        for (j, at) in partial_at.iter().enumerate() {
            if let Some((partial, tiles)) = at {
                group.p[j].partial = ws.device_ptr() + 4 * *partial as u64;
                group.p[j].tile_done = counters + 4 * *tiles as u64;
            }
        }
    }
    let smem = GEMM_SMEM;
    let f = cuda.function_with_shared("gemm", name, smem)?;
    let mut bld = cuda.stream().launch_builder(f);
    bld.arg(&group);
    let max_splits = group.splits.iter().copied().max().unwrap_or(1).max(1) as u32;
    let cfg = LaunchConfig {
        grid_dim: (tiles as u32, 1, max_splits),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: the caller's contract covers each product's pointers and shapes (checked for row
    // lengths and alignment above); each split product's partial is its own `splits·M·N` floats
    // of the workspace and its counters its own zero u32 per tile; the grid holds every
    // product's tiles, and the largest split count, as the kernel maps them; `smem` bytes and
    // 256 threads, as it expects.
    unsafe { cuda.launch(name, bld, cfg) }?;
    drop(workspace);
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
        code: w.code,
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
        let mut bld = cuda.stream().launch_builder(f);
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
    let smem = NF4_SMEM;
    let f = cuda.function_with_shared("gemm", name, smem)?;
    let mut bld = cuda.stream().launch_builder(f);
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
    let f = prepare_forwards(op, o, x, &[(w, Some(l))])?.remove(0);
    let y = nf4_forward_launch(o, f.g, f.p, f.y)?;
    Ok((y, f.xa.expect("prepared with an adapter")))
}

/// The most weights [`lora_forward_group`] takes in one launch (q, k and v).
pub const GROUP_MAX: usize = 3;

/// The parameters of `gemm_nf4_nt_group_bf16`: each group's GEMM and weight, and its number of
/// 128-column output tiles (the grid's columns are theirs side by side).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct Nf4Group {
    p: [GemmParams; GROUP_MAX],
    w: [Nf4Params; GROUP_MAX],
    tiles_n: [i32; GROUP_MAX],
    groups: i32,
}
// SAFETY: #[repr(C)] plain data laid out like the kernel's `Nf4Group`.
unsafe impl cudarc::driver::DeviceRepr for Nf4Group {}

/// One NF4 projection, checked and ready to launch: the kernel's parameters, the output it
/// writes, and `xa = s·x̃·Aᵀ` (already computed) when it has an adapter.
struct Prepared {
    g: GemmParams,
    p: Nf4Params,
    y: Tensor,
    xa: Option<Tensor>,
}

/// Checks x `[M, K]` (bf16 on device `o`) against W `[N, K]` and fills the forward GEMM's
/// parameters, with the adapter's term when given one: its view (checked by `check_view`) and
/// `xa = s·x̃·Aᵀ` `[M, r]`.
fn prepare_forward(
    op: &'static str,
    o: usize,
    x: &Tensor,
    w: &Nf4Tensor,
    adapter: Option<(&LoraView, Tensor)>,
) -> Result<Prepared> {
    let dev = Device::Cuda(o);
    let (m, k) = dims2(op, "x", x)?;
    check_tensor(op, "x", x, DType::BF16, &[m, k], dev)?;
    let p = nf4_params(w)?;
    let n = p.rows as usize;
    if p.cols as usize != k || w.device() != dev {
        return Err(Error::ShapeMismatch {
            op,
            expected: format!("W [N, {k}] on {dev}"),
            got: format!("{} on {}", shape_str(&w.shape), w.device()),
        });
    }
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
    let xa = match adapter {
        Some((l, xa)) => {
            let r = l.a.rows;
            check_tensor(op, "x·Aᵀ", &xa, DType::BF16, &[m, r], dev)?;
            g.a2 = xa.device_ptr();
            g.b2 = l.b.ptr;
            g.lda2 = r as i64;
            g.ldb2 = r as i64;
            g.k2 = r as i32;
            Some(xa)
        }
        None => None,
    };
    Ok(Prepared { g, p, y, xa })
}

/// Checks x against each weight and adapter view, and computes every adapter's `xa` (one
/// grouped launch): each layer ready for its forward GEMM.
fn prepare_forwards(
    op: &'static str,
    o: usize,
    x: &Tensor,
    layers: &[(&Nf4Tensor, Option<&LoraView>)],
) -> Result<Vec<Prepared>> {
    let (m, k) = dims2(op, "x", x)?;
    let mut views = Vec::with_capacity(layers.len());
    for (w, l) in layers {
        if let Some(l) = l {
            views.push((*l, check_view(op, l, w, k)?));
        }
    }
    check_tensor(op, "x", x, DType::BF16, &[m, k], Device::Cuda(o))?;
    let mut xas = adapter_inputs(o, x, &views)?.into_iter();
    layers
        .iter()
        .map(|(w, l)| {
            let adapter = l.map(|l| (l, xas.next().expect("one xa per view")));
            prepare_forward(op, o, x, w, adapter)
        })
        .collect()
}

/// Several NF4 projections of one input with their adapters (`None`: a projection without
/// one): q/k/v of an attention block, gate/up of an MLP. Returns each `(y, xa)` as
/// [`lora_forward_view`] does (`xa` None without an adapter). The NF4 GEMMs are one launch,
/// `gemm_nf4_nt_group_bf16`, over all their output tiles: every y equals the one-weight kernel's
/// bit for bit. At M ≤ [`SMALL_M`] each weight takes the small-M kernel, as it would alone.
///
/// # Safety
/// As [`lora_forward_view`], for every view given.
pub unsafe fn lora_forward_group(
    x: &Tensor,
    layers: &[(&Nf4Tensor, Option<&LoraView>)],
) -> Result<Vec<(Tensor, Option<Tensor>)>> {
    let op = "grouped lora forward (cuda)";
    if layers.is_empty() || layers.len() > GROUP_MAX {
        return Err(Error::InvalidArgument(format!(
            "{op}: takes 1 to {GROUP_MAX} weights, got {}",
            layers.len()
        )));
    }
    let o = cuda_ordinal(op, x)?;
    let prepared = prepare_forwards(op, o, x, layers)?;
    let m = prepared[0].g.m as usize;
    if layers.len() == 1 || m <= SMALL_M {
        return prepared
            .into_iter()
            .map(|f| Ok((nf4_forward_launch(o, f.g, f.p, f.y)?, f.xa)))
            .collect();
    }
    let mut group = Nf4Group {
        groups: prepared.len() as i32,
        ..Nf4Group::default()
    };
    for (i, f) in prepared.iter().enumerate() {
        group.p[i] = f.g;
        group.w[i] = f.p;
        group.tiles_n[i] = (f.g.n as usize).div_ceil(TILE) as i32;
    }
    let tiles_n: usize = group.tiles_n.iter().map(|&t| t as usize).sum();
    if m > 0 && tiles_n > 0 {
        let cuda = CudaDevice::get(o)?;
        let name = "gemm_nf4_nt_group_bf16";
        let smem = NF4_SMEM;
        let f = cuda.function_with_shared("gemm", name, smem)?;
        let mut bld = cuda.stream().launch_builder(f);
        bld.arg(&group);
        let cfg = LaunchConfig {
            grid_dim: (tiles_n as u32, m.div_ceil(TILE) as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: gemm_nf4_nt_group_bf16(Nf4Group): each group's pointers are checked by
        // `prepare_forward` as for gemm_nf4_nt_bf16 (x, y and xa tensors alive in `prepared`
        // until the stream's work is done, the views by the caller's contract); the grid's
        // columns are the groups' N tiles summed, as the kernel maps them; `smem` bytes (3 A
        // stages + 2 B buffers) and 256 threads, as the kernel expects.
        unsafe { cuda.launch(name, bld, cfg) }?;
    }
    Ok(prepared.into_iter().map(|f| (f.y, f.xa)).collect())
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
    Ok(adapter_inputs(o, x, &[(l, r)])?.remove(0))
}

/// `xa_j = s_j·x̃_j·Aⱼᵀ` `[M, r_j]` for checked views `(view, r_j)` (x `[M, K]` bf16 on device
/// `o`; x̃_j = x with view j's dropout), the products in one grouped launch.
fn adapter_inputs(o: usize, x: &Tensor, views: &[(&LoraView, usize)]) -> Result<Vec<Tensor>> {
    let (m, k) = (x.shape()[0], x.shape()[1]);
    let mut xas = Vec::with_capacity(views.len());
    let mut dropped = Vec::with_capacity(views.len());
    let mut products = Vec::with_capacity(views.len());
    for &(l, r) in views {
        let xa = Tensor::uninit(&[m, r], DType::BF16, &x.device())?;
        let x_ad = match l.dropout {
            Some((p, seed)) => Some(super::dropout::dropout_cuda(x, p, seed)?),
            None => None,
        };
        products.push(Product {
            ptrs: [
                x_ad.as_ref().unwrap_or(x).device_ptr(),
                l.a.ptr,
                xa.device_ptr(),
            ],
            lds: [k, k, r],
            mnk: [m, r, k],
            alpha: l.scale,
            beta: 0.0,
        });
        dropped.push(x_ad);
        xas.push(xa);
    }
    // SAFETY: x (and each dropout of it) [M, K] bf16, each A a live [r, K] bf16 view (checked
    // by `check_view`), each xa [M, r]; all on device `o`, alive until after the launch.
    unsafe { gemm_group_ptrs(o, Layout::Nt, DType::BF16, &products)? };
    drop(dropped);
    Ok(xas)
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
/// kept with a gradient to add dx into; or, for [`lora_backward_group`], an input that needs
/// no gradient (only the adapters' are computed).
pub enum LayerInput<'a> {
    /// x, kept: dx is a new tensor.
    Kept(&'a Tensor),
    /// x, spent: dx is written over it.
    Spent(Tensor),
    /// x, and the gradient it already has: dx is added into that (β = 1).
    Accumulate(&'a Tensor, Tensor),
    /// x, which needs no gradient.
    Frozen(&'a Tensor),
}

impl LayerInput<'_> {
    fn x(&self) -> &Tensor {
        match self {
            LayerInput::Kept(x) | LayerInput::Accumulate(x, _) | LayerInput::Frozen(x) => x,
            LayerInput::Spent(x) => x,
        }
    }
}

/// One adapter's part of a backward: its layer's weight, its view, the forward's saved `xa`
/// and the layer's output gradient dy.
type AdapterGrad<'a> = (&'a Nf4Tensor, &'a LoraView, &'a Tensor, &'a Tensor);

/// The adapters' gradients of layers of one input x `[M, K]`, checked: for each, with dy
/// `[M, N]` and xa `[M, r]`, dB += dyᵀ·xa and dA += gᵀ·x̃ at the view's addresses; returns each
/// `g = s·dy·B` `[M, r]`, whose `g·A` is the adapter's part of dx. Each of the three products is
/// one grouped launch over the adapters.
///
/// # Safety
/// As [`lora_backward_view`], for every view.
unsafe fn adapter_grads(
    op: &'static str,
    o: usize,
    x: &Tensor,
    adapters: &[AdapterGrad<'_>],
) -> Result<Vec<Tensor>> {
    let (_, k) = dims2(op, "x", x)?;
    let mut gs = Vec::with_capacity(adapters.len());
    let (mut g_prods, mut db_prods) = (Vec::new(), Vec::new());
    for &(w, l, xa, dy) in adapters {
        let (m, n) = dims2(op, "dy", dy)?;
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
        let g = Tensor::uninit(&[m, r], DType::BF16, &dy.device())?;
        // g = s·dy·B
        g_prods.push(Product {
            ptrs: [dy.device_ptr(), l.b.ptr, g.device_ptr()],
            lds: [n, r, r],
            mnk: [m, r, n],
            alpha: l.scale,
            beta: 0.0,
        });
        // dB += dyᵀ·xa
        db_prods.push(Product {
            ptrs: [dy.device_ptr(), xa.device_ptr(), l.grad_b],
            lds: [n, r, r],
            mnk: [n, r, m],
            alpha: 1.0,
            beta: 1.0,
        });
        gs.push(g);
    }
    // SAFETY (each launch): dy [M, N], B view [N, r], g [M, r], x and its dropouts [M, K], xa
    // [M, r], the gradient views [r, K] and [N, r] fp32: shapes checked above and by
    // `check_view`; all on device `o`, alive until after the launches.
    unsafe {
        gemm_group_ptrs(o, Layout::Nn, DType::BF16, &g_prods)?;
        gemm_group_ptrs(o, Layout::Tn, DType::F32, &db_prods)?;
    }
    // dA += gᵀ·x̃ = s·(dy·B)ᵀ·x̃
    let mut dropped = Vec::with_capacity(adapters.len());
    let mut da_prods = Vec::with_capacity(adapters.len());
    for (&(_, l, _, _), g) in adapters.iter().zip(&gs) {
        let (m, r) = (g.shape()[0], g.shape()[1]);
        let x_ad = match l.dropout {
            Some((p, seed)) => Some(super::dropout::dropout_cuda(x, p, seed)?),
            None => None,
        };
        da_prods.push(Product {
            ptrs: [
                g.device_ptr(),
                x_ad.as_ref().unwrap_or(x).device_ptr(),
                l.grad_a,
            ],
            lds: [r, k, k],
            mnk: [r, k, m],
            alpha: 1.0,
            beta: 1.0,
        });
        dropped.push(x_ad);
    }
    unsafe { gemm_group_ptrs(o, Layout::Tn, DType::F32, &da_prods)? };
    drop(dropped);
    Ok(gs)
}

/// `dx += (g·A) ⊙ m`: the adapter's input gradient under dropout (the mask m redrawn from the
/// view's seed), which cannot be a phase of the NF4 GEMM's K.
///
/// # Safety
/// As [`lora_backward_view`]; g is `[M, r]` and dx `[M, K]` on device `o`.
unsafe fn add_masked_adapter_dx(o: usize, dx: Tensor, g: &Tensor, l: &LoraView) -> Result<Tensor> {
    let Some((p, seed)) = l.dropout else {
        return Ok(dx);
    };
    let (m, r) = (g.shape()[0], g.shape()[1]);
    let k = l.a.cols;
    let ga = Tensor::uninit(&[m, k], DType::BF16, &g.device())?;
    // SAFETY: g [M, r], the A view [r, K] (checked by `check_view`), ga [M, K], on device `o`.
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
    let o = cuda_ordinal(op, dy)?;
    // The adapter's gradients first, while x is intact; dx after, perhaps over x.
    // SAFETY: forwarded from the caller's contract.
    let g = unsafe { adapter_grads(op, o, input.x(), &[(w, l, xa, dy)])? }.remove(0);
    let r = g.shape()[1];
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
            LayerInput::Kept(_) | LayerInput::Frozen(_) => nf4_dx(dy, w, None, 0.0, adapter)?,
            LayerInput::Spent(x) => nf4_dx(dy, w, Some(x), 0.0, adapter)?,
            LayerInput::Accumulate(_, acc) => nf4_dx(dy, w, Some(acc), 1.0, adapter)?,
        }
    };
    // SAFETY: as above.
    unsafe { add_masked_adapter_dx(o, dx, &g, l) }
}

/// One projection of a grouped backward ([`lora_backward_group`]): its weight, its adapter view
/// with the `xa` its forward saved (None without an adapter), and its output's gradient.
#[derive(Clone, Copy)]
pub struct GroupGrad<'a> {
    /// W `[N, K]`.
    pub w: &'a Nf4Tensor,
    /// The adapter and `xa = s·x̃·Aᵀ` `[M, r]` from [`lora_forward_group`].
    pub lora: Option<(&'a LoraView, &'a Tensor)>,
    /// dy `[M, N]`.
    pub dy: &'a Tensor,
}

/// The backward of [`lora_forward_group`]: each adapter's dA and dB accumulate at its view, and
/// (unless the input is [`LayerInput::Frozen`]) the input's gradient
/// `dx = Σ_g dy_g·W_g + s_g·(dy_g·B_g)·A_g` is one NF4 GEMM, `gemm_nf4_nn_group_bf16`, whose K
/// runs over every weight and every adapter: summed in fp32 and rounded once. An adapter with
/// dropout adds its masked term after, as [`lora_backward_view`] does.
///
/// # Safety
/// As [`lora_backward_view`], for every view given.
pub unsafe fn lora_backward_group(
    input: LayerInput<'_>,
    layers: &[GroupGrad<'_>],
) -> Result<Option<Tensor>> {
    let op = "grouped lora backward (cuda)";
    if layers.is_empty() || layers.len() > GROUP_MAX {
        return Err(Error::InvalidArgument(format!(
            "{op}: takes 1 to {GROUP_MAX} weights, got {}",
            layers.len()
        )));
    }
    let x = input.x();
    let o = cuda_ordinal(op, x)?;
    let dev = Device::Cuda(o);
    let (m, k) = dims2(op, "x", x)?;
    check_tensor(op, "x", x, DType::BF16, &[m, k], dev)?;
    let mut group = Nf4Group {
        groups: layers.len() as i32,
        ..Nf4Group::default()
    };
    for (i, l) in layers.iter().enumerate() {
        let (_, n) = dims2(op, "dy", l.dy)?;
        let p = nf4_params(l.w)?;
        if p.rows as usize != n || p.cols as usize != k || l.w.device() != dev {
            return Err(Error::ShapeMismatch {
                op,
                expected: format!("W [{n}, {k}] on {dev} (dy [M, {n}], x [M, {k}])"),
                got: format!("{} on {}", shape_str(&l.w.shape), l.w.device()),
            });
        }
        check_tensor(op, "dy", l.dy, DType::BF16, &[m, n], dev)?;
        multiple_of(op, "out_features", n, 8)?;
        multiple_of(op, "in_features", k, 16)?;
        group.w[i] = p;
        group.p[i] = GemmParams {
            a: l.dy.device_ptr(),
            lda: n as i64,
            m: m as i32,
            n: k as i32,
            k: n as i32,
            k_tiles_per_split: n.div_ceil(BK) as i32,
            alpha: 1.0,
            ..GemmParams::default()
        };
    }
    // The adapters' gradients first, while x is intact (dx may be written over it).
    let adapters: Vec<AdapterGrad> = layers
        .iter()
        .filter_map(|l| l.lora.map(|(view, xa)| (l.w, view, xa, l.dy)))
        .collect();
    // SAFETY: forwarded from the caller's contract; checked inside.
    let mut adapter_gs = unsafe { adapter_grads(op, o, x, &adapters)? }.into_iter();
    let gs: Vec<Option<Tensor>> = layers
        .iter()
        .map(|l| {
            l.lora
                .map(|_| adapter_gs.next().expect("one g per adapter"))
        })
        .collect();
    for (i, (g, l)) in gs.iter().zip(layers).enumerate() {
        if let (Some(g), Some((view, _))) = (g, l.lora) {
            if view.dropout.is_none() {
                let r = g.shape()[1];
                group.p[i].a2 = g.device_ptr();
                group.p[i].lda2 = r as i64;
                group.p[i].b2 = view.a.ptr;
                group.p[i].ldb2 = k as i64;
                group.p[i].k2 = r as i32;
            }
        }
    }
    let (dx, beta) = match input {
        LayerInput::Frozen(_) => return Ok(None),
        LayerInput::Kept(_) => (Tensor::uninit(&[m, k], DType::BF16, &dev)?, 0.0),
        LayerInput::Spent(x) => (x, 0.0),
        LayerInput::Accumulate(_, acc) => {
            check_tensor(op, "dx (accumulated into)", &acc, DType::BF16, &[m, k], dev)?;
            (acc, 1.0)
        }
    };
    // The output and β are group 0's (the kernel's epilogue reads them there).
    group.p[0].c = dx.device_ptr();
    group.p[0].ldc = k as i64;
    group.p[0].beta = beta;
    if m > 0 && k > 0 {
        let cuda = CudaDevice::get(o)?;
        let name = "gemm_nf4_nn_group_bf16";
        let smem = NF4_SMEM;
        let f = cuda.function_with_shared("gemm", name, smem)?;
        let mut bld = cuda.stream().launch_builder(f);
        bld.arg(&group);
        // SAFETY: gemm_nf4_nn_group_bf16(Nf4Group): every dy [M, N_g] bf16, W_g [N_g, K] NF4
        // and dx [M, K] checked above; each adapter's g [M, r] (alive in `gs`) and A view
        // [r, K] (checked by `check_view`, alive by the caller's contract); `smem` bytes and
        // 256 threads, as the kernel expects.
        unsafe { cuda.launch(name, bld, launch_cfg(m, k, 1, smem)) }?;
    }
    let mut dx = dx;
    for (g, l) in gs.iter().zip(layers) {
        if let (Some(g), Some((view, _))) = (g, l.lora) {
            // SAFETY: g [M, r] from `adapter_grads`, the view checked there.
            dx = unsafe { add_masked_adapter_dx(o, dx, g, view)? };
        }
    }
    Ok(Some(dx))
}
