//! Tensor-core GEMMs, NF4 GEMMs and the fused LoRA layer on CUDA against f64/CPU references, on
//! awkward sizes (M = 1, 7, 16, 97, 2048; N and K not multiples of the 128×128×32 tiles).
//! Without a GPU each test prints `SKIPPED (no CUDA device)` and passes.

use crate::common::on_simulator;
use half::bf16;
use qlora_rs::device::CudaDevice;
use qlora_rs::ops::gemm::{self, Layout, LoraCuda};
use qlora_rs::ops::linear;
use qlora_rs::quant::nf4::{Nf4Config, Nf4Tensor};
use qlora_rs::testing::gpu_or_skip;
use qlora_rs::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

fn data(r: &mut impl Rng, n: usize, scale: f32) -> (Vec<f32>, Vec<bf16>) {
    let b: Vec<bf16> = (0..n)
        .map(|_| bf16::from_f32(r.random_range(-1.0..1.0) * scale))
        .collect();
    (b.iter().map(|v| v.to_f32()).collect(), b)
}

/// `max |got − ref| ≤ tol · max |ref|`.
fn close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    let (mut worst, mut at) = (0.0f64, 0);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let e = (*g as f64 - w).abs();
        if e > worst || e.is_nan() {
            worst = e;
            at = i;
        }
    }
    assert!(
        worst <= tol * scale,
        "{what}: max error {worst:e} at {at} (got {}, want {}) > {tol} × {scale:e}",
        got[at],
        want[at]
    );
}

/// f64 reference: C[M,N] = Σ_k A(m,k)·B(k,n) with accessors.
fn reference(
    m: usize,
    n: usize,
    k: usize,
    a: impl Fn(usize, usize) -> f64,
    b: impl Fn(usize, usize) -> f64,
) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|p| a(i, p) * b(p, j)).sum();
        }
    }
    c
}

/// The f64 product for `layout` of A and B stored as its operands are (A `[M,K]`, or `[K,M]` for
/// TN; B `[N,K]` for NT, else `[K,N]`), row-major without padding.
fn layout_reference(
    layout: Layout,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    b: &[f32],
) -> Vec<f64> {
    reference(
        m,
        n,
        k,
        |i, p| match layout {
            Layout::Tn => a[p * m + i] as f64,
            _ => a[i * k + p] as f64,
        },
        |p, j| match layout {
            Layout::Nt => b[j * k + p] as f64,
            _ => b[p * n + j] as f64,
        },
    )
}

fn to_f32(t: &Tensor) -> Vec<f32> {
    match t.dtype() {
        DType::BF16 => t
            .to_vec::<bf16>()
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect(),
        _ => t.to_vec::<f32>().unwrap(),
    }
}

#[test]
fn gemm_all_layouts_match_f64() {
    let Some(dev) = gpu_or_skip("gemm_all_layouts_match_f64") else {
        return;
    };
    let mut r = rand::rngs::StdRng::seed_from_u64(1);
    // On the simulator the two largest shapes shrink but keep partial M, N and K tiles and the
    // skinny shape that takes split-K.
    let (big, skinny) = if on_simulator() {
        ((260, 264, 1048), (16, 1040, 2056))
    } else {
        ((2048, 256, 4096), (16, 4096, 2048))
    };
    for (m, n, k) in [
        (1usize, 8usize, 8usize),
        (7, 200, 104),
        (16, 136, 264),
        (97, 1032, 520),
        // An odd N (the NT product only: N is no operand's contiguous dimension there), as for
        // logits over an odd vocabulary: odd row strides, a last column alone; and with split-K.
        (9, 515, 72),
        (16, 203, 2056),
        // Nine tile rows: a full group of eight in the blocks' tile order and one left over.
        (1096, 136, 24),
        big,
        skinny,
    ] {
        for layout in [Layout::Nt, Layout::Nn, Layout::Tn] {
            let (a_shape, b_shape) = match layout {
                Layout::Nt => ([m, k], [n, k]),
                Layout::Nn => ([m, k], [k, n]),
                Layout::Tn => ([k, m], [k, n]),
            };
            if (layout == Layout::Tn && m % 8 != 0) || (layout != Layout::Nt && n % 8 != 0) {
                continue; // contiguous dimensions must be multiples of 8
            }
            let (af, ab) = data(&mut r, m * k, 1.0);
            let (bf, bb) = data(&mut r, n * k, 1.0);
            let (cf, _) = data(&mut r, m * n, 1.0);
            let want = layout_reference(layout, m, n, k, &af, &bf);
            let a = Tensor::from_vec(ab, &a_shape, &dev).unwrap();
            let b = Tensor::from_vec(bb, &b_shape, &dev).unwrap();
            // fp32 output, C = 0.5·A·B + 2·C
            let mut c = Tensor::from_vec(cf.clone(), &[m, n], &dev).unwrap();
            gemm::gemm_cuda(layout, &a, &b, &mut c, 0.5, 2.0).unwrap();
            let want_f: Vec<f64> = want
                .iter()
                .zip(&cf)
                .map(|(w, c0)| 0.5 * w + 2.0 * *c0 as f64)
                .collect();
            close(
                &format!("{layout:?} f32 {m}x{n}x{k}"),
                &to_f32(&c),
                &want_f,
                1e-4,
            );
            // bf16 output
            let mut cb = Tensor::zeros(&[m, n], DType::BF16, &dev).unwrap();
            gemm::gemm_cuda(layout, &a, &b, &mut cb, 1.0, 0.0).unwrap();
            close(
                &format!("{layout:?} bf16 {m}x{n}x{k}"),
                &to_f32(&cb),
                &want,
                1e-2,
            );
        }
    }
    let a = Tensor::zeros(&[4, 12], DType::BF16, &dev).unwrap();
    let mut c = Tensor::zeros(&[4, 4], DType::F32, &dev).unwrap();
    let err = gemm::gemm_cuda(
        Layout::Nt,
        &a,
        &Tensor::zeros(&[4, 12], DType::BF16, &dev).unwrap(),
        &mut c,
        1.0,
        0.0,
    )
    .unwrap_err();
    assert!(err.to_string().contains("multiple of 8"), "{err}");
}

/// The split-K count is a parameter: every pinned count gives the f64 product within fp32
/// rounding, the same count gives the same bits, and 0 is refused.
#[test]
fn gemm_split_k_count_can_be_pinned() {
    let Some(dev) = gpu_or_skip("gemm_split_k_count_can_be_pinned") else {
        return;
    };
    let mut r = rand::rngs::StdRng::seed_from_u64(4);
    let (m, n, k) = (97usize, 136usize, 1040usize);
    let (af, ab) = data(&mut r, m * k, 1.0);
    let (bf, bb) = data(&mut r, n * k, 1.0);
    let want = layout_reference(Layout::Nt, m, n, k, &af, &bf);
    let a = Tensor::from_vec(ab, &[m, k], &dev).unwrap();
    let b = Tensor::from_vec(bb, &[n, k], &dev).unwrap();
    let run = |splits| {
        let mut c = Tensor::zeros(&[m, n], DType::F32, &dev).unwrap();
        gemm::gemm_cuda_split(Layout::Nt, &a, &b, &mut c, 1.0, 0.0, splits).unwrap();
        c.to_vec::<f32>().unwrap()
    };
    for splits in [Some(1), Some(3), Some(8), None] {
        close(&format!("split {splits:?}"), &run(splits), &want, 1e-4);
    }
    assert_eq!(run(Some(3)), run(Some(3)));
    let mut c = Tensor::zeros(&[m, n], DType::F32, &dev).unwrap();
    let err = gemm::gemm_cuda_split(Layout::Nt, &a, &b, &mut c, 1.0, 0.0, Some(0)).unwrap_err();
    assert!(err.to_string().contains("split-K count of 0"), "{err}");
}

/// `gemm_ptrs` on rows padded past the contiguous dimension (K for the KC operands, M or N for the
/// MC ones, none a multiple of 8): the padding holds NaN, and none of it may be read — a chunk
/// that straddles the end copies only what is before it.
#[test]
fn gemm_ptrs_never_reads_row_padding() {
    let Some(Device::Cuda(o)) = gpu_or_skip("gemm_ptrs_never_reads_row_padding") else {
        return;
    };
    let dev = Device::Cuda(o);
    let mut r = rand::rngs::StdRng::seed_from_u64(6);
    let (m, n, k) = (97usize, 100usize, 201usize);
    // A `rows × cols` matrix stored with row length `cols` rounded up to 8 plus `extra`, NaN in
    // the padding.
    let padded = |r: &mut rand::rngs::StdRng, rows: usize, cols: usize, extra: usize| {
        let ld = cols.next_multiple_of(8) + extra;
        let (vals, _) = data(r, rows * cols, 1.0);
        let mut buf = vec![bf16::NAN; rows * ld];
        for i in 0..rows {
            for j in 0..cols {
                buf[i * ld + j] = bf16::from_f32(vals[i * cols + j]);
            }
        }
        (vals, Tensor::from_vec(buf, &[rows, ld], &dev).unwrap(), ld)
    };
    // Rows padded to the next 16 bytes, and rows far longer than the dimension (a row block of
    // a wider buffer).
    for (layout, extra) in [Layout::Nt, Layout::Nn, Layout::Tn]
        .into_iter()
        .flat_map(|l| [(l, 0), (l, 40)])
    {
        let (a_rows, a_cols) = if layout == Layout::Tn { (k, m) } else { (m, k) };
        let (b_rows, b_cols) = if layout == Layout::Nt { (n, k) } else { (k, n) };
        let (af, a, lda) = padded(&mut r, a_rows, a_cols, extra);
        let (bf, b, ldb) = padded(&mut r, b_rows, b_cols, extra + 16);
        let want = layout_reference(layout, m, n, k, &af, &bf);
        let c = Tensor::zeros(&[m, n], DType::F32, &dev).unwrap();
        // SAFETY: A is [a_rows, lda], B [b_rows, ldb] and C [m, n] bf16/bf16/f32 buffers on this
        // device, alive until the copy below; the row lengths are multiples of 8.
        unsafe {
            gemm::gemm_ptrs(
                o,
                layout,
                a.device_address(),
                lda,
                b.device_address(),
                ldb,
                c.device_address(),
                n,
                m,
                n,
                k,
                DType::F32,
                1.0,
                0.0,
            )
        }
        .unwrap();
        close(
            &format!("{layout:?} rows padded by {extra}"),
            &c.to_vec::<f32>().unwrap(),
            &want,
            1e-4,
        );
    }
}

/// Every assumption the kernels make about raw addresses and views is an `Err` naming the op
/// and the argument before anything launches: row lengths shorter than the row, addresses the
/// 16-byte copies cannot take, adapter views that do not fit the layer, x and dy of different
/// token counts. (Without these checks the misaligned cases fault the card after the launch and
/// the others read the wrong memory.)
#[test]
fn gemm_and_lora_launchers_refuse_what_their_kernels_cannot_take() {
    let Some(Device::Cuda(o)) =
        gpu_or_skip("gemm_and_lora_launchers_refuse_what_their_kernels_cannot_take")
    else {
        return;
    };
    let dev = Device::Cuda(o);
    let (m, n, k) = (24usize, 32usize, 64usize);
    let buf = Tensor::zeros(&[4096], DType::BF16, &dev).unwrap();
    let c = Tensor::zeros(&[m * n + 8], DType::F32, &dev).unwrap();
    let (base, cbase) = (buf.device_address(), c.device_address());
    let gemm = |a: u64, lda: usize, cc: u64, layout: Layout| {
        // SAFETY: every case either fails its checks before the launch or addresses
        // [m, k] / [n, k] bf16 and [m, n] f32 inside `buf` and `c`.
        unsafe {
            gemm::gemm_ptrs(
                o,
                layout,
                a,
                lda,
                base + 2048 * 2,
                k,
                cc,
                n,
                m,
                n,
                k,
                DType::F32,
                1.0,
                0.0,
            )
        }
    };
    gemm(base, k, cbase, Layout::Nt).unwrap();
    let refusals = [
        (
            gemm(base + 2, k, cbase, Layout::Nt),
            "A's device address 0x",
        ),
        (
            gemm(base + 8, k, cbase, Layout::Nt),
            "must be 16-byte aligned",
        ),
        (gemm(base, k, cbase + 2, Layout::Nt), "C's device address"),
        (
            gemm(base, 56, cbase, Layout::Nt),
            "A's row length (56) is shorter",
        ),
        // Tn: A is [K, M], rows of M = 24, so a row length of 16 is short.
        (
            gemm(base, 16, cbase, Layout::Tn),
            "A's row length (16) is shorter",
        ),
    ];
    for (result, want) in refusals {
        let err = result.unwrap_err().to_string();
        assert!(
            err.contains("gemm (cuda)") && err.contains(want),
            "{want}: {err}"
        );
    }
    CudaDevice::get(o).unwrap().synchronize().unwrap();

    // Adapter views: r = 8 on a 32 × 64 layer.
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let (q, _) = nf4_weight(&mut rng, n, k, &dev);
    let (_, xb) = data(&mut rng, m * k, 1.0);
    let x = Tensor::from_vec(xb, &[m, k], &dev).unwrap();
    let grads = Tensor::zeros(&[8 * k + n * 8], DType::F32, &dev).unwrap();
    let view = gemm::LoraView {
        a: gemm::DevMat {
            ptr: base,
            rows: 8,
            cols: k,
        },
        b: gemm::DevMat {
            ptr: base + 8 * k as u64 * 2,
            rows: n,
            cols: 8,
        },
        grad_a: grads.device_address(),
        grad_b: grads.device_address() + 8 * k as u64 * 4,
        scale: 1.0,
        dropout: None,
    };
    let (_, xa) = unsafe { gemm::lora_forward_view(&x, &q, &view) }.unwrap();
    let dy = Tensor::zeros(&[m, n], DType::BF16, &dev).unwrap();
    unsafe { gemm::lora_backward_view(&x, &q, &view, &xa, &dy) }.unwrap();
    let mut misaligned = view;
    misaligned.a.ptr += 8;
    let mut wrong_b = view;
    wrong_b.b.rows = n + 8;
    let mut null_grad = view;
    null_grad.grad_b = 0;
    let mut odd_grad = view;
    odd_grad.grad_a += 2;
    let fewer = Tensor::zeros(&[m - 1, n], DType::BF16, &dev).unwrap();
    let refusals = [
        (
            unsafe { gemm::lora_forward_view(&x, &q, &misaligned) }.map(|_| ()),
            "A's device address",
        ),
        (
            unsafe { gemm::lora_forward_view(&x, &q, &wrong_b) }.map(|_| ()),
            "B [32, r]",
        ),
        (
            unsafe { gemm::lora_backward_view(&x, &q, &wrong_b, &xa, &dy) }.map(|_| ()),
            "B [32, r]",
        ),
        (
            unsafe { gemm::lora_backward_view(&x, &q, &null_grad, &xa, &dy) }.map(|_| ()),
            "dB view has a null device address",
        ),
        (
            unsafe { gemm::lora_backward_view(&x, &q, &odd_grad, &xa, &dy) }.map(|_| ()),
            "dA's device address",
        ),
        // x has 24 tokens, dy 23.
        (
            unsafe { gemm::lora_backward_view(&x, &q, &view, &xa, &fewer) }.map(|_| ()),
            "x [23, 64]",
        ),
    ];
    for (result, want) in refusals {
        let err = result.unwrap_err().to_string();
        assert!(err.contains("lora") && err.contains(want), "{want}: {err}");
    }
    CudaDevice::get(o).unwrap().synchronize().unwrap();
}

fn nf4_weight(r: &mut impl Rng, n: usize, k: usize, dev: &Device) -> (Nf4Tensor, Tensor) {
    nf4_weight_with(r, n, k, dev, Nf4Config::default())
}

fn nf4_weight_with(
    r: &mut impl Rng,
    n: usize,
    k: usize,
    dev: &Device,
    cfg: Nf4Config,
) -> (Nf4Tensor, Tensor) {
    let (_, wb) = data(r, n * k, 0.05);
    let w = Tensor::from_vec(wb, &[n, k], dev).unwrap();
    let q = Nf4Tensor::quantize(&w, cfg).unwrap();
    let dense = q.dequantize(DType::BF16).unwrap();
    (q, dense)
}

#[test]
fn nf4_gemm_equals_dequantize_then_gemm() {
    let Some(dev) = gpu_or_skip("nf4_gemm_equals_dequantize_then_gemm") else {
        return;
    };
    let mut r = rand::rngs::StdRng::seed_from_u64(2);
    let big = if on_simulator() {
        (272, 264, 1040)
    } else {
        (2048, 512, 1536)
    };
    for (m, n, k) in [
        (1usize, 200usize, 96usize),
        (7, 136, 4096),
        (16, 4104, 1040),
        (97, 1032, 576),
        // Nine tile rows: a full group of eight in the blocks' tile order and one left over.
        (1096, 136, 96),
        big,
    ] {
        check_nf4_gemm(&dev, &mut r, (m, n, k), Nf4Config::default());
    }
}

/// The NF4 GEMMs with plain (not double-quantized) absmax and with every other kind of block:
/// the smallest (32), larger ones, and one larger than a row (4096 > K), on the small-M and
/// the tensor-core kernels.
#[test]
fn nf4_gemm_with_plain_absmax_and_other_block_sizes() {
    let Some(dev) = gpu_or_skip("nf4_gemm_with_plain_absmax_and_other_block_sizes") else {
        return;
    };
    let mut r = rand::rngs::StdRng::seed_from_u64(12);
    for (blocksize, double_quant) in [
        (64, false),
        (32, true),
        (32, false),
        (128, true),
        (256, false),
        (4096, true),
    ] {
        let cfg = Nf4Config {
            blocksize,
            double_quant,
        };
        for mnk in [(3usize, 136usize, 96usize), (97, 264, 576)] {
            check_nf4_gemm(&dev, &mut r, mnk, cfg);
        }
    }
}

/// `nf4_forward_cuda` and `nf4_dx_cuda` on a random W quantized with `cfg` against the plain
/// GEMM on its dequantized bf16 copy (unsplit, like the NF4 kernels).
fn check_nf4_gemm(
    dev: &Device,
    r: &mut impl Rng,
    (m, n, k): (usize, usize, usize),
    cfg: Nf4Config,
) {
    let (q, dense) = nf4_weight_with(r, n, k, dev, cfg);
    let (_, xb) = data(r, m * k, 1.0);
    let x = Tensor::from_vec(xb, &[m, k], dev).unwrap();
    let y = gemm::nf4_forward_cuda(&x, &q, None).unwrap();
    // The reference unsplit, like the NF4 kernels (a card with many SMs would otherwise split
    // K here and round the fp32 sums in another order).
    let mut want = Tensor::zeros(&[m, n], DType::BF16, dev).unwrap();
    gemm::gemm_cuda_split(Layout::Nt, &x, &dense, &mut want, 1.0, 0.0, Some(1)).unwrap();
    if m > gemm::SMALL_M {
        // Same bf16 weights, same tiles, same accumulation order: identical.
        assert_eq!(
            y.to_vec::<bf16>().unwrap(),
            want.to_vec::<bf16>().unwrap(),
            "forward {m}x{n}x{k} {cfg:?}"
        );
    } else {
        // The small-M kernel adds in another order: equal to bf16 rounding.
        let w: Vec<f64> = to_f32(&want).iter().map(|&v| v as f64).collect();
        close(
            &format!("small-M forward {m}x{n}x{k} {cfg:?}"),
            &to_f32(&y),
            &w,
            1e-2,
        );
    }
    let (_, dyb) = data(r, m * n, 1.0);
    let dy = Tensor::from_vec(dyb, &[m, n], dev).unwrap();
    let dx = gemm::nf4_dx_cuda(&dy, &q).unwrap();
    let mut want = Tensor::zeros(&[m, k], DType::BF16, dev).unwrap();
    gemm::gemm_cuda_split(Layout::Nn, &dy, &dense, &mut want, 1.0, 0.0, Some(1)).unwrap();
    assert_eq!(
        dx.to_vec::<bf16>().unwrap(),
        want.to_vec::<bf16>().unwrap(),
        "dx {m}x{n}x{k} {cfg:?}"
    );
    // Accumulated (β = 1): acc + dy·W in the epilogue, as the plain GEMM does it.
    let (_, accb) = data(r, m * k, 1.0);
    let acc = Tensor::from_vec(accb.clone(), &[m, k], dev).unwrap();
    let summed = gemm::nf4_dx_acc(&dy, &q, acc).unwrap();
    let mut want = Tensor::from_vec(accb, &[m, k], dev).unwrap();
    gemm::gemm_cuda_split(Layout::Nn, &dy, &dense, &mut want, 1.0, 1.0, Some(1)).unwrap();
    assert_eq!(
        summed.to_vec::<bf16>().unwrap(),
        want.to_vec::<bf16>().unwrap(),
        "dx accumulated {m}x{n}x{k} {cfg:?}"
    );
}

#[test]
fn lora_layer_on_cuda_matches_the_cpu_reference() {
    let Some(dev) = gpu_or_skip("lora_layer_on_cuda_matches_the_cpu_reference") else {
        return;
    };
    let mut r = rand::rngs::StdRng::seed_from_u64(3);
    let big = if on_simulator() {
        (300, 1024, 512, 32)
    } else {
        (2048, 1024, 512, 32)
    };
    for (t, i, o, rank) in [
        (7usize, 96usize, 200usize, 8usize),
        // Small M with a rank above the warp's 32 lanes (the LoRA term strides over them).
        (5, 64, 72, 40),
        (97, 576, 1536, 16),
        big,
    ] {
        let (q, dense) = nf4_weight(&mut r, o, i, &dev);
        let w32: Vec<f32> = to_f32(&dense);
        let (xf, xb) = data(&mut r, t * i, 1.0);
        let (af, ab) = data(&mut r, rank * i, 0.1);
        let (bf, bb) = data(&mut r, o * rank, 0.1);
        let (dyf, dyb) = data(&mut r, t * o, 1.0);
        let scale = 2.0f32;
        let (x, a, b, dy) = (
            Tensor::from_vec(xb, &[t, i], &dev).unwrap(),
            Tensor::from_vec(ab, &[rank, i], &dev).unwrap(),
            Tensor::from_vec(bb, &[o, rank], &dev).unwrap(),
            Tensor::from_vec(dyb, &[t, o], &dev).unwrap(),
        );
        let lora = LoraCuda {
            a: &a,
            b: &b,
            scale,
        };
        let (y, xa) = gemm::lora_forward_cuda(&x, &q, &lora).unwrap();
        let mut ga = Tensor::zeros(&[rank, i], DType::F32, &dev).unwrap();
        let mut gb = Tensor::zeros(&[o, rank], DType::F32, &dev).unwrap();
        let dx = gemm::lora_backward_cuda(&x, &q, &lora, &xa, &dy, &mut ga, &mut gb).unwrap();
        // f64 CPU reference on the same bf16 values.
        let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
        let d = linear::Dims {
            tokens: t,
            in_features: i,
            out_features: o,
        };
        let (af64, bf64) = (f(&af), f(&bf));
        let l = linear::Lora {
            a: &af64,
            b: &bf64,
            rank,
            scale: scale as f64,
        };
        let (y_ref, xa_ref) = linear::forward(d, &f(&xf), &f(&w32), None, Some(&l), None).unwrap();
        close("lora y", &to_f32(&y), &y_ref, 2e-2);
        let (mut ga_ref, mut gb_ref) = (vec![0.0; rank * i], vec![0.0; o * rank]);
        let dx_ref = linear::backward(
            d,
            &f(&xf),
            &f(&w32),
            Some(linear::LoraGrads {
                lora: l,
                xa: &xa_ref,
                grad_a: &mut ga_ref,
                grad_b: &mut gb_ref,
            }),
            None,
            &f(&dyf),
            true,
        )
        .unwrap()
        .unwrap();
        close("lora dx", &to_f32(&dx), &dx_ref, 2e-2);
        close(
            "lora dA (fp32)",
            &ga.to_vec::<f32>().unwrap(),
            &ga_ref,
            1e-2,
        );
        close(
            "lora dB (fp32)",
            &gb.to_vec::<f32>().unwrap(),
            &gb_ref,
            1e-2,
        );
    }
}

#[test]
fn lora_view_with_dropout_matches_the_cpu_with_the_same_mask() {
    let Some(Device::Cuda(o)) =
        gpu_or_skip("lora_view_with_dropout_matches_the_cpu_with_the_same_mask")
    else {
        return;
    };
    let dev = Device::Cuda(o);
    let mut r = rand::rngs::StdRng::seed_from_u64(5);
    let (t, i, out, rank, p, seed) = (97usize, 576usize, 200usize, 16usize, 0.25f32, 1234u64);
    // The mask: dropout of ones; same seed, same mask; about 1 − p kept.
    let ones = Tensor::from_vec(vec![bf16::ONE; t * i], &[t, i], &dev).unwrap();
    let mask = to_f32(&qlora_rs::ops::dropout::dropout_cuda(&ones, p, seed).unwrap());
    assert_eq!(
        mask,
        to_f32(&qlora_rs::ops::dropout::dropout_cuda(&ones, p, seed).unwrap())
    );
    assert_ne!(
        mask,
        to_f32(&qlora_rs::ops::dropout::dropout_cuda(&ones, p, seed + 1).unwrap())
    );
    // The CPU draws the same mask (`ops::dropout::mask`); the GPU's is rounded to bf16.
    let cpu_mask = qlora_rs::ops::dropout::mask(seed, p, t * i);
    for (j, (&g, &c)) in mask.iter().zip(&cpu_mask).enumerate() {
        assert_eq!(g == 0.0, c == 0.0, "mask element {j}: GPU {g}, CPU {c}");
        assert_eq!(bf16::from_f32(c).to_f32(), g, "mask element {j}");
    }
    let kept = mask.iter().filter(|&&m| m != 0.0).count() as f64 / mask.len() as f64;
    assert!((kept - 0.75).abs() < 0.02, "kept {kept}");
    assert!(mask
        .iter()
        .all(|&m| m == 0.0 || (m - 1.0 / 0.75).abs() < 1e-2));

    let (q, dense) = nf4_weight(&mut r, out, i, &dev);
    let w32 = to_f32(&dense);
    let (xf, xb) = data(&mut r, t * i, 1.0);
    let (af, ab) = data(&mut r, rank * i, 0.1);
    let (bf, bb) = data(&mut r, out * rank, 0.1);
    let (dyf, dyb) = data(&mut r, t * out, 1.0);
    let x = Tensor::from_vec(xb, &[t, i], &dev).unwrap();
    let dy = Tensor::from_vec(dyb, &[t, out], &dev).unwrap();
    // A and B in one flat bf16 buffer, gradients in one flat f32 buffer, as the CUDA step holds them.
    let flat: Vec<bf16> = ab.iter().chain(&bb).copied().collect();
    let flat = Tensor::from_vec(flat, &[rank * i + out * rank], &dev).unwrap();
    let grads = Tensor::zeros(&[rank * i + out * rank], DType::F32, &dev).unwrap();
    let view = gemm::LoraView {
        a: gemm::DevMat {
            ptr: qlora_rs_ptr(&flat, 0, 2),
            rows: rank,
            cols: i,
        },
        b: gemm::DevMat {
            ptr: qlora_rs_ptr(&flat, rank * i, 2),
            rows: out,
            cols: rank,
        },
        grad_a: qlora_rs_ptr(&grads, 0, 4),
        grad_b: qlora_rs_ptr(&grads, rank * i, 4),
        scale: 2.0,
        dropout: Some((p, seed)),
    };
    let (y, xa) = unsafe { gemm::lora_forward_view(&x, &q, &view) }.unwrap();
    let dx = unsafe { gemm::lora_backward_view(&x, &q, &view, &xa, &dy) }.unwrap();
    let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    let d = linear::Dims {
        tokens: t,
        in_features: i,
        out_features: out,
    };
    let (af64, bf64, m64) = (f(&af), f(&bf), f(&mask));
    let l = linear::Lora {
        a: &af64,
        b: &bf64,
        rank,
        scale: 2.0,
    };
    let (y_ref, xa_ref) =
        linear::forward(d, &f(&xf), &f(&w32), None, Some(&l), Some(&m64)).unwrap();
    close("dropout lora y", &to_f32(&y), &y_ref, 2e-2);
    let (mut ga, mut gb) = (vec![0.0; rank * i], vec![0.0; out * rank]);
    let dx_ref = linear::backward(
        d,
        &f(&xf),
        &f(&w32),
        Some(linear::LoraGrads {
            lora: l,
            xa: &xa_ref,
            grad_a: &mut ga,
            grad_b: &mut gb,
        }),
        Some(&m64),
        &f(&dyf),
        true,
    )
    .unwrap()
    .unwrap();
    close("dropout lora dx", &to_f32(&dx), &dx_ref, 2e-2);
    let g = grads.to_vec::<f32>().unwrap();
    close("dropout lora dA", &g[..rank * i], &ga, 2e-2);
    close("dropout lora dB", &g[rank * i..], &gb, 2e-2);
    // dx added into a gradient the input already has (β = 1 in the GEMMs), with and without
    // dropout; the adapter's gradients accumulate once more.
    let (accf, accb) = data(&mut r, t * i, 1.0);
    let acc = Tensor::from_vec(accb.clone(), &[t, i], &dev).unwrap();
    let summed = unsafe { gemm::lora_backward_view_acc(&x, &q, &view, &xa, &dy, acc) }.unwrap();
    let want: Vec<f64> = dx_ref
        .iter()
        .zip(&accf)
        .map(|(d, &a)| d + a as f64)
        .collect();
    close("dropout lora dx accumulated", &to_f32(&summed), &want, 2e-2);
    let g2 = grads.to_vec::<f32>().unwrap();
    let twice: Vec<f64> = ga.iter().chain(&gb).map(|v| 2.0 * v).collect();
    close("dropout lora dA, dB twice", &g2, &twice, 2e-2);
    let plain = gemm::LoraView {
        dropout: None,
        ..view
    };
    let acc = Tensor::from_vec(accb, &[t, i], &dev).unwrap();
    let (_, xa_plain) = unsafe { gemm::lora_forward_view(&x, &q, &plain) }.unwrap();
    let kept = unsafe { gemm::lora_backward_view(&x, &q, &plain, &xa_plain, &dy) }.unwrap();
    let summed =
        unsafe { gemm::lora_backward_view_acc(&x, &q, &plain, &xa_plain, &dy, acc) }.unwrap();
    let want: Vec<f64> = to_f32(&kept)
        .iter()
        .zip(&accf)
        .map(|(&d, &a)| d as f64 + a as f64)
        .collect();
    close("lora dx accumulated", &to_f32(&summed), &want, 2e-2);
}

/// The device address of element `at` of a CUDA tensor with `width`-byte elements.
fn qlora_rs_ptr(t: &Tensor, at: usize, width: u64) -> u64 {
    t.device_address() + at as u64 * width
}

/// An adapter of rank `rank` for W `[n, k]` as the CUDA step holds one: A and B in one flat bf16
/// buffer, their gradients in one flat f32 buffer (returned to keep them alive).
fn adapter_view(
    r: &mut impl Rng,
    dev: &Device,
    (n, k, rank): (usize, usize, usize),
    dropout: Option<(f32, u64)>,
) -> (gemm::LoraView, Tensor, Tensor) {
    let (_, ab) = data(r, rank * k + n * rank, 0.1);
    let flat = Tensor::from_vec(ab, &[rank * k + n * rank], dev).unwrap();
    let grads = Tensor::zeros(&[rank * k + n * rank], DType::F32, dev).unwrap();
    let view = gemm::LoraView {
        a: gemm::DevMat {
            ptr: qlora_rs_ptr(&flat, 0, 2),
            rows: rank,
            cols: k,
        },
        b: gemm::DevMat {
            ptr: qlora_rs_ptr(&flat, rank * k, 2),
            rows: n,
            cols: rank,
        },
        grad_a: qlora_rs_ptr(&grads, 0, 4),
        grad_b: qlora_rs_ptr(&grads, rank * k, 4),
        scale: 1.5,
        dropout,
    };
    (view, flat, grads)
}

/// q/k/v (and gate/up) of one input as one launch: each output and each `xa` equal, bit for
/// bit, what the projection gives alone. Shapes: output widths that are not tile multiples and
/// differ (GQA's k/v narrower than q), a projection without an adapter, ranks 8 and 16,
/// dropout on one, nine tile rows (a full group of the tile order and one over), and M ≤ 16
/// (each weight on the small-M kernel).
#[test]
fn grouped_nf4_forward_equals_each_projection_alone() {
    let Some(dev) = gpu_or_skip("grouped_nf4_forward_equals_each_projection_alone") else {
        return;
    };
    let mut r = rand::rngs::StdRng::seed_from_u64(21);
    // (M, K, [(N, LoRA rank)] per projection)
    type Case = (usize, usize, &'static [(usize, Option<usize>)]);
    let cases: [Case; 4] = [
        (300, 576, &[(520, Some(16)), (136, None), (136, Some(8))]),
        (1096, 96, &[(200, Some(8)), (72, Some(8)), (72, Some(8))]),
        (97, 64, &[(264, Some(16)), (264, None)]),
        (5, 96, &[(136, Some(8)), (40, Some(8)), (40, None)]),
    ];
    for (m, k, groups) in cases {
        let (_, xb) = data(&mut r, m * k, 1.0);
        let x = Tensor::from_vec(xb, &[m, k], &dev).unwrap();
        let mut weights = Vec::new();
        let mut views = Vec::new();
        let mut keep = Vec::new();
        for (j, &(n, rank)) in groups.iter().enumerate() {
            weights.push(nf4_weight(&mut r, n, k, &dev).0);
            views.push(rank.map(|rank| {
                let dropout = (j == 2).then_some((0.25, 77));
                let (v, flat, grads) = adapter_view(&mut r, &dev, (n, k, rank), dropout);
                keep.push((flat, grads));
                v
            }));
        }
        let layers: Vec<_> = weights
            .iter()
            .zip(&views)
            .map(|(w, v)| (w, v.as_ref()))
            .collect();
        let grouped = unsafe { gemm::lora_forward_group(&x, &layers) }.unwrap();
        assert_eq!(grouped.len(), groups.len());
        for (j, ((w, v), (y, xa))) in layers.iter().zip(&grouped).enumerate() {
            let what = format!("M {m}, K {k}, projection {j} of {groups:?}");
            let (want_y, want_xa) = match v {
                Some(v) => {
                    let (y, xa) = unsafe { gemm::lora_forward_view(&x, w, v) }.unwrap();
                    (y, Some(xa))
                }
                None => (gemm::nf4_forward_cuda(&x, w, None).unwrap(), None),
            };
            assert_eq!(y.shape(), want_y.shape(), "{what}");
            assert_eq!(
                y.to_vec::<bf16>().unwrap(),
                want_y.to_vec::<bf16>().unwrap(),
                "y of {what}"
            );
            assert_eq!(xa.is_some(), want_xa.is_some(), "{what}");
            if let (Some(xa), Some(want)) = (xa, want_xa) {
                assert_eq!(
                    xa.to_vec::<bf16>().unwrap(),
                    want.to_vec::<bf16>().unwrap(),
                    "xa of {what}"
                );
            }
        }
    }
    // Refused: no weight, more than the kernel's groups, a weight of another input width.
    let x = Tensor::from_vec(vec![bf16::ONE; 32 * 64], &[32, 64], &dev).unwrap();
    let (w64, _) = nf4_weight(&mut r, 40, 64, &dev);
    let (w96, _) = nf4_weight(&mut r, 40, 96, &dev);
    let four: Vec<_> = (0..4).map(|_| (&w64, None)).collect();
    for (layers, want) in [
        (vec![], "1 to 3 weights, got 0"),
        (four, "1 to 3 weights, got 4"),
        (vec![(&w64, None), (&w96, None)], "W [N, 64]"),
    ] {
        let err = unsafe { gemm::lora_forward_group(&x, &layers) }
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("grouped lora forward") && err.contains(want),
            "{want}: {err}"
        );
    }
}

/// The backward of q/k/v (or gate/up) as one group: every adapter's dA and dB, and the input's
/// gradient `Σ_j dy_j·W_j + s_j·(dy_j·B_j)·A_j` summed in one GEMM (rounded once), against the
/// f64 CPU reference of each layer summed; written anew, over the spent x, added into a
/// gradient x already has, or not at all (an input without a gradient). Shapes as the forward's
/// test, with dropout on one adapter and M = 5 (the backward has no small-M kernel).
#[test]
fn grouped_nf4_backward_matches_the_sum_of_each_projection() {
    let Some(dev) = gpu_or_skip("grouped_nf4_backward_matches_the_sum_of_each_projection") else {
        return;
    };
    let mut r = rand::rngs::StdRng::seed_from_u64(22);
    type Case = (usize, usize, &'static [(usize, Option<usize>)]);
    let cases: [Case; 3] = [
        (300, 576, &[(520, Some(16)), (136, None), (136, Some(8))]),
        (97, 64, &[(264, Some(16)), (264, Some(8))]),
        (5, 96, &[(136, Some(8)), (40, None), (40, Some(8))]),
    ];
    let f = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<f64>>();
    for (m, k, groups) in cases {
        let (xf, xb) = data(&mut r, m * k, 1.0);
        let x = Tensor::from_vec(xb.clone(), &[m, k], &dev).unwrap();
        let ones = Tensor::from_vec(vec![bf16::ONE; m * k], &[m, k], &dev).unwrap();
        let mut weights = Vec::new();
        let mut dense = Vec::new();
        let mut views = Vec::new();
        let mut keep = Vec::new();
        let mut dys = Vec::new();
        let mut dyf = Vec::new();
        for (j, &(n, rank)) in groups.iter().enumerate() {
            let (q, d) = nf4_weight(&mut r, n, k, &dev);
            weights.push(q);
            dense.push(f(&to_f32(&d)));
            views.push(rank.map(|rank| {
                let dropout = (j == 2).then_some((0.25, 91));
                let (v, flat, grads) = adapter_view(&mut r, &dev, (n, k, rank), dropout);
                keep.push((v, flat, grads));
                v
            }));
            let (df, db) = data(&mut r, m * n, 1.0);
            dys.push(Tensor::from_vec(db, &[m, n], &dev).unwrap());
            dyf.push(f(&df));
        }
        let layers: Vec<_> = weights
            .iter()
            .zip(&views)
            .map(|(w, v)| (w, v.as_ref()))
            .collect();
        let outs = unsafe { gemm::lora_forward_group(&x, &layers) }.unwrap();
        // The f64 reference, layer by layer, summed.
        let mut dx_ref = vec![0.0f64; m * k];
        let mut grads_ref = Vec::new();
        for (j, &(n, rank)) in groups.iter().enumerate() {
            let d = linear::Dims {
                tokens: m,
                in_features: k,
                out_features: n,
            };
            let lora = views[j].map(|v| {
                let flat = &keep
                    .iter()
                    .find(|(kv, _, _)| kv.a.ptr == v.a.ptr)
                    .unwrap()
                    .1;
                let ab = f(&to_f32(flat));
                let rank = rank.unwrap();
                (v, ab[..rank * k].to_vec(), ab[rank * k..].to_vec(), rank)
            });
            let mask = views[j].and_then(|v| v.dropout).map(|(p, seed)| {
                f(&to_f32(
                    &qlora_rs::ops::dropout::dropout_cuda(&ones, p, seed).unwrap(),
                ))
            });
            let (dx_j, grads_j) = match &lora {
                Some((v, a, b, rank)) => {
                    let l = linear::Lora {
                        a,
                        b,
                        rank: *rank,
                        scale: v.scale as f64,
                    };
                    let (_, xa) =
                        linear::forward(d, &f(&xf), &dense[j], None, Some(&l), mask.as_deref())
                            .unwrap();
                    let (mut ga, mut gb) = (vec![0.0; rank * k], vec![0.0; n * rank]);
                    let dx = linear::backward(
                        d,
                        &f(&xf),
                        &dense[j],
                        Some(linear::LoraGrads {
                            lora: l,
                            xa: &xa,
                            grad_a: &mut ga,
                            grad_b: &mut gb,
                        }),
                        mask.as_deref(),
                        &dyf[j],
                        true,
                    )
                    .unwrap()
                    .unwrap();
                    (dx, Some(ga.into_iter().chain(gb).collect::<Vec<f64>>()))
                }
                None => (
                    linear::backward(d, &f(&xf), &dense[j], None, None, &dyf[j], true)
                        .unwrap()
                        .unwrap(),
                    None,
                ),
            };
            for (s, v) in dx_ref.iter_mut().zip(dx_j) {
                *s += v;
            }
            grads_ref.push(grads_j);
        }
        let grad_layers: Vec<gemm::GroupGrad> = weights
            .iter()
            .zip(&views)
            .zip(&outs)
            .zip(&dys)
            .map(|(((w, v), (_, xa)), dy)| gemm::GroupGrad {
                w,
                lora: v.as_ref().zip(xa.as_ref()),
                dy,
            })
            .collect();
        let what = format!("M {m}, K {k}, {groups:?}");
        let check_grads = |times: f64| {
            for (j, want) in grads_ref.iter().enumerate() {
                if let (Some(want), Some(v)) = (want, views[j]) {
                    let g = &keep
                        .iter()
                        .find(|(kv, _, _)| kv.a.ptr == v.a.ptr)
                        .unwrap()
                        .2;
                    let want: Vec<f64> = want.iter().map(|w| w * times).collect();
                    close(
                        &format!("dA, dB of layer {j}, {what}"),
                        &g.to_vec::<f32>().unwrap(),
                        &want,
                        1e-2,
                    );
                }
            }
        };
        // Written anew; one rounding of the fp32 sum (the dropout term is a second).
        let dx = unsafe { gemm::lora_backward_group(gemm::LayerInput::Kept(&x), &grad_layers) }
            .unwrap()
            .unwrap();
        close(&format!("dx, {what}"), &to_f32(&dx), &dx_ref, 8e-3);
        check_grads(1.0);
        // Added into the gradient x already has.
        let (accf, accb) = data(&mut r, m * k, 1.0);
        let acc = Tensor::from_vec(accb, &[m, k], &dev).unwrap();
        let summed = unsafe {
            gemm::lora_backward_group(gemm::LayerInput::Accumulate(&x, acc), &grad_layers)
        }
        .unwrap()
        .unwrap();
        let want: Vec<f64> = dx_ref
            .iter()
            .zip(&accf)
            .map(|(d, &a)| d + a as f64)
            .collect();
        close(
            &format!("dx accumulated, {what}"),
            &to_f32(&summed),
            &want,
            8e-3,
        );
        check_grads(2.0);
        // No gradient for x: the adapters' only.
        let none = unsafe { gemm::lora_backward_group(gemm::LayerInput::Frozen(&x), &grad_layers) }
            .unwrap();
        assert!(none.is_none(), "{what}");
        check_grads(3.0);
        // Over a spent x: the same bits as anew.
        let spent = Tensor::from_vec(xb, &[m, k], &dev).unwrap();
        let over =
            unsafe { gemm::lora_backward_group(gemm::LayerInput::Spent(spent), &grad_layers) }
                .unwrap()
                .unwrap();
        assert_eq!(
            over.to_vec::<bf16>().unwrap(),
            dx.to_vec::<bf16>().unwrap(),
            "{what}"
        );
        check_grads(4.0);
        // The adapters' gradients are grouped launches of the products each layer computes alone
        // (split along K alike): the same bits as each layer's own backward.
        let twin = |v: &gemm::LoraView| {
            let (ra, rb) = (v.a.rows * v.a.cols, v.b.rows * v.b.cols);
            let grads = Tensor::zeros(&[ra + rb], DType::F32, &dev).unwrap();
            let view = gemm::LoraView {
                grad_a: qlora_rs_ptr(&grads, 0, 4),
                grad_b: qlora_rs_ptr(&grads, ra, 4),
                ..*v
            };
            (view, grads)
        };
        let alone: Vec<_> = views.iter().map(|v| v.as_ref().map(twin)).collect();
        let grouped: Vec<_> = views.iter().map(|v| v.as_ref().map(twin)).collect();
        for (j, ((w, (_, xa)), dy)) in weights.iter().zip(&outs).zip(&dys).enumerate() {
            if let (Some((v, _)), Some(xa)) = (&alone[j], xa) {
                unsafe { gemm::lora_backward_view(&x, w, v, xa, dy) }.unwrap();
            }
        }
        let twins: Vec<gemm::GroupGrad> = grad_layers
            .iter()
            .zip(&grouped)
            .map(|(l, t)| gemm::GroupGrad {
                lora: l.lora.zip(t.as_ref()).map(|((_, xa), (v, _))| (v, xa)),
                ..*l
            })
            .collect();
        unsafe { gemm::lora_backward_group(gemm::LayerInput::Frozen(&x), &twins) }.unwrap();
        for (j, (a, g)) in alone.iter().zip(&grouped).enumerate() {
            if let (Some((_, a)), Some((_, g))) = (a, g) {
                assert_eq!(
                    a.to_vec::<f32>().unwrap(),
                    g.to_vec::<f32>().unwrap(),
                    "dA, dB of layer {j} grouped and alone, {what}"
                );
            }
        }
    }
}
