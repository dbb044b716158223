//! A multimodal Gemma 3 checkpoint (`model_type` gemma3: a vision tower, its projector and a
//! gemma3_text language model) trains, evaluates, merges, quantizes and exports as its language
//! model, with the tower left as it is. The fixture tiny-gemma3-mm (made by
//! tests/fixtures/make_gemma3_mm_fixtures.py with transformers + PEFT) has tiny-gemma3 as its
//! language model, so everything here is judged against tiny-gemma3; the logits against
//! transformers are in tests/llama.rs (`gemma3_multimodal_checkpoint_matches_transformers_peft`).

use std::path::{Path, PathBuf};

use qlora_rs::io::adapters;
use qlora_rs::io::export;
use qlora_rs::io::safetensors::Checkpoint;
use qlora_rs::model::config::LlamaConfig;
use qlora_rs::model::llama::{BaseFormat, Llama};
use qlora_rs::model::lora::{LoraConfig, LoraParams, Target};
use qlora_rs::ops::rope::RopeScaling;
use qlora_rs::quant::nf4::Nf4Config;
use serde_json::{json, Value};

use crate::common::{llama_fixture as fixture, llama_fixture_json, parse_config};
use crate::gguf_common::{export as export_gguf, opts};
use qlora_rs::model::export_gguf::GgufType;
use qlora_rs::quant::gguf::GgufFile;

fn tmpdir(name: &str) -> PathBuf {
    crate::common::fresh_dir("gemma3-mm", name)
}

/// A copy of `src` whose safetensors tensors are renamed by `rename` and whose config.json is
/// edited by `edit`.
fn copy_with(
    src: &Path,
    out: &Path,
    rename: impl Fn(&str) -> String,
    edit: impl FnOnce(&mut Value),
) -> PathBuf {
    std::fs::create_dir_all(out).unwrap();
    for f in std::fs::read_dir(src).unwrap() {
        let f = f.unwrap();
        let name = f.file_name();
        if name.to_string_lossy().ends_with(".safetensors") {
            let ckpt = Checkpoint::open_files(&[f.path()]).unwrap();
            let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = ckpt
                .names()
                .into_iter()
                .map(|n| {
                    let t = ckpt.get(n).unwrap();
                    (rename(n), t.shape.to_vec(), t.to_f32().unwrap())
                })
                .collect();
            crate::common::write_f32_safetensors(&out.join(&name), &tensors);
        } else {
            std::fs::copy(f.path(), out.join(&name)).unwrap();
        }
    }
    let p = out.join("config.json");
    if p.is_file() {
        let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        edit(&mut c);
        std::fs::write(&p, c.to_string()).unwrap();
    }
    out.to_path_buf()
}

/// transformers 5's module path for a tensor stored under transformers 4.x's name (the rule
/// the fixture script checked transformers to load).
fn module_name(n: &str) -> String {
    for (old, new) in [
        ("language_model.model.", "model.language_model."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("language_model.lm_head.", "lm_head."),
    ] {
        if let Some(rest) = n.strip_prefix(old) {
            return format!("{new}{rest}");
        }
    }
    panic!("unexpected tensor {n}")
}

const IDS: [u32; 13] = [5, 17, 33, 99, 120, 7, 8, 9, 150, 200, 3, 44, 61];

fn logits(dir: &Path, format: BaseFormat, lora: Option<&LoraParams>) -> Vec<f32> {
    let m = Llama::load(dir, format).unwrap();
    m.logits(lora, &IDS, &[0, IDS.len()]).unwrap()
}

#[test]
fn gemma3_multimodal_config_is_its_text_config() {
    let mm = LlamaConfig::from_file(&fixture("tiny-gemma3-mm/config.json")).unwrap();
    let text = LlamaConfig::from_file(&fixture("tiny-gemma3/config.json")).unwrap();
    assert!(mm.multimodal && !text.multimodal);
    assert_eq!(mm.layers_module(), "model.language_model.layers");
    assert_eq!(
        LlamaConfig {
            multimodal: false,
            ..mm
        },
        text
    );
}

/// The hub's Gemma 3 4B config lists five fields of its language model; transformers' class
/// defaults give the rest (checked with transformers 5.24: head_dim 256, 8 heads, 4 kv heads,
/// vocab 262208, scalar 256, bases 1e6/1e4, one layer in six global, tied).
#[test]
fn gemma3_multimodal_short_text_config_takes_transformers_defaults() {
    let v = json!({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "torch_dtype": "bfloat16",
        "text_config": {
            "hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
            "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024
        },
        "vision_config": {"model_type": "siglip_vision_model"}
    });
    let c = parse_config("g3-4b", &v).unwrap();
    assert!(c.multimodal);
    assert_eq!(
        (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size),
        (8, 4, 256, 262_208)
    );
    assert_eq!(c.switches.attn_scale, Some(1.0 / 16.0));
    assert_eq!(c.rope_theta, 1e6);
    assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 8.0 });
    assert_eq!(c.switches.rope_local.as_ref().map(|r| r.0), Some(1e4));
    let global: Vec<usize> = (0..34).filter(|&l| c.window(l).is_none()).collect();
    assert_eq!(global, vec![5, 11, 17, 23, 29]);
    assert_eq!(c.window(0), Some(1024));
    assert!(c.tie_word_embeddings);
    assert_eq!(c.dtype.as_deref(), Some("bfloat16"));
    assert_eq!(c.max_position_embeddings, 131_072);
}

#[test]
fn gemma3_multimodal_configs_we_cannot_read_are_refused_by_name() {
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(Edit, &str)> = vec![
        (
            Box::new(|v| {
                v.as_object_mut().unwrap().remove("text_config");
            }),
            "needs the language model's config in `text_config`",
        ),
        (
            Box::new(|v| v["text_config"]["model_type"] = json!("gemma2")),
            "`text_config.model_type` is `gemma2`",
        ),
        (
            Box::new(|v| v["tie_word_embeddings"] = json!(false)),
            "`tie_word_embeddings` (false) and `text_config.tie_word_embeddings` (true) disagree",
        ),
        (
            Box::new(|v| v["text_config"]["hidden_activation"] = json!("gelu")),
            "config field `text_config.hidden_activation` is `gelu`",
        ),
    ];
    for (edit, want) in cases {
        let mut v = llama_fixture_json("tiny-gemma3-mm/config.json");
        edit(&mut v);
        let err = parse_config("refuse-mm", &v).unwrap_err().to_string();
        assert!(err.contains(want), "{err}\nshould contain: {want}");
        assert!(err.contains("config.json"), "{err} should name the file");
    }
}

/// The language model loads from either tensor layout (the hub's `language_model.model.*`,
/// transformers 5's `model.language_model.*`) with tiny-gemma3's logits exactly; the tower is
/// named in a warning, never loaded; a checkpoint with neither layout is refused.
#[test]
fn gemma3_multimodal_loads_its_language_model_from_either_layout() {
    let dir = tmpdir("layouts");
    let want = logits(&fixture("tiny-gemma3"), BaseFormat::Dense, None);
    let hub = fixture("tiny-gemma3-mm");
    let modern = copy_with(&hub, &dir.join("modern"), module_name, |_| {});
    for m in [&hub, &modern] {
        assert_eq!(logits(m, BaseFormat::Dense, None), want, "{}", m.display());
        let model = Llama::load(m, BaseFormat::Dense).unwrap();
        assert_eq!(model.load_warnings.len(), 1, "{:?}", model.load_warnings);
        let w = &model.load_warnings[0];
        assert!(w.contains("vision tower and projector (23 tensors"), "{w}");
    }
    // The NF4 base is the same too.
    assert_eq!(
        logits(&hub, BaseFormat::Nf4(Nf4Config::default()), None),
        logits(
            &fixture("tiny-gemma3"),
            BaseFormat::Nf4(Nf4Config::default()),
            None
        )
    );
    let flat = copy_with(
        &hub,
        &dir.join("flat"),
        |n| n.replace("language_model.model.", "text."),
        |_| {},
    );
    let err = Llama::load(&flat, BaseFormat::Dense)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no decoder layer is stored under `language_model.model.`"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Adapters on the multimodal model carry PEFT's names (`model.language_model.layers`) and a
/// regex `target_modules` that spares the tower (PEFT loads them with our loss:
/// scripts/check-peft-adapter.sh tiny-gemma3-mm); they read back as written, on a subset of
/// layers too, and adapters keyed by transformers 4.x's module layout read alike.
#[test]
fn gemma3_multimodal_adapters_round_trip_with_peft_names() {
    let dir = tmpdir("adapters");
    let mm = LlamaConfig::from_file(&fixture("tiny-gemma3-mm/config.json")).unwrap();
    let peft = adapters::load(&fixture("tiny-gemma3-mm-lora"), &mm).unwrap();
    let text_cfg = LlamaConfig::from_file(&fixture("tiny-gemma3/config.json")).unwrap();
    let text = adapters::load(&fixture("tiny-gemma3-lora"), &text_cfg).unwrap();
    assert_eq!(peft.values, text.values);
    assert_eq!(peft.layers_module, "model.language_model.layers");

    adapters::save(&dir.join("all"), &peft, None).unwrap();
    let c: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("all/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        c["target_modules"],
        json!(
            r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        )
    );
    assert_eq!(c["layers_to_transform"], Value::Null);
    let keys = Checkpoint::open_files(&[dir.join("all/adapter_model.safetensors")]).unwrap();
    assert!(keys
        .names()
        .contains(&"base_model.model.model.language_model.layers.3.mlp.up_proj.lora_B.weight"));
    let back = adapters::load(&dir.join("all"), &mm).unwrap();
    assert_eq!(
        (back.values, back.config),
        (peft.values.clone(), peft.config.clone())
    );

    // Two layers, two projections: the layers go into the regex.
    let cfg = LoraConfig {
        targets: vec![Target::Q, Target::Down],
        ..peft.config.clone()
    };
    let on: Vec<(usize, Target, usize, usize)> = [1, 3]
        .iter()
        .flat_map(|&l| {
            let mm = &mm;
            cfg.targets.iter().map(move |&t| {
                let (i, o) = t.dims(mm);
                (l, t, i, o)
            })
        })
        .collect();
    let sub = LoraParams {
        layers_module: mm.layers_module(),
        ..LoraParams::init_for(cfg.clone(), &on, mm.num_layers, 3).unwrap()
    };
    adapters::save(&dir.join("sub"), &sub, None).unwrap();
    let c: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("sub/adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        c["target_modules"],
        json!(r"model\.language_model\.layers\.(1|3)\.(self_attn|mlp)\.(q_proj|down_proj)")
    );
    let back = adapters::load(&dir.join("sub"), &mm).unwrap();
    assert_eq!(back.layers(), vec![1, 3]);
    assert_eq!(back.values, sub.values);

    // transformers 4.x's modules: base_model.model.language_model.model.layers.…
    let old = copy_with(
        &fixture("tiny-gemma3-mm-lora"),
        &dir.join("old"),
        |n| n.replace("model.model.language_model.", "model.language_model.model."),
        |_| {},
    );
    let back = adapters::load(&old, &mm).unwrap();
    assert_eq!(back.values, peft.values);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `merge` keeps the checkpoint's layout: the language model's tensors are tiny-gemma3's merge
/// under the hub's names, the tower's are copied (in bf16), the configs say bf16.
#[test]
fn gemma3_multimodal_merge_and_quantize_keep_the_layout() {
    let dir = tmpdir("merge");
    export::merge(
        &fixture("tiny-gemma3-mm"),
        &fixture("tiny-gemma3-mm-lora"),
        &dir.join("mm"),
        false,
    )
    .unwrap();
    export::merge(
        &fixture("tiny-gemma3"),
        &fixture("tiny-gemma3-lora"),
        &dir.join("text"),
        false,
    )
    .unwrap();
    let mm = Checkpoint::open_dir(&dir.join("mm")).unwrap();
    let text = Checkpoint::open_dir(&dir.join("text")).unwrap();
    let input = Checkpoint::open_dir(&fixture("tiny-gemma3-mm")).unwrap();
    assert_eq!(mm.names(), input.names());
    for n in mm.names() {
        let got = mm.get(n).unwrap().bytes;
        match n.strip_prefix("language_model.") {
            Some(rest) => assert_eq!(got, text.get(rest).unwrap().bytes, "{n}"),
            None => {
                let want: Vec<u8> = input
                    .get(n)
                    .unwrap()
                    .to_f32()
                    .unwrap()
                    .iter()
                    .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                    .collect();
                assert_eq!(got, want, "{n}");
            }
        }
    }
    let c: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("mm/config.json")).unwrap())
            .unwrap();
    assert_eq!(c["torch_dtype"], "bfloat16");
    assert_eq!(c["text_config"]["dtype"], "bfloat16");
    assert_eq!(c["model_type"], "gemma3");

    // quantize: the language model's projections in NF4 under the hub's names, the tower in
    // bf16 and named as not converted (transformers 5.24 + bitsandbytes then load the tower as
    // plain Linear layers); it trains as tiny-gemma3 quantized does.
    export::quantize(&fixture("tiny-gemma3-mm"), &dir.join("q-mm")).unwrap();
    export::quantize(&fixture("tiny-gemma3"), &dir.join("q-text")).unwrap();
    let q = Checkpoint::open_dir(&dir.join("q-mm")).unwrap();
    assert!(q.contains("language_model.model.layers.0.self_attn.q_proj.weight.absmax"));
    assert!(!q
        .names()
        .iter()
        .any(|n| n.starts_with("vision_tower.") && n.contains(".weight.")));
    let c: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("q-mm/config.json")).unwrap())
            .unwrap();
    let skip = &c["quantization_config"]["llm_int8_skip_modules"];
    assert!(
        skip.as_array()
            .unwrap()
            .contains(&json!("model.vision_tower")),
        "{skip}"
    );
    let nf4 = BaseFormat::Nf4(Nf4Config::default());
    assert_eq!(
        logits(&dir.join("q-mm"), nf4, None),
        logits(&dir.join("q-text"), nf4, None)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `export-gguf` writes the language model, as llama.cpp's converter does for
/// Gemma3ForConditionalGeneration: the same file as for tiny-gemma3, and a warning that the
/// tower is not in it.
#[test]
fn gemma3_multimodal_gguf_export_is_the_language_model() {
    let dir = tmpdir("gguf");
    let scalar24 = |c: &mut Value| {
        let t = if c.get("text_config").is_some() {
            &mut c["text_config"]
        } else {
            c
        };
        t["query_pre_attn_scalar"] = json!(24);
    };
    let mm = copy_with(
        &fixture("tiny-gemma3-mm"),
        &dir.join("mm"),
        str::to_string,
        scalar24,
    );
    let text = copy_with(
        &fixture("tiny-gemma3"),
        &dir.join("text"),
        str::to_string,
        scalar24,
    );
    let lora = fixture("tiny-gemma3-lora");
    let r = export_gguf(&opts(
        &mm,
        Some(&fixture("tiny-gemma3-mm-lora")),
        &dir.join("mm.gguf"),
        GgufType::F32,
    ))
    .unwrap();
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains("vision tower and projector (23 tensors)")),
        "{:?}",
        r.warnings
    );
    export_gguf(&opts(
        &text,
        Some(&lora),
        &dir.join("text.gguf"),
        GgufType::F32,
    ))
    .unwrap();
    let (a, b) = (
        GgufFile::open(&dir.join("mm.gguf")).unwrap(),
        GgufFile::open(&dir.join("text.gguf")).unwrap(),
    );
    assert_eq!(a.get("general.architecture"), b.get("general.architecture"));
    let names = |g: &GgufFile| g.tensors.iter().map(|t| t.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b));
    for t in &a.tensors {
        assert_eq!(
            a.dequantize(&t.name).unwrap(),
            b.dequantize(&t.name).unwrap(),
            "{}",
            t.name
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
