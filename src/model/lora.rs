//! LoRA adapters with PEFT's semantics: `y = W·x + s·B·(A·x)` on the chosen projections, `A`
//! (`[r, in]`) Kaiming-uniform (PEFT's `kaiming_uniform_(a=√5)`: `U(−1/√in, 1/√in)`), `B`
//! (`[out, r]`) zero, `s = alpha / r` (or `alpha / √r` with rsLoRA) on the adapter path only.
//!
//! Every A and B of the model lives in one flat f32 buffer ([`LoraParams::values`]); each
//! adapted projection is a [`LoraSlot`] of ranges into it. Gradients and optimizer state mirror
//! the same layout, so zeroing, clipping and AdamW are one pass over one buffer.

use std::ops::Range;

use rand::{Rng, SeedableRng};

use super::config::LlamaConfig;
use crate::error::{Error, Result};

/// The seven projections of a decoder layer that can carry an adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// Attention query projection `q_proj`, `[heads·head_dim, d]`.
    Q,
    /// Attention key projection `k_proj`, `[kv_heads·head_dim, d]`.
    K,
    /// Attention value projection `v_proj`, `[kv_heads·head_dim, d]`.
    V,
    /// Attention output projection `o_proj`, `[d, heads·head_dim]`.
    O,
    /// MLP gate projection `gate_proj` (the SiLU branch), `[f, d]`.
    Gate,
    /// MLP up projection `up_proj`, `[f, d]`.
    Up,
    /// MLP down projection `down_proj`, `[d, f]`.
    Down,
    /// Phi-3's fused attention input projection `qkv_proj`, `[q + 2·kv, d]` (q, then k, then v).
    Qkv,
    /// Phi-3's fused MLP input projection `gate_up_proj`, `[2f, d]` (gate, then up).
    GateUp,
}

impl Target {
    /// Every target, in the order a layer runs them (what `all` selects).
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// The projections of a model that stores q/k/v and gate/up fused (Phi-3), in the order a
    /// layer runs them.
    pub const FUSED: [Target; 4] = [Target::Qkv, Target::O, Target::GateUp, Target::Down];

    /// The module name (`q_proj`, …, `down_proj`).
    pub fn module(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
            Target::Qkv => "qkv_proj",
            Target::GateUp => "gate_up_proj",
        }
    }

    /// The path inside a decoder layer (`self_attn.q_proj`, `mlp.gate_proj`, …).
    pub fn hf_path(self) -> &'static str {
        match self {
            Target::Q => "self_attn.q_proj",
            Target::K => "self_attn.k_proj",
            Target::V => "self_attn.v_proj",
            Target::O => "self_attn.o_proj",
            Target::Gate => "mlp.gate_proj",
            Target::Up => "mlp.up_proj",
            Target::Down => "mlp.down_proj",
            Target::Qkv => "self_attn.qkv_proj",
            Target::GateUp => "mlp.gate_up_proj",
        }
    }

    /// `(in_features, out_features)` of this projection.
    pub fn dims(self, c: &LlamaConfig) -> (usize, usize) {
        let (d, f) = (c.hidden_size, c.intermediate_size);
        match self {
            Target::Q => (d, c.q_dim()),
            Target::K | Target::V => (d, c.kv_dim()),
            Target::O => (c.q_dim(), d),
            Target::Gate | Target::Up => (d, f),
            Target::Down => (f, d),
            Target::Qkv => (d, c.q_dim() + 2 * c.kv_dim()),
            Target::GateUp => (d, 2 * f),
        }
    }

    /// `q`, `q_proj`, … `down_proj` (case-insensitive).
    pub fn parse(s: &str) -> Result<Target> {
        let s = s.trim().to_ascii_lowercase();
        let base = s.strip_suffix("_proj").unwrap_or(&s);
        Target::ALL
            .into_iter()
            .chain([Target::Qkv, Target::GateUp])
            .find(|t| t.module().strip_suffix("_proj") == Some(base))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown LoRA target `{s}`: use any of q, k, v, o, gate, up, down (qkv, \
                     gate_up for Phi-3), or all"
                ))
            })
    }

    /// `targets` as the projections of a model of configuration `c`: on a fused model (Phi-3)
    /// q+k+v become `qkv_proj` and gate+up `gate_up_proj` (so `all` adapts its four
    /// projections); a part of a fused projection, or a fused name on a model that stores them
    /// apart, is refused. In the order a layer runs them.
    pub fn resolve(targets: &[Target], c: &LlamaConfig) -> Result<Vec<Target>> {
        let has = |t: Target| targets.contains(&t);
        let mut out = Vec::new();
        for &t in targets {
            let mapped = match (c.switches.fused_proj, t) {
                (true, Target::Q | Target::K | Target::V) => {
                    let whole = has(Target::Q) && has(Target::K) && has(Target::V);
                    if !(whole || has(Target::Qkv)) {
                        return Err(Error::InvalidArgument(format!(
                            "LoRA target `{}`: this model ({:?}) stores q, k and v as one \
                             projection, qkv_proj; target qkv (or q, k and v together, or all)",
                            t.module(),
                            c.arch
                        )));
                    }
                    Target::Qkv
                }
                (true, Target::Gate | Target::Up) => {
                    let whole = has(Target::Gate) && has(Target::Up);
                    if !(whole || has(Target::GateUp)) {
                        return Err(Error::InvalidArgument(format!(
                            "LoRA target `{}`: this model ({:?}) stores gate and up as one \
                             projection, gate_up_proj; target gate_up (or gate and up together, \
                             or all)",
                            t.module(),
                            c.arch
                        )));
                    }
                    Target::GateUp
                }
                (false, Target::Qkv | Target::GateUp) => {
                    return Err(Error::InvalidArgument(format!(
                        "LoRA target `{}`: this model ({:?}) has no fused projections; target \
                         q, k, v, o, gate, up, down (or all)",
                        t.module(),
                        c.arch
                    )))
                }
                _ => t,
            };
            if !out.contains(&mapped) {
                out.push(mapped);
            }
        }
        let order = c.targets();
        out.sort_by_key(|t| order.iter().position(|o| o == t));
        Ok(out)
    }

    /// A comma-separated list, or `all` / `all-linear`.
    pub fn parse_list(s: &str) -> Result<Vec<Target>> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("all") || s.eq_ignore_ascii_case("all-linear") {
            return Ok(Target::ALL.to_vec());
        }
        let mut v: Vec<Target> = s
            .split(',')
            .filter(|p| !p.trim().is_empty())
            .map(Target::parse)
            .collect::<Result<_>>()?;
        v.sort();
        v.dedup();
        if v.is_empty() {
            return Err(Error::InvalidArgument("no LoRA targets given".into()));
        }
        Ok(v)
    }
}

/// Adapter hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// LoRA rank r: A is `[r, in]`, B is `[out, r]`.
    pub rank: usize,
    /// Scale numerator: the adapter output is multiplied by `alpha / r` (or `alpha / √r`).
    pub alpha: f64,
    /// Rank-stabilised LoRA: scale by `alpha / √r` instead of `alpha / r`.
    pub rslora: bool,
    /// Dropout probability on the adapter input (training only).
    pub dropout: f64,
    /// Projections that carry an adapter, in every adapted layer.
    pub targets: Vec<Target>,
}

impl LoraConfig {
    /// The adapter scale `s`: `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale(&self) -> f32 {
        let r = self.rank as f64;
        (if self.rslora {
            self.alpha / r.sqrt()
        } else {
            self.alpha / r
        }) as f32
    }

    /// Refuses rank 0, a non-finite alpha, dropout outside `[0, 1)` and an empty target list.
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::InvalidArgument(
                "LoRA rank must be at least 1".into(),
            ));
        }
        if !self.alpha.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "LoRA alpha must be finite, got {}",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::InvalidArgument(format!(
                "LoRA dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if self.targets.is_empty() {
            return Err(Error::InvalidArgument("no LoRA targets given".into()));
        }
        Ok(())
    }
}

/// Where one adapted projection's A and B sit in the flat buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoraSlot {
    /// Decoder layer index.
    pub layer: usize,
    /// Which projection of the layer.
    pub target: Target,
    /// Projection input width (columns of A).
    pub in_features: usize,
    /// Projection output width (rows of B).
    pub out_features: usize,
    /// `A` `[rank, in]`.
    pub a: Range<usize>,
    /// `B` `[out, rank]`.
    pub b: Range<usize>,
}

impl LoraSlot {
    /// Its A's or B's key in PEFT's files, with the model's layers under `layers_module`
    /// (`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` for `model.layers`).
    pub fn peft_key(&self, layers_module: &str, which: char) -> String {
        format!(
            "base_model.model.{layers_module}.{}.{}.lora_{which}.weight",
            self.layer,
            self.target.hf_path()
        )
    }

    /// The adapter of a `[o, i]` projection at rank `rank`, laid out from `*at` (A then B);
    /// moves `at` past it.
    fn at(layer: usize, target: Target, i: usize, o: usize, rank: usize, at: &mut usize) -> Self {
        let a = *at..*at + rank * i;
        let b = a.end..a.end + o * rank;
        *at = b.end;
        LoraSlot {
            layer,
            target,
            in_features: i,
            out_features: o,
            a,
            b,
        }
    }
}

/// Every adapter of a model, in one flat f32 buffer.
#[derive(Clone, Debug)]
pub struct LoraParams {
    /// Hyper-parameters shared by every slot.
    pub config: LoraConfig,
    /// One per adapted projection, in buffer order.
    pub slots: Vec<LoraSlot>,
    /// Every A and B, concatenated as the slots' ranges say (row-major within each).
    pub values: Vec<f32>,
    /// Layers of the model the adapters belong to (to tell "every layer" from a subset).
    pub model_layers: usize,
    /// The module path of the model's layers in PEFT's keys: `model.layers`, or
    /// `model.language_model.layers` for a multimodal checkpoint's language model
    /// ([`LlamaConfig::layers_module`]).
    pub layers_module: &'static str,
}

impl LoraParams {
    /// Zero-filled adapters for every layer × target, laid out layer by layer, A then B.
    pub fn zeros(model: &LlamaConfig, config: LoraConfig) -> Result<LoraParams> {
        let all: Vec<usize> = (0..model.num_layers).collect();
        LoraParams::zeros_on_layers(model, config, &all)
    }

    /// Zero-filled adapters on the given layers only (PEFT's `layers_to_transform`).
    pub fn zeros_on_layers(
        model: &LlamaConfig,
        config: LoraConfig,
        layers: &[usize],
    ) -> Result<LoraParams> {
        config.validate()?;
        let config = LoraConfig {
            targets: Target::resolve(&config.targets, model)?,
            ..config
        };
        if let Some(&bad) = layers.iter().find(|&&l| l >= model.num_layers) {
            return Err(Error::InvalidArgument(format!(
                "LoRA layer {bad} does not exist: the model has {} layers",
                model.num_layers
            )));
        }
        // The binding projection: the adapted one with the smallest min(in, out).
        if let Some((target, (i, o))) = config
            .targets
            .iter()
            .map(|&t| (t, t.dims(model)))
            .min_by_key(|(_, (i, o))| (*i).min(*o))
        {
            if config.rank > i.min(o) {
                return Err(Error::InvalidArgument(format!(
                    "LoRA rank {} is larger than {target:?}'s smaller dimension ({}; the \
                     projection is {o} × {i}): a rank above min(in, out) adds parameters and \
                     nothing else",
                    config.rank,
                    i.min(o)
                )));
            }
        }
        let mut layers = layers.to_vec();
        layers.sort_unstable();
        layers.dedup();
        let mut slots = Vec::new();
        let mut at = 0;
        for layer in layers {
            for &target in &config.targets {
                let (i, o) = target.dims(model);
                slots.push(LoraSlot::at(layer, target, i, o, config.rank, &mut at));
            }
        }
        // Refused with the size, never an abort in the allocator.
        let mut values = Vec::new();
        values.try_reserve_exact(at).map_err(|_| {
            Error::InvalidArgument(format!(
                "cannot allocate {:.1} GiB for {at} LoRA parameters (rank {}): lower --rank or \
                 adapt fewer --targets",
                (at * 4) as f64 / (1u64 << 30) as f64,
                config.rank
            ))
        })?;
        values.resize(at, 0.0);
        Ok(LoraParams {
            config,
            slots,
            values,
            model_layers: model.num_layers,
            layers_module: model.layers_module(),
        })
    }

    /// PEFT's initialisation: A ~ U(−1/√in, 1/√in), B = 0, from `seed`.
    pub fn init(model: &LlamaConfig, config: LoraConfig, seed: u64) -> Result<LoraParams> {
        let all: Vec<usize> = (0..model.num_layers).collect();
        LoraParams::init_on_layers(model, config, &all, seed)
    }

    /// [`LoraParams::init`] on the given layers only.
    pub fn init_on_layers(
        model: &LlamaConfig,
        config: LoraConfig,
        layers: &[usize],
        seed: u64,
    ) -> Result<LoraParams> {
        let mut p = LoraParams::zeros_on_layers(model, config, layers)?;
        p.init_a(seed);
        Ok(p)
    }

    /// PEFT's A: U(−1/√in, 1/√in) for every slot, in slot order, from `seed` (B stays as is).
    fn init_a(&mut self, seed: u64) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for s in &self.slots {
            let bound = 1.0 / (s.in_features as f32).sqrt();
            for v in &mut self.values[s.a.clone()] {
                *v = rng.random_range(-bound..bound);
            }
        }
    }

    /// PEFT's initialisation for a model of one's own: one adapter per `(layer, target, in,
    /// out)` (a projection `[out, in]`), laid out in the order given, A then B, of a model with
    /// `model_layers` blocks. `config.targets` is ignored here; the list is the targets.
    pub fn init_for(
        config: LoraConfig,
        projections: &[(usize, Target, usize, usize)],
        model_layers: usize,
        seed: u64,
    ) -> Result<LoraParams> {
        config.validate()?;
        let mut slots = Vec::with_capacity(projections.len());
        let mut at = 0;
        for &(layer, target, i, o) in projections {
            if layer >= model_layers || config.rank > i.min(o) {
                return Err(Error::InvalidArgument(format!(
                    "LoRA on layer {layer} {} ({o} × {i}): the model has {model_layers} layers \
                     and the rank {} must not exceed min(in, out)",
                    target.module(),
                    config.rank
                )));
            }
            if slots
                .iter()
                .any(|s: &LoraSlot| s.layer == layer && s.target == target)
            {
                return Err(Error::InvalidArgument(format!(
                    "two adapters for layer {layer} {}",
                    target.module()
                )));
            }
            slots.push(LoraSlot::at(layer, target, i, o, config.rank, &mut at));
        }
        let mut p = LoraParams {
            config,
            slots,
            values: vec![0.0; at],
            model_layers,
            layers_module: "model.layers",
        };
        p.init_a(seed);
        Ok(p)
    }

    /// The layers that carry adapters, ascending.
    pub fn layers(&self) -> Vec<usize> {
        let mut l: Vec<usize> = self.slots.iter().map(|s| s.layer).collect();
        l.dedup();
        l
    }

    /// Index of the slot of `(layer, target)`, if that projection is adapted.
    pub fn slot(&self, layer: usize, target: Target) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.layer == layer && s.target == target)
    }

    /// The same adapters at a larger `rank`: A gains zero rows and B zero columns, and `alpha` is
    /// rescaled so that [`LoraConfig::scale`] is unchanged. The product B·A, the forward and the
    /// gradients of the original entries are exactly those of `self`; the padded entries get zero
    /// gradient (dA's extra rows meet B's zero columns, dB's extra columns meet A's zero rows), so
    /// AdamW (zero gradient, zero weight, zero moments) keeps them zero. The CUDA kernels need
    /// ranks in multiples of 8; this is how other ranks train there.
    pub fn padded_to_rank(&self, rank: usize) -> Result<LoraParams> {
        let r = self.config.rank;
        if rank < r {
            return Err(Error::InvalidArgument(format!(
                "cannot pad LoRA rank {r} down to {rank}"
            )));
        }
        let ratio = rank as f64 / r as f64;
        let config = LoraConfig {
            rank,
            alpha: if self.config.rslora {
                self.config.alpha * ratio.sqrt()
            } else {
                self.config.alpha * ratio
            },
            ..self.config.clone()
        };
        let mut slots = Vec::with_capacity(self.slots.len());
        let mut at = 0;
        for s in &self.slots {
            slots.push(LoraSlot::at(
                s.layer,
                s.target,
                s.in_features,
                s.out_features,
                rank,
                &mut at,
            ));
        }
        let mut padded = LoraParams {
            config,
            slots,
            values: vec![0.0; at],
            model_layers: self.model_layers,
            layers_module: self.layers_module,
        };
        padded.values = padded.repack_from(self, &self.values);
        Ok(padded)
    }

    /// Moves a flat buffer laid out like `from` (its values, gradients or AdamW moments) into the
    /// layout of `self`, which holds the same slots at another rank: the common leading rows of
    /// each A and columns of each B are copied, the rest of `self`'s layout is zero.
    pub fn repack_from(&self, from: &LoraParams, buf: &[f32]) -> Vec<f32> {
        assert_eq!(buf.len(), from.layout_len(), "buffer laid out like `from`");
        assert_eq!(self.slots.len(), from.slots.len(), "the same slots");
        let (rt, rf) = (self.config.rank, from.config.rank);
        let r = rt.min(rf);
        let mut out = vec![0.0; self.layout_len()];
        for (t, f) in self.slots.iter().zip(&from.slots) {
            let i = t.in_features;
            // A [rank, in]: rows are contiguous.
            out[t.a.start..t.a.start + r * i].copy_from_slice(&buf[f.a.start..f.a.start + r * i]);
            // B [out, rank]: the first r entries of each row.
            for row in 0..t.out_features {
                let (dst, src) = (t.b.start + row * rt, f.b.start + row * rf);
                out[dst..dst + r].copy_from_slice(&buf[src..src + r]);
            }
        }
        out
    }

    /// Length of the flat buffer the slots describe (equal to `len()` unless `values` is empty
    /// because only the layout is kept).
    pub(crate) fn layout_len(&self) -> usize {
        self.slots.last().map_or(0, |s| s.b.end)
    }

    /// Number of trainable parameters.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether there is no trainable parameter.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The PEFT key of a slot's A or B (`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`;
    /// `…model.language_model.layers.3…` on a multimodal checkpoint's language model).
    pub fn peft_key(&self, slot: &LoraSlot, which: char) -> String {
        slot.peft_key(self.layers_module, which)
    }
}
