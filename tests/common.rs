//! Helpers shared by the test modules.

use std::path::PathBuf;
use std::process::{Command, Output};

/// The `qlora-rs` binary: the one cargo built, or, for test binaries copied to a GPU host, the
/// bundled `.gpu/bin/qlora-rs` next to the current directory.
pub fn qlora_bin() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_qlora-rs"));
    if built.is_file() {
        return built;
    }
    let bundled = std::env::current_dir()
        .unwrap_or_default()
        .join(".gpu/bin/qlora-rs");
    if bundled.is_file() {
        bundled
    } else {
        built
    }
}

/// Runs the `qlora-rs` binary with `args`.
pub fn qlora(args: &[&str]) -> Output {
    Command::new(qlora_bin())
        .args(args)
        .output()
        .expect("run qlora-rs")
}

/// The standard output of a `qlora-rs` run that must have succeeded (else a panic with both
/// outputs).
pub fn succeeded(args: &[&str], o: &Output) -> String {
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "qlora-rs {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    stdout
}

/// Runs `qlora-rs` with `args`, which must succeed; returns its standard output.
pub fn qlora_ok(args: &[&str]) -> String {
    succeeded(args, &qlora(args))
}

/// Whether CUDA device 0 is the simulated GPU (`scripts/sim.sh`): the real kernels run on the
/// CPU there, thousands of times slower, so tests swap their largest shapes for smaller ones
/// that still cross the same tile edges (never for speed-free cases: every odd size stays).
pub fn on_simulator() -> bool {
    qlora_rs::device::CudaDevice::get(0)
        .ok()
        .and_then(|d| d.name().ok())
        .is_some_and(|name| name.contains("simulated"))
}

/// A copy of the tiny-qwen3 fixture without its attention biases (`attention_bias: false`):
/// llama.cpp's `qwen3` has no attention-output bias, so `export-gguf` refuses the fixture as
/// it is. Real Qwen3 checkpoints have no biases; tiny-qwen3-lora still fits it.
pub fn tiny_qwen3_without_biases(dir: &std::path::Path) -> PathBuf {
    let src = qlora_rs::testing::project_root().join("tests/fixtures/llama/tiny-qwen3");
    let out = dir.join("tiny-qwen3-no-bias");
    std::fs::create_dir_all(&out).unwrap();
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        if src.join(f).is_file() {
            std::fs::copy(src.join(f), out.join(f)).unwrap();
        }
    }
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    c["attention_bias"] = false.into();
    std::fs::write(out.join("config.json"), c.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .filter(|(n, _)| !n.ends_with(".bias"))
        .collect();
    safetensors::serialize_to_file(kept, None, &out.join("model.safetensors")).unwrap();
    out
}

/// Writes `tensors` (name, row-major shape, values) as an f32 safetensors file.
pub fn write_f32_safetensors(path: &std::path::Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((n, s, _), b)| {
            let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b);
            (n.clone(), v.unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

/// `p` under tests/fixtures/llama/ (the tiny models, their adapters and goldens).
pub fn llama_fixture(p: &str) -> PathBuf {
    qlora_rs::testing::project_root()
        .join("tests/fixtures/llama")
        .join(p)
}

/// The JSON file `p` under tests/fixtures/llama/.
pub fn llama_fixture_json(p: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(llama_fixture(p)).unwrap()).unwrap()
}

/// An empty folder of its own for a test: `qlora-rs-<group>-<pid>-<name>` in the temp dir,
/// emptied first if an earlier run left it.
pub fn fresh_dir(group: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qlora-rs-{group}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `v` written as a config.json (in a folder of its own) and read back as transformers'
/// config would be; `name` tells the folders apart in messages.
pub fn parse_config(
    name: &str,
    v: &serde_json::Value,
) -> qlora_rs::Result<qlora_rs::model::config::LlamaConfig> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "qlora-rs-config-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_string(v).unwrap()).unwrap();
    let r = qlora_rs::model::config::LlamaConfig::from_file(&p);
    let _ = std::fs::remove_dir_all(&dir);
    r
}
