//! The device-memory plan of a training run, computed before anything is allocated: the same
//! numbers `qlora-rs plan` prints and the CUDA trainer sizes its buffers from.
//!
//! With T tokens per micro-batch, d hidden, F intermediate, L layers, V vocabulary, P LoRA
//! parameters, qd/kvd the q and k/v widths, r the rank and n_a adapted projections per layer:
//! ```text
//! base weights   projections NF4: n/2 + n/64 (u8 scales) + 4·n/16384 (+ tables) bytes each;
//!                embedding (and an untied lm_head) and norms in bf16
//! adapters       P·4 (fp32 master) + P·4 (gradients) + P·8 (AdamW m, v)
//! checkpoints    L·T·d·2: each layer's bf16 input, kept for the backward
//! layer replay   one layer's forward values and their gradients, bf16:
//!                2·T·(4d + 2qd + 2kvd + 3F)·2, plus lse T·H·4 and x·Aᵀ n_a·T·r·4
//! lm_head + CE   logits of one chunk of C tokens, fp32: C·V·4, plus dh T·d·4
//! ```

use super::config::LlamaConfig;
use super::lora::{LoraConfig, LoraParams};
use crate::error::Result;
use crate::ops::cross_entropy::DEFAULT_CHUNK;

/// One line of the plan.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub name: &'static str,
    pub bytes: u64,
    pub detail: String,
}

/// The plan: items and their sum.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    pub items: Vec<Item>,
}

impl MemoryPlan {
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
    n.div_ceil(2) + blocks + 4 * blocks.div_ceil(256) + 4 + 64 + 1024
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
    let (qd, kvd) = (c.q_dim() as u64, c.kv_dim() as u64);
    let proj: u64 = super::lora::Target::ALL
        .iter()
        .map(|tg| {
            let (i, o) = tg.dims(c);
            nf4_bytes((i * o) as u64)
        })
        .sum::<u64>()
        * l;
    let emb = v * d * 2 * if c.tie_word_embeddings { 1 } else { 2 };
    let norms = (2 * l + 1) * d * 2;
    let p = LoraParams::zeros(model, lora.clone())?.len() as u64;
    let n_a = lora.targets.len() as u64;
    let r = lora.rank as u64;
    let replay = 2 * t * (4 * d + 2 * qd + 2 * kvd + 3 * f) * 2
        + t * c.num_heads as u64 * 4
        + n_a * t * r * 4;
    let chunk = DEFAULT_CHUNK as u64;
    let items = vec![
        Item {
            name: "base weights",
            bytes: proj + emb + norms,
            detail: format!(
                "{} projections in NF4 ({:.2} GiB), embedding{} bf16 ({:.2} GiB)",
                7 * l,
                proj as f64 / (1u64 << 30) as f64,
                if c.tie_word_embeddings {
                    ""
                } else {
                    " + lm_head"
                },
                emb as f64 / (1u64 << 30) as f64
            ),
        },
        Item {
            name: "adapters",
            bytes: 16 * p,
            detail: format!("{p} LoRA parameters: fp32 weights, gradients, AdamW m and v"),
        },
        Item {
            name: "checkpoints",
            bytes: l * t * d * 2,
            detail: format!("{l} layer inputs of {t} tokens × {d}, bf16"),
        },
        Item {
            name: "layer replay",
            bytes: replay,
            detail: "one layer's activations and their gradients during its backward".into(),
        },
        Item {
            name: "lm_head + CE",
            bytes: chunk * v * 4 + t * d * 4,
            detail: format!("{chunk}-token chunk of fp32 logits (never the full {t} × {v})"),
        },
    ];
    Ok(MemoryPlan { items })
}
