//! CUDA launchers for `kernels/nf4.cu`. They produce the same bytes as the CPU reference.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use half::{bf16, f16};

use super::{Absmax, Nf4Tensor, NESTED_BLOCKSIZE};
use crate::device::cuda::{grid_1d, CudaDevice};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

const MODULE: &str = "nf4";
/// Quantization blocks handled by one CTA of the quantize kernel (one warp each).
const WARPS_PER_CTA: u32 = 8;
const DEQUANT_THREADS: u32 = 256;
/// Groups of 8 elements per dequantize thread (`NF4_DQ_UNROLL` in the kernel).
const DEQUANT_UNROLL: usize = 4;

/// The codebook as the kernels' `Nf4Code` parameter: passed by value with each launch.
#[repr(C)]
#[derive(Clone, Copy)]
struct Nf4Code([f32; 16]);
// SAFETY: #[repr(C)] plain data laid out like the kernels' `Nf4Code` (16 floats).
unsafe impl cudarc::driver::DeviceRepr for Nf4Code {}

fn float_kernel(op: &'static str, dtype: DType, names: [&'static str; 3]) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok(names[0]),
        DType::BF16 => Ok(names[1]),
        DType::F16 => Ok(names[2]),
        other => Err(Error::DTypeMismatch {
            op,
            expected: "f32, bf16 or f16".into(),
            got: other.to_string(),
        }),
    }
}

/// Quantizes `w` into the buffers of `q` (same shape, same device; checked by the caller).
pub(super) fn quantize_into(w: &Tensor, q: &mut Nf4Tensor, ordinal: usize) -> Result<()> {
    let op = "nf4 quantize";
    let dev = CudaDevice::get(ordinal)?;
    let n = w.elem_count();
    let nblocks = q.nblocks();
    let name = float_kernel(
        op,
        w.dtype(),
        ["nf4_quantize_f32", "nf4_quantize_bf16", "nf4_quantize_f16"],
    )?;
    // With double quantization the f32 absmax is a scratch buffer; otherwise it is the result.
    let mut scratch = match q.absmax {
        Absmax::Double { .. } => Some(Tensor::uninit(
            &[nblocks],
            DType::F32,
            &Device::Cuda(ordinal),
        )?),
        Absmax::Plain(_) => None,
    };
    {
        let absmax = match (&mut scratch, &mut q.absmax) {
            (Some(s), _) => s,
            (None, Absmax::Plain(a)) => a,
            (None, Absmax::Double { .. }) => unreachable!("scratch exists for double quant"),
        };
        let f = dev.function(MODULE, name)?;
        let (n_i64, bs_i32) = (n as i64, q.blocksize as i32);
        let mut b = dev.stream().launch_builder(f);
        match w.dtype() {
            DType::F32 => b.arg(w.cuda_slice::<f32>(op)?),
            DType::BF16 => b.arg(w.cuda_slice::<bf16>(op)?),
            _ => b.arg(w.cuda_slice::<f16>(op)?),
        };
        let code = Nf4Code(q.code);
        b.arg(&code)
            .arg(q.packed.cuda_slice_mut::<u8>(op)?)
            .arg(absmax.cuda_slice_mut::<f32>(op)?)
            .arg(&n_i64)
            .arg(&bs_i32);
        let cfg = LaunchConfig {
            grid_dim: (nblocks.div_ceil(WARPS_PER_CTA as usize) as u32, 1, 1),
            block_dim: (WARPS_PER_CTA * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match nf4_quantize_<dtype>(const T*, const float*, uint8_t*,
        // float*, long long, int); x holds n elements, code 16, packed ceil(n/2), absmax
        // ceil(n/blocksize) (validated), and each warp touches only its own block.
        unsafe { dev.launch(name, b, cfg) }?;
    }
    if let (
        Some(absmax),
        Absmax::Double {
            q: qa,
            absmax2,
            offset,
            code2,
        },
    ) = (&scratch, &mut q.absmax)
    {
        launch_mean(&dev, absmax, offset)?;
        let name = "nf4_quantize_absmax";
        let nblocks_i64 = nblocks as i64;
        let f = dev.function(MODULE, name)?;
        let mut b = dev.stream().launch_builder(f);
        b.arg(absmax.cuda_slice::<f32>(op)?)
            .arg(offset.cuda_slice::<f32>(op)?)
            .arg(code2.cuda_slice::<f32>(op)?)
            .arg(qa.cuda_slice_mut::<u8>(op)?)
            .arg(absmax2.cuda_slice_mut::<f32>(op)?)
            .arg(&nblocks_i64);
        let cfg = LaunchConfig {
            grid_dim: (nblocks.div_ceil(NESTED_BLOCKSIZE) as u32, 1, 1),
            block_dim: (NESTED_BLOCKSIZE as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: nf4_quantize_absmax(const float*, const float*, const float*, uint8_t*, float*,
        // long long): absmax and q hold nblocks, offset 1, code2 256, absmax2
        // ceil(nblocks/256) = the grid; the kernel assumes 256 threads per block, as cfg gives.
        unsafe { dev.launch(name, b, cfg) }?;
    }
    Ok(())
}

/// `offset[0] = mean(absmax)` on the device (no host synchronisation).
fn launch_mean(dev: &CudaDevice, absmax: &Tensor, offset: &mut Tensor) -> Result<()> {
    let name = "nf4_absmax_mean";
    let n = absmax.elem_count() as i64;
    let f = dev.function(MODULE, name)?;
    let mut b = dev.stream().launch_builder(f);
    b.arg(absmax.cuda_slice::<f32>(name)?)
        .arg(&n)
        .arg(offset.cuda_slice_mut::<f32>(name)?);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: nf4_absmax_mean(const float*, long long, float*): absmax holds n values, offset
    // 1; the kernel assumes exactly one warp of 32 threads, which cfg gives.
    unsafe { dev.launch(name, b, cfg) }
}

pub(super) fn absmax_mean(absmax: &Tensor, ordinal: usize) -> Result<f32> {
    let dev = CudaDevice::get(ordinal)?;
    let mut offset = Tensor::uninit(&[1], DType::F32, &Device::Cuda(ordinal))?;
    launch_mean(&dev, absmax, &mut offset)?;
    Ok(offset.to_vec::<f32>()?[0])
}

/// Dequantizes `q` into `out` (shape, dtype and device checked by the caller).
pub(super) fn dequantize_into(q: &Nf4Tensor, out: &mut Tensor, ordinal: usize) -> Result<()> {
    let op = "nf4 dequantize";
    let dev = CudaDevice::get(ordinal)?;
    let n = q.elem_count();
    let double = matches!(q.absmax, Absmax::Double { .. });
    let names = if double {
        [
            "nf4_dequantize_dq_f32",
            "nf4_dequantize_dq_bf16",
            "nf4_dequantize_dq_f16",
        ]
    } else {
        [
            "nf4_dequantize_f32",
            "nf4_dequantize_bf16",
            "nf4_dequantize_f16",
        ]
    };
    let name = float_kernel(op, out.dtype(), names)?;
    let f = dev.function(MODULE, name)?;
    let mut b = dev.stream().launch_builder(f);
    b.arg(q.packed.cuda_slice::<u8>(op)?);
    match &q.absmax {
        Absmax::Plain(a) => {
            b.arg(a.cuda_slice::<f32>(op)?);
        }
        Absmax::Double {
            q: qa,
            absmax2,
            offset,
            code2,
        } => {
            b.arg(qa.cuda_slice::<u8>(op)?)
                .arg(absmax2.cuda_slice::<f32>(op)?)
                .arg(offset.cuda_slice::<f32>(op)?)
                .arg(code2.cuda_slice::<f32>(op)?);
        }
    }
    let code = Nf4Code(q.code);
    b.arg(&code);
    match out.dtype() {
        DType::F32 => b.arg(out.cuda_slice_mut::<f32>(op)?),
        DType::BF16 => b.arg(out.cuda_slice_mut::<bf16>(op)?),
        _ => b.arg(out.cuda_slice_mut::<f16>(op)?),
    };
    let (n_i64, bs_i32) = (n as i64, q.blocksize as i32);
    b.arg(&n_i64).arg(&bs_i32);
    let cfg = grid_1d(n.div_ceil(8).div_ceil(DEQUANT_UNROLL), DEQUANT_THREADS);
    // SAFETY: the arguments match nf4_dequantize[_dq]_<dtype> in order and type; validate()
    // checked every part's dtype and length against n and blocksize (packed ceil(n/2), scales
    // one per block, code 16, code2 256), out holds n elements, and the blocksize is a power of
    // two >= 32 as the kernel requires (a group of 8 never straddles two blocks); the grid has at
    // least ceil(n/8)/DEQUANT_UNROLL threads, so the unrolled grid-stride covers every group.
    unsafe { dev.launch(name, b, cfg) }
}
