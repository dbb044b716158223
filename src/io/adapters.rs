//! PEFT LoRA adapters: `adapter_model.safetensors` (keys
//! `base_model.model.model.layers.<i>.<self_attn|mlp>.<proj>.lora_<A|B>.weight`, f32) and
//! `adapter_config.json`, the files PEFT, vLLM and llama.cpp's converter read.
//!
//! On a multimodal checkpoint's language model (Gemma 3) the keys are PEFT's on
//! Gemma3ForConditionalGeneration, `base_model.model.model.language_model.layers.<i>…`, and
//! `target_modules` is a regex that PEFT matches against whole module names, so that the vision
//! tower's own `q_proj`/`k_proj`/… stay unadapted. Reading, the keys of transformers 4.x's
//! module layout (`base_model.model.language_model.model.layers.<i>…`) are accepted too; an
//! adapter whose `target_modules` is a regex (ours or anyone's) is read by the modules its
//! weights name.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};
use serde_json::{json, Value};

use super::safetensors::Checkpoint;
use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::lora::{LoraConfig, LoraParams, Target};

/// The adapter weights' file name in an adapter folder.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The adapter config's file name in an adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";

fn format_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Format {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

/// Reads the LoRA hyper-parameters of `adapter_config.json`. A regex `target_modules` reads
/// as every projection here ([`load`] takes the adapted ones from the weights).
pub fn read_config(path: &Path) -> Result<LoraConfig> {
    read_config_and_layers(path).map(|(c, _, _)| c)
}

/// The hyper-parameters, `layers_to_transform` (None: every layer), and whether
/// `target_modules` is a regex (the targets are then every projection, to be narrowed by the
/// weights present).
fn read_config_and_layers(path: &Path) -> Result<(LoraConfig, Option<Vec<usize>>, bool)> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let v: Value = serde_json::from_str(&text)
        .map_err(|e| format_err(path, format!("not valid JSON: {e}")))?;
    if let Some(t) = v.get("peft_type").and_then(Value::as_str) {
        if t != "LORA" {
            return Err(format_err(
                path,
                format!("peft_type is {t}; only LORA adapters are supported"),
            ));
        }
    }
    // A field of the wrong type is an error naming it, never its default: `"r": "4"` or
    // `"use_rslora": "true"` would otherwise load as another adapter than the one trained.
    let wrong = |field: &str, want: &str, got: &Value| {
        format_err(path, format!("field `{field}` must be {want}, got {got}"))
    };
    let boolean = |field: &str, default: bool| -> Result<bool> {
        match v.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(wrong(field, "true or false", other)),
        }
    };
    let number = |field: &str, default: f64| -> Result<f64> {
        match v.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(x @ Value::Number(n)) => n.as_f64().ok_or_else(|| wrong(field, "a number", x)),
            Some(other) => Err(wrong(field, "a number", other)),
        }
    };
    for flag in ["use_dora", "fan_in_fan_out"] {
        if boolean(flag, false)? {
            return Err(format_err(path, format!("`{flag}: true` is not supported")));
        }
    }
    let rank = match v.get("r") {
        Some(x) => x
            .as_u64()
            .ok_or_else(|| wrong("r", "a whole number (the rank)", x))? as usize,
        None => return Err(format_err(path, "field `r` (rank) is missing")),
    };
    // PEFT's own defaults for the fields it may leave out.
    let alpha = number("lora_alpha", 8.0)?;
    let regex = matches!(v.get("target_modules"), Some(Value::String(s)) if s != "all-linear");
    let targets = match v.get("target_modules") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|m| {
                m.as_str()
                    .ok_or_else(|| format_err(path, "target_modules must be strings"))
                    .and_then(|s| Target::parse(s).map_err(|e| format_err(path, e.to_string())))
            })
            .collect::<Result<Vec<_>>>()?,
        Some(Value::String(s)) if s == "all-linear" => Target::ALL.to_vec(),
        // A regex over module names: the weights say which modules it matched.
        Some(Value::String(_)) => Target::ALL.to_vec(),
        Some(other) => {
            return Err(format_err(
                path,
                format!(
                    "target_modules {other} is not supported: give a list of projection names \
                     or a regex"
                ),
            ))
        }
        None => return Err(format_err(path, "field `target_modules` is missing")),
    };
    let mut targets = targets;
    targets.sort();
    targets.dedup();
    let cfg = LoraConfig {
        rank,
        alpha,
        rslora: boolean("use_rslora", false)?,
        dropout: number("lora_dropout", 0.0)?,
        targets,
    };
    cfg.validate()
        .map_err(|e| format_err(path, e.to_string()))?;
    let layers = match v.get("layers_to_transform") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(vec![n.as_u64().unwrap_or(0) as usize]),
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|x| {
                    x.as_u64().map(|n| n as usize).ok_or_else(|| {
                        format_err(path, "layers_to_transform must hold layer numbers")
                    })
                })
                .collect::<Result<_>>()?,
        ),
        Some(other) => {
            return Err(format_err(
                path,
                format!("layers_to_transform {other} is not supported"),
            ))
        }
    };
    Ok((cfg, layers, regex))
}

/// The `(layer, projection)` pairs that `names` (an adapter's tensor names) hold LoRA weights
/// for, under `base_model.model.<layers_module>.<i>.<path>.lora_A.weight`; names outside that
/// pattern are left for [`load`] to refuse.
fn adapted_by_weights(
    names: &[&str],
    layers_module: &str,
    model: &LlamaConfig,
) -> Vec<(usize, Target)> {
    let prefix = format!("base_model.model.{layers_module}.");
    let mut found = Vec::new();
    for n in names {
        let Some(rest) = n.strip_prefix(&prefix) else {
            continue;
        };
        let Some((layer, path)) = rest.split_once('.') else {
            continue;
        };
        let (Ok(layer), Some(path)) = (layer.parse::<usize>(), path.strip_suffix(".lora_A.weight"))
        else {
            continue;
        };
        if let Some(&t) = model.targets().iter().find(|t| t.hf_path() == path) {
            found.push((layer, t));
        }
    }
    found.sort();
    found.dedup();
    found
}

/// Loads a PEFT adapter folder for a model of configuration `model`.
pub fn load(dir: &Path, model: &LlamaConfig) -> Result<LoraParams> {
    let config_path = dir.join(CONFIG_FILE);
    let weights = dir.join(WEIGHTS_FILE);
    let (mut cfg, mut layers, regex) = read_config_and_layers(&config_path)?;
    let ckpt = Checkpoint::open_files(std::slice::from_ref(&weights))?;
    let names = ckpt.names();
    // A multimodal model's adapters: PEFT's names on transformers 5's modules, or on 4.x's.
    let layers_module = if model.multimodal
        && names
            .iter()
            .any(|n| n.starts_with("base_model.model.language_model.model.layers."))
    {
        "language_model.model.layers"
    } else {
        model.layers_module()
    };
    if regex {
        let adapted = adapted_by_weights(&names, layers_module, model);
        let mut targets: Vec<Target> = adapted.iter().map(|&(_, t)| t).collect();
        targets.sort();
        targets.dedup();
        let mut on: Vec<usize> = adapted.iter().map(|&(l, _)| l).collect();
        on.dedup();
        if adapted.len() != targets.len() * on.len() || adapted.is_empty() {
            return Err(format_err(
                &config_path,
                format!(
                    "target_modules is a regex, and the weights in {WEIGHTS_FILE} adapt {} \
                     module(s) that are not the same projections on every adapted layer; only \
                     such adapters load",
                    adapted.len()
                ),
            ));
        }
        cfg.targets = targets;
        layers = Some(on);
    }
    let all: Vec<usize> = (0..model.num_layers).collect();
    let mut params = LoraParams::zeros_on_layers(model, cfg, layers.as_deref().unwrap_or(&all))
        .map_err(|e| format_err(&config_path, e.to_string()))?;
    let mut expected = std::collections::HashSet::new();
    for slot in params.slots.clone() {
        for (which, range, shape) in [
            ('A', slot.a.clone(), [params.config.rank, slot.in_features]),
            ('B', slot.b.clone(), [slot.out_features, params.config.rank]),
        ] {
            // Keyed as the file has them (transformers 4.x's modules, maybe), not as we write.
            let key = slot.peft_key(layers_module, which);
            let values = ckpt.f32(&key, &shape)?;
            params.values[range].copy_from_slice(&values);
            expected.insert(key);
        }
    }
    if let Some(extra) = names.into_iter().find(|n| !expected.contains(*n)) {
        return Err(format_err(
            &weights,
            format!(
                "tensor `{extra}` is not a LoRA weight of this model's layers ({} layers under \
                 `{layers_module}`, targets {:?})",
                model.num_layers, params.config.targets
            ),
        ));
    }
    Ok(params)
}

/// The model an adapter names as its base (`base_model_name_or_path` in its config) when that
/// is not `model_dir`: neither the same folder nor a hub id whose last part is the folder's
/// name (compared without case). `None` when they agree or the adapter names none.
pub fn other_base(model_dir: &Path, adapter_dir: &Path) -> Option<String> {
    let config = adapter_dir.join(CONFIG_FILE);
    let named = std::fs::read_to_string(&config)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["base_model_name_or_path"].as_str().map(str::to_string))
        .filter(|n| !n.is_empty())?;
    let canon = |p: &Path| std::fs::canonicalize(p).ok();
    let same_path = canon(Path::new(&named)).is_some_and(|n| Some(n) == canon(model_dir));
    let folder = model_dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().to_lowercase()));
    let tail = named
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_lowercase();
    (!same_path && folder.as_deref() != Some(tail.as_str())).then_some(named)
}

/// Writes `file` atomically: a temporary file in the same folder, then a rename.
pub fn write_atomic(file: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = file.with_extension(format!(
        "{}.tmp",
        file.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    let io = |source| Error::Io {
        path: file.to_path_buf(),
        source,
    };
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, file).map_err(io)
}

/// Saves an adapter in PEFT's layout (f32 weights, `adapter_config.json`).
/// An adapter with a NaN or ±Inf weight is refused (it would load and silently give NaN).
pub fn save(dir: &Path, params: &LoraParams, base_model: Option<&str>) -> Result<()> {
    let bad = params.values.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        let slot = params
            .slots
            .iter()
            .find(|s| {
                params.values[s.a.start..s.b.end]
                    .iter()
                    .any(|v| !v.is_finite())
            })
            .map(|s| format!("; the first in layer {} {:?}", s.layer, s.target))
            .unwrap_or_default();
        return Err(Error::InvalidArgument(format!(
            "not writing the adapter to {}: {bad} of its {} weights are not finite{slot}",
            dir.display(),
            params.values.len()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut tensors: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
    for slot in &params.slots {
        tensors.push((
            params.peft_key(slot, 'A'),
            vec![params.config.rank, slot.in_features],
            &params.values[slot.a.clone()],
        ));
        tensors.push((
            params.peft_key(slot, 'B'),
            vec![slot.out_features, params.config.rank],
            &params.values[slot.b.clone()],
        ));
    }
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(k, shape, data)| {
            let bytes: &[u8] = bytemuck::cast_slice(data);
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|v| (k.clone(), v))
                .map_err(|e| format_err(dir, format!("cannot serialise {k}: {e}")))
        })
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| format_err(dir, format!("cannot serialise the adapter: {e}")))?;
    write_atomic(&dir.join(WEIGHTS_FILE), &bytes)?;
    let c = &params.config;
    let modules: Vec<&str> = c.targets.iter().map(|t| t.module()).collect();
    // Adapters on every layer are PEFT's default; a subset is listed.
    let layers = params.layers();
    let every = layers.len() == params.model_layers;
    let mut layers_to_transform = if every { Value::Null } else { json!(layers) };
    let target_modules = if params.layers_module == "model.layers" {
        json!(modules)
    } else {
        // A multimodal model: a list would adapt the vision tower's like-named modules too, so
        // a regex over the language model's module names (which PEFT matches whole, and which
        // then ignores layers_to_transform: the layers go into the regex).
        let layers = if every {
            r"\d+".to_string()
        } else {
            let l: Vec<String> = layers.iter().map(usize::to_string).collect();
            format!("({})", l.join("|"))
        };
        layers_to_transform = Value::Null;
        let module = params.layers_module.replace('.', r"\.");
        json!(format!(
            r"{module}\.{layers}\.(self_attn|mlp)\.({})",
            modules.join("|")
        ))
    };
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": c.rank,
        "lora_alpha": c.alpha,
        "lora_dropout": c.dropout,
        "use_rslora": c.rslora,
        "target_modules": target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_dora": false,
        "modules_to_save": null,
        "layers_to_transform": layers_to_transform,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    let text = serde_json::to_string_pretty(&config).expect("JSON of plain values");
    write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
}
