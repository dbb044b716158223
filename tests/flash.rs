//! Flash attention on CUDA against an f64 reference: the forward's error at most twice that of a
//! naive bf16 attention (flash-attention's rule), gradients within bf16 tolerance, packed batches
//! identical to each sequence alone, GQA ratios 1, 3 and 4, head dims 64, 96 (Phi-3), 128 and
//! 256 (Gemma), lengths 1 to 4096 (1537 on the simulated GPU), and Gemma 2's options (scale, soft
//! cap, sliding window).
//! Without a GPU each test prints `SKIPPED (no CUDA device)` and passes.

use half::bf16;
use qlora_rs::ops::attention::{self, Dims};
use qlora_rs::testing::gpu_or_skip;
use qlora_rs::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};

use crate::common::on_simulator;

fn data(r: &mut impl Rng, n: usize) -> (Vec<f64>, Vec<bf16>) {
    let b: Vec<bf16> = (0..n)
        .map(|_| bf16::from_f32(r.random_range(-1.0..1.0)))
        .collect();
    (b.iter().map(|v| v.to_f32() as f64).collect(), b)
}

fn round_bf16(v: f64) -> f64 {
    bf16::from_f32(v as f32).to_f32() as f64
}

/// Attention the naive way in bf16: scores (scaled and soft-capped), probabilities and output each
/// rounded to bf16; with a window, row i over keys `i − w < j ≤ i` only.
fn naive_bf16(d: Dims, q: &[f64], k: &[f64], v: &[f64], cu: &[usize]) -> Vec<f64> {
    let (h_n, kv_n, dim) = (d.heads, d.kv_heads, d.head_dim);
    let mut o = vec![0.0; q.len()];
    let scale = d.scale as f64;
    for w in cu.windows(2) {
        for i in w[0]..w[1] {
            let first = d
                .window
                .map_or(w[0], |win| (i + 1).saturating_sub(win).max(w[0]));
            for h in 0..h_n {
                let g = h / (h_n / kv_n);
                let s: Vec<f64> = (first..=i)
                    .map(|j| {
                        let x = (0..dim)
                            .map(|c| q[(i * h_n + h) * dim + c] * k[(j * kv_n + g) * dim + c])
                            .sum::<f64>()
                            * scale;
                        round_bf16(match d.softcap {
                            Some(c) => c as f64 * (x / c as f64).tanh(),
                            None => x,
                        })
                    })
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                // Each probability once (rounded to bf16), not once per output column.
                let p: Vec<f64> = e.iter().map(|x| round_bf16(x / z)).collect();
                for c in 0..dim {
                    let acc: f64 = (first..=i)
                        .zip(&p)
                        .map(|(j, pj)| pj * v[(j * kv_n + g) * dim + c])
                        .sum();
                    o[(i * h_n + h) * dim + c] = round_bf16(acc);
                }
            }
        }
    }
    o
}

fn max_err(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

fn bf16_f64(t: &Tensor) -> Vec<f64> {
    t.to_vec::<bf16>()
        .unwrap()
        .iter()
        .map(|v| v.to_f32() as f64)
        .collect()
}

fn run_case(dev: &Device, d: Dims, cu: &[usize], seed: u64, check_grads: bool) {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let t = *cu.last().unwrap();
    let (qf, qb) = data(&mut r, t * d.heads * d.head_dim);
    let (kf, kb) = data(&mut r, t * d.kv_heads * d.head_dim);
    let (vf, vb) = data(&mut r, t * d.kv_heads * d.head_dim);
    let (dof, dob) = data(&mut r, t * d.heads * d.head_dim);
    let up = |v: Vec<bf16>, heads| Tensor::from_vec(v, &[t, heads, d.head_dim], dev).unwrap();
    let (q, k, v) = (up(qb, d.heads), up(kb, d.kv_heads), up(vb, d.kv_heads));
    let (o, lse) = attention::forward_cuda(d, &q, &k, &v, cu).unwrap();
    let (o_ref, lse_ref) = attention::forward(d, &qf, &kf, &vf, cu).unwrap();
    let label = format!(
        "H={} Hkv={} D={} scale={} softcap={:?} window={:?} cu={:?}",
        d.heads,
        d.kv_heads,
        d.head_dim,
        d.scale,
        d.softcap,
        d.window,
        &cu[..cu.len().min(6)]
    );
    let err = max_err(&bf16_f64(&o), &o_ref);
    let naive = max_err(&naive_bf16(d, &qf, &kf, &vf, cu), &o_ref);
    assert!(
        err <= 2.0 * naive + 1e-5,
        "{label}: forward error {err:e} > 2 × naive bf16 error {naive:e}"
    );
    let lse_got: Vec<f64> = lse
        .to_vec::<f32>()
        .unwrap()
        .iter()
        .map(|&x| x as f64)
        .collect();
    assert!(max_err(&lse_got, &lse_ref) < 1e-3, "{label}: lse");
    if check_grads {
        let dout = up(dob, d.heads);
        let (dq, dk, dv) = attention::backward_cuda(d, &q, &k, &v, &o, &lse, &dout, cu).unwrap();
        let o_bf: Vec<f64> = bf16_f64(&o);
        let (dq_r, dk_r, dv_r) =
            attention::backward(d, &qf, &kf, &vf, &o_bf, &lse_got, &dof, cu).unwrap();
        for (name, got, want) in [("dq", &dq, &dq_r), ("dk", &dk, &dk_r), ("dv", &dv, &dv_r)] {
            let scale = want.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let e = max_err(&bf16_f64(got), want);
            assert!(
                e <= 2e-2 * scale + 1e-4,
                "{label}: {name} error {e:e} (max |ref| {scale:e})"
            );
        }
        // Deterministic: the same call gives the same bits, for all three gradients.
        let (dq2, dk2, dv2) = attention::backward_cuda(d, &q, &k, &v, &o, &lse, &dout, cu).unwrap();
        assert_eq!(dq.to_vec::<bf16>().unwrap(), dq2.to_vec::<bf16>().unwrap());
        assert_eq!(dk.to_vec::<bf16>().unwrap(), dk2.to_vec::<bf16>().unwrap());
        assert_eq!(dv.to_vec::<bf16>().unwrap(), dv2.to_vec::<bf16>().unwrap());
    }
}

fn dims(heads: usize, kv_heads: usize, head_dim: usize) -> Dims {
    Dims::new(heads, kv_heads, head_dim)
}

#[test]
fn flash_attention_matches_f64_over_lengths_and_gqa() {
    let Some(dev) = gpu_or_skip("flash_attention_matches_f64_over_lengths_and_gqa") else {
        return;
    };
    // Lengths on and off the 64-row tiles (64 and 128 end exactly on a tile edge).
    for (i, len) in [1usize, 2, 63, 64, 97, 128, 257, 1025]
        .into_iter()
        .enumerate()
    {
        run_case(&dev, dims(4, 4, 64), &[0, len], i as u64, true);
        run_case(&dev, dims(9, 3, 64), &[0, len], 10 + i as u64, true);
        run_case(&dev, dims(8, 2, 128), &[0, len], 20 + i as u64, len <= 257);
    }
    // A long sequence (many key tiles per query tile); shorter on the simulator, still with a
    // partial last tile.
    let long = if on_simulator() { 1537 } else { 4096 };
    run_case(&dev, dims(4, 1, 128), &[0, long], 30, false);
}

/// A packed batch gives each sequence exactly what it gets alone, forward and backward, bit for
/// bit: head dim 64 with GQA 3 and head dim 128 with GQA 4, lengths on and off the tile edges.
#[test]
fn flash_attention_packed_batches_equal_each_sequence_alone() {
    let Some(dev) = gpu_or_skip("flash_attention_packed_batches_equal_each_sequence_alone") else {
        return;
    };
    packed_equals_alone(&dev, dims(9, 3, 64), &[1, 63, 97, 257], 40);
    packed_equals_alone(&dev, dims(8, 2, 128), &[64, 1, 130, 97], 50);
}

fn packed_equals_alone(dev: &Device, d: Dims, lens: &[usize], seed: u64) {
    let cu: Vec<usize> = std::iter::once(0)
        .chain(lens.iter().scan(0, |s, &l| {
            *s += l;
            Some(*s)
        }))
        .collect();
    run_case(dev, d, &cu, seed, true);
    let t = *cu.last().unwrap();
    let (qw, kw) = (d.heads * d.head_dim, d.kv_heads * d.head_dim);
    let mut r = rand::rngs::StdRng::seed_from_u64(seed + 1);
    let (_, qb) = data(&mut r, t * qw);
    let (_, kb) = data(&mut r, t * kw);
    let (_, vb) = data(&mut r, t * kw);
    let (_, db) = data(&mut r, t * qw);
    let up = |v: &[bf16], n, h| Tensor::from_vec(v.to_vec(), &[n, h, d.head_dim], dev).unwrap();
    let bits = |t: &Tensor| t.to_vec::<bf16>().unwrap();
    let run = |s: usize, l: usize, cu: &[usize]| {
        let (q, k, v) = (
            up(&qb[s * qw..(s + l) * qw], l, d.heads),
            up(&kb[s * kw..(s + l) * kw], l, d.kv_heads),
            up(&vb[s * kw..(s + l) * kw], l, d.kv_heads),
        );
        let dout = up(&db[s * qw..(s + l) * qw], l, d.heads);
        let (o, lse) = attention::forward_cuda(d, &q, &k, &v, cu).unwrap();
        let (dq, dk, dv) = attention::backward_cuda(d, &q, &k, &v, &o, &lse, &dout, cu).unwrap();
        [bits(&o), bits(&dq), bits(&dk), bits(&dv)]
    };
    let packed = run(0, t, &cu);
    for w in cu.windows(2) {
        let (s, l) = (w[0], w[1] - w[0]);
        let alone = run(s, l, &[0, l]);
        for (i, name) in ["o", "dq", "dk", "dv"].into_iter().enumerate() {
            let width = if i < 2 { qw } else { kw };
            assert_eq!(
                &packed[i][s * width..(s + l) * width],
                alone[i].as_slice(),
                "{name} of the sequence at {s} (length {l}), H={} Hkv={} D={}",
                d.heads,
                d.kv_heads,
                d.head_dim
            );
        }
    }
}

#[test]
fn flash_attention_rejects_bad_input() {
    let Some(dev) = gpu_or_skip("flash_attention_rejects_bad_input") else {
        return;
    };
    let z = |t: usize, h: usize, d: usize| Tensor::zeros(&[t, h, d], DType::BF16, &dev).unwrap();
    let err = attention::forward_cuda(
        dims(9, 4, 64),
        &z(3, 9, 64),
        &z(3, 4, 64),
        &z(3, 4, 64),
        &[0, 3],
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("multiple of key/value heads"),
        "{err}"
    );
    let err = attention::forward_cuda(
        dims(2, 2, 80),
        &z(3, 2, 80),
        &z(3, 2, 80),
        &z(3, 2, 80),
        &[0, 3],
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("head_dim 80") && err.to_string().contains("64, 96, 128 or 256"),
        "{err}"
    );
    let err = attention::forward_cuda(
        dims(2, 2, 64),
        &z(3, 2, 64),
        &z(3, 2, 64),
        &z(3, 2, 64),
        &[0, 2],
    )
    .unwrap_err();
    assert!(err.to_string().contains("ends at 2"), "{err}");
    for (bad, want) in [
        (dims(2, 2, 64).with_softcap(Some(0.0)), "softcap 0"),
        (dims(2, 2, 64).with_window(Some(0)), "window 0"),
        (dims(2, 2, 64).with_scale(f32::INFINITY), "scale inf"),
    ] {
        let err = attention::forward_cuda(bad, &z(3, 2, 64), &z(3, 2, 64), &z(3, 2, 64), &[0, 3])
            .unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
    }
}

/// Gemma 2's options on both head dims, forward and backward against the f64 reference: a scale
/// other than 1/√D, a soft cap of 2 that saturates the largest scores (about ±5 here), windows of
/// 1, 5, 37 and 200 (shorter than the sequences: the kernels skip the key tiles before a query
/// tile's window, and at 200 on 330 tokens some tiles are inside every window and unmasked while
/// others straddle its edge), lengths off the 64-row tiles, packed sequences and GQA.
#[test]
fn flash_attention_with_scale_softcap_and_window_matches_f64() {
    let Some(dev) = gpu_or_skip("flash_attention_with_scale_softcap_and_window_matches_f64") else {
        return;
    };
    let gemma = |d: Dims, w: usize| {
        d.with_scale(0.5)
            .with_softcap(Some(2.0))
            .with_window(Some(w))
    };
    run_case(&dev, gemma(dims(9, 3, 64), 5), &[0, 1, 70, 200], 60, true);
    run_case(
        &dev,
        gemma(dims(8, 2, 128), 37),
        &[0, 97, 130, 231],
        61,
        true,
    );
    run_case(
        &dev,
        dims(4, 2, 64).with_window(Some(37)),
        &[0, 200],
        62,
        true,
    );
    run_case(
        &dev,
        dims(4, 4, 64).with_softcap(Some(2.0)),
        &[0, 150],
        63,
        true,
    );
    run_case(&dev, dims(2, 1, 128).with_scale(0.2), &[0, 77], 64, true);
    run_case(
        &dev,
        dims(2, 1, 64).with_window(Some(200)).with_scale(0.3),
        &[0, 330],
        65,
        true,
    );
    run_case(&dev, gemma(dims(2, 2, 128), 1), &[0, 67, 68], 66, true);
}

/// With the options too, a packed batch gives each sequence exactly what it gets alone (the
/// window counts positions within each sequence), and a window at least as long as every
/// sequence is no window, bit for bit.
#[test]
fn flash_attention_options_packed_equal_alone_and_long_window_is_none() {
    let Some(dev) =
        gpu_or_skip("flash_attention_options_packed_equal_alone_and_long_window_is_none")
    else {
        return;
    };
    let d = dims(6, 2, 64)
        .with_scale(0.4)
        .with_softcap(Some(2.0))
        .with_window(Some(37));
    packed_equals_alone(&dev, d, &[1, 100, 37, 65], 70);
    let d = dims(4, 2, 64).with_softcap(Some(2.0));
    let cu = [0usize, 70, 130];
    let t = 130;
    let mut r = rand::rngs::StdRng::seed_from_u64(71);
    let up = |n: usize, h: usize, r: &mut rand::rngs::StdRng| {
        Tensor::from_vec(data(r, n * h * 64).1, &[n, h, 64], &dev).unwrap()
    };
    let (q, k, v, dout) = (
        up(t, 4, &mut r),
        up(t, 2, &mut r),
        up(t, 2, &mut r),
        up(t, 4, &mut r),
    );
    let run = |d: Dims| {
        let (o, lse) = attention::forward_cuda(d, &q, &k, &v, &cu).unwrap();
        let (dq, dk, dv) = attention::backward_cuda(d, &q, &k, &v, &o, &lse, &dout, &cu).unwrap();
        let b = |t: &Tensor| t.to_vec::<bf16>().unwrap();
        (b(&o), lse.to_vec::<f32>().unwrap(), b(&dq), b(&dk), b(&dv))
    };
    let none = run(d);
    for w in [70, 71, usize::MAX] {
        assert!(run(d.with_window(Some(w))) == none, "window {w}");
    }
    assert!(run(d.with_window(Some(69))).0 != none.0);
}

/// Head dims 96 (Phi-3, Phi-3.5-mini: 12 chunks of 16 bytes per row, not a power of two) and 256
/// (Gemma 2/3: dynamic shared memory, A operands read from shared memory at each k16 step, dK/dV
/// blocks of 32 keys), forward and backward against the f64 reference: lengths on and off the
/// 64-row tiles (and the 32-key dK/dV blocks at 256), GQA, packed sequences, the plain and the
/// options kernels (scale, soft cap, windows short and long).
#[test]
fn flash_attention_head_dims_96_and_256_match_f64() {
    let Some(dev) = gpu_or_skip("flash_attention_head_dims_96_and_256_match_f64") else {
        return;
    };
    for (i, len) in [1usize, 33, 64, 97, 200].into_iter().enumerate() {
        run_case(&dev, dims(6, 2, 96), &[0, len], 80 + i as u64, true);
        run_case(&dev, dims(4, 1, 256), &[0, len], 90 + i as u64, true);
    }
    let gemma = |d: Dims, w: usize| {
        d.with_scale(0.5)
            .with_softcap(Some(2.0))
            .with_window(Some(w))
    };
    run_case(&dev, gemma(dims(6, 3, 96), 37), &[0, 1, 70, 171], 100, true);
    run_case(
        &dev,
        gemma(dims(4, 2, 256), 37),
        &[0, 97, 130, 231],
        101,
        true,
    );
    run_case(
        &dev,
        dims(2, 1, 96).with_window(Some(5)),
        &[0, 150],
        102,
        true,
    );
    run_case(
        &dev,
        dims(2, 2, 256).with_softcap(Some(2.0)),
        &[0, 77],
        103,
        true,
    );
    run_case(&dev, gemma(dims(2, 1, 256), 1), &[0, 67, 68], 104, true);
}

/// Packed batches at head dims 96 and 256 give each sequence exactly what it gets alone, with
/// and without the options.
#[test]
fn flash_attention_head_dims_96_and_256_packed_equal_alone() {
    let Some(dev) = gpu_or_skip("flash_attention_head_dims_96_and_256_packed_equal_alone") else {
        return;
    };
    packed_equals_alone(&dev, dims(6, 2, 96), &[1, 63, 97, 130], 110);
    packed_equals_alone(&dev, dims(4, 2, 256), &[64, 1, 33, 97], 111);
    let d = |hd| {
        dims(4, 2, hd)
            .with_scale(0.4)
            .with_softcap(Some(2.0))
            .with_window(Some(37))
    };
    packed_equals_alone(&dev, d(96), &[1, 100, 37, 65], 112);
    packed_equals_alone(&dev, d(256), &[1, 100, 37, 65], 113);
}

/// Head dim 128's two forward tilings (32 query rows a warp in blocks of 128, the default where
/// an SM holds two such blocks; 16 in blocks of 64 on cards with 100 KiB per SM) give the same
/// output and lse bit for bit: each row sees the same key tiles in the same order through the
/// same MMAs. Packed lengths on and off both tiles, GQA, the plain and the options kernels; the
/// card's own choice is one of the two, and a tiling a head dim lacks is refused.
#[test]
fn flash_forward_tilings_at_head_dim_128_agree_bit_for_bit() {
    let Some(dev) = gpu_or_skip("flash_forward_tilings_at_head_dim_128_agree_bit_for_bit") else {
        return;
    };
    let mut r = rand::rngs::StdRng::seed_from_u64(120);
    let cu = [0usize, 1, 64, 193, 320, 417];
    let t = *cu.last().unwrap();
    let up = |n: usize, h: usize, r: &mut rand::rngs::StdRng| {
        Tensor::from_vec(data(r, n * h * 128).1, &[n, h, 128], &dev).unwrap()
    };
    let (q, k, v) = (up(t, 6, &mut r), up(t, 2, &mut r), up(t, 2, &mut r));
    let plain = dims(6, 2, 128);
    let options = plain
        .with_scale(0.3)
        .with_softcap(Some(2.0))
        .with_window(Some(70));
    for d in [plain, options] {
        let run = |rows| {
            let (o, lse) = attention::forward_cuda_rows(d, &q, &k, &v, &cu, rows).unwrap();
            (o.to_vec::<bf16>().unwrap(), lse.to_vec::<f32>().unwrap())
        };
        let (wide, narrow, auto) = (run(Some(128)), run(Some(64)), run(None));
        assert!(wide == narrow, "{d:?}: 128-row and 64-row tiles differ");
        assert!(auto == wide, "{d:?}: the card's choice differs");
    }
    let z = Tensor::zeros(&[3, 2, 64], DType::BF16, &dev).unwrap();
    let err = attention::forward_cuda_rows(dims(2, 2, 64), &z, &z, &z, &[0, 3], Some(64))
        .unwrap_err()
        .to_string();
    assert!(err.contains("takes 64 query rows"), "{err}");
}
