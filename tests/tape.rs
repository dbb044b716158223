//! The tape's refusals: a tensor of the wrong device, dtype or shape reaching an op is an error
//! naming the op and both sides; a GPU run of a model the kernels cannot take is refused before
//! anything loads.

use half::bf16;
use qlora_rs::autograd::{BaseWeight, Batch, Linear, Tape};
use qlora_rs::model::adapters::Adapters;
use qlora_rs::model::llama::{BaseFormat, Llama};
use qlora_rs::model::lora::{LoraConfig, LoraParams, Target};
use qlora_rs::quant::nf4::Nf4Config;
use qlora_rs::testing::gpu_or_skip;
use qlora_rs::train::optimizer::AdamWConfig;
use qlora_rs::{Device, Tensor};

fn cpu(v: Vec<f32>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

#[test]
fn tape_ops_refuse_the_wrong_dtype_shape_or_device() {
    let batch = Batch::new(vec![0, 3]).unwrap();
    let mut tape = Tape::new(Device::Cpu, &batch, None, true, None).unwrap();
    // A bf16 activation on the CPU tape (whose activations are f32).
    let half = Tensor::from_vec(vec![bf16::ONE; 3 * 8], &[3, 8], &Device::Cpu).unwrap();
    let err = tape.input(half, true).unwrap_err().to_string();
    assert!(
        err.contains("tape input") && err.contains("bf16") && err.contains("f32"),
        "{err}"
    );
    // A weight [4, 6] for an input of 8 features.
    let x = tape.input(cpu(vec![0.5; 24], &[3, 8]), true).unwrap();
    let w = BaseWeight::Dense(cpu(vec![0.1; 24], &[4, 6]));
    let lin = Linear {
        weight: &w,
        bias: None,
        layer: 2,
        target: Target::Up,
    };
    let err = tape.linear(&x, lin).unwrap_err().to_string();
    assert!(
        err.contains("linear") && err.contains("layer 2 up_proj"),
        "{err}"
    );
    assert!(err.contains("[T, 6]") && err.contains("[3, 8]"), "{err}");
    // RoPE over heads that do not tile the width.
    let err = tape
        .rope(x.clone(), 3, 2, &cpu(vec![1.0], &[1]), 1.0)
        .unwrap_err()
        .to_string();
    assert!(err.contains("rope") && err.contains("[3, 8]"), "{err}");
    // Adapters on another device than the tape's: refused when the tape is made.
    let cfg = LoraConfig {
        rank: 2,
        alpha: 4.0,
        rslora: false,
        dropout: 0.0,
        targets: vec![Target::Q],
    };
    let lora = LoraParams::init_for(cfg, &[(0, Target::Q, 16, 16)], 1, 0).unwrap();
    let a = Adapters::new(&lora, None, AdamWConfig::default(), Device::Cpu).unwrap();
    let err = Tape::new(Device::Cuda(0), &batch, Some(&a), false, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("cuda:0") && err.contains("adapters on cpu"),
        "{err}"
    );
    // A replay tape leaves the residual update's output uncomputed: reading it is an error.
    let w = BaseWeight::Dense(cpu(vec![0.1; 64], &[8, 8]));
    let mut replay = Tape::replay(Device::Cpu, &batch, None, None).unwrap();
    let x = replay.input(cpu(vec![0.5; 24], &[3, 8]), true).unwrap();
    let y = replay
        .linear_residual(
            &x,
            Linear {
                weight: &w,
                bias: None,
                layer: 0,
                target: Target::Down,
            },
            &x,
        )
        .unwrap();
    assert!(y.value().unwrap_err().to_string().contains("not computed"));

    let Some(dev @ Device::Cuda(_)) =
        gpu_or_skip("tape_ops_refuse_the_wrong_dtype_shape_or_device")
    else {
        return;
    };
    // A CPU tensor on a GPU tape.
    let gb = Batch::on(vec![0, 3], dev).unwrap();
    let mut gpu = Tape::new(dev, &gb, None, false, None).unwrap();
    let err = gpu
        .input(cpu(vec![0.5; 24], &[3, 8]), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("tape on cuda") && err.contains("a tensor on cpu"),
        "{err}"
    );
    // A dense weight on the GPU, whose GEMMs take NF4.
    let x = gpu
        .input(
            Tensor::from_vec(vec![bf16::ONE; 3 * 16], &[3, 16], &dev).unwrap(),
            false,
        )
        .unwrap();
    let w = BaseWeight::Dense(Tensor::zeros(&[16, 16], qlora_rs::DType::BF16, &dev).unwrap());
    let err = gpu
        .linear(
            &x,
            Linear {
                weight: &w,
                bias: None,
                layer: 1,
                target: Target::K,
            },
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layer 1 k_proj") && err.contains("NF4"),
        "{err}"
    );
}

/// `--device cuda` with a model the kernels cannot take says which and why before any weight is
/// read (this needs no GPU: the check comes first).
#[test]
fn a_gpu_load_of_a_model_the_kernels_cannot_take_is_refused_first() {
    let tiny = qlora_rs::testing::project_root().join("tests/fixtures/llama/tiny-llama");
    let nf4 = BaseFormat::Nf4(Nf4Config::default());
    let err = Llama::load_on(&tiny, nf4, Device::Cuda(0))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("head_dim 64, 96, 128 or 256") && err.contains("this model has 16"),
        "{err}"
    );
    let dir = std::env::temp_dir().join(format!("qlora-rs-tape-{}", std::process::id()));
    crate::cuda_step::write_gpu_sized_model(&dir);
    let err = Llama::load_on(&dir, BaseFormat::Dense, Device::Cuda(0))
        .unwrap_err()
        .to_string();
    assert!(err.contains("NF4") && err.contains("--device cpu"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The tape hands attention's options (scale, soft cap, window) to the op on both devices: its
/// output and gradients are the op's own, bit for bit, and generation through a KV cache (CPU)
/// gives the full forward's rows with the window in absolute positions.
#[test]
fn tape_attention_honours_scale_softcap_and_window() {
    use qlora_rs::autograd::KvCache;
    use qlora_rs::ops::attention::{self, Dims};
    use rand::{Rng, SeedableRng};
    let (h, kv, d, cu) = (4usize, 2usize, 64usize, vec![0usize, 50, 90]);
    let t = 90;
    let dims = Dims::new(h, kv, d)
        .with_scale(0.3)
        .with_softcap(Some(2.0))
        .with_window(Some(7));
    let mut r = rand::rngs::StdRng::seed_from_u64(5);
    let mut draw = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| bf16::from_f32(r.random_range(-1.0f32..1.0)).to_f32())
            .collect()
    };
    let (q, k, v, dout) = (
        draw(t * h * d),
        draw(t * kv * d),
        draw(t * kv * d),
        draw(t * h * d),
    );
    // CPU: the tape against the op.
    let batch = Batch::new(cu.clone()).unwrap();
    let mut tape = Tape::new(Device::Cpu, &batch, None, true, None).unwrap();
    let qv = tape.input(cpu(q.clone(), &[t, h * d]), true).unwrap();
    let kvar = tape.input(cpu(k.clone(), &[t, kv * d]), false).unwrap();
    let vvar = tape.input(cpu(v.clone(), &[t, kv * d]), false).unwrap();
    let o = tape.attention(&qv, &kvar, &vvar, dims).unwrap();
    let (o_ref, lse) = attention::forward(dims, &q, &k, &v, &cu).unwrap();
    assert!(o.value().unwrap().to_vec::<f32>().unwrap() == o_ref);
    let dq = tape
        .backward(&o, Some(cpu(dout.clone(), &[t, h * d])), &qv)
        .unwrap()
        .unwrap();
    let (dq_ref, _, _) = attention::backward(dims, &q, &k, &v, &o_ref, &lse, &dout, &cu).unwrap();
    assert!(dq.to_vec::<f32>().unwrap() == dq_ref);
    // Generation: the second sequence fed as 30 tokens, then one at a time.
    let (qs, ks, vs) = (&q[50 * h * d..], &k[50 * kv * d..], &v[50 * kv * d..]);
    let (full, _) = attention::forward(dims, qs, ks, vs, &[0, 40]).unwrap();
    let mut cache = KvCache::default();
    let mut start = 0;
    for n in [30usize, 1, 1, 8] {
        let b = Batch::decode(start, n).unwrap();
        let mut tape = Tape::new(Device::Cpu, &b, None, false, None).unwrap();
        let piece = |x: &[f32], w: usize| cpu(x[start * w..(start + n) * w].to_vec(), &[n, w]);
        let qv = tape.input(piece(qs, h * d), false).unwrap();
        let kvar = tape.input(piece(ks, kv * d), false).unwrap();
        let vvar = tape.input(piece(vs, kv * d), false).unwrap();
        let o = tape
            .attention_cached(&qv, &kvar, &vvar, dims, &mut cache)
            .unwrap();
        let got = o.value().unwrap().to_vec::<f32>().unwrap();
        for (i, (a, b)) in got.iter().zip(&full[start * h * d..]).enumerate() {
            assert!(
                (a - b).abs() < 1e-5,
                "cached row {start}+, element {i}: {a} vs {b}"
            );
        }
        start += n;
    }
    // GPU: the tape against the kernels.
    let Some(dev) = gpu_or_skip("tape_attention_honours_scale_softcap_and_window") else {
        return;
    };
    let up = |x: &[f32], w: usize| {
        Tensor::from_vec(
            x.iter().map(|&f| bf16::from_f32(f)).collect::<Vec<_>>(),
            &[t, w],
            &dev,
        )
        .unwrap()
    };
    let batch = Batch::on(cu.clone(), dev).unwrap();
    let mut tape = Tape::new(dev, &batch, None, true, None).unwrap();
    let (qg, kg, vg, dg) = (
        up(&q, h * d),
        up(&k, kv * d),
        up(&v, kv * d),
        up(&dout, h * d),
    );
    let qv = tape.input(up(&q, h * d), true).unwrap();
    let kvar = tape.input(up(&k, kv * d), false).unwrap();
    let vvar = tape.input(up(&v, kv * d), false).unwrap();
    let o = tape.attention(&qv, &kvar, &vvar, dims).unwrap();
    let (o_ref, lse) = attention::forward_cuda(dims, &qg, &kg, &vg, &cu).unwrap();
    let bits = |x: &Tensor| x.to_vec::<bf16>().unwrap();
    assert_eq!(bits(o.value().unwrap()), bits(&o_ref));
    let dq = tape
        .backward(&o, Some(up(&dout, h * d)), &qv)
        .unwrap()
        .unwrap();
    let (dq_ref, _, _) =
        attention::backward_cuda(dims, &qg, &kg, &vg, &o_ref, &lse, &dg, &cu).unwrap();
    assert_eq!(bits(&dq), bits(&dq_ref));
}

/// Values already rounded to bf16 (so both devices hold them exactly), and a tape tensor of them:
/// f32 on the CPU, bf16 on a GPU.
fn bf16_values(r: &mut impl rand::Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| bf16::from_f32(r.random_range(-1.0f32..1.0) * scale).to_f32())
        .collect()
}

fn on(dev: Device, v: &[f32], shape: &[usize]) -> Tensor {
    match dev {
        Device::Cpu => cpu(v.to_vec(), shape),
        Device::Cuda(_) => Tensor::from_vec(
            v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>(),
            shape,
            &dev,
        )
        .unwrap(),
    }
}

fn host_f32(t: &Tensor) -> Vec<f32> {
    match t.dtype() {
        qlora_rs::DType::F32 => t.to_vec::<f32>().unwrap(),
        _ => t
            .to_vec::<bf16>()
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect(),
    }
}

/// The tape's column split on both devices: the parts are x's columns; x's gradient is the
/// parts' gradients side by side, zeros for a part nobody used, summed with the gradient x gets
/// from a second split of it (bit for bit: the sums are doublings and additions of zero); an
/// input that needs no gradient records nothing.
#[test]
fn tape_split_cols_gradient_is_the_concat_of_the_parts_gradients() {
    use rand::SeedableRng;
    let mut r = rand::rngs::StdRng::seed_from_u64(41);
    let (t, widths) = (67usize, [12usize, 24, 12]);
    let w: usize = widths.iter().sum();
    let x = bf16_values(&mut r, t * w, 2.0);
    let dout = bf16_values(&mut r, t * 12, 1.0);
    // out = (a + c) + x[:, :12]: dx = [2·dout, 0, dout].
    let mut want = vec![0.0f32; t * w];
    for row in 0..t {
        for j in 0..12 {
            want[row * w + j] = 2.0 * dout[row * 12 + j];
            want[row * w + 36 + j] = dout[row * 12 + j];
        }
    }
    let mut devices = vec![Device::Cpu];
    if let Some(dev) = gpu_or_skip("tape_split_cols_gradient_is_the_concat_of_the_parts_gradients")
    {
        devices.push(dev);
    }
    for dev in devices {
        let batch = Batch::on(vec![0, 30, t], dev).unwrap();
        let mut tape = Tape::new(dev, &batch, None, true, None).unwrap();
        let xv = tape.input(on(dev, &x, &[t, w]), true).unwrap();
        let parts = tape.split_cols(&xv, &widths).unwrap();
        let mut o = 0;
        for (p, &wk) in parts.iter().zip(&widths) {
            let got = host_f32(p.value().unwrap());
            assert_eq!(p.value().unwrap().shape(), [t, wk]);
            for row in 0..t {
                assert_eq!(got[row * wk..][..wk], x[row * w + o..][..wk], "{dev}");
            }
            o += wk;
        }
        let again = tape.split_cols(&xv, &[12, 36]).unwrap();
        let s = tape.add(&parts[0], &parts[2]).unwrap();
        let out = tape.add(&s, &again[0]).unwrap();
        drop((parts, again, s));
        let dx = tape
            .backward(&out, Some(on(dev, &dout, &[t, 12])), &xv)
            .unwrap()
            .unwrap();
        assert_eq!(dx.shape(), [t, w]);
        assert_eq!(host_f32(&dx), want, "dx on {dev}");

        // No gradient wanted: no record, parts that need none.
        let mut tape = Tape::new(dev, &batch, None, true, None).unwrap();
        let xv = tape.input(on(dev, &x, &[t, w]), false).unwrap();
        let parts = tape.split_cols(&xv, &widths).unwrap();
        assert!(parts.iter().all(|p| !p.requires_grad()));
        assert_eq!(tape.records(), 0);
        // Bad widths name the op and both shapes.
        let err = tape.split_cols(&xv, &[12, 12]).unwrap_err().to_string();
        assert!(
            err.contains("split_cols") && err.contains("[12, 12]") && err.contains("[T, 48]"),
            "{err}"
        );
    }
}

/// A split followed by a loss on one part (the fused lm_head + cross-entropy on the CPU): x's
/// gradient is that part's gradient in its columns and zeros in the others.
#[test]
fn tape_split_cols_then_a_loss_on_one_part() {
    use qlora_rs::ops::cross_entropy;
    use rand::SeedableRng;
    let mut r = rand::rngs::StdRng::seed_from_u64(42);
    let (t, widths, vocab) = (7usize, [24usize, 12, 12], 19usize);
    let w: usize = widths.iter().sum();
    let x = bf16_values(&mut r, t * w, 1.0);
    let head = bf16_values(&mut r, vocab * 12, 0.5);
    let targets: Vec<i64> = (0..t as i64).map(|i| (i * 5) % vocab as i64).collect();
    let batch = Batch::new(vec![0, t]).unwrap();
    let mut tape = Tape::new(Device::Cpu, &batch, None, true, None).unwrap();
    let xv = tape.input(cpu(x.clone(), &[t, w]), true).unwrap();
    let parts = tape.split_cols(&xv, &widths).unwrap();
    let lm = cpu(head.clone(), &[vocab, 12]);
    let loss = tape
        .lm_head_ce(&parts[1], &lm, &targets, Some(0.5), None)
        .unwrap();
    let part1: Vec<f32> = (0..t)
        .flat_map(|row| x[row * w + 24..][..12].to_vec())
        .collect();
    let want = cross_entropy::forward_backward(
        &part1,
        &head,
        12,
        &targets,
        Some(0.5),
        cross_entropy::cpu_chunk(vocab),
        None,
    )
    .unwrap();
    assert_eq!(loss.losses.sum().unwrap(), want.loss_sum);
    let dx = tape
        .backward(&loss.var.unwrap(), None, &xv)
        .unwrap()
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    let dh = want.dh.unwrap();
    for row in 0..t {
        for j in 0..w {
            let want = if (24..36).contains(&j) {
                dh[row * 12 + j - 24]
            } else {
                0.0
            };
            assert_eq!(dx[row * w + j], want, "row {row} column {j}");
        }
    }
}

/// The tape hands RoPE's partial rotary and magnitude to the op on both devices, forward and
/// backward, bit for bit.
#[test]
fn tape_rope_honours_partial_rotary_and_magnitude() {
    use qlora_rs::ops::rope;
    use rand::SeedableRng;
    let mut r = rand::rngs::StdRng::seed_from_u64(43);
    let (heads, hd, rot, m) = (3usize, 24usize, 18usize, 1.19f32);
    let cu = vec![0usize, 5, 12];
    let t = 12;
    let x = bf16_values(&mut r, t * heads * hd, 2.0);
    let dout = bf16_values(&mut r, t * heads * hd, 1.0);
    let freqs = rope::inv_freq(rot, 10_000.0, rope::RopeScaling::None);
    let pos = rope::positions_from_cu_seqlens(&cu);
    // CPU: the tape against the op.
    let batch = Batch::new(cu.clone()).unwrap();
    let ft = cpu(freqs.clone(), &[rot / 2]);
    let mut tape = Tape::new(Device::Cpu, &batch, None, true, None).unwrap();
    let xv = tape.input(cpu(x.clone(), &[t, heads * hd]), true).unwrap();
    let y = tape.rope(xv.clone(), heads, hd, &ft, m).unwrap();
    let mut want = x.clone();
    rope::forward(&mut want, &pos, heads, hd, &freqs, m).unwrap();
    assert!(y.value().unwrap().to_vec::<f32>().unwrap() == want);
    let dx = tape
        .backward(&y, Some(cpu(dout.clone(), &[t, heads * hd])), &xv)
        .unwrap()
        .unwrap();
    let mut want = dout.clone();
    rope::backward(&mut want, &pos, heads, hd, &freqs, m).unwrap();
    assert!(dx.to_vec::<f32>().unwrap() == want);
    // GPU: the tape against the kernel.
    let Some(dev) = gpu_or_skip("tape_rope_honours_partial_rotary_and_magnitude") else {
        return;
    };
    let batch = Batch::on(cu.clone(), dev).unwrap();
    let ft = Tensor::from_vec(freqs.clone(), &[rot / 2], &dev).unwrap();
    let pg = Tensor::from_vec(
        pos.iter().map(|&p| p as i32).collect::<Vec<_>>(),
        &[t],
        &dev,
    )
    .unwrap();
    let mut tape = Tape::new(dev, &batch, None, true, None).unwrap();
    let xv = tape.input(on(dev, &x, &[t, heads * hd]), true).unwrap();
    let y = tape.rope(xv.clone(), heads, hd, &ft, m).unwrap();
    let mut want = on(dev, &x, &[t, heads, hd]);
    rope::apply_cuda(&mut want, &pg, &ft, m, false).unwrap();
    let bits = |x: &Tensor| x.to_vec::<bf16>().unwrap();
    assert_eq!(bits(y.value().unwrap()), bits(&want));
    let dx = tape
        .backward(&y, Some(on(dev, &dout, &[t, heads * hd])), &xv)
        .unwrap()
        .unwrap();
    let mut want = on(dev, &dout, &[t, heads, hd]);
    rope::apply_cuda(&mut want, &pg, &ft, m, true).unwrap();
    assert_eq!(bits(&dx), bits(&want));
}
