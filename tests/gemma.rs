//! Gemma 2 and Gemma 3 configs: both transformers dialects read alike, transformers' class
//! defaults applied where a field is absent, every option we do not implement refused by name.
//! (The models themselves are checked against transformers + PEFT in tests/llama.rs.)

use qlora_rs::model::config::{Activation, Arch, LlamaConfig};
use qlora_rs::ops::rope::RopeScaling;
use serde_json::{json, Value};

use crate::common::{llama_fixture as fixture, llama_fixture_json, parse_config};

#[test]
fn gemma2_config_turns_on_every_switch() {
    let c = LlamaConfig::from_file(&fixture("tiny-gemma2/config.json")).unwrap();
    assert_eq!(c.arch, Arch::Gemma2);
    let s = &c.switches;
    assert_eq!(s.act, Activation::GeluTanh);
    assert!(s.norm_unit_offset && s.sandwich_norms);
    assert_eq!(s.embed_scale, Some(96f64.sqrt() as f32));
    assert_eq!(s.attn_scale, Some(20f64.powf(-0.5) as f32));
    assert_eq!((s.attn_softcap, s.final_softcap), (Some(3.0), Some(4.0)));
    assert_eq!(s.sliding_layers, vec![true, false, true]);
    assert_eq!(s.rope_local, None);
    assert_eq!(
        (c.window(0), c.window(1), c.window(2)),
        (Some(7), None, Some(7))
    );
    assert!(c.tie_word_embeddings && !c.qk_norm());
    assert_eq!(c.head_dim, 24);
}

#[test]
fn gemma3_config_has_local_rope_and_head_norms() {
    let c = LlamaConfig::from_file(&fixture("tiny-gemma3/config.json")).unwrap();
    assert_eq!(c.arch, Arch::Gemma3);
    assert!(c.qk_norm());
    assert_eq!(
        (c.switches.attn_softcap, c.switches.final_softcap),
        (None, None)
    );
    assert_eq!(c.rope_theta, 1e6);
    assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 4.0 });
    assert_eq!(c.switches.rope_local, Some((1e4, RopeScaling::None)));
    assert_eq!(c.switches.sliding_layers, vec![true, false, true, false]);
}

/// The same models written as transformers 4.x wrote them (and as many hub configs still are):
/// `rope_theta` + `rope_scaling`, Gemma 3's `rope_local_base_freq` and `sliding_window_pattern`
/// instead of `layer_types`, `torch_dtype`, and Gemma 2's `hidden_act` beside
/// `hidden_activation`.
#[test]
fn transformers_4_dialect_reads_as_the_5_dialect() {
    let mut v = llama_fixture_json("tiny-gemma3/config.json");
    let o = v.as_object_mut().unwrap();
    o.remove("rope_parameters");
    o.remove("layer_types");
    o.remove("_sliding_window_pattern");
    o.insert("rope_theta".into(), json!(1e6));
    o.insert("rope_local_base_freq".into(), json!(1e4));
    o.insert(
        "rope_scaling".into(),
        json!({"rope_type": "linear", "factor": 4.0}),
    );
    o.insert("sliding_window_pattern".into(), json!(2));
    let old = parse_config("g3-4x", &v).unwrap();
    let new = LlamaConfig::from_file(&fixture("tiny-gemma3/config.json")).unwrap();
    assert_eq!(old, new);

    let mut v = llama_fixture_json("tiny-gemma2/config.json");
    let o = v.as_object_mut().unwrap();
    let theta = o["rope_parameters"]["rope_theta"].clone();
    o.remove("rope_parameters");
    o.remove("layer_types");
    o.insert("rope_theta".into(), theta);
    o.insert("hidden_act".into(), json!("gelu_pytorch_tanh"));
    o.insert("torch_dtype".into(), o["dtype"].clone());
    o.remove("dtype");
    let old = parse_config("g2-4x", &v).unwrap();
    let new = LlamaConfig::from_file(&fixture("tiny-gemma2/config.json")).unwrap();
    assert_eq!(old, new);
}

/// Fields a hub config may leave out take transformers' class defaults, not ours: Gemma 2
/// soft-caps at 50 and 30, scales by 256^-1/2, slides 4096 on even layers and ties embeddings;
/// an explicit null turns a soft-cap off.
#[test]
fn absent_gemma_fields_take_transformers_defaults() {
    let mut v = llama_fixture_json("tiny-gemma2/config.json");
    let o = v.as_object_mut().unwrap();
    for k in [
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "query_pre_attn_scalar",
        "sliding_window",
        "layer_types",
        "tie_word_embeddings",
        "hidden_activation",
    ] {
        o.remove(k);
    }
    let c = parse_config("g2-defaults", &v).unwrap();
    assert_eq!(c.switches.attn_softcap, Some(50.0));
    assert_eq!(c.switches.final_softcap, Some(30.0));
    assert_eq!(c.switches.attn_scale, Some(1.0 / 16.0));
    assert_eq!(c.sliding_window, Some(4096));
    assert_eq!(c.switches.sliding_layers, vec![true, false, true]);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.switches.act, Activation::GeluTanh);

    v["final_logit_softcapping"] = Value::Null;
    let c = parse_config("g2-null", &v).unwrap();
    assert_eq!(c.switches.final_softcap, None);
    assert_eq!(c.switches.attn_softcap, Some(50.0));

    // Gemma 3: every sixth layer global; bases 1e6 and 1e4.
    let mut v = llama_fixture_json("tiny-gemma3/config.json");
    let o = v.as_object_mut().unwrap();
    for k in ["layer_types", "rope_parameters", "_sliding_window_pattern"] {
        o.remove(k);
    }
    o.insert("num_hidden_layers".into(), json!(7));
    let c = parse_config("g3-defaults", &v).unwrap();
    assert_eq!(
        c.switches.sliding_layers,
        vec![true, true, true, true, true, false, true]
    );
    assert_eq!(c.rope_theta, 1e6);
    assert_eq!(c.switches.rope_local, Some((1e4, RopeScaling::None)));
}

#[test]
fn gemma_options_we_do_not_implement_are_refused_by_name() {
    type Edit = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "tiny-gemma2",
            Box::new(|v| v["hidden_activation"] = json!("gelu")),
            "`hidden_activation` is `gelu`",
        ),
        (
            "tiny-gemma3",
            Box::new(|v| v["use_bidirectional_attention"] = json!(true)),
            "`use_bidirectional_attention` is true",
        ),
        (
            "tiny-gemma3",
            Box::new(|v| v["rope_parameters"]["full_attention"]["rope_type"] = json!("yarn")),
            "`rope_parameters.full_attention` has rope_type `yarn`",
        ),
        (
            "tiny-gemma2",
            Box::new(|v| v["attn_logit_softcapping"] = json!(-1.0)),
            "`attn_logit_softcapping` must be a positive number",
        ),
        (
            "tiny-gemma2",
            Box::new(|v| v["layer_types"] = json!(["sliding_attention", "full_attention"])),
            "`layer_types` lists 2 layers but num_hidden_layers is 3",
        ),
        (
            "tiny-qwen3",
            Box::new(|v| v["final_logit_softcapping"] = json!(30.0)),
            "soft-capping is read for gemma2 and gemma3_text only, not qwen3",
        ),
    ];
    for (model, edit, want) in cases {
        let mut v = llama_fixture_json(&format!("{model}/config.json"));
        edit(&mut v);
        let err = parse_config("refuse", &v).unwrap_err().to_string();
        assert!(err.contains(want), "{err}\nshould contain: {want}");
        assert!(err.contains("config.json"), "{err} should name the file");
    }
}
