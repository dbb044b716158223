//! End to end on a real model and real data (CPU): SmolLM2-135M-Instruct imported from its GGUF,
//! LoRA-trained on LLaMA-Factory's Alpaca demo records. Runs when QLORA_DEMO_ASSETS names the
//! folder `scripts/fetch-demo-assets.sh` fills (CI sets it); prints SKIPPED otherwise.
//!
//! Shows: held-out eval loss falls; resuming from the middle checkpoint reproduces the remaining
//! losses exactly; `merge` then `eval` equals `eval --adapter`; `generate` produces text.

use std::path::{Path, PathBuf};

use qlora_rs::train::metrics;

use crate::common::qlora_ok as qlora;

/// Eval loss with the base held as `base` (nf4 as in training, or dense).
fn eval_loss(model: &Path, adapter: Option<&Path>, data: &Path, base: &str) -> f64 {
    let mut args = vec![
        "eval",
        "--device",
        "cpu",
        "--json",
        "--seq-len",
        "256",
        "--base",
        base,
        "--model",
        model.to_str().unwrap(),
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    args.extend(["--data", data.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_str(qlora(&args).trim()).unwrap();
    v["loss"].as_f64().unwrap()
}

fn losses(out: &Path) -> Vec<(u64, f64)> {
    metrics::read(&out.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter_map(|m| m.loss.map(|l| (m.step, l)))
        .collect()
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let to = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &to);
        } else {
            std::fs::copy(&p, &to).unwrap();
        }
    }
}

#[test]
fn e2e_smollm2_alpaca_train_resume_merge_generate() {
    let Some(assets) = std::env::var_os("QLORA_DEMO_ASSETS").map(PathBuf::from) else {
        println!("e2e: SKIPPED (run scripts/fetch-demo-assets.sh and set QLORA_DEMO_ASSETS)");
        return;
    };
    let work = std::env::temp_dir().join(format!("qlora-rs-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let model = work.join("smollm2");
    let gguf = assets.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    qlora(&[
        "import-gguf",
        gguf.to_str().unwrap(),
        "--output",
        model.to_str().unwrap(),
    ]);

    // 240 records to train on, 40 held out.
    let records: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(assets.join("alpaca_en_demo.json")).unwrap())
            .unwrap();
    assert_eq!(records.len(), 999);
    let (train, eval) = (work.join("train.json"), work.join("eval.json"));
    std::fs::write(&train, serde_json::to_string(&records[..240]).unwrap()).unwrap();
    std::fs::write(&eval, serde_json::to_string(&records[959..]).unwrap()).unwrap();
    let before = eval_loss(&model, None, &eval, "nf4");

    let out = work.join("run");
    let steps = 24;
    let train_args = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = [
            "train",
            "--device",
            "cpu",
            "--model",
            model.to_str().unwrap(),
            "--data",
            train.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--max-steps",
            &steps.to_string(),
            "--seq-len",
            "256",
            "--batch-tokens",
            "512",
            "--lr",
            "1e-3",
            "--warmup-steps",
            "2",
            "--save-every",
            "12",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let a = train_args(&out, &[]);
    qlora(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let full = losses(&out);
    assert_eq!(full.len(), steps);
    let after = eval_loss(&model, Some(&out), &eval, "nf4");
    println!(
        "e2e: held-out eval loss {before:.4} -> {after:.4}; train loss {:.4} -> {:.4}",
        full[0].1,
        full[steps - 1].1
    );
    assert!(
        after < before - 0.02,
        "eval loss should fall: {before} -> {after}"
    );

    // Resume from the middle checkpoint (step 12) in a copy: the remaining losses repeat exactly.
    let resumed = work.join("resumed");
    copy_dir(&out, &resumed);
    let ck = resumed.join("checkpoints");
    std::fs::remove_dir_all(ck.join(format!("step-{steps:06}"))).unwrap();
    std::fs::write(ck.join("latest"), "step-000012").unwrap();
    let r = train_args(&resumed, &["--resume"]);
    qlora(&r.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        losses(&resumed),
        full,
        "resumed run must repeat the uninterrupted losses"
    );

    // merge then eval equals eval --adapter (up to the bf16 rounding of the merged weights).
    let merged = work.join("merged");
    qlora(&[
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
        "--output",
        merged.to_str().unwrap(),
    ]);
    let merged_loss = eval_loss(&merged, None, &eval, "dense");
    println!("e2e: eval --adapter {after:.5}, merged {merged_loss:.5}");
    assert!(
        (merged_loss - after).abs() < 0.02 * after,
        "merged {merged_loss} vs adapter {after}"
    );

    // generate produces text.
    let text = qlora(&[
        "generate",
        "--device",
        "cpu",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
        "--chat",
        "Give three tips for staying healthy.",
        "--max-new-tokens",
        "24",
    ]);
    println!("e2e: generated: {}", text.trim());
    assert!(text.split_whitespace().count() >= 3, "{text:?}");
    let _ = std::fs::remove_dir_all(&work);
}
