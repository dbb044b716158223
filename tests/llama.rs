//! The Llama model on the CPU against transformers + PEFT (golden fixtures made by
//! tests/fixtures/make_llama_fixtures.py): logits, loss and every LoRA gradient, packed batches,
//! Qwen2 biases, sharded/bf16/bitsandbytes-4bit checkpoints, and the LoRA invariants.

use std::path::{Path, PathBuf};

use qlora_rs::io::adapters;
use qlora_rs::io::safetensors::Checkpoint;
use qlora_rs::model::config::{Arch, LlamaConfig};
use qlora_rs::model::llama::{BaseFormat, BaseWeight, Llama};
use qlora_rs::model::lora::{LoraConfig, LoraParams, Target};
use qlora_rs::ops::rope::RopeScaling;
use qlora_rs::quant::nf4::Nf4Config;

use crate::common::llama_fixture as fixture;

struct Golden(Checkpoint);

impl Golden {
    fn open(model: &str) -> Golden {
        Golden(Checkpoint::open_files(&[fixture(&format!("{model}-golden.safetensors"))]).unwrap())
    }
    fn f32(&self, name: &str) -> Vec<f32> {
        let t = self.0.get(name).unwrap();
        t.to_f32().unwrap()
    }
    fn scalar(&self, name: &str) -> f64 {
        self.f32(name)[0] as f64
    }
    fn ints(&self, name: &str) -> Vec<i64> {
        let t = self.0.get(name).unwrap();
        match t.dtype {
            safetensors::Dtype::I64 => t
                .bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            safetensors::Dtype::I32 => t
                .bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64)
                .collect(),
            other => panic!("{name}: {other:?}"),
        }
    }
    fn ids(&self, name: &str) -> Vec<u32> {
        self.ints(name).into_iter().map(|v| v as u32).collect()
    }
}

/// `max |got − ref| ≤ rel · max |ref|`, reported with the worst index.
fn assert_rel(what: &str, got: &[f32], reference: &[f32], rel: f64) {
    assert_eq!(got.len(), reference.len(), "{what}: length");
    let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    let (mut worst, mut at) = (0.0f64, 0);
    for (i, (g, r)) in got.iter().zip(reference).enumerate() {
        let e = (*g as f64 - *r as f64).abs();
        if e > worst || e.is_nan() {
            worst = e;
            at = i;
        }
    }
    assert!(
        worst <= rel * scale,
        "{what}: max error {worst:e} at {at} (got {}, ref {}) exceeds {rel:e} × max|ref| {scale:e}",
        got[at],
        reference[at]
    );
}

fn load(model: &str, format: BaseFormat) -> Llama {
    Llama::load(&fixture(model), format).unwrap()
}

fn adapter(model: &Llama, name: &str) -> LoraParams {
    adapters::load(&fixture(name), &model.config).unwrap()
}

/// Checks every LoRA gradient against the golden `prefix<peft key>` tensors (the goldens name
/// the text model's layers, `model.layers`).
fn check_grads(g: &Golden, lora: &LoraParams, grads: &[f32], prefix: &str) {
    for slot in &lora.slots {
        for (which, range) in [('A', slot.a.clone()), ('B', slot.b.clone())] {
            let key = slot.peft_key("model.layers", which);
            assert_rel(
                &format!("{prefix}{key}"),
                &grads[range],
                &g.f32(&format!("{prefix}{key}")),
                1e-3,
            );
        }
    }
}

fn golden_case(model_dir: &str) {
    golden_case_of(model_dir, model_dir)
}

/// [`golden_case`] for the model in `model_dir` (and its `-lora` adapter) against the goldens
/// of `golden` (a model with the same weights).
fn golden_case_of(model_dir: &str, golden: &str) {
    let g = Golden::open(golden);
    let model = load(model_dir, BaseFormat::Dense);
    let lora = adapter(&model, &format!("{model_dir}-lora"));
    let ids = g.ids("input_ids");
    let labels = g.ints("labels");
    let cu = [0, ids.len()];
    let logits = model.logits(Some(&lora), &ids, &cu).unwrap();
    assert_rel(
        &format!("{model_dir} logits"),
        &logits,
        &g.f32("logits"),
        1e-4,
    );
    let mut grads = vec![0.0f32; lora.len()];
    let count = g.scalar("loss_count");
    let loss = model
        .forward_backward(
            &lora,
            &mut grads,
            &ids,
            &labels,
            &cu,
            (1.0 / count) as f32,
            0,
        )
        .unwrap();
    assert_eq!(loss.count as f64, count);
    assert!((loss.loss_sum - g.scalar("loss_sum")).abs() <= 1e-4 * g.scalar("loss_sum").abs());
    assert!((loss.loss_sum / count - g.scalar("loss")).abs() <= 1e-4 * g.scalar("loss"));
    check_grads(&g, &lora, &grads, "grad.");

    // Case B: two packed sequences, reference computed on each alone.
    let pids = g.ids("packed_input_ids");
    let plabels = g.ints("packed_labels");
    let pcu: Vec<usize> = g
        .ints("packed_cu_seqlens")
        .iter()
        .map(|&v| v as usize)
        .collect();
    let plogits = model.logits(Some(&lora), &pids, &pcu).unwrap();
    assert_rel(
        &format!("{model_dir} packed logits"),
        &plogits,
        &g.f32("packed_logits"),
        1e-4,
    );
    let pcount = g.scalar("packed_loss_count");
    let mut pgrads = vec![0.0f32; lora.len()];
    let ploss = model
        .forward_backward(
            &lora,
            &mut pgrads,
            &pids,
            &plabels,
            &pcu,
            (1.0 / pcount) as f32,
            0,
        )
        .unwrap();
    assert_eq!(ploss.count as f64, pcount);
    assert!(
        (ploss.loss_sum - g.scalar("packed_loss_sum")).abs() <= 1e-4 * g.scalar("packed_loss_sum")
    );
    check_grads(&g, &lora, &pgrads, "packed_grad.");
}

#[test]
fn llama_matches_transformers_peft_logits_loss_and_lora_gradients() {
    golden_case("tiny-llama");
}

#[test]
fn qwen2_with_qkv_biases_matches_transformers_peft() {
    golden_case("tiny-qwen2");
}

/// Qwen3: per-head RMSNorm of q and k before RoPE (random norm weights), head_dim 24 where
/// hidden / heads is 16, biases on q, k, v and o.
#[test]
fn qwen3_with_head_norms_and_biases_matches_transformers_peft() {
    golden_case("tiny-qwen3");
}

#[test]
fn llama_intermediates_match_transformers() {
    let g = Golden::open("tiny-llama");
    let model = load("tiny-llama", BaseFormat::Dense);
    let freqs = qlora_rs::ops::rope::inv_freq(
        model.config.head_dim,
        model.config.rope_theta,
        model.config.rope_scaling,
    );
    assert_rel(
        "llama3-scaled inv_freq",
        &freqs,
        &g.f32("debug.inv_freq"),
        1e-6,
    );
    let lora = adapter(&model, "tiny-llama-lora");
    let ids = g.ids("input_ids");
    let h = model
        .hidden_states(Some(&lora), &ids, &[0, ids.len()])
        .unwrap();
    assert_rel("final norm output", &h, &g.f32("debug.final_norm"), 1e-4);
}

#[test]
fn llama_packed_sequences_equal_each_run_alone() {
    let model = load("tiny-llama", BaseFormat::Dense);
    let lora = adapter(&model, "tiny-llama-lora");
    let g = Golden::open("tiny-llama");
    let ids = g.ids("input_ids");
    let (a, b) = (&ids[..20], &ids[20..]);
    let packed = model
        .logits(Some(&lora), &ids, &[0, 20, ids.len()])
        .unwrap();
    let la = model.logits(Some(&lora), a, &[0, a.len()]).unwrap();
    let lb = model.logits(Some(&lora), b, &[0, b.len()]).unwrap();
    let v = model.config.vocab_size;
    // Equal up to f32 rounding (the matrix products block differently for other row counts).
    assert_rel(
        "first sequence, packed vs alone",
        &packed[..20 * v],
        &la,
        1e-5,
    );
    assert_rel(
        "second sequence, packed vs alone",
        &packed[20 * v..],
        &lb,
        1e-5,
    );
}

#[test]
fn lora_with_zero_b_gives_exactly_the_base_model() {
    let model = load("tiny-llama", BaseFormat::Nf4(Nf4Config::default()));
    let cfg = LoraConfig {
        rank: 8,
        alpha: 16.0,
        rslora: false,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
    };
    let lora = LoraParams::init(&model.config, cfg, 3).unwrap();
    assert!(lora
        .slots
        .iter()
        .all(|s| lora.values[s.b.clone()].iter().all(|&v| v == 0.0)));
    assert!(lora
        .slots
        .iter()
        .any(|s| lora.values[s.a.clone()].iter().any(|&v| v != 0.0)));
    let ids: Vec<u32> = (0..29).map(|i| (i * 7 + 3) % 211).collect();
    let base = model.logits(None, &ids, &[0, 29]).unwrap();
    let with = model.logits(Some(&lora), &ids, &[0, 29]).unwrap();
    assert_eq!(base, with);
}

#[test]
fn qlora_equals_lora_on_the_dequantized_base() {
    // The same NF4 weights held two ways: as NF4 (dequantized inside each op) and dense.
    let nf4 = load("tiny-llama-bnb-4bit", BaseFormat::Nf4(Nf4Config::default()));
    let dense = load("tiny-llama-bnb-4bit", BaseFormat::Dense);
    assert!(matches!(nf4.base(0, Target::Q), BaseWeight::Nf4(_)));
    assert!(matches!(dense.base(0, Target::Q), BaseWeight::Dense(_)));
    let lora = adapter(&nf4, "tiny-llama-lora");
    let g = Golden::open("tiny-llama");
    let (ids, labels) = (g.ids("input_ids"), g.ints("labels"));
    let cu = [0, ids.len()];
    assert_eq!(
        nf4.logits(Some(&lora), &ids, &cu).unwrap(),
        dense.logits(Some(&lora), &ids, &cu).unwrap()
    );
    let (mut ga, mut gb) = (vec![0.0; lora.len()], vec![0.0; lora.len()]);
    let la = nf4
        .forward_backward(&lora, &mut ga, &ids, &labels, &cu, 0.1, 0)
        .unwrap();
    let lb = dense
        .forward_backward(&lora, &mut gb, &ids, &labels, &cu, 0.1, 0)
        .unwrap();
    assert_eq!(la, lb);
    assert_eq!(ga, gb);
}

#[test]
fn bnb_4bit_checkpoint_loads_and_matches_its_reference_logits() {
    let model = load("tiny-llama-bnb-4bit", BaseFormat::Nf4(Nf4Config::default()));
    let lora = adapter(&model, "tiny-llama-lora");
    let g = Golden::open("tiny-llama");
    let ids = g.ids("input_ids");
    let logits = model.logits(Some(&lora), &ids, &[0, ids.len()]).unwrap();
    assert_rel("bnb-4bit logits", &logits, &g.f32("bnb_logits"), 1e-4);
    let BaseWeight::Nf4(q) = model.base(0, Target::Q) else {
        panic!("NF4 expected")
    };
    let w = q
        .dequantize(qlora_rs::DType::F32)
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    assert_eq!(
        w,
        g.f32("bnb_dequant.model.layers.0.self_attn.q_proj.weight")
    );
}

#[test]
fn bnb_4bit_checkpoint_equals_quantizing_the_original_on_load() {
    let pre = load("tiny-llama-bnb-4bit", BaseFormat::Nf4(Nf4Config::default()));
    let fresh = load("tiny-llama-bf16", BaseFormat::Nf4(Nf4Config::default()));
    for l in 0..pre.config.num_layers {
        for t in Target::ALL {
            let (BaseWeight::Nf4(a), BaseWeight::Nf4(b)) = (pre.base(l, t), fresh.base(l, t))
            else {
                panic!("NF4 expected")
            };
            assert_eq!(
                a.packed.to_vec::<u8>().unwrap(),
                b.packed.to_vec::<u8>().unwrap(),
                "layer {l} {t:?} codes"
            );
            assert_eq!(
                a.absmax_f32().unwrap(),
                b.absmax_f32().unwrap(),
                "layer {l} {t:?} scales"
            );
        }
    }
    let lora = adapter(&pre, "tiny-llama-lora");
    let ids: Vec<u32> = (0..23).map(|i| (i * 13 + 1) % 211).collect();
    assert_eq!(
        pre.logits(Some(&lora), &ids, &[0, 23]).unwrap(),
        fresh.logits(Some(&lora), &ids, &[0, 23]).unwrap()
    );
}

#[test]
fn sharded_and_bf16_checkpoints_load() {
    let single = load("tiny-llama", BaseFormat::Dense);
    let sharded = load("tiny-llama-sharded", BaseFormat::Dense);
    let ids: Vec<u32> = (0..17).map(|i| (i * 5) % 211).collect();
    assert_eq!(
        single.logits(None, &ids, &[0, 17]).unwrap(),
        sharded.logits(None, &ids, &[0, 17]).unwrap()
    );
    let bf16 = load("tiny-llama-bf16", BaseFormat::Dense);
    let a = single.logits(None, &ids, &[0, 17]).unwrap();
    let b = bf16.logits(None, &ids, &[0, 17]).unwrap();
    assert_rel("bf16 checkpoint logits vs f32", &b, &a, 5e-2);
    assert_ne!(a, b);
}

#[test]
fn forward_backward_is_deterministic_and_leaves_frozen_weights_alone() {
    let model = load("tiny-llama", BaseFormat::Nf4(Nf4Config::default()));
    let BaseWeight::Nf4(q) = model.base(1, Target::Down) else {
        panic!()
    };
    let before = q.packed.to_vec::<u8>().unwrap();
    let mut lora = adapter(&model, "tiny-llama-lora");
    lora.config.dropout = 0.1;
    let g = Golden::open("tiny-llama");
    let (ids, labels) = (g.ids("input_ids"), g.ints("labels"));
    let cu = [0, ids.len()];
    let run = |seed| {
        let mut grads = vec![0.0f32; lora.len()];
        let l = model
            .forward_backward(&lora, &mut grads, &ids, &labels, &cu, 0.05, seed)
            .unwrap();
        (l, grads)
    };
    let (l1, g1) = run(11);
    let (l2, g2) = run(11);
    assert_eq!(l1, l2);
    assert_eq!(g1, g2);
    let (l3, _) = run(12);
    assert_ne!(l1, l3, "another dropout seed draws other masks");
    let BaseWeight::Nf4(q) = model.base(1, Target::Down) else {
        panic!()
    };
    assert_eq!(q.packed.to_vec::<u8>().unwrap(), before);

    // With dropout, the gradient still describes the loss the forward computed (same masks in
    // the replay): the directional derivative along the gradient matches |g|².
    let norm2: f64 = g1.iter().map(|&v| (v as f64).powi(2)).sum();
    let eps = 1e-2 / norm2.sqrt();
    let shifted = |sign: f64| {
        let mut l = lora.clone();
        for (v, gv) in l.values.iter_mut().zip(&g1) {
            *v += (sign * eps * *gv as f64) as f32;
        }
        let mut scratch = vec![0.0f32; l.len()];
        model
            .forward_backward(&l, &mut scratch, &ids, &labels, &cu, 0.05, 11)
            .unwrap()
            .loss_sum
            * 0.05
    };
    let numeric = (shifted(1.0) - shifted(-1.0)) / (2.0 * eps);
    assert!(
        (numeric - norm2).abs() <= 0.02 * norm2,
        "directional derivative {numeric} vs |g|² {norm2}"
    );
}

#[test]
fn config_files_parse_into_validated_configs() {
    let c = |name: &str| LlamaConfig::from_file(&fixture(&format!("configs/{name}"))).unwrap();
    let l8 = c("llama-3.1-8b.json");
    assert_eq!(
        (l8.arch, l8.head_dim, l8.n_kv_groups(), l8.num_layers),
        (Arch::Llama, 128, 4, 32)
    );
    assert_eq!(
        l8.rope_scaling,
        RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192
        }
    );
    assert_eq!(l8.rope_theta, 500_000.0);
    assert!(!l8.tie_word_embeddings && !l8.qkv_bias);
    assert!(
        (7.9e9..8.1e9).contains(&(l8.num_parameters() as f64)),
        "{}",
        l8.num_parameters()
    );
    let smol = c("smollm2-135m.json");
    assert_eq!(
        (smol.head_dim, smol.n_kv_groups(), smol.tie_word_embeddings),
        (64, 3, true)
    );
    assert!(
        (1.3e8..1.4e8).contains(&(smol.num_parameters() as f64)),
        "{}",
        smol.num_parameters()
    );
    assert_eq!(
        c("llama-linear-rope.json").rope_scaling,
        RopeScaling::Linear { factor: 2.0 }
    );
    assert_eq!(c("mistral-default.json").arch, Arch::Mistral);
    let qwen = c("qwen2-default.json");
    assert!(qwen.arch == Arch::Qwen2 && qwen.qkv_bias && !qwen.o_bias);
    let tiny = LlamaConfig::from_file(&fixture("tiny-llama/config.json")).unwrap();
    assert_eq!(tiny.head_dim, 16);
    assert!(matches!(
        tiny.rope_scaling,
        RopeScaling::Llama3 {
            original_max_position_embeddings: 64,
            ..
        }
    ));
}

fn write_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-llama/config.json")).unwrap())
            .unwrap();
    edit(&mut v);
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join("config.json");
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
    p
}

fn tmpdir(name: &str) -> PathBuf {
    crate::common::fresh_dir("test", name)
}

#[test]
fn bad_configs_are_rejected_naming_the_field() {
    let dir = tmpdir("bad-config");
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|v| v["model_type"] = "gpt2".into()),
            "model_type `gpt2` is not supported (supported: llama, mistral, qwen2, qwen3, gemma2, gemma3_text, gemma3 (its language model), phi3)",
        ),
        (
            Box::new(|v| {
                v["num_attention_heads"] = 5.into();
                v.as_object_mut().unwrap().remove("head_dim");
            }),
            "num_attention_heads (5) does not divide hidden_size (96)",
        ),
        (
            Box::new(|v| v["num_key_value_heads"] = 4.into()),
            "num_key_value_heads (4) does not divide num_attention_heads (6)",
        ),
        (
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("vocab_size");
            }),
            "`vocab_size` is missing",
        ),
        (
            Box::new(|v| v["rope_parameters"]["rope_type"] = "yarn".into()),
            "rope_type `yarn`",
        ),
        (
            Box::new(|v| v["hidden_act"] = "gelu".into()),
            "`hidden_act` is `gelu`",
        ),
        (
            Box::new(|v| v["hidden_size"] = "wide".into()),
            "not a valid config.json",
        ),
        (
            Box::new(|v| v["layer_types"] = serde_json::json!(["full_attention", "chunked"])),
            "`layer_types` has `chunked` for layer 1",
        ),
        (
            Box::new(|v| {
                v["layer_types"] = serde_json::json!(["sliding_attention", "full_attention"])
            }),
            "lists sliding_attention layers but `sliding_window` is not set",
        ),
        (
            Box::new(|v| v["layer_types"] = serde_json::json!(["full_attention"])),
            "`layer_types` lists 1 layers but num_hidden_layers is 2",
        ),
    ];
    for (edit, want) in cases {
        let p = write_config(&dir, edit);
        let err = LlamaConfig::from_file(&p).unwrap_err().to_string();
        assert!(err.contains(want), "{err}\nshould contain: {want}");
        assert!(err.contains("config.json"), "{err} should name the file");
    }
}

fn copy_model(src: &str, name: &str) -> PathBuf {
    let dir = tmpdir(name);
    for e in std::fs::read_dir(fixture(src)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    dir
}

#[test]
fn loader_errors_name_the_file_and_tensor() {
    // Inconsistent config: rejected before any weight is read (the weights file is garbage).
    let dir = tmpdir("config-first");
    write_config(&dir, |v| v["num_key_value_heads"] = 4.into());
    std::fs::write(dir.join("model.safetensors"), b"not a checkpoint").unwrap();
    let err = Llama::load(&dir, BaseFormat::Dense)
        .unwrap_err()
        .to_string();
    assert!(err.contains("num_key_value_heads"), "{err}");

    // Wrong shape: the config says a bigger intermediate size than the weights have.
    let dir = copy_model("tiny-llama", "wrong-shape");
    write_config(&dir, |v| v["intermediate_size"] = 180.into());
    let err = Llama::load(&dir, BaseFormat::Dense)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors")
            && err.contains("model.layers.0.mlp.gate_proj.weight")
            && err.contains("[172, 96]")
            && err.contains("[180, 96]"),
        "{err}"
    );

    // Missing tensor: an untied config needs lm_head.weight.
    let dir = copy_model("tiny-llama", "missing");
    write_config(&dir, |v| v["tie_word_embeddings"] = false.into());
    let err = Llama::load(&dir, BaseFormat::Dense)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lm_head.weight")
            && err.contains("not found")
            && err.contains("model.safetensors"),
        "{err}"
    );

    // Truncated file.
    let dir = copy_model("tiny-llama", "truncated");
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let err = Llama::load(&dir, BaseFormat::Dense)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors") && err.contains("truncated"),
        "{err}"
    );

    // Wrong dtype: an integer tensor where a float is expected.
    let err = Checkpoint::open_files(&[fixture("tiny-llama-golden.safetensors")])
        .unwrap()
        .f32("input_ids", &[37])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("input_ids")
            && err.contains("I64")
            && err.contains("expected F32, BF16 or F16"),
        "{err}"
    );
}

#[test]
fn adapters_round_trip_in_peft_layout() {
    let model = load("tiny-llama", BaseFormat::Dense);
    let lora = adapter(&model, "tiny-llama-lora");
    assert_eq!(lora.config.scale(), 3.0);
    let dir = tmpdir("adapter");
    adapters::save(&dir, &lora, Some("tiny-llama")).unwrap();
    let back = adapters::load(&dir, &model.config).unwrap();
    assert_eq!(back.values, lora.values);
    assert_eq!(back.config, lora.config);
    let saved = Checkpoint::open_files(&[dir.join("adapter_model.safetensors")]).unwrap();
    assert_eq!(saved.names().len(), 2 * 7 * 2);
    assert!(saved
        .names()
        .iter()
        .all(|n| n.starts_with("base_model.model.model.layers.")
            && (n.ends_with(".lora_A.weight") || n.ends_with(".lora_B.weight"))));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 12.0);
    assert!(!dir.join("adapter_model.safetensors.tmp").exists());
}

#[test]
fn lora_on_a_subset_of_targets_with_rslora_has_consistent_gradients() {
    let model = load("tiny-qwen2", BaseFormat::Nf4(Nf4Config::default()));
    let cfg = LoraConfig {
        rank: 3,
        alpha: 5.0,
        rslora: true,
        dropout: 0.0,
        targets: Target::parse_list("q,v,down").unwrap(),
    };
    assert_eq!(cfg.scale(), (5.0 / 3f64.sqrt()) as f32);
    let mut lora = LoraParams::init(&model.config, cfg, 9).unwrap();
    assert_eq!(lora.slots.len(), 2 * 3);
    // Non-zero B so that A's gradient is not trivially zero.
    for (i, v) in lora.values.iter_mut().enumerate() {
        if *v == 0.0 {
            *v = ((i * 37 % 101) as f32 / 101.0 - 0.5) * 0.1;
        }
    }
    let g = Golden::open("tiny-qwen2");
    let (ids, labels) = (g.ids("input_ids"), g.ints("labels"));
    let cu = [0, 20, ids.len()];
    let mut grads = vec![0.0f32; lora.len()];
    model
        .forward_backward(&lora, &mut grads, &ids, &labels, &cu, 0.1, 0)
        .unwrap();
    assert!(lora
        .slots
        .iter()
        .all(|s| grads[s.a.clone()].iter().any(|&v| v != 0.0)));
    let norm2: f64 = grads.iter().map(|&v| (v as f64).powi(2)).sum();
    let eps = 1e-2 / norm2.sqrt();
    let shifted = |sign: f64| {
        let mut l = lora.clone();
        for (v, gv) in l.values.iter_mut().zip(&grads) {
            *v += (sign * eps * *gv as f64) as f32;
        }
        model.loss(Some(&l), &ids, &labels, &cu).unwrap().loss_sum * 0.1
    };
    let numeric = (shifted(1.0) - shifted(-1.0)) / (2.0 * eps);
    assert!(
        (numeric - norm2).abs() <= 0.02 * norm2,
        "directional derivative {numeric} vs |g|² {norm2}"
    );
    assert!(Target::parse_list("q,attn").is_err());
    assert_eq!(Target::parse_list("all").unwrap().len(), 7);
}

#[test]
fn f16_tensors_read_as_f32() {
    let ckpt =
        Checkpoint::open_files(&[qlora_rs::testing::project_root()
            .join("tests/fixtures/nf4/f16_65x97_bs64_dq.safetensors")])
        .unwrap();
    let t = ckpt.get("weight").unwrap();
    assert_eq!(t.dtype, safetensors::Dtype::F16);
    let want: Vec<f32> = t
        .bytes
        .chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect();
    assert_eq!(ckpt.f32("weight", &[65, 97]).unwrap(), want);
    assert!(want.iter().any(|&v| v != 0.0));
}

#[test]
fn generation_with_a_kv_cache_equals_recomputing_everything() {
    use qlora_rs::model::generate::Sampling;
    let model = load("tiny-llama", BaseFormat::Nf4(Nf4Config::default()));
    let lora = adapter(&model, "tiny-llama-lora");
    let prompt: Vec<u32> = vec![1, 88, 86, 136, 108, 58, 188];
    let greedy = Sampling {
        temperature: 0.0,
        top_p: 1.0,
        seed: 0,
        max_new_tokens: 12,
    };
    let mut streamed = Vec::new();
    let out = model
        .generate(Some(&lora), &prompt, None, greedy, &mut |t| {
            streamed.push(t);
            Ok(())
        })
        .unwrap();
    assert_eq!(out.len(), 12);
    assert_eq!(out, streamed);
    // The same tokens from full forwards over the growing sequence.
    let mut seq = prompt.clone();
    for &t in &out {
        let logits = model.logits(Some(&lora), &seq, &[0, seq.len()]).unwrap();
        let v = model.config.vocab_size;
        let last = &logits[(seq.len() - 1) * v..];
        let best = last
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
            .0;
        assert_eq!(best as u32, t);
        seq.push(t);
    }
    // Stops at the end token; sampling is reproducible by seed.
    let eos = out[3];
    let first_eos = out.iter().position(|&t| t == eos).unwrap();
    let stopped = model
        .generate(Some(&lora), &prompt, Some(eos), greedy, &mut |_| Ok(()))
        .unwrap();
    assert_eq!(stopped.len(), first_eos + 1);
    let hot = Sampling {
        temperature: 1.5,
        top_p: 0.95,
        seed: 7,
        max_new_tokens: 16,
    };
    let a = model
        .generate(Some(&lora), &prompt, None, hot, &mut |_| Ok(()))
        .unwrap();
    assert_eq!(
        a,
        model
            .generate(Some(&lora), &prompt, None, hot, &mut |_| Ok(()))
            .unwrap()
    );
    let b = model
        .generate(
            Some(&lora),
            &prompt,
            None,
            Sampling { seed: 8, ..hot },
            &mut |_| Ok(()),
        )
        .unwrap();
    assert_ne!(a, b);
}

#[test]
fn cli_generate_streams_text() {
    let o = std::process::Command::new(crate::common::qlora_bin())
        .args([
            "generate",
            "--device",
            "cpu",
            "--chat",
            "Hello there",
            "--max-new-tokens",
            "8",
            "--model",
        ])
        .arg(fixture("tiny-llama"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!stdout.trim().is_empty());
    let o = std::process::Command::new(crate::common::qlora_bin())
        .args(["generate", "--model", "x"])
        .output()
        .unwrap();
    assert!(!o.status.success());
}

#[test]
fn memory_plan_adds_up_and_answers_fits() {
    use qlora_rs::model::{memory, shapes};
    let cfg = shapes::by_name("llama3-8b").unwrap();
    assert!((7.9e9..8.1e9).contains(&(cfg.num_parameters() as f64)));
    let lora = LoraConfig {
        rank: 16,
        alpha: 32.0,
        rslora: false,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
    };
    let p = memory::plan(&cfg, &lora, 2048).unwrap();
    let item = |n: &str| p.items.iter().find(|i| i.name == n).unwrap().bytes;
    // 8B at rank 16 on all projections: 41,943,040 adapter parameters, 18 bytes each (fp32
    // weights, bf16 copy, fp32 gradients, AdamW m and v) and the optimizer's norm scratch.
    assert_eq!(item("adapters"), 18 * 41_943_040 + 8 * 512 + 12);
    assert_eq!(item("step"), 2048 * 8);
    assert_eq!(item("checkpoints"), 32 * 2048 * 4096 * 2);
    // NF4 base ≈ 4.13 bits per projection weight.
    let proj_params = 32u64 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336);
    let base = item("base weights") - 2 * 128_256 * 4096 * 2 - 65 * 4096 * 2;
    assert!((base as f64 * 8.0 / proj_params as f64 - 4.127).abs() < 0.01);
    assert_eq!(p.total(), p.items.iter().map(|i| i.bytes).sum::<u64>());
    assert!(p.table(Some(24 << 30)).contains("fits in 24.0 GiB"));
    assert!(p.table(Some(4 << 30)).contains("does NOT fit"));
    let o = std::process::Command::new(crate::common::qlora_bin())
        .args(["plan", "--model"])
        .arg(fixture("tiny-llama"))
        .args(["--batch-tokens", "512", "--rank", "4", "--targets", "q,v"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && stdout.contains("adapters") && stdout.contains("fits in 24.0 GiB"),
        "{stdout}"
    );
    assert!(shapes::by_name("gpt-5").is_err());
}

#[test]
fn adapters_on_a_subset_of_layers_round_trip() {
    let model = load("tiny-llama", BaseFormat::Dense);
    let cfg = LoraConfig {
        rank: 2,
        alpha: 4.0,
        rslora: false,
        dropout: 0.0,
        targets: vec![Target::Q, Target::Down],
    };
    let lora = LoraParams::init_on_layers(&model.config, cfg.clone(), &[1], 5).unwrap();
    assert_eq!(lora.layers(), vec![1]);
    assert!(lora.slot(0, Target::Q).is_none() && lora.slot(1, Target::Q).is_some());
    let dir = tmpdir("subset");
    adapters::save(&dir, &lora, None).unwrap();
    let text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["layers_to_transform"], serde_json::json!([1]));
    let back = adapters::load(&dir, &model.config).unwrap();
    assert_eq!(back.values, lora.values);
    assert_eq!(back.layers(), vec![1]);
    // All layers: PEFT's default (null).
    let all = LoraParams::init(&model.config, cfg, 5).unwrap();
    let dir = tmpdir("all-layers");
    adapters::save(&dir, &all, None).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    assert!(v["layers_to_transform"].is_null());
    assert!(LoraParams::init_on_layers(&model.config, all.config.clone(), &[7], 0).is_err());
}

/// The CUDA step pads LoRA ranks to a multiple of 8 (`LoraParams::padded_to_rank`). On the CPU
/// reference the padded adapters give the same loss and, on the original entries, the same
/// gradients; the padded entries get exactly zero gradient; repacking back is lossless.
#[test]
fn rank_padding_is_exact_in_loss_and_gradients() {
    let model = load("tiny-llama", BaseFormat::Nf4(Nf4Config::default()));
    let g = Golden::open("tiny-llama");
    let (ids, labels) = (g.ids("input_ids"), g.ints("labels"));
    let cu = [0, ids.len()];
    for rslora in [false, true] {
        let mut lora = adapter(&model, "tiny-llama-lora");
        assert_eq!(lora.config.rank, 4);
        lora.config.rslora = rslora;
        lora.config.dropout = 0.1;
        let padded = lora.padded_to_rank(8).unwrap();
        assert_eq!(padded.config.rank, 8);
        assert!((padded.config.scale() - lora.config.scale()).abs() <= 1e-6 * lora.config.scale());
        assert_eq!(padded.len(), 2 * lora.len());
        assert_eq!(lora.repack_from(&padded, &padded.values), lora.values);
        let run = |p: &qlora_rs::model::lora::LoraParams| {
            let mut grads = vec![0.0f32; p.len()];
            let l = model
                .forward_backward(p, &mut grads, &ids, &labels, &cu, 0.05, 11)
                .unwrap();
            (l.loss_sum, grads)
        };
        let (loss, grads) = run(&lora);
        let (ploss, pgrads) = run(&padded);
        assert!(
            (loss - ploss).abs() <= 1e-5 * loss,
            "rslora {rslora}: loss {loss} vs padded {ploss}"
        );
        assert_rel(
            "gradients of the original entries",
            &lora.repack_from(&padded, &pgrads),
            &grads,
            1e-4,
        );
        // Everything outside the original entries is exactly zero.
        let back = padded.repack_from(&lora, &lora.repack_from(&padded, &pgrads));
        assert_eq!(back, pgrads, "padded entries get zero gradient");
    }
    let lora = adapter(&model, "tiny-llama-lora");
    let err = lora.padded_to_rank(2).unwrap_err().to_string();
    assert!(err.contains("cannot pad LoRA rank 4 down to 2"), "{err}");
}

/// Gemma 2 with every quirk on: `(1 + w)` norms, four per layer, the √d-scaled tied embedding,
/// GeGLU, attention soft-capping at 3 and final soft-capping at 4, the attention scale from
/// query_pre_attn_scalar 20, a sliding window of 7 on layers 0 and 2 (shorter than both test
/// sequences), head_dim 24 where hidden / heads is 16.
#[test]
fn gemma2_with_every_quirk_matches_transformers_peft() {
    golden_case("tiny-gemma2");
}

/// Gemma 3: Gemma 2's layer with per-head q/k norms and no soft-capping; the sliding layers
/// rotate with their own base (1e4), the global ones with 1e6 and linear scaling 4.
#[test]
fn gemma3_with_local_rope_and_head_norms_matches_transformers_peft() {
    golden_case("tiny-gemma3");
}

/// Gemma 3's multimodal checkpoint (Gemma3ForConditionalGeneration, stored as the hub's are)
/// with tiny-gemma3 as its language model, and PEFT's adapter on it (tiny-gemma3-lora's
/// weights under `model.language_model.layers`, targets a regex that spares the vision
/// tower): tiny-gemma3's goldens — the fixture script checked that transformers and PEFT give
/// the same logits for both.
#[test]
fn gemma3_multimodal_checkpoint_matches_transformers_peft() {
    golden_case_of("tiny-gemma3-mm", "tiny-gemma3");
}

/// Phi-3 (Phi-3.5 / Phi-4-mini's layer): q/k/v and gate/up stored fused and adapted whole,
/// RoPE on 18 of 24 dims, longrope (case A, 37 tokens, beyond the original context of 32: the
/// long factors; the packed case, 23 + 14: the short ones; both with the attention factor), a
/// sliding window of 11 shorter than every sequence.
#[test]
fn phi3_with_fused_projections_and_longrope_matches_transformers_peft() {
    golden_case("tiny-phi3");
    let g = Golden::open("tiny-phi3");
    let model = load("tiny-phi3", BaseFormat::Dense);
    let c = &model.config;
    let lr = c.switches.longrope.as_ref().unwrap();
    // After case A transformers holds the long table.
    let long =
        qlora_rs::ops::rope::inv_freq_with_factors(c.rotary_dim(), c.rope_theta, &lr.long_factor)
            .unwrap();
    assert_rel("longrope inv_freq", &long, &g.f32("debug.inv_freq"), 1e-6);
}

/// Longrope picks its table per sequence: a packed batch of a sequence past the original
/// context (37 tokens: long factors) and one within it (14: short) gives each the logits it
/// has alone, and the short one's differ from those of the long table (so the test can tell).
#[test]
fn phi3_packed_sequences_each_use_their_own_longrope_table() {
    let model = load("tiny-phi3", BaseFormat::Dense);
    let lora = adapter(&model, "tiny-phi3-lora");
    let v = model.config.vocab_size;
    let long: Vec<u32> = (0..37u32).map(|i| (i * 29 + 3) % 211).collect();
    let short: Vec<u32> = (0..14u32).map(|i| (i * 17 + 5) % 211).collect();
    let alone_long = model.logits(Some(&lora), &long, &[0, 37]).unwrap();
    let alone_short = model.logits(Some(&lora), &short, &[0, 14]).unwrap();
    let ids: Vec<u32> = long.iter().chain(&short).copied().collect();
    let packed = model.logits(Some(&lora), &ids, &[0, 37, 51]).unwrap();
    assert_rel("long, packed", &packed[..37 * v], &alone_long, 1e-5);
    assert_rel("short, packed", &packed[37 * v..], &alone_short, 1e-5);
    // The short sequence with the long table: what a batch-wide choice would give.
    let padded: Vec<u32> = short
        .iter()
        .copied()
        .chain(long[14..].iter().copied())
        .collect();
    let with_long = model.logits(Some(&lora), &padded, &[0, 37]).unwrap();
    let d = with_long[..14 * v]
        .iter()
        .zip(&alone_short)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        d > 1e-2,
        "the long table changes the short sequence by only {d}"
    );
}

/// Gemma's generation with a KV cache (sliding layers windowed over the cache, soft-capped
/// logits) picks the tokens full forwards over the growing sequence pick, past the window of 7.
#[test]
fn gemma_generation_with_a_kv_cache_equals_recomputing_everything() {
    use qlora_rs::model::generate::Sampling;
    // Phi-3 too (its window of 11, its partial rotary; 9 + 14 tokens stay within longrope's
    // original context, where a cache and a recomputation use the same table).
    for name in ["tiny-gemma2", "tiny-gemma3", "tiny-phi3"] {
        let model = load(name, BaseFormat::Dense);
        let lora = adapter(&model, &format!("{name}-lora"));
        let prompt: Vec<u32> = vec![1, 88, 86, 136, 108, 58, 188, 17, 40];
        let greedy = Sampling {
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            max_new_tokens: 14,
        };
        let out = model
            .generate(Some(&lora), &prompt, None, greedy, &mut |_| Ok(()))
            .unwrap();
        assert_eq!(out.len(), 14);
        let mut seq = prompt.clone();
        let v = model.config.vocab_size;
        for &t in &out {
            let logits = model.logits(Some(&lora), &seq, &[0, seq.len()]).unwrap();
            let last = &logits[(seq.len() - 1) * v..];
            let best = last
                .iter()
                .enumerate()
                .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
                .0;
            assert_eq!(best as u32, t, "{name} after {} tokens", seq.len());
            seq.push(t);
        }
    }
}
