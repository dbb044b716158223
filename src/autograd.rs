//! The tape: coarse [`Op`] records of one decoder layer (or of the final norm), each holding
//! exactly what its backward needs, walked in reverse by [`Tape::backward`].
//!
//! Rules. A value that needs no gradient (the embedding output, anything computed only from
//! frozen weights and such values) produces no record; frozen weights never get a gradient;
//! LoRA gradients accumulate (`+=`) into the flat gradient buffer laid out like
//! [`LoraParams::values`]; activation gradients are written, and summed only where a value
//! feeds two ops (the residual stream, a norm output feeding q, k and v).
//!
//! Checkpointing is the model's business (see `model::llama`): it keeps each layer's input,
//! then for the backward replays the layer on a fresh tape and walks it.

use std::borrow::Cow;

use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::lora::{LoraParams, Target};
use crate::ops::{attention, linear, residual, rmsnorm, rope, swiglu};

/// A value on the tape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Var(usize);

/// Which frozen RMSNorm weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NormId {
    Input(usize),
    PostAttention(usize),
    Final,
}

/// The frozen model, as the tape sees it.
pub trait Frozen {
    fn config(&self) -> &LlamaConfig;
    fn norm(&self, id: NormId) -> &[f32];
    /// The base weight of a projection, `[out, in]` in f32 (dequantized when stored as NF4).
    fn base_weight(&self, layer: usize, target: Target) -> Result<Cow<'_, [f32]>>;
    fn bias(&self, layer: usize, target: Target) -> Option<&[f32]>;
}

/// The packed micro-batch a tape runs over.
#[derive(Clone, Debug)]
pub struct Batch {
    pub cu_seqlens: Vec<usize>,
    /// Position of each token within its sequence.
    pub positions: Vec<u32>,
}

impl Batch {
    pub fn new(cu_seqlens: Vec<usize>) -> Result<Batch> {
        let tokens = cu_seqlens.last().copied().unwrap_or(0);
        crate::ops::check_cu_seqlens("batch", &cu_seqlens, tokens)?;
        let positions = rope::positions_from_cu_seqlens(&cu_seqlens);
        Ok(Batch {
            cu_seqlens,
            positions,
        })
    }

    pub fn tokens(&self) -> usize {
        self.positions.len()
    }
}

/// Dropout on the adapter inputs: probability and the seed of this micro-batch. Masks are a
/// function of (seed, layer, target), so the recomputation in the backward draws the same ones.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
}

enum Op {
    RmsNorm {
        x: Var,
        y: Var,
        norm: NormId,
        rstd: Vec<f32>,
    },
    Linear {
        x: Var,
        y: Var,
        layer: usize,
        target: Target,
        /// `x̃·Aᵀ` (`[T, r]`), empty without an adapter.
        xa: Vec<f32>,
        mask: Option<Vec<f32>>,
    },
    Rope {
        x: Var,
        y: Var,
        heads: usize,
    },
    Attention {
        q: Var,
        k: Var,
        v: Var,
        o: Var,
        lse: Vec<f32>,
    },
    SwiGlu {
        gate: Var,
        up: Var,
        h: Var,
    },
    Add {
        a: Var,
        b: Var,
        y: Var,
    },
}

/// One layer's forward values and records.
pub struct Tape<'a> {
    frozen: &'a dyn Frozen,
    lora: Option<&'a LoraParams>,
    batch: &'a Batch,
    freqs: &'a [f32],
    /// Record for a backward (false: nothing is kept beyond the values).
    train: bool,
    /// Adapter dropout (training steps only; the caller passes `None` for inference).
    dropout: Option<Dropout>,
    values: Vec<Vec<f32>>,
    requires_grad: Vec<bool>,
    ops: Vec<Op>,
}

fn dropout_mask(d: Dropout, layer: usize, target: Target, n: usize) -> Vec<f32> {
    let s = crate::ops::dropout::stream_seed(d.seed, layer, target as u64);
    crate::ops::dropout::mask(s, d.p as f32, n)
}

impl<'a> Tape<'a> {
    pub fn new(
        frozen: &'a dyn Frozen,
        lora: Option<&'a LoraParams>,
        batch: &'a Batch,
        freqs: &'a [f32],
        train: bool,
        dropout: Option<Dropout>,
    ) -> Tape<'a> {
        Tape {
            frozen,
            lora,
            batch,
            freqs,
            train,
            dropout: dropout.filter(|d| d.p > 0.0),
            values: Vec::new(),
            requires_grad: Vec::new(),
            ops: Vec::new(),
        }
    }

    /// Puts an input on the tape.
    pub fn leaf(&mut self, value: Vec<f32>, requires_grad: bool) -> Var {
        self.push(value, requires_grad && self.train)
    }

    fn push(&mut self, value: Vec<f32>, requires_grad: bool) -> Var {
        self.values.push(value);
        self.requires_grad.push(requires_grad);
        Var(self.values.len() - 1)
    }

    pub fn value(&self, v: Var) -> &[f32] {
        &self.values[v.0]
    }

    /// Takes a value off the tape (for the layer output handed to the next layer).
    pub fn take(&mut self, v: Var) -> Vec<f32> {
        std::mem::take(&mut self.values[v.0])
    }

    fn rg(&self, v: Var) -> bool {
        self.requires_grad[v.0]
    }

    /// Number of records (for tests: values that need no gradient make none).
    pub fn records(&self) -> usize {
        self.ops.len()
    }

    pub fn rmsnorm(&mut self, x: Var, norm: NormId) -> Result<Var> {
        let d = self.frozen.config().hidden_size;
        let eps = self.frozen.config().rms_norm_eps;
        let (y, rstd) = rmsnorm::forward(self.value(x), self.frozen.norm(norm), d, eps)?;
        let rg = self.rg(x);
        let y = self.push(y, rg);
        if rg {
            self.ops.push(Op::RmsNorm { x, y, norm, rstd });
        }
        Ok(y)
    }

    pub fn linear(&mut self, x: Var, layer: usize, target: Target) -> Result<Var> {
        let cfg = self.frozen.config();
        let (i, o) = target.dims(cfg);
        let tokens = self.batch.tokens();
        let dims = linear::Dims {
            tokens,
            in_features: i,
            out_features: o,
        };
        let w = self.frozen.base_weight(layer, target)?;
        let bias = self.frozen.bias(layer, target);
        let slot = self
            .lora
            .and_then(|l| l.slot(layer, target).map(|s| (l, s)));
        let lora = slot.map(|(l, s)| linear::Lora {
            a: &l.values[l.slots[s].a.clone()],
            b: &l.values[l.slots[s].b.clone()],
            rank: l.config.rank,
            scale: l.config.scale(),
        });
        let mask = match (self.dropout, slot) {
            (Some(d), Some(_)) => Some(dropout_mask(d, layer, target, tokens * i)),
            _ => None,
        };
        let (y, xa) = linear::forward(
            dims,
            self.value(x),
            &w,
            bias,
            lora.as_ref(),
            mask.as_deref(),
        )?;
        let rg = self.train && (self.rg(x) || slot.is_some());
        let y = self.push(y, rg);
        if rg {
            self.ops.push(Op::Linear {
                x,
                y,
                layer,
                target,
                xa,
                mask,
            });
        }
        Ok(y)
    }

    pub fn rope(&mut self, x: Var, heads: usize) -> Result<Var> {
        let hd = self.frozen.config().head_dim;
        let mut y = self.value(x).to_vec();
        rope::forward(&mut y, &self.batch.positions, heads, hd, self.freqs)?;
        let rg = self.rg(x);
        let y = self.push(y, rg);
        if rg {
            self.ops.push(Op::Rope { x, y, heads });
        }
        Ok(y)
    }

    fn attn_dims(&self) -> attention::Dims {
        let c = self.frozen.config();
        attention::Dims {
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        }
    }

    pub fn attention(&mut self, q: Var, k: Var, v: Var) -> Result<Var> {
        let (o, lse) = attention::forward(
            self.attn_dims(),
            self.value(q),
            self.value(k),
            self.value(v),
            &self.batch.cu_seqlens,
        )?;
        let rg = self.rg(q) || self.rg(k) || self.rg(v);
        let o = self.push(o, rg);
        if rg {
            self.ops.push(Op::Attention { q, k, v, o, lse });
        }
        Ok(o)
    }

    pub fn swiglu(&mut self, gate: Var, up: Var) -> Result<Var> {
        let h = swiglu::forward(self.value(gate), self.value(up))?;
        let rg = self.rg(gate) || self.rg(up);
        let h = self.push(h, rg);
        if rg {
            self.ops.push(Op::SwiGlu { gate, up, h });
        }
        Ok(h)
    }

    pub fn add(&mut self, a: Var, b: Var) -> Result<Var> {
        let y = residual::forward(self.value(a), self.value(b))?;
        let rg = self.rg(a) || self.rg(b);
        let y = self.push(y, rg);
        if rg {
            self.ops.push(Op::Add { a, b, y });
        }
        Ok(y)
    }

    /// Backpropagates `dout` (the gradient of `out`) through the records, accumulating LoRA
    /// gradients into `lora_grads` (laid out like the adapters' values). Returns the gradient of
    /// `input` when it requires one.
    pub fn backward(
        mut self,
        out: Var,
        dout: Vec<f32>,
        input: Var,
        lora_grads: &mut [f32],
    ) -> Result<Option<Vec<f32>>> {
        if !self.train {
            return Err(Error::InvalidArgument(
                "backward on a tape recorded without training".into(),
            ));
        }
        if let Some(l) = self.lora {
            crate::ops::expect_len(
                "backward",
                "LoRA gradient buffer",
                lora_grads.len(),
                &[l.len()],
            )?;
        }
        let mut grads: Vec<Option<Vec<f32>>> = vec![None; self.values.len()];
        grads[out.0] = Some(dout);
        let ops = std::mem::take(&mut self.ops);
        for op in ops.into_iter().rev() {
            self.backward_op(op, &mut grads, lora_grads)?;
        }
        Ok(grads[input.0].take())
    }

    fn backward_op(
        &self,
        op: Op,
        grads: &mut [Option<Vec<f32>>],
        lora_grads: &mut [f32],
    ) -> Result<()> {
        let cfg = self.frozen.config();
        let accumulate = |grads: &mut [Option<Vec<f32>>], v: Var, g: Vec<f32>| -> Result<()> {
            if !self.rg(v) {
                return Ok(());
            }
            match &mut grads[v.0] {
                Some(acc) => residual::accumulate(acc, &g),
                slot @ None => {
                    *slot = Some(g);
                    Ok(())
                }
            }
        };
        match op {
            Op::RmsNorm { x, y, norm, rstd } => {
                let Some(dy) = grads[y.0].take() else {
                    return Ok(());
                };
                let dx = rmsnorm::backward(
                    self.value(x),
                    self.frozen.norm(norm),
                    &rstd,
                    &dy,
                    cfg.hidden_size,
                )?;
                accumulate(grads, x, dx)?;
            }
            Op::Linear {
                x,
                y,
                layer,
                target,
                xa,
                mask,
            } => {
                let Some(dy) = grads[y.0].take() else {
                    return Ok(());
                };
                let (i, o) = target.dims(cfg);
                let dims = linear::Dims {
                    tokens: self.batch.tokens(),
                    in_features: i,
                    out_features: o,
                };
                let w = self.frozen.base_weight(layer, target)?;
                let lora = match self
                    .lora
                    .and_then(|l| l.slot(layer, target).map(|s| (l, s)))
                {
                    Some((l, s)) => {
                        let slot = &l.slots[s];
                        let (ga, gb) = split_two(lora_grads, slot.a.clone(), slot.b.clone());
                        Some(linear::LoraGrads {
                            lora: linear::Lora {
                                a: &l.values[slot.a.clone()],
                                b: &l.values[slot.b.clone()],
                                rank: l.config.rank,
                                scale: l.config.scale(),
                            },
                            xa: &xa,
                            grad_a: ga,
                            grad_b: gb,
                        })
                    }
                    None => None,
                };
                let need_dx = self.rg(x);
                if let Some(dx) =
                    linear::backward(dims, self.value(x), &w, lora, mask.as_deref(), &dy, need_dx)?
                {
                    accumulate(grads, x, dx)?;
                }
            }
            Op::Rope { x, y, heads } => {
                let Some(mut dy) = grads[y.0].take() else {
                    return Ok(());
                };
                rope::backward(
                    &mut dy,
                    &self.batch.positions,
                    heads,
                    cfg.head_dim,
                    self.freqs,
                )?;
                accumulate(grads, x, dy)?;
            }
            Op::Attention { q, k, v, o, lse } => {
                let Some(d_o) = grads[o.0].take() else {
                    return Ok(());
                };
                let (dq, dk, dv) = attention::backward(
                    self.attn_dims(),
                    self.value(q),
                    self.value(k),
                    self.value(v),
                    self.value(o),
                    &lse,
                    &d_o,
                    &self.batch.cu_seqlens,
                )?;
                accumulate(grads, q, dq)?;
                accumulate(grads, k, dk)?;
                accumulate(grads, v, dv)?;
            }
            Op::SwiGlu { gate, up, h } => {
                let Some(dh) = grads[h.0].take() else {
                    return Ok(());
                };
                let (dg, du) = swiglu::backward(self.value(gate), self.value(up), &dh)?;
                accumulate(grads, gate, dg)?;
                accumulate(grads, up, du)?;
            }
            Op::Add { a, b, y } => {
                let Some(dy) = grads[y.0].take() else {
                    return Ok(());
                };
                accumulate(grads, a, dy.clone())?;
                accumulate(grads, b, dy)?;
            }
        }
        Ok(())
    }
}

/// Two disjoint mutable ranges of one buffer (A before B in every slot).
fn split_two(
    buf: &mut [f32],
    a: std::ops::Range<usize>,
    b: std::ops::Range<usize>,
) -> (&mut [f32], &mut [f32]) {
    assert!(a.end <= b.start, "slot layout puts A before B");
    let (head, tail) = buf.split_at_mut(b.start);
    (&mut head[a], &mut tail[..b.end - b.start])
}
