//! LoRA adapters where the model lives: fp32 master weights, their gradients and the AdamW state,
//! each one flat buffer on the model's device, laid out like [`LoraParams::values`]. On a GPU the
//! buffers hold every adapter at its rank rounded up to a multiple of 8 (the GEMM tiles' need;
//! [`LoraParams::padded_to_rank`] shows the padding is exact) and a bf16 mirror of the weights
//! feeds the GEMMs; on the CPU they are the configured layout itself.
//!
//! The tape ([`crate::autograd::Tape`]) reads an adapter's weights and accumulates its gradients
//! (`+=`, fp32) here; [`Adapters::step`] clips the global gradient norm and applies AdamW on the
//! same device. Nothing comes back to the host except through the `*_to_host` methods.

use std::cell::RefCell;
use std::ops::Range;

use super::lora::{LoraConfig, LoraParams, LoraSlot, Target};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::gemm::{DevMat, LoraView};
use crate::tensor::{DType, Tensor};
use crate::train::optimizer::{clip_grad_norm, AdamW, AdamWConfig, AdamWCuda};

/// (One per set of adapters: the variants' size difference does not matter.)
#[allow(clippy::large_enum_variant)]
enum Optimizer {
    /// The CPU's AdamW, the norm of the last step, and the first step whose gradients were not
    /// finite (its update and every later one skipped, as the GPU's kernel does).
    Cpu {
        adamw: AdamW,
        last_norm: f64,
        first_bad: Option<u64>,
    },
    Cuda(AdamWCuda),
}

/// The adapters of a model on its device, with their gradients and optimizer state.
pub struct Adapters {
    /// The adapters' layout as configured, which [`Adapters::to_host`] returns (values empty).
    host: LoraParams,
    /// The device layout (values empty): `host` on the CPU, padded to a rank multiple of 8 on a GPU.
    layout: LoraParams,
    device: Device,
    master: Tensor,
    /// bf16 copy of `master` for the GEMMs (GPU only), refreshed after every step.
    mirror: Option<Tensor>,
    grads: RefCell<Tensor>,
    optimizer: Optimizer,
}

/// One adapter as an op sees it: host slices on the CPU, device views on a GPU.
pub(crate) enum SlotRef<'a> {
    Cpu {
        slot: &'a LoraSlot,
        a: &'a [f32],
        b: &'a [f32],
        rank: usize,
        scale: f32,
    },
    Cuda(LoraView),
}

impl Adapters {
    /// `p` (and, when given, its AdamW state `adam`) on `device`.
    pub fn new(
        p: &LoraParams,
        adam: Option<&AdamW>,
        config: AdamWConfig,
        device: Device,
    ) -> Result<Adapters> {
        if let Some(a) = adam {
            if a.m.len() != p.len() || a.v.len() != p.len() {
                return Err(Error::ShapeMismatch {
                    op: "Adapters::new (AdamW state)",
                    expected: format!("{} moments", p.len()),
                    got: format!("{} and {}", a.m.len(), a.v.len()),
                });
            }
        }
        let host = LoraParams {
            values: Vec::new(),
            ..p.clone()
        };
        match device {
            Device::Cpu => {
                let n = p.len();
                let adamw = match adam {
                    Some(a) => AdamW {
                        config,
                        ..a.clone()
                    },
                    None => AdamW::new(config, n),
                };
                Ok(Adapters {
                    layout: host.clone(),
                    host,
                    device,
                    master: Tensor::from_vec(p.values.clone(), &[n], &device)?,
                    mirror: None,
                    grads: RefCell::new(Tensor::zeros(&[n], DType::F32, &device)?),
                    optimizer: Optimizer::Cpu {
                        adamw,
                        last_norm: 0.0,
                        first_bad: None,
                    },
                })
            }
            Device::Cuda(ordinal) => {
                let mut padded = p.padded_to_rank(p.config.rank.div_ceil(8) * 8)?;
                let n = padded.len();
                let master = Tensor::from_vec(std::mem::take(&mut padded.values), &[n], &device)?;
                let mut mirror = Tensor::uninit(&[n], DType::BF16, &device)?;
                crate::ops::embedding::cast_into_cuda(&master, &mut mirror)?;
                let mut optimizer = AdamWCuda::new(config, n, ordinal)?;
                if let Some(a) = adam {
                    optimizer.load(&AdamW {
                        config: a.config,
                        step: a.step,
                        m: padded.repack_from(p, &a.m),
                        v: padded.repack_from(p, &a.v),
                    })?;
                }
                Ok(Adapters {
                    host,
                    layout: padded,
                    device,
                    master,
                    mirror: Some(mirror),
                    grads: RefCell::new(Tensor::zeros(&[n], DType::F32, &device)?),
                    optimizer: Optimizer::Cuda(optimizer),
                })
            }
        }
    }

    /// The device the adapters live on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// The adapters' configuration (rank as configured, not as padded on a GPU).
    pub fn config(&self) -> &LoraConfig {
        &self.host.config
    }

    /// Trainable parameters (at the configured rank).
    pub fn len(&self) -> usize {
        self.host.layout_len()
    }

    /// True when no projection is adapted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The adapter of (`layer`, `target`), as the ops read it; `dropout` is the micro-batch's
    /// dropout (probability, seed), from which each adapter's mask stream is derived.
    pub(crate) fn slot_ref(
        &self,
        layer: usize,
        target: Target,
        dropout: Option<(f32, u64)>,
    ) -> Result<Option<SlotRef<'_>>> {
        let Some(s) = self
            .layout
            .slots
            .iter()
            .find(|s| s.layer == layer && s.target == target)
        else {
            return Ok(None);
        };
        let scale = self.host.config.scale();
        let r = self.layout.config.rank;
        match self.device {
            Device::Cpu => {
                let values = self.master.cpu_slice::<f32>("LoRA adapters")?;
                Ok(Some(SlotRef::Cpu {
                    slot: s,
                    a: &values[s.a.clone()],
                    b: &values[s.b.clone()],
                    rank: r,
                    scale,
                }))
            }
            Device::Cuda(_) => {
                let mirror = self
                    .mirror
                    .as_ref()
                    .expect("a GPU's adapters have a mirror");
                let grads = self.grads.borrow();
                let at = |buf: &Tensor, range: &Range<usize>, width: u64| {
                    buf.device_address() + range.start as u64 * width
                };
                Ok(Some(SlotRef::Cuda(LoraView {
                    a: DevMat {
                        ptr: at(mirror, &s.a, 2),
                        rows: r,
                        cols: s.in_features,
                    },
                    b: DevMat {
                        ptr: at(mirror, &s.b, 2),
                        rows: s.out_features,
                        cols: r,
                    },
                    grad_a: at(&grads, &s.a, 4),
                    grad_b: at(&grads, &s.b, 4),
                    scale,
                    dropout: dropout.map(|(p, seed)| {
                        (
                            p,
                            crate::ops::dropout::stream_seed(seed, layer, target as u64),
                        )
                    }),
                })))
            }
        }
    }

    /// The gradient buffer, for the CPU ops to accumulate into.
    pub(crate) fn grads_mut(&self) -> std::cell::RefMut<'_, Tensor> {
        self.grads.borrow_mut()
    }

    /// Zeroes the gradient buffer (once per optimizer step), in place.
    pub fn zero_grads(&mut self) -> Result<()> {
        let op = "zeroing the LoRA gradients";
        let grads = self.grads.get_mut();
        match self.device {
            Device::Cpu => {
                grads.cpu_slice_mut::<f32>(op)?.fill(0.0);
                Ok(())
            }
            Device::Cuda(o) => {
                let cuda = crate::device::cuda::CudaDevice::get(o)?;
                cuda.stream()
                    .memset_zeros(grads.cuda_slice_mut::<f32>(op)?)
                    .map_err(Error::cuda(op))
            }
        }
    }

    /// Clips the global gradient norm to `max_grad_norm` and applies AdamW at `lr`. Gradients that
    /// are not finite skip the update (and every later one), recording the step for
    /// [`Adapters::first_non_finite_step`]. Returns the norm before clipping where it is known
    /// without synchronising (the CPU); on a GPU it is read with [`Adapters::grad_norm`].
    pub fn step(&mut self, lr: f64, max_grad_norm: f64) -> Result<Option<f64>> {
        let grads = self.grads.get_mut();
        match &mut self.optimizer {
            Optimizer::Cpu {
                adamw,
                last_norm,
                first_bad,
            } => {
                let g = grads.cpu_slice_mut::<f32>("adamw")?;
                let norm = clip_grad_norm(g, max_grad_norm);
                *last_norm = norm;
                if first_bad.is_none() && !norm.is_finite() {
                    *first_bad = Some(adamw.step + 1);
                }
                if first_bad.is_none() {
                    adamw.step(self.master.cpu_slice_mut::<f32>("adamw")?, g, lr)?;
                }
                Ok(Some(norm))
            }
            Optimizer::Cuda(opt) => {
                opt.step(&mut self.master, grads, lr, max_grad_norm)?;
                let mirror = self
                    .mirror
                    .as_mut()
                    .expect("a GPU's adapters have a mirror");
                crate::ops::embedding::cast_into_cuda(&self.master, mirror)?;
                Ok(None)
            }
        }
    }

    /// The global gradient norm of the last step, before clipping (on a GPU this synchronises:
    /// for logging only).
    pub fn grad_norm(&self) -> Result<f64> {
        match &self.optimizer {
            Optimizer::Cpu { last_norm, .. } => Ok(*last_norm),
            Optimizer::Cuda(opt) => opt.grad_norm(),
        }
    }

    /// The first optimizer step whose gradients were not finite (its update and later ones were
    /// skipped), if any. Synchronises on a GPU.
    pub fn first_non_finite_step(&self) -> Result<Option<u64>> {
        match &self.optimizer {
            Optimizer::Cpu { first_bad, .. } => Ok(*first_bad),
            Optimizer::Cuda(opt) => opt.first_non_finite_step(),
        }
    }

    /// The adapters on the host, at their configured rank.
    pub fn to_host(&self) -> Result<LoraParams> {
        Ok(LoraParams {
            values: self.host.repack_from(&self.layout, &self.master.to_vec()?),
            ..self.host.clone()
        })
    }

    /// The accumulated gradients on the host, laid out like [`Adapters::to_host`]'s values.
    pub fn grads_to_host(&self) -> Result<Vec<f32>> {
        Ok(self
            .host
            .repack_from(&self.layout, &self.grads.borrow().to_vec()?))
    }

    /// The AdamW state on the host, laid out like [`Adapters::to_host`]'s values (checkpoints).
    pub fn optimizer_to_host(&self) -> Result<AdamW> {
        match &self.optimizer {
            Optimizer::Cpu { adamw, .. } => Ok(adamw.clone()),
            Optimizer::Cuda(opt) => {
                let a = opt.to_host()?;
                Ok(AdamW {
                    m: self.host.repack_from(&self.layout, &a.m),
                    v: self.host.repack_from(&self.layout, &a.v),
                    ..a
                })
            }
        }
    }

    /// Checks that every adapter fits a model of configuration `c`.
    pub(crate) fn check_fits(&self, c: &super::config::LlamaConfig) -> Result<()> {
        check_fits(&self.host, c)
    }
}

/// Checks that every adapter of `l` fits a model of configuration `c` (layer and dimensions).
pub(crate) fn check_fits(l: &LoraParams, c: &super::config::LlamaConfig) -> Result<()> {
    for s in &l.slots {
        if !c.targets().contains(&s.target) {
            return Err(Error::InvalidArgument(format!(
                "LoRA adapter for layer {} {}: the model ({:?}) has no such projection (its \
                 projections: {})",
                s.layer,
                s.target.module(),
                c.arch,
                c.targets()
                    .iter()
                    .map(|t| t.module())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let (i, o) = s.target.dims(c);
        if s.layer >= c.num_layers || s.in_features != i || s.out_features != o {
            return Err(Error::InvalidArgument(format!(
                "LoRA adapter for layer {} {} is {}→{}, the model has {} layers and {}→{}",
                s.layer,
                s.target.module(),
                s.in_features,
                s.out_features,
                c.num_layers,
                i,
                o
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora::LoraConfig;

    #[test]
    fn cpu_adapters_round_trip_and_count_their_parameters() {
        let cfg = LoraConfig {
            rank: 3,
            alpha: 6.0,
            rslora: false,
            dropout: 0.0,
            targets: vec![Target::Q, Target::Down],
        };
        let shapes = [(0, Target::Q, 16, 16), (1, Target::Down, 40, 16)];
        let p = LoraParams::init_for(cfg, &shapes, 2, 7).unwrap();
        let mut a = Adapters::new(&p, None, AdamWConfig::default(), Device::Cpu).unwrap();
        assert_eq!(a.len(), p.len());
        assert_eq!(a.len(), 3 * 16 + 16 * 3 + 3 * 40 + 16 * 3);
        assert_eq!(a.to_host().unwrap().values, p.values);
        // Zero gradients: a step leaves the weights (no weight decay) and reports norm 0.
        a.zero_grads().unwrap();
        assert_eq!(a.step(1e-2, 1.0).unwrap(), Some(0.0));
        assert_eq!(a.to_host().unwrap().values, p.values);
        assert_eq!(a.optimizer_to_host().unwrap().step, 1);
        // A non-finite gradient skips the update and names the step.
        a.grads_mut().cpu_slice_mut::<f32>("test").unwrap()[5] = f32::NAN;
        assert!(a.step(1e-2, 1.0).unwrap().unwrap().is_nan());
        assert_eq!(a.first_non_finite_step().unwrap(), Some(2));
        assert_eq!(a.to_host().unwrap().values, p.values);
    }
}
