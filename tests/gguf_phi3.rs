//! GGUF for llama.cpp's `phi3` architecture (Phi-3, Phi-3.5, Phi-4-mini), both ways:
//! `export-gguf` of tiny-phi3 writes what llama.cpp's own convert_hf_to_gguf.py
//! (`conversion/phi.py`: `Phi3MiniModel`) writes from the same weights — every `phi3.*` key
//! and every tensor's name, dims, type and bytes (tests/fixtures/gguf/phi3-converter.json,
//! made by tests/fixtures/make_phi3_gguf_reference.py): q/k/v fused as `attn_qkv`, gate/up
//! fused as `ffn_up` ([gate; up]), no row reordering, longrope as `rope_factors_{long,short}`
//! with `rope.scaling.{original_context_length,attn_factor}`, the share of each head RoPE
//! rotates as `rope.dimension_count`; `import-gguf` reads it back into the same weights, an
//! equal config and the same logits (short and long factors, inside and beyond the sliding
//! window); what a Hugging Face Phi-3 cannot hold is refused by name.

use std::path::{Path, PathBuf};

use crate::common::llama_fixture as fixture;
use crate::gguf_common::{
    assert_same_weights, bf16_copy, config, export, fnv1a64, import_refused, opts, same_value, set,
};
use qlora_rs::io::export;
use qlora_rs::model::export_gguf::GgufType;
use qlora_rs::model::import_gguf::import_gguf;
use qlora_rs::model::llama::{BaseFormat, Llama};
use qlora_rs::quant::gguf::{GgmlType, GgufFile, Value};
use serde_json::{json, Value as Json};

use crate::gguf_qwen::rewrite;

fn tmpdir(name: &str) -> PathBuf {
    crate::common::fresh_dir("gguf-phi3", name)
}

fn json_file(p: &Path) -> Json {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Two packed sequences: 20 tokens (within the original context of 32: short factors) and 60
/// (beyond it: long factors); both longer than the sliding window of 11.
fn batch() -> (Vec<u32>, Vec<usize>) {
    let ids = (0..80u32).map(|i| (i * 37 + 11) % 211).collect();
    (ids, vec![0, 20, 80])
}

/// The logits of the model folder `dir` (CPU, f32, dense base) on [`batch`].
fn logits(dir: &Path) -> Vec<f32> {
    let model = Llama::load(dir, BaseFormat::Dense).unwrap();
    let (ids, cu) = batch();
    model.logits(None, &ids, &cu).unwrap()
}

/// The largest difference and the largest magnitude of `want`.
fn max_diff(got: &[f32], want: &[f32]) -> (f32, f32) {
    assert_eq!(got.len(), want.len());
    let d = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let m = want.iter().map(|b| b.abs()).fold(0.0f32, f32::max);
    (d, m)
}

fn expected_tensors(layers: usize) -> Vec<String> {
    let mut v: Vec<String> = [
        "output.weight",
        "output_norm.weight",
        "rope_factors_long.weight",
        "rope_factors_short.weight",
        "token_embd.weight",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for l in 0..layers {
        for p in [
            "attn_norm.weight",
            "attn_output.weight",
            "attn_qkv.weight",
            "ffn_down.weight",
            "ffn_norm.weight",
            "ffn_up.weight",
        ] {
            v.push(format!("blk.{l}.{p}"));
        }
    }
    v.sort();
    v
}

#[test]
fn gguf_phi3_export_and_import_round_trip_the_logits() {
    let dir = tmpdir("roundtrip");
    let model = fixture("tiny-phi3");
    let lora = fixture("tiny-phi3-lora");
    for adapter in [None, Some(lora.as_path())] {
        let case = format!("phi3{}", if adapter.is_some() { "+lora" } else { "" });
        let gguf = dir.join(format!("{case}.gguf"));
        let r = export(&opts(&model, adapter, &gguf, GgufType::F32)).unwrap();
        assert_eq!(r.arch, "phi3");
        assert_eq!(r.merged > 0, adapter.is_some(), "{case}");
        // llama.cpp's phi3 does not slide (it logs so and attends to the whole context).
        assert_eq!(r.warnings.len(), 1, "{case}: {:?}", r.warnings);
        assert!(
            r.warnings[0].contains("sliding_window 11"),
            "{:?}",
            r.warnings
        );

        let g = GgufFile::open(&gguf).unwrap();
        assert_eq!(
            g.get("general.architecture").and_then(Value::as_str),
            Some("phi3")
        );
        let mut names: Vec<String> = g.tensors.iter().map(|t| t.name.clone()).collect();
        names.sort();
        assert_eq!(names, expected_tensors(2), "{case}");
        for t in &g.tensors {
            assert_eq!(t.ggml_type, GgmlType::F32, "{}", t.name);
        }
        // Fused as in the Hugging Face model, rows as stored (llama.cpp's phi3 rotates halves).
        assert_eq!(
            g.tensor("blk.0.attn_qkv.weight").unwrap().shape(),
            vec![96 + 2 * 48, 96]
        );
        assert_eq!(
            g.tensor("blk.1.ffn_up.weight").unwrap().shape(),
            vec![2 * 172, 96]
        );
        let short = g.dequantize("rope_factors_short.weight").unwrap();
        let want: Vec<f32> = [1.0, 1.05, 1.1, 1.25, 1.5, 1.8, 2.2, 2.7, 3.3]
            .iter()
            .map(|&x: &f64| x as f32)
            .collect();
        assert_eq!(short, want);

        // What the import must give: merge's output, or the weights rounded to bf16.
        let reference = dir.join(format!("ref-{case}"));
        match adapter {
            Some(a) => {
                export::merge(&model, a, &reference, false).unwrap();
            }
            None => bf16_copy(&model, &reference),
        }
        let back = dir.join(format!("back-{case}"));
        let report = import_gguf(&gguf, &back).unwrap();
        assert_eq!(report.architecture, "phi3");
        assert!(report.zero_filled.is_empty());
        let mut skipped = report.skipped.clone();
        skipped.sort();
        assert_eq!(
            skipped,
            vec!["rope_factors_long.weight", "rope_factors_short.weight"]
        );
        assert_same_weights(&back, &reference, &case);
        assert_eq!(config(&back), config(&model), "{case}");
        let c = json_file(&back.join("config.json"));
        assert_eq!(c["architectures"], json!(["Phi3ForCausalLM"]));
        assert_eq!(c["model_type"], "phi3");
        assert_eq!(c["partial_rotary_factor"], 0.75);
        assert_eq!(c["original_max_position_embeddings"], 32);
        assert_eq!(c["max_position_embeddings"], 128);
        assert_eq!(c["sliding_window"], 11);
        assert_eq!(c["rope_scaling"]["type"], "longrope");
        let original = json_file(&model.join("config.json"));
        assert_eq!(
            c["rope_scaling"]["long_factor"],
            original["rope_parameters"]["long_factor"]
        );
        assert_eq!(
            c["rope_scaling"]["short_factor"],
            original["rope_parameters"]["short_factor"]
        );

        // The imported model runs as the weights it was exported from.
        let (got, want) = (logits(&back), logits(&reference));
        let (d, m) = max_diff(&got, &want);
        println!("{case}: f32 round trip: logits differ by at most {d:.2e} (max |logit| {m:.2})");
        assert!(d <= 1e-5, "{case}: logits differ by {d}");
        if adapter.is_none() {
            // And as the original f32 model, up to the bf16 rounding of its weights (which the
            // export applies, as merge does; the tiny random model amplifies it to ~2% of the
            // largest logit).
            let (d, m) = max_diff(&got, &logits(&model));
            println!("{case}: against the f32 original: {d:.2e} (max |logit| {m:.2})");
            assert!(d <= 0.04 * m, "{case}: {d} vs {m}");
        }
        // The tokenizer comes back (tiny-llama's byte-level BPE).
        let theirs = qlora_rs::data::tokenizer::TextTokenizer::load(&model).unwrap();
        let ours = qlora_rs::data::tokenizer::TextTokenizer::load(&back).unwrap();
        for text in ["Hello, world! 12345", "<|user|>\nhi<|end|>\n"] {
            assert_eq!(
                ours.encode(text, false).unwrap().0,
                theirs.encode(text, false).unwrap().0,
                "{text:?}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gguf_phi3_quantized_round_trip_within_the_types_error() {
    let dir = tmpdir("quant");
    let model = fixture("tiny-phi3");
    let reference = dir.join("ref");
    bf16_copy(&model, &reference);
    let want = logits(&reference);
    // Rows of 172 values (ffn_down) are not Q8_0 blocks of 32: refused, as llama.cpp has no
    // fallback for it either.
    let e = export(&opts(&model, None, &dir.join("q8.gguf"), GgufType::Q8_0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("ffn_down") && e.contains("172"), "{e}");
    // q6_k: llama-quantize's fallbacks make it Q8_0 where rows of 96 are not 256-blocks and
    // F16 for ffn_down (172 is not a multiple of 32) — the q8_0 mix this model can have.
    // Bound: about twice the bf16 rounding's effect on this model (~2%, see the f32 round trip)
    // for Q8_0's coarser steps.
    for (ty, bound) in [(GgufType::Q6K, 0.08f32)] {
        let out = dir.join(format!("{ty}.gguf"));
        let r = export(&opts(&model, None, &out, ty)).unwrap();
        let g = GgufFile::open(&out).unwrap();
        for t in &g.tensors {
            let expect = if t.dims.len() == 1 {
                GgmlType::F32
            } else if t.name.ends_with("ffn_down.weight") {
                GgmlType::F16
            } else {
                GgmlType::Q8_0
            };
            assert_eq!(t.ggml_type, expect, "{ty}: {}", t.name);
        }
        let back = dir.join(format!("back-{ty}"));
        import_gguf(&out, &back).unwrap();
        assert_eq!(config(&back), config(&model), "{ty}");
        let (d, m) = max_diff(&logits(&back), &want);
        println!(
            "{ty}: {:?}; logits differ by at most {d:.2e} (max |logit| {m:.2})",
            r.tensors_by_type
        );
        assert!(d <= bound * m, "{ty}: {d} vs {m}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gguf_phi3_export_equals_llama_cpps_converter() {
    // tests/fixtures/gguf/phi3-converter.json: llama.cpp's convert_hf_to_gguf.py (0.3.36's
    // vendored llama.cpp) on tiny-phi3 with its weights rounded to bf16, --outtype bf16,
    // vocabulary aside (make_phi3_gguf_reference.py).
    let reference = json_file(
        &qlora_rs::testing::project_root().join("tests/fixtures/gguf/phi3-converter.json"),
    );
    let want = &reference["phi3"];
    let dir = tmpdir("converter");
    let out = dir.join("phi3.gguf");
    export(&opts(&fixture("tiny-phi3"), None, &out, GgufType::Bf16)).unwrap();
    let g = GgufFile::open(&out).unwrap();
    let keys = want["keys"].as_object().unwrap();
    for (k, j) in keys {
        let v = g
            .get(k)
            .unwrap_or_else(|| panic!("the converter writes `{k}`, we do not"));
        assert!(same_value(v, j), "`{k}`: ours {v:?}, converter {j}");
    }
    // No phi3.* key beyond the converter's.
    let extra: Vec<&str> = g
        .metadata
        .iter()
        .map(|(k, _)| k.as_str())
        .filter(|k| k.starts_with("phi3.") && !keys.contains_key(*k))
        .collect();
    assert!(extra.is_empty(), "{extra:?}");
    // The same tensors: names, dims, types and bytes.
    let tensors = want["tensors"].as_array().unwrap();
    assert_eq!(g.tensors.len(), tensors.len());
    for t in tensors {
        let name = t["name"].as_str().unwrap();
        let ours = g.tensor(name).unwrap_or_else(|| panic!("no `{name}`"));
        let want_dims: Vec<usize> = t["dims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(ours.dims, want_dims, "{name}");
        assert_eq!(ours.ggml_type.name(), t["type"].as_str().unwrap(), "{name}");
        assert_eq!(
            fnv1a64(g.tensor_bytes(ours)),
            t["fnv1a64"].as_str().unwrap(),
            "`{name}` holds other bytes than the converter's"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gguf_phi3_import_refuses_what_it_cannot_represent_by_name() {
    let dir = tmpdir("refusals");
    let src = dir.join("phi3.gguf");
    export(&opts(&fixture("tiny-phi3"), None, &src, GgufType::Bf16)).unwrap();
    let case = |name: &str| dir.join(format!("{name}.gguf"));

    // An attention factor other than the one transformers derives.
    let p = case("attn-factor");
    rewrite(&src, &p, |m, _| {
        set(m, "phi3.rope.scaling.attn_factor", Value::F32(1.5))
    });
    import_refused(&p, &["`phi3.rope.scaling.attn_factor` is 1.5", "1.1832"]);
    // One longrope factor tensor without the other.
    let p = case("no-short");
    rewrite(&src, &p, |_, t| {
        t.retain(|(x, _)| x.name != "rope_factors_short.weight")
    });
    import_refused(&p, &["tensor `rope_factors_short.weight` is missing"]);
    // Factors of the wrong length for the rotated width.
    let p = case("dims");
    rewrite(&src, &p, |m, _| {
        set(m, "phi3.rope.dimension_count", Value::U32(16))
    });
    import_refused(
        &p,
        &[
            "tensor `rope_factors_long.weight` has 9 values",
            "8 positive",
        ],
    );
    // A rope scaling type llama.cpp's phi3 does not read from factors.
    let p = case("yarn");
    rewrite(&src, &p, |m, _| {
        set(m, "phi3.rope.scaling.type", Value::String("linear".into()));
        set(m, "phi3.rope.scaling.factor", Value::F32(2.0));
    });
    import_refused(&p, &["phi3.rope.scaling.type", "longrope"]);
    // Separate q/k/v (llama.cpp's loader would take them; a Hugging Face Phi-3 has qkv_proj).
    let p = case("split-q");
    rewrite(&src, &p, |_, t| {
        let i = t
            .iter()
            .position(|(x, _)| x.name == "blk.0.attn_qkv.weight")
            .unwrap();
        t[i].0.name = "blk.0.attn_q.weight".into();
    });
    import_refused(
        &p,
        &[
            "tensor `blk.0.attn_q.weight` has no counterpart",
            "Phi3ForCausalLM",
        ],
    );
    // A fused tensor of the wrong height: ffn_up must hold gate and up.
    let p = case("up-half");
    rewrite(&src, &p, |_, t| {
        let i = t
            .iter()
            .position(|(x, _)| x.name == "blk.1.ffn_up.weight")
            .unwrap();
        t[i].0.shape = vec![172, 96];
        t[i].1.truncate(172 * 96 * 2);
    });
    import_refused(
        &p,
        &[
            "tensor `blk.1.ffn_up.weight` has shape [172, 96]",
            "[344, 96]",
        ],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gguf_phi3_export_refuses_what_llama_cpp_cannot_hold() {
    let dir = tmpdir("export-refusals");
    // A head width other than hidden / heads: llama.cpp's phi3 has a [hidden, hidden] output.
    let model = dir.join("wide-heads");
    std::fs::create_dir_all(&model).unwrap();
    for f in std::fs::read_dir(fixture("tiny-phi3")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), model.join(f.file_name())).unwrap();
    }
    let mut c = json_file(&model.join("config.json"));
    c["head_dim"] = json!(32);
    c["rope_parameters"]["long_factor"] = json!(vec![1.0; 12]);
    c["rope_parameters"]["short_factor"] = json!(vec![1.0; 12]);
    std::fs::write(model.join("config.json"), c.to_string()).unwrap();
    let e = export(&opts(&model, None, &dir.join("x.gguf"), GgufType::F32))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("head_dim 32") && e.contains("hidden_size 96") && e.contains("phi3"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
