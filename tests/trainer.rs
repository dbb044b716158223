//! The trainer end to end on the tiny model (CPU): losses fall, outputs are written, resume
//! repeats the uninterrupted run exactly, gradient accumulation is normalised by the step's
//! tokens, checkpoints survive a failed write, and the command line's config file and flags.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;

use qlora_rs::io::adapters;
use qlora_rs::model::llama::{BaseFormat, Llama};
use qlora_rs::train::metrics;
use qlora_rs::train::{checkpoint, TrainConfig, Trainer};

fn fixtures(p: &str) -> PathBuf {
    qlora_rs::testing::project_root()
        .join("tests/fixtures")
        .join(p)
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("qlora-rs-trainer-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn config(data: &str, out: &Path) -> TrainConfig {
    let mut c = TrainConfig::new(
        fixtures("llama/tiny-llama"),
        fixtures(&format!("data/{data}")),
        out,
    );
    c.seq_len = 128;
    c.batch_tokens = 160;
    c.lr = 5e-3;
    c.rank = 4;
    c.alpha = 8.0;
    c.dropout = 0.1;
    c.schedule = "linear".parse().unwrap();
    c.warmup_steps = 1;
    c
}

fn losses(out: &Path) -> Vec<(u64, f64)> {
    metrics::read(&out.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter_map(|m| m.loss.map(|l| (m.step, l)))
        .collect()
}

#[test]
fn training_lowers_the_loss_and_writes_a_peft_adapter() {
    let out = tmpdir("basic");
    let mut c = config("alpaca.json", &out);
    c.epochs = 6;
    c.eval_split = 0.2;
    c.eval_every = 4;
    let mut t = Trainer::new(c).unwrap();
    let first_eval = t.evaluate().unwrap().unwrap();
    let summary = t.run().unwrap();
    assert!(!summary.interrupted);
    assert_eq!(summary.steps, t.total_steps());
    let l = losses(&out);
    let n = l.len();
    let head: f64 = l[..2].iter().map(|x| x.1).sum::<f64>() / 2.0;
    let tail: f64 = l[n - 2..].iter().map(|x| x.1).sum::<f64>() / 2.0;
    assert!(tail < head * 0.8, "loss should fall: {l:?}");
    assert!(
        summary.eval_loss.unwrap() < first_eval,
        "eval {first_eval} -> {:?}",
        summary.eval_loss
    );
    for f in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "metrics.jsonl",
        "loss_curve.svg",
        "loss_curve.png",
        "training_config.toml",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let svg = std::fs::read_to_string(out.join("loss_curve.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("polyline") && svg.contains("<circle"));
    for part in [
        ">eval loss</text>",
        ">learning rate</text>",
        "class=\"tick-lr\"",
    ] {
        assert!(svg.contains(part), "{part}");
    }
    // The PNG beside it decodes to the chart's size.
    let png = std::fs::read(out.join("loss_curve.png")).unwrap();
    let reader = png::Decoder::new(std::io::Cursor::new(png))
        .read_info()
        .unwrap();
    assert_eq!((reader.info().width, reader.info().height), (1200, 675));
    // The adapter loads on its own and changes the model's predictions.
    let model = Llama::load(&fixtures("llama/tiny-llama"), BaseFormat::Dense).unwrap();
    let lora = adapters::load(&out, &model.config).unwrap();
    assert_eq!(lora.values, t.lora.values);
    let ids: Vec<u32> = (1..20).collect();
    assert_ne!(
        model.logits(None, &ids, &[0, 19]).unwrap(),
        model.logits(Some(&lora), &ids, &[0, 19]).unwrap()
    );
}

#[test]
fn resume_reproduces_the_uninterrupted_losses_exactly() {
    let full = tmpdir("full");
    let mut c = config("messages.jsonl", &full);
    c.epochs = 3;
    c.grad_accum = 2;
    Trainer::new(c.clone()).unwrap().run().unwrap();
    let want = losses(&full);
    assert!(want.len() >= 4, "{want:?}");

    let part = tmpdir("part");
    c.output = part.clone();
    let mut t = Trainer::new(c.clone()).unwrap();
    let stop = t.stop_flag();
    let cut = want.len() as u64 / 2;
    let s = t
        .run_with_progress(&mut |p| {
            if p.metrics.step == cut {
                stop.store(true, Ordering::SeqCst);
            }
        })
        .unwrap();
    assert!(s.interrupted);
    assert_eq!(s.steps, cut);
    assert!(
        !part.join("adapter_model.safetensors").exists(),
        "no final adapter when interrupted"
    );
    // The folder stays locked while its trainer lives.
    let err = Trainer::new(c.clone()).err().expect("refused").to_string();
    assert!(err.contains("in use by another qlora-rs run"), "{err}");
    drop(t);
    // Without --resume the folder is refused; with it the run continues.
    let err = Trainer::new(c.clone()).err().expect("refused").to_string();
    assert!(
        err.contains("holds another run") && err.contains("--resume"),
        "{err}"
    );
    c.resume = true;
    let mut t = Trainer::new(c.clone()).unwrap();
    assert_eq!(t.step(), cut);
    t.run().unwrap();
    drop(t);
    let got = losses(&part);
    assert_eq!(
        got, want,
        "resumed losses must equal the uninterrupted run's"
    );
    // Resuming with other settings is refused, naming them.
    c.lr = 1.0;
    let err = Trainer::new(c.clone()).err().expect("refused").to_string();
    assert!(err.contains("lr (checkpoint: 0.005, now: 1.0)"), "{err}");
    c.lr = 5e-3;
    c.resume = false;
    c.overwrite = true;
    Trainer::new(c).unwrap();
    assert!(!part.join("metrics.jsonl").exists() || losses(&part).is_empty());
}

#[test]
fn gradient_accumulation_is_normalised_by_the_steps_tokens() {
    // One step over all sequences: packed in one micro-batch, or split over several and
    // accumulated. The update must be the same.
    let run = |name: &str, batch_tokens: usize, accum: u64| {
        let out = tmpdir(name);
        let mut c = config("prompt_completion.jsonl", &out);
        c.dropout = 0.0;
        c.max_steps = Some(1);
        c.batch_tokens = batch_tokens;
        c.grad_accum = accum;
        c.max_grad_norm = 0.0;
        let mut t = Trainer::new(c).unwrap();
        t.run().unwrap();
        t.lora.values.clone()
    };
    let one = run("accum-one", 4096, 1);
    let many = run("accum-many", 128, 64);
    let scale = one.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = one
        .iter()
        .zip(&many)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(
        worst <= 1e-4 * scale,
        "accumulated update differs by {worst} (scale {scale})"
    );
}

#[test]
fn a_failed_checkpoint_write_leaves_the_previous_one() {
    let out = tmpdir("ckpt");
    let mut c = config("text.jsonl", &out);
    c.max_steps = Some(2);
    let mut t = Trainer::new(c.clone()).unwrap();
    t.train_step().unwrap();
    let first = t.save_checkpoint().unwrap();
    t.train_step().unwrap();
    // Make the temporary folder of the next checkpoint impossible to create.
    std::fs::write(
        checkpoint::checkpoints_dir(&out).join(".tmp-step-000002"),
        b"in the way",
    )
    .unwrap();
    assert!(t.save_checkpoint().is_err());
    assert_eq!(checkpoint::latest(&out).unwrap().unwrap(), first);
    let model = Llama::load(&fixtures("llama/tiny-llama"), BaseFormat::Dense).unwrap();
    let (_, opt, state) = checkpoint::load(&first, &model.config).unwrap();
    assert_eq!((state.step, opt.step), (1, 1));
}

#[test]
fn cli_trains_with_a_config_file_and_flag_overrides() {
    let out = tmpdir("cli");
    let cfg = out.with_extension("toml");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndata = {:?}\noutput = {:?}\nseq_len = 96\nbatch_tokens = 200\nrank = 2\nlr = 0.001\nmax_steps = 2\n",
            fixtures("llama/tiny-llama"),
            fixtures("data/sharegpt.jsonl"),
            out
        ),
    )
    .unwrap();
    let run = |extra: &[&str]| {
        Command::new(crate::common::qlora_bin())
            .args([
                "train",
                "--device",
                "cpu",
                "--config",
                cfg.to_str().unwrap(),
            ])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(&["--lr", "0.02"]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        stdout.contains("step 2/2") && stdout.contains("done: 2 steps"),
        "{stdout}"
    );
    let saved = TrainConfig::from_toml_file(&out.join("training_config.toml")).unwrap();
    assert_eq!(
        (saved.lr, saved.rank, saved.seq_len, saved.max_steps),
        (0.02, 2, 96, Some(2))
    );
    // The same output again: refused with a clear message.
    let o = run(&[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("holds another run"),
        "{stderr}"
    );
    // An unknown key in the config file is an error naming it.
    std::fs::write(&cfg, "learning_rate = 0.1\n").unwrap();
    let o = run(&[]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("learning_rate"),
        "{stderr}"
    );
    // Missing required settings.
    let o = Command::new(crate::common::qlora_bin())
        .args(["train", "--data", "x.jsonl"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("--model is required"),
        "{stderr}"
    );
}

#[test]
fn cli_eval_reports_loss_and_perplexity() {
    let o = Command::new(crate::common::qlora_bin())
        .args(["eval", "--device", "cpu", "--json", "--seq-len", "128"])
        .arg("--model")
        .arg(fixtures("llama/tiny-llama"))
        .arg("--adapter")
        .arg(fixtures("llama/tiny-llama-lora"))
        .arg("--data")
        .arg(fixtures("data/messages.jsonl"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let loss = v["loss"].as_f64().unwrap();
    assert!(loss > 0.0 && (v["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9);
    assert!(v["tokens"].as_u64().unwrap() > 0);
}

/// Ctrl-C (SIGINT), SIGTERM (docker stop, Slurm, spot instances) and SIGHUP each stop the run
/// after the current step with a checkpoint, print the command that resumes it, and exit with
/// 128 + the signal (130, 143, 129), so scripts and schedulers see the run was interrupted; the
/// printed command resumes it.
#[test]
fn signals_save_a_checkpoint_exit_nonzero_and_resume_continues() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    let bin = crate::common::qlora_bin();
    for (signal, status) in [("INT", 130), ("TERM", 143), ("HUP", 129)] {
        let out = tmpdir(&format!("signal-{signal}"));
        let args = |extra: &[&str]| -> Vec<String> {
            let mut a: Vec<String> = [
                "train",
                "--device",
                "cpu",
                "--seq-len",
                "64",
                "--batch-tokens",
                "64",
                "--rank",
                "2",
                "--max-steps",
                "200000",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            a.extend([
                "--model".into(),
                fixtures("llama/tiny-llama").display().to_string(),
            ]);
            a.extend([
                "--data".into(),
                fixtures("data/text.jsonl").display().to_string(),
            ]);
            a.extend(["--output".into(), out.display().to_string()]);
            a.extend(extra.iter().map(|s| s.to_string()));
            a
        };
        let mut child = Command::new(&bin)
            .args(args(&[]))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        // Wait for a few steps, then the signal.
        for line in lines.by_ref() {
            if line.unwrap().starts_with("step 3/") {
                break;
            }
        }
        let sent = Command::new("kill")
            .args([format!("-{signal}"), child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        for _ in lines.by_ref() {}
        let result = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(
            (result.status.code(), result.status.signal()),
            (Some(status), None),
            "SIG{signal}: {stderr}"
        );
        assert!(
            stderr.contains(&format!("interrupted by SIG{signal} at step")),
            "{stderr}"
        );
        let dir = checkpoint::latest(&out)
            .unwrap()
            .expect("a checkpoint after the signal");
        let model = Llama::load(&fixtures("llama/tiny-llama"), BaseFormat::Dense).unwrap();
        let (_, _, state) = checkpoint::load(&dir, &model.config).unwrap();
        assert!(state.step >= 3 && state.step < 200_000);
        // The printed command is this one with --resume; run it for two more steps.
        let printed = stderr
            .lines()
            .skip_while(|l| !l.contains("continue with:"))
            .nth(1)
            .unwrap_or_else(|| panic!("no resume command in:\n{stderr}"))
            .trim()
            .to_string();
        let mut want = vec![bin.display().to_string()];
        want.extend(args(&["--resume"]));
        assert_eq!(printed, want.join(" "));
        let mut a = args(&["--resume"]);
        let i = a.iter().position(|s| s == "200000").unwrap();
        a[i] = (state.step + 2).to_string();
        let o = Command::new(&bin).args(&a).output().unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() && stderr.contains(&format!("resuming at step {}", state.step)),
            "{stderr}"
        );
    }
}

#[test]
fn cli_bench_reports_throughput_and_the_plan() {
    let o = Command::new(crate::common::qlora_bin())
        .args([
            "bench",
            "--device",
            "cpu",
            "--seq-len",
            "32",
            "--batch",
            "2",
            "--steps",
            "1",
            "--rank",
            "4",
            "--model",
        ])
        .arg(fixtures("llama/tiny-llama"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    for want in [
        "2 × 32 tokens",
        "tokens/s",
        "TFLOP/s of model FLOPs",
        "plan",
    ] {
        assert!(stdout.contains(want), "{want} missing in {stdout}");
    }
}

#[test]
fn logging_steps_log_the_mean_of_their_steps() {
    let run = |every: u64, name: &str| {
        let out = tmpdir(name);
        let mut c = config("alpaca.json", &out);
        c.max_steps = Some(7);
        c.logging_steps = every;
        let mut t = Trainer::new(c).unwrap();
        let mut unlogged = 0;
        for _ in 0..7 {
            let m = t.train_step().unwrap();
            if m.loss.is_none() {
                assert!(m.grad_norm.is_none() && m.tokens.is_none());
                unlogged += 1;
            }
        }
        let rows = metrics::read(&out.join("metrics.jsonl")).unwrap();
        (unlogged, rows)
    };
    let (none, each) = run(1, "log1");
    assert_eq!((none, each.len()), (0, 7));
    let (none, every3) = run(3, "log3");
    // Steps 3 and 6 and the last one (7) are logged.
    assert_eq!(none, 4);
    let steps: Vec<u64> = every3.iter().map(|m| m.step).collect();
    assert_eq!(steps, [3, 6, 7]);
    for (row, range) in every3.iter().zip([0..3, 3..6, 6..7]) {
        let part = &each[range];
        let mean = part.iter().map(|m| m.loss.unwrap()).sum::<f64>() / part.len() as f64;
        assert!(
            (row.loss.unwrap() - mean).abs() <= 1e-12 * mean,
            "step {}: {} vs {mean}",
            row.step,
            row.loss.unwrap()
        );
        let tokens: u64 = part.iter().map(|m| m.tokens.unwrap()).sum();
        assert_eq!(row.tokens, Some(tokens));
        assert_eq!(row.grad_norm, part.last().unwrap().grad_norm);
    }
    let out = tmpdir("log0");
    let mut c = config("alpaca.json", &out);
    c.logging_steps = 0;
    let err = Trainer::new(c).err().unwrap().to_string();
    assert!(err.contains("--logging-steps"), "{err}");
}

/// `--tools` and `--chat-template-kwargs` (and their TOML keys) reach training's data as they
/// reach `qlora-rs data`: a bad value is refused, naming the flag or file, before the model loads.
#[test]
fn train_takes_the_chat_options_of_data() {
    let out = tmpdir("chat-opts");
    let mut c = config("messages.jsonl", &out);
    c.chat_template_kwargs = Some("[1, 2]".into());
    let err = Trainer::new(c.clone()).err().unwrap().to_string();
    assert!(
        err.contains("--chat-template-kwargs must be a JSON object"),
        "{err}"
    );
    c.chat_template_kwargs = Some(r#"{"enable_thinking": false}"#.into());
    c.tools = Some(out.join("missing-tools.json"));
    let err = Trainer::new(c.clone()).err().unwrap().to_string();
    assert!(err.contains("missing-tools.json"), "{err}");
    c.tools = None;
    // SmolLM2's template has no `enable_thinking`: the kwarg changes nothing, and train's
    // summary says so.
    let t = Trainer::new(c).unwrap();
    assert_eq!(
        t.data_stats.warnings,
        ["chat_template_kwargs.enable_thinking: the chat template never reads it, so it changes \
          nothing"]
    );
    let _ = std::fs::remove_dir_all(&out);
}

/// Evaluations report their batches as they run (the command line's progress bar), then their
/// result: every evaluation counts up to its total, and each ends in a result line.
#[test]
fn evaluations_report_progress_then_their_result() {
    let out = tmpdir("eval-progress");
    let mut c = config("messages.jsonl", &out);
    c.eval_split = 0.3;
    c.batch_tokens = 128;
    c.max_steps = Some(2);
    c.eval_every = 1;
    let mut t = Trainer::new(c).unwrap();
    let (mut ticks, mut results) = (Vec::new(), 0);
    t.run_with_progress(&mut |p| {
        if let Some(done_total) = p.evaluating {
            ticks.push(done_total);
        } else if p.metrics.eval_loss.is_some() {
            results += 1;
        }
    })
    .unwrap();
    // One periodic evaluation (after step 1) and the final one.
    assert_eq!(results, 2);
    let total = ticks.first().expect("progress during evaluation").1;
    assert!(total >= 1);
    let ends = ticks.iter().filter(|&&(d, t)| d == t).count();
    assert_eq!(ends, 2, "{ticks:?}");
    assert!(ticks.iter().all(|&(d, t)| d >= 1 && d <= t), "{ticks:?}");
    let _ = std::fs::remove_dir_all(&out);
}
