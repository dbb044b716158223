//! `quantize` (bitsandbytes layout, compared with the checkpoint transformers + bitsandbytes
//! wrote from the same weights) and `merge` (adapter folded in; loads as a plain model).

use std::path::{Path, PathBuf};
use std::process::Command;

use qlora_rs::io::safetensors::Checkpoint;
use qlora_rs::io::{adapters, export};
use qlora_rs::model::llama::{BaseFormat, Llama};
use qlora_rs::quant::nf4::Nf4Config;

use crate::common::llama_fixture as fixture;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qlora-rs-export-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
        / scale
}

#[test]
fn quantize_writes_what_transformers_and_bitsandbytes_write() {
    let out = tmpdir("quantize");
    let r = export::quantize(&fixture("tiny-llama-bf16"), &out).unwrap();
    assert_eq!(r.projections, 14);
    let ours = Checkpoint::open_dir(&out).unwrap();
    let theirs = Checkpoint::open_dir(&fixture("tiny-llama-bnb-4bit")).unwrap();
    assert_eq!(ours.names(), theirs.names());
    for name in theirs.names() {
        let (a, b) = (ours.get(name).unwrap(), theirs.get(name).unwrap());
        assert_eq!((a.dtype, a.shape), (b.dtype, b.shape), "{name}");
        if name.ends_with("bitsandbytes__nf4") {
            let pa: serde_json::Value = serde_json::from_slice(a.bytes).unwrap();
            let pb: serde_json::Value = serde_json::from_slice(b.bytes).unwrap();
            assert_eq!(pa, pb, "{name}");
        } else {
            assert!(a.bytes == b.bytes, "{name}: bytes differ");
        }
    }
    let cfg = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap()
    };
    assert_eq!(
        cfg(&out)["quantization_config"],
        cfg(&fixture("tiny-llama-bnb-4bit"))["quantization_config"]
    );
    // It trains/loads as pre-quantized NF4, with the same logits as the reference checkpoint.
    let a = Llama::load(&out, BaseFormat::Nf4(Nf4Config::default())).unwrap();
    let b = Llama::load(
        &fixture("tiny-llama-bnb-4bit"),
        BaseFormat::Nf4(Nf4Config::default()),
    )
    .unwrap();
    let ids: Vec<u32> = (0..31).map(|i| (i * 11 + 2) % 211).collect();
    assert_eq!(
        a.logits(None, &ids, &[0, 31]).unwrap(),
        b.logits(None, &ids, &[0, 31]).unwrap()
    );
    // Refuses to overwrite, and to quantize twice.
    assert!(export::quantize(&fixture("tiny-llama-bf16"), &out)
        .unwrap_err()
        .to_string()
        .contains("already holds a model"));
    assert!(export::quantize(&out, &tmpdir("twice"))
        .unwrap_err()
        .to_string()
        .contains("already a bitsandbytes"));
}

#[test]
fn merged_model_equals_base_plus_adapter() {
    let out = tmpdir("merge");
    let r = export::merge(
        &fixture("tiny-llama"),
        &fixture("tiny-llama-lora"),
        &out,
        false,
    )
    .unwrap();
    assert_eq!(r.projections, 14);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    assert!(out.join("tokenizer.json").is_file() && out.join("tokenizer_config.json").is_file());
    let merged = Llama::load(&out, BaseFormat::Dense).unwrap();
    let base = Llama::load(
        &fixture("tiny-llama"),
        BaseFormat::Nf4(Nf4Config::default()),
    )
    .unwrap();
    let lora = adapters::load(&fixture("tiny-llama-lora"), &base.config).unwrap();
    let ids: Vec<u32> = (0..37).map(|i| (i * 7 + 5) % 211).collect();
    let want = base.logits(Some(&lora), &ids, &[0, 37]).unwrap();
    let got = merged.logits(None, &ids, &[0, 37]).unwrap();
    // bf16 weights: agreement to bf16 rounding, far closer than without the adapter.
    let err = max_rel(&got, &want);
    let without = max_rel(&base.logits(None, &ids, &[0, 37]).unwrap(), &want);
    assert!(
        err < 2e-2 && err < without / 20.0,
        "merged vs adapter {err}, base vs adapter {without}"
    );
    // Onto the original weights: close to the full-precision model plus the adapter.
    let out2 = tmpdir("merge-original");
    export::merge(
        &fixture("tiny-llama"),
        &fixture("tiny-llama-lora"),
        &out2,
        true,
    )
    .unwrap();
    let dense = Llama::load(&fixture("tiny-llama"), BaseFormat::Dense).unwrap();
    let want = dense.logits(Some(&lora), &ids, &[0, 37]).unwrap();
    let got = Llama::load(&out2, BaseFormat::Dense)
        .unwrap()
        .logits(None, &ids, &[0, 37])
        .unwrap();
    assert!(max_rel(&got, &want) < 2e-2);
}

#[test]
fn merge_keeps_the_input_sharding_and_reads_bnb_checkpoints() {
    let out = tmpdir("merge-sharded");
    let r = export::merge(
        &fixture("tiny-llama-sharded"),
        &fixture("tiny-llama-lora"),
        &out,
        false,
    )
    .unwrap();
    assert_eq!(r.shards, 3);
    assert!(out.join("model.safetensors.index.json").is_file());
    Llama::load(&out, BaseFormat::Dense).unwrap();
    // From the pre-quantized checkpoint, through the command line.
    let out = tmpdir("merge-bnb");
    let o = Command::new(crate::common::qlora_bin())
        .args(["merge", "--model"])
        .arg(fixture("tiny-llama-bnb-4bit"))
        .arg("--adapter")
        .arg(fixture("tiny-llama-lora"))
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let merged = Llama::load(&out, BaseFormat::Dense).unwrap();
    assert!(!Checkpoint::open_dir(&out)
        .unwrap()
        .names()
        .iter()
        .any(|n| n.contains("absmax")));
    let base = Llama::load(
        &fixture("tiny-llama-bnb-4bit"),
        BaseFormat::Nf4(Nf4Config::default()),
    )
    .unwrap();
    let lora = adapters::load(&fixture("tiny-llama-lora"), &base.config).unwrap();
    let ids: Vec<u32> = (0..20).collect();
    let err = max_rel(
        &merged.logits(None, &ids, &[0, 20]).unwrap(),
        &base.logits(Some(&lora), &ids, &[0, 20]).unwrap(),
    );
    assert!(err < 2e-2, "{err}");
}
