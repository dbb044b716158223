//! The CPU reference of NF4 quantization (see the module docs of `nf4` for the math).

use half::{bf16, f16};

use super::{Absmax, Nf4Tensor, MIN_ABSMAX, NESTED_BLOCKSIZE, NF4_CODE};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// The input as f32 (bf16 and f16 widen exactly).
fn to_f32(w: &Tensor) -> Result<Vec<f32>> {
    Ok(match w.dtype() {
        DType::F32 => w.cpu_slice::<f32>("nf4 quantize")?.to_vec(),
        DType::BF16 => w
            .cpu_slice::<bf16>("nf4 quantize")?
            .iter()
            .map(|v| v.to_f32())
            .collect(),
        DType::F16 => w
            .cpu_slice::<f16>("nf4 quantize")?
            .iter()
            .map(|v| v.to_f32())
            .collect(),
        other => {
            return Err(Error::DTypeMismatch {
                op: "nf4 quantize",
                expected: "f32, bf16 or f16".into(),
                got: other.to_string(),
            })
        }
    })
}

/// Midpoints between neighbouring entries of a sorted codebook, in f32.
fn midpoints(code: &[f32]) -> Vec<f32> {
    code.windows(2).map(|p| (p[0] + p[1]) / 2.0).collect()
}

/// Index of the nearest code: the number of midpoints strictly below `s` (ties go low).
#[inline]
fn nearest(s: f32, mids: &[f32]) -> u8 {
    mids.iter().take_while(|&&m| m < s).count() as u8
}

/// Step 1: 4-bit codes (packed, first element high) and the f32 absmax of every block.
pub fn quantize_4bit(x: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    use rayon::prelude::*;
    let mids = midpoints(&NF4_CODE);
    let n = x.len();
    // Blocks are independent: 64 of them per task over the CPU's cores, joined in order (the
    // same bytes on any number of cores).
    let one = |xs: &[f32]| {
        let mut codes = Vec::with_capacity(xs.len());
        let mut absmax = Vec::with_capacity(xs.len().div_ceil(blocksize));
        for block in xs.chunks(blocksize) {
            let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = amax.max(MIN_ABSMAX);
            if block.len() == blocksize {
                let inv = 1.0 / scale;
                codes.extend(
                    block
                        .iter()
                        .map(|v| nearest((v * inv).clamp(-1.0, 1.0), &mids)),
                );
                absmax.push(amax);
            } else {
                codes.extend(
                    block
                        .iter()
                        .map(|v| nearest((v / scale).clamp(-1.0, 1.0), &mids)),
                );
                absmax.push(scale);
            }
        }
        (codes, absmax)
    };
    let parts: Vec<(Vec<u8>, Vec<f32>)> = x.par_chunks(blocksize * 64).map(one).collect();
    let mut codes = Vec::with_capacity(n + 1);
    let mut absmax = Vec::with_capacity(n.div_ceil(blocksize));
    for (c, a) in parts {
        codes.extend_from_slice(&c);
        absmax.extend_from_slice(&a);
    }
    if n % 2 == 1 {
        codes.push(nearest(0.0, &mids));
    }
    let packed = codes.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
    (packed, absmax)
}

/// `ceil(log2(x))` as torch's reduction uses it (1 for x ≤ 2).
fn ceil_log2(x: usize) -> u32 {
    if x <= 2 {
        1
    } else {
        usize::BITS - (x - 1).leading_zeros()
    }
}

/// torch's cascade sum of one accumulation column: `size` values `get(0..size)` added into four
/// levels of partial sums, each level flushed into the next every `2^level_power` additions.
pub(crate) fn cascade_sum(size: usize, get: impl Fn(usize) -> f32) -> f32 {
    let level_power = 4.max(ceil_log2(size) / 4);
    let step = 1usize << level_power;
    let mask = step - 1;
    let mut acc = [0.0f32; 4];
    let mut i = 0;
    while i + step <= size {
        for _ in 0..step {
            acc[0] += get(i);
            i += 1;
        }
        for j in 1..4 {
            acc[j] += acc[j - 1];
            acc[j - 1] = 0.0;
            if i & (mask << (j as u32 * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        acc[0] += get(i);
        i += 1;
    }
    acc[0] + acc[1] + acc[2] + acc[3]
}

/// The f32 mean of the absmax vector exactly as torch's single-threaded CPU `mean()` computes it
/// (bitsandbytes takes `absmax.mean()`): 8-lane vectors summed in rows of 4 by [`cascade_sum`]
/// (32 independent columns: column `t` holds elements `32·i + t`), leftover vectors into the
/// first column, the columns folded lane-wise, then the scalar tail and the 8 lanes added in
/// order; the sum divided by `n` in f32. The CUDA kernel `nf4_absmax_mean` runs the 32 columns on
/// the 32 lanes of a warp and folds them in this same order. (torch splits sums of 32768 or more
/// elements across its threads, so bitsandbytes' own offset for such tensors depends on the
/// machine; ours is its single-thread value.)
pub fn absmax_mean(a: &[f32]) -> f32 {
    let n = a.len();
    let sum = if n >= 8 {
        let nv = n / 8;
        let rows = nv / 4;
        let mut col = [0.0f32; 32];
        for (t, c) in col.iter_mut().enumerate() {
            *c = cascade_sum(rows, |i| a[32 * i + t]);
        }
        for v in 4 * rows..nv {
            for lane in 0..8 {
                col[lane] += a[8 * v + lane];
            }
        }
        let mut total = 0.0f32;
        for &x in &a[8 * nv..] {
            total += x;
        }
        for lane in 0..8 {
            total += col[lane] + col[8 + lane] + col[16 + lane] + col[24 + lane];
        }
        0.0 + total
    } else {
        let rows = n / 4;
        let mut col = [0.0f32; 4];
        for (c, v) in col.iter_mut().enumerate() {
            *v = cascade_sum(rows, |i| a[4 * i + c]);
        }
        for &x in &a[4 * rows..] {
            col[0] += x;
        }
        0.0 + (col[0] + col[1] + col[2] + col[3])
    };
    sum / n as f32
}

/// Index into the dynamic map for a scaled value `v ∈ [−1, 1]`, as bitsandbytes' CPU code
/// chooses it: `v` is mapped to one of 65536 evenly spaced points
/// `k = trunc(fma((v + 1) · 0.5, 65535, 0.5))`, and the index is the number of code2 midpoints
/// below that point's value `(k + k) / 65535 − 1`. (Not always the nearest code: near 0, where
/// the map is denser than 2/65535, this grid decides.)
pub(crate) fn dynamic_index(v: f32, mids: &[f32]) -> u8 {
    let t = (v + 1.0) * 0.5;
    // v + 1 is a multiple of 2^-24, so t·65535 + 0.5 needs at most 42 bits: exact in f64, and
    // its one rounding to f32 is what fmaf gives.
    let k = ((t as f64 * 65535.0 + 0.5) as f32) as u32 & 0xFFFF;
    let kf = k as f32;
    let grid = (kf + kf) / 65535.0 - 1.0;
    mids.partition_point(|&m| m < grid) as u8
}

/// Step 2 (double quantization): 8-bit codes of `absmax − offset` in blocks of 256, and the f32
/// absmax of each of those blocks. A block whose values all equal the offset gets codes 0.
pub fn quantize_nested(absmax: &[f32], offset: f32, code2: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mids = midpoints(code2);
    let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let mut q = Vec::with_capacity(absmax.len());
    let mut absmax2 = Vec::with_capacity(absmax.len().div_ceil(NESTED_BLOCKSIZE));
    for block in centred.chunks(NESTED_BLOCKSIZE) {
        let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        if amax == 0.0 {
            q.extend(std::iter::repeat_n(0u8, block.len()));
        } else {
            let inv = 1.0 / amax;
            q.extend(
                block
                    .iter()
                    .map(|v| dynamic_index((v * inv).clamp(-1.0, 1.0), &mids)),
            );
        }
        absmax2.push(amax);
    }
    (q, absmax2)
}

/// `code2[q[b]] · absmax2[b / 256] + offset`, each step rounded to f32.
pub fn dequantize_absmax(q: &[u8], absmax2: &[f32], offset: f32, code2: &[f32]) -> Vec<f32> {
    q.iter()
        .enumerate()
        .map(|(b, &c)| code2[c as usize] * absmax2[b / NESTED_BLOCKSIZE] + offset)
        .collect()
}

/// `code[q_i] · absmax[i / blocksize]` in f32 for the first `n` elements.
pub fn dequantize_4bit(
    packed: &[u8],
    absmax: &[f32],
    code: &[f32],
    n: usize,
    blocksize: usize,
) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let byte = packed[i / 2];
            let nibble = if i % 2 == 0 { byte >> 4 } else { byte & 0xF };
            code[nibble as usize] * absmax[i / blocksize]
        })
        .collect()
}

/// [`dequantize_4bit`] into `out` (its length is n), block by block over the CPU's cores.
pub fn dequantize_4bit_into(
    packed: &[u8],
    absmax: &[f32],
    code: &[f32],
    blocksize: usize,
    out: &mut [f32],
) {
    use rayon::prelude::*;
    // Whole blocks (an even blocksize keeps every chunk on byte boundaries), many per task.
    let per_task = blocksize * 64;
    out.par_chunks_mut(per_task)
        .enumerate()
        .for_each(|(t, chunk)| {
            let base = t * per_task;
            if blocksize.is_multiple_of(2) && blocksize > 0 {
                // Block by block, two values per byte: no division per element.
                for (b, block) in chunk.chunks_mut(blocksize).enumerate() {
                    let first = base + b * blocksize;
                    let scale = absmax[first / blocksize];
                    let bytes = &packed[first / 2..];
                    #[cfg(target_arch = "x86_64")]
                    if block.len() % 16 == 0 && code.len() == 16 && wide_lookup() {
                        // SAFETY: AVX-512F is present; `bytes` holds the block's len/2 bytes.
                        unsafe { dequantize_block_avx512(bytes, code, scale, block) };
                        continue;
                    }
                    for (pair, &byte) in block.chunks_mut(2).zip(bytes) {
                        pair[0] = code[(byte >> 4) as usize] * scale;
                        if let Some(v) = pair.get_mut(1) {
                            *v = code[(byte & 0xF) as usize] * scale;
                        }
                    }
                }
                return;
            }
            for (j, v) in chunk.iter_mut().enumerate() {
                let i = base + j;
                let byte = packed[i / 2];
                let nibble = if i.is_multiple_of(2) {
                    byte >> 4
                } else {
                    byte & 0xF
                };
                *v = code[nibble as usize] * absmax[i / blocksize];
            }
        });
}

/// Whether [`dequantize_block_avx512`] can run here (AVX-512F, detected once).
#[cfg(target_arch = "x86_64")]
fn wide_lookup() -> bool {
    static YES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *YES.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
}

/// One block of [`dequantize_4bit_into`], 16 elements at a time: the 16-entry codebook sits in
/// one register and `vpermps` looks up 16 codes at once; each value is the same single product
/// `code[q]·scale` as the scalar loop's, so the results are bit for bit the same.
///
/// # Safety
/// AVX-512F must be present, `code` must hold 16 values, `out.len()` must be a multiple of 16
/// and `bytes` must hold at least `out.len() / 2` bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dequantize_block_avx512(bytes: &[u8], code: &[f32], scale: f32, out: &mut [f32]) {
    use std::arch::x86_64::*;
    assert!(code.len() == 16 && out.len().is_multiple_of(16) && bytes.len() >= out.len() / 2);
    // SAFETY (whole body): the lengths were checked above; unaligned loads and stores.
    unsafe {
        let table = _mm512_loadu_ps(code.as_ptr());
        let s = _mm512_set1_ps(scale);
        let low = _mm_set1_epi8(0x0F);
        for (j, dst) in out.chunks_exact_mut(16).enumerate() {
            let b = _mm_loadl_epi64(bytes.as_ptr().add(8 * j) as *const __m128i);
            // Element 2i is byte i's high nibble, element 2i + 1 its low one.
            let hi = _mm_and_si128(_mm_srli_epi16::<4>(b), low);
            let lo = _mm_and_si128(b, low);
            let idx = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo));
            let v = _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), s);
            _mm512_storeu_ps(dst.as_mut_ptr(), v);
        }
    }
}

/// Quantizes `w` into `q` (shape and device checked by the caller).
pub(super) fn quantize_into(w: &Tensor, q: &mut Nf4Tensor) -> Result<()> {
    let x = to_f32(w)?;
    let (packed, absmax) = quantize_4bit(&x, q.blocksize);
    let cpu = Device::Cpu;
    let nblocks = absmax.len();
    q.packed = Tensor::from_vec(packed.clone(), &[packed.len()], &cpu)?;
    match &mut q.absmax {
        Absmax::Plain(a) => *a = Tensor::from_vec(absmax, &[nblocks], &cpu)?,
        Absmax::Double {
            q: qa,
            absmax2,
            offset,
            code2,
        } => {
            let mean = absmax_mean(&absmax);
            let (codes, nested) =
                quantize_nested(&absmax, mean, code2.cpu_slice::<f32>("nf4 quantize")?);
            *qa = Tensor::from_vec(codes, &[nblocks], &cpu)?;
            *absmax2 = Tensor::from_vec(nested.clone(), &[nested.len()], &cpu)?;
            *offset = Tensor::from_vec(vec![mean], &[1], &cpu)?;
        }
    }
    Ok(())
}

/// Dequantizes `q` into `out` (shape, dtype and device checked by the caller).
pub(super) fn dequantize_into(q: &Nf4Tensor, out: &mut Tensor) -> Result<()> {
    let absmax = q.absmax_f32()?;
    let packed = q.packed.cpu_slice::<u8>("nf4 dequantize")?;
    let values = dequantize_4bit(packed, &absmax, &q.code, q.elem_count(), q.blocksize);
    let cpu = Device::Cpu;
    *out = match out.dtype() {
        DType::F32 => Tensor::from_vec(values, &q.shape, &cpu)?,
        DType::BF16 => Tensor::from_vec(
            values.into_iter().map(bf16::from_f32).collect(),
            &q.shape,
            &cpu,
        )?,
        DType::F16 => Tensor::from_vec(
            values.into_iter().map(f16::from_f32).collect(),
            &q.shape,
            &cpu,
        )?,
        other => {
            return Err(Error::DTypeMismatch {
                op: "nf4 dequantize",
                expected: "f32, bf16 or f16".into(),
                got: other.to_string(),
            })
        }
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector lookup of `dequantize_4bit_into` gives the scalar definition's bits, over
    /// block sizes with and without it (64, 128; 6 and 50 stay scalar) and a ragged last block.
    #[test]
    fn dequantize_into_matches_the_definition() {
        let mut s = 0x2545F4914F6CDD1Du64;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for (blocksize, n) in [
            (64usize, 64usize * 37),
            (128, 128 * 5 + 64),
            (6, 600),
            (50, 1000),
        ] {
            let packed: Vec<u8> = (0..n / 2).map(|_| next() as u8).collect();
            let absmax: Vec<f32> = (0..n.div_ceil(blocksize))
                .map(|_| (next() % 1000) as f32 / 997.0 + 0.01)
                .collect();
            let want = dequantize_4bit(&packed, &absmax, &NF4_CODE, n, blocksize);
            let mut got = vec![f32::NAN; n];
            dequantize_4bit_into(&packed, &absmax, &NF4_CODE, blocksize, &mut got);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "blocksize {blocksize}, element {i}"
                );
            }
        }
    }
}
