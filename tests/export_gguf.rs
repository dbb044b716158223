//! `export-gguf`: llama.cpp's names, metadata and per-tensor types, the adapter merged as
//! `merge` merges it, the round trip through `import-gguf`, and the refusals. (llama.cpp itself
//! loads and re-quantizes the exports in scripts/check-gguf-export.sh; the encodings are checked
//! byte for byte against llama.cpp in the quantizer's own tests.)

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use qlora_rs::io::safetensors::Checkpoint;
use qlora_rs::io::{adapters, export};
use qlora_rs::model::config::LlamaConfig;
use qlora_rs::model::export_gguf::{export_gguf, ExportGguf, GgufType};
use qlora_rs::model::import_gguf::import_gguf;
use qlora_rs::model::lora::{LoraConfig, LoraParams, Target};
use qlora_rs::quant::gguf::{GgmlType, GgufFile, Value};

use crate::common::{llama_fixture as fixture, qlora};

fn tmpdir(name: &str) -> PathBuf {
    crate::common::fresh_dir("gguf-export", name)
}

fn opts(model: &Path, adapter: Option<&Path>, output: &Path, ty: GgufType) -> ExportGguf {
    ExportGguf {
        model: model.to_path_buf(),
        adapter: adapter.map(Path::to_path_buf),
        output: output.to_path_buf(),
        ty,
        overwrite: false,
        onto_original: false,
        allow_other_base: false,
    }
}

fn export(o: &ExportGguf) -> qlora_rs::Result<qlora_rs::model::export_gguf::GgufReport> {
    export_gguf(o, |_, _, _| {})
}

/// A deterministic pseudo-random f32 in [-1, 1).
fn noise(seed: u64, i: usize) -> f32 {
    let mut x = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(i as u64);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// A 4-layer Llama whose matrices have rows of 256 and 512 values (whole k-quant blocks),
/// untied, with tiny-llama's tokenizer; and a rank-4 adapter on every projection.
fn k_quant_model(dir: &Path) -> (PathBuf, PathBuf) {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "vocab_size": 211, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 512, "tie_word_embeddings": false,
        "hidden_act": "silu", "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
    });
    std::fs::write(model.join("config.json"), config.to_string()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture("tiny-llama").join(f), model.join(f)).unwrap();
    }
    let mut tensors: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![211, 256]),
        ("model.norm.weight".into(), vec![256]),
        ("lm_head.weight".into(), vec![211, 256]),
    ];
    for l in 0..4 {
        let p = format!("model.layers.{l}");
        for (n, s) in [
            ("input_layernorm.weight", vec![256]),
            ("post_attention_layernorm.weight", vec![256]),
            ("self_attn.q_proj.weight", vec![256, 256]),
            ("self_attn.k_proj.weight", vec![128, 256]),
            ("self_attn.v_proj.weight", vec![128, 256]),
            ("self_attn.o_proj.weight", vec![256, 256]),
            ("mlp.gate_proj.weight", vec![512, 256]),
            ("mlp.up_proj.weight", vec![512, 256]),
            ("mlp.down_proj.weight", vec![256, 512]),
        ] {
            tensors.push((format!("{p}.{n}"), s));
        }
    }
    let data: Vec<(String, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .enumerate()
        .map(|(k, (n, s))| {
            let len: usize = s.iter().product();
            let norm = s.len() == 1;
            let values = (0..len)
                .map(|i| {
                    if norm {
                        1.0 + 0.1 * noise(k as u64, i)
                    } else {
                        // Heavier tails every 97th value, as real weights have.
                        let x = 0.05 * noise(k as u64, i);
                        if i % 97 == 0 {
                            x * 8.0
                        } else {
                            x
                        }
                    }
                })
                .collect();
            (n.clone(), s.clone(), values)
        })
        .collect();
    crate::common::write_f32_safetensors(&model.join("model.safetensors"), &data);

    let cfg = LlamaConfig::from_file(&model.join("config.json")).unwrap();
    let lora_cfg = LoraConfig {
        rank: 4,
        alpha: 8.0,
        rslora: false,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
    };
    let mut params = LoraParams::init(&cfg, lora_cfg, 7).unwrap();
    // PEFT starts B at zero; give it values so that the merge shows.
    for s in params.slots.clone() {
        for (j, v) in params.values[s.b.clone()].iter_mut().enumerate() {
            *v = 0.01 * noise(99, j + s.b.start);
        }
    }
    let adapter = dir.join("adapter");
    adapters::save(&adapter, &params, Some(model.to_str().unwrap())).unwrap();
    (model, adapter)
}

/// What llama-quantize picks for the 4-layer model: `use_more_bits(i, 4)` is layers 2 and 3.
fn expected_type(ty: GgufType, name: &str, dims: usize) -> GgmlType {
    if dims == 1 {
        return GgmlType::F32;
    }
    let more = name.starts_with("blk.2.") || name.starts_with("blk.3.");
    let sensitive = name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight");
    match ty {
        GgufType::F32 => GgmlType::F32,
        GgufType::F16 => GgmlType::F16,
        GgufType::Bf16 => GgmlType::BF16,
        GgufType::Q8_0 => GgmlType::Q8_0,
        GgufType::Q6K => GgmlType::Q6_K,
        GgufType::Q4_0 if name == "output.weight" => GgmlType::Q6_K,
        GgufType::Q4_0 => GgmlType::Q4_0,
        GgufType::Q4KM | GgufType::Q5KM if name == "output.weight" => GgmlType::Q6_K,
        GgufType::Q4KM | GgufType::Q5KM if sensitive && more => GgmlType::Q6_K,
        GgufType::Q4KM => GgmlType::Q4_K,
        GgufType::Q5KM => GgmlType::Q5_K,
    }
}

#[test]
fn gguf_export_picks_llama_quantizes_types_and_merges_the_adapter() {
    let dir = tmpdir("types");
    let (model, adapter) = k_quant_model(&dir);
    // The reference values: merge's output (bf16), read back in f32.
    let merged = dir.join("merged");
    export::merge(&model, &adapter, &merged, false).unwrap();
    let reference = Checkpoint::open_dir(&merged).unwrap();
    for ty in GgufType::ALL {
        let out = dir.join(format!("m-{ty}.gguf"));
        let report = export(&opts(&model, Some(&adapter), &out, ty)).unwrap();
        assert_eq!(report.merged, 28, "{ty}");
        assert!(report.fallbacks.is_empty(), "{ty}: {:?}", report.fallbacks);
        let g = GgufFile::open(&out).unwrap();
        assert_eq!(
            g.get("general.architecture").and_then(Value::as_str),
            Some("llama")
        );
        assert_eq!(g.get("llama.block_count").and_then(Value::as_u64), Some(4));
        assert_eq!(
            g.get("llama.rope.dimension_count").and_then(Value::as_u64),
            Some(64)
        );
        assert_eq!(g.tensors.len(), 3 + 4 * 9, "{ty}");
        for t in &g.tensors {
            assert_eq!(
                t.ggml_type,
                expected_type(ty, &t.name, t.dims.len()),
                "{ty}: {}",
                t.name
            );
        }
        // Every tensor against merge's values: exact for f32 and bf16, within the type's
        // error otherwise (relative RMS error of the whole tensor).
        let bound = match ty {
            GgufType::F32 | GgufType::Bf16 => 0.0,
            GgufType::F16 => 1e-3,
            GgufType::Q8_0 => 0.01,
            GgufType::Q6K => 0.03,
            GgufType::Q5KM => 0.06,
            GgufType::Q4KM => 0.12,
            // One scale per 32 values and no offset: the outliers every 97th value cost most.
            GgufType::Q4_0 => 0.2,
        };
        let hf = |n: &str| -> String {
            let m: HashMap<&str, &str> = [
                ("token_embd.weight", "model.embed_tokens.weight"),
                ("output.weight", "lm_head.weight"),
                ("output_norm.weight", "model.norm.weight"),
            ]
            .into();
            if let Some(h) = m.get(n) {
                return h.to_string();
            }
            let rest = n.strip_prefix("blk.").unwrap();
            let (l, part) = rest.split_once('.').unwrap();
            let p = match part {
                "attn_norm.weight" => "input_layernorm.weight",
                "ffn_norm.weight" => "post_attention_layernorm.weight",
                "attn_q.weight" => "self_attn.q_proj.weight",
                "attn_k.weight" => "self_attn.k_proj.weight",
                "attn_v.weight" => "self_attn.v_proj.weight",
                "attn_output.weight" => "self_attn.o_proj.weight",
                "ffn_gate.weight" => "mlp.gate_proj.weight",
                "ffn_up.weight" => "mlp.up_proj.weight",
                "ffn_down.weight" => "mlp.down_proj.weight",
                other => panic!("{other}"),
            };
            format!("model.layers.{l}.{p}")
        };
        for t in &g.tensors {
            let got = g.dequantize(&t.name).unwrap();
            let shape = t.shape();
            let mut want = reference.f32(&hf(&t.name), &shape).unwrap();
            // q and k are stored in llama.cpp's pairwise rotary order.
            let heads = if t.name.ends_with("attn_q.weight") {
                Some(4)
            } else if t.name.ends_with("attn_k.weight") {
                Some(2)
            } else {
                None
            };
            if let Some(h) = heads {
                let (rows, cols) = (shape[0], shape[1]);
                let hd = rows / h;
                let mut p = vec![0.0; want.len()];
                for r in 0..rows {
                    let (head, j) = (r / hd, r % hd);
                    let src = head * hd + (j % 2) * (hd / 2) + j / 2;
                    p[r * cols..(r + 1) * cols]
                        .copy_from_slice(&want[src * cols..(src + 1) * cols]);
                }
                want = p;
            }
            let err: f64 = got
                .iter()
                .zip(&want)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let norm: f64 = want.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt();
            assert!(
                err <= bound * norm,
                "{ty}: {}: relative RMS error {:.2e} > {bound}",
                t.name,
                err / norm
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gguf_export_round_trips_through_import_gguf() {
    let dir = tmpdir("roundtrip");
    // tiny-llama without its test-only rope scaling (import-gguf reads Llama 3's own values).
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in std::fs::read_dir(fixture("tiny-llama")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), model.join(f.file_name())).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    cfg["rope_parameters"] = serde_json::json!({"rope_theta": 10000.0, "rope_type": "default"});
    std::fs::write(model.join("config.json"), cfg.to_string()).unwrap();
    let adapter = fixture("tiny-llama-lora");
    let merged = dir.join("merged");
    export::merge(&model, &adapter, &merged, false).unwrap();
    let want = Checkpoint::open_dir(&merged).unwrap();
    for (ty, exact) in [(GgufType::Bf16, true), (GgufType::F16, false)] {
        let out = dir.join(format!("m-{ty}.gguf"));
        let mut o = opts(&model, Some(&adapter), &out, ty);
        o.allow_other_base = true;
        export(&o).unwrap();
        let back = dir.join(format!("back-{ty}"));
        import_gguf(&out, &back).unwrap();
        let got = Checkpoint::open_dir(&back).unwrap();
        let mut names: Vec<&str> = want.names();
        names.sort();
        let mut got_names = got.names();
        got_names.sort();
        assert_eq!(got_names, names, "{ty}");
        let mut subnormal = 0;
        for n in names {
            let (a, b) = (got.get(n).unwrap(), want.get(n).unwrap());
            assert_eq!(a.shape, b.shape, "{n}");
            let (a, b) = (a.to_f32().unwrap(), b.to_f32().unwrap());
            for (x, y) in a.iter().zip(&b) {
                // f16 holds every bf16 value of its normal range exactly; below 2^-14 its
                // subnormals keep fewer bits.
                if exact || y.abs() >= 2f32.powi(-14) || *y == 0.0 {
                    assert_eq!(x.to_bits(), y.to_bits(), "{ty}: {n}: {x} vs {y}");
                } else {
                    subnormal += 1;
                }
            }
        }
        println!("{ty}: every weight back exactly ({subnormal} below f16's normal range)");
        // The tokenizer and chat template come back.
        let theirs = qlora_rs::data::tokenizer::TextTokenizer::load(&model).unwrap();
        let ours = qlora_rs::data::tokenizer::TextTokenizer::load(&back).unwrap();
        for text in [
            "Hello, world! 12345",
            "<|im_start|>user\nhi<|im_end|>\n",
            "cafe 2024, ok?",
        ] {
            assert_eq!(
                ours.encode(text, false).unwrap().0,
                theirs.encode(text, false).unwrap().0,
                "{text:?}"
            );
        }
        let template = |d: &Path| -> serde_json::Value {
            serde_json::from_str::<serde_json::Value>(
                &std::fs::read_to_string(d.join("tokenizer_config.json")).unwrap(),
            )
            .unwrap()["chat_template"]
                .clone()
        };
        assert_eq!(template(&back), template(&model));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gguf_export_writes_qwen_architectures_and_llama3_rope_factors() {
    let dir = tmpdir("qwen");
    // Qwen2: biases kept in f32, no q/k reordering (llama.cpp rotates halves for qwen2).
    let out = dir.join("q2.gguf");
    let r = export(&opts(&fixture("tiny-qwen2"), None, &out, GgufType::F32)).unwrap();
    assert_eq!(r.arch, "qwen2");
    let g = GgufFile::open(&out).unwrap();
    assert!(g.get("qwen2.embedding_length").is_some());
    let ck = Checkpoint::open_dir(&fixture("tiny-qwen2")).unwrap();
    let q = ck
        .f32("model.layers.0.self_attn.q_proj.weight", &[96, 96])
        .unwrap();
    let bf = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .map(|x| half::bf16::from_f32(*x).to_f32())
            .collect()
    };
    assert_eq!(g.dequantize("blk.0.attn_q.weight").unwrap(), bf(&q));
    let qb = ck
        .f32("model.layers.0.self_attn.q_proj.bias", &[96])
        .unwrap();
    assert_eq!(g.dequantize("blk.0.attn_q.bias").unwrap(), bf(&qb));
    assert_eq!(
        g.tensor("blk.0.attn_q.bias").unwrap().ggml_type,
        GgmlType::F32
    );
    // Qwen3: llama.cpp's qwen3 has no attention-output bias, so tiny-qwen3 (attention_bias:
    // true) is refused; without its biases it exports, with per-head q/k norms and an explicit
    // head width.
    let out = dir.join("q3.gguf");
    let e = export(&opts(&fixture("tiny-qwen3"), None, &out, GgufType::F16))
        .unwrap_err()
        .to_string();
    assert!(e.contains("o_proj.bias") && e.contains("qwen3"), "{e}");
    // The biases left in a checkpoint whose config denies them are refused by name (llama.cpp
    // would not read them).
    let q3 = crate::common::tiny_qwen3_without_biases(&dir);
    let denied = dir.join("denied");
    std::fs::create_dir_all(&denied).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(q3.join(f), denied.join(f)).unwrap();
    }
    std::fs::copy(
        fixture("tiny-qwen3").join("model.safetensors"),
        denied.join("model.safetensors"),
    )
    .unwrap();
    let e = export(&opts(&denied, None, &out, GgufType::F16))
        .unwrap_err()
        .to_string();
    assert!(e.contains(".bias") && e.contains("no bias"), "{e}");
    let r = export(&opts(&q3, None, &out, GgufType::F16)).unwrap();
    assert_eq!(r.arch, "qwen3");
    let g = GgufFile::open(&out).unwrap();
    assert_eq!(
        g.get("qwen3.attention.key_length").and_then(Value::as_u64),
        Some(24)
    );
    assert_eq!(
        g.tensor("blk.1.attn_k_norm.weight").unwrap().shape(),
        vec![24]
    );
    // Llama 3 scaling: rope_freqs.weight holds each frequency's divisor (1 at the high
    // frequencies, the factor at the low ones); tied embeddings: no output.weight.
    let out = dir.join("l3.gguf");
    export(&opts(&fixture("tiny-llama"), None, &out, GgufType::F16)).unwrap();
    let g = GgufFile::open(&out).unwrap();
    let f = g.dequantize("rope_freqs.weight").unwrap();
    assert_eq!(f.len(), 8);
    assert!(
        (f[0] - 1.0).abs() < 1e-6 && (f[7] - 8.0).abs() < 1e-4,
        "{f:?}"
    );
    assert!(g.tensor("output.weight").is_none());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gguf_export_refuses_bad_input_before_any_work() {
    let dir = tmpdir("refusals");
    let model = fixture("tiny-llama");
    let out = dir.join("m.gguf");
    // Rows of 172 values cannot be Q8_0 blocks of 32 (llama.cpp has no fallback either).
    let e = export(&opts(&model, None, &out, GgufType::Q8_0))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ffn_down") && e.contains("172") && e.contains("32"),
        "{e}"
    );
    // The k-quant mixes fall back as llama-quantize does: here all the way to F16.
    let r = export(&opts(&model, None, &out, GgufType::Q4KM)).unwrap();
    assert!(
        r.fallbacks
            .iter()
            .any(|f| f.contains("ffn_down") && f.contains("F16")),
        "{:?}",
        r.fallbacks
    );
    // An existing output is kept unless --overwrite.
    let before = std::fs::metadata(&out).unwrap().len();
    let e = export(&opts(&model, None, &out, GgufType::F16))
        .unwrap_err()
        .to_string();
    assert!(e.contains("exists") && e.contains("--overwrite"), "{e}");
    assert_eq!(std::fs::metadata(&out).unwrap().len(), before);
    let mut o = opts(&model, None, &out, GgufType::F16);
    o.overwrite = true;
    export(&o).unwrap();
    // An adapter of other shapes.
    let e = export(&opts(
        &model,
        Some(&fixture("tiny-qwen3-lora")),
        &dir.join("x.gguf"),
        GgufType::F16,
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("adapter_model.safetensors") || e.contains("shape"),
        "{e}"
    );
    // An adapter that names another base.
    let other = dir.join("other-adapter");
    std::fs::create_dir_all(&other).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixture("tiny-llama-lora").join(f), other.join(f)).unwrap();
    }
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(other.join("adapter_config.json")).unwrap())
            .unwrap();
    c["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B".into();
    std::fs::write(other.join("adapter_config.json"), c.to_string()).unwrap();
    let e = export(&opts(
        &model,
        Some(&other),
        &dir.join("y.gguf"),
        GgufType::F16,
    ))
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("Llama-3.2-1B") && e.contains("--allow-other-base"),
        "{e}"
    );
    // A folder that does not exist.
    let e = export(&opts(
        &model,
        None,
        &dir.join("no/such/m.gguf"),
        GgufType::F16,
    ))
    .unwrap_err()
    .to_string();
    assert!(e.contains("no/such"), "{e}");
    // The CLI: an unknown type is refused by name; nothing was left behind anywhere.
    let o = qlora(&[
        "export-gguf",
        "--model",
        model.to_str().unwrap(),
        "--output",
        dir.join("z.gguf").to_str().unwrap(),
        "--type",
        "q3_k_m",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("q3_k_m") && err.contains("q4_k_m"),
        "{err}"
    );
    let mut left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, vec!["m.gguf", "other-adapter"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The demo model: imported from llama.cpp's own GGUF, exported again, its tokenizer metadata
/// (tokens, types, merges, special ids, pre-tokenizer, chat template) equals the original's.
/// Runs when QLORA_DEMO_ASSETS is set.
#[test]
fn gguf_export_of_smollm2_carries_llama_cpps_tokenizer_metadata() {
    let Some(assets) = std::env::var_os("QLORA_DEMO_ASSETS").map(PathBuf::from) else {
        println!("SKIPPED (set QLORA_DEMO_ASSETS)");
        return;
    };
    let original = assets.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let dir = tmpdir("smollm2");
    let model = dir.join("model");
    import_gguf(&original, &model).unwrap();
    let out = dir.join("m.gguf");
    export(&opts(&model, None, &out, GgufType::Bf16)).unwrap();
    let (a, b) = (
        GgufFile::open(&original).unwrap(),
        GgufFile::open(&out).unwrap(),
    );
    let mut compared = 0;
    for (k, v) in &a.metadata {
        if k.starts_with("tokenizer.") || k.starts_with("llama.") {
            if k == "tokenizer.ggml.add_space_prefix" {
                continue;
            }
            assert_eq!(b.get(k), Some(v), "{k}");
            compared += 1;
        }
    }
    assert!(compared >= 20, "{compared}");
    let names = |g: &GgufFile| {
        let mut n: Vec<(String, Vec<usize>)> = g
            .tensors
            .iter()
            .map(|t| (t.name.clone(), t.shape()))
            .collect();
        n.sort();
        n
    };
    assert_eq!(names(&a), names(&b));
    std::fs::remove_dir_all(&dir).unwrap();
}
