//! GGUF import against llama.cpp's gguf-py (fixtures in tests/fixtures/gguf, made by
//! tests/fixtures/make_gguf_fixtures.py): the reader and every metadata type, dequantization of
//! every supported type bit-exact with `gguf.quants.dequantize`, the q/k row permutation undone,
//! the imported folder loading as a model and a tokenizer, the tokenizer per pre-tokenizer against
//! Hugging Face tokenizers (Qwen2's included), bad files. The real SmolLM2 check runs when
//! QLORA_DEMO_ASSETS is set. The `qwen2`/`qwen3` architectures are in gguf_qwen.rs.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use half::bf16;
use qlora_rs::data::formats::Message;
use qlora_rs::data::tokenizer::TextTokenizer;
use qlora_rs::io::safetensors::Checkpoint;
use qlora_rs::model::import_gguf::{import_gguf, tokenizer, ImportReport};
use qlora_rs::model::llama::{BaseFormat, Llama};
use qlora_rs::quant::gguf::{self, GgmlType, GgufFile, Value};
use serde_json::Value as Json;

fn fixture(name: &str) -> PathBuf {
    qlora_rs::testing::project_root()
        .join("tests/fixtures/gguf")
        .join(name)
}

fn tmpdir(name: &str) -> PathBuf {
    crate::common::fresh_dir("gguf", name)
}

fn import(name: &str, dir: &str) -> (PathBuf, ImportReport) {
    let out = tmpdir(dir);
    let report = import_gguf(&fixture(name), &out).unwrap();
    (out, report)
}

fn json_file(p: &Path) -> Json {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn golden() -> Checkpoint {
    Checkpoint::open_files(&[fixture("tiny-llama-golden.safetensors")]).unwrap()
}

fn tokenizer_golden() -> Json {
    json_file(&fixture("tokenizer-golden.json"))
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn gguf_reads_header_metadata_of_every_type_and_tensor_table() {
    let g = GgufFile::open(&fixture("tiny-llama.gguf")).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 64);
    assert_eq!(g.data_offset % 64, 0);
    let get = |k: &str| g.get(k).unwrap_or_else(|| panic!("{k}"));
    assert_eq!(get("general.architecture").as_str(), Some("llama"));
    assert_eq!(get("test.u8"), &Value::U8(200));
    assert_eq!(get("test.i8"), &Value::I8(-100));
    assert_eq!(get("test.u16"), &Value::U16(60000));
    assert_eq!(get("test.i16"), &Value::I16(-30000));
    assert_eq!(get("test.u32"), &Value::U32(4_000_000_000));
    assert_eq!(get("test.i32"), &Value::I32(-2_000_000_000));
    assert_eq!(get("test.u64"), &Value::U64(1 << 40));
    assert_eq!(get("test.i64"), &Value::I64(-(1 << 40)));
    assert_eq!(get("test.f32"), &Value::F32(0.25));
    assert_eq!(get("test.f64"), &Value::F64(-1.5e300));
    assert_eq!(get("test.bool"), &Value::Bool(true));
    assert_eq!(get("test.string").as_str(), Some("héllo"));
    assert_eq!(
        get("test.array_i32"),
        &Value::Array(vec![Value::I32(1), Value::I32(-2), Value::I32(3)])
    );
    let strs: Vec<&str> = get("test.array_str")
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(strs, ["a", "bc", ""]);
    assert_eq!(
        get("test.nested"),
        &Value::Array(vec![
            Value::Array(vec![Value::I32(1), Value::I32(2)]),
            Value::Array(vec![Value::I32(3)]),
        ])
    );
    assert_eq!(get("llama.block_count").as_u64(), Some(2));
    assert_eq!(
        get("tokenizer.ggml.tokens").as_array().map(<[_]>::len),
        Some(320)
    );
    // 2 layers × 9 + token_embd, output_norm, output.
    assert_eq!(g.tensors.len(), 21);
    let e = g.tensor("token_embd.weight").unwrap();
    assert_eq!(e.dims, [32, 320]);
    assert_eq!(e.shape(), [320, 32]);
    assert_eq!(e.ggml_type, GgmlType::Q4_1);
    assert_eq!(e.n_bytes, 320 * 32 / 32 * 20);
    for t in &g.tensors {
        assert_eq!(t.offset % 64, 0, "{}", t.name);
    }
}

#[test]
fn gguf_dequantizes_every_type_bit_exact_with_gguf_py() {
    let g = GgufFile::open(&fixture("tiny-llama.gguf")).unwrap();
    let gold = golden();
    let mut types = std::collections::BTreeSet::new();
    for t in &g.tensors {
        let ours = g.dequantize(&t.name).unwrap();
        let key = format!("dequant.{}", t.name);
        let theirs = gold.f32(&key, &t.shape()).unwrap();
        assert_eq!(ours.len(), theirs.len(), "{}", t.name);
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert!(
                a.to_bits() == b.to_bits(),
                "{} ({}): value {i} is {a:e}, gguf-py gives {b:e}",
                t.name,
                t.ggml_type
            );
        }
        assert!(ours.iter().all(|v| v.is_finite()), "{}", t.name);
        types.insert(t.ggml_type.name());
    }
    // Q5_0, Q5_1 and Q5_K are checked against ggml on llama.cpp's own bytes in gguf_quants.rs
    // (quants.gguf's `dequant.*` tensors).
    let quants = GgufFile::open(&fixture("quants.gguf")).unwrap();
    for t in quants
        .tensors
        .iter()
        .filter(|t| t.name.starts_with("dequant."))
    {
        types.insert(t.name["dequant.".len()..].to_string());
    }
    let want: std::collections::BTreeSet<String> =
        GgmlType::SUPPORTED.iter().map(|t| t.name()).collect();
    assert_eq!(types, want, "the fixtures must cover every supported type");
}

#[test]
fn gguf_dequantize_rejects_unsupported_types_and_wrong_sizes() {
    let mut out = vec![0.0f32; 256];
    let e = gguf::dequantize(GgmlType(10), &[0u8; 84], &mut out).unwrap_err();
    assert!(e.to_string().contains("Q2_K"), "{e}");
    let e = gguf::dequantize(GgmlType(200), &[0u8; 4], &mut out[..1]).unwrap_err();
    assert!(e.to_string().contains("200"), "{e}");
    let e = gguf::dequantize(GgmlType::Q8_0, &[0u8; 33], &mut out[..32]).unwrap_err();
    assert!(e.to_string().contains("33 bytes"), "{e}");
    // Q4_0 nibble order: low nibbles are elements 0..15, high nibbles 16..31; x = (q − 8)·d.
    let mut block = [0u8; 18];
    block[..2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
    block[2] = 0x9F; // element 0: 15 → 3.5, element 16: 9 → 0.5
    gguf::dequantize(GgmlType::Q4_0, &block, &mut out[..32]).unwrap();
    assert_eq!((out[0], out[16], out[1]), (3.5, 0.5, -4.0));
}

#[test]
fn gguf_import_writes_a_folder_that_loads_and_gives_finite_logits() {
    let (out, report) = import("tiny-llama.gguf", "tiny");
    assert_eq!(report.tensors_written, 21);
    assert_eq!(report.tensors_by_type.values().sum::<usize>(), 21);
    assert_eq!(report.tensors_by_type["Q8_0"], 5);
    assert_eq!(report.tokenizer_pre, "smollm");
    assert_eq!((report.tokens, report.special_tokens), (320, 3));
    assert!(report.skipped.is_empty());
    let c = &report.config;
    assert_eq!(report.parameters, c.num_parameters());
    assert!(report.to_string().contains("2 layers"), "{report}");

    let cfg = json_file(&out.join("config.json"));
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["hidden_size"], 32);
    assert_eq!(cfg["intermediate_size"], 256);
    assert_eq!(cfg["num_hidden_layers"], 2);
    assert_eq!(cfg["num_attention_heads"], 4);
    assert_eq!(cfg["num_key_value_heads"], 2);
    assert_eq!(cfg["vocab_size"], 320);
    assert_eq!(cfg["rms_norm_eps"], 1e-5);
    assert_eq!(cfg["rope_theta"], 10000.0);
    assert_eq!(cfg["max_position_embeddings"], 256);
    assert_eq!(cfg["tie_word_embeddings"], false);
    assert_eq!(cfg["rope_scaling"], Json::Null);
    assert_eq!(
        (cfg["bos_token_id"].clone(), cfg["eos_token_id"].clone()),
        (1.into(), 2.into())
    );
    assert_eq!(cfg["torch_dtype"], "bfloat16");

    let model = Llama::load(&out, BaseFormat::Dense).unwrap();
    assert_eq!(&model.config, c);
    let tok = TextTokenizer::load(&out).unwrap();
    assert_eq!(tok.eos_id, Some(2));
    assert_eq!(tok.bos_token.as_deref(), Some("<|im_start|>"));
    let messages = [Message {
        role: "user".into(),
        content: "What is 2+2?".into(),
    }];
    let prompt = tok
        .chat_template
        .as_ref()
        .expect("chat template from tokenizer.chat_template")
        .render(&messages, true)
        .unwrap();
    assert!(prompt.ends_with("<|im_start|>assistant\n"), "{prompt:?}");
    let (ids, _) = tok.encode(&prompt, false).unwrap();
    assert_eq!(ids[0], 1, "<|im_start|> is one special token");
    let logits = model.logits(None, &ids, &[0, ids.len()]).unwrap();
    assert_eq!(logits.len(), ids.len() * 320);
    assert!(logits.iter().all(|v| v.is_finite()));
    assert!(
        logits.iter().any(|v| v.abs() > 1e-3),
        "logits are not all zero"
    );
}

#[test]
fn gguf_import_writes_each_weight_as_bf16_of_the_dequantized_gguf() {
    let (out, _) = import("tiny-llama.gguf", "weights");
    let gold = golden();
    let ckpt = Checkpoint::open_dir(&out).unwrap();
    let pairs = [
        ("token_embd", "model.embed_tokens"),
        ("output_norm", "model.norm"),
        ("output", "lm_head"),
        ("blk.1.attn_norm", "model.layers.1.input_layernorm"),
        ("blk.0.ffn_norm", "model.layers.0.post_attention_layernorm"),
        ("blk.0.attn_v", "model.layers.0.self_attn.v_proj"),
        ("blk.1.attn_output", "model.layers.1.self_attn.o_proj"),
        ("blk.0.ffn_gate", "model.layers.0.mlp.gate_proj"),
        ("blk.1.ffn_up", "model.layers.1.mlp.up_proj"),
        ("blk.0.ffn_down", "model.layers.0.mlp.down_proj"),
        ("blk.1.ffn_down", "model.layers.1.mlp.down_proj"),
    ];
    for (g, hf) in pairs {
        let (key, gold_key) = (format!("{hf}.weight"), format!("dequant.{g}.weight"));
        let t = ckpt.get(&key).unwrap();
        assert_eq!(t.dtype, safetensors::Dtype::BF16, "{hf}");
        let want: Vec<f32> = gold
            .get(&gold_key)
            .unwrap()
            .to_f32()
            .unwrap()
            .iter()
            .map(|&v| bf16::from_f32(v).to_f32())
            .collect();
        assert_eq!(t.to_f32().unwrap(), want, "{hf}");
    }
    assert_eq!(ckpt.names().len(), 21);
}

#[test]
fn gguf_import_undoes_the_qk_row_permutation() {
    let (out, _) = import("tiny-llama.gguf", "qk");
    let gold = golden();
    let ckpt = Checkpoint::open_dir(&out).unwrap();
    for l in 0..2 {
        for (proj, rows) in [("q_proj", 32), ("k_proj", 16)] {
            let name = format!("model.layers.{l}.self_attn.{proj}.weight");
            let got = ckpt.f32(&name, &[rows, 32]).unwrap();
            let want: Vec<f32> = gold
                .f32(&format!("hf.{name}"), &[rows, 32])
                .unwrap()
                .iter()
                .map(|&v| bf16::from_f32(v).to_f32())
                .collect();
            assert_eq!(got, want, "{name}");
            // And the GGUF rows really were permuted (the test would pass vacuously otherwise).
            let raw = GgufFile::open(&fixture("tiny-llama.gguf"))
                .unwrap()
                .dequantize(&format!("blk.{l}.attn_{}.weight", &proj[..1]))
                .unwrap();
            let raw: Vec<f32> = raw.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
            assert_ne!(raw, want, "{name}");
        }
    }
}

#[test]
fn gguf_import_tied_model_with_llama3_rope_scaling_and_bos() {
    let (out, report) = import("tiny-llama-tied.gguf", "tied");
    assert_eq!(report.skipped, ["rope_freqs.weight"]);
    let cfg = json_file(&out.join("config.json"));
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["rope_theta"], 500000.0);
    let rs = &cfg["rope_scaling"];
    assert_eq!(rs["rope_type"], "llama3");
    assert_eq!(rs["factor"], 8.0);
    assert_eq!(rs["low_freq_factor"], 1.0);
    assert_eq!(rs["high_freq_factor"], 4.0);
    assert_eq!(rs["original_max_position_embeddings"], 8192);
    let model = Llama::load(&out, BaseFormat::Dense).unwrap();
    assert!(model.config.tie_word_embeddings);
    assert!(!Checkpoint::open_dir(&out)
        .unwrap()
        .contains("lm_head.weight"));
    let tok = TextTokenizer::load(&out).unwrap();
    let (with, _) = tok.encode("Hello world", true).unwrap();
    let (without, _) = tok.encode("Hello world", false).unwrap();
    assert_eq!(with[0], 0, "llama-bpe adds its BOS by default");
    assert_eq!(&with[1..], &without[..]);
    let logits = model.logits(None, &with, &[0, with.len()]).unwrap();
    assert!(logits.iter().all(|v| v.is_finite()));
}

#[test]
fn gguf_tokenizers_encode_like_hugging_face_for_each_pre_tokenizer() {
    let gold = tokenizer_golden();
    let texts: Vec<&str> = gold["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    for (file, pre) in [
        ("tiny-llama.gguf", "smollm"),
        ("tok-gpt2.gguf", "gpt2"),
        ("tiny-llama-tied.gguf", "llama-bpe"),
        ("tok-default.gguf", "default"),
        ("tok-qwen2.gguf", "qwen2"),
    ] {
        let g = GgufFile::open(&fixture(file)).unwrap();
        let files = tokenizer::build(&g, 512).unwrap();
        assert_eq!(files.pre, pre);
        let tok = tokenizers::Tokenizer::from_str(&files.tokenizer_json.to_string()).unwrap();
        for (i, text) in texts.iter().enumerate() {
            for (special, key) in [(false, "ids"), (true, "ids_special")] {
                let got = tok.encode(*text, special).unwrap().get_ids().to_vec();
                assert_eq!(got, ids(&gold[pre][key][i]), "{pre}, {key}: {text:?}");
            }
            let back = tok.decode(&ids(&gold[pre]["ids"][i]), false).unwrap();
            assert_eq!(back, gold[pre]["decoded"][i], "{pre}: decode");
            if pre != "qwen2" {
                assert_eq!(&back, text, "{pre}: decode");
            }
        }
    }
}

#[test]
fn gguf_import_rejects_other_architectures_naming_them() {
    let out = tmpdir("arch");
    // bad-arch-gemma2.gguf relabelled `gemma` (Gemma 1, which is not read).
    let file = tmpdir("arch-file").join("bad-arch-gemma.gguf");
    crate::gguf_qwen::rewrite(&fixture("bad-arch-gemma2.gguf"), &file, |meta, _| {
        for (k, v) in meta.iter_mut() {
            if k == "general.architecture" {
                *v = Value::String("gemma".into());
            }
        }
    });
    let e = import_gguf(&file, &out).unwrap_err().to_string();
    assert!(e.contains("bad-arch-gemma.gguf"), "{e}");
    assert!(e.contains("architecture `gemma` is not supported"), "{e}");
    assert!(e.contains("llama, qwen2, qwen3, gemma2, gemma3"), "{e}");
    assert!(!out.join("config.json").exists());
    // gemma2 is read; this file has none of its hyperparameters.
    let e = import_gguf(&fixture("bad-arch-gemma2.gguf"), &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad-arch-gemma2.gguf"), "{e}");
    assert!(e.contains("`gemma2.embedding_length` is missing"), "{e}");
    assert!(!out.join("config.json").exists());
}

#[test]
fn gguf_import_rejects_unsupported_tensor_types_naming_tensor_and_type() {
    let out = tmpdir("q2k");
    let e = import_gguf(&fixture("bad-type-q2k.gguf"), &out)
        .unwrap_err()
        .to_string();
    assert!(e.contains("bad-type-q2k.gguf"), "{e}");
    assert!(e.contains("`blk.0.ffn_down.weight` has type Q2_K"), "{e}");
    assert!(!out.join("model.safetensors").exists());
}

#[test]
fn gguf_truncated_or_foreign_files_are_errors_naming_the_file() {
    let dir = tmpdir("truncated");
    let bytes = std::fs::read(fixture("tiny-llama.gguf")).unwrap();
    let header_end = GgufFile::open(&fixture("tiny-llama.gguf"))
        .unwrap()
        .data_offset as usize;
    for (i, cut) in [
        2,
        12,
        30,
        4000,
        header_end - 5,
        header_end + 100,
        bytes.len() - 1,
    ]
    .into_iter()
    .enumerate()
    {
        let p = dir.join(format!("cut{i}.gguf"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = import_gguf(&p, &dir.join("out")).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "cut at {cut}: {e}");
        assert!(e.contains("truncated"), "cut at {cut}: {e}");
    }
    let p = fixture("tiny-llama-golden.safetensors");
    let e = GgufFile::open(&p).err().unwrap().to_string();
    assert!(
        e.contains("tiny-llama-golden.safetensors") && e.contains("not a GGUF file"),
        "{e}"
    );
    let missing = dir.join("missing.gguf");
    let e = import_gguf(&missing, &dir.join("out"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.gguf"), "{e}");
}

/// The real model: SmolLM2-135M-Instruct Q4_1 GGUF against its Hugging Face tokenizer.json.
/// Runs when QLORA_DEMO_ASSETS names a folder holding both files.
#[test]
fn gguf_real_smollm2_135m_instruct() {
    let Some(dir) = std::env::var_os("QLORA_DEMO_ASSETS").map(PathBuf::from) else {
        println!("SKIPPED (set QLORA_DEMO_ASSETS to a folder with SmolLM2-135M-Instruct.Q4_1.gguf and tokenizer.json)");
        return;
    };
    let gguf_path = dir.join("SmolLM2-135M-Instruct.Q4_1.gguf");
    let reference = dir.join("tokenizer.json");
    if !gguf_path.is_file() || !reference.is_file() {
        println!(
            "SKIPPED ({} lacks the GGUF file or tokenizer.json)",
            dir.display()
        );
        return;
    }
    let out = tmpdir("smollm2");
    let t0 = std::time::Instant::now();
    let report = import_gguf(&gguf_path, &out).unwrap();
    println!("{report}\nimport took {:.1?}", t0.elapsed());
    let c = &report.config;
    assert_eq!(
        (
            c.num_layers,
            c.hidden_size,
            c.num_heads,
            c.num_kv_heads,
            c.vocab_size
        ),
        (30, 576, 9, 3, 49152)
    );
    assert!(c.tie_word_embeddings);
    assert_eq!(report.tokenizer_pre, "smollm");

    let theirs = tokenizers::Tokenizer::from_file(&reference).unwrap();
    let ours = TextTokenizer::load(&out).unwrap();
    let texts = [
        "Hello, world! How are you today?",
        "The year 2024 had 366 days; π ≈ 3.14159.",
        "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
        "fn main() { println!(\"{}\", vec![1, 2, 3].iter().sum::<i32>()); }",
        "naïve café, Zürich — 日本語のテキスト, 한국어, Ελληνικά, emoji 🙂🚀",
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
        "   leading spaces\tand\ttabs\n\n\ntrailing   ",
        "I'm sure they'll say it's fine, WE'VE DONE IT'S",
        "<repo_name>qlora-rs<file_sep>src/main.rs<|endoftext|>",
    ];
    for text in texts {
        let want = theirs.encode(text, false).unwrap().get_ids().to_vec();
        let (got, _) = ours.encode(text, false).unwrap();
        assert_eq!(got, want, "{text:?}");
        let want = theirs.encode(text, true).unwrap().get_ids().to_vec();
        assert_eq!(
            ours.encode(text, true).unwrap().0,
            want,
            "{text:?} with specials"
        );
    }
    println!("tokenizer: {} texts encode identically", texts.len());

    let model = Llama::load(&out, BaseFormat::Dense).unwrap();
    let sentence =
        "The cat sat on the mat. It was a sunny day, and the children were playing in the park.";
    let (ids, _) = ours.encode(sentence, false).unwrap();
    let labels: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let loss = model.loss(None, &ids, &labels, &[0, ids.len()]).unwrap();
    let mean = loss.loss_sum / loss.count as f64;
    let ln_v = (c.vocab_size as f64).ln();
    println!(
        "loss of {sentence:?}: {mean:.3} over {} tokens (ln V = {ln_v:.3})",
        loss.count
    );
    assert!(
        mean < 0.5 * ln_v,
        "loss {mean} is not far below ln(V) = {ln_v}"
    );

    let messages = [Message {
        role: "user".into(),
        content: "What is the capital of France?".into(),
    }];
    let prompt = ours
        .chat_template
        .as_ref()
        .unwrap()
        .render(&messages, true)
        .unwrap();
    let (mut ids, _) = ours.encode(&prompt, false).unwrap();
    let n_prompt = ids.len();
    for _ in 0..12 {
        let logits = model.logits(None, &ids, &[0, ids.len()]).unwrap();
        let last = &logits[(ids.len() - 1) * c.vocab_size..];
        let next = last
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |b, (i, &v)| if v > b.1 { (i, v) } else { b })
            .0 as u32;
        ids.push(next);
        if Some(next) == ours.eos_id {
            break;
        }
    }
    let answer = ours.decode(&ids[n_prompt..], true).unwrap();
    println!("greedy answer: {answer:?}");
    assert!(answer.contains("Paris"), "{answer:?}");
}
