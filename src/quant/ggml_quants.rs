//! Quantization of f32 rows into GGUF's block formats, byte for byte as llama.cpp writes them
//! when it quantizes without an importance matrix (`llama-quantize` without `--imatrix`, i.e.
//! ggml's `ggml_quantize_chunk` with `imatrix = NULL`, which runs the reference `_ref` row
//! quantizers).
//!
//! The block layouts (which bits hold which value, and how a block dequantizes) are documented
//! in [`super::gguf`], beside the dequantizers; this module documents how the values and scales
//! are *chosen*. The bytes are checked against llama.cpp's on an awkward input for every type
//! (tests/gguf_quants.rs, fixture made by tests/fixtures/make_gguf_quant_fixtures.py).
//!
//! # Arithmetic
//! All of it is f32 in the order written below, with no fused multiply-add (Rust never contracts
//! `a * b + c`). On x86-64 llama.cpp compiles these quantizers (in `libggml-base`) without
//! architecture flags, hence without FMA, whatever `GGML_NATIVE` says; a build that contracts
//! (e.g. for aarch64, where FMA is baseline and C compilers contract by default) can differ from
//! us in the last bit of a sum and so, rarely, in a chosen scale. Two roundings are used, as in
//! ggml:
//! * `rnd(v)`: round half to *even*, by ggml's trick `bits(v + 1.5·2²³) & 0x7fffff − 2²²` (exact
//!   for |v| < 2²²; beyond that we return what the trick returns, as ggml does).
//! * `round(v)`: round half *away from zero* (C's `roundf`, Rust's `f32::round`), Q8_0 only.
//!
//! `trunc(v)` is C's float→int conversion as x86-64 performs it (toward zero; NaN or out of range
//! gives `i32::MIN`), then narrowed to 8 bits by dropping the high bits. It only sees NaN or
//! infinity when a block's scale is so small (an f32 subnormal) that its reciprocal overflows.
//! `f16(v)` rounds to the nearest even half (NaN becomes `±0x7e00`, ggml's quiet NaN).
//!
//! # Plain types
//! F32 is copied; F16 is `f16(x)`; BF16 rounds to nearest even (NaN kept quiet: `x >> 16 | 0x40`).
//! These accept any value; the block types below reject NaN and infinity (ggml's result for them
//! is undefined), naming the row and column.
//!
//! # Blocks of 32 with one scale (and a min)
//! ```text
//! Q8_0  a = max |x_i|;  d = a / 127;   q_i = round(x_i · (1/d))                  (i8)
//! Q4_0  m = the x_i of largest |x_i| (the first such);  d = m / −8
//!       q_i = min(15, trunc(x_i · (1/d) + 8.5))          stored x ≈ (q − 8)·d
//! Q5_0  m as Q4_0;  d = m / −16;  q_i = min(31, trunc(x_i · (1/d) + 16.5))   x ≈ (q − 16)·d
//! Q4_1  lo = min x_i, hi = max x_i;  d = (hi − lo) / 15
//!       q_i = min(15, trunc((x_i − lo) · (1/d) + 0.5))   stored x ≈ q·d + lo
//! Q5_1  d = (hi − lo) / 31;  q_i = trunc((x_i − lo) · (1/d) + 0.5)
//! ```
//! `1/d` is taken as 0 when `d = 0` (an all-zero or constant block: every q is the midpoint or
//! 0). The f32 `d` (and `lo`) pick the q's; the file stores `f16(d)` (and `f16(lo)`). Q4_0 / Q5_0
//! map the extreme value exactly to q = 0 and have no code for `−m`'s mirror image `+8d` /
//! `+16d` beyond 15 / 31 (hence the `min`).
//!
//! # Q4_K and Q5_K: super-blocks of 256 = 8 sub-blocks of 32, 6-bit scales and mins
//! Each sub-block `x` (32 values) gets an affine fit `x_i ≈ s·L_i − m` with `L_i ∈ 0..=N`
//! (N = 15 for Q4_K, 31 for Q5_K) by a weighted search (ggml's `make_qkx2_quants`), weights
//! `w_i = sqrt(Σ x² / 32) + |x_i|`:
//! ```text
//! lo = min(0, min x), hi = max x          (hi = lo: L = 0, s = 0, m = −lo)
//! start: iscale = N / (hi − lo), s = 1 / iscale, L_i = clamp(rnd(iscale·(x_i − lo)), 0, N)
//!        E = Σ w_i (s·L_i + lo − x_i)²
//! for k = 0..=K:  iscale = (r0 + 0.1·k + N) / (hi − lo)
//!     L'_i = clamp(rnd(iscale·(x_i − lo)), 0, N)
//!     weighted least squares of x on L' (sums in index order):
//!     D = Σw·Σw L'² − (Σw L')²;  if D > 0:
//!       s' = (Σw·Σw L'x − Σw x·Σw L') / D,   lo' = (Σw L'²·Σw x − Σw L'·Σw L'x) / D
//!       if lo' > 0: lo' = 0, s' = Σw L'x / Σw L'²
//!       E' = Σ w_i (s'·L'_i + lo' − x_i)²;  if E' < E: keep L', s', lo', E'
//! result: scale s, min m = −lo
//! ```
//! with `r0 = −1, K = 20` for Q4_K and `r0 = −0.5, K = 15` for Q5_K. Then per super-block, with
//! `S = max(0, max_j s_j)` and `M = max(0, max_j m_j)`:
//! ```text
//! sc_j = min(63, rnd(63/S · s_j)),  mn_j = min(63, rnd(63/M · m_j))   (0 when S or M is 0)
//! d = f16(S / 63),  dmin = f16(M / 63)        packed into `scales` as `super::gguf` documents
//! L_i = clamp(rnd((x_i + f16(dmin)·mn_j) / (f16(d)·sc_j)), 0, N)   for each sub-block j
//! ```
//! The last step re-quantizes against the *stored* (f16-rounded, 6-bit) scale and min; a
//! sub-block whose `f16(d)·sc_j` is 0 keeps the L of its search. `rnd` of a negative value
//! wraps modulo 256 before the `min(63, ·)` (ggml stores it in a byte first).
//!
//! # Q6_K: super-blocks of 256 = 16 sub-blocks of 16, int8 scales
//! Each sub-block gets a symmetric fit `x_i ≈ s·l_i`, `l_i ∈ −32..=31` (ggml's `make_qx_quants`
//! with weights `x_i²`), `m` its value of largest |x| (the first such):
//! ```text
//! max |x| < 1e−15:  l = 0 (stored as L = 0, not 32), s = 0
//! iscale = −32 / m,  l_i = clamp(rnd(iscale·x_i), −32, 31)
//! s = Σ x²·x·l / Σ x²·l²   (0 if the denominator is 0),  B = s · Σ x²·x·l
//! for k = −9..=9, k ≠ 0:  iscale = −(32 + 0.1·k) / m,  l' likewise
//!     if Σ x²l'² > 0 and (Σ x²·x·l')² > B·Σ x²l'²:
//!         keep l', s = Σ x²·x·l' / Σ x²l'², B = s·Σ x²·x·l'
//! ```
//! Then per super-block, with `t` the sub-block scale of largest |s| (the first such):
//! ```text
//! |t| < 1e−15: the whole block is zero bytes
//! iscale = −128 / t,  d = f16(1 / iscale),  sc_j = min(127, rnd(iscale·s_j)) as i8
//! L_i = clamp(rnd(x_i / (f16(d)·sc_j)), −32, 31) + 32   (the search's L if f16(d)·sc_j = 0)
//! ```
//!
//! # Parallelism and speed
//! Blocks are independent, so a tensor is cut into fixed runs of 4096 values quantized in
//! parallel (rayon); the bytes depend neither on the thread count nor on the split. The K-quant
//! searches run their sub-blocks side by side (eight Q4_K / Q5_K lanes, sixteen Q6_K lanes: the
//! same operations per lane, each lane's sums still in index order), which the compiler turns
//! into SIMD; on x86-64 CPUs with AVX2 a second build of the kernels is used (same operations,
//! wider registers, no FMA). One core of a shared Xeon, 4096 × 4096 weights: Q4_K ≈ 130 MiB/s of
//! f32 input (ggml's own reference quantizer: 66 MiB/s there), Q5_K ≈ 160, Q6_K ≈ 250, Q8_0 /
//! Q4_0 ≈ 0.8–1 GiB/s (`cargo bench --bench gguf_quants`).

use half::{bf16, f16};
use rayon::prelude::*;

use super::gguf::GgmlType;
use crate::error::{Error, Result};

/// The types [`quantize`] writes: the ones [`GgmlType::SUPPORTED`] reads back.
pub const QUANTIZE_TYPES: [GgmlType; 11] = GgmlType::SUPPORTED;

/// Values handed to one rayon task: a fixed amount of work (16 K-quant super-blocks), so the
/// split does not depend on the thread count (nor do the bytes, which never would).
const VALUES_PER_TASK: usize = 4096;

/// Quantizes `x`, rows of `row_len` values stored row-major, to `ty`, returning the tensor's
/// bytes as llama.cpp lays them out (the rows one after the other, each a whole number of
/// blocks). Errors: a type not in [`QUANTIZE_TYPES`], a row length that is not a positive
/// multiple of the type's block size, `x` not a whole number of rows, and (for the block types)
/// a NaN or infinite value, named by row and column.
pub fn quantize(ty: GgmlType, x: &[f32], row_len: usize) -> Result<Vec<u8>> {
    if !QUANTIZE_TYPES.contains(&ty) {
        let names: Vec<String> = QUANTIZE_TYPES.iter().map(|t| t.name()).collect();
        return Err(Error::InvalidArgument(format!(
            "cannot quantize to {ty} (supported: {})",
            names.join(", ")
        )));
    }
    let (block, size) = match (ty.block_size(), ty.type_size()) {
        (Some(b), Some(s)) => (b, s),
        _ => unreachable!("every quantize type has ggml traits"),
    };
    if row_len == 0 || !row_len.is_multiple_of(block) {
        return Err(Error::InvalidArgument(format!(
            "{ty}: rows of {row_len} values are not a whole number of blocks of {block}"
        )));
    }
    if !x.len().is_multiple_of(row_len) {
        return Err(Error::InvalidArgument(format!(
            "{ty}: {} values are not a whole number of rows of {row_len}",
            x.len()
        )));
    }
    if block > 1 {
        let bad = x
            .par_chunks(VALUES_PER_TASK)
            .position_first(|c| !c.iter().all(|v| v.is_finite()))
            .map(|c| {
                let i = x[c * VALUES_PER_TASK..].iter().position(|v| !v.is_finite());
                c * VALUES_PER_TASK + i.unwrap_or(0)
            });
        if let Some(i) = bad {
            return Err(Error::InvalidArgument(format!(
                "{ty}: the value at row {}, column {} is {}; only finite values can be quantized",
                i / row_len,
                i % row_len,
                x[i]
            )));
        }
    }
    let mut out = vec![0u8; x.len() / block * size];
    let blocks_per_task = (VALUES_PER_TASK / block).max(1);
    out.par_chunks_mut(blocks_per_task * size)
        .zip(x.par_chunks(blocks_per_task * block))
        .for_each(|(o, x)| run(ty, x, o));
    Ok(out)
}

/// Quantizes a run of whole blocks of `x` into `o`, with the AVX2 build of the kernels where the
/// CPU has it (the same operations on wider registers: the bytes are the same, see the tests).
fn run(ty: GgmlType, x: &[f32], o: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { run_avx2(ty, x, o) };
    }
    run_kernels(ty, x, o)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_avx2(ty: GgmlType, x: &[f32], o: &mut [u8]) {
    run_kernels(ty, x, o)
}

/// The kernels, inlined into each build of [`run`].
#[inline(always)]
fn run_kernels(ty: GgmlType, x: &[f32], o: &mut [u8]) {
    match ty {
        GgmlType::F32 => each(x, o, |v: &[f32; 1], b: &mut [u8; 4]| {
            *b = v[0].to_le_bytes()
        }),
        GgmlType::F16 => each(x, o, |v: &[f32; 1], b: &mut [u8; 2]| {
            *b = f16_bits(v[0]).to_le_bytes()
        }),
        GgmlType::BF16 => each(x, o, |v: &[f32; 1], b: &mut [u8; 2]| {
            *b = bf16::from_f32(v[0]).to_le_bytes()
        }),
        GgmlType::Q8_0 => each(x, o, q8_0),
        GgmlType::Q4_0 => each(x, o, q4_0),
        GgmlType::Q4_1 => each(x, o, q4_1),
        GgmlType::Q5_0 => each(x, o, q5_0),
        GgmlType::Q5_1 => each(x, o, q5_1),
        GgmlType::Q4_K => each(x, o, q4_k),
        GgmlType::Q5_K => each(x, o, q5_k),
        GgmlType::Q6_K => each(x, o, q6_k),
        _ => unreachable!("QUANTIZE_TYPES covers every arm"),
    }
}

/// Applies a block quantizer to each block of a run (`x` and `o` hold the same number of blocks).
#[inline(always)]
fn each<const B: usize, const S: usize>(
    x: &[f32],
    o: &mut [u8],
    f: impl Fn(&[f32; B], &mut [u8; S]),
) {
    for (xb, ob) in x.chunks_exact(B).zip(o.chunks_exact_mut(S)) {
        f(xb.try_into().unwrap(), ob.try_into().unwrap());
    }
}

/// ggml's `nearest_int`: round half to even through the float adder.
#[inline(always)]
fn rnd(v: f32) -> i32 {
    let bits = (v + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// C's float → int conversion as x86-64 does it (`cvttss2si`): toward zero, and `i32::MIN` for
/// NaN or a value out of range.
#[inline(always)]
fn trunc(v: f32) -> i32 {
    if (-2_147_483_648.0..2_147_483_648.0).contains(&v) {
        // SAFETY: `v` is finite and within i32's range (checked just above).
        unsafe { v.to_int_unchecked::<i32>() }
    } else {
        i32::MIN
    }
}

/// `trunc(v.round())` (C's `(int)roundf(v)`: half away from zero) without a libm call for the
/// values Q8_0 meets (|v| < 2²³, where `v − trunc(v)` is exact).
#[inline(always)]
fn round_away(v: f32) -> i32 {
    if v.abs() < 8_388_608.0 {
        let t = trunc(v);
        let frac = v - t as f32;
        if frac >= 0.5 {
            t + 1
        } else if frac <= -0.5 {
            t - 1
        } else {
            t
        }
    } else {
        trunc(v.round())
    }
}

/// The f16 bits of `v`, rounded to nearest even; NaN as ggml writes it (sign | 0x7e00).
#[inline(always)]
fn f16_bits(v: f32) -> u16 {
    if v.is_nan() {
        ((v.to_bits() >> 16) as u16 & 0x8000) | 0x7e00
    } else {
        f16::from_f32(v).to_bits()
    }
}

/// `f16(v)` back in f32: the value the file will hold.
#[inline(always)]
fn f16_round(v: f32) -> f32 {
    f16::from_bits(f16_bits(v)).to_f32()
}

#[inline(always)]
fn put_f16(o: &mut [u8], v: f32) {
    o[..2].copy_from_slice(&f16_bits(v).to_le_bytes());
}

/// The reciprocal of a block scale, 0 for a zero scale.
#[inline(always)]
fn inv(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// The first value of largest magnitude (0 for an all-zero block).
#[inline(always)]
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut m) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            m = v;
        }
    }
    m
}

#[inline(always)]
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < lo {
            lo = v;
        }
        if v > hi {
            hi = v;
        }
    }
    (lo, hi)
}

#[inline(always)]
fn q8_0(x: &[f32; 32], o: &mut [u8; 34]) {
    let mut amax = 0.0f32;
    for &v in x {
        // C's MAX(a, b) = a > b ? a : b
        amax = if amax > v.abs() { amax } else { v.abs() };
    }
    let d = amax / 127.0;
    let id = inv(d);
    put_f16(o, d);
    for (q, &v) in o[2..].iter_mut().zip(x) {
        *q = round_away(v * id) as u8;
    }
}

#[inline(always)]
fn q4_0(x: &[f32; 32], o: &mut [u8; 18]) {
    let d = signed_absmax(x) / -8.0;
    let id = inv(d);
    put_f16(o, d);
    let q = |v: f32| (trunc(v * id + 8.5) as i8 as i32).min(15) as u8;
    for j in 0..16 {
        o[2 + j] = q(x[j]) | q(x[16 + j]) << 4;
    }
}

#[inline(always)]
fn q5_0(x: &[f32; 32], o: &mut [u8; 22]) {
    let d = signed_absmax(x) / -16.0;
    let id = inv(d);
    put_f16(o, d);
    let q = |v: f32| (trunc(v * id + 16.5) as i8 as i32).min(31) as u8;
    let mut qh = 0u32;
    for j in 0..16 {
        let (a, b) = (q(x[j]), q(x[16 + j]));
        o[6 + j] = (a & 0xF) | (b & 0xF) << 4;
        qh |= u32::from(a >> 4 & 1) << j | u32::from(b >> 4 & 1) << (j + 16);
    }
    o[2..6].copy_from_slice(&qh.to_le_bytes());
}

#[inline(always)]
fn q4_1(x: &[f32; 32], o: &mut [u8; 20]) {
    let (lo, hi) = min_max(x);
    let d = (hi - lo) / 15.0;
    let id = inv(d);
    put_f16(o, d);
    put_f16(&mut o[2..], lo);
    let q = |v: f32| (trunc((v - lo) * id + 0.5) as i8 as i32).min(15) as u8;
    for j in 0..16 {
        o[4 + j] = q(x[j]) | q(x[16 + j]) << 4;
    }
}

#[inline(always)]
fn q5_1(x: &[f32; 32], o: &mut [u8; 24]) {
    let (lo, hi) = min_max(x);
    let d = (hi - lo) / 31.0;
    let id = inv(d);
    put_f16(o, d);
    put_f16(&mut o[2..], lo);
    let q = |v: f32| trunc((v - lo) * id + 0.5) as u8;
    let mut qh = 0u32;
    for j in 0..16 {
        let (a, b) = (q(x[j]), q(x[16 + j]));
        o[8 + j] = (a & 0xF) | (b & 0xF) << 4;
        qh |= u32::from(a >> 4 & 1) << j | u32::from(b >> 4 & 1) << (j + 16);
    }
    o[4..8].copy_from_slice(&qh.to_le_bytes());
}

/// The affine search of one 32-value sub-block (see the module docs): returns the scale `s` and
/// the min `m` (`x ≈ s·L − m`) and leaves the levels in `levels`. The plain statement of what
/// [`affine_search_x8`] computes eight at a time (the tests hold them equal).
#[cfg(test)]
fn affine_search(
    x: &[f32; 32],
    w: &[f32; 32],
    nmax: i32,
    r0: f32,
    steps: i32,
    levels: &mut [u8; 32],
) -> (f32, f32) {
    let (mut lo, mut hi) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..32 {
        if x[i] < lo {
            lo = x[i];
        }
        if x[i] > hi {
            hi = x[i];
        }
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if lo > 0.0 {
        lo = 0.0;
    }
    if hi == lo {
        *levels = [0; 32];
        return (0.0, -lo);
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / (hi - lo);
    let mut scale = 1.0 / iscale;
    let mut best = 0.0f32;
    for i in 0..32 {
        let l = rnd(iscale * (x[i] - lo)).clamp(0, nmax);
        levels[i] = l as u8;
        let diff = scale * l as f32 + lo - x[i];
        best += w[i] * (diff * diff);
    }
    let mut trial = [0u8; 32];
    for k in 0..=steps {
        iscale = (r0 + 0.1 * k as f32 + nmax_f) / (hi - lo);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..32 {
            let l = rnd(iscale * (x[i] - lo)).clamp(0, nmax);
            trial[i] = l as u8;
            let lf = l as f32;
            sum_l += w[i] * lf;
            sum_l2 += w[i] * lf * lf;
            sum_xl += w[i] * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut err = 0.0f32;
            for i in 0..32 {
                let diff = this_scale * trial[i] as f32 + this_min - x[i];
                err += w[i] * (diff * diff);
            }
            if err < best {
                *levels = trial;
                best = err;
                scale = this_scale;
                lo = this_min;
            }
        }
    }
    (scale, -lo)
}

/// The eight sub-block searches of a Q4_K / Q5_K super-block side by side, lane `j` doing
/// [`affine_search`] on values `32j .. 32j+32` with the weights of the module docs, operation
/// for operation (each lane's sums still run in index order; only independent lanes are
/// interleaved, which the compiler turns into SIMD). Returns the scales and mins and leaves the
/// levels in `levels` (sub-block `j` at `32j ..`).
#[inline(always)]
fn affine_search_x8(
    x: &[f32; 256],
    nmax: i32,
    r0: f32,
    steps: i32,
    levels: &mut [u8; 256],
) -> ([f32; 8], [f32; 8]) {
    const N: usize = 8;
    // (value i, lane j)
    let xt: [[f32; N]; 32] = std::array::from_fn(|i| std::array::from_fn(|j| x[32 * j + i]));
    let mut sum_x2 = [0.0f32; N];
    for row in &xt {
        for j in 0..N {
            sum_x2[j] += row[j] * row[j];
        }
    }
    let av: [f32; N] = std::array::from_fn(|j| (sum_x2[j] / 32.0).sqrt());
    let w: [[f32; N]; 32] =
        std::array::from_fn(|i| std::array::from_fn(|j| av[j] + xt[i][j].abs()));

    let (mut lo, mut hi, mut sum_w) = (xt[0], xt[0], w[0]);
    let mut sum_x: [f32; N] = std::array::from_fn(|j| w[0][j] * xt[0][j]);
    for i in 1..32 {
        for j in 0..N {
            let v = xt[i][j];
            lo[j] = if v < lo[j] { v } else { lo[j] };
            hi[j] = if v > hi[j] { v } else { hi[j] };
            sum_w[j] += w[i][j];
            sum_x[j] += w[i][j] * v;
        }
    }
    for l in &mut lo {
        *l = if *l > 0.0 { 0.0 } else { *l };
    }
    // Lanes with hi = lo end with L = 0, scale 0; they ride along below and are reset at the end.
    let flat: [bool; N] = std::array::from_fn(|j| hi[j] == lo[j]);
    let nmax_f = nmax as f32;
    let clamp = |v: f32| {
        let l = rnd(v);
        let l = if l < 0 { 0 } else { l };
        (if l > nmax { nmax } else { l }) as f32
    };

    let mut scale = [0.0f32; N];
    let mut best = [0.0f32; N];
    let mut best_l = [[0.0f32; N]; 32];
    let mut iscale = [0.0f32; N];
    for j in 0..N {
        iscale[j] = nmax_f / (hi[j] - lo[j]);
        scale[j] = 1.0 / iscale[j];
    }
    for i in 0..32 {
        for j in 0..N {
            let l = clamp(iscale[j] * (xt[i][j] - lo[j]));
            best_l[i][j] = l;
            let diff = scale[j] * l + lo[j] - xt[i][j];
            best[j] += w[i][j] * (diff * diff);
        }
    }
    let mut trial = [[0.0f32; N]; 32];
    for k in 0..=steps {
        let num = r0 + 0.1 * k as f32 + nmax_f;
        for j in 0..N {
            iscale[j] = num / (hi[j] - lo[j]);
        }
        let (mut sum_l, mut sum_l2, mut sum_xl) = ([0.0f32; N], [0.0f32; N], [0.0f32; N]);
        for i in 0..32 {
            for j in 0..N {
                let l = clamp(iscale[j] * (xt[i][j] - lo[j]));
                trial[i][j] = l;
                sum_l[j] += w[i][j] * l;
                sum_l2[j] += w[i][j] * l * l;
                sum_xl[j] += w[i][j] * l * xt[i][j];
            }
        }
        let mut this_scale = [0.0f32; N];
        let mut this_min = [0.0f32; N];
        let mut det = [0.0f32; N];
        for j in 0..N {
            det[j] = sum_w[j] * sum_l2[j] - sum_l[j] * sum_l[j];
            let s = (sum_w[j] * sum_xl[j] - sum_x[j] * sum_l[j]) / det[j];
            let m = (sum_l2[j] * sum_x[j] - sum_l[j] * sum_xl[j]) / det[j];
            let clipped = m > 0.0;
            this_scale[j] = if clipped { sum_xl[j] / sum_l2[j] } else { s };
            this_min[j] = if clipped { 0.0 } else { m };
        }
        let mut err = [0.0f32; N];
        for i in 0..32 {
            for j in 0..N {
                let diff = this_scale[j] * trial[i][j] + this_min[j] - xt[i][j];
                err[j] += w[i][j] * (diff * diff);
            }
        }
        let mut take = [false; N];
        for j in 0..N {
            take[j] = !flat[j] && det[j] > 0.0 && err[j] < best[j];
            if take[j] {
                best[j] = err[j];
                scale[j] = this_scale[j];
                lo[j] = this_min[j];
            }
        }
        if take.iter().any(|&t| t) {
            for i in 0..32 {
                for j in 0..N {
                    best_l[i][j] = if take[j] { trial[i][j] } else { best_l[i][j] };
                }
            }
        }
    }
    for j in 0..N {
        for i in 0..32 {
            levels[32 * j + i] = if flat[j] { 0 } else { best_l[i][j] as u8 };
        }
    }
    let scales = std::array::from_fn(|j| if flat[j] { 0.0 } else { scale[j] });
    let mins = std::array::from_fn(|j| -lo[j]);
    (scales, mins)
}

/// Q4_K / Q5_K's common part: the eight searches, the 6-bit scale packing into `head`
/// (`d, dmin, scales[12]`, 16 bytes) and the re-quantization; returns the 256 levels.
#[inline(always)]
fn k_affine(x: &[f32; 256], nmax: i32, r0: f32, steps: i32, head: &mut [u8; 16]) -> [u8; 256] {
    let mut levels = [0u8; 256];
    let (scales, mins) = affine_search_x8(x, nmax, r0, steps, &mut levels);
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..8 {
        if scales[j] > max_scale {
            max_scale = scales[j];
        }
        if mins[j] > max_min {
            max_min = mins[j];
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let packed = &mut head[4..16];
    for j in 0..8 {
        let ls = (rnd(inv_scale * scales[j]) as u8).min(63);
        let lm = (rnd(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0xF) | (lm & 0xF) << 4;
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    put_f16(&mut head[..], max_scale / 63.0);
    put_f16(&mut head[2..], max_min / 63.0);
    let d = f16_round(max_scale / 63.0);
    let dmin = f16_round(max_min / 63.0);
    for j in 0..8 {
        let (sc, m) = super::gguf::q4k_scale_min(j, &head[4..16]);
        let dj = d * sc as f32;
        if dj == 0.0 {
            continue;
        }
        let mj = dmin * m as f32;
        for i in 32 * j..32 * j + 32 {
            levels[i] = rnd((x[i] + mj) / dj).clamp(0, nmax) as u8;
        }
    }
    levels
}

#[inline(always)]
fn q4_k(x: &[f32; 256], o: &mut [u8; 144]) {
    q4_k_with(x, 20, o)
}

/// Q4_K with `steps + 1` scale trials after the min/max fit (ggml: 20; −1 for none).
#[inline(always)]
fn q4_k_with(x: &[f32; 256], steps: i32, o: &mut [u8; 144]) {
    let (head, qs) = o.split_at_mut(16);
    let levels = k_affine(x, 15, -1.0, steps, head.try_into().unwrap());
    for c in 0..4 {
        for l in 0..32 {
            qs[32 * c + l] = levels[64 * c + l] | levels[64 * c + 32 + l] << 4;
        }
    }
}

#[inline(always)]
fn q5_k(x: &[f32; 256], o: &mut [u8; 176]) {
    q5_k_with(x, 15, o)
}

/// Q5_K with `steps + 1` scale trials after the min/max fit (ggml: 15; −1 for none).
#[inline(always)]
fn q5_k_with(x: &[f32; 256], steps: i32, o: &mut [u8; 176]) {
    let (head, rest) = o.split_at_mut(16);
    let (qh, qs) = rest.split_at_mut(32);
    let levels = k_affine(x, 31, -0.5, steps, head.try_into().unwrap());
    qh.fill(0);
    for c in 0..4 {
        for l in 0..32 {
            let (a, b) = (levels[64 * c + l], levels[64 * c + 32 + l]);
            qh[l] |= (a >> 4) << (2 * c) | (b >> 4) << (2 * c + 1);
            qs[32 * c + l] = (a & 0xF) | (b & 0xF) << 4;
        }
    }
}

/// Q6_K's symmetric search of one 16-value sub-block (see the module docs): returns the scale
/// and leaves `l + 32` in `levels`. The plain statement of what [`symmetric_search_x16`]
/// computes sixteen at a time (the tests hold them equal).
#[cfg(test)]
fn symmetric_search(x: &[f32; 16], tries: i32, levels: &mut [u8; 16]) -> f32 {
    let m = signed_absmax(x);
    if m.abs() < 1e-15 {
        *levels = [0; 16];
        return 0.0;
    }
    let sums = |iscale: f32| {
        let (mut sum_xl, mut sum_l2) = (0.0f32, 0.0f32);
        for &v in x {
            let l = rnd(iscale * v).clamp(-32, 31) as f32;
            let w = v * v;
            sum_xl += w * v * l;
            sum_l2 += w * l * l;
        }
        (sum_xl, sum_l2)
    };
    let fill = |iscale: f32, levels: &mut [u8; 16]| {
        for (l, &v) in levels.iter_mut().zip(x) {
            *l = (rnd(iscale * v).clamp(-32, 31) + 32) as u8;
        }
    };
    let iscale = -32.0 / m;
    fill(iscale, levels);
    let (sum_xl, sum_l2) = sums(iscale);
    let mut scale = if sum_l2 != 0.0 { sum_xl / sum_l2 } else { 0.0 };
    let mut best = scale * sum_xl;
    for k in -tries..=tries {
        if k == 0 {
            continue;
        }
        let iscale = -(32.0 + 0.1 * k as f32) / m;
        let (sum_xl, sum_l2) = sums(iscale);
        if sum_l2 > 0.0 && sum_xl * sum_xl > best * sum_l2 {
            fill(iscale, levels);
            scale = sum_xl / sum_l2;
            best = scale * sum_xl;
        }
    }
    scale
}

/// The sixteen sub-block searches of a Q6_K super-block side by side, lane `j` doing
/// [`symmetric_search`] on values `16j .. 16j+16` operation for operation (sums in index order
/// within each lane). Returns the scales and leaves the levels in `levels`.
#[inline(always)]
fn symmetric_search_x16(x: &[f32; 256], tries: i32, levels: &mut [u8; 256]) -> [f32; 16] {
    const N: usize = 16;
    // (value i, lane j)
    let xt: [[f32; N]; 16] = std::array::from_fn(|i| std::array::from_fn(|j| x[16 * j + i]));
    let (mut amax, mut m) = ([0.0f32; N], [0.0f32; N]);
    for row in &xt {
        for j in 0..N {
            let bigger = amax[j] < row[j].abs();
            amax[j] = if bigger { row[j].abs() } else { amax[j] };
            m[j] = if bigger { row[j] } else { m[j] };
        }
    }
    // Lanes with max |x| < 1e−15 end with L = 0, scale 0; they ride along and are reset below.
    let zero: [bool; N] = std::array::from_fn(|j| amax[j] < 1e-15);
    let level = |v: f32| {
        let l = rnd(v);
        let l = if l < -32 { -32 } else { l };
        if l > 31 {
            31
        } else {
            l
        }
    };
    let sums = |iscale: &[f32; N], out: &mut [[i32; N]; 16]| {
        let (mut sum_xl, mut sum_l2) = ([0.0f32; N], [0.0f32; N]);
        for i in 0..16 {
            for j in 0..N {
                let v = xt[i][j];
                let l = level(iscale[j] * v);
                out[i][j] = l;
                let lf = l as f32;
                let w = v * v;
                sum_xl[j] += w * v * lf;
                sum_l2[j] += w * lf * lf;
            }
        }
        (sum_xl, sum_l2)
    };
    let iscale: [f32; N] = std::array::from_fn(|j| -32.0 / m[j]);
    let mut best_l = [[0i32; N]; 16];
    let (sum_xl, sum_l2) = sums(&iscale, &mut best_l);
    let mut scale: [f32; N] = std::array::from_fn(|j| {
        if sum_l2[j] != 0.0 {
            sum_xl[j] / sum_l2[j]
        } else {
            0.0
        }
    });
    let mut best: [f32; N] = std::array::from_fn(|j| scale[j] * sum_xl[j]);
    let mut trial = [[0i32; N]; 16];
    for k in -tries..=tries {
        if k == 0 {
            continue;
        }
        let num = 32.0 + 0.1 * k as f32;
        let iscale: [f32; N] = std::array::from_fn(|j| -num / m[j]);
        let (sum_xl, sum_l2) = sums(&iscale, &mut trial);
        let mut take = [false; N];
        for j in 0..N {
            take[j] = sum_l2[j] > 0.0 && sum_xl[j] * sum_xl[j] > best[j] * sum_l2[j];
            if take[j] {
                scale[j] = sum_xl[j] / sum_l2[j];
                best[j] = scale[j] * sum_xl[j];
            }
        }
        if take.iter().any(|&t| t) {
            for i in 0..16 {
                for j in 0..N {
                    best_l[i][j] = if take[j] { trial[i][j] } else { best_l[i][j] };
                }
            }
        }
    }
    for j in 0..N {
        for i in 0..16 {
            levels[16 * j + i] = if zero[j] {
                0
            } else {
                (best_l[i][j] + 32) as u8
            };
        }
    }
    std::array::from_fn(|j| if zero[j] { 0.0 } else { scale[j] })
}

#[inline(always)]
fn q6_k(x: &[f32; 256], o: &mut [u8; 210]) {
    q6_k_with(x, 9, o)
}

/// Q6_K with `tries` scale trials on each side of the first guess (ggml: 9).
#[inline(always)]
fn q6_k_with(x: &[f32; 256], tries: i32, o: &mut [u8; 210]) {
    let mut levels = [0u8; 256];
    let scales = symmetric_search_x16(x, tries, &mut levels);
    let (mut max_scale, mut max_abs) = (0.0f32, 0.0f32);
    for &s in &scales {
        if s.abs() > max_abs {
            max_abs = s.abs();
            max_scale = s;
        }
    }
    if max_abs < 1e-15 {
        o.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16(&mut o[208..], 1.0 / iscale);
    let d = f16_round(1.0 / iscale);
    let sc: [i8; 16] = std::array::from_fn(|j| rnd(iscale * scales[j]).min(127) as i8);
    for (b, &v) in o[192..208].iter_mut().zip(&sc) {
        *b = v as u8;
    }
    for ((xs, ls), &scj) in x.chunks_exact(16).zip(levels.chunks_exact_mut(16)).zip(&sc) {
        let dj = d * scj as f32;
        if dj == 0.0 {
            continue;
        }
        for (l, &v) in ls.iter_mut().zip(xs) {
            *l = (rnd(v / dj).clamp(-32, 31) + 32) as u8;
        }
    }
    let (ql, rest) = o.split_at_mut(128);
    let qh = &mut rest[..64];
    for h in 0..2 {
        let lv = &levels[128 * h..128 * h + 128];
        for l in 0..32 {
            let (a, b, c, e) = (lv[l], lv[l + 32], lv[l + 64], lv[l + 96]);
            ql[64 * h + l] = (a & 0xF) | (c & 0xF) << 4;
            ql[64 * h + l + 32] = (b & 0xF) | (e & 0xF) << 4;
            qh[32 * h + l] = (a >> 4) | (b >> 4) << 2 | (c >> 4) << 4 | (e >> 4) << 6;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::gguf::dequantize;
    use rand::{Rng, SeedableRng};

    /// Weight-like rows: Gaussian with a different sigma per row (1e-3 .. 10), about 1 % of the
    /// values ten times larger, and a sprinkling of exact zeros.
    fn weights(rows: usize, row_len: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut x = Vec::with_capacity(rows * row_len);
        for _ in 0..rows {
            let sigma = 10f32.powf(rng.random_range(-3.0..1.0));
            for _ in 0..row_len {
                // Box–Muller
                let (u, v): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
                let g = (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos();
                let r: f32 = rng.random();
                x.push(if r < 0.01 {
                    10.0 * sigma * g
                } else if r < 0.02 {
                    0.0
                } else {
                    sigma * g
                });
            }
        }
        x
    }

    fn roundtrip(ty: GgmlType, x: &[f32], row_len: usize) -> Vec<f32> {
        let q = quantize(ty, x, row_len).unwrap();
        let mut y = vec![0.0f32; x.len()];
        dequantize(ty, &q, &mut y).unwrap();
        y
    }

    /// The largest per-row relative RMS error `‖y − x‖ / ‖x‖` over the rows.
    fn worst_row_rel_rms(x: &[f32], y: &[f32], row_len: usize) -> f32 {
        x.chunks(row_len)
            .zip(y.chunks(row_len))
            .map(|(a, b)| {
                let e: f64 = a.iter().zip(b).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
                let s: f64 = a.iter().map(|p| (*p as f64).powi(2)).sum();
                (e / s).sqrt() as f32
            })
            .fold(0.0, f32::max)
    }

    #[test]
    fn round_trip_error_is_within_each_types_bound() {
        // Odd row counts and row lengths that are odd multiples of the block. The bounds are about
        // 1.1× what these seeded rows give (their 10σ outliers set most block scales); a wrong
        // nibble, bit or scale placement gives errors of order 1.
        let mut failed = vec![];
        for (ty, row_len, rows, bound) in [
            (GgmlType::Q8_0, 96, 7, 0.013),
            (GgmlType::Q4_0, 96, 7, 0.2),
            (GgmlType::Q4_1, 96, 7, 0.13),
            (GgmlType::Q5_0, 96, 7, 0.1),
            (GgmlType::Q5_1, 96, 7, 0.065),
            (GgmlType::Q4_K, 768, 5, 0.105),
            (GgmlType::Q5_K, 768, 5, 0.053),
            (GgmlType::Q6_K, 768, 5, 0.034),
            (GgmlType::F16, 3, 7, 5e-4),
            (GgmlType::BF16, 3, 7, 4e-3),
        ] {
            let x = weights(rows, row_len, 7 + ty.0 as u64);
            let y = roundtrip(ty, &x, row_len);
            let worst = worst_row_rel_rms(&x, &y, row_len);
            eprintln!("{ty}: worst row relative RMS error {worst:.5} (bound {bound})");
            if worst > bound {
                failed.push(format!("{ty}: relative RMS error {worst} > {bound}"));
            }
        }
        assert!(failed.is_empty(), "{failed:?}");
    }

    #[test]
    fn simple_blocks_err_by_at_most_their_step() {
        // Per value: half a step (a whole one at Q4_0 / Q5_0's clamped positive end), plus what
        // storing the scale (and min) in f16 moves the grid.
        let x = weights(9, 160, 3);
        for ty in [
            GgmlType::Q8_0,
            GgmlType::Q4_0,
            GgmlType::Q5_0,
            GgmlType::Q4_1,
            GgmlType::Q5_1,
        ] {
            let y = roundtrip(ty, &x, 160);
            for (b, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                let (lo, hi) = min_max(xs);
                let amax = lo.abs().max(hi.abs());
                let (d, steps, lo_err, half) = match ty {
                    GgmlType::Q8_0 => (amax / 127.0, 127.0, 0.0, 0.5),
                    GgmlType::Q4_0 => (amax / 8.0, 8.0, 0.0, 1.0),
                    GgmlType::Q5_0 => (amax / 16.0, 16.0, 0.0, 1.0),
                    GgmlType::Q4_1 => ((hi - lo) / 15.0, 15.0, (lo - f16_round(lo)).abs(), 0.5),
                    _ => ((hi - lo) / 31.0, 31.0, (lo - f16_round(lo)).abs(), 0.5),
                };
                let bound = half * d + steps * (d - f16_round(d)).abs() + lo_err + 1e-6 * amax;
                for (i, (a, b2)) in xs.iter().zip(ys).enumerate() {
                    assert!(
                        (a - b2).abs() <= bound,
                        "{ty} block {b} value {i}: {a} -> {b2}, error above {bound}"
                    );
                }
            }
        }
    }

    /// Sum of squared errors of blocks quantized by `f`, dequantized as `ty`.
    fn sse<const S: usize>(ty: GgmlType, x: &[f32], f: impl Fn(&[f32; 256], &mut [u8; S])) -> f64 {
        let mut err = 0.0f64;
        for xb in x.chunks_exact(256) {
            let mut o = [0u8; S];
            f(xb.try_into().unwrap(), &mut o);
            let mut y = [0.0f32; 256];
            dequantize(ty, &o, &mut y).unwrap();
            err += xb
                .iter()
                .zip(&y)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>();
        }
        err
    }

    #[test]
    fn k_quant_scale_searches_beat_their_first_guess() {
        // Without the search (min/max fit only, or Q6_K's −32/max guess only) the error is
        // clearly larger: a broken search fails this.
        let x = weights(16, 256, 11);
        let q4 = sse(GgmlType::Q4_K, &x, |b, o| q4_k_with(b, 20, o));
        let q4_none = sse(GgmlType::Q4_K, &x, |b, o| q4_k_with(b, -1, o));
        let q5 = sse(GgmlType::Q5_K, &x, |b, o| q5_k_with(b, 15, o));
        let q5_none = sse(GgmlType::Q5_K, &x, |b, o| q5_k_with(b, -1, o));
        let q6 = sse(GgmlType::Q6_K, &x, |b, o| q6_k_with(b, 9, o));
        let q6_none = sse(GgmlType::Q6_K, &x, |b, o| q6_k_with(b, 0, o));
        eprintln!("SSE with / without search: Q4_K {q4:.4e} / {q4_none:.4e}");
        eprintln!("  Q5_K {q5:.4e} / {q5_none:.4e}, Q6_K {q6:.4e} / {q6_none:.4e}");
        assert!(q4 < 0.9 * q4_none, "Q4_K: {q4} vs {q4_none}");
        assert!(q5 < 0.95 * q5_none, "Q5_K: {q5} vs {q5_none}");
        assert!(q6 < 0.99 * q6_none, "Q6_K: {q6} vs {q6_none}");
    }

    #[test]
    fn affine_search_never_ends_worse_than_its_start() {
        // Per sub-block, in the search's own weighted error.
        let x = weights(4, 32 * 64, 5);
        for xs in x.chunks_exact(32) {
            let xs: &[f32; 32] = xs.try_into().unwrap();
            let mut sum_x2 = 0.0f32;
            for &v in xs {
                sum_x2 += v * v;
            }
            let av = (sum_x2 / 32.0).sqrt();
            let w: [f32; 32] = std::array::from_fn(|i| av + xs[i].abs());
            let err = |steps: i32| {
                let mut l = [0u8; 32];
                let (s, m) = affine_search(xs, &w, 15, -1.0, steps, &mut l);
                (0..32)
                    .map(|i| w[i] as f64 * ((s * l[i] as f32 - m - xs[i]) as f64).powi(2))
                    .sum::<f64>()
            };
            let (searched, start) = (err(20), err(-1));
            assert!(searched <= start * (1.0 + 1e-5), "{searched} > {start}");
        }
    }

    /// Super-blocks whose 16-value pieces are drawn from many kinds (Gaussian of any scale,
    /// zero, constant, one-signed, tiny, ties, a lone outlier).
    fn awkward_super_block(rng: &mut rand::rngs::StdRng) -> [f32; 256] {
        let mut x = [0.0f32; 256];
        for piece in x.chunks_mut(16) {
            let kind = rng.random_range(0..8);
            let scale = 10f32.powf(rng.random_range(-9.0..4.0));
            let c: f32 = rng.random_range(-3.0..3.0);
            for v in piece.iter_mut() {
                let u: f32 = rng.random_range(-1.0..1.0);
                *v = match kind {
                    0 => 0.0,
                    1 => c,
                    2 => scale * u.abs(),
                    3 => -scale * u.abs(),
                    4 => (u * 16.0).round() / 2.0,
                    5 => u * 1e-30,
                    _ => scale * u,
                };
            }
            if kind == 6 {
                piece[rng.random_range(0..16)] = 100.0 * scale;
            }
        }
        x
    }

    #[test]
    fn lane_searches_equal_the_plain_searches() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(99);
        for _ in 0..400 {
            let x = awkward_super_block(&mut rng);
            for (nmax, r0, steps) in [(15, -1.0, 20), (31, -0.5, 15)] {
                let mut lanes = [0u8; 256];
                let (scales, mins) = affine_search_x8(&x, nmax, r0, steps, &mut lanes);
                for j in 0..8 {
                    let xs: &[f32; 32] = x[32 * j..32 * j + 32].try_into().unwrap();
                    let mut sum_x2 = 0.0f32;
                    for &v in xs {
                        sum_x2 += v * v;
                    }
                    let av = (sum_x2 / 32.0).sqrt();
                    let w: [f32; 32] = std::array::from_fn(|i| av + xs[i].abs());
                    let mut plain = [0u8; 32];
                    let (s, m) = affine_search(xs, &w, nmax, r0, steps, &mut plain);
                    assert_eq!(
                        (s.to_bits(), m.to_bits(), &plain[..]),
                        (
                            scales[j].to_bits(),
                            mins[j].to_bits(),
                            &lanes[32 * j..32 * j + 32]
                        ),
                        "nmax {nmax}, sub-block {j}: {xs:?}"
                    );
                }
            }
            let mut lanes = [0u8; 256];
            let scales = symmetric_search_x16(&x, 9, &mut lanes);
            for j in 0..16 {
                let xs: &[f32; 16] = x[16 * j..16 * j + 16].try_into().unwrap();
                let mut plain = [0u8; 16];
                let s = symmetric_search(xs, 9, &mut plain);
                assert_eq!(
                    (s.to_bits(), &plain[..]),
                    (scales[j].to_bits(), &lanes[16 * j..16 * j + 16]),
                    "sub-block {j}: {xs:?}"
                );
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx2_build_writes_the_same_bytes() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("no AVX2 here: only the portable build runs");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let x: Vec<f32> = (0..64)
            .flat_map(|_| awkward_super_block(&mut rng))
            .collect();
        for ty in QUANTIZE_TYPES {
            let size = x.len() / ty.block_size().unwrap() * ty.type_size().unwrap();
            let (mut portable, mut avx2) = (vec![0u8; size], vec![0u8; size]);
            run_kernels(ty, &x, &mut portable);
            // SAFETY: AVX2 was detected above.
            unsafe { run_avx2(ty, &x, &mut avx2) };
            assert!(portable == avx2, "{ty}");
        }
    }

    #[test]
    fn rounding_helpers_follow_ggml() {
        // nearest_int rounds ties to even; roundf (Q8_0) away from zero.
        assert_eq!(
            [rnd(0.5), rnd(1.5), rnd(2.5), rnd(-0.5), rnd(-1.5)],
            [0, 2, 2, 0, -2]
        );
        assert_eq!(
            [rnd(3.49), rnd(-3.51), rnd(4_194_303.0)],
            [3, -4, 4_194_303]
        );
        assert_eq!(
            [
                trunc(2.9),
                trunc(-2.9),
                trunc(f32::NAN),
                trunc(f32::INFINITY)
            ],
            [2, -2, i32::MIN, i32::MIN]
        );
        assert_eq!(f16_bits(65520.0), 0x7c00); // rounds up to infinity
        assert_eq!(f16_bits(-f32::NAN), 0xfe00);
    }
}
