//! The command line's `--device cuda` paths end to end: `train`, `eval` and `generate` on CUDA (on
//! the simulated GPU in CI), with `eval` checked against the CPU on the adapter CUDA trained.
//! Without a GPU the test prints `SKIPPED (no CUDA device)` and passes.

use std::path::Path;

use qlora_rs::testing::gpu_or_skip;

use crate::common::{qlora, qlora_ok, succeeded};

fn eval_loss(device: &str, model: &Path, adapter: &Path, data: &Path) -> f64 {
    let stdout = qlora_ok(&[
        "eval",
        "--device",
        device,
        "--json",
        "--seq-len",
        "128",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    v["loss"].as_f64().unwrap()
}

#[test]
fn cli_train_eval_generate_on_cuda() {
    let Some(_) = gpu_or_skip("cli_train_eval_generate_on_cuda") else {
        return;
    };
    let root = std::env::temp_dir().join(format!("qlora-rs-cli-cuda-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let (model, out) = (root.join("model"), root.join("out"));
    crate::cuda_step::write_gpu_sized_model(&model);
    let data = qlora_rs::testing::project_root().join("tests/fixtures/data");
    let (train_data, eval_data) = (data.join("alpaca.json"), data.join("messages.jsonl"));

    let train = [
        "train",
        "--device",
        "cuda",
        "--model",
        model.to_str().unwrap(),
        "--data",
        train_data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--seq-len",
        "128",
        "--batch-tokens",
        "256",
        "--rank",
        "8",
        "--lr",
        "2e-2",
        "--max-steps",
        "3",
    ];
    let o = qlora(&train);
    succeeded(&train, &o);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains("device: cuda:0"), "{stderr}");
    assert!(out.join("adapter_model.safetensors").is_file());
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["loss"].as_f64())
        .collect();
    assert_eq!(losses.len(), 3, "{metrics}");
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );

    let cuda = eval_loss("cuda", &model, &out, &eval_data);
    let cpu = eval_loss("cpu", &model, &out, &eval_data);
    assert!(
        (cuda - cpu).abs() <= 2e-2 * cpu,
        "eval of the CUDA-trained adapter: cuda {cuda} vs cpu {cpu}"
    );

    let text = qlora_ok(&[
        "generate",
        "--device",
        "cuda",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
        "--prompt",
        "Give three tips",
        "--max-new-tokens",
        "4",
    ]);
    assert!(!text.trim().is_empty(), "generate printed nothing");
    let _ = std::fs::remove_dir_all(&root);
}
