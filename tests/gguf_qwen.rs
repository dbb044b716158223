//! `import-gguf` for llama.cpp's `qwen2` and `qwen3` architectures: round trips through our
//! `export-gguf` on the committed Qwen2/Qwen3 fixtures (every weight bit for bit what `merge`
//! writes, the same config, tokenizer, chat template and loss), a Qwen3 GGUF written by
//! llama.cpp's gguf-py (tests/fixtures/gguf/tiny-qwen3.gguf, made by
//! tests/fixtures/make_gguf_fixtures.py from the transformers-made tiny-qwen3), Qwen2's
//! pre-tokenizer both ways, and everything that cannot be represented refused by name.

use std::path::{Path, PathBuf};

use crate::gguf_common::{assert_same_weights, bf16_copy, config, import_refused, set};
use qlora_rs::data::tokenizer::TextTokenizer;
use qlora_rs::io::export;
use qlora_rs::io::safetensors::Checkpoint;
use qlora_rs::model::export_gguf::{export_gguf, ExportGguf, GgufType};
use qlora_rs::model::import_gguf::{import_gguf, ImportReport};
use qlora_rs::model::llama::{BaseFormat, Llama};
use qlora_rs::ops::rope::RopeScaling;
use qlora_rs::quant::gguf::{GgmlType, GgufFile, Value};
use qlora_rs::quant::gguf_write::{GgufWriter, PlannedTensor};
use serde_json::Value as Json;

fn llama_fixture(p: &str) -> PathBuf {
    qlora_rs::testing::project_root()
        .join("tests/fixtures/llama")
        .join(p)
}

fn gguf_fixture(p: &str) -> PathBuf {
    qlora_rs::testing::project_root()
        .join("tests/fixtures/gguf")
        .join(p)
}

fn tmpdir(name: &str) -> PathBuf {
    crate::common::fresh_dir("gguf-qwen", name)
}

fn json_file(p: &Path) -> Json {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Exports `model` (with `adapter` folded in) as a bf16 GGUF.
fn export_bf16(model: &Path, adapter: Option<&Path>, out: &Path) {
    let o = ExportGguf {
        model: model.to_path_buf(),
        adapter: adapter.map(Path::to_path_buf),
        output: out.to_path_buf(),
        ty: GgufType::Bf16,
        overwrite: false,
        onto_original: false,
        allow_other_base: true,
    };
    export_gguf(&o, |_, _, _| {}).unwrap();
}

const TEXT: &str = "The quick brown fox jumps over the lazy dog. She said: \"It's 2024!\"";

/// The mean loss of `TEXT` on the model of `dir` (f32, CPU, dense base).
fn loss(dir: &Path) -> f64 {
    let model = Llama::load(dir, BaseFormat::Dense).unwrap();
    let tok = TextTokenizer::load(dir).unwrap();
    let (ids, _) = tok.encode(TEXT, false).unwrap();
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let l = model.loss(None, &ids, &labels, &[0, ids.len()]).unwrap();
    assert!(l.count > 10, "{}", l.count);
    l.loss_sum / l.count as f64
}

fn assert_close(a: f64, b: f64, rel: f64, what: &str) {
    assert!(
        (a - b).abs() <= rel * b.abs(),
        "{what}: {a} vs {b} (relative {:.2e} > {rel:.0e})",
        (a - b).abs() / b.abs()
    );
}

/// The imported tokenizer encodes like the original's and has its chat template.
fn assert_same_tokenizer(got: &Path, want: &Path, texts: &[&str]) {
    let (ours, theirs) = (
        TextTokenizer::load(got).unwrap(),
        TextTokenizer::load(want).unwrap(),
    );
    for text in texts {
        assert_eq!(
            ours.encode(text, false).unwrap().0,
            theirs.encode(text, false).unwrap().0,
            "{text:?}"
        );
        assert_eq!(
            ours.encode(text, true).unwrap().0,
            theirs.encode(text, true).unwrap().0,
            "{text:?} with special tokens"
        );
    }
    let template = |d: &Path| json_file(&d.join("tokenizer_config.json"))["chat_template"].clone();
    assert!(template(got).is_string());
    assert_eq!(template(got), template(want));
    assert_eq!(ours.eos_id, theirs.eos_id);
}

/// ASCII: the tiny fixtures' vocabulary lacks the other bytes (its tokenizer.json maps them to
/// `<unk>`; llama.cpp, and so the import, leaves them out). Non-ASCII text and NFC are checked
/// with a full byte alphabet in gguf.rs (`tok-qwen2.gguf` against Hugging Face tokenizers).
const TEXTS: [&str; 5] = [
    "Hello, world! 12345",
    "<|im_start|>user\nWhat's 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "I'M sure WE'LL see; they've said so.\n\n\n   spaces\ttabs",
    "def add(a, b):\n    return a + b  # 678\n",
    "$$$ +++ <=> ^^^ ~~~ ||| ... !!! 3.14159",
];

#[test]
fn gguf_import_qwen_round_trips_export_gguf_bit_for_bit() {
    let dir = tmpdir("roundtrip");
    for (family, adapter) in [
        ("qwen2", None),
        ("qwen2", Some("tiny-qwen2-lora")),
        ("qwen3", None),
        ("qwen3", Some("tiny-qwen3-lora")),
    ] {
        // Qwen3 without the fixture's biases: llama.cpp's qwen3 has no o_proj bias, so
        // export-gguf refuses tiny-qwen3 itself (the gguf-py file below keeps the biases).
        let model = match family {
            "qwen3" => crate::common::tiny_qwen3_without_biases(&dir),
            _ => llama_fixture(&format!("tiny-{family}")),
        };
        let case = format!("{family}{}", if adapter.is_some() { "+lora" } else { "" });
        // What the import must give: merge's output, or the weights rounded to bf16.
        let reference = dir.join(format!("ref-{case}"));
        match adapter {
            Some(a) => {
                export::merge(&model, &llama_fixture(a), &reference, false).unwrap();
            }
            None => bf16_copy(&model, &reference),
        }
        let gguf = dir.join(format!("{case}.gguf"));
        export_bf16(&model, adapter.map(llama_fixture).as_deref(), &gguf);
        let back = dir.join(format!("back-{case}"));
        let report = import_gguf(&gguf, &back).unwrap();
        assert_eq!(report.architecture, family, "{case}");
        assert!(report.zero_filled.is_empty(), "{case}");
        assert!(report
            .to_string()
            .starts_with(&format!("{family}: 2 layers")));

        assert_same_weights(&back, &reference, &case);
        assert_eq!(config(&back), config(&model), "{case}");
        let cfg = json_file(&back.join("config.json"));
        let class = if family == "qwen2" {
            "Qwen2ForCausalLM"
        } else {
            "Qwen3ForCausalLM"
        };
        assert_eq!(cfg["architectures"], serde_json::json!([class]), "{case}");
        assert_eq!(cfg["model_type"], family);
        assert_eq!(cfg["attention_bias"], family == "qwen2", "{case}");
        assert_eq!(cfg["use_sliding_window"], false);
        assert_eq!(cfg["tie_word_embeddings"], false);
        assert_eq!(cfg["torch_dtype"], "bfloat16");
        assert_eq!(cfg["head_dim"], if family == "qwen3" { 24 } else { 16 });
        assert_same_tokenizer(&back, &model, &TEXTS);

        let (got, want, original) = (loss(&back), loss(&reference), loss(&model));
        println!("{case}: loss {got:.6} (reference {want:.6}, original f32 {original:.6})");
        assert_close(got, want, 1e-4, &case);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gguf_import_qwen3_file_written_by_gguf_py() {
    let dir = tmpdir("gguf-py");
    let model = llama_fixture("tiny-qwen3");
    let back = dir.join("back");
    let report = import_gguf(&gguf_fixture("tiny-qwen3.gguf"), &back).unwrap();
    println!("{report}");
    assert_eq!(report.architecture, "qwen3");
    // 2 × (4 matrices + 3 MLP + 2 layer norms + 2 q/k norms + 4 biases) + embeddings, norm, head.
    assert_eq!(report.tensors_written, 2 * 15 + 3);
    assert_eq!(report.tensors_by_type["BF16"], 2 * 7 + 2);
    assert_eq!(report.tensors_by_type["F32"], 2 * 8 + 1);
    assert!(report.zero_filled.is_empty() && report.skipped.is_empty());
    assert_eq!(report.tokenizer_pre, "smollm");
    let shown = report.to_string();
    assert!(
        shown.contains("head_dim 24") && shown.contains("q/k norms") && shown.contains("q/k/v/o"),
        "{shown}"
    );

    // gguf-py rounds to bf16 as we do: every weight is the original's, rounded.
    let reference = dir.join("reference");
    bf16_copy(&model, &reference);
    assert_same_weights(&back, &reference, "gguf-py qwen3");
    assert_eq!(config(&back), config(&model));
    let cfg = json_file(&back.join("config.json"));
    assert_eq!(
        cfg["architectures"],
        serde_json::json!(["Qwen3ForCausalLM"])
    );
    assert_eq!(cfg["head_dim"], 24);
    assert_eq!(cfg["rms_norm_eps"], 1e-6);
    assert_eq!(cfg["rope_theta"], 1e6);
    assert_eq!(cfg["max_position_embeddings"], 128);
    assert_eq!(cfg["_name_or_path"], "tiny-qwen3");
    assert_eq!(
        (cfg["bos_token_id"].clone(), cfg["eos_token_id"].clone()),
        (1.into(), 2.into())
    );
    assert_same_tokenizer(&back, &model, &TEXTS);

    let (got, want, original) = (loss(&back), loss(&reference), loss(&model));
    println!("loss {got:.6} (bf16 reference {want:.6}, original f32 {original:.6})");
    assert_close(got, want, 1e-4, "gguf-py qwen3");
    assert_close(
        got,
        original,
        1e-2,
        "gguf-py qwen3 against the f32 original",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gguf_import_qwen2_pre_tokenizer_round_trips_as_qwens_tokenizer_json() {
    let dir = tmpdir("pre-qwen2");
    // tiny-qwen2 with the tokenizer.json pieces of Qwen2/Qwen3's own.
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in std::fs::read_dir(llama_fixture("tiny-qwen2")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), model.join(f.file_name())).unwrap();
    }
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": false, "use_regex": false});
    let regex = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let mut tj = json_file(&model.join("tokenizer.json"));
    tj["normalizer"] = serde_json::json!({"type": "NFC"});
    tj["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
        byte_level,
    ]});
    tj["post_processor"] = byte_level.clone();
    tj["decoder"] = byte_level.clone();
    std::fs::write(model.join("tokenizer.json"), tj.to_string()).unwrap();

    let first = dir.join("first.gguf");
    export_bf16(&model, None, &first);
    let back = dir.join("back");
    let report = import_gguf(&first, &back).unwrap();
    assert_eq!(report.tokenizer_pre, "qwen2");
    // Written as Qwen's tokenizer.json writes it.
    let got = json_file(&back.join("tokenizer.json"));
    for key in ["normalizer", "pre_tokenizer", "post_processor", "decoder"] {
        assert_eq!(got[key], tj[key], "{key}");
    }
    assert_eq!(got["model"]["ignore_merges"], false);
    assert_same_tokenizer(&back, &model, &TEXTS);
    // And exported again, the same tokenizer metadata.
    let second = dir.join("second.gguf");
    export_bf16(&back, None, &second);
    let (a, b) = (
        GgufFile::open(&first).unwrap(),
        GgufFile::open(&second).unwrap(),
    );
    let mut compared = 0;
    for (k, v) in a
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
    {
        assert_eq!(b.get(k), Some(v), "{k}");
        compared += 1;
    }
    assert!(compared >= 9, "{compared}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `src` rewritten to `dst` with `edit` applied to its metadata and tensors (raw bytes).
pub(crate) fn rewrite(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<(PlannedTensor, Vec<u8>)>),
) {
    let g = GgufFile::open(src).unwrap();
    let mut meta = g.metadata.clone();
    let mut tensors: Vec<(PlannedTensor, Vec<u8>)> = g
        .tensors
        .iter()
        .map(|t| {
            let p = PlannedTensor {
                name: t.name.clone(),
                shape: t.shape(),
                ty: t.ggml_type,
            };
            (p, g.tensor_bytes(t).to_vec())
        })
        .collect();
    edit(&mut meta, &mut tensors);
    let w = GgufWriter {
        metadata: meta,
        tensors: tensors.iter().map(|(p, _)| p.clone()).collect(),
    };
    w.write(dst, |i| Ok(tensors[i].1.clone())).unwrap();
}

fn f32_tensor(name: &str, values: &[f32]) -> (PlannedTensor, Vec<u8>) {
    let p = PlannedTensor {
        name: name.into(),
        shape: vec![values.len()],
        ty: GgmlType::F32,
    };
    (p, values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

#[test]
fn gguf_import_qwen_refuses_what_it_cannot_represent_by_name() {
    let dir = tmpdir("refusals");
    let qwen2 = dir.join("qwen2.gguf");
    export_bf16(&llama_fixture("tiny-qwen2"), None, &qwen2);
    let qwen3 = gguf_fixture("tiny-qwen3.gguf");
    let case = |name: &str| dir.join(format!("{name}.gguf"));

    // Rope scaling other than none/linear: Qwen's yarn.
    for (src, arch) in [(&qwen2, "qwen2"), (&qwen3, "qwen3")] {
        let p = case(&format!("{arch}-yarn"));
        rewrite(src, &p, |m, _| {
            set(
                m,
                &format!("{arch}.rope.scaling.type"),
                Value::String("yarn".into()),
            );
            set(m, &format!("{arch}.rope.scaling.factor"), Value::F32(4.0));
            set(
                m,
                &format!("{arch}.rope.scaling.original_context_length"),
                Value::U32(32768),
            );
        });
        import_refused(
            &p,
            &[
                &format!("`{arch}.rope.scaling.type` is `yarn`"),
                "none and linear",
            ],
        );
    }
    // A required tensor missing: Qwen2's biases, Qwen3's q/k norms.
    let p = case("qwen2-no-v-bias");
    rewrite(&qwen2, &p, |_, t| {
        t.retain(|(x, _)| x.name != "blk.1.attn_v.bias")
    });
    import_refused(
        &p,
        &["tensor `blk.1.attn_v.bias` is missing", "Qwen2ForCausalLM"],
    );
    let p = case("qwen3-no-k-norm");
    rewrite(&qwen3, &p, |_, t| {
        t.retain(|(x, _)| x.name != "blk.0.attn_k_norm.weight")
    });
    import_refused(&p, &["tensor `blk.0.attn_k_norm.weight` is missing"]);
    // Qwen3 biases on some layers only.
    let p = case("qwen3-half-biases");
    rewrite(&qwen3, &p, |_, t| {
        t.retain(|(x, _)| x.name != "blk.1.attn_k.bias")
    });
    import_refused(
        &p,
        &[
            "tensor `blk.1.attn_k.bias` is missing",
            "every layer or on none",
        ],
    );
    // Tensors with no place in the Hugging Face model.
    for (name, values) in [
        ("blk.0.attn_q_norm.weight", vec![1.0f32; 16]),
        ("blk.0.attn_output.bias", vec![0.0; 96]),
        ("rope_freqs.weight", vec![1.0; 8]),
        ("blk.2.attn_norm.weight", vec![1.0; 96]),
    ] {
        let p = case(&format!("qwen2-extra-{name}"));
        rewrite(&qwen2, &p, |_, t| t.push(f32_tensor(name, &values)));
        import_refused(
            &p,
            &[
                &format!("tensor `{name}` has no counterpart"),
                "Qwen2ForCausalLM",
            ],
        );
    }
    // A q/k norm of the wrong width.
    let p = case("qwen3-norm-shape");
    rewrite(&qwen3, &p, |_, t| {
        let i = t
            .iter()
            .position(|(x, _)| x.name == "blk.0.attn_q_norm.weight")
            .unwrap();
        t[i] = f32_tensor("blk.0.attn_q_norm.weight", &[1.0; 16]);
    });
    import_refused(&p, &["`blk.0.attn_q_norm.weight` has shape [16]", "[24]"]);
    // Partial rotary embeddings.
    let p = case("qwen3-partial-rope");
    rewrite(&qwen3, &p, |m, _| {
        set(m, "qwen3.rope.dimension_count", Value::U32(12))
    });
    import_refused(
        &p,
        &["`qwen3.rope.dimension_count` is 12", "partial rotary"],
    );
    // Keys and values of different widths.
    let p = case("qwen3-value-length");
    rewrite(&qwen3, &p, |m, _| {
        set(m, "qwen3.attention.value_length", Value::U32(16))
    });
    import_refused(&p, &["`qwen3.attention.value_length` (16)"]);
    // A pre-tokenizer llama.cpp knows but we do not write.
    let p = case("qwen3-pre");
    rewrite(&qwen3, &p, |m, _| {
        set(m, "tokenizer.ggml.pre", Value::String("qwen35".into()))
    });
    import_refused(&p, &["`qwen35`", "qwen2"]);
    // Another architecture.
    let p = case("phi2");
    rewrite(&qwen3, &p, |m, _| {
        set(m, "general.architecture", Value::String("phi2".into()))
    });
    import_refused(
        &p,
        &[
            "architecture `phi2` is not supported",
            "llama, qwen2, qwen3, gemma2, gemma3, phi3",
        ],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gguf_import_qwen_variants_llama_cpp_runs() {
    let dir = tmpdir("variants");
    let qwen3 = gguf_fixture("tiny-qwen3.gguf");
    let load = |p: &Path, name: &str| -> (PathBuf, ImportReport, Llama) {
        let out = dir.join(name);
        let r = import_gguf(p, &out).unwrap();
        let m = Llama::load(&out, BaseFormat::Dense).unwrap();
        (out, r, m)
    };

    // Qwen3 with q/k/v biases but none on the output, as llama.cpp's qwen3 reads it:
    // attention_bias, and o_proj.bias written as zeros.
    let p = dir.join("no-o-bias.gguf");
    rewrite(&qwen3, &p, |_, t| {
        t.retain(|(x, _)| !x.name.ends_with("attn_output.bias"))
    });
    let (out, r, m) = load(&p, "no-o-bias");
    assert_eq!(
        r.zero_filled,
        [
            "model.layers.0.self_attn.o_proj.bias",
            "model.layers.1.self_attn.o_proj.bias"
        ]
    );
    assert!(r.to_string().contains("written as zeros"), "{r}");
    assert!(m.config.qkv_bias && m.config.o_bias);
    let ck = Checkpoint::open_dir(&out).unwrap();
    let o = ck
        .f32("model.layers.1.self_attn.o_proj.bias", &[96])
        .unwrap();
    assert!(o.iter().all(|&v| v == 0.0));
    assert_ne!(
        ck.f32("model.layers.1.self_attn.q_proj.bias", &[144])
            .unwrap(),
        vec![0.0; 144]
    );

    // Qwen3 as released: no biases at all.
    let p = dir.join("no-bias.gguf");
    rewrite(&qwen3, &p, |_, t| {
        t.retain(|(x, _)| !x.name.ends_with(".bias"))
    });
    let (out, r, m) = load(&p, "no-bias");
    assert_eq!(json_file(&out.join("config.json"))["attention_bias"], false);
    assert!(!m.config.qkv_bias && !m.config.o_bias && r.zero_filled.is_empty());
    assert!(!Checkpoint::open_dir(&out)
        .unwrap()
        .names()
        .iter()
        .any(|n| n.ends_with(".bias")));

    // Tied embeddings (no output.weight) and linear rope scaling.
    let p = dir.join("tied.gguf");
    rewrite(&qwen3, &p, |m, t| {
        t.retain(|(x, _)| x.name != "output.weight");
        set(m, "qwen3.rope.scaling.type", Value::String("linear".into()));
        set(m, "qwen3.rope.scaling.factor", Value::F32(2.0));
    });
    let (out, _, m) = load(&p, "tied");
    assert!(m.config.tie_word_embeddings);
    assert_eq!(m.config.rope_scaling, RopeScaling::Linear { factor: 2.0 });
    assert!(!Checkpoint::open_dir(&out)
        .unwrap()
        .contains("lm_head.weight"));
    let cfg = json_file(&out.join("config.json"));
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["rope_scaling"]["rope_type"], "linear");
    std::fs::remove_dir_all(&dir).unwrap();
}
