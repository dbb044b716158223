//! e^x for the CPU reference's softmaxes (attention, the LM head's cross-entropy) and
//! sigmoids, in f32 without a libm call per element, so the compiler turns the loops into SIMD.
//!
//! ```text
//! x = n·ln 2 + r            n = round(x·log2 e),  |r| ≤ ln 2 / 2
//!                           r = x − n·C1 − n·C2   (C1 + C2 = ln 2, C1 exact in 9 bits)
//! e^r ≈ 1 + r + r²·P(r)     P: degree 5 (Cephes' expf coefficients)
//! e^x = e^r · 2^n           2^n built from its exponent bits
//! ```
//! `round` is the add-and-subtract of 1.5·2^23 (round to nearest even for |x·log2 e| < 2^22),
//! and n is read from the same sum's bits. The result is within 2 ulp of e^x over the normal
//! range (the unit test measures it against f64). Outside it: x > 88.376 gives +inf, x below
//! −87.336 (where e^x leaves the normal range) gives 0, NaN stays NaN.
//!
//! Every function here computes each element alone and sums in one fixed order, so results do
//! not depend on the SIMD width the CPU offers: the AVX-512 and AVX2 builds of the loops
//! (chosen once at run time) do the same IEEE operations as the baseline one, with no
//! contraction into FMAs.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const C1: f32 = 0.693_359_4;
const C2: f32 = -2.121_944_4e-4;
const P0: f32 = 1.987_569_1e-4;
const P1: f32 = 1.398_199_9e-3;
const P2: f32 = 8.333_452e-3;
const P3: f32 = 4.166_579_6e-2;
const P4: f32 = 1.666_666_5e-1;
const P5: f32 = 0.5; // Cephes: 5.0000001201e-1, which is 0.5 in f32
/// 1.5·2^23: adding it rounds to an integer held in the low mantissa bits.
const ROUND: f32 = 12_582_912.0;
const HI: f32 = 88.376_26;
const LO: f32 = -87.336_55;

/// e^x (see the module docs).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp(LO, HI);
    let t = xc * LOG2E + ROUND;
    let n = t.to_bits() as i32 - ROUND.to_bits() as i32;
    let fx = t - ROUND;
    let r = xc - fx * C1 - fx * C2;
    let p = ((((P0 * r + P1) * r + P2) * r + P3) * r + P4) * r + P5;
    let er = p * (r * r) + r + 1.0;
    let y = er * f32::from_bits(((n + 127) as u32) << 23);
    if x > HI {
        f32::INFINITY
    } else if x < LO {
        0.0
    } else if x.is_nan() {
        x
    } else {
        y
    }
}

/// Lanes of the fixed-order sums.
const LANES: usize = 16;

/// Sums `acc` pairwise in a fixed tree.
#[inline(always)]
fn fold(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for j in 0..w {
            acc[j] += acc[j + w];
        }
    }
    acc[0]
}

#[inline(always)]
fn exp_shifted_sum_body(xs: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (v, a) in c.iter_mut().zip(acc.iter_mut()) {
            let e = exp(*v - shift);
            *v = e;
            *a += e;
        }
    }
    let mut tail = 0.0f32;
    for v in chunks.into_remainder() {
        let e = exp(*v - shift);
        *v = e;
        tail += e;
    }
    fold(acc) + tail
}

#[inline(always)]
fn exp_shifted_body(xs: &mut [f32], shift: f32, scale: f32) {
    for v in xs.iter_mut() {
        *v = scale * exp(*v - shift);
    }
}

#[inline(always)]
fn scale_body(xs: &mut [f32], s: f32) {
    for v in xs.iter_mut() {
        *v *= s;
    }
}

#[inline(always)]
fn max_body(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for (&v, a) in c.iter().zip(acc.iter_mut()) {
            // NaN is skipped here, as f32::max does; it reaches the result through the exps.
            *a = if v > *a { v } else { *a };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(chunks.remainder()) {
        m = if v > m { v } else { m };
    }
    m
}

#[inline(always)]
fn silu_gate_body(h: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, &g), &u) in h.iter_mut().zip(gate).zip(up) {
        *o = g * (1.0 / (1.0 + exp(-g))) * u;
    }
}

#[inline(always)]
fn silu_gate_grad_body(dg: &mut [f32], du: &mut [f32], gate: &[f32], up: &[f32], dh: &[f32]) {
    let outputs = dg.iter_mut().zip(du.iter_mut());
    for ((og, ou), ((&g, &u), &d)) in outputs.zip(gate.iter().zip(up).zip(dh)) {
        let s = 1.0 / (1.0 + exp(-g));
        *og = d * u * s * (1.0 + g * (1.0 - s));
        *ou = d * g * s;
    }
}

/// Defines `$name`, which runs `$body` built for AVX-512 or AVX2 when the CPU has them (checked
/// once), else for the baseline target.
macro_rules! dispatch {
    ($(#[$doc:meta])* $name:ident ($($arg:ident : $ty:ty),*) -> $ret:ty = $body:ident) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn wide($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    $body($($arg),*)
                }
                match simd_level() {
                    // SAFETY: the CPU was checked to have the features these builds use.
                    2 => return unsafe { wide($($arg),*) },
                    1 => return unsafe { avx2($($arg),*) },
                    _ => {}
                }
            }
            $body($($arg),*)
        }
    };
}

/// 2 for AVX-512F, 1 for AVX2, 0 otherwise (x86-64 only; detected once).
#[cfg(target_arch = "x86_64")]
fn simd_level() -> u8 {
    use std::sync::OnceLock;
    static LEVEL: OnceLock<u8> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        if std::arch::is_x86_feature_detected!("avx512f") {
            2
        } else if std::arch::is_x86_feature_detected!("avx2") {
            1
        } else {
            0
        }
    })
}

dispatch! {
    /// `xs[i] ← e^(xs[i] − shift)`; returns the sum of the new values (16 running sums, then a
    /// fixed tree, then the tail).
    exp_shifted_sum(xs: &mut [f32], shift: f32) -> f32 = exp_shifted_sum_body
}
dispatch! {
    /// `xs[i] ← scale · e^(xs[i] − shift)`.
    exp_shifted(xs: &mut [f32], shift: f32, scale: f32) -> () = exp_shifted_body
}
dispatch! {
    /// `xs[i] ← xs[i] · s`.
    scale(xs: &mut [f32], s: f32) -> () = scale_body
}
dispatch! {
    /// The largest element (−inf for an empty slice; NaN elements are skipped, as `f32::max`
    /// skips them).
    max(xs: &[f32]) -> f32 = max_body
}

dispatch! {
    /// `h[i] ← g·σ(g)·u` for `g = gate[i]`, `u = up[i]`, σ(g) = 1/(1 + e^(−g)) (SwiGLU's
    /// forward), over the shortest of the three.
    silu_gate(h: &mut [f32], gate: &[f32], up: &[f32]) -> () = silu_gate_body
}
dispatch! {
    /// SwiGLU's backward: `dg[i] ← d·u·σ(g)·(1 + g·(1 − σ(g)))`, `du[i] ← d·g·σ(g)` for
    /// `d = dh[i]`.
    silu_gate_grad(
        dg: &mut [f32], du: &mut [f32], gate: &[f32], up: &[f32], dh: &[f32]
    ) -> () = silu_gate_grad_body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> i64 {
        (a.to_bits() as i64 - b.to_bits() as i64).abs()
    }

    #[test]
    fn exp_is_within_two_ulp_over_the_normal_range() {
        let mut worst = 0;
        let mut x = LO;
        while x <= HI {
            let want = (x as f64).exp() as f32;
            worst = worst.max(ulps(exp(x), want));
            x += 0.000_37 * (1.0 + x.abs());
        }
        // Around 0 finely, where the softmaxes live.
        for i in -200_000..200_000 {
            let x = i as f32 * 1e-5;
            worst = worst.max(ulps(exp(x), (x as f64).exp() as f32));
        }
        assert!(worst <= 2, "worst error {worst} ulp");
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn slice_ops_match_the_scalar_definition_at_every_length() {
        for n in [0, 1, 15, 16, 17, 33, 250] {
            let src: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 60.0) * 0.13)
                .collect();
            let m = max(&src);
            let want_m = src.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            assert_eq!(m.to_bits(), want_m.to_bits(), "max at n = {n}");
            let mut xs = src.clone();
            let sum = exp_shifted_sum(&mut xs, 0.5);
            for (x, s) in xs.iter().zip(&src) {
                assert_eq!(x.to_bits(), exp(s - 0.5).to_bits());
            }
            let exact: f64 = src.iter().map(|&s| exp(s - 0.5) as f64).sum();
            assert!(
                (sum as f64 - exact).abs() <= 1e-6 * exact.max(1.0),
                "sum at n = {n}"
            );
            let mut ys = src.clone();
            exp_shifted(&mut ys, 0.5, 3.0);
            for (y, s) in ys.iter().zip(&src) {
                assert_eq!(y.to_bits(), (3.0 * exp(s - 0.5)).to_bits());
            }
            scale(&mut ys, 0.25);
            assert!(ys
                .iter()
                .zip(&src)
                .all(|(y, s)| *y == 0.25 * (3.0 * exp(s - 0.5))));
            // SwiGLU's loops: the scalar definition's bits at every length.
            let g: Vec<f32> = (0..n).map(|i| (i as f32 - 40.0) * 0.31).collect();
            let u: Vec<f32> = (0..n).map(|i| 1.5 - i as f32 * 0.07).collect();
            let dh: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 2.5).collect();
            let sig = |x: f32| 1.0 / (1.0 + exp(-x));
            let mut h = vec![0.0; n];
            silu_gate(&mut h, &g, &u);
            let (mut dg, mut du) = (vec![0.0; n], vec![0.0; n]);
            silu_gate_grad(&mut dg, &mut du, &g, &u, &dh);
            for i in 0..n {
                let s = sig(g[i]);
                assert_eq!(h[i].to_bits(), (g[i] * s * u[i]).to_bits(), "silu at {i}");
                let want_g = dh[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                assert_eq!(dg[i].to_bits(), want_g.to_bits(), "silu grad at {i}");
                assert_eq!(
                    du[i].to_bits(),
                    (dh[i] * g[i] * s).to_bits(),
                    "silu up grad at {i}"
                );
            }
        }
        let mut with_nan = vec![1.0, f32::NAN, 2.0];
        assert_eq!(max(&with_nan), 2.0);
        assert!(exp_shifted_sum(&mut with_nan, 2.0).is_nan());
    }
}
