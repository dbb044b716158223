//! The CPU reference ops: finite-difference checks of every backward (f64, tiny awkward shapes),
//! forward checks against naive formulas, and bad input rejected by name.

use qlora_rs::ops::rmsnorm::Norm;
use qlora_rs::ops::swiglu::Act;
use qlora_rs::ops::{attention, cross_entropy, linear, residual, rmsnorm, rope, split, swiglu};
use qlora_rs::testing::{assert_close, Tolerance};
use rand::{Rng, SeedableRng};

fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

fn randn(r: &mut impl Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| r.random_range(-1.0..1.0) * scale).collect()
}

const FD_TOL: Tolerance = Tolerance {
    abs: 1e-7,
    rel: 1e-5,
};

/// Central differences of a scalar objective with respect to every element of `x`.
fn numeric_grad(x: &[f64], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let h = 1e-6;
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let orig = xp[i];
            xp[i] = orig + h;
            let up = f(&xp);
            xp[i] = orig - h;
            let down = f(&xp);
            xp[i] = orig;
            (up - down) / (2.0 * h)
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[test]
fn rmsnorm_backward_matches_finite_differences() {
    let mut r = rng(1);
    let (t, d, eps) = (5, 7, 1e-5);
    let x = randn(&mut r, t * d, 2.0);
    let w = randn(&mut r, d, 1.5);
    let c = randn(&mut r, t * d, 1.0);
    let (_, rstd) = rmsnorm::forward(&x, &w, d, Norm::plain(eps)).unwrap();
    let dx = rmsnorm::backward(&x, &w, &rstd, &c, d, Norm::plain(eps)).unwrap();
    let num = numeric_grad(&x, |x| {
        dot(&rmsnorm::forward(x, &w, d, Norm::plain(eps)).unwrap().0, &c)
    });
    assert_close("rmsnorm dx", &dx, &num, FD_TOL);
}

#[test]
fn rmsnorm_forward_is_x_over_rms_times_weight() {
    let x = [3.0f64, 4.0];
    let (y, rstd) = rmsnorm::forward(&x, &[1.0, 2.0], 2, Norm::plain(0.0)).unwrap();
    let rms = (12.5f64).sqrt();
    assert_close(
        "rmsnorm y",
        &y,
        &[3.0 / rms, 8.0 / rms],
        Tolerance::EXACT_F64,
    );
    assert_close("rstd", &rstd, &[1.0 / rms], Tolerance::EXACT_F64);
    assert!(rmsnorm::forward(&x, &[1.0, 2.0, 3.0], 2, Norm::plain(0.0)).is_err());
}

/// Gemma's norm written out, in f64: `y = x·r·(1 + w)` per row of `d`.
fn naive_unit_offset_norm(x: &[f64], w: &[f64], d: usize, eps: f64) -> Vec<f64> {
    x.chunks(d)
        .flat_map(|row| {
            let r = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / d as f64 + eps).sqrt();
            row.iter().zip(w).map(move |(v, wv)| v * r * (1.0 + wv))
        })
        .collect()
}

#[test]
fn rmsnorm_unit_offset_is_one_plus_w_and_its_backward_matches_finite_differences() {
    let mut r = rng(21);
    let (t, d, eps) = (5, 7, 1e-6);
    let x = randn(&mut r, t * d, 2.0);
    let w = randn(&mut r, d, 0.5);
    let c = randn(&mut r, t * d, 1.0);
    let norm = Norm::unit_offset(eps);
    let (y, rstd) = rmsnorm::forward(&x, &w, d, norm).unwrap();
    assert_close(
        "unit-offset rmsnorm y",
        &y,
        &naive_unit_offset_norm(&x, &w, d, eps),
        Tolerance {
            abs: 1e-15,
            rel: 1e-14,
        },
    );
    // The plain norm with the weight 1 + w is the same function.
    let w1: Vec<f64> = w.iter().map(|v| 1.0 + v).collect();
    let (y_plain, _) = rmsnorm::forward(&x, &w1, d, Norm::plain(eps)).unwrap();
    assert_close("x·r·(1 + w)", &y, &y_plain, Tolerance::EXACT_F64);
    let dx = rmsnorm::backward(&x, &w, &rstd, &c, d, norm).unwrap();
    let num = numeric_grad(&x, |x| dot(&naive_unit_offset_norm(x, &w, d, eps), &c));
    assert_close("unit-offset rmsnorm dx", &dx, &num, FD_TOL);
}

fn cpu_f32(v: &[f64], shape: &[usize]) -> qlora_rs::Tensor {
    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    qlora_rs::Tensor::from_vec(v, shape, &qlora_rs::Device::Cpu).unwrap()
}

fn f64s_of(t: &qlora_rs::Tensor) -> Vec<f64> {
    t.to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as f64)
        .collect()
}

/// The tape's three norms (`rmsnorm`, `head_rmsnorm`, `add_rmsnorm`) with a unit offset: the
/// recorded backward (f32) against finite differences (f64) of `x·r·(1 + w)` written out.
#[test]
fn tape_unit_offset_norms_match_finite_differences() {
    use qlora_rs::autograd::{Batch, Tape};
    let mut r = rng(22);
    let (t, heads, hd, eps) = (3usize, 2usize, 5usize, 1e-6);
    let d = heads * hd;
    // Values exact in f32, so the f64 objective sees the tape's inputs.
    let f32_exact = |v: Vec<f64>| v.iter().map(|&x| x as f32 as f64).collect::<Vec<f64>>();
    let x = f32_exact(randn(&mut r, t * d, 2.0));
    let b = f32_exact(randn(&mut r, t * d, 1.0));
    let w = f32_exact(randn(&mut r, d, 0.5));
    let wh = f32_exact(randn(&mut r, hd, 0.5));
    let c = f32_exact(randn(&mut r, t * d, 1.0));
    let norm = Norm::unit_offset(eps);
    let tol = Tolerance {
        abs: 2e-5,
        rel: 2e-4,
    };
    let batch = Batch::new(vec![0, t]).unwrap();
    let (wt, wht) = (cpu_f32(&w, &[d]), cpu_f32(&wh, &[hd]));

    let mut tape = Tape::new(qlora_rs::Device::Cpu, &batch, None, true, None).unwrap();
    let xv = tape.input(cpu_f32(&x, &[t, d]), true).unwrap();
    let y = tape.rmsnorm(&xv, &wt, norm).unwrap();
    let dx = tape.backward(&y, Some(cpu_f32(&c, &[t, d])), &xv).unwrap();
    let num = numeric_grad(&x, |x| dot(&naive_unit_offset_norm(x, &w, d, eps), &c));
    assert_close("tape rmsnorm dx", &f64s_of(&dx.unwrap()), &num, tol);

    let mut tape = Tape::new(qlora_rs::Device::Cpu, &batch, None, true, None).unwrap();
    let xv = tape.input(cpu_f32(&x, &[t, d]), true).unwrap();
    let y = tape
        .head_rmsnorm(xv.clone(), heads, hd, &wht, norm)
        .unwrap();
    let dx = tape.backward(&y, Some(cpu_f32(&c, &[t, d])), &xv).unwrap();
    let num = numeric_grad(&x, |x| dot(&naive_unit_offset_norm(x, &wh, hd, eps), &c));
    assert_close("tape head rmsnorm dx", &f64s_of(&dx.unwrap()), &num, tol);

    let mut tape = Tape::new(qlora_rs::Device::Cpu, &batch, None, true, None).unwrap();
    let av = tape.input(cpu_f32(&x, &[t, d]), true).unwrap();
    let bv = tape.input(cpu_f32(&b, &[t, d]), true).unwrap();
    let (_, y) = tape.add_rmsnorm(&av, &bv, &wt, norm).unwrap();
    let da = tape.backward(&y, Some(cpu_f32(&c, &[t, d])), &av).unwrap();
    let num = numeric_grad(&x, |a| {
        let h: Vec<f64> = a.iter().zip(&b).map(|(p, q)| p + q).collect();
        dot(&naive_unit_offset_norm(&h, &w, d, eps), &c)
    });
    assert_close("tape add + rmsnorm da", &f64s_of(&da.unwrap()), &num, tol);
}

#[test]
fn swiglu_backward_matches_finite_differences() {
    let mut r = rng(2);
    let n = 3 * 11;
    let (g, u, c) = (
        randn(&mut r, n, 3.0),
        randn(&mut r, n, 2.0),
        randn(&mut r, n, 1.0),
    );
    let (dg, du) = swiglu::backward(&g, &u, &c, Act::Silu).unwrap();
    assert_close(
        "swiglu dgate",
        &dg,
        &numeric_grad(&g, |g| dot(&swiglu::forward(g, &u, Act::Silu).unwrap(), &c)),
        FD_TOL,
    );
    assert_close(
        "swiglu dup",
        &du,
        &numeric_grad(&u, |u| dot(&swiglu::forward(&g, u, Act::Silu).unwrap(), &c)),
        FD_TOL,
    );
}

/// Gemma's scaled embedding on the CPU (an f32 table): each row times the scale, one f32
/// multiply; without a scale the rows themselves.
#[test]
fn embedding_scale_multiplies_each_row_in_f32() {
    use qlora_rs::autograd::embed;
    let mut r = rng(24);
    let (v, d) = (13usize, 7usize);
    let table: Vec<f32> = (0..v * d).map(|_| r.random_range(-1.0f32..1.0)).collect();
    let t = qlora_rs::Tensor::from_vec(table.clone(), &[v, d], &qlora_rs::Device::Cpu).unwrap();
    let ids = [4u32, 0, 12, 4];
    let scale = (3072f32).sqrt();
    let got = embed(&t, &ids, Some(scale)).unwrap();
    assert_eq!(got.shape(), &[4, d]);
    let plain = embed(&t, &ids, None).unwrap().to_vec::<f32>().unwrap();
    let got = got.to_vec::<f32>().unwrap();
    for (k, &id) in ids.iter().enumerate() {
        for j in 0..d {
            let e = table[id as usize * d + j];
            assert_eq!(plain[k * d + j], e);
            assert_eq!(got[k * d + j], e * scale, "row {k}, column {j}");
        }
    }
    let err = embed(&t, &ids, Some(f32::NAN)).unwrap_err().to_string();
    assert!(err.contains("embedding") && err.contains("scale"), "{err}");
}

/// GeGLU's activation written out (f64): transformers' `gelu_pytorch_tanh`.
fn naive_gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

#[test]
fn geglu_is_gelu_tanh_times_up_and_its_backward_matches_finite_differences() {
    let mut r = rng(25);
    let n = 3 * 11;
    let (g, u, c) = (
        randn(&mut r, n, 4.0),
        randn(&mut r, n, 2.0),
        randn(&mut r, n, 1.0),
    );
    let h = swiglu::forward(&g, &u, Act::GeluTanh).unwrap();
    let want: Vec<f64> = g
        .iter()
        .zip(&u)
        .map(|(&x, &y)| naive_gelu_tanh(x) * y)
        .collect();
    assert_close(
        "geglu h",
        &h,
        &want,
        Tolerance {
            abs: 1e-15,
            rel: 1e-14,
        },
    );
    // Not SwiGLU: the two activations differ.
    let silu = swiglu::forward(&g, &u, Act::Silu).unwrap();
    assert!(h.iter().zip(&silu).any(|(a, b)| (a - b).abs() > 1e-3));
    let (dg, du) = swiglu::backward(&g, &u, &c, Act::GeluTanh).unwrap();
    let naive = |g: &[f64], u: &[f64]| -> Vec<f64> {
        g.iter()
            .zip(u)
            .map(|(&x, &y)| naive_gelu_tanh(x) * y)
            .collect()
    };
    assert_close(
        "geglu dgate",
        &dg,
        &numeric_grad(&g, |g| dot(&naive(g, &u), &c)),
        FD_TOL,
    );
    assert_close(
        "geglu dup",
        &du,
        &numeric_grad(&u, |u| dot(&naive(&g, u), &c)),
        FD_TOL,
    );
    // Through the tape (f32): Tape::glu records the activation for its backward.
    use qlora_rs::autograd::{Batch, Tape};
    let f32_exact = |v: &[f64]| v.iter().map(|&x| x as f32 as f64).collect::<Vec<f64>>();
    let (g, u, c) = (f32_exact(&g), f32_exact(&u), f32_exact(&c));
    let (t, f) = (3usize, 11usize);
    let batch = Batch::new(vec![0, t]).unwrap();
    let mut tape = Tape::new(qlora_rs::Device::Cpu, &batch, None, true, None).unwrap();
    let gv = tape.input(cpu_f32(&g, &[t, f]), true).unwrap();
    let uv = tape.input(cpu_f32(&u, &[t, f]), true).unwrap();
    let hv = tape.glu(&gv, &uv, Act::GeluTanh).unwrap();
    assert_close(
        "tape glu h",
        &f64s_of(hv.value().unwrap()),
        &naive(&g, &u),
        Tolerance {
            abs: 1e-6,
            rel: 1e-5,
        },
    );
    let dg = tape.backward(&hv, Some(cpu_f32(&c, &[t, f])), &gv).unwrap();
    assert_close(
        "tape glu dgate",
        &f64s_of(&dg.unwrap()),
        &numeric_grad(&g, |g| dot(&naive(g, &u), &c)),
        Tolerance {
            abs: 2e-5,
            rel: 2e-4,
        },
    );
}

#[test]
fn residual_backward_accumulates() {
    let y = residual::forward(&[1.0f64, 2.0], &[0.5, -1.0]).unwrap();
    assert_eq!(y, vec![1.5, 1.0]);
    let mut acc = vec![1.0f64, 1.0];
    residual::accumulate(&mut acc, &[0.25, -2.0]).unwrap();
    assert_eq!(acc, vec![1.25, -1.0]);
    assert!(residual::forward(&[1.0f64], &[1.0, 2.0]).is_err());
}

fn llama3_freqs(head_dim: usize) -> Vec<f32> {
    rope::inv_freq(
        head_dim,
        10_000.0,
        rope::RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 16,
        },
    )
}

#[test]
fn rope_backward_matches_finite_differences() {
    let mut r = rng(3);
    let (heads, hd) = (3, 8);
    let positions = [0u32, 1, 2, 0, 1, 5, 9];
    let t = positions.len();
    let freqs = llama3_freqs(hd);
    let x = randn(&mut r, t * heads * hd, 1.0);
    let c = randn(&mut r, x.len(), 1.0);
    let mut dx = c.clone();
    rope::backward(&mut dx, &positions, heads, hd, &freqs, 1.0).unwrap();
    let num = numeric_grad(&x, |x| {
        let mut y = x.to_vec();
        rope::forward(&mut y, &positions, heads, hd, &freqs, 1.0).unwrap();
        dot(&y, &c)
    });
    assert_close("rope dx", &dx, &num, FD_TOL);
}

#[test]
fn rope_llama3_scaling_keeps_high_and_divides_low_frequencies() {
    let plain = rope::inv_freq(16, 10_000.0, rope::RopeScaling::None);
    let scaled = llama3_freqs(16);
    // wavelength 2π/f: below 16/4 = 4 kept; above 16/1 = 16 divided by 8; smooth between.
    for (p, s) in plain.iter().zip(&scaled) {
        let wavelen = 2.0 * std::f32::consts::PI / p;
        if wavelen < 4.0 {
            assert_eq!(p, s);
        } else if wavelen > 16.0 {
            assert_eq!(*s, p / 8.0);
        } else {
            assert!(*s < *p && *s > p / 8.0);
        }
    }
    assert_eq!(plain[0], 1.0);
    let linear = rope::inv_freq(16, 10_000.0, rope::RopeScaling::Linear { factor: 2.0 });
    assert_eq!(linear[3], plain[3] / 2.0);
    assert_eq!(
        rope::positions_from_cu_seqlens(&[0, 3, 5]),
        vec![0, 1, 2, 0, 1]
    );
}

/// transformers' `apply_rotary_pos_emb` with partial rotary, written out in f64: `rotate_half`
/// over `q[..., :rot]` with cos and sin times `m`, the other dims concatenated unchanged.
fn rope_naive(
    x: &[f64],
    positions: &[u32],
    heads: usize,
    head_dim: usize,
    freqs: &[f32],
    m: f64,
) -> Vec<f64> {
    let h = freqs.len();
    let mut y = x.to_vec();
    for (t, &p) in positions.iter().enumerate() {
        for head in 0..heads {
            let v = &x[(t * heads + head) * head_dim..][..head_dim];
            let out = &mut y[(t * heads + head) * head_dim..][..head_dim];
            for i in 0..h {
                let angle = (p as f32 * freqs[i]) as f64;
                let (c, s) = (m * angle.cos(), m * angle.sin());
                out[i] = v[i] * c - v[i + h] * s;
                out[i + h] = v[i + h] * c + v[i] * s;
            }
        }
    }
    y
}

/// Partial rotary and the attention factor against the naive formula (f64), and in f32 against
/// the same formula in transformers' arithmetic (f32 `cos·m` and `sin·m`, then the products):
/// bit for bit. Pass-through dims are untouched, `m = 1` is today's rotation bit for bit.
#[test]
fn rope_partial_rotary_and_magnitude_match_the_formula() {
    let mut r = rng(31);
    // (heads, head_dim, rot, positions, m)
    let cases: [(usize, usize, usize, Vec<u32>, f32); 5] = [
        (3, 24, 18, vec![0, 1, 2, 0, 1, 5, 9], 1.1902381),
        (3, 24, 24, vec![4, 0, 17], 0.83),
        (2, 128, 96, (0..67).collect(), 1.0),
        (5, 10, 2, vec![3], 2.5),
        (1, 7, 6, vec![0, 100, 1001, 65_000, 2, 3, 8, 13, 21], 1.25),
    ];
    for (heads, hd, rot, positions, m) in cases {
        let t = positions.len();
        let freqs = rope::inv_freq(rot, 10_000.0, rope::RopeScaling::None);
        let what = format!("rope {heads}x{hd} rot {rot} T={t} m={m}");
        // f64: the naive definition.
        let x = randn(&mut r, t * heads * hd, 2.0);
        let mut y = x.clone();
        rope::forward(&mut y, &positions, heads, hd, &freqs, m).unwrap();
        let want = rope_naive(&x, &positions, heads, hd, &freqs, m as f64);
        assert_close(&what, &y, &want, FD_TOL);
        for (j, (a, b)) in y.iter().zip(&x).enumerate() {
            if j % hd >= rot {
                assert_eq!(a.to_bits(), b.to_bits(), "{what}: pass-through element {j}");
            }
        }
        // f32: transformers' arithmetic, exactly.
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let mut y32 = x32.clone();
        rope::forward(&mut y32, &positions, heads, hd, &freqs, m).unwrap();
        let h = rot / 2;
        let mut want32 = x32.clone();
        for (row, &p) in want32.chunks_mut(heads * hd).zip(&positions) {
            for v in row.chunks_mut(hd) {
                for i in 0..h {
                    let angle = (p as f32 * freqs[i]) as f64;
                    let (c, s) = (angle.cos() as f32 * m, angle.sin() as f32 * m);
                    let (a, b) = (v[i], v[i + h]);
                    v[i] = a * c - b * s;
                    v[i + h] = b * c + a * s;
                }
            }
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&y32), bits(&want32), "{what} (f32)");
        // m = 1: the plain rotation of the code before the magnitude existed, bit for bit.
        if m == 1.0 {
            let mut plain = x32.clone();
            for (row, &p) in plain.chunks_mut(heads * hd).zip(&positions) {
                for v in row.chunks_mut(hd) {
                    for i in 0..h {
                        let angle = (p as f32 * freqs[i]) as f64;
                        let (c, s) = (angle.cos() as f32, angle.sin() as f32);
                        let (a, b) = (v[i], v[i + h]);
                        v[i] = a * c - b * s;
                        v[i + h] = b * c + a * s;
                    }
                }
            }
            assert_eq!(bits(&y32), bits(&plain), "{what}: m = 1");
        }
        // The backward after the forward: m² x on the rotated dims, x on the others.
        rope::backward(&mut y, &positions, heads, hd, &freqs, m).unwrap();
        let back: Vec<f64> = x
            .iter()
            .enumerate()
            .map(|(j, &v)| {
                if j % hd < rot {
                    v * (m as f64) * (m as f64)
                } else {
                    v
                }
            })
            .collect();
        assert_close(&format!("{what}: backward of forward"), &y, &back, FD_TOL);
    }
}

#[test]
fn rope_backward_with_partial_rotary_and_magnitude_matches_finite_differences() {
    let mut r = rng(32);
    for (heads, hd, rot, m) in [
        (3usize, 24usize, 18usize, 1.19f32),
        (2, 10, 4, 0.7),
        (3, 8, 8, 1.3),
    ] {
        let positions = [0u32, 1, 2, 0, 1, 5, 9];
        let t = positions.len();
        let freqs = llama3_freqs(rot);
        let x = randn(&mut r, t * heads * hd, 1.0);
        let c = randn(&mut r, x.len(), 1.0);
        let mut dx = c.clone();
        rope::backward(&mut dx, &positions, heads, hd, &freqs, m).unwrap();
        let num = numeric_grad(&x, |x| {
            let mut y = x.to_vec();
            rope::forward(&mut y, &positions, heads, hd, &freqs, m).unwrap();
            dot(&y, &c)
        });
        assert_close(
            &format!("rope dx {heads}x{hd} rot {rot} m {m}"),
            &dx,
            &num,
            FD_TOL,
        );
    }
}

#[test]
fn rope_rejects_a_rotary_width_outside_the_head_and_a_bad_magnitude() {
    let pos = [0u32, 1];
    let mut x = vec![0.5f32; 2 * 3 * 8];
    let err = |r: qlora_rs::Result<()>| r.unwrap_err().to_string();
    // 5 frequencies rotate 10 dims of a head of 8.
    let e = err(rope::forward(&mut x, &pos, 3, 8, &[1.0; 5], 1.0));
    assert!(
        e.contains("rope") && e.contains("10 dims") && e.contains("head_dim 8"),
        "{e}"
    );
    let e = err(rope::backward(&mut x, &pos, 3, 8, &[], 1.0));
    assert!(e.contains("0 frequencies"), "{e}");
    let e = err(rope::forward(&mut x, &pos, 3, 8, &[1.0; 3], f32::NAN));
    assert!(e.contains("magnitude") && e.contains("NaN"), "{e}");
    // A buffer that is not [T, heads, head_dim].
    let e = err(rope::forward(&mut x, &pos, 3, 7, &[1.0; 3], 1.0));
    assert!(e.contains("[2, 3, 7]"), "{e}");
}

/// Longrope's frequencies: each base frequency over its own factor, in f32 with the product
/// first (`1 / (e_i · theta^(2i/dim))`); factors of 1 give [`rope::inv_freq`].
#[test]
fn rope_inv_freq_with_factors_divides_each_frequency_by_its_factor() {
    let (dim, theta) = (96usize, 10_000.0f32);
    let factors: Vec<f32> = (0..dim / 2).map(|i| 1.0 + 0.37 * i as f32).collect();
    let f = rope::inv_freq_with_factors(dim, theta, &factors).unwrap();
    for (i, (&got, &e)) in f.iter().zip(&factors).enumerate() {
        let want = 1.0f32 / (e * theta.powf((2 * i) as f32 / dim as f32));
        assert_eq!(got.to_bits(), want.to_bits(), "frequency {i}");
    }
    let ones = rope::inv_freq_with_factors(dim, theta, &vec![1.0; dim / 2]).unwrap();
    assert_eq!(ones, rope::inv_freq(dim, theta, rope::RopeScaling::None));
    let e = rope::inv_freq_with_factors(dim, theta, &factors[1..])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("47 factors") && e.contains("96") && e.contains("48"),
        "{e}"
    );
    let e = rope::inv_freq_with_factors(7, theta, &[1.0; 3])
        .unwrap_err()
        .to_string();
    assert!(e.contains("(7)") && e.contains("even"), "{e}");
    let e = rope::inv_freq_with_factors(4, theta, &[1.0, 0.0])
        .unwrap_err()
        .to_string();
    assert!(e.contains("factor 1 is 0"), "{e}");
}

/// The column split and its concat: exact copies on f64 and f32, each the other's inverse, a
/// missing part concatenated as zeros, and bad widths refused by name.
#[test]
fn split_cols_and_concat_are_exact_inverses() {
    let mut r = rng(33);
    for (t, widths) in [
        (1usize, vec![24usize, 12, 12]),
        (7, vec![5]),
        (67, vec![37, 37]),
        (3, vec![1, 2, 3, 4]),
    ] {
        let w: usize = widths.iter().sum();
        let x = randn(&mut r, t * w, 3.0);
        let parts = split::split(&x, t, &widths).unwrap();
        let mut o = 0;
        for (k, (p, &wk)) in parts.iter().zip(&widths).enumerate() {
            assert_eq!(p.len(), t * wk, "part {k}");
            for row in 0..t {
                assert_eq!(
                    p[row * wk..][..wk],
                    x[row * w + o..][..wk],
                    "part {k} row {row}"
                );
            }
            o += wk;
        }
        let refs: Vec<&[f64]> = parts.iter().map(|p| p.as_slice()).collect();
        assert_eq!(split::concat(&refs, t, &widths).unwrap(), x);
        // f32, through tensors (the CPU tape's path).
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let xt = qlora_rs::Tensor::from_vec(x32.clone(), &[t, w], &qlora_rs::Device::Cpu).unwrap();
        let pt = split::split_cols(&xt, &widths).unwrap();
        for (p, &wk) in pt.iter().zip(&widths) {
            assert_eq!(p.shape(), [t, wk]);
        }
        let back = split::concat_cols(&pt.iter().collect::<Vec<_>>()).unwrap();
        assert_eq!(back.to_vec::<f32>().unwrap(), x32);
        // The first part missing: zeros in its columns.
        let mut opt: Vec<Option<&[f64]>> = refs.iter().map(|&p| Some(p)).collect();
        opt[0] = None;
        let y = split::concat_or_zeros(&opt, t, &widths).unwrap();
        for (j, (&a, &b)) in y.iter().zip(&x).enumerate() {
            assert_eq!(a, if j % w < widths[0] { 0.0 } else { b }, "element {j}");
        }
    }
    let x =
        qlora_rs::Tensor::from_vec(vec![0.0f32; 3 * 10], &[3, 10], &qlora_rs::Device::Cpu).unwrap();
    let e = split::split_cols(&x, &[4, 4]).unwrap_err().to_string();
    assert!(
        e.contains("split_cols")
            && e.contains("[4, 4]")
            && e.contains("sum 8")
            && e.contains("[T, 10]"),
        "{e}"
    );
    let e = split::split_cols(&x, &[10, 0]).unwrap_err().to_string();
    assert!(e.contains("split_cols") && e.contains("at least 1"), "{e}");
    let e = split::split_cols(&x, &[]).unwrap_err().to_string();
    assert!(e.contains("split_cols"), "{e}");
    let a =
        qlora_rs::Tensor::from_vec(vec![0.0f32; 3 * 2], &[3, 2], &qlora_rs::Device::Cpu).unwrap();
    let b =
        qlora_rs::Tensor::from_vec(vec![0.0f32; 4 * 2], &[4, 2], &qlora_rs::Device::Cpu).unwrap();
    let e = split::concat_cols(&[&a, &b]).unwrap_err().to_string();
    assert!(
        e.contains("concat_cols") && e.contains("part 1 [3, 2]") && e.contains("[4, 2]"),
        "{e}"
    );
    let e = split::concat_cols_or_zeros(&[None, None], &[2, 2])
        .unwrap_err()
        .to_string();
    assert!(e.contains("concat_cols") && e.contains("no part"), "{e}");
}

/// The split's backward (the concat of the parts' gradients) against finite differences of a
/// weighted sum of the parts, one part left without a gradient.
#[test]
fn split_cols_backward_matches_finite_differences() {
    let mut r = rng(34);
    let (t, widths) = (7usize, [24usize, 12, 12]);
    let w: usize = widths.iter().sum();
    let x = randn(&mut r, t * w, 1.0);
    let c: Vec<Vec<f64>> = widths
        .iter()
        .map(|&wk| randn(&mut r, t * wk, 1.0))
        .collect();
    // The loss reads parts 0 and 2 (part 1 is unused: its gradient is missing).
    let loss = |x: &[f64]| {
        let p = split::split(x, t, &widths).unwrap();
        dot(&p[0], &c[0]) + dot(&p[2], &c[2])
    };
    let dx = split::concat_or_zeros(&[Some(&c[0][..]), None, Some(&c[2][..])], t, &widths).unwrap();
    assert_close("split dx", &dx, &numeric_grad(&x, loss), FD_TOL);
}

#[test]
fn linear_lora_backward_matches_finite_differences() {
    let mut r = rng(4);
    let d = linear::Dims {
        tokens: 4,
        in_features: 6,
        out_features: 5,
    };
    let rank = 2;
    let x = randn(&mut r, 4 * 6, 1.0);
    let w = randn(&mut r, 5 * 6, 0.5);
    let bias = randn(&mut r, 5, 0.5);
    let a = randn(&mut r, rank * 6, 0.5);
    let b = randn(&mut r, 5 * rank, 0.5);
    let keep = 1.0 / (1.0 - 0.25);
    let mask: Vec<f64> = (0..24)
        .map(|i| if i % 4 == 1 { 0.0 } else { keep })
        .collect();
    let scale = 1.5;
    let c = randn(&mut r, 4 * 5, 1.0);
    let objective = |x: &[f64], a: &[f64], b: &[f64]| {
        let l = linear::Lora { a, b, rank, scale };
        dot(
            &linear::forward(d, x, &w, Some(&bias), Some(&l), Some(&mask))
                .unwrap()
                .0,
            &c,
        )
    };
    let l = linear::Lora {
        a: &a,
        b: &b,
        rank,
        scale,
    };
    let (_, xa) = linear::forward(d, &x, &w, Some(&bias), Some(&l), Some(&mask)).unwrap();
    // Parameter gradients accumulate: start from a known non-zero value.
    let mut ga = vec![0.5; a.len()];
    let mut gb = vec![-0.25; b.len()];
    let dx = linear::backward(
        d,
        &x,
        &w,
        Some(linear::LoraGrads {
            lora: l,
            xa: &xa,
            grad_a: &mut ga,
            grad_b: &mut gb,
        }),
        Some(&mask),
        &c,
        true,
    )
    .unwrap()
    .unwrap();
    assert_close(
        "linear dx",
        &dx,
        &numeric_grad(&x, |x| objective(x, &a, &b)),
        FD_TOL,
    );
    let num_a: Vec<f64> = numeric_grad(&a, |a| objective(&x, a, &b))
        .iter()
        .map(|g| g + 0.5)
        .collect();
    let num_b: Vec<f64> = numeric_grad(&b, |b| objective(&x, &a, b))
        .iter()
        .map(|g| g - 0.25)
        .collect();
    assert_close("linear dA (accumulated)", &ga, &num_a, FD_TOL);
    assert_close("linear dB (accumulated)", &gb, &num_b, FD_TOL);
    // Without an adapter and without dx: nothing computed.
    assert!(linear::backward(d, &x, &w, None, None, &c, false)
        .unwrap()
        .is_none());
}

#[test]
fn linear_with_zero_b_equals_the_base_layer() {
    let mut r = rng(5);
    let d = linear::Dims {
        tokens: 3,
        in_features: 4,
        out_features: 2,
    };
    let (x, w) = (randn(&mut r, 12, 1.0), randn(&mut r, 8, 1.0));
    let a = randn(&mut r, 2 * 4, 1.0);
    let zero_b = vec![0.0; 2 * 2];
    let l = linear::Lora {
        a: &a,
        b: &zero_b,
        rank: 2,
        scale: 4.0,
    };
    let (with, _) = linear::forward(d, &x, &w, None, Some(&l), None).unwrap();
    let (base, _) = linear::forward(d, &x, &w, None, None, None).unwrap();
    assert_eq!(with, base);
    let err = linear::forward(d, &x[..11], &w, None, None, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("input x") && err.contains("[3, 4]"), "{err}");
}

fn attn_dims(heads: usize, kv_heads: usize, head_dim: usize) -> attention::Dims {
    attention::Dims::new(heads, kv_heads, head_dim)
}

/// Attention computed element by element, straight from the definition: a full score matrix per
/// row, masked to `−∞` outside causal window (transformers' eager attention with its mask),
/// soft-capped as `c·tanh(S/c)`; the default scale as `1/√D` in f64.
fn naive_attention(d: attention::Dims, q: &[f64], k: &[f64], v: &[f64], cu: &[usize]) -> Vec<f64> {
    let (h_n, kv_n, dim) = (d.heads, d.kv_heads, d.head_dim);
    let scale = if d.scale == attn_dims(h_n, kv_n, dim).scale {
        1.0 / (dim as f64).sqrt()
    } else {
        d.scale as f64
    };
    let mut o = vec![0.0; q.len()];
    for w in cu.windows(2) {
        for i in w[0]..w[1] {
            for h in 0..h_n {
                let g = h / (h_n / kv_n);
                let qi = &q[(i * h_n + h) * dim..][..dim];
                let s: Vec<f64> = (w[0]..w[1])
                    .map(|j| {
                        let visible = j <= i && d.window.is_none_or(|win| i - j < win);
                        if !visible {
                            return f64::NEG_INFINITY;
                        }
                        let s = dot(qi, &k[(j * kv_n + g) * dim..][..dim]) * scale;
                        match d.softcap {
                            Some(c) => c as f64 * (s / c as f64).tanh(),
                            None => s,
                        }
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - m).exp()).sum();
                for (jj, j) in (w[0]..w[1]).enumerate() {
                    let p = (s[jj] - m).exp() / z;
                    for c in 0..dim {
                        o[(i * h_n + h) * dim + c] += p * v[(j * kv_n + g) * dim + c];
                    }
                }
            }
        }
    }
    o
}

#[test]
fn attention_forward_matches_the_definition_with_gqa_and_packing() {
    let mut r = rng(6);
    for (h, kv, dim, cu) in [
        (6, 2, 4, vec![0usize, 4, 7]),
        (9, 3, 8, vec![0, 1, 2, 11]),
        (4, 4, 5, vec![0, 13]),
        (8, 2, 3, vec![0, 5, 6, 9, 17]),
    ] {
        let d = attn_dims(h, kv, dim);
        let t = *cu.last().unwrap();
        let (q, k, v) = (
            randn(&mut r, t * h * dim, 1.5),
            randn(&mut r, t * kv * dim, 1.5),
            randn(&mut r, t * kv * dim, 1.0),
        );
        let (o, lse) = attention::forward(d, &q, &k, &v, &cu).unwrap();
        assert_close(
            "attention o",
            &o,
            &naive_attention(d, &q, &k, &v, &cu),
            Tolerance {
                abs: 1e-12,
                rel: 1e-10,
            },
        );
        assert_eq!(lse.len(), t * h);
    }
}

#[test]
fn attention_packed_sequences_equal_each_run_alone() {
    let mut r = rng(7);
    let d = attn_dims(6, 2, 4);
    let lens = [5usize, 1, 8];
    let t: usize = lens.iter().sum();
    let (q, k, v) = (
        randn(&mut r, t * 24, 1.0),
        randn(&mut r, t * 8, 1.0),
        randn(&mut r, t * 8, 1.0),
    );
    let (packed, _) = attention::forward(d, &q, &k, &v, &[0, 5, 6, 14]).unwrap();
    let mut start = 0;
    for l in lens {
        let (alone, _) = attention::forward(
            d,
            &q[start * 24..(start + l) * 24],
            &k[start * 8..(start + l) * 8],
            &v[start * 8..(start + l) * 8],
            &[0, l],
        )
        .unwrap();
        assert_eq!(&packed[start * 24..(start + l) * 24], alone.as_slice());
        start += l;
    }
}

#[test]
fn attention_backward_matches_finite_differences() {
    let mut r = rng(8);
    let d = attn_dims(6, 2, 4);
    let cu = [0usize, 4, 7];
    let t = 7;
    let (q, k, v) = (
        randn(&mut r, t * 24, 1.0),
        randn(&mut r, t * 8, 1.0),
        randn(&mut r, t * 8, 1.0),
    );
    let c = randn(&mut r, t * 24, 1.0);
    let (o, lse) = attention::forward(d, &q, &k, &v, &cu).unwrap();
    let (dq, dk, dv) = attention::backward(d, &q, &k, &v, &o, &lse, &c, &cu).unwrap();
    let f =
        |q: &[f64], k: &[f64], v: &[f64]| dot(&attention::forward(d, q, k, v, &cu).unwrap().0, &c);
    assert_close(
        "attention dq",
        &dq,
        &numeric_grad(&q, |q| f(q, &k, &v)),
        FD_TOL,
    );
    assert_close(
        "attention dk",
        &dk,
        &numeric_grad(&k, |k| f(&q, k, &v)),
        FD_TOL,
    );
    assert_close(
        "attention dv",
        &dv,
        &numeric_grad(&v, |v| f(&q, &k, v)),
        FD_TOL,
    );
}

#[test]
fn attention_rejects_bad_heads_and_cu_seqlens() {
    let q = vec![0.0f64; 3 * 9 * 2];
    let kv = vec![0.0f64; 3 * 4 * 2];
    let err = attention::forward(attn_dims(9, 4, 2), &q, &kv, &kv, &[0, 3])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("query heads (9)") && err.contains("key/value heads (4)"),
        "{err}"
    );
    let kv = vec![0.0f64; 3 * 3 * 2];
    let d = attn_dims(9, 3, 2);
    let err = attention::forward(d, &q, &kv, &kv, &[0, 2, 2, 3])
        .unwrap_err()
        .to_string();
    assert!(err.contains("strictly increasing"), "{err}");
    let err = attention::forward(d, &q, &kv, &kv, &[0, 2])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("ends at 2") && err.contains("3 tokens"),
        "{err}"
    );
    let err = attention::forward(d, &q, &kv, &kv, &[1, 3])
        .unwrap_err()
        .to_string();
    assert!(err.contains("start at 0"), "{err}");
}

#[test]
fn cross_entropy_backward_matches_finite_differences_and_chunking() {
    let mut r = rng(9);
    let (t, d, vocab) = (6, 5, 9);
    let h = randn(&mut r, t * d, 1.0);
    let w = randn(&mut r, vocab * d, 1.0);
    let targets = [3i64, -100, 0, 8, -100, 5];
    let g = 0.7;
    let out = cross_entropy::forward_backward(&h, &w, d, &targets, Some(g), 4, None).unwrap();
    assert_eq!(out.count, 4);
    let num = numeric_grad(&h, |h| {
        g * cross_entropy::forward_backward(h, &w, d, &targets, None, 4, None)
            .unwrap()
            .loss_sum
    });
    assert_close("cross-entropy dh", out.dh.as_ref().unwrap(), &num, FD_TOL);
    // Against the definition on the full logits, and the same for any chunk size.
    let z = cross_entropy::logits(&h, &w, d);
    let want: f64 = targets
        .iter()
        .enumerate()
        .filter(|(_, &y)| y >= 0)
        .map(|(i, &y)| {
            let row = &z[i * vocab..(i + 1) * vocab];
            row.iter().map(|v| v.exp()).sum::<f64>().ln() - row[y as usize]
        })
        .sum();
    for chunk in [1, 4, 6, 100] {
        let o = cross_entropy::forward_backward(&h, &w, d, &targets, Some(g), chunk, None).unwrap();
        assert!((o.loss_sum - want).abs() < 1e-12, "chunk {chunk}");
        assert_close(
            "dh across chunk sizes",
            o.dh.as_ref().unwrap(),
            out.dh.as_ref().unwrap(),
            Tolerance {
                abs: 1e-14,
                rel: 1e-12,
            },
        );
    }
}

/// Gemma 2's final-logit soft-capping: the loss of `c·tanh(z/c)` written out on the full logits,
/// the same for any chunk, its gradient against finite differences, and the host helper.
#[test]
fn cross_entropy_softcap_matches_the_formula_and_finite_differences() {
    let mut r = rng(23);
    let (t, d, vocab, c) = (6, 5, 9, 1.5);
    let h = randn(&mut r, t * d, 1.5);
    let w = randn(&mut r, vocab * d, 1.0);
    let targets = [3i64, -100, 0, 8, -100, 5];
    let g = 0.7;
    let z = cross_entropy::logits(&h, &w, d);
    assert!(z.iter().any(|v| v.abs() > c), "the cap must bite somewhere");
    let loss_of = |z: &[f64]| -> f64 {
        targets
            .iter()
            .enumerate()
            .filter(|(_, &y)| y >= 0)
            .map(|(i, &y)| {
                let row: Vec<f64> = z[i * vocab..(i + 1) * vocab]
                    .iter()
                    .map(|v| c * (v / c).tanh())
                    .collect();
                row.iter().map(|v| v.exp()).sum::<f64>().ln() - row[y as usize]
            })
            .sum()
    };
    let want = loss_of(&z);
    let plain = cross_entropy::forward_backward(&h, &w, d, &targets, None, 4, None).unwrap();
    assert!(
        (plain.loss_sum - want).abs() > 1e-3,
        "capping changes the loss"
    );
    let out = cross_entropy::forward_backward(&h, &w, d, &targets, Some(g), 4, Some(c)).unwrap();
    assert_eq!(out.count, 4);
    assert!((out.loss_sum - want).abs() < 1e-12);
    let num = numeric_grad(&h, |h| g * loss_of(&cross_entropy::logits(h, &w, d)));
    assert_close("soft-capped CE dh", out.dh.as_ref().unwrap(), &num, FD_TOL);
    for chunk in [1, 6, 100] {
        let o =
            cross_entropy::forward_backward(&h, &w, d, &targets, Some(g), chunk, Some(c)).unwrap();
        assert!((o.loss_sum - want).abs() < 1e-12, "chunk {chunk}");
        assert_close(
            "soft-capped dh across chunk sizes",
            o.dh.as_ref().unwrap(),
            out.dh.as_ref().unwrap(),
            Tolerance {
                abs: 1e-14,
                rel: 1e-12,
            },
        );
    }
    for bad in [0.0, -2.0, f64::NAN, f64::INFINITY] {
        let err = cross_entropy::forward_backward(&h, &w, d, &targets, None, 4, Some(bad))
            .unwrap_err()
            .to_string();
        assert!(err.contains("soft-cap"), "{err}");
    }
    // The generation path's helper: the same cap on f32 logits, bounded by c.
    let mut zs: Vec<f32> = vec![-1000.0, -30.0, -0.5, 0.0, 0.25, 29.0, 1e6];
    let orig = zs.clone();
    cross_entropy::softcap_logits(&mut zs, 30.0);
    for (got, v) in zs.iter().zip(&orig) {
        assert_eq!(*got, 30.0 * (v / 30.0).tanh());
        assert!(got.abs() <= 30.0);
    }
}

#[test]
fn cross_entropy_rejects_labels_outside_the_vocabulary() {
    let h = vec![0.1f64; 3 * 2];
    let w = vec![0.1f64; 4 * 2];
    let err = cross_entropy::forward_backward(&h, &w, 2, &[1, 4, -100], None, 8, None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("label 4 at position 1") && err.contains("size 4"),
        "{err}"
    );
    let err = cross_entropy::forward_backward(&h, &w, 2, &[1, -3, 0], None, 8, None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("label -3 at position 1"), "{err}");
    assert_eq!(
        cross_entropy::shift_labels(&[5, 6, 7, 8, 9], &[0, 3, 5]),
        vec![6, 7, -100, 9, -100]
    );
}

/// The LoRA-dropout mask is the counter-based function both devices share: pinned values (from
/// the formula in `ops::dropout`, computed independently), about 1 − p kept with scale
/// 1/(1 − p), one stream per (layer, projection), p = 0 keeps everything.
#[test]
fn dropout_mask_is_the_shared_counter_based_function() {
    use qlora_rs::ops::dropout;
    // splitmix64(42 ⊕ i·φ) >> 40, over 2²⁴, against p = 0.5.
    let kept: Vec<bool> = (0..16).map(|i| dropout::keep(42, i, 0.5)).collect();
    let want = [
        true, false, false, false, false, false, false, true, true, false, false, true, true, true,
        true, true,
    ];
    assert_eq!(kept, want);
    let n = 200_000;
    let m = dropout::mask(dropout::stream_seed(7, 3, 2), 0.25, n);
    let frac = m.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
    assert!((frac - 0.75).abs() < 0.005, "kept {frac}");
    assert!(m.iter().all(|&v| v == 0.0 || v == 1.0 / 0.75f32));
    assert_eq!(m, dropout::mask(dropout::stream_seed(7, 3, 2), 0.25, n));
    assert_ne!(m, dropout::mask(dropout::stream_seed(7, 3, 1), 0.25, n));
    assert_ne!(m, dropout::mask(dropout::stream_seed(7, 4, 2), 0.25, n));
    assert_ne!(
        dropout::batch_seed(1, 2, 0),
        dropout::batch_seed(1, 2, 1),
        "micro-batches of a step draw different masks"
    );
    assert!(dropout::mask(99, 0.0, 1000).iter().all(|&v| v == 1.0));
}

#[test]
fn attention_over_several_causal_blocks_matches_the_definition_and_finite_differences() {
    // Sequences longer than the CPU's causal block (64 rows), so the blocked products (and the
    // zeros they skip) are exercised: 140 = 64 + 64 + 12 rows, and a second of 70.
    let mut r = rng(31);
    let d = attn_dims(2, 1, 3);
    let cu = [0usize, 140, 210];
    let t = 210;
    let (q, k, v) = (
        randn(&mut r, t * 6, 0.7),
        randn(&mut r, t * 3, 0.7),
        randn(&mut r, t * 3, 1.0),
    );
    let (o, lse) = attention::forward(d, &q, &k, &v, &cu).unwrap();
    assert_close(
        "attention o (long)",
        &o,
        &naive_attention(d, &q, &k, &v, &cu),
        Tolerance {
            abs: 1e-12,
            rel: 1e-10,
        },
    );
    let c = randn(&mut r, t * 6, 1.0);
    let (dq, dk, dv) = attention::backward(d, &q, &k, &v, &o, &lse, &c, &cu).unwrap();
    let f =
        |q: &[f64], k: &[f64], v: &[f64]| dot(&attention::forward(d, q, k, v, &cu).unwrap().0, &c);
    let tol = Tolerance {
        abs: 1e-6,
        rel: 1e-5,
    };
    assert_close(
        "attention dq (long)",
        &dq,
        &numeric_grad(&q, |q| f(q, &k, &v)),
        tol,
    );
    assert_close(
        "attention dk (long)",
        &dk,
        &numeric_grad(&k, |k| f(&q, k, &v)),
        tol,
    );
    assert_close(
        "attention dv (long)",
        &dv,
        &numeric_grad(&v, |v| f(&q, &k, v)),
        tol,
    );
}

#[test]
fn elementwise_ops_on_large_inputs_equal_their_formulas_exactly() {
    // Large enough to be cut into pieces over the CPU's cores: each element must still be the
    // one-thread formula's, bit for bit.
    let mut r = rng(32);
    let n = 100_003;
    let g: Vec<f32> = (0..n).map(|_| r.random_range(-4.0f32..4.0)).collect();
    let u: Vec<f32> = (0..n).map(|_| r.random_range(-2.0f32..2.0)).collect();
    let dh: Vec<f32> = (0..n).map(|_| r.random_range(-1.0f32..1.0)).collect();
    // The CPU's f32 sigmoid takes e^x from ops::vexp (within 2 ulp of libm's, and vectorizable).
    let sig = |x: f32| 1.0 / (1.0 + qlora_rs::ops::vexp::exp(-x));
    let h = swiglu::forward(&g, &u, Act::Silu).unwrap();
    let (dg, du) = swiglu::backward(&g, &u, &dh, Act::Silu).unwrap();
    for i in 0..n {
        let s = sig(g[i]);
        assert_eq!(h[i], g[i] * s * u[i], "swiglu h[{i}]");
        assert_eq!(
            dg[i],
            dh[i] * u[i] * s * (1.0 + g[i] * (1.0 - s)),
            "dg[{i}]"
        );
        assert_eq!(du[i], dh[i] * g[i] * s, "du[{i}]");
    }
    let h = swiglu::forward(&g, &u, Act::GeluTanh).unwrap();
    let (dg, du) = swiglu::backward(&g, &u, &dh, Act::GeluTanh).unwrap();
    let (k, a) = ((2.0f64 / std::f64::consts::PI).sqrt() as f32, 0.044715f32);
    for i in 0..n {
        let x = g[i];
        let t = (k * (x + a * (x * x * x))).tanh();
        let value = 0.5 * x * (1.0 + t);
        let slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * a * (x * x));
        assert_eq!(h[i], value * u[i], "geglu h[{i}]");
        assert_eq!(dg[i], dh[i] * u[i] * slope, "geglu dg[{i}]");
        assert_eq!(du[i], dh[i] * value, "geglu du[{i}]");
    }
    let sum = residual::forward(&g, &u).unwrap();
    let mut acc = g.clone();
    residual::accumulate(&mut acc, &u).unwrap();
    for i in 0..n {
        assert_eq!(sum[i], g[i] + u[i]);
        assert_eq!(acc[i], g[i] + u[i]);
    }
    let d = 577;
    let rows = n / d;
    let x = &g[..rows * d];
    let w = &u[..d];
    let (y, rstd) = rmsnorm::forward(x, w, d, Norm::plain(1e-5)).unwrap();
    let dx = rmsnorm::backward(x, w, &rstd, &dh[..rows * d], d, Norm::plain(1e-5)).unwrap();
    for t in 0..rows {
        let xr = &x[t * d..(t + 1) * d];
        let ms = xr.iter().map(|&v| v * v).sum::<f32>() / d as f32;
        let rs = 1.0 / (ms + 1e-5f32).sqrt();
        assert_eq!(rstd[t], rs, "rstd[{t}]");
        let dyr = &dh[t * d..(t + 1) * d];
        let dotp = xr
            .iter()
            .zip(dyr)
            .zip(w)
            .map(|((&xv, &gv), &wv)| gv * wv * xv * rs)
            .sum::<f32>()
            / d as f32;
        for i in 0..d {
            assert_eq!(y[t * d + i], (xr[i] * rs) * w[i], "y[{t}, {i}]");
            assert_eq!(
                dx[t * d + i],
                rs * (dyr[i] * w[i] - xr[i] * rs * dotp),
                "dx[{t}, {i}]"
            );
        }
    }
}

/// Gemma 2's options, each alone and together: a scale other than `1/√D`, a soft cap small
/// enough that tanh saturates (scores up to about ±6 against a cap of 2), windows of 1, 2, 5 and
/// 37 against sequences longer and shorter than them, GQA, packing; and sequences longer than
/// the CPU's causal block of 64 rows, so the windowed products start past column 0.
#[test]
fn attention_with_scale_softcap_and_window_matches_the_masked_definition() {
    let mut r = rng(33);
    let exact = Tolerance {
        abs: 1e-12,
        rel: 1e-10,
    };
    for (h, kv, dim, cu, scale, softcap, window) in [
        (6, 2, 4, vec![0usize, 4, 11], None, None, Some(2)),
        (6, 2, 4, vec![0usize, 4, 11], Some(0.3f32), None, None),
        (6, 2, 4, vec![0usize, 4, 11], None, Some(2.0f32), None),
        (9, 3, 8, vec![0, 1, 2, 19], Some(0.7), Some(2.0), Some(5)),
        (4, 4, 5, vec![0, 13], Some(1.1), Some(2.0), Some(1)),
        (2, 1, 3, vec![0, 140, 210], Some(0.9), Some(2.0), Some(37)),
        (2, 1, 3, vec![0, 140, 150], None, None, Some(5)),
        (2, 2, 3, vec![0, 70, 200], Some(0.5), Some(3.0), Some(64)),
    ] {
        let mut d = attn_dims(h, kv, dim)
            .with_softcap(softcap)
            .with_window(window);
        if let Some(s) = scale {
            d = d.with_scale(s);
        }
        let t = *cu.last().unwrap();
        let (q, k, v) = (
            randn(&mut r, t * h * dim, 2.0),
            randn(&mut r, t * kv * dim, 2.0),
            randn(&mut r, t * kv * dim, 1.0),
        );
        let (o, lse) = attention::forward(d, &q, &k, &v, &cu).unwrap();
        assert_close(
            &format!("attention o {d:?} cu {cu:?}"),
            &o,
            &naive_attention(d, &q, &k, &v, &cu),
            exact,
        );
        assert_eq!(lse.len(), t * h);
        // The options change the result (the test above could not pass without them).
        let (plain, _) = attention::forward(attn_dims(h, kv, dim), &q, &k, &v, &cu).unwrap();
        let diff = o
            .iter()
            .zip(&plain)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(diff > 1e-3, "{d:?}: options made no difference ({diff:e})");
    }
}

#[test]
fn attention_backward_with_scale_softcap_and_window_matches_finite_differences() {
    let mut r = rng(34);
    for (h, kv, dim, cu, window, tol) in [
        (6, 2, 4, vec![0usize, 4, 13], 3, FD_TOL),
        (
            2,
            1,
            3,
            vec![0, 140, 181],
            37,
            Tolerance {
                abs: 1e-6,
                rel: 1e-5,
            },
        ),
    ] {
        let d = attn_dims(h, kv, dim)
            .with_scale(0.8)
            .with_softcap(Some(2.0))
            .with_window(Some(window));
        let t = *cu.last().unwrap();
        // Inputs large enough that some scores reach tanh's flat part (1 − tanh² well below 1).
        let (q, k, v) = (
            randn(&mut r, t * h * dim, 1.5),
            randn(&mut r, t * kv * dim, 1.5),
            randn(&mut r, t * kv * dim, 1.0),
        );
        let c = randn(&mut r, t * h * dim, 1.0);
        let (o, lse) = attention::forward(d, &q, &k, &v, &cu).unwrap();
        let (dq, dk, dv) = attention::backward(d, &q, &k, &v, &o, &lse, &c, &cu).unwrap();
        let f = |q: &[f64], k: &[f64], v: &[f64]| {
            dot(&attention::forward(d, q, k, v, &cu).unwrap().0, &c)
        };
        assert_close(
            "attention dq (softcap, window)",
            &dq,
            &numeric_grad(&q, |q| f(q, &k, &v)),
            tol,
        );
        assert_close(
            "attention dk (softcap, window)",
            &dk,
            &numeric_grad(&k, |k| f(&q, k, &v)),
            tol,
        );
        assert_close(
            "attention dv (softcap, window)",
            &dv,
            &numeric_grad(&v, |v| f(&q, &k, v)),
            tol,
        );
    }
}

/// A window at least as long as every sequence is no window, bit for bit (forward and
/// backward); the defaults are `1/√D`, no cap and no window, and give today's result.
#[test]
fn attention_window_covering_every_sequence_equals_no_window_and_defaults_are_unchanged() {
    let d = attn_dims(6, 2, 4);
    assert_eq!(d.scale, 0.5);
    assert_eq!((d.softcap, d.window), (None, None));
    assert_eq!(d.with_scale(0.5).with_softcap(None).with_window(None), d);
    let mut r = rng(35);
    let cu = [0usize, 70, 75, 150];
    let t = 150;
    let (q, k, v) = (
        randn(&mut r, t * 24, 1.0),
        randn(&mut r, t * 8, 1.0),
        randn(&mut r, t * 8, 1.0),
    );
    let c = randn(&mut r, t * 24, 1.0);
    let run = |d: attention::Dims| {
        let (o, lse) = attention::forward(d, &q, &k, &v, &cu).unwrap();
        let g = attention::backward(d, &q, &k, &v, &o, &lse, &c, &cu).unwrap();
        (o, lse, g)
    };
    let plain = run(d);
    for w in [75, 76, 1000, usize::MAX] {
        assert!(run(d.with_window(Some(w))) == plain, "window {w}");
    }
    assert!(run(d.with_window(Some(74))).0 != plain.0);
    // f32: the default scale is the f32 1/√D that the kernels take, and the result is the same.
    let (qf, kf, vf): (Vec<f32>, Vec<f32>, Vec<f32>) = (
        q.iter().map(|&x| x as f32).collect(),
        k.iter().map(|&x| x as f32).collect(),
        v.iter().map(|&x| x as f32).collect(),
    );
    let d5 = attn_dims(3, 1, 8);
    assert_eq!(d5.scale, 1.0 / 8f32.sqrt());
    assert!(
        attention::forward(d5, &qf, &kf, &vf, &cu).unwrap()
            == attention::forward(d5.with_scale(1.0 / 8f32.sqrt()), &qf, &kf, &vf, &cu).unwrap()
    );
}

/// Generation with a KV cache: queries fed in pieces (a prompt, then one token at a time, then a
/// few) give the rows of the full forward, with the window counted in absolute positions.
#[test]
fn attention_cached_pieces_equal_the_full_forward_with_options() {
    let mut r = rng(36);
    let (h, kv, dim, l) = (4, 2, 5, 90);
    for d in [
        attn_dims(h, kv, dim),
        attn_dims(h, kv, dim)
            .with_scale(0.9)
            .with_softcap(Some(2.0))
            .with_window(Some(5)),
        attn_dims(h, kv, dim).with_window(Some(37)),
    ] {
        let (q, k, v) = (
            randn(&mut r, l * h * dim, 2.0),
            randn(&mut r, l * kv * dim, 2.0),
            randn(&mut r, l * kv * dim, 1.0),
        );
        let (full, _) = attention::forward(d, &q, &k, &v, &[0, l]).unwrap();
        let (qw, kw) = (h * dim, kv * dim);
        let mut start = 0;
        for n in [7usize, 1, 1, 40, 1, 3, 37] {
            let o = attention::forward_cached(
                d,
                &q[start * qw..(start + n) * qw],
                &k[..(start + n) * kw],
                &v[..(start + n) * kw],
                start,
            )
            .unwrap();
            assert_close(
                &format!("cached rows {start}..{} {d:?}", start + n),
                &o,
                &full[start * qw..(start + n) * qw],
                Tolerance {
                    abs: 1e-12,
                    rel: 1e-10,
                },
            );
            start += n;
        }
        assert_eq!(start, l);
    }
}

#[test]
fn attention_rejects_bad_scale_softcap_and_window() {
    let q = vec![0.0f64; 3 * 2 * 4];
    let kv = vec![0.0f64; 3 * 2 * 4];
    let d = attn_dims(2, 2, 4);
    let cases = [
        (
            d.with_scale(0.0),
            "scale 0 must be finite and greater than 0",
        ),
        (d.with_scale(-1.0), "scale -1 must be finite"),
        (d.with_scale(f32::NAN), "scale NaN must be finite"),
        (
            d.with_softcap(Some(0.0)),
            "softcap 0 must be finite and greater than 0",
        ),
        (d.with_softcap(Some(f32::INFINITY)), "softcap inf must be"),
        (d.with_window(Some(0)), "window 0 must be at least 1"),
    ];
    for (bad, want) in cases {
        let err = attention::forward(bad, &q, &kv, &kv, &[0, 3])
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{bad:?}: {err}");
        let err = attention::forward_cached(bad, &q, &kv, &kv, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{bad:?}: {err}");
        let err = attention::backward(bad, &q, &kv, &kv, &q, &[0.0; 6], &q, &[0, 3])
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{bad:?}: {err}");
    }
}
