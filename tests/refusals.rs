//! Numbers out of range and inputs we cannot use are refused before any work, with a message
//! that names the flag or file and what was expected — never a panic, an abort, a run that never
//! ends, or a "done" over a wrong result.

use std::path::{Path, PathBuf};

use crate::common::qlora;

fn fixture(p: &str) -> PathBuf {
    qlora_rs::testing::project_root()
        .join("tests/fixtures")
        .join(p)
}

fn tmpdir(name: &str) -> PathBuf {
    crate::common::fresh_dir("refusals", name)
}

fn train(data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    train_on(&fixture("llama/tiny-llama"), data, out, extra)
}

fn train_on(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let args = train_args(model, data, out, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    qlora(&args)
}

/// `train` on the CPU at --seq-len 64 and 64 tokens a batch, one step unless `extra` says.
fn train_args(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--device",
        "cpu",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--seq-len",
        "64",
        "--batch-tokens",
        "64",
    ]
    .map(String::from)
    .to_vec();
    if !extra.iter().any(|a| a.starts_with("--max-steps")) {
        args.extend(["--max-steps".into(), "1".into()]);
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

/// Refused, with `says` on stderr.
fn refused(what: &str, out: &std::process::Output, says: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(says),
        "{what}: expected a refusal saying `{says}`, got status {:?}:\n{stderr}",
        out.status.code()
    );
    assert!(!stderr.contains("panicked"), "{what}: {stderr}");
}

#[test]
fn train_refuses_numbers_out_of_range() {
    let root = tmpdir("numbers");
    let data = fixture("data/text.jsonl");
    for (flag, value, says) in [
        ("--beta1", "1", "--beta1 must be in [0, 1), got 1"),
        ("--beta2", "1", "--beta2 must be in [0, 1), got 1"),
        ("--beta2", "-0.5", "--beta2 must be in [0, 1), got -0.5"),
        ("--eps", "0", "--eps must be positive and finite, got 0"),
        ("--eps", "inf", "--eps must be positive and finite, got inf"),
        ("--alpha", "0", "--alpha must be positive and finite, got 0"),
        (
            "--alpha",
            "nan",
            "--alpha must be positive and finite, got NaN",
        ),
        ("--lr", "inf", "--lr must be positive, got inf"),
        (
            "--weight-decay",
            "-1",
            "--weight-decay must be 0 or positive",
        ),
        (
            "--max-grad-norm",
            "nan",
            "--max-grad-norm must be 0 (no clipping)",
        ),
        // tiny-llama's smallest adapted dimension is 32 (k and v: 96 → 2 × 16).
        (
            "--rank",
            "100000",
            "LoRA rank 100000 is larger than K's smaller dimension (32",
        ),
        ("--rank", "33", "LoRA rank 33 is larger than"),
    ] {
        let out = root.join(format!("{flag}-{value}"));
        refused(
            &format!("{flag} {value}"),
            &train(&data, &out, &[&format!("{flag}={value}")]),
            says,
        );
    }
    // The largest rank that fits every projection trains.
    let ok = train(&data, &root.join("rank-32"), &["--rank", "32"]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}

/// A split of a one-record dataset has no side to hold out: refused, not a panic.
#[test]
fn eval_split_of_one_record_is_refused() {
    let root = tmpdir("split");
    let data = root.join("one.jsonl");
    std::fs::write(&data, "{\"text\": \"a single record of text\"}\n").unwrap();
    refused(
        "--eval-split on one record",
        &train(&data, &root.join("out"), &["--eval-split", "0.1"]),
        "holds 1 usable record(s); a split needs at least one on each side",
    );
}

#[test]
fn bench_and_generate_refuse_numbers_out_of_range() {
    refused(
        "bench --steps 0",
        &qlora(&[
            "bench",
            "--device",
            "cpu",
            "--shape",
            "smollm2-135m",
            "--steps",
            "0",
        ]),
        "bench --steps must be at least 1",
    );
    let model = fixture("llama/tiny-llama");
    for (flag, value, says) in [
        (
            "--temperature",
            "-1",
            "--temperature must be 0 (greedy) or positive and finite",
        ),
        (
            "--temperature",
            "nan",
            "--temperature must be 0 (greedy) or positive and finite",
        ),
        ("--top-p", "0", "--top-p must be in (0, 1], got 0"),
        ("--top-p", "1.5", "--top-p must be in (0, 1], got 1.5"),
    ] {
        refused(
            &format!("generate {flag} {value}"),
            &qlora(&[
                "generate",
                "--device",
                "cpu",
                "--model",
                model.to_str().unwrap(),
                "--prompt",
                "hello",
                &format!("{flag}={value}"),
            ]),
            says,
        );
    }
}

/// Generation ends when prompt and output fill the model's context (tiny-llama: 128 positions),
/// whatever --max-new-tokens asks; a prompt that fills it alone is refused.
#[test]
fn generation_stops_at_the_context_length() {
    use qlora_rs::model::generate::{generate_with, Sampling};
    let greedy = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        max_new_tokens: 100_000_000,
    };
    let mut calls = 0usize;
    // A model that never says eos (token 0 always wins).
    let out = generate_with(
        &[5, 6, 7],
        Some(1),
        greedy,
        10,
        &mut |_| Ok(()),
        &mut |_| {
            calls += 1;
            Ok(vec![1.0, 0.0])
        },
    )
    .unwrap();
    assert_eq!(out.len(), 7, "3 prompt tokens + 7 fill a context of 10");
    assert_eq!(calls, 7, "no logits asked for past the context");
    let err = generate_with(&[1; 10], None, greedy, 10, &mut |_| Ok(()), &mut |_| {
        Ok(vec![0.0])
    })
    .unwrap_err();
    assert!(err
        .to_string()
        .contains("the prompt has 10 tokens and the model's context is 10"));
    // The command line: --max-new-tokens far past the context still ends.
    let model = fixture("llama/tiny-llama");
    let o = qlora(&[
        "generate",
        "--device",
        "cpu",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "hello",
        "--max-new-tokens",
        "100000000",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A copy of tiny-llama whose `tensor` holds a NaN at index 5 and an Inf at index 9.
fn poisoned_model(dir: &Path, tensor: &str) {
    model_copy(dir, &|_| {}, Some(tensor), false);
}

/// A copy of tiny-llama with its config edited, a tensor poisoned (NaN at 5, Inf at 9), and/or
/// an `lm_head.weight` added (a copy of the embedding).
fn model_copy(
    dir: &Path,
    edit: &dyn Fn(&mut serde_json::Value),
    poison: Option<&str>,
    lm_head: bool,
) {
    use qlora_rs::io::writer::{self, f32_bytes, Entry};
    let src = fixture("llama/tiny-llama");
    std::fs::create_dir_all(dir).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut entries: Vec<Entry> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| Entry {
            name,
            dtype: safetensors::Dtype::F32,
            shape: view.shape().to_vec(),
        })
        .collect();
    if lm_head {
        let embed = st.tensor("model.embed_tokens.weight").unwrap();
        entries.push(Entry {
            name: "lm_head.weight".into(),
            dtype: safetensors::Dtype::F32,
            shape: embed.shape().to_vec(),
        });
    }
    writer::write(
        &dir.join("model.safetensors"),
        &entries,
        &Default::default(),
        |e| {
            let source = if e.name == "lm_head.weight" {
                "model.embed_tokens.weight"
            } else {
                e.name.as_str()
            };
            let view = st.tensor(source).unwrap();
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            let mut vals: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            if Some(e.name.as_str()) == poison {
                vals[5] = f32::NAN;
                vals[9] = f32::INFINITY;
            }
            Ok(f32_bytes(&vals))
        },
    )
    .unwrap();
}

/// NaN or Inf in a base weight is refused at load with the tensor, the count and the first —
/// dense, and before NF4 quantization would turn it into a finite code.
#[test]
fn non_finite_base_weights_are_refused_at_load() {
    let root = tmpdir("poisoned");
    let tensor = "model.layers.1.mlp.up_proj.weight";
    let model = root.join("model");
    poisoned_model(&model, tensor);
    let data = fixture("data/text.jsonl");
    for base in ["nf4", "dense"] {
        let o = qlora(&[
            "eval",
            "--device",
            "cpu",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--base",
            base,
        ]);
        refused(
            &format!("eval --base {base}"),
            &o,
            &format!("tensor `{tensor}`: holds 2 non-finite value(s) (NaN or ±Inf)"),
        );
    }
    refused(
        "train",
        &train_on(&model, &data, &root.join("out"), &[]),
        "holds 2 non-finite value(s)",
    );
}

/// A run whose loss turns NaN (here: a learning rate of 1e30 makes the adapters overflow) stops
/// with an error naming the step, exits non-zero, and writes no adapter.
#[test]
fn a_non_finite_loss_stops_the_run_without_writing_an_adapter() {
    let root = tmpdir("nan-loss");
    let out = root.join("out");
    let o = train(
        &fixture("data/text.jsonl"),
        &out,
        &["--lr", "1e30", "--max-steps", "20", "--warmup-steps", "0"],
    );
    refused("--lr 1e30", &o, "training stopped at step");
    assert!(
        !out.join("adapter_model.safetensors").exists(),
        "a NaN adapter was written"
    );
}

/// Two runs on one folder: the second is refused, naming the process that holds it; the lock
/// goes with the first process (here stopped by a signal), and a resume then takes the folder.
#[test]
fn a_second_run_on_the_same_output_is_refused_naming_the_first() {
    use std::io::{BufRead, BufReader};
    let root = tmpdir("lock");
    let out = root.join("out");
    let data = fixture("data/text.jsonl");
    let model = fixture("llama/tiny-llama");
    let owned = train_args(&model, &data, &out, &["--max-steps", "200000"]);
    let args: Vec<&str> = owned.iter().map(String::as_str).collect();
    let mut first = std::process::Command::new(crate::common::qlora_bin())
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(first.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().starts_with("step 2/") {
            break;
        }
    }
    let second = qlora(&args);
    refused(
        "a second run",
        &second,
        &format!("is in use by another qlora-rs run (process {})", first.id()),
    );
    let again = qlora(&[&args[..], &["--overwrite"]].concat());
    refused(
        "a second run with --overwrite",
        &again,
        "is in use by another qlora-rs run",
    );
    std::process::Command::new("kill")
        .args(["-INT", &first.id().to_string()])
        .status()
        .unwrap();
    for _ in lines.by_ref() {}
    let first = first.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert_eq!(first.status.code(), Some(130), "{stderr}");
    // Resume for two more steps past where the signal stopped it.
    let stopped: u64 = stderr
        .split("interrupted by SIGINT at step ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no stopping step in:\n{stderr}"));
    let more = (stopped + 2).to_string();
    let mut resumed = args.to_vec();
    let at = resumed.iter().position(|a| *a == "200000").unwrap();
    resumed[at] = &more;
    let resumed = [&resumed[..], &["--resume"]].concat();
    let o = qlora(&resumed);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// `--overwrite` with an input that does not load (a typo in --data, a model that is a file)
/// leaves the previous run untouched; `--output` or `--model` naming a file is refused.
#[test]
fn overwrite_with_a_bad_input_keeps_the_previous_run() {
    let root = tmpdir("overwrite");
    let out = root.join("out");
    let data = fixture("data/text.jsonl");
    let first = train(&data, &out, &[]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let adapter = out.join("adapter_model.safetensors");
    let before = std::fs::read(&adapter).unwrap();
    refused(
        "--overwrite with a missing --data",
        &train(&root.join("typo.jsonl"), &out, &["--overwrite"]),
        "typo.jsonl",
    );
    let file = root.join("a-file");
    std::fs::write(&file, "not a model").unwrap();
    refused(
        "--overwrite with --model a file",
        &train_on(&file, &data, &out, &["--overwrite"]),
        "is a file: give the model's folder",
    );
    assert_eq!(
        std::fs::read(&adapter).unwrap(),
        before,
        "the previous run was touched"
    );
    assert!(out.join("metrics.jsonl").exists());
    refused(
        "--output a file",
        &train(&data, &file, &[]),
        "is a file; give a folder",
    );
    // A good --overwrite replaces it.
    let o = train(&data, &out, &["--overwrite", "--seed", "7"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_ne!(std::fs::read(&adapter).unwrap(), before);
}

/// Data files: a UTF-8 byte-order mark is skipped and gzip is read; invalid UTF-8, binary
/// formats, all-empty texts and unknown roles are refused naming the file, the line and the cause.
#[test]
fn data_files_are_read_or_refused_with_their_cause() {
    let root = tmpdir("data");
    let write = |name: &str, bytes: &[u8]| {
        let p = root.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let bom = write(
        "bom.jsonl",
        b"\xef\xbb\xbf{\"text\": \"hello there, general\"}\n",
    );
    let o = train(&bom, &root.join("out-bom"), &[]);
    assert!(
        o.status.success(),
        "BOM: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut gz = Vec::new();
    {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(&mut gz, flate2::Compression::default());
        e.write_all(b"{\"text\": \"hello there, general\"}\n")
            .unwrap();
        e.finish().unwrap();
    }
    let gz = write("data.jsonl.gz", &gz);
    let o = train(&gz, &root.join("out-gz"), &[]);
    assert!(
        o.status.success(),
        "gzip: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    for (name, bytes, says) in [
        (
            "latin1.jsonl",
            &b"{\"text\": \"ok\"}\n{\"text\": \"caf\xe9\"}\n"[..],
            "line 2, byte 14 of the line (byte 29 of the file): invalid UTF-8",
        ),
        (
            "data.parquet",
            b"PAR1\x15\x04\x15\x00",
            "this is a Parquet file, not a dataset qlora-rs reads",
        ),
        (
            "blank.jsonl",
            b"{\"text\": \"\"}\n{\"text\": \"  \"}\n",
            "every record's text is empty (2 records)",
        ),
        (
            "role.jsonl",
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"asistant\", \"content\": \"yo\"}]}\n",
            "record 0 (line 1): message 1 has the unknown role `asistant`",
        ),
    ] {
        let p = write(name, bytes);
        refused(name, &train(&p, &root.join(format!("out-{name}")), &[]), says);
    }
    // eval says what it cut, as train does.
    let model = fixture("llama/tiny-llama");
    let o = qlora(&[
        "eval",
        "--device",
        "cpu",
        "--model",
        model.to_str().unwrap(),
        "--data",
        fixture("data/text.jsonl").to_str().unwrap(),
        "--seq-len",
        "8",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains(" truncated to 8 tokens"),
        "eval does not say what it truncated:\n{stderr}"
    );
}

/// The config and the checkpoint agree or we say so: tensors the config does not use (a
/// 1-layer config on a 2-layer checkpoint) are an error naming them; an `lm_head.weight` beside
/// `tie_word_embeddings: true` is set aside as transformers does, with a warning.
#[test]
fn config_and_checkpoint_disagreements_are_named() {
    let root = tmpdir("agree");
    let data = fixture("data/text.jsonl");
    let eval = |model: &Path| {
        qlora(&[
            "eval",
            "--device",
            "cpu",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
    };
    let short = root.join("one-layer");
    model_copy(&short, &|c| c["num_hidden_layers"] = 1.into(), None, false);
    refused(
        "a 1-layer config on a 2-layer checkpoint",
        &eval(&short),
        "tensor(s) that config.json does not use (num_hidden_layers 1, tie_word_embeddings true): `model.layers.1.",
    );
    let tied = root.join("tied-with-head");
    model_copy(&tied, &|_| {}, None, true);
    let o = eval(&tied);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning:")
            && stderr.contains(
                "`lm_head.weight` is not used: config.json has tie_word_embeddings: true"
            ),
        "{stderr}"
    );
}

/// adapter_config.json fields of the wrong type are errors naming the field and the type, never
/// their defaults; `merge` warns when the adapter names another base model.
#[test]
fn adapter_config_types_and_merge_base_are_checked() {
    let root = tmpdir("adapter");
    let data = fixture("data/text.jsonl");
    let out = root.join("run");
    let o = train(&data, &out, &["--rank", "4"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let model = fixture("llama/tiny-llama");
    let config_path = out.join("adapter_config.json");
    let original = std::fs::read_to_string(&config_path).unwrap();
    for (field, value, says) in [
        (
            "lora_alpha",
            serde_json::json!("32"),
            "field `lora_alpha` must be a number, got \"32\"",
        ),
        (
            "use_rslora",
            serde_json::json!("true"),
            "field `use_rslora` must be true or false, got \"true\"",
        ),
        (
            "r",
            serde_json::json!("4"),
            "field `r` must be a whole number (the rank), got \"4\"",
        ),
        (
            "lora_dropout",
            serde_json::json!([0.1]),
            "field `lora_dropout` must be a number",
        ),
    ] {
        let mut c: serde_json::Value = serde_json::from_str(&original).unwrap();
        c[field] = value;
        std::fs::write(&config_path, c.to_string()).unwrap();
        let o = qlora(&[
            "eval",
            "--device",
            "cpu",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            out.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ]);
        refused(field, &o, says);
    }
    std::fs::write(&config_path, &original).unwrap();
    let merge = |onto: &Path, to: &str| {
        qlora(&[
            "merge",
            "--model",
            onto.to_str().unwrap(),
            "--adapter",
            out.to_str().unwrap(),
            "--output",
            root.join(to).to_str().unwrap(),
        ])
    };
    let o = merge(&model, "merged-same");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success() && !stderr.contains("warning"),
        "{stderr}"
    );
    let other = root.join("another-model");
    model_copy(&other, &|_| {}, None, false);
    let o = merge(&other, "merged-other");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success()
            && stderr.contains("warning:")
            && stderr.contains("the adapter was trained on"),
        "{stderr}"
    );
}

/// Resume resumes the same run: changed data or a --max-steps below the checkpoint's step is
/// refused, naming what changed; metrics.jsonl is only ever cut back to the checkpoint, never
/// rewritten, so what was logged stays byte for byte.
#[test]
fn resume_refuses_changed_data_and_keeps_the_log_byte_for_byte() {
    let root = tmpdir("resume");
    let data = root.join("data.jsonl");
    std::fs::copy(fixture("data/text.jsonl"), &data).unwrap();
    let out = root.join("out");
    let o = train(&data, &out, &["--max-steps", "4", "--save-every", "2"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let log = std::fs::read(out.join("metrics.jsonl")).unwrap();
    assert!(!log.is_empty());
    refused(
        "--max-steps below the checkpoint",
        &train(&data, &out, &["--max-steps", "2", "--resume"]),
        "--resume --max-steps 2: the checkpoint in",
    );
    let mut changed = std::fs::read(&data).unwrap();
    changed.extend_from_slice(b"{\"text\": \"one more record\"}\n");
    std::fs::write(&data, &changed).unwrap();
    refused(
        "changed data",
        &train(&data, &out, &["--max-steps", "6", "--resume"]),
        "changed since the checkpoint",
    );
    std::fs::copy(fixture("data/text.jsonl"), &data).unwrap();
    for max in ["6", "8"] {
        let o = train(&data, &out, &["--max-steps", max, "--resume"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let after = std::fs::read(out.join("metrics.jsonl")).unwrap();
    assert!(
        after.starts_with(&log) && after.len() > log.len(),
        "the first run's log lines changed on resume"
    );
}

/// A huge record costs what its kept tokens cost: only the text that decides the first
/// --seq-len tokens is encoded (same tokens as encoding it all), so a 20 MB record at
/// --seq-len 64 trains under a 1.5 GiB address-space limit (encoding all of it took 3.2 GB).
#[test]
fn huge_records_are_encoded_only_as_far_as_they_are_kept() {
    use qlora_rs::data::{self, formats::Example, tokenizer::TextTokenizer};
    let tok = TextTokenizer::load(&fixture("llama/tiny-llama")).unwrap();
    let text: String = (0..200_000).map(|i| format!("w{} ", i % 97)).collect();
    let ex = Example::Segments(vec![(text.clone(), true)]);
    let (all, _) = data::tokenize(&tok, &ex, false).unwrap();
    let (first, _) = data::tokenize_first(&tok, &ex, false, 64).unwrap();
    assert!(first.len() > 64 && first.len() < all.len() / 10);
    assert_eq!(first[..64], all[..64]);

    let root = tmpdir("huge");
    let record = format!(
        "{{\"text\": \"{}\"}}\n",
        "lorem ipsum dolor sit amet ".repeat(20 << 20 >> 5)
    );
    let data = root.join("huge.jsonl");
    std::fs::write(&data, record).unwrap();
    let out = root.join("out");
    let model = fixture("llama/tiny-llama");
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v {}; exec \"$0\" \"$@\"",
            3 * (1 << 19) // KiB: 1.5 GiB
        ))
        .arg(crate::common::qlora_bin())
        // A CPU run: without the simulated GPU's stand-in driver, which reserves 2 TiB of
        // address space when loaded and so cannot live under this limit.
        .env_remove("LD_LIBRARY_PATH")
        .args(train_args(&model, &data, &out, &[]))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("1 truncated to 64 tokens"), "{stderr}");
}

/// Every bad record is listed at once, by `train`, `eval` and `data` alike; `--skip-bad-records`
/// (or the TOML key) leaves them out and the summary lists them; `train` prints the summary
/// that `data` prints, keys nothing reads included.
#[test]
fn bad_records_are_listed_together_and_skipped_only_when_asked() {
    let root = tmpdir("bad-records");
    let data = root.join("mixed.jsonl");
    std::fs::write(
        &data,
        [
            r#"{"id": 0, "text": "hello there, general"}"#,
            r#"{"id": 1, "text": "broken"#,
            r#"{"id": 2, "text": "the quick brown fox"}"#,
            r#"{"id": 3, "txt": "a typo in the key"}"#,
            r#"{"id": 4, "text": "jumps over the lazy dog"}"#,
        ]
        .join("\n"),
    )
    .unwrap();
    let listed = [
        "mixed.jsonl: 2 of 5 records cannot be used (--skip-bad-records leaves them out):",
        "\n  line 2: not valid JSON",
        "\n  record 3 (line 4): `text` is missing; format text needs `text` (found keys: id, txt)",
    ];
    let o = train(&data, &root.join("out"), &[]);
    for says in listed {
        refused("train with bad records", &o, says);
    }
    // Before the weights load: a model folder without them refuses the data all the same.
    let weightless = root.join("weightless");
    std::fs::create_dir_all(&weightless).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("llama/tiny-llama").join(f), weightless.join(f)).unwrap();
    }
    let o = train_on(&weightless, &data, &root.join("out"), &[]);
    refused("train with bad records, no weights", &o, listed[0]);
    let model = fixture("llama/tiny-llama");
    let eval = |extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--device",
            "cpu",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--seq-len",
            "64",
        ];
        args.extend(extra);
        qlora(&args)
    };
    let o = eval(&[]);
    for says in listed {
        refused("eval with bad records", &o, says);
    }
    let preview = |extra: &[&str]| {
        let mut args = vec![
            "data",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--seq-len",
            "64",
            "--show",
            "0",
        ];
        args.extend(extra);
        qlora(&args)
    };
    let o = preview(&[]);
    for says in listed {
        refused("data with bad records", &o, says);
    }

    // Skipped: the summary says which and why, and names the key nothing reads.
    let o = preview(&["--skip-bad-records"]);
    let summary = crate::common::succeeded(&["data", "--skip-bad-records"], &o);
    for says in [
        "5 records, format text\nskipped: 2 bad records (--skip-bad-records):\n  line 2: not valid JSON",
        "\n  record 3 (line 4): `text` is missing",
        "sequences: 3 kept; 0 dropped",
        "ignored: 3 × record key `id` (read by neither qlora-rs nor the chat template)",
        "lengths (tokens per sequence):",
    ] {
        assert!(summary.contains(says), "{says:?} not in\n{summary}");
    }
    let o = train(&data, &root.join("out"), &["--skip-bad-records"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains(&summary),
        "train does not print the summary that `data` prints:\n{summary}\n--- train:\n{stderr}"
    );
    assert!(stderr.contains("training on 3 sequences"), "{stderr}");
    let toml = root.join("run.toml");
    std::fs::write(&toml, "skip_bad_records = true\n").unwrap();
    let o = train(
        &data,
        &root.join("out-toml"),
        &["--config", toml.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = eval(&["--skip-bad-records"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains(&summary), "{summary}\n--- eval:\n{stderr}");
}
