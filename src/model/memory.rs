//! The device-memory plan of a training run, computed before anything is allocated: the same
//! numbers `qlora-rs plan` prints, from the allocations the training step makes on a GPU (`model::llama` on the tape),
//! held to the peak the simulated GPU measures (`QLORA_SIM_MODE=account`; a test compares them).
//!
//! With T tokens per micro-batch, d hidden, F intermediate, L layers, V vocabulary (Vp rounded up
//! to 8), H heads, qd/kvd the q and k/v widths, r the rank rounded up to 8 (the device's), P the
//! LoRA parameters at that rank, n_a adapted projections per layer:
//! ```text
//! base weights   projections NF4: n/2 + n/64 (u8 scales) + 4·⌈n/16384⌉ + 1092 bytes each;
//!                embedding (and an untied lm_head), norms and biases in bf16; RoPE f32
//! adapters       P·18: fp32 master 4, bf16 mirror 2, fp32 gradients 4, AdamW m and v 8
//! step           T·8: positions (i32) and per-token losses (f32)
//! checkpoints    L·T·d·2: each layer's bf16 input, kept for the backward
//! then the larger of the step's two peaks:
//! layer backward the first replayed layer at its down projection's backward: the incoming
//!                gradient T·d·2, the replay's saved values T·(3d + 2qd + 2kvd + 3F)·2 + T·H·4
//!                + T·8, the adapters' x·Aᵀ n_a·T·r·2, and g = dy·B T·r·2 (dx is written over
//!                the down projection's input, which nothing needs after it); with per-head q/k
//!                norms (Qwen3) also q and k before them T·(qd + kvd)·2 and their rstd
//!                T·(H + Hkv)·4; with Gemma's norms on the attention and MLP outputs also
//!                those outputs before them and their rstd 2·T·d·2 + 2·T·4
//! lm_head + CE   the last hidden state, its norm and its gradient 3·T·d·2, the targets T·4 and
//!                one chunk of C tokens' logits, fp32 and bf16: C·Vp·6
//! ```
//! Transient split-K workspaces (under 2 MB at 8B) are not counted.

use super::config::LlamaConfig;
use super::lora::{LoraConfig, LoraParams};
use crate::error::Result;
use crate::ops::cross_entropy::DEFAULT_CHUNK;

/// One line of the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    /// What the memory holds (`base weights`, `adapters`, `checkpoints`, …).
    pub name: &'static str,
    /// Device memory it takes, bytes.
    pub bytes: u64,
    /// How the number was reached, for the table.
    pub detail: String,
}

/// The plan: items and their sum.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    /// The lines, in the order the table prints them.
    pub items: Vec<Item>,
}

impl MemoryPlan {
    /// Sum of the items, bytes: the predicted peak of a training step.
    pub fn total(&self) -> u64 {
        self.items.iter().map(|i| i.bytes).sum()
    }

    /// A table for the terminal, with a verdict against `budget` bytes.
    pub fn table(&self, budget: Option<u64>) -> String {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let mut s = String::new();
        for i in &self.items {
            s += &format!("{:<16} {:>9.3} GiB  {}\n", i.name, gib(i.bytes), i.detail);
        }
        s += &format!("{:<16} {:>9.3} GiB\n", "total", gib(self.total()));
        if let Some(b) = budget {
            let verdict = if self.total() <= b {
                "fits"
            } else {
                "does NOT fit"
            };
            s += &format!("{verdict} in {:.1} GiB\n", gib(b));
        }
        s
    }
}

fn nf4_bytes(n: u64) -> u64 {
    let blocks = n.div_ceil(64);
    // packed codes, u8 scales, f32 second-level scales, offset, the 256-entry second-level
    // code and the 16-entry NF4 code
    n.div_ceil(2) + blocks + 4 * blocks.div_ceil(256) + 4 + 1024 + 64
}

/// The plan of training `model` with `lora` on micro-batches of `tokens` tokens.
pub fn plan(model: &LlamaConfig, lora: &LoraConfig, tokens: usize) -> Result<MemoryPlan> {
    let c = model;
    let (t, d, f, l, v) = (
        tokens as u64,
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.num_layers as u64,
        c.vocab_size as u64,
    );
    let (qd, kvd, h) = (c.q_dim() as u64, c.kv_dim() as u64, c.num_heads as u64);
    let proj: u64 = c
        .targets()
        .iter()
        .map(|tg| {
            let (i, o) = tg.dims(c);
            nf4_bytes((i * o) as u64)
        })
        .sum::<u64>()
        * l;
    let emb = v * d * 2 * if c.tie_word_embeddings { 1 } else { 2 };
    let hd = c.head_dim as u64;
    let qk_norm = c.qk_norm();
    let per_layer_norms = if c.switches.sandwich_norms { 4 } else { 2 };
    let norms = (per_layer_norms * l + 1) * d * 2 + if qk_norm { l * 2 * hd * 2 } else { 0 };
    let biases = l * 2 * (if c.qkv_bias { qd + 2 * kvd } else { 0 } + if c.o_bias { d } else { 0 });
    let rope_tables = if c.switches.rope_local.is_some() || c.switches.longrope.is_some() {
        2
    } else {
        1
    };
    let rope = rope_tables * (c.rotary_dim() as u64 / 2) * 4;
    // The device holds the adapters at the rank rounded up to 8 (the GEMM tiles' need).
    let rp = lora.rank.div_ceil(8) * 8;
    let device_lora = LoraConfig {
        rank: rp,
        ..lora.clone()
    };
    let p = LoraParams::zeros(model, device_lora)?.len() as u64;
    let adamw_scratch = 8 * 512 + 4 + 8;
    let n_a = lora.targets.len() as u64;
    let down_adapted = lora.targets.contains(&super::lora::Target::Down);
    let r = rp as u64;
    let hkv = c.num_kv_heads as u64;
    // Qwen3's per-head norms keep q and k before the norm, and their rstd per (token, head).
    let qk_saved = if qk_norm {
        t * (qd + kvd) * 2 + t * (h + hkv) * 4
    } else {
        0
    };
    // Gemma's norms of the attention and MLP outputs keep those outputs and their rstd.
    let sandwich_saved = if c.switches.sandwich_norms {
        2 * t * d * 2 + 2 * t * 4
    } else {
        0
    };
    let saved = t * (3 * d + 2 * qd + 2 * kvd + 3 * f) * 2
        + t * h * 4
        + t * 8
        + n_a * t * r * 2
        + qk_saved
        + sandwich_saved;
    // Phi-3's fused gate_up output `[T, 2f]` (and in the backward its gradient, concatenated
    // from gate's and up's) exists beside its two halves while they are split or joined.
    let fused_transient = if c.switches.fused_proj {
        t * 2 * f * 2
    } else {
        0
    };
    let backward = t * d * 2 + saved + fused_transient + if down_adapted { t * r * 2 } else { 0 };
    let chunk = (DEFAULT_CHUNK as u64).min(t.max(1));
    let vp = v.next_multiple_of(8);
    let ce = 3 * t * d * 2 + t * 4 + chunk * vp * 6;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    let peak = if backward >= ce {
        Item {
            name: "layer backward",
            bytes: backward,
            detail: format!(
                "the peak: one replayed layer's saved values and gradients ({:.2} GiB) > lm_head + CE \
                 ({:.2} GiB)",
                gib(backward),
                gib(ce)
            ),
        }
    } else {
        Item {
            name: "lm_head + CE",
            bytes: ce,
            detail: format!(
                "the peak: a {chunk}-token chunk of logits (never the full {t} × {v}) > one layer's \
                 backward ({:.2} GiB)",
                gib(backward)
            ),
        }
    };
    let items = vec![
        Item {
            name: "base weights",
            bytes: proj + emb + norms + biases + rope,
            detail: format!(
                "{} projections in NF4 ({:.2} GiB), embedding{} bf16 ({:.2} GiB)",
                c.targets().len() as u64 * l,
                gib(proj),
                if c.tie_word_embeddings {
                    ""
                } else {
                    " + lm_head"
                },
                gib(emb)
            ),
        },
        Item {
            name: "adapters",
            bytes: 18 * p + adamw_scratch,
            detail: format!(
                "{p} LoRA parameters at rank {rp}: fp32 weights, bf16 copy, gradients, AdamW m and v"
            ),
        },
        Item {
            name: "step",
            bytes: t * 8,
            detail: "token positions and per-token losses".into(),
        },
        Item {
            name: "checkpoints",
            bytes: l * t * d * 2,
            detail: format!("{l} layer inputs of {t} tokens × {d}, bf16"),
        },
        peak,
    ];
    Ok(MemoryPlan { items })
}
