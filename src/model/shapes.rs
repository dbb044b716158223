//! Built-in model shapes (published configurations), for `plan` and `bench` without a download.

use super::config::{Activation, Arch, LlamaConfig, LongRope, Switches};
use crate::error::{Error, Result};
use crate::ops::rope::RopeScaling;

/// The shape names [`by_name`] knows, for messages.
pub const NAMES: &str = "smollm2-135m, llama3-1b, llama3-8b, qwen3-0.6b, qwen3-8b, gemma2-2b, \
                         gemma3-1b, phi-3.5-mini, phi-4-mini";

/// The configuration of a named shape.
pub fn by_name(name: &str) -> Result<LlamaConfig> {
    let llama3 = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    let base =
        |hidden, inter, layers, heads, kv, vocab, tie, theta: f32, scaling, max_pos| LlamaConfig {
            arch: Arch::Llama,
            hidden_size: hidden,
            intermediate_size: inter,
            num_layers: layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: hidden / heads,
            vocab_size: vocab,
            rms_norm_eps: 1e-5,
            rope_theta: theta,
            rope_scaling: scaling,
            tie_word_embeddings: tie,
            max_position_embeddings: max_pos,
            qkv_bias: false,
            o_bias: false,
            sliding_window: None,
            dtype: Some("bfloat16".into()),
            quantization_config: None,
            switches: Default::default(),
            multimodal: false,
        };
    match name.to_ascii_lowercase().as_str() {
        "smollm2-135m" => Ok(base(
            576,
            1536,
            30,
            9,
            3,
            49_152,
            true,
            100_000.0,
            RopeScaling::None,
            8192,
        )),
        "llama3-1b" => Ok(base(
            2048, 8192, 16, 32, 8, 128_256, true, 500_000.0, llama3, 131_072,
        )),
        "llama3-8b" => Ok(base(
            4096, 14_336, 32, 32, 8, 128_256, false, 500_000.0, llama3, 131_072,
        )),
        // Qwen3: head_dim 128 whatever the width, per-head q/k norms, no biases.
        "qwen3-0.6b" => Ok(qwen3(base(
            1024,
            3072,
            28,
            16,
            8,
            151_936,
            true,
            1e6,
            RopeScaling::None,
            40_960,
        ))),
        "qwen3-8b" => Ok(qwen3(base(
            4096,
            12_288,
            36,
            32,
            8,
            151_936,
            false,
            1e6,
            RopeScaling::None,
            40_960,
        ))),
        // Gemma 2 2B: head_dim 256, soft-caps 50 and 30, a 4096-token window on even layers.
        "gemma2-2b" => Ok(gemma(
            Arch::Gemma2,
            base(
                2304,
                9216,
                26,
                8,
                4,
                256_000,
                true,
                10_000.0,
                RopeScaling::None,
                8192,
            ),
            4096,
            (0..26).map(|i| i % 2 == 0).collect(),
        )),
        // Gemma 3 1B: one global layer in six, a 512-token window, local RoPE base 1e4.
        "gemma3-1b" => Ok(gemma(
            Arch::Gemma3,
            base(
                1152,
                6912,
                26,
                4,
                1,
                262_144,
                true,
                1e6,
                RopeScaling::None,
                32_768,
            ),
            512,
            (0..26).map(|i| (i + 1) % 6 != 0).collect(),
        )),
        // Phi-3.5-mini: 32 heads of 96, full rotary, longrope to 128k.
        "phi-3.5-mini" => Ok(phi3(
            base(
                3072,
                8192,
                32,
                32,
                32,
                32_064,
                false,
                10_000.0,
                RopeScaling::None,
                131_072,
            ),
            96,
        )),
        // Phi-4-mini: 24 heads of 128 (8 kv), RoPE on 96 of them, tied embeddings.
        "phi-4-mini" => Ok(phi3(
            base(
                3072,
                8192,
                32,
                24,
                8,
                200_064,
                true,
                10_000.0,
                RopeScaling::None,
                131_072,
            ),
            96,
        )),
        other => Err(Error::InvalidArgument(format!(
            "unknown shape `{other}`: use one of {NAMES}"
        ))),
    }
}

fn qwen3(c: LlamaConfig) -> LlamaConfig {
    LlamaConfig {
        arch: Arch::Qwen3,
        head_dim: 128,
        rms_norm_eps: 1e-6,
        ..c
    }
}

/// A Gemma shape: head_dim 256, query_pre_attn_scalar 256, the family's switches.
fn gemma(arch: Arch, c: LlamaConfig, window: usize, sliding_layers: Vec<bool>) -> LlamaConfig {
    let gemma2 = arch == Arch::Gemma2;
    LlamaConfig {
        arch,
        head_dim: 256,
        rms_norm_eps: 1e-6,
        sliding_window: Some(window),
        switches: Switches {
            act: Activation::GeluTanh,
            norm_unit_offset: true,
            sandwich_norms: true,
            embed_scale: Some((c.hidden_size as f64).sqrt() as f32),
            attn_scale: Some(1.0 / 16.0),
            attn_softcap: gemma2.then_some(50.0),
            final_softcap: gemma2.then_some(30.0),
            sliding_layers,
            rope_local: (!gemma2).then_some((10_000.0, RopeScaling::None)),
            ..Switches::default()
        },
        ..c
    }
}

/// A Phi-3 shape rotating `rot` dims of each head, with longrope from 4096 tokens to the
/// shape's context (the factors' values are placeholders: a shape needs only their count).
fn phi3(c: LlamaConfig, rot: usize) -> LlamaConfig {
    let scale = c.max_position_embeddings as f64 / 4096.0;
    LlamaConfig {
        arch: Arch::Phi3,
        switches: Switches {
            fused_proj: true,
            rotary_dim: (rot != c.head_dim).then_some(rot),
            longrope: Some(LongRope {
                short_factor: vec![1.0; rot / 2],
                long_factor: vec![1.0; rot / 2],
                original_max_position_embeddings: 4096,
                attention_factor: (1.0 + scale.ln() / 4096f64.ln()).sqrt() as f32,
            }),
            ..Switches::default()
        },
        ..c
    }
}
