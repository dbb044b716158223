//! CUDA kernels of the step (RMSNorm, RoPE, SwiGLU, embedding, casts and bias add, column
//! split and concat, cross-entropy, AdamW)
//! against their CPU references, on fresh random data of awkward sizes. Without a GPU each test
//! prints `SKIPPED (no CUDA device)` and passes, unless QLORA_REQUIRE_GPU=1.

use half::bf16;
use qlora_rs::ops::rmsnorm::Norm;
use qlora_rs::ops::swiglu::Act;
use qlora_rs::ops::{cross_entropy, embedding, rmsnorm, rope, split, swiglu};
use qlora_rs::testing::{check_close, gpu_or_skip, Tolerance};
use qlora_rs::train::optimizer::{clip_grad_norm, AdamW, AdamWConfig, AdamWCuda};
use qlora_rs::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// Random values already rounded to bf16, as f32 (for the CPU) and bf16 (for the GPU).
fn bf16_data(r: &mut impl Rng, n: usize, scale: f32) -> (Vec<f32>, Vec<bf16>) {
    let b: Vec<bf16> = (0..n)
        .map(|_| bf16::from_f32(r.random_range(-1.0..1.0) * scale))
        .collect();
    (b.iter().map(|v| v.to_f32()).collect(), b)
}

fn up(dev: &Device, v: Vec<bf16>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape, dev).unwrap()
}

fn f64s_bf16(t: &Tensor) -> Vec<f64> {
    t.to_vec::<bf16>()
        .unwrap()
        .iter()
        .map(|v| v.to_f32() as f64)
        .collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

const BF16: Tolerance = Tolerance {
    abs: 1e-2,
    rel: 1.6e-2,
};

fn check(what: &str, got: &[f64], want: &[f64], tol: Tolerance) {
    if let Err(e) = check_close(what, got, want, tol) {
        panic!("{e}");
    }
}

#[test]
fn kernels_rmsnorm_match_cpu() {
    let Some(dev) = gpu_or_skip("kernels_rmsnorm_match_cpu") else {
        return;
    };
    let mut r = rng(1);
    for (t, d) in [
        (1usize, 96usize),
        (7, 576),
        (97, 4097),
        (33, 4096),
        (13, 1037),
    ] {
        let (x, xb) = bf16_data(&mut r, t * d, 3.0);
        let (w, wb) = bf16_data(&mut r, d, 1.5);
        let (dy, dyb) = bf16_data(&mut r, t * d, 1.0);
        let (res, resb) = bf16_data(&mut r, t * d, 1.0);
        let (xg, wg) = (up(&dev, xb.clone(), &[t, d]), up(&dev, wb, &[d]));
        let dyg = up(&dev, dyb, &[t, d]);
        let resg = up(&dev, resb, &[t, d]);
        // Llama's norm, and Gemma's with the effective weight 1 + w.
        for norm in [Norm::plain(1e-5), Norm::unit_offset(1e-6)] {
            let (y_ref, rstd_ref) = rmsnorm::forward(&x, &w, d, norm).unwrap();
            let (y, rstd) = rmsnorm::forward_cuda(&xg, &wg, norm).unwrap();
            check(
                &format!("rmsnorm y {t}x{d} {norm:?}"),
                &f64s_bf16(&y),
                &f64s(&y_ref),
                BF16,
            );
            check(
                "rmsnorm rstd",
                &f64s(&rstd.to_vec::<f32>().unwrap()),
                &f64s(&rstd_ref),
                Tolerance::for_dtype(DType::F32),
            );
            let dx_ref = rmsnorm::backward(&x, &w, &rstd_ref, &dy, d, norm).unwrap();
            let dx = rmsnorm::backward_cuda(&xg, &wg, &rstd, &dyg, None, norm).unwrap();
            check(
                &format!("rmsnorm dx {norm:?}"),
                &f64s_bf16(&dx),
                &f64s(&dx_ref),
                BF16,
            );
            let dx2 = rmsnorm::backward_cuda(&xg, &wg, &rstd, &dyg, Some(&resg), norm).unwrap();
            let want: Vec<f64> = dx_ref
                .iter()
                .zip(&res)
                .map(|(a, b)| (*a + *b) as f64)
                .collect();
            check("rmsnorm dx + residual", &f64s_bf16(&dx2), &want, BF16);
            // Fused residual: h = bf16(x + res), then the norm of h.
            let (h, y2, _) = rmsnorm::forward_residual_cuda(&xg, &resg, &wg, norm).unwrap();
            let h_ref: Vec<f32> = x
                .iter()
                .zip(&res)
                .map(|(a, b)| bf16::from_f32(a + b).to_f32())
                .collect();
            assert_eq!(f64s_bf16(&h), f64s(&h_ref));
            let (y2_ref, _) = rmsnorm::forward(&h_ref, &w, d, norm).unwrap();
            check("rmsnorm+residual y", &f64s_bf16(&y2), &f64s(&y2_ref), BF16);
        }
    }
    let bad = Tensor::zeros(&[3, 4], DType::F32, &dev).unwrap();
    let w = Tensor::zeros(&[4], DType::BF16, &dev).unwrap();
    let err = rmsnorm::forward_cuda(&bad, &w, Norm::plain(1e-5))
        .unwrap_err()
        .to_string();
    assert!(err.contains("rmsnorm") && err.contains("f32"), "{err}");
}

/// Gemma's norm on the GPU is transformers' `Gemma2RMSNorm`: `(x·r)·(1 + w)` in f32, rounded
/// once to bf16. Against that formula (in f64, then rounded) nearly every element is equal; a
/// kernel that rounded `1 + w` to bf16 first (small weights: bf16's step near 1 is 2⁻⁷) would
/// miss most of them, which the test shows it can tell.
#[test]
fn kernels_rmsnorm_unit_offset_rounds_once_like_gemma() {
    let Some(dev) = gpu_or_skip("kernels_rmsnorm_unit_offset_rounds_once_like_gemma") else {
        return;
    };
    let mut r = rng(11);
    let (t, d, eps) = (13usize, 1037usize, 1e-6);
    let (x, xb) = bf16_data(&mut r, t * d, 3.0);
    let (w, wb) = bf16_data(&mut r, d, 0.03);
    let (y, _) = rmsnorm::forward_cuda(
        &up(&dev, xb, &[t, d]),
        &up(&dev, wb, &[d]),
        Norm::unit_offset(eps),
    )
    .unwrap();
    let y = y.to_vec::<bf16>().unwrap();
    let (mut same, mut same_if_bf16_offset) = (0usize, 0usize);
    for row in 0..t {
        let xr = &x[row * d..(row + 1) * d];
        let ms = xr.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64;
        let rs = 1.0 / (ms + eps).sqrt();
        for i in 0..d {
            let xhat = xr[i] as f64 * rs;
            let want = bf16::from_f64(xhat * (1.0 + w[i] as f64));
            let got = y[row * d + i];
            let ulp = (got.to_f64() - want.to_f64()).abs() / want.to_f64().abs().max(1e-30);
            assert!(ulp <= 1.0 / 128.0, "y[{row}, {i}] = {got} vs {want}");
            same += usize::from(got == want);
            let w_bf16 = bf16::from_f32(1.0 + w[i]).to_f64();
            same_if_bf16_offset += usize::from(bf16::from_f64(xhat * w_bf16) == want);
        }
    }
    let n = t * d;
    assert!(
        same * 100 >= n * 99,
        "{same} of {n} equal to bf16((x·r)·(1 + w))"
    );
    assert!(
        same_if_bf16_offset * 100 < n * 80,
        "the test cannot tell a bf16 1 + w apart: {same_if_bf16_offset} of {n}"
    );
}

#[test]
fn kernels_rope_match_cpu_with_restarting_positions() {
    let Some(dev) = gpu_or_skip("kernels_rope_match_cpu_with_restarting_positions") else {
        return;
    };
    let mut r = rng(2);
    let scaling = rope::RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    for (heads, hd, cu) in [
        (9usize, 64usize, vec![0usize, 5, 6, 300]),
        (8, 128, vec![0, 1]),
        (3, 64, vec![0, 4097]),
    ] {
        let pos = rope::positions_from_cu_seqlens(&cu);
        let t = pos.len();
        let freqs = rope::inv_freq(hd, 500_000.0, scaling);
        let (x, xb) = bf16_data(&mut r, t * heads * hd, 2.0);
        let mut want = x.clone();
        rope::forward(&mut want, &pos, heads, hd, &freqs, 1.0).unwrap();
        let mut xg = up(&dev, xb, &[t, heads, hd]);
        let pg = Tensor::from_vec(
            pos.iter().map(|&p| p as i32).collect::<Vec<_>>(),
            &[t],
            &dev,
        )
        .unwrap();
        let fg = Tensor::from_vec(freqs.clone(), &[hd / 2], &dev).unwrap();
        rope::apply_cuda(&mut xg, &pg, &fg, 1.0, false).unwrap();
        check(
            &format!("rope {heads}x{hd} T={t}"),
            &f64s_bf16(&xg),
            &f64s(&want),
            BF16,
        );
        rope::apply_cuda(&mut xg, &pg, &fg, 1.0, true).unwrap();
        check(
            "rope then its backward",
            &f64s_bf16(&xg),
            &f64s(&x),
            Tolerance {
                abs: 3e-2,
                rel: 3e-2,
            },
        );
    }
}

/// Partial rotary (only the first `rot` dims of each head) and the attention factor `m`: the
/// kernel against the CPU, the pass-through dims untouched bit for bit, and the backward after the
/// forward giving back `m²·x` on the rotated dims.
#[test]
fn kernels_rope_partial_rotary_and_magnitude_match_cpu() {
    let Some(dev) = gpu_or_skip("kernels_rope_partial_rotary_and_magnitude_match_cpu") else {
        return;
    };
    let mut r = rng(13);
    // (heads, head_dim, rot, cu_seqlens, m)
    for (heads, hd, rot, cu, m) in [
        (3usize, 24usize, 18usize, vec![0usize, 7, 67], 1.1902381f32),
        (5, 128, 96, vec![0, 1, 33], 1.0),
        (3, 24, 24, vec![0, 7], 0.83),
        (2, 64, 64, vec![0, 1], 1.25),
        (7, 26, 2, vec![0, 5, 6, 13], 1.3),
        (1, 7, 6, vec![0, 3, 300], 0.9),
    ] {
        let pos = rope::positions_from_cu_seqlens(&cu);
        let t = pos.len();
        let freqs = rope::inv_freq(rot, 10_000.0, rope::RopeScaling::None);
        let (x, xb) = bf16_data(&mut r, t * heads * hd, 2.0);
        let mut want = x.clone();
        rope::forward(&mut want, &pos, heads, hd, &freqs, m).unwrap();
        let mut xg = up(&dev, xb.clone(), &[t, heads, hd]);
        let pg = Tensor::from_vec(
            pos.iter().map(|&p| p as i32).collect::<Vec<_>>(),
            &[t],
            &dev,
        )
        .unwrap();
        let fg = Tensor::from_vec(freqs.clone(), &[rot / 2], &dev).unwrap();
        rope::apply_cuda(&mut xg, &pg, &fg, m, false).unwrap();
        let what = format!("rope {heads}x{hd} rot {rot} m {m} T={t}");
        let got = xg.to_vec::<bf16>().unwrap();
        for (j, (g, x)) in got.iter().zip(&xb).enumerate() {
            if j % hd >= rot {
                assert_eq!(g.to_bits(), x.to_bits(), "{what}: pass-through element {j}");
            }
        }
        check(&what, &f64s_bf16(&xg), &f64s(&want), BF16);
        rope::apply_cuda(&mut xg, &pg, &fg, m, true).unwrap();
        let m2 = (m as f64) * (m as f64);
        let back: Vec<f64> = x
            .iter()
            .enumerate()
            .map(|(j, &v)| {
                if j % hd < rot {
                    v as f64 * m2
                } else {
                    v as f64
                }
            })
            .collect();
        check(
            &format!("{what}: then its backward"),
            &f64s_bf16(&xg),
            &back,
            Tolerance {
                abs: 3e-2,
                rel: 3e-2,
            },
        );
    }
    // freqs wider than the head: refused before launch.
    let mut xg = up(&dev, vec![bf16::ONE; 2 * 8], &[1, 2, 8]);
    let pg = Tensor::from_vec(vec![0i32], &[1], &dev).unwrap();
    let fg = Tensor::from_vec(vec![1.0f32; 5], &[5], &dev).unwrap();
    let err = rope::apply_cuda(&mut xg, &pg, &fg, 1.0, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("rope (cuda)") && err.contains("head_dim 8"),
        "{err}"
    );
}

/// The column split and its concat on the GPU: bit for bit the CPU's, for odd widths (2 bytes
/// per thread) and widths that are multiples of 8 (16 bytes per thread), a missing part
/// concatenated as zeros.
#[test]
fn kernels_split_cols_and_concat_are_exact() {
    let Some(dev) = gpu_or_skip("kernels_split_cols_and_concat_are_exact") else {
        return;
    };
    let mut r = rng(14);
    let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for t in [1usize, 7, 67] {
        for widths in [
            vec![24usize, 12, 12],
            vec![5],
            vec![37, 37],
            vec![64, 16, 16],
            vec![8, 3, 8],
        ] {
            let w: usize = widths.iter().sum();
            let (x, xb) = bf16_data(&mut r, t * w, 3.0);
            let want = split::split(&x, t, &widths).unwrap();
            let xg = up(&dev, xb.clone(), &[t, w]);
            let parts = split::split_cols(&xg, &widths).unwrap();
            let what = format!("split T={t} widths {widths:?}");
            for (k, (p, want)) in parts.iter().zip(&want).enumerate() {
                assert_eq!(p.shape(), [t, widths[k]], "{what}");
                let got: Vec<f32> = p
                    .to_vec::<bf16>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_f32())
                    .collect();
                assert_eq!(&got, want, "{what}: part {k}");
            }
            let back = split::concat_cols(&parts.iter().collect::<Vec<_>>()).unwrap();
            assert_eq!(
                bits(&back.to_vec::<bf16>().unwrap()),
                bits(&xb),
                "{what}: concat"
            );
            // The last part missing: zeros in its columns.
            if widths.len() == 1 {
                continue;
            }
            let mut opt: Vec<Option<&Tensor>> = parts.iter().map(Some).collect();
            *opt.last_mut().unwrap() = None;
            let y = split::concat_cols_or_zeros(&opt, &widths).unwrap();
            let last = w - widths.last().unwrap();
            let want: Vec<u16> = xb
                .iter()
                .enumerate()
                .map(|(j, v)| if j % w >= last { 0 } else { v.to_bits() })
                .collect();
            assert_eq!(
                bits(&y.to_vec::<bf16>().unwrap()),
                want,
                "{what}: a part missing"
            );
        }
    }
    // f32 on the GPU is not an activation: refused by name.
    let xf = Tensor::from_vec(vec![1.0f32; 6], &[2, 3], &dev).unwrap();
    let err = split::split_cols(&xf, &[1, 2]).unwrap_err().to_string();
    assert!(err.contains("split_cols") && err.contains("bf16"), "{err}");
}

#[test]
fn kernels_swiglu_match_cpu() {
    let Some(dev) = gpu_or_skip("kernels_swiglu_match_cpu") else {
        return;
    };
    let mut r = rng(3);
    for n in [1usize, 7 * 97, 1536 * 33 + 5, 13 * 1037] {
        let (g, gb) = bf16_data(&mut r, n, 6.0);
        let (u, ub) = bf16_data(&mut r, n, 2.0);
        let (dh, dhb) = bf16_data(&mut r, n, 1.0);
        let (gg, ug, dhg) = (
            up(&dev, gb.clone(), &[n]),
            up(&dev, ub.clone(), &[n]),
            up(&dev, dhb, &[n]),
        );
        // SwiGLU (Llama, Qwen) and GeGLU (Gemma).
        for act in [Act::Silu, Act::GeluTanh] {
            check(
                &format!("glu h {act:?} n = {n}"),
                &f64s_bf16(&swiglu::forward_cuda(&gg, &ug, act).unwrap()),
                &f64s(&swiglu::forward(&g, &u, act).unwrap()),
                BF16,
            );
            let (dg_ref, du_ref) = swiglu::backward(&g, &u, &dh, act).unwrap();
            // In place over copies of gate and up (the originals are read again).
            let (gc, uc) = (up(&dev, gb.clone(), &[n]), up(&dev, ub.clone(), &[n]));
            let (dg, du) = swiglu::backward_cuda(gc, uc, &dhg, act).unwrap();
            check(
                &format!("glu dgate {act:?}"),
                &f64s_bf16(&dg),
                &f64s(&dg_ref),
                BF16,
            );
            check(
                &format!("glu dup {act:?}"),
                &f64s_bf16(&du),
                &f64s(&du_ref),
                BF16,
            );
        }
    }
}

/// GeGLU on the GPU against transformers' `gelu_pytorch_tanh` written out (f64), times up, for
/// gates across the activation's whole shape (deep negative to large positive).
#[test]
fn kernels_geglu_is_gelu_tanh_times_up() {
    let Some(dev) = gpu_or_skip("kernels_geglu_is_gelu_tanh_times_up") else {
        return;
    };
    let mut r = rng(12);
    let n = 5 * 1037;
    let (g, gb) = bf16_data(&mut r, n, 8.0);
    let (u, ub) = bf16_data(&mut r, n, 2.0);
    let h = swiglu::forward_cuda(&up(&dev, gb, &[n]), &up(&dev, ub, &[n]), Act::GeluTanh).unwrap();
    let k = (2.0 / std::f64::consts::PI).sqrt();
    let want: Vec<f64> = g
        .iter()
        .zip(&u)
        .map(|(&x, &y)| {
            let x = x as f64;
            0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh()) * y as f64
        })
        .collect();
    check("geglu h", &f64s_bf16(&h), &want, BF16);
}

#[test]
fn kernels_embedding_and_casts_are_exact() {
    let Some(dev) = gpu_or_skip("kernels_embedding_and_casts_are_exact") else {
        return;
    };
    let mut r = rng(4);
    let (v, d) = (211usize, 97usize);
    let (table, tb) = bf16_data(&mut r, v * d, 1.0);
    let ids: Vec<u32> = (0..37).map(|_| r.random_range(0..v as u32)).collect();
    let tg = up(&dev, tb.clone(), &[v, d]);
    let got = embedding::forward_cuda(&tg, &ids, None).unwrap();
    assert_eq!(
        f64s_bf16(&got),
        f64s(&embedding::forward(&table, d, &ids, None).unwrap())
    );
    // Gemma's scaled embedding, as transformers computes it on a bf16 table: the scale rounded
    // to bf16 (√3072 = 55.4256… → 55.5), the product rounded once. Written out here; an f32
    // scale would give other values, which the test shows it can tell.
    let scale = (3072f32).sqrt();
    let s_bf16 = bf16::from_f32(scale);
    assert_eq!(s_bf16.to_f32(), 55.5);
    let got = embedding::forward_cuda(&tg, &ids, Some(scale))
        .unwrap()
        .to_vec::<bf16>()
        .unwrap();
    let (mut want, mut with_f32_scale) = (Vec::new(), Vec::new());
    for &id in &ids {
        for e in &tb[id as usize * d..(id as usize + 1) * d] {
            want.push(bf16::from_f32(e.to_f32() * s_bf16.to_f32()));
            with_f32_scale.push(bf16::from_f32(e.to_f32() * scale));
        }
    }
    assert_eq!(got, want);
    assert_ne!(got, with_f32_scale);
    for bad in [f32::NAN, f32::INFINITY] {
        let err = embedding::forward_cuda(&tg, &ids, Some(bad))
            .unwrap_err()
            .to_string();
        assert!(err.contains("scale"), "{err}");
    }
    let tg = Tensor::zeros(&[v, d], DType::BF16, &dev).unwrap();
    let err = embedding::forward_cuda(&tg, &[3, 211], None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("token id 211 at position 1"), "{err}");
    let x: Vec<f32> = (0..10_007)
        .map(|_| r.random_range(-100.0f32..100.0))
        .collect();
    let xg = Tensor::from_vec(x.clone(), &[x.len()], &dev).unwrap();
    let b = embedding::cast_cuda(&xg, DType::BF16).unwrap();
    let want: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    assert_eq!(b.to_vec::<bf16>().unwrap(), want);
    let back = embedding::cast_cuda(&b, DType::F32).unwrap();
    assert_eq!(
        back.to_vec::<f32>().unwrap(),
        want.iter().map(|v| v.to_f32()).collect::<Vec<_>>()
    );
}

#[test]
fn kernels_bias_add_matches_cpu_exactly() {
    let Some(dev) = gpu_or_skip("kernels_bias_add_matches_cpu_exactly") else {
        return;
    };
    let mut r = rng(9);
    let (rows, cols) = (37usize, 97usize);
    let (y, yb) = bf16_data(&mut r, rows * cols, 3.0);
    let (b, bb) = bf16_data(&mut r, cols, 1.0);
    let mut yg = up(&dev, yb, &[rows, cols]);
    embedding::bias_add_cuda(&mut yg, &up(&dev, bb.clone(), &[cols])).unwrap();
    // The kernel rounds the f32 sum once, so the rounded CPU sum is the exact expectation.
    let mut want = y.clone();
    qlora_rs::ops::linear::add_bias(&mut want, &b);
    let want: Vec<f64> = want
        .iter()
        .map(|&v| bf16::from_f32(v).to_f32() as f64)
        .collect();
    assert_eq!(f64s_bf16(&yg), want);
    let err = embedding::bias_add_cuda(&mut yg, &up(&dev, bb[..96].to_vec(), &[96]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("bias"), "{err}");
}

#[test]
fn kernels_cross_entropy_chunk_matches_cpu() {
    let Some(dev) = gpu_or_skip("kernels_cross_entropy_chunk_matches_cpu") else {
        return;
    };
    let mut r = rng(5);
    // Without a cap, and with Gemma 2's soft-cap (c = 3 against logits up to ±8: hard capping).
    for (rows, vocab, softcap) in [
        (1usize, 211usize, None),
        (7, 4097, None),
        (32, 49_152, None),
        (5, 1037, Some(3.0f32)),
        (9, 4097, Some(3.0)),
    ] {
        let z: Vec<f32> = (0..rows * vocab)
            .map(|_| r.random_range(-8.0f32..8.0))
            .collect();
        let targets: Vec<i64> = (0..rows)
            .map(|i| {
                if i % 3 == 1 {
                    -100
                } else {
                    r.random_range(0..vocab as i64)
                }
            })
            .collect();
        let g = 0.37f32;
        let mut zg = Tensor::from_vec(z.clone(), &[rows, vocab], &dev).unwrap();
        let loss = cross_entropy::chunk_cuda(&mut zg, &targets, g, softcap)
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        let dz = zg.to_vec::<f32>().unwrap();
        for (i, &y) in targets.iter().enumerate() {
            // z' = c·tanh(z/c) with its derivative 1 − tanh²(z/c), written out in f64.
            let cap = |v: f64| softcap.map_or(v, |c| c as f64 * (v / c as f64).tanh());
            let dcap = |v: f64| softcap.map_or(1.0, |c| 1.0 - (v / c as f64).tanh().powi(2));
            let raw = &z[i * vocab..(i + 1) * vocab];
            let row: Vec<f64> = raw.iter().map(|&v| cap(v as f64)).collect();
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            let (want_loss, want_dz): (f64, Vec<f64>) = if y < 0 {
                (0.0, vec![0.0; vocab])
            } else {
                let dz = row
                    .iter()
                    .enumerate()
                    .map(|(j, v)| {
                        g as f64
                            * ((v - lse).exp() - if j as i64 == y { 1.0 } else { 0.0 })
                            * dcap(raw[j] as f64)
                    })
                    .collect();
                (lse - row[y as usize], dz)
            };
            check(
                "ce loss",
                &[loss[i] as f64],
                &[want_loss],
                Tolerance {
                    abs: 1e-4,
                    rel: 1e-5,
                },
            );
            check(
                "ce dlogits",
                &f64s(&dz[i * vocab..(i + 1) * vocab]),
                &want_dz,
                Tolerance {
                    abs: 1e-7,
                    rel: 1e-4,
                },
            );
        }
    }
    let mut zg = Tensor::zeros(&[2, 5], DType::F32, &dev).unwrap();
    let err = cross_entropy::chunk_cuda(&mut zg, &[1, 5], 1.0, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("label 5 at position 1"), "{err}");
    for bad in [0.0f32, -30.0, f32::NAN, f32::INFINITY] {
        let err = cross_entropy::chunk_cuda(&mut zg, &[1, 0], 1.0, Some(bad))
            .unwrap_err()
            .to_string();
        assert!(err.contains("soft-cap"), "{err}");
    }
}

#[test]
fn kernels_adamw_and_grad_norm_match_cpu() {
    let Some(Device::Cuda(o)) = gpu_or_skip("kernels_adamw_and_grad_norm_match_cpu") else {
        return;
    };
    let dev = Device::Cuda(o);
    let mut r = rng(6);
    let n = 100_003;
    let cfg = AdamWConfig {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let mut p_cpu: Vec<f32> = (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect();
    let mut p_gpu = Tensor::from_vec(p_cpu.clone(), &[n], &dev).unwrap();
    let mut cpu = AdamW::new(cfg, n);
    let mut gpu = AdamWCuda::new(cfg, n, o).unwrap();
    for (step, max_norm) in [(0, 1.0), (1, 1e6), (2, 0.0)] {
        let g: Vec<f32> = (0..n)
            .map(|_| r.random_range(-0.05f32..0.05) * (1 + step) as f32)
            .collect();
        let gg = Tensor::from_vec(g.clone(), &[n], &dev).unwrap();
        let mut gc = g.clone();
        let norm = clip_grad_norm(&mut gc, max_norm);
        cpu.step(&mut p_cpu, &gc, 1e-3).unwrap();
        gpu.step(&mut p_gpu, &gg, 1e-3, max_norm).unwrap();
        let got_norm = gpu.grad_norm().unwrap();
        assert!(
            (got_norm - norm).abs() <= 1e-9 * norm,
            "norm {got_norm} vs {norm}"
        );
        check(
            "adamw params",
            &f64s(&p_gpu.to_vec::<f32>().unwrap()),
            &f64s(&p_cpu),
            Tolerance {
                abs: 1e-6,
                rel: 1e-5,
            },
        );
    }
    let host = gpu.to_host().unwrap();
    check(
        "adamw m",
        &f64s(&host.m),
        &f64s(&cpu.m),
        Tolerance {
            abs: 1e-8,
            rel: 1e-5,
        },
    );
    check(
        "adamw v",
        &f64s(&host.v),
        &f64s(&cpu.v),
        Tolerance {
            abs: 1e-10,
            rel: 1e-5,
        },
    );
    assert_eq!(host.step, 3);
}

#[test]
fn kernels_fused_lm_head_cross_entropy_matches_cpu() {
    let Some(dev) = gpu_or_skip("kernels_fused_lm_head_cross_entropy_matches_cpu") else {
        return;
    };
    let mut r = rng(7);
    // Gemma 2's soft-capped logits on odd vocabularies: c = 2 caps these logits hard.
    for (t, d, vocab, chunk, softcap) in [
        (7usize, 64usize, 211usize, 4usize, None),
        (97, 576, 4104, 32, None),
        (300, 256, 32_000, 64, None),
        (7, 64, 1037, 4, Some(2.0f32)),
        (45, 192, 2053, 32, Some(2.0)),
    ] {
        let (h, hb) = bf16_data(&mut r, t * d, 1.0);
        let (w, wb) = bf16_data(&mut r, vocab * d, 0.5);
        let targets: Vec<i64> = (0..t)
            .map(|i| {
                if i % 5 == 2 {
                    -100
                } else {
                    r.random_range(0..vocab as i64)
                }
            })
            .collect();
        let count = targets.iter().filter(|&&y| y >= 0).count();
        let g = 1.0 / count as f32;
        let want =
            cross_entropy::forward_backward(&h, &w, d, &targets, Some(g), 32, softcap).unwrap();
        let (h_dev, w_dev) = (up(&dev, hb, &[t, d]), up(&dev, wb, &[vocab, d]));
        let out = cross_entropy::lm_head_ce_cuda(&h_dev, &w_dev, &targets, Some(g), chunk, softcap)
            .unwrap();
        assert_eq!(out.count, want.count);
        // The loss alone (evaluation): no gradient, the same losses bit for bit.
        let eval =
            cross_entropy::lm_head_ce_cuda(&h_dev, &w_dev, &targets, None, chunk, softcap).unwrap();
        assert!(eval.dh.is_none());
        assert_eq!(eval.count, want.count);
        assert_eq!(
            eval.loss.to_vec::<f32>().unwrap(),
            out.loss.to_vec::<f32>().unwrap(),
            "loss-only CE, V = {vocab}"
        );
        let loss: f64 = out
            .loss
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|&v| v as f64)
            .sum();
        assert!(
            (loss - want.loss_sum).abs() <= 1e-3 * want.loss_sum,
            "loss {loss} vs {}",
            want.loss_sum
        );
        let dh_ref = f64s(want.dh.as_ref().unwrap());
        let scale = dh_ref.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        check(
            "fused lm_head+CE dh",
            &f64s_bf16(out.dh.as_ref().unwrap()),
            &dh_ref,
            Tolerance {
                abs: 2e-2 * scale,
                rel: 2e-2,
            },
        );
    }
}

/// Random weights drawn on the device equal the CPU formula (`ops::random::uniform`) bit for
/// bit, at sizes off every block edge; they are bounded by a and centred.
#[test]
fn kernels_uniform_random_matches_the_cpu_formula() {
    let Some(dev) = gpu_or_skip("kernels_uniform_random_matches_the_cpu_formula") else {
        return;
    };
    use qlora_rs::ops::random;
    let a = 0.02f32 * 3f32.sqrt();
    for (n, seed) in [(1usize, 5u64), (257, 6), (100_003, 7)] {
        let got = random::uniform_cuda(&[n], a, seed, &dev)
            .unwrap()
            .to_vec::<bf16>()
            .unwrap();
        let want: Vec<bf16> = (0..n as u64)
            .map(|i| bf16::from_f32(random::uniform(seed, i, a)))
            .collect();
        assert_eq!(got, want, "n = {n}");
        let bound = bf16::from_f32(a).to_f32();
        assert!(got.iter().all(|v| v.to_f32().abs() <= bound));
        if n > 1000 {
            let mean = got.iter().map(|v| v.to_f32() as f64).sum::<f64>() / n as f64;
            assert!(mean.abs() < 1e-3, "mean {mean}");
        }
    }
}

/// Gradients with a NaN (or an Inf) make the norm non-finite: the device skips the update
/// (parameters, m and v stay those of the last good step) and records the first such step for
/// the host, which names it (the CPU loop stops before the update, to the same effect).
#[test]
fn kernels_adamw_skips_and_records_a_non_finite_step() {
    let Some(Device::Cuda(o)) = gpu_or_skip("kernels_adamw_skips_and_records_a_non_finite_step")
    else {
        return;
    };
    let dev = Device::Cuda(o);
    let n = 1031;
    let cfg = AdamWConfig::default();
    let mut p = Tensor::from_vec(vec![0.5f32; n], &[n], &dev).unwrap();
    let mut gpu = AdamWCuda::new(cfg, n, o).unwrap();
    let good = Tensor::from_vec(vec![0.01f32; n], &[n], &dev).unwrap();
    gpu.step(&mut p, &good, 1e-3, 1.0).unwrap();
    assert_eq!(gpu.first_non_finite_step().unwrap(), None);
    let after_good = p.to_vec::<f32>().unwrap();
    let moments = gpu.to_host().unwrap();
    for (bad_value, at) in [(f32::NAN, 7usize), (f32::INFINITY, 1030)] {
        let mut g = vec![0.01f32; n];
        g[at] = bad_value;
        let bad = Tensor::from_vec(g, &[n], &dev).unwrap();
        gpu.step(&mut p, &bad, 1e-3, 1.0).unwrap();
        assert_eq!(
            p.to_vec::<f32>().unwrap(),
            after_good,
            "{bad_value} updated θ"
        );
        let now = gpu.to_host().unwrap();
        assert_eq!((now.m, now.v), (moments.m.clone(), moments.v.clone()));
        // The first bad step stays recorded.
        assert_eq!(gpu.first_non_finite_step().unwrap(), Some(2));
    }
}
