//! Helpers shared by the GGUF test modules (gguf_qwen, gguf_gemma, gguf_phi3).

use std::path::Path;

use half::bf16;
use qlora_rs::io::safetensors::Checkpoint;
use qlora_rs::model::config::LlamaConfig;
use qlora_rs::model::export_gguf::{export_gguf, ExportGguf, GgufReport, GgufType};
use qlora_rs::model::import_gguf::import_gguf;
use qlora_rs::quant::gguf::Value;
use serde_json::Value as Json;

/// Export settings: `model` (with `adapter` folded in) as `ty` to `output`, overwriting.
pub fn opts(model: &Path, adapter: Option<&Path>, output: &Path, ty: GgufType) -> ExportGguf {
    ExportGguf {
        model: model.to_path_buf(),
        adapter: adapter.map(Path::to_path_buf),
        output: output.to_path_buf(),
        ty,
        overwrite: true,
        onto_original: false,
        allow_other_base: true,
    }
}

/// `export-gguf` without progress output.
pub fn export(o: &ExportGguf) -> qlora_rs::Result<GgufReport> {
    export_gguf(o, |_, _, _| {})
}

/// The config of a folder, with the checkpoint dtype (f32 originals, bf16 imports) set aside.
pub fn config(dir: &Path) -> LlamaConfig {
    let mut c = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
    c.dtype = None;
    c
}

/// A copy of the model folder `model` with every weight rounded to bf16 (kept in f32): what a
/// bf16 GGUF of it, and `merge` of it without an adapter, hold.
pub fn bf16_copy(model: &Path, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    for f in std::fs::read_dir(model).unwrap() {
        let f = f.unwrap();
        if f.file_name() != "model.safetensors" {
            std::fs::copy(f.path(), out.join(f.file_name())).unwrap();
        }
    }
    let ck = Checkpoint::open_dir(model).unwrap();
    let data: Vec<(String, Vec<usize>, Vec<f32>)> = ck
        .names()
        .into_iter()
        .map(|n| {
            let t = ck.get(n).unwrap();
            let v = t.to_f32().unwrap();
            let v = v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
            (n.to_string(), t.shape.to_vec(), v)
        })
        .collect();
    crate::common::write_f32_safetensors(&out.join("model.safetensors"), &data);
}

/// Every tensor of `got` equals `want`'s bit for bit, and they hold the same names.
pub fn assert_same_weights(got: &Path, want: &Path, what: &str) {
    let (a, b) = (
        Checkpoint::open_dir(got).unwrap(),
        Checkpoint::open_dir(want).unwrap(),
    );
    let (mut na, mut nb) = (a.names(), b.names());
    na.sort();
    nb.sort();
    assert_eq!(na, nb, "{what}: tensor names");
    for n in na {
        let (x, y) = (a.get(n).unwrap(), b.get(n).unwrap());
        assert_eq!(x.shape, y.shape, "{what}: {n}");
        let (x, y) = (x.to_f32().unwrap(), y.to_f32().unwrap());
        for (i, (p, q)) in x.iter().zip(&y).enumerate() {
            assert_eq!(p.to_bits(), q.to_bits(), "{what}: {n}[{i}]: {p} vs {q}");
        }
    }
}

/// FNV-1a, 64 bits (as the make_*_gguf_reference.py scripts hash tensor bytes).
pub fn fnv1a64(data: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}

/// A metadata value equals its JSON form (gguf-py's `contents()`; f32 compared as f32).
pub fn same_value(v: &Value, j: &Json) -> bool {
    match v {
        Value::F32(x) => j.as_f64().is_some_and(|y| y as f32 == *x),
        Value::String(s) => j.as_str() == Some(s.as_str()),
        Value::Bool(b) => j.as_bool() == Some(*b),
        Value::Array(items) => j.as_array().is_some_and(|a| {
            a.len() == items.len() && items.iter().zip(a).all(|(v, j)| same_value(v, j))
        }),
        v => v.as_u64().is_some_and(|x| j.as_u64() == Some(x)),
    }
}

/// Sets (or replaces) metadata `key`.
pub fn set(meta: &mut Vec<(String, Value)>, key: &str, value: Value) {
    meta.retain(|(k, _)| k != key);
    meta.push((key.into(), value));
}

/// Imports `file`, expecting an error that names the file and holds every one of `parts`, and
/// nothing written.
pub fn import_refused(file: &Path, parts: &[&str]) {
    let out = std::env::temp_dir().join(format!(
        "qlora-rs-gguf-refused-{}-{}",
        std::process::id(),
        file.file_stem().unwrap_or_default().to_string_lossy()
    ));
    let e = import_gguf(file, &out).unwrap_err().to_string();
    assert!(e.contains(&file.display().to_string()), "{e}");
    for p in parts {
        assert!(e.contains(p), "`{p}` not in: {e}");
    }
    assert!(!out.join("config.json").exists() && !out.join("model.safetensors").exists());
}
