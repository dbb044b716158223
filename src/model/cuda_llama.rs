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

/// The flash-attention kernels take head dims 64 and 128.
fn check_head_dim(c: &LlamaConfig) -> Result<()> {
    if c.head_dim != 64 && c.head_dim != 128 {
        return Err(Error::InvalidArgument(format!(
            "the CUDA step needs head_dim 64 or 128 (flash attention); this model has {}",
            c.head_dim
        )));
    }
    Ok(())
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
        check_head_dim(&c)?;
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

    /// A model of configuration `config` with random weights drawn on GPU `ordinal` itself (the
    /// distribution of [`Llama::random`]: uniform with the spread of N(0, 0.02²), norms 1;
    /// projections quantized to NF4 on the device), so that a benchmark or a memory measurement
    /// of an 8B shape needs no host copy of the model. Tensor `k` of the model draws from stream
    /// `seed ⊕ k·φ` (`ops::random`).
    pub fn random(config: LlamaConfig, ordinal: usize, seed: u64) -> Result<CudaLlama> {
        use crate::ops::random::{uniform_cuda, PHI};
        let c = config;
        check_head_dim(&c)?;
        let dev = Device::Cuda(ordinal);
        let d = c.hidden_size;
        let a = 0.02f32 * 3f32.sqrt();
        let mut k = 0u64;
        let mut draw = |shape: &[usize]| {
            k += 1;
            uniform_cuda(shape, a, seed ^ k.wrapping_mul(PHI), &dev)
        };
        let embed = draw(&[c.vocab_size, d])?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(draw(&[c.vocab_size, d])?)
        };
        let mut proj = Vec::with_capacity(c.num_layers);
        let mut bias = Vec::with_capacity(c.num_layers);
        for _ in 0..c.num_layers {
            let mut layer = Vec::with_capacity(7);
            let mut layer_bias = Vec::with_capacity(7);
            for t in Target::ALL {
                let (i, o) = t.dims(&c);
                // One dense projection at a time exists in bf16, then only its NF4 form.
                layer.push(Nf4Tensor::quantize(&draw(&[o, i])?, Nf4Config::default())?);
                let has_bias = match t {
                    Target::Q | Target::K | Target::V => c.qkv_bias,
                    Target::O => c.o_bias,
                    _ => false,
                };
                layer_bias.push(if has_bias { Some(draw(&[o])?) } else { None });
            }
            proj.push(layer);
            bias.push(layer_bias);
        }
        let ones = || bf16_tensor(&vec![1.0; d], &[d], &dev);
        let norm_in = (0..c.num_layers).map(|_| ones()).collect::<Result<_>>()?;
        let norm_post = (0..c.num_layers).map(|_| ones()).collect::<Result<_>>()?;
        let inv_freq = crate::ops::rope::inv_freq(c.head_dim, c.rope_theta, c.rope_scaling);
        let freqs = Tensor::from_vec(inv_freq, &[c.head_dim / 2], &dev)?;
        Ok(CudaLlama {
            norm: ones()?,
            config: c,
            device: dev,
            embed,
            lm_head,
            norm_in,
            norm_post,
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

    /// `s·x̃·Aᵀ` of projection `t` alone (None when it has no adapter): the replay of the down
    /// projection, whose output nothing reads, needs only this.
    fn linear_xa(
        &self,
        lora: Option<&CudaLora>,
        l: usize,
        t: Target,
        x: &Tensor,
    ) -> Result<Option<Tensor>> {
        match lora.and_then(|a| a.view(l, t)) {
            Some(view) => Ok(Some(gemm::lora_xa_view(
                x,
                &self.proj[l][t as usize],
                &view,
            )?)),
            None => Ok(None),
        }
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

    /// [`Self::linear_bwd`] for an input nothing needs afterwards: dx is written over it.
    fn linear_bwd_over_x(
        &self,
        lora: Option<&CudaLora>,
        l: usize,
        t: Target,
        x: Tensor,
        xa: Option<&Tensor>,
        dy: &Tensor,
    ) -> Result<Tensor> {
        let w = &self.proj[l][t as usize];
        match (lora.and_then(|a| a.view(l, t)), xa) {
            (Some(view), Some(xa)) => gemm::lora_backward_view_over_x(x, w, &view, xa, dy),
            _ => gemm::nf4_dx_into(dy, w, x),
        }
    }

    fn attention_dims(&self) -> attention::Dims {
        attention::Dims {
            heads: self.config.num_heads,
            kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// q, k, v of the normed input `n1` as `[T, heads, head_dim]`, RoPE applied to q and k, and
    /// their adapters' `s·x̃·Aᵀ` (forward and replay alike).
    #[allow(clippy::type_complexity)]
    fn qkv(
        &self,
        lora: Option<&CudaLora>,
        l: usize,
        n1: &Tensor,
        b: &StepBatch,
    ) -> Result<(Tensor, Tensor, Tensor, [Option<Tensor>; 3])> {
        let c = &self.config;
        let t = b.tokens;
        let (mut q, xa_q) = self.linear(lora, l, Target::Q, n1)?;
        let (mut k, xa_k) = self.linear(lora, l, Target::K, n1)?;
        let (mut v, xa_v) = self.linear(lora, l, Target::V, n1)?;
        q.reshape_in_place(&[t, c.num_heads, c.head_dim])?;
        k.reshape_in_place(&[t, c.num_kv_heads, c.head_dim])?;
        v.reshape_in_place(&[t, c.num_kv_heads, c.head_dim])?;
        rope::apply_cuda(&mut q, &b.positions, &self.freqs, false)?;
        rope::apply_cuda(&mut k, &b.positions, &self.freqs, false)?;
        Ok((q, k, v, [xa_q, xa_k, xa_v]))
    }

    /// One decoder layer's output, each value dropped after its last use (the forward of the
    /// last layer is one of the step's two memory peaks, with the backward's first replay).
    fn layer(
        &self,
        lora: Option<&CudaLora>,
        l: usize,
        x: &Tensor,
        b: &StepBatch,
    ) -> Result<Tensor> {
        let c = &self.config;
        let t = b.tokens;
        let eps = c.rms_norm_eps;
        let (n1, _) = rmsnorm::forward_cuda(x, &self.norm_in[l], eps)?;
        let (q, k, v, _) = self.qkv(lora, l, &n1, b)?;
        drop(n1);
        let (mut o, _) = attention::forward_cuda(self.attention_dims(), &q, &k, &v, &b.cu_seqlens)?;
        drop((q, k, v));
        o.reshape_in_place(&[t, c.q_dim()])?;
        let (a, _) = self.linear(lora, l, Target::O, &o)?;
        drop(o);
        let (h1, n2, _) = rmsnorm::forward_residual_cuda(x, &a, &self.norm_post[l], eps)?;
        drop(a);
        let (g, _) = self.linear(lora, l, Target::Gate, &n2)?;
        let (u, _) = self.linear(lora, l, Target::Up, &n2)?;
        drop(n2);
        let s = swiglu::forward_cuda(&g, &u)?;
        drop((g, u));
        let (dn, _) = self.linear(lora, l, Target::Down, &s)?;
        drop(s);
        embedding::add_cuda(&h1, &dn)
    }

    /// The replay of layer `l` for its backward: every value the backward needs, and nothing
    /// else (the down projection's output and the layer's output are not computed; only the
    /// down adapter's `s·x̃·Aᵀ`).
    fn layer_saved(
        &self,
        lora: Option<&CudaLora>,
        l: usize,
        x: &Tensor,
        b: &StepBatch,
    ) -> Result<Saved> {
        let mut sv = self.layer_to_down(lora, l, x, b)?;
        sv.xa[Target::Down as usize] = self.linear_xa(lora, l, Target::Down, &sv.s)?;
        Ok(sv)
    }

    /// Layer `l` up to the down projection's input `s` (the down adapter's `xa` left empty).
    fn layer_to_down(
        &self,
        lora: Option<&CudaLora>,
        l: usize,
        x: &Tensor,
        b: &StepBatch,
    ) -> Result<Saved> {
        let c = &self.config;
        let t = b.tokens;
        let eps = c.rms_norm_eps;
        let (n1, r1) = rmsnorm::forward_cuda(x, &self.norm_in[l], eps)?;
        let (q, k, v, [xa_q, xa_k, xa_v]) = self.qkv(lora, l, &n1, b)?;
        let (mut o, lse) =
            attention::forward_cuda(self.attention_dims(), &q, &k, &v, &b.cu_seqlens)?;
        o.reshape_in_place(&[t, c.q_dim()])?;
        let (a, xa_o) = self.linear(lora, l, Target::O, &o)?;
        let (h1, n2, r2) = rmsnorm::forward_residual_cuda(x, &a, &self.norm_post[l], eps)?;
        drop(a);
        let (g, xa_g) = self.linear(lora, l, Target::Gate, &n2)?;
        let (u, xa_u) = self.linear(lora, l, Target::Up, &n2)?;
        let s = swiglu::forward_cuda(&g, &u)?;
        Ok(Saved {
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
            xa: [xa_q, xa_k, xa_v, xa_o, xa_g, xa_u, None],
        })
    }

    /// The backward of layer `l` from its input `x` (replayed) and the gradient of its output.
    /// Every saved value and every gradient is dropped as soon as its last use has run, so the
    /// live set at each point is what the rest of the backward needs (this is what bounds the
    /// step's peak memory: see `model::memory`).
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
        let lora = Some(lora);
        let Saved {
            n1,
            r1,
            q,
            k,
            v,
            mut o,
            lse,
            h1,
            n2,
            r2,
            g,
            u,
            s,
            xa: [xa_q, xa_k, xa_v, xa_o, xa_g, xa_u, xa_d],
        } = self.layer_saved(lora, l, x, b)?;
        // MLP: down, SwiGLU, gate + up, the post-attention norm.
        // ds is written over s, the down projection's input, which nothing needs after it.
        let ds = self.linear_bwd_over_x(lora, l, Target::Down, s, xa_d.as_ref(), dout)?;
        drop(xa_d);
        let (dg, du) = swiglu::backward_cuda(g, u, &ds)?;
        drop(ds);
        let dn2 = self.linear_bwd(lora, l, Target::Gate, &n2, xa_g.as_ref(), &dg)?;
        drop((dg, xa_g));
        let dn2 = embedding::add_cuda(
            &dn2,
            &self.linear_bwd(lora, l, Target::Up, &n2, xa_u.as_ref(), &du)?,
        )?;
        drop((du, n2, xa_u));
        let dh1 = rmsnorm::backward_cuda(&h1, &self.norm_post[l], &r2, &dn2, Some(dout))?;
        drop((h1, r2, dn2));
        // Attention: o projection, flash attention, RoPE.
        let mut d_o = self.linear_bwd(lora, l, Target::O, &o, xa_o.as_ref(), &dh1)?;
        drop(xa_o);
        d_o.reshape_in_place(&[t, c.num_heads, c.head_dim])?;
        o.reshape_in_place(&[t, c.num_heads, c.head_dim])?;
        let (mut dq, mut dk, mut dv) = attention::backward_cuda(
            self.attention_dims(),
            &q,
            &k,
            &v,
            &o,
            &lse,
            &d_o,
            &b.cu_seqlens,
        )?;
        drop((q, k, v, o, lse, d_o));
        rope::apply_cuda(&mut dq, &b.positions, &self.freqs, true)?;
        rope::apply_cuda(&mut dk, &b.positions, &self.freqs, true)?;
        dq.reshape_in_place(&[t, c.q_dim()])?;
        dk.reshape_in_place(&[t, c.kv_dim()])?;
        dv.reshape_in_place(&[t, c.kv_dim()])?;
        // q, k, v projections into the input norm's gradient, one at a time.
        let dn1 = self.linear_bwd(lora, l, Target::Q, &n1, xa_q.as_ref(), &dq)?;
        drop((dq, xa_q));
        let dn1 = embedding::add_cuda(
            &dn1,
            &self.linear_bwd(lora, l, Target::K, &n1, xa_k.as_ref(), &dk)?,
        )?;
        drop((dk, xa_k));
        let dn1 = embedding::add_cuda(
            &dn1,
            &self.linear_bwd(lora, l, Target::V, &n1, xa_v.as_ref(), &dv)?,
        )?;
        drop((dv, xa_v, n1));
        rmsnorm::backward_cuda(x, &self.norm_in[l], &r1, &dn1, Some(&dh1))
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
            let out = self.layer(Some(lora), l, &h, &b)?;
            inputs.push(h);
            h = out;
        }
        let (n, r) = rmsnorm::forward_cuda(&h, &self.norm, self.config.rms_norm_eps)?;
        let ce = cross_entropy::lm_head_ce_cuda(
            &n,
            self.out_embedding(),
            &targets,
            Some(grad_scale),
            cross_entropy::DEFAULT_CHUNK,
        )?;
        let dlast = ce
            .dh
            .expect("lm_head_ce_cuda returns dh when given a gradient scale");
        let mut dh = rmsnorm::backward_cuda(&h, &self.norm, &r, &dlast, None)?;
        drop((h, n, r, dlast));
        // Each layer's input is dropped once its backward has run.
        for l in (0..self.config.num_layers).rev() {
            let x = inputs.pop().expect("one input per layer");
            dh = self.layer_bwd(lora, l, &x, &dh, &b)?;
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
            h = self.layer(lora, l, &h, &b)?;
        }
        let (n, _) = rmsnorm::forward_cuda(&h, &self.norm, self.config.rms_norm_eps)?;
        let ce = cross_entropy::lm_head_ce_cuda(
            &n,
            self.out_embedding(),
            &targets,
            None,
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
            h = self.layer(lora, l, &h, &b)?;
        }
        let d = self.config.hidden_size;
        let mut last = Tensor::uninit(&[1, d], DType::BF16, &self.device)?;
        let cuda = crate::device::cuda::CudaDevice::get(self.config_ordinal())?;
        let row = h.cuda_slice::<half::bf16>(op)?.slice((t - 1) * d..t * d);
        cuda.stream()
            .memcpy_dtod(&row, last.cuda_slice_mut::<half::bf16>(op)?)
            .map_err(Error::cuda("copying the last hidden row"))?;
        let (n, _) = rmsnorm::forward_cuda(&last, &self.norm, self.config.rms_norm_eps)?;
        let mut logits = Tensor::uninit(&[1, self.config.vocab_size], DType::F32, &self.device)?;
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
        let mut mirror = Tensor::uninit(&[n], DType::BF16, &dev)?;
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
            // One mask stream per (micro-batch, layer, projection), the CPU's (`ops::dropout`).
            dropout: match (self.dropout_seed, self.host.config.dropout) {
                (Some(seed), p) if p > 0.0 => Some((
                    p as f32,
                    crate::ops::dropout::stream_seed(seed, layer, target as u64),
                )),
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
        // In place: a fresh buffer would hold two gradient buffers at once for a moment.
        let op = "zeroing the LoRA gradients";
        let cuda =
            crate::device::cuda::CudaDevice::get(crate::ops::cuda_ordinal(op, &self.grads)?)?;
        cuda.stream()
            .memset_zeros(self.grads.cuda_slice_mut::<f32>(op)?)
            .map_err(Error::cuda(op))
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

    /// The accumulated gradients on the host, laid out like [`CudaLora::to_host`]'s values
    /// (synchronises: for tests and debugging).
    pub fn grads_to_host(&self) -> Result<Vec<f32>> {
        Ok(self.host.repack_from(&self.layout, &self.grads.to_vec()?))
    }

    /// The first optimizer step whose gradients were not finite (its update and later ones
    /// were skipped on the device), if any. Synchronises.
    pub fn first_non_finite_step(&self) -> Result<Option<u64>> {
        self.optimizer.first_non_finite_step()
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
