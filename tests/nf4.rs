//! NF4: bit-exact with bitsandbytes (fixtures made by tests/fixtures/make_nf4_fixtures.py), the
//! CUDA kernels byte-identical to the CPU reference, and bad input rejected by name.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use qlora_rs::quant::nf4::{
    absmax_mean, dynamic_map, Absmax, Nf4Config, Nf4Tensor, BLOCKSIZES, NF4_CODE,
};
use qlora_rs::testing::gpu_or_skip;
use qlora_rs::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use safetensors::{Dtype, SafeTensors};

/// One fixture file: bitsandbytes' input, output bytes and dequantized values.
struct Fixture {
    name: String,
    meta: HashMap<String, String>,
    tensors: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
}

impl Fixture {
    fn load(path: &Path) -> Fixture {
        let bytes = std::fs::read(path).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
            .collect();
        Fixture {
            name: path.file_stem().unwrap().to_string_lossy().into_owned(),
            meta: header.metadata().clone().unwrap_or_default(),
            tensors,
        }
    }

    fn raw(&self, key: &str) -> &(Dtype, Vec<usize>, Vec<u8>) {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("{}: no tensor {key}", self.name))
    }

    fn u8s(&self, key: &str) -> Vec<u8> {
        let (dt, _, data) = self.raw(key);
        assert_eq!(*dt, Dtype::U8, "{}: {key}", self.name);
        data.clone()
    }

    fn f32s(&self, key: &str) -> Vec<f32> {
        let (dt, _, data) = self.raw(key);
        assert_eq!(*dt, Dtype::F32, "{}: {key}", self.name);
        data.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    /// A float tensor of the fixture as a CPU `Tensor` in its own dtype.
    fn tensor(&self, key: &str) -> Tensor {
        let (dt, shape, data) = self.raw(key);
        let halves = || -> Vec<u16> {
            data.chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect()
        };
        match dt {
            Dtype::F32 => Tensor::from_vec(self.f32s(key), shape, &Device::Cpu),
            Dtype::BF16 => Tensor::from_vec(
                halves().into_iter().map(bf16::from_bits).collect(),
                shape,
                &Device::Cpu,
            ),
            Dtype::F16 => Tensor::from_vec(
                halves().into_iter().map(f16::from_bits).collect(),
                shape,
                &Device::Cpu,
            ),
            other => panic!("{}: {key} has dtype {other:?}", self.name),
        }
        .unwrap()
    }

    fn blocksize(&self) -> usize {
        self.meta["blocksize"].parse().unwrap()
    }

    fn double_quant(&self) -> bool {
        self.meta["double_quant"] == "1"
    }

    /// bitsandbytes' quantization state as an `Nf4Tensor` on `device`.
    fn bnb_state(&self, device: &Device) -> Nf4Tensor {
        let weight = self.tensor("weight");
        let cpu = Device::Cpu;
        let t = |v: Vec<f32>| Tensor::from_vec(v.clone(), &[v.len()], &cpu).unwrap();
        let u = |v: Vec<u8>| Tensor::from_vec(v.clone(), &[v.len()], &cpu).unwrap();
        let absmax = if self.double_quant() {
            Absmax::Double {
                q: u(self.u8s("absmax_q")),
                absmax2: t(self.f32s("absmax2")),
                offset: t(self.f32s("offset")),
                code2: t(self.f32s("code2")),
            }
        } else {
            Absmax::Plain(t(self.f32s("absmax")))
        };
        Nf4Tensor::from_parts(
            weight.shape(),
            weight.dtype(),
            self.blocksize(),
            u(self.u8s("packed")),
            self.f32s("code").try_into().unwrap(),
            absmax,
        )
        .unwrap()
        .to_device(device)
        .unwrap()
    }
}

fn fixtures() -> Vec<Fixture> {
    let dir = qlora_rs::testing::project_root().join("tests/fixtures/nf4");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    assert!(
        paths.len() >= 10,
        "expected the NF4 fixtures in {}",
        dir.display()
    );
    paths.iter().map(|p| Fixture::load(p)).collect()
}

/// Bit patterns of any float tensor, for exact comparison (NaN-safe, -0 ≠ +0).
fn bits(t: &Tensor) -> Vec<u32> {
    match t.dtype() {
        DType::F32 => t
            .to_vec::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect(),
        DType::BF16 => t
            .to_vec::<bf16>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits() as u32)
            .collect(),
        DType::F16 => t
            .to_vec::<f16>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits() as u32)
            .collect(),
        other => panic!("not a float tensor: {other}"),
    }
}

fn f32_bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The first index where two sequences differ, for a readable failure.
fn first_diff<T: PartialEq + std::fmt::Debug>(what: &str, got: &[T], want: &[T]) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{what}: length {} vs {}", got.len(), want.len()));
    }
    let i = got.iter().zip(want).position(|(a, b)| a != b)?;
    let count = got.iter().zip(want).filter(|(a, b)| a != b).count();
    Some(format!(
        "{what}: {count} of {} differ; first at {i}: got {:?}, want {:?}",
        got.len(),
        got[i],
        want[i]
    ))
}

/// Compares a quantization of ours with a fixture's bytes; returns every difference.
fn compare_with_bnb(fx: &Fixture, q: &Nf4Tensor) -> Vec<String> {
    let mut diffs = Vec::new();
    let mut check = |d: Option<String>| diffs.extend(d.map(|d| format!("{}: {d}", fx.name)));
    check(first_diff(
        "packed",
        &q.packed.to_vec::<u8>().unwrap(),
        &fx.u8s("packed"),
    ));
    check(first_diff(
        "code",
        &f32_bits(&q.code),
        &f32_bits(&fx.f32s("code")),
    ));
    match &q.absmax {
        Absmax::Plain(a) => check(first_diff(
            "absmax",
            &f32_bits(&a.to_vec::<f32>().unwrap()),
            &f32_bits(&fx.f32s("absmax")),
        )),
        Absmax::Double {
            q: qa,
            absmax2,
            offset,
            code2,
        } => {
            check(first_diff(
                "offset",
                &f32_bits(&offset.to_vec::<f32>().unwrap()),
                &f32_bits(&fx.f32s("offset")),
            ));
            check(first_diff(
                "absmax_q",
                &qa.to_vec::<u8>().unwrap(),
                &fx.u8s("absmax_q"),
            ));
            check(first_diff(
                "absmax2",
                &f32_bits(&absmax2.to_vec::<f32>().unwrap()),
                &f32_bits(&fx.f32s("absmax2")),
            ));
            check(first_diff(
                "code2",
                &f32_bits(&code2.to_vec::<f32>().unwrap()),
                &f32_bits(&fx.f32s("code2")),
            ));
            check(first_diff(
                "dequantized absmax",
                &f32_bits(&q.absmax_f32().unwrap()),
                &f32_bits(&fx.f32s("absmax_deq")),
            ));
        }
    }
    let weight = fx.tensor("weight");
    let dq = q.dequantize(weight.dtype()).unwrap();
    assert_eq!(dq.shape(), weight.shape());
    check(first_diff(
        "dequantized",
        &bits(&dq),
        &bits(&fx.tensor("dequant")),
    ));
    diffs
}

fn quantize_fixture(fx: &Fixture, device: &Device) -> Nf4Tensor {
    let cfg = Nf4Config {
        blocksize: fx.blocksize(),
        double_quant: fx.double_quant(),
    };
    let w = fx.tensor("weight").to_device(device).unwrap();
    Nf4Tensor::quantize(&w, cfg).unwrap()
}

/// (vector, torch's single-threaded f32 mean) pairs from tests/fixtures/torch_mean.safetensors.
fn torch_means() -> Vec<(Vec<f32>, f32)> {
    let path = qlora_rs::testing::project_root().join("tests/fixtures/torch_mean.safetensors");
    let fx = Fixture::load(&path);
    let mut out: Vec<(Vec<f32>, f32)> = fx
        .tensors
        .keys()
        .filter_map(|k| k.strip_prefix("x_"))
        .map(|n| (fx.f32s(&format!("x_{n}")), fx.f32s(&format!("mean_{n}"))[0]))
        .collect();
    out.sort_by_key(|(x, _)| x.len());
    assert!(out.len() >= 20 && out.last().unwrap().0.len() > 32768);
    out
}

#[test]
fn nf4_offset_is_torch_mean_on_cpu() {
    for (x, want) in torch_means() {
        let t = Tensor::from_vec(x.clone(), &[x.len()], &Device::Cpu).unwrap();
        let got = absmax_mean(&t).unwrap();
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "n={}: got {got}, torch {want}",
            x.len()
        );
    }
    let err = absmax_mean(&Tensor::zeros(&[0], DType::F32, &Device::Cpu).unwrap()).unwrap_err();
    assert!(err.to_string().contains("non-empty f32"), "{err}");
}

#[test]
fn nf4_offset_is_torch_mean_on_cuda() {
    let Some(dev) = gpu_or_skip("nf4_offset_is_torch_mean_on_cuda") else {
        return;
    };
    for (x, want) in torch_means() {
        let t = Tensor::from_vec(x.clone(), &[x.len()], &dev).unwrap();
        let got = absmax_mean(&t).unwrap();
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "n={}: got {got}, torch {want}",
            x.len()
        );
    }
}

#[test]
fn nf4_tables_equal_bitsandbytes() {
    for fx in fixtures() {
        assert_eq!(
            f32_bits(&fx.f32s("code")),
            f32_bits(&NF4_CODE),
            "{}",
            fx.name
        );
        if fx.double_quant() {
            assert_eq!(
                f32_bits(&fx.f32s("code2")),
                f32_bits(&dynamic_map::signed()),
                "{}",
                fx.name
            );
        }
    }
}

#[test]
fn nf4_cpu_quantize_is_bit_exact_with_bitsandbytes() {
    let all = fixtures();
    let covered: std::collections::BTreeSet<usize> = all.iter().map(|f| f.blocksize()).collect();
    assert_eq!(
        covered.len(),
        BLOCKSIZES.len(),
        "every blocksize has a fixture"
    );
    let diffs: Vec<String> = all
        .iter()
        .flat_map(|fx| compare_with_bnb(fx, &quantize_fixture(fx, &Device::Cpu)))
        .collect();
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

#[test]
fn nf4_cpu_dequantizes_bitsandbytes_state_exactly() {
    for fx in fixtures() {
        let q = fx.bnb_state(&Device::Cpu);
        let want = fx.tensor("dequant");
        let got = q.dequantize(want.dtype()).unwrap();
        assert!(
            first_diff("dequant", &bits(&got), &bits(&want)).is_none(),
            "{}",
            fx.name
        );
        // f32 output too: the exact product before rounding to the weight's dtype.
        let f = q.dequantize(DType::F32).unwrap().to_vec::<f32>().unwrap();
        let want_f32: Vec<f32> = match want.dtype() {
            DType::F32 => want.to_vec::<f32>().unwrap(),
            DType::BF16 => want
                .to_vec::<bf16>()
                .unwrap()
                .iter()
                .map(|v| v.to_f32())
                .collect(),
            _ => want
                .to_vec::<f16>()
                .unwrap()
                .iter()
                .map(|v| v.to_f32())
                .collect(),
        };
        for (i, (g, w)) in f.iter().zip(&want_f32).enumerate() {
            let rounded = match want.dtype() {
                DType::F32 => *g,
                DType::BF16 => bf16::from_f32(*g).to_f32(),
                _ => f16::from_f32(*g).to_f32(),
            };
            assert_eq!(rounded.to_bits(), w.to_bits(), "{} element {i}", fx.name);
        }
    }
}

#[test]
fn nf4_cuda_is_bit_exact_with_bitsandbytes() {
    let Some(dev) = gpu_or_skip("nf4_cuda_is_bit_exact_with_bitsandbytes") else {
        return;
    };
    let mut diffs = Vec::new();
    for fx in fixtures() {
        diffs.extend(compare_with_bnb(&fx, &quantize_fixture(&fx, &dev)));
        let q = fx.bnb_state(&dev);
        let want = fx.tensor("dequant");
        let got = q.dequantize(want.dtype()).unwrap();
        diffs.extend(first_diff(
            "dequant of bnb state",
            &bits(&got),
            &bits(&want),
        ));
    }
    assert!(diffs.is_empty(), "{}", diffs.join("\n"));
}

/// Random weights with a spread of magnitudes, a zero block and exact ±absmax values.
fn awkward_weights(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut w: Vec<f32> = (0..n)
        .map(|_| {
            let u: f32 = rng.random_range(-1.0..1.0);
            u * 10f32.powi(rng.random_range(-4..2))
        })
        .collect();
    if n > 200 {
        w[64..128].fill(0.0);
        w[130] = -w[131].abs();
    }
    w
}

fn cpu_tensor_of(w: &[f32], dtype: DType) -> Tensor {
    let shape = [w.len()];
    match dtype {
        DType::F32 => Tensor::from_vec(w.to_vec(), &shape, &Device::Cpu),
        DType::BF16 => Tensor::from_vec(
            w.iter().map(|&v| bf16::from_f32(v)).collect(),
            &shape,
            &Device::Cpu,
        ),
        _ => Tensor::from_vec(
            w.iter().map(|&v| f16::from_f32(v)).collect(),
            &shape,
            &Device::Cpu,
        ),
    }
    .unwrap()
}

#[test]
fn nf4_cuda_matches_cpu_on_random_awkward_sizes() {
    let Some(dev) = gpu_or_skip("nf4_cuda_matches_cpu_on_random_awkward_sizes") else {
        return;
    };
    let sizes = [
        1usize,
        2,
        7,
        31,
        33,
        63,
        97,
        4097,
        8191,
        65_537,
        256 * 64 * 3 + 5,
        1 << 20,
    ];
    let mut case = 0u64;
    for &n in &sizes {
        for &blocksize in &BLOCKSIZES {
            for double_quant in [true, false] {
                for dtype in [DType::F32, DType::BF16, DType::F16] {
                    case += 1;
                    if n >= 65_537 && !case.is_multiple_of(3) {
                        continue; // the big sizes sample a third of the combinations
                    }
                    let w = cpu_tensor_of(&awkward_weights(n, case), dtype);
                    let cfg = Nf4Config {
                        blocksize,
                        double_quant,
                    };
                    let cpu = Nf4Tensor::quantize(&w, cfg).unwrap();
                    let gpu = Nf4Tensor::quantize(&w.to_device(&dev).unwrap(), cfg).unwrap();
                    let label = format!("n={n} blocksize={blocksize} dq={double_quant} {dtype}");
                    assert_eq!(
                        cpu.packed.to_vec::<u8>().unwrap(),
                        gpu.packed.to_vec::<u8>().unwrap(),
                        "packed, {label}"
                    );
                    assert_eq!(
                        f32_bits(&cpu.absmax_f32().unwrap()),
                        f32_bits(&gpu.absmax_f32().unwrap()),
                        "absmax, {label}"
                    );
                    if let (
                        Absmax::Double {
                            q: a,
                            absmax2: a2,
                            offset: ao,
                            ..
                        },
                        Absmax::Double {
                            q: b,
                            absmax2: b2,
                            offset: bo,
                            ..
                        },
                    ) = (&cpu.absmax, &gpu.absmax)
                    {
                        assert_eq!(
                            a.to_vec::<u8>().unwrap(),
                            b.to_vec::<u8>().unwrap(),
                            "{label}"
                        );
                        let bits_of = |t: &Tensor| f32_bits(&t.to_vec::<f32>().unwrap());
                        assert_eq!(bits_of(a2), bits_of(b2), "absmax2, {label}");
                        assert_eq!(bits_of(ao), bits_of(bo), "offset, {label}");
                    }
                    for out in [DType::F32, DType::BF16, DType::F16] {
                        let c = cpu.dequantize(out).unwrap();
                        let g = gpu.dequantize(out).unwrap();
                        assert_eq!(bits(&c), bits(&g), "dequantize to {out}, {label}");
                    }
                }
            }
        }
    }
}

#[test]
fn nf4_picks_the_nearest_code_and_bounds_the_error() {
    let n = 10_001;
    let w = awkward_weights(n, 99);
    let q = Nf4Tensor::quantize(
        &cpu_tensor_of(&w, DType::F32),
        Nf4Config {
            blocksize: 64,
            double_quant: false,
        },
    )
    .unwrap();
    let absmax = q.absmax_f32().unwrap();
    let packed = q.packed.to_vec::<u8>().unwrap();
    let dq = q.dequantize(DType::F32).unwrap().to_vec::<f32>().unwrap();
    for i in 0..n {
        let a = absmax[i / 64];
        let s = if a > 0.0 { (w[i] / a) as f64 } else { 0.0 };
        let nib = if i % 2 == 0 {
            packed[i / 2] >> 4
        } else {
            packed[i / 2] & 0xF
        };
        let chosen = (NF4_CODE[nib as usize] as f64 - s).abs();
        let best = NF4_CODE
            .iter()
            .map(|c| (*c as f64 - s).abs())
            .fold(f64::INFINITY, f64::min);
        assert!(chosen <= best + 1e-6, "element {i}: s={s} chose code {nib}");
        // Half the widest gap of the codebook (between -1 and -0.696) bounds the error.
        assert!((dq[i] - w[i]).abs() <= 0.152 * a + 1e-12, "element {i}");
    }
    // Double quantization moves each scale by at most half a step of the 8-bit map.
    let dqz = Nf4Tensor::quantize(&cpu_tensor_of(&w, DType::F32), Nf4Config::default()).unwrap();
    let approx = dqz.absmax_f32().unwrap();
    for (b, (x, y)) in absmax.iter().zip(&approx).enumerate() {
        assert!(
            (x - y).abs() <= 0.05 * absmax.iter().cloned().fold(0.0, f32::max),
            "block {b}"
        );
    }
}

#[test]
fn nf4_rejects_bad_input_by_shape_and_dtype() {
    let cpu = Device::Cpu;
    let ints = Tensor::from_vec(vec![1i32; 12], &[3, 4], &cpu).unwrap();
    let err = Nf4Tensor::quantize(&ints, Nf4Config::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("i32") && err.contains("[3, 4]"), "{err}");
    let bytes = Tensor::from_vec(vec![1u8; 6], &[6], &cpu).unwrap();
    let err = Nf4Tensor::quantize(&bytes, Nf4Config::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("u8") && err.contains("[6]"), "{err}");
    let empty = Tensor::zeros(&[0, 4], DType::BF16, &cpu).unwrap();
    let err = Nf4Tensor::quantize(&empty, Nf4Config::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("empty") && err.contains("[0, 4]") && err.contains("bf16"),
        "{err}"
    );
    let w = Tensor::from_vec(vec![0.5f32; 128], &[2, 64], &cpu).unwrap();
    let err = Nf4Tensor::quantize(
        &w,
        Nf4Config {
            blocksize: 48,
            double_quant: true,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("blocksize 48"), "{err}");
    // Parts that disagree with the shape are refused, naming the part.
    let q = Nf4Tensor::quantize(&w, Nf4Config::default()).unwrap();
    let short = Tensor::from_vec(vec![0u8; 63], &[63], &cpu).unwrap();
    let err = Nf4Tensor::from_parts(&[2, 64], DType::F32, 64, short, q.code, q.absmax)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("packed") && err.contains("[2, 64]") && err.contains("u8 [64]"),
        "{err}"
    );
    let err = q_for_dtype_err();
    assert!(
        err.contains("nf4 dequantize") && err.contains("u8"),
        "{err}"
    );
}

fn q_for_dtype_err() -> String {
    let w = Tensor::from_vec(vec![0.25f32; 64], &[64], &Device::Cpu).unwrap();
    let q = Nf4Tensor::quantize(&w, Nf4Config::default()).unwrap();
    q.dequantize(DType::U8).unwrap_err().to_string()
}
