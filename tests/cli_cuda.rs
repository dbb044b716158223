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

/// `qlora-rs ARGS` with `QLORA_SIM_MODE=mode`, which must succeed: (stdout, stderr).
fn sim_bench(args: &[&str], mode: &str) -> (String, String) {
    let out = std::process::Command::new(crate::common::qlora_bin())
        .args(args)
        .env("QLORA_SIM_MODE", mode)
        .output()
        .unwrap();
    let stdout = succeeded(args, &out);
    (stdout, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The number between `before` and `after` in `text` (a byte count `bench` prints).
fn number(text: &str, before: &str, after: &str) -> u64 {
    text.split(before)
        .nth(1)
        .and_then(|s| s.split(after).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no `{before}…{after}` in:\n{text}"))
}

/// The simulated GPU's accounting mode (`QLORA_SIM_MODE=account`: launches checked, not run;
/// allocations counted, never touched) measures the same peak as running everything: `bench`
/// allocates exactly the same tensors either way. This is what makes the 8B measurement possible
/// on a machine that could not execute its step.
#[test]
fn cli_bench_account_mode_measures_the_peak_of_a_real_run() {
    let Some(_) = gpu_or_skip("cli_bench_account_mode_measures_the_peak_of_a_real_run") else {
        return;
    };
    if !crate::common::on_simulator() {
        eprintln!("cli_bench_account_mode_measures_the_peak_of_a_real_run: SKIPPED (QLORA_SIM_MODE is the simulated GPU's)");
        return;
    }
    let root = std::env::temp_dir().join(format!("qlora-rs-account-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let model = root.join("model");
    crate::cuda_step::write_gpu_sized_model(&model);
    let args = [
        "bench",
        "--device",
        "cuda",
        "--model",
        model.to_str().unwrap(),
        "--batch",
        "2",
        "--seq-len",
        "96",
        "--steps",
        "1",
        "--rank",
        "8",
    ];
    let peak = |mode: &str| {
        let (stdout, stderr) = sim_bench(&args, mode);
        (number(&stdout, "GiB allocated (", " bytes)"), stderr)
    };
    let (checked, check_err) = peak("check");
    let (accounted, account_err) = peak("account");
    assert!(!check_err.contains("QLORA_SIM_MODE=account"), "{check_err}");
    assert!(
        account_err.contains("kernel launches checked, none run"),
        "{account_err}"
    );
    assert!(checked > 0);
    assert_eq!(accounted, checked, "account mode vs a real run");
    let _ = std::fs::remove_dir_all(&root);
}

/// `qlora-rs plan` is the step's own arithmetic: held to the peak the simulated GPU measures
/// (accounting mode, so the real 8B shape takes a fraction of a second) within 3% at every shape
/// of the comparison table, and the 8B step at 1 × 2048 tokens within its 6.8 GiB budget.
#[test]
fn cli_plan_matches_the_measured_peak() {
    let Some(_) = gpu_or_skip("cli_plan_matches_the_measured_peak") else {
        return;
    };
    if !crate::common::on_simulator() {
        eprintln!("cli_plan_matches_the_measured_peak: SKIPPED (needs the simulated GPU's accounting mode)");
        return;
    }
    for (shape, batch, seq) in [
        ("llama3-8b", "1", "2048"),
        ("llama3-8b", "4", "2048"),
        ("llama3-8b", "1", "16384"),
        ("llama3-1b", "4", "2048"),
        ("smollm2-135m", "1", "2048"),
        ("smollm2-135m", "1", "64"),
        ("qwen3-0.6b", "1", "2048"),
        ("qwen3-8b", "1", "2048"),
        ("phi-4-mini", "1", "2048"),
    ] {
        let args = [
            "bench",
            "--device",
            "cuda",
            "--shape",
            shape,
            "--batch",
            batch,
            "--seq-len",
            seq,
            "--steps",
            "1",
        ];
        let (stdout, _) = sim_bench(&args, "account");
        let measured = number(&stdout, "GiB allocated (", " bytes)");
        let plan = number(&stdout, "GiB (", " bytes) on a CUDA device");
        let off = (plan as f64 - measured as f64) / measured as f64;
        assert!(
            off.abs() <= 0.03,
            "{shape} {batch}×{seq}: plan {plan} bytes vs measured {measured} ({:+.2}%)",
            off * 100.0
        );
        if (shape, batch, seq) == ("llama3-8b", "1", "2048") {
            assert!(
                measured <= (6.8 * (1u64 << 30) as f64) as u64,
                "8B at 1×2048: {measured} bytes > 6.8 GiB"
            );
        }
    }
}

/// On the GPU a run that cannot fit is refused up front with the plan's figure and the free
/// memory, and gradients that turn NaN stop the run naming their step (the device skips that
/// update and records the step) without writing an adapter.
#[test]
fn cli_cuda_refuses_runs_that_cannot_fit_and_stops_on_nan() {
    let Some(_) = gpu_or_skip("cli_cuda_refuses_runs_that_cannot_fit_and_stops_on_nan") else {
        return;
    };
    let root = std::env::temp_dir().join(format!("qlora-rs-cuda-refuse-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let model = root.join("model");
    crate::cuda_step::write_gpu_sized_model(&model);
    let data = qlora_rs::testing::project_root().join("tests/fixtures/data/alpaca.json");
    let train = |out: &str, extra: &[&str]| {
        let out = root.join(out);
        let mut args = vec![
            "train",
            "--device",
            "cuda",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--seq-len",
            "128",
        ];
        args.extend_from_slice(extra);
        let o = qlora(&args);
        (o, out)
    };
    let (o, _) = train(
        "huge",
        &["--batch-tokens", "1000000000", "--max-steps", "1"],
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("GiB is free: lower --batch-tokens or --rank"),
        "{stderr}"
    );
    let (o, out) = train(
        "nan",
        &["--batch-tokens", "256", "--max-steps", "6", "--lr", "1e30"],
    );
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("training stopped: the gradients of step "),
        "{stderr}"
    );
    assert!(!out.join("adapter_model.safetensors").exists());
    let _ = std::fs::remove_dir_all(&root);
}
