//! Writing models: `merge` (adapter folded into the base, bf16 safetensors that transformers
//! loads as a plain model) and `quantize` (a bitsandbytes 4-bit NF4 checkpoint that
//! transformers + bitsandbytes load, and that `train --model` loads without re-quantizing).
//!
//! Both read the input one tensor at a time and write shards like the input's (the same tensor
//! → file grouping and `model.safetensors.index.json`), with config.json adjusted and the
//! tokenizer files copied.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::Dtype;
use serde_json::{json, Value};

use super::adapters;
use super::safetensors::Checkpoint;
use super::writer::{self, bf16_bytes, f32_bytes, Entry};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::lora::{LoraParams, Target};
use crate::ops::matmul::{gemm, Mat};
use crate::quant::bnb;
use crate::quant::nf4::{Absmax, Nf4Config, Nf4Tensor};
use crate::tensor::{DType, Tensor};

/// Files copied from the model folder as they are.
const SIDE_FILES: [&str; 6] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
    "vocab.json",
];

/// What an export wrote.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExportReport {
    /// Tensors written, over all shards.
    pub tensors: usize,
    /// safetensors files written.
    pub shards: usize,
    /// Tensor data written, bytes (headers not counted); the index's `total_size` when sharded.
    pub bytes: u64,
    /// Projections changed (merged adapters or quantized weights).
    pub projections: usize,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The projection and its base tensor name, for every quantizable weight of the model.
fn projections(cfg: &LlamaConfig) -> Vec<(String, usize, Target)> {
    (0..cfg.num_layers)
        .flat_map(|l| {
            cfg.targets()
                .iter()
                .map(move |&t| (format!("model.layers.{l}.{}", t.hf_path()), l, t))
        })
        .collect()
}

/// Which output file each tensor goes to: the input's grouping, or one `model.safetensors`.
fn shard_plan(model_dir: &Path) -> Result<Option<HashMap<String, String>>> {
    let index = model_dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&index).map_err(io(&index))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::Format {
        path: index.clone(),
        msg: format!("not valid JSON: {e}"),
    })?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::Format {
            path: index.clone(),
            msg: "no weight_map".into(),
        })?;
    Ok(Some(
        map.iter()
            .map(|(k, f)| (k.clone(), f.as_str().unwrap_or("").to_string()))
            .collect(),
    ))
}

fn prepare_out(out: &Path) -> Result<()> {
    if out.join("config.json").exists() {
        return Err(Error::InvalidArgument(format!(
            "{} already holds a model (config.json); choose an empty folder",
            out.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(io(out))
}

fn copy_side_files(model_dir: &Path, out: &Path) -> Result<()> {
    for f in SIDE_FILES {
        let src = model_dir.join(f);
        if src.is_file() {
            std::fs::copy(&src, out.join(f)).map_err(io(&src))?;
        }
    }
    Ok(())
}

/// Writes `entries` into files per `plan` (or one file), with an index when sharded.
fn write_shards(
    out: &Path,
    entries: Vec<Entry>,
    plan: Option<&HashMap<String, String>>,
    mut produce: impl FnMut(&Entry) -> Result<Vec<u8>>,
) -> Result<ExportReport> {
    let mut files: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    for e in entries {
        // A tensor the input did not list (e.g. bnb's extra tensors) follows its weight.
        let file = match plan {
            Some(p) => {
                let base = e
                    .name
                    .split(".weight")
                    .next()
                    .unwrap_or(&e.name)
                    .to_string()
                    + ".weight";
                p.get(&e.name)
                    .or_else(|| p.get(&base))
                    .cloned()
                    .unwrap_or_else(|| "model.safetensors".into())
            }
            None => "model.safetensors".into(),
        };
        files.entry(file).or_default().push(e);
    }
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let mut report = ExportReport::default();
    let mut weight_map = serde_json::Map::new();
    for (file, list) in &files {
        let path = out.join(file);
        writer::write(&path, list, &meta, &mut produce)?;
        report.shards += 1;
        report.tensors += list.len();
        report.bytes += list.iter().map(|e| e.bytes() as u64).sum::<u64>();
        for e in list {
            weight_map.insert(e.name.clone(), json!(file));
        }
    }
    if plan.is_some() {
        let index = json!({"metadata": {"total_size": report.bytes}, "weight_map": weight_map});
        adapters::write_atomic(
            &out.join("model.safetensors.index.json"),
            index.to_string().as_bytes(),
        )?;
    }
    Ok(report)
}

fn write_config(
    model_dir: &Path,
    out: &Path,
    edit: impl FnOnce(&mut serde_json::Map<String, Value>),
) -> Result<()> {
    let path = model_dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let mut v: Value = serde_json::from_str(&text).map_err(|e| Error::Format {
        path: path.clone(),
        msg: format!("not valid JSON: {e}"),
    })?;
    let obj = v.as_object_mut().ok_or_else(|| Error::Format {
        path: path.clone(),
        msg: "not a JSON object".into(),
    })?;
    edit(obj);
    let text = serde_json::to_string_pretty(&v).expect("JSON value");
    adapters::write_atomic(&out.join("config.json"), text.as_bytes())
}

/// A multimodal config's `text_config` states the dtype the output is written in (bf16) where
/// it states one.
fn text_config_dtype(c: &mut serde_json::Map<String, Value>) {
    if let Some(t) = c.get_mut("text_config").and_then(Value::as_object_mut) {
        for key in ["dtype", "torch_dtype"] {
            if let Some(v) = t.get_mut(key) {
                *v = json!("bfloat16");
            }
        }
    }
}

/// The base weight of a projection in f32, as trained on: NF4 round trip of the original
/// (unless `onto_original`), or the pre-quantized checkpoint's NF4 dequantized.
fn base_weight(
    ckpt: &Checkpoint,
    prequantized: bool,
    name: &str,
    shape: &[usize],
    onto_original: bool,
    nf4: Nf4Config,
) -> Result<Vec<f32>> {
    if prequantized {
        return bnb::load_nf4(ckpt, name, shape)?
            .dequantize(DType::F32)?
            .to_vec();
    }
    let w = ckpt.f32(&format!("{name}.weight"), shape)?;
    if onto_original {
        return Ok(w);
    }
    let t = Tensor::from_vec(w, shape, &Device::Cpu)?;
    Nf4Tensor::quantize(&t, nf4)?
        .dequantize(DType::F32)?
        .to_vec()
}

/// A model folder with an optional adapter folded in, read one tensor at a time in f32:
/// `W' = W + s·B·A` for every adapted projection. `W` is the NF4-dequantized base the adapter
/// was trained on (bit-for-bit what training used), or with `onto_original` (and always without
/// an adapter) the input's own weights; a bitsandbytes 4-bit input has only its NF4 weights.
pub(crate) struct MergedModel {
    /// The model's configuration.
    pub cfg: LlamaConfig,
    ckpt: Checkpoint,
    lora: Option<LoraParams>,
    prequantized: bool,
    onto_original: bool,
    /// `….weight` of every projection → (layer, target).
    proj: HashMap<String, (usize, Target)>,
}

impl MergedModel {
    /// Opens `model_dir` and, when given, the adapter in `adapter_dir` (checked against the
    /// model's shapes).
    pub fn open(
        model_dir: &Path,
        adapter_dir: Option<&Path>,
        onto_original: bool,
    ) -> Result<MergedModel> {
        let cfg = LlamaConfig::from_file(&model_dir.join("config.json"))?;
        let ckpt = Checkpoint::open_model(model_dir, cfg.multimodal)?;
        let lora = adapter_dir.map(|d| adapters::load(d, &cfg)).transpose()?;
        let prequantized = bnb::is_bnb_4bit(cfg.quantization_config.as_ref())?;
        if prequantized && onto_original {
            return Err(Error::InvalidArgument(
                "--onto-original needs an unquantized model folder; this one is a bitsandbytes 4-bit checkpoint".into(),
            ));
        }
        let proj = projections(&cfg)
            .into_iter()
            .map(|(n, l, t)| (format!("{n}.weight"), (l, t)))
            .collect();
        Ok(MergedModel {
            cfg,
            ckpt,
            lora,
            prequantized,
            onto_original,
            proj,
        })
    }

    /// The name `name` (of [`MergedModel::tensors`]) has in the input's files (a multimodal
    /// checkpoint's language model stores its tensors under another prefix).
    pub fn stored_name(&self, name: &str) -> String {
        self.ckpt.stored_name(name).to_string()
    }

    /// Whether `name` is outside the language model of a multimodal checkpoint (its vision
    /// tower or projector).
    pub fn outside_text_model(&self, name: &str) -> bool {
        self.ckpt.outside_text_model(name)
    }

    /// Every tensor of the plain model (bitsandbytes' quantization state left out) with its
    /// row-major shape, in the checkpoint's order; a multimodal checkpoint's language model
    /// under the names it is read by (`model.…`), the rest under their own.
    pub fn tensors(&self) -> Result<Vec<(String, Vec<usize>)>> {
        let mut out = Vec::new();
        for name in self.ckpt.names() {
            if self.prequantized && name.contains(".weight.") {
                continue;
            }
            let shape = match self.proj.get(name) {
                Some(&(_, target)) => {
                    let (i, o) = target.dims(&self.cfg);
                    vec![o, i]
                }
                None => self.ckpt.get(name)?.shape.to_vec(),
            };
            out.push((name.to_string(), shape));
        }
        Ok(out)
    }

    /// The tensor `name` (of [`MergedModel::tensors`]) in f32, and whether an adapter was
    /// folded into it.
    pub fn tensor(&self, name: &str, shape: &[usize]) -> Result<(Vec<f32>, bool)> {
        let Some(&(layer, target)) = self.proj.get(name) else {
            return Ok((self.ckpt.get(name)?.to_f32()?, false));
        };
        let prefix = name.trim_end_matches(".weight");
        let original = self.onto_original || self.lora.is_none();
        let mut w = base_weight(
            &self.ckpt,
            self.prequantized,
            prefix,
            shape,
            original,
            Nf4Config::default(),
        )?;
        let Some(lora) = &self.lora else {
            return Ok((w, false));
        };
        let Some(s) = lora.slot(layer, target) else {
            return Ok((w, false));
        };
        let slot = &lora.slots[s];
        let r = lora.config.rank;
        // W += s · B[out, r] · A[r, in]
        gemm(
            Mat::new(&lora.values[slot.b.clone()], slot.out_features, r),
            Mat::new(&lora.values[slot.a.clone()], r, slot.in_features),
            &mut w,
            lora.config.scale(),
            1.0,
        );
        Ok((w, true))
    }
}

/// Folds `adapter` into the model of `model_dir` ([`MergedModel`]), written as bf16.
pub fn merge(
    model_dir: &Path,
    adapter_dir: &Path,
    out: &Path,
    onto_original: bool,
) -> Result<ExportReport> {
    let model = MergedModel::open(model_dir, Some(adapter_dir), onto_original)?;
    prepare_out(out)?;
    // Written under the input's own names (a multimodal checkpoint keeps its layout).
    let mut read_as = HashMap::new();
    let entries = model
        .tensors()?
        .into_iter()
        .map(|(name, shape)| {
            let stored = model.stored_name(&name);
            read_as.insert(stored.clone(), name);
            Entry {
                name: stored,
                dtype: Dtype::BF16,
                shape,
            }
        })
        .collect();
    let plan = shard_plan(model_dir)?;
    let mut merged = 0;
    let mut report = write_shards(out, entries, plan.as_ref(), |e| {
        let (w, adapted) = model.tensor(&read_as[&e.name], &e.shape)?;
        merged += usize::from(adapted);
        Ok(bf16_bytes(&w))
    })?;
    report.projections = merged;
    write_config(model_dir, out, |c| {
        c.remove("quantization_config");
        c.remove("dtype");
        c.insert("torch_dtype".into(), json!("bfloat16"));
        text_config_dtype(c);
    })?;
    copy_side_files(model_dir, out)?;
    Ok(report)
}

/// The bitsandbytes tensors of one quantized weight (names relative to `prefix.weight`).
fn bnb_entries(prefix: &str, q: &Nf4Tensor) -> Vec<Entry> {
    let n = q.elem_count();
    let nb = q.nblocks();
    let e = |suffix: &str, dtype: Dtype, shape: Vec<usize>| Entry {
        name: format!("{prefix}.weight{suffix}"),
        dtype,
        shape,
    };
    vec![
        e("", Dtype::U8, vec![n.div_ceil(2), 1]),
        e(".absmax", Dtype::U8, vec![nb]),
        e(".quant_map", Dtype::F32, vec![16]),
        e(".nested_absmax", Dtype::F32, vec![nb.div_ceil(256)]),
        e(".nested_quant_map", Dtype::F32, vec![256]),
        e(
            ".quant_state.bitsandbytes__nf4",
            Dtype::U8,
            vec![quant_state_json(q).len()],
        ),
    ]
}

fn dtype_torch_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// The JSON bitsandbytes keeps in `…quant_state.bitsandbytes__nf4`.
fn quant_state_json(q: &Nf4Tensor) -> Vec<u8> {
    let offset = match &q.absmax {
        Absmax::Double { offset, .. } => offset.to_vec::<f32>().map(|v| v[0]).unwrap_or(0.0),
        Absmax::Plain(_) => 0.0,
    };
    format!(
        "{{\"quant_type\": \"nf4\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": {:?}, \"nested_blocksize\": 256, \"nested_dtype\": \"float32\", \"nested_offset\": {}}}",
        q.blocksize,
        dtype_torch_name(q.dtype),
        q.shape,
        offset as f64
    )
    .into_bytes()
}

/// Writes a bitsandbytes 4-bit NF4 (double-quantized, blocksize 64) checkpoint of the model in
/// `model_dir`: the seven projections of every layer quantized, everything else bf16.
pub fn quantize(model_dir: &Path, out: &Path) -> Result<ExportReport> {
    let cfg = LlamaConfig::from_file(&model_dir.join("config.json"))?;
    if bnb::is_bnb_4bit(cfg.quantization_config.as_ref())? {
        return Err(Error::InvalidArgument(format!(
            "{} is already a bitsandbytes 4-bit checkpoint",
            model_dir.display()
        )));
    }
    let ckpt = Checkpoint::open_model(model_dir, cfg.multimodal)?;
    prepare_out(out)?;
    let proj: HashMap<String, (usize, Target)> = projections(&cfg)
        .into_iter()
        .map(|(n, l, t)| (n, (l, t)))
        .collect();
    let dtype_of = |d: Dtype| match d {
        Dtype::F16 => DType::F16,
        Dtype::F32 => DType::F32,
        _ => DType::BF16,
    };
    let mut entries = Vec::new();
    // Keyed by the names in the output's files (the input's own names; a multimodal
    // checkpoint's language model is read under `model.…`): what each is read as.
    let mut quantized: HashMap<String, Nf4Tensor> = HashMap::new();
    let mut read_as: HashMap<String, String> = HashMap::new();
    let nf4 = Nf4Config::default();
    for name in ckpt.names() {
        let stored = ckpt.stored_name(name);
        read_as.insert(stored.to_string(), name.to_string());
        let prefix = name.trim_end_matches(".weight");
        match proj.get(prefix) {
            Some(&(_, target)) if name.ends_with(".weight") => {
                let (i, o) = target.dims(&cfg);
                let t = ckpt.get(name)?;
                let w = Tensor::from_vec(ckpt.f32(name, &[o, i])?, &[o, i], &Device::Cpu)?;
                // The weight's own dtype is what bitsandbytes records (and quantizes from).
                let w = match dtype_of(t.dtype) {
                    DType::BF16 => Tensor::from_vec(
                        w.to_vec::<f32>()?
                            .into_iter()
                            .map(half::bf16::from_f32)
                            .collect(),
                        &[o, i],
                        &Device::Cpu,
                    )?,
                    DType::F16 => Tensor::from_vec(
                        w.to_vec::<f32>()?
                            .into_iter()
                            .map(half::f16::from_f32)
                            .collect(),
                        &[o, i],
                        &Device::Cpu,
                    )?,
                    _ => w,
                };
                let q = Nf4Tensor::quantize(&w, nf4)?;
                let stored_prefix = stored.trim_end_matches(".weight");
                entries.extend(bnb_entries(stored_prefix, &q));
                quantized.insert(stored_prefix.to_string(), q);
            }
            _ => entries.push(Entry {
                name: stored.to_string(),
                dtype: Dtype::BF16,
                shape: ckpt.get(name)?.shape.to_vec(),
            }),
        }
    }
    let plan = shard_plan(model_dir)?;
    let plain = |stored: &str| -> Result<Vec<u8>> {
        Ok(bf16_bytes(&ckpt.get(&read_as[stored])?.to_f32()?))
    };
    let mut report = write_shards(out, entries, plan.as_ref(), |e| {
        let Some(idx) = e.name.find(".weight") else {
            return plain(&e.name);
        };
        let (prefix, suffix) = (&e.name[..idx], &e.name[idx + ".weight".len()..]);
        let Some(q) = quantized.get(prefix) else {
            return plain(&e.name);
        };
        let Absmax::Double {
            q: qa,
            absmax2,
            code2,
            ..
        } = &q.absmax
        else {
            unreachable!("quantized with double quantization")
        };
        Ok(match suffix {
            "" => q.packed.to_vec::<u8>()?,
            ".absmax" => qa.to_vec::<u8>()?,
            ".quant_map" => f32_bytes(&q.code),
            ".nested_absmax" => f32_bytes(&absmax2.to_vec::<f32>()?),
            ".nested_quant_map" => f32_bytes(&code2.to_vec::<f32>()?),
            ".quant_state.bitsandbytes__nf4" => quant_state_json(q),
            _ => plain(&e.name)?,
        })
    })?;
    report.projections = quantized.len();
    // transformers would turn every Linear into a 4-bit one on loading, the vision tower's too
    // (which stays bf16 here): those are named as not converted, by the module paths of
    // transformers 5 (matched from the start) and of 4.x (matched as substrings).
    let skip = if cfg.multimodal {
        json!([
            "lm_head",
            "model.vision_tower",
            "model.multi_modal_projector",
            "vision_tower",
            "multi_modal_projector"
        ])
    } else {
        Value::Null
    };
    write_config(model_dir, out, |c| {
        c.remove("torch_dtype");
        c.insert("dtype".into(), json!("bfloat16"));
        text_config_dtype(c);
        c.insert(
            "quantization_config".into(),
            json!({
                "_load_in_4bit": true,
                "_load_in_8bit": false,
                "bnb_4bit_compute_dtype": "bfloat16",
                "bnb_4bit_quant_storage": "uint8",
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": true,
                "llm_int8_enable_fp32_cpu_offload": false,
                "llm_int8_has_fp16_weight": false,
                "llm_int8_skip_modules": skip,
                "llm_int8_threshold": 6.0,
                "load_in_4bit": true,
                "load_in_8bit": false,
                "quant_method": "bitsandbytes"
            }),
        );
    })?;
    copy_side_files(model_dir, out)?;
    Ok(report)
}
