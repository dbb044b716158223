//! SentencePiece tokenizers in GGUF (`tokenizer.ggml.model = "llama"`: Gemma 2/3, Phi-3,
//! Llama 2) and Phi-4-mini's byte-level BPE with GPT-4o's pre-tokenizer (`gpt-4o`), both ways,
//! against llama.cpp itself (tests/fixtures/make_spm_fixtures.py made the fixtures with the
//! `sentencepiece` and `tokenizers` packages, transformers, convert_hf_to_gguf.py and
//! llama-cpp-python):
//!
//! - export: the `tokenizer.*` keys written for the fixture folders (tests/fixtures/spm/gemma
//!   as `gemma2`, tests/fixtures/spm/llama and tests/fixtures/spm/gpt4o as `phi3`,
//!   tests/fixtures/spm/llama2 as `llama`) equal, in order and value, what the converter wrote (tests/fixtures/gguf/spm-converter.json), also
//!   through a whole `export-gguf` of a tiny Gemma 2 with its tokenizer;
//! - import: the tokenizer.json built from the converter's GGUF files
//!   (tests/fixtures/gguf/tok-spm-*.gguf) tokenizes awkward strings (spaces, newlines, digits,
//!   accents, emoji and scripts the vocabulary lacks (byte fallback), special tokens) to
//!   llama.cpp's ids, with and without BOS, and decodes them back (the Phi-3 file's special
//!   tokens strip the whitespace after them, as llama.cpp does for a model named Phi-3);
//! - refusals (and a warning for an added token past the embedding, left out as the converter
//!   leaves it out): a SentencePiece tokenizer.json without its tokenizer.model, a damaged
//!   tokenizer.model, a GGUF `llama` tokenizer without scores, a GGUF tokenizer of another kind.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::gguf_common::{export, opts, same_value};
use qlora_rs::io::safetensors::Checkpoint;
use qlora_rs::model::export_gguf::{vocab, GgufType};
use qlora_rs::model::import_gguf::{import_gguf, tokenizer};
use qlora_rs::quant::gguf::{GgufFile, Value};
use qlora_rs::quant::gguf_write::GgufWriter;
use serde_json::{json, Value as Json};

fn root() -> PathBuf {
    qlora_rs::testing::project_root().join("tests/fixtures")
}

fn read_json(p: &Path) -> Json {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn reference() -> Json {
    let p = root().join("gguf/spm-converter.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn tmpdir(name: &str) -> PathBuf {
    crate::common::fresh_dir("gguf-spm", name)
}

fn family(arch: &str) -> &'static str {
    match arch {
        "gemma2" => "gemma2",
        "phi3" => "phi3",
        "llama" => "llama",
        a => panic!("no fixture model for {a}"),
    }
}

/// A model folder: the tiny `<family>` fixture's config (vocab_size `rows`, Gemma's
/// query_pre_attn_scalar made llama.cpp's) with the SentencePiece fixture `name`'s tokenizer
/// files; with `weights`, the fixture's weights with the embedding (and lm_head) resized.
fn model_dir(dir: &Path, name: &str, arch: &str, rows: usize, weights: bool) -> PathBuf {
    let src = root().join("llama").join(format!("tiny-{}", family(arch)));
    let out = dir.join(name);
    std::fs::create_dir_all(&out).unwrap();
    let mut cfg: Json =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    let old = cfg["vocab_size"].as_u64().unwrap() as usize;
    cfg["vocab_size"] = json!(rows);
    if arch == "gemma2" {
        cfg["query_pre_attn_scalar"] = cfg["head_dim"].clone();
    }
    std::fs::write(out.join("config.json"), cfg.to_string()).unwrap();
    for f in std::fs::read_dir(root().join("spm").join(name)).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), out.join(f.file_name())).unwrap();
    }
    if weights {
        let ck = Checkpoint::open_dir(&src).unwrap();
        let data: Vec<(String, Vec<usize>, Vec<f32>)> = ck
            .names()
            .into_iter()
            .map(|n| {
                let t = ck.get(n).unwrap();
                let (mut shape, mut v) = (t.shape.to_vec(), t.to_f32().unwrap());
                if shape[0] == old {
                    shape[0] = rows;
                    v = (0..rows * shape[1])
                        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 4e-5)
                        .collect();
                }
                (n.to_string(), shape, v)
            })
            .collect();
        crate::common::write_f32_safetensors(&out.join("model.safetensors"), &data);
    }
    out
}

/// `got` equals the converter's `tokenizer.*` keys: same names in the same order, same values.
/// The error `import-gguf`'s tokenizer step gives for a GGUF of `metadata` alone, written to
/// `path`.
fn tokenizer_refusal(metadata: Vec<(String, Value)>, path: &Path) -> String {
    let w = GgufWriter {
        metadata,
        tensors: Vec::new(),
    };
    w.write(path, |_| unreachable!("no tensors")).unwrap();
    let g = GgufFile::open(path).unwrap();
    tokenizer::build(&g, 4096).err().unwrap().to_string()
}

fn assert_converter_keys(got: &[(String, Value)], want: &Json, what: &str) {
    let want = want.as_array().unwrap();
    let names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    let want_names: Vec<&str> = want.iter().map(|kv| kv[0].as_str().unwrap()).collect();
    assert_eq!(names, want_names, "{what}: keys and their order");
    for ((k, v), kv) in got.iter().zip(want) {
        assert!(same_value(v, &kv[1]), "{what}: {k}: {v:?} vs {}", kv[1]);
    }
}

#[test]
fn gguf_spm_export_writes_the_converters_tokenizer_keys() {
    let dir = tmpdir("keys");
    for (name, r) in reference().as_object().unwrap() {
        let arch = r["arch"].as_str().unwrap();
        let rows = r["vocab_size"].as_u64().unwrap() as usize;
        let m = model_dir(&dir, name, arch, rows, false);
        let cfg = read_json(&m.join("config.json"));
        let v = vocab::read(&m, rows, &cfg, arch).unwrap();
        assert_converter_keys(&v.metadata, &r["keys"], name);
        let pre = if name == "gpt4o" { "gpt-4o" } else { "default" };
        assert_eq!((v.pre.as_str(), v.tokens), (pre, rows));
        assert!(v.chat_template);
        assert!(v.warnings.is_empty(), "{:?}", v.warnings);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gguf_spm_export_and_import_a_gemma2_model() {
    // The whole export-gguf writes the converter's keys; import-gguf gives back a tokenizer
    // that tokenizes as llama.cpp.
    let dir = tmpdir("e2e");
    let r = &reference()["gemma"];
    let m = model_dir(&dir, "gemma", "gemma2", 400, true);
    let out = dir.join("g.gguf");
    let report = export(&opts(&m, None, &out, GgufType::F32)).unwrap();
    assert_eq!(report.tokenizer_model, "llama");
    assert!(
        report.to_string().contains("tokenizer: SentencePiece"),
        "{report}"
    );
    let g = GgufFile::open(&out).unwrap();
    let keys: Vec<(String, Value)> = g
        .metadata
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .cloned()
        .collect();
    assert_converter_keys(&keys, &r["keys"], "export-gguf");
    let back = dir.join("back");
    let report = import_gguf(&out, &back).unwrap();
    assert_eq!(
        (report.tokenizer_model.as_str(), report.tokens),
        ("llama", 400)
    );
    assert!(report.to_string().contains("SentencePiece"), "{report}");
    assert!(!back.join("tokenizer.model").exists());
    let tok = tokenizers::Tokenizer::from_file(back.join("tokenizer.json")).unwrap();
    assert_golden(&tok, &r["golden"], false, "gemma round trip");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `tok` gives llama.cpp's ids for every golden string (with and without BOS) and decodes
/// them back; `prefix`: llama.cpp added a space before each text fragment (the decoder strips
/// only the first, so texts with special tokens are not compared after decoding).
fn assert_golden(tok: &tokenizers::Tokenizer, golden: &Json, prefix: bool, what: &str) {
    for case in golden.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let ids = |k: &str| -> Vec<u32> {
            case[k]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap() as u32)
                .collect()
        };
        let plain = tok.encode(text, false).unwrap();
        assert_eq!(plain.get_ids(), ids("ids"), "{what}: {text:?}");
        let with_bos = tok.encode(text, true).unwrap();
        assert_eq!(
            with_bos.get_ids(),
            ids("ids_special"),
            "{what}: {text:?} with BOS"
        );
        let has_special = plain.get_ids().iter().any(|&i| {
            tok.get_added_tokens_decoder()
                .get(&i)
                .is_some_and(|a| a.special)
        });
        if !(prefix && has_special) {
            let back = tok.decode(plain.get_ids(), false).unwrap();
            assert_eq!(back, text, "{what}: decode of {text:?}");
        }
    }
}

#[test]
fn gguf_spm_import_tokenizes_as_llama_cpp() {
    for (name, r) in reference().as_object().unwrap() {
        let path = root().join(format!("gguf/tok-spm-{name}.gguf"));
        let g = GgufFile::open(&path).unwrap();
        let files = tokenizer::build(&g, 4096).unwrap();
        let text = serde_json::to_string(&files.tokenizer_json).unwrap();
        let tok = tokenizers::Tokenizer::from_str(&text).unwrap();
        let spm = g.get("tokenizer.ggml.model").and_then(Value::as_str) == Some("llama");
        let prefix = spm
            && !matches!(
                g.get("tokenizer.ggml.add_space_prefix"),
                Some(Value::Bool(false))
            );
        assert_golden(&tok, &r["golden"], prefix, name);
        assert_eq!(files.tokens, r["vocab_size"].as_u64().unwrap() as usize);
        let cfg = &files.tokenizer_config;
        let template = r["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|kv| kv[0] == "tokenizer.chat_template")
            .unwrap();
        assert_eq!(cfg["chat_template"], template[1], "{name}");
        if spm {
            // The prefix space is the normalizer's Prepend.
            let norm = files.tokenizer_json["normalizer"].to_string();
            assert_eq!(norm.contains("Prepend"), prefix, "{name}: {norm}");
        }
    }
}

#[test]
fn gguf_spm_refusals() {
    let dir = tmpdir("refusals");
    let m = model_dir(&dir, "gemma", "gemma2", 400, false);
    let cfg = read_json(&m.join("config.json"));
    // No tokenizer.model: named, with what it is needed for.
    std::fs::remove_file(m.join("tokenizer.model")).unwrap();
    let e = vocab::read(&m, 400, &cfg, "gemma2")
        .err()
        .unwrap()
        .to_string();
    for p in ["tokenizer.model", "missing", "SentencePiece", "score"] {
        assert!(e.contains(p), "`{p}` not in: {e}");
    }
    // A damaged one (cut inside its last field).
    let good = std::fs::read(root().join("spm/gemma/tokenizer.model")).unwrap();
    std::fs::write(m.join("tokenizer.model"), &good[..good.len() - 3]).unwrap();
    let e = vocab::read(&m, 400, &cfg, "gemma2")
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("tokenizer.model") && e.contains("not a SentencePiece model"),
        "{e}"
    );
    // More pieces than embedding rows.
    std::fs::write(m.join("tokenizer.model"), &good).unwrap();
    let e = vocab::read(&m, 300, &cfg, "gemma2")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("400 pieces") && e.contains("300 rows"), "{e}");
    // An architecture the converter writes no SentencePiece vocabulary for.
    let e = vocab::read(&m, 400, &cfg, "qwen2")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("`qwen2`") && e.contains("gemma2"), "{e}");

    // An added token past the embedding is left out, as the converter leaves it out, and named.
    let mut tcfg = read_json(&m.join("tokenizer_config.json"));
    tcfg["added_tokens_decoder"]["450"] = json!({"content": "<extra>", "special": true});
    std::fs::write(m.join("tokenizer_config.json"), tcfg.to_string()).unwrap();
    let v = vocab::read(&m, 400, &cfg, "gemma2").unwrap();
    assert_eq!(v.warnings.len(), 1, "{:?}", v.warnings);
    assert!(
        v.warnings[0].contains("tokenizer_config.json")
            && v.warnings[0].contains("\"<extra>\" (id 450)"),
        "{:?}",
        v.warnings
    );

    // A GGUF `llama` tokenizer without scores.
    let src = GgufFile::open(&root().join("gguf/tok-spm-gemma.gguf")).unwrap();
    let mut meta = src.metadata.clone();
    meta.retain(|(k, _)| k != "tokenizer.ggml.scores");
    let e = tokenizer_refusal(meta, &dir.join("noscores.gguf"));
    assert!(
        e.contains("noscores.gguf") && e.contains("tokenizer.ggml.scores"),
        "{e}"
    );
    // A tokenizer kind neither `gpt2` nor `llama` (T5's Unigram, `t5`) is refused by name.
    let mut meta = src.metadata.clone();
    for (k, v) in meta.iter_mut() {
        if k == "tokenizer.ggml.model" {
            *v = Value::String("t5".into());
        }
    }
    let e = tokenizer_refusal(meta, &dir.join("t5.gguf"));
    for p in ["t5.gguf", "`t5`", "`gpt2`", "`llama`"] {
        assert!(e.contains(p), "`{p}` not in: {e}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
