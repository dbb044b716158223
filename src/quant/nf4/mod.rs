//! NF4 4-bit quantization with double-quantized scales, bit-exact with bitsandbytes.
//!
//! # The format (bitsandbytes' `quantize_4bit(quant_type="nf4")`)
//! A weight `W` of `n` elements is flattened row-major and cut into blocks of `B` elements
//! (`B` ∈ {32, 64, …, 4096}; 64 by default); the last block may be partial. Per block `b`:
//! ```text
//! absmax[b] = max_i |w_i|                                       (f32)
//! s_i       = clamp(w_i · (1 / absmax[b]), −1, 1)    full blocks (f32 reciprocal, then product)
//! s_i       = clamp(w_i / absmax[b], −1, 1)          the partial last block (true division)
//! q_i       = #{ k : mid_k < s_i },  mid_k = (code[k] + code[k+1]) / 2 (f32), k = 0..14
//! ```
//! `code` is the 16-value NF4 codebook ([`NF4_CODE`]); `q_i` is the nearest codebook index, ties
//! going to the lower one. A zero block divides by `1e-38` instead of 0 (all `q_i` = 7, the code
//! of 0.0); the partial last block also *stores* `max(absmax, 1e-38)`. Two indices share a byte,
//! the first element in the **high** nibble: `packed[j] = q_{2j} << 4 | q_{2j+1}`; an odd count
//! pads with a scaled 0.0, so the last low nibble is 7.
//!
//! Dequantization: `w'_i = code[q_i] · absmax[b]` in f32, then rounded (to nearest even) to the
//! output dtype.
//!
//! # Double quantization (`compress_statistics=True`)
//! The f32 absmax vector is itself quantized to 8 bits in blocks of 256:
//! ```text
//! offset     = mean(absmax)                                     (see below)
//! a_b        = absmax[b] − offset                               (f32)
//! absmax2[c] = max_{b in block c} |a_b|                         (f32, c = b / 256)
//! t_b        = clamp(a_b · (1 / absmax2[c]), −1, 1)
//! qa_b       = the code2 index of t_b chosen through a 65536-point grid (see `cpu::dynamic_index`;
//!              nearly always the nearest code); qa_b = 0 for a block with absmax2 = 0
//! ```
//! `code2` is bitsandbytes' signed 8-bit dynamic map, `create_dynamic_map(signed=True)`
//! ([`dynamic_map`]). The scale is recovered as `absmax[b] ≈ code2[qa_b] · absmax2[c] + offset`,
//! a product then a sum, each rounded to f32 (never fused: the kernels use `__fmul_rn` and
//! `__fadd_rn`). `offset` is the f32 mean of the absmax vector in torch's summation order
//! (`cpu::absmax_mean`), which the CUDA kernel reproduces add for add.
//!
//! # Where bitsandbytes' CUDA kernels differ
//! The fixtures come from bitsandbytes' CPU path, which we follow. Its CUDA kernels (built with
//! fast math) multiply by an approximate reciprocal also in the partial last block, have no
//! 1e-38 floor (a zero block becomes code 0 and dequantizes to −0.0), flush denormals, pick the
//! true nearest 8-bit code, and take the mean in another order. Dequantization is the same
//! formula on both, so checkpoints quantized by either load exactly.
//!
//! Storage per weight: `n/2` bytes of codes plus, with double quantization, 1 byte per block and
//! 4 bytes per 256 blocks: 4.127 bits per weight at `B = 64`.

mod cpu;
mod cuda;
pub mod dynamic_map;

use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{shape_str, DType, Tensor};

/// bitsandbytes' NF4 codebook (`get_4bit_type("nf4")`): the 16 quantiles of N(0, 1) normalised to
/// [−1, 1], with an exact zero. The literals are bitsandbytes' own decimals; they round to the
/// f32 values it uses (the fixture tests compare the bits).
#[allow(clippy::excessive_precision)]
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// Block sizes bitsandbytes accepts for 4-bit quantization.
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Block size of the second-level (absmax) quantization.
pub const NESTED_BLOCKSIZE: usize = 256;

/// The smallest scale bitsandbytes divides by (a zero block would otherwise give 0/0).
pub(crate) const MIN_ABSMAX: f32 = 1e-38;

/// How to quantize.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nf4Config {
    /// Elements per scale block: 32, 64 (default), 128, …, 4096.
    pub blocksize: usize,
    /// Quantize the per-block scales to 8 bits too (bitsandbytes' `compress_statistics`).
    pub double_quant: bool,
}

impl Default for Nf4Config {
    fn default() -> Self {
        Nf4Config {
            blocksize: 64,
            double_quant: true,
        }
    }
}

/// The per-block scales of an [`Nf4Tensor`]. (One per weight matrix, so the size difference of
/// the variants does not matter.)
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Absmax {
    /// One f32 absmax per block: `[nblocks]`.
    Plain(Tensor),
    /// Double-quantized: `absmax[b] = code2[q[b]] · absmax2[b / 256] + offset`.
    Double {
        /// u8 `[nblocks]`: indices into `code2`.
        q: Tensor,
        /// f32 `[ceil(nblocks / 256)]`: second-level absmax.
        absmax2: Tensor,
        /// f32 `[1]`: the mean subtracted before quantizing.
        offset: Tensor,
        /// f32 `[256]`: the 8-bit dynamic map.
        code2: Tensor,
    },
}

/// A weight quantized to NF4, on one device.
#[derive(Debug)]
pub struct Nf4Tensor {
    /// Shape of the original weight.
    pub shape: Vec<usize>,
    /// dtype of the original weight (what [`Nf4Tensor::dequantize`] usually returns).
    pub dtype: DType,
    /// Elements per scale block.
    pub blocksize: usize,
    /// u8 `[ceil(n / 2)]`: two codes per byte, the first in the high nibble.
    pub packed: Tensor,
    /// The codebook ([`NF4_CODE`] unless a checkpoint says otherwise). Sixteen numbers, kept on
    /// the host: the kernels take them by value with each launch, so they are read from the
    /// constant bank rather than looked up in device memory.
    pub code: [f32; 16],
    /// The per-block scales.
    pub absmax: Absmax,
}

/// Rejects a block size bitsandbytes does not have (an `InvalidArgument` listing [`BLOCKSIZES`]).
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if BLOCKSIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "NF4 blocksize {blocksize} is not supported: use one of {BLOCKSIZES:?}"
        )))
    }
}

/// The double-quantization offset of an absmax vector (f32 `[n]`, n ≥ 1, on any device): its
/// mean in torch's single-threaded summation order, the same on CPU and CUDA.
pub fn absmax_mean(absmax: &Tensor) -> Result<f32> {
    if absmax.dtype() != DType::F32 || absmax.elem_count() == 0 {
        return Err(Error::InvalidArgument(format!(
            "absmax_mean needs a non-empty f32 vector, got {} {}",
            absmax.dtype(),
            shape_str(absmax.shape())
        )));
    }
    match absmax.device() {
        Device::Cpu => Ok(cpu::absmax_mean(absmax.cpu_slice::<f32>("absmax_mean")?)),
        Device::Cuda(o) => cuda::absmax_mean(absmax, o),
    }
}

fn check_float(op: &'static str, dtype: DType, shape: &[usize]) -> Result<()> {
    if dtype.is_float() {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{op}: cannot take a {dtype} tensor of shape {}: expected f32, bf16 or f16",
            shape_str(shape)
        )))
    }
}

impl Nf4Tensor {
    /// Quantizes `w` (f32, bf16 or f16, any non-empty shape) on the device it lives on.
    pub fn quantize(w: &Tensor, cfg: Nf4Config) -> Result<Nf4Tensor> {
        let mut q = Nf4Tensor::allocate(w.shape(), w.dtype(), cfg, &w.device())?;
        q.quantize_from(w)?;
        Ok(q)
    }

    /// Zero-filled buffers for a weight of `shape` and `dtype` (the tables filled in), ready
    /// for [`Nf4Tensor::quantize_from`].
    pub fn allocate(
        shape: &[usize],
        dtype: DType,
        cfg: Nf4Config,
        device: &Device,
    ) -> Result<Nf4Tensor> {
        check_float("NF4 quantize", dtype, shape)?;
        let n: usize = shape.iter().product();
        if n == 0 {
            return Err(Error::InvalidArgument(format!(
                "NF4 cannot quantize an empty tensor (shape {}, {dtype})",
                shape_str(shape)
            )));
        }
        if n > i64::MAX as usize / 2 {
            return Err(Error::InvalidArgument(format!(
                "NF4 cannot quantize shape {}: too many elements",
                shape_str(shape)
            )));
        }
        check_blocksize(cfg.blocksize)?;
        let nblocks = n.div_ceil(cfg.blocksize);
        let absmax = if cfg.double_quant {
            Absmax::Double {
                q: Tensor::zeros(&[nblocks], DType::U8, device)?,
                absmax2: Tensor::zeros(&[nblocks.div_ceil(NESTED_BLOCKSIZE)], DType::F32, device)?,
                offset: Tensor::zeros(&[1], DType::F32, device)?,
                code2: Tensor::from_vec(dynamic_map::signed().to_vec(), &[256], device)?,
            }
        } else {
            Absmax::Plain(Tensor::zeros(&[nblocks], DType::F32, device)?)
        };
        Ok(Nf4Tensor {
            shape: shape.to_vec(),
            dtype,
            blocksize: cfg.blocksize,
            packed: Tensor::zeros(&[n.div_ceil(2)], DType::U8, device)?,
            code: NF4_CODE,
            absmax,
        })
    }

    /// Quantizes `w` into this tensor's buffers, keeping its block size and double
    /// quantization. `w` must have this tensor's shape and device; its dtype becomes ours.
    pub fn quantize_from(&mut self, w: &Tensor) -> Result<()> {
        check_float("NF4 quantize", w.dtype(), w.shape())?;
        if w.shape() != self.shape.as_slice() {
            return Err(Error::ShapeMismatch {
                op: "nf4 quantize",
                expected: shape_str(&self.shape),
                got: shape_str(w.shape()),
            });
        }
        if w.device() != self.device() {
            return Err(Error::DeviceMismatch {
                op: "nf4 quantize",
                a: self.device().to_string(),
                b: w.device().to_string(),
            });
        }
        self.validate()?;
        self.dtype = w.dtype();
        match w.device() {
            Device::Cpu => cpu::quantize_into(w, self),
            Device::Cuda(o) => cuda::quantize_into(w, self, o),
        }
    }

    /// Assembles a quantized tensor from its parts (e.g. a bitsandbytes checkpoint), checking that
    /// the parts agree with each other.
    pub fn from_parts(
        shape: &[usize],
        dtype: DType,
        blocksize: usize,
        packed: Tensor,
        code: [f32; 16],
        absmax: Absmax,
    ) -> Result<Nf4Tensor> {
        let q = Nf4Tensor {
            shape: shape.to_vec(),
            dtype,
            blocksize,
            packed,
            code,
            absmax,
        };
        q.validate()?;
        Ok(q)
    }

    /// Number of weight elements.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of scale blocks.
    pub fn nblocks(&self) -> usize {
        self.elem_count().div_ceil(self.blocksize)
    }

    /// The device the codes and scales live on (that of `packed`).
    pub fn device(&self) -> Device {
        self.packed.device()
    }

    /// Bytes on the device: codes plus scales (plus the 256-entry table of double quantization).
    pub fn size_in_bytes(&self) -> usize {
        let tables = match &self.absmax {
            Absmax::Plain(a) => 4 * a.elem_count(),
            Absmax::Double { q, absmax2, .. } => {
                q.elem_count() + 4 * absmax2.elem_count() + 4 + 1024
            }
        };
        self.packed.elem_count() + tables
    }

    /// Checks every part's dtype, shape and device against the weight's shape and block size.
    pub fn validate(&self) -> Result<()> {
        check_blocksize(self.blocksize)?;
        if !self.dtype.is_float() {
            return Err(Error::InvalidArgument(format!(
                "NF4 weight dtype must be f32, bf16 or f16, got {}",
                self.dtype
            )));
        }
        let n = self.elem_count();
        let nblocks = self.nblocks();
        let dev = self.device();
        let part = |name: &str, t: &Tensor, dtype: DType, len: usize| -> Result<()> {
            if t.dtype() != dtype || t.elem_count() != len {
                return Err(Error::InvalidArgument(format!(
                    "NF4 {name} for a weight of shape {} (blocksize {}): expected {dtype} [{len}], \
                     got {} {}",
                    shape_str(&self.shape),
                    self.blocksize,
                    t.dtype(),
                    shape_str(t.shape())
                )));
            }
            if t.device() != dev {
                return Err(Error::DeviceMismatch {
                    op: "Nf4Tensor",
                    a: dev.to_string(),
                    b: t.device().to_string(),
                });
            }
            Ok(())
        };
        part("packed", &self.packed, DType::U8, n.div_ceil(2))?;
        match &self.absmax {
            Absmax::Plain(a) => part("absmax", a, DType::F32, nblocks)?,
            Absmax::Double {
                q,
                absmax2,
                offset,
                code2,
            } => {
                part("absmax (quantized)", q, DType::U8, nblocks)?;
                part(
                    "nested absmax",
                    absmax2,
                    DType::F32,
                    nblocks.div_ceil(NESTED_BLOCKSIZE),
                )?;
                part("offset", offset, DType::F32, 1)?;
                part("nested quant map", code2, DType::F32, 256)?;
            }
        }
        Ok(())
    }

    /// The weight back in `dtype` (f32, bf16 or f16), on the same device.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        if !dtype.is_float() {
            return Err(Error::DTypeMismatch {
                op: "nf4 dequantize",
                expected: "f32, bf16 or f16".into(),
                got: dtype.to_string(),
            });
        }
        let mut out = Tensor::uninit(&self.shape, dtype, &self.device())?;
        self.dequantize_into(&mut out)?;
        Ok(out)
    }

    /// Dequantizes a CPU weight into the host slice `out` (f32, this weight's element count),
    /// over the CPU's cores: no allocation beyond the per-block scales.
    pub fn dequantize_f32_into(&self, out: &mut [f32]) -> Result<()> {
        self.validate()?;
        if self.device() != Device::Cpu || out.len() != self.elem_count() {
            return Err(Error::InvalidArgument(format!(
                "nf4 dequantize into a host slice: needs a CPU weight and {} elements, got a \
                 weight on {} and {} elements",
                self.elem_count(),
                self.device(),
                out.len()
            )));
        }
        let absmax = self.absmax_f32()?;
        let packed = self.packed.cpu_slice::<u8>("nf4 dequantize")?;
        cpu::dequantize_4bit_into(packed, &absmax, &self.code, self.blocksize, out);
        Ok(())
    }

    /// Dequantizes into `out` (this weight's shape and device; f32, bf16 or f16).
    pub fn dequantize_into(&self, out: &mut Tensor) -> Result<()> {
        self.validate()?;
        if !out.dtype().is_float() {
            return Err(Error::DTypeMismatch {
                op: "nf4 dequantize",
                expected: "f32, bf16 or f16".into(),
                got: out.dtype().to_string(),
            });
        }
        if out.shape() != self.shape.as_slice() {
            return Err(Error::ShapeMismatch {
                op: "nf4 dequantize",
                expected: shape_str(&self.shape),
                got: shape_str(out.shape()),
            });
        }
        if out.device() != self.device() {
            return Err(Error::DeviceMismatch {
                op: "nf4 dequantize",
                a: self.device().to_string(),
                b: out.device().to_string(),
            });
        }
        match self.device() {
            Device::Cpu => cpu::dequantize_into(self, out),
            Device::Cuda(o) => cuda::dequantize_into(self, out, o),
        }
    }

    /// The per-block scales as f32 (double quantization undone), copied to the host.
    pub fn absmax_f32(&self) -> Result<Vec<f32>> {
        match &self.absmax {
            Absmax::Plain(a) => a.to_vec(),
            Absmax::Double {
                q,
                absmax2,
                offset,
                code2,
            } => Ok(cpu::dequantize_absmax(
                &q.to_vec()?,
                &absmax2.to_vec()?,
                offset.to_vec::<f32>()?[0],
                &code2.to_vec()?,
            )),
        }
    }

    /// A copy on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Nf4Tensor> {
        let absmax = match &self.absmax {
            Absmax::Plain(a) => Absmax::Plain(a.to_device(device)?),
            Absmax::Double {
                q,
                absmax2,
                offset,
                code2,
            } => Absmax::Double {
                q: q.to_device(device)?,
                absmax2: absmax2.to_device(device)?,
                offset: offset.to_device(device)?,
                code2: code2.to_device(device)?,
            },
        };
        Ok(Nf4Tensor {
            shape: self.shape.clone(),
            dtype: self.dtype,
            blocksize: self.blocksize,
            packed: self.packed.to_device(device)?,
            code: self.code,
            absmax,
        })
    }
}
