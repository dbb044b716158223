//! Phi-3 / Phi-3.5 / Phi-4-mini configs: both transformers dialects read alike (4.x: top-level
//! `rope_theta`, `partial_rotary_factor` and `rope_scaling` {type longrope | su}; 5.x: all of
//! it inside `rope_parameters`), Phi3Config's defaults where a field is absent, longrope's
//! attention factor as transformers derives it, and every option we do not implement refused by
//! name. (The model itself is checked against transformers + PEFT in tests/llama.rs.)

use std::path::Path;

use qlora_rs::model::config::{Arch, LlamaConfig};
use qlora_rs::model::lora::Target;
use qlora_rs::ops::rope::RopeScaling;
use serde_json::{json, Value};

use crate::common::{llama_fixture as fixture, llama_fixture_json, parse_config};

fn err(name: &str, v: &Value) -> String {
    parse_config(name, v).unwrap_err().to_string()
}

/// The tiny fixture's config as transformers 4.x would have written it.
fn as_4x(mut v: Value) -> Value {
    let p = v["rope_parameters"].take();
    let o = v.as_object_mut().unwrap();
    o.remove("rope_parameters");
    o.insert("rope_theta".into(), p["rope_theta"].clone());
    o.insert(
        "partial_rotary_factor".into(),
        p["partial_rotary_factor"].clone(),
    );
    o.insert(
        "rope_scaling".into(),
        json!({"type": "longrope", "short_factor": p["short_factor"],
               "long_factor": p["long_factor"]}),
    );
    v
}

#[test]
fn phi3_config_reads_fused_projections_partial_rotary_and_longrope() {
    let c = LlamaConfig::from_file(&fixture("tiny-phi3/config.json")).unwrap();
    assert_eq!(c.arch, Arch::Phi3);
    assert!(c.switches.fused_proj);
    assert_eq!(c.targets(), &Target::FUSED);
    assert_eq!(Target::Qkv.dims(&c), (96, 96 + 2 * 48));
    assert_eq!(Target::GateUp.dims(&c), (96, 2 * 172));
    assert_eq!((c.head_dim, c.rotary_dim()), (24, 18));
    assert_eq!(c.rope_scaling, RopeScaling::None);
    let lr = c.switches.longrope.as_ref().unwrap();
    assert_eq!(lr.short_factor.len(), 9);
    assert_eq!(lr.long_factor[8], 12.0);
    assert_eq!(lr.original_max_position_embeddings, 32);
    // √(1 + ln(128 / 32) / ln 32), as transformers computes it.
    let expected = (1.0 + 4f64.ln() / 32f64.ln()).sqrt() as f32;
    assert_eq!(lr.attention_factor, expected);
    assert_eq!(c.sliding_window, Some(11));
    assert!((0..2).all(|l| c.window(l) == Some(11)));
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert!(!c.qkv_bias && !c.o_bias && !c.tie_word_embeddings);
    // The 4.x dialect of the same model reads the same.
    let old = parse_config("4x", &as_4x(llama_fixture_json("tiny-phi3/config.json"))).unwrap();
    assert_eq!(old, c);
    // `su` is longrope's old name.
    let mut su = as_4x(llama_fixture_json("tiny-phi3/config.json"));
    su["rope_scaling"]["type"] = json!("su");
    assert_eq!(parse_config("su", &su).unwrap(), c);
}

#[test]
fn phi3_defaults_are_phi3configs() {
    // Phi-3-mini-4k: no rope scaling, full rotary, sliding window, Phi3Config's defaults for
    // what is left out.
    let v = json!({
        "model_type": "phi3", "hidden_size": 96, "intermediate_size": 172,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 211,
        "rope_scaling": null, "sliding_window": 2047
    });
    let c = parse_config("mini4k", &v).unwrap();
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!(c.max_position_embeddings, 4096);
    assert_eq!(c.num_kv_heads, 4);
    assert_eq!(c.rotary_dim(), 24);
    assert!(c.switches.longrope.is_none() && c.switches.fused_proj);
    assert_eq!(c.sliding_window, Some(2047));
    // An explicit attention_factor wins over the derived one; the 4.x `factor` is not read
    // for the ratio when original_max_position_embeddings is given (transformers prefers it).
    let mut v = as_4x(llama_fixture_json("tiny-phi3/config.json"));
    v["rope_scaling"]["attention_factor"] = json!(1.5);
    let c = parse_config("factor", &v).unwrap();
    assert_eq!(c.switches.longrope.unwrap().attention_factor, 1.5);
    // Within the pre-training length (max_position_embeddings ≤ original) the factor is 1.
    let mut v = llama_fixture_json("tiny-phi3/config.json");
    v["max_position_embeddings"] = json!(32);
    let c = parse_config("nolong", &v).unwrap();
    assert_eq!(c.switches.longrope.unwrap().attention_factor, 1.0);
}

#[test]
fn phi3_options_we_do_not_implement_are_refused_by_name() {
    let base = llama_fixture_json("tiny-phi3/config.json");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = base.clone();
        f(&mut v);
        v
    };
    let e = err(
        "short",
        &with(&|v| {
            v["rope_parameters"]["short_factor"] = json!([1.0, 2.0]);
        }),
    );
    assert!(
        e.contains("short_factor") && e.contains("has 2 values; 9 are needed"),
        "{e}"
    );
    let e = err(
        "nolong",
        &with(&|v| {
            v["rope_parameters"]
                .as_object_mut()
                .unwrap()
                .remove("long_factor");
        }),
    );
    assert!(e.contains("rope_parameters.long_factor"), "{e}");
    let e = err(
        "odd",
        &with(&|v| {
            v["rope_parameters"]["partial_rotary_factor"] = json!(0.71);
        }),
    );
    assert!(
        e.contains("partial_rotary_factor 0.71 gives 17 rotary dims"),
        "{e}"
    );
    for (field, value) in [
        ("resid_pdrop", 0.1),
        ("embd_pdrop", 0.1),
        ("attention_dropout", 0.1),
    ] {
        let e = err(field, &with(&|v| v[field] = json!(value)));
        assert!(e.contains(field) && e.contains("only 0"), "{e}");
    }
    let e = err("bias", &with(&|v| v["attention_bias"] = json!(true)));
    assert!(e.contains("attention_bias"), "{e}");
    let e = err(
        "dyn",
        &with(&|v| v["rope_parameters"]["rope_type"] = json!("dynamic")),
    );
    assert!(e.contains("dynamic"), "{e}");
    // Longrope and partial rotary are Phi-3's: a Llama config with them is refused.
    let mut llama = llama_fixture_json("tiny-phi3/config.json");
    llama["model_type"] = json!("llama");
    let e = err("llama-longrope", &llama);
    assert!(e.contains("longrope") && e.contains("phi3 only"), "{e}");
    llama["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 1e4,
                                      "partial_rotary_factor": 0.5});
    let e = err("llama-partial", &llama);
    assert!(
        e.contains("partial_rotary_factor") && e.contains("phi3 only"),
        "{e}"
    );
}

#[test]
fn phi3_lora_targets_are_the_fused_projections() {
    let c = LlamaConfig::from_file(&fixture("tiny-phi3/config.json")).unwrap();
    let all = Target::parse_list("all").unwrap();
    assert_eq!(Target::resolve(&all, &c).unwrap(), Target::FUSED.to_vec());
    let qv = Target::parse_list("q,v").unwrap();
    let e = Target::resolve(&qv, &c).unwrap_err().to_string();
    assert!(e.contains("qkv_proj") && e.contains("target qkv"), "{e}");
    let fused = Target::parse_list("qkv_proj,gate_up").unwrap();
    assert_eq!(
        Target::resolve(&fused, &c).unwrap(),
        vec![Target::Qkv, Target::GateUp]
    );
    let qkv = Target::parse_list("q,k,v,down").unwrap();
    assert_eq!(
        Target::resolve(&qkv, &c).unwrap(),
        vec![Target::Qkv, Target::Down]
    );
    // A fused name on a model that stores them apart.
    let llama = LlamaConfig::from_file(&fixture("tiny-llama/config.json")).unwrap();
    let e = Target::resolve(&fused, &llama).unwrap_err().to_string();
    assert!(e.contains("no fused projections"), "{e}");
    assert_eq!(Target::resolve(&all, &llama).unwrap(), Target::ALL.to_vec());
}

/// `plan` for a model the CUDA path cannot run (the tiny Llama fixture's head_dim 16) still
/// plans, and says so; Phi-3.5-mini (head_dim 96), Gemma 2 (256) and Phi-4-mini (128) plan
/// without the warning.
#[test]
fn plan_warns_where_the_cuda_path_cannot_run_the_model() {
    let tiny = qlora_rs::testing::project_root().join("tests/fixtures/llama/tiny-llama");
    let tiny = tiny.to_str().unwrap();
    for (how, what, warned) in [
        ("--model", tiny, true),
        ("--shape", "phi-3.5-mini", false),
        ("--shape", "gemma2-2b", false),
        ("--shape", "phi-4-mini", false),
    ] {
        let shape = what;
        let out = crate::common::qlora(&["plan", how, what, "--batch-tokens", "2048"]);
        assert!(out.status.success(), "{shape}: {out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stdout.contains("total"), "{stdout}");
        assert_eq!(
            stderr.contains("warning: this plan is for a CUDA device, which cannot run this model")
                && stderr.contains("head_dim 64, 96, 128 or 256"),
            warned,
            "{shape}: {stderr}"
        );
    }
}

/// The user's path on a Phi-3 folder: `train` with the default targets writes a PEFT adapter on
/// the four fused-model projections (PEFT's names), which `eval` and `generate` then load; a
/// target that is part of a fused projection is refused before any work.
#[test]
fn cli_trains_evaluates_and_generates_with_a_phi3_adapter() {
    let model = fixture("tiny-phi3");
    let model = model.to_str().unwrap();
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/text.jsonl");
    let data = data.to_str().unwrap();
    let out = std::env::temp_dir().join(format!("qlora-rs-phi3-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = out.to_str().unwrap();
    let train = crate::common::qlora(&[
        "train",
        "--device",
        "cpu",
        "--model",
        model,
        "--data",
        data,
        "--output",
        o,
        "--max-steps",
        "2",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--seq-len",
        "64",
        "--eval-split",
        "0",
    ]);
    assert!(train.status.success(), "{train:?}");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    let mut names: Vec<&str> = cfg["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]);
    let eval = crate::common::qlora(&[
        "eval",
        "--device",
        "cpu",
        "--model",
        model,
        "--adapter",
        o,
        "--data",
        data,
        "--format",
        "text",
        "--seq-len",
        "64",
        "--json",
    ]);
    assert!(eval.status.success(), "{eval:?}");
    let loss: Value = serde_json::from_slice(&eval.stdout).unwrap();
    assert!(loss["loss"].as_f64().unwrap().is_finite());
    let gen = crate::common::qlora(&[
        "generate",
        "--device",
        "cpu",
        "--model",
        model,
        "--adapter",
        o,
        "--prompt",
        "hello",
        "--max-new-tokens",
        "5",
    ]);
    assert!(gen.status.success(), "{gen:?}");
    let fresh = out.join("other");
    let bad = crate::common::qlora(&[
        "train",
        "--device",
        "cpu",
        "--model",
        model,
        "--data",
        data,
        "--output",
        fresh.to_str().unwrap(),
        "--targets",
        "q,v",
        "--max-steps",
        "1",
    ]);
    assert!(!bad.status.success());
    let e = String::from_utf8_lossy(&bad.stderr);
    assert!(e.contains("qkv_proj"), "{e}");
    let _ = std::fs::remove_dir_all(&out);
}
