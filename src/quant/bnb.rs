//! Pre-quantized bitsandbytes checkpoints (the `…-bnb-4bit` layout transformers writes for
//! `load_in_4bit=True`): per quantized linear `P`,
//! ```text
//! P.weight                                   U8  [n/2, 1]   packed NF4 codes
//! P.weight.absmax                            U8  [nblocks]  (F32 without double quantization)
//! P.weight.quant_map                         F32 [16]
//! P.weight.nested_absmax                     F32 [ceil(nblocks/256)]
//! P.weight.nested_quant_map                  F32 [256]
//! P.weight.quant_state.bitsandbytes__nf4     U8  JSON: quant_type, blocksize, dtype, shape,
//!                                                  nested_blocksize, nested_offset
//! ```
//! These load into an [`Nf4Tensor`] as they are: no re-quantization.

use serde_json::Value;

use super::nf4::{Absmax, Nf4Tensor, NESTED_BLOCKSIZE};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::io::safetensors::Checkpoint;
use crate::tensor::{DType, Tensor};

/// Whether a config's `quantization_config` describes a bitsandbytes 4-bit checkpoint; other
/// quantization methods are an error naming them.
pub fn is_bnb_4bit(quantization_config: Option<&Value>) -> Result<bool> {
    let Some(q) = quantization_config else {
        return Ok(false);
    };
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
    if method != "bitsandbytes" {
        return Err(Error::InvalidArgument(format!(
            "quantization_config.quant_method `{method}` is not supported (only bitsandbytes 4-bit \
             NF4 checkpoints, or unquantized ones)"
        )));
    }
    if q.get("load_in_4bit").and_then(Value::as_bool) != Some(true) {
        return Err(Error::InvalidArgument(
            "quantization_config: only bitsandbytes 4-bit (load_in_4bit) checkpoints are supported"
                .into(),
        ));
    }
    if let Some(t) = q.get("bnb_4bit_quant_type").and_then(Value::as_str) {
        if t != "nf4" {
            return Err(Error::InvalidArgument(format!(
                "quantization_config.bnb_4bit_quant_type `{t}` is not supported (only nf4)"
            )));
        }
    }
    Ok(true)
}

fn dtype_of(name: &str) -> Option<DType> {
    match name.trim_start_matches("torch.") {
        "bfloat16" => Some(DType::BF16),
        "float16" => Some(DType::F16),
        "float32" => Some(DType::F32),
        _ => None,
    }
}

/// Loads the NF4 state of the linear at `prefix` (e.g. `model.layers.0.self_attn.q_proj`),
/// whose weight must be `shape` (`[out, in]`).
pub fn load_nf4(ckpt: &Checkpoint, prefix: &str, shape: &[usize]) -> Result<Nf4Tensor> {
    let state_key = format!("{prefix}.weight.quant_state.bitsandbytes__nf4");
    let state_bytes = ckpt.get(&state_key)?.bytes.to_vec();
    let state: Value = serde_json::from_slice(&state_bytes)
        .map_err(|e| ckpt.error(&state_key, format!("not valid JSON: {e}")))?;
    let field = |k: &str| {
        state
            .get(k)
            .ok_or_else(|| ckpt.error(&state_key, format!("no `{k}` in the quantization state")))
    };
    let quant_type = field("quant_type")?.as_str().unwrap_or("");
    if quant_type != "nf4" {
        return Err(ckpt.error(
            &state_key,
            format!("quant_type `{quant_type}` is not supported (only nf4)"),
        ));
    }
    let blocksize = field("blocksize")?
        .as_u64()
        .ok_or_else(|| ckpt.error(&state_key, "blocksize is not an integer"))?
        as usize;
    let state_shape: Vec<usize> = field("shape")?
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_u64().map(|x| x as usize))
                .collect()
        })
        .unwrap_or_default();
    if state_shape != shape {
        return Err(ckpt.error(
            &state_key,
            format!("quantized weight has shape {state_shape:?}, the model needs {shape:?}"),
        ));
    }
    let dtype_name = field("dtype")?.as_str().unwrap_or("");
    let dtype = dtype_of(dtype_name).ok_or_else(|| {
        ckpt.error(
            &state_key,
            format!("dtype `{dtype_name}` is not a float type"),
        )
    })?;
    let n: usize = shape.iter().product();
    let nblocks = n.div_ceil(blocksize);
    let cpu = Device::Cpu;
    let weight_key = format!("{prefix}.weight");
    let packed = ckpt.get(&weight_key)?;
    if packed.dtype != safetensors::Dtype::U8 || packed.bytes.len() != n.div_ceil(2) {
        return Err(ckpt.error(
            &weight_key,
            format!(
                "expected packed NF4 codes, U8 with {} bytes, found {:?} {:?}",
                n.div_ceil(2),
                packed.dtype,
                packed.shape
            ),
        ));
    }
    let packed = Tensor::from_vec(packed.bytes.to_vec(), &[n.div_ceil(2)], &cpu)?;
    let code: [f32; 16] = ckpt
        .f32(&format!("{prefix}.weight.quant_map"), &[16])?
        .try_into()
        .map_err(|v: Vec<f32>| {
            ckpt.error(
                &format!("{prefix}.weight.quant_map"),
                format!("expected 16 values, found {}", v.len()),
            )
        })?;
    let nested = state.get("nested_offset").is_some();
    let absmax_key = format!("{prefix}.weight.absmax");
    let absmax = if nested {
        if let Some(nb) = state.get("nested_blocksize").and_then(Value::as_u64) {
            if nb as usize != NESTED_BLOCKSIZE {
                return Err(ckpt.error(
                    &state_key,
                    format!("nested_blocksize {nb} is not supported (only 256)"),
                ));
            }
        }
        let offset = state["nested_offset"]
            .as_f64()
            .ok_or_else(|| ckpt.error(&state_key, "nested_offset is not a number"))?
            as f32;
        let nested_blocks = nblocks.div_ceil(NESTED_BLOCKSIZE);
        Absmax::Double {
            q: Tensor::from_vec(ckpt.u8(&absmax_key, &[nblocks])?, &[nblocks], &cpu)?,
            absmax2: Tensor::from_vec(
                ckpt.f32(&format!("{prefix}.weight.nested_absmax"), &[nested_blocks])?,
                &[nested_blocks],
                &cpu,
            )?,
            offset: Tensor::from_vec(vec![offset], &[1], &cpu)?,
            code2: Tensor::from_vec(
                ckpt.f32(&format!("{prefix}.weight.nested_quant_map"), &[256])?,
                &[256],
                &cpu,
            )?,
        }
    } else {
        Absmax::Plain(Tensor::from_vec(
            ckpt.f32(&absmax_key, &[nblocks])?,
            &[nblocks],
            &cpu,
        )?)
    };
    Nf4Tensor::from_parts(shape, dtype, blocksize, packed, code, absmax)
        .map_err(|e| ckpt.error(&weight_key, e))
}
