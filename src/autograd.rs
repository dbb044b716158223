//! The tape: coarse op records over [`Tensor`] values on one device, walked in reverse by
//! [`Tape::backward`]. Each op's forward and backward run the CPU reference (f32) or the CUDA
//! kernels (bf16 activations, NF4 weights) by the device of the tape, so a model written once on
//! the tape trains on both (`model::llama` is one).
//!
//! Rules.
//! - A [`Var`] holds its value by reference count. The tape keeps no values of its own: a record
//!   holds exactly the values its backward needs, and a value nothing holds any more (the model
//!   code dropped its `Var`, no record saved it) is freed at once. So the live set of a backward is
//!   what the math needs, and a record's values are released as soon as its backward has run.
//! - A value that needs no gradient (anything computed only from frozen weights and inputs that
//!   need none) produces no record; frozen weights never get a gradient.
//! - LoRA gradients accumulate (`+=`, fp32) into the [`Adapters`]' gradient buffer. Activation
//!   gradients that meet (q/k/v into a norm's output, gate/up, the residual stream) are summed in
//!   place into one buffer, or fused into the op that produces them (the RMSNorm backward adds
//!   the residual's gradient as it writes); a gradient that flows to two inputs unchanged (a
//!   residual add) is shared, not copied.
//! - Activations are `[tokens, width]` (f32 on the CPU, bf16 on a GPU); attention and RoPE read
//!   `width` as `heads × head_dim`.
//! - On a replay tape ([`Tape::replay`], the recomputation of a checkpointed block for its
//!   backward) the output of [`Tape::linear_residual`] is not computed: only its gradient is ever
//!   needed. Reading it is an error.

use std::borrow::Cow;
use std::rc::Rc;

use half::bf16;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::model::adapters::{Adapters, SlotRef};
use crate::model::lora::Target;
use crate::ops::rmsnorm::Norm;
use crate::ops::{attention, cross_entropy, dropout, embedding, gemm, linear, residual};
use crate::ops::{rmsnorm, rope, split, swiglu};
use crate::quant::nf4::Nf4Tensor;
use crate::tensor::{DType, Tensor};

/// The packed micro-batch a tape runs over: sequence boundaries and each token's position within
/// its sequence (on the device too, for the GPU's RoPE).
#[derive(Debug)]
pub struct Batch {
    /// Sequence boundaries: sequence i is tokens `cu_seqlens[i]..cu_seqlens[i + 1]`.
    pub cu_seqlens: Vec<usize>,
    /// Position of each token within its sequence.
    pub positions: Vec<u32>,
    device_positions: Option<Tensor>,
}

impl Batch {
    /// A batch for the CPU.
    pub fn new(cu_seqlens: Vec<usize>) -> Result<Batch> {
        Batch::on(cu_seqlens, Device::Cpu)
    }

    /// A batch for `device` (positions uploaded once, for every layer).
    pub fn on(cu_seqlens: Vec<usize>, device: Device) -> Result<Batch> {
        let tokens = cu_seqlens.last().copied().unwrap_or(0);
        crate::ops::check_cu_seqlens("batch", &cu_seqlens, tokens)?;
        let positions = rope::positions_from_cu_seqlens(&cu_seqlens);
        let device_positions = match device {
            Device::Cpu => None,
            Device::Cuda(_) => Some(Tensor::from_vec(
                positions.iter().map(|&p| p as i32).collect::<Vec<_>>(),
                &[positions.len()],
                &device,
            )?),
        };
        Ok(Batch {
            cu_seqlens,
            positions,
            device_positions,
        })
    }

    /// One sequence of `n` tokens at positions `start..start + n` on the CPU (generation with a
    /// [`KvCache`] holding the `start` before them).
    pub fn decode(start: usize, n: usize) -> Result<Batch> {
        let mut b = Batch::new(vec![0, n])?;
        for p in b.positions.iter_mut() {
            *p += start as u32;
        }
        Ok(b)
    }

    /// Tokens in the batch.
    pub fn tokens(&self) -> usize {
        self.positions.len()
    }
}

/// One layer's keys and values (after RoPE) of the tokens generated so far (CPU, f32).
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    k: Vec<f32>,
    v: Vec<f32>,
    tokens: usize,
}

impl KvCache {
    /// Tokens held.
    pub fn len(&self) -> usize {
        self.tokens
    }

    /// True before the first token.
    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }
}

/// Dropout on the adapter inputs: probability and the seed of this micro-batch. Masks are a
/// function of (seed, layer, target, element) on both devices (`ops::dropout`), so the replay in
/// the backward draws the same ones.
#[derive(Clone, Copy, Debug)]
pub struct Dropout {
    /// Probability that an element of an adapter's input is zeroed (the rest scaled by 1/(1−p)).
    pub p: f64,
    /// The micro-batch's seed (`ops::dropout::batch_seed`).
    pub seed: u64,
}

/// A frozen projection weight `[out, in]`. (Seven per layer: the variants' size difference does
/// not matter.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum BaseWeight {
    /// Full precision, f32 on the CPU (LoRA without quantization, and the reference of QLoRA).
    /// The CUDA kernels take NF4 only.
    Dense(Tensor),
    /// 4-bit NF4: dequantized on use on the CPU, inside the GEMMs on a GPU.
    Nf4(Nf4Tensor),
}

impl BaseWeight {
    /// `[out, in]`.
    pub fn shape(&self) -> &[usize] {
        match self {
            BaseWeight::Dense(t) => t.shape(),
            BaseWeight::Nf4(q) => &q.shape,
        }
    }

    /// Runs `f` with the weight in f32 on the host: borrowed when dense on the CPU; an NF4
    /// weight on the CPU is dequantized into a buffer of this thread that is reused from call to
    /// call (it grows to the largest weight once, then allocates nothing).
    pub fn with_f32<R>(&self, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        match self {
            BaseWeight::Nf4(q) if q.device() == Device::Cpu => SCRATCH.with(|cell| {
                match cell.try_borrow_mut() {
                    Ok(mut buf) => {
                        // Grown, never shrunk: a resize down and up again would zero the
                        // regrown tail on every call.
                        let n = q.elem_count();
                        if buf.len() < n {
                            buf.resize(n, 0.0);
                        }
                        q.dequantize_f32_into(&mut buf[..n])?;
                        f(&buf[..n])
                    }
                    // In use further up this thread's stack: a buffer of its own.
                    Err(_) => {
                        let mut own = vec![0.0; q.elem_count()];
                        q.dequantize_f32_into(&mut own)?;
                        f(&own)
                    }
                }
            }),
            _ => f(&self.to_f32()?),
        }
    }

    /// The weight in f32 on the host (dequantized when stored as NF4).
    pub fn to_f32(&self) -> Result<Cow<'_, [f32]>> {
        match self {
            BaseWeight::Dense(w) => match w.device() {
                Device::Cpu => Ok(Cow::Borrowed(w.cpu_slice::<f32>("base weight")?)),
                Device::Cuda(_) => match w.dtype() {
                    DType::F32 => Ok(Cow::Owned(w.to_vec::<f32>()?)),
                    _ => Ok(Cow::Owned(
                        w.to_vec::<bf16>()?.iter().map(|v| v.to_f32()).collect(),
                    )),
                },
            },
            BaseWeight::Nf4(q) => {
                let d = q.dequantize(DType::F32)?;
                Ok(Cow::Owned(d.to_vec::<f32>()?))
            }
        }
    }
}

/// A frozen linear layer as an op sees it: `y = x·Wᵀ (+ b)`, plus the adapter of (`layer`,
/// `target`) when the tape's [`Adapters`] have one.
#[derive(Clone, Copy, Debug)]
pub struct Linear<'a> {
    /// The frozen weight `[out, in]`.
    pub weight: &'a BaseWeight,
    /// The frozen bias `[out]`, if any.
    pub bias: Option<&'a Tensor>,
    /// Which block the layer is in: with `target`, names its adapter and its dropout masks.
    pub layer: usize,
    /// Which projection of the block.
    pub target: Target,
}

/// A value on the tape.
#[derive(Clone, Debug)]
pub struct Var {
    id: usize,
    rg: bool,
    value: Option<Rc<Tensor>>,
}

impl Var {
    /// The value (an error for the output of [`Tape::linear_residual`] on a replay tape).
    pub fn value(&self) -> Result<&Tensor> {
        self.value.as_deref().ok_or_else(|| {
            Error::InvalidArgument(
                "this value was not computed: a replay tape computes only what its backward reads"
                    .into(),
            )
        })
    }

    /// Whether a gradient flows to this value.
    pub fn requires_grad(&self) -> bool {
        self.rg
    }

    /// The value, moved out when nothing else holds it (else copied).
    pub fn into_tensor(self) -> Result<Tensor> {
        self.value()?;
        unshare(self.value.expect("checked above"))
    }

    fn at(&self) -> At {
        At {
            id: self.id,
            rg: self.rg,
        }
    }
}

/// A value's place on the tape, without its value.
#[derive(Clone, Copy, Debug)]
struct At {
    id: usize,
    rg: bool,
}

/// The tensor of `rc`, moved out when no one else holds it, else a copy.
fn unshare(rc: Rc<Tensor>) -> Result<Tensor> {
    match Rc::try_unwrap(rc) {
        Ok(t) => Ok(t),
        Err(shared) => shared.to_device(&shared.device()),
    }
}

fn f32s<'t>(t: &'t Tensor, op: &'static str) -> Result<&'t [f32]> {
    t.cpu_slice::<f32>(op)
}

fn host(v: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

/// `[tokens, width]` of an activation.
fn rows_cols(op: &'static str, t: &Tensor) -> Result<(usize, usize)> {
    match t.shape() {
        [r, c] => Ok((*r, *c)),
        other => Err(Error::ShapeMismatch {
            op,
            expected: "an activation [tokens, width]".into(),
            got: format!("{other:?}"),
        }),
    }
}

/// `acc += g` in place on either device.
fn add_into(acc: &mut Tensor, g: &Tensor) -> Result<()> {
    match acc.device() {
        Device::Cpu => {
            let g = f32s(g, "gradient sum")?;
            residual::accumulate(acc.cpu_slice_mut::<f32>("gradient sum")?, g)
        }
        Device::Cuda(_) => embedding::add_assign_cuda(acc, g),
    }
}

/// The sum of two gradients, in place into whichever nobody else holds.
fn sum(a: Rc<Tensor>, b: Rc<Tensor>) -> Result<Rc<Tensor>> {
    let (mut own, other) = match Rc::try_unwrap(a) {
        Ok(t) => (t, b),
        Err(a) => match Rc::try_unwrap(b) {
            Ok(t) => (t, a),
            Err(b) => (unshare(a)?, b),
        },
    };
    add_into(&mut own, &other)?;
    Ok(Rc::new(own))
}

enum Op<'a> {
    RmsNorm {
        x: Var,
        y: At,
        w: &'a Tensor,
        rstd: Tensor,
        norm: Norm,
    },
    /// RMSNorm over each head; `x` is kept as `[T·heads, head_dim]`.
    HeadRmsNorm {
        x: Var,
        y: At,
        w: &'a Tensor,
        rstd: Tensor,
        norm: Norm,
        /// `[T, heads·head_dim]`, the shape of y and of x's gradient.
        shape: [usize; 2],
    },
    /// `h = a + b; y = rmsnorm(h)`.
    AddRmsNorm {
        a: At,
        b: At,
        h: Var,
        y: At,
        w: &'a Tensor,
        rstd: Tensor,
        norm: Norm,
    },
    Linear {
        x: Var,
        y: At,
        lin: Linear<'a>,
        /// `s·x̃·Aᵀ` on a GPU, `x̃·Aᵀ` on the CPU (`[T, r]`); None without an adapter.
        xa: Option<Tensor>,
        /// The CPU's dropout mask (the GPU redraws it from the seed).
        mask: Option<Vec<f32>>,
    },
    /// Linear layers of one input on a GPU ([`Tape::linears`]): `ys[j] = linear(x, lins[j])`,
    /// their backward one grouped dx GEMM.
    LinearGroup {
        x: Var,
        ys: Vec<At>,
        lins: Vec<Linear<'a>>,
        /// Each layer's `s·x̃·Aᵀ` (None without an adapter).
        xas: Vec<Option<Tensor>>,
    },
    /// `y = h + linear(x)`.
    LinearResidual {
        x: Var,
        h: At,
        y: At,
        lin: Linear<'a>,
        xa: Option<Tensor>,
        mask: Option<Vec<f32>>,
    },
    Rope {
        x: At,
        y: At,
        heads: usize,
        head_dim: usize,
        freqs: &'a Tensor,
        mag: f32,
        long: Option<(&'a Tensor, usize)>,
    },
    /// `x` split into column blocks: its gradient is the parts' side by side.
    SplitCols {
        x: At,
        parts: Vec<At>,
        widths: Vec<usize>,
    },
    Attention {
        q: Var,
        k: Var,
        v: Var,
        o: Var,
        lse: Tensor,
        dims: attention::Dims,
    },
    /// `h = act(gate) ⊙ up` (SwiGLU, GeGLU).
    Glu {
        gate: Var,
        up: Var,
        h: At,
        act: swiglu::Act,
    },
    Add {
        a: At,
        b: At,
        y: At,
    },
    /// The fused lm_head + cross-entropy: `dx` was computed with the loss.
    LmHeadCe {
        x: At,
        dx: Tensor,
    },
}

/// The loss of [`Tape::lm_head_ce`].
#[derive(Debug)]
pub enum Losses {
    /// The CPU's sum over the counted tokens.
    Host(f64),
    /// A GPU's per-token losses (f32 `[T]`, 0 where not counted), read back only when needed.
    Device(Tensor),
}

impl Losses {
    /// The sum over the counted tokens (synchronises on a GPU).
    pub fn sum(&self) -> Result<f64> {
        match self {
            Losses::Host(s) => Ok(*s),
            Losses::Device(t) => Ok(t.to_vec::<f32>()?.iter().map(|&v| v as f64).sum()),
        }
    }
}

/// What [`Tape::lm_head_ce`] returns: the loss, the tokens counted, and the loss's place on the
/// tape (for [`Tape::backward`]) when a gradient was asked for.
#[derive(Debug)]
pub struct CeLoss {
    /// The loss over the counted tokens.
    pub losses: Losses,
    /// Tokens counted (targets ≠ −100).
    pub count: usize,
    /// The loss on the tape, to start [`Tape::backward`] from (None without a gradient).
    pub var: Option<Var>,
}

/// One block's forward values and records, on one device.
pub struct Tape<'a> {
    device: Device,
    batch: &'a Batch,
    adapters: Option<&'a Adapters>,
    /// Record for a backward (false: nothing is kept beyond what the caller holds).
    train: bool,
    replay: bool,
    /// Adapter dropout (training only).
    dropout: Option<Dropout>,
    next: usize,
    ops: Vec<Op<'a>>,
}

impl<'a> Tape<'a> {
    /// A tape on `device` over `batch`, with `adapters` (which must live on `device`); `train`
    /// records for a backward, and applies `dropout` to the adapters' inputs.
    pub fn new(
        device: Device,
        batch: &'a Batch,
        adapters: Option<&'a Adapters>,
        train: bool,
        dropout: Option<Dropout>,
    ) -> Result<Tape<'a>> {
        if let Some(a) = adapters {
            if a.device() != device {
                return Err(Error::DeviceMismatch {
                    op: "tape",
                    a: device.to_string(),
                    b: format!("adapters on {}", a.device()),
                });
            }
        }
        if device != Device::Cpu && batch.device_positions.is_none() {
            return Err(Error::InvalidArgument(format!(
                "tape on {device}: the batch was made for the CPU (use Batch::on)"
            )));
        }
        Ok(Tape {
            device,
            batch,
            adapters,
            train,
            replay: false,
            dropout: dropout.filter(|d| d.p > 0.0),
            next: 0,
            ops: Vec::new(),
        })
    }

    /// A training tape for recomputing a checkpointed block before its backward: as
    /// [`Tape::new`] with `train`, and [`Tape::linear_residual`]'s output left uncomputed.
    pub fn replay(
        device: Device,
        batch: &'a Batch,
        adapters: Option<&'a Adapters>,
        dropout: Option<Dropout>,
    ) -> Result<Tape<'a>> {
        let mut t = Tape::new(device, batch, adapters, true, dropout)?;
        t.replay = true;
        Ok(t)
    }

    /// The tape's device.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Number of records (values that need no gradient make none).
    pub fn records(&self) -> usize {
        self.ops.len()
    }

    fn var(&mut self, value: Option<Tensor>, rg: bool) -> Var {
        self.next += 1;
        Var {
            id: self.next - 1,
            rg,
            value: value.map(Rc::new),
        }
    }

    fn check(&self, op: &'static str, t: &Tensor) -> Result<()> {
        let want = match self.device {
            Device::Cpu => DType::F32,
            Device::Cuda(_) => DType::BF16,
        };
        if t.device() != self.device {
            return Err(Error::DeviceMismatch {
                op,
                a: format!("tape on {}", self.device),
                b: format!("a tensor on {}", t.device()),
            });
        }
        if t.dtype() != want {
            return Err(Error::DTypeMismatch {
                op,
                expected: format!("{want} activations on {}", self.device),
                got: t.dtype().to_string(),
            });
        }
        Ok(())
    }

    /// Puts an input on the tape (`[tokens, width]`, f32 on the CPU, bf16 on a GPU).
    pub fn input(&mut self, value: Tensor, requires_grad: bool) -> Result<Var> {
        self.check("tape input", &value)?;
        rows_cols("tape input", &value)?;
        Ok(self.var(Some(value), requires_grad && self.train))
    }

    /// `y = rmsnorm(x) ⊙ w̃` (`ops::rmsnorm`; `w̃` is `w`, or `1 + w` with `norm.unit_offset`).
    pub fn rmsnorm(&mut self, x: &Var, w: &'a Tensor, norm: Norm) -> Result<Var> {
        let xv = x.value()?;
        self.check("rmsnorm", xv)?;
        let (y, rstd) = match self.device {
            Device::Cpu => {
                let (_, d) = rows_cols("rmsnorm", xv)?;
                let (y, r) = rmsnorm::forward(f32s(xv, "rmsnorm")?, f32s(w, "rmsnorm")?, d, norm)?;
                let n = r.len();
                (host(y, xv.shape())?, host(r, &[n])?)
            }
            Device::Cuda(_) => rmsnorm::forward_cuda(xv, w, norm)?,
        };
        let y = self.var(Some(y), x.rg);
        if x.rg {
            self.ops.push(Op::RmsNorm {
                x: x.clone(),
                y: y.at(),
                w,
                rstd,
                norm,
            });
        }
        Ok(y)
    }

    /// RMSNorm over each head of `x` `[T, heads·head_dim]`, one weight `w` `[head_dim]` for all
    /// heads (Qwen3's `q_norm` and `k_norm`): the rows of the norm are `[T·heads, head_dim]`, the
    /// same memory. In place when nothing else holds `x`.
    pub fn head_rmsnorm(
        &mut self,
        x: Var,
        heads: usize,
        head_dim: usize,
        w: &'a Tensor,
        norm: Norm,
    ) -> Result<Var> {
        let op = "rmsnorm per head";
        self.check(op, x.value()?)?;
        let (t, width) = rows_cols(op, x.value()?)?;
        if width != heads * head_dim || w.shape() != [head_dim] {
            return Err(Error::ShapeMismatch {
                op,
                expected: format!("x [T, {heads} × {head_dim}] and w [{head_dim}]"),
                got: format!("x {:?}, w {:?}", x.value()?.shape(), w.shape()),
            });
        }
        let at = x.at();
        let mut xt = x.into_tensor()?;
        xt.reshape_in_place(&[t * heads, head_dim])?;
        let (mut y, rstd) = match self.device {
            Device::Cpu => {
                let (y, r) = rmsnorm::forward(f32s(&xt, op)?, f32s(w, op)?, head_dim, norm)?;
                let n = r.len();
                (host(y, xt.shape())?, host(r, &[n])?)
            }
            Device::Cuda(_) => rmsnorm::forward_cuda(&xt, w, norm)?,
        };
        y.reshape_in_place(&[t, width])?;
        let y = self.var(Some(y), at.rg);
        if at.rg {
            self.ops.push(Op::HeadRmsNorm {
                x: Var {
                    id: at.id,
                    rg: true,
                    value: Some(Rc::new(xt)),
                },
                y: y.at(),
                w,
                rstd,
                norm,
                shape: [t, width],
            });
        }
        Ok(y)
    }

    /// The residual add fused before a norm: `(h = a + b, y = rmsnorm(h) ⊙ w̃)`.
    pub fn add_rmsnorm(
        &mut self,
        a: &Var,
        b: &Var,
        w: &'a Tensor,
        norm: Norm,
    ) -> Result<(Var, Var)> {
        let (av, bv) = (a.value()?, b.value()?);
        self.check("add + rmsnorm", av)?;
        self.check("add + rmsnorm", bv)?;
        let (h, y, rstd) = match self.device {
            Device::Cpu => {
                let (_, d) = rows_cols("add + rmsnorm", av)?;
                let h = residual::forward(f32s(av, "add")?, f32s(bv, "add")?)?;
                let (y, r) = rmsnorm::forward(&h, f32s(w, "rmsnorm")?, d, norm)?;
                let n = r.len();
                (host(h, av.shape())?, host(y, av.shape())?, host(r, &[n])?)
            }
            Device::Cuda(_) => rmsnorm::forward_residual_cuda(av, bv, w, norm)?,
        };
        let rg = a.rg || b.rg;
        let h = self.var(Some(h), rg);
        let y = self.var(Some(y), rg);
        if rg {
            self.ops.push(Op::AddRmsNorm {
                a: a.at(),
                b: b.at(),
                h: h.clone(),
                y: y.at(),
                w,
                rstd,
                norm,
            });
        }
        Ok((h, y))
    }

    fn dropout_pair(&self) -> Option<(f32, u64)> {
        self.dropout.map(|d| (d.p as f32, d.seed))
    }

    /// `(T, in, out)` of a linear layer on x, checked: x is the tape's kind of activation
    /// `[T, in]` and the weight `[out, in]`.
    fn linear_dims(&self, x: &Tensor, lin: &Linear<'a>) -> Result<(usize, usize, usize)> {
        let op = "linear";
        self.check(op, x)?;
        let (t, i) = rows_cols(op, x)?;
        let (o, wi) = match lin.weight.shape() {
            [o, i] => (*o, *i),
            other => {
                return Err(Error::ShapeMismatch {
                    op,
                    expected: "a weight [out, in]".into(),
                    got: format!("{other:?}"),
                })
            }
        };
        if wi != i {
            return Err(Error::ShapeMismatch {
                op,
                expected: format!(
                    "x [T, {wi}] for layer {} {}",
                    lin.layer,
                    lin.target.module()
                ),
                got: format!("{:?}", x.shape()),
            });
        }
        Ok((t, i, o))
    }

    /// The adapter of a linear layer, if the tape's adapters have one for it.
    fn linear_slot(&self, lin: &Linear<'a>) -> Result<Option<SlotRef<'a>>> {
        match self.adapters {
            Some(a) => a.slot_ref(lin.layer, lin.target, self.dropout_pair()),
            None => Ok(None),
        }
    }

    /// `x·Wᵀ (+ b) (+ s·(x̃·Aᵀ)·Bᵀ)`: returns `(y, xa, mask)`; `y` is None when `skip_y`.
    #[allow(clippy::type_complexity)]
    fn linear_forward(
        &self,
        x: &Tensor,
        lin: &Linear<'a>,
        skip_y: bool,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Vec<f32>>)> {
        let op = "linear";
        let (t, i, o) = self.linear_dims(x, lin)?;
        let slot = self.linear_slot(lin)?;
        match self.device {
            Device::Cpu => {
                let bias = lin.bias.map(|b| f32s(b, op)).transpose()?;
                let (lora, mask) = match &slot {
                    Some(SlotRef::Cpu {
                        a, b, rank, scale, ..
                    }) => {
                        // p = 0 keeps every element at scale 1: x̃ = x exactly, no mask.
                        let mask = self.dropout.filter(|d| d.p > 0.0).map(|d| {
                            let s = dropout::stream_seed(d.seed, lin.layer, lin.target as u64);
                            dropout::mask(s, d.p as f32, t * i)
                        });
                        (
                            Some(linear::Lora {
                                a,
                                b,
                                rank: *rank,
                                scale: *scale,
                            }),
                            mask,
                        )
                    }
                    _ => (None, None),
                };
                let dims = linear::Dims {
                    tokens: t,
                    in_features: i,
                    out_features: o,
                };
                if skip_y {
                    let xa = match &lora {
                        Some(l) => Some(host(
                            linear::adapter_input(dims, f32s(x, op)?, l, mask.as_deref())?,
                            &[t, l.rank],
                        )?),
                        None => None,
                    };
                    return Ok((None, xa, mask));
                }
                let (y, xa) = lin.weight.with_f32(|w| {
                    linear::forward(dims, f32s(x, op)?, w, bias, lora.as_ref(), mask.as_deref())
                })?;
                let xa = match &lora {
                    Some(l) => Some(host(xa, &[t, l.rank])?),
                    None => None,
                };
                Ok((Some(host(y, &[t, o])?), xa, mask))
            }
            Device::Cuda(_) => {
                let w = nf4_weight(lin)?;
                let (y, xa) = match (&slot, skip_y) {
                    (Some(SlotRef::Cuda(view)), false) => {
                        // SAFETY (both arms): the view comes from the tape's adapters
                        // (`slot_ref`), whose bf16 mirror and fp32 gradients live on this device
                        // for as long as the tape borrows them.
                        let (y, xa) = unsafe { gemm::lora_forward_view(x, w, view)? };
                        (Some(y), Some(xa))
                    }
                    (Some(SlotRef::Cuda(view)), true) => {
                        (None, Some(unsafe { gemm::lora_xa_view(x, w, view)? }))
                    }
                    (_, false) => (Some(gemm::nf4_forward_cuda(x, w, None)?), None),
                    (_, true) => (None, None),
                };
                let mut y = y;
                if let (Some(y), Some(b)) = (y.as_mut(), lin.bias) {
                    embedding::bias_add_cuda(y, b)?;
                }
                Ok((y, xa, None))
            }
        }
    }

    /// A frozen linear layer with its adapter (if the tape's adapters have one for it):
    /// `y = x·Wᵀ (+ b) + s·(x̃·Aᵀ)·Bᵀ`, x̃ = x with dropout (training) — `ops::linear`.
    pub fn linear(&mut self, x: &Var, lin: Linear<'a>) -> Result<Var> {
        let (y, xa, mask) = self.linear_forward(x.value()?, &lin, false)?;
        Ok(self.record_linear(x, lin, y, xa, mask))
    }

    /// Several linear layers of one input (q/k/v of attention, gate/up of an MLP), each as
    /// [`Tape::linear`] with its own adapter. On a GPU their NF4 GEMMs are one launch
    /// (`gemm::lora_forward_group`); each output, and the backward, is what `linear` gives.
    pub fn linears(&mut self, x: &Var, lins: &[Linear<'a>]) -> Result<Vec<Var>> {
        let xv = x.value()?;
        if lins.len() < 2 || self.device == Device::Cpu {
            let outs = lins
                .iter()
                .map(|lin| self.linear_forward(xv, lin, false))
                .collect::<Result<Vec<_>>>()?;
            return Ok(lins
                .iter()
                .zip(outs)
                .map(|(lin, (y, xa, mask))| self.record_linear(x, *lin, y, xa, mask))
                .collect());
        }
        let outs = self.linear_forward_group(xv, lins)?;
        let mut vars = Vec::with_capacity(lins.len());
        let mut xas = Vec::with_capacity(lins.len());
        for (y, xa) in outs {
            // As `linear`: a gradient flows to y when one flows to x or y has an adapter.
            let rg = self.train && (x.rg || xa.is_some());
            vars.push(self.var(Some(y), rg));
            xas.push(xa);
        }
        if vars.iter().any(Var::requires_grad) {
            self.ops.push(Op::LinearGroup {
                x: x.clone(),
                ys: vars.iter().map(Var::at).collect(),
                lins: lins.to_vec(),
                xas,
            });
        }
        Ok(vars)
    }

    /// The GPU's forward of [`Tape::linears`]: one grouped NF4 GEMM, then each bias. Returns
    /// each `(y, xa)`.
    fn linear_forward_group(
        &self,
        x: &Tensor,
        lins: &[Linear<'a>],
    ) -> Result<Vec<(Tensor, Option<Tensor>)>> {
        let mut layers = Vec::with_capacity(lins.len());
        for lin in lins {
            self.linear_dims(x, lin)?;
            let view = match self.linear_slot(lin)? {
                Some(SlotRef::Cuda(view)) => Some(view),
                _ => None,
            };
            layers.push((nf4_weight(lin)?, view));
        }
        let refs: Vec<(&Nf4Tensor, Option<&gemm::LoraView>)> =
            layers.iter().map(|(w, v)| (*w, v.as_ref())).collect();
        // SAFETY: the views come from the tape's adapters (`slot_ref`), whose bf16 mirror and
        // fp32 gradients live on this device for as long as the tape borrows them.
        let outs = unsafe { gemm::lora_forward_group(x, &refs)? };
        lins.iter()
            .zip(outs)
            .map(|(lin, (mut y, xa))| {
                if let Some(b) = lin.bias {
                    embedding::bias_add_cuda(&mut y, b)?;
                }
                Ok((y, xa))
            })
            .collect()
    }

    /// Puts a linear layer's output on the tape, and its record when a gradient flows.
    fn record_linear(
        &mut self,
        x: &Var,
        lin: Linear<'a>,
        y: Option<Tensor>,
        xa: Option<Tensor>,
        mask: Option<Vec<f32>>,
    ) -> Var {
        let rg = self.train && (x.rg || xa.is_some());
        let y = self.var(y, rg);
        if rg {
            self.ops.push(Op::Linear {
                x: x.clone(),
                y: y.at(),
                lin,
                xa,
                mask,
            });
        }
        y
    }

    /// The residual stream's update by a linear layer: `y = h + linear(x)` (the projection's
    /// output is the sum's buffer). On a replay tape `y` is not computed (see the module docs).
    pub fn linear_residual(&mut self, x: &Var, lin: Linear<'a>, h: &Var) -> Result<Var> {
        let skip = self.replay;
        let (y, xa, mask) = self.linear_forward(x.value()?, &lin, skip)?;
        let y = match y {
            Some(mut y) => {
                let hv = h.value()?;
                if hv.shape() != y.shape() {
                    return Err(Error::ShapeMismatch {
                        op: "linear + residual",
                        expected: format!("the residual h {:?}", y.shape()),
                        got: format!("{:?}", hv.shape()),
                    });
                }
                add_into(&mut y, hv)?;
                Some(y)
            }
            None => None,
        };
        let rg = self.train && (x.rg || h.rg || xa.is_some());
        let y = self.var(y, rg);
        if rg {
            self.ops.push(Op::LinearResidual {
                x: x.clone(),
                h: h.at(),
                y: y.at(),
                lin,
                xa,
                mask,
            });
        }
        Ok(y)
    }

    /// RoPE over `heads` heads of `head_dim` with frequencies `freqs` (`ops::rope`), in place
    /// when nothing else holds `x`: the first `2·freqs.len()` dims of each head are rotated and
    /// scaled by `mag` (longrope's attention factor; 1 for plain RoPE), the rest pass through.
    pub fn rope(
        &mut self,
        x: Var,
        heads: usize,
        head_dim: usize,
        freqs: &'a Tensor,
        mag: f32,
    ) -> Result<Var> {
        self.rope_with(x, heads, head_dim, freqs, mag, None)
    }

    /// [`Tape::rope`] with longrope's two tables: each sequence of the batch longer than
    /// `original` tokens rotates with `long`, the others with `freqs` — each sequence as
    /// transformers rotates it alone, so packing never changes a result.
    pub fn rope_longrope(
        &mut self,
        x: Var,
        heads: usize,
        head_dim: usize,
        (freqs, long): (&'a Tensor, &'a Tensor),
        original: usize,
        mag: f32,
    ) -> Result<Var> {
        self.rope_with(x, heads, head_dim, freqs, mag, Some((long, original)))
    }

    fn rope_with(
        &mut self,
        x: Var,
        heads: usize,
        head_dim: usize,
        freqs: &'a Tensor,
        mag: f32,
        long: Option<(&'a Tensor, usize)>,
    ) -> Result<Var> {
        let op = "rope";
        self.check(op, x.value()?)?;
        let at = x.at();
        let mut v = x.into_tensor()?;
        let (t, width) = rows_cols(op, &v)?;
        if width != heads * head_dim {
            return Err(Error::ShapeMismatch {
                op,
                expected: format!("[T, {heads} × {head_dim}]"),
                got: format!("{:?}", v.shape()),
            });
        }
        self.rotate(&mut v, t, heads, head_dim, (freqs, long), mag, false)?;
        let y = self.var(Some(v), at.rg);
        if at.rg {
            self.ops.push(Op::Rope {
                x: at,
                y: y.at(),
                heads,
                head_dim,
                freqs,
                mag,
                long,
            });
        }
        Ok(y)
    }

    /// The token ranges of the batch and the table each rotates with: one range with `freqs`,
    /// or with longrope, runs of consecutive sequences on the same side of `original` tokens.
    fn rope_runs<'t>(
        &self,
        t: usize,
        (freqs, long): (&'t Tensor, Option<(&'t Tensor, usize)>),
    ) -> Vec<(std::ops::Range<usize>, &'t Tensor)> {
        let Some((long, original)) = long else {
            return vec![(0..t, freqs)];
        };
        let mut runs: Vec<(std::ops::Range<usize>, &'t Tensor)> = Vec::new();
        for w in self.batch.cu_seqlens.windows(2) {
            // A decode batch continues a cached sequence: its length is its last position + 1.
            let len = self.batch.positions[w[0]..w[1]]
                .iter()
                .max()
                .map_or(0, |&p| p as usize + 1);
            let table = if len > original { long } else { freqs };
            match runs.last_mut() {
                Some((r, f)) if std::ptr::eq(*f, table) && r.end == w[0] => r.end = w[1],
                _ => runs.push((w[0]..w[1], table)),
            }
        }
        runs
    }

    #[allow(clippy::too_many_arguments)]
    fn rotate(
        &self,
        v: &mut Tensor,
        t: usize,
        heads: usize,
        head_dim: usize,
        tables: (&Tensor, Option<(&Tensor, usize)>),
        mag: f32,
        backward: bool,
    ) -> Result<()> {
        let runs = self.rope_runs(t, tables);
        match self.device {
            Device::Cpu => {
                let w = heads * head_dim;
                let s = v.cpu_slice_mut::<f32>("rope")?;
                for (r, freqs) in runs {
                    let pos = &self.batch.positions[r.clone()];
                    let f = f32s(freqs, "rope")?;
                    let s = &mut s[r.start * w..r.end * w];
                    if backward {
                        rope::backward(s, pos, heads, head_dim, f, mag)?;
                    } else {
                        rope::forward(s, pos, heads, head_dim, f, mag)?;
                    }
                }
                Ok(())
            }
            Device::Cuda(_) => {
                let pos = self
                    .batch
                    .device_positions
                    .as_ref()
                    .expect("checked in new");
                v.reshape_in_place(&[t, heads, head_dim])?;
                for (r, freqs) in runs {
                    rope::apply_cuda_rows(v, pos, freqs, mag, backward, r)?;
                }
                v.reshape_in_place(&[t, heads * head_dim])
            }
        }
    }

    /// `x` (`[T, Σ widths]`) split into column blocks `[T, widths[k]]` (`ops::split`): Phi-3's
    /// fused `qkv_proj` output into q, k and v, its `gate_up_proj` output into gate and up. The
    /// parts are copies; x's gradient is the parts' gradients side by side (zeros for a part
    /// that gets none), added to any other gradient x has.
    pub fn split_cols(&mut self, x: &Var, widths: &[usize]) -> Result<Vec<Var>> {
        let op = "split_cols";
        let xv = x.value()?;
        self.check(op, xv)?;
        let parts: Vec<Var> = split::split_cols(xv, widths)?
            .into_iter()
            .map(|p| self.var(Some(p), x.rg))
            .collect();
        if x.rg {
            self.ops.push(Op::SplitCols {
                x: x.at(),
                parts: parts.iter().map(Var::at).collect(),
                widths: widths.to_vec(),
            });
        }
        Ok(parts)
    }

    /// Causal attention within each sequence of the batch (`ops::attention`; flash attention on
    /// a GPU), grouped-query when `dims.kv_heads < dims.heads`, with the scale, soft cap and
    /// sliding window of `dims`.
    pub fn attention(&mut self, q: &Var, k: &Var, v: &Var, dims: attention::Dims) -> Result<Var> {
        let (qv, kv, vv) = (q.value()?, k.value()?, v.value()?);
        for t in [qv, kv, vv] {
            self.check("attention", t)?;
        }
        let cu = &self.batch.cu_seqlens;
        let (o, lse) = match self.device {
            Device::Cpu => {
                let (o, lse) = attention::forward(
                    dims,
                    f32s(qv, "attention")?,
                    f32s(kv, "attention")?,
                    f32s(vv, "attention")?,
                    cu,
                )?;
                let n = lse.len();
                (host(o, qv.shape())?, host(lse, &[n])?)
            }
            Device::Cuda(_) => attention::forward_cuda(dims, qv, kv, vv, cu)?,
        };
        let rg = q.rg || k.rg || v.rg;
        let o = self.var(Some(o), rg);
        if rg {
            self.ops.push(Op::Attention {
                q: q.clone(),
                k: k.clone(),
                v: v.clone(),
                o: o.clone(),
                lse,
                dims,
            });
        }
        Ok(o)
    }

    /// Attention of new tokens over `cache` and themselves (generation, CPU, no record): k and v
    /// join the cache, then each query attends to every cached position up to its own (only the
    /// last `dims.window` of them with a window, counted in absolute positions).
    pub fn attention_cached(
        &mut self,
        q: &Var,
        k: &Var,
        v: &Var,
        dims: attention::Dims,
        cache: &mut KvCache,
    ) -> Result<Var> {
        let op = "attention with a KV cache";
        if self.train || self.device != Device::Cpu {
            return Err(Error::InvalidArgument(format!(
                "{op}: inference on the CPU only (this tape is on {}{})",
                self.device,
                if self.train { ", training" } else { "" }
            )));
        }
        let (qv, kv, vv) = (q.value()?, k.value()?, v.value()?);
        let (t, _) = rows_cols(op, qv)?;
        let start = cache.tokens;
        cache.k.extend_from_slice(f32s(kv, op)?);
        cache.v.extend_from_slice(f32s(vv, op)?);
        cache.tokens += t;
        let o = attention::forward_cached(dims, f32s(qv, op)?, &cache.k, &cache.v, start)?;
        let o = host(o, qv.shape())?;
        Ok(self.var(Some(o), false))
    }

    /// `silu(gate) ⊙ up` (SwiGLU): [`Tape::glu`] with [`swiglu::Act::Silu`].
    pub fn swiglu(&mut self, gate: &Var, up: &Var) -> Result<Var> {
        self.glu(gate, up, swiglu::Act::Silu)
    }

    /// `act(gate) ⊙ up` (`ops::swiglu`): SwiGLU with `Act::Silu`, GeGLU with `Act::GeluTanh`.
    pub fn glu(&mut self, gate: &Var, up: &Var, act: swiglu::Act) -> Result<Var> {
        let (g, u) = (gate.value()?, up.value()?);
        self.check("glu", g)?;
        self.check("glu", u)?;
        let h = match self.device {
            Device::Cpu => host(
                swiglu::forward(f32s(g, "glu")?, f32s(u, "glu")?, act)?,
                g.shape(),
            )?,
            Device::Cuda(_) => swiglu::forward_cuda(g, u, act)?,
        };
        let rg = gate.rg || up.rg;
        let h = self.var(Some(h), rg);
        if rg {
            self.ops.push(Op::Glu {
                gate: gate.clone(),
                up: up.clone(),
                h: h.at(),
                act,
            });
        }
        Ok(h)
    }

    /// `a + b`.
    pub fn add(&mut self, a: &Var, b: &Var) -> Result<Var> {
        let (av, bv) = (a.value()?, b.value()?);
        self.check("add", av)?;
        self.check("add", bv)?;
        let y = match self.device {
            Device::Cpu => host(
                residual::forward(f32s(av, "add")?, f32s(bv, "add")?)?,
                av.shape(),
            )?,
            Device::Cuda(_) => embedding::add_cuda(av, bv)?,
        };
        let rg = a.rg || b.rg;
        let y = self.var(Some(y), rg);
        if rg {
            self.ops.push(Op::Add {
                a: a.at(),
                b: b.at(),
                y: y.at(),
            });
        }
        Ok(y)
    }

    /// The fused, chunked lm_head + cross-entropy (`ops::cross_entropy`): the loss of `x·wᵀ`
    /// against `targets` (already shifted; −100 not counted), never holding more than one chunk
    /// of logits. With `grad_scale` (and `x` needing a gradient) the gradient of
    /// `grad_scale · loss_sum` is computed with it and the loss's `var` starts a backward. With
    /// `softcap = Some(c)` the logits are capped to `c·tanh(z/c)` before the softmax (Gemma 2's
    /// `final_logit_softcapping`; the gradient goes through the cap).
    pub fn lm_head_ce(
        &mut self,
        x: &Var,
        w: &'a Tensor,
        targets: &[i64],
        grad_scale: Option<f32>,
        softcap: Option<f32>,
    ) -> Result<CeLoss> {
        let xv = x.value()?;
        self.check("lm_head + cross-entropy", xv)?;
        let grad_scale = grad_scale.filter(|_| x.rg && self.train);
        let (losses, count, dx) = match self.device {
            Device::Cpu => {
                let (_, d) = rows_cols("lm_head + cross-entropy", xv)?;
                let out = cross_entropy::forward_backward(
                    f32s(xv, "cross-entropy")?,
                    f32s(w, "cross-entropy")?,
                    d,
                    targets,
                    grad_scale,
                    cross_entropy::cpu_chunk(w.elem_count() / d.max(1)),
                    softcap,
                )?;
                let dx = out.dh.map(|g| host(g, xv.shape())).transpose()?;
                (Losses::Host(out.loss_sum), out.count, dx)
            }
            Device::Cuda(_) => {
                let out = cross_entropy::lm_head_ce_cuda(
                    xv,
                    w,
                    targets,
                    grad_scale,
                    cross_entropy::DEFAULT_CHUNK,
                    softcap,
                )?;
                (Losses::Device(out.loss), out.count, out.dh)
            }
        };
        let var = match dx {
            Some(dx) => {
                let v = self.var(None, true);
                self.ops.push(Op::LmHeadCe { x: x.at(), dx });
                Some(v)
            }
            None => None,
        };
        Ok(CeLoss { losses, count, var })
    }

    /// Backpropagates from `out`: with `dout` its gradient, or `None` when `out` is a loss of
    /// [`Tape::lm_head_ce`] (whose gradient was computed with it). Adapter gradients accumulate
    /// into the tape's [`Adapters`]; returns the gradient of `wrt` when it requires one. Each
    /// record, and the values it held, is released once its backward has run.
    pub fn backward(
        mut self,
        out: &Var,
        dout: Option<Tensor>,
        wrt: &Var,
    ) -> Result<Option<Tensor>> {
        if !self.train {
            return Err(Error::InvalidArgument(
                "backward on a tape recorded without training".into(),
            ));
        }
        let mut grads: Vec<Option<Rc<Tensor>>> = vec![None; self.next];
        if let Some(d) = dout {
            if let Ok(v) = out.value() {
                if v.shape() != d.shape() {
                    return Err(Error::ShapeMismatch {
                        op: "backward",
                        expected: format!("an output gradient {:?}", v.shape()),
                        got: format!("{:?}", d.shape()),
                    });
                }
            }
            self.check("backward", &d)?;
            grads[out.id] = Some(Rc::new(d));
        }
        while let Some(op) = self.ops.pop() {
            self.backward_op(op, &mut grads)?;
        }
        grads[wrt.id].take().map(unshare).transpose()
    }

    fn backward_op(&self, op: Op<'a>, grads: &mut [Option<Rc<Tensor>>]) -> Result<()> {
        let accumulate = |grads: &mut [Option<Rc<Tensor>>], at: At, g: Rc<Tensor>| -> Result<()> {
            if !at.rg {
                return Ok(());
            }
            grads[at.id] = Some(match grads[at.id].take() {
                Some(acc) => sum(acc, g)?,
                None => g,
            });
            Ok(())
        };
        match op {
            Op::RmsNorm {
                x,
                y,
                w,
                rstd,
                norm,
            } => {
                let Some(dy) = grads[y.id].take() else {
                    return Ok(());
                };
                let plus = grads[x.id].take();
                let dx = self.rmsnorm_backward(x.value()?, w, &rstd, &dy, plus.as_deref(), norm)?;
                grads[x.id] = Some(Rc::new(dx));
            }
            Op::HeadRmsNorm {
                x,
                y,
                w,
                rstd,
                norm,
                shape,
            } => {
                let Some(dy) = grads[y.id].take() else {
                    return Ok(());
                };
                let xv = x.value()?;
                let mut dy = unshare(dy)?;
                dy.reshape_in_place(xv.shape())?;
                let mut dx = self.rmsnorm_backward(xv, w, &rstd, &dy, None, norm)?;
                dx.reshape_in_place(&shape)?;
                let at = x.at();
                drop((x, dy, rstd));
                accumulate(grads, at, Rc::new(dx))?;
            }
            Op::AddRmsNorm {
                a,
                b,
                h,
                y,
                w,
                rstd,
                norm,
            } => {
                let dh_later = grads[h.id].take();
                let dh = match grads[y.id].take() {
                    Some(dy) => Rc::new(self.rmsnorm_backward(
                        h.value()?,
                        w,
                        &rstd,
                        &dy,
                        dh_later.as_deref(),
                        norm,
                    )?),
                    None => match dh_later {
                        Some(g) => g,
                        None => return Ok(()),
                    },
                };
                drop(h);
                accumulate(grads, a, dh.clone())?;
                accumulate(grads, b, dh)?;
            }
            Op::Linear {
                x,
                y,
                lin,
                xa,
                mask,
            } => {
                let Some(dy) = grads[y.id].take() else {
                    return Ok(());
                };
                let at = x.at();
                let acc = grads[at.id].take();
                grads[at.id] = self.linear_backward(x, &lin, xa, mask, &dy, acc)?;
            }
            Op::LinearGroup { x, ys, lins, xas } => {
                let dys: Vec<Option<Rc<Tensor>>> = ys.iter().map(|y| grads[y.id].take()).collect();
                if dys.iter().all(Option::is_none) {
                    return Ok(());
                }
                let at = x.at();
                let acc = grads[at.id].take();
                grads[at.id] = self.linear_group_backward(x, &lins, &xas, &dys, acc)?;
            }
            Op::LinearResidual {
                x,
                h,
                y,
                lin,
                xa,
                mask,
            } => {
                let Some(dy) = grads[y.id].take() else {
                    return Ok(());
                };
                accumulate(grads, h, dy.clone())?;
                let at = x.at();
                let acc = grads[at.id].take();
                grads[at.id] = self.linear_backward(x, &lin, xa, mask, &dy, acc)?;
            }
            Op::Rope {
                x,
                y,
                heads,
                head_dim,
                freqs,
                mag,
                long,
            } => {
                let Some(dy) = grads[y.id].take() else {
                    return Ok(());
                };
                let mut d = unshare(dy)?;
                let (t, _) = rows_cols("rope backward", &d)?;
                self.rotate(&mut d, t, heads, head_dim, (freqs, long), mag, true)?;
                accumulate(grads, x, Rc::new(d))?;
            }
            Op::SplitCols { x, parts, widths } => {
                let dparts: Vec<Option<Rc<Tensor>>> =
                    parts.iter().map(|p| grads[p.id].take()).collect();
                if dparts.iter().all(Option::is_none) {
                    return Ok(());
                }
                let refs: Vec<Option<&Tensor>> = dparts.iter().map(Option::as_deref).collect();
                let dx = split::concat_cols_or_zeros(&refs, &widths)?;
                drop(dparts);
                accumulate(grads, x, Rc::new(dx))?;
            }
            Op::Attention {
                q,
                k,
                v,
                o,
                lse,
                dims,
            } => {
                let Some(d_o) = grads[o.id].take() else {
                    return Ok(());
                };
                let cu = &self.batch.cu_seqlens;
                let (qv, kv, vv, ov) = (q.value()?, k.value()?, v.value()?, o.value()?);
                let (dq, dk, dv) = match self.device {
                    Device::Cpu => {
                        let (dq, dk, dv) = attention::backward(
                            dims,
                            f32s(qv, "attention backward")?,
                            f32s(kv, "attention backward")?,
                            f32s(vv, "attention backward")?,
                            f32s(ov, "attention backward")?,
                            f32s(&lse, "attention backward")?,
                            f32s(&d_o, "attention backward")?,
                            cu,
                        )?;
                        (
                            host(dq, qv.shape())?,
                            host(dk, kv.shape())?,
                            host(dv, vv.shape())?,
                        )
                    }
                    Device::Cuda(_) => {
                        attention::backward_cuda(dims, qv, kv, vv, ov, &lse, &d_o, cu)?
                    }
                };
                let (qa, ka, va) = (q.at(), k.at(), v.at());
                drop((q, k, v, o, lse, d_o));
                accumulate(grads, qa, Rc::new(dq))?;
                accumulate(grads, ka, Rc::new(dk))?;
                accumulate(grads, va, Rc::new(dv))?;
            }
            Op::Glu { gate, up, h, act } => {
                let Some(dh) = grads[h.id].take() else {
                    return Ok(());
                };
                let (ga, ua) = (gate.at(), up.at());
                let (dg, du) = match self.device {
                    Device::Cpu => {
                        let (g, u) = (gate.value()?, up.value()?);
                        let (dg, du) = swiglu::backward(
                            f32s(g, "glu backward")?,
                            f32s(u, "glu backward")?,
                            f32s(&dh, "glu backward")?,
                            act,
                        )?;
                        (host(dg, g.shape())?, host(du, u.shape())?)
                    }
                    // Written over gate and up when nothing else holds them.
                    Device::Cuda(_) => {
                        swiglu::backward_cuda(gate.into_tensor()?, up.into_tensor()?, &dh, act)?
                    }
                };
                drop(dh);
                accumulate(grads, ga, Rc::new(dg))?;
                accumulate(grads, ua, Rc::new(du))?;
            }
            Op::Add { a, b, y } => {
                let Some(dy) = grads[y.id].take() else {
                    return Ok(());
                };
                accumulate(grads, a, dy.clone())?;
                accumulate(grads, b, dy)?;
            }
            Op::LmHeadCe { x, dx } => {
                accumulate(grads, x, Rc::new(dx))?;
            }
        }
        Ok(())
    }

    /// `dx = rmsnorm_backward(dy) (+ plus)`.
    fn rmsnorm_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        rstd: &Tensor,
        dy: &Tensor,
        plus: Option<&Tensor>,
        norm: Norm,
    ) -> Result<Tensor> {
        match self.device {
            Device::Cpu => {
                let op = "rmsnorm backward";
                let (_, d) = rows_cols(op, x)?;
                let dx = rmsnorm::backward(
                    f32s(x, op)?,
                    f32s(w, op)?,
                    f32s(rstd, op)?,
                    f32s(dy, op)?,
                    d,
                    norm,
                )?;
                let mut dx = host(dx, x.shape())?;
                if let Some(p) = plus {
                    add_into(&mut dx, p)?;
                }
                Ok(dx)
            }
            Device::Cuda(_) => rmsnorm::backward_cuda(x, w, rstd, dy, plus, norm),
        }
    }

    /// A linear layer's backward: adapter gradients into the adapters' buffer, and x's gradient
    /// when it needs one: `acc` (the gradient x already has from other consumers) plus dx. On a
    /// GPU dx is added into `acc` in the GEMMs' epilogues when nothing else holds `acc`, or
    /// written over x when nothing else holds x.
    fn linear_backward(
        &self,
        x: Var,
        lin: &Linear<'a>,
        xa: Option<Tensor>,
        mask: Option<Vec<f32>>,
        dy: &Tensor,
        acc: Option<Rc<Tensor>>,
    ) -> Result<Option<Rc<Tensor>>> {
        if !x.rg {
            // No gradient for x (and none can have been accumulated for it).
            self.linear_backward_into(x, lin, xa, mask, dy, Acc::None)?;
            return Ok(acc);
        }
        let acc = Acc::of(acc);
        self.linear_backward_into(x, lin, xa, mask, dy, acc)
    }

    /// The backward of [`Tape::linears`] on a GPU: each adapter's gradients, and x's gradient
    /// (`acc` plus the sum of every layer's dx) as one grouped GEMM (`gemm::lora_backward_group`)
    /// over the layers whose output has a gradient.
    fn linear_group_backward(
        &self,
        x: Var,
        lins: &[Linear<'a>],
        xas: &[Option<Tensor>],
        dys: &[Option<Rc<Tensor>>],
        acc: Option<Rc<Tensor>>,
    ) -> Result<Option<Rc<Tensor>>> {
        let mut views = Vec::with_capacity(lins.len());
        for (lin, xa) in lins.iter().zip(xas) {
            views.push(match (self.linear_slot(lin)?, xa) {
                (Some(SlotRef::Cuda(view)), Some(_)) => Some(view),
                _ => None,
            });
        }
        let mut layers = Vec::with_capacity(lins.len());
        for (((lin, xa), view), dy) in lins.iter().zip(xas).zip(&views).zip(dys) {
            let Some(dy) = dy else { continue };
            // Without a gradient for x, a layer without an adapter has nothing to compute.
            if !x.rg && view.is_none() {
                continue;
            }
            layers.push(gemm::GroupGrad {
                w: nf4_weight(lin)?,
                lora: view.as_ref().zip(xa.as_ref()),
                dy,
            });
        }
        let xv = x.value.expect("a recorded input");
        if layers.is_empty() {
            return Ok(acc);
        }
        // SAFETY (every call): the views come from the tape's adapters, which the tape borrows
        // (see the forward).
        if !x.rg {
            unsafe { gemm::lora_backward_group(gemm::LayerInput::Frozen(&xv), &layers)? };
            return Ok(acc);
        }
        let acc = Acc::of(acc);
        let dx = match acc {
            Acc::Own(acc) => {
                let input = gemm::LayerInput::Accumulate(&xv, acc);
                return Ok(unsafe { gemm::lora_backward_group(input, &layers)? }.map(Rc::new));
            }
            _ => match Rc::try_unwrap(xv) {
                Ok(x) => unsafe { gemm::lora_backward_group(gemm::LayerInput::Spent(x), &layers)? },
                Err(x) => unsafe {
                    gemm::lora_backward_group(gemm::LayerInput::Kept(&x), &layers)?
                },
            },
        }
        .expect("x needs a gradient");
        Ok(Some(match acc {
            Acc::Shared(a) => sum(a, Rc::new(dx))?,
            _ => Rc::new(dx),
        }))
    }

    fn linear_backward_into(
        &self,
        x: Var,
        lin: &Linear<'a>,
        xa: Option<Tensor>,
        mask: Option<Vec<f32>>,
        dy: &Tensor,
        acc: Acc,
    ) -> Result<Option<Rc<Tensor>>> {
        let need_dx = x.rg;
        // The CPU, and a gradient someone else still holds: dx, then the sum.
        let finish = |dx: Option<Tensor>, acc: Acc| -> Result<Option<Rc<Tensor>>> {
            Ok(match (dx, acc) {
                (None, _) => None,
                (Some(d), Acc::None) => Some(Rc::new(d)),
                (Some(mut d), Acc::Own(a)) => {
                    add_into(&mut d, &a)?;
                    Some(Rc::new(d))
                }
                (Some(d), Acc::Shared(a)) => Some(sum(a, Rc::new(d))?),
            })
        };
        let slot = match (self.adapters, &xa) {
            (Some(a), Some(_)) => a.slot_ref(lin.layer, lin.target, self.dropout_pair())?,
            _ => None,
        };
        match self.device {
            Device::Cpu => {
                let op = "linear backward";
                let xv = x.value()?;
                let (t, i) = rows_cols(op, xv)?;
                let o = lin.weight.shape()[0];
                let dims = linear::Dims {
                    tokens: t,
                    in_features: i,
                    out_features: o,
                };
                let dx = lin.weight.with_f32(|w| match (slot, &xa) {
                    (
                        Some(SlotRef::Cpu {
                            slot,
                            a,
                            b,
                            rank,
                            scale,
                        }),
                        Some(xa),
                    ) => {
                        let adapters = self.adapters.expect("a slot comes from the adapters");
                        let mut g = adapters.grads_mut();
                        let buf = g.cpu_slice_mut::<f32>(op)?;
                        let (ga, gb) = split_two(buf, slot.a.clone(), slot.b.clone());
                        linear::backward(
                            dims,
                            f32s(xv, op)?,
                            w,
                            Some(linear::LoraGrads {
                                lora: linear::Lora { a, b, rank, scale },
                                xa: f32s(xa, op)?,
                                grad_a: ga,
                                grad_b: gb,
                            }),
                            mask.as_deref(),
                            f32s(dy, op)?,
                            need_dx,
                        )
                    }
                    _ => {
                        linear::backward(dims, f32s(xv, op)?, w, None, None, f32s(dy, op)?, need_dx)
                    }
                })?;
                finish(dx.map(|d| host(d, &[t, i])).transpose()?, acc)
            }
            Device::Cuda(_) => {
                let BaseWeight::Nf4(w) = lin.weight else {
                    unreachable!("the forward refused a dense weight on the GPU")
                };
                let x = x.value.expect("a recorded input");
                match (slot, xa, acc) {
                    // The adapter's gradients need the kernel whether or not dx is wanted.
                    (Some(SlotRef::Cuda(view)), Some(xa), Acc::Own(acc)) => {
                        // SAFETY (here and below): the view comes from the tape's adapters, which
                        // the tape borrows (see the forward).
                        let dx =
                            unsafe { gemm::lora_backward_view_acc(&x, w, &view, &xa, dy, acc)? };
                        Ok(Some(Rc::new(dx)))
                    }
                    (Some(SlotRef::Cuda(view)), Some(xa), acc) => {
                        let dx = match Rc::try_unwrap(x) {
                            Ok(x) => unsafe {
                                gemm::lora_backward_view_over_x(x, w, &view, &xa, dy)?
                            },
                            Err(x) => unsafe { gemm::lora_backward_view(&x, w, &view, &xa, dy)? },
                        };
                        finish(need_dx.then_some(dx), acc)
                    }
                    _ if !need_dx => Ok(None),
                    (_, _, Acc::Own(acc)) => Ok(Some(Rc::new(gemm::nf4_dx_acc(dy, w, acc)?))),
                    (_, _, acc) => {
                        let dx = match Rc::try_unwrap(x) {
                            Ok(x) => gemm::nf4_dx_into(dy, w, x)?,
                            Err(_) => gemm::nf4_dx_cuda(dy, w)?,
                        };
                        finish(Some(dx), acc)
                    }
                }
            }
        }
    }
}

/// The NF4 base weight of a linear layer on the GPU (the CUDA kernels take no other).
fn nf4_weight<'w>(lin: &Linear<'w>) -> Result<&'w Nf4Tensor> {
    match lin.weight {
        BaseWeight::Nf4(w) => Ok(w),
        _ => Err(Error::InvalidArgument(format!(
            "layer {} {}: the CUDA kernels take NF4 base weights; this one is dense",
            lin.layer,
            lin.target.module()
        ))),
    }
}

/// The gradient an op's input already has when the op's backward runs.
enum Acc {
    None,
    /// Held by no one else: the backward may add into it.
    Own(Tensor),
    /// Shared (e.g. a residual gradient that also flows elsewhere): summed into a new buffer.
    Shared(Rc<Tensor>),
}

impl Acc {
    /// The gradient an input has: owned when nothing else holds it, else shared.
    fn of(acc: Option<Rc<Tensor>>) -> Acc {
        match acc {
            None => Acc::None,
            Some(a) => match Rc::try_unwrap(a) {
                Ok(t) => Acc::Own(t),
                Err(shared) => Acc::Shared(shared),
            },
        }
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

/// The input embedding of `ids` (`[T, d]`, f32 on the CPU, bf16 on a GPU): frozen, no record.
/// With `scale` (Gemma's `√hidden_size`) each row is multiplied by it in the table's dtype: an
/// f32 multiply on the CPU; on a GPU `bf16(float(e) · float(bf16(scale)))`, as transformers
/// computes it (`ops::embedding`).
pub fn embed(table: &Tensor, ids: &[u32], scale: Option<f32>) -> Result<Tensor> {
    match table.device() {
        Device::Cpu => {
            let d = table.shape().get(1).copied().unwrap_or(0);
            let h = embedding::forward(f32s(table, "embedding")?, d, ids, scale)?;
            host(h, &[ids.len(), d])
        }
        Device::Cuda(_) => embedding::forward_cuda(table, ids, scale),
    }
}
