//! The training step on the GPU: the same decoder as `model::llama`, with every op on our CUDA
//! kernels — bf16 activations, NF4 base weights dequantized inside the GEMMs, fp32 LoRA master
//! weights, gradients and AdamW state in flat device buffers (a bf16 mirror of the weights feeds
//! the GEMMs), per-layer recomputation (only each layer's input is kept), and the chunked
//! lm_head + cross-entropy. The CPU model is its reference (`GPU = CPU` test).
//!
//! Per layer, forward: `n1 = rmsnorm(x)`, `q,k,v = NF4-GEMM + LoRA`, RoPE, flash attention,
//! `a = o·Woᵀ + LoRA`, `h1 = x + a` fused with `n2 = rmsnorm(h1)`, `s = swiglu(gate, up)`,
//! `out = h1 + down(s)`. Backward: the replayed layer's values, then
//! `ds = down_bwd(dout)`, `dg, du = swiglu_bwd`, `dn2 = gate_bwd + up_bwd`,
//! `dh1 = rmsnorm_bwd(dn2) + dout`, `do = o_bwd(dh1)`, `dq, dk, dv = attention_bwd`, RoPE⁻¹,
//! `dn1 = q_bwd + k_bwd + v_bwd`, `dx = rmsnorm_bwd(dn1) + dh1`.

use std::ops::Range;

use super::config::LlamaConfig;
use super::llama::{BaseWeight, Llama};
use super::lora::{LoraConfig, LoraParams, Target};
use crate::autograd::{Batch, Frozen, NormId};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::gemm::{self, DevMat, LoraView};
use crate::ops::{attention, cross_entropy, embedding, rmsnorm, rope, swiglu};
use crate::quant::nf4::{Nf4Config, Nf4Tensor};
use crate::tensor::{DType, Tensor};
use crate::train::optimizer::{AdamW, AdamWConfig, AdamWCuda};

fn bf16_tensor(v: &[f32], shape: &[usize], dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(
        v.iter()
            .map(|&x| half::bf16::from_f32(x))
            .collect::<Vec<_>>(),
        shape,
        dev,
    )
}

/// The frozen model on one GPU.
pub struct CudaLlama {
    pub config: LlamaConfig,
    device: Device,
    embed: Tensor,
    lm_head: Option<Tensor>,
    norm_in: Vec<Tensor>,
    norm_post: Vec<Tensor>,
    norm: Tensor,
    /// `[layer][Target as usize]`.
    proj: Vec<Vec<Nf4Tensor>>,
    /// Frozen projection biases (Qwen2's q/k/v), bf16, `[layer][Target as usize]`.
    bias: Vec<Vec<Option<Tensor>>>,
    freqs: Tensor,
}

/// The adapters on the GPU: fp32 master weights, their bf16 mirror, fp32 gradients and AdamW
/// state, each one flat buffer laid out like [`LoraParams::values`] at the rank rounded up to a
/// multiple of 8 (the GEMM tiles' need; [`LoraParams::padded_to_rank`] shows the padding is exact).
pub struct CudaLora {
    /// The adapters' layout as configured, which [`CudaLora::to_host`] returns (values empty).
    host: LoraParams,
    /// The device layout (values empty).
    layout: LoraParams,
    master: Tensor,
    mirror: Tensor,
    grads: Tensor,
    optimizer: AdamWCuda,
    /// Seed of the current micro-batch's dropout masks (None: no dropout).
    dropout_seed: Option<u64>,
}

impl CudaLlama {
    /// Moves a loaded model to GPU `ordinal` (projections quantized to NF4 on the device when
    /// the model holds them dense).
    pub fn from_llama(model: &Llama, ordinal: usize) -> Result<CudaLlama> {
        let c = model.config.clone();
        if c.head_dim != 64 && c.head_dim != 128 {
            return Err(Error::InvalidArgument(format!(
                "the CUDA step needs head_dim 64 or 128 (flash attention); this model has {}",
                c.head_dim
            )));
        }
        let dev = Device::Cuda(ordinal);
        let d = c.hidden_size;
        let embed = bf16_tensor(model.embedding(), &[c.vocab_size, d], &dev)?;
        let lm_head = model
            .lm_head()
            .map(|w| bf16_tensor(w, &[c.vocab_size, d], &dev))
            .transpose()?;
        let mut norm_in = Vec::with_capacity(c.num_layers);
        let mut norm_post = Vec::with_capacity(c.num_layers);
        let mut proj = Vec::with_capacity(c.num_layers);
        let mut bias = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            norm_in.push(bf16_tensor(model.norm(NormId::Input(l)), &[d], &dev)?);
            norm_post.push(bf16_tensor(
                model.norm(NormId::PostAttention(l)),
                &[d],
                &dev,
            )?);
            let mut layer = Vec::with_capacity(7);
            for t in Target::ALL {
                let (i, o) = t.dims(&c);
                layer.push(match model.base(l, t) {
                    BaseWeight::Nf4(q) => q.to_device(&dev)?,
                    BaseWeight::Dense(w) => {
                        Nf4Tensor::quantize(&bf16_tensor(w, &[o, i], &dev)?, Nf4Config::default())?
                    }
                });
            }
            proj.push(layer);
            bias.push(
                Target::ALL
                    .iter()
                    .map(|&t| {
                        model
                            .bias(l, t)
                            .map(|b| bf16_tensor(b, &[b.len()], &dev))
                            .transpose()
                    })
                    .collect::<Result<Vec<_>>>()?,
            );
        }
        let norm = bf16_tensor(model.norm(NormId::Final), &[d], &dev)?;
        let freqs = Tensor::from_vec(model.rope_freqs().to_vec(), &[c.head_dim / 2], &dev)?;
        Ok(CudaLlama {
            config: c,
            device: dev,
            embed,
            lm_head,
            norm_in,
            norm_post,
            norm,
            proj,
            bias,
            freqs,
        })
    }

    /// The GPU this model lives on.
    pub fn config_ordinal(&self) -> usize {
        match self.device {
            Device::Cuda(o) => o,
            Device::Cpu => unreachable!("a CudaLlama lives on a GPU"),
        }
    }

    fn out_embedding(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    fn linear(
        &self,
        lora: Option<&CudaLora>,
        l: usize,
        t: Target,
        x: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let w = &self.proj[l][t as usize];
        let (mut y, xa) = match lora.and_then(|a| a.view(l, t)) {
            Some(view) => {
                let (y, xa) = gemm::lora_forward_view(x, w, &view)?;
                (y, Some(xa))
            }
            None => (gemm::nf4_forward_cuda(x, w, None)?, None),
        };
        // The bias is frozen: nothing to do for it in the backward.
        if let Some(b) = &self.bias[l][t as usize] {
            embedding::bias_add_cuda(&mut y, b)?;
        }
        Ok((y, xa))
    }

    fn linear_bwd(
        &self,
        lora: Option<&CudaLora>,
        l: usize,
        t: Target,
        x: &Tensor,
        xa: Option<&Tensor>,
        dy: &Tensor,
    ) -> Result<Tensor> {
        let w = &self.proj[l][t as usize];
        match (lora.and_then(|a| a.view(l, t)), xa) {
            (Some(view), Some(xa)) => gemm::lora_backward_view(x, w, &view, xa, dy),
            _ => gemm::nf4_dx_cuda(dy, w),
        }
    }

    /// One decoder layer; with `keep`, every value its backward needs.
    fn layer(
        &self,
        lora: Option<&CudaLora>,
        l: usize,
        x: &Tensor,
        b: &StepBatch,
        keep: bool,
    ) -> Result<(Tensor, Option<Saved>)> {
        let c = &self.config;
        let t = b.tokens;
        let eps = c.rms_norm_eps;
        let (n1, r1) = rmsnorm::forward_cuda(x, &self.norm_in[l], eps)?;
        let (mut q, xa_q) = self.linear(lora, l, Target::Q, &n1)?;
        let (mut k, xa_k) = self.linear(lora, l, Target::K, &n1)?;
        let (mut v, xa_v) = self.linear(lora, l, Target::V, &n1)?;
        q.reshape_in_place(&[t, c.num_heads, c.head_dim])?;
        k.reshape_in_place(&[t, c.num_kv_heads, c.head_dim])?;
        v.reshape_in_place(&[t, c.num_kv_heads, c.head_dim])?;
        rope::apply_cuda(&mut q, &b.positions, &self.freqs, false)?;
        rope::apply_cuda(&mut k, &b.positions, &self.freqs, false)?;
        let dims = attention::Dims {
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        let (mut o, lse) = attention::forward_cuda(dims, &q, &k, &v, &b.cu_seqlens)?;
        o.reshape_in_place(&[t, c.q_dim()])?;
        let (a, xa_o) = self.linear(lora, l, Target::O, &o)?;
        let (h1, n2, r2) = rmsnorm::forward_residual_cuda(x, &a, &self.norm_post[l], eps)?;
        let (g, xa_g) = self.linear(lora, l, Target::Gate, &n2)?;
        let (u, xa_u) = self.linear(lora, l, Target::Up, &n2)?;
        let s = swiglu::forward_cuda(&g, &u)?;
        let (dn, xa_d) = self.linear(lora, l, Target::Down, &s)?;
        let out = embedding::add_cuda(&h1, &dn)?;
        let saved = keep.then(|| Saved {
            n1,
            r1,
            q,
            k,
            v,
            o,
            lse,
            h1,
            n2,
            r2,
            g,
            u,
            s,
            xa: [xa_q, xa_k, xa_v, xa_o, xa_g, xa_u, xa_d],
        });
        Ok((out, saved))
    }

    /// The backward of layer `l` from its input `x` (replayed) and the gradient of its output.
    fn layer_bwd(
        &self,
        lora: &CudaLora,
        l: usize,
        x: &Tensor,
        dout: &Tensor,
        b: &StepBatch,
    ) -> Result<Tensor> {
        let c = &self.config;
        let t = b.tokens;
        let (_, sv) = self.layer(Some(lora), l, x, b, true)?;
        let mut sv = sv.expect("kept");
        let xa = |i: Target| sv.xa[i as usize].as_ref();
        let ds = self.linear_bwd(Some(lora), l, Target::Down, &sv.s, xa(Target::Down), dout)?;
        let (dg, du) = swiglu::backward_cuda(&sv.g, &sv.u, &ds)?;
        let dn2 = embedding::add_cuda(
            &self.linear_bwd(Some(lora), l, Target::Gate, &sv.n2, xa(Target::Gate), &dg)?,
            &self.linear_bwd(Some(lora), l, Target::Up, &sv.n2, xa(Target::Up), &du)?,
        )?;
        let dh1 = rmsnorm::backward_cuda(&sv.h1, &self.norm_post[l], &sv.r2, &dn2, Some(dout))?;
        let mut d_o = self.linear_bwd(Some(lora), l, Target::O, &sv.o, xa(Target::O), &dh1)?;
        d_o.reshape_in_place(&[t, c.num_heads, c.head_dim])?;
        sv.o.reshape_in_place(&[t, c.num_heads, c.head_dim])?;
        let dims = attention::Dims {
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        let (mut dq, mut dk, mut dv) = attention::backward_cuda(
            dims,
            &sv.q,
            &sv.k,
            &sv.v,
            &sv.o,
            &sv.lse,
            &d_o,
            &b.cu_seqlens,
        )?;
        rope::apply_cuda(&mut dq, &b.positions, &self.freqs, true)?;
        rope::apply_cuda(&mut dk, &b.positions, &self.freqs, true)?;
        dq.reshape_in_place(&[t, c.q_dim()])?;
        dk.reshape_in_place(&[t, c.kv_dim()])?;
        dv.reshape_in_place(&[t, c.kv_dim()])?;
        let xa = |i: Target| sv.xa[i as usize].as_ref();
        let dn1 = embedding::add_cuda(
            &embedding::add_cuda(
                &self.linear_bwd(Some(lora), l, Target::Q, &sv.n1, xa(Target::Q), &dq)?,
                &self.linear_bwd(Some(lora), l, Target::K, &sv.n1, xa(Target::K), &dk)?,
            )?,
            &self.linear_bwd(Some(lora), l, Target::V, &sv.n1, xa(Target::V), &dv)?,
        )?;
        rmsnorm::backward_cuda(x, &self.norm_in[l], &sv.r1, &dn1, Some(&dh1))
    }

    fn batch(&self, ids: &[u32], cu_seqlens: &[usize]) -> Result<StepBatch> {
        let b = Batch::new(cu_seqlens.to_vec())?;
        if b.tokens() != ids.len() {
            return Err(Error::ShapeMismatch {
                op: "cuda step",
                expected: format!("{} token ids (cu_seqlens ends there)", b.tokens()),
                got: format!("{}", ids.len()),
            });
        }
        let positions: Vec<i32> = b.positions.iter().map(|&p| p as i32).collect();
        Ok(StepBatch {
            tokens: ids.len(),
            positions: Tensor::from_vec(positions, &[ids.len()], &self.device)?,
            cu_seqlens: cu_seqlens.to_vec(),
        })
    }

    /// Forward and backward of one packed micro-batch; LoRA gradients accumulate (scaled by
    /// `grad_scale`) in the adapters' gradient buffer. Returns the per-token losses (on the
    /// device, read back only when logged) and the counted tokens.
    pub fn forward_backward(
        &self,
        lora: &mut CudaLora,
        ids: &[u32],
        labels: &[i64],
        cu_seqlens: &[usize],
        grad_scale: f32,
    ) -> Result<(Tensor, usize)> {
        let b = self.batch(ids, cu_seqlens)?;
        let targets = cross_entropy::shift_labels(labels, cu_seqlens);
        let mut inputs = Vec::with_capacity(self.config.num_layers);
        let mut h = embedding::forward_cuda(&self.embed, ids)?;
        for l in 0..self.config.num_layers {
            let (out, _) = self.layer(Some(lora), l, &h, &b, false)?;
            inputs.push(h);
            h = out;
        }
        let (n, r) = rmsnorm::forward_cuda(&h, &self.norm, self.config.rms_norm_eps)?;
        let ce = cross_entropy::lm_head_ce_cuda(
            &n,
            self.out_embedding(),
            &targets,
            grad_scale,
            cross_entropy::DEFAULT_CHUNK,
        )?;
        let mut dh = rmsnorm::backward_cuda(&h, &self.norm, &r, &ce.dh, None)?;
        for l in (0..self.config.num_layers).rev() {
            dh = self.layer_bwd(lora, l, &inputs[l], &dh, &b)?;
        }
        Ok((ce.loss, ce.count))
    }

    /// Loss of a packed batch without gradients (evaluation): per-token losses and the count.
    pub fn loss(
        &self,
        lora: Option<&CudaLora>,
        ids: &[u32],
        labels: &[i64],
        cu_seqlens: &[usize],
    ) -> Result<(Tensor, usize)> {
        let b = self.batch(ids, cu_seqlens)?;
        let targets = cross_entropy::shift_labels(labels, cu_seqlens);
        let mut h = embedding::forward_cuda(&self.embed, ids)?;
        for l in 0..self.config.num_layers {
            h = self.layer(lora, l, &h, &b, false)?.0;
        }
        let (n, _) = rmsnorm::forward_cuda(&h, &self.norm, self.config.rms_norm_eps)?;
        let ce = cross_entropy::lm_head_ce_cuda(
            &n,
            self.out_embedding(),
            &targets,
            0.0,
            cross_entropy::DEFAULT_CHUNK,
        )?;
        Ok((ce.loss, ce.count))
    }
}

impl CudaLlama {
    /// Logits `[vocab]` (f32) of the last position of one sequence `ids`, for generation. There
    /// is no KV cache on the GPU yet: each call runs the whole forward over `ids`, then the final
    /// norm and the lm_head on the last row only.
    pub fn last_logits(&self, lora: Option<&CudaLora>, ids: &[u32]) -> Result<Vec<f32>> {
        let op = "last logits (cuda)";
        let t = ids.len();
        if t == 0 {
            return Err(Error::InvalidArgument(format!("{op}: no tokens")));
        }
        let b = self.batch(ids, &[0, t])?;
        let mut h = embedding::forward_cuda(&self.embed, ids)?;
        for l in 0..self.config.num_layers {
            h = self.layer(lora, l, &h, &b, false)?.0;
        }
        let d = self.config.hidden_size;
        let mut last = Tensor::zeros(&[1, d], DType::BF16, &self.device)?;
        let cuda = crate::device::cuda::CudaDevice::get(self.config_ordinal())?;
        let row = h.cuda_slice::<half::bf16>(op)?.slice((t - 1) * d..t * d);
        cuda.stream()
            .memcpy_dtod(&row, last.cuda_slice_mut::<half::bf16>(op)?)
            .map_err(Error::cuda("copying the last hidden row"))?;
        let (n, _) = rmsnorm::forward_cuda(&last, &self.norm, self.config.rms_norm_eps)?;
        let mut logits = Tensor::zeros(&[1, self.config.vocab_size], DType::F32, &self.device)?;
        gemm::gemm_cuda(
            gemm::Layout::Nt,
            &n,
            self.out_embedding(),
            &mut logits,
            1.0,
            0.0,
        )?;
        logits.to_vec::<f32>()
    }
}

/// A micro-batch's positions (on the device) and sequence boundaries.
struct StepBatch {
    tokens: usize,
    positions: Tensor,
    cu_seqlens: Vec<usize>,
}

/// What a layer's backward needs from its replayed forward.
struct Saved {
    n1: Tensor,
    r1: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    h1: Tensor,
    n2: Tensor,
    r2: Tensor,
    g: Tensor,
    u: Tensor,
    s: Tensor,
    /// `s·x·Aᵀ` of each adapted projection, in [`Target::ALL`] order.
    xa: [Option<Tensor>; 7],
}

impl CudaLora {
    /// Uploads adapters (and, when given, their AdamW state) to GPU `ordinal`.
    pub fn from_params(
        p: &LoraParams,
        adam: Option<&AdamW>,
        config: AdamWConfig,
        ordinal: usize,
    ) -> Result<CudaLora> {
        let mut padded = p.padded_to_rank(p.config.rank.div_ceil(8) * 8)?;
        let n = padded.len();
        let dev = Device::Cuda(ordinal);
        let master = Tensor::from_vec(std::mem::take(&mut padded.values), &[n], &dev)?;
        let mut mirror = Tensor::zeros(&[n], DType::BF16, &dev)?;
        embedding::cast_into_cuda(&master, &mut mirror)?;
        let mut optimizer = AdamWCuda::new(config, n, ordinal)?;
        if let Some(a) = adam {
            if a.m.len() != p.len() || a.v.len() != p.len() {
                return Err(Error::ShapeMismatch {
                    op: "CudaLora::from_params (AdamW state)",
                    expected: format!("{} moments", p.len()),
                    got: format!("{} and {}", a.m.len(), a.v.len()),
                });
            }
            optimizer.load(&AdamW {
                config: a.config,
                step: a.step,
                m: padded.repack_from(p, &a.m),
                v: padded.repack_from(p, &a.v),
            })?;
        }
        Ok(CudaLora {
            host: LoraParams {
                config: p.config.clone(),
                slots: p.slots.clone(),
                values: Vec::new(),
                model_layers: p.model_layers,
            },
            layout: padded,
            master,
            mirror,
            grads: Tensor::zeros(&[n], DType::F32, &dev)?,
            optimizer,
            dropout_seed: None,
        })
    }

    fn view(&self, layer: usize, target: Target) -> Option<LoraView> {
        let s = self
            .layout
            .slots
            .iter()
            .find(|s| s.layer == layer && s.target == target)?;
        let r = self.layout.config.rank;
        let at = |buf: &Tensor, range: &Range<usize>, width: u64| {
            buf.device_ptr() + range.start as u64 * width
        };
        Some(LoraView {
            a: DevMat {
                ptr: at(&self.mirror, &s.a, 2),
                rows: r,
                cols: s.in_features,
            },
            b: DevMat {
                ptr: at(&self.mirror, &s.b, 2),
                rows: s.out_features,
                cols: r,
            },
            grad_a: at(&self.grads, &s.a, 4),
            grad_b: at(&self.grads, &s.b, 4),
            scale: self.host.config.scale(),
            // One mask stream per (micro-batch, layer, projection), as on the CPU.
            dropout: match (self.dropout_seed, self.host.config.dropout) {
                (Some(seed), p) if p > 0.0 => {
                    let stream = (layer as u64) << 8 | target as u64;
                    Some((p as f32, seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
                }
                _ => None,
            },
        })
    }

    /// Sets the dropout seed of the next micro-batch (training); `None` for evaluation.
    pub fn set_dropout_seed(&mut self, seed: Option<u64>) {
        self.dropout_seed = seed;
    }

    /// Zeroes the gradient buffer (once per optimizer step).
    pub fn zero_grads(&mut self) -> Result<()> {
        let dev = self.grads.device();
        self.grads = Tensor::zeros(&[self.grads.elem_count()], DType::F32, &dev)?;
        Ok(())
    }

    /// Clip and AdamW over the flat buffer, then refresh the bf16 mirror.
    pub fn step(&mut self, lr: f64, max_grad_norm: f64) -> Result<()> {
        self.optimizer
            .step(&mut self.master, &self.grads, lr, max_grad_norm)?;
        embedding::cast_into_cuda(&self.master, &mut self.mirror)
    }

    /// The adapters on the host, at their configured rank.
    pub fn to_host(&self) -> Result<LoraParams> {
        let device = self.master.to_vec()?;
        Ok(LoraParams {
            values: self.host.repack_from(&self.layout, &device),
            ..self.host.clone()
        })
    }

    /// The global gradient norm of the last optimizer step, before clipping (synchronises: for
    /// logging only).
    pub fn grad_norm(&self) -> Result<f64> {
        self.optimizer.grad_norm()
    }

    /// The adapters' configuration (rank as configured, not as padded on the device).
    pub fn config(&self) -> &LoraConfig {
        &self.host.config
    }

    /// The AdamW state on the host, laid out like [`CudaLora::to_host`]'s values (checkpoints).
    pub fn optimizer_to_host(&self) -> Result<AdamW> {
        let a = self.optimizer.to_host()?;
        Ok(AdamW {
            m: self.host.repack_from(&self.layout, &a.m),
            v: self.host.repack_from(&self.layout, &a.v),
            ..a
        })
    }
}
