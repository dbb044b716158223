//! GGUF for llama.cpp's `gemma2` and `gemma3` architectures, both ways: `export-gguf` of the
//! tiny Gemma 2 / Gemma 3 fixtures (with and without their adapters) writes the metadata keys
//! and tensor names llama.cpp's converter writes (`conversion/gemma.py`: `Gemma2Model`,
//! `Gemma3Model` over `TextModel.set_gguf_parameters`; names from gguf-py's
//! `tensor_mapping.py`), with `1 + w` in every norm; `import-gguf` reads them back into the
//! same weights and an equal config; what llama.cpp's `gemma2`/`gemma3` would run differently
//! (`llama_model_gemma2/3::load_arch_hparams`) is refused by name. A bf16 export equals what
//! llama.cpp's own convert_hf_to_gguf.py writes from the same weights — every `<arch>.*` key
//! and every tensor's bytes (tests/fixtures/gguf/gemma-converter.json, made by
//! tests/fixtures/make_gemma_gguf_reference.py) — but for the sliding pattern that tiny-gemma3
//! needs and the converter leaves out.
//!
//! The fixtures set `query_pre_attn_scalar` 20 against a head width of 24 (to test our
//! decoder), which llama.cpp cannot represent (it hard-codes `1/√head_dim`): those are
//! refused, and the round trips use a copy with `query_pre_attn_scalar` 24.

use std::path::{Path, PathBuf};

use crate::common::llama_fixture as fixture;
use crate::gguf_common::{
    assert_same_weights, bf16_copy, config, export, fnv1a64, opts, same_value,
};
use half::bf16;
use qlora_rs::io::export;
use qlora_rs::io::safetensors::Checkpoint;
use qlora_rs::model::export_gguf::GgufType;
use qlora_rs::model::import_gguf::import_gguf;
use qlora_rs::quant::gguf::{GgmlType, GgufFile, Value};
use serde_json::{json, Value as Json};

fn tmpdir(name: &str) -> PathBuf {
    crate::common::fresh_dir("gguf-gemma", name)
}

fn json_file(p: &Path) -> Json {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// A copy of the fixture `tiny-<family>` with `edit` applied to its config.json.
fn variant(dir: &Path, family: &str, tag: &str, edit: impl FnOnce(&mut Json)) -> PathBuf {
    let src = fixture(&format!("tiny-{family}"));
    let out = dir.join(format!("{family}-{tag}"));
    std::fs::create_dir_all(&out).unwrap();
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), out.join(f.file_name())).unwrap();
    }
    let mut c = json_file(&out.join("config.json"));
    edit(&mut c);
    std::fs::write(out.join("config.json"), c.to_string()).unwrap();
    out
}

/// The fixture with the attention scale llama.cpp uses (`query_pre_attn_scalar` = head_dim).
fn llama_cpp_ready(dir: &Path, family: &str) -> PathBuf {
    variant(dir, family, "scalar24", |c| {
        c["query_pre_attn_scalar"] = json!(24)
    })
}

/// The `<arch>.*` keys of the file with their values, sorted.
fn arch_keys(g: &GgufFile, arch: &str) -> Vec<(String, Value)> {
    let mut keys: Vec<(String, Value)> = g
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{arch}.")))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    keys
}

/// What llama.cpp's converter writes for the fixtures (query_pre_attn_scalar aside, which it
/// does not write): `Gemma2Model.set_gguf_parameters` writes context_length,
/// embedding_length, block_count, feed_forward_length, head_count(_kv),
/// layer_norm_rms_epsilon, key/value_length, the two soft-caps and sliding_window, and no
/// RoPE key (llama.cpp's default base, 10000, is Gemma 2's). `Gemma3Model` adds to
/// `TextModel.set_gguf_parameters` the global `rope.freq_base`, `rope.freq_base_swa` (the
/// sliding layers'), `rope.scaling.type`/`factor` of the full-attention layers, the final
/// soft-cap when set and sliding_window; no attention soft-cap. Beyond the converter:
/// tiny-gemma3 slides every other layer, which llama.cpp's default for gemma3 (five of six)
/// is not, so the per-layer `attention.sliding_window_pattern` (the bool array other
/// converters write, read by `load_swa_pattern`) is written.
fn expected_keys(arch: &str) -> Vec<(String, Value)> {
    let u = Value::U32;
    let mut keys = vec![
        ("context_length", u(128)),
        ("embedding_length", u(96)),
        ("feed_forward_length", u(172)),
        ("attention.head_count", u(6)),
        ("attention.head_count_kv", u(2)),
        ("attention.layer_norm_rms_epsilon", Value::F32(1e-6)),
        ("attention.key_length", u(24)),
        ("attention.value_length", u(24)),
        ("attention.sliding_window", u(7)),
    ];
    if arch == "gemma2" {
        keys.extend([
            ("block_count", u(3)),
            ("attn_logit_softcapping", Value::F32(3.0)),
            ("final_logit_softcapping", Value::F32(4.0)),
        ]);
    } else {
        keys.extend([
            ("block_count", u(4)),
            ("rope.freq_base", Value::F32(1e6)),
            ("rope.freq_base_swa", Value::F32(1e4)),
            ("rope.scaling.type", Value::String("linear".into())),
            ("rope.scaling.factor", Value::F32(4.0)),
            (
                "attention.sliding_window_pattern",
                Value::Array([true, false, true, false].map(Value::Bool).to_vec()),
            ),
        ]);
    }
    let mut keys: Vec<(String, Value)> = keys
        .into_iter()
        .map(|(k, v)| (format!("{arch}.{k}"), v))
        .collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    keys
}

/// llama.cpp's tensor names for layer 0 (gguf-py's `MODEL_TENSORS[GEMMA2/GEMMA3]` through
/// `tensor_mapping.py`), and the global ones; tied embeddings: no `output.weight`.
fn expected_tensors(arch: &str, layers: usize) -> Vec<String> {
    let mut names = vec!["token_embd.weight".to_string(), "output_norm.weight".into()];
    for l in 0..layers {
        let mut parts = vec![
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "post_attention_norm",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
            "post_ffw_norm",
        ];
        if arch == "gemma3" {
            parts.extend(["attn_q_norm", "attn_k_norm"]);
        }
        names.extend(parts.iter().map(|p| format!("blk.{l}.{p}.weight")));
    }
    names.sort();
    names
}

#[test]
fn gguf_gemma_export_writes_llama_cpps_keys_and_names_and_round_trips() {
    let dir = tmpdir("roundtrip");
    for (family, arch, layers) in [("gemma2", "gemma2", 3), ("gemma3", "gemma3", 4)] {
        let model = llama_cpp_ready(&dir, family);
        let lora = fixture(&format!("tiny-{family}-lora"));
        for adapter in [None, Some(lora.as_path())] {
            let case = format!("{family}{}", if adapter.is_some() { "+lora" } else { "" });
            let gguf = dir.join(format!("{case}.gguf"));
            let r = export(&opts(&model, adapter, &gguf, GgufType::F32)).unwrap();
            assert_eq!(r.arch, arch);
            assert!(r.warnings.is_empty(), "{case}: {:?}", r.warnings);
            assert_eq!(r.merged > 0, adapter.is_some(), "{case}");

            let g = GgufFile::open(&gguf).unwrap();
            assert_eq!(
                g.get("general.architecture").and_then(Value::as_str),
                Some(arch)
            );
            assert_eq!(g.get("general.file_type"), Some(&Value::U32(0)));
            assert_eq!(arch_keys(&g, arch), expected_keys(arch), "{case}");
            let mut names: Vec<String> = g.tensors.iter().map(|t| t.name.clone()).collect();
            names.sort();
            assert_eq!(names, expected_tensors(arch, layers), "{case}");
            for t in &g.tensors {
                assert_eq!(t.ggml_type, GgmlType::F32, "{}", t.name);
            }
            // Every norm is stored as 1 + w (the converter's `data_torch + 1`).
            let src = Checkpoint::open_dir(&model).unwrap();
            for (hf, gg) in [
                ("model.norm.weight", "output_norm.weight".to_string()),
                (
                    "model.layers.1.pre_feedforward_layernorm.weight",
                    "blk.1.ffn_norm.weight".into(),
                ),
                (
                    "model.layers.0.post_attention_layernorm.weight",
                    "blk.0.post_attention_norm.weight".into(),
                ),
            ] {
                let w = src.get(hf).unwrap().to_f32().unwrap();
                let stored = g.dequantize(&gg).unwrap();
                for (a, b) in w.iter().zip(&stored) {
                    assert_eq!(bf16::from_f32(*a).to_f32() + 1.0, *b, "{case}: {gg}");
                }
            }
            if family == "gemma3" {
                let w = src
                    .get("model.layers.2.self_attn.q_norm.weight")
                    .unwrap()
                    .to_f32()
                    .unwrap();
                let stored = g.dequantize("blk.2.attn_q_norm.weight").unwrap();
                assert_eq!(bf16::from_f32(w[5]).to_f32() + 1.0, stored[5]);
            }

            // Back: the same weights (what merge writes), an equal config.
            let reference = dir.join(format!("ref-{case}"));
            match adapter {
                Some(a) => {
                    export::merge(&model, a, &reference, false).unwrap();
                }
                None => bf16_copy(&model, &reference),
            }
            let back = dir.join(format!("back-{case}"));
            let report = import_gguf(&gguf, &back).unwrap();
            assert_eq!(report.architecture, arch);
            assert_same_weights(&back, &reference, &case);
            assert_eq!(config(&back), config(&model), "{case}");
            let c = json_file(&back.join("config.json"));
            let class = if family == "gemma2" {
                "Gemma2ForCausalLM"
            } else {
                "Gemma3ForCausalLM"
            };
            assert_eq!(c["architectures"], json!([class]));
            let model_type = if family == "gemma2" {
                "gemma2"
            } else {
                "gemma3_text"
            };
            assert_eq!(c["model_type"], model_type);
            assert_eq!(c["query_pre_attn_scalar"], 24);
            assert_eq!(c["hidden_activation"], "gelu_pytorch_tanh");
            let original = json_file(&model.join("config.json"));
            assert_eq!(c["layer_types"], original["layer_types"], "{case}");
            assert_eq!(c["sliding_window"], 7);
            assert_eq!(
                c["attn_logit_softcapping"],
                original["attn_logit_softcapping"]
            );
            assert_eq!(
                c["final_logit_softcapping"],
                original["final_logit_softcapping"]
            );
            // The tokenizer comes back (tiny-llama's byte-level BPE in both fixtures).
            let theirs = qlora_rs::data::tokenizer::TextTokenizer::load(&model).unwrap();
            let ours = qlora_rs::data::tokenizer::TextTokenizer::load(&back).unwrap();
            for text in ["Hello, world! 12345", "<|im_start|>user\nhi<|im_end|>\n"] {
                assert_eq!(
                    ours.encode(text, false).unwrap().0,
                    theirs.encode(text, false).unwrap().0,
                    "{text:?}"
                );
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gguf_gemma_export_writes_every_type_llama_cpp_loads() {
    let dir = tmpdir("types");
    for family in ["gemma2", "gemma3"] {
        let model = llama_cpp_ready(&dir, family);
        for ty in GgufType::ALL {
            let out = dir.join(format!("{family}-{ty}.gguf"));
            let r = export(&opts(&model, None, &out, ty));
            if matches!(ty, GgufType::Q8_0 | GgufType::Q4_0) {
                // Rows of 172 values (ffn_down) are not blocks of 32, as for tiny-llama.
                let e = r.unwrap_err().to_string();
                assert!(e.contains("ffn_down") && e.contains("172"), "{e}");
                continue;
            }
            let r = r.unwrap();
            let g = GgufFile::open(&out).unwrap();
            for t in &g.tensors {
                if t.name.ends_with("norm.weight") {
                    assert_eq!(t.ggml_type, GgmlType::F32, "{ty}: {}", t.name);
                }
            }
            // The tied embedding is the output matrix: Q6_K for the k-quant mixes (96-wide
            // rows are not 256-blocks, so Q8_0, as llama-quantize falls back).
            if matches!(ty, GgufType::Q4KM | GgufType::Q5KM | GgufType::Q6K) {
                let t = g.tensor("token_embd.weight").unwrap();
                assert_eq!(t.ggml_type, GgmlType::Q8_0, "{ty}");
            }
            let back = dir.join(format!("back-{family}-{ty}"));
            import_gguf(&out, &back).unwrap();
            assert_eq!(config(&back), config(&model), "{family} {ty}");
            println!("{family} {ty}: {:?}", r.tensors_by_type);
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gguf_gemma_export_refuses_what_llama_cpp_would_run_differently() {
    let dir = tmpdir("refusals");
    let out = dir.join("m.gguf");
    let refused = |model: &Path, parts: &[&str]| {
        let e = export(&opts(model, None, &out, GgufType::F16))
            .unwrap_err()
            .to_string();
        for p in parts {
            assert!(e.contains(p), "{p:?} not in: {e}");
        }
        assert!(!out.exists());
    };
    // The fixtures as committed: query_pre_attn_scalar 20, head_dim 24.
    for family in ["gemma2", "gemma3"] {
        refused(
            &fixture(&format!("tiny-{family}")),
            &["config.json", "query_pre_attn_scalar 20:", "head_dim = 24"],
        );
    }
    let m = variant(&dir, "gemma2", "untied", |c| {
        c["query_pre_attn_scalar"] = json!(24);
        c["tie_word_embeddings"] = json!(false);
    });
    refused(&m, &["tie_word_embeddings"]);
    let m = variant(&dir, "gemma2", "nocap", |c| {
        c["query_pre_attn_scalar"] = json!(24);
        c["attn_logit_softcapping"] = Json::Null;
    });
    refused(&m, &["attn_logit_softcapping is null", "gemma2"]);
    let m = variant(&dir, "gemma3", "cap", |c| {
        c["query_pre_attn_scalar"] = json!(24);
        c["attn_logit_softcapping"] = json!(5.0);
    });
    refused(&m, &["attn_logit_softcapping 5", "gemma3"]);
    let m = variant(&dir, "gemma3", "localscale", |c| {
        c["query_pre_attn_scalar"] = json!(24);
        c["rope_parameters"]["sliding_attention"] =
            json!({"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0});
    });
    refused(&m, &["sliding layers' rope scaling", "gemma3"]);
    // A SentencePiece tokenizer (Gemma's own) needs its tokenizer.model (tests/gguf_spm.rs
    // exports one).
    let m = llama_cpp_ready(&dir, "gemma3");
    let mut tok = json_file(&m.join("tokenizer.json"));
    tok["model"]["byte_fallback"] = json!(true);
    std::fs::write(m.join("tokenizer.json"), tok.to_string()).unwrap();
    refused(
        &m,
        &[
            "tokenizer.model",
            "missing",
            "SentencePiece",
            "tokenizer.ggml.model",
        ],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gguf_gemma_import_reads_llama_cpps_defaults() {
    // A gemma2 file without the soft-cap and window keys, and a gemma3 file whose pattern is
    // a period: llama.cpp's defaults (50, 30, 4096; i mod n < n − 1) come back as config.
    let dir = tmpdir("defaults");
    let model = llama_cpp_ready(&dir, "gemma2");
    let full = dir.join("g2.gguf");
    export(&opts(&model, None, &full, GgufType::F32)).unwrap();
    let drop = [
        "gemma2.attn_logit_softcapping",
        "gemma2.final_logit_softcapping",
        "gemma2.attention.sliding_window",
    ];
    let stripped = dir.join("g2-stripped.gguf");
    crate::gguf_qwen::rewrite(&full, &stripped, |meta, _| {
        meta.retain(|(k, _)| !drop.contains(&k.as_str()));
    });
    let back = dir.join("g2-back");
    import_gguf(&stripped, &back).unwrap();
    let c = json_file(&back.join("config.json"));
    assert_eq!(c["attn_logit_softcapping"], 50.0);
    assert_eq!(c["final_logit_softcapping"], 30.0);
    assert_eq!(c["sliding_window"], 4096);
    assert_eq!(
        c["layer_types"],
        json!(["sliding_attention", "full_attention", "sliding_attention"])
    );

    let model = llama_cpp_ready(&dir, "gemma3");
    let full = dir.join("g3.gguf");
    export(&opts(&model, None, &full, GgufType::F32)).unwrap();
    let periodic = dir.join("g3-periodic.gguf");
    crate::gguf_qwen::rewrite(&full, &periodic, |meta, _| {
        for (k, v) in meta.iter_mut() {
            if k == "gemma3.attention.sliding_window_pattern" {
                *v = Value::U32(3);
            }
        }
    });
    let back = dir.join("g3-back");
    import_gguf(&periodic, &back).unwrap();
    let c = json_file(&back.join("config.json"));
    assert_eq!(
        c["layer_types"],
        json!([
            "sliding_attention",
            "sliding_attention",
            "full_attention",
            "sliding_attention"
        ])
    );
    assert_eq!(c["rope_local_base_freq"], 10000.0);
    assert!(c["attn_logit_softcapping"].is_null());
    // Without a window no gemma3 layer slides.
    let nowindow = dir.join("g3-nowindow.gguf");
    crate::gguf_qwen::rewrite(&full, &nowindow, |meta, _| {
        meta.retain(|(k, _)| k != "gemma3.attention.sliding_window");
    });
    let back = dir.join("g3-nowindow-back");
    import_gguf(&nowindow, &back).unwrap();
    let cfg = config(&back);
    assert_eq!(cfg.sliding_window, None);
    assert!((0..4).all(|l| cfg.window(l).is_none()));
    // An output matrix in a gemma2 file has no place (llama.cpp's gemma2 ties it).
    let untied = dir.join("g2-untied.gguf");
    crate::gguf_qwen::rewrite(&dir.join("g2.gguf"), &untied, |_, tensors| {
        let embd = tensors
            .iter()
            .find(|(t, _)| t.name == "token_embd.weight")
            .cloned()
            .unwrap();
        let mut out = embd;
        out.0.name = "output.weight".into();
        tensors.push(out);
    });
    let e = import_gguf(&untied, &dir.join("x"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("output.weight") && e.contains("Gemma2ForCausalLM"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gguf_gemma_export_equals_llama_cpps_converter() {
    // tests/fixtures/gguf/gemma-converter.json: llama.cpp's convert_hf_to_gguf.py (0.3.36's
    // vendored llama.cpp) on the same fixtures (query_pre_attn_scalar 24, weights rounded to
    // bf16), --outtype bf16, vocabulary aside (make_gemma_gguf_reference.py).
    let reference = json_file(
        &qlora_rs::testing::project_root().join("tests/fixtures/gguf/gemma-converter.json"),
    );
    let dir = tmpdir("converter");
    for family in ["gemma2", "gemma3"] {
        let want = &reference[family];
        let model = llama_cpp_ready(&dir, family);
        let out = dir.join(format!("{family}.gguf"));
        export(&opts(&model, None, &out, GgufType::Bf16)).unwrap();
        let g = GgufFile::open(&out).unwrap();
        let keys = want["keys"].as_object().unwrap();
        for (k, j) in keys {
            let v = g
                .get(k)
                .unwrap_or_else(|| panic!("{family}: the converter writes `{k}`, we do not"));
            assert!(
                same_value(v, j),
                "{family}: `{k}`: ours {v:?}, converter {j}"
            );
        }
        // Ours beyond the converter's: only the sliding pattern tiny-gemma3 needs (the
        // converter leaves it out, and llama.cpp would slide all four layers; see
        // gguf_gemma_export_writes_llama_cpps_keys_and_names_and_round_trips).
        let extra: Vec<&str> = g
            .metadata
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| k.starts_with(&format!("{family}.")) && !keys.contains_key(*k))
            .collect();
        let expected_extra: Vec<&str> = if family == "gemma3" {
            vec!["gemma3.attention.sliding_window_pattern"]
        } else {
            vec![]
        };
        assert_eq!(extra, expected_extra, "{family}");
        // The same tensors: names, dims, types and bytes.
        let tensors = want["tensors"].as_array().unwrap();
        assert_eq!(g.tensors.len(), tensors.len(), "{family}");
        for t in tensors {
            let name = t["name"].as_str().unwrap();
            let ours = g
                .tensor(name)
                .unwrap_or_else(|| panic!("{family}: no `{name}`"));
            let dims = ours.dims.clone();
            let want_dims: Vec<usize> = t["dims"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(dims, want_dims, "{family}: {name}");
            assert_eq!(ours.ggml_type.name(), t["type"].as_str().unwrap(), "{name}");
            assert_eq!(
                fnv1a64(g.tensor_bytes(ours)),
                t["fnv1a64"].as_str().unwrap(),
                "{family}: `{name}` holds other bytes than the converter's"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
